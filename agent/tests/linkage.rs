//! How the `sluice` binary is linked, read from the binary cargo built for
//! this test run (`readelf`, from binutils): what it loads at start-up and
//! where its start-up and idle code sit. Both set its idle memory (see
//! ARCHITECTURE.md, "Code layout"; figures in benches/README.md,
//! "Footprint").

#![cfg(target_os = "linux")]

use std::process::Command;

const SLUICE: &str = env!("CARGO_BIN_EXE_sluice");

fn readelf(args: &[&str]) -> String {
    let out = Command::new("readelf")
        .args(args)
        .arg(SLUICE)
        .output()
        .expect("readelf (binutils) runs");
    assert!(out.status.success(), "readelf {args:?}: {out:?}");
    String::from_utf8(out.stdout).expect("readelf prints text")
}

/// The agent's maths uses the `libm` crate, not the C library's libm: with
/// no symbol taken from it, the linker (`--as-needed`) leaves libm.so.6
/// out, and a process neither loads nor relocates it (about 0.5 MiB of its
/// RSS at idle). A new `f64::powf`, `ln`, `sin`… in the agent or in a
/// dependency brings it back; call `libm::` instead. Checked on the
/// packages' profile (`--profile dist`, as CI's aarch64 suite is built):
/// without whole-program LTO, unused functions of dependencies that call
/// libm still count.
#[test]
fn the_agent_does_not_load_the_c_maths_library() {
    if option_env!("SLUICE_DIST").is_none() {
        return;
    }
    let needed: Vec<String> = readelf(&["-d", "-W"])
        .lines()
        .filter(|l| l.contains("(NEEDED)"))
        .map(str::to_owned)
        .collect();
    assert!(!needed.is_empty(), "a dynamically linked binary");
    assert!(
        !needed.iter().any(|l| l.contains("libm.so")),
        "the agent needs libm.so: {needed:#?}; its maths should call the libm crate"
    );
}

/// Optimized builds group the functions that run from start-up to idle at
/// the front of the code (agent/build.rs, agent/link/hot-text.ld); the
/// section exists and holds most of them.
#[test]
fn optimized_builds_group_the_start_up_and_idle_code() {
    if option_env!("SLUICE_HOT_TEXT").is_none() {
        // Unoptimized builds skip the layout (agent/build.rs).
        return;
    }
    let sections = readelf(&["-S", "-W"]);
    let hot = sections
        .lines()
        .find(|l| l.contains(" .text.sluice_hot "))
        .unwrap_or_else(|| panic!("no .text.sluice_hot section:\n{sections}"));
    // [Nr] Name Type Address Off Size ...
    let fields: Vec<&str> = hot.split(']').nth(1).unwrap().split_whitespace().collect();
    let size = u64::from_str_radix(fields[4], 16).unwrap();
    assert!(
        size > 512 * 1024,
        "only {size} bytes matched agent/link/hot-text.ld's patterns: is the list stale?"
    );
}
