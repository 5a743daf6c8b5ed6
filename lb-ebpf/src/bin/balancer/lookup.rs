//! Classify (is this for a VIP?) and choose (which backend?).

use aya_ebpf::helpers::bpf_ktime_get_ns;
use lb_common::{
    AddrKey, BACKEND_F_IN_USE, Backend, ConnEntry, FlowKey, NO_BACKEND, VIP_F_AFFINITY_SRC_IP,
    VipKey, VipMeta, stat,
};
use lb_ebpf::hash;

use crate::maps::{BACKENDS, CONNTRACK, RINGS, VIP_ADDRS, VIPS};

/// Whether the flow's destination address carries any VIP.
#[inline(always)]
pub fn is_vip_addr(flow: &FlowKey) -> bool {
    let key = AddrKey {
        addr: flow.dst,
        family: flow.family,
        proto: 0,
        _pad: [0; 2],
    };
    unsafe { VIP_ADDRS.get(&key) }.is_some()
}

/// The VIP of a TCP/UDP flow: (address, port, protocol), then the port-wildcard entry.
#[inline(always)]
pub fn vip(flow: &FlowKey) -> Option<VipMeta> {
    let mut key = VipKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        family: flow.family,
    };
    if let Some(m) = unsafe { VIPS.get(&key) } {
        return Some(*m);
    }
    key.port = 0;
    unsafe { VIPS.get(&key) }.copied()
}

/// The VIP that takes IPv4 fragments for the flow's address and protocol.
#[inline(always)]
pub fn fragment_vip(flow: &FlowKey) -> Option<VipMeta> {
    let key = AddrKey {
        addr: flow.dst,
        family: flow.family,
        proto: flow.proto,
        _pad: [0; 2],
    };
    unsafe { VIP_ADDRS.get(&key) }.copied()
}

/// Picks the flow's backend: its connection-table entry while that is still valid, else the
/// VIP's Maglev ring (and the choice is remembered). `Err` carries the drop reason.
#[inline(always)]
pub fn backend(flow: &FlowKey, vip: &VipMeta) -> Result<(u32, Backend), u32> {
    if let Some(entry) = unsafe { CONNTRACK.get(flow) } {
        let entry = *entry;
        if let Some(b) = BACKENDS.get(entry.backend) {
            if b.flags & BACKEND_F_IN_USE != 0 && b.generation == entry.generation {
                crate::stats::global(stat::CT_HIT, 0);
                return Ok((entry.backend, *b));
            }
        }
    }
    crate::stats::global(stat::CT_MISS, 0);
    let h = if vip.flags & VIP_F_AFFINITY_SRC_IP != 0 {
        hash::src_hash(flow)
    } else {
        hash::flow_hash(flow)
    };
    if vip.ring_size == 0 {
        return Err(stat::DROP_NO_BACKEND);
    }
    let slot = h % vip.ring_size;
    let Some(ring) = RINGS.get(vip.index) else {
        return Err(stat::DROP_NO_BACKEND);
    };
    let index = match ring.get(slot) {
        Some(&i) if i != NO_BACKEND => i,
        _ => return Err(stat::DROP_NO_BACKEND),
    };
    let Some(b) = BACKENDS.get(index) else {
        return Err(stat::ERR_BAD_BACKEND);
    };
    if b.flags & BACKEND_F_IN_USE == 0 {
        return Err(stat::ERR_BAD_BACKEND);
    }
    let entry = ConnEntry {
        backend: index,
        generation: b.generation,
        created_ns: unsafe { bpf_ktime_get_ns() },
    };
    // A full table evicts the least recently used entry; a failed insert only costs the
    // flow its stickiness, so the result is not checked.
    let _ = CONNTRACK.insert(flow, &entry, 0);
    crate::stats::new_flow(vip.index);
    Ok((index, *b))
}
