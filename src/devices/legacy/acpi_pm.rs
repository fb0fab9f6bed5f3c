//! The ACPI fixed hardware the FADT names (ACPI 6.5, 4.8): the PM1a event block (status and
//! enable registers) and control register, and the reset register. The guest powers off by
//! writing SLP_TYP = S5 with SLP_EN to PM1 control (4.8.2.1.2, 7.4.2) and resets by writing
//! the FADT's reset value to the reset register (4.8.3.6). Both only signal the event loop.
//!
//! The platform has no SMI command port, so it is always in ACPI mode: SCI_EN reads 1.

use log::{error, info, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{
    PM1_CONTROL_OFFSET, PM1_ENABLE_OFFSET, PM1_STATUS_OFFSET, RESET_OFFSET, RESET_VALUE,
    S5_SLEEP_TYPE,
};
use crate::devices::bus::BusDevice;

/// PM1 control: SCI_EN (bit 0), SLP_TYP (bits 12:10), SLP_EN (bit 13, write-only).
const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;
const SLP_EN: u16 = 1 << 13;
/// The PM1 status and enable bits the platform has (status bits are write-one-to-clear):
/// the global lock release event (the FACS lock is never held by firmware, so it never
/// fires, but ACPICA checks the enable bit sticks) and the power button.
const GBL: u16 = 1 << 5;
const PWRBTN: u16 = 1 << 8;

/// The PM1a event and control registers and the reset register.
pub struct AcpiPm {
    power_off_evt: EventFd,
    reset_evt: EventFd,
    /// The SCI (an irqfd on GSI 9), raised for the power button.
    sci: Option<EventFd>,
    status: u16,
    enable: u16,
    control: u16,
}

impl AcpiPm {
    /// Writes `power_off_evt` when the guest enters S5 and `reset_evt` when it resets.
    pub fn new(power_off_evt: EventFd, reset_evt: EventFd) -> Self {
        Self {
            power_off_evt,
            reset_evt,
            sci: None,
            status: 0,
            enable: 0,
            control: SCI_EN,
        }
    }

    /// Raises `sci` for the fixed-feature events (the power button).
    pub fn with_sci(mut self, sci: EventFd) -> Self {
        self.sci = Some(sci);
        self
    }

    /// A press of the power button (ACPI 4.8.2.2.1.1): PWRBTN_STS set, and the SCI raised if
    /// the OS enabled the event. What happens then is the guest's choice (Linux's ACPI
    /// button driver reports KEY_POWER; an init or acpid decides).
    pub fn press_power_button(&mut self) -> bool {
        self.status |= PWRBTN;
        let enabled = self.enable & PWRBTN != 0;
        if enabled {
            if let Some(sci) = &self.sci {
                Self::signal(sci, "SCI");
            }
        }
        info!(
            "acpi: power button pressed (the guest has the event {})",
            if enabled { "enabled" } else { "disabled" }
        );
        enabled
    }

    fn signal(evt: &EventFd, what: &str) {
        if let Err(e) = evt.write(1) {
            error!("acpi: failed to signal the {what}: {e}");
        }
    }

    /// The 16-bit register at `reg` (one of the PM1 offsets), if any.
    fn register(&mut self, reg: u16) -> Option<&mut u16> {
        match reg {
            PM1_STATUS_OFFSET => Some(&mut self.status),
            PM1_ENABLE_OFFSET => Some(&mut self.enable),
            PM1_CONTROL_OFFSET => Some(&mut self.control),
            _ => None,
        }
    }

    fn write_register(&mut self, reg: u16, value: u16, mask: u16) {
        match reg {
            // Write one to clear (4.8.4.1.1).
            PM1_STATUS_OFFSET => self.status &= !(value & mask),
            PM1_ENABLE_OFFSET => {
                self.enable = (self.enable & !mask) | (value & mask & (GBL | PWRBTN));
            }
            PM1_CONTROL_OFFSET => {
                let v = (self.control & !mask) | (value & mask);
                // SLP_EN reads as zero; SCI_EN is fixed (always in ACPI mode).
                self.control = (v & !SLP_EN) | SCI_EN;
                if v & SLP_EN != 0 {
                    self.sleep((v >> SLP_TYP_SHIFT) & SLP_TYP_MASK);
                }
            }
            _ => {}
        }
    }

    fn sleep(&mut self, typ: u16) {
        if typ == u16::from(S5_SLEEP_TYPE) {
            info!("acpi: the guest entered S5");
            Self::signal(&self.power_off_evt, "power off");
        } else {
            // Only \_S5_ is declared; other sleep states do not exist here.
            warn!("acpi: the guest asked for sleep type {typ}, which the DSDT does not offer; ignored");
        }
    }
}

impl crate::devices::Persist for AcpiPm {
    fn save(&mut self) -> Result<serde_json::Value, String> {
        Ok(serde_json::json!([self.status, self.enable, self.control]))
    }

    fn restore(&mut self, v: &serde_json::Value) -> Result<(), String> {
        let [status, enable, control]: [u16; 3] = crate::devices::from_state(v)?;
        self.status = status;
        self.enable = enable;
        self.control = control | SCI_EN;
        Ok(())
    }
}

impl BusDevice for AcpiPm {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        for (i, b) in data.iter_mut().enumerate() {
            let off = offset as u16 + i as u16;
            if let Some(r) = self.register(off & !1) {
                *b = r.to_le_bytes()[usize::from(off & 1)];
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let off = offset as u16;
        if off == RESET_OFFSET {
            match data.first() {
                Some(&RESET_VALUE) => {
                    info!("acpi: the guest reset the machine through the reset register");
                    // Where the guest asked for it, for a crash report: a panic restarts
                    // through here too.
                    crate::vstate::vcpu::snapshot_this_vcpu();
                    Self::signal(&self.reset_evt, "reset");
                }
                v => warn!("acpi: reset register written with {v:?}, not {RESET_VALUE}; ignored"),
            }
            return;
        }
        // 8- or 16-bit accesses to the 16-bit registers; a byte touches one half.
        let reg = off & !1;
        let (value, mask) = match (data.len(), off & 1) {
            (1, 0) => (u16::from(data[0]), 0x00ff),
            (1, _) => (u16::from(data[0]) << 8, 0xff00),
            (2, 0) => (u16::from_le_bytes([data[0], data[1]]), 0xffff),
            _ => {
                warn!("acpi: {}-byte write at PM offset {off} ignored", data.len());
                return;
            }
        };
        if self.register(reg).is_none() {
            warn!("acpi: write at PM offset {off} ignored");
            return;
        }
        self.write_register(reg, value, mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAK_STS: u16 = 1 << 15;

    fn dev() -> (AcpiPm, EventFd, EventFd) {
        let off = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (
            AcpiPm::new(off.try_clone().unwrap(), reset.try_clone().unwrap()),
            off,
            reset,
        )
    }

    fn r16(d: &mut AcpiPm, off: u16) -> u16 {
        let mut b = [0u8; 2];
        d.read(u64::from(off), &mut b);
        u16::from_le_bytes(b)
    }

    fn w16(d: &mut AcpiPm, off: u16, v: u16) {
        d.write(u64::from(off), &v.to_le_bytes());
    }

    #[test]
    fn s5_with_slp_en_powers_off_the_way_acpica_writes_it() {
        let (mut d, off, reset) = dev();
        assert_eq!(
            r16(&mut d, PM1_CONTROL_OFFSET) & SCI_EN,
            SCI_EN,
            "in ACPI mode"
        );
        // acpi_hw_legacy_sleep: SLP_TYP first, then SLP_TYP | SLP_EN.
        let typ = 5 << SLP_TYP_SHIFT;
        w16(&mut d, PM1_CONTROL_OFFSET, typ | SCI_EN);
        assert!(off.read().is_err(), "SLP_TYP alone does nothing");
        w16(&mut d, PM1_CONTROL_OFFSET, typ | SCI_EN | SLP_EN);
        assert_eq!(off.read().unwrap(), 1);
        assert!(reset.read().is_err());
        assert_eq!(
            r16(&mut d, PM1_CONTROL_OFFSET) & SLP_EN,
            0,
            "SLP_EN reads zero"
        );
    }

    #[test]
    fn other_sleep_types_do_nothing_and_status_is_write_one_to_clear() {
        let (mut d, off, _) = dev();
        w16(&mut d, PM1_CONTROL_OFFSET, (3 << SLP_TYP_SHIFT) | SLP_EN);
        assert!(off.read().is_err());
        d.status = PWRBTN | WAK_STS;
        w16(&mut d, PM1_STATUS_OFFSET, PWRBTN);
        assert_eq!(r16(&mut d, PM1_STATUS_OFFSET), WAK_STS);
        // Byte access to the high half of the enable register.
        d.write(u64::from(PM1_ENABLE_OFFSET + 1), &[0x01]);
        assert_eq!(r16(&mut d, PM1_ENABLE_OFFSET), PWRBTN);
        w16(&mut d, PM1_ENABLE_OFFSET, 0xffff);
        assert_eq!(
            r16(&mut d, PM1_ENABLE_OFFSET),
            PWRBTN | GBL,
            "only implemented bits"
        );
    }

    #[test]
    fn the_power_button_sets_its_status_and_raises_the_sci_when_enabled() {
        let (d, _, _) = dev();
        let sci = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut d = d.with_sci(sci.try_clone().unwrap());
        assert!(!d.press_power_button(), "not enabled yet");
        assert!(sci.read().is_err());
        assert_eq!(r16(&mut d, PM1_STATUS_OFFSET) & PWRBTN, PWRBTN);
        w16(&mut d, PM1_STATUS_OFFSET, PWRBTN);
        w16(&mut d, PM1_ENABLE_OFFSET, PWRBTN);
        assert!(d.press_power_button());
        assert_eq!(sci.read().unwrap(), 1);
    }

    #[test]
    fn reset_value_resets_and_others_do_not() {
        let (mut d, off, reset) = dev();
        d.write(u64::from(RESET_OFFSET), &[0x06]);
        assert!(reset.read().is_err());
        d.write(u64::from(RESET_OFFSET), &[RESET_VALUE]);
        assert_eq!(reset.read().unwrap(), 1);
        assert!(off.read().is_err());
        // Odd accesses are ignored.
        d.write(0, &[1, 2, 3, 4]);
        d.write(7, &[1]);
    }
}
