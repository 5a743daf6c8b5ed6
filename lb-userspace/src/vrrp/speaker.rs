//! The agent's VRRPv3 speaker, IPv4 or IPv6: advertisements on a raw socket (IP protocol
//! 112, to 224.0.0.18 with TTL 255, or from the link-local address to ff02::12 with hop limit
//! 255), the state machine of [`super`], the master's addresses added and removed with
//! rtnetlink, and gratuitous ARP (IPv4) or unsolicited neighbour advertisements (IPv6) when
//! it takes them or must announce them again.
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
    collections::{BTreeSet, VecDeque},
    io::{self, Read as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6},
    sync::Arc,
    time::{Duration, Instant},
};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle,
    packet_route::address::{AddressAttribute, AddressFlags},
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::sync::watch;
use tracing::{info, warn};

use super::{Action, Advert, Invalid, OWNER, PROTO_VRRP, Router, Settings, State};
use crate::{api::VrrpStatus, netlink, state::VrrpConfig, writer::Snapshot};

const GROUP4: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);
const GROUP6: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x12);
const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
/// When the announcements of one takeover go out, after the first: a router that missed
/// one (or took it before its entry existed) gets the next.
const ANNOUNCE_AGAIN: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(300),
    Duration::from_millis(1000),
];

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

/// The advertisement socket, bound to the interface and joined to the VRRP group there.
fn open_socket(iface: &str, link: &Link) -> io::Result<Socket> {
    let proto = Some(Protocol::from(PROTO_VRRP as i32));
    let s = match link.local {
        IpAddr::V4(local) => {
            let s = Socket::new(Domain::IPV4, Type::RAW, proto)?;
            s.bind_device(Some(iface.as_bytes()))?;
            s.set_multicast_ttl_v4(255)?;
            s.set_multicast_loop_v4(false)?;
            s.join_multicast_v4_n(
                &GROUP4,
                &socket2::InterfaceIndexOrAddress::Index(link.index),
            )?;
            s.set_multicast_if_v4(&local)?;
            s
        }
        IpAddr::V6(local) => {
            let s = Socket::new(Domain::IPV6, Type::RAW, proto)?;
            s.bind_device(Some(iface.as_bytes()))?;
            s.set_multicast_hops_v6(255)?;
            s.set_unicast_hops_v6(255)?;
            s.set_multicast_loop_v6(false)?;
            s.join_multicast_v6(&GROUP6, link.index)?;
            s.set_multicast_if_v6(link.index)?;
            s.set_recv_hoplimit_v6(true)?;
            // The source of every advertisement is the link-local address (RFC 5798 5.1.2.1),
            // and the checksum covers it.
            s.bind(&SockAddr::from(SocketAddrV6::new(local, 0, 0, link.index)))?;
            s
        }
    };
    s.set_nonblocking(true)?;
    Ok(s)
}

/// Sends an advertisement with priority `priority` to the VRRP group.
fn advertise(sock: &Socket, cfg: &VrrpConfig, link: &Link, priority: u8) -> io::Result<()> {
    let adv = Advert {
        vrid: cfg.vrid,
        priority,
        interval_cs: cfg.advert_interval_cs,
        addrs: cfg.addresses.clone(),
    };
    let (group, dst) = match link.local {
        IpAddr::V4(_) => (
            IpAddr::V4(GROUP4),
            SockAddr::from(SocketAddrV4::new(GROUP4, 0)),
        ),
        IpAddr::V6(_) => (
            IpAddr::V6(GROUP6),
            SockAddr::from(SocketAddrV6::new(GROUP6, 0, 0, link.index)),
        ),
    };
    sock.send_to(&adv.encode(link.local, group), &dst).map(drop)
}

/// Gratuitous ARP for each IPv4 address (request form, which every stack takes).
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

/// An unsolicited neighbour advertisement (RFC 4861 7.2.6): ICMPv6 type 136 with the
/// override flag and our MAC as target link-layer address, to all nodes, hop limit 255.
pub fn neighbour_advert(target: Ipv6Addr, mac: [u8; 6]) -> Vec<u8> {
    let mut m = vec![136, 0, 0, 0, 0x20, 0, 0, 0];
    m.extend_from_slice(&target.octets());
    m.extend_from_slice(&[2, 1]);
    m.extend_from_slice(&mac);
    m
}

/// Unsolicited neighbour advertisements for each IPv6 address, from the link-local address.
/// (The kernel fills in the ICMPv6 checksum of a raw ICMPv6 socket.)
fn unsolicited_na(link: &Link, iface: &str, addrs: &[Ipv6Addr]) -> io::Result<()> {
    let IpAddr::V6(local) = link.local else {
        return Ok(());
    };
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    s.bind_device(Some(iface.as_bytes()))?;
    s.set_multicast_hops_v6(255)?;
    s.set_multicast_if_v6(link.index)?;
    s.bind(&SockAddr::from(SocketAddrV6::new(local, 0, 0, link.index)))?;
    let dst = SockAddr::from(SocketAddrV6::new(ALL_NODES, 0, 0, link.index));
    for a in addrs {
        s.send_to(&neighbour_advert(*a, link.mac), &dst)?;
    }
    Ok(())
}

/// Tells the link who holds the addresses now.
fn announce(link: &Link, iface: &str, addrs: &[IpAddr]) -> io::Result<()> {
    let v4: Vec<Ipv4Addr> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V4(a) => Some(*a),
            IpAddr::V6(_) => None,
        })
        .collect();
    let v6: Vec<Ipv6Addr> = addrs
        .iter()
        .filter_map(|a| match a {
            IpAddr::V6(a) => Some(*a),
            IpAddr::V4(_) => None,
        })
        .collect();
    if !v4.is_empty() {
        garp(link.index, link.mac, &v4)?;
    }
    if !v6.is_empty() {
        unsolicited_na(link, iface, &v6)?;
    }
    Ok(())
}

async fn add_addresses(h: &Handle, ifindex: u32, addrs: &[IpAddr]) {
    for a in addrs {
        let len = if a.is_ipv4() { 32 } else { 128 };
        let mut req = h.address().add(ifindex, *a, len);
        if a.is_ipv6() {
            // Usable at once: no duplicate address detection (the peer holds it no more).
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        if let Err(e) = req.execute().await
            && !e.to_string().contains("File exists")
        {
            warn!(address = %a, error = %e, "adding a VRRP address");
        }
    }
}

async fn del_addresses(h: &Handle, ifindex: u32, addrs: &[IpAddr]) {
    for a in addrs {
        let mut found = h
            .address()
            .get()
            .set_link_index_filter(ifindex)
            .set_address_filter(*a)
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

/// The warning for a peer whose priority ties with one this configuration can reach.
fn tie_warning(cfg: &VrrpConfig, from: IpAddr, theirs: u8) -> Option<String> {
    if theirs == super::RELEASE || theirs == OWNER {
        return None;
    }
    let pens = vec![cfg.track_vip_penalty; cfg.track_vips.len()];
    let mine = super::reachable_priorities(cfg.priority, cfg.track_interface_penalty, &pens);
    if !mine.contains(&theirs) {
        return None;
    }
    Some(if theirs == cfg.priority {
        format!(
            "peer {from} advertises priority {theirs}, the same as ours: every election is decided \
             by the higher address; give the balancers different priorities"
        )
    } else {
        format!(
            "peer {from} advertises priority {theirs}, which our priority {} reaches after tracking \
             penalties (track_interface_penalty {}, track_vip_penalty {}): that tie is decided by \
             the higher address, so failover and failback race; choose penalties that take us \
             strictly below {theirs}",
            cfg.priority, cfg.track_interface_penalty, cfg.track_vip_penalty
        )
    })
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
    /// Where advertisements come from: the interface's IPv4 address, or its IPv6
    /// link-local address.
    local: IpAddr,
}

/// Announcements due (one takeover's burst).
#[derive(Default)]
struct Burst(VecDeque<Instant>);

impl Burst {
    fn start(&mut self, now: Instant) {
        self.0 = ANNOUNCE_AGAIN.iter().map(|d| now + *d).collect();
    }
    /// Whether one is due now (and drops it).
    fn due(&mut self, now: Instant) -> bool {
        let mut any = false;
        while self.0.front().is_some_and(|t| *t <= now) {
            self.0.pop_front();
            any = true;
        }
        any
    }
}

impl Speak<'_> {
    async fn link(&self) -> io::Result<Link> {
        let l = netlink::link(self.nl, self.iface)
            .await
            .map_err(io::Error::other)?;
        let v6 = self.cfg.addresses.first().is_some_and(IpAddr::is_ipv6);
        let local = if v6 {
            netlink::link_local_v6(self.nl, l.index)
                .await
                .map_err(io::Error::other)?
                .map(IpAddr::V6)
        } else {
            let (a4, _) = netlink::addresses(self.nl, l.index)
                .await
                .map_err(io::Error::other)?;
            a4
        };
        let Some(local) = local else {
            return Err(io::Error::other(format!(
                "{} has no {} address to advertise from",
                self.iface,
                if v6 { "IPv6 link-local" } else { "IPv4" }
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
        let link = self.link().await?;
        let sock = crate::sys::async_socket(open_socket(self.iface, &link)?)?;
        let mut st = self.session(link).await;
        let mut actions = st.router.start(Instant::now());
        let mut buf = vec![0u8; 2048];
        let mut track = tokio::time::interval(Duration::from_millis(100));
        loop {
            self.act(&mut st, &mut actions, sock.get_ref()).await;
            self.publish(&st);
            let deadline = st
                .router
                .next_deadline()
                .unwrap_or(Instant::now() + Duration::from_secs(1));
            tokio::select! {
                r = sock.readable() => {
                    let mut guard = r?;
                    let got = match guard.try_io(|s| receive(s.get_ref(), &mut buf, st.link.local)) {
                        Ok(r) => r?,
                        Err(_) => continue,
                    };
                    let Some((n, src, dst, ttl, ihl)) = got else { continue };
                    if let Some(new) = self.received(&mut st, &buf[ihl..n], (src, dst, ttl)) {
                        actions = new;
                    }
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    actions = st.router.tick(Instant::now());
                }
                _ = track.tick() => {
                    if self.reconfigured() {
                        // Reconfigured: hand over cleanly and start again.
                        self.finish(&mut st, sock.get_ref()).await;
                        return Ok(false);
                    }
                    actions = self.track(&mut st).await;
                }
                _ = cmds.changed() => {
                    let cmd = *cmds.borrow_and_update();
                    if cmd == Command::Shutdown {
                        self.finish(&mut st, sock.get_ref()).await;
                        return Ok(true);
                    }
                    actions = st.command(cmd);
                }
            }
        }
    }

    /// A new run's state, a backup's until the state machine starts.
    async fn session(&self, link: Link) -> Session {
        let cfg = self.cfg;
        let router = Router::new(
            Settings {
                priority: cfg.priority,
                interval: Duration::from_millis(cfg.advert_interval_cs as u64 * 10),
                preempt: cfg.preempt,
                preempt_delay: Duration::from_millis(cfg.preempt_delay_ms as u64),
            },
            Instant::now(),
        );
        let running = netlink::link(self.nl, self.iface)
            .await
            .is_ok_and(|l| l.running);
        info!(
            iface = self.iface,
            vrid = cfg.vrid,
            priority = cfg.priority,
            from = %link.local,
            "VRRP started"
        );
        Session {
            link,
            router,
            released: false,
            status: VrrpStatus {
                vrid: cfg.vrid,
                interface: self.iface.to_owned(),
                priority: cfg.priority,
                ..VrrpStatus::default()
            },
            burst: Burst::default(),
            running,
            warned: BTreeSet::new(),
        }
    }

    /// Carries out what the state machine asked for: adverts sent, addresses taken (and
    /// announced) or given up.
    async fn act(&self, st: &mut Session, actions: &mut Vec<Action>, sock: &Socket) {
        let cfg = self.cfg;
        for a in actions.drain(..) {
            match a {
                Action::Advertise(p) => match advertise(sock, cfg, &st.link, p) {
                    Ok(()) => st.status.adverts_sent += 1,
                    Err(e) => warn!(error = %e, "sending a VRRP advertisement"),
                },
                Action::BecomeMaster | Action::Announce => {
                    add_addresses(self.nl, st.link.index, &cfg.addresses).await;
                    if let Err(e) = announce(&st.link, self.iface, &cfg.addresses) {
                        warn!(error = %e, "announcing the VRRP addresses");
                    }
                    st.burst.start(Instant::now());
                    let reason = &st.router.reason;
                    if a == Action::BecomeMaster {
                        st.status.transitions += 1;
                        info!(vrid = cfg.vrid, %reason, "VRRP master");
                    } else {
                        st.status.announcements += 1;
                        info!(vrid = cfg.vrid, %reason, "VRRP master announces its addresses again");
                    }
                }
                Action::BecomeBackup => {
                    del_addresses(self.nl, st.link.index, &cfg.addresses).await;
                    st.burst = Burst::default();
                    if st.router.state != State::Initialize || st.status.transitions > 0 {
                        st.status.transitions += 1;
                    }
                    info!(vrid = cfg.vrid, reason = %st.router.reason, "VRRP backup");
                }
            }
        }
    }

    /// Publishes the run's status.
    fn publish(&self, st: &Session) {
        let mut status = st.status.clone();
        let router = &st.router;
        status.state = router.state;
        status.effective_priority = router.s.priority;
        status.master = match router.state {
            State::Master => Some(st.link.local.to_string()),
            _ => router.master.map(|m| m.to_string()),
        };
        status.reason = router.reason.clone();
        status.since_s = router.since.elapsed().as_secs_f64();
        status.released = st.released;
        self.status.send_replace(Some(status));
    }

    /// Whether the `[vrrp]` section changed since this run began.
    fn reconfigured(&self) -> bool {
        self.snap.borrow().state.vrrp.as_ref() != Some(self.cfg)
    }

    /// Every 100 ms: the priority follows what is tracked (the interface, the VIPs), an
    /// interface up again makes a master announce, and the burst's announcements go out.
    async fn track(&self, st: &mut Session) -> Vec<Action> {
        let snap = self.snap.borrow().clone();
        let now_running = netlink::link(self.nl, self.iface)
            .await
            .is_ok_and(|l| l.running);
        let p = effective_priority(self.cfg, &snap, now_running, st.released);
        let now = Instant::now();
        let mut actions = st.router.set_priority(p, now);
        if now_running && !st.running {
            info!(iface = self.iface, "VRRP interface up again");
            if st.router.state == State::Master {
                st.router.reason = "interface up again; announcing".into();
            }
            if !actions.contains(&Action::Announce) {
                actions.extend(st.router.link_up(now));
            }
        }
        st.running = now_running;
        if st.burst.due(now) && st.router.state == State::Master {
            let _ = announce(&st.link, self.iface, &self.cfg.addresses);
        }
        actions
    }

    /// An advertisement received: checked, counted, and handed to the state machine.
    fn received(
        &self,
        st: &mut Session,
        msg: &[u8],
        (src, dst, ttl): (IpAddr, IpAddr, u8),
    ) -> Option<Vec<Action>> {
        match Advert::decode(msg, src, dst, ttl, self.cfg.vrid) {
            Ok(adv) => {
                st.status.adverts_received += 1;
                if st.warned.insert((src, adv.priority))
                    && let Some(w) = tie_warning(self.cfg, src, adv.priority)
                {
                    warn!(vrid = self.cfg.vrid, "{w}");
                    st.status.warnings.push(w);
                }
                Some(st.router.advert(&adv, src, st.link.local, Instant::now()))
            }
            Err(why) => {
                *st.status.invalid.entry(why.name().to_owned()).or_default() += 1;
                if why != Invalid::Vrid {
                    warn!(from = %src, reason = why.name(), "invalid VRRP advertisement ignored");
                }
                None
            }
        }
    }

    /// Ends the run: the state machine shuts down, and what it asks for is done (a master
    /// advertises priority 0 and gives the addresses up).
    async fn finish(&self, st: &mut Session, sock: &Socket) {
        for a in st.router.shutdown(Instant::now()) {
            match a {
                Action::Advertise(p) => {
                    let _ = advertise(sock, self.cfg, &st.link, p);
                }
                Action::BecomeBackup => {
                    del_addresses(self.nl, st.link.index, &self.cfg.addresses).await
                }
                Action::BecomeMaster | Action::Announce => {}
            }
        }
        info!(vrid = self.cfg.vrid, reason = %st.router.reason, "VRRP stopped");
    }
}

/// The state of one run of the speaker; `Speak::speak` owns it.
struct Session {
    link: Link,
    router: Router,
    /// `maglb vrrp release` holds the priority at 1 (until `maglb vrrp claim`).
    released: bool,
    /// Counters and warnings; the rest is filled from the router when published.
    status: VrrpStatus,
    burst: Burst,
    /// Whether the interface was running at the last look.
    running: bool,
    /// (peer, priority) pairs already checked for a tie.
    warned: BTreeSet<(IpAddr, u8)>,
}

impl Session {
    /// The operator's release (hand over: priority 0, then a backup of priority 1) or claim
    /// (the configured priority back, at the next tracking round). Shutdown is the caller's.
    fn command(&mut self, cmd: Command) -> Vec<Action> {
        match cmd {
            Command::Release => {
                self.released = true;
                let now = Instant::now();
                let mut actions = self.router.shutdown(now);
                self.router.s.priority = 1;
                actions.extend(self.router.start(now));
                self.router.reason = "released by the operator".into();
                actions
            }
            Command::Claim => {
                self.released = false;
                vec![]
            }
            Command::None | Command::Shutdown => vec![],
        }
    }
}

/// One packet from the advertisement socket: (length, source, destination, TTL or hop
/// limit, where the VRRP message starts), or none for our own or a runt.
type Received = Option<(usize, IpAddr, IpAddr, u8, usize)>;

fn receive(sock: &Socket, buf: &mut [u8], local: IpAddr) -> io::Result<Received> {
    match local {
        IpAddr::V4(local) => {
            let n = (&mut &*sock).read(buf)?;
            let pkt = &buf[..n];
            if n < 20 || pkt[0] >> 4 != 4 {
                return Ok(None);
            }
            let ihl = (pkt[0] & 0x0f) as usize * 4;
            let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
            let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
            if src == local || n < ihl {
                return Ok(None);
            }
            Ok(Some((n, IpAddr::V4(src), IpAddr::V4(dst), pkt[8], ihl)))
        }
        IpAddr::V6(local) => {
            // An IPv6 raw socket gives the payload only: the source comes with the datagram,
            // the hop limit as ancillary data. Advertisements go to ff02::12.
            let (n, src, hops) = crate::sys::recv_with_hop_limit(sock, buf)?;
            if src == local {
                return Ok(None);
            }
            Ok(Some((
                n,
                IpAddr::V6(src),
                IpAddr::V6(GROUP6),
                hops.unwrap_or(0),
                0,
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsolicited_neighbour_advertisement_layout() {
        let target: Ipv6Addr = "fd10:2::100".parse().unwrap();
        let mac = [2, 0, 0, 0, 0, 1];
        let m = neighbour_advert(target, mac);
        assert_eq!(m.len(), 32);
        assert_eq!(m[0], 136, "ICMPv6 neighbour advertisement");
        assert_eq!(m[4], 0x20, "override, not solicited, not router");
        assert_eq!(&m[8..24], &target.octets());
        assert_eq!(&m[24..26], &[2, 1], "target link-layer address option");
        assert_eq!(&m[26..], &mac);
    }

    #[test]
    fn ties_with_a_peer_are_named() {
        let cfg = VrrpConfig {
            vrid: 51,
            priority: 150,
            advert_interval_cs: 10,
            preempt: true,
            preempt_delay_ms: 0,
            interface: None,
            addresses: vec!["10.10.2.100".parse().unwrap()],
            track_interface_penalty: 50,
            track_vips: vec![],
            track_vip_penalty: 50,
        };
        let peer: IpAddr = "10.10.2.3".parse().unwrap();
        let w = tie_warning(&cfg, peer, 100).expect("150 - 50 ties with 100");
        assert!(w.contains("track_interface_penalty 50"), "{w}");
        assert!(
            tie_warning(&cfg, peer, 150)
                .unwrap()
                .contains("same as ours")
        );
        assert_eq!(tie_warning(&cfg, peer, 99), None);
        assert_eq!(tie_warning(&cfg, peer, 0), None);
    }
}
