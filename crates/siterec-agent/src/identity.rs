//! The agent's identity: enrolment with a registration key, then a key pair
//! and a vault-issued certificate kept in `DATA/identity/`.
//!
//! The private key is generated here and never leaves the host; the vault
//! sees only a certificate signing request.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use siterec_core::wire::{EnrolRequest, EnrolResponse, KEY_FILE_FORMAT, KeyFile, WireError};

use crate::util::write_durably;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Identity {
    pub agent_id: String,
    pub fabric: String,
    pub vault_id: String,
    pub agent_url: String,
    /// Trusted for the vault's agent API.
    pub vault_ca_pem: String,
    /// Trusted for data endpoints (the CA of every agent's certificate).
    pub agent_ca_pem: String,
    pub cert_pem: String,
    pub key_pem: String,
}

fn identity_path(data: &Path) -> PathBuf {
    data.join("identity").join("identity.json")
}

/// Reads and checks a registration key file.
pub fn read_key_file(path: &Path) -> anyhow::Result<KeyFile> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the registration key file {}", path.display()))?;
    let key: KeyFile = serde_json::from_str(&text).with_context(|| {
        format!(
            "{} is not a siterec registration key file; create one with 'siterec vault key create'",
            path.display()
        )
    })?;
    if key.format != KEY_FILE_FORMAT {
        bail!(
            "{} has format '{}', expected '{KEY_FILE_FORMAT}'",
            path.display(),
            key.format
        );
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if key.expires_at < now {
        bail!(
            "the registration key {} expired {} hours ago (keys are valid for 5 days); create a new one with 'siterec vault key create'",
            path.display(),
            (now - key.expires_at) / 3600
        );
    }
    Ok(key)
}

/// Loads the identity, or enrols with the key file if there is none yet.
pub async fn load_or_enrol(
    data: &Path,
    key_file: Option<&Path>,
    extra_names: &[String],
) -> anyhow::Result<Identity> {
    let path = identity_path(data);
    if path.exists() {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        return serde_json::from_str(&text).with_context(|| {
            format!(
                "{} is damaged; remove the agent's data directory and enrol again with a new key",
                path.display()
            )
        });
    }
    let Some(key_file) = key_file else {
        bail!(
            "this agent is not enrolled yet: pass --key FILE with a registration key from 'siterec vault key create'"
        );
    };
    let key = read_key_file(key_file)?;
    let mut names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    names.extend(extra_names.iter().cloned());
    let (csr_pem, key_pem) = siterec_pki::generate_csr(&names)?;
    let client = siterec_pki::reqwest_client(&key.ca_pem, None, Duration::from_secs(30))?;
    let hostname = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    let req = EnrolRequest {
        key_id: key.key_id.clone(),
        secret: key.secret.clone(),
        csr_pem,
        hostname,
        agent_version: env!("CARGO_PKG_VERSION").into(),
    };
    let url = format!("{}/agent/v1/enrol", key.agent_url);
    let resp = client
        .post(&url)
        .json(&req)
        .send()
        .await
        .with_context(|| format!("contacting the vault at {url} to enrol"))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .or_else(|| {
                serde_json::from_str::<WireError>(&body)
                    .ok()
                    .map(|e| e.message)
            })
            .unwrap_or(body);
        bail!("the vault refused enrolment ({status}): {message}");
    }
    let enrolled: EnrolResponse = resp
        .json()
        .await
        .context("reading the vault's enrolment answer")?;
    let identity = Identity {
        agent_id: enrolled.agent_id,
        fabric: enrolled.fabric,
        vault_id: key.vault_id,
        agent_url: key.agent_url,
        vault_ca_pem: key.ca_pem,
        agent_ca_pem: enrolled.agent_ca_pem,
        cert_pem: enrolled.cert_pem,
        key_pem,
    };
    std::fs::create_dir_all(path.parent().unwrap_or(data))?;
    write_durably(&path, &serde_json::to_vec_pretty(&identity)?, 0o600)?;
    tracing::info!(agent = %identity.agent_id, fabric = %identity.fabric, "enrolled");
    Ok(identity)
}

/// The agent's X25519 transport key (`DATA/identity/transport.key`, mode
/// 0600), generated once. The agent reports its public half; the vault
/// seals a recovery key to it when a failover needs one, so the key never
/// travels or rests in the clear outside the operator's file.
pub fn load_or_create_transport_key(data: &Path) -> anyhow::Result<siterec_store::TransportKey> {
    use siterec_store::TransportKey;
    let path = data.join("identity").join("transport.key");
    match std::fs::read(&path) {
        Ok(mut bytes) => {
            let key = TransportKey::from_file_bytes(&bytes);
            bytes.fill(0);
            key.with_context(|| {
                format!(
                    "{} is damaged; remove it and restart the agent to generate a new one",
                    path.display()
                )
            })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = TransportKey::generate()?;
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            let mut bytes = key.to_file_bytes();
            let written = siterec_pki::write_file_durable(&path, &bytes, 0o600);
            bytes.fill(0);
            written.with_context(|| format!("writing the transport key {}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(e).with_context(|| format!("reading the transport key {}", path.display())),
    }
}
