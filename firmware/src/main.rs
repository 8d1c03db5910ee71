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
//!    ids), all in static memory, and sends each closed window's sketches
//!    then its aggregate, and each alert, as framed records;
//! 4. after [`READINGS`] readings a sensor, closes the open windows, sends
//!    [`Record::Stats`] (readings, CPU cycles by SysTick, records it could
//!    not send, the deepest stack) and sleeps.
//!
//! In QEMU the sampling runs as fast as the emulator goes (the readings'
//! times step by 10 ms regardless); a real node paces it with a timer.

#![no_std]
#![no_main]

use core::mem::MaybeUninit;
use core::ptr::{read_volatile, write_volatile};

use cortex_m::peripheral::SYST;
use cortex_m::peripheral::syst::SystClkSource;
use cortex_m_rt::entry;
use panic_halt as _;
use sluice_core::link::{Deframer, MAX_FRAME, Record, SketchKind, encode};
use sluice_core::node::{NodeOutput, NodeSensor, TestSignal, reference};

/// Sensors on this node.
const SENSORS: usize = reference::SENSORS as usize;
/// Readings a sensor takes before the run ends: 6 s at 100 Hz, or
/// `SLUICE_NODE_READINGS` at build time.
const READINGS: u64 = number_or(option_env!("SLUICE_NODE_READINGS"), reference::READINGS);
/// Sampling period, ms.
const PERIOD_MS: i64 = reference::PERIOD_MS;
/// Window length, ms: 1 s, or `SLUICE_NODE_WINDOW_MS` at build time.
const WINDOW_MS: i64 = number_or(
    option_env!("SLUICE_NODE_WINDOW_MS"),
    reference::WINDOW_MS as u64,
) as i64;

/// A build-time setting's decimal value, or `default` when it is unset; a
/// setting that is not a number fails the build.
const fn number_or(setting: Option<&str>, default: u64) -> u64 {
    let Some(text) = setting else {
        return default;
    };
    let bytes = text.as_bytes();
    assert!(!bytes.is_empty(), "an empty build-time setting");
    let mut n = 0u64;
    let mut i = 0;
    while i < bytes.len() {
        assert!(
            bytes[i].is_ascii_digit(),
            "a build-time setting that is not a number"
        );
        n = n * 10 + (bytes[i] - b'0') as u64;
        i += 1;
    }
    n
}

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

// The stack's bounds, from cortex-m-rt's linker script.
unsafe extern "C" {
    /// The end of `.bss`: the stack may grow down to here.
    static __ebss: u32;
    /// The stack's top (its first push goes below it).
    static _stack_start: u32;
}

/// What [`paint_stack`] writes into the unused stack.
const PAINT: u32 = 0x5A5A_A5A5;
/// How far below the stack's top it paints: more than the firmware uses.
const PAINTED: usize = 64 * 1024;

fn stack_floor() -> usize {
    let ebss = core::ptr::addr_of!(__ebss) as usize;
    let top = core::ptr::addr_of!(_stack_start) as usize;
    ebss.max(top - PAINTED)
}

/// Fills the stack below the current frame with [`PAINT`], so that
/// [`stack_used`] can tell how deep it ever went.
#[inline(never)]
fn paint_stack() {
    let sp = cortex_m::register::msp::read() as usize;
    // Leave room below the stack pointer for this function's own calls.
    let mut addr = stack_floor();
    while addr + 256 < sp {
        // SAFETY: below the live stack and above .bss: memory nothing uses
        // yet (no interrupts are enabled), word-aligned.
        unsafe { write_volatile(addr as *mut u32, PAINT) };
        addr += 4;
    }
}

/// The most stack used since [`paint_stack`], in bytes.
fn stack_used() -> u32 {
    let top = core::ptr::addr_of!(_stack_start) as usize;
    let mut addr = stack_floor();
    // SAFETY: reads of words between the painted floor and the stack's top.
    while addr < top && unsafe { read_volatile(addr as *const u32) } == PAINT {
        addr += 4;
    }
    (top - addr) as u32
}

/// Waits for the gateway's sync record; returns its time.
fn wait_for_sync(uart: &mut Uart) -> i64 {
    // The sync frame is 18 bytes: no need for room for longer ones.
    let mut deframer: Deframer<64> = Deframer::with_buffer();
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

/// The UART and the buffers records are encoded in (static, not on the
/// stack: a sketch frame may take 4 KiB).
struct Link {
    uart: Uart,
    frame: &'static mut [u8; MAX_FRAME],
    sketch: &'static mut [u8; MAX_FRAME],
    /// Records made but not encodable (too large for a frame).
    unsent: u64,
}

impl Link {
    /// Sends a record; counts one it could not encode.
    fn send(&mut self, record: &Record<'_>) {
        match encode(record, self.frame) {
            Ok(n) => self.uart.write(&self.frame[..n]),
            Err(_) => self.unsent += 1,
        }
    }
}

/// Sends a sensor's output: a closed window (aggregate, then its sketches)
/// or an alert.
fn send_output(link: &mut Link, series: &str, out: NodeOutput<'_, BUCKETS, HLL_BYTES>) {
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
                    SketchKind::Quantiles => quantiles.write_to(link.sketch),
                    SketchKind::Distinct => distinct.write_to(link.sketch),
                };
                let Ok(n) = written else {
                    link.unsent += 1;
                    continue;
                };
                let sketch: &[u8] = &link.sketch[..n];
                let record = Record::Sketch {
                    series,
                    start,
                    end,
                    kind,
                    bytes: sketch,
                };
                match encode(&record, link.frame) {
                    Ok(n) => link.uart.write(&link.frame[..n]),
                    Err(_) => link.unsent += 1,
                }
            }
            link.send(&Record::Window {
                series,
                start,
                end,
                aggregate: closed.acc,
            });
        }
        NodeOutput::Alert {
            ts,
            value,
            score,
            level,
            raised,
        } => {
            link.send(&Record::Alert {
                series,
                ts,
                value,
                score,
                level,
                raised,
            });
        }
    }
}

#[entry]
fn main() -> ! {
    paint_stack();
    let peripherals = cortex_m::Peripherals::take().unwrap();
    let mut uart = Uart::init();
    // The sensors' state (about 8 KiB each) is built in place, one at a
    // time, in static memory.
    let slots = cortex_m::singleton!(
        : MaybeUninit<[Sensor; SENSORS]> = MaybeUninit::uninit()
    )
    .unwrap();
    let first = slots.as_mut_ptr().cast::<Sensor>();
    for s in 0..SENSORS {
        let sensor = Sensor::new(WINDOW_MS, Sensor::default_detector(), 0.01).unwrap();
        // SAFETY: `s` < SENSORS: a slot of the array, written once.
        unsafe { first.add(s).write(sensor) };
    }
    // SAFETY: every slot was written above.
    let sensors = unsafe { slots.assume_init_mut() };
    // The signals the gateway's test regenerates (sensor 1 spikes once).
    let mut signals: [TestSignal; SENSORS] = core::array::from_fn(|s| reference::signal(s as u32));

    let base = wait_for_sync(&mut uart);
    let mut link = Link {
        uart,
        frame: cortex_m::singleton!(: [u8; MAX_FRAME] = [0; MAX_FRAME]).unwrap(),
        sketch: cortex_m::singleton!(: [u8; MAX_FRAME] = [0; MAX_FRAME]).unwrap(),
        unsent: 0,
    };
    // Windows align to the node's clock: the first starts at a multiple of
    // the window after the sync.
    let t0 = (base.div_euclid(WINDOW_MS) + 1) * WINDOW_MS;
    link.send(&Record::Hello {
        node: NODE,
        window_ms: WINDOW_MS as u32,
    });

    let mut cycles = Cycles::start(peripherals.SYST);
    for i in 0..READINGS {
        let ts = t0 + i as i64 * PERIOD_MS;
        for (s, sensor) in sensors.iter_mut().enumerate() {
            let (value, tag) = signals[s].next_reading();
            // A reading in order is never refused; a refusal would be a bug
            // here, and shows as a missing count at the gateway.
            let _ = sensor.push(ts, value, &tag.to_le_bytes(), |out| {
                send_output(&mut link, SERIES[s], out)
            });
            cycles.count();
        }
    }
    let end = t0 + READINGS as i64 * PERIOD_MS;
    for (s, sensor) in sensors.iter_mut().enumerate() {
        sensor.advance_to(end, |out| send_output(&mut link, SERIES[s], out));
    }
    cycles.skip();
    let stats = Record::Stats {
        readings: READINGS * SENSORS as u64,
        cycles: cycles.total,
        unsent: link.unsent,
        stack_bytes: stack_used(),
    };
    link.send(&stats);
    loop {
        cortex_m::asm::wfi();
    }
}
