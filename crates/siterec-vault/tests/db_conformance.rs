//! The vault database's conformance suite: what the vault's statements rely
//! on, checked on each engine — SQLite always, PostgreSQL too when
//! `SITEREC_TEST_POSTGRES` names a server (scripts/test sets it). Both
//! engines must pass the same checks; where both are here, their schemas
//! are compared column by column.

use std::time::Duration;

use siterec_vault::db::{self, Db, Engine};
use siterec_vault::model;

/// A fresh, migrated database per engine available: SQLite in `dir`, and
/// a new database on the PostgreSQL server when one is given.
async fn engines(dir: &std::path::Path) -> Vec<Db> {
    let mut out = vec![db::open(&dir.join("vault.db")).await.unwrap()];
    if let Ok(server) = std::env::var(db::TEST_POSTGRES_ENV)
        && !server.is_empty()
    {
        let url = db::create_test_database(&server).await.unwrap();
        out.push(db::open_at(db::Location::Url(&url)).await.unwrap());
    }
    out
}

#[tokio::test]
async fn names_compare_ignoring_case_and_sort_alike() {
    let dir = tempfile::tempdir().unwrap();
    let mut orders = Vec::new();
    for db in engines(dir.path()).await {
        let e = Engine::of(&db).name();
        for name in ["gamma", "Beta", "alpha", "DELTA"] {
            sqlx::query("INSERT INTO fabrics (name, created_ms) VALUES ($1, 0)")
                .bind(name)
                .execute(&db)
                .await
                .unwrap();
        }
        // Equality ignores case...
        let found: Option<String> = sqlx::query_scalar("SELECT name FROM fabrics WHERE name = $1")
            .bind("BETA")
            .fetch_optional(&db)
            .await
            .unwrap();
        assert_eq!(found.as_deref(), Some("Beta"), "{e}");
        // ...and so does uniqueness: 'ALPHA' is 'alpha'.
        let dup = sqlx::query("INSERT INTO fabrics (name, created_ms) VALUES ('ALPHA', 0)")
            .execute(&db)
            .await;
        assert!(
            dup.is_err(),
            "{e}: a name differing only in case was accepted"
        );
        let kept = sqlx::query("INSERT INTO fabrics (name, created_ms) VALUES ('ALPHA', 0) ON CONFLICT (name) DO NOTHING")
            .execute(&db)
            .await
            .unwrap();
        assert_eq!(kept.rows_affected(), 0, "{e}");
        // Order ignores case, on both engines the same.
        let order: Vec<String> = sqlx::query_scalar("SELECT name FROM fabrics ORDER BY name")
            .fetch_all(&db)
            .await
            .unwrap();
        assert_eq!(order, ["alpha", "Beta", "DELTA", "gamma"], "{e}");
        // A range on a name (pages resume after one) follows that order.
        let after: Vec<String> =
            sqlx::query_scalar("SELECT name FROM fabrics WHERE name > $1 ORDER BY name")
                .bind("beta")
                .fetch_all(&db)
                .await
                .unwrap();
        assert_eq!(after, ["DELTA", "gamma"], "{e}");
        orders.push(order);
    }
    orders.dedup();
    assert_eq!(orders.len(), 1);
}

#[tokio::test]
async fn integers_and_flags_keep_their_values() {
    let dir = tempfile::tempdir().unwrap();
    for db in engines(dir.path()).await {
        let e = Engine::of(&db).name();
        let big = 1_i64 << 41; // a time in ms, past 2^32
        sqlx::query("INSERT INTO agents (id, fabric, hostname, key_id, version, enrolled_ms, last_seen_ms, store_encrypted) VALUES ('a', 'f', 'h', 'k', 'v', $1, $2, 1)")
            .bind(big)
            .bind(-big)
            .execute(&db)
            .await
            .unwrap();
        let (enrolled, seen, flag, counters): (i64, Option<i64>, i64, String) = sqlx::query_as(
            "SELECT enrolled_ms, last_seen_ms, store_encrypted, counters FROM agents WHERE id = 'a'",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        assert_eq!((enrolled, seen, flag), (big, Some(-big), 1), "{e}");
        assert_eq!(counters, "{}", "{e}: the column default");
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM agents WHERE store_encrypted = 1")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(n, 1, "{e}");
        let missing: Option<i64> = sqlx::query_scalar("SELECT MAX(end_ms) FROM jobs")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(missing, None, "{e}: an aggregate of nothing is NULL");
    }
}

/// Two writers that read, wait and write never lose an update: `begin`
/// holds the write lock from the first statement.
#[tokio::test]
async fn write_transactions_are_serialized() {
    let dir = tempfile::tempdir().unwrap();
    for db in engines(dir.path()).await {
        let e = Engine::of(&db).name();
        sqlx::query("INSERT INTO policies (name, body, created_ms) VALUES ('counter', '0', 0)")
            .execute(&db)
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for _ in 0..4 {
            let db = db.clone();
            tasks.push(tokio::spawn(async move {
                let mut tx = db::begin(&db).await.unwrap();
                let v: String =
                    sqlx::query_scalar("SELECT body FROM policies WHERE name = 'counter'")
                        .fetch_one(&mut **tx)
                        .await
                        .unwrap();
                tokio::time::sleep(Duration::from_millis(50)).await;
                let next = v.parse::<i64>().unwrap() + 1;
                sqlx::query("UPDATE policies SET body = $1 WHERE name = 'counter'")
                    .bind(next.to_string())
                    .execute(&mut **tx)
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let v: String = sqlx::query_scalar("SELECT body FROM policies WHERE name = 'counter'")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(v, "4", "{e}: an update was lost");
    }
}

/// Reopening migrates nothing twice; a database newer than this siterec
/// is refused, naming both versions, and left as it was.
#[tokio::test]
async fn migrations_run_once_and_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sqlite = dir.path().join("vault.db");
    let url = match std::env::var(db::TEST_POSTGRES_ENV) {
        Ok(s) if !s.is_empty() => Some(db::create_test_database(&s).await.unwrap()),
        _ => None,
    };
    let mut locations = vec![db::Location::Sqlite(&sqlite)];
    if let Some(u) = &url {
        locations.push(db::Location::Url(u));
    }
    for location in locations {
        let db = db::open_at(location.clone()).await.unwrap();
        let e = Engine::of(&db).name();
        let versions: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
                .fetch_all(&db)
                .await
                .unwrap();
        db.close().await;
        let again = db::open_at(location.clone()).await.unwrap();
        let after: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM schema_migrations ORDER BY version")
                .fetch_all(&again)
                .await
                .unwrap();
        assert_eq!(versions, after, "{e}");
        let newest = *after.last().unwrap();
        sqlx::query("INSERT INTO schema_migrations (version, applied_ms) VALUES ($1, 0)")
            .bind(newest + 1)
            .execute(&again)
            .await
            .unwrap();
        again.close().await;
        let err = db::open_at(location.clone()).await.unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&format!("schema version {}", newest + 1))
                && msg.contains(&format!("knows ({newest})")),
            "{e}: {msg}"
        );
    }
}

/// Both engines have the same tables with the same columns: one set of
/// statements serves both.
#[tokio::test]
async fn both_engines_have_the_same_schema() {
    let dir = tempfile::tempdir().unwrap();
    let dbs = engines(dir.path()).await;
    if dbs.len() < 2 {
        eprintln!(
            "SQLite only: set {} to compare with PostgreSQL",
            db::TEST_POSTGRES_ENV
        );
    }
    let mut schemas = Vec::new();
    for db in &dbs {
        let cols: Vec<(String, String)> = match Engine::of(db) {
            Engine::Sqlite => sqlx::query_as(
                "SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' ORDER BY m.name, p.name",
            )
            .fetch_all(db)
            .await
            .unwrap(),
            Engine::Postgres => sqlx::query_as(
                "SELECT CAST(table_name AS TEXT), CAST(column_name AS TEXT) FROM information_schema.columns WHERE table_schema = 'public' ORDER BY 1, 2",
            )
            .fetch_all(db)
            .await
            .unwrap(),
        };
        let mut cols: Vec<(String, String)> = cols
            .into_iter()
            .map(|(t, c)| (t.to_ascii_lowercase(), c.to_ascii_lowercase()))
            .collect();
        cols.sort();
        assert!(
            cols.iter()
                .any(|(t, c)| t == "protected_items" && c == "multi_vm_group")
        );
        schemas.push(cols);
    }
    if let [a, b] = schemas.as_slice() {
        let only_a: Vec<_> = a.iter().filter(|c| !b.contains(c)).collect();
        let only_b: Vec<_> = b.iter().filter(|c| !a.contains(c)).collect();
        assert!(
            only_a.is_empty() && only_b.is_empty(),
            "only on SQLite: {only_a:?}; only on PostgreSQL: {only_b:?}"
        );
    }
}

/// Pages of protected items: creation order, ties broken by name ignoring
/// case, each item once, on both engines.
#[tokio::test]
async fn item_pages_resume_after_their_last_item() {
    let dir = tempfile::tempdir().unwrap();
    for db in engines(dir.path()).await {
        let e = Engine::of(&db).name();
        // Three items created in the same millisecond, two later ones.
        for (name, created) in [("b-2", 5), ("A-1", 5), ("c-3", 5), ("d-4", 9), ("E-5", 7)] {
            sqlx::query("INSERT INTO protected_items (name, fabric, container, machine, policy, target_fabric, target_container, state, created_ms, updated_ms) VALUES ($1, 'f', 'c', $2, 'p', 'rf', 'rc', 'Protected', $3, 0)")
                .bind(name)
                .bind(name)
                .bind(created as i64)
                .execute(&db)
                .await
                .unwrap();
        }
        let mut seen = Vec::new();
        let mut after = None;
        loop {
            let (items, next) = model::item_page(&db, None, after.as_ref(), 2)
                .await
                .unwrap();
            assert!(items.len() <= 2);
            seen.extend(items.into_iter().map(|i| i.name));
            match next {
                Some(c) => {
                    let token = c.token();
                    after = Some(model::ItemCursor::parse(&token).unwrap());
                }
                None => break,
            }
        }
        assert_eq!(seen, ["A-1", "b-2", "c-3", "E-5", "d-4"], "{e}");
        let (items, _) = model::item_page(&db, Some(("F", "C")), None, 10)
            .await
            .unwrap();
        assert_eq!(items.len(), 5, "{e}: a cloud's page, its names in any case");
        let (items, _) = model::item_page(&db, Some(("f", "other")), None, 10)
            .await
            .unwrap();
        assert!(items.is_empty(), "{e}");
    }
}

/// The job engine's persistence (`job_store`): a job and its named steps
/// written and read back, a round's effects, a task created once, the
/// sealed key forgotten everywhere, a failure recorded with the steps
/// after it cancelled — the same on each engine.
#[tokio::test]
async fn jobs_their_steps_and_effects_read_back_as_written() {
    use siterec_core::orchestration::{Effect, FailoverInput, JobInput, Need, Observed, StepKey};
    use siterec_core::state::{JobKind, JobState};
    use siterec_core::wire::{SealedKey, TaskWork};
    use siterec_vault::persist::jobs as job_store;

    let dir = tempfile::tempdir().unwrap();
    for db in engines(dir.path()).await {
        let e = Engine::of(&db).name();
        let input = JobInput::UnplannedFailover(FailoverInput {
            item: "web01".into(),
            point_id: "p1".into(),
            vm: true,
            vm_name: Some("web01".into()),
            sealed_key: Some(SealedKey("c2VhbGVk".into())),
            to: siterec_core::state::Location::Recovery,
        });
        let mut tx = db::begin(&db).await.unwrap();
        let job = job_store::create(&mut tx, &input, "ProtectionEntity", "web01", "/web01")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            job_store::active(&db).await.unwrap(),
            vec![job.clone()],
            "{e}"
        );

        let mut tx = db::begin(&db).await.unwrap();
        let record = job_store::load(&mut tx, &job)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(record.kind, JobKind::UnplannedFailover, "{e}");
        assert_eq!(record.state, JobState::NotStarted, "{e}");
        assert_eq!(
            JobInput::parse(record.kind, &record.input).unwrap(),
            input,
            "{e}"
        );
        let steps = job_store::steps(&mut tx, &job).await.unwrap();
        let keys: Vec<_> = steps.iter().map(|s| s.key.clone().unwrap()).collect();
        assert_eq!(
            keys,
            [
                StepKey::CheckFailover,
                StepKey::StopReplication,
                StepKey::StartVm,
                StepKey::CompleteFailover
            ]
            .map(|k| k.as_str().to_string()),
            "{e}"
        );
        assert!(
            steps
                .iter()
                .all(|s| s.state == JobState::NotStarted && s.started_ms.is_none())
        );

        // A round: the step starts, a task is created (twice: once), the
        // step says something, the key is forgotten.
        job_store::start_job(&mut tx, &job, 5).await.unwrap();
        job_store::start_step(&mut tx, &job, 2, 7).await.unwrap();
        let task = Effect::EnsureTask {
            id: format!("{job}-start-replica"),
            agent: "agent-1".into(),
            work: TaskWork::Materialize {
                item: "web01".into(),
                point_id: "p1".into(),
                formats: vec!["raw".into()],
                sealed_key: Some(SealedKey("c2VhbGVk".into())),
            },
        };
        for effect in [
            &task,
            &task,
            &Effect::StepOutput(serde_json::json!({"notes": ["hello"]})),
            &Effect::ForgetSealedKey,
        ] {
            job_store::apply(&mut tx, &job, 2, effect).await.unwrap();
        }
        tx.commit().await.unwrap();
        let (n, work): (i64, String) =
            sqlx::query_as("SELECT COUNT(*), MAX(work) FROM agent_tasks WHERE job_id = $1")
                .bind(&job)
                .fetch_one(&db)
                .await
                .unwrap();
        assert_eq!(n, 1, "{e}: the task was created once");
        assert!(!work.contains("sealedKey"), "{e}: {work}");
        let mut tx = db::begin(&db).await.unwrap();
        let record = job_store::load(&mut tx, &job)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert!(!record.input.contains("sealedKey"), "{e}: {}", record.input);
        assert_eq!(record.state, JobState::InProgress, "{e}");
        let steps = job_store::steps(&mut tx, &job).await.unwrap();
        assert_eq!(steps[2].state, JobState::InProgress, "{e}");
        assert_eq!(steps[2].started_ms, Some(7), "{e}");
        // The task is seen as pending, with the item's agent unknown.
        let seen = job_store::observe(
            &mut tx,
            &Need::Stores {
                tasks: vec![("agent-1".into(), format!("{job}-start-replica"))],
            },
            10,
        )
        .await
        .unwrap();
        match seen {
            Observed::Stores(t) => {
                assert_eq!(t.len(), 1, "{e}");
                assert_eq!(
                    t[0].task,
                    Some(siterec_core::orchestration::TaskResult::Pending),
                    "{e}"
                );
                assert_eq!(t[0].agent_last_seen_ms, None, "{e}");
            }
            other => panic!("{e}: {other:?}"),
        }
        // A failure: the step failed, the rest cancelled, the job failed.
        job_store::fail_job(&mut tx, &job, Some(2), "StartReplicaFailed", "no qemu")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let states: Vec<String> =
            sqlx::query_scalar("SELECT state FROM job_steps WHERE job_id = $1 ORDER BY idx")
                .bind(&job)
                .fetch_all(&db)
                .await
                .unwrap();
        // (Steps 0 and 1 never ran here: unfinished, they are cancelled too.)
        assert_eq!(
            states,
            ["Cancelled", "Cancelled", "Failed", "Cancelled"],
            "{e}"
        );
        let view = model::job_json(&db, &test_vault(), &job).await.unwrap();
        assert_eq!(view.properties.state, "Failed", "{e}");
        assert_eq!(
            view.properties.errors[0].service_error_details.code, "StartReplicaFailed",
            "{e}"
        );
        assert_eq!(
            view.properties.tasks[2]
                .custom_details
                .as_ref()
                .unwrap()
                .output["notes"][0],
            "hello",
            "{e}"
        );
        assert!(job_store::active(&db).await.unwrap().is_empty(), "{e}");
    }
}

fn test_vault() -> siterec_vault::VaultInfo {
    siterec_vault::VaultInfo {
        subscription: "s".into(),
        resource_group: "rg".into(),
        name: "v".into(),
        location: "local".into(),
    }
}

/// The other persistence areas, the same on each engine: an agent's
/// heartbeat inventory, a pairing and a network mapping through their
/// states, an item with its points and group, registration keys.
#[tokio::test]
async fn inventory_pairings_items_and_keys_read_back_as_written() {
    use siterec_core::orchestration::{Need, Observed};
    use siterec_core::state::{Lifecycle, Location, ProtectionState, TestFailoverState};
    use siterec_core::wire::{HeartbeatRequest, MachineInfo};
    use siterec_vault::persist::jobs as job_store;
    use siterec_vault::persist::{agents, config, inventory, items, jobs};

    let dir = tempfile::tempdir().unwrap();
    for db in engines(dir.path()).await {
        let e = Engine::of(&db).name();
        inventory::ensure_fabric(&db, "Primary", 1).await.unwrap();
        inventory::ensure_fabric(&db, "PRIMARY", 2).await.unwrap();
        inventory::ensure_fabric(&db, "recovery", 3).await.unwrap();
        assert_eq!(
            inventory::fabric_names(&db).await.unwrap(),
            ["Primary", "recovery"],
            "{e}"
        );
        let agent = agents::NewAgent {
            id: "agent-1",
            fabric: "Primary",
            hostname: "h1",
            key_id: "k1",
            version: "0.1",
        };
        agents::insert_agent(&db, &agent, 10).await.unwrap();
        let machine = MachineInfo {
            name: "web01".into(),
            kind: "PhysicalServer".into(),
            disks: vec![],
            nics: vec![],
            vm: None,
            error: None,
        };
        let req = HeartbeatRequest {
            cloud: "Cloud1".into(),
            machines: vec![machine.clone()],
            data_url: None,
            networks: vec!["lan".into()],
            store_encrypted: false,
            store_key_id: None,
            transport_key: None,
            counters: Default::default(),
            seen_version: None,
            wait_ms: 0,
        };
        let infos = vec![serde_json::to_string(&machine).unwrap()];
        let lan = "lan".to_string();
        let beat = agents::Heartbeat {
            agent: "agent-1",
            fabric: "primary",
            req: &req,
            infos: &infos,
            counters: "{}",
            networks: &[&lan],
            machines_unchanged: false,
        };
        agents::record_heartbeat(&db, &beat, 20).await.unwrap();
        // Twice: nothing doubles.
        agents::record_heartbeat(&db, &beat, 21).await.unwrap();
        assert_eq!(
            inventory::container_names(&db, "primary").await.unwrap(),
            ["Cloud1"],
            "{e}"
        );
        let ms = inventory::machines_of_cloud(&db, "PRIMARY", "cloud1")
            .await
            .unwrap();
        assert_eq!(ms.len(), 1, "{e}");
        assert_eq!(ms[0].agent_id, "agent-1", "{e}");
        assert_eq!(
            inventory::agent_networks(&db, "agent-1").await.unwrap(),
            ["lan"],
            "{e}"
        );
        let a = inventory::agents_of_fabric(&db, "primary").await.unwrap();
        assert_eq!(
            (a.len(), a[0].last_seen_ms, a[0].cloud.as_deref()),
            (1, Some(21), Some("Cloud1")),
            "{e}"
        );
        // A heartbeat whose machines are as last recorded (the API layer
        // knows) writes when the agent was seen and leaves them alone; one
        // that reports none removes them.
        let req_none = HeartbeatRequest {
            machines: vec![],
            ..req.clone()
        };
        let unchanged = agents::Heartbeat {
            req: &req_none,
            infos: &[],
            machines_unchanged: true,
            ..beat
        };
        agents::record_heartbeat(&db, &unchanged, 22).await.unwrap();
        let ms = inventory::machines_of_cloud(&db, "primary", "cloud1")
            .await
            .unwrap();
        assert_eq!(ms.len(), 1, "{e}");
        let a = inventory::agents_of_fabric(&db, "primary").await.unwrap();
        assert_eq!(a[0].last_seen_ms, Some(22), "{e}");
        let emptied = agents::Heartbeat {
            machines_unchanged: false,
            ..unchanged
        };
        agents::record_heartbeat(&db, &emptied, 23).await.unwrap();
        let ms = inventory::machines_of_cloud(&db, "primary", "cloud1")
            .await
            .unwrap();
        assert!(ms.is_empty(), "{e}");
        agents::record_heartbeat(&db, &beat, 24).await.unwrap();

        // A pairing: written Pairing, read back, paired by its job.
        let mut tx = db::begin(&db).await.unwrap();
        let pairing = config::PairingRow {
            fabric: "Primary".into(),
            container: "Cloud1".into(),
            name: "map1".into(),
            target_fabric: "recovery".into(),
            target_container: "rc".into(),
            policy: "pol".into(),
            state: "Pairing".into(),
        };
        config::insert_pairing(&mut tx, &pairing, 30).await.unwrap();
        assert_eq!(
            config::cloud_pairings(&mut tx, "recovery", "RC")
                .await
                .unwrap(),
            1,
            "{e}"
        );
        tx.commit().await.unwrap();
        assert_eq!(
            config::pairing(&db, "primary", "cloud1", "MAP1")
                .await
                .unwrap(),
            Some(pairing.clone()),
            "{e}"
        );
        assert_eq!(
            config::paired_target(&db, "primary", "cloud1")
                .await
                .unwrap(),
            None,
            "{e}: not paired yet"
        );
        let mut tx = db::begin(&db).await.unwrap();
        jobs::apply(
            &mut tx,
            "j",
            0,
            &siterec_core::orchestration::Effect::PairClouds(
                siterec_core::orchestration::PairingInput {
                    fabric: "primary".into(),
                    container: "cloud1".into(),
                    name: "map1".into(),
                    policy: "pol".into(),
                },
            ),
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            config::paired_target(&db, "primary", "cloud1")
                .await
                .unwrap(),
            Some(("recovery".into(), "rc".into(), "pol".into())),
            "{e}"
        );

        // A network mapping through Pairing → (unpairing).
        let mut tx = db::begin(&db).await.unwrap();
        let nm = config::NetworkMappingRow {
            fabric: "Primary".into(),
            network: "lan".into(),
            name: "nm1".into(),
            recovery_fabric: "recovery".into(),
            recovery_network: "dr".into(),
            instance_type: "VmmToVmm".into(),
            state: "Pairing".into(),
        };
        config::insert_network_mapping(&mut tx, &nm, 40)
            .await
            .unwrap();
        assert_eq!(
            config::mapping_of_network(&mut tx, "primary", "LAN")
                .await
                .unwrap(),
            Some(nm.clone()),
            "{e}"
        );
        config::unpair_network_mapping(&mut tx, "primary", "lan", "nm1")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let all = config::network_mappings(&db, None).await.unwrap();
        assert_eq!(all.len(), 1, "{e}");
        assert_eq!(all[0].state, "Unpairing", "{e}");

        // An item, its states, its points, its group.
        let mut tx = db::begin(&db).await.unwrap();
        let new = items::NewItem {
            name: "web01",
            fabric: "Primary",
            container: "Cloud1",
            machine: "web01",
            policy: "pol",
            target_fabric: "recovery",
            target_container: "rc",
            state: ProtectionState::EnablingProtection,
            group: Some("app"),
        };
        items::insert(&mut tx, &new, 50).await.unwrap();
        // Protected again after a failover: replicating back from the
        // recovery site.
        let back = Lifecycle {
            state: ProtectionState::Protected,
            active: Location::Recovery,
        };
        items::set_life(&mut tx, "WEB01", back, true, 51)
            .await
            .unwrap();
        items::start_test_failover(
            &mut tx,
            "web01",
            TestFailoverState::TestFailoverInitiated,
            "p2",
            52,
        )
        .await
        .unwrap();
        let point = |id: &'static str, at: i64| agents::NewPoint {
            item: "web01",
            point_id: id,
            created_ms: at,
            consistency: "CrashConsistent",
            bytes_sent: 1 << 40,
            bytes_read: 7,
            final_for: None,
            site: "Recovery",
            epoch: None,
        };
        agents::insert_point(&mut tx, &point("p1", 100), 60)
            .await
            .unwrap();
        agents::insert_point(&mut tx, &point("p2", 200), 61)
            .await
            .unwrap();
        agents::insert_point(&mut tx, &point("p2", 200), 62)
            .await
            .unwrap();
        assert_eq!(
            agents::held_test_point(&mut tx, "web01")
                .await
                .unwrap()
                .as_deref(),
            Some("p2"),
            "{e}"
        );
        agents::hide_points(&mut tx, "web01", &["p1".to_string()], 63)
            .await
            .unwrap();
        assert_eq!(
            items::latest_point(&mut tx, "web01", Location::Recovery)
                .await
                .unwrap()
                .as_deref(),
            Some("p2"),
            "{e}"
        );
        assert_eq!(
            items::listed_point(&mut tx, "web01", "p1", Location::Recovery)
                .await
                .unwrap(),
            None,
            "{e}: pruned"
        );
        // A planned failover's final point is found by its job.
        let final_point = agents::NewPoint {
            final_for: Some("job-9"),
            ..point("p3", 300)
        };
        agents::insert_point(&mut tx, &final_point, 64)
            .await
            .unwrap();
        for (job, want) in [("job-9", Some("p3")), ("job-8", None)] {
            match job_store::observe(
                &mut tx,
                &Need::FinalPoint {
                    item: "web01".into(),
                    job_id: job.into(),
                    source: Location::Primary,
                },
                65,
            )
            .await
            .unwrap()
            {
                Observed::FinalPoint { point, .. } => {
                    assert_eq!(point.as_deref(), want, "{e}: {job}")
                }
                other => panic!("{e}: {other:?}"),
            }
        }
        // A point of the reverse direction is kept at the primary site:
        // it is the latest there only, and counts for its epoch.
        let reverse = agents::NewPoint {
            site: "Primary",
            epoch: Some("job-r"),
            ..point("p4", 400)
        };
        agents::insert_point(&mut tx, &reverse, 66).await.unwrap();
        for (site, want) in [(Location::Recovery, "p3"), (Location::Primary, "p4")] {
            assert_eq!(
                items::latest_point(&mut tx, "web01", site)
                    .await
                    .unwrap()
                    .as_deref(),
                Some(want),
                "{e}: {site:?}"
            );
        }
        assert_eq!(
            items::listed_point(&mut tx, "web01", "p4", Location::Recovery)
                .await
                .unwrap(),
            None,
            "{e}: not in the recovery site's store"
        );
        for (epoch, want) in [(Some("job-r"), 1), (Some("job-x"), 0), (None, 3)] {
            match job_store::observe(
                &mut tx,
                &Need::Points {
                    item: "web01".into(),
                    epoch: epoch.map(str::to_string),
                },
                67,
            )
            .await
            .unwrap()
            {
                Observed::Points { listed } => assert_eq!(listed, want, "{e}: {epoch:?}"),
                other => panic!("{e}: {other:?}"),
            }
        }
        let members = items::group_members(&mut tx, "APP").await.unwrap();
        assert_eq!(members.len(), 1, "{e}");
        assert_eq!(members[0].agent_id.as_deref(), Some("agent-1"), "{e}");
        tx.commit().await.unwrap();
        let item = items::load(&db, "Web01").await.unwrap().unwrap();
        assert_eq!(
            (item.life(), item.test_state),
            (back, TestFailoverState::TestFailoverInitiated),
            "{e}"
        );
        assert_eq!(item.test_point_id.as_deref(), Some("p2"), "{e}");
        let points = items::points(&db, "web01").await.unwrap();
        assert_eq!(points.len(), 3, "{e}: p1 pruned, p2, p3 and p4 listed");
        assert_eq!(
            (points[0].bytes_sent, points[0].bytes_read),
            (1 << 40, 7),
            "{e}"
        );
        assert_eq!(
            items::item_of_machine(&db, "primary", "WEB01")
                .await
                .unwrap()
                .as_deref(),
            Some("web01"),
            "{e}"
        );
        let sources = agents::source_items(&db, "agent-1", "primary")
            .await
            .unwrap();
        assert!(sources.is_empty(), "{e}: no recovery agent chosen yet");

        // Registration keys: listed, revoked once.
        let mut tx = db::begin(&db).await.unwrap();
        let key = inventory::NewKey {
            key_id: "k2",
            fabric: "recovery",
            secret_hash: "h",
            created_ms: 70,
            expires_ms: 80,
        };
        inventory::insert_key(&mut tx, &key).await.unwrap();
        tx.commit().await.unwrap();
        assert!(inventory::revoke_key(&db, "k2", 90).await.unwrap(), "{e}");
        assert!(inventory::revoke_key(&db, "k2", 95).await.unwrap(), "{e}");
        assert!(
            !inventory::revoke_key(&db, "nope", 95).await.unwrap(),
            "{e}"
        );
        let keys = inventory::registration_keys(&db).await.unwrap();
        assert_eq!(keys.len(), 1, "{e}");
        assert_eq!(
            keys[0].revoked_ms,
            Some(90),
            "{e}: revoked at its first time"
        );
        let k = agents::registration_key(&db, "k2").await.unwrap().unwrap();
        assert_eq!(
            (k.fabric.as_str(), k.revoked_ms, k.expires_ms),
            ("recovery", Some(90), 80),
            "{e}"
        );
    }
}

#[tokio::test]
async fn events_conditions_alert_settings_and_deliveries_read_back_as_written() {
    use siterec_core::events::{Conditions, EventQuery, NewEvent, Severity};
    use siterec_vault::persist::agents;
    use siterec_vault::persist::events::{self as ev, AlertRow};

    let dir = tempfile::tempdir().unwrap();
    for db in engines(dir.path()).await {
        let e = Engine::of(&db).name();
        let event = |sev: Severity, code: &'static str, name: &str| NewEvent {
            severity: sev,
            code,
            kind: "ProtectedItem",
            name: name.into(),
            correlation: name.into(),
            fabric: Some("Primary".into()),
            summary: format!("{code} of {name}"),
            details: serde_json::json!({"rpoInSeconds": 61}),
        };
        // Raised before any webhook: nothing to deliver.
        let mut tx = db::begin(&db).await.unwrap();
        let first = ev::insert(
            &mut tx,
            &event(Severity::Warning, "RpoThresholdExceeded", "Web01"),
            1000,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();
        assert!(
            ev::due_deliveries(&db, i64::MAX, 10)
                .await
                .unwrap()
                .is_empty(),
            "{e}"
        );

        assert_eq!(
            ev::alert_setting(&db, "defaultalertsetting").await.unwrap(),
            None,
            "{e}"
        );
        let setting = AlertRow {
            name: ev::DEFAULT_ALERT_SETTING.into(),
            send_to_owners: "DoNotSend".into(),
            emails: vec!["ops@example.com".into()],
            locale: None,
            webhook_url: Some("http://127.0.0.1:9/h".into()),
        };
        ev::put_alert_setting(&db, &setting, 5).await.unwrap();
        assert_eq!(
            ev::alert_setting(&db, "DEFAULTALERTSETTING")
                .await
                .unwrap()
                .as_ref(),
            Some(&setting),
            "{e}: names ignore case"
        );
        assert_eq!(
            ev::webhook_url(&db).await.unwrap().as_deref(),
            Some("http://127.0.0.1:9/h")
        );

        let mut tx = db::begin(&db).await.unwrap();
        let second = ev::insert(
            &mut tx,
            &event(Severity::Critical, "ServerNotHeardFrom", "host1"),
            2000,
        )
        .await
        .unwrap();
        let third = ev::insert(
            &mut tx,
            &event(Severity::Info, "RpoWithinThreshold", "web01"),
            3000,
        )
        .await
        .unwrap();
        tx.commit().await.unwrap();

        let all = ev::list(&db, &EventQuery::default(), 100).await.unwrap();
        let names: Vec<&str> = all.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, [&first, &second, &third], "{e}: raising order");
        assert_eq!(all[0].details, r#"{"rpoInSeconds":61}"#, "{e}");
        assert_eq!(all[0].delivery, None, "{e}");
        let q = EventQuery {
            affected_object_friendly_name: Some("WEB01".into()),
            ..Default::default()
        };
        assert_eq!(
            ev::list(&db, &q, 100).await.unwrap().len(),
            2,
            "{e}: names ignore case"
        );
        let q = EventQuery {
            severity: Some(Severity::Critical),
            ..Default::default()
        };
        assert_eq!(ev::list(&db, &q, 100).await.unwrap()[0].name, second, "{e}");
        let q = EventQuery {
            start_ms: Some(2000),
            end_ms: Some(2999),
            fabric_name: Some("primary".into()),
            ..Default::default()
        };
        let timed = ev::list(&db, &q, 100).await.unwrap();
        assert_eq!(timed.len(), 1, "{e}");
        assert_eq!(timed[0].name, second, "{e}");
        let newest = ev::list(&db, &EventQuery::default(), 1).await.unwrap();
        assert_eq!(newest[0].name, third, "{e}: a limit keeps the newest");

        // Deliveries: due in order; a failure waits; a success is done.
        let due = ev::due_deliveries(&db, 3000, 10).await.unwrap();
        assert_eq!(
            due.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            [&second, &third],
            "{e}"
        );
        ev::delivery_failed(&db, &second, 10_000, "answered 503")
            .await
            .unwrap();
        ev::delivered(&db, &third).await.unwrap();
        assert!(
            ev::due_deliveries(&db, 9999, 10).await.unwrap().is_empty(),
            "{e}"
        );
        let again = ev::due_deliveries(&db, 10_000, 10).await.unwrap();
        assert_eq!(again.len(), 1, "{e}");
        assert_eq!(
            (again[0].attempts, again[0].last_delivery_error.as_deref()),
            (1, Some("answered 503")),
            "{e}"
        );
        assert_eq!(
            ev::get(&db, &third)
                .await
                .unwrap()
                .unwrap()
                .delivery
                .as_deref(),
            Some("Delivered"),
            "{e}"
        );
        assert_eq!(ev::get(&db, "nope").await.unwrap(), None, "{e}");

        // Conditions: only changes are written; gone keys are removed.
        let mut a = Conditions::new();
        a.insert("item/web01/rpo".into(), "Exceeded".into());
        a.insert("agent/a1/seen".into(), "HeardFrom".into());
        let mut tx = db::begin(&db).await.unwrap();
        ev::set_conditions(&mut tx, &Conditions::new(), &a, 1)
            .await
            .unwrap();
        let mut b = Conditions::new();
        b.insert("item/web01/rpo".into(), "Within".into());
        ev::set_conditions(&mut tx, &a, &b, 2).await.unwrap();
        assert_eq!(ev::conditions(&mut tx).await.unwrap(), b, "{e}");
        tx.commit().await.unwrap();

        // The agent's heartbeat period is what the evaluator reads.
        agents::insert_agent(
            &db,
            &agents::NewAgent {
                id: "agent-9",
                fabric: "Primary",
                hostname: "h9",
                key_id: "k",
                version: "0",
            },
            50,
        )
        .await
        .unwrap();
        let seen = ev::agents_seen(&db).await.unwrap();
        assert_eq!(
            seen,
            [(
                "agent-9".to_string(),
                "h9".to_string(),
                "Primary".to_string(),
                Some(50),
                None
            )],
            "{e}"
        );
        assert!(
            ev::completed_test_failovers_before(&db, i64::MAX)
                .await
                .unwrap()
                .is_empty()
        );
    }
}

/// Taking things apart and job queries, the same on each engine: what
/// keeps a pairing, an agent, a fabric or a policy (names compared
/// ignoring case), their removal, and jobs read for a query since a time
/// with an export's output.
#[tokio::test]
async fn taking_apart_and_job_queries_read_back_as_written() {
    use siterec_core::orchestration::{Effect, ExportInput, JobInput, PairingInput};
    use siterec_core::state::ProtectionState;
    use siterec_vault::persist::{agents, config, inventory, items, jobs};

    let dir = tempfile::tempdir().unwrap();
    for db in engines(dir.path()).await {
        let e = Engine::of(&db).name();
        for f in ["Primary", "recovery", "spare"] {
            inventory::ensure_fabric(&db, f, 1).await.unwrap();
        }
        for (id, fabric) in [
            ("agent-1", "Primary"),
            ("agent-2", "recovery"),
            ("agent-3", "recovery"),
        ] {
            let a = agents::NewAgent {
                id,
                fabric,
                hostname: "h",
                key_id: "k",
                version: "0.1",
            };
            agents::insert_agent(&db, &a, 10).await.unwrap();
        }
        let machine = siterec_core::wire::MachineInfo {
            name: "web01".into(),
            kind: "PhysicalServer".into(),
            disks: vec![],
            nics: vec![],
            vm: None,
            error: None,
        };
        let req = siterec_core::wire::HeartbeatRequest {
            cloud: "Cloud1".into(),
            machines: vec![machine.clone()],
            data_url: None,
            networks: vec!["lan".into()],
            store_encrypted: false,
            store_key_id: None,
            transport_key: None,
            counters: Default::default(),
            seen_version: None,
            wait_ms: 0,
        };
        let infos = vec![serde_json::to_string(&machine).unwrap()];
        let lan = "lan".to_string();
        let beat = agents::Heartbeat {
            agent: "agent-1",
            fabric: "Primary",
            req: &req,
            infos: &infos,
            counters: "{}",
            networks: &[&lan],
            machines_unchanged: false,
        };
        agents::record_heartbeat(&db, &beat, 20).await.unwrap();
        let mut tx = db::begin(&db).await.unwrap();
        let pairing = config::PairingRow {
            fabric: "Primary".into(),
            container: "Cloud1".into(),
            name: "map1".into(),
            target_fabric: "recovery".into(),
            target_container: "rc".into(),
            policy: "pol".into(),
            state: "Pairing".into(),
        };
        config::insert_pairing(&mut tx, &pairing, 30).await.unwrap();
        let new = items::NewItem {
            name: "web01",
            fabric: "PRIMARY",
            container: "cloud1",
            machine: "WEB01",
            policy: "POL",
            target_fabric: "Recovery",
            target_container: "RC",
            state: ProtectionState::Protected,
            group: None,
        };
        items::insert(&mut tx, &new, 50).await.unwrap();
        sqlx::query("UPDATE protected_items SET target_agent_id = 'agent-2'")
            .execute(&mut **tx)
            .await
            .unwrap();
        // What keeps each thing, named.
        assert_eq!(
            config::pairing_items(&mut tx, &pairing).await.unwrap(),
            ["web01"],
            "{e}"
        );
        assert_eq!(
            inventory::agent_items(&mut tx, "agent-1").await.unwrap(),
            ["web01"],
            "{e}: its machine"
        );
        assert_eq!(
            inventory::agent_items(&mut tx, "agent-2").await.unwrap(),
            ["web01"],
            "{e}: its replica"
        );
        assert!(
            inventory::agent_items(&mut tx, "agent-3")
                .await
                .unwrap()
                .is_empty(),
            "{e}"
        );
        assert_eq!(
            inventory::agent_of_fabric(&mut tx, "RECOVERY", "agent-3")
                .await
                .unwrap()
                .as_deref(),
            Some("agent-3"),
            "{e}"
        );
        assert_eq!(
            inventory::agent_of_fabric(&mut tx, "primary", "agent-3")
                .await
                .unwrap(),
            None,
            "{e}"
        );
        assert_eq!(
            inventory::fabric_uses(&mut tx, "recovery").await.unwrap(),
            [
                "agents agent-2, agent-3",
                "cloud pairings map1",
                "protected items web01"
            ],
            "{e}"
        );
        assert!(
            inventory::fabric_uses(&mut tx, "SPARE")
                .await
                .unwrap()
                .is_empty(),
            "{e}"
        );
        tx.commit().await.unwrap();
        assert_eq!(
            config::policy_users(&db, "Pol").await.unwrap(),
            ["pairing map1", "protected item web01"],
            "{e}"
        );

        // Removal: the item goes, then the pairing (Unpairing, then gone),
        // then the agents and a fabric.
        let mut tx = db::begin(&db).await.unwrap();
        sqlx::query("DELETE FROM protected_items")
            .execute(&mut **tx)
            .await
            .unwrap();
        config::unpair(&mut tx, "primary", "CLOUD1", "MAP1")
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            config::pairing(&db, "primary", "cloud1", "map1")
                .await
                .unwrap()
                .map(|p| p.state),
            Some("Unpairing".into()),
            "{e}"
        );
        let p = PairingInput {
            fabric: "primary".into(),
            container: "cloud1".into(),
            name: "map1".into(),
            policy: "pol".into(),
        };
        let mut tx = db::begin(&db).await.unwrap();
        jobs::apply(&mut tx, "j", 0, &Effect::KeepPairing(p.clone()))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert_eq!(
            config::pairing(&db, "primary", "cloud1", "map1")
                .await
                .unwrap()
                .map(|p| p.state),
            Some("Paired".into()),
            "{e}: a failed removal keeps it"
        );
        let mut tx = db::begin(&db).await.unwrap();
        jobs::apply(&mut tx, "j", 0, &Effect::RemovePairing(p))
            .await
            .unwrap();
        inventory::remove_agent(&mut tx, "agent-1").await.unwrap();
        inventory::remove_fabric(&mut tx, "Spare", 99)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        assert!(config::pairings(&db, None).await.unwrap().is_empty(), "{e}");
        assert!(
            inventory::agents_of_fabric(&db, "primary")
                .await
                .unwrap()
                .is_empty(),
            "{e}"
        );
        assert!(
            inventory::machines_of_cloud(&db, "primary", "cloud1")
                .await
                .unwrap()
                .is_empty(),
            "{e}"
        );
        assert!(
            inventory::agent_networks(&db, "agent-1")
                .await
                .unwrap()
                .is_empty(),
            "{e}"
        );
        assert_eq!(
            agents::agent_fabric(&db, "agent-1").await.unwrap(),
            None,
            "{e}"
        );
        // A heartbeat of the removed agent writes nothing back.
        assert!(
            !agents::record_heartbeat(&db, &beat, 90).await.unwrap(),
            "{e}"
        );
        assert!(
            inventory::machines_of_cloud(&db, "primary", "cloud1")
                .await
                .unwrap()
                .is_empty(),
            "{e}"
        );
        assert_eq!(
            inventory::fabric_names(&db).await.unwrap(),
            ["Primary", "recovery"],
            "{e}"
        );

        // Jobs for a query: since a time, newest first; an export's output.
        let mut tx = db::begin(&db).await.unwrap();
        let input = JobInput::ExportJobs(ExportInput {
            query: Default::default(),
        });
        let first = jobs::create(
            &mut tx,
            &input,
            "Vault",
            "replicationJobs",
            "/v/replicationJobs",
        )
        .await
        .unwrap();
        let second = jobs::create(
            &mut tx,
            &input,
            "Vault",
            "replicationJobs",
            "/v/replicationJobs",
        )
        .await
        .unwrap();
        jobs::set_output(&mut tx, &second, r#"{"rows":0}"#)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        sqlx::query("UPDATE jobs SET created_ms = 100, start_ms = 150 WHERE id = $1")
            .bind(&first)
            .execute(&db)
            .await
            .unwrap();
        sqlx::query("UPDATE jobs SET created_ms = 200, start_ms = NULL WHERE id = $1")
            .bind(&second)
            .execute(&db)
            .await
            .unwrap();
        let all = jobs::facts(&db, None).await.unwrap();
        let ids: Vec<&str> = all.iter().map(|j| j.id.as_str()).collect();
        assert_eq!(ids, [second.as_str(), first.as_str()], "{e}");
        assert_eq!(
            (all[1].start_ms, all[1].kind.as_str(), all[1].state.as_str()),
            (Some(150), "ExportJobs", "NotStarted"),
            "{e}"
        );
        let since: Vec<String> = jobs::facts(&db, Some(151))
            .await
            .unwrap()
            .into_iter()
            .map(|j| j.id)
            .collect();
        assert_eq!(
            since,
            std::slice::from_ref(&second),
            "{e}: a job not started counts from its creation"
        );
        assert_eq!(
            jobs::view(&db, &second)
                .await
                .unwrap()
                .unwrap()
                .output
                .as_deref(),
            Some(r#"{"rows":0}"#),
            "{e}"
        );
    }
}
