//! Sluice's reference sensor-node firmware, for a Cortex-M4F.
//!
//! Built for QEMU's MPS2 AN386 board (a Cortex-M4 with its FPU, and the
//! CMSDK UART every MPS2 image has). It:
//!
//! 1. waits on UART0 for the gateway's [`Record::Sync`], which gives it the
//!    time (a node without a clock of its own stamps nothing before);
//! 2. says [`Record::Hello`];
//! 3. samples [`SENSORS`] sensors at 100 Hz ([`TestSignal`]: sensor 1 has
//!    one spike) through a [`NodeSensor`] each (a 1 s window, an EWMA
//!    z-score detector, a DDSketch of the values and a HyperLogLog of the tag
//!    ids), all in static memory, and sends each closed window's aggregate
//!    and sketches and each alert as framed records;
//! 4. after [`READINGS`] readings a sensor, closes the open windows, sends
//!    [`Record::Stats`] (readings, CPU cycles by SysTick, records it could
//!    not send) and sleeps.
//!
//! In QEMU the sampling runs as fast as the emulator goes (the readings'
//! times step by 10 ms regardless); a real node paces it with a timer.

#![no_std]
#![no_main]

use core::ptr::{read_volatile, write_volatile};

use cortex_m::peripheral::SYST;
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::entry;
use panic_halt as _;
use sluice_core::link::{Deframer, MAX_FRAME, Record, SketchKind, encode};
use sluice_core::node::{NodeOutput, NodeSensor, TestSignal};

/// Sensors on this node.
const SENSORS: usize = 4;
/// Readings a sensor takes before the run ends: 6 s at 100 Hz.
const READINGS: u64 = 600;
/// Sampling period, ms.
const PERIOD_MS: i64 = 10;
/// Window length, ms.
const WINDOW_MS: i64 = 1_000;
/// The signal's seed (the gateway's test recomputes the readings from it).
const SEED: u64 = 0x5EED_0001;
/// Sensor 1 spikes at its reading 250.
const SPIKE: (usize, u64) = (1, 250);
/// The node's id, and its series' ids.
const NODE: &str = "node-1";
const SERIES: [&str; SENSORS] = ["node-1/s0", "node-1/s1", "node-1/s2", "node-1/s3"];
/// DDSketch storage: 417 buckets a sign keep every value in [1, 4096] (a
/// 12-bit ADC) within 1 %.
const BUCKETS: usize = 2 * 417;
/// HyperLogLog storage for 1,024 registers (3.2 % error merged).
const HLL_BYTES: usize = 1_536;

type Sensor = NodeSensor<BUCKETS, HLL_BYTES>;

/// The CMSDK APB UART of the MPS2 images (UART0).
struct Uart;

impl Uart {
    const BASE: usize = 0x4000_4000;
    const DATA: usize = Self::BASE;
    const STATE: usize = Self::BASE + 0x4;
    const CTRL: usize = Self::BASE + 0x8;
    const BAUDDIV: usize = Self::BASE + 0x10;
    const TX_FULL: u32 = 1;
    const RX_FULL: u32 = 2;

    fn init() -> Self {
        // SAFETY: the UART's registers on this board; nothing else touches
        // them. 16 is the smallest divider the UART accepts; enable TX and RX.
        unsafe {
            write_volatile(Self::BAUDDIV as *mut u32, 16);
            write_volatile(Self::CTRL as *mut u32, 0b11);
        }
        Uart
    }

    fn state(&self) -> u32 {
        // SAFETY: a read of the UART's status register.
        unsafe { read_volatile(Self::STATE as *const u32) }
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            while self.state() & Self::TX_FULL != 0 {}
            // SAFETY: the data register, written when TX has room.
            unsafe { write_volatile(Self::DATA as *mut u32, u32::from(b)) };
        }
    }

    fn read(&mut self) -> Option<u8> {
        if self.state() & Self::RX_FULL == 0 {
            return None;
        }
        // SAFETY: the data register, read when RX holds a byte.
        Some(unsafe { read_volatile(Self::DATA as *const u32) } as u8)
    }
}

/// Counts CPU cycles with SysTick on the processor clock (24 bits, read
/// often enough that it wraps at most once between reads).
struct Cycles {
    /// Held so that nothing else reconfigures SysTick.
    _syst: SYST,
    last: u32,
    total: u64,
}

impl Cycles {
    const MASK: u32 = 0x00FF_FFFF;

    fn start(mut syst: SYST) -> Self {
        syst.set_clock_source(SystClkSource::Core);
        syst.set_reload(Self::MASK);
        syst.clear_current();
        syst.enable_counter();
        let last = SYST::get_current();
        Self {
            _syst: syst,
            last,
            total: 0,
        }
    }

    /// Cycles since the last call (SysTick counts down).
    fn lap(&mut self) -> u64 {
        let now = SYST::get_current();
        let d = self.last.wrapping_sub(now) & Self::MASK;
        self.last = now;
        u64::from(d)
    }

    fn count(&mut self) {
        self.total += self.lap();
    }

    /// Leaves the cycles since the last call uncounted.
    fn skip(&mut self) {
        self.lap();
    }
}

/// Waits for the gateway's sync record; returns its time.
fn wait_for_sync(uart: &mut Uart) -> i64 {
    let mut deframer = Deframer::new();
    loop {
        if let Some(b) = uart.read() {
            deframer.feed(&[b]);
            while let Some(r) = deframer.next() {
                if let Ok(Record::Sync { unix_ms }) = r {
                    return unix_ms;
                }
            }
        }
    }
}

/// Sends a record; counts one it could not encode.
fn send(uart: &mut Uart, frame: &mut [u8; MAX_FRAME], record: &Record<'_>, unsent: &mut u64) {
    match encode(record, frame) {
        Ok(n) => uart.write(&frame[..n]),
        Err(_) => *unsent += 1,
    }
}

/// Sends a sensor's output: a closed window (aggregate, then its sketches)
/// or an alert.
fn send_output(
    uart: &mut Uart,
    series: &str,
    out: NodeOutput<'_, BUCKETS, HLL_BYTES>,
    unsent: &mut u64,
) {
    let mut frame = [0u8; MAX_FRAME];
    let mut sketch = [0u8; MAX_FRAME];
    match out {
        NodeOutput::Window {
            closed,
            quantiles,
            distinct,
        } => {
            let (start, end) = (closed.start, closed.end);
            // The sketches first: the window record that follows commits
            // the node window at the gateway.
            for kind in [SketchKind::Quantiles, SketchKind::Distinct] {
                let written = match kind {
                    SketchKind::Quantiles => quantiles.write_to(&mut sketch),
                    SketchKind::Distinct => distinct.write_to(&mut sketch),
                };
                let Ok(n) = written else {
                    *unsent += 1;
                    continue;
                };
                let record = Record::Sketch {
                    series,
                    start,
                    end,
                    kind,
                    bytes: &sketch[..n],
                };
                send(uart, &mut frame, &record, unsent);
            }
            let record = Record::Window {
                series,
                start,
                end,
                aggregate: closed.acc,
            };
            send(uart, &mut frame, &record, unsent);
        }
        NodeOutput::Alert {
            ts,
            value,
            score,
            level,
            raised,
        } => {
            let record = Record::Alert {
                series,
                ts,
                value,
                score,
                level,
                raised,
            };
            send(uart, &mut frame, &record, unsent);
        }
    }
}

#[entry]
fn main() -> ! {
    let peripherals = cortex_m::Peripherals::take().unwrap();
    let mut uart = Uart::init();
    let sensors: &'static mut [Sensor; SENSORS] = cortex_m::singleton!(
        : [Sensor; SENSORS] = core::array::from_fn(|_| {
            Sensor::new(WINDOW_MS, Sensor::default_detector(), 0.01).unwrap()
        })
    )
    .unwrap();
    let mut signals: [TestSignal; SENSORS] = core::array::from_fn(|s| {
        let spike = (s == SPIKE.0).then_some(SPIKE.1);
        TestSignal::new(SEED, s as u32, spike)
    });

    let base = wait_for_sync(&mut uart);
    // Windows align to the node's clock: the first starts at a multiple of
    // the window after the sync.
    let t0 = (base.div_euclid(WINDOW_MS) + 1) * WINDOW_MS;
    let mut unsent = 0u64;
    let mut frame = [0u8; MAX_FRAME];
    send(
        &mut uart,
        &mut frame,
        &Record::Hello {
            node: NODE,
            window_ms: WINDOW_MS as u32,
        },
        &mut unsent,
    );

    let mut cycles = Cycles::start(peripherals.SYST);
    for i in 0..READINGS {
        let ts = t0 + i as i64 * PERIOD_MS;
        for (s, sensor) in sensors.iter_mut().enumerate() {
            let (value, tag) = signals[s].next_reading();
            // A reading in order is never refused; a refusal would be a bug
            // here, and shows as a missing count at the gateway.
            let _ = sensor.push(ts, value, &tag.to_le_bytes(), |out| {
                send_output(&mut uart, SERIES[s], out, &mut unsent)
            });
            cycles.count();
        }
    }
    let end = t0 + READINGS as i64 * PERIOD_MS;
    for (s, sensor) in sensors.iter_mut().enumerate() {
        sensor.advance_to(end, |out| {
            send_output(&mut uart, SERIES[s], out, &mut unsent)
        });
    }
    cycles.skip();
    send(
        &mut uart,
        &mut frame,
        &Record::Stats {
            readings: READINGS * SENSORS as u64,
            cycles: cycles.total,
            unsent,
        },
        &mut unsent,
    );
    loop {
        cortex_m::asm::wfi();
    }
}
