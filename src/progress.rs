//! Build progress behind one seam: a plain line per finished job (CI, pipes, tests) or an indicatif bar on a terminal.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

pub trait Progress {
    /// A job started running.
    fn started(&mut self, label: &str);
    /// A job that ran has ended; `done` of `total` jobs are now settled.
    fn finished(&mut self, done: usize, total: usize, label: &str, ok: bool, took: Duration);
    /// A message for the user (warnings, failures), printed without garbling the display.
    fn message(&mut self, text: &str);
    fn done(&mut self);
}

/// Choose the display: a bar only when stderr is a terminal and not told otherwise.
pub fn for_terminal(quiet: bool) -> Box<dyn Progress> {
    if quiet {
        Box::new(Quiet)
    } else if std::io::stderr().is_terminal() && std::env::var_os("QBUILD_PLAIN").is_none() {
        Box::new(Fancy::new())
    } else {
        Box::new(Plain)
    }
}

pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

/// One line per finished job on stderr: `[12/38] quantize ar=128 split=3 (4.2 s)`.
pub struct Plain;

impl Progress for Plain {
    fn started(&mut self, _label: &str) {}
    fn finished(&mut self, done: usize, total: usize, label: &str, ok: bool, took: Duration) {
        let fail = if ok { "" } else { " FAILED" };
        let _ = writeln!(
            std::io::stderr(),
            "[{done}/{total}] {label} ({}){fail}",
            secs(took)
        );
    }
    fn message(&mut self, text: &str) {
        let _ = writeln!(std::io::stderr(), "{text}");
    }
    fn done(&mut self) {}
}

/// Nothing but messages (for `--json` without a terminal, where stdout carries the events).
pub struct Quiet;

impl Progress for Quiet {
    fn started(&mut self, _label: &str) {}
    fn finished(&mut self, _d: usize, _t: usize, _l: &str, _ok: bool, _took: Duration) {}
    fn message(&mut self, text: &str) {
        let _ = writeln!(std::io::stderr(), "{text}");
    }
    fn done(&mut self) {}
}

/// An indicatif bar: done / total, jobs running, the last finished job.
pub struct Fancy {
    bar: ProgressBar,
    running: usize,
}

impl Fancy {
    fn new() -> Fancy {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(10));
        let style = ProgressStyle::with_template(
            "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}] {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Fancy { bar, running: 0 }
    }
}

impl Progress for Fancy {
    fn started(&mut self, label: &str) {
        self.running += 1;
        self.bar
            .set_message(format!("{} running: {label}", self.running));
    }
    fn finished(&mut self, done: usize, total: usize, label: &str, ok: bool, took: Duration) {
        self.running = self.running.saturating_sub(1);
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
        let fail = if ok { "" } else { " FAILED" };
        self.bar
            .println(format!("[{done}/{total}] {label} ({}){fail}", secs(took)));
    }
    fn message(&mut self, text: &str) {
        self.bar.println(text);
    }
    fn done(&mut self) {
        self.bar.finish_and_clear();
    }
}
