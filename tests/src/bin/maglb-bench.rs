//! `cargo xtask bench`: per-packet cost of the balancer through BPF_PROG_TEST_RUN, against an
//! empty XDP program measured the same way, and Maglev table build times.
//!
//! With repeat > 1 the kernel runs the program again on the frame it already rewrote, so
//! every measurement is one packet per run, and many runs give a median.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use aya::{TestRun, TestRunOptions, programs::Xdp};
use lb_userspace::{
    decap::{self, Decap},
    maglev,
};
use maglb_tests::{
    fixture::{CLIENT, CLIENT_MAC, CLIENT6, IF_MAC, Lab, VIP, VIP6},
    netns::require_root,
    packet::*,
};

const RUNS: usize = 20_000;
const ROUNDS: usize = 5;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median nanoseconds of one run of `prog` over `frames` (cycled), over `RUNS` runs.
fn time(prog: &Xdp, frames: &[Vec<u8>]) -> f64 {
    let mut out = vec![0u8; 4096];
    let mut ns = Vec::with_capacity(RUNS);
    for i in 0..RUNS {
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&frames[i % frames.len()]),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        ns.push(r.duration.as_nanos() as f64);
    }
    median(ns)
}

fn frame4(sport: u16, dport: u16, proto: u8) -> Vec<u8> {
    let l4 = if proto == TCP {
        tcp4(
            CLIENT,
            VIP,
            sport,
            dport,
            if dport == 80 { SYN } else { ACK },
            &[0; 64],
        )
    } else {
        udp4(CLIENT, VIP, sport, dport, &[0; 64])
    };
    eth(
        IF_MAC,
        CLIENT_MAC,
        ETH_IP,
        &ipv4(V4::new(CLIENT, VIP, proto), &[], &l4),
    )
}

fn main() -> anyhow::Result<()> {
    require_root();
    let mut lab = Lab::new()?;
    let mut empty = Decap::load()?;

    // New flows: a different source port every run, so every run misses the connection table.
    let syns: Vec<Vec<u8>> = (0..RUNS)
        .map(|i| frame4(1024 + (i % 60000) as u16, 80, TCP))
        .collect();
    let established = vec![frame4(40000, 80, TCP)];
    let udp = vec![frame4(40001, 53, UDP)];
    let v6 = vec![eth(
        IF_MAC,
        CLIENT_MAC,
        ETH_IPV6,
        &ipv6(
            CLIENT6,
            VIP6,
            TCP,
            0,
            0,
            &tcp6(CLIENT6, VIP6, 40000, 80, ACK, &[0; 64]),
        ),
    )];
    let other = Ipv4Addr::new(10, 0, 0, 7);
    let pass = vec![eth(
        IF_MAC,
        CLIENT_MAC,
        ETH_IP,
        &ipv4(
            V4::new(CLIENT, other, TCP),
            &[],
            &tcp4(CLIENT, other, 1, 80, ACK, &[0; 64]),
        ),
    )];
    let _ = Ipv6Addr::LOCALHOST;

    let cases: [(&str, &[Vec<u8>]); 5] = [
        ("new TCP flow (SYN)", &syns),
        ("established TCP flow", &established),
        ("UDP (established)", &udp),
        ("IPv6 TCP (established)", &v6),
        ("not for a VIP (pass)", &pass),
    ];
    println!(
        "XDP per-packet cost, BPF_PROG_TEST_RUN, one packet per run, {RUNS} runs x {ROUNDS} rounds"
    );
    println!(
        "{:<26} {:>12} {:>12} {:>14}",
        "case", "median ns", "empty ns", "maglb - empty"
    );
    let mut rows: Vec<(String, Vec<f64>, Vec<f64>)> = cases
        .iter()
        .map(|(n, _)| (n.to_string(), Vec::new(), Vec::new()))
        .collect();
    for _ in 0..ROUNDS {
        for (i, (_, frames)) in cases.iter().enumerate() {
            // The empty program is measured right next to each case, on the same frames.
            let e = time(empty.program(decap::PASS_PROGRAM)?, frames);
            let m = time(lab.bal.program(), frames);
            rows[i].1.push(m);
            rows[i].2.push(e);
        }
    }
    for (name, m, e) in rows {
        let (m, e) = (median(m), median(e));
        println!("{name:<26} {m:>12.1} {e:>12.1} {:>14.1}", m - e);
    }

    println!(
        "\nMaglev table build, {} slots",
        lb_common::DEFAULT_RING_SIZE
    );
    println!(
        "{:<12} {:>12} {:>16}",
        "backends", "median ms", "slots changed*"
    );
    for n in [10u32, 100, 1000] {
        let entries: Vec<maglev::Entry> = (0..n)
            .map(|i| maglev::Entry {
                id: vec![10, 1, (i >> 8) as u8, i as u8],
                weight: 1 + i % 3,
                value: i,
            })
            .collect();
        let mut ms = Vec::new();
        let mut table = Vec::new();
        for _ in 0..7 {
            let t = Instant::now();
            table = maglev::build(&entries, lb_common::DEFAULT_RING_SIZE);
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let without_one = maglev::build(&entries[1..], lb_common::DEFAULT_RING_SIZE);
        let changed = maglev::changed(&table, &without_one).len();
        println!("{n:<12} {:>12.2} {changed:>16}", median(ms));
    }
    println!("* slots written when one backend of the set is removed (only those reach the map)");
    Ok(())
}
