//! The dependency manager: verifies the `[toolchain]` (SDK root, tools, version from `sdk.yaml`, minimum version) before anything runs.

use std::cmp::Ordering;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::diag::{Diagnostic, Source};
use crate::expand::Toolchain;

/// The verified toolchain: what goes into the key of every `toolchain = true` job.
#[derive(Debug, Clone)]
pub struct Verified {
    pub name: String,
    pub root: PathBuf,
    pub version: String,
}

/// Check the SDK is there, complete and new enough; read its version.
pub fn verify(tc: &Toolchain, workdir: &Path, src: &Source) -> Result<Verified, Diagnostic> {
    let here = |msg: String, hint: String| src.error(tc.span.clone(), msg).with_hint(hint);
    let root = workdir.join(&tc.root);
    if !root.is_dir() {
        return Err(here(
            format!(
                "toolchain `{}`: root {} does not exist",
                tc.name,
                root.display()
            ),
            "set QNN_SDK_ROOT to the QAIRT SDK folder (the one holding sdk.yaml and bin/)".into(),
        ));
    }
    let vf = root.join(&tc.version_file);
    let text = std::fs::read_to_string(&vf).map_err(|e| {
        here(
            format!("toolchain `{}`: cannot read {}: {e}", tc.name, vf.display()),
            "the SDK's version is the `version:` key of this file".into(),
        )
    })?;
    let version = read_version(&text).ok_or_else(|| {
        here(
            format!(
                "toolchain `{}`: {} has no `version:` line",
                tc.name,
                vf.display()
            ),
            "expected a line like `version: 2.31.0.250130`".into(),
        )
    })?;
    if let Some(min) = &tc.min_version {
        // Part by part as numbers: a part that is not one cannot be ordered (`v2.9`, `2.x`
        // were taken as newer than anything).
        if !is_numeric_version(min) {
            return Err(here(
                format!(
                    "toolchain `{}`: min_version `{min}` is not a version",
                    tc.name
                ),
                "write numbers separated by dots, as `min_version = \"2.28\"`".into(),
            ));
        }
        if !is_numeric_version(&version) {
            return Err(here(
                format!(
                    "toolchain `{}` is version `{version}` (in {}), which cannot be compared with the required {min}",
                    tc.name,
                    vf.display()
                ),
                "a version is numbers separated by dots, as `version: 2.31.0.250130`".into(),
            ));
        }
        if compare_versions(&version, min) == Ordering::Less {
            return Err(here(
                format!(
                    "toolchain `{}` is version {version}, older than the required {min}",
                    tc.name
                ),
                format!("install QAIRT {min} or newer and point QNN_SDK_ROOT at it"),
            ));
        }
    }
    for tool in &tc.tools {
        let p = root.join(tool);
        let ok = std::fs::metadata(&p)
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false);
        if !ok {
            return Err(here(
                format!(
                    "toolchain `{}`: tool {} is missing or not executable",
                    tc.name,
                    p.display()
                ),
                "is QNN_SDK_ROOT the right SDK, and is it complete?".into(),
            ));
        }
    }
    Ok(Verified {
        name: tc.name.clone(),
        root,
        version,
    })
}

/// The value of the first top-level `version:` key of a YAML file.
pub fn read_version(yaml: &str) -> Option<String> {
    yaml.lines().find_map(|l| {
        let rest = l.strip_prefix("version:")?;
        let v = rest
            .split('#')
            .next()?
            .trim()
            .trim_matches(|c| c == '"' || c == '\'');
        (!v.is_empty()).then(|| v.to_string())
    })
}

/// `2.31.0.250130`, `2.28`, `v2.28`: numbers separated by `.` or `-` (a leading `v` allowed).
pub fn is_numeric_version(v: &str) -> bool {
    let v = v.strip_prefix('v').unwrap_or(v);
    !v.is_empty()
        && v.split(['.', '-'])
            .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
}

/// Compare dotted versions part by part, numerically where both parts are numbers.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (a, b) = (
        a.strip_prefix('v').unwrap_or(a),
        b.strip_prefix('v').unwrap_or(b),
    );
    let pa: Vec<&str> = a.split(['.', '-']).collect();
    let pb: Vec<&str> = b.split(['.', '-']).collect();
    for i in 0..pa.len().max(pb.len()) {
        let x = pa.get(i).copied().unwrap_or("0");
        let y = pb.get(i).copied().unwrap_or("0");
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(m), Ok(n)) => m.cmp(&n),
            _ => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("2.31.0.250130", "2.28"), Ordering::Greater);
        assert_eq!(compare_versions("2.9", "2.10"), Ordering::Less);
        assert_eq!(compare_versions("2.28.0", "2.28"), Ordering::Equal);
        assert_eq!(compare_versions("v2.31.0", "2.28"), Ordering::Greater);
    }

    #[test]
    fn only_numbers_are_versions() {
        for v in ["2.28", "2.31.0.250130", "v2.28", "2-28"] {
            assert!(is_numeric_version(v), "{v}");
        }
        for v in ["", "abc", "v", "2.x", "2..28", "-1", "v2.9a", "true"] {
            assert!(!is_numeric_version(v), "{v}");
        }
    }

    #[test]
    fn reads_the_version_key() {
        assert_eq!(
            read_version("name: x\nversion: \"2.31.0\" # sdk\n").as_deref(),
            Some("2.31.0")
        );
        assert_eq!(read_version("name: x\n"), None);
    }
}
