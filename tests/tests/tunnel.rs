//! Health probes that travel the data path (`via = "tunnel"`), as root, in namespaces this
//! test creates: a client, a router, the balancer (`maglb agent`, attached to l0) and three
//! backends running maglb's decap program. One backend loses its VIPs from its loopback,
//! another its decap program: probes over the tunnel take both down, with the reason, while
//! direct probes call them up; client traffic then reaches only the third. TCP, HTTP, HTTPS
//! (an `openssl s_server` on each backend), UDP and an IPv6 VIP, all over the tunnel. With
//! `encap = "gue"` the probes travel in GUE like client packets: a backend whose decap takes
//! IP-in-IP only fails them until the balancer goes back to IP-in-IP. Everything is driven
//! with `maglb` commands.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::Path,
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use maglb_tests::{
    agent::{Agent, Scratch, attach_decaps, operated_topology},
    certs,
    netns::Netns,
    topology::{
        self, HEALTH_PORT, TCP_PORT, Topology, UDP_PORT, VIP, VIP6, backend_addr, backend_addr6,
        vip_addr, vip6_addr, wait_for,
    },
};

const BIN: &str = env!("CARGO_BIN_EXE_maglb-cli");
/// Probe settings: every 200 ms, 150 ms timeout (every 400 ms with a 400 ms timeout for
/// HTTPS: a TLS handshake with a 2048-bit key on a loaded machine), 2 to rise, 2 to fall.
const INTERVAL: u64 = 200;
const TIMEOUT: u64 = 150;
const FALL: u64 = 2;
/// Scheduling and polling slack on top of what the probe settings allow (as tests/health.rs).
const SLACK: Duration = Duration::from_millis(700);
/// The HTTPS port of the backends' `openssl s_server`.
const TLS_PORT: u16 = 8443;

fn tcp_vip() -> String {
    format!("{VIP}:{TCP_PORT}/tcp")
}
fn tcp6_vip() -> String {
    format!("[{VIP6}]:{TCP_PORT}/tcp")
}
fn udp_vip() -> String {
    format!("{VIP}:{UDP_PORT}/udp")
}

/// One probe as `maglb health --output json` shows it.
#[derive(Clone, Debug)]
struct Seen {
    up: Option<bool>,
    last: String,
    via: String,
    via_reason: Option<String>,
    target: String,
    checks: u64,
}

/// Every probe, by (VIP, backend).
fn probes(a: &Agent) -> BTreeMap<(String, IpAddr), Seen> {
    let v: serde_json::Value =
        serde_json::from_str(&a.ok(&["health", "--output", "json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let h = &p["health"];
            (
                (
                    p["vip"].as_str().unwrap().to_owned(),
                    p["backend"].as_str().unwrap().parse().unwrap(),
                ),
                Seen {
                    up: h["up"].as_bool(),
                    last: h["last"].as_str().unwrap_or("").to_owned(),
                    via: p["via"].as_str().unwrap().to_owned(),
                    via_reason: p["via_reason"].as_str().map(str::to_owned),
                    target: p["target"].as_str().unwrap().to_owned(),
                    checks: h["checks"].as_u64().unwrap_or(0),
                },
            )
        })
        .collect()
}

fn print(a: &Agent, title: &str) {
    println!("-- {title}");
    for ((vip, b), s) in probes(a) {
        println!(
            "{vip:<22} {b:<12} via {:<6} -> {:<17} up={:<5} checks={:<3} {}{}",
            s.via,
            s.target,
            s.up.map_or("-".into(), |u| u.to_string()),
            s.checks,
            s.last,
            s.via_reason.map(|r| format!(" [{r}]")).unwrap_or_default()
        );
    }
}

/// Sets the check of `vip`: `kind` with the test's timing, and `extra` flags.
fn check(a: &Agent, vip: &str, kind: &str, extra: &[&str]) {
    let (interval, timeout) = if kind == "https" {
        ("400", "400")
    } else {
        ("200", "150")
    };
    let mut args = vec![
        "vip",
        "health",
        vip,
        "--kind",
        kind,
        "--interval-ms",
        interval,
        "--timeout-ms",
        timeout,
        "--rise",
        "2",
        "--fall",
        "2",
    ];
    args.extend_from_slice(extra);
    a.ok(&args);
}

/// Waits until every probe of `vip` goes `via`, backend `i` is `want[i]`, and each probe
/// ran at least three more times since the call; returns how long that took.
fn settle(a: &Agent, vip: &str, via: &str, want: [bool; 3], limit: Duration) -> Duration {
    let addr = |i: usize| -> IpAddr {
        if vip.starts_with('[') {
            backend_addr6(i).into()
        } else {
            backend_addr(i).into()
        }
    };
    let start = Instant::now();
    let before = probes(a);
    let checks = |i: usize| {
        before
            .get(&(vip.to_owned(), addr(i)))
            .map_or(0, |s| s.checks)
    };
    let ok = wait_for(limit, || {
        let p = probes(a);
        (0..3).all(|i| {
            p.get(&(vip.to_owned(), addr(i)))
                .is_some_and(|s| s.via == via && s.up == Some(want[i]) && s.checks >= checks(i) + 3)
        })
    });
    print(a, &format!("{vip}: {via} probes, want {want:?}"));
    assert!(ok, "{vip} did not settle within {limit:?}\n{}", a.log());
    start.elapsed()
}

/// Backend names answering `n` new connections to `to` (failures as "-").
fn spread(t: &Topology, to: std::net::SocketAddr, n: usize, udp: bool) -> BTreeMap<String, usize> {
    t.client
        .run(move || {
            let mut seen = BTreeMap::new();
            for _ in 0..n {
                let r = if udp {
                    topology::udp_request(to, Duration::from_millis(300))
                } else {
                    topology::tcp_request(to, Duration::from_millis(300))
                };
                *seen.entry(r.unwrap_or_else(|_| "-".into())).or_insert(0) += 1;
            }
            seen
        })
        .unwrap()
}

/// `openssl s_server` answering HTTPS GETs on every IPv4 address of a namespace; killed on
/// drop.
struct TlsServer(Child);

impl TlsServer {
    fn start(ns: &Netns, cert: &Path, key: &Path) -> Self {
        let child = ns
            .command("openssl")
            .unwrap()
            .args(["s_server", "-4", "-quiet", "-www", "-accept"])
            .arg(TLS_PORT.to_string())
            .arg("-cert")
            .arg(cert)
            .arg("-key")
            .arg(key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        Self(child)
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The probe classifier's count of encapsulated packets, from the metrics.
fn encapsulated(t: &Topology) -> f64 {
    use std::io::{Read as _, Write as _};
    let text =
        t.lb.run(|| -> std::io::Result<String> {
            let mut s = std::net::TcpStream::connect("127.0.0.1:9477")?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })
        .unwrap()
        .expect("scrape");
    text.lines()
        .find_map(|l| {
            l.strip_prefix("maglb_probe_tunnel_packets_total{result=\"encapsulated\"} ")
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

#[test]
fn tunnel_probes_find_a_missing_vip_and_a_missing_decap_that_direct_probes_miss() {
    let scratch = Scratch::new("tun");
    let (t, a) = operated_topology(Path::new(BIN), "tun", &scratch, 3);
    std::fs::create_dir_all(&scratch.0.dir).unwrap();
    let (cert, key) = certs::self_signed(&scratch.0.dir, "tls", "backend.test", None);
    let _tls: Vec<TlsServer> = t
        .backends
        .iter()
        .map(|b| TlsServer::start(b, &cert, &key))
        .collect();
    let (v4, v6, vu) = (tcp_vip(), tcp6_vip(), udp_vip());
    for v in [&v4, &vu] {
        a.ok(&["vip", "add", v]);
        for i in 0..3 {
            a.ok(&["backend", "add", v, &backend_addr(i).to_string()]);
        }
    }
    a.ok(&["vip", "add", &v6]);
    for i in 0..3 {
        a.ok(&["backend", "add", &v6, &backend_addr6(i).to_string()]);
    }
    a.wait_ready();
    let limit = Duration::from_secs(10);

    // Healthy: over the tunnel by default, to the VIP.
    check(&a, &v4, "tcp", &[]);
    check(&a, &v6, "tcp", &[]);
    check(&a, &vu, "udp", &[]);
    for v in [&v4, &v6, &vu] {
        let took = settle(&a, v, "tunnel", [true; 3], limit);
        println!("{v}: all up over the tunnel after {took:?}");
    }
    let p = probes(&a);
    let s = &p[&(v4.clone(), backend_addr(0).into())];
    assert_eq!(
        s.target,
        format!("{VIP}:{TCP_PORT}"),
        "a probe over the tunnel goes to the VIP"
    );
    let status = a.ok(&["status"]);
    assert!(
        status.contains("over the tunnel possible (classifier on l0)"),
        "{status}"
    );
    let encap0 = encapsulated(&t);
    assert!(encap0 > 0.0, "the probe classifier encapsulated nothing");
    println!("probe classifier: {encap0} packets encapsulated so far");

    // b0 loses its VIPs from loopback, b1 its decap program.
    t.backends[0]
        .ip(&["addr", "del", &format!("{VIP}/32"), "dev", "lo"])
        .unwrap();
    t.backends[0]
        .ip(&["addr", "del", &format!("{VIP6}/128"), "dev", "lo"])
        .unwrap();
    let pins = scratch.0.decap_pins.join("b1");
    let out = t.backends[1]
        .command(BIN)
        .unwrap()
        .args(["decap", "detach", "--iface", "e0", "--pin-dir"])
        .arg(&pins)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let broken = Instant::now();
    let detect = Duration::from_millis(FALL * INTERVAL + TIMEOUT) + SLACK;
    let seen_down = |vip: &str| {
        let p = probes(&a);
        (0..2).all(|i| {
            let b: IpAddr = if vip.starts_with('[') {
                backend_addr6(i).into()
            } else {
                backend_addr(i).into()
            };
            p.get(&(vip.to_owned(), b))
                .is_some_and(|s| s.up == Some(false))
        })
    };
    assert!(
        wait_for(limit, || seen_down(&v4)),
        "b0 and b1 not down: {}",
        a.ok(&["health"])
    );
    let took = broken.elapsed();
    println!("{v4}: b0 and b1 down over the tunnel {took:?} after the breakage (limit {detect:?})");
    assert!(
        took <= detect,
        "tunnel probes took {took:?} to see the breakage, more than {detect:?}"
    );
    for v in [&v4, &v6, &vu] {
        settle(&a, v, "tunnel", [false, false, true], limit);
    }
    for ((vip, b), s) in probes(&a) {
        if b == IpAddr::from(backend_addr(2)) || b == IpAddr::from(backend_addr6(2)) {
            assert_eq!(s.last, "ok", "{vip} {b}");
            continue;
        }
        assert!(
            s.last.contains("over the tunnel")
                && s.last
                    .contains("decap missing, or the VIP not on its loopback"),
            "{vip} {b}: reason {:?}",
            s.last
        );
    }
    // Client traffic reaches only b2 now.
    for (to, udp) in [
        (vip_addr(TCP_PORT), false),
        (vip6_addr(TCP_PORT), false),
        (vip_addr(UDP_PORT), true),
    ] {
        let seen = spread(&t, to, 30, udp);
        println!("{to} {}: {seen:?}", if udp { "udp" } else { "tcp" });
        assert_eq!(seen, BTreeMap::from([("b2".to_owned(), 30)]), "{to}");
    }

    // HTTP and HTTPS over the tunnel find the same.
    check(
        &a,
        &v4,
        "http",
        &["--port", &HEALTH_PORT.to_string(), "--path", "/health"],
    );
    settle(&a, &v4, "tunnel", [false, false, true], limit);
    let port = TLS_PORT.to_string();
    check(
        &a,
        &v4,
        "https",
        &["--port", &port, "--path", "/", "--tls-insecure"],
    );
    settle(&a, &v4, "tunnel", [false, false, true], limit);

    // Direct probes see nothing wrong, and the broken backends take traffic they blackhole.
    let direct = ["--via", "direct"];
    check(&a, &v4, "tcp", &direct);
    check(&a, &v6, "tcp", &direct);
    check(&a, &vu, "udp", &direct);
    for v in [&v4, &v6, &vu] {
        settle(&a, v, "direct", [true; 3], limit);
    }
    let p = probes(&a);
    let s = &p[&(v4.clone(), backend_addr(0).into())];
    assert_eq!(s.target, format!("{}:{TCP_PORT}", backend_addr(0)));
    let seen = spread(&t, vip_addr(TCP_PORT), 30, false);
    println!("{}: under direct probes {seen:?}", vip_addr(TCP_PORT));
    assert!(
        seen.get("-").copied().unwrap_or(0) > 0 && seen.get("b2").copied().unwrap_or(0) < 30,
        "under direct probes some new flows should reach the broken backends: {seen:?}"
    );

    // Repaired: VIP back on b0's loopback, decap attached on b1; the tunnel probes (the
    // default again) call them up.
    t.backends[0]
        .ip(&["addr", "add", &format!("{VIP}/32"), "dev", "lo"])
        .unwrap();
    t.backends[0]
        .ip(&["addr", "add", &format!("{VIP6}/128"), "dev", "lo"])
        .unwrap();
    attach_decaps(Path::new(BIN), &t, &scratch);
    check(&a, &v4, "tcp", &[]);
    check(&a, &v6, "tcp", &[]);
    check(&a, &vu, "udp", &[]);
    for v in [&v4, &v6, &vu] {
        settle(&a, v, "tunnel", [true; 3], limit);
    }
    for (to, udp) in [(vip_addr(TCP_PORT), false), (vip_addr(UDP_PORT), true)] {
        let seen = spread(&t, to, 30, udp);
        println!("{to} repaired: {seen:?}");
        assert!(!seen.contains_key("-") && seen.len() == 3, "{to}: {seen:?}");
    }

    // A check that asks for the tunnel when the balancer cannot carry it fails, with why;
    // one that leaves the choice goes direct.
    check(&a, &v4, "tcp", &["--via", "tunnel"]);
    a.ok(&["detach"]);
    settle(&a, &v4, "tunnel", [false; 3], limit);
    settle(&a, &v6, "direct", [true; 3], limit);
    let p = probes(&a);
    let s = &p[&(v4.clone(), backend_addr(0).into())];
    assert!(
        s.last.contains("no tunnel: the balancer is not attached"),
        "{s:?}"
    );
    let s = &p[&(v6.clone(), backend_addr6(0).into())];
    assert_eq!(
        s.via_reason.as_deref(),
        Some("the balancer is not attached")
    );
    drop(a);
}

/// Sets `[balancer] encap` with `maglb apply` of the exported state.
fn set_encap(a: &Agent, scratch: &Scratch, encap: &str) {
    let exported = a.ok(&["config", "export"]);
    let mut text = String::new();
    for line in exported.lines().filter(|l| !l.starts_with("encap =")) {
        text.push_str(line);
        text.push('\n');
        if line == "[balancer]" {
            text.push_str(&format!("encap = \"{encap}\"\n"));
        }
    }
    let file = scratch.0.dir.join("encap.toml");
    std::fs::create_dir_all(&scratch.0.dir).unwrap();
    std::fs::write(&file, text).unwrap();
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    let exported = a.ok(&["config", "export"]);
    assert_eq!(
        exported.contains("encap = \"gue\""),
        encap == "gue",
        "{exported}"
    );
}

#[test]
fn tunnel_probes_are_encapsulated_like_client_traffic_in_gue_too() {
    let scratch = Scratch::new("tug");
    let (t, a) = operated_topology(Path::new(BIN), "tug", &scratch, 3);
    let (v4, v6) = (tcp_vip(), tcp6_vip());
    a.ok(&["vip", "add", &v4]);
    a.ok(&["vip", "add", &v6]);
    for i in 0..3 {
        a.ok(&["backend", "add", &v4, &backend_addr(i).to_string()]);
        a.ok(&["backend", "add", &v6, &backend_addr6(i).to_string()]);
    }
    a.wait_ready();
    let limit = Duration::from_secs(10);

    // GUE: the backends' decap programs take it (UDP port 6080), so every probe passes.
    set_encap(&a, &scratch, "gue");
    check(&a, &v4, "tcp", &[]);
    check(&a, &v6, "tcp", &[]);
    for v in [&v4, &v6] {
        settle(&a, v, "tunnel", [true; 3], limit);
    }
    let encap0 = encapsulated(&t);
    assert!(encap0 > 0.0, "the probe classifier encapsulated nothing");

    // b1's decap takes IP-in-IP only now: GUE probes fail there, as GUE client packets do.
    // (Were probes sent in IP-in-IP, b1 would stay up and take flows it cannot decapsulate.)
    let pins = scratch.0.decap_pins.join("b1");
    let out = t.backends[1]
        .command(BIN)
        .unwrap()
        .args(["decap", "attach", "--iface", "e0"])
        .args(["--gue-port", "0", "--pin-dir"])
        .arg(&pins)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for v in [&v4, &v6] {
        settle(&a, v, "tunnel", [true, false, true], limit);
    }
    let p = probes(&a);
    let s = &p[&(v4.clone(), backend_addr(1).into())];
    assert!(s.last.contains("over the tunnel"), "{s:?}");
    for to in [vip_addr(TCP_PORT), vip6_addr(TCP_PORT)] {
        let seen = spread(&t, to, 30, false);
        println!("{to} over GUE, b1 without GUE: {seen:?}");
        assert!(
            !seen.contains_key("-") && !seen.contains_key("b1"),
            "{to}: {seen:?}"
        );
    }
    assert!(encapsulated(&t) > encap0, "no probes encapsulated since");

    // Back to IP-in-IP: b1 passes its probes again and takes flows.
    set_encap(&a, &scratch, "ipip");
    for v in [&v4, &v6] {
        settle(&a, v, "tunnel", [true; 3], limit);
    }
    let seen = spread(&t, vip_addr(TCP_PORT), 30, false);
    println!("IP-in-IP again: {seen:?}");
    assert!(!seen.contains_key("-") && seen.len() == 3, "{seen:?}");
    drop(a);
}
