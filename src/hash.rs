//! Content hashing of artifacts (files, directories as trees, symlinks) with blake3, and the stat key that lets an unchanged file skip re-reading.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

pub type Hash = [u8; 32];

/// Files at least this big are hashed through mmap with rayon; smaller ones with one read.
pub const MMAP_THRESHOLD: u64 = 1 << 20;

/// Identity of a file's bytes as the kernel reports it; if none of these changed, the
/// content did not either (unless the change was racy, see [`StatEntry::trusted`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct StatKey {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// 0 file, 1 directory, 2 symlink.
    pub kind: u8,
}

impl StatKey {
    /// The latest moment the file's last change may have happened. A timestamp is the
    /// change's time truncated to the filesystem's granularity: a ctime with no sub-second
    /// part almost surely comes from one that keeps whole seconds (ext4 with 128-byte inodes,
    /// ext3, some NFS servers; FAT keeps two), where a write 0.9 s after the stat leaves the
    /// same timestamps. (On a nanosecond filesystem this costs a re-hash once in 10^9 files.)
    pub fn changed_by_ns(&self) -> i64 {
        if self.whole_seconds() {
            self.ctime_ns.saturating_add(2_000_000_000)
        } else {
            self.ctime_ns
        }
    }

    /// Whether the stamp looks like one of a filesystem that keeps whole seconds.
    pub fn whole_seconds(&self) -> bool {
        self.ctime_ns.rem_euclid(1_000_000_000) == 0
    }

    pub fn from_meta(m: &fs::Metadata, kind: u8) -> StatKey {
        StatKey {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.mtime_nsec()),
            ctime_ns: m
                .ctime()
                .saturating_mul(1_000_000_000)
                .saturating_add(m.ctime_nsec()),
            kind,
        }
    }
}

/// One stat-cache record: the stat seen and the hash computed then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatEntry {
    pub stat: StatKey,
    pub hash: Hash,
    /// Coarse wall clock (ns) read *before* the file was read for hashing.
    pub hashed_at_ns: i64,
}

/// The stat cache: path → entry, as one vector sorted by path (a third of the memory of a
/// hash map at 100k files; lookups are a binary search).
#[derive(Debug, Default, Clone, Serialize)]
#[serde(transparent)]
pub struct StatCache {
    entries: Vec<(String, StatEntry)>,
}

impl StatCache {
    /// From entries in any order; for one path, the last entry wins.
    pub fn from_vec(mut entries: Vec<(String, StatEntry)>) -> StatCache {
        if !entries.windows(2).all(|w| w[0].0 < w[1].0) {
            // Stable: equal paths keep their order, so keeping the last keeps the newest.
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            let mut out: Vec<(String, StatEntry)> = Vec::with_capacity(entries.len());
            for e in entries {
                match out.last_mut() {
                    Some(last) if last.0 == e.0 => *last = e,
                    _ => out.push(e),
                }
            }
            entries = out;
        }
        StatCache { entries }
    }

    pub fn get(&self, path: &str) -> Option<&StatEntry> {
        self.position(path).map(|i| &self.entries[i].1)
    }

    /// Where `path` is among `entries()`.
    pub fn position(&self, path: &str) -> Option<usize> {
        self.entries
            .binary_search_by(|(p, _)| p.as_str().cmp(path))
            .ok()
    }

    /// Every (path, entry), in order.
    pub fn entries(&self) -> &[(String, StatEntry)] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drop the entries of `paths`, which are sorted.
    pub fn remove(&mut self, paths: &[String]) {
        if !paths.is_empty() {
            self.entries
                .retain(|(p, _)| paths.binary_search(p).is_err());
        }
    }

    /// Add or replace entries (later ones win).
    pub fn extend(&mut self, new: impl IntoIterator<Item = (String, StatEntry)>) {
        let new = StatCache::from_vec(new.into_iter().collect());
        if new.is_empty() {
            return;
        }
        let old = std::mem::take(&mut self.entries);
        let mut out = Vec::with_capacity(old.len() + new.len());
        let (mut a, mut b) = (
            old.into_iter().peekable(),
            new.entries.into_iter().peekable(),
        );
        loop {
            let take_new = match (a.peek(), b.peek()) {
                (None, None) => break,
                (Some(_), None) => false,
                (None, Some(_)) => true,
                (Some(x), Some(y)) => match x.0.cmp(&y.0) {
                    std::cmp::Ordering::Less => false,
                    std::cmp::Ordering::Greater => true,
                    std::cmp::Ordering::Equal => {
                        a.next();
                        true
                    }
                },
            };
            let next = if take_new { b.next() } else { a.next() };
            out.extend(next);
        }
        self.entries = out;
    }
}

impl<'de> Deserialize<'de> for StatCache {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Vec::<(String, StatEntry)>::deserialize(d).map(StatCache::from_vec)
    }
}

impl StatEntry {
    /// The cached hash stands for `now` iff the stat is unchanged and the file's last change
    /// happened strictly before hashing started. A change in the same clock tick as the
    /// hashing (or, on a filesystem keeping whole seconds, the same second) could leave the
    /// stat unchanged (the "racy git" problem), so such entries are re-hashed.
    pub fn trusted(&self, now: &StatKey) -> bool {
        self.stat.changed_by_ns() < self.hashed_at_ns && self.stat == *now
    }
}

/// The wall clock in nanoseconds (the fine one: a file's timestamp may run ahead of the
/// coarse clock by a tick, never ahead of this one).
pub fn wall_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
}

/// The kernel's coarse clock, the one file timestamps are taken from.
pub fn coarse_now_ns() -> i64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec)
}

/// Counts bytes actually read for hashing (reported as `hashed_bytes`).
#[derive(Debug, Default)]
pub struct HashStats {
    pub bytes: AtomicU64,
}

impl HashStats {
    pub fn add(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
    }
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// Hash a regular file's bytes.
pub fn hash_file(path: &Path, size: u64, stats: &HashStats) -> io::Result<Hash> {
    let mut h = blake3::Hasher::new();
    h.update(b"qbuild-file\0");
    if size >= MMAP_THRESHOLD {
        // Ask the kernel to read the file ahead while the threads hash what has arrived: a
        // cold file is then read as one stream rather than on demand by page faults. Not
        // for a file that would crowd a quarter of the memory out of the page cache.
        // SAFETY: sysconf reads system constants.
        let ram = unsafe {
            (libc::sysconf(libc::_SC_PHYS_PAGES) as u64)
                .saturating_mul(libc::sysconf(libc::_SC_PAGESIZE) as u64)
        };
        if size <= ram / 4 {
            if let Ok(f) = fs::File::open(path) {
                use std::os::fd::AsRawFd;
                // A file read moments ago (a touch, a checkout) is in the page cache already,
                // and the advice would only walk its pages: 8% of a warm rehash of 8 MB files.
                if !looks_cached(&f, size) {
                    // SAFETY: advice on an open descriptor; no memory involved; failure is
                    // harmless.
                    unsafe {
                        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED);
                    }
                }
            }
        }
        h.update_mmap_rayon(path)?;
    } else {
        let mut f = fs::File::open(path)?;
        let mut buf = Vec::with_capacity(size as usize + 1);
        f.read_to_end(&mut buf)?;
        h.update(&buf);
    }
    stats.add(size);
    Ok(*h.finalize().as_bytes())
}

/// Whether a file's first, middle and last pages are all in the page cache (a guess that
/// the rest is too; a wrong guess only costs speed). False when it cannot tell: for a file
/// this process neither owns nor may write, Linux (5.0 on) says every page is cached.
fn looks_cached(f: &fs::File, size: u64) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: geteuid only reads the process's credentials.
    let may_ask = f.metadata().is_ok_and(|m| {
        let me = unsafe { libc::geteuid() };
        me == 0 || m.uid() == me
    });
    if !may_ask {
        return false;
    }
    let Ok(len) = usize::try_from(size) else {
        return false;
    };
    // SAFETY: sysconf reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    if len == 0 || page == 0 {
        return false;
    }
    // SAFETY: a new read-only shared mapping of the open file, never dereferenced: mincore
    // only asks the kernel about its pages, and it is unmapped before returning.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        if at == libc::MAP_FAILED {
            return false;
        }
        let mut resident = 0u8;
        let cached = [0, len / 2, len - 1].iter().all(|off| {
            let start = at
                .cast::<u8>()
                .add(off / page * page)
                .cast::<libc::c_void>();
            libc::mincore(start, 1, &mut resident) == 0 && resident & 1 == 1
        });
        libc::munmap(at, len);
        cached
    }
}

/// What a reader of a symlink sees: what it leads to. Its text is what its maker made
/// (`link_identity`), not what its readers read, so a link re-pointed at the same bytes (a
/// model moved to other storage) reruns none of them, as with make, ninja or Bazel, which
/// all follow links. A dangling link is its text.
pub fn hash_link(text: &Path, target_hash: Option<&Hash>) -> Hash {
    if let Some(t) = target_hash {
        return *t;
    }
    let mut h = blake3::Hasher::new();
    h.update(b"qbuild-link\0");
    h.update(text.as_os_str().as_encoded_bytes());
    h.update(b"\0dangling");
    *h.finalize().as_bytes()
}

/// Builds the hash of a directory from its sorted entries.
pub struct TreeHasher(blake3::Hasher);

impl TreeHasher {
    pub fn new() -> TreeHasher {
        let mut h = blake3::Hasher::new();
        h.update(b"qbuild-tree\0");
        TreeHasher(h)
    }
    pub fn entry(&mut self, name: &[u8], kind: u8, hash: &Hash) {
        self.0.update(&(name.len() as u64).to_le_bytes());
        self.0.update(name);
        self.0.update(&[kind]);
        self.0.update(hash);
    }
    pub fn finish(self) -> Hash {
        *self.0.finalize().as_bytes()
    }
}

impl Default for TreeHasher {
    fn default() -> Self {
        Self::new()
    }
}

pub fn hex(h: &Hash) -> String {
    h.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::print_stderr)] // says why it skipped
    fn a_file_dropped_from_the_page_cache_does_not_look_cached() {
        use std::os::fd::AsRawFd;
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("f");
        let n = 3 << 20;
        fs::write(&p, vec![5u8; n]).expect("write");
        let f = fs::File::open(&p).expect("open");
        f.sync_all().expect("sync");
        // Read just now: every page is in the cache (unless the filesystem reads around it).
        assert_eq!(fs::read(&p).expect("read").len(), n);
        if !looks_cached(&f, n as u64) {
            eprintln!(
                "skipped: {} keeps no page cache for a file read",
                d.path().display()
            );
            return;
        }
        // tmpfs keeps its pages whatever the advice.
        // SAFETY: an all-zero statfs is valid; fstatfs fills it from an open descriptor.
        let on_tmpfs = unsafe {
            let mut info: libc::statfs = std::mem::zeroed();
            libc::fstatfs(f.as_raw_fd(), &mut info) == 0 && info.f_type == libc::TMPFS_MAGIC
        };
        if on_tmpfs {
            eprintln!(
                "skipped: {} is on tmpfs, which drops no page",
                d.path().display()
            );
            return;
        }
        // Clean pages are dropped by DONTNEED (written back above).
        // SAFETY: advice on an open descriptor; no memory involved.
        let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(r, 0);
        assert!(!looks_cached(&f, n as u64));
        assert!(
            !looks_cached(&f, 0),
            "an empty file has no page to ask about"
        );
        // Hashing it still reads the right bytes, with the advice to read ahead.
        let stats = HashStats::default();
        let fresh = hash_file(&p, n as u64, &stats).expect("hash");
        let again = hash_file(&p, n as u64, &stats).expect("hash");
        assert_eq!(fresh, again);
    }

    #[test]
    fn same_bytes_same_hash_either_path() {
        let d = tempfile::tempdir().expect("tempdir");
        let stats = HashStats::default();
        let small = d.path().join("a");
        fs::write(&small, b"hello").expect("write");
        let a = hash_file(&small, 5, &stats).expect("hash");
        // The mmap path must agree with the read path on the same bytes.
        let big = d.path().join("b");
        let data = vec![7u8; (MMAP_THRESHOLD + 3) as usize];
        fs::write(&big, &data).expect("write");
        let b1 = hash_file(&big, data.len() as u64, &stats).expect("hash");
        let mut h = blake3::Hasher::new();
        h.update(b"qbuild-file\0");
        h.update(&data);
        assert_eq!(b1, *h.finalize().as_bytes());
        assert_ne!(a, b1);
        assert_eq!(stats.bytes(), 5 + data.len() as u64);
    }

    #[test]
    fn racy_entries_are_not_trusted() {
        let st = StatKey {
            ctime_ns: 100,
            ..Default::default()
        };
        let e = StatEntry {
            stat: st,
            hash: [0; 32],
            hashed_at_ns: 100,
        };
        assert!(!e.trusted(&st));
        let e = StatEntry {
            hashed_at_ns: 101,
            ..e
        };
        assert!(e.trusted(&st));
        assert!(!e.trusted(&StatKey { size: 1, ..st }));
    }

    /// On a filesystem that keeps whole seconds, a file changed at 10.9 s shows ctime 10 s:
    /// hashing it at 10.5 s saw the old bytes with the same stat, so that entry must not be
    /// trusted; one hashed 2 s after the stamped second may be.
    #[test]
    fn whole_second_timestamps_stay_racy_for_their_second() {
        const S: i64 = 1_000_000_000;
        let st = StatKey {
            ctime_ns: 10 * S,
            ..Default::default()
        };
        let at = |hashed_at_ns| StatEntry {
            stat: st,
            hash: [0; 32],
            hashed_at_ns,
        };
        assert!(!at(10 * S + S / 2).trusted(&st));
        assert!(!at(11 * S + S / 2).trusted(&st));
        assert!(at(12 * S + 1).trusted(&st));
        // Nanosecond stamps keep the tick rule.
        let fine = StatKey {
            ctime_ns: 10 * S + 7,
            ..st
        };
        let e = StatEntry {
            stat: fine,
            ..at(10 * S + 8)
        };
        assert!(e.trusted(&fine));
    }

    #[test]
    fn stat_cache_keeps_the_newest_entry_per_path_in_order() {
        let e = |n: i64| StatEntry {
            stat: StatKey::default(),
            hash: [n as u8; 32],
            hashed_at_ns: n,
        };
        let p = |s: &str| s.to_string();
        let mut c = StatCache::from_vec(vec![(p("b"), e(1)), (p("a"), e(2)), (p("b"), e(3))]);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get("b").map(|x| x.hashed_at_ns), Some(3));
        assert_eq!(c.get("a").map(|x| x.hashed_at_ns), Some(2));
        assert!(c.get("c").is_none());
        c.extend(vec![(p("c"), e(4)), (p("a"), e(5)), (p("a"), e(6))]);
        let got: Vec<(String, i64)> = ["a", "b", "c"]
            .iter()
            .map(|k| (k.to_string(), c.get(k).map_or(0, |x| x.hashed_at_ns)))
            .collect();
        assert_eq!(got, vec![(p("a"), 6), (p("b"), 3), (p("c"), 4)]);
        // It encodes as a plain sequence and decodes (unsorted input included) to the same.
        let back: StatCache = crate::db::decode(&crate::db::encode(&c)).expect("decodes");
        assert_eq!(back.len(), 3);
        assert_eq!(back.get("c").map(|x| x.hashed_at_ns), Some(4));
        c.remove(&[p("a"), p("c"), p("d")]);
        let left: Vec<&str> = c.entries().iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(left, ["b"]);
    }
}
