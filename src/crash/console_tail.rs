//! The last lines a guest wrote to a console, kept for the crash report: a guest that dies
//! usually said why just before (a panic message, an oops), and the report shows it next to
//! the registers even when the console went to a file or nowhere. The line that started the
//! latest oops or panic is kept too, since its call trace and register dump push it out of
//! the tail.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::sync::{Arc, Mutex};

/// Lines kept per console.
pub const TAIL_LINES: usize = 10;
/// How the kernel starts the report of a crash (panic(), die(), BUG(), the fault handlers).
const ALERTS: &[&str] = &[
    "Kernel panic - not syncing",
    "BUG: ",
    "kernel BUG at",
    "Oops",
    "general protection fault",
    "double fault",
];
/// Longer lines are cut (an oops line is ~100 bytes; a guest may write no newline at all).
const MAX_LINE: usize = 240;

#[derive(Debug, Default)]
struct Tail {
    lines: VecDeque<String>,
    partial: Vec<u8>,
    /// The latest line that starts a crash report of the kernel's.
    alert: Option<String>,
}

/// The last [`TAIL_LINES`] lines of one console.
#[derive(Debug, Default)]
pub struct ConsoleTail {
    tail: Mutex<Tail>,
}

impl ConsoleTail {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Takes guest output.
    pub fn push(&self, bytes: &[u8]) {
        let mut t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        for &b in bytes {
            match b {
                b'\n' => {
                    let line = printable(&std::mem::take(&mut t.partial));
                    if ALERTS.iter().any(|a| line.contains(a)) {
                        t.alert = Some(line.clone());
                    }
                    if t.lines.len() == TAIL_LINES {
                        t.lines.pop_front();
                    }
                    t.lines.push_back(line);
                }
                b'\r' => {}
                _ if t.partial.len() < MAX_LINE => t.partial.push(b),
                _ => {}
            }
        }
    }

    /// The lines so far, oldest first, with an unfinished last line.
    pub fn lines(&self) -> Vec<String> {
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<String> = t.lines.iter().cloned().collect();
        if !t.partial.is_empty() {
            if out.len() == TAIL_LINES {
                out.remove(0);
            }
            out.push(printable(&t.partial));
        }
        out
    }

    /// The latest line that began a kernel panic or oops, if it is no longer among `lines`.
    pub fn alert(&self) -> Option<String> {
        let t = self.tail.lock().unwrap_or_else(|p| p.into_inner());
        t.alert.clone().filter(|a| !t.lines.contains(a))
    }

    /// A writer that passes output on to `inner` and keeps its tail here.
    pub fn writer(self: &Arc<Self>, inner: Box<dyn Write + Send>) -> Box<dyn Write + Send> {
        Box::new(TailWriter {
            inner,
            tail: self.clone(),
        })
    }
}

/// Guest bytes as text that cannot drive the user's terminal: control characters (escape
/// sequences among them) become `.`.
fn printable(line: &[u8]) -> String {
    String::from_utf8_lossy(line)
        .chars()
        .map(|c| if c.is_control() && c != '\t' { '.' } else { c })
        .collect()
}

struct TailWriter {
    inner: Box<dyn Write + Send>,
    tail: Arc<ConsoleTail>,
}

impl Write for TailWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.inner.write(buf) {
            Ok(n) => {
                self.tail.push(&buf[..n]);
                Ok(n)
            }
            Err(e) => {
                // Lost for the backend, not for the report.
                self.tail.push(buf);
                Err(e)
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_and_passes_everything_on() {
        let tail = ConsoleTail::new();
        let mut w = tail.writer(Box::new(io::sink()));
        for i in 0..15 {
            write!(w, "line {i}\r\n").unwrap();
        }
        w.write_all(b"Kernel panic - not \x1b[31msyncing").unwrap();
        let lines = tail.lines();
        assert_eq!(lines.len(), TAIL_LINES);
        assert_eq!(lines[0], "line 6");
        assert_eq!(lines[8], "line 14");
        assert_eq!(lines[9], "Kernel panic - not .[31msyncing");
        assert_eq!(tail.alert(), None);
    }

    #[test]
    fn the_line_that_began_a_panic_is_kept_past_the_tail() {
        let tail = ConsoleTail::new();
        tail.push(b"[    5.75] Kernel panic - not syncing: sysrq triggered crash\n");
        assert_eq!(tail.alert(), None, "still in the tail");
        for i in 0..TAIL_LINES {
            tail.push(format!(" trace line {i}\n").as_bytes());
        }
        assert_eq!(
            tail.alert().as_deref(),
            Some("[    5.75] Kernel panic - not syncing: sysrq triggered crash")
        );
    }

    #[test]
    fn endless_lines_are_cut() {
        let tail = ConsoleTail::new();
        tail.push(&[b'x'; 1000]);
        tail.push(b"\n");
        assert_eq!(tail.lines()[0].len(), MAX_LINE);
    }
}
