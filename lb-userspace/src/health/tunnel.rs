//! Probes that travel the data path (`via = "tunnel"`).
//!
//! A direct probe connects to the backend's own address, so a backend whose decap program is
//! missing, or that lacks the VIP on its loopback, passes it and blackholes client traffic.
//! A probe over the tunnel goes to the VIP's address and port from the balancer, with
//! `SO_MARK = PROBE_MARK_TAG | slot` and bound to the balancer's interface. The kernel routes
//! it out of that interface, where the probe classifier
//! ([`crate::datapath::probe_encap`]) encapsulates it toward the backend in that slot,
//! exactly as the XDP program encapsulates client packets (same outer source, next hop and
//! MACs). The backend decapsulates, its VIP answers the balancer directly (DSR), and the XDP
//! program passes the answer up, as it is not addressed to a VIP.
//!
//! [`run`] keeps the classifier on the balancer's interface while the balancer is attached
//! and checks how this host routes each VIP address; [`probes`] gives each check its route:
//! over the tunnel when the check asks for it or leaves the choice (`via` unset) and the
//! balancer can carry it, direct otherwise (with the reason in the probe view).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use lb_common::PROBE_MARK_TAG;
use tokio::sync::watch;
use tracing::{info, warn};

use super::{
    Probe,
    probe::Route,
    supervisor::{self, BackendKey},
};
use crate::{
    datapath::probe_encap::{ProbeEncap, ProbeStats},
    netlink,
    state::ProbeVia,
    writer::Snapshot,
};

/// How often the classifier's attachment and the VIP routes are checked (and at every
/// snapshot).
const RECHECK: Duration = Duration::from_secs(2);

/// What probes over the tunnel can count on now.
#[derive(Clone, Debug, Default)]
pub struct TunnelState {
    /// The interface the classifier is attached to.
    pub interface: Option<String>,
    /// Why it is not attached.
    pub unavailable: Option<String>,
    /// VIP addresses a probe cannot reach through the interface, and why (a VIP held as an
    /// address of this host, a route through another interface).
    pub unroutable: BTreeMap<IpAddr, String>,
    /// The classifier's counters.
    pub stats: Option<ProbeStats>,
}

impl PartialEq for TunnelState {
    fn eq(&self, o: &Self) -> bool {
        self.interface == o.interface
            && self.unavailable == o.unavailable
            && self.unroutable == o.unroutable
            && self.stats.is_some() == o.stats.is_some()
    }
}

impl TunnelState {
    fn none(why: &str) -> Self {
        Self {
            unavailable: Some(why.to_owned()),
            ..Self::default()
        }
    }
}

/// The probes `snap`'s state asks for, each with its route.
pub fn probes(snap: &Snapshot, tunnel: &TunnelState) -> BTreeMap<BackendKey, Probe> {
    supervisor::probes(&snap.state)
        .into_iter()
        .map(|(key, p)| {
            let p = route(key, p, snap, tunnel);
            (key, p)
        })
        .collect()
}

/// Gives a direct probe the route its check asks for.
fn route((vip, backend): BackendKey, direct: Probe, snap: &Snapshot, t: &TunnelState) -> Probe {
    let via = direct.check.via;
    if via == Some(ProbeVia::Direct) {
        return direct;
    }
    let route = match tunnel_route(vip, backend, snap, t) {
        Ok(r) => r,
        Err(why) if via == Some(ProbeVia::Tunnel) => Route::Unavailable(why),
        Err(why) => {
            return Probe {
                route: Route::Direct { because: Some(why) },
                ..direct
            };
        }
    };
    Probe::tunnel(vip.addr, vip.port, &direct.check, route)
}

/// The tunnel route to `backend` of `vip`, or why the balancer cannot carry it now.
fn tunnel_route(
    vip: crate::state::VipId,
    backend: IpAddr,
    snap: &Snapshot,
    t: &TunnelState,
) -> Result<Route, String> {
    let Some(iface) = &t.interface else {
        return Err(t
            .unavailable
            .clone()
            .unwrap_or_else(|| "the balancer is not attached".into()));
    };
    if snap.state.balancer.interface.as_ref() != Some(iface) || !snap.attached {
        return Err("the balancer is not attached".into());
    }
    if !snap.forwarding() {
        return Err("the datapath does not forward yet (no next hop)".into());
    }
    if let Some(why) = t.unroutable.get(&vip.addr) {
        return Err(why.clone());
    }
    let cfg = &snap.config;
    if backend.is_ipv4() && cfg.src_v4 == 0 || backend.is_ipv6() && cfg.src_v6 == [0; 4] {
        return Err(format!(
            "{iface} has no {} address for the outer header",
            if backend.is_ipv4() { "IPv4" } else { "IPv6" }
        ));
    }
    let slot = snap
        .placement
        .get(&vip)
        .and_then(|p| p.slots.get(&backend))
        .ok_or("the backend has no slot in the datapath yet")?;
    Ok(Route::Tunnel {
        mark: PROBE_MARK_TAG | slot,
        interface: iface.clone(),
    })
}

/// Keeps the probe classifier on the balancer's interface while it is attached, and
/// publishes what probes over the tunnel can count on. Runs until the writer goes.
pub async fn run(
    mut snap: watch::Receiver<Arc<Snapshot>>,
    layout_dir: PathBuf,
    tx: watch::Sender<Arc<TunnelState>>,
) {
    let nl = match netlink::connect() {
        Ok(h) => h,
        Err(e) => {
            let why = format!("no netlink connection: {}", crate::error_chain(&e));
            warn!(error = %why, "probes cannot go over the tunnel");
            tx.send_replace(Arc::new(TunnelState::none(&why)));
            return;
        }
    };
    let mut k = Keeper {
        encap: None,
        ifindex: 0,
        layout_dir,
        logged: String::new(),
    };
    loop {
        let s = snap.borrow_and_update().clone();
        let state = k.follow(&s, &nl).await;
        tx.send_if_modified(|old| {
            let changed = **old != state;
            if changed {
                *old = Arc::new(state);
            }
            changed
        });
        tokio::select! {
            _ = tokio::time::sleep(RECHECK) => {}
            r = snap.changed() => if r.is_err() { break },
        }
    }
}

struct Keeper {
    encap: Option<ProbeEncap>,
    /// The index of the interface it is attached to (an interface made again under the same
    /// name has another, and the link went with the old one).
    ifindex: u32,
    layout_dir: PathBuf,
    /// The last problem logged (each is logged once).
    logged: String,
}

impl Keeper {
    async fn follow(&mut self, s: &Snapshot, nl: &rtnetlink::Handle) -> TunnelState {
        let Some(iface) = s.state.balancer.interface.clone().filter(|_| s.attached) else {
            if let Some(e) = &mut self.encap
                && let Some(i) = e.attached_to()
            {
                info!(
                    iface = i,
                    "probe classifier detached (the balancer is detached)"
                );
                e.detach();
            }
            return TunnelState::none("the balancer is not attached");
        };
        match self.attach(&iface, nl).await {
            Ok(()) => {}
            Err(why) => {
                if why != self.logged {
                    warn!(%iface, error = %why, "probes cannot go over the tunnel; they go direct");
                    self.logged = why.clone();
                }
                return TunnelState::none(&why);
            }
        }
        let index = self.ifindex;
        let mut unroutable = BTreeMap::new();
        let addrs: BTreeSet<IpAddr> = s.state.vips.iter().map(|v| v.address.addr).collect();
        for a in addrs {
            let why = match netlink::route_oif(nl, a).await {
                Ok(Some(oif)) if oif == index => continue,
                Ok(Some(_)) => format!(
                    "this host routes {a} through another interface than {iface} (a route to \
                     it through {iface}, e.g. the default route, is needed)"
                ),
                Ok(None) => format!(
                    "{a} is an address of this host (VRRP holds it?), so a probe to it would \
                     never leave"
                ),
                Err(e) => format!("no route to {a}: {e}"),
            };
            unroutable.insert(a, why);
        }
        let summary = format!("{unroutable:?}");
        if !unroutable.is_empty() && summary != self.logged {
            warn!(%iface, ?unroutable, "VIPs that probes cannot reach over the tunnel; they go direct");
            self.logged = summary;
        }
        TunnelState {
            interface: Some(iface),
            unavailable: None,
            unroutable,
            stats: self.encap.as_ref().map(ProbeEncap::stats),
        }
    }

    /// Attaches the classifier to `iface` unless it is there already.
    async fn attach(&mut self, iface: &str, nl: &rtnetlink::Handle) -> Result<(), String> {
        let link = netlink::link(nl, iface)
            .await
            .map_err(|e| crate::error_chain(&e))?;
        let there = self.encap.as_ref().and_then(ProbeEncap::attached_to) == Some(iface);
        if there && self.ifindex == link.index {
            return Ok(());
        }
        if self.encap.is_none() {
            let e = ProbeEncap::load(&self.layout_dir).map_err(|e| crate::error_chain(&e))?;
            self.encap = Some(e);
            // Loading parsed the kernel's BTF (freed now).
            crate::sys::release_free_memory();
        }
        let e = self.encap.as_mut().expect("loaded above");
        e.attach(iface).map_err(|e| crate::error_chain(&e))?;
        self.ifindex = link.index;
        self.logged.clear();
        info!(%iface, "probe classifier attached to the egress; probes can go over the tunnel");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::{
        state::{BackendEntry, HealthCheck, ProbeKind, State, Vip, VipId},
        writer::Placement,
    };

    fn snapshot(via: Option<ProbeVia>) -> Snapshot {
        let id: VipId = "10.200.0.1:80/tcp".parse().unwrap();
        let mut v = Vip::new(id);
        v.health = Some(Box::new(HealthCheck {
            kind: ProbeKind::Tcp,
            via,
            ..HealthCheck::default()
        }));
        for a in ["10.0.0.11", "10.0.0.12"] {
            v.backends.push(BackendEntry::new(a.parse().unwrap(), 1));
        }
        let mut state = State::default();
        state.balancer.interface = Some("eth0".into());
        state.vips.push(v);
        let mut slots = BTreeMap::new();
        slots.insert("10.0.0.11".parse().unwrap(), 7);
        let mut s = Snapshot::preliminary(state, Default::default(), true);
        s.placement = Arc::new(BTreeMap::from([(id, Placement { index: 0, slots })]));
        s.config.ready = 1;
        s.config.src_v4 = 0x0200_000a;
        s
    }

    fn attached() -> TunnelState {
        TunnelState {
            interface: Some("eth0".into()),
            ..TunnelState::default()
        }
    }

    fn route_of(s: &Snapshot, t: &TunnelState, b: &str) -> (Route, String) {
        let id: VipId = "10.200.0.1:80/tcp".parse().unwrap();
        let p = probes(s, t).remove(&(id, b.parse().unwrap())).unwrap();
        (p.route, p.target.to_string())
    }

    #[test]
    fn tunnel_by_default_when_the_balancer_carries_it() {
        let s = snapshot(None);
        let (r, target) = route_of(&s, &attached(), "10.0.0.11");
        assert_eq!(
            r,
            Route::Tunnel {
                mark: PROBE_MARK_TAG | 7,
                interface: "eth0".into()
            }
        );
        assert_eq!(target, "10.200.0.1:80", "to the VIP");
        // No slot yet: direct, with the reason.
        let (r, target) = route_of(&s, &attached(), "10.0.0.12");
        assert!(
            matches!(&r, Route::Direct { because: Some(w) } if w.contains("slot")),
            "{r:?}"
        );
        assert_eq!(target, "10.0.0.12:80", "to the backend");
    }

    #[test]
    fn direct_or_unavailable_when_it_cannot() {
        let mut s = snapshot(None);
        s.config.ready = 0;
        let (r, _) = route_of(&s, &attached(), "10.0.0.11");
        assert!(
            matches!(&r, Route::Direct { because: Some(w) } if w.contains("next hop")),
            "{r:?}"
        );
        // Asked for explicitly: every probe fails with the reason.
        let mut s = snapshot(Some(ProbeVia::Tunnel));
        s.config.ready = 0;
        let (r, _) = route_of(&s, &attached(), "10.0.0.11");
        assert!(matches!(&r, Route::Unavailable(w) if w.contains("next hop")));
        let s = snapshot(Some(ProbeVia::Tunnel));
        let (r, _) = route_of(&s, &TunnelState::none("no classifier"), "10.0.0.11");
        assert_eq!(r, Route::Unavailable("no classifier".into()));
        let mut t = attached();
        t.unroutable
            .insert("10.200.0.1".parse().unwrap(), "local".into());
        let (r, _) = route_of(&snapshot(None), &t, "10.0.0.11");
        assert_eq!(
            r,
            Route::Direct {
                because: Some("local".into())
            }
        );
        // Direct when asked, whatever the balancer can do.
        let (r, target) = route_of(&snapshot(Some(ProbeVia::Direct)), &attached(), "10.0.0.11");
        assert_eq!(r, Route::Direct { because: None });
        assert_eq!(target, "10.0.0.11:80");
    }
}
