//! The balancer's program and maps: load (fresh or pinned), attach, carry out the writes a
//! plan lists ([`crate::reconcile::Op`]), read back what the maps hold, and hand readers a
//! counters handle of their own.
//!
//! Only the agent's writer (and tests) hold a [`Datapath`]; readers get [`Counters`], which
//! has its own file descriptors and never waits for a write.

mod counters;
pub mod decap;
mod link;
mod observe;
mod policy;
pub mod probe_encap;
mod rings;
mod vip_table;

use std::{
    io,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfError, EbpfLoader,
    maps::{Array, HashMap, IterableMap as _, MapData, MapError, PerCpuArray},
    programs::{ProgramError, Xdp, xdp::XdpLinkId},
};
use lb_common::{
    AddrKey, Backend, BackendCounter, CONN_WAYS, Config, ConnEntry, ConnSet, Counter,
    DEFAULT_CONNTRACK_ENTRIES, FlowKey, SETTINGS_VERSION, Settings, VipKey, VipMeta, conn_set,
    flow_memo_slots, vip_stat,
};
use tracing::{info, warn};

pub use self::{
    counters::{Counters, FloodStats, Owners, Reading},
    link::{Mode, attach_xdp, pin_link},
    observe::observe_pinned,
};
use self::{rings::Rings, vip_table::VipTable};
use crate::{
    programs,
    reconcile::{Observed, Op},
};

/// Errors from loading, attaching or writing the balancer.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
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
    #[error("ring map of VIP index {index}")]
    Ring {
        index: u32,
        #[source]
        source: io::Error,
    },
    #[error("pinned objects under {dir}")]
    Pin {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map { map, source }
}

fn pin_error(dir: &Path, e: impl std::fmt::Display) -> DatapathError {
    DatapathError::Pin {
        dir: dir.to_owned(),
        source: io::Error::other(e.to_string()),
    }
}

pub const PROGRAM: &str = "maglb_balancer";

/// The maps, by the names the object gives them.
pub const MAPS: [&str; 21] = [
    "VIPS",
    "VIP_TABLE",
    "VIP_ADDRS",
    "RINGS",
    "RINGS_FIXED",
    "BACKENDS",
    "CONNTRACK",
    "CONFIG",
    "SETTINGS",
    "VIP_POLICY",
    "PREFIXES_V4",
    "PREFIXES_V6",
    "SRC_LIMIT",
    "SRC_SEEN",
    "VIP_CAP",
    "FLOOD",
    "CLOCK",
    "BACKEND_STATS",
    "VIP_DROPS",
    "GLOBAL_STATS",
    "VIP_FILTER",
];

/// Version of the map layout. Pins live in a directory of that name under the BPF filesystem
/// directory, so a maglb with other maps never reads them as its own. Bump it whenever a
/// map's key, value or size changes. A newer agent that finds an older layout pinned migrates
/// it (see [`Datapath::load_pinned`]).
pub const LAYOUT: &str = "maps-v8";
const LINK_FILE: &str = "link";

/// Load-time options: fixed for the life of the maps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Size of the connection table in flows (`conntrack_entries`), rounded up to a power of
    /// two sets of `CONN_WAYS` (`conntrack_sets`); all CPUs share the table. About
    /// [`lb_common::CONNTRACK_BYTES_PER_ENTRY`] bytes of kernel memory each.
    pub conntrack_entries: u32,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            conntrack_entries: DEFAULT_CONNTRACK_ENTRIES,
        }
    }
}

/// The size of the connection table pinned under `dir` (in flows) when it differs from what
/// `opts` asks for.
fn pinned_conntrack_size(dir: &Path, opts: &LoadOptions) -> Result<Option<u32>, DatapathError> {
    let path = dir.join("CONNTRACK");
    if !path.exists() {
        return Ok(None);
    }
    let map = MapData::from_pin(&path).map_err(map_err("CONNTRACK"))?;
    let pinned = map.info().map_err(map_err("CONNTRACK"))?.max_entries();
    let wanted = conntrack_sets(opts.conntrack_entries);
    Ok((pinned != wanted).then_some(pinned * CONN_WAYS as u32))
}

/// Sets of the connection table for `entries` flows: a power of two, so that the datapath
/// picks a set with a mask.
fn conntrack_sets(entries: u32) -> u32 {
    entries.div_ceil(CONN_WAYS as u32).next_power_of_two()
}

/// The maps user space writes and reads.
struct Maps {
    vips: HashMap<MapData, VipKey, VipMeta>,
    vip_table: VipTable,
    vip_addrs: HashMap<MapData, AddrKey, VipMeta>,
    backends: Array<MapData, Backend>,
    conntrack: Array<MapData, ConnSet>,
    config: Array<MapData, Config>,
    settings: Array<MapData, Settings>,
    policy: policy::PolicyMaps,
    backend_stats: PerCpuArray<MapData, BackendCounter>,
    vip_drops: PerCpuArray<MapData, Counter>,
    vip_filter: Array<MapData, u64>,
    /// What `vip_filter` holds (read back when the maps are adopted).
    filter: Vec<u64>,
}

/// The loaded balancer.
pub struct Datapath {
    ebpf: Ebpf,
    link: Option<XdpLinkId>,
    /// Where maps and the XDP link are pinned, if they are (the agent pins; tests do not).
    pin_dir: Option<PathBuf>,
    maps: Maps,
    rings: Rings,
    /// A directory of an older layout whose link the program takes over once the maps carry
    /// the state ([`Datapath::finish_migration`]).
    migrating_from: Option<PathBuf>,
    /// Why a pinned link found at load was unpinned (it was defunct).
    defunct: Option<String>,
    counters: Counters,
}

impl Datapath {
    /// Loads the balancer program with fresh, unpinned maps (nothing is attached yet).
    pub fn load(opts: &LoadOptions) -> Result<Self, DatapathError> {
        Self::open(None, opts)
    }

    /// Whether an attached datapath is pinned under `bpffs` (it forwards before any agent
    /// loads it).
    pub fn pinned_and_attached(bpffs: &Path) -> bool {
        bpffs.join(LAYOUT).join(LINK_FILE).exists()
    }

    /// Loads the balancer program with its maps pinned under `bpffs/LAYOUT`: maps already
    /// pinned there are reused (their contents survive), missing ones are created and pinned.
    /// If an XDP link is pinned there, the new program replaces the old one on it atomically,
    /// so forwarding never stops; a link whose interface is gone is unpinned (and logged).
    ///
    /// If only an older layout is pinned, its maps are left alone and fresh ones are made; the
    /// caller writes the state into them and then calls [`Datapath::finish_migration`], which
    /// moves the old link to this program in one atomic replace. Connection-table entries and
    /// counters do not carry over; established flows keep their backend through the Maglev
    /// table as long as the backend set is unchanged. A connection table pinned with another
    /// size than `opts` asks for is moved the same way: its maps become an older layout.
    /// Older layouts without a link are removed.
    pub fn load_pinned(bpffs: &Path, opts: &LoadOptions) -> Result<Self, DatapathError> {
        std::fs::create_dir_all(bpffs).map_err(|e| pin_error(bpffs, e))?;
        let dir = bpffs.join(LAYOUT);
        if let Some(pinned) = pinned_conntrack_size(&dir, opts)? {
            let aside = bpffs.join(format!("{LAYOUT}-conntrack-{pinned}"));
            info!(
                pinned,
                wanted = opts.conntrack_entries,
                "the connection table changes size; moving to new maps"
            );
            std::fs::rename(&dir, &aside).map_err(|e| pin_error(&dir, e))?;
        }
        let older = link::older_layouts(bpffs, LAYOUT).map_err(|e| pin_error(bpffs, e))?;
        std::fs::create_dir_all(&dir).map_err(|e| pin_error(&dir, e))?;
        let mut dp = Self::open(Some(&dir), opts)?;
        let link = dir.join(LINK_FILE);
        if link.exists() {
            match link::adopt(dp.program(), &link)? {
                link::Adopted::Linked(id) => dp.link = Some(id),
                link::Adopted::Defunct(why) => {
                    warn!(link = %link.display(), reason = %why,
                        "the pinned XDP link is defunct: its interface is gone; unpinned it, starting detached");
                    link::unpin(&link).map_err(|e| pin_error(&dir, e))?;
                    dp.defunct = Some(why);
                }
            }
        } else if let Some(old) = older.iter().find(|d| d.join(LINK_FILE).exists()) {
            info!(from = %old.display(), to = %dir.display(), "an older map layout is pinned; migrating");
            dp.migrating_from = Some(old.clone());
        }
        // Older layouts that no link uses forward nothing: their maps only hold memory.
        for old in older
            .iter()
            .filter(|d| Some(*d) != dp.migrating_from.as_ref())
        {
            if !old.join(LINK_FILE).exists() {
                info!(dir = %old.display(), "removing an older map layout that nothing uses");
                std::fs::remove_dir_all(old).map_err(|e| pin_error(old, e))?;
            }
        }
        Ok(dp)
    }

    fn open(pin_dir: Option<&Path>, opts: &LoadOptions) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        let sets = conntrack_sets(opts.conntrack_entries);
        loader.map_max_entries("CONNTRACK", sets);
        let mask = sets - 1;
        loader.override_global("CONNTRACK_SET_MASK", &mask, true);
        let cpus = aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32;
        let memo_slots = flow_memo_slots(cpus);
        loader.map_max_entries("FLOW_MEMO", cpus * memo_slots);
        let memo_mask = memo_slots - 1;
        loader.override_global("FLOW_MEMO_MASK", &memo_mask, true);
        let paths: Vec<(&str, PathBuf)> = match pin_dir {
            Some(dir) => MAPS.iter().map(|m| (*m, dir.join(m))).collect(),
            None => Vec::new(),
        };
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(programs::BALANCER)
            .map_err(DatapathError::Load)?;
        let prog: &mut Xdp = ebpf
            .program_mut(PROGRAM)
            .ok_or(DatapathError::Missing(PROGRAM))?
            .try_into()
            .map_err(|source| DatapathError::Program {
                name: PROGRAM,
                source,
            })?;
        prog.load().map_err(|source| DatapathError::Program {
            name: PROGRAM,
            source,
        })?;
        macro_rules! take {
            ($name:literal) => {{
                let map = ebpf
                    .take_map($name)
                    .ok_or(DatapathError::Missing(concat!("map ", $name)))?;
                map.try_into().map_err(map_err($name))?
            }};
        }
        let rings = Rings::open(|name| {
            ebpf.take_map(name)
                .ok_or(DatapathError::Missing("map RINGS or RINGS_FIXED"))
        })?;
        let global_stats: PerCpuArray<MapData, Counter> = take!("GLOBAL_STATS");
        let vips: HashMap<MapData, VipKey, VipMeta> = take!("VIPS");
        let vip_table = VipTable::open(take!("VIP_TABLE"), vips.iter().filter_map(Result::ok))?;
        let maps = Maps {
            vips,
            vip_table,
            vip_addrs: take!("VIP_ADDRS"),
            backends: take!("BACKENDS"),
            conntrack: take!("CONNTRACK"),
            config: take!("CONFIG"),
            settings: take!("SETTINGS"),
            policy: policy::PolicyMaps {
                vip_policy: take!("VIP_POLICY"),
                prefixes_v4: take!("PREFIXES_V4"),
                prefixes_v6: take!("PREFIXES_V6"),
            },
            backend_stats: take!("BACKEND_STATS"),
            vip_drops: take!("VIP_DROPS"),
            vip_filter: take!("VIP_FILTER"),
            filter: Vec::new(),
        };
        let flood = ebpf
            .map("FLOOD")
            .ok_or(DatapathError::Missing("map FLOOD"))?;
        let flood = match flood {
            aya::maps::Map::PerCpuArray(m) => m,
            _ => return Err(DatapathError::Missing("map FLOOD (a per-CPU array)")),
        };
        let counters = Counters::new(
            &maps.backend_stats,
            &maps.vip_drops,
            &global_stats,
            flood,
            &maps.settings,
        )?;
        let mut dp = Self {
            ebpf,
            link: None,
            pin_dir: pin_dir.map(Path::to_owned),
            maps,
            rings,
            migrating_from: None,
            defunct: None,
            counters,
        };
        if dp.settings()?.version == 0 {
            dp.set_settings(&Settings::default())?;
        }
        Ok(dp)
    }

    /// The runtime settings as the map holds them.
    pub fn settings(&self) -> Result<Settings, DatapathError> {
        self.maps.settings.get(&0, 0).map_err(map_err("SETTINGS"))
    }

    /// Writes the runtime settings (they take effect with the next packet).
    pub fn set_settings(&mut self, s: &Settings) -> Result<(), DatapathError> {
        let s = Settings {
            version: SETTINGS_VERSION,
            ..*s
        };
        self.maps.settings.set(0, s, 0).map_err(map_err("SETTINGS"))
    }

    /// The connection table's size in flows: its sets times `CONN_WAYS`.
    pub fn conntrack_capacity(&self) -> u32 {
        self.maps.conntrack.len() * CONN_WAYS as u32
    }

    /// A handle on the counters for readers (its own file descriptors).
    pub fn counters(&self) -> Counters {
        self.counters.clone()
    }

    /// Whether the program is attached (by this process or through a pinned link).
    pub fn is_attached(&self) -> bool {
        self.link.is_some()
    }

    /// Why a pinned link found at load was defunct and unpinned, if one was.
    pub fn defunct_link(&self) -> Option<&str> {
        self.defunct.as_deref()
    }

    /// Whether an older layout waits for [`Datapath::finish_migration`].
    pub fn is_migrating(&self) -> bool {
        self.migrating_from.is_some()
    }

    /// The program, for attaching elsewhere or for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in Datapath::open")
    }

    /// Attaches the program to `iface` (in the calling thread's network namespace). With a
    /// pin directory, the link is pinned: it outlives this process.
    pub fn attach(&mut self, iface: &str, mode: Mode) -> Result<(), DatapathError> {
        let mut link = attach_xdp(self.program(), iface, mode)?;
        if let Some(dir) = self.pin_dir.clone() {
            link = pin_link(self.program(), link, &dir.join(LINK_FILE))?;
        }
        self.link = Some(link);
        Ok(())
    }

    /// Detaches the program (and removes its pinned link).
    pub fn detach(&mut self) -> Result<(), DatapathError> {
        if let Some(id) = self.link.take() {
            let _ = self.program().detach(id);
        }
        if let Some(dir) = &self.pin_dir {
            let path = dir.join(LINK_FILE);
            if path.exists() {
                link::unpin(&path).map_err(|e| pin_error(dir, e))?;
            }
        }
        Ok(())
    }

    /// Takes over the link of the older layout found at load (one atomic program replace),
    /// copies its configuration when its layout is the same, and removes its pins.
    pub fn finish_migration(&mut self) -> Result<(), DatapathError> {
        let Some(old) = self.migrating_from.take() else {
            return Ok(());
        };
        let dir = self.pin_dir.clone().expect("migration only with pins");
        let new_link = dir.join(LINK_FILE);
        match link::adopt(self.program(), &old.join(LINK_FILE)) {
            Ok(link::Adopted::Linked(id)) => {
                let id = link::repin(self.program(), id, &new_link)?;
                self.link = Some(id);
                info!(from = %old.display(), "took over the XDP link of the older layout");
            }
            Ok(link::Adopted::Defunct(why)) => {
                warn!(reason = %why, "the older layout's link is defunct; starting detached");
                self.defunct = Some(why);
            }
            Err(e) => {
                warn!(error = %crate::error_chain(&e), "taking over the older layout's link; starting detached")
            }
        }
        std::fs::remove_dir_all(&old).map_err(|e| pin_error(&old, e))?;
        Ok(())
    }

    /// The configuration of an older layout, when its `CONFIG` map has today's value size
    /// (so that a migration forwards from its first moment).
    pub fn older_config(&self) -> Option<Config> {
        let old = self.migrating_from.as_ref()?;
        let map = MapData::from_pin(old.join("CONFIG")).ok()?;
        let map: Array<MapData, Config> =
            Array::try_from(aya::maps::Map::from_map_data(map).ok()?).ok()?;
        map.get(&0, 0).ok()
    }

    pub fn config(&self) -> Result<Config, DatapathError> {
        self.maps.config.get(&0, 0).map_err(map_err("CONFIG"))
    }

    pub fn set_config(&mut self, cfg: &Config) -> Result<(), DatapathError> {
        self.maps.config.set(0, cfg, 0).map_err(map_err("CONFIG"))
    }

    /// Carries out a plan's writes in order. Consecutive table writes (and the new ring maps
    /// they go into) are built and written on all cores at once; ring maps of consecutive
    /// `InstallRing` ops are installed together, so their RCU grace periods overlap.
    pub fn apply(&mut self, ops: Vec<Op>) -> Result<(), DatapathError> {
        let mut tables = Vec::new();
        let mut installs = Vec::new();
        for op in ops {
            match op {
                Op::WriteTable { index, offset, job } => {
                    tables.push((index, offset, job));
                    continue;
                }
                Op::InstallRing { index } => {
                    installs.push(index);
                    continue;
                }
                // A new ring map is needed only by the table writes that follow it: made
                // now, it does not break up the batch of tables built together.
                Op::NewRing { index, ring_size } => {
                    self.rings.create(index, ring_size)?;
                    continue;
                }
                _ => {}
            }
            self.rings.write_tables(std::mem::take(&mut tables))?;
            self.rings.install(&std::mem::take(&mut installs))?;
            self.apply_one(op)?;
        }
        self.rings.write_tables(tables)?;
        self.rings.install(&installs)
    }

    fn apply_one(&mut self, op: Op) -> Result<(), DatapathError> {
        let m = &mut self.maps;
        match op {
            Op::ZeroVipCounters(i) => {
                for r in 0..vip_stat::STRIDE {
                    counters::zero(&mut m.vip_drops, i * vip_stat::STRIDE + r, "VIP_DROPS")?;
                }
                Ok(())
            }
            Op::ZeroSlotCounters(i) => counters::zero(&mut m.backend_stats, i, "BACKEND_STATS"),
            Op::SetPolicy { index, policy } => m.policy.set(index, &policy),
            Op::SetBackend { slot, backend } => m
                .backends
                .set(slot, backend, 0)
                .map_err(map_err("BACKENDS")),
            Op::NewRing { .. } | Op::WriteTable { .. } | Op::InstallRing { .. } => {
                unreachable!("batched by apply")
            }
            Op::SetVip { key, meta } => {
                m.vips.insert(key, meta, 0).map_err(map_err("VIPS"))?;
                m.vip_table.set(key, meta)
            }
            Op::DelVip { key } => {
                m.vip_table.remove(&key)?;
                // The ring map stays installed at its index for a later VIP to reuse; this
                // process lets go of its handle, so its open files follow the live VIPs.
                if let Ok(meta) = m.vips.get(&key, 0) {
                    self.rings.release(meta.index);
                }
                ignore_missing(m.vips.remove(&key)).map_err(map_err("VIPS"))
            }
            Op::SetAddr { key, meta } => m
                .vip_addrs
                .insert(key, meta, 0)
                .map_err(map_err("VIP_ADDRS")),
            Op::DelAddr { key } => {
                ignore_missing(m.vip_addrs.remove(&key)).map_err(map_err("VIP_ADDRS"))
            }
            Op::SetFilter(words) => set_filter(m, &words),
        }
    }

    /// What the maps hold: VIP entries, used backend slots, ring maps and active tables,
    /// address entries and the filter.
    pub fn observe(&self) -> Result<Observed, DatapathError> {
        let m = &self.maps;
        observe::observe(
            &m.vips,
            m.vip_table.map(),
            &m.vip_addrs,
            &m.backends,
            &m.vip_filter,
            &self.rings,
        )
    }

    /// A connection-table entry, if any (the datapath's `conntrack::find`).
    pub fn conntrack(&self, flow: &FlowKey) -> Option<ConnEntry> {
        let h = lb_common::hash::flow_hash(flow);
        let set = self
            .maps
            .conntrack
            .get(&conn_set(h, self.maps.conntrack.len() - 1), 0)
            .ok()?;
        set.slots.iter().find(|s| s.holds(flow, h)).map(|s| s.entry)
    }

    /// How many per-source token buckets (`SRC_LIMIT`) exist: sources that started a second
    /// new flow within their VIP's interval.
    pub fn source_buckets(&self) -> usize {
        self.ebpf
            .map("SRC_LIMIT")
            .and_then(|m| HashMap::<_, lb_common::SrcKey, u64>::try_from(m).ok())
            .map_or(0, |m| m.keys().count())
    }

    /// Kernel memory of the connection table in bytes (its `memlock` in fdinfo), if known.
    pub fn conntrack_memory(&self) -> Option<u64> {
        use std::os::fd::{AsFd as _, AsRawFd as _};
        let fd = self.maps.conntrack.map().fd().as_fd().as_raw_fd();
        let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
        info.lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse().ok())
    }

    /// VIP index `index`'s policy entry as the map holds it.
    pub fn vip_policy(&self, index: u32) -> Result<lb_common::VipPolicy, DatapathError> {
        self.maps
            .policy
            .vip_policy
            .get(&index, 0)
            .map_err(map_err("VIP_POLICY"))
    }

    /// With `false`, empties the VIP table and marks every bucket spilled, so that the
    /// datapath finds every VIP in the `VIPS` hash map (as it does a key of a bucket that
    /// spilled): for benches and tests of that path. A VIP that changes is shown again;
    /// `true`, or the next open of the maps, shows them all again. The marks stay, so a
    /// lookup of a key that is no VIP keeps asking `VIPS` until new maps are made.
    pub fn use_vip_table(&mut self, on: bool) -> Result<(), DatapathError> {
        let m = &mut self.maps;
        if on {
            m.vip_table.fill(m.vips.iter().filter_map(Result::ok))
        } else {
            m.vip_table.spill_all()
        }
    }

    /// Number of connection-table slots in use (reads the whole table).
    pub fn conntrack_len(&self) -> usize {
        self.maps
            .conntrack
            .iter()
            .filter_map(Result::ok)
            .map(|set| set.slots.iter().filter(|s| s.check != 0).count())
            .sum()
    }
}

/// Makes the VIP address filter hold `words`, writing only the words that differ.
fn set_filter(m: &mut Maps, words: &[u64]) -> Result<(), DatapathError> {
    if m.filter.len() != words.len() {
        m.filter = (0..words.len() as u32)
            .map(|i| m.vip_filter.get(&i, 0).unwrap_or(0))
            .collect();
    }
    for (i, (old, new)) in m.filter.iter_mut().zip(words).enumerate() {
        if old != new {
            m.vip_filter
                .set(i as u32, new, 0)
                .map_err(map_err("VIP_FILTER"))?;
            *old = *new;
        }
    }
    Ok(())
}

/// Deleting a key that is not there is not an error here.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        r => r,
    }
}
