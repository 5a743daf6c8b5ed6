//! Adaptive weights end to end, as root, in namespaces this test creates: three HTTP-checked
//! backends of a VIP with `adaptive_weights`; one is made slow (its health endpoint and its
//! service wait 100 ms before answering), gets measurably fewer new flows, and gets them back
//! when it is fast again, with a bounded number of weight changes. Driven with `maglb`
//! commands; the weights are read from `maglb backend list` and the metrics.

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    path::Path,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use maglb_tests::{
    agent::{Agent, Scratch, operated_topology},
    topology::{self, HEALTH_PORT, TCP_PORT, Topology, VIP, backend_addr, vip_addr, wait_for},
};

const BIN: &str = env!("CARGO_BIN_EXE_maglb-cli");
/// New connections per measurement of the shares.
const FLOWS: usize = 300;
/// The slow backend's delay.
const DELAY_MS: u64 = 100;

fn vip() -> String {
    format!("{VIP}:{TCP_PORT}/tcp")
}

/// Effective weight per backend, from `maglb backend list --output json`.
fn effective(a: &Agent) -> BTreeMap<String, f64> {
    let v: serde_json::Value =
        serde_json::from_str(&a.ok(&["backend", "list", &vip(), "--output", "json"])).unwrap();
    v[0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| {
            (
                b["address"].as_str().unwrap().to_owned(),
                b["effective_weight"].as_f64().unwrap(),
            )
        })
        .collect()
}

fn scrape(t: &Topology) -> String {
    t.lb.run(|| -> std::io::Result<String> {
        let mut s = std::net::TcpStream::connect("127.0.0.1:9477")?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .unwrap()
    .expect("scrape")
}

/// A backend's sample of a metric family with `vip` and `backend` labels (0 when absent).
fn sample(text: &str, family: &str, backend: usize) -> f64 {
    let prefix = format!(
        "{family}{{vip=\"{}\",backend=\"{}\"}} ",
        vip(),
        backend_addr(backend)
    );
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

/// Weight changes per backend, from `maglb_backend_weight_changes_total`.
fn changes(t: &Topology) -> [f64; 3] {
    let text = scrape(t);
    [0, 1, 2].map(|i| sample(&text, "maglb_backend_weight_changes_total", i))
}

/// New connections per backend name, out of `FLOWS`.
fn shares(t: &Topology) -> BTreeMap<String, usize> {
    t.client
        .run(|| {
            let mut seen = BTreeMap::new();
            for _ in 0..FLOWS {
                let b = topology::tcp_request(vip_addr(TCP_PORT), Duration::from_secs(2))
                    .unwrap_or_else(|_| "-".into());
                *seen.entry(b).or_insert(0) += 1;
            }
            seen
        })
        .unwrap()
}

fn share(s: &BTreeMap<String, usize>, b: &str) -> f64 {
    *s.get(b).unwrap_or(&0) as f64 / FLOWS as f64
}

/// Waits until backend 1's effective weight is `w`; returns how long that took.
fn wait_weight(a: &Agent, w: f64, limit: Duration) -> Duration {
    let start = Instant::now();
    let ok = wait_for(limit, || {
        effective(a)
            .get(&backend_addr(1).to_string())
            .is_some_and(|e| (e - w).abs() < 1e-9)
    });
    assert!(
        ok,
        "b1's effective weight did not reach {w} within {limit:?}: {}\n{}",
        a.ok(&["backend", "list"]),
        a.log()
    );
    start.elapsed()
}

#[test]
fn a_slow_backend_gets_fewer_new_flows_until_it_is_fast_again() {
    let scratch = Scratch::new("adw");
    let (t, a) = operated_topology(Path::new(BIN), "adw", &scratch, 3);
    let v = vip();
    a.ok(&["vip", "add", &v, "--adaptive-weights"]);
    for i in 0..3 {
        a.ok(&["backend", "add", &v, &backend_addr(i).to_string()]);
    }
    let port = HEALTH_PORT.to_string();
    a.ok(&[
        "vip",
        "health",
        &v,
        "--kind",
        "http",
        "--port",
        &port,
        "--path",
        "/health",
        "--interval-ms",
        "200",
        "--timeout-ms",
        "200",
        "--rise",
        "2",
        "--fall",
        "3",
    ]);
    a.wait_ready();
    assert!(
        wait_for(Duration::from_secs(10), || {
            let h: serde_json::Value =
                serde_json::from_str(&a.ok(&["health", "--output", "json"])).unwrap();
            h.as_array()
                .unwrap()
                .iter()
                .filter(|p| p["health"]["up"].as_bool() == Some(true))
                .count()
                == 3
        }),
        "backends not probed up: {}",
        a.ok(&["health"])
    );
    // Warm up the latency averages.
    std::thread::sleep(Duration::from_secs(2));
    let before = shares(&t);
    println!("shares before: {before:?}");
    assert!(
        share(&before, "b1") > 0.2,
        "b1 should take about a third: {before:?}"
    );

    t.ctl[1].delay_ms.store(DELAY_MS, Ordering::Relaxed);
    let down = wait_weight(&a, 0.1, Duration::from_secs(15));
    println!("b1 slow ({DELAY_MS} ms): effective weight at the floor (0.1) after {down:?}");
    // It stays there while it is slow.
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(effective(&a)[&backend_addr(1).to_string()], 0.1);
    let slow = shares(&t);
    println!("shares while b1 is slow: {slow:?}");
    println!("{}", a.ok(&["backend", "list"]));
    let text = scrape(&t);
    assert_eq!(
        sample(&text, "maglb_backend_effective_weight", 1),
        0.1,
        "metric"
    );
    assert_eq!(sample(&text, "maglb_backend_weight", 1), 1.0, "metric");
    let (b1_before, b1_slow) = (share(&before, "b1"), share(&slow, "b1"));
    assert!(
        b1_slow < 0.12 && b1_slow < b1_before / 3.0,
        "b1 took {b1_slow:.3} of new flows while slow (before: {b1_before:.3})"
    );
    assert!(!slow.contains_key("-"), "requests failed: {slow:?}");

    t.ctl[1].delay_ms.store(0, Ordering::Relaxed);
    let up = wait_weight(&a, 1.0, Duration::from_secs(20));
    println!("b1 fast again: effective weight back to 1 after {up:?}");
    std::thread::sleep(Duration::from_secs(3));
    let after = shares(&t);
    println!("shares after recovery: {after:?}");
    assert!(
        share(&after, "b1") > 0.2,
        "b1 should take about a third again: {after:?}"
    );

    // Three steps down (50%, 25%, 10%), three back up, none for the others: no flapping.
    let n = changes(&t);
    println!("weight changes per backend: {n:?}");
    for line in a.log().lines().filter(|l| l.contains("effective weight")) {
        println!("  {line}");
    }
    assert_eq!(n, [0.0, 6.0, 0.0], "weight changes per backend");
    drop(a);
}
