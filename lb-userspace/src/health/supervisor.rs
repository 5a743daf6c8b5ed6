//! The probe supervisor: one task per backend that has a health check, started, restarted
//! when its check changes and stopped when it goes, following the writer's snapshots. Results
//! come back on a channel; the supervisor owns the trackers, publishes what readers see, and
//! sends only transitions to the writer. Probes never wait for the writer.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    sync::{Semaphore, mpsc, watch},
    task::JoinHandle,
};
use tracing::{info, warn};

use super::{
    Probe, ProbeResult, Tracker,
    adaptive::Adaptive,
    tunnel::{self, TunnelState},
};
use crate::{
    metrics::ProbeMetrics,
    state::State,
    writer::{Command, Snapshot, WriteError, WriterHandle},
};

/// A backend of a VIP.
pub use crate::state::BackendKey;

/// What readers see of the probes: the tracker of every probed backend.
pub type HealthViews = BTreeMap<BackendKey, Tracker>;

/// Most probes in flight at once, over all backends.
const MAX_PROBES_IN_FLIGHT: usize = 256;
/// Readers see new results within this long (transitions at once).
const PUBLISH_EVERY: Duration = Duration::from_millis(200);
/// How long what was read of the balancer's own interface is taken as current.
const LINK_FRESH: Duration = Duration::from_millis(200);

/// The probes a state asks for.
pub fn probes(state: &State) -> BTreeMap<BackendKey, Probe> {
    let mut out = BTreeMap::new();
    for v in &state.vips {
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

type Outcome = (BackendKey, ProbeResult, Duration);

struct Supervisor {
    writer: WriterHandle,
    views: watch::Sender<Arc<HealthViews>>,
    metrics: ProbeMetrics,
    trackers: HealthViews,
    running: BTreeMap<BackendKey, (Probe, JoinHandle<()>)>,
    results: mpsc::Sender<Outcome>,
    permits: Arc<Semaphore>,
    dirty: bool,
    /// Probe latencies of the VIPs with adaptive weights.
    adaptive: Adaptive,
    /// Transitions sent to the writer that its snapshots do not show yet.
    pending: BTreeMap<BackendKey, bool>,
    /// The balancer's interface (from the state), and whether it was up with a carrier when
    /// last read.
    iface: Option<String>,
    link: Option<(Instant, bool)>,
    nl: Option<rtnetlink::Handle>,
}

/// Runs until the writer goes. `tunnel` says what probes over the tunnel can count on.
pub async fn run(
    writer: WriterHandle,
    mut snap: watch::Receiver<Arc<Snapshot>>,
    mut tunnel: watch::Receiver<Arc<TunnelState>>,
    views: watch::Sender<Arc<HealthViews>>,
    metrics: ProbeMetrics,
) {
    let (results, mut rx) = mpsc::channel::<Outcome>(1024);
    let mut s = Supervisor {
        writer,
        views,
        metrics,
        trackers: BTreeMap::new(),
        running: BTreeMap::new(),
        results,
        permits: Arc::new(Semaphore::new(MAX_PROBES_IN_FLIGHT)),
        dirty: false,
        adaptive: Adaptive::default(),
        pending: BTreeMap::new(),
        iface: None,
        link: None,
        nl: None,
    };
    let mut tick = tokio::time::interval(PUBLISH_EVERY);
    loop {
        let current = snap.borrow_and_update().clone();
        let t = tunnel.borrow_and_update().clone();
        s.follow(&current, &t);
        tokio::select! {
            r = snap.changed() => if r.is_err() { break },
            r = tunnel.changed() => if r.is_err() { break },
            Some((key, result, took)) = rx.recv() => {
                if s.record(key, &result, took).await.is_err() {
                    break;
                }
            }
            _ = tick.tick() => s.publish(),
        }
    }
    for (_, (_, task)) in s.running {
        task.abort();
    }
}

impl Supervisor {
    /// Starts, restarts and stops probe tasks to match the snapshot's state (a probe whose
    /// route changes is restarted), and keeps the trackers in step with the writer's
    /// verdicts.
    fn follow(&mut self, snap: &Snapshot, t: &TunnelState) {
        if self.iface != snap.state.balancer.interface {
            self.iface = snap.state.balancer.interface.clone();
            self.link = None;
        }
        let want = tunnel::probes(snap, t);
        self.adaptive.follow(&snap.state);
        self.running.retain(|k, (p, task)| {
            let keep = want.get(k) == Some(p);
            if !keep {
                task.abort();
            }
            keep
        });
        self.follow_verdicts(snap, &want);
        for (k, p) in want {
            if self.running.contains_key(&k) {
                continue;
            }
            let task = tokio::spawn(probe_loop(
                k,
                p.clone(),
                self.results.clone(),
                self.permits.clone(),
            ));
            self.running.insert(k, (p, task));
        }
    }

    /// Keeps a tracker for each probe in `want`, in step with the writer's verdicts: a
    /// backend the writer holds down gets a tracker that starts down (it was known down
    /// before a restart, or was added with `initial = "down"`), and a tracker the writer
    /// disagrees with, with no transition of its own on the way, takes the writer's word (a
    /// backend removed and added again between two snapshots).
    fn follow_verdicts(&mut self, snap: &Snapshot, want: &BTreeMap<BackendKey, Probe>) {
        let before = self.trackers.len();
        self.trackers.retain(|k, _| want.contains_key(k));
        self.dirty |= before != self.trackers.len();
        self.pending
            .retain(|k, up| want.contains_key(k) && snap.is_up(&k.0, &k.1) != *up);
        for k in want.keys() {
            let up = snap.is_up(&k.0, &k.1);
            match self.trackers.get_mut(k) {
                // Up is what a backend without a result counts as; a tracker shows it once
                // probed. One the writer holds down shows it at once.
                None if up => {}
                None => {
                    self.trackers.insert(*k, Tracker::starting(false));
                    self.dirty = true;
                }
                Some(t) if t.up != up && !self.pending.contains_key(k) => {
                    *t = Tracker::starting(up);
                    self.dirty = true;
                }
                Some(_) => {}
            }
        }
    }

    /// Records a result; a transition is logged with its reason and sent to the writer.
    async fn record(
        &mut self,
        key: BackendKey,
        r: &ProbeResult,
        took: Duration,
    ) -> Result<(), WriteError> {
        let Some((probe, _)) = self.running.get(&key) else {
            return Ok(());
        };
        let (rise, fall) = (probe.check.rise, probe.check.fall);
        self.metrics.observe(&key, took);
        // While the balancer's own interface is down nothing can be reached, and that says
        // nothing about the backends: their verdicts stay, so that a balancer coming back
        // (a VRRP failback) carries the same backends as its peer.
        if let Err(why) = r
            && !self.link_running().await
        {
            let iface = self.iface.clone().unwrap_or_default();
            let t = self.trackers.entry(key).or_default();
            t.record_unjudged(format!("not judged: {iface} is down ({why})"), took);
            self.dirty = true;
            return Ok(());
        }
        if r.is_ok() {
            self.adapt(key, took).await?;
        }
        let t = self.trackers.entry(key).or_default();
        self.dirty = true;
        let Some(up) = t.record(r, took, rise, fall) else {
            return Ok(());
        };
        let (vip, backend) = key;
        if up {
            info!(%vip, %backend, rise, "backend up");
        } else {
            let reason = t.last.clone().unwrap_or_default();
            warn!(%vip, %backend, %reason, fall, "backend down");
        }
        self.publish();
        self.pending.insert(key, up);
        self.writer.send(Command::Health { vip, backend, up }).await
    }

    /// Feeds a successful probe's latency to adaptive weights; a step of the backend's
    /// effective weight is logged, counted and sent to the writer.
    async fn adapt(&mut self, key: BackendKey, took: Duration) -> Result<(), WriteError> {
        let trackers = &self.trackers;
        let Some(step) = self
            .adaptive
            .record(key, took, |k| trackers.get(k).is_none_or(|t| t.up))
        else {
            return Ok(());
        };
        let (vip, backend) = key;
        let (avg_ms, median_ms) = (step.average * 1e3, step.median * 1e3);
        if step.to < step.from {
            warn!(%vip, %backend, from = step.from, to = step.to, latency_ms = avg_ms,
                peers_median_ms = median_ms, "slow backend: effective weight lowered (percent of configured)");
        } else {
            info!(%vip, %backend, from = step.from, to = step.to, latency_ms = avg_ms,
                peers_median_ms = median_ms, "backend fast again: effective weight raised (percent of configured)");
        }
        self.metrics.weight_step(&key);
        self.writer
            .send(Command::Weight {
                vip,
                backend,
                percent: step.to,
            })
            .await
    }

    /// Whether the balancer's interface is up with a carrier (true when it has none, or it
    /// cannot be read: then probes judge as usual).
    async fn link_running(&mut self) -> bool {
        let Some(iface) = self.iface.clone() else {
            return true;
        };
        if let Some((at, running)) = self.link
            && at.elapsed() < LINK_FRESH
        {
            return running;
        }
        if self.nl.is_none() {
            self.nl = crate::netlink::connect().ok();
        }
        let Some(nl) = self.nl.as_ref() else {
            return true;
        };
        let running = match crate::netlink::link(nl, &iface).await {
            Ok(l) => l.running,
            Err(crate::netlink::NetlinkError::NoLink(_)) => false,
            Err(_) => true,
        };
        if self.link.is_none_or(|(_, was)| was) != running {
            if running {
                info!(%iface, "the balancer's interface is up: probes judge the backends again");
            } else {
                warn!(%iface, "the balancer's interface is down: failed probes do not take backends down meanwhile");
            }
        }
        self.link = Some((Instant::now(), running));
        running
    }

    fn publish(&mut self) {
        if std::mem::take(&mut self.dirty) {
            self.views.send_replace(Arc::new(self.trackers.clone()));
        }
    }
}

/// Probes one backend forever, every interval, starting at a random point of the first
/// interval so probes spread out.
async fn probe_loop(
    key: BackendKey,
    probe: Probe,
    tx: mpsc::Sender<Outcome>,
    permits: Arc<Semaphore>,
) {
    let prober = match probe.prober() {
        Ok(p) => p,
        Err(why) => {
            // A check that cannot even be set up (e.g. an unreadable CA file) fails every
            // time, with that reason.
            let mut tick =
                tokio::time::interval(Duration::from_millis(probe.check.interval_ms as u64));
            loop {
                tick.tick().await;
                if tx
                    .send((key, Err(why.clone()), Duration::ZERO))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    };
    let interval = Duration::from_millis(probe.check.interval_ms as u64);
    let seed = format!("{} {}", key.0, key.1);
    let jitter = crate::maglev::stable_hash(seed.as_bytes(), std::process::id() as u64)
        % (probe.check.interval_ms as u64).max(1);
    tokio::time::sleep(Duration::from_millis(jitter)).await;
    let mut tick = tokio::time::interval_at((Instant::now() + Duration::ZERO).into(), interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(_permit) = permits.acquire().await else {
            return;
        };
        let (r, took) = prober.run().await;
        if tx.send((key, r, took)).await.is_err() {
            return;
        }
    }
}
