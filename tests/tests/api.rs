//! The agent's HTTP edge, as root, with a real agent in a namespace this test creates and
//! Debian's curl as the client: chunked bodies, `Expect: 100-continue`, HEAD, OpenMetrics,
//! JSON errors, idle connections, the audit line, the read-only socket for users other than
//! root, and output to a closed pipe.

use std::{
    io::{Read as _, Write as _},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use maglb_tests::{
    agent::{Agent, AgentPaths, Scratch},
    netns::{Netns, require_root, unique_prefix},
    topology::wait_for,
};

const BIN: &str = env!("CARGO_BIN_EXE_maglb-cli");
/// Where the agent serves metrics inside its namespace (its default).
const METRICS: &str = "http://127.0.0.1:9477";
const VIP: &str = "10.200.0.1:80/tcp";

/// An agent in a namespace of its own (no interface attached: the HTTP edge needs none).
/// Fields drop in order: the agent, then its namespace, then its files and pins.
struct Lab {
    agent: Agent,
    ns: Netns,
    scratch: Scratch,
}

fn lab(tag: &str) -> Lab {
    require_root();
    let scratch = Scratch::new(tag);
    let ns = Netns::new(&unique_prefix(tag)).expect("namespace");
    let agent = Agent::start(Path::new(BIN), &ns, &scratch.0).expect("agent");
    Lab { agent, ns, scratch }
}

/// What curl saw.
#[derive(Debug)]
struct Http {
    /// curl's exit status (0: an HTTP answer came).
    exit: i32,
    code: u16,
    body: String,
    secs: f64,
    stderr: String,
}

impl Http {
    /// The `error` message of a JSON error answer; panics if the answer is not one.
    fn error(&self) -> String {
        let v: serde_json::Value =
            serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"));
        v["error"]
            .as_str()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| panic!("no error message: {self:?}"))
            .to_owned()
    }
}

/// Runs curl (`cmd` is `curl` itself or a wrapper ending in it) with `args`, feeding `stdin`.
fn curl_with(mut cmd: Command, args: &[&str], stdin: Option<&[u8]>) -> Http {
    cmd.args([
        "-sS",
        "--max-time",
        "20",
        "-w",
        "\n%{http_code} %{time_total}",
    ])
    .args(args)
    .stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("curl (Debian package curl)");
    if let Some(data) = stdin {
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, tail) = out.rsplit_once('\n').unwrap_or(("", &out));
    let mut it = tail.split(' ');
    Http {
        exit: o.status.code().unwrap_or(-1),
        code: it.next().and_then(|c| c.parse().ok()).unwrap_or(0),
        secs: it.next().and_then(|c| c.parse().ok()).unwrap_or(f64::NAN),
        body: body.to_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// `curl --unix-socket SOCK ... http://maglb/PATH`.
fn unix(sock: &Path, path: &str, extra: &[&str], stdin: Option<&[u8]>) -> Http {
    let url = format!("http://maglb{path}");
    let mut args = vec!["--unix-socket", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    args.push(&url);
    curl_with(Command::new("curl"), &args, stdin)
}

/// A command run as `nobody` (uid and gid 65534, no groups).
fn as_nobody(prog: &str) -> Command {
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", prog]);
    c
}

fn json(body: &str) -> serde_json::Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[test]
fn chunked_bodies_100_continue_and_json_errors_on_the_admin_socket() {
    let l = lab("apich");
    let sock = l.agent.paths.socket.clone();
    let json_ct = ["-H", "Content-Type: application/json"];

    // A chunked body (curl reads stdin and sends it chunked).
    let body = format!(r#"{{"address":"{VIP}"}}"#);
    let r = unix(
        &sock,
        "/v1/vips",
        &[
            "-H",
            "Transfer-Encoding: chunked",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            "@-",
        ],
        Some(body.as_bytes()),
    );
    assert_eq!((r.exit, r.code), (0, 200), "chunked POST: {r:?}");
    assert!(r.body.contains("add VIP"), "{r:?}");
    assert!(l.agent.ok(&["vip", "list"]).contains(VIP));

    // Expect: 100-continue, small and large: answered at once (curl waits up to 1 s for a
    // server that does not answer the expectation).
    let r = unix(
        &sock,
        "/v1/backends",
        &[
            "-H",
            "Expect: 100-continue",
            "-H",
            "Content-Type: application/json",
            "--data-binary",
            &format!(r#"{{"vip":"{VIP}","address":"10.10.3.11"}}"#),
        ],
        None,
    );
    assert_eq!((r.exit, r.code), (0, 200), "100-continue: {r:?}");
    let small = r.secs;
    // 2 MiB of TOML (a comment), with a marker that must not reach the audit log.
    let marker = "eco-audit-marker-7f3a";
    let config = format!(
        "version = 1\n# {marker} {}\n[[vip]]\naddress = \"{VIP}\"\n[[vip.backend]]\naddress = \"10.10.3.11\"\n",
        "x".repeat(2 << 20)
    );
    let big = serde_json::json!({ "config": config }).to_string();
    let r = unix(
        &sock,
        "/v1/validate",
        &[
            "-H",
            "Expect: 100-continue",
            "-H",
            "x-maglb-request-id: eco-big-1",
            "--data-binary",
            "@-",
        ],
        Some(big.as_bytes()),
    );
    assert_eq!((r.exit, r.code), (0, 200), "large 100-continue: {r:?}");
    assert!(r.body.contains("changes"), "{r:?}");
    println!(
        "100-continue: {:.1} ms (small body), {:.1} ms (2 MiB body)",
        small * 1e3,
        r.secs * 1e3
    );
    assert!(
        small < 0.3 && r.secs < 0.5,
        "100-continue slow: {small} s, {} s",
        r.secs
    );

    // Errors are JSON with a message, whatever produced them.
    let huge = vec![b'a'; 5 << 20];
    let r = unix(&sock, "/v1/validate", &["--data-binary", "@-"], Some(&huge));
    assert_eq!(r.code, 413, "{r:?}");
    assert!(r.error().contains("limited to"), "{r:?}");
    let r = unix(&sock, "/v1/nope", &[], None);
    assert_eq!(r.code, 404);
    assert!(r.error().contains("no such API call"), "{r:?}");
    let r = unix(&sock, "/v1/vips", &["-X", "PUT"], None);
    assert_eq!(r.code, 405);
    r.error();
    let mut bad = json_ct.to_vec();
    bad.extend(["--data-binary", "{not json"]);
    let r = unix(&sock, "/v1/vips", &bad, None);
    assert_eq!(r.code, 400);
    assert!(r.error().contains("request body"), "{r:?}");
    let mut unknown = json_ct.to_vec();
    unknown.extend([
        "--data-binary",
        r#"{"address":"10.200.0.2:80/tcp","colour":"red"}"#,
    ]);
    let r = unix(&sock, "/v1/vips", &unknown, None);
    assert_eq!(r.code, 400);
    assert!(r.error().contains("colour"), "{r:?}");
    let r = unix(&sock, "/", &[], None);
    assert_eq!(r.code, 404);
    r.error();

    // The audit trail: one line per change request, with its size and id, never its body.
    let log = l.agent.log();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("admin request"))
        .collect();
    assert!(audit.len() >= 5, "audit lines: {audit:?}");
    let line = audit
        .iter()
        .find(|l| l.contains("eco-big-1"))
        .unwrap_or_else(|| panic!("no audit line with the request id: {audit:?}"));
    assert!(line.contains("/v1/validate"), "{line}");
    assert!(line.contains(&big.len().to_string()), "no size in {line}");
    assert!(
        !log.contains(marker) && !log.contains("xxxxxxxxxxxxxxxx"),
        "the agent's log holds a request body"
    );
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 2000, "a log line of {longest} bytes");
}

#[test]
fn metrics_listener_head_openmetrics_and_promtool() {
    let l = lab("apime");
    l.agent.ok(&["vip", "add", VIP]);
    l.agent.ok(&["backend", "add", VIP, "10.10.3.11"]);
    let ns_curl = |args: &[&str]| curl_with(l.ns.command("curl").unwrap(), args, None);

    let r = ns_curl(&["-I", &format!("{METRICS}/metrics")]);
    assert_eq!((r.exit, r.code), (0, 200), "HEAD /metrics: {r:?}");
    assert!(r.body.contains("text/plain; version=0.0.4"), "{r:?}");
    let r = ns_curl(&["-I", &format!("{METRICS}/")]);
    assert_eq!(r.code, 200, "HEAD /: {r:?}");

    let text = ns_curl(&[&format!("{METRICS}/metrics")]);
    assert_eq!(text.code, 200);
    for family in [
        "maglb_vip_packets_total",
        "maglb_backend_up",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(text.body.contains(family), "no {family} in\n{}", text.body);
    }
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.body.as_bytes())
        .unwrap();
    let o = promtool.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );

    let om = ns_curl(&[
        "-D",
        "-",
        "-H",
        "Accept: application/openmetrics-text; version=1.0.0",
        &format!("{METRICS}/metrics"),
    ]);
    assert_eq!(om.code, 200);
    assert!(
        om.body
            .to_ascii_lowercase()
            .contains("content-type: application/openmetrics-text"),
        "{}",
        om.body
    );
    assert!(
        om.body.trim_end().ends_with("# EOF"),
        "no # EOF: {}",
        om.body
    );

    let r = ns_curl(&[&format!("{METRICS}/nope")]);
    assert_eq!(r.code, 404);
    r.error();
    let r = ns_curl(&["-X", "POST", &format!("{METRICS}/metrics")]);
    assert_eq!(r.code, 405, "{r:?}");
}

/// Wall time of `maglb status`, median of `n` runs.
fn status_time(a: &Agent, n: usize) -> Vec<Duration> {
    let mut t: Vec<Duration> = (0..n)
        .map(|_| {
            let s = Instant::now();
            a.ok(&["status"]);
            s.elapsed()
        })
        .collect();
    t.sort();
    t
}

#[test]
fn idle_connections_neither_delay_status_nor_stay_forever() {
    let l = lab("apiid");
    let before = status_time(&l.agent, 7);
    // Twenty connections that say nothing, and ten that stop in the middle of a request.
    let mut idle: Vec<UnixStream> = (0..20)
        .map(|_| UnixStream::connect(&l.agent.paths.socket).unwrap())
        .collect();
    for _ in 0..10 {
        let mut s = UnixStream::connect(&l.agent.paths.socket).unwrap();
        s.write_all(b"POST /v1/vips HTTP/1.1\r\nHost: x\r\n")
            .unwrap();
        idle.push(s);
    }
    let opened = Instant::now();
    let during = status_time(&l.agent, 7);
    let (b, d) = (before[3], during[3]);
    println!(
        "maglb status: median {:.1} ms without, {:.1} ms with 30 idle connections (max {:.1} ms)",
        b.as_secs_f64() * 1e3,
        d.as_secs_f64() * 1e3,
        during[6].as_secs_f64() * 1e3
    );
    assert!(
        d < b + Duration::from_millis(100),
        "idle connections delay status: {before:?} -> {during:?}"
    );

    // The agent hangs up on each after its header timeout (10 s), so they cannot pile up.
    for s in &mut idle {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut buf = [0u8; 256];
        let n = s.read(&mut buf);
        assert!(n.is_ok(), "an idle connection was not closed: {n:?}");
    }
    let took = opened.elapsed();
    println!("idle connections closed by the agent after {took:?}");
    assert!(
        took < Duration::from_secs(15),
        "idle connections lasted {took:?}"
    );
    assert!(l.agent.ok(&["status"]).contains("agent"));
}

#[test]
fn non_root_reads_through_the_read_only_socket_and_the_admin_socket_refuses() {
    require_root();
    let scratch = Scratch::new("apinr");
    let ns = Netns::new(&unique_prefix("apinr")).expect("namespace");
    // The socket directory does not exist yet; the agent makes it under a strict umask.
    let paths = AgentPaths {
        socket: scratch.0.dir.join("run").join("maglb.sock"),
        ..scratch.0.clone()
    };
    std::fs::create_dir_all(&paths.dir).unwrap();
    std::fs::set_permissions(&paths.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    // A copy of maglb that `nobody` may run (the build directory may be closed to it).
    let bin = paths.dir.join("maglb");
    std::fs::copy(BIN, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = ns.command("sh").unwrap();
    cmd.args(["-c", "umask 077; exec \"$0\" \"$@\""]).arg(&bin);
    let agent = Agent::start_with(cmd, &bin, &paths).expect("agent");
    agent.ok(&["vip", "add", VIP]);
    let (admin, read) = (agent.paths.socket.clone(), agent.read_socket());
    let (admin_s, read_s) = (admin.to_str().unwrap(), read.to_str().unwrap());
    let bin_s = bin.to_str().unwrap();

    // The admin socket: closed to others by its mode.
    let r = curl_with(
        as_nobody("curl"),
        &["--unix-socket", admin_s, "http://maglb/v1/status"],
        None,
    );
    assert_eq!(r.exit, 7, "nobody reached the admin socket: {r:?}");
    assert!(r.stderr.contains("connect"), "{r:?}");
    // The read-only socket: reads for anyone, changes refused with a JSON message.
    for path in [
        "/v1/status",
        "/v1/vips",
        "/v1/stats",
        "/v1/health",
        "/v1/config",
    ] {
        let r = curl_with(
            as_nobody("curl"),
            &["--unix-socket", read_s, &format!("http://maglb{path}")],
            None,
        );
        assert_eq!((r.exit, r.code), (0, 200), "nobody GET {path}: {r:?}");
        json(&r.body);
    }
    let r = curl_with(
        as_nobody("curl"),
        &[
            "--unix-socket",
            read_s,
            "--data-binary",
            r#"{"address":"10.200.0.2:80/tcp"}"#,
            "http://maglb/v1/vips",
        ],
        None,
    );
    assert_eq!(r.code, 405, "{r:?}");
    assert!(r.error().contains("read-only"), "{r:?}");

    // The CLI as nobody: reads fall back to the read-only socket, changes say why not.
    let o = as_nobody(bin_s)
        .args(["--socket", admin_s, "status"])
        .output()
        .unwrap();
    assert!(o.status.success(), "nobody: maglb status: {o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains("vips         1"));
    let o = as_nobody(bin_s)
        .args(["--socket", admin_s, "vip", "list", "--output", "json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "nobody: maglb vip list: {o:?}");
    assert!(String::from_utf8_lossy(&o.stdout).contains(VIP));
    let o = as_nobody(bin_s)
        .args(["--socket", admin_s, "vip", "add", "10.200.0.2:80/tcp"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("root only"), "{err}");
    assert!(!agent.ok(&["vip", "list"]).contains("10.200.0.2"));

    // Were the admin socket opened by mistake, the agent itself still refuses: 403, JSON.
    std::fs::set_permissions(&admin, std::fs::Permissions::from_mode(0o666)).unwrap();
    let r = curl_with(
        as_nobody("curl"),
        &[
            "--unix-socket",
            admin_s,
            "--data-binary",
            r#"{"address":"10.200.0.2:80/tcp"}"#,
            "http://maglb/v1/vips",
        ],
        None,
    );
    std::fs::set_permissions(&admin, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(r.code, 403, "{r:?}");
    assert!(r.error().contains("only root"), "{r:?}");
    assert!(!agent.ok(&["vip", "list"]).contains("10.200.0.2"));

    // Metrics and the status page: any user.
    let mut c = ns.command("setpriv").unwrap();
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "curl"]);
    let r = curl_with(c, &[&format!("{METRICS}/metrics")], None);
    assert_eq!((r.exit, r.code), (0, 200), "nobody: /metrics: {r:?}");
    drop(agent);
    drop(ns);
}

/// Runs `maglb ARGS` with its standard output a pipe whose reading end is already closed.
fn to_closed_pipe(a: &Agent, args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    Command::new(BIN)
        .arg("--socket")
        .arg(&a.paths.socket)
        .args(args)
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .unwrap()
}

/// `bash -o pipefail -c 'maglb ... | head -1'`: status and output.
fn into_head(a: &Agent, args: &str) -> Output {
    Command::new("bash")
        .args([
            "-o",
            "pipefail",
            "-c",
            &format!(
                "{BIN} --socket {} {args} | head -1",
                a.paths.socket.display()
            ),
        ])
        .output()
        .unwrap()
}

#[test]
fn output_to_a_closed_pipe_ends_quietly() {
    let l = lab("apipi");
    // VRRP on a veth of the namespace (advertisements stay inside it).
    l.ns.ip(&["link", "add", "v0", "type", "veth", "peer", "name", "v1"])
        .unwrap();
    l.ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "v0"])
        .unwrap();
    for d in ["v0", "v1"] {
        l.ns.ip(&["link", "set", d, "up"]).unwrap();
    }
    let cfg: PathBuf = l.scratch.0.dir.join("maglb.toml");
    std::fs::write(
        &cfg,
        format!(
            "[vrrp]\nvrid = 9\npriority = 100\nadvert_interval_cs = 100\ninterface = \"v0\"\naddresses = [\"10.99.0.100\"]\n\n[[vip]]\naddress = \"{VIP}\"\n[[vip.backend]]\naddress = \"10.10.3.11\"\n[[vip.backend]]\naddress = \"10.10.3.12\"\n"
        ),
    )
    .unwrap();
    l.agent.ok(&["apply", "-f", cfg.to_str().unwrap()]);
    assert!(
        wait_for(Duration::from_secs(10), || l
            .agent
            .cli(&["vrrp", "status"])
            .status
            .success()),
        "VRRP did not start: {}",
        l.agent.log()
    );

    for args in [
        &["vrrp", "status"][..],
        &["stats"],
        &["status"],
        &["vip", "list"],
        &["backend", "list"],
        &["health"],
        &["config", "export"],
        &["completions", "bash"],
        &["stats", "--watch", "--interval-ms", "100", "--count", "3"],
    ] {
        let o = to_closed_pipe(&l.agent, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && err.is_empty(),
            "maglb {args:?} into a closed pipe: {} {err}",
            o.status
        );
    }
    for args in [
        "vrrp status",
        "stats",
        "completions bash",
        "stats --watch --interval-ms 100 --count 4",
    ] {
        let o = into_head(&l.agent, args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success() && !err.contains("panicked") && err.is_empty(),
            "maglb {args} | head -1: {} {err}",
            o.status
        );
        assert_eq!(String::from_utf8_lossy(&o.stdout).lines().count(), 1);
    }
}
