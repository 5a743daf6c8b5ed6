//! The datapath and the reconciler together, without an agent: what tests, benchmarks and the
//! fuzzer use to load the balancer and give it VIPs directly. The agent does the same through
//! its writer, with a desired state, a state file and health in between.

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{Config, Counter};

use crate::{
    datapath::{Counters, Datapath, DatapathError, Mode},
    reconcile::{Exhausted, Reconciler},
    state::{BackendSpec, VipId, VipSpec},
};

#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
    #[error("VIP {0} does not exist")]
    UnknownVip(VipId),
}

/// A loaded balancer and the VIPs it carries.
pub struct Balancer {
    pub dp: Datapath,
    rec: Reconciler,
    specs: BTreeMap<VipId, VipSpec>,
    counters: Counters,
}

impl Balancer {
    /// Loads the balancer with fresh, unpinned maps (nothing attached).
    pub fn load() -> Result<Self, BalancerError> {
        let dp = Datapath::load()?;
        let counters = dp.counters();
        Ok(Self {
            dp,
            rec: Reconciler::new(),
            specs: BTreeMap::new(),
            counters,
        })
    }

    fn sync(&mut self) -> Result<(), BalancerError> {
        let specs: Vec<VipSpec> = self.specs.values().cloned().collect();
        let ops = self.rec.plan(&specs)?;
        self.dp.apply(ops)?;
        Ok(())
    }

    /// Adds or replaces a VIP with its backends.
    pub fn set_vip(&mut self, spec: VipSpec) -> Result<(), BalancerError> {
        let old = self.specs.insert(spec.id, spec.clone());
        self.sync().inspect_err(|_| {
            match old {
                Some(o) => self.specs.insert(spec.id, o),
                None => self.specs.remove(&spec.id),
            };
        })
    }

    /// Sets a VIP's backend list.
    pub fn set_backends(
        &mut self,
        id: &VipId,
        backends: Vec<BackendSpec>,
    ) -> Result<(), BalancerError> {
        let mut spec = self
            .specs
            .get(id)
            .ok_or(BalancerError::UnknownVip(*id))?
            .clone();
        spec.backends = backends;
        self.set_vip(spec)
    }

    pub fn del_vip(&mut self, id: &VipId) -> Result<(), BalancerError> {
        self.specs
            .remove(id)
            .ok_or(BalancerError::UnknownVip(*id))?;
        self.sync()
    }

    /// Ends the established flows of a VIP's backend (a new generation for its slot), as a
    /// backend that goes down and comes back does.
    pub fn reset_flows(&mut self, id: &VipId, addr: IpAddr) -> Result<(), BalancerError> {
        let set_live = |s: &mut Self, live: bool| -> Result<(), BalancerError> {
            let mut spec = s
                .specs
                .get(id)
                .ok_or(BalancerError::UnknownVip(*id))?
                .clone();
            for b in spec.backends.iter_mut().filter(|b| b.addr == addr) {
                b.live = live;
            }
            s.set_vip(spec)
        };
        set_live(self, false)?;
        set_live(self, true)
    }

    pub fn vip_index(&self, id: &VipId) -> Option<u32> {
        self.rec.vip_index(id)
    }

    pub fn backend_index(&self, id: &VipId, addr: &IpAddr) -> Option<u32> {
        self.rec.slot(id, addr).map(|s| s.index)
    }

    pub fn set_config(&mut self, cfg: &Config) -> Result<(), BalancerError> {
        Ok(self.dp.set_config(cfg)?)
    }

    pub fn attach(&mut self, iface: &str, mode: Mode) -> Result<(), BalancerError> {
        Ok(self.dp.attach(iface, mode)?)
    }

    /// The program, for `BPF_PROG_TEST_RUN`.
    pub fn program(&mut self) -> &mut aya::programs::Xdp {
        self.dp.program()
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// One global counter (`lb_common::stat`).
    pub fn global_stat(&self, reason: u32) -> Counter {
        self.counters.global(reason)
    }

    pub fn vip_stats(&self, index: u32) -> Counter {
        self.counters.vip(index)
    }

    pub fn backend_stats(&self, slot: u32) -> Counter {
        self.counters.backend(slot)
    }
}
