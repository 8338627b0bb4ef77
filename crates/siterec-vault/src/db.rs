//! The vault database: opening it on SQLite or PostgreSQL, schema
//! migrations, small helpers.
//!
//! One set of statements serves both engines, through sqlx's `Any` driver:
//! placeholders are `$1, $2, …` (both take them), times are Unix
//! milliseconds, flags are integers 0/1, JSON is text, and names compare
//! case-insensitively on both (SQLite `COLLATE NOCASE`, a nondeterministic
//! ICU collation on PostgreSQL). Where the engines differ — opening,
//! migrations (one folder each), taking the write lock — [`Engine`] says
//! which.
//!
//! - **SQLite** (the default, `DATA/vault.db`): WAL mode with
//!   `synchronous = FULL`, so a change the API has acknowledged survives a
//!   crash of the vault or of the machine. Write transactions start with
//!   `BEGIN IMMEDIATE`.
//! - **PostgreSQL** (`siterec vault --database postgres://…`): write
//!   transactions take one transaction-scoped advisory lock first, so they
//!   run one at a time as on SQLite (a check and the write it guards — "is
//!   this machine already protected?" — cannot interleave with another).

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use sqlx::any::{AnyPoolOptions, install_default_drivers};
use sqlx::{Any, AnyPool, Executor};

pub type Db = AnyPool;

/// The database engine behind a [`Db`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

impl Engine {
    pub fn of(db: &Db) -> Engine {
        match db.connect_options().database_url.scheme() {
            "postgres" | "postgresql" => Engine::Postgres,
            _ => Engine::Sqlite,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Engine::Sqlite => "SQLite",
            Engine::Postgres => "PostgreSQL",
        }
    }

    /// Schema migrations, in order. Each runs once, in a transaction.
    fn migrations(self) -> &'static [(i64, &'static str)] {
        match self {
            Engine::Sqlite => SQLITE_MIGRATIONS,
            Engine::Postgres => POSTGRES_MIGRATIONS,
        }
    }
}

const SQLITE_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/sqlite/0001_init.sql")),
    (2, include_str!("../migrations/sqlite/0002_job_output.sql")),
    (
        3,
        include_str!("../migrations/sqlite/0003_store_encryption.sql"),
    ),
    (
        4,
        include_str!("../migrations/sqlite/0004_transport_key.sql"),
    ),
    (5, include_str!("../migrations/sqlite/0005_vm_failover.sql")),
    (
        6,
        include_str!("../migrations/sqlite/0006_multi_vm_group.sql"),
    ),
    (
        7,
        include_str!("../migrations/sqlite/0007_job_order_and_step_keys.sql"),
    ),
    (8, include_str!("../migrations/sqlite/0008_item_pages.sql")),
    (9, include_str!("../migrations/sqlite/0009_lifecycle.sql")),
    (
        10,
        include_str!("../migrations/sqlite/0010_reverse_replication.sql"),
    ),
    (11, include_str!("../migrations/sqlite/0011_events.sql")),
    (
        12,
        include_str!("../migrations/sqlite/0012_recovery_plans.sql"),
    ),
];

const POSTGRES_MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("../migrations/postgres/0001_init.sql")),
    (
        2,
        include_str!("../migrations/postgres/0002_item_pages.sql"),
    ),
    (3, include_str!("../migrations/postgres/0003_lifecycle.sql")),
    (
        4,
        include_str!("../migrations/postgres/0004_reverse_replication.sql"),
    ),
    (5, include_str!("../migrations/postgres/0005_events.sql")),
    (
        6,
        include_str!("../migrations/postgres/0006_recovery_plans.sql"),
    ),
];

/// The advisory lock key every PostgreSQL write transaction takes.
const PG_WRITE_LOCK: i64 = 0x5172_6563_5641_554c; // "SrecVAUL"

/// Where the vault's database is: a `postgres://` URL, or a SQLite file.
#[derive(Debug, Clone)]
pub enum Location<'a> {
    Sqlite(&'a Path),
    Url(&'a str),
}

/// Opens the SQLite database at `path` (created if missing).
pub async fn open(path: &Path) -> anyhow::Result<Db> {
    open_at(Location::Sqlite(path)).await
}

/// Opens (and migrates) the database at `location`.
pub async fn open_at(location: Location<'_>) -> anyhow::Result<Db> {
    install_default_drivers();
    let (url, shown) = match location {
        Location::Sqlite(path) => (
            format!("sqlite://{}?mode=rwc", path.display()),
            path.display().to_string(),
        ),
        Location::Url(url) => {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                anyhow::bail!(
                    "database URL '{}' is not a PostgreSQL URL: give postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE, or leave --database out to use SQLite in the data directory",
                    redact(url)
                );
            }
            (url.to_string(), redact(url))
        }
    };
    let sqlite = matches!(location, Location::Sqlite(_));
    let pool = AnyPoolOptions::new()
        .max_connections(if sqlite { 4 } else { 8 })
        .acquire_timeout(Duration::from_secs(30))
        .after_connect(move |conn, _| {
            Box::pin(async move {
                if sqlite {
                    conn.execute(
                        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 10000;",
                    )
                    .await?;
                } else {
                    // Plan each execution with its values: a generic plan of
                    // a statement with an IN list on a nocase (ICU) column
                    // costs several times a custom one (siterec bench api).
                    conn.execute("SET plan_cache_mode = force_custom_plan")
                        .await?;
                }
                Ok(())
            })
        })
        .connect(&url)
        .await
        .with_context(|| format!("opening the vault database {shown}"))?;
    migrate(&pool)
        .await
        .with_context(|| format!("migrating the vault database {shown}"))?;
    Ok(pool)
}

/// A database URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

async fn migrate(pool: &Db) -> anyhow::Result<()> {
    let engine = Engine::of(pool);
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_ms BIGINT NOT NULL)")
        .execute(pool)
        .await?;
    let mut tx = begin(pool).await?;
    let newest: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations")
        .fetch_one(&mut **tx)
        .await?;
    let newest = newest.unwrap_or(0);
    let known = engine.migrations().last().map(|m| m.0).unwrap_or(0);
    if newest > known {
        anyhow::bail!(
            "the vault database ({}) has schema version {newest}, newer than this siterec knows ({known}); run a newer siterec",
            engine.name()
        );
    }
    for (version, sql) in engine.migrations() {
        if *version <= newest {
            continue;
        }
        sqlx::raw_sql(*sql)
            .execute(&mut **tx)
            .await
            .with_context(|| format!("applying schema migration {version}"))?;
        sqlx::query("INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, $2)")
            .bind(version)
            .bind(now_ms())
            .execute(&mut **tx)
            .await?;
    }
    tx.commit().await?;
    Ok(())
}

pub fn now_ms() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    (now.unix_timestamp_nanos() / 1_000_000) as i64
}

/// RFC 3339 for an API field.
pub fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

pub fn opt_rfc3339(ms: Option<i64>) -> Option<String> {
    ms.map(rfc3339)
}

/// BLAKE3 hex of a secret (tokens and registration key secrets are stored hashed).
pub fn secret_hash(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

/// A random secret, hex.
pub fn random_secret(bytes: usize) -> String {
    use rand::RngCore;
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    hex::encode(buf)
}

/// A transaction for reading only (no write lock taken).
pub async fn begin_read(db: &Db) -> Result<sqlx::Transaction<'static, Any>, sqlx::Error> {
    db.begin().await
}

/// A write transaction: a [`sqlx::Transaction`] (it derefs to one) that
/// also holds this process's turn at the database's write lock.
pub struct WriteTx {
    tx: sqlx::Transaction<'static, Any>,
    // Dropped after `tx` (fields drop in order): the next writer of this
    // process starts once this one has ended.
    _turn: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl WriteTx {
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.tx.commit().await
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        self.tx.rollback().await
    }
}

impl std::ops::Deref for WriteTx {
    type Target = sqlx::Transaction<'static, Any>;
    fn deref(&self) -> &Self::Target {
        &self.tx
    }
}

impl std::ops::DerefMut for WriteTx {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.tx
    }
}

/// SQLite's `busy_timeout` on the vault's connections (set when each opens).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// This process's writers of each SQLite database, by URL, queue here for
/// their turn. SQLite lets one writer in at a time and makes the others
/// poll (its busy handler sleeps 1, 2, 5, 10… ms between tries), so eight
/// writers arriving together would spend most of their time asleep after
/// the lock was free; in this queue each starts the moment the one before
/// it ends, in the order they came. Other processes (the CLI's offline
/// commands) still meet the busy handler.
fn write_turns(db: &Db) -> std::sync::Arc<tokio::sync::Mutex<()>> {
    use std::collections::HashMap;
    use std::sync::{Arc, LazyLock, Mutex};
    static TURNS: LazyLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>> =
        LazyLock::new(Default::default);
    let url = db.connect_options().database_url.to_string();
    let mut turns = TURNS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    turns.entry(url).or_default().clone()
}

/// Starts a write transaction, holding the database's write lock from its
/// first statement. On SQLite `BEGIN IMMEDIATE` (a deferred transaction
/// that reads and then writes can fail with "database is locked" without
/// waiting, when another writer got in between), after this process's
/// earlier writers (see [`write_turns`]); on PostgreSQL an advisory lock
/// held until commit or rollback.
pub async fn begin(db: &Db) -> Result<WriteTx, sqlx::Error> {
    match Engine::of(db) {
        Engine::Sqlite => {
            // A writer that waits longer than SQLite's own busy timeout
            // goes on without its turn and meets the busy handler, as
            // before this queue: a task that began a second write
            // transaction while holding one fails with "database is
            // locked" instead of hanging.
            let turn = tokio::time::timeout(BUSY_TIMEOUT, write_turns(db).lock_owned())
                .await
                .ok();
            let tx = db.begin_with("BEGIN IMMEDIATE").await?;
            Ok(WriteTx { tx, _turn: turn })
        }
        Engine::Postgres => {
            let mut tx = db.begin().await?;
            sqlx::query("SELECT pg_advisory_xact_lock($1)")
                .bind(PG_WRITE_LOCK)
                .execute(&mut *tx)
                .await?;
            Ok(WriteTx { tx, _turn: None })
        }
    }
}

/// The environment variable that puts the vault's tests on PostgreSQL: a
/// server URL without a database (`postgres://USER:PASSWORD@HOST:PORT`);
/// each test gets a new database there.
pub const TEST_POSTGRES_ENV: &str = "SITEREC_TEST_POSTGRES";

/// The database of a test in `dir`, migrated: SQLite in `dir`, or on the
/// PostgreSQL server [`TEST_POSTGRES_ENV`] names a database created for
/// `dir` (its URL kept in `dir/postgres.url`, so that opening again — a
/// restarted vault — finds the same one).
#[doc(hidden)]
pub async fn open_for_test(dir: &Path) -> anyhow::Result<Db> {
    match std::env::var(TEST_POSTGRES_ENV) {
        Ok(server) if !server.is_empty() => {
            let kept = dir.join("postgres.url");
            let url = match std::fs::read_to_string(&kept) {
                Ok(url) => url,
                Err(_) => {
                    let url = create_test_database(&server).await?;
                    std::fs::write(&kept, &url)?;
                    url
                }
            };
            open_at(Location::Url(&url)).await
        }
        _ => open(&dir.join("vault.db")).await,
    }
}

/// Creates a database with a new name on a PostgreSQL server; its URL.
#[doc(hidden)]
pub async fn create_test_database(server: &str) -> anyhow::Result<String> {
    install_default_drivers();
    let server = server.trim_end_matches('/');
    let name = format!("siterec_unit_{}_{}", std::process::id(), random_secret(6));
    let admin = AnyPoolOptions::new()
        .max_connections(1)
        .connect(&format!("{server}/postgres"))
        .await
        .with_context(|| {
            format!(
                "connecting to the test PostgreSQL server {}",
                redact(server)
            )
        })?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await?;
    admin.close().await;
    Ok(format!("{server}/{name}"))
}
