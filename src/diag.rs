//! Diagnostics for Qairtfile errors: a message, a file:line:column location, a caret under the source, a hint.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// A user-facing error in a Qairtfile (or in a target named on the command line).
#[derive(Debug, Clone)]
pub struct Diagnostic {
    pub message: String,
    pub location: Option<Location>,
    pub hint: Option<String>,
}

/// Where in which file a diagnostic points, already resolved to line and column.
#[derive(Debug, Clone)]
pub struct Location {
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    /// The text of the line, for the caret display.
    pub line_text: String,
    /// How many characters the caret underlines (at least 1).
    pub width: usize,
}

/// A source file held in memory so byte spans can be turned into locations.
#[derive(Debug, Clone)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    pub fn new(path: &Path, text: String) -> Source {
        Source {
            path: path.to_path_buf(),
            text,
        }
    }

    /// Resolve a byte span to a location (clamped to the text, never panics).
    pub fn locate(&self, span: Range<usize>) -> Location {
        let len = self.text.len();
        let mut start = span.start.min(len);
        while start > 0 && !self.text.is_char_boundary(start) {
            start -= 1;
        }
        let mut end = span.end.clamp(start, len);
        while end < len && !self.text.is_char_boundary(end) {
            end += 1;
        }
        let line_start = self.text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = self.text[start..].find('\n').map_or(len, |i| start + i);
        let line = self.text[..start].matches('\n').count() + 1;
        // A byte-order mark opens the first line but takes no column.
        let bom = if line_start == 0 && self.text.starts_with('\u{feff}') {
            '\u{feff}'.len_utf8()
        } else {
            0
        };
        let column = self.text[(line_start + bom).min(start)..start]
            .chars()
            .count()
            + 1;
        let line_text = self.text[(line_start + bom).min(line_end)..line_end]
            .trim_end_matches('\r')
            .to_string();
        let width = self.text[start..end.min(line_end).max(start)]
            .chars()
            .count()
            .max(1);
        Location {
            file: self.path.clone(),
            line,
            column,
            line_text,
            width,
        }
    }

    pub fn error(&self, span: Range<usize>, message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            message: message.into(),
            location: Some(self.locate(span)),
            hint: None,
        }
    }
}

impl Diagnostic {
    pub fn plain(message: impl Into<String>) -> Diagnostic {
        Diagnostic {
            message: message.into(),
            location: None,
            hint: None,
        }
    }

    pub fn with_hint(mut self, hint: impl Into<String>) -> Diagnostic {
        self.hint = Some(hint.into());
        self
    }

    /// `file:line:column` or empty when the error has no location.
    pub fn position(&self) -> String {
        match &self.location {
            Some(l) => format!("{}:{}:{}", l.file.display(), l.line, l.column),
            None => String::new(),
        }
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(l) => {
                writeln!(f, "error: {}", self.message)?;
                let num = l.line.to_string();
                let pad = " ".repeat(num.len());
                writeln!(f, "{pad}--> {}:{}:{}", l.file.display(), l.line, l.column)?;
                writeln!(f, "{pad} |")?;
                writeln!(f, "{num} | {}", l.line_text)?;
                let lead: String = l
                    .line_text
                    .chars()
                    .take(l.column.saturating_sub(1))
                    .map(|c| if c == '\t' { '\t' } else { ' ' })
                    .collect();
                write!(f, "{pad} | {lead}{}", "^".repeat(l.width))?;
            }
            None => write!(f, "error: {}", self.message)?,
        }
        if let Some(h) = &self.hint {
            // Align `=` with the `|` margin, as rustc does.
            let pad = self
                .location
                .as_ref()
                .map_or(1, |l| l.line.to_string().len());
            write!(f, "\n{} = hint: {h}", " ".repeat(pad))?;
        }
        Ok(())
    }
}

impl std::error::Error for Diagnostic {}

/// Suggest the closest of `candidates` to `word` (edit distance ≤ 2), for "did you mean" hints.
pub fn closest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let max = 2.max(word.len() / 4);
    let mut best: Option<(usize, &str)> = None;
    for c in candidates {
        // Within `max`, and closer than the best so far (a long list of paths is cheap:
        // most are given up after a few rows).
        let within = best.map_or(max, |(bd, _)| bd.saturating_sub(1));
        if let Some(d) = edit_distance_within(word, c, within) {
            best = Some((d, c));
        }
    }
    best.map(|(_, c)| c)
}

/// The edit distance of `a` and `b` if it is at most `max`.
fn edit_distance_within(a: &str, b: &str, max: usize) -> Option<usize> {
    if a.len().abs_diff(b.len()) > max * 4 {
        return None; // (bytes: a char is at most 4)
    }
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        // A row's least value never drops in the rows below.
        if cur.iter().min().is_some_and(|&m| m > max) {
            return None;
        }
        prev = cur;
    }
    Some(prev[b.len()]).filter(|&d| d <= max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locates_line_and_column() {
        let s = Source::new(Path::new("Q"), "a = 1\nbb = \"x\"\n".to_string());
        let l = s.locate(11..14);
        assert_eq!((l.line, l.column, l.width), (2, 6, 3));
        assert_eq!(l.line_text, "bb = \"x\"");
    }

    #[test]
    fn out_of_range_span_does_not_panic() {
        let s = Source::new(Path::new("Q"), "é".to_string());
        let l = s.locate(1..100);
        assert_eq!(l.line, 1);
    }

    #[test]
    fn suggests_close_names() {
        assert_eq!(closest("comand", ["command", "inputs"]), Some("command"));
        assert_eq!(closest("zzzzzz", ["command", "inputs"]), None);
        // The closest wins, wherever it is in the list; ties go to the first.
        let paths = ["out/split_2.bin", "out/split_1.bin", "out/split_1.bim"];
        assert_eq!(closest("out/split_1.bim", paths), Some("out/split_1.bim"));
        assert_eq!(closest("out/split_1.bix", paths), Some("out/split_1.bin"));
        assert_eq!(closest("models/llama.onnx", paths), None);
    }
}
