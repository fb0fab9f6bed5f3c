//! Receive (8254x SDM 3.2): the address filter, then the frame into the buffers of the
//! receive descriptor ring, legacy descriptors written back with length, checksum, status
//! and errors.
//!
//! The ring is RDLEN bytes of 16-byte descriptors at RDBA; hardware owns the descriptors
//! from RDH up to (not including) RDT, so RDH == RDT means none. A frame takes as many
//! descriptors as its length needs in buffers of RCTL.BSIZE bytes, EOP marking the last.
//! Where the chip would park a frame in its packet buffer while the ring is empty (and drop
//! it once that is full, counting RNBC and MPC), the model keeps it with the caller until
//! the driver writes RDT: nothing is lost and the guest is spared overrun recovery.

use super::offload::{self, fold, sum};
use super::*;
use crate::devices::emulated::dma;
use crate::devices::emulated::nic_tap::VNET_F_NEEDS_CSUM;
use crate::devices::virtio::guest_write::ChainWrites;

/// Bytes of a descriptor (both rings).
pub(super) const DESC_LEN: u64 = 16;
/// Longest frame (no FCS) without RCTL.LPE: 1514 bytes plus a VLAN tag.
const MAX_FRAME: usize = 1518;
/// Longest frame with RCTL.LPE (the 82540's jumbo limit).
const MAX_JUMBO: usize = 16128;
/// Frames are padded to the Ethernet minimum, as the sender's MAC would.
const MIN_FRAME: usize = 60;
const FCS_LEN: usize = 4;

const RXD_STAT_DD: u8 = 1 << 0;
const RXD_STAT_EOP: u8 = 1 << 1;
const RXD_STAT_VP: u8 = 1 << 3;
const RXD_ERR_RXE: u8 = 1 << 7;

/// A descriptor ring as programmed, if it is usable: inside guest memory, head and tail
/// inside it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ring {
    pub base: u64,
    pub count: u32,
}

impl Ring {
    pub fn new(
        mem: &GuestMemoryMmap,
        base_lo: u32,
        base_hi: u32,
        len: u32,
        head: u32,
        tail: u32,
    ) -> Option<Self> {
        let base = (u64::from(base_hi) << 32 | u64::from(base_lo)) & !0xf;
        let count = len / DESC_LEN as u32;
        (count > 0 && head < count && tail < count && dma::in_guest(mem, base, len as usize))
            .then_some(Self { base, count })
    }

    /// Says once (`warned`) that a ring as programmed (base registers, length, head, tail)
    /// cannot be used, and what follows.
    pub fn warn_unusable(
        warned: &mut bool,
        which: &str,
        base: [u32; 2],
        (len, head, tail): (u32, u32, u32),
        consequence: &str,
    ) {
        if !std::mem::replace(warned, true) {
            let base = u64::from(base[1]) << 32 | u64::from(base[0]);
            warn!(
                "e1000: {which} ring at {base:#x}+{len:#x} (head {head}, tail {tail}) is not usable; {consequence}"
            );
        }
    }

    /// Bytes of the ring.
    pub fn len(&self) -> u64 {
        DESC_LEN * u64::from(self.count)
    }

    /// The address of descriptor `i`.
    pub fn desc(&self, i: u32) -> u64 {
        self.base + DESC_LEN * u64::from(i)
    }

    /// Descriptors from `head` up to `tail`.
    pub fn between(&self, head: u32, tail: u32) -> u32 {
        (self.count + tail - head) % self.count
    }
}

impl E1000 {
    fn rx_ring(&self) -> Option<Ring> {
        Ring::new(
            &self.mem,
            self.plain_reg(RDBAL),
            self.plain_reg(RDBAH),
            self.rdlen,
            self.rdh,
            self.rdt,
        )
    }

    /// RCTL.BSIZE with BSEX (13.4.22).
    fn buffer_size(&self) -> usize {
        let bsize = (self.rctl >> RCTL_BSIZE_SHIFT) & 3;
        match (self.rctl & RCTL_BSEX != 0, bsize) {
            (false, 1) => 1024,
            (false, 2) => 512,
            (false, 3) => 256,
            (true, 1) => 16384,
            (true, 2) => 8192,
            (true, 3) => 4096,
            _ => 2048,
        }
    }

    /// The VLAN tag of a tagged frame (ethertype VET at offset 12).
    fn vlan_tci(&self, frame: &[u8]) -> Option<u16> {
        let vet = self.plain_reg(VET) & 0xffff;
        (frame.len() >= 18 && u32::from(u16::from_be_bytes([frame[12], frame[13]])) == vet)
            .then(|| u16::from_be_bytes([frame[14], frame[15]]))
    }

    /// The address filter (3.2.6): exact matches in the receive address registers, the
    /// multicast table, broadcast, the promiscuous modes, and the VLAN filter.
    fn accepts(&self, frame: &[u8]) -> bool {
        let dst = &frame[..6];
        let pass = if dst == [0xff; 6] {
            self.rctl & (RCTL_BAM | RCTL_MPE) != 0
        } else if dst[0] & 1 != 0 {
            self.rctl & RCTL_MPE != 0 || self.multicast_hit(dst)
        } else {
            self.rctl & RCTL_UPE != 0
                || (0..16).any(|i| {
                    let rah = self.plain_reg(RA + 8 * i + 4);
                    let ral = self.plain_reg(RA + 8 * i);
                    rah & RAH_AV != 0
                        && dst[..4] == ral.to_le_bytes()
                        && dst[4..] == (rah as u16).to_le_bytes()
                })
        };
        if !pass {
            return false;
        }
        match self.vlan_tci(frame) {
            Some(tci) if self.rctl & RCTL_VFE != 0 => {
                let vid = u64::from(tci & 0xfff);
                self.plain_reg(VFTA + 4 * (vid >> 5)) & (1 << (vid & 31)) != 0
            }
            _ => true,
        }
    }

    /// The multicast table: 12 bits of the destination address, chosen by RCTL.MO, index a
    /// 4096-bit table (the hash Linux's e1000_hash_mc_addr computes).
    fn multicast_hit(&self, dst: &[u8]) -> bool {
        let (b4, b5) = (u16::from(dst[4]), u16::from(dst[5]));
        let hash = match (self.rctl >> RCTL_MO_SHIFT) & 3 {
            0 => b4 >> 4 | b5 << 4,
            1 => b4 >> 3 | b5 << 5,
            2 => b4 >> 2 | b5 << 6,
            _ => b4 | b5 << 8,
        } & 0xfff;
        let word = self.plain_reg(MTA + 4 * u64::from(hash >> 5));
        word & (1 << (hash & 31)) != 0
    }

    /// Offers one frame (no FCS) from the host, with the virtio-net header the TAP put
    /// before it.
    pub fn receive(&mut self, hdr: &VnetHdr, frame: &[u8]) -> RxOutcome {
        let max = if self.rctl & RCTL_LPE != 0 {
            MAX_JUMBO
        } else {
            MAX_FRAME
        };
        if self.rctl & RCTL_EN == 0 || frame.len() < 14 {
            self.counters.rx_dropped += 1;
            return RxOutcome::Dropped;
        }
        self.count(TPR, 1);
        self.count64(TORL, (frame.len().max(MIN_FRAME) + FCS_LEN) as u64);
        if frame.len() > max {
            self.count(ROC, 1);
            self.counters.rx_dropped += 1;
            return RxOutcome::Dropped;
        }
        if !self.accepts(frame) {
            return RxOutcome::Dropped;
        }
        let Some(ring) = self.rx_ring() else {
            let regs = [RDBAL, RDBAH].map(|r| self.plain_reg(r));
            let what = (self.rdlen, self.rdh, self.rdt);
            Ring::warn_unusable(
                &mut self.warned.rx_ring,
                "receive",
                regs,
                what,
                "frames are dropped",
            );
            self.count(MPC, 1);
            self.counters.rx_dropped += 1;
            return RxOutcome::Dropped;
        };

        let mut data = std::mem::take(&mut self.rx_buf);
        data.clear();
        data.extend_from_slice(frame);
        let mut valid = offload::host_validated(hdr);
        if hdr.flags & VNET_F_NEEDS_CSUM != 0 {
            // The host left the checksum to us (TUN_F_CSUM): complete it; the frame is then
            // as good as the host's own.
            valid = offload::complete_partial(&mut data, hdr);
        }
        let rxcsum = self.plain_reg(RXCSUM);
        let (mut status, errors) = offload::rx_checksum(
            &data,
            rxcsum & RXCSUM_IPOFL != 0,
            rxcsum & RXCSUM_TUOFL != 0,
            valid,
        );
        let mut special = 0;
        if self.ctrl & CTRL_VME != 0 {
            if let Some(tci) = self.vlan_tci(&data) {
                // VLAN stripping: the tag goes to the descriptor (3.2.3.1).
                data.drain(12..16);
                special = tci;
                status |= RXD_STAT_VP;
            }
        }
        if data.len() < MIN_FRAME {
            data.resize(MIN_FRAME, 0);
        }
        let pcss = ((rxcsum & RXCSUM_PCSS_MASK) as usize).min(data.len());
        let packet_csum = fold(sum(&data[pcss..], 0));
        if self.rctl & RCTL_SECRC == 0 {
            let fcs = offload::fcs(&data);
            data.extend_from_slice(&fcs);
        }
        let wire_len = (data.len()
            + if self.rctl & RCTL_SECRC != 0 {
                FCS_LEN
            } else {
                0
            }) as u64;

        let bufsize = self.buffer_size();
        let needed = data.len().div_ceil(bufsize) as u32;
        let free = ring.between(self.rdh, self.rdt);
        if needed >= ring.count {
            // More buffers than the ring can ever offer at once: the chip would fill its
            // packet buffer waiting, then drop. Drop now.
            self.count(MPC, 1);
            self.counters.rx_dropped += 1;
            self.rx_buf = data;
            return RxOutcome::Dropped;
        }
        if free < needed {
            if !self.rx_blocked {
                self.count(RNBC, 1);
            }
            self.rx_blocked = true;
            self.rx_buf = data;
            return RxOutcome::NoSpace;
        }

        // What this frame may write: the buffers its descriptors give (BSIZE bytes each)
        // and the ring, for the write-backs.
        let mut bufs = Vec::with_capacity(needed as usize);
        for i in 0..needed {
            let mut d = [0u8; 8];
            let desc = ring.desc((self.rdh + i) % ring.count);
            bufs.push(dma::read(&self.mem, desc, &mut d).then(|| u64::from_le_bytes(d)));
        }
        let mut allowed: Vec<(u64, u64)> = bufs
            .iter()
            .flatten()
            .map(|&a| (a, bufsize as u64))
            .collect();
        allowed.push((ring.base, ring.len()));
        let allowed = ChainWrites::buffers(&allowed);
        let w = self.writer.chain(&allowed);
        // The buffers first, then the descriptors, each written back length first and
        // status last, so the driver never sees DD on a descriptor still being written.
        let chunk_ok: Vec<bool> = data
            .chunks(bufsize)
            .zip(&bufs)
            .map(|(chunk, buf)| buf.is_some_and(|a| dma::write(&w, a, chunk)))
            .collect();
        let failed = chunk_ok.contains(&false);
        for (i, chunk) in data.chunks(bufsize).enumerate() {
            let desc = ring.desc((self.rdh + i as u32) % ring.count);
            let eop = i as u32 == needed - 1;
            let mut lo = [0u8; 4];
            lo[..2].copy_from_slice(&(chunk.len() as u16).to_le_bytes());
            let mut hi = [0u8; 4];
            hi[0] = RXD_STAT_DD;
            if !chunk_ok[i] {
                hi[1] |= RXD_ERR_RXE;
            }
            if eop {
                lo[2..].copy_from_slice(&packet_csum.to_le_bytes());
                hi[0] |= RXD_STAT_EOP | status;
                hi[1] |= errors | if failed { RXD_ERR_RXE } else { 0 };
                hi[2..].copy_from_slice(&special.to_le_bytes());
            }
            // The ring was checked to lie in guest memory: these writes land inside it.
            dma::write(&w, desc + 8, &lo);
            dma::write(&w, desc + 12, &hi);
        }
        if failed && !self.warned.rx_buffer {
            self.warned.rx_buffer = true;
            warn!("e1000: a receive buffer is outside guest memory; its frame is dropped with RXE");
        }
        self.rdh = (self.rdh + needed) % ring.count;

        if failed {
            self.counters.rx_dropped += 1;
        } else {
            self.count(GPRC, 1);
            self.count64(GORCL, wire_len);
            self.count_size(PRC64, wire_len);
            if frame[0] == 0xff && frame[..6] == [0xff; 6] {
                self.count(BPRC, 1);
            } else if frame[0] & 1 != 0 {
                self.count(MPRC, 1);
            }
            self.counters.rx_frames += 1;
            self.counters.rx_bytes += frame.len() as u64;
            self.metrics.add_bytes_to_guest(frame.len() as u64);
        }
        self.rx_buf = data;

        let mut causes = 0;
        // The minimum threshold: free descriptors down to 1/2, 1/4 or 1/8 of the ring.
        let rdmts = ((self.rctl >> RCTL_RDMTS_SHIFT) & 3).min(2);
        if free - needed <= ring.count >> (1 + rdmts) {
            causes |= ICR_RXDMT0;
        }
        if self
            .moderation
            .rx_frame(self.timer.now(), self.rdtr, self.radv)
        {
            causes |= ICR_RXT0;
        }
        self.set_cause(causes);
        RxOutcome::Accepted
    }
}

#[cfg(test)]
mod tests {
    use super::super::offload::tests::tcp4_frame;
    use super::super::offload::{RXD_STAT_IPCS, RXD_STAT_TCPCS};
    use super::super::tests::{H, MAC, MEM_SIZE};
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    const RING: u64 = 0x1000;
    const BUFS: u64 = 0x10000;
    const N: u32 = 8;

    fn frame(dst: [u8; 6], len: usize) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 9, 0x08, 0x06]);
        f.extend((0..len - 14).map(|i| i as u8));
        f
    }

    /// What e1000_configure_rx leaves: an 8-descriptor ring with 2 KiB buffers, the driver
    /// owning none yet (RDT = RDH = 0), receiver on, broadcast accepted, RXCSUM TUOFL.
    fn setup(h: &mut H, rctl_extra: u32) {
        for i in 0..u64::from(N) {
            h.mem
                .write_obj(BUFS + i * 0x4000, GuestAddress(RING + i * 16))
                .unwrap();
        }
        h.w(RDBAL, RING as u32);
        h.w(RDBAH, 0);
        h.w(RDLEN, N * 16);
        h.w(RDH, 0);
        h.w(RDT, 0);
        h.w(RXCSUM, RXCSUM_TUOFL | RXCSUM_IPOFL);
        h.w(RCTL, RCTL_EN | RCTL_BAM | rctl_extra);
        h.w(IMS, ICR_RXT0 | ICR_RXDMT0);
    }

    fn desc(h: &H, i: u64) -> (u16, u8, u8, u16) {
        let mut d = [0u8; 16];
        h.mem
            .read_slice(&mut d, GuestAddress(RING + i * 16))
            .unwrap();
        (
            u16::from_le_bytes([d[8], d[9]]),
            d[12],
            d[13],
            u16::from_le_bytes([d[14], d[15]]),
        )
    }

    fn buf(h: &H, i: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        h.mem
            .read_slice(&mut b, GuestAddress(BUFS + i * 0x4000))
            .unwrap();
        b
    }

    #[test]
    fn a_frame_lands_in_the_buffer_with_its_fcs_and_status() {
        let mut h = H::new();
        setup(&mut h, 0);
        h.w(RDT, N - 1);
        let f = tcp4_frame(200);
        assert_eq!(h.nic.receive(&VnetHdr::default(), &f), RxOutcome::Accepted);
        let (len, status, errors, _) = desc(&h, 0);
        assert_eq!(
            usize::from(len),
            f.len() + 4,
            "the FCS is stored (SECRC off)"
        );
        assert_eq!(status & 0x3, RXD_STAT_DD | RXD_STAT_EOP);
        assert_eq!(
            status & (RXD_STAT_TCPCS | RXD_STAT_IPCS),
            RXD_STAT_TCPCS | RXD_STAT_IPCS
        );
        assert_eq!(errors, 0);
        let got = buf(&h, 0, f.len() + 4);
        assert_eq!(&got[..f.len()], &f[..]);
        assert_eq!(&got[f.len()..], &offload::fcs(&f));
        assert_eq!(h.r(RDH), 1);
        assert_eq!(h.irqs(), 1);
        assert_eq!(h.r(ICR) & ICR_RXT0, ICR_RXT0);
        assert_eq!(h.r(GPRC), 1);
        assert_eq!(h.r(TPR), 1);
        assert_eq!(u64::from(h.r(GORCL)), (f.len() + 4) as u64);
        // With SECRC the FCS is stripped; short frames are padded to 60 bytes.
        h.w(RCTL, RCTL_EN | RCTL_BAM | RCTL_SECRC);
        assert_eq!(
            h.nic.receive(&VnetHdr::default(), &frame([0xff; 6], 42)),
            RxOutcome::Accepted
        );
        assert_eq!(desc(&h, 1).0, 60);
    }

    #[test]
    fn the_ring_wraps_and_a_full_ring_keeps_the_frame_until_rdt_moves() {
        let mut h = H::new();
        setup(&mut h, 0);
        // Head near the end: descriptors 6, 7, 0, 1 are the hardware's.
        h.w(RDH, 6);
        h.w(RDT, 2);
        let f = frame(MAC, 100);
        for _ in 0..4 {
            assert_eq!(h.nic.receive(&VnetHdr::default(), &f), RxOutcome::Accepted);
        }
        assert_eq!(h.r(RDH), 2, "wrapped past the end");
        for i in [6, 7, 0, 1] {
            assert_eq!(desc(&h, i).1 & RXD_STAT_DD, RXD_STAT_DD, "descriptor {i}");
        }
        assert_eq!(desc(&h, 2).1, 0, "not the hardware's");
        // RDH == RDT: no descriptors. The frame waits; RNBC counts it once.
        assert_eq!(h.nic.receive(&VnetHdr::default(), &f), RxOutcome::NoSpace);
        assert_eq!(h.nic.receive(&VnetHdr::default(), &f), RxOutcome::NoSpace);
        assert_eq!(h.r(RNBC), 1);
        assert_eq!(h.space.load(std::sync::atomic::Ordering::SeqCst), 0);
        h.w(RDT, 3);
        assert_eq!(h.space.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(h.nic.receive(&VnetHdr::default(), &f), RxOutcome::Accepted);
        assert_eq!(h.r(RDH), 3);
    }

    #[test]
    fn head_and_tail_outside_the_ring_or_a_ring_outside_memory_drop() {
        let mut h = H::new();
        setup(&mut h, 0);
        let f = frame(MAC, 100);
        h.w(RDT, N); // one past the last descriptor
        assert_eq!(h.nic.receive(&VnetHdr::default(), &f), RxOutcome::Dropped);
        h.w(RDT, 3);
        h.w(RDBAL, (MEM_SIZE - 64) as u32); // the ring runs off the end of RAM
        let before = buf(&h, 0, 256);
        assert_eq!(h.nic.receive(&VnetHdr::default(), &f), RxOutcome::Dropped);
        h.w(RDBAH, 1); // above 4 GiB, nothing there
        assert_eq!(h.nic.receive(&VnetHdr::default(), &f), RxOutcome::Dropped);
        assert_eq!(h.r(MPC), 3, "each unusable ring drops one");
        assert_eq!(buf(&h, 0, 256), before, "nothing written");
        // A zero-length ring.
        h.w(RDBAH, 0);
        h.w(RDBAL, RING as u32);
        h.w(RDLEN, 0);
        assert_eq!(h.nic.receive(&VnetHdr::default(), &f), RxOutcome::Dropped);
    }

    #[test]
    fn a_buffer_outside_guest_memory_gets_rxe_and_the_ring_goes_on() {
        let mut h = H::new();
        setup(&mut h, 0);
        h.w(RDT, 4);
        h.mem
            .write_obj((MEM_SIZE as u64) - 8, GuestAddress(RING))
            .unwrap();
        let f = frame(MAC, 100);
        assert_eq!(h.nic.receive(&VnetHdr::default(), &f), RxOutcome::Accepted);
        let (_, status, errors, _) = desc(&h, 0);
        assert_eq!(status & RXD_STAT_DD, RXD_STAT_DD);
        assert_eq!(errors & RXD_ERR_RXE, RXD_ERR_RXE);
        let mut tail = [0u8; 8];
        h.mem
            .read_slice(&mut tail, GuestAddress(MEM_SIZE as u64 - 8))
            .unwrap();
        assert_eq!(tail, [0; 8], "no partial write at the end of RAM");
        assert_eq!(h.r(GPRC), 0);
        // The next descriptor is fine.
        assert_eq!(h.nic.receive(&VnetHdr::default(), &f), RxOutcome::Accepted);
        assert_eq!(desc(&h, 1).2, 0);
        assert_eq!(&buf(&h, 1, f.len())[..], &f[..]);
    }

    #[test]
    fn a_long_frame_spans_descriptors_with_eop_on_the_last() {
        let mut h = H::new();
        // 256-byte buffers, long packets allowed.
        setup(&mut h, RCTL_LPE | 3 << RCTL_BSIZE_SHIFT);
        h.w(RDT, 7);
        let f = frame(MAC, 600);
        assert_eq!(h.nic.receive(&VnetHdr::default(), &f), RxOutcome::Accepted);
        let lens: Vec<u16> = (0..3).map(|i| desc(&h, i).0).collect();
        assert_eq!(lens, [256, 256, 604 - 512]);
        assert_eq!(desc(&h, 0).1, RXD_STAT_DD);
        assert_eq!(desc(&h, 2).1 & RXD_STAT_EOP, RXD_STAT_EOP);
        let mut got = buf(&h, 0, 256);
        got.extend(buf(&h, 1, 256));
        got.extend(buf(&h, 2, 88));
        assert_eq!(&got[..600], &f[..]);
        assert_eq!(h.r(RDH), 3);
        // Longer than the ring can ever take (8 descriptors of 256 bytes): dropped.
        assert_eq!(
            h.nic.receive(&VnetHdr::default(), &frame(MAC, 3000)),
            RxOutcome::Dropped
        );
        // Without LPE a jumbo frame is an oversize error.
        h.w(RCTL, RCTL_EN);
        assert_eq!(
            h.nic.receive(&VnetHdr::default(), &frame(MAC, 1600)),
            RxOutcome::Dropped
        );
        assert_eq!(h.r(ROC), 1);
    }

    #[test]
    fn address_filter_multicast_table_and_vlan() {
        let mut h = H::new();
        setup(&mut h, 0);
        h.w(RDT, 7);
        let hdr = VnetHdr::default();
        assert_eq!(
            h.nic.receive(&hdr, &frame([0x02, 9, 9, 9, 9, 9], 60)),
            RxOutcome::Dropped
        );
        // 01:00:5e:00:00:fb with MO = 0: hash = (0x00 >> 4) | (0xfb << 4) = 0xfb0.
        let mc = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
        assert_eq!(h.nic.receive(&hdr, &frame(mc, 60)), RxOutcome::Dropped);
        h.w(MTA + 4 * (0xfb0 >> 5), 1 << (0xfb0 & 31));
        assert_eq!(h.nic.receive(&hdr, &frame(mc, 60)), RxOutcome::Accepted);
        h.w(RCTL, RCTL_EN | RCTL_UPE);
        assert_eq!(
            h.nic.receive(&hdr, &frame([0x02, 9, 9, 9, 9, 9], 60)),
            RxOutcome::Accepted
        );
        assert_eq!(
            h.nic.receive(&hdr, &frame([0xff; 6], 60)),
            RxOutcome::Dropped,
            "broadcast needs BAM"
        );
        // A tagged frame: stripped with VME, filtered by VFTA with VFE.
        let mut tagged = frame(MAC, 100);
        tagged.splice(12..12, [0x81, 0x00, 0x20, 0x05]);
        h.w(CTRL, CTRL_VME);
        h.w(RCTL, RCTL_EN | RCTL_VFE);
        assert_eq!(
            h.nic.receive(&hdr, &tagged),
            RxOutcome::Dropped,
            "VID 5 not in VFTA"
        );
        h.w(VFTA, 1 << 5);
        assert_eq!(h.nic.receive(&hdr, &tagged), RxOutcome::Accepted);
        let i = u64::from(h.r(RDH)) - 1;
        let (len, status, _, special) = desc(&h, i);
        assert_eq!(usize::from(len), tagged.len() - 4 + 4, "tag out, FCS in");
        assert_eq!(status & RXD_STAT_VP, RXD_STAT_VP);
        assert_eq!(special, 0x2005);
    }

    #[test]
    fn partial_checksums_from_the_host_are_completed() {
        let mut h = H::new();
        setup(&mut h, RCTL_SECRC);
        h.w(RDT, 7);
        let good = tcp4_frame(300);
        let mut partial = good.clone();
        // What the host stack hands over with TUN_F_CSUM: the pseudo-header sum in place.
        let p = sum(&good[26..34], 6 + 320);
        partial[50..52].copy_from_slice(&fold(p).to_be_bytes());
        let hdr = VnetHdr {
            flags: VNET_F_NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..VnetHdr::default()
        };
        assert_eq!(h.nic.receive(&hdr, &partial), RxOutcome::Accepted);
        assert_eq!(buf(&h, 0, good.len()), good);
        assert_eq!(desc(&h, 0).1 & RXD_STAT_TCPCS, RXD_STAT_TCPCS);
        assert_eq!(desc(&h, 0).2, 0);
    }

    #[test]
    fn rdtr_delays_the_receive_interrupt_and_rxdmt0_warns_of_a_low_ring() {
        let mut h = H::new();
        setup(&mut h, 1 << RCTL_RDMTS_SHIFT); // threshold: a quarter of the ring
        h.w(RDTR, 10); // 10.24 µs
        h.w(RADV, 100);
        h.w(RDT, 7);
        let f = frame(MAC, 100);
        h.nic.receive(&VnetHdr::default(), &f);
        assert_eq!(h.irqs(), 0, "delayed");
        assert_eq!(*h.clock.armed.lock().unwrap(), Some(10 * 1024));
        h.advance(5_000);
        h.nic.receive(&VnetHdr::default(), &f);
        assert_eq!(
            *h.clock.armed.lock().unwrap(),
            Some(5_000 + 10 * 1024),
            "restarted"
        );
        h.fire_timer();
        assert_eq!(h.irqs(), 1);
        assert_eq!(h.r(ICR), ICR_RXT0);
        // FPD fires a pending delay at once.
        h.nic.receive(&VnetHdr::default(), &f);
        assert_eq!(h.irqs(), 1);
        h.w(RDTR, 10 | RDTR_FPD);
        assert_eq!(h.irqs(), 2);
        h.r(ICR);
        // Free descriptors 7 - 4 = 3, then 2 <= 8 / 4: RXDMT0.
        h.w(RDTR, 0);
        h.nic.receive(&VnetHdr::default(), &f);
        assert_eq!(h.r(ICR) & ICR_RXDMT0, 0, "3 free > 2");
        h.nic.receive(&VnetHdr::default(), &f);
        assert_eq!(h.r(ICR) & ICR_RXDMT0, ICR_RXDMT0);
    }

    /// A NIC with a receive interrupt delayed, snapshotted and restored into a NIC whose
    /// clock reads something else entirely (another process): the delay left runs on the
    /// new clock, the ring goes on at the next descriptor, the statistics carry over.
    #[test]
    fn a_snapshot_carries_the_ring_the_statistics_and_the_delay_left() {
        use crate::devices::Persist;
        let mut h = H::new();
        setup(&mut h, 0);
        h.w(RDTR, 10); // 10.24 µs
        h.w(RDT, 7);
        h.advance(1_000_000);
        let f = frame(MAC, 100);
        h.nic.receive(&VnetHdr::default(), &f);
        h.advance(4_000);
        let state = h.nic.save().unwrap();
        let state: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&state).unwrap()).unwrap();

        let mut g = H::new();
        g.advance(77_000_000_000);
        g.nic.restore(&state).unwrap();
        assert_eq!(
            *g.clock.armed.lock().unwrap(),
            Some(77_000_000_000 + 10 * 1024 - 4_000),
            "the 6.24 µs left, on the new clock"
        );
        assert_eq!(
            g.nic.save().unwrap(),
            state,
            "what was restored saves the same"
        );
        assert_eq!((g.r(RDH), g.r(RDT), g.r(RDLEN)), (1, 7, N * 16));
        assert_eq!(g.irqs(), 0, "still delayed");
        g.fire_timer();
        assert_eq!(g.irqs(), 1);
        assert_eq!(g.r(ICR), ICR_RXT0);
        g.w(RDTR, 0);
        assert_eq!(g.nic.receive(&VnetHdr::default(), &f), RxOutcome::Accepted);
        assert_eq!(desc(&g, 1).0 as usize, f.len() + 4, "the next descriptor");
        assert_eq!(g.r(GPRC), 2, "both frames counted");
        // The MAC address (EEPROM, receive address) came along.
        assert_eq!(
            g.r(RA),
            u32::from_le_bytes([MAC[0], MAC[1], MAC[2], MAC[3]])
        );
    }

    #[test]
    fn impossible_e1000_states_are_refused() {
        use crate::devices::Persist;
        let mut h = H::new();
        let good = h.nic.save().unwrap();
        for (field, value, why) in [
            ("plain", serde_json::json!([1, 2, 3]), "register file"),
            ("stats", serde_json::json!([0]), "statistics"),
        ] {
            let mut bad = good.clone();
            bad[field] = value;
            let err = h.nic.restore(&bad).unwrap_err();
            assert!(err.contains(why), "{field}: {err}");
        }
        let mut bad = good.clone();
        bad["eeprom"]["words"] = serde_json::json!([0, 0, 0]);
        assert!(h.nic.restore(&bad).unwrap_err().contains("EEPROM"));
        let mut bad = good.clone();
        bad["tx"]["packet"]["buf"] = serde_json::json!(vec![0u8; 0x2_0000]);
        assert!(h.nic.restore(&bad).unwrap_err().contains("transmit packet"));
    }

    #[test]
    fn a_stopped_receiver_drops() {
        let mut h = H::new();
        setup(&mut h, 0);
        h.w(RDT, 7);
        h.w(RCTL, 0);
        assert_eq!(
            h.nic.receive(&VnetHdr::default(), &frame(MAC, 60)),
            RxOutcome::Dropped
        );
        assert_eq!(h.r(RDH), 0);
    }
}
