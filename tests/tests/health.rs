//! Health probes, backups and blue-green pools end to end, as root, in namespaces this test
//! creates: real servers on the backends are stopped, made to fail or hang, and the client's
//! traffic is watched. Everything is driven with `maglb` commands.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use maglb_tests::{
    agent::{Agent, Scratch, operated_topology},
    topology::{
        self, Conns, HEALTH_PORT, TCP_PORT, Topology, VIP, backend_addr, vip_addr, wait_for,
    },
};

const BIN: &str = env!("CARGO_BIN_EXE_maglb-cli");
/// Probe settings of these tests: every 200 ms, 150 ms timeout, 2 to rise, 2 to fall.
const INTERVAL: u64 = 200;
const TIMEOUT_MS: u64 = 150;
const RISE: u64 = 2;
const FALL: u64 = 2;
/// Scheduling and polling slack on top of what the probe settings allow.
const SLACK: Duration = Duration::from_millis(700);

fn vip() -> String {
    format!("{VIP}:{TCP_PORT}/tcp")
}

fn probe_args(kind: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "--kind",
        kind,
        "--interval-ms",
        "200",
        "--timeout-ms",
        "150",
        "--rise",
        "2",
        "--fall",
        "2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if kind == "http" {
        a.extend(
            [
                "--port",
                &HEALTH_PORT.to_string(),
                "--path",
                "/health",
                "--expect",
                "200",
            ]
            .map(String::from),
        );
    }
    a
}

/// A topology with one TCP VIP on `n` backends (extra `backend add` flags per backend) and
/// a health check of `kind`; waits until every backend has been probed up.
fn setup(tag: &str, scratch: &Scratch, flags: &[&[&str]], kind: &str) -> (Topology, Agent) {
    let (t, a) = operated_topology(Path::new(BIN), tag, scratch, flags.len());
    let v = vip();
    a.ok(&["vip", "add", &v]);
    for (i, f) in flags.iter().enumerate() {
        let b = backend_addr(i).to_string();
        let mut args = vec!["backend", "add", &v, &b];
        args.extend_from_slice(f);
        a.ok(&args);
    }
    let mut args = vec!["vip".to_string(), "health".into(), vip()];
    args.extend(probe_args(kind));
    a.ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    a.wait_ready();
    assert!(
        wait_for(Duration::from_secs(5), || health(&a)
            .values()
            .all(|(up, _, out)| *up && !*out)
            && health(&a).len() == flags.len()),
        "backends not probed up: {}",
        a.ok(&["health"])
    );
    (t, a)
}

/// Per backend address: (up, last result, out of the datapath's table), from
/// `maglb health --output json`.
fn health(a: &Agent) -> BTreeMap<IpAddr, (bool, String, bool)> {
    let v: serde_json::Value =
        serde_json::from_str(&a.ok(&["health", "--output", "json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            let h = p.get("health").filter(|h| !h.is_null())?;
            Some((
                p["backend"].as_str()?.parse().ok()?,
                (
                    h["up"].as_bool()?,
                    h["last"].as_str().unwrap_or("").to_owned(),
                    p["out_of_table"].as_bool()?,
                ),
            ))
        })
        .collect()
}

/// Backend `i`'s verdict once the datapath carries it (None before the first probe, and
/// while the writer has not applied the verdict yet).
fn is_up(a: &Agent, i: usize) -> Option<bool> {
    let (up, _, out) = health(a).get(&IpAddr::V4(backend_addr(i))).cloned()?;
    (up != out).then_some(up)
}

/// Waits until backend `i` is `up`; returns how long that took.
fn wait_state(a: &Agent, i: usize, up: bool, limit: Duration) -> Duration {
    let t = Instant::now();
    assert!(
        wait_for(limit, || is_up(a, i) == Some(up)),
        "b{i} not {} within {limit:?}: {}",
        if up { "up" } else { "down" },
        a.ok(&["health"])
    );
    t.elapsed()
}

/// Requests in a loop until stopped: (when, ok) for each.
struct Stream {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<(Instant, bool)>>>,
    handle: std::thread::JoinHandle<()>,
}

impl Stream {
    fn start(t: &Topology) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s, l) = (stop.clone(), log.clone());
        let handle = t
            .client
            .spawn(move || {
                for _ in 0..100_000 {
                    if s.load(Ordering::Relaxed) {
                        break;
                    }
                    let ok = topology::tcp_request(vip_addr(TCP_PORT), Duration::from_millis(500))
                        .is_ok();
                    l.lock().unwrap().push((Instant::now(), ok));
                    std::thread::sleep(Duration::from_millis(5));
                }
            })
            .unwrap();
        Self { stop, log, handle }
    }

    fn stop(self) -> Vec<(Instant, bool)> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap();
        Arc::try_unwrap(self.log).unwrap().into_inner().unwrap()
    }
}

#[test]
fn a_stopped_server_goes_down_in_time_and_comes_back() {
    let scratch = Scratch::new("hst");
    let (t, a) = setup("hst", &scratch, &[&[], &[], &[]], "tcp");
    let stream = Stream::start(&t);
    std::thread::sleep(Duration::from_millis(300));

    let stopped = Instant::now();
    t.ctl[1].serving.store(false, Ordering::Relaxed);
    let limit = Duration::from_millis(FALL * INTERVAL + TIMEOUT_MS) + SLACK;
    let took = wait_state(&a, 1, false, Duration::from_secs(5));
    println!("b1 stopped -> marked down after {took:?} (limit {limit:?})");
    assert!(
        took <= limit,
        "detection took {took:?}, more than {limit:?}"
    );
    let detected = Instant::now();
    assert!(
        health(&a)[&IpAddr::V4(backend_addr(1))]
            .1
            .contains("refused")
    );
    std::thread::sleep(Duration::from_millis(800));

    let restarted = Instant::now();
    t.ctl[1].serving.store(true, Ordering::Relaxed);
    let back = wait_state(&a, 1, true, Duration::from_secs(5));
    let limit = Duration::from_millis(RISE * INTERVAL + TIMEOUT_MS) + SLACK;
    println!("b1 restarted -> up after {back:?} (limit {limit:?})");
    assert!(back <= limit, "recovery took {back:?}, more than {limit:?}");
    std::thread::sleep(Duration::from_millis(300));
    let log = stream.stop();

    // Requests fail only between the stop and its detection (connections that the hash
    // sends to b1 are refused there); before and after, every one succeeds.
    let window = (stopped, detected + Duration::from_millis(100));
    let outside: Vec<_> = log
        .iter()
        .filter(|(at, _)| *at < window.0 || *at > window.1)
        .collect();
    let failed_outside = outside.iter().filter(|(_, ok)| !ok).count();
    println!(
        "{} requests, {} failed inside the detection window, {failed_outside} outside",
        log.len(),
        log.iter()
            .filter(|(at, ok)| !ok && *at >= window.0 && *at <= window.1)
            .count()
    );
    assert!(outside.len() > 100, "too few requests outside the window");
    assert_eq!(
        failed_outside, 0,
        "requests failed outside the detection window"
    );
    let _ = restarted;
    // And b1 takes new connections again.
    let (seen, failed) = t.tcp_requests(150);
    assert_eq!(failed, 0);
    assert!(seen.contains_key("b1"), "{seen:?}");
}

#[test]
fn http_probe_takes_out_503_and_hung_backends() {
    let scratch = Scratch::new("hht");
    let (t, a) = setup("hht", &scratch, &[&[], &[], &[]], "http");
    t.ctl[0].health_status.store(503, Ordering::Relaxed);
    wait_state(&a, 0, false, Duration::from_secs(3));
    // The default check goes over the tunnel here (the balancer carries it).
    assert_eq!(
        health(&a)[&IpAddr::V4(backend_addr(0))].1,
        "status 503 (over the tunnel)"
    );
    let (seen, failed) = t.tcp_requests(150);
    assert_eq!(failed, 0);
    assert!(
        !seen.contains_key("b0"),
        "503 backend still gets connections: {seen:?}"
    );
    t.ctl[0].health_status.store(200, Ordering::Relaxed);
    wait_state(&a, 0, true, Duration::from_secs(3));

    // Accepts the connection, never answers: only the probe's timeout catches it.
    t.ctl[2].hang.store(true, Ordering::Relaxed);
    wait_state(&a, 2, false, Duration::from_secs(3));
    assert!(
        health(&a)[&IpAddr::V4(backend_addr(2))]
            .1
            .starts_with("timeout")
    );
    let (seen, failed) = t.tcp_requests(150);
    assert_eq!(failed, 0);
    assert!(
        !seen.contains_key("b2") && seen.contains_key("b0"),
        "{seen:?}"
    );
    // The other backends kept being probed on time meanwhile.
    assert!(is_up(&a, 0) == Some(true) && is_up(&a, 1) == Some(true));
    let list = a.ok(&["backend", "list"]);
    assert!(list.contains("down") && list.contains("timeout"), "{list}");
}

#[test]
fn backups_serve_only_while_every_primary_is_down() {
    let scratch = Scratch::new("hbk");
    let (t, a) = setup("hbk", &scratch, &[&[], &[], &["--backup"]], "tcp");
    let (seen, failed) = t.tcp_requests(200);
    assert_eq!(failed, 0);
    assert!(
        !seen.contains_key("b2"),
        "the backup serves while primaries are up: {seen:?}"
    );

    t.ctl[0].serving.store(false, Ordering::Relaxed);
    t.ctl[1].serving.store(false, Ordering::Relaxed);
    wait_state(&a, 0, false, Duration::from_secs(3));
    wait_state(&a, 1, false, Duration::from_secs(3));
    let (seen, failed) = t.tcp_requests(200);
    assert_eq!(failed, 0, "{seen:?}");
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["b2"], "{seen:?}");

    t.ctl[0].serving.store(true, Ordering::Relaxed);
    wait_state(&a, 0, true, Duration::from_secs(3));
    let (seen, failed) = t.tcp_requests(200);
    assert_eq!(failed, 0);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["b0"],
        "traffic not given back: {seen:?}"
    );

    // Every backend down: the VIP's packets are dropped and counted, not passed.
    t.ctl[0].serving.store(false, Ordering::Relaxed);
    t.ctl[2].serving.store(false, Ordering::Relaxed);
    wait_state(&a, 0, false, Duration::from_secs(3));
    wait_state(&a, 2, false, Duration::from_secs(3));
    let drops = |a: &Agent| {
        let v: serde_json::Value =
            serde_json::from_str(&a.ok(&["stats", "--output", "json"])).unwrap();
        (
            v["global"]["drop_no_backend"]["packets"].as_u64().unwrap(),
            v["global"]["pass_vip_other"]["packets"].as_u64().unwrap(),
        )
    };
    let before = drops(&a);
    let (seen, failed) = t.tcp_requests(3);
    assert_eq!((seen.len(), failed), (0, 3));
    let after = drops(&a);
    assert!(
        after.0 > before.0,
        "drops not counted: {before:?} -> {after:?}"
    );
    assert_eq!(after.1, before.1, "VIP packets were passed to the host");
}

#[test]
fn blue_green_switch_moves_new_connections_only() {
    let scratch = Scratch::new("hbg");
    let blue: &[&str] = &["--pool", "blue"];
    let green: &[&str] = &["--pool", "green"];
    let (t, a) = setup("hbg", &scratch, &[blue, blue, green], "tcp");
    a.ok(&["vip", "switch", &vip(), "--to", "blue"]);
    let (seen, failed) = t.tcp_requests(200);
    assert_eq!(failed, 0);
    assert!(!seen.contains_key("b2"), "{seen:?}");

    let mut conns = t
        .client
        .run(|| Conns::open(30, vip_addr(TCP_PORT), Duration::from_secs(2)))
        .unwrap()
        .unwrap();
    a.ok(&["vip", "switch", &vip(), "--to", "green"]);
    let (seen, failed) = t.tcp_requests(200);
    assert_eq!(failed, 0);
    assert_eq!(
        seen.keys().collect::<Vec<_>>(),
        ["b2"],
        "new connections not all on green: {seen:?}"
    );
    let broken = t.client.run(move || {
        let b = conns.broken();
        (b, conns)
    });
    let (broken, c) = broken.unwrap();
    conns = c;
    assert!(
        broken.is_empty(),
        "blue connections broke at the switch: {broken:?}"
    );

    // Canary back to blue: a quarter, then all of it (the rollback).
    a.ok(&["vip", "switch", &vip(), "--to", "blue", "--percent", "25"]);
    let (seen, failed) = t.tcp_requests(600);
    assert_eq!(failed, 0);
    let blue_share = (seen.get("b0").unwrap_or(&0) + seen.get("b1").unwrap_or(&0)) as f64 / 600.0;
    println!(
        "canary 25% blue: {seen:?} -> {:.1}% blue",
        blue_share * 100.0
    );
    assert!((blue_share - 0.25).abs() < 0.07, "{seen:?}");
    a.ok(&["vip", "switch", &vip(), "--to", "blue"]);
    let (seen, failed) = t.tcp_requests(200);
    assert_eq!(failed, 0);
    assert!(!seen.contains_key("b2"), "{seen:?}");
    drop(conns);
}
