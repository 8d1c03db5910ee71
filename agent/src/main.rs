//! The `sluice` binary. A skeleton until the agent lands (issue #5): it only
//! answers `--version`, and says so for anything else.

use std::process::ExitCode;

fn main() -> ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("--version" | "-V") => {
            println!("sluice {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!(
                "sluice {}: the agent's commands are not built yet; only --version works",
                env!("CARGO_PKG_VERSION")
            );
            ExitCode::from(2)
        }
    }
}
