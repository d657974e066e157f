//! The current content hash of an artifact on disk (file, directory tree, or symlink), reusing the stat cache so unchanged files are never re-read.

use crate::hash::StatCache;
use std::borrow::Cow;
use std::ffi::OsStr;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::hash::{
    coarse_now_ns, hash_file, hash_link, Hash, HashStats, StatEntry, StatKey, TreeHasher,
};

/// Kinds recorded in a tree hash.
const KIND_FILE: u8 = 0;
const KIND_DIR: u8 = 1;
const KIND_LINK: u8 = 2;

/// An artifact's two hashes: `content` is what readers see (through links), `ident` is what
/// its producer made (a link's text). They differ only for symlinks, and for folders holding
/// symlinks (whose `ident` tree takes each link's text where `content` follows it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Art {
    pub content: Hash,
    pub ident: Hash,
}

/// A link's identity: its text alone.
pub fn link_identity(text: &Path) -> Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"qbuild-link-text\0");
    h.update(text.as_os_str().as_encoded_bytes());
    *h.finalize().as_bytes()
}

/// Hashes artifacts under a work folder; safe to share between threads.
pub struct Artifacts<'a> {
    pub workdir: PathBuf,
    /// The work folder is the process's current folder (the usual case), so a relative key
    /// names its file as it is: no joined copy, and the kernel walks fewer components.
    workdir_is_cwd: bool,
    pub cache: &'a StatCache,
    pub stats: &'a HashStats,
    /// New or refreshed stat-cache entries to write back.
    pub updates: Mutex<Vec<(String, StatEntry)>>,
    /// Set for an instance used while nothing runs (`before_build`).
    before: Option<BeforeBuild<'a>>,
}

/// What hashing may take for granted while nothing runs.
struct BeforeBuild<'a> {
    /// Folder hashes by key: a folder that many links point to (the split's test vectors)
    /// is walked once.
    folders: Mutex<rustc_hash::FxHashMap<String, Art>>,
    /// What the run's opening scan found for a file, by key (`None`: not scanned): trusted
    /// without another stat.
    scanned: &'a Scanned<'a>,
}

/// A file's content hash as the run's opening scan found it.
pub type Scanned<'a> = dyn Fn(&str) -> Option<Hash> + Sync + 'a;

impl<'a> Artifacts<'a> {
    pub fn new(workdir: &Path, cache: &'a StatCache, stats: &'a HashStats) -> Self {
        Artifacts {
            workdir: workdir.to_path_buf(),
            workdir_is_cwd: crate::current_dir() == Some(workdir),
            cache,
            stats,
            updates: Mutex::new(Vec::new()),
            before: None,
        }
    }

    /// For hashing before anything runs: each folder is walked at most once, and a file the
    /// opening scan found is not looked at again. Never for an instance used after a job ran.
    pub fn before_build(mut self, scanned: &'a Scanned<'a>) -> Self {
        self.before = Some(BeforeBuild {
            folders: Mutex::default(),
            scanned,
        });
        self
    }

    /// The path to open for a key (a key is relative to the work folder, or absolute).
    pub fn fs_path<'k>(&self, key: &'k str) -> Cow<'k, Path> {
        if self.workdir_is_cwd {
            key_path(key)
        } else {
            Cow::Owned(self.workdir.join(key_path(key)))
        }
    }

    /// The content hash of `rel` now (what readers see), or `None` if it does not exist.
    pub fn current(&self, rel: &str) -> io::Result<Option<Hash>> {
        Ok(self.current_art(rel)?.map(|a| a.content))
    }

    /// Identity of `rel` now (a link's text, a folder's tree with its links' texts, else its
    /// content hash), or `None` if absent.
    pub fn identity(&self, rel: &str) -> io::Result<Option<Hash>> {
        let path = self.fs_path(rel);
        match fs::symlink_metadata(&path) {
            Ok(m) if m.file_type().is_symlink() => Ok(Some(link_identity(&fs::read_link(&path)?))),
            Ok(m) => Ok(Some(
                self.hash_art(rel, &path, &m, &mut Vec::new(), None)?.ident,
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Content and identity of `rel` now, or `None` if it does not exist.
    pub fn current_art(&self, rel: &str) -> io::Result<Option<Art>> {
        self.current_art_hinted(rel, None)
    }

    /// `current_art`, told `rel`'s stat-cache entry by a caller that already has it
    /// (`Some(None)`: not in the cache), so the cache is not searched.
    pub fn current_art_hinted(
        &self,
        rel: &str,
        hint: Option<Option<&StatEntry>>,
    ) -> io::Result<Option<Art>> {
        let path = self.fs_path(rel);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        self.hash_art(rel, &path, &meta, &mut Vec::new(), hint)
            .map(Some)
    }

    /// Both hashes of the entry at `path`, `meta` its `lstat`. `walking`: the (device,
    /// inode) of the folders being hashed above this entry, and one entry per link followed,
    /// so that a link back into a folder being walked is caught at once rather than after
    /// 64 levels of hashing everything under it again.
    fn hash_art(
        &self,
        key: &str,
        path: &Path,
        meta: &fs::Metadata,
        walking: &mut Vec<(u64, u64)>,
        hint: Option<Option<&StatEntry>>,
    ) -> io::Result<Art> {
        use std::os::unix::fs::MetadataExt;
        if walking.len() > 64 {
            return Err(io::Error::other(format!(
                "{}: links or directories nest too deeply",
                path.display()
            )));
        }
        let ft = meta.file_type();
        if ft.is_symlink() {
            // One read of the link for both, so they describe the same target.
            let (content, text) = self.hash_symlink(key, path, walking)?;
            return Ok(Art {
                content,
                ident: link_identity(&text),
            });
        }
        if ft.is_dir() {
            let memo = |k: &str| {
                let folders = self.before.as_ref()?.folders.lock().ok()?;
                folders.get(k).copied()
            };
            if let Some(h) = memo(key) {
                return Ok(h);
            }
            let id = (meta.dev(), meta.ino());
            if walking.contains(&id) {
                return Err(io::Error::other(format!(
                    "{} is a folder that holds itself (a symlink on the way leads back up into it)",
                    shown(key)
                )));
            }
            walking.push(id);
            let mut entries: Vec<(std::ffi::OsString, fs::DirEntry)> = fs::read_dir(path)?
                .map(|e| e.map(|e| (e.file_name(), e)))
                .collect::<io::Result<_>>()?;
            entries.sort_by(|a, b| a.0.as_encoded_bytes().cmp(b.0.as_encoded_bytes()));
            // What readers see (links followed) and what was made (links' texts).
            let (mut t, mut ti) = (TreeHasher::new(), TreeHasher::new());
            for (name, e) in entries {
                let child_key = match key {
                    "." => path_key(&name).into_owned(),
                    _ => format!("{key}/{}", path_key(&name)),
                };
                let name = name.as_encoded_bytes();
                // The folder's listing says it is a file (no stat): the scan's hash stands.
                let from_scan = match &self.before {
                    Some(b) if e.file_type()?.is_file() => (b.scanned)(&child_key),
                    _ => None,
                };
                if let Some(h) = from_scan {
                    t.entry(name, KIND_FILE, &h);
                    ti.entry(name, KIND_FILE, &h);
                    continue;
                }
                let p = e.path();
                // An error of the OS names no file: say which one, once (the innermost).
                let named = |e: io::Error| match e.raw_os_error() {
                    Some(_) => io::Error::new(e.kind(), format!("{}: {e}", shown(&child_key))),
                    None => e,
                };
                let m = fs::symlink_metadata(&p).map_err(named)?;
                let kind = if m.file_type().is_symlink() {
                    KIND_LINK
                } else if m.is_dir() {
                    KIND_DIR
                } else {
                    KIND_FILE
                };
                let a = self
                    .hash_art(&child_key, &p, &m, walking, None)
                    .map_err(named)?;
                t.entry(name, kind, &a.content);
                ti.entry(name, kind, &a.ident);
            }
            walking.pop();
            let a = Art {
                content: t.finish(),
                ident: ti.finish(),
            };
            if let Some(Ok(mut folders)) = self.before.as_ref().map(|b| b.folders.lock()) {
                folders.insert(key.to_string(), a);
            }
            return Ok(a);
        }
        if !ft.is_file() {
            // Opening a FIFO would wait for a writer forever (and SIGINT would not end it).
            use std::os::unix::fs::FileTypeExt;
            let what = if ft.is_fifo() {
                "a FIFO (named pipe)"
            } else if ft.is_socket() {
                "a socket"
            } else {
                "a device"
            };
            return Err(io::Error::other(format!(
                "{} is {what}; qbuild hashes files, symlinks and folders",
                shown(key)
            )));
        }
        let st = StatKey::from_meta(meta, KIND_FILE);
        let cached = match hint {
            Some(known) => known,
            None => self.cache.get(key),
        };
        let file = |h: Hash| Art {
            content: h,
            ident: h,
        };
        if let Some(e) = cached {
            if e.trusted(&st) {
                return Ok(file(e.hash));
            }
        }
        let entry = hash_fresh(path, st, self.stats)?;
        if let Ok(mut u) = self.updates.lock() {
            u.push((key.to_string(), entry));
        }
        Ok(file(entry.hash))
    }

    /// The hash of the link at `path` (its text and what it leads to) and its text.
    fn hash_symlink(
        &self,
        key: &str,
        path: &Path,
        walking: &mut Vec<(u64, u64)>,
    ) -> io::Result<(Hash, std::path::PathBuf)> {
        let text = fs::read_link(path)?;
        // An absolute link to a place inside the work folder breaks when the folder moves;
        // one to shared storage outside (model weights, say) does not, and is followed.
        if text.is_absolute() && !key.starts_with('/') && text.starts_with(&self.workdir) {
            return Err(io::Error::other(format!(
                "{} is an absolute symlink (-> {}); links inside the work folder must be relative so the folder can move",
                shown(key),
                text.display()
            )));
        }
        let target = path.parent().unwrap_or(Path::new("/")).join(&text);
        let target_meta = fs::symlink_metadata(&target);
        let target_key = self.target_key(&target, &text, target_meta.as_ref().ok());
        if crate::expand::in_state_folder(&target_key) {
            return Err(io::Error::other(format!(
                "{} is a symlink into qbuild's own state folder (-> {}), which changes on every run",
                shown(key),
                text.display()
            )));
        }
        let th = match target_meta {
            Ok(tm) => {
                walking.push((0, 0));
                let h = self
                    .hash_art(&target_key, &target, &tm, walking, None)?
                    .content;
                walking.pop();
                Some(h)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(io::Error::other(format!(
                    "dangling symlink: {} -> {} (the target does not exist)",
                    shown(key),
                    text.display()
                )))
            }
            Err(e) => return Err(e),
        };
        Ok((hash_link(&text, th.as_ref()), text))
    }

    pub fn take_updates(&self) -> Vec<(String, StatEntry)> {
        self.updates
            .lock()
            .map(|mut u| std::mem::take(&mut *u))
            .unwrap_or_default()
    }

    /// The key of the file the link at key `rel`, whose text is `text`, leads to (see
    /// `target_key`).
    pub fn link_target_key(&self, rel: &str, text: &Path) -> String {
        let path = self.fs_path(rel);
        let target = path.parent().unwrap_or(Path::new("/")).join(text);
        let meta = fs::symlink_metadata(&target).ok();
        self.target_key(&target, text, meta.as_ref())
    }

    /// The key of the file a link's `text` leads to (`target`: the link's folder joined
    /// with the text; `meta`: the target's, if it exists). A `..` is resolved as the kernel
    /// does, from where the folders before it lead (`sub/../d` with `sub` a link goes up
    /// from `sub`'s target), so that a link never shares a key, and so a cached hash, with
    /// another file, and cannot reach `.qbuild/` by leaving the work folder and coming back
    /// in. The key read from the text is kept when it names the target itself (one stat;
    /// the usual case) and does not climb out of the work folder, else the target's folder
    /// is resolved.
    fn target_key(&self, target: &Path, text: &Path, meta: Option<&fs::Metadata>) -> String {
        use std::os::unix::fs::MetadataExt;
        let textual = crate::expand::normalize(&key_for(&self.workdir, target));
        let Some(meta) = meta else {
            return textual;
        };
        if !text
            .components()
            .any(|c| c == std::path::Component::ParentDir)
            || !(textual == ".." || textual.starts_with("../"))
                && fs::symlink_metadata(self.fs_path(&textual))
                    .is_ok_and(|m| (m.dev(), m.ino()) == (meta.dev(), meta.ino()))
        {
            return textual;
        }
        // The folder the target is in, resolved (the target itself may be a link, which is
        // hashed as one); a text ending in `..` names a folder: resolved whole.
        let real = match (target.parent(), target.file_name()) {
            (Some(folder), Some(name)) => folder.canonicalize().map(|f| f.join(name)),
            _ => target.canonicalize(),
        };
        let (Ok(real), Ok(root)) = (real, self.workdir.canonicalize()) else {
            return textual;
        };
        match real.strip_prefix(&root) {
            Ok(rel) => path_key(rel.as_os_str()).into_owned(),
            Err(_) => path_key(real.as_os_str()).into_owned(),
        }
    }
}

/// The cache key of a path: relative to the work folder when inside it, else absolute.
pub fn key_for(workdir: &Path, p: &Path) -> String {
    match p.strip_prefix(workdir) {
        Ok(r) => path_key(r.as_os_str()).into_owned(),
        Err(_) => path_key(p.as_os_str()).into_owned(),
    }
}

/// The key of a name or path: its text when it is UTF-8, as nearly all are; else each byte
/// that is not part of UTF-8 written as a NUL and two hex digits. Keys name folders walked
/// once per run and stat-cache entries, so two names must never share one, as they do in
/// lossy text (`\xfe` and `\xff` both read U+FFFD). No path holds a NUL (a Qairtfile may not
/// either), so such a key is no UTF-8 name's, and UTF-8 names keep the keys they had.
pub fn path_key(name: &OsStr) -> Cow<'_, str> {
    use std::fmt::Write;
    use std::os::unix::ffi::OsStrExt;
    let bytes = name.as_bytes();
    if let Ok(text) = std::str::from_utf8(bytes) {
        return Cow::Borrowed(text);
    }
    let mut key = String::with_capacity(bytes.len() + 8);
    for chunk in bytes.utf8_chunks() {
        key.push_str(chunk.valid());
        for b in chunk.invalid() {
            let _ = write!(key, "\0{b:02x}");
        }
    }
    Cow::Owned(key)
}

/// The path a key names (`path_key` undone).
pub fn key_path(key: &str) -> Cow<'_, Path> {
    use std::os::unix::ffi::OsStrExt;
    if !key.contains('\0') {
        return Cow::Borrowed(Path::new(key));
    }
    let hex = |b: u8| char::from(b).to_digit(16);
    let mut bytes = Vec::with_capacity(key.len());
    let mut rest = key.as_bytes();
    while let Some((&b, tail)) = rest.split_first() {
        if let (0, [h, l, after @ ..]) = (b, tail) {
            if let (Some(h), Some(l)) = (hex(*h), hex(*l)) {
                bytes.push((h * 16 + l) as u8);
                rest = after;
                continue;
            }
        }
        bytes.push(b);
        rest = tail;
    }
    Cow::Owned(PathBuf::from(OsStr::from_bytes(&bytes)))
}

/// A key as an error shows it: the path, not its escapes.
fn shown(key: &str) -> String {
    key_path(key).display().to_string()
}

/// Hash a file now and make a stat entry for it. The timestamp is taken before reading, so
/// any change during or after the read makes the entry untrusted ("racy").
pub fn hash_fresh(path: &Path, st: StatKey, stats: &HashStats) -> io::Result<StatEntry> {
    // A big file changed in this very clock tick would be recorded racy and read again next
    // run; waiting out the tick (a few ms) is cheaper than that second read.
    if st.size >= crate::hash::MMAP_THRESHOLD {
        for _ in 0..25 {
            if coarse_now_ns() > st.changed_by_ns() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    let hashed_at_ns = coarse_now_ns();
    let hash = hash_file(path, st.size, stats)?;
    Ok(StatEntry {
        stat: st,
        hash,
        hashed_at_ns,
    })
}

/// Re-hash entries that were racy when recorded (changed in the clock tick they were hashed
/// in), after the clock has moved on, so the next run can trust them without reading.
pub fn settle_racy(workdir: &Path, entries: &mut [(String, StatEntry)], stats: &HashStats) {
    let racy: Vec<usize> = (0..entries.len())
        .filter(|i| entries[*i].1.stat.changed_by_ns() >= entries[*i].1.hashed_at_ns)
        .collect();
    if racy.is_empty() {
        return;
    }
    // Wait out the clock tick (at most 0.2 s); an entry still racy then (a filesystem that
    // keeps whole seconds) is left for the next run to read again.
    let horizon = coarse_now_ns().saturating_add(200_000_000);
    let latest = racy
        .iter()
        .map(|i| entries[*i].1.stat.changed_by_ns())
        .filter(|t| *t < horizon)
        .max()
        .unwrap_or(0);
    for _ in 0..100 {
        if coarse_now_ns() > latest {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    let now = coarse_now_ns();
    for i in racy {
        if entries[i].1.stat.changed_by_ns() >= now {
            continue;
        }
        let (key, entry) = &mut entries[i];
        let path = workdir.join(key_path(key));
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let st = StatKey::from_meta(&meta, KIND_FILE);
        if let Ok(fresh) = hash_fresh(&path, st, stats) {
            *entry = fresh;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn keys_of_names_that_are_not_utf8_are_distinct_and_lead_back_to_them() {
        use std::os::unix::ffi::OsStrExt;
        let names: [&[u8]; 6] = [
            b"tv/\xfe",
            b"tv/\xff",
            "tv/\u{FFFD}".as_bytes(),
            b"tv/\xff\xfe",
            b"a\xffb/c\xe2\x82",
            "tv/caf\u{e9}".as_bytes(),
        ];
        let keys: Vec<String> = names
            .iter()
            .map(|n| path_key(OsStr::from_bytes(n)).into_owned())
            .collect();
        for (n, k) in names.iter().zip(&keys) {
            assert_eq!(key_path(k).as_os_str().as_bytes(), *n, "{k:?}");
        }
        let distinct: std::collections::BTreeSet<&String> = keys.iter().collect();
        assert_eq!(distinct.len(), names.len(), "{keys:?}");
        // UTF-8 names are their own keys (the keys existing state holds).
        assert_eq!(keys[2], "tv/\u{FFFD}");
        assert_eq!(keys[5], "tv/caf\u{e9}");
        assert!(matches!(
            path_key(OsStr::new("tv/a.raw")),
            Cow::Borrowed("tv/a.raw")
        ));
        assert_eq!(shown(&keys[1]), "tv/\u{FFFD}");
    }

    #[test]
    fn before_a_build_a_folder_is_walked_once_and_scanned_files_are_trusted() {
        let d = tempfile::tempdir().expect("tempdir");
        let w = d.path();
        fs::create_dir_all(w.join("tv")).expect("mkdir");
        fs::write(w.join("tv/a.raw"), "a").expect("write");
        fs::write(w.join("tv/b.raw"), "b").expect("write");
        symlink("tv", w.join("l1")).expect("link");
        symlink("tv", w.join("l2")).expect("link");
        let (cache, stats) = (StatCache::default(), HashStats::default());
        let plain = |rel: &str| {
            Artifacts::new(w, &cache, &stats)
                .current(rel)
                .expect("hash")
                .expect("exists")
        };
        let folder = plain("tv");

        // The scan knew tv/a.raw: its hash is used, not the file's bytes.
        let scanned = |k: &str| (k == "tv/a.raw").then_some([7u8; 32]);
        let arts = Artifacts::new(w, &cache, &stats).before_build(&scanned);
        let via_scan = arts.current("tv").expect("hash").expect("exists");
        assert_ne!(via_scan, folder, "the scan's hash of tv/a.raw was not used");
        // Walked once: a change now is not seen through the second link by this instance,
        // and both links show the same folder.
        fs::write(w.join("tv/c.raw"), "c").expect("write");
        let l1 = arts.current("l1").expect("hash");
        let l2 = arts.current("l2").expect("hash");
        assert_eq!(l1, l2);
        assert_eq!(l1, Some(hash_link(Path::new("tv"), Some(&via_scan))));
        // A plain instance (as after a job ran) sees the folder as it is.
        assert_ne!(plain("tv"), folder);
        assert_ne!(plain("l1"), hash_link(Path::new("tv"), Some(&folder)));
    }
}
