//! `qairt-sim`: a deterministic stand-in for the proprietary QAIRT SDK tools.
//!
//! One multi-call binary: it runs the tool named by basename(argv[0]) when that is a
//! known tool name, else the tool named by argv[1] (`qairt-sim <tool> ARGS...`).
//! Outputs are deterministic functions of the input bytes and the non-path flags.
//! See docs/qairt-sim.md.

mod cli;
mod device;
mod emit;
mod formats;
mod tools;

#[cfg(test)]
mod tests;

use std::ffi::OsString;
use std::io::Write;
use std::path::Path;

/// SDK version the simulator reports (matches sim-sdk/sdk.yaml).
pub const SIM_VERSION: &str = "2.31.0.250130";

/// Why a tool stopped.
#[derive(Debug)]
pub enum SimError {
    /// Bad command line or environment: exit 2.
    Usage(String),
    /// Bad `QAIRT_SIM_*` environment variable: exit 2.
    Env(String),
    /// Missing or malformed input, I/O failure: exit 1.
    Failed(String),
    /// `QAIRT_SIM_FAIL` matched this output path: exit 1.
    Injected(String),
}

fn main() {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let code = real_main(&argv);
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

fn say(line: &str) {
    let _ = writeln!(std::io::stdout(), "{line}");
}

fn complain(line: &str) {
    let _ = writeln!(std::io::stderr(), "{line}");
}

fn help() -> String {
    let mut s = format!(
        "qairt-sim {SIM_VERSION}: deterministic stand-in for the QAIRT SDK tools\n\n\
         usage: qairt-sim <tool> [ARGS...]\n   \
         or: <tool> [ARGS...]   (through a link or sim-sdk wrapper named after the tool)\n\n\
         tools:\n"
    );
    for t in tools::TOOLS {
        s.push_str(&format!("  {:<30} {}\n", t.name, t.about));
    }
    s.push_str(&format!(
        "  {:<30} {}\n",
        "adb",
        "(Android's platform tools) push to, pull from, and run on a device that is a folder"
    ));
    s.push_str(
        "\nrun '<tool> --help' for a tool's flags.\n\n\
         environment:\n  \
         QAIRT_SIM_SCALE=<MiB>     payload size per output file (default 4 KiB)\n  \
         QAIRT_SIM_WORK_MS=<ms>    sleep this long per invocation\n  \
         QAIRT_SIM_FAIL=<substr>   fail (exit 1, truncated output) when an output path contains it\n  \
         QAIRT_SIM_DEVICE=<dir>    the folder adb treats as the device (default: <temp>/qairt-sim-device-$USER)\n",
    );
    s
}

fn real_main(argv: &[OsString]) -> i32 {
    let arg0 = argv
        .first()
        .and_then(|a| Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    // `adb` is no QAIRT tool (it comes with Android's platform tools) and takes no flags
    // table: its own small parser.
    if arg0 == "adb" {
        return device::adb_main(argv.get(1..).unwrap_or(&[]));
    }
    let (tool, rest) = match tools::find(arg0) {
        Some(t) => (t, argv.get(1..).unwrap_or(&[])),
        None => {
            let first = argv.get(1).map(|a| a.to_string_lossy().into_owned());
            match first.as_deref() {
                None => {
                    complain(&help());
                    return 2;
                }
                Some("-h" | "--help" | "help") => {
                    say(&help());
                    return 0;
                }
                Some("--version") => {
                    say(&format!("qairt-sim {SIM_VERSION}"));
                    return 0;
                }
                Some("adb") => return device::adb_main(argv.get(2..).unwrap_or(&[])),
                Some(name) => match tools::find(name) {
                    Some(t) => (t, argv.get(2..).unwrap_or(&[])),
                    None => {
                        complain(&format!(
                            "qairt-sim: error: unknown tool '{}' (run 'qairt-sim --help' for the list)",
                            cli::sanitize(name)
                        ));
                        return 2;
                    }
                },
            }
        }
    };
    let mut ctx = match emit::Ctx::from_env() {
        Ok(c) => c,
        Err(e) => return report_error(tool.name, e),
    };
    let result = tools::run(tool, &mut ctx, rest);
    for line in &ctx.report {
        say(line);
    }
    match result {
        Ok(tools::Outcome::Ran) => 0,
        Ok(tools::Outcome::Help(text)) | Ok(tools::Outcome::Version(text)) => {
            say(&text);
            0
        }
        Err(e) => report_error(tool.name, e),
    }
}

fn report_error(tool: &str, e: SimError) -> i32 {
    match e {
        SimError::Usage(msg) => {
            complain(&format!(
                "{tool}: error: {msg} (run '{tool} --help' for usage)"
            ));
            2
        }
        SimError::Env(msg) => {
            complain(&format!("{tool}: error: {msg}"));
            2
        }
        SimError::Failed(msg) => {
            complain(&format!("{tool}: error: {msg}"));
            1
        }
        SimError::Injected(path) => {
            complain(&format!("qairt-sim: injected failure for {path}"));
            1
        }
    }
}
