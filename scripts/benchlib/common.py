"""Shared pieces of scripts/bench: logging and progress, running a VM with a timeout,
reading what the guest printed between markers."""

import base64
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY = "ferrovm-guest: userspace ready"


def kvm_hw():
    try:
        with open("/proc/cpuinfo") as f:
            return re.search(r"^flags\s*:.*\b(vmx|svm)\b", f.read(), re.M) is not None
    except OSError:
        return False


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


def minutes(secs):
    return f"{secs / 60:.0f} min" if secs >= 90 else f"{secs:.0f} s"


class Progress:
    """'[N/M] case, ~T left' over every case run of this invocation. The time left is the
    sum of the remaining cases' estimates, scaled by how far off the estimates were so far."""

    def __init__(self, estimates):
        self.total = len(estimates)
        self.left = list(estimates)  # estimated seconds of each case not yet started
        self.done = 0
        self.estimated_done = 0.0
        self.start = time.monotonic()
        log(f"{self.total} case runs, estimated {minutes(sum(estimates))} in all")

    def step(self, what):
        est = self.left.pop(0) if self.left else 0
        self.done += 1
        elapsed = time.monotonic() - self.start
        scale = elapsed / self.estimated_done if self.estimated_done > 30 else 1.0
        left = (sum(self.left) + est) * scale
        self.estimated_done += est
        log(f"[{self.done}/{self.total}] {what} (~{minutes(left)} left)")


class GuestError(RuntimeError):
    """One run failed (the guest's tool, the VMM, a timeout); the message has the details."""


class Unavailable(Exception):
    """A case that cannot run here at all (a missing tool, a device the VMM lacks)."""


def summarize(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def scratch_dir():
    # In the nested sandbox: its /var/tmp, a tmpfs local to the sandbox VM. Directly on a
    # KVM host: /dev/shm, a tmpfs as well, so both modes measure the same kind of backend.
    d = os.environ.get("FERROVM_SANDBOX_SCRATCH") or "/dev/shm"
    os.makedirs(d, exist_ok=True)
    return d


def fs_type(path):
    p = subprocess.run(["stat", "-f", "-c", "%T", path], stdout=subprocess.PIPE,
                       stderr=subprocess.DEVNULL, text=True)
    return p.stdout.strip() or "unknown"


def sh(*argv):
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def sh_quiet(*argv):
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc, grace=10):
    """SIGTERM (ferrovm then writes its metrics), then SIGKILL. A process the sandbox's
    kernel soft-locked may survive even that: it is left behind, and False returned."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            return True
        try:
            proc.wait(timeout=grace)
            return True
        except subprocess.TimeoutExpired:
            pass
    return False


def run_process(cmd, timeout, watch=None, env=None):
    """Runs cmd to its end; returns (stdout text, stderr text, exit status, seconds).
    watch() is called every 10 ms while it runs. On timeout the process is stopped and
    GuestError raised with the end of its output."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    bufs = {"out": [], "err": []}

    def pump(stream, key):
        for chunk in iter(lambda: stream.read1(65536), b""):
            bufs[key].append(chunk)

    threads = [threading.Thread(target=pump, args=(proc.stdout, "out"), daemon=True),
               threading.Thread(target=pump, args=(proc.stderr, "err"), daemon=True)]
    for t in threads:
        t.start()

    def text(key):
        return b"".join(bufs[key]).decode(errors="replace").replace("\r\n", "\n")

    while proc.poll() is None:
        if time.monotonic() - start > timeout:
            gone = stop(proc)
            for t in threads:
                t.join(2)
            raise GuestError(f"timed out after {timeout} s"
                             f"{'' if gone else ' (and did not die on SIGKILL: left behind)'}\n"
                             f"command: {' '.join(cmd)}\n--- stderr (end) ---\n{text('err')[-4000:]}"
                             f"\n--- console (end) ---\n{text('out')[-3000:]}")
        if watch:
            watch()
        time.sleep(0.01)
    for t in threads:
        t.join(10)
    return text("out"), text("err"), proc.returncode, time.monotonic() - start


def describe_failure(who, console, stderr, rc, what, extra=""):
    """`extra` (e.g. a host-side server's log) comes after the VMM's stderr, never in place
    of its end, where the VMM's exit reason and crash report are."""
    return (f"{who}: {what} (exit status {rc})\n--- stderr (end) ---\n{stderr[-4000:]}"
            + (f"\n{extra}" if extra else "")
            + f"\n--- console (end) ---\n{console[-3000:]}")


# ---------------------------------------------------------------------------------------
# The guest side: a script run by /init, its output between markers on the console
# ---------------------------------------------------------------------------------------
def guest_section(name, cmd):
    """Guest shell code: run cmd, its stdout between markers, its stderr after them.
    The markers are printed with printf, so that their literal text never appears in the
    command line itself (which the kernel may echo)."""
    return (f"printf '@@FVB-%s@@\\n' 'BEGIN {name}'; {cmd} 2>/tmp/{name}.err; "
            f"printf '@@FVB-%s@@\\n' \"END {name} rc=$?\"; cat /tmp/{name}.err\n")


def guest_features_cmd():
    # The feature bits the guest's virtio drivers negotiated, for results.json.
    return ("printf '@@FVB-%s@@\\n' \"FEATURES $(cat /sys/bus/virtio/devices/*/features "
            "2>/dev/null)\"\n")


def guest_command(script):
    """The guest command (after " -- ") that runs script: base64 in one word, because the
    kernel hands init at most 31 words after " -- " and panics ("Too many boot init vars")
    beyond that."""
    b64 = base64.b64encode(script.encode()).decode()
    return f"echo {b64} | base64 -d >/tmp/bench.sh && sh /tmp/bench.sh"


def sections(console):
    """{name: (text between the markers, the command's exit status)} of a guest's console."""
    ready = console.find(READY)
    body = console[ready:] if ready >= 0 else console
    found = {}
    for m in re.finditer(r"@@FVB-BEGIN (\S+)@@\n(.*?)@@FVB-END \1 rc=(\d+)@@", body, re.S):
        found[m.group(1)] = (m.group(2), int(m.group(3)))
    return found


def features(console):
    m = re.search(r"@@FVB-FEATURES ([01 ]*)@@", console)
    return m.group(1).strip() if m else None


def parse_json(text, what):
    start = text.find("{")
    if start < 0:
        raise GuestError(f"{what}: no JSON in the output:\n{text[-2000:]}")
    try:
        obj, _ = json.JSONDecoder().raw_decode(text[start:])
    except json.JSONDecodeError as e:
        raise GuestError(f"{what}: bad JSON ({e}):\n{text[-2000:]}") from None
    return obj


def ping_times(text):
    """Round-trip times (ms) of ping's per-reply lines (busybox and iputils alike)."""
    return [float(x) for x in re.findall(r"time=([0-9.]+) ms", text)]


def percentile(values, p):
    """Nearest-rank percentile."""
    v = sorted(values)
    k = max(0, min(len(v) - 1, int(round(p / 100 * len(v) + 0.5)) - 1))
    return v[k]
