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
}
