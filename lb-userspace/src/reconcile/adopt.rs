//! Taking over maps that a previous agent wrote: what they hold is read back into a
//! [`Reconciler`], with repairs for what a killed agent can leave half done (a slot filled for
//! a VIP that was never published, two slots for one backend, an entry without its ring).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{AddrKey, BACKEND_F_IN_USE, Backend, MAX_BACKENDS, MAX_VIPS, VipKey, VipMeta};

use super::{Op, Placed, Pool, Reconciler, Slot, backend_entry, vip_id};
use crate::{addr, state::VipId};

/// What the maps hold, as read back.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    pub vips: Vec<(VipKey, VipMeta)>,
    /// What the VIP table shows (`lb_common::vip_table`): a copy of `vips`, but for keys of
    /// spilled buckets.
    pub vip_table: Vec<(VipKey, VipMeta)>,
    /// Keys of `vips` that the VIP table says are no VIP.
    pub vip_table_hides: Vec<VipKey>,
    /// Every backend slot ever used (generation other than 0), by index.
    pub slots: Vec<(u32, Backend)>,
    /// The table size of the ring map in each outer slot that has one (half the map).
    pub rings: BTreeMap<u32, u32>,
    /// The active table of each VIP index that has an entry.
    pub tables: BTreeMap<u32, Vec<u32>>,
    pub addrs: Vec<(AddrKey, VipMeta)>,
    pub filter: Vec<u64>,
}

impl Observed {
    /// The VIP (id and index) of each well-formed entry.
    pub fn vip_ids(&self) -> BTreeMap<u32, VipId> {
        self.vips
            .iter()
            .filter_map(|(k, m)| Some((m.index, vip_id(k)?)))
            .collect()
    }

    /// In-use slots, grouped by (VIP index, backend address), where a slot that a VIP's
    /// active table names belongs to that VIP whatever index it records (a VIP moved to a new
    /// index rewrites its slots' record only after its entry switched).
    pub fn slots_by_pair_named(&self) -> BTreeMap<(u32, IpAddr), Vec<(u32, Backend)>> {
        let named: BTreeMap<u32, u32> = self
            .tables
            .iter()
            .flat_map(|(index, t)| t.iter().map(move |s| (*s, *index)))
            .collect();
        let mut out: BTreeMap<(u32, IpAddr), Vec<(u32, Backend)>> = BTreeMap::new();
        for ((index, a), slots) in self.slots_by_pair() {
            for (i, b) in slots {
                let owner = named.get(&i).copied().unwrap_or(index);
                out.entry((owner, a)).or_default().push((i, b));
            }
        }
        out
    }

    /// In-use slots, grouped by (the VIP index they record, backend address).
    pub fn slots_by_pair(&self) -> BTreeMap<(u32, IpAddr), Vec<(u32, Backend)>> {
        let mut out: BTreeMap<(u32, IpAddr), Vec<(u32, Backend)>> = BTreeMap::new();
        for (i, b) in &self.slots {
            if b.flags & BACKEND_F_IN_USE != 0 {
                let a = addr::from_words(b.addr, b.family);
                out.entry((b.vip as u32, a)).or_default().push((*i, *b));
            }
        }
        out
    }
}

impl Reconciler {
    /// A reconciler for maps that hold `obs`, and the writes that repair what a killed agent
    /// left half done. Every adopted VIP is rewritten by the next plan.
    pub fn adopt(obs: &Observed) -> (Self, Vec<Op>) {
        let mut r = Reconciler::new();
        let mut repairs = Vec::new();
        for (key, meta) in &obs.vips {
            let sound = meta.index < MAX_VIPS
                && obs.rings.get(&meta.index) == Some(&meta.ring_size)
                && !r.vips.values().any(|p| p.meta.index == meta.index);
            match vip_id(key).filter(|_| sound) {
                Some(id) => {
                    r.vips.insert(
                        id,
                        Placed {
                            meta: *meta,
                            spec: None,
                            slots: BTreeMap::new(),
                            moved_from: None,
                        },
                    );
                }
                None => repairs.push(Op::DelVip { key: *key }),
            }
        }
        let mut owners = BTreeMap::new();
        for (i, b) in &obs.slots {
            r.generations.set(*i, b.generation);
            owners.insert(*i, (b.vip as u32, b.family));
        }
        r.owners = std::sync::Arc::new(owners);
        let by_index: BTreeMap<u32, VipId> =
            r.vips.iter().map(|(id, p)| (p.meta.index, *id)).collect();
        let mut kept = BTreeSet::new();
        for ((vip_index, a), mut slots) in obs.slots_by_pair_named() {
            let Some(id) = by_index.get(&vip_index) else {
                for (i, _) in slots {
                    r.retire_adopted(i, a, vip_index, &mut repairs);
                }
                continue;
            };
            // Keep the slot the active table names (or the lowest); retire the others.
            let named: BTreeSet<u32> = obs
                .tables
                .get(&vip_index)
                .map(|t| t.iter().copied().collect())
                .unwrap_or_default();
            slots.sort_by_key(|(i, _)| (!named.contains(i), *i));
            let (keep, b) = slots[0];
            for (i, _) in &slots[1..] {
                r.retire_adopted(*i, a, vip_index, &mut repairs);
            }
            if b.vip as u32 != vip_index {
                // A VIP moved to a new index was cut short before its slots recorded it.
                r.own(keep, vip_index, a);
                repairs.push(Op::SetBackend {
                    slot: keep,
                    backend: backend_entry(a, vip_index, b.generation, true),
                });
            }
            kept.insert(keep);
            r.vips.get_mut(id).expect("indexed").slots.insert(
                a,
                Slot {
                    index: keep,
                    generation: b.generation,
                    live: true,
                },
            );
        }
        r.vip_pool = Pool::with_used(MAX_VIPS, |i| by_index.contains_key(&i));
        r.slot_pool = Pool::with_used(MAX_BACKENDS, |i| kept.contains(&i));
        r.rings = obs.rings.clone();
        r.addrs = obs
            .addrs
            .iter()
            .map(|(k, m)| ((addr::from_words(k.addr, k.family), k.proto), *m))
            .collect();
        if obs.filter.len() == r.filter.len() {
            r.filter = obs.filter.clone();
        }
        r.resync = true;
        (r, repairs)
    }

    /// Retires an in-use slot that no adopted VIP keeps (the pools are built after).
    fn retire_adopted(&mut self, slot: u32, a: IpAddr, vip_index: u32, out: &mut Vec<Op>) {
        let generation = self.generations.bump(slot);
        self.own(slot, vip_index, a);
        out.push(Op::SetBackend {
            slot,
            backend: backend_entry(a, vip_index, generation, false),
        });
    }
}
