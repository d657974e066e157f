//! Command-line arguments, turned once into a validated configuration before any work starts.

use std::path::PathBuf;

use clap::Parser;

/// qbuild: an incremental, content-hashed build system for the QAIRT LLM compile pipeline.
#[derive(Debug, Parser)]
#[command(
    name = "qbuild",
    version,
    about,
    // `-j 8 ... -j 2`: the last one counts (as with make and ninja).
    args_override_self = true,
    after_help = "TARGETS are output paths, rule names, aliases, or `all`; without any, the Qairtfile's `default` (or `all`).\nExit status: 0 built, 1 a job failed, 2 bad Qairtfile or arguments, 130/143 interrupted."
)]
pub struct Args {
    /// What to build.
    pub targets: Vec<String>,
    /// The Qairtfile to read (its folder is the work folder).
    #[arg(
        short = 'f',
        long = "file",
        value_name = "FILE",
        default_value = "Qairtfile"
    )]
    pub file: PathBuf,
    /// Change to DIR before doing anything (each -C relative to the one before, as in make).
    #[arg(short = 'C', value_name = "DIR", action = clap::ArgAction::Append)]
    pub dir: Vec<PathBuf>,
    /// Run N jobs at once, N >= 1 (default: the number of CPUs).
    #[arg(short = 'j', long = "jobs", value_name = "N", value_parser = jobs)]
    pub jobs: Option<std::num::NonZeroUsize>,
    /// Keep building what does not depend on a failed job.
    #[arg(short = 'k', long = "keep-going")]
    pub keep_going: bool,
    /// Show what would run, without running anything (with --explain, why).
    #[arg(short = 'n', long = "dry-run")]
    pub dry_run: bool,
    /// Print why each stale job must run.
    #[arg(long)]
    pub explain: bool,
    /// Write JSON Lines events to stdout.
    #[arg(long)]
    pub json: bool,
    /// Stream each command's output live (it is always kept in the job's log).
    #[arg(short = 'v', long)]
    pub verbose: bool,
    /// Validate the Qairtfile and exit without running anything.
    #[arg(long, conflicts_with_all = ["list", "clean", "clean_dead", "status"])]
    pub check: bool,
    /// List rules, their instances and outputs (with targets: what building them involves).
    #[arg(long, conflicts_with_all = ["clean", "clean_dead", "status"])]
    pub list: bool,
    /// Print the job graph of the targets in Graphviz DOT.
    #[arg(long, conflicts_with_all = ["list", "json", "check", "clean", "clean_dead", "status"])]
    pub graph: bool,
    /// Remove the outputs qbuild made for the targets (default: all) and the folders that
    /// leaves empty; never a source or a file changed since.
    #[arg(long)]
    pub clean: bool,
    /// Remove what jobs no longer in the Qairtfile made (a dropped split, a renamed
    /// output), as `ninja -t cleandead`. Another Qairtfile or variant built in this folder
    /// shares its state: its outputs look the same.
    #[arg(long = "clean-dead", conflicts_with = "clean")]
    pub clean_dead: bool,
    /// Show what is stale and why, without running anything.
    #[arg(long, conflicts_with_all = ["clean", "clean_dead"])]
    pub status: bool,
    /// Write a Chrome trace-event JSON of the build (open it in Perfetto).
    #[arg(long, value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Build, then watch the sources and the Qairtfile and rebuild on every change.
    #[arg(long, conflicts_with_all = ["check", "list", "graph", "clean", "clean_dead", "status", "dry_run"])]
    pub watch: bool,
    /// Fail at once instead of waiting when another build holds the work folder.
    #[arg(long = "no-wait")]
    pub no_wait: bool,
}

/// `-j N`: a whole number of at least 1 (make refuses 0 too; ninja's "no limit" would start
/// every ready QAIRT job at once, tens of GB of RAM each).
fn jobs(v: &str) -> Result<std::num::NonZeroUsize, String> {
    match v.parse::<usize>() {
        Ok(n) => std::num::NonZeroUsize::new(n).ok_or_else(|| "use 1 or more".to_string()),
        Err(_) => Err("a whole number of jobs, 1 or more".to_string()),
    }
}
