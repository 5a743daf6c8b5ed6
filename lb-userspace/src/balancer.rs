//! The datapath and the reconciler together, without an agent: what tests, benchmarks and the
//! fuzzer use to load the balancer and give it VIPs directly. The agent does the same through
//! its writer, with a desired state, a state file and health in between.

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use lb_common::{
    BackendCounter, Config, ConnEntry, Counter, ENCAP_GUE, ENCAP_IPIP, FlowKey,
    MAX_CONNTRACK_ENTRIES, MIN_CONNTRACK_ENTRIES, Settings, VipPolicy, ms_to_ticks,
};

use crate::{
    datapath::{Counters, Datapath, DatapathError, Mode},
    reconcile::{Exhausted, Reconciler},
    state::{BackendSpec, VipId, VipSpec, validate_policy},
};
pub use crate::{
    datapath::{FloodStats, LoadOptions, Reading},
    state::{Encap, Policy, Prefix, RateLimit},
};

#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
    #[error("VIP {0} does not exist")]
    UnknownVip(VipId),
    #[error("{0}")]
    BadSetting(String),
    #[error(
        "conntrack_entries {0} is out of range {MIN_CONNTRACK_ENTRIES}-{MAX_CONNTRACK_ENTRIES}"
    )]
    BadConntrackEntries(u32),
}

/// A loaded balancer and the VIPs it carries.
pub struct Balancer {
    pub dp: Datapath,
    rec: Reconciler,
    specs: BTreeMap<VipId, VipSpec>,
    counters: Counters,
}

fn check(opts: &LoadOptions) -> Result<(), BalancerError> {
    let n = opts.conntrack_entries;
    if !(MIN_CONNTRACK_ENTRIES..=MAX_CONNTRACK_ENTRIES).contains(&n) {
        return Err(BalancerError::BadConntrackEntries(n));
    }
    Ok(())
}

impl Balancer {
    /// Loads the balancer with fresh, unpinned maps of the default sizes (nothing attached).
    pub fn load() -> Result<Self, BalancerError> {
        Self::load_with(&LoadOptions::default())
    }

    /// Loads the balancer with fresh, unpinned maps.
    pub fn load_with(opts: &LoadOptions) -> Result<Self, BalancerError> {
        check(opts)?;
        Ok(Self::new(Datapath::load(opts)?))
    }

    /// Loads the balancer with its maps pinned under `bpffs` (see [`Datapath::load_pinned`]).
    /// The VIPs it carries start empty: the pinned ones are not adopted.
    pub fn load_pinned_with(bpffs: &Path, opts: &LoadOptions) -> Result<Self, BalancerError> {
        check(opts)?;
        Ok(Self::new(Datapath::load_pinned(bpffs, opts)?))
    }

    fn new(dp: Datapath) -> Self {
        let counters = dp.counters();
        Self {
            dp,
            rec: Reconciler::new(),
            specs: BTreeMap::new(),
            counters,
        }
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

    fn spec(&self, id: &VipId) -> Result<VipSpec, BalancerError> {
        self.specs
            .get(id)
            .cloned()
            .ok_or(BalancerError::UnknownVip(*id))
    }

    /// Sets a VIP's backend list.
    pub fn set_backends(
        &mut self,
        id: &VipId,
        backends: Vec<BackendSpec>,
    ) -> Result<(), BalancerError> {
        let mut spec = self.spec(id)?;
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
            let mut spec = s.spec(id)?;
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

    // ----- Policy: through the VIP's spec, as the agent does -----

    /// Replaces a VIP's policy (validated as a state file's would be).
    pub fn set_policy(&mut self, id: &VipId, policy: Policy) -> Result<(), BalancerError> {
        validate_policy(&policy, id.addr.is_ipv4(), &id.to_string())
            .map_err(|r| BalancerError::BadSetting(r.to_string()))?;
        let mut spec = self.spec(id)?;
        spec.policy = policy;
        self.set_vip(spec)
    }

    fn edit_policy(
        &mut self,
        id: &VipId,
        f: impl FnOnce(&mut Policy),
    ) -> Result<(), BalancerError> {
        let mut p = self.spec(id)?.policy;
        f(&mut p);
        self.set_policy(id, p)
    }

    /// New flows per source /32 or /64 (`None`: no limit).
    pub fn set_vip_source_limit(
        &mut self,
        id: &VipId,
        limit: Option<RateLimit>,
    ) -> Result<(), BalancerError> {
        self.edit_policy(id, |p| p.rate_limit = limit)
    }

    /// New flows of the whole VIP (`None`: no cap).
    pub fn set_vip_new_flow_cap(
        &mut self,
        id: &VipId,
        cap: Option<RateLimit>,
    ) -> Result<(), BalancerError> {
        self.edit_policy(id, |p| p.new_flow_cap = cap)
    }

    /// Source prefixes allowed and denied to start flows.
    pub fn set_vip_prefixes(
        &mut self,
        id: &VipId,
        allow: &[Prefix],
        deny: &[Prefix],
    ) -> Result<(), BalancerError> {
        self.edit_policy(id, |p| {
            p.allow = allow.to_vec();
            p.deny = deny.to_vec();
        })
    }

    pub fn clear_vip_policy(&mut self, id: &VipId) -> Result<(), BalancerError> {
        self.set_policy(id, Policy::default())
    }

    /// VIP index `index`'s policy entry as the map holds it.
    pub fn vip_policy(&self, index: u32) -> Result<VipPolicy, BalancerError> {
        Ok(self.dp.vip_policy(index)?)
    }

    // ----- Runtime settings (the agent writes them from `[balancer]`) -----

    pub fn settings(&self) -> Result<Settings, BalancerError> {
        Ok(self.dp.settings()?)
    }

    fn update_settings(&mut self, f: impl FnOnce(&mut Settings)) -> Result<(), BalancerError> {
        let mut s = self.dp.settings()?;
        f(&mut s);
        Ok(self.dp.set_settings(&s)?)
    }

    /// Idle timeouts of connection-table entries in milliseconds (`None`: never).
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

    /// Flood threshold in new flows per second per CPU (`None`: no threshold).
    pub fn set_flood_threshold(&mut self, per_s: Option<u32>) -> Result<(), BalancerError> {
        if per_s == Some(0) {
            return Err(BalancerError::BadSetting(
                "flood threshold 0: use None for no threshold".into(),
            ));
        }
        self.update_settings(|s| s.flood_new_flows_per_s = per_s.unwrap_or(0))
    }

    /// The encapsulation toward backends, and the GUE destination port.
    pub fn set_encap(&mut self, encap: Encap, gue_port: u16) -> Result<(), BalancerError> {
        if gue_port == 0 {
            return Err(BalancerError::BadSetting("GUE port 0".into()));
        }
        self.update_settings(|s| {
            s.encap = match encap {
                Encap::Ipip => ENCAP_IPIP,
                Encap::Gue => ENCAP_GUE,
            };
            s.gue_port = gue_port;
        })
    }

    // ----- The connection table -----

    pub fn conntrack(&self, flow: &FlowKey) -> Option<ConnEntry> {
        self.dp.conntrack(flow)
    }

    /// The table's size in flows (`conntrack_entries` rounded up to whole sets, a power of
    /// two).
    pub fn conntrack_entries(&self) -> u32 {
        self.dp.conntrack_capacity()
    }

    /// Connection-table slots in use (reads the whole table).
    pub fn conntrack_len(&self) -> usize {
        self.dp.conntrack_len()
    }

    pub fn conntrack_memory(&self) -> Option<u64> {
        self.dp.conntrack_memory()
    }

    pub fn source_buckets(&self) -> usize {
        self.dp.source_buckets()
    }

    // ----- Counters -----

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// Every used slot's counter, summed per VIP.
    pub fn reading(&self) -> Reading {
        self.counters.read(&self.rec.owners())
    }

    /// One global counter (`lb_common::stat`), derived ones included.
    pub fn global_stat(&self, reason: u32) -> Counter {
        let name = lb_common::stat::NAMES[reason as usize];
        let owners = self.rec.owners();
        let reading = self.counters.read(&owners);
        self.counters
            .globals(&reading, &owners)
            .into_iter()
            .find(|(n, _)| *n == name)
            .map_or_else(|| self.counters.global(reason), |(_, c)| c)
    }

    /// Packets and bytes of VIP index `index` sent to a backend.
    pub fn vip_stats(&self, index: u32) -> Counter {
        let c = self.reading().vip(index);
        Counter {
            packets: c.packets,
            bytes: c.bytes,
        }
    }

    /// Flows of VIP index `index` that got a backend from the ring.
    pub fn vip_new_flows(&self, index: u32) -> u64 {
        self.reading().vip(index).new_flows
    }

    pub fn backend_counter(&self, slot: u32) -> BackendCounter {
        self.counters.backend(slot)
    }

    pub fn backend_stats(&self, slot: u32) -> Counter {
        let c = self.counters.backend(slot);
        Counter {
            packets: c.packets,
            bytes: c.bytes,
        }
    }

    /// VIP index `index`'s drops by reason name.
    pub fn vip_drops(&self, index: u32) -> Vec<(&'static str, Counter)> {
        self.counters.vip_drops(index)
    }

    /// VIP index `index`'s drops for one `lb_common::vip_stat` reason.
    pub fn vip_drop(&self, index: u32, reason: u32) -> Counter {
        self.counters.vip_drops(index)[reason as usize].1
    }

    pub fn flood_stats(&self) -> FloodStats {
        self.counters.flood()
    }
}
