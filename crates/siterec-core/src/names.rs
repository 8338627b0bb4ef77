//! Resource names and ARM resource ids.

use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error(
    "{what} name \"{name}\" is not valid: use 1 to 80 letters, digits, '-', '_' or '.', starting with a letter or digit"
)]
pub struct NameError {
    pub what: &'static str,
    pub name: String,
}

/// Checks a resource name (fabric, cloud, policy, item, ...): safe in URLs,
/// file names and store keys.
pub fn check_name(what: &'static str, name: &str) -> Result<(), NameError> {
    let ok = !name.is_empty()
        && name.len() <= 80
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(NameError {
            what,
            name: name.to_string(),
        })
    }
}

/// The Site Recovery API version the vault serves and the CLI speaks
/// (`?api-version=` on every ARM request).
pub const API_VERSION: &str = "2025-08-01";
/// Every `api-version` the vault accepts.
pub const API_VERSIONS: [&str; 1] = [API_VERSION];

/// The ARM id of a vault.
pub fn vault_id(subscription: &str, resource_group: &str, vault: &str) -> String {
    format!(
        "/Subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.RecoveryServices/vaults/{vault}"
    )
}

/// The last segment of an ARM id (`.../policies/p1` → `p1`).
pub fn last_segment(id: &str) -> &str {
    id.trim_end_matches('/').rsplit('/').next().unwrap_or(id)
}

/// Finds the segment after `key` (case-insensitive) in an ARM id.
pub fn segment_after<'a>(id: &'a str, key: &str) -> Option<&'a str> {
    let mut it = id.split('/');
    while let Some(seg) = it.next() {
        if seg.eq_ignore_ascii_case(key) {
            return it.next().filter(|s| !s.is_empty());
        }
    }
    None
}

/// The kinds of resource a request body can name by ARM id, with the path
/// of collection/name pairs that follows the vault's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResourceKind {
    Policy,
    ProtectionContainer,
    ProtectableItem,
    ProtectedItem,
    RecoveryPoint,
    Network,
    Fabric,
}

impl ResourceKind {
    /// The collections, in order, of an id of this kind below the vault.
    pub fn collections(self) -> &'static [&'static str] {
        match self {
            ResourceKind::Policy => &["replicationPolicies"],
            ResourceKind::ProtectionContainer => {
                &["replicationFabrics", "replicationProtectionContainers"]
            }
            ResourceKind::ProtectableItem => &[
                "replicationFabrics",
                "replicationProtectionContainers",
                "replicationProtectableItems",
            ],
            ResourceKind::ProtectedItem => &[
                "replicationFabrics",
                "replicationProtectionContainers",
                "replicationProtectedItems",
            ],
            ResourceKind::RecoveryPoint => &[
                "replicationFabrics",
                "replicationProtectionContainers",
                "replicationProtectedItems",
                "recoveryPoints",
            ],
            ResourceKind::Network => &["replicationFabrics", "replicationNetworks"],
            ResourceKind::Fabric => &["replicationFabrics"],
        }
    }

    /// What the operator calls it, for messages.
    pub fn noun(self) -> &'static str {
        match self {
            ResourceKind::Policy => "replication policy",
            ResourceKind::ProtectionContainer => "protection container",
            ResourceKind::ProtectableItem => "protectable item",
            ResourceKind::ProtectedItem => "protected item",
            ResourceKind::RecoveryPoint => "recovery point",
            ResourceKind::Network => "network",
            ResourceKind::Fabric => "fabric",
        }
    }

    /// The shape of an id of this kind below `vault_id`, for messages.
    pub fn template(self, vault_id: &str) -> String {
        let mut out = vault_id.to_string();
        for (i, c) in self.collections().iter().enumerate() {
            out.push_str(&format!("/{c}/{{name{}}}", i + 1));
        }
        out
    }
}

/// Why an ARM id in a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum IdError {
    #[error(
        "{field} '{id}' is not a {noun} id: expected {template}",
        noun = kind.noun()
    )]
    Malformed {
        field: &'static str,
        id: String,
        kind: ResourceKind,
        template: String,
    },
    #[error("{field} '{id}' names a resource of another vault: this vault is {vault}")]
    OtherVault {
        field: &'static str,
        id: String,
        vault: String,
    },
    #[error(
        "{field} '{id}' is a {found} id, not a {noun} id: expected {template}",
        noun = kind.noun()
    )]
    WrongType {
        field: &'static str,
        id: String,
        kind: ResourceKind,
        found: String,
        template: String,
    },
}

/// Parses an ARM id a request body gives in `field`: it must be a whole id
/// of `kind` under `vault_id` (compared case-insensitively, as ARM does),
/// with valid names. Returns the names, one per collection of the kind
/// (`.../replicationFabrics/F/replicationProtectionContainers/C` → `[F, C]`).
/// Whether the resource exists is the caller's question.
pub fn parse_id(
    field: &'static str,
    vault_id: &str,
    id: &str,
    kind: ResourceKind,
) -> Result<Vec<String>, IdError> {
    let malformed = || IdError::Malformed {
        field,
        id: id.to_string(),
        kind,
        template: kind.template(vault_id),
    };
    let segs: Vec<&str> = id.trim().trim_end_matches('/').split('/').collect();
    let vault: Vec<&str> = vault_id.split('/').collect();
    // Both start with "" (a leading '/'): an id is absolute.
    if segs.len() < vault.len() || segs.first() != Some(&"") {
        return Err(malformed());
    }
    let (head, rest) = segs.split_at(vault.len());
    // Same shape as a vault id: /subscriptions/S/resourceGroups/G/providers/Microsoft.RecoveryServices/vaults/V
    let shaped = head.len() == 9
        && head[1].eq_ignore_ascii_case("subscriptions")
        && head[3].eq_ignore_ascii_case("resourceGroups")
        && head[5].eq_ignore_ascii_case("providers")
        && head[6].eq_ignore_ascii_case("Microsoft.RecoveryServices")
        && head[7].eq_ignore_ascii_case("vaults")
        && head.iter().skip(1).all(|s| !s.is_empty());
    if !shaped {
        return Err(malformed());
    }
    if !head
        .iter()
        .zip(vault.iter())
        .all(|(a, b)| a.eq_ignore_ascii_case(b))
    {
        return Err(IdError::OtherVault {
            field,
            id: id.to_string(),
            vault: vault_id.to_string(),
        });
    }
    let wanted = kind.collections();
    let found_type = |rest: &[&str]| {
        rest.iter()
            .step_by(2)
            .copied()
            .collect::<Vec<_>>()
            .join("/")
    };
    let types_match = rest.len() == wanted.len() * 2
        && rest
            .iter()
            .step_by(2)
            .zip(wanted.iter())
            .all(|(a, b)| a.eq_ignore_ascii_case(b));
    if !types_match {
        if rest.len() % 2 == 0 && !rest.is_empty() && rest.iter().all(|s| !s.is_empty()) {
            return Err(IdError::WrongType {
                field,
                id: id.to_string(),
                kind,
                found: found_type(rest),
                template: kind.template(vault_id),
            });
        }
        return Err(malformed());
    }
    let names: Vec<String> = rest
        .iter()
        .skip(1)
        .step_by(2)
        .map(|s| s.to_string())
        .collect();
    if names.iter().any(|n| check_name("resource", n).is_err()) {
        return Err(malformed());
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(check_name("fabric", "primary").is_ok());
        assert!(check_name("item", "web-01.prod_a").is_ok());
        for bad in ["", "-x", "a/b", "a b", "../x", &"x".repeat(81)] {
            let e = check_name("item", bad).unwrap_err();
            assert!(e.to_string().contains("not valid"));
        }
    }

    #[test]
    fn ids() {
        let id = "/Subscriptions/s/resourceGroups/rg/providers/Microsoft.RecoveryServices/vaults/v/replicationPolicies/p1";
        assert_eq!(last_segment(id), "p1");
        assert_eq!(segment_after(id, "replicationpolicies"), Some("p1"));
        assert_eq!(segment_after(id, "replicationFabrics"), None);
        assert!(vault_id("s", "rg", "v").starts_with("/Subscriptions/s/"));
    }

    #[test]
    fn parsed_ids() {
        let v = vault_id("0000", "rg", "vault1");
        let p = |id: &str, k| parse_id("policyId", &v, id, k);
        assert_eq!(
            p(
                &format!("{v}/replicationPolicies/int900"),
                ResourceKind::Policy
            )
            .unwrap(),
            vec!["int900"]
        );
        // Case-insensitive, as ARM is; a trailing slash is tolerated.
        let lower = v.to_ascii_lowercase();
        assert_eq!(
            p(
                &format!("{lower}/REPLICATIONFABRICS/f/replicationProtectionContainers/c/"),
                ResourceKind::ProtectionContainer
            )
            .unwrap(),
            vec!["f", "c"]
        );
        let other = vault_id("0000", "rg", "EVIL");
        let e = p(
            &format!("{other}/replicationPolicies/int900"),
            ResourceKind::Policy,
        )
        .unwrap_err();
        assert!(matches!(e, IdError::OtherVault { .. }), "{e}");
        assert!(e.to_string().contains("another vault") && e.to_string().contains(&v));
        for bogus in [
            "/totally/bogus/web04",
            "web04",
            "",
            "/",
            "/Subscriptions/0000/resourceGroups/rg/providers/Microsoft.Compute/vaults/vault1/replicationPolicies/p",
        ] {
            let e = p(bogus, ResourceKind::Policy).unwrap_err();
            assert!(matches!(e, IdError::Malformed { .. }), "{bogus}: {e}");
            assert!(e.to_string().contains("replicationPolicies/{name1}"), "{e}");
        }
        let e = p(
            &format!("{v}/replicationFabrics/f/replicationNetworks/n"),
            ResourceKind::Policy,
        )
        .unwrap_err();
        assert!(matches!(e, IdError::WrongType { .. }), "{e}");
        assert!(
            e.to_string()
                .contains("replicationFabrics/replicationNetworks"),
            "{e}"
        );
        // Names must be valid names.
        let e = p(
            &format!("{v}/replicationPolicies/a%20b"),
            ResourceKind::Policy,
        )
        .unwrap_err();
        assert!(matches!(e, IdError::Malformed { .. }), "{e}");
        // Too short or too long for its kind.
        assert!(
            p(
                &format!("{v}/replicationFabrics/f"),
                ResourceKind::ProtectionContainer
            )
            .is_err()
        );
        assert!(
            p(
                &format!("{v}/replicationPolicies/p/x"),
                ResourceKind::Policy
            )
            .is_err()
        );
    }
}
