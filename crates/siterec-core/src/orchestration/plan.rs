//! The steps of a recovery plan's job ([`crate::plan`]): a check, then per
//! group its pre-actions, its items' operations (one child job per item,
//! started by the vault, all of a group at once), its post-actions, then
//! the completion with each machine's outcome.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{AGENT_WAIT_MS, Decision, Effect, JobInput, Need, Observed, StepCtx, TaskResult};
use crate::plan::{ActionKind, PlanAction, PlanGroup, PlanOp, PlanStep, item_refusal, layout};
use crate::state::{JobState, Lifecycle, Location, TestFailoverState};
use crate::wire::TaskWork;

/// The input of a plan's job: the plan as it was when the job started (an
/// edit of the plan does not change a running job), the operation and its
/// options, and what the job recorded on its way.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlanInput {
    pub plan: String,
    pub op: PlanOp,
    /// Where failovers go (the destination site; for commit, cleanup and
    /// reprotect the site the machines run at or go to: where the
    /// plan's scripts would run).
    pub to: Location,
    pub primary_fabric: String,
    pub recovery_fabric: String,
    pub groups: Vec<PlanGroup>,
    /// A planned failover of physical servers: the operator says they
    /// are stopped.
    #[serde(default, skip_serializing_if = "super::is_false")]
    pub source_stopped: bool,
    /// A test failover's network (at the recovery site); none: isolated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comments: Option<String>,
    /// Item → the point its failover uses, chosen by the check: the
    /// latest point a multi-VM group's members share. Items not listed
    /// fail over to their latest point.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub points: BTreeMap<String, String>,
    /// Item (lower case) → why its operation could not be started.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub refused: BTreeMap<String, Refusal>,
    /// How many times the job was restarted: a restarted job starts again
    /// the operations of the machines whose last one failed.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub attempt: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Refusal {
    pub code: String,
    pub message: String,
    #[serde(default)]
    pub attempt: u32,
}

impl PlanInput {
    pub fn layout(&self) -> Vec<PlanStep> {
        layout(&self.groups, self.op, self.to)
    }

    /// The step at `idx` of this job, and its title.
    pub fn step(&self, idx: usize) -> Option<PlanStep> {
        self.layout().get(idx).copied()
    }

    pub fn action(&self, group: usize, post: bool, index: usize) -> Option<&PlanAction> {
        let g = self.groups.get(group)?;
        if post {
            g.post.get(index)
        } else {
            g.pre.get(index)
        }
    }

    /// The fabric of the site `to` (where scripts run).
    pub fn destination_fabric(&self) -> &str {
        match self.to {
            Location::Recovery => &self.recovery_fabric,
            Location::Primary => &self.primary_fabric,
        }
    }

    pub fn title(&self, step: PlanStep) -> String {
        match step {
            PlanStep::Check => "Check the recovery plan".into(),
            PlanStep::Items { group } => format!(
                "Group {}: {} of {} machine(s)",
                group + 1,
                self.op.display_name(),
                self.groups.get(group).map(|g| g.items.len()).unwrap_or(0)
            ),
            PlanStep::Action { group, post, index } => {
                let (kind, name) = match self.action(group, post, index) {
                    Some(a) => (
                        if a.kind.is_manual() {
                            "manual action"
                        } else {
                            "script"
                        },
                        a.name.as_str(),
                    ),
                    None => ("action", "?"),
                };
                format!(
                    "Group {}: {} {kind} '{name}'",
                    group + 1,
                    if post { "post" } else { "pre" }
                )
            }
            PlanStep::Complete => "Complete the recovery plan".into(),
        }
    }

    /// Where a restart goes on from when these machines failed in a job
    /// that ran to its end: the step of the first group holding one (the
    /// groups after it run again; their machines that succeeded are not
    /// started again, scripts that ran answer with their recorded result,
    /// manual actions that were confirmed stay confirmed).
    pub fn restart_from(&self, failed: &[String]) -> Option<usize> {
        let group = self.groups.iter().position(|g| {
            g.items
                .iter()
                .any(|i| failed.iter().any(|f| f.eq_ignore_ascii_case(i)))
        })?;
        self.layout()
            .iter()
            .position(|s| *s == PlanStep::Items { group })
    }

    /// The job id of `item`'s operation in attempt `attempt` of plan job
    /// `job_id`.
    pub fn child_id(job_id: &str, item: &str, attempt: u32) -> String {
        let item = item.to_lowercase();
        if attempt == 0 {
            format!("{job_id}-{item}")
        } else {
            format!("{job_id}-r{attempt}-{item}")
        }
    }

    fn group_items(&self, group: Option<usize>) -> Vec<(usize, String)> {
        self.groups
            .iter()
            .enumerate()
            .filter(|(g, _)| group.is_none_or(|want| want == *g))
            .flat_map(|(g, grp)| grp.items.iter().map(move |i| (g, i.clone())))
            .collect()
    }
}

/// The task id of a script action at step `idx` of job `job_id`.
pub fn script_task_id(job_id: &str, idx: usize) -> String {
    format!("{job_id}-script-{idx}")
}

/// What the check looks at of each item.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanItemSeen {
    pub item: String,
    /// `None`: no such protected item.
    pub life: Option<Lifecycle>,
    pub test: TestFailoverState,
    pub group: Option<String>,
    /// Its listed points at the site a failover reads them from: (time,
    /// point id).
    pub points: Vec<(i64, String)>,
}

/// One machine's operation as the plan sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildSeen {
    pub item: String,
    /// Its jobs, by attempt (the latest that exists counts).
    pub jobs: Vec<(u32, ChildJob)>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChildJob {
    pub id: String,
    pub state: JobState,
    pub error: Option<String>,
}

pub(super) fn needs(input: &PlanInput, idx: usize, job_id: &str) -> Need {
    match input.step(idx) {
        Some(PlanStep::Check) => Need::PlanItems {
            items: input
                .group_items(None)
                .into_iter()
                .map(|(_, i)| i)
                .collect(),
            site: input.to,
        },
        Some(PlanStep::Items { group }) => Need::PlanChildren {
            children: children_of(input, job_id, Some(group)),
        },
        Some(PlanStep::Complete) => Need::PlanChildren {
            children: children_of(input, job_id, None),
        },
        Some(PlanStep::Action { group, post, index }) => {
            match input.action(group, post, index).map(|a| &a.kind) {
                Some(ActionKind::Script { .. }) => Need::PlanScript {
                    task_id: script_task_id(job_id, idx),
                    fabric: input.destination_fabric().to_string(),
                },
                _ => Need::Resumed {
                    job_id: job_id.to_string(),
                    idx,
                },
            }
        }
        None => Need::Nothing,
    }
}

fn children_of(
    input: &PlanInput,
    job_id: &str,
    group: Option<usize>,
) -> Vec<(String, Vec<String>)> {
    input
        .group_items(group)
        .into_iter()
        .map(|(_, item)| {
            let ids = (0..=input.attempt)
                .map(|a| PlanInput::child_id(job_id, &item, a))
                .collect();
            (item, ids)
        })
        .collect()
}

pub(super) fn decide(input: &PlanInput, ctx: &StepCtx<'_>, seen: &Observed) -> Decision {
    match (input.step(ctx.idx), seen) {
        (Some(PlanStep::Check), Observed::PlanItems(items)) => check(input, items),
        (Some(PlanStep::Items { group }), Observed::PlanChildren(children)) => {
            run_group(input, ctx, group, children)
        }
        (Some(PlanStep::Complete), Observed::PlanChildren(children)) => complete(input, children),
        (
            Some(PlanStep::Action { group, post, index }),
            Observed::PlanScript {
                task,
                agent,
                agent_last_seen_ms,
            },
        ) => match input.action(group, post, index) {
            Some(a) => script(input, ctx, group, post, a, task, agent, *agent_last_seen_ms),
            None => Decision::fail("StepNotRunnable", "the plan's action is gone"),
        },
        (Some(PlanStep::Action { group, post, index }), Observed::Resumed { resumed }) => {
            match input.action(group, post, index) {
                Some(a) => manual(a, resumed),
                None => Decision::fail("StepNotRunnable", "the plan's action is gone"),
            }
        }
        (step, _) => Decision::fail(
            "StepNotRunnable",
            format!(
                "step {} ({step:?}) of recovery plan '{}' does not apply",
                ctx.idx + 1,
                input.plan
            ),
        ),
    }
}

/// Every item must exist and take the operation now; a multi-VM group's
/// members in the plan fail over to the latest point they all have.
fn check(input: &PlanInput, items: &[PlanItemSeen]) -> Decision {
    let mut problems = Vec::new();
    for i in items {
        match i.life {
            None => problems.push(format!("item '{}' is not protected any more", i.item)),
            Some(life) => {
                if let Some(why) = item_refusal(input.op, input.to, life, i.test) {
                    problems.push(format!("item '{}': {why}", i.item));
                }
            }
        }
    }
    if !problems.is_empty() {
        return Decision::fail(
            "PlanItemsNotReady",
            format!(
                "recovery plan '{}' cannot run {}: {}",
                input.plan,
                input.op.display_name(),
                problems.join("; ")
            ),
        );
    }
    let mut points = BTreeMap::new();
    if matches!(input.op, PlanOp::TestFailover | PlanOp::UnplannedFailover) {
        let mut groups: BTreeMap<String, Vec<&PlanItemSeen>> = BTreeMap::new();
        for i in items {
            if let Some(g) = &i.group {
                groups.entry(g.to_lowercase()).or_default().push(i);
            }
        }
        for (g, members) in groups {
            let times: Vec<Vec<i64>> = members
                .iter()
                .map(|m| m.points.iter().map(|(t, _)| *t).collect())
                .collect();
            let Some(at) = crate::plan::shared_point_time(&times) else {
                let names: Vec<&str> = members.iter().map(|m| m.item.as_str()).collect();
                return Decision::fail(
                    "NoSharedRecoveryPoint",
                    format!(
                        "the members of multi-VM group '{g}' in this plan ({}) have no recovery point taken at one instant; wait for the group's next point",
                        names.join(", ")
                    ),
                );
            };
            for m in members {
                if let Some((_, id)) = m.points.iter().find(|(t, _)| *t == at) {
                    points.insert(m.item.clone(), id.clone());
                }
            }
        }
    }
    let mut effects = vec![Effect::StepOutput(json!({
        "machines": items.len(),
        "sharedPoints": &points,
    }))];
    if !points.is_empty() && points != input.points {
        effects.push(Effect::SetPlanPoints(points));
    }
    Decision::done(effects)
}

/// How one machine's operation ended, as the job reports it.
fn outcome(input: &PlanInput, group: usize, child: &ChildSeen) -> (Option<JobState>, Value) {
    let refusal = input
        .refused
        .get(&child.item.to_lowercase())
        .filter(|r| r.attempt == input.attempt);
    let latest = child.jobs.iter().max_by_key(|(a, _)| *a);
    let mut v = json!({"item": child.item, "group": group + 1});
    if let Some((_, job)) = latest {
        v["job"] = json!(job.id);
        v["state"] = json!(job.state.as_str());
        if let Some(e) = &job.error {
            v["error"] = json!(e);
        }
        // A machine whose last attempt failed is started again when the
        // job was restarted since.
        let retry = job.state == JobState::Failed
            && latest.is_some_and(|(a, _)| *a < input.attempt)
            && refusal.is_none();
        if !retry {
            return (Some(job.state), v);
        }
    }
    if let Some(r) = refusal {
        v["state"] = json!("Failed");
        v["error"] = json!(format!("{} ({})", r.message, r.code));
        return (Some(JobState::Failed), v);
    }
    (None, v)
}

fn run_group(
    input: &PlanInput,
    ctx: &StepCtx<'_>,
    group: usize,
    children: &[ChildSeen],
) -> Decision {
    let mut effects = Vec::new();
    let mut machines = Vec::new();
    let mut pending = false;
    let mut failed = Vec::new();
    for c in children {
        let (state, v) = outcome(input, group, c);
        match state {
            None => {
                effects.push(Effect::StartPlanItem {
                    item: c.item.clone(),
                    job_id: PlanInput::child_id(ctx.job_id, &c.item, input.attempt),
                });
                pending = true;
            }
            Some(s) if !s.is_terminal() => pending = true,
            Some(JobState::Succeeded) => {}
            Some(_) => failed.push(format!(
                "{}: {}",
                c.item,
                v["error"].as_str().unwrap_or("failed")
            )),
        }
        machines.push(v);
    }
    effects.push(Effect::StepOutput(json!({ "machines": machines })));
    if pending {
        return Decision::wait().with(effects);
    }
    if !failed.is_empty() && !input.op.runs_to_the_end() {
        return Decision::fail(
            "PlanGroupFailed",
            format!(
                "group {} of recovery plan '{}': {} failed for {}; the later groups did not run: fix the machine and restart the job ('siterec jobs restart JOB')",
                group + 1,
                input.plan,
                input.op.display_name(),
                failed.join("; ")
            ),
        )
        .with(effects);
    }
    Decision::done(effects)
}

fn complete(input: &PlanInput, children: &[ChildSeen]) -> Decision {
    let mut machines = Vec::new();
    let mut failed = Vec::new();
    for c in children {
        let group = input
            .groups
            .iter()
            .position(|g| g.items.iter().any(|i| i.eq_ignore_ascii_case(&c.item)))
            .unwrap_or(0);
        let (state, v) = outcome(input, group, c);
        if state != Some(JobState::Succeeded) {
            failed.push(c.item.clone());
        }
        machines.push(v);
    }
    let effects = vec![
        Effect::JobOutput(json!({
            "plan": input.plan,
            "operation": input.op.as_str(),
            "machines": machines,
        })),
        Effect::RecordPlanRun {
            plan: input.plan.clone(),
            op: input.op,
        },
    ];
    if failed.is_empty() {
        Decision::done(effects)
    } else {
        Decision::fail(
            "SomeMachinesFailed",
            format!(
                "recovery plan '{}' ran to its end, but {} failed for {}: see each machine's job in the job's output",
                input.plan,
                input.op.display_name(),
                failed.join(", ")
            ),
        )
        .with(effects)
    }
}

/// The environment a plan's script runs with.
pub fn script_env(
    input: &PlanInput,
    job_id: &str,
    group: usize,
    post: bool,
    action: &str,
) -> BTreeMap<String, String> {
    let items = input
        .groups
        .get(group)
        .map(|g| g.items.join(","))
        .unwrap_or_default();
    BTreeMap::from([
        ("SITEREC_PLAN".into(), input.plan.clone()),
        ("SITEREC_PLAN_JOB".into(), job_id.to_string()),
        ("SITEREC_PLAN_GROUP".into(), (group + 1).to_string()),
        (
            "SITEREC_PLAN_PHASE".into(),
            if post { "post" } else { "pre" }.to_string(),
        ),
        ("SITEREC_PLAN_ACTION".into(), action.to_string()),
        (
            "SITEREC_FAILOVER_TYPE".into(),
            input.op.as_str().to_string(),
        ),
        (
            "SITEREC_FAILOVER_DIRECTION".into(),
            input.to.other().failover_direction().to_string(),
        ),
        ("SITEREC_PLAN_ITEMS".into(), items),
    ])
}

#[allow(clippy::too_many_arguments)]
fn script(
    input: &PlanInput,
    ctx: &StepCtx<'_>,
    group: usize,
    post: bool,
    action: &PlanAction,
    task: &Option<TaskResult>,
    agent: &Option<String>,
    agent_last_seen_ms: Option<i64>,
) -> Decision {
    let ActionKind::Script { path, timeout_secs } = &action.kind else {
        return Decision::fail("StepNotRunnable", "not a script action");
    };
    let mut effects = Vec::new();
    let task = match task {
        Some(t) => t.clone(),
        None => {
            let Some(agent) = agent else {
                return Decision::fail(
                    "NoAgent",
                    format!(
                        "no agent of fabric '{}' is connected to run script '{}' of group {}: start one and restart the job",
                        input.destination_fabric(),
                        action.name,
                        group + 1
                    ),
                );
            };
            effects.push(Effect::EnsureTask {
                id: script_task_id(ctx.job_id, ctx.idx),
                agent: agent.clone(),
                work: TaskWork::RunScript {
                    path: path.clone(),
                    timeout_secs: *timeout_secs,
                    env: script_env(input, ctx.job_id, group, post, &action.name),
                },
            });
            TaskResult::Pending
        }
    };
    let who = agent.as_deref().unwrap_or("?");
    match task {
        TaskResult::Succeeded { output } => {
            effects.push(Effect::StepOutput(output.clone()));
            let code = output["exitCode"].as_i64();
            if code == Some(0) {
                return Decision::done(effects);
            }
            let how = if output["timedOut"] == Value::Bool(true) {
                format!("did not finish within {timeout_secs} s and was stopped")
            } else {
                match code {
                    Some(c) => format!("exited with status {c}"),
                    None => "was killed by a signal".into(),
                }
            };
            let tail = output["stderr"]
                .as_str()
                .map(|s| s.trim())
                .filter(|s| !s.is_empty())
                .map(|s| {
                    let cut = s.char_indices().rev().nth(300).map(|(i, _)| i).unwrap_or(0);
                    format!(": {}", &s[cut..])
                })
                .unwrap_or_default();
            Decision::fail(
                "ScriptFailed",
                format!(
                    "script '{}' ({path}) of group {} {how} on agent {who}{tail}",
                    action.name,
                    group + 1
                ),
            )
            .with(effects)
        }
        TaskResult::Failed { error } => Decision::fail(
            "ScriptFailed",
            format!(
                "script '{}' ({path}) of group {} could not run on agent {who}: {error}",
                action.name,
                group + 1
            ),
        )
        .with(effects),
        TaskResult::Pending => {
            let silent = ctx.now_ms - agent_last_seen_ms.unwrap_or(0).max(ctx.started_ms);
            let overdue =
                ctx.now_ms - ctx.started_ms > i64::from(*timeout_secs) * 1000 + AGENT_WAIT_MS;
            if silent > AGENT_WAIT_MS || overdue {
                Decision::fail(
                    "RecoveryAgentNotConnected",
                    format!(
                        "agent {who} has not answered for script '{}' of group {}: start it and restart the job",
                        action.name,
                        group + 1
                    ),
                )
                .with(effects)
            } else {
                Decision::wait().with(effects)
            }
        }
    }
}

fn manual(action: &PlanAction, resumed: &Option<(i64, Option<String>)>) -> Decision {
    let ActionKind::Manual { instructions } = &action.kind else {
        return Decision::fail("StepNotRunnable", "not a manual action");
    };
    match resumed {
        Some((at, comments)) => Decision::done(vec![Effect::StepOutput(json!({
            "instructions": instructions,
            "resumedMs": at,
            "comments": comments,
        }))]),
        None => Decision::wait().with([
            Effect::StepOutput(json!({
                "instructions": instructions,
                "waiting": "resume the job when done: siterec plan resume JOB",
            })),
            Effect::SuspendJob,
        ]),
    }
}

impl JobInput {
    /// A plan job's input.
    pub fn plan(&self) -> Option<&PlanInput> {
        match self {
            JobInput::RecoveryPlan(p) => Some(p),
            _ => None,
        }
    }
}
