//! `cargo xtask demo`: maglb as an operator runs it, in namespaces this program creates and
//! removes (also on Ctrl-C). Every change goes through the `maglb` command.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::Mutex,
    time::{Duration, Instant},
};

use maglb_tests::{
    agent::{Agent, Scratch},
    netns::require_root,
    topology::{self, Conns, TCP_PORT, Topology, VIP, backend_addr, vip_addr},
};

const TIMEOUT: Duration = Duration::from_secs(3);

/// What to remove if the demo is interrupted: namespaces, pin directories, the agent.
static CLEANUP: Mutex<(Vec<String>, Vec<PathBuf>, Option<u32>)> =
    Mutex::new((Vec::new(), Vec::new(), None));

/// Blocks SIGINT/SIGTERM in every thread; on one, removes what the demo made and exits.
fn cleanup_on_signal() {
    // SAFETY: `sigset_t` is plain data that `sigemptyset` initialises; the set lives on this
    // stack frame (then moves into the thread) and every pointer passed is to it. Blocking
    // signals is done before any other thread exists, so every thread inherits the mask and
    // only `sigwait` below receives them. No safe interface to sigwait exists in our
    // dependencies.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: both pointers are to live locals of this thread.
        unsafe { libc::sigwait(&set, &mut sig) };
        eprintln!("\ninterrupted: removing the demo's namespaces, pins and agent");
        let c = CLEANUP.lock().unwrap();
        if let Some(pid) = c.2.and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        }
        for ns in &c.0 {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", ns])
                .status();
        }
        for d in &c.1 {
            let _ = std::fs::remove_dir_all(d);
        }
        std::process::exit(130);
    });
}

/// Runs and shows a `maglb` command.
fn run(a: &Agent, args: &[&str]) {
    println!("$ maglb {}", args.join(" "));
    for l in a.ok(args).lines() {
        println!("  {l}");
    }
}

fn requests(t: &Topology, n: usize) -> BTreeMap<String, usize> {
    t.client
        .run(move || {
            let mut seen = BTreeMap::new();
            for _ in 0..n {
                let b = topology::http_get(vip_addr(TCP_PORT), TIMEOUT)
                    .unwrap_or_else(|e| format!("FAILED ({e})"));
                *seen.entry(b).or_insert(0) += 1;
            }
            seen
        })
        .unwrap()
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

fn main() -> anyhow::Result<()> {
    require_root();
    cleanup_on_signal();
    let started = Instant::now();
    let bin = maglb_tests::agent::sibling_maglb();
    let scratch = Scratch::new("demo");
    println!(
        "maglb demo: an XDP Maglev load balancer with direct server return, in network namespaces\n"
    );
    let t = Topology::build_with("demo", 3, false)?;
    {
        let mut c = CLEANUP.lock().unwrap();
        for n in [&t.client, &t.router, &t.lb].into_iter().chain(&t.backends) {
            c.0.push(n.name.clone());
        }
        c.1.extend([
            scratch.0.bpffs.clone(),
            scratch.0.decap_pins.clone(),
            scratch.0.dir.clone(),
        ]);
    }
    println!("topology: client 10.10.1.2 -> router -> balancer l0 10.10.2.2 (XDP native)");
    println!(
        "          -> router -> backends b0 b1 b2 at {} {} {}",
        backend_addr(0),
        backend_addr(1),
        backend_addr(2)
    );
    println!(
        "          backends serve HTTP on the VIP {VIP} (bound on lo) and answer the client directly\n"
    );

    println!("1. on each backend: the decap program (no agent needed there)");
    for (i, b) in t.backends.iter().enumerate() {
        let pins = scratch.0.decap_pins.join(format!("b{i}"));
        let out = b
            .command(&bin)?
            .args(["decap", "attach", "--iface", "e0", "--pin-dir"])
            .arg(&pins)
            .output()?;
        println!(
            "  b{i}$ maglb decap attach --iface e0\n    {}",
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }

    println!("\n2. on the balancer: start the agent, attach, add a VIP and backends");
    let a = Agent::start(Path::new(&bin), &t.lb, &scratch.0)?;
    CLEANUP.lock().unwrap().2 = a.pid();
    println!("$ maglb agent &");
    let vip = format!("{VIP}:{TCP_PORT}/tcp");
    run(&a, &["attach", "--iface", "l0"]);
    run(&a, &["vip", "add", &vip]);
    for i in 0..3 {
        run(
            &a,
            &[
                "backend",
                "add",
                &vip,
                &backend_addr(i).to_string(),
                "--weight",
                "1",
            ],
        );
    }
    let ready = topology::wait_for(Duration::from_secs(10), || {
        a.ok(&["status"]).contains("forwarding   yes")
    });
    run(&a, &["status"]);
    if !ready {
        anyhow::bail!("the datapath did not become ready:\n{}", a.log());
    }

    println!("\n3. real HTTP requests from the client");
    for _ in 0..3 {
        let out = t
            .client
            .exec("curl", &["-s", "-m", "2", &format!("http://{VIP}/")]);
        println!(
            "  client$ curl http://{VIP}/   ->  {}",
            out.map(|o| o.trim().to_owned())
                .unwrap_or_else(|e| e.to_string())
        );
    }
    show("600 requests, answers per backend:", &requests(&t, 600));

    println!("\n4. weights 1 : 1 : 3, one atomic table switch");
    run(
        &a,
        &[
            "backend",
            "set-weight",
            &vip,
            &backend_addr(2).to_string(),
            "3",
        ],
    );
    show("600 requests:", &requests(&t, 600));

    println!("\n5. drain b0 while 30 long-lived connections are open");
    let conns = t
        .client
        .run(|| Conns::open(30, vip_addr(TCP_PORT), TIMEOUT))??;
    let on_b0 = conns.on("b0");
    run(
        &a,
        &["backend", "drain", &vip, &backend_addr(0).to_string()],
    );
    show("300 new requests:", &requests(&t, 300));
    let kept = t.client.run(move || {
        let mut conns = conns;
        30 - conns.broken().len()
    })?;
    println!(
        "  established connections still answered by their backend: {kept}/30 ({on_b0} on the drained b0)"
    );

    println!(
        "\n6. health checks: on by default (a TCP connect to the VIP's port); an HTTP check \
         instead, then b1's health endpoint starts failing"
    );
    run(&a, &["health"]);
    let hc = [
        "vip", "health", &vip, "--kind", "http", "--port", "8080", "--path", "/health",
    ];
    run(
        &a,
        &[
            &hc[..],
            &["--interval-ms", "200", "--timeout-ms", "150", "--fall", "2"],
        ]
        .concat(),
    );
    topology::wait_for(Duration::from_secs(3), || {
        a.ok(&["health"]).matches(" up ").count() == 3
    });
    t.ctl[1]
        .health_status
        .store(503, std::sync::atomic::Ordering::Relaxed);
    let t0 = Instant::now();
    let b1_down = || {
        a.ok(&["health"])
            .lines()
            .any(|l| l.contains("10.10.3.12 ") && l.contains(" down "))
    };
    topology::wait_for(Duration::from_secs(5), b1_down);
    println!(
        "  (b1 taken out {:.0} ms after its endpoint began answering 503)",
        t0.elapsed().as_secs_f64() * 1e3
    );
    run(&a, &["health"]);
    show("300 new requests:", &requests(&t, 300));

    println!("\n7. what the datapath counted");
    run(&a, &["backend", "list"]);
    run(&a, &["stats"]);

    println!("\n8. the running state as a config file");
    run(&a, &["config", "export"]);
    println!(
        "\nthis demo runs one balancer. More of them carry the same config: two as an \
         active/passive pair ([vrrp], IPv4 or IPv6), or any number active/active behind a \
         router with ECMP ([bgp] and BIRD with BFD, see packaging/bird/ and `maglb bgp \
         status`); `cargo test -p maglb-tests --test ecmp` runs three balancers behind BIRD."
    );
    println!(
        "done in {:.1} s; removing the namespaces, pins and agent",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
