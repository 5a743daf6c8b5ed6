//! The control plane end to end, as root, in namespaces this test creates: slots and indices
//! are freed and reused, the pinned maps equal what the state file implies slot for slot
//! after every path (restarts, SIGKILL at random moments of a large apply, VIPs sharing
//! backends), concurrent writers all get an answer, and an older map layout is migrated
//! while traffic flows.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use lb_userspace::{
    datapath::{LAYOUT, observe_pinned},
    reconcile::verify,
    state::{State, VipSpec},
    store::read_state,
};
use maglb_tests::{
    agent::{Agent, Scratch, operated_topology},
    netns::{Netns, unique_prefix},
    topology::{self, TCP_PORT, Topology, UDP_PORT, VIP, backend_addr, vip_addr},
    traffic::Traffic,
};

const BIN: &str = env!("CARGO_BIN_EXE_maglb-cli");
const TIMEOUT: Duration = Duration::from_secs(3);

fn bin() -> &'static Path {
    Path::new(BIN)
}

/// What the agent's state file holds.
fn saved(a: &Agent) -> State {
    read_state(&a.paths.state_dir).expect("state directory")
}

/// The pinned maps equal what the state file implies (every backend up: these tests set no
/// health checks).
fn assert_maps_equal_state(a: &Agent, when: &str) {
    let state = saved(a);
    let specs: Vec<VipSpec> = state.vips.iter().map(|v| v.spec(|_| true)).collect();
    let obs = observe_pinned(&a.paths.bpffs).expect("reading the pins");
    let diff = verify(&obs, &specs);
    assert!(diff.is_empty(), "{when}: maps and state differ: {diff:#?}");
}

fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// `n` VIPs of `per` backends each; VIP `i` at 10.201.x.y, backends from `base` on. The
/// backends are addresses no one answers at, so probing is off.
fn many(n: u32, per: u32, base: u32, ring: u32) -> String {
    let mut c = String::new();
    for v in 0..n {
        c += &format!(
            "[[vip]]\naddress = \"10.201.{}.{}:80/tcp\"\nring_size = {ring}\nhealth = {{ kind = \"none\" }}\n",
            v >> 8,
            v & 255
        );
        for b in 0..per {
            let x = base + v * per + b;
            c += &format!(
                "[[vip.backend]]\naddress = \"{}\"\n",
                Ipv4Addr::new(10, 64 + (x >> 16) as u8, (x >> 8) as u8, x as u8)
            );
        }
    }
    c
}

/// The real VIPs of the topology: TCP and UDP over the three backends with `weights`.
fn real(weights: [u32; 3]) -> String {
    let mut c = String::new();
    for vip in [
        format!("{VIP}:{TCP_PORT}/tcp"),
        format!("{VIP}:{UDP_PORT}/udp"),
    ] {
        c += &format!("[[vip]]\naddress = \"{vip}\"\n");
        for (i, w) in weights.iter().enumerate() {
            c += &format!(
                "[[vip.backend]]\naddress = \"{}\"\nweight = {w}\n",
                backend_addr(i)
            );
        }
    }
    c
}

fn tcp_spread(t: &Topology, n: usize) -> (BTreeSet<String>, usize) {
    t.client
        .run(move || {
            let mut seen = BTreeSet::new();
            let mut failed = 0;
            for _ in 0..n {
                match topology::tcp_request(vip_addr(TCP_PORT), TIMEOUT) {
                    Ok(b) => {
                        seen.insert(b);
                    }
                    Err(_) => failed += 1,
                }
            }
            (seen, failed)
        })
        .unwrap()
}

#[test]
fn slots_are_freed_over_100_rounds_of_1000_new_backends() {
    let scratch = Scratch::new("cts");
    let ns = Netns::new(&format!("{}-cp", unique_prefix("cts"))).unwrap();
    let a = Agent::start(bin(), &ns, &scratch.0).unwrap();
    for round in 0..100u32 {
        let file = write_file(
            &scratch.0.dir,
            "round.toml",
            &many(1, 1000, round * 1000, 1009),
        );
        let o = a.cli(&["apply", "-f", file.to_str().unwrap()]);
        assert!(
            o.status.success(),
            "round {round} refused: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let status: serde_json::Value =
            serde_json::from_str(&a.ok(&["status", "--output", "json"])).unwrap();
        assert_eq!(status["backends"], 1000, "round {round}");
        if round % 25 == 24 {
            assert_maps_equal_state(&a, &format!("round {round}"));
            let obs = observe_pinned(&a.paths.bpffs).unwrap();
            let in_use = obs.slots_by_pair().len();
            assert_eq!(in_use, 1000, "round {round}: in-use slots");
            assert!(obs.slots.len() <= lb_common::MAX_BACKENDS as usize);
        }
    }
}

#[test]
fn a_new_vip_starts_with_zero_counters_even_on_a_reused_index() {
    let scratch = Scratch::new("ctz");
    let (t, a) = operated_topology(bin(), "ctz", &scratch, 3);
    let file = write_file(&scratch.0.dir, "real.toml", &real([1, 1, 1]));
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    a.wait_ready();
    let (_, failed) = tcp_spread(&t, 50);
    assert_eq!(failed, 0);
    // Every index gets used again: the two VIPs go, and the whole index space is taken by
    // new VIPs (one backend each), so the indices that carried traffic are reused.
    let file = write_file(
        &scratch.0.dir,
        "all.toml",
        &many(lb_common::MAX_VIPS, 1, 0, 7),
    );
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    let stats: serde_json::Value =
        serde_json::from_str(&a.ok(&["stats", "--output", "json"])).unwrap();
    let vips = stats["vips"].as_array().unwrap();
    assert_eq!(vips.len(), lb_common::MAX_VIPS as usize);
    for v in vips {
        assert_eq!(v["packets"], 0, "{v}");
        assert_eq!(v["new_flows"], 0, "{v}");
    }
    let scrape =
        t.lb.exec(
            "curl",
            &[
                "-sf",
                "-H",
                "Connection: close",
                "http://127.0.0.1:9477/metrics",
            ],
        )
        .unwrap();
    let nonzero: Vec<&str> = scrape
        .lines()
        .filter(|l| l.starts_with("maglb_vip_") && !l.ends_with(" 0"))
        .collect();
    assert!(nonzero.is_empty(), "{nonzero:?}");
    assert_maps_equal_state(&a, "after the reuse");
}

#[test]
fn fifty_concurrent_writers_are_all_applied() {
    let scratch = Scratch::new("ctw");
    let ns = Netns::new(&format!("{}-cp", unique_prefix("ctw"))).unwrap();
    let a = Agent::start(bin(), &ns, &scratch.0).unwrap();
    a.ok(&["vip", "add", "10.201.0.1:80/tcp"]);
    // No one answers at the backends' addresses: no probes.
    a.ok(&["vip", "health", "10.201.0.1:80/tcp", "--kind", "none"]);
    // Idle connections held open meanwhile lock nobody out.
    let idle: Vec<_> = (0..20)
        .map(|_| std::os::unix::net::UnixStream::connect(&scratch.0.socket).unwrap())
        .collect();
    let children: Vec<_> = (0..50)
        .map(|i| {
            Command::new(BIN)
                .arg("--socket")
                .arg(&scratch.0.socket)
                .args([
                    "backend",
                    "add",
                    "10.201.0.1:80/tcp",
                    &format!("10.70.0.{}", i + 1),
                ])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let o = c.wait_with_output().unwrap();
        assert!(
            o.status.success(),
            "writer {i}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    drop(idle);
    let list = a.ok(&["backend", "list", "10.201.0.1:80/tcp"]);
    assert_eq!(list.lines().count(), 51, "{list}");
    assert_maps_equal_state(&a, "after 50 writers");
}

#[test]
fn maps_equal_the_state_after_restarts_shared_backends_and_kills() {
    let scratch = Scratch::new("ctm");
    let (t, mut a) = operated_topology(bin(), "ctm", &scratch, 3);
    // Two VIPs share every backend address.
    let file = write_file(&scratch.0.dir, "real.toml", &real([1, 2, 1]));
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    a.wait_ready();
    assert_maps_equal_state(&a, "two VIPs");
    // The held-out case: delete one VIP, restart cleanly, then on the other add a backend
    // and remove a shared one.
    let tcp = format!("{VIP}:{TCP_PORT}/tcp");
    let udp = format!("{VIP}:{UDP_PORT}/udp");
    a.ok(&["vip", "del", &tcp]);
    a.stop();
    a = Agent::start(bin(), &t.lb, &scratch.0).unwrap();
    assert_maps_equal_state(&a, "restarted");
    a.ok(&["backend", "add", &udp, "10.10.3.99"]);
    a.ok(&["backend", "del", &udp, &backend_addr(0).to_string()]);
    assert_maps_equal_state(&a, "shared backend removed");
    // SIGKILL at moments spread over applies that alternate between two states.
    let files = [
        write_file(
            &scratch.0.dir,
            "one.toml",
            &(real([1, 1, 1]) + &many(20, 10, 0, 997)),
        ),
        write_file(
            &scratch.0.dir,
            "two.toml",
            &(real([3, 1, 0]) + &many(25, 8, 5000, 1009)),
        ),
    ];
    for run in 0..8u64 {
        let f = &files[(run % 2) as usize];
        let mut apply = Command::new(BIN)
            .arg("--socket")
            .arg(&scratch.0.socket)
            .args(["apply", "-f", f.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(run * 37 % 200));
        a.kill9();
        a = Agent::start(bin(), &t.lb, &scratch.0).unwrap();
        let _ = apply.wait();
        assert_maps_equal_state(&a, &format!("kill {run}"));
    }
    let file = write_file(&scratch.0.dir, "last.toml", &real([1, 1, 1]));
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    assert_maps_equal_state(&a, "last");
    let (seen, failed) = tcp_spread(&t, 300);
    assert_eq!(failed, 0);
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[test]
fn sigkill_during_a_large_apply_leaves_the_old_or_the_new_state() {
    let scratch = Scratch::new("ctk");
    let (t, mut a) = operated_topology(bin(), "ctk", &scratch, 3);
    let old_text = real([1, 1, 1]) + &many(30, 20, 0, 997);
    let new_text = real([1, 0, 1]) + &many(30, 20, 10_000, 1009);
    let old = write_file(&scratch.0.dir, "old.toml", &old_text);
    let new = write_file(&scratch.0.dir, "new.toml", &new_text);
    let (old_s, new_s) = (
        State::from_toml(&old_text).unwrap(),
        State::from_toml(&new_text).unwrap(),
    );
    for run in 0..5u64 {
        a.ok(&["apply", "-f", old.to_str().unwrap()]);
        a.wait_ready();
        let apply = Command::new(BIN)
            .arg("--socket")
            .arg(&scratch.0.socket)
            .args(["apply", "-f", new.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(5 + run * 41));
        a.kill9();
        let restarted = Instant::now();
        a = Agent::start(bin(), &t.lb, &scratch.0).unwrap();
        let out = apply.wait_with_output().unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let now = saved(&a);
        let is_new = now.vips == new_s.vips;
        assert!(
            is_new || now.vips == old_s.vips,
            "run {run}: a state that is neither"
        );
        // The CLI's answer is the truth about which one.
        assert_eq!(
            out.status.success(),
            is_new,
            "run {run}: the CLI said {said:?} but the state is the {} one",
            if is_new { "new" } else { "old" }
        );
        assert_maps_equal_state(&a, &format!("run {run}"));
        a.wait_ready();
        let (seen, failed) = tcp_spread(&t, 100);
        assert_eq!(failed, 0, "run {run}");
        assert!(seen.len() >= 2, "run {run}: {seen:?}");
        eprintln!(
            "run {run}: {} state, agent back in {:?}",
            if is_new { "new" } else { "old" },
            restarted.elapsed()
        );
    }
}

#[test]
fn an_older_layout_is_migrated_while_traffic_flows() {
    let scratch = Scratch::new("ctl");
    let (t, mut a) = operated_topology(bin(), "ctl", &scratch, 3);
    let file = write_file(&scratch.0.dir, "real.toml", &real([1, 1, 1]));
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    a.wait_ready();
    let traffic = Traffic::start(&t);
    std::thread::sleep(Duration::from_millis(300));
    // An agent of an older layout stops; its pins (link included) stay, under its layout's
    // directory name.
    a.kill9();
    let layout = scratch.0.bpffs.join(LAYOUT);
    let older = scratch.0.bpffs.join("maps-v0");
    std::fs::rename(&layout, &older).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    a = Agent::start(bin(), &t.lb, &scratch.0).unwrap();
    a.wait_ready();
    std::thread::sleep(Duration::from_millis(500));
    let (failed, broken, gap) = traffic.stop();
    assert!(!older.exists(), "the older layout's pins are still there");
    assert!(layout.join("link").exists());
    let status: serde_json::Value =
        serde_json::from_str(&a.ok(&["status", "--output", "json"])).unwrap();
    assert_eq!(status["attached"], true);
    assert!(a.log().contains("migrating"), "{}", a.log());
    assert_eq!(
        failed,
        0,
        "failed requests during the migration; agent log:\n{}",
        a.log()
    );
    assert!(broken.is_empty(), "broken connections: {broken:?}");
    eprintln!("longest gap between completed requests: {gap:?}");
    assert_maps_equal_state(&a, "migrated");
}

/// The state directory is the truth: the unit's `--initial-config` file is read on the first
/// start only, and a restart keeps every change made through the API since.
#[test]
fn the_initial_config_is_read_once_and_the_state_directory_stays_the_truth() {
    let scratch = Scratch::new("cti");
    let ns = Netns::new(&format!("{}-cp", unique_prefix("cti"))).unwrap();
    std::fs::create_dir_all(&scratch.0.dir).unwrap();
    let file = write_file(
        &scratch.0.dir,
        "maglb.toml",
        "[[vip]]\naddress = \"10.201.0.1:80/tcp\"\n",
    );
    let start = || {
        let mut cmd = ns.command("sh").unwrap();
        cmd.args([
            "-c",
            "exec \"$0\" \"$@\" --initial-config \"$MAGLB_INITIAL\"",
        ])
        .arg(BIN)
        .env("MAGLB_INITIAL", &file);
        Agent::start_with(cmd, bin(), &scratch.0).unwrap()
    };
    let mut a = start();
    assert!(a.ok(&["vip", "list"]).contains("10.201.0.1:80/tcp"));
    a.ok(&["vip", "add", "10.201.0.2:80/tcp"]);
    a.ok(&["vip", "del", "10.201.0.1:80/tcp"]);
    a.stop();
    let a = start();
    let list = a.ok(&["vip", "list"]);
    assert!(
        list.contains("10.201.0.2:80/tcp") && !list.contains("10.201.0.1:80/tcp"),
        "the file was applied again: {list}"
    );
}
