//! The read side: status, lists, counters and health, built from the writer's latest snapshot,
//! the probe supervisor's views, the VRRP speaker's status and the counters read from the
//! maps at the time of the request. Nothing here waits for the writer.

use std::{path::PathBuf, sync::Arc, time::Instant};

use tokio::sync::watch;

use crate::{
    addr,
    api::{
        BackendView, BgpStatus, CounterView, HealthView, ProbeView, Stats, Status, VipView,
        VrrpStatus,
    },
    datapath::{Counters, Reading},
    health::{
        Route, Tracker,
        supervisor::{BackendKey, HealthViews},
        tunnel::{self, TunnelState},
    },
    state::{Change, Refusal, State},
    writer::Snapshot,
};

/// Everything readers read.
#[derive(Clone)]
pub struct Views {
    pub snap: watch::Receiver<Arc<Snapshot>>,
    pub health: watch::Receiver<Arc<HealthViews>>,
    pub vrrp: watch::Receiver<Option<VrrpStatus>>,
    /// The BGP announcer's status (none without `[bgp]`).
    pub bgp: watch::Receiver<Option<BgpStatus>>,
    /// What probes over the tunnel can count on.
    pub tunnel: watch::Receiver<Arc<TunnelState>>,
    pub counters: Counters,
    pub state_file: PathBuf,
    pub bpffs: PathBuf,
}

fn counter(c: lb_common::Counter) -> CounterView {
    CounterView {
        packets: c.packets,
        bytes: c.bytes,
    }
}

/// What a tracker shows.
pub fn health_view(t: &Tracker) -> HealthView {
    HealthView {
        up: t.up,
        last: t.last.clone(),
        latency_ms: t.latency.map(|d| d.as_secs_f64() * 1e3),
        since_s: Instant::now().duration_since(t.since).as_secs_f64(),
        checks: t.checks,
    }
}

impl Views {
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snap.borrow().clone()
    }

    fn health_of(&self, key: &BackendKey) -> Option<HealthView> {
        self.health.borrow().get(key).map(health_view)
    }

    pub fn status(&self) -> Status {
        let s = self.snapshot();
        let cfg = &s.config;
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            pid: std::process::id(),
            interface: s.state.balancer.interface.clone(),
            mode: s.state.balancer.mode,
            attached: s.attached,
            detached_reason: s.detached_why.as_deref().map(str::to_owned),
            ready: s.forwarding(),
            mtu: cfg.mtu,
            source_v4: (cfg.src_v4 != 0)
                .then(|| addr::from_words([cfg.src_v4, 0, 0, 0], lb_common::FAMILY_V4).to_string()),
            source_v6: (cfg.src_v6 != [0; 4])
                .then(|| addr::from_words(cfg.src_v6, lb_common::FAMILY_V6).to_string()),
            nexthop: s.nexthop.map(|(ip, _)| ip.to_string()),
            nexthop_mac: (cfg.nh_mac != [0; 6]).then(|| addr::fmt_mac(&cfg.nh_mac)),
            vips: s.state.vips.len(),
            backends: s.slots_in_use,
            probe_tunnel: self.tunnel.borrow().interface.clone(),
            probe_tunnel_unavailable: self.tunnel.borrow().unavailable.clone(),
            conntrack_entries: s.conntrack,
            conntrack_ways: lb_common::CONN_WAYS as u32,
            state_file: self.state_file.display().to_string(),
            bpffs: self.bpffs.display().to_string(),
        }
    }

    /// Every VIP with its backends, their health and counters.
    pub fn vips(&self) -> Vec<VipView> {
        let s = self.snapshot();
        let reading = self.counters.read(&s.owners);
        self.vip_views(&s, &reading)
    }

    fn vip_views(&self, s: &Snapshot, reading: &Reading) -> Vec<VipView> {
        s.state
            .vips
            .iter()
            .map(|v| {
                let place = s.placement.get(&v.address);
                let total = place.map(|p| reading.vip(p.index)).unwrap_or_default();
                VipView {
                    address: v.address,
                    affinity: v.affinity,
                    ring_size: v.ring_size,
                    pools: v.pools.clone(),
                    adaptive_weights: v.adaptive_weights,
                    new_flows: total.new_flows,
                    counters: CounterView {
                        packets: total.packets,
                        bytes: total.bytes,
                    },
                    drops: place
                        .map(|p| self.counters.vip_drops(p.index))
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|(_, c)| c.packets > 0)
                        .map(|(n, c)| (n.to_owned(), c.packets))
                        .collect(),
                    backends: v
                        .backends
                        .iter()
                        .map(|b| BackendView {
                            address: b.address,
                            weight: b.weight,
                            effective_weight: b.weight as f64
                                * s.weight_percent(&v.address, &b.address) as f64
                                / 100.0,
                            state: b.state,
                            backup: b.backup,
                            pool: b.pool().to_owned(),
                            health: v
                                .check_for(b)
                                .and_then(|_| self.health_of(&(v.address, b.address))),
                            counters: place
                                .and_then(|p| p.slots.get(&b.address))
                                .map(|slot| {
                                    let c = reading.slot(*slot);
                                    CounterView {
                                        packets: c.packets,
                                        bytes: c.bytes,
                                    }
                                })
                                .unwrap_or_default(),
                        })
                        .collect(),
                }
            })
            .collect()
    }

    pub fn stats(&self) -> Stats {
        let s = self.snapshot();
        let reading = self.counters.read(&s.owners);
        Stats {
            vips: self.vip_views(&s, &reading),
            global: self
                .counters
                .globals(&reading, &s.owners)
                .into_iter()
                .map(|(n, c)| (n.to_owned(), counter(c)))
                .collect(),
            flood: self.counters.flood(),
        }
    }

    /// Every probe the state asks for, with what it found so far.
    pub fn probes(&self) -> Vec<ProbeView> {
        let s = self.snapshot();
        let t = self.tunnel.borrow().clone();
        tunnel::probes(&s, &t)
            .into_iter()
            .map(|(key, p)| ProbeView {
                vip: key.0,
                backend: key.1,
                kind: p.check.kind,
                target: p.target.to_string(),
                via: p.via(),
                via_reason: match &p.route {
                    Route::Direct { because } => because.clone(),
                    Route::Unavailable(why) => Some(why.clone()),
                    Route::Tunnel { .. } => None,
                },
                health: self.health_of(&key),
                out_of_table: s.down.contains(&key),
            })
            .collect()
    }

    pub fn vrrp(&self) -> Option<VrrpStatus> {
        self.vrrp.borrow().clone()
    }

    pub fn bgp(&self) -> Option<BgpStatus> {
        self.bgp.borrow().clone()
    }

    /// The running state as a `maglb.toml`.
    pub fn config_text(&self) -> String {
        self.snapshot().state.to_toml()
    }

    /// What applying `file` would change (the same rules as `apply`).
    pub fn preview(&self, file: State) -> Result<Vec<String>, Refusal> {
        let current = self.snapshot().state.clone();
        let new = Change::Apply(file).apply_to(&current)?;
        Ok(current.diff(&new))
    }
}
