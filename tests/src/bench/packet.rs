//! Per-packet cost of the balancer through BPF_PROG_TEST_RUN, against an empty XDP program
//! measured the same way, and Maglev table build times.
//!
//! With repeat > 1 the kernel runs the program again on the frame it already rewrote, so
//! every measurement is one packet per run, and many runs give a median.

use std::{net::Ipv4Addr, time::Instant};

use aya::{TestRun, TestRunOptions, programs::Xdp};
use lb_userspace::{
    datapath::decap::{self, Decap},
    maglev,
};

use super::{Report, median, verdict};
use crate::{
    fixture::{CLIENT, CLIENT_MAC, CLIENT6, IF_MAC, Lab, VIP, VIP6},
    packet::*,
};

const RUNS: usize = 20_000;
const ROUNDS: usize = 5;

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

/// Per-packet costs and Maglev build times.
pub fn run(report: &mut Report) -> anyhow::Result<()> {
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

    // Targets (issue 6), ns above the empty program.
    let cases: [(&str, &[Vec<u8>], f64); 5] = [
        ("new TCP flow (SYN)", &syns, 180.0),
        ("established TCP flow", &established, 80.0),
        ("UDP (established)", &udp, 80.0),
        ("IPv6 TCP (established)", &v6, 80.0),
        ("not for a VIP (pass)", &pass, 25.0),
    ];
    let mut rows: Vec<(String, Vec<f64>, Vec<f64>)> = cases
        .iter()
        .map(|(n, _, _)| (n.to_string(), Vec::new(), Vec::new()))
        .collect();
    for _ in 0..ROUNDS {
        for (i, (_, frames, _)) in cases.iter().enumerate() {
            // The empty program is measured right next to each case, on the same frames.
            let e = time(empty.program(decap::PASS_PROGRAM)?, frames);
            let m = time(lab.bal.program(), frames);
            rows[i].1.push(m);
            rows[i].2.push(e);
        }
    }
    let table: Vec<Vec<String>> = rows
        .into_iter()
        .zip(cases.iter())
        .map(|((name, m, e), (_, _, target))| {
            let (m, e) = (median(m), median(e));
            vec![
                name,
                format!("{m:.0}"),
                format!("{e:.0}"),
                format!("{:.0}", m - e),
                format!("{target:.0}"),
                verdict(m - e <= *target),
            ]
        })
        .collect();
    report.section(
        "1. Per-packet cost (BPF_PROG_TEST_RUN)",
        &[
            "case",
            "maglb ns",
            "empty XDP ns",
            "maglb - empty",
            "target",
            "",
        ],
        &table,
        &[format!(
            "Medians of {RUNS} runs x {ROUNDS} rounds, one packet per run; the empty program is \
             measured next to each case on the same frames. The per-run time includes the \
             kernel's test-run overhead, which the subtraction removes."
        )],
    );
    let mut build = Vec::new();
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
        let changed = table
            .iter()
            .zip(&without_one)
            .filter(|(a, b)| a != b)
            .count();
        build.push(vec![
            n.to_string(),
            format!("{:.2}", median(ms)),
            changed.to_string(),
        ]);
    }
    report.section(
        "Maglev table build (65537 slots)",
        &[
            "backends",
            "median ms",
            "slots written when one backend leaves",
        ],
        &build,
        &[],
    );
    Ok(())
}
