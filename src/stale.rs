//! Staleness: the key of a job (command, env, input hashes, outputs) computed once, as a hash to compare and a readable twin to explain.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::db::{encode_into, JobRecord};
use crate::expand::Action;
use crate::hash::{hex, Hash};

/// Everything a job's result depends on, in readable form. Its blake3 is the key stored in
/// the job record; `--explain` diffs two of these, so an explanation is always about the
/// very data that decided the job was stale.
///
/// Fields borrow from the graph while a decision is made (a no-op over 100k jobs copies
/// nothing); `into_owned` keeps one. `Cow` encodes exactly like the owned types.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyParts<'a> {
    /// The expanded command line (`sh -c` string, argv joined, or `write <content>`).
    pub action: Cow<'a, str>,
    pub env: Cow<'a, [(String, String)]>,
    /// Tool and SDK versions the job's result depends on.
    pub toolchain: Cow<'a, [(String, String)]>,
    pub inputs: Vec<(Cow<'a, str>, Hash)>,
    pub outputs: Vec<Cow<'a, str>>,
}

/// A readable key read back from the database.
pub type OwnedKeyParts = KeyParts<'static>;

impl KeyParts<'_> {
    pub fn into_owned(self) -> OwnedKeyParts {
        KeyParts {
            action: Cow::Owned(self.action.into_owned()),
            env: Cow::Owned(self.env.into_owned()),
            toolchain: Cow::Owned(self.toolchain.into_owned()),
            inputs: self
                .inputs
                .into_iter()
                .map(|(p, h)| (Cow::Owned(p.into_owned()), h))
                .collect(),
            outputs: self
                .outputs
                .into_iter()
                .map(|p| Cow::Owned(p.into_owned()))
                .collect(),
        }
    }

    pub fn key(&self) -> Hash {
        // The inputs are a set (the command names its files itself; `${inputs}` in it is
        // part of the action): listed in another order, or one twice, the key is the same.
        // Hashed as sorted, so a job whose inputs are listed sorted keeps its key.
        if !self.inputs.windows(2).all(|w| w[0].0 < w[1].0) {
            let mut inputs: Vec<(Cow<'_, str>, Hash)> = self
                .inputs
                .iter()
                .map(|(p, h)| (Cow::Borrowed(p.as_ref()), *h))
                .collect();
            inputs.sort_by(|a, b| a.0.cmp(&b.0));
            inputs.dedup_by(|a, b| a.0 == b.0);
            return KeyParts {
                action: Cow::Borrowed(self.action.as_ref()),
                env: Cow::Borrowed(self.env.as_ref()),
                toolchain: Cow::Borrowed(self.toolchain.as_ref()),
                inputs,
                outputs: self
                    .outputs
                    .iter()
                    .map(|o| Cow::Borrowed(o.as_ref()))
                    .collect(),
            }
            .key();
        }
        // Encoded into a buffer kept per thread: every job of every run computes its key,
        // and a fresh vector grew through ~7 reallocations for each.
        thread_local! {
            static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        BUF.with_borrow_mut(|buf| {
            buf.clear();
            buf.extend_from_slice(b"qbuild-key-v1\0");
            encode_into(self, buf);
            *blake3::hash(buf).as_bytes()
        })
    }
}

/// A readable form of an action, stable across runs (it goes into the key).
pub fn action_text(a: &Action) -> Cow<'_, str> {
    Cow::Owned(match a {
        Action::Shell(s) => return Cow::Borrowed(s),
        Action::Argv(v) => v
            .iter()
            .enumerate()
            .map(|(i, s)| {
                // The program, as the shell would run it: quoted when the shell would read
                // it otherwise (`FOO=bar` as an assignment, `if` as a keyword), so that an
                // argv and a `command` of the same text, which run different things, never
                // share a key. Any other argv's text is as before.
                if i == 0 && (s.contains('=') || SHELL_WORDS.contains(&s.as_str())) {
                    let mut q = String::with_capacity(s.len() + 2);
                    crate::expand::push_single_quoted(&mut q, s);
                    q
                } else {
                    crate::expand::shell_quote(s)
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        Action::Write(c) => format!("write {c:?}"),
        Action::Link(t) => format!("symlink -> {t}"),
    })
}

/// Words the shell reads as syntax where a command starts.
const SHELL_WORDS: &[&str] = &[
    "!", "{", "}", "[[", "]]", "case", "do", "done", "elif", "else", "esac", "fi", "for",
    "function", "if", "in", "select", "then", "time", "until", "while",
];

/// Why a job must run.
#[derive(Debug, Clone, PartialEq)]
pub enum Reason {
    NeverBuilt,
    OutputMissing(String),
    /// The output is a link that is still there, but leads nowhere (its target is gone).
    OutputDangling(String),
    /// The output is there but cannot be taken as built, and `why` says what is wrong
    /// with it: an absolute link put in place of the relative one qbuild made, a FIFO.
    /// ("Missing" or "dangling" would send the user looking for the wrong problem.)
    OutputUnusable {
        path: String,
        why: String,
    },
    OutputChanged {
        path: String,
        was: Hash,
        now: Hash,
    },
    InputChanged {
        path: String,
        was: Option<Hash>,
        now: Hash,
    },
    InputRemoved(String),
    /// Dry run: an input is the output of a job that would run first.
    InputWillRebuild(String),
    CommandChanged {
        was: String,
        now: String,
    },
    EnvChanged {
        was: Vec<(String, String)>,
        now: Vec<(String, String)>,
    },
    ToolchainChanged {
        was: Vec<(String, String)>,
        now: Vec<(String, String)>,
    },
    OutputsChanged,
    /// No record under this output list, but a job no longer in the Qairtfile wrote one of
    /// these outputs: the rule's `outputs` were edited.
    OutputsEdited {
        was: Vec<String>,
        now: Vec<String>,
    },
    /// The key differs but the readable record is gone (should not happen in practice).
    KeyChanged,
}

fn short(h: &Hash) -> String {
    hex(h)[..12].to_string()
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reason::NeverBuilt => write!(f, "never built"),
            Reason::OutputMissing(p) => write!(f, "output {p} is missing"),
            Reason::OutputDangling(p) => {
                write!(f, "output {p} is a link whose target is missing")
            }
            // (The scan's message usually starts with the path: said once.)
            Reason::OutputUnusable { path, why } => match why.strip_prefix(path.as_str()) {
                Some(rest) if rest.starts_with(' ') => write!(f, "output {path}{rest}"),
                _ => write!(f, "output {path} cannot be used as it is: {why}"),
            },
            Reason::OutputChanged { path, was, now } => {
                write!(
                    f,
                    "output {path} changed since it was built ({} -> {})",
                    short(was),
                    short(now)
                )
            }
            Reason::InputChanged {
                path,
                was: Some(w),
                now,
            } => {
                write!(f, "input {path} changed ({} -> {})", short(w), short(now))
            }
            Reason::InputChanged {
                path, was: None, ..
            } => write!(f, "input {path} is new"),
            Reason::InputRemoved(p) => write!(f, "input {p} is no longer declared"),
            Reason::InputWillRebuild(p) => write!(f, "input {p} will be rebuilt"),
            Reason::CommandChanged { was, now } => {
                write!(f, "command changed:\n{}", command_diff(was, now))
            }
            Reason::EnvChanged { was, now } => {
                let fmtv = |v: &[(String, String)]| match v.is_empty() {
                    true => "(none)".to_string(),
                    false => pairs(v, "=", " "),
                };
                write!(f, "environment changed: {} -> {}", fmtv(was), fmtv(now))
            }
            Reason::ToolchainChanged { was, now } => {
                let (was, now) = (pairs(was, " ", ", "), pairs(now, " ", ", "));
                write!(f, "toolchain changed: {was} -> {now}")
            }
            Reason::OutputsChanged => write!(f, "the declared outputs changed"),
            Reason::OutputsEdited { was, now } => write!(
                f,
                "its declared outputs changed: {} -> {}",
                was.join(", "),
                now.join(", ")
            ),
            Reason::KeyChanged => write!(f, "its key changed (no readable record to compare)"),
        }
    }
}

/// `k{kv}v` for each pair, joined by `sep`.
fn pairs(v: &[(String, String)], kv: &str, sep: &str) -> String {
    v.iter()
        .map(|(k, x)| format!("{k}{kv}{x}"))
        .collect::<Vec<_>>()
        .join(sep)
}

/// A word-level diff of two command lines: `- old words` / `+ new words`, with shared context elided.
pub fn command_diff(was: &str, now: &str) -> String {
    let a: Vec<&str> = was.split_whitespace().collect();
    let b: Vec<&str> = now.split_whitespace().collect();
    if a == b {
        // Only the spacing differs: show both whole, quoted, so the difference is visible.
        return format!("    - {was:?}\n    + {now:?}");
    }
    let pre = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
    let suf = a[pre..]
        .iter()
        .rev()
        .zip(b[pre..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    let ctx = |words: &[&str]| match words.is_empty() {
        true => "(nothing)".to_string(),
        false => words.join(" "),
    };
    let left = if pre > 0 { "… " } else { "" };
    let right = if suf > 0 { " …" } else { "" };
    format!(
        "    - {left}{}{right}\n    + {left}{}{right}",
        ctx(&a[pre..a.len() - suf]),
        ctx(&b[pre..b.len() - suf])
    )
}

/// The decision for one job.
pub struct Decision {
    pub stale: bool,
    pub reasons: Vec<Reason>,
}

/// Decide whether a job is up to date. `outputs_now` is only consulted when the key matches;
/// `old_parts` is only fetched to explain a key mismatch when `explain` is set.
pub fn decide(
    parts: &KeyParts<'_>,
    key: &Hash,
    record: Option<&JobRecord>,
    outputs_now: &mut dyn FnMut() -> Vec<Option<Hash>>,
    old_parts: &mut dyn FnMut() -> Option<OwnedKeyParts>,
    explain: bool,
) -> Decision {
    let Some(rec) = record else {
        return Decision {
            stale: true,
            reasons: vec![Reason::NeverBuilt],
        };
    };
    let mut reasons = Vec::new();
    if rec.key != *key {
        if explain {
            // A readable key explains only if it is the one recorded (a damaged or
            // stale explain store must not make up reasons).
            match old_parts() {
                Some(old) if old.key() == rec.key => reasons.extend(diff_parts(&old, parts)),
                _ => reasons.push(Reason::KeyChanged),
            }
            if reasons.is_empty() {
                reasons.push(Reason::KeyChanged);
            }
        } else {
            reasons.push(Reason::KeyChanged);
        }
        return Decision {
            stale: true,
            reasons,
        };
    }
    let now = outputs_now();
    for (i, path) in parts.outputs.iter().enumerate() {
        match (now.get(i).copied().flatten(), rec.outputs.get(i)) {
            (None, _) => reasons.push(Reason::OutputMissing(path.to_string())),
            (Some(h), Some(was)) if h != *was => reasons.push(Reason::OutputChanged {
                path: path.to_string(),
                was: *was,
                now: h,
            }),
            (Some(_), None) => reasons.push(Reason::OutputsChanged),
            _ => {}
        }
    }
    Decision {
        stale: !reasons.is_empty(),
        reasons,
    }
}

/// What differs between the recorded key and the current one.
pub fn diff_parts(old: &KeyParts<'_>, new: &KeyParts<'_>) -> Vec<Reason> {
    let mut r = Vec::new();
    if old.action != new.action {
        r.push(Reason::CommandChanged {
            was: old.action.to_string(),
            now: new.action.to_string(),
        });
    }
    if old.env != new.env {
        r.push(Reason::EnvChanged {
            was: old.env.to_vec(),
            now: new.env.to_vec(),
        });
    }
    if old.toolchain != new.toolchain {
        r.push(Reason::ToolchainChanged {
            was: old.toolchain.to_vec(),
            now: new.toolchain.to_vec(),
        });
    }
    for (p, h) in &new.inputs {
        match old.inputs.iter().find(|(op, _)| op == p) {
            Some((_, oh)) if oh == h => {}
            Some((_, oh)) => r.push(Reason::InputChanged {
                path: p.to_string(),
                was: Some(*oh),
                now: *h,
            }),
            None => r.push(Reason::InputChanged {
                path: p.to_string(),
                was: None,
                now: *h,
            }),
        }
    }
    for (p, _) in &old.inputs {
        if !new.inputs.iter().any(|(np, _)| np == p) {
            r.push(Reason::InputRemoved(p.to_string()));
        }
    }
    if old.outputs != new.outputs {
        r.push(Reason::OutputsChanged);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(cmd: &str, input: u8) -> OwnedKeyParts {
        KeyParts {
            action: cmd.to_string().into(),
            env: Cow::Owned(vec![]),
            toolchain: Cow::Owned(vec![]),
            inputs: vec![("in".into(), [input; 32])],
            outputs: vec!["out".into()],
        }
    }

    /// An argv and a shell command of the same text run different programs: `FOO=bar cmd`
    /// in the shell runs `cmd`, `argv = ["FOO=bar", "cmd"]` runs `FOO=bar`. Their keys
    /// differ (they were equal, so switching one for the other reran nothing); a plain
    /// argv keeps the text it had.
    #[test]
    fn an_argv_and_a_command_of_the_same_text_differ() {
        let argv = |v: &[&str]| Action::Argv(v.iter().map(|s| s.to_string()).collect());
        let shell = |s: &str| Action::Shell(s.to_string());
        for (v, text) in [
            (&["FOO=bar", "cmd"][..], "FOO=bar cmd"),
            (&["if", "true"][..], "if true"),
            (&["time", "cmd"][..], "time cmd"),
        ] {
            assert_ne!(action_text(&argv(v)), action_text(&shell(text)), "{v:?}");
        }
        assert_eq!(
            action_text(&argv(&["cp", "a b", "c=d"])),
            "cp 'a b' c=d",
            "an ordinary argv's text is unchanged"
        );
    }

    /// The key is what every recorded job is compared with: if its bytes changed, every
    /// user's next build would rerun everything. The value was computed by the code before
    /// keys were encoded into a reused buffer (e027bdc).
    #[test]
    fn the_key_of_a_job_is_stable_across_versions() {
        let p = KeyParts {
            action: "qairt-converter --input_network a.onnx -o b.dlc".into(),
            env: Cow::Owned(vec![("QNN_SDK_ROOT".into(), "/opt/qnn".into())]),
            toolchain: Cow::Owned(vec![("qairt".into(), "2.31.0".into())]),
            inputs: vec![("a.onnx".into(), [7; 32]), ("list.txt".into(), [3; 32])],
            outputs: vec!["b.dlc".into()],
        };
        let want = "84e72f936446b80505ec52d464e7f30da9b214c7c98a434de28d792abbc5de41";
        assert_eq!(hex(&p.key()), want);
        // Twice on one thread: the reused buffer starts empty each time.
        assert_eq!(hex(&p.key()), want);
        assert_ne!(parts("x", 1).key(), p.key());
        assert_eq!(hex(&p.key()), want);
    }

    #[test]
    fn explanation_agrees_with_key() {
        let old = parts("q --act_bitwidth 16", 1);
        let new = parts("q --act_bitwidth 8", 1);
        assert_ne!(old.key(), new.key());
        let rec = JobRecord {
            key: old.key(),
            outputs: vec![[9; 32]],
            duration_ms: 1,
        };
        let d = decide(
            &new,
            &new.key(),
            Some(&rec),
            &mut || vec![Some([9; 32])],
            &mut || Some(old.clone()),
            true,
        );
        assert!(d.stale);
        assert!(matches!(&d.reasons[0], Reason::CommandChanged { .. }));
        assert!(
            d.reasons[0].to_string().contains("- … 16"),
            "{}",
            d.reasons[0]
        );
    }

    #[test]
    fn up_to_date_needs_same_outputs() {
        let p = parts("x", 1);
        let rec = JobRecord {
            key: p.key(),
            outputs: vec![[9; 32]],
            duration_ms: 1,
        };
        let same = decide(
            &p,
            &p.key(),
            Some(&rec),
            &mut || vec![Some([9; 32])],
            &mut || None,
            true,
        );
        assert!(!same.stale);
        let edited = decide(
            &p,
            &p.key(),
            Some(&rec),
            &mut || vec![Some([8; 32])],
            &mut || None,
            true,
        );
        assert!(matches!(edited.reasons[0], Reason::OutputChanged { .. }));
        let gone = decide(
            &p,
            &p.key(),
            Some(&rec),
            &mut || vec![None],
            &mut || None,
            true,
        );
        assert_eq!(gone.reasons, vec![Reason::OutputMissing("out".into())]);
    }

    #[test]
    fn a_command_diff_shows_what_changed_even_when_only_spacing_or_insertions() {
        assert_eq!(
            command_diff("cat a.txt > u", "cat a.txt a.txt > u"),
            "    - … (nothing) …\n    + … a.txt …"
        );
        assert_eq!(
            command_diff("cat a.out", "cat  a.out"),
            "    - \"cat a.out\"\n    + \"cat  a.out\""
        );
    }
}
