//! The seccomp sandbox on a real guest: a forbidden syscall from a VMM thread stops the VMM
//! at once with a message naming the thread and the syscall and status 159, and with
//! `--no-seccomp` the same syscall is let through. The syscall is made by the test hook
//! `FERROVM_TEST_FORBIDDEN_SYSCALL=<thread kind>` (see `ferrovm::seccomp`).

mod common;

use std::path::PathBuf;

use common::{temp_path, Output, Vm, READY};

/// The exit status of a VMM stopped by its sandbox (128 + SIGSYS).
const SECCOMP_EXIT: i32 = 159;

/// A small sparse disk image, removed when the test ends.
struct Image(PathBuf);

impl Image {
    fn new() -> Self {
        let path = temp_path("seccomp.img");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(4 << 20)
            .unwrap();
        Self(path)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A guest with one virtio disk that reads it, with the test hook aimed at `kind`.
fn run_with_trigger(kind: &str, extra: &[&str]) -> Output {
    let img = Image::new();
    let mut vm =
        Vm::guest_running("dd if=/dev/vda of=/dev/null bs=4k count=16 && echo read-$((6*7))");
    vm.arg("--disk")
        .arg(&img.0)
        .env("FERROVM_TEST_FORBIDDEN_SYSCALL", kind);
    for a in extra {
        vm.arg(a);
    }
    vm.run()
}

fn assert_stopped_by_sandbox(out: &Output, thread: &str) {
    assert_eq!(out.code, Some(SECCOMP_EXIT), "{}", out.dump());
    let expected = format!(
        "ferrovm: seccomp: thread '{thread}' made forbidden syscall 49 (bind); \
         the VMM stops (run with --no-seccomp to debug)"
    );
    assert!(
        out.stderr.contains(&expected),
        "expected '{expected}'\n{}",
        out.dump()
    );
    assert!(
        !out.stdout.contains("read-42"),
        "the guest kept running\n{}",
        out.dump()
    );
}

#[test]
fn a_forbidden_syscall_in_a_disk_io_thread_stops_the_vmm() {
    sandboxed!();
    let out = run_with_trigger("blk-io", &[]);
    // Any of the disk's I/O threads may be first; the line names the one that was.
    assert!(out.stderr.contains("thread 'vda-io"), "{}", out.dump());
    let thread = out
        .stderr
        .split("thread '")
        .nth(1)
        .and_then(|s| s.split('\'').next())
        .unwrap();
    assert_stopped_by_sandbox(&out, thread);
}

#[test]
fn a_forbidden_syscall_in_a_vcpu_thread_stops_the_vmm() {
    sandboxed!();
    let out = run_with_trigger("vcpu", &[]);
    assert_stopped_by_sandbox(&out, "vcpu0");
}

#[test]
fn without_seccomp_the_same_syscall_is_let_through() {
    sandboxed!();
    let out = run_with_trigger("blk-io", &["--no-seccomp"]);
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(out.stdout.contains(READY), "{}", out.dump());
    assert!(out.stdout.contains("read-42"), "{}", out.dump());
    assert_eq!(out.guest_exit(), Some(0), "{}", out.dump());
    assert!(
        out.stderr.contains("seccomp sandboxing is off"),
        "--no-seccomp is not logged\n{}",
        out.dump()
    );
}
