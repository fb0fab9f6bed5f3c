//! Load: many boot/poweroff cycles one after the other, and several guests at once, every
//! one reaching userspace with a disk and a NIC on each model, and nothing left behind: the
//! VMM reports no thread or file descriptor of its own left after tear-down, the TAP it
//! created (tap=auto) is gone, and this test process holds no more fds than before.
//!
//! FERROVM_LOAD_CYCLES (default 50) and FERROVM_LOAD_GUESTS (default 8) set the counts.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{env_or, nested_sandbox, Output, TempFile, Vm};

const GUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// What `ferrovm run` logs (at info) when tear-down left nothing behind.
const NOTHING_LEFT: &str = "VMM torn down: no threads or file descriptors left behind";

/// Guest `n`: the virtio models when `n` is even, the emulated ones when odd (IDE by DMA
/// with the NE2000, IDE by PIO with the e1000, in turn), so every kind of device comes up
/// and goes away under load. The guest checks its disk and NIC are there and prints `up-n`.
fn guest(n: usize, image: &TempFile) -> Vm {
    let (disk_model, net_model, disk) = match n % 4 {
        1 => ("ide", "ne2k", "sda"),
        3 => ("ide-pio", "e1000", "sda"),
        _ => ("virtio", "virtio", "vda"),
    };
    let cmd = format!("test -b /dev/{disk} && test -e /sys/class/net/eth0 && echo up-{n}");
    let mut vm = Vm::guest_running(&cmd);
    vm.arg("--memory")
        .arg("128")
        .arg("--disk")
        .arg(format!("{},model={disk_model}", image.0.display()))
        .arg("--net")
        .arg(format!("tap=auto,model={net_model}"))
        .env("RUST_LOG", "info")
        .timeout(GUEST_TIMEOUT);
    vm
}

/// Checks one finished guest: clean exit, userspace reached, nothing left behind, its
/// TAP gone. Returns the time it took.
fn check(n: usize, out: &Output) -> Duration {
    assert_eq!(out.code, Some(0), "guest {n}\n{}", out.dump());
    assert_eq!(out.guest_exit(), Some(0), "guest {n}\n{}", out.dump());
    assert!(
        out.stdout.lines().any(|l| l.trim() == format!("up-{n}")),
        "guest {n} did not see its disk and NIC\n{}",
        out.dump()
    );
    assert!(
        out.stderr.contains(NOTHING_LEFT),
        "guest {n}: the VMM left something behind\n{}",
        out.dump()
    );
    let tap = out
        .auto_tap(0)
        .unwrap_or_else(|| panic!("guest {n}: no TAP name printed\n{}", out.dump()));
    assert!(
        !Path::new("/sys/class/net").join(tap).exists(),
        "guest {n}: TAP {tap} outlived the VMM"
    );
    out.elapsed
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

fn summary(times: &mut [Duration]) -> String {
    times.sort();
    format!(
        "min {:.2?}, median {:.2?}, max {:.2?}",
        times[0],
        times[times.len() / 2],
        times[times.len() - 1]
    )
}

#[test]
fn boot_poweroff_cycles_leave_nothing_behind() {
    sandboxed!();
    let cycles = env_or("FERROVM_LOAD_CYCLES", 50);
    let image = TempFile::sparse("load-cycles.img", 8 << 20);
    let fds_before = open_fds();
    let start = Instant::now();
    let mut times = Vec::with_capacity(cycles);
    for n in 0..cycles {
        let out = guest(n, &image).run();
        times.push(check(n, &out));
    }
    assert_eq!(open_fds(), fds_before, "the test process gained fds");
    eprintln!(
        "{cycles} boot/poweroff cycles in {:.1?}; per cycle {}",
        start.elapsed(),
        summary(&mut times)
    );
}

/// Starts one guest per image, all before any is waited for, and collects them.
fn all_at_once(images: &[TempFile]) -> (Vec<Output>, Duration) {
    let start = Instant::now();
    let running: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(n, image)| guest(n, image).spawn())
        .collect();
    let outs = running
        .into_iter()
        .map(|r| r.finish(GUEST_TIMEOUT))
        .collect();
    (outs, start.elapsed())
}

#[test]
fn guests_at_once_all_reach_userspace() {
    sandboxed!();
    let guests = env_or("FERROVM_LOAD_GUESTS", 8);
    let images: Vec<TempFile> = (0..guests)
        .map(|n| TempFile::sparse(&format!("load-{n}.img"), 8 << 20))
        .collect();
    let fds_before = open_fds();
    let (mut outs, mut wall) = all_at_once(&images);
    // Same policy as `Vm::run`: in the nested sandbox, TCG's nested SVM sometimes kills a
    // guest in early boot, before any device is used. The claim is about N guests at once,
    // so the whole batch runs again, not the one guest alone.
    if nested_sandbox() {
        if let Some((n, why)) = outs
            .iter()
            .enumerate()
            .find_map(|(n, o)| o.died_before_userspace().map(|why| (n, why)))
        {
            eprintln!(
                "warning: guest {n} died before userspace ({why}): running all {guests} \
                 once more (nested sandbox)\n{}",
                outs[n].dump()
            );
            (outs, wall) = all_at_once(&images);
        }
    }
    let mut times: Vec<Duration> = outs.iter().enumerate().map(|(n, o)| check(n, o)).collect();
    assert_eq!(open_fds(), fds_before, "the test process gained fds");
    eprintln!(
        "{guests} guests at once: all done in {wall:.1?}; per guest {}",
        summary(&mut times)
    );
}
