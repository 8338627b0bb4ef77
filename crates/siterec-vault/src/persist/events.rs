//! Events, the conditions they were raised for, alert settings, and the
//! webhook delivery of each event (at least once: an event stays Pending
//! until its webhook answered 2xx, so a restarted vault resumes).

use sqlx::Row;
use sqlx::any::AnyRow;

use crate::db::Db;
use crate::persist::inventory::Exec;
use crate::persist::jobs::Tx;
use siterec_core::events::{Conditions, EventQuery, NewEvent};
use siterec_core::orchestration::JobInput;

/// The only alert setting there is (ASR's name for it).
pub const DEFAULT_ALERT_SETTING: &str = "defaultAlertSetting";

/// An event as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct EventRow {
    pub name: String,
    pub seq: i64,
    pub time_ms: i64,
    pub severity: String,
    pub code: String,
    pub kind: String,
    pub object_name: String,
    pub correlation_id: String,
    pub fabric: Option<String>,
    pub summary: String,
    /// JSON.
    pub details: String,
    /// None, Pending or Delivered.
    pub delivery: Option<String>,
    pub attempts: i64,
    pub last_delivery_error: Option<String>,
}

impl EventRow {
    fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(EventRow {
            name: row.try_get("name")?,
            seq: row.try_get("seq")?,
            time_ms: row.try_get("time_ms")?,
            severity: row.try_get("severity")?,
            code: row.try_get("code")?,
            kind: row.try_get("kind")?,
            object_name: row.try_get("object_name")?,
            correlation_id: row.try_get("correlation_id")?,
            fabric: row.try_get("fabric")?,
            summary: row.try_get("summary")?,
            details: row.try_get("details")?,
            delivery: row.try_get("delivery")?,
            attempts: row.try_get("attempts")?,
            last_delivery_error: row.try_get("last_delivery_error")?,
        })
    }
}

const EVENT_COLUMNS: &str = "name, seq, time_ms, severity, code, kind, object_name, correlation_id, fabric, summary, details, delivery, attempts, last_delivery_error";

/// Records an event inside the caller's transaction; Pending delivery when
/// a webhook is configured. Returns its name.
pub async fn insert(tx: &mut Tx<'_>, e: &NewEvent, now: i64) -> Result<String, sqlx::Error> {
    let name = uuid::Uuid::new_v4().to_string();
    let webhook = webhook_url(&mut **tx).await?;
    sqlx::query(
        "INSERT INTO events (name, seq, time_ms, severity, code, kind, object_name, correlation_id, fabric, summary, details, delivery, attempts, next_attempt_ms)
         VALUES ($1, (SELECT COALESCE(MAX(seq), 0) + 1 FROM events), $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, 0, $12)",
    )
    .bind(&name)
    .bind(now)
    .bind(e.severity.as_str())
    .bind(e.code)
    .bind(e.kind)
    .bind(&e.name)
    .bind(&e.correlation)
    .bind(&e.fabric)
    .bind(&e.summary)
    .bind(e.details.to_string())
    .bind(webhook.as_ref().map(|_| "Pending"))
    .bind(webhook.as_ref().map(|_| now))
    .execute(&mut **tx)
    .await?;
    Ok(name)
}

/// Records the outcome of a job that ended, if its kind is reported
/// (failovers, test failovers, commits, reprotects): the job engine calls
/// it inside the transaction that ends the job. `failure`: the error of a
/// failed job.
pub async fn job_ended(
    tx: &mut Tx<'_>,
    job_id: &str,
    input: &JobInput,
    failure: Option<&str>,
) -> Result<(), sqlx::Error> {
    let target = input.item().unwrap_or(job_id);
    if let Some(e) = siterec_core::events::job_outcome(input.kind(), job_id, target, failure) {
        insert(tx, &e, crate::db::now_ms()).await?;
    }
    Ok(())
}

/// Events matching the query, oldest first, at most `limit` of the newest.
pub async fn list(db: &Db, q: &EventQuery, limit: i64) -> Result<Vec<EventRow>, sqlx::Error> {
    let mut clauses = Vec::new();
    let mut n = 0;
    let mut text = |col: &str, v: &Option<String>, values: &mut Vec<String>| {
        if let Some(v) = v {
            n += 1;
            clauses.push(format!("{col} = ${n}"));
            values.push(v.clone());
        }
    };
    let mut owned = Vec::new();
    let severity = q.severity.map(|s| s.as_str().to_string());
    text("severity", &severity, &mut owned);
    text("kind", &q.event_type, &mut owned);
    text("code", &q.event_code, &mut owned);
    text("object_name", &q.affected_object_friendly_name, &mut owned);
    text(
        "correlation_id",
        &q.affected_object_correlation_id,
        &mut owned,
    );
    text("fabric", &q.fabric_name, &mut owned);
    let mut ints = Vec::new();
    if let Some(s) = q.start_ms {
        n += 1;
        clauses.push(format!("time_ms >= ${n}"));
        ints.push(s);
    }
    if let Some(e) = q.end_ms {
        n += 1;
        clauses.push(format!("time_ms <= ${n}"));
        ints.push(e);
    }
    let filter = if clauses.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", clauses.join(" AND "))
    };
    let sql = format!(
        "SELECT {EVENT_COLUMNS} FROM events {filter} ORDER BY seq DESC LIMIT ${}",
        n + 1
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
    for t in owned {
        query = query.bind(t);
    }
    for i in ints {
        query = query.bind(i);
    }
    let rows = query.bind(limit).fetch_all(db).await?;
    let mut out = rows
        .iter()
        .map(EventRow::from_row)
        .collect::<Result<Vec<_>, _>>()?;
    out.reverse();
    Ok(out)
}

/// The event of that name.
pub async fn get(db: &Db, name: &str) -> Result<Option<EventRow>, sqlx::Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE name = $1"
    )))
    .bind(name)
    .fetch_optional(db)
    .await?;
    row.as_ref().map(EventRow::from_row).transpose()
}

/// Events whose webhook delivery is due, in raising order.
pub async fn due_deliveries(db: &Db, now: i64, limit: i64) -> Result<Vec<EventRow>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE delivery = 'Pending' AND next_attempt_ms <= $1 ORDER BY seq LIMIT $2"
    )))
    .bind(now)
    .bind(limit)
    .fetch_all(db)
    .await?;
    rows.iter().map(EventRow::from_row).collect()
}

/// The webhook answered 2xx.
pub async fn delivered(db: &Db, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE events SET delivery = 'Delivered', attempts = attempts + 1, next_attempt_ms = NULL, last_delivery_error = NULL WHERE name = $1",
    )
    .bind(name)
    .execute(db)
    .await?;
    Ok(())
}

/// A delivery attempt failed: try again at `next_ms`.
pub async fn delivery_failed(
    db: &Db,
    name: &str,
    next_ms: i64,
    error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE events SET attempts = attempts + 1, next_attempt_ms = $1, last_delivery_error = $2 WHERE name = $3 AND delivery = 'Pending'",
    )
    .bind(next_ms)
    .bind(error)
    .bind(name)
    .execute(db)
    .await?;
    Ok(())
}

/// The conditions recorded by the last evaluation.
pub async fn conditions(tx: &mut Tx<'_>) -> Result<Conditions, sqlx::Error> {
    let rows: Vec<(String, String)> = sqlx::query_as("SELECT subject, state FROM event_conditions")
        .fetch_all(&mut **tx)
        .await?;
    Ok(rows.into_iter().collect())
}

/// Records `next` in place of `prev` (writing only what changed).
pub async fn set_conditions(
    tx: &mut Tx<'_>,
    prev: &Conditions,
    next: &Conditions,
    now: i64,
) -> Result<(), sqlx::Error> {
    for key in prev.keys().filter(|k| !next.contains_key(*k)) {
        sqlx::query("DELETE FROM event_conditions WHERE subject = $1")
            .bind(key)
            .execute(&mut **tx)
            .await?;
    }
    for (key, state) in next.iter().filter(|(k, s)| prev.get(*k) != Some(*s)) {
        sqlx::query(
            "INSERT INTO event_conditions (subject, state, since_ms) VALUES ($1, $2, $3)
             ON CONFLICT (subject) DO UPDATE SET state = excluded.state, since_ms = excluded.since_ms",
        )
        .bind(key)
        .bind(state)
        .bind(now)
        .execute(&mut **tx)
        .await?;
    }
    Ok(())
}

/// (id, host name, fabric, last heartbeat, heartbeat period).
pub type AgentSeenRow = (String, String, String, Option<i64>, Option<i64>);

/// Every enrolled agent as the evaluator sees it: id, host name, fabric,
/// last heartbeat, heartbeat period.
pub async fn agents_seen(db: &Db) -> Result<Vec<AgentSeenRow>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, hostname, fabric, last_seen_ms, heartbeat_ms FROM agents ORDER BY enrolled_ms, id",
    )
    .fetch_all(db)
    .await
}

/// Items whose test failover completed before `before_ms` and was never
/// cleaned up.
pub async fn completed_test_failovers_before(
    db: &Db,
    before_ms: i64,
) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT name FROM protected_items WHERE test_failover_state = 'TestFailoverCompleted' AND test_failover_ms < $1 ORDER BY name",
    )
    .bind(before_ms)
    .fetch_all(db)
    .await
}

/// Alert settings as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertRow {
    pub name: String,
    pub send_to_owners: String,
    pub emails: Vec<String>,
    pub locale: Option<String>,
    pub webhook_url: Option<String>,
}

/// The alert setting of that name.
pub async fn alert_setting<'e>(
    db: impl Exec<'e>,
    name: &str,
) -> Result<Option<AlertRow>, sqlx::Error> {
    type Stored = (String, String, String, Option<String>, Option<String>);
    let row: Option<Stored> = sqlx::query_as(
        "SELECT name, send_to_owners, emails, locale, webhook_url FROM alert_settings WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(db)
    .await?;
    row.map(|(name, send_to_owners, emails, locale, webhook_url)| {
        let emails = serde_json::from_str(&emails).map_err(|e| {
            sqlx::Error::Decode(format!("alert setting '{name}': stored emails: {e}").into())
        })?;
        Ok(AlertRow {
            name,
            send_to_owners,
            emails,
            locale,
            webhook_url,
        })
    })
    .transpose()
}

/// Writes the alert setting (created or replaced).
pub async fn put_alert_setting(db: &Db, a: &AlertRow, now: i64) -> Result<(), sqlx::Error> {
    let emails = serde_json::to_string(&a.emails)
        .map_err(|e| sqlx::Error::Encode(format!("alert emails: {e}").into()))?;
    sqlx::query(
        "INSERT INTO alert_settings (name, send_to_owners, emails, locale, webhook_url, updated_ms) VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (name) DO UPDATE SET send_to_owners = excluded.send_to_owners, emails = excluded.emails, locale = excluded.locale, webhook_url = excluded.webhook_url, updated_ms = excluded.updated_ms",
    )
    .bind(&a.name)
    .bind(&a.send_to_owners)
    .bind(emails)
    .bind(&a.locale)
    .bind(&a.webhook_url)
    .bind(now)
    .execute(db)
    .await?;
    Ok(())
}

/// The webhook events go to, if one is set.
pub async fn webhook_url<'e>(db: impl Exec<'e>) -> Result<Option<String>, sqlx::Error> {
    let url: Option<Option<String>> =
        sqlx::query_scalar("SELECT webhook_url FROM alert_settings WHERE name = $1")
            .bind(DEFAULT_ALERT_SETTING)
            .fetch_optional(db)
            .await?;
    Ok(url.flatten().filter(|u| !u.is_empty()))
}
