//! The durable job engine.
//!
//! A job is a row in `jobs` with one row per step in `job_steps`. The API
//! validates a request, then creates the job (and whatever rows it needs)
//! in one transaction and answers 202. The engine advances jobs step by
//! step: each step's effects and its completion are committed in one
//! transaction, and every step is idempotent, so a vault killed at any
//! moment resumes its jobs from the first unfinished step on restart.
//!
//! A step either finishes, waits (for an agent's task result, a recovery
//! point, ...) or fails; a failed step fails the job and runs the job's
//! compensation (for example an aborted failover returns the item to
//! Protected). Database errors are treated as transient: the step is tried
//! again on the next round.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::{Any, Row, Transaction};

use crate::AppState;
use crate::db::now_ms;
use crate::model::AGENT_ONLINE_MS;
use siterec_core::network::{NicPlan, resolve_nics};
use siterec_core::state::{
    ItemAction, JobKind, JobState, ProtectionState, TestAction, TestFailoverState,
};
use siterec_core::wire::{MachineInfo, ReplicaStarted, SealedKey, TaskWork};

type Tx<'a> = Transaction<'a, Any>;

/// How long a step waits for an agent that is not heard from before failing.
const AGENT_WAIT_MS: i64 = 5 * 60_000;

enum Step {
    Done,
    Wait,
    Fail { code: &'static str, message: String },
}

fn fail(code: &'static str, message: impl Into<String>) -> Step {
    Step::Fail {
        code,
        message: message.into(),
    }
}

/// Creates a job and its steps (NotStarted) inside the caller's transaction.
pub async fn create_job(
    tx: &mut Tx<'_>,
    kind: JobKind,
    target_type: &str,
    target_name: &str,
    target_id: &str,
    input: &Value,
) -> Result<String, sqlx::Error> {
    create_job_with_steps(
        tx,
        kind,
        kind.steps(),
        target_type,
        target_name,
        target_id,
        input,
    )
    .await
}

/// [`create_job`] with step names of the caller's choice (a VM's failover
/// names its steps differently); the engine runs steps by index, so they
/// must be as many as the kind's.
pub async fn create_job_with_steps(
    tx: &mut Tx<'_>,
    kind: JobKind,
    steps: &[&str],
    target_type: &str,
    target_name: &str,
    target_id: &str,
    input: &Value,
) -> Result<String, sqlx::Error> {
    debug_assert_eq!(steps.len(), kind.steps().len());
    let id = uuid::Uuid::new_v4().to_string();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO jobs (id, kind, state, target_type, target_name, target_id, input, created_ms, seq) VALUES ($1, $2, 'NotStarted', $3, $4, $5, $6, $7, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs))",
    )
    .bind(&id)
    .bind(kind.as_str())
    .bind(target_type)
    .bind(target_name)
    .bind(target_id)
    .bind(input.to_string())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    for (idx, name) in steps.iter().enumerate() {
        sqlx::query(
            "INSERT INTO job_steps (job_id, idx, name, state) VALUES ($1, $2, $3, 'NotStarted')",
        )
        .bind(&id)
        .bind(idx as i64)
        .bind(*name)
        .execute(&mut **tx)
        .await?;
    }
    Ok(id)
}

/// Runs until the task is aborted: advances every unfinished job, then
/// sleeps until woken or for a second.
pub async fn run_engine(st: crate::Shared) {
    loop {
        match active_jobs(&st).await {
            Ok(ids) => {
                for id in ids {
                    if let Err(e) = advance(&st, &id).await {
                        tracing::warn!(job = %id, "job step will be retried: {e:#}");
                    }
                }
            }
            Err(e) => tracing::warn!("listing jobs: {e:#}"),
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), st.wake.notified()).await;
    }
}

async fn active_jobs(st: &AppState) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM jobs WHERE state IN ('NotStarted', 'InProgress') ORDER BY created_ms",
    )
    .fetch_all(&st.db)
    .await
}

async fn advance(st: &AppState, job_id: &str) -> anyhow::Result<()> {
    loop {
        let mut tx = crate::db::begin(&st.db).await?;
        let row = sqlx::query("SELECT kind, state, input FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_one(&mut *tx)
            .await?;
        let kind_s: String = row.try_get("kind")?;
        let state_s: String = row.try_get("state")?;
        let input: Value = serde_json::from_str(&row.try_get::<String, _>("input")?)?;
        let Some(kind) = JobKind::parse(&kind_s) else {
            anyhow::bail!("unknown job kind {kind_s}");
        };
        let state = JobState::parse(&state_s).unwrap_or(JobState::Failed);
        if state.is_terminal() {
            return Ok(());
        }
        let now = now_ms();
        if state == JobState::NotStarted {
            sqlx::query("UPDATE jobs SET state = 'InProgress', start_ms = $1 WHERE id = $2")
                .bind(now)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
        }
        let step: Option<(i64, String, Option<i64>)> = sqlx::query_as(
            "SELECT idx, state, start_ms FROM job_steps WHERE job_id = $1 AND state IN ('NotStarted', 'InProgress') ORDER BY idx LIMIT 1",
        )
        .bind(job_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((idx, step_state, step_start)) = step else {
            sqlx::query("UPDATE jobs SET state = 'Succeeded', end_ms = $1 WHERE id = $2")
                .bind(now)
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
            forget_sealed_key(&mut tx, job_id).await?;
            tx.commit().await?;
            return Ok(());
        };
        let started = step_start.unwrap_or(now);
        if step_state == "NotStarted" {
            sqlx::query("UPDATE job_steps SET state = 'InProgress', start_ms = $1 WHERE job_id = $2 AND idx = $3")
                .bind(now)
                .bind(job_id)
                .bind(idx)
                .execute(&mut *tx)
                .await?;
        }
        let ctx = StepCtx {
            job_id,
            idx,
            input: &input,
            started_ms: started,
            now_ms: now,
        };
        let outcome = run_step(&ctx, &mut tx, kind, idx as usize).await?;
        match outcome {
            Step::Done => {
                sqlx::query("UPDATE job_steps SET state = 'Succeeded', end_ms = $1 WHERE job_id = $2 AND idx = $3")
                    .bind(now_ms())
                    .bind(job_id)
                    .bind(idx)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
            }
            Step::Wait => {
                tx.commit().await?;
                return Ok(());
            }
            Step::Fail { code, message } => {
                let end = now_ms();
                sqlx::query("UPDATE job_steps SET state = 'Failed', end_ms = $1, error = $2 WHERE job_id = $3 AND idx = $4")
                    .bind(end)
                    .bind(&message)
                    .bind(job_id)
                    .bind(idx)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE job_steps SET state = 'Cancelled' WHERE job_id = $1 AND state = 'NotStarted'")
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE jobs SET state = 'Failed', end_ms = $1, error_code = $2, error_message = $3 WHERE id = $4")
                    .bind(end)
                    .bind(code)
                    .bind(&message)
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                compensate(&mut tx, kind, &input, &message).await?;
                forget_sealed_key(&mut tx, job_id).await?;
                tx.commit().await?;
                tracing::warn!(job = %job_id, "job failed: {message}");
                return Ok(());
            }
        }
    }
}

struct StepCtx<'a> {
    job_id: &'a str,
    /// The step's index.
    idx: i64,
    input: &'a Value,
    started_ms: i64,
    now_ms: i64,
}

impl StepCtx<'_> {
    fn str(&self, key: &str) -> anyhow::Result<String> {
        self.input
            .get(key)
            .and_then(|v| v.as_str())
            .map(str::to_string)
            .ok_or_else(|| anyhow::anyhow!("job input lacks {key}"))
    }
}

async fn run_step(
    ctx: &StepCtx<'_>,
    tx: &mut Tx<'_>,
    kind: JobKind,
    idx: usize,
) -> anyhow::Result<Step> {
    match (kind, idx) {
        (JobKind::CreatePolicy, 0) => {
            let policy: siterec_core::policy::Policy =
                serde_json::from_value(ctx.input["policy"].clone())?;
            Ok(match policy.validate() {
                Ok(()) => Step::Done,
                Err(e) => fail("InvalidPolicy", e.to_string()),
            })
        }
        (JobKind::CreatePolicy, 1) => {
            let name = ctx.str("name")?;
            sqlx::query(
                "INSERT INTO policies (name, body, created_ms) VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET body = excluded.body",
            )
            .bind(&name)
            .bind(ctx.input["policy"].to_string())
            .bind(ctx.now_ms)
            .execute(&mut **tx)
            .await?;
            Ok(Step::Done)
        }
        (JobKind::ConfigureProtection, 0) => {
            let policy = ctx.str("policy")?;
            let exists: Option<String> =
                sqlx::query_scalar("SELECT name FROM policies WHERE name = $1")
                    .bind(&policy)
                    .fetch_optional(&mut **tx)
                    .await?;
            Ok(if exists.is_some() {
                Step::Done
            } else {
                fail(
                    "PolicyNotFound",
                    format!("replication policy '{policy}' no longer exists"),
                )
            })
        }
        (JobKind::ConfigureProtection, 1) => {
            sqlx::query("UPDATE container_mappings SET state = 'Paired' WHERE fabric = $1 AND container = $2 AND name = $3")
                .bind(ctx.str("fabric")?)
                .bind(ctx.str("container")?)
                .bind(ctx.str("name")?)
                .execute(&mut **tx)
                .await?;
            Ok(Step::Done)
        }
        (JobKind::EnableProtection, 0) => enable_prereq(ctx, tx).await,
        (JobKind::EnableProtection, 1) => identify_target(ctx, tx).await,
        (JobKind::EnableProtection, 2) => {
            transition(tx, &ctx.str("item")?, ItemAction::StartInitialReplication).await?;
            Ok(Step::Done)
        }
        (JobKind::EnableProtection, 3) => {
            let item = ctx.str("item")?;
            let points: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM recovery_points WHERE item = $1 AND pruned_ms IS NULL",
            )
            .bind(&item)
            .fetch_one(&mut **tx)
            .await?;
            Ok(if points > 0 { Step::Done } else { Step::Wait })
        }
        (JobKind::EnableProtection, 4) => {
            transition(tx, &ctx.str("item")?, ItemAction::FinishInitialReplication).await?;
            Ok(Step::Done)
        }
        (JobKind::UnplannedFailover, 0) => failover_prereq(ctx, tx).await,
        // Replication stops as soon as the item leaves the replicating
        // states (the API moved it there): source agents drop it from their
        // next heartbeat's assignments, and late points are refused.
        (JobKind::UnplannedFailover, 1) => Ok(Step::Done),
        // A VM is created and started at the recovery site; a physical
        // server's disks are written as images.
        (JobKind::UnplannedFailover, 2) if ctx.input["vm"] == Value::Bool(true) => {
            start_replica(ctx, tx, false).await
        }
        (JobKind::UnplannedFailover, 2) => materialize(ctx, tx).await,
        (JobKind::UnplannedFailover, 3) => {
            let item = ctx.str("item")?;
            transition(tx, &item, ItemAction::FinishUnplannedFailover).await?;
            sqlx::query("UPDATE protected_items SET failover_ms = $1, failover_point_id = $2, updated_ms = $3 WHERE name = $4")
                .bind(ctx.now_ms)
                .bind(ctx.str("pointId")?)
                .bind(ctx.now_ms)
                .bind(&item)
                .execute(&mut **tx)
                .await?;
            Ok(Step::Done)
        }
        (JobKind::CommitFailover, 0) => {
            let item = load_state(tx, &ctx.str("item")?).await?;
            Ok(match item {
                Some(
                    ProtectionState::FailoverCommitInProgress | ProtectionState::FailoverCommitted,
                ) => Step::Done,
                other => fail(
                    "InvalidState",
                    format!("the item is {other:?}, not committing a failover"),
                ),
            })
        }
        (JobKind::CommitFailover, 1) => {
            transition(tx, &ctx.str("item")?, ItemAction::FinishCommit).await?;
            Ok(Step::Done)
        }
        (JobKind::VerifyStore, 0) => verify_stores(ctx, tx).await,
        (JobKind::TestFailover, 0) => test_failover_prereq(ctx, tx).await,
        (JobKind::TestFailover, 1) => start_replica(ctx, tx, true).await,
        (JobKind::TestFailover, 2) => {
            let item = ctx.str("item")?;
            test_transition(tx, &item, TestAction::Finish).await?;
            sqlx::query("UPDATE protected_items SET test_failover_ms = $1, test_failover_error = NULL, updated_ms = $2 WHERE name = $3")
                .bind(ctx.now_ms)
                .bind(ctx.now_ms)
                .bind(&item)
                .execute(&mut **tx)
                .await?;
            Ok(Step::Done)
        }
        (JobKind::TestFailoverCleanup, 0) => {
            let item = ctx.str("item")?;
            Ok(match load_test_state(tx, &item).await? {
                Some(TestFailoverState::TestFailoverCleanupInitiated | TestFailoverState::None) => {
                    Step::Done
                }
                other => fail(
                    "InvalidState",
                    format!(
                        "item '{item}' is not cleaning up a test failover (test failover state {other:?})"
                    ),
                ),
            })
        }
        (JobKind::TestFailoverCleanup, 1) => remove_replica(ctx, tx).await,
        (JobKind::TestFailoverCleanup, 2) => {
            let item = ctx.str("item")?;
            test_transition(tx, &item, TestAction::FinishCleanup).await?;
            sqlx::query("UPDATE protected_items SET test_failover_output = NULL, test_failover_point_id = NULL, test_failover_error = NULL, updated_ms = $1 WHERE name = $2")
                .bind(ctx.now_ms)
                .bind(&item)
                .execute(&mut **tx)
                .await?;
            Ok(Step::Done)
        }
        (JobKind::CreateNetworkMapping, 0) => {
            let (rf, rn) = (ctx.str("recoveryFabric")?, ctx.str("recoveryNetwork")?);
            let there: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM networks WHERE fabric = $1 AND name = $2")
                    .bind(&rf)
                    .bind(&rn)
                    .fetch_one(&mut **tx)
                    .await?;
            Ok(if there > 0 {
                Step::Done
            } else {
                fail(
                    "NetworkNotFound",
                    format!(
                        "recovery network '{rn}' is no longer reported by any agent of fabric '{rf}'"
                    ),
                )
            })
        }
        (JobKind::CreateNetworkMapping, 1) => {
            sqlx::query("UPDATE network_mappings SET state = 'Paired' WHERE fabric = $1 AND network = $2 AND name = $3")
                .bind(ctx.str("fabric")?)
                .bind(ctx.str("network")?)
                .bind(ctx.str("name")?)
                .execute(&mut **tx)
                .await?;
            Ok(Step::Done)
        }
        (JobKind::DeleteNetworkMapping, 0) => {
            sqlx::query(
                "DELETE FROM network_mappings WHERE fabric = $1 AND network = $2 AND name = $3",
            )
            .bind(ctx.str("fabric")?)
            .bind(ctx.str("network")?)
            .bind(ctx.str("name")?)
            .execute(&mut **tx)
            .await?;
            Ok(Step::Done)
        }
        (kind, idx) => anyhow::bail!("job kind {kind:?} has no step {idx}"),
    }
}

async fn enable_prereq(ctx: &StepCtx<'_>, tx: &mut Tx<'_>) -> anyhow::Result<Step> {
    let item = ctx.str("item")?;
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT fabric, machine FROM protected_items WHERE name = $1")
            .bind(&item)
            .fetch_optional(&mut **tx)
            .await?;
    let Some((fabric, machine)) = row else {
        return Ok(fail(
            "ItemNotFound",
            format!("protected item '{item}' no longer exists"),
        ));
    };
    let info: Option<String> =
        sqlx::query_scalar("SELECT info FROM machines WHERE fabric = $1 AND name = $2")
            .bind(&fabric)
            .bind(&machine)
            .fetch_optional(&mut **tx)
            .await?;
    let Some(info) = info else {
        return Ok(fail(
            "MachineNotFound",
            format!("machine '{machine}' is no longer reported by any agent of fabric '{fabric}'"),
        ));
    };
    let info: Value = serde_json::from_str(&info)?;
    if let Some(err) = info.get("error").and_then(|e| e.as_str()) {
        return Ok(fail(
            "MachineNotReady",
            format!("machine '{machine}' cannot be protected: {err}"),
        ));
    }
    Ok(Step::Done)
}

async fn identify_target(ctx: &StepCtx<'_>, tx: &mut Tx<'_>) -> anyhow::Result<Step> {
    let item = ctx.str("item")?;
    let (tf, tc, current, policy): (String, String, Option<String>, String) =
        sqlx::query_as("SELECT target_fabric, target_container, target_agent_id, policy FROM protected_items WHERE name = $1")
            .bind(&item)
            .fetch_one(&mut **tx)
            .await?;
    if current.is_some() {
        return Ok(Step::Done);
    }
    // A policy that encrypts data stored needs an encrypted replica store.
    let body: Option<String> = sqlx::query_scalar("SELECT body FROM policies WHERE name = $1")
        .bind(&policy)
        .fetch_optional(&mut **tx)
        .await?;
    let encrypt = body
        .and_then(|b| serde_json::from_str::<siterec_core::policy::Policy>(&b).ok())
        .is_some_and(|p| p.encryption);
    // A multi-VM group keeps its points in one replica store: a member
    // goes to the recovery agent the group's other members replicate to,
    // while that agent can take it; else to any that can.
    let group_agent: Option<String> = sqlx::query_scalar(
        "SELECT a.id FROM protected_items i
         JOIN protected_items g ON g.multi_vm_group = i.multi_vm_group AND g.name <> i.name
         JOIN agents a ON a.id = g.target_agent_id
         WHERE i.name = $1 AND a.fabric = $2 AND a.cloud = $3 AND a.data_url IS NOT NULL AND a.last_seen_ms > $4 AND (a.store_encrypted = 1 OR $5 = 0)
         ORDER BY g.created_ms, g.name LIMIT 1",
    )
    .bind(&item)
    .bind(&tf)
    .bind(&tc)
    .bind(ctx.now_ms - AGENT_ONLINE_MS)
    .bind(i64::from(encrypt))
    .fetch_optional(&mut **tx)
    .await?;
    let agent: Option<String> = match group_agent {
        Some(a) => Some(a),
        None => sqlx::query_scalar(
            "SELECT id FROM agents WHERE fabric = $1 AND cloud = $2 AND data_url IS NOT NULL AND last_seen_ms > $3 AND (store_encrypted = 1 OR $4 = 0) ORDER BY last_seen_ms DESC LIMIT 1",
        )
        .bind(&tf)
        .bind(&tc)
        .bind(ctx.now_ms - AGENT_ONLINE_MS)
        .bind(i64::from(encrypt))
        .fetch_optional(&mut **tx)
        .await?,
    };
    match agent {
        Some(agent) => {
            sqlx::query(
                "UPDATE protected_items SET target_agent_id = $1, updated_ms = $2 WHERE name = $3",
            )
            .bind(agent)
            .bind(ctx.now_ms)
            .bind(&item)
            .execute(&mut **tx)
            .await?;
            Ok(Step::Done)
        }
        None if ctx.now_ms - ctx.started_ms > AGENT_WAIT_MS => Ok(fail(
            "NoRecoveryAgent",
            format!(
                "no agent of recovery cloud {tf}/{tc} with a replica store has been heard from; start the recovery site's agent and enable protection again"
            ),
        )),
        None => Ok(Step::Wait),
    }
}

/// Done while the recovery point a failover uses is listed (not pruned).
async fn point_still_there(tx: &mut Tx<'_>, item: &str, point: &str) -> anyhow::Result<Step> {
    let pruned: Option<Option<i64>> = sqlx::query_scalar(
        "SELECT pruned_ms FROM recovery_points WHERE item = $1 AND point_id = $2",
    )
    .bind(item)
    .bind(point)
    .fetch_optional(&mut **tx)
    .await?;
    Ok(match pruned {
        Some(None) => Step::Done,
        _ => fail(
            "RecoveryPointNotFound",
            format!("recovery point '{point}' of item '{item}' no longer exists"),
        ),
    })
}

async fn failover_prereq(ctx: &StepCtx<'_>, tx: &mut Tx<'_>) -> anyhow::Result<Step> {
    let item = ctx.str("item")?;
    let point = ctx.str("pointId")?;
    match load_state(tx, &item).await? {
        Some(
            ProtectionState::UnplannedFailoverInProgress
            | ProtectionState::UnplannedFailoverCompleted,
        ) => {}
        other => {
            return Ok(fail(
                "InvalidState",
                format!("the item is {other:?}, not failing over"),
            ));
        }
    }
    point_still_there(tx, &item, &point).await
}

async fn materialize(ctx: &StepCtx<'_>, tx: &mut Tx<'_>) -> anyhow::Result<Step> {
    let item = ctx.str("item")?;
    let point = ctx.str("pointId")?;
    let agent: Option<String> =
        sqlx::query_scalar("SELECT target_agent_id FROM protected_items WHERE name = $1")
            .bind(&item)
            .fetch_one(&mut **tx)
            .await?;
    let Some(agent) = agent else {
        return Ok(fail(
            "NoRecoveryAgent",
            format!("item '{item}' has no recovery agent"),
        ));
    };
    let task_id = format!("{}-materialize", ctx.job_id);
    let work = TaskWork::Materialize {
        item: item.clone(),
        point_id: point,
        formats: vec!["raw".into(), "qcow2".into()],
        sealed_key: ctx
            .input
            .get("sealedKey")
            .and_then(|v| v.as_str())
            .map(|s| SealedKey(s.to_string())),
    };
    ensure_task(tx, &task_id, &agent, Some(ctx.job_id), &work).await?;
    let (state, result): (String, Option<String>) =
        sqlx::query_as("SELECT state, result FROM agent_tasks WHERE id = $1")
            .bind(&task_id)
            .fetch_one(&mut **tx)
            .await?;
    let result: Value = result
        .and_then(|r| serde_json::from_str(&r).ok())
        .unwrap_or(Value::Null);
    if state == "Succeeded" || state == "Failed" {
        forget_sealed_key(tx, ctx.job_id).await?;
    }
    match state.as_str() {
        "Succeeded" => {
            sqlx::query(
                "UPDATE protected_items SET failover_output = $1, updated_ms = $2 WHERE name = $3",
            )
            .bind(
                result
                    .get("output")
                    .cloned()
                    .unwrap_or(Value::Null)
                    .to_string(),
            )
            .bind(ctx.now_ms)
            .bind(&item)
            .execute(&mut **tx)
            .await?;
            Ok(Step::Done)
        }
        "Failed" => Ok(fail(
            "MaterializeFailed",
            format!(
                "the recovery agent could not write the disks: {}",
                result
                    .get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("unknown error")
            ),
        )),
        _ => Ok(agent_gone(ctx, tx, &agent, "failover")
            .await?
            .unwrap_or(Step::Wait)),
    }
}

async fn test_failover_prereq(ctx: &StepCtx<'_>, tx: &mut Tx<'_>) -> anyhow::Result<Step> {
    let item = ctx.str("item")?;
    let point = ctx.str("pointId")?;
    match load_test_state(tx, &item).await? {
        Some(
            TestFailoverState::TestFailoverInitiated | TestFailoverState::TestFailoverCompleted,
        ) => {}
        other => {
            return Ok(fail(
                "InvalidState",
                format!("item '{item}' is not in a test failover (test failover state {other:?})"),
            ));
        }
    }
    point_still_there(tx, &item, &point).await
}

/// Fails a step whose agent task has had no answer for 5 minutes while the
/// agent was not heard from; `None` while it is worth waiting.
async fn agent_gone(
    ctx: &StepCtx<'_>,
    tx: &mut Tx<'_>,
    agent: &str,
    what: &str,
) -> anyhow::Result<Option<Step>> {
    let last_seen: Option<i64> =
        sqlx::query_scalar("SELECT last_seen_ms FROM agents WHERE id = $1")
            .bind(agent)
            .fetch_optional(&mut **tx)
            .await?
            .flatten();
    Ok((ctx.now_ms - last_seen.unwrap_or(0).max(ctx.started_ms) > AGENT_WAIT_MS).then(|| {
        fail(
            "RecoveryAgentNotConnected",
            format!("recovery agent {agent} has not been heard from for 5 minutes; start it and retry the {what}"),
        )
    }))
}

/// Asks the item's recovery agent to create and start a VM from the job's
/// recovery point (`test`: the test VM of a test failover, beside the
/// replicating item; else the failed-over VM), and records what it started.
/// The task is created once, with the NICs resolved then: a test failover
/// puts every NIC on the network the operator chose (or isolates them), a
/// failover follows the network mappings, and a NIC left isolated is said
/// in the step's output.
async fn start_replica(ctx: &StepCtx<'_>, tx: &mut Tx<'_>, test: bool) -> anyhow::Result<Step> {
    let item = ctx.str("item")?;
    let point = ctx.str("pointId")?;
    let vm_name = ctx.str("vmName")?;
    let (agent, fabric, machine, target_fabric): (Option<String>, String, String, String) =
        sqlx::query_as("SELECT target_agent_id, fabric, machine, target_fabric FROM protected_items WHERE name = $1")
            .bind(&item)
            .fetch_one(&mut **tx)
            .await?;
    let Some(agent) = agent else {
        return Ok(fail(
            "NoRecoveryAgent",
            format!("item '{item}' has no recovery agent"),
        ));
    };
    let task_id = format!("{}-start-replica", ctx.job_id);
    let exists: Option<String> = sqlx::query_scalar("SELECT id FROM agent_tasks WHERE id = $1")
        .bind(&task_id)
        .fetch_optional(&mut **tx)
        .await?;
    if exists.is_none() {
        let info: Option<String> =
            sqlx::query_scalar("SELECT info FROM machines WHERE fabric = $1 AND name = $2")
                .bind(&fabric)
                .bind(&machine)
                .fetch_optional(&mut **tx)
                .await?;
        let Some(info) = info.and_then(|i| serde_json::from_str::<MachineInfo>(&i).ok()) else {
            return Ok(fail(
                "MachineNotFound",
                format!(
                    "machine '{machine}' is no longer reported by fabric '{fabric}': its VM settings (memory, CPUs, NICs) are unknown"
                ),
            ));
        };
        let Some(vm) = info.vm.clone() else {
            return Ok(fail(
                "NotAVirtualMachine",
                format!(
                    "machine '{machine}' is not a virtual machine: the recovery site cannot boot it"
                ),
            ));
        };
        let mappings: std::collections::BTreeMap<String, String> =
            crate::model::paired_network_mappings(&mut **tx, &fabric)
                .await?
                .into_iter()
                .filter(|(_, (rf, _))| rf.eq_ignore_ascii_case(&target_fabric))
                .map(|(n, (_, rn))| (n, rn))
                .collect();
        let available: Vec<String> =
            sqlx::query_scalar("SELECT name FROM networks WHERE agent_id = $1")
                .bind(&agent)
                .fetch_all(&mut **tx)
                .await?;
        let test_network = ctx.input.get("network").and_then(|n| n.as_str());
        let plan = match (test, test_network) {
            (true, Some(n)) => NicPlan::AllTo(n),
            (true, None) => NicPlan::Isolated,
            (false, _) => NicPlan::Mapped {
                mappings: &mappings,
                available: &available,
            },
        };
        let resolved = resolve_nics(&info.nics, plan);
        let work = TaskWork::StartReplica {
            item: item.clone(),
            point_id: point,
            vm_name: vm_name.clone(),
            test,
            vm,
            nics: resolved.nics.clone(),
            sealed_key: ctx
                .input
                .get("sealedKey")
                .and_then(|v| v.as_str())
                .map(|s| SealedKey(s.to_string())),
        };
        ensure_task(tx, &task_id, &agent, Some(ctx.job_id), &work).await?;
        set_step_output(
            tx,
            ctx,
            &json!({"vmName": vm_name, "agent": agent, "nics": resolved.nics, "notes": resolved.notes}),
        )
        .await?;
    }
    let (state, result): (String, Option<String>) =
        sqlx::query_as("SELECT state, result FROM agent_tasks WHERE id = $1")
            .bind(&task_id)
            .fetch_one(&mut **tx)
            .await?;
    let result: Value = result
        .and_then(|r| serde_json::from_str(&r).ok())
        .unwrap_or(Value::Null);
    if state == "Succeeded" || state == "Failed" {
        forget_sealed_key(tx, ctx.job_id).await?;
    }
    let what = if test { "test failover" } else { "failover" };
    match state.as_str() {
        "Succeeded" => {
            let output = result.get("output").cloned().unwrap_or(Value::Null);
            if let Err(e) = serde_json::from_value::<ReplicaStarted>(output.clone()) {
                return Ok(fail(
                    "StartReplicaFailed",
                    format!(
                        "recovery agent {agent} answered the VM start with an output that is not a started replica ({e})"
                    ),
                ));
            }
            let sql = if test {
                "UPDATE protected_items SET test_failover_output = $1, updated_ms = $2 WHERE name = $3"
            } else {
                "UPDATE protected_items SET failover_output = $1, updated_ms = $2 WHERE name = $3"
            };
            sqlx::query(sql)
                .bind(output.to_string())
                .bind(ctx.now_ms)
                .bind(&item)
                .execute(&mut **tx)
                .await?;
            Ok(Step::Done)
        }
        "Failed" => Ok(fail(
            "StartReplicaFailed",
            format!(
                "the recovery agent could not create and start VM {vm_name}: {}",
                result
                    .get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("unknown error")
            ),
        )),
        _ => Ok(agent_gone(ctx, tx, &agent, what)
            .await?
            .unwrap_or(Step::Wait)),
    }
}

/// Asks the item's recovery agent to power off and delete the test VM.
async fn remove_replica(ctx: &StepCtx<'_>, tx: &mut Tx<'_>) -> anyhow::Result<Step> {
    let item = ctx.str("item")?;
    let vm_name = ctx.str("vmName")?;
    let agent: Option<String> =
        sqlx::query_scalar("SELECT target_agent_id FROM protected_items WHERE name = $1")
            .bind(&item)
            .fetch_one(&mut **tx)
            .await?;
    let Some(agent) = agent else {
        // No recovery agent was ever chosen: no VM can have been started.
        set_step_output(
            tx,
            ctx,
            &json!({"notes": ["the item has no recovery agent: no test VM to delete"]}),
        )
        .await?;
        return Ok(Step::Done);
    };
    let task_id = format!("{}-remove-replica", ctx.job_id);
    let work = TaskWork::RemoveReplica {
        item: item.clone(),
        vm_name: vm_name.clone(),
    };
    ensure_task(tx, &task_id, &agent, Some(ctx.job_id), &work).await?;
    let (state, result): (String, Option<String>) =
        sqlx::query_as("SELECT state, result FROM agent_tasks WHERE id = $1")
            .bind(&task_id)
            .fetch_one(&mut **tx)
            .await?;
    let result: Value = result
        .and_then(|r| serde_json::from_str(&r).ok())
        .unwrap_or(Value::Null);
    match state.as_str() {
        "Succeeded" => Ok(Step::Done),
        "Failed" => Ok(fail(
            "RemoveReplicaFailed",
            format!(
                "the recovery agent could not power off and delete test VM {vm_name}: {}",
                result
                    .get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("unknown error")
            ),
        )),
        _ => Ok(agent_gone(ctx, tx, &agent, "test failover cleanup")
            .await?
            .unwrap_or(Step::Wait)),
    }
}

/// Records what a step wants the operator to know (`job_steps.output`).
async fn set_step_output(
    tx: &mut Tx<'_>,
    ctx: &StepCtx<'_>,
    output: &Value,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE job_steps SET output = $1 WHERE job_id = $2 AND idx = $3")
        .bind(output.to_string())
        .bind(ctx.job_id)
        .bind(ctx.idx)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Asks every target agent the job names to verify its replica store and
/// waits for all of them. The reports become the job's output; any damage
/// (or a store that could not be verified) fails the job, naming the points.
async fn verify_stores(ctx: &StepCtx<'_>, tx: &mut Tx<'_>) -> anyhow::Result<Step> {
    let agents: Vec<String> = serde_json::from_value(ctx.input["agents"].clone())?;
    let mut reports = Vec::new();
    let mut pending = false;
    let mut problems = Vec::new();
    for agent in &agents {
        let task_id = format!("{}-verify-{agent}", ctx.job_id);
        ensure_task(tx, &task_id, agent, Some(ctx.job_id), &TaskWork::Verify).await?;
        let (state, result): (String, Option<String>) =
            sqlx::query_as("SELECT state, result FROM agent_tasks WHERE id = $1")
                .bind(&task_id)
                .fetch_one(&mut **tx)
                .await?;
        let result: Value = result
            .and_then(|r| serde_json::from_str(&r).ok())
            .unwrap_or(Value::Null);
        match state.as_str() {
            "Succeeded" => {
                let report = result.get("output").cloned().unwrap_or(Value::Null);
                for p in report["points"].as_array().into_iter().flatten() {
                    if p["ok"] != Value::Bool(true) {
                        problems.push(format!(
                            "{}/{} ({} damaged chunk(s){})",
                            p["item"].as_str().unwrap_or("?"),
                            p["point_id"].as_str().unwrap_or("?"),
                            p["damaged_chunks"].as_array().map(|a| a.len()).unwrap_or(0),
                            p["error"]
                                .as_str()
                                .map(|e| format!(": {e}"))
                                .unwrap_or_default()
                        ));
                    }
                }
                reports.push(json!({"agent": agent, "report": report}));
            }
            "Failed" => {
                let error = result
                    .get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("unknown error")
                    .to_string();
                problems.push(format!("agent {agent} could not verify its store: {error}"));
                reports.push(json!({"agent": agent, "error": error}));
            }
            _ => {
                let last_seen: Option<i64> =
                    sqlx::query_scalar("SELECT last_seen_ms FROM agents WHERE id = $1")
                        .bind(agent)
                        .fetch_optional(&mut **tx)
                        .await?
                        .flatten();
                if ctx.now_ms - last_seen.unwrap_or(0).max(ctx.started_ms) > AGENT_WAIT_MS {
                    problems.push(format!(
                        "agent {agent} has not been heard from for 5 minutes"
                    ));
                    reports.push(json!({"agent": agent, "error": "not connected"}));
                } else {
                    pending = true;
                }
            }
        }
    }
    if pending {
        return Ok(Step::Wait);
    }
    sqlx::query("UPDATE jobs SET output = $1 WHERE id = $2")
        .bind(json!({"stores": reports}).to_string())
        .bind(ctx.job_id)
        .execute(&mut **tx)
        .await?;
    if problems.is_empty() {
        Ok(Step::Done)
    } else {
        Ok(fail(
            "DamageFound",
            format!("replica store damage: {}", problems.join("; ")),
        ))
    }
}

/// Deletes a failover's sealed recovery key from the job's input and from
/// its agent tasks: once the materialize task is over, or the job has
/// ended, nothing needs it. (It is sealed to the recovery agent's transport
/// key; the vault never holds the key in the clear.)
async fn forget_sealed_key(tx: &mut Tx<'_>, job_id: &str) -> Result<(), sqlx::Error> {
    let input: Option<String> = sqlx::query_scalar("SELECT input FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_optional(&mut **tx)
        .await?;
    if let Some(stripped) = input.as_deref().and_then(without_sealed_key) {
        sqlx::query("UPDATE jobs SET input = $1 WHERE id = $2")
            .bind(stripped)
            .bind(job_id)
            .execute(&mut **tx)
            .await?;
    }
    let tasks: Vec<(String, String)> =
        sqlx::query_as("SELECT id, work FROM agent_tasks WHERE job_id = $1")
            .bind(job_id)
            .fetch_all(&mut **tx)
            .await?;
    for (id, work) in tasks {
        if let Some(stripped) = without_sealed_key(&work) {
            sqlx::query("UPDATE agent_tasks SET work = $1 WHERE id = $2")
                .bind(stripped)
                .bind(&id)
                .execute(&mut **tx)
                .await?;
        }
    }
    Ok(())
}

/// The JSON document without its top-level `sealedKey`, if it had one.
fn without_sealed_key(doc: &str) -> Option<String> {
    let mut v: Value = serde_json::from_str(doc).ok()?;
    v.as_object_mut()?.remove("sealedKey")?;
    Some(v.to_string())
}

/// Inserts an agent task unless it exists (steps are re-run after a restart).
pub async fn ensure_task(
    tx: &mut Tx<'_>,
    id: &str,
    agent: &str,
    job: Option<&str>,
    work: &TaskWork,
) -> Result<(), sqlx::Error> {
    let now = now_ms();
    sqlx::query(
        "INSERT INTO agent_tasks (id, agent_id, job_id, work, state, created_ms, updated_ms) VALUES ($1, $2, $3, $4, 'Pending', $5, $6) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(agent)
    .bind(job)
    .bind(serde_json::to_string(work).unwrap_or_default())
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn load_state(tx: &mut Tx<'_>, item: &str) -> anyhow::Result<Option<ProtectionState>> {
    let s: Option<String> = sqlx::query_scalar("SELECT state FROM protected_items WHERE name = $1")
        .bind(item)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(s.and_then(|s| ProtectionState::parse(&s)))
}

/// Applies `action` to the item's state. Idempotent: if the item already is
/// in the state the action leads to (a step re-run after a crash), nothing
/// changes.
pub async fn transition(
    tx: &mut Tx<'_>,
    item: &str,
    action: ItemAction,
) -> anyhow::Result<ProtectionState> {
    let Some(state) = load_state(tx, item).await? else {
        anyhow::bail!("protected item '{item}' does not exist");
    };
    let next = match state.apply(action) {
        Ok(next) => next,
        Err(e) => {
            if already_there(state, action) {
                return Ok(state);
            }
            return Err(e.into());
        }
    };
    sqlx::query("UPDATE protected_items SET state = $1, updated_ms = $2 WHERE name = $3")
        .bind(next.as_str())
        .bind(now_ms())
        .bind(item)
        .execute(&mut **tx)
        .await?;
    Ok(next)
}

fn already_there(state: ProtectionState, action: ItemAction) -> bool {
    use ItemAction as A;
    use ProtectionState as S;
    matches!(
        (state, action),
        (
            S::InitialReplicationInProgress | S::Protected,
            A::StartInitialReplication
        ) | (S::Protected, A::FinishInitialReplication)
            | (S::UnplannedFailoverCompleted, A::FinishUnplannedFailover)
            | (S::FailoverCommitted, A::FinishCommit)
    )
}

async fn load_test_state(tx: &mut Tx<'_>, item: &str) -> anyhow::Result<Option<TestFailoverState>> {
    let s: Option<String> =
        sqlx::query_scalar("SELECT test_failover_state FROM protected_items WHERE name = $1")
            .bind(item)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(s.and_then(|s| TestFailoverState::parse(&s)))
}

/// Applies a test failover action to the item. Idempotent like
/// [`transition`]: a step re-run after a crash finds the state it leads to.
pub async fn test_transition(
    tx: &mut Tx<'_>,
    item: &str,
    action: TestAction,
) -> anyhow::Result<TestFailoverState> {
    let Some(protection) = load_state(tx, item).await? else {
        anyhow::bail!("protected item '{item}' does not exist");
    };
    let Some(state) = load_test_state(tx, item).await? else {
        anyhow::bail!("protected item '{item}' has no readable test failover state");
    };
    let next = match state.apply(action, protection) {
        Ok(next) => next,
        Err(e) => {
            use TestAction as A;
            use TestFailoverState as T;
            let there = matches!(
                (state, action),
                (T::TestFailoverCompleted, A::Finish)
                    | (T::TestFailoverFailed, A::Fail)
                    | (T::None, A::FinishCleanup)
                    | (T::MarkedForDeletion, A::FailCleanup)
            );
            if there {
                return Ok(state);
            }
            return Err(e.into());
        }
    };
    sqlx::query(
        "UPDATE protected_items SET test_failover_state = $1, updated_ms = $2 WHERE name = $3",
    )
    .bind(next.as_str())
    .bind(now_ms())
    .bind(item)
    .execute(&mut **tx)
    .await?;
    Ok(next)
}

async fn compensate(
    tx: &mut Tx<'_>,
    kind: JobKind,
    input: &Value,
    message: &str,
) -> anyhow::Result<()> {
    let item = input
        .get("item")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let action = match kind {
        JobKind::EnableProtection => Some(ItemAction::FailProtection),
        JobKind::UnplannedFailover => Some(ItemAction::AbortUnplannedFailover),
        JobKind::CommitFailover => Some(ItemAction::AbortCommit),
        JobKind::ConfigureProtection => {
            sqlx::query("DELETE FROM container_mappings WHERE fabric = $1 AND container = $2 AND name = $3 AND state = 'Pairing'")
                .bind(input["fabric"].as_str().unwrap_or_default())
                .bind(input["container"].as_str().unwrap_or_default())
                .bind(input["name"].as_str().unwrap_or_default())
                .execute(&mut **tx)
                .await?;
            None
        }
        JobKind::TestFailover | JobKind::TestFailoverCleanup => {
            // The item goes on replicating: its test failover state says
            // what failed, and cleanup is what to do next.
            let action = if kind == JobKind::TestFailover {
                TestAction::Fail
            } else {
                TestAction::FailCleanup
            };
            if let Err(e) = test_transition(tx, item, action).await {
                tracing::warn!("compensation of {kind:?} for {item}: {e:#}");
            }
            sqlx::query("UPDATE protected_items SET test_failover_error = $1 WHERE name = $2")
                .bind(message)
                .bind(item)
                .execute(&mut **tx)
                .await?;
            None
        }
        JobKind::CreateNetworkMapping => {
            sqlx::query("DELETE FROM network_mappings WHERE fabric = $1 AND network = $2 AND name = $3 AND state = 'Pairing'")
                .bind(input["fabric"].as_str().unwrap_or_default())
                .bind(input["network"].as_str().unwrap_or_default())
                .bind(input["name"].as_str().unwrap_or_default())
                .execute(&mut **tx)
                .await?;
            None
        }
        JobKind::DeleteNetworkMapping => {
            sqlx::query("UPDATE network_mappings SET state = 'Paired' WHERE fabric = $1 AND network = $2 AND name = $3 AND state = 'Unpairing'")
                .bind(input["fabric"].as_str().unwrap_or_default())
                .bind(input["network"].as_str().unwrap_or_default())
                .bind(input["name"].as_str().unwrap_or_default())
                .execute(&mut **tx)
                .await?;
            None
        }
        JobKind::CreatePolicy | JobKind::VerifyStore => None,
    };
    if let Some(action) = action {
        if let Err(e) = transition(tx, item, action).await {
            tracing::warn!("compensation of {kind:?} for {item}: {e:#}");
        }
        sqlx::query("UPDATE protected_items SET last_error = $1 WHERE name = $2")
            .bind(message)
            .bind(item)
            .execute(&mut **tx)
            .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AppState, VaultInfo};

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
        }
    }

    async fn new_job(st: &AppState, kind: JobKind, input: Value) -> String {
        let mut tx = crate::db::begin(&st.db).await.unwrap();
        let id = create_job(&mut tx, kind, "T", "t", "/t", &input)
            .await
            .unwrap();
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
        let v = crate::model::item_json(&st.db, &st.info, &item)
            .await
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
        let mut tx = crate::db::begin(&st.db).await.unwrap();
        let job = create_job_with_steps(
            &mut tx,
            JobKind::UnplannedFailover,
            JobKind::UnplannedFailover.vm_steps(),
            "ProtectionEntity",
            "i1",
            "/i1",
            &json!({"item": "i1", "pointId": "p1", "vm": true, "vmName": "m1"}),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
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
        let job_view = crate::model::job_json(&st.db, &st.info, &job)
            .await
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
        let v = crate::model::item_json(&st.db, &st.info, &item)
            .await
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
