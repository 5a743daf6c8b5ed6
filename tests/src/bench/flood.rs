//! Under a SYN flood from random spoofed sources (`crate::flood`): established connections
//! kept and legitimate new connections served, against the same traffic without the flood,
//! in alternating rounds of the same run.

use std::time::Duration;

use super::{Report, median, verdict};
use crate::flood::{FloodLab, FloodSpec, Phase, PhaseSpec, TABLE, THRESHOLD, phase};

const ROUNDS: usize = 3;
const RUN: Duration = Duration::from_secs(3);
const ESTABLISHED: usize = 100;
const FLOOD: FloodSpec = FloodSpec {
    rate: 10_000,
    max: 40_000,
    limit: Duration::from_secs(4),
};

/// A row of the table: (new connections/s, success, p50 ms, p99 ms) medians over the
/// rounds, and the established connections broken in all of them.
struct Figures {
    rate: f64,
    success: f64,
    p50: f64,
    p99: f64,
    broken: usize,
    flood_rate: f64,
}

fn figures(rounds: &[Phase]) -> Figures {
    let per = |f: &dyn Fn(&Phase) -> f64| median(rounds.iter().map(f).collect());
    let quantile = |p: &Phase, q: f64| {
        let mut l: Vec<f64> = p
            .new
            .latencies
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        l.sort_by(f64::total_cmp);
        l.get((l.len() as f64 * q) as usize)
            .copied()
            .unwrap_or(f64::NAN)
    };
    Figures {
        rate: per(&|p| p.new.ok as f64 / p.elapsed.as_secs_f64()),
        success: per(&|p| p.new.success()),
        p50: per(&|p| quantile(p, 0.5)),
        p99: per(&|p| quantile(p, 0.99)),
        broken: rounds.iter().map(|p| p.broken.len()).sum(),
        flood_rate: per(&|p| p.flood_sent as f64 / p.elapsed.as_secs_f64()),
    }
}

pub fn run(report: &mut Report) -> anyhow::Result<()> {
    let mut lab = FloodLab::build("bfl", TABLE, 8)?;
    let mut conns = lab.establish(ESTABLISHED)?;
    let (mut calm, mut flooded) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        for flood in [None, Some(FLOOD)] {
            let spec = PhaseSpec {
                run: RUN,
                threads: 2,
                pace: Duration::ZERO,
                greedy: false,
                flood,
                ask_every: Duration::from_secs(1),
            };
            let (p, c) = phase(&lab, conns, &spec)?;
            conns = c;
            println!(
                "  round: flood {} SYNs, new {} ok {} failed, broken {}",
                p.flood_sent,
                p.new.ok,
                p.new.failed.len(),
                p.broken.len()
            );
            if flood.is_some() {
                &mut flooded
            } else {
                &mut calm
            }
            .push(p);
        }
    }
    let f = lab.bal.flood_stats();
    let (c, u) = (figures(&calm), figures(&flooded));
    let row = |name: &str, x: &Figures| {
        vec![
            name.to_string(),
            format!("{:.0}", x.flood_rate),
            format!("{}/{ESTABLISHED}", ESTABLISHED - x.broken),
            format!("{:.0}", x.rate),
            format!("{:.2}%", x.success * 100.0),
            format!("{:.2}", x.p50),
            format!("{:.2}", x.p99),
        ]
    };
    report.section(
        "7. Under a SYN flood (real TCP, random spoofed sources)",
        &[
            "phase",
            "flood SYNs/s",
            "established kept",
            "new connections/s",
            "succeeded",
            "p50 ms",
            "p99 ms",
        ],
        &[row("no flood", &c), row("flood", &u)],
        &[
            format!(
                "Under flood / no flood: new connections/s {:.2}, p99 {:.2}x. Established \
                 connections broken under flood: {} (target 0: {}); new connections \
                 succeeded under flood: {:.2}% (target 99%: {}). The flood mode engaged in {} \
                 windows and forwarded {} new-flow packets without inserting them (the flood's, and \
                 those of legitimate connections it did not insert).",
                u.rate / c.rate,
                u.p99 / c.p99,
                u.broken,
                verdict(u.broken == 0),
                u.success * 100.0,
                verdict(u.success >= 0.99),
                f.flood_windows,
                f.not_inserted
            ),
            format!(
                "The e2e topology (client, router, balancer, three backends with the decap \
                 program and kernel TCP servers). {ESTABLISHED} connections opened first and \
                 asked every second; b0 is then drained, so its connections stay on it only \
                 through their connection-table entries ({TABLE} entries, flood threshold \
                 {THRESHOLD} new flows/s per CPU). Two client threads open new connections \
                 back to back from 8 addresses (one request each) for {} s; in the flood \
                 phase raw sockets in the client's namespace (one per CPU) send {} SYNs/s from \
                 random addresses in 100.64.0.0/10, which the backends answer toward a blackhole \
                 route. Medians of {ROUNDS} rounds of each, alternating. Flood, clients, \
                 router, balancer and backends share the 2 cores: the flood's cost shows as \
                 much in the machine's CPU as in the balancer.",
                RUN.as_secs(),
                FLOOD.rate
            ),
        ],
    );
    Ok(())
}
