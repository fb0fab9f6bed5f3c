//! The command line's contract for bad input: a clear message naming what was wrong and a
//! non-zero exit, never a panic. None of these reach KVM, so they run on any host.

mod common;

use common::{artifacts, temp_path, Output, Vm};

fn run(args: &[&str]) -> Output {
    let mut vm = Vm::new();
    for a in args {
        vm.arg(a);
    }
    vm.run()
}

/// Asserts a failed run with one error line containing `needle` and no panic.
fn assert_fails_with(out: &Output, code: i32, needle: &str) {
    assert_eq!(out.code, Some(code), "{}", out.dump());
    assert!(
        out.stderr.contains(needle),
        "expected '{needle}' in stderr\n{}",
        out.dump()
    );
    assert!(!out.stderr.contains("panicked"), "{}", out.dump());
    assert!(!out.stderr.contains("RUST_BACKTRACE"), "{}", out.dump());
}

fn write_temp(tag: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = temp_path(tag);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn help_documents_every_flag() {
    let out = std::process::Command::new(common::ferrovm_bin())
        .args(["run", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
        "--disk",
        "--net",
        "--console",
        "--serial2",
        "--metrics",
        "--system-map",
        "--no-seccomp",
        "--allow-emulated-kvm",
        "model=virtio|ide|ide-pio",
        "model=virtio|ne2k|e1000",
    ] {
        assert!(help.contains(flag), "run --help lacks {flag}:\n{help}");
    }
    assert!(
        help.contains("159 (128+SIGSYS)"),
        "run --help lacks the seccomp exit status:\n{help}"
    );
    let top = std::process::Command::new(common::ferrovm_bin())
        .arg("--help")
        .output()
        .unwrap();
    let top = String::from_utf8_lossy(&top.stdout);
    assert!(top.contains("run"), "{top}");
    assert!(top.contains("check"), "{top}");
}

/// Runs `git ARGS` in the repository, if git is there.
fn git(args: &[&str]) -> Option<String> {
    let out = std::process::Command::new("git")
        .args(args)
        .current_dir(common::repo_root())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn version_names_the_commit() {
    let out = std::process::Command::new(common::ferrovm_bin())
        .arg("--version")
        .output()
        .unwrap();
    assert!(out.status.success());
    let version = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let prefix = format!("ferrovm {} (commit ", env!("CARGO_PKG_VERSION"));
    let commit = version
        .strip_prefix(&prefix)
        .and_then(|v| v.strip_suffix(')'))
        .unwrap_or_else(|| panic!("{version:?} is not '{prefix}COMMIT)'"));
    match git(&["rev-parse", "--short=12", "HEAD"]) {
        // Built from this checkout (cargo rebuilt it for this test): HEAD, -dirty when the
        // sources differ from it.
        Some(head) => {
            let dirty = git(&[
                "status",
                "--porcelain",
                "--",
                "src",
                "build.rs",
                "Cargo.toml",
                "Cargo.lock",
            ])
            .is_some_and(|s| !s.is_empty());
            let want = if dirty { format!("{head}-dirty") } else { head };
            assert_eq!(commit, want, "{version}");
        }
        None => assert_eq!(commit, "unknown", "{version}"),
    }
}

/// `ferrovm check --json` with `envs` set, parsed, and its exit status.
fn check_json(envs: &[(&str, &std::ffi::OsStr)]) -> (serde_json::Value, Option<i32>) {
    let mut cmd = std::process::Command::new(common::ferrovm_bin());
    cmd.args(["check", "--json"]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let doc: serde_json::Value = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("check --json printed no JSON ({e}):\n{text}"));
    (doc, out.status.code())
}

/// The item `id` of a `check --json` report.
fn item<'a>(doc: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    doc["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] == id)
        .unwrap_or_else(|| panic!("no item {id}: {doc}"))
}

/// Whether this host's KVM is on hardware virtualization, read the way an administrator
/// would: a vmx or svm CPU flag, and not only the software KVM module loaded.
fn host_has_hardware_virtualization() -> bool {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let flag = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let module = |m: &str| std::path::Path::new("/sys/module").join(m).exists();
    flag && (module("kvm_intel") || module("kvm_amd") || !module("kvm_pvm"))
}

#[test]
fn check_reports_this_hosts_virtualization() {
    let hw = host_has_hardware_virtualization();
    let (doc, code) = check_json(&[]);
    let hv = item(&doc, "hardware_virtualization");
    assert_eq!(hv["ok"], hw, "{doc}");
    assert_eq!(hv["required"], true, "{doc}");
    if !hw {
        assert!(
            hv["detail"]
                .as_str()
                .unwrap()
                .contains("no vmx or svm flag"),
            "{doc}"
        );
        assert!(
            hv["fix"].as_str().unwrap().contains("scripts/kvm-sandbox"),
            "{doc}"
        );
        assert_eq!(code, Some(1), "{doc}");
        assert_eq!(doc["ok"], false, "{doc}");
    }
    // Every item is ok or has a fix; the exit status follows the required ones.
    let items = doc["items"].as_array().unwrap();
    for i in items {
        assert!(i["ok"] == true || i["fix"].is_string(), "{i}");
    }
    let required_missing = items
        .iter()
        .any(|i| i["required"] == true && i["ok"] == false);
    assert_eq!(code, Some(i32::from(required_missing)), "{doc}");
    for id in [
        "kvm_device",
        "KVM_CAP_IRQFD",
        "KVM_CAP_IOEVENTFD",
        "KVM_CAP_COALESCED_PIO",
        "KVM_CAP_IRQ_ROUTING",
        "KVM_CAP_SIGNAL_MSI",
        "KVM_CAP_BINARY_STATS_FD",
        "tap",
        "virtiofsd",
    ] {
        item(&doc, id);
    }
    assert_eq!(item(&doc, "KVM_CAP_BINARY_STATS_FD")["required"], false);

    // The text form says the same, one line per item.
    let out = std::process::Command::new(common::ferrovm_bin())
        .arg("check")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), code);
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines.len(), items.len() + 1, "{text}");
    let want = if hw {
        "ok       hardware_virtualization: "
    } else {
        "missing  hardware_virtualization: "
    };
    assert!(lines.iter().any(|l| l.starts_with(want)), "{text}");
    for l in &lines[..items.len()] {
        assert!(
            l.starts_with("ok ") || (l.starts_with("missing ") && l.contains("; fix: ")),
            "{l}"
        );
    }
}

#[test]
fn check_names_what_is_missing_and_the_fix() {
    // A host without vmx/svm, whatever this one has.
    let (cpuinfo, modules) = common::fake_host("fpu vme hypervisor", &["kvm", "kvm_pvm"]);
    let (doc, code) = check_json(&[
        ("FERROVM_TEST_CPUINFO", cpuinfo.as_os_str()),
        ("FERROVM_TEST_SYS_MODULE", modules.as_os_str()),
    ]);
    assert_eq!(code, Some(1), "{doc}");
    let hv = item(&doc, "hardware_virtualization");
    assert_eq!(hv["ok"], false, "{doc}");
    let detail = hv["detail"].as_str().unwrap();
    assert!(detail.contains("no vmx or svm flag"), "{doc}");
    assert!(detail.contains("kvm_pvm, a software KVM"), "{doc}");
    // One with them.
    let (cpuinfo, modules) = common::fake_host("fpu vme svm", &["kvm", "kvm_amd"]);
    let (doc, _) = check_json(&[
        ("FERROVM_TEST_CPUINFO", cpuinfo.as_os_str()),
        ("FERROVM_TEST_SYS_MODULE", modules.as_os_str()),
    ]);
    assert_eq!(item(&doc, "hardware_virtualization")["ok"], true, "{doc}");
    // No KVM device: said with the fix, and the capabilities cannot be checked.
    let (doc, code) = check_json(&[("FERROVM_KVM_DEVICE", "/nonexistent/kvm".as_ref())]);
    assert_eq!(code, Some(1), "{doc}");
    let dev = item(&doc, "kvm_device");
    assert_eq!(dev["ok"], false, "{doc}");
    assert!(
        dev["detail"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/kvm: the file does not exist"),
        "{doc}"
    );
    assert!(
        item(&doc, "KVM_CAP_IRQFD")["detail"]
            .as_str()
            .unwrap()
            .contains("not checked"),
        "{doc}"
    );
    // No TUN device: optional, so it alone would not fail the check.
    let (doc, _) = check_json(&[("FERROVM_TUN_DEVICE", "/nonexistent/tun".as_ref())]);
    let tap = item(&doc, "tap");
    assert_eq!(
        (tap["ok"].clone(), tap["required"].clone()),
        (false.into(), false.into()),
        "{doc}"
    );
    assert!(
        tap["detail"].as_str().unwrap().contains("modprobe tun"),
        "{doc}"
    );
}

#[test]
fn run_without_hardware_virtualization_fails_at_start() {
    let a = artifacts();
    let out = Vm::new()
        .arg("--kernel")
        .arg(&a.vmlinux)
        .arg("--initrd")
        .arg(&a.initramfs)
        .as_if_kvm_were_emulated()
        .run();
    // The KVM device's own errors come first: on a host where it does not open, that is
    // what the user is told.
    let (doc, _) = check_json(&[]);
    if item(&doc, "kvm_device")["ok"] == false {
        assert_fails_with(&out, 1, "Failed to open /dev/kvm");
        return;
    }
    assert_fails_with(
        &out,
        1,
        "ferrovm: error: Failed to find hardware virtualization under /dev/kvm: no vmx or svm flag",
    );
    assert_eq!(out.reason(), out.stderr.trim(), "one line\n{}", out.dump());
    assert!(out.stderr.contains("scripts/kvm-sandbox"), "{}", out.dump());
    assert!(
        out.stderr.contains("--allow-emulated-kvm"),
        "{}",
        out.dump()
    );
    // Stopped before any guest ran: no console output at all.
    assert_eq!(out.stdout, "", "{}", out.dump());
}

#[test]
fn inherited_fds_are_not_reported_as_left_behind() {
    // The shell opens fds 7 (a file) and 8 (a pipe) without close-on-exec, as a CI runner or
    // a shell redirection does, and ferrovm inherits them.
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("exec 7</dev/null; exec 8<&0; exec \"$0\" run --kernel /nonexistent/vmlinux")
        .arg(common::ferrovm_bin())
        .env("RUST_LOG", "info")
        .stdin(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("Failed to open the kernel /nonexistent/vmlinux"),
        "{stderr}"
    );
    assert!(
        stderr.contains("VMM torn down: no threads or file descriptors left behind"),
        "{stderr}"
    );
    assert!(!stderr.contains("left behind:"), "{stderr}");
}

#[test]
fn missing_kernel_is_named() {
    let out = run(&["--kernel", "/nonexistent/vmlinux"]);
    assert_fails_with(&out, 1, "Failed to open the kernel /nonexistent/vmlinux");
    assert!(
        out.stderr.contains("No such file or directory"),
        "{}",
        out.dump()
    );
}

#[test]
fn missing_initrd_is_named() {
    let a = artifacts();
    let out = run(&[
        "--kernel",
        a.vmlinux.to_str().unwrap(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_fails_with(&out, 1, "Failed to open the initrd /nonexistent/initrd");
}

#[test]
fn random_bytes_are_not_a_kernel() {
    let noise: Vec<u8> = (0..65536u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect();
    let p = write_temp("noise", &noise);
    let out = run(&["--kernel", p.to_str().unwrap()]);
    assert_fails_with(&out, 1, "is not a Linux kernel");
    assert!(out.stderr.contains(p.to_str().unwrap()));
}

#[test]
fn truncated_elf_is_reported() {
    let full = std::fs::read(&artifacts().vmlinux).unwrap();
    let p = write_temp("truncated-vmlinux", &full[..full.len() / 2]);
    let out = run(&["--kernel", p.to_str().unwrap()]);
    assert_fails_with(&out, 1, "is truncated or corrupt");
}

#[test]
fn old_bzimage_is_refused() {
    let mut img = std::fs::read(&artifacts().bzimage).unwrap();
    // Boot protocol version at 0x206: pretend to be a 2.06 kernel (Linux 2.6.20).
    img[0x206..0x208].copy_from_slice(&0x0206u16.to_le_bytes());
    let p = write_temp("old-bzimage", &img);
    let out = run(&["--kernel", p.to_str().unwrap()]);
    assert_fails_with(&out, 1, "uses boot protocol 2.06");
    assert!(out.stderr.contains("needs 2.12 or later"), "{}", out.dump());
}

#[test]
fn memory_too_small_for_kernel_and_initrd() {
    let a = artifacts();
    let out = run(&[
        "--kernel",
        a.bzimage.to_str().unwrap(),
        "--initrd",
        a.initramfs.to_str().unwrap(),
        "--memory",
        "16",
    ]);
    // The kernel alone may fit in 16 MiB; kernel + decompression buffer + initrd must not.
    assert_fails_with(&out, 1, "Guest memory of 16 MiB is too small");
    assert!(
        out.stderr.contains("give a larger --memory"),
        "{}",
        out.dump()
    );
}

#[test]
fn bad_flag_values() {
    let k = artifacts().vmlinux.to_str().unwrap().to_string();
    assert_fails_with(
        &run(&["--kernel", &k, "--cpus", "0"]),
        1,
        "--cpus 0 is out of range",
    );
    assert_fails_with(
        &run(&["--kernel", &k, "--cpus", "33"]),
        1,
        "--cpus 33 is out of range",
    );
    assert_fails_with(
        &run(&["--kernel", &k, "--cpus", "many"]),
        2,
        "invalid value 'many' for '--cpus",
    );
    assert_fails_with(
        &run(&["--kernel", &k, "--memory", "8"]),
        1,
        "--memory 8 MiB is out of range",
    );
    assert_fails_with(
        &run(&["--kernel", &k, "--memory", "-5"]),
        2,
        "invalid value '-5' for '--memory",
    );
    assert_fails_with(
        &run(&["--kernel", &k, "--serial", "tcp:1"]),
        2,
        "unknown serial backend 'tcp:1'",
    );
    assert_fails_with(
        &run(&["--kernel", &k, "--bogus"]),
        2,
        "unexpected argument '--bogus'",
    );
    assert_fails_with(&run(&[]), 2, "--kernel <PATH>");
    let long = "x".repeat(3000);
    assert_fails_with(
        &run(&["--kernel", &k, "--cmdline", &long]),
        1,
        "command line is 3000 bytes",
    );
}

#[test]
fn bad_device_models_and_counts_are_named() {
    let k = artifacts().vmlinux.to_str().unwrap().to_string();
    let img = write_temp("model.img", &[0u8; 4096]);
    let img = img.to_str().unwrap();
    assert_fails_with(
        &run(&["--kernel", &k, "--disk", &format!("{img},model=ne2k")]),
        2,
        "unknown disk model 'ne2k': expected virtio, ide or ide-pio",
    );
    assert_fails_with(
        &run(&["--kernel", &k, "--net", "tap=t0,model=ide"]),
        2,
        "unknown NIC model 'ide': expected virtio, ne2k or e1000",
    );
    assert_fails_with(
        &run(&["--kernel", &k, "--serial2", "pty"]),
        2,
        "unknown serial backend 'pty'",
    );
    let ide = format!("{img},model=ide");
    let mut args = vec!["--kernel", k.as_str()];
    for _ in 0..5 {
        args.extend(["--disk", ide.as_str()]);
    }
    assert_fails_with(
        &run(&args),
        1,
        "5 IDE disks given; the two IDE channels take at most 4",
    );
}

#[test]
fn unwritable_metrics_file_is_named() {
    let a = artifacts();
    let out = run(&[
        "--kernel",
        a.vmlinux.to_str().unwrap(),
        "--metrics",
        "/nonexistent/dir/metrics.json",
    ]);
    assert_fails_with(
        &out,
        1,
        "Failed to write the metrics file /nonexistent/dir/metrics.json",
    );
}

#[test]
fn bad_system_map_is_named() {
    let a = artifacts();
    let vmlinux = a.vmlinux.to_str().unwrap();
    let out = run(&[
        "--kernel",
        vmlinux,
        "--system-map",
        "/nonexistent/System.map",
    ]);
    assert_fails_with(
        &out,
        1,
        "Failed to open the System.map /nonexistent/System.map",
    );
    let not_a_map = write_temp("not-a-map", b"this is not nm output\n");
    let out = run(&[
        "--kernel",
        vmlinux,
        "--system-map",
        not_a_map.to_str().unwrap(),
    ]);
    assert_fails_with(&out, 1, "its first line is not `ADDRESS TYPE NAME`");
    let _ = std::fs::remove_file(not_a_map);
}

#[test]
fn unwritable_serial_file_is_named() {
    let a = artifacts();
    let out = run(&[
        "--kernel",
        a.vmlinux.to_str().unwrap(),
        "--serial",
        "file=/nonexistent/dir/serial.log",
    ]);
    assert_fails_with(
        &out,
        1,
        "Failed to open the serial output file /nonexistent/dir/serial.log",
    );
}

#[test]
fn missing_kvm_device_says_what_to_do() {
    let a = artifacts();
    let out = Vm::new()
        .arg("--kernel")
        .arg(&a.vmlinux)
        .env("FERROVM_KVM_DEVICE", "/nonexistent/kvm")
        .run();
    assert_fails_with(
        &out,
        1,
        "Failed to open /nonexistent/kvm: the file does not exist",
    );
    assert!(out.stderr.contains("kvm-sandbox"), "{}", out.dump());
}

#[test]
fn non_kvm_device_is_refused() {
    let a = artifacts();
    let out = Vm::new()
        .arg("--kernel")
        .arg(&a.vmlinux)
        .env("FERROVM_KVM_DEVICE", "/dev/null")
        .run();
    assert_fails_with(&out, 1, "/dev/null is not a KVM device");
}

#[test]
fn memory_the_host_cannot_give_is_refused() {
    let k = artifacts().vmlinux.to_str().unwrap().to_string();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let host_mib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        >> 10;
    let more = (host_mib + 1024).to_string();
    assert_fails_with(
        &run(&["--kernel", &k, "--memory", &more]),
        1,
        "more than this host has",
    );
    // Within the host's RAM but beyond what this process may map (ulimit -v 512 MiB).
    let out = std::process::Command::new("sh")
        .arg("-c")
        .arg("ulimit -v 524288 && exec \"$0\" run --kernel \"$1\" --memory 2048 --serial none")
        .arg(common::ferrovm_bin())
        .arg(&k)
        .output()
        .unwrap();
    let out = Output {
        code: out.status.code(),
        signal: None,
        stdout: String::from_utf8_lossy(&out.stdout).into(),
        stderr: String::from_utf8_lossy(&out.stderr).into(),
        elapsed: std::time::Duration::ZERO,
        timed_out: false,
    };
    assert_fails_with(&out, 1, "Failed to map 2048 MiB of guest memory");
    assert!(out.stderr.contains("ulimit -v"), "{}", out.dump());
    assert_eq!(
        out.stderr.matches("Cannot allocate memory").count(),
        1,
        "the cause once\n{}",
        out.dump()
    );
}

#[test]
fn bad_migration_addresses_and_flags_are_named() {
    // `run --incoming`: an address without a scheme, a name where a number is due, VM
    // options the stream brings, a socket that cannot be made.
    assert_fails_with(
        &run(&["--incoming", "/var/tmp/mig.sock"]),
        2,
        "give unix:PATH or tcp:HOST:PORT",
    );
    assert_fails_with(
        &run(&["--incoming", "tcp:somewhere:4444"]),
        2,
        "not an IP address and port",
    );
    assert_fails_with(
        &run(&["--incoming", "unix:/var/tmp/m.sock", "--kernel", "/k"]),
        2,
        "cannot be used with",
    );
    assert_fails_with(
        &run(&["--incoming", "unix:/nonexistent-dir/m.sock"]),
        1,
        "Failed to listen for a migration on unix:/nonexistent-dir/m.sock",
    );
    // `migrate`: local mode over TCP, no VM behind the socket, a bad limit.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(common::ferrovm_bin())
            .args(args)
            .output()
            .unwrap();
        Output {
            code: out.status.code(),
            signal: None,
            stdout: String::from_utf8_lossy(&out.stdout).into(),
            stderr: String::from_utf8_lossy(&out.stderr).into(),
            elapsed: std::time::Duration::ZERO,
            timed_out: false,
        }
    };
    let migrate = |extra: &[&str]| {
        let mut a = vec!["migrate", "--api-sock", "/nonexistent/api.sock"];
        a.extend_from_slice(extra);
        cli(&a)
    };
    assert_fails_with(
        &migrate(&["--to", "tcp:127.0.0.1:4444", "--local"]),
        2,
        "Unix socket",
    );
    assert_fails_with(
        &migrate(&["--to", "unix:/var/tmp/m.sock", "--downtime-ms", "0"]),
        2,
        "downtime_ms must be at least 1",
    );
    assert_fails_with(
        &migrate(&["--to", "unix:/var/tmp/m.sock"]),
        1,
        "Failed to connect to the API socket /nonexistent/api.sock",
    );
}
