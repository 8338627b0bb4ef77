//! Which jobs a list or an export asks for: Site Recovery's
//! `JobQueryParameter`, read from an ARM `$filter` (`startTime eq
//! '2026-12-01T00:00:00Z' and jobStatus eq 'Failed'`, as the Azure SDK's
//! `replication_jobs.list(filter=...)` sends it) or from the JSON body of
//! `replicationJobs/export`; and the CSV an export writes. Pure: the vault
//! loads the jobs ([`JobFacts`]) and keeps those that [`JobQuery::matches`].
//!
//! The fields, as ASR names them (case-insensitive in a filter):
//!
//! - `startTime`, `endTime`: RFC 3339 times; a job matches when it started
//!   (or, not started yet, was created) in `[startTime, endTime]`. A time
//!   without an offset is local time at `timezoneOffset`.
//! - `timezoneOffset`: minutes east of UTC (ASR's number), for such times.
//! - `fabricId`: a fabric's ARM id or its name: jobs on resources under it.
//! - `affectedObjectTypes`: the job's `targetInstanceType` (e.g.
//!   `ProtectionEntity`, `ProtectionContainerMapping`), a comma-separated list.
//! - `jobStatus`: the job's `state` (`Succeeded`, `Failed`, `InProgress`,
//!   `NotStarted`, `Cancelled`…), a comma-separated list.
//! - `jobName`: the job's `scenarioName` (e.g. `UnplannedFailover`), a
//!   comma-separated list.
//! - `jobOutputType`: the export's format: `Excel` (CSV, the default) only.
//! - `targetObjectName` (siterec's own): the job's `targetObjectName`, e.g.
//!   a protected item's name.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A filter that does not read: the clause, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("$filter clause \"{clause}\": {reason}")]
pub struct FilterError {
    pub clause: String,
    pub reason: String,
}

/// The jobs asked for. Empty lists and `None` match every job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_ms: Option<i64>,
    /// The fabric's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fabric: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub affected_object_types: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub job_status: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub job_name: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_object_name: Option<String>,
}

/// What a query looks at of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobFacts {
    pub id: String,
    /// `scenarioName`.
    pub kind: String,
    pub state: String,
    pub target_type: String,
    pub target_name: String,
    pub target_id: String,
    pub created_ms: i64,
    pub start_ms: Option<i64>,
    pub end_ms: Option<i64>,
    pub error_code: Option<String>,
    pub error_message: Option<String>,
}

const FIELDS: &str = "startTime, endTime, fabricId, affectedObjectTypes, jobStatus, jobName, jobOutputType, timezoneOffset, targetObjectName";

/// The raw (field, value) pairs of a query, before they are read.
#[derive(Default)]
struct Raw {
    start: Option<(String, String)>,
    end: Option<(String, String)>,
    offset_min: Option<i64>,
    query: JobQuery,
}

impl JobQuery {
    /// Reads an ARM `$filter`: clauses `field eq 'value'` joined by `and`
    /// (values in single quotes, a quote doubled inside one; a number may
    /// stand unquoted for `timezoneOffset`).
    pub fn parse_filter(filter: &str) -> Result<JobQuery, FilterError> {
        let mut raw = Raw::default();
        for clause in split_and(filter)? {
            let err = |reason: String| FilterError {
                clause: clause.clone(),
                reason,
            };
            let (field, rest) = clause
                .split_once(char::is_whitespace)
                .ok_or_else(|| err("expected: FIELD eq 'VALUE'".into()))?;
            let rest = rest.trim_start();
            let (op, value) = rest
                .split_once(char::is_whitespace)
                .ok_or_else(|| err("expected: FIELD eq 'VALUE'".into()))?;
            if !op.eq_ignore_ascii_case("eq") {
                return Err(err(format!(
                    "only 'eq' is supported, not '{op}' (startTime and endTime bound the range)"
                )));
            }
            let value = unquote(value.trim()).map_err(err)?;
            raw.set(field, &value).map_err(err)?;
        }
        raw.finish()
            .map_err(|(clause, reason)| FilterError { clause, reason })
    }

    /// Reads an export's body: a `JobQueryParameter` (`{"startTime": …}`),
    /// bare or under `properties`.
    pub fn from_body(body: &Value) -> Result<JobQuery, FilterError> {
        let obj = match body.get("properties") {
            Some(p @ Value::Object(_)) => p,
            _ => body,
        };
        let mut raw = Raw::default();
        let Some(map) = obj.as_object() else {
            if obj.is_null() {
                return Ok(JobQuery::default());
            }
            return Err(FilterError {
                clause: obj.to_string(),
                reason: "the body must be a JobQueryParameter object".into(),
            });
        };
        for (field, v) in map {
            let value = match v {
                Value::Null => continue,
                Value::String(s) => s.clone(),
                Value::Number(n) => n.to_string(),
                Value::Array(a) => {
                    let mut parts = Vec::new();
                    for x in a {
                        match x.as_str() {
                            Some(s) => parts.push(s.to_string()),
                            None => {
                                return Err(FilterError {
                                    clause: format!("{field}: {v}"),
                                    reason: "a list must hold strings".into(),
                                });
                            }
                        }
                    }
                    parts.join(",")
                }
                other => {
                    return Err(FilterError {
                        clause: format!("{field}: {other}"),
                        reason: "expected a string".into(),
                    });
                }
            };
            raw.set(field, &value).map_err(|reason| FilterError {
                clause: format!("{field}: {v}"),
                reason,
            })?;
        }
        raw.finish()
            .map_err(|(clause, reason)| FilterError { clause, reason })
    }

    /// Whether the job is one the query asks for.
    pub fn matches(&self, job: &JobFacts) -> bool {
        let at = job.start_ms.unwrap_or(job.created_ms);
        let any = |list: &[String], v: &str| {
            list.is_empty() || list.iter().any(|x| x.eq_ignore_ascii_case(v))
        };
        self.start_ms.is_none_or(|s| at >= s)
            && self.end_ms.is_none_or(|e| at <= e)
            && any(&self.job_status, &job.state)
            && any(&self.job_name, &job.kind)
            && any(&self.affected_object_types, &job.target_type)
            && self
                .target_object_name
                .as_deref()
                .is_none_or(|n| n.eq_ignore_ascii_case(&job.target_name))
            && self
                .fabric
                .as_deref()
                .is_none_or(|f| under_fabric(&job.target_id, f))
    }
}

impl Raw {
    fn set(&mut self, field: &str, value: &str) -> Result<(), String> {
        let list = |v: &str| -> Vec<String> {
            v.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect()
        };
        let q = &mut self.query;
        match field.to_ascii_lowercase().as_str() {
            "starttime" => self.start = Some((field.into(), value.into())),
            "endtime" => self.end = Some((field.into(), value.into())),
            "timezoneoffset" => {
                let n: f64 = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("'{value}' is not a number of minutes"))?;
                if !(-24.0 * 60.0..=24.0 * 60.0).contains(&n) {
                    return Err(format!("{value} minutes is not a time zone offset"));
                }
                self.offset_min = Some(n.round() as i64);
            }
            "fabricid" => {
                // An id's last segment after replicationFabrics, or a name.
                let name = fabric_of(value).unwrap_or(value.trim());
                if name.is_empty() || name.contains('/') {
                    return Err(format!("'{value}' is not a fabric id or name"));
                }
                q.fabric = Some(name.to_string());
            }
            "affectedobjecttypes" => q.affected_object_types = list(value),
            "jobstatus" => {
                let states = list(value);
                for s in &states {
                    let known = [
                        "NotStarted",
                        "InProgress",
                        "Succeeded",
                        "Failed",
                        "Cancelled",
                    ];
                    if !known.iter().any(|k| k.eq_ignore_ascii_case(s)) {
                        return Err(format!(
                            "'{s}' is not a job state (NotStarted, InProgress, Succeeded, Failed, Cancelled)"
                        ));
                    }
                }
                q.job_status = states;
            }
            "jobname" => q.job_name = list(value),
            "joboutputtype" => {
                if !value.eq_ignore_ascii_case("excel") {
                    return Err(format!(
                        "'{value}' is not an output this vault writes: only Excel (CSV) is"
                    ));
                }
            }
            "targetobjectname" => q.target_object_name = Some(value.trim().to_string()),
            _ => return Err(format!("'{field}' is not a job query field ({FIELDS})")),
        }
        Ok(())
    }

    fn finish(mut self) -> Result<JobQuery, (String, String)> {
        let offset = self.offset_min.unwrap_or(0);
        for (slot, raw) in [
            (&mut self.query.start_ms, &self.start),
            (&mut self.query.end_ms, &self.end),
        ] {
            if let Some((field, v)) = raw {
                *slot = Some(parse_time(v, offset).ok_or_else(|| {
                    (
                        format!("{field} eq '{v}'"),
                        format!("'{v}' is not an RFC 3339 time (e.g. 2026-12-01T00:00:00Z)"),
                    )
                })?);
            }
        }
        if let (Some(s), Some(e)) = (self.query.start_ms, self.query.end_ms)
            && s > e
        {
            let (_, sv) = self.start.unwrap_or_default();
            let (_, ev) = self.end.unwrap_or_default();
            return Err((
                format!("startTime eq '{sv}' and endTime eq '{ev}'"),
                "startTime is after endTime".into(),
            ));
        }
        Ok(self.query)
    }
}

/// A time in milliseconds: RFC 3339, or without an offset (local time at
/// `offset_min` minutes east of UTC; also a bare date).
fn parse_time(s: &str, offset_min: i64) -> Option<i64> {
    use time::format_description::well_known::Rfc3339;
    let s = s.trim();
    if let Ok(t) = time::OffsetDateTime::parse(s, &Rfc3339) {
        return Some((t.unix_timestamp_nanos() / 1_000_000) as i64);
    }
    let naive = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        format!("{s}Z")
    };
    let t = time::OffsetDateTime::parse(&naive, &Rfc3339).ok()?;
    Some((t.unix_timestamp_nanos() / 1_000_000) as i64 - offset_min * 60_000)
}

/// The fabric named in an ARM id (`…/replicationFabrics/F[/…]`).
fn fabric_of(id: &str) -> Option<&str> {
    let mut segs = id.split('/');
    while let Some(s) = segs.next() {
        if s.eq_ignore_ascii_case("replicationFabrics") {
            return segs.next();
        }
    }
    None
}

fn under_fabric(target_id: &str, fabric: &str) -> bool {
    fabric_of(target_id).is_some_and(|f| f.eq_ignore_ascii_case(fabric))
}

/// Splits on ` and ` outside quotes.
fn split_and(filter: &str) -> Result<Vec<String>, FilterError> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for w in filter.split_inclusive(char::is_whitespace) {
        let quotes = w.matches('\'').count();
        if !quoted && w.trim().eq_ignore_ascii_case("and") {
            out.push(std::mem::take(&mut cur));
        } else {
            cur.push_str(w);
        }
        if quotes % 2 == 1 {
            quoted = !quoted;
        }
    }
    out.push(cur);
    let out: Vec<String> = out.into_iter().map(|c| c.trim().to_string()).collect();
    if quoted {
        return Err(FilterError {
            clause: filter.trim().to_string(),
            reason: "a quoted value is not closed".into(),
        });
    }
    if out.len() == 1 && out[0].is_empty() {
        return Ok(vec![]);
    }
    if let Some(empty) = out.iter().position(String::is_empty) {
        return Err(FilterError {
            clause: filter.trim().to_string(),
            reason: format!("clause {} is empty (a stray 'and'?)", empty + 1),
        });
    }
    Ok(out)
}

fn unquote(v: &str) -> Result<String, String> {
    if let Some(inner) = v.strip_prefix('\'') {
        let inner = inner
            .strip_suffix('\'')
            .ok_or_else(|| "the value's quote is not closed".to_string())?;
        Ok(inner.replace("''", "'"))
    } else if !v.is_empty() && v.chars().all(|c| c.is_ascii_digit() || "+-.".contains(c)) {
        Ok(v.to_string())
    } else {
        Err(format!("the value {v} must be in single quotes"))
    }
}

/// The columns of an export, in order.
pub const CSV_HEADER: [&str; 11] = [
    "Id",
    "ScenarioName",
    "FriendlyName",
    "State",
    "TargetObjectName",
    "TargetInstanceType",
    "TargetObjectId",
    "StartTime",
    "EndTime",
    "ErrorCode",
    "ErrorMessage",
];

/// One CSV field: quoted when it holds a comma, quote or line break
/// (RFC 4180), and a leading `=`, `+`, `-` or `@` made text so that a
/// spreadsheet does not run it as a formula.
pub fn csv_field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@']) {
        format!("'{s}")
    } else {
        s.to_string()
    };
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s
    }
}

/// The export: a header line, then one line per job (CRLF line ends).
/// `friendly` names a scenario, `time` writes a millisecond time.
pub fn to_csv(
    jobs: &[JobFacts],
    friendly: impl Fn(&str) -> String,
    time: impl Fn(i64) -> String,
) -> String {
    let mut out = CSV_HEADER.join(",");
    out.push_str("\r\n");
    for j in jobs {
        let t = |ms: Option<i64>| ms.map(&time).unwrap_or_default();
        let fields = [
            j.id.clone(),
            j.kind.clone(),
            friendly(&j.kind),
            j.state.clone(),
            j.target_name.clone(),
            j.target_type.clone(),
            j.target_id.clone(),
            t(j.start_ms),
            t(j.end_ms),
            j.error_code.clone().unwrap_or_default(),
            j.error_message.clone().unwrap_or_default(),
        ];
        let line: Vec<String> = fields.iter().map(|f| csv_field(f)).collect();
        out.push_str(&line.join(","));
        out.push_str("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(kind: &str, state: &str, target: &str, start_ms: i64) -> JobFacts {
        JobFacts {
            id: format!("{kind}-{target}"),
            kind: kind.into(),
            state: state.into(),
            target_type: "ProtectionEntity".into(),
            target_name: target.into(),
            target_id: format!(
                "/subscriptions/s/resourceGroups/g/providers/Microsoft.RecoveryServices/vaults/v/replicationFabrics/primary/replicationProtectionContainers/pc/replicationProtectedItems/{target}"
            ),
            created_ms: start_ms - 5,
            start_ms: Some(start_ms),
            end_ms: None,
            error_code: None,
            error_message: None,
        }
    }

    const DEC1: i64 = 1_796_083_200_000; // 2026-12-01T00:00:00Z

    #[test]
    fn the_sdks_filter_reads_as_the_query_it_says() {
        let q =
            JobQuery::parse_filter("startTime eq '2026-12-01T00:00:00Z' and jobStatus eq 'Failed'")
                .unwrap();
        assert_eq!(
            q,
            JobQuery {
                start_ms: Some(DEC1),
                job_status: vec!["Failed".into()],
                ..Default::default()
            }
        );
        // Fields and `and` in any case; lists; an id for the fabric; quotes.
        let q = JobQuery::parse_filter(
            "JOBNAME eq 'UnplannedFailover,PlannedFailover' AND fabricId eq '/subscriptions/s/resourceGroups/g/providers/Microsoft.RecoveryServices/vaults/v/replicationFabrics/Primary' and targetObjectName eq 'it''s' and endTime eq '2026-12-02T00:00:00+01:00' and jobOutputType eq 'Excel'",
        )
        .unwrap();
        assert_eq!(q.job_name, ["UnplannedFailover", "PlannedFailover"]);
        assert_eq!(q.fabric.as_deref(), Some("Primary"));
        assert_eq!(q.target_object_name.as_deref(), Some("it's"));
        assert_eq!(q.end_ms, Some(DEC1 + 23 * 3_600_000));
        // A time without an offset is local at timezoneOffset.
        let q =
            JobQuery::parse_filter("startTime eq '2026-12-01T02:00:00' and timezoneOffset eq 120")
                .unwrap();
        assert_eq!(q.start_ms, Some(DEC1));
        assert_eq!(JobQuery::parse_filter("  ").unwrap(), JobQuery::default());
    }

    #[test]
    fn a_bad_filter_is_refused_naming_its_clause() {
        for (filter, clause, says) in [
            (
                "jobStatus eq 'Failed' and colour eq 'red'",
                "colour eq 'red'",
                "not a job query field",
            ),
            (
                "startTime eq 'yesterday'",
                "startTime eq 'yesterday'",
                "RFC 3339",
            ),
            (
                "jobStatus eq 'Broken'",
                "jobStatus eq 'Broken'",
                "not a job state",
            ),
            (
                "startTime gt '2026-12-01T00:00:00Z'",
                "startTime gt '2026-12-01T00:00:00Z'",
                "only 'eq'",
            ),
            (
                "jobStatus eq Failed",
                "jobStatus eq Failed",
                "single quotes",
            ),
            ("jobStatus eq 'Failed", "jobStatus eq 'Failed", "not closed"),
            ("jobStatus", "jobStatus", "FIELD eq"),
            (
                "jobStatus eq 'Failed' and",
                "jobStatus eq 'Failed' and",
                "empty",
            ),
            (
                "jobOutputType eq 'Xml'",
                "jobOutputType eq 'Xml'",
                "only Excel",
            ),
            ("timezoneOffset eq 'x'", "timezoneOffset eq 'x'", "minutes"),
            (
                "startTime eq '2026-12-02T00:00:00Z' and endTime eq '2026-12-01T00:00:00Z'",
                "startTime eq '2026-12-02T00:00:00Z' and endTime eq '2026-12-01T00:00:00Z'",
                "after endTime",
            ),
        ] {
            let e = JobQuery::parse_filter(filter).unwrap_err();
            assert_eq!(e.clause, clause, "{filter}");
            assert!(e.reason.contains(says), "{filter}: {e}");
            assert!(e.to_string().contains(clause));
        }
        // An 'and' inside quotes is part of the value.
        let q = JobQuery::parse_filter("targetObjectName eq 'a and b'").unwrap();
        assert_eq!(q.target_object_name.as_deref(), Some("a and b"));
    }

    #[test]
    fn an_export_body_reads_like_a_filter() {
        let q = JobQuery::from_body(&serde_json::json!({
            "startTime": "2026-12-01T00:00:00Z",
            "jobStatus": "Failed,Succeeded",
            "affectedObjectTypes": ["ProtectionEntity"],
            "jobOutputType": "Excel",
            "timezoneOffset": 0,
        }))
        .unwrap();
        assert_eq!(q.start_ms, Some(DEC1));
        assert_eq!(q.job_status, ["Failed", "Succeeded"]);
        assert_eq!(q.affected_object_types, ["ProtectionEntity"]);
        assert_eq!(
            JobQuery::from_body(&Value::Null).unwrap(),
            JobQuery::default()
        );
        let e =
            JobQuery::from_body(&serde_json::json!({"properties": {"jobStatus": 3}})).unwrap_err();
        assert!(e.to_string().contains("jobStatus"), "{e}");
        assert!(JobQuery::from_body(&serde_json::json!({"size": "big"})).is_err());
    }

    #[test]
    fn a_query_keeps_exactly_the_jobs_it_names() {
        let jobs = [
            job("UnplannedFailover", "Failed", "web", DEC1 + 10),
            job("UnplannedFailover", "Succeeded", "db", DEC1 + 20),
            job("EnableDr", "Failed", "web", DEC1 - 10),
        ];
        let kept = |f: &str| -> Vec<String> {
            let q = JobQuery::parse_filter(f).unwrap();
            jobs.iter()
                .filter(|j| q.matches(j))
                .map(|j| j.id.clone())
                .collect()
        };
        assert_eq!(kept("").len(), 3);
        assert_eq!(
            kept("startTime eq '2026-12-01T00:00:00Z' and jobStatus eq 'failed'"),
            ["UnplannedFailover-web"]
        );
        assert_eq!(
            kept("targetObjectName eq 'WEB'"),
            ["UnplannedFailover-web", "EnableDr-web"]
        );
        assert_eq!(kept("jobName eq 'EnableDr'"), ["EnableDr-web"]);
        assert_eq!(kept("endTime eq '2026-12-01T00:00:00Z'"), ["EnableDr-web"]);
        assert_eq!(kept("fabricId eq 'primary'").len(), 3);
        assert!(kept("fabricId eq 'recovery'").is_empty());
        assert!(kept("affectedObjectTypes eq 'NetworkMapping'").is_empty());
    }

    #[test]
    fn csv_fields_are_quoted_and_formulas_defused() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(csv_field("=1+1"), "'=1+1");
        let mut j = job("EnableDr", "Failed", "web", DEC1);
        j.error_message = Some("disk 'a', line\nbreak".into());
        let csv = to_csv(&[j], |k| format!("{k}!"), |ms| ms.to_string());
        let lines: Vec<&str> = csv.split("\r\n").collect();
        assert_eq!(lines[0], CSV_HEADER.join(","));
        assert!(lines[1].starts_with("EnableDr-web,EnableDr,EnableDr!,Failed,web,"));
        assert!(
            lines[1].ends_with(",\"disk 'a', line\nbreak\""),
            "{}",
            lines[1]
        );
    }
}
