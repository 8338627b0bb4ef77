//! Recovery plans in the ARM API (`replicationRecoveryPlans`): create,
//! read, update, delete, and the operations a plan runs over its machines
//! as one job; the job actions an operator takes on a plan's job
//! (`resume`, `restart`, `cancel`); and [`start_plan_item`], through which
//! a plan's job starts each machine's operation with exactly the checks a
//! request for that machine would get.

use std::future::Future;
use std::pin::Pin;

use super::*;
use crate::jobs::StartRefused;
use crate::persist::plans::{self, PlanRow};
use siterec_core::orchestration::PlanInput;
use siterec_core::plan::{
    ActionKind, DEFAULT_SCRIPT_TIMEOUT_SECS, PlanAction, PlanGroup, PlanOp, RecoveryPlan,
    item_refusal,
};

fn plan_id(v: &crate::VaultInfo, name: &str) -> String {
    format!("{}/replicationRecoveryPlans/{name}", v.id())
}

/// A fabric id or a bare fabric name, that exists.
async fn fabric_ref(st: &AppState, field: &'static str, id: &str) -> ApiResult<String> {
    let name = if id.contains('/') {
        parse_ref(st, field, id, ResourceKind::Fabric)?.remove(0)
    } else {
        id.to_string()
    };
    model::fabric_exists(&st.db, &name).await
}

/// Seconds, or an ISO 8601 duration of hours, minutes and seconds (PT10M).
fn timeout_secs(field: &str, v: Option<&str>) -> ApiResult<u32> {
    let Some(v) = v.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_SCRIPT_TIMEOUT_SECS);
    };
    let bad = || {
        ApiError::bad_request(format!(
            "{field} '{v}' is not a timeout: give seconds (600) or an ISO 8601 duration (PT10M)"
        ))
    };
    if let Ok(n) = v.parse::<u32>() {
        return Ok(n);
    }
    let rest = v
        .strip_prefix("PT")
        .or_else(|| v.strip_prefix("pt"))
        .ok_or_else(bad)?;
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in rest.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: u64 = num.parse().map_err(|_| bad())?;
        num.clear();
        total += n * match c.to_ascii_uppercase() {
            'H' => 3600,
            'M' => 60,
            'S' => 1,
            _ => return Err(bad()),
        };
    }
    if !num.is_empty() {
        return Err(bad());
    }
    u32::try_from(total).map_err(|_| bad())
}

fn action_from_api(g: usize, a: &api::RecoveryPlanAction) -> ApiResult<PlanAction> {
    let field = |what: &str| format!("group {} action '{}': {what}", g + 1, a.action_name);
    let mut operations = Vec::new();
    for t in &a.failover_types {
        operations.push(PlanOp::parse(t).ok_or_else(|| {
            ApiError::bad_request(field(&format!(
                "failoverTypes has '{t}'; use TestFailover, TestFailoverCleanup, PlannedFailover, UnplannedFailover, Commit or ReverseReplicate"
            )))
        })?);
    }
    let mut directions = Vec::new();
    for d in &a.failover_directions {
        directions.push(if d.eq_ignore_ascii_case("PrimaryToRecovery") {
            Location::Recovery
        } else if d.eq_ignore_ascii_case("RecoveryToPrimary") {
            Location::Primary
        } else {
            return Err(ApiError::bad_request(field(&format!(
                "failoverDirections has '{d}'; use PrimaryToRecovery or RecoveryToPrimary"
            ))));
        });
    }
    let d = &a.custom_details;
    let kind = if d.instance_type.eq_ignore_ascii_case("ScriptActionDetails") {
        let path = d
            .path
            .clone()
            .ok_or_else(|| ApiError::bad_request(field("a ScriptActionDetails needs a path")))?;
        ActionKind::Script {
            path,
            timeout_secs: timeout_secs(&field("timeout"), d.timeout.as_deref())?,
        }
    } else if d.instance_type.eq_ignore_ascii_case("ManualActionDetails") {
        ActionKind::Manual {
            instructions: d.description.clone().unwrap_or_default(),
        }
    } else {
        return Err(ApiError::bad_request(field(&format!(
            "customDetails.instanceType '{}' is not supported: use ScriptActionDetails (a script of the agent's scripts directory) or ManualActionDetails",
            d.instance_type
        ))));
    };
    Ok(PlanAction {
        name: a.action_name.clone(),
        kind,
        operations,
        directions,
    })
}

fn action_to_api(a: &PlanAction) -> api::RecoveryPlanAction {
    let custom_details = match &a.kind {
        ActionKind::Script { path, timeout_secs } => api::ActionDetails {
            instance_type: "ScriptActionDetails".into(),
            path: Some(path.clone()),
            timeout: Some(timeout_secs.to_string()),
            fabric_location: Some("Recovery".into()),
            description: None,
        },
        ActionKind::Manual { instructions } => api::ActionDetails {
            instance_type: "ManualActionDetails".into(),
            path: None,
            timeout: None,
            fabric_location: None,
            description: Some(instructions.clone()),
        },
    };
    api::RecoveryPlanAction {
        action_name: a.name.clone(),
        failover_types: a
            .operations
            .iter()
            .map(|o| o.as_str().to_string())
            .collect(),
        failover_directions: a
            .directions
            .iter()
            .map(|to| to.other().failover_direction().to_string())
            .collect(),
        custom_details,
    }
}

/// The plan a create or update body describes, checked: its fabrics and
/// items exist, every item replicates from the primary fabric to the
/// recovery fabric, and the plan's shape is valid.
async fn plan_from_api(
    st: &AppState,
    primary: String,
    recovery: String,
    groups: &[api::RecoveryPlanGroup],
) -> ApiResult<RecoveryPlan> {
    let mut out = Vec::new();
    for g in groups {
        let boot = g.group_type.eq_ignore_ascii_case("Boot");
        if !boot {
            if !g.group_type.eq_ignore_ascii_case("Shutdown")
                && !g.group_type.eq_ignore_ascii_case("Failover")
            {
                return Err(ApiError::bad_request(format!(
                    "groupType '{}' is not a group type: use Boot (Group 1, 2, ...), or Shutdown and Failover",
                    g.group_type
                )));
            }
            if !g.replication_protected_items.is_empty()
                || !g.start_group_actions.is_empty()
                || !g.end_group_actions.is_empty()
            {
                return Err(ApiError::bad_request(format!(
                    "the {} group holds machines or actions; siterec runs machines and actions in Boot groups only: move them to a Boot group",
                    g.group_type
                )));
            }
            continue;
        }
        let idx = out.len();
        let mut items = Vec::new();
        for r in &g.replication_protected_items {
            let name = if r.id.contains('/') {
                parse_ref(
                    st,
                    "groups[].replicationProtectedItems[].id",
                    &r.id,
                    ResourceKind::ProtectedItem,
                )?
                .remove(2)
            } else {
                r.id.clone()
            };
            let item = items::load(&st.db, &name)
                .await?
                .ok_or_else(|| ApiError::not_found("protected item", &name))?;
            if !item.fabric.eq_ignore_ascii_case(&primary)
                || !item.target_fabric.eq_ignore_ascii_case(&recovery)
            {
                return Err(ApiError::bad_request(format!(
                    "item '{}' replicates from fabric '{}' to '{}', not from '{primary}' to '{recovery}': a plan's machines share their fabrics; make another plan for it",
                    item.name, item.fabric, item.target_fabric
                )));
            }
            items.push(item.name);
        }
        let pre = g
            .start_group_actions
            .iter()
            .map(|a| action_from_api(idx, a))
            .collect::<ApiResult<Vec<_>>>()?;
        let post = g
            .end_group_actions
            .iter()
            .map(|a| action_from_api(idx, a))
            .collect::<ApiResult<Vec<_>>>()?;
        out.push(PlanGroup { items, pre, post });
    }
    let plan = RecoveryPlan {
        primary_fabric: primary,
        recovery_fabric: recovery,
        groups: out,
    };
    plan.validate().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidRecoveryPlan",
            e.to_string(),
        )
    })?;
    Ok(plan)
}

async fn plan_json(
    st: &AppState,
    row: &PlanRow,
) -> ApiResult<api::Resource<api::RecoveryPlanProperties>> {
    let v = &st.info;
    let mut lives = Vec::new();
    let mut groups = vec![
        api::RecoveryPlanGroup {
            group_type: "Shutdown".into(),
            replication_protected_items: vec![],
            start_group_actions: vec![],
            end_group_actions: vec![],
        },
        api::RecoveryPlanGroup {
            group_type: "Failover".into(),
            replication_protected_items: vec![],
            start_group_actions: vec![],
            end_group_actions: vec![],
        },
    ];
    let mut missing = false;
    for g in &row.plan.groups {
        let mut refs = Vec::new();
        for name in &g.items {
            match items::load(&st.db, name).await? {
                Some(item) => {
                    lives.push((item.life(), item.test_state));
                    refs.push(api::PlanItemRef {
                        id: model::item_id(v, &item.fabric, &item.container, &item.name),
                        virtual_machine_id: Some(item.machine.clone()),
                    });
                }
                None => {
                    missing = true;
                    refs.push(api::PlanItemRef {
                        id: name.clone(),
                        virtual_machine_id: None,
                    });
                }
            }
        }
        groups.push(api::RecoveryPlanGroup {
            group_type: "Boot".into(),
            replication_protected_items: refs,
            start_group_actions: g.pre.iter().map(action_to_api).collect(),
            end_group_actions: g.post.iter().map(action_to_api).collect(),
        });
    }
    let allowed = if missing {
        vec![]
    } else {
        siterec_core::plan::allowed_plan_operations(&lives)
            .into_iter()
            .map(str::to_string)
            .collect()
    };
    let mut tx = crate::db::begin_read(&st.db).await?;
    let running = plans::running_job(&mut tx, &row.name).await?;
    drop(tx);
    let (current_scenario, status, description) = match running {
        Some(job) => {
            let view = jobs_db::view(&st.db, &job).await?;
            let (kind, state, start) = view
                .map(|j| (j.kind, j.state, j.start_ms))
                .unwrap_or_default();
            (
                Some(api::CurrentScenario {
                    scenario_name: kind,
                    job_id: model::job_id(v, &job),
                    start_time: start.map(crate::db::rfc3339),
                }),
                Some(state.clone()),
                Some(if state == "Suspended" {
                    format!("waiting for an operator: siterec plan resume {job}")
                } else {
                    format!("job {job} runs")
                }),
            )
        }
        None => (None, None, None),
    };
    Ok(api::Resource::new(
        plan_id(v, &row.name),
        &row.name,
        api::types::RECOVERY_PLAN,
        api::RecoveryPlanProperties {
            friendly_name: row.name.clone(),
            primary_fabric_id: model::fabric_id(v, &row.plan.primary_fabric),
            primary_fabric_friendly_name: row.plan.primary_fabric.clone(),
            recovery_fabric_id: model::fabric_id(v, &row.plan.recovery_fabric),
            recovery_fabric_friendly_name: row.plan.recovery_fabric.clone(),
            failover_deployment_model: "NotApplicable".into(),
            replication_providers: vec!["Siterec".into()],
            allowed_operations: allowed,
            last_planned_failover_time: row.last_planned_failover_ms.map(crate::db::rfc3339),
            last_unplanned_failover_time: row.last_unplanned_failover_ms.map(crate::db::rfc3339),
            last_test_failover_time: row.last_test_failover_ms.map(crate::db::rfc3339),
            current_scenario,
            current_scenario_status: status,
            current_scenario_status_description: description,
            groups,
        },
    ))
}

fn read_input<T: serde::de::DeserializeOwned>(body: &Bytes, what: &str) -> ApiResult<T> {
    let v = body_json(body)?;
    let p = v
        .get("properties")
        .cloned()
        .ok_or_else(|| ApiError::bad_request(format!("{what}: the body needs 'properties'")))?;
    serde_json::from_value(p)
        .map_err(|e| ApiError::bad_request(format!("{what}: properties do not read: {e}")))
}

/// The routes of this module, or `None` for a path that is not theirs.
pub(super) async fn route(
    st: &Shared,
    method: &Method,
    headers: &HeaderMap,
    l: &[&str],
    r: &[&str],
    body: &Bytes,
) -> Option<ApiResult<Response>> {
    let m = method.clone();
    let answer = match (m, l) {
        (Method::GET, ["replicationrecoveryplans"]) => list_plans(st).await,
        (Method::GET, ["replicationrecoveryplans", _]) => get_plan(st, r[1]).await,
        (Method::PUT, ["replicationrecoveryplans", _]) => put_plan(st, r[1], body).await,
        (Method::PATCH, ["replicationrecoveryplans", _]) => patch_plan(st, r[1], body).await,
        (Method::DELETE, ["replicationrecoveryplans", _]) => delete_plan(st, r[1]).await,
        (Method::POST, ["replicationrecoveryplans", _, action]) => {
            let op = match *action {
                "testfailover" => PlanOp::TestFailover,
                "testfailovercleanup" => PlanOp::TestFailoverCleanup,
                "plannedfailover" => PlanOp::PlannedFailover,
                "unplannedfailover" => PlanOp::UnplannedFailover,
                "failovercommit" => PlanOp::Commit,
                "reprotect" => PlanOp::Reprotect,
                other => {
                    return Some(Err(ApiError::new(
                        StatusCode::NOT_FOUND,
                        "PathNotFound",
                        format!(
                            "recovery plans have no action '{other}': testFailover, testFailoverCleanup, plannedFailover, unplannedFailover, failoverCommit, reProtect"
                        ),
                    )));
                }
            };
            start_plan(st, headers, r[1], op, body).await
        }
        (Method::POST, ["replicationjobs", _, "resume"]) => {
            resume_job(st, headers, r[1], body).await
        }
        (Method::POST, ["replicationjobs", _, "restart"]) => restart_job(st, headers, r[1]).await,
        (Method::POST, ["replicationjobs", _, "cancel"]) => cancel_job(st, headers, r[1]).await,
        _ => return None,
    };
    Some(answer)
}

async fn list_plans(st: &Shared) -> ApiResult<Response> {
    let mut out = Vec::new();
    for row in plans::list(&st.db).await.map_err(stored)? {
        out.push(plan_json(st, &row).await?);
    }
    ok(model::list(out))
}

async fn load_plan(st: &AppState, name: &str) -> ApiResult<PlanRow> {
    let mut tx = crate::db::begin_read(&st.db).await?;
    plans::get(&mut tx, name)
        .await
        .map_err(stored)?
        .ok_or_else(|| ApiError::not_found("recovery plan", name))
}

fn stored(e: anyhow::Error) -> ApiError {
    ApiError::internal("a stored recovery plan or job", format!("{e:#}"))
}

pub(super) async fn get_plan(st: &Shared, name: &str) -> ApiResult<Response> {
    let row = load_plan(st, name).await?;
    ok(plan_json(st, &row).await?)
}

/// Refuses to change a plan while one of its jobs runs.
async fn not_running(tx: &mut Tx<'_>, name: &str, what: &str) -> ApiResult<()> {
    if let Some(job) = plans::running_job(tx, name).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "RecoveryPlanInUse",
            format!(
                "recovery plan '{name}' runs job {job}: {what} it once the job has ended (or cancel it: siterec jobs cancel {job})"
            ),
        ));
    }
    Ok(())
}

async fn put_plan(st: &Shared, name: &str, body: &Bytes) -> ApiResult<Response> {
    check_name("recovery plan", name)?;
    let input: api::CreateRecoveryPlanInput = read_input(body, "a recovery plan")?;
    let primary = fabric_ref(st, "properties.primaryFabricId", &input.primary_fabric_id).await?;
    let recovery = fabric_ref(st, "properties.recoveryFabricId", &input.recovery_fabric_id).await?;
    let plan = plan_from_api(st, primary, recovery, &input.groups).await?;
    let mut tx = crate::db::begin(&st.db).await?;
    not_running(&mut tx, name, "change").await?;
    plans::put(&mut tx, name, &plan, now_ms())
        .await
        .map_err(stored)?;
    tx.commit().await?;
    get_plan(st, name).await
}

async fn patch_plan(st: &Shared, name: &str, body: &Bytes) -> ApiResult<Response> {
    let row = load_plan(st, name).await?;
    let input: api::UpdateRecoveryPlanInput = read_input(body, "a recovery plan update")?;
    let plan = plan_from_api(
        st,
        row.plan.primary_fabric.clone(),
        row.plan.recovery_fabric.clone(),
        &input.groups,
    )
    .await?;
    let mut tx = crate::db::begin(&st.db).await?;
    not_running(&mut tx, &row.name, "change").await?;
    plans::put(&mut tx, &row.name, &plan, now_ms())
        .await
        .map_err(stored)?;
    tx.commit().await?;
    get_plan(st, &row.name).await
}

async fn delete_plan(st: &Shared, name: &str) -> ApiResult<Response> {
    let mut tx = crate::db::begin(&st.db).await?;
    not_running(&mut tx, name, "delete").await?;
    if !plans::delete(&mut tx, name).await? {
        return Err(ApiError::not_found("recovery plan", name));
    }
    tx.commit().await?;
    Ok(StatusCode::OK.into_response())
}

/// Where a plan's operation goes (the site its scripts run at), from the
/// request's direction or else where the machines run.
fn destination(op: PlanOp, direction: Option<&str>, items: &[ItemRow]) -> ApiResult<Location> {
    let running_at = items.first().map(|i| i.active).unwrap_or(Location::Primary);
    let implied = match op {
        PlanOp::TestFailover | PlanOp::PlannedFailover | PlanOp::UnplannedFailover => {
            running_at.other()
        }
        PlanOp::TestFailoverCleanup => Location::Recovery,
        PlanOp::Commit => running_at,
        PlanOp::Reprotect => running_at.other(),
    };
    match direction.map(str::trim).filter(|d| !d.is_empty()) {
        None => Ok(implied),
        Some(d) if d.eq_ignore_ascii_case("PrimaryToRecovery") => Ok(Location::Recovery),
        Some(d) if d.eq_ignore_ascii_case("RecoveryToPrimary") => Ok(Location::Primary),
        Some(d) => Err(ApiError::bad_request(format!(
            "properties.failoverDirection must be PrimaryToRecovery or RecoveryToPrimary, got '{d}'"
        ))),
    }
}

async fn start_plan(
    st: &Shared,
    headers: &HeaderMap,
    name: &str,
    op: PlanOp,
    body: &Bytes,
) -> ApiResult<Response> {
    let (fo, cleanup): (
        api::RecoveryPlanFailoverInput,
        api::RecoveryPlanCleanupInput,
    ) = match op {
        PlanOp::TestFailover | PlanOp::PlannedFailover | PlanOp::UnplannedFailover => (
            read_input(body, "a recovery plan failover")?,
            Default::default(),
        ),
        PlanOp::TestFailoverCleanup if !body.is_empty() => (
            Default::default(),
            read_input(body, "a test failover cleanup")?,
        ),
        _ => Default::default(),
    };
    let network = match (fo.network_type.as_deref(), fo.network_id.as_deref()) {
        (Some(t), Some(id)) if t.eq_ignore_ascii_case("VmNetworkAsInput") && !id.is_empty() => {
            Some(id.to_string())
        }
        (Some(t), None) if t.eq_ignore_ascii_case("VmNetworkAsInput") => {
            return Err(ApiError::bad_request(
                "properties.networkType is VmNetworkAsInput but properties.networkId is missing: name the recovery site's network",
            ));
        }
        _ => None,
    };
    let source_stopped = fo
        .provider_specific_details
        .iter()
        .any(|d| d.source_stopped);
    for d in &fo.provider_specific_details {
        if let Some(t) = &d.recovery_point_type
            && !t.eq_ignore_ascii_case("Latest")
            && !t.eq_ignore_ascii_case("LatestProcessed")
        {
            return Err(ApiError::bad_request(format!(
                "recoveryPointType '{t}' is not supported: use Latest (a multi-VM group's members use the latest point they share)"
            )));
        }
    }
    let mut tx = crate::db::begin(&st.db).await?;
    let row = plans::get(&mut tx, name)
        .await
        .map_err(stored)?
        .ok_or_else(|| ApiError::not_found("recovery plan", name))?;
    let kind = JobKind::for_plan(op);
    if let Some(job) = plans::running_job(&mut tx, &row.name).await? {
        // The SDK retried: the same operation's job answers.
        if jobs_db::find(&mut tx, kind, JobOf::RunningOn(&row.name)).await? == Some(job.clone()) {
            return accepted(st, headers, &job);
        }
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "RecoveryPlanInUse",
            format!(
                "recovery plan '{}' runs job {job}: wait for it to end (or cancel it: siterec jobs cancel {job})",
                row.name
            ),
        ));
    }
    let mut loaded = Vec::new();
    let mut problems = Vec::new();
    for name in row.plan.items() {
        match items::load(&mut **tx, name).await? {
            Some(item) => loaded.push(item),
            None => problems.push(format!("item '{name}' is not protected any more")),
        }
    }
    if loaded.is_empty() && problems.is_empty() {
        return Err(ApiError::conflict(format!(
            "recovery plan '{}' holds no machines: add machines to a group first",
            row.name
        )));
    }
    let to = destination(op, fo.failover_direction.as_deref(), &loaded)?;
    for item in &loaded {
        if let Some(why) = item_refusal(op, to, item.life(), item.test_state) {
            problems.push(format!("item '{}': {why}", item.name));
        }
    }
    if !problems.is_empty() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "PlanItemsNotReady",
            format!(
                "recovery plan '{}' cannot run {}: {}",
                row.name,
                op.display_name(),
                problems.join("; ")
            ),
        ));
    }
    let input = JobInput::RecoveryPlan(PlanInput {
        plan: row.name.clone(),
        op,
        to,
        primary_fabric: row.plan.primary_fabric.clone(),
        recovery_fabric: row.plan.recovery_fabric.clone(),
        groups: row.plan.groups.clone(),
        source_stopped,
        network,
        comments: cleanup.comments,
        points: Default::default(),
        refused: Default::default(),
        attempt: 0,
    });
    let job = create_job(
        &mut tx,
        &input,
        "RecoveryPlan",
        &row.name,
        &plan_id(&st.info, &row.name),
    )
    .await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, &job)
}

async fn resume_job(
    st: &Shared,
    headers: &HeaderMap,
    job: &str,
    body: &Bytes,
) -> ApiResult<Response> {
    let input: api::ResumeJobInput = if body.is_empty() {
        Default::default()
    } else {
        read_input(body, "a job resume")?
    };
    let mut tx = crate::db::begin(&st.db).await?;
    match jobs_db::resume(&mut tx, job, input.comments.as_deref(), now_ms()).await? {
        jobs_db::Resumed::Done => {}
        jobs_db::Resumed::NoSuchJob => return Err(ApiError::not_found("job", job)),
        jobs_db::Resumed::NotSuspended(state) => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "JobNotSuspended",
                format!(
                    "job {job} is {state}, not waiting at a manual action: only a suspended job can be resumed"
                ),
            ));
        }
    }
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, job)
}

async fn restart_job(st: &Shared, headers: &HeaderMap, job: &str) -> ApiResult<Response> {
    // Read before the write transaction (one connection at a time).
    let view = jobs_db::view(&st.db, job).await?;
    let mut tx = crate::db::begin(&st.db).await?;
    let record = jobs_db::load(&mut tx, job)
        .await
        .map_err(stored)?
        .ok_or_else(|| ApiError::not_found("job", job))?
        .map_err(|e| ApiError::internal("a stored job", e))?;
    if record.state != JobState::Failed {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "JobNotFailed",
            format!(
                "job {job} is {}: only a failed job can be restarted",
                record.state.as_str()
            ),
        ));
    }
    let input = JobInput::parse(record.kind, &record.input)
        .map_err(|e| ApiError::internal("a stored job's input", e))?;
    let JobInput::RecoveryPlan(mut p) = input else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "JobNotRestartable",
            format!(
                "job {job} is a {} job: its failure was undone when it failed, so run the operation again (a recovery plan's job can be restarted: it goes on from the step that failed)",
                record.kind.display_name()
            ),
        ));
    };
    if let Some(other) = plans::running_job(&mut tx, &p.plan).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "RecoveryPlanInUse",
            format!(
                "recovery plan '{}' runs job {other}: restart job {job} once it has ended",
                p.plan
            ),
        ));
    }
    // A job that ran to its end with machines failed goes on from the
    // first group holding one of them.
    let failed: Vec<String> = view
        .and_then(|v| v.output)
        .and_then(|o| serde_json::from_str::<Value>(&o).ok())
        .and_then(|o| o.get("machines").and_then(Value::as_array).cloned())
        .unwrap_or_default()
        .iter()
        .filter(|m| m.get("state").and_then(Value::as_str) != Some("Succeeded"))
        .filter_map(|m| m.get("item").and_then(Value::as_str).map(str::to_string))
        .collect();
    let from = p.restart_from(&failed);
    p.attempt += 1;
    jobs_db::restart(&mut tx, job, &JobInput::RecoveryPlan(p), from).await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, job)
}

/// A plan's job can be cancelled between its steps: the machines whose
/// operations run go on (each has its own job); no further group starts.
async fn cancel_job(st: &Shared, headers: &HeaderMap, job: &str) -> ApiResult<Response> {
    let mut tx = crate::db::begin(&st.db).await?;
    let record = jobs_db::load(&mut tx, job)
        .await
        .map_err(stored)?
        .ok_or_else(|| ApiError::not_found("job", job))?
        .map_err(|e| ApiError::internal("a stored job", e))?;
    if record.state.is_terminal() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "JobEnded",
            format!(
                "job {job} has ended ({}): there is nothing to cancel",
                record.state.as_str()
            ),
        ));
    }
    if !record.kind.is_plan() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "JobNotCancellable",
            format!(
                "job {job} is a {} job, whose steps change its machine: cancelling it midway could leave the machine half failed over, so wait for it to end (a recovery plan's job can be cancelled)",
                record.kind.display_name()
            ),
        ));
    }
    jobs_db::set_state(&mut tx, job, JobState::Cancelled).await?;
    tx.commit().await?;
    st.wake.notify_one();
    accepted(st, headers, job)
}

/// Starts one machine's operation of a plan (the engine's
/// [`crate::jobs::StartItem`]): the same handler a request for that
/// machine runs, with the job named `job_id`.
pub fn start_plan_item(
    st: Shared,
    input: PlanInput,
    item: String,
    job_id: String,
) -> Pin<Box<dyn Future<Output = Result<(), StartRefused>> + Send>> {
    Box::pin(crate::jobs::PLAN_CHILD.scope(job_id.clone(), async move {
        let answer = start_child(&st, &input, &item).await;
        match answer {
            Ok(()) => {
                // A handler that answered without creating the job (it
                // should not) must not leave the plan waiting forever.
                let mut tx = crate::db::begin_read(&st.db)
                    .await
                    .map_err(|e| refused(e.into()))?;
                if jobs_db::exists(&mut tx, &job_id)
                    .await
                    .map_err(|e| refused(e.into()))?
                {
                    Ok(())
                } else {
                    Err(StartRefused {
                        code: "InternalError".into(),
                        message: format!("the operation of item '{item}' started no job"),
                    })
                }
            }
            Err(e) => Err(refused(e)),
        }
    }))
}

fn refused(e: ApiError) -> StartRefused {
    StartRefused {
        code: e.code.to_string(),
        message: e.message,
    }
}

fn to_body<T: serde::Serialize>(properties: T) -> ApiResult<Value> {
    serde_json::to_value(api::Input { properties })
        .map_err(|e| ApiError::internal("a plan's machine request", e))
}

async fn start_child(st: &Shared, input: &PlanInput, name: &str) -> ApiResult<()> {
    let item = items::load(&st.db, name)
        .await?
        .ok_or_else(|| ApiError::not_found("protected item", name))?;
    let headers = HeaderMap::new();
    let (f, c, n) = (
        item.fabric.as_str(),
        item.container.as_str(),
        item.name.as_str(),
    );
    let direction = input.to.other().failover_direction().to_string();
    let details = api::FailoverDetails {
        instance_type: "Siterec".into(),
        // The plan names items as their rows spell them.
        recovery_point_id: input.points.get(&item.name).cloned(),
        primary_kek_certificate_pfx: None,
    };
    match input.op {
        PlanOp::TestFailover => {
            let body = to_body(api::TestFailoverInput {
                failover_direction: direction,
                network_type: if input.network.is_some() {
                    "VmNetworkAsInput".into()
                } else {
                    "NoNetworkAttachAsInput".into()
                },
                network_id: input.network.clone(),
                provider_specific_details: details,
            })?;
            super::test_failover(st, &headers, f, c, n, &body).await?;
        }
        PlanOp::TestFailoverCleanup => {
            let body = to_body(api::TestFailoverCleanupInput {
                comments: input.comments.clone().unwrap_or_default(),
            })?;
            super::test_failover_cleanup(st, &headers, f, c, n, &body).await?;
        }
        PlanOp::UnplannedFailover => {
            let body = to_body(api::UnplannedFailoverInput {
                failover_direction: direction,
                source_site_operations: "NotRequired".into(),
                provider_specific_details: details,
            })?;
            super::unplanned_failover(st, &headers, f, c, n, &body).await?;
        }
        PlanOp::PlannedFailover => {
            let body = to_body(api::PlannedFailoverInput {
                failover_direction: direction,
                provider_specific_details: api::PlannedFailoverDetails {
                    instance_type: "Siterec".into(),
                    source_stopped: input.source_stopped,
                    primary_kek_certificate_pfx: None,
                    shutdown_timeout_seconds: None,
                    force_shutdown: false,
                },
            })?;
            super::planned_failover(st, &headers, f, c, n, &body).await?;
        }
        PlanOp::Commit => {
            super::commit_failover(st, &headers, f, c, n).await?;
        }
        PlanOp::Reprotect => {
            let body = to_body(api::ReverseReplicationInput {
                failover_direction: None,
            })?;
            super::reprotect(st, &headers, f, c, n, &body).await?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_read_as_seconds_or_iso_durations() {
        assert_eq!(
            timeout_secs("t", None).unwrap(),
            DEFAULT_SCRIPT_TIMEOUT_SECS
        );
        assert_eq!(timeout_secs("t", Some("90")).unwrap(), 90);
        assert_eq!(timeout_secs("t", Some("PT10M")).unwrap(), 600);
        assert_eq!(timeout_secs("t", Some("PT1H2M3S")).unwrap(), 3723);
        for bad in ["ten", "PT5", "P1D", "PT5X", "-3"] {
            let e = timeout_secs("t", Some(bad)).unwrap_err();
            assert!(e.message.contains("not a timeout"), "{bad}: {}", e.message);
        }
    }
}
