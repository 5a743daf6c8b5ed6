//! The balancer's maps. User space (the loader, later the agent) writes all of them but the
//! connection table and the counters, which this program writes.

use aya_ebpf::{
    btf_maps,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    AddrKey, Backend, CONNTRACK_SIZE, Config, ConnEntry, Counter, DEFAULT_RING_SIZE, FlowKey,
    MAX_BACKENDS, MAX_VIPS, RING_MAP_FLAGS, VIP_FILTER_WORDS, VipKey, VipMeta, stat,
};

/// VIPs by (address, port, protocol); port 0 is the port-wildcard entry.
/// Written by user space, read here.
#[map]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

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

/// Bitmap of VIP addresses (`lb_common::vip_filter_bit`). Written by user space.
#[map]
pub static VIP_FILTER: Array<u64> = Array::with_max_entries(VIP_FILTER_WORDS, 0);

/// Backends by index. Written by user space.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Connection table: flow -> backend. Written here on a miss, read on every packet.
#[map]
pub static CONNTRACK: LruHashMap<FlowKey, ConnEntry> =
    LruHashMap::with_max_entries(CONNTRACK_SIZE, 0);

/// Slot 0: the balancer's configuration. Written by user space.
#[map]
pub static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Per-CPU counters per VIP index, per backend index, and global by reason (`stat::*`).
/// Written here, summed over CPUs by user space.
#[map]
pub static VIP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_VIPS, 0);
#[map]
pub static BACKEND_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);
#[map]
pub static GLOBAL_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::COUNT, 0);
/// Per-CPU count of new flows (connection-table misses given a backend) per VIP index.
#[map]
pub static VIP_NEW_FLOWS: PerCpuArray<u64> = PerCpuArray::with_max_entries(MAX_VIPS, 0);
