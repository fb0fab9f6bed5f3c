"""scripts/soak: how often guests die under I/O load, ferrovm against QEMU, device class by
device class, with each death's reason. The workloads, VM command lines and tools are the
bench's (cases.Block, cases.Net, vms): only the loop and the bookkeeping are here."""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time

from . import cases, report
from .common import ROOT, GuestError, Unavailable, log, minutes
from .main import artifacts, kvm_usable, params, run_sandboxed, sandbox_writable_dir

# (class, ferrovm subject, its QEMU peer): each pair alternates, run after run.
# The bench's subject names; a pair whose names the bench no longer has fails at start.
PAIRS = [
    ("block", "ferrovm-virtio-pci", "qemu-virtio-pci"),
    ("block", "ferrovm-virtio-mmio", "qemu-virtio"),
    ("block", "ferrovm-ide", "qemu-ide-udma"),
    ("net", "ferrovm-virtio-pci", "qemu-virtio-pci"),
    ("net", "ferrovm-virtio-mmio", "qemu-virtio"),
    ("net", "ferrovm-ne2k", "qemu-ne2k"),
    ("net", "ferrovm-e1000", "qemu-e1000"),
]
OUTCOMES = ["ok", "crash", "hang", "vmm-failure", "workload-failed", "unavailable"]
# How the guest kernel starts the report of its own death.
PANIC = re.compile(r"Kernel panic - not syncing.*|BUG: .*|Oops.*|general protection fault.*|"
                   r"kernel BUG at.*|double fault.*")


class Recording:
    """The bench class, remembering what the last VM printed and how it ended, so that a
    failed run can be told apart (a guest crash, a hang, the VMM's own failure)."""

    def boot_vm(self, subject, watch=None):
        self.last = {"timed_out": False}
        try:
            console, stderr, rc, secs, metrics = super().boot_vm(subject, watch)
        except GuestError as e:
            self.last.update(timed_out="timed out" in str(e), error=str(e))
            raise
        crash = None
        try:
            with open(self.metrics_path) as f:
                crash = json.load(f).get("crash")
        except (OSError, ValueError):
            pass
        self.last.update(console=console, stderr=stderr, rc=rc, seconds=secs, crash_json=crash)
        return console, stderr, rc, secs, metrics


class SoakBlock(Recording, cases.Block):
    pass


class SoakNet(Recording, cases.Net):
    pass


def crash_report(stderr, title="crash report:"):
    """ferrovm's reason line and the indented report after it: the crash report, or with
    title "stop report:" where a guest stopped from outside (a hang's timeout) was."""
    lines = stderr.splitlines()
    reason = next((ln for ln in lines if ln.startswith("ferrovm:")), None)
    report_lines = []
    if title in lines:
        for ln in lines[lines.index(title) + 1:]:
            if not ln.startswith("  "):
                break
            report_lines.append(ln)
    return reason, "\n".join(report_lines) or None


def classify(subject, last, error):
    """One run's outcome and, when it is not ok, why."""
    if last is None or "rc" not in last:
        # The VM never ran to its end: a timeout, or it could not start.
        text = (last or {}).get("error") or error or ""
        outcome = "hang" if (last or {}).get("timed_out") else "vmm-failure"
        panic = PANIC.search(text)
        # ferrovm stopped by the timeout's SIGTERM says where the guest was.
        _, stop = crash_report(text, "stop report:")
        return outcome, {"why": text.splitlines()[0] if text else "unknown",
                         "panic": panic.group(0) if panic else None, "stop_report": stop,
                         "tail": text[-3000:]}
    console, stderr, rc = last["console"], last["stderr"], last["rc"]
    panic = PANIC.search(console)
    info = {"exit_status": rc, "panic": panic.group(0).strip() if panic else None,
            "console_tail": console.splitlines()[-12:]}
    if subject["kind"] == "ferrovm":
        reason, report_text = crash_report(stderr)
        info.update(reason=reason, crash_report=report_text, crash=last.get("crash_json"))
        if error is None:
            return "ok", info
        if rc == 1 and reason and report_text:
            return "crash", info
        if rc != 0:
            # A VMM that aborted (the write guard: 134), died on seccomp (159), panicked...
            info["why"] = reason or f"exit status {rc}: {stderr.strip()[-300:]}"
            return "vmm-failure", info
        info["why"] = error.splitlines()[0]
        return ("crash" if panic else "workload-failed"), info
    if error is None:
        return "ok", info
    # QEMU ends with status 0 on a guest reset (-no-reboot), a crash with panic=-1 among
    # them: output that stops short is a guest that died, unless the workload said why.
    info["why"] = f"exit status {rc}; " + error.splitlines()[0]
    if panic or rc == 0 and "@@FVB-END" not in console.split("@@FVB-BEGIN")[-1]:
        return "crash", info
    return ("vmm-failure" if rc != 0 else "workload-failed"), info


def subject_of(cls, name):
    for s in cases.CLASSES[cls].SUBJECTS:
        if s["name"] == name:
            return s
    raise SystemExit(f"soak: the bench's {cls} class has no subject {name!r} (it has "
                     + ", ".join(s["name"] for s in cases.CLASSES[cls].SUBJECTS) + ")")


def key(cls, name):
    return f"{cls}:{name}"


def selected_pairs(only):
    if not only:
        return PAIRS
    want = set(only.split(","))
    pairs = [p for p in PAIRS if want & {key(p[0], p[1]), key(p[0], p[2]), f"{p[0]}:{p[1].split('-', 1)[1]}"}]
    if not pairs:
        raise SystemExit(f"soak: --only {only}: no such pair; one of "
                         + ", ".join(f"{c}:{f.split('-', 1)[1]}" for c, f, _ in PAIRS))
    return pairs


def inner(args):
    p = params(argparse.Namespace(repeat=1, quick=args.quick))
    if args.cpus is None:
        args.cpus = 2 if (os.cpu_count() or 1) >= 4 else 1
    art = json.loads(os.environ["FERROVM_BENCH_ARTIFACTS"]) if os.environ.get(
        "FERROVM_BENCH_ARTIFACTS") else artifacts(True)
    if args.write_guard:
        os.environ["FERROVM_WRITE_GUARD"] = "1"
    pairs = selected_pairs(args.only)
    objs = {}
    for cls, _, _ in pairs:
        if cls not in objs:
            objs[cls] = (SoakBlock if cls == "block" else SoakNet)(art, args, p)
    path = os.path.join(args.out, "results.json")
    res = None
    if args.resume:
        try:
            with open(path) as f:
                res = json.load(f)
            res.setdefault("sandbox_lost", []).append(os.environ.get("FERROVM_BENCH_LOST", "?"))
        except (OSError, ValueError):
            res = None
    if res is None:
        res = {"environment": report.environment(args, art), "params": p, "runs_per_subject": args.runs,
               "write_guard": args.write_guard, "subjects": {}}
    for cls, f, q in pairs:
        for name in (f, q):
            s = subject_of(cls, name)
            res["subjects"].setdefault(key(cls, name), {"class": cls, "label": s["label"], "kind": s["kind"],
                                                        "runs": []})
    left = [(c, n, args.runs - len(res["subjects"][key(c, n)]["runs"])) for c, f, q in pairs for n in (f, q)]
    total = sum(k for _, _, k in left)
    est = sum(k * objs[c].estimate(subject_of(c, n)) for c, n, k in left)
    log(f"{total} runs to go, ~{minutes(est)} by the bench's estimates")
    done = 0
    os.makedirs(args.out, exist_ok=True)
    for obj in objs.values():
        obj.setup()
    try:
        for i in range(args.runs):
            for cls, f, q in pairs:
                order = [f, q] if i % 2 == 0 else [q, f]
                for name in order:
                    rec = res["subjects"][key(cls, name)]
                    if len(rec["runs"]) > i:
                        continue  # done before a lost sandbox
                    s, obj = subject_of(cls, name), objs[cls]
                    done += 1
                    log(f"[{done}/{total}] {cls} {s['label']} run {i + 1}/{args.runs}")
                    obj.last, error, figures = None, None, None
                    start = time.monotonic()
                    try:
                        figures = obj.run(s).get("figures")
                    except Unavailable as e:
                        rec["runs"].append({"run": i + 1, "outcome": "unavailable", "why": str(e)})
                        continue
                    except GuestError as e:
                        error = str(e)
                    outcome, info = classify(s, obj.last, error)
                    run = {"run": i + 1, "outcome": outcome, "seconds": round(time.monotonic() - start, 1),
                           **info}
                    if outcome == "ok":
                        run = {"run": i + 1, "outcome": "ok", "seconds": run["seconds"], "figures": figures}
                    else:
                        log(f"{cls} {s['label']} run {i + 1}: {outcome.upper()}: "
                            + (info.get("reason") or info.get("why") or "") +
                            (f" [{info['panic']}]" if info.get("panic") else ""))
                    rec["runs"].append(run)
                    write(args.out, res)
    finally:
        for obj in objs.values():
            obj.teardown()
    write(args.out, res)
    return 0


def counts(runs):
    c = {o: 0 for o in OUTCOMES}
    for r in runs:
        c[r["outcome"]] = c.get(r["outcome"], 0) + 1
    return c


def markdown(res):
    out = ["# Guest crash rates under I/O load (scripts/soak)", ""]
    env = res.get("environment", {})
    out.append(f"{env.get('date', '')}; ferrovm {env.get('ferrovm_commit', '?')}, {env.get('qemu', '?')}, "
               f"sandbox {env.get('sandbox_mode', '?')}, host {env.get('outer_host') or env.get('host_cpu')}; "
               f"{res.get('runs_per_subject')} runs per subject, ferrovm and QEMU alternating, "
               f"write guard {'on' if res.get('write_guard') else 'off'}.")
    if res.get("sandbox_lost"):
        out.append(f"The sandbox was lost {len(res['sandbox_lost'])} time(s) and the runs went on in a new "
                   f"one: {'; '.join(res['sandbox_lost'])}.")
    out += ["", "| class | subject | runs | ok | crash | hang | VMM failure | workload failed | crash rate |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, s in res["subjects"].items():
        c = counts(s["runs"])
        n = len([r for r in s["runs"] if r["outcome"] != "unavailable"])
        rate = f"{100 * c['crash'] / n:.0f} %" if n else "-"
        out.append(f"| {s['class']} | {s['label']} | {n} | {c['ok']} | {c['crash']} | {c['hang']} | "
                   f"{c['vmm-failure']} | {c['workload-failed']} | {rate} |")
    out += ["", "Crash: the guest died (ferrovm: exit 1 with a crash report; QEMU: a kernel panic on the "
            "console, or its output stopping short while QEMU exits 0, which is what a guest reset "
            "looks like with -no-reboot). Hang: the run's timeout. VMM failure: the VMM itself ended "
            "badly (e.g. the write guard's abort, status 134). Workload failed: the VM ended cleanly "
            "but fio/iperf3 did not.", ""]
    for name, s in res["subjects"].items():
        bad = [r for r in s["runs"] if r["outcome"] not in ("ok", "unavailable")]
        if not bad:
            continue
        out += [f"## {s['class']}: {s['label']}", ""]
        for r in bad:
            why = r.get("reason") or r.get("why") or ""
            out.append(f"- run {r['run']}: **{r['outcome']}** after {r.get('seconds', '?')} s: {why}"
                       + (f" (console: `{r['panic']}`)" if r.get("panic") else ""))
            report = r.get("crash_report") or r.get("stop_report")
            if report:
                out += ["", "  ```", *("  " + ln for ln in report.splitlines()), "  ```", ""]
            elif r.get("console_tail"):
                out += ["", "  ```", *("  " + ln for ln in r["console_tail"][-6:]), "  ```", ""]
        out.append("")
    return "\n".join(out) + "\n"


def write(out, res):
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(res, f, indent=1)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(markdown(res))


def table(res):
    lines = [f"{'subject':<30} {'runs':>4} {'ok':>4} {'crash':>5} {'hang':>4} {'vmm':>4} {'work':>4}"]
    for name, s in res["subjects"].items():
        c = counts(s["runs"])
        lines.append(f"{name:<30} {len(s['runs']):>4} {c['ok']:>4} {c['crash']:>5} {c['hang']:>4} "
                     f"{c['vmm-failure']:>4} {c['workload-failed']:>4}")
    return "\n".join(lines)


def outer(args, argv_extra):
    """No hardware KVM here: build, then the whole soak in ONE scripts/kvm-sandbox (a lost
    sandbox, up to twice, in a new one for the runs it had not done)."""
    art = artifacts(True)  # built outside: the sandbox sees the cache read-only
    env = dict(os.environ, FERROVM_SOAK_INNER="1", FERROVM_BENCH_ARTIFACTS=json.dumps(art),
               FERROVM_BENCH_OUTER_HOST=f"{os.cpu_count()} CPUs, kernel {os.uname().release}")
    final_out = os.path.abspath(args.out)
    out = sandbox_writable_dir(final_out)
    argv = [os.path.join(ROOT, "scripts/kvm-sandbox"), "--cpus", str(args.sandbox_cpus), "--timeout",
            str(max(7200, args.runs * 8 * 400)), "--mem", "6144", "--",
            sys.executable, os.path.join(ROOT, "scripts/soak"), "--out", out] + argv_extra
    p = params(argparse.Namespace(repeat=1, quick=args.quick))
    rc, why = run_sandboxed(argv, env, stall_seconds=p["vm_timeout"] + 180)
    for _ in range(2):
        if rc == 0:
            break
        log(f"the sandbox was lost ({why}); going on in a new one")
        rc, why = run_sandboxed(argv + ["--resume"], dict(env, FERROVM_BENCH_LOST=why),
                                stall_seconds=p["vm_timeout"] + 180)
    if out != final_out:
        shutil.copytree(out, final_out, dirs_exist_ok=True)
        shutil.rmtree(out, ignore_errors=True)
    return rc


def main():
    doc = sys.modules["__main__"].__doc__ or ""
    ap = argparse.ArgumentParser(description=doc.split("\n", 1)[0], epilog=doc.split("\n\n", 1)[-1],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20, help="runs per subject (default 20)")
    ap.add_argument("--only", default="", metavar="CLASS:MODEL[,...]",
                    help="some pairs only: block:virtio-pci, block:virtio-mmio, block:ide, net:virtio-pci, "
                    "net:virtio-mmio, net:ne2k, net:e1000")
    ap.add_argument("--quick", action="store_true", help="the bench's --quick workload (1 s fio jobs, "
                    "1 s iperf3): more runs per hour, less load per run")
    ap.add_argument("--no-write-guard", dest="write_guard", action="store_false",
                    help="run ferrovm without FERROVM_WRITE_GUARD=1")
    ap.add_argument("--out", default="soak-results", help="results directory (default soak-results)")
    ap.add_argument("--cpus", type=int, default=None, help="vCPUs of the VMs (default: as the bench)")
    ap.add_argument("--memory", type=int, default=1024, help="MiB of the VMs (default 1024)")
    ap.add_argument("--sandbox-cpus", type=int, default=2,
                    help="vCPUs of the nested sandbox (default 2, as the bench)")
    ap.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.runs < 1:
        ap.error("--runs must be at least 1")
    selected_pairs(args.only)  # a bad --only fails here, before any build
    if not os.environ.get("FERROVM_SOAK_INNER"):
        subprocess.run(["cargo", "build", "--release", "--quiet"], cwd=ROOT, check=True)
    if not kvm_usable() and not os.environ.get("FERROVM_SOAK_INNER"):
        # The inner run gets the same options but --out, which outer stages where the
        # sandbox can write.
        cleaned, skip = [], False
        for a in sys.argv[1:]:
            if skip or a == "--resume" or a.startswith("--out="):
                skip = False
                continue
            if a == "--out":
                skip = True
                continue
            cleaned.append(a)
        rc = outer(args, cleaned)
    else:
        rc = inner(args)
    path = os.path.join(args.out, "results.json")
    if os.path.exists(path) and not os.environ.get("FERROVM_SOAK_INNER"):
        with open(path) as f:
            res = json.load(f)
        print(table(res))
        print(f"\n{os.path.join(args.out, 'results.md')}, {path}")
    sys.exit(rc)
