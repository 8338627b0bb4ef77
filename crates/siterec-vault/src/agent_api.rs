//! The agent API (siterec's own, not ARM), served over TLS.
//!
//! - `POST /agent/v1/enrol`: a registration key and a CSR in, a certificate
//!   signed by the vault CA out. The only call without a client certificate.
//! - `POST /agent/v1/heartbeat`: inventory and counters in; pending tasks and
//!   the complete list of replication assignments out.
//! - `POST /agent/v1/tasks/{id}/result`: the outcome of a task.
//! - `POST /agent/v1/points`: a source reports a recovery point its target
//!   has committed durably.
//!
//! Every call after enrolment is authenticated by the client certificate,
//! whose subject CN is the agent id the vault chose.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Extension, Json, Router};

use crate::db::{now_ms, secret_hash};
use crate::error::{ApiError, ApiResult};
use crate::jobs::ensure_task;
use crate::persist::agents as persist;
use crate::{AppState, Shared};
use siterec_core::Consistency;
use siterec_core::names::check_name;
use siterec_core::policy::Policy;
use siterec_core::retention::points_to_prune;
use siterec_core::state::ProtectionState;
use siterec_core::wire::{
    AgentTask, DiskInfo, EnrolRequest, EnrolResponse, HeartbeatRequest, HeartbeatResponse,
    MachineInfo, MaterializedDisk, PointRecorded, PointReport, ReplicationAssignment, TaskResult,
    TaskResultRecorded, TaskWork,
};
use siterec_pki::PeerIdentity;

pub fn router(st: Shared) -> Router {
    Router::new()
        .route("/agent/v1/enrol", post(enrol))
        .route("/agent/v1/heartbeat", post(heartbeat))
        .route("/agent/v1/tasks/{id}/result", post(task_result))
        .route("/agent/v1/points", post(report_point))
        .with_state(st)
}

fn unauthorized(message: impl Into<String>) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, "Unauthorized", message)
}

/// The enrolled agent behind the client certificate.
pub(crate) async fn agent_of(st: &AppState, peer: &PeerIdentity) -> ApiResult<(String, String)> {
    let Some(id) = peer.0.as_deref() else {
        return Err(unauthorized(
            "this call needs the agent's client certificate; enrol the agent first",
        ));
    };
    let fabric = persist::agent_fabric(&st.db, id).await?;
    match fabric {
        Some(f) => Ok((id.to_string(), f)),
        // Unregistered (or never enrolled here): the agent stops on this code.
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            siterec_core::wire::AGENT_NOT_REGISTERED,
            format!(
                "agent {id} is not registered with this vault (it was unregistered, or enrolled with another vault); to bring it back, enrol it again with a new registration key and an empty data directory"
            ),
        )),
    }
}

async fn enrol(
    State(st): State<Shared>,
    Json(req): Json<EnrolRequest>,
) -> ApiResult<Json<EnrolResponse>> {
    let Some(persist::KeyRow {
        fabric,
        secret_hash: hash,
        expires_ms: expires,
        revoked_ms: revoked,
    }) = persist::registration_key(&st.db, &req.key_id).await?
    else {
        return Err(unauthorized(
            "the registration key is not known to this vault; create one with 'siterec vault key create'",
        ));
    };
    if hash != secret_hash(&req.secret) {
        return Err(unauthorized(
            "the registration key's secret does not match; use the key file as the vault wrote it",
        ));
    }
    if revoked.is_some() {
        return Err(unauthorized(
            "the registration key was revoked; create a new one with 'siterec vault key create'",
        ));
    }
    let now = now_ms();
    if expires < now {
        return Err(unauthorized(format!(
            "the registration key expired at {}; keys are valid for 5 days: create a new one with 'siterec vault key create'",
            crate::db::rfc3339(expires)
        )));
    }
    let agent_id = format!("agent-{}", uuid::Uuid::new_v4().simple());
    let cert_pem = st
        .agent_ca
        .sign_csr(&req.csr_pem, &agent_id, 3650)
        .map_err(|e| {
            ApiError::bad_request(format!(
                "the certificate signing request was refused: {e:#}"
            ))
        })?;
    let new = persist::NewAgent {
        id: &agent_id,
        fabric: &fabric,
        hostname: &req.hostname,
        key_id: &req.key_id,
        version: &req.agent_version,
    };
    persist::insert_agent(&st.db, &new, now).await?;
    tracing::info!(agent = %agent_id, fabric = %fabric, "agent enrolled");
    Ok(Json(EnrolResponse {
        agent_id,
        fabric,
        cert_pem,
        agent_ca_pem: st.agent_ca.cert_pem().to_string(),
    }))
}

async fn heartbeat(
    State(st): State<Shared>,
    Extension(peer): Extension<PeerIdentity>,
    Json(req): Json<HeartbeatRequest>,
) -> ApiResult<Json<HeartbeatResponse>> {
    let (agent, fabric) = agent_of(&st, &peer).await?;
    check_name("cloud", &req.cloud)?;
    for m in &req.machines {
        check_name("machine", &m.name)?;
    }
    // A network name that cannot be a resource name is left out (and
    // logged) rather than failing the heartbeat: the agent's other work
    // goes on, and a NIC on that network fails over isolated.
    let networks: Vec<&String> = req
        .networks
        .iter()
        .filter(|n| match check_name("network", n) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(agent = %agent, "network left out: {e}");
                false
            }
        })
        .collect();
    let now = now_ms();
    let infos = req
        .machines
        .iter()
        .map(serde_json::to_string)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ApiError::internal("machine info", e))?;
    let counters =
        serde_json::to_string(&req.counters).map_err(|e| ApiError::internal("counters", e))?;
    let digest = {
        let mut h = blake3::Hasher::new();
        for part in [fabric.as_str(), req.cloud.as_str()]
            .into_iter()
            .chain(infos.iter().map(String::as_str))
        {
            h.update(&(part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.finalize()
    };
    let machines_unchanged = st
        .reported
        .lock()
        .map(|r| {
            r.get(&agent)
                .is_some_and(|(d, at)| *d == digest && now - at < REWRITE_MACHINES_MS)
        })
        .unwrap_or(false);
    let recorded = persist::record_heartbeat(
        &st.db,
        &persist::Heartbeat {
            agent: &agent,
            fabric: &fabric,
            req: &req,
            infos: &infos,
            counters: &counters,
            networks: &networks,
            machines_unchanged,
        },
        now,
    )
    .await?;
    if recorded
        && !machines_unchanged
        && let Ok(mut r) = st.reported.lock()
    {
        r.insert(agent.clone(), (digest, now));
    }
    if !recorded {
        // Unregistered while this heartbeat was on its way.
        return Err(agent_of(&st, &peer).await.err().unwrap_or_else(|| {
            ApiError::internal("heartbeat", format!("agent {agent} was not recorded"))
        }));
    }
    // A long poll: an agent that has the answer of `seen_version` waits
    // (at most `wait_ms`, capped) until the job engine may have changed it.
    if let Some(seen) = req.seen_version
        && req.wait_ms > 0
    {
        let mut rx = st.changes.subscribe();
        let wait =
            std::time::Duration::from_millis(u64::from(req.wait_ms.min(MAX_HEARTBEAT_WAIT_MS)));
        let _ = tokio::time::timeout(wait, rx.wait_for(|v| *v != seen)).await;
    }
    let version = *st.changes.borrow();
    let rows = persist::pending_tasks(&st.db, &agent).await?;
    let mut tasks = Vec::new();
    for (id, work) in rows {
        match serde_json::from_str::<TaskWork>(&work) {
            Ok(work) => tasks.push(AgentTask { id, work }),
            Err(e) => tracing::error!("task {id} has unreadable work: {e}"),
        }
    }
    let replications = assignments(&st, &agent, &fabric).await?;
    let sources = sources_of(&st, &agent).await?;
    let imports = imports_of(&st, &agent).await?;
    let fenced = persist::fenced_machines(&st.db, &agent).await?;
    Ok(Json(HeartbeatResponse {
        agent_id: agent,
        tasks,
        replications,
        sources,
        imports,
        fenced,
        version,
    }))
}

/// An agent's machines are written again at least this often even when
/// unchanged (see [`crate::AppState::reported`]).
const REWRITE_MACHINES_MS: i64 = 60_000;

/// The longest a heartbeat waits for a change.
const MAX_HEARTBEAT_WAIT_MS: u32 = 10_000;

/// For a target agent: the items in offline initial replication it keeps,
/// with the directory to import each one's initial copy from.
async fn imports_of(
    st: &AppState,
    agent: &str,
) -> ApiResult<std::collections::BTreeMap<String, String>> {
    let rows = persist::target_items(&st.db, agent).await?;
    let mut out = std::collections::BTreeMap::new();
    for (item, state, policy) in rows {
        if ProtectionState::parse(&state) != Some(ProtectionState::InitialReplicationInProgress) {
            continue;
        }
        let (_, policy): (String, Policy) = crate::model::load_policy(&st.db, &policy).await?;
        if let Some(o) = policy.offline {
            out.insert(item, o.import_path);
        }
    }
    Ok(out)
}

/// For a target agent: the replicating items it keeps, with their source agents.
async fn sources_of(
    st: &AppState,
    agent: &str,
) -> ApiResult<std::collections::BTreeMap<String, String>> {
    let rows = persist::target_sources(&st.db, agent).await?;
    Ok(rows
        .into_iter()
        .filter(|(_, state, _)| {
            siterec_core::state::ProtectionState::parse(state).is_some_and(|s| s.replicating())
        })
        .map(|(item, _, source)| (item, source))
        .collect())
}

/// The items whose machines this agent hosts and which are replicating.
async fn assignments(
    st: &AppState,
    agent: &str,
    fabric: &str,
) -> ApiResult<Vec<ReplicationAssignment>> {
    let mut out = Vec::new();
    let mut policies: std::collections::HashMap<String, Policy> = Default::default();
    for row in persist::source_items(&st.db, agent, fabric).await? {
        let state = row.state;
        if !siterec_core::state::ProtectionState::parse(&state).is_some_and(|s| s.replicating()) {
            continue;
        }
        // A reprotect's new direction starts once the target's store holds
        // the seed (the job sets the epoch then).
        if ProtectionState::parse(&state) == Some(ProtectionState::ReprotectInProgress)
            && row.epoch.is_none()
        {
            continue;
        }
        let Some(target_url) = row.target_url else {
            continue;
        };
        // Items share a few policies: each is read once per heartbeat.
        let policy = match policies.get(&row.policy) {
            Some(p) => p,
            None => {
                let (_, p): (String, Policy) =
                    crate::model::load_policy(&st.db, &row.policy).await?;
                policies.entry(row.policy.clone()).or_insert(p)
            }
        };
        // Only the initial copy goes offline; later cycles use the network.
        let offline_export = policy
            .offline
            .as_ref()
            .filter(|_| {
                ProtectionState::parse(&state)
                    == Some(ProtectionState::InitialReplicationInProgress)
            })
            .map(|o| o.export_path.clone());
        let mut machine = row.machine;
        let disks: Vec<DiskInfo> = if row.reverse {
            // At the recovery site the machine is what its failover made:
            // a replica VM (replicated through its QEMU like any VM), or
            // disks (the raw images).
            let output = row.failover_output.as_deref().unwrap_or("[]");
            let written: Vec<MaterializedDisk> =
                match serde_json::from_str::<siterec_core::wire::ReplicaStarted>(output) {
                    Ok(vm) => {
                        machine = vm.vm_name;
                        vm.disks
                    }
                    Err(_) => serde_json::from_str::<Vec<MaterializedDisk>>(output)
                        .map_err(|e| {
                            ApiError::internal(
                                &format!("stored failover disks of item '{}'", row.name),
                                e,
                            )
                        })?
                        .into_iter()
                        .filter(|d| d.format == "raw")
                        .collect(),
                };
            written
                .into_iter()
                .map(|d| DiskInfo {
                    name: d.disk,
                    path: d.path,
                    size_bytes: d.size_bytes,
                })
                .collect()
        } else {
            let info: MachineInfo = serde_json::from_str(&row.info).map_err(|e| {
                ApiError::internal(&format!("stored report of machine '{machine}'"), e)
            })?;
            info.disks
        };
        if row.reverse && disks.is_empty() {
            tracing::warn!(item = %row.name, "the item has no failover disks to replicate back from");
            continue;
        }
        out.push(ReplicationAssignment {
            item: row.name,
            machine,
            disks,
            target_agent_id: row.target_id,
            target_url,
            copy_frequency_secs: policy.copy_frequency_secs,
            app_consistent_secs: policy.app_consistent_frequency_hours.saturating_mul(3600),
            // The agent takes the points of a group's items together.
            group: row.group,
            compression: policy.compression,
            not_before: policy.initial_replication_start,
            offline_export,
            // Only while the item waits for it.
            final_point: row.final_job.filter(|_| {
                ProtectionState::parse(&state) == Some(ProtectionState::PlannedFailoverInProgress)
            }),
            epoch: row.epoch,
        });
    }
    Ok(out)
}

async fn task_result(
    State(st): State<Shared>,
    Extension(peer): Extension<PeerIdentity>,
    Path(id): Path<String>,
    Json(result): Json<TaskResult>,
) -> ApiResult<Json<TaskResultRecorded>> {
    let (agent, _) = agent_of(&st, &peer).await?;
    let state = if result.ok { "Succeeded" } else { "Failed" };
    let body = serde_json::to_string(&result).map_err(|e| ApiError::internal("task result", e))?;
    match persist::record_task_result(&st.db, &id, &agent, state, &body, now_ms()).await? {
        persist::TaskRecorded::Unknown => return Err(ApiError::not_found("task", &id)),
        // A result posted twice (the agent retried): the first one counts.
        persist::TaskRecorded::Recorded | persist::TaskRecorded::AlreadyAnswered => {}
    }
    st.wake.notify_one();
    Ok(Json(TaskResultRecorded {
        task_id: id,
        state: state.to_string(),
    }))
}

async fn report_point(
    State(st): State<Shared>,
    Extension(peer): Extension<PeerIdentity>,
    Json(rep): Json<PointReport>,
) -> ApiResult<Json<PointRecorded>> {
    let (agent, fabric) = agent_of(&st, &peer).await?;
    let Some(persist::ReportedItem {
        state,
        policy,
        name: item,
        target,
        site,
        epoch,
    }) = persist::reported_item(&st.db, &rep.item, &fabric, &agent).await?
    else {
        return Err(ApiError::not_found(
            "protected item replicated by this agent",
            &rep.item,
        ));
    };
    let replicating =
        siterec_core::state::ProtectionState::parse(&state).is_some_and(|s| s.replicating());
    if !replicating {
        return Err(ApiError::conflict(format!(
            "item '{item}' is {state}, not replicating: the point is not recorded"
        )));
    }
    let now = now_ms();
    let consistency = match rep.consistency {
        Consistency::AppConsistent => "AppConsistent",
        Consistency::CrashConsistent => "CrashConsistent",
        Consistency::Inconsistent => "Inconsistent",
    };
    // Read before the write transaction: a statement on another pool
    // connection while this one holds the write lock deadlocks once every
    // connection is taken by reports waiting for that lock (100 items
    // reporting at once did, for the 10 s of the busy timeout).
    let (_, policy) = crate::model::load_policy(&st.db, &policy).await?;
    let mut tx = crate::db::begin(&st.db).await?;
    let point = persist::NewPoint {
        item: &item,
        point_id: &rep.point_id,
        created_ms: rep.created_at_ms,
        consistency,
        bytes_sent: i64::try_from(rep.bytes_sent).unwrap_or(i64::MAX),
        bytes_read: i64::try_from(rep.bytes_read).unwrap_or(i64::MAX),
        final_for: rep.final_for.as_deref(),
        site: &site,
        epoch: epoch.as_deref(),
    };
    persist::insert_point(&mut tx, &point, now).await?;
    // Retention: hide the points the policy lets go, then ask the target to
    // delete them. A point is never listed again once hidden.
    let ages = persist::listed_points(&mut tx, &item, &site).await?;
    let mut prune = points_to_prune(&ages, policy.retention, policy.copy_frequency_secs, now);
    // The point a test failover is creating its VM from stays until the VM
    // exists (replication, and so retention, goes on meanwhile); a later
    // report prunes it.
    let held = persist::held_test_point(&mut tx, &item).await?;
    prune.retain(|p| Some(p) != held.as_ref());
    if !prune.is_empty() {
        persist::hide_points(&mut tx, &item, &prune, now).await?;
        if let Some(target) = target {
            let work = TaskWork::Prune {
                item: item.clone(),
                point_ids: prune.clone(),
            };
            ensure_task(
                &mut tx,
                &format!("prune-{item}-{}", rep.point_id),
                &target,
                None,
                &work,
            )
            .await?;
        }
    }
    tx.commit().await?;
    st.wake.notify_one();
    Ok(Json(PointRecorded {
        item,
        point_id: rep.point_id,
        pruned: prune,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AppState, VaultInfo};
    use std::sync::Arc;

    async fn open(dir: &std::path::Path) -> Shared {
        let db = crate::db::open_for_test(dir).await.unwrap();
        Arc::new(AppState {
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
        })
    }

    async fn exec(st: &AppState, sql: &'static str) {
        sqlx::raw_sql(sql).execute(&st.db).await.unwrap();
    }

    fn beat(networks: &[&str]) -> HeartbeatRequest {
        HeartbeatRequest {
            cloud: "rc".into(),
            machines: vec![],
            data_url: None,
            networks: networks.iter().map(|n| n.to_string()).collect(),
            store_encrypted: false,
            store_key_id: None,
            transport_key: None,
            counters: Default::default(),
            seen_version: None,
            wait_ms: 0,
        }
    }

    async fn networks(st: &AppState) -> Vec<(String, String)> {
        sqlx::query_as("SELECT name, agent_id FROM networks ORDER BY name, agent_id")
            .fetch_all(&st.db)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn a_heartbeat_that_has_the_current_answer_waits_for_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        exec(&st, "INSERT INTO agents (id, fabric, hostname, key_id, version, enrolled_ms) VALUES ('a1', 'recovery', 'h1', 'k', '0', 0)").await;
        let me = || Extension(PeerIdentity(Some("a1".into())));
        let Json(first) = heartbeat(State(st.clone()), me(), Json(beat(&[])))
            .await
            .unwrap();
        assert_ne!(first.version, 0, "a vault that waits says its version");
        // Nothing changes: answered after the wait.
        let mut req = beat(&[]);
        req.seen_version = Some(first.version);
        req.wait_ms = 300;
        let t = std::time::Instant::now();
        let Json(again) = heartbeat(State(st.clone()), me(), Json(req.clone()))
            .await
            .unwrap();
        assert!(t.elapsed() >= std::time::Duration::from_millis(300));
        assert_eq!(again.version, first.version);
        // The job engine moves meanwhile: answered at once, with the new version.
        req.wait_ms = 5_000;
        let bump = {
            let st = st.clone();
            tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                st.changes.send_modify(|v| *v += 1);
            })
        };
        let t = std::time::Instant::now();
        let Json(moved) = heartbeat(State(st.clone()), me(), Json(req)).await.unwrap();
        bump.await.unwrap();
        assert!(
            t.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(moved.version, first.version + 1);
        // An old answer's version: no wait at all.
        let mut stale = beat(&[]);
        stale.seen_version = Some(first.version);
        stale.wait_ms = 5_000;
        let t = std::time::Instant::now();
        let _ = heartbeat(State(st.clone()), me(), Json(stale))
            .await
            .unwrap();
        assert!(t.elapsed() < std::time::Duration::from_secs(2));
    }

    #[tokio::test]
    async fn every_heartbeat_replaces_the_networks_of_its_agent() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        exec(&st, "INSERT INTO agents (id, fabric, hostname, key_id, version, enrolled_ms) VALUES ('a1', 'recovery', 'h1', 'k', '0', 0), ('a2', 'recovery', 'h2', 'k', '0', 0)").await;
        let me = |id: &str| Extension(PeerIdentity(Some(id.into())));
        let _ = heartbeat(
            State(st.clone()),
            me("a1"),
            Json(beat(&["dr-lan", "test-net"])),
        )
        .await
        .unwrap();
        let _ = heartbeat(State(st.clone()), me("a2"), Json(beat(&["dr-lan"])))
            .await
            .unwrap();
        let _ = heartbeat(State(st.clone()), me("a1"), Json(beat(&["dr-lan"])))
            .await
            .unwrap();
        let pair = |n: &str, a: &str| (n.to_string(), a.to_string());
        assert_eq!(
            networks(&st).await,
            [pair("dr-lan", "a1"), pair("dr-lan", "a2")]
        );
        // A name that cannot be a resource name is left out; the rest stays.
        let _ = heartbeat(
            State(st.clone()),
            me("a1"),
            Json(beat(&["bad name", "dr-lan"])),
        )
        .await
        .unwrap();
        assert_eq!(
            networks(&st).await,
            [pair("dr-lan", "a1"), pair("dr-lan", "a2")]
        );
    }

    /// Retention goes on during a test failover, but never takes the point
    /// the test VM is being created from.
    #[tokio::test]
    async fn retention_keeps_the_point_a_test_failover_is_starting_from() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        exec(&st, "INSERT INTO agents (id, fabric, hostname, key_id, version, enrolled_ms) VALUES ('agent-src', 'primary', 'h', 'k', '0', 0)").await;
        exec(&st, r#"INSERT INTO machines (fabric, container, name, agent_id, info, updated_ms) VALUES ('primary', 'pc', 'm1', 'agent-src', '{"name":"m1","kind":"PhysicalServer","disks":[]}', 0)"#).await;
        // Keep the latest point only.
        exec(&st, r#"INSERT INTO policies (name, body, created_ms) VALUES ('pol', '{"instanceType":"HyperVReplica2012R2","copyFrequencySecs":30,"retention":{"kind":"hours","hours":0},"appConsistentFrequencyHours":0,"compression":true,"initialReplicationStart":null}', 0)"#).await;
        exec(&st, "INSERT INTO protected_items (name, fabric, container, machine, policy, target_fabric, target_container, state, test_failover_state, test_failover_point_id, created_ms, updated_ms) VALUES ('i1', 'primary', 'pc', 'm1', 'pol', 'recovery', 'rc', 'Protected', 'TestFailoverInitiated', 'p1', 0, 0)").await;
        let now = crate::db::now_ms();
        let report = |id: &str, t: i64| PointReport {
            item: "i1".into(),
            point_id: id.into(),
            created_at_ms: t,
            consistency: Consistency::CrashConsistent,
            bytes_sent: 0,
            bytes_read: 0,
            final_for: None,
        };
        let me = || Extension(PeerIdentity(Some("agent-src".into())));
        for (id, t) in [("p1", now - 3000), ("p2", now - 2000), ("p3", now - 1000)] {
            let _ = report_point(State(st.clone()), me(), Json(report(id, t)))
                .await
                .unwrap();
        }
        let live: Vec<String> = sqlx::query_scalar(
            "SELECT point_id FROM recovery_points WHERE pruned_ms IS NULL ORDER BY point_id",
        )
        .fetch_all(&st.db)
        .await
        .unwrap();
        assert_eq!(live, ["p1", "p3"], "p1 is held, p2 was pruned");
        // Once the test VM exists, the next report lets p1 go.
        exec(
            &st,
            "UPDATE protected_items SET test_failover_state = 'TestFailoverCompleted'",
        )
        .await;
        let _ = report_point(State(st.clone()), me(), Json(report("p4", now)))
            .await
            .unwrap();
        let live: Vec<String> = sqlx::query_scalar(
            "SELECT point_id FROM recovery_points WHERE pruned_ms IS NULL ORDER BY point_id",
        )
        .fetch_all(&st.db)
        .await
        .unwrap();
        assert_eq!(live, ["p4"]);
    }

    /// The source agent learns each item's multi-VM group from its
    /// heartbeat answer: the agent takes the points of a group together.
    #[tokio::test]
    async fn replication_assignments_carry_the_items_multi_vm_group() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        exec(&st, "INSERT INTO agents (id, fabric, hostname, key_id, cloud, data_url, version, enrolled_ms) VALUES ('agent-src', 'primary', 'h', 'k', 'pc', NULL, '0', 0), ('agent-tgt', 'recovery', 'h2', 'k', 'rc', 'https://127.0.0.1:2', '0', 0)").await;
        exec(&st, r#"INSERT INTO policies (name, body, created_ms) VALUES ('pol', '{"instanceType":"InMageAzureV2","copyFrequencySecs":30,"retention":{"kind":"hours","hours":1},"appConsistentFrequencyHours":0,"compression":true,"initialReplicationStart":null}', 0)"#).await;
        exec(&st, "INSERT INTO protected_items (name, fabric, container, machine, policy, target_fabric, target_container, target_agent_id, state, multi_vm_group, created_ms, updated_ms) VALUES
            ('i1', 'primary', 'pc', 'm1', 'pol', 'recovery', 'rc', 'agent-tgt', 'Protected', 'app', 0, 0),
            ('i2', 'primary', 'pc', 'm2', 'pol', 'recovery', 'rc', 'agent-tgt', 'InitialReplicationInProgress', 'app', 0, 0),
            ('i3', 'primary', 'pc', 'm3', 'pol', 'recovery', 'rc', 'agent-tgt', 'Protected', NULL, 0, 0),
            ('i4', 'primary', 'pc', 'm4', 'pol', 'recovery', 'rc', 'agent-tgt', 'FailoverCommitted', 'app', 0, 0)").await;
        let machine = |name: &str| siterec_core::wire::MachineInfo {
            name: name.into(),
            kind: siterec_core::wire::KIND_PHYSICAL.into(),
            disks: vec![],
            nics: vec![],
            vm: None,
            error: None,
        };
        let mut req = beat(&[]);
        req.cloud = "pc".into();
        req.machines = ["m1", "m2", "m3", "m4"].map(machine).to_vec();
        let Json(resp) = heartbeat(
            State(st.clone()),
            Extension(PeerIdentity(Some("agent-src".into()))),
            Json(req),
        )
        .await
        .unwrap();
        let mut got: Vec<(String, Option<String>)> = resp
            .replications
            .into_iter()
            .map(|a| (a.item, a.group))
            .collect();
        got.sort();
        let a = |i: &str, g: Option<&str>| (i.to_string(), g.map(str::to_string));
        // i4 failed over: no longer replicated, so not assigned at all.
        assert_eq!(
            got,
            [a("i1", Some("app")), a("i2", Some("app")), a("i3", None)]
        );
        // On the wire, an item in no group carries no group field.
        let wire =
            serde_json::to_value(assignments(&st, "agent-src", "primary").await.unwrap()).unwrap();
        let by_item = |i: &str| {
            wire.as_array()
                .unwrap()
                .iter()
                .find(|a| a["item"] == i)
                .cloned()
                .unwrap()
        };
        assert_eq!(by_item("i1")["group"], "app");
        assert!(by_item("i3").get("group").is_none(), "{wire}");
    }
}
