//! The vault database: opening, schema migrations, small helpers.
//!
//! SQLite in WAL mode with `synchronous = FULL`: a change the API has
//! acknowledged survives a crash of the vault or of the machine.

use std::path::Path;
use std::str::FromStr;

use anyhow::Context;
use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};

pub type Db = SqlitePool;

/// Schema migrations, in order. Each runs once, in a transaction.
const MIGRATIONS: &[(i64, &str)] = &[
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
];

pub async fn open(path: &Path) -> anyhow::Result<Db> {
    let url = format!("sqlite://{}", path.display());
    let opts = SqliteConnectOptions::from_str(&url)
        .with_context(|| format!("database path {}", path.display()))?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Full)
        .foreign_keys(true)
        .busy_timeout(std::time::Duration::from_secs(10));
    let pool = SqlitePoolOptions::new()
        .max_connections(4)
        .connect_with(opts)
        .await
        .with_context(|| format!("opening the vault database {}", path.display()))?;
    migrate(&pool).await?;
    Ok(pool)
}

async fn migrate(pool: &Db) -> anyhow::Result<()> {
    sqlx::query("CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, applied_ms INTEGER NOT NULL)")
        .execute(pool)
        .await?;
    let newest: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM schema_migrations")
        .fetch_one(pool)
        .await?;
    let newest = newest.unwrap_or(0);
    let known = MIGRATIONS.last().map(|m| m.0).unwrap_or(0);
    if newest > known {
        anyhow::bail!(
            "the vault database has schema version {newest}, newer than this siterec knows ({known}); run a newer siterec"
        );
    }
    for (version, sql) in MIGRATIONS {
        if *version <= newest {
            continue;
        }
        let mut tx = pool.begin().await?;
        sqlx::raw_sql(*sql)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("applying schema migration {version}"))?;
        sqlx::query("INSERT INTO schema_migrations (version, applied_ms) VALUES (?, ?)")
            .bind(version)
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
    }
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

pub fn opt_rfc3339(ms: Option<i64>) -> serde_json::Value {
    match ms {
        Some(ms) => rfc3339(ms).into(),
        None => serde_json::Value::Null,
    }
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

/// Starts a write transaction. `BEGIN IMMEDIATE` takes SQLite's write lock
/// up front: a deferred transaction that reads and then writes can fail with
/// "database is locked" without waiting, when another writer got in between.
pub async fn begin(db: &Db) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, sqlx::Error> {
    db.begin_with("BEGIN IMMEDIATE").await
}
