//! Build progress behind one seam: a plain line per finished job (CI, pipes, tests) or indicatif bars on a terminal, with an ETA learned from past durations.

use std::collections::HashMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How a job ended, as its progress line says it.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum End {
    Ok,
    Failed,
    /// Stopped by Ctrl-C (or SIGTERM, SIGHUP) while it ran.
    Interrupted,
}

impl End {
    fn suffix(self) -> &'static str {
        match self {
            End::Ok => "",
            End::Failed => " FAILED",
            End::Interrupted => " interrupted",
        }
    }
}

pub trait Progress {
    /// A job started; `expected` is how long it took last time, if known.
    fn started(&mut self, label: &str, expected: Option<Duration>);
    /// A job that ran has ended; `done` of `total` jobs to run are finished; `eta` estimates
    /// the time left from past durations.
    fn finished(
        &mut self,
        done: usize,
        total: usize,
        label: &str,
        end: End,
        took: Duration,
        eta: Option<Duration>,
    );
    /// Where the build stands (called as jobs start, so the bar is right before the first
    /// one finishes).
    fn counts(&mut self, _done: usize, _total: usize, _eta: Option<Duration>) {}
    /// A message for the user (warnings, failures), printed without garbling the display.
    fn message(&mut self, text: &str);
    /// `-n` without `--explain`: one line per job that would run (`--json` has its events).
    fn would_run(&mut self, label: &str) {
        self.message(&format!("would run: {label}"));
    }
    fn done(&mut self);
    /// Whether `started` shows anything (then workers report when each job starts).
    fn shows_running(&self) -> bool {
        false
    }
}

/// Choose the display: bars only when stderr is a terminal that can redraw (not
/// `TERM=dumb`, as in Emacs' compile buffer), `QBUILD_PLAIN` is unset, and nothing else
/// writes to that terminal meanwhile (`live` false: `-v` streams commands' output, or
/// `--json` lines go to the same terminal), which a redrawn bar would overwrite.
pub fn for_terminal(quiet: bool, live: bool) -> Box<dyn Progress> {
    let dumb = std::env::var_os("TERM").is_some_and(|t| t == "dumb");
    if quiet {
        Box::new(Quiet)
    } else if live
        && !dumb
        && std::io::stderr().is_terminal()
        && std::env::var_os("QBUILD_PLAIN").is_none()
    {
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
    fn started(&mut self, _label: &str, _expected: Option<Duration>) {}
    fn finished(
        &mut self,
        done: usize,
        total: usize,
        label: &str,
        end: End,
        took: Duration,
        _eta: Option<Duration>,
    ) {
        let fail = end.suffix();
        // One write per line (stderr is unbuffered; `writeln!` would make several).
        let line = format!("[{done}/{total}] {label} ({}){fail}\n", secs(took));
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
    fn message(&mut self, text: &str) {
        let _ = std::io::stderr().write_all(format!("{text}\n").as_bytes());
    }
    fn done(&mut self) {}
}

/// Nothing but messages (for `--json` without a terminal, where stdout carries the events).
pub struct Quiet;

impl Progress for Quiet {
    fn started(&mut self, _label: &str, _expected: Option<Duration>) {}
    fn finished(
        &mut self,
        _d: usize,
        _t: usize,
        _l: &str,
        _end: End,
        _took: Duration,
        _eta: Option<Duration>,
    ) {
    }
    fn message(&mut self, text: &str) {
        let _ = writeln!(std::io::stderr(), "{text}");
    }
    fn would_run(&mut self, _label: &str) {}
    fn done(&mut self) {}
}

/// indicatif: an overall bar (done / total, running, ETA) and a line per running job with
/// its elapsed and expected time. Redraws are throttled by indicatif (10 Hz).
pub struct Fancy {
    multi: MultiProgress,
    bar: ProgressBar,
    jobs: HashMap<String, ProgressBar>,
    /// The latest estimate and when it was made: the bar counts it down between jobs (an
    /// hour-long quantize would otherwise show one ETA for the whole hour).
    eta: SharedEta,
}

/// An ETA and when it was estimated, shared with the bar's template.
type SharedEta = std::sync::Arc<std::sync::Mutex<Option<(Duration, std::time::Instant)>>>;

impl Fancy {
    fn new() -> Fancy {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(10));
        let bar = multi.add(ProgressBar::new(0));
        let eta = SharedEta::default();
        let shown = eta.clone();
        let style = ProgressStyle::with_template("{bar:30.cyan/blue} {pos}/{len} {msg}{eta_left}")
            .map(|s| {
                s.with_key(
                    "eta_left",
                    move |_: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        if let Ok(Some((e, at))) = shown.lock().as_deref() {
                            // Past the estimate, the build is late: say so, not "0 s".
                            let _ = match e.checked_sub(at.elapsed()) {
                                Some(left) => write!(w, ", ETA {}", secs(left)),
                                None => write!(w, ", ETA overdue"),
                            };
                        }
                    },
                )
            })
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        bar.enable_steady_tick(Duration::from_millis(500));
        Fancy {
            multi,
            bar,
            jobs: HashMap::new(),
            eta,
        }
    }

    /// `2 running` (the ETA follows it, counted down by the bar's template).
    fn status(&self) -> String {
        format!("{} running", self.jobs.len())
    }
}

impl Progress for Fancy {
    fn shows_running(&self) -> bool {
        true
    }

    fn counts(&mut self, done: usize, total: usize, eta: Option<Duration>) {
        self.bar.set_length(total as u64);
        self.bar.set_position(done as u64);
        if let Ok(mut e) = self.eta.lock() {
            *e = eta.map(|d| (d, std::time::Instant::now()));
        }
    }

    fn started(&mut self, label: &str, expected: Option<Duration>) {
        let pb = self.multi.add(ProgressBar::new_spinner());
        let tail = match expected {
            Some(e) => format!(" / ~{}", secs(e)),
            None => String::new(),
        };
        let style =
            ProgressStyle::with_template(&format!("  {{spinner}} {{msg}} {{elapsed}}{tail}"))
                .unwrap_or_else(|_| ProgressStyle::default_spinner());
        pb.set_style(style);
        pb.set_message(label.to_string());
        pb.enable_steady_tick(Duration::from_millis(200));
        self.jobs.insert(label.to_string(), pb);
        self.bar.set_message(self.status());
    }
    fn finished(
        &mut self,
        done: usize,
        total: usize,
        label: &str,
        end: End,
        took: Duration,
        eta: Option<Duration>,
    ) {
        if let Some(pb) = self.jobs.remove(label) {
            pb.finish_and_clear();
            self.multi.remove(&pb);
        }
        self.counts(done, total, eta);
        self.bar.set_message(self.status());
        let fail = end.suffix();
        let _ = self
            .multi
            .println(format!("[{done}/{total}] {label} ({}){fail}", secs(took)));
    }
    fn message(&mut self, text: &str) {
        let _ = self.multi.println(text);
    }
    fn done(&mut self) {
        for (_, pb) in self.jobs.drain() {
            pb.finish_and_clear();
        }
        self.bar.finish_and_clear();
    }
}
