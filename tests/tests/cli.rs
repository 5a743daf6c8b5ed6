//! The `maglb` agent and CLI end to end, as root, in namespaces this test creates: traffic
//! driven only by `maglb` commands, drain, an agent killed with SIGKILL mid-traffic, and bad
//! input. See `maglb_tests::topology` for the network.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use maglb_tests::{
    agent::{Agent, Scratch, cli, operated_topology},
    netns::{Netns, require_root, unique_prefix},
    topology::{self, Conns, TCP_PORT, Topology, UDP_PORT, VIP, backend_addr, vip_addr},
};

const BIN: &str = env!("CARGO_BIN_EXE_maglb-cli");
const TIMEOUT: Duration = Duration::from_secs(3);

fn vip_tcp() -> String {
    format!("{VIP}:{TCP_PORT}/tcp")
}

/// A topology whose backends' decap programs are attached with `maglb decap attach`, and an
/// agent in the balancer's namespace, attached, with the TCP and UDP VIPs and three backends
/// of the given weights — all through the CLI.
fn setup(tag: &str, scratch: &Scratch, weights: &[u32]) -> (Topology, Agent) {
    let (t, a) = operated_topology(Path::new(BIN), tag, scratch, weights.len());
    for vip in [vip_tcp(), format!("{VIP}:{UDP_PORT}/udp")] {
        a.ok(&["vip", "add", &vip]);
        for (i, w) in weights.iter().enumerate() {
            let (b, w) = (backend_addr(i).to_string(), w.to_string());
            a.ok(&["backend", "add", &vip, &b, "--weight", &w]);
        }
    }
    a.wait_ready();
    (t, a)
}

fn spread(t: &Topology, n: usize, udp: bool) -> (BTreeMap<String, usize>, usize) {
    t.client
        .run(move || {
            let mut seen = BTreeMap::new();
            let mut failed = 0;
            for _ in 0..n {
                let r = if udp {
                    topology::udp_request(vip_addr(UDP_PORT), TIMEOUT)
                } else {
                    topology::tcp_request(vip_addr(TCP_PORT), TIMEOUT)
                };
                match r {
                    Ok(b) => *seen.entry(b).or_insert(0) += 1,
                    Err(_) => failed += 1,
                }
            }
            (seen, failed)
        })
        .unwrap()
}

#[test]
fn traffic_driven_only_by_the_cli() {
    let scratch = Scratch::new("cli");
    let (t, a) = setup("clt", &scratch, &[1, 2, 1]);
    let (seen, failed) = spread(&t, 2000, false);
    assert_eq!(failed, 0, "TCP failures; spread {seen:?}");
    let share = |b: &str| *seen.get(b).unwrap_or(&0) as f64 / 2000.0;
    assert!(
        (share("b1") - 0.5).abs() < 0.05 && (share("b0") - 0.25).abs() < 0.05,
        "{seen:?}"
    );
    let (useen, ufailed) = spread(&t, 1000, true);
    assert_eq!(ufailed, 0, "UDP failures; spread {useen:?}");
    assert_eq!(useen.len(), 3, "{useen:?}");

    // The read commands show what happened.
    let stats: serde_json::Value =
        serde_json::from_str(&a.ok(&["stats", "--output", "json"])).unwrap();
    let tcp = stats["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["address"] == vip_tcp())
        .unwrap();
    assert!(tcp["packets"].as_u64().unwrap() >= 2000 * 4, "{tcp}");
    let list = a.ok(&["backend", "list", &vip_tcp()]);
    assert_eq!(list.lines().count(), 4, "{list}");
    assert!(a.ok(&["vip", "list"]).contains(&vip_tcp()));
    let status: serde_json::Value =
        serde_json::from_str(&a.ok(&["status", "--output", "json"])).unwrap();
    assert_eq!(status["attached"], true);
    assert_eq!(status["nexthop"], "10.10.2.1");
    let decap = t.backends[0]
        .command(BIN)
        .unwrap()
        .args(["decap", "status", "--pin-dir"])
        .arg(scratch.0.decap_pins.join("b0"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&decap.stdout).contains("e0"));

    // A weight change reaches new connections.
    a.ok(&[
        "backend",
        "set-weight",
        &vip_tcp(),
        &backend_addr(0).to_string(),
        "0",
    ]);
    let (seen, failed) = spread(&t, 300, false);
    assert_eq!(failed, 0);
    assert!(
        !seen.contains_key("b0"),
        "weight 0 still gets connections: {seen:?}"
    );

    // Export, apply the export: nothing changes.
    let exported = a.ok(&["config", "export"]);
    let file = scratch.0.dir.join("exported.toml");
    std::fs::write(&file, &exported).unwrap();
    assert!(
        a.ok(&["apply", "-f", file.to_str().unwrap()])
            .contains("no change")
    );
}

#[test]
fn drained_backend_keeps_established_connections() {
    let scratch = Scratch::new("cld");
    let (t, a) = setup("cld", &scratch, &[1, 1, 1]);
    let conns = t
        .client
        .run(|| Conns::open(30, vip_addr(TCP_PORT), TIMEOUT))
        .unwrap()
        .expect("open connections");
    assert!(conns.on("b1") > 0, "no connection landed on b1");
    a.ok(&["backend", "drain", &vip_tcp(), &backend_addr(1).to_string()]);
    assert!(a.ok(&["backend", "list", &vip_tcp()]).contains("drain"));
    let (seen, failed) = spread(&t, 300, false);
    assert_eq!(failed, 0);
    assert!(
        !seen.contains_key("b1"),
        "new connections reach the drained backend: {seen:?}"
    );
    let broken = t
        .client
        .run(move || {
            let mut conns = conns;
            conns.broken()
        })
        .unwrap();
    assert!(
        broken.is_empty(),
        "established connections broke after the drain: {broken:?}"
    );
}

#[test]
fn agent_killed_mid_traffic_loses_nothing() {
    let scratch = Scratch::new("clk");
    let (t, mut a) = setup("clk", &scratch, &[1, 1, 1]);
    let before = a.ok(&["config", "export"]);

    // Long-lived connections, and a steady stream of new ones, while the agent dies.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, bad) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let stream = {
        let (stop, ok, bad) = (stop.clone(), ok.clone(), bad.clone());
        t.client
            .spawn(move || {
                let mut long = Conns::open(20, vip_addr(TCP_PORT), TIMEOUT).unwrap();
                let mut long_broken = 0;
                for round in 0..10_000 {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match topology::tcp_request(vip_addr(TCP_PORT), TIMEOUT) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => bad.fetch_add(1, Ordering::Relaxed),
                    };
                    if round % 20 == 0 {
                        long_broken += long.broken().len();
                    }
                }
                long_broken
            })
            .unwrap()
    };
    std::thread::sleep(Duration::from_millis(500));
    a.kill9();
    // No agent for a while: forwarding goes on from the pinned datapath.
    let during = ok.load(Ordering::Relaxed);
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        ok.load(Ordering::Relaxed) > during + 20,
        "traffic stalled without the agent"
    );

    let a2 = Agent::start(Path::new(BIN), &t.lb, &scratch.0).expect("second agent");
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let long_broken = stream.join().unwrap();
    assert_eq!(
        bad.load(Ordering::Relaxed),
        0,
        "requests failed across the agent's death"
    );
    assert_eq!(long_broken, 0, "long-lived connections broke");
    assert!(ok.load(Ordering::Relaxed) > 100);

    // The new agent restored the same state and can change it.
    assert_eq!(a2.ok(&["config", "export"]), before);
    assert!(a2.ok(&["status"]).contains("forwarding   yes"));
    a2.ok(&[
        "backend",
        "set-weight",
        &vip_tcp(),
        &backend_addr(2).to_string(),
        "0",
    ]);
    let (seen, failed) = spread(&t, 200, false);
    assert_eq!(failed, 0);
    assert!(!seen.contains_key("b2"), "{seen:?}");
}

/// Runs a command that must fail: non-zero exit, `want` in its error, state unchanged.
fn refused(a: &Agent, args: &[&str], want: &str) {
    let before = a.ok(&["config", "export"]);
    let o = a.cli(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "maglb {args:?} succeeded");
    assert!(
        err.contains(want),
        "maglb {args:?}: expected {want:?} in {err:?}"
    );
    assert_eq!(
        a.ok(&["config", "export"]),
        before,
        "maglb {args:?} changed the state"
    );
}

#[test]
fn bad_input_gets_a_clear_error_and_changes_nothing() {
    require_root();
    let scratch = Scratch::new("clb");
    let ns = Netns::new(&format!("{}-bad", unique_prefix("clb"))).unwrap();
    ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        .unwrap();
    ns.ip(&["link", "set", "v0", "up"]).unwrap();
    ns.ip(&["link", "set", "v1", "up"]).unwrap();
    let a = Agent::start(Path::new(BIN), &ns, &scratch.0).expect("agent");
    a.ok(&["vip", "add", "10.200.0.1:80/tcp"]);
    a.ok(&["backend", "add", "10.200.0.1:80/tcp", "10.10.3.11"]);

    // The agent refuses these.
    refused(
        &a,
        &["backend", "add", "10.200.0.9:80/tcp", "10.10.3.11"],
        "does not exist",
    );
    refused(&a, &["vip", "del", "10.200.0.9:80/tcp"], "does not exist");
    refused(
        &a,
        &["backend", "add", "10.200.0.1:80/tcp", "10.10.3.11"],
        "already belongs",
    );
    refused(
        &a,
        &["backend", "del", "10.200.0.1:80/tcp", "10.10.3.99"],
        "not a backend",
    );
    refused(&a, &["vip", "add", "10.200.0.1:80/tcp"], "already exists");
    refused(
        &a,
        &["vip", "add", "10.200.0.2:80/tcp", "--ring-size", "65536"],
        "prime",
    );
    a.ok(&["vip", "add", "[fd20::1]:80/tcp"]);
    refused(
        &a,
        &["backend", "add", "[fd20::1]:80/tcp", "10.10.3.11"],
        "use an IPv6 address",
    );
    a.ok(&["vip", "del", "[fd20::1]:80/tcp"]);
    refused(&a, &["attach", "--iface", "nope0"], "nope0");
    refused(&a, &["attach", "--iface", "lo"], "--mode generic");
    refused(&a, &["detach"], "not attached");
    // The CLI refuses these before asking the agent.
    refused(&a, &["vip", "add", "10.200.0.300:80/tcp"], "ADDR:PORT");
    refused(&a, &["vip", "add", "10.200.0.2:70000/tcp"], "port 0-65535");
    refused(&a, &["vip", "add", "10.200.0.2:80/sctp"], "tcp or udp");
    refused(
        &a,
        &[
            "backend",
            "add",
            "10.200.0.1:80/tcp",
            "10.10.3.12",
            "--weight",
            "70000",
        ],
        "70000",
    );
    refused(
        &a,
        &["backend", "add", "10.200.0.1:80/tcp", "not-an-ip"],
        "not-an-ip",
    );
    // A file is validated whole: one bad VIP and nothing of it is applied.
    let file = scratch.0.dir.join("bad.toml");
    std::fs::write(
        &file,
        "[[vip]]\naddress = \"10.200.0.5:80/tcp\"\n[[vip]]\naddress = \"10.200.0.6:80/tcp\"\nbackend = [{ address = \"10.1.1.1\", weight = 99999 }]\n",
    )
    .unwrap();
    refused(&a, &["apply", "-f", file.to_str().unwrap()], "weight 99999");
    refused(
        &a,
        &["validate", "-f", file.to_str().unwrap()],
        "weight 99999",
    );
    std::fs::write(&file, "[balancer]\ninterfase = \"v0\"\n").unwrap();
    refused(
        &a,
        &["apply", "-f", file.to_str().unwrap()],
        "unknown field",
    );

    // The API itself refuses malformed requests (as `curl --unix-socket` would send them).
    let raw = |req: &str| -> String {
        use std::io::{Read as _, Write as _};
        let mut s = std::os::unix::net::UnixStream::connect(&scratch.0.socket).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    let body = r#"{"address": "10.200.0.7:80/tcp", "bogus": 1}"#;
    let r = raw(&format!(
        "POST /v1/vips HTTP/1.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ));
    assert!(r.starts_with("HTTP/1.1 400") && r.contains("bogus"), "{r}");
    assert!(
        raw("GET /v1/nothing HTTP/1.1\r\nConnection: close\r\n\r\n").starts_with("HTTP/1.1 404")
    );

    // Without an agent, the CLI says how to start one.
    let o = cli(
        Path::new(BIN),
        &scratch.0.dir.join("none.sock"),
        &["vip", "list"],
    );
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("maglb agent"));

    // And after all that, the one VIP and backend are still there.
    let list = a.ok(&["backend", "list"]);
    assert!(
        list.contains("10.10.3.11") && list.lines().count() == 2,
        "{list}"
    );
}

/// A fresh machine has no BPF filesystem mounted: the agent mounts one itself (and says so),
/// and forwards. `maglb decap attach` on the backends does the same in this namespace.
#[test]
fn agent_mounts_a_bpf_filesystem_where_none_is() {
    require_root();
    let scratch = Scratch::new("clb");
    let t = Topology::build_with("clb", 2, false).expect("topology");
    maglb_tests::agent::attach_decaps(Path::new(BIN), &t, &scratch);
    let a = Agent::start_without_bpffs(Path::new(BIN), &t.lb, &scratch.0).expect("agent");
    assert!(
        a.log().contains("mounted a BPF filesystem"),
        "no mount logged: {}",
        a.log()
    );
    a.ok(&["attach", "--iface", "l0"]);
    a.ok(&["vip", "add", &vip_tcp()]);
    for i in 0..2 {
        a.ok(&["backend", "add", &vip_tcp(), &backend_addr(i).to_string()]);
    }
    a.wait_ready();
    let (seen, failed) = spread(&t, 200, false);
    assert_eq!(failed, 0, "TCP failures; spread {seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");
}

/// `maglb decap attach` again on every backend, with another GUE port.
fn decap_gue_port(t: &Topology, scratch: &Scratch, port: u16) {
    for (i, b) in t.backends.iter().enumerate() {
        let pins = scratch.0.decap_pins.join(format!("b{i}"));
        let out = b
            .command(Path::new(BIN))
            .unwrap()
            .args(["decap", "attach", "--iface", "e0", "--gue-port"])
            .arg(port.to_string())
            .arg("--pin-dir")
            .arg(&pins)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The VIP's drops of one reason, from `maglb stats --output json`.
fn vip_drops(a: &Agent, reason: &str) -> u64 {
    let stats: serde_json::Value =
        serde_json::from_str(&a.ok(&["stats", "--output", "json"])).unwrap();
    stats["vips"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["address"] == vip_tcp())
        .and_then(|v| v["drops"][reason].as_u64())
        .unwrap_or(0)
}

#[test]
fn vip_policy_and_gue_through_the_agent() {
    let scratch = Scratch::new("pol");
    let (t, a) = setup("pol", &scratch, &[1, 1, 1]);
    let short = Duration::from_millis(300);
    let try_tcp = |n: usize| {
        t.client
            .run(move || {
                (0..n)
                    .filter(|_| topology::tcp_request(vip_addr(TCP_PORT), short).is_ok())
                    .count()
            })
            .unwrap()
    };
    assert_eq!(try_tcp(20), 20);

    // The client's /24 is denied: its new connections get nowhere, counted per VIP.
    let out = a.ok(&["vip", "policy", &vip_tcp(), "--deny", "10.10.1.0/24"]);
    assert!(out.contains("10.10.1.0/24"), "{out}");
    assert_eq!(try_tcp(5), 0, "a denied client connected");
    assert!(vip_drops(&a, "drop_denied") >= 5);
    // An allow list that does not hold the client refuses it too; a bad prefix changes
    // nothing.
    a.ok(&["vip", "policy", &vip_tcp(), "--allow", "192.0.2.0/24"]);
    assert_eq!(try_tcp(3), 0);
    assert!(vip_drops(&a, "drop_not_allowed") >= 3);
    let bad = a.cli(&["vip", "policy", &vip_tcp(), "--allow", "10.10.1.0/33"]);
    assert!(!bad.status.success());
    // A per-client rate: a burst of 5, then one per minute.
    a.ok(&[
        "vip",
        "policy",
        &vip_tcp(),
        "--rate-limit",
        "1",
        "--rate-burst",
        "5",
    ]);
    let list = a.ok(&["config", "export"]);
    assert!(
        list.contains("burst = 5") && !list.contains("allow"),
        "{list}"
    );
    // (The rate is per second: 5 at once, then about one a second.)
    let ok = try_tcp(12);
    assert!((5..=8).contains(&ok), "{ok} of 12 admitted");
    assert!(vip_drops(&a, "drop_src_rate") >= 5);
    // No limits: everything again.
    a.ok(&["vip", "policy", &vip_tcp()]);
    assert_eq!(try_tcp(20), 20);

    // GUE through `apply`: the backends' decap takes it on port 6080 (the default). With GUE
    // off on the backends the traffic stops (so it was GUE), and comes back with the port.
    let mut exported = a.ok(&["config", "export"]);
    exported = exported.replacen("[balancer]\n", "[balancer]\nencap = \"gue\"\n", 1);
    let file = scratch.0.dir.join("gue.toml");
    std::fs::write(&file, &exported).unwrap();
    let out = a.ok(&["apply", "-f", file.to_str().unwrap()]);
    assert!(out.contains("balancer settings"), "{out}");
    assert_eq!(try_tcp(20), 20, "TCP over GUE");
    decap_gue_port(&t, &scratch, 0);
    assert_eq!(try_tcp(3), 0, "the backends decapsulated without GUE");
    decap_gue_port(&t, &scratch, lb_common::DEFAULT_GUE_PORT);
    assert_eq!(try_tcp(20), 20);
    let (useen, ufailed) = spread(&t, 100, true);
    assert_eq!(ufailed, 0, "UDP over GUE: {useen:?}");
}
