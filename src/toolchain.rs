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
        // By their leading numbers: text was compared as text, so `v2.9` and `2.x` were
        // taken as newer than anything; one that does not start with a number is refused.
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

/// The leading numbers of a version (`2.31.0.250130`, `v2.28`, `2.31.0-rc1` gives
/// 2, 31, 0): what is compared. `None` if it does not start with a number.
pub fn version_numbers(v: &str) -> Option<Vec<u64>> {
    let v = v.strip_prefix('v').unwrap_or(v);
    let nums: Vec<u64> = v
        .split(['.', '-', '_', '+'])
        .map_while(|p| p.parse::<u64>().ok())
        .collect();
    (!nums.is_empty()).then_some(nums)
}

/// Whether `v` starts with a number, so that it can be compared.
pub fn is_numeric_version(v: &str) -> bool {
    version_numbers(v).is_some()
}

/// Compare versions by their leading numbers, part by part (`2.9` < `2.28`; a missing
/// part is 0; a suffix such as `-rc1` is not compared). Text that does not start with a
/// number sorts first: callers refuse it (`is_numeric_version`).
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let (pa, pb) = (
        version_numbers(a).unwrap_or_default(),
        version_numbers(b).unwrap_or_default(),
    );
    for i in 0..pa.len().max(pb.len()) {
        let o = pa.get(i).unwrap_or(&0).cmp(pb.get(i).unwrap_or(&0));
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
        for v in [
            "2.28",
            "2.31.0.250130",
            "v2.28",
            "2-28",
            "2.31.0-rc1",
            "2.x",
        ] {
            assert!(is_numeric_version(v), "{v}");
        }
        for v in ["", "abc", "v", "-1", "true", "x2.9"] {
            assert!(!is_numeric_version(v), "{v}");
        }
        // A part that is not a number ends the comparison: `2.x` is 2, older than 2.28
        // (it used to sort as newer than anything).
        assert_eq!(compare_versions("2.x", "2.28"), Ordering::Less);
        assert_eq!(compare_versions("v2.9a", "2.28"), Ordering::Less);
        assert_eq!(compare_versions("2.31.0-rc1", "2.28"), Ordering::Greater);
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
