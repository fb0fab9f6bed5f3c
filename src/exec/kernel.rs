//! What `ferrovm exec` must know about a kernel before booting it: its release (for its
//! modules and configuration), whether it has what exec needs built in or as modules, and
//! those modules with their dependencies in load order.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What exec needs from the kernel: the option, the module that provides it when it is
/// `=m`, and why.
pub const REQUIRED: &[(&str, &str, &str)] = &[
    (
        "CONFIG_VIRTIO_PCI",
        "virtio_pci",
        "the virtio-pci transport",
    ),
    (
        "CONFIG_VIRTIO_CONSOLE",
        "virtio_console",
        "the stdio and status ports",
    ),
    ("CONFIG_FUSE_FS", "fuse", "FUSE, under virtio-fs"),
    (
        "CONFIG_VIRTIO_FS",
        "virtiofs",
        "virtio-fs, the guest's root",
    ),
];
/// Built in or nothing: the guest init needs them before any module loads.
pub const REQUIRED_BUILTIN: &[(&str, &str)] = &[
    ("CONFIG_BLK_DEV_INITRD", "the initramfs"),
    ("CONFIG_DEVTMPFS", "/dev"),
    ("CONFIG_TMPFS", "the writable /tmp, /run and home"),
];

/// Errors inspecting a kernel.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("Failed to read the kernel {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("The kernel {kernel} lacks {missing}: ferrovm exec needs them (built in, or as modules) on top of `make defconfig kvm_guest.config`; see README, \"ferrovm exec\"")]
    MissingOptions { kernel: PathBuf, missing: String },
    #[error("The kernel {kernel} has {option}=m but its module {module} is not in {dir}: give the kernel's modules with --modules DIR")]
    MissingModule {
        kernel: PathBuf,
        option: String,
        module: String,
        dir: String,
    },
}

/// The kernel release (`uname -r` inside the guest): from a bzImage's setup header (the
/// `kernel_version` pointer at 0x20e, relative to 0x200; Linux boot protocol 2.00+), else
/// from the "Linux version " banner an ELF vmlinux carries.
pub fn release(kernel: &Path) -> Result<Option<String>, KernelError> {
    let data = std::fs::read(kernel).map_err(|e| KernelError::Read(kernel.into(), e))?;
    Ok(release_of(&data))
}

fn release_of(data: &[u8]) -> Option<String> {
    let word = |s: &[u8]| {
        let end = s
            .iter()
            .position(|&b| b == 0 || b == b' ')
            .unwrap_or(s.len());
        std::str::from_utf8(&s[..end])
            .ok()
            .filter(|r| !r.is_empty())
            .map(String::from)
    };
    if data.len() > 0x210 && &data[0x202..0x206] == b"HdrS" {
        let ptr = u16::from_le_bytes([data[0x20e], data[0x20f]]) as usize + 0x200;
        return data.get(ptr..).and_then(word);
    }
    const BANNER: &[u8] = b"Linux version ";
    data.windows(BANNER.len())
        .position(|w| w == BANNER)
        .and_then(|i| word(&data[i + BANNER.len()..]))
}

/// Where the kernel's configuration is: `config` or `config-RELEASE` beside it (what
/// scripts/build-guest and scripts/stock-kernel leave, and `make` in a source tree's
/// `.config`, two levels up from arch/x86/boot/bzImage), or /boot/config-RELEASE.
pub fn find_config(kernel: &Path, release: Option<&str>) -> Option<PathBuf> {
    let dir = kernel.parent().unwrap_or(Path::new("."));
    let mut candidates = vec![dir.join("config")];
    if let Some(r) = release {
        candidates.push(dir.join(format!("config-{r}")));
        candidates.push(PathBuf::from(format!("/boot/config-{r}")));
    }
    // arch/x86/boot/bzImage -> the tree's .config.
    if let Some(tree) = dir.parent().and_then(Path::parent).and_then(Path::parent) {
        candidates.push(tree.join(".config"));
    }
    candidates.into_iter().find(|p| p.is_file())
}

/// `CONFIG_X=y|m` lines of a kernel configuration.
pub fn parse_config(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.starts_with("CONFIG_"))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A directory of modules: `modules.dep` and the files it names.
pub struct ModuleTree {
    root: PathBuf,
    /// module name -> (path relative to root, its dependencies' paths).
    deps: HashMap<String, (String, Vec<String>)>,
}

impl ModuleTree {
    /// Reads `dir/modules.dep`; None when there is none.
    pub fn open(dir: &Path) -> Option<Self> {
        let text = std::fs::read_to_string(dir.join("modules.dep")).ok()?;
        let mut deps = HashMap::new();
        for line in text.lines() {
            let Some((path, rest)) = line.split_once(':') else {
                continue;
            };
            let name = module_name(path);
            let d = rest.split_whitespace().map(String::from).collect();
            deps.insert(name, (path.to_string(), d));
        }
        Some(Self {
            root: dir.into(),
            deps,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `name` and what it needs, dependencies first (modules.dep lists a module's whole
    /// closure, the module loaded last first, as `modprobe` reads it); None if absent.
    pub fn load_order(&self, name: &str) -> Option<Vec<String>> {
        let (path, deps) = self.deps.get(&name.replace('-', "_"))?;
        let mut order: Vec<String> = deps.iter().rev().cloned().collect();
        order.push(path.clone());
        Some(order)
    }
}

/// `kernel/fs/fuse/virtiofs.ko.xz` -> `virtiofs`.
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    stem.replace('-', "_")
}

/// The modules exec must carry, in load order (paths relative to the tree), after checking
/// `config` (when known) for every required option. Without a configuration, a required
/// module found in the tree is carried, and the guest init reports what is still missing.
pub fn required_modules(
    kernel: &Path,
    config: Option<&HashMap<String, String>>,
    tree: Option<&ModuleTree>,
) -> Result<Vec<String>, KernelError> {
    let mut missing = Vec::new();
    let mut order: Vec<String> = Vec::new();
    if let Some(cfg) = config {
        for (opt, why) in REQUIRED_BUILTIN {
            if cfg.get(*opt).map(String::as_str) != Some("y") {
                missing.push(format!("{opt}=y ({why})"));
            }
        }
    }
    // Options the kernel lacks altogether first: no module directory can help there.
    for (opt, _, why) in REQUIRED {
        if let Some(None | Some("n")) = config.map(|c| c.get(*opt).map(String::as_str)) {
            missing.push(format!("{opt} ({why})"));
        }
    }
    if !missing.is_empty() {
        return Err(KernelError::MissingOptions {
            kernel: kernel.into(),
            missing: missing.join(", "),
        });
    }
    for (opt, module, _) in REQUIRED {
        let value = config.map(|c| c.get(*opt).map(String::as_str));
        if value == Some(Some("y")) {
            continue;
        }
        match tree.and_then(|t| t.load_order(module)) {
            Some(o) => order.extend(o),
            // Unknown configuration: built in, or the guest init says what is missing.
            None if value.is_none() => {}
            None => {
                return Err(KernelError::MissingModule {
                    kernel: kernel.into(),
                    option: opt.to_string(),
                    module: format!("{module}.ko"),
                    dir: tree.map_or("(no module directory found)".into(), |t| {
                        t.root().display().to_string()
                    }),
                })
            }
        }
    }
    let mut seen = std::collections::HashSet::new();
    order.retain(|p| seen.insert(p.clone()));
    Ok(order)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn release_from_a_bzimage_header_and_from_a_banner() {
        let mut bz = vec![0u8; 0x1000];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x20e..0x210].copy_from_slice(&0x0700u16.to_le_bytes());
        bz[0x900..0x900 + 27].copy_from_slice(b"6.1.0-57-cloud-amd64 (debia");
        assert_eq!(release_of(&bz).as_deref(), Some("6.1.0-57-cloud-amd64"));
        let elf = b"\x7fELF junk Linux version 6.1.192-ferrovm (ferrovm@ferrovm) #1\0".to_vec();
        assert_eq!(release_of(&elf).as_deref(), Some("6.1.192-ferrovm"));
        assert_eq!(release_of(b"nothing here"), None);
    }

    fn tree() -> (vmm_sys_util::tempdir::TempDir, ModuleTree) {
        let dir = vmm_sys_util::tempdir::TempDir::new().unwrap();
        std::fs::write(
            dir.as_path().join("modules.dep"),
            // As depmod writes it (Debian's 6.1 cloud kernel): loading the list backwards works.
            "kernel/fs/fuse/virtiofs.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko kernel/fs/fuse/fuse.ko\n\
             kernel/fs/fuse/fuse.ko:\n\
             kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio_ring.ko:\n\
             kernel/drivers/char/virtio_console.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n",
        )
        .unwrap();
        let t = ModuleTree::open(dir.as_path()).unwrap();
        (dir, t)
    }

    #[test]
    fn dependencies_load_first_and_once() {
        let (_d, t) = tree();
        assert_eq!(
            t.load_order("virtiofs").unwrap(),
            [
                "kernel/fs/fuse/fuse.ko",
                "kernel/drivers/virtio/virtio_ring.ko",
                "kernel/drivers/virtio/virtio.ko",
                "kernel/fs/fuse/virtiofs.ko"
            ]
        );
        let cfg = parse_config(
            "CONFIG_BLK_DEV_INITRD=y\nCONFIG_DEVTMPFS=y\nCONFIG_TMPFS=y\nCONFIG_VIRTIO_PCI=m\n\
             CONFIG_VIRTIO_CONSOLE=m\nCONFIG_FUSE_FS=m\nCONFIG_VIRTIO_FS=m\n",
        );
        let all = required_modules(Path::new("k"), Some(&cfg), Some(&t)).unwrap();
        let names: Vec<String> = all.iter().map(|p| module_name(p)).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_pci",
                "virtio_console",
                "fuse",
                "virtiofs"
            ]
        );
    }

    #[test]
    fn a_kernel_without_virtio_fs_is_named_by_option() {
        let cfg = parse_config(
            "CONFIG_BLK_DEV_INITRD=y\nCONFIG_DEVTMPFS=y\nCONFIG_TMPFS=y\nCONFIG_VIRTIO_PCI=y\n\
             CONFIG_VIRTIO_CONSOLE=y\n# CONFIG_FUSE_FS is not set\n",
        );
        let err = required_modules(Path::new("/k"), Some(&cfg), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("CONFIG_FUSE_FS") && err.contains("CONFIG_VIRTIO_FS"),
            "{err}"
        );
        assert!(!err.contains("CONFIG_VIRTIO_CONSOLE"), "{err}");
    }

    #[test]
    fn a_module_option_without_its_module_says_where_it_looked() {
        let (_d, t) = tree();
        let mut cfg = parse_config(
            "CONFIG_BLK_DEV_INITRD=y\nCONFIG_DEVTMPFS=y\nCONFIG_TMPFS=y\nCONFIG_VIRTIO_PCI=y\n\
             CONFIG_VIRTIO_CONSOLE=y\nCONFIG_FUSE_FS=y\nCONFIG_VIRTIO_FS=m\n",
        );
        assert!(required_modules(Path::new("/k"), Some(&cfg), Some(&t)).is_ok());
        cfg.insert("CONFIG_VIRTIO_FS".into(), "m".into());
        let err = required_modules(Path::new("/k"), Some(&cfg), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("virtiofs.ko") && err.contains("--modules"),
            "{err}"
        );
    }
}
