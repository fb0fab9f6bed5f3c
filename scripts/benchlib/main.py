"""scripts/bench's driver: options, the sandbox (re-running itself inside it when this host
has no hardware virtualization), the loop over the matrix, results after every class."""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from . import report
from .cases import CLASSES
from .common import ROOT, GuestError, Progress, Unavailable, log, minutes

SANDBOX_BOOT_S = 100  # the nested sandbox's boot, for the estimate


def kvm_usable():
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    hw = re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M) is not None
    return hw and os.path.exists("/dev/kvm")


def artifacts(bench):
    argv = [os.path.join(ROOT, "scripts/build-guest"), "--print-paths"] + (["--bench"] if bench else [])
    out = subprocess.run(argv, check=True, stdout=subprocess.PIPE, text=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def params(args):
    p = {"repeat_boot": args.repeat or 5, "repeat": args.repeat or 3, "fio_runtime": 4, "fio_ramp": 1,
         "disk_mib": 1024, "iperf_seconds": 5, "iperf_omit": 1, "pings": 200, "stream_seconds": 5,
         "vm_timeout": 300}
    if args.quick:
        # About a minute of workload in all: what is left is the VMs' boots (a second
        # each on a KVM host, ~30 s with the bench initramfs in the nested sandbox).
        p.update(repeat_boot=1, repeat=1, fio_runtime=1, fio_ramp=0, disk_mib=256, iperf_seconds=1,
                 iperf_omit=0, pings=20, stream_seconds=1, vm_timeout=180)
    return p


def parse_only(text):
    """"all" or CLASS[:SUBJECT][,...] -> {class: set of subject names, or None for all}."""
    if text == "all":
        return {c: None for c in CLASSES}
    got = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        cls, _, subject = item.partition(":")
        if cls not in CLASSES:
            raise argparse.ArgumentTypeError(f"unknown class {cls!r}: expected {', '.join(CLASSES)} or all")
        if subject:
            names = [s["name"] for s in CLASSES[cls].SUBJECTS]
            if subject not in names:
                raise argparse.ArgumentTypeError(f"unknown {cls} subject {subject!r}: {', '.join(names)}")
            if got.get(cls, set()) is not None:
                got.setdefault(cls, set()).add(subject)
        else:
            got[cls] = None
    if not got:
        raise argparse.ArgumentTypeError("--only needs at least one class")
    return {c: got[c] for c in CLASSES if c in got}  # the matrix's order


def only_text(only):
    return ",".join(c if subs is None else ",".join(f"{c}:{s}" for s in sorted(subs)) for c, subs in only.items())


def subjects_of(cls, only):
    return [s for s in CLASSES[cls].SUBJECTS if only[cls] is None or s["name"] in only[cls]]


def estimate(objs, only, p):
    """Seconds per case run, in the order they will run."""
    out = []
    for cls, obj in objs.items():
        reps = p["repeat_boot"] if cls in ("boot", "exec") else p["repeat"]
        out += [obj.estimate(s) for _ in range(reps) for s in subjects_of(cls, only)]
    return out


def rotated(items, i):
    """Repetition i starts at another subject, so no subject always runs first."""
    k = i % len(items) if items else 0
    return items[k:] + items[:k]


def run_class(cls, obj, subjects, p, progress, res):
    reps = p["repeat_boot"] if cls in ("boot", "exec") else p["repeat"]
    for i in range(reps):
        for s in rotated(subjects, i):
            what = f"{cls} {i + 1}/{reps}: {s['label']}"
            if s["name"] in res["unavailable"]:
                progress.step(f"{what}: skipped ({res['unavailable'][s['name']]})")
                continue
            progress.step(what)
            for attempt in (1, 2):
                try:
                    rec = obj.run(s)
                    rec["repetition"] = i + 1
                    res["runs"][s["name"]].append(rec)
                    # Parts of a run that failed while others gave figures (net).
                    res["errors"][s["name"]] += rec.get("problems", [])
                    break
                except Unavailable as e:
                    res["unavailable"][s["name"]] = str(e)
                    log(f"{cls}: {s['name']}: {e}; skipping its runs")
                    break
                except GuestError as e:
                    res["errors"][s["name"]].append(str(e))
                    retry = attempt == 1 and "timed out" not in str(e)
                    log(f"{cls}: {s['name']} run {i + 1} FAILED{' (retrying once)' if retry else ''}: "
                        + "\n".join(str(e).splitlines()[:1] + str(e).splitlines()[-12:]))
                    if not retry:
                        break


def main():
    doc = sys.modules["__main__"].__doc__ or ""
    ap = argparse.ArgumentParser(description=doc.split("\n", 1)[0], epilog=doc.split("\n\n", 2)[-1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", type=parse_only, default="all", metavar="CLASS[:SUBJECT][,...]",
                    help="boot, block, net, stream, exec, snapshot, migrate or all (default); "
                    "CLASS:SUBJECT for one subject, e.g. net:ferrovm-ne2k")
    ap.add_argument("--repeat", type=int, default=None,
                    help="runs per subject (default: boot 5, the others 3)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: one short run of each case (about a minute of workload; the VMs' "
                    "boots come on top: ~10 min in all in the nested sandbox)")
    ap.add_argument("--out", default="bench-results", help="results directory (default bench-results)")
    ap.add_argument("--cpus", type=int, default=None,
                    help="vCPUs of the bench VMs (default: 2 where the VMs run on at least 4 CPUs, else 1)")
    ap.add_argument("--memory", type=int, default=1024, help="MiB of the bench VMs (default 1024)")
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)  # outer -> inner
    args = ap.parse_args()
    if isinstance(args.only, str):
        args.only = parse_only(args.only)
    if args.repeat is not None and args.repeat < 1:
        ap.error("--repeat must be at least 1")
    p = params(args)
    wants_bench_initramfs = any(getattr(CLASSES[c], "bench_initramfs", True) for c in args.only)

    inner = os.environ.get("FERROVM_BENCH_INNER") is not None
    if not kvm_usable() and not inner:
        sys.exit(outer(args, p, wants_bench_initramfs))

    if args.cpus is None:
        # The nested sandbox has 2 vCPUs: a 2-vCPU guest, the VMM's I/O thread and the
        # iperf3 server overcommit them, which made the figures noisier and the sandbox's
        # kernel die more often (the TCG nested-SVM fault) than with 1 vCPU.
        args.cpus = 2 if (os.cpu_count() or 1) >= 4 else 1
    start = time.monotonic()
    if not inner:
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    if os.environ.get("FERROVM_BENCH_ARTIFACTS"):
        art = json.loads(os.environ["FERROVM_BENCH_ARTIFACTS"])
    else:
        art = artifacts(wants_bench_initramfs)
    objs = {c: CLASSES[c](art, args, p) for c in args.only}
    progress = Progress(estimate(objs, args.only, p))
    results = {"environment": report.environment(args, art), "params": p,
               "classes": list(args.only), "done": [], "cases": {}}
    if args.resume:
        # A new sandbox after the previous one died: keep what it finished.
        try:
            with open(os.path.join(args.out, "results.json")) as f:
                results = json.load(f)
        except (OSError, ValueError):
            pass
        results.setdefault("sandbox_lost", []).append(os.environ.get("FERROVM_BENCH_LOST", "?"))
        results["classes"] = [c for c in results.get("classes", []) if c not in args.only] + list(args.only)
        results.setdefault("done", [])
        results.setdefault("cases", {})
    start -= results.get("wall_seconds", 0)
    failed = False
    for cls, obj in objs.items():
        subjects = subjects_of(cls, args.only)
        res = {"subjects": subjects, "runs": {s["name"]: [] for s in subjects},
               "errors": {s["name"]: [] for s in subjects}, "unavailable": {}}
        results["cases"][cls] = res
        try:
            obj.setup()
            res["describe"] = obj.describe()
            res["info"] = obj.info() if hasattr(obj, "info") else {}
            if hasattr(obj, "guest_script"):
                res["guest_scripts"] = {s["name"]: obj.guest_script(s) for s in subjects
                                        if s["kind"] in ("ferrovm", "qemu")}
                res["commands"] = {s["name"]: obj.command(s) if s["kind"] in ("ferrovm", "qemu")
                                   else obj.host_command(s) for s in subjects}
            else:
                res["commands"] = {s["name"]: obj.commands[s["name"]] for s in subjects}
            run_class(cls, obj, subjects, p, progress, res)
        except (Unavailable, RuntimeError, OSError, subprocess.SubprocessError) as e:
            log(f"{cls}: FAILED: {e}")
            results.setdefault("failed_classes", {})[cls] = str(e)
            failed = True
            continue
        finally:
            obj.teardown()
        reps = p["repeat_boot"] if cls in ("boot", "exec") else p["repeat"]
        if any(len(res["runs"][s["name"]]) < reps for s in subjects if s["name"] not in res["unavailable"]):
            failed = True
        results["done"].append(cls)
        results["wall_seconds"] = time.monotonic() - start
        # After every class, so that a sandbox lost later still leaves these figures.
        report.write(args.out, results)
    results["wall_seconds"] = time.monotonic() - start
    if inner:
        report.write(args.out, results)
    else:
        results["charts"] = report.charts(args.out, results)
        report.write(args.out, results, quiet=False)
    sys.exit(1 if failed else 0)


def outer(args, p, wants_bench_initramfs):
    """No hardware KVM here: build, then run the matrix inside scripts/kvm-sandbox (a lost
    sandbox once more for what it had not finished); charts and results.md at the end."""
    start = time.monotonic()
    subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    art = artifacts(wants_bench_initramfs)  # built outside: the sandbox sees the cache read-only
    n = len(estimate({c: CLASSES[c](art, args, p) for c in args.only}, args.only, p))
    est = sum(estimate({c: CLASSES[c](art, args, p) for c in args.only}, args.only, p)) + SANDBOX_BOOT_S
    log(f"no hardware KVM here: running inside scripts/kvm-sandbox; {n} case runs, "
        f"estimated {minutes(est)} with the sandbox's boot")
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
            cpu = m.group(1) if m else ""
    except OSError:
        pass
    # The paths, so the sandbox does not hash the bench initramfs' ~80 MB of host files
    # again (about a minute under TCG).
    env = dict(os.environ, FERROVM_BENCH_INNER="1", FERROVM_BENCH_ARTIFACTS=json.dumps(art),
               FERROVM_BENCH_OUTER_HOST=f"{cpu}, {os.cpu_count()} CPUs, kernel {os.uname().release}")
    final_out = os.path.abspath(args.out)
    out = sandbox_writable_dir(final_out)
    # Two sandbox vCPUs, unlike the tests' one (scripts/kvm-sandbox --cpus): the VMM's I/O
    # and event-loop threads and the host-side tools get a CPU beside the guest's, as on a
    # real host. One VM runs at a time, and a sandbox lost to the TCG fault that two vCPUs
    # invite is rerun for what it had not finished (below).
    argv = [os.path.join(ROOT, "scripts/kvm-sandbox"), "--cpus", "2", "--timeout", "7200",
            "--mem", "6144", "--",
            sys.executable, os.path.join(ROOT, "scripts/bench"), "--out", out,
            "--only", only_text(args.only), "--memory", str(args.memory)]
    if args.cpus is not None:
        argv += ["--cpus", str(args.cpus)]
    if args.repeat is not None:
        argv += ["--repeat", str(args.repeat)]
    if args.quick:
        argv.append("--quick")
    started = time.time()
    stall = p["vm_timeout"] + 180
    rc, why = run_sandboxed(argv, env, stall_seconds=stall)
    classes = list(args.only)
    left = unfinished(out, classes, started)
    if rc != 0 and left:
        log(f"the sandbox was lost ({why}); running {','.join(left)} again in a new sandbox")
        argv[argv.index("--only") + 1] = only_text({c: args.only[c] for c in left})
        rc, why = run_sandboxed(argv + ["--resume"], dict(env, FERROVM_BENCH_LOST=why), stall_seconds=stall)
        if rc != 0 and unfinished(out, classes, started):
            log(f"the sandbox was lost again ({why}); results.md has what was measured")
    wall = time.monotonic() - start
    log(f"wall time including the build check and the sandbox: {minutes(wall)}")
    if out != final_out:
        shutil.copytree(out, final_out, dirs_exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
        out = final_out
    results = report.render(out)
    if results is None:
        log("no results.json was written")
        return rc or 1
    results["outer_wall_seconds"] = wall
    report.write(out, results, quiet=False)
    log(f"results: {os.path.join(out, 'results.md')}")
    return rc


def sandbox_writable_dir(out):
    """The sandbox sees only the current directory and /tmp writable: a results directory
    elsewhere is staged under /tmp (what it already holds copied in, for --resume) and
    copied back at the end."""
    cwd = os.path.realpath(os.getcwd())
    real = os.path.realpath(out)
    if any(real == d or real.startswith(d + os.sep) for d in (cwd, "/tmp")):
        return out
    stage = tempfile.mkdtemp(prefix="ferrovm-bench-out-", dir="/tmp")
    if os.path.isdir(out):
        shutil.copytree(out, stage, dirs_exist_ok=True)
    log(f"{out} is not writable inside the sandbox: staging the results in {stage}")
    return stage


def unfinished(out, classes, since):
    """The classes of this invocation that results.json (written since `since`) lacks."""
    path = os.path.join(out, "results.json")
    try:
        if os.path.getmtime(path) < since:
            return classes
        with open(path) as f:
            done = json.load(f).get("done", [])
    except (OSError, ValueError):
        return classes
    return [c for c in classes if c not in done]


def run_sandboxed(argv, env, stall_seconds):
    """Runs the inner bench in the sandbox, passing its stderr on. Every case run ends within
    its timeout and logs a line, so a sandbox silent for stall_seconds has a hung kernel
    (the nested-SVM fault of TCG does that): it is stopped rather than left to its
    --timeout. Returns the exit status and, if the sandbox died, why."""
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    last = {"t": time.monotonic(), "line": "", "sandbox": ""}

    def pump():
        for line in proc.stderr:
            sys.stderr.buffer.write(line)
            sys.stderr.flush()
            last["t"] = time.monotonic()
            text = line.decode(errors="replace").strip()
            if line.startswith(b"bench: ["):
                last["line"] = text
            elif line.startswith(b"kvm-sandbox: ") and "nested mode" not in text:
                last["sandbox"] = text

    t = threading.Thread(target=pump, daemon=True)
    t.start()
    try:
        while proc.poll() is None:
            time.sleep(1)
            if time.monotonic() - last["t"] > stall_seconds:
                log(f"no output from the sandbox for {stall_seconds} s, last step: {last['line']!r}; "
                    "its kernel is probably hung: stopping it (results so far are in --out)")
                stop_group(proc)
                return 1, f"hung during '{last['line']}'"
    except KeyboardInterrupt:
        stop_group(proc)
        sys.exit(130)
    t.join(5)
    return proc.returncode, f"{last['sandbox'] or 'exit status %d' % proc.returncode} during '{last['line']}'"


def stop_group(proc):
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            pass
