//! Expanding a parsed Qairtfile: variable interpolation, matrix expansion and path checks, giving one job per rule instance.

// Fx, not SipHash: these maps are looked up for every variable reference of every job. Their
// keys come from the Qairtfile, which runs commands of its own: no flooding to guard against.
use rustc_hash::FxHashMap as HashMap;
use std::rc::Rc;

use crate::diag::{closest, Diagnostic, Source};
use crate::qairtfile::{
    offset_in, Condition, Qairtfile, RawAction, RawValue, RuleDef, Str, ToolchainDef,
};

/// Hard cap on jobs, so a hostile matrix cannot exhaust memory.
pub const MAX_JOBS: usize = 5_000_000;
/// Hard cap on any one list (a range or a cartesian product inside one string).
const MAX_LIST: usize = 5_000_000;
/// Hard cap on one expanded string. A command longer than 128 KiB cannot even be passed
/// to `sh -c` (Linux's MAX_ARG_STRLEN); a path longer than 4 KiB cannot be opened.
const MAX_STRING: usize = 16 << 20;
/// Hard caps on everything expansion produces (every string and every list item, kept or
/// not), so that variables doubling each other or lists multiplied by a matrix end in a
/// clear error, not in exhausted memory. The 90k-command benchmark graph uses ~50 MB and
/// ~0.6M items.
const MAX_BYTES: usize = 1 << 30;
const MAX_ITEMS: usize = 30_000_000;
/// Hard cap on variables referring to variables (and on nested `${env:X:-...}`
/// defaults): each level is a frame of recursion, and the stack is finite.
const MAX_DEPTH: usize = 200;

/// A value after interpolation.
/// Shared so that looking a variable up per instance costs a reference count, not a copy.
#[derive(Debug, Clone, PartialEq)]
pub enum Val {
    Scalar(Rc<str>),
    List(Rc<Vec<String>>),
}

impl Val {
    fn items(&self) -> Vec<String> {
        match self {
            Val::Scalar(s) => vec![s.to_string()],
            Val::List(l) => l.to_vec(),
        }
    }
    fn list(v: Vec<String>) -> Val {
        Val::List(Rc::new(v))
    }
    fn scalar(s: &str) -> Val {
        Val::Scalar(Rc::from(s))
    }
}

/// One `${...}` after evaluation, before it is spliced into the string.
enum Piece {
    One(Rc<str>),
    Many(Rc<Vec<String>>),
}

/// Append `s` to `dst`, shell-quoted when it needs it.
fn push_quoted(dst: &mut String, s: &str) {
    let safe = !s.is_empty()
        && s.bytes().all(|c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'_' | b'-' | b'.' | b'/' | b',' | b':' | b'=' | b'+' | b'@' | b'%'
                )
        });
    if safe {
        dst.push_str(s);
    } else {
        push_single_quoted(dst, s);
    }
}

/// `s` in single quotes, whatever it holds: one word of literal text to the shell.
pub fn push_single_quoted(dst: &mut String, s: &str) {
    dst.push('\'');
    for (i, part) in s.split('\'').enumerate() {
        if i > 0 {
            dst.push_str("'\\''");
        }
        dst.push_str(part);
    }
    dst.push('\'');
}

/// What a job does once expanded.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Run with `sh -c`.
    Shell(String),
    /// Run directly, no shell.
    Argv(Vec<String>),
    /// qbuild writes this text to the single output.
    Write(String),
    /// qbuild makes the single output a symlink with this (relative) text.
    Link(String),
}

/// One rule instance: a command with its declared inputs and outputs.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub rule: u32,
    /// `quantize ar=128 split=3`, or the rule's `description`.
    pub label: String,
    pub inputs: Vec<String>,
    pub outputs: Vec<String>,
    /// For each output, which template of the rule's `outputs` produced it (for diagnostics).
    pub output_template: Vec<u16>,
    /// For each input, which template produced it: `inputs` entries first, then `tools`.
    /// For a link job, the index (in `links`) of its definition.
    pub input_template: Vec<u16>,
    pub action: Action,
    pub env: Vec<(String, String)>,
    pub pool: Option<u32>,
    /// Files that must be built first but are not part of the key (a link's target).
    pub order_only: Vec<String>,
    /// A command run after the job succeeds; its failure fails the job.
    pub check: Option<String>,
    /// The toolchain version is part of this job's key.
    pub toolchain: bool,
    /// Empty output files are fine (else an empty output fails the job).
    pub allow_empty: bool,
}

#[derive(Debug, Clone)]
pub struct RuleInfo {
    pub name: String,
    pub name_span: std::ops::Range<usize>,
    pub inputs: Vec<Str>,
    pub tools: Vec<Str>,
    pub links: Vec<(Str, Str)>,
    pub outputs: Vec<Str>,
    /// `manual = true`: left out of `all`.
    pub manual: bool,
}

/// The checked `[toolchain]` section, interpolated.
#[derive(Debug, Clone)]
pub struct Toolchain {
    pub name: String,
    pub root: String,
    pub version_file: String,
    pub min_version: Option<String>,
    pub tools: Vec<String>,
    /// Where `[toolchain]` is, for errors.
    pub span: std::ops::Range<usize>,
}

impl RuleInfo {
    /// Where the template of input `t` (an `input_template` value) is written.
    pub fn input_span(&self, t: u16) -> std::ops::Range<usize> {
        let t = t as usize;
        let s = if t < self.inputs.len() {
            self.inputs.get(t)
        } else {
            self.tools.get(t - self.inputs.len())
        };
        s.map_or(self.name_span.clone(), |s| s.span.clone())
    }
}

#[derive(Debug, Clone)]
pub struct Pool {
    pub name: String,
    pub depth: usize,
}

/// The expanded Qairtfile: every job, ready for the graph.
#[derive(Debug, Clone)]
pub struct Model {
    pub source: Source,
    pub rules: Vec<RuleInfo>,
    /// Boxed: the graph takes each spec over as it is, without a second buffer of specs.
    pub jobs: Vec<Box<JobSpec>>,
    pub pools: Vec<Pool>,
    pub default: Vec<Str>,
    pub aliases: Vec<(Str, Vec<Str>)>,
    /// The `[toolchain]`, if any; or why it could not be interpolated (an unset
    /// `${env:QNN_SDK_ROOT}`, say), reported where the toolchain is needed, not by `--list`,
    /// `--graph` or `--clean`, which run no tool.
    pub toolchain: Result<Option<Toolchain>, Diagnostic>,
    /// Global variables no rule, variable or toolchain used (for `--check`).
    pub unused_vars: Vec<Str>,
}

// ---------------------------------------------------------------- templates

#[derive(Debug, Clone)]
enum Filter {
    None,
    Join(String),
    Json,
    Raw,
}

#[derive(Debug, Clone)]
enum RefKind {
    Var {
        name: String,
        index: Option<i64>,
    },
    Env {
        name: String,
        default: Option<Template>,
    },
}

#[derive(Debug, Clone)]
enum Seg {
    Lit(String),
    Ref {
        kind: RefKind,
        filter: Filter,
        /// Byte offset of `${` in the string's text.
        at: usize,
    },
}

/// A string split into literal text and `${...}` references.
#[derive(Debug, Clone)]
struct Template {
    segs: Vec<Seg>,
    str: Str,
}

fn parse_template(src: &Source, s: &Str) -> Result<Template, Diagnostic> {
    parse_template_at(src, s, &s.text, 0, 0)
}

fn parse_template_at(
    src: &Source,
    s: &Str,
    text: &str,
    base: usize,
    nest: usize,
) -> Result<Template, Diagnostic> {
    let err = |at: usize, msg: String| {
        let off = offset_in(src, s, at);
        src.error(off..off + 2, msg)
    };
    let bytes = text.as_bytes();
    let mut segs = Vec::new();
    let mut lit = String::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'$' && bytes.get(i + 1) == Some(&b'$') {
            lit.push('$');
            i += 2;
            continue;
        }
        if bytes[i] == b'$' && bytes.get(i + 1) == Some(&b'{') {
            // Find the matching close brace, allowing nesting inside env defaults.
            let mut depth = 0usize;
            let mut j = i + 1;
            let mut close = None;
            while j < bytes.len() {
                match bytes[j] {
                    b'{' => depth += 1,
                    b'}' => {
                        depth -= 1;
                        if depth == 0 {
                            close = Some(j);
                            break;
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            let Some(close) = close else {
                return Err(err(base + i, "unclosed `${`".into())
                    .with_hint("close it with `}`; write `$$` for a literal `$`"));
            };
            let inner = &text[i + 2..close];
            if !lit.is_empty() {
                segs.push(Seg::Lit(std::mem::take(&mut lit)));
            }
            segs.push(parse_ref(
                src,
                s,
                inner,
                base + i,
                base + i + 2,
                nest,
                &err,
            )?);
            i = close + 1;
            continue;
        }
        let ch_len = text[i..].chars().next().map_or(1, char::len_utf8);
        lit.push_str(&text[i..i + ch_len]);
        i += ch_len;
    }
    if !lit.is_empty() {
        segs.push(Seg::Lit(lit));
    }
    Ok(Template {
        segs,
        str: s.clone(),
    })
}

fn parse_ref(
    src: &Source,
    s: &Str,
    inner: &str,
    at: usize,
    inner_base: usize,
    nest: usize,
    err: &dyn Fn(usize, String) -> Diagnostic,
) -> Result<Seg, Diagnostic> {
    if let Some(rest) = inner.strip_prefix("env:") {
        let (name, default) = match rest.find(":-") {
            Some(p) => (&rest[..p], Some(&rest[p + 2..])),
            None => (rest, None),
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(err(
                at,
                format!("`{name}` is not an environment variable name"),
            ));
        }
        if default.is_some() && nest >= MAX_DEPTH {
            return Err(err(
                at,
                format!("`${{env:...:-...}}` defaults nest more than {MAX_DEPTH} deep"),
            ));
        }
        let default = match default {
            Some(d) => Some(parse_template_at(
                src,
                s,
                d,
                inner_base + 4 + name.len() + 2,
                nest + 1,
            )?),
            None => None,
        };
        return Ok(Seg::Ref {
            kind: RefKind::Env {
                name: name.to_string(),
                default,
            },
            filter: Filter::None,
            at,
        });
    }
    let (head, filter) = match inner.find('|') {
        Some(p) => {
            let f = inner[p + 1..].trim();
            // The separator is everything after `join:`, spaces included (`|join:, `).
            let filter = if let Some(sep) = inner[p + 1..].trim_start().strip_prefix("join:") {
                Filter::Join(sep.to_string())
            } else if f == "json" {
                Filter::Json
            } else if f == "raw" {
                Filter::Raw
            } else {
                return Err(err(at, format!("unknown filter `{f}`"))
                    .with_hint("filters are `|join:SEP`, `|json` and `|raw`"));
            };
            (inner[..p].trim(), filter)
        }
        None => (inner.trim(), Filter::None),
    };
    let (name, index) = match head.find('[') {
        Some(p) if head.ends_with(']') => {
            let idx = head[p + 1..head.len() - 1]
                .trim()
                .parse::<i64>()
                .map_err(|_| {
                    err(
                        at,
                        format!("`{head}`: an index is an integer (negative counts from the end)"),
                    )
                })?;
            (&head[..p], Some(idx))
        }
        _ => (head, None),
    };
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if !valid {
        return Err(
            err(at, format!("`${{{inner}}}` is not a variable reference")).with_hint(
                "write `${name}`, `${name[0]}`, `${env:NAME:-default}`, or `$$` for a literal `$`",
            ),
        );
    }
    Ok(Seg::Ref {
        kind: RefKind::Var {
            name: name.to_string(),
            index,
        },
        filter,
        at,
    })
}

/// Quote a word for `sh` when it needs it.
///
/// ```
/// use qbuild::expand::shell_quote;
/// assert_eq!(shell_quote("models/llama3.onnx"), "models/llama3.onnx");
/// assert_eq!(shell_quote("a b"), "'a b'");
/// assert_eq!(shell_quote("it's; rm -rf x"), r"'it'\''s; rm -rf x'");
/// ```
pub fn shell_quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    push_quoted(&mut out, s);
    out
}

// ---------------------------------------------------------------- evaluation

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    /// Each list reference multiplies the result (inputs, outputs, argv, variables).
    List,
    /// Lists join with spaces; `quote` shell-quotes every substituted value (commands).
    Scalar { quote: bool },
}

struct Globals<'a> {
    src: &'a Source,
    defs: HashMap<&'a str, &'a RawValue>,
    names: Vec<&'a str>,
    memo: HashMap<String, Val>,
    /// Parsed templates of variable values, by their span: a `let` is evaluated once per
    /// instance, but parsed once.
    templates: HashMap<(usize, usize), Rc<Template>>,
    /// What expansion has produced so far (see `MAX_BYTES`, `MAX_ITEMS`).
    bytes: usize,
    items: usize,
    roots: &'a WorkRoots,
    /// Set when the string being expanded mentioned a list: its value is then a list even
    /// with one item (`"ar${ars}"` with `ars = [1]`), so `|json` still gives an array.
    multiplied: bool,
}

impl Globals<'_> {
    fn template(&mut self, s: &Str) -> Result<Rc<Template>, Diagnostic> {
        let key = (s.span.start, s.span.end);
        if let Some(t) = self.templates.get(&key) {
            return Ok(t.clone());
        }
        let t = Rc::new(parse_template(self.src, s)?);
        self.templates.insert(key, t.clone());
        Ok(t)
    }
}

/// Per-instance variables: matrix values, lets, and for actions the inputs/outputs.
struct Scope<'s> {
    matrix: &'s [(Rc<str>, Rc<str>)],
    lets: &'s [(Str, RawValue)],
    /// The lets of the `case` this instance matched: they win over `lets`.
    case_lets: &'s [(Str, RawValue)],
    /// Lets evaluated so far (a rule has a handful: a list beats a map).
    let_memo: Vec<(&'s str, Val)>,
    io: Option<(Val, Val)>,
}

struct Eval<'a, 'g, 's> {
    g: &'g mut Globals<'a>,
    scope: Option<Scope<'s>>,
    /// The variables being evaluated, for cycles: a global's value is evaluated on a
    /// stack of its own, since it never sees the instance's lets.
    stack: Vec<String>,
    /// How deep variables refer to variables, across both kinds (see `MAX_DEPTH`).
    depth: usize,
}

impl<'a, 'g, 's> Eval<'a, 'g, 's> {
    /// An evaluator in `scope` (`None`: globals only), with nothing being evaluated yet.
    fn new(g: &'g mut Globals<'a>, scope: Option<Scope<'s>>) -> Self {
        Eval {
            g,
            scope,
            stack: Vec::new(),
            depth: 0,
        }
    }
    fn lookup(&mut self, name: &str, tpl: &Template, at: usize) -> Result<Val, Diagnostic> {
        let src = self.g.src;
        let here = |msg: String| {
            let off = offset_in(src, &tpl.str, at);
            src.error(off..off + 2 + name.len() + 1, msg)
        };
        if self.depth >= MAX_DEPTH && !self.g.memo.contains_key(name) {
            return Err(here(format!(
                "variables refer to variables more than {MAX_DEPTH} deep here"
            )));
        }
        if self.stack.iter().any(|s| s == name) {
            let mut cycle: Vec<&str> = self
                .stack
                .iter()
                .skip_while(|s| *s != name)
                .map(String::as_str)
                .collect();
            cycle.push(name);
            return Err(here(format!("variable cycle: {}", cycle.join(" -> ")))
                .with_hint("a variable cannot refer to itself, directly or through others"));
        }
        if let Some(scope) = &self.scope {
            if let Some((ins, outs)) = &scope.io {
                if name == "inputs" {
                    return Ok(ins.clone());
                }
                if name == "outputs" {
                    return Ok(outs.clone());
                }
            }
            if let Some((_, v)) = scope.matrix.iter().find(|(k, _)| &**k == name) {
                return Ok(Val::Scalar(v.clone()));
            }
            if let Some((_, v)) = scope.let_memo.iter().find(|(k, _)| *k == name) {
                return Ok(v.clone());
            }
            let (case_lets, lets) = (scope.case_lets, scope.lets);
            if let Some((key, raw)) = case_lets.iter().chain(lets).find(|(k, _)| k.text == name) {
                self.stack.push(name.to_string());
                self.depth += 1;
                let v = self.value(raw)?;
                self.depth -= 1;
                self.stack.pop();
                if let Some(scope) = &mut self.scope {
                    scope.let_memo.push((key.text.as_str(), v.clone()));
                }
                return Ok(v);
            }
        }
        if let Some(v) = self.g.memo.get(name) {
            return Ok(v.clone());
        }
        if let Some(raw) = self.g.defs.get(name).copied() {
            // Globals never see instance scope, nor the lets being evaluated: a let may
            // share a global's name that the global's own value refers to.
            // (From an instance, the stack holds only lets: the global starts a new one.)
            let saved_stack = self
                .scope
                .is_some()
                .then(|| std::mem::take(&mut self.stack));
            let saved = self.scope.take();
            self.stack.push(name.to_string());
            self.depth += 1;
            let v = self.value(raw);
            self.depth -= 1;
            self.stack.pop();
            if let Some(st) = saved_stack {
                self.stack = st;
            }
            self.scope = saved;
            let v = v?;
            self.g.memo.insert(name.to_string(), v.clone());
            return Ok(v);
        }
        let mut known: Vec<&str> = self.g.names.clone();
        if let Some(scope) = &self.scope {
            known.extend(scope.matrix.iter().map(|(k, _)| &**k));
            known.extend(
                scope
                    .case_lets
                    .iter()
                    .chain(scope.lets)
                    .map(|(k, _)| k.text.as_str()),
            );
            if scope.io.is_some() {
                known.extend(["inputs", "outputs"]);
            }
        }
        // A variable being evaluated is no answer: naming it would make a cycle.
        known.retain(|k| !self.stack.iter().any(|s| s == k));
        let d = here(format!("unknown variable `{name}`"));
        Err(match closest(name, known.iter().copied()) {
            Some(c) => d.with_hint(format!("did you mean `{c}`?")),
            None if name == "inputs" || name == "outputs" => {
                d.with_hint("`${inputs}` and `${outputs}` exist only in command, argv, content, env and description")
            }
            None => d.with_hint("define it under [vars], in the rule's `matrix` or its `let`"),
        })
    }

    /// Evaluate one `${...}`; returns the piece and whether to shell-quote it.
    fn eval_ref(
        &mut self,
        seg: &Seg,
        tpl: &Template,
        mode: Mode,
    ) -> Result<(Piece, bool), Diagnostic> {
        let Seg::Ref { kind, filter, at } = seg else {
            return Ok((Piece::One(Rc::from("")), false));
        };
        let src = self.g.src;
        let val = match kind {
            RefKind::Env { name, default } => {
                // `${env:NAME`, where an error about the variable points.
                let here = |msg: String| {
                    let off = offset_in(src, &tpl.str, *at);
                    src.error(off..off + 6 + name.len(), msg)
                };
                match std::env::var(name) {
                    // As in the shell, `:-` takes the default when the variable is set but
                    // empty too (below): `QNN_SDK_ROOT=` must not make the SDK root "".
                    Ok(v) if !v.is_empty() || default.is_none() => {
                        // The variables the default names must exist (and count as used)
                        // whatever the environment, so `--check` does not depend on it; the
                        // default itself is not needed (it may name an unset variable).
                        if let Some(d) = default {
                            names_exist(self, d, &d.segs, true, &|_| false)?;
                        }
                        Val::scalar(&v)
                    }
                    Err(std::env::VarError::NotUnicode(_)) => {
                        return Err(here(format!(
                            "environment variable `{name}` is not valid UTF-8"
                        ))
                        .with_hint("a Qairtfile's strings are UTF-8: set it to a UTF-8 value"));
                    }
                    Ok(_) | Err(std::env::VarError::NotPresent) => match default {
                        Some(d) => Val::scalar(&self.render(d, Mode::Scalar { quote: false })?),
                        None => {
                            return Err(here(format!("environment variable `{name}` is not set"))
                                .with_hint(format!(
                                    "set it, or give a default: `${{env:{name}:-VALUE}}`"
                                )));
                        }
                    },
                }
            }
            RefKind::Var { name, index } => {
                let v = self.lookup(name, tpl, *at)?;
                match index {
                    None => v,
                    Some(i) => {
                        let items = v.items();
                        let pos = if *i < 0 { items.len() as i64 + *i } else { *i };
                        match usize::try_from(pos).ok().and_then(|p| items.get(p)) {
                            Some(x) => Val::scalar(x),
                            None => {
                                let off = offset_in(src, &tpl.str, *at);
                                return Err(src.error(
                                    off..off + 2,
                                    format!(
                                        "`{name}[{i}]` is out of range: `{name}` has {} item(s)",
                                        items.len()
                                    ),
                                )
                                .with_hint("indexes count from 0; a negative one counts from the end (`[-1]` is the last)"));
                            }
                        }
                    }
                }
            }
        };
        let quote = matches!(mode, Mode::Scalar { quote: true }) && !matches!(filter, Filter::Raw);
        let piece = match (filter, val) {
            (Filter::Join(sep), v) => {
                let items = v.items();
                let len = items
                    .iter()
                    .map(|i| i.len().saturating_add(sep.len()))
                    .fold(0usize, usize::saturating_add);
                if len > MAX_STRING {
                    return Err(self.too_long(tpl));
                }
                Piece::One(Rc::from(items.join(sep)))
            }
            (Filter::Json, v) => {
                let j = match v {
                    Val::Scalar(s) => serde_json::Value::String(s.to_string()),
                    Val::List(l) => serde_json::Value::Array(
                        l.iter().cloned().map(serde_json::Value::String).collect(),
                    ),
                };
                Piece::One(Rc::from(j.to_string()))
            }
            (_, Val::Scalar(s)) => Piece::One(s),
            (_, Val::List(l)) => match mode {
                Mode::List => Piece::Many(l),
                Mode::Scalar { .. } => {
                    let mut joined = String::new();
                    for (i, item) in l.iter().enumerate() {
                        if i > 0 {
                            joined.push(' ');
                        }
                        if quote {
                            push_quoted(&mut joined, item);
                        } else {
                            joined.push_str(item);
                        }
                        if joined.len() > MAX_STRING {
                            return Err(self.too_long(tpl));
                        }
                    }
                    return Ok((Piece::One(Rc::from(joined)), false));
                }
            },
        };
        Ok((piece, quote))
    }

    /// An error at the start of `tpl`.
    fn too_big(&self, tpl: &Template, msg: String) -> Diagnostic {
        let off = offset_in(self.g.src, &tpl.str, 0);
        self.g.src.error(off..off + 1, msg)
    }

    /// `tpl` gives a string past `MAX_STRING`.
    fn too_long(&self, tpl: &Template) -> Diagnostic {
        self.too_big(
            tpl,
            format!("this string expands to more than {} MiB", MAX_STRING >> 20),
        )
    }

    /// Count what `tpl` produced against the caps on the whole expansion.
    fn charge(&mut self, tpl: &Template, bytes: usize, items: usize) -> Result<(), Diagnostic> {
        self.g.bytes = self.g.bytes.saturating_add(bytes);
        self.g.items = self.g.items.saturating_add(items);
        if self.g.bytes > MAX_BYTES || self.g.items > MAX_ITEMS {
            return Err(self.too_big(
                tpl,
                format!(
                    "the Qairtfile expands to more than {} MiB of text or {MAX_ITEMS} values (stopped here)",
                    MAX_BYTES >> 20
                ),
            )
            .with_hint("a list multiplied by a matrix, or variables doubling each other, grows fast: check what this string expands to"));
        }
        Ok(())
    }

    /// Render a template in the given mode: List mode may give many strings.
    fn expand(&mut self, tpl: &Template, mode: Mode) -> Result<Vec<String>, Diagnostic> {
        let mut acc = vec![String::with_capacity(64)];
        let long = |acc: &[String]| acc.iter().any(|a| a.len() > MAX_STRING);
        for seg in &tpl.segs {
            match seg {
                Seg::Lit(l) => acc.iter_mut().for_each(|a| a.push_str(l)),
                r => match self.eval_ref(r, tpl, mode)? {
                    (Piece::One(s), quote) => {
                        for a in acc.iter_mut() {
                            if quote {
                                push_quoted(a, &s);
                            } else {
                                a.push_str(&s);
                            }
                        }
                    }
                    (Piece::Many(parts), _) => {
                        self.g.multiplied = true;
                        if acc.len().saturating_mul(parts.len()) > MAX_LIST {
                            return Err(
                                self.too_big(tpl, "this string expands to too many items".into())
                            );
                        }
                        // What the product will hold, charged before it is built.
                        let have: usize = acc.iter().map(String::len).sum();
                        let add: usize = parts.iter().map(String::len).sum();
                        let bytes = have
                            .saturating_mul(parts.len())
                            .saturating_add(add.saturating_mul(acc.len()));
                        self.charge(tpl, bytes, acc.len() * parts.len())?;
                        if parts.len() == 1 {
                            acc.iter_mut().for_each(|a| a.push_str(&parts[0]));
                        } else {
                            acc = acc
                                .iter()
                                .flat_map(|a| parts.iter().map(move |p| format!("{a}{p}")))
                                .collect();
                        }
                    }
                },
            }
            if long(&acc) {
                return Err(self.too_long(tpl));
            }
        }
        let bytes = acc.iter().map(String::len).sum();
        self.charge(tpl, bytes, acc.len())?;
        Ok(acc)
    }

    fn render(&mut self, tpl: &Template, mode: Mode) -> Result<String, Diagnostic> {
        let mut s = self.expand(tpl, mode)?.pop().unwrap_or_default();
        // Kept for the whole run (commands, labels): no spare capacity.
        s.shrink_to_fit();
        Ok(s)
    }

    fn value(&mut self, raw: &RawValue) -> Result<Val, Diagnostic> {
        match raw {
            RawValue::Scalar(s) => {
                let tpl = self.g.template(s)?;
                // A string that is exactly one reference takes that variable's value, list or not.
                if let [Seg::Ref {
                    kind: RefKind::Var { name, index: None },
                    filter: Filter::None,
                    at,
                }] = tpl.segs.as_slice()
                {
                    return self.lookup(name, &tpl, *at);
                }
                // Variables this string names are evaluated inside `expand`, each with its
                // own flag: this string's is kept aside meanwhile.
                let outer = std::mem::replace(&mut self.g.multiplied, false);
                let items = self.expand(&tpl, Mode::List);
                let multiplied = std::mem::replace(&mut self.g.multiplied, outer);
                let mut items = items?;
                Ok(if items.len() == 1 && !multiplied {
                    Val::scalar(&items.pop().unwrap_or_default())
                } else {
                    Val::list(items)
                })
            }
            RawValue::List(items, _) => {
                let mut out = Vec::new();
                for i in items {
                    out.extend(self.value(i)?.items());
                    if out.len() > MAX_LIST {
                        return Err(self.g.src.error(raw.span(), "list too long"));
                    }
                }
                Ok(Val::list(out))
            }
            RawValue::Range(from, to, span) => {
                let bound = |e: &mut Self, v: &RawValue| -> Result<i64, Diagnostic> {
                    // One value (a one-item list too, as `"${n}"` with `n = [4]` gives).
                    let items = e.value(v)?.items();
                    let [s] = items.as_slice() else {
                        return Err(e
                            .g
                            .src
                            .error(v.span(), "a range bound must be one integer, not a list"));
                    };
                    s.trim().parse::<i64>().map_err(|_| {
                        e.g.src
                            .error(v.span(), format!("range bound `{s}` is not an integer"))
                    })
                };
                let a = bound(self, from)?;
                let b = bound(self, to)?;
                if b >= a && (b - a) as u64 >= MAX_LIST as u64 {
                    return Err(self
                        .g
                        .src
                        .error(span.clone(), format!("range {a}..{b} is too long")));
                }
                Ok(Val::list(if b < a {
                    Vec::new()
                } else {
                    (a..=b).map(|n| n.to_string()).collect()
                }))
            }
        }
    }
}

// ---------------------------------------------------------------- paths

/// Lexically normalise a path: drop `.` and empty parts, fold `a/..`. Keeps a leading `/`
/// and leading `..` parts (which callers reject for outputs).
///
/// ```
/// use qbuild::expand::normalize;
/// assert_eq!(normalize("./sub/../out.txt"), "out.txt");
/// assert_eq!(normalize("a//b/"), "a/b");
/// assert_eq!(normalize("../x"), "../x");
/// ```
pub fn normalize(p: &str) -> String {
    let clean = !p.is_empty()
        && p != "."
        && !p.contains("//")
        && !p.contains("..")
        && !p.contains("/./")
        && !p.starts_with("./")
        && !p.ends_with('/')
        && !p.ends_with("/.");
    if clean {
        return p.to_string();
    }
    let abs = p.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for c in p.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|l| *l != "..") {
                    parts.pop();
                } else if !abs {
                    parts.push("..");
                }
            }
            c => parts.push(c),
        }
    }
    let body = parts.join("/");
    if abs {
        format!("/{body}")
    } else if body.is_empty() {
        ".".to_string()
    } else {
        body
    }
}

// ---------------------------------------------------------------- expansion

/// Expand every rule of the Qairtfile into jobs.
pub fn expand(q: &Qairtfile) -> Result<Model, Diagnostic> {
    expand_in(q, None)
}

/// The work folder as inputs may name it from outside: its absolute path as given, and
/// its real path (they differ under a symlinked folder).
#[derive(Debug, Clone, Default)]
pub struct WorkRoots(
    Vec<String>,
    /// Outside paths resolved through their links, by path (an input named in every
    /// instance is resolved once).
    std::cell::RefCell<HashMap<String, Option<String>>>,
);

impl WorkRoots {
    pub fn of(workdir: &std::path::Path) -> WorkRoots {
        let mut roots = Vec::new();
        if let Ok(a) = std::path::absolute(workdir) {
            roots.push(normalize(&a.to_string_lossy()));
        }
        let real = workdir.canonicalize().ok();
        // The folder as the shell names it (`cd` through a symlink, or `-C link`): `$PWD`
        // when it is the current folder, and the work folder's place below it.
        if let (Some((pwd, cwd)), Some(real)) = (crate::shell_pwd(), &real) {
            let below = if workdir.is_absolute() {
                workdir.strip_prefix(&cwd).ok()
            } else {
                Some(workdir)
            };
            if let Some(below) = below {
                let n = normalize(&format!("{pwd}/{}", below.display()));
                if std::path::Path::new(&n).canonicalize().ok().as_ref() == Some(real) {
                    roots.push(n);
                }
            }
        }
        if let Some(c) = real {
            roots.push(c.to_string_lossy().into_owned());
        }
        roots.dedup();
        WorkRoots(roots, Default::default())
    }
}

/// `expand`, knowing the work folder: an input named by an absolute path or through `..`
/// that leads back into it is made relative (so it is the same file as its producer's
/// output), and one that is the work folder itself or holds it is refused.
pub fn expand_in(q: &Qairtfile, roots: Option<&WorkRoots>) -> Result<Model, Diagnostic> {
    let src = &q.source;
    let empty = WorkRoots::default();
    let roots = roots.unwrap_or(&empty);
    let mut defs = HashMap::default();
    for (k, v) in &q.vars {
        if defs.insert(k.text.as_str(), v).is_some() {
            return Err(src.error(
                k.span.clone(),
                format!("variable `{}` is defined twice", k.text),
            ));
        }
    }
    let mut g = Globals {
        src,
        names: q.vars.iter().map(|(k, _)| k.text.as_str()).collect(),
        defs,
        memo: HashMap::default(),
        templates: HashMap::default(),
        bytes: 0,
        items: 0,
        roots,
        multiplied: false,
    };
    let mut pools: Vec<Pool> = Vec::new();
    for p in &q.pools {
        pools.push(Pool {
            name: p.name.text.clone(),
            depth: p.depth,
        });
    }
    let mut rules = Vec::new();
    let mut jobs = Vec::new();
    let mut seen_rules: HashMap<&str, ()> = HashMap::default();
    for (ri, rule) in q.rules.iter().enumerate() {
        if rule.toolchain && q.toolchain.is_none() {
            return Err(src
                .error(
                    rule.name.span.clone(),
                    format!(
                        "rule `{}` says `toolchain = true` but there is no [toolchain]",
                        rule.name.text
                    ),
                )
                .with_hint(
                    "declare the SDK: [toolchain] root = \"${env:QNN_SDK_ROOT:-sim-sdk}\"",
                ));
        }
        if seen_rules.insert(rule.name.text.as_str(), ()).is_some() {
            return Err(src.error(
                rule.name.span.clone(),
                format!("rule `{}` is defined twice", rule.name.text),
            ));
        }
        rules.push(RuleInfo {
            name: rule.name.text.clone(),
            name_span: rule.name.span.clone(),
            inputs: rule.inputs.clone(),
            tools: rule.tools.clone(),
            links: rule
                .links
                .iter()
                .map(|l| (l.link.clone(), l.to.clone()))
                .collect(),
            outputs: rule.outputs.clone(),
            manual: rule.manual,
        });
        expand_rule(&mut g, ri as u32, rule, &pools, &mut jobs)?;
    }
    let toolchain = q
        .toolchain
        .as_ref()
        .map(|t| expand_toolchain(&mut g, t))
        .transpose();
    let unused_vars = q
        .vars
        .iter()
        .filter(|(k, _)| !g.memo.contains_key(&k.text))
        .map(|(k, _)| k.clone())
        .collect();
    Ok(Model {
        toolchain,
        unused_vars,
        source: src.clone(),
        rules,
        jobs,
        pools,
        default: q.default.clone(),
        aliases: q
            .aliases
            .iter()
            .map(|a| (a.name.clone(), a.targets.clone()))
            .collect(),
    })
}

/// The `[toolchain]` section, interpolated with the global variables.
fn expand_toolchain(g: &mut Globals<'_>, t: &ToolchainDef) -> Result<Toolchain, Diagnostic> {
    let src = g.src;
    let mut e = Eval::new(g, None);
    let mut one = |s: &Str| -> Result<String, Diagnostic> {
        let tpl = parse_template(src, s)?;
        e.render(&tpl, Mode::Scalar { quote: false })
    };
    let root = normalize(&one(&t.root)?);
    let version_file = match &t.version_file {
        Some(v) => one(v)?,
        None => "sdk.yaml".to_string(),
    };
    let min_version = t.min_version.as_ref().map(&mut one).transpose()?;
    let name = match &t.name {
        Some(n) => one(n)?,
        None => "sdk".to_string(),
    };
    // A list variable in a tool's path stands for one tool per item, as in paths.
    let mut tools = Vec::new();
    for tool in &t.tools {
        let tpl = parse_template(src, tool)?;
        tools.extend(e.expand(&tpl, Mode::List)?);
    }
    Ok(Toolchain {
        name,
        root,
        version_file,
        min_version,
        tools,
        span: t.key_span.clone(),
    })
}

fn instance_label(rule: &RuleDef, assignment: &[(Rc<str>, Rc<str>)]) -> String {
    let mut l = rule.name.text.clone();
    for (k, v) in assignment {
        l.push(' ');
        l.push_str(k);
        l.push('=');
        l.push_str(v);
    }
    l
}

/// Check and normalise a path qbuild will write: inside the work folder, not in `.qbuild/`.
fn output_path(src: &Source, s: &Str, p: &str, what: &str) -> Result<String, Diagnostic> {
    let n = normalize(p);
    if p.is_empty() {
        let a = if what.starts_with(['a', 'e', 'i', 'o', 'u']) {
            "an"
        } else {
            "a"
        };
        return Err(src.error(s.span.clone(), format!("{a} {what} path is empty")));
    }
    // `.` (or `a/..`) is not empty: it names the work folder, which no job may write.
    if n == "." {
        return Err(src
            .error(
                s.span.clone(),
                format!("{what} `{p}` is the work folder itself"),
            )
            .with_hint("name a file or folder inside the work folder"));
    }
    if n.starts_with('/') || n == ".." || n.starts_with("../") {
        return Err(src
            .error(
                s.span.clone(),
                format!("{what} `{p}` is outside the work folder"),
            )
            .with_hint("outputs are relative paths inside the folder that holds the Qairtfile"));
    }
    if in_state_folder(&n) {
        return Err(src.error(
            s.span.clone(),
            format!("{what} `{p}` is inside qbuild's own state folder"),
        ));
    }
    // The Qairtfile sits in the work folder: its name there is its file name.
    if src
        .path
        .file_name()
        .is_some_and(|f| f.as_encoded_bytes() == n.as_bytes())
    {
        return Err(src
            .error(s.span.clone(), format!("{what} `{p}` is the Qairtfile itself"))
            .with_hint("qbuild reads it to know what to build: no job may write it (and `--clean` would delete it)"));
    }
    Ok(n)
}

/// A normalised work-relative path that is qbuild's state folder or inside it.
pub(crate) fn in_state_folder(n: &str) -> bool {
    n == ".qbuild" || n.starts_with(".qbuild/")
}

/// Check and normalise a path a job reads: anything but a folder that holds `.qbuild/`
/// (the work folder or one above it) or a path inside it. qbuild writes its state on every
/// run, so a job reading it would never be up to date.
fn input_path(src: &Source, roots: &WorkRoots, s: &Str, p: &str) -> Result<String, Diagnostic> {
    let mut n = normalize(p);
    // `full` as a work-relative path: "." for the work folder or one above it.
    let inside = |full: &str, root: &str| -> Option<String> {
        if full == root || root.starts_with(&format!("{}/", full.trim_end_matches('/'))) {
            return Some(".".to_string());
        }
        full.strip_prefix(&format!("{root}/")).map(str::to_string)
    };
    let outside = |n: &str| n.starts_with('/') || n.starts_with("../") || n == "..";
    if outside(&n) {
        let full_at = |root: &str| {
            if n.starts_with('/') {
                n.clone()
            } else {
                normalize(&format!("{root}/{n}"))
            }
        };
        if let Some(rel) = roots.0.iter().find_map(|r| inside(&full_at(r), r)) {
            n = rel;
        } else if let Some(root) = roots.0.last() {
            // Through links: an outside name (`/home/me/work` linked to the work folder)
            // of the work folder, or of a file in it. The real root is the last one.
            let full = full_at(root);
            let real = roots
                .1
                .borrow_mut()
                .entry(full.clone())
                .or_insert_with(|| {
                    let path = std::path::Path::new(&full);
                    path.canonicalize()
                        .ok()
                        .or_else(|| crate::clean::real_path(path))
                        .map(|r| r.to_string_lossy().into_owned())
                })
                .clone();
            if let Some(rel) = real.and_then(|r| inside(&r, root)) {
                n = rel;
            }
        }
    }
    let holds_state = n.split('/').all(|c| c == ".." || c == ".");
    if holds_state || in_state_folder(&n) {
        let what = if holds_state {
            "holds qbuild's own state folder (.qbuild/)"
        } else {
            "is inside qbuild's own state folder"
        };
        return Err(src
            .error(s.span.clone(), format!("input `{p}` {what}"))
            .with_hint(
                "qbuild writes .qbuild/ on every run, so the job would never be up to date: name the folders it reads",
            ));
    }
    Ok(n)
}

/// The relative text of a link at `link` pointing at `to` (both normalised, work-relative).
pub fn relative_link(link: &str, to: &str) -> String {
    let from: Vec<&str> = link.split('/').collect();
    let from_dir = &from[..from.len().saturating_sub(1)];
    let target: Vec<&str> = to.split('/').collect();
    let common = from_dir
        .iter()
        .zip(&target)
        .take_while(|(a, b)| a == b)
        .count();
    let mut parts: Vec<&str> = vec![".."; from_dir.len() - common];
    parts.extend(&target[common..]);
    parts.join("/")
}

fn matches(
    e: &mut Eval<'_, '_, '_>,
    cond: &Condition,
    assignment: &[(Rc<str>, Rc<str>)],
    what: &str,
) -> Result<bool, Diagnostic> {
    for (k, v) in cond {
        let Some((_, cur)) = assignment.iter().find(|(n, _)| **n == *k.text) else {
            let names: Vec<&str> = assignment.iter().map(|(n, _)| &**n).collect();
            let d = e.g.src.error(
                k.span.clone(),
                format!(
                    "`{}` in {what} is not a matrix variable of this rule",
                    k.text
                ),
            );
            return Err(match closest(&k.text, names.iter().copied()) {
                Some(c) => d.with_hint(format!("did you mean `{c}`?")),
                None if names.is_empty() => d.with_hint(format!(
                    "this rule has no `matrix`: {what} picks among matrix values, so give it one"
                )),
                None => d.with_hint(format!(
                    "{what} names the rule's matrix variables: {}",
                    names.join(", ")
                )),
            });
        };
        if !e.value(v)?.items().iter().any(|x| **x == **cur) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Refuse `rule` at `span` when its `adding` jobs (None: more than a usize counts; `links`:
/// counted with its link jobs) take the Qairtfile past `MAX_JOBS`, `before` of them made by
/// the rules above it. The cap is on
/// all rules together, as the memory is: when the rule alone is under it, the message says
/// so, rather than blame the rule for a count it does not have.
fn job_cap(
    src: &Source,
    rule: &RuleDef,
    span: std::ops::Range<usize>,
    before: usize,
    adding: Option<usize>,
    links: bool,
) -> Result<(), Diagnostic> {
    let name = &rule.name.text;
    let note = if links { " (each link is one)" } else { "" };
    match adding {
        Some(n) if before.saturating_add(n) <= MAX_JOBS => Ok(()),
        Some(n) if n <= MAX_JOBS => Err(src
            .error(
                span,
                format!("rule `{name}` takes the Qairtfile past {MAX_JOBS} jobs{note}"),
            )
            .with_hint(format!(
                "the rules above it make {before} jobs, and {}: the limit is on all rules together",
                if links {
                    format!("with its links it makes {n}")
                } else {
                    format!("its matrix has {n} instances")
                }
            ))),
        _ => Err(src.error(
            span,
            format!("rule `{name}` expands to more than {MAX_JOBS} jobs{note}"),
        )),
    }
}

// Boxed specs (see `Model::jobs`): the graph takes them over one by one, never holding a
// second buffer of every spec.
#[allow(clippy::vec_box)]
fn expand_rule<'a>(
    g: &mut Globals<'a>,
    ri: u32,
    rule: &'a RuleDef,
    pools: &[Pool],
    jobs: &mut Vec<Box<JobSpec>>,
) -> Result<(), Diagnostic> {
    let src = g.src;
    let roots = g.roots;
    // Matrix axes.
    let mut axes: Vec<(Rc<str>, Vec<Rc<str>>)> = Vec::new();
    {
        let mut e = Eval::new(g, None);
        for (k, v) in &rule.matrix {
            if axes.iter().any(|(n, _)| **n == *k.text) {
                return Err(src.error(
                    k.span.clone(),
                    format!("matrix variable `{}` appears twice", k.text),
                ));
            }
            axes.push((
                Rc::from(k.text.as_str()),
                e.value(v)?
                    .items()
                    .iter()
                    .map(|x| Rc::from(x.as_str()))
                    .collect(),
            ));
        }
    }
    let total = axes
        .iter()
        .try_fold(1usize, |acc, (_, v)| acc.checked_mul(v.len()));
    // Before any instance is made: the jobs of the rules above and this rule's count.
    let jobs_before = jobs.len();
    job_cap(src, rule, rule.name.span.clone(), jobs_before, total, false)?;
    let pool = match &rule.pool {
        None => None,
        Some(p) => match pools.iter().position(|x| x.name == p.text) {
            Some(i) => Some(i as u32),
            None => {
                let d = src.error(p.span.clone(), format!("unknown pool `{}`", p.text));
                return Err(
                    match closest(&p.text, pools.iter().map(|x| x.name.as_str())) {
                        Some(c) => d.with_hint(format!("did you mean `{c}`?")),
                        None => d.with_hint(format!("declare it: [pool] {} = 1", p.text)),
                    },
                );
            }
        },
    };
    // Templates parsed once per rule.
    let inputs_t: Vec<Template> = rule
        .inputs
        .iter()
        .map(|s| parse_template(src, s))
        .collect::<Result<_, _>>()?;
    let outputs_t: Vec<Template> = rule
        .outputs
        .iter()
        .map(|s| parse_template(src, s))
        .collect::<Result<_, _>>()?;
    let action_t: Vec<Template> = match &rule.action {
        RawAction::Shell(s) | RawAction::Content(s) => vec![parse_template(src, s)?],
        RawAction::Argv(a) => a
            .iter()
            .map(|s| parse_template(src, s))
            .collect::<Result<_, _>>()?,
        RawAction::LinksOnly => Vec::new(),
    };
    let links_t: Vec<(Template, Template)> = rule
        .links
        .iter()
        .map(|l| Ok((parse_template(src, &l.link)?, parse_template(src, &l.to)?)))
        .collect::<Result<_, Diagnostic>>()?;
    let tools_t: Vec<Template> = rule
        .tools
        .iter()
        .map(|s| parse_template(src, s))
        .collect::<Result<_, _>>()?;
    let check_t = rule
        .check
        .as_ref()
        .map(|c| parse_template(src, c))
        .transpose()?;
    let env_t: Vec<(String, Template)> = rule
        .env
        .iter()
        .map(|(k, v)| Ok((k.text.clone(), parse_template(src, v)?)))
        .collect::<Result<_, Diagnostic>>()?;
    let desc_t = rule
        .description
        .as_ref()
        .map(|d| parse_template(src, d))
        .transpose()?;

    let mut idx = vec![0usize; axes.len()];
    let total = total.unwrap_or(0);
    // Exactly: a doubled buffer would be idle memory for the whole run.
    jobs.reserve_exact(total.min(1 << 20));
    for _ in 0..total {
        let assignment: Vec<(Rc<str>, Rc<str>)> = axes
            .iter()
            .zip(&idx)
            .map(|((n, v), i)| (n.clone(), v[*i].clone()))
            .collect();
        // Advance the odometer (last axis fastest).
        for d in (0..idx.len()).rev() {
            idx[d] += 1;
            if idx[d] < axes[d].1.len() {
                break;
            }
            idx[d] = 0;
        }
        let mut e = Eval::new(&mut *g, None);
        let mut excluded = false;
        for c in &rule.exclude {
            if matches(&mut e, c, &assignment, "exclude")? {
                excluded = true;
                break;
            }
        }
        if excluded {
            continue;
        }
        let mut case_lets: &[(Str, RawValue)] = &[];
        for case in &rule.cases {
            if matches(&mut e, &case.when, &assignment, "when")? {
                case_lets = &case.lets;
                break;
            }
        }
        let job = {
            let mut e = Eval::new(
                &mut *g,
                Some(Scope {
                    matrix: &assignment,
                    lets: &rule.lets,
                    case_lets,
                    let_memo: Vec::new(),
                    io: None,
                }),
            );
            let mut inputs = Vec::new();
            let mut input_template = Vec::new();
            for (ti, t) in inputs_t.iter().enumerate() {
                for p in e.expand(t, Mode::List)? {
                    if p.is_empty() {
                        return Err(src.error(t.str.span.clone(), "an input path is empty"));
                    }
                    inputs.push(input_path(src, roots, &t.str, &p)?);
                    input_template.push(ti as u16);
                }
            }
            let mut outputs = Vec::new();
            let mut output_template = Vec::new();
            for (ti, t) in outputs_t.iter().enumerate() {
                for p in e.expand(t, Mode::List)? {
                    outputs.push(output_path(src, &t.str, &p, "output")?);
                    output_template.push(ti as u16);
                }
            }
            for (ti, t) in tools_t.iter().enumerate() {
                for p in e.expand(t, Mode::List)? {
                    if p.is_empty() {
                        return Err(src.error(t.str.span.clone(), "a tool path is empty"));
                    }
                    inputs.push(input_path(src, roots, &t.str, &p)?);
                    input_template.push((inputs_t.len() + ti) as u16);
                }
            }
            // Each link is a job of its own: its identity is its text, and it waits for its
            // target (order only) so readers through it see built content.
            let label_base = instance_label(rule, &assignment);
            for (li, (lt, tt)) in links_t.iter().enumerate() {
                let links = e.expand(lt, Mode::List)?;
                let tos = e.expand(tt, Mode::List)?;
                if tos.len() != 1 && tos.len() != links.len() {
                    return Err(src.error(
                        tt.str.span.clone(),
                        format!(
                            "{} link path(s) but {} target(s): give one target, or one per link",
                            links.len(),
                            tos.len()
                        ),
                    ));
                }
                job_cap(
                    src,
                    rule,
                    lt.str.span.clone(),
                    jobs_before,
                    Some((jobs.len() - jobs_before).saturating_add(links.len())),
                    true,
                )?;
                for (k, l) in links.iter().enumerate() {
                    let link = output_path(src, &lt.str, l, "link")?;
                    let to_raw = &tos[if tos.len() == 1 { 0 } else { k }];
                    let to = normalize(to_raw);
                    if to.starts_with('/')
                        || to == ".."
                        || to.starts_with("../")
                        || to_raw.is_empty()
                    {
                        return Err(src
                            .error(tt.str.span.clone(), format!("link target `{to_raw}` is outside the work folder"))
                            .with_hint("links point inside the work folder, and qbuild writes them relative, so the folder can move"));
                    }
                    if to == link {
                        return Err(src.error(
                            tt.str.span.clone(),
                            format!("link `{link}` points at itself"),
                        ));
                    }
                    if to == "." || in_state_folder(&to) {
                        return Err(src
                            .error(
                                tt.str.span.clone(),
                                format!("link `{link}` points at the work folder or into qbuild's own state folder (`{to_raw}`)"),
                            )
                            .with_hint("qbuild writes .qbuild/ on every run, so a reader of the link would never be up to date"));
                    }
                    jobs.push(Box::new(JobSpec {
                        rule: ri,
                        label: format!("link {link} ({label_base})"),
                        inputs: Vec::new(),
                        outputs: vec![link.clone()],
                        output_template: vec![u16::MAX],
                        input_template: vec![li as u16],
                        action: Action::Link(relative_link(&link, &to)),
                        env: Vec::new(),
                        pool: None,
                        order_only: vec![to],
                        check: None,
                        toolchain: false,
                        allow_empty: true,
                    }));
                }
            }
            if matches!(rule.action, RawAction::LinksOnly) {
                continue;
            }
            if outputs.is_empty() {
                return Err(src.error(
                    rule.outputs_span.clone(),
                    "this instance has no outputs (an empty list?)",
                ));
            }
            let let_memo = e.scope.take().map(|sc| sc.let_memo).unwrap_or_default();
            let mut e = Eval::new(
                &mut *g,
                Some(Scope {
                    matrix: &assignment,
                    lets: &rule.lets,
                    case_lets,
                    let_memo,
                    io: Some((Val::list(inputs.clone()), Val::list(outputs.clone()))),
                }),
            );
            let action = match &rule.action {
                RawAction::Shell(_) => {
                    Action::Shell(e.render(&action_t[0], Mode::Scalar { quote: true })?)
                }
                RawAction::Content(_) => {
                    if outputs.len() != 1 {
                        return Err(src
                            .error(
                                rule.outputs_span.clone(),
                                format!(
                                    "`content` writes one output, but `{}` has {}",
                                    instance_label(rule, &assignment),
                                    outputs.len()
                                ),
                            )
                            .with_hint("one rule instance per file: put the list in a matrix"));
                    }
                    let text = e.render(&action_t[0], Mode::Scalar { quote: false })?;
                    // The post-step check would fail every build of it.
                    if text.is_empty() && !rule.allow_empty {
                        return Err(src
                            .error(
                                action_t[0].str.span.clone(),
                                format!(
                                    "the content of `{}` is empty, and an empty output fails its job",
                                    instance_label(rule, &assignment)
                                ),
                            )
                            .with_hint("set `allow_empty = true` on the rule if an empty file is right"));
                    }
                    Action::Write(text)
                }
                RawAction::Argv(_) => {
                    let mut argv = Vec::new();
                    for t in &action_t {
                        argv.extend(e.expand(t, Mode::List)?);
                    }
                    let at = || {
                        action_t
                            .first()
                            .map_or(rule.name.span.clone(), |t| t.str.span.clone())
                    };
                    if argv.first().is_none_or(String::is_empty) {
                        return Err(src.error(at(), format!(
                            "`argv` of `{}` names no program (it expands to nothing, or to an empty first word)",
                            instance_label(rule, &assignment)
                        )));
                    }
                    // One word with a space and nothing after it is a command line that a
                    // variable brought in whole (`argv = "${cmd}"`): no such program exists.
                    if let [only] = argv.as_slice() {
                        if only.contains(char::is_whitespace) {
                            return Err(src
                                .error(
                                    at(),
                                    format!(
                                        "`argv` of `{}` is one word with a space, `{only}`: a program and its arguments are separate items",
                                        instance_label(rule, &assignment)
                                    ),
                                )
                                .with_hint("give the program and each argument as items of their own (a list, or a list variable), or use `command = \"...\"` for a shell command line"));
                        }
                    }
                    Action::Argv(argv)
                }
                RawAction::LinksOnly => continue,
            };
            let check = match &check_t {
                Some(t) => Some(e.render(t, Mode::Scalar { quote: true })?),
                None => None,
            };
            let mut env = Vec::new();
            for (k, t) in &env_t {
                env.push((k.clone(), e.render(t, Mode::Scalar { quote: false })?));
            }
            let label = match &desc_t {
                Some(t) => e.render(t, Mode::Scalar { quote: false })?,
                None => label_base,
            };
            JobSpec {
                rule: ri,
                label,
                inputs,
                outputs,
                output_template,
                input_template,
                action,
                env,
                pool,
                order_only: Vec::new(),
                check,
                toolchain: rule.toolchain,
                allow_empty: rule.allow_empty,
            }
        };
        jobs.push(Box::new(job));
    }
    // A let is evaluated only when an instance names it: check that every variable each
    // let names exists, as an instance would (`${nope}` in a let nothing uses, or in a case
    // that never matches, passed `--check`). Once per rule, not per instance.
    let mut lets_t = Vec::new();
    for (_, v) in rule
        .lets
        .iter()
        .chain(rule.cases.iter().flat_map(|c| &c.lets))
    {
        value_templates(g, v, &mut lets_t)?;
    }
    let local = |n: &str| {
        axes.iter().any(|(a, _)| **a == *n)
            || rule
                .lets
                .iter()
                .chain(rule.cases.iter().flat_map(|c| &c.lets))
                .any(|(k, _)| k.text == n)
    };
    let mut e = Eval::new(&mut *g, None);
    if jobs.len() == jobs_before {
        // No instance (an empty matrix, or all excluded): nothing was evaluated, so check
        // at least that every variable the rule names exists, as an instance would.
        let plain = inputs_t
            .iter()
            .chain(&outputs_t)
            .chain(&tools_t)
            .chain(links_t.iter().flat_map(|(a, b)| [a, b]));
        let io = action_t
            .iter()
            .chain(&check_t)
            .chain(env_t.iter().map(|(_, t)| t))
            .chain(&desc_t);
        for (t, with_io) in plain.map(|t| (t, false)).chain(io.map(|t| (t, true))) {
            names_exist(&mut e, t, &t.segs, with_io, &local)?;
        }
    }
    // (A let used by a command may name the instance's inputs and outputs.)
    for t in &lets_t {
        names_exist(&mut e, t, &t.segs, true, &local)?;
    }
    Ok(())
}

/// The templates of a variable's value (list items, range bounds).
fn value_templates(
    g: &mut Globals<'_>,
    v: &RawValue,
    out: &mut Vec<Rc<Template>>,
) -> Result<(), Diagnostic> {
    match v {
        RawValue::Scalar(s) => out.push(g.template(s)?),
        RawValue::List(items, _) => {
            for i in items {
                value_templates(g, i, out)?;
            }
        }
        RawValue::Range(a, b, _) => {
            value_templates(g, a, out)?;
            value_templates(g, b, out)?;
        }
    }
    Ok(())
}

/// Every variable `segs` names is local (`local`), `inputs`/`outputs` where allowed, or a
/// global (evaluated: an unknown name is the usual error, with its hint).
fn names_exist(
    e: &mut Eval<'_, '_, '_>,
    tpl: &Template,
    segs: &[Seg],
    with_io: bool,
    local: &dyn Fn(&str) -> bool,
) -> Result<(), Diagnostic> {
    for seg in segs {
        match seg {
            Seg::Lit(_) => {}
            Seg::Ref {
                kind: RefKind::Var { name, .. },
                at,
                ..
            } => {
                let io = with_io && (name == "inputs" || name == "outputs");
                if !io && !local(name) {
                    e.lookup(name, tpl, *at)?;
                }
            }
            Seg::Ref {
                kind: RefKind::Env { default, .. },
                ..
            } => {
                if let Some(d) = default {
                    names_exist(e, tpl, &d.segs, with_io, local)?;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{job_cap, MAX_JOBS};
    use crate::diag::Source;
    use crate::qairtfile::parse;

    /// Six rules of 2200 × 2200 instances (the fuzzer's case) are each under the cap, and
    /// together far over it: the second is refused, at its name, before it is expanded
    /// (the counts are the matrix sizes, so this test makes no jobs), and the message says
    /// it is the total, not that rule, that is too many. A rule over the cap alone keeps
    /// the message it had.
    #[test]
    fn the_job_cap_is_on_all_rules_together() {
        let mut text = String::from("[vars]\ns = { range = [1, 2200] }\n");
        for i in 1..=6 {
            text.push_str(&format!(
                "[rule.r{i}]\nmatrix = {{ a = \"${{s}}\", b = \"${{s}}\" }}\noutputs = [\"o{i}/${{a}}/${{b}}\"]\ncommand = \"true\"\n"
            ));
        }
        let q = parse(Source::new(std::path::Path::new("Qairtfile"), text)).expect("parses");
        let each = 2200 * 2200;
        assert!(each < MAX_JOBS && 2 * each > MAX_JOBS);
        let r = &q.rules;
        let cap = |i: usize, before, adding, links| {
            job_cap(
                &q.source,
                &r[i],
                r[i].name.span.clone(),
                before,
                adding,
                links,
            )
        };
        assert!(cap(0, 0, Some(each), false).is_ok());
        let e = cap(1, each, Some(each), false).expect_err("the total is over the cap");
        assert_eq!(e.message, "rule `r2` takes the Qairtfile past 5000000 jobs");
        assert_eq!(e.position(), "Qairtfile:7:7");
        assert_eq!(
            e.hint.as_deref(),
            Some("the rules above it make 4840000 jobs, and its matrix has 4840000 instances: the limit is on all rules together")
        );
        // Exactly at the cap is fine; one more is not.
        assert!(cap(1, MAX_JOBS - each, Some(each), false).is_ok());
        assert!(cap(1, MAX_JOBS - each + 1, Some(each), false).is_err());
        let e = cap(1, each, Some(each), true).expect_err("over, with links");
        assert_eq!(
            e.message,
            "rule `r2` takes the Qairtfile past 5000000 jobs (each link is one)"
        );
        for adding in [Some(MAX_JOBS + 1), None] {
            let e = cap(0, 0, adding, false).expect_err("one rule over the cap");
            assert_eq!(e.message, "rule `r1` expands to more than 5000000 jobs");
        }
    }
}
