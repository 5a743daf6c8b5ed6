//! The agent's state and the one place it changes: a new desired state is validated,
//! persisted, then made real in the datapath; if the datapath refuses, the old state is
//! restored in both.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use lb_common::Config;
use tracing::{info, warn};

use crate::{
    addr,
    api::{BackendView, CounterView, HealthView, ProbeView, Stats, Status, VipView},
    balancer::{Balancer, BalancerError},
    health::{Probe, ProbeResult, Tracker},
    metrics::{self, Histogram, PROBE_BUCKETS, REBUILD_BUCKETS},
    netdev,
    service::{ServiceError, Services, VipId, VipSpec},
    state::{AttachMode, Refused, State},
    store::Store,
};

/// A backend of a VIP.
pub type BackendKey = (VipId, IpAddr);

pub struct Core {
    pub state: State,
    store: Store,
    bal: Balancer,
    svc: Services,
    /// Interface and mode the program is attached with, as far as this agent knows.
    attached: Option<(String, AttachMode)>,
    /// Resolved next hop (address, MAC) for status.
    pub nexthop: Option<(IpAddr, [u8; 6])>,
    bpffs: PathBuf,
    /// Health of the backends that have a check. Not persisted: a restarted agent starts
    /// them up and probes again.
    health: BTreeMap<BackendKey, Tracker>,
    probe_latency: BTreeMap<BackendKey, Histogram>,
    rebuilds: u64,
    rebuild_seconds: Histogram,
    /// What the VRRP speaker reports, while it runs.
    pub vrrp: Option<super::vrrp::VrrpStatus>,
}

fn datapath_refused(e: impl std::error::Error) -> Refused {
    Refused {
        status: 500,
        message: crate::error_chain(&e),
    }
}

impl Core {
    /// Opens the state directory and the (possibly pinned, possibly attached) datapath, and
    /// makes the datapath match the saved state.
    pub fn open(state_dir: &Path, bpffs: &Path) -> anyhow::Result<Self> {
        let store = Store::open(state_dir)?;
        let state = store.load()?.unwrap_or_default();
        let mut bal = Balancer::load_pinned(bpffs)?;
        let adopted = bal.is_attached();
        let svc = Services::adopt(&mut bal)?;
        let attached = match (&state.balancer.interface, adopted) {
            (Some(i), true) => Some((i.clone(), state.balancer.mode)),
            _ => None,
        };
        info!(
            adopted,
            vips = state.vips.len(),
            state_file = %store.path().display(),
            "agent state loaded"
        );
        let mut core = Core {
            state: State::default(),
            store,
            bal,
            svc,
            attached,
            nexthop: None,
            bpffs: bpffs.to_owned(),
            health: BTreeMap::new(),
            probe_latency: BTreeMap::new(),
            rebuilds: 0,
            rebuild_seconds: Histogram::new(REBUILD_BUCKETS),
            vrrp: None,
        };
        let saved = state.clone();
        core.state = state;
        if let Err(e) = core.realize(&saved) {
            warn!(error = %e, "could not restore the saved state into the datapath; serving anyway");
        }
        Ok(core)
    }

    /// Makes the datapath carry `s`: attachment, then VIPs and backends.
    fn realize(&mut self, s: &State) -> Result<(), Refused> {
        let want = s.balancer.interface.clone().map(|i| (i, s.balancer.mode));
        if want != self.attached || (want.is_some() && !self.bal.is_attached()) {
            if self.bal.is_attached() {
                self.bal.detach().map_err(datapath_refused)?;
                self.attached = None;
                info!("detached");
            }
            if let Some((iface, mode)) = &want {
                netdev::index(iface).map_err(|e| Refused::invalid("iface", e))?;
                self.bal
                    .attach(iface, mode.to_mode())
                    .map_err(|e| match &e {
                        BalancerError::Attach { .. } if *mode == AttachMode::Native => Refused {
                            status: 400,
                            message: format!(
                                "{iface} does not take XDP in native mode ({}); retry with `--mode generic`",
                                crate::error_chain(&e)
                            ),
                        },
                        _ => datapath_refused(e),
                    })?;
                self.attached = want.clone();
                info!(%iface, %mode, "attached");
            }
        }
        let specs = self.specs(s);
        let started = Instant::now();
        let changed = self
            .svc
            .reconcile(&mut self.bal, &specs)
            .map_err(|e: ServiceError| datapath_refused(e))?;
        if changed > 0 {
            self.rebuilds += changed as u64;
            self.rebuild_seconds
                .observe(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// What the datapath should carry for `s`, given the backends' health.
    fn specs(&self, s: &State) -> Vec<VipSpec> {
        s.vips
            .iter()
            .map(|v| v.spec(|a| self.is_up(&v.address, a)))
            .collect()
    }

    /// Whether some backend of the VIP would take new flows (for VRRP tracking).
    pub fn vip_has_live_backend(&self, vip: &VipId) -> bool {
        self.state.vip(vip).is_some_and(|v| {
            v.spec(|a| self.is_up(vip, a))
                .backends
                .iter()
                .any(|b| b.live && b.weight > 0)
        })
    }

    /// Whether a backend counts as up: yes without a check, else as its probes say.
    pub fn is_up(&self, vip: &VipId, addr: &IpAddr) -> bool {
        self.health.get(&(*vip, *addr)).is_none_or(|t| t.up)
    }

    /// The probes the state asks for.
    pub fn probes(&self) -> BTreeMap<BackendKey, Probe> {
        let mut out = BTreeMap::new();
        for v in &self.state.vips {
            for b in &v.backends {
                if let Some(check) = v.check_for(b) {
                    out.insert(
                        (v.address, b.address),
                        Probe::new(b.address, v.address.port, check),
                    );
                }
            }
        }
        out
    }

    /// Records a probe result. On a transition, the VIP's table changes in one switch (and a
    /// backend going down has its flows moved), and the transition is logged with its reason.
    pub fn record_probe(&mut self, key: BackendKey, r: &ProbeResult, took: Duration) {
        let (vip, backend) = key;
        let Some(check) = self.state.vip(&vip).and_then(|v| {
            let b = v.backends.iter().find(|b| b.address == backend)?;
            v.check_for(b).cloned()
        }) else {
            return;
        };
        self.probe_latency
            .entry(key)
            .or_insert_with(|| Histogram::new(PROBE_BUCKETS))
            .observe(took.as_secs_f64());
        let t = self.health.entry(key).or_default();
        let Some(up) = t.record(r, took, check.rise, check.fall) else {
            return;
        };
        let reason = t.last.clone().unwrap_or_default();
        if up {
            info!(%vip, %backend, rise = check.rise, "backend up");
        } else {
            warn!(%vip, %backend, %reason, fall = check.fall, "backend down");
        }
        let state = self.state.clone();
        if let Err(e) = self.realize(&state) {
            warn!(error = %e.message, "applying a health change");
        }
    }

    /// Forgets the health of backends that no longer have a check.
    pub fn prune_health(&mut self) {
        let probes = self.probes();
        self.health.retain(|k, _| probes.contains_key(k));
        self.probe_latency.retain(|k, _| probes.contains_key(k));
    }

    fn health_view(&self, key: &BackendKey) -> Option<HealthView> {
        let t = self.health.get(key)?;
        Some(HealthView {
            up: t.up,
            last: t.last.clone(),
            latency_ms: t.latency.map(|d| d.as_secs_f64() * 1e3),
            since_s: Instant::now().duration_since(t.since).as_secs_f64(),
            checks: t.checks,
        })
    }

    pub fn probe_views(&self) -> Vec<ProbeView> {
        self.probes()
            .into_iter()
            .map(|(key, p)| ProbeView {
                vip: key.0,
                backend: key.1,
                kind: p.check.kind,
                target: p.target.to_string(),
                health: self.health_view(&key),
            })
            .collect()
    }

    /// Validates, persists and applies `new`. What changed, in words.
    pub fn change(&mut self, new: State, what: &str) -> Result<Vec<String>, Refused> {
        new.validate()?;
        let changes = self.state.diff(&new);
        let old = std::mem::replace(&mut self.state, new.clone());
        if let Err(e) = self.store.save(&new) {
            self.state = old;
            return Err(datapath_refused(e));
        }
        if let Err(e) = self.realize(&new) {
            warn!(error = %e.message, "datapath refused {what}; restoring the previous state");
            self.state = old.clone();
            let _ = self.realize(&old);
            let _ = self.store.save(&old);
            return Err(e);
        }
        info!(change = what, ?changes, "applied");
        Ok(changes)
    }

    /// Writes the datapath configuration if it differs; true if it did.
    pub fn set_config(&mut self, cfg: &Config) -> Result<bool, Refused> {
        if self.bal.config().ok().as_ref() == Some(cfg) {
            return Ok(false);
        }
        self.bal.set_config(cfg).map_err(datapath_refused)?;
        Ok(true)
    }

    pub fn is_attached(&self) -> bool {
        self.bal.is_attached()
    }

    fn counters(c: lb_common::Counter) -> CounterView {
        CounterView {
            packets: c.packets,
            bytes: c.bytes,
        }
    }

    pub fn vip_views(&self) -> Vec<VipView> {
        self.state
            .vips
            .iter()
            .map(|v| VipView {
                address: v.address,
                affinity: v.affinity,
                ring_size: v.ring_size,
                pools: v.pools.clone(),
                new_flows: self
                    .svc
                    .vip_index(&v.address)
                    .map_or(0, |i| self.bal.vip_new_flows(i)),
                counters: self
                    .svc
                    .vip_index(&v.address)
                    .map(|i| Self::counters(self.bal.vip_stats(i)))
                    .unwrap_or_default(),
                backends: v
                    .backends
                    .iter()
                    .map(|b| BackendView {
                        address: b.address,
                        weight: b.weight,
                        state: b.state,
                        backup: b.backup,
                        pool: b.pool().to_owned(),
                        health: v
                            .check_for(b)
                            .and_then(|_| self.health_view(&(v.address, b.address))),
                        counters: self
                            .svc
                            .backend_index(&v.address, &b.address)
                            .map(|i| Self::counters(self.bal.backend_stats(i)))
                            .unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect()
    }

    /// What a metrics scrape shows.
    pub fn metrics(&self) -> metrics::Snapshot {
        let cfg = self.bal.config().unwrap_or_default();
        metrics::Snapshot {
            attached: self.bal.is_attached(),
            forwarding: self.bal.is_attached() && cfg.ready != 0,
            vips: self
                .vip_views()
                .into_iter()
                .map(|v| metrics::VipMetrics {
                    vip: v.address.to_string(),
                    packets: v.counters.packets,
                    bytes: v.counters.bytes,
                    new_flows: v.new_flows,
                    backends: v
                        .backends
                        .iter()
                        .map(|b| metrics::BackendMetrics {
                            backend: b.address.to_string(),
                            packets: b.counters.packets,
                            bytes: b.counters.bytes,
                            up: self.is_up(&v.address, &b.address),
                            probe: self.probe_latency.get(&(v.address, b.address)).cloned(),
                        })
                        .collect(),
                })
                .collect(),
            global: self.bal.global_stats(),
            rebuilds: self.rebuilds,
            rebuild_seconds: self.rebuild_seconds.clone(),
            vrrp: self.vrrp.as_ref().map(|v| metrics::VrrpMetrics {
                vrid: v.vrid,
                master: v.state == "master",
                priority: v.effective_priority,
                transitions: v.transitions,
                invalid: v.invalid.iter().map(|(k, n)| (k.clone(), *n)).collect(),
            }),
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            vips: self.vip_views(),
            global: self
                .bal
                .global_stats()
                .into_iter()
                .map(|(n, c)| (n.to_owned(), Self::counters(c)))
                .collect(),
        }
    }

    pub fn status(&self) -> Status {
        let cfg = self.bal.config().unwrap_or_default();
        let attached = self.bal.is_attached();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            interface: self.state.balancer.interface.clone(),
            mode: self.state.balancer.mode,
            attached,
            ready: attached && cfg.ready != 0,
            mtu: cfg.mtu,
            source_v4: (cfg.src_v4 != 0)
                .then(|| addr::from_words([cfg.src_v4, 0, 0, 0], lb_common::FAMILY_V4).to_string()),
            source_v6: (cfg.src_v6 != [0; 4])
                .then(|| addr::from_words(cfg.src_v6, lb_common::FAMILY_V6).to_string()),
            nexthop: self.nexthop.map(|(ip, _)| ip.to_string()),
            nexthop_mac: (cfg.nh_mac != [0; 6]).then(|| netdev::fmt_mac(&cfg.nh_mac)),
            vips: self.state.vips.len(),
            backends: self.svc.backends_in_use(),
            state_file: self.store.path().display().to_string(),
            bpffs: self.bpffs.display().to_string(),
        }
    }
}
