//! The agent's state file: written atomically (temp file, fsync, rename, fsync of the
//! directory) before a change is acknowledged, under an exclusive lock that makes the agent
//! holding it the one owner of the state directory.
//!
//! The file is the truth about the desired state. Next to the state it keeps the ids of the
//! last requests it committed, so a client whose connection broke mid-request can learn
//! whether its change was committed.

use std::{
    collections::VecDeque,
    fs::{self, File, OpenOptions, TryLockError},
    io::{self, Write as _},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::state::State;

const STATE_FILE: &str = "state.json";
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
    #[error(
        "cannot write the state file {file}: {source}; nothing was changed{hint}",
        hint = hint(source)
    )]
    Write {
        file: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another maglb agent owns {0}: stop it first (only one agent may own a state directory)"
    )]
    Locked(PathBuf),
    #[error(
        "state file {file} is unreadable: {why}. It was not replaced with defaults. Restore it from a backup (or a `maglb config export`), or move it away and start the agent with `--start-empty`"
    )]
    Corrupt { file: PathBuf, why: String },
}

fn hint(e: &io::Error) -> &'static str {
    match e.raw_os_error() {
        Some(libc::ENOSPC) | Some(libc::EDQUOT) => " (the disk is full: free space, then retry)",
        Some(libc::EROFS) => " (the file system is read-only)",
        Some(libc::EACCES) | Some(libc::EPERM) => " (no permission)",
        _ => "",
    }
}

impl StoreError {
    /// The disk is full or read-only: the change can be retried once that is fixed.
    pub fn is_storage_full(&self) -> bool {
        matches!(self, StoreError::Write { source, .. }
            if matches!(source.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)))
    }
}

/// What the file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateFile {
    state: State,
    /// Ids of the last requests committed, oldest first.
    #[serde(default)]
    requests: VecDeque<String>,
}

/// The state a state file holds, read without taking the directory's lock (for inspection
/// while an agent runs).
pub fn read_state(file: &Path) -> Result<State, StoreError> {
    let text = fs::read_to_string(file).map_err(|source| StoreError::Io {
        dir: file.parent().unwrap_or(file).to_owned(),
        source,
    })?;
    parse(file, &text).map(|f| f.state)
}

fn parse(file: &Path, text: &str) -> Result<StateFile, StoreError> {
    let corrupt = |why: String| StoreError::Corrupt {
        file: file.to_owned(),
        why,
    };
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| corrupt(e.to_string()))?;
    // The first format was the bare state.
    let f: StateFile = if value.get("state").is_some() {
        serde_json::from_str(text)
    } else {
        serde_json::from_str(text).map(|state| StateFile {
            state,
            requests: VecDeque::new(),
        })
    }
    .map_err(|e| corrupt(e.to_string()))?;
    f.state.validate().map_err(|e| corrupt(e.to_string()))?;
    Ok(f)
}

/// The state directory, locked for as long as this lives.
pub struct Store {
    dir: PathBuf,
    requests: VecDeque<String>,
    _lock: File,
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
            requests: VecDeque::new(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The saved state; `None` on first start. A file that does not parse or validate is an
    /// error that names the file, line and field, never a silent reset.
    pub fn load(&mut self) -> Result<Option<State>, StoreError> {
        let file = self.path();
        let text = match fs::read_to_string(&file) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => {
                return Err(StoreError::Io {
                    dir: self.dir.clone(),
                    source,
                });
            }
        };
        let f = parse(&file, &text)?;
        self.requests = f.requests;
        Ok(Some(f.state))
    }

    /// Whether request `id` was committed (among the last ones).
    pub fn committed(&self, id: &str) -> bool {
        self.requests.iter().any(|r| r == id)
    }

    /// Drops request `id` from the committed ones: its change was rolled back.
    pub fn forget(&mut self, id: &str) {
        self.requests.retain(|r| r != id);
    }

    /// Replaces the state file atomically and durably, recording `request` as committed with
    /// it. On failure nothing changed and no temp file is left.
    pub fn save(&mut self, state: &State, request: Option<&str>) -> Result<(), StoreError> {
        let mut requests = self.requests.clone();
        if let Some(id) = request {
            requests.push_back(id.to_owned());
            while requests.len() > REMEMBERED {
                requests.pop_front();
            }
        }
        let f = StateFile {
            state: state.clone(),
            requests,
        };
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let written = write_durably(&tmp, &self.path(), &f);
        if let Err(source) = written {
            let _ = fs::remove_file(&tmp);
            return Err(StoreError::Write {
                file: self.path(),
                source,
            });
        }
        self.requests = f.requests;
        Ok(())
    }
}

fn write_durably(tmp: &Path, path: &Path, f: &StateFile) -> io::Result<()> {
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .mode(0o600)
        .open(tmp)?;
    let text = serde_json::to_vec_pretty(f).map_err(io::Error::other)?;
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

    #[test]
    fn save_load_and_one_owner() {
        let dir = tmpdir("a");
        let mut store = Store::open(&dir).unwrap();
        assert_eq!(store.load().unwrap(), None);
        let s = State::default()
            .with_vip(Vip::new("10.0.0.1:80/tcp".parse().unwrap()))
            .unwrap();
        store.save(&s, Some("req-1")).unwrap();
        assert!(matches!(Store::open(&dir), Err(StoreError::Locked(_))));
        drop(store);
        let mut store = Store::open(&dir).unwrap();
        assert_eq!(store.load().unwrap(), Some(s));
        assert!(store.committed("req-1") && !store.committed("req-2"));
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
        assert_eq!(store.load().unwrap().unwrap().vips.len(), 1);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_reset() {
        let dir = tmpdir("b");
        let mut store = Store::open(&dir).unwrap();
        fs::write(store.path(), "{\n  \"state\": {\n    \"vip\": 3\n  }\n}").unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("--start-empty"), "{err}");
        fs::write(
            store.path(),
            r#"{"version": 1, "vip": [{"address": "10.0.0.1:80/tcp", "ring_size": 4}]}"#,
        )
        .unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("ring_size"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_write_leaves_no_temp_file_and_the_old_state() {
        let dir = tmpdir("d");
        let mut store = Store::open(&dir).unwrap();
        let s = State::default();
        store.save(&s, None).unwrap();
        // A directory where the temp file would go makes the write fail.
        let tmp = dir.join("state.json.tmp");
        fs::create_dir(&tmp).unwrap();
        let err = store
            .save(&s.with_detach().unwrap_or(s.clone()), Some("x"))
            .unwrap_err();
        assert!(err.to_string().contains("nothing was changed"), "{err}");
        assert!(!store.committed("x"));
        let _ = fs::remove_dir_all(&dir);
    }
}
