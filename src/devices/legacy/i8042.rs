//! The i8042 keyboard controller, emulated only as far as a guest needs it to probe the
//! controller and to reset the machine: the CPU reset pulse (command 0xFE, or bit 0 cleared
//! through "write output port") is how Linux reboots with `reboot=k`, and it ends the VM.
//!
//! No keyboard or mouse is attached; the controller answers its own commands
//! (self-test, interface test, command byte) through the output buffer like real hardware.

use log::{debug, error, warn};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;

/// Offset of the data port (0x60) in the device's range.
const OFFSET_DATA: u64 = 0;
/// Offset of the status (read) / command (write) port (0x64).
const OFFSET_COMMAND: u64 = 4;

// Status register bits.
const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_SYSTEM_FLAG: u8 = 0x04;
const SB_LAST_WAS_COMMAND: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

// Controller commands (written to 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

const SELF_TEST_OK: u8 = 0x55;
const INTERFACE_TEST_OK: u8 = 0x00;
/// Output port bit 0: the CPU reset line (active low).
const OUTP_RESET_LINE: u8 = 0x01;
/// Output port with A20 enabled and the CPU out of reset.
const OUTP_DEFAULT: u8 = 0x03;
/// Command byte: keyboard interrupt enabled, system flag, translation.
const CTR_DEFAULT: u8 = 0x45;
const CTR_KBD_DISABLED: u8 = 0x10;

/// The controller.
pub struct I8042 {
    reset_evt: EventFd,
    status: u8,
    ctr: u8,
    outp: u8,
    out_buf: Option<u8>,
    /// The last command that takes a parameter byte on the data port.
    pending: Option<u8>,
}

impl I8042 {
    /// A controller that writes `reset_evt` when the guest resets the CPU.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            reset_evt,
            status: SB_SYSTEM_FLAG | SB_KBD_ENABLED,
            ctr: CTR_DEFAULT,
            outp: OUTP_DEFAULT,
            out_buf: None,
            pending: None,
        }
    }

    fn push(&mut self, byte: u8) {
        self.out_buf = Some(byte);
        self.status |= SB_OUT_DATA_AVAIL;
    }

    fn pop(&mut self) -> u8 {
        self.status &= !SB_OUT_DATA_AVAIL;
        self.out_buf.take().unwrap_or(0)
    }

    fn reset_cpu(&mut self) {
        debug!("i8042: CPU reset requested by the guest");
        // Where the guest asked for it, for a crash report: a panic restarts through here.
        crate::vstate::vcpu::snapshot_this_vcpu();
        if let Err(e) = self.reset_evt.write(1) {
            error!("i8042: failed to signal the reset: {e}");
        }
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending = Some(cmd),
            CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
            // No auxiliary device: report its clock line stuck low.
            CMD_TEST_AUX => self.push(0x01),
            CMD_SELF_TEST => self.push(SELF_TEST_OK),
            CMD_TEST_KBD => self.push(INTERFACE_TEST_OK),
            CMD_DISABLE_KBD => self.ctr |= CTR_KBD_DISABLED,
            CMD_ENABLE_KBD => self.ctr &= !CTR_KBD_DISABLED,
            CMD_READ_OUTP => self.push(self.outp),
            CMD_RESET_CPU => self.reset_cpu(),
            // 0xF0-0xFF pulse output lines; bit 0 is the reset line.
            c if c & 0xf0 == 0xf0 && c & OUTP_RESET_LINE == 0 => self.reset_cpu(),
            c if c & 0xf0 == 0xf0 => {}
            other => warn!("i8042: unsupported controller command {other:#04x}"),
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !SB_LAST_WAS_COMMAND;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => self.ctr = byte,
            Some(CMD_WRITE_OUTP) => {
                self.outp = byte;
                if byte & OUTP_RESET_LINE == 0 {
                    self.reset_cpu();
                }
            }
            // A byte for the keyboard, which is absent: answer like a timed-out device.
            _ => debug!("i8042: byte {byte:#04x} for the absent keyboard"),
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct I8042Snapshot {
    status: u8,
    ctr: u8,
    outp: u8,
    out_buf: Option<u8>,
    pending: Option<u8>,
}

impl crate::devices::Persist for I8042 {
    fn save(&mut self) -> Result<serde_json::Value, String> {
        crate::devices::to_state(&I8042Snapshot {
            status: self.status,
            ctr: self.ctr,
            outp: self.outp,
            out_buf: self.out_buf,
            pending: self.pending,
        })
    }

    fn restore(&mut self, v: &serde_json::Value) -> Result<(), String> {
        let s: I8042Snapshot = crate::devices::from_state(v)?;
        self.status = s.status;
        self.ctr = s.ctr;
        self.outp = s.outp;
        self.out_buf = s.out_buf;
        self.pending = s.pending;
        Ok(())
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            OFFSET_DATA => self.pop(),
            OFFSET_COMMAND => self.status,
            _ => 0xff,
        };
        data.fill(0);
        if let Some(b) = data.first_mut() {
            *b = value;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&byte) = data.first() else { return };
        match offset {
            OFFSET_DATA => self.data(byte),
            OFFSET_COMMAND => self.command(byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev() -> (I8042, EventFd) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042::new(evt.try_clone().unwrap()), evt)
    }

    fn rd(d: &mut I8042, off: u64) -> u8 {
        let mut b = [0u8];
        d.read(off, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_signals_reset() {
        let (mut d, evt) = dev();
        assert!(evt.read().is_err(), "nothing before");
        d.write(OFFSET_COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn pulse_and_output_port_reset() {
        let (mut d, evt) = dev();
        d.write(OFFSET_COMMAND, &[0xf0]);
        assert_eq!(evt.read().unwrap(), 1);
        d.write(OFFSET_COMMAND, &[0xff]);
        assert!(evt.read().is_err(), "0xFF pulses no line");
        d.write(OFFSET_COMMAND, &[CMD_WRITE_OUTP]);
        d.write(OFFSET_DATA, &[0x02]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn linux_kb_wait_sees_input_buffer_empty() {
        let (mut d, _evt) = dev();
        // Linux's kb_wait() polls until bit 1 (input buffer full) is clear.
        assert_eq!(rd(&mut d, OFFSET_COMMAND) & 0x02, 0);
    }

    #[test]
    fn self_test_and_command_byte_round_trip() {
        let (mut d, _evt) = dev();
        d.write(OFFSET_COMMAND, &[CMD_SELF_TEST]);
        assert_ne!(rd(&mut d, OFFSET_COMMAND) & SB_OUT_DATA_AVAIL, 0);
        assert_eq!(rd(&mut d, OFFSET_DATA), SELF_TEST_OK);
        assert_eq!(rd(&mut d, OFFSET_COMMAND) & SB_OUT_DATA_AVAIL, 0);

        d.write(OFFSET_COMMAND, &[CMD_WRITE_CTR]);
        d.write(OFFSET_DATA, &[0x61]);
        d.write(OFFSET_COMMAND, &[CMD_READ_CTR]);
        assert_eq!(rd(&mut d, OFFSET_DATA), 0x61);
    }

    #[test]
    fn keyboard_bytes_without_command_are_harmless() {
        let (mut d, evt) = dev();
        d.write(OFFSET_DATA, &[0xff]);
        assert!(evt.read().is_err());
        assert_eq!(rd(&mut d, OFFSET_DATA), 0);
    }
}
