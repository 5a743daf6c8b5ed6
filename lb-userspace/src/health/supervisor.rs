//! The probe supervisor: one task per backend that has a health check, started, restarted
//! when its check changes and stopped when it goes, following the writer's snapshots. Results
//! come back on a channel; the supervisor owns the trackers, publishes what readers see, and
//! sends only transitions to the writer. Probes never wait for the writer.

use std::{
    collections::BTreeMap,
    net::IpAddr,
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
    state::{State, VipId},
    writer::{Command, Snapshot, WriteError, WriterHandle},
};

/// A backend of a VIP.
pub type BackendKey = (VipId, IpAddr);

/// What readers see of the probes: the tracker of every probed backend.
pub type HealthViews = BTreeMap<BackendKey, Tracker>;

/// Most probes in flight at once, over all backends.
const MAX_PROBES_IN_FLIGHT: usize = 256;
/// Readers see new results within this long (transitions at once).
const PUBLISH_EVERY: Duration = Duration::from_millis(200);

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
    /// route changes is restarted).
    fn follow(&mut self, snap: &Snapshot, t: &TunnelState) {
        let want = tunnel::probes(snap, t);
        self.adaptive.follow(&snap.state);
        self.running.retain(|k, (p, task)| {
            let keep = want.get(k) == Some(p);
            if !keep {
                task.abort();
            }
            keep
        });
        let before = self.trackers.len();
        self.trackers.retain(|k, _| want.contains_key(k));
        self.dirty |= before != self.trackers.len();
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
