//! Parsing a Qairtfile (TOML) into a raw, span-carrying model; no interpolation happens here.

use std::ops::Range;
use std::path::Path;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use crate::diag::{closest, Diagnostic, Location, Source};

pub type Span = Range<usize>;

/// A string from the Qairtfile with the byte span of its TOML token (quotes included).
#[derive(Debug, Clone, PartialEq)]
pub struct Str {
    pub text: String,
    pub span: Span,
}

/// A value as written: scalars become strings, lists stay lists, `{ range = [a, b] }` is a range.
#[derive(Debug, Clone)]
pub enum RawValue {
    Scalar(Str),
    List(Vec<RawValue>, Span),
    Range(Box<RawValue>, Box<RawValue>, Span),
}

impl RawValue {
    pub fn span(&self) -> Span {
        match self {
            RawValue::Scalar(s) => s.span.clone(),
            RawValue::List(_, sp) | RawValue::Range(_, _, sp) => sp.clone(),
        }
    }
}

/// `when = { split = 1 }` / exclusions: matrix variable → value it must equal.
pub type Condition = Vec<(Str, RawValue)>;

#[derive(Debug, Clone)]
pub struct Case {
    pub when: Condition,
    pub lets: Vec<(Str, RawValue)>,
    pub span: Span,
}

/// What a rule does: run a shell string, run an argv, have qbuild write a file's content,
/// or nothing but the rule's `links`.
#[derive(Debug, Clone)]
pub enum RawAction {
    Shell(Str),
    Argv(Vec<Str>),
    Content(Str),
    LinksOnly,
}

/// `links = [{ link = "PATH", to = "TARGET" }]`: symlinks qbuild creates (relative).
#[derive(Debug, Clone)]
pub struct LinkDef {
    pub link: Str,
    pub to: Str,
}

/// `[toolchain]`: the SDK every `toolchain = true` rule depends on.
#[derive(Debug, Clone)]
pub struct ToolchainDef {
    pub key_span: Span,
    pub name: Option<Str>,
    pub root: Str,
    pub version_file: Option<Str>,
    pub min_version: Option<Str>,
    pub tools: Vec<Str>,
}

#[derive(Debug, Clone)]
pub struct RuleDef {
    pub name: Str,
    pub matrix: Vec<(Str, RawValue)>,
    pub exclude: Vec<Condition>,
    pub lets: Vec<(Str, RawValue)>,
    pub cases: Vec<Case>,
    pub inputs: Vec<Str>,
    pub outputs: Vec<Str>,
    pub outputs_span: Span,
    pub action: RawAction,
    pub links: Vec<LinkDef>,
    pub tools: Vec<Str>,
    pub check: Option<Str>,
    pub toolchain: bool,
    pub allow_empty: bool,
    /// Left out of `all`: its jobs run only when named, or needed by what is named.
    pub manual: bool,
    pub pool: Option<Str>,
    pub env: Vec<(Str, Str)>,
    pub description: Option<Str>,
}

#[derive(Debug, Clone)]
pub struct PoolDef {
    pub name: Str,
    pub depth: usize,
}

#[derive(Debug, Clone)]
pub struct AliasDef {
    pub name: Str,
    pub targets: Vec<Str>,
}

/// The whole file, unexpanded.
#[derive(Debug, Clone)]
pub struct Qairtfile {
    pub source: Source,
    pub vars: Vec<(Str, RawValue)>,
    pub rules: Vec<RuleDef>,
    pub pools: Vec<PoolDef>,
    pub default: Vec<Str>,
    pub aliases: Vec<AliasDef>,
    pub toolchain: Option<ToolchainDef>,
}

const TOP_KEYS: &[&str] = &["vars", "rule", "pool", "default", "alias", "toolchain"];
const TOOLCHAIN_KEYS: &[&str] = &["name", "root", "version_file", "min_version", "tools"];
const RULE_KEYS: &[&str] = &[
    "matrix",
    "exclude",
    "let",
    "case",
    "inputs",
    "outputs",
    "command",
    "argv",
    "content",
    "pool",
    "env",
    "description",
    "links",
    "tools",
    "check",
    "toolchain",
    "allow_empty",
    "manual",
];
/// Names qbuild gives meaning to; a user variable cannot take them.
pub const RESERVED: &[&str] = &["inputs", "outputs", "env", "all"];

type V<'a> = Spanned<DeValue<'a>>;
type Key<'i> = Spanned<std::borrow::Cow<'i, str>>;

struct Parser<'s> {
    src: &'s Source,
}

/// Read and parse a Qairtfile from disk; diagnostics name it as `shown`.
pub fn load(path: &Path, shown: &Path) -> Result<Qairtfile, Diagnostic> {
    use std::io::Read;
    /// Far above any real Qairtfile (the demo's is 7 KB); `-f /dev/zero` must not read on.
    const MAX_SIZE: u64 = 64 << 20;
    let cannot = |e: String| {
        Diagnostic::plain(format!("cannot read {}: {e}", shown.display()))
            .with_hint("pass the Qairtfile with -f FILE, or run in its folder (-C DIR)")
    };
    // Opening a FIFO would wait for a writer, and a device reads forever: a regular file only.
    let size = match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => {
            return Err(cannot(if m.is_dir() {
                "it is a folder".into()
            } else {
                "it is not a regular file".into()
            }))
        }
        Ok(m) if m.len() > MAX_SIZE => {
            return Err(cannot(format!("it is over {} MiB", MAX_SIZE >> 20)))
        }
        Ok(m) => m.len(),
        Err(e) => return Err(cannot(e.to_string())),
    };
    // Room for the whole file and one byte more (to see the end in the second read): read
    // without a size grows its buffer from 32 bytes, ten reads for the demo's 7 KB.
    let mut bytes = Vec::with_capacity(size as usize + 1);
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SIZE + 1).read_to_end(&mut bytes))
        .map_err(|e| cannot(e.to_string()))?;
    if bytes.len() as u64 > MAX_SIZE {
        return Err(cannot(format!("it is over {} MiB", MAX_SIZE >> 20)));
    }
    let text = match String::from_utf8(bytes) {
        Ok(t) => t,
        Err(e) => return Err(not_utf8(shown, e.as_bytes(), e.utf8_error())),
    };
    parse(Source::new(shown, text))
}

/// The error for a Qairtfile that is not UTF-8, at its first bad byte and shown like every
/// other (`-->`, the line, a caret), so `--json` has its place too. The line cannot be
/// shown as text: its bytes that are not UTF-8 are written `\xFF`, and the caret
/// underlines the first of them.
fn not_utf8(shown: &Path, bytes: &[u8], e: std::str::Utf8Error) -> Diagnostic {
    let at = e.valid_up_to();
    let line_start = bytes[..at]
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |i| i + 1);
    let line_end = bytes[at..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(bytes.len(), |i| at + i);
    // A byte-order mark opens the first line but takes no column (as in `Source::locate`).
    let bom = if line_start == 0 && bytes.starts_with("\u{feff}".as_bytes()) {
        3
    } else {
        0
    };
    let shown_start = (line_start + bom).min(at);
    let mut line_text = String::new();
    for chunk in bytes[shown_start..line_end].utf8_chunks() {
        line_text.push_str(chunk.valid());
        for b in chunk.invalid() {
            line_text.push_str(&format!("\\x{b:02X}"));
        }
    }
    if line_text.ends_with('\r') {
        line_text.pop();
    }
    // Before `at` every byte is UTF-8, so the escaped line and the file agree up to there.
    let column = String::from_utf8_lossy(&bytes[shown_start..at])
        .chars()
        .count()
        + 1;
    let bad = e.error_len().unwrap_or(bytes.len() - at).max(1);
    Diagnostic {
        message: "the Qairtfile is not valid UTF-8 here".into(),
        location: Some(Location {
            file: shown.to_path_buf(),
            line: bytes[..at].iter().filter(|&&b| b == b'\n').count() + 1,
            column,
            line_text,
            width: 4 * bad,
        }),
        hint: Some("save it as UTF-8 text".into()),
    }
}

/// Parse Qairtfile text; every error names file, line and column.
pub fn parse(source: Source) -> Result<Qairtfile, Diagnostic> {
    let doc = match DeTable::parse(&source.text) {
        Ok(d) => d,
        Err(e) => {
            let span = e.span().unwrap_or(0..0);
            let msg = e.message().trim().to_string();
            return Err(source.error(span, format!("invalid TOML: {msg}")));
        }
    };
    let p = Parser { src: &source };
    let mut file = Qairtfile {
        source: source.clone(),
        vars: Vec::new(),
        rules: Vec::new(),
        pools: Vec::new(),
        default: Vec::new(),
        aliases: Vec::new(),
        toolchain: None,
    };
    for (key, value) in doc.get_ref().iter() {
        match key.get_ref().as_ref() {
            "vars" => {
                for (k, v) in p.table(value, "[vars]")? {
                    let name = p.ident(k)?;
                    if RESERVED.contains(&name.text.as_str()) {
                        return Err(p
                            .err(&name.span, format!("`{}` is reserved", name.text))
                            .with_hint("qbuild defines it; pick another variable name"));
                    }
                    file.vars.push((name, p.value(v)?));
                }
            }
            "rule" => {
                for (k, v) in p.table(value, "[rule]")? {
                    file.rules.push(p.rule(k, v)?);
                }
            }
            "pool" => {
                for (k, v) in p.table(value, "[pool]")? {
                    let name = p.ident(k)?;
                    let depth = match v.get_ref() {
                        DeValue::Integer(_) => p.int(v)?,
                        DeValue::Table(_) => {
                            let mut depth = None;
                            for (pk, pv) in p.table(v, "a pool")? {
                                match pk.get_ref().as_ref() {
                                    "depth" => depth = Some(p.int(pv)?),
                                    other => return Err(p.unknown_key(pk, other, &["depth"])),
                                }
                            }
                            depth.ok_or_else(|| p.err(&v.span(), "pool has no `depth`"))?
                        }
                        _ => return Err(p.err(&v.span(), "a pool is a depth: `quantize = 1`")),
                    };
                    if depth == 0 {
                        return Err(p.err(&v.span(), "pool depth must be at least 1").with_hint(
                            "the depth is how many of the pool's jobs may run at once",
                        ));
                    }
                    file.pools.push(PoolDef {
                        name,
                        depth: depth as usize,
                    });
                }
            }
            "default" => {
                file.default = p.str_list(value, "default")?;
                p.literal_names(&file.default, "`default`")?;
            }
            "toolchain" => {
                let mut name = None;
                let mut root = None;
                let mut version_file = None;
                let mut min_version = None;
                let mut tools = Vec::new();
                for (k, v) in p.table(value, "[toolchain]")? {
                    match k.get_ref().as_ref() {
                        "name" => name = Some(p.string(v, "name")?),
                        "root" => root = Some(p.string(v, "root")?),
                        "version_file" => version_file = Some(p.string(v, "version_file")?),
                        "min_version" => min_version = Some(p.scalar_text(v, "min_version")?),
                        "tools" => tools = p.str_list(v, "tools")?,
                        other => return Err(p.unknown_key(k, other, TOOLCHAIN_KEYS)),
                    }
                }
                let root = root.ok_or_else(|| {
                    p.err(&key.span(), "[toolchain] has no `root`")
                        .with_hint("root = \"${env:QNN_SDK_ROOT:-sim-sdk}\"")
                })?;
                file.toolchain = Some(ToolchainDef {
                    key_span: key.span(),
                    name,
                    root,
                    version_file,
                    min_version,
                    tools,
                });
            }
            "alias" => {
                for (k, v) in p.table(value, "[alias]")? {
                    let name = p.string_key(k);
                    let n = &name.text;
                    if n.is_empty() || n.trim() != n || n.contains("${") {
                        return Err(p
                            .err(&name.span, format!("`{n}` cannot be an alias name"))
                            .with_hint(
                                "an alias is a plain word, as you type it on the command line",
                            ));
                    }
                    if RESERVED.contains(&name.text.as_str()) {
                        return Err(p
                            .err(
                                &name.span,
                                format!("`{}` is reserved and cannot be an alias", name.text),
                            )
                            .with_hint("`all` always means every job"));
                    }
                    let targets = p.str_list(v, "an alias")?;
                    p.literal_names(&targets, "an alias")?;
                    file.aliases.push(AliasDef { name, targets });
                }
            }
            other => {
                let hint = match value.get_ref() {
                    DeValue::Table(_) => "rules go under [rule.NAME], variables under [vars]",
                    _ => "variables go under [vars]",
                };
                let d = p.unknown_key(key, other, TOP_KEYS);
                return Err(if d.hint.is_some() {
                    d
                } else {
                    d.with_hint(hint)
                });
            }
        }
    }
    Ok(file)
}

impl<'s> Parser<'s> {
    fn err(&self, span: &Span, msg: impl Into<String>) -> Diagnostic {
        self.src.error(span.clone(), msg)
    }

    fn unknown_key(
        &self,
        key: &Spanned<std::borrow::Cow<'_, str>>,
        name: &str,
        known: &[&str],
    ) -> Diagnostic {
        let d = self.err(&key.span(), format!("unknown key `{name}`"));
        match closest(name, known.iter().copied()) {
            Some(c) => d.with_hint(format!("did you mean `{c}`?")),
            None => d.with_hint(format!("expected one of: {}", known.join(", "))),
        }
    }

    fn table<'a, 'i>(
        &self,
        v: &'a V<'i>,
        what: &str,
    ) -> Result<Vec<(&'a Key<'i>, &'a V<'i>)>, Diagnostic> {
        match v.get_ref() {
            DeValue::Table(t) => Ok(t.iter().collect()),
            other => Err(self.err(
                &v.span(),
                format!("{what} must be a table, found {}", other.type_str()),
            )),
        }
    }

    fn string_key(&self, k: &Spanned<std::borrow::Cow<'_, str>>) -> Str {
        Str {
            text: k.get_ref().to_string(),
            span: k.span(),
        }
    }

    /// A key used as a name (variable, pool, rule): letters, digits, `_` and `-`.
    fn ident(&self, k: &Spanned<std::borrow::Cow<'_, str>>) -> Result<Str, Diagnostic> {
        let s = self.string_key(k);
        let ok = !s.text.is_empty()
            && s.text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && !s.text.starts_with(|c: char| c.is_ascii_digit());
        if ok {
            Ok(s)
        } else {
            Err(self
                .err(&s.span, format!("`{}` is not a valid name", s.text))
                .with_hint("names use letters, digits, `_` and `-`, and do not start with a digit"))
        }
    }

    fn int(&self, v: &V<'_>) -> Result<u64, Diagnostic> {
        match v.get_ref() {
            DeValue::Integer(i) => u64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
                .map_err(|_| self.err(&v.span(), "expected a non-negative integer")),
            _ => Err(self.err(&v.span(), "expected an integer")),
        }
    }

    /// A NUL cannot be part of a path, an argument or an environment value: refused where
    /// it is written, not when the command fails to start.
    fn no_nul(&self, v: &V<'_>, s: &str) -> Result<(), Diagnostic> {
        if s.contains('\0') {
            return Err(self
                .err(&v.span(), "this string holds a NUL character (`\\u0000`)")
                .with_hint("paths, commands and environment values cannot hold one"));
        }
        Ok(())
    }

    /// Names of rules, aliases, outputs and pools are taken as written: no `${...}`.
    fn literal_names(&self, names: &[Str], what: &str) -> Result<(), Diagnostic> {
        match names.iter().find(|n| n.text.contains("${")) {
            Some(n) => Err(self
                .err(&n.span, format!("`{}` in {what} is a name, not a template", n.text))
                .with_hint("`${...}` works in paths, commands, argv, content, env, description, check and variables; write the name out")),
            None => Ok(()),
        }
    }

    fn string(&self, v: &V<'_>, what: &str) -> Result<Str, Diagnostic> {
        match v.get_ref() {
            DeValue::String(s) => {
                self.no_nul(v, s)?;
                Ok(Str {
                    text: s.to_string(),
                    span: v.span(),
                })
            }
            other => Err(self.err(
                &v.span(),
                format!("{what} must be a string, found {}", other.type_str()),
            )),
        }
    }

    /// A string, or a number/float written bare (`min_version = 2.28`), as text.
    fn scalar_text(&self, v: &V<'_>, what: &str) -> Result<Str, Diagnostic> {
        match self.value(v)? {
            RawValue::Scalar(s) => Ok(s),
            _ => Err(self.err(&v.span(), format!("{what} must be a string"))),
        }
    }

    fn bool(&self, v: &V<'_>, what: &str) -> Result<bool, Diagnostic> {
        v.get_ref().as_bool().ok_or_else(|| {
            self.err(&v.span(), format!("{what} must be true or false"))
                .with_hint(format!("write `{what} = true` (a TOML boolean, no quotes)"))
        })
    }

    fn str_list(&self, v: &V<'_>, what: &str) -> Result<Vec<Str>, Diagnostic> {
        match v.get_ref() {
            DeValue::String(_) => Ok(vec![self.string(v, what)?]),
            DeValue::Array(a) => a.iter().map(|e| self.string(e, what)).collect(),
            other => Err(self.err(
                &v.span(),
                format!(
                    "{what} must be a list of strings, found {}",
                    other.type_str()
                ),
            )),
        }
    }

    fn value(&self, v: &V<'_>) -> Result<RawValue, Diagnostic> {
        let scalar = |text: String| {
            Ok(RawValue::Scalar(Str {
                text,
                span: v.span(),
            }))
        };
        match v.get_ref() {
            DeValue::String(s) => {
                self.no_nul(v, s)?;
                scalar(s.to_string())
            }
            DeValue::Integer(i) => {
                let n = i64::from_str_radix(&i.as_str().replace('_', ""), i.radix())
                    .map_err(|_| self.err(&v.span(), "integer out of range"))?;
                // A string gets a number's decimal value; for `0o755` that is `493`, which a
                // `chmod ${mode}` would take in silence, and `0o755` as text is no number
                // to most tools either. Neither is what was meant: refused.
                if i.radix() != 10 {
                    let written = self.src.text.get(v.span()).unwrap_or_default();
                    return Err(self
                        .err(
                            &v.span(),
                            format!(
                                "`{written}` is not a decimal integer: a string would get its value, {n}"
                            ),
                        )
                        .with_hint(format!(
                            "write `{n}` for the value, or the string \"{written}\" for the text"
                        )));
                }
                scalar(n.to_string())
            }
            DeValue::Float(f) => scalar(f.as_str().to_string()),
            DeValue::Boolean(b) => scalar(b.to_string()),
            DeValue::Datetime(d) => scalar(d.to_string()),
            DeValue::Array(a) => {
                let mut items = Vec::with_capacity(a.len());
                for e in a.iter() {
                    match e.get_ref() {
                        DeValue::Array(_) | DeValue::Table(_) => {
                            return Err(self.err(
                                &e.span(),
                                "lists hold strings or numbers, not lists or tables",
                            ))
                        }
                        _ => items.push(self.value(e)?),
                    }
                }
                Ok(RawValue::List(items, v.span()))
            }
            DeValue::Table(t) => {
                let mut range = None;
                for (k, rv) in t.iter() {
                    match k.get_ref().as_ref() {
                        "range" => range = Some(rv),
                        other => return Err(self.unknown_key(k, other, &["range"])),
                    }
                }
                let Some(rv) = range else {
                    return Err(
                        self.err(&v.span(), "a table value must be `{ range = [FROM, TO] }`")
                    );
                };
                match rv.get_ref() {
                    DeValue::Array(a) if a.len() == 2 => Ok(RawValue::Range(
                        Box::new(self.value(&a[0])?),
                        Box::new(self.value(&a[1])?),
                        v.span(),
                    )),
                    _ => Err(self.err(
                        &rv.span(),
                        "range takes two bounds: `{ range = [1, 4] }` is 1, 2, 3, 4",
                    )),
                }
            }
        }
    }

    fn kv_list(&self, v: &V<'_>, what: &str) -> Result<Vec<(Str, RawValue)>, Diagnostic> {
        let mut out = Vec::new();
        for (k, val) in self.table(v, what)? {
            let name = self.ident(k)?;
            if RESERVED.contains(&name.text.as_str()) {
                return Err(self.err(&name.span, format!("`{}` is reserved", name.text)));
            }
            out.push((name, self.value(val)?));
        }
        Ok(out)
    }

    fn conditions(&self, v: &V<'_>, what: &str) -> Result<Vec<Condition>, Diagnostic> {
        match v.get_ref() {
            DeValue::Array(a) => a.iter().map(|e| self.kv_list(e, what)).collect(),
            DeValue::Table(_) => Ok(vec![self.kv_list(v, what)?]),
            other => Err(self.err(
                &v.span(),
                format!(
                    "{what} must be a list of tables, found {}",
                    other.type_str()
                ),
            )),
        }
    }

    fn rule(
        &self,
        k: &Spanned<std::borrow::Cow<'_, str>>,
        v: &V<'_>,
    ) -> Result<RuleDef, Diagnostic> {
        let name = self.ident(k)?;
        if RESERVED.contains(&name.text.as_str()) {
            return Err(self.err(&name.span, format!("`{}` cannot name a rule", name.text)));
        }
        let mut matrix = Vec::new();
        let mut exclude = Vec::new();
        let mut lets = Vec::new();
        let mut cases = Vec::new();
        let mut inputs = Vec::new();
        let mut outputs = None;
        let mut command = None;
        let mut argv = None;
        let mut content = None;
        let mut pool = None;
        let mut env = Vec::new();
        let mut description = None;
        let mut links = Vec::new();
        let mut tools = Vec::new();
        let mut check = None;
        let mut toolchain = false;
        let mut allow_empty = false;
        let mut manual = false;
        for (key, val) in self.table(v, "a rule")? {
            match key.get_ref().as_ref() {
                "matrix" => matrix = self.kv_list(val, "matrix")?,
                "exclude" => exclude = self.conditions(val, "exclude")?,
                "let" => lets = self.kv_list(val, "let")?,
                "case" => {
                    let items: Vec<&V<'_>> = match val.get_ref() {
                        DeValue::Array(a) => a.iter().collect(),
                        _ => vec![val],
                    };
                    for item in items {
                        let mut when = None;
                        let mut clets = Vec::new();
                        for (ck, cv) in self.table(item, "a case")? {
                            match ck.get_ref().as_ref() {
                                "when" => when = Some(self.kv_list(cv, "when")?),
                                "let" => clets = self.kv_list(cv, "let")?,
                                other => return Err(self.unknown_key(ck, other, &["when", "let"])),
                            }
                        }
                        let when = when.ok_or_else(|| {
                            self.err(&item.span(), "a case needs `when = { VAR = VALUE }`")
                        })?;
                        cases.push(Case {
                            when,
                            lets: clets,
                            span: item.span(),
                        });
                    }
                }
                "inputs" => inputs = self.str_list(val, "inputs")?,
                "outputs" => outputs = Some((self.str_list(val, "outputs")?, val.span())),
                "command" => command = Some(self.string(val, "command")?),
                "argv" => {
                    // One string is one argument: with a space it would be a program whose
                    // name holds a space, which is a command line meant for `command`.
                    if let DeValue::String(s) = val.get_ref() {
                        if s.chars().any(char::is_whitespace) {
                            return Err(self
                                .err(&val.span(), "`argv` is a list: one string per argument, with no shell")
                                .with_hint("write it as a list, `argv = [\"prog\", \"arg\", ...]`, or use `command = \"...\"` for a shell command line"));
                        }
                    }
                    argv = Some((self.str_list(val, "argv")?, val.span()))
                }
                "content" => content = Some(self.string(val, "content")?),
                "pool" => {
                    let p = self.string(val, "pool")?;
                    self.literal_names(std::slice::from_ref(&p), "`pool`")?;
                    pool = Some(p);
                }
                "description" => description = Some(self.string(val, "description")?),
                "tools" => tools = self.str_list(val, "tools")?,
                "check" => check = Some(self.string(val, "check")?),
                "toolchain" => toolchain = self.bool(val, "toolchain")?,
                "allow_empty" => allow_empty = self.bool(val, "allow_empty")?,
                "manual" => manual = self.bool(val, "manual")?,
                "links" => {
                    let items: Vec<&V<'_>> = match val.get_ref() {
                        DeValue::Array(a) => a.iter().collect(),
                        _ => vec![val],
                    };
                    for item in items {
                        let mut link = None;
                        let mut to = None;
                        for (lk, lv) in self.table(item, "a link")? {
                            match lk.get_ref().as_ref() {
                                "link" => link = Some(self.string(lv, "link")?),
                                "to" => to = Some(self.string(lv, "to")?),
                                other => return Err(self.unknown_key(lk, other, &["link", "to"])),
                            }
                        }
                        match (link, to) {
                            (Some(link), Some(to)) => links.push(LinkDef { link, to }),
                            _ => {
                                return Err(self
                                    .err(&item.span(), "a link needs `link` (its path) and `to` (what it points at)")
                                    .with_hint("links = [{ link = \"splits/a.encodings\", to = \"onnx/a.encodings\" }]"))
                            }
                        }
                    }
                }
                "env" => {
                    for (ek, ev) in self.table(val, "env")? {
                        let k = self.string_key(ek);
                        let mut c = k.text.chars();
                        let ok = c
                            .next()
                            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                            && c.all(|c| c.is_ascii_alphanumeric() || c == '_');
                        if !ok {
                            return Err(self
                                .err(
                                    &k.span,
                                    format!("`{}` is not an environment variable name", k.text),
                                )
                                .with_hint(
                                    "names are letters, digits and `_`, not starting with a digit",
                                ));
                        }
                        if k.text == "QBUILD_RUN" {
                            return Err(self.err(&k.span, "`QBUILD_RUN` is qbuild's own").with_hint(
                                "qbuild sets it on every command, to find and stop those a killed run left behind",
                            ));
                        }
                        env.push((k, self.string(ev, "an env value")?));
                    }
                    // A TOML table has no order: `{ A, B }` and `{ B, A }` are one key.
                    env.sort_by(|a, b| a.0.text.cmp(&b.0.text));
                }
                other => return Err(self.unknown_key(key, other, RULE_KEYS)),
            }
        }
        // A matrix variable is looked up first: a let of the same name would never be seen.
        for (k, _) in lets.iter().chain(cases.iter().flat_map(|c| &c.lets)) {
            if matrix.iter().any(|(m, _)| m.text == k.text) {
                return Err(self
                    .err(
                        &k.span,
                        format!(
                            "let `{}` has the name of a matrix variable of this rule, which always wins",
                            k.text
                        ),
                    )
                    .with_hint("give the let a name of its own"));
            }
        }
        let rule_span = name.span.clone();
        let links_only =
            command.is_none() && argv.is_none() && content.is_none() && !links.is_empty();
        let (outputs, outputs_span) = match outputs {
            None if links_only => (Vec::new(), rule_span.clone()),
            o => o.ok_or_else(|| {
                self.err(&rule_span, format!("rule `{}` has no `outputs`", name.text))
                    .with_hint("every rule declares what it writes: outputs = [\"path\", ...]")
            })?,
        };
        if outputs.is_empty() && !links_only {
            return Err(self.err(&outputs_span, "`outputs` is empty"));
        }
        let action = match (command, argv, content) {
            (Some(c), None, None) => RawAction::Shell(c),
            (None, Some((a, span)), None) => {
                if a.is_empty() {
                    return Err(self.err(&span, "`argv` is empty"));
                }
                RawAction::Argv(a)
            }
            (None, None, Some(c)) => {
                if outputs.len() != 1 {
                    return Err(
                        self.err(&outputs_span, "a `content` rule writes exactly one output")
                    );
                }
                RawAction::Content(c)
            }
            (None, None, None) if links_only => RawAction::LinksOnly,
            (None, None, None) => {
                return Err(self
                    .err(
                        &rule_span,
                        format!("rule `{}` has nothing to do", name.text),
                    )
                    .with_hint(
                        "give it `command = \"...\"`, `argv = [...]` or `content = \"...\"`",
                    ))
            }
            _ => {
                return Err(self
                    .err(
                        &rule_span,
                        format!("rule `{}` has more than one action", name.text),
                    )
                    .with_hint("use exactly one of `command`, `argv`, `content`"))
            }
        };
        Ok(RuleDef {
            name,
            matrix,
            exclude,
            lets,
            cases,
            inputs,
            outputs,
            outputs_span,
            action,
            links,
            tools,
            check,
            toolchain,
            allow_empty,
            manual,
            pool,
            env,
            description,
        })
    }
}

/// Past the line-ending backslash at `r`, and the blanks and line ends after it, if there
/// is one (such a backslash and what it trims decode to nothing).
fn skip_continuation(b: &[u8], mut r: usize) -> Option<usize> {
    if b.get(r) != Some(&b'\\') || !matches!(b.get(r + 1), Some(b' ' | b'\t' | b'\r' | b'\n')) {
        return None;
    }
    r += 1;
    while matches!(b.get(r), Some(b' ' | b'\t' | b'\r' | b'\n')) {
        r += 1;
    }
    Some(r)
}

/// In the text of a TOML basic string as written, where byte `at` of its decoded value
/// comes from (escapes such as `\"` or `\u00e9` are longer written than decoded).
fn raw_offset(body: &str, at: usize) -> Option<usize> {
    let b = body.as_bytes();
    let (mut r, mut d) = (0, 0);
    loop {
        // A continuation decodes to nothing, so the decoded byte `at` comes after it: stop
        // on the first byte it did not trim, not on its backslash.
        while let Some(next) = skip_continuation(b, r) {
            r = next;
        }
        if d >= at {
            break;
        }
        let c = *b.get(r)?;
        if c != b'\\' {
            let n = body[r..].chars().next()?.len_utf8();
            r += n;
            d += n;
            continue;
        }
        match *b.get(r + 1)? {
            b'u' | b'U' => {
                let len = if b[r + 1] == b'u' { 4 } else { 8 };
                let hex = body.get(r + 2..r + 2 + len)?;
                let ch = char::from_u32(u32::from_str_radix(hex, 16).ok()?)?;
                r += 2 + len;
                d += ch.len_utf8();
            }
            _ => {
                r += 2;
                d += 1;
            }
        }
    }
    Some(r)
}

/// Byte offset in the Qairtfile of offset `at` inside a string value: exact when the
/// string is written without escapes, or is a basic string whose escapes `raw_offset`
/// walks; else the token's start.
pub fn offset_in(src: &Source, s: &Str, at: usize) -> usize {
    let raw = src.text.get(s.span.clone()).unwrap_or("");
    for q in ["\"\"\"", "'''", "\"", "'"] {
        if let Some(inner) = raw.strip_prefix(q).and_then(|r| r.strip_suffix(q)) {
            let (skip, body) = if q.len() == 3 {
                match inner.strip_prefix("\r\n") {
                    Some(b) => (2, b),
                    None => match inner.strip_prefix('\n') {
                        Some(b) => (1, b),
                        None => (0, inner),
                    },
                }
            } else {
                (0, inner)
            };
            if body == s.text {
                return s.span.start + q.len() + skip + at.min(body.len());
            }
            // A basic string with escapes: walk the text as written to the decoded offset.
            if q.starts_with('"') {
                if let Some(r) = raw_offset(body, at) {
                    return s.span.start + q.len() + skip + r;
                }
            }
            break;
        }
    }
    s.span.start
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Qairtfile, Diagnostic> {
        parse(Source::new(Path::new("Qairtfile"), text.to_string()))
    }

    #[test]
    fn parses_a_rule() {
        let q = p(r#"
[vars]
ars = [1, 128]
splits = { range = [1, 4] }
[pool]
quantize = 1
[rule.q]
matrix = { ar = "${ars}" }
outputs = ["o${ar}"]
command = "touch ${outputs}"
pool = "quantize"
"#)
        .expect("parses");
        assert_eq!(q.vars.len(), 2);
        assert_eq!(q.rules[0].name.text, "q");
        assert_eq!(q.pools[0].depth, 1);
    }

    #[test]
    fn unknown_rule_key_has_location_and_hint() {
        let e = p("[rule.a]\noutputs = [\"x\"]\ncomand = \"true\"\n").unwrap_err();
        assert_eq!(e.position(), "Qairtfile:3:1");
        assert_eq!(e.hint.as_deref(), Some("did you mean `command`?"));
    }

    #[test]
    fn toml_syntax_error_has_location() {
        let e = p("[vars]\na = \n").unwrap_err();
        assert!(e.message.starts_with("invalid TOML"), "{e}");
        assert_eq!(e.location.as_ref().map(|l| l.line), Some(2));
    }

    #[test]
    fn offsets_map_into_plain_strings() {
        let src = Source::new(Path::new("Q"), "a = \"x${y}\"".to_string());
        let s = Str {
            text: "x${y}".into(),
            span: 4..11,
        };
        assert_eq!(offset_in(&src, &s, 1), 6);
    }

    /// A `${` right after a line continuation is where the next line's text starts, not
    /// on the backslash (which with the blanks it trims decodes to nothing).
    #[test]
    fn offsets_skip_line_continuations() {
        for (text, value) in [
            ("a = \"\"\"echo a \\\n      ${y}\"\"\"", "echo a ${y}"),
            ("a = \"\"\"\\\n  \\\n\n\t${y}\"\"\"", "${y}"),
            ("a = \"\"\"\necho \\  \r\n ${y}\"\"\"", "echo ${y}"),
        ] {
            let doc = DeTable::parse(text).expect("valid TOML");
            let decoded = doc.get_ref().get("a").and_then(|v| v.get_ref().as_str());
            assert_eq!(decoded, Some(value), "{text:?}");
            let src = Source::new(Path::new("Q"), text.to_string());
            let s = Str {
                text: value.into(),
                span: 4..text.len(),
            };
            let at = value.find("${").unwrap_or_default();
            assert_eq!(
                offset_in(&src, &s, at),
                text.find("${").unwrap_or_default(),
                "{text:?}"
            );
        }
    }
}
