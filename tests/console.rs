//! The stream devices: the paravirtual console (/dev/hvc0) and its emulated counterpart, the
//! second UART (/dev/ttyS1): output reaches the configured backend, host input reaches the
//! guest. Every test boots the project's guest, hvc0 also over virtio-mmio and on Debian's
//! stock kernel.

mod common;

use std::time::Duration;

use common::{temp_path, Vm};

#[test]
fn hvc0_output_reaches_stdout() {
    sandboxed!();
    let out = Vm::guest_running("echo via-hvc0-$((20+22)) > /dev/hvc0")
        .arg("--console")
        .arg("virtio")
        .run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert_eq!(out.guest_exit(), Some(0), "{}", out.dump());
    assert!(out.stdout.contains("via-hvc0-42"), "{}", out.dump());
}

#[test]
fn hvc0_output_reaches_a_file_and_not_stdout() {
    sandboxed!();
    hvc0_to_a_file("");
}

#[test]
fn hvc0_over_virtio_mmio_reaches_a_file() {
    sandboxed!();
    hvc0_to_a_file(",transport=mmio");
}

#[test]
fn hvc0_on_the_stock_kernel_reaches_a_file() {
    sandboxed!();
    let _stock = common::on_stock_kernel();
    hvc0_to_a_file("");
}

/// 2000 lines through hvc0 (`--console virtio,file=...` plus `opts`) land in the file in
/// order, and not on stdout.
fn hvc0_to_a_file(opts: &str) {
    let log = temp_path("hvc0.log");
    let out = Vm::guest_running("seq 1 2000 > /dev/hvc0")
        .arg("--console")
        .arg(format!("virtio,file={}{opts}", log.display()))
        .run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    let text = std::fs::read_to_string(&log).unwrap();
    let expected: String = (1..=2000).map(|i| format!("{i}\r\n")).collect();
    assert_eq!(
        text.replace("\r\n", "\n"),
        expected.replace("\r\n", "\n"),
        "every line, in order"
    );
    assert!(!out.stdout.contains("1999"), "{}", out.dump());
    let _ = std::fs::remove_file(log);
}

#[test]
fn host_input_reaches_the_guest_through_hvc0() {
    sandboxed!();
    // The guest keeps hvc0 open first: like any tty, input arriving while nobody has it open
    // is discarded by the guest's tty layer, not by the device.
    let mut vm = Vm::guest_running(
        "exec 3<>/dev/hvc0; echo hvc0-open-$((6*7)); read -r line <&3; echo guest-read=[$line]",
    )
    .arg("--console")
    .arg("virtio")
    .stdin_piped()
    // Computed by the guest shell, so the kernel's echo of its command line cannot match.
    .spawn_until("hvc0-open-42", Duration::from_secs(300));
    vm.write_stdin(b"typed-into-hvc0\n");
    let out = vm.finish(Duration::from_secs(120));
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(
        out.stdout.contains("guest-read=[typed-into-hvc0]"),
        "{}",
        out.dump()
    );
}

#[test]
fn ttys1_output_reaches_its_file_byte_for_byte() {
    sandboxed!();
    let log = temp_path("ttyS1.log");
    // Raw mode: no newline translation, so the file must hold exactly what was written.
    let out = Vm::guest_running("stty -F /dev/ttyS1 raw -echo 115200 && seq 1 3000 > /dev/ttyS1")
        .arg("--serial2")
        .arg(format!("file={}", log.display()))
        .run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert_eq!(out.guest_exit(), Some(0), "{}", out.dump());
    let text = std::fs::read_to_string(&log).unwrap();
    let expected: String = (1..=3000).map(|i| format!("{i}\n")).collect();
    assert!(
        text == expected,
        "ttyS1 carried {} of {} bytes intact",
        text.len(),
        expected.len()
    );
    assert!(
        !out.stdout.contains("2999"),
        "ttyS0 stays the console\n{}",
        out.dump()
    );
    let _ = std::fs::remove_file(log);
}

#[test]
fn host_input_reaches_the_guest_through_ttys1() {
    sandboxed!();
    // ttyS0 (the console) is silenced: everything on stdout comes through ttyS1.
    let mut vm = Vm::guest_running(
        "stty -F /dev/ttyS1 raw -echo; exec 3<>/dev/ttyS1; echo ttyS1-open-$((6*7)) >&3; \
         head -c 16 <&3 >/tmp/in; echo guest-read=[$(cat /tmp/in)] >&3",
    )
    .arg("--serial")
    .arg("none")
    .arg("--serial2")
    .arg("stdio")
    .stdin_piped()
    .spawn_until("ttyS1-open-42", Duration::from_secs(300));
    vm.write_stdin(b"typed-into-ttyS1");
    let out = vm.finish(Duration::from_secs(120));
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(
        out.stdout.contains("guest-read=[typed-into-ttyS1]"),
        "{}",
        out.dump()
    );
    assert!(
        !out.stdout.contains("Linux version"),
        "the console stayed off stdout"
    );
}
