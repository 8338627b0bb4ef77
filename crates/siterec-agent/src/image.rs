//! A disk image opened for block access by the agent: failback writes a
//! recovery point back onto a VM's own disk image in place, reprotect
//! seeding reads every block of one.
//!
//! Raw images and block devices are plain files, read and written with
//! positioned I/O on tokio's blocking pool. qcow2 images are served by a
//! private `qemu-nbd` child (one client, `--shared=1`) on a Unix socket in
//! a private temporary directory, and accessed with our [`NbdClient`]; what
//! is read and written is the guest-visible content (the virtual disk), and
//! QEMU keeps the qcow2 metadata consistent.
//!
//! QEMU's image locking applies to qcow2 images: opening one that a running
//! VM (or any other QEMU process) holds fails with an error saying so, for
//! writing and for reading alike (a reader cannot get a consistent view of a
//! disk a VM is writing). Raw images are **not** checked: the caller must
//! make sure no VM is running on them.
//!
//! Always finish with [`DiskImage::close`]: it flushes, ends `qemu-nbd`
//! cleanly and removes the temporary directory. Dropping a [`DiskImage`]
//! without closing kills `qemu-nbd` (writes it acknowledged but was not
//! asked to flush may be lost) and removes the directory too.

use std::os::unix::fs::{DirBuilderExt, FileExt};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use siterec_drivers::capture::DiskSource;
use siterec_nbd::{ConnectOptions, NbdClient, NbdError};
use siterec_qemu::DiskFormat;
use tokio::net::UnixStream;

/// How long `qemu-nbd` may take to open the image and accept the
/// connection.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// How long `qemu-nbd` may take to exit after the disconnect before it is
/// killed.
const EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest Unix socket path (`sun_path` holds 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;

/// A disk image opened for reading, or reading and writing, at byte
/// offsets. See the [module documentation](self).
pub struct DiskImage {
    path: PathBuf,
    size: u64,
    writable: bool,
    backend: Backend,
}

enum Backend {
    /// A raw image or block device.
    Raw(Arc<std::fs::File>),
    /// A qcow2 image behind a private `qemu-nbd`.
    Nbd(Box<NbdImage>),
}

/// The `qemu-nbd` child, the connection to it and its directory. Fields
/// drop in order: the connection, the child (killed if still running), then
/// the directory.
struct NbdImage {
    client: NbdClient<UnixStream>,
    child: tokio::process::Child,
    dir: PrivateDir,
}

impl DiskImage {
    /// Opens the image at `path` in `format` (raw: a regular file or a
    /// block device; qcow2: through `qemu-nbd`, which must be on PATH).
    /// With `writable` it can be written; otherwise it is opened read-only
    /// (`qemu-nbd --read-only`).
    ///
    /// Fails with an error saying so when a qcow2 image is in use by a
    /// running VM or another QEMU process.
    pub async fn open(
        path: &Path,
        format: DiskFormat,
        writable: bool,
    ) -> anyhow::Result<DiskImage> {
        let mode = if writable { "writing" } else { "reading" };
        match format {
            DiskFormat::Raw => open_raw(path, writable)
                .await
                .with_context(|| format!("opening raw disk image {} for {mode}", path.display())),
            DiskFormat::Qcow2 => open_qcow2(path, writable)
                .await
                .with_context(|| format!("opening qcow2 disk image {} for {mode}", path.display())),
        }
    }

    /// The path given to [`DiskImage::open`].
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the image was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The guest-visible size in bytes: the file or device size for raw,
    /// the virtual size for qcow2.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Reads `buf.len()` bytes at `offset`; the range must lie within
    /// [`Self::size`]. Unallocated parts of a qcow2 image read as zeros.
    pub async fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        self.check_range("read", offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let len = buf.len();
        match &mut self.backend {
            Backend::Raw(file) => {
                // The buffer cannot move to the blocking pool: read into
                // one there and copy.
                let file = file.clone();
                let data = tokio::task::spawn_blocking(move || {
                    let mut data = vec![0u8; len];
                    file.read_exact_at(&mut data, offset).map(|()| data)
                })
                .await
                .context("the read task failed")?
                .with_context(|| {
                    format!(
                        "reading {len} bytes at offset {offset} of {}",
                        self.path.display()
                    )
                })?;
                buf.copy_from_slice(&data);
            }
            Backend::Nbd(nbd) => nbd.client.read_into(offset, buf).await.with_context(|| {
                format!(
                    "reading {len} bytes at offset {offset} of {} through qemu-nbd",
                    self.path.display()
                )
            })?,
        }
        Ok(())
    }

    /// Writes `data` at `offset`; the range must lie within
    /// [`Self::size`] (images never grow). The data may sit in a cache
    /// until [`Self::sync`] or [`Self::close`].
    pub async fn write_at(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        if !self.writable {
            bail!(
                "disk image {} was opened read-only; open it writable to write to it",
                self.path.display()
            );
        }
        self.check_range("write", offset, data.len())?;
        if data.is_empty() {
            return Ok(());
        }
        let len = data.len();
        match &mut self.backend {
            Backend::Raw(file) => {
                let file = file.clone();
                let data = data.to_vec();
                tokio::task::spawn_blocking(move || file.write_all_at(&data, offset))
                    .await
                    .context("the write task failed")?
                    .with_context(|| {
                        format!(
                            "writing {len} bytes at offset {offset} of {}",
                            self.path.display()
                        )
                    })?;
            }
            Backend::Nbd(nbd) => nbd.client.write(offset, data).await.with_context(|| {
                format!(
                    "writing {len} bytes at offset {offset} of {} through qemu-nbd",
                    self.path.display()
                )
            })?,
        }
        Ok(())
    }

    /// Puts everything written so far on stable storage: `fdatasync` for
    /// raw, an NBD flush for qcow2 (QEMU writes its caches, data and
    /// metadata, and syncs the file). Nothing to do when opened read-only.
    pub async fn sync(&mut self) -> anyhow::Result<()> {
        if !self.writable {
            return Ok(());
        }
        match &mut self.backend {
            Backend::Raw(file) => {
                let file = file.clone();
                tokio::task::spawn_blocking(move || file.sync_data())
                    .await
                    .context("the sync task failed")?
                    .with_context(|| format!("syncing {} to disk", self.path.display()))?;
            }
            Backend::Nbd(nbd) => nbd.client.flush().await.with_context(|| {
                format!(
                    "flushing {} through qemu-nbd (the writes may not be on disk)",
                    self.path.display()
                )
            })?,
        }
        Ok(())
    }

    /// Closes the image: syncs it if writable, then for qcow2 disconnects,
    /// waits for `qemu-nbd` to exit (killing it after 10 s, which loses
    /// nothing once the sync succeeded) and removes its directory. The
    /// first error is returned; the cleanup happens regardless.
    pub async fn close(mut self) -> anyhow::Result<()> {
        let synced = self.sync().await;
        let DiskImage { path, backend, .. } = self;
        let closed = match backend {
            Backend::Raw(file) => {
                drop(file);
                Ok(())
            }
            Backend::Nbd(nbd) => nbd.shutdown(&path).await,
        };
        synced.and(closed)
    }

    fn check_range(&self, what: &str, offset: u64, len: usize) -> anyhow::Result<()> {
        match offset.checked_add(len as u64) {
            Some(end) if end <= self.size => Ok(()),
            _ => bail!(
                "{what} of {len} bytes at offset {offset} runs past the end of disk image {} ({} bytes)",
                self.path.display(),
                self.size
            ),
        }
    }
}

async fn open_raw(path: &Path, writable: bool) -> anyhow::Result<DiskImage> {
    let owned = path.to_path_buf();
    let (file, size) = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        // Checks that it is a regular file or a block device, and sizes it.
        let size = DiskSource::open(&owned)?.size();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(&owned)
            .with_context(|| {
                if writable {
                    "opening it read-write (does the agent have write permission?)"
                } else {
                    "opening it"
                }
            })?;
        Ok((file, size))
    })
    .await
    .context("the open task failed")??;
    Ok(DiskImage {
        path: path.to_path_buf(),
        size,
        writable,
        backend: Backend::Raw(Arc::new(file)),
    })
}

async fn open_qcow2(path: &Path, writable: bool) -> anyhow::Result<DiskImage> {
    // An absolute path: QEMU would take `name:` as a protocol prefix, and
    // a leading `-` as an option.
    let image = std::fs::canonicalize(path)
        .context("the image does not exist or cannot be accessed (check the path)")?;
    let dir = PrivateDir::create()?;
    let socket = dir.path().join("nbd.sock");
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        bail!(
            "the socket path {} is too long for a Unix socket; set TMPDIR to a shorter directory",
            socket.display()
        );
    }
    let log_path = dir.path().join("qemu-nbd.log");
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let mut cmd = tokio::process::Command::new("qemu-nbd");
    cmd.arg("--socket")
        .arg(&socket)
        .arg("--format=qcow2")
        .arg("--shared=1");
    if !writable {
        cmd.arg("--read-only");
    }
    cmd.arg(&image)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!("qemu-nbd was not found on PATH; install qemu-utils (needed for qcow2 images)")
        } else {
            anyhow!(e).context("starting qemu-nbd")
        }
    })?;

    // No probe connection: qemu-nbd serves one client and exits after it,
    // so the first connection that gets through is ours. It creates the
    // socket before it opens the image, so until then connections are
    // refused, or accepted and dropped if the open fails.
    let deadline = Instant::now() + START_TIMEOUT;
    let opts = ConnectOptions::new("");
    let client = loop {
        if let Some(status) = child.try_wait().context("checking on qemu-nbd")? {
            return Err(start_failure(status, &log_path));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let attempt = tokio::time::timeout(left, NbdClient::connect_unix(&socket, &opts)).await;
        let err = match attempt {
            Ok(Ok(client)) => break client,
            Ok(Err(NbdError::Io(e)))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            Ok(Err(e)) => anyhow!(e),
            Err(_) => anyhow!("qemu-nbd did not accept the connection within {START_TIMEOUT:?}"),
        };
        // If qemu-nbd failed, its own words say why.
        if let Ok(Ok(status)) = tokio::time::timeout(Duration::from_secs(2), child.wait()).await {
            return Err(start_failure(status, &log_path));
        }
        let said = read_log(&log_path);
        return Err(err.context(format!("connecting to qemu-nbd{said}")));
    };
    if client.is_read_only() == writable {
        bail!(
            "qemu-nbd exported the image {} although it was asked for {}",
            if writable { "read-only" } else { "writable" },
            if writable { "writing" } else { "reading" },
        );
    }
    Ok(DiskImage {
        path: path.to_path_buf(),
        size: client.export_size(),
        writable,
        backend: Backend::Nbd(Box::new(NbdImage { client, child, dir })),
    })
}

impl NbdImage {
    /// Disconnects, waits for qemu-nbd to exit (kills it after
    /// [`EXIT_TIMEOUT`]) and removes the directory.
    async fn shutdown(self: Box<Self>, path: &Path) -> anyhow::Result<()> {
        let NbdImage {
            client,
            mut child,
            dir,
        } = *self;
        let log_path = dir.path().join("qemu-nbd.log");
        // Closes our end too, which qemu-nbd takes as a disconnect if the
        // request did not get through.
        let disconnected = client.disconnect().await;
        let status = match tokio::time::timeout(EXIT_TIMEOUT, child.wait()).await {
            Ok(Ok(status)) => Ok(status),
            Ok(Err(e)) => Err(anyhow!(e).context("waiting for qemu-nbd to exit")),
            Err(_) => Err(anyhow!(
                "qemu-nbd did not exit within {EXIT_TIMEOUT:?} after the disconnect"
            )),
        };
        let said = read_log(&log_path);
        let result = match status {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => Err(anyhow!(
                "qemu-nbd serving {} exited with {status} after the disconnect{said}",
                path.display()
            )),
            Err(e) => {
                // Its writes were flushed (or the caller got the error from
                // the flush): killing it loses nothing more.
                tracing::warn!(image = %path.display(), "{e:#}; killing it");
                if let Err(e) = child.kill().await {
                    tracing::warn!(image = %path.display(), "killing qemu-nbd: {e}");
                }
                Ok(())
            }
        };
        if let Err(e) = dir.remove() {
            tracing::warn!(image = %path.display(), "removing the qemu-nbd directory: {e:#}");
        }
        disconnected
            .map_err(anyhow::Error::from)
            .with_context(|| format!("disconnecting from qemu-nbd serving {}", path.display()))?;
        result
    }
}

/// The error for a qemu-nbd that exited before serving: in use by a VM, or
/// whatever it said.
fn start_failure(status: ExitStatus, log_path: &Path) -> anyhow::Error {
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    let said = log.split_whitespace().collect::<Vec<_>>().join(" ");
    if log.contains("Failed to get") && log.contains("lock") {
        anyhow!(
            "the image is in use by a running VM (or another QEMU process): QEMU could not lock it ({said}); stop the VM first, then try again"
        )
    } else if said.is_empty() {
        anyhow!("qemu-nbd exited with {status} before serving the image")
    } else {
        anyhow!("qemu-nbd exited with {status} before serving the image: {said}")
    }
}

/// `": what qemu-nbd said"`, or nothing.
fn read_log(log_path: &Path) -> String {
    let log = std::fs::read_to_string(log_path).unwrap_or_default();
    let said = log.split_whitespace().collect::<Vec<_>>().join(" ");
    if said.is_empty() {
        String::new()
    } else {
        format!(": qemu-nbd said: {said}")
    }
}

/// A fresh directory (mode 0700) under the system temporary directory,
/// removed with everything in it on [`PrivateDir::remove`] or drop.
struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    fn create() -> anyhow::Result<PrivateDir> {
        let base = std::env::temp_dir();
        for _ in 0..16 {
            let path = base.join(format!("siterec-image-{}", uuid::Uuid::new_v4().simple()));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => return Ok(PrivateDir { path }),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "creating a directory for qemu-nbd's socket under {} (is it writable? TMPDIR selects another)",
                            base.display()
                        )
                    });
                }
            }
        }
        bail!(
            "could not create a fresh directory for qemu-nbd's socket under {}",
            base.display()
        )
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn remove(mut self) -> anyhow::Result<()> {
        let path = std::mem::take(&mut self.path);
        std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// Whether every tool is on PATH; says which is missing if not.
    fn have_tools(tools: &[&str]) -> bool {
        let path = std::env::var_os("PATH").unwrap_or_default();
        for tool in tools {
            if !std::env::split_paths(&path).any(|d| d.join(tool).is_file()) {
                eprintln!("skipping: `{tool}` is not on PATH (install qemu-utils)");
                return false;
            }
        }
        true
    }

    fn qemu_img(args: &[&str]) -> std::process::Output {
        std::process::Command::new("qemu-img")
            .args(args)
            .output()
            .unwrap()
    }

    fn p(path: &Path) -> &str {
        path.to_str().unwrap()
    }

    /// Deterministic pseudo-random bytes (xorshift64*).
    fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
        }
        out.truncate(len);
        out
    }

    /// Writes that cross 32 MiB (one NBD request), are unaligned, overlap
    /// and reach the last byte of a `size`-byte disk.
    fn writes(size: u64) -> Vec<(u64, Vec<u8>)> {
        [
            (0, 4096),
            (MIB + 1, 5000),
            (3 * MIB - 7, 33 * MIB as usize),
            (2 * MIB, 65536),
            (2 * MIB + 10, 10),
            (size - 100, 100),
        ]
        .into_iter()
        .enumerate()
        .map(|(i, (off, len))| (off, random_bytes(i as u64 + 1, len)))
        .collect()
    }

    /// Writes `writes` through a writable [`DiskImage`] and into `model`.
    async fn write_image(path: &Path, format: DiskFormat, model: &mut [u8]) {
        let mut img = DiskImage::open(path, format, true).await.unwrap();
        assert!(img.is_writable());
        assert_eq!(img.size(), model.len() as u64);
        for (off, data) in writes(img.size()) {
            img.write_at(off, &data).await.unwrap();
            model[off as usize..off as usize + data.len()].copy_from_slice(&data);
        }
        img.write_at(5, &[]).await.unwrap();
        let err = img.write_at(img.size() - 1, &[1, 2]).await.unwrap_err();
        assert!(format!("{err:#}").contains("past the end"), "{err:#}");
        img.sync().await.unwrap();
        img.close().await.unwrap();
    }

    /// Reads the image back read-only and compares it with `model`.
    async fn check_image(path: &Path, format: DiskFormat, model: &[u8]) {
        let mut img = DiskImage::open(path, format, false).await.unwrap();
        assert!(!img.is_writable());
        assert_eq!(img.size(), model.len() as u64);
        let mut all = vec![0u8; model.len()];
        img.read_at(0, &mut all).await.unwrap();
        assert!(all == model, "{format}: the image differs");
        let mut some = vec![0u8; 12345];
        img.read_at(3 * MIB - 77, &mut some).await.unwrap();
        assert!(some[..] == model[(3 * MIB - 77) as usize..(3 * MIB - 77) as usize + 12345]);
        let err = img.write_at(0, b"x").await.unwrap_err();
        assert!(format!("{err:#}").contains("read-only"), "{err:#}");
        let err = img.read_at(img.size(), &mut [0u8; 1]).await.unwrap_err();
        assert!(format!("{err:#}").contains("past the end"), "{err:#}");
        img.close().await.unwrap();
    }

    #[tokio::test]
    async fn raw_image_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        let size = 40 * MIB;
        std::fs::File::create(&path).unwrap().set_len(size).unwrap();
        let mut model = vec![0u8; size as usize];
        write_image(&path, DiskFormat::Raw, &mut model).await;
        assert!(std::fs::read(&path).unwrap() == model);
        check_image(&path, DiskFormat::Raw, &model).await;

        let err = DiskImage::open(&dir.path().join("absent"), DiskFormat::Raw, true)
            .await
            .err()
            .unwrap();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("absent") && msg.contains("does not exist"),
            "{msg}"
        );
        let err = DiskImage::open(dir.path(), DiskFormat::Raw, false)
            .await
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("directory"), "{err:#}");
    }

    #[tokio::test]
    async fn qcow2_image_round_trip() {
        if !have_tools(&["qemu-nbd", "qemu-img"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.qcow2");
        let size = 40 * MIB;
        assert!(
            qemu_img(&["create", "-q", "-f", "qcow2", p(&path), "40M"])
                .status
                .success()
        );
        let mut model = vec![0u8; size as usize];
        write_image(&path, DiskFormat::Qcow2, &mut model).await;
        check_image(&path, DiskFormat::Qcow2, &model).await;

        // Independently of our client: QEMU reads the qcow2 itself.
        let check = qemu_img(&["check", "-q", "-f", "qcow2", p(&path)]);
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
        let expected = dir.path().join("expected.raw");
        std::fs::write(&expected, &model).unwrap();
        let cmp = qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(&path),
            p(&expected),
        ]);
        assert!(
            cmp.status.success(),
            "qemu-img compare: {}{}",
            String::from_utf8_lossy(&cmp.stdout),
            String::from_utf8_lossy(&cmp.stderr)
        );
        // And a change it must notice, so the comparison proves something.
        let mut other = model.clone();
        other[(MIB + 2) as usize] ^= 1;
        std::fs::write(&expected, &other).unwrap();
        let cmp = qemu_img(&[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            p(&path),
            p(&expected),
        ]);
        assert_eq!(cmp.status.code(), Some(1));
    }

    #[tokio::test]
    async fn a_qcow2_image_in_use_is_refused_and_drop_stops_qemu_nbd() {
        if !have_tools(&["qemu-nbd", "qemu-img"]) {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("busy.qcow2");
        assert!(
            qemu_img(&["create", "-q", "-f", "qcow2", p(&path), "4M"])
                .status
                .success()
        );

        // Ours, then dropped without closing: qemu-nbd is killed, its
        // directory removed, and the lock released.
        let mut img = DiskImage::open(&path, DiskFormat::Qcow2, true)
            .await
            .unwrap();
        img.write_at(0, b"abc").await.unwrap();
        let (pid, private) = match &img.backend {
            Backend::Nbd(nbd) => (nbd.child.id().unwrap(), nbd.dir.path().to_path_buf()),
            Backend::Raw(_) => unreachable!(),
        };
        assert!(private.join("nbd.sock").exists());
        drop(img);
        assert!(!private.exists());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // Gone, or a zombie waiting to be reaped.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "qemu-nbd survived the drop: {stat}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        // Another QEMU process holds it writable, as a running VM would.
        let socket = dir.path().join("holder.sock");
        let mut holder = std::process::Command::new("qemu-nbd")
            .arg("--persistent")
            .arg("-k")
            .arg(&socket)
            .args(["-f", "qcow2"])
            .arg(&path)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(holder.try_wait().unwrap().is_none(), "the holder exited");
            assert!(Instant::now() < deadline, "the holder never listened");
            std::thread::sleep(Duration::from_millis(20));
        }
        for writable in [true, false] {
            let err = DiskImage::open(&path, DiskFormat::Qcow2, writable)
                .await
                .err()
                .expect("must fail");
            let msg = format!("{err:#}");
            eprintln!("writable {writable}: {msg}");
            assert!(
                msg.contains("in use by a running VM") && msg.contains("stop the VM first"),
                "{msg}"
            );
            assert!(msg.contains(p(&path)), "{msg}");
        }
        holder.kill().unwrap();
        holder.wait().unwrap();

        // Free again.
        let mut img = DiskImage::open(&path, DiskFormat::Qcow2, false)
            .await
            .unwrap();
        let mut buf = [0u8; 3];
        img.read_at(0, &mut buf).await.unwrap();
        img.close().await.unwrap();

        let err = DiskImage::open(&dir.path().join("absent.qcow2"), DiskFormat::Qcow2, false)
            .await
            .err()
            .unwrap();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("absent.qcow2") && msg.contains("does not exist"),
            "{msg}"
        );
    }
}
