//! Whether the maps carry exactly what the desired state implies, slot for slot: the check
//! behind `maglb verify` and the tests that kill the agent at random moments.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{NO_BACKEND, VIP_F_AFFINITY_SRC_IP};

use super::{Observed, addr_key, filter_words, vip_id};
use crate::{
    addr, maglev,
    state::{Proto, VipId, VipSpec},
};

/// The differences between what the maps hold and `desired`, in words; empty when they
/// agree. Slot and VIP indices are the maps' own; what is compared is which backend
/// addresses they stand for.
pub fn verify(obs: &Observed, desired: &[VipSpec]) -> Vec<String> {
    let mut out = Vec::new();
    let ids = obs.vip_ids();
    let by_id: BTreeMap<VipId, u32> = ids.iter().map(|(i, id)| (*id, *i)).collect();
    if ids.len() != obs.vips.len() {
        out.push(format!(
            "{} VIP entries, {} of them well-formed with distinct indices",
            obs.vips.len(),
            ids.len()
        ));
    }
    let wanted: BTreeSet<VipId> = desired.iter().map(|d| d.id).collect();
    for id in by_id.keys().filter(|id| !wanted.contains(id)) {
        out.push(format!("VIP {id} is in the maps but not in the state"));
    }
    // By the index each slot records: after a whole plan the records are exact.
    let pairs = obs.slots_by_pair();
    for d in desired {
        match by_id.get(&d.id) {
            None => out.push(format!("VIP {} is in the state but not in the maps", d.id)),
            Some(&index) => check_vip(obs, d, index, &pairs, &mut out),
        }
    }
    for ((index, a), slots) in &pairs {
        let listed = ids
            .get(index)
            .and_then(|id| desired.iter().find(|d| d.id == *id))
            .is_some_and(|d| d.backends.iter().any(|b| b.addr == *a));
        if !listed {
            out.push(format!(
                "slot(s) {:?} in use for {a} of VIP index {index}, which the state does not list",
                slots.iter().map(|(i, _)| *i).collect::<Vec<_>>()
            ));
        }
    }
    check_addrs(obs, &by_id, &mut out);
    check_vip_table(obs, &mut out);
    out
}

/// The VIP table shows only what `VIPS` holds, with the same meta, and hides none of it (it
/// may leave a key of a spilled bucket out: the datapath then asks `VIPS`).
fn check_vip_table(obs: &Observed, out: &mut Vec<String>) {
    for (key, meta) in &obs.vip_table {
        if !obs.vips.iter().any(|(k, m)| k == key && m == meta) {
            out.push(format!(
                "the VIP table shows {key:?} as {meta:?}, which the VIP map does not hold"
            ));
        }
    }
    for key in &obs.vip_table_hides {
        out.push(format!(
            "the VIP table says {key:?} is no VIP, which the VIP map holds"
        ));
    }
}

fn check_vip(
    obs: &Observed,
    d: &VipSpec,
    index: u32,
    pairs: &BTreeMap<(u32, IpAddr), Vec<(u32, lb_common::Backend)>>,
    out: &mut Vec<String>,
) {
    let id = d.id;
    let (_, meta) = obs
        .vips
        .iter()
        .find(|(k, m)| m.index == index && vip_id(k) == Some(id))
        .expect("indexed from obs");
    let flags = if d.affinity_src_ip {
        VIP_F_AFFINITY_SRC_IP
    } else {
        0
    };
    if meta.flags != flags || meta.ring_size != d.ring_size {
        out.push(format!(
            "VIP {id}: entry has flags {} and ring size {}, the state wants {flags} and {}",
            meta.flags, meta.ring_size, d.ring_size
        ));
    }
    for b in &d.backends {
        let n = pairs.get(&(index, b.addr)).map_or(0, Vec::len);
        if n != 1 {
            out.push(format!(
                "VIP {id}: backend {} has {n} slots in use, not 1",
                b.addr
            ));
        }
    }
    let Some(table) = obs.tables.get(&index) else {
        out.push(format!("VIP {id}: no table"));
        return;
    };
    let addr_of: BTreeMap<u32, IpAddr> = obs
        .slots
        .iter()
        .filter(|(_, b)| b.vip as u32 == index && b.flags & lb_common::BACKEND_F_IN_USE != 0)
        .map(|(i, b)| (*i, addr::from_words(b.addr, b.family)))
        .collect();
    let have: Vec<Option<IpAddr>> = table
        .iter()
        .map(|s| {
            (*s != NO_BACKEND)
                .then(|| addr_of.get(s).copied())
                .flatten()
        })
        .collect();
    let entries: Vec<maglev::Entry> = d
        .backends
        .iter()
        .enumerate()
        .filter(|(_, b)| b.live && b.weight > 0)
        .map(|(i, b)| maglev::Entry {
            id: addr::bytes(b.addr),
            weight: b.weight,
            value: i as u32,
        })
        .collect();
    let want: Vec<Option<IpAddr>> = maglev::build(&entries, d.ring_size)
        .iter()
        .map(|v| (*v != NO_BACKEND).then(|| d.backends[*v as usize].addr))
        .collect();
    let differ = have.iter().zip(&want).filter(|(h, w)| h != w).count();
    if differ > 0 || have.len() != want.len() {
        out.push(format!(
            "VIP {id}: {differ} of {} table slots differ from the state's table",
            want.len()
        ));
    }
    // Live backends must keep their slot generation distinct from entries made before they
    // went down; that is the datapath's business, checked by the traffic tests.
}

/// The address-level entries and the filter agree with the VIP entries.
fn check_addrs(obs: &Observed, by_id: &BTreeMap<VipId, u32>, out: &mut Vec<String>) {
    let metas: BTreeMap<u32, lb_common::VipMeta> =
        obs.vips.iter().map(|(_, m)| (m.index, *m)).collect();
    let mut want = BTreeMap::new();
    for (id, index) in by_id {
        for proto in [0, Proto::Tcp.number(), Proto::Udp.number()] {
            if proto != 0 && id.proto.number() != proto {
                continue;
            }
            // The first VIP on the address (lowest port) answers for it.
            want.entry((id.addr, proto)).or_insert(metas[index]);
        }
    }
    let have: BTreeMap<(IpAddr, u8), lb_common::VipMeta> = obs
        .addrs
        .iter()
        .map(|(k, m)| ((addr::from_words(k.addr, k.family), k.proto), *m))
        .collect();
    if have != want {
        let keys: BTreeSet<_> = have.keys().chain(want.keys()).collect();
        for k in keys {
            if have.get(k) != want.get(k) {
                let key = addr_key(k.0, k.1);
                out.push(format!(
                    "address entry {} proto {}: maps {:?}, state implies {:?} ({key:?})",
                    k.0,
                    k.1,
                    have.get(k),
                    want.get(k)
                ));
            }
        }
    }
    let words = filter_words(by_id.keys().map(|id| &id.addr));
    if words != obs.filter {
        out.push("the VIP address filter differs from the VIP addresses".into());
    }
}
