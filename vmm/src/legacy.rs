//! Port-I/O devices of a minimal PC: COM1 (vm-superio 16550), the i8042 controller (only for its reset line),
//! and the debug-exit port that test guests use to stop the VM with an exit code.

use std::sync::Arc;

use parking_lot::Mutex;
use vm_superio::{I8042Device, Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::console::{Console, ConsoleWriter};
use crate::layout;

/// An eventfd as a vm-superio interrupt/reset trigger.
pub(crate) struct EventTrigger(pub(crate) EventFd);

impl Trigger for EventTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

/// What a port write asks the VM to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PioAction {
    /// Nothing special.
    None,
    /// The guest pulsed the reset line (i8042 0xfe).
    Reset,
    /// The guest wrote its exit code to the debug-exit port.
    Exit(u32),
}

/// The port-I/O bus.
pub(crate) struct PioBus {
    serial: Mutex<Serial<EventTrigger, vm_superio::serial::NoEvents, ConsoleWriter>>,
    i8042: Mutex<I8042Device<EventTrigger>>,
    reset_evt: EventFd,
}

impl PioBus {
    /// COM1 raising `serial_irq`, writing to `console`.
    pub(crate) fn new(console: Arc<Console>, serial_irq: EventFd) -> std::io::Result<Self> {
        let reset_evt = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok(PioBus {
            serial: Mutex::new(Serial::new(
                EventTrigger(serial_irq),
                ConsoleWriter(console),
            )),
            i8042: Mutex::new(I8042Device::new(EventTrigger(reset_evt.try_clone()?))),
            reset_evt,
        })
    }

    /// Queue bytes for the guest to read from COM1 (console input).
    pub(crate) fn serial_input(&self, bytes: &[u8]) -> usize {
        self.serial.lock().enqueue_raw_bytes(bytes).unwrap_or(0)
    }

    pub(crate) fn read(&self, port: u16, data: &mut [u8]) {
        data.fill(0xff);
        match port {
            p if (layout::SERIAL_PORT..layout::SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                data[0] = self.serial.lock().read((p - layout::SERIAL_PORT) as u8);
            }
            layout::I8042_DATA | layout::I8042_CMD if data.len() == 1 => {
                data[0] = self.i8042.lock().read((port - layout::I8042_DATA) as u8);
            }
            _ => {}
        }
    }

    pub(crate) fn write(&self, port: u16, data: &[u8]) -> PioAction {
        match port {
            p if (layout::SERIAL_PORT..layout::SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                if let Err(e) = self
                    .serial
                    .lock()
                    .write((p - layout::SERIAL_PORT) as u8, data[0])
                {
                    tracing::debug!(error = ?e, "serial write failed");
                }
                PioAction::None
            }
            layout::I8042_DATA | layout::I8042_CMD if data.len() == 1 => {
                if let Err(e) = self
                    .i8042
                    .lock()
                    .write((port - layout::I8042_DATA) as u8, data[0])
                {
                    tracing::debug!(error = ?e, "i8042 write failed");
                }
                if self.reset_evt.read().is_ok() {
                    PioAction::Reset
                } else {
                    PioAction::None
                }
            }
            layout::DEBUG_EXIT_PORT => {
                let mut b = [0u8; 4];
                let n = data.len().min(4);
                b[..n].copy_from_slice(&data[..n]);
                PioAction::Exit(u32::from_le_bytes(b))
            }
            _ => PioAction::None,
        }
    }
}
