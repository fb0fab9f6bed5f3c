//! The control socket, pause/resume, snapshots and restore: a guest counting on its serial
//! console, appending numbered, flushed records to a virtio-blk disk and an IDE disk and
//! sending a TCP stream through virtio-net is snapshotted, killed and restored, and goes on
//! with no gap, no repeat, every acknowledged record intact and the stream complete; three
//! restore and snapshot cycles in a row (the IDE disk and an e1000 NIC among the devices);
//! damaged snapshots refused; the socket's errors. Every test boots the project's guest.

mod common;

use std::io::Read;
use std::path::Path;
use std::time::{Duration, Instant};

use common::net::HostTap;
use common::records::{
    assert_consecutive, assert_records, assert_stream, guest_stream, numbers, ok, stream_receiver,
    workload,
};
use common::{ferrovm_cli, LocalDir, Output, TempFile, Vm, CMDLINE};

fn client(sock: &Path, args: &[&str]) -> std::process::Output {
    let mut all = args.to_vec();
    let s = sock.to_str().unwrap();
    all.extend(["--api-sock", s]);
    ferrovm_cli(&all)
}

/// Pauses, snapshots into `dir/snap`, and SIGKILLs the VMM; returns what it printed.
fn snapshot_and_kill(vm: common::Running, sock: &Path, snap: &Path) -> Output {
    ok(&client(sock, &["pause"]));
    let info = ok(&client(sock, &["info"]));
    assert!(info.contains("\"state\":\"paused\""), "{info}");
    let t = Instant::now();
    let out = ok(&client(sock, &["snapshot", snap.to_str().unwrap()]));
    eprintln!("snapshot in {:?}: {out}", t.elapsed());
    assert!(snap.join("state").exists() && snap.join("memory").exists());
    vm.signal(9);
    vm.finish(Duration::from_secs(30))
}

/// Waits until `vm` printed `ack=n`.
fn wait_ack(vm: &mut common::Running, n: u64) {
    vm.wait_for(&format!("ack={n}"), Duration::from_secs(400));
}

#[test]
fn a_restored_guest_goes_on_counting_writing_and_streaming() {
    sandboxed!();
    let dir = LocalDir::new("snap");
    let sock = dir.join("api.sock");
    let sock2 = dir.join("api2.sock");
    let snap = dir.join("snap");
    let img = TempFile::sparse("snap-disk.img", 16 << 20);
    let ide = TempFile::sparse("snap-ide.img", 16 << 20);
    let tap = HostTap::new(60);
    // The host end of the TCP stream: 3000 numbered lines the guest sends slowly, so that
    // the snapshot, the kill and the restore happen in the middle of it.
    let receiver = stream_receiver(&tap, 7200);
    let stream = guest_stream(&tap, 7200);
    let mut vm = Vm::guest();
    vm.arg("--cmdline")
        .arg(workload(&stream))
        .arg("--disk")
        .arg(&img.0)
        .arg("--disk")
        .arg(format!("{},model=ide", ide.0.display()))
        .arg("--net")
        .arg(tap.flag())
        .arg("--api-sock")
        .arg(&sock);
    let mut running = vm.spawn_until("ack=0", Duration::from_secs(400));
    wait_ack(&mut running, 15);
    let before = snapshot_and_kill(running, &sock, &snap);
    let acked_before = *numbers(&before.stdout, "ack").last().unwrap();
    // SIGKILLed after the snapshot: everything acknowledged is in the files.
    assert_records(&img.0, acked_before);
    assert_records(&ide.0, acked_before);

    let mut restored = Vm::restore(&snap);
    restored.arg("--api-sock").arg(&sock2);
    let t = Instant::now();
    let mut running = restored.spawn();
    wait_ack(&mut running, acked_before + 10);
    eprintln!("restored and 10 records written in {:?}", t.elapsed());
    // The stream ends (the guest's nc has sent all 3000 lines) before the VM stops.
    if !before.stdout.contains("stream-done-42") {
        running.wait_for("stream-done-42", Duration::from_secs(600));
    }
    ok(&client(&sock2, &["shutdown"]));
    let after = running.finish(Duration::from_secs(60));
    assert_eq!(after.code, Some(0), "{}", after.dump());

    // Concatenated as printed: a line the switch cut is whole again.
    let both = format!("{}{}", before.stdout, after.stdout);
    let dump = format!(
        "--- before ---\n{}\n--- after ---\n{}",
        before.dump(),
        after.dump()
    );
    assert_consecutive(&numbers(&both, "count"), "count", &dump);
    let acks = numbers(&both, "ack");
    assert_consecutive(&acks, "ack", &dump);
    assert_records(&img.0, *acks.last().unwrap());
    assert_records(&ide.0, *acks.last().unwrap());
    // The stream: every line, in order, nothing lost or doubled across the restore.
    assert_stream(&receiver.join().unwrap());
}

#[test]
fn three_restore_and_snapshot_cycles_in_a_row() {
    sandboxed!();
    let dir = LocalDir::new("cycles");
    let img = TempFile::sparse("cycles-disk.img", 16 << 20);
    let ide = TempFile::sparse("cycles-ide.img", 16 << 20);
    let sock = dir.join("api0.sock");
    // An e1000 the guest pings the host through, every 0.3 s: `pong=k` each time a reply came.
    let tap = HostTap::new(61);
    let pinger = format!(
        "{} && (k=0; while true; do ping -c 1 -W 2 {} >/dev/null && echo pong=\\$k; k=\\$((k+1)); sleep 0.3; done) &",
        tap.guest_setup("eth0"),
        tap.host_ip()
    );
    let mut vm = Vm::guest();
    vm.arg("--cmdline")
        .arg(workload(&pinger))
        .arg("--disk")
        .arg(&img.0)
        .arg("--disk")
        .arg(format!("{},model=ide", ide.0.display()))
        .arg("--net")
        .arg(format!("{},model=e1000", tap.flag()))
        .arg("--api-sock")
        .arg(&sock);
    let mut running = vm.spawn_until("ack=0", Duration::from_secs(400));
    wait_ack(&mut running, 5);
    let mut outputs = vec![snapshot_and_kill(running, &sock, &dir.join("snap0"))];
    for cycle in 1..=3 {
        let last = *numbers(&outputs.last().unwrap().stdout, "ack")
            .last()
            .unwrap_or(&0);
        let sock = dir.join(&format!("api{cycle}.sock"));
        let mut restored = Vm::restore(&dir.join(&format!("snap{}", cycle - 1)));
        restored.arg("--api-sock").arg(&sock);
        let mut running = restored.spawn();
        wait_ack(&mut running, last + 5);
        // The e1000 answers after the restore: a ping after this restore's first ack.
        let pongs = numbers(&running.seen_text(), "pong").len();
        let deadline = Instant::now() + Duration::from_secs(120);
        while numbers(&running.seen_text(), "pong").len() < pongs + 2 {
            assert!(
                Instant::now() < deadline,
                "no ping through the e1000 after restore {cycle}:\n{}",
                running.seen_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        outputs.push(snapshot_and_kill(
            running,
            &sock,
            &dir.join(&format!("snap{cycle}")),
        ));
    }
    // Concatenated as printed: a line a snapshot cut is whole again.
    let all: String = outputs.iter().map(|o| o.stdout.clone()).collect();
    let dump: String = outputs.iter().map(Output::dump).collect();
    assert_consecutive(&numbers(&all, "ack"), "ack across 3 restores", &dump);
    assert_records(&img.0, *numbers(&all, "ack").last().unwrap());
    assert_records(&ide.0, *numbers(&all, "ack").last().unwrap());
}

/// Boots a guest, snapshots it paused, and stops it; returns the snapshot.
fn make_snapshot(dir: &LocalDir, img: &Path) -> std::path::PathBuf {
    let sock = dir.join("make.sock");
    let mut vm = Vm::guest();
    vm.arg("--cmdline")
        .arg(workload(""))
        .arg("--disk")
        .arg(img)
        .arg("--api-sock")
        .arg(&sock);
    let mut running = vm.spawn_until("ack=0", Duration::from_secs(400));
    wait_ack(&mut running, 2);
    let snap = dir.join("good");
    snapshot_and_kill(running, &sock, &snap);
    snap
}

#[test]
fn damaged_truncated_and_foreign_snapshots_are_refused_and_nothing_is_written() {
    sandboxed!();
    let dir = LocalDir::new("bad");
    let img = TempFile::sparse("bad-disk.img", 16 << 20);
    let snap = make_snapshot(&dir, &img.0);
    let disk_before = std::fs::read(&img.0).unwrap();
    let state = std::fs::read(snap.join("state")).unwrap();
    let copy = |name: &str, state: &[u8], memory_len: Option<u64>| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("state"), state).unwrap();
        std::fs::copy(snap.join("memory"), d.join("memory")).unwrap();
        if let Some(n) = memory_len {
            std::fs::OpenOptions::new()
                .write(true)
                .open(d.join("memory"))
                .unwrap()
                .set_len(n)
                .unwrap();
        }
        d
    };
    let mut flipped = state.clone();
    let n = flipped.len();
    flipped[n / 2] ^= 0x20;
    let text = String::from_utf8_lossy(&state).replacen("format 1", "format 7", 1);
    let cases = [
        (
            copy("truncated", &state[..state.len() - 100], None),
            "cut short",
        ),
        (copy("corrupt", &flipped, None), "checksum"),
        (copy("version", text.as_bytes(), None), "format 7"),
        (
            copy("garbage", b"not a snapshot at all", None),
            "not a ferrovm snapshot",
        ),
        (copy("short-memory", &state, Some(4096)), "guest memory of"),
        (dir.join("missing"), "Failed to read"),
    ];
    for (d, why) in &cases {
        let out = Vm::restore(d).run();
        assert_eq!(out.code, Some(1), "{}: {}", d.display(), out.dump());
        let reason = out.reason();
        assert!(reason.contains(why), "{}: {reason}", d.display());
    }
    assert_eq!(
        std::fs::read(&img.0).unwrap(),
        disk_before,
        "no restore attempt touched the disk"
    );
}

#[test]
fn the_socket_answers_bad_requests_with_errors_and_the_vm_stays_up() {
    sandboxed!();
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let dir = LocalDir::new("api");
    let sock = dir.join("api.sock");
    let img = TempFile::sparse("api-disk.img", 16 << 20);
    let mut vm = Vm::guest();
    vm.arg("--cmdline")
        .arg(workload(""))
        .arg("--disk")
        .arg(&img.0)
        .arg("--api-sock")
        .arg(&sock);
    let mut running = vm.spawn_until("ack=0", Duration::from_secs(400));
    let status = |req: &[u8]| {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.write_all(req).unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        resp.split(' ').nth(1).unwrap_or("").to_string()
    };
    assert_eq!(status(b"\x16\x03\x01\x02\x00garbage\r\n\r\n"), "400");
    let big = format!(
        "PUT /api/v1/vm.snapshot HTTP/1.1\r\nContent-Length: {}\r\n\r\n",
        1 << 20
    );
    assert_eq!(status(big.as_bytes()), "413");
    assert_eq!(
        status(b"GET /api/v1/vm.selfdestruct HTTP/1.1\r\n\r\n"),
        "404"
    );
    assert_eq!(status(b"DELETE /api/v1/vm.info HTTP/1.1\r\n\r\n"), "405");
    assert_eq!(status(b"PUT /api/v1/vm.resume HTTP/1.1\r\n\r\n"), "409");
    // A snapshot of a running VM is refused.
    let out = client(&sock, &["snapshot", dir.join("s").to_str().unwrap()]);
    assert!(!out.status.success());
    ok(&client(&sock, &["pause"]));
    let out = client(&sock, &["pause"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already paused"),
        "{out:?}"
    );
    // A directory that holds something already: refused, by name, and left alone.
    let busy = dir.join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("keep"), b"mine").unwrap();
    let out = client(&sock, &["snapshot", busy.to_str().unwrap()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("busy") && err.contains("already holds"),
        "{out:?}"
    );
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);
    ok(&client(&sock, &["resume"]));
    // Still running and counting.
    let n = 3;
    wait_ack(&mut running, n);
    let metrics = ok(&client(&sock, &["metrics"]));
    assert!(metrics.contains("\"devices\""), "{metrics}");
    ok(&client(&sock, &["shutdown"]));
    let out = running.finish(Duration::from_secs(60));
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(!sock.exists(), "the socket is removed at exit");
}

#[test]
fn the_power_button_powers_the_guest_off() {
    sandboxed!();
    let dir = LocalDir::new("pwr");
    let sock = dir.join("api.sock");
    let mut vm = Vm::guest();
    vm.arg("--cmdline")
        .arg(format!("{CMDLINE} -- echo waiting-$((6*7)); sleep 600"))
        .arg("--api-sock")
        .arg(&sock)
        .env("RUST_LOG", "info");
    let running = vm.spawn_until("waiting-42", Duration::from_secs(400));
    ok(&client(&sock, &["power-button"]));
    let out = running.finish(Duration::from_secs(120));
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(
        out.stdout.contains("power button pressed"),
        "{}",
        out.dump()
    );
    assert!(
        out.stderr.contains("The guest powered off through ACPI S5"),
        "{}",
        out.dump()
    );
}
