//! Multi-VM consistency groups: the VMs of one group (all on this agent)
//! take their recovery points at one instant.
//!
//! Each member's cycle pauses its VM (QMP `stop`) and arrives at the
//! group's [`Rendezvous`]; when the last member arrives, every VM of the
//! group is paused, and that moment is the group's instant. Each member
//! then takes its point-in-time view (one QMP transaction) and resumes its
//! VM. No guest ran between its pause and its view, so the views together
//! are the state of all the VMs at the shared instant, which every member
//! uses as its point's time (identical across the group).
//!
//! A member that does not arrive within the wait (its cycle failed, it is
//! shipping spooled points) lets the others go on alone: their points are
//! then each crash-consistent but not taken at the group's instant, and
//! say so in the log.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// The meeting point of one group's cycles.
#[derive(Default)]
pub struct Rendezvous {
    state: Mutex<State>,
    notify: Notify,
}

#[derive(Default)]
struct State {
    /// Who is replicating in the group now (from the vault's assignments).
    members: BTreeSet<String>,
    arrived: BTreeSet<String>,
    /// Rounds completed, and the instant of the last one.
    round: u64,
    instant_ms: i64,
}

impl Rendezvous {
    /// Waits until every member has arrived (then returns the shared
    /// instant, Unix ms) or `wait` has passed (`None`: go on alone).
    pub async fn arrive(&self, member: &str, wait: Duration) -> Option<i64> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut my_round = None;
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            {
                let Ok(mut st) = self.state.lock() else {
                    return None;
                };
                match my_round {
                    Some(r) if st.round > r => return Some(st.instant_ms),
                    Some(_) => {}
                    None => {
                        st.arrived.insert(member.to_string());
                        my_round = Some(st.round);
                    }
                }
                // Complete when everyone is here (also after the members
                // changed while waiting).
                if st.members.iter().all(|m| st.arrived.contains(m)) {
                    st.round += 1;
                    st.instant_ms = crate::util::now_ms();
                    st.arrived.clear();
                    self.notify.notify_waiters();
                    return Some(st.instant_ms);
                }
                if tokio::time::Instant::now() >= deadline {
                    st.arrived.remove(member);
                    return None;
                }
                notified.as_mut().enable();
            }
            // Woken by a completed round, a change of members, or the time.
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
    }
}

/// The groups of this agent, by name.
#[derive(Default)]
pub struct Groups {
    groups: Mutex<HashMap<String, Arc<Rendezvous>>>,
}

impl Groups {
    /// Sets who replicates in each group now.
    pub fn set_members(&self, members: HashMap<String, BTreeSet<String>>) {
        let Ok(mut groups) = self.groups.lock() else {
            return;
        };
        groups.retain(|g, _| members.contains_key(g));
        for (g, m) in members {
            let r = groups.entry(g).or_default();
            if let Ok(mut st) = r.state.lock() {
                st.arrived.retain(|a| m.contains(a));
                st.members = m;
            }
            // Someone may now be the last one needed.
            r.notify.notify_waiters();
        }
    }

    pub fn get(&self, group: &str) -> Option<Arc<Rendezvous>> {
        self.groups.lock().ok()?.get(group).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(names: &[&str]) -> HashMap<String, BTreeSet<String>> {
        HashMap::from([(
            "g".to_string(),
            names.iter().map(|s| s.to_string()).collect(),
        )])
    }

    #[tokio::test]
    async fn all_members_leave_with_one_instant_or_alone_after_the_wait() {
        let groups = Arc::new(Groups::default());
        groups.set_members(members(&["a", "b", "c"]));
        let r = groups.get("g").unwrap();
        let mut tasks = Vec::new();
        for (m, delay) in [("a", 0u64), ("b", 50), ("c", 120)] {
            let r = r.clone();
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                r.arrive(m, Duration::from_secs(5)).await
            }));
        }
        let mut instants = Vec::new();
        for t in tasks {
            instants.push(t.await.unwrap().expect("all arrived"));
        }
        assert!(instants.iter().all(|i| *i == instants[0]), "{instants:?}");

        // One member missing: the others go on alone after the wait.
        let t0 = std::time::Instant::now();
        let (x, y) = tokio::join!(
            r.arrive("a", Duration::from_millis(200)),
            r.arrive("b", Duration::from_millis(200))
        );
        assert_eq!((x, y), (None, None));
        assert!(t0.elapsed() >= Duration::from_millis(200));

        // Members being set again (every heartbeat) does not end a wait.
        let (x, y, _) = tokio::join!(
            r.arrive("a", Duration::from_secs(5)),
            async {
                tokio::time::sleep(Duration::from_millis(100)).await;
                r.arrive("b", Duration::from_secs(5)).await
            },
            async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                groups.set_members(members(&["a", "b", "c"]));
                tokio::time::sleep(Duration::from_millis(20)).await;
                groups.set_members(members(&["a", "b"]));
            }
        );
        assert!(x.is_some() && x == y, "{x:?} {y:?}");

        // The missing member leaves the group: the rest meet at once.
        groups.set_members(members(&["a", "b", "c"]));
        let (x, y, _) = tokio::join!(
            r.arrive("a", Duration::from_secs(5)),
            r.arrive("b", Duration::from_secs(5)),
            async {
                tokio::time::sleep(Duration::from_millis(50)).await;
                groups.set_members(members(&["a", "b"]));
            }
        );
        assert!(x.is_some() && x == y);
        // Two members now: they meet at once.
        groups.set_members(members(&["a", "b"]));
        let (x, y) = tokio::join!(
            r.arrive("a", Duration::from_secs(5)),
            r.arrive("b", Duration::from_secs(5))
        );
        assert!(x.is_some() && x == y);
    }
}
