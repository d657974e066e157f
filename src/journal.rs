//! The journal: an append-only file in front of the snapshot, one checksummed record per finished job (or per batch of refreshed stat entries), so a `kill -9` loses at most the job that was finishing without an fsync per job.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::db::{decode, encode, JobRecord};
use crate::hash::{Hash, StatEntry};

const MAGIC: &[u8; 8] = b"QBJRNL01";
/// Set in a record's length for an entry of stat entries alone; a job's record has it
/// clear (as every record had before such entries existed, so older journals read as is).
const STATS_ONLY: u32 = 1 << 31;

/// One journal entry: a finished job and its outputs' stat entries, or stat entries alone
/// (files whose times changed but whose bytes did not, as after a `touch`).
#[derive(Debug)]
pub struct Entry {
    pub job: Option<JobEntry>,
    pub stats: Vec<(String, StatEntry)>,
}

/// A finished job: its database id, its record, and its readable key (encoded).
#[derive(Debug)]
pub struct JobEntry {
    pub id: Hash,
    pub record: JobRecord,
    pub explain: Vec<u8>,
}

/// A job's record as stored.
#[derive(Serialize, Deserialize)]
struct JobPayload {
    id: Hash,
    record: JobRecord,
    explain: Vec<u8>,
    stats: Vec<(String, StatEntry)>,
}

pub struct Journal {
    path: PathBuf,
    file: Mutex<Option<File>>,
}

/// Fill `buf` from `r` (std's `read_exact`); `false` when the data ends first (a torn tail).
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<bool> {
    match r.read_exact(buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

fn checksum(payload: &[u8]) -> [u8; 8] {
    let h = blake3::hash(payload);
    let mut c = [0u8; 8];
    c.copy_from_slice(&h.as_bytes()[..8]);
    c
}

impl Journal {
    pub fn new(path: &Path) -> Journal {
        Journal {
            path: path.to_path_buf(),
            file: Mutex::new(None),
        }
    }

    /// Append one entry with a single `write`: `[len u32][checksum 8][payload]`. The bytes
    /// are in the kernel when this returns, so they survive qbuild being killed.
    pub fn append(&self, e: Entry) -> io::Result<()> {
        let (payload, flag) = match e.job {
            Some(j) => (
                encode(&JobPayload {
                    id: j.id,
                    record: j.record,
                    explain: j.explain,
                    stats: e.stats,
                }),
                0,
            ),
            None => (encode(&e.stats), STATS_ONLY),
        };
        let len = u32::try_from(payload.len())
            .ok()
            .filter(|&l| l < STATS_ONLY)
            .ok_or_else(|| io::Error::other("journal entry too large"))?;
        let mut rec = Vec::with_capacity(payload.len() + 12);
        rec.extend_from_slice(&(len | flag).to_le_bytes());
        rec.extend_from_slice(&checksum(&payload));
        rec.extend_from_slice(&payload);
        let mut guard = self
            .file
            .lock()
            .map_err(|_| io::Error::other("journal lock poisoned"))?;
        if guard.is_none() {
            let mut f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)?;
            // Replay stops at the first torn or garbled record, so a record appended after
            // one would be lost: cut such a tail (a crash's, or a full disk's) first.
            let (len, intact) = self.scan(|_| ())?;
            if intact < len {
                f.set_len(intact)?;
            }
            if intact == 0 {
                f.write_all(MAGIC)?;
            }
            *guard = Some(f);
        }
        let Some(f) = guard.as_mut() else {
            return Err(io::Error::other("journal not open"));
        };
        // Only this run appends (it holds the lock): the length now is where the record goes.
        let before = f.metadata()?.len();
        let wrote = f.write_all(&rec);
        if wrote.is_err() {
            // A short write (the disk filled up) leaves a torn record: cut it, so that the
            // next record, once there is room, is not appended after it.
            let _ = f.set_len(before);
        }
        wrote
    }

    /// Every intact entry, in order, and the file's length (see `for_each`).
    #[cfg(test)]
    pub fn read(&self) -> io::Result<(Vec<Entry>, u64)> {
        let mut out = Vec::new();
        let len = self.for_each(|e| out.push(e))?;
        Ok((out, len))
    }

    /// Hand every intact entry to `f`, in order, streaming (one record in memory at a time:
    /// a full build's journal holds a record per job), and return the file's length.
    /// Reading stops at the first torn or garbled record (the tail a crash may leave); what
    /// follows it is ignored.
    pub fn for_each(&self, f: impl FnMut(Entry)) -> io::Result<u64> {
        self.scan(f).map(|(len, _)| len)
    }

    /// `for_each`, returning the file's length and the length of its intact part (the
    /// magic and every record before the first torn or garbled one; 0 without the magic).
    fn scan(&self, mut f: impl FnMut(Entry)) -> io::Result<(u64, u64)> {
        let file = match File::open(&self.path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, 0)),
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        let mut r = io::BufReader::with_capacity(1 << 16, file);
        let mut magic = [0u8; 8];
        if !fill(&mut r, &mut magic)? || &magic != MAGIC {
            return Ok((len, 0));
        }
        let mut intact = MAGIC.len() as u64;
        let mut payload = Vec::new();
        loop {
            let mut head = [0u8; 12];
            if !fill(&mut r, &mut head)? {
                break;
            }
            let mut word = [0u8; 4];
            word.copy_from_slice(&head[..4]);
            let word = u32::from_le_bytes(word);
            let stats_only = word & STATS_ONLY != 0;
            let n = (word & !STATS_ONLY) as usize;
            // A garbled length never asks for more than the file holds.
            if n as u64 > len {
                break;
            }
            payload.resize(n, 0);
            if !fill(&mut r, &mut payload)? || head[4..12] != checksum(&payload) {
                break;
            }
            let entry = if stats_only {
                decode(&payload).map(|stats| Entry { job: None, stats })
            } else {
                decode::<JobPayload>(&payload).map(|p| Entry {
                    job: Some(JobEntry {
                        id: p.id,
                        record: p.record,
                        explain: p.explain,
                    }),
                    stats: p.stats,
                })
            };
            match entry {
                Some(e) => f(e),
                None => break,
            }
            intact += 12 + n as u64;
        }
        Ok((len, intact))
    }

    /// Empty the journal (after its entries are safely in the snapshot).
    pub fn clear(&self) -> io::Result<()> {
        let mut guard = self
            .file
            .lock()
            .map_err(|_| io::Error::other("journal lock poisoned"))?;
        *guard = None;
        match fs::remove_file(&self.path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: u8) -> Entry {
        Entry {
            job: Some(JobEntry {
                id: [n; 32],
                record: JobRecord {
                    key: [n; 32],
                    outputs: vec![[n; 32]],
                    duration_ms: n as u64,
                },
                explain: vec![n],
            }),
            stats: Vec::new(),
        }
    }

    fn durations(j: &Journal) -> Vec<u8> {
        j.read()
            .expect("read")
            .0
            .iter()
            .filter_map(|e| e.job.as_ref().map(|j| j.record.duration_ms as u8))
            .collect()
    }

    #[test]
    fn a_torn_tail_is_ignored() {
        let d = tempfile::tempdir().expect("tempdir");
        let j = Journal::new(&d.path().join("journal"));
        for n in 1..=3 {
            j.append(entry(n)).expect("append");
        }
        let len = fs::metadata(d.path().join("journal")).expect("meta").len();
        // Cut into the last record: the first two survive, the third is ignored.
        let f = OpenOptions::new()
            .write(true)
            .open(d.path().join("journal"))
            .expect("open");
        f.set_len(len - 3).expect("truncate");
        assert_eq!(durations(&j), vec![1, 2]);
        // The next run appends after the intact part: its record is not lost behind the
        // torn one (as after a crash, or a write the full disk cut short).
        let next = Journal::new(&d.path().join("journal"));
        next.append(entry(4)).expect("append");
        assert_eq!(durations(&next), vec![1, 2, 4]);
        // A file that is not a journal at all is replaced, not appended to.
        fs::write(d.path().join("journal"), b"garbage").expect("write");
        let next = Journal::new(&d.path().join("journal"));
        next.append(entry(5)).expect("append");
        assert_eq!(durations(&next), vec![5]);
    }

    #[test]
    fn a_garbled_record_stops_the_replay() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("journal");
        let j = Journal::new(&p);
        j.append(entry(1)).expect("append");
        j.append(entry(2)).expect("append");
        let mut bytes = fs::read(&p).expect("read");
        let last = bytes.len() - 1;
        bytes[last] ^= 0xff;
        fs::write(&p, bytes).expect("write");
        assert_eq!(j.read().expect("read").0.len(), 1);
    }

    #[test]
    fn stat_only_entries_mix_with_job_entries() {
        let d = tempfile::tempdir().expect("tempdir");
        let j = Journal::new(&d.path().join("journal"));
        j.append(entry(1)).expect("append");
        let stat = StatEntry {
            stat: crate::hash::StatKey::default(),
            hash: [7; 32],
            hashed_at_ns: 5,
        };
        j.append(Entry {
            job: None,
            stats: vec![("a/b".into(), stat)],
        })
        .expect("append");
        j.append(entry(2)).expect("append");
        let got = j.read().expect("read").0;
        assert_eq!(got.len(), 3);
        assert!(got[1].job.is_none());
        assert_eq!(got[1].stats, vec![("a/b".to_string(), stat)]);
        assert_eq!(durations(&j), vec![1, 2]);
    }
}
