//! Live migration between two ferrovm processes. The guest keeps working the whole time:
//! it counts on its serial console, appends numbered, flushed records to a virtio-blk disk
//! and an IDE disk, keeps a TCP stream going through virtio-net, and rewrites a 64 MiB
//! buffer in a loop; it must come through with no gap and no repeat in the counter, every
//! acknowledged record intact and the stream complete. Copying over a Unix socket (with the
//! RAM hash check of both sides), local mode (memory and TAP handed over), the hash check
//! catching the writes lost without the VMM's dirty bitmap, a destination killed halfway
//! (over TCP), bad peers. Every test boots the project's guest.

mod common;

use std::io::{BufRead, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::net::HostTap;
use common::records::{
    self, assert_consecutive, assert_records, assert_stream, guest_stream, numbers, ok,
    stream_receiver,
};
use common::{ferrovm_bin, ferrovm_cli, LocalDir, Output, TempFile, Vm, CMDLINE};

/// Memory of the migrated guests.
const MEMORY_MIB: &str = "256";

/// The guest's workload (`records::workload`) with `extra` first and, when `dirty`, a 64 MiB
/// buffer rewritten in a loop.
fn workload(extra: &str, dirty: bool) -> String {
    let dirtier = if dirty {
        "(while true; do tr '\\\\0' a </dev/zero | dd of=/dirty bs=1M count=64 iflag=fullblock conv=notrunc 2>/dev/null; done &);"
    } else {
        ""
    };
    records::workload(&format!("{extra} {dirtier}"))
}

/// `ferrovm run --incoming ADDR`.
fn destination(addr: &str) -> Vm {
    let mut vm = Vm::new();
    vm.arg("--incoming").arg(addr);
    vm
}

/// `ferrovm migrate --api-sock SOCK --to ADDR [extra] --json`, running; its JSON lines.
struct Migrate {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
    stderr: std::thread::JoinHandle<String>,
}

impl Migrate {
    fn start(sock: &Path, to: &str, extra: &[&str]) -> Self {
        let mut child = Command::new(ferrovm_bin())
            .args(["migrate", "--json", "--api-sock"])
            .arg(sock)
            .args(["--to", to])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Ok(v) = serde_json::from_str(&line) {
                    let _ = tx.send(v);
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        Self {
            child,
            lines: rx,
            stderr,
        }
    }

    /// Waits for a line with `event` (panics with the client's stderr if none comes).
    fn wait_event(&mut self, event: &str, timeout: Duration) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(v) if v["event"] == event => return v,
                Ok(v) => seen.push(v),
                Err(e) => {
                    let _ = self.child.kill();
                    let st = self.child.wait();
                    let stderr =
                        std::mem::replace(&mut self.stderr, std::thread::spawn(String::new));
                    panic!(
                        "no '{event}' progress line ({e}); the client ended {st:?}, \
                         printed {seen:?}, and on stderr:\n{}",
                        stderr.join().unwrap_or_default()
                    );
                }
            }
        }
    }

    /// Waits for the client to end: its status, every line, its stderr.
    fn finish(mut self) -> (i32, Vec<serde_json::Value>, String) {
        let st = self.child.wait().unwrap();
        let lines: Vec<_> = self.lines.try_iter().collect();
        (st.code().unwrap_or(-1), lines, self.stderr.join().unwrap())
    }
}

/// Shuts the VM behind `sock` down and checks it exits 0.
fn shutdown(sock: &Path, vm: common::Running) -> Output {
    ok(&ferrovm_cli(&[
        "shutdown",
        "--api-sock",
        sock.to_str().unwrap(),
    ]));
    let out = vm.finish(Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{}", out.dump());
    out
}

/// A guest with the whole workload migrated with `extra` flags; checks everything came
/// through and returns the client's summary.
fn migrate_working_guest(tag: &str, tap_n: u8, extra: &[&str], shared: bool) -> serde_json::Value {
    let dir = LocalDir::new(tag);
    let (src_sock, dst_sock, mig) = (
        dir.join("src.sock"),
        dir.join("dst.sock"),
        dir.join("mig.sock"),
    );
    let img = TempFile::sparse(&format!("{tag}-disk.img"), 16 << 20);
    let ide = TempFile::sparse(&format!("{tag}-ide.img"), 16 << 20);
    let tap = HostTap::multi_queue(tap_n);
    let port = 7300 + u16::from(tap_n);
    let receiver = stream_receiver(&tap, port);
    let mut vm = Vm::guest();
    vm.arg("--memory")
        .arg(MEMORY_MIB)
        .arg("--cmdline")
        .arg(workload(&guest_stream(&tap, port), true))
        .arg("--disk")
        .arg(&img.0)
        .arg("--disk")
        .arg(format!("{},model=ide", ide.0.display()))
        .arg("--net")
        .arg(tap.flag())
        .arg("--api-sock")
        .arg(&src_sock)
        .env("FERROVM_MIGRATION_VERIFY", "1");
    if shared {
        vm.arg("--memory-shared");
    }
    let mut src = vm.spawn_until("ack=0", Duration::from_secs(400));
    src.wait_for("ack=10", Duration::from_secs(400));
    let mut dst = destination(&format!("unix:{}", mig.display()));
    dst.arg("--api-sock").arg(&dst_sock);
    let mut dst = dst.spawn();
    // The destination listens once it printed so (stderr): wait for its socket.
    let t = Instant::now();
    while !mig.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let m = Migrate::start(&src_sock, &format!("unix:{}", mig.display()), extra);
    let (code, lines, stderr) = m.finish();
    let before = src.finish(Duration::from_secs(60));
    assert_eq!(code, 0, "migrate: {stderr}\n{lines:?}\n{}", before.dump());
    assert_eq!(
        before.code,
        Some(0),
        "the source exits 0 once the VM moved\n{}",
        before.dump()
    );
    let summary = lines.last().unwrap().clone();
    assert_eq!(summary["event"], "completed", "{lines:?}");
    eprintln!("{tag}: {summary}");
    let acked_before = numbers(&before.stdout, "ack").last().copied().unwrap_or(0);
    dst.wait_for(
        &format!("ack={}", acked_before + 10),
        Duration::from_secs(400),
    );
    // The stream ends (all 3000 lines sent) before the VM stops.
    if !before.stdout.contains("stream-done-42") {
        dst.wait_for("stream-done-42", Duration::from_secs(600));
    }
    let after = shutdown(&dst_sock, dst);
    // Concatenated as printed: a line the switch cut is whole again.
    let both = format!("{}{}", before.stdout, after.stdout);
    let dump = format!(
        "--- source ---\n{}\n--- destination ---\n{}",
        before.dump(),
        after.dump()
    );
    assert_consecutive(&numbers(&both, "count"), "count", &dump);
    let acks = numbers(&both, "ack");
    assert_consecutive(&acks, "ack", &dump);
    assert_records(&img.0, *acks.last().unwrap());
    assert_records(&ide.0, *acks.last().unwrap());
    assert_stream(&receiver.join().unwrap());
    summary
}

#[test]
fn a_guest_migrated_by_copying_goes_on_counting_writing_streaming_and_dirtying() {
    sandboxed!();
    let s = migrate_working_guest("copy", 70, &[], false);
    assert_eq!(s["mode"], "copy");
    assert!(
        s["passes"].as_u64().unwrap() >= 2,
        "a dirtying guest needs more than one pass: {s}"
    );
    assert!(
        s["ram_hash"].is_string(),
        "both sides' RAM hashes matched: {s}"
    );
}

#[test]
fn local_migration_hands_memory_and_taps_over_without_copying() {
    sandboxed!();
    let s = migrate_working_guest("local", 71, &["--local"], true);
    assert_eq!(s["mode"], "local");
    assert_eq!(s["pages_sent"], 0, "no page copied: {s}");
}

#[test]
fn without_the_vmm_dirty_bitmap_the_ram_hash_catches_the_lost_writes() {
    sandboxed!();
    let dir = LocalDir::new("lost");
    let (src_sock, mig) = (dir.join("src.sock"), dir.join("mig.sock"));
    let img = TempFile::sparse("lost-disk.img", 16 << 20);
    let tap = HostTap::multi_queue(72);
    // The host sends the guest a steady stream: every frame lands in guest memory by a
    // VMM write (virtio-net receive), which only the VMM's bitmap records.
    let guest = format!(
        "{} && (nc -l -p 7400 >/dev/null &);",
        tap.guest_setup("eth0")
    );
    let mut vm = Vm::guest();
    vm.arg("--memory")
        .arg(MEMORY_MIB)
        .arg("--cmdline")
        .arg(workload(&guest, false))
        .arg("--disk")
        .arg(&img.0)
        .arg("--net")
        .arg(tap.flag())
        .arg("--api-sock")
        .arg(&src_sock)
        .env("FERROVM_MIGRATION_VERIFY", "1")
        .env("FERROVM_MIGRATION_TEST_NO_VMM_DIRTY", "1");
    let mut src = vm.spawn_until("ack=0", Duration::from_secs(400));
    src.wait_for("ack=5", Duration::from_secs(400));
    let guest_ip = tap.guest_ip();
    let sender = std::thread::spawn(move || {
        let t = Instant::now();
        let mut s = loop {
            match std::net::TcpStream::connect((guest_ip, 7400)) {
                Ok(s) => break s,
                Err(_) if t.elapsed() < Duration::from_secs(60) => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => panic!("cannot reach the guest: {e}"),
            }
        };
        let chunk = vec![0x5au8; 4096];
        let end = Instant::now() + Duration::from_secs(120);
        while Instant::now() < end && s.write_all(&chunk).is_ok() {}
    });
    std::thread::sleep(Duration::from_secs(2));
    let dst = destination(&format!("unix:{}", mig.display())).spawn();
    let t = Instant::now();
    while !mig.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (code, lines, stderr) =
        Migrate::start(&src_sock, &format!("unix:{}", mig.display()), &[]).finish();
    assert_eq!(code, 1, "the migration fails: {stderr}\n{lines:?}");
    let last = lines.last().unwrap();
    assert_eq!(last["event"], "failed", "{lines:?}");
    assert!(
        last["error"]
            .as_str()
            .unwrap()
            .contains("guest RAM differs"),
        "{last}"
    );
    let dst_out = dst.finish(Duration::from_secs(60));
    assert_eq!(dst_out.code, Some(1), "{}", dst_out.dump());
    assert!(
        dst_out.reason().contains("guest RAM differs"),
        "{}",
        dst_out.dump()
    );
    // The source never stopped being the VM: it runs on.
    let n = numbers(&src.seen_text(), "ack")
        .last()
        .copied()
        .unwrap_or(0);
    src.wait_for(&format!("ack={}", n + 5), Duration::from_secs(400));
    let out = shutdown(&src_sock, src);
    assert_consecutive(&numbers(&out.stdout, "ack"), "ack", &out.dump());
    drop(sender);
}

#[test]
fn a_destination_killed_halfway_leaves_the_source_running() {
    sandboxed!();
    let dir = LocalDir::new("killed");
    let src_sock = dir.join("src.sock");
    let img = TempFile::sparse("killed-disk.img", 16 << 20);
    let mut vm = Vm::guest();
    vm.arg("--memory")
        .arg(MEMORY_MIB)
        .arg("--cmdline")
        .arg(workload("", true))
        .arg("--disk")
        .arg(&img.0)
        .arg("--api-sock")
        .arg(&src_sock);
    let mut src = vm.spawn_until("ack=0", Duration::from_secs(400));
    src.wait_for("ack=5", Duration::from_secs(400));
    // Over TCP this time.
    let dst = destination("tcp:127.0.0.1:7450").spawn();
    std::thread::sleep(Duration::from_secs(1));
    let mut m = Migrate::start(&src_sock, "tcp:127.0.0.1:7450", &[]);
    m.wait_event("connected", Duration::from_secs(60));
    dst.signal(9);
    let (code, lines, stderr) = m.finish();
    assert_eq!(code, 1, "the migration fails: {stderr}\n{lines:?}");
    assert_eq!(lines.last().unwrap()["event"], "failed", "{lines:?}");
    let n = numbers(&src.seen_text(), "ack")
        .last()
        .copied()
        .unwrap_or(0);
    src.wait_for(&format!("ack={}", n + 5), Duration::from_secs(400));
    let out = shutdown(&src_sock, src);
    let acks = numbers(&out.stdout, "ack");
    assert_consecutive(&acks, "ack", &out.dump());
    assert_consecutive(&numbers(&out.stdout, "count"), "count", &out.dump());
    assert_records(&img.0, *acks.last().unwrap());
}

#[test]
fn bad_peers_get_errors_on_both_sides_and_the_source_is_unharmed() {
    sandboxed!();
    let dir = LocalDir::new("peers");
    let src_sock = dir.join("src.sock");
    let mut vm = Vm::guest();
    vm.arg("--cmdline")
        .arg(format!(
            "{CMDLINE} -- eval \"i=0; while true; do echo count=\\$i; i=\\$((i+1)); sleep 0.05; done\""
        ))
        .arg("--api-sock")
        .arg(&src_sock);
    let mut src = vm.spawn_until("count=3", Duration::from_secs(400));
    // Fake destinations: garbage, another protocol version, a peer that hangs up.
    let answers: [(&str, &[u8], &str); 3] = [
        (
            "garbage",
            b"HTTP/1.1 400 Bad Request\r\n\r\n",
            "not a ferrovm migration peer",
        ),
        ("version", b"FERROVM-MIGRATION 99\n", "protocol 99"),
        ("hangup", b"", "closed the connection"),
    ];
    for (name, answer, why) in answers {
        let path = dir.join(&format!("{name}.sock"));
        let listener = UnixListener::bind(&path).unwrap();
        let answer = answer.to_vec();
        let fake = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.write_all(&answer);
        });
        let (code, lines, stderr) =
            Migrate::start(&src_sock, &format!("unix:{}", path.display()), &[]).finish();
        fake.join().unwrap();
        assert_eq!(code, 1, "{name}: {stderr}\n{lines:?}");
        let err = lines.last().unwrap()["error"].as_str().unwrap().to_owned();
        assert!(err.contains(why), "{name}: {err}");
    }
    // Bad requests to the source itself.
    let out = ferrovm_cli(&[
        "migrate",
        "--api-sock",
        src_sock.to_str().unwrap(),
        "--to",
        "/no/scheme",
    ]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("unix:PATH or tcp:HOST:PORT"));
    // A fake source that sends garbage to a real destination: it says what it got.
    let mig = dir.join("dst.sock");
    let dst = destination(&format!("unix:{}", mig.display())).spawn();
    let t = Instant::now();
    while !mig.exists() && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(20));
    }
    // The socket file appears a moment before the destination listens on it.
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(&mig) {
            Ok(s) => break s,
            Err(_) if t.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(50))
            }
            Err(e) => panic!("cannot reach the destination: {e}"),
        }
    };
    s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(
        answer.contains("not a ferrovm migration peer"),
        "{answer:?}"
    );
    let out = dst.finish(Duration::from_secs(30));
    assert_eq!(out.code, Some(1), "{}", out.dump());
    assert!(
        out.reason().contains("not a ferrovm migration peer"),
        "{}",
        out.dump()
    );
    // The source counted through all of it.
    let n = numbers(&src.seen_text(), "count")
        .last()
        .copied()
        .unwrap_or(0);
    src.wait_for(&format!("count={}", n + 5), Duration::from_secs(400));
    let out = shutdown(&src_sock, src);
    assert_consecutive(&numbers(&out.stdout, "count"), "count", &out.dump());
}
