//! Faults end to end, as root, in namespaces (and mount namespaces) this test creates: a
//! VIP without a configured check loses a stopped backend within the default check's
//! detection window; probe verdicts survive restarts and new backends can start down; a full
//! or read-only state directory refuses changes and changes nothing; a corrupt state file
//! stops the agent (naming the file, line and field) but not the pinned datapath; a pinned
//! link whose interface is gone is unpinned and the agent starts detached with its state; a
//! router that changes its MAC is followed at once.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use lb_userspace::{
    datapath::{LAYOUT, observe_pinned},
    reconcile::verify,
    state::{State, VipId, VipSpec},
    store::read_state,
};
use maglb_tests::{
    agent::{Agent, AgentPaths, Scratch, cli, operated_topology},
    netns::{Netns, unique_prefix},
    topology::{TCP_PORT, VIP, backend_addr, vip_addr, wait_for},
    traffic::{Request, Requests},
};

const BIN: &str = env!("CARGO_BIN_EXE_maglb-cli");

fn bin() -> &'static Path {
    Path::new(BIN)
}

fn vip() -> String {
    format!("{VIP}:{TCP_PORT}/tcp")
}

/// The VIP with backends 0-2, forwarding.
fn serve_vip(a: &Agent) {
    a.ok(&["vip", "add", &vip()]);
    for i in 0..3 {
        a.ok(&["backend", "add", &vip(), &backend_addr(i).to_string()]);
    }
    a.wait_ready();
}

fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// One probe as `maglb health --output json` shows it: (up, last result, checks); `None`
/// while it has no result (and counts as up).
fn probe(a: &Agent, backend: IpAddr) -> Option<(bool, String, u64)> {
    let v: serde_json::Value =
        serde_json::from_str(&a.ok(&["health", "--output", "json"])).unwrap();
    v.as_array()?
        .iter()
        .find(|p| p["backend"].as_str() == Some(&backend.to_string()))
        .and_then(|p| p.get("health").filter(|h| !h.is_null()))
        .map(|h| {
            (
                h["up"].as_bool().unwrap(),
                h["last"].as_str().unwrap_or("").to_owned(),
                h["checks"].as_u64().unwrap_or(0),
            )
        })
}

/// Waits until the probes of `backend` say `up`; returns how long it took.
fn wait_probe(a: &Agent, backend: IpAddr, up: bool, limit: Duration) -> Duration {
    let t = Instant::now();
    assert!(
        wait_for(limit, || probe(a, backend).is_some_and(|p| p.0 == up)),
        "{backend} not {} within {limit:?}: {}",
        if up { "up" } else { "down" },
        a.ok(&["health"])
    );
    t.elapsed()
}

/// The pinned maps carry `state` with the backends in `down` out, slot for slot.
fn assert_maps_carry(bpffs: &Path, state: &State, down: &BTreeSet<(VipId, IpAddr)>, when: &str) {
    let specs: Vec<VipSpec> = state
        .vips
        .iter()
        .map(|v| v.spec(|a| !down.contains(&(v.address, *a))))
        .collect();
    let obs = observe_pinned(bpffs).expect("reading the pins");
    let diff = verify(&obs, &specs);
    assert!(diff.is_empty(), "{when}: maps and state differ: {diff:#?}");
}

/// Backends that answered, and failures, of requests.
fn tally(log: &[Request]) -> (BTreeMap<String, usize>, usize) {
    let mut seen = BTreeMap::new();
    let mut failed = 0;
    for r in log {
        match &r.result {
            Ok(b) => *seen.entry(b.clone()).or_insert(0) += 1,
            Err(_) => failed += 1,
        }
    }
    (seen, failed)
}

/// The held-out case: a VIP with no check configured, one backend's server stopped. The
/// default check (TCP connect to the VIP's port, every 2000 ms, timeout 1000 ms, fall 3)
/// takes it out, so requests fail only within its detection window, and none after it.
#[test]
fn a_vip_without_a_check_loses_a_stopped_backend_within_the_default_window() {
    const INTERVAL_MS: u64 = 2000;
    const TIMEOUT_MS: u64 = 1000;
    const FALL: u64 = 3;
    let scratch = Scratch::new("fdh");
    let (t, a) = operated_topology(bin(), "fdh", &scratch, 3);
    serve_vip(&a);
    // Every backend is probed, with the default check, and found up.
    let probes: serde_json::Value =
        serde_json::from_str(&a.ok(&["health", "--output", "json"])).unwrap();
    let kinds: Vec<&str> = probes
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["kind"].as_str())
        .collect();
    assert_eq!(kinds, ["tcp"; 3], "{probes}");
    for i in 0..3 {
        wait_probe(&a, backend_addr(i).into(), true, Duration::from_secs(6));
        assert_eq!(probe(&a, backend_addr(i).into()).unwrap().1, "ok");
    }
    let stream = Requests::start(
        &t.client,
        vec![vip_addr(TCP_PORT)],
        Duration::from_millis(1000),
        Duration::from_millis(10),
    );
    std::thread::sleep(Duration::from_secs(1));
    let stopped = Instant::now();
    t.ctl[1].serving.store(false, Ordering::Relaxed);
    let window = Duration::from_millis(FALL * INTERVAL_MS + TIMEOUT_MS);
    let slack = Duration::from_millis(1000);
    let took = wait_probe(&a, backend_addr(1).into(), false, window + slack * 3);
    let detected = Instant::now();
    // Long enough after the detection for a few hundred requests.
    std::thread::sleep(Duration::from_secs(4));
    let log = stream.stop();
    let failed: Vec<&Request> = log.iter().filter(|r| !r.ok()).collect();
    let before = failed.iter().filter(|r| r.end < stopped).count();
    let inside = failed
        .iter()
        .filter(|r| r.end >= stopped && r.start <= stopped + window + slack)
        .count();
    let after: Vec<&Request> = log.iter().filter(|r| r.start > detected).collect();
    let after_failed = after.iter().filter(|r| !r.ok()).count();
    let last_failure = failed.iter().map(|r| r.start - stopped.min(r.start)).max();
    println!(
        "default check: b1 stopped -> down after {took:?} (window {window:?} + {slack:?} slack); \
         {} requests, {} failed: {before} before the stop, {inside} inside the window, \
         the last failed request started {last_failure:?} after the stop; \
         {} requests after the detection, {after_failed} failed",
        log.len(),
        failed.len(),
        after.len()
    );
    assert!(took <= window + slack, "detection took {took:?}");
    assert_eq!(before, 0, "requests failed before the stop");
    assert_eq!(
        inside,
        failed.len(),
        "requests failed outside the detection window"
    );
    assert!(after.len() >= 150, "too few requests after the detection");
    assert_eq!(after_failed, 0, "requests failed after the detection");
    assert!(
        after
            .iter()
            .all(|r| r.result.as_deref().is_ok_and(|b| b != "b1")),
        "new flows to b1 after it was taken out"
    );
}

/// Probe verdicts are kept: a restarted agent sends no new flow to a backend it knew was
/// down, and brings it back only after `rise` probes pass. A backend added with
/// `initial = "down"` takes no new flow before its probes pass, also when the agent was
/// killed before any probe (the journal's replay holds it down).
#[test]
fn verdicts_survive_restarts_and_new_backends_can_start_down() {
    const RISE: u64 = 3;
    let scratch = Scratch::new("fdr");
    let (t, mut a) = operated_topology(bin(), "fdr", &scratch, 4);
    let v = vip();
    let id: VipId = v.parse().unwrap();
    a.ok(&["vip", "add", &v]);
    for i in 0..3 {
        a.ok(&["backend", "add", &v, &backend_addr(i).to_string()]);
    }
    let check = [
        "--kind",
        "tcp",
        "--interval-ms",
        "200",
        "--timeout-ms",
        "150",
        "--rise",
        "3",
        "--fall",
        "2",
    ];
    let mut args = vec!["vip", "health", &v];
    args.extend(check);
    a.ok(&args);
    a.wait_ready();
    for i in 0..3 {
        wait_probe(&a, backend_addr(i).into(), true, Duration::from_secs(3));
    }
    let b1: IpAddr = backend_addr(1).into();
    t.ctl[1].serving.store(false, Ordering::Relaxed);
    wait_probe(&a, b1, false, Duration::from_secs(3));

    // 1. Killed and restarted while b1 is down: b1 stays out from the first moment.
    a.kill9();
    a = Agent::start(bin(), &t.lb, &scratch.0).unwrap();
    assert!(
        wait_for(Duration::from_millis(500), || probe(&a, b1)
            .is_some_and(|p| !p.0 && p.2 <= 1)),
        "b1 not down right after the restart: {}",
        a.ok(&["health"])
    );
    let state = read_state(&scratch.0.state_dir).unwrap();
    assert_maps_carry(
        &scratch.0.bpffs,
        &state,
        &BTreeSet::from([(id, b1)]),
        "restarted",
    );
    let (seen, failed) = t.tcp_requests(90);
    assert_eq!(failed, 0, "{seen:?}");
    assert!(!seen.contains_key("b1"), "new flows to b1: {seen:?}");
    // Its server back: up only after `rise` probes passed.
    t.ctl[1].serving.store(true, Ordering::Relaxed);
    let back = wait_probe(&a, b1, true, Duration::from_secs(3));
    let (_, _, checks) = probe(&a, b1).unwrap();
    println!("b1 known down at restart: up again {back:?} after its server, after {checks} checks");
    assert!(checks >= RISE, "b1 came up after {checks} checks");
    let (seen, failed) = t.tcp_requests(90);
    assert_eq!(failed, 0);
    assert!(seen.contains_key("b1"), "{seen:?}");

    // 2. initial = "down": a new backend whose server does not answer takes no flow.
    let mut args = vec!["vip", "health", &v];
    args.extend(check);
    args.extend(["--initial", "down"]);
    a.ok(&args);
    assert!(a.ok(&["config", "export"]).contains("initial = \"down\""));
    t.ctl[3].serving.store(false, Ordering::Relaxed);
    let b3: IpAddr = backend_addr(3).into();
    let stream = Requests::start(
        &t.client,
        vec![vip_addr(TCP_PORT)],
        Duration::from_millis(1000),
        Duration::from_millis(5),
    );
    std::thread::sleep(Duration::from_millis(300));
    a.ok(&["backend", "add", &v, &b3.to_string()]);
    // The writer held it down before it answered; the probes show it at once too.
    assert!(
        wait_for(Duration::from_millis(500), || probe(&a, b3)
            .is_some_and(|p| !p.0)),
        "b3 not down from the moment it was added: {}",
        a.ok(&["health"])
    );
    std::thread::sleep(Duration::from_millis(1500));
    let log = stream.stop();
    let (seen, failed) = tally(&log);
    println!(
        "initial = down, server stopped: {} requests, {failed} failed, {seen:?}",
        log.len()
    );
    assert_eq!(failed, 0, "requests failed: {seen:?}");
    assert!(!seen.contains_key("b3"));

    // 3. Added, and the agent killed before any probe: the journal's replay holds it down.
    a.ok(&["backend", "del", &v, &b3.to_string()]);
    a.ok(&["backend", "add", &v, &b3.to_string()]);
    a.kill9();
    a = Agent::start(bin(), &t.lb, &scratch.0).unwrap();
    assert!(
        wait_for(Duration::from_millis(500), || probe(&a, b3)
            .is_some_and(|p| !p.0)),
        "b3 not down after the replay: {}",
        a.ok(&["health"])
    );
    let state = read_state(&scratch.0.state_dir).unwrap();
    assert_maps_carry(
        &scratch.0.bpffs,
        &state,
        &BTreeSet::from([(id, b3)]),
        "replayed",
    );
    assert!(a.ok(&["verify"]).is_empty());
    let (seen, failed) = t.tcp_requests(90);
    assert_eq!(failed, 0, "{seen:?}");
    assert!(!seen.contains_key("b3"));
    // Its server starts: up after `rise` probes, then it takes flows.
    t.ctl[3].serving.store(true, Ordering::Relaxed);
    let up = wait_probe(&a, b3, true, Duration::from_secs(3));
    let (_, _, checks) = probe(&a, b3).unwrap();
    println!("b3 (initial = down) up {up:?} after its server started, after {checks} checks");
    assert!(checks >= RISE, "b3 came up after {checks} checks");
    let (seen, failed) = t.tcp_requests(120);
    assert_eq!(failed, 0);
    assert!(seen.contains_key("b3"), "{seen:?}");
}

/// A balancer whose own interface is down cannot reach any backend, and that says nothing
/// about them: their verdicts stay (so that a VRRP failback brings back the peer's tables,
/// not a balancer that took every backend down), and probes judge again once it is up.
#[test]
fn probes_do_not_judge_backends_while_the_balancers_own_link_is_down() {
    let scratch = Scratch::new("fdk");
    let (t, a) = operated_topology(bin(), "fdk", &scratch, 2);
    let v = vip();
    a.ok(&["vip", "add", &v]);
    for i in 0..2 {
        a.ok(&["backend", "add", &v, &backend_addr(i).to_string()]);
    }
    a.ok(&[
        "vip",
        "health",
        &v,
        "--kind",
        "tcp",
        "--interval-ms",
        "100",
        "--timeout-ms",
        "80",
        "--fall",
        "2",
    ]);
    for i in 0..2 {
        wait_probe(&a, backend_addr(i).into(), true, Duration::from_secs(3));
    }
    t.lb.ip(&["link", "set", "l0", "down"]).unwrap();
    // Ten intervals: five times what `fall` needs.
    std::thread::sleep(Duration::from_millis(1000));
    for i in 0..2 {
        let (up, last, _) = probe(&a, backend_addr(i).into()).unwrap();
        assert!(up, "b{i} taken down while l0 was down: {last}");
        assert!(last.contains("not judged: l0 is down"), "{last}");
    }
    assert!(a.log().contains("failed probes do not take backends down"));
    t.lb.ip(&["link", "set", "l0", "up"]).unwrap();
    t.lb.ip(&["route", "replace", "default", "via", "10.10.2.1"])
        .unwrap();
    assert!(wait_for(Duration::from_secs(3), || probe(
        &a,
        backend_addr(0).into()
    )
    .is_some_and(|p| p.1 == "ok")));
    // Judged again: a stopped server goes down.
    t.ctl[1].serving.store(false, Ordering::Relaxed);
    wait_probe(&a, backend_addr(1).into(), false, Duration::from_secs(3));
}

/// `n` VIPs of `per` backends (addresses no one answers at: probing off), weight `w`.
fn many(n: u32, per: u32, w: u32) -> String {
    let mut c = String::new();
    for v in 0..n {
        c += &format!(
            "[[vip]]\naddress = \"10.201.{}.{}:80/tcp\"\nring_size = 1009\nhealth = {{ kind = \"none\" }}\n",
            v >> 8,
            v & 255
        );
        for b in 0..per {
            let x = v * per + b;
            c += &format!(
                "[[vip.backend]]\naddress = \"{}\"\nweight = {w}\n",
                Ipv4Addr::new(10, 64 + (x >> 16) as u8, (x >> 8) as u8, x as u8)
            );
        }
    }
    c
}

/// The agent in a private mount namespace whose state directory is the mount `mount`
/// makes (a shell command using "$D", the state directory). The mount ends with the agent.
fn start_on_mount(ns: &Netns, paths: &AgentPaths, mount: &str, extra: &[(&str, &Path)]) -> Agent {
    let script = format!("mkdir -p \"$D\" && {mount} && exec \"$0\" \"$@\"");
    let mut cmd = ns.command("unshare").unwrap();
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .arg(BIN)
        .env("D", &paths.state_dir);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    Agent::start_with(cmd, bin(), paths).expect("agent on its own mount")
}

/// A path inside the agent's mount namespace.
fn inside(a: &Agent, p: &Path) -> PathBuf {
    PathBuf::from(format!("/proc/{}/root", a.pid().unwrap())).join(p.strip_prefix("/").unwrap())
}

/// What must not change when a change is refused: the exported config, the state on disk
/// and the pinned maps (which must carry that state).
fn unchanged(a: &Agent, before: &(String, State), when: &str) {
    assert_eq!(
        a.ok(&["config", "export"]),
        before.0,
        "{when}: export changed"
    );
    let now = read_state(&inside(a, &a.paths.state_dir)).unwrap();
    assert_eq!(now, before.1, "{when}: the state on disk changed");
    assert_maps_carry(&a.paths.bpffs, &before.1, &BTreeSet::new(), when);
    assert!(a.ok(&["verify"]).is_empty(), "{when}");
    let tmp: Vec<_> = std::fs::read_dir(inside(a, &a.paths.state_dir))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".tmp"))
        .collect();
    assert!(tmp.is_empty(), "{when}: temp files left: {tmp:?}");
}

fn before(a: &Agent) -> (String, State) {
    (
        a.ok(&["config", "export"]),
        read_state(&inside(a, &a.paths.state_dir)).unwrap(),
    )
}

/// A POST to the admin socket with curl (the body on its standard input): (HTTP status,
/// body).
fn post(socket: &Path, path: &str, body: &str) -> (u16, String) {
    use std::io::Write as _;
    let mut child = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(socket)
        .args([
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
            &format!("http://maglb{path}"),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", ""));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

fn refused_by_cli(a: &Agent, args: &[&str], want: &str) -> String {
    let o = a.cli(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "maglb {args:?} succeeded");
    assert!(err.contains(want), "maglb {args:?}: {err}");
    assert!(err.contains("nothing was changed"), "{err}");
    err
}

/// A full disk: a change is refused with 507 and a message once it cannot be made durable,
/// and neither the state nor the datapath changes, with no temp file left. Changes that fit
/// the journal's preallocated space are still made (they are durable there); the refusal
/// comes when the journal is full and the snapshot that must follow does not fit. After
/// space is freed, changes work again.
#[test]
fn a_full_state_directory_refuses_changes_and_changes_nothing() {
    let scratch = Scratch::new("fdf");
    let ns = Netns::new(&format!("{}-cp", unique_prefix("fdf"))).unwrap();
    // 24 MiB: the 16 MiB journal, snapshots of a few MiB, and the filler.
    let a = start_on_mount(
        &ns,
        &scratch.0,
        "mount -t tmpfs -o size=24m,mode=0700 maglb-test-full \"$D\"",
        &[],
    );
    let files: Vec<PathBuf> = (0..2)
        .map(|w| {
            write_file(
                &scratch.0.dir,
                &format!("w{w}.toml"),
                &many(20, 1000, w + 1),
            )
        })
        .collect();
    a.ok(&["apply", "-f", files[0].to_str().unwrap()]);
    // Fill the disk.
    let filler = inside(&a, &scratch.0.state_dir.join("filler"));
    {
        use std::io::Write as _;
        let mut f = std::fs::File::create(&filler).unwrap();
        let chunk = vec![0xa5u8; 1 << 20];
        let mut full = false;
        for _ in 0..64 {
            if f.write_all(&chunk).and_then(|()| f.sync_data()).is_err() {
                full = true;
                break;
            }
        }
        assert!(full, "the tmpfs did not fill");
    }
    // A small change still commits: the journal's blocks are allocated ahead.
    a.ok(&["vip", "add", "10.201.9.1:80/tcp"]);
    assert!(
        read_state(&inside(&a, &scratch.0.state_dir))
            .unwrap()
            .vip(&"10.201.9.1:80/tcp".parse().unwrap())
            .is_some()
    );
    // Large changes fill the journal; the snapshot that must follow does not fit.
    let mut refused = None;
    for round in 1..=60usize {
        let snap = before(&a);
        let file = files[round % 2].to_str().unwrap().to_owned();
        let o = a.cli(&["apply", "-f", &file]);
        if !o.status.success() {
            let err = String::from_utf8_lossy(&o.stderr).into_owned();
            refused = Some((round, err, snap));
            break;
        }
    }
    let (round, err, snap) = refused.expect("no change was refused on a full disk");
    println!("full disk: change {round} refused: {err}");
    assert!(err.contains("disk is full"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");
    unchanged(&a, &snap, "after the refused apply");
    // The API answers 507 with the same meaning. (A change small enough for the rest of
    // the journal would still be made: it is durable there.)
    let text = std::fs::read_to_string(&files[round % 2]).unwrap();
    let (code, body) = post(
        &scratch.0.socket,
        "/v1/apply",
        &serde_json::json!({ "config": text }).to_string(),
    );
    assert_eq!(code, 507, "{body}");
    assert!(body.contains("disk is full"), "{body}");
    unchanged(&a, &snap, "after the refused API change");
    // Space again: changes work.
    std::fs::remove_file(&filler).unwrap();
    a.ok(&["vip", "add", "10.201.9.2:80/tcp"]);
    let now = read_state(&inside(&a, &scratch.0.state_dir)).unwrap();
    assert!(now.vip(&"10.201.9.2:80/tcp".parse().unwrap()).is_some());
    assert_maps_carry(
        &scratch.0.bpffs,
        &now,
        &BTreeSet::new(),
        "after freeing space",
    );
}

/// The loop device behind the agent's state directory.
fn loop_device(a: &Agent) -> String {
    let info = std::fs::read_to_string(format!("/proc/{}/mountinfo", a.pid().unwrap())).unwrap();
    let dir = a.paths.state_dir.to_str().unwrap().to_owned();
    let line = info
        .lines()
        .find(|l| l.split_whitespace().nth(4) == Some(&dir))
        .unwrap_or_else(|| panic!("no mount at {dir}: {info}"));
    let source = line.split(" - ").nth(1).unwrap().split_whitespace().nth(1);
    source.unwrap().trim_start_matches("/dev/").to_owned()
}

/// A state directory whose file system turns read-only under the agent (ext4 with
/// errors=remount-ro after an error, as the kernel does on a failing disk): changes are
/// refused with 507 and a message, nothing changes. After a repair (fsck) and a restart, the
/// state is the last acknowledged one and changes work.
#[test]
fn a_read_only_state_directory_refuses_changes_and_changes_nothing() {
    let scratch = Scratch::new("fdo");
    let ns = Netns::new(&format!("{}-cp", unique_prefix("fdo"))).unwrap();
    std::fs::create_dir_all(&scratch.0.dir).unwrap();
    let img = scratch.0.dir.join("state.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let mkfs = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(mkfs.status.success(), "{mkfs:?}");
    let mount = "mount -o loop,errors=remount-ro \"$IMG\" \"$D\"";
    let start = || start_on_mount(&ns, &scratch.0, mount, &[("IMG", &img)]);
    let mut a = start();
    let file = write_file(&scratch.0.dir, "two.toml", &many(2, 10, 1));
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    let snap = before(&a);
    let dev = loop_device(&a);
    std::fs::write(format!("/sys/fs/ext4/{dev}/trigger_fs_error"), "1").unwrap();
    let err = refused_by_cli(&a, &["vip", "add", "10.201.9.1:80/tcp"], "read-only");
    println!("read-only state directory: {err}");
    let (code, body) = post(
        &scratch.0.socket,
        "/v1/backends",
        r#"{"vip": "10.201.0.0:80/tcp", "address": "10.65.0.1"}"#,
    );
    assert_eq!(code, 507, "{body}");
    assert!(body.contains("read-only"), "{body}");
    refused_by_cli(
        &a,
        &[
            "apply",
            "-f",
            write_file(&scratch.0.dir, "one.toml", &many(1, 10, 1))
                .to_str()
                .unwrap(),
        ],
        "read-only",
    );
    unchanged(&a, &snap, "read-only");
    // Repaired and restarted: the last acknowledged state, and changes work.
    a.kill9();
    assert!(
        wait_for(Duration::from_secs(10), || {
            let o = Command::new("losetup")
                .arg("-j")
                .arg(&img)
                .output()
                .unwrap();
            o.stdout.is_empty()
        }),
        "the loop device stayed"
    );
    let fsck = Command::new("fsck.ext4")
        .arg("-fy")
        .arg(&img)
        .output()
        .unwrap();
    assert!(fsck.status.code().is_some_and(|c| c <= 1), "{fsck:?}");
    a = start();
    assert_eq!(a.ok(&["config", "export"]), snap.0);
    a.ok(&["vip", "add", "10.201.9.1:80/tcp"]);
    let now = read_state(&inside(&a, &a.paths.state_dir)).unwrap();
    assert_maps_carry(&scratch.0.bpffs, &now, &BTreeSet::new(), "repaired");
}

/// The line (1-based) of the first line of `text` containing `needle`.
fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

/// A corrupt state file: the agent refuses to start, naming the file, the line and the
/// field and the ways out, while the pinned datapath keeps forwarding real traffic. A
/// restored file starts it again; `--start-empty` starts it empty with the file moved aside.
#[test]
fn a_corrupt_state_file_stops_the_agent_not_the_datapath() {
    let scratch = Scratch::new("fdc");
    let (t, mut a) = operated_topology(bin(), "fdc", &scratch, 3);
    serve_vip(&a);
    let exported = write_file(&scratch.0.dir, "export.toml", &a.ok(&["config", "export"]));
    // Restarted once, the state file holds everything (the journal is folded at start).
    a.stop();
    a = Agent::start(bin(), &t.lb, &scratch.0).unwrap();
    a.stop();
    let state_file = scratch.0.state_dir.join("state.json");
    let good = std::fs::read_to_string(&state_file).unwrap();
    let backup = write_file(&scratch.0.dir, "state.json.backup", &good);
    let stream = Requests::start(
        &t.client,
        vec![vip_addr(TCP_PORT)],
        Duration::from_millis(1000),
        Duration::from_millis(5),
    );
    // A value of the wrong type, then one that does not validate.
    let at = line_of(&good, &format!("\"{}\"", backend_addr(1)));
    let mut lines: Vec<String> = good.lines().map(str::to_owned).collect();
    let weight = (at..lines.len())
        .find(|&i| lines[i].contains("\"weight\""))
        .expect("a weight line");
    for (bad, want) in [
        ("\"weight\": \"heavy\"", "invalid type"),
        ("\"weight\": 99999", "weight 99999 is out of range"),
    ] {
        let indent = lines[weight].len() - lines[weight].trim_start().len();
        lines[weight] = format!("{}{bad},", " ".repeat(indent));
        if !good.lines().nth(weight).unwrap().trim_end().ends_with(',') {
            lines[weight].pop();
        }
        std::fs::write(&state_file, lines.join("\n")).unwrap();
        let err = match Agent::start(bin(), &t.lb, &scratch.0) {
            Ok(_) => panic!("the agent started on a corrupt state file"),
            Err(e) => format!("{e:#}"),
        };
        let said = err
            .lines()
            .rev()
            .find(|l| l.contains("is unreadable"))
            .unwrap_or_else(|| panic!("no refusal: {err}"))
            .to_owned();
        println!("corrupt state file: {said}");
        let field = "field state.vip[0].backend[1].weight";
        for part in [
            state_file.to_str().unwrap(),
            &format!("line {}", weight + 1),
            field,
            want,
            "keeps forwarding",
            "backup",
            "--start-empty",
        ] {
            assert!(said.contains(part), "{part:?} missing: {said}");
        }
        // The file was left as it was.
        assert_eq!(
            std::fs::read_to_string(&state_file).unwrap(),
            lines.join("\n")
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let log = stream.stop();
    let (seen, failed) = tally(&log);
    println!(
        "while the agent refused: {} requests, {failed} failed, {seen:?}",
        log.len()
    );
    assert_eq!(failed, 0, "the datapath stopped forwarding");
    assert_eq!(seen.len(), 3, "{seen:?}");

    // Way out 1: the backup restored.
    std::fs::copy(&backup, &state_file).unwrap();
    a = Agent::start(bin(), &t.lb, &scratch.0).unwrap();
    assert_eq!(
        a.ok(&["config", "export"]),
        std::fs::read_to_string(&exported).unwrap()
    );
    assert!(a.ok(&["verify"]).is_empty());
    let (_, failed) = t.tcp_requests(60);
    assert_eq!(failed, 0);
    a.stop();

    // Way out 2: start empty, explicitly; the files go aside, then the config is applied.
    std::fs::write(&state_file, "{ not json").unwrap();
    let mut cmd = t.lb.command("sh").unwrap();
    cmd.args(["-c", "exec \"$0\" \"$@\" --start-empty"])
        .arg(BIN);
    a = Agent::start_with(cmd, bin(), &scratch.0).unwrap();
    let status: serde_json::Value =
        serde_json::from_str(&a.ok(&["status", "--output", "json"])).unwrap();
    assert_eq!(status["vips"], 0, "{status}");
    assert!(scratch.0.state_dir.join("state.json.unreadable").exists());
    assert!(a.log().contains("starting empty as asked"), "{}", a.log());
    a.ok(&["apply", "-f", exported.to_str().unwrap()]);
    a.wait_ready();
    let (seen, failed) = t.tcp_requests(90);
    assert_eq!(failed, 0);
    assert_eq!(seen.len(), 3, "{seen:?}");
}

/// An agent killed while attached to an interface that then disappears (its namespace
/// deleted) leaves a defunct pinned link. The next agent unpins it, says so in its log,
/// and starts with the state, detached; `maglb status` says detached and why.
#[test]
fn a_defunct_pinned_link_is_unpinned_and_the_agent_starts_detached() {
    let scratch = Scratch::new("fdl");
    let p = unique_prefix("fdl");
    let gone = Netns::new(&format!("{p}-a")).unwrap();
    let peer = Netns::new(&format!("{p}-p")).unwrap();
    let here = Netns::new(&format!("{p}-b")).unwrap();
    maglb_tests::netns::ip(&[
        "link", "add", "l0", "netns", &gone.name, "type", "veth", "peer", "name", "l1", "netns",
        &peer.name,
    ])
    .unwrap();
    gone.ip(&["addr", "add", "10.10.2.2/24", "dev", "l0"])
        .unwrap();
    gone.ip(&["link", "set", "l0", "up"]).unwrap();
    peer.ip(&["link", "set", "l1", "up"]).unwrap();
    let mut a = Agent::start(bin(), &gone, &scratch.0).unwrap();
    a.ok(&["attach", "--iface", "l0"]);
    let file = write_file(&scratch.0.dir, "two.toml", &many(2, 5, 1));
    a.ok(&["apply", "-f", file.to_str().unwrap()]);
    let link = scratch.0.bpffs.join(LAYOUT).join("link");
    assert!(link.exists());
    a.kill9();
    drop(gone);
    // The interface is gone once its veth peer is.
    assert!(
        wait_for(Duration::from_secs(10), || peer
            .ip(&["link", "show", "l1"])
            .is_err()),
        "the veth pair outlived its namespace"
    );
    assert!(link.exists(), "the pinned link went with the interface");

    a = Agent::start(bin(), &here, &scratch.0).expect("the agent refused the defunct link");
    let log = a.log();
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("defunct"))
        .unwrap_or_else(|| panic!("no log line: {log}"));
    println!("defunct link: {line}");
    assert!(line.contains("unpinned"), "{line}");
    assert!(!link.exists(), "still pinned");
    let status: serde_json::Value =
        serde_json::from_str(&a.ok(&["status", "--output", "json"])).unwrap();
    assert_eq!(status["attached"], false);
    let why = status["detached_reason"].as_str().unwrap_or_default();
    assert!(why.contains("l0") && why.contains("defunct"), "{status}");
    let table = a.ok(&["status"]);
    assert!(
        table.contains("detached") && table.contains("maglb attach"),
        "{table}"
    );
    // The state is there, detached, and the maps carry it.
    let state = read_state(&scratch.0.state_dir).unwrap();
    assert_eq!(state.vips.len(), 2);
    assert_eq!(state.balancer.interface, None);
    assert_maps_carry(&scratch.0.bpffs, &state, &BTreeSet::new(), "detached");
    // Changes work, and another restart starts as quietly as any.
    a.ok(&["vip", "add", "10.201.9.1:80/tcp"]);
    a.kill9();
    a = Agent::start(bin(), &here, &scratch.0).unwrap();
    let status: serde_json::Value =
        serde_json::from_str(&a.ok(&["status", "--output", "json"])).unwrap();
    assert!(status.get("detached_reason").is_none(), "{status}");
    // Attached again here.
    maglb_tests::netns::ip(&[
        "link", "add", "l0", "netns", &here.name, "type", "veth", "peer", "name", "l2", "netns",
        &peer.name,
    ])
    .unwrap();
    here.ip(&["link", "set", "l0", "up"]).unwrap();
    peer.ip(&["link", "set", "l2", "up"]).unwrap();
    a.ok(&["attach", "--iface", "l0", "--mode", "generic"]);
    let status: serde_json::Value =
        serde_json::from_str(&a.ok(&["status", "--output", "json"])).unwrap();
    assert_eq!(status["attached"], true, "{status}");
    assert!(link.exists());
    let _ = cli(bin(), &scratch.0.socket, &["detach"]);
}

/// The datapath's next-hop MAC, as `maglb status` shows it.
fn nexthop_mac(a: &Agent) -> Option<String> {
    let v: serde_json::Value =
        serde_json::from_str(&a.ok(&["status", "--output", "json"])).unwrap();
    v["nexthop_mac"].as_str().map(str::to_owned)
}

/// The router's link gets a new MAC and says so with a gratuitous ARP (as a replaced router
/// or NIC does): the balancer's kernel learns it, and the datapath follows at once (the
/// agent listens to the kernel's neighbour notices), not at its next once-a-second look.
/// Requests through the VIP meanwhile all succeed (one whose SYN went to the old MAC waits
/// for its retransmission, a second later).
#[test]
fn a_router_with_a_new_mac_is_followed_at_once() {
    let scratch = Scratch::new("fnh");
    let (t, a) = operated_topology(bin(), "fnh", &scratch, 3);
    serve_vip(&a);
    let old = lb_userspace::addr::fmt_mac(&t.router.mac("r1").unwrap());
    assert_eq!(nexthop_mac(&a).as_deref(), Some(old.as_str()));
    let stream = Requests::start(
        &t.client,
        vec![vip_addr(TCP_PORT)],
        Duration::from_secs(3),
        Duration::from_millis(10),
    );
    std::thread::sleep(Duration::from_secs(1));
    // The kernel sends a gratuitous ARP when an interface's address changes (arp_notify).
    t.router.sysctl("net.ipv4.conf.r1.arp_notify=1").unwrap();
    let new = "02:6d:61:67:00:77";
    let changed = Instant::now();
    t.router.ip(&["link", "set", "r1", "address", new]).unwrap();
    let kernel = wait_for(Duration::from_secs(3), || {
        t.lb.ip(&["neigh", "show", "10.10.2.1", "dev", "l0"])
            .is_ok_and(|o| o.contains(new))
    });
    let learnt = changed.elapsed();
    let followed = wait_for(Duration::from_secs(3), || {
        nexthop_mac(&a).as_deref() == Some(new)
    });
    let took = changed.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let log = stream.stop();
    let failed: Vec<&Request> = log.iter().filter(|r| !r.ok()).collect();
    let slowest = log.iter().map(|r| r.end - r.start).max();
    println!(
        "router MAC {old} -> {new}: the balancer's kernel had it after {learnt:?}, the datapath \
         after {took:?}; {} requests, {} failed, slowest {slowest:?}",
        log.len(),
        failed.len()
    );
    assert!(kernel, "the balancer's kernel never learnt the new MAC");
    assert!(
        followed,
        "the datapath still sends to {old}: {:?}",
        nexthop_mac(&a)
    );
    assert!(
        took < learnt + Duration::from_millis(300),
        "the datapath followed the kernel {:?} later: not at once",
        took - learnt
    );
    assert!(failed.is_empty(), "{} requests failed", failed.len());
}
