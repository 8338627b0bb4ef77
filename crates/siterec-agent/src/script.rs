//! Recovery plan scripts (`TaskWork::RunScript`): a program of the
//! agent's scripts directory, run with the plan's context in its
//! environment and stopped at its timeout. Its result (exit status, the
//! last 64 KiB of stdout and stderr, times) is written durably under
//! `DATA/script-results/` before it is reported, so that a task the vault
//! delivers again after the agent restarted is answered with the same
//! result instead of running the script twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

/// The most of each output stream kept.
pub const OUTPUT_KEEP: usize = 64 * 1024;

/// Runs the task's script (or answers its recorded result).
pub async fn run(
    data: &Path,
    scripts_dir: &Path,
    task_id: &str,
    path: &str,
    timeout: Duration,
    env: &BTreeMap<String, String>,
) -> anyhow::Result<Value> {
    siterec_core::plan::check_script_path(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let results = data.join("script-results");
    let record = results.join(format!("{}.json", safe_name(task_id)));
    if let Ok(bytes) = std::fs::read(&record)
        && let Ok(v) = serde_json::from_slice::<Value>(&bytes)
    {
        return Ok(v);
    }
    let program: PathBuf = scripts_dir.join(path);
    if !program.is_file() {
        anyhow::bail!(
            "script {} does not exist on this host: put it in the agent's scripts directory {} (executable)",
            program.display(),
            scripts_dir.display()
        );
    }
    let started = crate::util::now_ms();
    let mut child = tokio::process::Command::new(&program)
        .current_dir(scripts_dir)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        // Its own process group: a timeout stops whatever it started.
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting script {}", program.display()))?;
    let mut out = child.stdout.take();
    let mut err = child.stderr.take();
    let read_out = tokio::spawn(async move { read_tail(out.as_mut()).await });
    let read_err = tokio::spawn(async move { read_tail(err.as_mut()).await });
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status.map(|s| (s.code(), false)),
        Err(_) => {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: killpg(2) on the process group this function
                // created for the script.
                unsafe { libc::killpg(pid, libc::SIGKILL) };
            }
            let _ = child.kill().await;
            Ok((None, true))
        }
    };
    let (code, timed_out) =
        status.with_context(|| format!("waiting for script {}", program.display()))?;
    // What the script left running may hold its output open: take what
    // came within a few seconds.
    let grace = Duration::from_secs(3);
    let stdout = tokio::time::timeout(grace, read_out)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let stderr = tokio::time::timeout(grace, read_err)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    let result = json!({
        "path": path,
        "agentPath": program.display().to_string(),
        "exitCode": code,
        "timedOut": timed_out,
        "stdout": stdout,
        "stderr": stderr,
        "startedMs": started,
        "endedMs": crate::util::now_ms(),
    });
    std::fs::create_dir_all(&results).with_context(|| format!("creating {}", results.display()))?;
    crate::util::write_durably(&record, result.to_string().as_bytes(), 0o600)
        .with_context(|| format!("recording the script's result in {}", record.display()))?;
    Ok(result)
}

/// A task id as a file name.
fn safe_name(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Reads a stream to its end, keeping its last [`OUTPUT_KEEP`] bytes (as
/// text, lossily).
async fn read_tail<R: tokio::io::AsyncRead + Unpin>(r: Option<&mut R>) -> String {
    let Some(r) = r else {
        return String::new();
    };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * OUTPUT_KEEP {
                    kept.drain(..kept.len() - OUTPUT_KEEP);
                }
            }
        }
    }
    if kept.len() > OUTPUT_KEEP {
        kept.drain(..kept.len() - OUTPUT_KEEP);
    }
    String::from_utf8_lossy(&kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn script(dir: &Path, name: &str, body: &str) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[tokio::test]
    async fn runs_with_the_plan_environment_and_keeps_output() {
        let d = tempfile::tempdir().unwrap();
        let scripts = d.path().join("scripts");
        std::fs::create_dir_all(&scripts).unwrap();
        script(
            &scripts,
            "ok.sh",
            "echo \"plan=$SITEREC_PLAN\"; echo oops >&2; echo ran >> count",
        );
        script(&scripts, "fail.sh", "echo bad >&2; exit 3");
        script(&scripts, "slow.sh", "sleep 30");
        let env = BTreeMap::from([("SITEREC_PLAN".to_string(), "p1".to_string())]);
        let t = Duration::from_secs(10);
        let v = run(d.path(), &scripts, "j-script-1", "ok.sh", t, &env)
            .await
            .unwrap();
        assert_eq!(v["exitCode"], 0);
        assert_eq!(v["stdout"], "plan=p1\n");
        assert_eq!(v["stderr"], "oops\n");
        // Delivered again (an agent restart): the recorded result, not a
        // second run.
        let again = run(d.path(), &scripts, "j-script-1", "ok.sh", t, &env)
            .await
            .unwrap();
        assert_eq!(again, v);
        assert_eq!(
            std::fs::read_to_string(scripts.join("count")).unwrap(),
            "ran\n"
        );
        let v = run(d.path(), &scripts, "j-script-2", "fail.sh", t, &env)
            .await
            .unwrap();
        assert_eq!(v["exitCode"], 3);
        assert_eq!(v["stderr"], "bad\n");
        let started = std::time::Instant::now();
        let v = run(
            d.path(),
            &scripts,
            "j-script-3",
            "slow.sh",
            Duration::from_millis(300),
            &env,
        )
        .await
        .unwrap();
        assert_eq!(v["timedOut"], true);
        assert!(v["exitCode"].is_null());
        assert!(started.elapsed() < Duration::from_secs(10));
        let e = run(d.path(), &scripts, "j-4", "missing.sh", t, &env)
            .await
            .unwrap_err();
        assert!(format!("{e:#}").contains("does not exist"), "{e:#}");
        assert!(
            run(d.path(), &scripts, "j-5", "../x", t, &env)
                .await
                .is_err()
        );
    }
}
