//! Classify (is this for a VIP?) and choose (which backend, from the VIP's Maglev ring?).

use lb_common::{
    AddrKey, BACKEND_F_IN_USE, Backend, FlowKey, NO_BACKEND, VIP_F_AFFINITY_SRC_IP, VipKey,
    VipMeta, vip_filter_bit, vip_stat,
};
use lb_ebpf::hash;

use crate::{
    conntrack,
    maps::{BACKENDS, RINGS, VIP_ADDRS, VIP_FILTER, VIPS},
};

/// Whether the flow's destination address carries any VIP.
#[inline(always)]
pub fn is_vip_addr(flow: &FlowKey) -> bool {
    let key = AddrKey {
        addr: flow.dst,
        family: flow.family,
        proto: 0,
        _pad: [0; 2],
    };
    unsafe { VIP_ADDRS.get(key) }.is_some()
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
    if let Some(m) = unsafe { VIPS.get(key) } {
        return Some(*m);
    }
    key.port = 0;
    unsafe { VIPS.get(key) }.copied()
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
    unsafe { VIP_ADDRS.get(key) }.copied()
}

/// Whether the destination may be a VIP address (no false negatives).
#[inline(always)]
pub fn maybe_vip(flow: &FlowKey) -> bool {
    maybe_vip_addr(&flow.dst)
}

/// Whether `addr` may be a VIP address (no false negatives).
#[inline(always)]
pub fn maybe_vip_addr(addr: &[u32; 4]) -> bool {
    let bit = vip_filter_bit(addr);
    VIP_FILTER
        .get(bit >> 6)
        .is_some_and(|w| w & (1u64 << (bit & 63)) != 0)
}

/// The flow's backend for an ICMP error about it: its connection-table entry while that is
/// still valid, else the VIP's ring (nothing is inserted: an error starts no flow). `Err`
/// carries the drop reason (`vip_stat`). Also returns whether the ring chose.
#[inline(always)]
pub fn backend(flow: &FlowKey, vip: &VipMeta) -> Result<(u32, Backend, bool), u32> {
    if let Some(s) = conntrack::settings() {
        let index = conntrack::established_index(flow, s);
        if let Some(b) = BACKENDS.get(index) {
            return Ok((index, *b, false));
        }
    }
    choose(flow, vip).map(|(i, b)| (i, b, true))
}

/// A new flow: the VIP's Maglev ring decides. `Err` carries the drop reason (`vip_stat`).
#[inline(always)]
pub fn choose(flow: &FlowKey, vip: &VipMeta) -> Result<(u32, Backend), u32> {
    let h = if vip.flags & VIP_F_AFFINITY_SRC_IP != 0 {
        hash::src_hash(flow)
    } else {
        hash::flow_hash(flow)
    };
    if vip.ring_size == 0 {
        return Err(vip_stat::NO_BACKEND);
    }
    let slot = vip.ring_off + h % vip.ring_size;
    let Some(ring) = RINGS.get(vip.index) else {
        return Err(vip_stat::NO_BACKEND);
    };
    let index = match ring.get(slot) {
        Some(&i) if i != NO_BACKEND => i,
        _ => return Err(vip_stat::NO_BACKEND),
    };
    let Some(b) = BACKENDS.get(index) else {
        return Err(vip_stat::BAD_BACKEND);
    };
    if b.flags & BACKEND_F_IN_USE == 0 {
        return Err(vip_stat::BAD_BACKEND);
    }
    Ok((index, *b))
}
