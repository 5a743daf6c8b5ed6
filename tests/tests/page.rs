//! The live status page in a real headless browser (Debian's chromium), as root, against a
//! running agent with traffic, in namespaces this test creates: backend rows appear, rates
//! change between refreshes, and a backend whose server stops turns red within two refreshes.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use maglb_tests::{
    agent::{Scratch, operated_topology},
    browser::Browser,
    topology::{self, TCP_PORT, VIP, backend_addr, vip_addr, wait_for},
};
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_maglb-cli");
const PAGE: &str = "http://127.0.0.1:9477/";

/// What the test reads from the page: refreshes so far, and per row its data attributes and
/// rates (nothing while the page is still loading).
const ROWS: &str = r##"!document.getElementById("rows") ? JSON.stringify({refreshes: 0, rows: []}) : JSON.stringify({
  refreshes: +document.body.dataset.refreshes,
  error: document.getElementById("error").textContent,
  summary: document.getElementById("summary").textContent,
  vrrp: (document.getElementById("vrrp") || {dataset: {}}).dataset.state,
  rows: [...document.querySelectorAll("#rows tr")].map(r => ({
    kind: r.classList.contains("vip") ? "vip" : "backend",
    cls: r.className,
    vip: r.dataset.vip,
    backend: r.dataset.backend || null,
    health: r.dataset.health || null,
    packets: +r.dataset.packets,
    pps: r.cells[5].dataset.value,
    nfs: r.cells[7].dataset.value,
    text: r.textContent,
  })),
})"##;

fn read(b: &mut Browser) -> Value {
    let s = b.eval(ROWS).expect("reading the page");
    serde_json::from_str(s.as_str().expect("a string")).unwrap()
}

fn refreshes(v: &Value) -> u64 {
    v["refreshes"].as_u64().unwrap_or(0)
}

/// Waits (at most `limit`) for the page's next refresh after `after`; returns what it shows.
fn next_refresh(b: &mut Browser, after: u64, limit: Duration) -> Value {
    let t = Instant::now();
    loop {
        let v = read(b);
        if refreshes(&v) > after || t.elapsed() > limit {
            return v;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn find_row<'a>(v: &'a Value, backend: &str) -> Option<&'a Value> {
    v["rows"]
        .as_array()?
        .iter()
        .find(|r| r["backend"].as_str() == Some(backend))
}

fn row<'a>(v: &'a Value, backend: &str) -> &'a Value {
    find_row(v, backend).unwrap_or_else(|| panic!("no row for {backend}: {v:#}"))
}

/// Sets the flag when dropped: the traffic thread stops also when the test fails.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

#[test]
fn status_page_shows_live_rates_and_a_backend_going_down() {
    let scratch = Scratch::new("pg");
    let (t, a) = operated_topology(Path::new(BIN), "pg", &scratch, 3);
    let vip = format!("{VIP}:{TCP_PORT}/tcp");
    a.ok(&["vip", "add", &vip]);
    for i in 0..3 {
        a.ok(&["backend", "add", &vip, &backend_addr(i).to_string()]);
    }
    a.ok(&[
        "vip",
        "health",
        &vip,
        "--kind",
        "tcp",
        "--interval-ms",
        "200",
        "--timeout-ms",
        "150",
        "--rise",
        "2",
        "--fall",
        "2",
    ]);
    a.wait_ready();

    // Traffic: new TCP connections to the VIP, in bursts of changing size, so the rates
    // change from one refresh to the next. Bounded: it stops on the flag or after 90 s.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let (stop2, sent2) = (stop.clone(), sent.clone());
    let _stop = StopOnDrop(stop.clone());
    let traffic = t
        .client
        .spawn(move || {
            let start = Instant::now();
            let mut round = 0u64;
            while !stop2.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(90) {
                round += 1;
                for _ in 0..(5 + round % 7 * 5) {
                    if topology::tcp_request(vip_addr(TCP_PORT), Duration::from_millis(500)).is_ok()
                    {
                        sent2.fetch_add(1, Ordering::Relaxed);
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        })
        .unwrap();

    let shots = scratch.0.dir.join("screens");
    std::fs::create_dir_all(&shots).unwrap();
    let mut b = Browser::start(&t.lb, &shots, 1180, 360).expect("chromium");
    b.open(PAGE).expect("opening the status page");

    // The rows: one VIP, three backends, all up.
    let mut v = Value::Null;
    let ok = wait_for(Duration::from_secs(20), || {
        v = read(&mut b);
        refreshes(&v) >= 2
            && (0..3).all(|i| {
                find_row(&v, &backend_addr(i).to_string()).is_some_and(|r| r["health"] == "up")
            })
    });
    assert!(ok, "the page shows no healthy backends: {v:#}");
    assert_eq!(v["error"], "", "{v:#}");
    assert!(
        v["summary"].as_str().unwrap().contains("forwarding"),
        "{v:#}"
    );
    assert_eq!(v["vrrp"], "off");
    assert_eq!(v["rows"].as_array().unwrap().len(), 4, "{v:#}");

    // Rates: over four refreshes the VIP's new flows/s and packets/s are positive and not
    // all the same, and its packet counter grows.
    let mut nfs = Vec::new();
    let mut pps = Vec::new();
    let mut packets = Vec::new();
    let mut n = refreshes(&v);
    for _ in 0..4 {
        v = next_refresh(&mut b, n, Duration::from_secs(5));
        n = refreshes(&v);
        let r = &v["rows"][0];
        assert_eq!(r["kind"], "vip");
        nfs.push(r["nfs"].as_str().unwrap().parse::<f64>().unwrap_or(0.0));
        pps.push(r["pps"].as_str().unwrap().parse::<f64>().unwrap_or(0.0));
        packets.push(r["packets"].as_u64().unwrap());
    }
    println!("VIP new flows/s over four refreshes: {nfs:?}; packets/s: {pps:?}");
    assert!(nfs.iter().all(|r| *r > 0.0), "no new flows/s: {nfs:?}");
    assert!(pps.iter().all(|r| *r > 0.0), "no packets/s: {pps:?}");
    assert!(
        nfs.windows(2).any(|w| w[0] != w[1]),
        "the rate does not change: {nfs:?}"
    );
    assert!(packets.windows(2).all(|w| w[1] > w[0]), "{packets:?}");
    b.screenshot(&shots.join("status-page.png")).unwrap();

    // A backend's server stops: once the agent has it down, the page turns its row red
    // within two refreshes.
    let down = backend_addr(1).to_string();
    t.ctl[1].serving.store(false, Ordering::Relaxed);
    let agent_down = wait_for(Duration::from_secs(10), || {
        let h: Value = serde_json::from_str(&a.ok(&["health", "--output", "json"])).unwrap();
        h.as_array()
            .unwrap()
            .iter()
            .any(|p| p["backend"].as_str() == Some(down.as_str()) && p["health"]["up"] == false)
    });
    assert!(agent_down, "the agent never saw {down} down");
    let seen_at = Instant::now();
    let r0 = refreshes(&read(&mut b));
    let red = wait_for(Duration::from_secs(5), || {
        v = read(&mut b);
        row(&v, &down)["cls"].as_str().unwrap().contains("down")
    });
    let (r1, took) = (refreshes(&v), seen_at.elapsed());
    println!(
        "{down} red on the page {took:?} and {} refreshes after the agent saw it down",
        r1 - r0
    );
    assert!(red, "the row of {down} did not turn red: {v:#}");
    assert!(r1 - r0 <= 2, "{} refreshes before it turned red", r1 - r0);
    let r = row(&v, &down);
    assert_eq!(r["health"], "down");
    assert!(r["text"].as_str().unwrap().contains("DOWN"), "{r:#}");
    assert!(
        r["text"].as_str().unwrap().contains("connection refused"),
        "{r:#}"
    );
    // The others stay up, and the page never lost the agent.
    for i in [0, 2] {
        assert_eq!(row(&v, &backend_addr(i).to_string())["health"], "up");
    }
    assert_eq!(v["error"], "");
    // Let the sparklines fill a little more for the picture.
    let n = refreshes(&v);
    next_refresh(&mut b, n + 1, Duration::from_secs(5));
    let shot = shots.join("status-page-down.png");
    b.screenshot(&shot).unwrap();
    // A copy outside the scratch directory (which goes with the test), for a look.
    let keep = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    std::fs::copy(&shot, &keep).unwrap();
    println!("screenshot: {}", keep.display());

    // The page fetched nothing but itself and its data.
    let resources = b
        .eval("JSON.stringify(performance.getEntriesByType('resource').map(e => e.name))")
        .unwrap();
    let resources: Vec<String> = serde_json::from_str(resources.as_str().unwrap()).unwrap();
    assert!(
        resources.iter().all(|u| u.starts_with(PAGE)),
        "outside assets: {resources:?}"
    );

    stop.store(true, Ordering::Relaxed);
    traffic.join().unwrap();
    assert!(sent.load(Ordering::Relaxed) > 50);
    drop(b);
}
