//! From the desired VIPs to the writes that make the maps carry them. Pure: this decides
//! indices, tables and the order of writes; [`crate::datapath`] carries them out.
//!
//! The order keeps every packet safe while a plan is written: backend slots are filled before
//! a table points at them, a table is written into the inactive half of its VIP's ring map
//! before the VIP's entry switches to it, and slots are retired only after no active table
//! names them.

mod adopt;
mod pool;
#[cfg(test)]
mod tests;
mod verify;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use lb_common::{
    AddrKey, BACKEND_F_IN_USE, Backend, FAMILY_V4, FAMILY_V6, MAX_BACKENDS, MAX_VIPS,
    VIP_F_AFFINITY_SRC_IP, VIP_FILTER_WORDS, VipKey, VipMeta,
};

pub use self::{
    adopt::Observed,
    pool::{Generations, Pool},
    verify::verify,
};
use crate::{
    addr, maglev,
    state::{Policy, Proto, VipId, VipSpec},
};

/// One write to the datapath. A plan lists them in the order they must happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A VIP index handed out again starts its counters at zero.
    ZeroVipCounters(u32),
    /// So does a backend slot.
    ZeroSlotCounters(u32),
    SetBackend {
        slot: u32,
        backend: Backend,
    },
    /// VIP index `index` gets a new ring map of two tables of `ring_size` slots (a new index,
    /// or a new ring size). The map is filled by the `WriteTable` that follows, and only then
    /// installed.
    NewRing {
        index: u32,
        ring_size: u32,
    },
    /// The new ring map of VIP index `index` takes its slot in the outer map.
    InstallRing {
        index: u32,
    },
    /// The Maglev table of `job` goes into the half of VIP index `index`'s ring map that
    /// starts at `offset`. The table is built where it is written, so that a plan of many
    /// VIPs never holds all their tables at once.
    WriteTable {
        index: u32,
        offset: u32,
        job: maglev::Job,
    },
    /// VIP index `index`'s limits on new flows (rate limits, source prefixes).
    SetPolicy {
        index: u32,
        policy: Policy,
    },
    SetVip {
        key: VipKey,
        meta: VipMeta,
    },
    DelVip {
        key: VipKey,
    },
    SetAddr {
        key: AddrKey,
        meta: VipMeta,
    },
    DelAddr {
        key: AddrKey,
    },
    /// The whole VIP address filter (the datapath writes the words that changed).
    SetFilter(Vec<u64>),
}

/// Too many VIPs or backends for the maps: nothing was planned.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Exhausted {
    #[error("too many VIPs: {0} wanted, the datapath holds {MAX_VIPS}")]
    Vips(usize),
    #[error("too many backends: {0} VIP-backend pairs wanted, the datapath holds {MAX_BACKENDS}")]
    Slots(usize),
}

/// A backend slot of a placed VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    pub index: u32,
    pub generation: u32,
    /// It may keep its flows (up, or drained); false: down or disabled, its flows moved.
    pub live: bool,
}

/// A VIP the maps carry.
#[derive(Clone, Debug)]
struct Placed {
    meta: VipMeta,
    /// What its active table was built from; `None` after adoption, so that the first plan
    /// rewrites it.
    spec: Option<VipSpec>,
    slots: BTreeMap<IpAddr, Slot>,
    /// The index it leaves in this plan (a new ring size moves a VIP to a new index, so that
    /// its old table stays intact until its entry switches).
    moved_from: Option<u32>,
}

/// What the maps hold, and the free indices.
#[derive(Clone, Debug)]
pub struct Reconciler {
    vips: BTreeMap<VipId, Placed>,
    vip_pool: Pool,
    slot_pool: Pool,
    generations: Generations,
    /// The ring map in each VIP index's outer slot: its table size. Maps of deleted VIPs stay
    /// for the next VIP that gets the index.
    rings: BTreeMap<u32, u32>,
    /// What `VIP_ADDRS` holds.
    addrs: BTreeMap<(IpAddr, u8), VipMeta>,
    filter: Vec<u64>,
    /// After adoption: the next plan checks every address entry, not only those of the VIPs
    /// it changes.
    resync: bool,
    /// The VIP index and family each used slot counts for (in use, or retired and not yet
    /// reused): a VIP's totals are the sum of its slots' counters.
    owners: Arc<BTreeMap<u32, (u32, u8)>>,
}

impl Default for Reconciler {
    fn default() -> Self {
        Self::new()
    }
}

/// The datapath key of a VIP.
pub fn vip_key(id: &VipId) -> VipKey {
    let (words, family) = addr::to_words(id.addr);
    VipKey {
        addr: words,
        port: id.port.to_be(),
        proto: id.proto.number(),
        family,
    }
}

/// The VIP of a datapath key, if the key is one maglb writes.
pub fn vip_id(key: &VipKey) -> Option<VipId> {
    Some(VipId {
        addr: addr::from_words(key.addr, key.family),
        port: u16::from_be(key.port),
        proto: Proto::from_number(key.proto)?,
    })
}

/// The address-level key: `proto` 0 marks "this address is a VIP".
pub fn addr_key(a: IpAddr, proto: u8) -> AddrKey {
    let (words, family) = addr::to_words(a);
    AddrKey {
        addr: words,
        family,
        proto,
        _pad: [0; 2],
    }
}

/// The backend slot entry for `addr` of the VIP at `vip_index`.
pub fn backend_entry(addr: IpAddr, vip_index: u32, generation: u32, in_use: bool) -> Backend {
    let (words, family) = addr::to_words(addr);
    Backend {
        addr: words,
        family,
        flags: if in_use { BACKEND_F_IN_USE } else { 0 },
        vip: vip_index as u16,
        generation,
    }
}

fn fresh_meta(index: u32) -> VipMeta {
    VipMeta {
        index,
        flags: 0,
        ring_size: 0,
        ring_off: 0,
    }
}

/// The VIP filter words for a set of VIP addresses.
pub fn filter_words<'a>(addrs: impl Iterator<Item = &'a IpAddr>) -> Vec<u64> {
    let mut words = vec![0u64; VIP_FILTER_WORDS as usize];
    for a in addrs {
        let bit = lb_common::vip_filter_bit(&addr::to_words(*a).0);
        words[(bit >> 6) as usize] |= 1 << (bit & 63);
    }
    words
}

/// The parts of a plan, concatenated in this order.
#[derive(Default)]
struct Phases {
    prepare: Vec<Op>,
    tables: Vec<Op>,
    install: Vec<Op>,
    switch: Vec<Op>,
    retire: Vec<Op>,
}

impl Reconciler {
    /// Empty maps.
    pub fn new() -> Self {
        Self {
            vips: BTreeMap::new(),
            vip_pool: Pool::new(MAX_VIPS),
            slot_pool: Pool::new(MAX_BACKENDS),
            generations: Generations::new(MAX_BACKENDS),
            rings: BTreeMap::new(),
            addrs: BTreeMap::new(),
            filter: vec![0; VIP_FILTER_WORDS as usize],
            resync: false,
            owners: Arc::default(),
        }
    }

    /// The VIP index and family each used slot counts for.
    pub fn owners(&self) -> Arc<BTreeMap<u32, (u32, u8)>> {
        self.owners.clone()
    }

    fn own(&mut self, slot: u32, vip_index: u32, addr: IpAddr) {
        let family = if addr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
        if self.owners.get(&slot) != Some(&(vip_index, family)) {
            Arc::make_mut(&mut self.owners).insert(slot, (vip_index, family));
        }
    }

    /// The VIP index of a placed VIP (for its counters).
    pub fn vip_index(&self, id: &VipId) -> Option<u32> {
        self.vips.get(id).map(|p| p.meta.index)
    }

    /// The slot of a backend of a placed VIP (for its counters).
    pub fn slot(&self, id: &VipId, addr: &IpAddr) -> Option<Slot> {
        self.vips.get(id)?.slots.get(addr).copied()
    }

    /// Every placed VIP with its index, and its backends with their slots.
    pub fn placements(&self) -> impl Iterator<Item = (VipId, u32, &BTreeMap<IpAddr, Slot>)> {
        self.vips
            .iter()
            .map(|(id, p)| (*id, p.meta.index, &p.slots))
    }

    /// Backend slots in use.
    pub fn slots_in_use(&self) -> usize {
        self.slot_pool.in_use()
    }

    /// The writes that make the maps carry exactly `desired` (each spec validated), changing
    /// only what differs. Nothing is planned, and nothing changes here, when the maps cannot
    /// hold `desired`.
    pub fn plan(&mut self, desired: &[VipSpec]) -> Result<Vec<Op>, Exhausted> {
        self.check_capacity(desired)?;
        let mut ph = Phases::default();
        let wanted: BTreeSet<VipId> = desired.iter().map(|d| d.id).collect();
        let gone: Vec<VipId> = self
            .vips
            .keys()
            .filter(|id| !wanted.contains(id))
            .copied()
            .collect();
        let mut touched: BTreeSet<IpAddr> = BTreeSet::new();
        if std::mem::take(&mut self.resync) {
            touched.extend(self.addrs.keys().map(|(a, _)| *a));
            touched.extend(self.vips.keys().map(|id| id.addr));
        }
        for id in gone {
            self.remove(&id, &mut ph);
            touched.insert(id.addr);
        }
        let changed: Vec<&VipSpec> = desired
            .iter()
            .filter(|d| {
                self.vips
                    .get(&d.id)
                    .is_none_or(|p| p.spec.as_ref() != Some(*d))
            })
            .collect();
        for spec in changed {
            if self.repolicy(spec, &mut ph) {
                continue;
            }
            let job = self.place(spec, &mut ph);
            self.switch_table(spec, job, &mut ph);
            touched.insert(spec.id.addr);
        }
        for a in touched {
            self.sync_addr(a, &mut ph.switch);
        }
        self.sync_filter(&mut ph.switch);
        let mut ops = ph.prepare;
        ops.append(&mut ph.tables);
        ops.append(&mut ph.install);
        ops.append(&mut ph.switch);
        ops.append(&mut ph.retire);
        Ok(ops)
    }

    /// Whether the maps can hold `desired` (what `plan` checks first).
    pub fn check_capacity(&self, desired: &[VipSpec]) -> Result<(), Exhausted> {
        if desired.len() > MAX_VIPS as usize {
            return Err(Exhausted::Vips(desired.len()));
        }
        // Slots are freed before new ones are taken only across plans, so count what this
        // plan holds at its peak: what stays, plus what is new.
        let mut peak = self.slot_pool.in_use();
        for d in desired {
            let have = self.vips.get(&d.id);
            peak += d
                .backends
                .iter()
                .filter(|b| have.is_none_or(|p| !p.slots.contains_key(&b.addr)))
                .count();
        }
        if peak > MAX_BACKENDS as usize {
            let pairs: usize = desired.iter().map(|d| d.backends.len()).sum();
            return Err(Exhausted::Slots(pairs.max(peak)));
        }
        Ok(())
    }

    /// A VIP whose table stays the same and whose policy changed: only the policy is
    /// written. True if that was all.
    fn repolicy(&mut self, spec: &VipSpec, ph: &mut Phases) -> bool {
        let Some(p) = self.vips.get_mut(&spec.id) else {
            return false;
        };
        if !p.spec.as_ref().is_some_and(|old| old.same_table(spec)) {
            return false;
        }
        ph.prepare.push(Op::SetPolicy {
            index: p.meta.index,
            policy: spec.policy.clone(),
        });
        p.spec = Some(spec.clone());
        true
    }

    /// Removes a VIP: its entry goes, then its slots are retired and its index freed.
    fn remove(&mut self, id: &VipId, ph: &mut Phases) {
        let p = self.vips.remove(id).expect("caller listed it");
        ph.switch.push(Op::DelVip { key: vip_key(id) });
        for (addr, slot) in p.slots {
            self.retire(addr, p.meta.index, slot, &mut ph.retire);
        }
        self.vip_pool.give_back(p.meta.index);
    }

    /// Marks a slot unused: its connection-table entries stop being honoured (a new
    /// generation), and the slot goes back to the pool.
    fn retire(&mut self, addr: IpAddr, vip_index: u32, slot: Slot, out: &mut Vec<Op>) {
        let generation = self.generations.bump(slot.index);
        self.own(slot.index, vip_index, addr);
        out.push(Op::SetBackend {
            slot: slot.index,
            backend: backend_entry(addr, vip_index, generation, false),
        });
        self.slot_pool.give_back(slot.index);
    }

    /// A free VIP index, handed out: its counters restart, and the retired slots of the VIP
    /// that had it no longer count for it.
    fn new_index(&mut self, ph: &mut Phases) -> u32 {
        let index = self.vip_pool.take().expect("capacity checked");
        ph.prepare.push(Op::ZeroVipCounters(index));
        if self.owners.values().any(|o| o.0 == index) {
            Arc::make_mut(&mut self.owners).retain(|_, o| o.0 != index);
        }
        index
    }

    /// Gives a VIP its index and its backends their slots (writing new and changed slots),
    /// retires the slots of backends it no longer lists, and returns its table's Maglev
    /// input.
    fn place(&mut self, spec: &VipSpec, ph: &mut Phases) -> maglev::Job {
        let placed = self
            .vips
            .get(&spec.id)
            .map(|p| (p.meta.index, p.meta.ring_size));
        let index = match placed {
            Some((index, size)) if size == spec.ring_size || size == 0 => index,
            // A new ring size: a new index (its counters restart), a new ring map there, and
            // the old index is freed once the entry has switched.
            Some((old, _)) => {
                let index = self.new_index(ph);
                let p = self.vips.get_mut(&spec.id).expect("placed");
                p.moved_from = Some(old);
                p.meta = fresh_meta(index);
                index
            }
            None => {
                let index = self.new_index(ph);
                self.vips.insert(
                    spec.id,
                    Placed {
                        meta: fresh_meta(index),
                        spec: None,
                        slots: BTreeMap::new(),
                        moved_from: None,
                    },
                );
                index
            }
        };
        // Written with every table change: a new or moved index, and adopted VIPs, get theirs.
        ph.prepare.push(Op::SetPolicy {
            index,
            policy: spec.policy.clone(),
        });
        let mut slots = std::mem::take(&mut self.vips.get_mut(&spec.id).expect("placed").slots);
        let listed: BTreeSet<IpAddr> = spec.backends.iter().map(|b| b.addr).collect();
        let dropped: Vec<IpAddr> = slots
            .keys()
            .filter(|a| !listed.contains(a))
            .copied()
            .collect();
        for a in dropped {
            let slot = slots.remove(&a).expect("listed");
            self.retire(a, index, slot, &mut ph.retire);
        }
        let mut entries = Vec::new();
        for b in &spec.backends {
            let slot = self.slot_for(index, b.addr, b.live, slots.get(&b.addr).copied(), ph);
            slots.insert(b.addr, slot);
            if b.live && b.weight > 0 {
                entries.push(maglev::Entry {
                    id: addr::bytes(b.addr),
                    weight: b.weight,
                    value: slot.index,
                });
            }
        }
        self.vips.get_mut(&spec.id).expect("placed").slots = slots;
        maglev::Job {
            entries,
            size: spec.ring_size,
        }
    }

    /// The slot of one backend: a new one (fresh generation, zeroed counters), or the one it
    /// has, with a new generation when it stops being live (its flows move).
    fn slot_for(
        &mut self,
        vip_index: u32,
        addr: IpAddr,
        live: bool,
        old: Option<Slot>,
        ph: &mut Phases,
    ) -> Slot {
        let slot = match old {
            Some(s) if s.live && !live => Slot {
                generation: self.generations.bump(s.index),
                live,
                ..s
            },
            Some(s) => Slot { live, ..s },
            None => {
                let index = self.slot_pool.take().expect("capacity checked");
                ph.prepare.push(Op::ZeroSlotCounters(index));
                Slot {
                    index,
                    generation: self.generations.bump(index),
                    live,
                }
            }
        };
        if old.is_none_or(|o| o.generation != slot.generation) {
            self.own(slot.index, vip_index, addr);
            ph.prepare.push(Op::SetBackend {
                slot: slot.index,
                backend: backend_entry(addr, vip_index, slot.generation, true),
            });
        }
        slot
    }

    /// Writes a VIP's new table into the inactive half of its ring map (a new map when it has
    /// none of that size) and switches its entry to that half.
    fn switch_table(&mut self, spec: &VipSpec, job: maglev::Job, ph: &mut Phases) {
        let p = self.vips.get_mut(&spec.id).expect("placed");
        let index = p.meta.index;
        let size = spec.ring_size;
        // A ring map of another size is only ever replaced at an index no entry names (a new
        // VIP, or one moved to a new index for its new size).
        let new_map = self.rings.get(&index) != Some(&size);
        let offset = if new_map {
            ph.tables.push(Op::NewRing {
                index,
                ring_size: size,
            });
            self.rings.insert(index, size);
            0
        } else if p.meta.ring_size == size && p.meta.ring_off == 0 {
            size
        } else {
            0
        };
        ph.tables.push(Op::WriteTable { index, offset, job });
        if new_map {
            ph.install.push(Op::InstallRing { index });
        }
        p.meta = VipMeta {
            index,
            flags: if spec.affinity_src_ip {
                VIP_F_AFFINITY_SRC_IP
            } else {
                0
            },
            ring_size: size,
            ring_off: offset,
        };
        p.spec = Some(spec.clone());
        ph.switch.push(Op::SetVip {
            key: vip_key(&spec.id),
            meta: p.meta,
        });
        if let Some(old) = p.moved_from.take() {
            // The slots record their VIP's index (for adoption); the datapath does not read it.
            let moved: Vec<(IpAddr, u32)> = p.slots.iter().map(|(a, s)| (*a, s.index)).collect();
            for (a, slot) in &p.slots {
                ph.retire.push(Op::SetBackend {
                    slot: slot.index,
                    backend: backend_entry(*a, index, slot.generation, true),
                });
            }
            self.vip_pool.give_back(old);
            for (a, slot) in moved {
                self.own(slot, index, a);
            }
        }
    }

    /// Rewrites the address-level entries of `a`: "is a VIP" (proto 0), and per protocol the
    /// VIP that takes fragments and ICMP errors (the port-wildcard VIP if any, else the lowest
    /// port). Only entries that differ are written.
    fn sync_addr(&mut self, a: IpAddr, out: &mut Vec<Op>) {
        // BTreeMap order: by address, then port, so port 0 (wildcard) comes first.
        let on_addr: Vec<(&VipId, &Placed)> =
            self.vips.iter().filter(|(id, _)| id.addr == a).collect();
        let want = |proto: u8| -> Option<VipMeta> {
            on_addr
                .iter()
                .find(|(id, _)| proto == 0 || id.proto.number() == proto)
                .map(|(_, p)| p.meta)
        };
        for proto in [0, Proto::Tcp.number(), Proto::Udp.number()] {
            let (have, want) = (self.addrs.get(&(a, proto)).copied(), want(proto));
            if have == want {
                continue;
            }
            match want {
                Some(meta) => {
                    out.push(Op::SetAddr {
                        key: addr_key(a, proto),
                        meta,
                    });
                    self.addrs.insert((a, proto), meta);
                }
                None => {
                    out.push(Op::DelAddr {
                        key: addr_key(a, proto),
                    });
                    self.addrs.remove(&(a, proto));
                }
            }
        }
    }

    fn sync_filter(&mut self, out: &mut Vec<Op>) {
        let words = filter_words(self.vips.keys().map(|id| &id.addr));
        if words != self.filter {
            out.push(Op::SetFilter(words.clone()));
            self.filter = words;
        }
    }
}
