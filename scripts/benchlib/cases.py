"""The benchmark matrix: per class (boot, block, net, stream, exec; snapshot and migrate are
in vmstate.py) its subjects (the host baseline, a container, ferrovm's device models,
QEMU's), how one run of each goes and the figures it yields.

A subject is a dict: name, label, kind (host | container | ferrovm | qemu), model (the
device model: virtio, ide (bus-master DMA), ide-pio, ne2k, e1000, uart, virtio-console) and,
for ferrovm, peer (the QEMU subject it is compared with)."""

import os
import re
import shutil
import subprocess
import time

from . import vms
from .common import (READY, GuestError, Unavailable, describe_failure, features, fs_type,
                     guest_command, guest_features_cmd, guest_section, kvm_hw, log, parse_json,
                     percentile, ping_times, run_process, scratch_dir, sh, sh_quiet, sections)
from .vmstate import Migrate, Snapshot


def ferro(model, label, peer, transport=None):
    """A ferrovm subject; virtio ones name their transport (pci, mmio) in name and label."""
    name = f"ferrovm-{model}" + (f"-{transport}" if transport else "")
    return {"name": name, "label": label, "kind": "ferrovm", "model": model, "peer": peer,
            "transport": transport}


def qemu(model, label, transport=None):
    """A QEMU subject; virtio over pci runs on `-M pc` (virtio-*-pci), over mmio on microvm."""
    name = f"qemu-{model}" + ("-pci" if transport == "pci" else "")
    return {"name": name, "label": label, "kind": "qemu", "model": model, "transport": transport}


def host(label):
    return {"name": "host", "label": label, "kind": "host", "model": None}


def container(label):
    return {"name": "container", "label": label, "kind": "container", "model": None}


# A container: the same tool in new mount, pid (and, for block, net) namespaces.
UNSHARE = ["unshare", "--mount", "--pid", "--fork", "--mount-proc"]


class VmClass:
    """What block, net and stream share: one VM per run, the guest script's output
    between markers, ferrovm's metrics joined to the figures."""

    name = ""
    device_kind = ""

    def vm_overhead(self):
        """Seconds a bench VM takes beyond its workload (boot, unpacking the ~80 MB
        initramfs, power-off), for the estimate: measured ~33 s in the nested sandbox."""
        return 35 if os.environ.get("FERROVM_SANDBOX_MODE") == "nested" or not kvm_hw() else 5

    def __init__(self, art, args, p):
        self.art, self.args, self.p = art, args, p
        self.scratch = scratch_dir()
        self.metrics_path = os.path.join(self.scratch, "ferrovm-metrics.json")

    def setup(self):
        pass

    def teardown(self):
        pass

    def device(self, subject):
        raise NotImplementedError

    def guest_script(self, subject):
        raise NotImplementedError

    def command(self, subject):
        cmd = guest_command(self.guest_script(subject))
        return vms.vm_command(subject["kind"], self.art, self.args.cpus, self.args.memory, cmd,
                              self.device(subject),
                              metrics=self.metrics_path if subject["kind"] == "ferrovm" else None)

    def boot_vm(self, subject, watch=None):
        """Runs the subject's VM; returns (console, stderr, rc, seconds, metrics)."""
        if subject["kind"] == "qemu" and not vms.qemu_binary():
            raise Unavailable("qemu-system-x86_64 is not installed")
        if os.path.exists(self.metrics_path):
            os.unlink(self.metrics_path)
        console, stderr, rc, secs = run_process(self.command(subject), self.p["vm_timeout"], watch)
        if subject["kind"] == "ferrovm" and rc == 2:
            raise Unavailable(f"ferrovm refused the command line: {stderr.strip()[-300:]}")
        metrics = None
        if subject["kind"] == "ferrovm":
            metrics = vms.device_metrics(self.metrics_path, self.metrics_pick(subject))
        return console, stderr, rc, secs, metrics

    def metrics_pick(self, subject):
        return lambda d: d.get("class") == self.name

    def figures_of(self, subject):
        return self.FIGURES


# ---------------------------------------------------------------------------------------
# Boot
# ---------------------------------------------------------------------------------------
def read_status(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])  # kB
    except OSError:
        pass
    return None


def guest_rss_kib(pid, mem_mib):
    """RSS of the guest RAM mapping: the anonymous mapping(s) of at least the guest's size."""
    total = 0
    try:
        with open(f"/proc/{pid}/smaps") as f:
            size = None
            for line in f:
                if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                    lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                    size = hi - lo
                elif line.startswith("Rss:") and size is not None:
                    if size >= mem_mib << 20:
                        total += int(line.split()[1])
                    size = None
    except OSError:
        return None
    return total


class Boot:
    name = "boot"
    bench_initramfs = False  # the test initramfs
    MEM_MIB = 256
    FIGURES = [("boot_s", "boot to userspace", "s", "lower")]
    SUBJECTS = [ferro("boot", "ferrovm", "qemu-microvm"),
                # The same without ACPI tables (MP table only), as ferrovm booted before it
                # had them: what ACPI costs at boot.
                dict(ferro("boot", "ferrovm --no-acpi", "qemu-microvm"), name="ferrovm-boot-noacpi"),
                {"name": "qemu-microvm", "label": "QEMU microvm", "kind": "qemu", "model": "boot"}]

    def __init__(self, art, args, p):
        self.art, self.p = art, p
        cmdline = "console=ttyS0 reboot=k panic=-1 quiet -- true"
        self.commands = {
            "ferrovm-boot": [vms.FERROVM, "run", "--kernel", art["vmlinux"], "--initrd", art["initramfs"],
                             "--memory", str(self.MEM_MIB), "--serial", "stdio", "--cmdline", cmdline],
            "ferrovm-boot-noacpi": [vms.FERROVM, "run", "--kernel", art["vmlinux"], "--initrd",
                                    art["initramfs"], "--memory", str(self.MEM_MIB), "--serial",
                                    "stdio", "--no-acpi", "--cmdline", cmdline],
            "qemu-microvm": [vms.qemu_binary() or "qemu-system-x86_64",
                             "-M", "microvm,x-option-roms=off,rtc=off,acpi=off", "-accel", "kvm",
                             "-cpu", "host", "-m", str(self.MEM_MIB), "-smp", "1", "-nodefaults",
                             "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
                             "-kernel", art["vmlinux"], "-initrd", art["initramfs"],
                             # microvm has no i8042: reboot=t ends it through a triple fault.
                             "-append", "console=ttyS0 reboot=t panic=-1 quiet -- true"]}

    def setup(self):
        pass

    def teardown(self):
        pass

    def estimate(self, subject):
        return 6

    def describe(self):
        return (f"vmlinux (PVH) + test initramfs, {self.MEM_MIB} MiB, 1 vCPU; the time from spawning "
                "the VMM to the guest's userspace marker on the serial console.")

    def figures_of(self, subject):
        return self.FIGURES

    def run(self, subject):
        if subject["kind"] == "qemu" and not vms.qemu_binary():
            raise Unavailable("qemu-system-x86_64 is not installed")
        cmd = self.commands[subject["name"]]
        measure = subject["kind"] == "ferrovm"
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)
        os.set_blocking(proc.stdout.fileno(), False)
        buf, elapsed, hwm, guest = b"", None, None, None
        while time.monotonic() - start < self.p["vm_timeout"]:
            try:
                chunk = proc.stdout.read()
            except BlockingIOError:
                chunk = None
            if chunk:
                buf += chunk
                if elapsed is None and READY.encode() in buf:
                    elapsed = time.monotonic() - start
                    if measure:
                        hwm = read_status(proc.pid, "VmHWM")
                        guest = guest_rss_kib(proc.pid, self.MEM_MIB)
            if proc.poll() is not None:
                break
            time.sleep(0.002)
        if measure and elapsed is not None:
            # The peak may come after the marker (the guest runs on until it powers off).
            hwm = read_status(proc.pid, "VmHWM") or hwm
            guest = guest_rss_kib(proc.pid, self.MEM_MIB) or guest
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)
        if elapsed is None:
            raise GuestError(f"no userspace marker from {' '.join(cmd)}:\n"
                             f"{buf.decode(errors='replace')[-2000:]}")
        rec = {"figures": {"boot_s": elapsed}}
        if measure:
            rec["memory"] = {"peak_rss_kib": hwm, "guest_rss_kib": guest,
                             "vmm_overhead_kib": (hwm - guest) if hwm and guest is not None else None}
        return rec


# ---------------------------------------------------------------------------------------
# Block
# ---------------------------------------------------------------------------------------
def fio_figures(doc):
    jobs = {j["jobname"]: j for j in doc.get("jobs", [])}
    missing = {"seq-read", "seq-write", "rand-read-qd1", "rand-read-qd16"} - set(jobs)
    if missing:
        raise GuestError(f"fio: jobs missing from its JSON: {sorted(missing)}")
    for name, j in jobs.items():
        if j.get("error"):
            raise GuestError(f"fio job {name}: error {j['error']}")

    def pct(j, p):
        return j["read"]["clat_ns"]["percentile"][f"{p:.6f}"] / 1000.0

    r1, r16 = jobs["rand-read-qd1"], jobs["rand-read-qd16"]
    return {
        "seq_read_mbps": jobs["seq-read"]["read"]["bw_bytes"] / 1e6,
        "seq_write_mbps": jobs["seq-write"]["write"]["bw_bytes"] / 1e6,
        "rand_read_qd1_iops": r1["read"]["iops"],
        "rand_read_qd1_p50_us": pct(r1, 50),
        "rand_read_qd1_p99_us": pct(r1, 99),
        "rand_read_qd16_iops": r16["read"]["iops"],
        "rand_read_qd16_p50_us": pct(r16, 50),
        "rand_read_qd16_p99_us": pct(r16, 99),
    }


def direct_io_works(path):
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


class Block(VmClass):
    name = "block"
    device_kind = "disk"
    FIGURES = [
        ("seq_read_mbps", "sequential read, 1 MiB, iodepth 4", "MB/s", "higher"),
        ("seq_write_mbps", "sequential write, 1 MiB, iodepth 4", "MB/s", "higher"),
        ("rand_read_qd1_iops", "random read 4 KiB, iodepth 1", "IOPS", "higher"),
        ("rand_read_qd1_p50_us", "random read 4 KiB, iodepth 1, latency p50", "µs", "lower"),
        ("rand_read_qd1_p99_us", "random read 4 KiB, iodepth 1, latency p99", "µs", "lower"),
        ("rand_read_qd16_iops", "random read 4 KiB, iodepth 16", "IOPS", "higher"),
        ("rand_read_qd16_p50_us", "random read 4 KiB, iodepth 16, latency p50", "µs", "lower"),
        ("rand_read_qd16_p99_us", "random read 4 KiB, iodepth 16, latency p99", "µs", "lower"),
    ]
    CHART = ["seq_read_mbps", "seq_write_mbps", "rand_read_qd1_iops", "rand_read_qd16_iops"]
    SUBJECTS = [host("host file"), container("container"),
                ferro("virtio", "ferrovm virtio-blk-pci", "qemu-virtio-pci", "pci"),
                qemu("virtio", "QEMU virtio-blk-pci (pc)", "pci"),
                ferro("virtio", "ferrovm virtio-blk (mmio)", "qemu-virtio", "mmio"),
                qemu("virtio", "QEMU virtio-blk (microvm mmio)", "mmio"),
                ferro("ide-pio", "ferrovm IDE (PIO)", "qemu-ide"), qemu("ide", "QEMU IDE (PIO)"),
                # Bus-master DMA, what ata_piix picks by default on both: ferrovm's
                # `model=ide` against QEMU's IDE with the guest free to use DMA.
                ferro("ide", "ferrovm IDE (DMA)", "qemu-ide-udma"),
                dict(qemu("ide", "QEMU IDE (UDMA)"), name="qemu-ide-udma", dma=True)]
    DISK_NAME = "ferrovm-bench-disk.img"

    def __init__(self, art, args, p):
        super().__init__(art, args, p)
        self.disk = os.path.join(self.scratch, self.DISK_NAME)
        self.host_direct = None

    def setup(self):
        """A raw image with every page allocated once (fallocate on tmpfs allocates zeroed
        pages), so that reads hit real pages rather than holes served from the zero page,
        and writes overwrite allocated pages."""
        log(f"block: a {self.p['disk_mib']} MiB raw image on {self.scratch} ({fs_type(self.scratch)})")
        with open(self.disk, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, self.p["disk_mib"] << 20)
        self.host_direct = direct_io_works(self.disk)

    def teardown(self):
        if os.path.exists(self.disk):
            os.unlink(self.disk)

    def info(self):
        return {"disk": {"path": self.disk, "size_mib": self.p["disk_mib"],
                         "filesystem": fs_type(self.scratch)},
                "host_direct_io": self.host_direct}

    def describe(self):
        p = self.p
        host_io = ("direct=1" if self.host_direct else
                   "buffered (direct=0: this tmpfs refuses O_DIRECT, as tmpfs does before "
                   "Linux 6.6; the file's pages are the page cache, so there is no second "
                   "cache to bypass)")
        return (f"fio, libaio, {p['fio_runtime']} s per job after {p['fio_ramp']} s ramp, on one "
                f"{p['disk_mib']} MiB raw image on {fs_type(self.scratch)} ({self.scratch}, local "
                "to the machine that runs the VMs, never the 9p share). "
                f"Host file and container (`unshare --mount --pid --net`): fio on the image file, {host_io}. "
                f"VMs: {vcpus(self.args.cpus)}, {self.args.memory} MiB, fio direct=1 on the guest's "
                "disk. ferrovm: `--disk IMG,model=virtio|ide|ide-pio` (virtio-blk: preadv/pwritev "
                "through the host page cache on 4 I/O threads; IDE: bus-master DMA, one "
                "preadv/pwritev per request into the PRD buffers, or PIO only with ide-pio, on "
                "the vCPU thread). QEMU: `cache=writeback,aio=threads`; virtio-blk-device "
                "(num-queues=1, modern virtio-mmio) on microvm, `ide-hd` on the PIIX3 IDE of "
                "`-M pc`: QEMU IDE (PIO), its guest booted with `libata.dma=0`, is the peer of "
                "ferrovm's ide-pio; QEMU IDE (UDMA), the same disk with the busmaster DMA the "
                "guest picks by default, the peer of ferrovm's DMA IDE.")

    def fio_args(self, filename, direct):
        p = self.p
        common = (f"--output-format=json --filename={filename} --direct={1 if direct else 0} "
                  f"--ioengine=libaio --time_based --runtime={p['fio_runtime']} "
                  f"--ramp_time={p['fio_ramp']} --stonewall")
        jobs = ("--name=seq-read --rw=read --bs=1M --iodepth=4 "
                "--name=seq-write --rw=write --bs=1M --iodepth=4 "
                "--name=rand-read-qd1 --rw=randread --bs=4k --iodepth=1 "
                "--name=rand-read-qd16 --rw=randread --bs=4k --iodepth=16")
        return f"fio {common} {jobs}"

    def estimate(self, subject):
        jobs = 4 * (self.p["fio_runtime"] + self.p["fio_ramp"]) + 4
        if subject["kind"] in ("host", "container"):
            return jobs
        # PIO IDE: 1 MiB requests take seconds each in the nested sandbox, beyond the runtime.
        pio = subject["model"] == "ide-pio" or (
            subject["kind"] == "qemu" and subject["model"] == "ide" and not subject.get("dma"))
        return jobs + self.vm_overhead() + (90 if pio else 0)

    def device(self, subject):
        return {"kind": "disk", "model": subject["model"], "path": self.disk,
                "dma": subject.get("dma", False), "transport": subject.get("transport")}

    def guest_script(self, subject):
        dev = "vda" if subject["model"] == "virtio" else "sda"
        q = f"/sys/block/{dev}/queue"
        return (guest_features_cmd()
                + guest_section("queue", f"grep . {q}/max_segments {q}/max_hw_sectors_kb {q}/nr_requests")
                + guest_section("fio", self.fio_args(f"/dev/{dev}", True))
                # The transfer mode libata chose (PIO/MWDMA/UDMA), for the IDE cases.
                + guest_section("dmesg", "dmesg | grep -E 'configured for|ata[0-9]' | tail -n 8"))

    def host_command(self, subject):
        argv = self.fio_args(self.disk, self.host_direct).split()
        return UNSHARE + ["--net"] + argv if subject["kind"] == "container" else argv

    def run(self, subject):
        if subject["kind"] in ("host", "container"):
            argv = self.host_command(subject)
            out, err, rc, secs = run_process(argv, self.p["vm_timeout"])
            doc = parse_json(out, f"{subject['name']} fio")
            if rc != 0:
                raise GuestError(describe_failure(subject["name"], out, err, rc, "fio failed"))
            figs = fio_figures(doc)
            log("block: " + ", ".join(f"{k}={v:.1f}" for k, v in figs.items()))
            return {"figures": figs, "seconds": secs, "fio": doc}
        console, stderr, rc, secs, metrics = self.boot_vm(subject)
        sec = sections(console)
        if "fio" not in sec:
            raise GuestError(describe_failure(subject["name"], console, stderr, rc, "no fio output"))
        text, fio_rc = sec["fio"]
        if fio_rc != 0:
            raise GuestError(describe_failure(subject["name"], console, stderr, rc, f"fio exit {fio_rc}"))
        doc = parse_json(text, f"{subject['name']} fio")
        if rc != 0:
            raise GuestError(describe_failure(subject["name"], console, stderr, rc, "VMM exit status"))
        figs = fio_figures(doc)
        log("block: " + ", ".join(f"{k}={v:.1f}" for k, v in figs.items()))
        return {"figures": figs, "seconds": secs, "metrics": metrics,
                "virtio_features": features(console),
                "guest_queue_limits": sec.get("queue", ("", 0))[0].split(),
                "guest_dmesg": sec.get("dmesg", ("", 0))[0].splitlines(), "fio": doc}


# ---------------------------------------------------------------------------------------
# Net
# ---------------------------------------------------------------------------------------
def listening(port):
    try:
        with open("/proc/net/tcp") as f4, open("/proc/net/tcp6") as f6:
            lines = f4.read().splitlines()[1:] + f6.read().splitlines()[1:]
    except OSError:
        return False
    return any(ln.split()[1].endswith(f":{port:04X}") and ln.split()[3] == "0A" for ln in lines)


def iperf_figures(doc, what):
    if "error" in doc:
        raise GuestError(f"iperf3 {what}: {doc['error']}")
    end = doc["end"]
    retr = end["sum_sent"].get("retransmits")
    if retr is not None and not 0 <= retr < 1 << 32:
        retr = None  # -1 as unsigned: the sender could not tell
    return {"gbps": end["sum_received"]["bits_per_second"] / 1e9, "retransmits": retr}


def guest_netdev(text):
    """eth0's counters from the guest's /proc/net/dev."""
    for line in text.splitlines():
        if line.strip().startswith("eth0:"):
            v = [int(x) for x in line.split(":", 1)[1].split()]
            return {"rx_bytes": v[0], "rx_packets": v[1], "rx_errs": v[2], "rx_drop": v[3],
                    "tx_bytes": v[8], "tx_packets": v[9], "tx_errs": v[10], "tx_drop": v[11]}
    return None


class IperfServer:
    """An iperf3 server for one run: a fresh one each time, so that a client that died
    mid-test cannot leave it waiting for the next."""

    def __init__(self, addr, port):
        self.addr, self.port = addr, port

    def __enter__(self):
        scratch = scratch_dir()
        self.log_path = os.path.join(scratch, "iperf3-server.log")
        self.log = open(self.log_path, "w")
        # TMPDIR: iperf3 mmaps an unlinked temporary file per stream, which fails on the
        # sandbox's 9p /tmp ("unable to create a new stream: Bad file descriptor").
        self.proc = subprocess.Popen(["iperf3", "-s", "-B", self.addr, "-p", str(self.port)],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
                                     env=dict(os.environ, TMPDIR=scratch))
        deadline = time.monotonic() + 60
        while not listening(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__()
                with open(self.log_path, errors="replace") as f:
                    raise GuestError(f"the iperf3 server did not start: {f.read()[-500:]}")
            time.sleep(0.1)
        return self

    def text(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def __exit__(self, *exc):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Net(VmClass):
    name = "net"
    device_kind = "nic"
    TAP = "fvbench0"
    HOST_IP, GUEST_IP = "10.203.0.1", "10.203.0.2"
    NETNS, VETH_HOST, VETH_CT = "fvbench-ct", "fvbveth0", "fvbveth1"
    VETH_HOST_IP, VETH_CT_IP = "10.204.0.1", "10.204.0.2"
    PORT = 5201
    FIGURES = [
        ("tcp_tx_gbps", "TCP client -> server (guest -> host)", "Gbit/s", "higher"),
        ("tcp_rx_gbps", "TCP server -> client (host -> guest, -R)", "Gbit/s", "higher"),
        ("rtt_p50_ms", "ping round trip p50", "ms", "lower"),
        ("rtt_p99_ms", "ping round trip p99", "ms", "lower"),
        ("tcp_tx_retransmits", "TCP client -> server, retransmits", "count", "lower"),
        ("tcp_rx_retransmits", "TCP server -> client, retransmits", "count", "lower"),
    ]
    CHART = ["tcp_tx_gbps", "tcp_rx_gbps", "rtt_p50_ms"]
    SUBJECTS = [host("host loopback"), container("container (veth)"),
                ferro("virtio", "ferrovm virtio-net-pci", "qemu-virtio-pci", "pci"),
                qemu("virtio", "QEMU virtio-net-pci (pc)", "pci"),
                ferro("virtio", "ferrovm virtio-net (mmio)", "qemu-virtio", "mmio"),
                qemu("virtio", "QEMU virtio-net (microvm mmio)", "mmio"),
                ferro("ne2k", "ferrovm ne2k", "qemu-ne2k"), qemu("ne2k", "QEMU ne2k_pci"),
                ferro("e1000", "ferrovm e1000", "qemu-e1000"), qemu("e1000", "QEMU e1000 (pc)")]

    def setup(self):
        for tool in ("iperf3", "ping"):
            if not shutil.which(tool):
                raise Unavailable(f"{tool} is not installed")
        self.teardown()
        # One persistent TAP for every VM (the VMM attaches to it by name) ...
        sh("ip", "tuntap", "add", "dev", self.TAP, "mode", "tap")
        sh("ip", "addr", "add", f"{self.HOST_IP}/24", "dev", self.TAP)
        sh("ip", "link", "set", self.TAP, "up")
        # ... and a veth pair into a network namespace for the container.
        sh("ip", "netns", "add", self.NETNS)
        sh("ip", "link", "add", self.VETH_HOST, "type", "veth", "peer", "name", self.VETH_CT)
        sh("ip", "link", "set", self.VETH_CT, "netns", self.NETNS)
        sh("ip", "addr", "add", f"{self.VETH_HOST_IP}/24", "dev", self.VETH_HOST)
        sh("ip", "link", "set", self.VETH_HOST, "up")
        for c in (["addr", "add", f"{self.VETH_CT_IP}/24", "dev", self.VETH_CT],
                  ["link", "set", self.VETH_CT, "up"], ["link", "set", "lo", "up"]):
            sh("ip", "-n", self.NETNS, *c)
        sh("ip", "link", "set", "lo", "up")

    def teardown(self):
        sh_quiet("ip", "link", "del", self.TAP)
        sh_quiet("ip", "link", "del", self.VETH_HOST)
        sh_quiet("ip", "netns", "del", self.NETNS)

    def info(self):
        return {"tap": self.TAP, "host_ip": self.HOST_IP, "guest_ip": self.GUEST_IP,
                "veth": [self.VETH_HOST_IP, self.VETH_CT_IP]}

    def describe(self):
        p = self.p
        return (f"iperf3 TCP, {p['iperf_seconds']} s per direction (first {p['iperf_omit']} s "
                f"omitted), client in the guest/container, server on the host; then {p['pings']} pings "
                "10 ms apart from the client side (round trip p50/p99). Host: loopback. Container: "
                "`ip netns exec` + `unshare --mount --pid`, over a veth pair. VMs: "
                f"{vcpus(self.args.cpus)}, {self.args.memory} MiB, a TAP with the host's address. "
                "ferrovm: `--net tap=NAME,model=virtio|ne2k|e1000`. QEMU: `-netdev tap,vhost=off` "
                "(userspace, no vhost-net) with virtio-net-device on microvm, `ne2k_pci` and "
                "`e1000` (82540EM) on `-M pc`. "
                "Both ne2k cases: iperf3 `-w 16K` (at ne2k's rate the default socket buffers hold "
                "tens of seconds of data and a test cannot end on time). Each client tool has a "
                "time limit; one that fails costs its figure, not the run's others.")

    def estimate(self, subject):
        t = 2 * (self.p["iperf_seconds"] + 1) + self.p["pings"] * 0.02 + 2
        return t if subject["kind"] in ("host", "container") else t + self.vm_overhead()

    def device(self, subject):
        return {"kind": "nic", "model": subject["model"], "tap": self.TAP,
                "transport": subject.get("transport")}

    def client_commands(self, server, model=None, wrap=""):
        """The client side: iperf3 both ways, then ping. ne2k (ferrovm's and QEMU's alike)
        gets 16 KiB socket buffers: at its ~0.3 Mbit/s in the nested sandbox, iperf3's
        default buffers hold tens of seconds of data, so a test could not end on time
        (the client then fails with a broken pipe)."""
        p = self.p
        iperf = (f"{wrap}iperf3 -c {server} -p {self.PORT} -t {p['iperf_seconds']} -O {p['iperf_omit']} "
                 "-J --connect-timeout 10000" + (" -w 16K" if model == "ne2k" else ""))
        return {"tcp-tx": iperf, "tcp-rx": iperf + " -R",
                "ping": f"{wrap}ping -c {p['pings']} -i 0.01 {server}"}

    def client_timeout(self):
        return 3 * self.p["iperf_seconds"] + 40

    def guest_script(self, subject):
        # Each tool with a time limit, so that one that hangs costs its figure, not the run.
        cmds = self.client_commands(self.HOST_IP, subject["model"], f"timeout {self.client_timeout()} ")
        return (
            # No NIC (a driver that did not bind): say so and stop, rather than time out.
            "if [ ! -e /sys/class/net/eth0 ]; then printf '@@FVB-%s@@\\n' NO-NIC; "
            "dmesg | tail -n 30; exit 3; fi\n"
            f"ip addr add {self.GUEST_IP}/24 dev eth0 && ip link set eth0 up || exit 4\n"
            + guest_features_cmd()
            + "".join(guest_section(name, cmd) for name, cmd in cmds.items())
            + guest_section("netdev", "cat /proc/net/dev")
            # The driver's warnings, which quiet keeps off the console.
            + guest_section("dmesg", "dmesg | tail -n 20"))

    def figures(self, outputs, who):
        """The figures of what worked; problems with the rest as a list of messages."""
        figs, raw, problems = {}, {}, []
        for name, key in (("tcp-tx", "tcp_tx"), ("tcp-rx", "tcp_rx")):
            try:
                if name not in outputs:
                    raise GuestError(f"{who}: no {name} output")
                doc = parse_json(outputs[name], f"{who} iperf3 {name}")
                raw[name] = doc
                f = iperf_figures(doc, name)
                figs[f"{key}_gbps"] = f["gbps"]
                figs[f"{key}_retransmits"] = f["retransmits"]
            except GuestError as e:
                problems.append(str(e))
        rtts = ping_times(outputs.get("ping", ""))
        if rtts:
            figs.update(rtt_p50_ms=percentile(rtts, 50), rtt_p99_ms=percentile(rtts, 99),
                        ping_loss=1 - len(rtts) / self.p["pings"])
        else:
            problems.append(f"{who}: no ping replies:\n{outputs.get('ping', '')[-1000:]}")
        log("net: " + ", ".join(f"{k}={v:.3f}" for k, v in figs.items() if v is not None)
            + (f"; {len(problems)} part(s) failed" if problems else ""))
        return figs, raw, problems

    def host_commands(self, subject):
        """The client commands of the host (loopback) or the container (a veth pair)."""
        server = "127.0.0.1" if subject["kind"] == "host" else self.VETH_HOST_IP
        prefix = [] if subject["kind"] == "host" else ["ip", "netns", "exec", self.NETNS] + UNSHARE
        return server, {name: prefix + cmd.split() for name, cmd in self.client_commands(server).items()}

    def host_command(self, subject):
        """The server and the clients, one command line each."""
        server, cmds = self.host_commands(subject)
        return [["iperf3", "-s", "-B", server, "-p", str(self.PORT)]] + list(cmds.values())

    def run(self, subject):
        if subject["kind"] in ("host", "container"):
            server, cmds = self.host_commands(subject)
            outputs = {}
            with IperfServer(server, self.PORT):
                for name, argv in cmds.items():
                    try:
                        out, _, _, _ = run_process(argv, self.client_timeout(),
                                                   env=dict(os.environ, TMPDIR=self.scratch))
                        outputs[name] = out
                    except GuestError as e:
                        outputs[name] = str(e)
            figs, raw, problems = self.figures(outputs, subject["name"])
            if not figs:
                raise GuestError("\n".join(problems))
            return {"figures": figs, "iperf3": raw, "problems": problems,
                    "ping": outputs["ping"].splitlines()[-3:]}
        server = IperfServer(self.HOST_IP, self.PORT)
        with server:
            try:
                console, stderr, rc, secs, metrics = self.boot_vm(subject)
            except GuestError as e:
                head, _, rest = str(e).partition("\n")
                raise GuestError(f"{head}\n--- iperf3 server (end) ---\n{server.text()[-1500:]}\n{rest}") from None
        extra = ""
        if rc != 0 or "@@FVB-END ping" not in console:
            extra = f"--- iperf3 server (end) ---\n{server.text()[-1500:]}"
        if "@@FVB-NO-NIC@@" in console:
            raise GuestError(describe_failure(subject["name"], console, stderr, rc, "the guest has no eth0", extra))
        sec = sections(console)
        figs, raw, problems = self.figures({k: v[0] for k, v in sec.items()}, subject["name"])
        if not figs or rc != 0:
            raise GuestError(describe_failure(subject["name"], console, stderr, rc,
                                              "; ".join(p.splitlines()[0] for p in problems) or "VMM exit status",
                                              extra))
        if problems:
            problems = [describe_failure(subject["name"], console, stderr, rc, "; ".join(
                p.splitlines()[0] for p in problems), extra)]
        return {"figures": figs, "seconds": secs, "metrics": metrics, "problems": problems,
                "virtio_features": features(console),
                "guest_netdev": guest_netdev(sec.get("netdev", ("", 0))[0]),
                "guest_dmesg_tail": sec.get("dmesg", ("", 0))[0].splitlines(),
                "ping": sec["ping"][0].splitlines()[-3:], "iperf3": raw}


# ---------------------------------------------------------------------------------------
# Stream: bytes pushed through a UART (ttyS1) or a virtio console (hvc0) into a host file
# ---------------------------------------------------------------------------------------
class Stream(VmClass):
    name = "stream"
    device_kind = "stream"
    FIGURES = [("stream_mbps", "guest -> host file", "MB/s", "higher"),
               ("stream_mib", "moved in the time", "MiB", "higher")]
    CHART = ["stream_mbps"]
    DRAIN_S = 30
    SUBJECTS = [ferro("uart", "ferrovm UART (ttyS1)", "qemu-uart"), qemu("uart", "QEMU UART (pc)"),
                ferro("virtio-console", "ferrovm virtio-console (pci)", "qemu-virtio-console-pci", "pci"),
                qemu("virtio-console", "QEMU virtio-console-pci (pc)", "pci"),
                ferro("virtio-console", "ferrovm virtio-console (mmio)", "qemu-virtio-console", "mmio"),
                qemu("virtio-console", "QEMU virtio-console (microvm mmio)", "mmio")]

    def __init__(self, art, args, p):
        super().__init__(art, args, p)
        self.out = os.path.join(self.scratch, "ferrovm-bench-stream.out")

    def describe(self):
        return (f"`timeout {self.p['stream_seconds']} dd if=/dev/zero bs=4096` into /dev/ttyS1 or "
                "/dev/hvc0 (raw mode), then a drain (stty, TCSADRAIN); the rate is the bytes the "
                "host file holds at the end over the guest's /proc/uptime from start to drained. "
                f"VMs: {vcpus(self.args.cpus)}, {self.args.memory} MiB. ferrovm: `--serial2 file=PATH` "
                "(COM2, 16550A) and `--console virtio,file=PATH`. QEMU: a second `-serial file:PATH` "
                "on `-M pc`; virtio-serial-device + virtconsole with a file chardev on microvm.")

    def estimate(self, subject):
        return self.p["stream_seconds"] + 5 + self.vm_overhead()

    def device(self, subject):
        return {"kind": "uart" if subject["model"] == "uart" else "console", "model": subject["model"],
                "path": self.out, "transport": subject.get("transport")}

    def metrics_pick(self, subject):
        name = "ttyS1" if subject["model"] == "uart" else "hvc0"
        return lambda d: d.get("name") == name

    def guest_script(self, subject):
        dev = "/dev/ttyS1" if subject["model"] == "uart" else "/dev/hvc0"
        up = "cut -d' ' -f1 /proc/uptime"
        # The drain (stty sets the attributes with TCSADRAIN) has a time limit, so that a
        # device that stops taking bytes shows up as such rather than as a VM timeout.
        return (f"stty -F {dev} raw -echo\n"
                + guest_section("stream", f"t0=$({up}); timeout {self.p['stream_seconds']} "
                                f"dd if=/dev/zero of={dev} bs=4096 2>/dev/null; "
                                f"timeout {self.DRAIN_S} stty -F {dev} raw; d=$?; "
                                f"t1=$({up}); echo \"$t0 $t1 $d\"")
                + guest_section("serial", "cat /proc/tty/driver/serial; grep -i -E 'serial|virtio|ttyS' /proc/interrupts"))

    def run(self, subject):
        if os.path.exists(self.out):
            os.unlink(self.out)
        try:
            console, stderr, rc, secs, metrics = self.boot_vm(subject)
            size = os.path.getsize(self.out) if os.path.exists(self.out) else 0
        finally:
            if os.path.exists(self.out):
                os.unlink(self.out)
        sec = sections(console)
        if "stream" not in sec or rc != 0:
            raise GuestError(describe_failure(subject["name"], console, stderr, rc, "no stream output"))
        try:
            t0, t1, drained = sec["stream"][0].split()[:3]
            t0, t1 = float(t0), float(t1)
        except ValueError:
            raise GuestError(describe_failure(subject["name"], console, stderr, rc, "bad stream output")) from None
        if drained != "0":
            raise GuestError(describe_failure(subject["name"], console, stderr, rc,
                                              f"the output did not drain within {self.DRAIN_S} s; "
                                              f"{size} bytes reached the host file"))
        if size == 0 or t1 <= t0:
            raise GuestError(describe_failure(subject["name"], console, stderr, rc,
                                              f"{size} bytes reached the host file"))
        figs = {"stream_mbps": size / (t1 - t0) / 1e6, "stream_mib": size / (1 << 20)}
        log(f"stream: {figs['stream_mbps']:.3f} MB/s ({size} bytes in {t1 - t0:.2f} s)")
        return {"figures": figs, "seconds": secs, "metrics": metrics, "bytes": size,
                "guest_seconds": t1 - t0}


# ---------------------------------------------------------------------------------------
# Exec: ferrovm exec against virtme-ng (vng), both booting the project's kernel on the
# host's files and running one command.
# ---------------------------------------------------------------------------------------
# A few thousand files every Debian machine with the build packages has.
EXEC_TREE = os.environ.get("FERROVM_BENCH_EXEC_TREE",
                           "/usr/lib/python3.11 /usr/include/linux /usr/include/c++")
EXEC_HASH = f"find {EXEC_TREE} -type f -print0 | sort -z | xargs -0 sha256sum | sha256sum"


class Exec:
    """Wall time of one command run in a fresh VM on the host's files: `true` (the cost of
    the loop itself) and hashing a source tree of a few thousand files (virtio-fs, or
    whatever vng shares the root with), for ferrovm exec and virtme-ng on QEMU, the same
    kernel, alternating runs (median of --repeat, default 5)."""

    name = "exec"
    FIGURES = [("true_s", "exec -- true", "s", "lower"),
               ("hash_s", "exec -- hash a source tree", "s", "lower")]
    SUBJECTS = [{"name": "ferrovm-exec", "label": "ferrovm exec", "kind": "ferrovm",
                 "model": "exec", "peer": "vng"},
                {"name": "vng", "label": "virtme-ng (vng -r, QEMU)", "kind": "qemu",
                 "model": "exec"}]

    def __init__(self, art, args, p):
        self.art, self.p = art, p
        self.kernel = os.environ.get("FERROVM_BENCH_EXEC_KERNEL", art["bzimage"])
        self.cpus = str(getattr(args, "cpus", None) or 1)
        self.expected = None

    def setup(self):
        # The reference hash, computed on the host: every VM must print the same.
        self.expected = subprocess.run(["sh", "-c", EXEC_HASH], check=True,
                                       capture_output=True, text=True).stdout.split()[0]

    def teardown(self):
        pass

    def estimate(self, subject):
        return 2 * (40 if os.environ.get("FERROVM_SANDBOX_MODE") == "nested" or not kvm_hw() else 3)

    def describe(self):
        return (f"kernel {self.kernel}, {self.cpus} vCPU(s); `true`, then `{EXEC_HASH}` "
                f"({EXEC_TREE}); wall time of the whole command, VM start to exit.")

    def figures_of(self, subject):
        return self.FIGURES

    def command(self, subject, argv):
        if subject["name"] == "ferrovm-exec":
            return [vms.FERROVM, "exec", "--kernel", self.kernel, "--cpus", self.cpus,
                    "--timeout", str(self.p["vm_timeout"]), "--"] + argv
        # scripts/setup bench installs it with pipx, into ~/.local/bin.
        vng = shutil.which("vng") or shutil.which("vng", path=os.path.expanduser("~/.local/bin"))
        if not vng:
            raise Unavailable("virtme-ng is not installed (scripts/setup bench, or "
                              "pip install virtme-ng)")
        if not self.rust_virtiofsd():
            # Without it vng 1.42 falls back to 9p, which the project's kernel lacks, and
            # exits 255 with nothing on stderr.
            raise Unavailable("vng shares the root through the Rust virtiofsd only, and "
                              "there is none in PATH or ~/.cargo/bin (scripts/setup bench, "
                              "or cargo install virtiofsd)")
        return [vng, "-r", self.kernel, "--cpus", self.cpus, "--"] + argv

    @staticmethod
    def rust_virtiofsd():
        """The Rust virtiofsd's directory (PATH first, then ~/.cargo/bin), or None. QEMU's
        C daemon in /usr/lib/qemu is not one vng 1.42 uses for the root."""
        for d in os.environ.get("PATH", "").split(os.pathsep) + [
                os.path.expanduser("~/.cargo/bin")]:
            f = os.path.join(d, "virtiofsd")
            if d and os.access(f, os.X_OK) and not f.startswith("/usr/lib/qemu"):
                return d
        return None

    @property
    def commands(self):
        """Each subject's command line for `true` (results.json and results.md list them)."""
        out = {}
        for s in self.SUBJECTS:
            try:
                out[s["name"]] = self.command(s, ["true"])
            except Unavailable as e:
                out[s["name"]] = [f"({e})"]
        return out

    def timed(self, subject, argv):
        cmd = self.command(subject, argv)
        env = dict(os.environ)
        if subject["name"] == "vng":
            # command() made sure there is one.
            env["PATH"] = self.rust_virtiofsd() + os.pathsep + env.get("PATH", "")
            if os.path.isdir("/dev/shm"):
                # vng puts virtiofsd's socket in TMPDIR; the sandbox's /tmp (9p) takes none.
                env["TMPDIR"] = "/dev/shm"
        start = time.monotonic()
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=self.p["vm_timeout"], env=env)
        except subprocess.TimeoutExpired as e:
            raise GuestError(f"{' '.join(cmd)} timed out after {self.p['vm_timeout']} s; "
                             f"so far:\n{self.tails(e.stderr, e.output)}")
        secs = time.monotonic() - start
        if proc.returncode != 0:
            raise GuestError(f"{' '.join(cmd)} exited {proc.returncode}:\n"
                             f"{self.tails(proc.stderr, proc.stdout)}")
        return secs, proc.stdout.decode(errors="replace")

    @staticmethod
    def tails(stderr, stdout):
        """The ends of a failed run's stderr and stdout (either may be None): vng says why
        it failed on stdout as often as on stderr."""
        err = (stderr or b"").decode(errors="replace")[-2000:]
        out = (stdout or b"").decode(errors="replace")[-1000:]
        return f"stderr: {err}\nstdout: {out}"

    def run(self, subject):
        true_s, _ = self.timed(subject, ["true"])
        hash_s, out = self.timed(subject, ["sh", "-c", EXEC_HASH])
        got = out.split()[0] if out.split() else ""
        if got != self.expected:
            raise GuestError(f"{subject['name']}: the tree hashed to {got!r}, the host says "
                             f"{self.expected!r}")
        log(f"exec: {subject['name']}: true {true_s:.2f} s, hash {hash_s:.2f} s")
        return {"figures": {"true_s": true_s, "hash_s": hash_s}}


def vcpus(n):
    return f"{n} vCPU" + ("s" if n != 1 else "")


CLASSES = {"boot": Boot, "block": Block, "net": Net, "stream": Stream, "exec": Exec,
           "snapshot": Snapshot, "migrate": Migrate}
