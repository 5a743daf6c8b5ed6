//! The one writer: a thread of its own that owns the desired state, the state file, the
//! datapath and the reconciler, and applies commands one at a time, in order. It is the only
//! code that writes the state file or the maps. After each command it publishes a
//! [`Snapshot`]; readers never wait for it, and nothing it does (fsync, Maglev builds, map
//! writes) runs on the async workers.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Instant,
};

use lb_common::{
    Config, DEFAULT_FLOOD_NEW_FLOWS_PER_S, DEFAULT_GUE_PORT, DEFAULT_TCP_IDLE_MS,
    DEFAULT_UDP_IDLE_MS, ENCAP_GUE, ENCAP_IPIP, Settings, ms_to_ticks,
};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{info, warn};

mod snapshot;

pub use self::snapshot::{Placement, Snapshot};
use crate::{
    datapath::{Datapath, DatapathError},
    metrics::WriterMetrics,
    reconcile::{Exhausted, Reconciler},
    state::{AttachMode, BackendKey, Change, Encap, Refusal, State, VipId, VipSpec, down_after},
    store::{Entry, Persisted, Store, StoreError},
};

/// The datapath's runtime settings for `[balancer]` (defaults where it says nothing).
fn settings_for(b: &crate::state::BalancerSettings) -> Settings {
    let ticks = |ms: Option<u32>, default: u32| match ms.unwrap_or(default) {
        0 => 0,
        ms => ms_to_ticks(ms).max(1),
    };
    Settings {
        tcp_idle_ticks: ticks(b.tcp_idle_timeout_ms, DEFAULT_TCP_IDLE_MS),
        udp_idle_ticks: ticks(b.udp_idle_timeout_ms, DEFAULT_UDP_IDLE_MS),
        flood_new_flows_per_s: b
            .flood_new_flows_per_s
            .unwrap_or(DEFAULT_FLOOD_NEW_FLOWS_PER_S),
        gue_port: b.gue_port.unwrap_or(DEFAULT_GUE_PORT),
        encap: match b.encap {
            Encap::Ipip => ENCAP_IPIP,
            Encap::Gue => ENCAP_GUE,
        },
        ..Settings::default()
    }
}

/// A plan that rebuilt more tables than this hands freed memory back to the system after
/// (an apply of many VIPs passes through tens of megabytes of tables).
const RELEASE_AFTER_TABLES: usize = 16;

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Exhausted(#[from] Exhausted),
    #[error(transparent)]
    Storage(#[from] StoreError),
    /// Attaching failed in a way the operator can fix (no such interface, no native XDP).
    #[error("{0}")]
    Attach(String),
    /// The datapath refused a write; the previous state was restored.
    #[error("the datapath refused the change (the previous state is restored): {0}")]
    Datapath(String),
    #[error("the agent is stopping")]
    Stopping,
}

impl From<DatapathError> for WriteError {
    fn from(e: DatapathError) -> Self {
        WriteError::Datapath(crate::error_chain(&e))
    }
}

/// What the writer is asked to do.
pub enum Command {
    Change {
        change: Box<Change>,
        /// The client's request id, recorded with the state when the change is committed.
        request: Option<String>,
        reply: oneshot::Sender<Result<Vec<String>, WriteError>>,
    },
    /// A backend's probes say it went up or down.
    Health {
        vip: VipId,
        backend: IpAddr,
        up: bool,
    },
    /// Adaptive weights: a backend's effective weight, in percent of its configured one.
    Weight {
        vip: VipId,
        backend: IpAddr,
        percent: u32,
    },
    /// The datapath configuration the next-hop refresher computed.
    Config {
        config: Config,
        nexthop: Option<(IpAddr, [u8; 6])>,
    },
    /// Whether request `id` was committed.
    Committed {
        id: String,
        reply: oneshot::Sender<bool>,
    },
    /// Compare the maps, as read back, with the state.
    Verify {
        reply: oneshot::Sender<Result<Vec<String>, WriteError>>,
    },
}

/// The way to the writer. Commands queue (they are never refused for being many).
#[derive(Clone)]
pub struct WriterHandle {
    tx: mpsc::Sender<Command>,
}

impl WriterHandle {
    pub async fn change(
        &self,
        change: Change,
        request: Option<String>,
    ) -> Result<Vec<String>, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Change {
            change: Box::new(change),
            request,
            reply,
        })
        .await?;
        rx.await.map_err(|_| WriteError::Stopping)?
    }

    pub async fn verify(&self) -> Result<Vec<String>, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Verify { reply }).await?;
        rx.await.map_err(|_| WriteError::Stopping)?
    }

    pub async fn committed(&self, id: String) -> Result<bool, WriteError> {
        let (reply, rx) = oneshot::channel();
        self.send(Command::Committed { id, reply }).await?;
        rx.await.map_err(|_| WriteError::Stopping)
    }

    /// Sends a command without waiting for it to be carried out.
    pub async fn send(&self, cmd: Command) -> Result<(), WriteError> {
        self.tx.send(cmd).await.map_err(|_| WriteError::Stopping)
    }
}

pub struct Writer {
    state: Arc<State>,
    /// What the datapath carries for `state` (given `down`).
    specs: Arc<Vec<VipSpec>>,
    /// Something changed since the last snapshot was published.
    dirty: bool,
    store: Store,
    dp: Datapath,
    rec: Reconciler,
    down: BTreeSet<BackendKey>,
    /// Adaptive weights below 100% of the configured weight (not kept across restarts: a
    /// new agent measures again).
    weights: BTreeMap<BackendKey, u32>,
    /// Interface and mode the program is attached with, as far as this writer knows.
    attached: Option<(String, AttachMode)>,
    /// Why the datapath is detached although no one detached it (until the next attach).
    detached_why: Option<Arc<str>>,
    nexthop: Option<(IpAddr, [u8; 6])>,
    serial: u64,
    publish: watch::Sender<Arc<Snapshot>>,
    metrics: WriterMetrics,
}

impl Writer {
    /// Takes over the datapath (repairing what a killed agent left half done) and makes it
    /// carry `state`. A datapath that refuses is logged, and the agent serves anyway.
    pub fn open(
        store: Store,
        saved: Persisted,
        mut dp: Datapath,
        metrics: WriterMetrics,
    ) -> Result<(Self, watch::Receiver<Arc<Snapshot>>), DatapathError> {
        let Persisted { state, down } = saved;
        let down = down_after(&state, &state, &down);
        let obs = dp.observe()?;
        let (rec, repairs) = Reconciler::adopt(&obs);
        if !repairs.is_empty() {
            warn!(
                writes = repairs.len(),
                "repairing maps a previous agent left half written"
            );
        }
        dp.apply(repairs)?;
        if let Some(cfg) = dp.older_config() {
            dp.set_config(&cfg)?;
        }
        // A migration takes over the older layout's link once the maps carry the state.
        let linked = dp.is_attached() || dp.is_migrating();
        let attached = match (&state.balancer.interface, linked) {
            (Some(i), true) => Some((i.clone(), state.balancer.mode)),
            _ => None,
        };
        let (publish, rx) = watch::channel(Arc::new(Snapshot::default()));
        let mut w = Writer {
            state: Arc::new(state),
            specs: Arc::default(),
            dirty: true,
            store,
            dp,
            rec,
            down,
            weights: BTreeMap::new(),
            attached,
            detached_why: None,
            nexthop: None,
            serial: 0,
            publish,
            metrics,
        };
        w.detach_if_defunct();
        if let Err(e) = w.realize(w.specs_for(&w.state, &w.down)) {
            warn!(error = %e, "could not make the datapath carry the saved state; serving anyway");
        }
        if w.dp.is_migrating() {
            w.dp.finish_migration()?;
            w.detach_if_defunct();
        }
        w.publish();
        Ok((w, rx))
    }

    /// When the datapath found its pinned link defunct (the interface is gone) and unpinned
    /// it, the state says detached from now on (journaled, so a restart agrees), and status
    /// says why until the next attach. The VIPs and backends stay.
    fn detach_if_defunct(&mut self) {
        let (Some(why), Some(iface)) = (
            self.dp.defunct_link(),
            self.state.balancer.interface.clone(),
        ) else {
            return;
        };
        let why: Arc<str> = format!(
            "the XDP link to {iface} left pinned by a previous agent was defunct ({why}); it \
             was unpinned and the agent started detached, with the state: attach again with \
             `maglb attach --iface IFACE`"
        )
        .into();
        warn!(%iface, reason = %why, "starting detached");
        match Change::Detach.apply_to(&self.state) {
            Ok(next) => {
                if let Err(e) = self.store.commit(Entry::Change(Change::Detach), None, None) {
                    warn!(error = %crate::error_chain(&e), "recording the detach");
                }
                self.state = Arc::new(next);
            }
            Err(e) => warn!(error = %e, "detaching the state"),
        }
        self.attached = None;
        self.detached_why = Some(why);
        self.dirty = true;
    }

    /// Runs the writer on a thread of its own until every handle is gone.
    pub fn spawn(self) -> (WriterHandle, std::thread::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(4096);
        let thread = std::thread::Builder::new()
            .name("maglb-writer".into())
            .spawn(move || self.run(rx))
            .expect("spawning the writer thread");
        (WriterHandle { tx }, thread)
    }

    fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        // Start-up read the journal and parsed the kernel's BTF (about 30 MB, all freed).
        crate::sys::release_free_memory();
        while let Some(cmd) = rx.blocking_recv() {
            match cmd {
                Command::Change {
                    change,
                    request,
                    reply,
                } => {
                    let r = self.change(&change, request.as_deref());
                    let _ = reply.send(r);
                }
                Command::Health { vip, backend, up } => self.health(vip, backend, up),
                Command::Weight {
                    vip,
                    backend,
                    percent,
                } => self.weight(vip, backend, percent),
                Command::Config { config, nexthop } => self.config(config, nexthop),
                Command::Committed { id, reply } => {
                    let _ = reply.send(self.store.committed(&id));
                }
                Command::Verify { reply } => {
                    let r = self
                        .dp
                        .observe()
                        .map_err(WriteError::from)
                        .map(|obs| crate::reconcile::verify(&obs, &self.specs));
                    let _ = reply.send(r);
                }
            }
            if self.dirty {
                self.publish();
            }
        }
    }

    /// What the datapath should carry for `s`, given the backends that are `down`.
    fn specs_for(&self, s: &State, down: &BTreeSet<BackendKey>) -> Vec<VipSpec> {
        s.vips
            .iter()
            .map(|v| {
                v.spec_scaled(
                    |a| !down.contains(&(v.address, *a)),
                    |a| self.weights.get(&(v.address, *a)).copied().unwrap_or(100),
                )
            })
            .collect()
    }

    /// Validates, persists and applies a change. The state file is the commit point: once it
    /// is written, the change is made (a restarted writer finishes it). If the datapath
    /// refuses, the previous state is restored in the file and the maps.
    fn change(
        &mut self,
        change: &Change,
        request: Option<&str>,
    ) -> Result<Vec<String>, WriteError> {
        let new = change.apply_to(&self.state)?;
        let lines = self.state.diff(&new);
        if new == *self.state {
            return Ok(lines);
        }
        // The store replays the change with the same rule (`down_after`).
        let down = down_after(&self.state, &new, &self.down);
        let specs = self.specs_for(&new, &down);
        self.rec.check_capacity(&specs)?;
        self.store
            .commit(Entry::Change(change.clone()), request, None)?;
        let old = std::mem::replace(&mut self.state, Arc::new(new));
        self.down = down;
        if let Err(e) = self.realize(specs) {
            warn!(change = change.name(), error = %e, "the datapath refused; restoring the previous state");
            self.rollback(old, request);
            return Err(e);
        }
        info!(change = change.name(), ?lines, "applied");
        Ok(lines)
    }

    fn rollback(&mut self, old: Arc<State>, request: Option<&str>) {
        if let Err(e) = self
            .store
            .commit(Entry::Replace((*old).clone()), None, request)
        {
            warn!(error = %crate::error_chain(&e), "restoring the previous state file");
        }
        // As the store replays the restore (`Entry::Replace`).
        self.down = down_after(&self.state, &old, &self.down);
        self.state = old;
        // What the maps hold after a failed write is read back, not assumed.
        let specs = self.specs_for(&self.state, &self.down);
        if let Err(e) = self.resync().and_then(|()| self.realize(specs)) {
            warn!(error = %e, "restoring the previous state in the datapath");
        }
    }

    /// Rebuilds the reconciler from what the maps hold.
    fn resync(&mut self) -> Result<(), WriteError> {
        let obs = self.dp.observe()?;
        let (rec, repairs) = Reconciler::adopt(&obs);
        self.rec = rec;
        self.dp.apply(repairs)?;
        Ok(())
    }

    /// Makes the datapath carry the state: attachment, then `specs` (the state's VIPs and
    /// backends, given their health).
    fn realize(&mut self, specs: Vec<VipSpec>) -> Result<(), WriteError> {
        self.dirty = true;
        let state = self.state.clone();
        self.attach_to(&state)?;
        let started = Instant::now();
        let ops = self.rec.plan(&specs)?;
        let tables = ops
            .iter()
            .filter(|o| matches!(o, crate::reconcile::Op::WriteTable { .. }))
            .count();
        self.dp.apply(ops)?;
        self.specs = Arc::new(specs);
        let settings = settings_for(&state.balancer);
        if self.dp.settings().ok().as_ref() != Some(&settings) {
            self.dp.set_settings(&settings)?;
            info!(
                encap = %state.balancer.encap,
                tcp_idle_ms = ?state.balancer.tcp_idle_timeout_ms,
                udp_idle_ms = ?state.balancer.udp_idle_timeout_ms,
                flood_new_flows_per_s = ?state.balancer.flood_new_flows_per_s,
                "datapath settings written"
            );
        }
        if tables > 0 {
            self.metrics
                .rebuilt(tables as u64, started.elapsed().as_secs_f64());
        }
        if tables > RELEASE_AFTER_TABLES {
            crate::sys::release_free_memory();
        }
        Ok(())
    }

    fn attach_to(&mut self, s: &State) -> Result<(), WriteError> {
        let want = s.balancer.interface.clone().map(|i| (i, s.balancer.mode));
        let linked = self.dp.is_attached() || self.dp.is_migrating();
        if want == self.attached && (want.is_none() || linked) {
            return Ok(());
        }
        if self.dp.is_attached() {
            self.dp.detach()?;
            self.attached = None;
            info!("detached");
        }
        let Some((iface, mode)) = want else {
            return Ok(());
        };
        self.dp.attach(&iface, mode.to_mode()).map_err(|e| {
            let chain = crate::error_chain(&e);
            match mode {
                AttachMode::Native if chain.contains("Operation not supported") => {
                    WriteError::Attach(format!(
                        "{iface} does not take XDP in native mode ({chain}); retry with `--mode generic`"
                    ))
                }
                _ if chain.contains("No such device") || chain.contains("unknown network interface") => {
                    WriteError::Attach(format!("no interface {iface:?} here: see `ip link` ({chain})"))
                }
                _ => WriteError::Attach(chain),
            }
        })?;
        info!(%iface, %mode, "attached");
        self.attached = Some((iface, mode));
        self.detached_why = None;
        Ok(())
    }

    fn health(&mut self, vip: VipId, backend: IpAddr, up: bool) {
        let key = (vip, backend);
        if up != self.down.contains(&key) {
            return;
        }
        // A verdict on a backend that is gone, or no longer probed, comes too late.
        let probed = self.state.vip(&vip).is_some_and(|v| {
            v.backends
                .iter()
                .any(|b| b.address == backend && v.check_for(b).is_some())
        });
        if !up && !probed {
            return;
        }
        if up {
            self.down.remove(&key);
        } else {
            self.down.insert(key);
        }
        // Kept, so that a restarted agent sends no new flows to a backend it knew was down.
        if let Err(e) = self
            .store
            .commit(Entry::Health { vip, backend, up }, None, None)
        {
            warn!(error = %crate::error_chain(&e), %vip, %backend, "recording a health change");
        }
        if let Err(e) = self.realize(self.specs_for(&self.state, &self.down)) {
            warn!(error = %e, %vip, %backend, "applying a health change");
        }
    }

    /// An adaptive weight step: the datapath follows at once (not journaled).
    fn weight(&mut self, vip: VipId, backend: IpAddr, percent: u32) {
        let key = (vip, backend);
        let adaptive = self.state.vip(&vip).is_some_and(|v| v.adaptive_weights);
        let old = self.weights.get(&key).copied().unwrap_or(100);
        if !adaptive || old == percent {
            return;
        }
        if percent >= 100 {
            self.weights.remove(&key);
        } else {
            self.weights.insert(key, percent);
        }
        if let Err(e) = self.realize(self.specs_for(&self.state, &self.down)) {
            warn!(error = %e, %vip, %backend, percent, "applying an adaptive weight");
        }
    }

    fn config(&mut self, config: Config, nexthop: Option<(IpAddr, [u8; 6])>) {
        self.dirty |= self.nexthop != nexthop;
        self.nexthop = nexthop;
        if self.dp.config().ok() == Some(config) {
            return;
        }
        self.dirty = true;
        match self.dp.set_config(&config) {
            Ok(()) => info!(
                nexthop_mac = %crate::addr::fmt_mac(&config.nh_mac),
                mtu = config.mtu,
                ready = config.ready,
                "datapath configuration updated"
            ),
            Err(e) => warn!(error = %crate::error_chain(&e), "writing the datapath configuration"),
        }
    }

    /// Forgets the health of backends that no longer exist, and publishes a snapshot.
    fn publish(&mut self) {
        self.dirty = false;
        self.down = down_after(&self.state, &self.state, &self.down);
        let state = &self.state;
        self.weights.retain(|(v, a), _| {
            state
                .vip(v)
                .is_some_and(|v| v.adaptive_weights && v.backends.iter().any(|b| b.address == *a))
        });
        let placement: BTreeMap<VipId, Placement> = self
            .rec
            .placements()
            .map(|(id, index, slots)| {
                (
                    id,
                    Placement {
                        index,
                        slots: slots.iter().map(|(a, s)| (*a, s.index)).collect(),
                    },
                )
            })
            .collect();
        self.serial += 1;
        let snap = Snapshot {
            serial: self.serial,
            state: self.state.clone(),
            specs: self.specs.clone(),
            placement: Arc::new(placement),
            down: Arc::new(self.down.clone()),
            weights: Arc::new(self.weights.clone()),
            attached: self.dp.is_attached(),
            detached_why: self.detached_why.clone(),
            config: self.dp.config().unwrap_or_default(),
            nexthop: self.nexthop,
            slots_in_use: self.rec.slots_in_use(),
            owners: self.rec.owners(),
            conntrack: self.dp.conntrack_capacity(),
        };
        self.publish.send_replace(Arc::new(snap));
    }
}
