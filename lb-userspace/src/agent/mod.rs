//! `maglb agent`: wires the pieces together and runs until SIGTERM or SIGINT.
//!
//! - the writer ([`crate::writer`]), on a thread of its own: the one owner of the desired
//!   state, the state file and the maps;
//! - the VRRP speaker ([`crate::vrrp::speaker`]), on a thread of its own;
//! - on the async runtime: the probe supervisor (and the keeper of its probe classifier,
//!   [`crate::health::tunnel`]), the next-hop refresher, the BGP announcer
//!   ([`crate::bgp`]) and the HTTP listeners (admin socket, read-only socket, metrics and
//!   status page).
//!
//! On SIGTERM the BGP routes are withdrawn first and the agent forwards on for
//! `withdraw_wait_ms`, then a VRRP master hands over; the pinned datapath keeps forwarding
//! after the agent exits.

mod nexthop;

use std::{
    collections::BTreeMap,
    io,
    net::SocketAddr,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, bail};
use tokio::{net::UnixListener, sync::watch};
use tracing::{info, warn};

use crate::{
    api::server::{self, Api},
    bgp::announcer::{BgpHandle, Op as BgpOp},
    bpffs,
    datapath::{Datapath, LoadOptions},
    health,
    metrics::{self, ProbeMetrics, WriterMetrics},
    state::{State, down_after},
    store::{Persisted, Store, StoreError},
    views::Views,
    vrrp::speaker::Speaker,
    writer::Snapshot,
    writer::Writer,
};

/// Where the agent keeps its sockets, state and pins.
#[derive(Clone, Debug)]
pub struct Options {
    pub socket: PathBuf,
    /// The read-only socket (status, lists, counters for any local user); none: not at all.
    pub read_socket: Option<PathBuf>,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    /// Where to serve Prometheus metrics and the status page; none: not at all.
    pub metrics: Option<SocketAddr>,
    /// A `maglb.toml` to start from when the state directory has no state yet.
    pub initial_config: Option<PathBuf>,
    /// Start with an empty state when the state file is unreadable (it is moved aside).
    pub start_empty: bool,
}

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(opts: Options) -> anyhow::Result<()> {
    crate::sys::map_large_allocations();
    crate::tls::install_provider();
    if let Some(at) = bpffs::ensure(&opts.bpffs)? {
        info!(at = %at.display(), "mounted a BPF filesystem for the pins");
    }
    let mut store = Store::open(&opts.state_dir)?;
    let saved = load_state(&mut store, &opts)?;
    // The VRRP speaker reads snapshots through `vrrp_snap`. When an attached datapath is
    // pinned it forwards already, so the speaker starts before the datapath is loaded again
    // (a few hundred milliseconds: the program is verified anew): a returning preferred
    // balancer takes over without waiting for that. Otherwise it starts once the writer
    // has made the datapath carry the state.
    let pinned = Datapath::pinned_and_attached(&opts.bpffs);
    let (vrrp_tx, vrrp_snap) = watch::channel(Arc::new(Snapshot::preliminary(
        saved.state.clone(),
        saved.down.clone(),
        pinned,
    )));
    let early_speaker = if pinned {
        Some(Speaker::spawn(vrrp_snap.clone())?)
    } else {
        None
    };
    let load = LoadOptions {
        conntrack_entries: saved
            .state
            .balancer
            .conntrack_entries
            .unwrap_or(lb_common::DEFAULT_CONNTRACK_ENTRIES),
    };
    let dp = Datapath::load_pinned(&opts.bpffs, &load)?;
    let counters = dp.counters();
    let writer_metrics = WriterMetrics::default();
    let probe_metrics = ProbeMetrics::default();
    info!(
        vips = saved.state.vips.len(),
        attached = dp.is_attached(),
        state_file = %store.path().display(),
        "agent state loaded"
    );
    let state_file = store.path();
    let (writer, snap) = Writer::open(store, saved, dp, writer_metrics.clone())?;
    let (writer, writer_thread) = writer.spawn();
    vrrp_tx.send_replace(snap.borrow().clone());
    let speaker = match early_speaker {
        Some(s) => s,
        None => Speaker::spawn(vrrp_snap)?,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (health_tx, health_rx) = watch::channel(Arc::new(BTreeMap::new()));
        let (tunnel_tx, tunnel_rx) = watch::channel(Arc::default());
        tokio::spawn(health::tunnel::run(
            snap.clone(),
            opts.bpffs.join(crate::datapath::LAYOUT),
            tunnel_tx,
        ));
        tokio::spawn(health::supervisor::run(
            writer.clone(),
            snap.clone(),
            tunnel_rx.clone(),
            health_tx,
            probe_metrics.clone(),
        ));
        tokio::spawn(nexthop::run(writer.clone(), snap.clone()));
        let mut follow = snap.clone();
        tokio::spawn(async move {
            while follow.changed().await.is_ok() {
                vrrp_tx.send_replace(follow.borrow_and_update().clone());
            }
        });
        let bgp = BgpHandle::spawn(snap.clone(), health_rx.clone());
        let views = Views {
            snap,
            health: health_rx,
            vrrp: speaker.status.clone(),
            bgp: bgp.status.clone(),
            tunnel: tunnel_rx,
            counters,
            state_file,
            bpffs: opts.bpffs.clone(),
        };
        let registry = metrics::registry(views.clone(), &writer_metrics, &probe_metrics);
        let api = Arc::new(Api {
            writer,
            views,
            vrrp: speaker.commands.clone(),
            bgp,
            metrics: registry,
        });
        serve(&opts, api).await
    })?;
    // A planned stop: a VRRP master hands over (priority 0) before the agent goes.
    speaker.shutdown(Duration::from_secs(2));
    drop(runtime);
    let _ = writer_thread.join();
    for s in [Some(&opts.socket), opts.read_socket.as_ref()]
        .into_iter()
        .flatten()
    {
        let _ = std::fs::remove_file(s);
    }
    info!("agent stopped; the datapath keeps forwarding");
    Ok(())
}

/// What to start from: the state directory; on first start the initial config, if any.
fn load_state(store: &mut Store, opts: &Options) -> anyhow::Result<Persisted> {
    match store.load() {
        Ok(Some(p)) => Ok(p),
        Ok(None) => {
            let Some(path) = opts.initial_config.as_ref().filter(|p| p.exists()) else {
                return Ok(Persisted::default());
            };
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let state =
                State::from_toml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            // Backends whose check says `initial = "down"` start down, as when added later.
            let down = down_after(&State::default(), &state, &Default::default());
            let p = Persisted { state, down };
            store.reset(&p)?;
            info!(file = %path.display(), "first start: state taken from the initial config");
            Ok(p)
        }
        Err(StoreError::Corrupt { file, why }) if opts.start_empty => {
            // Both the snapshot and the journal go aside: the journal's records only mean
            // something on top of the snapshot they follow.
            for f in store.files() {
                if !f.exists() {
                    continue;
                }
                let mut aside = f.clone().into_os_string();
                aside.push(".unreadable");
                std::fs::rename(&f, &aside)
                    .with_context(|| format!("moving {} aside", f.display()))?;
                warn!(file = %f.display(), moved_to = %Path::new(&aside).display(),
                    "moved aside (--start-empty)");
            }
            warn!(file = %file.display(), %why,
                "the state is unreadable; starting empty as asked (--start-empty)");
            let p = Persisted::default();
            store.reset(&p)?;
            Ok(p)
        }
        Err(e) => Err(e.into()),
    }
}

/// Binds the listeners and serves until SIGTERM or SIGINT.
async fn serve(opts: &Options, api: Arc<Api>) -> anyhow::Result<()> {
    let admin = bind(&opts.socket, 0o600)?;
    info!(socket = %opts.socket.display(), "serving the API");
    tokio::spawn(server::serve_unix(admin, server::admin(api.clone()), true));
    if let Some(path) = &opts.read_socket {
        let l = bind(path, 0o666)?;
        info!(socket = %path.display(), "serving the read-only API");
        if let Some((dir, mode)) = closed_ancestor(path) {
            warn!(socket = %path.display(), dir = %dir.display(), mode = format!("{mode:o}"),
                "users other than root cannot reach the read-only socket: a directory on its \
                 path is not searchable by them (chmod o+x it, or choose --read-socket)");
        }
        tokio::spawn(server::serve_unix(l, server::read_only(api.clone()), false));
    }
    if let Some(at) = opts.metrics {
        let l = tokio::net::TcpListener::bind(at)
            .await
            .with_context(|| format!("binding the metrics listener {at}"))?;
        info!(%at, "serving metrics and the status page");
        tokio::spawn(server::serve_tcp(l, server::metrics(api.clone())));
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    // A planned stop: the router stops sending before the agent goes. The API still answers
    // meanwhile.
    if api.bgp.active() {
        match api
            .bgp
            .withdraw_and_wait(BgpOp::Leave("the agent is stopping".into()))
            .await
        {
            Ok(took) => info!(
                took_ms = took.as_millis() as u64,
                "BGP routes withdrawn before stopping"
            ),
            Err(e) => warn!(error = %e, "withdrawing the BGP routes before stopping"),
        }
    }
    Ok(())
}

/// The first directory on the way to `path` that other users cannot pass through (no `o+x`),
/// with its mode.
fn closed_ancestor(path: &Path) -> Option<(PathBuf, u32)> {
    let abs = std::path::absolute(path).ok()?;
    abs.ancestors().skip(1).find_map(|d| {
        let mode = std::fs::metadata(d).ok()?.permissions().mode();
        (mode & 0o001 == 0).then(|| (d.to_owned(), mode & 0o7777))
    })
}

/// Binds a socket: parent directory created (mode 0755), a stale socket file removed (only if it is a
/// socket no one serves), then the given mode.
fn bind(path: &Path, mode: u32) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        // Whatever the umask: the read-only socket in it must be reachable by every user
        // (the admin socket is protected by its own mode, 0600).
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
            .with_context(|| format!("setting the mode of {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("another agent is serving {}; stop it first", path.display());
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; remove it or choose another path",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    Ok(l)
}
