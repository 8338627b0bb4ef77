//! `siterec bench api`: the vault's API at a fleet's size, on SQLite and
//! (with `--postgres`) PostgreSQL in one run.
//!
//! For each engine: a new vault database is filled with `--items`
//! protected items (100 per source agent, two disks and `--points`
//! recovery points each, the counters their agents report), a vault is
//! started on it in this process, and through its HTTP API, as the CLI
//! calls it: the whole list of protected items page by page (following
//! `nextLink`, `--rounds` times), then `--gets` GETs of single items picked
//! at random. Printed per engine: p50/p99/max of a page and of a GET
//! beside the targets (page p99 < 100 ms, GET p99 < 10 ms), and a floor:
//! the same page's rows read straight from the database with one SELECT,
//! which no answer can beat.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::bench::round2;
use crate::client::Api;
use crate::output::{self, Format};

const PAGE_P99_TARGET_MS: f64 = 100.0;
const GET_P99_TARGET_MS: f64 = 10.0;
const ITEMS_PER_AGENT: usize = 100;

#[derive(clap::Args)]
pub struct ApiBenchOptions {
    /// Working directory (the bench's vault directories).
    #[arg(long)]
    pub dir: PathBuf,
    /// Protected items (100 per source agent).
    #[arg(long, default_value_t = 10_000)]
    pub items: usize,
    /// Recovery points of each item.
    #[arg(long, default_value_t = 5)]
    pub points: usize,
    /// Times the whole list is read.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// GETs of single items.
    #[arg(long, default_value_t = 1000)]
    pub gets: usize,
    /// Also on PostgreSQL: a server URL without a database
    /// (postgres://USER:PASSWORD@HOST:PORT); the bench creates one.
    #[arg(long)]
    pub postgres: Option<String>,
}

pub async fn api(opts: ApiBenchOptions, out: Format) -> anyhow::Result<()> {
    if opts.items == 0 || opts.rounds == 0 || opts.gets == 0 {
        bail!("--items, --rounds and --gets must be at least 1");
    }
    std::fs::create_dir_all(&opts.dir)
        .with_context(|| format!("creating {}", opts.dir.display()))?;
    let mut rows = Vec::new();
    let mut engines = vec![None];
    if let Some(server) = &opts.postgres {
        engines.push(Some(server.clone()));
    }
    for server in engines {
        rows.extend(one_engine(&opts, server.as_deref()).await?);
    }
    output::rows(
        out,
        &rows,
        &[
            ("ENGINE", "/engine"),
            ("REQUEST", "/request"),
            ("N", "/n"),
            ("P50 MS", "/p50Ms"),
            ("P99 MS", "/p99Ms"),
            ("MAX MS", "/maxMs"),
            ("TARGET P99 MS", "/targetP99Ms"),
            ("MET", "/met"),
        ],
    );
    Ok(())
}

async fn one_engine(opts: &ApiBenchOptions, server: Option<&str>) -> anyhow::Result<Vec<Value>> {
    let engine = if server.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    let data_dir = opts.dir.join(format!(
        "api-{}-{}",
        engine.to_ascii_lowercase(),
        std::process::id()
    ));
    if data_dir.exists() {
        std::fs::remove_dir_all(&data_dir)?;
    }
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let sqlite = data_dir.join("vault.db");
    let url = match server {
        Some(s) => Some(siterec_vault::db::create_test_database(s).await?),
        None => None,
    };
    let location = match &url {
        Some(u) => siterec_vault::db::Location::Url(u),
        None => siterec_vault::db::Location::Sqlite(&sqlite),
    };
    let agents = opts.items.div_ceil(ITEMS_PER_AGENT);
    let t = Instant::now();
    let db = siterec_vault::db::open_at(location).await?;
    let names =
        siterec_vault::model::seed_fleet(&db, agents, ITEMS_PER_AGENT.min(opts.items), opts.points)
            .await
            .map_err(|e| anyhow::anyhow!("filling the bench's database: {}", e.message))?;
    eprintln!(
        "{engine}: {} items, {} agents, {} points seeded in {:.1} s",
        names.len(),
        agents,
        names.len() * opts.points,
        t.elapsed().as_secs_f64()
    );
    // The floor: one SELECT of a page's rows, straight from the database.
    let mut floor = Vec::new();
    for _ in 0..50 {
        let t = Instant::now();
        let (rows, _) =
            siterec_vault::model::item_page(&db, None, None, siterec_vault::arm::ITEM_PAGE)
                .await
                .map_err(|e| anyhow::anyhow!("reading a page: {}", e.message))?;
        floor.push(ms(t.elapsed()));
        std::hint::black_box(rows);
    }
    db.close().await;

    let vault = siterec_vault::start(siterec_vault::VaultOptions {
        data_dir: data_dir.clone(),
        listen: "127.0.0.1:0".parse()?,
        agent_listen: "127.0.0.1:0".parse()?,
        name: "bench-vault".into(),
        database: url.clone(),
        events: Default::default(),
    })
    .await?;
    let api = Api::from_vault_dir(&data_dir)?;
    // One warm-up round: connections, caches.
    list_all(&api, &mut Vec::new()).await?;
    let mut pages = Vec::new();
    for _ in 0..opts.rounds {
        let n = list_all(&api, &mut pages).await?;
        if n != names.len() {
            bail!(
                "the list returned {n} items, not the {} seeded",
                names.len()
            );
        }
    }
    let mut rng = StdRng::seed_from_u64(7);
    let mut gets = Vec::new();
    for _ in 0..opts.gets {
        let name = &names[rng.random_range(0..names.len())];
        let rel = format!(
            "replicationFabrics/bench-primary/replicationProtectionContainers/primary-cloud/replicationProtectedItems/{name}"
        );
        let t = Instant::now();
        let v = api.get(&rel).await?;
        gets.push(ms(t.elapsed()));
        if v["name"].as_str() != Some(name.as_str()) {
            bail!("GET {rel} answered another item: {v}");
        }
    }
    vault.shutdown().await;
    std::fs::remove_dir_all(&data_dir)
        .with_context(|| format!("removing {}", data_dir.display()))?;
    Ok(vec![
        row(
            engine,
            "list, one page of 100",
            &mut pages,
            Some(PAGE_P99_TARGET_MS),
        ),
        row(engine, "get one item", &mut gets, Some(GET_P99_TARGET_MS)),
        row(engine, "floor: SELECT of a page's rows", &mut floor, None),
    ])
}

/// Lists every protected item, page by page; each page's time into `times`.
async fn list_all(api: &Api, times: &mut Vec<f64>) -> anyhow::Result<usize> {
    let mut n = 0;
    let t = Instant::now();
    let mut v = api.get("replicationProtectedItems").await?;
    times.push(ms(t.elapsed()));
    loop {
        n += v["value"].as_array().map_or(0, Vec::len);
        let Some(next) = v["nextLink"].as_str().map(str::to_string) else {
            break;
        };
        let t = Instant::now();
        v = api.get_url(&next).await?;
        times.push(ms(t.elapsed()));
    }
    Ok(n)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn row(engine: &str, request: &str, times: &mut [f64], target: Option<f64>) -> Value {
    times.sort_by(f64::total_cmp);
    let at = |q: f64| {
        let i = ((times.len() as f64 - 1.0) * q).round() as usize;
        times.get(i).copied().unwrap_or(f64::NAN)
    };
    let p99 = at(0.99);
    json!({
        "engine": engine,
        "request": request,
        "n": times.len(),
        "p50Ms": round2(at(0.5)),
        "p99Ms": round2(p99),
        "maxMs": round2(at(1.0)),
        "targetP99Ms": target,
        "met": target.map(|t| if p99 < t { "yes" } else { "NO" }),
    })
}
