//! Replication policies: what the operator chooses, and its validation.
//!
//! Values follow the Site Recovery guides (the seeds): copy frequency 30 s,
//! 5 min or 15 min; recovery point retention either by time (0–24 hours, to
//! cloud storage) or by count (0–15 additional points, site to site);
//! app-consistent snapshot frequency 0 (off) to 12 hours.

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Copy frequencies, in seconds: the seeds' 30 s, 5 min and 15 min, and
/// below them siterec's continuous mode (5, 10 or 15 s: a cycle starts as
/// soon as the previous one is done, at most that often, so the achieved
/// RPO follows the churn; each item reports it as `rpoInSeconds`).
pub const COPY_FREQUENCIES_SECS: [u32; 6] = [5, 10, 15, 30, 300, 900];
/// Longest retention window by time, in hours.
pub const MAX_RETENTION_HOURS: u32 = 24;
/// Most additional recovery points kept by count.
pub const MAX_ADDITIONAL_POINTS: u32 = 15;
/// The policy `instanceType`s accepted on input: those whose settings
/// [`Policy::from_arm_input`] reads.
pub const POLICY_INSTANCE_TYPES: [&str; 4] = [
    "HyperVReplicaAzure",
    "HyperVReplica2012R2",
    "HyperVReplica2012",
    "InMageAzureV2",
];
/// Longest RPO alert threshold, in minutes (a day).
pub const MAX_RPO_THRESHOLD_MINUTES: u32 = 24 * 60;
/// Longest app-consistent snapshot frequency, in hours.
pub const MAX_APP_CONSISTENT_HOURS: u32 = 12;

/// How long recovery points are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "camelCase")]
pub enum Retention {
    /// Keep every point younger than this many hours (0 = only the latest).
    Hours { hours: u32 },
    /// Keep the latest point plus this many older ones.
    Count { additional: u32 },
}

/// A validated replication policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// The ARM `instanceType` the policy was created with (one of
    /// [`POLICY_INSTANCE_TYPES`], spelled as there).
    pub instance_type: String,
    pub copy_frequency_secs: u32,
    pub retention: Retention,
    /// 0 = no app-consistent snapshots.
    pub app_consistent_frequency_hours: u32,
    /// Compress replicated data on the wire and at rest.
    pub compression: bool,
    /// Encrypt data stored ("Encrypt stored data" in the seeds): the item
    /// may only replicate to a recovery agent whose replica store is
    /// encrypted with a key held at the recovery side.
    #[serde(default)]
    pub encryption: bool,
    /// Delete the replica — its recovery points and its disks at the
    /// recovery site — when protection is disabled (the seeds' "Delete
    /// Replica Virtual Machine"; ARM `replicaDeletion`: Required or
    /// NotRequired).
    #[serde(default)]
    pub replica_deletion: bool,
    /// Unix seconds; `None` = start initial replication immediately.
    pub initial_replication_start: Option<i64>,
    /// Offline initial replication (the seeds' "Offline" initial replication
    /// method, site to site): `None` = over the network.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offline: Option<OfflineReplication>,
    /// The RPO alert threshold, seconds (the seeds' "RPO threshold": an
    /// alert when the item's RPO exceeds it; ARM
    /// `recoveryPointThresholdInMinutes`, or siterec's
    /// `rpoThresholdInSeconds` for thresholds under a minute). `None`:
    /// [`Policy::rpo_threshold_secs`]'s default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo_threshold_secs: Option<u32>,
}

/// Where an offline initial copy goes: the source agent exports it to
/// `export_path` (on the source host); the operator carries it to
/// `import_path` (on the recovery host), where the recovery agent imports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OfflineReplication {
    pub export_path: String,
    pub import_path: String,
}

/// Why a policy was refused. Each message names the field and the allowed values.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PolicyError {
    #[error(
        "copy frequency {0} s is not allowed: use 30, 300 or 900 seconds, or 5, 10 or 15 for continuous replication"
    )]
    CopyFrequency(u32),
    #[error("recovery point retention of {0} hours is out of range: use 0 to 24 hours")]
    RetentionHours(u32),
    #[error("{0} additional recovery points is out of range: use 0 to 15")]
    RetentionCount(u32),
    #[error(
        "app-consistent snapshot frequency of {0} hours is out of range: use 0 (off) to 12 hours"
    )]
    AppConsistentFrequency(u32),
    #[error(
        "app-consistent snapshot frequency ({app} h) must be less than the recovery point retention ({window}); raise the retention or lower the frequency"
    )]
    AppConsistentBeyondRetention { app: u32, window: u32 },
    #[error(
        "RPO threshold of {threshold} s is below the copy frequency ({copy} s): every cycle would alert; use at least {copy} s"
    )]
    RpoThresholdBelowCopyFrequency { threshold: u32, copy: u32 },
    #[error("RPO threshold of {0} s is out of range: use 1 s to 1440 minutes")]
    RpoThreshold(u32),
    #[error("{field}: {message}")]
    Field { field: String, message: String },
    #[error(
        "properties.providerSpecificInput.instanceType {0}: use one of HyperVReplicaAzure, HyperVReplica2012R2, HyperVReplica2012 or InMageAzureV2"
    )]
    InstanceType(String),
}

impl Policy {
    /// Checks every field against the limits of the seeds.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if !COPY_FREQUENCIES_SECS.contains(&self.copy_frequency_secs) {
            return Err(PolicyError::CopyFrequency(self.copy_frequency_secs));
        }
        match self.retention {
            Retention::Hours { hours } if hours > MAX_RETENTION_HOURS => {
                return Err(PolicyError::RetentionHours(hours));
            }
            Retention::Count { additional } if additional > MAX_ADDITIONAL_POINTS => {
                return Err(PolicyError::RetentionCount(additional));
            }
            _ => {}
        }
        let app = self.app_consistent_frequency_hours;
        if app > MAX_APP_CONSISTENT_HOURS {
            return Err(PolicyError::AppConsistentFrequency(app));
        }
        // The seeds: the app-consistent frequency must be less than the
        // retention (hours of window, or number of additional points).
        let window = match self.retention {
            Retention::Hours { hours } => hours,
            Retention::Count { additional } => additional,
        };
        if app > 0 && window > 0 && app >= window {
            return Err(PolicyError::AppConsistentBeyondRetention { app, window });
        }
        if let Some(t) = self.rpo_threshold_secs {
            if t == 0 || t > MAX_RPO_THRESHOLD_MINUTES * 60 {
                return Err(PolicyError::RpoThreshold(t));
            }
            if t < self.copy_frequency_secs {
                return Err(PolicyError::RpoThresholdBelowCopyFrequency {
                    threshold: t,
                    copy: self.copy_frequency_secs,
                });
            }
        }
        Ok(())
    }

    /// The RPO over which the item is unhealthy and an alert is raised:
    /// the policy's threshold, or — when it sets none — two copy
    /// intervals and a minute (a cycle may be late once without alarm).
    pub fn rpo_threshold_secs(&self) -> i64 {
        match self.rpo_threshold_secs {
            Some(t) => i64::from(t),
            None => 2 * i64::from(self.copy_frequency_secs) + 60,
        }
    }

    /// Builds a policy from an ARM `providerSpecificInput` object, accepting
    /// the field names of the Hyper-V to Azure (`HyperVReplicaAzure`), site to
    /// site (`HyperVReplica2012R2`, `HyperVReplicaBase`) and VMware/physical
    /// (`InMageAzureV2`) inputs. Any other, or none, is refused, naming
    /// the ones accepted. The result is validated.
    pub fn from_arm_input(input: &serde_json::Value) -> Result<Policy, PolicyError> {
        let obj = input.as_object().ok_or_else(|| PolicyError::Field {
            field: "properties.providerSpecificInput".into(),
            message: "must be a JSON object".into(),
        })?;
        let instance_type = match obj.get("instanceType") {
            Some(serde_json::Value::String(t)) => POLICY_INSTANCE_TYPES
                .iter()
                .find(|known| known.eq_ignore_ascii_case(t))
                .map(|known| known.to_string())
                .ok_or_else(|| PolicyError::InstanceType(format!("'{t}' is not known")))?,
            Some(other) => {
                return Err(PolicyError::InstanceType(format!(
                    "must be a string, got {other}"
                )));
            }
            None => return Err(PolicyError::InstanceType("is missing".into())),
        };
        let int = |names: &[&str]| -> Result<Option<i64>, PolicyError> {
            for name in names {
                if let Some(v) = obj.get(*name) {
                    if v.is_null() {
                        continue;
                    }
                    return v.as_i64().map(Some).ok_or_else(|| PolicyError::Field {
                        field: (*name).to_string(),
                        message: format!("must be an integer, got {v}"),
                    });
                }
            }
            Ok(None)
        };
        let non_negative = |name: &str, v: i64| -> Result<u32, PolicyError> {
            u32::try_from(v).map_err(|_| PolicyError::Field {
                field: name.to_string(),
                message: format!("must be between 0 and {}, got {v}", u32::MAX),
            })
        };
        let copy = int(&["replicationInterval", "replicationFrequencyInSeconds"])?.unwrap_or(300);
        let copy_frequency_secs = non_negative("replicationInterval", copy)?;
        let retention = if let Some(count) = int(&["recoveryPoints"])? {
            Retention::Count {
                additional: non_negative("recoveryPoints", count)?,
            }
        } else {
            let hours = int(&[
                "recoveryPointHistoryDuration",
                "recoveryPointHistory",
                "recoveryPointRetentionInHours",
            ])?
            .unwrap_or(24);
            // InMage takes minutes; the others take hours.
            let hours = if obj.contains_key("recoveryPointHistory")
                && !obj.contains_key("recoveryPointHistoryDuration")
            {
                hours.div_euclid(60)
            } else {
                hours
            };
            Retention::Hours {
                hours: non_negative("recoveryPointHistoryDuration", hours)?,
            }
        };
        let app = int(&[
            "applicationConsistentSnapshotFrequencyInHours",
            "appConsistentFrequencyInMinutes",
        ])?
        .unwrap_or(0);
        let app = if obj.contains_key("appConsistentFrequencyInMinutes")
            && !obj.contains_key("applicationConsistentSnapshotFrequencyInHours")
        {
            app.div_euclid(60)
        } else {
            app
        };
        let app_consistent_frequency_hours =
            non_negative("applicationConsistentSnapshotFrequencyInHours", app)?;
        let switch = |field: &str, default: bool| -> Result<bool, PolicyError> {
            match obj.get(field).and_then(|v| v.as_str()) {
                None => Ok(default),
                Some(s)
                    if s.eq_ignore_ascii_case("enable") || s.eq_ignore_ascii_case("enabled") =>
                {
                    Ok(true)
                }
                Some(s)
                    if s.eq_ignore_ascii_case("disable") || s.eq_ignore_ascii_case("disabled") =>
                {
                    Ok(false)
                }
                Some(other) => Err(PolicyError::Field {
                    field: field.into(),
                    message: format!("must be \"Enable\" or \"Disable\", got \"{other}\""),
                }),
            }
        };
        let compression = switch("compression", true)?;
        let encryption = switch("encryption", false)?;
        let replica_deletion = match obj.get("replicaDeletion").and_then(|v| v.as_str()) {
            None | Some("") => false,
            Some(s) if s.eq_ignore_ascii_case("Required") => true,
            Some(s) if s.eq_ignore_ascii_case("NotRequired") => false,
            Some(other) => {
                return Err(PolicyError::Field {
                    field: "replicaDeletion".into(),
                    message: format!("must be \"Required\" or \"NotRequired\", got \"{other}\""),
                });
            }
        };
        let initial_replication_start = match obj
            .get("onlineReplicationStartTime")
            .and_then(|v| v.as_str())
        {
            None | Some("") => None,
            Some(s) => Some(parse_start_time(s)?),
        };
        let offline = match obj.get("initialReplicationMethod").and_then(|v| v.as_str()) {
            None | Some("") => None,
            Some(m) if m.eq_ignore_ascii_case("OverNetwork") => None,
            Some(m) if m.eq_ignore_ascii_case("Offline") => {
                let path = |field: &str| -> Result<String, PolicyError> {
                    match obj.get(field).and_then(|v| v.as_str()) {
                        Some(p) if p.starts_with('/') => Ok(p.to_string()),
                        Some(p) => Err(PolicyError::Field {
                            field: field.into(),
                            message: format!("must be an absolute path, got \"{p}\""),
                        }),
                        None => Err(PolicyError::Field {
                            field: field.into(),
                            message: "is required when initialReplicationMethod is Offline".into(),
                        }),
                    }
                };
                Some(OfflineReplication {
                    export_path: path("offlineReplicationExportPath")?,
                    import_path: path("offlineReplicationImportPath")?,
                })
            }
            Some(other) => {
                return Err(PolicyError::Field {
                    field: "initialReplicationMethod".into(),
                    message: format!("must be \"OverNetwork\" or \"Offline\", got \"{other}\""),
                });
            }
        };
        // ASR's InMage policies take the threshold in minutes
        // (`recoveryPointThresholdInMinutes`, shown by some clients as
        // `rpoThresholdInMinutes`); siterec also takes seconds, which win.
        let rpo_threshold_secs = match int(&["rpoThresholdInSeconds"])? {
            Some(s) => Some(non_negative("rpoThresholdInSeconds", s)?),
            None => match int(&["recoveryPointThresholdInMinutes", "rpoThresholdInMinutes"])? {
                Some(m) => {
                    let m = non_negative("recoveryPointThresholdInMinutes", m)?;
                    if m > MAX_RPO_THRESHOLD_MINUTES {
                        return Err(PolicyError::RpoThreshold(m.saturating_mul(60)));
                    }
                    Some(m * 60)
                }
                None => None,
            },
        };
        let policy = Policy {
            instance_type,
            copy_frequency_secs,
            retention,
            app_consistent_frequency_hours,
            compression,
            encryption,
            replica_deletion,
            initial_replication_start,
            offline,
            rpo_threshold_secs,
        };
        policy.validate()?;
        Ok(policy)
    }

    /// When initial replication may start, as RFC 3339 (the API's
    /// `onlineReplicationStartTime`).
    pub fn start_time_rfc3339(&self) -> Option<String> {
        let t = self.initial_replication_start?;
        let dt = time::OffsetDateTime::from_unix_timestamp(t).ok()?;
        dt.format(&time::format_description::well_known::Rfc3339)
            .ok()
    }
}

fn parse_start_time(s: &str) -> Result<i64, PolicyError> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| t.unix_timestamp())
        .map_err(|e| PolicyError::Field {
            field: "onlineReplicationStartTime".into(),
            message: format!("must be an RFC 3339 time such as 2026-01-31T22:00:00Z ({e})"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn offline_initial_replication_needs_both_paths() {
        let base = json!({
            "instanceType": "HyperVReplica2012R2",
            "replicationFrequencyInSeconds": 300,
            "recoveryPoints": 2,
            "initialReplicationMethod": "Offline",
            "offlineReplicationExportPath": "/mnt/export",
            "offlineReplicationImportPath": "/mnt/import",
        });
        let p = Policy::from_arm_input(&base).unwrap();
        assert_eq!(
            p.offline,
            Some(OfflineReplication {
                export_path: "/mnt/export".into(),
                import_path: "/mnt/import".into()
            })
        );

        let mut missing = base.clone();
        missing
            .as_object_mut()
            .unwrap()
            .remove("offlineReplicationImportPath");
        let e = Policy::from_arm_input(&missing).unwrap_err().to_string();
        assert!(
            e.contains("offlineReplicationImportPath") && e.contains("required"),
            "{e}"
        );
        let mut relative = base.clone();
        relative["offlineReplicationExportPath"] = "export".into();
        let e = Policy::from_arm_input(&relative).unwrap_err().to_string();
        assert!(e.contains("absolute"), "{e}");
        let mut bad = base.clone();
        bad["initialReplicationMethod"] = "ByCourier".into();
        let e = Policy::from_arm_input(&bad).unwrap_err().to_string();
        assert!(e.contains("OverNetwork") && e.contains("ByCourier"), "{e}");
        let mut online = base;
        online["initialReplicationMethod"] = "OverNetwork".into();
        assert_eq!(Policy::from_arm_input(&online).unwrap().offline, None);
    }

    #[test]
    fn azure_input_is_read_and_validated() {
        let p = Policy::from_arm_input(&json!({
            "instanceType": "HyperVReplicaAzure",
            "recoveryPointHistoryDuration": 4,
            "applicationConsistentSnapshotFrequencyInHours": 1,
            "replicationInterval": 30
        }))
        .unwrap();
        assert_eq!(p.copy_frequency_secs, 30);
        assert_eq!(p.retention, Retention::Hours { hours: 4 });
        assert_eq!(p.app_consistent_frequency_hours, 1);
        assert!(p.compression);
    }

    #[test]
    fn site_to_site_input_uses_count() {
        let p = Policy::from_arm_input(&json!({
            "instanceType": "HyperVReplica2012R2",
            "recoveryPoints": 15,
            "replicationFrequencyInSeconds": 900,
            "compression": "Disable",
            "encryption": "Enable"
        }))
        .unwrap();
        assert!(p.encryption);
        assert_eq!(p.retention, Retention::Count { additional: 15 });
        assert!(!p.compression);
        assert_eq!(p.copy_frequency_secs, 900);
    }

    #[test]
    fn out_of_range_values_are_refused_with_their_names() {
        let cases = [
            (json!({"replicationInterval": 60}), "copy frequency 60"),
            (json!({"recoveryPointHistoryDuration": 25}), "25 hours"),
            (json!({"recoveryPoints": 16}), "16 additional"),
            (
                json!({"applicationConsistentSnapshotFrequencyInHours": 13}),
                "13 hours",
            ),
            (
                json!({"recoveryPointHistoryDuration": 2, "applicationConsistentSnapshotFrequencyInHours": 3}),
                "less than the recovery point retention",
            ),
            (json!({"replicationInterval": -5}), "replicationInterval"),
            (json!({"replicationInterval": "fast"}), "must be an integer"),
            (json!({"compression": "maybe"}), "compression"),
            (
                json!({"onlineReplicationStartTime": "tomorrow"}),
                "RFC 3339",
            ),
        ];
        for (mut input, needle) in cases {
            input["instanceType"] = "HyperVReplicaAzure".into();
            let err = Policy::from_arm_input(&input).unwrap_err().to_string();
            assert!(
                err.contains(needle),
                "{input}: {err} should mention {needle}"
            );
        }
        assert!(Policy::from_arm_input(&json!([1])).is_err());
    }

    #[test]
    fn the_rpo_threshold_is_read_in_minutes_or_seconds_and_checked() {
        let base = json!({"instanceType": "InMageAzureV2", "replicationInterval": 30});
        let p = Policy::from_arm_input(&base).unwrap();
        assert_eq!(p.rpo_threshold_secs, None);
        assert_eq!(p.rpo_threshold_secs(), 2 * 30 + 60, "the default");
        let mut m = base.clone();
        m["recoveryPointThresholdInMinutes"] = 15.into();
        assert_eq!(
            Policy::from_arm_input(&m).unwrap().rpo_threshold_secs(),
            900
        );
        let mut m = base.clone();
        m["rpoThresholdInMinutes"] = 2.into();
        assert_eq!(
            Policy::from_arm_input(&m).unwrap().rpo_threshold_secs(),
            120
        );
        let mut s = m.clone();
        s["rpoThresholdInSeconds"] = 45.into();
        assert_eq!(
            Policy::from_arm_input(&s).unwrap().rpo_threshold_secs(),
            45,
            "seconds win over minutes"
        );
        for (field, v, needle) in [
            (
                "rpoThresholdInSeconds",
                json!(10),
                "below the copy frequency (30 s)",
            ),
            ("rpoThresholdInSeconds", json!(0), "out of range"),
            (
                "recoveryPointThresholdInMinutes",
                json!(1441),
                "out of range",
            ),
            (
                "recoveryPointThresholdInMinutes",
                json!(-1),
                "recoveryPointThresholdInMinutes",
            ),
            ("rpoThresholdInSeconds", json!("soon"), "must be an integer"),
        ] {
            let mut input = base.clone();
            input[field] = v;
            let err = Policy::from_arm_input(&input).unwrap_err().to_string();
            assert!(err.contains(needle), "{input}: {err}");
        }
    }

    #[test]
    fn instance_type_is_required_and_known() {
        let base = json!({"replicationInterval": 300, "recoveryPointHistoryDuration": 2});
        for (it, needle) in [
            (None, "is missing"),
            (Some(json!("Bogus")), "'Bogus' is not known"),
            (Some(json!(7)), "must be a string"),
            (Some(json!(null)), "must be a string"),
        ] {
            let mut input = base.clone();
            if let Some(it) = it {
                input["instanceType"] = it;
            }
            let err = Policy::from_arm_input(&input).unwrap_err().to_string();
            assert!(
                err.contains(needle) && err.contains("HyperVReplica2012R2, HyperVReplica2012"),
                "{input}: {err}"
            );
        }
        let mut input = base;
        input["instanceType"] = "hypervreplicaazure".into();
        assert_eq!(
            Policy::from_arm_input(&input).unwrap().instance_type,
            "HyperVReplicaAzure",
            "matched case-insensitively, stored as spelled by the API"
        );
    }
}
