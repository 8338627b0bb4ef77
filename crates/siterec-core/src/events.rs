//! Events and alerts: what the vault raises from what it observes.
//!
//! The vault observes, every few seconds, each protected item (its
//! replication health and its RPO against its policy's threshold) and each
//! agent (when it was last heard from against its heartbeat interval).
//! [`evaluate`] compares those facts with the conditions it recorded last
//! time and says which events to raise: an event when a condition starts
//! (an RPO over its threshold, a server not heard from, a health that
//! worsened) and an Info event when it ends — once each, edge-triggered,
//! so a condition that lasts raises nothing more. The conditions are
//! returned for the vault to store with the events, in one transaction,
//! so a restarted vault neither forgets nor repeats them.
//!
//! Jobs' outcomes (failovers, test failovers, commits, reprotects) are
//! events too ([`job_outcome`]), and so is a test failover left running
//! longer than the vault allows, which the vault then cleans up by force
//! ([`stale_test_failover`]).
//!
//! [`EventQuery::parse_filter`] reads the OData `$filter` of the ARM list.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::state::{JobKind, TestFailoverState};

/// How bad an event is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Critical,
    Warning,
    Info,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Critical => "Critical",
            Self::Warning => "Warning",
            Self::Info => "Info",
        }
    }

    /// Case-insensitive, as the API takes it.
    pub fn parse(s: &str) -> Option<Self> {
        [Self::Critical, Self::Warning, Self::Info]
            .into_iter()
            .find(|v| v.as_str().eq_ignore_ascii_case(s))
    }
}

/// The event codes (ARM `eventCode`).
pub mod codes {
    /// An item's RPO went over its policy's threshold.
    pub const RPO_THRESHOLD_EXCEEDED: &str = "RpoThresholdExceeded";
    /// ... and came back under it.
    pub const RPO_WITHIN_THRESHOLD: &str = "RpoWithinThreshold";
    /// An item's replication health changed (errors, agent warnings,
    /// protection failed; the RPO has its own events).
    pub const REPLICATION_HEALTH_CHANGED: &str = "ReplicationHealthChanged";
    /// An agent's heartbeat is older than three of its intervals.
    pub const SERVER_NOT_HEARD_FROM: &str = "ServerNotHeardFrom";
    /// ... and it was heard from again.
    pub const SERVER_HEARD_FROM: &str = "ServerHeardFrom";
    /// A failover-type job ended (`JobSucceeded` / `JobFailed`).
    pub const JOB_SUCCEEDED: &str = "JobSucceeded";
    pub const JOB_FAILED: &str = "JobFailed";
    /// A test failover left longer than allowed is being cleaned up.
    pub const TEST_FAILOVER_COMPLETED_BY_FORCE: &str = "TestFailoverCompletedByForce";
}

/// What an event is about (ARM `eventType`).
pub mod types {
    pub const ITEM: &str = "ProtectedItem";
    pub const SERVER: &str = "Server";
    pub const JOB: &str = "Job";
}

/// An event to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub severity: Severity,
    pub code: &'static str,
    /// One of [`types`].
    pub kind: &'static str,
    /// The item's, agent's host or job's name (`affectedObjectFriendlyName`).
    pub name: String,
    /// The item's or job's name, the agent's id (`affectedObjectCorrelationId`).
    pub correlation: String,
    pub fabric: Option<String>,
    pub summary: String,
    pub details: Value,
}

/// A protected item as observed.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemSeen {
    pub name: String,
    pub fabric: String,
    /// Its protection state is Protected: only then does the RPO count.
    pub protected: bool,
    /// Its replication health without the RPO: Normal, Warning or
    /// Critical, and the errors that make it so.
    pub health: String,
    pub health_errors: Vec<String>,
    /// Seconds since its latest recovery point.
    pub rpo_secs: Option<i64>,
    /// Its policy's [`crate::policy::Policy::rpo_threshold_secs`].
    pub threshold_secs: i64,
}

/// An enrolled agent as observed.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSeen {
    pub id: String,
    pub hostname: String,
    pub fabric: String,
    pub last_seen_ms: Option<i64>,
    /// The heartbeat period it asked for (`wait_ms`); `None`: not known.
    pub interval_ms: Option<i64>,
}

/// The heartbeat period assumed for an agent that did not say.
pub const DEFAULT_HEARTBEAT_MS: i64 = 1000;

/// How long an agent may be silent before it is not heard from: three
/// heartbeat intervals (at least a second each, at most the vault's
/// longest long poll, 10 s).
pub fn silence_allowed_ms(interval_ms: Option<i64>) -> i64 {
    3 * interval_ms
        .unwrap_or(DEFAULT_HEARTBEAT_MS)
        .clamp(1000, 10_000)
}

/// The conditions last recorded: key (`item/NAME/rpo`, `item/NAME/health`,
/// `agent/ID/seen`) → state.
pub type Conditions = BTreeMap<String, String>;

const EXCEEDED: &str = "Exceeded";
const WITHIN: &str = "Within";
const SILENT: &str = "NotHeardFrom";
const HEARD: &str = "HeardFrom";

/// Compares what is observed now with the conditions recorded before:
/// the events to raise, and the conditions to record instead. Items and
/// agents no longer there drop out of the conditions without an event.
/// `watching_since_ms` is when this vault started watching: an agent is
/// not counted silent for the time the vault itself was down.
pub fn evaluate(
    prev: &Conditions,
    items: &[ItemSeen],
    agents: &[AgentSeen],
    now_ms: i64,
    watching_since_ms: i64,
) -> (Vec<NewEvent>, Conditions) {
    let mut events = Vec::new();
    let mut next = Conditions::new();
    for i in items {
        let key = format!("item/{}/health", i.name.to_ascii_lowercase());
        let before = prev.get(&key).map(String::as_str).unwrap_or("Normal");
        if before != i.health {
            let severity = match i.health.as_str() {
                "Critical" => Severity::Critical,
                "Normal" => Severity::Info,
                _ => Severity::Warning,
            };
            let why = if i.health_errors.is_empty() {
                String::new()
            } else {
                format!(": {}", i.health_errors.join("; "))
            };
            events.push(NewEvent {
                severity,
                code: codes::REPLICATION_HEALTH_CHANGED,
                kind: types::ITEM,
                name: i.name.clone(),
                correlation: i.name.clone(),
                fabric: Some(i.fabric.clone()),
                summary: format!(
                    "replication health of item '{}' is {} (was {before}){why}",
                    i.name, i.health
                ),
                details: json!({
                    "previousHealth": before,
                    "health": i.health,
                    "healthErrors": i.health_errors,
                }),
            });
        }
        next.insert(key, i.health.clone());

        if !i.protected {
            continue;
        }
        let key = format!("item/{}/rpo", i.name.to_ascii_lowercase());
        let over = i.rpo_secs.is_some_and(|r| r > i.threshold_secs);
        let now = if over { EXCEEDED } else { WITHIN };
        let before = prev.get(&key).map(String::as_str).unwrap_or(WITHIN);
        if now != before {
            let rpo = i
                .rpo_secs
                .map_or("no recovery point".to_string(), |r| format!("{r} s"));
            let (severity, code, summary) = if over {
                (
                    Severity::Warning,
                    codes::RPO_THRESHOLD_EXCEEDED,
                    format!(
                        "RPO of item '{}' is {rpo}, over its policy's threshold of {} s: replication is behind",
                        i.name, i.threshold_secs
                    ),
                )
            } else {
                (
                    Severity::Info,
                    codes::RPO_WITHIN_THRESHOLD,
                    format!(
                        "RPO of item '{}' is {rpo}, within its policy's threshold of {} s again",
                        i.name, i.threshold_secs
                    ),
                )
            };
            events.push(NewEvent {
                severity,
                code,
                kind: types::ITEM,
                name: i.name.clone(),
                correlation: i.name.clone(),
                fabric: Some(i.fabric.clone()),
                summary,
                details: json!({
                    "rpoInSeconds": i.rpo_secs,
                    "rpoThresholdInSeconds": i.threshold_secs,
                }),
            });
        }
        next.insert(key, now.to_string());
    }
    for a in agents {
        let key = format!("agent/{}/seen", a.id);
        let allowed = silence_allowed_ms(a.interval_ms);
        let heard = a.last_seen_ms.unwrap_or(i64::MIN).max(watching_since_ms);
        let silent = now_ms - heard > allowed;
        let now = if silent { SILENT } else { HEARD };
        let before = prev.get(&key).map(String::as_str).unwrap_or(HEARD);
        if now != before {
            let last = a.last_seen_ms.map_or("never".to_string(), |t| {
                format!("{} s ago", (now_ms - t) / 1000)
            });
            let (severity, code, summary) = if silent {
                (
                    Severity::Critical,
                    codes::SERVER_NOT_HEARD_FROM,
                    format!(
                        "agent {} on '{}' (fabric {}) has not been heard from: its last heartbeat was {last}, more than three heartbeat intervals ({} s); check that the agent runs and reaches the vault",
                        a.id,
                        a.hostname,
                        a.fabric,
                        allowed / 1000
                    ),
                )
            } else {
                (
                    Severity::Info,
                    codes::SERVER_HEARD_FROM,
                    format!(
                        "agent {} on '{}' (fabric {}) is heard from again",
                        a.id, a.hostname, a.fabric
                    ),
                )
            };
            events.push(NewEvent {
                severity,
                code,
                kind: types::SERVER,
                name: a.hostname.clone(),
                correlation: a.id.clone(),
                fabric: Some(a.fabric.clone()),
                summary,
                details: json!({
                    "agentId": a.id,
                    "lastHeartbeatMs": a.last_seen_ms,
                    "allowedSilenceMs": allowed,
                }),
            });
        }
        next.insert(key, now.to_string());
    }
    (events, next)
}

/// The jobs whose outcome is an event: those that move a machine between
/// sites or test it there.
pub fn job_is_reported(kind: JobKind) -> bool {
    matches!(
        kind,
        JobKind::UnplannedFailover
            | JobKind::PlannedFailover
            | JobKind::TestFailover
            | JobKind::TestFailoverCleanup
            | JobKind::CommitFailover
            | JobKind::Reprotect
            | JobKind::ChangeRecoveryPoint
    )
}

/// The event for a job that ended, if its kind is reported:
/// `failure` is the error of a failed job, `None` for one that succeeded.
pub fn job_outcome(
    kind: JobKind,
    job_id: &str,
    target: &str,
    failure: Option<&str>,
) -> Option<NewEvent> {
    if !job_is_reported(kind) {
        return None;
    }
    let what = kind.display_name();
    let (severity, code, summary) = match failure {
        None => (
            Severity::Info,
            codes::JOB_SUCCEEDED,
            format!("{what} of '{target}' succeeded (job {job_id})"),
        ),
        Some(e) => (
            Severity::Critical,
            codes::JOB_FAILED,
            format!("{what} of '{target}' failed (job {job_id}): {e}"),
        ),
    };
    Some(NewEvent {
        severity,
        code,
        kind: types::JOB,
        name: target.to_string(),
        correlation: job_id.to_string(),
        fabric: None,
        summary,
        details: json!({
            "jobId": job_id,
            "scenarioName": kind.as_str(),
            "state": if failure.is_some() { "Failed" } else { "Succeeded" },
            "error": failure,
        }),
    })
}

/// Whether an item's test failover has been left completed longer than
/// `max_age_ms` (the seeds: "if a test failover continues longer than two
/// weeks it's completed by force").
pub fn stale_test_failover(
    state: TestFailoverState,
    completed_ms: Option<i64>,
    now_ms: i64,
    max_age_ms: i64,
) -> bool {
    state == TestFailoverState::TestFailoverCompleted
        && completed_ms.is_some_and(|t| now_ms - t > max_age_ms)
}

/// The event for a test failover cleaned up by force.
pub fn forced_cleanup(item: &str, fabric: &str, job_id: &str, age_ms: i64) -> NewEvent {
    let days = age_ms as f64 / 86_400_000.0;
    NewEvent {
        severity: Severity::Warning,
        code: codes::TEST_FAILOVER_COMPLETED_BY_FORCE,
        kind: types::ITEM,
        name: item.to_string(),
        correlation: item.to_string(),
        fabric: Some(fabric.to_string()),
        summary: format!(
            "the test failover of item '{item}' completed {days:.1} days ago and was never cleaned up: the vault is cleaning it up (job {job_id})"
        ),
        details: json!({"jobId": job_id, "ageMs": age_ms}),
    }
}

/// The events an ARM list asks for (ASR `EventQueryParameter`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EventQuery {
    pub severity: Option<Severity>,
    pub event_type: Option<String>,
    pub event_code: Option<String>,
    pub affected_object_friendly_name: Option<String>,
    pub affected_object_correlation_id: Option<String>,
    pub fabric_name: Option<String>,
    /// Unix ms, inclusive.
    pub start_ms: Option<i64>,
    /// Unix ms, inclusive.
    pub end_ms: Option<i64>,
}

impl EventQuery {
    /// Reads an OData `$filter` of `Field op 'value'` clauses joined by
    /// `and`: `Severity`, `EventType`, `EventCode`,
    /// `AffectedObjectFriendlyName`, `AffectedObjectCorrelationId`,
    /// `FabricName` with `eq`; `StartTime` with `ge`/`gt`, `EndTime` with
    /// `le`/`lt`, `TimeOfOccurrence` with any of those four (times RFC
    /// 3339). The error names the clause and what is accepted.
    pub fn parse_filter(filter: &str) -> Result<EventQuery, String> {
        let mut q = EventQuery::default();
        let mut rest = filter.trim();
        if rest.is_empty() {
            return Ok(q);
        }
        loop {
            let (field, after) = split_word(rest);
            let (op, after) = split_word(after);
            let (value, after) = quoted(after).ok_or_else(|| {
                format!(
                    "$filter: after '{field} {op}' a value in single quotes is expected, e.g. Severity eq 'Critical'"
                )
            })?;
            let op_l = op.to_ascii_lowercase();
            let f = field.to_ascii_lowercase();
            let eq_only = |slot: &mut Option<String>| -> Result<(), String> {
                if op_l != "eq" {
                    return Err(format!("$filter: {field} takes only 'eq', not '{op}'"));
                }
                *slot = Some(value.clone());
                Ok(())
            };
            match f.as_str() {
                "severity" => {
                    if op_l != "eq" {
                        return Err(format!("$filter: Severity takes only 'eq', not '{op}'"));
                    }
                    q.severity = Some(Severity::parse(&value).ok_or_else(|| {
                        format!("$filter: severity '{value}' is not one of Critical, Warning, Info")
                    })?);
                }
                "eventtype" => eq_only(&mut q.event_type)?,
                "eventcode" => eq_only(&mut q.event_code)?,
                "affectedobjectfriendlyname" => eq_only(&mut q.affected_object_friendly_name)?,
                "affectedobjectcorrelationid" => eq_only(&mut q.affected_object_correlation_id)?,
                "fabricname" => eq_only(&mut q.fabric_name)?,
                "starttime" | "endtime" | "timeofoccurrence" | "timeofoccurence" => {
                    let t = parse_time(&value).ok_or_else(|| {
                        format!(
                            "$filter: {field} '{value}' is not an RFC 3339 time such as 2026-01-31T22:00:00Z"
                        )
                    })?;
                    let lower = match (f.as_str(), op_l.as_str()) {
                        ("starttime" | "timeofoccurrence" | "timeofoccurence", "ge") => Some(t),
                        ("starttime" | "timeofoccurrence" | "timeofoccurence", "gt") => Some(t + 1),
                        _ => None,
                    };
                    let upper = match (f.as_str(), op_l.as_str()) {
                        ("endtime" | "timeofoccurrence" | "timeofoccurence", "le") => Some(t),
                        ("endtime" | "timeofoccurrence" | "timeofoccurence", "lt") => Some(t - 1),
                        _ => None,
                    };
                    match (lower, upper) {
                        (Some(l), _) => q.start_ms = Some(l),
                        (_, Some(u)) => q.end_ms = Some(u),
                        _ => {
                            return Err(format!(
                                "$filter: {field} does not take '{op}': StartTime takes ge or gt, EndTime le or lt"
                            ));
                        }
                    }
                }
                _ => {
                    return Err(format!(
                        "$filter: '{field}' is not a field events are filtered by: use Severity, EventType, EventCode, AffectedObjectFriendlyName, AffectedObjectCorrelationId, FabricName, StartTime, EndTime or TimeOfOccurrence"
                    ));
                }
            }
            rest = after.trim_start();
            if rest.is_empty() {
                return Ok(q);
            }
            let (and, after) = split_word(rest);
            if !and.eq_ignore_ascii_case("and") {
                return Err(format!(
                    "$filter: clauses are joined with 'and', found '{and}'"
                ));
            }
            rest = after.trim_start();
        }
    }
}

fn split_word(s: &str) -> (&str, &str) {
    let s = s.trim_start();
    let end = s.find(char::is_whitespace).unwrap_or(s.len());
    (&s[..end], &s[end..])
}

/// A single-quoted OData string ('' is a quote) and what follows it.
fn quoted(s: &str) -> Option<(String, &str)> {
    let s = s.trim_start();
    let body = s.strip_prefix('\'')?;
    let mut out = String::new();
    let mut chars = body.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        if c == '\'' {
            if matches!(chars.peek(), Some((_, '\''))) {
                chars.next();
                out.push('\'');
                continue;
            }
            return Some((out, &body[i + 1..]));
        }
        out.push(c);
    }
    None
}

fn parse_time(s: &str) -> Option<i64> {
    let t = time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(health: &str, rpo: Option<i64>) -> ItemSeen {
        ItemSeen {
            name: "web01".into(),
            fabric: "primary".into(),
            protected: true,
            health: health.into(),
            health_errors: if health == "Normal" {
                vec![]
            } else {
                vec!["disk spool in use".into()]
            },
            rpo_secs: rpo,
            threshold_secs: 60,
        }
    }

    fn agent(last_seen: Option<i64>) -> AgentSeen {
        AgentSeen {
            id: "agent-1".into(),
            hostname: "host1".into(),
            fabric: "primary".into(),
            last_seen_ms: last_seen,
            interval_ms: Some(1000),
        }
    }

    fn codes_of(events: &[NewEvent]) -> Vec<&str> {
        events.iter().map(|e| e.code).collect()
    }

    #[test]
    fn an_rpo_over_its_threshold_raises_one_event_and_one_when_it_comes_back() {
        let mut c = Conditions::new();
        let mut raised = Vec::new();
        for rpo in [
            Some(10),
            Some(59),
            Some(61),
            Some(120),
            Some(400),
            Some(5),
            Some(3),
        ] {
            let (ev, next) = evaluate(&c, &[item("Normal", rpo)], &[], 0, 0);
            raised.push(codes_of(&ev).join(","));
            c = next;
        }
        assert_eq!(
            raised,
            [
                "",
                "",
                "RpoThresholdExceeded",
                "",
                "",
                "RpoWithinThreshold",
                ""
            ]
        );
        let (ev, _) = evaluate(&Conditions::new(), &[item("Normal", Some(61))], &[], 0, 0);
        assert_eq!(ev[0].severity, Severity::Warning);
        assert!(
            ev[0].summary.contains("61 s") && ev[0].summary.contains("60 s"),
            "{}",
            ev[0].summary
        );
        assert_eq!(ev[0].details["rpoThresholdInSeconds"], 60);
    }

    #[test]
    fn an_item_not_protected_has_no_rpo_alert_and_a_gone_item_is_forgotten() {
        let mut i = item("Normal", Some(1000));
        i.protected = false;
        let (ev, c) = evaluate(&Conditions::new(), &[i], &[], 0, 0);
        assert!(ev.is_empty());
        assert!(!c.contains_key("item/web01/rpo"));
        let (_, c) = evaluate(&Conditions::new(), &[item("Normal", Some(1000))], &[], 0, 0);
        assert_eq!(c["item/web01/rpo"], "Exceeded");
        let (ev, c) = evaluate(&c, &[], &[], 0, 0);
        assert!(ev.is_empty() && c.is_empty(), "{ev:?} {c:?}");
    }

    #[test]
    fn health_changes_are_edges_with_their_severity() {
        let mut c = Conditions::new();
        let mut seen = Vec::new();
        for h in [
            "Normal", "Warning", "Warning", "Critical", "Normal", "Normal",
        ] {
            let (ev, next) = evaluate(&c, &[item(h, Some(1))], &[], 0, 0);
            seen.push(
                ev.iter()
                    .map(|e| e.severity.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
            );
            c = next;
        }
        assert_eq!(seen, ["", "Warning", "", "Critical", "Info", ""]);
        let (ev, _) = evaluate(&Conditions::new(), &[item("Warning", Some(1))], &[], 0, 0);
        assert!(
            ev[0].summary.contains("disk spool in use"),
            "{}",
            ev[0].summary
        );
    }

    #[test]
    fn a_server_silent_for_three_intervals_is_not_heard_from_once() {
        let mut c = Conditions::new();
        let mut seen = Vec::new();
        // Heard at 10 s; silent until 20 s; heard at 20 s again.
        for (now, last) in [
            (11_000, 10_000),
            (13_000, 10_000),
            (13_001, 10_000),
            (18_000, 10_000),
            (20_500, 20_000),
            (21_000, 20_000),
        ] {
            let (ev, next) = evaluate(&c, &[], &[agent(Some(last))], now, 0);
            seen.push(codes_of(&ev).join(","));
            c = next;
        }
        assert_eq!(
            seen,
            ["", "", "ServerNotHeardFrom", "", "ServerHeardFrom", ""]
        );
        let (ev, _) = evaluate(&Conditions::new(), &[], &[agent(Some(0))], 60_000, 0);
        assert_eq!(ev[0].severity, Severity::Critical);
        assert!(
            ev[0].summary.contains("60 s ago") && ev[0].summary.contains("host1"),
            "{}",
            ev[0].summary
        );
    }

    #[test]
    fn the_vault_being_down_does_not_count_as_an_agent_being_silent() {
        // Last heard an hour ago, but this vault started watching a second ago.
        let (ev, _) = evaluate(
            &Conditions::new(),
            &[],
            &[agent(Some(0))],
            3_600_000,
            3_599_000,
        );
        assert!(ev.is_empty(), "{ev:?}");
        let (ev, _) = evaluate(
            &Conditions::new(),
            &[],
            &[agent(Some(0))],
            3_600_000,
            3_590_000,
        );
        assert_eq!(codes_of(&ev), ["ServerNotHeardFrom"]);
    }

    #[test]
    fn silence_follows_the_heartbeat_interval_within_bounds() {
        assert_eq!(silence_allowed_ms(Some(1000)), 3000);
        assert_eq!(silence_allowed_ms(Some(5000)), 15_000);
        assert_eq!(
            silence_allowed_ms(Some(100)),
            3000,
            "at least a second each"
        );
        assert_eq!(
            silence_allowed_ms(Some(600_000)),
            30_000,
            "the vault waits 10 s at most"
        );
        assert_eq!(silence_allowed_ms(None), 3000);
    }

    #[test]
    fn failover_outcomes_are_events_and_other_jobs_are_not() {
        let ok = job_outcome(JobKind::PlannedFailover, "j1", "web01", None).unwrap();
        assert_eq!(
            (ok.severity, ok.code, ok.kind),
            (Severity::Info, codes::JOB_SUCCEEDED, types::JOB)
        );
        let bad =
            job_outcome(JobKind::UnplannedFailover, "j2", "web01", Some("disk full")).unwrap();
        assert_eq!(bad.severity, Severity::Critical);
        assert!(
            bad.summary.contains("disk full") && bad.summary.contains("j2"),
            "{}",
            bad.summary
        );
        assert_eq!(bad.details["scenarioName"], "UnplannedFailover");
        for k in [
            JobKind::TestFailover,
            JobKind::CommitFailover,
            JobKind::Reprotect,
        ] {
            assert!(job_outcome(k, "j", "i", None).is_some(), "{k:?}");
        }
        for k in [
            JobKind::CreatePolicy,
            JobKind::EnableProtection,
            JobKind::VerifyStore,
        ] {
            assert!(job_outcome(k, "j", "i", None).is_none(), "{k:?}");
        }
    }

    #[test]
    fn only_a_completed_test_failover_older_than_the_limit_is_stale() {
        let day = 86_400_000;
        let s = TestFailoverState::TestFailoverCompleted;
        assert!(stale_test_failover(s, Some(0), 15 * day, 14 * day));
        assert!(!stale_test_failover(s, Some(0), 13 * day, 14 * day));
        assert!(!stale_test_failover(s, None, 15 * day, 14 * day));
        for other in [
            TestFailoverState::TestFailoverInitiated,
            TestFailoverState::TestFailoverCleanupInitiated,
            TestFailoverState::MarkedForDeletion,
            TestFailoverState::None,
        ] {
            assert!(!stale_test_failover(other, Some(0), 15 * day, 14 * day));
        }
    }

    #[test]
    fn filters_read_the_query_parameters_and_refuse_what_they_cannot() {
        let q = EventQuery::parse_filter(
            "Severity eq 'critical' and AffectedObjectFriendlyName eq 'o''brien' and StartTime ge '2026-01-31T22:00:00Z' and EndTime le '2026-02-01T00:00:00Z' and FabricName eq 'primary'",
        )
        .unwrap();
        assert_eq!(q.severity, Some(Severity::Critical));
        assert_eq!(q.affected_object_friendly_name.as_deref(), Some("o'brien"));
        assert_eq!(q.start_ms, Some(1_769_896_800_000));
        assert_eq!(q.end_ms, Some(1_769_904_000_000));
        assert_eq!(q.fabric_name.as_deref(), Some("primary"));
        let q = EventQuery::parse_filter("TimeOfOccurrence gt '2026-01-31T22:00:00Z'").unwrap();
        assert_eq!(q.start_ms, Some(1_769_896_800_001));
        assert_eq!(
            EventQuery::parse_filter("  ").unwrap(),
            EventQuery::default()
        );
        for (f, needle) in [
            ("Severity eq 'Bad'", "not one of Critical"),
            ("Colour eq 'red'", "not a field"),
            ("Severity ne 'Info'", "only 'eq'"),
            ("Severity eq Info", "single quotes"),
            ("StartTime ge 'yesterday'", "RFC 3339"),
            ("StartTime le '2026-01-31T22:00:00Z'", "ge or gt"),
            (
                "Severity eq 'Info' or EventType eq 'Job'",
                "joined with 'and'",
            ),
            ("EventType eq 'Job", "single quotes"),
        ] {
            let e = EventQuery::parse_filter(f).unwrap_err();
            assert!(e.contains(needle), "{f}: {e}");
        }
    }
}
