//! Persistence of jobs: the SQL the job engine runs, on SQLite and
//! PostgreSQL alike. The engine's decisions are in
//! [`siterec_core::orchestration`]; this module loads what a step must
//! look at ([`observe`]) and writes what it decided ([`apply`]), always
//! inside the caller's transaction, so a round commits whole or not at all.

use serde_json::Value;
use sqlx::{Any, Row, Transaction};

use crate::db::now_ms;
use crate::persist::inventory::AGENT_ONLINE_MS;
use siterec_core::orchestration::{
    ChildJob, ChildSeen, Effect, JobInput, MachineSeen, Need, NetworkRef, Observed, PairingInput,
    Placement, PlanItemSeen, Refusal, StepRow, StoreTask, TaskResult, TaskSeen, test_transition,
    transition,
};
use siterec_core::policy::Policy;
use siterec_core::state::{
    JobKind, JobState, Lifecycle, Location, ProtectionState, TestFailoverState,
};
use siterec_core::wire::{MachineInfo, TaskWork};

pub type Tx<'a> = Transaction<'a, Any>;

/// A job as stored, its kind and state read.
pub struct JobRecord {
    pub kind: JobKind,
    pub state: JobState,
    /// `jobs.input`, read by [`JobInput::parse`].
    pub input: String,
}

/// What makes a stored job unreadable: the engine fails it with this.
#[derive(Debug, thiserror::Error)]
pub enum StoredJobError {
    #[error("job kind '{0}' is not one this build runs")]
    Kind(String),
    #[error("job state '{0}' is not a job state")]
    State(String),
}

/// Creates a job and its steps (NotStarted) inside the caller's transaction.
pub async fn create(
    tx: &mut Tx<'_>,
    input: &JobInput,
    target_type: &str,
    target_name: &str,
    target_id: &str,
) -> Result<String, sqlx::Error> {
    let id = uuid::Uuid::new_v4().to_string();
    create_with_id(tx, &id, input, target_type, target_name, target_id).await?;
    Ok(id)
}

/// [`create`] under a given id (a recovery plan's job names its
/// machines' jobs after itself, so that each is started once).
pub async fn create_with_id(
    tx: &mut Tx<'_>,
    id: &str,
    input: &JobInput,
    target_type: &str,
    target_name: &str,
    target_id: &str,
) -> Result<(), sqlx::Error> {
    let id = id.to_string();
    let now = now_ms();
    sqlx::query(
        "INSERT INTO jobs (id, kind, state, target_type, target_name, target_id, input, created_ms, seq) VALUES ($1, $2, 'NotStarted', $3, $4, $5, $6, $7, (SELECT COALESCE(MAX(seq), 0) + 1 FROM jobs))",
    )
    .bind(&id)
    .bind(input.kind().as_str())
    .bind(target_type)
    .bind(target_name)
    .bind(target_id)
    .bind(input.to_json())
    .bind(now)
    .execute(&mut **tx)
    .await?;
    for (idx, (key, title)) in input.steps().iter().enumerate() {
        sqlx::query(
            "INSERT INTO job_steps (job_id, idx, name, step, state) VALUES ($1, $2, $3, $4, 'NotStarted')",
        )
        .bind(&id)
        .bind(idx as i64)
        .bind(title)
        .bind(key.as_str())
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// Whether a job of that id exists.
pub async fn exists(tx: &mut Tx<'_>, job_id: &str) -> Result<bool, sqlx::Error> {
    let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_one(&mut **tx)
        .await?;
    Ok(n > 0)
}

/// Records a machine's operation that a recovery plan could not start
/// as a failed job of that id (what the API would have answered is its
/// error), so that the plan and the operator see it like any other.
pub async fn create_refused(
    tx: &mut Tx<'_>,
    id: &str,
    input: &JobInput,
    target: (&str, &str, &str),
    code: &str,
    message: &str,
) -> Result<(), sqlx::Error> {
    create_with_id(tx, id, input, target.0, target.1, target.2).await?;
    let now = now_ms();
    sqlx::query("UPDATE jobs SET state = 'Failed', start_ms = $1, end_ms = $1, error_code = $2, error_message = $3 WHERE id = $4")
        .bind(now)
        .bind(code)
        .bind(message)
        .bind(id)
        .execute(&mut **tx)
        .await?;
    sqlx::query("UPDATE job_steps SET state = 'Skipped' WHERE job_id = $1")
        .bind(id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// How [`resume`] went.
#[derive(Debug, PartialEq, Eq)]
pub enum Resumed {
    Done,
    NoSuchJob,
    /// The job is in this state, not waiting for an operator.
    NotSuspended(String),
}

/// An operator resumes a job waiting at a manual action: the step is
/// marked resumed (with the comments) and the job runs on.
pub async fn resume(
    tx: &mut Tx<'_>,
    job_id: &str,
    comments: Option<&str>,
    now: i64,
) -> Result<Resumed, sqlx::Error> {
    let state: Option<String> = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_optional(&mut **tx)
        .await?;
    match state.as_deref() {
        None => return Ok(Resumed::NoSuchJob),
        Some("Suspended") => {}
        Some(other) => return Ok(Resumed::NotSuspended(other.to_string())),
    }
    sqlx::query("UPDATE job_steps SET resumed_ms = $1, resume_comments = $2 WHERE job_id = $3 AND idx = (SELECT MIN(idx) FROM job_steps WHERE job_id = $3 AND state NOT IN ('Succeeded', 'Failed', 'Cancelled', 'Skipped'))")
        .bind(now)
        .bind(comments)
        .bind(job_id)
        .execute(&mut **tx)
        .await?;
    sqlx::query("UPDATE jobs SET state = 'InProgress' WHERE id = $1")
        .bind(job_id)
        .execute(&mut **tx)
        .await?;
    Ok(Resumed::Done)
}

/// Sets a job's state (restart and cancel).
pub async fn set_state(tx: &mut Tx<'_>, job_id: &str, state: JobState) -> Result<(), sqlx::Error> {
    let end = state.is_terminal().then(now_ms);
    sqlx::query("UPDATE jobs SET state = $1, end_ms = $2 WHERE id = $3")
        .bind(state.as_str())
        .bind(end)
        .bind(job_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A failed job runs again from its failed step: that step and the ones
/// after it are NotStarted again, the error goes, and the input is the
/// one given (a plan's with its attempt counted).
/// `from`: every step from that index runs again too.
pub async fn restart(
    tx: &mut Tx<'_>,
    job_id: &str,
    input: &JobInput,
    from: Option<usize>,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE job_steps SET state = 'NotStarted', start_ms = NULL, end_ms = NULL, error = NULL WHERE job_id = $1 AND (state NOT IN ('Succeeded', 'Skipped') OR idx >= $2)")
        .bind(job_id)
        .bind(from.map(|i| i as i64).unwrap_or(i64::MAX))
        .execute(&mut **tx)
        .await?;
    sqlx::query("UPDATE jobs SET state = 'InProgress', end_ms = NULL, error_code = NULL, error_message = NULL, input = $1 WHERE id = $2")
        .bind(input.to_json())
        .bind(job_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// The jobs not yet ended, oldest first.
pub async fn active(db: &crate::Db) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT id FROM jobs WHERE state IN ('NotStarted', 'InProgress') ORDER BY created_ms",
    )
    .fetch_all(db)
    .await
}

/// The job, `Ok(None)` if there is none of that id.
pub async fn load(
    tx: &mut Tx<'_>,
    job_id: &str,
) -> anyhow::Result<Option<Result<JobRecord, StoredJobError>>> {
    let Some(row) = sqlx::query("SELECT kind, state, input FROM jobs WHERE id = $1")
        .bind(job_id)
        .fetch_optional(&mut **tx)
        .await?
    else {
        return Ok(None);
    };
    let kind: String = row.try_get("kind")?;
    let state: String = row.try_get("state")?;
    let input: String = row.try_get("input")?;
    let Some(kind) = JobKind::parse(&kind) else {
        return Ok(Some(Err(StoredJobError::Kind(kind))));
    };
    let Some(state) = JobState::parse(&state) else {
        return Ok(Some(Err(StoredJobError::State(state))));
    };
    Ok(Some(Ok(JobRecord { kind, state, input })))
}

/// The job's steps in order. A step state that does not read is an error
/// (the vault wrote it: something else changed the database).
pub async fn steps(tx: &mut Tx<'_>, job_id: &str) -> anyhow::Result<Vec<StepRow>> {
    let rows: Vec<(Option<String>, String, Option<i64>)> = sqlx::query_as(
        "SELECT step, state, start_ms FROM job_steps WHERE job_id = $1 ORDER BY idx",
    )
    .bind(job_id)
    .fetch_all(&mut **tx)
    .await?;
    rows.into_iter()
        .map(|(key, state, started_ms)| {
            let state = JobState::parse(&state).ok_or_else(|| {
                anyhow::anyhow!("job {job_id} has a step in state '{state}', not a job state")
            })?;
            Ok(StepRow {
                key,
                state,
                started_ms,
            })
        })
        .collect()
}

pub async fn start_job(tx: &mut Tx<'_>, job_id: &str, now: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE jobs SET state = 'InProgress', start_ms = $1 WHERE id = $2")
        .bind(now)
        .bind(job_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

pub async fn start_step(
    tx: &mut Tx<'_>,
    job_id: &str,
    idx: usize,
    now: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE job_steps SET state = 'InProgress', start_ms = $1 WHERE job_id = $2 AND idx = $3",
    )
    .bind(now)
    .bind(job_id)
    .bind(idx as i64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The step succeeded.
pub async fn finish_step(tx: &mut Tx<'_>, job_id: &str, idx: usize) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE job_steps SET state = 'Succeeded', end_ms = $1 WHERE job_id = $2 AND idx = $3",
    )
    .bind(now_ms())
    .bind(job_id)
    .bind(idx as i64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn succeed_job(tx: &mut Tx<'_>, job_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE jobs SET state = 'Succeeded', end_ms = $1 WHERE id = $2")
        .bind(now_ms())
        .bind(job_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Step `idx` failed (if any: `None` when the job failed before a step),
/// the steps after it will not run, and the job failed.
pub async fn fail_job(
    tx: &mut Tx<'_>,
    job_id: &str,
    idx: Option<usize>,
    code: &str,
    message: &str,
) -> Result<(), sqlx::Error> {
    let end = now_ms();
    if let Some(idx) = idx {
        sqlx::query("UPDATE job_steps SET state = 'Failed', end_ms = $1, error = $2 WHERE job_id = $3 AND idx = $4")
            .bind(end)
            .bind(message)
            .bind(job_id)
            .bind(idx as i64)
            .execute(&mut **tx)
            .await?;
    }
    sqlx::query(
        "UPDATE job_steps SET state = 'Cancelled' WHERE job_id = $1 AND state IN ('NotStarted', 'InProgress')",
    )
    .bind(job_id)
    .execute(&mut **tx)
    .await?;
    sqlx::query("UPDATE jobs SET state = 'Failed', end_ms = $1, error_code = $2, error_message = $3 WHERE id = $4")
        .bind(end)
        .bind(code)
        .bind(message)
        .bind(job_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Inserts an agent task unless it exists (steps are re-run after a restart).
pub async fn ensure_task(
    tx: &mut Tx<'_>,
    id: &str,
    agent: &str,
    job: Option<&str>,
    work: &TaskWork,
) -> Result<(), sqlx::Error> {
    let work = serde_json::to_string(work).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    let now = now_ms();
    sqlx::query(
        "INSERT INTO agent_tasks (id, agent_id, job_id, work, state, created_ms, updated_ms) VALUES ($1, $2, $3, $4, 'Pending', $5, $6) ON CONFLICT (id) DO NOTHING",
    )
    .bind(id)
    .bind(agent)
    .bind(job)
    .bind(work)
    .bind(now)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The item's agent at `site`: the one reporting its machine at the
/// primary site, its recovery agent at the recovery site.
async fn agent_at(
    tx: &mut Tx<'_>,
    item: &str,
    site: Location,
) -> Result<Option<String>, sqlx::Error> {
    let agent: Option<Option<String>> = match site {
        Location::Recovery => {
            sqlx::query_scalar("SELECT target_agent_id FROM protected_items WHERE name = $1")
                .bind(item)
                .fetch_optional(&mut **tx)
                .await?
        }
        Location::Primary => sqlx::query_scalar(
            "SELECT m.agent_id FROM protected_items i JOIN machines m ON m.fabric = i.fabric AND m.name = i.machine WHERE i.name = $1",
        )
        .bind(item)
        .fetch_optional(&mut **tx)
        .await?,
    };
    Ok(agent.flatten())
}

async fn agent_last_seen(tx: &mut Tx<'_>, agent: &str) -> Result<Option<i64>, sqlx::Error> {
    let seen: Option<Option<i64>> =
        sqlx::query_scalar("SELECT last_seen_ms FROM agents WHERE id = $1")
            .bind(agent)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(seen.flatten())
}

/// The task's state as its agent reported it; `None` if not created.
async fn task(tx: &mut Tx<'_>, id: &str) -> anyhow::Result<Option<TaskResult>> {
    let row: Option<(String, Option<String>)> =
        sqlx::query_as("SELECT state, result FROM agent_tasks WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut **tx)
            .await?;
    let Some((state, result)) = row else {
        return Ok(None);
    };
    let result: Value = match result.as_deref() {
        Some(r) => serde_json::from_str(r)
            .map_err(|e| anyhow::anyhow!("agent task {id} has a result that is not JSON: {e}"))?,
        None => Value::Null,
    };
    Ok(Some(match state.as_str() {
        "Succeeded" => TaskResult::Succeeded {
            output: result.get("output").cloned().unwrap_or(Value::Null),
        },
        "Failed" => TaskResult::Failed {
            error: result
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or_default()
                .to_string(),
        },
        _ => TaskResult::Pending,
    }))
}

async fn task_seen(
    tx: &mut Tx<'_>,
    item: &str,
    task_id: &str,
    site: Location,
) -> anyhow::Result<TaskSeen> {
    let agent = agent_at(tx, item, site).await?;
    let agent_last_seen_ms = match &agent {
        Some(a) => agent_last_seen(tx, a).await?,
        None => None,
    };
    Ok(TaskSeen {
        agent,
        task: task(tx, task_id).await?,
        agent_last_seen_ms,
    })
}

async fn load_life(tx: &mut Tx<'_>, item: &str) -> anyhow::Result<Option<Lifecycle>> {
    let row: Option<(String, String)> =
        sqlx::query_as("SELECT state, active_location FROM protected_items WHERE name = $1")
            .bind(item)
            .fetch_optional(&mut **tx)
            .await?;
    row.map(|(s, a)| {
        Ok(Lifecycle {
            state: ProtectionState::parse(&s).ok_or_else(|| {
                anyhow::anyhow!("item '{item}' has state '{s}', not a protection state")
            })?,
            active: Location::parse(&a).ok_or_else(|| {
                anyhow::anyhow!("item '{item}' has active location '{a}', not Primary or Recovery")
            })?,
        })
    })
    .transpose()
}

async fn load_state(tx: &mut Tx<'_>, item: &str) -> anyhow::Result<Option<ProtectionState>> {
    Ok(load_life(tx, item).await?.map(|l| l.state))
}

async fn set_life(tx: &mut Tx<'_>, item: &str, life: Lifecycle) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE protected_items SET state = $1, active_location = $2, updated_ms = $3 WHERE name = $4",
    )
    .bind(life.state.as_str())
    .bind(life.active.as_str())
    .bind(now_ms())
    .bind(item)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn load_test_state(tx: &mut Tx<'_>, item: &str) -> anyhow::Result<Option<TestFailoverState>> {
    let s: Option<String> =
        sqlx::query_scalar("SELECT test_failover_state FROM protected_items WHERE name = $1")
            .bind(item)
            .fetch_optional(&mut **tx)
            .await?;
    s.map(|s| {
        TestFailoverState::parse(&s).ok_or_else(|| {
            anyhow::anyhow!(
                "item '{item}' has test failover state '{s}', not a test failover state"
            )
        })
    })
    .transpose()
}

/// Loads what a step needs to decide.
pub async fn observe(tx: &mut Tx<'_>, need: &Need, now: i64) -> anyhow::Result<Observed> {
    Ok(match need {
        Need::Nothing => Observed::Nothing,
        Need::Policy { name } => {
            let exists: Option<String> =
                sqlx::query_scalar("SELECT name FROM policies WHERE name = $1")
                    .bind(name)
                    .fetch_optional(&mut **tx)
                    .await?;
            Observed::Policy {
                exists: exists.is_some(),
            }
        }
        Need::Machine { item } => {
            let row: Option<(String, String)> =
                sqlx::query_as("SELECT fabric, machine FROM protected_items WHERE name = $1")
                    .bind(item)
                    .fetch_optional(&mut **tx)
                    .await?;
            let Some((fabric, machine)) = row else {
                return Ok(Observed::Machine(MachineSeen::ItemGone));
            };
            let info: Option<String> =
                sqlx::query_scalar("SELECT info FROM machines WHERE fabric = $1 AND name = $2")
                    .bind(&fabric)
                    .bind(&machine)
                    .fetch_optional(&mut **tx)
                    .await?;
            Observed::Machine(match info {
                None => MachineSeen::MachineGone { fabric, machine },
                Some(info) => {
                    let info: MachineInfo = serde_json::from_str(&info).map_err(|e| {
                        anyhow::anyhow!(
                            "the stored report of machine '{machine}' does not read: {e}"
                        )
                    })?;
                    MachineSeen::Reported {
                        machine,
                        error: info.error,
                    }
                }
            })
        }
        Need::Target { item } => observe_target(tx, item, now).await?,
        Need::Points { item, epoch } => {
            let listed: i64 = match epoch {
                None => sqlx::query_scalar(
                    "SELECT COUNT(*) FROM recovery_points WHERE item = $1 AND pruned_ms IS NULL",
                )
                .bind(item)
                .fetch_one(&mut **tx)
                .await?,
                Some(e) => sqlx::query_scalar(
                    "SELECT COUNT(*) FROM recovery_points WHERE item = $1 AND epoch = $2 AND pruned_ms IS NULL",
                )
                .bind(item)
                .bind(e)
                .fetch_one(&mut **tx)
                .await?,
            };
            Observed::Points {
                listed: u64::try_from(listed).unwrap_or(0),
            }
        }
        Need::Item { item, point } => {
            let point_listed = match point {
                Some(p) => {
                    let pruned: Option<Option<i64>> = sqlx::query_scalar(
                        "SELECT pruned_ms FROM recovery_points WHERE item = $1 AND point_id = $2",
                    )
                    .bind(item)
                    .bind(p)
                    .fetch_optional(&mut **tx)
                    .await?;
                    matches!(pruned, Some(None))
                }
                None => false,
            };
            Observed::Item {
                state: load_state(tx, item).await?,
                test: load_test_state(tx, item).await?,
                point_listed,
            }
        }
        Need::Task {
            item,
            task_id,
            site,
        } => Observed::Task(task_seen(tx, item, task_id, *site).await?),
        Need::FinalPoint {
            item,
            job_id,
            source,
        } => {
            let point: Option<String> = sqlx::query_scalar(
                "SELECT point_id FROM recovery_points WHERE item = $1 AND final_for = $2 AND pruned_ms IS NULL ORDER BY created_ms DESC LIMIT 1",
            )
            .bind(item)
            .bind(job_id)
            .fetch_optional(&mut **tx)
            .await?;
            let source_agent = agent_at(tx, item, *source).await?;
            let source_last_seen_ms = match &source_agent {
                Some(a) => agent_last_seen(tx, a).await?,
                None => None,
            };
            Observed::FinalPoint {
                point,
                source_agent,
                source_last_seen_ms,
            }
        }
        Need::Replica { item, task_id } => {
            let task = task_seen(tx, item, task_id, Location::Recovery).await?;
            // Placement is looked at only to create the task.
            let placement = match (&task.agent, &task.task) {
                (Some(agent), None) => Box::new(placement(tx, item, agent).await?),
                _ => Box::default(),
            };
            Observed::Replica { task, placement }
        }
        Need::Stores { tasks } => {
            let mut seen = Vec::new();
            for (agent, id) in tasks {
                seen.push(StoreTask {
                    agent: agent.clone(),
                    task: task(tx, id).await?,
                    agent_last_seen_ms: agent_last_seen(tx, agent).await?,
                });
            }
            Observed::Stores(seen)
        }
        Need::PlanItems { items, site } => {
            let mut seen = Vec::new();
            for item in items {
                let life = load_life(tx, item).await?;
                let test = load_test_state(tx, item)
                    .await?
                    .unwrap_or(TestFailoverState::None);
                let group: Option<Option<String>> = sqlx::query_scalar(
                    "SELECT multi_vm_group FROM protected_items WHERE name = $1",
                )
                .bind(item)
                .fetch_optional(&mut **tx)
                .await?;
                let points: Vec<(i64, String)> = sqlx::query_as(
                    "SELECT created_ms, point_id FROM recovery_points WHERE item = $1 AND site = $2 AND pruned_ms IS NULL ORDER BY created_ms",
                )
                .bind(item)
                .bind(site.as_str())
                .fetch_all(&mut **tx)
                .await?;
                seen.push(PlanItemSeen {
                    item: item.clone(),
                    life,
                    test,
                    group: group.flatten(),
                    points,
                });
            }
            Observed::PlanItems(seen)
        }
        Need::PlanChildren { children } => {
            let mut seen = Vec::new();
            for (item, ids) in children {
                let mut jobs = Vec::new();
                for (attempt, id) in ids.iter().enumerate() {
                    let row: Option<(String, Option<String>)> =
                        sqlx::query_as("SELECT state, error_message FROM jobs WHERE id = $1")
                            .bind(id)
                            .fetch_optional(&mut **tx)
                            .await?;
                    if let Some((state, error)) = row {
                        let state = JobState::parse(&state).ok_or_else(|| {
                            anyhow::anyhow!("job {id} has state '{state}', not a job state")
                        })?;
                        jobs.push((
                            attempt as u32,
                            ChildJob {
                                id: id.clone(),
                                state,
                                error,
                            },
                        ));
                    }
                }
                seen.push(ChildSeen {
                    item: item.clone(),
                    jobs,
                });
            }
            Observed::PlanChildren(seen)
        }
        Need::PlanScript { task_id, fabric } => {
            let row: Option<String> =
                sqlx::query_scalar("SELECT agent_id FROM agent_tasks WHERE id = $1")
                    .bind(task_id)
                    .fetch_optional(&mut **tx)
                    .await?;
            let agent = match row {
                Some(a) => Some(a),
                None => sqlx::query_scalar(
                    "SELECT id FROM agents WHERE fabric = $1 AND last_seen_ms > $2 ORDER BY last_seen_ms DESC, id LIMIT 1",
                )
                .bind(fabric)
                .bind(now - AGENT_ONLINE_MS)
                .fetch_optional(&mut **tx)
                .await?,
            };
            let agent_last_seen_ms = match &agent {
                Some(a) => agent_last_seen(tx, a).await?,
                None => None,
            };
            Observed::PlanScript {
                task: task(tx, task_id).await?,
                agent,
                agent_last_seen_ms,
            }
        }
        Need::Resumed { job_id, idx } => {
            let row: Option<(Option<i64>, Option<String>)> = sqlx::query_as(
                "SELECT resumed_ms, resume_comments FROM job_steps WHERE job_id = $1 AND idx = $2",
            )
            .bind(job_id)
            .bind(*idx as i64)
            .fetch_optional(&mut **tx)
            .await?;
            Observed::Resumed {
                resumed: row.and_then(|(at, c)| at.map(|at| (at, c))),
            }
        }
        Need::Network { fabric, name } => {
            let there: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM networks WHERE fabric = $1 AND name = $2")
                    .bind(fabric)
                    .bind(name)
                    .fetch_one(&mut **tx)
                    .await?;
            Observed::Network { exists: there > 0 }
        }
    })
}

/// The item's recovery agent, and the one it can have: a policy that
/// encrypts data stored needs an encrypted replica store, and a multi-VM
/// group keeps its points in one replica store, so a member goes to the
/// recovery agent the group's other members replicate to while that agent
/// can take it, else to any online agent of the recovery cloud that can.
async fn observe_target(tx: &mut Tx<'_>, item: &str, now: i64) -> anyhow::Result<Observed> {
    let (tf, tc, current, policy): (String, String, Option<String>, String) =
        sqlx::query_as("SELECT target_fabric, target_container, target_agent_id, policy FROM protected_items WHERE name = $1")
            .bind(item)
            .fetch_one(&mut **tx)
            .await?;
    if current.is_some() {
        return Ok(Observed::Target {
            current,
            candidate: None,
            recovery_fabric: tf,
            recovery_cloud: tc,
        });
    }
    let body: Option<String> = sqlx::query_scalar("SELECT body FROM policies WHERE name = $1")
        .bind(&policy)
        .fetch_optional(&mut **tx)
        .await?;
    let encrypt = match body {
        Some(b) => {
            serde_json::from_str::<Policy>(&b)
                .map_err(|e| anyhow::anyhow!("stored policy '{policy}' does not read: {e}"))?
                .encryption
        }
        None => false,
    };
    let group_agent: Option<String> = sqlx::query_scalar(
        "SELECT a.id FROM protected_items i
         JOIN protected_items g ON g.multi_vm_group = i.multi_vm_group AND g.name <> i.name
         JOIN agents a ON a.id = g.target_agent_id
         WHERE i.name = $1 AND a.fabric = $2 AND a.cloud = $3 AND a.data_url IS NOT NULL AND a.last_seen_ms > $4 AND (a.store_encrypted = 1 OR $5 = 0)
         ORDER BY g.created_ms, g.name LIMIT 1",
    )
    .bind(item)
    .bind(&tf)
    .bind(&tc)
    .bind(now - AGENT_ONLINE_MS)
    .bind(i64::from(encrypt))
    .fetch_optional(&mut **tx)
    .await?;
    let candidate = match group_agent {
        Some(a) => Some(a),
        None => sqlx::query_scalar(
            "SELECT id FROM agents WHERE fabric = $1 AND cloud = $2 AND data_url IS NOT NULL AND last_seen_ms > $3 AND (store_encrypted = 1 OR $4 = 0) ORDER BY last_seen_ms DESC LIMIT 1",
        )
        .bind(&tf)
        .bind(&tc)
        .bind(now - AGENT_ONLINE_MS)
        .bind(i64::from(encrypt))
        .fetch_optional(&mut **tx)
        .await?,
    };
    Ok(Observed::Target {
        current: None,
        candidate,
        recovery_fabric: tf,
        recovery_cloud: tc,
    })
}

/// What placing the item's VM on `agent` looks at: the machine's last
/// report, the network mappings toward the item's recovery fabric and the
/// networks the recovery agent has.
async fn placement(tx: &mut Tx<'_>, item: &str, agent: &str) -> anyhow::Result<Placement> {
    let (fabric, machine, target_fabric): (String, String, String) = sqlx::query_as(
        "SELECT fabric, machine, target_fabric FROM protected_items WHERE name = $1",
    )
    .bind(item)
    .fetch_one(&mut **tx)
    .await?;
    let info: Option<String> =
        sqlx::query_scalar("SELECT info FROM machines WHERE fabric = $1 AND name = $2")
            .bind(&fabric)
            .bind(&machine)
            .fetch_optional(&mut **tx)
            .await?;
    let info = info
        .map(|i| {
            serde_json::from_str::<MachineInfo>(&i).map_err(|e| {
                anyhow::anyhow!("the stored report of machine '{machine}' does not read: {e}")
            })
        })
        .transpose()?;
    let mappings = crate::persist::config::paired_network_mappings(&mut **tx, &fabric)
        .await?
        .into_iter()
        .filter(|(_, (rf, _))| rf.eq_ignore_ascii_case(&target_fabric))
        .map(|(n, (_, rn))| (n, rn))
        .collect();
    let available: Vec<String> =
        sqlx::query_scalar("SELECT name FROM networks WHERE agent_id = $1")
            .bind(agent)
            .fetch_all(&mut **tx)
            .await?;
    Ok(Placement {
        fabric,
        machine,
        info,
        mappings,
        available,
    })
}

async fn set_item(
    tx: &mut Tx<'_>,
    sql: &'static str,
    value: Option<&str>,
    item: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(sql)
        .bind(value)
        .bind(now_ms())
        .bind(item)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn pairing(tx: &mut Tx<'_>, sql: &'static str, p: &PairingInput) -> Result<(), sqlx::Error> {
    sqlx::query(sql)
        .bind(&p.fabric)
        .bind(&p.container)
        .bind(&p.name)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

async fn network_mapping(
    tx: &mut Tx<'_>,
    sql: &'static str,
    m: &NetworkRef,
) -> Result<(), sqlx::Error> {
    sqlx::query(sql)
        .bind(&m.fabric)
        .bind(&m.network)
        .bind(&m.name)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Writes one effect of step `idx` of job `job_id`.
pub async fn apply(
    tx: &mut Tx<'_>,
    job_id: &str,
    idx: usize,
    effect: &Effect,
) -> anyhow::Result<()> {
    match effect {
        Effect::SavePolicy { name, policy } => {
            sqlx::query(
                "INSERT INTO policies (name, body, created_ms) VALUES ($1, $2, $3) ON CONFLICT (name) DO UPDATE SET body = excluded.body",
            )
            .bind(name)
            .bind(serde_json::to_string(policy)?)
            .bind(now_ms())
            .execute(&mut **tx)
            .await?;
        }
        Effect::PairClouds(p) => {
            pairing(tx, "UPDATE container_mappings SET state = 'Paired' WHERE fabric = $1 AND container = $2 AND name = $3", p).await?
        }
        Effect::DropPendingPairing(p) => {
            pairing(tx, "DELETE FROM container_mappings WHERE fabric = $1 AND container = $2 AND name = $3 AND state = 'Pairing'", p).await?
        }
        Effect::MapNetworks(m) => {
            network_mapping(tx, "UPDATE network_mappings SET state = 'Paired' WHERE fabric = $1 AND network = $2 AND name = $3", m).await?
        }
        Effect::DropPendingNetworkMapping(m) => {
            network_mapping(tx, "DELETE FROM network_mappings WHERE fabric = $1 AND network = $2 AND name = $3 AND state = 'Pairing'", m).await?
        }
        Effect::RemoveNetworkMapping(m) => {
            network_mapping(tx, "DELETE FROM network_mappings WHERE fabric = $1 AND network = $2 AND name = $3", m).await?
        }
        Effect::KeepNetworkMapping(m) => {
            network_mapping(tx, "UPDATE network_mappings SET state = 'Paired' WHERE fabric = $1 AND network = $2 AND name = $3 AND state = 'Unpairing'", m).await?
        }
        Effect::RemovePairing(p) => {
            pairing(tx, "DELETE FROM container_mappings WHERE fabric = $1 AND container = $2 AND name = $3", p).await?
        }
        Effect::KeepPairing(p) => {
            pairing(tx, "UPDATE container_mappings SET state = 'Paired' WHERE fabric = $1 AND container = $2 AND name = $3 AND state = 'Unpairing'", p).await?
        }
        Effect::Transition { item, action } => {
            let Some(life) = load_life(tx, item).await? else {
                anyhow::bail!("protected item '{item}' does not exist");
            };
            let next = transition(life, *action)?;
            if next != life {
                set_life(tx, item, next).await?;
            }
        }
        Effect::Compensate {
            item,
            action,
            message,
        } => {
            match load_life(tx, item).await {
                Ok(Some(life)) => match transition(life, *action) {
                    Ok(next) => set_life(tx, item, next).await?,
                    Err(e) => tracing::warn!("compensation for {item}: {e}"),
                },
                Ok(None) => {}
                Err(e) => tracing::warn!("compensation for {item}: {e:#}"),
            }
            set_item(tx, "UPDATE protected_items SET last_error = $1, updated_ms = $2 WHERE name = $3", Some(message), item).await?;
        }
        Effect::TestTransition { item, action } => {
            let (Some(protection), Some(state)) =
                (load_state(tx, item).await?, load_test_state(tx, item).await?)
            else {
                anyhow::bail!("protected item '{item}' does not exist");
            };
            let next = test_transition(state, *action, protection)?;
            if next != state {
                set_item(tx, "UPDATE protected_items SET test_failover_state = $1, updated_ms = $2 WHERE name = $3", Some(next.as_str()), item).await?;
            }
        }
        Effect::CompensateTest {
            item,
            action,
            message,
        } => {
            match (load_state(tx, item).await, load_test_state(tx, item).await) {
                (Ok(Some(protection)), Ok(Some(state))) => {
                    match test_transition(state, *action, protection) {
                        Ok(next) => set_item(tx, "UPDATE protected_items SET test_failover_state = $1, updated_ms = $2 WHERE name = $3", Some(next.as_str()), item).await?,
                        Err(e) => tracing::warn!("compensation for {item}: {e}"),
                    }
                }
                (Err(e), _) | (_, Err(e)) => tracing::warn!("compensation for {item}: {e:#}"),
                _ => {}
            }
            set_item(tx, "UPDATE protected_items SET test_failover_error = $1, updated_ms = $2 WHERE name = $3", Some(message), item).await?;
        }
        Effect::SetRecoveryAgent { item, agent } => {
            set_item(tx, "UPDATE protected_items SET target_agent_id = $1, updated_ms = $2 WHERE name = $3", Some(agent), item).await?
        }
        Effect::EnsureTask { id, agent, work } => {
            ensure_task(tx, id, agent, Some(job_id), work).await?
        }
        Effect::ForgetSealedKey => forget_sealed_key(tx, job_id).await?,
        Effect::SetFailoverOutput { item, output } => {
            set_item(tx, "UPDATE protected_items SET failover_output = $1, updated_ms = $2 WHERE name = $3", Some(&output.to_string()), item).await?
        }
        Effect::SetTestFailoverOutput { item, output } => {
            set_item(tx, "UPDATE protected_items SET test_failover_output = $1, updated_ms = $2 WHERE name = $3", Some(&output.to_string()), item).await?
        }
        Effect::RecordFailover { item, point_id } => {
            let now = now_ms();
            sqlx::query("UPDATE protected_items SET failover_ms = $1, failover_point_id = $2, updated_ms = $3 WHERE name = $4")
                .bind(now)
                .bind(point_id)
                .bind(now)
                .bind(item)
                .execute(&mut **tx)
                .await?;
        }
        Effect::RecordTestFailover { item } => {
            let now = now_ms();
            sqlx::query("UPDATE protected_items SET test_failover_ms = $1, test_failover_error = NULL, updated_ms = $2 WHERE name = $3")
                .bind(now)
                .bind(now)
                .bind(item)
                .execute(&mut **tx)
                .await?;
        }
        Effect::ClearTestFailover { item } => {
            sqlx::query("UPDATE protected_items SET test_failover_output = NULL, test_failover_point_id = NULL, test_failover_error = NULL, updated_ms = $1 WHERE name = $2")
                .bind(now_ms())
                .bind(item)
                .execute(&mut **tx)
                .await?;
        }
        Effect::SetEpoch { item, epoch } => {
            set_item(tx, "UPDATE protected_items SET replication_epoch = $1, updated_ms = $2 WHERE name = $3", epoch.as_deref(), item).await?
        }
        Effect::SetFinalPoint { point_id } => {
            let Some(Ok(job)) = load(tx, job_id).await? else {
                anyhow::bail!("job {job_id} does not read: its final point cannot be recorded");
            };
            let mut input = JobInput::parse(job.kind, &job.input)?;
            if input.set_final_point(point_id) {
                sqlx::query("UPDATE jobs SET input = $1 WHERE id = $2")
                    .bind(input.to_json())
                    .bind(job_id)
                    .execute(&mut **tx)
                    .await?;
            }
        }
        Effect::DeleteItem { item } => {
            sqlx::query("DELETE FROM recovery_points WHERE item = $1")
                .bind(item)
                .execute(&mut **tx)
                .await?;
            sqlx::query("DELETE FROM protected_items WHERE name = $1")
                .bind(item)
                .execute(&mut **tx)
                .await?;
        }
        Effect::StepOutput(output) => {
            sqlx::query("UPDATE job_steps SET output = $1 WHERE job_id = $2 AND idx = $3")
                .bind(output.to_string())
                .bind(job_id)
                .bind(idx as i64)
                .execute(&mut **tx)
                .await?;
        }
        Effect::JobOutput(output) => {
            sqlx::query("UPDATE jobs SET output = $1 WHERE id = $2")
                .bind(output.to_string())
                .bind(job_id)
                .execute(&mut **tx)
                .await?;
        }
        Effect::SetPlanPoints(points) => {
            update_plan_input(tx, job_id, |p| p.points = points.clone()).await?
        }
        Effect::PlanRefused {
            item,
            code,
            message,
        } => {
            update_plan_input(tx, job_id, |p| {
                p.refused.insert(
                    item.to_lowercase(),
                    Refusal {
                        code: code.clone(),
                        message: message.clone(),
                        attempt: p.attempt,
                    },
                );
            })
            .await?
        }
        // The engine starts the machine's operation once the round is
        // committed (as the API would, in a transaction of its own).
        Effect::StartPlanItem { .. } => {}
        Effect::SuspendJob => {
            sqlx::query("UPDATE jobs SET state = 'Suspended' WHERE id = $1 AND state = 'InProgress'")
                .bind(job_id)
                .execute(&mut **tx)
                .await?;
        }
        Effect::RecordPlanRun { plan, op } => {
            crate::persist::plans::record_run(tx, plan, *op, now_ms()).await?
        }
    }
    Ok(())
}

/// Changes a plan job's stored input.
async fn update_plan_input(
    tx: &mut Tx<'_>,
    job_id: &str,
    change: impl FnOnce(&mut siterec_core::orchestration::PlanInput),
) -> anyhow::Result<()> {
    let Some(Ok(job)) = load(tx, job_id).await? else {
        anyhow::bail!("job {job_id} does not read: its plan input cannot be updated");
    };
    let mut input = JobInput::parse(job.kind, &job.input)?;
    let JobInput::RecoveryPlan(p) = &mut input else {
        anyhow::bail!("job {job_id} is not a recovery plan's job");
    };
    change(p);
    sqlx::query("UPDATE jobs SET input = $1 WHERE id = $2")
        .bind(input.to_json())
        .bind(job_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Deletes a failover's sealed recovery key from the job's input and from
/// its agent tasks: once the task that needs it is over, or the job has
/// ended, nothing needs it. (It is sealed to the recovery agent's transport
/// key; the vault never holds the key in the clear.)
async fn forget_sealed_key(tx: &mut Tx<'_>, job_id: &str) -> anyhow::Result<()> {
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

// ---------- what the API reads of jobs ----------

/// Which jobs of a kind [`find`] looks for.
pub enum JobOf<'a> {
    /// The latest on a resource by name.
    Named(&'a str),
    /// The latest not yet ended on a resource by name.
    RunningOn(&'a str),
    /// The latest on a resource by ARM id.
    Id(&'a str),
}

/// The latest job of `kind` that `of` says.
pub async fn find(
    tx: &mut Tx<'_>,
    kind: JobKind,
    of: JobOf<'_>,
) -> Result<Option<String>, sqlx::Error> {
    let (sql, target) = match of {
        JobOf::Named(t) => (
            "SELECT id FROM jobs WHERE kind = $1 AND target_name = $2 ORDER BY created_ms DESC LIMIT 1",
            t,
        ),
        JobOf::RunningOn(t) => (
            "SELECT id FROM jobs WHERE kind = $1 AND target_name = $2 AND state IN ('NotStarted', 'InProgress') ORDER BY created_ms DESC LIMIT 1",
            t,
        ),
        JobOf::Id(t) => (
            "SELECT id FROM jobs WHERE kind = $1 AND target_id = $2 ORDER BY created_ms DESC LIMIT 1",
            t,
        ),
    };
    sqlx::query_scalar(sql)
        .bind(kind.as_str())
        .bind(target)
        .fetch_optional(&mut **tx)
        .await
}

/// Every job's id, newest first (jobs of one millisecond in creation order
/// reversed).
pub async fn ids(db: &crate::Db) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar("SELECT id FROM jobs ORDER BY created_ms DESC, seq DESC")
        .fetch_all(db)
        .await
}

/// A job as the API shows it.
pub struct JobView {
    pub kind: String,
    pub state: String,
    /// `jobs.input`, read by [`JobInput::parse`].
    pub input: String,
    pub target_type: String,
    pub target_name: String,
    pub target_id: String,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
    /// The job's own output, as stored.
    pub output: Option<String>,
}

/// A job's step as the API shows it.
pub struct StepView {
    pub idx: i64,
    pub name: String,
    pub state: String,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub error: Option<String>,
    /// What the step said, as stored.
    pub output: Option<String>,
}

/// The job, if there is one of that id.
pub async fn view(db: &crate::Db, job_id: &str) -> Result<Option<JobView>, sqlx::Error> {
    let Some(row) = sqlx::query(
        "SELECT kind, state, input, target_type, target_name, target_id, start_ms, end_ms, error_code, error_message, output FROM jobs WHERE id = $1",
    )
    .bind(job_id)
    .fetch_optional(db)
    .await?
    else {
        return Ok(None);
    };
    Ok(Some(JobView {
        kind: row.try_get("kind")?,
        state: row.try_get("state")?,
        input: row.try_get("input")?,
        target_type: row.try_get("target_type")?,
        target_name: row.try_get("target_name")?,
        target_id: row.try_get("target_id")?,
        start_ms: row.try_get("start_ms")?,
        end_ms: row.try_get("end_ms")?,
        error_code: row.try_get("error_code")?,
        error_message: row.try_get("error_message")?,
        output: row.try_get("output")?,
    }))
}

/// The job's steps in order.
pub async fn step_views(db: &crate::Db, job_id: &str) -> Result<Vec<StepView>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT idx, name, state, start_ms, end_ms, error, output FROM job_steps WHERE job_id = $1 ORDER BY idx",
    )
    .bind(job_id)
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|s| {
            Ok(StepView {
                idx: s.try_get("idx")?,
                name: s.try_get("name")?,
                state: s.try_get("state")?,
                start_ms: s.try_get("start_ms")?,
                end_ms: s.try_get("end_ms")?,
                error: s.try_get("error")?,
                output: s.try_get("output")?,
            })
        })
        .collect()
}

/// What a job query looks at of every job started (or, not started,
/// created) at or after `since_ms`, newest first.
pub async fn facts(
    db: &crate::Db,
    since_ms: Option<i64>,
) -> Result<Vec<siterec_core::jobquery::JobFacts>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, kind, state, target_type, target_name, target_id, created_ms, start_ms, end_ms, error_code, error_message FROM jobs WHERE COALESCE(start_ms, created_ms) >= $1 ORDER BY created_ms DESC, seq DESC",
    )
    .bind(since_ms.unwrap_or(i64::MIN))
    .fetch_all(db)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(siterec_core::jobquery::JobFacts {
                id: r.try_get("id")?,
                kind: r.try_get("kind")?,
                state: r.try_get("state")?,
                target_type: r.try_get("target_type")?,
                target_name: r.try_get("target_name")?,
                target_id: r.try_get("target_id")?,
                created_ms: r.try_get("created_ms")?,
                start_ms: r.try_get("start_ms")?,
                end_ms: r.try_get("end_ms")?,
                error_code: r.try_get("error_code")?,
                error_message: r.try_get("error_message")?,
            })
        })
        .collect()
}

/// Sets a job's own output (`jobs.output`), in the caller's transaction.
pub async fn set_output(tx: &mut Tx<'_>, job_id: &str, output: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE jobs SET output = $1 WHERE id = $2")
        .bind(output)
        .bind(job_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
