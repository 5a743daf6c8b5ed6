//! XDP attachment: attach modes, pinned links (which keep the program attached after the
//! agent exits), and the directories of older map layouts.

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::programs::{
    ProgramError, Xdp, XdpMode,
    links::{FdLink, PinnedLink},
    xdp::{XdpLink, XdpLinkId},
};

use super::{DatapathError, pin_error};

/// XDP attach mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// In the driver (fastest; veth and most 10G+ NICs).
    Native,
    /// In the kernel stack, for any interface (slow; for testing).
    Generic,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
        }
    }
    fn xdp(self) -> XdpMode {
        match self {
            Mode::Native => XdpMode::Driver,
            Mode::Generic => XdpMode::Skb,
        }
    }
}

/// Attaches `prog` to `iface` in `mode` (in the calling thread's network namespace).
pub fn attach_xdp(prog: &mut Xdp, iface: &str, mode: Mode) -> Result<XdpLinkId, DatapathError> {
    prog.attach(iface, mode.xdp())
        .map_err(|source| DatapathError::Attach {
            iface: iface.into(),
            mode: mode.name(),
            source,
        })
}

/// Pins the link `id` of `prog` at `path`, so the attachment outlives this process, and
/// hands it back to `prog`. Returns the link's new id.
pub fn pin_link(prog: &mut Xdp, id: XdpLinkId, path: &Path) -> Result<XdpLinkId, DatapathError> {
    let dir = path.parent().unwrap_or(path);
    let link = prog.take_link(id).map_err(|e| pin_error(dir, e))?;
    let fd = FdLink::try_from(link).map_err(|e| pin_error(dir, e))?;
    let pinned = fd.pin(path).map_err(|e| pin_error(dir, e))?;
    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| pin_error(dir, e))?;
    prog.attach_to_link(link).map_err(|e| pin_error(dir, e))
}

/// What became of a pinned link.
pub enum Adopted {
    /// `prog` runs on it now (one atomic replace of the attached program).
    Linked(XdpLinkId),
    /// The link is defunct: its interface is gone (a deleted namespace, an unplugged NIC),
    /// so the kernel refuses to update it (ENOLINK). The reason, for the log.
    Defunct(String),
}

/// Puts `prog` on the link pinned at `path`. Any other failure than a defunct link is an
/// error: the pin stays (unpinning a live link would stop forwarding once we exit).
pub fn adopt(prog: &mut Xdp, path: &Path) -> Result<Adopted, DatapathError> {
    let dir = path.parent().unwrap_or(path);
    let pinned = PinnedLink::from_pin(path).map_err(|e| pin_error(dir, e))?;
    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| pin_error(dir, e))?;
    match prog.attach_to_link(link) {
        Ok(id) => Ok(Adopted::Linked(id)),
        Err(ProgramError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOLINK) => {
            Ok(Adopted::Defunct(format!(
                "{}: {} (its interface is gone)",
                e.call, e.io_error
            )))
        }
        Err(e) => Err(pin_error(dir, crate::error_chain(&e))),
    }
}

/// Pins an adopted link at a new path as well (the old path goes with its directory).
pub fn repin(prog: &mut Xdp, id: XdpLinkId, path: &Path) -> Result<XdpLinkId, DatapathError> {
    pin_link(prog, id, path)
}

/// Removes the pin at `path` (the link ends when nothing else holds it).
pub fn unpin(path: &Path) -> io::Result<()> {
    match PinnedLink::from_pin(path) {
        Ok(l) => l.unpin().map(drop),
        // Not a link any more (or unreadable): the file itself is what holds it.
        Err(_) => std::fs::remove_file(path),
    }
}

/// Directories of other map layouts under `bpffs` (`maps-v*` but `current`).
pub fn older_layouts(bpffs: &Path, current: &str) -> io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(bpffs)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("maps-v") && name != current {
            out.push(e.path());
        }
    }
    out.sort();
    Ok(out)
}
