//! Transmit (8254x SDM 3.3): descriptors from TDH up to TDT, processed when the driver
//! writes TDT (the chip fetches them as soon as the tail moves; here that is synchronous, on
//! the vCPU that wrote it). Three descriptor kinds:
//!
//! - legacy (DEXT = 0): a buffer, with an optional checksum to insert (IC, CSO, CSS);
//! - context (DEXT = 1, DTYP = 0): the offload parameters for the packets that follow,
//!   one set for segmentation (TSE) and one for checksums;
//! - data (DEXT = 1, DTYP = 1): a buffer, the first of a packet saying which offloads
//!   apply (POPTS.IXSM, POPTS.TXSM, DCMD.TSE).
//!
//! A packet is the buffers up to the descriptor with EOP. Descriptors with RS get DD written
//! back into their status byte, inside the ring. A buffer outside guest memory, or a packet
//! longer than the chip takes, drops that packet (counted), its descriptors still completing
//! so the driver can reclaim them; a ring outside guest memory is not fetched at all.

use super::offload::{self, Segmented, TxContext, TUCMD_TSE};
use super::rx::Ring;
use super::*;
use crate::devices::emulated::dma;
use crate::devices::virtio::guest_write::ChainWrites;

/// Longest packet: a TSO frame of 64 KiB payload after up to 255 bytes of headers.
pub(super) const MAX_PACKET: usize = 0x1_0000 + 0x100;
const MIN_FRAME: u64 = 60;
/// Destination, source and type: the least a frame must hold.
const ETH_HEADER: usize = 14;
const FCS_LEN: u64 = 4;

// Command bits, the same in a legacy CMD, a data DCMD and a context TUCMD byte.
const CMD_EOP: u8 = 1 << 0;
const CMD_IC: u8 = 1 << 2;
const CMD_TSE: u8 = 1 << 2;
const CMD_RS: u8 = 1 << 3;
const CMD_DEXT: u8 = 1 << 5;
const CMD_VLE: u8 = 1 << 6;
const CMD_IDE: u8 = 1 << 7;
const POPTS_IXSM: u8 = 1 << 0;
const POPTS_TXSM: u8 = 1 << 1;
const STA_DD: u8 = 1 << 0;
const DTYP_CONTEXT: u8 = 0;
const DTYP_DATA: u8 = 1;

/// The packet being gathered.
#[derive(Default, Clone, serde::Serialize, serde::Deserialize)]
struct Packet {
    buf: Vec<u8>,
    /// A descriptor of this packet was taken.
    started: bool,
    /// Dropped at EOP: a buffer was outside guest memory, or the packet too long.
    bad: bool,
    /// From the first descriptor: legacy or extended, and the offloads asked for.
    legacy: bool,
    popts: u8,
    tse: bool,
}

/// Transmit state that outlives a packet: the contexts, and the packet in progress.
#[derive(Default, Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct TxState {
    tso: TxContext,
    csum: TxContext,
    packet: Packet,
}

impl TxState {
    /// A restored state is one this model could have reached: a packet no longer than
    /// the largest it assembles.
    pub(super) fn check(&self) -> Result<(), String> {
        if self.packet.buf.len() > MAX_PACKET {
            return Err(format!(
                "a transmit packet of {} bytes in progress (at most {MAX_PACKET})",
                self.packet.buf.len()
            ));
        }
        Ok(())
    }
}

impl E1000 {
    fn tx_ring(&self) -> Option<Ring> {
        Ring::new(
            &self.mem,
            self.plain_reg(TDBAL),
            self.plain_reg(TDBAH),
            self.tdlen,
            self.tdh,
            self.tdt,
        )
    }

    /// Processes the descriptors the driver handed over (TDH up to TDT).
    pub(super) fn process_tx(&mut self) {
        if self.tctl & TCTL_EN == 0 || self.tdh == self.tdt {
            return;
        }
        let Some(ring) = self.tx_ring() else {
            let regs = [TDBAL, TDBAH].map(|r| self.plain_reg(r));
            let what = (self.tdlen, self.tdh, self.tdt);
            Ring::warn_unusable(
                &mut self.warned.tx_ring,
                "transmit",
                regs,
                what,
                "nothing is sent",
            );
            return;
        };
        let mut causes = 0;
        // At most one lap: TDT only moves on the driver's writes.
        while self.tdh != self.tdt {
            let addr = ring.desc(self.tdh);
            let mut d = [0u8; 16];
            if !dma::read(&self.mem, addr, &mut d) {
                break;
            }
            causes |= self.tx_descriptor(&d, addr, &ring);
            self.tdh = (self.tdh + 1) % ring.count;
        }
        // The queue is empty once the head caught up with the tail.
        causes |= ICR_TXQE;
        self.set_cause(causes);
    }

    /// One descriptor at `addr`; returns the interrupt causes it raises now.
    fn tx_descriptor(&mut self, d: &[u8; 16], addr: u64, ring: &Ring) -> u32 {
        let cmd = d[11];
        let dtyp = d[10] >> 4;
        if cmd & CMD_DEXT != 0 && dtyp == DTYP_CONTEXT {
            let ctx = TxContext::parse(d);
            if ctx.tucmd & TUCMD_TSE != 0 {
                self.tx.tso = ctx;
            } else {
                self.tx.csum = ctx;
            }
            return self.tx_write_back(d, addr, cmd, ring);
        }
        let (buf, len, special) = match (cmd & CMD_DEXT != 0, dtyp) {
            // Legacy: length in bytes 8-9.
            (false, _) => (
                u64::from_le_bytes(d[..8].try_into().unwrap()),
                usize::from(u16::from_le_bytes([d[8], d[9]])),
                u16::from_le_bytes([d[14], d[15]]),
            ),
            // Data: a 20-bit length.
            (true, DTYP_DATA) => (
                u64::from_le_bytes(d[..8].try_into().unwrap()),
                (u32::from_le_bytes([d[8], d[9], d[10], 0]) & 0xf_ffff) as usize,
                u16::from_le_bytes([d[14], d[15]]),
            ),
            (true, other) => {
                debug!("e1000: transmit descriptor type {other} skipped");
                return self.tx_write_back(d, addr, cmd, ring);
            }
        };
        let p = &mut self.tx.packet;
        if !p.started {
            p.started = true;
            p.legacy = cmd & CMD_DEXT == 0;
            p.popts = if p.legacy { 0 } else { d[13] };
            p.tse = !p.legacy && cmd & CMD_TSE != 0;
        }
        if !p.bad && len > 0 {
            let start = p.buf.len();
            if start + len > MAX_PACKET {
                p.bad = true;
            } else {
                p.buf.resize(start + len, 0);
                if !dma::read(&self.mem, buf, &mut p.buf[start..]) {
                    p.bad = true;
                    if !self.warned.tx_buffer {
                        self.warned.tx_buffer = true;
                        warn!("e1000: a transmit buffer at {buf:#x}+{len:#x} is outside guest memory; its packet is dropped");
                    }
                }
            }
        }
        if cmd & CMD_EOP != 0 {
            // Legacy checksum fields and the VLAN tag come with the last descriptor.
            let legacy_csum = (cmd & CMD_IC != 0 && self.tx.packet.legacy)
                .then_some((usize::from(d[13]), usize::from(d[10])));
            let vlan = (cmd & CMD_VLE != 0 && self.ctrl & CTRL_VME != 0).then_some(special);
            self.send_packet(legacy_csum, vlan);
        }
        self.tx_write_back(d, addr, cmd, ring)
    }

    /// Reports a descriptor done (DD) if the driver asked (RS); returns TXDW when it is due
    /// now rather than after TIDV.
    fn tx_write_back(&mut self, d: &[u8; 16], addr: u64, cmd: u8, ring: &Ring) -> u32 {
        if cmd & CMD_RS == 0 {
            return 0;
        }
        // The status byte of this descriptor, which lies in the ring (checked).
        let allowed = ChainWrites::buffers(&[(ring.base, ring.len())]);
        dma::write(
            &self.writer.chain(&allowed),
            addr + 12,
            &[(d[12] & 0xf0) | STA_DD],
        );
        let now = self.timer.now();
        if self
            .moderation
            .tx_done(now, cmd & CMD_IDE != 0, self.tidv, self.tadv)
        {
            ICR_TXDW
        } else {
            0
        }
    }

    /// The packet is complete: offloads, then out to the host.
    fn send_packet(&mut self, legacy_csum: Option<(usize, usize)>, vlan: Option<u16>) {
        let mut p = std::mem::take(&mut self.tx.packet);
        let result = if p.bad || p.buf.is_empty() {
            Err(None)
        } else if p.tse {
            let r = offload::segmentation(&mut p.buf, &self.tx.tso);
            match r {
                Ok(_) => self.count(TSCTC, 1),
                Err(_) => self.count(TSCTFC, 1),
            }
            r.map_err(Some)
        } else if !p.legacy {
            offload::checksums(
                &mut p.buf,
                &self.tx.csum,
                p.popts & POPTS_IXSM != 0,
                p.popts & POPTS_TXSM != 0,
            )
            .map(|hdr| one_segment(hdr, p.buf.len()))
            .map_err(Some)
        } else if let Some((css, cso)) = legacy_csum {
            offload::partial_or_inline(&mut p.buf, css, 0, cso)
                .map(|hdr| one_segment(hdr, p.buf.len()))
                .map_err(Some)
        } else {
            Ok(one_segment(VnetHdr::default(), p.buf.len()))
        };
        match result {
            Ok(mut seg) => {
                if let Some(tci) = vlan {
                    self.insert_vlan(&mut p.buf, &mut seg, tci);
                }
                self.transmit(&mut p.buf, seg);
            }
            Err(reason) => {
                if let (Some(e), false) = (reason, self.warned.tx_offload) {
                    self.warned.tx_offload = true;
                    warn!("e1000: a packet's offload context does not fit it ({e:?}); dropped");
                }
                if p.started && (p.bad || reason.is_some()) {
                    self.counters.tx_errors += 1;
                }
            }
        }
        // Keep the buffer's allocation for the next packet.
        p.buf.clear();
        self.tx.packet = Packet {
            buf: p.buf,
            ..Packet::default()
        };
    }

    /// VLAN insertion (CTRL.VME with VLE): the tag goes after the addresses.
    fn insert_vlan(&self, frame: &mut Vec<u8>, seg: &mut Segmented, tci: u16) {
        if frame.len() < 12 {
            return;
        }
        let vet = (self.plain_reg(VET) & 0xffff) as u16;
        let mut tag = [0u8; 4];
        tag[..2].copy_from_slice(&vet.to_be_bytes());
        tag[2..].copy_from_slice(&tci.to_be_bytes());
        frame.splice(12..12, tag);
        if seg.hdr.flags != 0 {
            seg.hdr.csum_start += 4;
        }
        if seg.hdr.hdr_len != 0 {
            seg.hdr.hdr_len += 4;
        }
        seg.wire_bytes += 4 * u64::from(seg.segments);
    }

    fn transmit(&mut self, frame: &mut Vec<u8>, seg: Segmented) {
        // TCTL.PSP: the chip pads short packets to the Ethernet minimum (zeros add nothing
        // to a checksum the host may still complete). Without it, or below an Ethernet
        // header even so, there is no frame to send.
        if frame.len() < MIN_FRAME as usize && self.tctl & TCTL_PSP != 0 {
            frame.resize(MIN_FRAME as usize, 0);
        }
        if frame.len() < ETH_HEADER {
            self.counters.tx_errors += 1;
            return;
        }
        match self.sink.send(&seg.hdr, frame) {
            Ok(()) => {
                let segs = seg.segments;
                self.count(GPTC, segs);
                self.count(TPT, segs);
                let wire =
                    seg.wire_bytes.max(MIN_FRAME * u64::from(segs)) + FCS_LEN * u64::from(segs);
                self.count64(GOTCL, wire);
                self.count64(TOTL, wire);
                let per = wire / u64::from(segs.max(1));
                for _ in 0..segs.min(64) {
                    self.count_size(PTC64, per);
                }
                if frame[..6] == [0xff; 6] {
                    self.count(BPTC, 1);
                } else if frame[0] & 1 != 0 {
                    self.count(MPTC, 1);
                }
                self.counters.tx_frames += 1;
                self.counters.tx_bytes += frame.len() as u64;
                self.metrics.add_bytes_from_guest(frame.len() as u64);
            }
            Err(e) => {
                // A deleted TAP fails every frame and says so itself; once is enough here.
                if !self.warned.tx_send {
                    self.warned.tx_send = true;
                    warn!("e1000: sending a frame failed: {e} (later failures are counted, not logged)");
                }
                self.counters.tx_errors += 1;
            }
        }
    }
}

/// A frame that goes out as it is: one segment of its own length.
fn one_segment(hdr: VnetHdr, len: usize) -> Segmented {
    Segmented {
        hdr,
        segments: 1,
        wire_bytes: len as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::super::offload::tests::{as_the_driver_leaves_it, tcp4_frame, tso_ctx};
    use super::super::offload::{TUCMD_IP, TUCMD_TCP};
    use super::super::tests::{H, MEM_SIZE};
    use super::*;
    use crate::devices::emulated::nic_tap::{VNET_F_NEEDS_CSUM, VNET_GSO_TCPV4};
    use vm_memory::{Bytes, GuestAddress};

    const RING: u64 = 0x2000;
    const BUFS: u64 = 0x20000;
    const N: u32 = 8;

    fn setup(h: &mut H) {
        h.w(TDBAL, RING as u32);
        h.w(TDBAH, 0);
        h.w(TDLEN, N * 16);
        h.w(TDH, 0);
        h.w(TDT, 0);
        h.w(TCTL, TCTL_EN);
        h.w(IMS, ICR_TXDW);
    }

    fn legacy(h: &H, i: u32, buf: u64, len: u16, cmd: u8) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&buf.to_le_bytes());
        d[8..10].copy_from_slice(&len.to_le_bytes());
        d[11] = cmd;
        h.mem
            .write_slice(&d, GuestAddress(RING + 16 * u64::from(i)))
            .unwrap();
    }

    fn data(h: &H, i: u32, buf: u64, len: u32, dcmd: u8, popts: u8) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&buf.to_le_bytes());
        d[8..12].copy_from_slice(&(len | u32::from(DTYP_DATA) << 20).to_le_bytes());
        d[11] = dcmd | CMD_DEXT;
        d[13] = popts;
        h.mem
            .write_slice(&d, GuestAddress(RING + 16 * u64::from(i)))
            .unwrap();
    }

    fn context(h: &H, i: u32, c: &TxContext) {
        let mut d = [0u8; 16];
        d[0] = c.ipcss;
        d[1] = c.ipcso;
        d[2..4].copy_from_slice(&c.ipcse.to_le_bytes());
        d[4] = c.tucss;
        d[5] = c.tucso;
        d[6..8].copy_from_slice(&c.tucse.to_le_bytes());
        let dw = c.paylen | u32::from(c.tucmd | CMD_DEXT) << 24;
        d[8..12].copy_from_slice(&dw.to_le_bytes());
        d[13] = c.hdrlen;
        d[14..16].copy_from_slice(&c.mss.to_le_bytes());
        h.mem
            .write_slice(&d, GuestAddress(RING + 16 * u64::from(i)))
            .unwrap();
    }

    fn status(h: &H, i: u32) -> u8 {
        h.mem
            .read_obj(GuestAddress(RING + 16 * u64::from(i) + 12))
            .unwrap()
    }

    fn put(h: &H, at: u64, bytes: &[u8]) {
        h.mem.write_slice(bytes, GuestAddress(at)).unwrap();
    }

    #[test]
    fn a_legacy_frame_in_two_buffers_goes_out_and_dd_is_written_back() {
        let mut h = H::new();
        setup(&mut h);
        let f = tcp4_frame(100);
        put(&h, BUFS, &f[..60]);
        put(&h, BUFS + 0x1000, &f[60..]);
        legacy(&h, 0, BUFS, 60, 0);
        legacy(
            &h,
            1,
            BUFS + 0x1000,
            (f.len() - 60) as u16,
            CMD_EOP | CMD_RS,
        );
        h.w(TDT, 2);
        let sent = h.sent.lock().unwrap().clone();
        assert_eq!(sent, vec![(VnetHdr::default(), f.clone())]);
        assert_eq!(h.r(TDH), 2);
        assert_eq!(status(&h, 0), 0, "no RS, no write-back");
        assert_eq!(status(&h, 1), STA_DD);
        assert_eq!(h.irqs(), 1, "TXDW without IDE is immediate");
        assert_eq!(h.r(ICR), ICR_TXDW | ICR_TXQE);
        assert_eq!((h.r(GPTC), h.r(TPT)), (1, 1));
        assert_eq!(u64::from(h.r(GOTCL)), f.len() as u64 + 4);
        assert_eq!(h.nic.counters.tx_frames, 1);
    }

    #[test]
    fn the_ring_wraps_and_an_empty_ring_sends_nothing() {
        let mut h = H::new();
        setup(&mut h);
        h.w(TDH, 6);
        h.w(TDT, 6);
        assert!(h.sent.lock().unwrap().is_empty());
        let f = tcp4_frame(10);
        put(&h, BUFS, &f);
        for i in [6, 7, 0, 1] {
            legacy(&h, i, BUFS, f.len() as u16, CMD_EOP | CMD_RS);
        }
        h.w(TDT, 2);
        assert_eq!(h.sent.lock().unwrap().len(), 4);
        assert_eq!(h.r(TDH), 2);
        for i in [6, 7, 0, 1] {
            assert_eq!(status(&h, i), STA_DD);
        }
        // The transmitter off: TDT moves, nothing goes until TCTL.EN.
        h.w(TCTL, 0);
        legacy(&h, 2, BUFS, f.len() as u16, CMD_EOP);
        h.w(TDT, 3);
        assert_eq!(h.sent.lock().unwrap().len(), 4);
        h.w(TCTL, TCTL_EN);
        assert_eq!(h.sent.lock().unwrap().len(), 5);
    }

    #[test]
    fn buffers_and_rings_outside_guest_memory() {
        let mut h = H::new();
        setup(&mut h);
        let f = tcp4_frame(10);
        put(&h, BUFS, &f);
        // First buffer fine, second past the end of RAM: the packet is dropped, both
        // descriptors complete.
        legacy(&h, 0, BUFS, 20, CMD_RS);
        legacy(&h, 1, MEM_SIZE as u64 - 4, 16, CMD_EOP | CMD_RS);
        legacy(&h, 2, BUFS, f.len() as u16, CMD_EOP | CMD_RS);
        h.w(TDT, 3);
        let sent = h.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 1, "only the good packet");
        assert_eq!(sent[0].1, f);
        assert_eq!(
            (status(&h, 0), status(&h, 1), status(&h, 2)),
            (STA_DD, STA_DD, STA_DD)
        );
        assert_eq!(h.nic.counters.tx_errors, 1);
        // A ring running off the end of RAM is not fetched: nothing is written anywhere.
        h.w(TDBAL, (MEM_SIZE - 32) as u32);
        h.w(TDH, 0);
        h.w(TDT, 1);
        assert_eq!(h.sent.lock().unwrap().len(), 1);
        assert_eq!(h.r(TDH), 0);
        // TDT past the ring: not processed either.
        h.w(TDBAL, RING as u32);
        h.w(TDT, N + 3);
        assert_eq!(h.r(TDH), 0);
    }

    #[test]
    fn write_back_stays_inside_the_ring() {
        let mut h = H::new();
        setup(&mut h);
        let guard = [0xaau8; 16];
        put(&h, RING - 16, &guard);
        put(&h, RING + 16 * u64::from(N), &guard);
        let f = tcp4_frame(10);
        put(&h, BUFS, &f);
        for i in 0..N {
            legacy(&h, i, BUFS, f.len() as u16, CMD_EOP | CMD_RS);
        }
        h.w(TDT, N - 1);
        h.w(TDT, 0);
        h.w(TDT, N - 1);
        let mut b = [0u8; 16];
        h.mem.read_slice(&mut b, GuestAddress(RING - 16)).unwrap();
        assert_eq!(b, guard);
        h.mem
            .read_slice(&mut b, GuestAddress(RING + 16 * u64::from(N)))
            .unwrap();
        assert_eq!(b, guard);
        assert_eq!(h.sent.lock().unwrap().len(), 2 * N as usize - 1);
    }

    #[test]
    fn checksum_offload_becomes_a_partial_checksum_for_the_host() {
        let mut h = H::new();
        setup(&mut h);
        let f = tcp4_frame(500);
        put(&h, BUFS, &f);
        // What e1000_tx_csum writes: TUCSS 34, TUCSO 50, TUCSE 0, TCP.
        let ctx = TxContext {
            tucss: 34,
            tucso: 50,
            tucmd: TUCMD_TCP,
            ..TxContext::default()
        };
        context(&h, 0, &ctx);
        data(&h, 1, BUFS, f.len() as u32, CMD_EOP | CMD_RS, POPTS_TXSM);
        h.w(TDT, 2);
        let sent = h.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 1);
        let hdr = sent[0].0;
        assert_eq!(
            (hdr.flags, hdr.csum_start, hdr.csum_offset),
            (VNET_F_NEEDS_CSUM, 34, 16)
        );
        assert_eq!(sent[0].1, f);
    }

    #[test]
    fn tso_goes_to_the_host_as_one_gso_frame() {
        let mut h = H::new();
        setup(&mut h);
        let good = tcp4_frame(20_000);
        let mut f = good.clone();
        as_the_driver_leaves_it(&mut f);
        put(&h, BUFS, &f);
        let ctx = TxContext {
            paylen: 20_000,
            ..tso_ctx(1460)
        };
        context(&h, 0, &ctx);
        // The headers in their own buffer, the payload in 4 KiB pieces, as e1000_tx_map.
        data(&h, 1, BUFS, 54, CMD_TSE, POPTS_TXSM | POPTS_IXSM);
        let mut off = 54u64;
        let mut i = 2;
        while off < f.len() as u64 {
            let len = (f.len() as u64 - off).min(4096) as u32;
            let eop = off + u64::from(len) == f.len() as u64;
            let cmd = CMD_TSE | if eop { CMD_EOP | CMD_RS | CMD_IDE } else { 0 };
            data(&h, i, BUFS + off, len, cmd, 0);
            off += u64::from(len);
            i += 1;
        }
        h.w(TDT, i);
        let sent = h.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 1, "one write for the whole frame");
        let (hdr, frame) = &sent[0];
        assert_eq!(hdr.gso_type, VNET_GSO_TCPV4);
        assert_eq!((hdr.gso_size, hdr.hdr_len), (1460, 54));
        assert_eq!(
            &frame[14..34],
            &good[14..34],
            "IP header of the whole frame"
        );
        let segs = 20_000u32.div_ceil(1460);
        assert_eq!(h.r(GPTC), segs, "segments counted as the chip sends them");
        assert_eq!(h.r(TSCTC), 1);
        // TXDW waits for TIDV (IDE set on the last descriptor); TIDV is 0 here: at once.
        assert_eq!(h.r(ICR) & ICR_TXDW, ICR_TXDW);
    }

    #[test]
    fn tidv_and_tadv_delay_the_transmit_interrupt() {
        let mut h = H::new();
        setup(&mut h);
        h.w(TIDV, 8);
        h.w(TADV, 32);
        let f = tcp4_frame(10);
        put(&h, BUFS, &f);
        for i in 0..4 {
            legacy(&h, i, BUFS, f.len() as u16, CMD_EOP | CMD_RS | CMD_IDE);
        }
        h.w(TDT, 1);
        assert_eq!(h.irqs(), 0);
        assert_eq!(*h.clock.armed.lock().unwrap(), Some(8 * 1024));
        h.advance(6 * 1024);
        h.w(TDT, 2);
        assert_eq!(
            *h.clock.armed.lock().unwrap(),
            Some(14 * 1024),
            "TIDV restarts per descriptor"
        );
        h.fire_timer();
        assert_eq!(h.irqs(), 1);
        assert_eq!(h.r(ICR) & ICR_TXDW, ICR_TXDW);
    }

    #[test]
    fn oversized_packets_and_bad_contexts_are_dropped() {
        let mut h = H::new();
        setup(&mut h);
        // A packet of 5 x 16 KiB without EOP until the last: longer than any the chip sends.
        for i in 0..5 {
            let cmd = if i == 4 { CMD_EOP | CMD_RS } else { 0 };
            legacy(&h, i, BUFS, 0x4000, cmd);
        }
        h.w(TDT, 5);
        assert!(h.sent.lock().unwrap().is_empty());
        assert_eq!(status(&h, 4), STA_DD);
        assert_eq!(h.nic.counters.tx_errors, 1);
        // TSE with headers longer than the packet.
        let ctx = TxContext {
            tucmd: TUCMD_TCP | TUCMD_IP | TUCMD_TSE,
            hdrlen: 200,
            mss: 1000,
            ..TxContext::default()
        };
        context(&h, 5, &ctx);
        data(&h, 6, BUFS, 100, CMD_TSE | CMD_EOP, 0);
        h.w(TDT, 7);
        assert!(h.sent.lock().unwrap().is_empty());
        assert_eq!(h.r(TSCTFC), 1);
    }

    /// Found by fuzzing (regress-short-packet): a 2-byte packet panicked the statistics.
    #[test]
    fn short_packets_are_padded_with_psp_and_dropped_without() {
        let mut h = H::new();
        setup(&mut h);
        h.w(TCTL, TCTL_EN | TCTL_PSP);
        put(&h, BUFS, &[0xff, 0xff]);
        legacy(&h, 0, BUFS, 2, CMD_EOP | CMD_RS);
        h.w(TDT, 1);
        let sent = h.sent.lock().unwrap().clone();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].1.len(), 60);
        assert_eq!(&sent[0].1[..2], &[0xff, 0xff]);
        h.w(TCTL, TCTL_EN);
        legacy(&h, 1, BUFS, 2, CMD_EOP | CMD_RS);
        h.w(TDT, 2);
        assert_eq!(h.sent.lock().unwrap().len(), 1, "no PSP: not sent");
        assert_eq!(h.nic.counters.tx_errors, 1);
        assert_eq!(status(&h, 1), STA_DD, "the descriptor still completes");
    }

    #[test]
    fn vlan_tag_is_inserted_with_vme_and_vle() {
        let mut h = H::new();
        setup(&mut h);
        h.w(CTRL, CTRL_VME);
        let f = tcp4_frame(10);
        put(&h, BUFS, &f);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&BUFS.to_le_bytes());
        d[8..10].copy_from_slice(&(f.len() as u16).to_le_bytes());
        d[11] = CMD_EOP | CMD_VLE;
        d[14..16].copy_from_slice(&0x0064u16.to_le_bytes());
        put(&h, RING, &d);
        h.w(TDT, 1);
        let sent = h.sent.lock().unwrap().clone();
        assert_eq!(&sent[0].1[12..16], &[0x81, 0x00, 0x00, 0x64]);
        assert_eq!(&sent[0].1[16..], &f[12..]);
    }
}
