//! The allow-lists, one per kind of VMM thread.
//!
//! Each list holds what that thread does once its setup is over, as measured with
//! `strace -f` on runs with every device model, plus what the Rust runtime and glibc do on
//! the rare paths (a thread ending, a panic, an abort). Everything else traps. Arguments are
//! checked where the check is cheap and closes a door: `ioctl` only with the request numbers
//! used, `mmap`/`mprotect` never executable, `openat` only to create the metrics report or list a directory,
//! `tgkill` only with the kick and abort signals.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_dirty_log, kvm_ioeventfd, kvm_irq_routing,
    kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use super::ThreadKind;

ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
// Snapshots on the main thread: the in-kernel PIT and clock (the irqchips: KVM_GET_IRQCHIP).
ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
// A parked vCPU thread taking its vCPU's state for a snapshot (vstate::vcpu_state::save).
ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
// The migration thread: dirty logging on and off, and the log itself.
ioctl_iow_nr!(
    KVM_SET_USER_MEMORY_REGION,
    KVMIO,
    0x46,
    kvm_userspace_memory_region
);
ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

/// Syscall number -> the rules under which it is allowed (an empty list: always).
type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// What every thread needs: memory for the allocator, locks, stderr for the log, the
/// clock, and the ways a thread or the process ends (including a panic or an abort).
const COMMON: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_write,
    libc::SYS_writev,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_getrandom,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_close,
    libc::SYS_exit,
    libc::SYS_exit_group,
];

/// The main thread runs the event loop: epoll, the devices' eventfds and TAPs, the metrics
/// report, kicking and joining the vCPUs, and tearing the VM down.
const MAIN: &[i64] = &[
    // The e1000's interrupt moderation timer, armed when a received frame starts a delay.
    libc::SYS_timerfd_settime,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_read,
    libc::SYS_readv,
    // The crash report reads the kernel's symbols from the file opened at start; the
    // metrics report reads KVM's per-vCPU statistics (one pread per vCPU's stats fd).
    libc::SYS_pread64,
    libc::SYS_rename,
    // Snapshots: the directory, the memory file (sparse: sized, then written at offsets),
    // the state file, made durable; the control socket's file removed at the end.
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_ftruncate,
    libc::SYS_pwrite64,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    // Stopping a migration: its socket is shut down.
    libc::SYS_shutdown,
    libc::SYS_statx,
    // The tear-down check: a directory's entries, its fstat, and the fds' link targets.
    libc::SYS_getdents64,
    libc::SYS_newfstatat,
    libc::SYS_readlink,
    // vhost-user (virtio-fs): messages with their fds (SCM_RIGHTS) on the backend socket.
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    // Reaping the virtiofsd this VMM started (`Child::try_wait`, `Child::wait`).
    libc::SYS_wait4,
];

/// A vCPU runs the guest and the device models it exits into: port and MMIO handlers
/// write eventfds, the console outputs, the NE2000's TAP, and (`DISK_IO`) the IDE disk's
/// image.
const VCPU: &[i64] = &[
    libc::SYS_read,
    libc::SYS_readv,
    // The e1000's interrupt moderation timer, armed when a register write (TDT, IMS, ITR)
    // starts or moves a delay.
    libc::SYS_timerfd_settime,
];

/// Reading, writing and flushing a disk image: the virtio-blk I/O threads' whole job, and
/// the IDE disk's on the vCPUs. Their irqfd writes are in `COMMON`.
const DISK_IO: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
];

/// The stdin forwarder copies a file or /dev/null into a pipe with `std::io::copy`, which
/// looks at both fds (statx) and moves the data in the kernel when it can.
const STDIN: &[i64] = &[
    libc::SYS_read,
    libc::SYS_statx,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_sendfile,
    libc::SYS_splice,
    libc::SYS_copy_file_range,
];

/// The control socket's thread: accept a connection, read a request, queue it for the event
/// loop and write the answer, waiting on epoll for the socket or the stop eventfd.
const API: &[i64] = &[
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_accept4,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_setsockopt,
];

/// The migration thread: connecting to the destination (a Unix or TCP socket; a TCP
/// connect with a timeout polls a non-blocking socket, FIONBIO below), the stream with fds
/// attached (SCM_RIGHTS, local mode), cutting it, and KVM's dirty log (ioctls below).
const MIGRATION: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_read,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
];

/// Builds the BPF program of one thread kind.
pub fn compile(kind: ThreadKind) -> Result<BpfProgram, seccompiler::BackendError> {
    let mut rules = Rules::new();
    let lists: &[&[i64]] = match kind {
        ThreadKind::Main => &[COMMON, MAIN],
        ThreadKind::Vcpu => &[COMMON, VCPU, DISK_IO],
        ThreadKind::BlockIo => &[COMMON, DISK_IO],
        ThreadKind::Stdin => &[COMMON, STDIN],
        ThreadKind::Api => &[COMMON, API],
        ThreadKind::Migration => &[COMMON, MIGRATION],
    };
    for nr in lists.iter().copied().flatten() {
        rules.insert(*nr, Vec::new());
    }
    let no_exec = || {
        // The allocator maps data only; an executable mapping is what an exploit wants.
        rule(&[(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)])
    };
    rules.insert(libc::SYS_mmap, vec![no_exec()?]);
    rules.insert(libc::SYS_mprotect, vec![no_exec()?]);
    // Debug builds of std check that an fd is open before closing it. Duplicating an fd
    // (try_clone): the control connection a migration streams its progress on (api), the
    // migration's socket (migrate), and the TAPs a local migration hands over (main).
    let mut fcntl = vec![rule(&[(1, SeccompCmpOp::Eq, libc::F_GETFD as u64)])?];
    if matches!(
        kind,
        ThreadKind::Main | ThreadKind::Api | ThreadKind::Migration
    ) {
        fcntl.push(rule(&[(
            1,
            SeccompCmpOp::Eq,
            libc::F_DUPFD_CLOEXEC as u64,
        )])?);
    }
    rules.insert(libc::SYS_fcntl, fcntl);
    // abort() (a panic with panic=abort, a failed allocation) raises SIGABRT on itself.
    let mut kill_signals = vec![libc::SIGABRT as u64];
    // TCSETS (tcsetattr) puts the terminal back out of raw mode: at exit on the main
    // thread, from the SIGSYS handler on any thread.
    let mut ioctls: Vec<u64> = vec![libc::TCSETS];
    match kind {
        ThreadKind::Main => {
            kill_signals.push(crate::vstate::vcpu::kick_signal() as u64);
            // A virtiofsd that outlives its socket is killed (`Child::kill`): SIGKILL only.
            rules.insert(
                libc::SYS_kill,
                vec![rule(&[(1, SeccompCmpOp::Eq, libc::SIGKILL as u64)])?],
            );
            // The IOAPIC state tells an orderly reboot from a panic.
            // TUNSETQUEUE: a migration detaching and re-attaching the TAPs' queues.
            ioctls.extend([
                KVM_GET_IRQCHIP(),
                libc::TCGETS,
                KVM_GET_PIT2(),
                KVM_GET_CLOCK(),
                libc::TUNSETQUEUE,
            ]);
            // Only creating the metrics report (std::fs::write), and listing a directory
            // (std::fs::read_dir: /proc/self/task and /proc/self/fd for the tear-down
            // check, see `leftovers`): no reading a file, no O_PATH.
            let create = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC) as u64;
            let list =
                (libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_DIRECTORY) as u64;
            rules.insert(
                libc::SYS_openat,
                vec![
                    rule(&[(2, SeccompCmpOp::Eq, create)])?,
                    rule(&[(2, SeccompCmpOp::Eq, list)])?,
                ],
            );
        }
        ThreadKind::Vcpu => {
            // TUNSETOFFLOAD: virtio-net sets the TAP offloads when the driver activates it,
            // which happens on the vCPU that wrote DRIVER_OK. The registers (GET_REGS,
            // GET_SREGS) are sampled on each periodic kick and read when the guest stops,
            // for the crash report; the other KVM_GET_*: a parked vCPU taking its state for
            // a snapshot. KVM_SET_GSI_ROUTING: the
            // driver programming an MSI-X vector; KVM_IOEVENTFD: the driver moving a
            // virtio-pci BAR (its queue notifications move with it).
            ioctls.extend([
                KVM_RUN(),
                KVM_GET_REGS(),
                KVM_GET_SREGS(),
                KVM_GET_MP_STATE(),
                KVM_SET_GSI_ROUTING(),
                KVM_IOEVENTFD(),
                libc::TUNSETOFFLOAD,
                KVM_GET_MSRS(),
                KVM_GET_LAPIC(),
                KVM_GET_CPUID2(),
                KVM_GET_VCPU_EVENTS(),
                KVM_GET_DEBUGREGS(),
                KVM_GET_TSC_KHZ(),
                KVM_GET_XSAVE(),
                KVM_GET_XCRS(),
            ]);
        }
        ThreadKind::Migration => {
            ioctls.extend([
                KVM_GET_DIRTY_LOG(),
                KVM_SET_USER_MEMORY_REGION(),
                libc::FIONBIO,
            ]);
        }
        ThreadKind::BlockIo | ThreadKind::Stdin | ThreadKind::Api => {}
    }
    let per_request = ioctls
        .iter()
        .map(|req| rule(&[(1, SeccompCmpOp::Eq, *req)]))
        .collect::<Result<_, _>>()?;
    rules.insert(libc::SYS_ioctl, per_request);
    let tgkill = kill_signals
        .iter()
        .map(|sig| rule(&[(2, SeccompCmpOp::Eq, *sig)]))
        .collect::<Result<_, _>>()?;
    rules.insert(libc::SYS_tgkill, tgkill);

    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    filter.try_into()
}

/// A rule that holds when every (argument index, comparison, value) holds, each compared
/// as 32 bits: ioctl requests, flags and signal numbers are C ints.
fn rule(conds: &[(u8, SeccompCmpOp, u64)]) -> Result<SeccompRule, seccompiler::BackendError> {
    let conds = conds
        .iter()
        .map(|(arg, op, value)| {
            SeccompCondition::new(*arg, SeccompCmpArgLen::Dword, op.clone(), *value)
        })
        .collect::<Result<_, _>>()?;
    SeccompRule::new(conds)
}
