//! The VIP table (`lb_common::vip_table`): a copy of the `VIPS` hash map that the datapath
//! reads without a call. This process keeps the buckets as it wrote them and writes a bucket
//! whole (one update) when one of its keys changes. A key goes into `VIPS` before the table
//! and leaves the table before `VIPS`; it never moves to another slot (a reader that met it in
//! neither would take the key for no VIP); and a spilled bucket stays spilled (a reader could
//! otherwise see the mark gone before the key that had not fit). Whenever the maps are opened
//! (fresh, adopted after a crash between two writes, or migrated), the table is brought in
//! line with `VIPS`.

use std::collections::BTreeMap;

use aya::maps::{Array, MapData};
use lb_common::{
    VipKey, VipMeta,
    vip_table::{Lookup, VIP_BUCKETS, VipBucket, VipSlot, vip_bucket, vip_check, vip_key_eq},
};

use super::{DatapathError, map_err};

pub struct VipTable {
    map: Array<MapData, VipBucket>,
    /// What each bucket of the map holds (this process wrote all of them).
    buckets: Vec<VipBucket>,
}

impl VipTable {
    /// Takes the table over (as the map holds it) and makes it show `vips`.
    pub fn open(
        map: Array<MapData, VipBucket>,
        vips: impl IntoIterator<Item = (VipKey, VipMeta)>,
    ) -> Result<Self, DatapathError> {
        let buckets = (0..VIP_BUCKETS)
            .map(|i| map.get(&i, 0))
            .collect::<Result<Vec<_>, _>>()
            .map_err(map_err("VIP_TABLE"))?;
        let mut t = Self { map, buckets };
        t.fill(vips)?;
        Ok(t)
    }

    /// Makes the table show `vips` and nothing else, writing the buckets that change: slots
    /// of other keys (or half written) are emptied, keys it holds keep their slots, and the
    /// others take free ones.
    pub fn fill(
        &mut self,
        vips: impl IntoIterator<Item = (VipKey, VipMeta)>,
    ) -> Result<(), DatapathError> {
        let mut wanted: BTreeMap<u32, Vec<(VipKey, VipMeta)>> = BTreeMap::new();
        for (key, meta) in vips {
            wanted
                .entry(vip_bucket(&key))
                .or_default()
                .push((key, meta));
        }
        for i in 0..self.buckets.len() {
            let keys = wanted.get(&(i as u32)).map_or(&[][..], Vec::as_slice);
            let mut b = self.buckets[i];
            for s in &mut b.slots {
                let kept = keys.iter().any(|(k, _)| vip_key_eq(k, &s.key));
                if s.check != 0 && (!kept || s.check != vip_check(&s.key, &s.meta)) {
                    *s = VipSlot::default();
                }
            }
            for (key, meta) in keys {
                b.set(*key, *meta);
            }
            if b != self.buckets[i] {
                self.write(i, b)?;
            }
        }
        Ok(())
    }

    pub fn map(&self) -> &Array<MapData, VipBucket> {
        &self.map
    }

    /// Empties every bucket and marks it spilled: the datapath then finds every VIP in
    /// `VIPS` (benches and tests of that path). The marks stay (see the module's doc).
    pub fn spill_all(&mut self) -> Result<(), DatapathError> {
        let spilled = VipBucket {
            spilled: 1,
            ..VipBucket::default()
        };
        for i in 0..self.buckets.len() {
            if self.buckets[i] != spilled {
                self.write(i, spilled)?;
            }
        }
        Ok(())
    }

    /// Shows `key` with `meta` (after `VIPS` has it), unless its bucket is full.
    pub fn set(&mut self, key: VipKey, meta: VipMeta) -> Result<(), DatapathError> {
        let i = vip_bucket(&key) as usize;
        let mut b = self.buckets[i];
        b.set(key, meta);
        if b != self.buckets[i] {
            self.write(i, b)?;
        }
        Ok(())
    }

    /// Stops showing `key` (before `VIPS` lets it go).
    pub fn remove(&mut self, key: &VipKey) -> Result<(), DatapathError> {
        let i = vip_bucket(key) as usize;
        let mut b = self.buckets[i];
        if b.remove(key) {
            self.write(i, b)?;
        }
        Ok(())
    }

    fn write(&mut self, i: usize, b: VipBucket) -> Result<(), DatapathError> {
        self.map.set(i as u32, b, 0).map_err(map_err("VIP_TABLE"))?;
        self.buckets[i] = b;
        Ok(())
    }
}

/// What a table says against `vips`: the VIPs it shows (slots whose check word matches, as
/// the datapath reads them), and the keys of `vips` it says are no VIP.
pub(super) fn shown(
    map: &Array<MapData, VipBucket>,
    vips: &[(VipKey, VipMeta)],
) -> (Vec<(VipKey, VipMeta)>, Vec<VipKey>) {
    let buckets: Vec<VipBucket> = (0..VIP_BUCKETS)
        .map(|i| map.get(&i, 0).unwrap_or_default())
        .collect();
    let shows = buckets
        .iter()
        .flat_map(|b| b.slots.iter().filter_map(|s| Some((s.key, b.get(&s.key)?))))
        .collect();
    let hides = vips
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| buckets[vip_bucket(k) as usize].lookup(k) == Lookup::Absent)
        .collect();
    (shows, hides)
}
