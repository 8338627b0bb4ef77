//! Bandwidth throttling of replication traffic, per host, with a work-hours
//! schedule (as in the seeds: "set the limits for work and non-work hours;
//! valid ranges are from 512 Kbps to 102 Mbps", or no throttling).
//!
//! The settings live in `DATA/throttle.json`, written by `siterec agent
//! throttle` and re-read by the running agent every heartbeat, so they
//! change while replicating. Every chunk upload of the host takes its bytes
//! from one token bucket whose rate follows the schedule.

use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// Slowest allowed limit, Kbps.
pub const MIN_KBPS: u64 = 512;
/// Fastest allowed limit, Kbps (102 Mbps).
pub const MAX_KBPS: u64 = 102 * 1024;

/// The throttling settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "mode")]
pub enum ThrottleSettings {
    /// No throttling.
    None,
    Schedule {
        /// Work days, 0 = Monday … 6 = Sunday.
        work_days: Vec<u8>,
        /// Work hours: [start, end) in hours of the day, local to `utc_offset_minutes`.
        start_hour: u8,
        end_hour: u8,
        work_kbps: u64,
        non_work_kbps: u64,
        #[serde(default)]
        utc_offset_minutes: i32,
    },
}

impl ThrottleSettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        if let ThrottleSettings::Schedule {
            work_days,
            start_hour,
            end_hour,
            work_kbps,
            non_work_kbps,
            utc_offset_minutes,
        } = self
        {
            for (what, k) in [("work-hours", work_kbps), ("non-work-hours", non_work_kbps)] {
                if !(MIN_KBPS..=MAX_KBPS).contains(k) {
                    bail!(
                        "{what} bandwidth of {k} Kbps is out of range: use {MIN_KBPS} Kbps to 102 Mbps ({MAX_KBPS} Kbps), or no throttling"
                    );
                }
            }
            if work_days.iter().any(|d| *d > 6) {
                bail!("work days must be 0 (Monday) to 6 (Sunday)");
            }
            if *start_hour > 23 || *end_hour > 24 || start_hour >= end_hour {
                bail!(
                    "work hours {start_hour}–{end_hour} are not valid: use a start hour 0–23 before an end hour 1–24"
                );
            }
            if utc_offset_minutes.abs() > 14 * 60 {
                bail!("UTC offset of {utc_offset_minutes} minutes is out of range");
            }
        }
        Ok(())
    }

    /// The limit in bytes per second at `unix_secs`; `None` = unlimited.
    pub fn rate_at(&self, unix_secs: i64) -> Option<u64> {
        match self {
            ThrottleSettings::None => None,
            ThrottleSettings::Schedule {
                work_days,
                start_hour,
                end_hour,
                work_kbps,
                non_work_kbps,
                utc_offset_minutes,
            } => {
                let local = unix_secs + i64::from(*utc_offset_minutes) * 60;
                let days = local.div_euclid(86_400);
                // 1970-01-01 was a Thursday (3 with Monday = 0).
                let weekday = (days + 3).rem_euclid(7) as u8;
                let hour = (local.rem_euclid(86_400) / 3600) as u8;
                let work = work_days.contains(&weekday) && hour >= *start_hour && hour < *end_hour;
                let kbps = if work { *work_kbps } else { *non_work_kbps };
                Some(kbps * 1000 / 8)
            }
        }
    }

    pub fn read(data_dir: &Path) -> anyhow::Result<ThrottleSettings> {
        let path = data_dir.join("throttle.json");
        match std::fs::read(&path) {
            Ok(bytes) => {
                let s: ThrottleSettings = serde_json::from_slice(&bytes)
                    .with_context(|| format!("{} is not valid", path.display()))?;
                s.validate()?;
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ThrottleSettings::None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn write(&self, data_dir: &Path) -> anyhow::Result<()> {
        self.validate()?;
        crate::util::write_durably(
            &data_dir.join("throttle.json"),
            &serde_json::to_vec_pretty(self)?,
            0o644,
        )
    }
}

/// A token bucket shared by every upload of the host.
pub struct Throttle {
    inner: Mutex<Bucket>,
}

struct Bucket {
    settings: ThrottleSettings,
    tokens: f64,
    last: Instant,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle::new(ThrottleSettings::None)
    }
}

impl Throttle {
    pub fn new(settings: ThrottleSettings) -> Throttle {
        Throttle {
            inner: Mutex::new(Bucket {
                settings,
                tokens: 0.0,
                last: Instant::now(),
            }),
        }
    }

    /// Replaces the settings (takes effect for the next bytes).
    pub fn set(&self, settings: ThrottleSettings) {
        if let Ok(mut b) = self.inner.lock()
            && b.settings != settings
        {
            tracing::info!(?settings, "bandwidth throttling changed");
            b.settings = settings;
        }
    }

    /// Waits until `bytes` may be sent under the current limit.
    pub async fn acquire(&self, bytes: u64) {
        let wait = {
            let Ok(mut b) = self.inner.lock() else { return };
            let now = Instant::now();
            let unix = time::OffsetDateTime::now_utc().unix_timestamp();
            let Some(rate) = b.settings.rate_at(unix) else {
                b.tokens = 0.0;
                b.last = now;
                return;
            };
            let rate = rate.max(1) as f64;
            // Refill, with at most one second of burst.
            let elapsed = now.duration_since(b.last).as_secs_f64();
            b.tokens = (b.tokens + elapsed * rate).min(rate);
            b.last = now;
            // Take the bytes now (possibly going negative): callers wait
            // for the debt, so concurrent uploads queue fairly.
            b.tokens -= bytes as f64;
            if b.tokens >= 0.0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(-b.tokens / rate)
            }
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(work: u64, non_work: u64) -> ThrottleSettings {
        ThrottleSettings::Schedule {
            work_days: vec![0, 1, 2, 3, 4],
            start_hour: 9,
            end_hour: 18,
            work_kbps: work,
            non_work_kbps: non_work,
            utc_offset_minutes: 0,
        }
    }

    #[test]
    fn schedule_picks_work_and_non_work_hours() {
        let s = schedule(512, 2048);
        // 2026-11-23 is a Monday.
        let monday_10 = time::macros::datetime!(2026-11-23 10:00 UTC).unix_timestamp();
        let monday_20 = time::macros::datetime!(2026-11-23 20:00 UTC).unix_timestamp();
        let sunday_10 = time::macros::datetime!(2026-11-22 10:00 UTC).unix_timestamp();
        assert_eq!(s.rate_at(monday_10), Some(512 * 1000 / 8));
        assert_eq!(s.rate_at(monday_20), Some(2048 * 1000 / 8));
        assert_eq!(s.rate_at(sunday_10), Some(2048 * 1000 / 8));
        assert_eq!(ThrottleSettings::None.rate_at(monday_10), None);
        // An offset moves the window: 08:00 UTC is 10:00 at +02:00.
        let shifted = ThrottleSettings::Schedule {
            work_days: vec![0],
            start_hour: 10,
            end_hour: 11,
            work_kbps: 512,
            non_work_kbps: 4096,
            utc_offset_minutes: 120,
        };
        let monday_08 = time::macros::datetime!(2026-11-23 08:30 UTC).unix_timestamp();
        assert_eq!(shifted.rate_at(monday_08), Some(512 * 1000 / 8));
    }

    #[test]
    fn limits_out_of_range_are_refused() {
        assert!(
            schedule(100, 2048)
                .validate()
                .unwrap_err()
                .to_string()
                .contains("512 Kbps to 102 Mbps")
        );
        assert!(schedule(512, 200_000).validate().is_err());
        let bad_hours = ThrottleSettings::Schedule {
            work_days: vec![0],
            start_hour: 18,
            end_hour: 9,
            work_kbps: 512,
            non_work_kbps: 512,
            utc_offset_minutes: 0,
        };
        assert!(
            bad_hours
                .validate()
                .unwrap_err()
                .to_string()
                .contains("work hours")
        );
        assert!(schedule(512, MAX_KBPS).validate().is_ok());
    }

    #[tokio::test]
    async fn the_bucket_holds_uploads_to_the_rate_and_changes_live() {
        // Same limit in and out of work hours: 4096 Kbps = 512 000 B/s.
        let t = Throttle::new(schedule(4096, 4096));
        let start = Instant::now();
        // 1 MiB in 64 KiB pieces, after the first second's allowance: ≈ 1.5 s+.
        for _ in 0..16 {
            t.acquire(65_536).await;
        }
        let took = start.elapsed().as_secs_f64();
        assert!(took >= 1.8, "1 MiB at 512 kB/s took only {took:.2} s");
        assert!(took < 10.0, "took {took:.2} s: far slower than the limit");
        // Lifting the limit takes effect at once.
        t.set(ThrottleSettings::None);
        let start = Instant::now();
        for _ in 0..64 {
            t.acquire(1 << 20).await;
        }
        assert!(start.elapsed() < Duration::from_millis(200));
    }

    #[test]
    fn settings_file_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            ThrottleSettings::read(dir.path()).unwrap(),
            ThrottleSettings::None
        );
        schedule(1024, 8192).write(dir.path()).unwrap();
        assert_eq!(
            ThrottleSettings::read(dir.path()).unwrap(),
            schedule(1024, 8192)
        );
        std::fs::write(dir.path().join("throttle.json"), "{\"mode\":\"schedule\"}").unwrap();
        assert!(ThrottleSettings::read(dir.path()).is_err());
    }
}
