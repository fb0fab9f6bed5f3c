//! The device accounting (`--metrics`): after a guest reads the same amount through an IDE
//! disk by PIO, an IDE disk by bus-master DMA and a virtio-blk disk, the report shows each
//! model's exits, notifications, interrupts and bytes as the models imply, and KVM's own
//! count of every exit; SIGUSR1 writes the report while the VM runs.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{temp_path, TempFile, Vm};
use serde_json::Value;

fn read_report(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap();
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("bad JSON ({e}):\n{text}"))
}

fn device<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == name)
        .unwrap_or_else(|| panic!("no device {name} in {report}"))
}

fn count(dev: &Value, key: &str) -> u64 {
    dev[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {dev}"))
}

/// Reads of the named register, summed over its addresses.
fn register_reads(dev: &Value, register: &str) -> u64 {
    dev["registers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["register"] == register)
        .map(|r| r["reads"].as_u64().unwrap())
        .sum()
}

/// SIGUSR1 on x86_64 Linux.
const SIGUSR1: i32 = 10;

/// Writes summed over the named register's addresses.
fn register_writes(dev: &Value, register: &str) -> u64 {
    dev["registers"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["register"] == register)
        .map(|r| r["writes"].as_u64().unwrap())
        .sum()
}

/// KVM's counters: present where the host has binary statistics (Linux 5.14+), and if not,
/// the report says why instead of showing zeros.
fn kvm_counters(report: &Value) -> Option<&Value> {
    let kvm = &report["kvm"];
    match kvm["available"].as_bool() {
        Some(true) => Some(&kvm["counters"]),
        Some(false) => {
            assert!(kvm["why"].as_str().is_some_and(|w| !w.is_empty()), "{kvm}");
            None
        }
        None => panic!("no kvm object in {report}"),
    }
}

#[test]
fn exits_and_bytes_per_model_are_reported() {
    sandboxed!();
    const MIB: u64 = 4;
    let imgs: Vec<TempFile> = [
        "metrics-pio.img",
        "metrics-slave.img",
        "metrics-dma.img",
        "metrics-vd.img",
    ]
    .iter()
    .map(|t| TempFile::sparse(t, 16 << 20))
    .collect();
    let report = TempFile(temp_path("metrics.json"));
    // sda and sdb are ide0 (PIO only), sdc is ide1 (DMA).
    let out = Vm::guest_running(&format!(
        "dd if=/dev/sda of=/dev/null bs=64k count={n} iflag=direct 2>/dev/null && \
         dd if=/dev/sdc of=/dev/null bs=64k count={n} iflag=direct 2>/dev/null && \
         dd if=/dev/vda of=/dev/null bs=64k count={n} iflag=direct 2>/dev/null && echo read-ok",
        n = MIB * 16
    ))
    .arg("--disk")
    .arg(format!("{},model=ide-pio", imgs[0].0.display()))
    .arg("--disk")
    .arg(format!("{},model=ide-pio", imgs[1].0.display()))
    .arg("--disk")
    .arg(format!("{},model=ide", imgs[2].0.display()))
    .arg("--disk")
    .arg(imgs[3].0.display().to_string())
    .arg("--metrics")
    .arg(&report.0)
    .run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(
        out.stdout.contains("read-ok\n") || out.stdout.contains("read-ok\r\n"),
        "{}",
        out.dump()
    );

    let r = read_report(&report.0);
    let pio = device(&r, "ide0");
    let dma = device(&r, "ide1");
    let vda = device(&r, "vda");
    assert_eq!(
        (pio["model"].as_str(), pio["class"].as_str()),
        (Some("ide"), Some("block"))
    );
    assert_eq!(vda["model"].as_str(), Some("virtio-blk"));
    let bytes = MIB << 20;
    // The partition scan and the page cache read a little more than dd asked for.
    for d in [pio, dma, vda] {
        assert!(count(d, "bytes_to_guest") >= bytes, "{d}");
        assert!(count(d, "interrupts") > 0, "{d}");
    }
    // PIO moves each 512-byte sector with one `rep insw` exit at least.
    assert!(register_reads(pio, "data") >= bytes / 512, "{pio}");
    assert!(
        count(pio, "exits") > count(pio, "bytes_to_guest") / 512,
        "{pio}"
    );
    // DMA: the data register is only used for IDENTIFY; a request is a handful of register
    // accesses, the bus master's among them, whatever its size.
    assert!(register_reads(dma, "data") < 16, "{dma}");
    assert!(register_writes(dma, "bm_command") > 0, "{dma}");
    assert!(register_writes(dma, "bm_prd") > 0, "{dma}");
    // (measured: 1650 exits for 4 MiB by DMA, 64 KiB per request, against 11751 by PIO)
    assert!(
        count(dma, "exits") * 4 < count(pio, "exits"),
        "{dma}\n{pio}"
    );
    // virtio: requests are announced by notifications KVM handles in the kernel, and the
    // guest reads interrupt status over MMIO: far fewer exits to userspace than IDE.
    assert!(count(vda, "notifications") > 0, "{vda}");
    assert!(
        count(vda, "exits") * 10 < count(pio, "exits"),
        "{vda}\n{pio}"
    );
    // The console UART is accounted too.
    let tty = device(&r, "ttyS0");
    assert!(
        count(tty, "bytes_from_guest") >= out.stdout.len() as u64 / 2,
        "{tty}"
    );
    // KVM counted every exit, those ferrovm handled among them.
    if let Some(kvm) = kvm_counters(&r) {
        let device_exits: u64 = r["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| count(d, "exits"))
            .sum();
        let to_userspace = count(kvm, "io_exits") + count(kvm, "mmio_exits");
        assert!(
            to_userspace >= device_exits,
            "{kvm}: devices saw {device_exits}"
        );
        assert!(count(kvm, "exits") > to_userspace, "{kvm}");
        assert!(count(kvm, "halt_exits") > 0, "{kvm}");
    }
}

#[test]
fn sigusr1_writes_the_report_while_the_vm_runs() {
    sandboxed!();
    let report = TempFile(temp_path("metrics-usr1.json"));
    let vm = Vm::guest_running("echo metrics-ready-$((6*7)); sleep 5")
        .arg("--metrics")
        .arg(&report.0)
        .spawn_until("metrics-ready-42", Duration::from_secs(300));
    // Written once at start (so a bad path fails early), with no exits yet.
    let first = count(&read_report(&report.0), "uptime_ns");
    vm.signal(SIGUSR1);
    let deadline = Instant::now() + Duration::from_secs(20);
    let live = loop {
        let r = read_report(&report.0);
        if count(&r, "uptime_ns") > first {
            break r;
        }
        assert!(Instant::now() < deadline, "SIGUSR1 wrote no new report");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(count(device(&live, "ttyS0"), "exits") > 0, "{live}");
    if let Some(kvm) = kvm_counters(&live) {
        assert!(count(kvm, "exits") > 0, "{live}");
    }
    let out = vm.finish(Duration::from_secs(120));
    assert_eq!(
        out.code,
        Some(0),
        "SIGUSR1 does not stop the VM\n{}",
        out.dump()
    );
    let last = read_report(&report.0);
    assert!(count(&last, "uptime_ns") > count(&live, "uptime_ns"));
}

#[test]
fn msix_spares_virtio_pci_the_interrupt_exits_of_virtio_mmio() {
    sandboxed!();
    // The same reads through a virtio-blk disk on each transport: virtio-mmio's driver reads
    // InterruptStatus and writes InterruptACK for every interrupt (two exits each); with
    // MSI-X a virtio-pci interrupt costs none.
    const MIB: u64 = 4;
    let imgs: Vec<TempFile> = ["metrics-pci.img", "metrics-mmio.img"]
        .iter()
        .map(|t| TempFile::sparse(t, 16 << 20))
        .collect();
    let report = TempFile(temp_path("metrics-transports.json"));
    let out = Vm::guest_running(&format!(
        "dd if=/dev/vda of=/dev/null bs=4k count={n} iflag=direct 2>/dev/null && \
         dd if=/dev/vdb of=/dev/null bs=4k count={n} iflag=direct 2>/dev/null && echo read-ok",
        n = MIB * 256
    ))
    .arg("--disk")
    .arg(format!("{},transport=pci", imgs[0].0.display()))
    .arg("--disk")
    .arg(format!("{},transport=mmio", imgs[1].0.display()))
    .arg("--metrics")
    .arg(&report.0)
    .run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(out.stdout.contains("read-ok"), "{}", out.dump());
    let r = read_report(&report.0);
    let (pci, mmio) = (device(&r, "vda"), device(&r, "vdb"));
    // 1024 direct 4 KiB reads each: an interrupt per request or so on both.
    for d in [pci, mmio] {
        assert!(count(d, "interrupts") >= 500, "{d}");
        assert!(count(d, "bytes_to_guest") >= MIB << 20, "{d}");
    }
    assert!(
        register_reads(mmio, "interrupt_status") >= count(mmio, "interrupts") / 2,
        "{mmio}"
    );
    assert_eq!(register_reads(pci, "isr"), 0, "MSI-X: no ISR reads\n{pci}");
    assert!(
        count(pci, "exits") * 4 < count(mmio, "exits"),
        "pci {} exits, mmio {}\n{pci}\n{mmio}",
        count(pci, "exits"),
        count(mmio, "exits")
    );
}
