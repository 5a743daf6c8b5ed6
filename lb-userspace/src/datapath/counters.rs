//! The datapath's per-CPU counters, summed over CPUs for readers. A `Counters` has file
//! descriptors of its own, so status, lists and metrics read them without going through the
//! writer, and never wait for it.

use std::sync::Arc;

use aya::{
    Pod,
    maps::{IterableMap as _, Map, MapData, PerCpuArray, PerCpuValues},
    util::nr_cpus,
};
use lb_common::{Counter, stat};

use super::{DatapathError, map_err};

struct Handles {
    vip: PerCpuArray<MapData, Counter>,
    backend: PerCpuArray<MapData, Counter>,
    global: PerCpuArray<MapData, Counter>,
    vip_new_flows: PerCpuArray<MapData, u64>,
}

/// Read-only access to the counters; cheap to clone.
#[derive(Clone)]
pub struct Counters(Arc<Handles>);

/// A second handle on the map behind `m`.
fn reopen<V: Pod>(
    m: &PerCpuArray<MapData, V>,
    name: &'static str,
) -> Result<PerCpuArray<MapData, V>, DatapathError> {
    let id = m.map().info().map_err(map_err(name))?.id();
    let data = MapData::from_id(id).map_err(map_err(name))?;
    let map = Map::from_map_data(data).map_err(map_err(name))?;
    PerCpuArray::try_from(map).map_err(map_err(name))
}

impl Counters {
    pub(super) fn new(
        vip: &PerCpuArray<MapData, Counter>,
        backend: &PerCpuArray<MapData, Counter>,
        global: &PerCpuArray<MapData, Counter>,
        vip_new_flows: &PerCpuArray<MapData, u64>,
    ) -> Result<Self, DatapathError> {
        Ok(Self(Arc::new(Handles {
            vip: reopen(vip, "VIP_STATS")?,
            backend: reopen(backend, "BACKEND_STATS")?,
            global: reopen(global, "GLOBAL_STATS")?,
            vip_new_flows: reopen(vip_new_flows, "VIP_NEW_FLOWS")?,
        })))
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

    /// Packets and bytes of VIP index `index`.
    pub fn vip(&self, index: u32) -> Counter {
        Self::sum(&self.0.vip, index)
    }

    /// New flows of VIP index `index`.
    pub fn vip_new_flows(&self, index: u32) -> u64 {
        self.0
            .vip_new_flows
            .get(&index, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// Packets and bytes of backend slot `slot`.
    pub fn backend(&self, slot: u32) -> Counter {
        Self::sum(&self.0.backend, slot)
    }

    /// One global counter (`lb_common::stat`).
    pub fn global(&self, reason: u32) -> Counter {
        Self::sum(&self.0.global, reason)
    }

    /// The balancer's global counters by reason, with their names (the decap program's are
    /// left out).
    pub fn globals(&self) -> Vec<(&'static str, Counter)> {
        (0..stat::COUNT)
            .filter(|i| ![stat::DECAP_OK, stat::DECAP_PASS].contains(i))
            .map(|i| (stat::NAMES[i as usize], self.global(i)))
            .collect()
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
