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
//! Jobs' outcomes are recorded by the job engine itself ([`job_ended`]),
//! in the transaction that ends the job.

use std::time::Duration;

use siterec_core::events::{AgentSeen, ItemSeen};
use siterec_core::orchestration::JobInput;
use siterec_core::policy::Policy;

use crate::db::now_ms;
use crate::persist::events as events_db;
use crate::persist::jobs::Tx;
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

/// Records the outcome of a job that ended, if its kind is reported
/// (failovers, test failovers, commits, reprotects): inside the
/// transaction that ends it. `failure`: the error of a failed job.
pub async fn job_ended(
    tx: &mut Tx<'_>,
    job_id: &str,
    input: &JobInput,
    failure: Option<&str>,
) -> Result<(), sqlx::Error> {
    let target = input.item().unwrap_or(job_id);
    if let Some(e) = siterec_core::events::job_outcome(input.kind(), job_id, target, failure) {
        events_db::insert(tx, &e, now_ms()).await?;
    }
    Ok(())
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
