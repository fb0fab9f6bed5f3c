"""results.json -> results.md (tables: medians, min-max, ratios to the host baseline and
to QEMU, ferrovm's exits per MiB, the goals) and PNG bar charts."""

import datetime
import json
import os
import platform
import re
import shlex
import statistics
import subprocess

from .cases import CLASSES
from .common import ROOT, log, summarize

GOALS = [
    # (class, figure, numerator subject, denominator subject, minimum, text)
    ("block", "seq_read_mbps", "ferrovm-virtio-pci", "qemu-virtio-pci", 1.0, "virtio-blk-pci sequential read >= 1.0x QEMU virtio-blk-pci"),
    ("block", "seq_write_mbps", "ferrovm-virtio-pci", "qemu-virtio-pci", 1.0, "virtio-blk-pci sequential write >= 1.0x QEMU virtio-blk-pci"),
    ("block", "rand_read_qd1_iops", "ferrovm-virtio-pci", "qemu-virtio-pci", 1.0, "virtio-blk-pci 4 KiB random read IOPS >= 1.0x QEMU"),
    ("block", "seq_read_mbps", "ferrovm-virtio-mmio", "qemu-virtio", 1.0, "virtio-blk (mmio) sequential read >= 1.0x QEMU virtio-blk (mmio)"),
    ("block", "seq_write_mbps", "ferrovm-virtio-mmio", "qemu-virtio", 1.0, "virtio-blk (mmio) sequential write >= 1.0x QEMU virtio-blk (mmio)"),
    ("net", "tcp_tx_gbps", "ferrovm-virtio-pci", "qemu-virtio-pci", 1.0, "virtio-net-pci TCP guest->host >= 1.0x QEMU virtio-net-pci"),
    ("net", "tcp_rx_gbps", "ferrovm-virtio-pci", "qemu-virtio-pci", 1.0, "virtio-net-pci TCP host->guest >= 1.0x QEMU virtio-net-pci"),
    ("net", "tcp_tx_gbps", "ferrovm-virtio-mmio", "qemu-virtio", 1.0, "virtio-net (mmio) TCP guest->host >= 1.0x QEMU virtio-net (mmio)"),
    ("net", "tcp_rx_gbps", "ferrovm-virtio-mmio", "qemu-virtio", 1.0, "virtio-net (mmio) TCP host->guest >= 1.0x QEMU virtio-net (mmio)"),
    ("block", "seq_read_mbps", "ferrovm-ide-pio", "qemu-ide", 1.0, "IDE sequential read >= 1.0x QEMU's IDE (both PIO)"),
    ("block", "seq_write_mbps", "ferrovm-ide-pio", "qemu-ide", 1.0, "IDE sequential write >= 1.0x QEMU's IDE (both PIO)"),
    ("block", "seq_read_mbps", "ferrovm-ide", "qemu-ide-udma", 1.0, "IDE sequential read >= 1.0x QEMU's IDE (both DMA)"),
    ("block", "seq_write_mbps", "ferrovm-ide", "qemu-ide-udma", 1.0, "IDE sequential write >= 1.0x QEMU's IDE (both DMA)"),
    ("net", "tcp_tx_gbps", "ferrovm-e1000", "qemu-e1000", 1.0, "e1000 TCP guest->host >= 1.0x QEMU's e1000"),
    ("net", "tcp_rx_gbps", "ferrovm-e1000", "qemu-e1000", 1.0, "e1000 TCP host->guest >= 1.0x QEMU's e1000"),
    ("net", "tcp_tx_gbps", "ferrovm-ne2k", "qemu-ne2k", 1.0, "ne2k TCP guest->host >= 1.0x QEMU's ne2k_pci"),
    ("net", "tcp_rx_gbps", "ferrovm-ne2k", "qemu-ne2k", 1.0, "ne2k TCP host->guest >= 1.0x QEMU's ne2k_pci"),
    ("block", "seq_read_mbps", "ferrovm-virtio-pci", "host", 0.8, "virtio-blk-pci sequential read >= 0.8x the host file"),
    ("block", "seq_write_mbps", "ferrovm-virtio-pci", "host", 0.8, "virtio-blk-pci sequential write >= 0.8x the host file"),
    # Lower is better for boot time: the ratio is the time without ACPI over the time with.
    ("boot", "boot_s", "ferrovm-boot-noacpi", "ferrovm-boot", 1.0, "boot with ACPI no slower than without (--no-acpi time / ACPI time >= 1.0)"),
    # Lower is better: the ratio is vng's time over ferrovm's (2.0 = ferrovm in half the time).
    ("exec", "true_s", "vng", "ferrovm-exec", 2.0, "ferrovm exec -- true in <= 0.5x the time of vng -- true"),
    ("exec", "hash_s", "vng", "ferrovm-exec", 1.0, "hashing a source tree under ferrovm exec no slower than under vng"),
    # Lower is better: a fresh boot's time over the restore's (20 = restored in 1/20 of the time).
    ("snapshot", "to_running_s", "ferrovm-boot", "ferrovm-restore", 20.0, "restore to running >= 20x faster than a fresh boot to the same point (boot time / restore time >= 20)"),
] + [
    # Lower is better: QEMU's figure over ferrovm's (>= 1.0: ferrovm's no higher).
    ("migrate", f"{key}_{fig}", "qemu", "ferrovm", 1.0, f"migration, {label}: ferrovm {what} <= QEMU's (QEMU / ferrovm >= 1.0)")
    for key, label, *_ in CLASSES["migrate"].CASES
    for fig, what in (("downtime_ms", "downtime"), ("total_s", "total time"))]

LIMITS = [
    # (class, figure, subject, maximum, unit, text): the median must not exceed maximum.
    ("snapshot", "vmm_restore_ms", "ferrovm-restore", 10.0, "ms", "VMM restore time (restore_ms) <= 10 ms"),
]


def tool_version(argv):
    try:
        p = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=30)
        return p.stdout.splitlines()[0].strip() if p.stdout else ""
    except (OSError, subprocess.TimeoutExpired):
        return ""


def environment(args, art):
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.*)$", f.read(), re.M)
            cpu = m.group(1) if m else ""
    except OSError:
        pass

    def git(*a):
        return subprocess.run(["git", "-C", ROOT, *a], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host_cpu": cpu, "cpus_visible": os.cpu_count(), "kernel": platform.release(),
        "outer_host": os.environ.get("FERROVM_BENCH_OUTER_HOST"),
        "sandbox_mode": os.environ.get("FERROVM_SANDBOX_MODE", "direct"),
        "ferrovm_commit": git("rev-parse", "--short", "HEAD") + ("-dirty" if dirty else ""),
        "qemu": tool_version(["qemu-system-x86_64", "--version"]),
        "fio": tool_version(["fio", "--version"]), "iperf3": tool_version(["iperf3", "--version"]),
        "guest_kernel": art.get("vmlinux"), "initramfs_bench": art.get("initramfs_bench"),
        "bench_vm": {"cpus": args.cpus, "memory_mib": args.memory},
    }


def fmt(v):
    """Three significant digits (no exponent), thousands separated."""
    if v is None:
        return "-"
    if float(v).is_integer() or abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{float(f'{v:.3g}'):g}"


def medians(res, key):
    """{subject: median of figure key} over the subject's runs."""
    out = {}
    for name, runs in res["runs"].items():
        vals = [r["figures"][key] for r in runs if r["figures"].get(key) is not None]
        if vals:
            out[name] = statistics.median(vals)
    return out


def figure_table(res, figures):
    subjects = [s for s in res["subjects"]]
    lines = ["| figure | unit | " + " | ".join(s["label"] for s in subjects) + " | better |",
             "|---|---|" + "---|" * len(subjects) + "---|"]
    for key, label, unit, better in figures:
        cells = []
        for s in subjects:
            vals = [r["figures"][key] for r in res["runs"].get(s["name"], [])
                    if r["figures"].get(key) is not None]
            if vals:
                m = summarize(vals)
                cells.append(f"**{fmt(m['median'])}**" + (f" ({fmt(m['min'])}–{fmt(m['max'])})" if m["n"] > 1 else ""))
            else:
                cells.append("failed" if res["errors"].get(s["name"]) else "-")
        lines.append(f"| {label} | {unit} | " + " | ".join(cells) + f" | {better} |")
    return lines


def ratio(a, b):
    return a / b if a is not None and b else None


def ratio_table(res, figures):
    """ferrovm/QEMU per model, and each subject / the host baseline."""
    subs = {s["name"]: s for s in res["subjects"]}
    cols = []
    for s in res["subjects"]:
        if s["kind"] == "ferrovm" and s.get("peer") in subs:
            cols.append((s["name"], s["peer"], f"{s['label']} / {subs[s['peer']]['label']}"))
    if "host" in subs:
        cols += [(s["name"], "host", f"{s['label']} / host") for s in res["subjects"] if s["name"] != "host"]
    if not cols:
        return []
    lines = ["| figure | " + " | ".join(c[2] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for key, label, _unit, better in figures:
        if _unit == "count":
            continue  # counts (retransmits) have no meaningful ratio
        med = medians(res, key)
        cells = [fmt_ratio(ratio(med.get(a), med.get(b))) for a, b, _ in cols]
        lines.append(f"| {label} ({better} is better) | " + " | ".join(cells) + " |")
    return lines


def fmt_ratio(r):
    return "-" if r is None else f"{r:.2f}x"


def metrics_table(res):
    rows = []
    for s in res["subjects"]:
        if s["kind"] != "ferrovm":
            continue
        ms = [r["metrics"] for r in res["runs"].get(s["name"], []) if r.get("metrics")]
        if not ms:
            continue

        def med(k):
            vals = [m[k] for m in ms if m.get(k) is not None]
            return statistics.median(vals) if vals else None

        top = ", ".join(f"{name} ({n:,})" for name, n in ms[0].get("top_registers", [])[:3])
        rows.append(f"| {s['label']} | {fmt(med('mib_moved'))} | {fmt(med('exits'))} | "
                    f"{fmt(med('notifications'))} | {fmt(med('interrupts'))} | {fmt(med('exits_per_mib'))} | "
                    f"{fmt(med('total_exits_per_mib'))} | {fmt(med('bytes_per_exit'))} | "
                    f"{fmt(med('bytes_per_total_exit'))} | {fmt(med('interrupts_per_mib'))} | {top} |")
    if not rows:
        return []
    return ["ferrovm's `--metrics` for the device under test over the whole VM run (every job of "
            "the class; medians over the runs). Exits = exits to ferrovm (userspace); all exits = "
            "those + ioeventfd notifications (VM exits KVM handles in the kernel).", "",
            "| device | MiB moved | exits | notifications | interrupts | exits/MiB | all exits/MiB "
            "| bytes/exit | bytes/all exits | interrupts/MiB | busiest registers (first run) |",
            "|---|---|---|---|---|---|---|---|---|---|---|"] + rows


def errors_lines(res):
    out = []
    subs = {s["name"]: s for s in res["subjects"]}
    for name, why in res.get("unavailable", {}).items():
        out += [f"- **{subs[name]['label']}: not measured**: {why}"]
    for name, errs in res.get("errors", {}).items():
        if not errs:
            continue
        ok = len(res["runs"].get(name, []))
        excerpt = "\n".join(errs[-1].splitlines()[-25:])
        out += [f"- **{subs[name]['label']}: {len(errs)} failure(s)** ({ok} run(s) with figures): "
                f"{errs[-1].splitlines()[0][:300]}", "",
                "  <details><summary>end of the last failure</summary>", "", "  ```",
                *["  " + ln for ln in excerpt.splitlines()], "  ```", "", "  </details>", ""]
    return out


def goals_lines(results):
    lines = ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    for cls, key, a, b, minimum, text in GOALS:
        res = results.get("cases", {}).get(cls)
        r = None
        if res:
            med = medians(res, key)
            r = ratio(med.get(a), med.get(b))
        met = "-" if r is None else ("yes" if r >= minimum else "**no**")
        lines.append(f"| {text} | {fmt_ratio(r)} | {met} |")
    for cls, key, subject, maximum, unit, text in LIMITS:
        res = results.get("cases", {}).get(cls)
        v = medians(res, key).get(subject) if res else None
        met = "-" if v is None else ("yes" if v <= maximum else "**no**")
        lines.append(f"| {text} | {'-' if v is None else f'{fmt(v)} {unit}'} | {met} |")
    return lines + [""]


TITLES = {"boot": "Boot: process start to userspace marker",
          "block": "Block: fio, host file vs container vs VMs",
          "net": "Net: iperf3 TCP both ways and ping round trip",
          "stream": "Stream: guest bytes through ttyS1 (UART) vs hvc0 (virtio console) into a host file",
          "snapshot": "Snapshot: pause + snapshot, its size, restore to running against a fresh boot",
          "migrate": "Migrate: live migration, ferrovm against QEMU, downtime read from the guest's console",
          "exec": "Exec: one command in a fresh VM on the host's files, ferrovm exec vs virtme-ng"}


def write(out_dir, results, quiet=True):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    env = results["environment"]
    lines = ["# ferrovm benchmark results", "",
             f"{env['date']}, ferrovm {env['ferrovm_commit']}, {env['sandbox_mode']} mode "
             f"({env['host_cpu']}, {env['cpus_visible']} CPUs, kernel {env['kernel']}"
             + (f"; outer host: {env['outer_host']}" if env.get("outer_host") else "") + "); "
             f"{env['qemu']}; {env['fio']}; {env['iperf3'].split(' (')[0]}. "
             "Every case of the run on the same machine, one after the other, the same guest "
             "kernel and bench initramfs for every VM.", "",
             f"Wall time of the benchmark run: {results.get('wall_seconds', 0):.0f} s"
             + (f"; of `scripts/bench` with the sandbox's boot: {results['outer_wall_seconds']:.0f} s"
                if results.get("outer_wall_seconds") else " (inside the sandbox, its boot not included)")
             + ".", ""]
    if env["sandbox_mode"] == "nested":
        lines += ["Nested mode: the VMs run under KVM inside a QEMU TCG guest (emulated SVM), so "
                  "absolute figures are those of that set-up; ratios between cases are what to read.", ""]
    lines += goals_lines(results)
    charts = results.get("charts", {})
    for cls in ("boot", "block", "net", "stream", "exec", "snapshot", "migrate"):
        res = results.get("cases", {}).get(cls)
        if not res:
            continue
        figs = CLASSES[cls].FIGURES
        lines += [f"## {TITLES[cls]}", "", res["describe"],
                  f"Runs per subject: {results['params']['repeat_boot' if cls in ('boot', 'exec') else 'repeat']}; "
                  "cells: **median** (min–max).", ""]
        lines += figure_table(res, figs) + [""]
        rt = ratio_table(res, figs)
        if rt:
            lines += ["Ratios of medians:", ""] + rt + [""]
        mt = metrics_table(res)
        if mt:
            lines += mt + [""]
        if cls == "boot":
            over = [r["memory"]["vmm_overhead_kib"] for r in res["runs"].get("ferrovm-boot", [])
                    if r.get("memory", {}).get("vmm_overhead_kib") is not None]
            if over:
                lines += [f"ferrovm peak RSS minus guest RAM: median {statistics.median(over) / 1024:.1f} MiB "
                          f"(min {min(over) / 1024:.1f}, max {max(over) / 1024:.1f}).", ""]
        if cls == "block":
            modes = {s: sorted({ln.split("configured for ")[1] for r in res["runs"].get(s, [])
                                for ln in r.get("guest_dmesg", []) if "configured for " in ln})
                     for s in ("ferrovm-ide-pio", "ferrovm-ide", "qemu-ide", "qemu-ide-udma")}
            if any(modes.values()):
                lines += ["IDE transfer mode libata chose: " + "; ".join(
                    f"{s}: {', '.join(m) or '?'}" for s, m in modes.items()) + ".", ""]
        if hasattr(CLASSES[cls], "notes"):
            lines += CLASSES[cls].notes(res)
        for png in charts.get(cls, []):
            lines += [f"![{cls}]({png})", ""]
        lines += errors_lines(res) + [""]
    for png in charts.get("exits", []):
        lines += ["## VM exits per MiB moved (ferrovm)", "", f"![exits per MiB]({png})", ""]
    for why in results.get("sandbox_lost", []):
        lines += [f"Note: the sandbox was lost ({why}); the classes it had not finished ran "
                  "again in a new sandbox.", ""]
    missing = [c for c in results["classes"] if c not in results["done"]]
    if missing:
        lines += [f"**Not (yet) measured: {', '.join(missing)}**"
                  + "".join(f"; {c}: {e.splitlines()[0]}" for c, e in results.get("failed_classes", {}).items()),
                  ""]
    lines += commands_lines(results)
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(lines))
    if not quiet:
        print("\n".join(lines))


def commands_lines(results):
    """The exact command lines, the base64 guest script abbreviated and shown decoded."""
    out = ["## Commands", ""]
    for cls, res in results.get("cases", {}).items():
        for name, cmd in res.get("commands", {}).items():
            argvs = cmd if cmd and isinstance(cmd[0], list) else [cmd]
            text = re.sub(r"echo [A-Za-z0-9+/=]{40,} \| base64 -d", "echo <SCRIPT-BASE64> | base64 -d",
                          "\n".join(shlex.join(a) for a in argvs))
            out += [f"{cls} / {name}:", "", "```", text, "```", ""]
        seen = set()
        for name, script in res.get("guest_scripts", {}).items():
            if script in seen:
                continue
            seen.add(script)
            out += [f"{cls}: SCRIPT of {name} (run by the guest's /init):", "", "```sh", script.rstrip(), "```", ""]
    return out


# ---------------------------------------------------------------------------------------
# Charts
# ---------------------------------------------------------------------------------------
COLORS = {"host": "#7f7f7f", "container": "#bcbd22", "ferrovm": "#1f77b4", "qemu": "#ff7f0e"}


def charts(out_dir, results):
    """PNG bar charts next to results.md; {class: [file names]} (empty without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is missing (apt-get install python3-matplotlib): no charts")
        return {}
    made = {}
    for cls, res in results.get("cases", {}).items():
        keys = getattr(CLASSES[cls], "CHART", [k for k, *_ in CLASSES[cls].FIGURES])
        labels = {k: (label, unit, better) for k, label, unit, better in CLASSES[cls].FIGURES}
        fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys) + 1, 4.6), squeeze=False)
        for ax, key in zip(axes[0], keys):
            names, meds, lo, hi, colors = [], [], [], [], []
            for s in res["subjects"]:
                vals = [r["figures"][key] for r in res["runs"].get(s["name"], [])
                        if r["figures"].get(key) is not None]
                names.append(s["label"].replace(" (", "\n("))
                colors.append(COLORS[s["kind"]])
                if vals:
                    m = summarize(vals)
                    meds.append(m["median"])
                    lo.append(m["median"] - m["min"])
                    hi.append(m["max"] - m["median"])
                else:
                    meds.append(0)
                    lo.append(0)
                    hi.append(0)
            x = range(len(names))
            bars = ax.bar(x, meds, color=colors, yerr=[lo, hi], capsize=3)
            for b, v, s in zip(bars, meds, res["subjects"]):
                failed = not res["runs"].get(s["name"])
                ax.annotate("failed" if failed else fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points",
                            color="red" if failed else "black")
            label, unit, better = labels[key]
            ax.set_title(f"{label}\n({unit}, {better} is better)", fontsize=9)
            ax.set_xticks(list(x))
            ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
            ax.margins(y=0.15)
        fig.suptitle(TITLES[cls], fontsize=11)
        fig.tight_layout()
        name = f"{cls}.png"
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        made[cls] = [name]
    # Exits per MiB for every ferrovm case with metrics: userspace exits and all exits.
    rows = []
    for cls, res in results.get("cases", {}).items():
        for s in res["subjects"]:
            ms = [r["metrics"] for r in res["runs"].get(s["name"], []) if r.get("metrics")]
            u = [m["exits_per_mib"] for m in ms if m.get("exits_per_mib") is not None]
            t = [m["total_exits_per_mib"] for m in ms if m.get("total_exits_per_mib") is not None]
            if u or t:
                rows.append((f"{cls}: {s['label']}", statistics.median(u) if u else 0,
                             statistics.median(t) if t else 0))
    if rows:
        fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows) + 2), 4.8))
        x = list(range(len(rows)))
        w = 0.4
        b1 = ax.bar([i - w / 2 for i in x], [r[1] or 0.1 for r in rows], w, label="exits to ferrovm",
                    color="#1f77b4")
        b2 = ax.bar([i + w / 2 for i in x], [r[2] or 0.1 for r in rows], w,
                    label="all exits (+ ioeventfd notifications)", color="#aec7e8")
        for bars, vals in ((b1, [r[1] for r in rows]), (b2, [r[2] for r in rows])):
            for b, v in zip(bars, vals):
                ax.annotate(fmt(v), (b.get_x() + b.get_width() / 2, b.get_height()), ha="center",
                            va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
        ax.set_yscale("log")
        ax.set_ylabel("VM exits per MiB moved (log scale, lower is better)")
        ax.set_xticks(x)
        ax.set_xticklabels([r[0] for r in rows], rotation=30, ha="right", fontsize=8)
        ax.legend(fontsize=8)
        ax.set_title("ferrovm: VM exits per MiB moved, per device model")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, "exits-per-mib.png"), dpi=110)
        plt.close(fig)
        made["exits"] = ["exits-per-mib.png"]
    return made


def render(out_dir):
    """Charts + results.md again from results.json (the outer process after the sandbox)."""
    path = os.path.join(out_dir, "results.json")
    try:
        with open(path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return None
    results["charts"] = charts(out_dir, results)
    return results
