//! The agent's VRRPv3 speaker (IPv4): advertisements on a raw socket (IP protocol 112, to
//! 224.0.0.18, TTL 255), the state machine of [`super`], the master's addresses added and
//! removed with rtnetlink, and gratuitous ARP when it takes them.
//!
//! It runs on a thread of its own with its own runtime and netlink connection: nothing the
//! control plane does (an apply, a scrape, a burst of probes) can delay an advertisement. It
//! reads its configuration and what it tracks from the writer's snapshots, which never block.
//!
//! Both balancers of a pair carry the same VIPs and backends, and so the same Maglev tables:
//! whichever one the router sends a flow to, it reaches the same backend. The datapath of the
//! backup keeps forwarding: packets still in flight to it during a failover reach the same
//! backend instead of being lost.

use std::{
    io::{self, Read as _},
    net::{IpAddr, Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::TryStreamExt as _;
use rtnetlink::Handle;
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Action, Advert, Invalid, OWNER, PROTO_VRRP, Router, Settings, State};
use crate::{api::VrrpStatus, netlink, state::VrrpConfig, writer::Snapshot};

const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);

/// Commands from the API to the speaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    None,
    Release,
    Claim,
    Shutdown,
}

/// The speaker's thread, and the ways to it.
pub struct Speaker {
    pub commands: watch::Sender<Command>,
    pub status: watch::Receiver<Option<VrrpStatus>>,
    thread: std::thread::JoinHandle<()>,
}

impl Speaker {
    /// Starts the speaker's thread; it follows `snap` until told to shut down.
    pub fn spawn(snap: watch::Receiver<Arc<Snapshot>>) -> io::Result<Self> {
        let (commands, cmd_rx) = watch::channel(Command::None);
        let (status_tx, status) = watch::channel(None);
        let thread = std::thread::Builder::new()
            .name("maglb-vrrp".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the VRRP speaker");
                rt.block_on(run(snap, cmd_rx, status_tx));
            })?;
        Ok(Self {
            commands,
            status,
            thread,
        })
    }

    /// A planned stop: a master hands over (priority 0) before the agent goes; waits at most
    /// `within`.
    pub fn shutdown(self, within: Duration) {
        let _ = self.commands.send(Command::Shutdown);
        let t = Instant::now();
        while !self.thread.is_finished() && t.elapsed() < within {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// The configuration to run with: the `[vrrp]` section and its interface.
fn wanted(snap: &Snapshot) -> Option<(VrrpConfig, String)> {
    let cfg = snap.state.vrrp.clone()?;
    let iface = cfg
        .interface
        .clone()
        .or(snap.state.balancer.interface.clone())?;
    Some((cfg, iface))
}

/// Runs the speaker while the state has a `[vrrp]` section; restarts it when the section
/// changes.
async fn run(
    mut snap: watch::Receiver<Arc<Snapshot>>,
    mut cmds: watch::Receiver<Command>,
    status: watch::Sender<Option<VrrpStatus>>,
) {
    let nl = match netlink::connect() {
        Ok(h) => h,
        Err(e) => {
            warn!(error = %crate::error_chain(&e), "no netlink connection for VRRP");
            return;
        }
    };
    loop {
        let want = wanted(&snap.borrow_and_update());
        let Some((cfg, iface)) = want else {
            status.send_replace(None);
            if *cmds.borrow() == Command::Shutdown {
                return;
            }
            tokio::select! {
                r = snap.changed() => if r.is_err() { return },
                _ = cmds.changed() => {}
            }
            continue;
        };
        let mut s = Speak {
            snap: &snap,
            nl: &nl,
            cfg: &cfg,
            iface: &iface,
            status: &status,
        };
        match s.speak(&mut cmds).await {
            Ok(true) => {
                status.send_replace(None);
                return;
            }
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, %iface, "VRRP speaker failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// The advertisement socket, bound to `iface` and joined to 224.0.0.18 there.
fn open_socket(iface: &str, ifindex: u32, local: Ipv4Addr) -> io::Result<Socket> {
    let s = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(PROTO_VRRP as i32)),
    )?;
    s.set_nonblocking(true)?;
    s.bind_device(Some(iface.as_bytes()))?;
    s.set_multicast_ttl_v4(255)?;
    s.set_multicast_loop_v4(false)?;
    s.join_multicast_v4_n(&GROUP, &socket2::InterfaceIndexOrAddress::Index(ifindex))?;
    s.set_multicast_if_v4(&local)?;
    Ok(s)
}

/// Sends an advertisement with priority `priority` to 224.0.0.18.
fn advertise(sock: &Socket, cfg: &VrrpConfig, local: Ipv4Addr, priority: u8) -> io::Result<()> {
    let adv = Advert {
        vrid: cfg.vrid,
        priority,
        interval_cs: cfg.advert_interval_cs,
        addrs: cfg.addresses.iter().map(|a| IpAddr::V4(*a)).collect(),
    };
    let dst = SockAddr::from(SocketAddrV4::new(GROUP, 0));
    sock.send_to(&adv.encode(IpAddr::V4(local), IpAddr::V4(GROUP)), &dst)
        .map(drop)
}

/// Gratuitous ARP for each address (request form, which every stack takes).
fn garp(ifindex: u32, mac: [u8; 6], addrs: &[Ipv4Addr]) -> io::Result<()> {
    const ETH_P_ARP: u16 = 0x0806;
    let sock = Socket::new(
        Domain::PACKET,
        Type::RAW,
        Some(Protocol::from(ETH_P_ARP.to_be() as i32)),
    )?;
    for a in addrs {
        let mut f = Vec::with_capacity(42);
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&ETH_P_ARP.to_be_bytes());
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&a.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&a.octets());
        crate::sys::send_frame(&sock, ifindex, &f)?;
    }
    Ok(())
}

async fn add_addresses(h: &Handle, ifindex: u32, addrs: &[Ipv4Addr]) {
    for a in addrs {
        if let Err(e) = h.address().add(ifindex, IpAddr::V4(*a), 32).execute().await
            && !e.to_string().contains("File exists")
        {
            warn!(address = %a, error = %e, "adding a VRRP address");
        }
    }
}

async fn del_addresses(h: &Handle, ifindex: u32, addrs: &[Ipv4Addr]) {
    for a in addrs {
        let mut found = h
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .set_address_filter(IpAddr::V4(*a))
            .execute();
        while let Ok(Some(m)) = found.try_next().await {
            if let Err(e) = h.address().del(m).execute().await {
                warn!(address = %a, error = %e, "removing a VRRP address");
            }
        }
    }
}

/// The priority to advertise: the configured one, less what tracking takes.
fn effective_priority(c: &VrrpConfig, snap: &Snapshot, running: bool, released: bool) -> u8 {
    if released {
        return 1;
    }
    if c.priority == OWNER {
        return c.priority;
    }
    let mut p = c.priority as i32;
    if !running {
        p -= c.track_interface_penalty as i32;
    }
    for v in &c.track_vips {
        if !snap.vip_has_live_backend(v) {
            p -= c.track_vip_penalty as i32;
        }
    }
    p.clamp(1, 254) as u8
}

/// One run of the speaker with one configuration.
struct Speak<'a> {
    snap: &'a watch::Receiver<Arc<Snapshot>>,
    nl: &'a Handle,
    cfg: &'a VrrpConfig,
    iface: &'a str,
    status: &'a watch::Sender<Option<VrrpStatus>>,
}

/// The interface facts a speaker needs.
struct Link {
    index: u32,
    mac: [u8; 6],
    local: Ipv4Addr,
}

impl Speak<'_> {
    async fn link(&self) -> io::Result<Link> {
        let l = netlink::link(self.nl, self.iface)
            .await
            .map_err(io::Error::other)?;
        let (local, _) = netlink::addresses(self.nl, l.index)
            .await
            .map_err(io::Error::other)?;
        let Some(IpAddr::V4(local)) = local else {
            return Err(io::Error::other(format!(
                "{} has no IPv4 address to advertise from",
                self.iface
            )));
        };
        Ok(Link {
            index: l.index,
            mac: l.mac,
            local,
        })
    }

    /// Ok(true): shut down; Ok(false): reconfigured, start again.
    async fn speak(&mut self, cmds: &mut watch::Receiver<Command>) -> io::Result<bool> {
        let cfg = self.cfg;
        let link = self.link().await?;
        let sock = crate::sys::async_socket(open_socket(self.iface, link.index, link.local)?)?;
        let interval = Duration::from_millis(cfg.advert_interval_cs as u64 * 10);
        let mut router = Router::new(
            Settings {
                priority: cfg.priority,
                interval,
                preempt: cfg.preempt,
                preempt_delay: Duration::from_millis(cfg.preempt_delay_ms as u64),
            },
            Instant::now(),
        );
        let mut released = false;
        let mut status = VrrpStatus {
            vrid: cfg.vrid,
            interface: self.iface.to_owned(),
            priority: cfg.priority,
            ..VrrpStatus::default()
        };
        let mut garp_again: Option<Instant> = None;
        info!(
            iface = self.iface,
            vrid = cfg.vrid,
            priority = cfg.priority,
            "VRRP started"
        );
        let mut actions = router.start(Instant::now());
        let mut buf = vec![0u8; 2048];
        let mut track = tokio::time::interval(Duration::from_millis(100));
        loop {
            for a in actions.drain(..) {
                match a {
                    Action::Advertise(p) => match advertise(sock.get_ref(), cfg, link.local, p) {
                        Ok(()) => status.adverts_sent += 1,
                        Err(e) => warn!(error = %e, "sending a VRRP advertisement"),
                    },
                    Action::BecomeMaster => {
                        add_addresses(self.nl, link.index, &cfg.addresses).await;
                        if let Err(e) = garp(link.index, link.mac, &cfg.addresses) {
                            warn!(error = %e, "gratuitous ARP");
                        }
                        garp_again = Some(Instant::now() + Duration::from_secs(1));
                        status.transitions += 1;
                        info!(vrid = cfg.vrid, reason = %router.reason, "VRRP master");
                    }
                    Action::BecomeBackup => {
                        del_addresses(self.nl, link.index, &cfg.addresses).await;
                        garp_again = None;
                        if router.state != State::Initialize || status.transitions > 0 {
                            status.transitions += 1;
                        }
                        info!(vrid = cfg.vrid, reason = %router.reason, "VRRP backup");
                    }
                }
            }
            status.state = router.state;
            status.effective_priority = router.s.priority;
            status.master = match router.state {
                State::Master => Some(link.local.to_string()),
                _ => router.master.map(|m| m.to_string()),
            };
            status.reason = router.reason.clone();
            status.since_s = router.since.elapsed().as_secs_f64();
            status.released = released;
            self.status.send_replace(Some(status.clone()));

            let deadline = router
                .next_deadline()
                .unwrap_or(Instant::now() + Duration::from_secs(1));
            tokio::select! {
                r = sock.readable() => {
                    let mut guard = r?;
                    let n = match guard.try_io(|s| (&mut s.get_ref()).read(&mut buf)) {
                        Ok(r) => r?,
                        Err(_) => continue,
                    };
                    if let Some(new) = self.received(&mut router, &mut status, &buf[..n], link.local) {
                        actions = new;
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    actions = router.tick(Instant::now());
                }
                _ = track.tick() => {
                    let snap = self.snap.borrow().clone();
                    if snap.state.vrrp.as_ref() != Some(cfg) {
                        // Reconfigured: hand over cleanly and start again.
                        actions = router.shutdown(Instant::now());
                        self.finish(&mut actions, &router, sock.get_ref(), &link).await;
                        return Ok(false);
                    }
                    let running = netlink::link(self.nl, self.iface).await.is_ok_and(|l| l.running);
                    let p = effective_priority(cfg, &snap, running, released);
                    actions = router.set_priority(p, Instant::now());
                    if garp_again.is_some_and(|t| Instant::now() >= t) && router.state == State::Master {
                        let _ = garp(link.index, link.mac, &cfg.addresses);
                        garp_again = None;
                    }
                }
                _ = cmds.changed() => {
                    let cmd = *cmds.borrow_and_update();
                    match cmd {
                        Command::Shutdown => {
                            actions = router.shutdown(Instant::now());
                            self.finish(&mut actions, &router, sock.get_ref(), &link).await;
                            return Ok(true);
                        }
                        Command::Release => {
                            released = true;
                            let now = Instant::now();
                            actions = router.shutdown(now);
                            router.s.priority = 1;
                            actions.extend(router.start(now));
                            router.reason = "released by the operator".into();
                        }
                        Command::Claim => released = false,
                        Command::None => {}
                    }
                }
            }
        }
    }

    /// An advertisement received: checked, counted, and handed to the state machine.
    fn received(
        &self,
        router: &mut Router,
        status: &mut VrrpStatus,
        pkt: &[u8],
        local: Ipv4Addr,
    ) -> Option<Vec<Action>> {
        let n = pkt.len();
        if n < 20 || pkt[0] >> 4 != 4 {
            return None;
        }
        let ihl = (pkt[0] & 0x0f) as usize * 4;
        let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
        let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
        if src == local || n < ihl {
            return None;
        }
        let ttl = pkt[8];
        match Advert::decode(
            &pkt[ihl..],
            IpAddr::V4(src),
            IpAddr::V4(dst),
            ttl,
            self.cfg.vrid,
        ) {
            Ok(adv) => {
                status.adverts_received += 1;
                Some(router.advert(&adv, IpAddr::V4(src), IpAddr::V4(local), Instant::now()))
            }
            Err(why) => {
                *status.invalid.entry(why.name().to_owned()).or_default() += 1;
                if why != Invalid::Vrid {
                    warn!(from = %src, reason = why.name(), "invalid VRRP advertisement ignored");
                }
                None
            }
        }
    }

    /// Sends what `shutdown` asked for (priority 0) and gives the addresses up.
    async fn finish(&self, actions: &mut Vec<Action>, router: &Router, sock: &Socket, link: &Link) {
        for a in actions.drain(..) {
            match a {
                Action::Advertise(p) => {
                    let _ = advertise(sock, self.cfg, link.local, p);
                }
                Action::BecomeBackup => {
                    del_addresses(self.nl, link.index, &self.cfg.addresses).await
                }
                Action::BecomeMaster => {}
            }
        }
        info!(vrid = self.cfg.vrid, reason = %router.reason, "VRRP stopped");
    }
}
