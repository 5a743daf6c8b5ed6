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

use super::{Decision, Hold, ROUTE_PROTOCOL, live_set};
use crate::{
    api::{BgpAddress, BgpStatus},
    health::supervisor::HealthViews,
    netlink::{self, NetlinkError},
    state::{BgpConfig, VipId},
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

/// The announcer's task: a round (the table made equal to what [`super::decide`] says, the
/// status published, waiting requests answered), then a wait for what may change it.
async fn run(
    snap: watch::Receiver<Arc<Snapshot>>,
    health: watch::Receiver<Arc<HealthViews>>,
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
    let mut a = Announcer {
        nl,
        snap,
        health,
        status,
        operator: false,
        leaving: None,
        seen: BTreeMap::new(),
        last_table: None,
        live: BTreeMap::new(),
        wake: None,
        wants_verdict: false,
        last_error: String::new(),
    };
    let mut pending: Vec<(oneshot::Sender<Result<usize, String>>, usize)> = Vec::new();
    loop {
        let result = a.round().await;
        a.log_error(&result);
        for (reply, before) in pending.drain(..) {
            let _ = reply.send(result.clone().map(|()| before));
        }
        match a.next(&mut rx).await {
            Next::Stop => return,
            Next::Round => {}
            Next::Request(req) => {
                pending.push((req.reply, a.announced()));
                a.take(req.op);
            }
        }
    }
}

/// The announcer's state; the task owns it.
struct Announcer {
    nl: Handle,
    snap: watch::Receiver<Arc<Snapshot>>,
    health: watch::Receiver<Arc<HealthViews>>,
    status: watch::Sender<Option<BgpStatus>>,
    /// `maglb bgp withdraw` holds everything back (until `maglb bgp announce`).
    operator: bool,
    /// The agent leaves, for this reason.
    leaving: Option<String>,
    /// Per address: announced, since when.
    seen: BTreeMap<IpAddr, (bool, Instant)>,
    /// The table our routes were last written to (to clean it when the config changes).
    last_table: Option<u32>,
    /// Per VIP: its live backends, and since when they have been these.
    live: BTreeMap<VipId, (BTreeSet<IpAddr>, Instant)>,
    /// When the next VIP settles (to wake up for it).
    wake: Option<Instant>,
    /// Some address waits for the probes' verdict (wake up when they report).
    wants_verdict: bool,
    /// The last error logged (an error is logged when it changes).
    last_error: String,
}

/// What woke the announcer.
enum Next {
    Stop,
    Round,
    Request(Request),
}

impl Announcer {
    fn hold(&self) -> Hold {
        match (&self.leaving, self.operator) {
            (Some(why), _) => Hold::Leaving(why.clone()),
            (None, true) => Hold::Operator,
            (None, false) => Hold::None,
        }
    }

    /// How many addresses the last round announced.
    fn announced(&self) -> usize {
        self.status
            .borrow()
            .as_ref()
            .map_or(0, |st| st.addresses.iter().filter(|a| a.announced).count())
    }

    fn take(&mut self, op: Op) {
        match op {
            Op::Withdraw => self.operator = true,
            Op::Announce => self.operator = false,
            Op::Leave(why) => self.leaving = Some(why),
            Op::Rejoin => self.leaving = None,
        }
    }

    fn log_error(&mut self, result: &Result<(), String>) {
        match result {
            Err(e) if *e != self.last_error => {
                warn!(error = %e, "writing the BGP routes");
                self.last_error = e.clone();
            }
            Ok(()) => self.last_error.clear(),
            _ => {}
        }
    }

    /// Waits for a new snapshot, the probes' verdict (if a VIP waits for it), a request, the
    /// next VIP to settle, or a second (the table is re-read).
    async fn next(&mut self, rx: &mut mpsc::Receiver<Request>) -> Next {
        let now = Instant::now();
        let until = self.wake.map_or(now + Duration::from_secs(1), |w| {
            w.min(now + Duration::from_secs(1))
        });
        tokio::select! {
            r = self.snap.changed() => if r.is_err() { Next::Stop } else { Next::Round },
            r = self.health.changed(), if self.wants_verdict => {
                if r.is_err() { Next::Stop } else { Next::Round }
            }
            req = rx.recv() => req.map_or(Next::Stop, Next::Request),
            _ = tokio::time::sleep_until(until.into()) => Next::Round,
        }
    }

    /// One round on the latest snapshot.
    async fn round(&mut self) -> Result<(), String> {
        let s = self.snap.borrow_and_update().clone();
        let Some(cfg) = &s.state.bgp else {
            let mut r = Ok(());
            if let Some(t) = self.last_table.take() {
                r = sync(&self.nl, t, None, &BTreeSet::new()).await.map(drop);
                info!(table = t, "BGP announcements off; routes removed");
            }
            self.seen.clear();
            self.status.send_replace(None);
            return r;
        };
        if let Some(t) = self.last_table.filter(|t| *t != cfg.table) {
            let _ = sync(&self.nl, t, None, &BTreeSet::new()).await;
        }
        self.last_table = Some(cfg.table);
        let decisions = self.decide(&s, cfg).await;
        let iface = cfg
            .interface
            .clone()
            .or_else(|| s.state.balancer.interface.clone());
        let ifindex = match &iface {
            Some(i) => netlink::link(&self.nl, i).await.ok().map(|l| l.index),
            None => None,
        };
        let want: BTreeSet<IpAddr> = decisions
            .iter()
            .filter(|d| d.announce)
            .map(|d| d.address)
            .collect();
        let (result, now) = match sync(&self.nl, cfg.table, ifindex, &want).await {
            Ok(now) => (Ok(()), now),
            Err(e) => (Err(e), self.in_table(cfg.table).await),
        };
        let addresses = self.addresses(&decisions, &now);
        self.status.send_replace(Some(BgpStatus {
            table: cfg.table,
            protocol: ROUTE_PROTOCOL,
            interface: iface,
            min_live_backends: cfg.min_live_backends,
            withdraw_wait_ms: cfg.withdraw_wait_ms,
            withdrawn_by_operator: self.operator,
            leaving: self.leaving.is_some(),
            addresses,
            error: result.as_ref().err().cloned(),
        }));
        result
    }

    /// The addresses our routes in `table` announce now (none if it cannot be read).
    async fn in_table(&self, table: u32) -> BTreeSet<IpAddr> {
        owned(&self.nl, table)
            .await
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default()
    }

    /// What to announce, with each VIP's live backends followed (a VIP settles once they
    /// have not changed for `announce_hold_ms` and the probes have a verdict on each).
    async fn decide(&mut self, s: &Snapshot, cfg: &BgpConfig) -> Vec<Decision> {
        let t = Instant::now();
        self.live
            .retain(|id, _| s.specs.iter().any(|v| v.id == *id));
        for v in s.specs.iter() {
            let set = live_set(v);
            let e = self.live.entry(v.id).or_insert_with(|| (set.clone(), t));
            if e.0 != set {
                *e = (set, t);
            }
        }
        let hold_for = Duration::from_millis(cfg.announce_hold_ms as u64);
        self.wake = self
            .live
            .values()
            .map(|(_, since)| *since + hold_for)
            .filter(|w| *w > t)
            .min();
        let probes = self.health.borrow_and_update().clone();
        let live = &self.live;
        let settled = |id: &VipId| {
            live.get(id)
                .is_some_and(|(_, since)| t >= *since + hold_for)
                && probed(s, &probes, id)
        };
        // What the table holds is what is announced now, also what an agent before this
        // one left there: a restart withdraws nothing.
        let announced = self.in_table(cfg.table).await;
        let decisions = super::decide(s, cfg, &self.hold(), &announced, &settled);
        self.wants_verdict = decisions
            .iter()
            .any(|d| !d.announce && d.reason.contains("settle"));
        decisions
    }

    /// The status of each address, with announcements that changed logged.
    fn addresses(&mut self, decisions: &[Decision], now: &BTreeSet<IpAddr>) -> Vec<BgpAddress> {
        let t = Instant::now();
        self.seen
            .retain(|a, _| decisions.iter().any(|d| d.address == *a));
        let mut addresses = Vec::new();
        for d in decisions {
            let on = now.contains(&d.address);
            let e = self.seen.entry(d.address).or_insert((!on, t));
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
        addresses
    }
}
