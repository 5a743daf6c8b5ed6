//! Observability end to end, as root, in namespaces this test creates: the counters a
//! Prometheus scrape shows equal the traffic sent, survive an agent restart, pass promtool;
//! the shipped alert rules and dashboard use only exported metrics; `stats --watch` shows
//! live rates.

use std::{
    collections::BTreeSet,
    io::{Read as _, Write as _},
    net::TcpStream,
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use maglb_tests::{
    agent::{Agent, Scratch, operated_topology},
    topology::{self, Topology, UDP_PORT, VIP, backend_addr, vip_addr},
};

const BIN: &str = env!("CARGO_BIN_EXE_maglb-cli");
const PACKAGING: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging");

/// `GET /metrics` from inside the balancer's namespace (the agent listens on 127.0.0.1).
fn scrape(t: &Topology) -> String {
    t.lb.run(|| -> std::io::Result<String> {
        let mut s = TcpStream::connect("127.0.0.1:9477")?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })
    .unwrap()
    .expect("scrape")
    .split_once("\r\n\r\n")
    .expect("HTTP response")
    .1
    .to_owned()
}

/// The value of one sample, e.g. `maglb_vip_packets_total{vip="..."}`.
fn value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|r| r.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {sample} in the scrape"))
        .parse()
        .unwrap()
}

fn sum(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut c = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; `cargo xtask setup`)");
    if let Some(s) = stdin {
        c.stdin.take().unwrap().write_all(s.as_bytes()).unwrap();
    }
    drop(c.stdin.take());
    let o = c.wait_with_output().unwrap();
    (
        o.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
    )
}

fn setup(tag: &str, scratch: &Scratch) -> (Topology, Agent, String) {
    let (t, a) = operated_topology(Path::new(BIN), tag, scratch, 3);
    let vip = format!("{VIP}:{UDP_PORT}/udp");
    a.ok(&["vip", "add", &vip]);
    for i in 0..3 {
        a.ok(&["backend", "add", &vip, &backend_addr(i).to_string()]);
    }
    a.wait_ready();
    (t, a, vip)
}

#[test]
fn scraped_counters_equal_the_traffic_and_survive_a_restart() {
    let scratch = Scratch::new("mex");
    let (t, mut a, vip) = setup("mex", &scratch);
    const N: usize = 400;
    // From N distinct source ports: N flows (kernel-chosen ports may repeat).
    let failed = t
        .client
        .run(|| {
            (0..N)
                .filter(|i| {
                    let s = std::net::UdpSocket::bind(("0.0.0.0", 20000 + *i as u16)).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                    s.send_to(b"hello", vip_addr(UDP_PORT)).unwrap();
                    s.recv_from(&mut [0u8; 64]).is_err()
                })
                .count()
        })
        .unwrap();
    assert_eq!(failed, 0);

    // Each exchange is one datagram of 20 + 8 + 5 bytes ("hello") toward the VIP, and a new
    // flow.
    let text = scrape(&t);
    let l = format!("{{vip=\"{vip}\"}}");
    assert_eq!(
        value(&text, &format!("maglb_vip_packets_total{l}")),
        N as f64
    );
    assert_eq!(
        value(&text, &format!("maglb_vip_bytes_total{l}")),
        (N * 33) as f64
    );
    assert_eq!(
        value(&text, &format!("maglb_vip_new_flows_total{l}")),
        N as f64
    );
    let per_backend = sum(
        &text,
        &format!("maglb_backend_packets_total{{vip=\"{vip}\""),
    );
    assert_eq!(per_backend, N as f64, "backends' packets do not add up");
    assert_eq!(value(&text, "maglb_encapsulated_packets_total"), N as f64);
    assert_eq!(value(&text, "maglb_conntrack_misses_total"), N as f64);
    assert_eq!(value(&text, "maglb_forwarding"), 1.0);
    let (ok, out) = promtool(&["check", "metrics"], Some(&text));
    assert!(ok, "promtool check metrics: {out}");

    // The counters live in the pinned maps: a killed and restarted agent shows the same.
    a.kill9();
    let _a2 = Agent::start(Path::new(BIN), &t.lb, &scratch.0).expect("second agent");
    let again = scrape(&t);
    for s in [
        "maglb_vip_packets_total",
        "maglb_vip_bytes_total",
        "maglb_vip_new_flows_total",
    ] {
        let k = format!("{s}{l}");
        assert_eq!(value(&again, &k), value(&text, &k), "{k} after the restart");
    }
}

#[test]
fn alert_rules_and_dashboard_use_exported_metrics() {
    let rules = format!("{PACKAGING}/prometheus/maglb-alerts.yml");
    let (ok, out) = promtool(&["check", "rules", &rules], None);
    assert!(ok, "promtool check rules: {out}");

    // Every maglb_* name in the rules and the dashboard is a family a running agent exports.
    let scratch = Scratch::new("mal");
    let (t, a, vip) = setup("mal", &scratch);
    // A probed backend, so that the probe latency family has samples.
    a.ok(&[
        "vip",
        "health",
        &vip,
        "--kind",
        "udp",
        "--interval-ms",
        "200",
        "--timeout-ms",
        "100",
    ]);
    std::thread::sleep(Duration::from_millis(600));
    let exported: BTreeSet<String> = scrape(&t)
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();
    let dashboard =
        std::fs::read_to_string(format!("{PACKAGING}/grafana/maglb-dashboard.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(json["panels"].as_array().unwrap().len() >= 10);
    for (what, text) in [
        ("rules", std::fs::read_to_string(&rules).unwrap()),
        ("dashboard", dashboard),
    ] {
        let mut rest = text.as_str();
        while let Some(i) = rest.find("maglb_") {
            let name: String = rest[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            rest = &rest[i + name.len()..];
            if name.starts_with("maglb_") && name != "maglb_" {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|b| exported.contains(*b)))
                    .unwrap_or(&name);
                assert!(
                    exported.contains(base),
                    "{what} use {name}, which is not exported"
                );
            }
        }
    }
}

#[test]
fn stats_watch_shows_live_rates() {
    let scratch = Scratch::new("mwa");
    let (t, a, vip) = setup("mwa", &scratch);
    let traffic = t
        .client
        .spawn(|| {
            for _ in 0..600 {
                let _ = topology::udp_request(vip_addr(UDP_PORT), Duration::from_secs(1));
                std::thread::sleep(Duration::from_millis(2));
            }
        })
        .unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let out = a.ok(&["stats", "--watch", "--interval-ms", "500", "--count", "2"]);
    traffic.join().unwrap();
    let line = out
        .lines()
        .find(|l| l.starts_with(&vip))
        .unwrap_or_else(|| panic!("{out}"));
    let pps: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(pps > 10.0, "no rate in {line:?}\n{out}");
}
