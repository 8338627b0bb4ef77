//! Which recovery points a policy's retention lets go.

use crate::policy::Retention;

/// A recovery point as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PointAge {
    pub id: String,
    pub created_at_ms: i64,
}

/// The ids of the points to prune, given every visible point of one item.
///
/// The latest point is always kept. The rest follows the seeds:
/// - `Hours { hours }` (to cloud storage): within the first hour, points
///   are kept at the rate `90 / copy frequency in minutes` per hour (every
///   point when they come less often); after that one point per hour,
///   until the retention window ends. 0 hours keeps only the latest.
/// - `Count { additional }` (site to site): recovery points are hourly, so
///   besides the latest, the newest point of each of the previous
///   `additional` hours is kept.
///
/// Within each time bucket the newest point is the one kept.
pub fn points_to_prune(
    points: &[PointAge],
    retention: Retention,
    copy_frequency_secs: u32,
    now_ms: i64,
) -> Vec<String> {
    const HOUR: i64 = 3_600_000;
    let mut sorted: Vec<&PointAge> = points.iter().collect();
    // Newest first; ties broken by id so the result does not depend on input order.
    sorted.sort_by(|a, b| {
        b.created_at_ms
            .cmp(&a.created_at_ms)
            .then_with(|| b.id.cmp(&a.id))
    });
    let Some(latest) = sorted.first() else {
        return Vec::new();
    };
    // First-hour spacing: 90 / copy frequency (minutes) points per hour.
    let per_hour = (90.0 * 60.0 / f64::from(copy_frequency_secs.max(1)))
        .floor()
        .max(1.0);
    let first_hour_bucket = ((HOUR as f64) / per_hour) as i64;
    let bucket_of = |p: &PointAge| -> Option<(u8, i64)> {
        match retention {
            Retention::Hours { hours } => {
                let age = (now_ms - p.created_at_ms).max(0);
                if hours == 0 || age >= i64::from(hours) * HOUR {
                    None
                } else if age < HOUR {
                    Some((0, age / first_hour_bucket.max(1)))
                } else {
                    Some((1, age / HOUR))
                }
            }
            Retention::Count { additional } => {
                // Hour buckets counted back from the latest point.
                let back = (latest.created_at_ms - p.created_at_ms).max(0) / HOUR;
                (back <= i64::from(additional)).then_some((1, back))
            }
        }
    };
    // The latest point is kept and fills its own bucket.
    let mut kept_buckets: std::collections::HashSet<(u8, i64)> =
        bucket_of(latest).into_iter().collect();
    let mut prune = Vec::new();
    for p in sorted.iter().skip(1) {
        let keep = bucket_of(p).is_some_and(|b| kept_buckets.insert(b));
        if !keep {
            prune.push(p.id.clone());
        }
    }
    prune
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 10_000_000_000;

    fn pts(ages_secs: &[i64]) -> Vec<PointAge> {
        ages_secs
            .iter()
            .enumerate()
            .map(|(i, s)| PointAge {
                id: format!("p{i}"),
                created_at_ms: NOW - s * 1000,
            })
            .collect()
    }

    fn kept(points: &[PointAge], prune: &[String]) -> Vec<String> {
        let mut k: Vec<String> = points
            .iter()
            .map(|p| p.id.clone())
            .filter(|id| !prune.contains(id))
            .collect();
        k.sort();
        k
    }

    #[test]
    fn window_keeps_young_points_and_always_the_latest() {
        // 15 min copy frequency: 6 points per first hour, then hourly.
        let p = pts(&[0, 900, 1800, 2700, 3700, 7300, 90_000]);
        let prune = points_to_prune(&p, Retention::Hours { hours: 24 }, 900, NOW);
        assert_eq!(kept(&p, &prune), ["p0", "p1", "p2", "p3", "p4", "p5"]);
        let prune = points_to_prune(&p, Retention::Hours { hours: 1 }, 900, NOW);
        assert_eq!(kept(&p, &prune), ["p0", "p1", "p2", "p3"]);
        let prune = points_to_prune(&p, Retention::Hours { hours: 0 }, 900, NOW);
        assert_eq!(kept(&p, &prune), ["p0"]);
        // Even an old latest point survives.
        let old = pts(&[500_000, 600_000]);
        assert_eq!(
            points_to_prune(&old, Retention::Hours { hours: 1 }, 300, NOW),
            ["p1"]
        );
    }

    #[test]
    fn first_hour_rule_thins_frequent_points() {
        // A point every 30 s for an hour: 90 / 0.5 = 180 per hour allowed,
        // so all 120 are kept.
        let every_30s: Vec<i64> = (0..120).map(|i| i * 30).collect();
        let p = pts(&every_30s);
        assert!(points_to_prune(&p, Retention::Hours { hours: 2 }, 30, NOW).is_empty());
        // A point every minute with a 5 min copy frequency (points came in
        // faster than the policy, e.g. after retries): 90 / 5 = 18 per hour.
        let every_min: Vec<i64> = (0..60).map(|i| i * 60).collect();
        let p = pts(&every_min);
        let prune = points_to_prune(&p, Retention::Hours { hours: 2 }, 300, NOW);
        assert_eq!(60 - prune.len(), 18, "18 points kept in the first hour");
        assert!(!prune.contains(&"p0".to_string()));
        // Beyond the first hour: one per hour.
        let mut hourly_dense: Vec<i64> = (0..10).map(|i| 3600 + i * 60).collect();
        hourly_dense.push(7300);
        hourly_dense.push(7400);
        let p = pts(&hourly_dense);
        let prune = points_to_prune(&p, Retention::Hours { hours: 24 }, 300, NOW);
        assert_eq!(
            kept(&p, &prune),
            ["p0", "p10"],
            "the latest fills its hour; the newest of the next hour"
        );
    }

    #[test]
    fn count_keeps_latest_plus_one_per_previous_hour() {
        // Latest at 0; others 10 min, 1 h 10 min, 2 h 10 min, 3 h 10 min back.
        let p = pts(&[0, 600, 4200, 7800, 11_400]);
        let prune = points_to_prune(&p, Retention::Count { additional: 2 }, 300, NOW);
        assert_eq!(kept(&p, &prune), ["p0", "p2", "p3"]);
        let prune = points_to_prune(&p, Retention::Count { additional: 15 }, 300, NOW);
        assert_eq!(kept(&p, &prune), ["p0", "p2", "p3", "p4"]);
        let prune = points_to_prune(&p, Retention::Count { additional: 0 }, 300, NOW);
        assert_eq!(kept(&p, &prune), ["p0"]);
        assert!(points_to_prune(&[], Retention::Count { additional: 0 }, 300, NOW).is_empty());
    }
}
