//! The test and demo topology, all in namespaces this process creates:
//!
//! ```text
//!  client ns          router ns                      lb ns
//!  c0 10.10.1.2 ---- r0 10.10.1.1
//!                    r1 10.10.2.1 ------------------ l0 10.10.2.2  (maglb balancer, XDP native)
//!                    br0 10.10.3.1
//! (and the same in IPv6: fd10:1::/64, fd10:2::/64, fd10:3::/64, VIP fd20::1)
//!                     |-- rb0 ---- e0 10.10.3.11  backend ns b0 (decap XDP, VIP on lo)
//!                     |-- rb1 ---- e0 10.10.3.12  backend ns b1
//!                     `-- rb2 ---- e0 10.10.3.13  backend ns b2
//! ```
//! The router sends VIP traffic to the balancer, the balancer sends it encapsulated back to
//! the router (XDP_TX), the router forwards it to the backend, the backend's decap program
//! strips the outer header and its kernel answers the client directly (DSR).

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use lb_common::Config;
use lb_userspace::{
    addr,
    balancer::{Balancer, LoadOptions},
    datapath::Mode,
    datapath::decap::{self, Decap},
};

use crate::netns::{Netns, ip, unique_prefix};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd20, 0, 0, 0, 0, 0, 0, 1);
pub const LB_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd10, 2, 0, 0, 0, 0, 0, 2);
pub const TCP_PORT: u16 = 80;
pub const UDP_PORT: u16 = 53;
pub const LB_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 2);
pub const LB_IF: &str = "l0";

pub fn backend_addr(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 10, 3, 11 + i as u8)
}

pub fn backend_addr6(i: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd10, 3, 0, 0, 0, 0, 0, 0x11 + i as u16)
}

/// Network namespaces and links of the topology; servers; the backends' decap programs.
pub struct Topology {
    stop: Arc<AtomicBool>,
    servers: Vec<JoinHandle<()>>,
    /// Per backend: switches for its servers (for health tests).
    pub ctl: Vec<Arc<BackendCtl>>,
    /// Decap programs on the backends and the pass program on the router (kept attached).
    _programs: Vec<Decap>,
    pub client: Netns,
    pub router: Netns,
    pub lb: Netns,
    /// The second balancer of a pair (`build_pair`).
    pub lb2: Option<Netns>,
    pub backends: Vec<Netns>,
}

/// The address a VRRP master holds in a pair topology; the router sends the VIPs to it.
pub const VRRP_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 100);
pub const LB2_ADDR: Ipv4Addr = Ipv4Addr::new(10, 10, 2, 3);

/// Turns off checksum and segmentation offloads: frames then carry real checksums and are
/// never bigger than the MTU when they reach an XDP program.
fn no_offloads(ns: &Netns, dev: &str) -> anyhow::Result<()> {
    ns.exec(
        "ethtool",
        &[
            "-K", dev, "tx", "off", "tso", "off", "gso", "off", "gro", "off",
        ],
    )?;
    Ok(())
}

/// The router's link to the balancers made a bridge (`brl`, 10.10.2.1) with `r1` as its
/// first port. The bridge gets a MAC of its own: left unset, a bridge takes the lowest MAC
/// of its ports and changes it when a port with a lower one joins, which a router never
/// does. The balancers, whose kernels and datapaths still address the old MAC, would then
/// lose packets until they learn the new one.
pub fn router_bridge(r: &Netns) -> anyhow::Result<()> {
    let mac = ROUTER_BRIDGE_MAC;
    r.ip(&["link", "add", "brl", "address", mac, "type", "bridge"])?;
    r.ip(&["addr", "del", "10.10.2.1/24", "dev", "r1"])?;
    r.ip(&["-6", "addr", "del", "fd10:2::1/64", "dev", "r1"])?;
    r.ip(&["addr", "add", "10.10.2.1/24", "dev", "brl"])?;
    r.ip(&["addr", "add", "fd10:2::1/64", "dev", "brl", "nodad"])?;
    r.ip(&["link", "set", "r1", "master", "brl"])?;
    r.ip(&["link", "set", "brl", "up"])?;
    r.sysctl("net.ipv4.conf.brl.rp_filter=0")?;
    Ok(())
}

/// The router bridge's MAC (locally administered).
pub const ROUTER_BRIDGE_MAC: &str = "02:6d:61:67:00:01";

impl Topology {
    /// `n` requests from the client to the VIP's TCP port, one after another: which backend
    /// answered how often, and how many failed.
    pub fn tcp_requests(&self, n: usize) -> (BTreeMap<String, usize>, usize) {
        self.client
            .run(move || {
                let mut seen = BTreeMap::new();
                let mut failed = 0;
                for _ in 0..n {
                    match tcp_request(vip_addr(TCP_PORT), Duration::from_secs(2)) {
                        Ok(b) => *seen.entry(b).or_insert(0) += 1,
                        Err(_) => failed += 1,
                    }
                }
                (seen, failed)
            })
            .unwrap()
    }

    /// Builds the namespaces and links, starts a TCP and a UDP server on each backend and
    /// attaches the decap programs. The balancer is attached separately.
    pub fn build(tag: &str, n_backends: usize) -> anyhow::Result<Self> {
        Self::build_with(tag, n_backends, true)
    }

    /// As `build`; without `decap`, the backends get no decap program (a test attaches it,
    /// e.g. with `maglb decap attach`).
    pub fn build_with(tag: &str, n_backends: usize, decap: bool) -> anyhow::Result<Self> {
        let p = unique_prefix(tag);
        let mut t = Topology {
            stop: Arc::new(AtomicBool::new(false)),
            servers: Vec::new(),
            ctl: Vec::new(),
            _programs: Vec::new(),
            client: Netns::new(&format!("{p}-cl"))?,
            router: Netns::new(&format!("{p}-rt"))?,
            lb: Netns::new(&format!("{p}-lb"))?,
            lb2: None,
            backends: Vec::new(),
        };
        for i in 0..n_backends {
            t.backends.push(Netns::new(&format!("{p}-b{i}"))?);
        }
        let (cl, rt, lb) = (&t.client.name, &t.router.name, &t.lb.name);
        ip(&[
            "link", "add", "c0", "netns", cl, "type", "veth", "peer", "name", "r0", "netns", rt,
        ])?;
        ip(&[
            "link", "add", "r1", "netns", rt, "type", "veth", "peer", "name", LB_IF, "netns", lb,
        ])?;
        t.router.ip(&["link", "add", "br0", "type", "bridge"])?;
        t.client.ip(&["addr", "add", "10.10.1.2/24", "dev", "c0"])?;
        t.router.ip(&["addr", "add", "10.10.1.1/24", "dev", "r0"])?;
        t.router.ip(&["addr", "add", "10.10.2.1/24", "dev", "r1"])?;
        t.router
            .ip(&["addr", "add", "10.10.3.1/24", "dev", "br0"])?;
        t.lb.ip(&["addr", "add", "10.10.2.2/24", "dev", LB_IF])?;
        for (ns, a, dev) in [
            (&t.client, "fd10:1::2/64", "c0"),
            (&t.router, "fd10:1::1/64", "r0"),
            (&t.router, "fd10:2::1/64", "r1"),
            (&t.router, "fd10:3::1/64", "br0"),
            (&t.lb, "fd10:2::2/64", LB_IF),
        ] {
            ns.ip(&["addr", "add", a, "dev", dev, "nodad"])?;
        }
        for (ns, dev) in [
            (&t.router, "r0"),
            (&t.client, "c0"),
            (&t.lb, LB_IF),
            (&t.router, "r1"),
        ] {
            no_offloads(ns, dev)?;
            ns.ip(&["link", "set", dev, "up"])?;
        }
        t.router.ip(&["link", "set", "br0", "up"])?;
        t.client
            .ip(&["route", "add", "default", "via", "10.10.1.1"])?;
        t.router.ip(&[
            "route",
            "add",
            &format!("{VIP}/32"),
            "via",
            &LB_ADDR.to_string(),
        ])?;
        t.client
            .ip(&["-6", "route", "add", "default", "via", "fd10:1::1"])?;
        t.router.ip(&[
            "-6",
            "route",
            "add",
            &format!("{VIP6}/128"),
            "via",
            &LB_ADDR6.to_string(),
        ])?;
        // The balancer's own routes: the agent finds its next hop (the router) through them.
        t.lb.ip(&["route", "add", "default", "via", "10.10.2.1"])?;
        t.lb.ip(&["-6", "route", "add", "default", "via", "fd10:2::1"])?;
        t.router.sysctl("net.ipv4.ip_forward=1")?;
        t.router.sysctl("net.ipv6.conf.all.forwarding=1")?;
        for k in ["all", "default", "r0", "r1", "br0"] {
            t.router.sysctl(&format!("net.ipv4.conf.{k}.rp_filter=0"))?;
        }
        // Frames the balancer sends back with XDP_TX reach the router only if r1 runs XDP.
        let pass = t.router.run(|| -> anyhow::Result<Decap> {
            let mut d = Decap::load()?;
            d.attach(decap::PASS_PROGRAM, "r1", Mode::Native)?;
            Ok(d)
        })??;
        t._programs.push(pass);
        for i in 0..n_backends {
            t.add_backend_links(i, decap)?;
        }
        Ok(t)
    }

    /// A pair: the router's link to the balancers becomes a bridge (`brl`, 10.10.2.1) with a
    /// second balancer (`lb2`, 10.10.2.3) on it, and the router sends the VIP to
    /// `VRRP_ADDR`, which the VRRP master holds. No decap programs on the backends.
    pub fn build_pair(tag: &str, n_backends: usize) -> anyhow::Result<Self> {
        let mut t = Self::build_with(tag, n_backends, false)?;
        let lb2 = Netns::new(&format!("{}2", t.lb.name))?;
        let (rt, l2) = (t.router.name.clone(), lb2.name.clone());
        ip(&[
            "link", "add", "rl2", "netns", &rt, "type", "veth", "peer", "name", LB_IF, "netns", &l2,
        ])?;
        let r = &t.router;
        router_bridge(r)?;
        r.ip(&["link", "set", "rl2", "master", "brl"])?;
        no_offloads(r, "rl2")?;
        r.ip(&["link", "set", "rl2", "up"])?;
        lb2.ip(&["addr", "add", &format!("{LB2_ADDR}/24"), "dev", LB_IF])?;
        no_offloads(&lb2, LB_IF)?;
        lb2.ip(&["link", "set", LB_IF, "up"])?;
        lb2.ip(&["route", "add", "default", "via", "10.10.2.1"])?;
        r.ip(&[
            "route",
            "replace",
            &format!("{VIP}/32"),
            "via",
            &VRRP_ADDR.to_string(),
        ])?;
        let pass = r.run(|| -> anyhow::Result<Decap> {
            let mut d = Decap::load()?;
            d.attach(decap::PASS_PROGRAM, "rl2", Mode::Native)?;
            Ok(d)
        })??;
        t._programs.push(pass);
        t.lb2 = Some(lb2);
        Ok(t)
    }

    /// The MAC the router has for `addr` on its balancer link, if any.
    pub fn router_neighbour(&self, addr: Ipv4Addr) -> Option<String> {
        let out = self.router.ip(&["neigh", "show", &addr.to_string()]).ok()?;
        let line = out.lines().find(|l| l.contains("lladdr"))?;
        let mut it = line.split_whitespace();
        it.find(|w| *w == "lladdr")?;
        it.next().map(str::to_owned)
    }

    fn add_backend_links(&mut self, i: usize, decap: bool) -> anyhow::Result<()> {
        let b = &self.backends[i];
        let rb = format!("rb{i}");
        ip(&[
            "link",
            "add",
            "e0",
            "netns",
            &b.name,
            "type",
            "veth",
            "peer",
            "name",
            &rb,
            "netns",
            &self.router.name,
        ])?;
        self.router.ip(&["link", "set", &rb, "master", "br0"])?;
        no_offloads(&self.router, &rb)?;
        self.router.ip(&["link", "set", &rb, "up"])?;
        let a = backend_addr(i);
        let a6 = backend_addr6(i);
        b.ip(&["addr", "add", &format!("{a}/24"), "dev", "e0"])?;
        b.ip(&["addr", "add", &format!("{a6}/64"), "dev", "e0", "nodad"])?;
        b.ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        b.ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo"])?;
        no_offloads(b, "e0")?;
        b.ip(&["link", "set", "e0", "up"])?;
        b.ip(&["route", "add", "default", "via", "10.10.3.1"])?;
        b.ip(&["-6", "route", "add", "default", "via", "fd10:3::1"])?;
        // Direct server return: the VIP lives on lo and is never announced with ARP.
        for kv in [
            "net.ipv4.conf.all.arp_ignore=1",
            "net.ipv4.conf.all.arp_announce=2",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
            "net.ipv4.conf.e0.rp_filter=0",
        ] {
            b.sysctl(kv)?;
        }
        if decap {
            let d = b.run(move || -> anyhow::Result<Decap> {
                let mut d = Decap::load()?;
                d.attach(decap::PROGRAM, "e0", Mode::Native)?;
                d.add_addr(a.into())?;
                d.add_addr(a6.into())?;
                Ok(d)
            })??;
            self._programs.push(d);
        }
        let name = format!("b{i}");
        let ctl = Arc::new(BackendCtl::default());
        // The service on the VIPs (where probes over the tunnel go, the default check of a
        // TCP VIP too) and on the backend's own addresses (where direct probes go), and a
        // health endpoint on all its addresses.
        for at in [
            IpAddr::V4(VIP),
            IpAddr::V6(VIP6),
            IpAddr::V4(a),
            IpAddr::V6(a6),
        ] {
            let at = SocketAddr::new(at, TCP_PORT);
            self.servers
                .push(tcp_server(b, &name, at, &self.stop, &ctl)?);
        }
        for at in [
            IpAddr::V4(VIP),
            IpAddr::V6(VIP6),
            IpAddr::V4(a),
            IpAddr::V6(a6),
        ] {
            let at = SocketAddr::new(at, UDP_PORT);
            self.servers.push(udp_server(b, &name, at, &self.stop)?);
        }
        let at = SocketAddr::new(IpAddr::V6(Ipv6Addr::UNSPECIFIED), HEALTH_PORT);
        self.servers.push(health_server(b, at, &self.stop, &ctl)?);
        self.ctl.push(ctl);
        Ok(())
    }

    /// The balancer configuration for this topology: l0's MAC, the router's r1 as next hop.
    pub fn balancer_config(&self) -> anyhow::Result<Config> {
        let if_mac = self.lb.mac(LB_IF)?;
        let nh_mac = self.router.mac("r1")?;
        Ok(Config {
            src_v6: addr::to_words(LB_ADDR6.into()).0,
            src_v4: addr::to_words(LB_ADDR.into()).0[0],
            mtu: 1500,
            ready: 1,
            if_mac,
            nh_mac,
        })
    }

    /// Loads the balancer, configures it and attaches it to l0 in native mode.
    pub fn attach_balancer(&self) -> anyhow::Result<Balancer> {
        self.attach_balancer_with(LoadOptions::default())
    }

    /// As [`Topology::attach_balancer`], with other load options (a smaller connection
    /// table).
    pub fn attach_balancer_with(&self, opts: LoadOptions) -> anyhow::Result<Balancer> {
        let cfg = self.balancer_config()?;
        self.lb.run(move || -> anyhow::Result<Balancer> {
            let mut bal = Balancer::load_with(&opts)?;
            bal.set_config(&cfg)?;
            bal.attach(LB_IF, Mode::Native)?;
            Ok(bal)
        })?
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for s in self.servers.drain(..) {
            let _ = s.join();
        }
    }
}

/// A TCP server: answers every line with its backend name, and HTTP GET requests with an
/// HTTP response whose body is that name.
/// Switches for one backend's servers.
pub struct BackendCtl {
    /// The TCP service runs; when false its listeners are closed (connections are refused)
    /// and its open connections closed, as when the server process stops.
    pub serving: AtomicBool,
    /// Status the health endpoint answers with.
    pub health_status: std::sync::atomic::AtomicU16,
    /// The health endpoint accepts connections but never answers.
    pub hang: AtomicBool,
    /// A slow backend: the health endpoint and the TCP service wait this long before each
    /// answer.
    pub delay_ms: std::sync::atomic::AtomicU64,
}

impl Default for BackendCtl {
    fn default() -> Self {
        Self {
            serving: AtomicBool::new(true),
            health_status: std::sync::atomic::AtomicU16::new(200),
            hang: AtomicBool::new(false),
            delay_ms: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl BackendCtl {
    /// Waits `delay_ms`, if set.
    fn delay(&self) {
        let ms = self.delay_ms.load(Ordering::Relaxed);
        if ms > 0 {
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
}

/// Port of the backends' HTTP health endpoint (`GET /health`), on every address of the
/// backend: its own (direct probes) and the VIPs on its loopback (probes over the tunnel).
pub const HEALTH_PORT: u16 = 8080;

fn tcp_server(
    ns: &Netns,
    name: &str,
    at: SocketAddr,
    stop: &Arc<AtomicBool>,
    ctl: &Arc<BackendCtl>,
) -> anyhow::Result<JoinHandle<()>> {
    let (name, stop, ctl) = (name.to_owned(), stop.clone(), ctl.clone());
    let bind = move || -> std::io::Result<TcpListener> {
        let l = TcpListener::bind(at)?;
        l.set_nonblocking(true)?;
        Ok(l)
    };
    let mut listener = Some(ns.run(bind)??);
    ns.spawn(move || {
        let mut conns = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let serving = ctl.serving.load(Ordering::Relaxed);
            if serving != listener.is_some() {
                listener = if serving { bind().ok() } else { None };
            }
            match listener.as_ref().map(|l| l.accept()) {
                Some(Ok((s, _))) => {
                    let (name, stop, ctl) = (name.clone(), stop.clone(), ctl.clone());
                    conns.push(std::thread::spawn(move || {
                        serve_lines(s, &name, &stop, &ctl)
                    }));
                    conns.retain(|c: &JoinHandle<()>| !c.is_finished());
                }
                _ => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        for c in conns {
            let _ = c.join();
        }
    })
}

/// `GET /health` answered with the status in `ctl` (or never, while `ctl.hang`).
fn health_server(
    ns: &Netns,
    at: SocketAddr,
    stop: &Arc<AtomicBool>,
    ctl: &Arc<BackendCtl>,
) -> anyhow::Result<JoinHandle<()>> {
    let (stop, ctl) = (stop.clone(), ctl.clone());
    let listener = ns.run(move || TcpListener::bind(at))??;
    listener.set_nonblocking(true)?;
    ns.spawn(move || {
        let mut held = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let Ok((mut s, _)) = listener.accept() else {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            };
            if ctl.hang.load(Ordering::Relaxed) {
                held.push(s);
                continue;
            }
            held.clear();
            let _ = s.set_nonblocking(false);
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            let mut buf = [0u8; 1024];
            let _ = std::io::Read::read(&mut s, &mut buf);
            ctl.delay();
            let status = ctl.health_status.load(Ordering::Relaxed);
            let body = if status == 200 { "ok\n" } else { "failing\n" };
            let _ = write!(
                s,
                "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    })
}

fn serve_lines(s: TcpStream, name: &str, stop: &AtomicBool, ctl: &BackendCtl) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let mut w = match s.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut r = BufReader::new(s);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) && ctl.serving.load(Ordering::Relaxed) {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.starts_with("GET ") => {
                // Skip the headers, answer, close.
                let mut h = String::new();
                while r.read_line(&mut h).is_ok_and(|n| n > 0) && h.trim() != "" {
                    h.clear();
                }
                ctl.delay();
                let body = format!("{name}\n");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = w.write_all(resp.as_bytes());
                return;
            }
            Ok(_) => {
                ctl.delay();
                if w.write_all(format!("{name}\n").as_bytes()).is_err() {
                    return;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return,
        }
    }
}

/// A UDP server: answers every datagram with its backend name.
fn udp_server(
    ns: &Netns,
    name: &str,
    at: SocketAddr,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<JoinHandle<()>> {
    let (name, stop) = (name.to_owned(), stop.clone());
    let sock = ns.run(move || UdpSocket::bind(at))??;
    sock.set_read_timeout(Some(Duration::from_millis(50)))?;
    ns.spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop.load(Ordering::Relaxed) {
            if let Ok((_, peer)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(name.as_bytes(), peer);
            }
        }
    })
}

/// One request on a new TCP connection to the VIP: the name of the backend that answered.
pub fn tcp_request(to: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let mut c = LongConn::open(to, timeout)?;
    c.ask()
}

/// One HTTP GET to the VIP on a new connection: the response body (the backend's name).
pub fn http_get(to: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    use std::io::Read as _;
    let mut s =
        TcpStream::connect_timeout(&to, timeout).with_context(|| format!("connect {to}"))?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET / HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    )?;
    let mut resp = String::new();
    s.read_to_string(&mut resp)?;
    let (head, body) = resp.split_once("\r\n\r\n").context("HTTP response")?;
    if !head.starts_with("HTTP/1.1 200") {
        bail!("HTTP status: {}", head.lines().next().unwrap_or_default());
    }
    Ok(body.trim().to_owned())
}

/// One UDP exchange with the VIP from a new socket (a new source port).
pub fn udp_request(to: SocketAddr, timeout: Duration) -> anyhow::Result<String> {
    let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"hello", to)?;
    let mut buf = [0u8; 64];
    let (n, from) = s.recv_from(&mut buf).context("UDP reply")?;
    if from != to {
        bail!("reply from {from}, expected {to}");
    }
    Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
}

/// A TCP connection kept open across requests.
pub struct LongConn {
    r: BufReader<TcpStream>,
    w: TcpStream,
}

impl LongConn {
    pub fn open(to: SocketAddr, timeout: Duration) -> anyhow::Result<Self> {
        Self::open_from(None, to, timeout)
    }

    /// As [`LongConn::open`], from source address `from` (one of the namespace's).
    pub fn open_from(
        from: Option<IpAddr>,
        to: SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<Self> {
        let s = connect_from(from, to, timeout).with_context(|| format!("connect {to}"))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.set_nodelay(true)?;
        Ok(Self {
            w: s.try_clone()?,
            r: BufReader::new(s),
        })
    }

    /// The connection's own (source) address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.w.local_addr()
    }

    /// Sends a line, returns the backend's name.
    pub fn ask(&mut self) -> anyhow::Result<String> {
        self.ask_with(b"hello")
    }

    /// Sends `body` as one line (it may span many segments), returns the backend's name.
    pub fn ask_with(&mut self, body: &[u8]) -> anyhow::Result<String> {
        let mut line = body.to_vec();
        line.push(b'\n');
        self.w.write_all(&line)?;
        let mut line = String::new();
        if self.r.read_line(&mut line)? == 0 {
            bail!("connection closed");
        }
        Ok(line.trim().to_owned())
    }
}

/// A TCP connection to `to`, from address `from` when given.
fn connect_from(
    from: Option<IpAddr>,
    to: SocketAddr,
    timeout: Duration,
) -> std::io::Result<TcpStream> {
    let Some(from) = from else {
        return TcpStream::connect_timeout(&to, timeout);
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect_timeout(&to.into(), timeout)?;
    Ok(s.into())
}

/// Long-lived connections, each with the backend that answered its first request.
pub struct Conns(pub Vec<(LongConn, String)>);

impl Conns {
    /// Opens `n` connections to `to` (run it inside the client's namespace).
    pub fn open(n: usize, to: SocketAddr, timeout: Duration) -> anyhow::Result<Self> {
        let conns = (0..n)
            .map(|_| {
                let mut c = LongConn::open(to, timeout)?;
                let b = c.ask()?;
                Ok((c, b))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self(conns))
    }

    /// How many started on `backend`.
    pub fn on(&self, backend: &str) -> usize {
        self.0.iter().filter(|(_, b)| b == backend).count()
    }

    /// Asks once more on every connection: those that failed or moved to another backend.
    pub fn broken(&mut self) -> Vec<String> {
        let faults = self.0.iter_mut().map(|(c, b)| fault(c, b));
        faults
            .enumerate()
            .filter_map(|(i, f)| Some(format!("connection {i} {}", f?)))
            .collect()
    }

    /// As [`Conns::broken`], and the broken ones are closed and left out from now on.
    pub fn take_broken(&mut self) -> Vec<String> {
        let mut broken = Vec::new();
        self.0.retain_mut(|(c, b)| match fault(c, b) {
            None => true,
            Some(f) => {
                broken.push(format!("connection from {:?} {f}", c.local_addr()));
                false
            }
        });
        broken
    }
}

/// Asks once more on `c`, which started on backend `b`: what is wrong, if anything.
fn fault(c: &mut LongConn, b: &str) -> Option<String> {
    match c.ask() {
        Ok(now) if now == b => None,
        Ok(now) => Some(format!("moved from {b} to {now}")),
        Err(e) => Some(format!("on {b}: {e:#}")),
    }
}

/// Waits until `f` is true, at most `limit`.
pub fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

pub fn vip_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(VIP), port)
}

pub fn vip6_addr(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V6(VIP6), port)
}
