//! The durable job engine: a thin driver of the decisions in
//! [`siterec_core::orchestration`] over the database ([`crate::persist::jobs`]).
//!
//! A job is a row in `jobs` with one row per step in `job_steps`, each step
//! named by its stable [`StepKey`](siterec_core::orchestration::StepKey).
//! The API validates a request, then creates the job (and whatever rows it
//! needs) in one transaction and answers 202. The engine advances jobs a
//! round at a time: it loads what the due step looks at, asks the core for
//! a decision, and commits the decision's effects with the step's new
//! state in one transaction. Every step is idempotent, so a vault killed at
//! any moment resumes its jobs from the first unfinished step on restart.
//!
//! A step either finishes, waits (for an agent's task result, a recovery
//! point, ...) or fails; a failed step fails the job and writes the job's
//! compensation (for example an aborted failover returns the item to
//! Protected). Database errors are treated as transient: the round is
//! tried again on the next pass.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::AppState;
use crate::db::now_ms;
use crate::persist::jobs::{self as jobs_db, Tx};
use siterec_core::orchestration::{
    Effect, JobInput, Next, Outcome, PlanInput, StepCtx, decide, needs, next_step, on_failure,
    on_success,
};
use siterec_core::state::JobState;

pub use crate::persist::jobs::ensure_task;

/// Creates a job and its steps (NotStarted) inside the caller's transaction.
pub async fn create_job(
    tx: &mut Tx<'_>,
    input: &JobInput,
    target_type: &str,
    target_name: &str,
    target_id: &str,
) -> Result<String, sqlx::Error> {
    // A recovery plan starting a machine's operation names its job.
    if let Some(id) = plan_child() {
        jobs_db::create_with_id(tx, &id, input, target_type, target_name, target_id).await?;
        return Ok(id);
    }
    jobs_db::create(tx, input, target_type, target_name, target_id).await
}

tokio::task_local! {
    /// Set while a recovery plan's job starts a machine's operation
    /// through the API's own code: the id that operation's job gets.
    pub static PLAN_CHILD: String;
}

/// The id a machine operation started by a recovery plan gets, if this
/// is one.
pub fn plan_child() -> Option<String> {
    PLAN_CHILD.try_with(|id| id.clone()).ok()
}

/// Why a recovery plan's machine operation was not started (what the API
/// would have answered).
#[derive(Debug, Clone)]
pub struct StartRefused {
    pub code: String,
    pub message: String,
}

/// Starts one machine's operation of a recovery plan as job `job_id`
/// (plan input, item, job id), with the API's checks: the ARM layer's
/// `start_plan_item`, given to the engine so that the engine does not
/// depend on the API above it.
pub type StartItem = fn(
    crate::Shared,
    PlanInput,
    String,
    String,
) -> Pin<Box<dyn Future<Output = Result<(), StartRefused>> + Send>>;

/// A recovery plan's job asks for a machine's operation.
#[derive(Debug, Clone)]
pub struct ItemStart {
    pub plan_job: String,
    pub input: PlanInput,
    pub item: String,
    pub job_id: String,
}

/// What a job's rounds did.
#[derive(Debug, Default)]
pub struct Advanced {
    /// A step or the job ended: the jobs waiting on it may move.
    pub moved: bool,
    /// A round wrote effects (tasks for agents among them): agents waiting
    /// for a change are told.
    pub wrote: bool,
    pub starts: Vec<ItemStart>,
}

/// Runs until the task is aborted: advances every unfinished job, then
/// sleeps until woken or for a second (at once when a pass moved a job:
/// a plan's job waiting for its machines' jobs sees them end in the same
/// second).
pub async fn run_engine(st: crate::Shared, start_item: StartItem) {
    loop {
        let moved = match pass(&st).await {
            Ok(a) => {
                let moved = a.moved || !a.starts.is_empty();
                // Agents waiting for a change hear of it now, not at
                // their next heartbeat; a pass that changed nothing wakes
                // none of them (each wake is a heartbeat of every agent).
                if a.moved || a.wrote {
                    st.changes.send_modify(|v| *v += 1);
                }
                start_plan_items(&st, start_item, a.starts).await;
                moved
            }
            Err(e) => {
                tracing::warn!("a pass over the jobs will be retried: {e:#}");
                false
            }
        };
        if moved {
            // A breath between passes: the API and agents' writes (which
            // wait for the database's write lock) get theirs.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), st.wake.notified()).await;
    }
}

/// One pass over the unfinished jobs, in one transaction: each round of a
/// job in a savepoint of its own (a round that fails is rolled back alone
/// and retried next pass), one commit for all. A pass that moves a
/// hundred machines' jobs costs one sync of the database, not a hundred.
/// Nothing outside the database is touched here: the machines' operations
/// a plan asks for are started once the pass is committed.
async fn pass(st: &AppState) -> anyhow::Result<Advanced> {
    let mut out = Advanced::default();
    let ids = jobs_db::active(&st.db).await?;
    if ids.is_empty() {
        return Ok(out);
    }
    let mut tx = crate::db::begin(&st.db).await?;
    for id in ids {
        match advance_in(&mut tx, &id).await {
            Ok(a) => {
                out.moved |= a.moved;
                out.wrote |= a.wrote;
                out.starts.extend(a.starts);
            }
            Err(e) => tracing::warn!(job = %id, "job step will be retried: {e:#}"),
        }
    }
    tx.commit().await?;
    Ok(out)
}

/// Starts the machines' operations a pass asked for, a few at a time:
/// each is the ARM handler of that operation, whose reads run side by side
/// while their writes take the database's write lock in turn.
async fn start_plan_items(st: &crate::Shared, start_item: StartItem, starts: Vec<ItemStart>) {
    let mut starts = starts.into_iter();
    loop {
        let mut set = tokio::task::JoinSet::new();
        for s in starts.by_ref().take(PARALLEL_STARTS) {
            let st = st.clone();
            set.spawn(async move { start_plan_item(&st, start_item, s).await });
        }
        if set.is_empty() {
            return;
        }
        while set.join_next().await.is_some() {}
    }
}

/// How many of a plan's machine operations are started at once.
const PARALLEL_STARTS: usize = 8;

/// Starts a plan's machine operation; a refusal is recorded in the plan
/// job's input (the plan reports it as that machine's outcome). A failure
/// to record it is retried by the next round, which asks again.
async fn start_plan_item(st: &crate::Shared, start_item: StartItem, s: ItemStart) {
    let refused = match start_item(st.clone(), s.input, s.item.clone(), s.job_id.clone()).await {
        Ok(()) => return,
        Err(r) => r,
    };
    tracing::warn!(plan_job = %s.plan_job, item = %s.item, "the plan's operation of the machine was refused: {}", refused.message);
    let effect = Effect::PlanRefused {
        item: s.item.clone(),
        code: refused.code,
        message: refused.message,
    };
    let recorded = async {
        let mut tx = crate::db::begin(&st.db).await?;
        jobs_db::apply(&mut tx, &s.plan_job, 0, &effect).await?;
        tx.commit().await?;
        anyhow::Ok(())
    };
    if let Err(e) = recorded.await {
        tracing::warn!(plan_job = %s.plan_job, "recording a refusal (asked again next round): {e:#}");
    }
}

/// Runs rounds of the job until it waits or ends, in a transaction of its
/// own.
#[cfg(test)]
pub(crate) async fn advance(st: &AppState, job_id: &str) -> anyhow::Result<Advanced> {
    let mut tx = crate::db::begin(&st.db).await?;
    let out = advance_in(&mut tx, job_id).await?;
    tx.commit().await?;
    Ok(out)
}

/// Runs rounds of the job in `outer` until it waits or ends, each in a
/// savepoint: a round that fails is rolled back (when its savepoint is
/// dropped), the rounds before it are kept.
async fn advance_in(outer: &mut Tx<'_>, job_id: &str) -> anyhow::Result<Advanced> {
    let mut out = Advanced::default();
    loop {
        let mut tx = sqlx::Acquire::begin(&mut *outer).await?;
        let record = match jobs_db::load(&mut tx, job_id).await? {
            None => return Ok(out),
            Some(Ok(record)) => record,
            Some(Err(e)) => {
                // Not a job this build can read: fail it, loudly, rather
                // than retry it forever.
                tracing::error!(job = %job_id, "failing an unreadable job: {e}");
                jobs_db::fail_job(&mut tx, job_id, None, "JobNotReadable", &e.to_string()).await?;
                tx.commit().await?;
                out.moved = true;
                return Ok(out);
            }
        };
        // Ended, or waiting for an operator.
        if record.state.is_terminal() || record.state == JobState::Suspended {
            return Ok(out);
        }
        let now = now_ms();
        if record.state == JobState::NotStarted {
            jobs_db::start_job(&mut tx, job_id, now).await?;
        }
        let input = match JobInput::parse(record.kind, &record.input) {
            Ok(input) => input,
            Err(e) => {
                tracing::error!(job = %job_id, "failing a job whose input does not read: {e}");
                jobs_db::fail_job(&mut tx, job_id, None, "JobNotReadable", &e.to_string()).await?;
                tx.commit().await?;
                out.moved = true;
                return Ok(out);
            }
        };
        let steps = jobs_db::steps(&mut tx, job_id).await?;
        let (idx, key) = match next_step(&input, &steps) {
            Next::Finished => {
                for effect in on_success(&input) {
                    jobs_db::apply(&mut tx, job_id, 0, &effect).await?;
                }
                jobs_db::succeed_job(&mut tx, job_id).await?;
                crate::persist::events::job_ended(&mut tx, job_id, &input, None).await?;
                tx.commit().await?;
                out.moved = true;
                return Ok(out);
            }
            Next::Unrunnable { idx, code, message } => {
                fail(&mut tx, job_id, &input, idx, code, &message).await?;
                tx.commit().await?;
                out.moved = true;
                return Ok(out);
            }
            Next::Run { idx, key } => (idx, key),
        };
        let started_ms = match steps[idx].started_ms {
            Some(started) if steps[idx].state == JobState::InProgress => started,
            _ => {
                jobs_db::start_step(&mut tx, job_id, idx, now).await?;
                now
            }
        };
        let ctx = StepCtx {
            job_id,
            idx,
            started_ms,
            now_ms: now,
        };
        let seen = jobs_db::observe(&mut tx, &needs(key, &input, job_id, idx), now).await?;
        let decision = decide(key, &input, &ctx, &seen);
        out.wrote |= !decision.effects.is_empty();
        for effect in &decision.effects {
            jobs_db::apply(&mut tx, job_id, idx, effect).await?;
        }
        let starts = decision.effects.iter().filter_map(|e| match (e, &input) {
            (
                Effect::StartPlanItem {
                    item,
                    job_id: child,
                },
                JobInput::RecoveryPlan(p),
            ) => Some(ItemStart {
                plan_job: job_id.to_string(),
                input: p.clone(),
                item: item.clone(),
                job_id: child.clone(),
            }),
            _ => None,
        });
        match decision.outcome {
            Outcome::Done => {
                jobs_db::finish_step(&mut tx, job_id, idx).await?;
                tx.commit().await?;
                out.moved = true;
                out.starts.extend(starts);
            }
            Outcome::Wait => {
                tx.commit().await?;
                out.starts.extend(starts);
                return Ok(out);
            }
            Outcome::Fail { code, message } => {
                fail(&mut tx, job_id, &input, idx, code, &message).await?;
                tx.commit().await?;
                out.moved = true;
                return Ok(out);
            }
        }
    }
}

/// Fails step `idx` and the job, and writes the job's compensation.
async fn fail(
    tx: &mut Tx<'_>,
    job_id: &str,
    input: &JobInput,
    idx: usize,
    code: &str,
    message: &str,
) -> anyhow::Result<()> {
    jobs_db::fail_job(tx, job_id, Some(idx), code, message).await?;
    for effect in on_failure(input, message) {
        jobs_db::apply(tx, job_id, idx, &effect).await?;
    }
    crate::persist::events::job_ended(tx, job_id, input, Some(message)).await?;
    tracing::warn!(job = %job_id, "job failed: {message}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AppState, VaultInfo};
    use serde_json::{Value, json};
    use siterec_core::state::JobKind;
    use siterec_core::wire::{SealedKey, TaskWork};

    async fn open(dir: &std::path::Path) -> AppState {
        let db = crate::db::open_for_test(dir).await.unwrap();
        AppState {
            db,
            info: VaultInfo {
                subscription: "s".into(),
                resource_group: "rg".into(),
                name: "v".into(),
                location: "local".into(),
            },
            agent_ca: siterec_pki::Ca::generate("test agent CA").unwrap(),
            vault_ca: siterec_pki::Ca::generate("test vault CA").unwrap(),
            agent_url: "https://127.0.0.1:1".into(),
            wake: tokio::sync::Notify::new(),
            changes: tokio::sync::watch::channel(1).0,
            reported: Default::default(),
        }
    }

    async fn new_job(st: &AppState, kind: JobKind, input: Value) -> String {
        let mut tx = crate::db::begin(&st.db).await.unwrap();
        let input = JobInput::parse(kind, &input.to_string()).unwrap();
        let id = create_job(&mut tx, &input, "T", "t", "/t").await.unwrap();
        tx.commit().await.unwrap();
        id
    }

    async fn steps(st: &AppState, job: &str) -> Vec<String> {
        sqlx::query_scalar("SELECT state FROM job_steps WHERE job_id = $1 ORDER BY idx")
            .bind(job)
            .fetch_all(&st.db)
            .await
            .unwrap()
    }

    async fn job_state(st: &AppState, job: &str) -> String {
        sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
            .bind(job)
            .fetch_one(&st.db)
            .await
            .unwrap()
    }

    async fn item_state(st: &AppState, item: &str) -> String {
        sqlx::query_scalar("SELECT state FROM protected_items WHERE name = $1")
            .bind(item)
            .fetch_one(&st.db)
            .await
            .unwrap()
    }

    async fn exec(st: &AppState, sql: &'static str) {
        sqlx::raw_sql(sql).execute(&st.db).await.unwrap();
    }

    #[tokio::test]
    async fn a_policy_job_runs_every_step_and_persists_them() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        let policy = siterec_core::policy::Policy::from_arm_input(
            &json!({"instanceType": "HyperVReplicaAzure", "replicationInterval": 30}),
        )
        .unwrap();
        let job = new_job(
            &st,
            JobKind::CreatePolicy,
            json!({"name": "p1", "policy": policy}),
        )
        .await;
        assert_eq!(job_state(&st, &job).await, "NotStarted");
        advance(&st, &job).await.unwrap();
        assert_eq!(job_state(&st, &job).await, "Succeeded");
        assert_eq!(steps(&st, &job).await, ["Succeeded", "Succeeded"]);
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM policies WHERE name = 'p1'")
            .fetch_one(&st.db)
            .await
            .unwrap();
        assert_eq!(n, 1);
        // Advancing a finished job changes nothing.
        advance(&st, &job).await.unwrap();
        assert_eq!(job_state(&st, &job).await, "Succeeded");
    }

    async fn protected_setup(st: &AppState, state: &str) {
        let now = now_ms();
        exec(
            st,
            "INSERT INTO fabrics (name, created_ms) VALUES ('primary', 0), ('recovery', 0)",
        )
        .await;
        exec(st, "INSERT INTO containers (fabric, name, created_ms) VALUES ('primary', 'pc', 0), ('recovery', 'rc', 0)").await;
        exec(st, r#"INSERT INTO policies (name, body, created_ms) VALUES ('pol', '{"instanceType":"HyperVReplicaAzure","copyFrequencySecs":30,"retention":{"kind":"hours","hours":1},"appConsistentFrequencyHours":0,"compression":true,"initialReplicationStart":null}', 0)"#).await;
        exec(st, r#"INSERT INTO machines (fabric, container, name, agent_id, info, updated_ms) VALUES ('primary', 'pc', 'm1', 'agent-src', '{"name":"m1","kind":"PhysicalServer","disks":[]}', 0)"#).await;
        sqlx::query("INSERT INTO agents (id, fabric, hostname, key_id, cloud, data_url, version, enrolled_ms, last_seen_ms) VALUES ('agent-tgt', 'recovery', 'h', 'k', 'rc', 'https://127.0.0.1:2', '0', 0, $1)")
            .bind(now)
            .execute(&st.db)
            .await
            .unwrap();
        sqlx::query("INSERT INTO protected_items (name, fabric, container, machine, policy, target_fabric, target_container, state, created_ms, updated_ms) VALUES ('i1', 'primary', 'pc', 'm1', 'pol', 'recovery', 'rc', $1, 0, 0)")
            .bind(state)
            .execute(&st.db)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn enable_protection_waits_for_initial_replication_and_resumes_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let job;
        {
            let st = open(dir.path()).await;
            protected_setup(&st, "EnablingProtection").await;
            job = new_job(&st, JobKind::EnableProtection, json!({"item": "i1"})).await;
            advance(&st, &job).await.unwrap();
            // Target chosen, replication enabled, waiting for the first point.
            assert_eq!(
                steps(&st, &job).await,
                [
                    "Succeeded",
                    "Succeeded",
                    "Succeeded",
                    "InProgress",
                    "NotStarted"
                ]
            );
            assert_eq!(job_state(&st, &job).await, "InProgress");
            assert_eq!(item_state(&st, "i1").await, "InitialReplicationInProgress");
            let target: Option<String> =
                sqlx::query_scalar("SELECT target_agent_id FROM protected_items WHERE name = 'i1'")
                    .fetch_one(&st.db)
                    .await
                    .unwrap();
            assert_eq!(target.as_deref(), Some("agent-tgt"));
            advance(&st, &job).await.unwrap();
            assert_eq!(
                job_state(&st, &job).await,
                "InProgress",
                "still waiting without a point"
            );
            st.db.close().await;
        }
        // A new vault process on the same database picks the job up.
        let st = open(dir.path()).await;
        exec(&st, "INSERT INTO recovery_points (item, point_id, created_ms, consistency, bytes_sent, bytes_read, reported_ms) VALUES ('i1', 'p1', 1, 'CrashConsistent', 0, 0, 1)").await;
        advance(&st, &job).await.unwrap();
        assert_eq!(job_state(&st, &job).await, "Succeeded");
        assert_eq!(steps(&st, &job).await, ["Succeeded"; 5]);
        assert_eq!(item_state(&st, "i1").await, "Protected");
    }

    #[tokio::test]
    async fn jobs_of_other_builds_resume_at_their_step_or_fail_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        protected_setup(&st, "Protected").await;
        // A commit written before steps were named (no step key), stopped
        // after its first step: it resumes at the second, by index.
        exec(
            &st,
            "UPDATE protected_items SET state = 'FailoverCommitInProgress' WHERE name = 'i1'",
        )
        .await;
        exec(&st, r#"INSERT INTO jobs (id, kind, state, target_type, target_name, target_id, input, created_ms, seq) VALUES ('old', 'CommitFailover', 'InProgress', 'T', 'i1', '/t', '{"item":"i1"}', 0, 1)"#).await;
        exec(&st, "INSERT INTO job_steps (job_id, idx, name, state) VALUES ('old', 0, 'Prerequisites check for commit', 'Succeeded'), ('old', 1, 'Commit the failover', 'NotStarted')").await;
        advance(&st, "old").await.unwrap();
        assert_eq!(job_state(&st, "old").await, "Succeeded");
        assert_eq!(item_state(&st, "i1").await, "FailoverCommitted");
        // A step this build does not know fails the job, saying why.
        exec(&st, r#"INSERT INTO jobs (id, kind, state, target_type, target_name, target_id, input, created_ms, seq) VALUES ('future', 'CommitFailover', 'InProgress', 'T', 'i1', '/t', '{"item":"i1"}', 0, 2)"#).await;
        exec(&st, "INSERT INTO job_steps (job_id, idx, name, step, state) VALUES ('future', 0, 'x', 'CheckCommit', 'Succeeded'), ('future', 1, 'y', 'CommitTwice', 'NotStarted')").await;
        advance(&st, "future").await.unwrap();
        assert_eq!(job_state(&st, "future").await, "Failed");
        assert_eq!(steps(&st, "future").await, ["Succeeded", "Failed"]);
        let (code, msg): (String, String) =
            sqlx::query_as("SELECT error_code, error_message FROM jobs WHERE id = 'future'")
                .fetch_one(&st.db)
                .await
                .unwrap();
        assert_eq!(code, "StepNotRunnable");
        assert!(
            msg.contains("CommitTwice") && msg.contains("run the operation again"),
            "{msg}"
        );
        // An input that does not read as its kind's, and a kind this build
        // does not know: failed, not retried forever.
        exec(&st, r#"INSERT INTO jobs (id, kind, state, target_type, target_name, target_id, input, created_ms, seq) VALUES ('junk', 'UnplannedFailover', 'NotStarted', 'T', 'i1', '/t', '{"item":"i1"}', 0, 3), ('alien', 'Teleport', 'NotStarted', 'T', 'i1', '/t', '{}', 0, 4)"#).await;
        exec(&st, "INSERT INTO job_steps (job_id, idx, name, step, state) VALUES ('junk', 0, 'x', 'CheckFailover', 'NotStarted')").await;
        for (job, words) in [("junk", "pointId"), ("alien", "Teleport")] {
            advance(&st, job).await.unwrap();
            assert_eq!(job_state(&st, job).await, "Failed");
            let (code, msg): (String, String) =
                sqlx::query_as("SELECT error_code, error_message FROM jobs WHERE id = $1")
                    .bind(job)
                    .fetch_one(&st.db)
                    .await
                    .unwrap();
            assert_eq!(code, "JobNotReadable");
            assert!(msg.contains(words), "{msg}");
        }
        assert_eq!(steps(&st, "junk").await, ["Cancelled"]);
        // New jobs store each step's key beside its title.
        let job = new_job(&st, JobKind::CommitFailover, json!({"item": "i1"})).await;
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT step, name FROM job_steps WHERE job_id = $1 ORDER BY idx")
                .bind(&job)
                .fetch_all(&st.db)
                .await
                .unwrap();
        assert_eq!(
            rows,
            [
                (
                    "CheckCommit".to_string(),
                    "Prerequisites check for commit".to_string()
                ),
                ("Commit".to_string(), "Commit the failover".to_string())
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_failover_returns_the_item_to_protected() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        protected_setup(&st, "UnplannedFailoverInProgress").await;
        let job = new_job(
            &st,
            JobKind::UnplannedFailover,
            json!({"item": "i1", "pointId": "gone"}),
        )
        .await;
        advance(&st, &job).await.unwrap();
        assert_eq!(job_state(&st, &job).await, "Failed");
        assert_eq!(
            steps(&st, &job).await,
            ["Failed", "Cancelled", "Cancelled", "Cancelled"]
        );
        assert_eq!(item_state(&st, "i1").await, "Protected");
        let (code, msg): (String, String) =
            sqlx::query_as("SELECT error_code, error_message FROM jobs WHERE id = $1")
                .bind(&job)
                .fetch_one(&st.db)
                .await
                .unwrap();
        assert_eq!(code, "RecoveryPointNotFound");
        assert!(msg.contains("'gone'"), "{msg}");
    }

    #[tokio::test]
    async fn failover_hands_materialization_to_the_target_agent_and_waits_for_its_result() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        protected_setup(&st, "UnplannedFailoverInProgress").await;
        exec(
            &st,
            "UPDATE protected_items SET target_agent_id = 'agent-tgt'",
        )
        .await;
        exec(&st, "INSERT INTO recovery_points (item, point_id, created_ms, consistency, bytes_sent, bytes_read, reported_ms) VALUES ('i1', 'p1', 1, 'CrashConsistent', 0, 0, 1)").await;
        let job = new_job(
            &st,
            JobKind::UnplannedFailover,
            json!({"item": "i1", "pointId": "p1"}),
        )
        .await;
        advance(&st, &job).await.unwrap();
        advance(&st, &job).await.unwrap(); // idempotent: one task only
        let tasks: Vec<(String, String)> = sqlx::query_as("SELECT agent_id, work FROM agent_tasks")
            .fetch_all(&st.db)
            .await
            .unwrap();
        assert_eq!(tasks.len(), 1);
        assert_eq!(tasks[0].0, "agent-tgt");
        assert!(
            tasks[0].1.contains("materialize") && tasks[0].1.contains("p1"),
            "{}",
            tasks[0].1
        );
        assert_eq!(job_state(&st, &job).await, "InProgress");
        exec(&st, r#"UPDATE agent_tasks SET state = 'Succeeded', result = '{"ok":true,"output":[{"disk":"d","format":"raw","path":"/x","sizeBytes":1}]}'"#).await;
        advance(&st, &job).await.unwrap();
        assert_eq!(job_state(&st, &job).await, "Succeeded");
        assert_eq!(item_state(&st, "i1").await, "UnplannedFailoverCompleted");
        let out: String =
            sqlx::query_scalar("SELECT failover_output FROM protected_items WHERE name = 'i1'")
                .fetch_one(&st.db)
                .await
                .unwrap();
        assert!(out.contains("/x"));
    }

    /// The sealed recovery key of an encrypted failover reaches the
    /// materialize task, and is gone from the task and the job once the
    /// task has its result; a failed job forgets it too.
    #[tokio::test]
    async fn a_sealed_recovery_key_lives_only_until_the_materialize_task_ends() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        protected_setup(&st, "UnplannedFailoverInProgress").await;
        exec(
            &st,
            "UPDATE protected_items SET target_agent_id = 'agent-tgt'",
        )
        .await;
        exec(&st, "INSERT INTO recovery_points (item, point_id, created_ms, consistency, bytes_sent, bytes_read, reported_ms) VALUES ('i1', 'p1', 1, 'CrashConsistent', 0, 0, 1)").await;
        let sealed = "U1JLVDAwMDE-sealed-box";
        let job = new_job(
            &st,
            JobKind::UnplannedFailover,
            json!({"item": "i1", "pointId": "p1", "sealedKey": sealed}),
        )
        .await;
        advance(&st, &job).await.unwrap();
        let work: String = sqlx::query_scalar("SELECT work FROM agent_tasks")
            .fetch_one(&st.db)
            .await
            .unwrap();
        let task: TaskWork = serde_json::from_str(&work).unwrap();
        match task {
            TaskWork::Materialize { sealed_key, .. } => {
                assert_eq!(sealed_key, Some(SealedKey(sealed.into())));
            }
            other => panic!("{other:?}"),
        }
        assert!(!format!("{:?}", SealedKey(sealed.into())).contains(sealed));
        let holds_key = |st: &AppState| {
            let db = st.db.clone();
            async move {
                let inputs: Vec<String> = sqlx::query_scalar("SELECT input FROM jobs")
                    .fetch_all(&db)
                    .await
                    .unwrap();
                let works: Vec<String> = sqlx::query_scalar("SELECT work FROM agent_tasks")
                    .fetch_all(&db)
                    .await
                    .unwrap();
                inputs.iter().chain(&works).any(|t| t.contains(sealed))
            }
        };
        assert!(holds_key(&st).await);
        exec(
            &st,
            r#"UPDATE agent_tasks SET state = 'Succeeded', result = '{"ok":true,"output":[]}'"#,
        )
        .await;
        advance(&st, &job).await.unwrap();
        assert_eq!(job_state(&st, &job).await, "Succeeded");
        assert!(!holds_key(&st).await, "the sealed key outlived its task");

        // A job that fails before its task ends forgets the key as well.
        exec(
            &st,
            "UPDATE protected_items SET state = 'UnplannedFailoverInProgress'",
        )
        .await;
        let job = new_job(
            &st,
            JobKind::UnplannedFailover,
            json!({"item": "i1", "pointId": "gone", "sealedKey": sealed}),
        )
        .await;
        advance(&st, &job).await.unwrap();
        assert_eq!(job_state(&st, &job).await, "Failed");
        assert!(!holds_key(&st).await);
    }

    /// A protected VM `m1` (eth0 on prod-lan with a MAC, eth1 on backup),
    /// a recovery agent that reports dr-lan and test-net, prod-lan mapped
    /// to dr-lan, and a recovery point p1.
    async fn vm_setup(st: &AppState, state: &str, test_state: &str) {
        protected_setup(st, state).await;
        exec(st, r#"UPDATE machines SET info = '{"name":"m1","kind":"VirtualMachine","disks":[{"name":"vda","path":"/img/m1.qcow2","sizeBytes":1048576}],"nics":[{"name":"eth0","network":"prod-lan","mac":"52:54:00:00:00:01"},{"name":"eth1","network":"backup"}],"vm":{"memoryMib":256,"cpus":1}}' WHERE name = 'm1'"#).await;
        exec(
            st,
            "UPDATE protected_items SET target_agent_id = 'agent-tgt'",
        )
        .await;
        exec(st, "INSERT INTO recovery_points (item, point_id, created_ms, consistency, bytes_sent, bytes_read, reported_ms) VALUES ('i1', 'p1', 1, 'CrashConsistent', 0, 0, 1)").await;
        exec(st, "INSERT INTO networks (fabric, name, agent_id, updated_ms) VALUES ('primary', 'prod-lan', 'agent-src', 0), ('primary', 'backup', 'agent-src', 0), ('recovery', 'dr-lan', 'agent-tgt', 0), ('recovery', 'test-net', 'agent-tgt', 0)").await;
        exec(st, "INSERT INTO network_mappings (fabric, network, name, recovery_fabric, recovery_network, instance_type, state, created_ms) VALUES ('primary', 'prod-lan', 'm-prod', 'recovery', 'dr-lan', 'VmmToVmm', 'Paired', 0)").await;
        sqlx::query("UPDATE protected_items SET test_failover_state = $1")
            .bind(test_state)
            .execute(&st.db)
            .await
            .unwrap();
    }

    async fn only_task(st: &AppState) -> (String, TaskWork) {
        let tasks: Vec<(String, String)> = sqlx::query_as("SELECT agent_id, work FROM agent_tasks")
            .fetch_all(&st.db)
            .await
            .unwrap();
        assert_eq!(tasks.len(), 1, "{tasks:?}");
        (
            tasks[0].0.clone(),
            serde_json::from_str(&tasks[0].1).unwrap(),
        )
    }

    /// The recovery agent answers its task as an agent does.
    async fn answer(st: &AppState, result: Value) {
        let ok = result["ok"] == Value::Bool(true);
        sqlx::query("UPDATE agent_tasks SET state = $1, result = $2")
            .bind(if ok { "Succeeded" } else { "Failed" })
            .bind(result.to_string())
            .execute(&st.db)
            .await
            .unwrap();
    }

    fn replica_started(vm: &str, nics: Value) -> Value {
        json!({"ok": true, "output": {
            "vmName": vm,
            "runDir": format!("/srv/failover/vms/{vm}"),
            "serialLog": format!("/srv/failover/vms/{vm}/serial.log"),
            "disks": [{"disk": "vda", "format": "qcow2", "path": format!("/srv/failover/vms/{vm}/vda.qcow2"), "sizeBytes": 1048576}],
            "nics": nics,
        }})
    }

    async fn item_col(st: &AppState, col: &str) -> Option<String> {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT {col} FROM protected_items WHERE name = 'i1'"
        )))
        .fetch_one(&st.db)
        .await
        .unwrap()
    }

    async fn step_outputs(st: &AppState, job: &str) -> Vec<Option<String>> {
        sqlx::query_scalar("SELECT output FROM job_steps WHERE job_id = $1 ORDER BY idx")
            .bind(job)
            .fetch_all(&st.db)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_test_failover_starts_an_isolated_test_vm_and_the_item_keeps_replicating() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        vm_setup(&st, "Protected", "TestFailoverInitiated").await;
        exec(
            &st,
            "UPDATE protected_items SET test_failover_point_id = 'p1'",
        )
        .await;
        let job = new_job(
            &st,
            JobKind::TestFailover,
            json!({"item": "i1", "pointId": "p1", "vmName": "m1-test"}),
        )
        .await;
        advance(&st, &job).await.unwrap();
        advance(&st, &job).await.unwrap(); // idempotent: one task only
        let (agent, work) = only_task(&st).await;
        assert_eq!(agent, "agent-tgt");
        match work {
            TaskWork::StartReplica {
                item,
                point_id,
                vm_name,
                test,
                vm,
                nics,
                sealed_key,
            } => {
                assert_eq!(
                    (item.as_str(), point_id.as_str(), vm_name.as_str(), test),
                    ("i1", "p1", "m1-test", true)
                );
                assert_eq!((vm.memory_mib, vm.cpus), (256, 1));
                // No network given: every NIC isolated, names and MACs kept.
                assert_eq!(nics.len(), 2);
                assert!(nics.iter().all(|n| n.network.is_none()), "{nics:?}");
                assert_eq!(nics[0].mac.as_deref(), Some("52:54:00:00:00:01"));
                assert_eq!(sealed_key, None);
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            steps(&st, &job).await,
            ["Succeeded", "InProgress", "NotStarted"]
        );
        let out = step_outputs(&st, &job).await[1].clone().unwrap();
        assert!(out.contains("isolated network"), "{out}");
        assert_eq!(item_state(&st, "i1").await, "Protected");

        answer(
            &st,
            replica_started("m1-test", json!([{"name": "eth0"}, {"name": "eth1"}])),
        )
        .await;
        advance(&st, &job).await.unwrap();
        assert_eq!(job_state(&st, &job).await, "Succeeded");
        assert_eq!(item_state(&st, "i1").await, "Protected");
        assert_eq!(
            item_col(&st, "test_failover_state").await.as_deref(),
            Some("TestFailoverCompleted")
        );
        let out = item_col(&st, "test_failover_output").await.unwrap();
        assert!(
            out.contains("/srv/failover/vms/m1-test/serial.log"),
            "{out}"
        );
        let ms: Option<i64> =
            sqlx::query_scalar("SELECT test_failover_ms FROM protected_items WHERE name = 'i1'")
                .fetch_one(&st.db)
                .await
                .unwrap();
        assert!(ms.is_some());

        // The API shows the test VM where a client can find it, and what
        // can be done next.
        let item = crate::model::load_item(&st.db, "i1").await.unwrap();
        let v = serde_json::to_value(
            crate::model::item_json(&st.db, &st.info, &item)
                .await
                .unwrap(),
        )
        .unwrap();
        let p = &v["properties"];
        assert_eq!(p["testFailoverState"], "TestFailoverCompleted");
        assert_eq!(p["protectedItemType"], "VirtualMachine");
        assert_eq!(p["providerSpecificDetails"]["testVm"]["name"], "m1-test");
        assert_eq!(
            p["providerSpecificDetails"]["testVm"]["runDir"],
            "/srv/failover/vms/m1-test"
        );
        assert_eq!(
            p["providerSpecificDetails"]["testVm"]["recoveryPointId"],
            "p1"
        );
        let ops: Vec<&str> = p["allowedOperations"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|o| o.as_str())
            .collect();
        assert!(ops.contains(&"TestFailoverCleanup") && ops.contains(&"UnplannedFailover"));
        assert!(!ops.contains(&"TestFailover"));
        let nics = p["providerSpecificDetails"]["vmNics"].as_array().unwrap();
        assert_eq!(nics[0]["vMNetworkName"], "prod-lan");
        assert_eq!(nics[0]["macAddress"], "52:54:00:00:00:01");
        assert!(
            nics[0]["recoveryVMNetworkId"]
                .as_str()
                .unwrap()
                .ends_with("/replicationFabrics/recovery/replicationNetworks/dr-lan")
        );
        assert_eq!(nics[1]["recoveryVMNetworkId"], Value::Null);
    }

    #[tokio::test]
    async fn a_test_failover_with_a_network_connects_every_nic_to_it() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        vm_setup(&st, "Protected", "TestFailoverInitiated").await;
        let job = new_job(
            &st,
            JobKind::TestFailover,
            json!({"item": "i1", "pointId": "p1", "vmName": "m1-test", "network": "test-net"}),
        )
        .await;
        advance(&st, &job).await.unwrap();
        let (_, work) = only_task(&st).await;
        let TaskWork::StartReplica { nics, .. } = work else {
            panic!("{work:?}")
        };
        let nets: Vec<Option<&str>> = nics.iter().map(|n| n.network.as_deref()).collect();
        assert_eq!(nets, [Some("test-net"), Some("test-net")]);
    }

    #[tokio::test]
    async fn a_vm_fails_over_through_start_replica_with_nics_per_network_mapping() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        vm_setup(&st, "UnplannedFailoverInProgress", "None").await;
        // As the API creates it for a VM.
        let job = new_job(
            &st,
            JobKind::UnplannedFailover,
            json!({"item": "i1", "pointId": "p1", "vm": true, "vmName": "m1"}),
        )
        .await;
        advance(&st, &job).await.unwrap();
        let (_, work) = only_task(&st).await;
        let TaskWork::StartReplica {
            vm_name,
            test,
            nics,
            ..
        } = work
        else {
            panic!("no StartReplica: {work:?}")
        };
        assert_eq!((vm_name.as_str(), test), ("m1", false));
        let nets: Vec<Option<&str>> = nics.iter().map(|n| n.network.as_deref()).collect();
        assert_eq!(nets, [Some("dr-lan"), None]);
        // The step says why eth1 is isolated.
        let out = step_outputs(&st, &job).await[2].clone().unwrap();
        assert!(
            out.contains("eth1") && out.contains("no network mapping for backup"),
            "{out}"
        );
        let job_view = serde_json::to_value(
            crate::model::job_json(&st.db, &st.info, &job)
                .await
                .unwrap(),
        )
        .unwrap();
        let step = &job_view["properties"]["tasks"][2];
        assert_eq!(
            step["name"],
            "Create and start the virtual machine at the recovery site"
        );
        assert!(
            step["customDetails"]["notes"][0]
                .as_str()
                .unwrap()
                .contains("eth1")
        );

        answer(
            &st,
            replica_started(
                "m1",
                json!([{"name": "eth0", "network": "dr-lan"}, {"name": "eth1"}]),
            ),
        )
        .await;
        advance(&st, &job).await.unwrap();
        assert_eq!(job_state(&st, &job).await, "Succeeded");
        assert_eq!(item_state(&st, "i1").await, "UnplannedFailoverCompleted");
        let item = crate::model::load_item(&st.db, "i1").await.unwrap();
        let v = serde_json::to_value(
            crate::model::item_json(&st.db, &st.info, &item)
                .await
                .unwrap(),
        )
        .unwrap();
        let d = &v["properties"]["providerSpecificDetails"];
        // The disk listing works as for a physical server, plus the VM.
        assert_eq!(
            d["failoverDisks"][0]["path"],
            "/srv/failover/vms/m1/vda.qcow2"
        );
        assert_eq!(d["failoverVm"]["name"], "m1");
        assert_eq!(
            d["failoverVm"]["serialLog"],
            "/srv/failover/vms/m1/serial.log"
        );
    }

    #[tokio::test]
    async fn cleanup_removes_the_test_vm_and_clears_what_the_item_showed() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        vm_setup(&st, "Protected", "TestFailoverCleanupInitiated").await;
        exec(&st, r#"UPDATE protected_items SET test_failover_output = '{"vmName":"m1-test","runDir":"/r","serialLog":"/r/s","disks":[],"nics":[]}', test_failover_point_id = 'p1'"#).await;
        let job = new_job(
            &st,
            JobKind::TestFailoverCleanup,
            json!({"item": "i1", "vmName": "m1-test", "comments": "looked fine"}),
        )
        .await;
        advance(&st, &job).await.unwrap();
        advance(&st, &job).await.unwrap();
        let (agent, work) = only_task(&st).await;
        assert_eq!(agent, "agent-tgt");
        assert_eq!(
            work,
            TaskWork::RemoveReplica {
                item: "i1".into(),
                vm_name: "m1-test".into()
            }
        );
        assert_eq!(job_state(&st, &job).await, "InProgress");
        answer(&st, json!({"ok": true})).await;
        advance(&st, &job).await.unwrap();
        assert_eq!(job_state(&st, &job).await, "Succeeded");
        assert_eq!(steps(&st, &job).await, ["Succeeded"; 3]);
        assert_eq!(
            item_col(&st, "test_failover_state").await.as_deref(),
            Some("None")
        );
        assert_eq!(item_col(&st, "test_failover_output").await, None);
        assert_eq!(item_col(&st, "test_failover_point_id").await, None);
        assert_eq!(item_state(&st, "i1").await, "Protected");
    }

    #[tokio::test]
    async fn failed_test_failovers_and_cleanups_leave_cleanup_to_do_and_the_item_protected() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        vm_setup(&st, "Protected", "TestFailoverInitiated").await;
        let sealed = "U1JLVDAwMDE-sealed";
        let job = new_job(
            &st,
            JobKind::TestFailover,
            json!({"item": "i1", "pointId": "p1", "vmName": "m1-test", "sealedKey": sealed}),
        )
        .await;
        advance(&st, &job).await.unwrap();
        let (_, work) = only_task(&st).await;
        assert!(
            matches!(work, TaskWork::StartReplica { sealed_key: Some(ref k), .. } if k.0 == sealed)
        );
        answer(
            &st,
            json!({"ok": false, "error": "qemu-system-x86_64: no such file"}),
        )
        .await;
        advance(&st, &job).await.unwrap();
        assert_eq!(job_state(&st, &job).await, "Failed");
        assert_eq!(steps(&st, &job).await, ["Succeeded", "Failed", "Cancelled"]);
        assert_eq!(item_state(&st, "i1").await, "Protected");
        assert_eq!(
            item_col(&st, "test_failover_state").await.as_deref(),
            Some("TestFailoverFailed")
        );
        let err = item_col(&st, "test_failover_error").await.unwrap();
        assert!(err.contains("no such file"), "{err}");
        // The item is not marked unhealthy by a test.
        assert_eq!(item_col(&st, "last_error").await, None);
        // The sealed key is gone from the job and the task.
        let inputs: Vec<String> = sqlx::query_scalar("SELECT input FROM jobs")
            .fetch_all(&st.db)
            .await
            .unwrap();
        let works: Vec<String> = sqlx::query_scalar("SELECT work FROM agent_tasks")
            .fetch_all(&st.db)
            .await
            .unwrap();
        assert!(!inputs.iter().chain(&works).any(|t| t.contains(sealed)));

        // A cleanup the agent cannot do is marked for deletion, to retry.
        exec(
            &st,
            "UPDATE protected_items SET test_failover_state = 'TestFailoverCleanupInitiated'",
        )
        .await;
        exec(&st, "DELETE FROM agent_tasks").await;
        let job = new_job(
            &st,
            JobKind::TestFailoverCleanup,
            json!({"item": "i1", "vmName": "m1-test"}),
        )
        .await;
        advance(&st, &job).await.unwrap();
        answer(&st, json!({"ok": false, "error": "cannot kill pid 7"})).await;
        advance(&st, &job).await.unwrap();
        assert_eq!(job_state(&st, &job).await, "Failed");
        assert_eq!(
            item_col(&st, "test_failover_state").await.as_deref(),
            Some("MarkedForDeletion")
        );
        assert_eq!(item_state(&st, "i1").await, "Protected");
    }

    #[tokio::test]
    async fn a_network_mapping_is_paired_by_its_job_or_dropped_if_its_network_went_away() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        exec(&st, "INSERT INTO networks (fabric, name, agent_id, updated_ms) VALUES ('recovery', 'dr-lan', 'a', 0)").await;
        exec(&st, "INSERT INTO network_mappings (fabric, network, name, recovery_fabric, recovery_network, instance_type, state, created_ms) VALUES ('primary', 'prod-lan', 'm1', 'recovery', 'dr-lan', 'VmmToVmm', 'Pairing', 0), ('primary', 'gone-lan', 'm2', 'recovery', 'gone', 'VmmToVmm', 'Pairing', 0)").await;
        let input = |net: &str, name: &str, rn: &str| json!({"fabric": "primary", "network": net, "name": name, "recoveryFabric": "recovery", "recoveryNetwork": rn});
        let ok_job = new_job(
            &st,
            JobKind::CreateNetworkMapping,
            input("prod-lan", "m1", "dr-lan"),
        )
        .await;
        advance(&st, &ok_job).await.unwrap();
        assert_eq!(job_state(&st, &ok_job).await, "Succeeded");
        let bad_job = new_job(
            &st,
            JobKind::CreateNetworkMapping,
            input("gone-lan", "m2", "gone"),
        )
        .await;
        advance(&st, &bad_job).await.unwrap();
        assert_eq!(job_state(&st, &bad_job).await, "Failed");
        let rows: Vec<(String, String)> =
            sqlx::query_as("SELECT name, state FROM network_mappings ORDER BY name")
                .fetch_all(&st.db)
                .await
                .unwrap();
        assert_eq!(rows, [("m1".to_string(), "Paired".to_string())]);

        // Removal is a job too.
        exec(&st, "UPDATE network_mappings SET state = 'Unpairing'").await;
        let del = new_job(
            &st,
            JobKind::DeleteNetworkMapping,
            json!({"fabric": "primary", "network": "prod-lan", "name": "m1"}),
        )
        .await;
        advance(&st, &del).await.unwrap();
        assert_eq!(job_state(&st, &del).await, "Succeeded");
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM network_mappings")
            .fetch_one(&st.db)
            .await
            .unwrap();
        assert_eq!(n, 0);
    }

    /// A group's items keep their points in one replica store: a new
    /// member replicates to the recovery agent its group already uses,
    /// even when another one would be picked otherwise.
    #[tokio::test]
    async fn a_group_member_replicates_to_the_recovery_agent_of_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        protected_setup(&st, "Protected").await;
        let now = now_ms();
        // agent-tgt2 was heard from last: the pick for an item in no group.
        sqlx::query("INSERT INTO agents (id, fabric, hostname, key_id, cloud, data_url, version, enrolled_ms, last_seen_ms) VALUES ('agent-tgt2', 'recovery', 'h2', 'k', 'rc', 'https://127.0.0.1:3', '0', 0, $1)")
            .bind(now + 1)
            .execute(&st.db)
            .await
            .unwrap();
        exec(&st, "UPDATE protected_items SET multi_vm_group = 'app', target_agent_id = 'agent-tgt' WHERE name = 'i1'").await;
        exec(&st, r#"INSERT INTO machines (fabric, container, name, agent_id, info, updated_ms) VALUES ('primary', 'pc', 'm2', 'agent-src', '{"name":"m2","kind":"PhysicalServer","disks":[]}', 0), ('primary', 'pc', 'm3', 'agent-src', '{"name":"m3","kind":"PhysicalServer","disks":[]}', 0)"#).await;
        exec(&st, "INSERT INTO protected_items (name, fabric, container, machine, policy, target_fabric, target_container, state, multi_vm_group, created_ms, updated_ms) VALUES ('i2', 'primary', 'pc', 'm2', 'pol', 'recovery', 'rc', 'EnablingProtection', 'App', 1, 1), ('i3', 'primary', 'pc', 'm3', 'pol', 'recovery', 'rc', 'EnablingProtection', NULL, 1, 1)").await;
        for item in ["i2", "i3"] {
            let job = new_job(&st, JobKind::EnableProtection, json!({"item": item})).await;
            advance(&st, &job).await.unwrap();
            assert_eq!(item_state(&st, item).await, "InitialReplicationInProgress");
        }
        let targets: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT name, target_agent_id FROM protected_items ORDER BY name")
                .fetch_all(&st.db)
                .await
                .unwrap();
        let t = |i: &str, a: &str| (i.to_string(), Some(a.to_string()));
        assert_eq!(
            targets,
            [
                t("i1", "agent-tgt"),
                t("i2", "agent-tgt"),
                t("i3", "agent-tgt2")
            ]
        );
        // The group's agent gone silent: the member goes where it can.
        exec(
            &st,
            "UPDATE agents SET last_seen_ms = 0 WHERE id = 'agent-tgt'",
        )
        .await;
        exec(&st, r#"INSERT INTO machines (fabric, container, name, agent_id, info, updated_ms) VALUES ('primary', 'pc', 'm4', 'agent-src', '{"name":"m4","kind":"PhysicalServer","disks":[]}', 0)"#).await;
        exec(&st, "INSERT INTO protected_items (name, fabric, container, machine, policy, target_fabric, target_container, state, multi_vm_group, created_ms, updated_ms) VALUES ('i4', 'primary', 'pc', 'm4', 'pol', 'recovery', 'rc', 'EnablingProtection', 'app', 2, 2)").await;
        let job = new_job(&st, JobKind::EnableProtection, json!({"item": "i4"})).await;
        advance(&st, &job).await.unwrap();
        let t4: Option<String> =
            sqlx::query_scalar("SELECT target_agent_id FROM protected_items WHERE name = 'i4'")
                .fetch_one(&st.db)
                .await
                .unwrap();
        assert_eq!(t4.as_deref(), Some("agent-tgt2"));
    }
}
