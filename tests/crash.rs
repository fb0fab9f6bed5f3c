//! Crash consistency: a guest appends numbered records to a raw disk, flushing after each
//! and printing an acknowledgement, while the VMM is killed with SIGKILL at a random point.
//! Every record the guest saw acknowledged must be intact in the image afterwards, on every
//! disk model (virtio-blk, IDE by DMA, IDE by PIO): what the guest flushed was handed to the host before the flush completed,
//! so no VMM-side buffer can lose it, however the VMM ends.
//!
//! FERROVM_CRASH_RUNS (default 20) sets the kills per model; FERROVM_CRASH_SEED the seed
//! of the kill points (printed, so a failure can be replayed).

mod common;

use std::time::{Duration, Instant};

use common::{env_or, TempFile, Vm};

/// Bytes per record: one sector, so a record is one device write.
const RECORD: usize = 512;
/// Records the guest writes at most in one run (the VMM is killed long before).
const MAX_RECORDS: u64 = 4000;
const GUEST_TIMEOUT: Duration = Duration::from_secs(300);
const SIGKILL: i32 = 9;

/// Record `i`: its number, zero-padded to fill the sector, and a newline.
fn record(i: u64) -> Vec<u8> {
    format!("{i:0width$}\n", width = RECORD - 1).into_bytes()
}

struct Model {
    name: &'static str,
    /// Appended to `--disk PATH`.
    opt: &'static str,
    dev: &'static str,
}

const VIRTIO: Model = Model {
    name: "virtio-blk",
    opt: "",
    dev: "/dev/vda",
};
/// IDE as ata_piix drives it by default: bus-master DMA, each request one pwritev.
const IDE: Model = Model {
    name: "IDE (DMA)",
    opt: ",model=ide",
    dev: "/dev/sda",
};
/// The IDE drive offering PIO only: sector by sector through the data register.
const IDE_PIO: Model = Model {
    name: "IDE (PIO)",
    opt: ",model=ide-pio",
    dev: "/dev/sda",
};

/// A small deterministic generator for the kill points (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// One run: boots the writer, lets it acknowledge `acks_before_kill` records, waits
/// `delay` more (a kill anywhere in the write/flush cycle), SIGKILLs the VMM, and checks the
/// image. Returns (records acknowledged, records found intact).
fn kill_run(m: &Model, run: u64, acks_before_kill: u64, delay: Duration) -> (u64, u64) {
    let image = TempFile::sparse(
        &format!("crash-{run}.img"),
        (MAX_RECORDS + 1) * RECORD as u64,
    );

    // One dd per record: write sector i, fsync the device (a FLUSH to the disk), and only
    // then print the acknowledgement. The loop ends only on a failed write (the kernel
    // echoes this line, so the failure marker is told apart by the digits after it).
    let cmd = format!(
        "i=1; while printf '%0{w}d\\n' $i | dd of={dev} bs={RECORD} seek=$i count=1 \
         conv=fsync,notrunc 2>/dev/null; do echo ack-$i; i=$((i+1)); done; echo wfail=$i",
        w = RECORD - 1,
        dev = m.dev
    );
    let vm = Vm::guest_running(&cmd)
        .arg("--disk")
        .arg(format!("{}{}", image.0.display(), m.opt))
        .spawn_until(&format!("ack-{acks_before_kill}"), GUEST_TIMEOUT);
    std::thread::sleep(delay);
    vm.signal(SIGKILL);
    let out = vm.finish(GUEST_TIMEOUT);
    assert_eq!(
        out.signal,
        Some(SIGKILL),
        "{}: the VMM was not the one killed\n{}",
        m.name,
        out.dump()
    );
    assert!(
        !out.stdout.lines().any(|l| l
            .trim()
            .strip_prefix("wfail=")
            .is_some_and(|n| n.starts_with(|c: char| c.is_ascii_digit()))),
        "{}: a guest write failed\n{}",
        m.name,
        out.dump()
    );
    // The last acknowledgement the host saw; the guest may have printed later ones that the
    // kill cut off, which only makes the check weaker, never wrong.
    let acked = out
        .stdout
        .lines()
        .filter_map(|l| l.trim().strip_prefix("ack-")?.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    assert!(acked >= acks_before_kill, "{}", out.dump());

    let data = std::fs::read(&image.0).unwrap();
    let mut intact = 0;
    for i in 1..=MAX_RECORDS {
        let at = i as usize * RECORD;
        let sector = &data[at..at + RECORD];
        let good = sector == record(i).as_slice();
        if i <= acked {
            assert!(
                good,
                "{}: record {i} of {acked} acknowledged is not intact after SIGKILL: {:?}",
                m.name,
                String::from_utf8_lossy(&sector[..32.min(sector.len())])
            );
        } else {
            // Past the last acknowledgement a record may or may not have made it, but a
            // sector never holds anything but the record or the zeroes it started with.
            assert!(
                good || sector.iter().all(|&b| b == 0),
                "{}: sector {i} (not acknowledged) holds neither its record nor zeroes",
                m.name
            );
        }
        intact += u64::from(good);
    }
    (acked, intact)
}

fn acknowledged_records_survive_sigkill(m: &Model) {
    let runs = env_or("FERROVM_CRASH_RUNS", 20);
    let seed = env_or("FERROVM_CRASH_SEED", 0x5eed_f00d) | 1;
    eprintln!("{}: {runs} kills, FERROVM_CRASH_SEED={seed}", m.name);
    let mut rng = Rng(seed);
    let start = Instant::now();
    for run in 0..runs {
        let acks = 1 + rng.below(30);
        let delay = Duration::from_millis(rng.below(400));
        let (acked, intact) = kill_run(m, run, acks, delay);
        eprintln!(
            "{} run {run}: killed {delay:?} after ack {acks}: {acked} acknowledged, {intact} \
             records in the image",
            m.name
        );
    }
    eprintln!(
        "{}: {runs} SIGKILLs, every acknowledged record intact ({:?})",
        m.name,
        start.elapsed()
    );
}

#[test]
fn virtio_blk_acknowledged_records_survive_sigkill() {
    sandboxed!();
    acknowledged_records_survive_sigkill(&VIRTIO);
}

#[test]
fn ide_acknowledged_records_survive_sigkill() {
    sandboxed!();
    acknowledged_records_survive_sigkill(&IDE);
}

#[test]
fn ide_pio_acknowledged_records_survive_sigkill() {
    sandboxed!();
    acknowledged_records_survive_sigkill(&IDE_PIO);
}
