//! The few operating-system calls that need `unsafe`, each with its SAFETY argument. Every
//! other module uses safe interfaces (aya, rustix, socket2, rtnetlink, std).

use std::{
    io,
    os::fd::BorrowedFd,
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use rustix::mm::{MapFlags, ProtFlags, mmap, munmap};

/// Bytes per element of a BPF array map whose values are `u32`: the kernel rounds element
/// sizes up to 8.
const ELEM: usize = 8;
/// `u32` words per element.
const STRIDE: usize = ELEM / 4;

/// A BPF array map of `u32` created with `BPF_F_MMAPABLE`, mapped into this process for as
/// long as this lives. The XDP program reads the same memory while it is written, so every
/// access is a single aligned 32-bit atomic load or store: a reader sees either the old or
/// the new value of a slot, never a torn one.
pub struct MappedArray {
    ptr: NonNull<AtomicU32>,
    len: usize,
    bytes: usize,
}

// SAFETY: the mapping is plain shared memory accessed only through atomics; the pointer may
// move between threads like any `&[AtomicU32]`.
unsafe impl Send for MappedArray {}
// SAFETY: as above; `&MappedArray` only gives out `&[AtomicU32]`.
unsafe impl Sync for MappedArray {}

impl MappedArray {
    /// Maps the first `len` values of the array map `fd` (whose `max_entries` is at least
    /// `len`), writable if `write`.
    pub fn map(fd: BorrowedFd<'_>, len: usize, write: bool) -> io::Result<Self> {
        let bytes = (len * ELEM).max(1);
        let prot = if write {
            ProtFlags::READ | ProtFlags::WRITE
        } else {
            ProtFlags::READ
        };
        // SAFETY: a new shared mapping of `bytes` bytes at an address the kernel picks; it
        // aliases no Rust object. The kernel refuses (EINVAL) a map that is not mmapable or
        // smaller than `bytes`, and an error is returned before any use.
        let ptr = unsafe { mmap(std::ptr::null_mut(), bytes, prot, MapFlags::SHARED, fd, 0) }
            .map_err(io::Error::from)?;
        let ptr = NonNull::new(ptr.cast::<AtomicU32>()).ok_or_else(|| io::Error::other("mmap"))?;
        Ok(Self { ptr, len, bytes })
    }

    /// The mapped words: element `i`'s value is word `STRIDE * i`.
    fn words(&self) -> &[AtomicU32] {
        // SAFETY: the mapping holds `len` elements of `ELEM` bytes, page-aligned, and lives as
        // long as `self`; `AtomicU32` has the layout of `u32`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len * STRIDE) }
    }

    /// Stores `values` into the elements from index `at` on.
    pub fn write(&self, at: usize, values: &[u32]) {
        let words = &self.words()[at * STRIDE..(at + values.len()) * STRIDE];
        for (slot, v) in words.iter().step_by(STRIDE).zip(values) {
            slot.store(*v, Ordering::Relaxed);
        }
    }

    /// Copies the values of `len` elements from index `at` on.
    pub fn read(&self, at: usize, len: usize) -> Vec<u32> {
        self.words()[at * STRIDE..(at + len) * STRIDE]
            .iter()
            .step_by(STRIDE)
            .map(|v| v.load(Ordering::Relaxed))
            .collect()
    }
}

impl Drop for MappedArray {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no reference into it outlives
        // `self` (`values` borrows `self`).
        let _ = unsafe { munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

/// Sends `frame` (a whole Ethernet frame) out of interface `ifindex` on the packet socket
/// `sock`.
pub fn send_frame(sock: &socket2::Socket, ifindex: u32, frame: &[u8]) -> io::Result<usize> {
    // SAFETY: `sockaddr_ll` is plain old data, valid when zeroed.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&frame[..6]);
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: the storage is zeroed, then the first `len` bytes receive a valid
    // `sockaddr_ll`, which fits in `sockaddr_storage`.
    let ((), addr) = unsafe {
        socket2::SockAddr::try_init(|storage, out_len| {
            std::ptr::copy_nonoverlapping(
                (&raw const sll).cast::<u8>(),
                storage.cast::<u8>(),
                len as usize,
            );
            *out_len = len;
            Ok(())
        })
    }?;
    sock.send_to(frame, &addr)
}

/// A socket registered with the tokio reactor for readiness.
pub fn async_socket(
    sock: socket2::Socket,
) -> io::Result<tokio::io::unix::AsyncFd<socket2::Socket>> {
    // SAFETY: the `AsyncFd` takes the socket by value and owns it until dropped, so its file
    // descriptor stays open and the same for as long as it is registered.
    unsafe { tokio::io::unix::AsyncFd::register(sock) }.map_err(|e| io::Error::other(e.to_string()))
}

/// Makes every allocation of 128 KiB or more its own memory mapping, returned to the system
/// when freed. glibc otherwise raises that threshold after the first large free, and the
/// Maglev tables (256 KiB each, built on several threads) then stay in its arenas.
pub fn map_large_allocations() {
    // SAFETY: `mallopt` changes a tuning parameter of the allocator; it is called before the
    // agent starts its threads and touches no allocation.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// Gives freed heap memory back to the operating system (glibc keeps it in its arenas
/// otherwise), after work that allocated and freed a lot.
pub fn release_free_memory() {
    // SAFETY: `malloc_trim` only releases memory the allocator holds free; it touches no
    // live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Receives one datagram on an IPv6 socket with `IPV6_RECVHOPLIMIT` set: (length, source,
/// hop limit if the kernel gave it).
pub fn recv_with_hop_limit(
    sock: &socket2::Socket,
    buf: &mut [u8],
) -> io::Result<(usize, std::net::Ipv6Addr, Option<u8>)> {
    use std::mem::MaybeUninit;
    let mut control = [MaybeUninit::<u8>::uninit(); 128];
    let mut from = socket2::SockAddr::from(std::net::SocketAddrV6::new(
        std::net::Ipv6Addr::UNSPECIFIED,
        0,
        0,
        0,
    ));
    // SAFETY: `MaybeUninit<u8>` has the layout of `u8`, and the kernel only writes
    // initialized bytes into the buffer; nothing uninitialized is ever written through it.
    let data = unsafe { &mut *(std::ptr::from_mut::<[u8]>(buf) as *mut [MaybeUninit<u8>]) };
    let mut bufs = [socket2::MaybeUninitSlice::new(data)];
    let (n, clen) = {
        let mut msg = socket2::MsgHdrMut::new()
            .with_addr(&mut from)
            .with_buffers(&mut bufs)
            .with_control(&mut control);
        let n = sock.recvmsg(&mut msg, 0)?;
        (n, msg.control_len().min(control.len()))
    };
    // SAFETY: `recvmsg` initialized the first `msg_controllen` bytes of the control buffer.
    let control: Vec<u8> = control[..clen]
        .iter()
        .map(|b| unsafe { b.assume_init() })
        .collect();
    let src = from
        .as_socket_ipv6()
        .map_or(std::net::Ipv6Addr::UNSPECIFIED, |a| *a.ip());
    Ok((n, src, hop_limit(&control)))
}

/// The IPV6_HOPLIMIT value in a control message buffer (`cmsghdr`s, read as bytes).
fn hop_limit(control: &[u8]) -> Option<u8> {
    const WORD: usize = std::mem::size_of::<usize>();
    let header = std::mem::size_of::<libc::cmsghdr>();
    let align = |n: usize| n.div_ceil(WORD) * WORD;
    let mut at = 0;
    while at + header <= control.len() {
        let len = usize::from_ne_bytes(control[at..at + WORD].try_into().ok()?);
        let level = i32::from_ne_bytes(control[at + WORD..at + WORD + 4].try_into().ok()?);
        let kind = i32::from_ne_bytes(control[at + WORD + 4..at + WORD + 8].try_into().ok()?);
        if len < header || at + len > control.len() {
            return None;
        }
        let data_at = at + align(header);
        if level == libc::IPPROTO_IPV6 && kind == libc::IPV6_HOPLIMIT && data_at + 4 <= at + len {
            let v = i32::from_ne_bytes(control[data_at..data_at + 4].try_into().ok()?);
            return u8::try_from(v).ok();
        }
        at += align(len);
    }
    None
}

/// Deletes element `key` of the BPF map `fd` whose keys are `u32` (`BPF_MAP_DELETE_ELEM`;
/// aya has no delete for arrays of maps). `Ok(false)` if there was none.
pub fn bpf_map_delete_u32(fd: BorrowedFd<'_>, key: u32) -> io::Result<bool> {
    use std::os::fd::AsRawFd as _;
    /// The head of `union bpf_attr` for the `BPF_MAP_*_ELEM` commands.
    #[repr(C)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
    let attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        _pad: 0,
        key: std::ptr::from_ref(&key) as u64,
        value: 0,
        flags: 0,
    };
    // SAFETY: `attr` is a valid `bpf_attr` head for BPF_MAP_DELETE_ELEM with its size; the
    // kernel reads 4 bytes of key from `&key`, which lives across the call, and writes
    // nothing back.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_DELETE_ELEM,
            std::ptr::from_ref(&attr),
            size_of::<ElemAttr>() as u32,
        )
    };
    match r {
        0 => Ok(true),
        _ => match io::Error::last_os_error() {
            e if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            e => Err(e),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::hop_limit;

    fn cmsg(level: i32, kind: i32, value: i32) -> Vec<u8> {
        let header = std::mem::size_of::<libc::cmsghdr>();
        let mut b = Vec::new();
        b.extend_from_slice(&(header + 4).to_ne_bytes());
        b.extend_from_slice(&level.to_ne_bytes());
        b.extend_from_slice(&kind.to_ne_bytes());
        b.resize(header, 0);
        b.extend_from_slice(&value.to_ne_bytes());
        b.resize((header + 4).div_ceil(8) * 8, 0);
        b
    }

    #[test]
    fn the_hop_limit_is_found_among_control_messages() {
        let mut c = cmsg(libc::IPPROTO_IPV6, libc::IPV6_TCLASS, 7);
        c.extend(cmsg(libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT, 255));
        assert_eq!(hop_limit(&c), Some(255));
        assert_eq!(
            hop_limit(&cmsg(libc::IPPROTO_IPV6, libc::IPV6_TCLASS, 7)),
            None
        );
        assert_eq!(hop_limit(&[]), None);
        // A truncated buffer is not read past its end.
        let c = cmsg(libc::IPPROTO_IPV6, libc::IPV6_HOPLIMIT, 64);
        assert_eq!(hop_limit(&c[..10]), None);
    }
}
