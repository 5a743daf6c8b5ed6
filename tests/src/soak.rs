//! `cargo xtask soak --minutes N`: a VRRP pair under real traffic for N minutes while faults
//! and churn follow each other: backend health flaps, backends removed and added, config
//! churn through `maglb apply`, VIPs added and deleted (one of them carrying traffic), agent
//! restarts (SIGKILL and SIGTERM, master and backup) and VRRP handovers. Every failed request
//! is classified against the windows of the faults that were made; the run fails if one
//! failed outside them. Between events it samples each agent's RSS and open fds, the pinned
//! maps (slots ever used, slots in use, VIP entries), `maglb verify` and the pinned maps
//! against the state on disk, and checks that they stay bounded and agree.
//!
//! The report is the `## Soak` section of BENCHMARKS.md ([`put_section`]); `cargo xtask
//! bench` keeps that section when it rewrites the file ([`section_of`]).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use lb_common::BACKEND_F_IN_USE;
use lb_userspace::{
    datapath::observe_pinned, reconcile::verify, state::VipSpec, store::read_persisted,
};

use crate::{
    agent::{Agent, Scratch, attach_decaps},
    bench::load_average,
    netns::{Netns, require_root},
    topology::{LB_IF, TCP_PORT, Topology, VIP, VRRP_ADDR, backend_addr, wait_for},
    traffic::{Request, Requests},
};

/// Backends of the pair's VIPs.
const BACKENDS: usize = 4;
/// The churned VIP that carries traffic: added and deleted on the VIP address, port 81.
const PORT2: u16 = 81;
/// The check of the main VIP: every 300 ms, timeout 200 ms, rise 2, fall 2.
const INTERVAL_MS: u64 = 300;
const TIMEOUT_MS: u64 = 200;
const FALL: u64 = 2;
/// Scheduling slack on top of what the probe settings allow (a shared, loaded machine).
const SLACK: Duration = Duration::from_millis(1000);
/// A request's timeout: a SYN lost in a handover is sent again after 1 s and 3 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(4);

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    /// How long the churn goes on (the set-up and the final checks come on top).
    pub duration: Duration,
    /// Every kind of event in every cycle (the short run of the test suite); otherwise
    /// agent restarts come every other cycle, one kind at a time, so that agents also live
    /// long enough for their RSS and fds to show a trend.
    pub every_kind_each_cycle: bool,
}

/// A kind of fault window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// A backend's server stopped: up to fall x interval + timeout (+ slack) until the probes
    /// take it out.
    HealthFlap,
    /// VRRP moved the VIP between the balancers (agent killed, stopped, restarted, release,
    /// claim), until the router sends to the new master (+ slack).
    Handover,
    /// A backend removed: its established flows end (`backend del`).
    BackendDel,
    /// The traffic-carrying churned VIP deleted: requests to it in flight.
    VipDel,
}

#[derive(Clone, Debug)]
struct Window {
    kind: Kind,
    start: Instant,
    end: Instant,
    /// Only requests to this target (none: any).
    target: Option<SocketAddr>,
}

/// One sample of one agent.
#[derive(Clone, Debug)]
struct Sample {
    agent: usize,
    pid: u32,
    rss_kb: u64,
    fds: usize,
    /// Slots with a generation other than 0 (ever used).
    touched: usize,
    in_use: usize,
    vip_entries: usize,
    /// VIP-backend pairs and VIPs in the state on disk.
    pairs: usize,
    vips: usize,
    verify_clean: bool,
    pinned_equal: bool,
}

/// The desired state both balancers carry (each with its own VRRP priority).
#[derive(Clone, Debug)]
struct Model {
    weights: [u32; BACKENDS],
    /// Backends of the main VIP that are there (a removed one is added back in its event).
    present: [bool; BACKENDS],
    /// The churned VIP on port 81, with every backend.
    port2: bool,
    /// Churned VIPs without traffic: (index, backends), at 10.202.x.y with backends nobody
    /// answers at (probing off).
    idle: Vec<(u32, u32)>,
}

impl Model {
    fn pairs(&self) -> usize {
        self.present.iter().filter(|p| **p).count()
            + if self.port2 { BACKENDS } else { 0 }
            + self.idle.iter().map(|(_, n)| *n as usize).sum::<usize>()
    }

    fn config(&self, priority: u8) -> String {
        let mut c = format!(
            "[balancer]\ninterface = \"{LB_IF}\"\n\n[vrrp]\nvrid = 51\npriority = {priority}\n\
             advert_interval_cs = 10\naddresses = [\"{VRRP_ADDR}\"]\n\n\
             [[vip]]\naddress = \"{VIP}:{TCP_PORT}/tcp\"\n\
             health = {{ kind = \"tcp\", interval_ms = {INTERVAL_MS}, timeout_ms = {TIMEOUT_MS}, \
             rise = 2, fall = {FALL} }}\n"
        );
        for i in 0..BACKENDS {
            if self.present[i] {
                c += &format!(
                    "[[vip.backend]]\naddress = \"{}\"\nweight = {}\n",
                    backend_addr(i),
                    self.weights[i]
                );
            }
        }
        if self.port2 {
            // The default check: a TCP connect to port 81 of each backend.
            c += &format!("[[vip]]\naddress = \"{VIP}:{PORT2}/tcp\"\n");
            for i in 0..BACKENDS {
                c += &format!("[[vip.backend]]\naddress = \"{}\"\n", backend_addr(i));
            }
        }
        for (v, n) in &self.idle {
            c += &format!(
                "[[vip]]\naddress = \"10.202.0.{v}:80/tcp\"\nring_size = 1009\n\
                 health = {{ kind = \"none\" }}\n"
            );
            for b in 0..*n {
                c += &format!(
                    "[[vip.backend]]\naddress = \"{}\"\n",
                    Ipv4Addr::new(10, 203, *v as u8, b as u8 + 1)
                );
            }
        }
        c
    }
}

/// A small deterministic generator (xorshift), so a run's churn can be told again.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Servers on port 81 of every backend (all addresses), answering each line with
/// `bN:81`, until stopped.
struct Port2Servers {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl Port2Servers {
    fn start(t: &Topology) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let mut handles = Vec::new();
        for (i, ns) in t.backends.iter().enumerate() {
            let l = ns.run(|| TcpListener::bind(("0.0.0.0", PORT2)))??;
            l.set_nonblocking(true)?;
            let stop = stop.clone();
            let name = format!("b{i}:{PORT2}");
            handles.push(ns.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match l.accept() {
                        Ok((s, _)) => {
                            let name = name.clone();
                            std::thread::spawn(move || {
                                let _ = s.set_nonblocking(false);
                                let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
                                let Ok(mut w) = s.try_clone() else { return };
                                let mut line = String::new();
                                let mut r = BufReader::new(s);
                                while r.read_line(&mut line).is_ok_and(|n| n > 0) {
                                    if w.write_all(format!("{name}\n").as_bytes()).is_err() {
                                        return;
                                    }
                                    line.clear();
                                }
                            });
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
            })?);
        }
        Ok(Self { stop, handles })
    }
}

impl Drop for Port2Servers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// The pair: agents, topology, their state directories (dropped in this order: the
/// agents go first, their pins and directories last).
struct Pair {
    a: [Option<Agent>; 2],
    t: Topology,
    s: [Scratch; 2],
    bin: PathBuf,
}

impl Pair {
    fn ns(&self, i: usize) -> &Netns {
        if i == 0 {
            &self.t.lb
        } else {
            self.t.lb2.as_ref().expect("pair")
        }
    }

    fn agent(&self, i: usize) -> &Agent {
        self.a[i].as_ref().expect("agent running")
    }

    fn priority(i: usize) -> u8 {
        if i == 0 { 150 } else { 100 }
    }

    fn start(&mut self, i: usize) -> anyhow::Result<()> {
        let a = Agent::start(&self.bin, self.ns(i), &self.s[i].0)?;
        self.a[i] = Some(a);
        Ok(())
    }

    fn vrrp_state(&self, i: usize) -> String {
        let Some(a) = self.a[i].as_ref() else {
            return "stopped".into();
        };
        let o = a.cli(&["vrrp", "status", "--output", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v["state"].as_str().unwrap_or("none").to_owned()
    }

    fn mac(&self, i: usize) -> String {
        self.ns(i)
            .mac(LB_IF)
            .map(|m| lb_userspace::addr::fmt_mac(&m))
            .unwrap_or_default()
    }

    /// Waits until `master` is master, the other not (backup, or its agent gone), and the
    /// router sends to the master; returns when that was seen.
    fn settle(&self, master: usize) -> anyhow::Result<Instant> {
        let other = 1 - master;
        let mac = self.mac(master);
        let ok = wait_for(Duration::from_secs(15), || {
            self.vrrp_state(master) == "master"
                && self.vrrp_state(other) != "master"
                && self.t.router_neighbour(VRRP_ADDR).as_deref() == Some(mac.as_str())
        });
        ensure!(
            ok,
            "the pair did not settle with lb{} master: lb1 {}, lb2 {}, router {:?}",
            master + 1,
            self.vrrp_state(0),
            self.vrrp_state(1),
            self.t.router_neighbour(VRRP_ADDR)
        );
        Ok(Instant::now())
    }

    /// Applies the model on both balancers.
    fn apply(&self, m: &Model) -> anyhow::Result<()> {
        for i in 0..2 {
            let f = self.s[i].0.dir.join("maglb.toml");
            std::fs::write(&f, m.config(Self::priority(i)))?;
            let o = self
                .agent(i)
                .cli(&["apply", "-f", f.to_str().expect("utf-8")]);
            ensure!(
                o.status.success(),
                "apply on lb{}: {}",
                i + 1,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(())
    }

    /// Runs `maglb ARGS` on both balancers.
    fn both(&self, args: &[&str]) -> anyhow::Result<()> {
        for i in 0..2 {
            let o = self.agent(i).cli(args);
            ensure!(
                o.status.success(),
                "maglb {args:?} on lb{}: {}",
                i + 1,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(())
    }

    /// (up, checks) of each probe of agent `i`, by (VIP, backend).
    fn probes(&self, i: usize) -> BTreeMap<(String, String), bool> {
        let Some(a) = self.a[i].as_ref() else {
            return BTreeMap::new();
        };
        let o = a.cli(&["health", "--output", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
        v.as_array()
            .map(|ps| {
                ps.iter()
                    .map(|p| {
                        (
                            (
                                p["vip"].as_str().unwrap_or("").to_owned(),
                                p["backend"].as_str().unwrap_or("").to_owned(),
                            ),
                            p["health"]["up"].as_bool().unwrap_or(true),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until every probe of both agents says up.
    fn all_up(&self) -> anyhow::Result<()> {
        let ok = wait_for(Duration::from_secs(15), || {
            (0..2).all(|i| self.probes(i).values().all(|up| *up))
        });
        ensure!(
            ok,
            "probes not all up: {:?} {:?}",
            self.probes(0),
            self.probes(1)
        );
        Ok(())
    }

    /// One sample of agent `i`. The pinned maps are compared with the state on disk only
    /// when `quiet` (every probe settled, no change in flight).
    fn sample(&self, i: usize, quiet: bool) -> anyhow::Result<Sample> {
        let a = self.agent(i);
        let pid = a.pid().context("agent pid")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kb = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
        let obs = observe_pinned(&a.paths.bpffs)?;
        let saved = read_persisted(&a.paths.state_dir)?;
        let specs: Vec<VipSpec> = saved
            .state
            .vips
            .iter()
            .map(|v| v.spec(|b| !saved.down.contains(&(v.address, *b))))
            .collect();
        let verify_clean = a.cli(&["verify"]).status.success();
        let pinned_equal = !quiet || verify(&obs, &specs).is_empty();
        Ok(Sample {
            agent: i,
            pid,
            rss_kb,
            fds,
            touched: obs.slots.len(),
            in_use: obs
                .slots
                .iter()
                .filter(|(_, b)| b.flags & BACKEND_F_IN_USE != 0)
                .count(),
            vip_entries: obs.vips.len(),
            pairs: saved.state.vips.iter().map(|v| v.backends.len()).sum(),
            vips: saved.state.vips.len(),
            verify_clean,
            pinned_equal,
        })
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Summary {
    pub report: String,
    pub failed_outside: usize,
    pub problems: Vec<String>,
}

fn fmt_range(v: impl Iterator<Item = f64> + Clone, digits: usize) -> String {
    let min = v.clone().fold(f64::INFINITY, f64::min);
    let max = v.fold(f64::NEG_INFINITY, f64::max);
    if !min.is_finite() {
        return "-".into();
    }
    format!("{min:.digits$}-{max:.digits$}")
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e3)
}

fn median_ms(v: &[Duration]) -> String {
    if v.is_empty() {
        return "-".into();
    }
    let mut v = v.to_vec();
    v.sort();
    format!(
        "{} / {} / {}",
        ms(v[0]),
        ms(v[v.len() / 2]),
        ms(v[v.len() - 1])
    )
}

/// Runs the soak with the `maglb` binary `bin`.
pub fn run(bin: &Path, opts: &Options) -> anyhow::Result<Summary> {
    require_root();
    let started_at = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let load_before = load_average(" ");
    let s = [Scratch::new("sk1"), Scratch::new("sk2")];
    let t = Topology::build_pair("sk", BACKENDS)?;
    attach_decaps(bin, &t, &s[0]);
    let _port2 = Port2Servers::start(&t)?;
    let p = Pair {
        a: [None, None],
        t,
        s,
        bin: bin.to_owned(),
    };
    let mut c = Churn::start(p, opts.every_kind_each_cycle)?;
    let traffic = Requests::start_shared(
        &c.p.t.client,
        c.targets.clone(),
        REQUEST_TIMEOUT,
        Duration::from_millis(3),
    );
    let t0 = Instant::now();
    let result = (|| -> anyhow::Result<()> {
        while t0.elapsed() < opts.duration {
            c.cycle()?;
            println!(
                "soak: cycle {} done at {:.0} s, {} requests so far",
                c.rec.cycle,
                t0.elapsed().as_secs_f64(),
                traffic.count()
            );
        }
        Ok(())
    })();
    let churn = t0.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let log = traffic.stop();
    result?;

    let mut rec = c.rec;
    let (failed_in, outside) = classify(&log, &rec.windows, t0);
    let growth = per_agent(&rec.samples, &mut rec.problems);
    let facts = Facts {
        started_at,
        load_before,
        load_after: load_average(" "),
        minutes: opts.duration.as_secs_f64() / 60.0,
        churn,
    };
    let mut r = String::new();
    report_requests(&mut r, &facts, &rec, &log, &failed_in, outside.len());
    report_samples(&mut r, &rec, &growth);
    if !outside.is_empty() || !rec.problems.is_empty() {
        let _ = writeln!(r, "Problems:\n");
        for o in outside.iter().take(20) {
            let _ = writeln!(r, "- failed outside every window: {o}");
        }
        for pr in &rec.problems {
            let _ = writeln!(r, "- {pr}");
        }
        r.push('\n');
    }
    Ok(Summary {
        report: r,
        failed_outside: outside.len(),
        problems: rec.problems,
    })
}

/// The main VIP's address, and the churned one's (port 81).
const MAIN: SocketAddr = SocketAddr::new(IpAddr::V4(VIP), TCP_PORT);
const SECOND: SocketAddr = SocketAddr::new(IpAddr::V4(VIP), PORT2);

/// What the events of a run recorded.
#[derive(Default)]
struct Record {
    /// Cycles done.
    cycle: usize,
    windows: Vec<Window>,
    ops: BTreeMap<&'static str, usize>,
    samples: Vec<Sample>,
    /// Server stopped -> down on both; started -> up on both; handover -> settled.
    detect: Vec<Duration>,
    recover: Vec<Duration>,
    handover: Vec<Duration>,
    problems: Vec<String>,
    /// The most VIP-backend pairs needed at once (a change's old and new pairs together).
    peak_bound: usize,
}

impl Record {
    fn window(&mut self, kind: Kind, start: Instant, end: Instant, target: Option<SocketAddr>) {
        self.windows.push(Window {
            kind,
            start,
            end,
            target,
        });
    }

    fn op(&mut self, what: &'static str, n: usize) {
        *self.ops.entry(what).or_default() += n;
    }
}

/// The churn of one run: the pair, the state both carry, and what the events recorded.
struct Churn {
    p: Pair,
    m: Model,
    rng: Rng,
    /// Every kind of event in every cycle (see `Options`).
    every_kind: bool,
    /// What the client sends to (the port-81 VIP leaves it while deleted).
    targets: Arc<Mutex<Vec<SocketAddr>>>,
    rec: Record,
}

impl Churn {
    /// Both agents started with the first state, ready, lb1 the master, every probe up.
    fn start(mut p: Pair, every_kind: bool) -> anyhow::Result<Self> {
        let m = Model {
            weights: [1; BACKENDS],
            present: [true; BACKENDS],
            port2: true,
            idle: vec![(1, 10), (2, 20)],
        };
        for i in 0..2 {
            p.start(i)?;
        }
        p.apply(&m)?;
        p.agent(0).wait_ready();
        p.agent(1).wait_ready();
        // The router learns the VRRP address with its first packet toward the VIP.
        p.t.client
            .run(|| crate::topology::tcp_request(MAIN, Duration::from_secs(3)))?
            .context("first request")?;
        p.settle(0)?;
        p.all_up()?;
        let rec = Record {
            peak_bound: m.pairs(),
            ..Record::default()
        };
        Ok(Self {
            p,
            m,
            rng: Rng(0x9e37_79b9_7f4a_7c15),
            every_kind,
            targets: Arc::new(Mutex::new(vec![MAIN, SECOND])),
            rec,
        })
    }

    /// One cycle: every event in turn (some every other cycle), then a quiet sample.
    fn cycle(&mut self) -> anyhow::Result<()> {
        let cycle = self.rec.cycle;
        self.health_flap(cycle % BACKENDS)?;
        self.apply_changed()?;
        if cycle.is_multiple_of(2) || self.every_kind {
            self.port2_deleted_and_added()?;
        }
        self.idle_vips_through_the_cli()?;
        self.backend_removed_and_added((cycle + 1) % BACKENDS)?;
        if cycle % 2 == 1 || self.every_kind {
            self.planned_handover()?;
        }
        // Agent restarts: the backup's (SIGKILL), the master's (SIGKILL: failover, then
        // failback when it returns) and the master's (SIGTERM: priority 0).
        let kinds: Vec<usize> = if self.every_kind {
            vec![0, 1, 2]
        } else if cycle.is_multiple_of(2) {
            vec![(cycle / 2) % 3]
        } else {
            vec![]
        };
        for k in kinds {
            match k {
                0 => self.backup_killed()?,
                _ => self.master_restarted(k == 1)?,
            }
        }
        self.quiet_sample()?;
        self.rec.cycle += 1;
        Ok(())
    }

    /// Backend `b`'s server stops until both balancers take it down, and comes back.
    fn health_flap(&mut self, b: usize) -> anyhow::Result<()> {
        let health_limit = Duration::from_millis(FALL * INTERVAL_MS + TIMEOUT_MS) + SLACK;
        let at = Instant::now();
        self.p.t.ctl[b].serving.store(false, Ordering::Relaxed);
        self.rec
            .window(Kind::HealthFlap, at, at + health_limit, Some(MAIN));
        let key = (format!("{VIP}:{TCP_PORT}/tcp"), backend_addr(b).to_string());
        let p = &self.p;
        let down = wait_for(Duration::from_secs(10), || {
            (0..2).all(|i| p.probes(i).get(&key) == Some(&false))
        });
        ensure!(down, "b{b} not taken down by both balancers");
        self.rec.detect.push(at.elapsed());
        std::thread::sleep(Duration::from_millis(500));
        let back = Instant::now();
        self.p.t.ctl[b].serving.store(true, Ordering::Relaxed);
        self.p.all_up()?;
        self.rec.recover.push(back.elapsed());
        self.rec
            .op("health flaps (server stopped, then started)", 1);
        Ok(())
    }

    /// Config churn through `maglb apply` on both: weights and idle VIPs.
    fn apply_changed(&mut self) -> anyhow::Result<()> {
        let prev = self.m.pairs();
        for w in self.m.weights.iter_mut() {
            *w = 1 + self.rng.below(3) as u32;
        }
        let n = self.rng.below(6) as u32;
        let cycle = self.rec.cycle as u32;
        let rng = &mut self.rng;
        self.m.idle = (0..n)
            .map(|k| (10 + ((cycle * 7 + k) % 40), 1 + rng.below(40) as u32))
            .collect::<BTreeMap<_, _>>()
            .into_iter()
            .collect();
        self.rec.peak_bound = self.rec.peak_bound.max(prev + self.m.pairs());
        self.p.apply(&self.m)?;
        self.rec
            .op("applies of a changed config (both balancers)", 1);
        Ok(())
    }

    /// The VIP with traffic on port 81 deleted and added again.
    fn port2_deleted_and_added(&mut self) -> anyhow::Result<()> {
        self.targets.lock().unwrap().retain(|t| *t != SECOND);
        let at = Instant::now();
        // Requests to it already sent finish first (or fail inside the window).
        std::thread::sleep(REQUEST_TIMEOUT / 4);
        let id = format!("{VIP}:{PORT2}/tcp");
        self.p.both(&["vip", "del", &id])?;
        self.m.port2 = false;
        let end = Instant::now() + Duration::from_millis(300);
        self.rec.window(Kind::VipDel, at, end, Some(SECOND));
        std::thread::sleep(Duration::from_millis(300));
        self.p.both(&["vip", "add", &id])?;
        for i in 0..BACKENDS {
            self.p
                .both(&["backend", "add", &id, &backend_addr(i).to_string()])?;
        }
        self.m.port2 = true;
        self.rec.peak_bound = self.rec.peak_bound.max(self.m.pairs());
        self.targets.lock().unwrap().push(SECOND);
        self.rec
            .op("deletes and adds of the VIP with traffic (port 81)", 1);
        Ok(())
    }

    /// Three VIPs without traffic added (five backends each) and deleted through the CLI.
    fn idle_vips_through_the_cli(&mut self) -> anyhow::Result<()> {
        let cycle = self.rec.cycle as u32;
        let id = |k: u32| format!("10.204.0.{}:80/tcp", 1 + (cycle * 3 + k) % 200);
        for k in 0..3u32 {
            self.p.both(&["vip", "add", &id(k)])?;
            self.p.both(&["vip", "health", &id(k), "--kind", "none"])?;
            for b in 0..5u32 {
                self.p
                    .both(&["backend", "add", &id(k), &format!("10.205.{k}.{}", b + 1)])?;
            }
            let peak = self.m.pairs() + 5 * (k as usize + 1);
            self.rec.peak_bound = self.rec.peak_bound.max(peak);
        }
        for k in 0..3u32 {
            self.p.both(&["vip", "del", &id(k)])?;
        }
        self.rec.op("VIP adds and deletes without traffic (CLI)", 6);
        Ok(())
    }

    /// Backend `b` removed, and added back: its flows end.
    fn backend_removed_and_added(&mut self, b: usize) -> anyhow::Result<()> {
        let vip = format!("{VIP}:{TCP_PORT}/tcp");
        let addr = backend_addr(b).to_string();
        let at = Instant::now();
        self.p.both(&["backend", "del", &vip, &addr])?;
        self.m.present[b] = false;
        let end = Instant::now() + Duration::from_millis(300);
        self.rec.window(Kind::BackendDel, at, end, Some(MAIN));
        std::thread::sleep(Duration::from_millis(300));
        let weight = self.m.weights[b].to_string();
        self.p
            .both(&["backend", "add", &vip, &addr, "--weight", &weight])?;
        self.m.present[b] = true;
        self.rec
            .op("backend removals and re-adds (both balancers)", 1);
        Ok(())
    }

    /// Waits until the router sends to `master`; a handover window from `at` until then.
    fn handed_over(&mut self, at: Instant, master: usize) -> anyhow::Result<()> {
        let settled = self.p.settle(master)?;
        self.rec.handover.push(settled - at);
        self.rec.window(Kind::Handover, at, settled + SLACK, None);
        Ok(())
    }

    /// A planned handover (`vrrp release`) and back (`vrrp claim`).
    fn planned_handover(&mut self) -> anyhow::Result<()> {
        let at = Instant::now();
        self.p.agent(0).ok(&["vrrp", "release"]);
        self.handed_over(at, 1)?;
        std::thread::sleep(Duration::from_millis(500));
        let at = Instant::now();
        self.p.agent(0).ok(&["vrrp", "claim"]);
        self.handed_over(at, 0)?;
        self.rec
            .op("planned handovers and back (vrrp release, claim)", 1);
        Ok(())
    }

    /// The backup's agent killed and started again.
    fn backup_killed(&mut self) -> anyhow::Result<()> {
        self.p.a[1].as_mut().expect("lb2").kill9();
        self.p.start(1)?;
        self.p.settle(0)?;
        self.rec.op("backup agent SIGKILL and restart", 1);
        Ok(())
    }

    /// The master's agent killed (`kill9`) or stopped, then started again: a failover and
    /// a failback.
    fn master_restarted(&mut self, kill9: bool) -> anyhow::Result<()> {
        let at = Instant::now();
        let lb1 = self.p.a[0].as_mut().expect("lb1");
        if kill9 {
            lb1.kill9();
        } else {
            lb1.stop();
        }
        self.handed_over(at, 1)?;
        std::thread::sleep(Duration::from_millis(500));
        let at = Instant::now();
        self.p.start(0)?;
        self.handed_over(at, 0)?;
        self.rec.op(
            if kill9 {
                "master agent SIGKILL and restart (failover, failback)"
            } else {
                "master agent SIGTERM and restart (handover, failback)"
            },
            1,
        );
        Ok(())
    }

    /// Quiet (every probe up on both): both agents sampled, and the samples checked.
    fn quiet_sample(&mut self) -> anyhow::Result<()> {
        self.p.all_up()?;
        std::thread::sleep(Duration::from_millis(200));
        let cycle = self.rec.cycle;
        for i in 0..2 {
            let s = self.p.sample(i, true)?;
            let lb = i + 1;
            let problems = &mut self.rec.problems;
            if !s.verify_clean {
                problems.push(format!(
                    "cycle {cycle}: `maglb verify` on lb{lb} found differences"
                ));
            }
            if !s.pinned_equal {
                problems.push(format!(
                    "cycle {cycle}: lb{lb}'s pinned maps differ from its state on disk"
                ));
            }
            if s.in_use != s.pairs || s.vip_entries != s.vips {
                problems.push(format!(
                    "cycle {cycle}: lb{lb}: {} slots in use for {} pairs, {} VIP entries for {} VIPs",
                    s.in_use, s.pairs, s.vip_entries, s.vips
                ));
            }
            if s.touched > lb_common::MAX_BACKENDS as usize {
                problems.push(format!(
                    "cycle {cycle}: lb{lb}: {} slots ever used, more than the map has",
                    s.touched
                ));
            }
            self.rec.samples.push(s);
        }
        Ok(())
    }
}

/// Every failed request against the windows: per kind, and those outside every window.
/// Windows overlap (each ends with a slack that reaches into the next event's): a request
/// inside several counts for the event made last, the one its failure followed.
fn classify(
    log: &[Request],
    windows: &[Window],
    t0: Instant,
) -> (BTreeMap<Kind, usize>, Vec<String>) {
    let inside = |r: &Request| -> Option<Kind> {
        windows
            .iter()
            .filter(|w| {
                r.start <= w.end && r.end >= w.start && w.target.is_none_or(|t| t == r.target)
            })
            .max_by_key(|w| w.start)
            .map(|w| w.kind)
    };
    let mut failed_in: BTreeMap<Kind, usize> = BTreeMap::new();
    let mut outside: Vec<String> = Vec::new();
    for r in log.iter().filter(|r| !r.ok()) {
        match inside(r) {
            Some(k) => *failed_in.entry(k).or_default() += 1,
            None => outside.push(format!(
                "{} at {:.3} s (took {} ms): {}",
                r.target,
                (r.start - t0.min(r.start)).as_secs_f64(),
                ms(r.end - r.start),
                r.result.as_ref().err().map_or("", String::as_str)
            )),
        }
    }
    (failed_in, outside)
}

/// One agent process over its samples: (lb number, pid, samples, spread of open fds, RSS
/// change in kB).
type Growth = (usize, u32, usize, usize, i64);

/// Bounded: per agent process, the spread of its open fds and its RSS over its samples;
/// what passes the bounds is a problem.
fn per_agent(samples: &[Sample], problems: &mut Vec<String>) -> Vec<Growth> {
    let mut by_pid: BTreeMap<(usize, u32), Vec<&Sample>> = BTreeMap::new();
    for s in samples {
        by_pid.entry((s.agent, s.pid)).or_default().push(s);
    }
    let mut growth = Vec::new();
    for ((agent, pid), v) in &by_pid {
        let fd_spread =
            v.iter().map(|s| s.fds).max().unwrap_or(0) - v.iter().map(|s| s.fds).min().unwrap_or(0);
        let rss: Vec<u64> = v.iter().map(|s| s.rss_kb).collect();
        let rss_growth = rss.last().copied().unwrap_or(0) as i64 - rss[0] as i64;
        growth.push((agent + 1, *pid, v.len(), fd_spread, rss_growth));
        if fd_spread > 16 {
            problems.push(format!(
                "lb{} (pid {pid}): open fds varied by {fd_spread} over {} samples",
                agent + 1,
                v.len()
            ));
        }
    }
    if let Some(max) = samples.iter().map(|s| s.rss_kb).max()
        && max > 256 * 1024
    {
        problems.push(format!("an agent reached {} MB RSS", max / 1024));
    }
    growth
}

/// Facts of a run for its report.
struct Facts {
    started_at: String,
    load_before: String,
    load_after: String,
    /// How long the churn was asked to last, and how long it took.
    minutes: f64,
    churn: Duration,
}

/// The report's head: the run, the operations, the requests and where they failed, and the
/// timings.
fn report_requests(
    r: &mut String,
    f: &Facts,
    rec: &Record,
    log: &[Request],
    failed_in: &BTreeMap<Kind, usize>,
    outside: usize,
) {
    let _ = writeln!(
        r,
        "## Soak (cargo xtask soak)\n\nWritten by `cargo xtask soak --minutes {:.0}` on {} ({} \
         cycles of churn in {:.1} min; load average {} before, {} after, on this 2-core \
         machine shared with other builds). `cargo xtask bench` keeps this section.\n",
        f.minutes,
        f.started_at,
        rec.cycle,
        f.churn.as_secs_f64() / 60.0,
        f.load_before,
        f.load_after,
    );
    let total = log.len();
    let failed = log.iter().filter(|r| !r.ok()).count();
    let per_target = |t: SocketAddr| log.iter().filter(|r| r.target == t).count();
    let _ = writeln!(
        r,
        "A VRRP pair (priorities 150 and 100, adverts every 100 ms) in namespaces, {BACKENDS} \
         backends with decap, real TCP traffic from a client through the router: one request \
         per new connection, one after another with a 3 ms pause, timeout {} s, to \
         {VIP}:{TCP_PORT} (checked every {INTERVAL_MS} ms, timeout {TIMEOUT_MS} ms, rise 2, \
         fall {FALL}) and, while it exists, {VIP}:{PORT2} (the default check). One event at a \
         time; every change is made on both balancers, as `maglb` commands or `maglb apply`.\n",
        REQUEST_TIMEOUT.as_secs()
    );
    let _ = writeln!(r, "| operation | count |\n|---|---|");
    for (k, n) in &rec.ops {
        let _ = writeln!(r, "| {k} | {n} |");
    }
    let _ = writeln!(
        r,
        "\n| requests | count |\n|---|---|\n| sent | {total} ({} to port {TCP_PORT}, {} to port {PORT2}) |\n| failed | {failed} |",
        per_target(MAIN),
        per_target(SECOND)
    );
    for (k, what) in [
        (
            Kind::HealthFlap,
            "inside a health-detection window (server stopped, until fall x interval + timeout + 1 s)",
        ),
        (
            Kind::Handover,
            "inside a handover window (until the router sends to the new master, + 1 s)",
        ),
        (Kind::BackendDel, "inside a backend removal (its flows end)"),
        (Kind::VipDel, "inside the deletion of the VIP on port 81"),
    ] {
        let _ = writeln!(
            r,
            "| failed {what} | {} |",
            failed_in.get(&k).copied().unwrap_or(0)
        );
    }
    let _ = writeln!(
        r,
        "| **failed outside every window** | **{}** |\n\nWindows overlap: each ends with a \
         slack that can reach into the next event's. A failed request inside several counts \
         for the event made last.",
        outside
    );
    let _ = writeln!(
        r,
        "\n| timing (min / median / max ms) | |\n|---|---|\n\
         | server stopped -> down on both balancers | {} |\n\
         | server started -> up on both balancers | {} |\n\
         | handover: event -> router sends to the new master | {} |\n",
        median_ms(&rec.detect),
        median_ms(&rec.recover),
        median_ms(&rec.handover)
    );
}

/// The report's samples: per agent, the ranges over the run, and per agent process its
/// growth.
fn report_samples(r: &mut String, rec: &Record, growth: &[Growth]) {
    let _ = writeln!(
        r,
        "| sampled after every cycle (quiet: every probe up) | lb1 | lb2 |\n|---|---|---|"
    );
    let col = |i: usize, f: &dyn Fn(&Sample) -> f64, d: usize| {
        fmt_range(
            rec.samples
                .iter()
                .filter(|s| s.agent == i)
                .map(f)
                .collect::<Vec<_>>()
                .into_iter(),
            d,
        )
    };
    type Field<'a> = (&'a str, &'a dyn Fn(&Sample) -> f64, usize);
    let fields: [Field; 6] = [
        ("agent RSS, MB", &|s| s.rss_kb as f64 / 1024.0, 1),
        ("agent open fds", &|s| s.fds as f64, 0),
        (
            "backend slots ever used (generation != 0)",
            &|s| s.touched as f64,
            0,
        ),
        ("backend slots in use", &|s| s.in_use as f64, 0),
        ("VIP-backend pairs in the state", &|s| s.pairs as f64, 0),
        ("VIP entries in the map", &|s| s.vip_entries as f64, 0),
    ];
    for (name, f, d) in fields {
        let _ = writeln!(r, "| {name} | {} | {} |", col(0, f, d), col(1, f, d));
    }
    let clean = |i: usize, f: &dyn Fn(&Sample) -> bool| {
        let v: Vec<&Sample> = rec.samples.iter().filter(|s| s.agent == i).collect();
        format!("{}/{}", v.iter().filter(|s| f(s)).count(), v.len())
    };
    let _ = writeln!(
        r,
        "| `maglb verify` clean | {} | {} |\n| pinned maps equal the state on disk | {} | {} |",
        clean(0, &|s| s.verify_clean),
        clean(1, &|s| s.verify_clean),
        clean(0, &|s| s.pinned_equal),
        clean(1, &|s| s.pinned_equal),
    );
    let _ = writeln!(
        r,
        "\nPer agent process (agents are restarted during the run): samples, spread of open \
         fds, RSS change from its first to its last sample:\n"
    );
    for (agent, pid, n, fds, rss) in growth {
        let _ = writeln!(
            r,
            "- lb{agent} pid {pid}: {n} samples, fds varied by {fds}, RSS {rss:+} kB"
        );
    }
    let _ = writeln!(
        r,
        "\nNo slot leaks: after every cycle the slots in use equal the VIP-backend pairs of the \
         state on disk, on both balancers (at most {} pairs were needed at once, \
         counting a change's old and new pairs together). Slots ever used grow by design: \
         freed slots go to the back of a first-in first-out list over all {} slots, so a \
         freed slot is reused as late as possible (a packet still reading an old table never \
         meets it reused at once); the control test reuses every slot.\n",
        rec.peak_bound,
        lb_common::MAX_BACKENDS
    );
}

/// The `## Soak` section of a BENCHMARKS.md, if it has one (up to the next `## ` heading).
pub fn section_of(doc: &str) -> Option<&str> {
    let start = doc
        .find("\n## Soak")
        .map(|i| i + 1)
        .or_else(|| doc.starts_with("## Soak").then_some(0))?;
    let rest = &doc[start..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 4);
    Some(&rest[..end])
}

/// `doc` with its `## Soak` section replaced by `section`, or `section` appended.
pub fn put_section(doc: &str, section: &str) -> String {
    let out = match section_of(doc) {
        Some(old) => doc.replacen(old, &format!("{}\n\n", section.trim_end()), 1),
        None => format!("{}\n\n{}", doc.trim_end(), section.trim_end()),
    };
    format!("{}\n", out.trim_end())
}

/// Fails the run with what it found.
pub fn check(s: &Summary) -> anyhow::Result<()> {
    if s.failed_outside > 0 || !s.problems.is_empty() {
        bail!(
            "soak: {} requests failed outside the fault windows; problems: {:#?}",
            s.failed_outside,
            s.problems
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soak_section_is_found_replaced_and_kept() {
        let doc = "# b\n\n## 1. x\n\nrow\n\n## Soak (cargo xtask soak)\n\nold\n\n## Limits\n\nz\n";
        assert_eq!(
            section_of(doc),
            Some("## Soak (cargo xtask soak)\n\nold\n\n")
        );
        let new = put_section(doc, "## Soak (cargo xtask soak)\n\nnew");
        assert_eq!(
            new,
            "# b\n\n## 1. x\n\nrow\n\n## Soak (cargo xtask soak)\n\nnew\n\n## Limits\n\nz\n"
        );
        let appended = put_section("# b\n", "## Soak\n\nfirst");
        assert_eq!(appended, "# b\n\n## Soak\n\nfirst\n");
        assert_eq!(section_of(&appended), Some("## Soak\n\nfirst\n"));
    }
}
