//! Small file helpers.

use std::path::Path;

use anyhow::Context;

/// Writes `data` to `path` so that a crash leaves either the old or the new
/// content (see `siterec_pki::write_file_durable`), creating the directory.
pub fn write_durably(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path.parent().context("path has no parent directory")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(siterec_pki::write_file_durable(path, data, mode)?)
}

/// Writes `data` atomically (temp + rename) without forcing it to disk: for
/// status files that may be lost in a crash.
pub fn write_atomically(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let dir = path.parent().context("path has no parent directory")?;
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, data).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

pub fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}
