"""scripts/bench's snapshot and migrate classes: a guest counting on its serial console is
snapshotted and restored, or moved live into a second VMM process (ferrovm, and QEMU as the
peer), and every latency is read from the host's arrival times of the console's lines, the
same way for every subject."""

import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import threading
import time

from . import vms
from .common import GuestError, Unavailable, guest_command, kvm_hw, log, run_process, scratch_dir, stop

COUNT = re.compile(r"count=(\d+)$")
# The guest kernel's command line before " -- ": ferrovm and QEMU microvm alike (microvm
# has no i8042: reboot=t, a triple fault).
FERROVM_APPEND = "console=ttyS0 reboot=k panic=-1 quiet"
QEMU_APPEND = "console=ttyS0 reboot=t panic=-1 quiet"
# What a dirtying guest rewrites in a loop: a file on the guest's /dev/shm (tmpfs), filled
# with 'a' through a pipe, 1 MiB blocks over the same pages every round.
DIRTY_MIB = 64


def counter_script(interval, dirty_mib=0):
    """The guest's workload: `count=N` on the console every `interval` seconds (plus the
    time the loop itself takes), and, with dirty_mib, a background loop rewriting that
    many MiB of its memory."""
    dirty = ""
    if dirty_mib:
        dirty = ("(while true; do tr '\\0' a </dev/zero | dd of=/dev/shm/dirty bs=1M "
                 f"count={dirty_mib} iflag=fullblock conv=notrunc 2>/dev/null; done) &\n")
    return dirty + f"i=0; while true; do echo count=$i; i=$((i+1)); sleep {interval}; done\n"


def nested():
    return os.environ.get("FERROVM_SANDBOX_MODE") == "nested" or not kvm_hw()


class Console:
    """A VMM process whose stdout is the guest's serial console: every complete line with
    the host's monotonic time it arrived (a reader thread, so a line is stamped when the
    VMM wrote it, not when the bench looked)."""

    def __init__(self, argv, env=None):
        self.argv = argv
        self.lines = []  # (seconds, text)
        self.err = []
        self.eof = False
        self.cond = threading.Condition()
        self.start = time.monotonic()
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)
        self.threads = [threading.Thread(target=self._pump, daemon=True),
                        threading.Thread(target=self._pump_err, daemon=True)]
        for t in self.threads:
            t.start()

    def _pump(self):
        buf = b""
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            t = time.monotonic()
            buf += chunk
            *done, buf = buf.split(b"\n")
            if done:
                with self.cond:
                    self.lines += [(t, x.decode(errors="replace").rstrip("\r")) for x in done]
                    self.cond.notify_all()
        with self.cond:
            # A line cut off at the end (the source's last before a switch-over) is not
            # one: it is left out of the counts.
            self.tail = buf.decode(errors="replace")
            self.eof = True
            self.cond.notify_all()

    def _pump_err(self):
        for chunk in iter(lambda: self.proc.stderr.read1(65536), b""):
            self.err.append(chunk)

    def counts(self):
        """[(seconds, N)] of the `count=N` lines so far."""
        with self.cond:
            return [(t, int(m.group(1))) for t, x in self.lines for m in [COUNT.search(x)] if m]

    def wait(self, pred, timeout, what):
        """The first line (seconds, text) for which pred(text) holds; GuestError after
        timeout seconds or when the console ends first."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self.cond:
            while True:
                for t, x in self.lines[seen:]:
                    if pred(x):
                        return t, x
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self.eof or left <= 0:
                    break
                self.cond.wait(min(left, 1))
        raise GuestError(self.failure(f"no {what} within {timeout} s" if not self.eof
                                      else f"the console ended before {what}"))

    def wait_count(self, pred, timeout, what):
        """The first `count=N` line with pred(N): (seconds, N)."""
        t, x = self.wait(lambda x: bool(COUNT.search(x)) and pred(int(COUNT.search(x).group(1))),
                         timeout, what)
        return t, int(COUNT.search(x).group(1))

    def stderr(self):
        return b"".join(self.err).decode(errors="replace")

    def text(self):
        with self.cond:
            return "\n".join(x for _, x in self.lines)

    def failure(self, what):
        rc = self.proc.poll()
        return (f"{what} (exit status {rc if rc is not None else 'none yet'})\n"
                f"command: {' '.join(self.argv)[:600]}\n--- stderr (end) ---\n{self.stderr()[-1500:]}"
                f"\n--- console (end) ---\n{self.text()[-2000:]}")

    def finish(self, grace=10):
        """Stops the process if it still runs (SIGTERM, then SIGKILL); its exit status."""
        if self.proc.poll() is None:
            stop(self.proc, grace)
        for t in self.threads:
            t.join(5)
        return self.proc.returncode

    def exited(self, timeout):
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None


def ferrovm_client(*args, timeout=60):
    """`ferrovm ARGS` (a control-socket client); its stdout, GuestError when it fails."""
    argv = [vms.FERROVM, *args]
    try:
        p = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise GuestError(f"{' '.join(argv)}: timed out after {timeout} s") from None
    if p.returncode != 0:
        raise GuestError(f"{' '.join(argv)}: exit status {p.returncode}: {p.stderr.strip()[-800:]}")
    return p.stdout


def remove(*paths):
    for p in paths:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.lexists(p):
            os.unlink(p)


def wait_path(path, timeout, console):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if console.proc.poll() is not None or time.monotonic() > deadline:
            raise GuestError(console.failure(f"{path} did not appear within {timeout} s"))
        time.sleep(0.01)


# ---------------------------------------------------------------------------------------
# Snapshot: pause + snapshot, the files' sizes, restore to running against a fresh boot
# ---------------------------------------------------------------------------------------
class Snapshot:
    """A 256 MiB, 1-vCPU guest counting on its console: snapshot time and size, and the
    time from launching `ferrovm restore` to the guest's next console line against a fresh
    boot of the same guest to its first counter line (alternating, --repeat runs)."""

    name = "snapshot"
    bench_initramfs = False  # the small test initramfs, as boot: its boot is what is compared
    MEM_MIB = 256
    INTERVAL = "0.02"
    WARM_LINES = 10  # counter lines before the snapshot: the loop is under way
    FIGURES = [
        ("to_running_s", "launch to the guest's next console line (fresh boot: its first counter line)", "s", "lower"),
        ("vmm_restore_ms", "VMM restore time (`restore_ms` of `ferrovm info`)", "ms", "lower"),
        ("snapshot_ms", "pause + snapshot (both client commands, wall time)", "ms", "lower"),
        ("snapshot_only_ms", "snapshot command alone (VM paused)", "ms", "lower"),
        ("memory_allocated_mib", "snapshot memory file, allocated (du)", "MiB", "lower"),
        ("memory_apparent_mib", "snapshot memory file, apparent size", "MiB", "lower"),
        ("state_kib", "snapshot state file", "KiB", "lower"),
    ]
    CHART = ["to_running_s", "vmm_restore_ms", "snapshot_ms"]
    SUBJECTS = [{"name": "ferrovm-boot", "label": "ferrovm fresh boot", "kind": "ferrovm", "model": "boot"},
                {"name": "ferrovm-restore", "label": "ferrovm restore", "kind": "ferrovm",
                 "model": "restore", "peer": "ferrovm-boot"}]

    def __init__(self, art, args, p):
        self.art, self.p = art, p
        self.scratch = scratch_dir()
        self.snap = os.path.join(self.scratch, "ferrovm-bench-snap")
        self.sock = os.path.join(self.scratch, "ferrovm-bench-api.sock")
        self.sock2 = os.path.join(self.scratch, "ferrovm-bench-api2.sock")

    def setup(self):
        pass

    def teardown(self):
        remove(self.snap, self.sock, self.sock2)

    def estimate(self, subject):
        boot = 20 if nested() else 1
        return boot + (8 if subject["model"] == "restore" else 1)

    def describe(self):
        return (f"The test initramfs, {self.MEM_MIB} MiB, 1 vCPU; the guest prints `count=N` "
                f"every {self.INTERVAL} s (+ the loop's own time). Fresh boot: `ferrovm run` "
                "spawned to the first counter line. Restore: a VM booted the same way counts "
                f"{self.WARM_LINES} lines, is paused and snapshotted into {self.scratch} "
                "(local tmpfs: the memory file is page cache, which restore maps "
                "copy-on-write) and shut down; then `ferrovm restore --snapshot DIR` spawned to "
                "the first complete line the guest prints. Times are the host's, as each line "
                "arrives on the VMM's stdout; the VMM's own restore time is `restore_ms` of "
                "`ferrovm info`.")

    def guest_script(self, subject):
        return counter_script(self.INTERVAL)

    def run_argv(self):
        return [vms.FERROVM, "run", "--kernel", self.art["vmlinux"], "--initrd", self.art["initramfs"],
                "--memory", str(self.MEM_MIB), "--cpus", "1", "--serial", "stdio", "--api-sock",
                self.sock, "--cmdline", f"{FERROVM_APPEND} -- {guest_command(self.guest_script(None))}"]

    def command(self, subject):
        if subject["model"] == "boot":
            return [self.run_argv()]
        return [self.run_argv(), [vms.FERROVM, "pause", "--api-sock", self.sock],
                [vms.FERROVM, "snapshot", "--api-sock", self.sock, self.snap],
                [vms.FERROVM, "shutdown", "--api-sock", self.sock],
                [vms.FERROVM, "restore", "--snapshot", self.snap, "--api-sock", self.sock2],
                [vms.FERROVM, "info", "--api-sock", self.sock2]]

    def run(self, subject):
        remove(self.snap, self.sock, self.sock2)
        boot_timeout = self.p["vm_timeout"]
        if subject["model"] == "boot":
            vm = Console(self.run_argv())
            try:
                t, _ = vm.wait_count(lambda n: True, boot_timeout, "counter line")
            finally:
                vm.finish()
            secs = t - vm.start
            log(f"snapshot: fresh boot to the first counter line in {secs:.2f} s")
            return {"figures": {"to_running_s": secs}}

        src = Console(self.run_argv())
        try:
            src.wait_count(lambda n: n >= self.WARM_LINES, boot_timeout, f"count={self.WARM_LINES}")
            t0 = time.monotonic()
            ferrovm_client("pause", "--api-sock", self.sock)
            t1 = time.monotonic()
            ferrovm_client("snapshot", "--api-sock", self.sock, self.snap, timeout=120)
            t2 = time.monotonic()
            time.sleep(0.2)  # what the VMM wrote before the pause, through the pipe
            last = src.counts()[-1][1]
            ferrovm_client("shutdown", "--api-sock", self.sock)
            src.exited(30)
        finally:
            src.finish()
        mem = os.stat(os.path.join(self.snap, "memory"))
        state = os.stat(os.path.join(self.snap, "state"))
        figs = {"snapshot_ms": (t2 - t0) * 1000, "snapshot_only_ms": (t2 - t1) * 1000,
                "memory_allocated_mib": mem.st_blocks * 512 / (1 << 20),
                "memory_apparent_mib": mem.st_size / (1 << 20), "state_kib": state.st_size / 1024}

        dst = Console([vms.FERROVM, "restore", "--snapshot", self.snap, "--api-sock", self.sock2])
        try:
            t, first = dst.wait(lambda x: True, 120, "a console line from the restored guest")
            figs["to_running_s"] = t - dst.start
            info = json.loads(ferrovm_client("info", "--api-sock", self.sock2))
            figs["vmm_restore_ms"] = info.get("restore_ms")
            # It goes on counting: a restore that printed one line and hung is no restore.
            dst.wait_count(lambda n: n >= last + 5, 60, f"count={last + 5} after the restore")
            ferrovm_client("shutdown", "--api-sock", self.sock2)
            dst.exited(30)
        finally:
            dst.finish()
        m = COUNT.search(first)
        log(f"snapshot: {figs['snapshot_ms']:.0f} ms to snapshot, restore to running in "
            f"{figs['to_running_s'] * 1000:.0f} ms (the VMM's part {figs['vmm_restore_ms'] or 0:.1f} ms), "
            f"memory file {figs['memory_allocated_mib']:.1f} MiB allocated")
        return {"figures": figs, "last_count_before": last, "first_line_after": first,
                "next_count": bool(m) and int(m.group(1)) == last + 1}

    @staticmethod
    def notes(res):
        runs = res["runs"].get("ferrovm-restore", [])
        if not runs:
            return []
        ok = sum(1 for r in runs if r.get("next_count"))
        return [f"The restored guest's first line was the counter's next value (`count=N+1` after "
                f"the snapshot's last `count=N`) in {ok} of {len(runs)} runs.", ""]


# ---------------------------------------------------------------------------------------
# Migrate: live migration between two VMM processes, ferrovm and QEMU
# ---------------------------------------------------------------------------------------
class Qmp:
    """A minimal QMP client on a Unix socket: the greeting, qmp_capabilities, commands. A
    socket error (QEMU gone) is a GuestError with QEMU's console and stderr."""

    def __init__(self, path, timeout, console):
        wait_path(path, timeout, console)
        self.console = console
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        try:
            self.sock.connect(path)
            self.f = self.sock.makefile("rwb")
            self._read()  # the greeting
        except OSError as e:
            raise GuestError(console.failure(f"QMP: {e}")) from None
        self.cmd("qmp_capabilities")

    def _read(self):
        line = self.f.readline()
        if not line:
            raise GuestError(self.console.failure("QMP: QEMU closed the socket"))
        return json.loads(line)

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args:
            msg["arguments"] = args
        try:
            self.f.write(json.dumps(msg).encode() + b"\n")
            self.f.flush()
            while True:
                r = self._read()
                if "event" in r:
                    continue
                if "error" in r:
                    raise GuestError(f"QMP {name}: {r['error']}")
                return r.get("return")
        except (OSError, ValueError) as e:
            self.console.exited(5)
            raise GuestError(self.console.failure(f"QMP {name}: {e}")) from None

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass


def console_gaps(consoles, t0, end):
    """The counter lines of the source and then the destination, merged by the host's
    arrival times: from the last line before the migration started (t0) to `end`. Returns
    (longest gap in ms, the counter values missing or repeated across the switch)."""
    seq = sorted(c for con in consoles for c in con.counts())
    before = [c for c in seq if c[0] <= t0]
    window = before[-1:] + [c for c in seq if t0 < c[0] <= end]
    if len(window) < 2:
        return None, None
    gap = max(b[0] - a[0] for a, b in zip(window, window[1:]))
    ns = [n for _, n in window]
    missing = sorted(set(range(ns[0], ns[-1] + 1)) - set(ns))
    repeated = len(ns) - len(set(ns))
    return gap * 1000, {"first": ns[0], "last": ns[-1], "missing": missing, "repeated": repeated}


# (figure prefix, label, guest MiB, dirtying)
MIGRATE_CASES = [("idle_256", "idle, 256 MiB", 256, False), ("dirty_256", "dirtying, 256 MiB", 256, True),
                 ("idle_1024", "idle, 1 GiB", 1024, False), ("dirty_1024", "dirtying, 1 GiB", 1024, True)]


class Migrate:
    """Live migration of a guest counting on its console (idle, or rewriting 64 MiB in a
    loop), 256 MiB and 1 GiB: ferrovm copying over a Unix socket, ferrovm --local (memory
    handed over) and QEMU microvm, each run all four guest cases."""

    name = "migrate"
    bench_initramfs = False
    INTERVAL = "0.02"
    AFTER_LINES = 10  # counter lines the destination prints before it is stopped
    MIGRATE_TIMEOUT = 240
    CASES = MIGRATE_CASES
    FIGURES = [f for key, label, _, _ in CASES for f in (
        (f"{key}_downtime_ms", f"{label}: downtime (longest gap between console lines)", "ms", "lower"),
        (f"{key}_total_s", f"{label}: total time (migrate command to completion)", "s", "lower"),
        (f"{key}_vmm_downtime_ms", f"{label}: downtime as the VMM reports it", "ms", "lower"),
        (f"{key}_passes", f"{label}: passes (QEMU: dirty-sync-count)", "count", "lower"),
        (f"{key}_mib_sent", f"{label}: sent", "MiB", "lower"))]
    CHART = [f"{key}_{fig}" for fig in ("downtime_ms", "total_s") for key, *_ in MIGRATE_CASES]
    SUBJECTS = [{"name": "ferrovm", "label": "ferrovm (copy, unix socket)", "kind": "ferrovm",
                 "model": "copy", "peer": "qemu"},
                {"name": "ferrovm-local", "label": "ferrovm --local (--memory-shared)", "kind": "ferrovm",
                 "model": "local", "peer": "qemu"},
                {"name": "qemu", "label": "QEMU microvm (unix socket)", "kind": "qemu", "model": "copy"}]

    def __init__(self, art, args, p):
        self.art, self.p = art, p
        self.quick = getattr(args, "quick", False)
        self.settle = 2 if self.quick else 4
        self.scratch = scratch_dir()
        self.mig = os.path.join(self.scratch, "ferrovm-bench-mig.sock")
        self.sock = os.path.join(self.scratch, "ferrovm-bench-api.sock")
        self.sock2 = os.path.join(self.scratch, "ferrovm-bench-api2.sock")
        self.qmp = os.path.join(self.scratch, "ferrovm-bench-qmp.sock")
        self.qmp2 = os.path.join(self.scratch, "ferrovm-bench-qmp2.sock")

    def setup(self):
        pass

    def teardown(self):
        remove(self.mig, self.sock, self.sock2, self.qmp, self.qmp2)

    def estimate(self, subject):
        per_case = 25 if nested() else 5
        return per_case * len(self.CASES)

    def describe(self):
        return (f"The test initramfs, 1 vCPU; the guest prints `count=N` every {self.INTERVAL} s "
                f"(+ the loop's own time); the dirtying guest also rewrites a {DIRTY_MIB} MiB file "
                "on its /dev/shm in a loop (`tr '\\0' a </dev/zero | dd bs=1M conv=notrunc`). "
                f"The source boots, counts for {self.settle} s, a destination is started, and the "
                "migration is timed from the migrate command to its completion. Downtime, the "
                "same for every subject: the longest gap between consecutive counter lines of "
                "the source's and then the destination's console (each VMM's stdout, lines "
                "stamped by the host as they arrive), from the last line before the migration "
                f"to the destination's {self.AFTER_LINES}th. ferrovm: `run --incoming "
                "unix:PATH`, `ferrovm migrate --to unix:PATH --json` (default downtime limit "
                "300 ms); --local with `--memory-shared` on the source. QEMU: microvm, `-accel "
                "kvm`, the destination with `-incoming unix:PATH`, the source told over QMP "
                "(`migrate-set-parameters downtime-limit=300`, `migrate`, `query-migrate` "
                "polled every 10 ms); passes are its dirty-sync-count, MiB sent its "
                "`ram.transferred`.")

    def guest_script(self, subject):
        return ("# idle guests run the counter loop alone, dirtying ones both\n"
                + counter_script(self.INTERVAL, DIRTY_MIB))

    def cmdline(self, dirty):
        return guest_command(counter_script(self.INTERVAL, DIRTY_MIB if dirty else 0))

    def ferrovm_argvs(self, mem, dirty, local):
        src = [vms.FERROVM, "run", "--kernel", self.art["vmlinux"], "--initrd", self.art["initramfs"],
               "--memory", str(mem), "--cpus", "1", "--serial", "stdio", "--api-sock", self.sock]
        src += ["--memory-shared"] if local else []
        src += ["--cmdline", f"{FERROVM_APPEND} -- {self.cmdline(dirty)}"]
        dst = [vms.FERROVM, "run", "--incoming", f"unix:{self.mig}", "--api-sock", self.sock2]
        mig = [vms.FERROVM, "migrate", "--api-sock", self.sock, "--to", f"unix:{self.mig}", "--json"]
        return src, dst, mig + (["--local"] if local else [])

    def qemu_argv(self, mem, dirty, qmp, incoming=None):
        argv = [vms.qemu_binary() or "qemu-system-x86_64", "-M", vms.QEMU_MICROVM, "-accel", "kvm",
                "-cpu", "host", "-m", str(mem), "-smp", "1", "-nodefaults", "-no-user-config",
                "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", self.art["vmlinux"],
                "-initrd", self.art["initramfs"], "-append", f"{QEMU_APPEND} -- {self.cmdline(dirty)}",
                "-qmp", f"unix:{qmp},server=on,wait=off"]
        return argv + (["-incoming", f"unix:{incoming}"] if incoming else [])

    def command(self, subject):
        if subject["kind"] == "qemu":
            return [self.qemu_argv(256, False, self.qmp), self.qemu_argv(256, False, self.qmp2, self.mig)]
        return list(self.ferrovm_argvs(256, False, subject["model"] == "local"))

    def run(self, subject):
        if subject["kind"] == "qemu" and not vms.qemu_binary():
            raise Unavailable("qemu-system-x86_64 is not installed")
        figs, raw, problems = {}, {}, []
        for key, label, mem, dirty in self.CASES:
            try:
                rec = self.migrate_once(subject, mem, dirty)
            except GuestError as e:
                problems.append(f"{subject['name']} {label}: {e}")
                log(f"migrate: {subject['name']} {label} FAILED: {str(e).splitlines()[0]}")
                continue
            raw[key] = rec
            figs.update({f"{key}_{k}": v for k, v in rec["figures"].items()})
            f = rec["figures"]
            log(f"migrate: {subject['name']} {label}: downtime {f['downtime_ms']:.0f} ms "
                f"(the VMM says {f['vmm_downtime_ms']}), total {f['total_s']:.2f} s, "
                f"{f['passes']} passes, {f['mib_sent']:.1f} MiB")
        if not figs:
            raise GuestError("\n\n".join(problems))
        return {"figures": figs, "cases": raw, "problems": problems}

    def migrate_once(self, subject, mem, dirty):
        self.teardown()
        if subject["kind"] == "qemu":
            return self.qemu_once(mem, dirty)
        return self.ferrovm_once(mem, dirty, subject["model"] == "local")

    def boot_source(self, src):
        src.wait_count(lambda n: True, self.p["vm_timeout"], "counter line")
        time.sleep(self.settle)

    def figures(self, src, dst, t0, total_s, last_src):
        """The downtime from the consoles, once the destination printed AFTER_LINES more."""
        end, _ = dst.wait_count(lambda n: n >= last_src + self.AFTER_LINES, 60,
                                f"count={last_src + self.AFTER_LINES} at the destination")
        gap, counter = console_gaps([src, dst], t0, end)
        before = [t for t, _ in src.counts() if t <= t0]
        normal = statistics.median(b - a for a, b in zip(before, before[1:])) * 1000 if len(before) > 2 else None
        return {"downtime_ms": gap, "total_s": total_s}, {"counter": counter, "normal_gap_ms": normal}

    def ferrovm_once(self, mem, dirty, local):
        src_argv, dst_argv, mig_argv = self.ferrovm_argvs(mem, dirty, local)
        src = Console(src_argv)
        dst = None
        try:
            self.boot_source(src)
            dst = Console(dst_argv)
            wait_path(self.mig, 60, dst)
            t0 = time.monotonic()
            out, err, rc, _ = run_process(mig_argv, self.MIGRATE_TIMEOUT)
            total_s = time.monotonic() - t0
            events = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
            done = events[-1] if events else {}
            if rc != 0 or done.get("event") != "completed":
                raise GuestError(dst.failure(f"ferrovm migrate: exit status {rc}: {err.strip()[-800:]}"
                                             f"\n--- source ---\n{src.failure('source')}"))
            if src.exited(30) is None:
                raise GuestError(src.failure("the source did not exit after the migration"))
            src.finish()
            last_src = src.counts()[-1][1]
            try:
                figs, extra = self.figures(src, dst, t0, total_s, last_src)
            except GuestError as e:
                # The migration said it completed: what the destination says of its VM.
                try:
                    info = ferrovm_client("info", "--api-sock", self.sock2, timeout=20)
                except GuestError as e2:
                    info = str(e2)
                raise GuestError(f"{e}\n--- migrate's summary ---\n{json.dumps(done)}\n"
                                 f"--- ferrovm info of the destination ---\n{info[:1500]}") from None
            ferrovm_client("shutdown", "--api-sock", self.sock2)
            dst.exited(30)
        finally:
            src.finish()
            if dst:
                dst.finish()
        figs.update(vmm_downtime_ms=done.get("downtime_ms"), passes=done.get("passes"),
                    mib_sent=done.get("sent_mib"))
        return {"figures": figs, "summary": done, "passes": [e for e in events if e.get("event") == "pass"],
                **extra}

    def qemu_once(self, mem, dirty):
        src = Console(self.qemu_argv(mem, dirty, self.qmp))
        dst = qmp = None
        try:
            self.boot_source(src)
            dst = Console(self.qemu_argv(mem, dirty, self.qmp2, self.mig))
            wait_path(self.mig, 60, dst)
            qmp = Qmp(self.qmp, 30, src)
            qmp.cmd("migrate-set-parameters", {"downtime-limit": 300})
            t0 = time.monotonic()
            qmp.cmd("migrate", {"uri": f"unix:{self.mig}"})
            while True:
                st = qmp.cmd("query-migrate")
                if st.get("status") in ("completed", "failed", "cancelled"):
                    break
                if time.monotonic() - t0 > self.MIGRATE_TIMEOUT:
                    qmp.cmd("migrate_cancel")
                    raise GuestError(f"QEMU's migration did not complete within {self.MIGRATE_TIMEOUT} s "
                                     f"(the last query-migrate: {json.dumps(st)[:800]})")
                time.sleep(0.01)
            total_s = time.monotonic() - t0
            if st["status"] != "completed":
                raise GuestError(dst.failure(f"QEMU's migration ended {st['status']}: {json.dumps(st)[:800]}"))
            try:
                qmp.cmd("quit")
            except GuestError:
                pass  # QEMU may close the socket before it answers
            src.exited(30)
            src.finish()
            last_src = src.counts()[-1][1]
            figs, extra = self.figures(src, dst, t0, total_s, last_src)
        finally:
            if qmp:
                qmp.close()
            src.finish()
            if dst:
                dst.finish()
        ram = st.get("ram", {})
        # QEMU 7.2 sometimes answers a completed migration with total-time and downtime 0
        # (seen with the dirtying guest): that downtime is not one.
        downtime = st.get("downtime") if st.get("total-time") else None
        figs.update(vmm_downtime_ms=downtime, passes=ram.get("dirty-sync-count"),
                    mib_sent=ram.get("transferred", 0) / (1 << 20))
        return {"figures": figs, "summary": st, **extra}

    @classmethod
    def notes(cls, res):
        """Per subject and case: the counter's normal gap before the migration (what the
        downtime is read against) and counter values lost or repeated across the switch."""
        rows = []
        for s in res["subjects"]:
            for key, label, *_ in cls.CASES:
                recs = [r["cases"][key] for r in res["runs"].get(s["name"], []) if key in r.get("cases", {})]
                if not recs:
                    continue
                normal = [r["normal_gap_ms"] for r in recs if r.get("normal_gap_ms") is not None]
                lost = sum(len((r.get("counter") or {}).get("missing", [])) for r in recs)
                rep = sum((r.get("counter") or {}).get("repeated", 0) for r in recs)
                rows.append(f"| {s['label']} | {label} | "
                            f"{statistics.median(normal):.0f} | {lost} | {rep} |" if normal else
                            f"| {s['label']} | {label} | - | {lost} | {rep} |")
        if not rows:
            return []
        return ["The counter's usual gap (median before the migration started) and the counter "
                "values lost or printed twice across the switch-over (over all runs; a line cut "
                "by the switch counts as lost):", "",
                "| subject | guest | usual gap (ms) | values lost | values repeated |",
                "|---|---|---|---|---|"] + rows + [""]
