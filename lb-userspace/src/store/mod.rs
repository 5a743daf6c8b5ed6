//! The agent's durable state: a snapshot file and a journal, in a directory one agent owns
//! (an exclusive lock).
//!
//! Every change is a journal record made durable before it is acknowledged (one
//! `fdatasync` of a preallocated file, see [`journal`]). From time to time (when the journal
//! fills, and at start) the whole state is written as a snapshot, atomically: temp file,
//! fsync, rename, fsync of the directory. Loading reads the snapshot and replays the records
//! after it, so the truth is always the last acknowledged change.
//!
//! Next to the desired state, the store keeps which backends the probes found down (a
//! restarted agent sends no new flows to them) and the ids of the last requests committed
//! (a client whose connection broke mid-request can learn whether its change was committed).

mod journal;
mod locate;

use std::{
    collections::{BTreeSet, VecDeque},
    fs::{self, File, OpenOptions, TryLockError},
    io::{self, Write as _},
    net::IpAddr,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use self::journal::Journal;
use crate::state::{Change, State, VipId, down_after};

const STATE_FILE: &str = "state.json";
const JOURNAL_FILE: &str = "journal";
const LOCK_FILE: &str = "lock";
/// Request ids remembered.
const REMEMBERED: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {dir}")]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The change was not made: the message says why and what to do. (The io error is in
    /// the message, not a source, so that it is said once.)
    #[error("cannot write {file}: {io}{hint}; nothing was changed", hint = hint(io))]
    Write { file: PathBuf, io: io::Error },
    #[error(
        "another maglb agent owns {0}: stop it first (only one agent may own a state directory)"
    )]
    Locked(PathBuf),
    #[error(
        "state file {file} is unreadable: {why}. The agent did not start and changed nothing: the pinned datapath keeps forwarding what it carried. Ways out: fix the file there; or restore it from a backup (the state directory is the truth: copy a saved state.json back, or move the broken files aside and start with `--initial-config FILE` from a `maglb config export`); or start once with `maglb agent --start-empty`, which moves the state aside (to *.unreadable) and starts with no VIPs, so the datapath forwards nothing until `maglb apply -f FILE`"
    )]
    Corrupt { file: PathBuf, why: String },
}

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => " (the disk is full: free space, then retry)",
        Some(libc::EROFS) => {
            " (the file system is read-only: see the kernel log, repair it, then retry)"
        }
        Some(libc::EACCES) | Some(libc::EPERM) => " (no permission)",
        _ => "",
    }
}

impl StoreError {
    /// The disk is full: the change can be retried once that is fixed.
    pub fn is_storage_full(&self) -> bool {
        matches!(self, StoreError::Write { io, .. }
            if matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }

    /// The state directory cannot take the change (its disk is full or read-only): nothing
    /// changed, and the change can be retried once that is fixed.
    pub fn is_unwritable(&self) -> bool {
        self.is_storage_full()
            || matches!(self, StoreError::Write { io, .. }
                if io.raw_os_error() == Some(libc::EROFS))
    }
}

pub use crate::state::BackendKey;

/// What is kept.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Persisted {
    pub state: State,
    /// Backends whose probes last said down.
    pub down: BTreeSet<BackendKey>,
}

/// One journal record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Entry {
    /// A change as the API asked for it.
    Change(Change),
    /// The whole state (a restore after the datapath refused a change).
    Replace(State),
    /// A backend's probes changed their verdict.
    Health {
        vip: VipId,
        backend: IpAddr,
        up: bool,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Record {
    /// The request this record commits, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    request: Option<String>,
    /// A request that is no longer committed (its change was rolled back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    forget: Option<String>,
    entry: Entry,
}

/// The snapshot file.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Snapshot {
    /// The sequence number of the last journal record it includes.
    #[serde(default)]
    seq: u64,
    state: State,
    #[serde(default)]
    down: BTreeSet<BackendKey>,
    #[serde(default)]
    requests: VecDeque<String>,
}

impl Snapshot {
    fn apply(&mut self, rec: Record) -> Result<(), String> {
        match rec.entry {
            Entry::Change(c) => {
                let new = c.apply_to(&self.state).map_err(|e| e.to_string())?;
                self.down = down_after(&self.state, &new, &self.down);
                self.state = new;
            }
            Entry::Replace(s) => {
                self.down = down_after(&self.state, &s, &self.down);
                self.state = s;
            }
            Entry::Health { vip, backend, up } => {
                if up {
                    self.down.remove(&(vip, backend));
                } else {
                    self.down.insert((vip, backend));
                    self.down = down_after(&self.state, &self.state, &self.down);
                }
            }
        }
        if let Some(f) = rec.forget {
            self.requests.retain(|r| *r != f);
        }
        if let Some(id) = rec.request {
            self.requests.push_back(id);
            while self.requests.len() > REMEMBERED {
                self.requests.pop_front();
            }
        }
        self.seq += 1;
        Ok(())
    }
}

/// The state directory, locked for as long as this lives.
pub struct Store {
    dir: PathBuf,
    /// The state as of the last record (what a restart would load).
    now: Snapshot,
    journal: Option<Journal>,
    _lock: File,
}

/// Reads the snapshot, or the first format (a bare state), or nothing on first start.
fn read_snapshot(file: &Path) -> Result<Option<Snapshot>, StoreError> {
    let text = match fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(StoreError::Io {
                dir: file.parent().unwrap_or(file).to_owned(),
                source,
            });
        }
    };
    let corrupt = |why: String| StoreError::Corrupt {
        file: file.to_owned(),
        why,
    };
    // Where serde_json stopped: the line, and the field there.
    let syntax = |e: serde_json::Error| {
        let msg = e.to_string();
        let msg = msg.rfind(" at line ").map_or(&msg[..], |at| &msg[..at]);
        let field = locate::field_at(&text, e.line(), e.column());
        let field = if field.is_empty() {
            String::new()
        } else {
            format!(", field {field}")
        };
        corrupt(format!("line {}{field}: {msg}", e.line()))
    };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(syntax)?;
    let wrapped = value.get("state").is_some();
    let snap: Snapshot = if wrapped {
        serde_json::from_str(&text)
    } else {
        serde_json::from_str(&text).map(|state| Snapshot {
            state,
            ..Snapshot::default()
        })
    }
    .map_err(syntax)?;
    snap.state.validate().map_err(|e| {
        let e = e.to_string();
        let root = if wrapped { "state" } else { "" };
        corrupt(match locate::locate(&text, root, &e) {
            Some((line, field)) => format!("line {line}, field {field}: {e}"),
            None => e,
        })
    })?;
    Ok(Some(snap))
}

/// The snapshot with the journal's records after it applied; `None` on first start.
fn replay(dir: &Path) -> Result<(Option<Snapshot>, Journal), StoreError> {
    let snap = read_snapshot(&dir.join(STATE_FILE))?;
    let first = snap.as_ref().map_or(0, |s| s.seq) + 1;
    let jpath = dir.join(JOURNAL_FILE);
    let (journal, records) = Journal::open(&jpath, first).map_err(|source| StoreError::Io {
        dir: dir.to_owned(),
        source,
    })?;
    Ok((fold(snap, records, &jpath, first)?, journal))
}

/// `snap` with the journal's `records` (numbered from `first`) applied.
fn fold(
    snap: Option<Snapshot>,
    records: Vec<Vec<u8>>,
    jpath: &Path,
    first: u64,
) -> Result<Option<Snapshot>, StoreError> {
    if records.is_empty() {
        return Ok(snap);
    }
    let mut s = snap.unwrap_or_default();
    for (i, payload) in records.into_iter().enumerate() {
        let corrupt = |why: String| StoreError::Corrupt {
            file: jpath.to_owned(),
            why: format!("record {}: {why}", first + i as u64),
        };
        let rec: Record = serde_json::from_slice(&payload).map_err(|e| {
            let field = locate::field_at(&String::from_utf8_lossy(&payload), e.line(), e.column());
            corrupt(format!("field {field}: {e}"))
        })?;
        s.apply(rec).map_err(corrupt)?;
    }
    Ok(Some(s))
}

/// The state a state directory holds (snapshot and journal), read without taking its lock
/// and without writing (the directory may be read-only), for inspection while an agent
/// runs.
pub fn read_state(dir: &Path) -> Result<State, StoreError> {
    Ok(read_persisted(dir)?.state)
}

/// What a state directory holds, state and down backends, read as [`read_state`] reads.
pub fn read_persisted(dir: &Path) -> Result<Persisted, StoreError> {
    let snap = read_snapshot(&dir.join(STATE_FILE))?;
    let first = snap.as_ref().map_or(0, |s| s.seq) + 1;
    let jpath = dir.join(JOURNAL_FILE);
    let records = Journal::read(&jpath, first).map_err(|source| StoreError::Io {
        dir: dir.to_owned(),
        source,
    })?;
    let s = fold(snap, records, &jpath, first)?.unwrap_or_default();
    Ok(Persisted {
        state: s.state,
        down: s.down,
    })
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let io_err = |source| StoreError::Io {
            dir: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(io_err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(dir.join(LOCK_FILE))
            .map_err(io_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(StoreError::Locked(dir.to_owned())),
            Err(TryLockError::Error(e)) => return Err(io_err(e)),
        }
        // A temp file left by a crash mid-write is not the state: the rename never happened.
        let _ = fs::remove_file(dir.join(format!("{STATE_FILE}.tmp")));
        Ok(Self {
            dir: dir.to_owned(),
            now: Snapshot::default(),
            journal: None,
            _lock: lock,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The files that hold the state: the snapshot and the journal.
    pub fn files(&self) -> [PathBuf; 2] {
        [self.dir.join(STATE_FILE), self.dir.join(JOURNAL_FILE)]
    }

    /// What the directory holds; `None` on first start. A file that does not parse or
    /// validate is an error that names it, never a silent reset. The journal is folded into
    /// a new snapshot.
    pub fn load(&mut self) -> Result<Option<Persisted>, StoreError> {
        let (snap, journal) = replay(&self.dir)?;
        self.journal = Some(journal);
        let Some(snap) = snap else {
            return Ok(None);
        };
        self.now = snap;
        self.snapshot()?;
        Ok(Some(Persisted {
            state: self.now.state.clone(),
            down: self.now.down.clone(),
        }))
    }

    /// Whether request `id` was committed (among the last ones).
    pub fn committed(&self, id: &str) -> bool {
        self.now.requests.iter().any(|r| r == id)
    }

    /// Makes `entry` durable (with the request it commits, or the one it takes back). On
    /// failure nothing changed.
    pub fn commit(
        &mut self,
        entry: Entry,
        request: Option<&str>,
        forget: Option<&str>,
    ) -> Result<(), StoreError> {
        let rec = Record {
            request: request.map(str::to_owned),
            forget: forget.map(str::to_owned),
            entry,
        };
        let mut next = self.now.clone();
        next.apply(rec.clone()).map_err(|why| StoreError::Corrupt {
            file: self.dir.join(JOURNAL_FILE),
            why,
        })?;
        let payload = serde_json::to_vec(&rec).expect("records serialize");
        let journal = self.journal_mut()?;
        if journal.fits(payload.len()) {
            journal
                .append(next.seq, &payload)
                .map_err(|io| StoreError::Write {
                    file: self.dir.join(JOURNAL_FILE),
                    io,
                })?;
            self.now = next;
            return Ok(());
        }
        // The journal is full (or the record is larger than it): a snapshot takes the
        // state as of this record, and the journal starts again.
        let old = std::mem::replace(&mut self.now, next);
        if let Err(e) = self.snapshot() {
            self.now = old;
            return Err(e);
        }
        Ok(())
    }

    fn journal_mut(&mut self) -> Result<&mut Journal, StoreError> {
        if self.journal.is_none() {
            let (snap, journal) = replay(&self.dir)?;
            self.now = snap.unwrap_or_default();
            self.journal = Some(journal);
        }
        Ok(self.journal.as_mut().expect("opened"))
    }

    /// Writes the whole state as the snapshot, atomically and durably, and restarts the
    /// journal after it. On failure no temp file is left.
    fn snapshot(&mut self) -> Result<(), StoreError> {
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        if let Err(io) = write_durably(&tmp, &self.path(), &self.now) {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Write {
                file: self.path(),
                io,
            });
        }
        if let Some(j) = self.journal.as_mut() {
            j.restart();
        }
        Ok(())
    }

    /// Replaces everything with `p` (first start from an initial config): a snapshot.
    pub fn reset(&mut self, p: &Persisted) -> Result<(), StoreError> {
        self.journal_mut()?;
        let seq = self.now.seq + 1;
        let old = std::mem::replace(
            &mut self.now,
            Snapshot {
                seq,
                state: p.state.clone(),
                down: p.down.clone(),
                requests: VecDeque::new(),
            },
        );
        self.snapshot().inspect_err(|_| self.now = old)
    }
}

fn write_durably(tmp: &Path, path: &Path, s: &Snapshot) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(tmp)?;
    let text = serde_json::to_vec_pretty(s).map_err(io::Error::other)?;
    file.write_all(&text)?;
    file.sync_data()?;
    drop(file);
    fs::rename(tmp, path)?;
    File::open(path.parent().unwrap_or(Path::new("/")))?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Vip;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("maglb-store-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn add(vip: &str) -> Entry {
        Entry::Change(Change::AddVip(Vip::new(vip.parse().unwrap())))
    }

    #[test]
    fn changes_survive_a_restart_and_one_owner_at_a_time() {
        let dir = tmpdir("a");
        let mut store = Store::open(&dir).unwrap();
        assert_eq!(store.load().unwrap(), None);
        store
            .commit(add("10.0.0.1:80/tcp"), Some("req-1"), None)
            .unwrap();
        store
            .commit(add("10.0.0.2:80/tcp"), Some("req-2"), None)
            .unwrap();
        let key = (
            "10.0.0.1:80/tcp".parse().unwrap(),
            "10.1.0.1".parse().unwrap(),
        );
        store
            .commit(
                Entry::Change(Change::AddBackend {
                    vip: key.0,
                    backend: crate::state::BackendEntry::new(key.1, 1),
                }),
                None,
                None,
            )
            .unwrap();
        store
            .commit(
                Entry::Health {
                    vip: key.0,
                    backend: key.1,
                    up: false,
                },
                None,
                None,
            )
            .unwrap();
        assert!(matches!(Store::open(&dir), Err(StoreError::Locked(_))));
        assert_eq!(read_state(&dir).unwrap().vips.len(), 2);
        drop(store);
        let mut store = Store::open(&dir).unwrap();
        let p = store.load().unwrap().unwrap();
        assert_eq!(p.state.vips.len(), 2);
        assert_eq!(p.down, BTreeSet::from([key]));
        assert!(store.committed("req-1") && store.committed("req-2") && !store.committed("x"));
        // A rolled-back change takes its request id back.
        store
            .commit(Entry::Replace(State::default()), None, Some("req-2"))
            .unwrap();
        drop(store);
        let mut store = Store::open(&dir).unwrap();
        assert_eq!(store.load().unwrap().unwrap().state, State::default());
        assert!(!store.committed("req-2"));
        let _ = fs::remove_dir_all(&dir);
    }

    /// The journal's replay holds the same backends down as the writer did: those added
    /// with `initial = "down"`, and none that left.
    #[test]
    fn replayed_changes_keep_the_down_set_as_the_writer_has_it() {
        use crate::state::{BackendEntry, HealthCheck, Initial};
        let dir = tmpdir("h");
        let mut store = Store::open(&dir).unwrap();
        store.load().unwrap();
        let vip: VipId = "10.0.0.1:80/tcp".parse().unwrap();
        let (b1, b2): (IpAddr, IpAddr) = ("10.1.0.1".parse().unwrap(), "10.1.0.2".parse().unwrap());
        let mut v = Vip::new(vip);
        v.backends.push(BackendEntry::new(b1, 1));
        store
            .commit(Entry::Change(Change::AddVip(v)), None, None)
            .unwrap();
        let check = HealthCheck {
            initial: Initial::Down,
            ..HealthCheck::default()
        };
        let changes = [
            Change::SetHealth {
                vip,
                backend: None,
                health: Some(check),
            },
            Change::AddBackend {
                vip,
                backend: BackendEntry::new(b2, 1),
            },
        ];
        let mut state = State::default();
        let mut down = BTreeSet::new();
        state = Change::AddVip(store.now.state.vips[0].clone())
            .apply_to(&state)
            .unwrap();
        for c in changes {
            let next = c.apply_to(&state).unwrap();
            down = down_after(&state, &next, &down);
            state = next;
            store.commit(Entry::Change(c), None, None).unwrap();
        }
        // b1 was there before the check said `initial = "down"`; b2 was added after.
        assert_eq!(down, BTreeSet::from([(vip, b2)]));
        drop(store);
        let mut store = Store::open(&dir).unwrap();
        assert_eq!(store.load().unwrap().unwrap().down, down);
        store
            .commit(
                Entry::Change(Change::DelBackend { vip, address: b2 }),
                None,
                None,
            )
            .unwrap();
        drop(store);
        let mut store = Store::open(&dir).unwrap();
        assert!(store.load().unwrap().unwrap().down.is_empty());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_journal_becomes_a_snapshot() {
        let dir = tmpdir("f");
        let mut store = Store::open(&dir).unwrap();
        store.load().unwrap();
        // Records of about 1 MB each: the 16 MB journal fills and starts again.
        let mut s = State::default();
        for v in 0..20u32 {
            let mut vip = Vip::new(format!("10.0.{v}.1:80/tcp").parse().unwrap());
            for b in 0..3000u32 {
                vip.backends.push(crate::state::BackendEntry::new(
                    std::net::Ipv4Addr::new(10, 64 + (b >> 8) as u8, b as u8, v as u8).into(),
                    1,
                ));
            }
            s.vips.push(vip);
            store
                .commit(Entry::Change(Change::Apply(s.clone())), None, None)
                .unwrap();
        }
        drop(store);
        assert_eq!(read_state(&dir).unwrap().vips.len(), 20);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_first_format_still_loads() {
        let dir = tmpdir("c");
        let mut store = Store::open(&dir).unwrap();
        fs::write(
            store.path(),
            r#"{"version": 1, "vip": [{"address": "10.0.0.1:80/tcp"}]}"#,
        )
        .unwrap();
        assert_eq!(store.load().unwrap().unwrap().state.vips.len(), 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_reset() {
        let dir = tmpdir("b");
        let mut store = Store::open(&dir).unwrap();
        fs::write(store.path(), "{\n  \"state\": {\n    \"vip\": 3\n  }\n}").unwrap();
        let err = store.load().unwrap_err().to_string();
        // The file, the line and the field, and the ways out.
        assert!(err.contains(&store.path().display().to_string()), "{err}");
        assert!(
            err.contains("line 3, field state.vip: invalid type"),
            "{err}"
        );
        assert!(
            err.contains("--start-empty") && err.contains("backup"),
            "{err}"
        );
        fs::write(
            store.path(),
            "{\"version\": 1,\n \"vip\": [{\"address\": \"10.0.0.1:80/tcp\",\n  \"ring_size\": 4}]}",
        )
        .unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("line 3, field vip[0].ring_size: vip[0]"),
            "{err}"
        );
        fs::write(
            store.path(),
            "{\"state\": {\"vip\": [{\"address\": \"10.0.0.1:80/tcp\",\n \"rings\": 4}]}}",
        )
        .unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(
            err.contains("line 2, field state.vip[0].rings: unknown field `rings`"),
            "{err}"
        );
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_snapshot_leaves_no_temp_file_and_the_old_state() {
        let dir = tmpdir("d");
        let mut store = Store::open(&dir).unwrap();
        store.load().unwrap();
        store.commit(add("10.0.0.1:80/tcp"), None, None).unwrap();
        // A directory where the temp file would go makes the snapshot fail.
        fs::create_dir(dir.join("state.json.tmp")).unwrap();
        let p = Persisted::default();
        let err = store.reset(&p).unwrap_err();
        assert!(err.to_string().contains("nothing was changed"), "{err}");
        fs::remove_dir(dir.join("state.json.tmp")).unwrap();
        drop(store);
        assert_eq!(read_state(&dir).unwrap().vips.len(), 1);
        let _ = fs::remove_dir_all(&dir);
    }
}
