//! Types and limits shared by the XDP datapath (`lb-ebpf`) and user space (`lb-userspace`).
//!
//! Every type that crosses a BPF map is `#[repr(C)]`, has explicit padding fields (padding
//! bytes in a map key would be uninitialised and break lookups) and a compile-time size check.
//! Addresses are stored in network byte order in 16-byte fields; IPv4 uses the first 4 bytes.
#![cfg_attr(not(test), no_std)]

pub mod conntrack;
pub mod hash;
pub mod seen;
pub mod vip_table;

pub use conntrack::{
    CONN_WAYS, ConnSet, ConnSlot, FLOW_MEMO_MAX_SLOTS, FLOW_MEMO_SLOTS, FLOW_MEMO_TICKS, FlowMemo,
    MEMO_METER_SHIFT, MemoMeter, conn_check, conn_home, conn_set, flow_eq, flow_memo_slots,
    memo_pays, memo_sampled, memo_window,
};
use core::mem::size_of;

/// Maximum number of VIPs (size of the VIP maps and of the ring outer map).
pub const MAX_VIPS: u32 = 512;
/// Maximum number of backend slots: one per (VIP, backend) pair, over all VIPs.
pub const MAX_BACKENDS: u32 = 65536;
/// Default Maglev ring size (prime). Rings are per VIP and may use another prime.
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Largest ring a VIP may use (the datapath reduces the hash modulo the VIP's ring size).
pub const MAX_RING_SIZE: u32 = 1_048_573;
/// Default size of the connection table (the `conntrack_entries` setting, fixed when the
/// maps are created): 2^22 = 4,194,304 flows.
///
/// The table is an array of sets of [`CONN_WAYS`] slots that every CPU reads and writes; a
/// flow's hash picks its set, and a new flow in a full set takes the slot idle longest. At
/// 1 million concurrent flows in the default table (2 per set of 8 on average), about 1 new
/// flow in 6,800 finds its set full, and the set's flow idle longest loses its entry (it
/// keeps its backend through the ring while the backend set is unchanged).
///
/// Memory: [`CONNTRACK_BYTES_PER_ENTRY`] bytes per entry, allocated up front (2^22 entries:
/// 256 MiB).
pub const DEFAULT_CONNTRACK_ENTRIES: u32 = 1 << 22;
/// Smallest connection table.
pub const MIN_CONNTRACK_ENTRIES: u32 = 1 << 10;
/// Largest connection table (2^27 entries, 8 GiB).
pub const MAX_CONNTRACK_ENTRIES: u32 = 1 << 27;
/// Kernel memory per connection-table entry: one [`ConnSlot`].
pub const CONNTRACK_BYTES_PER_ENTRY: u32 = size_of::<ConnSlot>() as u32;
/// Entries of the per-source new-flow limiter (an LRU of token buckets keyed by VIP and
/// source /32 or /64). Sources beyond this many recently active ones start again with a
/// full bucket.
pub const SRC_LIMIT_ENTRIES: u32 = 1 << 17;
/// Slots of the per-source first-seen filter in front of that LRU ([`seen`]): 2^20 (8 MiB).
pub const SRC_SEEN_SLOTS: u32 = 1 << 20;
/// Source-prefix entries (allow or deny, over all VIPs) per address family.
pub const PREFIX_ENTRIES: u32 = 16_384;
/// Default UDP destination port of GUE encapsulation (Katran's).
pub const DEFAULT_GUE_PORT: u16 = 6080;
/// Decap program's GUE port setting (`DECAP_GUE` slot 0): GUE is not decapsulated.
pub const DECAP_GUE_OFF: u32 = 1 << 16;
/// Entries of the decap program's counter array (kept at its first size: the array may be
/// pinned by an older decap).
pub const DECAP_STATS_ENTRIES: u32 = 17;

/// The datapath's clock: `bpf_ktime_get_coarse_ns() >> CLOCK_SHIFT`, in ticks of 2^20 ns
/// (1.048576 ms). Connection-table entries hold the tick they were last used in (32 bits:
/// wraps after about 52 days).
pub const CLOCK_SHIFT: u32 = 20;

/// Milliseconds to clock ticks (rounded up).
pub const fn ms_to_ticks(ms: u32) -> u32 {
    let ticks = ((ms as u64) * 1_000_000).div_ceil(1 << CLOCK_SHIFT);
    if ticks > u32::MAX as u64 {
        u32::MAX
    } else {
        ticks as u32
    }
}

/// Length of the flood meter's window, in nanoseconds (2^27 ns, about 134 ms).
pub const FLOOD_WINDOW_SHIFT: u32 = 27;
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
/// Flags of the ring maps of other sizes than the default (`RINGS`: the outer map's template
/// and the maps user space creates).
pub const RING_MAP_FLAGS: u32 = BPF_F_INNER_MAP | BPF_F_MMAPABLE;
/// Flags of the ring maps of VIPs with the default ring size (`RINGS_FIXED`): all of one
/// size, without `BPF_F_INNER_MAP`, so the verifier inlines their lookup (no helper call).
pub const FIXED_RING_MAP_FLAGS: u32 = BPF_F_MMAPABLE;

/// Whether a VIP's ring of `ring_size` slots lives in `RINGS_FIXED` (the default size), not
/// in `RINGS`. The datapath and user space both decide with it.
#[inline(always)]
pub fn ring_is_fixed(ring_size: u32) -> bool {
    ring_size == DEFAULT_RING_SIZE
}

/// VIP flag: hash on the client (source) address only, so a client sticks to one backend.
pub const VIP_F_AFFINITY_SRC_IP: u32 = 1 << 0;

/// Backend flag: the slot holds a backend (cleared when it is removed).
pub const BACKEND_F_IN_USE: u8 = 1 << 0;

/// TCP flags (byte 13 of the TCP header).
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// `Settings::encap`: IP-in-IP (IPv4 or IPv6 outer header, protocol 4 or 41).
pub const ENCAP_IPIP: u8 = 0;
/// `Settings::encap`: GUE variant 1 (RFC 8086 / draft-ietf-intarea-gue): outer IP, UDP to
/// `Settings::gue_port` from a per-flow source port, then the inner IP packet directly.
pub const ENCAP_GUE: u8 = 1;

/// `PrefixKey*` values: what a matching source prefix does.
pub const PREFIX_ALLOW: u32 = 1;
pub const PREFIX_DENY: u32 = 2;

/// `VipPolicy::flags`: the VIP has source prefixes in the prefix tries.
pub const POLICY_F_PREFIXES: u32 = 1 << 0;
/// `VipPolicy::flags`: sources that match no prefix are refused (the VIP has an allow list).
pub const POLICY_F_ALLOW_ONLY: u32 = 1 << 1;

/// Flow key: the connection-table key and the input of the flow hash. 8-aligned, so that
/// it compares as five 64-bit words.
#[repr(C, align(8))]
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

/// Connection-table value. `last_seen` serves the idle timeouts and the choice of the slot a
/// new flow takes in a full set; it is written at most once per clock tick.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEntry {
    pub backend: u32,
    pub generation: u32,
    /// The flow's VIP index: an established flow needs no VIP lookup.
    pub vip: u32,
    /// Clock tick (see [`CLOCK_SHIFT`]) of the flow's last packet.
    pub last_seen: u32,
}
const _: () = assert!(size_of::<ConnEntry>() == 16);

/// Runtime settings of the balancer, slot 0 of the settings array. User space writes them
/// (defaults on a fresh map: [`Settings::default`]); the datapath reads them per packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// A TCP connection-table entry idle longer than this many clock ticks is no longer
    /// honoured (the flow is chosen again, from the ring). 0: never. See [`ms_to_ticks`].
    pub tcp_idle_ticks: u32,
    /// The same for UDP flows.
    pub udp_idle_ticks: u32,
    /// Flood threshold: new flows per second per CPU above which that CPU stops inserting
    /// connection-table entries for the rest of the flood meter's window (new flows still
    /// get a backend from the ring). 0: no threshold.
    pub flood_new_flows_per_s: u32,
    /// UDP destination port of GUE encapsulation (host order).
    pub gue_port: u16,
    /// `ENCAP_IPIP` or `ENCAP_GUE`.
    pub encap: u8,
    pub _pad: u8,
    /// [`SETTINGS_VERSION`] once user space wrote the settings (0 in a fresh map).
    pub version: u32,
}
const _: () = assert!(size_of::<Settings>() == 20);

impl Settings {
    /// The GUE destination port in force, or 0 for IP-in-IP.
    #[inline(always)]
    pub fn gue_dport(&self) -> u16 {
        if self.encap == ENCAP_GUE {
            self.gue_port
        } else {
            0
        }
    }
}

/// `Settings::version` of this layout.
pub const SETTINGS_VERSION: u32 = 1;
/// Default TCP idle timeout: 1 hour (established TCP flows are mostly ended by FIN or RST;
/// this only ends the pinning of flows whose end the balancer never saw).
pub const DEFAULT_TCP_IDLE_MS: u32 = 3_600_000;
/// Default UDP idle timeout: 30 s (Katran's).
pub const DEFAULT_UDP_IDLE_MS: u32 = 30_000;
/// Default flood threshold, new flows per second per CPU.
pub const DEFAULT_FLOOD_NEW_FLOWS_PER_S: u32 = 100_000;

impl Default for Settings {
    fn default() -> Self {
        Self {
            tcp_idle_ticks: ms_to_ticks(DEFAULT_TCP_IDLE_MS),
            udp_idle_ticks: ms_to_ticks(DEFAULT_UDP_IDLE_MS),
            flood_new_flows_per_s: DEFAULT_FLOOD_NEW_FLOWS_PER_S,
            gue_port: DEFAULT_GUE_PORT,
            encap: ENCAP_IPIP,
            _pad: 0,
            version: SETTINGS_VERSION,
        }
    }
}

/// Per-VIP admission policy for new flows, indexed by VIP index. All-zero: no policy.
/// Rates are GCRA parameters (a token bucket in time units): a flow is admitted when its
/// bucket's theoretical arrival time is at most `tolerance` ahead of now, and then moves it
/// `interval` further.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipPolicy {
    /// Per source (/32 or /64): nanoseconds per new flow (1e9 / rate). 0: no limit.
    pub src_interval_ns: u64,
    /// Per source: `src_interval_ns * (burst - 1)`.
    pub src_tolerance_ns: u64,
    /// Whole VIP, per CPU (each CPU admits its share, rate / CPUs): nanoseconds per new flow.
    /// 0: no cap.
    pub cap_interval_ns: u64,
    /// Whole VIP, per CPU: `cap_interval_ns * (burst per CPU - 1)`.
    pub cap_tolerance_ns: u64,
    /// `POLICY_F_*`.
    pub flags: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<VipPolicy>() == 40);

/// Key of the per-source new-flow limiter: VIP index and source /32 (IPv4) or /64 (IPv6).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SrcKey {
    pub vip: u32,
    /// `FAMILY_V4` or `FAMILY_V6` (a u32: no padding bytes to zero).
    pub family: u32,
    /// IPv4: the address and 0; IPv6: the first 64 bits.
    pub addr: [u32; 2],
}
const _: () = assert!(size_of::<SrcKey>() == 16);

/// Source-prefix trie data (IPv4), after the trie key's `prefix_len`, which is 32 (the VIP
/// index, always matched whole) plus the prefix length of the address. The value is
/// `PREFIX_ALLOW` or `PREFIX_DENY`; the longest matching prefix decides.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PrefixData4 {
    /// VIP index (always matched whole, so its byte order does not matter).
    pub vip: u32,
    /// Network order.
    pub addr: u32,
}
const _: () = assert!(size_of::<PrefixData4>() == 8);

/// Source-prefix trie data (IPv6), as [`PrefixData4`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PrefixData6 {
    pub vip: u32,
    pub addr: [u32; 4],
}
const _: () = assert!(size_of::<PrefixData6>() == 20);

/// Per-CPU flood meter (one entry): new flows counted in the current window, and what the
/// flood mode did.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodMeter {
    /// Start of the current window (coarse ns).
    pub window_start: u64,
    /// Connection-table inserts in the current window.
    pub inserts: u64,
    /// New flows forwarded without an insert because the CPU was under flood.
    pub not_inserted: u64,
    /// Windows in which the threshold was reached.
    pub flood_windows: u64,
}
const _: () = assert!(size_of::<FloodMeter>() == 32);

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

/// Per-CPU counter of a backend slot: every forwarded packet bumps exactly this one counter.
/// VIP totals, connection-table hits and misses and the encapsulation totals are derived
/// from it by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCounter {
    pub packets: u64,
    /// Bytes of the packets as received (IP header included, outer header excluded).
    pub bytes: u64,
    /// Packets of those that chose the backend from the ring (a new flow: a SYN, a
    /// connection-table miss, or an entry no longer valid). The rest hit the table.
    pub new_flows: u64,
}
const _: () = assert!(size_of::<BackendCounter>() == 24);

/// Reasons counted per VIP (`VIP_DROPS[vip * vip_stat::STRIDE + reason]`): packets of a
/// VIP's flows that were not forwarded.
pub mod vip_stat {
    /// The VIP has no backend.
    pub const NO_BACKEND: u32 = 0;
    /// A backend family that cannot carry this packet (IPv6 in IPv4).
    pub const FAMILY: u32 = 1;
    /// A ring slot points to a missing backend.
    pub const BAD_BACKEND: u32 = 2;
    /// New flow over its source's rate (`rate_limit`).
    pub const SRC_RATE: u32 = 3;
    /// New flow over the VIP's cap on new flows.
    pub const VIP_CAP: u32 = 4;
    /// New flow from a source on the VIP's deny list.
    pub const DENIED: u32 = 5;
    /// New flow from a source on none of the VIP's allow-list prefixes.
    pub const NOT_ALLOWED: u32 = 6;
    pub const COUNT: u32 = 7;
    /// Entries per VIP in the array.
    pub const STRIDE: u32 = 8;
    /// The global counter (`stat::*`) each reason adds up to.
    pub const GLOBAL: [u32; COUNT as usize] = [
        super::stat::DROP_NO_BACKEND,
        super::stat::DROP_FAMILY,
        super::stat::ERR_BAD_BACKEND,
        super::stat::DROP_SRC_RATE,
        super::stat::DROP_VIP_CAP,
        super::stat::DROP_DENIED,
        super::stat::DROP_NOT_ALLOWED,
    ];
}

/// Indices of the global counters by reason, as user space shows them. Most are counted in
/// the global per-CPU array; `TX_ENCAP`, `CT_HIT` and `CT_MISS` are derived from the backend
/// counters, and the reasons of [`vip_stat`] are sums over the VIPs.
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
    /// Passed because user space has not written the config yet (or has no next hop): a
    /// packet that may be for a VIP. Untagged IPv4 to other addresses counts as `PASS_NOT_VIP`
    /// even then: that check comes first.
    pub const PASS_NOT_READY: u32 = 16;
    /// Dropped: a new flow over its source's rate.
    pub const DROP_SRC_RATE: u32 = 17;
    /// Dropped: a new flow over its VIP's cap.
    pub const DROP_VIP_CAP: u32 = 18;
    /// Dropped: a new flow from a denied source prefix.
    pub const DROP_DENIED: u32 = 19;
    /// Dropped: a new flow from a source not on its VIP's allow list.
    pub const DROP_NOT_ALLOWED: u32 = 20;
    pub const COUNT: u32 = 21;

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
        "drop_src_rate",
        "drop_vip_cap",
        "drop_denied",
        "drop_not_allowed",
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
    unsafe impl aya::Pod for ConnSet {}
    unsafe impl aya::Pod for FlowMemo {}
    unsafe impl aya::Pod for MemoMeter {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for Counter {}
    unsafe impl aya::Pod for BackendCounter {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for VipPolicy {}
    unsafe impl aya::Pod for SrcKey {}
    unsafe impl aya::Pod for PrefixData4 {}
    unsafe impl aya::Pod for PrefixData6 {}
    unsafe impl aya::Pod for FloodMeter {}
    unsafe impl aya::Pod for crate::vip_table::VipBucket {}
}
