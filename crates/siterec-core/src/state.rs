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

/// Where a protected item stands with test failover, named after the
/// SDK's test failover states (`testFailoverState`). It runs beside the
/// protection state: the item stays Protected and keeps replicating while a
/// test VM runs at the recovery site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TestFailoverState {
    /// No test failover is active.
    None,
    /// A TestFailover job is creating and starting the test VM.
    TestFailoverInitiated,
    /// The test VM runs; clean it up when the test is over.
    TestFailoverCompleted,
    /// The TestFailover job failed; clean up what it may have left.
    TestFailoverFailed,
    /// A TestFailoverCleanup job is powering off and deleting the test VM.
    TestFailoverCleanupInitiated,
    /// Cleanup failed: the test VM may still exist; retry the cleanup.
    MarkedForDeletion,
}

/// Test failover operations on a protected item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TestAction {
    Start,
    Finish,
    Fail,
    StartCleanup,
    FinishCleanup,
    FailCleanup,
}

impl TestFailoverState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::None => "None",
            Self::TestFailoverInitiated => "TestFailoverInitiated",
            Self::TestFailoverCompleted => "TestFailoverCompleted",
            Self::TestFailoverFailed => "TestFailoverFailed",
            Self::TestFailoverCleanupInitiated => "TestFailoverCleanupInitiated",
            Self::MarkedForDeletion => "MarkedForDeletion",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        ALL_TEST_STATES.iter().copied().find(|t| t.as_str() == s)
    }

    /// `testFailoverStateDescription`.
    pub fn description(self) -> &'static str {
        match self {
            Self::None => "None",
            Self::TestFailoverInitiated => "Test failover in progress",
            Self::TestFailoverCompleted => {
                "Test failover completed: the test VM is running; clean up the test failover when done"
            }
            Self::TestFailoverFailed => {
                "Test failover failed: clean up the test failover before trying again"
            }
            Self::TestFailoverCleanupInitiated => "Cleaning up the test failover",
            Self::MarkedForDeletion => {
                "Test failover cleanup failed: the test VM may still exist; clean up again"
            }
        }
    }

    /// A test failover or its cleanup has a job running.
    pub fn in_progress(self) -> bool {
        matches!(
            self,
            Self::TestFailoverInitiated | Self::TestFailoverCleanupInitiated
        )
    }

    /// Whether TestFailoverCleanup is the thing to do next.
    pub fn needs_cleanup(self) -> bool {
        matches!(
            self,
            Self::TestFailoverCompleted | Self::TestFailoverFailed | Self::MarkedForDeletion
        )
    }

    /// The test failover state after `action`, or why it is not allowed.
    /// A test failover starts only from a Protected item (it needs a
    /// recovery point and replication that goes on beside it).
    pub fn apply(
        self,
        action: TestAction,
        protection: ProtectionState,
    ) -> Result<TestFailoverState, TransitionError> {
        use TestAction as A;
        use TestFailoverState as T;
        let refuse = |hint: &str| TransitionError {
            state: match self {
                T::None => protection.description().to_lowercase(),
                t => t.description().to_lowercase(),
            },
            action: test_action_name(action).into(),
            hint: hint.into(),
        };
        Ok(match (self, action) {
            (T::None, A::Start) if protection == ProtectionState::Protected => {
                T::TestFailoverInitiated
            }
            (T::None, A::Start) => {
                return Err(refuse(match protection {
                    ProtectionState::EnablingProtection
                    | ProtectionState::InitialReplicationInProgress => {
                        "wait until initial replication finishes and the item is protected"
                    }
                    _ => "test failover needs a protected, replicating item",
                }));
            }
            (T::TestFailoverInitiated, A::Finish) => T::TestFailoverCompleted,
            (T::TestFailoverInitiated, A::Fail) => T::TestFailoverFailed,
            (t, A::StartCleanup) if t.needs_cleanup() => T::TestFailoverCleanupInitiated,
            (T::TestFailoverCleanupInitiated, A::FinishCleanup) => T::None,
            (T::TestFailoverCleanupInitiated, A::FailCleanup) => T::MarkedForDeletion,
            (t, A::Start) if t.needs_cleanup() => {
                return Err(refuse(
                    "a test failover is already active: clean it up (TestFailoverCleanup) first",
                ));
            }
            (T::None, A::StartCleanup) => {
                return Err(refuse(
                    "there is no test failover to clean up: run a test failover first",
                ));
            }
            (t, _) if t.in_progress() => {
                return Err(refuse(
                    "another test failover operation is running; wait for its job to finish",
                ));
            }
            _ => return Err(refuse("see the item's allowedOperations")),
        })
    }
}

const ALL_TEST_STATES: [TestFailoverState; 6] = [
    TestFailoverState::None,
    TestFailoverState::TestFailoverInitiated,
    TestFailoverState::TestFailoverCompleted,
    TestFailoverState::TestFailoverFailed,
    TestFailoverState::TestFailoverCleanupInitiated,
    TestFailoverState::MarkedForDeletion,
];

fn test_action_name(a: TestAction) -> &'static str {
    match a {
        TestAction::Start => "start a test failover",
        TestAction::Finish => "complete the test failover",
        TestAction::Fail => "fail the test failover",
        TestAction::StartCleanup => "clean up the test failover",
        TestAction::FinishCleanup => "complete the test failover cleanup",
        TestAction::FailCleanup => "fail the test failover cleanup",
    }
}

/// Why an unplanned failover cannot start now because of a test failover,
/// if it cannot. A test VM that is running (Completed) does not stand in
/// the way: it has its own name and is cleaned up on its own.
pub fn test_blocks_failover(test: TestFailoverState) -> Option<TransitionError> {
    test.in_progress().then(|| TransitionError {
        state: test.description().to_lowercase(),
        action: action_name(ItemAction::StartUnplannedFailover).into(),
        hint: "a test failover job is running; wait for it to finish".into(),
    })
}

/// `allowedOperations` of an item: its protection state's, less an
/// unplanned failover while a test failover job runs, plus TestFailover
/// (VMs only: the recovery site's compute driver boots VMs) and
/// TestFailoverCleanup when one is due.
pub fn allowed_operations(
    protection: ProtectionState,
    test: TestFailoverState,
    vm: bool,
) -> Vec<&'static str> {
    let mut ops: Vec<&'static str> = protection
        .allowed_operations()
        .iter()
        .copied()
        .filter(|op| !(test.in_progress() && *op == "UnplannedFailover"))
        .collect();
    if vm && protection == ProtectionState::Protected && test == TestFailoverState::None {
        ops.push("TestFailover");
    }
    if test.needs_cleanup() {
        ops.push("TestFailoverCleanup");
    }
    ops
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

/// The kinds of job the vault runs (their steps: [`JobKind::step_keys`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum JobKind {
    CreatePolicy,
    ConfigureProtection,
    EnableProtection,
    UnplannedFailover,
    CommitFailover,
    VerifyStore,
    TestFailover,
    TestFailoverCleanup,
    CreateNetworkMapping,
    DeleteNetworkMapping,
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
            Self::TestFailover => "TestFailover",
            Self::TestFailoverCleanup => "TestFailoverCleanup",
            Self::CreateNetworkMapping => "MapNetwork",
            Self::DeleteNetworkMapping => "UnmapNetwork",
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
            Self::TestFailover,
            Self::TestFailoverCleanup,
            Self::CreateNetworkMapping,
            Self::DeleteNetworkMapping,
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
            Self::TestFailover => "Test failover",
            Self::TestFailoverCleanup => "Test failover cleanup",
            Self::CreateNetworkMapping => "Map networks",
            Self::DeleteNetworkMapping => "Remove network mapping",
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
            assert!(!k.step_keys(false).is_empty());
        }
    }

    #[test]
    fn a_test_failover_runs_beside_protection_and_is_cleaned_up() {
        use TestAction as T;
        use TestFailoverState as F;
        let mut t = F::None;
        for (a, want) in [
            (T::Start, F::TestFailoverInitiated),
            (T::Finish, F::TestFailoverCompleted),
            (T::StartCleanup, F::TestFailoverCleanupInitiated),
            (T::FinishCleanup, F::None),
        ] {
            t = t.apply(a, S::Protected).unwrap();
            assert_eq!(t, want);
        }
        // A failed test failover and a failed cleanup both leave cleanup to do.
        let failed = F::TestFailoverInitiated
            .apply(T::Fail, S::Protected)
            .unwrap();
        assert_eq!(failed, F::TestFailoverFailed);
        assert!(failed.needs_cleanup());
        let marked = failed
            .apply(T::StartCleanup, S::Protected)
            .unwrap()
            .apply(T::FailCleanup, S::Protected)
            .unwrap();
        assert_eq!(marked, F::MarkedForDeletion);
        assert_eq!(
            marked.apply(T::StartCleanup, S::Protected).unwrap(),
            F::TestFailoverCleanupInitiated
        );
        // Cleanup works whatever the item did since (e.g. failed over).
        assert!(
            F::TestFailoverCompleted
                .apply(T::StartCleanup, S::FailoverCommitted)
                .is_ok()
        );
        for st in ALL_TEST_STATES {
            assert_eq!(F::parse(st.as_str()), Some(st));
        }
    }

    #[test]
    fn test_failover_refusals_name_the_way_out() {
        use TestAction as T;
        use TestFailoverState as F;
        let err = F::TestFailoverCompleted
            .apply(T::Start, S::Protected)
            .unwrap_err();
        assert!(err.to_string().contains("clean it up"), "{err}");
        let err = F::None.apply(T::StartCleanup, S::Protected).unwrap_err();
        assert!(
            err.to_string()
                .contains("no test failover to clean up: run a test failover first"),
            "{err}"
        );
        let err = F::None
            .apply(T::Start, S::InitialReplicationInProgress)
            .unwrap_err();
        assert!(
            err.to_string().contains("wait until initial replication"),
            "{err}"
        );
        assert!(
            F::None
                .apply(T::Start, S::UnplannedFailoverCompleted)
                .is_err()
        );
        for busy in [F::TestFailoverInitiated, F::TestFailoverCleanupInitiated] {
            for a in [T::Start, T::StartCleanup] {
                let err = busy.apply(a, S::Protected).unwrap_err();
                assert!(err.to_string().contains("wait for its job"), "{err}");
            }
        }
        assert!(F::None.apply(T::Finish, S::Protected).is_err());
        assert!(F::None.apply(T::FinishCleanup, S::Protected).is_err());
    }

    #[test]
    fn allowed_operations_follow_both_states_and_the_machine_kind() {
        use TestFailoverState as F;
        assert_eq!(
            allowed_operations(S::Protected, F::None, true),
            ["UnplannedFailover", "DisableProtection", "TestFailover"]
        );
        // Physical servers cannot be booted by the compute driver.
        assert_eq!(
            allowed_operations(S::Protected, F::None, false),
            ["UnplannedFailover", "DisableProtection"]
        );
        assert_eq!(
            allowed_operations(S::Protected, F::TestFailoverInitiated, true),
            ["DisableProtection"]
        );
        assert_eq!(
            allowed_operations(S::Protected, F::TestFailoverCompleted, true),
            [
                "UnplannedFailover",
                "DisableProtection",
                "TestFailoverCleanup"
            ]
        );
        assert_eq!(
            allowed_operations(S::FailoverCommitted, F::MarkedForDeletion, true),
            ["DisableProtection", "TestFailoverCleanup"]
        );
        assert!(test_blocks_failover(F::TestFailoverCleanupInitiated).is_some());
        assert!(test_blocks_failover(F::TestFailoverCompleted).is_none());
        for k in [
            JobKind::TestFailover,
            JobKind::TestFailoverCleanup,
            JobKind::CreateNetworkMapping,
            JobKind::DeleteNetworkMapping,
        ] {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
        }
    }
}
