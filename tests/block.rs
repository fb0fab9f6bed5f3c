//! Disks: a guest filesystem's flushed data is in the image after the VM ends, host data
//! reads back in the guest, read-only disks stay unchanged, the device id and several disks,
//! and booting from a disk as the root device. Every test boots the project's guest.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

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

#[test]
fn ext4_data_written_and_synced_is_in_the_image() {
    sandboxed!();
    let img = Image::new("ext4.img", 64);
    // The VM ends right after `sync`, without unmounting: flushed data must be on the file.
    let out = Vm::guest_running(
        "mkfs.ext4 -q -F /dev/vda && mount -t ext4 /dev/vda /mnt && seq 1 300000 > /mnt/data.txt \
         && echo guest-sum=$(sha256sum /mnt/data.txt | cut -d' ' -f1) && sync",
    )
    .arg("--disk")
    .arg(img.disk_arg(""))
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

#[test]
fn host_written_data_reads_back_in_the_guest() {
    sandboxed!();
    let img = Image::new("host-data.img", 16);
    let data = pattern(1 << 20, 7);
    img.write_at(3 << 20, &data);
    let out = Vm::guest_running(
        "echo sum=$(dd if=/dev/vda bs=1M skip=3 count=1 2>/dev/null | sha256sum | cut -d' ' -f1); \
         echo size=$(cat /sys/block/vda/size)",
    )
    .arg("--disk")
    .arg(img.disk_arg(""))
    .run();
    assert_clean(&out);
    assert_eq!(guest_value(&out, "sum"), sha256_of_bytes(&data));
    assert_eq!(
        guest_value(&out, "size"),
        (16u64 << 20 >> 9).to_string(),
        "capacity in sectors"
    );
}

#[test]
fn readonly_disk_refuses_guest_writes_and_is_unchanged() {
    sandboxed!();
    let img = Image::new("ro.img", 8);
    img.write_at(0, &pattern(1 << 20, 3));
    let before = img.sha256();
    let out = Vm::guest_running(
        "echo ro=$(cat /sys/block/vda/ro); \
         dd if=/dev/zero of=/dev/vda bs=4096 count=16 conv=fsync 2>/dev/null; echo dd=$?; \
         echo sum=$(dd if=/dev/vda bs=1M count=1 2>/dev/null | sha256sum | cut -d' ' -f1)",
    )
    .arg("--disk")
    .arg(img.disk_arg(",readonly"))
    .run();
    assert_clean(&out);
    assert_eq!(
        guest_value(&out, "ro"),
        "1",
        "the guest sees a read-only disk"
    );
    assert_ne!(guest_value(&out, "dd"), "0", "the guest's write must fail");
    assert_eq!(
        guest_value(&out, "sum"),
        sha256_of_bytes(&pattern(1 << 20, 3))
    );
    assert_eq!(img.sha256(), before, "the image file is unchanged");
}

#[test]
fn flush_is_offered_and_the_id_is_reported() {
    sandboxed!();
    let img = Image::new("id.img", 8);
    let out = Vm::guest_running(
        "echo cache=$(cat /sys/block/vda/queue/write_cache | tr ' ' _); \
         echo serial=$(cat /sys/block/vda/serial)",
    )
    .arg("--disk")
    .arg(img.disk_arg(",serial=ferro-disk-01"))
    .run();
    assert_clean(&out);
    // A write-back cache is what Linux infers from VIRTIO_BLK_F_FLUSH: it will send flushes.
    assert_eq!(guest_value(&out, "cache"), "write_back");
    assert_eq!(guest_value(&out, "serial"), "ferro-disk-01");
}

#[test]
fn several_disks_each_keep_their_own_data() {
    sandboxed!();
    let a = Image::new("multi-a.img", 8);
    let b = Image::new("multi-b.img", 12);
    a.write_at(0, b"disk-a-marker\n");
    let out = Vm::guest_running(
        "echo a=$(head -c 13 /dev/vda) b-size=$(cat /sys/block/vdb/size); \
         echo from-guest-b | dd of=/dev/vdb bs=512 seek=8 conv=sync,fsync 2>/dev/null; echo dd=$?",
    )
    .arg("--disk")
    .arg(a.disk_arg(""))
    .arg("--disk")
    .arg(b.disk_arg(""))
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

#[test]
fn boots_with_the_first_disk_as_root() {
    sandboxed!();
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
        .arg(img.disk_arg(""))
        .arg("--cmdline")
        .arg("console=ttyS0 reboot=k panic=-1 root=/dev/vda rw init=/sbin/init")
        .run();
    assert_eq!(out.code, Some(0), "{}", out.dump());
    assert!(out.stdout.contains("root-is=/dev/root"), "{}", out.dump());
    assert!(
        !out.stdout.contains(READY),
        "booted from the disk, not the initramfs"
    );
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
