//! Object-storage backends: [`AzureBlob`] and [`S3`].
//!
//! Both are thin layers over the `object_store` crate's clients, which sign
//! requests with aws-lc-rs and talk HTTP through the workspace's `reqwest`
//! (built with `rustls-no-provider`: TLS uses the process's default rustls
//! crypto provider, which must be aws-lc-rs; opening a backend installs it
//! if the binary has not).
//!
//! Object keys are the store's keys unchanged: key `chunks/ab/ab…` is the
//! blob (object) `chunks/ab/ab…` in the container (bucket), so a store can
//! be copied between backends object by object.
//!
//! Durability: a put is acknowledged by the service only once the object is
//! durably stored, and an object is never visible partially, so
//! [`Backend::barrier`] does nothing and [`Backend::put_durable`] is a put.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::azure::{MicrosoftAzure, MicrosoftAzureBuilder};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt as _, PutPayload};

use crate::backend::{Backend, validate_key, validate_prefix};
use crate::config::{AzureConfig, S3Config};
use crate::error::StoreError;

/// How long one request may take: a 64 MiB chunk over a slow link.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
/// A bound on list requests for one listing, against a service that keeps
/// returning continuation tokens (pages hold up to 5000 keys on Azure and
/// 1000 on S3).
const MAX_PAGES: usize = 1_000_000;

/// The `object_store` clients we use: object operations plus raw, paged
/// listing with a plain string prefix.
trait RemoteStore: ObjectStore + PaginatedListStore {}
impl<T: ObjectStore + PaginatedListStore> RemoteStore for T {}

/// What both object-storage backends share.
#[derive(Clone)]
struct Remote {
    store: Arc<dyn RemoteStore>,
    /// [`Backend::describe`], without credentials.
    describe: String,
    /// Keys per list request; `None` for the service's default.
    page_size: Option<usize>,
}

impl fmt::Debug for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Remote")
            .field("describe", &self.describe)
            .field("page_size", &self.page_size)
            .finish()
    }
}

fn client_options(endpoint: Option<&str>) -> ClientOptions {
    let allow_http = endpoint.is_some_and(|e| e.starts_with("http://"));
    ClientOptions::new()
        .with_allow_http(allow_http)
        .with_timeout(REQUEST_TIMEOUT)
        .with_connect_timeout(CONNECT_TIMEOUT)
}

fn object_path(key: &str) -> Result<ObjectPath, StoreError> {
    validate_key(key)?;
    // Valid keys are valid object_store paths; parse rather than build so
    // that nothing is escaped behind our back.
    ObjectPath::parse(key).map_err(|e| StoreError::InvalidKey {
        key: key.chars().take(200).collect(),
        reason: e.to_string(),
    })
}

impl Remote {
    fn err(&self, op: &str, what: &str, e: object_store::Error) -> StoreError {
        StoreError::Backend {
            backend: self.describe.clone(),
            message: format!("{op} {what}: {e}"),
        }
    }

    async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
        let path = object_path(key)?;
        self.store
            .put(&path, PutPayload::from(data))
            .await
            .map_err(|e| self.err("put", key, e))?;
        Ok(())
    }

    async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let path = object_path(key)?;
        let result = match self.store.get(&path).await {
            Ok(r) => r,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(e) => return Err(self.err("get", key, e)),
        };
        match result.bytes().await {
            Ok(bytes) => Ok(Some(Vec::from(bytes))),
            // Deleted between the response headers and the body.
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("read the body of", key, e)),
        }
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = object_path(key)?;
        match self.store.head(&path).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err("check existence of", key, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = object_path(key)?;
        match self.store.delete(&path).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("delete", key, e)),
        }
    }

    /// One list request.
    async fn list_page(
        &self,
        prefix: &str,
        page_token: Option<String>,
    ) -> Result<(Vec<String>, Option<String>), object_store::Error> {
        let opts = PaginatedListOptions {
            max_keys: self.page_size,
            page_token,
            ..PaginatedListOptions::default()
        };
        let prefix = (!prefix.is_empty()).then_some(prefix);
        let page = self.store.list_paginated(prefix, opts).await?;
        let keys = page
            .result
            .objects
            .into_iter()
            .map(|meta| String::from(meta.location))
            .collect();
        Ok((keys, page.page_token))
    }

    async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        validate_prefix(prefix)?;
        let what = format!("objects with prefix {prefix:?}");
        // object_store's Azure listing drops a blob whose name equals the
        // prefix (it treats prefixes as directories), but a prefix that
        // is a whole key must list that key: ask for one character less
        // and filter. Prefixes ending in '/' (all the store uses) cannot
        // be keys and are sent as they are.
        let request_prefix = if prefix.ends_with('/') {
            prefix
        } else {
            let mut end = prefix.len().saturating_sub(1);
            while !prefix.is_char_boundary(end) {
                end -= 1;
            }
            &prefix[..end]
        };
        let mut keys = Vec::new();
        let mut token = None;
        for _ in 0..MAX_PAGES {
            let (page, next) = self
                .list_page(request_prefix, token.take())
                .await
                .map_err(|e| self.err("list", &what, e))?;
            // Objects whose names are not valid keys were not written by us.
            keys.extend(
                page.into_iter()
                    .filter(|k| k.starts_with(prefix) && validate_key(k).is_ok()),
            );
            match next {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => return Ok(keys),
            }
        }
        Err(StoreError::Backend {
            backend: self.describe.clone(),
            message: format!("list {what}: more than {MAX_PAGES} pages, giving up"),
        })
    }

    /// Checks that the container or bucket exists and that the credentials
    /// are accepted, with one one-key list request.
    async fn check_container(
        &self,
        kind: &'static str,
        name: &str,
        location: &str,
    ) -> Result<(), StoreError> {
        let opts = PaginatedListOptions {
            max_keys: Some(1),
            ..PaginatedListOptions::default()
        };
        match self.store.list_paginated(None, opts).await {
            Ok(_) => Ok(()),
            Err(e) if is_missing_container(&e) => Err(StoreError::MissingContainer {
                kind,
                name: name.to_string(),
                location: location.to_string(),
            }),
            Err(e) => Err(self.err(
                &format!(
                    "open {kind} {name:?} in {location} (check the endpoint and credentials): list"
                ),
                kind,
                e,
            )),
        }
    }
}

fn is_missing_container(e: &object_store::Error) -> bool {
    if matches!(e, object_store::Error::NotFound { .. }) {
        return true;
    }
    let text = e.to_string();
    text.contains("ContainerNotFound") || text.contains("NoSuchBucket")
}

/// Drops trailing slashes, which would otherwise yield `//` in URLs.
fn trim_endpoint(endpoint: &str) -> &str {
    endpoint.trim_end_matches('/')
}

/// Azure Blob Storage: the objects are block blobs in one container of a
/// storage account, authenticated with the account's shared key.
///
/// Open it with [`AzureBlob::open`] (or [`crate::open_backend`]), which
/// fails with [`StoreError::MissingContainer`] if the container does not
/// exist: siterec never creates it.
#[derive(Debug, Clone)]
pub struct AzureBlob {
    remote: Remote,
}

impl AzureBlob {
    /// Connects to the container of `config` and checks that it exists.
    pub async fn open(config: &AzureConfig) -> Result<AzureBlob, StoreError> {
        ensure_crypto_provider();
        let endpoint = config
            .endpoint
            .as_deref()
            .map(trim_endpoint)
            .map(str::to_string)
            .unwrap_or_else(|| format!("https://{}.blob.core.windows.net", config.account));
        let describe = format!("azure:{endpoint}/{}", config.container);
        let store: MicrosoftAzure = MicrosoftAzureBuilder::new()
            .with_account(&config.account)
            .with_container_name(&config.container)
            .with_access_key(config.key.expose())
            .with_endpoint(endpoint.clone())
            .with_client_options(client_options(Some(&endpoint)))
            .build()
            .map_err(|e| StoreError::Backend {
                backend: describe.clone(),
                message: format!("invalid Azure configuration: {e}"),
            })?;
        let remote = Remote {
            store: Arc::new(store),
            describe,
            page_size: config.list_page_size,
        };
        remote
            .check_container(
                "container",
                &config.container,
                &format!("storage account {}", config.account),
            )
            .await?;
        Ok(AzureBlob { remote })
    }
}

/// An S3-compatible object store: the objects live in one bucket,
/// authenticated with an access key (SigV4), addressed path-style
/// (`<endpoint>/<bucket>/<key>`).
///
/// Open it with [`S3::open`] (or [`crate::open_backend`]), which fails with
/// [`StoreError::MissingContainer`] if the bucket does not exist: siterec
/// never creates it.
#[derive(Debug, Clone)]
pub struct S3 {
    remote: Remote,
}

impl S3 {
    /// Connects to the bucket of `config` and checks that it exists.
    pub async fn open(config: &S3Config) -> Result<S3, StoreError> {
        ensure_crypto_provider();
        let endpoint = config.endpoint.as_deref().map(trim_endpoint);
        let shown = endpoint
            .map(str::to_string)
            .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", config.region));
        let describe = format!("s3:{shown}/{}", config.bucket);
        let mut builder = AmazonS3Builder::new()
            .with_bucket_name(&config.bucket)
            .with_region(&config.region)
            .with_access_key_id(&config.access_key)
            .with_secret_access_key(config.secret_key.expose())
            .with_virtual_hosted_style_request(false)
            .with_client_options(client_options(endpoint));
        if let Some(endpoint) = endpoint {
            builder = builder.with_endpoint(endpoint);
        }
        let store: AmazonS3 = builder.build().map_err(|e| StoreError::Backend {
            backend: describe.clone(),
            message: format!("invalid S3 configuration: {e}"),
        })?;
        let remote = Remote {
            store: Arc::new(store),
            describe,
            page_size: config.list_page_size,
        };
        remote
            .check_container("bucket", &config.bucket, &format!("S3 endpoint {shown}"))
            .await?;
        Ok(S3 { remote })
    }
}

/// reqwest is built with `rustls-no-provider` and panics when it builds a
/// client without a process-wide crypto provider. Binaries install
/// aws-lc-rs at start-up; if nobody did, install it here (the workspace's
/// only provider) instead of panicking.
pub(crate) fn ensure_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Fails only if another thread installed one meanwhile: fine.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    }
}

macro_rules! remote_backend {
    ($ty:ty) => {
        #[cfg(test)]
        impl $ty {
            /// The number of keys in the first list page for `prefix`, and
            /// whether there are more pages (to check paging is real).
            pub(crate) async fn first_page(&self, prefix: &str) -> (usize, bool) {
                let (keys, token) = self.remote.list_page(prefix, None).await.unwrap();
                (keys.len(), token.is_some())
            }
        }

        #[async_trait::async_trait]
        impl Backend for $ty {
            async fn put(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
                self.remote.put(key, data).await
            }

            async fn put_durable(&self, key: &str, data: Vec<u8>) -> Result<(), StoreError> {
                // Acknowledged puts are durable.
                self.remote.put(key, data).await
            }

            async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
                self.remote.get(key).await
            }

            async fn exists(&self, key: &str) -> Result<bool, StoreError> {
                self.remote.exists(key).await
            }

            async fn delete(&self, key: &str) -> Result<(), StoreError> {
                self.remote.delete(key).await
            }

            async fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
                self.remote.list(prefix).await
            }

            async fn barrier(&self) -> Result<(), StoreError> {
                Ok(())
            }

            fn describe(&self) -> String {
                self.remote.describe.clone()
            }
        }
    };
}

remote_backend!(AzureBlob);
remote_backend!(S3);
