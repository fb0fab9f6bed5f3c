//! The seed corpus: for each target, valid inputs a working driver (or a real kernel file)
//! would produce, so that mutations start from the paths that matter. `scripts/fuzz
//! --write-seeds` writes them to `fuzz/corpus/<target>/seed-*`; a unit test checks the
//! committed files match. Crash reproducers live next to them as `regress-*`.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

use super::virtio::{DATA_START, FLAG_DEVICE, FLAG_EVENT_IDX, FLAG_FILE};
use super::InputBuilder;
use crate::arch::x86_64::boot::test_images::{make_bzimage, make_elf};

const NEXT: u16 = VRING_DESC_F_NEXT as u16;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// Named seeds of `target` (empty for an unknown one).
pub fn for_target(target: &str) -> Vec<(&'static str, Vec<u8>)> {
    match target {
        "virtio_block" => block(),
        "virtio_net" => net(),
        "virtio_console" => console(),
        "virtio_mmio" => mmio(),
        "virtio_pci" => virtio_pci(),
        "ide" => ide(),
        "ne2k" => ne2k(),
        "pci" => pci(),
        "e1000" => e1000(),
        "bmdma" => bmdma(),
        "kernel_loader" => kernel(),
        _ => Vec::new(),
    }
}

/// One virtio queue of a seed: descriptors (addr, len, flags, next) and available heads.
struct Ring {
    size_log2: u8,
    descs: Vec<(u64, u32, u16, u16)>,
    heads: Vec<u16>,
}

impl Ring {
    fn new(descs: Vec<(u64, u32, u16, u16)>, heads: Vec<u16>) -> Self {
        Self {
            size_log2: 4,
            descs,
            heads,
        }
    }

    fn empty() -> Self {
        Self::new(Vec::new(), Vec::new())
    }
}

/// The data area of a seed: bytes placed at guest addresses from DATA_START.
#[derive(Default)]
struct Data(Vec<u8>);

impl Data {
    fn put(&mut self, addr: u64, bytes: &[u8]) -> &mut Self {
        let at = (addr - DATA_START) as usize;
        if self.0.len() < at + bytes.len() {
            self.0.resize(at + bytes.len(), 0);
        }
        self.0[at..at + bytes.len()].copy_from_slice(bytes);
        self
    }
}

/// Encodes a virtio input (the layout is in `fuzz::virtio`).
fn virtio_input(flags: u8, rings: &[Ring], data: &Data) -> InputBuilder {
    let mut b = InputBuilder::default();
    b.u8(flags);
    for r in rings {
        b.u8(r.size_log2)
            .u16(r.heads.len() as u16)
            .u16(0)
            .u8(r.descs.len() as u8);
        for &(addr, len, f, next) in &r.descs {
            b.u64(addr).u32(len).u16(f).u16(next);
        }
        b.u8(r.heads.len() as u8);
        for &h in &r.heads {
            b.u16(h);
        }
    }
    b.blob(&data.0);
    b
}

const HDR: u64 = DATA_START;
const BUF: u64 = DATA_START + 0x100;
const STATUS: u64 = DATA_START + 0x80;

fn blk_header(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A request: header, data buffers (`data_flags`), status.
fn blk_chain(first: u16, bufs: &[(u64, u32)], data_flags: u16) -> Vec<(u64, u32, u16, u16)> {
    let mut descs = vec![(HDR, 16, NEXT, first + 1)];
    for (i, &(addr, len)) in bufs.iter().enumerate() {
        descs.push((addr, len, data_flags | NEXT, first + 2 + i as u16));
    }
    descs.push((STATUS, 1, WRITE, 0));
    descs
}

fn blk_one(flags: u8, kind: u32, sector: u64, bufs: &[(u64, u32)], data_flags: u16) -> Vec<u8> {
    let mut data = Data::default();
    data.put(HDR, &blk_header(kind, sector))
        .put(BUF, &[0x5a; 1024]);
    let ring = Ring::new(blk_chain(0, bufs, data_flags), vec![0]);
    virtio_input(flags, &[ring], &data).0
}

fn block() -> Vec<(&'static str, Vec<u8>)> {
    let one = [(BUF, 512)];
    // Two requests in one ring: a write of sector 3, then a read of it (headers apart).
    let two = |flags| {
        let mut data = Data::default();
        data.put(HDR, &blk_header(VIRTIO_BLK_T_OUT, 3))
            .put(HDR + 0x20, &blk_header(VIRTIO_BLK_T_IN, 3))
            .put(BUF, &[0xa5; 512]);
        let mut descs = blk_chain(0, &one, 0);
        let mut read = blk_chain(3, &[(BUF + 0x200, 512)], WRITE);
        read[0].0 = HDR + 0x20;
        read[2].0 = STATUS + 1;
        descs.extend(read);
        virtio_input(flags, &[Ring::new(descs, vec![0, 3])], &data).0
    };
    // A read through an indirect table of three descriptors.
    let indirect = {
        let table = DATA_START + 0x800;
        let mut data = Data::default();
        data.put(HDR, &blk_header(VIRTIO_BLK_T_IN, 2));
        for (i, (addr, len, f, next)) in blk_chain(0, &one, WRITE).into_iter().enumerate() {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&f.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
            data.put(table + 16 * i as u64, &d);
        }
        let ring = Ring::new(vec![(table, 48, INDIRECT, 0)], vec![0]);
        virtio_input(0, &[ring], &data).0
    };
    vec![
        ("read", blk_one(0, VIRTIO_BLK_T_IN, 1, &one, WRITE)),
        (
            "read-two-buffers",
            blk_one(
                0,
                VIRTIO_BLK_T_IN,
                5,
                &[(BUF, 512), (BUF + 0x200, 512)],
                WRITE,
            ),
        ),
        ("write", blk_one(0, VIRTIO_BLK_T_OUT, 7, &one, 0)),
        (
            "write-readonly",
            blk_one(FLAG_DEVICE, VIRTIO_BLK_T_OUT, 7, &one, 0),
        ),
        ("flush", blk_one(0, VIRTIO_BLK_T_FLUSH, 0, &[], 0)),
        (
            "get-id",
            blk_one(0, VIRTIO_BLK_T_GET_ID, 0, &[(BUF, 20)], WRITE),
        ),
        (
            "read-last-sector",
            blk_one(0, VIRTIO_BLK_T_IN, 63, &one, WRITE),
        ),
        ("write-then-read", two(FLAG_EVENT_IDX)),
        ("read-indirect", indirect),
        // The same through the VMM's image file backend (preadv into guest memory).
        (
            "file-read-two-buffers",
            blk_one(
                FLAG_FILE,
                VIRTIO_BLK_T_IN,
                5,
                &[(BUF, 512), (BUF + 0x200, 512)],
                WRITE,
            ),
        ),
        ("file-write-then-read", two(FLAG_EVENT_IDX | FLAG_FILE)),
    ]
}

/// A frame as the guest or the TAP has it: a zero virtio-net header and `len` bytes.
fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0u8; 12];
    f.extend([0xff; 6]);
    f.extend([0x02, 0, 0, 0, 0, 0x01]);
    f.extend([0x08, 0x00]);
    f.extend((0..len.saturating_sub(14)).map(|i| i as u8));
    f
}

fn net() -> Vec<(&'static str, Vec<u8>)> {
    let tx_frame = frame(60);
    let tx = {
        let mut data = Data::default();
        data.put(BUF, &tx_frame);
        let ring = Ring::new(vec![(BUF, tx_frame.len() as u32, 0, 0)], vec![0]);
        virtio_input(0, &[Ring::empty(), ring], &data).0
    };
    let tx_split = {
        let mut data = Data::default();
        data.put(BUF, &tx_frame);
        let descs = vec![
            (BUF, 12, NEXT, 1),
            (BUF + 12, tx_frame.len() as u32 - 12, 0, 0),
        ];
        virtio_input(
            FLAG_EVENT_IDX,
            &[Ring::empty(), Ring::new(descs, vec![0])],
            &data,
        )
        .0
    };
    // Two receive buffers, two frames from the TAP.
    let rx = {
        let rxq = Ring::new(
            vec![(BUF, 1526, WRITE, 0), (BUF + 0x800, 1526, WRITE, 0)],
            vec![0, 1],
        );
        let mut b = virtio_input(0, &[rxq, Ring::empty()], &Data::default());
        b.blob(&frame(60)).blob(&frame(1514));
        b.0
    };
    // MRG_RXBUF: a frame spread over three 256-byte buffers.
    let rx_mergeable = {
        let descs = (0..4u16)
            .map(|i| (BUF + 0x100 * u64::from(i), 256, WRITE, 0))
            .collect();
        let rxq = Ring::new(descs, vec![0, 1, 2, 3]);
        let mut b = virtio_input(
            FLAG_DEVICE | FLAG_EVENT_IDX,
            &[rxq, Ring::empty()],
            &Data::default(),
        );
        b.blob(&frame(600));
        b.0
    };
    vec![
        ("tx", tx),
        ("tx-split-header", tx_split),
        ("rx", rx),
        ("rx-mergeable", rx_mergeable),
    ]
}

fn console() -> Vec<(&'static str, Vec<u8>)> {
    let mut data = Data::default();
    data.put(BUF, b"hello from the guest\n");
    let txq = Ring::new(vec![(BUF, 21, 0, 0)], vec![0]);
    let rxq = Ring::new(
        vec![
            (BUF + 0x400, 8, WRITE | NEXT, 1),
            (BUF + 0x800, 64, WRITE, 0),
        ],
        vec![0],
    );
    let mut b = virtio_input(0, &[rxq, txq], &data);
    b.bytes(b"ls -l /\n");
    vec![("tx-and-rx", b.0)]
}

/// virtio-pci accesses: (configuration space?, write?, size, offset, value).
fn pci_ops(b: &mut InputBuilder, ops: &[(bool, bool, u8, u16, u64)]) {
    for &(cfg, write, size, offset, value) in ops {
        let log2 = size.trailing_zeros() as u8;
        b.u8(u8::from(write) | log2 << 1 | u8::from(cfg) << 3)
            .u16(offset)
            .u64(value);
    }
}

/// The guest memory of a transport target driving a console: its two queues' rings at q0
/// and q1, the transmit queue holding one chain ("hello\n"). Returns the builder with the
/// blob written, and where the queues go.
fn console_transport_input() -> (InputBuilder, u64, u64) {
    let (q0, q1) = (DATA_START, DATA_START + 0x1000);
    let mut data = Data::default();
    let mut desc = [0u8; 16];
    desc[..8].copy_from_slice(&(DATA_START + 0x3000).to_le_bytes());
    desc[8..12].copy_from_slice(&6u32.to_le_bytes());
    data.put(q1, &desc)
        .put(q1 + 0x400, &[0, 0, 1, 0, 0, 0])
        .put(DATA_START + 0x3000, b"hello\n");
    let mut b = InputBuilder::default();
    b.blob(&data.0);
    (b, q0, q1)
}

fn virtio_pci() -> Vec<(&'static str, Vec<u8>)> {
    // Linux's virtio_pci_modern probe: walk the capabilities, enable MSI-X and program its
    // three vectors, negotiate, set up both queues with their vectors, DRIVER_OK, notify.
    let (mut b, q0, q1) = console_transport_input();
    let mut ops = vec![
        (true, false, 4, 0x00, 0),
        (true, false, 1, 0x34, 0),
        (true, false, 4, 0x40, 0),
        (true, false, 4, 0x10, 0),
        // MSI-X enable (the capability after the five vendor ones, at 0x98).
        (true, false, 2, 0x9a, 0),
        (true, true, 2, 0x9a, 0x8000),
    ];
    for v in 0..3u16 {
        ops.extend([
            (false, true, 4, 0x4000 + 16 * v, 0xfee0_0000),
            (false, true, 4, 0x4008 + 16 * v, 0x40 + u64::from(v)),
            (false, true, 4, 0x400c + 16 * v, 0),
        ]);
    }
    ops.extend([
        (false, true, 1, 0x14, 0),
        (false, true, 1, 0x14, 1),
        (false, true, 1, 0x14, 3),
        (false, true, 4, 0x00, 1),
        (false, false, 4, 0x04, 0),
        (false, true, 4, 0x08, 1),
        (false, true, 4, 0x0c, 1),
        (false, true, 1, 0x14, 11),
        (false, true, 2, 0x10, 0),
    ]);
    for (sel, base) in [(0u64, q0), (1, q1)] {
        ops.extend([
            (false, true, 2, 0x16, sel),
            (false, false, 2, 0x18, 0),
            (false, true, 2, 0x18, 16),
            (false, true, 2, 0x1a, sel + 1),
            (false, true, 8, 0x20, base),
            (false, true, 8, 0x28, base + 0x400),
            (false, true, 4, 0x30, base + 0x800),
            (false, true, 4, 0x34, 0),
            (false, true, 2, 0x1c, 1),
            (false, false, 2, 0x1e, 0),
        ]);
    }
    ops.extend([
        (false, true, 1, 0x14, 15),
        (false, true, 2, 0x3004, 1),
        (false, false, 1, 0x1000, 0),
        (false, false, 8, 0x5000, 0),
        (false, false, 4, 0x2000, 0),
        (false, true, 1, 0x14, 0),
    ]);
    pci_ops(&mut b, &ops);
    vec![("probe-and-setup", b.0)]
}

/// virtio-mmio accesses: (write?, offset, value), all 32-bit.
fn mmio_ops(b: &mut InputBuilder, ops: &[(bool, u16, u64)]) {
    for &(write, offset, value) in ops {
        b.u8(u8::from(write) | 2 << 1).u16(offset).u64(value);
    }
}

fn mmio() -> Vec<(&'static str, Vec<u8>)> {
    // A driver's probe and setup of the console's two queues (virtio 1.x, 3.1.1), the
    // transmit queue holding one chain.
    let (mut b, q0, q1) = console_transport_input();
    let mut ops = vec![
        (false, 0x000, 0),
        (false, 0x004, 0),
        (false, 0x008, 0),
        (true, 0x070, 0),
        (true, 0x070, 1),
        (true, 0x070, 3),
        (true, 0x014, 1),
        (false, 0x010, 0),
        (true, 0x024, 1),
        (true, 0x020, 1),
        (true, 0x070, 11),
        (false, 0x070, 0),
    ];
    for (sel, base) in [(0u64, q0), (1, q1)] {
        ops.extend([
            (true, 0x030, sel),
            (false, 0x034, 0),
            (true, 0x038, 16),
            (true, 0x080, base),
            (true, 0x084, 0),
            (true, 0x090, base + 0x400),
            (true, 0x094, 0),
            (true, 0x0a0, base + 0x800),
            (true, 0x0a4, 0),
            (true, 0x044, 1),
        ]);
    }
    ops.extend([
        (true, 0x070, 15),
        (true, 0x050, 1),
        (false, 0x060, 0),
        (true, 0x064, 1),
        (false, 0x100, 0),
        (false, 0x0fc, 0),
        (true, 0x070, 0),
    ]);
    mmio_ops(&mut b, &ops);
    let handshake = b.0.clone();
    // The same with odd sizes and offsets sprinkled in.
    b.u8(0)
        .u16(0x002)
        .u64(0)
        .u8(3)
        .u16(0x071)
        .u64(0xff)
        .u8(7)
        .u16(0x104)
        .u64(1);
    vec![("handshake", handshake), ("odd-accesses", b.0)]
}

/// IDE accesses: `op` for a command-block register, read or write, `size` bytes.
fn ide_op(reg: u64, write: bool, size: usize) -> u8 {
    let size_bits = match size {
        1 => 0,
        2 => 1,
        _ => 2,
    };
    (reg as u8) << 3 | size_bits << 1 | u8::from(write)
}

struct Ide(InputBuilder);

impl Ide {
    fn new(flags: u8) -> Self {
        let mut b = InputBuilder::default();
        b.u8(flags);
        Self(b)
    }
    fn w(&mut self, reg: u64, v: u8) -> &mut Self {
        self.0.u8(ide_op(reg, true, 1)).u32(u32::from(v));
        self
    }
    fn r(&mut self, reg: u64) -> &mut Self {
        self.0.u8(ide_op(reg, false, 1)).u32(0);
        self
    }
    /// Reads or writes `bytes` through the data register, `width` bytes at a time.
    fn data(&mut self, write: bool, bytes: usize, width: usize) -> &mut Self {
        for i in 0..bytes / width {
            self.0
                .u8(ide_op(0, write, width))
                .u32((i as u32).wrapping_mul(0x0101_0101));
        }
        self
    }
    /// LBA28 task file and a command.
    fn cmd28(&mut self, lba: u32, count: u8, cmd: u8) -> &mut Self {
        self.w(2, count)
            .w(3, lba as u8)
            .w(4, (lba >> 8) as u8)
            .w(5, (lba >> 16) as u8)
            .w(6, 0xe0 | (lba >> 24) as u8 & 0xf)
            .w(7, cmd)
    }
    /// LBA48 task file (high bytes first) and a command.
    fn cmd48(&mut self, lba: u64, count: u16, cmd: u8) -> &mut Self {
        self.w(2, (count >> 8) as u8)
            .w(3, (lba >> 24) as u8)
            .w(4, (lba >> 32) as u8)
            .w(5, (lba >> 40) as u8)
            .w(2, count as u8)
            .w(3, lba as u8)
            .w(4, (lba >> 8) as u8)
            .w(5, (lba >> 16) as u8)
            .w(6, 0x40)
            .w(7, cmd)
    }
    fn control(&mut self, v: u8) -> &mut Self {
        self.0.u8(0x41).u32(u32::from(v));
        self
    }
}

fn ide() -> Vec<(&'static str, Vec<u8>)> {
    let identify = {
        let mut s = Ide::new(0);
        s.w(6, 0xa0).w(7, 0xec).r(7).data(false, 512, 2).r(7);
        s.0 .0
    };
    let read = {
        let mut s = Ide::new(0);
        s.cmd28(1, 2, 0x20)
            .r(7)
            .data(false, 512, 2)
            .r(7)
            .data(false, 512, 4)
            .r(7);
        s.0 .0
    };
    let write = {
        let mut s = Ide::new(0);
        s.cmd28(3, 1, 0x30)
            .r(7)
            .data(true, 512, 2)
            .r(7)
            .cmd28(0, 0, 0xe7)
            .r(7);
        s.0 .0
    };
    let lba48 = {
        let mut s = Ide::new(2);
        // SET MULTIPLE 2, READ MULTIPLE EXT of 4 sectors, WRITE SECTORS EXT on the slave.
        s.w(6, 0xe0)
            .w(2, 2)
            .w(7, 0xc6)
            .cmd48(8, 4, 0x29)
            .data(false, 2048, 4)
            .r(7)
            .w(6, 0x50)
            .cmd48(60, 1, 0x34)
            .data(true, 512, 4)
            .r(7)
            .w(6, 0x50)
            .w(7, 0xea)
            .r(7);
        s.0 .0
    };
    let reset = {
        let mut s = Ide::new(1);
        s.cmd28(1, 1, 0x20)
            .control(0x04)
            .control(0x00)
            .r(1)
            .r(2)
            .r(3)
            .r(4)
            .r(5)
            .cmd28(2, 1, 0x30)
            .data(true, 512, 2)
            .r(1)
            .r(7)
            .control(0x80)
            .r(2);
        s.0 .0
    };
    vec![
        ("identify", identify),
        ("read-sectors", read),
        ("write-sectors-flush", write),
        ("lba48-multiple-slave", lba48),
        ("soft-reset-readonly", reset),
    ]
}

/// NE2000 accesses.
struct Nic(InputBuilder);

impl Nic {
    fn w(&mut self, reg: u8, v: u8) -> &mut Self {
        self.0.u8(1).u8(reg).u32(u32::from(v));
        self
    }
    fn r(&mut self, reg: u8) -> &mut Self {
        self.0.u8(0).u8(reg).u32(0);
        self
    }
    /// Word accesses to the data port (remote DMA).
    fn data(&mut self, write: bool, bytes: usize) -> &mut Self {
        for i in 0..bytes / 2 {
            self.0.u8(2 | u8::from(write)).u8(0x10).u32(i as u32);
        }
        self
    }
    fn receive(&mut self, frame: &[u8]) -> &mut Self {
        self.0.u8(8).blob(frame);
        self
    }
    /// Remote DMA set-up: start address, byte count, then read (0x0a) or write (0x12).
    fn dma(&mut self, addr: u16, count: u16, cr: u8) -> &mut Self {
        self.w(8, addr as u8)
            .w(9, (addr >> 8) as u8)
            .w(10, count as u8)
            .w(11, (count >> 8) as u8)
            .w(0, cr)
    }
}

/// What ne2k-pci does to bring the card up (ne2k_pci_init, NS8390_init, ne2k_pci_open).
fn ne2k_init() -> Nic {
    let mut n = Nic(InputBuilder::default());
    n.r(0x1f).r(7).w(7, 0xff);
    n.w(0, 0x21)
        .w(14, 0x49)
        .w(10, 0)
        .w(11, 0)
        .w(13, 0x02)
        .w(12, 0x20);
    // The station PROM, read by remote DMA.
    n.dma(0, 32, 0x0a).data(false, 32).w(7, 0x40);
    n.w(4, 0x40)
        .w(1, 0x46)
        .w(3, 0x46)
        .w(2, 0x80)
        .w(7, 0xff)
        .w(15, 0x3f);
    n.w(0, 0x61);
    for (i, b) in [0x52, 0x54, 0, 0x12, 0x34, 0x56].into_iter().enumerate() {
        n.w(1 + i as u8, b);
    }
    for i in 0..8 {
        n.w(8 + i, 0xff);
    }
    n.w(7, 0x47).w(0, 0x22).w(7, 0xff).w(13, 0).w(12, 0x04);
    n
}

fn ne2k() -> Vec<(&'static str, Vec<u8>)> {
    let init = ne2k_init().0 .0;
    let transmit = {
        let mut n = ne2k_init();
        n.dma(0x4000, 64, 0x12)
            .data(true, 64)
            .r(7)
            .w(7, 0x40)
            .w(4, 0x40)
            .w(5, 64)
            .w(6, 0)
            .w(0, 0x26)
            .r(7)
            .r(4)
            .w(7, 0x0a);
        n.0 .0
    };
    let receive = {
        let mut n = ne2k_init();
        let f = &frame(80)[12..];
        n.receive(f)
            .r(7)
            .w(7, 0x01)
            .w(0, 0x62)
            .r(7)
            .w(0, 0x22)
            .dma(0x4700, 4, 0x0a)
            .data(false, 4)
            .dma(0x4704, 80, 0x0a)
            .data(false, 80)
            .w(3, 0x47)
            .receive(&[0xff; 1514])
            .receive(&[0x01; 20]);
        n.0 .0
    };
    vec![
        ("init", init),
        ("init-transmit", transmit),
        ("init-receive", receive),
    ]
}

fn pci() -> Vec<(&'static str, Vec<u8>)> {
    let mut b = InputBuilder::default();
    let cfg = |b: &mut InputBuilder, slot: u32, func: u32, reg: u32, write: Option<u32>| {
        let addr = 0x8000_0000 | slot << 11 | func << 8 | reg;
        b.u8(1 | 2 << 1).u16(0).u32(addr);
        match write {
            Some(v) => b.u8(1 | 2 << 1).u16(4).u32(v),
            None => b.u8(2 << 1).u16(4).u32(0),
        };
    };
    // The kernel's probe: vendor/device and class of every function, then BAR sizing and
    // programming of the NIC, I/O decoding on, and an access through the window.
    for (slot, func) in [(0, 0), (1, 0), (1, 1), (2, 0), (3, 0)] {
        cfg(&mut b, slot, func, 0x00, None);
        cfg(&mut b, slot, func, 0x08, None);
        cfg(&mut b, slot, func, 0x0c, None);
    }
    cfg(&mut b, 2, 0, 0x10, Some(0xffff_ffff));
    cfg(&mut b, 2, 0, 0x10, None);
    cfg(&mut b, 2, 0, 0x10, Some(0xc101));
    cfg(&mut b, 2, 0, 0x04, Some(0x0001));
    cfg(&mut b, 2, 0, 0x3c, None);
    cfg(&mut b, 1, 1, 0x40, Some(0x8000_8000));
    b.u8(8 | 2).u16(0x11f).u32(0);
    b.u8(8).u16(0x107).u32(0);
    b.u8(8 | 1).u16(0x100).u32(0x21);
    // A byte access to CONFIG_DATA + 2 and a 2-byte one to CONFIG_ADDRESS.
    b.u8(0).u16(6).u32(0);
    b.u8(2 | 1).u16(0).u32(0xffff);
    vec![("probe-and-program", b.0)]
}

/// e1000 accesses (see `emulated::e1000` for the format).
struct Nic1000(InputBuilder);

impl Nic1000 {
    fn w(&mut self, off: u32, v: u32) -> &mut Self {
        self.0.u8(0x24).u32(off).u64(u64::from(v));
        self
    }
    fn r(&mut self, off: u32) -> &mut Self {
        self.0.u8(0x20).u32(off).u64(0);
        self
    }
    /// IOADDR/IODATA, as e1000_reset_hw issues the reset.
    fn io_w(&mut self, off: u32, v: u32) -> &mut Self {
        self.0.u8(0x2c).u32(0).u64(u64::from(off));
        self.0.u8(0x2c).u32(4).u64(u64::from(v));
        self
    }
    fn mem(&mut self, addr: u32, bytes: &[u8]) -> &mut Self {
        self.0.u8(3).u32(addr).blob(bytes);
        self
    }
    fn receive(&mut self, hdr: [u8; 10], frame: &[u8]) -> &mut Self {
        self.0.u8(1).bytes(&hdr).blob(frame);
        self
    }
    fn time(&mut self, us: u16) -> &mut Self {
        self.0.u8(2).u16(us);
        self
    }
}

/// An Ethernet + IPv4 + TCP frame (checksums left for the offloads) with `payload` bytes.
fn tcp_frame(payload: usize) -> Vec<u8> {
    let mut f = vec![0u8; 54 + payload];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f[6..12].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&((40 + payload) as u16).to_be_bytes());
    f[22] = 64;
    f[23] = 6;
    f[26..30].copy_from_slice(&[10, 0, 0, 2]);
    f[30..34].copy_from_slice(&[10, 0, 0, 1]);
    f[46] = 5 << 4;
    f[47] = 0x10;
    f
}

/// A 16-byte descriptor: `lo` (address or context fields) and `hi` (length, type, command,
/// status...).
fn desc16(lo: u64, hi: u64) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[..8].copy_from_slice(&lo.to_le_bytes());
    d[8..].copy_from_slice(&hi.to_le_bytes());
    d
}

/// What e1000 probe and open do: reset, EEPROM reads, the PHY, the rings, interrupts on.
fn e1000_init() -> Nic1000 {
    let mut n = Nic1000(InputBuilder::default());
    n.w(0xd8, 0xffff_ffff)
        .w(0x100, 0)
        .w(0x400, 8)
        .r(8)
        .io_w(0, 1 << 26)
        .r(0xc0);
    // One EEPROM word bit-banged: REQ, CS, opcode 110 and address 0, 16 clocks.
    n.w(0x10, 0x40).w(0x10, 0x42);
    for bit in [1, 1, 0, 0, 0, 0, 0, 0, 0] {
        let di = bit << 2;
        n.w(0x10, 0x42 | di).w(0x10, 0x43 | di).w(0x10, 0x42 | di);
    }
    for _ in 0..16 {
        n.w(0x10, 0x43).r(0x10).w(0x10, 0x42);
    }
    n.w(0x10, 0).w(0x14, 0x0d01).r(0x14);
    // MDIC: PHY id and status.
    n.w(0x20, 2 << 16 | 1 << 21 | 2 << 26).r(0x20);
    n.w(0x20, 1 << 16 | 1 << 21 | 2 << 26).r(0x20);
    // Receive ring: 8 descriptors at 0x1000, buffers at 0x10000 + 0x800 * i.
    let mut ring = Vec::new();
    for i in 0..8u64 {
        ring.extend_from_slice(&desc16(0x10000 + 0x800 * i, 0));
    }
    n.mem(0x1000, &ring);
    n.w(0x2800, 0x1000)
        .w(0x2804, 0)
        .w(0x2808, 128)
        .w(0x2810, 0)
        .w(0x2818, 7);
    n.w(0x5000, 3 << 8).w(0x2820, 0).w(0x282c, 8).w(0xc4, 195);
    n.w(0x100, 1 << 1 | 1 << 15);
    // Transmit ring: 8 descriptors at 0x2000; TIDV 8, TADV 32.
    n.w(0x3800, 0x2000)
        .w(0x3804, 0)
        .w(0x3808, 128)
        .w(0x3810, 0)
        .w(0x3818, 0);
    n.w(0x3820, 8).w(0x382c, 32).w(0x400, 1 << 1 | 1 << 3);
    n.w(0xd0, 0x9d).w(0xc8, 0x4);
    n
}

fn e1000() -> Vec<(&'static str, Vec<u8>)> {
    let init = e1000_init().0 .0;
    let receive = {
        let mut n = e1000_init();
        let mut bcast = vec![0xff; 6];
        bcast.extend_from_slice(&[2, 0, 0, 0, 0, 1, 0x08, 0x06]);
        bcast.resize(42, 0);
        let mut tcp = tcp_frame(100);
        tcp[..6].copy_from_slice(&[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        // A partial checksum the host left (NEEDS_CSUM at 34 + 16).
        let partial = [1, 0, 0, 0, 0, 0, 34, 0, 16, 0];
        n.receive([0; 10], &bcast)
            .receive(partial, &tcp)
            .r(0xc0)
            .w(0x2818, 1)
            .time(300)
            .r(0x4074)
            .r(0x4088)
            .r(0x408c);
        n.0 .0
    };
    let transmit = {
        let mut n = e1000_init();
        let frame = tcp_frame(3000);
        n.mem(0x20000, &frame);
        // Legacy descriptor: 60 bytes, EOP | IFCS | RS.
        let legacy = desc16(0x20000, 60 | 0x0b << 24);
        // Checksum context (TUCSS 34, TUCSO 50), then a data descriptor with TXSM.
        let csum_ctx = desc16(34 << 32 | 50 << 40, 0x21 << 24);
        let data = desc16(0x20000, 1000 | 1 << 20 | 0x2b << 24 | 2 << 40);
        // TSO context: IPCSS 14, IPCSO 24, IPCSE 33, TUCSS 34, TUCSO 50, PAYLEN, TCP|IP|TSE,
        // HDRLEN 54, MSS 1448; then the frame in two data descriptors with TSE.
        let tso_ctx = desc16(
            14 | 24 << 8 | 33 << 16 | 34 << 32 | 50 << 40,
            3000 | 0x27 << 24 | 54 << 40 | 1448 << 48,
        );
        let head = desc16(0x20000, 54 | 1 << 20 | 0x24 << 24 | 3 << 40);
        let tail = desc16(0x20000 + 54, 3000 | 1 << 20 | 0xad << 24);
        let mut ring = Vec::new();
        for d in [legacy, csum_ctx, data, tso_ctx, head, tail] {
            ring.extend_from_slice(&d);
        }
        n.mem(0x2000, &ring)
            .w(0x3818, 1)
            .w(0x3818, 3)
            .w(0x3818, 6)
            .time(50)
            .r(0xc0);
        n.r(0x4080).r(0x40f8).r(0x3810);
        n.0 .0
    };
    vec![
        ("init", init),
        ("init-receive", receive),
        ("init-transmit-offloads", transmit),
    ]
}

/// IDE bus master accesses (see `emulated::bmdma` for the format).
struct Bm(InputBuilder);

impl Bm {
    fn tf(&mut self, reg: u8, v: u8) -> &mut Self {
        self.0.u8(reg << 3).u8(v);
        self
    }
    fn status(&mut self) -> &mut Self {
        self.0.u8(1 | 7 << 3);
        self
    }
    fn bm_w(&mut self, off: u8, v: u32, dword: bool) -> &mut Self {
        self.0
            .u8(4 | off << 3 | if dword { 0x40 } else { 0 })
            .u32(v);
        self
    }
    fn bm_r(&mut self, off: u8) -> &mut Self {
        self.0.u8(5 | off << 3);
        self
    }
    fn control(&mut self, v: u8) -> &mut Self {
        self.0.u8(3).u8(v);
        self
    }
    fn prd(&mut self, at: u32, entries: &[(u32, u32)]) -> &mut Self {
        let mut b = Vec::new();
        for &(addr, flags) in entries {
            b.extend_from_slice(&addr.to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
        }
        self.0.u8(6).u32(at).blob(&b);
        self
    }
    /// What libata does for one DMA command: table, direction, status cleared, task file,
    /// command, start; then the interrupt handler's status reads and the stop.
    fn command(&mut self, table: u32, to_memory: bool, lba: u8, count: u8, cmd: u8) -> &mut Self {
        let dir = if to_memory { 8 } else { 0 };
        self.bm_w(4, table, true)
            .bm_w(0, dir, false)
            .bm_w(2, 6, false)
            .tf(2, count)
            .tf(3, lba)
            .tf(4, 0)
            .tf(5, 0)
            .tf(6, 0xe0)
            .tf(7, cmd)
            .bm_w(0, dir | 1, false)
            .bm_r(2)
            .bm_w(0, dir, false)
            .status()
            .bm_w(2, 6, false)
    }
}

fn bmdma() -> Vec<(&'static str, Vec<u8>)> {
    const EOT: u32 = 1 << 31;
    let read_write = {
        let mut b = Bm(InputBuilder::default());
        b.0.u8(0);
        b.prd(0x1000, &[(0x10000, 0x400), (0x20000, 0x400 | EOT)])
            .command(0x1000, true, 2, 4, 0xc8)
            .prd(0x1100, &[(0x30000, EOT)])
            .command(0x1100, false, 8, 16, 0xca)
            .tf(1, 3)
            .tf(2, 0x22)
            .tf(7, 0xef)
            .status();
        b.0 .0
    };
    let errors = {
        let mut b = Bm(InputBuilder::default());
        b.0.u8(0);
        // A region crossing 64 KiB, one outside memory, an early EOT, a missing one.
        b.prd(0x1000, &[(0x1_ff00, 0x200 | EOT)])
            .command(0x1000, true, 0, 1, 0xc8)
            .prd(0x1000, &[(0x30_0000, 0x200 | EOT)])
            .command(0x1000, true, 0, 1, 0xc8)
            .prd(0x1000, &[(0x10000, 0x200 | EOT)])
            .command(0x1000, true, 0, 2, 0xc8)
            .control(0x04)
            .control(0)
            .prd(0x1000, &[(0x10000, 0x200), (0x10200, 0x200)])
            .command(0x1000, false, 4, 1, 0x35);
        b.0 .0
    };
    vec![("read-write-dma", read_write), ("prd-errors", errors)]
}

fn kernel() -> Vec<(&'static str, Vec<u8>)> {
    let code = [0xf4u8; 64];
    vec![
        ("elf", make_elf(0x10_0000, &code, 0x2000, None)),
        (
            "elf-pvh",
            make_elf(0x10_0000, &code, 0x1000, Some(0x10_0000)),
        ),
        ("bzimage", make_bzimage(0x020f, 1, &[0x90; 256], 0x4000)),
    ]
}

/// Writes every target's seeds to `dir/<target>/seed-<name>` (the committed corpus).
pub fn write_all(dir: &std::path::Path) -> std::io::Result<usize> {
    let mut n = 0;
    for t in super::TARGETS {
        let d = dir.join(t.name);
        std::fs::create_dir_all(&d)?;
        for (name, data) in for_target(t.name) {
            std::fs::write(d.join(format!("seed-{name}")), data)?;
            n += 1;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::runner::corpus_dir;
    use crate::fuzz::virtio::MEM_SIZE;

    #[test]
    fn seeds_fit_guest_memory() {
        for name in [
            "virtio_block",
            "virtio_net",
            "virtio_console",
            "virtio_mmio",
            "virtio_pci",
        ] {
            for (seed, data) in for_target(name) {
                assert!(
                    data.len() < (MEM_SIZE - DATA_START) as usize,
                    "{name}/{seed}"
                );
            }
        }
    }

    /// `scripts/fuzz --write-seeds` regenerates the files after a change here.
    #[test]
    fn committed_corpus_holds_every_seed() {
        for t in crate::fuzz::TARGETS {
            for (name, data) in for_target(t.name) {
                let path = corpus_dir(t.name).join(format!("seed-{name}"));
                let committed = std::fs::read(&path).unwrap_or_default();
                assert!(
                    committed == data,
                    "{} differs from the generated seed: run scripts/fuzz --write-seeds",
                    path.display()
                );
            }
        }
    }

    /// Writes the seed files; run by `scripts/fuzz --write-seeds`.
    #[test]
    #[ignore = "writes fuzz/corpus: run by scripts/fuzz --write-seeds"]
    fn write_seeds() {
        let dir = corpus_dir("");
        let n = write_all(&dir).unwrap();
        eprintln!("fuzz: wrote {n} seeds under {}", dir.display());
    }
}
