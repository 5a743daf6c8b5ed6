//! The agent's state file: written atomically (temp file, fsync, rename, fsync of the
//! directory) before a change is acknowledged, under an exclusive lock that makes the agent
//! holding it the one owner of the state directory.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::{fd::AsRawFd, unix::fs::OpenOptionsExt},
    path::{Path, PathBuf},
};

use crate::state::State;

const STATE_FILE: &str = "state.json";
const LOCK_FILE: &str = "lock";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state directory {dir}")]
    Io {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "another maglb agent owns {0}: stop it first (only one agent may own a state directory)"
    )]
    Locked(PathBuf),
    #[error(
        "state file {file} is unreadable: {why}. It was not replaced with defaults; fix or move it away, then start the agent again"
    )]
    Corrupt { file: PathBuf, why: String },
}

/// The state directory, locked for as long as this lives.
pub struct Store {
    dir: PathBuf,
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
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(StoreError::Locked(dir.to_owned()));
        }
        Ok(Self {
            dir: dir.to_owned(),
            _lock: lock,
        })
    }

    pub fn path(&self) -> PathBuf {
        self.dir.join(STATE_FILE)
    }

    /// The saved state; `None` on first start. A file that does not parse or validate is an
    /// error, never a silent reset.
    pub fn load(&self) -> Result<Option<State>, StoreError> {
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
        let state: State = serde_json::from_str(&text).map_err(|e| StoreError::Corrupt {
            file: file.clone(),
            why: e.to_string(),
        })?;
        state.validate().map_err(|e| StoreError::Corrupt {
            file,
            why: e.message,
        })?;
        Ok(Some(state))
    }

    /// Replaces the state file atomically and durably.
    pub fn save(&self, state: &State) -> Result<(), StoreError> {
        let io_err = |source| StoreError::Io {
            dir: self.dir.clone(),
            source,
        };
        let tmp = self.dir.join(format!("{STATE_FILE}.tmp"));
        let mut f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_err)?;
        let text = serde_json::to_string_pretty(state).expect("state serializes");
        f.write_all(text.as_bytes()).map_err(io_err)?;
        f.sync_all().map_err(io_err)?;
        drop(f);
        fs::rename(&tmp, self.path()).map_err(io_err)?;
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err)?;
        Ok(())
    }
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
        let store = Store::open(&dir).unwrap();
        assert_eq!(store.load().unwrap(), None);
        let s = State::default()
            .with_vip(Vip::new("10.0.0.1:80/tcp".parse().unwrap()))
            .unwrap();
        store.save(&s).unwrap();
        assert_eq!(store.load().unwrap(), Some(s));
        assert!(matches!(Store::open(&dir), Err(StoreError::Locked(_))));
        drop(store);
        assert!(Store::open(&dir).is_ok());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_reset() {
        let dir = tmpdir("b");
        let store = Store::open(&dir).unwrap();
        fs::write(store.path(), "{ not json").unwrap();
        assert!(matches!(store.load(), Err(StoreError::Corrupt { .. })));
        fs::write(
            store.path(),
            r#"{"version": 1, "vip": [{"address": "10.0.0.1:80/tcp", "ring_size": 4}]}"#,
        )
        .unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains("ring_size"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
