//! The PC's legacy devices on the port bus, at the ports their types name (`PORT_BASE`,
//! `PORT_LEN`) and with the ISA IRQs of `arch::layout`: the one place that puts them there, for
//! `Vmm::build` and for the fuzz harness alike.

use std::sync::{Arc, Mutex};

use bus::{Bus, BusError};
use legacy::{CmosRtc, DebugPort, Uart8250, I8042};

/// COM1, the i8042, the CMOS RTC and the POST port on a new port bus.
pub fn port_bus(
    serial: Arc<Mutex<Uart8250>>,
    i8042: Arc<Mutex<I8042>>,
    cmos: CmosRtc,
    debug_port: DebugPort,
) -> Result<Bus, BusError> {
    let pio = Bus::new();
    pio.insert(serial, Uart8250::PORT_BASE, Uart8250::PORT_LEN)?;
    pio.insert(i8042, I8042::PORT_BASE, I8042::PORT_LEN)?;
    pio.insert(
        Arc::new(Mutex::new(cmos)),
        CmosRtc::PORT_BASE,
        CmosRtc::PORT_LEN,
    )?;
    pio.insert(
        Arc::new(Mutex::new(debug_port)),
        DebugPort::PORT_BASE,
        DebugPort::PORT_LEN,
    )?;
    Ok(pio)
}

/// One line per device for the start-up log: where each sits and its interrupt.
pub fn describe(console: &str) -> Vec<String> {
    vec![
        format!(
            "COM1 8250 at port {:#x} IRQ {} (console: {console})",
            Uart8250::PORT_BASE,
            arch::layout::COM1_IRQ,
        ),
        format!(
            "i8042 at port {:#x} IRQ {}",
            I8042::PORT_BASE,
            arch::layout::KEYBOARD_IRQ
        ),
        format!("CMOS RTC at port {:#x}", CmosRtc::PORT_BASE),
        format!("debug port {:#x}", DebugPort::PORT_BASE),
    ]
}
