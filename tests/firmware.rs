//! What the guest finds its devices and its way out through: the ACPI tables (power off
//! through S5, reboot through the reset register, a panic still a failure), virtio-mmio
//! devices found in the DSDT or, without ACPI, on the command line, and virtio-pci with
//! MSI-X or, under `pci=nomsi`, INTx. The tests boot the project's guest, and Debian's stock
//! kernel for power off.

mod common;

use common::{TempFile, Vm, CMDLINE};

fn assert_guest_ok(out: &common::Output) {
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert_eq!(out.guest_exit(), Some(0), "{}", out.dump());
}

/// The guest's line `key=value`'s value.
fn value<'a>(out: &'a common::Output, key: &str) -> &'a str {
    out.stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("guest printed no {key}=\n{}", out.dump()))
        .trim()
}

#[test]
fn poweroff_goes_through_acpi_s5() {
    sandboxed!();
    poweroff_through_s5();
}

#[test]
fn the_stock_kernel_powers_off_through_acpi_s5() {
    sandboxed!();
    let _stock = common::on_stock_kernel();
    poweroff_through_s5();
}

fn poweroff_through_s5() {
    // No init epilogue: poweroff is the command, so the VM ends through it, not through
    // the reboot init would do.
    let out = Vm::guest()
        .arg("--cmdline")
        .arg(format!("{CMDLINE} -- echo acpi=$(ls /sys/firmware/acpi/tables | grep -c -x -E 'DSDT|FACP|APIC|FACS'); poweroff -f"))
        .env("RUST_LOG", "info")
        .run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert_eq!(value(&out, "acpi"), "4", "the guest found the tables");
    assert!(
        out.stderr.contains("The guest powered off through ACPI S5"),
        "{}",
        out.dump()
    );
}

#[test]
fn reboot_goes_through_the_acpi_reset_register() {
    sandboxed!();
    // reboot=acpi: the kernel writes the FADT's reset value to its reset register.
    let out = Vm::guest()
        .arg("--cmdline")
        .arg("console=ttyS0 quiet reboot=acpi panic=-1 -- reboot -f")
        .env("RUST_LOG", "info")
        .run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(
        out.stderr
            .contains("the guest reset the machine through the reset register"),
        "{}",
        out.dump()
    );
}

#[test]
fn a_panic_resetting_through_acpi_is_still_a_failure() {
    sandboxed!();
    let out = Vm::guest()
        .arg("--cmdline")
        .arg("console=ttyS0 quiet reboot=acpi panic=-1 -- echo c > /proc/sysrq-trigger")
        .run();
    assert_eq!(out.code, Some(1), "{}", out.dump());
    assert!(out.reason().contains("kernel panic"), "{}", out.dump());
    // The crash report has the registers of the vCPU that wrote the reset register, RIP
    // symbolized from the vmlinux.
    assert!(
        out.stderr
            .lines()
            .any(|l| l.trim_start().starts_with("RIP 0xffffffff") && l.contains("+0x")),
        "{}",
        out.dump()
    );
}

/// Boots with one 16 MiB virtio disk on `transport` and `cmdline` (before ` -- `), and has
/// the guest say whether it found the disk and ACPI.
fn boot_with_disk(transport: &str, cmdline: &str, extra: &[&str]) -> common::Output {
    let img = TempFile::sparse("fw.img", 16 << 20);
    let mut vm = Vm::guest();
    // One `eval` word: the kernel hands init at most about 30 arguments.
    vm.arg("--cmdline")
        .arg(format!(
            "{cmdline} -- eval \"test -b /dev/vda && echo disk=yes; \
             test -d /sys/firmware/acpi/tables && echo acpi=yes || echo acpi=no; \
             dd if=/dev/vda of=/dev/null bs=64k count=64 iflag=direct 2>/dev/null && echo read=ok; \
             echo msi=$(grep -c PCI-MSI /proc/interrupts); \
             echo mmioparam=$(grep -c virtio_mmio[.]device= /proc/cmdline)\""
        ))
        .arg("--disk")
        .arg(format!("{},transport={transport}", img.0.display()));
    for a in extra {
        vm.arg(a);
    }
    vm.run()
}

#[test]
fn virtio_mmio_devices_are_found_in_the_dsdt() {
    sandboxed!();
    let out = boot_with_disk("mmio", CMDLINE, &[]);
    assert_guest_ok(&out);
    assert_eq!(value(&out, "disk"), "yes");
    assert_eq!(value(&out, "acpi"), "yes");
    assert_eq!(value(&out, "read"), "ok");
    // Described in the DSDT, not passed on the command line.
    assert_eq!(value(&out, "mmioparam"), "0");
}

#[test]
fn acpi_off_finds_virtio_mmio_devices_on_the_command_line() {
    sandboxed!();
    let out = boot_with_disk("mmio", &format!("{CMDLINE} acpi=off"), &[]);
    assert_guest_ok(&out);
    assert_eq!(value(&out, "disk"), "yes");
    assert_eq!(value(&out, "acpi"), "no");
    assert_eq!(value(&out, "read"), "ok");
    assert_eq!(value(&out, "mmioparam"), "1");
}

#[test]
fn no_acpi_flag_leaves_the_mp_table_and_the_command_line() {
    sandboxed!();
    let out = boot_with_disk("mmio", CMDLINE, &["--no-acpi"]);
    assert_guest_ok(&out);
    assert_eq!(value(&out, "disk"), "yes");
    assert_eq!(value(&out, "acpi"), "no");
    assert_eq!(value(&out, "mmioparam"), "1");
}

#[test]
fn virtio_pci_uses_msix_and_one_vector_per_queue() {
    sandboxed!();
    let out = boot_with_disk("pci", CMDLINE, &[]);
    assert_guest_ok(&out);
    assert_eq!(value(&out, "read"), "ok");
    // virtio-blk: one request queue and the configuration change.
    assert_eq!(value(&out, "msi"), "2", "{}", out.dump());
}

#[test]
fn virtio_pci_falls_back_to_intx_under_pci_nomsi() {
    sandboxed!();
    let out = boot_with_disk("pci", &format!("{CMDLINE} pci=nomsi"), &[]);
    assert_guest_ok(&out);
    assert_eq!(value(&out, "disk"), "yes");
    assert_eq!(value(&out, "read"), "ok");
    assert_eq!(value(&out, "msi"), "0", "{}", out.dump());
}

#[test]
fn virtio_pci_works_without_acpi_through_the_mp_table() {
    sandboxed!();
    // acpi=off: the PCI interrupt routing comes from the MP table; MSI-X needs none.
    let out = boot_with_disk("pci", &format!("{CMDLINE} acpi=off"), &[]);
    assert_guest_ok(&out);
    assert_eq!(value(&out, "read"), "ok");
    assert_eq!(value(&out, "acpi"), "no");
}
