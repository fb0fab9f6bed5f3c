//! The 82540EM register map: offsets in the 128 KiB memory BAR, the bits the model acts on,
//! and the names the exit accounting reports (PCI/PCI-X Family of Gigabit Ethernet
//! Controllers Software Developer's Manual, Intel 317453, section 13, "Register
//! Descriptions"; the offsets match Linux's e1000_hw.h).

pub const CTRL: u64 = 0x0000;
/// A shadow of CTRL the 82545 rev 3 and later take resets on; the 82540 aliases it.
pub const CTRL_DUP: u64 = 0x0004;
pub const STATUS: u64 = 0x0008;
pub const EECD: u64 = 0x0010;
pub const EERD: u64 = 0x0014;
pub const CTRL_EXT: u64 = 0x0018;
pub const MDIC: u64 = 0x0020;
pub const FCAL: u64 = 0x0028;
pub const FCAH: u64 = 0x002c;
pub const FCT: u64 = 0x0030;
pub const VET: u64 = 0x0038;
pub const ICR: u64 = 0x00c0;
pub const ITR: u64 = 0x00c4;
pub const ICS: u64 = 0x00c8;
pub const IMS: u64 = 0x00d0;
pub const IMC: u64 = 0x00d8;
pub const RCTL: u64 = 0x0100;
pub const FCTTV: u64 = 0x0170;
pub const TXCW: u64 = 0x0178;
pub const RXCW: u64 = 0x0180;
pub const TCTL: u64 = 0x0400;
pub const TIPG: u64 = 0x0410;
pub const LEDCTL: u64 = 0x0e00;
pub const PBA: u64 = 0x1000;
pub const FCRTL: u64 = 0x2160;
pub const FCRTH: u64 = 0x2168;
pub const RDBAL: u64 = 0x2800;
pub const RDBAH: u64 = 0x2804;
pub const RDLEN: u64 = 0x2808;
pub const RDH: u64 = 0x2810;
pub const RDT: u64 = 0x2818;
pub const RDTR: u64 = 0x2820;
pub const RXDCTL: u64 = 0x2828;
pub const RADV: u64 = 0x282c;
pub const RSRPD: u64 = 0x2c00;
pub const TDBAL: u64 = 0x3800;
pub const TDBAH: u64 = 0x3804;
pub const TDLEN: u64 = 0x3808;
pub const TDH: u64 = 0x3810;
pub const TDT: u64 = 0x3818;
pub const TIDV: u64 = 0x3820;
pub const TXDCTL: u64 = 0x3828;
pub const TADV: u64 = 0x382c;
pub const TSPMT: u64 = 0x3830;
/// The statistics block: 64 clear-on-read counters (13.7).
pub const STATS_START: u64 = 0x4000;
pub const STATS_END: u64 = 0x4100;
pub const RXCSUM: u64 = 0x5000;
pub const MTA: u64 = 0x5200;
pub const MTA_END: u64 = 0x5400;
pub const RA: u64 = 0x5400;
pub const RA_END: u64 = 0x5480;
pub const VFTA: u64 = 0x5600;
pub const VFTA_END: u64 = 0x5800;
pub const WUC: u64 = 0x5800;
pub const WUFC: u64 = 0x5808;
pub const WUS: u64 = 0x5810;
pub const MANC: u64 = 0x5820;
pub const IPAV: u64 = 0x5838;
pub const WAKEUP_END: u64 = 0x5a00;

// Statistics registers the model counts into (offsets in the block).
pub const MPC: u64 = 0x4010;
pub const PRC64: u64 = 0x405c;
pub const GPRC: u64 = 0x4074;
pub const BPRC: u64 = 0x4078;
pub const MPRC: u64 = 0x407c;
pub const GPTC: u64 = 0x4080;
pub const GORCL: u64 = 0x4088;
pub const GORCH: u64 = 0x408c;
pub const GOTCL: u64 = 0x4090;
pub const GOTCH: u64 = 0x4094;
pub const RNBC: u64 = 0x40a0;
pub const RUC: u64 = 0x40a4;
pub const ROC: u64 = 0x40ac;
pub const TORL: u64 = 0x40c0;
pub const TORH: u64 = 0x40c4;
pub const TOTL: u64 = 0x40c8;
pub const TOTH: u64 = 0x40cc;
pub const TPR: u64 = 0x40d0;
pub const TPT: u64 = 0x40d4;
pub const PTC64: u64 = 0x40d8;
pub const MPTC: u64 = 0x40f0;
pub const BPTC: u64 = 0x40f4;
pub const TSCTC: u64 = 0x40f8;
pub const TSCTFC: u64 = 0x40fc;

/// Size of the memory BAR (BAR0).
pub const MMIO_SIZE: u64 = 0x2_0000;
/// Size of the I/O BAR (BAR1): IOADDR at 0, IODATA at 4 (13.2 "I/O-mapped access").
pub const IO_SIZE: u32 = 0x40;
pub const IOADDR: u64 = 0;
pub const IODATA: u64 = 4;

// CTRL.
pub const CTRL_SLU: u32 = 1 << 6;
pub const CTRL_RST: u32 = 1 << 26;
pub const CTRL_VME: u32 = 1 << 30;
pub const CTRL_PHY_RST: u32 = 1 << 31;
// STATUS: full duplex, link up, 1000 Mb/s.
pub const STATUS_FD: u32 = 1 << 0;
pub const STATUS_LU: u32 = 1 << 1;
pub const STATUS_SPEED_1000: u32 = 1 << 7;
// EERD.
pub const EERD_START: u32 = 1 << 0;
pub const EERD_DONE: u32 = 1 << 4;
// MDIC.
pub const MDIC_DATA_MASK: u32 = 0xffff;
pub const MDIC_REG_SHIFT: u32 = 16;
pub const MDIC_PHY_SHIFT: u32 = 21;
pub const MDIC_OP_WRITE: u32 = 1 << 26;
pub const MDIC_OP_READ: u32 = 2 << 26;
pub const MDIC_READY: u32 = 1 << 28;
pub const MDIC_INT_EN: u32 = 1 << 29;
pub const MDIC_ERROR: u32 = 1 << 30;

// Interrupt causes (ICR, ICS, IMS, IMC).
pub const ICR_TXDW: u32 = 1 << 0;
pub const ICR_TXQE: u32 = 1 << 1;
pub const ICR_LSC: u32 = 1 << 2;
pub const ICR_RXDMT0: u32 = 1 << 4;
pub const ICR_RXT0: u32 = 1 << 7;
pub const ICR_MDAC: u32 = 1 << 9;
/// Every cause the 82540 defines (bits 0-16).
pub const ICR_ALL: u32 = 0x1_ffff;

// RCTL.
pub const RCTL_EN: u32 = 1 << 1;
pub const RCTL_UPE: u32 = 1 << 3;
pub const RCTL_MPE: u32 = 1 << 4;
pub const RCTL_LPE: u32 = 1 << 5;
pub const RCTL_RDMTS_SHIFT: u32 = 8;
pub const RCTL_MO_SHIFT: u32 = 12;
pub const RCTL_BAM: u32 = 1 << 15;
pub const RCTL_BSIZE_SHIFT: u32 = 16;
pub const RCTL_VFE: u32 = 1 << 18;
pub const RCTL_BSEX: u32 = 1 << 25;
pub const RCTL_SECRC: u32 = 1 << 26;
// RDTR: flush partial descriptor block (fire a pending receive interrupt now).
pub const RDTR_FPD: u32 = 1 << 31;
// RXCSUM.
pub const RXCSUM_PCSS_MASK: u32 = 0xff;
pub const RXCSUM_IPOFL: u32 = 1 << 8;
pub const RXCSUM_TUOFL: u32 = 1 << 9;
// TCTL: transmit enable, pad short packets.
pub const TCTL_EN: u32 = 1 << 1;
pub const TCTL_PSP: u32 = 1 << 3;
// RAH: address valid.
pub const RAH_AV: u32 = 1 << 31;

/// Register names by offset in the memory BAR, for the exit accounting.
pub fn register_name(offset: u64) -> &'static str {
    match offset & !3 {
        CTRL | CTRL_DUP => "ctrl",
        STATUS => "status",
        EECD => "eecd",
        EERD => "eerd",
        CTRL_EXT => "ctrl_ext",
        MDIC => "mdic",
        ICR => "icr",
        ITR => "itr",
        ICS => "ics",
        IMS => "ims",
        IMC => "imc",
        RCTL => "rctl",
        TCTL => "tctl",
        RDBAL | RDBAH | RDLEN => "rx_ring",
        RDH => "rdh",
        RDT => "rdt",
        RDTR => "rdtr",
        RADV => "radv",
        TDBAL | TDBAH | TDLEN => "tx_ring",
        TDH => "tdh",
        TDT => "tdt",
        TIDV => "tidv",
        TADV => "tadv",
        TXDCTL => "txdctl",
        RXCSUM => "rxcsum",
        STATS_START..STATS_END => "stats",
        MTA..MTA_END => "mta",
        RA..RA_END => "ra",
        VFTA..VFTA_END => "vfta",
        MMIO_SIZE.. => "",
        _ => "other",
    }
}

/// Register names by offset in the I/O BAR.
pub fn io_register_name(offset: u64) -> &'static str {
    match offset {
        IOADDR..=3 => "ioaddr",
        IODATA..=7 => "iodata",
        _ => "",
    }
}

/// Whether a write to `offset` is simply stored and read back: configuration the model
/// keeps (or ignores) but that has no side effect of its own.
pub fn is_plain(offset: u64) -> bool {
    matches!(
        offset,
        CTRL_EXT
            | FCAL
            | FCAH
            | FCT
            | VET
            | FCTTV
            | TXCW
            | TIPG
            | LEDCTL
            | PBA
            | FCRTL
            | FCRTH
            | RDBAL
            | RDBAH
            | RXDCTL
            | RSRPD
            | TDBAL
            | TDBAH
            | TXDCTL
            | TSPMT
            | RXCSUM
            | WUC
            | WUFC
            | WUS
            | MANC
            | IPAV
            | MTA..MTA_END
            | RA..RA_END
            | VFTA..VFTA_END
    ) || (WUC..WAKEUP_END).contains(&offset)
}
