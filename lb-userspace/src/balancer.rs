//! The balancer's maps and program: load, attach, write, read counters.
//!
//! `Balancer` is a thin typed front of the BPF maps. What to write (indices, tables) is
//! decided by [`crate::service`]; this module only knows how.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    fmt, io,
    net::IpAddr,
    path::{Path, PathBuf},
    str::FromStr,
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{
        Array, ArrayOfMaps, HashMap, IterableMap as _, LpmTrie, MapData, MapError, PerCpuArray,
        PerCpuValues, lpm_trie::Key as LpmKey,
    },
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
};
use lb_common::{
    AddrKey, Backend, BackendCounter, Config, ConnEntry, Counter, DEFAULT_CONNTRACK_ENTRIES,
    ENCAP_GUE, ENCAP_IPIP, FAMILY_V4, FloodMeter, FlowKey, MAX_VIPS, MIN_CONNTRACK_ENTRIES,
    POLICY_F_ALLOW_ONLY, POLICY_F_PREFIXES, PREFIX_ALLOW, PREFIX_DENY, PrefixData4, PrefixData6,
    RING_MAP_FLAGS, SETTINGS_VERSION, Settings, VipKey, VipMeta, VipPolicy, ms_to_ticks, stat,
    vip_stat,
};

use crate::{addr, maglev, programs};

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
    #[error(
        "the connection table pinned under {dir} has {pinned} entries, but conntrack_entries \
         is {wanted} (rounded to a multiple of the CPU count). A table cannot be resized in \
         place: set conntrack_entries back to {pinned}, or detach the balancer and remove \
         {dir} to start with a new, empty table"
    )]
    ConntrackSize {
        dir: PathBuf,
        pinned: u32,
        wanted: u32,
    },
    #[error(
        "conntrack_entries {0} is out of range: use {MIN_CONNTRACK_ENTRIES} to {MAX_CONNTRACK_ENTRIES}"
    )]
    BadConntrackEntries(u32),
    #[error("invalid setting: {0}")]
    BadSetting(String),
}

/// Largest `conntrack_entries` accepted (2^27 entries, about 16 GiB).
pub const MAX_CONNTRACK_ENTRIES: u32 = 1 << 27;

/// Load-time options: fixed for the life of the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Size of the connection table in flows (`conntrack_entries`). Default
    /// [`DEFAULT_CONNTRACK_ENTRIES`] (2^21 = 2,097,152); memory about
    /// [`lb_common::CONNTRACK_BYTES_PER_ENTRY`] bytes per entry, allocated when the maps are
    /// created. The kernel rounds it up to a multiple of the number of possible CPUs; each
    /// CPU inserts into its own share (`conntrack_entries / CPUs`).
    pub conntrack_entries: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
        }
    }
}

/// A new-flow rate: a token bucket of `burst` flows refilled at `new_flows_per_s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// New flows per second (at least 1).
    pub new_flows_per_s: u32,
    /// Flows admitted at once after a quiet period (at least 1).
    pub burst: u32,
}

impl RateLimit {
    /// GCRA parameters (interval, tolerance) in ns, for `share` of the rate (1 = all of it).
    fn gcra(self, share: u32) -> Result<(u64, u64), BalancerError> {
        if self.new_flows_per_s == 0 || self.burst == 0 {
            return Err(BalancerError::BadSetting(format!(
                "rate limit {} new flows/s with burst {}: both must be at least 1",
                self.new_flows_per_s, self.burst
            )));
        }
        let share = share.max(1) as u64;
        let interval = (1_000_000_000 * share / self.new_flows_per_s as u64).max(1);
        let burst = (self.burst as u64 / share).max(1);
        Ok((interval, interval * (burst - 1)))
    }
}

/// A source prefix (`10.0.0.0/8`, `2001:db8::/32`); host bits are ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = BalancerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BalancerError::BadSetting(format!("{s:?} is not ADDRESS/LENGTH"));
        let (a, l) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let len: u8 = l.parse().map_err(|_| bad())?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(bad());
        }
        Ok(Self { addr, len })
    }
}

/// How packets reach the backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encap {
    /// IP-in-IP (IPv4 or IPv6 outer header). The default.
    Ipip,
    /// GUE variant 1: outer IP, UDP to `port` from a per-flow source port (so the backends'
    /// NICs spread flows over their queues), then the inner packet. 8 bytes more than IP-in-IP.
    Gue { port: u16 },
}

/// What the flood mode did, summed over CPUs (`FloodMeter`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FloodStats {
    /// New flows forwarded without a connection-table entry because their CPU was under flood.
    pub not_inserted: u64,
    /// Flood-meter windows (about 134 ms each, per CPU) in which the threshold was reached.
    pub flood_windows: u64,
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
    settings: Array<MapData, Settings>,
    vip_policy: Array<MapData, VipPolicy>,
    prefixes_v4: LpmTrie<MapData, PrefixData4, u32>,
    prefixes_v6: LpmTrie<MapData, PrefixData6, u32>,
    flood: PerCpuArray<MapData, FloodMeter>,
    backend_stats: PerCpuArray<MapData, BackendCounter>,
    vip_drops: PerCpuArray<MapData, Counter>,
    global_stats: PerCpuArray<MapData, Counter>,
    vip_filter: Array<MapData, u64>,
    /// What `vip_filter` holds (read back when the maps are adopted).
    filter: Vec<u64>,
    ring_maps: StdHashMap<u32, Ring>,
    /// Backend slots ever written, with their VIP index and family: which slots' counters add
    /// up to which VIP's (read back when the maps are adopted).
    slots: BTreeMap<u32, (u32, u8)>,
}

pub const PROGRAM: &str = "maglb_balancer";

/// The maps, by the names the object gives them.
pub const MAPS: [&str; 18] = [
    "VIPS",
    "VIP_ADDRS",
    "RINGS",
    "BACKENDS",
    "CONNTRACK",
    "CONFIG",
    "SETTINGS",
    "VIP_POLICY",
    "PREFIXES_V4",
    "PREFIXES_V6",
    "SRC_LIMIT",
    "VIP_CAP",
    "FLOOD",
    "CLOCK",
    "BACKEND_STATS",
    "VIP_DROPS",
    "GLOBAL_STATS",
    "VIP_FILTER",
];

/// Version of the map layout. Pins live in a directory of that name under the BPF filesystem
/// directory (bpffs holds no regular files to write a marker in), so a maglb with other maps
/// never adopts them. Bump it whenever a map's key, value or size changes (the connection
/// table's size is a setting, checked on its own: `BalancerError::ConntrackSize`).
pub const LAYOUT: &str = "maps-v4";
const LINK_FILE: &str = "link";

/// Fails if a connection table is pinned under `dir` with another size than `entries` asks
/// for (the kernel rounds per-CPU LRU sizes to a multiple of the possible CPUs).
fn check_conntrack_size(dir: &Path, entries: u32) -> Result<(), BalancerError> {
    let path = dir.join("CONNTRACK");
    if !path.exists() {
        return Ok(());
    }
    let map = MapData::from_pin(&path).map_err(map_err("CONNTRACK"))?;
    let pinned = map.info().map_err(map_err("CONNTRACK"))?.max_entries();
    let cpus = possible_cpus();
    let wanted = entries.div_ceil(cpus) * cpus;
    if pinned != wanted {
        return Err(BalancerError::ConntrackSize {
            dir: dir.to_owned(),
            pinned,
            wanted,
        });
    }
    Ok(())
}

/// Number of possible CPUs (the per-CPU maps' value count).
fn possible_cpus() -> u32 {
    aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32
}

fn pin_error(dir: &Path, e: impl std::fmt::Display) -> BalancerError {
    BalancerError::Pin {
        dir: dir.to_owned(),
        source: io::Error::other(e.to_string()),
    }
}

impl Balancer {
    /// Loads the balancer program with fresh, unpinned maps (nothing is attached yet), with
    /// the default [`LoadOptions`].
    pub fn load() -> Result<Self, BalancerError> {
        Self::open(None, &LoadOptions::default())
    }

    /// As [`Balancer::load`], with `opts`.
    pub fn load_with(opts: &LoadOptions) -> Result<Self, BalancerError> {
        Self::open(None, opts)
    }

    /// Loads the balancer program with its maps pinned under `dir`: maps already pinned there
    /// are reused (their contents survive), missing ones are created and pinned. If an XDP
    /// link is pinned there, the new program replaces the old one on it atomically, so
    /// forwarding never stops. Uses the default [`LoadOptions`].
    pub fn load_pinned(bpffs: &Path) -> Result<Self, BalancerError> {
        Self::load_pinned_with(bpffs, &LoadOptions::default())
    }

    /// As [`Balancer::load_pinned`], with `opts`. A pinned connection table of another size
    /// than `opts.conntrack_entries` is an error ([`BalancerError::ConntrackSize`]), never
    /// silently reused.
    pub fn load_pinned_with(bpffs: &Path, opts: &LoadOptions) -> Result<Self, BalancerError> {
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
        let mut bal = Self::open(Some(dir), opts)?;
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

    fn open(pin_dir: Option<&Path>, opts: &LoadOptions) -> Result<Self, BalancerError> {
        let n = opts.conntrack_entries;
        if !(MIN_CONNTRACK_ENTRIES..=MAX_CONNTRACK_ENTRIES).contains(&n) {
            return Err(BalancerError::BadConntrackEntries(n));
        }
        if let Some(dir) = pin_dir {
            check_conntrack_size(dir, n)?;
        }
        let mut loader = EbpfLoader::new();
        loader.map_max_entries("CONNTRACK", n);
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
        let mut bal = Self {
            vips: take!("VIPS"),
            vip_addrs: take!("VIP_ADDRS"),
            rings: take!("RINGS"),
            backends: take!("BACKENDS"),
            conntrack: take!("CONNTRACK"),
            config: take!("CONFIG"),
            settings: take!("SETTINGS"),
            vip_policy: take!("VIP_POLICY"),
            prefixes_v4: take!("PREFIXES_V4"),
            prefixes_v6: take!("PREFIXES_V6"),
            flood: take!("FLOOD"),
            backend_stats: take!("BACKEND_STATS"),
            vip_drops: take!("VIP_DROPS"),
            global_stats: take!("GLOBAL_STATS"),
            vip_filter: take!("VIP_FILTER"),
            filter: Vec::new(),
            ebpf,
            link: None,
            pin_dir: pin_dir.map(Path::to_owned),
            ring_maps: StdHashMap::new(),
            slots: BTreeMap::new(),
        };
        if bal.settings()?.version == 0 {
            bal.set_settings(&Settings::default())?;
        }
        if pin_dir.is_some() {
            // Adopted maps: which slots belong to which VIP, for the derived counters.
            for index in 0..lb_common::MAX_BACKENDS {
                if let Ok(b) = bal.backends.get(&index, 0)
                    && (b.generation != 0 || b.flags != 0)
                {
                    bal.slots.insert(index, (b.vip as u32, b.family));
                }
            }
        }
        Ok(bal)
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

    /// Writes backend slot `index`. A slot that moves to another VIP (reuse) starts with
    /// zero counters, so its old VIP's packets never count toward the new one.
    pub fn set_backend(&mut self, index: u32, b: &Backend) -> Result<(), BalancerError> {
        let owner = (b.vip as u32, b.family);
        if self.slots.get(&index).is_some_and(|(v, _)| *v != owner.0) {
            let zero =
                PerCpuValues::try_from(vec![BackendCounter::default(); possible_cpus() as usize])
                    .map_err(|e| BalancerError::Map {
                    map: "BACKEND_STATS",
                    source: MapError::from(e),
                })?;
            self.backend_stats
                .set(index, zero, 0)
                .map_err(map_err("BACKEND_STATS"))?;
        }
        self.backends
            .set(index, b, 0)
            .map_err(map_err("BACKENDS"))?;
        self.slots.insert(index, owner);
        Ok(())
    }

    /// Writes `table` into the inactive half of VIP `index`'s ring map and returns the offset
    /// of that half (for `VipMeta::ring_off`) and how many slots were written. The table takes
    /// effect when the VIP's entry names that offset.
    pub fn set_ring(&mut self, index: u32, table: &[u32]) -> Result<(u32, usize), BalancerError> {
        let size = table.len();
        if self.ring_maps.get(&index).is_none_or(|r| r.size != size) {
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

    /// Number of connection-table entries (walks the table).
    pub fn conntrack_len(&self) -> usize {
        self.conntrack.keys().filter(|k| k.is_ok()).count()
    }

    /// The connection table's size (`conntrack_entries`, as the kernel rounded it).
    pub fn conntrack_entries(&self) -> u32 {
        self.conntrack.map().info().map_or(0, |i| i.max_entries())
    }

    /// Flows one CPU can add to the connection table before its inserts start evicting: its
    /// share of the table (the table keeps one LRU list per CPU, `BPF_F_NO_COMMON_LRU`).
    pub fn conntrack_capacity_per_cpu(&self) -> u32 {
        const NO_COMMON_LRU: u32 = 1 << 1;
        let Ok(info) = self.conntrack.map().info() else {
            return 0;
        };
        if info.map_flags() & NO_COMMON_LRU != 0 {
            info.max_entries() / possible_cpus()
        } else {
            info.max_entries()
        }
    }

    /// Kernel memory of the connection table in bytes (its `memlock` in fdinfo), if known.
    pub fn conntrack_memory(&self) -> Option<u64> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = self.conntrack.map().fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
    }

    // ----- Runtime settings (the SETTINGS map) -----

    /// The runtime settings as the map holds them.
    pub fn settings(&self) -> Result<Settings, BalancerError> {
        self.settings.get(&0, 0).map_err(map_err("SETTINGS"))
    }

    /// Writes all runtime settings at once (they take effect with the next packet).
    pub fn set_settings(&mut self, s: &Settings) -> Result<(), BalancerError> {
        let s = Settings {
            version: SETTINGS_VERSION,
            ..*s
        };
        self.settings.set(0, s, 0).map_err(map_err("SETTINGS"))
    }

    fn update_settings(&mut self, f: impl FnOnce(&mut Settings)) -> Result<(), BalancerError> {
        let mut s = self.settings()?;
        f(&mut s);
        self.set_settings(&s)
    }

    /// Idle timeouts of connection-table entries, in milliseconds (`None`: never). Defaults:
    /// TCP [`lb_common::DEFAULT_TCP_IDLE_MS`] (1 h), UDP [`lb_common::DEFAULT_UDP_IDLE_MS`]
    /// (30 s). An entry idle longer than its protocol's timeout is no longer honoured: the
    /// flow's next packet is chosen again from the ring. Resolution: the coarse clock (one
    /// kernel tick). The established path judges idleness by its CPU's copy of that clock,
    /// refreshed by every new flow and every 256th packet to a backend on that CPU, so on a
    /// CPU without traffic an expiry waits for its next new flow (never comes early).
    pub fn set_idle_timeouts(
        &mut self,
        tcp_ms: Option<u32>,
        udp_ms: Option<u32>,
    ) -> Result<(), BalancerError> {
        self.update_settings(|s| {
            s.tcp_idle_ticks = tcp_ms.map_or(0, |ms| ms_to_ticks(ms).max(1));
            s.udp_idle_ticks = udp_ms.map_or(0, |ms| ms_to_ticks(ms).max(1));
        })
    }

    /// Flood threshold in new flows per second per CPU (`None`: no threshold). Default
    /// [`lb_common::DEFAULT_FLOOD_NEW_FLOWS_PER_S`] (100,000). A CPU that inserted that many
    /// (scaled to its ~134 ms window) stops inserting for the rest of the window: new flows
    /// still get a backend from the ring, but a flood cannot evict established flows.
    pub fn set_flood_threshold(
        &mut self,
        new_flows_per_s: Option<u32>,
    ) -> Result<(), BalancerError> {
        if new_flows_per_s == Some(0) {
            return Err(BalancerError::BadSetting(
                "flood threshold 0: use None for no threshold".into(),
            ));
        }
        self.update_settings(|s| s.flood_new_flows_per_s = new_flows_per_s.unwrap_or(0))
    }

    /// The encapsulation toward backends. Default IP-in-IP. The backends' decap must match
    /// (`maglb_decap` takes both; GUE on port [`lb_common::DEFAULT_GUE_PORT`] unless told
    /// another, see `Decap::set_gue_port`).
    pub fn set_encap(&mut self, encap: Encap) -> Result<(), BalancerError> {
        if encap == (Encap::Gue { port: 0 }) {
            return Err(BalancerError::BadSetting("GUE port 0".into()));
        }
        self.update_settings(|s| match encap {
            Encap::Ipip => s.encap = ENCAP_IPIP,
            Encap::Gue { port } => {
                s.encap = ENCAP_GUE;
                s.gue_port = port;
            }
        })
    }

    /// The encapsulation in force.
    pub fn encap(&self) -> Result<Encap, BalancerError> {
        let s = self.settings()?;
        Ok(if s.encap == ENCAP_GUE {
            Encap::Gue { port: s.gue_port }
        } else {
            Encap::Ipip
        })
    }

    // ----- Per-VIP policy for new flows (VIP_POLICY, PREFIXES_V4/V6) -----

    /// The policy entry of VIP `index` as the map holds it.
    pub fn vip_policy(&self, index: u32) -> Result<VipPolicy, BalancerError> {
        self.vip_policy
            .get(&index, 0)
            .map_err(map_err("VIP_POLICY"))
    }

    fn update_policy(
        &mut self,
        index: u32,
        f: impl FnOnce(&mut VipPolicy),
    ) -> Result<(), BalancerError> {
        let mut p = self.vip_policy(index)?;
        f(&mut p);
        self.vip_policy
            .set(index, p, 0)
            .map_err(map_err("VIP_POLICY"))
    }

    /// Per-source limit on new flows for VIP `index` (`rate_limit = { new_flows_per_s,
    /// burst }`), per client /32 (IPv4) or /64 (IPv6); `None` removes it. New flows above it
    /// are dropped and counted as `drop_src_rate` of the VIP. Established flows are never
    /// limited. The buckets are shared by all CPUs (a source may pass by one flow per CPU
    /// more than its burst when its flows arrive on several CPUs at once).
    pub fn set_vip_source_limit(
        &mut self,
        index: u32,
        limit: Option<RateLimit>,
    ) -> Result<(), BalancerError> {
        let (interval, tolerance) = match limit {
            Some(l) => l.gcra(1)?,
            None => (0, 0),
        };
        self.update_policy(index, |p| {
            p.src_interval_ns = interval;
            p.src_tolerance_ns = tolerance;
        })
    }

    /// Cap on the new flows of VIP `index` (all sources together); `None` removes it. Each
    /// CPU admits its share (rate and burst divided by the number of CPUs), so the cap holds
    /// without a shared counter when RSS spreads flows evenly. Drops count as `drop_vip_cap`.
    pub fn set_vip_new_flow_cap(
        &mut self,
        index: u32,
        cap: Option<RateLimit>,
    ) -> Result<(), BalancerError> {
        let (interval, tolerance) = match cap {
            Some(c) => c.gcra(possible_cpus())?,
            None => (0, 0),
        };
        self.update_policy(index, |p| {
            p.cap_interval_ns = interval;
            p.cap_tolerance_ns = tolerance;
        })
    }

    /// Source prefixes of VIP `index` (replacing the ones it had). With an allow list, only
    /// sources matching an allowed prefix start flows (`drop_not_allowed` otherwise); a
    /// source matching a denied prefix never does (`drop_denied`). The longest matching
    /// prefix decides, so `deny 10.0.0.0/8` with `allow 10.1.0.0/16` admits 10.1.x.x only
    /// (with an allow list) or everything but the rest of 10/8 (without one); a prefix on
    /// both lists is denied. Applies to new flows only.
    pub fn set_vip_prefixes(
        &mut self,
        index: u32,
        allow: &[Prefix],
        deny: &[Prefix],
    ) -> Result<(), BalancerError> {
        // Old entries of this VIP go first.
        let old4: Vec<_> = self
            .prefixes_v4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().vip == index)
            .collect();
        for k in old4 {
            let _ = self.prefixes_v4.remove(&k);
        }
        let old6: Vec<_> = self
            .prefixes_v6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().vip == index)
            .collect();
        for k in old6 {
            let _ = self.prefixes_v6.remove(&k);
        }
        for (list, action) in [(allow, PREFIX_ALLOW), (deny, PREFIX_DENY)] {
            for p in list {
                let (words, family) = addr::to_words(p.addr);
                if family == FAMILY_V4 {
                    let len = p.len.min(32) as u32;
                    let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                    let a = (u32::from_be(words[0]) & mask).to_be();
                    let key = LpmKey::new(
                        32 + len,
                        PrefixData4 {
                            vip: index,
                            addr: a,
                        },
                    );
                    self.prefixes_v4
                        .insert(&key, action, 0)
                        .map_err(map_err("PREFIXES_V4"))?;
                } else {
                    let len = p.len.min(128) as u32;
                    let bits = u128::from_be_bytes(addr::bytes(p.addr).try_into().expect("v6"));
                    let mask = if len == 0 {
                        0
                    } else {
                        u128::MAX << (128 - len)
                    };
                    let masked = IpAddr::from((bits & mask).to_be_bytes());
                    let key = LpmKey::new(
                        32 + len,
                        PrefixData6 {
                            vip: index,
                            addr: addr::to_words(masked).0,
                        },
                    );
                    self.prefixes_v6
                        .insert(&key, action, 0)
                        .map_err(map_err("PREFIXES_V6"))?;
                }
            }
        }
        let any = !allow.is_empty() || !deny.is_empty();
        let allow_only = !allow.is_empty();
        self.update_policy(index, |p| {
            p.flags &= !(POLICY_F_PREFIXES | POLICY_F_ALLOW_ONLY);
            if any {
                p.flags |= POLICY_F_PREFIXES;
            }
            if allow_only {
                p.flags |= POLICY_F_ALLOW_ONLY;
            }
        })
    }

    /// Removes every policy of VIP `index` (for a VIP that is gone, before its index is
    /// reused).
    pub fn clear_vip_policy(&mut self, index: u32) -> Result<(), BalancerError> {
        self.set_vip_prefixes(index, &[], &[])?;
        self.vip_policy
            .set(index, VipPolicy::default(), 0)
            .map_err(map_err("VIP_POLICY"))
    }

    /// Forgets VIP index `index` (call when it is freed, before it is reused): its policy is
    /// removed, and its drop counters and the counters of its backend slots are zeroed, so a
    /// VIP that reuses the index starts from zero.
    pub fn forget_vip(&mut self, index: u32) -> Result<(), BalancerError> {
        self.clear_vip_policy(index)?;
        let cpus = possible_cpus() as usize;
        let zero = |what: &'static str| {
            move |e: io::Error| BalancerError::Map {
                map: what,
                source: MapError::from(e),
            }
        };
        for r in 0..vip_stat::STRIDE {
            let z = PerCpuValues::try_from(vec![Counter::default(); cpus])
                .map_err(zero("VIP_DROPS"))?;
            self.vip_drops
                .set(index * vip_stat::STRIDE + r, z, 0)
                .map_err(map_err("VIP_DROPS"))?;
        }
        let owned: Vec<u32> = self
            .slots
            .iter()
            .filter(|(_, (vip, _))| *vip == index)
            .map(|(slot, _)| *slot)
            .collect();
        for slot in owned {
            let z = PerCpuValues::try_from(vec![BackendCounter::default(); cpus])
                .map_err(zero("BACKEND_STATS"))?;
            self.backend_stats
                .set(slot, z, 0)
                .map_err(map_err("BACKEND_STATS"))?;
            self.slots.remove(&slot);
        }
        Ok(())
    }

    // ----- Counters (per-CPU, summed here; one counter per packet in the datapath) -----

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

    /// Backend slot `index`'s counter: packets and bytes forwarded to it (as received), and
    /// how many of those the ring chose (new flows); the rest hit the connection table.
    pub fn backend_counter(&self, index: u32) -> BackendCounter {
        let mut total = BackendCounter::default();
        if let Ok(values) = self.backend_stats.get(&index, 0) {
            for c in values.iter() {
                total.packets += c.packets;
                total.bytes += c.bytes;
                total.new_flows += c.new_flows;
            }
        }
        total
    }

    /// Packets and bytes forwarded to backend slot `index`.
    pub fn backend_stats(&self, index: u32) -> Counter {
        let c = self.backend_counter(index);
        Counter {
            packets: c.packets,
            bytes: c.bytes,
        }
    }

    /// The summed counters of VIP `index`'s backend slots.
    fn vip_counter(&self, index: u32) -> BackendCounter {
        let mut total = BackendCounter::default();
        for (&slot, &(vip, _)) in &self.slots {
            if vip == index {
                let c = self.backend_counter(slot);
                total.packets += c.packets;
                total.bytes += c.bytes;
                total.new_flows += c.new_flows;
            }
        }
        total
    }

    /// Packets and bytes of VIP `index` forwarded to its backends (the sum of its backend
    /// slots' counters, the slots it no longer uses included).
    pub fn vip_stats(&self, index: u32) -> Counter {
        let c = self.vip_counter(index);
        Counter {
            packets: c.packets,
            bytes: c.bytes,
        }
    }

    /// New flows of VIP `index` (packets whose backend the ring chose).
    pub fn vip_new_flows(&self, index: u32) -> u64 {
        self.vip_counter(index).new_flows
    }

    /// Packets of VIP `index` that were not forwarded, by reason (`vip_stat` names:
    /// `drop_no_backend`, `drop_src_rate`, ...).
    pub fn vip_drops(&self, index: u32) -> Vec<(&'static str, Counter)> {
        (0..vip_stat::COUNT)
            .map(|r| {
                (
                    stat::NAMES[vip_stat::GLOBAL[r as usize] as usize],
                    Self::sum(&self.vip_drops, index * vip_stat::STRIDE + r),
                )
            })
            .collect()
    }

    /// One per-VIP reason of VIP `index` (`vip_stat::*`).
    pub fn vip_drop(&self, index: u32, reason: u32) -> Counter {
        Self::sum(&self.vip_drops, index * vip_stat::STRIDE + reason)
    }

    /// What the flood mode did, summed over CPUs.
    pub fn flood_stats(&self) -> FloodStats {
        let mut f = FloodStats::default();
        if let Ok(values) = self.flood.get(&0, 0) {
            for m in values.iter() {
                f.not_inserted += m.not_inserted;
                f.flood_windows += m.flood_windows;
            }
        }
        f
    }

    /// Global counters by reason, summed over CPUs, with their names (the decap program's
    /// reasons are not the balancer's and are left out). `tx_encap`, `conntrack_hit` and
    /// `conntrack_miss` are derived from the backend counters (`tx_encap` bytes include the
    /// outer headers of the encapsulation in force now); the per-VIP reasons are summed
    /// over all VIP indices.
    pub fn global_stats(&self) -> Vec<(&'static str, Counter)> {
        (0..stat::COUNT)
            .filter(|i| ![stat::DECAP_OK, stat::DECAP_PASS].contains(i))
            .map(|i| (stat::NAMES[i as usize], self.global_stat(i)))
            .collect()
    }

    /// One global counter (see [`Balancer::global_stats`]).
    pub fn global_stat(&self, reason: u32) -> Counter {
        match reason {
            stat::TX_ENCAP | stat::CT_HIT | stat::CT_MISS => {
                let gue = if self.settings().is_ok_and(|s| s.encap == ENCAP_GUE) {
                    8
                } else {
                    0
                };
                let mut out = Counter::default();
                for (&slot, &(_, family)) in &self.slots {
                    let c = self.backend_counter(slot);
                    let (packets, bytes) = match reason {
                        stat::TX_ENCAP => {
                            let ip = if family == FAMILY_V4 { 20 } else { 40 };
                            (c.packets, c.bytes + c.packets * (ip + gue))
                        }
                        stat::CT_HIT => (c.packets - c.new_flows, 0),
                        _ => (c.new_flows, 0),
                    };
                    out.packets += packets;
                    out.bytes += bytes;
                }
                out
            }
            _ => match vip_stat::GLOBAL.iter().position(|&g| g == reason) {
                Some(r) => {
                    let mut out = Counter::default();
                    for vip in 0..MAX_VIPS {
                        let c = Self::sum(&self.vip_drops, vip * vip_stat::STRIDE + r as u32);
                        out.packets += c.packets;
                        out.bytes += c.bytes;
                    }
                    out
                }
                None => Self::sum(&self.global_stats, reason),
            },
        }
    }
}
