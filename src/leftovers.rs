//! What a finished VMM left behind in its own process: threads besides the main one and file
//! descriptors besides stdio. `ferrovm run` checks this after the VM is torn down, so a
//! device that forgets to join a worker or close a file shows up in the log of every run
//! (and fails the load tests) instead of only in a long-lived embedding.
//!
//! A process starts with whatever its parent left open without `O_CLOEXEC` (a shell's
//! redirections, a CI runner's pipes): those are not the VMM's to close. `main` reads the
//! process first thing, before it opens anything, and reports only what came after
//! ([`Leftovers::since`]).

use std::fs;
use std::path::Path;

/// Threads and file descriptors of this process other than the main thread and fds 0-2.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// `tid N` for each thread other than the calling (main) thread. Not their names: those
    /// take opening a file, which the main thread's seccomp filter does not allow.
    pub threads: Vec<String>,
    /// `fd -> target` of each open descriptor above 2.
    pub fds: Vec<String>,
}

impl Leftovers {
    /// Reads /proc/self now; call it from the main thread.
    pub fn of_this_process() -> Self {
        Self::read(Path::new("/proc/self"), std::process::id())
    }

    fn read(proc_self: &Path, main_tid: u32) -> Self {
        let mut threads = Vec::new();
        for tid in numbered_entries(&proc_self.join("task")) {
            if tid == main_tid as u64 {
                continue;
            }
            threads.push(format!("tid {tid}"));
        }
        let fd_dir = proc_self.join("fd");
        let mut fds = Vec::new();
        // The directory handle used to list /proc/self/fd is itself an fd while listing:
        // `numbered_entries` has closed it by the time the targets are read.
        for fd in numbered_entries(&fd_dir) {
            if fd <= 2 {
                continue;
            }
            // Gone between listing and reading: that was the listing's own handle.
            let Ok(target) = fs::read_link(fd_dir.join(fd.to_string())) else {
                continue;
            };
            fds.push(format!("{fd} -> {}", target.display()));
        }
        Self { threads, fds }
    }

    /// What is in `self` and was not in `baseline` (read earlier, e.g. at start-up): the
    /// threads and fds opened since. An fd counts as the same when its number and its target
    /// are; a number closed and reused for another file is new.
    pub fn since(mut self, baseline: &Self) -> Self {
        self.threads.retain(|t| !baseline.threads.contains(t));
        self.fds.retain(|f| !baseline.fds.contains(f));
        self
    }

    pub fn is_empty(&self) -> bool {
        self.threads.is_empty() && self.fds.is_empty()
    }
}

impl std::fmt::Display for Leftovers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} other thread(s) [{}], {} file descriptor(s) besides stdio [{}]",
            self.threads.len(),
            self.threads.join(", "),
            self.fds.len(),
            self.fds.join(", ")
        )
    }
}

/// The numeric names in `dir`, sorted; the directory is closed on return.
fn numbered_entries(dir: &Path) -> Vec<u64> {
    let mut out: Vec<u64> = fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect();
    out.sort_unstable();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_thread_and_an_open_file_are_reported() {
        // Other tests run on threads of this process too, so look for ours by id and fd.
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let path = file.as_path().display().to_string();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let (up_tx, up_rx) = std::sync::mpsc::channel::<String>();
        let worker = std::thread::spawn(move || {
            // /proc/thread-self links to PID/task/TID.
            let link = fs::read_link("/proc/thread-self").unwrap();
            let tid = link.file_name().unwrap().to_string_lossy().into_owned();
            up_tx.send(format!("tid {tid}")).unwrap();
            let _ = stop_rx.recv();
        });
        let probe = up_rx.recv().unwrap();

        let seen = Leftovers::of_this_process();
        assert!(seen.threads.contains(&probe), "{probe}: {seen}");
        assert!(seen.fds.iter().any(|f| f.ends_with(&path)), "{seen}");
        assert!(!seen.is_empty());
        // The handle that lists /proc/self/fd is closed before the targets are read. (Here,
        // not in a test of its own: two tests listing at once would see each other's.)
        assert!(
            !seen
                .fds
                .iter()
                .any(|f| f.contains("/proc/") && f.ends_with("/fd")),
            "{seen}"
        );

        stop_tx.send(()).unwrap();
        worker.join().unwrap();
        drop(file);
        let after = Leftovers::of_this_process();
        assert!(!after.threads.contains(&probe), "{after}");
        assert!(!after.fds.iter().any(|f| f.ends_with(&path)), "{after}");
    }

    #[test]
    fn what_was_open_at_start_is_not_reported() {
        let inherited = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let inherited_path = inherited.as_path().display().to_string();
        let baseline = Leftovers::of_this_process();
        assert!(
            baseline.fds.iter().any(|f| f.ends_with(&inherited_path)),
            "{baseline}"
        );
        let opened = vmm_sys_util::tempfile::TempFile::new().unwrap();
        let opened_path = opened.as_path().display().to_string();

        let left = Leftovers::of_this_process().since(&baseline);
        assert!(
            !left.fds.iter().any(|f| f.ends_with(&inherited_path)),
            "{left}"
        );
        assert!(left.fds.iter().any(|f| f.ends_with(&opened_path)), "{left}");
        drop(opened);
        drop(inherited);
    }

    #[test]
    fn an_fd_number_reused_for_another_file_is_new() {
        let at_start = Leftovers {
            threads: vec!["tid 7".into()],
            fds: vec!["10 -> /dev/null".into(), "11 -> pipe:[42]".into()],
        };
        let now = Leftovers {
            threads: vec!["tid 7".into(), "tid 9".into()],
            fds: vec![
                "10 -> /dev/null".into(),
                "11 -> /var/tmp/disk.img".into(),
                "12 -> anon_inode:kvm-vm".into(),
            ],
        };
        let left = now.since(&at_start);
        assert_eq!(left.threads, ["tid 9"]);
        assert_eq!(
            left.fds,
            ["11 -> /var/tmp/disk.img", "12 -> anon_inode:kvm-vm"]
        );
        let same = Leftovers {
            threads: Vec::new(),
            fds: vec!["10 -> /dev/null".into()],
        };
        assert!(same.since(&at_start).is_empty());
    }
}
