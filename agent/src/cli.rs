//! The command line: `sluice run | check | outbox | sketch | demo`, and how commands
//! print ([`out`]). Defined here, in the library, so that the tests can
//! render the packaged manual pages and shell completions from it; `main.rs`
//! parses it and acts.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Sluice: sensor analytics at the edge.
#[derive(Parser)]
#[command(version, about = "Sluice: a sensor analytics agent for edge gateways")]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Subcommand)]
pub enum Command {
    /// Run the agent with a configuration file.
    Run {
        /// The TOML configuration file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a configuration file and the files it names (TLS, passwords, tables)
    /// and print it with every default filled in.
    Check {
        /// The TOML configuration file.
        #[arg(short, long)]
        config: PathBuf,
        /// Print only notes and errors, not the effective configuration
        /// (for the service's ExecStartPre).
        #[arg(short, long)]
        quiet: bool,
    },
    /// Inspect the outbox named in a configuration file.
    Outbox {
        /// What to do.
        #[command(subcommand)]
        action: OutboxAction,
        /// The TOML configuration file.
        #[arg(short, long, global = true)]
        config: Option<PathBuf>,
    },
    /// Work with the sketches that aggregate records carry.
    Sketch {
        /// What to do.
        #[command(subcommand)]
        action: SketchAction,
    },
    /// Run the pipeline on generated sensors; nothing to install or configure.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        seconds: Option<u64>,
        /// Print the demo's configuration and exit.
        #[arg(long)]
        print_config: bool,
    },
}

/// What `sluice sketch` does.
#[derive(Subcommand)]
pub enum SketchAction {
    /// Merge the distinct-count sketches of aggregate records (JSON lines,
    /// as an upstream subscriber receives them; rules with `sketches =
    /// true`) and print each union's estimate, one JSON line per group.
    Merge {
        /// Files of JSON lines (standard input if none, or `-`).
        files: Vec<PathBuf>,
        /// Group per series and label, or per label across every series
        /// (a fleet's distinct values).
        #[arg(long, value_enum, default_value_t = crate::sketch::MergeBy::Series)]
        by: crate::sketch::MergeBy,
    },
}

/// What `sluice outbox` does.
#[derive(Subcommand)]
pub enum OutboxAction {
    /// Backlog, its bytes, the oldest record's age, the next seq, the epoch,
    /// drops and dead letters (reads only).
    Status,
    /// SQLite's full integrity check and every record's checksum (reads only).
    Verify,
    /// List the records set aside as dead letters, with why (reads only).
    DeadLetters {
        /// Also print each record's payload.
        #[arg(long)]
        payload: bool,
    },
    /// Queue dead letters again, as new records at the end of the outbox.
    Retry {
        /// Their seqs.
        #[arg(required_unless_present = "all")]
        seqs: Vec<i64>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "seqs")]
        all: bool,
    },
    /// Forward what can be read of a damaged outbox file (one the agent
    /// moved aside): its readable records are queued in this outbox, each
    /// keeping its identity (epoch, seq) there, so upstream drops any it
    /// already holds.
    Salvage {
        /// The damaged file (`<outbox>.corrupt-<ms>`).
        file: PathBuf,
    },
    /// Delete dead letters for good.
    Purge {
        /// Their seqs.
        #[arg(required_unless_present = "all")]
        seqs: Vec<i64>,
        /// Every dead letter.
        #[arg(long, conflicts_with = "seqs")]
        all: bool,
    },
}

/// Writes `args` to standard output for a command whose output is what it
/// is for, flushed at once. A reader that went away (`sluice outbox status |
/// head -1`) ends the process quietly with status 0, as ripgrep does; any
/// other failure to write ends it with status 1 and the cause on standard
/// error. Use it through [`outln!`](crate::outln).
pub fn out(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => std::process::exit(0),
        Err(e) => {
            eprintln!("error: cannot write to standard output: {e}");
            std::process::exit(1)
        }
    }
}

/// `println!` for commands, through [`cli::out`](crate::cli::out): a reader
/// that went away ends the command quietly instead of a panic.
#[macro_export]
macro_rules! outln {
    () => {
        $crate::cli::out(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::out(format_args!("{}\n", format_args!($($arg)*)))
    };
}
