//! The balancer's maps. User space (the loader, later the agent) writes all of them but the
//! connection table, the rate-limit state and the counters, which this program writes.

use aya_ebpf::{
    bindings::BPF_F_NO_COMMON_LRU,
    btf_maps,
    macros::{btf_map, map},
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    AddrKey, Backend, BackendCounter, CONN_WAYS, Config, ConnSet, Counter,
    DEFAULT_CONNTRACK_ENTRIES, DEFAULT_RING_SIZE, FIXED_RING_MAP_FLAGS, FLOW_MEMO_SLOTS,
    FloodMeter, FlowMemo, MAX_BACKENDS, MAX_VIPS, MemoMeter, PREFIX_ENTRIES, PrefixData4,
    PrefixData6, RING_MAP_FLAGS, SRC_LIMIT_ENTRIES, SRC_SEEN_SLOTS, Settings, SrcKey,
    VIP_FILTER_WORDS, VipKey, VipMeta, VipPolicy, stat, vip_stat,
    vip_table::{VIP_BUCKETS, VipBucket},
};

/// VIPs by (address, port, protocol); port 0 is the port-wildcard entry.
/// Written by user space, read here.
#[map]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

/// The VIPs again, in an array of buckets that this program reads without a call
/// (`lb_common::vip_table`); a VIP it does not show is looked up in `VIPS`. Written by user
/// space.
#[map]
pub static VIP_TABLE: Array<VipBucket> = Array::with_max_entries(VIP_BUCKETS, 0);

/// Per address: `proto` 0 says "this address is a VIP" (ICMP echo); `proto` TCP/UDP names the
/// VIP whose backends take that protocol's IPv4 fragments. Written by user space.
#[map]
pub static VIP_ADDRS: HashMap<AddrKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS * 3, 0);

/// One ring map per VIP index: an inner array of backend indices holding two Maglev tables
/// of `ring_size` slots each. The VIP's entry names the active one (`VipMeta::ring_off`); user
/// space writes the other (through a memory mapping) and switches the offset with one update
/// of the VIP's entry, so a packet never sees a half-written table and no switch waits for an
/// RCU grace period. `BPF_F_INNER_MAP` lets each VIP's ring have its own (prime) size.
#[btf_map]
pub static RINGS: btf_maps::ArrayOfMaps<
    btf_maps::Array<u32, { 2 * DEFAULT_RING_SIZE as usize }, { RING_MAP_FLAGS as usize }>,
    { MAX_VIPS as usize },
> = btf_maps::ArrayOfMaps::new();

/// As `RINGS`, for the VIPs whose ring has the default size (`lb_common::ring_is_fixed`):
/// every inner map has the same size and no `BPF_F_INNER_MAP`, so the verifier inlines the
/// lookup, which for `RINGS` is a helper call. Written by user space.
#[btf_map]
pub static RINGS_FIXED: btf_maps::ArrayOfMaps<
    btf_maps::Array<u32, { 2 * DEFAULT_RING_SIZE as usize }, { FIXED_RING_MAP_FLAGS as usize }>,
    { MAX_VIPS as usize },
> = btf_maps::ArrayOfMaps::new();

/// Bitmap of VIP addresses (`lb_common::vip_filter_bit`). Written by user space.
#[map]
pub static VIP_FILTER: Array<u64> = Array::with_max_entries(VIP_FILTER_WORDS, 0);

/// Backends by index. Written by user space.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Connection table: flow -> backend, VIP, last use, in sets of `CONN_WAYS` slots; the flow
/// hash picks the set (`hash & CONNTRACK_SET_MASK`). Written here for new flows, read on
/// every packet that is not a SYN, by every CPU. An array: the verifier inlines its lookup
/// (no helper call), and an insert is a few stores into one slot (`conntrack::remember`).
/// User space sets the number of sets (a power of two) at load time (`conntrack_entries`).
#[map]
pub static CONNTRACK: Array<ConnSet> =
    Array::with_max_entries(DEFAULT_CONNTRACK_ENTRIES / CONN_WAYS as u32, 0);

/// Sets in `CONNTRACK` minus one, set by the loader with the map's size. A read-only global:
/// the verifier knows its value.
#[unsafe(no_mangle)]
static CONNTRACK_SET_MASK: u32 = 0;

/// `CONNTRACK_SET_MASK` as loaded.
#[inline(always)]
pub fn conntrack_set_mask() -> u32 {
    // SAFETY: a read-only global, set before load.
    unsafe { core::ptr::read_volatile(&CONNTRACK_SET_MASK) }
}

/// Each CPU's flow memo (`lb_common::FlowMemo`): `FLOW_MEMO_MASK + 1` slots per CPU, CPU
/// `c`'s from `c * (FLOW_MEMO_MASK + 1)` on, a slot picked by the flow hash. A plain array,
/// not a per-CPU one: its lookup is one inlined index (a per-CPU array's goes through a
/// table of pointers, one more cache line), and each CPU's slots are contiguous. Not pinned:
/// a memo only repeats the connection table, and a new program starts with an empty one.
/// User space sizes it at load time (`lb_common::flow_memo_slots` per possible CPU).
#[map]
pub static FLOW_MEMO: Array<FlowMemo> = Array::with_max_entries(FLOW_MEMO_SLOTS, 0);

/// Slots per CPU of `FLOW_MEMO` minus one (a power of two minus one), set by the loader. A
/// read-only global.
#[unsafe(no_mangle)]
static FLOW_MEMO_MASK: u32 = 0;

/// `FLOW_MEMO_MASK` as loaded.
#[inline(always)]
pub fn flow_memo_mask() -> u32 {
    // SAFETY: a read-only global, set before load.
    unsafe { core::ptr::read_volatile(&FLOW_MEMO_MASK) }
}

/// Each CPU's memo meter (`lb_common::MemoMeter`): whether its memo is on, and how well it
/// answered in the current window. Not pinned, like the memo.
#[map]
pub static MEMO_METER: PerCpuArray<MemoMeter> = PerCpuArray::with_max_entries(1, 0);

/// Slot 0: the balancer's configuration. Written by user space.
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Slot 0: runtime settings (idle timeouts, flood threshold, encapsulation). Written by user
/// space.
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Per-VIP admission policy for new flows, by VIP index. Written by user space.
#[map]
pub static VIP_POLICY: Array<VipPolicy> = Array::with_max_entries(MAX_VIPS, 0);

/// Source prefixes per VIP (allow or deny), longest match wins. Written by user space.
#[map]
pub static PREFIXES_V4: LpmTrie<PrefixData4, u32> = LpmTrie::with_max_entries(PREFIX_ENTRIES, 0);
#[map]
pub static PREFIXES_V6: LpmTrie<PrefixData6, u32> = LpmTrie::with_max_entries(PREFIX_ENTRIES, 0);

/// Per-source new-flow limiter: (VIP, source /32 or /64) -> the bucket's theoretical arrival
/// time (coarse ns). Written here.
#[map]
pub static SRC_LIMIT: LruHashMap<SrcKey, u64> =
    LruHashMap::with_max_entries(SRC_LIMIT_ENTRIES, BPF_F_NO_COMMON_LRU);

/// The per-source first-seen filter (`lb_common::seen`): a source's first new flow is noted
/// here, and its bucket in `SRC_LIMIT` made only at its second. Written here.
#[map]
pub static SRC_SEEN: Array<u64> = Array::with_max_entries(SRC_SEEN_SLOTS, 0);

/// Per-VIP cap on new flows, per CPU: the VIP's theoretical arrival time on this CPU
/// (coarse ns). Written here.
#[map]
pub static VIP_CAP: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Slot 0, per CPU: this CPU's copy of the coarse clock and the jiffy it was taken in
/// (`conntrack::now_ns`). Written here.
#[map]
pub static CLOCK: PerCpuArray<ClockCopy> = PerCpuArray::with_max_entries(1, 0);

/// The coarse clock as read in one jiffy.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ClockCopy {
    /// `bpf_ktime_get_coarse_ns()`.
    pub ns: u64,
    /// `bpf_jiffies64()` when it was read.
    pub jiffies: u64,
}

/// Slot 0, per CPU: the flood meter (new flows inserted in the current window, and what the
/// flood mode did). Written here.
#[map]
pub static FLOOD: PerCpuArray<FloodMeter> = PerCpuArray::with_max_entries(1, 0);

/// Counters, per CPU. Each packet bumps exactly one of them: a forwarded packet its backend
/// slot's (`BACKEND_STATS`), a packet of a VIP that is not forwarded its VIP's reason
/// (`VIP_DROPS[vip * vip_stat::STRIDE + reason]`), anything else a global reason
/// (`GLOBAL_STATS`, `stat::*`). Written here, summed over CPUs by user space.
#[map]
pub static BACKEND_STATS: PerCpuArray<BackendCounter> =
    PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
#[map]
pub static VIP_DROPS: PerCpuArray<Counter> =
    PerCpuArray::with_max_entries(MAX_VIPS * vip_stat::STRIDE, 0);
#[map]
pub static GLOBAL_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::COUNT, 0);
