//! The decisions of every job kind, run against an in-memory world (a
//! stand-in for the database and the agents, inside this module's tests
//! only): each job's happy path, each of its failures with the
//! compensation it leaves, and a crash after each step, both before the
//! step's round commits and after its effects are written but before the
//! step is marked done (a step must be safe to run twice).

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};

use super::*;
use crate::state::Location;
use crate::wire::{NicInfo, VmInfo};

const JOB: &str = "job-1";
const ITEM: &str = "i1";
const AGENT: &str = "agent-tgt";
const SOURCE: &str = "agent-src";
/// The point the source agent reports as a planned failover's final one.
const FINAL: &str = "pf1";

/// How the simulated recovery agent answers the tasks it is given.
#[derive(Debug, Clone, PartialEq)]
enum AgentPlays {
    /// Runs every task and succeeds, with a well-formed output.
    Succeeds,
    /// Answers every task with a failure.
    Fails,
    /// Succeeds but answers a VM start with junk.
    AnswersJunk,
    /// Never answers and is not heard from.
    Silent,
    /// Reports damage from a store verification.
    FindsDamage,
}

#[derive(Debug, Clone, PartialEq)]
struct ItemRow {
    state: ProtectionState,
    active: Location,
    test: TestFailoverState,
    agent: Option<String>,
    last_error: Option<String>,
    test_error: Option<String>,
    failover_output: Option<Value>,
    test_output: Option<Value>,
    failover_point: Option<String>,
    tested: bool,
}

#[derive(Debug, Clone, PartialEq)]
struct World {
    now: i64,
    input: JobInput,
    job_state: JobState,
    job_error: Option<(String, String)>,
    job_output: Option<Value>,
    steps: Vec<StepRow>,
    step_outputs: BTreeMap<usize, Value>,
    policies: BTreeMap<String, Policy>,
    pairing: Option<&'static str>,
    mapping: Option<&'static str>,
    networks: BTreeSet<String>,
    item: Option<ItemRow>,
    machine: Option<MachineInfo>,
    candidate: Option<String>,
    points: BTreeMap<String, bool>,
    tasks: BTreeMap<String, (String, TaskWork, TaskResult)>,
    plays: AgentPlays,
    agent_seen: i64,
    /// The agent that reports the item's machine (`None`: none does).
    source: Option<String>,
    /// The final point the source reported for the job, if it did.
    final_point: Option<String>,
    /// The item's replication epoch, and the points reported in it.
    epoch: Option<String>,
    epoch_points: u64,
    /// The seed points in the target's store.
    seeds: BTreeSet<String>,
}

fn vm_machine() -> MachineInfo {
    MachineInfo {
        name: "m1".into(),
        kind: crate::wire::KIND_VM.into(),
        disks: vec![],
        nics: vec![NicInfo {
            name: "eth0".into(),
            network: "prod".into(),
            mac: None,
        }],
        vm: Some(VmInfo {
            memory_mib: 256,
            cpus: 1,
            kernel: None,
            initrd: None,
            append: None,
        }),
        error: None,
    }
}

fn policy() -> Policy {
    Policy::from_arm_input(
        &json!({"instanceType": "HyperVReplicaAzure", "replicationInterval": 30}),
    )
    .unwrap()
}

fn item(state: ProtectionState, test: TestFailoverState) -> ItemRow {
    ItemRow {
        state,
        active: Location::Primary,
        test,
        agent: Some(AGENT.into()),
        last_error: None,
        test_error: None,
        failover_output: None,
        test_output: None,
        failover_point: None,
        tested: false,
    }
}

impl ItemRow {
    fn life(&self) -> Lifecycle {
        Lifecycle {
            state: self.state,
            active: self.active,
        }
    }
}

impl World {
    fn new(input: JobInput) -> Self {
        let steps = input
            .step_keys()
            .iter()
            .map(|k| StepRow {
                key: Some(k.as_str().into()),
                state: JobState::NotStarted,
                started_ms: None,
            })
            .collect();
        let mut policies = BTreeMap::new();
        policies.insert("pol".to_string(), policy());
        World {
            now: 1_000_000,
            input,
            job_state: JobState::NotStarted,
            job_error: None,
            job_output: None,
            steps,
            step_outputs: BTreeMap::new(),
            policies,
            pairing: Some("Pairing"),
            mapping: Some("Pairing"),
            networks: ["rnet".to_string()].into(),
            item: None,
            machine: Some(vm_machine()),
            candidate: Some(AGENT.into()),
            points: [("p1".to_string(), true)].into(),
            tasks: BTreeMap::new(),
            plays: AgentPlays::Succeeds,
            agent_seen: 1_000_000,
            source: Some(SOURCE.into()),
            final_point: None,
            epoch: None,
            epoch_points: 0,
            seeds: BTreeSet::new(),
        }
    }

    fn with_item(mut self, state: ProtectionState, test: TestFailoverState) -> Self {
        self.item = Some(item(state, test));
        self
    }

    fn item(&self) -> &ItemRow {
        self.item.as_ref().expect("the scenario has an item")
    }

    fn task_seen(&self, task_id: &str) -> TaskSeen {
        TaskSeen {
            agent: self.item.as_ref().and_then(|i| i.agent.clone()),
            task: self.tasks.get(task_id).map(|(_, _, r)| r.clone()),
            agent_last_seen_ms: Some(self.agent_seen),
        }
    }

    /// What the driver would load for `need`.
    fn observe(&self, need: &Need) -> Observed {
        match need {
            Need::Nothing => Observed::Nothing,
            Need::Policy { name } => Observed::Policy {
                exists: self.policies.contains_key(name),
            },
            Need::Machine { .. } => Observed::Machine(match (&self.item, &self.machine) {
                (None, _) => MachineSeen::ItemGone,
                (Some(_), None) => MachineSeen::MachineGone {
                    fabric: "primary".into(),
                    machine: "m1".into(),
                },
                (Some(_), Some(m)) => MachineSeen::Reported {
                    machine: m.name.clone(),
                    error: m.error.clone(),
                },
            }),
            Need::Target { .. } => Observed::Target {
                current: self.item().agent.clone(),
                candidate: self.candidate.clone(),
                recovery_fabric: "recovery".into(),
                recovery_cloud: "rc".into(),
            },
            Need::Points { epoch: None, .. } => Observed::Points {
                listed: self.points.values().filter(|l| **l).count() as u64,
            },
            Need::Points { epoch: Some(e), .. } => Observed::Points {
                listed: if self.epoch.as_ref() == Some(e) {
                    self.epoch_points
                } else {
                    0
                },
            },
            Need::Item { point, .. } => Observed::Item {
                state: self.item.as_ref().map(|i| i.state),
                test: self.item.as_ref().map(|i| i.test),
                point_listed: point
                    .as_ref()
                    .is_some_and(|p| self.points.get(p) == Some(&true)),
            },
            Need::Task { task_id, .. } => Observed::Task(self.task_seen(task_id)),
            Need::Replica { task_id, .. } => Observed::Replica {
                task: self.task_seen(task_id),
                placement: Box::new(Placement {
                    fabric: "primary".into(),
                    machine: "m1".into(),
                    info: self.machine.clone(),
                    mappings: [("prod".to_string(), "rnet".to_string())].into(),
                    available: vec!["rnet".into()],
                }),
            },
            Need::Stores { tasks } => Observed::Stores(
                tasks
                    .iter()
                    .map(|(agent, id)| StoreTask {
                        agent: agent.clone(),
                        task: self.tasks.get(id).map(|(_, _, r)| r.clone()),
                        agent_last_seen_ms: Some(self.agent_seen),
                    })
                    .collect(),
            ),
            Need::Network { name, .. } => Observed::Network {
                exists: self.networks.contains(name),
            },
            Need::FinalPoint { .. } => Observed::FinalPoint {
                point: self.final_point.clone(),
                source_agent: self.source.clone(),
                source_last_seen_ms: Some(self.agent_seen),
            },
            // Recovery plans have tests of their own (plan_tests).
            Need::PlanItems { .. }
            | Need::PlanChildren { .. }
            | Need::PlanScript { .. }
            | Need::Resumed { .. } => Observed::Nothing,
        }
    }

    /// Writes one effect as the driver would; `Err` where the driver's
    /// round would fail (and be retried).
    fn apply(&mut self, idx: usize, effect: &Effect) -> Result<(), String> {
        match effect {
            Effect::SavePolicy { name, policy } => {
                self.policies.insert(name.clone(), policy.clone());
            }
            Effect::PairClouds(_) => self.pairing = Some("Paired"),
            Effect::DropPendingPairing(_) => {
                if self.pairing == Some("Pairing") {
                    self.pairing = None
                }
            }
            Effect::MapNetworks(_) => self.mapping = Some("Paired"),
            Effect::DropPendingNetworkMapping(_) => {
                if self.mapping == Some("Pairing") {
                    self.mapping = None
                }
            }
            Effect::RemoveNetworkMapping(_) => self.mapping = None,
            Effect::RemovePairing(_) => self.pairing = None,
            Effect::KeepPairing(_) => {
                if self.pairing == Some("Unpairing") {
                    self.pairing = Some("Paired")
                }
            }
            Effect::KeepNetworkMapping(_) => {
                if self.mapping == Some("Unpairing") {
                    self.mapping = Some("Paired")
                }
            }
            Effect::Transition { action, .. } => {
                let i = self.item.as_mut().ok_or("no item")?;
                let life = transition(i.life(), *action).map_err(|e| e.to_string())?;
                (i.state, i.active) = (life.state, life.active);
            }
            Effect::Compensate {
                action, message, ..
            } => {
                if let Some(i) = self.item.as_mut() {
                    if let Ok(life) = transition(i.life(), *action) {
                        (i.state, i.active) = (life.state, life.active);
                    }
                    i.last_error = Some(message.clone());
                }
            }
            Effect::TestTransition { action, .. } => {
                let i = self.item.as_mut().ok_or("no item")?;
                i.test = test_transition(i.test, *action, i.state).map_err(|e| e.to_string())?;
            }
            Effect::CompensateTest {
                action, message, ..
            } => {
                if let Some(i) = self.item.as_mut() {
                    if let Ok(next) = test_transition(i.test, *action, i.state) {
                        i.test = next;
                    }
                    i.test_error = Some(message.clone());
                }
            }
            Effect::SetRecoveryAgent { agent, .. } => {
                self.item.as_mut().ok_or("no item")?.agent = Some(agent.clone());
            }
            Effect::EnsureTask { id, agent, work } => {
                self.tasks.entry(id.clone()).or_insert((
                    agent.clone(),
                    work.clone(),
                    TaskResult::Pending,
                ));
            }
            Effect::ForgetSealedKey => {
                self.input.forget_sealed_key();
                for (_, work, _) in self.tasks.values_mut() {
                    match work {
                        TaskWork::Materialize { sealed_key, .. }
                        | TaskWork::WriteBack { sealed_key, .. }
                        | TaskWork::StartReplica { sealed_key, .. } => *sealed_key = None,
                        _ => {}
                    }
                }
            }
            Effect::SetFailoverOutput { output, .. } => {
                self.item.as_mut().ok_or("no item")?.failover_output = Some(output.clone());
            }
            Effect::SetTestFailoverOutput { output, .. } => {
                self.item.as_mut().ok_or("no item")?.test_output = Some(output.clone());
            }
            Effect::RecordFailover { point_id, .. } => {
                self.item.as_mut().ok_or("no item")?.failover_point = Some(point_id.clone());
            }
            Effect::RecordTestFailover { .. } => {
                let i = self.item.as_mut().ok_or("no item")?;
                i.tested = true;
                i.test_error = None;
            }
            Effect::ClearTestFailover { .. } => {
                let i = self.item.as_mut().ok_or("no item")?;
                i.test_output = None;
                i.test_error = None;
            }
            Effect::SetEpoch { epoch, .. } => {
                self.item.as_ref().ok_or("no item")?;
                self.epoch = epoch.clone();
            }
            Effect::SetFinalPoint { point_id } => {
                self.input.set_final_point(point_id);
            }
            Effect::DeleteItem { .. } => {
                self.item = None;
                self.points.clear();
            }
            Effect::StepOutput(v) => {
                self.step_outputs.insert(idx, v.clone());
            }
            Effect::JobOutput(v) => self.job_output = Some(v.clone()),
            Effect::SetPlanPoints(_)
            | Effect::StartPlanItem { .. }
            | Effect::PlanRefused { .. }
            | Effect::SuspendJob
            | Effect::RecordPlanRun { .. } => {}
        }
        Ok(())
    }

    /// The recovery agent takes its pending tasks and answers them; the
    /// source agent takes a final point when its assignment asks for one.
    fn agent_runs(&mut self) {
        if self.plays == AgentPlays::Silent {
            return;
        }
        self.agent_seen = self.now;
        let final_asked = self
            .item
            .as_ref()
            .is_some_and(|i| i.state == ProtectionState::PlannedFailoverInProgress);
        if final_asked && self.source.is_some() && self.final_point.is_none() {
            self.final_point = Some(FINAL.into());
            self.points.insert(FINAL.into(), true);
        }
        // The new source replicates once the epoch is set.
        if self.epoch.is_some()
            && self
                .item
                .as_ref()
                .is_some_and(|i| i.state == ProtectionState::ReprotectInProgress)
        {
            self.epoch_points += 1;
        }
        for (_, work, result) in self.tasks.values_mut() {
            if *result != TaskResult::Pending {
                continue;
            }
            if self.plays == AgentPlays::Succeeds {
                match &*work {
                    TaskWork::SeedReplica { seed_id, .. } => {
                        self.seeds.insert(seed_id.clone());
                    }
                    TaskWork::Prune { point_ids, .. } => {
                        for p in point_ids {
                            self.seeds.remove(p);
                        }
                    }
                    _ => {}
                }
            }
            *result = match (&self.plays, &*work) {
                (AgentPlays::Fails, _) => TaskResult::Failed {
                    error: "disk full".into(),
                },
                (AgentPlays::AnswersJunk, TaskWork::StartReplica { .. }) => TaskResult::Succeeded {
                    output: json!({"what": "junk"}),
                },
                (AgentPlays::FindsDamage, TaskWork::Verify) => TaskResult::Succeeded {
                    output: json!({"points": [{"item": ITEM, "point_id": "p1", "ok": false, "damaged_chunks": ["c1"]}]}),
                },
                (_, TaskWork::StartReplica { vm_name, nics, .. }) => TaskResult::Succeeded {
                    output: serde_json::to_value(ReplicaStarted {
                        vm_name: vm_name.clone(),
                        run_dir: "/run/vm".into(),
                        serial_log: "/run/vm/serial".into(),
                        disks: vec![],
                        nics: nics.clone(),
                    })
                    .unwrap(),
                },
                (_, TaskWork::Verify) => TaskResult::Succeeded {
                    output: json!({"points": [{"item": ITEM, "point_id": "p1", "ok": true}]}),
                },
                _ => TaskResult::Succeeded {
                    output: json!({"disks": []}),
                },
            };
        }
    }
}

/// What may go wrong in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    /// The round runs and commits.
    None,
    /// The process dies before the round commits: nothing of it is kept.
    BeforeCommit,
    /// The step's effects are kept but the step is not marked done, so
    /// the next process runs the step again.
    AfterEffects,
}

/// One round of the driver over the world. `false` once the job is over.
fn round(w: &mut World, crash: Crash) -> bool {
    if w.job_state.is_terminal() {
        return false;
    }
    let before = w.clone();
    w.job_state = JobState::InProgress;
    let (idx, key) = match next_step(&w.input, &w.steps) {
        Next::Finished => {
            for e in on_success(&w.input) {
                w.apply(0, &e).unwrap();
            }
            w.job_state = JobState::Succeeded;
            return false;
        }
        Next::Unrunnable { idx, code, message } => {
            w.steps[idx].state = JobState::Failed;
            w.job_state = JobState::Failed;
            w.job_error = Some((code.into(), message));
            return false;
        }
        Next::Run { idx, key } => (idx, key),
    };
    let step = &mut w.steps[idx];
    step.state = JobState::InProgress;
    let started_ms = *step.started_ms.get_or_insert(w.now);
    let ctx = StepCtx {
        job_id: JOB,
        idx,
        started_ms,
        now_ms: w.now,
    };
    let seen = w.observe(&needs(key, &w.input, JOB, idx));
    let decision = decide(key, &w.input, &ctx, &seen);
    for e in &decision.effects {
        if let Err(e) = w.apply(idx, e) {
            panic!("step {key:?} wrote an effect that does not apply: {e}");
        }
    }
    match crash {
        Crash::BeforeCommit => {
            *w = before;
            return true;
        }
        Crash::AfterEffects => return true,
        Crash::None => {}
    }
    match decision.outcome {
        Outcome::Done => w.steps[idx].state = JobState::Succeeded,
        Outcome::Wait => {}
        Outcome::Fail { code, message } => {
            w.steps[idx].state = JobState::Failed;
            for s in &mut w.steps[idx + 1..] {
                s.state = JobState::Cancelled;
            }
            w.job_state = JobState::Failed;
            for e in on_failure(&w.input, &message) {
                w.apply(idx, &e).unwrap();
            }
            w.job_error = Some((code.into(), message));
        }
    }
    true
}

/// Runs the job to its end: the agent answers between rounds and the clock
/// moves on a minute per round. `crash_at`: the round (counted from 0) in
/// which the process dies, and how.
fn run(mut w: World, crash_at: Option<(usize, Crash)>) -> World {
    for n in 0..200 {
        let crash = match crash_at {
            Some((at, how)) if at == n => how,
            _ => Crash::None,
        };
        if !round(&mut w, crash) {
            return w;
        }
        w.now += 60_000;
        w.agent_runs();
    }
    panic!("job did not end in 200 rounds: {w:#?}");
}

/// Rounds the job takes without crashes.
fn rounds(w: &World) -> usize {
    let mut w = w.clone();
    let mut n = 0;
    while round(&mut w, Crash::None) {
        n += 1;
        w.now += 60_000;
        w.agent_runs();
    }
    n
}

/// The scenario ends the same way (job, steps, item, tasks, mappings)
/// whichever round a crash hits, of either kind.
fn survives_crashes(w: &World) -> World {
    let clean = run(w.clone(), None);
    for at in 0..=rounds(w) {
        for how in [Crash::BeforeCommit, Crash::AfterEffects] {
            let crashed = run(w.clone(), Some((at, how)));
            assert_eq!(
                end_state(&crashed),
                end_state(&clean),
                "a crash ({how:?}) in round {at} changed how {:?} ended",
                w.input.kind()
            );
        }
    }
    clean
}

/// What must not depend on crashes (the clock, and when steps started, may).
fn end_state(w: &World) -> impl PartialEq + std::fmt::Debug {
    (
        w.job_state,
        w.job_error.clone(),
        w.job_output.clone(),
        w.steps.iter().map(|s| s.state).collect::<Vec<_>>(),
        w.step_outputs.clone(),
        w.item.clone(),
        w.tasks.clone(),
        w.policies.clone(),
        w.pairing,
        w.mapping,
        w.input.clone(),
        (w.epoch.clone(), w.seeds.clone()),
    )
}

fn succeeded(w: &World) {
    assert_eq!(w.job_state, JobState::Succeeded, "{:?}", w.job_error);
    assert!(w.steps.iter().all(|s| s.state == JobState::Succeeded));
}

fn failed_at(seen: &mut BTreeSet<StepKey>, w: &World, step: StepKey, code: &str) {
    seen.insert(step);
    assert_eq!(w.job_state, JobState::Failed);
    assert_eq!(
        w.job_error.as_ref().map(|e| e.0.as_str()),
        Some(code),
        "{:?}",
        w.job_error
    );
    let keys = w.input.step_keys();
    let at = keys.iter().position(|k| *k == step).unwrap();
    for (i, s) in w.steps.iter().enumerate() {
        let want = match i.cmp(&at) {
            std::cmp::Ordering::Less => JobState::Succeeded,
            std::cmp::Ordering::Equal => JobState::Failed,
            std::cmp::Ordering::Greater => JobState::Cancelled,
        };
        assert_eq!(s.state, want, "step {i} of {keys:?}");
    }
}

fn enable() -> World {
    World::new(JobInput::EnableProtection(ItemInput { item: ITEM.into() }))
        .with_item(ProtectionState::EnablingProtection, TestFailoverState::None)
}

fn failover(vm: bool) -> World {
    World::new(JobInput::UnplannedFailover(FailoverInput {
        item: ITEM.into(),
        point_id: "p1".into(),
        vm,
        vm_name: vm.then(|| "m1".into()),
        sealed_key: Some(SealedKey("sealed".into())),
        to: Location::Recovery,
    }))
    .with_item(
        ProtectionState::UnplannedFailoverInProgress,
        TestFailoverState::None,
    )
}

fn test_failover() -> World {
    test_failover_of(true)
}

fn test_failover_of(vm: bool) -> World {
    World::new(JobInput::TestFailover(TestFailoverInput {
        item: ITEM.into(),
        point_id: "p1".into(),
        vm_name: "m1-test".into(),
        vm,
        network: vm.then(|| "rnet".into()),
        sealed_key: None,
    }))
    .with_item(
        ProtectionState::Protected,
        TestFailoverState::TestFailoverInitiated,
    )
}

fn cleanup() -> World {
    cleanup_of(true)
}

fn cleanup_of(vm: bool) -> World {
    World::new(JobInput::TestFailoverCleanup(CleanupInput {
        item: ITEM.into(),
        vm_name: "m1-test".into(),
        vm,
        comments: Some("ok".into()),
    }))
    .with_item(
        ProtectionState::Protected,
        TestFailoverState::TestFailoverCleanupInitiated,
    )
}

fn commit() -> World {
    World::new(JobInput::CommitFailover(ItemInput { item: ITEM.into() })).with_item(
        ProtectionState::FailoverCommitInProgress,
        TestFailoverState::None,
    )
}

fn planned() -> World {
    World::new(JobInput::PlannedFailover(PlannedFailoverInput {
        item: ITEM.into(),
        source_stopped: true,
        final_point: None,
        sealed_key: Some(SealedKey("sealed".into())),
        to: Location::Recovery,
        machine: "m1".into(),
        vm: false,
        source_vm: None,
        shutdown_timeout_secs: 120,
        force: false,
    }))
    .with_item(
        ProtectionState::PlannedFailoverInProgress,
        TestFailoverState::None,
    )
}

fn change_point() -> World {
    World::new(JobInput::ChangeRecoveryPoint(ChangePointInput {
        item: ITEM.into(),
        point_id: "p1".into(),
        sealed_key: Some(SealedKey("sealed".into())),
        at: Location::Recovery,
        vm: false,
    }))
    .with_item(
        ProtectionState::ChangeRecoveryPointInProgress,
        TestFailoverState::None,
    )
}

fn disable(delete_replica: bool) -> World {
    World::new(JobInput::DisableProtection(DisableInput {
        item: ITEM.into(),
        delete_replica,
        at: Location::Recovery,
    }))
    .with_item(
        ProtectionState::DisablingProtection,
        TestFailoverState::None,
    )
}

/// Reprotect of a machine failed over to the recovery site: replication
/// back to the primary site.
fn reprotect() -> World {
    let mut w = World::new(JobInput::Reprotect(ReprotectInput {
        item: ITEM.into(),
        machine: "m1".into(),
        to: Location::Primary,
    }))
    .with_item(
        ProtectionState::ReprotectInProgress,
        TestFailoverState::None,
    );
    w.item.as_mut().unwrap().active = Location::Recovery;
    w
}

/// A planned failover of a VM: shut down at the primary site, booted at
/// the recovery site from its final point.
fn planned_vm() -> World {
    let JobInput::PlannedFailover(mut p) = planned().input else {
        unreachable!()
    };
    p.vm = true;
    p.source_stopped = false;
    p.force = true;
    p.shutdown_timeout_secs = 30;
    World::new(JobInput::PlannedFailover(p)).with_item(
        ProtectionState::PlannedFailoverInProgress,
        TestFailoverState::None,
    )
}

/// Failback: a planned failover of a reprotected machine back home.
fn failback() -> World {
    let mut w = planned();
    if let JobInput::PlannedFailover(p) = &mut w.input {
        p.to = Location::Primary;
    }
    w.item.as_mut().unwrap().active = Location::Recovery;
    w
}

fn pairing() -> World {
    World::new(JobInput::ConfigureProtection(PairingInput {
        fabric: "primary".into(),
        container: "pc".into(),
        name: "map1".into(),
        policy: "pol".into(),
    }))
}

fn create_policy(p: Policy) -> World {
    World::new(JobInput::CreatePolicy(PolicyInput {
        name: "p2".into(),
        policy: p,
    }))
}

fn map_networks() -> World {
    World::new(JobInput::CreateNetworkMapping(NetworkMappingInput {
        fabric: "primary".into(),
        network: "prod".into(),
        name: "nm1".into(),
        recovery_fabric: "recovery".into(),
        recovery_network: "rnet".into(),
    }))
}

fn unmap_networks() -> World {
    let mut w = World::new(JobInput::DeleteNetworkMapping(NetworkRef {
        fabric: "primary".into(),
        network: "prod".into(),
        name: "nm1".into(),
    }));
    w.mapping = Some("Unpairing");
    w
}

fn unpair() -> World {
    let mut w = World::new(JobInput::DeletePairing(PairingInput {
        fabric: "primary".into(),
        container: "pc".into(),
        name: "map1".into(),
        policy: "pol".into(),
    }));
    w.pairing = Some("Unpairing");
    w
}

fn export_jobs() -> World {
    World::new(JobInput::ExportJobs(ExportInput {
        query: crate::jobquery::JobQuery::parse_filter("jobStatus eq 'Failed'").unwrap(),
    }))
}

fn verify() -> World {
    World::new(JobInput::VerifyStore(VerifyInput {
        fabric: "recovery".into(),
        agents: vec![AGENT.into(), "agent-2".into()],
    }))
}

#[test]
fn every_job_kind_runs_its_steps_and_survives_a_crash_in_any_round() {
    let w = survives_crashes(&create_policy(policy()));
    succeeded(&w);
    assert!(w.policies.contains_key("p2"));

    let w = survives_crashes(&pairing());
    succeeded(&w);
    assert_eq!(w.pairing, Some("Paired"));

    // Enable protection waits for a first recovery point.
    let mut e = enable();
    e.points.clear();
    let mut waiting = e.clone();
    for _ in 0..5 {
        round(&mut waiting, Crash::None);
    }
    assert_eq!(waiting.job_state, JobState::InProgress);
    assert_eq!(
        waiting.steps[3].state,
        JobState::InProgress,
        "waits at InitialReplication"
    );
    assert_eq!(
        waiting.item().state,
        ProtectionState::InitialReplicationInProgress
    );
    waiting.points.insert("p1".into(), true);
    let w = run(waiting, None);
    succeeded(&w);
    assert_eq!(w.item().state, ProtectionState::Protected);
    let w = survives_crashes(&enable());
    assert_eq!(w.item().state, ProtectionState::Protected);

    // A server's failover writes images; the sealed key is forgotten.
    let w = survives_crashes(&failover(false));
    succeeded(&w);
    let i = w.item();
    assert_eq!(i.state, ProtectionState::UnplannedFailoverCompleted);
    assert_eq!(i.failover_point.as_deref(), Some("p1"));
    assert_eq!(i.failover_output, Some(json!({"disks": []})));
    assert!(matches!(w.input, JobInput::UnplannedFailover(ref f) if f.sealed_key.is_none()));
    let (_, work, _) = &w.tasks["job-1-materialize"];
    assert!(
        matches!(work, TaskWork::Materialize { sealed_key: None, formats, .. } if formats == &["raw", "qcow2"])
    );

    // A VM's failover boots it, its NIC on the mapped network.
    let w = survives_crashes(&failover(true));
    succeeded(&w);
    assert_eq!(w.item().state, ProtectionState::UnplannedFailoverCompleted);
    let (agent, work, _) = &w.tasks["job-1-start-replica"];
    assert_eq!(agent, AGENT);
    match work {
        TaskWork::StartReplica {
            test,
            nics,
            vm_name,
            ..
        } => {
            assert!(!test);
            assert_eq!(vm_name, "m1");
            assert_eq!(nics[0].network.as_deref(), Some("rnet"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(w.step_outputs[&2]["agent"], AGENT);

    let w = survives_crashes(&commit());
    succeeded(&w);
    assert_eq!(w.item().state, ProtectionState::FailoverCommitted);

    // A planned failover waits for the source's final point and brings the
    // server up from exactly that point; the machine now runs at the
    // recovery site.
    let w = survives_crashes(&planned());
    succeeded(&w);
    let i = w.item();
    assert_eq!(i.state, ProtectionState::PlannedFailoverCompleted);
    assert_eq!(i.active, Location::Recovery);
    assert_eq!(i.failover_point.as_deref(), Some(FINAL));
    assert!(matches!(
        &w.tasks["job-1-materialize"].1,
        TaskWork::Materialize { point_id, sealed_key: None, .. } if point_id == FINAL
    ));
    assert_eq!(w.step_outputs[&2]["finalPointId"], FINAL);
    assert!(
        matches!(&w.input, JobInput::PlannedFailover(p) if p.final_point.as_deref() == Some(FINAL) && p.sealed_key.is_none())
    );
    // It waits as long as the source is heard from.
    let mut waiting = planned();
    waiting.plays = AgentPlays::Silent;
    for _ in 0..4 {
        round(&mut waiting, Crash::None);
        waiting.now += 30_000;
        waiting.agent_seen = waiting.now;
    }
    assert_eq!(waiting.job_state, JobState::InProgress);
    assert_eq!(waiting.steps[2].state, JobState::InProgress);

    // A change of recovery point writes the disks from the other point.
    let mut c = change_point();
    c.item.as_mut().unwrap().active = Location::Recovery;
    let w = survives_crashes(&c);
    succeeded(&w);
    let i = w.item();
    assert_eq!(
        (i.state, i.active),
        (
            ProtectionState::UnplannedFailoverCompleted,
            Location::Recovery
        )
    );
    assert_eq!(i.failover_point.as_deref(), Some("p1"));
    assert!(matches!(
        &w.tasks["job-1-materialize"].1,
        TaskWork::Materialize { point_id, sealed_key: None, .. } if point_id == "p1"
    ));

    // A VM's change of point makes its replica VM again from the point.
    let mut c = World::new(JobInput::ChangeRecoveryPoint(ChangePointInput {
        item: ITEM.into(),
        point_id: "p1".into(),
        sealed_key: None,
        at: Location::Recovery,
        vm: true,
    }))
    .with_item(
        ProtectionState::ChangeRecoveryPointInProgress,
        TestFailoverState::None,
    );
    c.item.as_mut().unwrap().active = Location::Recovery;
    let w = survives_crashes(&c);
    succeeded(&w);
    assert_eq!(w.item().state, ProtectionState::UnplannedFailoverCompleted);
    assert!(matches!(
        &w.tasks["job-1-start-replica"].1,
        TaskWork::StartReplica { point_id, test: false, vm_name, .. } if point_id == "p1" && vm_name == "m1"
    ));
    assert_eq!(w.item().failover_output.as_ref().unwrap()["vmName"], "m1");

    // Reprotect seeds the other site's store, starts the new epoch, waits
    // for its first point, removes the seed and leaves the item Protected
    // where it runs.
    let w = survives_crashes(&reprotect());
    succeeded(&w);
    let i = w.item();
    assert_eq!(
        (i.state, i.active),
        (ProtectionState::Protected, Location::Recovery)
    );
    assert_eq!(w.epoch.as_deref(), Some(JOB));
    assert!(w.epoch_points > 0);
    assert!(w.seeds.is_empty(), "the seed is removed: {:?}", w.seeds);
    assert!(matches!(
        &w.tasks["job-1-seed"].1,
        TaskWork::SeedReplica { seed_id, machine, .. } if seed_id == "seed-job-1" && machine == "m1"
    ));

    // Failback writes the final point back onto the machine's own disks.
    let w = survives_crashes(&failback());
    succeeded(&w);
    let i = w.item();
    assert_eq!(
        (i.state, i.active),
        (ProtectionState::PlannedFailoverCompleted, Location::Primary)
    );
    assert!(matches!(
        &w.tasks["job-1-materialize"].1,
        TaskWork::WriteBack { point_id, machine, sealed_key: None, .. } if point_id == FINAL && machine == "m1"
    ));

    // A VM's planned failover shuts it down at the source site (its
    // agent's task, forced as asked), then boots it at the recovery site
    // from the final point.
    let w = survives_crashes(&planned_vm());
    succeeded(&w);
    assert_eq!(
        w.input.step_keys(),
        &[
            StepKey::CheckPlannedFailover,
            StepKey::ShutDownSource,
            StepKey::FinalReplication,
            StepKey::StartVm,
            StepKey::CompletePlannedFailover
        ]
    );
    let i = w.item();
    assert_eq!(
        (i.state, i.active),
        (
            ProtectionState::PlannedFailoverCompleted,
            Location::Recovery
        )
    );
    assert_eq!(i.failover_point.as_deref(), Some(FINAL));
    assert!(matches!(
        &w.tasks["job-1-shutdown"].1,
        TaskWork::StopVm { vm_name, timeout_secs: 30, force: true, .. } if vm_name == "m1"
    ));
    assert!(matches!(
        &w.tasks["job-1-start-replica"].1,
        TaskWork::StartReplica { point_id, test: false, .. } if point_id == FINAL
    ));
    assert_eq!(i.failover_output.as_ref().unwrap()["vmName"], "m1");
    // Its failback stops the replica VM at the recovery site and writes
    // the final point back onto the VM's own disks.
    let mut fb = failback();
    if let JobInput::PlannedFailover(p) = &mut fb.input {
        p.vm = true;
        p.source_vm = Some("m1-replica".into());
    }
    let w = survives_crashes(&fb);
    succeeded(&w);
    assert_eq!(
        (w.item().state, w.item().active),
        (ProtectionState::PlannedFailoverCompleted, Location::Primary)
    );
    assert!(matches!(
        &w.tasks["job-1-shutdown"].1,
        TaskWork::StopVm { vm_name, force: false, .. } if vm_name == "m1-replica"
    ));
    assert!(matches!(
        &w.tasks["job-1-materialize"].1,
        TaskWork::WriteBack { point_id, machine, .. } if point_id == FINAL && machine == "m1"
    ));

    // Disabling protection removes the item, and the replica when asked.
    for delete in [false, true] {
        let w = survives_crashes(&disable(delete));
        succeeded(&w);
        assert!(w.item.is_none() && w.points.is_empty());
        assert_eq!(
            w.tasks.contains_key("job-1-delete-replica"),
            delete,
            "{:?}",
            w.tasks
        );
    }

    let w = survives_crashes(&test_failover());
    succeeded(&w);
    let i = w.item();
    assert_eq!(i.test, TestFailoverState::TestFailoverCompleted);
    assert_eq!(i.state, ProtectionState::Protected, "replication goes on");
    assert!(i.tested);
    assert_eq!(i.test_output.as_ref().unwrap()["vmName"], "m1-test");

    let w = survives_crashes(&cleanup());
    succeeded(&w);
    assert_eq!(w.item().test, TestFailoverState::None);
    assert!(matches!(
        w.tasks["job-1-remove-replica"].1,
        TaskWork::RemoveReplica { .. }
    ));

    // A physical server's test copy is its disks, in the test directory;
    // its cleanup deletes them. No VM is started or removed.
    let w = survives_crashes(&test_failover_of(false));
    succeeded(&w);
    let i = w.item();
    assert_eq!(i.test, TestFailoverState::TestFailoverCompleted);
    assert_eq!(i.state, ProtectionState::Protected, "replication goes on");
    assert!(i.tested);
    let out = i.test_output.as_ref().unwrap();
    assert_eq!(out["vmName"], "m1-test");
    assert_eq!(out["pointId"], "p1");
    assert!(out.get("disks").is_some(), "{out}");
    assert_eq!(w.tasks.len(), 1, "{:?}", w.tasks);
    assert!(matches!(
        &w.tasks["job-1-test-disks"].1,
        TaskWork::MaterializeTest { point_id, formats, .. } if point_id == "p1" && formats.len() == 2
    ));
    let w = survives_crashes(&cleanup_of(false));
    succeeded(&w);
    assert_eq!(w.item().test, TestFailoverState::None);
    assert_eq!(w.tasks.len(), 1, "{:?}", w.tasks);
    assert!(matches!(
        &w.tasks["job-1-remove-test-disks"].1,
        TaskWork::RemoveTestDisks { item } if item == ITEM
    ));

    let w = survives_crashes(&map_networks());
    succeeded(&w);
    assert_eq!(w.mapping, Some("Paired"));
    let w = survives_crashes(&unmap_networks());
    succeeded(&w);
    assert_eq!(w.mapping, None);
    // A pairing is removed the same way.
    let w = survives_crashes(&unpair());
    succeeded(&w);
    assert_eq!(w.pairing, None);
    let w = survives_crashes(&export_jobs());
    succeeded(&w);

    let w = survives_crashes(&verify());
    succeeded(&w);
    assert_eq!(
        w.job_output.as_ref().unwrap()["stores"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}

#[test]
fn every_failure_fails_its_step_and_compensates() {
    use ProtectionState as S;
    use StepKey as K;
    use TestFailoverState as T;
    let mut seen = BTreeSet::new();

    let mut bad = policy();
    bad.copy_frequency_secs = 0;
    let w = survives_crashes(&create_policy(bad));
    failed_at(&mut seen, &w, K::ValidatePolicy, "InvalidPolicy");
    assert!(!w.policies.contains_key("p2"));

    let mut p = pairing();
    p.policies.clear();
    let w = survives_crashes(&p);
    failed_at(&mut seen, &w, K::CheckPairing, "PolicyNotFound");
    assert_eq!(w.pairing, None, "the pending pairing is dropped");

    let mut e = enable();
    e.machine = None;
    let w = survives_crashes(&e);
    failed_at(&mut seen, &w, K::CheckEnable, "MachineNotFound");
    assert_eq!(w.item().state, S::ProtectionFailed);
    assert!(
        w.item()
            .last_error
            .as_ref()
            .unwrap()
            .contains("no longer reported")
    );
    let mut e = enable();
    e.machine.as_mut().unwrap().error = Some("disk missing".into());
    failed_at(
        &mut seen,
        &survives_crashes(&e),
        K::CheckEnable,
        "MachineNotReady",
    );
    let mut e = enable();
    e.item = None;
    failed_at(
        &mut seen,
        &survives_crashes(&e),
        K::CheckEnable,
        "ItemNotFound",
    );
    // No recovery agent for five minutes.
    let mut e = enable();
    e.item.as_mut().unwrap().agent = None;
    e.candidate = None;
    let w = survives_crashes(&e);
    failed_at(&mut seen, &w, K::IdentifyTarget, "NoRecoveryAgent");
    assert_eq!(w.item().state, S::ProtectionFailed);

    // Failover: the point went, the agent failed, the agent went silent.
    for vm in [false, true] {
        let mut f = failover(vm);
        f.points.insert("p1".into(), false);
        let w = survives_crashes(&f);
        failed_at(&mut seen, &w, K::CheckFailover, "RecoveryPointNotFound");
        assert_eq!(
            w.item().state,
            S::Protected,
            "an aborted failover returns to Protected"
        );
        assert!(matches!(w.input, JobInput::UnplannedFailover(ref f) if f.sealed_key.is_none()));

        let mut f = failover(vm);
        f.item.as_mut().unwrap().state = S::Protected;
        failed_at(
            &mut seen,
            &survives_crashes(&f),
            K::CheckFailover,
            "InvalidState",
        );

        let step = if vm { K::StartVm } else { K::MaterializeDisks };
        let mut f = failover(vm);
        f.plays = AgentPlays::Fails;
        let w = survives_crashes(&f);
        let code = if vm {
            "StartReplicaFailed"
        } else {
            "MaterializeFailed"
        };
        failed_at(&mut seen, &w, step, code);
        assert!(w.job_error.as_ref().unwrap().1.contains("disk full"));
        assert_eq!(w.item().state, S::Protected);
        assert!(w.tasks.values().all(|(_, work, _)| !matches!(
            work,
            TaskWork::Materialize {
                sealed_key: Some(_),
                ..
            } | TaskWork::StartReplica {
                sealed_key: Some(_),
                ..
            }
        )));

        let mut f = failover(vm);
        f.plays = AgentPlays::Silent;
        let w = survives_crashes(&f);
        failed_at(&mut seen, &w, step, "RecoveryAgentNotConnected");
        assert_eq!(w.item().state, S::Protected);

        let mut f = failover(vm);
        f.item.as_mut().unwrap().agent = None;
        failed_at(&mut seen, &survives_crashes(&f), step, "NoRecoveryAgent");
    }
    let mut f = failover(true);
    f.plays = AgentPlays::AnswersJunk;
    failed_at(
        &mut seen,
        &survives_crashes(&f),
        K::StartVm,
        "StartReplicaFailed",
    );
    let mut f = failover(true);
    f.machine.as_mut().unwrap().vm = None;
    failed_at(
        &mut seen,
        &survives_crashes(&f),
        K::StartVm,
        "NotAVirtualMachine",
    );
    let mut f = failover(true);
    f.machine = None;
    failed_at(
        &mut seen,
        &survives_crashes(&f),
        K::StartVm,
        "MachineNotFound",
    );

    let mut c = commit();
    c.item.as_mut().unwrap().state = S::Protected;
    let w = survives_crashes(&c);
    failed_at(&mut seen, &w, K::CheckCommit, "InvalidState");
    assert_eq!(
        w.item().state,
        S::Protected,
        "abort of a commit that never started"
    );
    let mut c = commit();
    c.item.as_mut().unwrap().state = S::UnplannedFailoverCompleted;
    failed_at(
        &mut seen,
        &survives_crashes(&c),
        K::CheckCommit,
        "InvalidState",
    );

    // A failed test failover leaves the item replicating, to be cleaned up.
    let mut t = test_failover();
    t.plays = AgentPlays::Fails;
    let w = survives_crashes(&t);
    failed_at(&mut seen, &w, K::StartTestVm, "StartReplicaFailed");
    assert_eq!(w.item().state, S::Protected);
    assert_eq!(w.item().test, T::TestFailoverFailed);
    assert!(w.item().test_error.as_ref().unwrap().contains("disk full"));
    let mut t = test_failover();
    t.points.clear();
    failed_at(
        &mut seen,
        &survives_crashes(&t),
        K::CheckTestFailover,
        "RecoveryPointNotFound",
    );
    let mut t = test_failover();
    t.item.as_mut().unwrap().test = T::None;
    failed_at(
        &mut seen,
        &survives_crashes(&t),
        K::CheckTestFailover,
        "InvalidState",
    );
    let mut t = test_failover();
    t.plays = AgentPlays::Silent;
    failed_at(
        &mut seen,
        &survives_crashes(&t),
        K::StartTestVm,
        "RecoveryAgentNotConnected",
    );

    let mut t = test_failover_of(false);
    t.plays = AgentPlays::Fails;
    let w = survives_crashes(&t);
    failed_at(&mut seen, &w, K::WriteTestDisks, "MaterializeFailed");
    assert_eq!(w.item().state, S::Protected);
    assert_eq!(w.item().test, T::TestFailoverFailed);
    let mut t = test_failover_of(false);
    t.plays = AgentPlays::Silent;
    failed_at(
        &mut seen,
        &survives_crashes(&t),
        K::WriteTestDisks,
        "RecoveryAgentNotConnected",
    );
    let mut c = cleanup_of(false);
    c.plays = AgentPlays::Fails;
    let w = survives_crashes(&c);
    failed_at(&mut seen, &w, K::RemoveTestDisks, "RemoveTestDisksFailed");
    assert_eq!(w.item().test, T::MarkedForDeletion);

    let mut c = cleanup();
    c.plays = AgentPlays::Fails;
    let w = survives_crashes(&c);
    failed_at(&mut seen, &w, K::RemoveTestVm, "RemoveReplicaFailed");
    assert_eq!(w.item().test, T::MarkedForDeletion);
    let mut c = cleanup();
    c.plays = AgentPlays::Silent;
    failed_at(
        &mut seen,
        &survives_crashes(&c),
        K::RemoveTestVm,
        "RecoveryAgentNotConnected",
    );
    let mut c = cleanup();
    c.item.as_mut().unwrap().test = T::TestFailoverCompleted;
    failed_at(
        &mut seen,
        &survives_crashes(&c),
        K::CheckCleanup,
        "InvalidState",
    );
    // No recovery agent: no VM was ever started, nothing to delete.
    let mut c = cleanup();
    c.item.as_mut().unwrap().agent = None;
    let w = survives_crashes(&c);
    succeeded(&w);
    assert!(w.tasks.is_empty());
    assert!(
        w.step_outputs[&1]["notes"][0]
            .as_str()
            .unwrap()
            .contains("no test VM")
    );

    // Planned failover: the source is not stopped, is not heard from, or
    // no agent reports it; each returns the item to Protected at the
    // primary site.
    let mut p = planned();
    if let JobInput::PlannedFailover(i) = &mut p.input {
        i.source_stopped = false;
    }
    let w = survives_crashes(&p);
    failed_at(&mut seen, &w, K::ShutDownSource, "SourceNotStopped");
    assert_eq!(
        (w.item().state, w.item().active),
        (S::Protected, Location::Primary)
    );
    assert!(
        w.item()
            .last_error
            .as_ref()
            .unwrap()
            .contains("--source-stopped")
    );
    for no_source in [false, true] {
        let mut p = planned();
        p.plays = AgentPlays::Silent;
        if no_source {
            p.source = None;
        }
        let w = survives_crashes(&p);
        failed_at(
            &mut seen,
            &w,
            K::FinalReplication,
            "SourceAgentNotConnected",
        );
        assert_eq!(
            (w.item().state, w.item().active),
            (S::Protected, Location::Primary)
        );
        assert!(
            w.tasks.is_empty(),
            "no disk is written without the final point"
        );
    }
    // A VM whose guest does not power off (the agent's task fails): the
    // job says so and the item is Protected at the primary site again.
    let mut p = planned_vm();
    p.plays = AgentPlays::Fails;
    let w = survives_crashes(&p);
    failed_at(&mut seen, &w, K::ShutDownSource, "SourceNotStopped");
    assert_eq!(
        (w.item().state, w.item().active),
        (S::Protected, Location::Primary)
    );
    assert!(
        w.tasks.keys().all(|t| t.ends_with("shutdown")),
        "{:?}",
        w.tasks.keys()
    );
    let mut p = planned();
    p.item.as_mut().unwrap().state = S::Protected;
    failed_at(
        &mut seen,
        &survives_crashes(&p),
        K::CheckPlannedFailover,
        "InvalidState",
    );
    let mut p = planned();
    p.plays = AgentPlays::Fails;
    let w = survives_crashes(&p);
    failed_at(&mut seen, &w, K::MaterializeDisks, "MaterializeFailed");
    assert_eq!(
        (w.item().state, w.item().active),
        (S::Protected, Location::Primary)
    );

    // Change of point: the point went, the item is not changing, the
    // agent failed (the item stays failed over, with the error).
    let mut c = change_point();
    c.points.clear();
    let w = survives_crashes(&c);
    failed_at(&mut seen, &w, K::CheckChangePoint, "RecoveryPointNotFound");
    assert_eq!(w.item().state, S::UnplannedFailoverCompleted);
    let mut c = change_point();
    c.item.as_mut().unwrap().state = S::FailoverCommitted;
    let w = survives_crashes(&c);
    failed_at(&mut seen, &w, K::CheckChangePoint, "InvalidState");
    assert_eq!(w.item().state, S::FailoverCommitted, "a commit stays");
    let mut c = change_point();
    c.plays = AgentPlays::Fails;
    let w = survives_crashes(&c);
    failed_at(&mut seen, &w, K::MaterializeDisks, "MaterializeFailed");
    assert_eq!(w.item().state, S::UnplannedFailoverCompleted);
    assert!(w.item().last_error.as_ref().unwrap().contains("disk full"));

    // Disable protection: a failed deletion leaves the item disabling,
    // with the error, for DisableProtection to run again.
    let mut d = disable(true);
    d.plays = AgentPlays::Fails;
    let w = survives_crashes(&d);
    failed_at(&mut seen, &w, K::RemoveReplicaData, "DeleteReplicaFailed");
    assert_eq!(w.item().state, S::DisablingProtection);
    assert!(
        w.item()
            .last_error
            .as_ref()
            .unwrap()
            .contains("run DisableProtection again")
    );
    let mut d = disable(true);
    d.plays = AgentPlays::Silent;
    failed_at(
        &mut seen,
        &survives_crashes(&d),
        K::RemoveReplicaData,
        "RecoveryAgentNotConnected",
    );
    let mut d = disable(false);
    d.item.as_mut().unwrap().state = S::Protected;
    failed_at(
        &mut seen,
        &survives_crashes(&d),
        K::CheckDisable,
        "InvalidState",
    );

    // A reprotect whose seed fails, or whose agent is gone, goes back to
    // committed and replicates nothing in the new direction.
    for (plays, code) in [
        (AgentPlays::Fails, "SeedFailed"),
        (AgentPlays::Silent, "RecoveryAgentNotConnected"),
    ] {
        let mut r = reprotect();
        r.plays = plays;
        let w = survives_crashes(&r);
        failed_at(&mut seen, &w, K::SeedReverseReplica, code);
        let i = w.item();
        assert_eq!(
            (i.state, i.active),
            (S::FailoverCommitted, Location::Recovery)
        );
        assert_eq!(w.epoch, None);
        assert!(i.last_error.is_some());
    }
    let mut r = reprotect();
    r.item.as_mut().unwrap().state = S::FailoverCommitted;
    failed_at(
        &mut seen,
        &survives_crashes(&r),
        K::CheckReprotect,
        "InvalidState",
    );
    // A seed that cannot be removed is said, and the reprotect holds.
    let mut r = reprotect();
    r.plays = AgentPlays::Succeeds;
    let mut w = r.clone();
    while round(&mut w, Crash::None) {
        w.now += 60_000;
        if w.steps[3].state == JobState::InProgress {
            w.plays = AgentPlays::Fails;
        }
        w.agent_runs();
    }
    succeeded(&w);
    assert!(
        w.step_outputs[&3]
            .to_string()
            .contains("seed point seed-job-1 was left"),
        "{:?}",
        w.step_outputs
    );
    seen.insert(K::RemoveSeed);

    let mut m = map_networks();
    m.networks.clear();
    let w = survives_crashes(&m);
    failed_at(&mut seen, &w, K::CheckNetworkMapping, "NetworkNotFound");
    assert_eq!(w.mapping, None, "the pending mapping is dropped");

    let mut v = verify();
    v.plays = AgentPlays::FindsDamage;
    let w = survives_crashes(&v);
    failed_at(&mut seen, &w, K::VerifyStores, "DamageFound");
    assert!(
        w.job_error
            .as_ref()
            .unwrap()
            .1
            .contains("i1/p1 (1 damaged chunk(s))")
    );
    let mut v = verify();
    v.plays = AgentPlays::Fails;
    failed_at(
        &mut seen,
        &survives_crashes(&v),
        K::VerifyStores,
        "DamageFound",
    );
    let mut v = verify();
    v.plays = AgentPlays::Silent;
    let w = survives_crashes(&v);
    failed_at(&mut seen, &w, K::VerifyStores, "DamageFound");
    assert!(
        w.job_error
            .as_ref()
            .unwrap()
            .1
            .contains("not been heard from")
    );

    // Every step that looks at something can fail, and failed above; the
    // others only write what the job's own input says. Initial
    // replication waits as long as the first point takes: it looks, but
    // never fails. Validating a policy and the operator's word that the
    // source is stopped look at the input only, and can fail.
    let can_fail: BTreeSet<StepKey> = StepKey::ALL
        .into_iter()
        .filter(|k| {
            needs(*k, &sample_input(*k), JOB, 0) != Need::Nothing
                || matches!(k, K::ValidatePolicy | K::ShutDownSource)
        })
        .filter(|k| !matches!(k, K::InitialReplication | K::ReverseReplication))
        // Recovery plans' steps: plan_tests.
        .filter(|k| {
            !matches!(
                k,
                K::CheckPlan | K::PlanAction | K::PlanItems | K::CompletePlan
            )
        })
        .collect();
    assert_eq!(seen, can_fail);
}

/// An input of the job kind `key` belongs to.
fn sample_input(key: StepKey) -> JobInput {
    if matches!(
        key,
        StepKey::CheckPlan | StepKey::PlanAction | StepKey::PlanItems | StepKey::CompletePlan
    ) {
        return JobInput::RecoveryPlan(super::plan_tests::sample_plan(
            crate::plan::PlanOp::TestFailover,
        ));
    }
    [
        create_policy(policy()),
        pairing(),
        enable(),
        failover(false),
        failover(true),
        commit(),
        verify(),
        test_failover(),
        cleanup(),
        test_failover_of(false),
        cleanup_of(false),
        map_networks(),
        unmap_networks(),
        planned(),
        disable(true),
        change_point(),
        reprotect(),
        unpair(),
        export_jobs(),
    ]
    .into_iter()
    .map(|w| w.input)
    .find(|i| i.step_keys().contains(&key))
    .unwrap()
}

#[test]
fn steps_are_known_by_name_and_old_rows_by_index() {
    for k in StepKey::ALL {
        assert_eq!(StepKey::parse(k.as_str()), Some(k));
        assert_eq!(serde_json::to_value(k).unwrap(), k.as_str());
        assert!(!k.title().is_empty());
        // Every key belongs to some job kind.
        let _ = sample_input(k);
    }
    let input = failover(true).input;
    let row = |key: Option<&str>, state| StepRow {
        key: key.map(str::to_string),
        state,
        started_ms: None,
    };
    // Named rows resume at the named step.
    let named = [
        row(Some("CheckFailover"), JobState::Succeeded),
        row(Some("StopReplication"), JobState::Succeeded),
        row(Some("StartVm"), JobState::InProgress),
        row(Some("CompleteFailover"), JobState::NotStarted),
    ];
    assert_eq!(
        next_step(&input, &named),
        Next::Run {
            idx: 2,
            key: StepKey::StartVm
        }
    );
    // Rows of a build that named no steps resume by index (a VM's job).
    let legacy = [
        row(None, JobState::Succeeded),
        row(None, JobState::NotStarted),
        row(None, JobState::NotStarted),
        row(None, JobState::NotStarted),
    ];
    assert_eq!(
        next_step(&input, &legacy),
        Next::Run {
            idx: 1,
            key: StepKey::StopReplication
        }
    );
    let legacy_vm = [
        row(None, JobState::Succeeded),
        row(None, JobState::Succeeded),
        row(None, JobState::NotStarted),
        row(None, JobState::NotStarted),
    ];
    assert_eq!(
        next_step(&input, &legacy_vm),
        Next::Run {
            idx: 2,
            key: StepKey::StartVm
        }
    );
    assert_eq!(
        next_step(&failover(false).input, &legacy_vm),
        Next::Run {
            idx: 2,
            key: StepKey::MaterializeDisks
        }
    );
    // A step this build does not know, or one of another kind, fails the
    // job with a reason; so does an old job whose step count differs.
    for bad in ["DefragmentTheMoon", "SavePolicy"] {
        let rows = [
            row(Some("CheckFailover"), JobState::Succeeded),
            row(Some(bad), JobState::NotStarted),
        ];
        match next_step(&input, &rows) {
            Next::Unrunnable {
                idx: 1,
                code: "StepNotRunnable",
                message,
            } => {
                assert!(
                    message.contains(bad) && message.contains("run the operation again"),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
    }
    let short = [
        row(None, JobState::Succeeded),
        row(None, JobState::NotStarted),
    ];
    assert!(matches!(next_step(&input, &short), Next::Unrunnable { .. }));
    let done = [row(Some("CheckFailover"), JobState::Succeeded)];
    assert_eq!(next_step(&input, &done), Next::Finished);
}

#[test]
fn job_inputs_read_back_as_written_and_refuse_what_is_not_theirs() {
    for w in [
        create_policy(policy()),
        pairing(),
        enable(),
        failover(false),
        failover(true),
        commit(),
        verify(),
        test_failover(),
        cleanup(),
        test_failover_of(false),
        cleanup_of(false),
        map_networks(),
        unmap_networks(),
        planned(),
        disable(true),
        disable(false),
        change_point(),
        unpair(),
        export_jobs(),
    ] {
        let kind = w.input.kind();
        let back = JobInput::parse(kind, &w.input.to_json()).unwrap();
        assert_eq!(back, w.input);
    }
    // Inputs written by the builds before typed inputs read the same.
    let old = r#"{"item":"i1","pointId":"p1","vm":true,"vmName":"m1","sealedKey":"abc"}"#;
    match JobInput::parse(JobKind::UnplannedFailover, old).unwrap() {
        JobInput::UnplannedFailover(f) => {
            assert!(f.vm);
            assert_eq!(f.sealed_key, Some(SealedKey("abc".into())));
        }
        other => panic!("{other:?}"),
    }
    let old = r#"{"item":"i1","vmName":"m1-test","comments":null}"#;
    assert!(JobInput::parse(JobKind::TestFailoverCleanup, old).is_ok());
    // A server's failover input says nothing of a VM.
    assert!(!failover(false).input.to_json().contains("vm"));
    let err = JobInput::parse(JobKind::UnplannedFailover, r#"{"item":"i1"}"#).unwrap_err();
    assert!(err.to_string().contains("pointId"), "{err}");
    assert!(JobInput::parse(JobKind::EnableProtection, "not json").is_err());
}

#[test]
fn idempotent_transitions_stay_where_a_rerun_step_left_them() {
    use ItemAction as A;
    use ProtectionState as S;
    let at = |state, active| Lifecycle { state, active };
    let (p, r) = (Location::Primary, Location::Recovery);
    assert_eq!(
        transition(at(S::Protected, p), A::FinishInitialReplication).unwrap(),
        at(S::Protected, p)
    );
    assert_eq!(
        transition(at(S::FailoverCommitted, r), A::FinishCommit).unwrap(),
        at(S::FailoverCommitted, r)
    );
    assert!(transition(at(S::Protected, p), A::FinishCommit).is_err());
    // A failover's end moves the machine once, however often it is run.
    let once = transition(
        at(S::PlannedFailoverInProgress, p),
        A::FinishPlannedFailover,
    )
    .unwrap();
    assert_eq!(once, at(S::PlannedFailoverCompleted, r));
    assert_eq!(transition(once, A::FinishPlannedFailover).unwrap(), once);
    let once = transition(
        at(S::UnplannedFailoverInProgress, r),
        A::FinishUnplannedFailover,
    )
    .unwrap();
    assert_eq!(once, at(S::UnplannedFailoverCompleted, p));
    assert_eq!(transition(once, A::FinishUnplannedFailover).unwrap(), once);
    assert_eq!(
        transition(at(S::Protected, r), A::FinishReprotect).unwrap(),
        at(S::Protected, r)
    );

    use TestAction as TA;
    use TestFailoverState as T;
    assert_eq!(
        test_transition(T::None, TA::FinishCleanup, S::Protected).unwrap(),
        T::None
    );
    assert!(test_transition(T::None, TA::Finish, S::Protected).is_err());
}
