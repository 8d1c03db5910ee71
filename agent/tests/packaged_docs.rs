//! The manual pages and shell completions the package ships are rendered
//! from the command line itself (clap_mangen, clap_complete) and must match
//! it: `SLUICE_BLESS=1 cargo test -p sluice --test packaged_docs` rewrites
//! them after a change to the CLI.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::CommandFactory;
use clap_complete::Shell;
use sluice::cli::Cli;

/// Every generated file, by its path under `packaging/deb/`.
fn generated() -> BTreeMap<PathBuf, Vec<u8>> {
    let mut files = BTreeMap::new();
    let cmd = Cli::command();
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .render(&mut page)
        .unwrap();
    files.insert(PathBuf::from("man/sluice.1"), page);
    for sub in cmd.get_subcommands() {
        let name = format!("sluice-{}", sub.get_name());
        let mut page = Vec::new();
        // clap takes `&'static str` names (its `string` feature is off).
        let sub = sub
            .clone()
            .name(name.clone().leak() as &'static str)
            .bin_name(format!("sluice {}", sub.get_name()).leak() as &'static str)
            .version(env!("CARGO_PKG_VERSION"));
        clap_mangen::Man::new(sub).render(&mut page).unwrap();
        files.insert(PathBuf::from(format!("man/{name}.1")), page);
    }
    for (shell, file) in [
        (Shell::Bash, "completions/sluice.bash"),
        (Shell::Zsh, "completions/_sluice"),
        (Shell::Fish, "completions/sluice.fish"),
    ] {
        let mut text = Vec::new();
        clap_complete::generate(shell, &mut Cli::command(), "sluice", &mut text);
        files.insert(PathBuf::from(file), text);
    }
    files
}

#[test]
fn the_packaged_manual_pages_and_completions_are_current() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../packaging/deb");
    let bless = std::env::var_os("SLUICE_BLESS").is_some();
    for (path, content) in generated() {
        let at = root.join(&path);
        if bless {
            std::fs::create_dir_all(at.parent().unwrap()).unwrap();
            std::fs::write(&at, &content).unwrap();
            continue;
        }
        let shipped = std::fs::read(&at).unwrap_or_default();
        assert!(
            shipped == content,
            "packaging/deb/{} is not current: SLUICE_BLESS=1 cargo test -p sluice --test packaged_docs",
            path.display()
        );
    }
}
