//! `siterec plan`: recovery plans — create them from a TOML file (or
//! groups on the command line), show, edit, delete, and run them: test
//! failover and its cleanup, planned and unplanned failover, commit,
//! reprotect; `resume` answers a manual action.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Subcommand;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::client::Api;
use crate::input;
use crate::output::{self, Format};
use siterec_api as sapi;

#[derive(Subcommand)]
pub enum PlanCmd {
    /// Create a recovery plan. Its groups come from --file (a TOML file:
    /// `[[group]] items = [..]` with `[[group.pre]]`/`[[group.post]]`
    /// actions, each `name` and `script = "PATH"` [`timeout = SECS`] or
    /// `manual = "INSTRUCTIONS"`), or from --group (machines only).
    ///
    /// Example: siterec plan create shop --primary-fabric site-a
    /// --recovery-fabric site-b --group db --group app1,app2
    Create {
        name: String,
        #[arg(long)]
        primary_fabric: Option<String>,
        #[arg(long)]
        recovery_fabric: Option<String>,
        #[command(flatten)]
        groups: GroupArgs,
    },
    /// Replace a plan's groups and actions.
    Edit {
        name: String,
        #[command(flatten)]
        groups: GroupArgs,
    },
    List,
    Show {
        name: String,
    },
    Delete {
        name: String,
    },
    /// Test failover of every machine of the plan, group by group.
    TestFailover {
        name: String,
        /// A network of the recovery site for the VMs (default: isolated).
        #[arg(long)]
        network: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Clean up the plan's test failover.
    TestCleanup {
        name: String,
        #[arg(long)]
        comments: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Planned failover (or, from the recovery site, failback) of the plan.
    PlannedFailover {
        name: String,
        /// The plan's physical servers are stopped.
        #[arg(long)]
        source_stopped: bool,
        /// PrimaryToRecovery or RecoveryToPrimary (default: away from
        /// where the machines run).
        #[arg(long)]
        direction: Option<String>,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Unplanned failover of the plan: every machine that can come up
    /// does; the job reports each machine's outcome.
    UnplannedFailover {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    Commit {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    Reprotect {
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
    },
    /// Resume a plan's job waiting at a manual action.
    Resume {
        job: String,
        #[arg(long)]
        comments: Option<String>,
    },
}

#[derive(clap::Args)]
pub struct GroupArgs {
    /// The plan as a TOML file.
    #[arg(long, conflicts_with = "group")]
    file: Option<PathBuf>,
    /// A group's machines (protected item names, comma-separated), in
    /// order: the first --group is Group 1.
    #[arg(long)]
    group: Vec<String>,
}

#[derive(clap::Args)]
pub struct WaitArgs {
    /// Wait for the job to end, printing its steps as they finish (a
    /// manual action's instructions too, until it is resumed).
    #[arg(long)]
    wait: bool,
}

/// The plan file.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    primary_fabric: Option<String>,
    recovery_fabric: Option<String>,
    #[serde(default)]
    group: Vec<GroupFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct GroupFile {
    #[serde(default)]
    items: Vec<String>,
    #[serde(default)]
    pre: Vec<ActionFile>,
    #[serde(default)]
    post: Vec<ActionFile>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionFile {
    name: String,
    script: Option<String>,
    timeout: Option<u32>,
    manual: Option<String>,
    #[serde(default)]
    operations: Vec<String>,
    #[serde(default)]
    directions: Vec<String>,
}

fn action(a: ActionFile) -> anyhow::Result<sapi::RecoveryPlanAction> {
    let custom_details = match (a.script, a.manual) {
        (Some(path), None) => sapi::ActionDetails {
            instance_type: "ScriptActionDetails".into(),
            path: Some(path),
            timeout: a.timeout.map(|t| t.to_string()),
            fabric_location: Some("Recovery".into()),
            description: None,
        },
        (None, Some(text)) => sapi::ActionDetails {
            instance_type: "ManualActionDetails".into(),
            path: None,
            timeout: None,
            fabric_location: None,
            description: Some(text),
        },
        _ => bail!(
            "action '{}' needs exactly one of script = \"PATH\" or manual = \"INSTRUCTIONS\"",
            a.name
        ),
    };
    Ok(sapi::RecoveryPlanAction {
        action_name: a.name,
        failover_types: a.operations,
        failover_directions: a.directions,
        custom_details,
    })
}

/// The groups (and fabrics, from a file) the arguments describe.
fn groups(
    args: GroupArgs,
) -> anyhow::Result<(Vec<sapi::RecoveryPlanGroup>, Option<String>, Option<String>)> {
    let boot = |items: Vec<String>, pre, post| sapi::RecoveryPlanGroup {
        group_type: "Boot".into(),
        replication_protected_items: items
            .into_iter()
            .map(|id| sapi::PlanItemRef {
                id,
                virtual_machine_id: None,
            })
            .collect(),
        start_group_actions: pre,
        end_group_actions: post,
    };
    if let Some(path) = args.file {
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let f: PlanFile = toml::from_str(&text)
            .with_context(|| format!("{} is not a plan file", path.display()))?;
        let mut out = Vec::new();
        for g in f.group {
            let pre = g
                .pre
                .into_iter()
                .map(action)
                .collect::<anyhow::Result<_>>()?;
            let post = g
                .post
                .into_iter()
                .map(action)
                .collect::<anyhow::Result<_>>()?;
            out.push(boot(g.items, pre, post));
        }
        return Ok((out, f.primary_fabric, f.recovery_fabric));
    }
    if args.group.is_empty() {
        bail!(
            "give the plan's groups with --file PLAN.toml or --group ITEM[,ITEM...] (one per group)"
        );
    }
    let out = args
        .group
        .iter()
        .map(|g| {
            boot(
                g.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                vec![],
                vec![],
            )
        })
        .collect();
    Ok((out, None, None))
}

pub async fn run(api: Api, cmd: PlanCmd, out: Format) -> anyhow::Result<ExitCode> {
    let plan_path = |name: &str| format!("replicationRecoveryPlans/{name}");
    match cmd {
        PlanCmd::Create {
            name,
            primary_fabric,
            recovery_fabric,
            groups: g,
        } => {
            let (groups, fp, fr) = groups(g)?;
            let primary = primary_fabric.or(fp).context(
                "give the primary fabric (--primary-fabric, or primary_fabric in the file)",
            )?;
            let recovery = recovery_fabric.or(fr).context(
                "give the recovery fabric (--recovery-fabric, or recovery_fabric in the file)",
            )?;
            let body = input(sapi::CreateRecoveryPlanInput {
                primary_fabric_id: primary,
                recovery_fabric_id: recovery,
                failover_deployment_model: None,
                groups,
            });
            let v = api.put_sync(&plan_path(&name), &body).await?;
            show(&v, out)?;
            Ok(ExitCode::SUCCESS)
        }
        PlanCmd::Edit { name, groups: g } => {
            let (groups, _, _) = groups(g)?;
            let body = input(sapi::UpdateRecoveryPlanInput { groups });
            let v = api.patch_sync(&plan_path(&name), &body).await?;
            show(&v, out)?;
            Ok(ExitCode::SUCCESS)
        }
        PlanCmd::List => {
            let rows = api
                .rows::<sapi::RecoveryPlan>("replicationRecoveryPlans")
                .await?;
            let rows: Vec<Value> = rows
                .into_iter()
                .map(|mut r| {
                    let groups = r["properties"]["groups"]
                        .as_array()
                        .map(|g| g.iter().filter(|g| g["groupType"] == "Boot").count())
                        .unwrap_or(0);
                    let machines: usize = r["properties"]["groups"]
                        .as_array()
                        .map(|g| {
                            g.iter()
                                .map(|g| {
                                    g["replicationProtectedItems"]
                                        .as_array()
                                        .map(Vec::len)
                                        .unwrap_or(0)
                                })
                                .sum()
                        })
                        .unwrap_or(0);
                    r["summary"] = json!({"groups": groups, "machines": machines});
                    r
                })
                .collect();
            output::rows(
                out,
                &rows,
                &[
                    ("NAME", "/name"),
                    ("PRIMARY", "/properties/primaryFabricFriendlyName"),
                    ("RECOVERY", "/properties/recoveryFabricFriendlyName"),
                    ("GROUPS", "/summary/groups"),
                    ("MACHINES", "/summary/machines"),
                    ("RUNNING", "/properties/currentScenario/scenarioName"),
                ],
            );
            Ok(ExitCode::SUCCESS)
        }
        PlanCmd::Show { name } => {
            let v: sapi::RecoveryPlan = api.get_as(&plan_path(&name)).await?;
            show(&serde_json::to_value(v)?, out)?;
            Ok(ExitCode::SUCCESS)
        }
        PlanCmd::Delete { name } => {
            api.delete(&plan_path(&name)).await?;
            if out == Format::Table {
                println!("recovery plan {name} deleted");
            }
            Ok(ExitCode::SUCCESS)
        }
        PlanCmd::TestFailover {
            name,
            network,
            wait,
        } => {
            let body = input(sapi::RecoveryPlanFailoverInput {
                failover_direction: Some("PrimaryToRecovery".into()),
                network_type: Some(
                    if network.is_some() {
                        "VmNetworkAsInput"
                    } else {
                        "NoNetworkAttachAsInput"
                    }
                    .into(),
                ),
                network_id: network,
                ..Default::default()
            });
            start(
                &api,
                &format!("{}/testFailover", plan_path(&name)),
                &body,
                wait,
                out,
            )
            .await
        }
        PlanCmd::TestCleanup {
            name,
            comments,
            wait,
        } => {
            let body = input(sapi::RecoveryPlanCleanupInput { comments });
            let rel = format!("{}/testFailoverCleanup", plan_path(&name));
            start(&api, &rel, &body, wait, out).await
        }
        PlanCmd::PlannedFailover {
            name,
            source_stopped,
            direction,
            wait,
        } => {
            let body = input(sapi::RecoveryPlanFailoverInput {
                failover_direction: direction,
                provider_specific_details: vec![sapi::RecoveryPlanProviderInput {
                    instance_type: "Siterec".into(),
                    recovery_point_type: None,
                    source_stopped,
                }],
                ..Default::default()
            });
            let rel = format!("{}/plannedFailover", plan_path(&name));
            start(&api, &rel, &body, wait, out).await
        }
        PlanCmd::UnplannedFailover { name, wait } => {
            let body = input(sapi::RecoveryPlanFailoverInput {
                failover_direction: Some("PrimaryToRecovery".into()),
                source_site_operations: Some("NotRequired".into()),
                ..Default::default()
            });
            let rel = format!("{}/unplannedFailover", plan_path(&name));
            start(&api, &rel, &body, wait, out).await
        }
        PlanCmd::Commit { name, wait } => {
            let rel = format!("{}/failoverCommit", plan_path(&name));
            start(&api, &rel, &json!({}), wait, out).await
        }
        PlanCmd::Reprotect { name, wait } => {
            let rel = format!("{}/reProtect", plan_path(&name));
            start(&api, &rel, &json!({}), wait, out).await
        }
        PlanCmd::Resume { job, comments } => {
            let body = input(sapi::ResumeJobInput { comments });
            api.start(
                reqwest::Method::POST,
                &format!("replicationJobs/{job}/resume"),
                &body,
            )
            .await?;
            if out == Format::Table {
                println!("job {job} resumed");
            } else {
                output::json(&json!({"jobId": job, "resumed": true}));
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn show(v: &Value, out: Format) -> anyhow::Result<()> {
    if out == Format::Json {
        output::json(v);
        return Ok(());
    }
    output::object(
        out,
        v,
        &[
            ("plan", "/name"),
            ("primary", "/properties/primaryFabricFriendlyName"),
            ("recovery", "/properties/recoveryFabricFriendlyName"),
            ("allowed", "/properties/allowedOperations"),
            ("running", "/properties/currentScenario/jobId"),
            ("last test failover", "/properties/lastTestFailoverTime"),
            (
                "last planned failover",
                "/properties/lastPlannedFailoverTime",
            ),
            (
                "last unplanned failover",
                "/properties/lastUnplannedFailoverTime",
            ),
        ],
    );
    let plan: sapi::RecoveryPlan = serde_json::from_value(v.clone())?;
    let mut n = 0;
    for g in plan
        .properties
        .groups
        .iter()
        .filter(|g| g.group_type == "Boot")
    {
        n += 1;
        let items: Vec<&str> = g
            .replication_protected_items
            .iter()
            .map(|i| siterec_core::names::last_segment(&i.id))
            .collect();
        println!("Group {n}: {}", items.join(", "));
        for (when, acts) in [
            ("pre", &g.start_group_actions),
            ("post", &g.end_group_actions),
        ] {
            for a in acts {
                let what = match (&a.custom_details.path, &a.custom_details.description) {
                    (Some(p), _) => format!("script {p}"),
                    (None, Some(d)) => format!("manual: {d}"),
                    _ => a.custom_details.instance_type.clone(),
                };
                println!("  {when}: {} ({what})", a.action_name);
            }
        }
    }
    Ok(())
}

/// Starts a plan's operation; with `--wait`, follows its job to its end.
async fn start(
    api: &Api,
    rel: &str,
    body: &Value,
    wait: WaitArgs,
    out: Format,
) -> anyhow::Result<ExitCode> {
    let (job, _, _) = api.start(reqwest::Method::POST, rel, body).await?;
    if !wait.wait {
        if out == Format::Table {
            println!("recovery plan job {job} started ('siterec jobs show {job}')");
        } else {
            output::json(&json!({"jobId": job, "status": "InProgress"}));
        }
        return Ok(ExitCode::SUCCESS);
    }
    follow(api, &job, out).await
}

/// Prints a job's steps as they end (and a manual action's instructions
/// while it waits) until the job ends; exit 1 if it failed.
pub async fn follow(api: &Api, job: &str, out: Format) -> anyhow::Result<ExitCode> {
    let deadline = Instant::now() + Duration::from_secs(24 * 3600);
    let mut printed = 0usize;
    let mut prompted = false;
    loop {
        let j: sapi::Job = api.get_as(&format!("replicationJobs/{job}")).await?;
        let tasks = &j.properties.tasks;
        while printed < tasks.len() && is_terminal(&tasks[printed].state) {
            let t = &tasks[printed];
            if out == Format::Table {
                println!("  {}: {}", t.name, t.state);
            }
            printed += 1;
        }
        match j.properties.state.as_str() {
            "Suspended" if !prompted => {
                prompted = true;
                let text = tasks
                    .get(printed)
                    .and_then(|t| t.custom_details.as_ref())
                    .and_then(|d| d.output["instructions"].as_str())
                    .unwrap_or("");
                println!("waiting for an operator: {text}\nwhen done: siterec plan resume {job}");
            }
            "InProgress" | "NotStarted" => prompted = false,
            "Succeeded" | "Failed" | "Cancelled" => {
                let ok = j.properties.state == "Succeeded";
                if out == Format::Json {
                    output::json(&serde_json::to_value(&j)?);
                } else {
                    for e in &j.properties.errors {
                        eprintln!("error: {}", e.service_error_details.message);
                    }
                    println!("job {job}: {}", j.properties.state);
                }
                return Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                });
            }
            _ => {}
        }
        if Instant::now() > deadline {
            bail!("job {job} is still running; follow it with 'siterec jobs show {job}'");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "Succeeded" | "Failed" | "Cancelled" | "Skipped")
}
