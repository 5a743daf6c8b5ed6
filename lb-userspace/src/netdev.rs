//! Interface facts read with ioctls, which answer for the caller's network namespace (the
//! thread's, after `setns`), unlike `/sys`, which answers for the namespace it was mounted in.

use std::{ffi::CString, io};

/// Errors reading interface facts.
#[derive(Debug, thiserror::Error)]
pub enum NetdevError {
    #[error("interface {iface:?} not found: check the name with `ip link`")]
    NoSuchInterface { iface: String },
    #[error("reading {what} of interface {iface:?}")]
    Io {
        iface: String,
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

fn ifreq(iface: &str) -> Result<libc::ifreq, NetdevError> {
    let name = CString::new(iface).map_err(|_| NetdevError::NoSuchInterface {
        iface: iface.into(),
    })?;
    let bytes = name.as_bytes_with_nul();
    if bytes.len() > libc::IFNAMSIZ {
        return Err(NetdevError::NoSuchInterface {
            iface: iface.into(),
        });
    }
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

fn ioctl(iface: &str, what: &'static str, op: libc::Ioctl) -> Result<libc::ifreq, NetdevError> {
    let mut req = ifreq(iface)?;
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetdevError::Io {
            iface: iface.into(),
            what,
            source: io::Error::last_os_error(),
        });
    }
    let rc = unsafe { libc::ioctl(fd, op, &mut req) };
    let err = io::Error::last_os_error();
    unsafe { libc::close(fd) };
    if rc < 0 {
        if err.raw_os_error() == Some(libc::ENODEV) {
            return Err(NetdevError::NoSuchInterface {
                iface: iface.into(),
            });
        }
        return Err(NetdevError::Io {
            iface: iface.into(),
            what,
            source: err,
        });
    }
    Ok(req)
}

/// The interface's MAC address.
pub fn mac(iface: &str) -> Result<[u8; 6], NetdevError> {
    let req = ioctl(iface, "MAC address", libc::SIOCGIFHWADDR)?;
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}

/// The interface's MTU.
pub fn mtu(iface: &str) -> Result<u32, NetdevError> {
    let req = ioctl(iface, "MTU", libc::SIOCGIFMTU)?;
    Ok(unsafe { req.ifr_ifru.ifru_mtu } as u32)
}

/// Whether the interface is up and has a carrier (`IFF_RUNNING`).
pub fn is_running(iface: &str) -> Result<bool, NetdevError> {
    let req = ioctl(iface, "flags", libc::SIOCGIFFLAGS)?;
    let flags = unsafe { req.ifr_ifru.ifru_flags } as i32;
    Ok(flags & libc::IFF_RUNNING != 0)
}

/// The interface's index.
pub fn index(iface: &str) -> Result<u32, NetdevError> {
    let name = CString::new(iface).map_err(|_| NetdevError::NoSuchInterface {
        iface: iface.into(),
    })?;
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(NetdevError::NoSuchInterface {
            iface: iface.into(),
        }),
        i => Ok(i),
    }
}

/// Formats a MAC as `aa:bb:cc:dd:ee:ff`.
pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in mac.iter_mut() {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_round_trip() {
        let m = parse_mac("02:00:0a:ff:00:01").unwrap();
        assert_eq!(m, [2, 0, 10, 255, 0, 1]);
        assert_eq!(fmt_mac(&m), "02:00:0a:ff:00:01");
        assert!(parse_mac("02:00:0a:ff:00").is_none());
        assert!(parse_mac("02:00:0a:ff:00:01:02").is_none());
        assert!(parse_mac("2:00:0a:ff:00:01").is_none());
        assert!(parse_mac("zz:00:0a:ff:00:01").is_none());
    }

    #[test]
    fn loopback_facts() {
        assert_eq!(mac("lo").unwrap(), [0; 6]);
        assert!(mtu("lo").unwrap() > 0);
        assert!(matches!(
            mac("no-such-if0"),
            Err(NetdevError::NoSuchInterface { .. })
        ));
    }
}
