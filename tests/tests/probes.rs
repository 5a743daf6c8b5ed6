//! Health probes against a real nginx, as root, in a namespace this test creates: nginx with
//! keep-alive over HTTP, and over HTTPS with a self-signed certificate made by the test. The
//! checks are set with `maglb vip health` and read with `maglb health --output json` from a
//! running agent.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    time::{Duration, Instant},
};

use maglb_tests::{
    agent::{Agent, Scratch},
    certs,
    netns::{Netns, require_root, unique_prefix},
    topology::wait_for,
};

const BIN: &str = env!("CARGO_BIN_EXE_maglb-cli");
/// nginx's address, on an interface of the namespace.
const BACKEND: &str = "10.77.0.2";
/// The name in nginx's certificate.
const NAME: &str = "backend.test";

/// nginx (one process, `master_process off`) in a namespace; killed on drop.
struct Nginx {
    child: Child,
    dir: PathBuf,
}

impl Nginx {
    /// Starts nginx in `ns` with its config, logs and temp files under `dir`: HTTP on :80 and
    /// HTTPS on :443 with `cert`/`key`, keep-alive on, `/healthz` answering "ok".
    fn start(ns: &Netns, dir: &Path, cert: &Path, key: &Path) -> Self {
        let d = dir.display();
        std::fs::create_dir_all(dir.join("tmp")).unwrap();
        let conf = format!(
            r#"daemon off;
master_process off;
pid {d}/nginx.pid;
error_log {d}/error.log;
events {{ worker_connections 128; }}
http {{
  log_format conns '$connection $connection_requests $request_uri';
  access_log {d}/access.log conns;
  client_body_temp_path {d}/tmp;
  proxy_temp_path {d}/tmp;
  fastcgi_temp_path {d}/tmp;
  uwsgi_temp_path {d}/tmp;
  scgi_temp_path {d}/tmp;
  keepalive_timeout 60s;
  keepalive_requests 10000;
  server {{
    listen {BACKEND}:80;
    listen {BACKEND}:443 ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    location = /healthz {{ return 200 "ok\n"; }}
    location = /moved {{ return 302 /healthz; }}
  }}
}}
"#,
            cert = cert.display(),
            key = key.display()
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).unwrap();
        let child = ns
            .command("nginx")
            .unwrap()
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-p")
            .arg(dir)
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx (Debian package nginx-light)");
        let n = Nginx {
            child,
            dir: dir.to_owned(),
        };
        let up = wait_for(Duration::from_secs(5), || {
            ns.exec(
                "curl",
                &[
                    "-sf",
                    "-o",
                    "/dev/null",
                    &format!("http://{BACKEND}/healthz"),
                ],
            )
            .is_ok()
        });
        assert!(
            up,
            "nginx did not start: {}",
            std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
        );
        n
    }

    /// (requests, distinct connections) for `uri` in the access log.
    fn served(&self, uri: &str) -> (usize, usize) {
        let log = std::fs::read_to_string(self.dir.join("access.log")).unwrap_or_default();
        let mut conns = BTreeSet::new();
        let mut requests = 0;
        for l in log.lines() {
            let f: Vec<&str> = l.split(' ').collect();
            if f.len() == 3 && f[2] == uri {
                requests += 1;
                conns.insert(f[0].to_owned());
            }
        }
        (requests, conns.len())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Per VIP: (up, last result, checks), from `maglb health --output json`.
fn health(a: &Agent) -> BTreeMap<String, (bool, String, u64)> {
    let v: serde_json::Value =
        serde_json::from_str(&a.ok(&["health", "--output", "json"])).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .filter_map(|p| {
            let h = p.get("health").filter(|h| !h.is_null())?;
            Some((
                p["vip"].as_str()?.to_owned(),
                (
                    h["up"].as_bool()?,
                    h["last"].as_str().unwrap_or("").to_owned(),
                    h["checks"].as_u64().unwrap_or(0),
                ),
            ))
        })
        .collect()
}

#[test]
fn http_keep_alive_and_https_checks_against_nginx() {
    require_root();
    let scratch = Scratch::new("prb");
    let ns = Netns::new(&unique_prefix("prb")).expect("namespace");
    // nginx's address on a veth of the namespace (this kernel has no dummy interfaces).
    ns.ip(&["link", "add", "d0", "type", "veth", "peer", "name", "d1"])
        .unwrap();
    ns.ip(&["addr", "add", &format!("{BACKEND}/24"), "dev", "d0"])
        .unwrap();
    for d in ["d0", "d1"] {
        ns.ip(&["link", "set", d, "up"]).unwrap();
    }
    let dir = scratch.0.dir.join("nginx");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = certs::self_signed(&dir, "server", NAME, Some(BACKEND));
    let (other, _) = certs::self_signed(&dir, "other", NAME, Some(BACKEND));
    let nginx = Nginx::start(&ns, &dir, &cert, &key);
    let agent = Agent::start(Path::new(BIN), &ns, &scratch.0).expect("agent");

    // One VIP per case, all on the same nginx; each check probes every 250 ms, and one
    // failure takes a backend down, so a single false timeout would show.
    let (cert_s, other_s) = (cert.to_str().unwrap(), other.to_str().unwrap());
    let common = [
        "--interval-ms",
        "250",
        "--timeout-ms",
        "250",
        "--rise",
        "1",
        "--fall",
        "1",
    ];
    let cases: Vec<(&str, Vec<&str>, Option<&str>)> = vec![
        (
            "10.200.0.1:80/tcp",
            vec!["--kind", "http", "--body", "ok"],
            None,
        ),
        (
            "10.200.0.2:443/tcp",
            vec!["--kind", "https", "--tls-insecure"],
            None,
        ),
        (
            "10.200.0.3:443/tcp",
            vec!["--kind", "https", "--tls-ca", cert_s],
            None,
        ),
        (
            "10.200.0.4:443/tcp",
            vec!["--kind", "https", "--tls-ca", cert_s, "--host", NAME],
            None,
        ),
        // Verification on, without the CA: the system's roots do not know it.
        (
            "10.200.0.5:443/tcp",
            vec!["--kind", "https"],
            Some("unknown issuer"),
        ),
        // Another certificate (of the same name) as the CA.
        (
            "10.200.0.6:443/tcp",
            vec!["--kind", "https", "--tls-ca", other_s],
            Some("signature does not verify"),
        ),
        // The right CA, the wrong name.
        (
            "10.200.0.7:443/tcp",
            vec![
                "--kind",
                "https",
                "--tls-ca",
                cert_s,
                "--host",
                "other.test",
            ],
            Some("not valid for name \"other.test\""),
        ),
        // HTTPS to the plain HTTP port.
        (
            "10.200.0.8:80/tcp",
            vec!["--kind", "https", "--tls-insecure"],
            Some("does not speak TLS"),
        ),
        // Redirects are not followed.
        (
            "10.200.0.9:80/tcp",
            vec!["--kind", "http", "--path", "/moved", "--expect", "200"],
            Some("status 302"),
        ),
    ];
    for (vip, kind, _) in &cases {
        agent.ok(&["vip", "add", vip]);
        agent.ok(&["backend", "add", vip, BACKEND]);
        let mut args = vec!["vip", "health", vip];
        args.extend_from_slice(&common);
        args.extend_from_slice(kind);
        if !kind.contains(&"--path") {
            args.extend(["--path", "/healthz"]);
        }
        agent.ok(&args);
    }
    let settled = |h: &BTreeMap<String, (bool, String, u64)>| {
        cases.iter().all(|(vip, _, fail)| {
            h.get(*vip).is_some_and(|(up, last, checks)| {
                *checks >= 3
                    && match fail {
                        None => *up && last == "ok",
                        Some(why) => !*up && last.contains(why),
                    }
            })
        })
    };
    let ok = wait_for(Duration::from_secs(15), || settled(&health(&agent)));
    let h = health(&agent);
    for (vip, (up, last, checks)) in &h {
        println!("{vip:<20} up={up:<5} checks={checks:<3} {last}");
    }
    assert!(ok, "probe results: {h:#?}\n{}", agent.log());
    let (_, last, _) = &h["10.200.0.5:443/tcp"];
    assert!(last.starts_with("TLS: certificate not trusted"), "{last}");

    // Keep-alive: for three more seconds, every HTTP probe stays up on few connections.
    let start = Instant::now();
    let (requests0, _) = nginx.served("/healthz");
    while start.elapsed() < Duration::from_secs(3) {
        let h = health(&agent);
        for vip in [
            "10.200.0.1:80/tcp",
            "10.200.0.2:443/tcp",
            "10.200.0.3:443/tcp",
        ] {
            assert!(h[vip].0, "{vip} went down: {:?}\n{}", h[vip], agent.log());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let (requests, conns) = nginx.served("/healthz");
    println!(
        "nginx served {} health requests on {conns} connections in 3 s",
        requests - requests0
    );
    assert!(
        requests - requests0 >= 30,
        "too few probes: {}",
        requests - requests0
    );
    assert!(
        conns * 10 <= requests,
        "probes do not reuse connections: {requests} requests on {conns} connections"
    );
    let log = agent.log();
    assert!(
        !log.contains("timeout"),
        "a probe timed out against a keep-alive server:\n{log}"
    );
    drop(agent);
    drop(nginx);
}
