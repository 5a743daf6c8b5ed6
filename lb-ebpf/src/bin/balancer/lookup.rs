//! Classify (is this for a VIP?) and choose (which backend, from the VIP's Maglev ring?).

use core::ptr::{addr_of, read_volatile};

use lb_common::{
    AddrKey, BACKEND_F_IN_USE, Backend, FlowKey, NO_BACKEND, VIP_F_AFFINITY_SRC_IP, VipKey,
    VipMeta, ring_is_fixed, vip_filter_bit, vip_stat,
    vip_table::{Lookup, VIP_WAYS, vip_bucket, vip_check, vip_key_tail},
};
use lb_ebpf::hash;

use crate::{
    conntrack,
    maps::{BACKENDS, RINGS, RINGS_FIXED, VIP_ADDRS, VIP_FILTER, VIP_TABLE, VIPS},
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

/// The VIP of a new TCP/UDP flow: (address, port, protocol), then the port-wildcard entry.
/// The VIP table answers, unless it is unsure (a slot being rewritten, a spilled bucket):
/// then the `VIPS` hash map does.
#[inline(always)]
pub fn vip(flow: &FlowKey) -> Option<VipMeta> {
    let mut key = vip_key(flow);
    match table_vip(&key) {
        Lookup::Found(m) => return Some(m),
        Lookup::Absent => {
            key.port = 0;
            match table_vip(&key) {
                Lookup::Found(m) => return Some(m),
                Lookup::Absent => return None,
                Lookup::Unsure => key.port = flow.dport,
            }
        }
        Lookup::Unsure => {}
    }
    in_map(&mut key)
}

/// As [`vip`], in the `VIPS` hash map alone: for the ICMP error path, which is rare and whose
/// stack has no room for the table's scan.
#[inline(always)]
pub fn map_vip(flow: &FlowKey) -> Option<VipMeta> {
    in_map(&mut vip_key(flow))
}

#[inline(always)]
fn vip_key(flow: &FlowKey) -> VipKey {
    VipKey {
        addr: flow.dst,
        port: flow.dport,
        proto: flow.proto,
        family: flow.family,
    }
}

/// `key` in `VIPS`, then its port-wildcard entry.
#[inline(always)]
fn in_map(key: &mut VipKey) -> Option<VipMeta> {
    if let Some(m) = unsafe { VIPS.get(&*key) } {
        return Some(*m);
    }
    key.port = 0;
    unsafe { VIPS.get(&*key) }.copied()
}

/// What the VIP table says of `key` (`lb_common::vip_table::VipBucket::lookup`). Each word
/// is read once (volatile), so the meta returned is the one checked, whatever user space
/// writes meanwhile; the key's words are compared as they are read, so that no copy of the
/// slot takes stack (the new-flow path has none to spare).
#[inline(always)]
fn table_vip(key: &VipKey) -> Lookup {
    let Some(bucket) = VIP_TABLE.get_ptr(vip_bucket(key)) else {
        return Lookup::Unsure;
    };
    let tail = vip_key_tail(key);
    let mut i = 0;
    while i < VIP_WAYS {
        // SAFETY: `bucket` is a map value, valid for the program's run; `i` is in bounds, and
        // every pointer below is a field of its slot (`VipKey`'s tail is 4-aligned).
        unsafe {
            let slot = addr_of!((*bucket).slots[i]);
            let check = read_volatile(addr_of!((*slot).check));
            let k = addr_of!((*slot).key);
            if check != 0
                && read_volatile(addr_of!((*k).addr[0])) == key.addr[0]
                && read_volatile(addr_of!((*k).addr[1])) == key.addr[1]
                && read_volatile(addr_of!((*k).addr[2])) == key.addr[2]
                && read_volatile(addr_of!((*k).addr[3])) == key.addr[3]
                && read_volatile(addr_of!((*k).port).cast::<u32>()) == tail
            {
                let m = addr_of!((*slot).meta);
                let meta = VipMeta {
                    index: read_volatile(addr_of!((*m).index)),
                    flags: read_volatile(addr_of!((*m).flags)),
                    ring_size: read_volatile(addr_of!((*m).ring_size)),
                    ring_off: read_volatile(addr_of!((*m).ring_off)),
                };
                if vip_check(key, &meta) == check {
                    return Lookup::Found(meta);
                }
                return Lookup::Unsure;
            }
        }
        i += 1;
    }
    // SAFETY: as above.
    if unsafe { read_volatile(addr_of!((*bucket).spilled)) } != 0 {
        return Lookup::Unsure;
    }
    Lookup::Absent
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

/// Slot `slot` of VIP index `index`'s ring in `RINGS_FIXED`. Read with a volatile load, unlike
/// the `RINGS` path's plain one: with the two paths alike, LLVM merges their inner-map
/// lookups into one call whose map the verifier cannot know, and then inlines neither.
#[inline(always)]
fn fixed_ring_slot(index: u32, slot: u32) -> Option<u32> {
    let p = RINGS_FIXED.get(index)?.get_ptr(slot)?;
    // SAFETY: a map value, valid for the program's run.
    Some(unsafe { read_volatile(p) })
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
    let entry = if ring_is_fixed(vip.ring_size) {
        fixed_ring_slot(vip.index, slot)
    } else {
        RINGS.get(vip.index).and_then(|r| r.get(slot)).copied()
    };
    let index = match entry {
        Some(i) if i != NO_BACKEND => i,
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
