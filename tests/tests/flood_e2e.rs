//! A SYN flood end to end, as root, in namespaces this test creates: a client namespace
//! sends real TCP traffic and a SYN flood from random spoofed sources, through the router
//! and the XDP balancer, to three backends with the decap program and kernel TCP servers
//! (see `maglb_tests::flood` and `maglb_tests::topology`).

use std::time::Duration;

use lb_common::{stat, vip_stat};
use lb_userspace::balancer::RateLimit;
use maglb_tests::{
    flood::{FloodLab, FloodSpec, PhaseSpec, TABLE, phase},
    netns::require_root,
};

const ESTABLISHED: usize = 100;

#[test]
fn a_syn_flood_breaks_no_established_connection_and_legitimate_clients_get_through() {
    require_root();
    let mut lab = FloodLab::build("fle", TABLE, 8).expect("topology");
    let id = FloodLab::id();
    let vi = lab.bal.vip_index(&id).unwrap();

    // 100 long-lived connections, each remembered by the connection table; then b0 is
    // drained, so that b0's connections stay there only through their entries, and the
    // flood threshold is set (100 new flows/s per CPU). A per-source limit: 200 new flows/s.
    let conns = lab.establish(ESTABLISHED).expect("open connections");
    let on_b0 = conns.on("b0");
    let limit = RateLimit {
        new_flows_per_s: 200,
        burst: 200,
    };
    lab.bal.set_vip_source_limit(&id, Some(limit)).unwrap();
    let before = lab.bal.flood_stats();

    // 5 s: the established connections asked every second, legitimate new connections
    // (about 100/s from 8 addresses), a greedy client, and 5000 SYNs/s from random sources
    // (a sender on each CPU). The same flood without the flood mode evicts entries of b0's
    // connections, which then move and break (15 of 34 in a trial run): the table's share
    // of a CPU (1024) turns over several times, faster than the connections are asked.
    let spec = PhaseSpec {
        run: Duration::from_secs(5),
        threads: 2,
        pace: Duration::from_millis(20),
        greedy: true,
        flood: Some(FloodSpec {
            rate: 5000,
            max: 25_000,
            limit: Duration::from_secs(6),
        }),
        ask_every: Duration::from_millis(1000),
    };
    let (p, _conns) = phase(&lab, conns, &spec).expect("traffic");
    let secs = p.elapsed.as_secs_f64();
    let legit = p.new.ok + p.new.failed.len();
    let f = lab.bal.flood_stats();
    let (windows, not_inserted) = (
        f.flood_windows - before.flood_windows,
        f.not_inserted - before.not_inserted,
    );
    let drops = lab.bal.vip_drop(vi, vip_stat::SRC_RATE).packets;
    println!(
        "{secs:.1} s: flood {} SYNs ({:.0}/s); legitimate {}/{legit} ({:.0}/s); greedy {} ok, \
         {} failed; {} rounds over {} established ({on_b0} on b0), {} broken; flood windows \
         {windows}, not inserted {not_inserted}; src_rate drops {drops}",
        p.flood_sent,
        p.flood_sent as f64 / secs,
        p.new.ok,
        legit as f64 / secs,
        p.greedy.ok,
        p.greedy.failed.len(),
        p.rounds,
        ESTABLISHED,
        p.broken.len(),
    );

    // The flood ran at many times the legitimate rate, and the flood mode engaged: more new
    // flows went uninserted than the table holds.
    assert!(p.flood_sent >= 20_000, "flood sent only {}", p.flood_sent);
    assert!(
        p.flood_sent as usize >= 10 * legit,
        "flood not above the legitimate rate"
    );
    assert!(windows >= 5, "flood mode engaged in {windows} windows");
    assert!(
        not_inserted > TABLE as u64,
        "only {not_inserted} new flows not inserted"
    );
    // (a) No established connection broke or moved, asked all along.
    assert!(
        p.rounds >= 4,
        "established connections asked {} times",
        p.rounds
    );
    assert!(p.broken.is_empty(), "broken: {:?}", p.broken);
    // (b) Legitimate new connections got through.
    assert!(legit >= 100, "only {legit} legitimate connections tried");
    assert!(
        p.new.success() >= 0.99,
        "{} of {legit} legitimate connections failed: {:?}",
        p.new.failed.len(),
        &p.new.failed[..p.new.failed.len().min(5)]
    );
    // (c) The greedy client went over its per-source limit: its new flows were dropped, and
    // counted for the VIP under their reason.
    assert!(
        !p.greedy.failed.is_empty(),
        "the greedy client was never refused"
    );
    assert!(drops > 0, "no src_rate drops counted");
    assert!(lab.bal.global_stat(stat::DROP_SRC_RATE).packets >= drops);
    assert!(
        lab.bal
            .vip_drops(vi)
            .iter()
            .any(|(name, c)| *name == "drop_src_rate" && c.packets == drops)
    );
}
