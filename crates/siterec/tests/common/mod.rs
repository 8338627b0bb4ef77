//! Test harness: real `siterec` processes (vault, agents, CLI) on temporary
//! directories. Processes are killed when the harness is dropped.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const BIN: &str = env!("CARGO_BIN_EXE_siterec");

pub struct Proc {
    pub name: String,
    pub args: Vec<String>,
    pub child: Child,
    pub log: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub vault_dir: PathBuf,
    pub procs: Vec<Proc>,
    /// Processes stopped by [`Env::kill`]: (name, arguments), for [`Env::restart`].
    pub stopped: Vec<(String, Vec<String>)>,
    /// The PostgreSQL database of this test's vault, when the suite runs on
    /// PostgreSQL ([`POSTGRES_ENV`]); dropped with the harness.
    pub postgres: Option<TestDatabase>,
}

/// Set to a PostgreSQL server URL without a database
/// (`postgres://USER[:PASSWORD]@HOST[:PORT]`), the vault of every test runs
/// on a database of its own there instead of SQLite.
pub const POSTGRES_ENV: &str = "SITEREC_TEST_POSTGRES";

/// A database created for one test on the server [`POSTGRES_ENV`] names.
pub struct TestDatabase {
    pub server: String,
    pub name: String,
}

impl TestDatabase {
    /// Creates a new empty database, or `None` when the suite runs on SQLite.
    pub fn create() -> Option<TestDatabase> {
        let server = std::env::var(POSTGRES_ENV).ok().filter(|s| !s.is_empty())?;
        let server = server.trim_end_matches('/').to_string();
        let name = format!("siterec_test_{}", uuid_like());
        psql(&server, &format!("CREATE DATABASE {name}"));
        Some(TestDatabase { server, name })
    }

    pub fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let _ = Command::new("psql")
            .args([
                &format!("{}/postgres", self.server),
                "-qc",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
            ])
            .output();
    }
}

fn psql(server: &str, sql: &str) {
    let out = Command::new("psql")
        .args([
            &format!("{server}/postgres"),
            "-v",
            "ON_ERROR_STOP=1",
            "-qc",
            sql,
        ])
        .output()
        .expect("psql (install postgresql-client)");
    assert!(
        out.status.success(),
        "psql {sql}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{}_{nanos}", std::process::id())
}

impl Drop for Env {
    /// A failing test shows the tail of every process's log. VMs the agents
    /// started outlive a killed agent (as they should): kill them too.
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.procs.clear();
        kill_vms_under(self.dir.path());
    }
}

/// Kills every QEMU whose pidfile (`qemu.pid`) is under `dir`: the VMs
/// agents run (`AGENT/vms/NAME`) and replica VMs (`AGENT/failover/vms/NAME`).
pub fn kill_vms_under(dir: &Path) {
    fn walk(dir: &Path, depth: u32) {
        if depth == 0 {
            return;
        }
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                walk(&path, depth - 1);
            } else if path.file_name().is_some_and(|n| n == "qemu.pid")
                && let Some(pid) = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2) on a pid from a QEMU pidfile of this test.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    walk(dir, 5);
}

impl Env {
    /// Starts a vault in a new temporary directory.
    pub fn start() -> Env {
        let dir = tempfile::Builder::new()
            .prefix("siterec-test-")
            .tempdir()
            .expect("tempdir");
        let vault_dir = dir.path().join("vault");
        let mut env = Env {
            dir,
            vault_dir: vault_dir.clone(),
            procs: Vec::new(),
            stopped: Vec::new(),
            postgres: TestDatabase::create(),
        };
        let vd = vault_dir.display().to_string();
        let database = env.postgres.as_ref().map(TestDatabase::url);
        // Fixed ports, so that a vault restarted by a test is where agents
        // knew it.
        let (api, agent) = (free_port(), free_port());
        let (api, agent) = (format!("127.0.0.1:{api}"), format!("127.0.0.1:{agent}"));
        let mut args = vec![
            "vault",
            "--data",
            &vd,
            "--listen",
            &api,
            "--agent-listen",
            &agent,
        ];
        if let Some(url) = &database {
            args.extend(["--database", url.as_str()]);
        }
        env.spawn("vault", &args);
        wait_until(Duration::from_secs(30), "the vault to listen", || {
            vault_dir.join("vault.json").exists()
        });
        env
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn spawn(&mut self, name: &str, args: &[&str]) {
        let log = self.dir.path().join(format!("{name}.log"));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = Command::new(BIN)
            .args(args)
            .env("SITEREC_LOG", "info,sqlx=warn")
            .stdout(Stdio::from(f.try_clone().expect("clone")))
            .stderr(Stdio::from(f))
            .spawn()
            .expect("spawn siterec");
        self.procs.push(Proc {
            name: name.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            child,
            log,
        });
    }

    /// SIGKILLs the named process and starts it again with the same arguments.
    pub fn kill_and_restart(&mut self, name: &str) {
        let i = self
            .procs
            .iter()
            .position(|p| p.name == name)
            .expect("no such process");
        let old = self.procs.remove(i);
        let args = old.args.clone();
        drop(old); // SIGKILL and reap
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(name, &refs);
    }

    /// SIGKILLs the named process and does not restart it (see [`Env::restart`]).
    pub fn kill(&mut self, name: &str) {
        if let Some(i) = self.procs.iter().position(|p| p.name == name) {
            let old = self.procs.remove(i);
            self.stopped.push((old.name.clone(), old.args.clone()));
        }
    }

    /// Starts a process stopped by [`Env::kill`] again, with the same arguments.
    pub fn restart(&mut self, name: &str) {
        let i = self
            .stopped
            .iter()
            .position(|(n, _)| n == name)
            .expect("no such stopped process");
        let (name, args) = self.stopped.remove(i);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.spawn(&name, &refs);
    }

    /// Runs the CLI against this vault.
    pub fn cli(&self, args: &[&str]) -> Output {
        let vd = self.vault_dir.display().to_string();
        Command::new(BIN)
            .arg("--vault-dir")
            .arg(&vd)
            .args(args)
            .env("SITEREC_LOG", "warn")
            .output()
            .expect("run siterec")
    }

    /// Runs the CLI with `--output json`, expecting success.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = vec!["--output", "json"];
        all.extend_from_slice(args);
        let out = self.cli(&all);
        assert!(
            out.status.success(),
            "siterec {args:?} failed: {}\n{}\n--- logs ---\n{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
            self.logs()
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "siterec {args:?}: not JSON ({e}): {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// One raw ARM request to the vault, bypassing the CLI: `rel` is below
    /// the vault's id (`replicationPolicies/p1`), `query` the whole query
    /// string (the CLI would add `api-version`), `body` a JSON body. Returns
    /// the status and the answer's JSON (`Null` when it has none).
    pub fn arm(&self, method: &str, rel: &str, query: &str, body: Option<Value>) -> (u16, Value) {
        let ep: Value =
            serde_json::from_slice(&std::fs::read(self.vault_dir.join("vault.json")).unwrap())
                .unwrap();
        let token = std::fs::read_to_string(self.vault_dir.join("admin.token")).unwrap();
        let url = format!(
            "{}{}/{rel}{}{query}",
            ep["url"].as_str().unwrap().trim_end_matches('/'),
            ep["vaultId"].as_str().unwrap(),
            if query.is_empty() { "" } else { "?" },
        );
        siterec_pki::install_crypto_provider();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let client = reqwest::Client::builder().no_proxy().build().unwrap();
            let mut req = client
                .request(method.parse().unwrap(), &url)
                .bearer_auth(token.trim());
            if let Some(b) = body {
                req = req
                    .header("content-type", "application/json")
                    .body(b.to_string());
            }
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let text = resp.text().await.unwrap();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        })
    }

    /// The vault's ARM id.
    pub fn vault_id(&self) -> String {
        let ep: Value =
            serde_json::from_slice(&std::fs::read(self.vault_dir.join("vault.json")).unwrap())
                .unwrap();
        ep["vaultId"].as_str().unwrap().to_string()
    }

    /// Runs the CLI expecting failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            !out.status.success(),
            "siterec {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stderr).to_string()
    }

    pub fn logs(&self) -> String {
        let mut s = String::new();
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            s.push_str(&format!("== {} ==\n", p.name));
            for l in tail.iter().rev() {
                s.push_str(l);
                s.push('\n');
            }
        }
        s
    }

    /// Writes a registration key for `fabric` and starts an agent with `config`.
    pub fn start_agent(&mut self, fabric: &str, config: &str) -> PathBuf {
        let key = self.path(&format!("{fabric}.key"));
        let k = key.display().to_string();
        self.json(&["vault", "key", "create", "--fabric", fabric, "--out", &k]);
        let cfg = self.path(&format!("{fabric}-agent.toml"));
        std::fs::write(&cfg, config).expect("write config");
        let data = self.path(&format!("{fabric}-agent"));
        let (c, d) = (cfg.display().to_string(), data.display().to_string());
        self.spawn(
            &format!("{fabric}-agent"),
            &["agent", "--key", &k, "--data", &d, "--config", &c],
        );
        data
    }

    /// Waits until `fabric` has the protection container `cloud`.
    pub fn wait_cloud(&self, fabric: &str, cloud: &str) {
        wait_until(
            Duration::from_secs(60),
            &format!("cloud {fabric}/{cloud}"),
            || {
                let out = self.cli(&["--output", "json", "cloud", "list", "--fabric", fabric]);
                out.status.success()
                    && serde_json::from_slice::<Value>(&out.stdout)
                        .ok()
                        .and_then(|v| v.as_array().cloned())
                        .is_some_and(|a| a.iter().any(|c| c["name"] == cloud))
            },
        );
    }

    /// Primary agent with the given machines (name, [(disk, path)]) and a recovery agent.
    pub fn start_sites(&mut self, machines: &[(&str, Vec<(&str, &Path)>)]) -> (PathBuf, PathBuf) {
        self.start_sites_with(machines, "")
    }

    /// [`Env::start_sites`] with extra top-level settings for the primary agent.
    pub fn start_sites_with(
        &mut self,
        machines: &[(&str, Vec<(&str, &Path)>)],
        primary_settings: &str,
    ) -> (PathBuf, PathBuf) {
        let mut cfg = format!("cloud = \"primary-cloud\"\n{primary_settings}\n");
        for (name, disks) in machines {
            cfg.push_str(&format!("[[machines]]\nname = \"{name}\"\ndisks = [\n"));
            for (d, p) in disks {
                cfg.push_str(&format!(
                    "  {{ name = \"{d}\", path = \"{}\" }},\n",
                    p.display()
                ));
            }
            cfg.push_str("]\n");
        }
        let primary = self.start_agent("primary", &cfg);
        let recovery = self.start_agent(
            "recovery",
            "cloud = \"recovery-cloud\"\n[target]\nlisten = \"127.0.0.1:0\"\n",
        );
        self.wait_cloud("primary", "primary-cloud");
        self.wait_cloud("recovery", "recovery-cloud");
        (primary, recovery)
    }

    /// Policy (30 s copy frequency) and pairing primary-cloud → recovery-cloud.
    pub fn pair(&self, retention: &[&str]) {
        let mut args = vec!["policy", "create", "pol", "--copy-frequency", "30"];
        args.extend_from_slice(retention);
        self.json(&args);
        self.json(&[
            "pairing",
            "create",
            "--fabric",
            "primary",
            "--cloud",
            "primary-cloud",
            "--target-fabric",
            "recovery",
            "--target-cloud",
            "recovery-cloud",
            "--policy",
            "pol",
        ]);
    }

    pub fn wait_machine(&self, name: &str) {
        wait_until(Duration::from_secs(60), &format!("machine {name}"), || {
            let out = self.cli(&[
                "--output",
                "json",
                "machine",
                "list",
                "--fabric",
                "primary",
                "--cloud",
                "primary-cloud",
            ]);
            serde_json::from_slice::<Value>(&out.stdout)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .is_some_and(|a| a.iter().any(|m| m["name"] == name))
        });
    }

    /// Enables protection of a primary-cloud machine and waits for the job.
    pub fn enable(&self, machine: &str) -> Value {
        let out = self.json(&[
            "item",
            "enable",
            "--fabric",
            "primary",
            "--cloud",
            "primary-cloud",
            "--machine",
            machine,
        ]);
        assert_eq!(out["status"], "Succeeded", "{out}");
        out
    }

    /// Both sites with one machine of one disk, paired under a 30 s policy
    /// with `retention`, and protected. Returns the agents' data directories.
    pub fn protect(
        &mut self,
        machine: &str,
        disk: &Path,
        retention: &[&str],
    ) -> (PathBuf, PathBuf) {
        let dirs = self.start_sites(&[(machine, vec![("disk0", disk)])]);
        self.pair(retention);
        self.wait_machine(machine);
        self.enable(machine);
        dirs
    }

    pub fn points(&self, item: &str) -> Vec<Value> {
        self.json(&["points", "list", item])
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Waits for a recovery point of `item` taken after `after_ms`; returns its id.
    pub fn wait_point_after(&self, item: &str, after_ms: i64, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            for p in self.points(item) {
                let t = p["properties"]["recoveryPointTime"]
                    .as_str()
                    .unwrap_or_default();
                if parse_ms(t) > after_ms {
                    return p["name"].as_str().unwrap_or_default().to_string();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no recovery point of {item} after {after_ms}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// The path of the `format` image a failover (CLI `--output json`) wrote.
pub fn failover_disk(op: &Value, format: &str) -> PathBuf {
    item_disk(&op["result"], format)
}

/// The path of the item's `format` failover disk (`item show`).
pub fn item_disk(item: &Value, format: &str) -> PathBuf {
    item["properties"]["providerSpecificDetails"]["failoverDisks"]
        .as_array()
        .and_then(|disks| disks.iter().find(|d| d["format"] == format))
        .and_then(|d| d["path"].as_str())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("no {format} disk in {item}"))
}

/// The item's `allowedOperations`.
pub fn ops(item: &Value) -> Vec<String> {
    item["properties"]["allowedOperations"]
        .as_array()
        .expect("allowedOperations")
        .iter()
        .map(|o| o.as_str().unwrap().to_string())
        .collect()
}

/// A number from the environment (a test's knob), else `default`.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A counter of `item` in an agent's status file (0 if absent).
pub fn agent_counter(agent_dir: &Path, item: &str, field: &str) -> u64 {
    siterec_agent::AgentStatus::read(agent_dir)
        .ok()
        .and_then(|s| {
            s.items
                .get(item)
                .map(|c| serde_json::to_value(c).unwrap_or(Value::Null))
        })
        .and_then(|c| c[field].as_u64())
        .unwrap_or(0)
}

pub fn wait_until(timeout: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

pub fn parse_ms(s: &str) -> i64 {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .map(|t| (t.unix_timestamp_nanos() / 1_000_000) as i64)
        .unwrap_or(0)
}

/// Writes a mixed-content image: 1 MiB extents of zeros, text and random bytes.
pub fn make_image(path: &Path, size: u64, seed: u64) {
    use rand::{Rng, RngCore, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; size as usize];
    for chunk in data.chunks_mut(1 << 20) {
        match rng.random_range(0..10) {
            0..=3 => {}
            4..=6 => {
                for (i, b) in chunk.iter_mut().enumerate() {
                    *b = b"lorem ipsum dolor sit amet\n"[i % 27];
                }
            }
            _ => rng.fill_bytes(chunk),
        }
    }
    std::fs::write(path, &data).expect("write image");
}

/// Overwrites `len` bytes at `offset` with random data (seeded).
pub fn scribble(path: &Path, offset: u64, len: usize, seed: u64) {
    use rand::{RngCore, SeedableRng};
    use std::io::{Seek, SeekFrom, Write};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut buf = vec![0u8; len];
    rng.fill_bytes(&mut buf);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(&buf).expect("write");
    f.sync_all().expect("sync");
}

/// `qemu-img compare` of a raw reference against an image of `format`.
pub fn qemu_img_identical(reference: &Path, image: &Path, format: &str) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", format])
        .arg(reference)
        .arg(image)
        .output()
        .expect("qemu-img is required for these tests: install the qemu-utils package");
    if !out.status.success() {
        eprintln!(
            "qemu-img compare {}: {}{}",
            image.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// The item's status entry in an agent's status file, as JSON.
pub fn agent_item(agent_dir: &Path, item: &str) -> Value {
    siterec_agent::AgentStatus::read(agent_dir)
        .ok()
        .and_then(|s| s.items.get(item).cloned())
        .and_then(|c| serde_json::to_value(c).ok())
        .unwrap_or(Value::Null)
}

/// BLAKE3 of the disk a recovery point restores to (read with the store's
/// own verified reader from a local store directory).
pub fn restored_hash(store: &siterec_store::Store, item: &str, point: &str) -> blake3::Hash {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let manifest = rt
        .block_on(store.read_manifest(item, point))
        .unwrap_or_else(|e| panic!("point {point} cannot be read: {e}"));
    let mut h = blake3::Hasher::new();
    let mut reader = store.read_disk(&manifest, 0, 4).expect("disk reader");
    while let Some(block) = rt.block_on(reader.next()) {
        let block = block.unwrap_or_else(|e| panic!("point {point}: {e}"));
        match block.data {
            Some(d) => h.update(&d),
            None => h.update(&vec![0u8; block.len as usize]),
        };
    }
    h.finalize()
}

/// Opens a local replica store directory (unencrypted).
pub fn open_store(dir: &Path) -> siterec_store::Store {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(siterec_store::Store::open_local(dir.to_path_buf()))
        .expect("open store")
}

/// A VM's serial console so far (empty before QEMU made it).
pub fn serial_log(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// A write as a VM's guest makes it (through the disk's device), then a
/// flush as the guest's sync, on the VM's operator QMP socket
/// (`RUN/admin.sock`): the flush puts qcow2 metadata in the file, where
/// tests read the live disk from.
pub fn vm_write(run_dir: &Path, disk: &str, pattern: u8, offset: u64, len: u64) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut qmp =
            siterec_qemu::Qmp::connect(&run_dir.join("admin.sock"), Duration::from_secs(10))
                .await
                .expect("the VM's admin socket");
        for io in [format!("write -P {pattern} {offset} {len}"), "flush".into()] {
            let cmd = format!("qemu-io -d /machine/peripheral/vd-{disk}/virtio-backend \"{io}\"");
            let out = qmp
                .execute(
                    "human-monitor-command",
                    Some(serde_json::json!({ "command-line": cmd })),
                )
                .await
                .expect("qemu-io through HMP");
            let text = out.as_str().unwrap_or_default().to_lowercase();
            assert!(!text.contains("error"), "qemu-io: {text}");
        }
    });
}
