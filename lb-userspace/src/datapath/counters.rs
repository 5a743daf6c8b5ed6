//! The datapath's per-CPU counters, summed over CPUs for readers. Every packet bumps exactly
//! one counter in the datapath: a forwarded one its backend slot's `{packets, bytes,
//! new_flows}`, a dropped VIP packet its VIP's reason, anything else a global reason. VIP
//! totals, connection-table hits and misses and the encapsulation totals are derived here.
//!
//! A `Counters` has file descriptors of its own, so status, lists and metrics read without
//! going through the writer, and never wait for it.

use std::{collections::BTreeMap, sync::Arc};

use aya::{
    Pod,
    maps::{Array, IterableMap as _, Map, MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use lb_common::{
    BackendCounter, Counter, ENCAP_GUE, FAMILY_V4, FloodMeter, MAX_VIPS, Settings, stat, vip_stat,
};

use super::{DatapathError, map_err};

struct Handles {
    backend: PerCpuArray<MapData, BackendCounter>,
    vip_drops: PerCpuArray<MapData, Counter>,
    global: PerCpuArray<MapData, Counter>,
    flood: PerCpuArray<MapData, FloodMeter>,
    settings: Array<MapData, Settings>,
}

/// Read-only access to the counters; cheap to clone.
#[derive(Clone)]
pub struct Counters(Arc<Handles>);

/// Which VIP index and family each used backend slot counts for.
pub type Owners = BTreeMap<u32, (u32, u8)>;

/// What the flood mode did, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FloodStats {
    /// New flows forwarded without a connection-table entry because their CPU was under flood.
    pub not_inserted: u64,
    /// Flood-meter windows (about 134 ms each, per CPU) in which the threshold was reached.
    pub flood_windows: u64,
}

/// The backend counters of every used slot, read once, and their sums per VIP index.
#[derive(Clone, Debug, Default)]
pub struct Reading {
    pub slots: BTreeMap<u32, BackendCounter>,
    pub vips: BTreeMap<u32, BackendCounter>,
}

fn add(a: &mut BackendCounter, b: &BackendCounter) {
    a.packets += b.packets;
    a.bytes += b.bytes;
    a.new_flows += b.new_flows;
}

impl Reading {
    /// Packets, bytes and new flows of VIP index `index` (its slots, retired ones included
    /// until they are reused).
    pub fn vip(&self, index: u32) -> BackendCounter {
        self.vips.get(&index).copied().unwrap_or_default()
    }

    pub fn slot(&self, slot: u32) -> BackendCounter {
        self.slots.get(&slot).copied().unwrap_or_default()
    }
}

/// A second handle on the map behind `m`.
fn reopen<M: TryFrom<Map, Error = aya::maps::MapError>>(
    m: &MapData,
    name: &'static str,
) -> Result<M, DatapathError> {
    let id = m.info().map_err(map_err(name))?.id();
    let data = MapData::from_id(id).map_err(map_err(name))?;
    M::try_from(Map::from_map_data(data).map_err(map_err(name))?).map_err(map_err(name))
}

fn sum(map: &PerCpuArray<MapData, Counter>, index: u32) -> Counter {
    let mut total = Counter::default();
    if let Ok(values) = map.get(&index, 0) {
        for c in values.iter() {
            total.packets += c.packets;
            total.bytes += c.bytes;
        }
    }
    total
}

impl Counters {
    pub(super) fn new(
        backend: &PerCpuArray<MapData, BackendCounter>,
        vip_drops: &PerCpuArray<MapData, Counter>,
        global: &PerCpuArray<MapData, Counter>,
        flood: &MapData,
        settings: &Array<MapData, Settings>,
    ) -> Result<Self, DatapathError> {
        Ok(Self(Arc::new(Handles {
            backend: reopen(backend.map(), "BACKEND_STATS")?,
            vip_drops: reopen(vip_drops.map(), "VIP_DROPS")?,
            global: reopen(global.map(), "GLOBAL_STATS")?,
            flood: reopen(flood, "FLOOD")?,
            settings: reopen(settings.map(), "SETTINGS")?,
        })))
    }

    /// Backend slot `slot`'s counter, summed over CPUs.
    pub fn backend(&self, slot: u32) -> BackendCounter {
        let mut total = BackendCounter::default();
        if let Ok(values) = self.0.backend.get(&slot, 0) {
            for c in values.iter() {
                add(&mut total, c);
            }
        }
        total
    }

    /// Every used slot's counter, and the sums per VIP index.
    pub fn read(&self, owners: &Owners) -> Reading {
        let mut r = Reading::default();
        for (&slot, &(vip, _)) in owners {
            let c = self.backend(slot);
            add(r.vips.entry(vip).or_default(), &c);
            r.slots.insert(slot, c);
        }
        r
    }

    /// Packets of VIP index `index` that were not forwarded, by reason (`drop_no_backend`,
    /// `drop_src_rate`, ...).
    pub fn vip_drops(&self, index: u32) -> Vec<(&'static str, Counter)> {
        (0..vip_stat::COUNT)
            .map(|r| {
                (
                    stat::NAMES[vip_stat::GLOBAL[r as usize] as usize],
                    sum(&self.0.vip_drops, index * vip_stat::STRIDE + r),
                )
            })
            .collect()
    }

    /// The balancer's global counters by reason, with their names (the decap program's are
    /// left out). `tx_encap`, `conntrack_hit` and `conntrack_miss` come from the backend
    /// counters in `reading` (`tx_encap` bytes include the outer headers of the encapsulation
    /// in force now); the per-VIP reasons are summed over every VIP index.
    pub fn globals(&self, reading: &Reading, owners: &Owners) -> Vec<(&'static str, Counter)> {
        let gue = self
            .0
            .settings
            .get(&0, 0)
            .is_ok_and(|s| s.encap == ENCAP_GUE);
        let (mut tx, mut hit, mut miss) = (Counter::default(), 0, 0);
        for (slot, c) in &reading.slots {
            let family = owners.get(slot).map_or(FAMILY_V4, |o| o.1);
            let outer = if family == FAMILY_V4 { 20 } else { 40 } + if gue { 8 } else { 0 };
            tx.packets += c.packets;
            tx.bytes += c.bytes + c.packets * outer;
            hit += c.packets - c.new_flows.min(c.packets);
            miss += c.new_flows;
        }
        let mut per_vip = [Counter::default(); vip_stat::COUNT as usize];
        for index in 0..MAX_VIPS {
            for (r, total) in per_vip.iter_mut().enumerate() {
                let c = sum(&self.0.vip_drops, index * vip_stat::STRIDE + r as u32);
                total.packets += c.packets;
                total.bytes += c.bytes;
            }
        }
        (0..stat::COUNT)
            .filter(|i| ![stat::DECAP_OK, stat::DECAP_PASS].contains(i))
            .map(|i| {
                let c = match i {
                    stat::TX_ENCAP => tx,
                    stat::CT_HIT => Counter {
                        packets: hit,
                        bytes: 0,
                    },
                    stat::CT_MISS => Counter {
                        packets: miss,
                        bytes: 0,
                    },
                    _ => match vip_stat::GLOBAL.iter().position(|&g| g == i) {
                        Some(r) => per_vip[r],
                        None => sum(&self.0.global, i),
                    },
                };
                (stat::NAMES[i as usize], c)
            })
            .collect()
    }

    /// One global counter that the datapath counts itself (not a derived one).
    pub fn global(&self, reason: u32) -> Counter {
        sum(&self.0.global, reason)
    }

    /// What the flood mode did, summed over CPUs.
    pub fn flood(&self) -> FloodStats {
        let mut f = FloodStats::default();
        if let Ok(values) = self.0.flood.get(&0, 0) {
            for m in values.iter() {
                f.not_inserted += m.not_inserted;
                f.flood_windows += m.flood_windows;
            }
        }
        f
    }
}

/// Sets entry `index` of a per-CPU array to zero on every CPU.
pub(super) fn zero<V: Pod + Default>(
    map: &mut PerCpuArray<MapData, V>,
    index: u32,
    name: &'static str,
) -> Result<(), DatapathError> {
    let cpus = nr_cpus().map_err(|(_, e)| DatapathError::Map {
        map: name,
        source: aya::maps::MapError::IoError(e),
    })?;
    let zeros =
        PerCpuValues::try_from(vec![V::default(); cpus]).map_err(|e| DatapathError::Map {
            map: name,
            source: aya::maps::MapError::IoError(e),
        })?;
    map.set(index, zeros, 0).map_err(map_err(name))
}
