//! The VIPs' ring maps: one inner map per VIP index, holding two Maglev tables, in one of two
//! arrays of maps: `RINGS_FIXED` for rings of the default size (all maps of one size, whose
//! lookup the verifier inlines), `RINGS` for the others (`lb_common::ring_is_fixed`). Tables
//! are written through a memory mapping (one store per slot, no syscall per slot); the
//! mapping lasts only for the write, so the agent's memory does not grow with the tables. A
//! new ring map is filled before it is installed in its outer map, and installing several at
//! once overlaps their RCU grace periods.

use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::AsFd as _,
};

use aya::maps::{Array, ArrayOfMaps, IterableMap as _, Map, MapData};
use lb_common::{FIXED_RING_MAP_FLAGS, RING_MAP_FLAGS, ring_is_fixed};

use super::{DatapathError, map_err};
use crate::{
    maglev,
    sys::{MappedArray, bpf_map_delete_u32},
};

type Outer = ArrayOfMaps<MapData, Array<MapData, u32>>;

/// The two outer maps, by class: `RINGS` (any size), `RINGS_FIXED` (the default size).
const OUTERS: [&str; 2] = ["RINGS", "RINGS_FIXED"];

/// The class (index into [`OUTERS`]) of a ring of `ring_size` slots.
fn class(ring_size: u32) -> usize {
    usize::from(ring_is_fixed(ring_size))
}

/// The outer maps and the ring maps this process has handles on.
pub struct Rings {
    outers: [Outer; 2],
    /// The outer maps' ids, for more handles on them.
    outer_ids: [u32; 2],
    /// Ring maps by VIP index: installed, or made and waiting for `install`.
    maps: BTreeMap<u32, Array<MapData, u32>>,
    pending: BTreeSet<u32>,
}

fn ring_err(index: u32) -> impl FnOnce(std::io::Error) -> DatapathError {
    move |source| DatapathError::Ring { index, source }
}

impl Rings {
    /// Takes the two outer maps ([`OUTERS`]) from `get` (the loaded object's, or the pins).
    pub fn open(
        mut get: impl FnMut(&'static str) -> Result<Map, DatapathError>,
    ) -> Result<Self, DatapathError> {
        let mut take = |c: usize| -> Result<(Outer, u32), DatapathError> {
            let name = OUTERS[c];
            let map = get(name)?;
            let id = match &map {
                Map::ArrayOfMaps(m) => m.info().map_err(map_err(name))?.id(),
                _ => {
                    return Err(DatapathError::Missing(
                        "map RINGS or RINGS_FIXED (an array of maps)",
                    ));
                }
            };
            Ok((map.try_into().map_err(map_err(name))?, id))
        };
        let ((any, any_id), (fixed, fixed_id)) = (take(0)?, take(1)?);
        Ok(Self {
            outers: [any, fixed],
            outer_ids: [any_id, fixed_id],
            maps: BTreeMap::new(),
            pending: BTreeSet::new(),
        })
    }

    /// The ring map of VIP index `index` for a ring of `size` slots: ours, or the one
    /// installed in that size's outer map (adopted maps).
    fn map(&mut self, index: u32, size: u32) -> Result<&Array<MapData, u32>, DatapathError> {
        if self.maps.get(&index).is_none_or(|m| m.len() != 2 * size) {
            let c = class(size);
            let m = self.outers[c].get(&index, 0).map_err(map_err(OUTERS[c]))?;
            self.maps.insert(index, m);
        }
        Ok(&self.maps[&index])
    }

    /// Makes a new ring map for VIP index `index` (not yet installed).
    pub fn create(&mut self, index: u32, ring_size: u32) -> Result<(), DatapathError> {
        let flags = if ring_is_fixed(ring_size) {
            FIXED_RING_MAP_FLAGS
        } else {
            RING_MAP_FLAGS
        };
        let m = Array::create(2 * ring_size, flags).map_err(map_err("ring"))?;
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
        for (index, _, job) in &items {
            self.map(*index, job.size)?;
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
        let c = class(size);
        let m = match self.maps.get(&index) {
            Some(m) if m.len() == 2 * size => m,
            _ => &self.outers[c].get(&index, 0).map_err(map_err(OUTERS[c]))?,
        };
        let len = m.len() as usize;
        if (offset + size) as usize > len {
            return Ok(Vec::new());
        }
        let mapped = MappedArray::map(m.map().fd().as_fd(), len, false).map_err(ring_err(index))?;
        Ok(mapped.read(offset as usize, size as usize))
    }

    /// Installs the pending ring maps of `indices` in their outer maps. Each update waits for
    /// an RCU grace period (the kernel's rule for maps of maps); done from several threads at
    /// once, the waits overlap.
    pub fn install(&mut self, indices: &[u32]) -> Result<(), DatapathError> {
        match indices {
            [] => return Ok(()),
            [one] => {
                install_one(&mut open_outers(self.outer_ids)?, *one, &self.maps[one])?;
            }
            many => {
                let ids = self.outer_ids;
                let maps = &self.maps;
                std::thread::scope(|s| -> Result<(), DatapathError> {
                    let workers: Vec<_> = many
                        .chunks(many.len().div_ceil(16))
                        .map(|part| {
                            s.spawn(move || -> Result<(), DatapathError> {
                                let mut outers = open_outers(ids)?;
                                for i in part {
                                    install_one(&mut outers, *i, &maps[i])?;
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

    /// The table size (half the map) of the ring map at each index below `limit`, from both
    /// outer maps (an index is in one of them: `install` empties the other).
    pub fn observe(&self, limit: u32) -> BTreeMap<u32, u32> {
        (0..limit)
            .filter_map(|i| {
                let m = self.outers.iter().find_map(|o| o.get(&i, 0).ok())?;
                Some((i, m.len() / 2))
            })
            .collect()
    }
}

/// New handles on the two outer maps, one set per installing thread: each as an array of
/// maps (to install) and as plain map data (to delete: `ArrayOfMaps` has no delete, nor
/// lends its file descriptor).
struct Outers {
    maps: [Outer; 2],
    data: [MapData; 2],
}

fn open_outers(ids: [u32; 2]) -> Result<Outers, DatapathError> {
    let data = |c: usize| MapData::from_id(ids[c]).map_err(map_err(OUTERS[c]));
    let open = |c: usize| -> Result<Outer, DatapathError> {
        Outer::try_from(Map::from_map_data(data(c)?).map_err(map_err(OUTERS[c]))?)
            .map_err(map_err(OUTERS[c]))
    };
    Ok(Outers {
        maps: [open(0)?, open(1)?],
        data: [data(0)?, data(1)?],
    })
}

/// Installs ring map `m` at `index` of its size's outer map, after emptying that index in the
/// other one: no live VIP uses the index with a ring of the other class (a VIP whose ring
/// size changes moves to a new index), and an index is then never in both outer maps, even
/// after a crash between the two steps.
fn install_one(
    outers: &mut Outers,
    index: u32,
    m: &Array<MapData, u32>,
) -> Result<(), DatapathError> {
    let c = class(m.len() / 2);
    bpf_map_delete_u32(outers.data[1 - c].fd().as_fd(), index).map_err(ring_err(index))?;
    outers.maps[c].set(index, m, 0).map_err(map_err(OUTERS[c]))
}
