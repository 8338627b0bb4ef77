//! Network mapping: which recovery-site network each NIC of a replica VM is
//! connected to. Pure functions; the vault reads the mappings and the
//! recovery host's networks and hands the result to the compute driver.
//!
//! The seeds' rules, as far as siterec's networks go (they have no subnets
//! or addresses yet): a NIC whose source VM network is mapped is connected
//! to the mapped recovery network; without a mapping the replica is not
//! connected to any network (here: an isolated network with no route). A
//! test failover connects every NIC to the network the operator chose, or
//! isolates them all.

use std::collections::BTreeMap;

use crate::wire::{NicInfo, ReplicaNic};

/// How a replica's NICs are connected.
#[derive(Debug, Clone, Copy)]
pub enum NicPlan<'a> {
    /// Every NIC on an isolated network (test failover without a network).
    Isolated,
    /// Every NIC on this recovery network (test failover with a network).
    AllTo(&'a str),
    /// Each NIC per the network mappings of its source network (failover).
    Mapped {
        /// Source network (lower case) → recovery network, for mappings
        /// that are in force.
        mappings: &'a BTreeMap<String, String>,
        /// The networks the recovery host reports: a mapped network it does
        /// not have cannot be connected to.
        available: &'a [String],
    },
}

/// The replica's NICs, one per source NIC in the source's order, and what
/// the operator should know about them (a NIC left isolated, and why).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NicResolution {
    pub nics: Vec<ReplicaNic>,
    pub notes: Vec<String>,
}

/// Resolves the recovery network of each NIC of a VM.
pub fn resolve_nics(source: &[NicInfo], plan: NicPlan<'_>) -> NicResolution {
    let mut out = NicResolution::default();
    for nic in source {
        let network = match plan {
            NicPlan::Isolated => None,
            NicPlan::AllTo(n) => Some(n.to_string()),
            NicPlan::Mapped {
                mappings,
                available,
            } => match mappings.get(&nic.network.to_ascii_lowercase()) {
                None => {
                    out.notes.push(format!(
                        "NIC {} (network {}): no network mapping for {}; connected to an isolated network. Map it with 'siterec network map' for the next failover",
                        nic.name, nic.network, nic.network
                    ));
                    None
                }
                Some(target) if !available.iter().any(|a| a.eq_ignore_ascii_case(target)) => {
                    out.notes.push(format!(
                        "NIC {} (network {}): mapped to recovery network {}, which the recovery host does not report; connected to an isolated network",
                        nic.name, nic.network, target
                    ));
                    None
                }
                Some(target) => Some(target.clone()),
            },
        };
        out.nics.push(ReplicaNic {
            name: nic.name.clone(),
            mac: nic.mac.clone(),
            network,
        });
    }
    if matches!(plan, NicPlan::Isolated) && !source.is_empty() {
        out.notes.push(format!(
            "test failover without a network: {} NIC(s) on an isolated network",
            source.len()
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nic(name: &str, network: &str, mac: Option<&str>) -> NicInfo {
        NicInfo {
            name: name.into(),
            network: network.into(),
            mac: mac.map(str::to_string),
        }
    }

    fn nets(r: &NicResolution) -> Vec<Option<&str>> {
        r.nics.iter().map(|n| n.network.as_deref()).collect()
    }

    #[test]
    fn mapped_networks_are_followed_and_unmapped_nics_are_isolated_with_a_note() {
        let source = [
            nic("eth0", "Prod-LAN", Some("52:54:00:12:34:56")),
            nic("eth1", "backup", None),
            nic("eth2", "dmz", None),
        ];
        let mappings = BTreeMap::from([
            ("prod-lan".to_string(), "dr-lan".to_string()),
            ("dmz".to_string(), "dr-dmz".to_string()),
        ]);
        let available = ["DR-LAN".to_string()];
        let r = resolve_nics(
            &source,
            NicPlan::Mapped {
                mappings: &mappings,
                available: &available,
            },
        );
        assert_eq!(nets(&r), [Some("dr-lan"), None, None]);
        // Names and MACs are kept, in the source's order.
        assert_eq!(r.nics[0].name, "eth0");
        assert_eq!(r.nics[0].mac.as_deref(), Some("52:54:00:12:34:56"));
        assert_eq!(r.nics[1].mac, None);
        assert_eq!(r.notes.len(), 2, "{:?}", r.notes);
        assert!(
            r.notes[0].contains("eth1") && r.notes[0].contains("no network mapping for backup"),
            "{}",
            r.notes[0]
        );
        assert!(
            r.notes[1].contains("eth2") && r.notes[1].contains("does not report"),
            "{}",
            r.notes[1]
        );
    }

    #[test]
    fn a_test_failover_puts_every_nic_on_one_network_or_isolates_them() {
        let source = [nic("eth0", "a", None), nic("eth1", "b", None)];
        let r = resolve_nics(&source, NicPlan::AllTo("test-net"));
        assert_eq!(nets(&r), [Some("test-net"), Some("test-net")]);
        assert!(r.notes.is_empty());
        let r = resolve_nics(&source, NicPlan::Isolated);
        assert_eq!(nets(&r), [None, None]);
        assert!(r.notes[0].contains("isolated"), "{:?}", r.notes);
        // A VM without NICs has nothing to connect.
        let r = resolve_nics(&[], NicPlan::Isolated);
        assert_eq!(r, NicResolution::default());
    }
}
