//! The backend-side decap program: load, attach, say which outer addresses are ours.

use std::net::IpAddr;

use aya::{
    Ebpf,
    maps::{HashMap, MapData, PerCpuArray},
    programs::Xdp,
};
use lb_common::{AddrKey, Counter, stat};

use crate::{
    addr,
    balancer::{BalancerError, Mode},
    programs,
};

pub const PROGRAM: &str = "maglb_decap";
/// The program that passes everything (a veth peer of an XDP_TX sender needs one; benches
/// use it as the empty baseline).
pub const PASS_PROGRAM: &str = "maglb_pass";

/// A loaded decap object (`maglb_decap` and `maglb_pass`).
pub struct Decap {
    ebpf: Ebpf,
}

fn prog<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Xdp, BalancerError> {
    ebpf.program_mut(name)
        .ok_or(BalancerError::Missing(name))?
        .try_into()
        .map_err(|source| BalancerError::Program { name, source })
}

impl Decap {
    /// Loads both programs.
    pub fn load() -> Result<Self, BalancerError> {
        let mut ebpf = Ebpf::load(programs::DECAP).map_err(BalancerError::Load)?;
        for name in [PROGRAM, PASS_PROGRAM] {
            prog(&mut ebpf, name)?
                .load()
                .map_err(|source| BalancerError::Program { name, source })?;
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
    ) -> Result<(), BalancerError> {
        let xdp_mode = match mode {
            Mode::Native => aya::programs::XdpMode::Driver,
            Mode::Generic => aya::programs::XdpMode::Skb,
        };
        prog(&mut self.ebpf, program)?
            .attach(iface, xdp_mode)
            .map_err(|source| BalancerError::Attach {
                iface: iface.into(),
                mode: mode.name(),
                source,
            })?;
        Ok(())
    }

    /// A program, for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self, name: &'static str) -> Result<&mut Xdp, BalancerError> {
        prog(&mut self.ebpf, name)
    }

    /// Accepts encapsulated packets addressed to `a`.
    pub fn add_addr(&mut self, a: IpAddr) -> Result<(), BalancerError> {
        let (words, family) = addr::to_words(a);
        let mut map: HashMap<&mut MapData, AddrKey, u32> = self
            .ebpf
            .map_mut("DECAP_ADDRS")
            .ok_or(BalancerError::Missing("map DECAP_ADDRS"))?
            .try_into()
            .map_err(|source| BalancerError::Map {
                map: "DECAP_ADDRS",
                source,
            })?;
        let key = AddrKey {
            addr: words,
            family,
            proto: 0,
            _pad: [0; 2],
        };
        map.insert(key, 1, 0).map_err(|source| BalancerError::Map {
            map: "DECAP_ADDRS",
            source,
        })
    }

    /// Packets decapsulated so far.
    pub fn decapsulated(&self) -> Counter {
        let mut total = Counter::default();
        if let Some(m) = self.ebpf.map("DECAP_STATS")
            && let Ok(m) = PerCpuArray::<&MapData, Counter>::try_from(m)
            && let Ok(v) = m.get(&stat::DECAP_OK, 0)
        {
            for c in v.iter() {
                total.packets += c.packets;
                total.bytes += c.bytes;
            }
        }
        total
    }
}
