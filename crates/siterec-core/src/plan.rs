//! Recovery plans: ordered groups of protected items, with actions before
//! and after each group (scripts the destination site's agent runs, manual
//! actions an operator confirms), and the operations a plan runs over its
//! items. Pure: the vault stores plans and runs their jobs
//! ([`crate::orchestration`]'s plan steps).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::state::{Lifecycle, Location, TestFailoverState, allowed_operations};

/// The most machines a plan holds (the seeds' tested maximum).
pub const MAX_PLAN_ITEMS: usize = 100;
/// The longest a script may be given to run.
pub const MAX_SCRIPT_TIMEOUT_SECS: u32 = 4 * 3600;
/// A script's timeout when the plan names none.
pub const DEFAULT_SCRIPT_TIMEOUT_SECS: u32 = 600;

/// A plan as stored (`recovery_plans.body`) and shown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecoveryPlan {
    pub primary_fabric: String,
    pub recovery_fabric: String,
    pub groups: Vec<PlanGroup>,
}

/// One group: its items fail over together (in parallel), after the
/// groups before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub struct PlanGroup {
    /// Protected item names.
    #[serde(default)]
    pub items: Vec<String>,
    /// Run before the group's items fail over, in order.
    #[serde(default)]
    pub pre: Vec<PlanAction>,
    /// Run after they did, in order.
    #[serde(default)]
    pub post: Vec<PlanAction>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanAction {
    pub name: String,
    pub kind: ActionKind,
    /// The operations it runs for; empty: every failover (test, planned,
    /// unplanned).
    #[serde(default)]
    pub operations: Vec<PlanOp>,
    /// The directions it runs for; empty: both.
    #[serde(default)]
    pub directions: Vec<Location>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "type")]
pub enum ActionKind {
    /// A program of the destination site's agent (a path relative to its
    /// scripts directory), with the plan's context in its environment; a
    /// non-zero exit or running past the timeout fails the plan.
    Script { path: String, timeout_secs: u32 },
    /// The plan's job waits (Suspended) until an operator resumes it.
    Manual { instructions: String },
}

/// What a plan's job does to its items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum PlanOp {
    TestFailover,
    TestFailoverCleanup,
    PlannedFailover,
    UnplannedFailover,
    Commit,
    Reprotect,
}

impl PlanOp {
    pub const ALL: [PlanOp; 6] = [
        Self::TestFailover,
        Self::TestFailoverCleanup,
        Self::PlannedFailover,
        Self::UnplannedFailover,
        Self::Commit,
        Self::Reprotect,
    ];

    /// The name in ARM (`failoverTypes`, `allowedOperations`) and the
    /// item operation it runs (an item's `allowedOperations` entry).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::TestFailover => "TestFailover",
            Self::TestFailoverCleanup => "TestFailoverCleanup",
            Self::PlannedFailover => "PlannedFailover",
            Self::UnplannedFailover => "UnplannedFailover",
            Self::Commit => "Commit",
            Self::Reprotect => "ReverseReplicate",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL
            .into_iter()
            .find(|o| o.as_str().eq_ignore_ascii_case(s))
            .or_else(|| {
                s.eq_ignore_ascii_case("Reprotect")
                    .then_some(Self::Reprotect)
            })
    }

    /// How the operator names it.
    pub fn display_name(self) -> &'static str {
        match self {
            Self::TestFailover => "test failover",
            Self::TestFailoverCleanup => "test failover cleanup",
            Self::PlannedFailover => "planned failover",
            Self::UnplannedFailover => "unplanned failover",
            Self::Commit => "commit",
            Self::Reprotect => "reprotect",
        }
    }

    /// A failover: actions without `operations` run for it.
    pub fn is_failover(self) -> bool {
        matches!(
            self,
            Self::TestFailover | Self::PlannedFailover | Self::UnplannedFailover
        )
    }

    /// One machine failing does not stop the others (later groups run;
    /// the job reports each machine's outcome): an unplanned failover is
    /// what a disaster calls for, every machine that can come up must.
    pub fn runs_to_the_end(self) -> bool {
        matches!(self, Self::UnplannedFailover)
    }
}

impl ActionKind {
    pub fn is_manual(&self) -> bool {
        matches!(self, Self::Manual { .. })
    }
}

impl PlanAction {
    /// Whether the action runs for `op` going to `to`.
    pub fn applies(&self, op: PlanOp, to: Location) -> bool {
        let op_ok = if self.operations.is_empty() {
            op.is_failover()
        } else {
            self.operations.contains(&op)
        };
        op_ok && (self.directions.is_empty() || self.directions.contains(&to))
    }
}

/// Why a plan is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PlanError(pub String);

impl RecoveryPlan {
    /// Every item of the plan, in group order.
    pub fn items(&self) -> impl Iterator<Item = &str> {
        self.groups
            .iter()
            .flat_map(|g| g.items.iter().map(String::as_str))
    }

    /// Checks the plan's shape (not its items' existence: the vault does).
    pub fn validate(&self) -> Result<(), PlanError> {
        if self.groups.is_empty() {
            return Err(PlanError(
                "a recovery plan needs at least one group (Group 1 holds its first machines)"
                    .into(),
            ));
        }
        let mut seen = BTreeSet::new();
        for (g, group) in self.groups.iter().enumerate() {
            for item in &group.items {
                if !seen.insert(item.to_lowercase()) {
                    return Err(PlanError(format!(
                        "item '{item}' is in the plan twice (again in group {}): a machine belongs to one group of a plan",
                        g + 1
                    )));
                }
            }
            let mut names = BTreeSet::new();
            for a in group.pre.iter().chain(&group.post) {
                if a.name.trim().is_empty() {
                    return Err(PlanError(format!(
                        "an action of group {} has no name: name each action",
                        g + 1
                    )));
                }
                if !names.insert(a.name.to_lowercase()) {
                    return Err(PlanError(format!(
                        "group {} has two actions named '{}': give each action of a group its own name",
                        g + 1,
                        a.name
                    )));
                }
                if let ActionKind::Script { path, timeout_secs } = &a.kind {
                    check_script_path(path).map_err(|e| {
                        PlanError(format!("action '{}' of group {}: {e}", a.name, g + 1))
                    })?;
                    if !(1..=MAX_SCRIPT_TIMEOUT_SECS).contains(timeout_secs) {
                        return Err(PlanError(format!(
                            "action '{}' of group {}: timeout {timeout_secs} s is out of range: give 1 to {MAX_SCRIPT_TIMEOUT_SECS} seconds",
                            a.name,
                            g + 1
                        )));
                    }
                }
            }
        }
        if seen.len() > MAX_PLAN_ITEMS {
            return Err(PlanError(format!(
                "the plan holds {} machines; a plan holds at most {MAX_PLAN_ITEMS}: split it into several plans",
                seen.len()
            )));
        }
        Ok(())
    }
}

/// A script path is relative to the agent's scripts directory and stays
/// inside it.
pub fn check_script_path(path: &str) -> Result<(), PlanError> {
    let p = std::path::Path::new(path);
    if path.trim().is_empty() {
        return Err(PlanError("the script path is empty".into()));
    }
    if p.is_absolute()
        || p.components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(PlanError(format!(
            "script path '{path}' must be relative to the agent's scripts directory, without '..' (put the script in that directory, see 'scripts_dir' in the agent's config)"
        )));
    }
    Ok(())
}

/// Why an item cannot take `op` now, if it cannot.
pub fn item_refusal(
    op: PlanOp,
    to: Location,
    life: Lifecycle,
    test: TestFailoverState,
) -> Option<String> {
    let ops = allowed_operations(life, test);
    if !ops.contains(&op.as_str()) {
        return Some(format!(
            "it is {} at its {} site{} and allows {}",
            life.state.description().to_lowercase(),
            life.active.as_str().to_lowercase(),
            match test {
                TestFailoverState::None => String::new(),
                t => format!(" (test failover {})", t.as_str()),
            },
            if ops.is_empty() {
                "nothing now".to_string()
            } else {
                ops.join(", ")
            }
        ));
    }
    let failover = matches!(
        op,
        PlanOp::PlannedFailover | PlanOp::UnplannedFailover | PlanOp::TestFailover
    );
    if failover && life.active.other() != to {
        return Some(format!(
            "it runs at its {} site, so it fails over {}, not toward its {} site",
            life.active.as_str().to_lowercase(),
            life.active.failover_direction(),
            to.as_str().to_lowercase()
        ));
    }
    None
}

/// The plan's operations that every item allows now (a plan's
/// `allowedOperations`), for failovers toward the site `to` items would go.
pub fn allowed_plan_operations(items: &[(Lifecycle, TestFailoverState)]) -> Vec<&'static str> {
    if items.is_empty() {
        return vec![];
    }
    PlanOp::ALL
        .into_iter()
        .filter(|op| {
            items
                .iter()
                .all(|(life, test)| item_refusal(*op, life.active.other(), *life, *test).is_none())
        })
        .map(PlanOp::as_str)
        .collect()
}

/// Where a plan step sits: the steps of a plan's job, in order, are the
/// check, then per group its pre-actions, its items, its post-actions
/// (only the actions that apply to the job's operation and direction),
/// then the completion.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PlanStep {
    Check,
    Action {
        group: usize,
        post: bool,
        index: usize,
    },
    Items {
        group: usize,
    },
    Complete,
}

/// The steps of a plan job over `groups` for `op` toward `to`.
pub fn layout(groups: &[PlanGroup], op: PlanOp, to: Location) -> Vec<PlanStep> {
    let mut steps = vec![PlanStep::Check];
    for (g, group) in groups.iter().enumerate() {
        for (i, a) in group.pre.iter().enumerate() {
            if a.applies(op, to) {
                steps.push(PlanStep::Action {
                    group: g,
                    post: false,
                    index: i,
                });
            }
        }
        steps.push(PlanStep::Items { group: g });
        for (i, a) in group.post.iter().enumerate() {
            if a.applies(op, to) {
                steps.push(PlanStep::Action {
                    group: g,
                    post: true,
                    index: i,
                });
            }
        }
    }
    steps.push(PlanStep::Complete);
    steps
}

/// The latest instant every one of `members` has a point at (the
/// members' point times, each list any order): a multi-VM group's points
/// are taken at one instant and carry its time. `None`: no shared point.
pub fn shared_point_time(members: &[Vec<i64>]) -> Option<i64> {
    let (first, rest) = members.split_first()?;
    let sets: Vec<BTreeSet<i64>> = rest.iter().map(|t| t.iter().copied().collect()).collect();
    first
        .iter()
        .copied()
        .filter(|t| sets.iter().all(|s| s.contains(t)))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::ProtectionState;

    fn script(name: &str) -> PlanAction {
        PlanAction {
            name: name.into(),
            kind: ActionKind::Script {
                path: "fix-dns.sh".into(),
                timeout_secs: 60,
            },
            operations: vec![],
            directions: vec![],
        }
    }

    fn plan(groups: Vec<PlanGroup>) -> RecoveryPlan {
        RecoveryPlan {
            primary_fabric: "p".into(),
            recovery_fabric: "r".into(),
            groups,
        }
    }

    #[test]
    fn validation_names_what_is_wrong() {
        let g = |items: &[&str]| PlanGroup {
            items: items.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(plan(vec![g(&["a", "b"]), g(&["c"])]).validate().is_ok());
        assert!(plan(vec![]).validate().is_err());
        let e = plan(vec![g(&["a"]), g(&["A"])]).validate().unwrap_err();
        assert!(e.0.contains("twice") && e.0.contains("group 2"), "{e}");
        let many: Vec<String> = (0..101).map(|i| format!("m{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let e = plan(vec![g(&refs)]).validate().unwrap_err();
        assert!(e.0.contains("at most 100"), "{e}");
        let hundred = &refs[..100];
        assert!(plan(vec![g(hundred)]).validate().is_ok());
        let mut bad = g(&["a"]);
        bad.pre = vec![script("x"), script("X")];
        assert!(
            plan(vec![bad])
                .validate()
                .unwrap_err()
                .0
                .contains("two actions")
        );
        let mut bad = g(&["a"]);
        let mut s = script("x");
        s.kind = ActionKind::Script {
            path: "../etc/passwd".into(),
            timeout_secs: 5,
        };
        bad.post = vec![s];
        assert!(
            plan(vec![bad])
                .validate()
                .unwrap_err()
                .0
                .contains("relative")
        );
        for p in ["/bin/sh", "a/../b", "", "./x"] {
            assert!(check_script_path(p).is_err(), "{p}");
        }
        assert!(check_script_path("dns/fix.sh").is_ok());
    }

    #[test]
    fn layout_keeps_only_the_actions_that_apply() {
        let mut g1 = PlanGroup {
            items: vec!["a".into()],
            pre: vec![script("pre")],
            post: vec![],
        };
        let mut manual = script("confirm");
        manual.kind = ActionKind::Manual {
            instructions: "check the database".into(),
        };
        manual.operations = vec![PlanOp::PlannedFailover];
        g1.post = vec![manual];
        let groups = vec![
            g1,
            PlanGroup {
                items: vec!["b".into()],
                ..Default::default()
            },
        ];
        use PlanStep as S;
        assert_eq!(
            layout(&groups, PlanOp::PlannedFailover, Location::Recovery),
            vec![
                S::Check,
                S::Action {
                    group: 0,
                    post: false,
                    index: 0
                },
                S::Items { group: 0 },
                S::Action {
                    group: 0,
                    post: true,
                    index: 0
                },
                S::Items { group: 1 },
                S::Complete
            ]
        );
        // Commit: no action says it runs for commits.
        assert_eq!(
            layout(&groups, PlanOp::Commit, Location::Recovery),
            vec![
                S::Check,
                S::Items { group: 0 },
                S::Items { group: 1 },
                S::Complete
            ]
        );
        let mut only_back = script("back");
        only_back.directions = vec![Location::Primary];
        assert!(!only_back.applies(PlanOp::UnplannedFailover, Location::Recovery));
        assert!(only_back.applies(PlanOp::PlannedFailover, Location::Primary));
    }

    #[test]
    fn refusals_say_the_state_and_what_it_allows() {
        let protected = Lifecycle {
            state: ProtectionState::Protected,
            active: Location::Primary,
        };
        assert_eq!(
            item_refusal(
                PlanOp::TestFailover,
                Location::Recovery,
                protected,
                TestFailoverState::None
            ),
            None
        );
        let r = item_refusal(
            PlanOp::Commit,
            Location::Recovery,
            protected,
            TestFailoverState::None,
        )
        .unwrap();
        assert!(
            r.contains("protected") && r.contains("PlannedFailover"),
            "{r}"
        );
        let r = item_refusal(
            PlanOp::PlannedFailover,
            Location::Primary,
            protected,
            TestFailoverState::None,
        )
        .unwrap();
        assert!(r.contains("PrimaryToRecovery"), "{r}");
        let initial = Lifecycle {
            state: ProtectionState::InitialReplicationInProgress,
            active: Location::Primary,
        };
        assert!(
            allowed_plan_operations(&[
                (protected, TestFailoverState::None),
                (initial, TestFailoverState::None)
            ])
            .is_empty()
        );
        assert!(
            allowed_plan_operations(&[(protected, TestFailoverState::None)])
                .contains(&"TestFailover")
        );
    }

    #[test]
    fn shared_point_is_the_latest_instant_all_members_have() {
        assert_eq!(
            shared_point_time(&[vec![1, 2, 5, 7], vec![7, 2, 5], vec![2, 5, 6]]),
            Some(5)
        );
        assert_eq!(shared_point_time(&[vec![1], vec![2]]), None);
        assert_eq!(shared_point_time(&[]), None);
        assert_eq!(shared_point_time(&[vec![3, 4]]), Some(4));
    }
}
