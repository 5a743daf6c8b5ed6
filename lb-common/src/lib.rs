//! Types and limits shared by the XDP datapath (`lb-ebpf`) and user space (`lb-userspace`).
//!
//! Every type that crosses a BPF map is `#[repr(C)]`, has explicit padding fields (padding
//! bytes in a map key would be uninitialised and break lookups) and a compile-time size check.
//! Addresses are stored in network byte order in 16-byte fields; IPv4 uses the first 4 bytes.
#![no_std]

use core::mem::size_of;

/// Maximum number of VIPs (size of the VIP maps and of the ring outer map).
pub const MAX_VIPS: u32 = 512;
/// Maximum number of backend slots: one per (VIP, backend) pair, over all VIPs.
pub const MAX_BACKENDS: u32 = 65536;
/// Default Maglev ring size (prime). Rings are per VIP and may use another prime.
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Largest ring a VIP may use (the datapath reduces the hash modulo the VIP's ring size).
pub const MAX_RING_SIZE: u32 = 1_048_573;
/// Connection-table entries (LRU).
pub const CONNTRACK_SIZE: u32 = 262_144;
/// Words (64 bits each) of the VIP address filter: a bitmap with one bit set per VIP address
/// (collisions allowed), checked before any VIP hash lookup so that traffic for no VIP costs
/// one array read.
pub const VIP_FILTER_WORDS: u32 = 1024;

/// The filter bit of an address (0-65535); both sides compute it the same way.
#[inline(always)]
pub fn vip_filter_bit(addr: &[u32; 4]) -> u32 {
    let x = addr[0] ^ addr[1].rotate_left(7) ^ addr[2].rotate_left(13) ^ addr[3].rotate_left(19);
    x.wrapping_mul(0x9e37_79b1) >> 16
}

/// Addresses the decap program accepts as outer destination.
pub const MAX_DECAP_ADDRS: u32 = 64;

/// A ring slot that holds no backend (VIP without backends).
pub const NO_BACKEND: u32 = u32::MAX;

pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_IPIP: u8 = 4;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_IPV6: u8 = 41;
pub const PROTO_ICMPV6: u8 = 58;

/// `BPF_F_INNER_MAP`: ring maps may have any size and still fit the ring outer map.
pub const BPF_F_INNER_MAP: u32 = 1 << 12;
/// `BPF_F_MMAPABLE`: user space writes ring maps through a memory mapping.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Flags of every ring map (the outer map's template and the maps user space creates).
pub const RING_MAP_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;

/// VIP flag: hash on the client (source) address only, so a client sticks to one backend.
pub const VIP_F_AFFINITY_SRC_IP: u32 = 1 << 0;

/// Backend flag: the slot holds a backend (cleared when it is removed).
pub const BACKEND_F_IN_USE: u8 = 1 << 0;

/// Flow key: the connection-table key and the input of the flow hash.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    /// Source port, network byte order (0 for ICMP and non-first fragments).
    pub sport: u16,
    /// Destination port, network byte order.
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40);

/// VIP key: address, port (0 = all ports) and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    pub addr: [u32; 4],
    /// Port in network byte order; 0 for a port-wildcard VIP.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(size_of::<VipKey>() == 20);

/// What the datapath knows of a VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into the ring outer map and the per-VIP counters.
    pub index: u32,
    /// `VIP_F_*` flags.
    pub flags: u32,
    /// Number of slots in this VIP's Maglev ring (prime).
    pub ring_size: u32,
    /// Where the active table starts in the VIP's ring map: 0 or `ring_size`. The map holds
    /// two tables; user space writes the other one and then switches this offset, in one
    /// update of the VIP's entry.
    pub ring_off: u32,
}
const _: () = assert!(size_of::<VipMeta>() == 16);

/// Address-level key: which VIP answers ICMP echo and takes fragments for an address.
/// `proto` 0 marks the "address is a VIP" entry used for ICMP echo.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrKey {
    pub addr: [u32; 4],
    pub family: u8,
    pub proto: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<AddrKey>() == 20);

/// A backend slot: one backend of one VIP.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    pub addr: [u32; 4],
    pub family: u8,
    /// `BACKEND_F_*` flags.
    pub flags: u8,
    /// Index of the VIP this slot belongs to (for user space; the datapath does not read it).
    pub vip: u16,
    /// Changes whenever connection-table entries that point here must stop being honoured
    /// (backend removed or down). Entries carry the generation they were made under.
    pub generation: u32,
}
const _: () = assert!(size_of::<Backend>() == 24);

/// Connection-table value. Recency is the LRU's business: every lookup marks the entry as
/// used, so the hot path writes nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntry {
    pub backend: u32,
    pub generation: u32,
    /// The flow's VIP index: an established flow needs no VIP lookup.
    pub vip: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ConnEntry>() == 16);

/// Balancer configuration, slot 0 of the config array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    /// Outer source address for IPv6 outer headers.
    pub src_v6: [u32; 4],
    /// Outer source address for IPv4 outer headers (network order).
    pub src_v4: u32,
    /// Largest outer IP packet (L3 MTU toward the backends). 0 disables the check.
    pub mtu: u16,
    /// Set to 1 once user space wrote the config; the balancer passes everything before.
    pub ready: u16,
    /// MAC of the interface the program is attached to (source MAC of sent frames).
    pub if_mac: [u8; 6],
    /// MAC of the next hop toward the backends.
    pub nh_mac: [u8; 6],
}
const _: () = assert!(size_of::<Config>() == 36);

/// Packets and bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}
const _: () = assert!(size_of::<Counter>() == 16);

/// Indices of the global per-CPU counters.
pub mod stat {
    /// Not for a VIP: handed to the kernel untouched.
    pub const PASS_NOT_VIP: u32 = 0;
    /// Encapsulated and sent to a backend.
    pub const TX_ENCAP: u32 = 1;
    pub const CT_HIT: u32 = 2;
    pub const CT_MISS: u32 = 3;
    /// ICMP echo requests to a VIP answered.
    pub const ICMP_ECHO_REPLY: u32 = 4;
    /// ICMP errors about a VIP flow sent to the flow's backend.
    pub const ICMP_ERROR_FWD: u32 = 5;
    /// Fragmentation-needed / packet-too-big sent because the encapsulated packet was too big.
    pub const ICMP_TOO_BIG_SENT: u32 = 6;
    /// Dropped: the VIP has no backend.
    pub const DROP_NO_BACKEND: u32 = 7;
    /// Dropped: malformed or truncated header.
    pub const DROP_MALFORMED: u32 = 8;
    /// Dropped: too big and not allowed to send ICMP (IPv4 without DF).
    pub const DROP_TOO_BIG: u32 = 9;
    /// Dropped: a backend family that cannot carry this packet (IPv6 in IPv4).
    pub const DROP_FAMILY: u32 = 10;
    /// Error: a kernel helper failed (adjust head/tail, map lookup).
    pub const ERR_HELPER: u32 = 11;
    /// Error: a ring slot points to a missing backend.
    pub const ERR_BAD_BACKEND: u32 = 12;
    /// VIP traffic the balancer does not handle (other ICMP types, other protocols): passed.
    pub const PASS_VIP_OTHER: u32 = 13;
    /// Decap program: packets decapsulated and passed up.
    pub const DECAP_OK: u32 = 14;
    /// Decap program: packets passed untouched (not encapsulated, or not to us).
    pub const DECAP_PASS: u32 = 15;
    /// Passed because user space has not written the config yet.
    pub const PASS_NOT_READY: u32 = 16;
    pub const COUNT: u32 = 17;

    /// Names, indexed by counter, for display.
    pub const NAMES: [&str; COUNT as usize] = [
        "pass_not_vip",
        "tx_encap",
        "conntrack_hit",
        "conntrack_miss",
        "icmp_echo_reply",
        "icmp_error_forwarded",
        "icmp_too_big_sent",
        "drop_no_backend",
        "drop_malformed",
        "drop_too_big",
        "drop_family",
        "error_helper",
        "error_bad_backend",
        "pass_vip_other",
        "decap_ok",
        "decap_pass",
        "pass_not_ready",
    ];
}

/// Health probes over the data path (`via = "tunnel"`): the probe socket's `SO_MARK` is
/// `PROBE_MARK_TAG | slot`, where `slot` is the probed backend's slot in `BACKENDS`. The
/// balancer's egress classifier (`maglb_probe_encap`) encapsulates marked packets toward that
/// backend exactly as the XDP program encapsulates client packets.
pub const PROBE_MARK_TAG: u32 = 0x6d6c_0000;
/// The bits of a mark that must equal `PROBE_MARK_TAG`; the rest is the slot.
pub const PROBE_MARK_MASK: u32 = 0xffff_0000;
const _: () = assert!(MAX_BACKENDS <= !PROBE_MARK_MASK + 1);

/// Indices of the probe classifier's per-CPU counters (`PROBE_STATS`).
pub mod probe_stat {
    /// Marked packets encapsulated toward their backend.
    pub const ENCAP: u32 = 0;
    /// Dropped: the mark names a slot that holds no backend.
    pub const NO_BACKEND: u32 = 1;
    /// Dropped: the datapath has no configuration (next hop) yet.
    pub const NOT_READY: u32 = 2;
    /// Dropped: an IPv6 packet toward an IPv4 backend, or not IP at all.
    pub const FAMILY: u32 = 3;
    /// Dropped: a kernel helper failed (growing the packet, writing headers).
    pub const ERROR: u32 = 4;
    pub const COUNT: u32 = 5;
    pub const NAMES: [&str; COUNT as usize] =
        ["encapsulated", "no_backend", "not_ready", "family", "error"];
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all these are repr(C) plain data with explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for FlowKey {}
    unsafe impl aya::Pod for VipKey {}
    unsafe impl aya::Pod for VipMeta {}
    unsafe impl aya::Pod for AddrKey {}
    unsafe impl aya::Pod for Backend {}
    unsafe impl aya::Pod for ConnEntry {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Counter {}
}
