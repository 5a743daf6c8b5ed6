//! The announcer: keeps the dedicated routing table equal to [`super::decide`], on a
//! netlink connection of its own. It follows the writer's snapshots (it never waits for the
//! writer), re-reads the table every second (a route someone removed comes back), and takes
//! commands: the operator's withdraw and announce, and the agent's leave (SIGTERM, detach).
//!
//! Graceful leave ([`BgpHandle::withdraw_and_wait`]): every route is removed, and only then
//! does the caller wait `withdraw_wait_ms` while the datapath still forwards, so the router has
//! stopped sending before anything stops.
//!
//! A VIP counts as settled (see [`super::decide`]) once its live backends have not changed
//! for `announce_hold_ms` and the probes have a verdict on each of its checked backends: a
//! success, a backend taken down, or `fall` checks. A new agent takes every backend as up
//! until its probes say otherwise, and should not offer a table with a dead backend in it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::route::{RouteAddress, RouteAttribute, RouteMessage, RouteProtocol, RouteScope},
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

use super::{Hold, ROUTE_PROTOCOL, decide, live_set};
use crate::{
    api::{BgpAddress, BgpStatus},
    health::supervisor::HealthViews,
    netlink::{self, NetlinkError},
    state::VipId,
    writer::Snapshot,
};

/// What the API and the agent ask of the announcer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// `maglb bgp withdraw`: hold every address back.
    Withdraw,
    /// `maglb bgp announce`: announce what qualifies again.
    Announce,
    /// The agent leaves (the reason): hold everything back.
    Leave(String),
    /// A leave that did not happen after all (a detach that failed): back to normal.
    Rejoin,
}

struct Request {
    op: Op,
    /// Answered once the table holds what the op asked for: how many addresses were
    /// announced before it (0: nothing to wait for).
    reply: oneshot::Sender<Result<usize, String>>,
}

/// The way to the announcer.
#[derive(Clone)]
pub struct BgpHandle {
    tx: mpsc::Sender<Request>,
    pub status: watch::Receiver<Option<BgpStatus>>,
}

impl BgpHandle {
    /// Starts the announcer on the current runtime.
    pub fn spawn(
        snap: watch::Receiver<Arc<Snapshot>>,
        health: watch::Receiver<Arc<HealthViews>>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let (status_tx, status) = watch::channel(None);
        tokio::spawn(run(snap, health, rx, status_tx));
        Self { tx, status }
    }

    /// Carries out `op`; answers once the routing table reflects it, with the number of
    /// addresses announced before.
    pub async fn request(&self, op: Op) -> Result<usize, String> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request { op, reply })
            .await
            .map_err(|_| "the BGP announcer has stopped".to_owned())?;
        rx.await
            .map_err(|_| "the BGP announcer has stopped".to_owned())?
    }

    /// Whether `[bgp]` is configured.
    pub fn active(&self) -> bool {
        self.status.borrow().is_some()
    }

    /// Withdraws everything (`op`: Withdraw or Leave), then waits `withdraw_wait_ms` while
    /// the datapath still forwards, if anything was announced. Returns how long it waited.
    pub async fn withdraw_and_wait(&self, op: Op) -> Result<Duration, String> {
        let wait = self
            .status
            .borrow()
            .as_ref()
            .map_or(0, |s| s.withdraw_wait_ms);
        let started = Instant::now();
        let announced = self.request(op).await?;
        if announced > 0 {
            info!(
                addresses = announced,
                wait_ms = wait,
                "BGP routes withdrawn; forwarding on while the router stops sending"
            );
            tokio::time::sleep(Duration::from_millis(wait as u64)).await;
        }
        Ok(started.elapsed())
    }
}

/// The routes maglb owns in `table`: address -> the route as the kernel has it.
async fn owned(h: &Handle, table: u32) -> Result<BTreeMap<IpAddr, RouteMessage>, NetlinkError> {
    let mut out = BTreeMap::new();
    for dump in [
        RouteMessageBuilder::<Ipv4Addr>::new().build(),
        RouteMessageBuilder::<Ipv6Addr>::new().build(),
    ] {
        let mut routes = h.route().get(dump).execute();
        while let Some(r) = routes.try_next().await? {
            let t = r
                .attributes
                .iter()
                .find_map(|a| match a {
                    RouteAttribute::Table(t) => Some(*t),
                    _ => None,
                })
                .unwrap_or(r.header.table as u32);
            if t != table || r.header.protocol != RouteProtocol::Other(ROUTE_PROTOCOL) {
                continue;
            }
            let dst = r.attributes.iter().find_map(|a| match a {
                RouteAttribute::Destination(RouteAddress::Inet(a)) => Some(IpAddr::V4(*a)),
                RouteAttribute::Destination(RouteAddress::Inet6(a)) => Some(IpAddr::V6(*a)),
                _ => None,
            });
            if let Some(d) = dst {
                out.insert(d, r);
            }
        }
    }
    Ok(out)
}

fn oif(r: &RouteMessage) -> Option<u32> {
    r.attributes.iter().find_map(|a| match a {
        RouteAttribute::Oif(i) => Some(*i),
        _ => None,
    })
}

/// Makes `table` hold exactly one route per address of `want`, through `ifindex`; returns
/// the addresses it holds afterwards.
async fn sync(
    h: &Handle,
    table: u32,
    ifindex: Option<u32>,
    want: &BTreeSet<IpAddr>,
) -> Result<BTreeSet<IpAddr>, String> {
    let have = owned(h, table).await.map_err(|e| crate::error_chain(&e))?;
    let mut now: BTreeSet<IpAddr> = have.keys().copied().collect();
    let mut err = None;
    for (a, r) in have {
        if want.contains(&a) && ifindex.is_some() && oif(&r) == ifindex {
            continue;
        }
        match h.route().del(r).execute().await {
            Ok(()) => {
                now.remove(&a);
            }
            Err(e) => err = Some(format!("removing the route to {a} from table {table}: {e}")),
        }
    }
    let missing: Vec<IpAddr> = want.iter().filter(|a| !now.contains(a)).copied().collect();
    for a in &missing {
        let Some(i) = ifindex else {
            err = Some("no interface for the routes: set bgp.interface or attach".into());
            break;
        };
        let len = if a.is_ipv4() { 32 } else { 128 };
        let msg = RouteMessageBuilder::<IpAddr>::new()
            .destination_prefix(*a, len)
            .expect("a host prefix fits")
            .output_interface(i)
            .table_id(table)
            .protocol(RouteProtocol::Other(ROUTE_PROTOCOL))
            .scope(RouteScope::Link)
            .build();
        match h.route().add(msg).replace().execute().await {
            Ok(()) => {
                now.insert(*a);
            }
            Err(e) => err = Some(format!("adding the route to {a} to table {table}: {e}")),
        }
    }
    match err {
        Some(e) => Err(e),
        None => Ok(now),
    }
}

/// Whether the probes have a verdict on every checked backend of `vip`.
fn probed(snap: &Snapshot, health: &HealthViews, vip: &VipId) -> bool {
    let Some(v) = snap.state.vip(vip) else {
        return false;
    };
    v.backends.iter().all(|b| {
        let Some(check) = v.check_for(b) else {
            return true;
        };
        health.get(&(*vip, b.address)).is_some_and(|t| {
            !t.up || t.last.as_deref() == Some("ok") || t.checks >= check.fall as u64
        })
    })
}

async fn run(
    mut snap: watch::Receiver<Arc<Snapshot>>,
    mut health: watch::Receiver<Arc<HealthViews>>,
    mut rx: mpsc::Receiver<Request>,
    status: watch::Sender<Option<BgpStatus>>,
) {
    let nl = match netlink::connect() {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %crate::error_chain(&e), "no netlink connection for BGP announcements");
            return;
        }
    };
    let mut operator = false;
    let mut leaving: Option<String> = None;
    // Per address: announced, since when.
    let mut seen: BTreeMap<IpAddr, (bool, Instant)> = BTreeMap::new();
    // The table our routes were last written to (to clean it when the config changes).
    let mut last_table: Option<u32> = None;
    let mut pending: Vec<(oneshot::Sender<Result<usize, String>>, usize)> = Vec::new();
    let mut last_error = String::new();
    // Per VIP: its live backends, and since when they have been these.
    let mut live: BTreeMap<VipId, (BTreeSet<IpAddr>, Instant)> = BTreeMap::new();
    // When the next VIP settles (to wake up for it).
    let mut wake: Option<Instant> = None;
    // Some address waits for the probes' verdict (wake up when they report).
    let mut wants_verdict = false;
    loop {
        let s = snap.borrow_and_update().clone();
        let hold = match (&leaving, operator) {
            (Some(why), _) => Hold::Leaving(why.clone()),
            (None, true) => Hold::Operator,
            (None, false) => Hold::None,
        };
        let mut result: Result<(), String> = Ok(());
        match &s.state.bgp {
            None => {
                if let Some(t) = last_table.take() {
                    result = sync(&nl, t, None, &BTreeSet::new()).await.map(drop);
                    info!(table = t, "BGP announcements off; routes removed");
                }
                seen.clear();
                status.send_replace(None);
            }
            Some(cfg) => {
                if let Some(t) = last_table.filter(|t| *t != cfg.table) {
                    let _ = sync(&nl, t, None, &BTreeSet::new()).await;
                }
                last_table = Some(cfg.table);
                let t = Instant::now();
                live.retain(|id, _| s.specs.iter().any(|v| v.id == *id));
                for v in s.specs.iter() {
                    let set = live_set(v);
                    let e = live.entry(v.id).or_insert_with(|| (set.clone(), t));
                    if e.0 != set {
                        *e = (set, t);
                    }
                }
                let hold_for = Duration::from_millis(cfg.announce_hold_ms as u64);
                let probes = health.borrow_and_update().clone();
                let settled = |id: &VipId| {
                    live.get(id)
                        .is_some_and(|(_, since)| t >= *since + hold_for)
                        && probed(&s, &probes, id)
                };
                wake = live
                    .values()
                    .map(|(_, since)| *since + hold_for)
                    .filter(|w| *w > t)
                    .min();
                // What the table holds is what is announced now, also what an agent before
                // this one left there: a restart withdraws nothing.
                let announced: BTreeSet<IpAddr> = owned(&nl, cfg.table)
                    .await
                    .map(|m| m.keys().copied().collect())
                    .unwrap_or_default();
                let decisions = decide(&s, cfg, &hold, &announced, &settled);
                wants_verdict = decisions
                    .iter()
                    .any(|d| !d.announce && d.reason.contains("settle"));
                let iface = cfg
                    .interface
                    .clone()
                    .or_else(|| s.state.balancer.interface.clone());
                let ifindex = match &iface {
                    Some(i) => netlink::link(&nl, i).await.ok().map(|l| l.index),
                    None => None,
                };
                let want: BTreeSet<IpAddr> = decisions
                    .iter()
                    .filter(|d| d.announce)
                    .map(|d| d.address)
                    .collect();
                let now = match sync(&nl, cfg.table, ifindex, &want).await {
                    Ok(now) => now,
                    Err(e) => {
                        result = Err(e);
                        owned(&nl, cfg.table)
                            .await
                            .map(|m| m.keys().copied().collect())
                            .unwrap_or_default()
                    }
                };
                let t = Instant::now();
                seen.retain(|a, _| decisions.iter().any(|d| d.address == *a));
                let mut addresses = Vec::new();
                for d in &decisions {
                    let on = now.contains(&d.address);
                    let e = seen.entry(d.address).or_insert((!on, t));
                    if e.0 != on {
                        *e = (on, t);
                        info!(address = %d.address, announced = on, reason = %d.reason, "BGP announcement");
                    }
                    addresses.push(BgpAddress {
                        address: d.address,
                        vips: d.vips.clone(),
                        announced: on,
                        reason: d.reason.clone(),
                        since_s: t.duration_since(e.1).as_secs_f64(),
                    });
                }
                status.send_replace(Some(BgpStatus {
                    table: cfg.table,
                    protocol: ROUTE_PROTOCOL,
                    interface: iface,
                    min_live_backends: cfg.min_live_backends,
                    withdraw_wait_ms: cfg.withdraw_wait_ms,
                    withdrawn_by_operator: operator,
                    leaving: leaving.is_some(),
                    addresses,
                    error: result.as_ref().err().cloned(),
                }));
            }
        }
        match &result {
            Err(e) if *e != last_error => {
                warn!(error = %e, "writing the BGP routes");
                last_error = e.clone();
            }
            Ok(()) => last_error.clear(),
            _ => {}
        }
        for (reply, before) in pending.drain(..) {
            let _ = reply.send(result.clone().map(|()| before));
        }
        tokio::select! {
            r = snap.changed() => if r.is_err() { return },
            r = health.changed(), if wants_verdict => if r.is_err() { return },
            req = rx.recv() => {
                let Some(req) = req else { return };
                let before = status
                    .borrow()
                    .as_ref()
                    .map_or(0, |st| st.addresses.iter().filter(|a| a.announced).count());
                match req.op {
                    Op::Withdraw => operator = true,
                    Op::Announce => operator = false,
                    Op::Leave(why) => leaving = Some(why),
                    Op::Rejoin => leaving = None,
                }
                pending.push((req.reply, before));
            }
            _ = tokio::time::sleep_until(
                wake.map_or(Instant::now() + Duration::from_secs(1), |w| {
                    w.min(Instant::now() + Duration::from_secs(1))
                })
                .into(),
            ) => {}
        }
    }
}
