//! The probe classifier (`maglb_probe_encap`, see `lb-ebpf/src/bin/probe_encap.rs`): health
//! probes that travel the data path. It runs on the egress of the balancer's interface and
//! encapsulates packets marked `PROBE_MARK_TAG | slot` toward the backend in that slot.
//!
//! It shares the balancer's pinned `BACKENDS`, `CONFIG` and `SETTINGS` maps (loaded with
//! their pin paths), so a probe goes where, and in the encapsulation (IP-in-IP or GUE) in
//! which, the datapath itself would send a client's packet. It is
//! attached with a tcx link (Linux 6.6 and later; a clsact filter before) owned by the agent:
//! when the agent exits, even killed, the link goes with it. Only probes need it, and only
//! the agent probes.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, PerCpuArray},
    programs::{
        ProgramError, SchedClassifier, TcAttachType,
        tc::{self, SchedClassifierLinkId},
    },
    util::KernelVersion,
};
use lb_common::{Counter, probe_stat};

use crate::programs;

pub const PROGRAM: &str = "maglb_probe_encap";
/// The balancer's maps this program reads, by the names both objects give them.
const SHARED_MAPS: [&str; 3] = ["BACKENDS", "CONFIG", "SETTINGS"];

/// Why the probe classifier is not there.
#[derive(Debug, thiserror::Error)]
pub enum ProbeEncapError {
    #[error(
        "the balancer's maps are not pinned at {0} (the agent pins them when it loads the datapath)"
    )]
    NotPinned(PathBuf),
    #[error("loading the probe classifier object")]
    Load(#[source] aya::EbpfError),
    #[error("the probe classifier object lacks {PROGRAM} or its PROBE_STATS map")]
    Missing,
    #[error("loading {PROGRAM} into the kernel (the verifier's log follows)")]
    Program(#[source] ProgramError),
    #[error("attaching {PROGRAM} to the egress of {iface}")]
    Attach {
        iface: String,
        #[source]
        source: ProgramError,
    },
}

/// The loaded probe classifier, attached to at most one interface.
pub struct ProbeEncap {
    ebpf: Ebpf,
    link: Option<(String, SchedClassifierLinkId)>,
    stats: ProbeStats,
}

/// The classifier's counters, for readers (cheap to clone).
#[derive(Clone)]
pub struct ProbeStats(Arc<PerCpuArray<MapData, Counter>>);

impl fmt::Debug for ProbeStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProbeStats")
    }
}

impl ProbeStats {
    /// Packets and bytes by `probe_stat` index, summed over CPUs.
    pub fn read(&self) -> [Counter; probe_stat::COUNT as usize] {
        let mut out = [Counter::default(); probe_stat::COUNT as usize];
        for (i, total) in out.iter_mut().enumerate() {
            if let Ok(v) = self.0.get(&(i as u32), 0) {
                for c in v.iter() {
                    total.packets += c.packets;
                    total.bytes += c.bytes;
                }
            }
        }
        out
    }
}

impl ProbeEncap {
    /// Loads the classifier with the balancer's maps pinned under `layout_dir`
    /// (`BPFFS/maps-vN`). They must be there: a map made here would be a copy the balancer
    /// never writes.
    pub fn load(layout_dir: &Path) -> Result<Self, ProbeEncapError> {
        let mut loader = EbpfLoader::new();
        let paths: Vec<(&str, PathBuf)> = SHARED_MAPS
            .iter()
            .map(|m| (*m, layout_dir.join(m)))
            .collect();
        for (name, path) in &paths {
            if !path.exists() {
                return Err(ProbeEncapError::NotPinned(path.clone()));
            }
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader
            .load(programs::PROBE_ENCAP)
            .map_err(ProbeEncapError::Load)?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut(PROGRAM)
            .ok_or(ProbeEncapError::Missing)?
            .try_into()
            .map_err(ProbeEncapError::Program)?;
        prog.load().map_err(ProbeEncapError::Program)?;
        let stats = ebpf
            .take_map("PROBE_STATS")
            .ok_or(ProbeEncapError::Missing)?;
        let stats = PerCpuArray::try_from(stats).map_err(|_| ProbeEncapError::Missing)?;
        Ok(Self {
            ebpf,
            link: None,
            stats: ProbeStats(Arc::new(stats)),
        })
    }

    fn program(&mut self) -> &mut SchedClassifier {
        self.ebpf
            .program_mut(PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("loaded in ProbeEncap::load")
    }

    /// The interface it is attached to.
    pub fn attached_to(&self) -> Option<&str> {
        self.link.as_ref().map(|(i, _)| i.as_str())
    }

    /// Attaches it to the egress of `iface` (in the calling thread's network namespace),
    /// after detaching it from where it was.
    pub fn attach(&mut self, iface: &str) -> Result<(), ProbeEncapError> {
        self.detach();
        let tcx = KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0));
        if !tcx {
            // Before tcx: a clsact qdisc carries the filter (it may be there already).
            let _ = tc::qdisc_add_clsact(iface);
        }
        let id = self
            .program()
            .attach(iface, TcAttachType::Egress)
            .map_err(|source| ProbeEncapError::Attach {
                iface: iface.to_owned(),
                source,
            })?;
        self.link = Some((iface.to_owned(), id));
        Ok(())
    }

    pub fn detach(&mut self) {
        if let Some((_, id)) = self.link.take() {
            let _ = self.program().detach(id);
        }
    }

    /// A handle on its counters.
    pub fn stats(&self) -> ProbeStats {
        self.stats.clone()
    }
}

impl Drop for ProbeEncap {
    fn drop(&mut self) {
        self.detach();
    }
}
