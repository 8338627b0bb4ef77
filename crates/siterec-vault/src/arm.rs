//! The Site Recovery Resource Manager API (a compatible subset).
//!
//! Paths hang off the vault's id and are matched case-insensitively (real
//! ids start with `/Subscriptions/`). Every request needs the admin bearer
//! token. Long-running operations answer 202 with absolute `Location`
//! (`{vault}/operationresults/{job}`) and `Azure-AsyncOperation`
//! (`{vault}/replicationOperationStatus/{job}`) URLs built from the scheme
//! and host the client used, and `Retry-After`.

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use sqlx::Row;

use crate::db::{now_ms, secret_hash};
use crate::error::{ApiError, ApiResult};
use crate::jobs::create_job;
use crate::model::{self, ItemRow};
use crate::{AppState, Shared};
use siterec_core::names::{check_name, last_segment, segment_after};
use siterec_core::policy::Policy;
use siterec_core::state::{ItemAction, JobKind, JobState, ProtectionState};
use siterec_core::wire::{KEY_FILE_FORMAT, KEY_VALIDITY_SECS, KeyFile};

pub fn router(st: Shared) -> Router {
    Router::new().fallback(dispatch).with_state(st)
}

async fn dispatch(
    State(st): State<Shared>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match handle(&st, &method, &uri, &headers, &body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

fn ok(v: Value) -> ApiResult<Response> {
    Ok((StatusCode::OK, axum::Json(v)).into_response())
}

fn body_json(body: &Bytes) -> ApiResult<Value> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))
}

async fn authorize(st: &AppState, headers: &HeaderMap) -> ApiResult<()> {
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let Some(token) = token else {
        return Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "AuthenticationFailed",
            "missing bearer token: send 'Authorization: Bearer <token>' with the token from the vault's admin.token file",
        ));
    };
    let found: Option<String> =
        sqlx::query_scalar("SELECT name FROM api_tokens WHERE token_hash = ?")
            .bind(secret_hash(token))
            .fetch_optional(&st.db)
            .await?;
    match found {
        Some(_) => Ok(()),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "InvalidAuthenticationToken",
            "the bearer token is not valid for this vault",
        )),
    }
}

/// Absolute base URL of the vault resource as the client addressed it.
fn base_url(st: &AppState, headers: &HeaderMap) -> String {
    let host = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1");
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|h| h.to_str().ok())
        .unwrap_or("http");
    format!("{scheme}://{host}{}", st.info.id())
}

fn accepted(st: &AppState, headers: &HeaderMap, job_id: &str) -> ApiResult<Response> {
    let base = base_url(st, headers);
    let location = format!("{base}/operationresults/{job_id}?api-version=2025-08-01");
    let status = format!("{base}/replicationOperationStatus/{job_id}?api-version=2025-08-01");
    let mut resp = (StatusCode::ACCEPTED, axum::Json(json!({"jobId": job_id}))).into_response();
    let h = resp.headers_mut();
    for (k, v) in [
        ("location", location),
        ("azure-asyncoperation", status),
        ("retry-after", "1".to_string()),
    ] {
        if let Ok(v) = HeaderValue::from_str(&v) {
            h.insert(k, v);
        }
    }
    if let Ok(v) = HeaderValue::from_str(job_id) {
        h.insert("x-siterec-job-id", v);
    }
    Ok(resp)
}

async fn handle(
    st: &Shared,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &Bytes,
) -> ApiResult<Response> {
    let segs: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    let prefix = ["subscriptions", "resourcegroups", "providers", "vaults"];
    if segs.len() < 8
        || !segs[0].eq_ignore_ascii_case(prefix[0])
        || !segs[2].eq_ignore_ascii_case(prefix[1])
        || !segs[4].eq_ignore_ascii_case(prefix[2])
        || !segs[5].eq_ignore_ascii_case("Microsoft.RecoveryServices")
        || !segs[6].eq_ignore_ascii_case(prefix[3])
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "PathNotFound",
            format!(
                "no API at {}: paths start with {}",
                uri.path(),
                st.info.id()
            ),
        ));
    }
    authorize(st, headers).await?;
    if !segs[1].eq_ignore_ascii_case(&st.info.subscription)
        || !segs[3].eq_ignore_ascii_case(&st.info.resource_group)
        || !segs[7].eq_ignore_ascii_case(&st.info.name)
    {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            format!(
                "this server serves vault {}, not {}",
                st.info.id(),
                uri.path()
            ),
        ));
    }
    let rest: Vec<String> = segs[8..].iter().map(|s| s.to_string()).collect();
    let lower: Vec<String> = rest.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();
    let r: Vec<&str> = rest.iter().map(String::as_str).collect();
    let db = &st.db;
    let v = &st.info;
    let m = method.clone();
    match (m, l.as_slice()) {
        (Method::GET, []) => ok(
            json!({"id": v.id(), "name": v.name, "type": "Microsoft.RecoveryServices/vaults", "location": v.location, "properties": {"provisioningState": "Succeeded"}}),
        ),
        // ----- fabrics -----
        (Method::GET, ["replicationfabrics"]) => {
            let names: Vec<String> = sqlx::query_scalar("SELECT name FROM fabrics ORDER BY name")
                .fetch_all(db)
                .await?;
            let mut out = Vec::new();
            for n in names {
                out.push(model::fabric_json(db, v, &n).await?);
            }
            ok(model::list(out))
        }
        (Method::GET, ["replicationfabrics", _]) => {
            let name = model::fabric_exists(db, r[1]).await?;
            ok(model::fabric_json(db, v, &name).await?)
        }
        (Method::PUT, ["replicationfabrics", _]) => {
            check_name("fabric", r[1])?;
            sqlx::query("INSERT INTO fabrics (name, created_ms) VALUES (?, ?) ON CONFLICT (name) DO NOTHING")
                .bind(r[1])
                .bind(now_ms())
                .execute(db)
                .await?;
            ok(model::fabric_json(db, v, r[1]).await?)
        }
        (Method::POST, ["replicationfabrics", _, "siterecverifystores"]) => {
            verify_stores(st, headers, r[1]).await
        }
        (
            Method::GET,
            [
                "replicationfabrics",
                _,
                "replicationrecoveryservicesproviders",
            ],
        ) => {
            let fabric = model::fabric_exists(db, r[1]).await?;
            let rows = sqlx::query("SELECT * FROM agents WHERE fabric = ? ORDER BY enrolled_ms")
                .bind(&fabric)
                .fetch_all(db)
                .await?;
            let now = now_ms();
            let mut out = Vec::new();
            for row in &rows {
                out.push(model::provider_json(row, v, now).await?);
            }
            ok(model::list(out))
        }
        (Method::GET, ["replicationfabrics", _, "replicationprotectioncontainers"]) => {
            let fabric = model::fabric_exists(db, r[1]).await?;
            let names: Vec<String> =
                sqlx::query_scalar("SELECT name FROM containers WHERE fabric = ? ORDER BY name")
                    .bind(&fabric)
                    .fetch_all(db)
                    .await?;
            let mut out = Vec::new();
            for n in names {
                out.push(model::container_json(db, v, &fabric, &n).await?);
            }
            ok(model::list(out))
        }
        (
            Method::GET,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
            ],
        ) => {
            let c = model::container_exists(db, r[1], r[3]).await?;
            ok(model::container_json(db, v, r[1], &c).await?)
        }
        // ----- protectable items -----
        (
            Method::GET,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotectableitems",
            ],
        ) => {
            let c = model::container_exists(db, r[1], r[3]).await?;
            let rows: Vec<(String, String)> = sqlx::query_as(
                "SELECT name, info FROM machines WHERE fabric = ? AND container = ? ORDER BY name",
            )
            .bind(r[1])
            .bind(&c)
            .fetch_all(db)
            .await?;
            let mut out = Vec::new();
            for (name, info) in rows {
                let protected = machine_protected(st, r[1], &name).await?;
                out.push(model::protectable_json(
                    v,
                    r[1],
                    &c,
                    &name,
                    &serde_json::from_str(&info).unwrap_or(Value::Null),
                    protected,
                ));
            }
            ok(model::list(out))
        }
        (
            Method::GET,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotectableitems",
                _,
            ],
        ) => {
            let c = model::container_exists(db, r[1], r[3]).await?;
            let (name, info): (String, String) = sqlx::query_as(
                "SELECT name, info FROM machines WHERE fabric = ? AND container = ? AND name = ?",
            )
            .bind(r[1])
            .bind(&c)
            .bind(r[5])
            .fetch_optional(db)
            .await?
            .ok_or_else(|| ApiError::not_found("protectable item", r[5]))?;
            let protected = machine_protected(st, r[1], &name).await?;
            ok(model::protectable_json(
                v,
                r[1],
                &c,
                &name,
                &serde_json::from_str(&info).unwrap_or(Value::Null),
                protected,
            ))
        }
        // ----- container mappings -----
        (Method::GET, ["replicationprotectioncontainermappings"]) => {
            let rows = sqlx::query("SELECT * FROM container_mappings ORDER BY created_ms")
                .fetch_all(db)
                .await?;
            ok(model::list(
                rows.iter()
                    .map(|row| model::mapping_json(v, row))
                    .collect::<ApiResult<Vec<_>>>()?,
            ))
        }
        (
            Method::GET,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotectioncontainermappings",
            ],
        ) => {
            let c = model::container_exists(db, r[1], r[3]).await?;
            let rows =
                sqlx::query("SELECT * FROM container_mappings WHERE fabric = ? AND container = ?")
                    .bind(r[1])
                    .bind(&c)
                    .fetch_all(db)
                    .await?;
            ok(model::list(
                rows.iter()
                    .map(|row| model::mapping_json(v, row))
                    .collect::<ApiResult<Vec<_>>>()?,
            ))
        }
        (
            Method::GET,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotectioncontainermappings",
                _,
            ],
        ) => {
            let c = model::container_exists(db, r[1], r[3]).await?;
            let row = sqlx::query(
                "SELECT * FROM container_mappings WHERE fabric = ? AND container = ? AND name = ?",
            )
            .bind(r[1])
            .bind(&c)
            .bind(r[5])
            .fetch_optional(db)
            .await?
            .ok_or_else(|| ApiError::not_found("protection container mapping", r[5]))?;
            ok(model::mapping_json(v, &row)?)
        }
        (
            Method::PUT,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotectioncontainermappings",
                _,
            ],
        ) => create_mapping(st, headers, r[1], r[3], r[5], &body_json(body)?).await,
        // ----- policies -----
        (Method::GET, ["replicationpolicies"]) => {
            let rows: Vec<(String, String)> =
                sqlx::query_as("SELECT name, body FROM policies ORDER BY name")
                    .fetch_all(db)
                    .await?;
            let mut out = Vec::new();
            for (name, body) in rows {
                let p: Policy = serde_json::from_str(&body)
                    .map_err(|e| ApiError::internal("stored policy", e))?;
                out.push(model::policy_json(v, &name, &p));
            }
            ok(model::list(out))
        }
        (Method::GET, ["replicationpolicies", _]) => {
            let (name, p) = model::load_policy(db, r[1]).await?;
            ok(model::policy_json(v, &name, &p))
        }
        (Method::PUT, ["replicationpolicies", _]) => {
            create_policy(st, headers, r[1], &body_json(body)?).await
        }
        (Method::DELETE, ["replicationpolicies", _]) => delete_policy(st, r[1]).await,
        // ----- protected items -----
        (Method::GET, ["replicationprotecteditems"]) => {
            let rows = sqlx::query("SELECT * FROM protected_items ORDER BY created_ms")
                .fetch_all(db)
                .await?;
            let mut out = Vec::new();
            for row in &rows {
                out.push(model::item_json(db, v, &ItemRow::from_row(row)?).await?);
            }
            ok(model::list(out))
        }
        (
            Method::GET,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotecteditems",
            ],
        ) => {
            let c = model::container_exists(db, r[1], r[3]).await?;
            let rows = sqlx::query("SELECT * FROM protected_items WHERE fabric = ? AND container = ? ORDER BY created_ms")
                .bind(r[1])
                .bind(&c)
                .fetch_all(db)
                .await?;
            let mut out = Vec::new();
            for row in &rows {
                out.push(model::item_json(db, v, &ItemRow::from_row(row)?).await?);
            }
            ok(model::list(out))
        }
        (
            Method::GET,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotecteditems",
                _,
            ],
        ) => {
            let item = model::load_item_at(db, r[1], r[3], r[5]).await?;
            ok(model::item_json(db, v, &item).await?)
        }
        (
            Method::PUT,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotecteditems",
                _,
            ],
        ) => enable_protection(st, headers, r[1], r[3], r[5], &body_json(body)?).await,
        (
            Method::GET,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotecteditems",
                _,
                "recoverypoints",
            ],
        ) => {
            let item = model::load_item_at(db, r[1], r[3], r[5]).await?;
            let rows = sqlx::query("SELECT * FROM recovery_points WHERE item = ? AND pruned_ms IS NULL ORDER BY created_ms DESC")
                .bind(&item.name)
                .fetch_all(db)
                .await?;
            ok(model::list(
                rows.iter()
                    .map(|row| model::point_json(v, &item, row))
                    .collect::<ApiResult<Vec<_>>>()?,
            ))
        }
        (
            Method::GET,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotecteditems",
                _,
                "recoverypoints",
                _,
            ],
        ) => {
            let item = model::load_item_at(db, r[1], r[3], r[5]).await?;
            let row = sqlx::query("SELECT * FROM recovery_points WHERE item = ? AND point_id = ? AND pruned_ms IS NULL")
                .bind(&item.name)
                .bind(r[7])
                .fetch_optional(db)
                .await?
                .ok_or_else(|| ApiError::not_found("recovery point", r[7]))?;
            ok(model::point_json(v, &item, &row)?)
        }
        (
            Method::POST,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotecteditems",
                _,
                "unplannedfailover",
            ],
        ) => unplanned_failover(st, headers, r[1], r[3], r[5], &body_json(body)?).await,
        (
            Method::POST,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotecteditems",
                _,
                "failovercommit",
            ],
        ) => commit_failover(st, headers, r[1], r[3], r[5]).await,
        // ----- jobs and operations -----
        (Method::GET, ["replicationjobs"]) => {
            let ids: Vec<String> =
                sqlx::query_scalar("SELECT id FROM jobs ORDER BY created_ms DESC, rowid DESC")
                    .fetch_all(db)
                    .await?;
            let mut out = Vec::new();
            for id in ids {
                out.push(model::job_json(db, v, &id).await?);
            }
            ok(model::list(out))
        }
        (Method::GET, ["replicationjobs", _]) => ok(model::job_json(db, v, r[1]).await?),
        (Method::GET, ["replicationoperationstatus", _]) => operation_status(st, r[1]).await,
        (Method::GET, ["operationresults", _]) => operation_result(st, headers, r[1]).await,
        // ----- registration keys (siterec's own; not part of ARM) -----
        (Method::POST, ["siterecregistrationkeys"]) => create_key(st, &body_json(body)?).await,
        (Method::GET, ["siterecregistrationkeys"]) => {
            let rows: Vec<(String, String, i64, i64, Option<i64>)> = sqlx::query_as(
                "SELECT key_id, fabric, created_ms, expires_ms, revoked_ms FROM registration_keys ORDER BY created_ms",
            )
            .fetch_all(db)
            .await?;
            let now = now_ms();
            ok(model::list(
                rows.into_iter()
                    .map(|(id, fabric, created, expires, revoked)| {
                        let state = if revoked.is_some() { "Revoked" } else if expires < now { "Expired" } else { "Valid" };
                        json!({"keyId": id, "fabric": fabric, "createdTime": crate::db::rfc3339(created), "expiryTime": crate::db::rfc3339(expires), "state": state})
                    })
                    .collect(),
            ))
        }
        (Method::DELETE, ["siterecregistrationkeys", _]) => {
            let n = sqlx::query("UPDATE registration_keys SET revoked_ms = COALESCE(revoked_ms, ?) WHERE key_id = ?")
                .bind(now_ms())
                .bind(r[1])
                .execute(db)
                .await?
                .rows_affected();
            if n == 0 {
                return Err(ApiError::not_found("registration key", r[1]));
            }
            ok(json!({"keyId": r[1], "state": "Revoked"}))
        }
        (m, _) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "PathNotFound",
            format!("no {m} operation at {}", uri.path()),
        )),
    }
}

async fn machine_protected(st: &AppState, fabric: &str, machine: &str) -> ApiResult<bool> {
    let n: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM protected_items WHERE fabric = ? AND machine = ?")
            .bind(fabric)
            .bind(machine)
            .fetch_one(&st.db)
            .await?;
    Ok(n > 0)
}

fn props(body: &Value) -> &Value {
    body.get("properties").unwrap_or(&Value::Null)
}

async fn create_policy(
    st: &Shared,
    headers: &HeaderMap,
    name: &str,
    body: &Value,
) -> ApiResult<Response> {
    check_name("policy", name)?;
    let input = props(body).get("providerSpecificInput").ok_or_else(|| {
        ApiError::bad_request("properties.providerSpecificInput is required (with instanceType and the policy settings)")
    })?;
    let policy = Policy::from_arm_input(input)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "InvalidPolicy", e.to_string()))?;
    let mut tx = crate::db::begin(&st.db).await?;
    let job = create_job(
        &mut tx,
        JobKind::CreatePolicy,
        "ProtectionProfile",
        name,
        &model::policy_id(&st.info, name),
        &json!({"name": name, "policy": policy}),
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

async fn delete_policy(st: &Shared, name: &str) -> ApiResult<Response> {
    let (name, _) = model::load_policy(&st.db, name).await?;
    let used: i64 = sqlx::query_scalar(
        "SELECT (SELECT COUNT(*) FROM container_mappings WHERE policy = ?) + (SELECT COUNT(*) FROM protected_items WHERE policy = ?)",
    )
    .bind(&name)
    .bind(&name)
    .fetch_one(&st.db)
    .await?;
    if used > 0 {
        return Err(ApiError::conflict(format!(
            "policy '{name}' is used by {used} cloud pairing(s) or protected item(s); remove those first"
        )));
    }
    sqlx::query("DELETE FROM policies WHERE name = ?")
        .bind(&name)
        .execute(&st.db)
        .await?;
    Ok(StatusCode::OK.into_response())
}

async fn create_mapping(
    st: &Shared,
    headers: &HeaderMap,
    fabric: &str,
    container: &str,
    name: &str,
    body: &Value,
) -> ApiResult<Response> {
    check_name("mapping", name)?;
    let container = model::container_exists(&st.db, fabric, container).await?;
    let p = props(body);
    let target_id = p
        .get("targetProtectionContainerId")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            ApiError::bad_request(
                "properties.targetProtectionContainerId is required: the id of the recovery cloud",
            )
        })?;
    let (tf, tc) = match (
        segment_after(target_id, "replicationFabrics"),
        segment_after(target_id, "replicationProtectionContainers"),
    ) {
        (Some(f), Some(c)) => (f, c),
        _ => {
            return Err(ApiError::bad_request(format!(
                "targetProtectionContainerId '{target_id}' is not a protection container id (…/replicationFabrics/F/replicationProtectionContainers/C)"
            )));
        }
    };
    let tc = model::container_exists(&st.db, tf, tc).await?;
    let policy_ref = p
        .get("policyId")
        .and_then(|v| v.as_str())
        .ok_or_else(|| ApiError::bad_request("properties.policyId is required"))?;
    let (policy, _) = model::load_policy(&st.db, last_segment(policy_ref)).await?;
    // A pairing is only useful if the recovery cloud can keep replicas:
    // refuse it now rather than fail enable protection later.
    let stores: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM agents WHERE fabric = ? AND cloud = ? AND data_url IS NOT NULL AND last_seen_ms > ?",
    )
    .bind(tf)
    .bind(&tc)
    .bind(now_ms() - model::AGENT_ONLINE_MS)
    .fetch_one(&st.db)
    .await?;
    if stores == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "NoReplicaStore",
            format!(
                "recovery cloud {tf}/{tc} has no connected agent with a replica store; start the recovery site's agent with a [target] section (its store must open) and pair again"
            ),
        ));
    }
    if tf.eq_ignore_ascii_case(fabric) && tc.eq_ignore_ascii_case(&container) {
        return Err(ApiError::bad_request(
            "a cloud cannot be paired with itself: choose a recovery cloud in another site",
        ));
    }
    let mut tx = crate::db::begin(&st.db).await?;
    let existing = sqlx::query(
        "SELECT * FROM container_mappings WHERE fabric = ? AND container = ? AND name = ?",
    )
    .bind(fabric)
    .bind(&container)
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(row) = existing {
        // Idempotent re-PUT of the same pairing.
        let same = row
            .try_get::<String, _>("target_fabric")?
            .eq_ignore_ascii_case(tf)
            && row
                .try_get::<String, _>("target_container")?
                .eq_ignore_ascii_case(&tc)
            && row
                .try_get::<String, _>("policy")?
                .eq_ignore_ascii_case(&policy);
        if !same {
            return Err(ApiError::conflict(format!(
                "mapping '{name}' exists with other settings; delete it first"
            )));
        }
    } else {
        for (f, c) in [(fabric, container.as_str()), (tf, tc.as_str())] {
            let n: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM container_mappings WHERE (fabric = ? AND container = ?) OR (target_fabric = ? AND target_container = ?)",
            )
            .bind(f)
            .bind(c)
            .bind(f)
            .bind(c)
            .fetch_one(&mut *tx)
            .await?;
            if n > 0 {
                return Err(ApiError::conflict(format!(
                    "cloud {f}/{c} is already paired: a cloud belongs to at most one pairing, as primary or recovery"
                )));
            }
        }
        sqlx::query(
            "INSERT INTO container_mappings (fabric, container, name, target_fabric, target_container, policy, state, created_ms) VALUES (?, ?, ?, ?, ?, ?, 'Pairing', ?)",
        )
        .bind(fabric)
        .bind(&container)
        .bind(name)
        .bind(tf)
        .bind(&tc)
        .bind(&policy)
        .bind(now_ms())
        .execute(&mut *tx)
        .await?;
    }
    let id = format!(
        "{}/replicationProtectionContainerMappings/{name}",
        model::container_id(&st.info, fabric, &container)
    );
    let job = create_job(
        &mut tx,
        JobKind::ConfigureProtection,
        "ProtectionContainerMapping",
        name,
        &id,
        &json!({"fabric": fabric, "container": container, "name": name, "policy": policy}),
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

async fn enable_protection(
    st: &Shared,
    headers: &HeaderMap,
    fabric: &str,
    container: &str,
    name: &str,
    body: &Value,
) -> ApiResult<Response> {
    check_name("protected item", name)?;
    let container = model::container_exists(&st.db, fabric, container).await?;
    let p = props(body);
    let machine_ref = p.get("protectableItemId").and_then(|v| v.as_str()).ok_or_else(|| {
        ApiError::bad_request("properties.protectableItemId is required: the id of the machine to protect (see replicationProtectableItems)")
    })?;
    let machine_name = last_segment(machine_ref);
    let mapping: Option<(String, String, String)> = sqlx::query_as(
        "SELECT target_fabric, target_container, policy FROM container_mappings WHERE fabric = ? AND container = ? AND state = 'Paired'",
    )
    .bind(fabric)
    .bind(&container)
    .fetch_optional(&st.db)
    .await?;
    let Some((tf, tc, mapped_policy)) = mapping else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "CloudNotPaired",
            format!(
                "cloud {fabric}/{container} is not paired with a recovery cloud: create a protection container mapping first"
            ),
        ));
    };
    let policy = match p.get("policyId").and_then(|v| v.as_str()) {
        Some(pid) => model::load_policy(&st.db, last_segment(pid)).await?.0,
        None => mapped_policy,
    };
    if model::load_policy(&st.db, &policy).await?.1.encryption {
        let encrypted: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM agents WHERE fabric = ? AND cloud = ? AND data_url IS NOT NULL AND store_encrypted = 1",
        )
        .bind(&tf)
        .bind(&tc)
        .fetch_one(&st.db)
        .await?;
        if encrypted == 0 {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "StoreNotEncrypted",
                format!(
                    "policy '{policy}' encrypts data stored, but no agent of recovery cloud {tf}/{tc} keeps an encrypted replica store; set encryption = true and recovery_key_export = PATH in its [target] section"
                ),
            ));
        }
    }
    let row: Option<(String, String)> = sqlx::query_as(
        "SELECT name, info FROM machines WHERE fabric = ? AND container = ? AND name = ?",
    )
    .bind(fabric)
    .bind(&container)
    .bind(machine_name)
    .fetch_optional(&st.db)
    .await?;
    let Some((machine, info)) = row else {
        return Err(ApiError::not_found(
            "protectable item",
            &format!("{fabric}/{container}/{machine_name}"),
        ));
    };
    let info: Value = serde_json::from_str(&info).unwrap_or(Value::Null);
    if let Some(err) = info.get("error").and_then(|e| e.as_str()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "MachineNotReady",
            format!("machine '{machine}' cannot be protected: {err}"),
        ));
    }
    let mut tx = crate::db::begin(&st.db).await?;
    let existing = sqlx::query("SELECT * FROM protected_items WHERE name = ?")
        .bind(name)
        .fetch_optional(&mut *tx)
        .await?;
    if let Some(row) = existing {
        let item = ItemRow::from_row(&row)?;
        if item.machine.eq_ignore_ascii_case(&machine) && item.fabric.eq_ignore_ascii_case(fabric) {
            // A retried PUT: point at the job that is (or was) doing it.
            if let Some(job) = latest_job(&mut tx, JobKind::EnableProtection, &item.name).await? {
                return accepted(st, headers, &job);
            }
        }
        return Err(ApiError::conflict(format!(
            "a protected item named '{name}' already exists; choose another name"
        )));
    }
    let other: Option<String> =
        sqlx::query_scalar("SELECT name FROM protected_items WHERE fabric = ? AND machine = ?")
            .bind(fabric)
            .bind(&machine)
            .fetch_optional(&mut *tx)
            .await?;
    if let Some(other) = other {
        return Err(ApiError::conflict(format!(
            "machine '{machine}' is already protected as item '{other}'"
        )));
    }
    let now = now_ms();
    sqlx::query(
        "INSERT INTO protected_items (name, fabric, container, machine, policy, target_fabric, target_container, state, created_ms, updated_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(name)
    .bind(fabric)
    .bind(&container)
    .bind(&machine)
    .bind(&policy)
    .bind(&tf)
    .bind(&tc)
    .bind(ProtectionState::EnablingProtection.as_str())
    .bind(now)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let job = create_job(
        &mut tx,
        JobKind::EnableProtection,
        "ProtectionEntity",
        name,
        &model::item_id(&st.info, fabric, &container, name),
        &json!({"item": name}),
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

async fn latest_job(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    kind: JobKind,
    target: &str,
) -> ApiResult<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM jobs WHERE kind = ? AND target_name = ? ORDER BY created_ms DESC LIMIT 1",
    )
    .bind(kind.as_str())
    .bind(target)
    .fetch_optional(&mut **tx)
    .await?)
}

async fn running_job(
    tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
    kind: JobKind,
    target: &str,
) -> ApiResult<Option<String>> {
    Ok(sqlx::query_scalar(
        "SELECT id FROM jobs WHERE kind = ? AND target_name = ? AND state IN ('NotStarted', 'InProgress') ORDER BY created_ms DESC LIMIT 1",
    )
    .bind(kind.as_str())
    .bind(target)
    .fetch_optional(&mut **tx)
    .await?)
}

fn transition_error(e: siterec_core::state::TransitionError) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "InvalidProtectionState",
        e.to_string(),
    )
}

async fn unplanned_failover(
    st: &Shared,
    headers: &HeaderMap,
    fabric: &str,
    container: &str,
    name: &str,
    body: &Value,
) -> ApiResult<Response> {
    let item = model::load_item_at(&st.db, fabric, container, name).await?;
    let p = props(body);
    if let Some(dir) = p.get("failoverDirection").and_then(|v| v.as_str())
        && !dir.eq_ignore_ascii_case("PrimaryToRecovery")
    {
        return Err(ApiError::bad_request(format!(
            "failoverDirection '{dir}' is not supported yet: only PrimaryToRecovery"
        )));
    }
    // Before anything is written: a refused key creates no job.
    let sealed_key = seal_recovery_key(st, &item, p).await?;
    let wanted = p
        .get("providerSpecificDetails")
        .and_then(|d| d.get("recoveryPointId"))
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .map(|s| last_segment(s).to_string());
    let mut tx = crate::db::begin(&st.db).await?;
    if item.state == ProtectionState::UnplannedFailoverInProgress
        && let Some(job) = running_job(&mut tx, JobKind::UnplannedFailover, &item.name).await?
    {
        return accepted(st, headers, &job);
    }
    let next = item
        .state
        .apply(ItemAction::StartUnplannedFailover)
        .map_err(transition_error)?;
    let point: Option<String> = match &wanted {
        Some(id) => sqlx::query_scalar("SELECT point_id FROM recovery_points WHERE item = ? AND point_id = ? AND pruned_ms IS NULL")
            .bind(&item.name)
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| ApiError::not_found("recovery point", &format!("{}/{id}", item.name)))
            .map(Some)?,
        None => sqlx::query_scalar("SELECT point_id FROM recovery_points WHERE item = ? AND pruned_ms IS NULL ORDER BY created_ms DESC LIMIT 1")
            .bind(&item.name)
            .fetch_optional(&mut *tx)
            .await?,
    };
    let Some(point) = point else {
        return Err(ApiError::conflict(format!(
            "item '{}' has no recovery point yet; wait for initial replication",
            item.name
        )));
    };
    sqlx::query(
        "UPDATE protected_items SET state = ?, last_error = NULL, updated_ms = ? WHERE name = ?",
    )
    .bind(next.as_str())
    .bind(now_ms())
    .bind(&item.name)
    .execute(&mut *tx)
    .await?;
    let mut input = json!({"item": item.name, "pointId": point});
    if let Some(sealed) = sealed_key {
        // Sealed to the recovery agent's transport key; forgotten once the
        // materialize task is over (see jobs::forget_sealed_key).
        input["sealedKey"] = sealed.into();
    }
    let job = create_job(
        &mut tx,
        JobKind::UnplannedFailover,
        "ProtectionEntity",
        &item.name,
        &model::item_id(&st.info, &item.fabric, &item.container, &item.name),
        &input,
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

/// For an item kept in an encrypted replica store: the operator's recovery
/// key (`providerSpecificDetails.primaryKekCertificatePfx`, base64 of the
/// recovery key file, as ASR takes a key certificate at failover), checked
/// against the store's key id and sealed at once to the recovery agent's
/// transport key. Only the sealed form (`SRKT0001`, base64) is returned:
/// the vault never writes the key in the clear. `None` for a plain store.
async fn seal_recovery_key(st: &AppState, item: &ItemRow, p: &Value) -> ApiResult<Option<String>> {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;
    let Some(agent) = &item.target_agent_id else {
        return Ok(None);
    };
    let row: Option<(bool, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT store_encrypted, store_key_id, transport_key FROM agents WHERE id = ?",
    )
    .bind(agent)
    .fetch_optional(&st.db)
    .await?;
    let Some((true, store_key_id, transport)) = row else {
        return Ok(None);
    };
    let given = p
        .get("providerSpecificDetails")
        .and_then(|d| d.get("primaryKekCertificatePfx"))
        .and_then(|v| v.as_str())
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let key_id = store_key_id.as_deref().unwrap_or("unknown");
    let Some(given) = given else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "EncryptionKeyRequired",
            format!(
                "item '{}' is replicated to an encrypted replica store (recovery key id {key_id}): failover needs the recovery key file exported when that store was created. Give it as properties.providerSpecificDetails.primaryKekCertificatePfx (base64 of the file), e.g. siterec failover unplanned {} --encryption-key FILE",
                item.name, item.name
            ),
        ));
    };
    let invalid = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "InvalidEncryptionKey", m);
    let mut bytes = BASE64.decode(given).map_err(|_| {
        invalid(
            "primaryKekCertificatePfx is not base64: give the recovery key file encoded in base64"
                .into(),
        )
    })?;
    let key = siterec_store::RecoveryKey::from_file_bytes(&bytes);
    let checked = match &key {
        Err(e) => Err(invalid(format!(
            "the encryption key given is not a siterec recovery key file: {e}"
        ))),
        Ok(k) if store_key_id.as_deref() != Some(k.key_id().as_str()) => Err(invalid(format!(
            "the recovery key given has key id {}, but item '{}' is stored with key id {key_id}: give the recovery key file exported when that store was created",
            k.key_id(),
            item.name
        ))),
        Ok(_) => match &transport {
            None => Err(ApiError::conflict(format!(
                "recovery agent {agent} has not reported a transport key to seal the recovery key to (it runs an older siterec, or has not been heard from): upgrade or start it, then retry"
            ))),
            Some(t) => siterec_store::seal_for_transport(t, &bytes).map_err(|e| {
                ApiError::conflict(format!(
                    "the transport key recovery agent {agent} reported cannot be used ({e}): restart the agent, then retry"
                ))
            }),
        },
    };
    drop(key);
    bytes.fill(0);
    Ok(Some(BASE64.encode(checked?)))
}

async fn commit_failover(
    st: &Shared,
    headers: &HeaderMap,
    fabric: &str,
    container: &str,
    name: &str,
) -> ApiResult<Response> {
    let item = model::load_item_at(&st.db, fabric, container, name).await?;
    let mut tx = crate::db::begin(&st.db).await?;
    if item.state == ProtectionState::FailoverCommitInProgress
        && let Some(job) = running_job(&mut tx, JobKind::CommitFailover, &item.name).await?
    {
        return accepted(st, headers, &job);
    }
    let next = item
        .state
        .apply(ItemAction::StartCommit)
        .map_err(transition_error)?;
    sqlx::query("UPDATE protected_items SET state = ?, updated_ms = ? WHERE name = ?")
        .bind(next.as_str())
        .bind(now_ms())
        .bind(&item.name)
        .execute(&mut *tx)
        .await?;
    let job = create_job(
        &mut tx,
        JobKind::CommitFailover,
        "ProtectionEntity",
        &item.name,
        &model::item_id(&st.info, &item.fabric, &item.container, &item.name),
        &json!({"item": item.name}),
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

/// siterec's own action: verify every replica store of a site's agents.
async fn verify_stores(st: &Shared, headers: &HeaderMap, fabric: &str) -> ApiResult<Response> {
    let fabric = model::fabric_exists(&st.db, fabric).await?;
    let agents: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM agents WHERE fabric = ? AND data_url IS NOT NULL ORDER BY id",
    )
    .bind(&fabric)
    .fetch_all(&st.db)
    .await?;
    if agents.is_empty() {
        return Err(ApiError::bad_request(format!(
            "fabric '{fabric}' has no agent with a replica store: nothing to verify"
        )));
    }
    let mut tx = crate::db::begin(&st.db).await?;
    let job = create_job(
        &mut tx,
        JobKind::VerifyStore,
        "Fabric",
        &fabric,
        &model::fabric_id(&st.info, &fabric),
        &json!({"fabric": fabric, "agents": agents}),
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

async fn operation_status(st: &Shared, job_id: &str) -> ApiResult<Response> {
    let row = sqlx::query(
        "SELECT state, start_ms, end_ms, error_code, error_message FROM jobs WHERE id = ?",
    )
    .bind(job_id)
    .fetch_optional(&st.db)
    .await?
    .ok_or_else(|| ApiError::not_found("operation", job_id))?;
    let state: String = row.try_get("state")?;
    let start: Option<i64> = row.try_get("start_ms")?;
    let end: Option<i64> = row.try_get("end_ms")?;
    let code: Option<String> = row.try_get("error_code")?;
    let message: Option<String> = row.try_get("error_message")?;
    let status = JobState::parse(&state)
        .map(|s| s.operation_status())
        .unwrap_or("Failed");
    let mut v = json!({
        "id": format!("{}/replicationOperationStatus/{job_id}", st.info.id()),
        "name": job_id,
        "status": status,
        "startTime": crate::db::opt_rfc3339(start),
        "endTime": crate::db::opt_rfc3339(end),
    });
    if let (Some(code), Some(message)) = (code, message) {
        v["error"] = json!({"code": code, "message": message});
    }
    ok(v)
}

/// The Location of a long-running operation: 202 while it runs; when it has
/// succeeded, the resource it acted on (a failover returns the protected
/// item); when it failed, the job's error.
async fn operation_result(st: &Shared, headers: &HeaderMap, job_id: &str) -> ApiResult<Response> {
    let row =
        sqlx::query("SELECT state, kind, input, error_code, error_message FROM jobs WHERE id = ?")
            .bind(job_id)
            .fetch_optional(&st.db)
            .await?
            .ok_or_else(|| ApiError::not_found("operation", job_id))?;
    let state: String = row.try_get("state")?;
    let kind: String = row.try_get("kind")?;
    let input: String = row.try_get("input")?;
    let code: Option<String> = row.try_get("error_code")?;
    let message: Option<String> = row.try_get("error_message")?;
    let state = JobState::parse(&state).unwrap_or(JobState::Failed);
    if !state.is_terminal() {
        return accepted(st, headers, job_id);
    }
    if state != JobState::Succeeded {
        let msg = message.unwrap_or_else(|| format!("job {job_id} ended {}", state.as_str()));
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            code: "OperationFailed",
            message: format!("{msg} ({})", code.unwrap_or_default()),
        });
    }
    let input: Value = serde_json::from_str(&input).unwrap_or(Value::Null);
    let kind = JobKind::parse(&kind);
    match kind {
        Some(JobKind::CreatePolicy) => {
            let (name, p) =
                model::load_policy(&st.db, input["name"].as_str().unwrap_or_default()).await?;
            ok(model::policy_json(&st.info, &name, &p))
        }
        Some(JobKind::VerifyStore) => ok(model::job_json(&st.db, &st.info, job_id).await?),
        Some(JobKind::ConfigureProtection) => {
            let row = sqlx::query(
                "SELECT * FROM container_mappings WHERE fabric = ? AND container = ? AND name = ?",
            )
            .bind(input["fabric"].as_str().unwrap_or_default())
            .bind(input["container"].as_str().unwrap_or_default())
            .bind(input["name"].as_str().unwrap_or_default())
            .fetch_optional(&st.db)
            .await?
            .ok_or_else(|| {
                ApiError::not_found(
                    "protection container mapping",
                    input["name"].as_str().unwrap_or_default(),
                )
            })?;
            ok(model::mapping_json(&st.info, &row)?)
        }
        _ => {
            let item = model::load_item(&st.db, input["item"].as_str().unwrap_or_default()).await?;
            ok(model::item_json(&st.db, &st.info, &item).await?)
        }
    }
}

async fn create_key(st: &Shared, body: &Value) -> ApiResult<Response> {
    let fabric = body.get("fabric").and_then(|v| v.as_str()).ok_or_else(|| {
        ApiError::bad_request("'fabric' is required: the site the key enrols agents into")
    })?;
    check_name("fabric", fabric)?;
    let key_id = uuid::Uuid::new_v4().to_string();
    let secret = crate::db::random_secret(32);
    let now = now_ms();
    let valid_secs = match body.get("validSeconds") {
        None | Some(Value::Null) => KEY_VALIDITY_SECS,
        Some(v) => match v.as_i64() {
            Some(n) if (1..=KEY_VALIDITY_SECS).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "validSeconds must be an integer from 1 to {KEY_VALIDITY_SECS} (5 days), got {v}"
                )));
            }
        },
    };
    let expires_ms = now + valid_secs * 1000;
    let mut tx = crate::db::begin(&st.db).await?;
    sqlx::query(
        "INSERT INTO fabrics (name, created_ms) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
    )
    .bind(fabric)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    let fabric: String = sqlx::query_scalar("SELECT name FROM fabrics WHERE name = ?")
        .bind(fabric)
        .fetch_one(&mut *tx)
        .await?;
    sqlx::query("INSERT INTO registration_keys (key_id, fabric, secret_hash, created_ms, expires_ms) VALUES (?, ?, ?, ?, ?)")
        .bind(&key_id)
        .bind(&fabric)
        .bind(secret_hash(&secret))
        .bind(now)
        .bind(expires_ms)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let key = KeyFile {
        format: KEY_FILE_FORMAT.into(),
        vault_id: st.info.id(),
        agent_url: st.agent_url.clone(),
        ca_pem: st.vault_ca.cert_pem().to_string(),
        fabric,
        key_id,
        secret,
        expires_at: expires_ms / 1000,
    };
    ok(serde_json::to_value(key).map_err(|e| ApiError::internal("key file", e))?)
}
