//! The Site Recovery Resource Manager API (a compatible subset).
//!
//! Paths hang off the vault's id and are matched case-insensitively (real
//! ids start with `/Subscriptions/`). Every request needs the admin bearer
//! token. Long-running operations answer 202 with absolute `Location`
//! (`{vault}/operationresults/{job}`) and `Azure-AsyncOperation`
//! (`{vault}/replicationOperationStatus/{job}`) URLs built from the scheme
//! and host the client used, and `Retry-After`.

use axum::Router;

mod plans;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
pub use plans::start_plan_item;
use serde_json::Value;

use crate::db::{now_ms, secret_hash};
use crate::error::{ApiError, ApiResult};
use crate::jobs::create_job;
use crate::model::{self, ItemRow};
use crate::persist::events as events_db;
use crate::persist::jobs::{self as jobs_db, JobOf, Tx};
use crate::persist::{config, inventory, items};
use crate::{AppState, Shared};
use siterec_api as api;
use siterec_core::jobquery::{self, JobFacts, JobQuery};
use siterec_core::names::{API_VERSION, API_VERSIONS, ResourceKind, check_name, parse_id};
use siterec_core::orchestration::ExportInput;
use siterec_core::orchestration::{
    ChangePointInput, CleanupInput, DisableInput, FailoverInput, ItemInput, JobInput,
    NetworkMappingInput, NetworkRef, PairingInput, PlannedFailoverInput, PolicyInput,
    ReprotectInput, TestFailoverInput, VerifyInput,
};
use siterec_core::policy::Policy;
use siterec_core::state::{
    ItemAction, JobKind, JobState, Location, ProtectionState, TestAction, TestFailoverState,
    test_blocks,
};
use siterec_core::wire::{KEY_FILE_FORMAT, KEY_VALIDITY_SECS, KeyFile, MachineInfo};

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

/// Parses an ARM id given in a request body's `field`: a whole id of
/// `kind` in this vault (else 400 naming what is wrong), as its names.
fn parse_ref(
    st: &AppState,
    field: &'static str,
    id: &str,
    kind: ResourceKind,
) -> ApiResult<Vec<String>> {
    parse_id(field, &st.info.id(), id, kind)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "InvalidResourceId", e.to_string()))
}

/// A network id that may also be a bare network name (then of `fabric`
/// when one is implied): `(fabric, network)`.
fn parse_network_ref(
    st: &AppState,
    field: &'static str,
    id: &str,
) -> ApiResult<(Option<String>, String)> {
    if !id.contains('/') {
        check_name("network", id)?;
        return Ok((None, id.to_string()));
    }
    let mut names = parse_ref(st, field, id, ResourceKind::Network)?;
    let network = names.pop().unwrap_or_default();
    Ok((names.pop(), network))
}

/// ARM requires `?api-version=` on every request; answer 400 naming the
/// versions served when it is missing or not one of them.
fn check_api_version(uri: &Uri) -> ApiResult<()> {
    let supported = API_VERSIONS.join(", ");
    let given = query_values(uri, "api-version");
    match given.as_slice() {
        [] => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "MissingApiVersionParameter",
            format!(
                "the api-version query parameter is required: use ?api-version= one of {supported}"
            ),
        )),
        [v] if API_VERSIONS.contains(&v.as_str()) => Ok(()),
        [v] => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidApiVersionParameter",
            format!("api-version '{v}' is not supported: use one of {supported}"),
        )),
        _ => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidApiVersionParameter",
            format!(
                "api-version is given {} times: give it once, one of {supported}",
                given.len()
            ),
        )),
    }
}

/// Items per page of a list of protected items; the answer's `nextLink`
/// (with `skipToken`) fetches the next page.
pub const ITEM_PAGE: i64 = 100;

/// Every value of the query parameter `name` (case-insensitive), in order.
fn query_values(uri: &Uri, name: &str) -> Vec<String> {
    uri.query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .filter(|(k, _)| {
            k.eq_ignore_ascii_case(name) || percent_decode_lossy(k).eq_ignore_ascii_case(name)
        })
        .map(|(_, v)| v.to_string())
        .collect()
}

/// The query parameter `name` (case-insensitive), if given.
fn query_param(uri: &Uri, name: &str) -> Option<String> {
    query_values(uri, name).into_iter().next()
}

/// One page of protected items (of one cloud, or all), in creation order.
async fn item_page(
    st: &Shared,
    uri: &Uri,
    headers: &HeaderMap,
    cloud: Option<(&str, &str)>,
    rel: &str,
) -> ApiResult<Response> {
    let after = match query_param(uri, "skipToken").or_else(|| query_param(uri, "$skipToken")) {
        None => None,
        Some(t) => Some(model::ItemCursor::parse(&t).ok_or_else(|| {
            ApiError::bad_request(format!(
                "skipToken '{t}' is not one this vault wrote: follow the nextLink of the previous page, or leave skipToken out for the first page"
            ))
        })?),
    };
    let (items, next) = model::item_page(&st.db, cloud, after.as_ref(), ITEM_PAGE).await?;
    let out = model::items_json(&st.db, &st.info, &items).await?;
    let next = next.map(|c| {
        format!(
            "{}/{rel}?api-version={API_VERSION}&skipToken={}",
            base_url(st, headers),
            c.token()
        )
    });
    ok(model::page(out, next))
}

fn ok<T: serde::Serialize>(v: T) -> ApiResult<Response> {
    Ok((StatusCode::OK, axum::Json(v)).into_response())
}

/// A machine's report as the vault stored it.
fn stored_machine(name: &str, info: &str) -> ApiResult<MachineInfo> {
    serde_json::from_str(info)
        .map_err(|e| ApiError::internal(&format!("stored report of machine '{name}'"), e))
}

fn body_json(body: &Bytes) -> ApiResult<Value> {
    if body.is_empty() {
        return Ok(Value::Object(Default::default()));
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
    let found = inventory::token_name(&st.db, &secret_hash(token)).await?;
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
    let location = format!("{base}/operationresults/{job_id}?api-version={API_VERSION}");
    let status = format!("{base}/replicationOperationStatus/{job_id}?api-version={API_VERSION}");
    let mut resp = (
        StatusCode::ACCEPTED,
        axum::Json(api::Accepted {
            job_id: job_id.to_string(),
        }),
    )
        .into_response();
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
    check_api_version(uri)?;
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
    if let Some(answer) = plans::route(st, method, headers, &l, &r, body).await {
        return answer;
    }
    let db = &st.db;
    let v = &st.info;
    let m = method.clone();
    match (m, l.as_slice()) {
        (Method::GET, []) => ok(api::Vault {
            id: v.id(),
            name: v.name.clone(),
            kind: api::types::VAULT.into(),
            location: v.location.clone(),
            properties: api::VaultProperties {
                provisioning_state: "Succeeded".into(),
            },
        }),
        // ----- fabrics -----
        (Method::GET, ["replicationfabrics"]) => {
            let mut out = Vec::new();
            for n in inventory::fabric_names(db).await? {
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
            inventory::ensure_fabric(db, r[1], now_ms()).await?;
            ok(model::fabric_json(db, v, r[1]).await?)
        }
        (Method::POST, ["replicationfabrics", _, "siterecverifystores"]) => {
            verify_stores(st, headers, r[1]).await
        }
        (Method::DELETE, ["replicationfabrics", _])
        | (Method::POST, ["replicationfabrics", _, "remove"]) => delete_fabric(st, r[1]).await,
        // Unregistering an agent: DELETE, or POST .../remove (ASR's
        // "remove" of a provider is its unregistration).
        (
            Method::DELETE,
            [
                "replicationfabrics",
                _,
                "replicationrecoveryservicesproviders",
                _,
            ],
        )
        | (
            Method::POST,
            [
                "replicationfabrics",
                _,
                "replicationrecoveryservicesproviders",
                _,
                "remove",
            ],
        ) => unregister_agent(st, r[1], r[3]).await,
        (
            Method::GET,
            [
                "replicationfabrics",
                _,
                "replicationrecoveryservicesproviders",
            ],
        ) => {
            let fabric = model::fabric_exists(db, r[1]).await?;
            let now = now_ms();
            let mut out = Vec::new();
            for row in &inventory::agents_of_fabric(db, &fabric).await? {
                out.push(model::provider_json(row, v, now)?);
            }
            ok(model::list(out))
        }
        (Method::GET, ["replicationfabrics", _, "replicationprotectioncontainers"]) => {
            let fabric = model::fabric_exists(db, r[1]).await?;
            let mut out = Vec::new();
            for n in inventory::container_names(db, &fabric).await? {
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
            let mut out = Vec::new();
            for inventory::MachineRow { name, info, .. } in
                inventory::machines_of_cloud(db, r[1], &c).await?
            {
                let protected = machine_protected(st, r[1], &name).await?;
                out.push(model::protectable_json(
                    v,
                    r[1],
                    &c,
                    &name,
                    &stored_machine(&name, &info)?,
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
            let inventory::MachineRow { name, info, .. } =
                inventory::machine_of_cloud(db, r[1], &c, r[5])
                    .await?
                    .ok_or_else(|| ApiError::not_found("protectable item", r[5]))?;
            let protected = machine_protected(st, r[1], &name).await?;
            ok(model::protectable_json(
                v,
                r[1],
                &c,
                &name,
                &stored_machine(&name, &info)?,
                protected,
            ))
        }
        // ----- container mappings -----
        (Method::GET, ["replicationprotectioncontainermappings"]) => {
            let rows = config::pairings(db, None).await?;
            ok(model::list(
                rows.iter().map(|row| model::mapping_json(v, row)).collect(),
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
            let rows = config::pairings(db, Some((r[1], &c))).await?;
            ok(model::list(
                rows.iter().map(|row| model::mapping_json(v, row)).collect(),
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
            let row = config::pairing(db, r[1], &c, r[5])
                .await?
                .ok_or_else(|| ApiError::not_found("protection container mapping", r[5]))?;
            ok(model::mapping_json(v, &row))
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
        // Deleting a pairing: DELETE, or the SDK's `delete` action (POST
        // .../remove, with RemoveProtectionContainerMappingInput), alike.
        (
            Method::DELETE,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotectioncontainermappings",
                _,
            ],
        )
        | (
            Method::POST,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotectioncontainermappings",
                _,
                "remove",
            ],
        ) => delete_pairing(st, headers, r[1], r[3], r[5]).await,
        // ----- networks and network mappings -----
        (Method::GET, ["replicationnetworks"]) => {
            let mut out = Vec::new();
            for f in inventory::fabric_names(db).await? {
                out.extend(networks_of(st, &f).await?);
            }
            ok(model::list(out))
        }
        (Method::GET, ["replicationfabrics", _, "replicationnetworks"]) => {
            let fabric = model::fabric_exists(db, r[1]).await?;
            ok(model::list(networks_of(st, &fabric).await?))
        }
        (Method::GET, ["replicationfabrics", _, "replicationnetworks", _]) => {
            let fabric = model::fabric_exists(db, r[1]).await?;
            let network = model::network_exists(db, &fabric, r[3]).await?;
            let agents = model::network_agents(db, &fabric, &network).await?;
            ok(model::network_json(v, &fabric, &network, &agents))
        }
        (Method::GET, ["replicationnetworkmappings"]) => {
            let rows = config::network_mappings(db, None).await?;
            ok(model::list(
                rows.iter()
                    .map(|row| model::network_mapping_json(v, row))
                    .collect(),
            ))
        }
        (
            Method::GET,
            [
                "replicationfabrics",
                _,
                "replicationnetworks",
                _,
                "replicationnetworkmappings",
            ],
        ) => {
            let fabric = model::fabric_exists(db, r[1]).await?;
            let rows = config::network_mappings(db, Some((&fabric, r[3]))).await?;
            if rows.is_empty() {
                // 404 for a network that does not exist, else an empty list.
                model::network_exists(db, &fabric, r[3]).await?;
            }
            ok(model::list(
                rows.iter()
                    .map(|row| model::network_mapping_json(v, row))
                    .collect(),
            ))
        }
        (
            Method::GET,
            [
                "replicationfabrics",
                _,
                "replicationnetworks",
                _,
                "replicationnetworkmappings",
                _,
            ],
        ) => {
            let fabric = model::fabric_exists(db, r[1]).await?;
            let row = config::network_mapping(db, &fabric, r[3], r[5])
                .await?
                .ok_or_else(|| {
                    ApiError::not_found("network mapping", &format!("{fabric}/{}/{}", r[3], r[5]))
                })?;
            ok(model::network_mapping_json(v, &row))
        }
        (
            Method::PUT,
            [
                "replicationfabrics",
                _,
                "replicationnetworks",
                _,
                "replicationnetworkmappings",
                _,
            ],
        ) => create_network_mapping(st, headers, r[1], r[3], r[5], &body_json(body)?).await,
        (
            Method::DELETE,
            [
                "replicationfabrics",
                _,
                "replicationnetworks",
                _,
                "replicationnetworkmappings",
                _,
            ],
        ) => delete_network_mapping(st, headers, r[1], r[3], r[5]).await,
        // ----- policies -----
        (Method::GET, ["replicationpolicies"]) => {
            let rows = config::policies(db).await?;
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
        // ----- events and alert settings -----
        (Method::GET, ["replicationevents"]) => list_events(st, uri).await,
        (Method::GET, ["replicationevents", _]) => {
            let row = events_db::get(db, r[1])
                .await?
                .ok_or_else(|| ApiError::not_found("event", r[1]))?;
            ok(model::event_json(v, &row)?)
        }
        (Method::GET, ["replicationalertsettings"]) => ok(model::list(vec![model::alert_json(
            v,
            &alert_setting(st).await?,
        )])),
        (Method::GET, ["replicationalertsettings", _]) => {
            check_alert_setting_name(r[1])?;
            ok(model::alert_json(v, &alert_setting(st).await?))
        }
        (Method::PUT, ["replicationalertsettings", _]) => {
            configure_alerts(st, r[1], &body_json(body)?).await
        }
        // ----- protected items -----
        (Method::GET, ["replicationprotecteditems"]) => {
            item_page(st, uri, headers, None, "replicationProtectedItems").await
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
            let f = model::fabric_exists(db, r[1]).await?;
            let c = model::container_exists(db, &f, r[3]).await?;
            let rel = format!(
                "replicationFabrics/{f}/replicationProtectionContainers/{c}/replicationProtectedItems"
            );
            item_page(st, uri, headers, Some((&f, &c)), &rel).await
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
            let rows = items::points(db, &item.name).await?;
            ok(model::list(
                rows.iter()
                    .map(|row| model::point_json(v, &item, row))
                    .collect(),
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
            let row = items::point(db, &item.name, r[7])
                .await?
                .ok_or_else(|| ApiError::not_found("recovery point", r[7]))?;
            ok(model::point_json(v, &item, &row))
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
        (
            Method::POST,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotecteditems",
                _,
                "plannedfailover",
            ],
        ) => planned_failover(st, headers, r[1], r[3], r[5], &body_json(body)?).await,
        (
            Method::POST,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotecteditems",
                _,
                "applyrecoverypoint",
            ],
        ) => change_recovery_point(st, headers, r[1], r[3], r[5], &body_json(body)?).await,
        (
            Method::POST,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotecteditems",
                _,
                "reprotect",
            ],
        ) => reprotect(st, headers, r[1], r[3], r[5], &body_json(body)?).await,
        // Disable protection: the SDK's `remove` action (DisableProtectionInput)
        // and DELETE of the item do the same here.
        (
            Method::POST,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotecteditems",
                _,
                "remove",
            ],
        )
        | (
            Method::DELETE,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotecteditems",
                _,
            ],
        ) => disable_protection(st, headers, r[1], r[3], r[5]).await,
        (
            Method::POST,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotecteditems",
                _,
                "testfailover",
            ],
        ) => test_failover(st, headers, r[1], r[3], r[5], &body_json(body)?).await,
        (
            Method::POST,
            [
                "replicationfabrics",
                _,
                "replicationprotectioncontainers",
                _,
                "replicationprotecteditems",
                _,
                "testfailovercleanup",
            ],
        ) => test_failover_cleanup(st, headers, r[1], r[3], r[5], &body_json(body)?).await,
        // ----- jobs and operations -----
        (Method::GET, ["replicationjobs"]) => {
            let query = match query_param(uri, "$filter") {
                Some(f) => JobQuery::parse_filter(&percent_decode_lossy(&f)).map_err(bad_filter)?,
                None => JobQuery::default(),
            };
            let mut out = Vec::new();
            for job in matching_jobs(st, &query).await? {
                out.push(model::job_json(db, v, &job.id).await?);
            }
            ok(model::list(out))
        }
        (Method::POST, ["replicationjobs", "export"]) => {
            export_jobs(st, headers, &body_json(body)?).await
        }
        (Method::GET, ["replicationjobs", _, "siterecexport"]) => exported_csv(st, r[1]).await,
        (Method::GET, ["replicationjobs", _]) => ok(model::job_json(db, v, r[1]).await?),
        (Method::GET, ["replicationoperationstatus", _]) => operation_status(st, r[1]).await,
        (Method::GET, ["operationresults", _]) => operation_result(st, headers, r[1]).await,
        // ----- registration keys (siterec's own; not part of ARM) -----
        (Method::POST, ["siterecregistrationkeys"]) => create_key(st, &body_json(body)?).await,
        (Method::GET, ["siterecregistrationkeys"]) => {
            let rows = inventory::registration_keys(db).await?;
            let now = now_ms();
            ok(model::list(
                rows.into_iter()
                    .map(|k| {
                        let state = if k.revoked_ms.is_some() {
                            "Revoked"
                        } else if k.expires_ms < now {
                            "Expired"
                        } else {
                            "Valid"
                        };
                        api::RegistrationKey {
                            key_id: k.key_id,
                            fabric: k.fabric,
                            created_time: crate::db::rfc3339(k.created_ms),
                            expiry_time: crate::db::rfc3339(k.expires_ms),
                            state: state.into(),
                        }
                    })
                    .collect(),
            ))
        }
        (Method::DELETE, ["siterecregistrationkeys", _]) => {
            if !inventory::revoke_key(db, r[1], now_ms()).await? {
                return Err(ApiError::not_found("registration key", r[1]));
            }
            ok(api::KeyRevoked {
                key_id: r[1].to_string(),
                state: "Revoked".into(),
            })
        }
        (m, _) => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "PathNotFound",
            format!("no {m} operation at {}", uri.path()),
        )),
    }
}

/// The protection state of the item protecting a machine, if any.
async fn machine_protected(
    st: &AppState,
    fabric: &str,
    machine: &str,
) -> ApiResult<Option<ProtectionState>> {
    Ok(items::state_of_machine(&st.db, fabric, machine).await?)
}

fn props(body: &Value) -> &Value {
    body.get("properties").unwrap_or(&Value::Null)
}

/// The events the `$filter` asks for (newest [`EVENT_LIST_MAX`]), oldest first.
async fn list_events(st: &Shared, uri: &Uri) -> ApiResult<Response> {
    let filter = query_param(uri, "$filter")
        .or_else(|| query_param(uri, "%24filter"))
        .map(|f| percent_decode(&f))
        .transpose()?
        .unwrap_or_default();
    let q = siterec_core::events::EventQuery::parse_filter(&filter)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "InvalidFilter", e))?;
    let rows = events_db::list(&st.db, &q, EVENT_LIST_MAX).await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in &rows {
        out.push(model::event_json(&st.info, row)?);
    }
    ok(model::list(out))
}

/// The most events one list answers (the newest that match).
pub const EVENT_LIST_MAX: i64 = 1000;

/// A query value as sent: `%XX` escapes and `+` for a space.
fn percent_decode(s: &str) -> ApiResult<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes
                    .get(i + 1..i + 3)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "the query value '{s}' has a bad percent escape at character {i}"
                        ))
                    })?;
                out.push(hex);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::bad_request(format!("the query value '{s}' is not UTF-8")))
}

fn check_alert_setting_name(name: &str) -> ApiResult<()> {
    if name.eq_ignore_ascii_case(events_db::DEFAULT_ALERT_SETTING) {
        Ok(())
    } else {
        Err(ApiError::not_found(
            "alert setting (there is one: defaultAlertSetting)",
            name,
        ))
    }
}

/// The alert setting, or the defaults until one is configured.
async fn alert_setting(st: &AppState) -> ApiResult<events_db::AlertRow> {
    Ok(
        events_db::alert_setting(&st.db, events_db::DEFAULT_ALERT_SETTING)
            .await?
            .unwrap_or_else(|| events_db::AlertRow {
                name: events_db::DEFAULT_ALERT_SETTING.into(),
                send_to_owners: "DoNotSend".into(),
                emails: Vec::new(),
                locale: None,
                webhook_url: None,
            }),
    )
}

/// PUT `replicationAlertSettings/defaultAlertSetting` (ASR
/// `ConfigureAlertRequest`): fields given replace the stored ones; an
/// empty `webhookUrl` removes the webhook.
async fn configure_alerts(st: &Shared, name: &str, body: &Value) -> ApiResult<Response> {
    check_alert_setting_name(name)?;
    let req: api::ConfigureAlertRequest = serde_json::from_value(body.clone()).map_err(|e| {
        ApiError::bad_request(format!(
            "the body is not a ConfigureAlertRequest ({{\"properties\": {{\"sendToOwners\", \"customEmailAddresses\", \"locale\", \"webhookUrl\"}}}}): {e}"
        ))
    })?;
    let p = req.properties;
    let mut row = alert_setting(st).await?;
    if let Some(s) = p.send_to_owners {
        row.send_to_owners = match s.to_ascii_lowercase().as_str() {
            "send" => "Send".into(),
            "donotsend" => "DoNotSend".into(),
            _ => {
                return Err(ApiError::bad_request(format!(
                    "properties.sendToOwners '{s}' must be Send or DoNotSend"
                )));
            }
        };
    }
    if let Some(emails) = p.custom_email_addresses {
        for e in &emails {
            let ok = e.split_once('@').is_some_and(|(user, host)| {
                !user.is_empty() && host.contains('.') && !e.chars().any(char::is_whitespace)
            });
            if !ok {
                return Err(ApiError::bad_request(format!(
                    "properties.customEmailAddresses: '{e}' is not an email address (user@example.com)"
                )));
            }
        }
        row.emails = emails;
    }
    if let Some(l) = p.locale {
        row.locale = Some(l).filter(|l| !l.is_empty());
    }
    if let Some(url) = p.webhook_url {
        row.webhook_url = if url.is_empty() {
            None
        } else {
            Some(check_webhook_url(&url)?)
        };
    }
    events_db::put_alert_setting(&st.db, &row, now_ms()).await?;
    ok(model::alert_json(&st.info, &row))
}

/// A webhook must be an http or https URL with a host.
fn check_webhook_url(url: &str) -> ApiResult<String> {
    let bad = |why: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidWebhookUrl",
            format!(
                "properties.webhookUrl '{url}' {why}: give an http:// or https:// URL such as https://alerts.example.com/siterec"
            ),
        )
    };
    let parsed = reqwest::Url::parse(url).map_err(|e| bad(&format!("is not a URL ({e})")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(bad(&format!("has scheme '{}'", parsed.scheme())));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("has no host"));
    }
    Ok(url.to_string())
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
        &JobInput::CreatePolicy(PolicyInput {
            name: name.to_string(),
            policy,
        }),
        "ProtectionProfile",
        name,
        &model::policy_id(&st.info, name),
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

async fn delete_policy(st: &Shared, name: &str) -> ApiResult<Response> {
    let (name, _) = model::load_policy(&st.db, name).await?;
    let users = config::policy_users(&st.db, &name).await?;
    if !users.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "PolicyInUse",
            format!(
                "policy '{name}' is used by {}; delete those pairings ('siterec pairing delete') and disable those items' protection first",
                users.join(", ")
            ),
        ));
    }
    config::delete_policy(&st.db, &name).await?;
    // The delete is a long-running operation in the API: done at once, it
    // answers 204 (the SDK's poller takes 202 or 204, and fails on 200).
    Ok(StatusCode::NO_CONTENT.into_response())
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
    let target = parse_ref(
        st,
        "properties.targetProtectionContainerId",
        target_id,
        ResourceKind::ProtectionContainer,
    )?;
    let tf = model::fabric_exists(&st.db, &target[0]).await?;
    let tf = tf.as_str();
    let tc = model::container_exists(&st.db, tf, &target[1]).await?;
    let policy_ref = p
        .get("policyId")
        .and_then(|v| v.as_str())
        .ok_or_else(|| ApiError::bad_request("properties.policyId is required"))?;
    let policy_name = parse_ref(st, "properties.policyId", policy_ref, ResourceKind::Policy)?;
    let (policy, _) = model::load_policy(&st.db, &policy_name[0]).await?;
    // A pairing is only useful if the recovery cloud can keep replicas:
    // refuse it now rather than fail enable protection later.
    let stores =
        inventory::online_stores(&st.db, tf, &tc, now_ms() - model::AGENT_ONLINE_MS).await?;
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
    let existing = config::pairing(&mut **tx, fabric, &container, name).await?;
    if let Some(row) = existing {
        // Idempotent re-PUT of the same pairing.
        let same = row.target_fabric.eq_ignore_ascii_case(tf)
            && row.target_container.eq_ignore_ascii_case(&tc)
            && row.policy.eq_ignore_ascii_case(&policy);
        if !same {
            return Err(ApiError::conflict(format!(
                "mapping '{name}' exists with other settings; delete it first ('siterec pairing delete --fabric {fabric} --cloud {container} --name {name}'), then pair again"
            )));
        }
    } else {
        for (f, c) in [(fabric, container.as_str()), (tf, tc.as_str())] {
            let n = config::cloud_pairings(&mut tx, f, c).await?;
            if n > 0 {
                return Err(ApiError::conflict(format!(
                    "cloud {f}/{c} is already paired: a cloud belongs to at most one pairing, as primary or recovery; delete that pairing first ('siterec pairing list' names it, 'siterec pairing delete' removes it)"
                )));
            }
        }
        let pairing = config::PairingRow {
            fabric: fabric.to_string(),
            container: container.clone(),
            name: name.to_string(),
            target_fabric: tf.to_string(),
            target_container: tc.clone(),
            policy: policy.clone(),
            state: "Pairing".into(),
        };
        config::insert_pairing(&mut tx, &pairing, now_ms()).await?;
    }
    let id = format!(
        "{}/replicationProtectionContainerMappings/{name}",
        model::container_id(&st.info, fabric, &container)
    );
    let job = create_job(
        &mut tx,
        &JobInput::ConfigureProtection(PairingInput {
            fabric: fabric.to_string(),
            container: container.to_string(),
            name: name.to_string(),
            policy: policy.to_string(),
        }),
        "ProtectionContainerMapping",
        name,
        &id,
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
    let group = requested_group(p)?;
    let machine_ref = p.get("protectableItemId").and_then(|v| v.as_str()).ok_or_else(|| {
        ApiError::bad_request("properties.protectableItemId is required: the id of the machine to protect (see replicationProtectableItems)")
    })?;
    let machine_ref = parse_ref(
        st,
        "properties.protectableItemId",
        machine_ref,
        ResourceKind::ProtectableItem,
    )?;
    if !machine_ref[0].eq_ignore_ascii_case(fabric)
        || !machine_ref[1].eq_ignore_ascii_case(&container)
    {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidResourceId",
            format!(
                "properties.protectableItemId names a machine of cloud {}/{}, but protection is being enabled in cloud {fabric}/{container}: enable it under the machine's own cloud",
                machine_ref[0], machine_ref[1]
            ),
        ));
    }
    let machine_name = machine_ref[2].as_str();
    let mapping = config::paired_target(&st.db, fabric, &container).await?;
    let Some((tf, tc, mapped_policy)) = mapping else {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "CloudNotPaired",
            format!(
                "cloud {fabric}/{container} is not paired with a recovery cloud: create a protection container mapping first"
            ),
        ));
    };
    let policy = match p.get("policyId") {
        None | Some(Value::Null) => mapped_policy,
        Some(pid) => {
            let pid = pid.as_str().ok_or_else(|| {
                ApiError::bad_request(
                    "properties.policyId must be a string: a replication policy id",
                )
            })?;
            let named = parse_ref(st, "properties.policyId", pid, ResourceKind::Policy)?;
            let (named, _) = model::load_policy(&st.db, &named[0]).await?;
            if !named.eq_ignore_ascii_case(&mapped_policy) {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "PolicyNotOfPairing",
                    format!(
                        "policy '{named}' is not the policy of cloud {fabric}/{container}'s pairing, which replicates with policy '{mapped_policy}': leave policyId out, or give that one"
                    ),
                ));
            }
            mapped_policy
        }
    };
    if model::load_policy(&st.db, &policy).await?.1.encryption {
        let encrypted = inventory::encrypted_stores(&st.db, &tf, &tc).await?;
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
    let row = inventory::machine_of_cloud(&st.db, fabric, &container, machine_name)
        .await?
        .map(|m| (m.name, m.info, m.agent_id));
    let Some((machine, info, agent)) = row else {
        return Err(ApiError::not_found(
            "protectable item",
            &format!("{fabric}/{container}/{machine_name}"),
        ));
    };
    let info = stored_machine(&machine, &info)?;
    if let Some(err) = &info.error {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "MachineNotReady",
            format!("machine '{machine}' cannot be protected: {err}"),
        ));
    }
    let mut tx = crate::db::begin(&st.db).await?;
    let existing = items::load(&mut **tx, name).await?;
    if let Some(item) = existing {
        if item.machine.eq_ignore_ascii_case(&machine) && item.fabric.eq_ignore_ascii_case(fabric) {
            if !same_group(item.group.as_deref(), group.as_deref()) {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    "MultiVmGroupConflict",
                    format!(
                        "protected item '{}' exists {}, not {}; changing the multi-VM group of a protected item is not supported",
                        item.name,
                        in_group(item.group.as_deref()),
                        in_group(group.as_deref()),
                    ),
                ));
            }
            // An item that failed over comes back by reprotect, not by
            // enabling it again (which would do nothing).
            item.state.enable_again().map_err(transition_error)?;
            // A retried PUT: point at the job that is (or was) doing it.
            if let Some(job) = latest_job(&mut tx, JobKind::EnableProtection, &item.name).await? {
                return accepted(st, headers, &job);
            }
        }
        return Err(ApiError::conflict(format!(
            "a protected item named '{name}' already exists; choose another name"
        )));
    }
    let other: Option<String> = items::item_of_machine(&mut **tx, fabric, &machine).await?;
    if let Some(other) = other {
        return Err(ApiError::conflict(format!(
            "machine '{machine}' is already protected as item '{other}'"
        )));
    }
    // Checked inside the write transaction, so that two requests cannot
    // start one group on two agents at once.
    let group = match group {
        Some(g) => Some(
            join_group(
                &mut tx,
                &g,
                &Joining {
                    item: name,
                    machine: &machine,
                    agent: &agent,
                    policy: &policy,
                    fabric,
                    container: &container,
                    target_fabric: &tf,
                    target_container: &tc,
                },
            )
            .await?,
        ),
        None => None,
    };
    let now = now_ms();
    let new = items::NewItem {
        name,
        fabric,
        container: &container,
        machine: &machine,
        policy: &policy,
        target_fabric: &tf,
        target_container: &tc,
        state: ProtectionState::EnablingProtection,
        group: group.as_deref(),
    };
    items::insert(&mut tx, &new, now).await?;
    let job = create_job(
        &mut tx,
        &JobInput::EnableProtection(ItemInput {
            item: name.to_string(),
        }),
        "ProtectionEntity",
        name,
        &model::item_id(&st.info, fabric, &container, name),
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

/// The multi-VM consistency group an enable protection request names:
/// `providerSpecificDetails.multiVmGroupName` (and/or `multiVmGroupId`, as
/// the SDK's InMageAzureV2/InMage/A2A inputs have them; taken for any
/// instanceType). siterec identifies a group by its name, and a group's id
/// is its name (Azure PowerShell sends the group name as both).
fn requested_group(p: &Value) -> ApiResult<Option<String>> {
    let details = p.get("providerSpecificDetails").unwrap_or(&Value::Null);
    let field = |key: &str| -> ApiResult<Option<String>> {
        match details.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(ApiError::bad_request(format!(
                "properties.providerSpecificDetails.{key} must be a string (the multi-VM group's name), not {other}"
            ))),
        }
    };
    let name = field("multiVmGroupName")?;
    let id = field("multiVmGroupId")?;
    let group = match (name, id) {
        (Some(n), Some(i)) if !n.eq_ignore_ascii_case(&i) => {
            return Err(ApiError::bad_request(format!(
                "properties.providerSpecificDetails: multiVmGroupId '{i}' and multiVmGroupName '{n}' differ; siterec identifies a multi-VM group by its name (its id is its name): give the same value, or multiVmGroupName alone"
            )));
        }
        (Some(n), _) => Some(n),
        (None, i) => i,
    };
    if let Some(g) = &group {
        check_name("multi-VM group", g)?;
    }
    Ok(group)
}

fn same_group(a: Option<&str>, b: Option<&str>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => a.eq_ignore_ascii_case(b),
        (None, None) => true,
        _ => false,
    }
}

fn in_group(g: Option<&str>) -> String {
    match g {
        Some(g) => format!("in multi-VM group '{g}'"),
        None => "in no multi-VM group".to_string(),
    }
}

/// An item about to join a multi-VM group.
struct Joining<'a> {
    item: &'a str,
    machine: &'a str,
    /// The agent that hosts the machine.
    agent: &'a str,
    policy: &'a str,
    fabric: &'a str,
    container: &'a str,
    target_fabric: &'a str,
    target_container: &'a str,
}

/// Checks that an item may join multi-VM group `group` and returns the
/// group's name as its members spell it. Every member is on the same source
/// agent (the agent takes the group's points at one instant), under the same
/// policy and the same cloud pairing. A group with no members yet is
/// started by this item.
async fn join_group(tx: &mut Tx<'_>, group: &str, new: &Joining<'_>) -> ApiResult<String> {
    let members = items::group_members(tx, group).await?;
    let conflict =
        |message: String| ApiError::new(StatusCode::CONFLICT, "MultiVmGroupConflict", message);
    let mut canonical = None;
    for row in &members {
        let member = &row.name;
        canonical = canonical.or(row.group.clone());
        // A member whose machine is no longer reported has no agent to compare.
        if let Some(agent) = &row.agent_id
            && agent != new.agent
        {
            let host = &row.hostname;
            let new_host: Option<String> = inventory::agent_hostname(tx, new.agent).await?;
            return Err(conflict(format!(
                "machine '{}' is on agent {} (host {}), but multi-VM group '{group}' is replicated by agent {agent} (host {}), which hosts its member '{member}': a group's recovery points are taken at one instant by one source agent, so every machine of a group must be on the same agent; enable item '{}' in another group (of its own agent's machines) or in none",
                new.machine,
                new.agent,
                new_host.as_deref().unwrap_or("unknown"),
                host.as_deref().unwrap_or("unknown"),
                new.item,
            )));
        }
    }
    for row in &members {
        let member = &row.name;
        let policy = &row.policy;
        if !policy.eq_ignore_ascii_case(new.policy) {
            return Err(conflict(format!(
                "multi-VM group '{group}' replicates under policy '{policy}' (its member '{member}'), but item '{}' would use policy '{}': every item of a group uses the same policy; enable it with policy '{policy}', or in another group",
                new.item, new.policy,
            )));
        }
        let (f, c, tf, tc) = (
            &row.fabric,
            &row.container,
            &row.target_fabric,
            &row.target_container,
        );
        let same = f.eq_ignore_ascii_case(new.fabric)
            && c.eq_ignore_ascii_case(new.container)
            && tf.eq_ignore_ascii_case(new.target_fabric)
            && tc.eq_ignore_ascii_case(new.target_container);
        if !same {
            return Err(conflict(format!(
                "multi-VM group '{group}' replicates cloud {f}/{c} to {tf}/{tc} (its member '{member}'), but machine '{}' is in cloud {}/{} paired with {}/{}: every item of a group is under the same cloud pairing; enable it in another group",
                new.machine, new.fabric, new.container, new.target_fabric, new.target_container,
            )));
        }
    }
    Ok(canonical.unwrap_or_else(|| group.to_string()))
}

async fn latest_job(tx: &mut Tx<'_>, kind: JobKind, target: &str) -> ApiResult<Option<String>> {
    Ok(jobs_db::find(tx, kind, JobOf::Named(target)).await?)
}

async fn running_job(tx: &mut Tx<'_>, kind: JobKind, target: &str) -> ApiResult<Option<String>> {
    let running = jobs_db::find(tx, kind, JobOf::RunningOn(target)).await?;
    // A retried request is answered with the job that runs; a recovery
    // plan's machine operation is not a retry: it is refused.
    if let (Some(job), Some(_)) = (&running, crate::jobs::plan_child()) {
        return Err(ApiError::conflict(format!(
            "item '{target}' has a {} job running already ({job}): wait for it to end, then restart the plan's job",
            kind.display_name()
        )));
    }
    Ok(running)
}

fn transition_error(e: siterec_core::state::TransitionError) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "InvalidProtectionState",
        e.to_string(),
    )
}

/// Refuses a `failoverDirection` that is not the way the item can fail
/// over now (away from where its machine runs); absent means that way.
fn check_direction(item: &ItemRow, p: &Value) -> ApiResult<()> {
    // An item that cannot fail over now is refused by its state, whose
    // message says what to do.
    if item.state != ProtectionState::Protected {
        return Ok(());
    }
    let want = item.life().failover_direction();
    match p.get("failoverDirection") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::String(dir)) if dir.eq_ignore_ascii_case(want) => Ok(()),
        Some(Value::String(dir))
            if dir.eq_ignore_ascii_case(Location::Primary.failover_direction())
                || dir.eq_ignore_ascii_case(Location::Recovery.failover_direction()) =>
        {
            Err(ApiError::conflict(format!(
                "failoverDirection '{dir}' does not apply: item '{}' runs at its {} site, so a failover now goes {want}",
                item.name,
                item.active.as_str().to_lowercase()
            )))
        }
        Some(other) => Err(ApiError::bad_request(format!(
            "properties.failoverDirection must be PrimaryToRecovery or RecoveryToPrimary, got {other}"
        ))),
    }
}

/// The recovery point a failover input names
/// (`providerSpecificDetails.recoveryPointId`: a point id of this item, or
/// a bare point id).
fn wanted_point(st: &AppState, item: &ItemRow, p: &Value) -> ApiResult<Option<String>> {
    point_named(
        st,
        item,
        "properties.providerSpecificDetails.recoveryPointId",
        p.get("providerSpecificDetails")
            .and_then(|d| d.get("recoveryPointId")),
    )
}

/// The recovery point of `item` that `FIELD` (its value `v`) names: a
/// point id of this item, or a bare point id; `None` when absent or empty.
fn point_named(
    st: &AppState,
    item: &ItemRow,
    field: &'static str,
    v: Option<&Value>,
) -> ApiResult<Option<String>> {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let id = v
        .as_str()
        .ok_or_else(|| ApiError::bad_request(format!("{field} must be a string, got {v}")))?
        .trim();
    if id.is_empty() {
        return Ok(None);
    }
    if !id.contains('/') {
        return Ok(Some(id.to_string()));
    }
    let names = parse_ref(st, field, id, ResourceKind::RecoveryPoint)?;
    if !names[2].eq_ignore_ascii_case(&item.name) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidResourceId",
            format!(
                "{field} is a recovery point of item '{}', not of '{}': list this item's points with 'siterec points list {}'",
                names[2], item.name, item.name
            ),
        ));
    }
    Ok(names.into_iter().nth(3))
}

/// The point to fail over to: the one asked for, else the latest.
/// The point a failover or change of point uses: the one named, or the
/// latest, among the points kept in the store at `site`.
async fn choose_point(
    tx: &mut Tx<'_>,
    item: &ItemRow,
    wanted: Option<&str>,
    site: Location,
) -> ApiResult<String> {
    let point: Option<String> = match wanted {
        Some(id) => items::listed_point(tx, &item.name, id, site)
            .await?
            .ok_or_else(|| ApiError::not_found("recovery point", &format!("{}/{id}", item.name)))
            .map(Some)?,
        None => items::latest_point(tx, &item.name, site).await?,
    };
    point.ok_or_else(|| {
        ApiError::conflict(format!(
            "item '{}' has no recovery point yet; wait for initial replication",
            item.name
        ))
    })
}

/// The item as it is now, inside the transaction that will change it (two
/// requests racing see each other's writes).
async fn reload_item(tx: &mut Tx<'_>, name: &str) -> ApiResult<ItemRow> {
    items::load(&mut **tx, name)
        .await?
        .ok_or_else(|| ApiError::not_found("protected item", name))
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
    check_direction(&item, p)?;
    // Before anything is written: a refused key creates no job.
    let sealed_key = seal_recovery_key(st, &item, p, Location::Recovery).await?;
    let wanted = wanted_point(st, &item, p)?;
    // A VM is created and started at the recovery site; a physical
    // server's disks are written as images.
    let vm = model::machine_info(&st.db, &item.fabric, &item.machine)
        .await?
        .is_some_and(|m| model::is_vm(&m));
    let (mut tx, item, next) = match begin_item_op(
        st,
        headers,
        &item.name,
        ProtectionState::UnplannedFailoverInProgress,
        JobKind::UnplannedFailover,
        ItemAction::StartUnplannedFailover,
    )
    .await?
    {
        Begun::Running(answer) => return Ok(answer),
        Begun::Start(tx, item, next) => (tx, *item, next),
    };
    let point = choose_point(&mut tx, &item, wanted.as_deref(), Location::Recovery).await?;
    let input = JobInput::UnplannedFailover(FailoverInput {
        item: item.name.clone(),
        point_id: point.clone(),
        vm,
        vm_name: vm.then(|| item.machine.clone()),
        // Sealed to the recovery agent's transport key; forgotten once the
        // task that needs it is over (Effect::ForgetSealedKey).
        sealed_key: sealed_key.map(siterec_core::wire::SealedKey),
        to: Location::Recovery,
    });
    start_item_job(st, headers, tx, &item, next, true, &input).await
}

/// How an item operation starts, in the request's transaction.
enum Begun {
    /// The operation's job runs already (the SDK retried): its answer.
    Running(Response),
    /// The item as it is now and the lifecycle `action` leads it to.
    Start(
        crate::db::WriteTx,
        Box<ItemRow>,
        siterec_core::state::Lifecycle,
    ),
}

/// Reloads the item inside a new write transaction (two requests racing
/// see each other's writes); a retry while the item is `running` with a
/// job of `kind` is answered with that job; otherwise `action` must apply
/// (else 409 naming the state and what to do), and no test failover may
/// stand in its way.
async fn begin_item_op(
    st: &Shared,
    headers: &HeaderMap,
    name: &str,
    running: ProtectionState,
    kind: JobKind,
    action: ItemAction,
) -> ApiResult<Begun> {
    let mut tx = crate::db::begin(&st.db).await?;
    let item = reload_item(&mut tx, name).await?;
    if item.state == running
        && let Some(job) = running_job(&mut tx, kind, &item.name).await?
    {
        return Ok(Begun::Running(accepted(st, headers, &job)?));
    }
    let next = item.life().apply(action).map_err(transition_error)?;
    if let Some(e) = test_blocks(action, item.test_state) {
        return Err(transition_error(e));
    }
    Ok(Begun::Start(tx, Box::new(item), next))
}

/// Writes an item's new lifecycle and the job that carries the operation
/// on, in the request's transaction (`clear_error`: the item's last error
/// goes), and answers 202 with the job.
async fn start_item_job(
    st: &Shared,
    headers: &HeaderMap,
    mut tx: crate::db::WriteTx,
    item: &ItemRow,
    next: siterec_core::state::Lifecycle,
    clear_error: bool,
    input: &JobInput,
) -> ApiResult<Response> {
    items::set_life(&mut tx, &item.name, next, clear_error, now_ms()).await?;
    let job = create_job(
        &mut tx,
        input,
        "ProtectionEntity",
        &item.name,
        &model::item_id(&st.info, &item.fabric, &item.container, &item.name),
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

/// Planned failover (SDK `PlannedFailoverInput`): no data loss. The source
/// must be stopped — siterec cannot stop a physical server, so its operator
/// says it is (`providerSpecificDetails.sourceStopped`, the CLI's
/// `--source-stopped`) —; its agent replicates the last changes into a
/// final point, and the server is brought up from exactly that point.
async fn planned_failover(
    st: &Shared,
    headers: &HeaderMap,
    fabric: &str,
    container: &str,
    name: &str,
    body: &Value,
) -> ApiResult<Response> {
    let item = model::load_item_at(&st.db, fabric, container, name).await?;
    let p = props(body);
    check_direction(&item, p)?;
    let source_stopped = match p
        .get("providerSpecificDetails")
        .and_then(|d| d.get("sourceStopped"))
    {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "properties.providerSpecificDetails.sourceStopped must be true or false, got {other}"
            )));
        }
    };
    let vm = model::machine_info(&st.db, &item.fabric, &item.machine)
        .await?
        .is_some_and(|m| model::is_vm(&m));
    let details = p.get("providerSpecificDetails");
    let force = match details.and_then(|d| d.get("forceShutdown")) {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "properties.providerSpecificDetails.forceShutdown must be true or false, got {other}"
            )));
        }
    };
    let shutdown_timeout_secs = match details.and_then(|d| d.get("shutdownTimeoutSeconds")) {
        None | Some(Value::Null) => siterec_core::orchestration::DEFAULT_SHUTDOWN_SECS,
        Some(v) => v
            .as_u64()
            .filter(|s| (1..=3600).contains(s))
            .map(|s| s as u32)
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "properties.providerSpecificDetails.shutdownTimeoutSeconds must be a number of seconds from 1 to 3600, got {v}"
                ))
            })?,
    };
    if !vm && !source_stopped && item.state != ProtectionState::PlannedFailoverInProgress {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "SourceNotStopped",
            format!(
                "machine '{}' is a physical server and siterec cannot stop it: stop it (or take its disks out of service), then run the planned failover again with --source-stopped (ARM: properties.providerSpecificDetails.sourceStopped = true)",
                item.machine
            ),
        ));
    }
    // A failback stops the replica VM that runs at the recovery site.
    let source_vm = if vm && item.active == siterec_core::state::Location::Recovery {
        let started = item
            .failover_output
            .as_deref()
            .and_then(|o| serde_json::from_str::<siterec_core::wire::ReplicaStarted>(o).ok())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::CONFLICT,
                    "NoReplicaVm",
                    format!(
                        "item '{}' runs at the recovery site but its failover recorded no replica VM: fail it back with an unplanned failover from its latest point",
                        item.name
                    ),
                )
            })?;
        Some(started.vm_name)
    } else {
        None
    };
    // The machine goes to the other site, whose store holds the final
    // point (a failback: the primary site's).
    let to = item.active.other();
    // Before anything is written: a refused key creates no job.
    let sealed_key = seal_recovery_key(st, &item, p, to).await?;
    let (tx, item, next) = match begin_item_op(
        st,
        headers,
        &item.name,
        ProtectionState::PlannedFailoverInProgress,
        JobKind::PlannedFailover,
        ItemAction::StartPlannedFailover,
    )
    .await?
    {
        Begun::Running(answer) => return Ok(answer),
        Begun::Start(tx, item, next) => (tx, *item, next),
    };
    let input = JobInput::PlannedFailover(PlannedFailoverInput {
        item: item.name.clone(),
        source_stopped,
        final_point: None,
        sealed_key: sealed_key.map(siterec_core::wire::SealedKey),
        to: item.active.other(),
        machine: item.machine.clone(),
        vm,
        source_vm,
        shutdown_timeout_secs,
        force,
    });
    start_item_job(st, headers, tx, &item, next, true, &input).await
}

/// Reprotect (SDK `reprotect`, `ReverseReplicationInput`): after a
/// committed failover, replication runs from where the machine runs now
/// back to the site it left. That site's agent needs a replica store (its
/// `[target]`); it first hashes the disks it still has into it, so that
/// only the blocks that differ are sent.
async fn reprotect(
    st: &Shared,
    headers: &HeaderMap,
    fabric: &str,
    container: &str,
    name: &str,
    body: &Value,
) -> ApiResult<Response> {
    let item = model::load_item_at(&st.db, fabric, container, name).await?;
    let p = props(body);
    let to = item.active.other();
    if item.state == ProtectionState::FailoverCommitted {
        // Reprotect goes from where the machine runs: any other direction
        // is refused naming it.
        let want = item.active.failover_direction();
        match p.get("failoverDirection") {
            None | Some(Value::Null) => {}
            Some(Value::String(d)) if d.eq_ignore_ascii_case(want) => {}
            Some(other) => {
                return Err(ApiError::conflict(format!(
                    "failoverDirection {other} does not apply: item '{}' runs at its {} site, so it is reprotected {want}",
                    item.name,
                    item.active.as_str().to_lowercase()
                )));
            }
        }
        let agent = items::agent_at(&st.db, &item, to).await?;
        let has_store = match &agent {
            Some(a) => items::agent_has_store(&st.db, a).await?,
            None => false,
        };
        if !has_store {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "NoReplicaStore",
                format!(
                    "item '{}' cannot be replicated back to its {} site: the agent there ({}) has no replica store; add a [target] section (store, data address) to its agent.toml, restart it, then reprotect again",
                    item.name,
                    to.as_str().to_lowercase(),
                    agent.as_deref().unwrap_or("none reports the machine")
                ),
            ));
        }
    }
    let (mut tx, item, next) = match begin_item_op(
        st,
        headers,
        &item.name,
        ProtectionState::ReprotectInProgress,
        JobKind::Reprotect,
        ItemAction::StartReprotect,
    )
    .await?
    {
        Begun::Running(answer) => return Ok(answer),
        Begun::Start(tx, item, next) => (tx, *item, next),
    };
    // Nothing replicates in the new direction before its seed is in.
    items::clear_epoch(&mut tx, &item.name).await?;
    start_item_job(
        st,
        headers,
        tx,
        &item,
        next,
        true,
        &JobInput::Reprotect(ReprotectInput {
            item: item.name.clone(),
            machine: item.machine.clone(),
            to,
        }),
    )
    .await
}

/// Change recovery point (SDK `applyRecoveryPoint`,
/// `ApplyRecoveryPointInput`: `properties.recoveryPointId`): before commit,
/// the failed-over server's disks are written again from another point.
async fn change_recovery_point(
    st: &Shared,
    headers: &HeaderMap,
    fabric: &str,
    container: &str,
    name: &str,
    body: &Value,
) -> ApiResult<Response> {
    let item = model::load_item_at(&st.db, fabric, container, name).await?;
    let p = props(body);
    let wanted = point_named(st, &item, "properties.recoveryPointId", p.get("recoveryPointId"))?
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "properties.recoveryPointId is required: the point to rebuild the machine from ('siterec points list {}')",
                item.name
            ))
        })?;
    let vm = model::machine_info(&st.db, &item.fabric, &item.machine)
        .await?
        .is_some_and(|m| model::is_vm(&m));
    if vm && item.active == siterec_core::state::Location::Primary {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "ChangeRecoveryPointNotSupported",
            format!(
                "item '{}' is a virtual machine failed back to its primary site: its own VM runs there from the final point; a change of point remakes replica VMs at the recovery site only",
                item.name
            ),
        ));
    }
    let sealed_key = seal_recovery_key(st, &item, p, item.active).await?;
    let (mut tx, item, next) = match begin_item_op(
        st,
        headers,
        &item.name,
        ProtectionState::ChangeRecoveryPointInProgress,
        JobKind::ChangeRecoveryPoint,
        ItemAction::StartChangeRecoveryPoint,
    )
    .await?
    {
        Begun::Running(answer) => return Ok(answer),
        Begun::Start(tx, item, next) => (tx, *item, next),
    };
    // The failed-over machine is rebuilt where it runs, from that site's store.
    let point = choose_point(&mut tx, &item, Some(&wanted), item.active).await?;
    start_item_job(
        st,
        headers,
        tx,
        &item,
        next,
        true,
        &JobInput::ChangeRecoveryPoint(ChangePointInput {
            item: item.name.clone(),
            point_id: point,
            sealed_key: sealed_key.map(siterec_core::wire::SealedKey),
            at: item.active,
            vm,
        }),
    )
    .await
}

/// Disable protection (SDK `remove`, or DELETE of the item): replication
/// stops, the item goes, and — when its policy says `replicaDeletion:
/// Required` — the recovery agent deletes its recovery points and disks.
async fn disable_protection(
    st: &Shared,
    headers: &HeaderMap,
    fabric: &str,
    container: &str,
    name: &str,
) -> ApiResult<Response> {
    let item = model::load_item_at(&st.db, fabric, container, name).await?;
    let (_, policy) = model::load_policy(&st.db, &item.policy).await?;
    let (tx, item, next) = match begin_item_op(
        st,
        headers,
        &item.name,
        ProtectionState::DisablingProtection,
        JobKind::DisableProtection,
        ItemAction::StartDisable,
    )
    .await?
    {
        Begun::Running(answer) => return Ok(answer),
        Begun::Start(tx, item, next) => (tx, *item, next),
    };
    start_item_job(
        st,
        headers,
        tx,
        &item,
        next,
        true,
        &JobInput::DisableProtection(DisableInput {
            item: item.name.clone(),
            delete_replica: policy.replica_deletion,
            // The replica is at the other site while the item replicates;
            // a committed failover's is where the machine now runs.
            at: if item.state == ProtectionState::FailoverCommitted {
                item.active
            } else {
                item.active.other()
            },
        }),
    )
    .await
}

/// Test failover (SDK `TestFailoverInput`): the recovery agent creates and
/// starts a copy of the VM from a recovery point, named `<machine>-test`,
/// on the network the input names (`networkType: VmNetworkAsInput` with
/// `networkId`, a network of the recovery fabric) or on an isolated one;
/// a physical server's test copy is its disks written as images in a test
/// directory of the recovery agent (no network). The item stays Protected
/// and goes on replicating.
async fn test_failover(
    st: &Shared,
    headers: &HeaderMap,
    fabric: &str,
    container: &str,
    name: &str,
    body: &Value,
) -> ApiResult<Response> {
    let item = model::load_item_at(&st.db, fabric, container, name).await?;
    let p = props(body);
    check_direction(&item, p)?;
    let machine = model::machine_info(&st.db, &item.fabric, &item.machine).await?;
    let vm = match &machine {
        Some(m) => model::is_vm(m),
        None => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "MachineNotReported",
                format!(
                    "machine '{}' of item '{}' is not reported by any agent of fabric '{}' now, so its VM settings (memory, CPUs, NICs) are unknown: start its agent and retry",
                    item.machine, item.name, item.fabric
                ),
            ));
        }
    };
    let network = test_network(st, &item, p).await?;
    if let (false, Some(n)) = (vm, &network) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "TestFailoverNetworkNotSupported",
            format!(
                "item '{}' protects a physical server: its test failover writes the disks as images at the recovery site and attaches no network, so network '{n}' cannot be used; leave networkType/networkId out (or use NoNetworkAttachAsInput)",
                item.name
            ),
        ));
    }
    // Before anything is written: a refused key creates no job.
    let sealed_key = seal_recovery_key(st, &item, p, Location::Recovery).await?;
    let wanted = wanted_point(st, &item, p)?;
    let mut tx = crate::db::begin(&st.db).await?;
    let item = reload_item(&mut tx, &item.name).await?;
    if item.test_state == TestFailoverState::TestFailoverInitiated
        && let Some(job) = running_job(&mut tx, JobKind::TestFailover, &item.name).await?
    {
        return accepted(st, headers, &job);
    }
    let next = item
        .test_state
        .apply(TestAction::Start, item.state)
        .map_err(transition_error)?;
    let point = choose_point(&mut tx, &item, wanted.as_deref(), Location::Recovery).await?;
    items::start_test_failover(&mut tx, &item.name, next, &point, now_ms()).await?;
    let input = JobInput::TestFailover(TestFailoverInput {
        item: item.name.clone(),
        point_id: point.clone(),
        vm_name: format!("{}-test", item.machine),
        vm,
        network: network.map(|n| n.to_string()),
        // Forgotten once the StartReplica task is over.
        sealed_key: sealed_key.map(siterec_core::wire::SealedKey),
    });
    let job = create_job(
        &mut tx,
        &input,
        "ProtectionEntity",
        &item.name,
        &model::item_id(&st.info, &item.fabric, &item.container, &item.name),
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

/// The recovery network a test failover input names, checked: `None` for
/// an isolated test (no networkType, or `NoNetworkAttachAsInput`).
async fn test_network(st: &AppState, item: &ItemRow, p: &Value) -> ApiResult<Option<String>> {
    let ty = p
        .get("networkType")
        .and_then(|v| v.as_str())
        .map(str::trim)
        .unwrap_or("");
    let id = p
        .get("networkId")
        .and_then(|v| v.as_str())
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let id = match (ty.to_ascii_lowercase().as_str(), id) {
        ("" | "nonetworkattachasinput", None) => return Ok(None),
        ("" | "vmnetworkasinput", Some(id)) => id,
        ("vmnetworkasinput", None) => {
            return Err(ApiError::bad_request(format!(
                "networkType VmNetworkAsInput needs networkId: a network of recovery fabric '{}' ('siterec network list --fabric {}'); or use networkType NoNetworkAttachAsInput for an isolated test",
                item.target_fabric, item.target_fabric
            )));
        }
        ("nonetworkattachasinput", Some(id)) => {
            return Err(ApiError::bad_request(format!(
                "networkId '{id}' is given with networkType NoNetworkAttachAsInput (an isolated test): leave networkId out, or use networkType VmNetworkAsInput"
            )));
        }
        (_, _) => {
            return Err(ApiError::bad_request(format!(
                "networkType '{ty}' is not supported: use VmNetworkAsInput (with networkId, a network of the recovery fabric) or NoNetworkAttachAsInput (an isolated network)"
            )));
        }
    };
    let (fabric, network) = parse_network_ref(st, "properties.networkId", id)?;
    let fabric = fabric.unwrap_or_else(|| item.target_fabric.clone());
    let (fabric, network) = (fabric.as_str(), network.as_str());
    if !fabric.eq_ignore_ascii_case(&item.target_fabric) {
        return Err(ApiError::bad_request(format!(
            "network '{network}' is in fabric '{fabric}', but item '{}' recovers to fabric '{}': choose one of its networks ('siterec network list --fabric {}')",
            item.name, item.target_fabric, item.target_fabric
        )));
    }
    let networks = model::fabric_networks(&st.db, &item.target_fabric).await?;
    let Some(network) = networks
        .iter()
        .find(|n| n.eq_ignore_ascii_case(network))
        .cloned()
    else {
        return Err(ApiError::bad_request(format!(
            "network '{network}' is not a network of recovery fabric '{}' ({})",
            item.target_fabric,
            known_networks(&networks)
        )));
    };
    if let Some(agent) = &item.target_agent_id {
        let on_host = model::network_agents(&st.db, &item.target_fabric, &network).await?;
        if !on_host.iter().any(|a| a == agent) {
            let mine: Vec<String> = inventory::agent_networks(&st.db, agent).await?;
            return Err(ApiError::bad_request(format!(
                "network '{network}' of fabric '{}' is not on the host of item '{}''s recovery agent {agent}, where the test VM runs ({})",
                item.target_fabric,
                item.name,
                known_networks(&mine)
            )));
        }
    }
    Ok(Some(network))
}

fn known_networks(names: &[String]) -> String {
    if names.is_empty() {
        "it reports no networks: add [[networks]] name = \"…\" to its agent's config".into()
    } else {
        format!("its networks: {}", names.join(", "))
    }
}

/// Test failover cleanup (SDK `TestFailoverCleanupInput`): the recovery
/// agent powers off and deletes the test VM.
async fn test_failover_cleanup(
    st: &Shared,
    headers: &HeaderMap,
    fabric: &str,
    container: &str,
    name: &str,
    body: &Value,
) -> ApiResult<Response> {
    let item = model::load_item_at(&st.db, fabric, container, name).await?;
    let comments = match props(body).get("comments") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(c)) if c.chars().count() <= 1024 => c.clone(),
        Some(Value::String(_)) => {
            return Err(ApiError::bad_request(
                "comments are limited to 1024 characters",
            ));
        }
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "comments must be a string, got {other}"
            )));
        }
    };
    let job = start_test_cleanup(st, &item.name, &comments, None).await?;
    accepted(st, headers, &job)
}

/// Starts the cleanup of an item's test failover (or finds the one
/// running): the API's, or the vault's own for a test failover left
/// completed longer than it allows (`forced_age_ms`: how long; the event
/// saying so is recorded with the job). Returns the job.
pub(crate) async fn start_test_cleanup(
    st: &AppState,
    name: &str,
    comments: &str,
    forced_age_ms: Option<i64>,
) -> ApiResult<String> {
    // Read before the write transaction (no second connection while it
    // holds the write lock): whether the machine is a VM, should the test
    // failover's output not say.
    let machine_is_vm = match items::load(&st.db, name).await? {
        Some(i) => model::machine_info(&st.db, &i.fabric, &i.machine)
            .await?
            .is_none_or(|m| model::is_vm(&m)),
        None => true,
    };
    let mut tx = crate::db::begin(&st.db).await?;
    let item = reload_item(&mut tx, name).await?;
    if item.test_state == TestFailoverState::TestFailoverCleanupInitiated
        && let Some(job) = running_job(&mut tx, JobKind::TestFailoverCleanup, &item.name).await?
    {
        return Ok(job);
    }
    let next = item
        .test_state
        .apply(TestAction::StartCleanup, item.state)
        .map_err(transition_error)?;
    let output = item
        .test_output
        .as_deref()
        .and_then(|o| serde_json::from_str::<Value>(o).ok());
    let vm_name = output
        .as_ref()
        .and_then(|o| o.get("vmName").and_then(|n| n.as_str()).map(str::to_string))
        .unwrap_or_else(|| format!("{}-test", item.machine));
    // A test VM's output names its run directory, a physical test copy's
    // only lists its disks; without an output (the test failover failed
    // early) the machine says what it is.
    let vm = match &output {
        Some(o) if o.get("runDir").is_some() => true,
        Some(o) if o.get("disks").is_some() => false,
        _ => machine_is_vm,
    };
    items::set_test_state(&mut tx, &item.name, next, now_ms()).await?;
    let job = create_job(
        &mut tx,
        &JobInput::TestFailoverCleanup(CleanupInput {
            item: item.name.clone(),
            vm_name: vm_name.to_string(),
            vm,
            comments: Some(comments.to_string()),
        }),
        "ProtectionEntity",
        &item.name,
        &model::item_id(&st.info, &item.fabric, &item.container, &item.name),
    )
    .await?;
    if let Some(age) = forced_age_ms {
        let event = siterec_core::events::forced_cleanup(&item.name, &item.fabric, &job, age);
        crate::persist::events::insert(&mut tx, &event, now_ms()).await?;
    }
    tx.commit().await?;
    st.wake.notify_one();
    Ok(job)
}

/// The networks of a fabric as resources, with the agents that report each.
async fn networks_of(st: &AppState, fabric: &str) -> ApiResult<Vec<api::Network>> {
    let mut out = Vec::new();
    for n in model::fabric_networks(&st.db, fabric).await? {
        let agents = model::network_agents(&st.db, fabric, &n).await?;
        out.push(model::network_json(&st.info, fabric, &n, &agents));
    }
    Ok(out)
}

/// Network mapping (SDK `CreateNetworkMappingInput`): a VM network of the
/// primary fabric → a network of the recovery fabric. Validated before
/// anything is written; one mapping per primary network; the mapping comes
/// into force (Paired) when its job has checked the recovery network.
async fn create_network_mapping(
    st: &Shared,
    headers: &HeaderMap,
    fabric: &str,
    network: &str,
    name: &str,
    body: &Value,
) -> ApiResult<Response> {
    check_name("network mapping", name)?;
    let fabric = model::fabric_exists(&st.db, fabric).await?;
    let network = model::network_exists(&st.db, &fabric, network).await?;
    let p = props(body);
    let rid = p
        .get("recoveryNetworkId")
        .and_then(|v| v.as_str())
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| {
            ApiError::bad_request(
                "properties.recoveryNetworkId is required: the id of a network of the recovery fabric (…/replicationFabrics/RF/replicationNetworks/RN; 'siterec network list --fabric RF' lists them)",
            )
        })?;
    let given_rf = p
        .get("recoveryFabricName")
        .and_then(|v| v.as_str())
        .map(str::trim)
        .filter(|s| !s.is_empty());
    let (id_rf, rn) = parse_network_ref(st, "properties.recoveryNetworkId", rid)?;
    let (id_rf, rn) = (id_rf.as_deref(), rn.as_str());
    let rf = match (given_rf, id_rf) {
        (Some(a), Some(b)) if !a.eq_ignore_ascii_case(b) => {
            return Err(ApiError::bad_request(format!(
                "recoveryFabricName '{a}' and recoveryNetworkId (a network of fabric '{b}') disagree: give the recovery network's own fabric"
            )));
        }
        (Some(a), _) => a,
        (None, Some(b)) => b,
        (None, None) => {
            return Err(ApiError::bad_request(format!(
                "recoveryNetworkId '{rid}' is a bare name: give recoveryFabricName too, or the network's full id"
            )));
        }
    };
    let rf: String = inventory::fabric(&st.db, rf).await?.ok_or_else(|| {
        ApiError::bad_request(format!(
            "recovery fabric '{rf}' does not exist; 'siterec fabric list' shows the fabrics"
        ))
    })?;
    let recovery_networks = model::fabric_networks(&st.db, &rf).await?;
    let rn = recovery_networks
        .iter()
        .find(|n| n.eq_ignore_ascii_case(rn))
        .cloned()
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "recovery network '{rn}' is not reported by any agent of fabric '{rf}' ({})",
                known_networks(&recovery_networks)
            ))
        })?;
    let instance = p
        .pointer("/fabricSpecificDetails/instanceType")
        .and_then(|v| v.as_str())
        .filter(|s| !s.is_empty())
        .unwrap_or("VmmToVmm")
        .to_string();
    let id = model::network_mapping_id(&st.info, &fabric, &network, name);
    let mut tx = crate::db::begin(&st.db).await?;
    let existing = config::mapping_of_network(&mut tx, &fabric, &network).await?;
    if let Some(row) = existing {
        let (other, erf, ern, state) = (
            &row.name,
            &row.recovery_fabric,
            &row.recovery_network,
            &row.state,
        );
        if !other.eq_ignore_ascii_case(name) {
            return Err(ApiError::conflict(format!(
                "network '{network}' of fabric '{fabric}' is already mapped to {erf}/{ern} by mapping '{other}': a network has one mapping; remove it first with 'siterec network unmap --fabric {fabric} --network {network}'"
            )));
        }
        if !(erf.eq_ignore_ascii_case(&rf) && ern.eq_ignore_ascii_case(&rn)) {
            return Err(ApiError::conflict(format!(
                "mapping '{other}' exists with another recovery network ({erf}/{ern}); remove it first with 'siterec network unmap --fabric {fabric} --network {network}'"
            )));
        }
        if state == "Unpairing" {
            return Err(ApiError::conflict(format!(
                "mapping '{other}' is being removed; wait for its job to finish, then map again"
            )));
        }
        // A retried PUT of the same mapping: the job that made it.
        if let Some(job) = latest_job_for(&mut tx, JobKind::CreateNetworkMapping, &id).await? {
            return accepted(st, headers, &job);
        }
        return ok(model::network_mapping_json(&st.info, &row));
    }
    let mapping = config::NetworkMappingRow {
        fabric: fabric.to_string(),
        network: network.to_string(),
        name: name.to_string(),
        recovery_fabric: rf.to_string(),
        recovery_network: rn.to_string(),
        instance_type: instance.clone(),
        state: "Pairing".into(),
    };
    config::insert_network_mapping(&mut tx, &mapping, now_ms()).await?;
    let job = create_job(
        &mut tx,
        &JobInput::CreateNetworkMapping(NetworkMappingInput {
            fabric: fabric.to_string(),
            network: network.to_string(),
            name: name.to_string(),
            recovery_fabric: rf.to_string(),
            recovery_network: rn.to_string(),
        }),
        "NetworkMapping",
        name,
        &id,
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

/// Removes a network mapping (a job: 202). A mapping that does not exist
/// is already removed (204), as ARM deletes go.
async fn delete_network_mapping(
    st: &Shared,
    headers: &HeaderMap,
    fabric: &str,
    network: &str,
    name: &str,
) -> ApiResult<Response> {
    let fabric = model::fabric_exists(&st.db, fabric).await?;
    let mut tx = crate::db::begin(&st.db).await?;
    let row = config::network_mapping(&mut **tx, &fabric, network, name).await?;
    let Some(config::NetworkMappingRow {
        network,
        name,
        state,
        ..
    }) = row
    else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let id = model::network_mapping_id(&st.info, &fabric, &network, &name);
    match state.as_str() {
        "Unpairing" => {
            if let Some(job) = latest_job_for(&mut tx, JobKind::DeleteNetworkMapping, &id).await? {
                return accepted(st, headers, &job);
            }
        }
        "Pairing" => {
            return Err(ApiError::conflict(format!(
                "mapping '{name}' is being created; wait for its job to finish, then remove it"
            )));
        }
        _ => {}
    }
    config::unpair_network_mapping(&mut tx, &fabric, &network, &name).await?;
    let job = create_job(
        &mut tx,
        &JobInput::DeleteNetworkMapping(NetworkRef {
            fabric: fabric.to_string(),
            network: network.to_string(),
            name: name.to_string(),
        }),
        "NetworkMapping",
        &name,
        &id,
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

/// The latest job of `kind` on the resource with ARM id `target_id`.
async fn latest_job_for(
    tx: &mut Tx<'_>,
    kind: JobKind,
    target_id: &str,
) -> ApiResult<Option<String>> {
    Ok(jobs_db::find(tx, kind, JobOf::Id(target_id)).await?)
}

/// For an item kept in an encrypted replica store: the operator's recovery
/// key (`providerSpecificDetails.primaryKekCertificatePfx`, base64 of the
/// recovery key file, as ASR takes a key certificate at failover), checked
/// against the store's key id and sealed at once to the recovery agent's
/// transport key. Only the sealed form (`SRKT0001`, base64) is returned:
/// the vault never writes the key in the clear. `None` for a plain store.
async fn seal_recovery_key(
    st: &AppState,
    item: &ItemRow,
    p: &Value,
    site: Location,
) -> ApiResult<Option<String>> {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as BASE64;
    let Some(agent) = items::agent_at(&st.db, item, site).await? else {
        return Ok(None);
    };
    let agent = &agent;
    let Some(inventory::StoreKeys {
        encrypted,
        key_id: store_key_id,
        transport_key: transport,
    }) = inventory::store_keys(&st.db, agent).await?
    else {
        return Ok(None);
    };
    if !encrypted {
        return Ok(None);
    }
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
    let (tx, item, next) = match begin_item_op(
        st,
        headers,
        &item.name,
        ProtectionState::FailoverCommitInProgress,
        JobKind::CommitFailover,
        ItemAction::StartCommit,
    )
    .await?
    {
        Begun::Running(answer) => return Ok(answer),
        Begun::Start(tx, item, next) => (tx, *item, next),
    };
    start_item_job(
        st,
        headers,
        tx,
        &item,
        next,
        false,
        &JobInput::CommitFailover(ItemInput {
            item: item.name.clone(),
        }),
    )
    .await
}

/// siterec's own action: verify every replica store of a site's agents.
async fn verify_stores(st: &Shared, headers: &HeaderMap, fabric: &str) -> ApiResult<Response> {
    let fabric = model::fabric_exists(&st.db, fabric).await?;
    let agents = inventory::store_agents(&st.db, &fabric).await?;
    if agents.is_empty() {
        return Err(ApiError::bad_request(format!(
            "fabric '{fabric}' has no agent with a replica store: nothing to verify"
        )));
    }
    let mut tx = crate::db::begin(&st.db).await?;
    let job = create_job(
        &mut tx,
        &JobInput::VerifyStore(VerifyInput {
            fabric: fabric.to_string(),
            agents,
        }),
        "Fabric",
        &fabric,
        &model::fabric_id(&st.info, &fabric),
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

async fn operation_status(st: &Shared, job_id: &str) -> ApiResult<Response> {
    let job = jobs_db::view(&st.db, job_id)
        .await?
        .ok_or_else(|| ApiError::not_found("operation", job_id))?;
    let (state, start, end, code, message) = (
        job.state,
        job.start_ms,
        job.end_ms,
        job.error_code,
        job.error_message,
    );
    let status = JobState::parse(&state)
        .map(|s| s.operation_status())
        .unwrap_or("Failed");
    ok(api::OperationStatus {
        id: format!("{}/replicationOperationStatus/{job_id}", st.info.id()),
        name: job_id.to_string(),
        status: status.into(),
        start_time: crate::db::opt_rfc3339(start),
        end_time: crate::db::opt_rfc3339(end),
        error: match (code, message) {
            (Some(code), Some(message)) => Some(api::ErrorDetail { code, message }),
            _ => None,
        },
    })
}

/// The Location of a long-running operation: 202 while it runs; when it has
/// succeeded, the resource it acted on (a failover returns the protected
/// item); when it failed, the job's error.
async fn operation_result(st: &Shared, headers: &HeaderMap, job_id: &str) -> ApiResult<Response> {
    let job = jobs_db::view(&st.db, job_id)
        .await?
        .ok_or_else(|| ApiError::not_found("operation", job_id))?;
    let (state, kind, input, code, message) = (
        job.state,
        job.kind,
        job.input,
        job.error_code,
        job.error_message,
    );
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
    let kind = JobKind::parse(&kind)
        .ok_or_else(|| ApiError::internal("stored job", format!("unknown job kind {kind}")))?;
    let input = JobInput::parse(kind, &input).map_err(|e| ApiError::internal("stored job", e))?;
    match input {
        JobInput::CreatePolicy(p) => {
            let (name, p) = model::load_policy(&st.db, &p.name).await?;
            ok(model::policy_json(&st.info, &name, &p))
        }
        // A disabled item is gone: the job says what was done.
        JobInput::VerifyStore(_)
        | JobInput::DeleteNetworkMapping(_)
        | JobInput::DisableProtection(_) => ok(model::job_json(&st.db, &st.info, job_id).await?),
        JobInput::RecoveryPlan(p) => plans::get_plan(st, &p.plan).await,
        // A removed pairing is gone; an export's result is its job, whose
        // customDetails (ExportJobDetails) say where the CSV is.
        JobInput::DeletePairing(_) | JobInput::ExportJobs(_) => {
            ok(model::job_json(&st.db, &st.info, job_id).await?)
        }
        JobInput::CreateNetworkMapping(m) => {
            let row = config::network_mapping(&st.db, &m.fabric, &m.network, &m.name)
                .await?
                .ok_or_else(|| ApiError::not_found("network mapping", &m.name))?;
            ok(model::network_mapping_json(&st.info, &row))
        }
        JobInput::ConfigureProtection(p) => {
            let row = config::pairing(&st.db, &p.fabric, &p.container, &p.name)
                .await?
                .ok_or_else(|| ApiError::not_found("protection container mapping", &p.name))?;
            ok(model::mapping_json(&st.info, &row))
        }
        JobInput::ChangeRecoveryPoint(ChangePointInput { item, .. })
        | JobInput::EnableProtection(ItemInput { item })
        | JobInput::CommitFailover(ItemInput { item })
        | JobInput::UnplannedFailover(FailoverInput { item, .. })
        | JobInput::TestFailover(TestFailoverInput { item, .. })
        | JobInput::TestFailoverCleanup(CleanupInput { item, .. })
        | JobInput::PlannedFailover(PlannedFailoverInput { item, .. })
        | JobInput::Reprotect(ReprotectInput { item, .. }) => {
            let item = model::load_item(&st.db, &item).await?;
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
    inventory::ensure_fabric(&mut **tx, fabric, now).await?;
    let fabric = inventory::fabric(&mut **tx, fabric)
        .await?
        .ok_or_else(|| ApiError::internal("fabric", "created and not found"))?;
    let hash = secret_hash(&secret);
    let new = inventory::NewKey {
        key_id: &key_id,
        fabric: &fabric,
        secret_hash: &hash,
        created_ms: now,
        expires_ms,
    };
    inventory::insert_key(&mut tx, &new).await?;
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
    ok(key)
}

// ----- taking things apart -----

/// Removes a cloud pairing (a job: 202): refused (409) while it protects
/// items, naming them. A pairing that does not exist is already removed
/// (204), as ARM deletes go.
async fn delete_pairing(
    st: &Shared,
    headers: &HeaderMap,
    fabric: &str,
    container: &str,
    name: &str,
) -> ApiResult<Response> {
    let fabric = model::fabric_exists(&st.db, fabric).await?;
    let container = model::container_exists(&st.db, &fabric, container).await?;
    let mut tx = crate::db::begin(&st.db).await?;
    let Some(row) = config::pairing(&mut **tx, &fabric, &container, name).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let id = format!(
        "{}/replicationProtectionContainerMappings/{}",
        model::container_id(&st.info, &fabric, &container),
        row.name
    );
    match row.state.as_str() {
        "Unpairing" => {
            if let Some(job) = latest_job_for(&mut tx, JobKind::DeletePairing, &id).await? {
                return accepted(st, headers, &job);
            }
        }
        "Pairing" => {
            return Err(ApiError::conflict(format!(
                "pairing '{}' is being created; wait for its job to finish, then delete it",
                row.name
            )));
        }
        _ => {}
    }
    let items = config::pairing_items(&mut tx, &row).await?;
    if !items.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "PairingInUse",
            format!(
                "pairing '{}' of cloud {fabric}/{container} protects {} item(s): {}; disable their protection first ('siterec item disable ITEM'), then delete the pairing",
                row.name,
                items.len(),
                items.join(", ")
            ),
        ));
    }
    config::unpair(&mut tx, &fabric, &container, &row.name).await?;
    let job = create_job(
        &mut tx,
        &JobInput::DeletePairing(PairingInput {
            fabric: fabric.clone(),
            container: container.clone(),
            name: row.name.clone(),
            policy: row.policy.clone(),
        }),
        "ProtectionContainerMapping",
        &row.name,
        &id,
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

/// Unregisters an agent: refused (409) while a protected item needs it
/// (its machines' or its replicas'), naming them; else its row, machines,
/// networks and tasks go in one transaction, and from its next heartbeat
/// on its certificate is refused (`AgentNotRegistered`: the agent stops).
/// Done at once, it answers 204, as a finished long-running delete (and
/// 204 for an agent the fabric does not have: already removed).
async fn unregister_agent(st: &Shared, fabric: &str, agent: &str) -> ApiResult<Response> {
    let fabric = model::fabric_exists(&st.db, fabric).await?;
    let mut tx = crate::db::begin(&st.db).await?;
    let Some(id) = inventory::agent_of_fabric(&mut tx, &fabric, agent).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let items = inventory::agent_items(&mut tx, &id).await?;
    if !items.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "AgentInUse",
            format!(
                "agent {id} of fabric '{fabric}' is in use by {} protected item(s): {} (it reports their machines or keeps their replicas); disable their protection first ('siterec item disable ITEM'), then unregister it",
                items.len(),
                items.join(", ")
            ),
        ));
    }
    inventory::remove_agent(&mut tx, &id).await?;
    tx.commit().await?;
    tracing::info!(agent = %id, fabric = %fabric, "agent unregistered");
    st.wake.notify_one();
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Deletes a fabric (site): refused (409) while it has agents, pairings,
/// protected items or network mappings (either side), naming them. Done
/// at once: 204, and 204 for a fabric that does not exist.
async fn delete_fabric(st: &Shared, fabric: &str) -> ApiResult<Response> {
    let mut tx = crate::db::begin(&st.db).await?;
    let Some(name) = inventory::fabric(&mut **tx, fabric).await? else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    let uses = inventory::fabric_uses(&mut tx, &name).await?;
    if !uses.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "FabricInUse",
            format!(
                "fabric '{name}' is in use: {}; disable protection of its items, delete its pairings ('siterec pairing delete') and network mappings ('siterec network unmap') and unregister its agents ('siterec agent unregister') first",
                uses.join("; ")
            ),
        ));
    }
    inventory::remove_fabric(&mut tx, &name, now_ms()).await?;
    tx.commit().await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

// ----- jobs filtered and exported -----

fn bad_filter(e: jobquery::FilterError) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "InvalidJobQuery",
        format!("{e}; a filter is clauses FIELD eq 'VALUE' joined by 'and'"),
    )
}

/// `%XX` and `+` of a query string decoded (bytes that do not decode are
/// kept as they are).
fn percent_decode_lossy(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match std::str::from_utf8(&b[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(v) => {
                        out.push(v);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The jobs the query asks for, newest first.
async fn matching_jobs(st: &AppState, query: &JobQuery) -> ApiResult<Vec<JobFacts>> {
    Ok(jobs_db::facts(&st.db, query.start_ms)
        .await?
        .into_iter()
        .filter(|j| query.matches(j))
        .collect())
}

/// `replicationJobs/export`: the jobs the body (a JobQueryParameter) asks
/// for, written as CSV at once — the export is of the jobs as they are
/// when it is asked for — into an ExportJobs job's output; the job (202,
/// then its result) says where to GET it: `blobUri` + `sasToken`, a URL of
/// this vault (`replicationJobs/{id}/siterecExport`, with the bearer token).
async fn export_jobs(st: &Shared, headers: &HeaderMap, body: &Value) -> ApiResult<Response> {
    let query = JobQuery::from_body(body).map_err(bad_filter)?;
    let rows = matching_jobs(st, &query).await?;
    let csv = jobquery::to_csv(
        &rows,
        |k| {
            JobKind::parse(k)
                .map(|k| k.display_name())
                .unwrap_or(k)
                .to_string()
        },
        crate::db::rfc3339,
    );
    let mut tx = crate::db::begin(&st.db).await?;
    let job = create_job(
        &mut tx,
        &JobInput::ExportJobs(ExportInput { query }),
        "Vault",
        "replicationJobs",
        &format!("{}/replicationJobs", st.info.id()),
    )
    .await?;
    let output = model::ExportOutput {
        blob_uri: format!(
            "{}/replicationJobs/{job}/siterecExport",
            base_url(st, headers)
        ),
        sas_token: format!("?api-version={API_VERSION}"),
        rows: rows.len(),
        csv,
    };
    let output =
        serde_json::to_string(&output).map_err(|e| ApiError::internal("export output", e))?;
    jobs_db::set_output(&mut tx, &job, &output).await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

/// The CSV of an export job.
async fn exported_csv(st: &Shared, job_id: &str) -> ApiResult<Response> {
    let job = jobs_db::view(&st.db, job_id)
        .await?
        .ok_or_else(|| ApiError::not_found("job", job_id))?;
    if job.kind != JobKind::ExportJobs.as_str() {
        return Err(ApiError::bad_request(format!(
            "job {job_id} is a {} job, not an export: only an export (POST replicationJobs/export) has a CSV",
            job.kind
        )));
    }
    let out: model::ExportOutput = job
        .output
        .as_deref()
        .map(serde_json::from_str)
        .transpose()
        .map_err(|e| ApiError::internal(&format!("stored output of export job {job_id}"), e))?
        .ok_or_else(|| ApiError::internal(&format!("export job {job_id}"), "it has no output"))?;
    Ok((
        [(axum::http::header::CONTENT_TYPE, "text/csv; charset=utf-8")],
        out.csv,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::VaultInfo;
    use serde_json::json;
    use std::sync::Arc;

    async fn open(dir: &std::path::Path) -> Shared {
        let db = crate::db::open_for_test(dir).await.unwrap();
        let st = Arc::new(AppState {
            db,
            info: VaultInfo {
                subscription: "s".into(),
                resource_group: "rg".into(),
                name: "v".into(),
                location: "local".into(),
            },
            agent_ca: siterec_pki::Ca::generate("test agent CA").unwrap(),
            vault_ca: siterec_pki::Ca::generate("test vault CA").unwrap(),
            agent_url: "https://127.0.0.1:1".into(),
            wake: tokio::sync::Notify::new(),
            changes: tokio::sync::watch::channel(1).0,
            reported: Default::default(),
        });
        sqlx::query(
            "INSERT INTO api_tokens (token_hash, name, created_ms) VALUES ($1, 'admin', 0)",
        )
        .bind(secret_hash("tok"))
        .execute(&st.db)
        .await
        .unwrap();
        st
    }

    async fn exec(st: &AppState, sql: &str) {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql.to_string()))
            .execute(&st.db)
            .await
            .unwrap();
    }

    /// Two sites; a protected VM `vm1` (NIC eth0 on prod-lan) as item
    /// `i-vm` and a protected physical server `phys1` as item `i-phys`,
    /// each with a recovery point; networks: primary prod-lan and backup
    /// (agent-src), recovery dr-lan and test-net (agent-tgt), and other-lan
    /// on another recovery host.
    async fn setup(st: &AppState) {
        let now = now_ms();
        exec(
            st,
            "INSERT INTO fabrics (name, created_ms) VALUES ('primary', 0), ('recovery', 0)",
        )
        .await;
        exec(st, "INSERT INTO containers (fabric, name, created_ms) VALUES ('primary', 'pc', 0), ('recovery', 'rc', 0)").await;
        exec(st, r#"INSERT INTO policies (name, body, created_ms) VALUES ('pol', '{"instanceType":"HyperVReplicaAzure","copyFrequencySecs":30,"retention":{"kind":"hours","hours":1},"appConsistentFrequencyHours":0,"compression":true,"initialReplicationStart":null}', 0)"#).await;
        exec(st, &format!("INSERT INTO agents (id, fabric, hostname, key_id, cloud, data_url, version, enrolled_ms, last_seen_ms) VALUES ('agent-src', 'primary', 'h1', 'k', 'pc', NULL, '0', 0, {now}), ('agent-tgt', 'recovery', 'h2', 'k', 'rc', 'https://127.0.0.1:2', '0', 0, {now}), ('agent-tgt2', 'recovery', 'h3', 'k', 'rc', 'https://127.0.0.1:3', '0', 0, {now})")).await;
        exec(st, r#"INSERT INTO machines (fabric, container, name, agent_id, info, updated_ms) VALUES
            ('primary', 'pc', 'vm1', 'agent-src', '{"name":"vm1","kind":"VirtualMachine","disks":[],"nics":[{"name":"eth0","network":"prod-lan","mac":"52:54:00:00:00:09"}],"vm":{"memoryMib":256,"cpus":1}}', 0),
            ('primary', 'pc', 'phys1', 'agent-src', '{"name":"phys1","kind":"PhysicalServer","disks":[]}', 0)"#).await;
        exec(st, "INSERT INTO networks (fabric, name, agent_id, updated_ms) VALUES ('primary', 'prod-lan', 'agent-src', 0), ('primary', 'backup', 'agent-src', 0), ('recovery', 'dr-lan', 'agent-tgt', 0), ('recovery', 'test-net', 'agent-tgt', 0), ('recovery', 'other-lan', 'agent-tgt2', 0)").await;
        exec(st, "INSERT INTO protected_items (name, fabric, container, machine, policy, target_fabric, target_container, target_agent_id, state, created_ms, updated_ms) VALUES ('i-vm', 'primary', 'pc', 'vm1', 'pol', 'recovery', 'rc', 'agent-tgt', 'Protected', 0, 0), ('i-phys', 'primary', 'pc', 'phys1', 'pol', 'recovery', 'rc', 'agent-tgt', 'Protected', 0, 0)").await;
        exec(st, "INSERT INTO recovery_points (item, point_id, created_ms, consistency, bytes_sent, bytes_read, reported_ms) VALUES ('i-vm', 'p1', 1, 'CrashConsistent', 0, 0, 1), ('i-phys', 'q1', 1, 'CrashConsistent', 0, 0, 1)").await;
    }

    /// One ARM call as a client makes it: (status, JSON body, job id header).
    async fn call(
        st: &Shared,
        method: Method,
        rel: &str,
        body: Value,
    ) -> (u16, Value, Option<String>) {
        call_uri(
            st,
            method,
            &format!("{}/{rel}?api-version={API_VERSION}", st.info.id()),
            body,
        )
        .await
    }

    /// [`call`] with the whole path and query.
    async fn call_uri(
        st: &Shared,
        method: Method,
        uri: &str,
        body: Value,
    ) -> (u16, Value, Option<String>) {
        let uri: Uri = uri.parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer tok"));
        h.insert("host", HeaderValue::from_static("vault.test"));
        let body = if body.is_null() {
            Bytes::new()
        } else {
            Bytes::from(body.to_string())
        };
        let resp = match handle(st, &method, &uri, &h, &body).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        let status = resp.status().as_u16();
        let job = resp
            .headers()
            .get("x-siterec-job-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            job,
        )
    }

    async fn count(st: &AppState, sql: &str) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql.to_string()))
            .fetch_one(&st.db)
            .await
            .unwrap()
    }

    fn message(v: &Value) -> &str {
        v["error"]["message"].as_str().unwrap_or_default()
    }

    const MAP: &str =
        "replicationFabrics/primary/replicationNetworks/prod-lan/replicationNetworkMappings";

    fn rnet(st: &AppState, fabric: &str, n: &str) -> String {
        model::network_id(&st.info, fabric, n)
    }

    /// Deleting a policy answers as a finished long-running delete (204);
    /// one in use is refused (409) and stays; an unknown one is 404.
    #[tokio::test]
    async fn policy_delete_answers_like_a_finished_long_running_delete() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        setup(&st).await;
        let (code, v, _) = call(&st, Method::DELETE, "replicationPolicies/pol", Value::Null).await;
        assert_eq!(code, 409, "{v}");
        exec(&st, r#"INSERT INTO policies (name, body, created_ms) SELECT 'spare', body, 0 FROM policies WHERE name = 'pol'"#).await;
        let (code, _, _) = call(
            &st,
            Method::DELETE,
            "replicationPolicies/spare",
            Value::Null,
        )
        .await;
        assert_eq!(code, 204);
        assert_eq!(
            count(&st, "SELECT COUNT(*) FROM policies WHERE name = 'spare'").await,
            0
        );
        assert_eq!(
            count(&st, "SELECT COUNT(*) FROM policies WHERE name = 'pol'").await,
            1
        );
        let (code, _, _) = call(
            &st,
            Method::DELETE,
            "replicationPolicies/spare",
            Value::Null,
        )
        .await;
        assert_eq!(code, 404);
    }

    #[tokio::test]
    async fn item_lists_come_in_pages_linked_by_next_link() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        let names = model::seed_fleet(&st.db, 3, 70, 1).await.unwrap();
        let vault_rel = "replicationProtectedItems".to_string();
        let cloud_rel = "replicationFabrics/bench-primary/replicationProtectionContainers/primary-cloud/replicationProtectedItems".to_string();
        for rel in [vault_rel, cloud_rel] {
            let mut uri = format!("{}/{rel}?api-version={API_VERSION}", st.info.id());
            let mut seen = Vec::new();
            let mut pages = Vec::new();
            loop {
                let (code, v, _) = call_uri(&st, Method::GET, &uri, Value::Null).await;
                assert_eq!(code, 200, "{v}");
                let page = v["value"].as_array().unwrap();
                pages.push(page.len());
                seen.extend(page.iter().map(|i| i["name"].as_str().unwrap().to_string()));
                match v["nextLink"].as_str() {
                    Some(next) => {
                        uri = next.strip_prefix("http://vault.test").unwrap().to_string();
                        assert!(uri.contains("skipToken="), "{uri}");
                    }
                    None => break,
                }
            }
            assert_eq!(pages, vec![100, 100, 10], "{rel}");
            // Each item once, in creation order.
            assert_eq!(seen, names, "{rel}");
        }
        // A page of exactly the page size has no nextLink.
        let dir2 = tempfile::tempdir().unwrap();
        let st2 = open(dir2.path()).await;
        model::seed_fleet(&st2.db, 1, 100, 0).await.unwrap();
        let (_, v, _) = call(&st2, Method::GET, "replicationProtectedItems", Value::Null).await;
        assert_eq!(v["value"].as_array().unwrap().len(), 100);
        assert!(v.get("nextLink").is_none(), "{}", v["nextLink"]);
        // A token the vault did not write is refused, naming what to do.
        for bad in ["garbage", "12~", "x~vm0000-001", "1~a%20b"] {
            let (code, v, _) = call_uri(
                &st,
                Method::GET,
                &format!(
                    "{}/replicationProtectedItems?api-version={API_VERSION}&skipToken={bad}",
                    st.info.id()
                ),
                Value::Null,
            )
            .await;
            assert_eq!(code, 400, "{bad}: {v}");
            assert!(message(&v).contains("follow the nextLink"), "{v}");
        }
    }

    /// A page reads its items' facts at once; each item shows exactly as
    /// its own GET shows it (a VM with a mapped NIC, counters and a point,
    /// and a physical server).
    #[tokio::test]
    async fn a_listed_item_is_the_item_its_get_answers() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        setup(&st).await;
        exec(&st, "INSERT INTO network_mappings (fabric, network, name, recovery_fabric, recovery_network, instance_type, state, created_ms) VALUES ('primary', 'prod-lan', 'm', 'recovery', 'dr-lan', 'VmmToVmm', 'Paired', 0)").await;
        exec(&st, r#"UPDATE agents SET counters = '{"i-vm":{"bytesSent":7,"healthWarnings":["spool in use"]}}' WHERE id = 'agent-src'"#).await;
        let (_, list, _) = call(&st, Method::GET, "replicationProtectedItems", Value::Null).await;
        let listed = list["value"].as_array().unwrap();
        assert_eq!(listed.len(), 2, "{list}");
        for item in listed {
            let name = item["name"].as_str().unwrap();
            let (code, mut got, _) =
                call(&st, Method::GET, &item_rel("pc", name), Value::Null).await;
            assert_eq!(code, 200, "{got}");
            let mut item = item.clone();
            // The RPO is counted from now, which moved between the two.
            for v in [&mut item, &mut got] {
                v["properties"]["providerSpecificDetails"]["rpoInSeconds"] = Value::Null;
            }
            assert_eq!(item, got, "{name}");
        }
        let vm = listed.iter().find(|i| i["name"] == "i-vm").unwrap();
        let d = &vm["properties"]["providerSpecificDetails"];
        assert_eq!(d["recoveryPointCount"], 1, "{vm}");
        assert_eq!(d["sourceAgentCounters"]["bytesSent"], 7, "{vm}");
        assert_eq!(d["vmNics"][0]["recoveryVMNetworkName"], "dr-lan", "{vm}");
        assert_eq!(vm["properties"]["replicationHealth"], "Warning", "{vm}");
    }

    #[tokio::test]
    async fn networks_are_listed_per_fabric_and_vault_wide() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        setup(&st).await;
        let (code, v, _) = call(
            &st,
            Method::GET,
            "replicationFabrics/recovery/replicationNetworks",
            Value::Null,
        )
        .await;
        assert_eq!(code, 200);
        let names: Vec<&str> = v["value"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|n| n["name"].as_str())
            .collect();
        assert_eq!(names, ["dr-lan", "other-lan", "test-net"]);
        assert_eq!(v["value"][0]["properties"]["agents"][0], "agent-tgt");
        let (_, all, _) = call(&st, Method::GET, "replicationNetworks", Value::Null).await;
        assert_eq!(all["value"].as_array().unwrap().len(), 5);
        let (code, one, _) = call(
            &st,
            Method::GET,
            "replicationFabrics/Recovery/replicationNetworks/DR-LAN",
            Value::Null,
        )
        .await;
        assert_eq!(code, 200);
        assert_eq!(one["id"], rnet(&st, "recovery", "dr-lan"));
        let (code, err, _) = call(
            &st,
            Method::GET,
            "replicationFabrics/recovery/replicationNetworks/nope",
            Value::Null,
        )
        .await;
        assert_eq!(code, 404);
        assert!(
            message(&err).contains("network 'nope' is not reported"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn bad_network_mappings_are_refused_naming_the_problem_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        setup(&st).await;
        let cases = [
            (
                "replicationFabrics/primary/replicationNetworks/nope/replicationNetworkMappings/m",
                json!({"properties": {"recoveryNetworkId": rnet(&st, "recovery", "dr-lan")}}),
                404,
                "network 'nope' is not reported by any agent of fabric 'primary'",
            ),
            (
                "replicationFabrics/primary/replicationNetworks/prod-lan/replicationNetworkMappings/m",
                json!({"properties": {}}),
                400,
                "recoveryNetworkId is required",
            ),
            (
                "replicationFabrics/primary/replicationNetworks/prod-lan/replicationNetworkMappings/m",
                json!({"properties": {"recoveryFabricName": "mars", "recoveryNetworkId": "dr-lan"}}),
                400,
                "recovery fabric 'mars' does not exist",
            ),
            (
                "replicationFabrics/primary/replicationNetworks/prod-lan/replicationNetworkMappings/m",
                json!({"properties": {"recoveryNetworkId": rnet(&st, "recovery", "nowhere")}}),
                400,
                "recovery network 'nowhere' is not reported by any agent of fabric 'recovery' (its networks: dr-lan, other-lan, test-net)",
            ),
            (
                "replicationFabrics/primary/replicationNetworks/prod-lan/replicationNetworkMappings/m",
                json!({"properties": {"recoveryFabricName": "primary", "recoveryNetworkId": rnet(&st, "recovery", "dr-lan")}}),
                400,
                "disagree",
            ),
            (
                "replicationFabrics/primary/replicationNetworks/prod-lan/replicationNetworkMappings/m",
                json!({"properties": {"recoveryNetworkId": "dr-lan"}}),
                400,
                "give recoveryFabricName too",
            ),
            (
                "replicationFabrics/primary/replicationNetworks/prod-lan/replicationNetworkMappings/bad!name",
                json!({"properties": {"recoveryNetworkId": rnet(&st, "recovery", "dr-lan")}}),
                400,
                "not valid",
            ),
        ];
        for (rel, body, status, needle) in cases {
            let (code, v, _) = call(&st, Method::PUT, rel, body).await;
            assert_eq!(code, status, "{rel}: {v}");
            assert!(message(&v).contains(needle), "{rel}: {v}");
        }
        assert_eq!(count(&st, "SELECT COUNT(*) FROM network_mappings").await, 0);
        assert_eq!(count(&st, "SELECT COUNT(*) FROM jobs").await, 0);

        // A good one, VmmToVmm by default; a retried PUT answers with its job.
        let good = json!({"properties": {"recoveryFabricName": "recovery", "recoveryNetworkId": rnet(&st, "recovery", "dr-lan")}});
        let (code, _, job) = call(&st, Method::PUT, &format!("{MAP}/m1"), good.clone()).await;
        assert_eq!(code, 202);
        let (code, _, again) = call(&st, Method::PUT, &format!("{MAP}/m1"), good).await;
        assert_eq!((code, &again), (202, &job));
        // One mapping per primary network, and no other target under the same name.
        let (code, v, _) = call(
            &st,
            Method::PUT,
            &format!("{MAP}/m2"),
            json!({"properties": {"recoveryNetworkId": rnet(&st, "recovery", "test-net")}}),
        )
        .await;
        assert_eq!(code, 409, "{v}");
        assert!(
            message(&v).contains("already mapped to recovery/dr-lan by mapping 'm1'"),
            "{v}"
        );
        let (code, v, _) = call(
            &st,
            Method::PUT,
            &format!("{MAP}/m1"),
            json!({"properties": {"recoveryNetworkId": rnet(&st, "recovery", "test-net")}}),
        )
        .await;
        assert_eq!(code, 409, "{v}");
        assert_eq!(count(&st, "SELECT COUNT(*) FROM network_mappings").await, 1);
        assert_eq!(count(&st, "SELECT COUNT(*) FROM jobs").await, 1);
        let (_, v, _) = call(&st, Method::GET, &format!("{MAP}/m1"), Value::Null).await;
        let p = &v["properties"];
        assert_eq!(p["primaryNetworkFriendlyName"], "prod-lan");
        assert_eq!(p["recoveryNetworkId"], rnet(&st, "recovery", "dr-lan"));
        assert_eq!(p["recoveryFabricFriendlyName"], "recovery");
        assert_eq!(p["fabricSpecificSettings"]["instanceType"], "VmmToVmm");
        assert_eq!(p["state"], "Pairing");
        // Removing a mapping still being created is refused; an unknown
        // mapping is already gone.
        let (code, _, _) = call(&st, Method::DELETE, &format!("{MAP}/m1"), Value::Null).await;
        assert_eq!(code, 409);
        let (code, _, _) = call(&st, Method::DELETE, &format!("{MAP}/zz"), Value::Null).await;
        assert_eq!(code, 204);
        exec(&st, "UPDATE network_mappings SET state = 'Paired'").await;
        let (code, _, del) = call(&st, Method::DELETE, &format!("{MAP}/m1"), Value::Null).await;
        assert_eq!(code, 202);
        let (code, _, del2) = call(&st, Method::DELETE, &format!("{MAP}/m1"), Value::Null).await;
        assert_eq!((code, del2), (202, del));
        let (_, list, _) = call(&st, Method::GET, "replicationNetworkMappings", Value::Null).await;
        assert_eq!(list["value"][0]["properties"]["state"], "Unpairing");
    }

    const VM: &str = "replicationFabrics/primary/replicationProtectionContainers/pc/replicationProtectedItems/i-vm";
    const PHYS: &str = "replicationFabrics/primary/replicationProtectionContainers/pc/replicationProtectedItems/i-phys";

    #[tokio::test]
    async fn test_failover_refuses_what_it_cannot_do_and_creates_no_job() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        setup(&st).await;
        let cases = [
            (
                PHYS,
                "testFailover",
                json!({"properties": {"networkType": "VmNetworkAsInput", "networkId": rnet(&st, "recovery", "TEST-NET")}}),
                400,
                "attaches no network",
            ),
            (
                VM,
                "testFailoverCleanup",
                json!({"properties": {"comments": "x"}}),
                409,
                "no test failover to clean up",
            ),
            (
                VM,
                "testFailover",
                json!({"properties": {"networkType": "VmNetworkAsInput"}}),
                400,
                "needs networkId",
            ),
            (
                VM,
                "testFailover",
                json!({"properties": {"networkType": "Bogus"}}),
                400,
                "networkType 'Bogus' is not supported",
            ),
            (
                VM,
                "testFailover",
                json!({"properties": {"networkType": "VmNetworkAsInput", "networkId": rnet(&st, "primary", "prod-lan")}}),
                400,
                "recovers to fabric 'recovery'",
            ),
            (
                VM,
                "testFailover",
                json!({"properties": {"networkType": "VmNetworkAsInput", "networkId": rnet(&st, "recovery", "nowhere")}}),
                400,
                "not a network of recovery fabric 'recovery'",
            ),
            (
                VM,
                "testFailover",
                json!({"properties": {"networkType": "VmNetworkAsInput", "networkId": rnet(&st, "recovery", "other-lan")}}),
                400,
                "not on the host of item 'i-vm''s recovery agent agent-tgt",
            ),
            (
                VM,
                "testFailover",
                json!({"properties": {"failoverDirection": "RecoveryToPrimary"}}),
                409,
                "runs at its primary site, so a failover now goes PrimaryToRecovery",
            ),
            (
                VM,
                "testFailover",
                json!({"properties": {"providerSpecificDetails": {"instanceType": "HyperVReplicaAzure", "recoveryPointId": "gone"}}}),
                404,
                "recovery point 'i-vm/gone' was not found",
            ),
            (
                VM,
                "testFailoverCleanup",
                json!({"properties": {"comments": "x".repeat(1025)}}),
                400,
                "1024 characters",
            ),
        ];
        for (item, action, body, status, needle) in cases {
            let (code, v, _) =
                call(&st, Method::POST, &format!("{item}/{action}"), body.clone()).await;
            assert_eq!(code, status, "{action} {body}: {v}");
            assert!(message(&v).contains(needle), "{action}: {v}");
        }
        assert_eq!(count(&st, "SELECT COUNT(*) FROM jobs").await, 0);
        assert_eq!(
            count(&st, "SELECT COUNT(*) FROM protected_items WHERE test_failover_state != 'None' OR state != 'Protected'").await,
            0
        );
    }

    #[tokio::test]
    async fn test_failover_is_idempotent_while_it_runs_and_blocks_what_would_collide() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        setup(&st).await;
        let body = json!({"properties": {
            "failoverDirection": "PrimaryToRecovery",
            "networkType": "VmNetworkAsInput",
            "networkId": rnet(&st, "recovery", "TEST-NET"),
            "providerSpecificDetails": {"instanceType": "HyperVReplicaAzure"},
        }});
        let (code, _, job) = call(
            &st,
            Method::POST,
            &format!("{VM}/testFailover"),
            body.clone(),
        )
        .await;
        assert_eq!(code, 202);
        let job = job.unwrap();
        // The SDK retries a POST: the same job answers.
        let (code, _, again) = call(
            &st,
            Method::POST,
            &format!("{VM}/testFailover"),
            body.clone(),
        )
        .await;
        assert_eq!((code, again.as_deref()), (202, Some(job.as_str())));
        let input: String = sqlx::query_scalar("SELECT input FROM jobs WHERE id = $1")
            .bind(&job)
            .fetch_one(&st.db)
            .await
            .unwrap();
        let input: Value = serde_json::from_str(&input).unwrap();
        assert_eq!(input["vmName"], "vm1-test");
        assert_eq!(input["network"], "test-net");
        assert_eq!(input["pointId"], "p1");
        // The item stays Protected; the test failover is visible.
        let (_, item, _) = call(&st, Method::GET, VM, Value::Null).await;
        assert_eq!(item["properties"]["protectionState"], "Protected");
        assert_eq!(
            item["properties"]["testFailoverState"],
            "TestFailoverInitiated"
        );
        // Nothing may start while the job runs (disabling protection
        // waits until no test failover is left).
        assert_eq!(item["properties"]["allowedOperations"], json!([]));
        // No cleanup, and no unplanned failover, while the job runs.
        let (code, v, _) = call(
            &st,
            Method::POST,
            &format!("{VM}/testFailoverCleanup"),
            json!({}),
        )
        .await;
        assert_eq!(code, 409, "{v}");
        assert!(message(&v).contains("wait for its job"), "{v}");
        let (code, v, _) = call(
            &st,
            Method::POST,
            &format!("{VM}/unplannedFailover"),
            json!({}),
        )
        .await;
        assert_eq!(code, 409, "{v}");
        assert!(message(&v).contains("test failover job is running"), "{v}");
        assert_eq!(count(&st, "SELECT COUNT(*) FROM jobs").await, 1);

        // Once it completed, another test failover needs a cleanup first.
        exec(
            &st,
            &format!("UPDATE jobs SET state = 'Succeeded' WHERE id = '{job}'"),
        )
        .await;
        exec(&st, "UPDATE protected_items SET test_failover_state = 'TestFailoverCompleted', test_failover_output = '{\"vmName\":\"vm1-test\"}'").await;
        let (code, v, _) = call(&st, Method::POST, &format!("{VM}/testFailover"), body).await;
        assert_eq!(code, 409, "{v}");
        assert!(message(&v).contains("clean it up"), "{v}");
        let (code, _, cleanup) = call(
            &st,
            Method::POST,
            &format!("{VM}/testFailoverCleanup"),
            json!({"properties": {"comments": "all good"}}),
        )
        .await;
        assert_eq!(code, 202);
        let (code, _, again) = call(
            &st,
            Method::POST,
            &format!("{VM}/testFailoverCleanup"),
            json!({}),
        )
        .await;
        assert_eq!((code, again), (202, cleanup.clone()));
        let input: String = sqlx::query_scalar("SELECT input FROM jobs WHERE id = $1")
            .bind(cleanup.unwrap())
            .fetch_one(&st.db)
            .await
            .unwrap();
        let input: Value = serde_json::from_str(&input).unwrap();
        assert_eq!(input["vmName"], "vm1-test");
        assert_eq!(input["comments"], "all good");
        assert_eq!(count(&st, "SELECT COUNT(*) FROM jobs").await, 2);
    }

    #[tokio::test]
    async fn items_and_protectable_vms_show_their_nics_and_a_physical_server_fails_over_as_before()
    {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        setup(&st).await;
        let (_, m, _) = call(
            &st,
            Method::GET,
            "replicationFabrics/primary/replicationProtectionContainers/pc/replicationProtectableItems/vm1",
            Value::Null,
        )
        .await;
        let d = &m["properties"]["customDetails"];
        assert_eq!(d["instanceType"], "VirtualMachine");
        assert_eq!(d["vmNics"][0]["nicId"], "eth0");
        assert_eq!(d["vmNics"][0]["vMNetworkName"], "prod-lan");
        assert_eq!(d["vmNics"][0]["macAddress"], "52:54:00:00:00:09");
        let (_, item, _) = call(&st, Method::GET, VM, Value::Null).await;
        let ops = item["properties"]["allowedOperations"].clone();
        assert_eq!(
            ops,
            json!([
                "PlannedFailover",
                "UnplannedFailover",
                "DisableProtection",
                "TestFailover"
            ])
        );
        let nic = &item["properties"]["providerSpecificDetails"]["vmNics"][0];
        assert_eq!(nic["recoveryVMNetworkId"], Value::Null);
        exec(&st, "INSERT INTO network_mappings (fabric, network, name, recovery_fabric, recovery_network, instance_type, state, created_ms) VALUES ('primary', 'prod-lan', 'm', 'recovery', 'dr-lan', 'VmmToVmm', 'Paired', 0)").await;
        let (_, item, _) = call(&st, Method::GET, VM, Value::Null).await;
        let nic = &item["properties"]["providerSpecificDetails"]["vmNics"][0];
        assert_eq!(nic["recoveryVMNetworkId"], rnet(&st, "recovery", "dr-lan"));
        let (_, phys, _) = call(&st, Method::GET, PHYS, Value::Null).await;
        assert_eq!(
            phys["properties"]["allowedOperations"],
            json!([
                "PlannedFailover",
                "UnplannedFailover",
                "DisableProtection",
                "TestFailover"
            ])
        );
        assert_eq!(phys["properties"]["protectedItemType"], "PhysicalServer");

        // Unplanned failover: a VM's job starts the VM, a physical server's
        // materializes disks.
        for (item, vm) in [(VM, true), (PHYS, false)] {
            let (code, _, job) = call(
                &st,
                Method::POST,
                &format!("{item}/unplannedFailover"),
                json!({}),
            )
            .await;
            assert_eq!(code, 202);
            let (input, step): (String, String) = sqlx::query_as(
                "SELECT j.input, s.name FROM jobs j JOIN job_steps s ON s.job_id = j.id AND s.idx = 2 WHERE j.id = $1",
            )
            .bind(job.unwrap())
            .fetch_one(&st.db)
            .await
            .unwrap();
            let input: Value = serde_json::from_str(&input).unwrap();
            assert_eq!(input["vm"] == Value::Bool(true), vm, "{input}");
            assert_eq!(step.contains("virtual machine"), vm, "{step}");
        }
    }

    #[tokio::test]
    async fn each_forbidden_action_answers_409_naming_the_state_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        setup(&st).await;
        exec(&st, "INSERT INTO container_mappings (fabric, container, name, target_fabric, target_container, policy, state, created_ms) VALUES ('primary', 'pc', 'map1', 'recovery', 'rc', 'pol', 'Paired', 0)").await;
        let enable = enable_body(&st, "pc", "phys1", json!({}));
        let cases: [(&str, Method, &str, Value, &str); 11] = [
            (
                "Protected",
                Method::POST,
                "reProtect",
                json!({"properties": {}}),
                "already protected and replicating",
            ),
            (
                "UnplannedFailoverCompleted",
                Method::POST,
                "reProtect",
                json!({"properties": {}}),
                "commit the failover first (Commit), then reprotect",
            ),
            (
                "FailoverCommitted",
                Method::POST,
                "applyRecoveryPoint",
                json!({"properties": {"recoveryPointId": "q1"}}),
                "can no longer be changed",
            ),
            (
                "Protected",
                Method::POST,
                "applyRecoveryPoint",
                json!({"properties": {"recoveryPointId": "q1"}}),
                "fail the item over first",
            ),
            (
                "Protected",
                Method::POST,
                "failoverCommit",
                json!({}),
                "fail the item over first",
            ),
            (
                "FailoverCommitted",
                Method::POST,
                "plannedFailover",
                json!({"properties": {"failoverDirection": "RecoveryToPrimary", "providerSpecificDetails": {"sourceStopped": true}}}),
                "reprotect it first",
            ),
            (
                "FailoverCommitted",
                Method::POST,
                "unplannedFailover",
                json!({"properties": {"failoverDirection": "RecoveryToPrimary"}}),
                "reprotect it first",
            ),
            (
                "UnplannedFailoverCompleted",
                Method::POST,
                "remove",
                json!({}),
                "commit the failover first",
            ),
            (
                "PlannedFailoverCompleted",
                Method::DELETE,
                "",
                Value::Null,
                "commit the failover first",
            ),
            (
                "FailoverCommitted",
                Method::PUT,
                "",
                enable.clone(),
                "ReverseReplicate",
            ),
            (
                "InitialReplicationInProgress",
                Method::POST,
                "plannedFailover",
                json!({"properties": {"providerSpecificDetails": {"sourceStopped": true}}}),
                "wait until initial replication finishes",
            ),
        ];
        for (state, method, action, body, hint) in cases {
            let active = if state.contains("Failover") && state != "Protected" {
                "Recovery"
            } else {
                "Primary"
            };
            exec(&st, &format!("UPDATE protected_items SET state = '{state}', active_location = '{active}' WHERE name = 'i-phys'")).await;
            let jobs = count(&st, "SELECT COUNT(*) FROM jobs").await;
            let rel = if action.is_empty() {
                PHYS.to_string()
            } else {
                format!("{PHYS}/{action}")
            };
            let (code, body, _) = call(&st, method.clone(), &rel, body).await;
            assert_eq!(code, 409, "{state} {method} {action}: {body}");
            let msg = message(&body);
            assert!(msg.contains(hint), "{state} {method} {action}: {msg}");
            assert_eq!(
                count(&st, "SELECT COUNT(*) FROM jobs").await,
                jobs,
                "{state} {action}"
            );
            let (now,): (String,) =
                sqlx::query_as("SELECT state FROM protected_items WHERE name = 'i-phys'")
                    .fetch_one(&st.db)
                    .await
                    .unwrap();
            assert_eq!(now, state, "{action} changed nothing");
        }
    }

    #[test]
    fn the_group_is_read_from_either_sdk_field_for_any_instance_type() {
        let group = |d: Value| requested_group(&json!({"providerSpecificDetails": d}));
        for (details, want) in [
            (json!({"instanceType": "InMageAzureV2"}), None),
            (
                json!({"instanceType": "InMageAzureV2", "multiVmGroupName": null}),
                None,
            ),
            (
                json!({"instanceType": "InMageAzureV2", "multiVmGroupName": "app"}),
                Some("app"),
            ),
            (
                json!({"instanceType": "InMage", "multiVmGroupId": "app", "multiVmGroupName": "APP"}),
                Some("APP"),
            ),
            (
                json!({"instanceType": "HyperVReplicaAzure", "multiVmGroupId": "app"}),
                Some("app"),
            ),
            (
                json!({"instanceType": "SomethingNew", "multiVmGroupName": "db.tier-1"}),
                Some("db.tier-1"),
            ),
        ] {
            assert_eq!(
                group(details.clone()).unwrap().as_deref(),
                want,
                "{details}"
            );
        }
        assert_eq!(requested_group(&json!({})).unwrap(), None);
        for (details, needle) in [
            (
                json!({"multiVmGroupName": "bad name"}),
                "multi-VM group name \"bad name\" is not valid",
            ),
            (
                json!({"multiVmGroupName": ""}),
                "multi-VM group name \"\" is not valid",
            ),
            (json!({"multiVmGroupId": "../x"}), "is not valid"),
            (
                json!({"multiVmGroupName": 42}),
                "multiVmGroupName must be a string",
            ),
            (
                json!({"multiVmGroupId": "a", "multiVmGroupName": "b"}),
                "multiVmGroupId 'a' and multiVmGroupName 'b' differ",
            ),
        ] {
            let e = group(details.clone()).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST, "{details}");
            assert!(e.message.contains(needle), "{details}: {}", e.message);
        }
    }

    /// [`setup`] plus what enabling protection in groups needs: the cloud
    /// pairings pc → rc and pc2 → rc2 (policy `pol`), a second policy
    /// `pol2`, a second source agent `agent-src2` (host h4) in cloud pc,
    /// and unprotected machines m1, m2, m5 (agent-src, pc), m3
    /// (agent-src2, pc) and m4 (agent-src, pc2).
    async fn group_setup(st: &AppState) {
        setup(st).await;
        let now = now_ms();
        exec(st, "INSERT INTO containers (fabric, name, created_ms) VALUES ('primary', 'pc2', 0), ('recovery', 'rc2', 0)").await;
        exec(st, r#"INSERT INTO policies (name, body, created_ms) VALUES ('pol2', '{"instanceType":"InMageAzureV2","copyFrequencySecs":300,"retention":{"kind":"hours","hours":1},"appConsistentFrequencyHours":0,"compression":true,"initialReplicationStart":null}', 0)"#).await;
        exec(st, &format!("INSERT INTO agents (id, fabric, hostname, key_id, cloud, data_url, version, enrolled_ms, last_seen_ms) VALUES ('agent-src2', 'primary', 'h4', 'k', 'pc', NULL, '0', 0, {now})")).await;
        exec(st, "INSERT INTO container_mappings (fabric, container, name, target_fabric, target_container, policy, state, created_ms) VALUES ('primary', 'pc', 'map1', 'recovery', 'rc', 'pol', 'Paired', 0), ('primary', 'pc2', 'map2', 'recovery', 'rc2', 'pol', 'Paired', 0)").await;
        for (m, agent, cloud) in [
            ("m1", "agent-src", "pc"),
            ("m2", "agent-src", "pc"),
            ("m5", "agent-src", "pc"),
            ("m3", "agent-src2", "pc"),
            ("m4", "agent-src", "pc2"),
        ] {
            exec(st, &format!(r#"INSERT INTO machines (fabric, container, name, agent_id, info, updated_ms) VALUES ('primary', '{cloud}', '{m}', '{agent}', '{{"name":"{m}","kind":"PhysicalServer","disks":[]}}', 0)"#)).await;
        }
    }

    fn enable_body(st: &AppState, cloud: &str, machine: &str, details: Value) -> Value {
        json!({"properties": {
            "protectableItemId": format!("{}/replicationProtectableItems/{machine}", model::container_id(&st.info, "primary", cloud)),
            "providerSpecificDetails": details,
        }})
    }

    fn item_rel(cloud: &str, item: &str) -> String {
        format!(
            "replicationFabrics/primary/replicationProtectionContainers/{cloud}/replicationProtectedItems/{item}"
        )
    }

    #[tokio::test]
    async fn a_multi_vm_group_takes_items_of_one_agent_policy_and_pairing_and_refuses_others_writing_nothing()
     {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        group_setup(&st).await;
        let items = "SELECT COUNT(*) FROM protected_items";
        let jobs = "SELECT COUNT(*) FROM jobs";
        assert_eq!((count(&st, items).await, count(&st, jobs).await), (2, 0));

        // Bad group names and fields: 400, nothing written.
        for details in [
            json!({"instanceType": "InMageAzureV2", "multiVmGroupName": "bad name"}),
            json!({"instanceType": "InMageAzureV2", "multiVmGroupName": ""}),
            json!({"instanceType": "InMageAzureV2", "multiVmGroupName": ["app"]}),
            json!({"instanceType": "InMageAzureV2", "multiVmGroupId": "app", "multiVmGroupName": "web"}),
        ] {
            let (code, v, _) = call(
                &st,
                Method::PUT,
                &item_rel("pc", "i1"),
                enable_body(&st, "pc", "m1", details.clone()),
            )
            .await;
            assert_eq!(code, 400, "{details}: {v}");
            assert!(
                message(&v).contains("multiVmGroup") || message(&v).contains("multi-VM group name"),
                "{v}"
            );
        }
        assert_eq!((count(&st, items).await, count(&st, jobs).await), (2, 0));

        // The first item starts the group; the second joins it (by id
        // alone, in other case, under another instanceType) and takes the
        // group's spelling.
        let first = enable_body(
            &st,
            "pc",
            "m1",
            json!({"instanceType": "InMageAzureV2", "multiVmGroupId": "app", "multiVmGroupName": "app"}),
        );
        let (code, v, job1) = call(&st, Method::PUT, &item_rel("pc", "i1"), first.clone()).await;
        assert_eq!(code, 202, "{v}");
        let (code, v, _) = call(
            &st,
            Method::PUT,
            &item_rel("pc", "i2"),
            enable_body(
                &st,
                "pc",
                "m2",
                json!({"instanceType": "HyperVReplicaAzure", "multiVmGroupId": "APP"}),
            ),
        )
        .await;
        assert_eq!(code, 202, "{v}");
        let stored: Vec<(String, Option<String>)> =
            sqlx::query_as("SELECT name, multi_vm_group FROM protected_items ORDER BY name")
                .fetch_all(&st.db)
                .await
                .unwrap();
        let g = |n: &str, g: Option<&str>| (n.to_string(), g.map(str::to_string));
        assert_eq!(
            stored,
            [
                g("i-phys", None),
                g("i-vm", None),
                g("i1", Some("app")),
                g("i2", Some("app"))
            ]
        );

        // A machine on another agent, another policy, another pairing:
        // 409 naming what differs, nothing written.
        let cases = [
            (
                "pc",
                "i3",
                enable_body(
                    &st,
                    "pc",
                    "m3",
                    json!({"instanceType": "InMageAzureV2", "multiVmGroupName": "app"}),
                ),
                vec![
                    "machine 'm3' is on agent agent-src2 (host h4)",
                    "multi-VM group 'app' is replicated by agent agent-src (host h1)",
                    "taken at one instant by one source agent",
                ],
            ),
            (
                "pc2",
                "i4",
                enable_body(
                    &st,
                    "pc2",
                    "m4",
                    json!({"instanceType": "InMageAzureV2", "multiVmGroupName": "app"}),
                ),
                vec![
                    "multi-VM group 'app' replicates cloud primary/pc to recovery/rc",
                    "machine 'm4' is in cloud primary/pc2 paired with recovery/rc2",
                ],
            ),
        ];
        for (cloud, item, body, needles) in cases {
            let (code, v, job) = call(&st, Method::PUT, &item_rel(cloud, item), body).await;
            assert_eq!((code, job), (409, None), "{item}: {v}");
            assert_eq!(v["error"]["code"], "MultiVmGroupConflict", "{v}");
            for n in needles {
                assert!(message(&v).contains(n), "{item}: {n}: {v}");
            }
        }
        // Another policy than the group's: an item takes its pairing's
        // policy, so that is refused before the group is looked at.
        let mut b = enable_body(
            &st,
            "pc",
            "m5",
            json!({"instanceType": "InMageAzureV2", "multiVmGroupName": "app"}),
        );
        b["properties"]["policyId"] = model::policy_id(&st.info, "pol2").into();
        let (code, v, job) = call(&st, Method::PUT, &item_rel("pc", "i5"), b).await;
        assert_eq!((code, job), (400, None), "{v}");
        assert_eq!(v["error"]["code"], "PolicyNotOfPairing", "{v}");
        assert!(
            message(&v).contains("policy 'pol2' is not the policy of cloud primary/pc's pairing, which replicates with policy 'pol'"),
            "{v}"
        );
        assert_eq!((count(&st, items).await, count(&st, jobs).await), (4, 2));

        // The item shows its group as the SDK's replication details do.
        let (_, v, _) = call(&st, Method::GET, &item_rel("pc", "i2"), Value::Null).await;
        let d = &v["properties"]["providerSpecificDetails"];
        assert_eq!(
            (
                &d["multiVmGroupName"],
                &d["multiVmGroupId"],
                &d["multiVmSyncStatus"]
            ),
            (&json!("app"), &json!("app"), &json!("Enabled")),
            "{v}"
        );
        let (_, v, _) = call(&st, Method::GET, PHYS, Value::Null).await;
        let d = &v["properties"]["providerSpecificDetails"];
        assert_eq!(
            (&d["multiVmGroupName"], &d["multiVmSyncStatus"]),
            (&Value::Null, &json!("Disabled"))
        );

        // A retried PUT answers with its job; another group for the same
        // item is refused.
        let (code, _, again) = call(&st, Method::PUT, &item_rel("pc", "i1"), first).await;
        assert_eq!((code, &again), (202, &job1));
        for details in [
            json!({"instanceType": "InMageAzureV2", "multiVmGroupName": "other"}),
            json!({"instanceType": "InMageAzureV2"}),
        ] {
            let (code, v, _) = call(
                &st,
                Method::PUT,
                &item_rel("pc", "i1"),
                enable_body(&st, "pc", "m1", details),
            )
            .await;
            assert_eq!(code, 409, "{v}");
            assert!(
                message(&v).contains("exists in multi-VM group 'app'")
                    && message(&v).contains("not supported"),
                "{v}"
            );
        }
        assert_eq!((count(&st, items).await, count(&st, jobs).await), (4, 2));

        // Another agent's machine starts a group of its own.
        let (code, v, _) = call(
            &st,
            Method::PUT,
            &item_rel("pc", "i3"),
            enable_body(
                &st,
                "pc",
                "m3",
                json!({"instanceType": "InMageAzureV2", "multiVmGroupName": "app2"}),
            ),
        )
        .await;
        assert_eq!(code, 202, "{v}");
        // Membership is the item's own row: once the group's items are gone
        // (protection disabled), the name is free for any agent's machines.
        exec(
            &st,
            "DELETE FROM protected_items WHERE multi_vm_group = 'app'",
        )
        .await;
        let (code, v, _) = call(
            &st,
            Method::PUT,
            &item_rel("pc", "i6"),
            enable_body(
                &st,
                "pc",
                "m5",
                json!({"instanceType": "InMageAzureV2", "multiVmGroupName": "app"}),
            ),
        )
        .await;
        assert_eq!(code, 202, "{v}");
    }

    // ----- events and alert settings -----

    /// Bad alert settings are refused (400, 404) naming the field and
    /// write nothing; good ones are read back; an empty webhook removes it.
    #[tokio::test]
    async fn alert_settings_refuse_bad_webhooks_and_addresses_and_write_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        let rel = "replicationAlertSettings/defaultAlertSetting";
        for (body, code, needle) in [
            (
                serde_json::json!({"properties": {"webhookUrl": "ftp://h/x"}}),
                400,
                "scheme 'ftp'",
            ),
            (
                serde_json::json!({"properties": {"webhookUrl": "not a url"}}),
                400,
                "is not a URL",
            ),
            (
                serde_json::json!({"properties": {"customEmailAddresses": ["ops"]}}),
                400,
                "'ops' is not an email",
            ),
            (
                serde_json::json!({"properties": {"sendToOwners": "Maybe"}}),
                400,
                "Send or DoNotSend",
            ),
            (
                serde_json::json!({"properties": {"webhookUrl": 7}}),
                400,
                "ConfigureAlertRequest",
            ),
        ] {
            let (status, v, _) = call(&st, Method::PUT, rel, body.clone()).await;
            assert_eq!(status, code, "{body}: {v}");
            assert!(message(&v).contains(needle), "{body}: {v}");
        }
        let (status, v, _) = call(
            &st,
            Method::PUT,
            "replicationAlertSettings/other",
            serde_json::json!({"properties": {}}),
        )
        .await;
        assert_eq!(status, 404, "{v}");
        assert!(message(&v).contains("defaultAlertSetting"), "{v}");
        assert_eq!(count(&st, "SELECT COUNT(*) FROM alert_settings").await, 0);
        // Unset, the defaults are shown.
        let (status, v, _) = call(&st, Method::GET, rel, Value::Null).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["properties"]["sendToOwners"], "DoNotSend");

        let (status, v, _) = call(
            &st,
            Method::PUT,
            rel,
            serde_json::json!({"properties": {"sendToOwners": "send", "customEmailAddresses": ["ops@example.com"], "webhookUrl": "https://alerts.example.com/h"}}),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let (_, v, _) = call(&st, Method::GET, "replicationAlertSettings", Value::Null).await;
        let p = &v["value"][0]["properties"];
        assert_eq!(p["sendToOwners"], "Send");
        assert_eq!(p["customEmailAddresses"][0], "ops@example.com");
        assert_eq!(p["webhookUrl"], "https://alerts.example.com/h");
        // Only what is given changes; "" removes the webhook.
        call(
            &st,
            Method::PUT,
            rel,
            serde_json::json!({"properties": {"webhookUrl": ""}}),
        )
        .await;
        let (_, v, _) = call(&st, Method::GET, rel, Value::Null).await;
        assert!(v["properties"]["webhookUrl"].is_null(), "{v}");
        assert_eq!(
            v["properties"]["customEmailAddresses"][0],
            "ops@example.com"
        );
    }

    /// Events are listed by `$filter` and got by name; a filter the
    /// vault cannot read is a 400.
    #[tokio::test]
    async fn events_are_listed_by_filter_and_a_bad_filter_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        let mut tx = crate::db::begin(&st.db).await.unwrap();
        for (sev, code, item) in [
            (
                siterec_core::events::Severity::Warning,
                "RpoThresholdExceeded",
                "i-vm",
            ),
            (
                siterec_core::events::Severity::Warning,
                "RpoThresholdExceeded",
                "i-phys",
            ),
            (
                siterec_core::events::Severity::Info,
                "RpoWithinThreshold",
                "i-vm",
            ),
        ] {
            let e = siterec_core::events::NewEvent {
                severity: sev,
                code,
                kind: "ProtectedItem",
                name: item.into(),
                correlation: item.into(),
                fabric: Some("primary".into()),
                summary: format!("{code} {item}"),
                details: serde_json::json!({}),
            };
            events_db::insert(&mut tx, &e, now_ms()).await.unwrap();
        }
        tx.commit().await.unwrap();
        let (status, v, _) = call_uri(
            &st,
            Method::GET,
            &format!("{}/replicationEvents?api-version={API_VERSION}&%24filter=Severity%20eq%20%27Warning%27%20and%20AffectedObjectFriendlyName%20eq%20%27i-vm%27", st.info.id()),
            Value::Null,
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let list = v["value"].as_array().unwrap();
        assert_eq!(list.len(), 1, "{v}");
        assert_eq!(list[0]["properties"]["eventCode"], "RpoThresholdExceeded");
        let name = list[0]["name"].as_str().unwrap();
        let (status, one, _) = call(
            &st,
            Method::GET,
            &format!("replicationEvents/{name}"),
            Value::Null,
        )
        .await;
        assert_eq!(status, 200);
        assert_eq!(one, list[0]);
        let (status, v, _) = call(&st, Method::GET, "replicationEvents/nope", Value::Null).await;
        assert_eq!(status, 404, "{v}");
        let (status, v, _) = call_uri(
            &st,
            Method::GET,
            &format!(
                "{}/replicationEvents?api-version={API_VERSION}&$filter=Colour%20eq%20'red'",
                st.info.id()
            ),
            Value::Null,
        )
        .await;
        assert_eq!(status, 400, "{v}");
        assert_eq!(v["error"]["code"], "InvalidFilter");
        assert!(message(&v).contains("'Colour' is not a field"), "{v}");
    }

    /// Disabling protection honours the policy's replicaDeletion: the
    /// job's RemoveReplicaData step deletes the replica only when it is
    /// Required.
    #[tokio::test]
    async fn disable_protection_deletes_the_replica_only_when_the_policy_requires_it() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        setup(&st).await;
        exec(&st, r#"INSERT INTO policies (name, body, created_ms) VALUES ('del', '{"instanceType":"HyperVReplicaAzure","copyFrequencySecs":30,"retention":{"kind":"hours","hours":1},"appConsistentFrequencyHours":0,"compression":true,"replicaDeletion":true,"initialReplicationStart":null}', 0)"#).await;
        exec(
            &st,
            "UPDATE protected_items SET policy = 'del' WHERE name = 'i-vm'",
        )
        .await;
        for (item, deletes) in [("i-phys", false), ("i-vm", true)] {
            let (status, v, job) = call(
                &st,
                Method::DELETE,
                &format!("replicationFabrics/primary/replicationProtectionContainers/pc/replicationProtectedItems/{item}"),
                Value::Null,
            )
            .await;
            assert_eq!(status, 202, "{item}: {v}");
            let input: String = sqlx::query_scalar("SELECT input FROM jobs WHERE id = $1")
                .bind(job.unwrap())
                .fetch_one(&st.db)
                .await
                .unwrap();
            match JobInput::parse(JobKind::DisableProtection, &input).unwrap() {
                JobInput::DisableProtection(d) => assert_eq!(d.delete_replica, deletes, "{item}"),
                other => panic!("{other:?}"),
            }
        }
    }

    // ----- taking things apart; jobs filtered and exported -----

    const PAIRING: &str = "replicationFabrics/primary/replicationProtectionContainers/pc/replicationProtectionContainerMappings/map1";

    async fn pair(st: &AppState) {
        exec(st, "INSERT INTO container_mappings (fabric, container, name, target_fabric, target_container, policy, state, created_ms) VALUES ('primary', 'pc', 'map1', 'recovery', 'rc', 'pol', 'Paired', 0)").await;
    }

    /// (status, body as text, content type): for answers that are not JSON.
    async fn call_raw(st: &Shared, uri: &str) -> (u16, String, String) {
        let uri: Uri = uri.parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert("authorization", HeaderValue::from_static("Bearer tok"));
        let resp = match handle(st, &Method::GET, &uri, &h, &Bytes::new()).await {
            Ok(r) => r,
            Err(e) => e.into_response(),
        };
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, String::from_utf8(bytes.to_vec()).unwrap(), ct)
    }

    /// A pairing that protects items is refused naming them, and nothing
    /// changes; without items its removal is a job (Unpairing, then gone),
    /// a retried delete answers with that job, and the clouds pair again.
    #[tokio::test]
    async fn a_pairing_with_items_is_refused_naming_them_and_one_without_is_removed_by_a_job() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        setup(&st).await;
        pair(&st).await;
        let (code, v, job) = call(&st, Method::DELETE, PAIRING, Value::Null).await;
        assert_eq!(
            (code, v["error"]["code"].as_str()),
            (409, Some("PairingInUse")),
            "{v}"
        );
        assert!(message(&v).contains("i-phys, i-vm"), "{v}");
        assert!(message(&v).contains("siterec item disable"), "{v}");
        assert!(job.is_none());
        assert_eq!(count(&st, "SELECT COUNT(*) FROM jobs").await, 0);
        assert_eq!(
            count(
                &st,
                "SELECT COUNT(*) FROM container_mappings WHERE state = 'Paired'"
            )
            .await,
            1
        );
        // The policy is in use too, by the pairing and the items.
        let (code, v, _) = call(&st, Method::DELETE, "replicationPolicies/pol", Value::Null).await;
        assert_eq!(code, 409);
        assert!(
            message(&v).contains("pairing map1, protected item i-phys, protected item i-vm"),
            "{v}"
        );

        exec(
            &st,
            "DELETE FROM recovery_points; DELETE FROM protected_items",
        )
        .await;
        let (code, v, job) = call(
            &st,
            Method::POST,
            &format!("{PAIRING}/remove"),
            json!({"properties": {}}),
        )
        .await;
        assert_eq!(code, 202, "{v}");
        let job = job.unwrap();
        assert_eq!(
            count(
                &st,
                "SELECT COUNT(*) FROM container_mappings WHERE state = 'Unpairing'"
            )
            .await,
            1
        );
        // No item can be enabled under a pairing being removed.
        assert!(
            config::paired_target(&st.db, "primary", "pc")
                .await
                .unwrap()
                .is_none()
        );
        let (code, _, again) = call(&st, Method::DELETE, PAIRING, Value::Null).await;
        assert_eq!((code, again.as_deref()), (202, Some(job.as_str())));
        crate::jobs::advance(&st, &job).await.unwrap();
        let (_, v, _) = call(
            &st,
            Method::GET,
            &format!("replicationJobs/{job}"),
            Value::Null,
        )
        .await;
        assert_eq!(v["properties"]["state"], "Succeeded", "{v}");
        assert_eq!(v["properties"]["scenarioName"], "UnconfigureProtection");
        assert_eq!(
            count(&st, "SELECT COUNT(*) FROM container_mappings").await,
            0
        );
        let (code, _, _) = call(&st, Method::DELETE, PAIRING, Value::Null).await;
        assert_eq!(code, 204);
        // Built again: the clouds pair as before.
        let body = json!({"properties": {
            "targetProtectionContainerId": model::container_id(&st.info, "recovery", "rc"),
            "policyId": model::policy_id(&st.info, "pol"),
            "providerSpecificInput": {"instanceType": "ReplicationProviderSpecificContainerMappingInput"},
        }});
        let (code, v, job) = call(&st, Method::PUT, PAIRING, body).await;
        assert_eq!(code, 202, "{v}");
        crate::jobs::advance(&st, &job.unwrap()).await.unwrap();
        assert_eq!(
            count(
                &st,
                "SELECT COUNT(*) FROM container_mappings WHERE state = 'Paired'"
            )
            .await,
            1
        );
        // Now the policy goes only once the pairing has.
        let (code, _, job) = call(&st, Method::DELETE, PAIRING, Value::Null).await;
        assert_eq!(code, 202);
        crate::jobs::advance(&st, &job.unwrap()).await.unwrap();
        let (code, _, _) = call(&st, Method::DELETE, "replicationPolicies/pol", Value::Null).await;
        assert_eq!(code, 204);
    }

    /// An agent that a protected item needs (its machine's or its
    /// replica's) is not unregistered, the items named; an unused one is
    /// forgotten with what it reported, and its certificate is refused.
    #[tokio::test]
    async fn an_agent_in_use_is_not_unregistered_and_an_unused_one_is_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        setup(&st).await;
        let provider = |f: &str, a: &str| {
            format!("replicationFabrics/{f}/replicationRecoveryServicesProviders/{a}")
        };
        for (f, a) in [("recovery", "agent-tgt"), ("primary", "agent-src")] {
            let (code, v, _) = call(&st, Method::DELETE, &provider(f, a), Value::Null).await;
            assert_eq!(
                (code, v["error"]["code"].as_str()),
                (409, Some("AgentInUse")),
                "{v}"
            );
            assert!(message(&v).contains("i-phys, i-vm"), "{v}");
        }
        assert_eq!(count(&st, "SELECT COUNT(*) FROM agents").await, 3);
        assert_eq!(count(&st, "SELECT COUNT(*) FROM machines").await, 2);

        let (code, v, _) = call(
            &st,
            Method::POST,
            &format!("{}/remove", provider("recovery", "agent-tgt2")),
            Value::Null,
        )
        .await;
        assert_eq!(code, 204, "{v}");
        assert_eq!(
            count(&st, "SELECT COUNT(*) FROM agents WHERE id = 'agent-tgt2'").await,
            0
        );
        assert_eq!(
            count(
                &st,
                "SELECT COUNT(*) FROM networks WHERE agent_id = 'agent-tgt2'"
            )
            .await,
            0
        );
        // Retried: already gone.
        let (code, _, _) = call(
            &st,
            Method::DELETE,
            &provider("recovery", "agent-tgt2"),
            Value::Null,
        )
        .await;
        assert_eq!(code, 204);
        // An agent of another fabric is not this fabric's to remove.
        let (code, _, _) = call(
            &st,
            Method::DELETE,
            &provider("recovery", "agent-src"),
            Value::Null,
        )
        .await;
        assert_eq!(code, 204);
        assert_eq!(
            count(&st, "SELECT COUNT(*) FROM agents WHERE id = 'agent-src'").await,
            1
        );

        exec(
            &st,
            "DELETE FROM recovery_points; DELETE FROM protected_items",
        )
        .await;
        let (code, _, _) = call(
            &st,
            Method::DELETE,
            &provider("primary", "agent-src"),
            Value::Null,
        )
        .await;
        assert_eq!(code, 204);
        assert_eq!(count(&st, "SELECT COUNT(*) FROM machines").await, 0);
        let (_, v, _) = call(
            &st,
            Method::GET,
            "replicationFabrics/primary/replicationRecoveryServicesProviders",
            Value::Null,
        )
        .await;
        assert_eq!(v["value"], json!([]));
        let e =
            crate::agent_api::agent_of(&st, &siterec_pki::PeerIdentity(Some("agent-src".into())))
                .await
                .unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.code),
            (401, siterec_core::wire::AGENT_NOT_REGISTERED)
        );
    }

    /// A fabric in use is not deleted, and what uses it is named; an
    /// unused one goes with its clouds and keys, and can be made again.
    #[tokio::test]
    async fn a_fabric_in_use_is_not_deleted_and_an_unused_one_is_and_comes_back() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        setup(&st).await;
        pair(&st).await;
        let (code, v, _) = call(
            &st,
            Method::DELETE,
            "replicationFabrics/recovery",
            Value::Null,
        )
        .await;
        assert_eq!(
            (code, v["error"]["code"].as_str()),
            (409, Some("FabricInUse")),
            "{v}"
        );
        for named in [
            "agents agent-tgt, agent-tgt2",
            "cloud pairings map1",
            "protected items i-phys, i-vm",
        ] {
            assert!(message(&v).contains(named), "{named}: {v}");
        }
        assert_eq!(count(&st, "SELECT COUNT(*) FROM fabrics").await, 2);

        exec(&st, "INSERT INTO fabrics (name, created_ms) VALUES ('Spare', 0); INSERT INTO containers (fabric, name, created_ms) VALUES ('Spare', 'sc', 0); INSERT INTO registration_keys (key_id, fabric, secret_hash, created_ms, expires_ms) VALUES ('k-spare', 'Spare', 'x', 0, 9999999999999)").await;
        let (code, v, _) = call(
            &st,
            Method::POST,
            "replicationFabrics/spare/remove",
            Value::Null,
        )
        .await;
        assert_eq!(code, 204, "{v}");
        assert_eq!(count(&st, "SELECT COUNT(*) FROM fabrics").await, 2);
        assert_eq!(
            count(
                &st,
                "SELECT COUNT(*) FROM containers WHERE fabric = 'Spare'"
            )
            .await,
            0
        );
        assert_eq!(
            count(
                &st,
                "SELECT COUNT(*) FROM registration_keys WHERE revoked_ms IS NOT NULL"
            )
            .await,
            1
        );
        let (code, _, _) = call(&st, Method::GET, "replicationFabrics/spare", Value::Null).await;
        assert_eq!(code, 404);
        let (code, _, _) = call(&st, Method::DELETE, "replicationFabrics/spare", Value::Null).await;
        assert_eq!(code, 204);
        let (code, v, _) = call(&st, Method::PUT, "replicationFabrics/spare", json!({})).await;
        assert_eq!((code, v["name"].as_str()), (200, Some("spare")), "{v}");
    }

    async fn some_jobs(st: &AppState) {
        // 2026-12-01T00:00:00Z = 1796083200000.
        exec(st, r#"INSERT INTO jobs (id, kind, state, target_type, target_name, target_id, input, created_ms, start_ms, end_ms, error_code, error_message, seq) VALUES
            ('j-old', 'EnableDr', 'Failed', 'ProtectionEntity', 'i-vm', '/x/replicationFabrics/primary/replicationProtectionContainers/pc/replicationProtectedItems/i-vm', '{"item":"i-vm"}', 1796083100000, 1796083100000, 1796083100001, 'E', 'old, failed', 1),
            ('j-fail', 'UnplannedFailover', 'Failed', 'ProtectionEntity', 'i-phys', '/x/replicationFabrics/primary/replicationProtectionContainers/pc/replicationProtectedItems/i-phys', '{}', 1796083300000, 1796083300000, 1796083300001, 'MaterializeFailed', 'disk "d0": =gone', 2),
            ('j-ok', 'UnplannedFailover', 'Succeeded', 'ProtectionEntity', 'i-vm', '/x/replicationFabrics/primary/replicationProtectionContainers/pc/replicationProtectedItems/i-vm', '{}', 1796083400000, 1796083400000, 1796083400001, NULL, NULL, 3)"#).await;
    }

    fn names(v: &Value) -> Vec<&str> {
        v["value"]
            .as_array()
            .unwrap()
            .iter()
            .map(|j| j["name"].as_str().unwrap())
            .collect()
    }

    /// `$filter` as the SDK sends it (URL-encoded) picks the jobs it says;
    /// a bad clause is 400 naming it.
    #[tokio::test]
    async fn jobs_are_listed_by_filter_and_a_bad_clause_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        some_jobs(&st).await;
        let list = |filter: &str| {
            format!(
                "{}/replicationJobs?api-version={API_VERSION}&%24filter={}",
                st.info.id(),
                filter.replace(' ', "%20").replace('\'', "%27")
            )
        };
        let (code, v, _) = call_uri(&st, Method::GET, &list("startTime%20eq%20%272026-12-01T00%3A00%3A00Z%27%20and%20jobStatus%20eq%20%27Failed%27"), Value::Null).await;
        assert_eq!(code, 200, "{v}");
        assert_eq!(names(&v), ["j-fail"]);
        let (_, v, _) = call_uri(
            &st,
            Method::GET,
            &list("targetObjectName+eq+'i-vm'"),
            Value::Null,
        )
        .await;
        assert_eq!(names(&v), ["j-ok", "j-old"]);
        let (_, v, _) = call_uri(
            &st,
            Method::GET,
            &list("jobName eq 'UnplannedFailover' and fabricId eq 'primary'"),
            Value::Null,
        )
        .await;
        assert_eq!(names(&v), ["j-ok", "j-fail"]);
        let (_, v, _) = call(&st, Method::GET, "replicationJobs", Value::Null).await;
        assert_eq!(names(&v), ["j-ok", "j-fail", "j-old"]);
        let (code, v, _) = call_uri(
            &st,
            Method::GET,
            &list("jobStatus%20eq%20%27Failed%27%20and%20colour%20eq%20%27red%27"),
            Value::Null,
        )
        .await;
        assert_eq!(
            (code, v["error"]["code"].as_str()),
            (400, Some("InvalidJobQuery")),
            "{v}"
        );
        assert!(message(&v).contains("\"colour eq 'red'\""), "{v}");
    }

    /// An export is a job whose result says where its CSV is; the vault
    /// serves that CSV, the jobs the query named in it. A bad query is 400
    /// and no job.
    #[tokio::test]
    async fn an_export_is_a_job_whose_csv_the_vault_serves() {
        let dir = tempfile::tempdir().unwrap();
        let st = open(dir.path()).await;
        some_jobs(&st).await;
        let (code, v, _) = call(
            &st,
            Method::POST,
            "replicationJobs/export",
            json!({"jobStatus": "Failed", "jobOutputType": "Xml"}),
        )
        .await;
        assert_eq!(
            (code, v["error"]["code"].as_str()),
            (400, Some("InvalidJobQuery")),
            "{v}"
        );
        assert!(message(&v).contains("jobOutputType"), "{v}");
        assert_eq!(count(&st, "SELECT COUNT(*) FROM jobs").await, 3);

        let (code, v, job) = call(
            &st,
            Method::POST,
            "replicationJobs/export",
            json!({"jobStatus": "Failed", "jobOutputType": "Excel"}),
        )
        .await;
        assert_eq!(code, 202, "{v}");
        let job = job.unwrap();
        crate::jobs::advance(&st, &job).await.unwrap();
        let (code, v, _) = call(
            &st,
            Method::GET,
            &format!("operationresults/{job}"),
            Value::Null,
        )
        .await;
        assert_eq!(code, 200, "{v}");
        let d = &v["properties"]["customDetails"];
        assert_eq!(d["instanceType"], "ExportJobDetails", "{v}");
        assert_eq!(d["output"]["rows"], 2);
        assert_eq!(d["sasToken"], format!("?api-version={API_VERSION}"));
        let uri = d["blobUri"].as_str().unwrap();
        let path = uri.strip_prefix("http://vault.test").unwrap();
        assert_eq!(
            path,
            format!("{}/replicationJobs/{job}/siterecExport", st.info.id())
        );
        let (code, csv, ct) = call_raw(&st, &format!("{path}?api-version={API_VERSION}")).await;
        assert_eq!(code, 200, "{csv}");
        assert!(ct.starts_with("text/csv"), "{ct}");
        let lines: Vec<&str> = csv.split("\r\n").filter(|l| !l.is_empty()).collect();
        assert_eq!(lines[0], siterec_core::jobquery::CSV_HEADER.join(","));
        assert_eq!(lines.len(), 3, "{csv}");
        assert!(
            lines[1].starts_with("j-fail,UnplannedFailover,Unplanned failover,Failed,i-phys,"),
            "{}",
            lines[1]
        );
        assert!(
            lines[1].ends_with(",MaterializeFailed,\"disk \"\"d0\"\": =gone\""),
            "{}",
            lines[1]
        );
        assert!(lines[2].starts_with("j-old,EnableDr,"), "{}", lines[2]);
        // Another job has no CSV.
        let (code, _, _) = call_raw(
            &st,
            &format!(
                "{}/replicationJobs/j-ok/siterecExport?api-version={API_VERSION}",
                st.info.id()
            ),
        )
        .await;
        assert_eq!(code, 400);
    }
}
