//! The VIPs' ring maps: one inner map per VIP index in the `RINGS` array of maps, holding two
//! Maglev tables. Tables are written through a memory mapping (one store per slot, no syscall
//! per slot); the mapping lasts only for the write, so the agent's memory does not grow with
//! the tables. A new ring map is filled before it is installed in the outer map, and
//! installing several at once overlaps their RCU grace periods.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::AsFd as _,
};

use aya::maps::{Array, ArrayOfMaps, IterableMap as _, Map, MapData};
use lb_common::RING_MAP_FLAGS;

use super::{DatapathError, map_err};
use crate::{maglev, sys::MappedArray};

/// The outer map and the ring maps this process has handles on.
pub struct Rings {
    outer: ArrayOfMaps<MapData, Array<MapData, u32>>,
    /// The outer map's id, for more handles on it.
    outer_id: u32,
    /// Ring maps by VIP index: installed, or made and waiting for `install`.
    maps: BTreeMap<u32, Array<MapData, u32>>,
    pending: BTreeSet<u32>,
}

fn ring_err(index: u32) -> impl FnOnce(std::io::Error) -> DatapathError {
    move |source| DatapathError::Ring { index, source }
}

impl Rings {
    pub fn new(outer: ArrayOfMaps<MapData, Array<MapData, u32>>, outer_id: u32) -> Self {
        Self {
            outer,
            outer_id,
            maps: BTreeMap::new(),
            pending: BTreeSet::new(),
        }
    }

    /// The ring map of VIP index `index`: ours, or the one installed (adopted maps).
    fn map(&mut self, index: u32) -> Result<&Array<MapData, u32>, DatapathError> {
        if !self.maps.contains_key(&index) {
            let m = self.outer.get(&index, 0).map_err(map_err("RINGS"))?;
            self.maps.insert(index, m);
        }
        Ok(&self.maps[&index])
    }

    /// Makes a new ring map for VIP index `index` (not yet installed).
    pub fn create(&mut self, index: u32, ring_size: u32) -> Result<(), DatapathError> {
        let m = Array::create(2 * ring_size, RING_MAP_FLAGS).map_err(map_err("ring"))?;
        self.maps.insert(index, m);
        self.pending.insert(index);
        Ok(())
    }

    /// Closes this process's handle on VIP index `index`'s ring map (the outer map keeps the
    /// map itself; `map` takes a new handle when the index is used again).
    pub fn release(&mut self, index: u32) {
        if !self.pending.contains(&index) {
            self.maps.remove(&index);
        }
    }

    /// Builds each job's Maglev table and writes it into its VIP index's ring map from its
    /// offset on, spread over the machine's cores; each core holds one table at a time.
    pub fn write_tables(
        &mut self,
        items: Vec<(u32, u32, maglev::Job)>,
    ) -> Result<(), DatapathError> {
        for (index, _, _) in &items {
            self.map(*index)?;
        }
        let maps = &self.maps;
        let write = |(index, offset, job): &(u32, u32, maglev::Job)| -> Result<(), DatapathError> {
            let m = &maps[index];
            let len = m.len() as usize;
            if (*offset + job.size) as usize > len {
                return Err(DatapathError::Ring {
                    index: *index,
                    source: std::io::Error::other(format!(
                        "a table of {} slots at {offset} does not fit a map of {len}",
                        job.size
                    )),
                });
            }
            let table = maglev::build(&job.entries, job.size);
            let mapped =
                MappedArray::map(m.map().fd().as_fd(), len, true).map_err(ring_err(*index))?;
            mapped.write(*offset as usize, &table);
            Ok(())
        };
        if items.len() <= 1 {
            return items.iter().try_for_each(write);
        }
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(items.len());
        if workers <= 1 {
            return items.iter().try_for_each(write);
        }
        std::thread::scope(|s| {
            let parts: Vec<_> = items
                .chunks(items.len().div_ceil(workers))
                .map(|part| s.spawn(move || part.iter().try_for_each(write)))
                .collect();
            parts
                .into_iter()
                .try_for_each(|h| h.join().expect("a table writer panicked"))
        })
    }

    /// Reads the table of `size` slots at `offset` of VIP index `index`'s ring map.
    pub fn read(&self, index: u32, offset: u32, size: u32) -> Result<Vec<u32>, DatapathError> {
        let m = match self.maps.get(&index) {
            Some(m) => m,
            None => &self.outer.get(&index, 0).map_err(map_err("RINGS"))?,
        };
        let len = m.len() as usize;
        if (offset + size) as usize > len {
            return Ok(Vec::new());
        }
        let mapped = MappedArray::map(m.map().fd().as_fd(), len, false).map_err(ring_err(index))?;
        Ok(mapped.read(offset as usize, size as usize))
    }

    /// Installs the pending ring maps of `indices` in the outer map. Each update waits for an
    /// RCU grace period (the kernel's rule for maps of maps); done from several threads at
    /// once, the waits overlap.
    pub fn install(&mut self, indices: &[u32]) -> Result<(), DatapathError> {
        match indices {
            [] => return Ok(()),
            [one] => {
                self.outer
                    .set(*one, &self.maps[one], 0)
                    .map_err(map_err("RINGS"))?;
            }
            many => {
                let id = self.outer_id;
                let maps = &self.maps;
                std::thread::scope(|s| -> Result<(), DatapathError> {
                    let workers: Vec<_> = many
                        .chunks(many.len().div_ceil(16))
                        .map(|part| {
                            s.spawn(move || -> Result<(), DatapathError> {
                                let data = MapData::from_id(id).map_err(map_err("RINGS"))?;
                                let mut outer: ArrayOfMaps<MapData, Array<MapData, u32>> =
                                    ArrayOfMaps::try_from(
                                        Map::from_map_data(data).map_err(map_err("RINGS"))?,
                                    )
                                    .map_err(map_err("RINGS"))?;
                                for i in part {
                                    outer.set(*i, &maps[i], 0).map_err(map_err("RINGS"))?;
                                }
                                Ok(())
                            })
                        })
                        .collect();
                    for w in workers {
                        w.join().expect("a ring install thread panicked")?;
                    }
                    Ok(())
                })?;
            }
        }
        for i in indices {
            self.pending.remove(i);
        }
        Ok(())
    }

    /// The table size (half the map) of the ring map in each outer slot below `limit`.
    pub fn observe(&self, limit: u32) -> BTreeMap<u32, u32> {
        (0..limit)
            .filter_map(|i| {
                let m = self.outer.get(&i, 0).ok()?;
                Some((i, m.len() / 2))
            })
            .collect()
    }
}
