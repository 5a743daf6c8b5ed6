//! Classify (is this for a VIP?) and choose (which backend?).

use lb_common::{
    AddrKey, BACKEND_F_IN_USE, Backend, ConnEntry, FlowKey, NO_BACKEND, VIP_F_AFFINITY_SRC_IP,
    VipKey, VipMeta, stat, vip_filter_bit,
};
use lb_ebpf::hash;

use crate::maps::{BACKENDS, CONNTRACK, RINGS, VIP_ADDRS, VIP_FILTER, VIPS};

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

/// Whether the destination may be a VIP address (no false negatives).
#[inline(always)]
pub fn maybe_vip(flow: &FlowKey) -> bool {
    let bit = vip_filter_bit(&flow.dst);
    VIP_FILTER
        .get(bit >> 6)
        .is_some_and(|w| w & (1u64 << (bit & 63)) != 0)
}

/// The flow's backend from the connection table, while that entry is still valid:
/// (backend index, backend, VIP index).
#[inline(always)]
pub fn established(flow: &FlowKey) -> Option<(u32, Backend, u32)> {
    let entry = *unsafe { CONNTRACK.get(flow) }?;
    let b = BACKENDS.get(entry.backend)?;
    if b.flags & BACKEND_F_IN_USE == 0 || b.generation != entry.generation {
        return None;
    }
    crate::stats::global(stat::CT_HIT, 0);
    Some((entry.backend, *b, entry.vip))
}

/// Picks the flow's backend: its connection-table entry while that is still valid, else the
/// VIP's Maglev ring (and the choice is remembered). `Err` carries the drop reason.
#[inline(always)]
pub fn backend(flow: &FlowKey, vip: &VipMeta) -> Result<(u32, Backend), u32> {
    if let Some((index, b, _)) = established(flow) {
        return Ok((index, b));
    }
    choose(flow, vip)
}

/// A new flow: the VIP's Maglev ring decides, and the connection table remembers.
#[inline(always)]
pub fn choose(flow: &FlowKey, vip: &VipMeta) -> Result<(u32, Backend), u32> {
    crate::stats::global(stat::CT_MISS, 0);
    let h = if vip.flags & VIP_F_AFFINITY_SRC_IP != 0 {
        hash::src_hash(flow)
    } else {
        hash::flow_hash(flow)
    };
    if vip.ring_size == 0 {
        return Err(stat::DROP_NO_BACKEND);
    }
    let slot = vip.ring_off + h % vip.ring_size;
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
        vip: vip.index,
        _pad: 0,
    };
    // A full table evicts the least recently used entry; a failed insert only costs the
    // flow its stickiness, so the result is not checked.
    let _ = CONNTRACK.insert(flow, &entry, 0);
    crate::stats::new_flow(vip.index);
    Ok((index, *b))
}
