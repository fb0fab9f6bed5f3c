//! The kernel loader target: the input is a kernel file (ELF vmlinux or bzImage, told apart
//! by their magic numbers as `--kernel` does), checked, planned and loaded into guest memory
//! with the command line and boot parameters, as `Vmm::build` does.

use std::cell::RefCell;
use std::fs::File;
use std::io::Write;

use vmm_sys_util::tempfile::TempFile;

use crate::arch::x86_64::boot::{build_cmdline, load_kernel, plan_boot};
use crate::vstate::memory::create_guest_memory;

/// Guest RAM of the loader target: room for small kernels; larger ones are refused by the
/// memory size check, which is part of what is fuzzed.
pub const MEM_SIZE: u64 = 8 << 20;

thread_local! {
    /// The kernel file, rewritten for every input (one per thread: targets run in parallel).
    static KERNEL: RefCell<Option<TempFile>> = const { RefCell::new(None) };
}

fn write_file(file: &File, data: &[u8]) {
    file.set_len(0).expect("truncate the kernel file");
    let mut f = file;
    std::io::Seek::rewind(&mut f).expect("rewind the kernel file");
    f.write_all(data).expect("write the kernel file");
}

/// Loads `data` as a kernel; it must fail with an error or load, never panic.
pub fn loader(data: &[u8]) {
    KERNEL.with(|k| {
        let mut k = k.borrow_mut();
        let file = k.get_or_insert_with(|| TempFile::new().expect("temp file"));
        write_file(file.as_file(), data);
        let Ok(plan) = plan_boot(file.as_path(), None, MEM_SIZE) else {
            return;
        };
        assert!(
            plan.kernel.end <= MEM_SIZE,
            "kernel planned up to {:#x} in {MEM_SIZE:#x} bytes of RAM",
            plan.kernel.end
        );
        let mem = create_guest_memory(MEM_SIZE).expect("guest memory");
        let cmdline = build_cmdline("console=ttyS0", &[]).expect("command line");
        let _ = load_kernel(&mem, &plan, &cmdline, None);
    });
}
