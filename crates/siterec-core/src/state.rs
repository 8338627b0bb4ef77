//! State machines: protected items and jobs.
//!
//! Transitions are pure functions; the vault persists the result. An action
//! that is not allowed in the current state is refused with a message that
//! names both, so the caller can tell the operator what to do first.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The protection state of a protected (replicated) item, named as Site
/// Recovery names them in `protectionState`. It says what runs and what may
/// follow; where the machine runs is the item's [`Location`], and the two
/// together are its [`Lifecycle`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ProtectionState {
    /// Enable Protection job running: target chosen, initial replication not done.
    EnablingProtection,
    /// Initial replication in progress.
    InitialReplicationInProgress,
    /// Replicating deltas from the active location to the other; failover
    /// possible.
    Protected,
    UnplannedFailoverInProgress,
    /// Failed over without the source's last changes (or to a point the
    /// operator chose); the failover can be committed.
    UnplannedFailoverCompleted,
    /// Planned failover running: the source is stopped, its last changes
    /// replicated into a final point, the machine brought up from it.
    PlannedFailoverInProgress,
    /// Failed over from the source's last state, no data lost; the failover
    /// can be committed.
    PlannedFailoverCompleted,
    /// The failed-over machine is being rebuilt from another recovery point.
    ChangeRecoveryPointInProgress,
    FailoverCommitInProgress,
    /// Failover committed: the machine runs at its new active location and
    /// nothing replicates it until a reprotect.
    FailoverCommitted,
    /// Reprotect running: replication is being set up from the active
    /// location back to the other site, sending only the blocks that differ.
    ReprotectInProgress,
    /// Enable Protection failed; the item can be removed or protection retried.
    ProtectionFailed,
    /// Disable Protection running (or failed: run it again): replication is
    /// stopped, the item goes once its job is done.
    DisablingProtection,
}

/// Where a protected machine runs (`activeLocation`): the site it was
/// protected from, or the recovery site. Replication, when there is any,
/// goes from the active location to the other one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Location {
    Primary,
    Recovery,
}

impl Location {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Primary => "Primary",
            Self::Recovery => "Recovery",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Self::Primary, Self::Recovery]
            .into_iter()
            .find(|l| l.as_str() == s)
    }

    pub fn other(self) -> Self {
        match self {
            Self::Primary => Self::Recovery,
            Self::Recovery => Self::Primary,
        }
    }

    /// The `failoverDirection` of a failover that leaves this location.
    pub fn failover_direction(self) -> &'static str {
        match self {
            Self::Primary => "PrimaryToRecovery",
            Self::Recovery => "RecoveryToPrimary",
        }
    }
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
    StartPlannedFailover,
    FinishPlannedFailover,
    /// The planned failover failed: the source runs on where it was.
    AbortPlannedFailover,
    StartChangeRecoveryPoint,
    FinishChangeRecoveryPoint,
    AbortChangeRecoveryPoint,
    StartCommit,
    FinishCommit,
    AbortCommit,
    StartReprotect,
    FinishReprotect,
    AbortReprotect,
    StartDisable,
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
            Self::PlannedFailoverInProgress => "PlannedFailoverInProgress",
            Self::PlannedFailoverCompleted => "PlannedFailoverCompleted",
            Self::ChangeRecoveryPointInProgress => "ChangeRecoveryPointInProgress",
            Self::FailoverCommitInProgress => "FailoverCommitInProgress",
            Self::FailoverCommitted => "FailoverCommitted",
            Self::ReprotectInProgress => "ReprotectInProgress",
            Self::ProtectionFailed => "ProtectionFailed",
            Self::DisablingProtection => "DisablingProtection",
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
            Self::PlannedFailoverInProgress => "Planned failover in progress",
            Self::PlannedFailoverCompleted => "Failed over (planned, no data loss)",
            Self::ChangeRecoveryPointInProgress => "Changing the recovery point",
            Self::FailoverCommitInProgress => "Committing failover",
            Self::FailoverCommitted => "Failover committed",
            Self::ReprotectInProgress => "Reprotect in progress",
            Self::ProtectionFailed => "Protection failed",
            Self::DisablingProtection => "Disabling protection",
        }
    }

    /// Whether the active location's agent replicates the item in this
    /// state (a planned failover replicates until its final point).
    pub fn replicating(self) -> bool {
        matches!(
            self,
            Self::InitialReplicationInProgress
                | Self::Protected
                | Self::PlannedFailoverInProgress
                | Self::ReprotectInProgress
        )
    }

    /// Failed over and not committed: commit or change the point next.
    pub fn failed_over(self) -> bool {
        matches!(
            self,
            Self::UnplannedFailoverCompleted | Self::PlannedFailoverCompleted
        )
    }

    /// A job of the item's lifecycle is running in this state.
    pub fn in_progress(self) -> bool {
        matches!(
            self,
            Self::EnablingProtection
                | Self::InitialReplicationInProgress
                | Self::UnplannedFailoverInProgress
                | Self::PlannedFailoverInProgress
                | Self::ChangeRecoveryPointInProgress
                | Self::FailoverCommitInProgress
                | Self::ReprotectInProgress
        )
    }

    /// Operations the API lists in `allowedOperations` (before the test
    /// failover and the machine kind are taken into account:
    /// [`allowed_operations`]).
    pub fn allowed_operations(self) -> &'static [&'static str] {
        match self {
            Self::Protected => &["PlannedFailover", "UnplannedFailover", "DisableProtection"],
            Self::UnplannedFailoverCompleted | Self::PlannedFailoverCompleted => {
                &["Commit", "ChangePit"]
            }
            Self::FailoverCommitted => &["ReverseReplicate", "DisableProtection"],
            Self::ProtectionFailed | Self::DisablingProtection => &["DisableProtection"],
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
            (S::Protected, A::StartPlannedFailover) => S::PlannedFailoverInProgress,
            (S::PlannedFailoverInProgress, A::FinishPlannedFailover) => S::PlannedFailoverCompleted,
            (S::PlannedFailoverInProgress, A::AbortPlannedFailover) => S::Protected,
            (s, A::StartChangeRecoveryPoint) if s.failed_over() => S::ChangeRecoveryPointInProgress,
            // Another point than the last state: no longer a failover
            // without data loss, whatever the first failover was. A failed
            // change leaves the item failed over, to be changed again.
            (
                S::ChangeRecoveryPointInProgress,
                A::FinishChangeRecoveryPoint | A::AbortChangeRecoveryPoint,
            ) => S::UnplannedFailoverCompleted,
            (s, A::StartCommit) if s.failed_over() => S::FailoverCommitInProgress,
            (S::FailoverCommitInProgress, A::FinishCommit) => S::FailoverCommitted,
            (S::FailoverCommitInProgress, A::AbortCommit) => S::UnplannedFailoverCompleted,
            (S::FailoverCommitted, A::StartReprotect) => S::ReprotectInProgress,
            (S::ReprotectInProgress, A::FinishReprotect) => S::Protected,
            (S::ReprotectInProgress, A::AbortReprotect) => S::FailoverCommitted,
            (
                S::Protected | S::ProtectionFailed | S::FailoverCommitted | S::DisablingProtection,
                A::StartDisable,
            ) => S::DisablingProtection,
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

    /// Why protection cannot be enabled again on an item in this state, if
    /// it cannot: an item that failed over comes back by reprotect.
    pub fn enable_again(self) -> Result<(), TransitionError> {
        let hint = match self {
            s if s.failed_over() => {
                "it has failed over: commit the failover, then reprotect it (ReverseReplicate)"
            }
            Self::FailoverCommitted => {
                "its failover is committed: reprotect it (ReverseReplicate) to replicate it again"
            }
            Self::DisablingProtection => {
                "its protection is being disabled: wait for the job (or run DisableProtection again), then enable protection"
            }
            s if s.in_progress()
                && !matches!(
                    s,
                    Self::EnablingProtection | Self::InitialReplicationInProgress
                ) =>
            {
                "another operation is running; wait for its job to finish"
            }
            _ => return Ok(()),
        };
        Err(TransitionError {
            state: self.description().to_lowercase(),
            action: "enable protection again".into(),
            hint: hint.into(),
        })
    }
}

/// A protected item's place in its life: its protection state and where
/// its machine runs. The vault's jobs move it only through [`Lifecycle::apply`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lifecycle {
    pub state: ProtectionState,
    pub active: Location,
}

impl Lifecycle {
    /// A newly enabled item: protecting the machine where it runs.
    pub const NEW: Lifecycle = Lifecycle {
        state: ProtectionState::EnablingProtection,
        active: Location::Primary,
    };

    /// The lifecycle after `action`: a completed failover moves the
    /// machine to the other location; nothing else moves it.
    pub fn apply(self, action: ItemAction) -> Result<Lifecycle, TransitionError> {
        // Failback is planned: the primary site's copy is written back in
        // place from the final point, which an unplanned failover has not.
        if self.active == Location::Recovery
            && self.state == ProtectionState::Protected
            && action == ItemAction::StartUnplannedFailover
        {
            return Err(TransitionError {
                state: "protected at the recovery site (replicating back)".into(),
                action: action_name(action).into(),
                hint: "fail it back with a planned failover (PlannedFailover, --source-stopped)"
                    .into(),
            });
        }
        let state = self.state.apply(action)?;
        let active = match action {
            ItemAction::FinishPlannedFailover | ItemAction::FinishUnplannedFailover => {
                self.active.other()
            }
            _ => self.active,
        };
        Ok(Lifecycle { state, active })
    }

    /// Where replication comes from while the item replicates: the active
    /// location (`None`: nothing replicates).
    pub fn replication_source(self) -> Option<Location> {
        self.state.replicating().then_some(self.active)
    }

    /// A failover now would leave this location (`failoverDirection`).
    pub fn failover_direction(self) -> &'static str {
        self.active.failover_direction()
    }

    /// Replication goes from the recovery site back to the primary site
    /// (after a reprotect of a failed-over machine).
    pub fn reversed(self) -> bool {
        self.active == Location::Recovery
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

/// Why `action` cannot start now because of the item's test failover, if
/// it cannot. A failover waits for a running test failover job; a test VM
/// that is running (Completed) does not stand in its way: it has its own
/// name and is cleaned up on its own. Disabling protection waits until no
/// test failover is left, so that no test VM outlives its item.
pub fn test_blocks(action: ItemAction, test: TestFailoverState) -> Option<TransitionError> {
    let hint = match action {
        ItemAction::StartUnplannedFailover | ItemAction::StartPlannedFailover
            if test.in_progress() =>
        {
            "a test failover job is running; wait for it to finish"
        }
        ItemAction::StartDisable if test != TestFailoverState::None => {
            "a test failover is active: clean it up (TestFailoverCleanup) first"
        }
        _ => return None,
    };
    Some(TransitionError {
        state: test.description().to_lowercase(),
        action: action_name(action).into(),
        hint: hint.into(),
    })
}

/// `allowedOperations` of an item: its protection state's, less what its
/// test failover stands in the way of ([`test_blocks`]), plus TestFailover
/// (from the primary site only: a VM is booted at the recovery site, a
/// physical server's disks are written there) and TestFailoverCleanup when
/// one is due.
pub fn allowed_operations(life: Lifecycle, test: TestFailoverState) -> Vec<&'static str> {
    let mut ops: Vec<&'static str> = life
        .state
        .allowed_operations()
        .iter()
        .copied()
        .filter(|op| {
            let action = match *op {
                "UnplannedFailover" => ItemAction::StartUnplannedFailover,
                "PlannedFailover" => ItemAction::StartPlannedFailover,
                "DisableProtection" => ItemAction::StartDisable,
                _ => return true,
            };
            test_blocks(action, test).is_none() && life.apply(action).is_ok()
        })
        .collect();
    if life.state == ProtectionState::Protected
        && life.active == Location::Primary
        && test == TestFailoverState::None
    {
        ops.push("TestFailover");
    }
    if test.needs_cleanup() {
        ops.push("TestFailoverCleanup");
    }
    ops
}

const ALL_STATES: [ProtectionState; 13] = [
    ProtectionState::EnablingProtection,
    ProtectionState::InitialReplicationInProgress,
    ProtectionState::Protected,
    ProtectionState::UnplannedFailoverInProgress,
    ProtectionState::UnplannedFailoverCompleted,
    ProtectionState::PlannedFailoverInProgress,
    ProtectionState::PlannedFailoverCompleted,
    ProtectionState::ChangeRecoveryPointInProgress,
    ProtectionState::FailoverCommitInProgress,
    ProtectionState::FailoverCommitted,
    ProtectionState::ReprotectInProgress,
    ProtectionState::ProtectionFailed,
    ProtectionState::DisablingProtection,
];

/// Every protection state (for exhaustive tests and lookups).
pub const PROTECTION_STATES: &[ProtectionState] = &ALL_STATES;

/// Every item action.
pub const ITEM_ACTIONS: [ItemAction; 19] = [
    ItemAction::StartInitialReplication,
    ItemAction::FinishInitialReplication,
    ItemAction::FailProtection,
    ItemAction::StartUnplannedFailover,
    ItemAction::FinishUnplannedFailover,
    ItemAction::AbortUnplannedFailover,
    ItemAction::StartPlannedFailover,
    ItemAction::FinishPlannedFailover,
    ItemAction::AbortPlannedFailover,
    ItemAction::StartChangeRecoveryPoint,
    ItemAction::FinishChangeRecoveryPoint,
    ItemAction::AbortChangeRecoveryPoint,
    ItemAction::StartCommit,
    ItemAction::FinishCommit,
    ItemAction::AbortCommit,
    ItemAction::StartReprotect,
    ItemAction::FinishReprotect,
    ItemAction::AbortReprotect,
    ItemAction::StartDisable,
];

fn action_name(a: ItemAction) -> &'static str {
    match a {
        ItemAction::StartInitialReplication => "start initial replication",
        ItemAction::FinishInitialReplication => "finalize protection",
        ItemAction::FailProtection => "fail protection",
        ItemAction::StartUnplannedFailover => "fail over",
        ItemAction::FinishUnplannedFailover => "complete the failover",
        ItemAction::AbortUnplannedFailover => "abort the failover",
        ItemAction::StartPlannedFailover => "run a planned failover",
        ItemAction::FinishPlannedFailover => "complete the planned failover",
        ItemAction::AbortPlannedFailover => "abort the planned failover",
        ItemAction::StartChangeRecoveryPoint => "change the recovery point",
        ItemAction::FinishChangeRecoveryPoint => "complete the change of recovery point",
        ItemAction::AbortChangeRecoveryPoint => "abort the change of recovery point",
        ItemAction::StartCommit => "commit the failover",
        ItemAction::FinishCommit => "complete the commit",
        ItemAction::AbortCommit => "abort the commit",
        ItemAction::StartReprotect => "reprotect",
        ItemAction::FinishReprotect => "complete the reprotect",
        ItemAction::AbortReprotect => "abort the reprotect",
        ItemAction::StartDisable => "disable protection",
    }
}

fn hint(state: ProtectionState, action: ItemAction) -> &'static str {
    use ItemAction as A;
    use ProtectionState as S;
    match (state, action) {
        (
            S::EnablingProtection | S::InitialReplicationInProgress,
            A::StartUnplannedFailover | A::StartPlannedFailover,
        ) => "wait until initial replication finishes and the item is protected",
        (S::EnablingProtection | S::InitialReplicationInProgress, A::StartDisable) => {
            "wait until initial replication finishes (or fails), then disable protection"
        }
        (s, A::StartUnplannedFailover | A::StartPlannedFailover) if s.failed_over() => {
            "the item has already failed over: commit the failover, then reprotect it"
        }
        (S::FailoverCommitted, A::StartUnplannedFailover | A::StartPlannedFailover) => {
            "the failover is committed and nothing replicates the machine: reprotect it first (ReverseReplicate)"
        }
        (S::ProtectionFailed, A::StartUnplannedFailover | A::StartPlannedFailover) => {
            "protection failed: disable protection and enable it again"
        }
        (s, A::StartCommit) if !s.in_progress() => {
            "commit follows a completed failover; fail the item over first"
        }
        (S::FailoverCommitted, A::StartChangeRecoveryPoint) => {
            "the failover is committed: its recovery point can no longer be changed"
        }
        (s, A::StartChangeRecoveryPoint) if !s.in_progress() => {
            "changing the recovery point follows a failover that is not committed yet; fail the item over first"
        }
        (s, A::StartReprotect) if s.failed_over() => {
            "commit the failover first (Commit), then reprotect"
        }
        (S::Protected, A::StartReprotect) => "the item is already protected and replicating",
        (s, A::StartReprotect) if !s.in_progress() => {
            "reprotect follows a committed failover; fail the item over and commit first"
        }
        (s, A::StartDisable) if s.failed_over() => {
            "commit the failover first (Commit), then disable protection"
        }
        (s, _) if s.in_progress() => "another operation is running; wait for its job to finish",
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
    /// Jobs only: waiting for an operator (a recovery plan's manual
    /// action) to resume it.
    Suspended,
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
            Self::Suspended => "Suspended",
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
            Self::Suspended,
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
            Self::NotStarted | Self::InProgress | Self::Suspended => "InProgress",
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
    PlannedFailover,
    DisableProtection,
    ChangeRecoveryPoint,
    Reprotect,
    RecoveryPlanTestFailover,
    RecoveryPlanTestFailoverCleanup,
    RecoveryPlanPlannedFailover,
    RecoveryPlanUnplannedFailover,
    RecoveryPlanCommit,
    RecoveryPlanReprotect,
    DeletePairing,
    ExportJobs,
}

impl JobKind {
    /// The kind of a recovery plan's job running `op`.
    pub fn for_plan(op: crate::plan::PlanOp) -> Self {
        use crate::plan::PlanOp as O;
        match op {
            O::TestFailover => Self::RecoveryPlanTestFailover,
            O::TestFailoverCleanup => Self::RecoveryPlanTestFailoverCleanup,
            O::PlannedFailover => Self::RecoveryPlanPlannedFailover,
            O::UnplannedFailover => Self::RecoveryPlanUnplannedFailover,
            O::Commit => Self::RecoveryPlanCommit,
            O::Reprotect => Self::RecoveryPlanReprotect,
        }
    }

    /// A recovery plan's job.
    pub fn is_plan(self) -> bool {
        matches!(
            self,
            Self::RecoveryPlanTestFailover
                | Self::RecoveryPlanTestFailoverCleanup
                | Self::RecoveryPlanPlannedFailover
                | Self::RecoveryPlanUnplannedFailover
                | Self::RecoveryPlanCommit
                | Self::RecoveryPlanReprotect
        )
    }

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
            Self::PlannedFailover => "PlannedFailover",
            Self::DisableProtection => "DisableDr",
            Self::ChangeRecoveryPoint => "ApplyRecoveryPoint",
            Self::Reprotect => "ReverseReplication",
            Self::RecoveryPlanTestFailover => "RecoveryPlanTestFailover",
            Self::RecoveryPlanTestFailoverCleanup => "RecoveryPlanTestFailoverCleanup",
            Self::RecoveryPlanPlannedFailover => "RecoveryPlanPlannedFailover",
            Self::RecoveryPlanUnplannedFailover => "RecoveryPlanUnplannedFailover",
            Self::RecoveryPlanCommit => "RecoveryPlanFailoverCommit",
            Self::RecoveryPlanReprotect => "RecoveryPlanReprotect",
            Self::DeletePairing => "UnconfigureProtection",
            Self::ExportJobs => "ExportJobs",
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
            Self::PlannedFailover,
            Self::DisableProtection,
            Self::ChangeRecoveryPoint,
            Self::Reprotect,
            Self::RecoveryPlanTestFailover,
            Self::RecoveryPlanTestFailoverCleanup,
            Self::RecoveryPlanPlannedFailover,
            Self::RecoveryPlanUnplannedFailover,
            Self::RecoveryPlanCommit,
            Self::RecoveryPlanReprotect,
            Self::DeletePairing,
            Self::ExportJobs,
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
            Self::PlannedFailover => "Planned failover",
            Self::DisableProtection => "Disable protection",
            Self::ChangeRecoveryPoint => "Change recovery point",
            Self::Reprotect => "Reprotect",
            Self::RecoveryPlanTestFailover => "Recovery plan test failover",
            Self::RecoveryPlanTestFailoverCleanup => "Recovery plan test failover cleanup",
            Self::RecoveryPlanPlannedFailover => "Recovery plan planned failover",
            Self::RecoveryPlanUnplannedFailover => "Recovery plan unplanned failover",
            Self::RecoveryPlanCommit => "Recovery plan commit",
            Self::RecoveryPlanReprotect => "Recovery plan reprotect",
            Self::DeletePairing => "Remove cloud pairing",
            Self::ExportJobs => "Export jobs",
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
            [
                &S::InitialReplicationInProgress,
                &S::Protected,
                &S::PlannedFailoverInProgress,
                &S::ReprotectInProgress
            ]
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
    fn allowed_operations_follow_both_states() {
        use TestFailoverState as F;
        let at = |state| Lifecycle {
            state,
            active: Location::Primary,
        };
        // VMs and physical servers alike (a server's test copy is its
        // disks).
        assert_eq!(
            allowed_operations(at(S::Protected), F::None),
            [
                "PlannedFailover",
                "UnplannedFailover",
                "DisableProtection",
                "TestFailover"
            ]
        );
        // Replicating back from the recovery site: no test failover there,
        // and failback is planned only.
        let reversed = Lifecycle {
            state: S::Protected,
            active: Location::Recovery,
        };
        assert_eq!(
            allowed_operations(reversed, F::None),
            ["PlannedFailover", "DisableProtection"]
        );
        let e = reversed.apply(A::StartUnplannedFailover).unwrap_err();
        assert!(e.to_string().contains("planned failover"), "{e}");
        assert!(allowed_operations(at(S::Protected), F::TestFailoverInitiated).is_empty());
        assert_eq!(
            allowed_operations(at(S::Protected), F::TestFailoverCompleted),
            [
                "PlannedFailover",
                "UnplannedFailover",
                "TestFailoverCleanup"
            ]
        );
        assert_eq!(
            allowed_operations(at(S::FailoverCommitted), F::MarkedForDeletion),
            ["ReverseReplicate", "TestFailoverCleanup"]
        );
        assert!(test_blocks(A::StartUnplannedFailover, F::TestFailoverCleanupInitiated).is_some());
        assert!(test_blocks(A::StartPlannedFailover, F::TestFailoverInitiated).is_some());
        assert!(test_blocks(A::StartUnplannedFailover, F::TestFailoverCompleted).is_none());
        let err = test_blocks(A::StartDisable, F::TestFailoverCompleted).unwrap();
        assert!(err.to_string().contains("clean it up"), "{err}");
        for k in [
            JobKind::TestFailover,
            JobKind::TestFailoverCleanup,
            JobKind::CreateNetworkMapping,
            JobKind::DeleteNetworkMapping,
        ] {
            assert_eq!(JobKind::parse(k.as_str()), Some(k));
        }
    }

    /// Every (state, action) pair that is allowed, and where it leads;
    /// every other pair is refused.
    const ALLOWED: &[(S, A, S)] = &[
        (
            S::EnablingProtection,
            A::StartInitialReplication,
            S::InitialReplicationInProgress,
        ),
        (
            S::EnablingProtection,
            A::FailProtection,
            S::ProtectionFailed,
        ),
        (
            S::InitialReplicationInProgress,
            A::FinishInitialReplication,
            S::Protected,
        ),
        (
            S::InitialReplicationInProgress,
            A::FailProtection,
            S::ProtectionFailed,
        ),
        (
            S::Protected,
            A::StartUnplannedFailover,
            S::UnplannedFailoverInProgress,
        ),
        (
            S::Protected,
            A::StartPlannedFailover,
            S::PlannedFailoverInProgress,
        ),
        (S::Protected, A::StartDisable, S::DisablingProtection),
        (
            S::UnplannedFailoverInProgress,
            A::FinishUnplannedFailover,
            S::UnplannedFailoverCompleted,
        ),
        (
            S::UnplannedFailoverInProgress,
            A::AbortUnplannedFailover,
            S::Protected,
        ),
        (
            S::PlannedFailoverInProgress,
            A::FinishPlannedFailover,
            S::PlannedFailoverCompleted,
        ),
        (
            S::PlannedFailoverInProgress,
            A::AbortPlannedFailover,
            S::Protected,
        ),
        (
            S::UnplannedFailoverCompleted,
            A::StartCommit,
            S::FailoverCommitInProgress,
        ),
        (
            S::UnplannedFailoverCompleted,
            A::StartChangeRecoveryPoint,
            S::ChangeRecoveryPointInProgress,
        ),
        (
            S::PlannedFailoverCompleted,
            A::StartCommit,
            S::FailoverCommitInProgress,
        ),
        (
            S::PlannedFailoverCompleted,
            A::StartChangeRecoveryPoint,
            S::ChangeRecoveryPointInProgress,
        ),
        (
            S::ChangeRecoveryPointInProgress,
            A::FinishChangeRecoveryPoint,
            S::UnplannedFailoverCompleted,
        ),
        (
            S::ChangeRecoveryPointInProgress,
            A::AbortChangeRecoveryPoint,
            S::UnplannedFailoverCompleted,
        ),
        (
            S::FailoverCommitInProgress,
            A::FinishCommit,
            S::FailoverCommitted,
        ),
        (
            S::FailoverCommitInProgress,
            A::AbortCommit,
            S::UnplannedFailoverCompleted,
        ),
        (
            S::FailoverCommitted,
            A::StartReprotect,
            S::ReprotectInProgress,
        ),
        (
            S::FailoverCommitted,
            A::StartDisable,
            S::DisablingProtection,
        ),
        (S::ReprotectInProgress, A::FinishReprotect, S::Protected),
        (
            S::ReprotectInProgress,
            A::AbortReprotect,
            S::FailoverCommitted,
        ),
        (S::ProtectionFailed, A::StartDisable, S::DisablingProtection),
        (
            S::DisablingProtection,
            A::StartDisable,
            S::DisablingProtection,
        ),
    ];

    #[test]
    fn every_transition_is_the_table_and_every_refusal_says_why() {
        let mut allowed = 0;
        for &state in PROTECTION_STATES {
            for action in ITEM_ACTIONS {
                let want = ALLOWED
                    .iter()
                    .find(|(s, a, _)| *s == state && *a == action)
                    .map(|(_, _, to)| *to);
                match (state.apply(action), want) {
                    (Ok(to), Some(w)) => {
                        assert_eq!(to, w, "{state:?} --{action:?}");
                        allowed += 1;
                    }
                    (Err(e), None) => {
                        assert_eq!(e.state, state.description().to_lowercase());
                        assert_eq!(e.action, action_name(action));
                        assert!(!e.hint.is_empty());
                        let text = e.to_string();
                        assert!(text.starts_with("cannot "), "{text}");
                    }
                    (got, want) => panic!("{state:?} --{action:?}: got {got:?}, want {want:?}"),
                }
            }
        }
        assert_eq!(allowed, ALLOWED.len());
    }

    #[test]
    fn allowed_operations_are_exactly_the_operations_that_can_start() {
        for &state in PROTECTION_STATES {
            for op in state.allowed_operations() {
                let action = match *op {
                    "PlannedFailover" => A::StartPlannedFailover,
                    "UnplannedFailover" => A::StartUnplannedFailover,
                    "DisableProtection" => A::StartDisable,
                    "Commit" => A::StartCommit,
                    "ChangePit" => A::StartChangeRecoveryPoint,
                    "ReverseReplicate" => A::StartReprotect,
                    other => panic!("unknown operation {other}"),
                };
                assert!(state.apply(action).is_ok(), "{state:?} lists {op}");
            }
            // And the other way round: a Start action that applies is listed.
            for (action, op) in [
                (A::StartPlannedFailover, "PlannedFailover"),
                (A::StartUnplannedFailover, "UnplannedFailover"),
                (A::StartDisable, "DisableProtection"),
                (A::StartCommit, "Commit"),
                (A::StartChangeRecoveryPoint, "ChangePit"),
                (A::StartReprotect, "ReverseReplicate"),
            ] {
                assert_eq!(
                    state.apply(action).is_ok(),
                    state.allowed_operations().contains(&op),
                    "{state:?} {op}"
                );
            }
        }
    }

    #[test]
    fn the_whole_cycle_comes_home_in_the_original_direction() {
        let mut life = Lifecycle::NEW;
        let mut locations = vec![];
        for a in [
            A::StartInitialReplication,
            A::FinishInitialReplication,
            // Planned failover to the recovery site, commit, reprotect.
            A::StartPlannedFailover,
            A::FinishPlannedFailover,
            A::StartCommit,
            A::FinishCommit,
            A::StartReprotect,
            A::FinishReprotect,
            // Failback: a planned failover the other way, commit, reprotect.
            A::StartPlannedFailover,
            A::FinishPlannedFailover,
            A::StartCommit,
            A::FinishCommit,
            A::StartReprotect,
            A::FinishReprotect,
        ] {
            life = life.apply(a).unwrap();
            locations.push((life.state, life.active, life.replication_source()));
        }
        assert_eq!(
            life,
            Lifecycle {
                state: S::Protected,
                active: Location::Primary
            }
        );
        use Location::{Primary as P, Recovery as R};
        // Replication runs from the active location only, and not at all
        // between a failover's end and its reprotect.
        assert_eq!(
            locations,
            [
                (S::InitialReplicationInProgress, P, Some(P)),
                (S::Protected, P, Some(P)),
                (S::PlannedFailoverInProgress, P, Some(P)),
                (S::PlannedFailoverCompleted, R, None),
                (S::FailoverCommitInProgress, R, None),
                (S::FailoverCommitted, R, None),
                (S::ReprotectInProgress, R, Some(R)),
                (S::Protected, R, Some(R)),
                (S::PlannedFailoverInProgress, R, Some(R)),
                (S::PlannedFailoverCompleted, P, None),
                (S::FailoverCommitInProgress, P, None),
                (S::FailoverCommitted, P, None),
                (S::ReprotectInProgress, P, Some(P)),
                (S::Protected, P, Some(P)),
            ]
        );
        let back = Lifecycle {
            state: S::Protected,
            active: R,
        };
        assert_eq!(back.failover_direction(), "RecoveryToPrimary");
        assert!(back.reversed());
        // An aborted failover leaves the machine where it ran.
        let aborted = back
            .apply(A::StartPlannedFailover)
            .unwrap()
            .apply(A::AbortPlannedFailover)
            .unwrap();
        assert_eq!(aborted, back);
        assert_eq!(Location::parse("Recovery"), Some(R));
        assert_eq!(Location::parse("recovery"), None);
    }

    #[test]
    fn a_failed_over_item_is_not_enabled_again_but_reprotected() {
        for s in [
            S::UnplannedFailoverCompleted,
            S::PlannedFailoverCompleted,
            S::FailoverCommitted,
        ] {
            let err = s.enable_again().unwrap_err();
            assert!(err.to_string().contains("ReverseReplicate"), "{err}");
        }
        for s in [
            S::Protected,
            S::EnablingProtection,
            S::InitialReplicationInProgress,
            S::ProtectionFailed,
        ] {
            assert!(s.enable_again().is_ok(), "{s:?}");
        }
        assert!(S::ReprotectInProgress.enable_again().is_err());
        let err = S::PlannedFailoverCompleted
            .apply(A::StartReprotect)
            .unwrap_err();
        assert!(
            err.to_string().contains("commit the failover first"),
            "{err}"
        );
        let err = S::FailoverCommitted
            .apply(A::StartPlannedFailover)
            .unwrap_err();
        assert!(err.to_string().contains("reprotect it first"), "{err}");
        let err = S::FailoverCommitted
            .apply(A::StartChangeRecoveryPoint)
            .unwrap_err();
        assert!(
            err.to_string().contains("can no longer be changed"),
            "{err}"
        );
        let err = S::UnplannedFailoverCompleted
            .apply(A::StartDisable)
            .unwrap_err();
        assert!(
            err.to_string().contains("commit the failover first"),
            "{err}"
        );
    }
}
