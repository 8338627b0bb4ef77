//! A recovery plan's job run against an in-memory world: its steps in
//! order, its machines' jobs started once per attempt, scripts, manual
//! actions, failures, shared points of multi-VM groups.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::*;
use crate::plan::{ActionKind, PlanAction, PlanGroup, PlanOp};

const JOB: &str = "plan-job";

fn script(name: &str) -> PlanAction {
    PlanAction {
        name: name.into(),
        kind: ActionKind::Script {
            path: format!("{name}.sh"),
            timeout_secs: 60,
        },
        operations: vec![],
        directions: vec![],
    }
}

fn manual(name: &str) -> PlanAction {
    PlanAction {
        name: name.into(),
        kind: ActionKind::Manual {
            instructions: "check the database".into(),
        },
        operations: vec![],
        directions: vec![],
    }
}

/// Three groups: db (pre-script), app1+app2 (post-script, manual), web.
pub(super) fn sample_plan(op: PlanOp) -> PlanInput {
    PlanInput {
        plan: "shop".into(),
        op,
        to: Location::Recovery,
        primary_fabric: "p".into(),
        recovery_fabric: "r".into(),
        groups: vec![
            PlanGroup {
                items: vec!["db".into()],
                pre: vec![script("fence")],
                post: vec![],
            },
            PlanGroup {
                items: vec!["app1".into(), "app2".into()],
                pre: vec![],
                post: vec![script("dns"), manual("confirm")],
            },
            PlanGroup {
                items: vec!["web".into()],
                ..Default::default()
            },
        ],
        source_stopped: false,
        network: None,
        comments: None,
        points: BTreeMap::new(),
        refused: BTreeMap::new(),
        attempt: 0,
    }
}

struct World {
    input: JobInput,
    steps: Vec<StepRow>,
    items: BTreeMap<String, PlanItemSeen>,
    children: BTreeMap<String, ChildJob>,
    tasks: BTreeMap<String, (String, TaskWork, TaskResult)>,
    resumed: BTreeMap<usize, (i64, Option<String>)>,
    suspended: bool,
    job: Option<(String, String)>,
    job_output: Option<Value>,
    step_outputs: BTreeMap<usize, Value>,
    started: Vec<String>,
    now: i64,
}

impl World {
    fn new(input: PlanInput) -> Self {
        let life = Lifecycle {
            state: ProtectionState::Protected,
            active: Location::Primary,
        };
        let items = input
            .groups
            .iter()
            .flat_map(|g| g.items.clone())
            .map(|i| {
                (
                    i.clone(),
                    PlanItemSeen {
                        item: i,
                        life: Some(life),
                        test: TestFailoverState::None,
                        group: None,
                        points: vec![(1000, "p1".into())],
                    },
                )
            })
            .collect();
        let input = JobInput::RecoveryPlan(input);
        let steps = input
            .steps()
            .into_iter()
            .map(|(k, _)| StepRow {
                key: Some(k.as_str().into()),
                state: JobState::NotStarted,
                started_ms: None,
            })
            .collect();
        Self {
            input,
            steps,
            items,
            children: BTreeMap::new(),
            tasks: BTreeMap::new(),
            resumed: BTreeMap::new(),
            suspended: false,
            job: None,
            job_output: None,
            step_outputs: BTreeMap::new(),
            started: vec![],
            now: 10_000,
        }
    }

    fn plan(&self) -> &PlanInput {
        self.input.plan().unwrap()
    }

    fn observe(&self, need: &Need) -> Observed {
        match need {
            Need::PlanItems { items, .. } => Observed::PlanItems(
                items
                    .iter()
                    .map(|i| {
                        self.items.get(i).cloned().unwrap_or(PlanItemSeen {
                            item: i.clone(),
                            life: None,
                            test: TestFailoverState::None,
                            group: None,
                            points: vec![],
                        })
                    })
                    .collect(),
            ),
            Need::PlanChildren { children } => Observed::PlanChildren(
                children
                    .iter()
                    .map(|(item, ids)| ChildSeen {
                        item: item.clone(),
                        jobs: ids
                            .iter()
                            .enumerate()
                            .filter_map(|(a, id)| {
                                self.children.get(id).map(|j| (a as u32, j.clone()))
                            })
                            .collect(),
                    })
                    .collect(),
            ),
            Need::PlanScript { task_id, .. } => {
                let t = self.tasks.get(task_id);
                Observed::PlanScript {
                    task: t.map(|(_, _, r)| r.clone()),
                    agent: Some("agent-r".into()),
                    agent_last_seen_ms: Some(self.now),
                }
            }
            Need::Resumed { idx, .. } => Observed::Resumed {
                resumed: self.resumed.get(idx).cloned(),
            },
            other => panic!("a plan does not look at {other:?}"),
        }
    }

    fn apply(&mut self, idx: usize, e: &Effect) {
        match e {
            Effect::StepOutput(v) => {
                self.step_outputs.insert(idx, v.clone());
            }
            Effect::JobOutput(v) => self.job_output = Some(v.clone()),
            Effect::SetPlanPoints(p) => {
                if let JobInput::RecoveryPlan(plan) = &mut self.input {
                    plan.points = p.clone();
                }
            }
            Effect::StartPlanItem { job_id, .. } => {
                // Started once: the id is the child's.
                if !self.children.contains_key(job_id) {
                    self.started.push(job_id.clone());
                    self.children.insert(
                        job_id.clone(),
                        ChildJob {
                            id: job_id.clone(),
                            state: JobState::InProgress,
                            error: None,
                        },
                    );
                }
            }
            Effect::EnsureTask { id, agent, work } => {
                self.tasks.entry(id.clone()).or_insert((
                    agent.clone(),
                    work.clone(),
                    TaskResult::Pending,
                ));
            }
            Effect::SuspendJob => self.suspended = true,
            Effect::RecordPlanRun { .. } => {}
            other => panic!("a plan does not write {other:?}"),
        }
    }

    /// Rounds until the job waits or ends; `true` when it ended.
    fn run(&mut self) -> bool {
        for _ in 0..50 {
            if self.job.is_some() || self.suspended {
                return true;
            }
            let (idx, key) = match next_step(&self.input, &self.steps) {
                Next::Finished => {
                    self.job = Some(("Succeeded".into(), String::new()));
                    return true;
                }
                Next::Unrunnable { code, .. } => panic!("unrunnable: {code}"),
                Next::Run { idx, key } => (idx, key),
            };
            self.steps[idx].state = JobState::InProgress;
            let started_ms = *self.steps[idx].started_ms.get_or_insert(self.now);
            let ctx = StepCtx {
                job_id: JOB,
                idx,
                started_ms,
                now_ms: self.now,
            };
            let seen = self.observe(&needs(key, &self.input, JOB, idx));
            let d = decide(key, &self.input, &ctx, &seen);
            // The same round again (a crash before it committed) decides
            // the same.
            assert_eq!(decide(key, &self.input, &ctx, &seen), d);
            for e in &d.effects {
                self.apply(idx, e);
            }
            match d.outcome {
                Outcome::Done => self.steps[idx].state = JobState::Succeeded,
                Outcome::Wait => return self.suspended,
                Outcome::Fail { code, message } => {
                    self.steps[idx].state = JobState::Failed;
                    self.job = Some((code.to_string(), message));
                    return true;
                }
            }
        }
        panic!("the plan job loops");
    }

    fn finish_tasks(&mut self, exit: i64) -> Vec<TaskWork> {
        let mut done = vec![];
        for (_, work, r) in self.tasks.values_mut() {
            if *r == TaskResult::Pending {
                *r = TaskResult::Succeeded {
                    output: json!({"exitCode": exit, "stdout": "ok\n", "stderr": "disk full\n"}),
                };
                done.push(work.clone());
            }
        }
        done
    }

    fn end_children(&mut self, fail: &[&str]) {
        for (id, j) in self.children.iter_mut() {
            if !j.state.is_terminal() {
                if fail.iter().any(|f| id.ends_with(&format!("-{f}"))) {
                    j.state = JobState::Failed;
                    j.error = Some("the recovery agent failed".into());
                } else {
                    j.state = JobState::Succeeded;
                }
            }
        }
    }

    fn step_titles(&self) -> Vec<String> {
        self.input.steps().into_iter().map(|(_, t)| t).collect()
    }
}

#[test]
fn a_plan_runs_its_groups_in_order_with_their_actions() {
    let mut w = World::new(sample_plan(PlanOp::TestFailover));
    assert_eq!(
        w.step_titles(),
        vec![
            "Check the recovery plan",
            "Group 1: pre script 'fence'",
            "Group 1: test failover of 1 machine(s)",
            "Group 2: test failover of 2 machine(s)",
            "Group 2: post script 'dns'",
            "Group 2: post manual action 'confirm'",
            "Group 3: test failover of 1 machine(s)",
            "Complete the recovery plan",
        ]
    );
    // The pre-script first, nothing started before it ends.
    assert!(!w.run());
    assert!(w.started.is_empty());
    let works = w.finish_tasks(0);
    let TaskWork::RunScript { path, env, .. } = &works[0] else {
        panic!("{works:?}")
    };
    assert_eq!(path, "fence.sh");
    assert_eq!(env["SITEREC_PLAN"], "shop");
    assert_eq!(env["SITEREC_PLAN_GROUP"], "1");
    assert_eq!(env["SITEREC_FAILOVER_TYPE"], "TestFailover");
    assert_eq!(env["SITEREC_FAILOVER_DIRECTION"], "PrimaryToRecovery");
    assert_eq!(env["SITEREC_PLAN_ITEMS"], "db");
    // Group 1's machine.
    assert!(!w.run());
    assert_eq!(w.started, vec!["plan-job-db"]);
    assert!(!w.run(), "waits for the machine's job");
    w.end_children(&[]);
    // Group 2: both machines at once.
    assert!(!w.run());
    assert_eq!(w.started[1..], ["plan-job-app1", "plan-job-app2"]);
    w.end_children(&[]);
    // The post-script, then the manual action suspends the job.
    assert!(!w.run());
    assert_eq!(w.finish_tasks(0).len(), 1);
    assert!(w.run());
    assert!(w.suspended && w.job.is_none());
    assert_eq!(w.started.len(), 3, "group 3 waits for the operator");
    assert_eq!(w.step_outputs[&5]["instructions"], "check the database");
    w.suspended = false;
    w.resumed.insert(5, (20_000, Some("db looks fine".into())));
    assert!(!w.run());
    assert_eq!(w.step_outputs[&5]["comments"], "db looks fine");
    assert_eq!(w.started.len(), 4);
    w.end_children(&[]);
    assert!(w.run());
    assert_eq!(w.job.as_ref().unwrap().0, "Succeeded");
    let out = w.job_output.as_ref().unwrap();
    let machines = out["machines"].as_array().unwrap();
    assert_eq!(machines.len(), 4);
    assert!(machines.iter().all(|m| m["state"] == "Succeeded"));
    assert_eq!(machines[3]["group"], 3);
}

#[test]
fn an_unplanned_failover_runs_to_the_end_and_reports_each_machine() {
    let mut w = World::new(sample_plan(PlanOp::UnplannedFailover));
    w.run();
    w.finish_tasks(0);
    w.run();
    w.end_children(&[]);
    w.run();
    w.end_children(&["app2"]);
    w.run();
    w.finish_tasks(0);
    w.run();
    w.suspended = false;
    w.resumed.insert(5, (1, None));
    w.run();
    assert_eq!(w.started.len(), 4, "group 3 ran after app2 failed");
    w.end_children(&[]);
    assert!(w.run());
    let (code, message) = w.job.clone().unwrap();
    assert_eq!(code, "SomeMachinesFailed");
    assert!(
        message.contains("app2") && !message.contains("app1"),
        "{message}"
    );
    let machines = w.job_output.as_ref().unwrap()["machines"].clone();
    let app2 = machines
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["item"] == "app2")
        .unwrap();
    assert_eq!(app2["state"], "Failed");
    assert_eq!(app2["error"], "the recovery agent failed");
}

#[test]
fn a_planned_failover_stops_at_a_failed_group_and_a_restart_retries_only_its_failures() {
    let mut w = World::new(sample_plan(PlanOp::PlannedFailover));
    w.run();
    w.finish_tasks(0);
    w.run();
    w.end_children(&[]);
    w.run();
    w.end_children(&["app1"]);
    assert!(w.run());
    let (code, message) = w.job.clone().unwrap();
    assert_eq!(code, "PlanGroupFailed");
    assert!(
        message.contains("group 2") && message.contains("app1"),
        "{message}"
    );
    assert_eq!(w.started.len(), 3, "group 3 did not start");
    // Restart: the failed step again, app1 in a new attempt, app2 not.
    w.job = None;
    if let JobInput::RecoveryPlan(p) = &mut w.input {
        p.attempt = 1;
    }
    for s in &mut w.steps {
        if s.state == JobState::Failed {
            s.state = JobState::NotStarted;
            s.started_ms = None;
        }
    }
    assert!(!w.run());
    assert_eq!(w.started[3..], ["plan-job-r1-app1"]);
    w.end_children(&[]);
    w.run();
    assert_eq!(w.finish_tasks(0).len(), 1);
    assert!(w.run() && w.suspended);
}

#[test]
fn a_failing_script_fails_the_plan_and_keeps_its_output() {
    let mut w = World::new(sample_plan(PlanOp::TestFailover));
    w.run();
    w.finish_tasks(2);
    assert!(w.run());
    let (code, message) = w.job.clone().unwrap();
    assert_eq!(code, "ScriptFailed");
    assert!(
        message.contains("'fence'")
            && message.contains("status 2")
            && message.contains("disk full"),
        "{message}"
    );
    assert_eq!(w.step_outputs[&1]["stdout"], "ok\n");
    assert!(w.started.is_empty());
}

#[test]
fn the_check_names_every_machine_that_cannot_take_the_operation() {
    let mut w = World::new(sample_plan(PlanOp::Commit));
    w.items.remove("web");
    assert!(w.run());
    let (code, message) = w.job.clone().unwrap();
    assert_eq!(code, "PlanItemsNotReady");
    for name in ["'db'", "'app1'", "'app2'", "'web' is not protected"] {
        assert!(message.contains(name), "{name}: {message}");
    }
}

#[test]
fn a_multi_vm_group_fails_over_to_the_latest_point_its_members_share() {
    let mut w = World::new(sample_plan(PlanOp::UnplannedFailover));
    for (item, points) in [
        ("app1", vec![(1, "a-1"), (2, "a-2"), (3, "a-3")]),
        ("app2", vec![(1, "b-1"), (2, "b-2")]),
    ] {
        let i = w.items.get_mut(item).unwrap();
        i.group = Some("apps".into());
        i.points = points
            .into_iter()
            .map(|(t, p)| (t, p.to_string()))
            .collect();
    }
    w.run();
    assert_eq!(
        w.plan().points,
        BTreeMap::from([
            ("app1".to_string(), "a-2".to_string()),
            ("app2".to_string(), "b-2".to_string())
        ])
    );
    // No instant in common: refused, naming the group.
    let mut w = World::new(sample_plan(PlanOp::TestFailover));
    for (item, t) in [("app1", 1), ("app2", 2)] {
        let i = w.items.get_mut(item).unwrap();
        i.group = Some("apps".into());
        i.points = vec![(t, format!("{item}-{t}"))];
    }
    assert!(w.run());
    let (code, message) = w.job.clone().unwrap();
    assert_eq!(code, "NoSharedRecoveryPoint");
    assert!(message.contains("'apps'"), "{message}");
}

#[test]
fn a_refused_machine_is_its_outcome() {
    let mut input = sample_plan(PlanOp::UnplannedFailover);
    input.groups.truncate(1);
    input.groups[0].pre.clear();
    input.refused.insert(
        "db".into(),
        Refusal {
            code: "EncryptionKeyRequired".into(),
            message: "give the key".into(),
            attempt: 0,
        },
    );
    let mut w = World::new(input);
    assert!(w.run());
    assert!(w.started.is_empty(), "a refused machine is not asked again");
    assert_eq!(w.job.as_ref().unwrap().0, "SomeMachinesFailed");
    let m = &w.job_output.as_ref().unwrap()["machines"][0];
    assert_eq!(m["state"], "Failed");
    assert!(
        m["error"]
            .as_str()
            .unwrap()
            .contains("EncryptionKeyRequired")
    );
}

#[test]
fn stored_steps_that_do_not_match_the_layout_are_not_run() {
    let w = World::new(sample_plan(PlanOp::TestFailover));
    let mut steps = w.steps.clone();
    steps.swap(0, 1);
    assert!(matches!(
        next_step(&w.input, &steps),
        Next::Unrunnable {
            code: "StepNotRunnable",
            ..
        }
    ));
    let json = w.input.to_json();
    let back = JobInput::parse(JobKind::RecoveryPlanTestFailover, &json).unwrap();
    assert_eq!(back, w.input);
    assert!(JobInput::parse(JobKind::RecoveryPlanCommit, &json).is_err());
}
