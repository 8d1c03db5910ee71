//! The reference sensor-node firmware (`firmware/`) in QEMU: built for
//! thumbv7em-none-eabihf with cargo, booted on QEMU's MPS2 AN386 board
//! (Debian's `qemu-system-arm`), its UART on a pseudo-terminal.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use crate::ChildGuard;

/// The repository's `firmware/` folder.
pub fn firmware_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../firmware")
}

/// Builds the firmware (release) once per test process, as the tests
/// expect it (1 s windows, 600 readings a sensor); returns its ELF.
///
/// Its own target folder (`SLUICE_FIRMWARE_TARGET`, by default
/// `sluice-firmware-target` in the temporary directory), so that this cargo
/// never waits on the lock of the one running the tests. cargo runs inside
/// `firmware/`, whose `.cargo/config.toml` picks the target and the linker
/// script.
pub fn firmware_elf() -> PathBuf {
    static ELF: OnceLock<PathBuf> = OnceLock::new();
    ELF.get_or_init(|| firmware_elf_with(None)).clone()
}

/// Builds the firmware with `(window_ms, readings)` a sensor instead of
/// the defaults (`SLUICE_NODE_WINDOW_MS` and `SLUICE_NODE_READINGS` at build
/// time), in a target folder of its own; returns its ELF.
pub fn firmware_elf_with(settings: Option<(u64, u64)>) -> PathBuf {
    let mut target = std::env::var_os("SLUICE_FIRMWARE_TARGET")
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("sluice-firmware-target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut command = std::process::Command::new(cargo);
    command
        .current_dir(firmware_dir())
        .args(["build", "--release", "--locked", "--quiet"])
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .env_remove("SLUICE_NODE_WINDOW_MS")
        .env_remove("SLUICE_NODE_READINGS");
    if let Some((window_ms, readings)) = settings {
        target = target.join(format!("w{window_ms}-r{readings}"));
        command
            .env("SLUICE_NODE_WINDOW_MS", window_ms.to_string())
            .env("SLUICE_NODE_READINGS", readings.to_string());
    }
    let out = command
        .env("CARGO_TARGET_DIR", &target)
        .output()
        .expect("run cargo to build the firmware");
    assert!(
        out.status.success(),
        "building the firmware failed (is the thumbv7em-none-eabihf target installed? \
         `rustup target add thumbv7em-none-eabihf`):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    target.join("thumbv7em-none-eabihf/release/sluice-firmware")
}

/// QEMU running the firmware; killed when dropped.
pub struct Qemu {
    /// The pseudo-terminal of the board's UART0 (`/dev/pts/N`).
    pub pty: PathBuf,
    _child: ChildGuard,
}

impl Qemu {
    /// Boots `elf` on an MPS2 AN386 (Cortex-M4) with UART0 on a new
    /// pseudo-terminal, plus `extra` arguments (`-icount shift=0`, say).
    pub fn start(elf: &Path, extra: &[&str]) -> Qemu {
        let mut child = std::process::Command::new("qemu-system-arm")
            .args(["-M", "mps2-an386", "-display", "none", "-monitor", "none"])
            .args(["-serial", "pty", "-kernel"])
            .arg(elf)
            .args(extra)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .expect("start qemu-system-arm (Debian's qemu-system-arm package)");
        let stdout = child.stdout.take().expect("piped");
        let mut lines = BufReader::new(stdout).lines();
        // "char device redirected to /dev/pts/3 (label serial0)"
        let pty = loop {
            let line = lines
                .next()
                .expect("QEMU ended before naming its pseudo-terminal")
                .expect("QEMU's output");
            if let Some(rest) = line.split("redirected to ").nth(1) {
                break PathBuf::from(rest.split_whitespace().next().unwrap_or_default());
            }
        };
        // Keep draining QEMU's output so that it never blocks on it.
        std::thread::spawn(move || for _ in lines {});
        Qemu {
            pty,
            _child: ChildGuard(child),
        }
    }
}
