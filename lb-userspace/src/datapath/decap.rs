//! The backend-side decap program: load, attach, say which outer addresses are ours.

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, Map, MapData, PerCpuArray},
    programs::{Xdp, links::PinnedLink},
};
use lb_common::{AddrKey, Counter, stat};

use crate::{
    addr,
    datapath::{DatapathError, Mode, attach_xdp, pin_link},
    netlink, programs,
    state::check_ifname,
};

/// Where `maglb decap attach` pins its link and maps, one directory per interface.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/maglb-decap";

pub const PROGRAM: &str = "maglb_decap";
/// The program that passes everything (a veth peer of an XDP_TX sender needs one; benches
/// use it as the empty baseline).
pub const PASS_PROGRAM: &str = "maglb_pass";

/// A loaded decap object (`maglb_decap` and `maglb_pass`).
pub struct Decap {
    ebpf: Ebpf,
}

fn prog<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, DatapathError> {
    ebpf.program_mut(name)
        .ok_or(DatapathError::Missing(name))?
        .try_into()
        .map_err(|source| DatapathError::Program { name, source })
}

impl Decap {
    /// Loads both programs.
    pub fn load() -> Result<Self, DatapathError> {
        Self::open(None)
    }

    /// Loads both programs; with `pins`, the maps are pinned there (reused if present).
    fn open(pins: Option<&Path>) -> Result<Self, DatapathError> {
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = pins
            .map(|d| {
                vec![
                    ("DECAP_ADDRS", d.join("addrs")),
                    ("DECAP_STATS", d.join("stats")),
                    ("DECAP_GUE", d.join("gue")),
                ]
            })
            .unwrap_or_default();
        for (name, path) in &paths {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(programs::DECAP).map_err(DatapathError::Load)?;
        for name in [PROGRAM, PASS_PROGRAM] {
            prog(&mut ebpf, name)?
                .load()
                .map_err(|source| DatapathError::Program { name, source })?;
        }
        Ok(Self { ebpf })
    }

    /// Attaches `program` (`PROGRAM` or `PASS_PROGRAM`) to `iface` in the calling thread's
    /// network namespace. It stays attached while `self` lives.
    pub fn attach(
        &mut self,
        program: &'static str,
        iface: &str,
        mode: Mode,
    ) -> Result<(), DatapathError> {
        attach_xdp(prog(&mut self.ebpf, program)?, iface, mode)?;
        Ok(())
    }

    /// A program, for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self, name: &'static str) -> Result<&mut Xdp, DatapathError> {
        prog(&mut self.ebpf, name)
    }

    /// Accepts encapsulated packets addressed to `a`.
    pub fn add_addr(&mut self, a: IpAddr) -> Result<(), DatapathError> {
        let (words, family) = addr::to_words(a);
        let mut map = self.addrs()?;
        let key = AddrKey {
            addr: words,
            family,
            proto: 0,
            _pad: [0; 2],
        };
        map.insert(key, 1, 0).map_err(|source| DatapathError::Map {
            map: "DECAP_ADDRS",
            source,
        })
    }

    /// Accepts exactly the addresses in `addrs` (entries for others are removed).
    pub fn set_addrs(&mut self, addrs: &[IpAddr]) -> Result<(), DatapathError> {
        let mut map = self.addrs()?;
        let old: Vec<AddrKey> = map.keys().filter_map(Result::ok).collect();
        for k in old {
            let _ = map.remove(&k);
        }
        for a in addrs {
            self.add_addr(*a)?;
        }
        Ok(())
    }

    /// The UDP port on which GUE packets are decapsulated: `Some(port)`, or `None` (or port
    /// 0) to leave GUE alone. Never set: [`lb_common::DEFAULT_GUE_PORT`], the balancer's
    /// default.
    pub fn set_gue_port(&mut self, port: Option<u16>) -> Result<(), DatapathError> {
        let err = |source| DatapathError::Map {
            map: "DECAP_GUE",
            source,
        };
        let mut map: Array<&mut MapData, u32> = self
            .ebpf
            .map_mut("DECAP_GUE")
            .ok_or(DatapathError::Missing("map DECAP_GUE"))?
            .try_into()
            .map_err(err)?;
        let value = match port {
            Some(0) | None => lb_common::DECAP_GUE_OFF,
            Some(p) => u32::from(p),
        };
        map.set(0, value, 0).map_err(err)
    }

    fn addrs(&mut self) -> Result<HashMap<&mut MapData, AddrKey, u32>, DatapathError> {
        self.ebpf
            .map_mut("DECAP_ADDRS")
            .ok_or(DatapathError::Missing("map DECAP_ADDRS"))?
            .try_into()
            .map_err(|source| DatapathError::Map {
                map: "DECAP_ADDRS",
                source,
            })
    }

    /// Packets decapsulated so far.
    pub fn decapsulated(&self) -> Counter {
        match self.ebpf.map("DECAP_STATS") {
            Some(m) => decapsulated(PerCpuArray::<&MapData, Counter>::try_from(m).ok()),
            None => Counter::default(),
        }
    }
}

fn decapsulated(m: Option<PerCpuArray<&MapData, Counter>>) -> Counter {
    let mut total = Counter::default();
    if let Some(m) = m
        && let Ok(v) = m.get(&stat::DECAP_OK, 0)
    {
        for c in v.iter() {
            total.packets += c.packets;
            total.bytes += c.bytes;
        }
    }
    total
}

/// Errors of the pinned decap commands.
#[derive(Debug, thiserror::Error)]
pub enum DecapError {
    #[error("{0}")]
    BadInterface(String),
    #[error("decap is not attached to {iface} (no pin under {dir})")]
    NotAttached { iface: String, dir: PathBuf },
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error("pins under {dir}")]
    Pin {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("reading local addresses")]
    Netlink(#[from] netlink::NetlinkError),
    #[error(transparent)]
    Bpffs(#[from] crate::bpffs::BpffsError),
}

fn pin_err(dir: &Path) -> impl Fn(&dyn std::fmt::Display) -> DecapError + '_ {
    move |e| DecapError::Pin {
        dir: dir.to_owned(),
        source: io::Error::other(e.to_string()),
    }
}

/// Checks that `iface` exists, and lists every address of this host.
fn local_addresses(iface: &str) -> Result<Vec<IpAddr>, DecapError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| DecapError::Pin {
            dir: PathBuf::new(),
            source: e,
        })?;
    rt.block_on(async {
        let h = netlink::connect()?;
        netlink::link(&h, iface)
            .await
            .map_err(|e| DecapError::BadInterface(e.to_string()))?;
        Ok(netlink::all_addresses(&h).await?)
    })
}

/// `maglb decap attach`: attaches the decap program to `iface` and pins it, so it stays
/// after the command exits; it decapsulates IP-in-IP packets to any address of this host,
/// and GUE packets to UDP port `gue_port` (0: none). Run again to refresh the addresses or
/// change the port.
pub fn attach_pinned(
    pin_dir: &Path,
    iface: &str,
    mode: Mode,
    gue_port: u16,
) -> Result<Vec<IpAddr>, DecapError> {
    check_ifname(iface).map_err(DecapError::BadInterface)?;
    let addrs = local_addresses(iface)?;
    crate::bpffs::ensure(pin_dir)?;
    let dir = pin_dir.join(iface);
    std::fs::create_dir_all(&dir).map_err(|e| pin_err(&dir)(&e))?;
    let mut d = Decap::open(Some(&dir))?;
    let link_path = dir.join("link");
    if !link_path.exists() {
        let prog = d.program(PROGRAM)?;
        let id = attach_xdp(prog, iface, mode)?;
        pin_link(prog, id, &link_path)?;
    }
    d.set_addrs(&addrs)?;
    d.set_gue_port(Some(gue_port))?;
    Ok(addrs)
}

/// `maglb decap detach`.
pub fn detach_pinned(pin_dir: &Path, iface: &str) -> Result<(), DecapError> {
    check_ifname(iface).map_err(DecapError::BadInterface)?;
    let dir = pin_dir.join(iface);
    let link = dir.join("link");
    if !link.exists() {
        return Err(DecapError::NotAttached {
            iface: iface.into(),
            dir,
        });
    }
    let pinned = PinnedLink::from_pin(&link).map_err(|e| pin_err(&dir)(&e))?;
    pinned.unpin().map_err(|e| pin_err(&dir)(&e))?;
    for f in ["addrs", "stats", "gue"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    let _ = std::fs::remove_dir(&dir);
    Ok(())
}

/// One interface with the decap program attached.
#[derive(Debug, serde::Serialize)]
pub struct DecapStatus {
    pub iface: String,
    pub packets: u64,
    pub bytes: u64,
}

/// `maglb decap status`: the pinned attachments and their counters.
pub fn status_pinned(pin_dir: &Path) -> Result<Vec<DecapStatus>, DecapError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(pin_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(pin_err(pin_dir)(&e)),
    };
    for e in entries.flatten() {
        let dir = e.path();
        if !dir.join("link").exists() {
            continue;
        }
        let stats = MapData::from_pin(dir.join("stats"))
            .ok()
            .map(Map::PerCpuArray);
        let c = decapsulated(stats.as_ref().and_then(|m| PerCpuArray::try_from(m).ok()));
        out.push(DecapStatus {
            iface: e.file_name().to_string_lossy().into_owned(),
            packets: c.packets,
            bytes: c.bytes,
        });
    }
    out.sort_by(|a, b| a.iface.cmp(&b.iface));
    Ok(out)
}
