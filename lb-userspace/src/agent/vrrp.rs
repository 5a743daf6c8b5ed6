//! The agent's VRRPv3 speaker (IPv4): advertisements on a raw socket (IP protocol 112, to
//! 224.0.0.18, TTL 255), the state machine of `crate::vrrp`, the master's addresses added and
//! removed with rtnetlink, and gratuitous ARP when it takes them.
//!
//! Both balancers of a pair carry the same VIPs and backends, and so the same Maglev tables:
//! whichever one the router sends a flow to, it reaches the same backend. The datapath of the
//! backup keeps forwarding: packets still in flight to it during a failover reach the same
//! backend instead of being lost.

use std::{
    collections::BTreeMap,
    ffi::CString,
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures_util::TryStreamExt as _;
use rtnetlink::Handle;
use tokio::{io::unix::AsyncFd, sync::watch};
use tracing::{info, warn};

use super::core::Core;
use crate::{
    netdev, netlink,
    state::VrrpConfig,
    vrrp::{Action, Advert, Invalid, PROTO_VRRP, Router, Settings, State},
};

const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 18);

/// What `maglb vrrp status` shows.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct VrrpStatus {
    pub state: String,
    pub vrid: u8,
    pub interface: String,
    /// Configured priority, and the one advertised now (after tracking and release).
    pub priority: u8,
    pub effective_priority: u8,
    pub master: Option<String>,
    pub reason: String,
    pub since_s: f64,
    pub transitions: u64,
    pub adverts_sent: u64,
    pub adverts_received: u64,
    /// Advertisements refused, by reason (ttl, version, checksum, vrid, ...).
    pub invalid: BTreeMap<String, u64>,
    /// Released with `maglb vrrp release`: stays backup until `maglb vrrp claim`.
    pub released: bool,
}

/// Commands from the API to the speaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    None,
    Release,
    Claim,
    Shutdown,
}

fn sockopt<T>(fd: i32, level: i32, name: i32, v: &T) -> io::Result<()> {
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            v as *const T as *const libc::c_void,
            size_of::<T>() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The advertisement socket, bound to `iface` and joined to 224.0.0.18 there.
fn open_socket(iface: &str, ifindex: u32) -> io::Result<OwnedFd> {
    let fd = unsafe {
        libc::socket(
            libc::AF_INET,
            libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            PROTO_VRRP as i32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = CString::new(iface)?;
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr() as *const libc::c_void,
            name.as_bytes().len() as u32,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    sockopt(fd, libc::IPPROTO_IP, libc::IP_MULTICAST_TTL, &255i32)?;
    sockopt(fd, libc::IPPROTO_IP, libc::IP_MULTICAST_LOOP, &0i32)?;
    let mreq = libc::ip_mreqn {
        imr_multiaddr: libc::in_addr {
            s_addr: u32::from_ne_bytes(GROUP.octets()),
        },
        imr_address: libc::in_addr { s_addr: 0 },
        imr_ifindex: ifindex as i32,
    };
    sockopt(fd, libc::IPPROTO_IP, libc::IP_ADD_MEMBERSHIP, &mreq)?;
    sockopt(fd, libc::IPPROTO_IP, libc::IP_MULTICAST_IF, &mreq)?;
    Ok(owned)
}

/// `sendto` with a socket address of any family.
fn send_to<A>(fd: i32, buf: &[u8], addr: &A) -> io::Result<()> {
    let rc = unsafe {
        libc::sendto(
            fd,
            buf.as_ptr() as *const libc::c_void,
            buf.len(),
            0,
            addr as *const A as *const libc::sockaddr,
            size_of::<A>() as u32,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends an advertisement with priority `priority` to 224.0.0.18.
fn advertise(fd: i32, cfg: &VrrpConfig, local: Ipv4Addr, priority: u8) -> io::Result<()> {
    let adv = Advert {
        vrid: cfg.vrid,
        priority,
        interval_cs: cfg.advert_interval_cs,
        addrs: cfg.addresses.iter().map(|a| IpAddr::V4(*a)).collect(),
    };
    let dst = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(GROUP.octets()),
        },
        sin_zero: [0; 8],
    };
    send_to(fd, &adv.encode(IpAddr::V4(local), IpAddr::V4(GROUP)), &dst)
}

/// Gratuitous ARP for each address (request form, which every stack takes).
fn garp(ifindex: u32, mac: [u8; 6], addrs: &[Ipv4Addr]) -> io::Result<()> {
    let fd = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            (libc::ETH_P_ARP as u16).to_be() as i32,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let _owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    sll.sll_halen = 6;
    sll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
    for a in addrs {
        let mut f = Vec::with_capacity(42);
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&0x0806u16.to_be_bytes());
        f.extend_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&a.octets());
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&a.octets());
        send_to(fd, &f, &sll)?;
    }
    Ok(())
}

async fn add_addresses(h: &Handle, ifindex: u32, addrs: &[Ipv4Addr]) {
    for a in addrs {
        if let Err(e) = h.address().add(ifindex, IpAddr::V4(*a), 32).execute().await {
            if !e.to_string().contains("File exists") {
                warn!(address = %a, error = %e, "adding a VRRP address");
            }
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
fn effective_priority(c: &VrrpConfig, core: &Core, iface: &str, released: bool) -> u8 {
    if released {
        return 1;
    }
    let mut p = c.priority as i32;
    if c.priority == crate::vrrp::OWNER {
        return c.priority;
    }
    if !netdev::is_running(iface).unwrap_or(false) {
        p -= c.track_interface_penalty as i32;
    }
    for v in &c.track_vips {
        if !core.vip_has_live_backend(v) {
            p -= c.track_vip_penalty as i32;
        }
    }
    p.clamp(1, 254) as u8
}

/// Runs the speaker while the state has a `[vrrp]` section; restarts it when the section
/// changes. On `Command::Shutdown` a master hands over (priority 0) and gives up its
/// addresses.
pub async fn run(core: Arc<Mutex<Core>>, nl: Handle, mut cmds: watch::Receiver<Command>) {
    loop {
        let (cfg, iface) = {
            let c = core.lock().unwrap();
            let cfg = c.state.vrrp.clone();
            let iface = cfg.as_ref().and_then(|v| v.interface.clone()).or(c
                .state
                .balancer
                .interface
                .clone());
            (cfg, iface)
        };
        let (Some(cfg), Some(iface)) = (cfg, iface) else {
            if *cmds.borrow() == Command::Shutdown {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                _ = cmds.changed() => {}
            }
            continue;
        };
        match speak(&core, &nl, &mut cmds, &cfg, &iface).await {
            Ok(true) => return,
            Ok(false) => {}
            Err(e) => {
                warn!(error = %e, %iface, "VRRP speaker failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// One run of the speaker with one configuration. Ok(true): shut down.
async fn speak(
    core: &Arc<Mutex<Core>>,
    nl: &Handle,
    cmds: &mut watch::Receiver<Command>,
    cfg: &VrrpConfig,
    iface: &str,
) -> io::Result<bool> {
    let ifindex = netdev::index(iface).map_err(io::Error::other)?;
    let mac = netdev::mac(iface).map_err(io::Error::other)?;
    let (local, _) = netlink::addresses(nl, ifindex)
        .await
        .map_err(io::Error::other)?;
    let Some(IpAddr::V4(local)) = local else {
        return Err(io::Error::other(format!(
            "{iface} has no IPv4 address to advertise from"
        )));
    };
    // SAFETY: the AsyncFd owns the socket for as long as it is registered.
    let sock = unsafe { AsyncFd::register(open_socket(iface, ifindex)?) }
        .map_err(|e| io::Error::other(e.to_string()))?;
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
        interface: iface.to_owned(),
        priority: cfg.priority,
        ..VrrpStatus::default()
    };
    let mut garp_again: Option<Instant> = None;
    info!(%iface, vrid = cfg.vrid, priority = cfg.priority, "VRRP started");
    let mut actions = router.start(Instant::now());
    let mut buf = vec![0u8; 2048];
    let mut track = tokio::time::interval(Duration::from_millis(100));
    loop {
        // Carry out what the state machine asked for.
        for a in actions.drain(..) {
            match a {
                Action::Advertise(p) => {
                    match advertise(sock.get_ref().as_raw_fd(), cfg, local, p) {
                        Ok(()) => status.adverts_sent += 1,
                        Err(e) => warn!(error = %e, "sending a VRRP advertisement"),
                    }
                }
                Action::BecomeMaster => {
                    add_addresses(nl, ifindex, &cfg.addresses).await;
                    if let Err(e) = garp(ifindex, mac, &cfg.addresses) {
                        warn!(error = %e, "gratuitous ARP");
                    }
                    garp_again = Some(Instant::now() + Duration::from_secs(1));
                    status.transitions += 1;
                    info!(vrid = cfg.vrid, reason = %router.reason, "VRRP master");
                }
                Action::BecomeBackup => {
                    del_addresses(nl, ifindex, &cfg.addresses).await;
                    garp_again = None;
                    if router.state != State::Initialize || status.transitions > 0 {
                        status.transitions += 1;
                    }
                    info!(vrid = cfg.vrid, reason = %router.reason, "VRRP backup");
                }
            }
        }
        status.state = router.state.name().to_owned();
        status.effective_priority = router.s.priority;
        status.master = match router.state {
            State::Master => Some(local.to_string()),
            _ => router.master.map(|m| m.to_string()),
        };
        status.reason = router.reason.clone();
        status.since_s = router.since.elapsed().as_secs_f64();
        status.released = released;
        core.lock().unwrap().vrrp = Some(status.clone());

        let deadline = router
            .next_deadline()
            .unwrap_or(Instant::now() + Duration::from_secs(1));
        tokio::select! {
            r = sock.readable() => {
                let mut guard = r?;
                let n = match guard.try_io(|s| {
                    let n = unsafe { libc::recv(s.get_ref().as_raw_fd(), buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
                    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
                }) {
                    Ok(r) => r?,
                    Err(_) => continue,
                };
                let now = Instant::now();
                let pkt = &buf[..n];
                if n < 20 || pkt[0] >> 4 != 4 {
                    continue;
                }
                let ihl = (pkt[0] & 0x0f) as usize * 4;
                let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
                let dst = Ipv4Addr::new(pkt[16], pkt[17], pkt[18], pkt[19]);
                if src == local || n < ihl {
                    continue;
                }
                match Advert::decode(&pkt[ihl..], IpAddr::V4(src), IpAddr::V4(dst), pkt[8], cfg.vrid) {
                    Ok(adv) => {
                        status.adverts_received += 1;
                        actions = router.advert(&adv, IpAddr::V4(src), IpAddr::V4(local), now);
                    }
                    Err(why) => {
                        *status.invalid.entry(why.name().to_owned()).or_default() += 1;
                        if why != Invalid::Vrid {
                            warn!(from = %src, reason = why.name(), "invalid VRRP advertisement ignored");
                        }
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                actions = router.tick(Instant::now());
            }
            _ = track.tick() => {
                let p = {
                    let c = core.lock().unwrap();
                    (c.state.vrrp.as_ref() == Some(cfg)).then(|| effective_priority(cfg, &c, iface, released))
                };
                let Some(p) = p else {
                    // Reconfigured: hand over cleanly and start again.
                    actions = router.shutdown(Instant::now());
                    finish(&mut actions, &router, cfg, &sock, local, nl, ifindex).await;
                    return Ok(false);
                };
                actions = router.set_priority(p, Instant::now());
                if garp_again.is_some_and(|t| Instant::now() >= t) && router.state == State::Master {
                    let _ = garp(ifindex, mac, &cfg.addresses);
                    garp_again = None;
                }
            }
            _ = cmds.changed() => {
                let cmd = *cmds.borrow_and_update();
                match cmd {
                    Command::Shutdown => {
                        actions = router.shutdown(Instant::now());
                        finish(&mut actions, &router, cfg, &sock, local, nl, ifindex).await;
                        core.lock().unwrap().vrrp = None;
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

/// Sends what `shutdown` asked for (priority 0) and gives the addresses up.
async fn finish(
    actions: &mut Vec<Action>,
    router: &Router,
    cfg: &VrrpConfig,
    sock: &AsyncFd<OwnedFd>,
    local: Ipv4Addr,
    nl: &Handle,
    ifindex: u32,
) {
    for a in actions.drain(..) {
        match a {
            Action::Advertise(p) => {
                let _ = advertise(sock.get_ref().as_raw_fd(), cfg, local, p);
            }
            Action::BecomeBackup => del_addresses(nl, ifindex, &cfg.addresses).await,
            Action::BecomeMaster => {}
        }
    }
    info!(vrid = cfg.vrid, reason = %router.reason, "VRRP stopped");
}
