//! Events and alerts: the vault's watcher and its webhook sender, two
//! tasks started beside the job engine.
//!
//! - [`run_watcher`]: every [`WATCH_EVERY`] it observes each protected
//!   item (its replication health, its RPO against its policy's
//!   threshold) and each agent (its last heartbeat against three of its
//!   heartbeat intervals), asks [`siterec_core::events::evaluate`] which
//!   events that raises, and records them with the new conditions in one
//!   transaction. It also cleans up by force a test failover left
//!   completed longer than [`EventOptions::test_failover_max_age`] (the
//!   seeds: two weeks), recording that as an event.
//! - [`run_webhook`]: POSTs each event raised while a webhook was set
//!   (`replicationAlertSettings/defaultAlertSetting`,
//!   `properties.webhookUrl`) as its ARM resource, JSON; an answer other
//!   than 2xx, or none, is retried with exponential backoff (1 s doubling,
//!   at most [`MAX_BACKOFF`]). Deliveries are remembered per event in the
//!   database: at least once, across restarts; never on the API's path.
//!
//! Jobs' outcomes are recorded by the job engine itself
//! ([`crate::persist::events::job_ended`]), in the transaction that ends
//! the job.

use std::time::Duration;

use siterec_core::events::{AgentSeen, ItemSeen};
use siterec_core::policy::Policy;

use crate::db::now_ms;
use crate::persist::events as events_db;
use crate::{AppState, model, persist};

/// How often the watcher looks.
pub const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How often the webhook sender looks for events to deliver.
pub const DELIVER_EVERY: Duration = Duration::from_millis(500);
/// The longest wait between two delivery attempts of one event.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// The seeds: "If a test failover continues longer than two weeks it's
/// completed by force."
pub const DEFAULT_TEST_FAILOVER_MAX_AGE: Duration = Duration::from_secs(14 * 24 * 3600);

/// What the watcher is told.
#[derive(Debug, Clone)]
pub struct EventOptions {
    /// A test failover completed longer ago than this is cleaned up by the
    /// vault (`siterec vault --test-failover-max-age`).
    pub test_failover_max_age: Duration,
}

impl Default for EventOptions {
    fn default() -> Self {
        EventOptions {
            test_failover_max_age: DEFAULT_TEST_FAILOVER_MAX_AGE,
        }
    }
}

/// Runs until aborted: one watch round every [`WATCH_EVERY`].
pub async fn run_watcher(st: crate::Shared, opts: EventOptions) {
    let since = now_ms();
    loop {
        if let Err(e) = watch_once(&st, &opts, since).await {
            tracing::warn!("watching items and agents for events (tried again): {e:#}");
        }
        tokio::time::sleep(WATCH_EVERY).await;
    }
}

/// One round: raises the events of what changed since the last, and
/// cleans up stale test failovers.
pub async fn watch_once(
    st: &AppState,
    opts: &EventOptions,
    watching_since_ms: i64,
) -> anyhow::Result<usize> {
    let items = items_seen(st).await?;
    let agents: Vec<AgentSeen> = events_db::agents_seen(&st.db)
        .await?
        .into_iter()
        .map(
            |(id, hostname, fabric, last_seen_ms, interval_ms)| AgentSeen {
                id,
                hostname,
                fabric,
                last_seen_ms,
                interval_ms,
            },
        )
        .collect();
    let now = now_ms();
    let mut tx = crate::db::begin(&st.db).await?;
    let prev = events_db::conditions(&mut tx).await?;
    let (events, next) =
        siterec_core::events::evaluate(&prev, &items, &agents, now, watching_since_ms);
    for e in &events {
        tracing::info!(
            code = e.code,
            severity = e.severity.as_str(),
            "{}",
            e.summary
        );
        events_db::insert(&mut tx, e, now).await?;
    }
    events_db::set_conditions(&mut tx, &prev, &next, now).await?;
    tx.commit().await?;

    let max_age = i64::try_from(opts.test_failover_max_age.as_millis()).unwrap_or(i64::MAX);
    for name in
        events_db::completed_test_failovers_before(&st.db, now.saturating_sub(max_age)).await?
    {
        let Some(item) = persist::items::load(&st.db, &name).await? else {
            continue;
        };
        if !siterec_core::events::stale_test_failover(item.test_state, item.test_ms, now, max_age) {
            continue;
        }
        let age = now - item.test_ms.unwrap_or(now);
        let comments = format!(
            "completed by force: the test failover completed {} hours ago, longer than the vault allows ({} hours)",
            age / 3_600_000,
            max_age / 3_600_000
        );
        match crate::arm::start_test_cleanup(st, &name, &comments, Some(age)).await {
            Ok(job) => tracing::warn!(item = %name, job = %job, "{comments}"),
            Err(e) => {
                tracing::warn!(item = %name, "could not start the forced test failover cleanup: {}", e.message)
            }
        }
    }
    Ok(events.len())
}

/// Every protected item as the API shows it, reduced to what events look at.
async fn items_seen(st: &AppState) -> anyhow::Result<Vec<ItemSeen>> {
    let mut policies = std::collections::HashMap::new();
    for (name, body) in persist::config::policies(&st.db).await? {
        let p: Policy = serde_json::from_str(&body)
            .map_err(|e| anyhow::anyhow!("stored policy '{name}' does not read: {e}"))?;
        policies.insert(name.to_ascii_lowercase(), p.rpo_threshold_secs());
    }
    let mut out = Vec::new();
    let (mut after_ms, mut after_name) = (i64::MIN, String::new());
    loop {
        let rows = persist::items::page(&st.db, None, after_ms, &after_name, 500).await?;
        let Some(last) = rows.last() else { break };
        (after_ms, after_name) = (last.created_ms, last.name.clone());
        let views = model::items_json(&st.db, &st.info, &rows)
            .await
            .map_err(|e| anyhow::anyhow!("{}", e.message))?;
        for (row, view) in rows.iter().zip(views) {
            let p = view.properties;
            let errors: Vec<String> = p
                .replication_health_errors
                .iter()
                .map(|e| e.error_message.clone())
                .collect();
            // A Warning with no error is the RPO's alone: that has its own event.
            let health = if p.replication_health == "Warning" && errors.is_empty() {
                "Normal".to_string()
            } else {
                p.replication_health
            };
            out.push(ItemSeen {
                name: row.name.clone(),
                fabric: row.fabric.clone(),
                protected: row.state == siterec_core::state::ProtectionState::Protected,
                health,
                health_errors: errors,
                rpo_secs: p.provider_specific_details.rpo_in_seconds,
                threshold_secs: policies
                    .get(&row.policy.to_ascii_lowercase())
                    .copied()
                    .unwrap_or(2 * 300 + 60),
            });
        }
    }
    Ok(out)
}

/// Runs until aborted: delivers due events to the webhook.
pub async fn run_webhook(st: crate::Shared) {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!("no webhook deliveries: building the HTTP client: {e}");
            return;
        }
    };
    loop {
        if let Err(e) = deliver_once(&st, &client).await {
            tracing::warn!("webhook deliveries (tried again): {e:#}");
        }
        tokio::time::sleep(DELIVER_EVERY).await;
    }
}

/// The wait before attempt `attempts + 1`: 1 s, doubling, at most [`MAX_BACKOFF`].
pub fn backoff(attempts: i64) -> Duration {
    let exp = u32::try_from(attempts.clamp(0, 16)).unwrap_or(16);
    Duration::from_secs(1u64 << exp).min(MAX_BACKOFF)
}

/// One round of deliveries; returns how many were delivered.
pub async fn deliver_once(st: &AppState, client: &reqwest::Client) -> anyhow::Result<usize> {
    let due = events_db::due_deliveries(&st.db, now_ms(), 100).await?;
    if due.is_empty() {
        return Ok(0);
    }
    let Some(url) = events_db::webhook_url(&st.db).await? else {
        // The webhook was removed: these wait for the next one.
        return Ok(0);
    };
    let mut delivered = 0;
    for row in due {
        let body =
            model::event_json(&st.info, &row).map_err(|e| anyhow::anyhow!("{}", e.message))?;
        let outcome = client
            .post(&url)
            .header("x-siterec-event", &row.name)
            .json(&body)
            .send()
            .await;
        let error = match outcome {
            Ok(r) if r.status().is_success() => None,
            Ok(r) => Some(format!("{url} answered {}", r.status())),
            Err(e) => Some(format!("POST {url}: {e}")),
        };
        match error {
            None => {
                events_db::delivered(&st.db, &row.name).await?;
                delivered += 1;
            }
            Some(e) => {
                let wait = backoff(row.attempts);
                tracing::warn!(event = %row.name, "webhook delivery failed, next attempt in {wait:?}: {e}");
                let next = now_ms() + i64::try_from(wait.as_millis()).unwrap_or(i64::MAX / 2);
                events_db::delivery_failed(&st.db, &row.name, next, &e).await?;
            }
        }
    }
    Ok(delivered)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VaultInfo;
    use siterec_core::orchestration::JobInput;
    use siterec_core::state::JobKind;

    async fn open(dir: &std::path::Path) -> crate::Shared {
        std::sync::Arc::new(AppState {
            db: crate::db::open_for_test(dir).await.unwrap(),
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

    async fn exec(st: &AppState, sql: &str) {
        sqlx::query(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&st.db)
            .await
            .unwrap();
    }

    async fn count(st: &AppState, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&st.db)
            .await
            .unwrap()
    }

    /// Two Protected items (a VM and a server) of a 30 s policy, each with
    /// a point from 1970, and their agents heard from now.
    async fn setup(st: &AppState) {
        let now = now_ms();
        exec(
            st,
            "INSERT INTO fabrics (name, created_ms) VALUES ('primary', 0), ('recovery', 0)",
        )
        .await;
        exec(st, "INSERT INTO containers (fabric, name, created_ms) VALUES ('primary', 'pc', 0), ('recovery', 'rc', 0)").await;
        exec(st, r#"INSERT INTO policies (name, body, created_ms) VALUES ('pol', '{"instanceType":"HyperVReplicaAzure","copyFrequencySecs":30,"retention":{"kind":"hours","hours":1},"appConsistentFrequencyHours":0,"compression":true,"initialReplicationStart":null}', 0)"#).await;
        exec(st, &format!("INSERT INTO agents (id, fabric, hostname, key_id, cloud, data_url, version, enrolled_ms, last_seen_ms) VALUES ('agent-src', 'primary', 'h1', 'k', 'pc', NULL, '0', 0, {now}), ('agent-tgt', 'recovery', 'h2', 'k', 'rc', 'https://127.0.0.1:2', '0', 0, {now})")).await;
        exec(st, r#"INSERT INTO machines (fabric, container, name, agent_id, info, updated_ms) VALUES
            ('primary', 'pc', 'vm1', 'agent-src', '{"name":"vm1","kind":"VirtualMachine","disks":[],"nics":[],"vm":{"memoryMib":256,"cpus":1}}', 0),
            ('primary', 'pc', 'phys1', 'agent-src', '{"name":"phys1","kind":"PhysicalServer","disks":[]}', 0)"#).await;
        exec(st, "INSERT INTO protected_items (name, fabric, container, machine, policy, target_fabric, target_container, target_agent_id, state, created_ms, updated_ms) VALUES ('i-vm', 'primary', 'pc', 'vm1', 'pol', 'recovery', 'rc', 'agent-tgt', 'Protected', 0, 0), ('i-phys', 'primary', 'pc', 'phys1', 'pol', 'recovery', 'rc', 'agent-tgt', 'Protected', 0, 0)").await;
        exec(st, "INSERT INTO recovery_points (item, point_id, created_ms, consistency, bytes_sent, bytes_read, reported_ms) VALUES ('i-vm', 'p1', 1, 'CrashConsistent', 0, 0, 1), ('i-phys', 'q1', 1, 'CrashConsistent', 0, 0, 1)").await;
    }

    /// Each condition is raised once: the next round records nothing new;
    /// with no webhook set, nothing waits for delivery. An agent that
    /// goes silent is raised once too.
    #[tokio::test]
    async fn the_watcher_raises_each_condition_once() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        setup(&st).await;
        let opts = EventOptions::default();
        let since = now_ms();
        // Points from 1970: both items are far over the threshold.
        assert_eq!(watch_once(&st, &opts, since).await.unwrap(), 2);
        assert_eq!(watch_once(&st, &opts, since).await.unwrap(), 0);
        assert_eq!(
            count(&st, "SELECT COUNT(*) FROM events WHERE code = 'RpoThresholdExceeded' AND delivery IS NULL").await,
            2
        );
        exec(
            &st,
            "UPDATE agents SET last_seen_ms = 0 WHERE id = 'agent-src'",
        )
        .await;
        // Watching since long ago: the agent's silence counts.
        assert_eq!(watch_once(&st, &opts, 0).await.unwrap(), 1);
        assert_eq!(watch_once(&st, &opts, 0).await.unwrap(), 0);
        assert_eq!(
            count(&st, "SELECT COUNT(*) FROM events WHERE code = 'ServerNotHeardFrom' AND correlation_id = 'agent-src'").await,
            1
        );
    }

    /// A test failover completed longer ago than the vault allows is
    /// cleaned up by the vault, with an event; a recent one is left.
    #[tokio::test]
    async fn a_test_failover_left_too_long_is_cleaned_up_by_force_with_an_event() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        setup(&st).await;
        let now = now_ms();
        let day = 86_400_000;
        exec(&st, &format!("UPDATE protected_items SET test_failover_state = 'TestFailoverCompleted', test_failover_output = '{{\"disks\":[]}}', test_failover_ms = {} WHERE name = 'i-phys'", now - 15 * day)).await;
        exec(&st, &format!("UPDATE protected_items SET test_failover_state = 'TestFailoverCompleted', test_failover_output = '{{\"vmName\":\"vm1-test\",\"runDir\":\"/r\"}}', test_failover_ms = {} WHERE name = 'i-vm'", now - 13 * day)).await;
        let opts = EventOptions::default();
        watch_once(&st, &opts, now).await.unwrap();
        assert_eq!(
            count(&st, "SELECT COUNT(*) FROM jobs WHERE kind = 'TestFailoverCleanup' AND target_name = 'i-phys'").await,
            1
        );
        assert_eq!(
            count(&st, "SELECT COUNT(*) FROM jobs WHERE kind = 'TestFailoverCleanup' AND target_name = 'i-vm'").await,
            0,
            "13 days is within the two weeks"
        );
        let state: String = sqlx::query_scalar(
            "SELECT test_failover_state FROM protected_items WHERE name = 'i-phys'",
        )
        .fetch_one(&st.db)
        .await
        .unwrap();
        assert_eq!(state, "TestFailoverCleanupInitiated");
        let summary: String = sqlx::query_scalar("SELECT summary FROM events WHERE code = 'TestFailoverCompletedByForce' AND object_name = 'i-phys'")
            .fetch_one(&st.db)
            .await
            .unwrap();
        assert!(summary.contains("15.0 days"), "{summary}");
        // The next round starts nothing more.
        watch_once(&st, &opts, now_ms()).await.unwrap();
        assert_eq!(
            count(
                &st,
                "SELECT COUNT(*) FROM jobs WHERE kind = 'TestFailoverCleanup'"
            )
            .await,
            1
        );
        assert_eq!(
            count(
                &st,
                "SELECT COUNT(*) FROM events WHERE code = 'TestFailoverCompletedByForce'"
            )
            .await,
            1
        );
        // A shorter limit (the vault's --test-failover-max-age) takes the other.
        let short = EventOptions {
            test_failover_max_age: std::time::Duration::from_secs(12 * 86_400),
        };
        watch_once(&st, &short, now_ms()).await.unwrap();
        assert_eq!(
            count(&st, "SELECT COUNT(*) FROM jobs WHERE kind = 'TestFailoverCleanup' AND target_name = 'i-vm'").await,
            1
        );
    }

    /// A failover job that ends is an event, recorded by the engine as the
    /// job ends; a policy job that ends is not.
    #[tokio::test]
    async fn a_failed_failover_is_a_critical_event_and_a_policy_job_none() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        let mut tx = crate::db::begin(&st.db).await.unwrap();
        let failover = JobInput::parse(
            JobKind::UnplannedFailover,
            r#"{"item":"ghost","pointId":"p1"}"#,
        )
        .unwrap();
        let job = crate::jobs::create_job(&mut tx, &failover, "ProtectionEntity", "ghost", "/x")
            .await
            .unwrap();
        let policy = JobInput::parse(
            JobKind::CreatePolicy,
            r#"{"name":"p","policy":{"instanceType":"HyperVReplicaAzure","copyFrequencySecs":30,"retention":{"kind":"hours","hours":1},"appConsistentFrequencyHours":0,"compression":true,"initialReplicationStart":null}}"#,
        )
        .unwrap();
        crate::jobs::create_job(&mut tx, &policy, "ProtectionProfile", "p", "/p")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let engine = tokio::spawn(crate::jobs::run_engine(
            st.clone(),
            crate::arm::start_plan_item,
        ));
        let q = siterec_core::events::EventQuery::default();
        for _ in 0..100 {
            if !events_db::list(&st.db, &q, 10).await.unwrap().is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The policy job has ended too by now, raising nothing.
        tokio::time::sleep(Duration::from_millis(300)).await;
        engine.abort();
        let rows = events_db::list(&st.db, &q, 10).await.unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        let e = &rows[0];
        assert_eq!(
            (e.severity.as_str(), e.code.as_str()),
            ("Critical", "JobFailed")
        );
        assert_eq!(
            (e.object_name.as_str(), e.correlation_id.as_str()),
            ("ghost", job.as_str())
        );
        assert!(e.summary.contains("ghost"), "{}", e.summary);
    }
}
