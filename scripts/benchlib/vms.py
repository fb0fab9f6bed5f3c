"""The VM command lines: ferrovm, QEMU microvm (the virtio peer) and QEMU pc (the emulated
peer), all booting the same guest kernel and bench initramfs; ferrovm's --metrics joined
to what a case moved."""

import json
import os
import shutil

from .common import ROOT

FERROVM = os.path.join(ROOT, "target/release/ferrovm")
GUEST_MAC = "52:54:00:12:34:56"

# QEMU microvm puts its first virtio-mmio device at 0xfeb00e00, IRQ 12 (512-byte slots
# going down, IRQs down from 12, without ACPI/ioapic2). Its auto-kernel-cmdline would
# append this to the END of the command line, i.e. after " -- " into the guest command, so
# it is turned off and the parameter written before " -- ".
QEMU_MMIO_DEV0 = "virtio_mmio.device=512@0xfeb00e00:12"
QEMU_MICROVM = "microvm,x-option-roms=off,rtc=off,acpi=off,auto-kernel-cmdline=off"


def qemu_binary():
    return shutil.which("qemu-system-x86_64")


def ferrovm_command(art, cpus, memory, cmd, dev, metrics=None):
    """dev: {"kind": "disk"|"nic"|"uart"|"console", "model": ..., "path"/"tap": ...}."""
    argv = [FERROVM, "run", "--kernel", art["vmlinux"], "--initrd", art["initramfs_bench"],
            "--cpus", str(cpus), "--memory", str(memory), "--serial", "stdio"]
    kind = dev["kind"]
    transport = f",transport={dev['transport']}" if dev.get("transport") else ""
    if kind == "disk":
        argv += ["--disk", f"{dev['path']},model={dev['model']}{transport}"]
    elif kind == "nic":
        argv += ["--net", f"tap={dev['tap']},mac={GUEST_MAC},model={dev['model']}{transport}"]
    elif kind == "uart":
        argv += ["--serial2", f"file={dev['path']}"]
    elif kind == "console":
        argv += ["--console", f"virtio,file={dev['path']}{transport}"]
    if metrics:
        argv += ["--metrics", metrics]
    # ferrovm adds its virtio_mmio.device= parameters before " -- " itself.
    return argv + ["--cmdline", f"console=ttyS0 reboot=k panic=-1 quiet -- {cmd}"]


def qemu_command(art, cpus, memory, cmd, dev):
    """QEMU microvm for the virtio models over mmio; QEMU pc for virtio-pci (modern only,
    disable-legacy=on, as ferrovm's) and for the emulated models (PIIX3 IDE, ne2k_pci or
    e1000, a second ISA UART). pc boots through SeaBIOS: its boot time says nothing."""
    pci = dev.get("transport") == "pci"
    virtio = dev["model"] in ("virtio", "virtio-console") and not pci
    argv = [qemu_binary() or "qemu-system-x86_64"]
    if virtio:
        argv += ["-M", QEMU_MICROVM]
    else:
        argv += ["-M", "pc"]
    argv += ["-accel", "kvm", "-cpu", "host", "-smp", str(cpus), "-m", str(memory),
             "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
             "-serial", "stdio", "-kernel", art["vmlinux"], "-initrd", art["initramfs_bench"]]
    if virtio:
        # The virtio 1.x register layout (version 2), as ferrovm's transport, rather than
        # the legacy one QEMU's virtio-mmio defaults to.
        argv += ["-global", "virtio-mmio.force-legacy=false"]
    kind = dev["kind"]
    if kind == "disk":
        argv += ["-drive", f"id=d0,file={dev['path']},format=raw,if=none,cache=writeback,aio=threads"]
        argv += (["-device", "virtio-blk-device,drive=d0,num-queues=1"] if virtio
                 else ["-device", "virtio-blk-pci,drive=d0,num-queues=1,disable-legacy=on"] if pci
                 else ["-device", "ide-hd,drive=d0,bus=ide.0"])
    elif kind == "nic":
        model = ("virtio-net-device" if virtio else "virtio-net-pci,disable-legacy=on" if pci
                 else "e1000" if dev["model"] == "e1000" else "ne2k_pci")
        argv += ["-netdev", f"tap,id=n0,ifname={dev['tap']},script=no,downscript=no,vhost=off",
                 "-device", f"{model},netdev=n0,mac={GUEST_MAC}"]
    elif kind == "uart":
        argv += ["-serial", f"file:{dev['path']}"]
    elif kind == "console":
        serial = ("virtio-serial-device" if virtio else "virtio-serial-pci,disable-legacy=on")
        argv += ["-device", serial, "-chardev", f"file,id=c0,path={dev['path']}",
                 "-device", "virtconsole,chardev=c0"]
    if virtio:
        # microvm has no i8042: reboot=t ends it through a triple fault (with -no-reboot).
        return argv + ["-append", f"console=ttyS0 reboot=t panic=-1 quiet {QEMU_MMIO_DEV0} -- {cmd}"]
    # QEMU's IDE peer of ferrovm's ide-pio: its guest is kept to PIO (libata.dma=0); the
    # subject that asks for it gets the busmaster DMA the guest would pick by default.
    pio = " libata.dma=0" if kind == "disk" and not dev.get("dma") else ""
    return argv + ["-append", f"console=ttyS0 reboot=k panic=-1 quiet{pio} -- {cmd}"]


def vm_command(vmm, art, cpus, memory, cmd, dev, metrics=None):
    if vmm == "ferrovm":
        return ferrovm_command(art, cpus, memory, cmd, dev, metrics)
    return qemu_command(art, cpus, memory, cmd, dev)


MIB = 1 << 20


def device_metrics(path, pick):
    """ferrovm's --metrics for the devices pick(device) selects, summed, with the ratios:
    exits to userspace and all exits (+ ioeventfd notifications, which KVM handles in the
    kernel but which are VM exits too) per MiB moved, bytes per exit."""
    try:
        with open(path) as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    devs = [d for d in doc.get("devices", []) if pick(d)]
    if not devs:
        return None
    keys = ("exits", "notifications", "interrupts", "bytes_to_guest", "bytes_from_guest",
            "vcpu_handling_ns", "event_loop_ns")
    s = {k: sum(d.get(k, 0) for d in devs) for k in keys}
    moved = s["bytes_to_guest"] + s["bytes_from_guest"]
    total = s["exits"] + s["notifications"]
    # KVM's own count of every exit (the whole VM, all devices and the rest), where the host
    # kernel has binary statistics; else why not.
    kvm = doc.get("kvm") or {"available": False, "why": "no kvm object in the report"}
    counters = kvm.get("counters", {}) if kvm.get("available") else {}
    kvm_exits = counters.get("exits")
    s.update(kvm=kvm, kvm_exits=kvm_exits,
             kvm_exits_per_mib=kvm_exits / (moved / MIB) if kvm_exits is not None and moved else None)
    s.update(devices=[d["name"] for d in devs], models=sorted({d.get("model") for d in devs}),
             mib_moved=moved / MIB, total_exits=total,
             exits_per_mib=s["exits"] / (moved / MIB) if moved else None,
             total_exits_per_mib=total / (moved / MIB) if moved else None,
             interrupts_per_mib=s["interrupts"] / (moved / MIB) if moved else None,
             bytes_per_exit=moved / s["exits"] if s["exits"] else None,
             bytes_per_total_exit=moved / total if total else None,
             # The busiest registers: where the exits go.
             top_registers=sorted(([f"{r['space']} {r['address']} {r['register']}", r["reads"] + r["writes"]]
                                   for d in devs for r in d.get("registers", [])),
                                  key=lambda x: -x[1])[:6],
             uptime_ns=doc.get("uptime_ns"))
    return s
