//! Hand-written argv parsing (no clap): each tool declares a table of flags.

use std::ffi::{OsStr, OsString};

use crate::SimError;

/// How a flag is used.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Kind {
    /// A file or directory path: never part of an output's identity.
    Path,
    /// A comma-separated list of paths.
    PathList,
    /// A plain value (a name, a number): part of the output's identity.
    Value,
    /// A boolean switch without a value.
    Switch,
    /// Two values (e.g. `--source_model_input_layout NAME LAYOUT`).
    Pair,
}

/// One accepted flag.
pub struct Flag {
    /// Canonical spelling, used in headers and error messages.
    pub name: &'static str,
    /// Other accepted spellings.
    pub aliases: &'static [&'static str],
    pub kind: Kind,
    pub required: bool,
    pub repeat: bool,
    /// Value used (and recorded) when the flag is absent.
    pub default: Option<&'static str>,
    /// Placeholder(s) for the usage text.
    pub meta: &'static str,
    pub help: &'static str,
}

impl Flag {
    pub const fn path(name: &'static str, meta: &'static str, help: &'static str) -> Flag {
        Flag {
            name,
            aliases: &[],
            kind: Kind::Path,
            required: true,
            repeat: false,
            default: None,
            meta,
            help,
        }
    }
    pub const fn value(name: &'static str, meta: &'static str, help: &'static str) -> Flag {
        Flag {
            kind: Kind::Value,
            ..Flag::path(name, meta, help)
        }
    }
    pub const fn switch(name: &'static str, help: &'static str) -> Flag {
        Flag {
            kind: Kind::Switch,
            required: false,
            ..Flag::path(name, "", help)
        }
    }
    pub const fn optional(self) -> Flag {
        Flag {
            required: false,
            ..self
        }
    }
    pub const fn default(self, value: &'static str) -> Flag {
        Flag {
            required: false,
            default: Some(value),
            ..self
        }
    }
    pub const fn aliases(self, aliases: &'static [&'static str]) -> Flag {
        Flag { aliases, ..self }
    }
    pub const fn kind(self, kind: Kind) -> Flag {
        Flag { kind, ..self }
    }
    pub const fn repeated(self) -> Flag {
        Flag {
            repeat: true,
            ..self
        }
    }

    fn arity(&self) -> usize {
        match self.kind {
            Kind::Switch => 0,
            Kind::Pair => 2,
            _ => 1,
        }
    }

    fn matches(&self, s: &str) -> bool {
        self.name == s || self.aliases.contains(&s)
    }
}

/// The parsed command line of one tool.
pub struct Args {
    tool: &'static str,
    flags: &'static [Flag],
    /// (flag index, values) in command-line order.
    given: Vec<(usize, Vec<OsString>)>,
}

/// Result of parsing: either arguments to run with, or a request for help/version.
pub enum Parsed {
    Run(Args),
    Help,
    Version,
}

pub fn parse(
    tool: &'static str,
    flags: &'static [Flag],
    argv: &[OsString],
) -> Result<Parsed, SimError> {
    let mut given: Vec<(usize, Vec<OsString>)> = Vec::new();
    let mut i = 0;
    while i < argv.len() {
        let raw = &argv[i];
        i += 1;
        let Some(s) = raw.to_str() else {
            return Err(SimError::Usage(format!(
                "unexpected argument '{}'",
                raw.to_string_lossy()
            )));
        };
        if s == "-h" || s == "--help" {
            return Ok(Parsed::Help);
        }
        if s == "--version" {
            return Ok(Parsed::Version);
        }
        if !s.starts_with('-') || s == "-" {
            return Err(SimError::Usage(format!("unexpected argument '{s}'")));
        }
        // `--flag=value` form for single-valued flags.
        let (name, inline) = match s.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n, Some(v)),
            _ => (s, None),
        };
        let Some(idx) = flags.iter().position(|f| f.matches(name)) else {
            return Err(SimError::Usage(format!("unknown flag '{name}'")));
        };
        let flag = &flags[idx];
        let mut values: Vec<OsString> = Vec::new();
        if let Some(v) = inline {
            if flag.arity() != 1 {
                return Err(SimError::Usage(format!(
                    "{} does not take the form {}=VALUE",
                    flag.name, flag.name
                )));
            }
            values.push(OsString::from(v));
        } else {
            for _ in 0..flag.arity() {
                match argv.get(i) {
                    Some(v) if !looks_like_flag(v) => {
                        values.push(v.clone());
                        i += 1;
                    }
                    _ => {
                        let what = if flag.arity() == 1 {
                            "a value".to_string()
                        } else {
                            format!("{} values ({})", flag.arity(), flag.meta)
                        };
                        return Err(SimError::Usage(format!("{} requires {what}", flag.name)));
                    }
                }
            }
        }
        if values.iter().any(|v| v.is_empty()) {
            return Err(SimError::Usage(format!(
                "{} requires a non-empty value",
                flag.name
            )));
        }
        if !flag.repeat && given.iter().any(|(j, _)| *j == idx) {
            return Err(SimError::Usage(format!(
                "{} given more than once",
                flag.name
            )));
        }
        given.push((idx, values));
    }
    for (idx, flag) in flags.iter().enumerate() {
        if flag.required && !given.iter().any(|(j, _)| *j == idx) {
            let mut meta = String::new();
            if let Some(alias) = flag.aliases.first() {
                meta.push_str(&format!(" ({alias})"));
            }
            if !flag.meta.is_empty() {
                meta.push(' ');
                meta.push_str(flag.meta);
            }
            return Err(SimError::Usage(format!(
                "missing required flag {}{meta}",
                flag.name
            )));
        }
    }
    Ok(Parsed::Run(Args { tool, flags, given }))
}

fn looks_like_flag(v: &OsStr) -> bool {
    v.to_str().is_some_and(|s| s.starts_with("--"))
}

impl Args {
    fn index(&self, name: &str) -> Option<usize> {
        self.flags.iter().position(|f| f.name == name)
    }

    /// The single value of a flag, if given.
    pub fn os(&self, name: &str) -> Option<&OsStr> {
        let idx = self.index(name)?;
        self.given
            .iter()
            .find(|(j, _)| *j == idx)
            .and_then(|(_, v)| v.first())
            .map(|v| v.as_os_str())
    }

    /// The value of a required path flag (parse() has checked it is present).
    pub fn path(&self, name: &str) -> Result<&OsStr, SimError> {
        self.os(name)
            .ok_or_else(|| SimError::Usage(format!("missing required flag {name}")))
    }

    /// A value flag as UTF-8 text, falling back to its default.
    pub fn text(&self, name: &str) -> Result<Option<String>, SimError> {
        match self.os(name) {
            Some(v) => match v.to_str() {
                Some(s) => Ok(Some(s.to_string())),
                None => Err(SimError::Usage(format!("{name}: value is not valid UTF-8"))),
            },
            None => Ok(self
                .index(name)
                .and_then(|i| self.flags[i].default)
                .map(str::to_string)),
        }
    }

    /// A required value flag as UTF-8 text.
    pub fn req_text(&self, name: &str) -> Result<String, SimError> {
        self.text(name)?
            .ok_or_else(|| SimError::Usage(format!("missing required flag {name}")))
    }

    /// All occurrences of a repeatable flag, each with its values.
    pub fn all(&self, name: &str) -> Vec<&[OsString]> {
        match self.index(name) {
            Some(idx) => self
                .given
                .iter()
                .filter(|(j, _)| *j == idx)
                .map(|(_, v)| v.as_slice())
                .collect(),
            None => Vec::new(),
        }
    }

    /// The non-path flags as (flag, values), in table order, defaults included.
    /// This is the command-line part of every output's identity.
    pub fn identity(&self) -> Vec<(String, Vec<String>)> {
        let mut out = Vec::new();
        for (idx, flag) in self.flags.iter().enumerate() {
            if matches!(flag.kind, Kind::Path | Kind::PathList) {
                continue;
            }
            let mut any = false;
            for (_, values) in self.given.iter().filter(|(j, _)| *j == idx) {
                any = true;
                out.push((
                    flag.name.to_string(),
                    values
                        .iter()
                        .map(|v| v.to_string_lossy().into_owned())
                        .collect(),
                ));
            }
            if !any {
                if let Some(d) = flag.default {
                    out.push((flag.name.to_string(), vec![d.to_string()]));
                }
            }
        }
        out
    }

    pub fn tool(&self) -> &'static str {
        self.tool
    }
}

/// Render identity flags as one command-line-like string.
pub fn render_flags(flags: &[(String, Vec<String>)]) -> String {
    let mut s = String::new();
    for (name, values) in flags {
        if !s.is_empty() {
            s.push(' ');
        }
        s.push_str(name);
        for v in values {
            s.push(' ');
            s.push_str(&sanitize(v));
        }
    }
    s
}

/// Make a value safe to print on one header line.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// The usage text of a tool.
pub fn usage(tool: &str, about: &str, flags: &[Flag]) -> String {
    let mut s = format!("{tool} (qairt-sim): {about}\n\nusage: {tool}");
    for f in flags {
        let mut part = f.name.to_string();
        if !f.meta.is_empty() {
            part.push(' ');
            part.push_str(f.meta);
        }
        if f.repeat {
            part = format!("[{part}]...");
        } else if !f.required {
            part = format!("[{part}]");
        }
        s.push(' ');
        s.push_str(&part);
    }
    s.push_str("\n\nflags:\n");
    for f in flags {
        let mut left = f.name.to_string();
        for a in f.aliases {
            left.push_str(", ");
            left.push_str(a);
        }
        if !f.meta.is_empty() {
            left.push(' ');
            left.push_str(f.meta);
        }
        let mut help = f.help.to_string();
        if let Some(d) = f.default {
            help.push_str(&format!(" (default {d})"));
        } else if f.required {
            help.push_str(" (required)");
        }
        s.push_str(&format!("  {left:<44} {help}\n"));
    }
    s
}
