use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use crate::error::{PkiError, Result};

/// Write `data` to `path` durably: write a temporary file in the same
/// directory (created with permission bits `mode`, e.g. `0o600` for keys),
/// fsync it, rename it over `path`, then fsync the directory.
///
/// A crash leaves either the old or the new content, never a torn file.
pub fn write_file_durable(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    };
    let file_name = path
        .file_name()
        .ok_or_else(|| PkiError::InvalidArgument(format!("{} has no file name", path.display())))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{file_name}.tmp.{}", std::process::id()));
    // A stale temp file from a crashed run would make create_new fail.
    let _ = fs::remove_file(&tmp);
    let result = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|e| PkiError::io("creating", &tmp, e))?;
        f.write_all(data)
            .map_err(|e| PkiError::io("writing", &tmp, e))?;
        f.sync_all().map_err(|e| PkiError::io("syncing", &tmp, e))?;
        drop(f);
        fs::rename(&tmp, path).map_err(|e| PkiError::io("renaming into place", path, e))?;
        let d = File::open(&dir).map_err(|e| PkiError::io("opening directory", &dir, e))?;
        d.sync_all()
            .map_err(|e| PkiError::io("syncing directory", &dir, e))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
