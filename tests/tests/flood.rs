//! The connection table and the defences of the new-flow path, through BPF_PROG_TEST_RUN:
//! TCP flags (SYN, RST, FIN), idle timeouts, the flood mode, per-source rate limits, the
//! per-VIP cap, source prefix lists, the table's size and its sets. Needs root; no interface is
//! touched. Tests that depend on per-CPU state pin their thread to one CPU.

use std::{net::Ipv4Addr, time::Duration};

use lb_common::{CONN_WAYS, PROTO_TCP, PROTO_UDP, conn_set, hash, stat, vip_stat};
use lb_userspace::{
    balancer::{Balancer, BalancerError, LoadOptions, Prefix, RateLimit},
    state::{BackendSpec, VipId, VipSpec},
};
use maglb_tests::{
    fixture::{self, *},
    packet::*,
};

const DROP: u32 = 1;
const TX: u32 = 3;
const FIN: u8 = 0x01;
const RST: u8 = 0x04;

fn lab() -> Lab {
    Lab::new().expect("load the balancer (root needed)")
}

/// The outer destination (backend) of an encapsulated IPv4 frame.
fn backend_of(out: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(out[30], out[31], out[32], out[33])
}

/// VIP:80/tcp's B1 leaves (drained, weight 0) and B2 takes new flows.
fn drain_b1(lab: &mut Lab) {
    let id = vip(VIP, 80, "tcp");
    lab.bal
        .set_backends(
            &id,
            vec![
                BackendSpec::new(B1.into(), 0),
                BackendSpec::new(B2.into(), 1),
            ],
        )
        .unwrap();
}

fn id80() -> VipId {
    vip(VIP, 80, "tcp")
}

fn vip80(lab: &Lab) -> u32 {
    lab.bal.vip_index(&vip(VIP, 80, "tcp")).unwrap()
}

#[test]
fn rst_and_fin_never_insert() {
    let mut lab = lab();
    for (i, flags) in [RST, FIN, FIN | ACK, RST | ACK].into_iter().enumerate() {
        let sport = 30000 + i as u16;
        let (a, out) = lab.run(&tcp_frame(CLIENT, VIP, sport, 80, flags));
        assert_eq!(a, TX, "flags {flags:#x}: still forwarded");
        assert_eq!(backend_of(&out), B1);
        let flow = flow4(CLIENT, VIP, sport, 80, PROTO_TCP);
        assert_eq!(lab.bal.conntrack(&flow), None, "flags {flags:#x} inserted");
    }
    // A SYN, an ACK without an entry, and a UDP datagram do insert.
    for (sport, flags) in [(31000, SYN), (31001, ACK)] {
        lab.run(&tcp_frame(CLIENT, VIP, sport, 80, flags));
        let flow = flow4(CLIENT, VIP, sport, 80, PROTO_TCP);
        assert!(lab.bal.conntrack(&flow).is_some(), "flags {flags:#x}");
    }
    lab.run(&udp_frame(CLIENT, VIP, 31002, 53));
    assert!(
        lab.bal
            .conntrack(&flow4(CLIENT, VIP, 31002, 53, PROTO_UDP))
            .is_some()
    );
}

#[test]
fn a_syn_skips_the_lookup_and_is_chosen_again() {
    let mut lab = lab();
    let flow = flow4(CLIENT, VIP, 32000, 80, PROTO_TCP);
    let syn = tcp_frame(CLIENT, VIP, 32000, 80, SYN);
    let ack = tcp_frame(CLIENT, VIP, 32000, 80, ACK);
    assert_eq!(backend_of(&lab.run(&syn).1), B1);
    drain_b1(&mut lab);
    // The established flow keeps B1 ...
    assert_eq!(backend_of(&lab.run(&ack).1), B1);
    // ... but a SYN for the same 5-tuple never looks: the ring chooses again (B2), and the
    // entry now says B2.
    assert_eq!(backend_of(&lab.run(&syn).1), B2);
    let b2 = lab.bal.backend_index(&vip(VIP, 80, "tcp"), &B2.into());
    assert_eq!(lab.bal.conntrack(&flow).map(|e| e.backend), b2);
    assert_eq!(backend_of(&lab.run(&ack).1), B2);
    // Counted: the two SYNs chose from the ring, the two ACKs hit the table.
    let vi = vip80(&lab);
    assert_eq!(lab.bal.vip_new_flows(vi), 2);
    assert_eq!(lab.bal.vip_stats(vi).packets, 4);
    assert_eq!(lab.bal.global_stat(stat::CT_HIT).packets, 2);
    assert_eq!(lab.bal.global_stat(stat::CT_MISS).packets, 2);
}

/// Client `c`'s TCP flow from port 40000 to VIP:80.
fn flow_from(c: Ipv4Addr) -> lb_common::FlowKey {
    flow4(c, VIP, 40000, 80, PROTO_TCP)
}

/// `n` clients whose flows (`flow_from`) hash to the same connection-table set.
fn same_set(lab: &Lab, n: usize) -> Vec<Ipv4Addr> {
    let mask = lab.bal.conntrack_entries() / CONN_WAYS as u32 - 1;
    let set = |c: Ipv4Addr| conn_set(hash::flow_hash(&flow_from(c)), mask);
    let client = |i: u32| Ipv4Addr::from(0x0a63_0000 + i);
    let first = set(client(0));
    let found: Vec<Ipv4Addr> = (0..1 << 20)
        .map(client)
        .filter(|&c| set(c) == first)
        .take(n)
        .collect();
    assert_eq!(found.len(), n, "not enough flows for one set");
    found
}

/// Waits (at most 1 s) until a stamp taken now in the datapath is later than `stamp` (clock
/// ticks, `lb_common::CLOCK_SHIFT`). The coarse clock moves in jiffies, sometimes several at
/// once after a late timer tick, and a CPU's copy of it may lag by a jiffy: so a fixed sleep
/// does not make two stamps differ, and this waits for two jiffies past `stamp`.
fn wait_past(stamp: u32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(1);
    loop {
        let (now, res) = coarse_clock();
        let ticks = |ns: u64| (ns >> lb_common::CLOCK_SHIFT) as u32;
        if ticks(now).wrapping_sub(stamp) as i32 > ticks(2 * res) as i32 + 1 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the coarse clock did not move"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

#[test]
fn a_full_set_gives_the_slot_idle_longest_and_a_repeated_syn_keeps_its_slot() {
    let mut lab = lab();
    let clients = same_set(&lab, CONN_WAYS + 1);
    let has = |lab: &Lab, c: Ipv4Addr| lab.bal.conntrack(&flow_from(c)).is_some();
    let stamp = |lab: &Lab, c: Ipv4Addr| {
        let e = lab.bal.conntrack(&flow_from(c));
        e.expect("flow in the table").last_seen
    };
    // Fill the set, oldest first, each flow stamped later than the one before.
    for &c in &clients[..CONN_WAYS] {
        lab.run(&tcp_frame(c, VIP, 40000, 80, SYN));
        wait_past(stamp(&lab, c));
    }
    assert!(clients[..CONN_WAYS].iter().all(|&c| has(&lab, c)));
    assert_eq!(lab.bal.conntrack_len(), CONN_WAYS);
    // The oldest flow is used again: the second oldest is now the one idle longest.
    lab.run(&tcp_frame(clients[0], VIP, 40000, 80, ACK));
    // A new flow in the full set takes that slot, and only that one.
    let new = clients[CONN_WAYS];
    lab.run(&tcp_frame(new, VIP, 40000, 80, SYN));
    assert!(
        !has(&lab, clients[1]),
        "the flow idle longest kept its slot"
    );
    for &c in clients.iter().filter(|&&c| c != clients[1]) {
        assert!(has(&lab, c), "the flow from {c} lost its slot");
    }
    // A SYN repeated (a retransmission) takes its own slot again, not a second one.
    lab.run(&tcp_frame(new, VIP, 40000, 80, SYN));
    assert_eq!(lab.bal.conntrack_len(), CONN_WAYS);
    assert!(has(&lab, clients[0]) && has(&lab, clients[2]));
}

#[test]
fn idle_timeouts_per_protocol() {
    pin_to_cpu(0).unwrap();
    let mut lab = lab();
    // TCP entries live 10 s, UDP ones 100 ms.
    lab.bal.set_idle_timeouts(Some(10_000), Some(100)).unwrap();
    let tcp_syn = tcp_frame(CLIENT, VIP, 33000, 80, SYN);
    let tcp_ack = tcp_frame(CLIENT, VIP, 33000, 80, ACK);
    assert_eq!(backend_of(&lab.run(&tcp_syn).1), B1);
    drain_b1(&mut lab);
    // UDP: VIP:53 is on B2 alone; then B2 is drained in favour of B3.
    let udp = udp_frame(CLIENT, VIP, 33001, 53);
    assert_eq!(backend_of(&lab.run(&udp).1), B2);
    lab.bal
        .set_backends(
            &vip(VIP, 53, "udp"),
            vec![
                BackendSpec::new(B2.into(), 0),
                BackendSpec::new(B3.into(), 1),
            ],
        )
        .unwrap();
    // Within both timeouts (and refreshing them), both flows stay.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(backend_of(&lab.run(&udp).1), B2, "UDP flow moved early");
        assert_eq!(backend_of(&lab.run(&tcp_ack).1), B1);
    }
    // Idle beyond the UDP timeout, with no other packet on the CPU meanwhile: the UDP flow
    // is chosen again (the clock copy is renewed in every new jiffy, by any packet); the TCP
    // one stays.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(backend_of(&lab.run(&udp).1), B3, "idle UDP entry honoured");
    assert_eq!(backend_of(&lab.run(&tcp_ack).1), B1, "TCP entry expired");
    // Without timeouts, idle entries are honoured however long.
    lab.bal.set_idle_timeouts(None, None).unwrap();
    let udp2 = udp_frame(CLIENT, VIP, 33002, 53);
    assert_eq!(backend_of(&lab.run(&udp2).1), B3);
    lab.bal
        .set_backends(
            &vip(VIP, 53, "udp"),
            vec![
                BackendSpec::new(B3.into(), 0),
                BackendSpec::new(B1.into(), 1),
            ],
        )
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(backend_of(&lab.run(&udp2).1), B3);
}

#[test]
fn under_flood_new_flows_are_forwarded_but_not_inserted() {
    pin_to_cpu(0).unwrap();
    let mut lab = lab();
    // 10 new flows/s per CPU: about 1.3 per 134 ms window, so the second insert of the
    // window reaches the threshold.
    lab.bal.set_flood_threshold(Some(10)).unwrap();
    let mut inserted = 0;
    for i in 0..20u16 {
        let (a, out) = lab.run(&tcp_frame(CLIENT, VIP, 34000 + i, 80, SYN));
        assert_eq!((a, backend_of(&out)), (TX, B1), "flow {i} not forwarded");
        if lab
            .bal
            .conntrack(&flow4(CLIENT, VIP, 34000 + i, 80, PROTO_TCP))
            .is_some()
        {
            inserted += 1;
        }
    }
    // Twenty test runs take a few ms: one window, or two if one ended in between.
    assert!((2..=4).contains(&inserted), "{inserted} of 20 inserted");
    let f = lab.bal.flood_stats();
    assert_eq!(f.not_inserted, 20 - inserted);
    assert!(f.flood_windows >= 1);
    // Every one counted as a new flow of the VIP.
    assert_eq!(lab.bal.vip_new_flows(vip80(&lab)), 20);
}

/// Establishes `n` flows, then sends `flood` SYNs from random sources, and returns how many
/// of the `n` flows are still in the table.
fn survivors(threshold: Option<u32>, n: u16, flood: u32) -> usize {
    pin_to_cpu(0).unwrap();
    // 2048 entries: 256 sets of 8.
    let mut lab = Lab::with(&LoadOptions {
        conntrack_entries: 2048,
    })
    .unwrap();
    lab.bal.set_flood_threshold(None).unwrap();
    for i in 0..n {
        lab.run(&tcp_frame(CLIENT, VIP, 20000 + i, 80, SYN));
    }
    lab.bal.set_flood_threshold(threshold).unwrap();
    let mut x: u32 = 0x1234_5678;
    for _ in 0..flood {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        let src = Ipv4Addr::from(x | 0x0100_0000);
        let (a, _) = lab.run(&tcp_frame(src, VIP, (x >> 16) as u16 | 1024, 80, SYN));
        assert_eq!(a, TX, "flood SYNs still get a backend");
    }
    (0..n)
        .filter(|i| {
            lab.bal
                .conntrack(&flow4(CLIENT, VIP, 20000 + i, 80, PROTO_TCP))
                .is_some()
        })
        .count()
}

#[test]
fn a_random_source_syn_flood_does_not_evict_established_flows() {
    // With the flood mode at 100 new flows/s per CPU (about 14 inserts per window), 20,000
    // SYNs within a few windows insert a few dozen entries, which find free slots (200 flows
    // in 256 sets of 8).
    assert_eq!(survivors(Some(100), 200, 20_000), 200);
    // Without it, the same flood evicts them (the test would catch a flood mode that does
    // nothing).
    let left = survivors(None, 200, 20_000);
    assert!(
        left < 20,
        "{left} of 200 survived a flood without the flood mode"
    );
}

#[test]
fn per_source_rate_limit_drops_above_the_rate_and_counts_per_vip() {
    let mut lab = lab();
    let vi = vip80(&lab);
    let id = id80();
    lab.bal
        .set_vip_source_limit(
            &id,
            Some(RateLimit {
                new_flows_per_s: 1,
                burst: 3,
            }),
        )
        .unwrap();
    let actions: Vec<u32> = (0..10)
        .map(|i| lab.run(&tcp_frame(CLIENT, VIP, 35000 + i, 80, SYN)).0)
        .collect();
    assert_eq!(
        actions,
        [TX, TX, TX, DROP, DROP, DROP, DROP, DROP, DROP, DROP]
    );
    // Established flows of that source are not limited; another source is not either.
    assert_eq!(lab.run(&tcp_frame(CLIENT, VIP, 35000, 80, ACK)).0, TX);
    let other = Ipv4Addr::new(192, 0, 2, 99);
    assert_eq!(lab.run(&tcp_frame(other, VIP, 35000, 80, SYN)).0, TX);
    // Counted per VIP and reason, and in the global view.
    let len = tcp_packet(CLIENT, VIP, 1, 80, SYN).len() as u64;
    let c = lab.bal.vip_drop(vi, vip_stat::SRC_RATE);
    assert_eq!((c.packets, c.bytes), (7, 7 * len));
    assert_eq!(lab.bal.global_stat(stat::DROP_SRC_RATE).packets, 7);
    assert!(lab.bal.vip_drops(vi).contains(&(
        "drop_src_rate",
        lb_common::Counter {
            packets: 7,
            bytes: 7 * len
        }
    )));
    // The rate refills: one flow per second.
    std::thread::sleep(Duration::from_millis(1100));
    assert_eq!(lab.run(&tcp_frame(CLIENT, VIP, 35100, 80, SYN)).0, TX);
    assert_eq!(lab.run(&tcp_frame(CLIENT, VIP, 35101, 80, SYN)).0, DROP);
    // Removed: no limit.
    lab.bal.set_vip_source_limit(&id, None).unwrap();
    assert_eq!(lab.run(&tcp_frame(CLIENT, VIP, 35102, 80, SYN)).0, TX);
}

#[test]
fn a_random_source_flood_makes_no_source_buckets() {
    let mut lab = lab();
    let limit = RateLimit {
        new_flows_per_s: 10,
        burst: 2,
    };
    lab.bal.set_vip_source_limit(&id80(), Some(limit)).unwrap();
    // 2000 sources, one SYN each (a spoofed flood's): all admitted, and no bucket made (an
    // LRU insert each would cost as much as a connection-table insert).
    for i in 0..2000u32 {
        let src = Ipv4Addr::from(0x6440_0000 + i);
        assert_eq!(lab.run(&tcp_frame(src, VIP, 40000, 80, SYN)).0, TX);
    }
    assert_eq!(lab.bal.source_buckets(), 0);
    // A source that comes back within the interval (100 ms) gets its bucket at its second
    // flow, judged from its first: the burst of 2, then drops.
    let actions: Vec<u32> = (0..4)
        .map(|i| lab.run(&tcp_frame(CLIENT, VIP, 41000 + i, 80, SYN)).0)
        .collect();
    assert_eq!(actions, [TX, TX, DROP, DROP]);
    assert_eq!(lab.bal.source_buckets(), 1);
    // Once the interval has passed, the bucket has refilled by one flow.
    std::thread::sleep(Duration::from_millis(150));
    assert_eq!(lab.run(&tcp_frame(CLIENT, VIP, 41010, 80, SYN)).0, TX);
    assert_eq!(lab.run(&tcp_frame(CLIENT, VIP, 41011, 80, SYN)).0, DROP);
}

#[test]
fn per_source_rate_limit_keys_ipv6_by_64() {
    let mut lab = lab();
    let id = vip(VIP6, 80, "tcp");
    let vi = lab.bal.vip_index(&id).unwrap();
    lab.bal
        .set_vip_source_limit(
            &id,
            Some(RateLimit {
                new_flows_per_s: 1,
                burst: 1,
            }),
        )
        .unwrap();
    let syn6 = |src: std::net::Ipv6Addr, sport: u16| {
        to_lb(
            &ipv6(src, VIP6, TCP, 0, 0, &tcp6(src, VIP6, sport, 80, SYN, &[])),
            ETH_IPV6,
        )
    };
    let a: std::net::Ipv6Addr = "2001:db8:0:1::10".parse().unwrap();
    let same64: std::net::Ipv6Addr = "2001:db8:0:1::99".parse().unwrap();
    let other64: std::net::Ipv6Addr = "2001:db8:0:2::10".parse().unwrap();
    assert_eq!(lab.run(&syn6(a, 1000)).0, TX);
    assert_eq!(
        lab.run(&syn6(same64, 1001)).0,
        DROP,
        "same /64, same bucket"
    );
    assert_eq!(lab.run(&syn6(other64, 1002)).0, TX, "another /64");
    assert_eq!(lab.bal.vip_drop(vi, vip_stat::SRC_RATE).packets, 1);
}

#[test]
fn per_vip_cap_on_new_flows() {
    pin_to_cpu(0).unwrap();
    let mut lab = lab();
    let vi = vip80(&lab);
    let id = id80();
    let cpus = aya::util::nr_cpus().unwrap() as u32;
    // Each CPU admits its share of the burst: 2 here.
    lab.bal
        .set_vip_new_flow_cap(
            &id,
            Some(RateLimit {
                new_flows_per_s: cpus,
                burst: 2 * cpus,
            }),
        )
        .unwrap();
    let actions: Vec<u32> = (0..6u8)
        .map(|i| {
            let src = Ipv4Addr::new(198, 51, 100, i + 1);
            lab.run(&tcp_frame(src, VIP, 36000, 80, SYN)).0
        })
        .collect();
    assert_eq!(actions, [TX, TX, DROP, DROP, DROP, DROP]);
    assert_eq!(lab.bal.vip_drop(vi, vip_stat::VIP_CAP).packets, 4);
    assert_eq!(lab.bal.global_stat(stat::DROP_VIP_CAP).packets, 4);
    // Other VIPs are not capped.
    assert_eq!(lab.run(&udp_frame(CLIENT, VIP, 36001, 53)).0, TX);
    lab.bal.set_vip_new_flow_cap(&id, None).unwrap();
    assert_eq!(lab.run(&tcp_frame(CLIENT, VIP, 36002, 80, SYN)).0, TX);
}

#[test]
fn allow_and_deny_source_prefixes() {
    let mut lab = lab();
    let vi = vip80(&lab);
    let id = id80();
    let p = |s: &str| -> Prefix { s.parse().unwrap() };
    let try_from = |lab: &mut Lab, src: [u8; 4], sport: u16| {
        let src = Ipv4Addr::from(src);
        lab.run(&tcp_frame(src, VIP, sport, 80, SYN)).0
    };
    // An allow list with a denied hole: the longest match decides.
    lab.bal
        .set_vip_prefixes(&id, &[p("10.1.0.0/16")], &[p("10.1.2.0/24")])
        .unwrap();
    assert_eq!(try_from(&mut lab, [10, 1, 1, 1], 1), TX);
    assert_eq!(try_from(&mut lab, [10, 1, 2, 1], 2), DROP);
    assert_eq!(try_from(&mut lab, [10, 2, 0, 1], 3), DROP);
    assert_eq!(lab.bal.vip_drop(vi, vip_stat::DENIED).packets, 1);
    assert_eq!(lab.bal.vip_drop(vi, vip_stat::NOT_ALLOWED).packets, 1);
    assert_eq!(lab.bal.global_stat(stat::DROP_DENIED).packets, 1);
    assert_eq!(lab.bal.global_stat(stat::DROP_NOT_ALLOWED).packets, 1);
    // Only for this VIP: the UDP VIP on the same address takes anyone.
    assert_eq!(
        lab.run(&udp_frame(Ipv4Addr::new(10, 2, 0, 1), VIP, 4, 53))
            .0,
        TX
    );
    // A deny list alone; host bits of a prefix are ignored; a more specific allow reopens.
    lab.bal
        .set_vip_prefixes(&id, &[p("10.1.2.128/25")], &[p("10.1.2.77/24")])
        .unwrap();
    let flags = lab.bal.vip_policy(vi).unwrap().flags;
    assert_ne!(flags & lb_common::POLICY_F_ALLOW_ONLY, 0, "allow list");
    lab.bal
        .set_vip_prefixes(&id, &[], &[p("10.1.2.77/24")])
        .unwrap();
    assert_eq!(try_from(&mut lab, [10, 1, 2, 1], 5), DROP);
    assert_eq!(try_from(&mut lab, [10, 2, 0, 1], 6), TX, "no allow list");
    // Established flows are not cut by a later deny (they end, or idle out).
    lab.run(&tcp_frame(Ipv4Addr::new(10, 9, 0, 1), VIP, 7, 80, SYN));
    lab.bal
        .set_vip_prefixes(&id, &[], &[p("10.9.0.0/16")])
        .unwrap();
    assert_eq!(
        lab.run(&tcp_frame(Ipv4Addr::new(10, 9, 0, 1), VIP, 7, 80, ACK))
            .0,
        TX
    );
    assert_eq!(try_from(&mut lab, [10, 9, 0, 1], 8), DROP);
    // Cleared: everyone.
    lab.bal.clear_vip_policy(&id).unwrap();
    assert_eq!(try_from(&mut lab, [10, 9, 0, 1], 9), TX);
    assert_eq!(try_from(&mut lab, [10, 1, 2, 1], 10), TX);
}

#[test]
fn ipv6_source_prefixes() {
    let mut lab = lab();
    let id = vip(VIP6, 80, "tcp");
    let p = |s: &str| -> Prefix { s.parse().unwrap() };
    lab.bal
        .set_vip_prefixes(&id, &[p("2001:db8::/32")], &[p("2001:db8:bad::/48")])
        .unwrap();
    let syn6 = |src: &str| {
        let src: std::net::Ipv6Addr = src.parse().unwrap();
        to_lb(
            &ipv6(src, VIP6, TCP, 0, 0, &tcp6(src, VIP6, 1000, 80, SYN, &[])),
            ETH_IPV6,
        )
    };
    assert_eq!(lab.run(&syn6("2001:db8:1::1")).0, TX);
    assert_eq!(lab.run(&syn6("2001:db8:bad::1")).0, DROP);
    assert_eq!(lab.run(&syn6("2001:db9::1")).0, DROP);
}

#[test]
fn settings_are_checked() {
    let mut lab = lab();
    let bal = &mut lab.bal;
    assert!(matches!(
        bal.set_vip_source_limit(
            &id80(),
            Some(RateLimit {
                new_flows_per_s: 0,
                burst: 1
            })
        ),
        Err(BalancerError::BadSetting(_))
    ));
    assert!(bal.set_flood_threshold(Some(0)).is_err());
    assert!("10.0.0.0/33".parse::<Prefix>().is_err());
    assert!(matches!(
        Balancer::load_with(&LoadOptions {
            conntrack_entries: 10
        }),
        Err(BalancerError::BadConntrackEntries(10))
    ));
    // A fresh map gets the documented defaults.
    let s = bal.settings().unwrap();
    assert_eq!(s, lb_common::Settings::default());
    assert_eq!(s.udp_idle_ticks, lb_common::ms_to_ticks(30_000));
}

#[test]
fn conntrack_entries_sizes_the_table_and_a_pinned_table_of_another_size_is_replaced() {
    let bal = Balancer::load_with(&LoadOptions {
        conntrack_entries: 4096,
    })
    .unwrap();
    assert_eq!(bal.conntrack_entries(), 4096);
    assert!(bal.conntrack_memory().unwrap_or(0) >= 4096 * 64);
    drop(bal);

    /// Removes the pins when the test ends, passed or not.
    struct Pins(std::path::PathBuf);
    impl Drop for Pins {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let pins = Pins(format!("/sys/fs/bpf/maglb-test-ct-{}", std::process::id()).into());
    let dir = pins.0.clone();
    let _ = std::fs::remove_dir_all(&dir);
    let opts = |n| LoadOptions {
        conntrack_entries: n,
    };
    // The pinned table's identity: the inode of its pin.
    let id = |_: &Balancer| {
        let pin = dir.join(lb_userspace::datapath::LAYOUT).join("CONNTRACK");
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(pin).unwrap())
    };
    let first = Balancer::load_pinned_with(&dir, &opts(4096)).unwrap();
    let pinned = id(&first);
    drop(first);
    // The same size adopts the pinned table; another size gets a new one of its size (the old
    // one, attached to nothing, is moved aside and removed).
    let again = Balancer::load_pinned_with(&dir, &opts(4096)).unwrap();
    assert_eq!((again.conntrack_entries(), id(&again)), (4096, pinned));
    drop(again);
    let bigger = Balancer::load_pinned_with(&dir, &opts(8192)).unwrap();
    assert_eq!(bigger.conntrack_entries(), 8192);
    assert_ne!(
        id(&bigger),
        pinned,
        "a pinned 4096-entry table was reused for 8192"
    );
    drop(bigger);
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        [lb_userspace::datapath::LAYOUT],
        "old maps left pinned"
    );
}

#[test]
fn one_counter_per_packet_adds_up() {
    let mut lab = lab();
    let vi = vip80(&lab);
    let b1 = lab
        .bal
        .backend_index(&vip(VIP, 80, "tcp"), &B1.into())
        .unwrap();
    lab.run(&tcp_frame(CLIENT, VIP, 37000, 80, SYN));
    for _ in 0..4 {
        lab.run(&tcp_frame(CLIENT, VIP, 37000, 80, ACK));
    }
    let len = tcp_packet(CLIENT, VIP, 1, 80, SYN).len() as u64;
    let c = lab.bal.backend_counter(b1);
    assert_eq!((c.packets, c.bytes, c.new_flows), (5, 5 * len, 1));
    assert_eq!(lab.bal.vip_stats(vi).packets, 5);
    assert_eq!(lab.bal.vip_new_flows(vi), 1);
    assert_eq!(lab.bal.global_stat(stat::CT_HIT).packets, 4);
    assert_eq!(lab.bal.global_stat(stat::CT_MISS).packets, 1);
    let tx = lab.bal.global_stat(stat::TX_ENCAP);
    assert_eq!((tx.packets, tx.bytes), (5, 5 * (len + 20)));
    // A VIP without backends counts its drops under its own index.
    let none = lab.bal.vip_index(&vip(VIP, 443, "tcp")).unwrap();
    lab.run(&tcp_frame(CLIENT, VIP, 37001, 443, SYN));
    assert_eq!(lab.bal.vip_drop(none, vip_stat::NO_BACKEND).packets, 1);
    assert_eq!(lab.bal.global_stat(stat::DROP_NO_BACKEND).packets, 1);
}

#[test]
fn fixtures_use_a_small_table() {
    let lab = lab();
    assert_eq!(lab.bal.conntrack_entries(), fixture::LAB_CONNTRACK);
}

#[test]
fn a_reused_vip_index_starts_from_zero() {
    let mut lab = lab();
    let vi = vip80(&lab);
    let id = id80();
    lab.bal
        .set_vip_source_limit(
            &id,
            Some(RateLimit {
                new_flows_per_s: 1,
                burst: 1,
            }),
        )
        .unwrap();
    lab.run(&tcp_frame(CLIENT, VIP, 38000, 80, SYN));
    lab.run(&tcp_frame(CLIENT, VIP, 38001, 80, SYN));
    assert_eq!(lab.bal.vip_stats(vi).packets, 1);
    assert_eq!(lab.bal.vip_drop(vi, vip_stat::SRC_RATE).packets, 1);
    // The VIP goes; indexes are handed out again oldest-freed first, so VIPs come and go
    // until one gets its index: its counters and policy start from zero.
    lab.bal.del_vip(&id).unwrap();
    let reused = (1000..1000 + lb_common::MAX_VIPS as u16).find(|port| {
        let other = vip(VIP, *port, "tcp");
        let mut spec = VipSpec::new(other);
        spec.ring_size = 251;
        spec.backends = vec![BackendSpec::new(B1.into(), 1)];
        lab.bal.set_vip(spec).unwrap();
        let index = lab.bal.vip_index(&other);
        if index != Some(vi) {
            lab.bal.del_vip(&other).unwrap();
        }
        index == Some(vi)
    });
    assert!(reused.is_some(), "index {vi} never handed out again");
    assert_eq!(lab.bal.vip_stats(vi).packets, 0);
    assert_eq!(lab.bal.vip_drop(vi, vip_stat::SRC_RATE).packets, 0);
    assert_eq!(
        lab.bal.vip_policy(vi).unwrap(),
        lb_common::VipPolicy::default()
    );
}
