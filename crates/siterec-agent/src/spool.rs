//! The source's disk spool (the seeds' process-server cache): recovery
//! points captured while the target is unreachable wait here, complete,
//! until they can be shipped, oldest first.
//!
//! Layout, per item, under `DATA/spool/ITEM/`:
//!
//! ```text
//! 00000000000000000007/         one complete spooled point (sequence number)
//!   manifest                    the point's manifest (store manifest format)
//!   chunks/HEX                  each changed block, encoded as a store chunk
//!   acked                       chunk names the target has taken, one a line
//! tmp-UUID/                     a capture in progress (deleted when found)
//! ```
//!
//! Crash points: a capture writes its chunks and manifest into `tmp-…`,
//! syncs them and renames the directory to its sequence number, so a point
//! is either wholly in the spool or not at all; the source's saved block
//! hashes move on only after that rename. Shipping appends every chunk the
//! target acknowledged to `acked` (not synced: a lost line only means one
//! chunk is sent again) and deletes the point's directory once the target
//! has committed it and the report to the vault is queued.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;

/// Default bound of an item's spool: 10 GiB.
pub const DEFAULT_SPOOL_MAX_MIB: u64 = 10 * 1024;

/// A capture that would make the spool grow past its bound.
#[derive(Debug)]
pub struct SpoolFull {
    pub max_bytes: u64,
}

impl std::fmt::Display for SpoolFull {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the disk spool is full ({} MiB, spool_max_mib in the agent config)",
            self.max_bytes >> 20
        )
    }
}

impl std::error::Error for SpoolFull {}

/// One item's spool directory.
pub struct Spool {
    root: PathBuf,
}

/// A spooled point's directory.
#[derive(Debug, Clone)]
pub struct Entry {
    pub dir: PathBuf,
    pub seq: u64,
}

impl Entry {
    pub fn manifest_path(&self) -> PathBuf {
        self.dir.join("manifest")
    }

    pub fn chunks_dir(&self) -> PathBuf {
        self.dir.join("chunks")
    }

    /// Names of the chunks the target has already taken.
    pub fn acked(&self) -> HashSet<String> {
        std::fs::read_to_string(self.dir.join("acked"))
            .map(|s| s.lines().map(str::to_string).collect())
            .unwrap_or_default()
    }

    /// Records that the target has taken chunk `name`.
    pub fn mark_acked(&self, name: &str) -> anyhow::Result<()> {
        let path = self.dir.join("acked");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        writeln!(f, "{name}").with_context(|| format!("writing {}", path.display()))
    }

    /// The spooled chunks: (name, path), in name order.
    pub fn chunks(&self) -> anyhow::Result<Vec<(String, PathBuf)>> {
        let dir = self.chunks_dir();
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
        };
        for e in rd {
            let e = e.with_context(|| format!("listing {}", dir.display()))?;
            if let Some(name) = e.file_name().to_str() {
                out.push((name.to_string(), e.path()));
            }
        }
        out.sort();
        Ok(out)
    }
}

impl Spool {
    pub fn new(root: PathBuf) -> Spool {
        Spool { root }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Complete spooled points, oldest first.
    pub fn entries(&self) -> anyhow::Result<Vec<Entry>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.root) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.root.display())),
        };
        for e in rd {
            let e = e.with_context(|| format!("listing {}", self.root.display()))?;
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Ok(seq) = name.parse::<u64>() {
                out.push(Entry { dir: e.path(), seq });
            }
        }
        out.sort_by_key(|e| e.seq);
        Ok(out)
    }

    /// Bytes held by complete spooled points.
    pub fn bytes(&self) -> anyhow::Result<u64> {
        let mut total = 0;
        for entry in self.entries()? {
            total += dir_bytes(&entry.dir);
        }
        Ok(total)
    }

    /// Starts a capture into a fresh temporary directory, after deleting
    /// what a crash left of earlier captures (an item has one capture at a
    /// time).
    pub fn begin(&self) -> anyhow::Result<PathBuf> {
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for e in rd.flatten() {
                if e.file_name()
                    .to_str()
                    .is_some_and(|n| n.starts_with("tmp-"))
                {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let tmp = self
            .root
            .join(format!("tmp-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(tmp.join("chunks"))
            .with_context(|| format!("creating {}", tmp.display()))?;
        Ok(tmp)
    }

    /// Makes a capture a complete spooled point: writes its manifest, syncs
    /// everything and renames the directory to the next sequence number.
    pub fn finish(&self, tmp: &Path, manifest: &[u8]) -> anyhow::Result<Entry> {
        let mpath = tmp.join("manifest");
        let mut f = std::fs::File::create(&mpath)
            .with_context(|| format!("creating {}", mpath.display()))?;
        f.write_all(manifest)
            .and_then(|_| f.sync_all())
            .with_context(|| format!("writing {}", mpath.display()))?;
        sync_dir(&tmp.join("chunks"))?;
        sync_dir(tmp)?;
        let seq = self.entries()?.last().map(|e| e.seq + 1).unwrap_or(0);
        let dir = self.root.join(format!("{seq:020}"));
        std::fs::rename(tmp, &dir)
            .with_context(|| format!("renaming {} to {}", tmp.display(), dir.display()))?;
        sync_dir(&self.root)?;
        Ok(Entry { dir, seq })
    }

    /// Deletes a shipped point.
    pub fn remove(&self, entry: &Entry) -> anyhow::Result<()> {
        std::fs::remove_dir_all(&entry.dir)
            .with_context(|| format!("deleting {}", entry.dir.display()))
    }

    /// Deletes everything spooled (after an overflow, or when the target
    /// refused a spooled point).
    pub fn discard_all(&self) -> anyhow::Result<()> {
        match std::fs::remove_dir_all(&self.root) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("deleting {}", self.root.display())),
        }
    }
}

/// Writes one spooled chunk durably (called on a blocking thread).
pub fn write_chunk(tmp: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let path = tmp.join("chunks").join(name);
    let mut f =
        std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)
        .and_then(|_| f.sync_data())
        .with_context(|| format!("writing {}", path.display()))
}

fn sync_dir(dir: &Path) -> anyhow::Result<()> {
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))
}

fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    for e in rd.flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => total += dir_bytes(&e.path()),
            Ok(_) => total += e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => {}
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_become_visible_only_when_finished_and_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::new(dir.path().join("item"));
        assert!(spool.entries().unwrap().is_empty());
        let a = spool.begin().unwrap();
        write_chunk(&a, "aa", b"first").unwrap();
        // An unfinished capture is not a point.
        assert!(spool.entries().unwrap().is_empty());
        let a = spool.begin().unwrap();
        write_chunk(&a, "aa", b"first").unwrap();
        let first = spool.finish(&a, b"m1").unwrap();
        let b = spool.begin().unwrap();
        write_chunk(&b, "bb", b"second!").unwrap();
        let second = spool.finish(&b, b"m2").unwrap();
        let entries = spool.entries().unwrap();
        assert_eq!(
            entries.iter().map(|e| e.seq).collect::<Vec<_>>(),
            vec![first.seq, second.seq]
        );
        assert!(first.seq < second.seq);
        assert_eq!(std::fs::read(entries[1].manifest_path()).unwrap(), b"m2");
        assert_eq!(spool.bytes().unwrap(), 5 + 2 + 7 + 2);
        // The leftover temporary directory was cleaned up.
        assert_eq!(std::fs::read_dir(spool.root()).unwrap().count(), 2);

        entries[0].mark_acked("aa").unwrap();
        assert!(entries[0].acked().contains("aa"));
        assert!(entries[1].acked().is_empty());
        spool.remove(&entries[0]).unwrap();
        assert_eq!(spool.entries().unwrap().len(), 1);
        spool.discard_all().unwrap();
        assert!(spool.entries().unwrap().is_empty());
        spool.discard_all().unwrap();
    }
}
