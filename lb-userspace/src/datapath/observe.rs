//! Reading the maps back: what the agent adopts at start, what `maglb verify` compares with
//! the state, and what tests check from the pins while (or after) an agent runs.

use std::{collections::BTreeMap, path::Path};

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::{
    AddrKey, Backend, MAX_BACKENDS, MAX_VIPS, VIP_FILTER_WORDS, VipKey, VipMeta,
    vip_table::VipBucket,
};

use super::{DatapathError, LAYOUT, map_err, rings::Rings, vip_table};
use crate::reconcile::Observed;

pub(super) fn observe(
    vips: &HashMap<MapData, VipKey, VipMeta>,
    table: &Array<MapData, VipBucket>,
    addrs: &HashMap<MapData, AddrKey, VipMeta>,
    backends: &Array<MapData, Backend>,
    filter: &Array<MapData, u64>,
    rings: &Rings,
) -> Result<Observed, DatapathError> {
    let vips: Vec<(VipKey, VipMeta)> = vips.iter().filter_map(Result::ok).collect();
    let slots = (0..MAX_BACKENDS)
        .filter_map(|i| Some((i, backends.get(&i, 0).ok()?)))
        .filter(|(_, b)| b.generation != 0)
        .collect();
    let sizes = rings.observe(MAX_VIPS);
    let mut tables = BTreeMap::new();
    for (_, meta) in &vips {
        if sizes.get(&meta.index) == Some(&meta.ring_size) {
            let t = rings.read(meta.index, meta.ring_off, meta.ring_size)?;
            tables.insert(meta.index, t);
        }
    }
    let (vip_table, vip_table_hides) = vip_table::shown(table, &vips);
    Ok(Observed {
        vips,
        vip_table,
        vip_table_hides,
        slots,
        rings: sizes,
        tables,
        addrs: addrs.iter().filter_map(Result::ok).collect(),
        filter: (0..VIP_FILTER_WORDS)
            .map(|i| filter.get(&i, 0).unwrap_or(0))
            .collect(),
    })
}

fn pinned(dir: &Path, name: &'static str) -> Result<Map, DatapathError> {
    let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
    Map::from_map_data(data).map_err(map_err(name))
}

/// What the maps pinned under `bpffs` hold, read without loading a program (an agent may be
/// running).
pub fn observe_pinned(bpffs: &Path) -> Result<Observed, DatapathError> {
    let dir = bpffs.join(LAYOUT);
    let vips = HashMap::try_from(pinned(&dir, "VIPS")?).map_err(map_err("VIPS"))?;
    let table = Array::try_from(pinned(&dir, "VIP_TABLE")?).map_err(map_err("VIP_TABLE"))?;
    let addrs = HashMap::try_from(pinned(&dir, "VIP_ADDRS")?).map_err(map_err("VIP_ADDRS"))?;
    let backends = Array::try_from(pinned(&dir, "BACKENDS")?).map_err(map_err("BACKENDS"))?;
    let filter = Array::try_from(pinned(&dir, "VIP_FILTER")?).map_err(map_err("VIP_FILTER"))?;
    let rings = Rings::open(|name| pinned(&dir, name))?;
    observe(&vips, &table, &addrs, &backends, &filter, &rings)
}
