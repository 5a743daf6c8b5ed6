//! A SYN flood from random spoofed sources through the e2e topology, and the legitimate
//! traffic measured while it runs: established connections asked now and then, new
//! connections from several client addresses, and one greedy client. Shared by
//! `tests/flood_e2e.rs` and the flood bench.
//!
//! The flood leaves the client's namespace through raw IPv4 sockets, one per CPU (the
//! kernel routes it to the router like any other packet). The backends answer the spoofed SYNs directly
//! (DSR) toward the router, whose blackhole route for the spoofed range drops the answers.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use lb_userspace::{
    balancer::{Balancer, LoadOptions},
    state::{BackendSpec, VipId, VipSpec},
};

use crate::{
    fixture::{flow4, tcp_packet, vip},
    netns::Netns,
    packet::SYN,
    topology::{Conns, LongConn, TCP_PORT, Topology, VIP, backend_addr, vip_addr},
};

/// The spoofed sources: random addresses in 100.64.0.0/10.
pub const SPOOFED: &str = "100.64.0.0/10";
/// A client address that opens connections as fast as it can (over any sane rate limit).
pub const GREEDY: Ipv4Addr = Ipv4Addr::new(10, 10, 1, 3);
const TIMEOUT: Duration = Duration::from_secs(3);

/// The connection table of the lab: 2048 flows (256 sets of 8). A flood sends many
/// times that many new flows: without the flood mode it turns the table over.
pub const TABLE: u32 = 2048;
/// New flows per second per CPU above which a CPU stops inserting: the legitimate clients
/// stay under it, a flood goes far over.
pub const THRESHOLD: u32 = 100;

/// The client's `i`-th address for legitimate new connections.
pub fn legit_source(i: usize) -> IpAddr {
    Ipv4Addr::new(10, 10, 1, 10 + i as u8).into()
}

/// The e2e topology with the balancer (a connection table of `conntrack_entries`), a TCP VIP
/// on three backends, the spoofed range blackholed on the router, and the client holding
/// the greedy address and `sources` legitimate ones.
pub struct FloodLab {
    pub bal: Balancer,
    pub t: Topology,
    pub sources: Vec<IpAddr>,
}

impl FloodLab {
    pub fn build(tag: &str, conntrack_entries: u32, sources: usize) -> anyhow::Result<Self> {
        let t = Topology::build(tag, 3)?;
        let mut bal = t.attach_balancer_with(LoadOptions { conntrack_entries })?;
        let mut spec = VipSpec::new(Self::id());
        spec.backends = Self::weights(&[1, 1, 1]);
        bal.set_vip(spec)?;
        t.router.ip(&["route", "add", "blackhole", SPOOFED])?;
        let sources: Vec<IpAddr> = (0..sources).map(legit_source).collect();
        for a in sources.iter().copied().chain([GREEDY.into()]) {
            t.client
                .ip(&["addr", "add", &format!("{a}/24"), "dev", "c0"])?;
        }
        Ok(Self { bal, t, sources })
    }

    /// The VIP under attack.
    pub fn id() -> VipId {
        vip(VIP, TCP_PORT, "tcp")
    }

    /// Backends b0, b1, ... with these weights.
    pub fn weights(w: &[u32]) -> Vec<BackendSpec> {
        w.iter()
            .enumerate()
            .map(|(i, &w)| BackendSpec::new(backend_addr(i).into(), w))
            .collect()
    }

    /// Opens `n` long-lived connections from the client's main address (each must be in the
    /// connection table), drains b0, and sets the flood threshold to [`THRESHOLD`]. New flows
    /// then go to b1 and b2, and b0's connections stay there only through their entries: one
    /// evicted would move to b1 or b2, and break.
    pub fn establish(&mut self, n: usize) -> anyhow::Result<Conns> {
        let conns = self
            .t
            .client
            .run(move || Conns::open(n, vip_addr(TCP_PORT), TIMEOUT))??;
        let unknown: Vec<_> = local_addrs(&conns)
            .into_iter()
            .filter(|a| !self.remembers(a))
            .collect();
        if conns.0.len() != n || !unknown.is_empty() || conns.on("b0") == 0 {
            anyhow::bail!("connections not in the table {unknown:?}, or none on b0");
        }
        self.bal
            .set_backends(&Self::id(), Self::weights(&[0, 1, 1]))?;
        self.bal.set_flood_threshold(Some(THRESHOLD))?;
        Ok(conns)
    }

    /// Whether the connection table has the flow from `client` to the VIP.
    fn remembers(&self, client: &SocketAddr) -> bool {
        let IpAddr::V4(src) = client.ip() else {
            return false;
        };
        let flow = flow4(src, VIP, client.port(), TCP_PORT, lb_common::PROTO_TCP);
        self.bal.conntrack(&flow).is_some()
    }
}

/// A SYN flood: `rate` packets per second from random sources in [`SPOOFED`] to the VIP, at
/// most `max` packets and `limit` long.
#[derive(Clone, Copy)]
pub struct FloodSpec {
    pub rate: u32,
    pub max: u64,
    pub limit: Duration,
}

/// Sends one CPU's share of the flood (run it in the client's namespace): pinned to `cpu`
/// of `cpus`, as a NIC's receive queues would spread random sources over every CPU, and on
/// veth the balancer runs on the sender's CPU. Returns the packets sent.
fn syn_flood(spec: FloodSpec, cpu: usize, cpus: usize, stop: &AtomicBool) -> anyhow::Result<u64> {
    use socket2::{Domain, Protocol, Socket, Type};
    crate::fixture::pin_to_cpu(cpu)?;
    let spec = FloodSpec {
        rate: spec.rate / cpus as u32,
        max: spec.max / cpus as u64,
        limit: spec.limit,
    };
    let sock = Socket::new(
        Domain::IPV4,
        Type::RAW,
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )?;
    let to = SocketAddrV4::new(VIP, 0).into();
    let (start, tick) = (Instant::now(), Duration::from_millis(10));
    let per_tick = (spec.rate as u64 / 100).max(1);
    let (mut sent, mut x) = (0u64, 0x9e37_79b9u32 ^ cpu as u32);
    while sent < spec.max && start.elapsed() < spec.limit && !stop.load(Ordering::Relaxed) {
        for _ in 0..per_tick.min(spec.max - sent) {
            // xorshift32: a new source address and port for every SYN.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let src = Ipv4Addr::from(0x6440_0000 | (x & 0x003f_ffff));
            let syn = tcp_packet(src, VIP, (x >> 16) as u16 | 1024, TCP_PORT, SYN);
            sock.send_to(&syn, &to)?;
            sent += 1;
        }
        // Paced on the clock: a slow tick is made up by the next ones.
        let due = tick * (sent / per_tick) as u32;
        std::thread::sleep(due.saturating_sub(start.elapsed()));
    }
    Ok(sent)
}

/// What legitimate new connections met.
#[derive(Debug, Default)]
pub struct NewConns {
    pub ok: usize,
    pub failed: Vec<String>,
    /// Connect plus one request and answer, per successful connection.
    pub latencies: Vec<Duration>,
}

impl NewConns {
    pub fn success(&self) -> f64 {
        self.ok as f64 / (self.ok + self.failed.len()).max(1) as f64
    }

    fn merge(&mut self, other: NewConns) {
        self.ok += other.ok;
        self.failed.extend(other.failed);
        self.latencies.extend(other.latencies);
    }
}

/// One thread's new connections: from `sources` in turn, one request each, `pace` apart,
/// for `run` (at most a million).
fn connect_loop(sources: &[IpAddr], pace: Duration, run: Duration, timeout: Duration) -> NewConns {
    let mut r = NewConns::default();
    let start = Instant::now();
    for i in 0..1_000_000 {
        if start.elapsed() >= run {
            break;
        }
        let t0 = Instant::now();
        let from = sources[i % sources.len()];
        match LongConn::open_from(Some(from), vip_addr(TCP_PORT), timeout).and_then(|mut c| c.ask())
        {
            Ok(_) => {
                r.ok += 1;
                r.latencies.push(t0.elapsed());
            }
            Err(e) => r.failed.push(format!("from {from}: {e:#}")),
        }
        std::thread::sleep(pace);
    }
    r
}

/// How one phase runs: `threads` legitimate clients `pace` apart for `run`, a greedy client
/// or not, a flood or not.
#[derive(Clone)]
pub struct PhaseSpec {
    pub run: Duration,
    pub threads: usize,
    pub pace: Duration,
    pub greedy: bool,
    pub flood: Option<FloodSpec>,
    /// How often every established connection is asked.
    pub ask_every: Duration,
}

/// What one phase measured.
#[derive(Debug)]
pub struct Phase {
    pub new: NewConns,
    pub greedy: NewConns,
    /// Established connections that failed or changed backend (once each).
    pub broken: Vec<String>,
    /// Rounds of asking every established connection.
    pub rounds: usize,
    pub flood_sent: u64,
    pub elapsed: Duration,
}

/// Runs one phase in the lab's client namespace; `conns` are asked throughout and handed
/// back.
pub fn phase(lab: &FloodLab, conns: Conns, spec: &PhaseSpec) -> anyhow::Result<(Phase, Conns)> {
    let ns = &lab.t.client;
    let start = Instant::now();
    let keep = Keep::start(ns, conns, spec.ask_every)?;
    let legit = clients(ns, spec.threads, &lab.sources, spec.pace, spec.run, TIMEOUT)?;
    // The greedy client's short timeout: a refused SYN is not waited for.
    let greedy_threads = if spec.greedy { 2 } else { 0 };
    let greedy = [GREEDY.into()];
    let short = Duration::from_millis(300);
    let greedy = clients(ns, greedy_threads, &greedy, Duration::ZERO, spec.run, short)?;
    let stop = Arc::new(AtomicBool::new(false));
    let flood = senders(ns, spec.flood, &stop)?;
    let (new, greedy) = (gather(legit)?, gather(greedy)?);
    stop.store(true, Ordering::Relaxed);
    let mut flood_sent = 0;
    for h in flood {
        flood_sent += join(h)??;
    }
    let (conns, broken, rounds) = keep.stop()?;
    let p = Phase {
        new,
        greedy,
        broken,
        rounds,
        flood_sent,
        elapsed: start.elapsed(),
    };
    Ok((p, conns))
}

/// `n` client threads in `ns`, each running [`connect_loop`].
fn clients(
    ns: &Netns,
    n: usize,
    sources: &[IpAddr],
    pace: Duration,
    run: Duration,
    timeout: Duration,
) -> anyhow::Result<Vec<JoinHandle<NewConns>>> {
    (0..n)
        .map(|_| {
            let sources = sources.to_vec();
            ns.spawn(move || connect_loop(&sources, pace, run, timeout))
        })
        .collect()
}

fn gather(clients: Vec<JoinHandle<NewConns>>) -> anyhow::Result<NewConns> {
    let mut all = NewConns::default();
    for h in clients {
        all.merge(join(h)?);
    }
    Ok(all)
}

/// The flood's senders in `ns`, one per CPU (none without a flood).
fn senders(
    ns: &Netns,
    flood: Option<FloodSpec>,
    stop: &Arc<AtomicBool>,
) -> anyhow::Result<Vec<JoinHandle<anyhow::Result<u64>>>> {
    let Some(f) = flood else {
        return Ok(Vec::new());
    };
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
    (0..cpus)
        .map(|cpu| {
            let stop = stop.clone();
            ns.spawn(move || syn_flood(f, cpu, cpus, &stop))
        })
        .collect()
}

fn join<T>(h: JoinHandle<T>) -> anyhow::Result<T> {
    h.join()
        .map_err(|_| anyhow::anyhow!("traffic thread panicked"))
}

/// Established connections asked every `every` until stopped (or dropped); a broken one is
/// reported once and asked no more.
struct Keep {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<(Conns, Vec<String>, usize)>>,
}

impl Keep {
    fn start(ns: &Netns, mut conns: Conns, every: Duration) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let handle = ns.spawn(move || {
            let (mut broken, mut rounds) = (Vec::new(), 0);
            // At most ten minutes of rounds, whatever `stop` does.
            for _ in 0..(600_000 / every.as_millis().max(1)) {
                broken.extend(conns.take_broken());
                rounds += 1;
                if s.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(every);
            }
            (conns, broken, rounds)
        })?;
        Ok(Self {
            stop,
            handle: Some(handle),
        })
    }

    /// Stops after one more round: (the connections left, the broken ones, rounds).
    fn stop(mut self) -> anyhow::Result<(Conns, Vec<String>, usize)> {
        self.stop.store(true, Ordering::Relaxed);
        join(self.handle.take().expect("joined once"))
    }
}

impl Drop for Keep {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The (source, port) of each connection.
fn local_addrs(conns: &Conns) -> Vec<SocketAddr> {
    conns
        .0
        .iter()
        .filter_map(|(c, _)| c.local_addr().ok())
        .collect()
}
