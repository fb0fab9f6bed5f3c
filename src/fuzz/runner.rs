//! A deterministic fuzz runner that needs neither nightly nor libFuzzer: it replays a
//! target's corpus (`fuzz/corpus/<target>/`), then feeds the target mutations of it made by
//! a seeded xorshift generator (bit flips, interesting values, inserts, deletes, splices).
//! The same seed gives the same inputs, so a CI failure reproduces anywhere; an input that
//! panics or hangs is saved under `target/fuzz-crashes/`.
//!
//! It is blind (no coverage feedback): what it finds depends on the seeds being good. The
//! cargo-fuzz targets in `fuzz/` are the coverage-guided counterpart.
//!
//! Environment: `FERROVM_FUZZ_ITERS` (mutations per target, default [`DEFAULT_ITERS`]),
//! `FERROVM_FUZZ_SEED` (default [`DEFAULT_SEED`]), `FERROVM_FUZZ_SECS` (stop a target
//! after this long, even before the iterations are done), `FERROVM_FUZZ_REPLAY` (a file:
//! run only that input).

use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread;
use std::time::{Duration, Instant};

use super::{seeds, Target};

/// Mutations per target when `FERROVM_FUZZ_ITERS` is not set (what CI runs).
pub const DEFAULT_ITERS: u64 = 10_000;
pub const DEFAULT_SEED: u64 = 0x6665_7272_6f76_6d21;
/// Longest input the mutator makes.
const MAX_LEN: usize = 64 * 1024;
/// One input running this long is a hang.
const HANG_SECS: u64 = 20;

/// xorshift64* (Vigna): small, fast and good enough to pick mutations.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        // Zero is xorshift's fixed point.
        Self(seed.max(1))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform below `n` (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Values that sit on boundaries parsers get wrong.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    0x7f,
    0x80,
    0xff,
    0x100,
    0x200,
    0x1000,
    0x7fff,
    0x8000,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    u64::MAX,
    u64::MAX - 1,
];

/// One mutation of `data` in place; `corpus` provides splice material.
fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, corpus: &[Vec<u8>]) {
    if data.is_empty() {
        data.push(rng.next_u64() as u8);
        return;
    }
    let at = rng.below(data.len());
    match rng.below(9) {
        0 => data[at] ^= 1 << rng.below(8),
        1 => data[at] = rng.next_u64() as u8,
        2 => data[at] = data[at].wrapping_add((rng.below(33) as u8).wrapping_sub(16)),
        3 | 4 => {
            // An interesting value, 1, 2, 4 or 8 bytes wide.
            let width = (1 << rng.below(4)).min(data.len() - at);
            let v = INTERESTING[rng.below(INTERESTING.len())];
            data[at..at + width].copy_from_slice(&v.to_le_bytes()[..width]);
        }
        5 => {
            let n = 1 + rng.below(16);
            let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            data.splice(at..at, bytes);
        }
        6 => {
            let n = 1 + rng.below((data.len() - at).min(64));
            data.drain(at..at + n);
        }
        7 => {
            // Repeat a piece: grows chains, op sequences, frames.
            let n = 1 + rng.below((data.len() - at).min(256));
            let piece = data[at..at + n].to_vec();
            let to = rng.below(data.len() + 1);
            data.splice(to..to, piece);
        }
        _ => {
            // Splice: a piece of another input over ours.
            let other = &corpus[rng.below(corpus.len())];
            if !other.is_empty() {
                let from = rng.below(other.len());
                let n = 1 + rng.below(other.len() - from);
                let end = (at + n).min(data.len());
                data.splice(at..end, other[from..from + n].iter().copied());
            }
        }
    }
    data.truncate(MAX_LEN);
}

/// A mutant of a corpus input: one to eight stacked mutations.
pub fn mutate(rng: &mut Rng, corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut data = corpus[rng.below(corpus.len())].clone();
    for _ in 0..1 + rng.below(8) {
        mutate_once(rng, &mut data, corpus);
    }
    data
}

/// The corpus directory of `target` in the source tree.
pub fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

/// The committed corpus of `target` (sorted by name), or the generated seeds where there
/// is none.
pub fn load_corpus(target: &str) -> Vec<Vec<u8>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir(target))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.sort();
    let corpus: Vec<Vec<u8>> = files.iter().filter_map(|f| std::fs::read(f).ok()).collect();
    if corpus.is_empty() {
        seeds::for_target(target)
            .into_iter()
            .map(|(_, d)| d)
            .collect()
    } else {
        corpus
    }
}

/// What a run did.
#[derive(Debug)]
pub struct Report {
    pub corpus: usize,
    pub iters: u64,
    pub elapsed: Duration,
}

/// Targets whose device threads panicked (named after the target, like virtio-blk's I/O
/// threads): a panic there does not unwind into the runner.
static THREAD_PANICS: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn watch_device_threads() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let default = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if let Some(name) = thread::current().name() {
                for t in super::TARGETS {
                    if name.starts_with(&format!("{}-", t.name)) {
                        THREAD_PANICS.lock().unwrap().push(t.name.to_owned());
                    }
                }
            }
            default(info);
        }));
    });
}

fn thread_panicked(target: &str) -> bool {
    THREAD_PANICS.lock().unwrap().iter().any(|t| t == target)
}

/// Saves a failing input where the developer can replay it; returns the path.
fn save_crash(target: &str, data: &[u8]) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-crashes");
    let _ = std::fs::create_dir_all(&dir);
    // FNV-1a names the file after its content.
    let hash = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let path = dir.join(format!("{target}-{hash:016x}"));
    if let Err(e) = std::fs::write(&path, data) {
        eprintln!(
            "fuzz: cannot save the failing input to {}: {e}",
            path.display()
        );
    }
    path
}

/// Aborts the process when one input runs longer than HANG_SECS, after saving it: a hang
/// does not unwind.
struct Watchdog {
    epoch: Instant,
    /// When the running input started, in ms since `epoch` plus one; 0 when none runs.
    started_ms: Arc<AtomicU64>,
    current: Arc<Mutex<Vec<u8>>>,
    done: Arc<AtomicBool>,
}

impl Watchdog {
    fn start(target: &'static str) -> Self {
        let w = Self {
            epoch: Instant::now(),
            started_ms: Arc::new(AtomicU64::new(0)),
            current: Arc::new(Mutex::new(Vec::new())),
            done: Arc::new(AtomicBool::new(false)),
        };
        let (started_ms, current, done) = (w.started_ms.clone(), w.current.clone(), w.done.clone());
        let epoch = w.epoch;
        thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(200));
                let since = started_ms.load(Ordering::Relaxed);
                let now = epoch.elapsed().as_millis() as u64 + 1;
                if since == 0 || now.saturating_sub(since) <= HANG_SECS * 1000 {
                    continue;
                }
                let path = save_crash(target, &current.lock().unwrap());
                let why = if thread_panicked(target) {
                    "a device thread panicked and the device waits for it"
                } else {
                    "it hangs"
                };
                eprintln!(
                    "fuzz: {target}: an input ran for more than {HANG_SECS} s ({why}); saved to \
                     {}\nreplay: FERROVM_FUZZ_REPLAY={} scripts/fuzz {target}",
                    path.display(),
                    path.display()
                );
                std::process::abort();
            }
        });
        w
    }

    fn begin(&self, data: &[u8]) {
        *self.current.lock().unwrap() = data.to_vec();
        let now = self.epoch.elapsed().as_millis() as u64 + 1;
        self.started_ms.store(now, Ordering::Relaxed);
    }

    fn end(&self) {
        self.started_ms.store(0, Ordering::Relaxed);
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Relaxed);
    }
}

/// Runs `target` on `data`; on a panic (here or in a device thread) saves the input and
/// returns the message.
fn run_one(target: &Target, data: &[u8], watchdog: &Watchdog) -> Result<(), String> {
    watchdog.begin(data);
    let result = panic::catch_unwind(AssertUnwindSafe(|| (target.run)(data)));
    watchdog.end();
    let failed = match result {
        Ok(()) if thread_panicked(target.name) => Some("a device thread panicked".to_owned()),
        Ok(()) => None,
        Err(p) => Some(
            p.downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into()),
        ),
    };
    match failed {
        None => Ok(()),
        Some(msg) => {
            let path = save_crash(target.name, data);
            Err(format!(
                "{}: {msg}\nthe input is saved to {}\nreplay: FERROVM_FUZZ_REPLAY={} \
                 scripts/fuzz {}",
                target.name,
                path.display(),
                path.display(),
                target.name
            ))
        }
    }
}

/// The run's parameters.
pub struct Config {
    pub iters: u64,
    pub seed: u64,
    pub time_limit: Option<Duration>,
}

impl Config {
    /// From the environment, with CI's defaults.
    pub fn from_env() -> Self {
        let num = |name: &str| {
            std::env::var(name).ok().map(|v| {
                let v = v.trim();
                let parsed = match v.strip_prefix("0x") {
                    Some(hex) => u64::from_str_radix(hex, 16),
                    None => v.parse(),
                };
                parsed.unwrap_or_else(|_| panic!("{name}={v} is not a number"))
            })
        };
        Self {
            iters: num("FERROVM_FUZZ_ITERS").unwrap_or(DEFAULT_ITERS),
            seed: num("FERROVM_FUZZ_SEED").unwrap_or(DEFAULT_SEED),
            time_limit: num("FERROVM_FUZZ_SECS").map(Duration::from_secs),
        }
    }
}

/// Replays the corpus of `target`, then runs `cfg.iters` mutants of it.
pub fn run(target: &'static Target, cfg: &Config) -> Result<Report, String> {
    watch_device_threads();
    let watchdog = Watchdog::start(target.name);
    let epoch = Instant::now();
    if let Ok(file) = std::env::var("FERROVM_FUZZ_REPLAY") {
        let data = std::fs::read(&file).map_err(|e| format!("cannot read {file}: {e}"))?;
        run_one(target, &data, &watchdog)?;
        return Ok(Report {
            corpus: 1,
            iters: 0,
            elapsed: epoch.elapsed(),
        });
    }
    let corpus = load_corpus(target.name);
    for data in &corpus {
        run_one(target, data, &watchdog)?;
    }
    // Each target gets its own stream, so one target's run does not depend on which others ran.
    let name_salt = target
        .name
        .bytes()
        .fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b));
    let mut rng = Rng::new(cfg.seed ^ name_salt);
    let mut iters = 0;
    while iters < cfg.iters && cfg.time_limit.is_none_or(|t| epoch.elapsed() < t) {
        let data = mutate(&mut rng, &corpus);
        run_one(target, &data, &watchdog)?;
        iters += 1;
    }
    Ok(Report {
        corpus: corpus.len(),
        iters,
        elapsed: epoch.elapsed(),
    })
}

/// `run` with the environment's parameters, printing what was done (for scripts/fuzz).
pub fn run_from_env(name: &str) {
    let target = super::target(name).unwrap_or_else(|| panic!("no fuzz target {name}"));
    let cfg = Config::from_env();
    match run(target, &cfg) {
        Ok(r) => eprintln!(
            "fuzz: {name}: {} corpus inputs and {} mutants (seed {:#x}) passed in {:.1} s",
            r.corpus,
            r.iters,
            cfg.seed,
            r.elapsed.as_secs_f64()
        ),
        Err(e) => panic!("fuzz: {e}\n(seed {:#x})", cfg.seed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mutations_are_deterministic_and_bounded() {
        let corpus = vec![vec![1, 2, 3, 4], vec![0xff; 100]];
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..1000 {
            let (x, y) = (mutate(&mut a, &corpus), mutate(&mut b, &corpus));
            assert_eq!(x, y);
            assert!(x.len() <= MAX_LEN);
        }
    }

    #[test]
    fn every_target_passes_its_corpus() {
        for t in super::super::TARGETS {
            let corpus = load_corpus(t.name);
            assert!(!corpus.is_empty(), "{}: empty corpus", t.name);
            for data in &corpus {
                (t.run)(data);
            }
        }
    }

    /// The bounded fuzz runs, one test per target so that they run in parallel; ignored in
    /// the unit test step, run by scripts/fuzz.
    macro_rules! fuzz_tests {
        ($($name:ident),* $(,)?) => {
            $(
                #[test]
                #[ignore = "fuzzing: run by scripts/fuzz"]
                fn $name() {
                    run_from_env(stringify!($name));
                }
            )*
        };
    }

    fuzz_tests!(
        virtio_block,
        virtio_net,
        virtio_console,
        virtio_mmio,
        virtio_pci,
        ide,
        ne2k,
        pci,
        e1000,
        bmdma,
        kernel_loader
    );
}
