//! `cargo xtask demo`: the datapath at work, in namespaces this program creates and removes
//! (also on Ctrl-C).

use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use lb_userspace::{
    balancer::Balancer,
    service::{BackendSpec, Services, VipId},
};
use maglb_tests::{
    fixture::vip,
    netns::require_root,
    topology::{self, LongConn, TCP_PORT, Topology, UDP_PORT, VIP, backend_addr, vip_addr},
};

const TIMEOUT: Duration = Duration::from_secs(3);

/// Namespaces to remove if the demo is interrupted.
static NAMESPACES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Blocks SIGINT/SIGTERM in every thread and removes the namespaces when one arrives.
fn cleanup_on_signal() {
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::spawn(move || {
            let mut sig = 0;
            libc::sigwait(&set, &mut sig);
            eprintln!("\ninterrupted: removing the demo's namespaces");
            for ns in NAMESPACES.lock().unwrap().iter() {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "del", ns])
                    .status();
            }
            std::process::exit(130);
        });
    }
}

fn specs(weights: &[u32]) -> Vec<BackendSpec> {
    weights
        .iter()
        .enumerate()
        .filter(|(_, w)| **w > 0)
        .map(|(i, &w)| BackendSpec {
            addr: backend_addr(i).into(),
            weight: w,
        })
        .collect()
}

fn requests(t: &Topology, n: usize) -> BTreeMap<String, usize> {
    let h = t
        .client
        .spawn(move || {
            let mut seen = BTreeMap::new();
            for _ in 0..n {
                let b = topology::tcp_request(vip_addr(TCP_PORT), TIMEOUT)
                    .unwrap_or_else(|e| format!("FAILED ({e})"));
                *seen.entry(b).or_insert(0) += 1;
            }
            seen
        })
        .unwrap();
    h.join().unwrap()
}

fn show(title: &str, seen: &BTreeMap<String, usize>) {
    let total: usize = seen.values().sum();
    println!("  {title}");
    for (b, n) in seen {
        let pct = 100.0 * *n as f64 / total as f64;
        println!(
            "    {b:<8} {n:>5}  {pct:5.1}%  {}",
            "#".repeat((pct / 2.0) as usize)
        );
    }
}

fn counters(bal: &Balancer, svc: &Services, ids: &[VipId]) {
    println!("  datapath counters (per-CPU maps, summed):");
    for id in ids {
        let c = bal.vip_stats(svc.vip_index(id).unwrap());
        println!(
            "    VIP {id:<18} {:>7} packets {:>9} bytes",
            c.packets, c.bytes
        );
    }
    for i in 0..3 {
        let a = backend_addr(i).into();
        if let Some(idx) = svc.backend_index(&a) {
            let c = bal.backend_stats(idx);
            println!(
                "    backend b{i} {a:<12} {:>7} packets {:>9} bytes",
                c.packets, c.bytes
            );
        }
    }
    for (name, c) in bal.global_stats() {
        if c.packets > 0 {
            println!("    {name:<22} {:>7}", c.packets);
        }
    }
}

fn main() -> anyhow::Result<()> {
    require_root();
    cleanup_on_signal();
    let started = Instant::now();
    println!(
        "maglb demo: an XDP Maglev balancer with direct server return, in network namespaces\n"
    );
    let t = Topology::build("demo", 3)?;
    {
        let mut ns = NAMESPACES.lock().unwrap();
        for n in [&t.client, &t.router, &t.lb].into_iter().chain(&t.backends) {
            ns.push(n.name.clone());
        }
    }
    println!(
        "topology: client -> router -> balancer (XDP native on veth l0) -> router -> 3 backends"
    );
    println!(
        "  client 10.10.1.2, VIP {VIP}, backends {} {} {} (decap XDP, VIP on lo)",
        backend_addr(0),
        backend_addr(1),
        backend_addr(2)
    );
    println!("  backends answer the client directly (direct server return)\n");

    let mut bal = t.attach_balancer()?;
    let mut svc = Services::new();
    let tcp = vip(VIP, TCP_PORT, "tcp");
    let udp = vip(VIP, UDP_PORT, "udp");
    for id in [tcp, udp] {
        let mut spec = lb_userspace::service::VipSpec::new(id);
        spec.backends = specs(&[1, 1, 1]);
        svc.set_vip(&mut bal, spec)?;
    }
    println!("1. VIP {tcp} and {udp}, three backends of weight 1: 600 TCP connections");
    show("answers per backend:", &requests(&t, 600));

    let udp_seen = t.client.run(|| {
        let mut seen = BTreeMap::new();
        for _ in 0..300 {
            let b = topology::udp_request(vip_addr(UDP_PORT), TIMEOUT)
                .unwrap_or_else(|e| format!("FAILED ({e})"));
            *seen.entry(b).or_insert(0) += 1;
        }
        seen
    })?;
    println!("\n2. 300 UDP exchanges, each from a new source port");
    show("answers per backend:", &udp_seen);

    println!("\n3. ping the VIP: the XDP program answers echo requests itself");
    let ping = t.client.exec(
        "ping",
        &["-c", "3", "-i", "0.2", "-W", "1", &VIP.to_string()],
    );
    match ping {
        Ok(out) => out
            .lines()
            .filter(|l| l.contains("bytes from") || l.contains("loss"))
            .for_each(|l| println!("    {l}")),
        Err(e) => println!("    ping failed: {e}"),
    }

    println!("\n4. weights 1 : 1 : 3 (one atomic ring switch): 600 more connections");
    svc.set_backends(&mut bal, &tcp, specs(&[1, 1, 3]))?;
    show("answers per backend:", &requests(&t, 600));

    println!("\n5. 30 long-lived connections open, then b0 leaves the table");
    let mut conns = t
        .client
        .run(|| -> anyhow::Result<Vec<(LongConn, String)>> {
            (0..30)
                .map(|_| {
                    let mut c = LongConn::open(vip_addr(TCP_PORT), TIMEOUT)?;
                    let b = c.ask()?;
                    Ok((c, b))
                })
                .collect()
        })??;
    let on_b0 = conns.iter().filter(|(_, b)| b == "b0").count();
    svc.set_backends(&mut bal, &tcp, specs(&[0, 1, 3]))?;
    show("new connections after the change:", &requests(&t, 300));
    let kept = t.client.run(move || {
        let mut kept = 0;
        for (c, b) in conns.iter_mut() {
            if c.ask().ok().as_ref() == Some(b) {
                kept += 1;
            }
        }
        kept
    })?;
    println!(
        "  established connections still on their backend: {kept}/30 ({on_b0} of them on b0)\n"
    );

    counters(&bal, &svc, &[tcp, udp]);
    println!(
        "\ndone in {:.1} s; removing the namespaces",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
