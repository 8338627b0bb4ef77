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
/// The latest point is always kept, whatever the policy says. `Hours`
/// keeps every point younger than the window (0 hours: only the latest);
/// `Count` keeps the latest plus `additional` older ones.
pub fn points_to_prune(points: &[PointAge], retention: Retention, now_ms: i64) -> Vec<String> {
    let mut sorted: Vec<&PointAge> = points.iter().collect();
    // Newest first; ties broken by id so the result does not depend on input order.
    sorted.sort_by(|a, b| {
        b.created_at_ms
            .cmp(&a.created_at_ms)
            .then_with(|| b.id.cmp(&a.id))
    });
    let mut prune = Vec::new();
    for (rank, p) in sorted.iter().enumerate() {
        if rank == 0 {
            continue;
        }
        let keep = match retention {
            Retention::Hours { hours } => {
                hours > 0 && p.created_at_ms >= now_ms - i64::from(hours) * 3_600_000
            }
            Retention::Count { additional } => rank <= additional as usize,
        };
        if !keep {
            prune.push(p.id.clone());
        }
    }
    prune
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pts(ages_min: &[i64], now: i64) -> Vec<PointAge> {
        ages_min
            .iter()
            .enumerate()
            .map(|(i, m)| PointAge {
                id: format!("p{i}"),
                created_at_ms: now - m * 60_000,
            })
            .collect()
    }

    #[test]
    fn window_keeps_young_points_and_always_the_latest() {
        let now = 10_000_000_000;
        let p = pts(&[0, 30, 59, 61, 200], now);
        assert_eq!(
            points_to_prune(&p, Retention::Hours { hours: 1 }, now),
            ["p3", "p4"]
        );
        assert_eq!(
            points_to_prune(&p, Retention::Hours { hours: 0 }, now),
            ["p1", "p2", "p3", "p4"]
        );
        // Even an old latest point survives.
        let old = pts(&[500, 600], now);
        assert_eq!(
            points_to_prune(&old, Retention::Hours { hours: 1 }, now),
            ["p1"]
        );
    }

    #[test]
    fn count_keeps_latest_plus_additional() {
        let now = 10_000_000_000;
        let p = pts(&[5, 1, 3, 2, 4], now); // p1 newest, then p3, p2, p4, p0
        assert_eq!(
            points_to_prune(&p, Retention::Count { additional: 2 }, now),
            ["p4", "p0"]
        );
        assert_eq!(
            points_to_prune(&p, Retention::Count { additional: 15 }, now),
            Vec::<String>::new()
        );
        assert!(points_to_prune(&[], Retention::Count { additional: 0 }, now).is_empty());
    }
}
