//! Real connections: wrk from the client opens a new TCP connection per HTTP request
//! (`Connection: close`) to three nginx backends, through maglb (XDP, direct server return),
//! through HAProxy in TCP mode in the balancer's namespace, and with no balancer at all (the
//! router spreads the VIP over the backends itself, ECMP on the 5-tuple), in the same
//! topology and run.

use std::{
    path::Path,
    process::{Child, Stdio},
};

use lb_userspace::state::{BackendSpec, VipSpec};

use super::{Report, median, verdict};
use crate::{
    agent::Scratch,
    fixture::vip,
    netns::Netns,
    topology::{LB_ADDR, Topology, VIP, backend_addr},
};

/// Where the router sends the VIP: to the balancer (`via LB_ADDR`, the topology's route), or
/// straight to the three backends with a multipath route hashed on the 5-tuple.
fn route_vip(t: &Topology, direct: bool) -> anyhow::Result<()> {
    let dst = format!("{VIP}/32");
    if direct {
        let mut args = vec!["route".to_string(), "replace".into(), dst];
        for i in 0..3 {
            args.extend(["nexthop".into(), "via".into(), backend_addr(i).to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        t.router.ip(&args)?;
    } else {
        t.router
            .ip(&["route", "replace", &dst, "via", &LB_ADDR.to_string()])?;
    }
    Ok(())
}

const PORT: u16 = 8000;
const HAPROXY_PORT: u16 = 8001;
const ROUNDS: usize = 3;
const SECONDS: u32 = 5;

/// A process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn nginx(ns: &Netns, i: usize, dir: &Path) -> anyhow::Result<Proc> {
    let d = dir.join(format!("nginx-b{i}"));
    std::fs::create_dir_all(&d)?;
    let conf = d.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "worker_processes 1;\nmaster_process off;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  keepalive_timeout 0;\n  client_body_temp_path {d};\n  \
             proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  \
             server {{\n    listen {VIP}:{PORT};\n    listen {}:{PORT};\n    location / {{ return 200 \"b{i}\\n\"; }}\n  }}\n}}\n",
            backend_addr(i),
            d = d.display()
        ),
    )?;
    let child = ns
        .command("nginx")?
        .arg("-c")
        .arg(&conf)
        .arg("-p")
        .arg(&d)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Proc(child))
}

fn haproxy(ns: &Netns, dir: &Path) -> anyhow::Result<Proc> {
    let conf = dir.join("haproxy.cfg");
    let servers: String = (0..3)
        .map(|i| format!("  server b{i} {}:{PORT}\n", backend_addr(i)))
        .collect();
    std::fs::write(
        &conf,
        format!(
            "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 10s\n  \
             timeout server 10s\nfrontend f\n  bind {LB_ADDR}:{HAPROXY_PORT}\n  default_backend b\n\
             backend b\n  balance roundrobin\n{servers}"
        ),
    )?;
    let child = ns
        .command("haproxy")?
        .arg("-db")
        .arg("-f")
        .arg(&conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    Ok(Proc(child))
}

/// A wrk run: (requests/s, p50 ms, p99 ms, errors).
fn wrk(client: &Netns, url: &str) -> anyhow::Result<(f64, f64, f64, u64)> {
    let out = client.exec(
        "wrk",
        &[
            "-t2",
            "-c64",
            &format!("-d{SECONDS}s"),
            "--latency",
            "-H",
            "Connection: close",
            url,
        ],
    )?;
    let ms = |v: &str| -> f64 {
        let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(v.len()));
        let n: f64 = n.parse().unwrap_or(f64::NAN);
        match unit {
            "us" => n / 1e3,
            "s" => n * 1e3,
            _ => n,
        }
    };
    let field = |prefix: &str| -> Option<&str> {
        out.lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .map(str::trim)
    };
    let rps: f64 = field("Requests/sec:")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let p50 = field("50%").map(ms).unwrap_or(f64::NAN);
    let p99 = field("99%").map(ms).unwrap_or(f64::NAN);
    let errors: u64 = field("Socket errors:")
        .map(|v| {
            v.split(',')
                .filter_map(|p| p.split_whitespace().last()?.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0)
        + field("Non-2xx or 3xx responses:")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
    Ok((rps, p50, p99, errors))
}

pub fn run(report: &mut Report, _bin: &Path) -> anyhow::Result<()> {
    let scratch = Scratch::new("bcn");
    let t = Topology::build("bcn", 3)?;
    let mut bal = t.attach_balancer()?;
    let mut spec = VipSpec::new(vip(VIP, PORT, "tcp"));
    spec.backends = (0..3)
        .map(|i| BackendSpec::new(backend_addr(i).into(), 1))
        .collect();
    bal.set_vip(spec)?;
    std::fs::create_dir_all(&scratch.0.dir)?;
    let _nginx: Vec<Proc> = t
        .backends
        .iter()
        .enumerate()
        .map(|(i, b)| nginx(b, i, &scratch.0.dir))
        .collect::<anyhow::Result<_>>()?;
    // HAProxy opens a connection to a backend per client connection: give it the usual
    // tuning of a proxy host, or it runs out of source ports within a few rounds.
    t.lb.sysctl("net.ipv4.tcp_tw_reuse=1")?;
    t.lb.sysctl("net.ipv4.ip_local_port_range=1024 65535")?;
    let _haproxy = haproxy(&t.lb, &scratch.0.dir)?;
    // The no-balancer baseline: ECMP over the backends, hashed on the 5-tuple.
    t.router.sysctl("net.ipv4.fib_multipath_hash_policy=1")?;
    std::thread::sleep(std::time::Duration::from_millis(500));

    let targets = [
        ("maglb (XDP, DSR)", format!("http://{VIP}:{PORT}/")),
        (
            "HAProxy 2.6 (TCP mode)",
            format!("http://{LB_ADDR}:{HAPROXY_PORT}/"),
        ),
        (
            "no balancer (router ECMP to the backends)",
            format!("http://{VIP}:{PORT}/"),
        ),
    ];
    let mut runs: Vec<Vec<(f64, f64, f64, u64)>> = vec![Vec::new(); targets.len()];
    for _ in 0..ROUNDS {
        for (i, (_, url)) in targets.iter().enumerate() {
            let direct = i == 2;
            if direct {
                route_vip(&t, true)?;
            }
            let r = wrk(&t.client, url);
            if direct {
                route_vip(&t, false)?;
            }
            let r = r?;
            println!("  round: {} {r:?}", targets[i].0);
            runs[i].push(r);
        }
    }
    let med = |i: usize| {
        let r = &runs[i];
        (
            median(r.iter().map(|x| x.0).collect()),
            median(r.iter().map(|x| x.1).collect()),
            median(r.iter().map(|x| x.2).collect()),
            r.iter().map(|x| x.3).sum::<u64>(),
        )
    };
    let (m, h, d) = (med(0), med(1), med(2));
    let rows: Vec<Vec<String>> = [m, h, d]
        .iter()
        .zip(&targets)
        .map(|(x, (name, _))| {
            vec![
                (*name).into(),
                format!("{:.0}", x.0),
                format!("{:.2}", x.0 / d.0),
                format!("{:.2}", x.1),
                format!("{:.2}", x.2),
                x.3.to_string(),
            ]
        })
        .collect();
    let ratio = m.0 / h.0;
    let best = |i: usize| runs[i].iter().map(|x| x.0).fold(0.0, f64::max);
    let best_ratio = best(0) / best(1);
    let rounds = |i: usize| {
        runs[i]
            .iter()
            .map(|x| format!("{:.0}", x.0))
            .collect::<Vec<_>>()
            .join(", ")
    };
    report.section(
        "3. Real connections (wrk, new TCP connection per request)",
        &[
            "through",
            "connections/s",
            "/ no balancer",
            "p50 ms",
            "p99 ms",
            "errors",
        ],
        &rows,
        &[
            format!(
                "maglb / HAProxy connection rate: {ratio:.2}x on medians, {best_ratio:.2}x on each \
                 one's best round (target 2x on both: {}); p99 {:.2} vs {:.2} ms (target lower: \
                 {}).",
                verdict(best_ratio >= 2.0 && ratio >= 2.0),
                m.2,
                h.2,
                verdict(m.2 < h.2)
            ),
            format!(
                "maglb / no balancer: connection rate {:.2} on medians (target 0.80: {}); p99 \
                 {:.2} vs {:.2} ms, {:.2}x (target at most 1.3x: {}). The baseline is the same \
                 wrk to the same VIP, with the router sending the VIP straight to the three \
                 backends (a multipath route, hashed on the 5-tuple) instead of to the \
                 balancer: what the client, router and backends cost by themselves.",
                m.0 / d.0,
                verdict(m.0 / d.0 >= 0.8),
                m.2,
                d.2,
                m.2 / d.2,
                verdict(m.2 / d.2 <= 1.3)
            ),
            format!(
                "Rounds, connections/s: maglb {}; HAProxy {}; no balancer {}. HAProxy slows from \
                 round to round in this set-up (its first, fresh round is its best), most likely \
                 from the TIME_WAIT sockets its closes leave on the balancer, which outlive the \
                 rounds; maglb, which terminates nothing, does not.",
                rounds(0),
                rounds(1),
                rounds(2)
            ),
            format!(
                "wrk -t2 -c64 -d{SECONDS}s, `Connection: close`, {ROUNDS} rounds alternating the three; the \
                 balancer's namespace has tcp_tw_reuse=1 and ports 1024-65535 for HAProxy's \
                 connections to the backends. Client, router, balancer, three nginx and wrk share the \
                 2 cores, so absolute numbers are this machine's; the ratios are the comparison."
            ),
        ],
    );
    Ok(())
}
