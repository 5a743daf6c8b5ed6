//! The balancer's maps and program: load, attach, write, read counters.
//!
//! `Balancer` is a thin typed front of the BPF maps. What to write (indices, tables) is
//! decided by [`crate::service`]; this module only knows how.

use std::{
    collections::HashMap as StdHashMap,
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, ArrayOfMaps, HashMap, MapData, MapError, PerCpuArray},
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    AddrKey, Backend, Config, ConnEntry, Counter, FlowKey, RING_MAP_FLAGS, VipKey, VipMeta, stat,
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
    #[error("pinned objects under {dir}")]
    Pin {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{dir} holds maps of another maglb map layout ({found}); this maglb uses {LAYOUT}. \
         Detach the old balancer and remove {dir}/{found}, or point --bpffs elsewhere"
    )]
    Layout { dir: PathBuf, found: String },
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

/// Attaches `prog` to `iface` in `mode` (in the calling thread's network namespace).
pub fn attach_xdp(prog: &mut Xdp, iface: &str, mode: Mode) -> Result<XdpLinkId, BalancerError> {
    prog.attach(iface, mode.xdp())
        .map_err(|source| BalancerError::Attach {
            iface: iface.into(),
            mode: mode.name(),
            source,
        })
}

/// Pins the link `id` of `prog` at `path`, so the attachment outlives this process, and
/// hands it back to `prog`. Returns the link's new id.
pub fn pin_link(prog: &mut Xdp, id: XdpLinkId, path: &Path) -> Result<XdpLinkId, BalancerError> {
    let dir = path.parent().unwrap_or(path);
    let link = prog.take_link(id).map_err(|e| pin_error(dir, e))?;
    let fd = FdLink::try_from(link).map_err(|e| pin_error(dir, e))?;
    let pinned = fd.pin(path).map_err(|e| pin_error(dir, e))?;
    let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| pin_error(dir, e))?;
    prog.attach_to_link(link).map_err(|e| pin_error(dir, e))
}

/// A VIP's ring map: two tables of `size` slots, the active one at `active * size` (the
/// offset the VIP's entry names). A change writes the other table, then the caller switches
/// the VIP's entry to it.
struct Ring {
    map: Array<MapData, u32>,
    size: usize,
    contents: [Vec<u32>; 2],
    active: usize,
}
/// The loaded balancer.
pub struct Balancer {
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    /// Where maps and the XDP link are pinned, if they are (the agent pins; tests do not).
    pin_dir: Option<PathBuf>,
    vips: HashMap<MapData, VipKey, VipMeta>,
    vip_addrs: HashMap<MapData, AddrKey, VipMeta>,
    rings: ArrayOfMaps<MapData, Array<MapData, u32>>,
    backends: Array<MapData, Backend>,
    conntrack: HashMap<MapData, FlowKey, ConnEntry>,
    config: Array<MapData, Config>,
    vip_stats: PerCpuArray<MapData, Counter>,
    backend_stats: PerCpuArray<MapData, Counter>,
    global_stats: PerCpuArray<MapData, Counter>,
    vip_new_flows: PerCpuArray<MapData, u64>,
    vip_filter: Array<MapData, u64>,
    /// What `vip_filter` holds (read back when the maps are adopted).
    filter: Vec<u64>,
    ring_maps: StdHashMap<u32, Ring>,
}

pub const PROGRAM: &str = "maglb_balancer";

/// The maps, by the names the object gives them.
pub const MAPS: [&str; 11] = [
    "VIPS",
    "VIP_ADDRS",
    "RINGS",
    "BACKENDS",
    "CONNTRACK",
    "CONFIG",
    "VIP_STATS",
    "BACKEND_STATS",
    "GLOBAL_STATS",
    "VIP_NEW_FLOWS",
    "VIP_FILTER",
];

/// Version of the map layout. Pins live in a directory of that name under the BPF filesystem
/// directory (bpffs holds no regular files to write a marker in), so a maglb with other maps
/// never adopts them. Bump it whenever a map's key, value or size changes.
pub const LAYOUT: &str = "maps-v3";
const LINK_FILE: &str = "link";

fn pin_error(dir: &Path, e: impl std::fmt::Display) -> BalancerError {
    BalancerError::Pin {
        dir: dir.to_owned(),
        source: io::Error::other(e.to_string()),
    }
}

impl Balancer {
    /// Loads the balancer program with fresh, unpinned maps (nothing is attached yet).
    pub fn load() -> Result<Self, BalancerError> {
        Self::open(None)
    }

    /// Loads the balancer program with its maps pinned under `dir`: maps already pinned there
    /// are reused (their contents survive), missing ones are created and pinned. If an XDP
    /// link is pinned there, the new program replaces the old one on it atomically, so
    /// forwarding never stops.
    pub fn load_pinned(bpffs: &Path) -> Result<Self, BalancerError> {
        std::fs::create_dir_all(bpffs).map_err(|e| pin_error(bpffs, e))?;
        for e in std::fs::read_dir(bpffs)
            .map_err(|e| pin_error(bpffs, e))?
            .flatten()
        {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("maps-v") && name != LAYOUT {
                return Err(BalancerError::Layout {
                    dir: bpffs.to_owned(),
                    found: name,
                });
            }
        }
        let dir = &bpffs.join(LAYOUT);
        std::fs::create_dir_all(dir).map_err(|e| pin_error(dir, e))?;
        let mut bal = Self::open(Some(dir))?;
        let link = dir.join(LINK_FILE);
        if link.exists() {
            let pinned = PinnedLink::from_pin(&link).map_err(|e| pin_error(dir, e))?;
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| pin_error(dir, e))?;
            let id = bal
                .program()
                .attach_to_link(link)
                .map_err(|e| pin_error(dir, e))?;
            bal.link = Some(id);
        }
        Ok(bal)
    }

    fn open(pin_dir: Option<&Path>) -> Result<Self, BalancerError> {
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => MAPS.iter().map(|m| (*m, dir.join(m))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(programs::BALANCER)
            .map_err(BalancerError::Load)?;
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
            vip_new_flows: take!("VIP_NEW_FLOWS"),
            vip_filter: take!("VIP_FILTER"),
            filter: Vec::new(),
            ebpf,
            link: None,
            pin_dir: pin_dir.map(Path::to_owned),
            ring_maps: StdHashMap::new(),
        })
    }

    /// Makes the VIP address filter hold `words`, writing only the words that differ.
    pub fn set_vip_filter(&mut self, words: &[u64]) -> Result<(), BalancerError> {
        if self.filter.len() != words.len() {
            self.filter = (0..words.len() as u32)
                .map(|i| self.vip_filter.get(&i, 0).unwrap_or(0))
                .collect();
        }
        for (i, (old, new)) in self.filter.iter_mut().zip(words).enumerate() {
            if old != new {
                self.vip_filter
                    .set(i as u32, new, 0)
                    .map_err(map_err("VIP_FILTER"))?;
                *old = *new;
            }
        }
        Ok(())
    }

    /// Whether the program is attached (by this process or through a pinned link).
    pub fn is_attached(&self) -> bool {
        self.link.is_some()
    }

    /// The program, for attaching elsewhere or for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Balancer::load")
    }

    /// Attaches the program to `iface` (in the calling thread's network namespace). With a
    /// pin directory, the link is pinned: it outlives this process.
    pub fn attach(&mut self, iface: &str, mode: Mode) -> Result<(), BalancerError> {
        let mut link = attach_xdp(self.program(), iface, mode)?;
        if let Some(dir) = self.pin_dir.clone() {
            link = pin_link(self.program(), link, &dir.join(LINK_FILE))?;
        }
        self.link = Some(link);
        Ok(())
    }

    /// Detaches the program (and removes its pinned link).
    pub fn detach(&mut self) -> Result<(), BalancerError> {
        if let Some(id) = self.link.take() {
            let _ = self.program().detach(id);
        }
        if let Some(dir) = &self.pin_dir {
            let path = dir.join(LINK_FILE);
            if path.exists() {
                let pinned = PinnedLink::from_pin(&path).map_err(|e| pin_error(dir, e))?;
                pinned.unpin().map_err(|e| pin_error(dir, e))?;
            }
        }
        Ok(())
    }

    pub fn config(&self) -> Result<Config, BalancerError> {
        self.config.get(&0, 0).map_err(map_err("CONFIG"))
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

    /// Writes `table` into the inactive half of VIP `index`'s ring map and returns the offset
    /// of that half (for `VipMeta::ring_off`) and how many slots were written. The table takes
    /// effect when the VIP's entry names that offset.
    pub fn set_ring(&mut self, index: u32, table: &[u32]) -> Result<(u32, usize), BalancerError> {
        let size = table.len();
        if !self.ring_maps.get(&index).is_some_and(|r| r.size == size) {
            // New VIP or new ring size: a fresh map with both halves filled.
            let mut map =
                Array::create(2 * size as u32, RING_MAP_FLAGS).map_err(map_err("ring"))?;
            for half in 0..2 {
                for (slot, v) in table.iter().enumerate() {
                    map.set((half * size + slot) as u32, v, 0)
                        .map_err(map_err("ring"))?;
                }
            }
            self.rings.set(index, &map, 0).map_err(map_err("RINGS"))?;
            self.ring_maps.insert(
                index,
                Ring {
                    map,
                    size,
                    contents: [table.to_vec(), table.to_vec()],
                    active: 0,
                },
            );
            return Ok((0, size));
        }
        let ring = self.ring_maps.get_mut(&index).expect("checked above");
        let spare = 1 - ring.active;
        let diff = maglev::changed(&ring.contents[spare], table);
        for (slot, v) in &diff {
            ring.map
                .set((spare * size) as u32 + *slot, v, 0)
                .map_err(map_err("ring"))?;
        }
        ring.contents[spare] = table.to_vec();
        ring.active = spare;
        Ok(((spare * size) as u32, diff.len()))
    }

    /// Takes over the ring map the datapath reads for VIP `index` (maps adopted from a
    /// previous agent), whose active half starts at `ring_off`.
    pub fn adopt_ring(
        &mut self,
        index: u32,
        ring_size: u32,
        ring_off: u32,
    ) -> Result<(), BalancerError> {
        let map: Array<MapData, u32> = self.rings.get(&index, 0).map_err(map_err("RINGS"))?;
        let size = ring_size as usize;
        let read = |half: usize| -> Result<Vec<u32>, BalancerError> {
            (0..size)
                .map(|i| map.get(&((half * size + i) as u32), 0))
                .collect::<Result<_, _>>()
                .map_err(map_err("ring"))
        };
        let contents = [read(0)?, read(1)?];
        self.ring_maps.insert(
            index,
            Ring {
                map,
                size,
                contents,
                active: (ring_off as usize) / size.max(1),
            },
        );
        Ok(())
    }

    /// All VIP entries in the map.
    pub fn vips(&self) -> Vec<(VipKey, VipMeta)> {
        self.vips.iter().filter_map(Result::ok).collect()
    }

    /// A backend slot as the map holds it.
    pub fn backend(&self, index: u32) -> Option<Backend> {
        self.backends.get(&index, 0).ok()
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

    /// Flows one CPU can add to the connection table before its inserts start evicting:
    /// the table's size, or with per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`) that CPU's share.
    pub fn conntrack_capacity_per_cpu(&self) -> u32 {
        use aya::maps::IterableMap as _;
        const NO_COMMON_LRU: u32 = 1 << 1;
        let Ok(info) = self.conntrack.map().info() else {
            return 0;
        };
        if info.map_flags() & NO_COMMON_LRU != 0 {
            let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32;
            info.max_entries() / cpus
        } else {
            info.max_entries()
        }
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

    /// Global counters by reason, summed over CPUs, with their names (the decap program's
    /// reasons are not the balancer's and are left out).
    pub fn global_stats(&self) -> Vec<(&'static str, Counter)> {
        (0..stat::COUNT)
            .filter(|i| ![stat::DECAP_OK, stat::DECAP_PASS].contains(i))
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

    /// New flows of VIP `index`, summed over CPUs.
    pub fn vip_new_flows(&self, index: u32) -> u64 {
        self.vip_new_flows
            .get(&index, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    pub fn backend_stats(&self, index: u32) -> Counter {
        Self::sum(&self.backend_stats, index)
    }
}
