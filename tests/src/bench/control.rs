//! Control plane: time from an API call to the datapath carrying it, and the agent's memory
//! with many VIPs and backends. The agent answers a change only once the maps hold it (the
//! ring diff is written and switched), so the API round trip is the measure.

use std::{net::Ipv4Addr, path::Path, time::Instant};

use lb_userspace::api::{self, client};

use super::{Report, median, verdict};
use crate::{
    agent::{Agent, Scratch},
    netns::{Netns, unique_prefix},
};

fn backend(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, (i >> 8) as u8, i as u8)
}

fn config(vips: u32, backends: u32) -> String {
    let mut c = String::new();
    for v in 0..vips {
        c += &format!(
            "[[vip]]\naddress = \"10.201.{}.{}:80/tcp\"\n",
            v >> 8,
            v & 0xff
        );
        for b in 0..backends {
            c += &format!("[[vip.backend]]\naddress = \"{}\"\n", backend(b));
        }
    }
    c
}

fn rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

pub fn run(report: &mut Report, bin: &Path) -> anyhow::Result<()> {
    let scratch = Scratch::new("bcp");
    let ns = Netns::new(&format!("{}-cp", unique_prefix("bcp")))?;
    let a = Agent::start(bin, &ns, &scratch.0)?;
    let sock = scratch.0.socket.as_path();
    let apply = |text: String| -> anyhow::Result<f64> {
        let t = Instant::now();
        let _: api::Changes =
            client::send(sock, "POST", "/v1/apply", &api::ConfigText { config: text })?;
        Ok(t.elapsed().as_secs_f64() * 1e3)
    };
    let mut rows = Vec::new();
    for n in [1u32, 100, 1000] {
        apply(config(1, n - 1))?;
        let vip = "10.201.0.0:80/tcp".parse()?;
        let mut ms = Vec::new();
        for _ in 0..7 {
            let req = api::BackendRequest {
                vip,
                address: backend(n - 1).into(),
                weight: Some(1),
                backup: None,
                pool: None,
            };
            let t = Instant::now();
            let _: api::Changes = client::send(sock, "POST", "/v1/backends", &req)?;
            ms.push(t.elapsed().as_secs_f64() * 1e3);
            let _: api::Changes = client::send(sock, "DELETE", "/v1/backends", &req)?;
        }
        let m = median(ms);
        rows.push(vec![
            format!("add a backend, making {n}"),
            format!("{m:.2}"),
            "10".into(),
            verdict(m <= 10.0),
        ]);
    }
    // The same path (validate, persist, reconcile) with no table to switch: what the ring
    // switch itself costs shows as the difference.
    let vip = "10.201.0.0:80/tcp".parse()?;
    let same = api::BackendRequest {
        vip,
        address: backend(0).into(),
        weight: Some(1),
        backup: None,
        pool: None,
    };
    let mut ms = Vec::new();
    for _ in 0..7 {
        let t = Instant::now();
        let _: api::Changes = client::send(sock, "POST", "/v1/backends/weight", &same)?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    rows.push(vec![
        "a call that changes no table (same weight)".into(),
        format!("{:.2}", median(ms)),
        "-".into(),
        "-".into(),
    ]);
    let before = rss_mb(a.pid().unwrap_or(0));
    let took = apply(config(100, 100))?;
    let after = rss_mb(a.pid().unwrap_or(0));
    report.section(
        "4. Control plane",
        &["change", "median ms (API call to datapath updated)", "target ms", ""],
        &rows,
        &[format!(
            "Agent RSS: {before:.1} MB empty, {after:.1} MB with 100 VIPs x 100 backends (65537-slot \
             rings; applying that state took {took:.0} ms). Each change is also written to disk \
             (fsync) before it is answered, and that is included."
        )],
    );
    Ok(())
}
