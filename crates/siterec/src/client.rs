//! A client of the vault's ARM API: the only way the CLI talks to the vault.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use serde::de::DeserializeOwned;
use serde_json::Value;
use siterec_api as sapi;

pub use siterec_core::names::API_VERSION;

#[derive(Clone)]
pub struct Api {
    http: reqwest::Client,
    /// `http://host:port`
    base: String,
    /// The vault's resource id.
    vault_id: String,
    token: String,
}

/// An error answered by the vault: `{error: {code, message}}`.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({} {})", self.message, self.status, self.code)
    }
}
impl std::error::Error for ApiFailure {}

/// The outcome of a long-running operation.
pub struct Operation {
    pub job_id: String,
    pub status: String,
    pub error: Option<String>,
    /// The resource the operation returns (GET of its Location) on success.
    pub result: Option<Value>,
}

impl Operation {
    /// The result read as the resource the operation returns.
    pub fn result_as<T: DeserializeOwned>(&self) -> anyhow::Result<Option<T>> {
        self.result
            .clone()
            .map(|r| {
                serde_json::from_value(r).with_context(|| {
                    format!(
                        "the result of job {} does not read as a {}",
                        self.job_id,
                        std::any::type_name::<T>()
                    )
                })
            })
            .transpose()
    }
}

/// Reads an answer of the vault as `T`, naming what did not read.
async fn read<T: DeserializeOwned>(resp: reqwest::Response, what: &str) -> anyhow::Result<T> {
    let bytes = resp
        .bytes()
        .await
        .with_context(|| format!("reading the vault's answer to {what}"))?;
    serde_json::from_slice(&bytes).with_context(|| {
        format!(
            "the vault's answer to {what} does not read as {} (is the vault of another siterec version?)",
            std::any::type_name::<T>()
        )
    })
}

impl Api {
    /// Connects using the `vault.json` and token file a vault writes in its data directory.
    pub fn from_vault_dir(dir: &Path) -> anyhow::Result<Api> {
        let path = dir.join("vault.json");
        let bytes = std::fs::read(&path).with_context(|| {
            format!(
                "reading {} (start the vault with 'siterec vault --data {}')",
                path.display(),
                dir.display()
            )
        })?;
        let ep: Value = serde_json::from_slice(&bytes)
            .with_context(|| format!("{} is not a vault endpoint file", path.display()))?;
        let url = ep["url"]
            .as_str()
            .ok_or_else(|| anyhow!("{} has no url", path.display()))?;
        let token_file = ep["tokenFile"]
            .as_str()
            .map(PathBuf::from)
            .unwrap_or_else(|| dir.join("admin.token"));
        let token = read_token(&token_file)?;
        Api::new(url, &token, ep["vaultId"].as_str())
    }

    pub fn new(url: &str, token: &str, vault_id: Option<&str>) -> anyhow::Result<Api> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .pool_idle_timeout(siterec_pki::CLIENT_POOL_IDLE)
            .no_proxy()
            .build()
            .context("building the HTTP client")?;
        Ok(Api {
            http,
            base: url.trim_end_matches('/').to_string(),
            vault_id: vault_id.unwrap_or_default().to_string(),
            token: token.trim().to_string(),
        })
    }

    /// Learns the vault id from the server when it was not given.
    pub async fn resolve(mut self) -> anyhow::Result<Api> {
        if self.vault_id.is_empty() {
            bail!("the vault id is unknown: pass --vault-dir, or --vault-id with --url");
        }
        let v = self.get("").await?;
        if let Some(id) = v["id"].as_str() {
            self.vault_id = id.to_string();
        }
        Ok(self)
    }

    pub fn vault_id(&self) -> &str {
        &self.vault_id
    }

    fn full(&self, rel: &str) -> String {
        let sep = if rel.is_empty() || rel.starts_with('/') {
            ""
        } else {
            "/"
        };
        format!(
            "{}{}{sep}{rel}?api-version={API_VERSION}",
            self.base, self.vault_id
        )
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<reqwest::Response> {
        let resp =
            req.bearer_auth(&self.token).send().await.with_context(|| {
                format!("contacting the vault at {} (is it running?)", self.base)
            })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        // Not every failure is the vault's ARM error (a proxy's page, say):
        // then the text is the message.
        let (code, message) = match serde_json::from_str::<sapi::ErrorResponse>(&text) {
            Ok(e) => (e.error.code, e.error.message),
            Err(_) => ("Error".to_string(), text),
        };
        Err(ApiFailure {
            status,
            code,
            message,
        }
        .into())
    }

    pub async fn get(&self, rel: &str) -> anyhow::Result<Value> {
        self.get_as(rel).await
    }

    /// GET, read as `T` (a resource type of [`siterec_api`]).
    pub async fn get_as<T: DeserializeOwned>(&self, rel: &str) -> anyhow::Result<T> {
        let resp = self.send(self.http.get(self.full(rel))).await?;
        read(resp, &format!("GET {rel}")).await
    }

    /// GET an absolute URL the vault gave (a `nextLink`).
    pub async fn get_url(&self, url: &str) -> anyhow::Result<Value> {
        let resp = self.send(self.http.get(url)).await?;
        read(resp, &format!("GET {url}")).await
    }

    /// GET a list, following `nextLink`.
    pub async fn list(&self, rel: &str) -> anyhow::Result<Vec<Value>> {
        self.list_as(rel).await
    }

    /// GET a list of `T`, following `nextLink`.
    pub async fn list_as<T: DeserializeOwned>(&self, rel: &str) -> anyhow::Result<Vec<T>> {
        let mut page: sapi::List<T> = self.get_as(rel).await?;
        let mut out = std::mem::take(&mut page.value);
        while let Some(link) = page.next_link.take() {
            let resp = self.send(self.http.get(&link)).await?;
            page = read(resp, &format!("GET {link}")).await?;
            out.append(&mut page.value);
        }
        Ok(out)
    }

    /// GET a list of `T`, each as JSON (for the table and JSON outputs):
    /// an answer that does not read as `T` is an error, not blank cells.
    pub async fn rows<T: DeserializeOwned + serde::Serialize>(
        &self,
        rel: &str,
    ) -> anyhow::Result<Vec<Value>> {
        self.list_as::<T>(rel)
            .await?
            .iter()
            .map(|r| serde_json::to_value(r).map_err(Into::into))
            .collect()
    }

    /// GET a list of `T` with query parameters (a `$filter`), each as
    /// JSON, following `nextLink`.
    pub async fn rows_query<T: DeserializeOwned + serde::Serialize>(
        &self,
        rel: &str,
        query: &[(&str, &str)],
    ) -> anyhow::Result<Vec<Value>> {
        let query: Vec<_> = query.iter().filter(|(_, v)| !v.is_empty()).collect();
        let resp = self
            .send(self.http.get(self.full(rel)).query(&query))
            .await?;
        let mut page: sapi::List<T> = read(resp, &format!("GET {rel}")).await?;
        let mut out = std::mem::take(&mut page.value);
        while let Some(link) = page.next_link.take() {
            let resp = self.send(self.http.get(&link)).await?;
            page = read(resp, &format!("GET {link}")).await?;
            out.append(&mut page.value);
        }
        out.iter()
            .map(|r| serde_json::to_value(r).map_err(Into::into))
            .collect()
    }

    /// A PUT answered at once (not a long-running operation), read as `T`.
    pub async fn put_as<T: DeserializeOwned>(&self, rel: &str, body: &Value) -> anyhow::Result<T> {
        let resp = self.send(self.http.put(self.full(rel)).json(body)).await?;
        read(resp, &format!("PUT {rel}")).await
    }

    /// GET an absolute URL the vault gave, as text (an export's CSV).
    pub async fn get_text_url(&self, url: &str) -> anyhow::Result<String> {
        let resp = self.send(self.http.get(url)).await?;
        resp.text()
            .await
            .with_context(|| format!("reading GET {url}"))
    }

    pub async fn delete(&self, rel: &str) -> anyhow::Result<()> {
        self.send(self.http.delete(self.full(rel))).await?;
        Ok(())
    }

    pub async fn put_sync(&self, rel: &str, body: &Value) -> anyhow::Result<Value> {
        let resp = self.send(self.http.put(self.full(rel)).json(body)).await?;
        read(resp, &format!("PUT {rel}")).await
    }

    pub async fn patch_sync(&self, rel: &str, body: &Value) -> anyhow::Result<Value> {
        let resp = self
            .send(self.http.patch(self.full(rel)).json(body))
            .await?;
        read(resp, &format!("PATCH {rel}")).await
    }

    pub async fn post_sync(&self, rel: &str, body: &Value) -> anyhow::Result<Value> {
        let resp = self.send(self.http.post(self.full(rel)).json(body)).await?;
        read(resp, &format!("POST {rel}")).await
    }

    /// Starts a long-running PUT or POST; returns the job id and the
    /// operation's URLs.
    pub async fn start(
        &self,
        method: reqwest::Method,
        rel: &str,
        body: &Value,
    ) -> anyhow::Result<(String, String, String)> {
        let resp = self
            .send(self.http.request(method, self.full(rel)).json(body))
            .await?;
        let h = resp.headers();
        let header = |name: &str| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let async_op = header("azure-asyncoperation")
            .ok_or_else(|| anyhow!("the vault did not answer with an operation to follow"))?;
        let location = header("location").unwrap_or_default();
        let job = header("x-siterec-job-id").unwrap_or_else(|| {
            siterec_core::names::last_segment(async_op.split('?').next().unwrap_or_default())
                .to_string()
        });
        Ok((job, async_op, location))
    }

    /// Runs a long-running operation to its end, as the Azure SDK's poller does.
    pub async fn run(
        &self,
        method: reqwest::Method,
        rel: &str,
        body: &Value,
        timeout: Duration,
    ) -> anyhow::Result<Operation> {
        let (job_id, async_op, location) = self.start(method, rel, body).await?;
        self.wait(job_id, &async_op, &location, timeout).await
    }

    pub async fn wait(
        &self,
        job_id: String,
        async_op: &str,
        location: &str,
        timeout: Duration,
    ) -> anyhow::Result<Operation> {
        let deadline = Instant::now() + timeout;
        loop {
            let resp = self.send(self.http.get(async_op)).await?;
            let v: sapi::OperationStatus = read(resp, &format!("GET {async_op}")).await?;
            let status = v.status;
            if status != "InProgress" {
                let error = v.error.map(|e| e.message);
                let result = if status == "Succeeded" && !location.is_empty() {
                    let resp = self.send(self.http.get(location)).await?;
                    Some(read(resp, &format!("GET {location}")).await?)
                } else {
                    None
                };
                return Ok(Operation {
                    job_id,
                    status,
                    error,
                    result,
                });
            }
            if Instant::now() > deadline {
                bail!(
                    "job {job_id} is still running after {} s; follow it with 'siterec jobs show {job_id}'",
                    timeout.as_secs()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The ARM path (relative to the vault) of a protected item, found by name.
    pub async fn item_path(&self, name: &str) -> anyhow::Result<(String, sapi::ProtectedItem)> {
        let items: Vec<sapi::ProtectedItem> = self.list_as("replicationProtectedItems").await?;
        let item = items
            .into_iter()
            .find(|i| i.name.eq_ignore_ascii_case(name))
            .ok_or_else(|| {
                anyhow!(
                    "protected item '{name}' was not found; 'siterec item list' shows the items"
                )
            })?;
        let id = &item.id;
        let rel = relative(id, &self.vault_id)
            .ok_or_else(|| anyhow!("item id {id} is not under this vault"))?;
        Ok((rel, item))
    }

    pub async fn create_key(
        &self,
        fabric: &str,
        valid_seconds: Option<i64>,
    ) -> anyhow::Result<Value> {
        let body = serde_json::to_value(sapi::CreateKeyInput {
            fabric: fabric.to_string(),
            valid_seconds,
        })?;
        self.post_sync("siterecRegistrationKeys", &body).await
    }
}

/// The part of an ARM id after the vault's id.
pub fn relative(id: &str, vault_id: &str) -> Option<String> {
    if id.len() >= vault_id.len() && id[..vault_id.len()].eq_ignore_ascii_case(vault_id) {
        Some(id[vault_id.len()..].trim_start_matches('/').to_string())
    } else {
        None
    }
}

pub fn read_token(path: &Path) -> anyhow::Result<String> {
    let t = std::fs::read_to_string(path)
        .with_context(|| format!("reading the API token {}", path.display()))?;
    Ok(t.trim().to_string())
}
