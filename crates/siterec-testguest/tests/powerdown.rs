//! The guest honours an ACPI power-button press (QMP `system_powerdown`, as
//! a planned failover stops a VM): booted as a protected VM is (stay, with
//! churn) under `-no-shutdown`, it stops churning, unmounts its data
//! filesystem, says `SITEREC-GUEST POWERDOWN` and powers off, QEMU then
//! reporting status `shutdown`; the disk is left clean and verifies.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use siterec_testguest::{
    Accel, DATA_FILES, Mode, Options, TestGuest, Verdict, choose_accel, default_build_dir,
    find_tool, guest_lines,
};

const SEED: u64 = 20250611;

/// Kills QEMU when the test gives up before it exits.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A QMP connection past the capabilities negotiation.
struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(sock: &Path, qemu: &mut Qemu) -> Qmp {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(sock) {
                Ok(s) => break s,
                Err(e) => {
                    assert!(
                        qemu.0.try_wait().expect("waiting for QEMU").is_none(),
                        "QEMU exited before its QMP socket opened"
                    );
                    assert!(
                        start.elapsed() < Duration::from_secs(10),
                        "connecting to {}: {e}",
                        sock.display()
                    );
                    thread::sleep(Duration::from_millis(50));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("QMP read timeout");
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().expect("cloning the QMP socket")),
            writer: stream,
        };
        let greeting = qmp.line();
        assert!(greeting.contains("\"QMP\""), "QMP greeting: {greeting}");
        qmp.execute("qmp_capabilities");
        qmp
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("reading QMP");
        assert!(n > 0, "QMP connection closed");
        line
    }

    /// The command's reply, events skipped; panics on an error reply.
    fn execute(&mut self, command: &str) -> String {
        writeln!(self.writer, "{{\"execute\": \"{command}\"}}").expect("writing QMP");
        loop {
            let line = self.line();
            if line.contains("\"return\"") {
                return line;
            }
            assert!(!line.contains("\"error\""), "QMP {command}: {line}");
        }
    }

    fn status(&mut self) -> String {
        let reply: String = self
            .execute("query-status")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let at = reply
            .find("\"status\":\"")
            .expect("query-status has a status")
            + 10;
        reply[at..]
            .split('"')
            .next()
            .unwrap_or_default()
            .to_string()
    }
}

fn serial(log: &Path) -> String {
    std::fs::read(log)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// Waits until `done` holds for the serial log.
fn wait_serial(log: &Path, qemu: &mut Qemu, what: &str, done: impl Fn(&[String]) -> bool) {
    let start = Instant::now();
    loop {
        let text = serial(log);
        if done(&guest_lines(&text)) {
            return;
        }
        let exited = qemu.0.try_wait().expect("waiting for QEMU");
        assert!(
            exited.is_none() && start.elapsed() < Duration::from_secs(45),
            "{what}: not seen ({exited:?} after {:.1} s); serial:\n{text}",
            start.elapsed().as_secs_f64()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn power_button_stops_a_churning_guest_with_its_disk_clean() {
    let start = Instant::now();
    let dir = default_build_dir();
    let guest = TestGuest::build(&dir)
        .unwrap_or_else(|e| panic!("building the test guest in {dir:?}: {e}"));
    let qemu_bin = find_tool("qemu-system-x86_64")
        .expect("qemu-system-x86_64 not found: run scripts/deps --test");
    let tmp = tempfile::tempdir().expect("tempdir");
    let disk = tmp.path().join("vm.raw");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(64 << 20))
        .expect("creating a raw disk");
    let qmp_sock = tmp.path().join("qmp.sock");
    let log = tmp.path().join("serial.log");

    // As siterec runs a protected VM: q35, -no-shutdown, QMP, serial to a
    // file; the guest writes its files, then stays up churning.
    let append = Options {
        stay: true,
        churn_kib_per_sec: 256,
        agent: false,
        ..Options::new(Mode::Write, SEED, 40)
    }
    .append();
    let accel = choose_accel();
    let mut cmd = Command::new(qemu_bin);
    cmd.args(["-machine", "q35", "-accel", &accel.to_string()])
        .args(["-m", "256", "-smp", "1"])
        .args(["-nodefaults", "-display", "none", "-no-shutdown"])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_sock.display()))
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()))
        .arg("-kernel")
        .arg(&guest.kernel)
        .arg("-initrd")
        .arg(&guest.initrd)
        .args(["-append", &append])
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    if accel == Accel::Kvm {
        cmd.args(["-cpu", "host"]);
    }
    let mut qemu = Qemu(cmd.spawn().expect("starting qemu-system-x86_64"));
    let mut qmp = Qmp::connect(&qmp_sock, &mut qemu);

    wait_serial(&log, &mut qemu, "the report and churn", |lines| {
        lines
            .iter()
            .any(|l| l == &format!("WROTE {DATA_FILES} files"))
            && lines.iter().any(|l| l.starts_with("CHURN "))
    });
    // Some churn on the mounted filesystem first.
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(qmp.status(), "running");

    let pressed = Instant::now();
    qmp.execute("system_powerdown");
    let status = loop {
        let status = qmp.status();
        if status == "shutdown" || pressed.elapsed() > Duration::from_secs(15) {
            break status;
        }
        thread::sleep(Duration::from_millis(100));
    };
    let text = serial(&log);
    assert_eq!(
        status,
        "shutdown",
        "no power-off {:.1} s after system_powerdown; serial:\n{text}",
        pressed.elapsed().as_secs_f64()
    );
    eprintln!(
        "powered off {:.1} s after system_powerdown ({accel})",
        pressed.elapsed().as_secs_f64()
    );
    let lines = guest_lines(&text);
    let churn = lines.iter().position(|l| l.starts_with("CHURN "));
    let down = lines.iter().position(|l| l == "POWERDOWN");
    assert!(
        down.is_some() && down > churn,
        "no POWERDOWN line after CHURN: {lines:?}\n{text}"
    );
    // Quit, and read until QEMU answers or closes the socket: dropping the
    // socket at once races QEMU's reading of the command. QEMU may close
    // the socket before its reply.
    let _ = writeln!(qmp.writer, "{{\"execute\": \"quit\"}}");
    loop {
        let mut line = String::new();
        match qmp.reader.read_line(&mut line) {
            Ok(n) if n > 0 && !line.contains("\"return\"") => continue,
            _ => break,
        }
    }
    drop(qmp);
    // The guest is powered off and its data on the host already; quit
    // itself is not what this test is about: a QEMU slow to exit on a busy
    // machine is killed and said so.
    let quit = Instant::now();
    while qemu.0.try_wait().expect("waiting for QEMU").is_none() {
        if quit.elapsed() > Duration::from_secs(30) {
            eprintln!("QEMU still running 30 s after quit: killed");
            let _ = qemu.0.kill();
            let _ = qemu.0.wait();
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }

    // Unmounted cleanly: ext2 has no journal, a power cut mid-churn leaves
    // it "not clean".
    if let Some(e2fsck) = find_tool("e2fsck").or_else(|| {
        let p = Path::new("/usr/sbin/e2fsck");
        p.exists().then(|| p.to_path_buf())
    }) {
        let out = Command::new(e2fsck)
            .arg("-n")
            .arg(&disk)
            .output()
            .expect("running e2fsck");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && stdout.contains(": clean,"),
            "e2fsck -n ({}):\n{stdout}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        eprintln!("e2fsck not found: the filesystem's clean state is not checked");
    }

    // And the data is all there.
    let out = guest
        .boot(&disk, Mode::Verify, SEED, Duration::from_secs(60))
        .expect("verify boot");
    assert_eq!(
        out.verdict,
        Verdict::Ok(DATA_FILES),
        "verify after the power-off:\n{}",
        out.serial_log
    );
    eprintln!("done in {:.1} s", start.elapsed().as_secs_f64());
}
