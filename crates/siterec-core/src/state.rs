//! State machines: protected items and jobs.
//!
//! Transitions are pure functions; the vault persists the result. An action
//! that is not allowed in the current state is refused with a message that
//! names both, so the caller can tell the operator what to do first.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The protection state of a protected (replicated) item, named as Site
/// Recovery names them in `protectionState`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProtectionState {
    /// Enable Protection job running: target chosen, initial replication not done.
    EnablingProtection,
    /// Initial replication in progress.
    InitialReplicationInProgress,
    /// Replicating deltas; failover possible.
    Protected,
    UnplannedFailoverInProgress,
    /// Failed over to the recovery site; the failover can be committed.
    UnplannedFailoverCompleted,
    FailoverCommitInProgress,
    /// Failover committed: the machine runs at the recovery site.
    FailoverCommitted,
    /// Enable Protection failed; the item can be removed or protection retried.
    ProtectionFailed,
}

/// Operations on a protected item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ItemAction {
    StartInitialReplication,
    FinishInitialReplication,
    FailProtection,
    StartUnplannedFailover,
    FinishUnplannedFailover,
    /// The failover job failed: back to where it started.
    AbortUnplannedFailover,
    StartCommit,
    FinishCommit,
    AbortCommit,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("cannot {action} while the item is {state}: {hint}")]
pub struct TransitionError {
    pub state: String,
    pub action: String,
    pub hint: String,
}

impl ProtectionState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::EnablingProtection => "EnablingProtection",
            Self::InitialReplicationInProgress => "InitialReplicationInProgress",
            Self::Protected => "Protected",
            Self::UnplannedFailoverInProgress => "UnplannedFailoverInProgress",
            Self::UnplannedFailoverCompleted => "UnplannedFailoverCompleted",
            Self::FailoverCommitInProgress => "FailoverCommitInProgress",
            Self::FailoverCommitted => "FailoverCommitted",
            Self::ProtectionFailed => "ProtectionFailed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        ALL_STATES.iter().copied().find(|st| st.as_str() == s)
    }

    /// Human description (`protectionStateDescription`).
    pub fn description(self) -> &'static str {
        match self {
            Self::EnablingProtection => "Enabling protection",
            Self::InitialReplicationInProgress => "Initial replication in progress",
            Self::Protected => "Protected",
            Self::UnplannedFailoverInProgress => "Unplanned failover in progress",
            Self::UnplannedFailoverCompleted => "Failed over",
            Self::FailoverCommitInProgress => "Committing failover",
            Self::FailoverCommitted => "Failover committed",
            Self::ProtectionFailed => "Protection failed",
        }
    }

    /// Whether the source should be replicating in this state.
    pub fn replicating(self) -> bool {
        matches!(self, Self::InitialReplicationInProgress | Self::Protected)
    }

    /// Operations the API lists in `allowedOperations`.
    pub fn allowed_operations(self) -> &'static [&'static str] {
        match self {
            Self::Protected => &["UnplannedFailover", "DisableProtection"],
            Self::UnplannedFailoverCompleted => &["Commit"],
            Self::FailoverCommitted => &["DisableProtection"],
            Self::ProtectionFailed => &["DisableProtection"],
            _ => &[],
        }
    }

    /// The state after `action`, or why it is not allowed.
    pub fn apply(self, action: ItemAction) -> Result<ProtectionState, TransitionError> {
        use ItemAction as A;
        use ProtectionState as S;
        let next = match (self, action) {
            (S::EnablingProtection, A::StartInitialReplication) => S::InitialReplicationInProgress,
            (S::InitialReplicationInProgress, A::FinishInitialReplication) => S::Protected,
            (S::EnablingProtection | S::InitialReplicationInProgress, A::FailProtection) => {
                S::ProtectionFailed
            }
            (S::Protected, A::StartUnplannedFailover) => S::UnplannedFailoverInProgress,
            (S::UnplannedFailoverInProgress, A::FinishUnplannedFailover) => {
                S::UnplannedFailoverCompleted
            }
            (S::UnplannedFailoverInProgress, A::AbortUnplannedFailover) => S::Protected,
            (S::UnplannedFailoverCompleted, A::StartCommit) => S::FailoverCommitInProgress,
            (S::FailoverCommitInProgress, A::FinishCommit) => S::FailoverCommitted,
            (S::FailoverCommitInProgress, A::AbortCommit) => S::UnplannedFailoverCompleted,
            (state, action) => {
                return Err(TransitionError {
                    state: state.description().to_lowercase(),
                    action: action_name(action).into(),
                    hint: hint(state, action).into(),
                });
            }
        };
        Ok(next)
    }
}

const ALL_STATES: [ProtectionState; 8] = [
    ProtectionState::EnablingProtection,
    ProtectionState::InitialReplicationInProgress,
    ProtectionState::Protected,
    ProtectionState::UnplannedFailoverInProgress,
    ProtectionState::UnplannedFailoverCompleted,
    ProtectionState::FailoverCommitInProgress,
    ProtectionState::FailoverCommitted,
    ProtectionState::ProtectionFailed,
];

fn action_name(a: ItemAction) -> &'static str {
    match a {
        ItemAction::StartInitialReplication => "start initial replication",
        ItemAction::FinishInitialReplication => "finalize protection",
        ItemAction::FailProtection => "fail protection",
        ItemAction::StartUnplannedFailover => "fail over",
        ItemAction::FinishUnplannedFailover => "complete the failover",
        ItemAction::AbortUnplannedFailover => "abort the failover",
        ItemAction::StartCommit => "commit the failover",
        ItemAction::FinishCommit => "complete the commit",
        ItemAction::AbortCommit => "abort the commit",
    }
}

fn hint(state: ProtectionState, action: ItemAction) -> &'static str {
    use ProtectionState as S;
    match (state, action) {
        (
            S::EnablingProtection | S::InitialReplicationInProgress,
            ItemAction::StartUnplannedFailover,
        ) => "wait until initial replication finishes and the item is protected",
        (
            S::UnplannedFailoverCompleted | S::FailoverCommitted,
            ItemAction::StartUnplannedFailover,
        ) => "the item has already failed over",
        (_, ItemAction::StartCommit) => {
            "commit follows a completed failover; fail the item over first"
        }
        (S::UnplannedFailoverInProgress | S::FailoverCommitInProgress, _) => {
            "another operation is running; wait for its job to finish"
        }
        _ => "see the item's allowedOperations",
    }
}

/// The state of a job or of one of its steps, as Site Recovery names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobState {
    NotStarted,
    InProgress,
    Succeeded,
    Failed,
    Cancelled,
    /// Steps only: not needed for this job (e.g. no VM to shut down).
    Skipped,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NotStarted => "NotStarted",
            Self::InProgress => "InProgress",
            Self::Succeeded => "Succeeded",
            Self::Failed => "Failed",
            Self::Cancelled => "Cancelled",
            Self::Skipped => "Skipped",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::NotStarted,
            Self::InProgress,
            Self::Succeeded,
            Self::Failed,
            Self::Cancelled,
            Self::Skipped,
        ]
        .into_iter()
        .find(|st| st.as_str() == s)
    }

    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Succeeded | Self::Failed | Self::Cancelled | Self::Skipped
        )
    }

    /// A job or step moves NotStarted → InProgress → terminal, never back.
    pub fn can_move_to(self, next: JobState) -> bool {
        match (self, next) {
            (a, b) if a == b => true,
            (Self::NotStarted, _) => true,
            (Self::InProgress, b) => b.is_terminal(),
            _ => false,
        }
    }

    /// The Azure-AsyncOperation `status` for a job in this state.
    pub fn operation_status(self) -> &'static str {
        match self {
            Self::NotStarted | Self::InProgress => "InProgress",
            Self::Succeeded | Self::Skipped => "Succeeded",
            Self::Failed => "Failed",
            Self::Cancelled => "Canceled",
        }
    }
}

/// The kinds of job the vault runs, with their steps in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobKind {
    CreatePolicy,
    ConfigureProtection,
    EnableProtection,
    UnplannedFailover,
    CommitFailover,
    VerifyStore,
}

impl JobKind {
    /// ARM `scenarioName`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::CreatePolicy => "AddProtectionProfile",
            Self::ConfigureProtection => "ConfigureProtection",
            Self::EnableProtection => "EnableDr",
            Self::UnplannedFailover => "UnplannedFailover",
            Self::CommitFailover => "CommitFailover",
            Self::VerifyStore => "SiterecVerifyStore",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::CreatePolicy,
            Self::ConfigureProtection,
            Self::EnableProtection,
            Self::UnplannedFailover,
            Self::CommitFailover,
            Self::VerifyStore,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// The job's name as the portal shows it.
    pub fn display_name(self) -> &'static str {
        match self {
            Self::CreatePolicy => "Create replication policy",
            Self::ConfigureProtection => "Configure protection",
            Self::EnableProtection => "Enable protection",
            Self::UnplannedFailover => "Unplanned failover",
            Self::CommitFailover => "Commit",
            Self::VerifyStore => "Verify replica stores",
        }
    }

    /// The steps the job runs, in order.
    pub fn steps(self) -> &'static [&'static str] {
        match self {
            Self::CreatePolicy => &["Validate the policy", "Save the policy"],
            Self::ConfigureProtection => {
                &["Prerequisites check for pairing clouds", "Pair the clouds"]
            }
            Self::EnableProtection => &[
                "Prerequisites check for enabling protection",
                "Identifying replication target",
                "Enable replication",
                "Starting initial replication",
                "Finalize protection",
            ],
            Self::UnplannedFailover => &[
                "Prerequisites check for failover",
                "Stop replication at the source",
                "Materialize disks at the recovery site",
                "Complete failover",
            ],
            Self::CommitFailover => &["Prerequisites check for commit", "Commit the failover"],
            Self::VerifyStore => &["Verify the chunks and manifests of the site's replica stores"],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ItemAction as A;
    use ProtectionState as S;

    #[test]
    fn the_happy_path_of_the_seeds() {
        let mut s = S::EnablingProtection;
        for a in [
            A::StartInitialReplication,
            A::FinishInitialReplication,
            A::StartUnplannedFailover,
            A::FinishUnplannedFailover,
            A::StartCommit,
            A::FinishCommit,
        ] {
            s = s.apply(a).unwrap();
        }
        assert_eq!(s, S::FailoverCommitted);
    }

    #[test]
    fn failover_before_protection_is_refused_with_a_hint() {
        let err = S::InitialReplicationInProgress
            .apply(A::StartUnplannedFailover)
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("wait until initial replication finishes"),
            "{err}"
        );
        let err = S::Protected.apply(A::StartCommit).unwrap_err();
        assert!(
            err.to_string().contains("fail the item over first"),
            "{err}"
        );
        assert!(
            S::FailoverCommitted
                .apply(A::StartUnplannedFailover)
                .is_err()
        );
    }

    #[test]
    fn aborts_return_to_where_they_started() {
        assert_eq!(
            S::UnplannedFailoverInProgress
                .apply(A::AbortUnplannedFailover)
                .unwrap(),
            S::Protected
        );
        assert_eq!(
            S::FailoverCommitInProgress.apply(A::AbortCommit).unwrap(),
            S::UnplannedFailoverCompleted
        );
    }

    #[test]
    fn only_replicating_states_replicate() {
        let replicating: Vec<_> = ALL_STATES.iter().filter(|s| s.replicating()).collect();
        assert_eq!(
            replicating,
            [&S::InitialReplicationInProgress, &S::Protected]
        );
        for s in ALL_STATES {
            assert_eq!(S::parse(s.as_str()), Some(s));
        }
    }

    #[test]
    fn job_states_only_move_forward() {
        use JobState as J;
        assert!(J::NotStarted.can_move_to(J::InProgress));
        assert!(J::InProgress.can_move_to(J::Succeeded));
        assert!(J::InProgress.can_move_to(J::Failed));
        assert!(!J::Succeeded.can_move_to(J::InProgress));
        assert!(!J::Failed.can_move_to(J::Succeeded));
        assert!(!J::InProgress.can_move_to(J::NotStarted));
        assert_eq!(J::Cancelled.operation_status(), "Canceled");
        for k in [JobKind::EnableProtection, JobKind::UnplannedFailover] {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
            assert!(!k.steps().is_empty());
        }
        assert_eq!(
            JobKind::EnableProtection.steps().last(),
            Some(&"Finalize protection")
        );
    }
}
