//! `maglb agent`: the one owner of the BPF maps and of the desired state. It serves the JSON
//! API on a Unix socket, persists every accepted change before answering, keeps the
//! datapath's next-hop MAC current, and leaves the (pinned) datapath forwarding when it exits.

mod core;
mod http;
pub mod vrrp;

use std::{
    io,
    os::unix::fs::{FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use lb_common::Config;
use rtnetlink::Handle;
use serde::{Serialize, de::DeserializeOwned};
use tokio::{net::UnixListener, sync::Semaphore};
use tracing::{info, warn};

pub use self::core::Core;
use crate::{
    addr, api,
    health::Probe,
    netdev, netlink,
    state::{BackendEntry, BackendState, Refused, State, Vip},
};

/// Where the agent keeps its socket, state and pins.
#[derive(Clone, Debug)]
pub struct Options {
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    /// Where to serve Prometheus metrics; none: not at all.
    pub metrics: Option<std::net::SocketAddr>,
}

/// Most clients served at once.
const MAX_CLIENTS: usize = 16;

type Shared = Arc<Mutex<Core>>;

/// Runs the agent until SIGTERM or SIGINT.
pub fn run(opts: Options) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(serve(opts))
}

/// Binds the socket: parent directory created, a stale socket file removed (only if it is a
/// socket), mode 0600.
fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if std::os::unix::net::UnixStream::connect(path).is_ok() {
                bail!("another agent is serving {}; stop it first", path.display());
            }
            std::fs::remove_file(path)?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket; remove it or choose another --socket",
            path.display()
        ),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e.into()),
    }
    let l = UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

async fn serve(opts: Options) -> anyhow::Result<()> {
    if let Some(at) = crate::bpffs::ensure(&opts.bpffs)? {
        info!(at = %at.display(), "mounted a BPF filesystem for the pins");
    }
    let core = Core::open(&opts.state_dir, &opts.bpffs)?;
    let core: Shared = Arc::new(Mutex::new(core));
    let nl = netlink::connect()?;
    refresh(&core, &nl).await;
    let listener = bind(&opts.socket)?;
    info!(socket = %opts.socket.display(), "serving the API");
    let refresher = {
        let (core, nl) = (core.clone(), nl.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                refresh(&core, &nl).await;
            }
        })
    };
    let health = tokio::spawn(supervise_probes(core.clone()));
    let (vrrp_tx, vrrp_rx) = tokio::sync::watch::channel(vrrp::Command::None);
    let speaker = tokio::spawn(vrrp::run(core.clone(), nl.clone(), vrrp_rx));
    let metrics = match opts.metrics {
        Some(at) => {
            let l = tokio::net::TcpListener::bind(at)
                .await
                .with_context(|| format!("binding the metrics listener {at}"))?;
            info!(%at, "serving metrics");
            Some(tokio::spawn(serve_metrics(l, core.clone())))
        }
        None => None,
    };
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            conn = listener.accept() => {
                let Ok((mut stream, _)) = conn else { continue };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    http::write_response(&mut stream, 503, &error_json("too many clients; retry")).await;
                    continue;
                };
                let (core, nl, vrrp_tx) = (core.clone(), nl.clone(), vrrp_tx.clone());
                tokio::spawn(async move {
                    handle(stream, core, nl, vrrp_tx).await;
                    drop(permit);
                });
            }
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    // A planned stop: a VRRP master hands over (priority 0) before the agent goes.
    let _ = vrrp_tx.send(vrrp::Command::Shutdown);
    let _ = tokio::time::timeout(Duration::from_secs(2), speaker).await;
    refresher.abort();
    health.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    let _ = std::fs::remove_file(&opts.socket);
    info!("agent stopped; the datapath keeps forwarding");
    Ok(())
}

fn error_json(msg: &str) -> String {
    serde_json::to_string(&api::ErrorBody {
        error: msg.to_owned(),
    })
    .expect("serializes")
}

async fn handle(
    mut stream: tokio::net::UnixStream,
    core: Shared,
    nl: Handle,
    vrrp_tx: tokio::sync::watch::Sender<vrrp::Command>,
) {
    let peer = stream.peer_cred().ok();
    if peer.map(|p| p.uid()) != Some(0) {
        http::write_response(
            &mut stream,
            403,
            &error_json("only root may use the maglb API"),
        )
        .await;
        return;
    }
    let req = match tokio::time::timeout(Duration::from_secs(10), http::read_request(&mut stream))
        .await
    {
        Ok(Ok(r)) => r,
        Ok(Err((status, msg))) => {
            http::write_response(&mut stream, status, &error_json(&msg)).await;
            return;
        }
        Err(_) => return,
    };
    let (status, body) = match dispatch(&req, &core, &nl, &vrrp_tx).await {
        Ok(body) => (200, body),
        Err(r) => (r.status, error_json(&r.message)),
    };
    if req.method != "GET" {
        // The audit trail: who changed what, and how it ended.
        info!(
            target: "audit",
            peer_pid = peer.and_then(|p| p.pid()),
            peer_uid = peer.map(|p| p.uid()),
            method = %req.method,
            path = %req.path,
            request = %String::from_utf8_lossy(&req.body),
            status,
            outcome = %body.chars().take(2000).collect::<String>(),
            "admin request"
        );
    }
    http::write_response(&mut stream, status, &body).await;
}

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Refused> {
    serde_json::from_slice(body).map_err(|e| Refused {
        status: 400,
        message: format!("request body: {e}"),
    })
}

fn json<T: Serialize>(v: &T) -> Result<String, Refused> {
    Ok(serde_json::to_string(v).expect("serializes"))
}

/// Runs one API request.
async fn dispatch(
    req: &http::Request,
    core: &Shared,
    nl: &Handle,
    vrrp_tx: &tokio::sync::watch::Sender<vrrp::Command>,
) -> Result<String, Refused> {
    let body = &req.body;
    let changed =
        |r: Result<Vec<String>, Refused>| r.and_then(|changes| json(&api::Changes { changes }));
    let result = match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/v1/status") => return json(&core.lock().unwrap().status()),
        ("GET", "/v1/vips") => return json(&core.lock().unwrap().vip_views()),
        ("GET", "/v1/stats") => return json(&core.lock().unwrap().stats()),
        ("GET", "/v1/health") => return json(&core.lock().unwrap().probe_views()),
        ("GET", "/v1/vrrp") => {
            return match core.lock().unwrap().vrrp.clone() {
                Some(v) => json(&v),
                None => Err(Refused::not_found(
                    "VRRP is not running: add a [vrrp] section with `maglb apply` (and attach)",
                )),
            };
        }
        ("POST", "/v1/vrrp/release" | "/v1/vrrp/claim") => {
            if core.lock().unwrap().vrrp.is_none() {
                return Err(Refused::not_found("VRRP is not running"));
            }
            let (cmd, what) = if req.path.ends_with("release") {
                (
                    vrrp::Command::Release,
                    "released: backup until `maglb vrrp claim`",
                )
            } else {
                (
                    vrrp::Command::Claim,
                    "claimed: back to the configured priority",
                )
            };
            let _ = vrrp_tx.send(cmd);
            return json(&api::Changes {
                changes: vec![what.to_owned()],
            });
        }
        ("GET", "/v1/config") => {
            let text = core.lock().unwrap().state.to_toml();
            return json(&api::ConfigText { config: text });
        }
        ("POST", "/v1/validate") => {
            let t: api::ConfigText = parse(body)?;
            let new = State::from_toml(&t.config)?;
            let changes = core.lock().unwrap().state.diff(&new);
            return json(&api::Changes { changes });
        }
        ("POST", "/v1/attach") => {
            let r: api::AttachRequest = parse(body)?;
            let mut c = core.lock().unwrap();
            let new = c.state.with_attach(&r.iface, r.mode)?;
            changed(c.change(new, "attach"))
        }
        ("POST", "/v1/detach") => {
            let mut c = core.lock().unwrap();
            let new = c.state.with_detach()?;
            changed(c.change(new, "detach"))
        }
        ("POST", "/v1/vips") => {
            let r: api::VipRequest = parse(body)?;
            let mut vip = Vip::new(r.address);
            vip.affinity = r.affinity;
            if let Some(size) = r.ring_size {
                vip.ring_size = size;
            }
            let mut c = core.lock().unwrap();
            let new = c.state.with_vip(vip)?;
            changed(c.change(new, "vip add"))
        }
        ("DELETE", "/v1/vips") => {
            let r: api::VipRef = parse(body)?;
            let mut c = core.lock().unwrap();
            let new = c.state.without_vip(&r.address)?;
            changed(c.change(new, "vip del"))
        }
        ("POST", "/v1/backends") => {
            let r: api::BackendRequest = parse(body)?;
            let mut b = BackendEntry::new(r.address, r.weight.unwrap_or(1));
            b.backup = r.backup.unwrap_or(false);
            b.pool = r.pool;
            let mut c = core.lock().unwrap();
            let new = c.state.with_backend(&r.vip, b)?;
            changed(c.change(new, "backend add"))
        }
        ("DELETE", "/v1/backends") => {
            let r: api::BackendRequest = parse(body)?;
            let mut c = core.lock().unwrap();
            let new = c.state.without_backend(&r.vip, r.address)?;
            changed(c.change(new, "backend del"))
        }
        ("POST", "/v1/backends/weight") => {
            let r: api::BackendRequest = parse(body)?;
            let weight = r
                .weight
                .ok_or_else(|| Refused::invalid("weight", "missing"))?;
            let mut c = core.lock().unwrap();
            let new = c.state.with_weight(&r.vip, r.address, weight)?;
            changed(c.change(new, "backend set-weight"))
        }
        ("POST", "/v1/backends/drain" | "/v1/backends/disable" | "/v1/backends/enable") => {
            let r: api::BackendRequest = parse(body)?;
            let (to, what) = match req.path.as_str() {
                "/v1/backends/drain" => (BackendState::Drain, "backend drain"),
                "/v1/backends/disable" => (BackendState::Disabled, "backend disable"),
                _ => (BackendState::Active, "backend enable"),
            };
            let mut c = core.lock().unwrap();
            let new = c.state.with_backend_state(&r.vip, r.address, to)?;
            changed(c.change(new, what))
        }
        ("POST", "/v1/health") => {
            let r: api::HealthRequest = parse(body)?;
            let mut c = core.lock().unwrap();
            let new = match r.backend {
                Some(b) => c.state.with_backend_health(&r.vip, b, r.health)?,
                None => c.state.with_vip_health(&r.vip, r.health)?,
            };
            let res = changed(c.change(new, "health"));
            c.prune_health();
            res
        }
        ("POST", "/v1/vips/switch") => {
            let r: api::SwitchRequest = parse(body)?;
            let mut c = core.lock().unwrap();
            let new = c.state.with_switch(&r.address, &r.to, r.percent)?;
            changed(c.change(new, "vip switch"))
        }
        ("POST", "/v1/apply") => {
            let t: api::ConfigText = parse(body)?;
            let mut new = State::from_toml(&t.config)?;
            let mut c = core.lock().unwrap();
            // A file without [balancer] interface keeps the current attachment.
            if new.balancer.interface.is_none() {
                new.balancer.interface = c.state.balancer.interface.clone();
                new.balancer.mode = c.state.balancer.mode;
            }
            changed(c.change(new, "apply"))
        }
        (_, p) if p.starts_with("/v1/") => {
            return Err(Refused {
                status: 404,
                message: format!("no such API call {} {p}; see docs/api.md", req.method),
            });
        }
        _ => {
            return Err(Refused::not_found(
                "the API lives under /v1/; see docs/api.md",
            ));
        }
    };
    // Settings or backends may have changed: bring the datapath configuration up to date
    // before answering.
    refresh(core, nl).await;
    result
}

/// Serves `GET /metrics` (Prometheus text format); one request per connection.
async fn serve_metrics(l: tokio::net::TcpListener, core: Shared) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let Ok((mut s, _)) = l.accept().await else {
            continue;
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let core = core.clone();
        tokio::spawn(async move {
            let req =
                tokio::time::timeout(Duration::from_secs(10), http::read_request(&mut s)).await;
            match req {
                Ok(Ok(r)) if r.method == "GET" && r.path == "/metrics" => {
                    let body = crate::metrics::render(&core.lock().unwrap().metrics());
                    http::write_typed(
                        &mut s,
                        200,
                        "text/plain; version=0.0.4; charset=utf-8",
                        &body,
                    )
                    .await;
                }
                Ok(Ok(_)) => http::write_typed(&mut s, 404, "text/plain", "try /metrics\n").await,
                _ => {}
            }
            drop(permit);
        });
    }
}

/// Most probes in flight at once, over all backends.
const MAX_PROBES_IN_FLIGHT: usize = 256;

/// Keeps one probe task per backend that has a health check: started, restarted when its
/// check changes, stopped when it goes. Results come back on a channel and change the
/// backends' health in the core.
async fn supervise_probes(core: Shared) {
    let (tx, mut rx) =
        tokio::sync::mpsc::channel::<(core::BackendKey, crate::health::ProbeResult, Duration)>(
            1024,
        );
    let permits = Arc::new(Semaphore::new(MAX_PROBES_IN_FLIGHT));
    let mut running: std::collections::BTreeMap<
        core::BackendKey,
        (Probe, tokio::task::JoinHandle<()>),
    > = Default::default();
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let want = core.lock().unwrap().probes();
                running.retain(|k, (p, task)| {
                    let keep = want.get(k) == Some(p);
                    if !keep {
                        task.abort();
                    }
                    keep
                });
                for (k, p) in want {
                    if running.contains_key(&k) {
                        continue;
                    }
                    let task = tokio::spawn(probe_loop(k, p.clone(), tx.clone(), permits.clone()));
                    running.insert(k, (p, task));
                }
            }
            Some((key, result, took)) = rx.recv() => {
                core.lock().unwrap().record_probe(key, &result, took);
            }
        }
    }
}

/// Probes one backend forever, every interval, starting at a random point of the first
/// interval so probes spread out.
async fn probe_loop(
    key: core::BackendKey,
    probe: Probe,
    tx: tokio::sync::mpsc::Sender<(core::BackendKey, crate::health::ProbeResult, Duration)>,
    permits: Arc<Semaphore>,
) {
    let interval = Duration::from_millis(probe.check.interval_ms as u64);
    let seed = format!("{} {}", key.0, key.1);
    let jitter = crate::maglev::stable_hash(seed.as_bytes(), std::process::id() as u64)
        % (probe.check.interval_ms as u64).max(1);
    tokio::time::sleep(Duration::from_millis(jitter)).await;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(_permit) = permits.acquire().await else {
            return;
        };
        let (r, took) = probe.run().await;
        if tx.send((key, r, took)).await.is_err() {
            return;
        }
    }
}

/// Recomputes the datapath configuration (interface MAC, MTU, outer sources, next-hop MAC)
/// and writes it if it changed. Runs every second, so a changed neighbour entry reaches the
/// datapath within one.
async fn refresh(core: &Shared, nl: &Handle) {
    let (state, attached) = {
        let c = core.lock().unwrap();
        (c.state.clone(), c.is_attached())
    };
    let Some(iface) = state.balancer.interface.clone().filter(|_| attached) else {
        return;
    };
    match desired_config(&state, &iface, nl).await {
        Ok((cfg, nexthop)) => {
            let mut c = core.lock().unwrap();
            c.nexthop = nexthop;
            match c.set_config(&cfg) {
                Ok(true) => info!(
                    nexthop_mac = %netdev::fmt_mac(&cfg.nh_mac),
                    mtu = cfg.mtu,
                    ready = cfg.ready,
                    "datapath configuration updated"
                ),
                Ok(false) => {}
                Err(e) => warn!(error = %e, "writing the datapath configuration"),
            }
        }
        Err(e) => warn!(error = %format!("{e:#}"), "datapath configuration not complete"),
    }
}

async fn desired_config(
    state: &State,
    iface: &str,
    nl: &Handle,
) -> anyhow::Result<(Config, Option<(std::net::IpAddr, [u8; 6])>)> {
    let b = &state.balancer;
    let ifindex = netdev::index(iface)?;
    let if_mac = netdev::mac(iface)?;
    let mtu = match b.mtu {
        Some(m) => m,
        None => netdev::mtu(iface)?.min(u16::MAX as u32) as u16,
    };
    let (a4, a6) = netlink::addresses(nl, ifindex).await?;
    let src_v4 = b.source_v4.map(Into::into).or(a4);
    let src_v6 = b.source_v6.map(Into::into).or(a6);
    let mut cfg = Config {
        src_v6: src_v6.map(|a| addr::to_words(a).0).unwrap_or_default(),
        src_v4: src_v4.map(|a| addr::to_words(a).0[0]).unwrap_or(0),
        mtu,
        ready: 0,
        if_mac,
        nh_mac: [0; 6],
    };
    let target = b.nexthop.or_else(|| {
        state
            .vips
            .iter()
            .flat_map(|v| v.backends.iter())
            .map(|b| b.address)
            .next()
    });
    let nexthop = match (&b.nexthop_mac, target) {
        (Some(mac), _) => {
            cfg.nh_mac = netdev::parse_mac(mac).expect("validated");
            None
        }
        (None, Some(t)) => {
            let (gw, mac) = netlink::nexthop_mac(nl, t).await?;
            cfg.nh_mac = mac;
            Some((gw, mac))
        }
        (None, None) => None,
    };
    // Forward only with a next hop to send to; until then everything goes to the kernel.
    cfg.ready = u16::from(cfg.nh_mac != [0; 6]);
    Ok((cfg, nexthop))
}
