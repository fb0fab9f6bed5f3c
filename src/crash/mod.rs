//! Where a guest died: the crash report ferrovm prints after the one-line reason when the
//! guest crashed (a triple fault, a KVM internal error or entry failure, a kernel panic
//! told from a reboot, an unexpected exit), and puts in the `--metrics` report.
//!
//! It shows the registers of the vCPU the guest stopped on (RIP as `symbol+0xoff/0xsize`
//! when the kernel's symbols are known, see [`symbols`]), KVM's own data on the exit, the
//! other vCPUs' last sampled RIP, and the last lines the guest wrote to its console
//! ([`console_tail`]).
//!
//! One thing it cannot show is the state of a vCPU that triple faulted on AMD: KVM
//! re-initialises it (SVM's `shutdown_interception` clears the VMCB and resets the vCPU), so
//! its registers after KVM_EXIT_SHUTDOWN are the reset state. The report says so and gives
//! the last periodic sample instead (the event loop kicks every vCPU every 100 ms and each
//! keeps its registers then), with how long before the fault it was taken. On Intel the
//! registers survive the triple fault.
//!
//! A guest stopped from outside before it ended (a termination signal, `--timeout`) gets
//! the same report titled `stop report:` (`CrashReport::for_stop`): each vCPU's latest
//! sample, which says where a hung guest was spinning or waiting.
//!
//! Building and formatting the report are pure functions of a saved register set, so the
//! report is tested without KVM.

pub mod console_tail;
pub mod symbols;

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::arch::x86_64::cpu_state::CpuState;
use crate::devices::metrics::json_str;
use crate::vstate::vcpu::{GuestExit, KvmExitData, VcpuRecord};
pub use console_tail::ConsoleTail;
pub use symbols::{SymbolSource, SymbolTable};

/// How often vCPUs are sampled (the event loop's periodic kick), for the report's wording.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(100);

/// What the report shows of one vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuView {
    pub id: u8,
    /// Its registers when the guest stopped on it.
    pub at_stop: Option<CpuState>,
    /// Its latest periodic sample, and how long before the stop (or the report) it was taken.
    pub sample: Option<(Duration, CpuState)>,
    /// Why the registers at the stop could not be read.
    pub error: Option<String>,
}

/// Everything a crash report says, taken when the VM ended.
#[derive(Debug, Clone)]
pub struct CrashReport {
    /// The one-line reason.
    pub reason: String,
    /// What ended the VM, in KVM's terms.
    pub exit: String,
    /// The vCPU the guest stopped on, when known.
    pub vcpu: Option<u8>,
    pub kvm_data: Option<KvmExitData>,
    pub vcpus: Vec<VcpuView>,
    /// The last lines of each console (ttyS0, hvc0) that had output, and the line that
    /// began the kernel's latest panic or oops when it is older than those.
    pub consoles: Vec<(String, Vec<String>, Option<String>)>,
    /// Where the symbols were read from, or why there are none.
    pub symbols: Result<String, String>,
    /// How long the VM had run.
    pub uptime: Duration,
    /// The first line: `crash report:`, or `stop report:` for a guest stopped from outside
    /// (a signal, the time limit) before it ended, which says where it was (a hung guest).
    pub title: &'static str,
}

/// KVM's name for what ended the VM.
fn exit_name(exit: &GuestExit) -> &'static str {
    match exit {
        GuestExit::TripleFault { .. } => "KVM_EXIT_SHUTDOWN (triple fault)",
        GuestExit::InternalError { .. } => "KVM_EXIT_INTERNAL_ERROR",
        GuestExit::FailEntry { .. } => "KVM_EXIT_FAIL_ENTRY",
        GuestExit::EmergencyReset => {
            "CPU reset with interrupt routing still live (an emergency restart, not a reboot)"
        }
        GuestExit::Unexpected { .. } => "an exit the VMM does not handle",
        GuestExit::Reset | GuestExit::Halted | GuestExit::PowerOff => "an orderly end",
    }
}

/// `internal.suberror` names (linux/kvm.h, KVM_INTERNAL_ERROR_*).
fn suberror_name(suberror: u32) -> &'static str {
    match suberror {
        1 => "KVM_INTERNAL_ERROR_EMULATION: KVM could not emulate an instruction",
        2 => "KVM_INTERNAL_ERROR_SIMUL_EX: an exception while delivering another",
        3 => "KVM_INTERNAL_ERROR_DELIVERY_EV: an event KVM could not deliver",
        4 => "KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON",
        _ => "unknown suberror",
    }
}

impl CrashReport {
    /// The report for `exit`, from what the vCPUs recorded, as of `now`.
    pub fn new(
        exit: &GuestExit,
        records: &[VcpuRecord],
        consoles: &[(String, Arc<ConsoleTail>)],
        symbols: Result<String, String>,
        uptime: Duration,
        now: Instant,
    ) -> Self {
        let vcpu = match exit {
            GuestExit::TripleFault { vcpu }
            | GuestExit::InternalError { vcpu, .. }
            | GuestExit::FailEntry { vcpu, .. }
            | GuestExit::Unexpected { vcpu, .. } => Some(*vcpu),
            // A reset the guest asked a device for: the vCPU that asked recorded its state.
            _ => records
                .iter()
                .position(|r| r.stopped.is_some())
                .map(|i| i as u8),
        };
        let kvm_data = vcpu
            .and_then(|v| records.get(usize::from(v)))
            .and_then(|r| r.exit_data.clone());
        // Samples are aged against the moment the guest stopped.
        let stopped_at = vcpu
            .and_then(|v| records.get(usize::from(v)))
            .and_then(|r| r.stopped)
            .map_or(now, |s| s.at);
        let vcpus = records
            .iter()
            .enumerate()
            .map(|(i, r)| VcpuView {
                id: i as u8,
                at_stop: r.stopped.map(|s| s.state),
                sample: r
                    .sampled
                    .map(|s| (stopped_at.saturating_duration_since(s.at), s.state)),
                error: r.error.clone(),
            })
            .collect();
        let consoles = consoles
            .iter()
            .map(|(name, tail)| (name.clone(), tail.lines(), tail.alert()))
            .filter(|(_, lines, _)| !lines.is_empty())
            .collect();
        Self {
            reason: exit.to_string(),
            exit: exit_name(exit).to_owned(),
            vcpu,
            kvm_data,
            vcpus,
            consoles,
            symbols,
            uptime,
            title: "crash report",
        }
    }

    /// The report for a guest stopped from outside before it ended (`reason`: a signal,
    /// the time limit): where each vCPU was at its latest sample, and the consoles' end.
    /// What a hung guest was doing when it was given up on.
    pub fn for_stop(
        reason: String,
        records: &[VcpuRecord],
        consoles: &[(String, Arc<ConsoleTail>)],
        symbols: Result<String, String>,
        uptime: Duration,
        now: Instant,
    ) -> Self {
        let vcpus = records
            .iter()
            .enumerate()
            .map(|(i, r)| VcpuView {
                id: i as u8,
                at_stop: None,
                sample: r
                    .sampled
                    .map(|s| (now.saturating_duration_since(s.at), s.state)),
                error: None,
            })
            .collect();
        let consoles = consoles
            .iter()
            .map(|(name, tail)| (name.clone(), tail.lines(), tail.alert()))
            .filter(|(_, lines, _)| !lines.is_empty())
            .collect();
        Self {
            exit: format!("{reason} (from outside the guest)"),
            reason,
            vcpu: None,
            kvm_data: None,
            vcpus,
            consoles,
            symbols,
            uptime,
            title: "stop report",
        }
    }

    /// The vCPU the report is about: the one the guest stopped on, else the first.
    fn focus(&self) -> Option<&VcpuView> {
        match self.vcpu {
            Some(id) => self.vcpus.iter().find(|v| v.id == id),
            None => self.vcpus.first(),
        }
    }

    /// KVM's data on the exit, in words.
    fn kvm_data_line(&self) -> Option<String> {
        Some(match self.kvm_data.as_ref()? {
            KvmExitData::Internal {
                suberror,
                ndata,
                data,
            } => {
                let data: Vec<String> = data.iter().map(|d| format!("{d:#x}")).collect();
                format!(
                    "suberror {suberror} ({}), ndata {ndata}, data [{}]",
                    suberror_name(*suberror),
                    data.join(", ")
                )
            }
            KvmExitData::FailEntry { reason, cpu } => {
                format!("hardware_entry_failure_reason {reason:#x}, cpu {cpu}")
            }
        })
    }

    /// The report as stderr shows it: a `crash report:` line, then indented lines (none
    /// starts with `ferrovm:`, which is the reason's line).
    pub fn render(&self, symbols: Option<&SymbolTable>) -> String {
        let sym = |state: &CpuState| symbols.and_then(|t| t.describe(state.rip));
        let mut out = format!("{}:\n", self.title);
        let mut line = |indent: usize, text: &str| {
            let _ = writeln!(out, "{:indent$}{text}", "");
        };
        let on = self
            .vcpu
            .map(|v| format!(" on vCPU {v}"))
            .unwrap_or_default();
        line(
            2,
            &format!(
                "exit: {}{on}, {:.2} s after start",
                self.exit,
                self.uptime.as_secs_f64()
            ),
        );
        if let Some(data) = self.kvm_data_line() {
            line(2, &format!("KVM: {data}"));
        }
        let registers = |line: &mut dyn FnMut(usize, &str), state: &CpuState| {
            for l in state.describe(sym(state).as_deref()) {
                line(4, &l);
            }
        };
        if let Some(v) = self.focus() {
            let id = v.id;
            let lost = match (&v.at_stop, &v.error) {
                (Some(s), _) if s.is_reset_state() => {
                    line(
                        2,
                        &format!(
                            "vCPU {id} state lost: its registers after the exit are the reset \
                             state (RIP {:#x}, CS base {:#x}), not where the guest died (on AMD \
                             SVM, KVM re-initialises a vCPU that triple faulted)",
                            s.rip, s.cs.base
                        ),
                    );
                    true
                }
                (Some(s), _) => {
                    line(2, &format!("vCPU {id} when the guest stopped:"));
                    registers(&mut line, s);
                    false
                }
                (None, Some(e)) => {
                    line(2, &format!("vCPU {id}: {e}"));
                    true
                }
                (None, None) => true,
            };
            match &v.sample {
                Some((age, s)) if lost => {
                    line(
                        2,
                        &format!(
                            "vCPU {id} last sampled {} ms before (the latest state there is):",
                            age.as_millis()
                        ),
                    );
                    registers(&mut line, s);
                }
                None if lost => line(
                    2,
                    &format!(
                        "vCPU {id} has no earlier sample: the VM ran {:.2} s, vCPUs are \
                         sampled every {} ms",
                        self.uptime.as_secs_f64(),
                        SAMPLE_INTERVAL.as_millis()
                    ),
                ),
                _ => {}
            }
        }
        let focus = self.focus().map(|v| v.id);
        for v in self.vcpus.iter().filter(|v| Some(v.id) != focus) {
            match &v.sample {
                Some((age, s)) => {
                    let at = sym(s).map(|s| format!(" {s}")).unwrap_or_default();
                    line(
                        2,
                        &format!(
                            "vCPU {} sampled {} ms before: RIP {:#x}{at}",
                            v.id,
                            age.as_millis(),
                            s.rip
                        ),
                    );
                }
                None => line(2, &format!("vCPU {}: no sample", v.id)),
            }
        }
        match (&self.symbols, symbols) {
            (Ok(from), Some(t)) => line(2, &format!("symbols: {from}, {} symbols", t.len())),
            (Ok(from), None) => line(2, &format!("symbols: {from}")),
            (Err(why), _) => line(2, &format!("symbols: none ({why})")),
        }
        for (name, lines, alert) in &self.consoles {
            if let Some(alert) = alert {
                line(2, &format!("earlier on {name}:"));
                line(4, &format!("| {alert}"));
            }
            line(2, &format!("last lines on {name}:"));
            for l in lines {
                line(4, &format!("| {l}"));
            }
        }
        out
    }

    /// The report as the `crash` object of the `--metrics` JSON.
    pub fn to_json(&self, symbols: Option<&SymbolTable>) -> String {
        let regs = |s: &CpuState| {
            let sym = symbols.and_then(|t| t.describe(s.rip));
            s.to_json(sym.as_deref(), json_str)
        };
        let opt = |v: Option<String>| v.unwrap_or_else(|| "null".into());
        let kvm = self.kvm_data.as_ref().map(|d| match d {
            KvmExitData::Internal {
                suberror,
                ndata,
                data,
            } => {
                let data: Vec<String> = data.iter().map(|d| format!("\"{d:#x}\"")).collect();
                format!(
                    "{{\"suberror\":{suberror},\"ndata\":{ndata},\"data\":[{}]}}",
                    data.join(",")
                )
            }
            KvmExitData::FailEntry { reason, cpu } => {
                format!("{{\"hardware_entry_failure_reason\":\"{reason:#x}\",\"cpu\":{cpu}}}")
            }
        });
        let vcpus: Vec<String> = self
            .vcpus
            .iter()
            .map(|v| {
                let sample = v.sample.as_ref().map(|(age, s)| {
                    format!(
                        "{{\"before_stop_ms\":{},\"registers\":{}}}",
                        age.as_millis(),
                        regs(s)
                    )
                });
                format!(
                    "{{\"id\":{},\"at_stop\":{},\"sample\":{},\"error\":{}}}",
                    v.id,
                    opt(v.at_stop.as_ref().map(regs)),
                    opt(sample),
                    opt(v.error.as_deref().map(json_str))
                )
            })
            .collect();
        let consoles: Vec<String> = self
            .consoles
            .iter()
            .map(|(name, lines, alert)| {
                let lines: Vec<String> = alert.iter().chain(lines).map(|l| json_str(l)).collect();
                format!("{}:[{}]", json_str(name), lines.join(","))
            })
            .collect();
        // A stop report has no registers at the stop to lose.
        let state_lost = self.title == "crash report"
            && self
                .focus()
                .is_some_and(|v| v.at_stop.as_ref().is_none_or(CpuState::is_reset_state));
        format!(
            "{{\"reason\":{},\"exit\":{},\"vcpu\":{},\"kvm\":{},\"state_lost\":{state_lost},\
             \"uptime_ns\":{},\"vcpus\":[{}],\"console\":{{{}}},\"symbols\":{}}}",
            json_str(&self.reason),
            json_str(&self.exit),
            opt(self.vcpu.map(|v| v.to_string())),
            opt(kvm),
            self.uptime.as_nanos(),
            vcpus.join(","),
            consoles.join(","),
            opt(self.symbols.as_ref().ok().map(|s| json_str(s)))
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::cpu_state::after_reset;
    use crate::vstate::vcpu::Snapshot;
    use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};

    /// Registers saved from the project's kernel restarting after a panic (sysrq crash,
    /// `reboot=k`): in native_machine_emergency_restart, pulsing the i8042 reset line.
    fn saved_panic_state() -> CpuState {
        let regs = kvm_regs {
            rip: 0xffff_ffff_8102_68a4,
            rsp: 0xffff_c900_0001_3d68,
            rflags: 0x46,
            ..Default::default()
        };
        let code = kvm_segment {
            selector: 0x10,
            limit: 0xffff_ffff,
            type_: 0xb,
            present: 1,
            s: 1,
            l: 1,
            g: 1,
            ..Default::default()
        };
        let data = kvm_segment {
            selector: 0x18,
            type_: 0x3,
            db: 1,
            ..code
        };
        let sregs = kvm_sregs {
            cs: code,
            ss: data,
            cr0: 0x8005_0033,
            cr2: 0x55c1_e000,
            cr3: 0x01c0_a000,
            cr4: 0x0035_06f0,
            efer: 0xd01,
            ..Default::default()
        };
        CpuState::from_kvm(&regs, &sregs)
    }

    fn table() -> SymbolTable {
        SymbolTable::from_system_map(symbols::tests::MAP.as_bytes())
    }

    fn console(lines: &[&str]) -> Vec<(String, Arc<ConsoleTail>)> {
        let tail = ConsoleTail::new();
        for l in lines {
            tail.push(l.as_bytes());
            tail.push(b"\n");
        }
        vec![("ttyS0".to_owned(), tail)]
    }

    #[test]
    fn a_panic_report_shows_the_symbolized_rip_and_the_console() {
        let now = Instant::now();
        let stopped = Snapshot {
            at: now,
            state: saved_panic_state(),
        };
        let records = [VcpuRecord {
            stopped: Some(stopped),
            sampled: Some(Snapshot {
                at: now - Duration::from_millis(40),
                state: after_reset(),
            }),
            ..Default::default()
        }];
        let consoles = console(&[
            "Kernel panic - not syncing: sysrq triggered crash",
            "---[ end Kernel panic - not syncing: sysrq triggered crash ]---",
        ]);
        let report = CrashReport::new(
            &GuestExit::EmergencyReset,
            &records,
            &consoles,
            Ok("vmlinux (ELF .symtab)".into()),
            Duration::from_millis(4200),
            now,
        );
        assert_eq!(report.vcpu, Some(0), "the vCPU that pulsed the reset line");
        let text = report.render(Some(&table()));
        assert!(text.starts_with("crash report:\n"), "{text}");
        assert!(
            text.lines().skip(1).all(|l| l.starts_with("  ")),
            "every line after the first is indented:\n{text}"
        );
        assert!(
            text.contains(
                "    RIP 0xffffffff810268a4 native_machine_emergency_restart+0x14/0x1b0 (long mode)"
            ),
            "{text}"
        );
        assert!(
            text.contains("    RSP 0xffffc90000013d68 RFLAGS 0x46"),
            "{text}"
        );
        assert!(
            text.contains(
                "    CR0 0x80050033 CR2 0x55c1e000 CR3 0x1c0a000 CR4 0x3506f0 EFER 0xd01"
            ),
            "{text}"
        );
        assert!(
            text.contains("    CS 0x0010 base 0x0 limit 0xffffffff attr 0xa09b"),
            "{text}"
        );
        assert!(text.contains("    SS 0x0018"), "{text}");
        assert!(text.contains("4.20 s after start"), "{text}");
        assert!(
            text.contains("    | ---[ end Kernel panic - not syncing: sysrq triggered crash ]---"),
            "{text}"
        );
        assert!(!text.contains("state lost"), "{text}");
        assert!(
            !text.contains("sampled"),
            "the sample is not needed:\n{text}"
        );
        assert!(
            text.contains("symbols: vmlinux (ELF .symtab), 7 symbols"),
            "{text}"
        );

        let json = report.to_json(Some(&table()));
        let v: serde_json::Value = serde_json::from_str(&json).expect(&json);
        assert_eq!(v["vcpu"], 0);
        assert_eq!(v["state_lost"], false);
        assert_eq!(
            v["vcpus"][0]["at_stop"]["rip_symbol"],
            "native_machine_emergency_restart+0x14/0x1b0"
        );
        assert_eq!(v["vcpus"][0]["at_stop"]["cs"]["attributes"], "0xa09b");
        assert_eq!(v["vcpus"][0]["sample"]["before_stop_ms"], 40);
        assert_eq!(
            v["console"]["ttyS0"][0],
            "Kernel panic - not syncing: sysrq triggered crash"
        );
    }

    #[test]
    fn a_triple_fault_on_amd_says_the_state_is_lost_and_shows_the_last_sample() {
        let now = Instant::now();
        let records = [
            VcpuRecord {
                stopped: Some(Snapshot {
                    at: now,
                    state: after_reset(),
                }),
                sampled: Some(Snapshot {
                    at: now - Duration::from_millis(63),
                    state: saved_panic_state(),
                }),
                ..Default::default()
            },
            VcpuRecord::default(),
        ];
        let report = CrashReport::new(
            &GuestExit::TripleFault { vcpu: 0 },
            &records,
            &[],
            Err("no symbols".into()),
            Duration::from_secs(12),
            now,
        );
        let text = report.render(Some(&table()));
        assert!(
            text.contains("exit: KVM_EXIT_SHUTDOWN (triple fault) on vCPU 0"),
            "{text}"
        );
        assert!(text.contains("vCPU 0 state lost"), "{text}");
        assert!(text.contains("RIP 0xfff0, CS base 0xffff0000"), "{text}");
        assert!(
            text.contains("vCPU 0 last sampled 63 ms before (the latest state there is):"),
            "{text}"
        );
        assert!(
            text.contains("native_machine_emergency_restart+0x14"),
            "{text}"
        );
        assert!(text.contains("vCPU 1: no sample"), "{text}");
        assert!(text.contains("symbols: none (no symbols)"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&report.to_json(None)).unwrap();
        assert_eq!(v["state_lost"], true);
        assert_eq!(v["vcpus"][0]["at_stop"]["reset_state"], true);
        assert_eq!(v["symbols"], serde_json::Value::Null);
    }

    #[test]
    fn an_internal_error_shows_kvm_data_and_no_sample_wording() {
        let now = Instant::now();
        let mut state = saved_panic_state();
        state.rip = 0x2000_0000;
        let records = [VcpuRecord {
            stopped: Some(Snapshot { at: now, state }),
            exit_data: Some(KvmExitData::Internal {
                suberror: 1,
                ndata: 3,
                data: vec![0, 0x2000_0000, 0x7],
            }),
            ..Default::default()
        }];
        let report = CrashReport::new(
            &GuestExit::InternalError {
                vcpu: 0,
                suberror: 1,
            },
            &records,
            &[],
            Err("none".into()),
            Duration::from_millis(20),
            now,
        );
        let text = report.render(None);
        assert!(
            text.contains("KVM: suberror 1 (KVM_INTERNAL_ERROR_EMULATION: KVM could not emulate an instruction), ndata 3, data [0x0, 0x20000000, 0x7]"),
            "{text}"
        );
        assert!(
            text.contains("RIP 0x0000000020000000 (long mode)"),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_str(&report.to_json(None)).unwrap();
        assert_eq!(v["kvm"]["suberror"], 1);
        assert_eq!(v["kvm"]["data"][1], "0x20000000");
    }

    #[test]
    fn a_stop_report_says_where_a_hung_guest_was() {
        let now = Instant::now();
        let records = [
            VcpuRecord {
                sampled: Some(Snapshot {
                    at: now - Duration::from_millis(30),
                    state: saved_panic_state(),
                }),
                ..Default::default()
            },
            VcpuRecord::default(),
        ];
        let report = CrashReport::for_stop(
            "stopped by signal SIGTERM".into(),
            &records,
            &console(&["@@FVB-BEGIN tcp-tx@@"]),
            Ok("vmlinux (ELF .symtab)".into()),
            Duration::from_secs(180),
            now,
        );
        let text = report.render(Some(&table()));
        assert!(text.starts_with("stop report:\n"), "{text}");
        assert!(
            text.contains("exit: stopped by signal SIGTERM (from outside the guest), 180.00 s"),
            "{text}"
        );
        assert!(
            text.contains("vCPU 0 last sampled 30 ms before (the latest state there is):"),
            "{text}"
        );
        assert!(
            text.contains("native_machine_emergency_restart+0x14"),
            "{text}"
        );
        assert!(text.contains("vCPU 1: no sample"), "{text}");
        assert!(text.contains("| @@FVB-BEGIN tcp-tx@@"), "{text}");
        assert!(!text.contains("state lost"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&report.to_json(Some(&table()))).unwrap();
        assert_eq!(v["state_lost"], false);
        assert_eq!(v["vcpu"], serde_json::Value::Null);
        assert_eq!(v["vcpus"][0]["sample"]["before_stop_ms"], 30);
        assert_eq!(
            v["vcpus"][0]["sample"]["registers"]["rip_symbol"],
            "native_machine_emergency_restart+0x14/0x1b0"
        );
    }
}
