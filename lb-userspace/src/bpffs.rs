//! The BPF filesystem that holds maglb's pins. maglb mounts one itself when the place it pins
//! to is not on a BPF filesystem (as Cilium's agent and bpfman do), so a fresh machine needs no
//! manual step.

use std::{
    io,
    path::{Path, PathBuf},
};

use rustix::{
    fs::statfs,
    mount::{MountFlags, mount},
};

/// `BPF_FS_MAGIC` from `<linux/magic.h>`.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
/// Where the BPF filesystem lives by convention.
pub const DEFAULT_MOUNT: &str = "/sys/fs/bpf";

#[derive(Debug, thiserror::Error)]
pub enum BpffsError {
    #[error("checking the filesystem of {path}")]
    Stat {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "mounting a BPF filesystem at {at} (pins for {dir} need one); mount it yourself with `mount -t bpf bpf {at}`, or choose another directory"
    )]
    Mount {
        at: PathBuf,
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Whether `path` (or, when it does not exist yet, its nearest existing ancestor) is on a BPF
/// filesystem.
pub fn is_bpffs(path: &Path) -> Result<bool, BpffsError> {
    let existing = path
        .ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"));
    let st = statfs(existing).map_err(|e| BpffsError::Stat {
        path: existing.to_owned(),
        source: e.into(),
    })?;
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

/// Where a BPF filesystem for `dir` is mounted when none is: `/sys/fs/bpf` for directories
/// under it, else the parent of `dir`.
fn mount_point(dir: &Path) -> PathBuf {
    if dir.starts_with(DEFAULT_MOUNT) {
        PathBuf::from(DEFAULT_MOUNT)
    } else {
        dir.parent().unwrap_or(dir).to_owned()
    }
}

/// Makes sure `dir` can hold pins: mounts a BPF filesystem when it is not on one. Returns the
/// mount point when it mounted one (for the caller's log).
pub fn ensure(dir: &Path) -> Result<Option<PathBuf>, BpffsError> {
    if is_bpffs(dir)? {
        return Ok(None);
    }
    let at = mount_point(dir);
    let fail = |source: io::Error| BpffsError::Mount {
        at: at.clone(),
        dir: dir.to_owned(),
        source,
    };
    std::fs::create_dir_all(&at).map_err(fail)?;
    mount(
        "bpf",
        &at,
        "bpf",
        MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
        c"mode=0700",
    )
    .map_err(|e| fail(e.into()))?;
    Ok(Some(at))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_point_is_the_conventional_place_or_the_parent() {
        assert_eq!(
            mount_point(Path::new("/sys/fs/bpf/maglb")),
            PathBuf::from("/sys/fs/bpf")
        );
        assert_eq!(
            mount_point(Path::new("/sys/fs/bpf/a/b/c")),
            PathBuf::from("/sys/fs/bpf")
        );
        assert_eq!(
            mount_point(Path::new("/run/maglb/bpf")),
            PathBuf::from("/run/maglb")
        );
    }

    #[test]
    fn a_plain_directory_is_not_bpffs() {
        assert!(!is_bpffs(&std::env::temp_dir().join("no/such/dir")).unwrap());
    }
}
