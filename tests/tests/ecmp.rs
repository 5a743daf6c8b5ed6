//! Active/active fleets behind ECMP, end to end, as root, in namespaces this test creates:
//! a router running BIRD with ECMP (L4 hash) over BGP sessions with BFD (100 ms × 3) to
//! three balancers; each balancer runs `maglb agent` with the same configuration and its
//! own BIRD, which exports the routes the agent keeps in table 4242. Three backends (maglb
//! decap), a client with a steady stream of new connections and 24 long-lived ones.

use std::{
    net::Ipv4Addr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use maglb_tests::{
    agent::{Agent, Scratch, attach_decaps},
    ecmp::{Bird, Fleet, RouteWatch, balancer_addr, balancer_conf, router_conf, set_link},
    netns::require_root,
    topology::{self, Conns, HEALTH_PORT, LB_IF, TCP_PORT, backend_addr, vip_addr, wait_for},
};

const BIN: &str = env!("CARGO_BIN_EXE_maglb-cli");
/// The graceful-leave wait the balancers use.
const WITHDRAW_WAIT_MS: u32 = 1500;
/// BFD 100 ms × 3 declares a lost balancer down 300 ms after its last packet; BIRD then
/// updates the kernel route. The router must have moved off a lost balancer within this:
/// detection plus 200 ms for the route update on a shared, loaded test machine (the measured
/// time is printed; it is 240-300 ms on a quiet one). A BGP hold time (seconds) would fail.
const CONVERGE: Duration = Duration::from_millis(500);

/// The balancers' configuration. The VIP's check tolerates a busy test machine (a probe
/// waits 400 ms, three misses in a row take a backend down): these tests are about routing,
/// and a backend one balancer took down on a stalled probe moves that balancer's flows to it
/// elsewhere (resets). A failing check (503) is still seen within three intervals.
fn config() -> String {
    let mut c = format!(
        "[balancer]\ninterface = \"{LB_IF}\"\n\n[bgp]\nwithdraw_wait_ms = {WITHDRAW_WAIT_MS}\n\n\
         [[vip]]\naddress = \"{}:{TCP_PORT}/tcp\"\n\n  [vip.health]\n  kind = \"http\"\n  \
         port = {HEALTH_PORT}\n  path = \"/health\"\n  interval_ms = 500\n  timeout_ms = 400\n  \
         rise = 2\n  fall = 3\n\n",
        topology::VIP
    );
    for i in 0..3 {
        c += &format!("  [[vip.backend]]\n  address = \"{}\"\n", backend_addr(i));
    }
    c
}

/// One balancer's processes and files (dropped in this order: agent, BIRD, files).
struct Member {
    agent: Option<Agent>,
    bird: Option<Bird>,
    _scratch: Scratch,
}

struct Setup {
    members: Vec<Option<Member>>,
    router: Bird,
    _decaps: Scratch,
    fleet: Fleet,
}

impl Setup {
    fn new(tag: &str, balancers: usize) -> Self {
        require_root();
        let decaps = Scratch::new(&format!("{tag}d"));
        let fleet = Fleet::build(tag, 3).expect("fleet topology");
        attach_decaps(Path::new(BIN), &fleet.t, &decaps);
        let dir = decaps.0.dir.clone();
        let router = Bird::start(
            &fleet.t.router,
            &dir,
            "router",
            &router_conf(&dir.join("router.log"), maglb_tests::ecmp::MAX_BALANCERS),
        )
        .expect("router bird");
        let mut s = Setup {
            members: (0..maglb_tests::ecmp::MAX_BALANCERS)
                .map(|_| None)
                .collect(),
            router,
            _decaps: decaps,
            fleet,
        };
        for i in 0..balancers {
            s.join(tag, i);
        }
        let want: Vec<Ipv4Addr> = (0..balancers).map(balancer_addr).collect();
        s.wait_nexthops(&want, Duration::from_secs(20));
        s
    }

    /// Starts balancer `i`: namespace (beyond 0), agent with the common config, BIRD.
    fn join(&mut self, tag: &str, i: usize) {
        if i > 0 && self.fleet.balancers[i].is_none() {
            self.fleet.add_balancer(i).expect("balancer namespace");
        }
        let scratch = Scratch::new(&format!("{tag}{i}"));
        let ns = self.fleet.lb(i);
        let agent = Agent::start(Path::new(BIN), ns, &scratch.0).expect("agent");
        let f = scratch.0.dir.join("maglb.toml");
        std::fs::write(&f, config()).unwrap();
        agent.ok(&["apply", "-f", f.to_str().unwrap()]);
        agent.wait_ready();
        let bird = Bird::start(
            ns,
            &scratch.0.dir,
            "bird",
            &balancer_conf(&scratch.0.dir.join("bird.log"), i),
        )
        .expect("balancer bird");
        self.members[i] = Some(Member {
            agent: Some(agent),
            bird: Some(bird),
            _scratch: scratch,
        });
    }

    fn member(&mut self, i: usize) -> &mut Member {
        self.members[i].as_mut().expect("member")
    }

    fn agent(&self, i: usize) -> &Agent {
        self.members[i]
            .as_ref()
            .and_then(|m| m.agent.as_ref())
            .expect("agent")
    }

    /// Prints the agent logs of balancers `which` when connections broke: what each saw
    /// (health changes, next-hop updates) says why.
    fn print_logs_if_broken(&self, broken: &[String], which: &[usize]) {
        if broken.is_empty() {
            return;
        }
        for i in which {
            println!("=== lb{i}'s agent log:\n{}", self.agent(*i).log());
        }
    }

    fn wait_nexthops(&self, want: &[Ipv4Addr], limit: Duration) -> Duration {
        let t = Instant::now();
        let mut want = want.to_vec();
        want.sort();
        assert!(
            wait_for(limit, || self.fleet.nexthops() == want),
            "router next hops {:?}, expected {want:?}\nrouter: {}\n{}",
            self.fleet.nexthops(),
            self.router.birdc(&["show", "protocols"]),
            self.diagnostics()
        );
        t.elapsed()
    }

    fn diagnostics(&self) -> String {
        let mut out = String::new();
        for (i, m) in self.members.iter().enumerate() {
            let Some(m) = m else { continue };
            if let Some(a) = &m.agent {
                out += &format!(
                    "--- lb{i} bgp status:\n{}\n",
                    String::from_utf8_lossy(&a.cli(&["bgp", "status"]).stdout)
                );
            }
            if let Some(b) = &m.bird {
                out += &format!("--- lb{i} bird:\n{}\n", b.birdc(&["show", "route", "all"]));
            }
            out += &format!(
                "--- lb{i} table 4242: {}\n",
                self.fleet
                    .lb(i)
                    .ip(&["route", "show", "table", "4242"])
                    .unwrap_or_default()
            );
        }
        out
    }

    /// The VIP's packet counter on balancer `i`.
    fn vip_packets(&self, i: usize) -> u64 {
        let out = self.agent(i).ok(&["stats", "--output", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["vips"][0]["packets"].as_u64().unwrap_or(0)
    }

    /// Long-lived connections from the client, and which balancer each one goes through
    /// (found by asking on each one alone and watching the balancers' counters).
    fn long_conns(&self, n: usize, balancers: &[usize]) -> (Conns, Vec<usize>) {
        let mut conns = self
            .fleet
            .t
            .client
            .run(move || Conns::open(n, vip_addr(TCP_PORT), Duration::from_secs(5)))
            .unwrap()
            .expect("long-lived connections");
        let mut via = Vec::new();
        for (c, _) in conns.0.iter_mut() {
            let before: Vec<u64> = balancers.iter().map(|i| self.vip_packets(*i)).collect();
            c.ask().expect("ask");
            let after: Vec<u64> = balancers.iter().map(|i| self.vip_packets(*i)).collect();
            let k = (0..balancers.len())
                .find(|k| after[*k] > before[*k])
                .map_or(usize::MAX, |k| balancers[k]);
            via.push(k);
        }
        (conns, via)
    }
}

/// One new connection's request.
struct Request {
    start: Instant,
    took: Duration,
    ok: bool,
}

/// New connections in a loop on one thread, the long-lived ones asked every 50 ms on
/// another (so a stalled long-lived connection does not pause the new ones), until stopped.
struct Traffic {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<Vec<Request>>>,
    long: std::thread::JoinHandle<Vec<String>>,
}

/// Threads making new connections (each waits for its request, so one lost SYN stalls
/// it for a second; several keep requests starting throughout a convergence window).
const STREAMS: usize = 3;

impl Traffic {
    fn start(s: &Setup, mut conns: Conns) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..STREAMS)
            .map(|_| {
                let st = stop.clone();
                s.fleet
                    .t
                    .client
                    .spawn(move || {
                        let mut reqs = Vec::new();
                        for _ in 0..100_000 {
                            if st.load(Ordering::Relaxed) {
                                break;
                            }
                            let start = Instant::now();
                            let ok =
                                topology::tcp_request(vip_addr(TCP_PORT), Duration::from_secs(5))
                                    .is_ok();
                            reqs.push(Request {
                                start,
                                took: start.elapsed(),
                                ok,
                            });
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        reqs
                    })
                    .unwrap()
            })
            .collect();
        let st = stop.clone();
        let long = std::thread::spawn(move || {
            let mut broken = Vec::new();
            for _ in 0..10_000 {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                broken.extend(conns.broken());
                std::thread::sleep(Duration::from_millis(50));
            }
            broken.extend(conns.broken());
            broken
        });
        Self {
            stop,
            handles,
            long,
        }
    }

    /// Stops; returns the requests and the broken connections (each once, with the first
    /// error seen on it).
    fn stop(self) -> (Vec<Request>, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut reqs: Vec<Request> = self
            .handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        reqs.sort_by_key(|r| r.start);
        let broken = self.long.join().unwrap();
        let mut seen = std::collections::BTreeSet::new();
        let broken = broken
            .into_iter()
            .filter(|b| seen.insert(b.split(" on ").next().unwrap_or(b).to_owned()))
            .collect();
        (reqs, broken)
    }
}

/// Failed requests, and requests slowed by a lost packet (a retransmission: 200 ms or
/// more), with their start relative to `t0` in ms.
fn affected(reqs: &[Request], t0: Instant) -> (usize, Vec<(i64, u128, bool)>) {
    let rel = |t: Instant| {
        if t >= t0 {
            (t - t0).as_millis() as i64
        } else {
            -((t0 - t).as_millis() as i64)
        }
    };
    let failed = reqs.iter().filter(|r| !r.ok).count();
    let hit = reqs
        .iter()
        .filter(|r| !r.ok || r.took >= Duration::from_millis(200))
        .map(|r| (rel(r.start), r.took.as_millis(), r.ok))
        .collect();
    (failed, hit)
}

/// A balancer is lost (`how`), the router converges through BFD; connections that went
/// through it continue through the others.
fn node_loss(s: &mut Setup, lost: usize, how: &str, alive: &[usize]) {
    let all = alive.to_vec();
    let (long, via) = s.long_conns(24, &all);
    let on_lost = via.iter().filter(|v| **v == lost).count();
    let spread: Vec<usize> = all
        .iter()
        .map(|b| via.iter().filter(|v| **v == *b).count())
        .collect();
    assert!(
        spread.iter().all(|n| *n > 0),
        "the long-lived connections do not spread over the balancers: {spread:?}"
    );
    let watch = RouteWatch::start(&s.fleet.t.router).unwrap();
    let traffic = Traffic::start(s, long);
    std::thread::sleep(Duration::from_millis(700));
    // The moment of the loss, taken as close as possible to the call that causes it.
    let (t0, cut) = match how {
        "link cut" => set_link(s.fleet.lb(lost), LB_IF, false).unwrap(),
        "SIGKILL agent and BIRD" => {
            // Taken just before: the dying BIRD's sockets close before `kill9` returns.
            let at = (Instant::now(), SystemTime::now());
            let m = s.member(lost);
            m.bird.as_mut().unwrap().kill9();
            m.agent.as_mut().unwrap().kill9();
            at
        }
        "BIRD hangs (SIGSTOP)" => {
            let at = (Instant::now(), SystemTime::now());
            s.member(lost).bird.as_ref().unwrap().signal(libc::SIGSTOP);
            at
        }
        _ => unreachable!(),
    };
    let lost_addr = balancer_addr(lost);
    assert!(
        wait_for(Duration::from_secs(3), || watch
            .lost_at(cut, lost_addr)
            .is_some()),
        "the router kept {lost_addr}: {:?}\n{}",
        s.fleet.nexthops(),
        s.router.birdc(&["show", "protocols"])
    );
    let converged = watch
        .lost_at(cut, lost_addr)
        .unwrap()
        .duration_since(cut)
        .unwrap_or_default();
    std::thread::sleep(Duration::from_millis(1500));
    let (reqs, broken) = traffic.stop();
    let (failed, hit) = affected(&reqs, t0);
    println!(
        "node loss ({how}) of lb{lost}: router converged in {} ms; {} requests, {failed} failed, \
         {} slowed or failed [start ms after the cut, took ms, ok]: {hit:?}; {on_lost} of {} \
         long-lived connections were on it (spread {spread:?}), {} broken",
        converged.as_millis(),
        reqs.len(),
        hit.len(),
        via.len(),
        broken.len()
    );
    s.print_logs_if_broken(&broken, alive);
    assert!(broken.is_empty(), "broken connections: {broken:?}");
    assert!(
        converged <= CONVERGE,
        "the router took {converged:?} to drop {lost_addr}, more than {CONVERGE:?}"
    );
    // Requests may fail or stall only if they started inside the convergence window (or
    // were in flight when it opened).
    let window = -100..=(converged.as_millis() as i64 + 5);
    let outside: Vec<_> = hit.iter().filter(|h| !window.contains(&h.0)).collect();
    assert!(
        outside.is_empty(),
        "requests affected outside the convergence window {window:?}: {outside:?}"
    );
}

#[test]
fn node_loss_converges_within_bfd_time_and_keeps_connections() {
    let mut s = Setup::new("ecl", 3);
    node_loss(&mut s, 1, "link cut", &[0, 1, 2]);
    // lb1 comes back, and is used again.
    set_link(s.fleet.lb(1), LB_IF, true).unwrap();
    // The kernel dropped the routes through the interface with its link.
    s.fleet
        .lb(1)
        .ip(&["route", "replace", "default", "via", "10.10.2.1"])
        .unwrap();
    let back = s.wait_nexthops(
        &[balancer_addr(0), balancer_addr(1), balancer_addr(2)],
        Duration::from_secs(20),
    );
    println!(
        "lb1 back in the router's route {} ms after link up",
        back.as_millis()
    );
    // A killed BIRD's BGP connection closes at once; BFD is the backstop for a host that
    // stops answering, which a hung BIRD shows.
    node_loss(&mut s, 2, "SIGKILL agent and BIRD", &[0, 1, 2]);
    node_loss(&mut s, 0, "BIRD hangs (SIGSTOP)", &[0, 1]);
}

#[test]
fn planned_removal_and_a_fourth_balancer_lose_nothing() {
    let mut s = Setup::new("ecp", 3);
    // SIGTERM: withdraw first, forward on while the router stops sending, then stop.
    let (long, via) = s.long_conns(24, &[0, 1, 2]);
    let on1 = via.iter().filter(|v| **v == 1).count();
    let watch = RouteWatch::start(&s.fleet.t.router).unwrap();
    let traffic = Traffic::start(&s, long);
    std::thread::sleep(Duration::from_millis(700));
    let (t0, term) = (Instant::now(), SystemTime::now());
    s.member(1).agent.as_mut().unwrap().stop();
    let exited = t0.elapsed();
    let gone = watch
        .lost_at(term, balancer_addr(1))
        .map(|t| t.duration_since(term).unwrap_or_default())
        .expect("the router still routes to lb1 after its agent stopped");
    std::thread::sleep(Duration::from_millis(500));
    let (reqs, broken) = traffic.stop();
    let (failed, hit) = affected(&reqs, t0);
    println!(
        "planned removal (SIGTERM) of lb1: router dropped it after {} ms, the agent exited after \
         {} ms (withdraw wait {WITHDRAW_WAIT_MS} ms); {} requests, {failed} failed, slowed: \
         {hit:?}; {on1} long-lived connections were on lb1, {} broken",
        gone.as_millis(),
        exited.as_millis(),
        reqs.len(),
        broken.len()
    );
    assert_eq!((failed, broken.len()), (0, 0), "{broken:?}");
    assert!(
        gone < exited,
        "the agent exited before the router stopped sending to it"
    );
    assert_eq!(s.fleet.nexthops(), [balancer_addr(0), balancer_addr(2)]);

    // A new balancer joins: the router rehashes flows over three balancers again, and the
    // new one picks the same backends from its Maglev table.
    let (long, via) = s.long_conns(24, &[0, 2]);
    let traffic = Traffic::start(&s, long);
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    s.join("ecp", 3);
    let joined = s.wait_nexthops(
        &[balancer_addr(0), balancer_addr(2), balancer_addr(3)],
        Duration::from_secs(20),
    );
    std::thread::sleep(Duration::from_millis(1000));
    let (reqs, broken) = traffic.stop();
    let (failed, hit) = affected(&reqs, t0);
    let moved = s.vip_packets(3);
    println!(
        "4th balancer: in the router's route {} ms after it started; {} requests, {failed} \
         failed, slowed: {hit:?}; {} long-lived connections (on lb0/lb2: {:?}), {} broken; \
         lb3 carried {moved} packets",
        joined.as_millis(),
        reqs.len(),
        via.len(),
        [0, 2].map(|b| via.iter().filter(|v| **v == b).count()),
        broken.len()
    );
    s.print_logs_if_broken(&broken, &[0, 2, 3]);
    assert_eq!((failed, broken.len()), (0, 0), "{broken:?}");
    assert!(moved > 0, "the new balancer took no traffic");
}

#[test]
fn health_drives_announcements_and_operators_withdraw() {
    let s = Setup::new("ech", 3);
    let all = [balancer_addr(0), balancer_addr(1), balancer_addr(2)];
    let status = |i: usize| -> serde_json::Value {
        serde_json::from_str(&s.agent(i).ok(&["bgp", "status", "--output", "json"])).unwrap()
    };
    for i in 0..3 {
        assert_eq!(
            status(i)["addresses"][0]["announced"],
            true,
            "{}",
            status(i)
        );
    }
    // Every backend of the VIP fails its check: every balancer withdraws it.
    let t0 = Instant::now();
    for c in &s.fleet.t.ctl {
        c.health_status.store(503, Ordering::Relaxed);
    }
    assert!(
        wait_for(Duration::from_secs(5), || s.fleet.nexthops().is_empty()),
        "the VIP is still routed: {:?}\n{}",
        s.fleet.nexthops(),
        s.diagnostics()
    );
    println!(
        "all backends down: withdrawn everywhere after {} ms",
        t0.elapsed().as_millis()
    );
    for i in 0..3 {
        let st = status(i);
        assert_eq!(st["addresses"][0]["announced"], false, "{st}");
        assert!(
            st["addresses"][0]["reason"]
                .as_str()
                .unwrap()
                .contains("0 live"),
            "{st}"
        );
    }
    println!("{}", s.agent(0).ok(&["bgp", "status"]));
    let metric = |i: usize| {
        s.fleet
            .lb(i)
            .exec("curl", &["-s", "http://127.0.0.1:9477/metrics"])
            .unwrap()
            .lines()
            .find(|l| l.starts_with("maglb_bgp_announced{"))
            .map(str::to_owned)
    };
    let want = format!(
        "maglb_bgp_announced{{vip=\"{}:{TCP_PORT}/tcp\"}}",
        topology::VIP
    );
    assert_eq!(metric(0), Some(format!("{want} 0")));
    // One comes back: announced again by every balancer.
    let t0 = Instant::now();
    s.fleet.t.ctl[1].health_status.store(200, Ordering::Relaxed);
    s.wait_nexthops(&all, Duration::from_secs(5));
    println!(
        "one backend back: announced everywhere after {} ms",
        t0.elapsed().as_millis()
    );
    assert_eq!(metric(1), Some(format!("{want} 1")));
    assert_eq!(
        s.fleet
            .t
            .client
            .run(|| topology::tcp_request(vip_addr(TCP_PORT), Duration::from_secs(3)))
            .unwrap()
            .expect("a request once announced"),
        "b1"
    );

    // An operator withdraws one balancer: the command returns once the router has stopped
    // sending to it, and announce brings it back.
    let t0 = Instant::now();
    let out = s.agent(2).ok(&["bgp", "withdraw"]);
    let took = t0.elapsed();
    assert_eq!(
        s.fleet.nexthops(),
        [balancer_addr(0), balancer_addr(1)],
        "{out}"
    );
    assert!(
        took >= Duration::from_millis(WITHDRAW_WAIT_MS as u64),
        "{out}"
    );
    let st = status(2);
    assert_eq!(st["withdrawn_by_operator"], true);
    s.agent(2).ok(&["bgp", "announce"]);
    s.wait_nexthops(&all, Duration::from_secs(5));
}

/// The BIRD configurations shipped in packaging/ parse.
#[test]
fn packaged_bird_configs_parse() {
    for f in ["balancer.conf", "router.conf"] {
        let path = format!("{}/../packaging/bird/{f}", env!("CARGO_MANIFEST_DIR"));
        let out = std::process::Command::new("bird")
            .args(["-p", "-c", &path])
            .output()
            .expect("bird (Debian package bird2; `cargo xtask setup`)");
        assert!(
            out.status.success(),
            "{f}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
