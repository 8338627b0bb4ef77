//! Which backend a store lives in: [`BackendConfig`] and [`open_backend`].

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, LocalDir};
use crate::error::StoreError;
use crate::remote::{AzureBlob, S3};

/// A credential: serialized as the plain string, but never shown by
/// `Debug` (so configurations can be logged).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret value.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret::new(value)
    }
}

/// An Azure Blob Storage container ("storage account" in Azure Site
/// Recovery terms), with shared-key authentication.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    /// Storage account name.
    pub account: String,
    /// Container name; the container must exist.
    pub container: String,
    /// The account's access key (base64), as shown by the portal.
    pub key: Secret,
    /// Blob service URL; default `https://<account>.blob.core.windows.net`.
    /// For Azurite: `http://127.0.0.1:10000/devstoreaccount1` (path-style,
    /// account in the path). `http://` is accepted only when given here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Keys per list request; default the service's maximum (5000).
    /// Mostly for tests, which use small pages to exercise pagination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_page_size: Option<usize>,
}

/// A bucket of an S3-compatible object store, with access-key (SigV4)
/// authentication and path-style addressing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// Service URL, e.g. `https://s3.example.net:9000`; default AWS
    /// (`https://s3.<region>.amazonaws.com`). `http://` is accepted only
    /// when given here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Bucket name; the bucket must exist.
    pub bucket: String,
    /// Region used for signing (`us-east-1` for most S3-compatible stores).
    #[serde(default = "default_region")]
    pub region: String,
    /// Access key id.
    pub access_key: String,
    /// Secret access key.
    pub secret_key: Secret,
    /// Keys per list request; default the service's maximum (1000).
    /// Mostly for tests, which use small pages to exercise pagination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_page_size: Option<usize>,
}

fn default_region() -> String {
    "us-east-1".to_string()
}

/// Where a store's objects live. TOML-friendly, internally tagged by
/// `kind`:
///
/// ```toml
/// [store]
/// kind = "azure"
/// account = "mystorageaccount"
/// container = "siterec-replica"
/// key = "base64 key..."
/// ```
///
/// `kind = "local"` takes `path`; `kind = "s3"` takes `endpoint`,
/// `bucket`, `region`, `access_key`, `secret_key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackendConfig {
    /// A directory on a local filesystem ([`LocalDir`]).
    Local {
        /// The store's root directory (created if missing).
        path: PathBuf,
    },
    /// Azure Blob Storage ([`AzureBlob`]).
    Azure(AzureConfig),
    /// S3-compatible object storage ([`S3`]).
    S3(S3Config),
}

/// Opens the backend `config` describes. For object stores this makes one
/// request, so a missing container or bucket
/// ([`StoreError::MissingContainer`]), a wrong endpoint or rejected
/// credentials are reported here rather than in the middle of replication.
pub async fn open_backend(config: &BackendConfig) -> Result<Arc<dyn Backend>, StoreError> {
    Ok(match config {
        BackendConfig::Local { path } => Arc::new(LocalDir::new(path.clone())?),
        BackendConfig::Azure(c) => Arc::new(AzureBlob::open(c).await?),
        BackendConfig::S3(c) => Arc::new(S3::open(c).await?),
    })
}
