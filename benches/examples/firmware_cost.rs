//! The reference firmware's cost and its link's bytes, measured in QEMU.
//!
//! Boots `firmware/` on QEMU's MPS2 AN386 (Cortex-M4) with `-icount
//! shift=0`, so that the emulated clock advances one nanosecond per
//! instruction, whatever the host's speed; plays the gateway on the UART's
//! pseudo-terminal (sends the sync, reads the frames); and prints:
//!
//! - instructions per reading: the firmware counts SysTick ticks of the
//!   board's 25 MHz processor clock over its sampling loop (pipeline,
//!   encoding and UART writes), one tick per 40 instructions under
//!   `shift=0`;
//! - the bytes it sent per record kind, and per sensor and minute against
//!   the same readings sent raw as JSON lines (W1's shape plus the tag).
//!
//! `cargo run --release -p sluice-benches --example firmware_cost [--
//! --window-ms MS --seconds S]` (needs `qemu-system-arm` and the
//! thumbv7em-none-eabihf target): by default the firmware as the tests run
//! it, 1 s windows for 6 s; with the options, built with that window and
//! run for that long.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use sluice_core::link::{Deframer, MAX_FRAME, Record, encode};
use sluice_core::node::reference::{PERIOD_MS, READINGS, SENSORS, signal};
use sluice_tests::firmware::{Qemu, firmware_elf, firmware_elf_with};

/// Instructions per SysTick tick under `-icount shift=0` (1 ns each) with
/// the board's 25 MHz processor clock.
const INSTRUCTIONS_PER_TICK: f64 = 1e9 / 25e6;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let option = |name: &str| -> Option<u64> {
        let at = args.iter().position(|a| a == name)?;
        Some(
            args.get(at + 1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} needs a whole number")),
        )
    };
    let (elf, readings_each) = match (option("--window-ms"), option("--seconds")) {
        (None, None) => (firmware_elf(), READINGS),
        (window, seconds) => {
            let readings = seconds.unwrap_or(6) * 1_000 / PERIOD_MS as u64;
            (
                firmware_elf_with(Some((window.unwrap_or(1_000), readings))),
                readings,
            )
        }
    };
    let qemu = Qemu::start(&elf, &["-icount", "shift=0"]);
    let mut port = tokio_serial::new(qemu.pty.to_string_lossy(), 115_200)
        .timeout(Duration::from_secs(30))
        .open_native()
        .expect("open the board's UART");
    let mut frame = [0u8; MAX_FRAME];
    let n = encode(
        &Record::Sync {
            unix_ms: 1_796_000_000_000,
        },
        &mut frame,
    )
    .unwrap();
    port.write_all(&frame[..n]).unwrap();

    let mut d = Deframer::new();
    let mut buf = [0u8; 4096];
    let mut bytes: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
    let mut total = 0u64;
    let (readings, cycles, unsent, stack) = 'read: loop {
        let got = port.read(&mut buf).expect("read the board's UART");
        let mut fed = 0;
        while fed < got {
            fed += d.feed(&buf[fed..got]);
            while let Some(r) = d.next() {
                let r = r.expect("a good frame");
                let kind = match &r {
                    Record::Hello { .. } => "hello",
                    Record::Window { .. } => "window",
                    Record::Sketch { .. } => "sketch",
                    Record::Alert { .. } => "alert",
                    Record::Stats { .. } => "stats",
                    Record::Sync { .. } => "sync",
                };
                // The frame's length: every record's layout is fixed by its
                // fields, so encoding it again gives the bytes it took.
                let len = encode(&r, &mut frame).expect("a record read re-encodes") as u64;
                let e = bytes.entry(kind).or_default();
                e.0 += 1;
                e.1 += len;
                total += len;
                if let Record::Stats {
                    readings,
                    cycles,
                    unsent,
                    stack_bytes,
                } = r
                {
                    break 'read (readings, cycles, unsent, stack_bytes);
                }
            }
        }
    };
    drop(qemu);

    // The same readings as JSON lines, as a node without the core sends them.
    let mut raw = 0u64;
    for s in 0..SENSORS {
        let mut signal = signal(s);
        for i in 0..readings_each as i64 {
            let (v, tag) = signal.next_reading();
            let ts = 1_796_000_001_000 + i * PERIOD_MS;
            raw += format!(r#"{{"sensor":"node-1/s{s}","ts":{ts},"value":{v},"tag":{tag}}}"#).len()
                as u64
                + 1;
        }
    }
    let seconds = readings_each as f64 * PERIOD_MS as f64 / 1000.0;
    let per_minute = |b: u64| b as f64 / SENSORS as f64 / seconds * 60.0;
    println!("stack: at most {stack} bytes");
    println!(
        "readings {readings}, SysTick cycles {cycles}, unsent {unsent}: {:.0} instructions a reading (QEMU -icount shift=0)",
        cycles as f64 * INSTRUCTIONS_PER_TICK / readings as f64
    );
    for (kind, (n, b)) in &bytes {
        println!("{kind:>7}: {n:>4} frames, {b:>6} bytes");
    }
    println!(
        "link: {total} bytes for {seconds} s of {SENSORS} sensors at 100 Hz: {:.0} bytes a sensor and minute",
        per_minute(total)
    );
    println!(
        "raw JSON lines: {raw} bytes: {:.0} bytes a sensor and minute ({:.1}x the link)",
        per_minute(raw),
        raw as f64 / total as f64
    );
}
