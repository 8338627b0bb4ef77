//! Object-storage servers for the tests, started and stopped by the tests
//! themselves, listening on 127.0.0.1 only:
//!
//! * [`Azurite`], Microsoft's Azure Storage emulator (npm package
//!   `azurite`; the workspace's `package.json` pins it: run `npm install`
//!   at the workspace root);
//! * [`Moto`], the `moto` AWS emulator's S3 server (PyPI `moto[server]`,
//!   pinned in this crate's `test-requirements.txt`).
//!
//! A missing tool fails the test with instructions: these backends are not
//! optional to test.

use std::io::Read as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use crate::config::{AzureConfig, S3Config, Secret};

/// Azurite's well-known development account.
pub(crate) const AZURITE_ACCOUNT: &str = "devstoreaccount1";
/// Azurite's well-known development account key (public, not a secret).
pub(crate) const AZURITE_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// Keys per list request in tests, small enough that the conformance
/// suite's 500 objects take several pages.
pub(crate) const TEST_PAGE_SIZE: usize = 100;
const START_TIMEOUT: Duration = Duration::from_secs(60);

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// `$env_var` if set, else the first existing candidate, else `name` on
/// PATH; panics with `install` if none.
fn find_tool(env_var: &str, candidates: &[PathBuf], name: &str, install: &str) -> PathBuf {
    if let Some(p) = std::env::var_os(env_var) {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "{env_var}={} does not exist", p.display());
        return p;
    }
    if let Some(p) = candidates.iter().find(|p| p.is_file()) {
        return p.clone();
    }
    if let Some(p) = on_path(name) {
        return p;
    }
    let mut looked: Vec<String> = vec![format!("${env_var}")];
    looked.extend(candidates.iter().map(|c| c.display().to_string()));
    looked.push("PATH".into());
    panic!(
        "`{name}` is needed to test this backend and was not found (looked at {}). {install}",
        looked.join(", ")
    );
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

/// A server process, killed when dropped. Output goes to a log file shown
/// if the server does not come up.
struct Server {
    name: &'static str,
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Server {
    fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        port: u16,
        dir: tempfile::TempDir,
    ) -> Server {
        let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", program.display()));
        Server {
            name,
            child,
            port,
            dir,
        }
    }

    fn log(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("server.log")) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }

    /// Waits until `ready` says the server answers.
    async fn wait_ready(&mut self, url: &str) {
        crate::remote::ensure_crypto_provider();
        let client = reqwest::Client::new();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("{} exited ({status}) at start:\n{}", self.name, self.log());
            }
            // Any HTTP answer means it is serving.
            if client.get(url).send().await.is_ok() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not answer on port {} within {START_TIMEOUT:?}:\n{}",
                self.name,
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running Azurite blob service with a fresh, empty data directory.
pub(crate) struct Azurite {
    server: Server,
}

impl Azurite {
    pub(crate) async fn start() -> Azurite {
        let program = find_tool(
            "SITEREC_AZURITE",
            &[workspace_root().join("node_modules/.bin/azurite-blob")],
            "azurite-blob",
            "Install it with `npm install` at the workspace root (package.json pins azurite), \
             or point SITEREC_AZURITE at an azurite-blob executable.",
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let args = [
            "--silent",
            "--disableTelemetry",
            "--location",
            &dir.path().join("data").display().to_string(),
            "--blobHost",
            "127.0.0.1",
            "--blobPort",
            &port.to_string(),
        ]
        .map(String::from);
        let mut server = Server::spawn("azurite-blob", &program, &args, port, dir);
        server
            .wait_ready(&format!("http://127.0.0.1:{port}/"))
            .await;
        Azurite { server }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}/{AZURITE_ACCOUNT}", self.server.port)
    }

    /// The configuration of container `container` of the dev account.
    pub(crate) fn config(&self, container: &str) -> AzureConfig {
        AzureConfig {
            account: AZURITE_ACCOUNT.into(),
            container: container.into(),
            key: Secret::new(AZURITE_KEY),
            endpoint: Some(self.endpoint()),
            list_page_size: Some(TEST_PAGE_SIZE),
        }
    }

    /// Creates a container with a Create Container request signed with
    /// the account's shared key (siterec itself never creates containers).
    pub(crate) async fn create_container(&self, container: &str) {
        let url = format!("{}/{container}?restype=container", self.endpoint());
        let date = httpdate_now();
        let version = "2021-08-06";
        let path = format!("/{AZURITE_ACCOUNT}/{container}");
        // Verb, then 11 empty standard headers (Content-Length is empty
        // when 0), then x-ms-* headers, then the canonical resource.
        let string_to_sign = format!(
            "PUT\n{}x-ms-date:{date}\nx-ms-version:{version}\n/{AZURITE_ACCOUNT}{path}\nrestype:container",
            "\n".repeat(11)
        );
        let key = BASE64.decode(AZURITE_KEY).unwrap();
        let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key);
        let signature = BASE64.encode(aws_lc_rs::hmac::sign(&key, string_to_sign.as_bytes()));
        let response = reqwest::Client::new()
            .put(url)
            .header("x-ms-date", date)
            .header("x-ms-version", version)
            .header("content-length", "0")
            .header(
                "authorization",
                format!("SharedKey {AZURITE_ACCOUNT}:{signature}"),
            )
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert_eq!(status.as_u16(), 201, "create container {container}: {body}");
    }
}

/// The current time as an HTTP date (`Sun, 06 Nov 1994 08:49:37 GMT`).
fn httpdate_now() -> String {
    let format = time::macros::format_description!(
        "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
    );
    time::OffsetDateTime::now_utc().format(&format).unwrap()
}

/// A running moto S3 server (in-memory).
pub(crate) struct Moto {
    server: Server,
}

impl Moto {
    pub(crate) async fn start() -> Moto {
        let program = find_tool(
            "SITEREC_MOTO_SERVER",
            &[],
            "moto_server",
            "Install it with `pip install -r crates/siterec-store/test-requirements.txt` \
             (moto[server]), or point SITEREC_MOTO_SERVER at a moto_server executable.",
        );
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let args = ["-H", "127.0.0.1", "-p", &port.to_string()].map(String::from);
        let mut server = Server::spawn("moto_server", &program, &args, port, dir);
        server
            .wait_ready(&format!("http://127.0.0.1:{port}/moto-api/"))
            .await;
        Moto { server }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.server.port)
    }

    /// The configuration of bucket `bucket`, with moto's test credentials.
    pub(crate) fn config(&self, bucket: &str) -> S3Config {
        S3Config {
            endpoint: Some(self.endpoint()),
            bucket: bucket.into(),
            region: "us-east-1".into(),
            access_key: "siterec-test".into(),
            secret_key: Secret::new("siterec-test-secret"),
            list_page_size: Some(TEST_PAGE_SIZE),
        }
    }

    /// Creates a bucket (moto does not check signatures, so unsigned).
    pub(crate) async fn create_bucket(&self, bucket: &str) {
        let response = reqwest::Client::new()
            .put(format!("{}/{bucket}", self.endpoint()))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body = response.text().await.unwrap_or_default();
        assert!(
            status.is_success(),
            "create bucket {bucket}: {status} {body}"
        );
    }
}
