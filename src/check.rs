//! What this host offers and what ferrovm needs: `ferrovm check` (one line per item, ok or
//! missing, a missing item with its fix; `--json` for scripts) and the start-up check of
//! `ferrovm run` that /dev/kvm has hardware virtualization under it.
//!
//! A KVM without Intel VMX or AMD SVM under it (a software KVM such as `kvm_pvm`, which
//! some cloud VMs offer) opens, creates VMs and runs vCPUs like any other, so nothing fails
//! until the guest executes an instruction it cannot emulate: a Linux guest ran for 3.5
//! minutes before `KVM internal error (suberror 1)`. The CPU flags say it at once.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use kvm_bindings::{KVM_CAP_BINARY_STATS_FD, KVM_CAP_COALESCED_PIO, KVM_CAP_SIGNAL_MSI};
use kvm_ioctls::Kvm;
use log::{info, warn};

use crate::devices::metrics::json_str;
use crate::devices::tap::{tun_device_path, Tap};
use crate::vstate::vm::{kvm_device_path, open_kvm, REQUIRED_CAPS};

/// The CPU flags, unless `FERROVM_TEST_CPUINFO` names another file (tests use it to play a
/// host without vmx/svm on any machine).
const CPUINFO: &str = "/proc/cpuinfo";
/// Loaded kernel modules, unless `FERROVM_TEST_SYS_MODULE` names another directory.
const SYS_MODULE: &str = "/sys/module";
/// KVM's vendor modules and whether each is hardware virtualization; the first one loaded
/// is taken to back /dev/kvm (a hardware one wins when both kinds are there).
const KVM_MODULES: &[(&str, bool)] = &[("kvm_intel", true), ("kvm_amd", true), ("kvm_pvm", false)];
/// The option of `ferrovm run` that goes on without hardware virtualization.
pub const ALLOW_EMULATED_FLAG: &str = "--allow-emulated-kvm";
/// Where virtiofsd is looked for besides PATH (Debian's virtiofsd package, and QEMU's
/// older C virtiofsd).
const VIRTIOFSD_PATHS: &[&str] = &["/usr/libexec/virtiofsd", "/usr/lib/qemu/virtiofsd"];

/// Capabilities ferrovm uses beyond `REQUIRED_CAPS` (an entry that `REQUIRED_CAPS` gains is
/// listed once, as required): KVM_CAP number, name, what for, whether `run` needs it.
const MORE_CAPS: &[(u32, &str, &str, bool)] = &[
    (
        KVM_CAP_COALESCED_PIO,
        "KVM_CAP_COALESCED_PIO",
        "coalesced port I/O for the IDE and NE2000 data ports (model=ide, model=ne2k)",
        true,
    ),
    (
        KVM_CAP_SIGNAL_MSI,
        "KVM_CAP_SIGNAL_MSI",
        "MSI injection without a route (not used: MSI-X goes through GSI routes and irqfds)",
        false,
    ),
    (
        KVM_CAP_BINARY_STATS_FD,
        "KVM_CAP_BINARY_STATS_FD",
        "KVM's per-VM statistics (not used yet)",
        false,
    ),
];

/// Errors of the start-up check.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("Failed to find hardware virtualization under {device}: {found}; run ferrovm inside scripts/kvm-sandbox (a KVM on emulated AMD SVM), or pass {ALLOW_EMULATED_FLAG} to run anyway (the guest then dies when KVM cannot emulate an instruction, often minutes into its boot)")]
    NoHardwareVirtualization { device: PathBuf, found: String },
}

/// What the host's CPU flags and loaded modules say about the virtualization under KVM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostVirt {
    /// `vmx` or `svm`, when the CPU flags have one.
    pub flag: Option<String>,
    /// The KVM vendor module loaded, if one of `KVM_MODULES` is.
    pub module: Option<&'static str>,
    /// The flags file read, for messages.
    cpuinfo: PathBuf,
    /// Why the flags could not be read, if they could not.
    unreadable: Option<String>,
}

impl HostVirt {
    /// Reads /proc/cpuinfo and /sys/module (or the files the test variables name).
    pub fn of_this_host() -> Self {
        let env_or = |var: &str, default: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(default))
        };
        Self::read(
            &env_or("FERROVM_TEST_CPUINFO", CPUINFO),
            &env_or("FERROVM_TEST_SYS_MODULE", SYS_MODULE),
        )
    }

    fn read(cpuinfo: &Path, sys_module: &Path) -> Self {
        let (flag, unreadable) = match std::fs::read_to_string(cpuinfo) {
            Ok(text) => (virtualization_flag(&text), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let module = KVM_MODULES
            .iter()
            .map(|(name, _)| *name)
            .find(|name| sys_module.join(name).exists());
        Self {
            flag,
            module,
            cpuinfo: cpuinfo.to_path_buf(),
            unreadable,
        }
    }

    /// Whether KVM here runs guests on VMX or SVM: the flag is there and the module backing
    /// KVM (when one is seen) is a hardware one.
    pub fn is_hardware(&self) -> bool {
        let hw_module = |m: &str| KVM_MODULES.iter().any(|(name, hw)| *name == m && *hw);
        self.flag.is_some() && self.module.is_none_or(hw_module)
    }

    /// What was found, in words.
    pub fn describe(&self) -> String {
        let cpuinfo = self.cpuinfo.display();
        let module = match self.module {
            Some(m) if self.is_hardware() => format!("KVM module {m}"),
            Some(m) => format!("KVM module {m}, a software KVM"),
            None => "no KVM vendor module loaded".to_string(),
        };
        match (&self.flag, &self.unreadable) {
            (_, Some(e)) => format!("cannot read {cpuinfo} ({e}); {module}"),
            (Some(flag), None) if self.is_hardware() => format!("{flag} in {cpuinfo}, {module}"),
            (Some(flag), None) => {
                format!("{flag} in {cpuinfo}, but kvm_intel and kvm_amd are not loaded ({module})")
            }
            (None, None) => format!("no vmx or svm flag in {cpuinfo}; {module}"),
        }
    }
}

/// `vmx` or `svm` if a `flags` line of /proc/cpuinfo has it.
fn virtualization_flag(cpuinfo: &str) -> Option<String> {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .flat_map(str::split_whitespace)
        .find(|f| *f == "vmx" || *f == "svm")
        .map(str::to_string)
}

/// The start-up check of `ferrovm run`: an error naming what was found and what to do when
/// /dev/kvm has no hardware virtualization under it, unless `allow_emulated` (a warning then).
pub fn require_hardware_virtualization(allow_emulated: bool) -> Result<(), CheckError> {
    decide(&HostVirt::of_this_host(), allow_emulated)
}

fn decide(virt: &HostVirt, allow_emulated: bool) -> Result<(), CheckError> {
    let found = virt.describe();
    if virt.is_hardware() {
        info!("Hardware virtualization: {found}");
        Ok(())
    } else if allow_emulated {
        warn!(
            "No hardware virtualization under {} ({found}); going on ({ALLOW_EMULATED_FLAG})",
            kvm_device_path().display()
        );
        Ok(())
    } else {
        Err(CheckError::NoHardwareVirtualization {
            device: kvm_device_path(),
            found,
        })
    }
}

/// One line of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    /// A stable key for scripts (`kvm_device`, `KVM_CAP_IRQFD`, `tap`...).
    pub id: String,
    pub ok: bool,
    /// Whether `ferrovm run` cannot do without it (else it is for some options or later).
    pub required: bool,
    /// What was found, or why it is missing.
    pub detail: String,
    /// What to do about a missing item.
    pub fix: Option<String>,
}

impl Item {
    fn ok(id: &str, required: bool, detail: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            ok: true,
            required,
            detail: detail.into(),
            fix: None,
        }
    }

    fn missing(
        id: &str,
        required: bool,
        detail: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self {
            id: id.into(),
            ok: false,
            required,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Everything `ferrovm check` looked at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub items: Vec<Item>,
}

impl Report {
    /// Looks at this host: the KVM device, its API version, hardware virtualization, the
    /// capabilities, TAP creation, virtiofsd.
    pub fn of_this_host() -> Self {
        let device = kvm_device_path();
        let mut items = Vec::new();
        let kvm = match open_kvm(&device) {
            Ok(kvm) => {
                items.push(Item::ok(
                    "kvm_device",
                    true,
                    format!("{} opens read-write", device.display()),
                ));
                items.push(Item::ok(
                    "kvm_api_version",
                    true,
                    format!("KVM API version {}", kvm.get_api_version()),
                ));
                Some(kvm)
            }
            Err(e) => {
                // The error's message already says what to do (load the module, join the
                // kvm group, ...).
                items.push(Item::missing(
                    "kvm_device",
                    true,
                    e.to_string(),
                    "see the message",
                ));
                None
            }
        };
        items.push(hardware_item(&HostVirt::of_this_host()));
        items.extend(cap_items(kvm.as_ref()));
        items.push(tap_item());
        items.push(virtiofsd_item());
        Self { items }
    }

    /// How many required items are missing (the exit status is non-zero when any is).
    pub fn missing_required(&self) -> usize {
        self.items.iter().filter(|i| i.required && !i.ok).count()
    }

    /// One line per item, `ok` or `missing`, then a summary line.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for i in &self.items {
            let status = if i.ok { "ok" } else { "missing" };
            let optional = if i.required { "" } else { " (optional)" };
            let _ = write!(out, "{status:<8} {}{optional}: {}", i.id, i.detail);
            if let Some(fix) = &i.fix {
                let _ = write!(out, "; fix: {fix}");
            }
            out.push('\n');
        }
        let missing = self.missing_required();
        if missing == 0 {
            out.push_str("ferrovm check: everything ferrovm run needs is here\n");
        } else {
            let _ = writeln!(
                out,
                "ferrovm check: {missing} required item(s) missing: {}",
                self.items
                    .iter()
                    .filter(|i| i.required && !i.ok)
                    .map(|i| i.id.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        out
    }

    /// `{"ok": BOOL, "items": [{"id", "ok", "required", "detail", "fix"}...]}`; `ok` is
    /// false when a required item is missing.
    pub fn json(&self) -> String {
        let mut out = format!("{{\"ok\": {}, \"items\": [", self.missing_required() == 0);
        for (n, i) in self.items.iter().enumerate() {
            if n > 0 {
                out.push_str(", ");
            }
            let fix = i.fix.as_deref().map_or("null".to_string(), json_str);
            let _ = write!(
                out,
                "{{\"id\": {}, \"ok\": {}, \"required\": {}, \"detail\": {}, \"fix\": {fix}}}",
                json_str(&i.id),
                i.ok,
                i.required,
                json_str(&i.detail)
            );
        }
        out.push_str("]}\n");
        out
    }
}

fn hardware_item(virt: &HostVirt) -> Item {
    let found = virt.describe();
    if virt.is_hardware() {
        Item::ok("hardware_virtualization", true, found)
    } else {
        Item::missing(
            "hardware_virtualization",
            true,
            found,
            format!(
                "run guests inside scripts/kvm-sandbox (nested KVM on QEMU's emulated SVM), or \
                 on a host with VMX/SVM; `ferrovm run {ALLOW_EMULATED_FLAG}` goes on anyway"
            ),
        )
    }
}

/// One item per capability: `REQUIRED_CAPS`, then the others ferrovm uses.
fn cap_items(kvm: Option<&Kvm>) -> Vec<Item> {
    let required = REQUIRED_CAPS.iter().map(|(cap, name)| {
        let has = kvm.map(|k| k.check_extension(*cap));
        (*name, purpose(name), true, has)
    });
    let more = MORE_CAPS
        .iter()
        .filter(|(_, name, _, _)| !REQUIRED_CAPS.iter().any(|(_, n)| n == name))
        .map(|(num, name, what, req)| {
            let has = kvm.map(|k| k.check_extension_raw(libc::c_ulong::from(*num)) > 0);
            (*name, *what, *req, has)
        });
    required
        .chain(more)
        .map(|(name, what, req, has)| match has {
            Some(true) => Item::ok(name, req, what),
            Some(false) => Item::missing(
                name,
                req,
                format!("{what}: this KVM lacks it"),
                "a newer host kernel",
            ),
            None => Item::missing(
                name,
                req,
                format!("{what}: not checked, the KVM device did not open"),
                "see kvm_device",
            ),
        })
        .collect()
}

/// What a required capability is for, where it is not obvious from its name.
fn purpose(cap: &str) -> &'static str {
    match cap {
        "KVM_CAP_IRQFD" => "irqfd: devices raise interrupts from the event loop and I/O threads",
        "KVM_CAP_IOEVENTFD" => "ioeventfd: virtio queue notifications without an exit to the VMM",
        "KVM_CAP_IRQCHIP" => "the in-kernel IOAPIC, PIC and LAPICs",
        "KVM_CAP_IMMEDIATE_EXIT" => "stopping vCPUs without a race",
        "KVM_CAP_IRQ_ROUTING" => "GSI routing: MSI-X of the virtio-pci devices",
        _ => "ferrovm run needs it",
    }
}

fn tap_item() -> Item {
    match Tap::probe_create() {
        Ok(name) => Item::ok(
            "tap",
            false,
            format!(
                "--net tap=auto works: created and removed TAP {name} through {}",
                tun_device_path().display()
            ),
        ),
        Err(e) => Item::missing(
            "tap",
            false,
            format!("--net tap=auto will fail: {e}"),
            "see the message; --net tap=NAME takes a TAP made beforehand with `ip tuntap add NAME \
             mode tap user $USER`",
        ),
    }
}

fn virtiofsd_item() -> Item {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("virtiofsd"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    let candidates = on_path
        .into_iter()
        .chain(VIRTIOFSD_PATHS.iter().map(PathBuf::from));
    match candidates.into_iter().find(|p| is_executable(p)) {
        Some(p) => Item::ok(
            "virtiofsd",
            false,
            format!("{} (for virtio-fs, not used yet)", p.display()),
        ),
        None => Item::missing(
            "virtiofsd",
            false,
            format!(
                "not on PATH nor at {} (for virtio-fs, not used yet)",
                VIRTIOFSD_PATHS.join(", ")
            ),
            "apt-get install virtiofsd",
        ),
    }
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cpuinfo file and a /sys/module directory with the given flags and modules.
    fn fake_host(flags: &str, modules: &[&str]) -> (vmm_sys_util::tempdir::TempDir, HostVirt) {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        let cpuinfo = dir.as_path().join("cpuinfo");
        std::fs::write(
            &cpuinfo,
            format!("processor\t: 0\nflags\t\t: fpu {flags} sse2\n\nprocessor\t: 1\nflags\t\t: fpu {flags}\n"),
        )
        .unwrap();
        let sys = dir.as_path().join("module");
        for m in modules {
            std::fs::create_dir_all(sys.join(m)).unwrap();
        }
        let virt = HostVirt::read(&cpuinfo, &sys);
        (dir, virt)
    }

    #[test]
    fn vmx_or_svm_with_their_module_is_hardware() {
        let (_d, v) = fake_host("vme svm lm", &["kvm", "kvm_amd"]);
        assert_eq!(v.flag.as_deref(), Some("svm"));
        assert_eq!(v.module, Some("kvm_amd"));
        assert!(v.is_hardware());
        assert!(v.describe().starts_with("svm in "), "{}", v.describe());
        let (_d, v) = fake_host("vmx", &["kvm_intel"]);
        assert!(v.is_hardware());
        // Modules not visible (sysfs not mounted): the flag decides.
        let (_d, v) = fake_host("vmx", &[]);
        assert!(v.is_hardware());
        assert!(decide(&v, false).is_ok());
    }

    #[test]
    fn no_flag_or_a_software_kvm_is_not() {
        let (_d, v) = fake_host("vme hypervisor lm", &["kvm", "kvm_pvm"]);
        assert_eq!(v.flag, None);
        assert!(!v.is_hardware());
        let said = v.describe();
        assert!(said.starts_with("no vmx or svm flag in "), "{said}");
        assert!(said.contains("kvm_pvm, a software KVM"), "{said}");
        // The flag is there but KVM is the software one.
        let (_d, v) = fake_host("vmx", &["kvm_pvm"]);
        assert!(!v.is_hardware());
        assert!(v
            .describe()
            .contains("kvm_intel and kvm_amd are not loaded"));
        // "svm" inside another flag name does not count.
        let (_d, v) = fake_host("svm_lock nrip_save", &[]);
        assert!(!v.is_hardware());
    }

    #[test]
    fn unreadable_cpuinfo_is_not_hardware_and_says_why() {
        let v = HostVirt::read(Path::new("/nonexistent/cpuinfo"), Path::new("/nonexistent"));
        assert!(!v.is_hardware());
        assert!(v.describe().contains("cannot read /nonexistent/cpuinfo"));
    }

    #[test]
    fn the_start_up_check_fails_with_what_to_do_unless_allowed() {
        let (_d, v) = fake_host("hypervisor", &["kvm_pvm"]);
        let msg = decide(&v, false).unwrap_err().to_string();
        assert!(
            msg.starts_with("Failed to find hardware virtualization under "),
            "{msg}"
        );
        assert!(msg.contains("no vmx or svm flag"), "{msg}");
        assert!(msg.contains("scripts/kvm-sandbox"), "{msg}");
        assert!(msg.contains("--allow-emulated-kvm"), "{msg}");
        assert!(!msg.contains('\n'));
        assert!(decide(&v, true).is_ok());
    }

    #[test]
    fn report_lines_and_json() {
        let report = Report {
            items: vec![
                Item::ok("kvm_device", true, "/dev/kvm opens read-write"),
                Item::missing(
                    "hardware_virtualization",
                    true,
                    "no vmx or svm flag",
                    "use \"scripts/kvm-sandbox\"",
                ),
                Item::missing("virtiofsd", false, "not found", "apt-get install virtiofsd"),
            ],
        };
        assert_eq!(report.missing_required(), 1);
        let text = report.text();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines[0], "ok       kvm_device: /dev/kvm opens read-write");
        assert!(lines[1].starts_with("missing  hardware_virtualization: no vmx"));
        assert!(lines[1].ends_with("fix: use \"scripts/kvm-sandbox\""));
        assert!(lines[2].starts_with("missing  virtiofsd (optional): "));
        assert_eq!(
            lines[3],
            "ferrovm check: 1 required item(s) missing: hardware_virtualization"
        );
        let json = report.json();
        assert!(json.starts_with("{\"ok\": false, \"items\": [{\"id\": \"kvm_device\", \"ok\": true, \"required\": true,"), "{json}");
        assert!(json.contains("\"fix\": null"), "{json}");
        assert!(
            json.contains("\"fix\": \"use \\\"scripts/kvm-sandbox\\\"\""),
            "{json}"
        );
    }

    #[test]
    fn every_capability_is_listed_once() {
        let items = cap_items(None);
        let mut ids: Vec<_> = items.iter().map(|i| i.id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), items.len(), "{items:?}");
        for (_, name) in REQUIRED_CAPS {
            assert!(items.iter().any(|i| i.id == *name && i.required), "{name}");
        }
        for name in [
            "KVM_CAP_IRQFD",
            "KVM_CAP_IOEVENTFD",
            "KVM_CAP_COALESCED_PIO",
        ] {
            let item = items.iter().find(|i| i.id == name).unwrap();
            assert!(item.required && !item.ok, "{item:?}");
            assert!(item.detail.contains("not checked"), "{item:?}");
        }
        let stats = items
            .iter()
            .find(|i| i.id == "KVM_CAP_BINARY_STATS_FD")
            .unwrap();
        assert!(!stats.required);
    }
}
