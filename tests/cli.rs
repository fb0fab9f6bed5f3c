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
        "--no-seccomp",
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
    assert!(String::from_utf8_lossy(&top.stdout).contains("run"));
    let version = std::process::Command::new(common::ferrovm_bin())
        .arg("--version")
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("ferrovm {}", env!("CARGO_PKG_VERSION"))
    );
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
