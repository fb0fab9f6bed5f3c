//! Booting the project's guest kernel: both image formats, SMP, the ways a guest ends, and
//! the serial console in both directions. Every test boots a real guest, through the nested
//! sandbox where this host has no hardware virtualization.

mod common;

use std::time::Duration;

use common::{artifacts, temp_path, tiny_elf, Vm, READY};

/// Asserts a clean run of a guest command: the marker, the command's status and exit 0.
fn assert_guest_ok(out: &common::Output) {
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(out.stdout.contains(READY), "{}", out.dump());
    assert_eq!(out.guest_exit(), Some(0), "{}", out.dump());
}

#[test]
fn elf_vmlinux_boots_to_userspace() {
    sandboxed!();
    let out = Vm::guest_running("echo hello-from-$(uname -s)").run();
    assert_guest_ok(&out);
    assert!(out.stdout.contains("hello-from-Linux"), "{}", out.dump());
}

#[test]
fn bzimage_boots_to_userspace() {
    sandboxed!();
    let a = artifacts();
    let out = Vm::new()
        .arg("--kernel")
        .arg(&a.bzimage)
        .arg("--initrd")
        .arg(&a.initramfs)
        .arg("--cmdline")
        .arg("console=ttyS0 reboot=k panic=-1 ferrovm.test=bz -- tr a-z A-Z < /proc/cmdline")
        .run();
    assert_guest_ok(&out);
    // Upper-cased by the guest, so the kernel's own echo of its command line cannot match.
    assert!(
        out.stdout
            .contains("CONSOLE=TTYS0 REBOOT=K PANIC=-1 FERROVM.TEST=BZ"),
        "{}",
        out.dump()
    );
}

#[test]
fn four_vcpus_come_online() {
    sandboxed!();
    let out = Vm::guest_running(
        "echo cpus=$(grep -c ^processor /proc/cpuinfo) online=$(cat /sys/devices/system/cpu/online)",
    )
    .arg("--cpus")
    .arg("4")
    .run();
    assert_guest_ok(&out);
    assert!(out.stdout.contains("cpus=4 online=0-3"), "{}", out.dump());
}

#[test]
fn guest_memory_size_is_what_was_asked() {
    sandboxed!();
    let out = Vm::guest_running("grep MemTotal /proc/meminfo")
        .arg("--memory")
        .arg("512")
        .run();
    assert_guest_ok(&out);
    let kib: u64 = out
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal\n{}", out.dump()));
    // The kernel keeps some for itself; more than 400 MiB and at most 512 MiB must show.
    assert!(
        (400 * 1024..=512 * 1024).contains(&kib),
        "MemTotal {kib} kB\n{}",
        out.dump()
    );
}

#[test]
fn guest_poweroff_ends_with_status_0() {
    sandboxed!();
    let out = Vm::guest_running("poweroff -f").run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(out.stdout.contains(READY), "{}", out.dump());
    assert_eq!(
        out.guest_exit(),
        None,
        "poweroff must end the VM before init's marker"
    );
}

#[test]
fn guest_reboot_through_i8042_ends_with_status_0() {
    sandboxed!();
    let out = Vm::guest_running("reboot -f").run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(out.stdout.contains(READY), "{}", out.dump());
    assert_eq!(out.guest_exit(), None, "{}", out.dump());
}

#[test]
fn guest_reboot_through_triple_fault_ends_with_status_0() {
    sandboxed!();
    let out = Vm::guest()
        .arg("--cmdline")
        .arg("console=ttyS0 quiet reboot=t panic=-1 -- reboot -f")
        .run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(out.stdout.contains(READY), "{}", out.dump());
}

#[test]
fn guest_command_status_and_output_come_back() {
    sandboxed!();
    let out = Vm::guest_running("echo out-$((3*5))-line; exit 7").run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(out.stdout.contains("out-15-line"), "{}", out.dump());
    assert_eq!(out.guest_exit(), Some(7), "{}", out.dump());
}

#[test]
fn serial_file_backend_captures_the_console() {
    sandboxed!();
    let log = temp_path("serial.log");
    let out = Vm::guest_running("echo captured-$((6*7))")
        .arg("--serial")
        .arg(format!("file={}", log.display()))
        .run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains(READY), "serial log:\n{text}");
    assert!(text.contains("captured-42"), "serial log:\n{text}");
    assert!(
        text.contains("ferrovm-guest: exit=0"),
        "serial log:\n{text}"
    );
    assert!(
        !out.stdout.contains("captured-42"),
        "guest output leaked to stdout\n{}",
        out.dump()
    );
    let _ = std::fs::remove_file(log);
}

#[test]
fn serial_input_reaches_the_guest() {
    sandboxed!();
    let out = Vm::guest_running("read -r line; echo guest-got-[$line]")
        .stdin_bytes(b"typed-by-host\n")
        .run();
    assert_guest_ok(&out);
    assert!(
        out.stdout.contains("guest-got-[typed-by-host]"),
        "{}",
        out.dump()
    );
}

#[test]
fn sigterm_stops_the_vm_cleanly() {
    sandboxed!();
    let vm = Vm::guest_running("sleep 600").spawn_until(READY, Duration::from_secs(300));
    vm.signal(libc_sigterm());
    let out = vm.finish(Duration::from_secs(30));
    assert_eq!(out.code, Some(128 + libc_sigterm()), "{}", out.dump());
    assert!(
        out.stderr.contains("stopped by signal SIGTERM"),
        "{}",
        out.dump()
    );
}

fn libc_sigterm() -> i32 {
    15
}

#[test]
fn guest_triple_fault_exits_nonzero_with_reason() {
    sandboxed!();
    // ud2 with the boot IDT (one empty entry): #UD -> #GP -> #DF -> triple fault.
    let kernel = temp_path("ud2-kernel");
    std::fs::write(&kernel, tiny_elf(&[0x0f, 0x0b])).unwrap();
    let out = Vm::new()
        .arg("--kernel")
        .arg(&kernel)
        .timeout(Duration::from_secs(60))
        .run();
    assert_eq!(out.code, Some(1), "{}", out.dump());
    assert!(out.reason().contains("triple fault"), "{}", out.dump());
    let _ = std::fs::remove_file(kernel);
}

#[test]
fn guest_kernel_panic_is_a_failure_not_a_reboot() {
    sandboxed!();
    // panic=-1 makes the kernel restart at once; the VMM tells that from an orderly reboot.
    let out = Vm::guest_running("echo c > /proc/sysrq-trigger").run();
    assert_eq!(out.code, Some(1), "{}", out.dump());
    assert!(out.stdout.contains("Kernel panic"), "{}", out.dump());
    assert!(out.reason().contains("kernel panic"), "{}", out.dump());
}

#[test]
fn emulated_kvm_is_refused_at_start_unless_allowed() {
    sandboxed!();
    // This sandbox's KVM is real; the check is shown a host without vmx/svm. `cli; hlt`:
    // every vCPU halted with interrupts off, a power-off.
    let kernel = temp_path("cli-hlt-kernel");
    std::fs::write(&kernel, tiny_elf(&[0xfa, 0xf4])).unwrap();
    let out = Vm::new()
        .arg("--kernel")
        .arg(&kernel)
        .as_if_kvm_were_emulated()
        .run();
    assert_eq!(out.code, Some(1), "{}", out.dump());
    assert!(
        out.reason()
            .starts_with("ferrovm: error: Failed to find hardware virtualization under /dev/kvm"),
        "{}",
        out.dump()
    );
    assert!(
        out.stderr.contains("--allow-emulated-kvm"),
        "{}",
        out.dump()
    );

    let out = Vm::new()
        .arg("--kernel")
        .arg(&kernel)
        .arg("--allow-emulated-kvm")
        .as_if_kvm_were_emulated()
        .env("RUST_LOG", "warn")
        .run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(
        out.stderr
            .contains("No hardware virtualization under /dev/kvm"),
        "{}",
        out.dump()
    );
    assert!(
        out.stderr.contains("(--allow-emulated-kvm)"),
        "{}",
        out.dump()
    );
    let _ = std::fs::remove_file(kernel);
}
