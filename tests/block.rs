//! Disks, on every model (virtio-blk, on virtio-pci and on virtio-mmio, and the emulated IDE
//! disk by bus-master DMA and by PIO; the same tests run on each):
//! a guest filesystem's flushed data is in the image after the VM ends, host data reads back
//! in the guest, read-only disks stay unchanged, the cache mode and identity, several disks,
//! booting from a disk as the root device, and a disk written through one model reads back
//! through the other. Every test boots the project's guest.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{artifacts, temp_path, Vm, READY};

/// A disk image file removed when the test ends.
struct Image(PathBuf);

impl Image {
    /// A sparse image of `mib` MiB.
    fn new(tag: &str, mib: u64) -> Self {
        let path = temp_path(tag);
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(mib << 20).unwrap();
        Image(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn disk_arg(&self, opts: &str) -> String {
        format!("{}{opts}", self.0.display())
    }

    fn write_at(&self, offset: u64, data: &[u8]) {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.0)
            .unwrap();
        f.write_all_at(data, offset).unwrap();
    }

    fn sha256(&self) -> String {
        sha256_of_file(&self.0)
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn sha256_of_file(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

fn sha256_of_bytes(data: &[u8]) -> String {
    let p = temp_path("hash-input");
    std::fs::write(&p, data).unwrap();
    let h = sha256_of_file(&p);
    let _ = std::fs::remove_file(p);
    h
}

/// Deterministic pseudo-random bytes (xorshift), the same on every run.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// The value after `key=` on a guest output line.
fn guest_value(out: &common::Output, key: &str) -> String {
    out.stdout
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(&format!("{key}="))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| panic!("guest printed no {key}=\n{}", out.dump()))
}

fn assert_clean(out: &common::Output) {
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert_eq!(out.guest_exit(), Some(0), "{}", out.dump());
}

/// A disk model as a test sees it: the flag that selects it and the guest's names.
struct Model {
    /// Appended to `--disk PATH`.
    opt: &'static str,
    /// Block device name prefix in the guest (vda, vdb / sda, sdb).
    prefix: &'static str,
    /// For IDE, the transfer mode libata set the drive to (sysfs `xfer_mode` of ata1.00).
    xfer_mode: &'static str,
}

const VIRTIO: Model = Model {
    opt: "",
    prefix: "vd",
    xfer_mode: "",
};
/// IDE as ata_piix drives it by default: bus-master DMA (MWDMA2 on the PIIX3).
const IDE: Model = Model {
    opt: ",model=ide",
    prefix: "sd",
    xfer_mode: "XFER_MW_DMA_2",
};
/// The IDE drive offering PIO only.
const IDE_PIO: Model = Model {
    opt: ",model=ide-pio",
    prefix: "sd",
    xfer_mode: "XFER_PIO_4",
};
/// virtio-blk on the virtio-mmio transport (virtio-pci is the default).
const VIRTIO_MMIO: Model = Model {
    opt: ",transport=mmio",
    prefix: "vd",
    xfer_mode: "",
};

impl Model {
    /// The guest's name of disk `i` (`vda`, `sdb`, ...).
    fn name(&self, i: u8) -> String {
        format!("{}{}", self.prefix, char::from(b'a' + i))
    }

    fn dev(&self, i: u8) -> String {
        format!("/dev/{}", self.name(i))
    }

    fn is_ide(&self) -> bool {
        self.prefix == "sd"
    }
}

/// Generates one test per model from functions taking the model; the generated tests move
/// into the sandbox themselves (the shared bodies have no test name of their own).
macro_rules! per_model {
    ($($name:ident),* $(,)?) => {
        mod virtio {
            $(#[test] fn $name() { crate::sandboxed!(); super::$name(&super::VIRTIO) })*
        }
        mod ide {
            $(#[test] fn $name() { crate::sandboxed!(); super::$name(&super::IDE) })*
        }
        mod ide_pio {
            $(#[test] fn $name() { crate::sandboxed!(); super::$name(&super::IDE_PIO) })*
        }
        mod virtio_mmio {
            $(#[test] fn $name() { crate::sandboxed!(); super::$name(&super::VIRTIO_MMIO) })*
        }
    };
}

/// The same bodies on virtio-blk under Debian's stock cloud kernel (modular: virtio_pci and
/// virtio_blk load from its initramfs), which finds no virtio-mmio device on its command line.
macro_rules! on_stock_kernel {
    ($($name:ident),* $(,)?) => {
        mod stock_kernel {
            $(#[test] fn $name() {
                crate::sandboxed!();
                let _stock = crate::common::on_stock_kernel();
                super::$name(&super::VIRTIO)
            })*
        }
    };
}

on_stock_kernel!(
    ext4_data_written_and_synced_is_in_the_image,
    host_written_data_reads_back_in_the_guest,
    readonly_disk_refuses_guest_writes_and_is_unchanged,
);

per_model!(
    ext4_data_written_and_synced_is_in_the_image,
    host_written_data_reads_back_in_the_guest,
    readonly_disk_refuses_guest_writes_and_is_unchanged,
    write_cache_and_identity_are_reported,
    several_disks_each_keep_their_own_data,
    boots_with_the_first_disk_as_root,
    a_disk_cut_short_under_the_vmm_gives_the_guest_io_errors,
);

fn a_disk_cut_short_under_the_vmm_gives_the_guest_io_errors(m: &Model) {
    let img = Image::new("shrinks.img", 16);
    let dev = m.dev(0);
    // The guest waits on its console for the host to cut the image to 1 MiB, then reads at
    // 8 MiB (never read before, so not in its page cache) and at 0 (still in the file).
    let mut vm = Vm::guest_running(&format!(
        "echo cut-me-$((6*7)); read -r go; \
         dd if={dev} of=/dev/null bs=4096 skip=2048 count=16 2>/dev/null; echo far-rc=$?; \
         dd if={dev} of=/dev/null bs=4096 count=16 2>/dev/null; echo near-rc=$?"
    ))
    .arg("--disk")
    .arg(img.disk_arg(m.opt))
    .stdin_piped()
    .spawn_until("cut-me-42", Duration::from_secs(300));
    std::fs::OpenOptions::new()
        .write(true)
        .open(img.path())
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    vm.write_stdin(b"go\n");
    let out = vm.finish(Duration::from_secs(300));
    // The VMM carried on: the guest got an error for what is gone, data for what is not,
    // and powered off normally.
    assert_clean(&out);
    let far: i32 = guest_value(&out, "far-rc").parse().unwrap();
    assert_ne!(far, 0, "a read past the cut succeeded\n{}", out.dump());
    assert_eq!(guest_value(&out, "near-rc"), "0", "{}", out.dump());
}

fn ext4_data_written_and_synced_is_in_the_image(m: &Model) {
    let img = Image::new("ext4.img", 64);
    let dev = m.dev(0);
    // The VM ends right after `sync`, without unmounting: flushed data must be on the file.
    let out = Vm::guest_running(&format!(
        "mkfs.ext4 -q -F {dev} && mount -t ext4 {dev} /mnt && seq 1 300000 > /mnt/data.txt \
         && echo guest-sum=$(sha256sum /mnt/data.txt | cut -d' ' -f1) && sync"
    ))
    .arg("--disk")
    .arg(img.disk_arg(m.opt))
    .run();
    assert_clean(&out);
    let guest_sum = guest_value(&out, "guest-sum");

    let expected: String = (1..=300_000).map(|i| format!("{i}\n")).collect();
    assert_eq!(
        guest_sum,
        sha256_of_bytes(expected.as_bytes()),
        "the guest saw what it wrote"
    );

    // Replay the journal as a mount would, then read the file out of the image.
    let fsck = Command::new("e2fsck")
        .args(["-f", "-y"])
        .arg(img.path())
        .output()
        .unwrap();
    assert!(
        fsck.status.code().unwrap_or(8) < 4,
        "e2fsck: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let cat = Command::new("debugfs")
        .args(["-R", "cat /data.txt"])
        .arg(img.path())
        .output()
        .unwrap();
    assert!(cat.status.success());
    assert_eq!(cat.stdout.len(), expected.len(), "file size in the image");
    assert_eq!(
        sha256_of_bytes(&cat.stdout),
        guest_sum,
        "the image holds what the guest wrote"
    );
}

fn host_written_data_reads_back_in_the_guest(m: &Model) {
    let img = Image::new("host-data.img", 16);
    let data = pattern(1 << 20, 7);
    img.write_at(3 << 20, &data);
    let (dev, name) = (m.dev(0), m.name(0));
    let out = Vm::guest_running(&format!(
        "echo sum=$(dd if={dev} bs=1M skip=3 count=1 2>/dev/null | sha256sum | cut -d' ' -f1); \
         echo size=$(cat /sys/block/{name}/size)"
    ))
    .arg("--disk")
    .arg(img.disk_arg(m.opt))
    .run();
    assert_clean(&out);
    assert_eq!(guest_value(&out, "sum"), sha256_of_bytes(&data));
    assert_eq!(
        guest_value(&out, "size"),
        (16u64 << 20 >> 9).to_string(),
        "capacity in sectors"
    );
}

fn readonly_disk_refuses_guest_writes_and_is_unchanged(m: &Model) {
    let img = Image::new("ro.img", 8);
    img.write_at(0, &pattern(1 << 20, 3));
    let before = img.sha256();
    let (dev, name) = (m.dev(0), m.name(0));
    // iflag=direct on the read-back: the page cache must not answer with what the failed
    // write left in it.
    let out = Vm::guest_running(&format!(
        "echo ro=$(cat /sys/block/{name}/ro); \
         dd if=/dev/zero of={dev} bs=4096 count=16 oflag=direct 2>/dev/null; echo dd=$?; \
         echo sum=$(dd if={dev} bs=1M count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)"
    ))
    .arg("--disk")
    .arg(img.disk_arg(&format!(",readonly{}", m.opt)))
    .run();
    assert_clean(&out);
    // virtio-blk tells the guest (VIRTIO_BLK_F_RO); an ATA disk has no write-protect bit, so
    // the IDE model refuses each write with ABRT, as a write-protected drive does.
    let expect_ro = if m.is_ide() { "0" } else { "1" };
    assert_eq!(
        guest_value(&out, "ro"),
        expect_ro,
        "the guest's view of the read-only flag"
    );
    assert_ne!(guest_value(&out, "dd"), "0", "the guest's write must fail");
    assert_eq!(
        guest_value(&out, "sum"),
        sha256_of_bytes(&pattern(1 << 20, 3))
    );
    assert_eq!(img.sha256(), before, "the image file is unchanged");
}

fn write_cache_and_identity_are_reported(m: &Model) {
    let img = Image::new("id.img", 8);
    let name = m.name(0);
    // virtio-blk reports the id as `serial`; libata puts IDENTIFY's model string in the SCSI
    // device's `model` and its serial number in VPD page 0x80 (4-byte header, then the text).
    let out = Vm::guest_running(&format!(
        "echo cache=$(cat /sys/block/{name}/queue/write_cache | tr ' ' _); \
         echo serial=$(cat /sys/block/{name}/serial 2>/dev/null || tail -c +5 /sys/block/{name}/device/vpd_pg80); \
         echo model=$(cat /sys/block/{name}/device/model 2>/dev/null | tr ' ' _); \
         echo xfer=$(cat /sys/class/ata_device/dev1.0/xfer_mode 2>/dev/null)"
    ))
    .arg("--disk")
    .arg(img.disk_arg(&format!(",serial=ferro-disk-01{}", m.opt)))
    .run();
    assert_clean(&out);
    // A write-back cache is what Linux infers from VIRTIO_BLK_F_FLUSH, or from an ATA disk
    // with its write cache enabled: either way it will send flushes.
    assert_eq!(guest_value(&out, "cache"), "write_back");
    assert_eq!(guest_value(&out, "serial"), "ferro-disk-01");
    if m.is_ide() {
        assert_eq!(guest_value(&out, "model"), "FERROVM_HARDDISK");
        // The transfer mode libata set the drive to: DMA unless the drive offers PIO only.
        let xfer = guest_value(&out, "xfer");
        assert_eq!(xfer, m.xfer_mode, "{}", out.dump());
    }
}

fn several_disks_each_keep_their_own_data(m: &Model) {
    let a = Image::new("multi-a.img", 8);
    let b = Image::new("multi-b.img", 12);
    a.write_at(0, b"disk-a-marker\n");
    let (dev_a, dev_b, name_b) = (m.dev(0), m.dev(1), m.name(1));
    let out = Vm::guest_running(&format!(
        "echo a=$(head -c 13 {dev_a}) b-size=$(cat /sys/block/{name_b}/size); \
         echo from-guest-b | dd of={dev_b} bs=512 seek=8 conv=sync,fsync 2>/dev/null; echo dd=$?"
    ))
    .arg("--disk")
    .arg(a.disk_arg(m.opt))
    .arg("--disk")
    .arg(b.disk_arg(m.opt))
    .run();
    assert_clean(&out);
    assert!(
        out.stdout.contains("a=disk-a-marker b-size=24576"),
        "{}",
        out.dump()
    );
    assert_eq!(guest_value(&out, "dd"), "0");
    let bytes = std::fs::read(b.path()).unwrap();
    assert_eq!(&bytes[4096..4096 + 12], b"from-guest-b");
    assert!(
        std::fs::read(a.path()).unwrap()[14..]
            .iter()
            .all(|&x| x == 0),
        "disk a untouched"
    );
}

fn boots_with_the_first_disk_as_root(m: &Model) {
    // A root filesystem of just busybox and an init script, made by mkfs.ext4 -d.
    let dir = temp_path("rootfs");
    for d in ["bin", "dev", "proc", "sbin"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox")).unwrap();
    std::fs::write(
        dir.join("sbin/init"),
        "#!/bin/busybox sh\n/bin/busybox mount -t proc proc /proc\n\
         echo root-is=$(/bin/busybox awk '$2 == \"/\" {print $1}' /proc/mounts | /bin/busybox tail -n 1)\n\
         /bin/busybox sync\n/bin/busybox reboot -f\n",
    )
    .unwrap();
    let mut perms = std::fs::metadata(dir.join("sbin/init"))
        .unwrap()
        .permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(dir.join("sbin/init"), perms).unwrap();
    let img = Image::new("root.img", 32);
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&dir)
        .arg(img.path())
        .output()
        .unwrap();
    assert!(
        mkfs.status.success(),
        "{}",
        String::from_utf8_lossy(&mkfs.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);

    let out = Vm::new()
        .arg("--kernel")
        .arg(&artifacts().vmlinux)
        .arg("--disk")
        .arg(img.disk_arg(m.opt))
        .arg("--cmdline")
        .arg(format!(
            "{} root={} rw init=/sbin/init",
            common::CMDLINE,
            m.dev(0)
        ))
        .run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(out.stdout.contains("root-is=/dev/root"), "{}", out.dump());
    assert!(
        !out.stdout.contains(READY),
        "booted from the disk, not the initramfs"
    );
}

/// What one model wrote, another reads: all are views of the same raw image (IDE by DMA
/// against virtio-blk both ways, and IDE by PIO against IDE by DMA).
#[test]
fn a_disk_written_through_one_model_reads_back_through_the_other() {
    sandboxed!();
    let img = Image::new("cross.img", 16);
    for (writer, reader, seed) in [
        (&IDE, &VIRTIO, 11u64),
        (&VIRTIO, &IDE, 12),
        (&IDE_PIO, &IDE, 13),
    ] {
        let data = pattern(2 << 20, seed);
        let src = temp_path("cross-src");
        std::fs::write(&src, &data).unwrap();
        // The pattern goes in through a second disk (virtio, read-only) so that only the
        // model under test touches the target.
        let src_img = Image(src);
        let (w_dev, src_dev) = if writer.is_ide() {
            (IDE.dev(0), VIRTIO.dev(0))
        } else {
            (VIRTIO.dev(0), VIRTIO.dev(1))
        };
        let mut vm = Vm::guest_running(&format!(
            "dd if={src_dev} of={w_dev} bs=64k seek=16 conv=fsync 2>/dev/null; echo dd=$?"
        ));
        if writer.is_ide() {
            vm.arg("--disk").arg(img.disk_arg(writer.opt));
            vm.arg("--disk").arg(src_img.disk_arg(",readonly"));
        } else {
            vm.arg("--disk").arg(img.disk_arg(""));
            vm.arg("--disk").arg(src_img.disk_arg(",readonly"));
        }
        let out = vm.run();
        assert_clean(&out);
        assert_eq!(guest_value(&out, "dd"), "0", "{}", out.dump());

        let out = Vm::guest_running(&format!(
            "echo sum=$(dd if={} bs=64k skip=16 count=32 2>/dev/null | sha256sum | cut -d' ' -f1)",
            reader.dev(0)
        ))
        .arg("--disk")
        .arg(img.disk_arg(reader.opt))
        .run();
        assert_clean(&out);
        assert_eq!(
            guest_value(&out, "sum"),
            sha256_of_bytes(&data),
            "written through {}, read through {}",
            writer.opt,
            reader.opt
        );
    }
}

#[test]
fn a_disk_that_cannot_be_opened_is_named() {
    // No guest: the image is refused before the VM is built.
    let img = Image::new("unaligned.img", 1);
    std::fs::OpenOptions::new()
        .write(true)
        .open(img.path())
        .unwrap()
        .set_len(1000)
        .unwrap();
    let out = Vm::new()
        .arg("--kernel")
        .arg(&artifacts().vmlinux)
        .arg("--disk")
        .arg(img.disk_arg(""))
        .run();
    assert_eq!(out.code, Some(1), "{}", out.dump());
    assert!(
        out.stderr.contains("is 1000 bytes, not a multiple of 512"),
        "{}",
        out.dump()
    );
    let out = Vm::new()
        .arg("--kernel")
        .arg(&artifacts().vmlinux)
        .arg("--disk")
        .arg("/nonexistent/disk.img")
        .run();
    assert_eq!(out.code, Some(1), "{}", out.dump());
    assert!(
        out.stderr
            .contains("Failed to open the disk image /nonexistent/disk.img"),
        "{}",
        out.dump()
    );
}
