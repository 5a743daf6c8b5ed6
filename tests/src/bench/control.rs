//! Control plane: time from an API call to the datapath carrying it; a large apply, the
//! agent's memory after it, and what readers and the VRRP speaker see while it runs; and the
//! map layout's table switch against the alternatives. The agent answers a change only once
//! the maps hold it (and the state file is on disk), so the API round trip is the measure.

use std::{
    net::Ipv4Addr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{Array, MapData};
use lb_common::{DEFAULT_RING_SIZE, RING_MAP_FLAGS};
use lb_userspace::{
    api::{self, client},
    balancer::Balancer,
    state::{BackendSpec, VipSpec},
};

use super::{Report, median, verdict};
use crate::{
    agent::{Agent, Scratch},
    netns::{Netns, unique_prefix},
};

fn backend(i: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 202, (i >> 8) as u8, i as u8)
}

/// `vips` VIPs of `backends` backends each, at addresses no one answers at: probing is off
/// (the bench measures the control plane, not health checks).
fn config(vips: u32, backends: u32) -> String {
    let mut c = String::new();
    for v in 0..vips {
        c += &format!(
            "[[vip]]\naddress = \"10.201.{}.{}:80/tcp\"\nhealth = {{ kind = \"none\" }}\n",
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Median ms of `n` calls of `f`.
fn time_calls(n: usize, mut f: impl FnMut() -> anyhow::Result<()>) -> anyhow::Result<f64> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        f()?;
        v.push(ms(t.elapsed()));
    }
    Ok(median(v))
}

/// `maglb status` answer times (ms) every 10 ms until `stop`.
fn poll_status(sock: std::path::PathBuf, stop: Arc<AtomicBool>) -> Vec<f64> {
    let mut v = Vec::new();
    let t0 = Instant::now();
    while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
        let t = Instant::now();
        let _ = client::call(&sock, "GET", "/v1/status", None);
        v.push(ms(t.elapsed()));
        std::thread::sleep(Duration::from_millis(10));
    }
    v
}

/// Arrival gaps (ms) of VRRP advertisements seen on a raw socket in `ns`, until `stop`.
fn watch_adverts(
    ns: &Netns,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<std::thread::JoinHandle<Vec<f64>>> {
    ns.spawn(move || {
        let s = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(112)),
        )
        .expect("raw socket");
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        s.join_multicast_v4(&Ipv4Addr::new(224, 0, 0, 18), &Ipv4Addr::new(10, 99, 0, 2))
            .expect("joining 224.0.0.18");
        let mut last: Option<Instant> = None;
        let mut gaps = Vec::new();
        let mut buf = [0u8; 256];
        let t0 = Instant::now();
        while !stop.load(Ordering::Relaxed) && t0.elapsed() < Duration::from_secs(60) {
            use std::io::Read as _;
            if (&s).read(&mut buf).is_ok() {
                let now = Instant::now();
                if let Some(l) = last {
                    gaps.push(ms(now - l));
                }
                last = Some(now);
            }
        }
        gaps
    })
}

pub fn run(report: &mut Report, bin: &Path) -> anyhow::Result<()> {
    let scratch = Scratch::new("bcp");
    let p = unique_prefix("bcp");
    let ns = Netns::new(&format!("{p}-cp"))?;
    let peer = Netns::new(&format!("{p}-pe"))?;
    crate::netns::ip(&[
        "link", "add", "v0", "netns", &ns.name, "type", "veth", "peer", "v1", "netns", &peer.name,
    ])?;
    ns.ip(&["addr", "add", "10.99.0.1/24", "dev", "v0"])?;
    ns.ip(&["link", "set", "v0", "up"])?;
    peer.ip(&["addr", "add", "10.99.0.2/24", "dev", "v1"])?;
    peer.ip(&["link", "set", "v1", "up"])?;
    let a = Agent::start(bin, &ns, &scratch.0)?;
    let sock = scratch.0.socket.clone();
    let apply = |text: String| -> anyhow::Result<f64> {
        let t = Instant::now();
        let _: api::Changes = client::send(
            &sock,
            "POST",
            "/v1/apply",
            &api::ConfigText { config: text },
        )?;
        Ok(ms(t.elapsed()))
    };

    // 1. One API call to the datapath carrying it, against a call that changes nothing.
    let mut rows = Vec::new();
    for n in [1u32, 100, 1000] {
        apply(config(1, n - 1))?;
        let vip = "10.201.0.0:80/tcp".parse()?;
        let req = |w| api::BackendRequest {
            vip,
            address: backend(n - 1).into(),
            weight: Some(w),
            backup: None,
            pool: None,
        };
        let (mut adds, mut noops) = (Vec::new(), Vec::new());
        for _ in 0..15 {
            let t = Instant::now();
            let _: api::Changes = client::send(&sock, "POST", "/v1/backends", &req(1))?;
            adds.push(ms(t.elapsed()));
            let t = Instant::now();
            let _: api::Changes = client::send(&sock, "POST", "/v1/backends/weight", &req(1))?;
            noops.push(ms(t.elapsed()));
            let _: api::Changes = client::send(&sock, "DELETE", "/v1/backends", &req(1))?;
        }
        let (change, noop) = (median(adds), median(noops));
        rows.push(vec![
            format!("add a backend, making {n}"),
            format!("{change:.2}"),
            format!("{noop:.2}"),
            "2".into(),
            verdict(change <= 2.0),
        ]);
    }
    report.section(
        "4. Control plane: one change",
        &[
            "change",
            "median ms, API call to datapath updated",
            "baseline: a call that changes nothing",
            "target ms",
            "",
        ],
        &rows,
        &[
            "Medians of 15 calls through the API socket from one client. Both columns include \
           the HTTP round trip and validation; a change also writes the state file (fsync) and \
           the datapath (the VIP's table built and written into its inactive half, then one \
           VIPS update switches it)."
                .into(),
        ],
    );

    // 2. A large apply from empty, with a reader polling status and a VRRP peer listening.
    apply(String::new())?;
    let vrrp = "[balancer]\n[vrrp]\nvrid = 7\npriority = 200\nadvert_interval_cs = 10\n\
                interface = \"v0\"\naddresses = [\"10.99.0.100\"]\n\n";
    apply(vrrp.into())?;
    std::thread::sleep(Duration::from_millis(600));
    let idle = |d: Duration| -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
        let stop = Arc::new(AtomicBool::new(false));
        let adverts = watch_adverts(&peer, stop.clone())?;
        let s2 = sock.clone();
        let st = stop.clone();
        let status = std::thread::spawn(move || poll_status(s2, st));
        std::thread::sleep(d);
        stop.store(true, Ordering::Relaxed);
        Ok((status.join().unwrap(), adverts.join().unwrap()))
    };
    let (status_idle, adverts_idle) = idle(Duration::from_secs(2))?;
    let before = rss_mb(a.pid().unwrap_or(0));
    let stop = Arc::new(AtomicBool::new(false));
    let adverts = watch_adverts(&peer, stop.clone())?;
    let status = {
        let (s2, st) = (sock.clone(), stop.clone());
        std::thread::spawn(move || poll_status(s2, st))
    };
    std::thread::sleep(Duration::from_millis(300));
    let took = apply(format!("{vrrp}{}", config(100, 100)))?;
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let (status_busy, adverts_busy) = (status.join().unwrap(), adverts.join().unwrap());
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_mb(a.pid().unwrap_or(0));
    let again = apply(format!("{vrrp}{}", config(100, 100)))?;
    let (n_status, n_adverts) = (status_busy.len(), adverts_busy.len());
    let worst = |v: &[f64]| v.iter().map(|g| (g - 100.0).abs()).fold(0.0, f64::max);
    let rows = vec![
        vec![
            "apply 100 VIPs x 100 backends from empty, ms".into(),
            format!("{took:.0}"),
            format!("{again:.0} (the same file again: no change)"),
            "1000".into(),
            verdict(took <= 1000.0),
        ],
        vec![
            "agent RSS after it, MB".into(),
            format!("{after:.1}"),
            format!("{before:.1} (before it)"),
            "30".into(),
            verdict(after <= 30.0),
        ],
        vec![
            "`maglb status` every 10 ms during it: p99 ms".into(),
            format!("{:.1}", percentile(status_busy.clone(), 0.99)),
            format!("{:.1} (idle p99)", percentile(status_idle, 0.99)),
            "50".into(),
            verdict(percentile(status_busy, 0.99) <= 50.0),
        ],
        vec![
            "VRRP advertisement interval at the peer during it: min-max ms".into(),
            format!(
                "{:.1}-{:.1}",
                adverts_busy.iter().copied().fold(f64::MAX, f64::min),
                adverts_busy.iter().copied().fold(0.0, f64::max)
            ),
            format!(
                "{:.1}-{:.1} (idle)",
                adverts_idle.iter().copied().fold(f64::MAX, f64::min),
                adverts_idle.iter().copied().fold(0.0, f64::max)
            ),
            "100 ± 10".into(),
            verdict(!adverts_busy.is_empty() && worst(&adverts_busy) <= 10.0),
        ],
    ];
    report.section(
        "5. Control plane: a large apply",
        &["measure", "maglb", "baseline (same run)", "target", ""],
        &rows,
        &[format!(
            "65537-slot tables. The status poller and the VRRP peer (a raw socket on the other \
             end of the speaker's veth) ran from 300 ms before the apply to 300 ms after it: \
             {n_status} status answers and {n_adverts} advertisements."
        )],
    );
    drop(a);
    layout(report)
}

/// The table switch of the map layout against the alternatives, measured in this process on
/// a loaded (unattached) balancer.
fn layout(report: &mut Report) -> anyhow::Result<()> {
    let mut bal = Balancer::load()?;
    let spec = |size: u32, w: u32| {
        let mut s = VipSpec::new("10.201.0.1:80/tcp".parse().unwrap());
        s.ring_size = size;
        s.backends = (0..100)
            .map(|i| BackendSpec::new(backend(i).into(), if i == 0 { w } else { 1 }))
            .collect();
        s
    };
    bal.set_vip(spec(DEFAULT_RING_SIZE, 1))?;
    let mut w = 1;
    let half = time_calls(15, || {
        w = w % 3 + 1;
        Ok(bal.set_vip(spec(DEFAULT_RING_SIZE, w))?)
    })?;
    // A new ring map installed in the outer map for every change: the previous layout's
    // switch (a ring-size change takes this path today).
    let mut big = false;
    let outer = time_calls(15, || {
        big = !big;
        Ok(bal.set_vip(spec(if big { 65539 } else { DEFAULT_RING_SIZE }, 1))?)
    })?;
    // Filling a table with one syscall per slot, as the previous layout did for a new VIP.
    let mut m: Array<MapData, u32> = Array::create(2 * DEFAULT_RING_SIZE, RING_MAP_FLAGS)?;
    let t = Instant::now();
    for i in 0..DEFAULT_RING_SIZE {
        m.set(i, i % 100, 0)?;
    }
    let per_slot = ms(t.elapsed());
    report.section(
        "6. Map layout: switching a VIP's table (65537 slots, 100 backends)",
        &["how", "median ms per change"],
        &[
            vec![
                "write the inactive half through the memory mapping, switch the VIP's entry (this layout)".into(),
                format!("{half:.2}"),
            ],
            vec![
                "a new ring map filled and installed in the outer array of maps (the previous layout: an RCU grace period each)".into(),
                format!("{outer:.2}"),
            ],
            vec![
                "filling one table with a syscall per slot (the previous layout's writes for a new VIP)".into(),
                format!("{per_slot:.2}"),
            ],
        ],
        &["Each change includes the Maglev build for 100 backends. Measured in one process \
           on an unattached balancer, so no HTTP or fsync."
            .into()],
    );
    Ok(())
}
