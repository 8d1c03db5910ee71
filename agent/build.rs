//! Links the `sluice` binary with `link/hot-text.ld` in optimized Linux
//! builds: the functions the agent runs from start-up to idle, grouped at
//! the front of its code so that the pages the kernel maps for them are few
//! (idle RSS; see `link/hot-text.ld` and ARCHITECTURE.md, "Code layout").
//! Unoptimized builds skip it: their layout does not matter, and matching the
//! patterns against a debug build's sections would only slow the link.

use std::env;
use std::path::Path;

fn main() {
    let script = Path::new(&env::var("CARGO_MANIFEST_DIR").expect("set by cargo"))
        .join("link")
        .join("hot-text.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");
    let linux = env::var("CARGO_CFG_TARGET_OS").is_ok_and(|os| os == "linux");
    let optimized = env::var("OPT_LEVEL").is_ok_and(|level| level != "0");
    if linux && optimized {
        println!(
            "cargo:rustc-link-arg-bin=sluice=-Wl,-T,{}",
            script.display()
        );
        // Tells tests/linkage.rs to look for the section.
        println!("cargo:rustc-env=SLUICE_HOT_TEXT=1");
    }
    // The packages' profile (whole-program LTO, which drops every unused
    // function and so every unused import): tests/linkage.rs checks what
    // the binary loads. Cargo names the profile's output folder after it:
    // OUT_DIR is <target>/[<triple>/]<profile>/build/sluice-<hash>/out.
    let out_dir = env::var("OUT_DIR").unwrap_or_default();
    let profile = Path::new(&out_dir)
        .ancestors()
        .nth(3)
        .and_then(Path::file_name);
    if profile.is_some_and(|p| p == "dist") {
        println!("cargo:rustc-env=SLUICE_DIST=1");
    }
}
