//! The balancer's maps and program: load, attach, write, read counters.
//!
//! `Balancer` is a thin typed front of the BPF maps. What to write (indices, tables) is
//! decided by [`crate::service`]; this module only knows how.

use std::collections::HashMap as StdHashMap;

use aya::{
    Ebpf, EbpfError,
    maps::{Array, ArrayOfMaps, HashMap, MapData, MapError, PerCpuArray},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLinkId},
};
use lb_common::{
    AddrKey, BPF_F_INNER_MAP, Backend, Config, ConnEntry, Counter, FlowKey, VipKey, VipMeta, stat,
};

use crate::{maglev, programs};

/// Errors from loading, attaching or writing the balancer.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error("loading the balancer object")]
    Load(#[source] EbpfError),
    #[error("the balancer object has no {0}")]
    Missing(&'static str),
    #[error("loading program {name} into the kernel (the verifier's log follows)")]
    Program {
        name: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error(
        "attaching XDP to {iface} in {mode} mode{hint}",
        hint = if *.mode == "native" { " (if the driver has no native XDP, use generic mode)" } else { "" }
    )]
    Attach {
        iface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("map {map}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> BalancerError {
    move |source| BalancerError::Map { map, source }
}

/// XDP attach mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// In the driver (fastest; veth and most 10G+ NICs).
    Native,
    /// In the kernel stack, for any interface (slow; for testing).
    Generic,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::Generic => "generic",
        }
    }
    fn xdp(self) -> XdpMode {
        match self {
            Mode::Native => XdpMode::Driver,
            Mode::Generic => XdpMode::Skb,
        }
    }
}

/// A VIP's two ring maps: the active one the datapath reads, the spare one the next table is
/// written into before the outer slot is switched to it. The kernel waits for running
/// programs when an outer map slot changes, so after the switch nobody reads the old ring
/// and it becomes the spare.
struct Ring {
    maps: [Array<MapData, u32>; 2],
    contents: [Vec<u32>; 2],
    active: usize,
}

/// The loaded balancer.
pub struct Balancer {
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    vips: HashMap<MapData, VipKey, VipMeta>,
    vip_addrs: HashMap<MapData, AddrKey, VipMeta>,
    rings: ArrayOfMaps<MapData, Array<MapData, u32>>,
    backends: Array<MapData, Backend>,
    conntrack: HashMap<MapData, FlowKey, ConnEntry>,
    config: Array<MapData, Config>,
    vip_stats: PerCpuArray<MapData, Counter>,
    backend_stats: PerCpuArray<MapData, Counter>,
    global_stats: PerCpuArray<MapData, Counter>,
    ring_maps: StdHashMap<u32, Ring>,
}

pub const PROGRAM: &str = "maglb_balancer";

impl Balancer {
    /// Loads the balancer program and creates its maps (nothing is attached yet).
    pub fn load() -> Result<Self, BalancerError> {
        let mut ebpf = Ebpf::load(programs::BALANCER).map_err(BalancerError::Load)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(BalancerError::Missing(PROGRAM))?
            .try_into()
            .map_err(|source| BalancerError::Program {
                name: PROGRAM,
                source,
            })?;
        prog.load().map_err(|source| BalancerError::Program {
            name: PROGRAM,
            source,
        })?;
        macro_rules! take {
            ($name:literal) => {{
                let map = ebpf
                    .take_map($name)
                    .ok_or(BalancerError::Missing(concat!("map ", $name)))?;
                map.try_into().map_err(map_err($name))?
            }};
        }
        Ok(Self {
            vips: take!("VIPS"),
            vip_addrs: take!("VIP_ADDRS"),
            rings: take!("RINGS"),
            backends: take!("BACKENDS"),
            conntrack: take!("CONNTRACK"),
            config: take!("CONFIG"),
            vip_stats: take!("VIP_STATS"),
            backend_stats: take!("BACKEND_STATS"),
            global_stats: take!("GLOBAL_STATS"),
            ebpf,
            link: None,
            ring_maps: StdHashMap::new(),
        })
    }

    /// The program, for attaching elsewhere or for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Balancer::load")
    }

    /// Attaches the program to `iface` (in the calling thread's network namespace).
    pub fn attach(&mut self, iface: &str, mode: Mode) -> Result<(), BalancerError> {
        let link =
            self.program()
                .attach(iface, mode.xdp())
                .map_err(|source| BalancerError::Attach {
                    iface: iface.into(),
                    mode: mode.name(),
                    source,
                })?;
        self.link = Some(link);
        Ok(())
    }

    pub fn set_config(&mut self, cfg: &Config) -> Result<(), BalancerError> {
        self.config.set(0, cfg, 0).map_err(map_err("CONFIG"))
    }

    pub fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<(), BalancerError> {
        self.vips.insert(key, meta, 0).map_err(map_err("VIPS"))
    }

    pub fn del_vip(&mut self, key: &VipKey) -> Result<(), BalancerError> {
        self.vips.remove(key).map_err(map_err("VIPS"))
    }

    pub fn set_vip_addr(&mut self, key: &AddrKey, meta: &VipMeta) -> Result<(), BalancerError> {
        self.vip_addrs
            .insert(key, meta, 0)
            .map_err(map_err("VIP_ADDRS"))
    }

    pub fn del_vip_addr(&mut self, key: &AddrKey) -> Result<(), BalancerError> {
        self.vip_addrs.remove(key).map_err(map_err("VIP_ADDRS"))
    }

    pub fn set_backend(&mut self, index: u32, b: &Backend) -> Result<(), BalancerError> {
        self.backends.set(index, b, 0).map_err(map_err("BACKENDS"))
    }

    /// Makes `table` the ring of VIP `index` in one switch. Returns how many slots were
    /// written (only those that differ from the spare ring's contents).
    pub fn set_ring(&mut self, index: u32, table: &[u32]) -> Result<usize, BalancerError> {
        let size = table.len() as u32;
        let ring = match self.ring_maps.get_mut(&index) {
            Some(r) if r.contents[0].len() == table.len() => r,
            _ => {
                // New VIP or new ring size: two fresh maps, both filled, so that later
                // changes are diffs.
                let mut maps = [
                    Array::create(size, BPF_F_INNER_MAP).map_err(map_err("ring"))?,
                    Array::create(size, BPF_F_INNER_MAP).map_err(map_err("ring"))?,
                ];
                for m in maps.iter_mut() {
                    for (slot, v) in table.iter().enumerate() {
                        m.set(slot as u32, v, 0).map_err(map_err("ring"))?;
                    }
                }
                self.rings
                    .set(index, &maps[0], 0)
                    .map_err(map_err("RINGS"))?;
                self.ring_maps.insert(
                    index,
                    Ring {
                        maps,
                        contents: [table.to_vec(), table.to_vec()],
                        active: 0,
                    },
                );
                return Ok(table.len());
            }
        };
        let spare = 1 - ring.active;
        let diff = maglev::changed(&ring.contents[spare], table);
        for (slot, v) in &diff {
            ring.maps[spare].set(*slot, v, 0).map_err(map_err("ring"))?;
        }
        ring.contents[spare] = table.to_vec();
        self.rings
            .set(index, &ring.maps[spare], 0)
            .map_err(map_err("RINGS"))?;
        ring.active = spare;
        Ok(diff.len())
    }

    /// The table the datapath currently reads for VIP `index`.
    pub fn ring(&self, index: u32) -> Option<&[u32]> {
        self.ring_maps
            .get(&index)
            .map(|r| r.contents[r.active].as_slice())
    }

    /// Forgets VIP `index`'s ring (the outer slot keeps the old ring until reused; the VIP
    /// key is gone, so nothing reads it).
    pub fn drop_ring(&mut self, index: u32) {
        self.ring_maps.remove(&index);
    }

    /// A connection-table entry, if any.
    pub fn conntrack(&self, flow: &FlowKey) -> Option<ConnEntry> {
        self.conntrack.get(flow, 0).ok()
    }

    /// Number of connection-table entries (walks the table).
    pub fn conntrack_len(&self) -> usize {
        self.conntrack.keys().filter(|k| k.is_ok()).count()
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

    /// Global counters by reason, summed over CPUs, with their names.
    pub fn global_stats(&self) -> Vec<(&'static str, Counter)> {
        (0..stat::COUNT)
            .map(|i| (stat::NAMES[i as usize], Self::sum(&self.global_stats, i)))
            .collect()
    }

    /// One global counter.
    pub fn global_stat(&self, reason: u32) -> Counter {
        Self::sum(&self.global_stats, reason)
    }

    pub fn vip_stats(&self, index: u32) -> Counter {
        Self::sum(&self.vip_stats, index)
    }

    pub fn backend_stats(&self, index: u32) -> Counter {
        Self::sum(&self.backend_stats, index)
    }
}
