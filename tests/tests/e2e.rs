//! End to end, as root, in namespaces this test creates: real TCP connections and UDP
//! exchanges from a client through the router and the XDP balancer to three backends, whose
//! kernels answer the client directly. See `maglb_tests::topology` for the picture.

use std::{collections::BTreeMap, time::Duration};

use lb_common::stat;
use lb_userspace::state::{BackendSpec, VipSpec};
use maglb_tests::{
    fixture::vip,
    netns::require_root,
    topology::{
        self, Conns, LongConn, TCP_PORT, Topology, UDP_PORT, VIP, VIP6, backend_addr,
        backend_addr6, vip_addr, vip6_addr,
    },
};

const TIMEOUT: Duration = Duration::from_secs(3);

fn specs(weights: &[u32]) -> Vec<BackendSpec> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &w)| BackendSpec::new(backend_addr(i).into(), w))
        .collect()
}

/// Runs `total` requests from `threads` client threads; returns answers per backend and the
/// failures.
fn spread(
    t: &Topology,
    total: usize,
    threads: usize,
    request: fn() -> anyhow::Result<String>,
) -> (BTreeMap<String, usize>, Vec<String>) {
    let handles: Vec<_> = (0..threads)
        .map(|_| {
            t.client
                .spawn(move || {
                    let mut seen = BTreeMap::new();
                    let mut failed = Vec::new();
                    for _ in 0..total / threads {
                        match request() {
                            Ok(b) => *seen.entry(b).or_insert(0) += 1,
                            Err(e) => failed.push(format!("{e:#}")),
                        }
                    }
                    (seen, failed)
                })
                .unwrap()
        })
        .collect();
    let mut seen = BTreeMap::new();
    let mut failed = Vec::new();
    for h in handles {
        let (s, f) = h.join().unwrap();
        for (k, v) in s {
            *seen.entry(k).or_insert(0) += v;
        }
        failed.extend(f);
    }
    (seen, failed)
}

fn assert_shares(seen: &BTreeMap<String, usize>, weights: &[u32], what: &str) {
    let total: usize = seen.values().sum();
    let wsum: u32 = weights.iter().sum();
    for (i, &w) in weights.iter().enumerate() {
        let got = *seen.get(&format!("b{i}")).unwrap_or(&0) as f64 / total as f64;
        let want = w as f64 / wsum as f64;
        assert!(
            (got - want).abs() < 0.05,
            "{what}: b{i} got {:.1}% of {total}, weight share {:.1}% ({seen:?})",
            got * 100.0,
            want * 100.0
        );
    }
}

#[test]
fn real_tcp_and_udp_through_the_balancer() {
    require_root();
    let t = Topology::build("e2e", 3).expect("topology");
    let mut bal = t.attach_balancer().expect("attach balancer");
    let weights = [1, 2, 1];
    for (port, proto) in [(TCP_PORT, "tcp"), (UDP_PORT, "udp")] {
        let mut spec = VipSpec::new(vip(VIP, port, proto));
        spec.backends = specs(&weights);
        bal.set_vip(spec).expect("set VIP");
    }

    // Thousands of real TCP connections: all succeed, spread by weight.
    let (seen, failed) = spread(&t, 3000, 4, || {
        topology::tcp_request(vip_addr(TCP_PORT), TIMEOUT)
    });
    assert!(
        failed.is_empty(),
        "{} TCP requests failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    println!("TCP spread over backends (weights {weights:?}): {seen:?}");
    assert_shares(&seen, &weights, "TCP");

    // Thousands of UDP exchanges, each from a new source port.
    let (seen, failed) = spread(&t, 2000, 2, || {
        topology::udp_request(vip_addr(UDP_PORT), TIMEOUT)
    });
    assert!(
        failed.is_empty(),
        "{} UDP exchanges failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    println!("UDP spread over backends: {seen:?}");
    assert_shares(&seen, &weights, "UDP");

    // The datapath counted what it forwarded.
    let tx = bal.global_stat(stat::TX_ENCAP).packets;
    assert!(tx >= 3000 * 4 + 2000, "only {tx} packets encapsulated");
    let vi = bal.vip_index(&vip(VIP, TCP_PORT, "tcp")).unwrap();
    assert!(bal.vip_stats(vi).packets >= 3000 * 4);
}

#[test]
fn removing_a_backend_keeps_established_connections_to_the_others() {
    require_root();
    let t = Topology::build("e2r", 3).expect("topology");
    let mut bal = t.attach_balancer().expect("attach balancer");
    let id = vip(VIP, TCP_PORT, "tcp");
    let mut spec = VipSpec::new(id);
    spec.backends = specs(&[1, 1, 1]);
    bal.set_vip(spec).unwrap();

    // 60 long-lived connections, spread over all three backends.
    let conns = t
        .client
        .run(|| Conns::open(60, vip_addr(TCP_PORT), TIMEOUT))
        .unwrap()
        .expect("open connections");
    let on_b2 = conns.on("b2");
    assert!(
        on_b2 > 0 && on_b2 < 60,
        "connections not spread: {on_b2} on b2"
    );

    // Take b2 out of the table.
    bal.set_backends(&id, specs(&[1, 1])).unwrap();

    // New connections avoid it ...
    let (seen, failed) = spread(&t, 300, 2, || {
        topology::tcp_request(vip_addr(TCP_PORT), TIMEOUT)
    });
    assert!(failed.is_empty(), "{failed:?}");
    assert!(
        !seen.contains_key("b2"),
        "new connections still reach b2: {seen:?}"
    );

    // ... and every established connection to the other backends keeps its backend and
    // keeps working. (Those to b2 end: a backend that leaves its VIP has its flows moved;
    // draining is how to let them finish.)
    let broken = t
        .client
        .run(move || {
            let mut conns = conns;
            conns.0.retain(|(_, b)| b != "b2");
            (0..3).flat_map(|_| conns.broken()).collect::<Vec<_>>()
        })
        .unwrap();
    assert!(
        broken.is_empty(),
        "established connections broke: {broken:?}"
    );
}

#[test]
fn path_mtu_discovery_works_through_the_balancer() {
    require_root();
    let t = Topology::build("e2m", 1).expect("topology");
    let mut bal = t.attach_balancer().expect("attach balancer");
    let mut spec = VipSpec::new(vip(VIP, TCP_PORT, "tcp"));
    spec.backends = specs(&[1]);
    bal.set_vip(spec).unwrap();
    // Full-sized segments (1500 bytes) cannot be encapsulated within the 1500-byte MTU: the
    // balancer answers with fragmentation-needed (MTU 1480), the client's kernel lowers its
    // path MTU and resends, and the request gets through.
    let answers = t
        .client
        .run(|| -> anyhow::Result<Vec<String>> {
            let mut c = LongConn::open(vip_addr(TCP_PORT), TIMEOUT)?;
            (0..3).map(|_| c.ask_with(&[b'x'; 20_000])).collect()
        })
        .unwrap()
        .expect("large requests");
    assert_eq!(answers, ["b0", "b0", "b0"]);
    assert!(bal.global_stat(stat::ICMP_TOO_BIG_SENT).packets >= 1);
    let route = t.client.ip(&["route", "get", &VIP.to_string()]).unwrap();
    assert!(
        route.contains("mtu 1480"),
        "client did not learn the path MTU: {route}"
    );
}

#[test]
fn real_ipv6_tcp_and_udp_6in6() {
    require_root();
    let t = Topology::build("e26", 3).expect("topology");
    let mut bal = t.attach_balancer().expect("attach balancer");
    let weights = [2, 1, 1];
    for (port, proto) in [(TCP_PORT, "tcp"), (UDP_PORT, "udp")] {
        let mut spec = VipSpec::new(vip(VIP6, port, proto));
        spec.backends = weights
            .iter()
            .enumerate()
            .map(|(i, &w)| BackendSpec::new(backend_addr6(i).into(), w))
            .collect();
        bal.set_vip(spec).expect("set VIP");
    }
    let (seen, failed) = spread(&t, 1200, 2, || {
        topology::tcp_request(vip6_addr(TCP_PORT), TIMEOUT)
    });
    assert!(
        failed.is_empty(),
        "{} IPv6 TCP requests failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    println!("IPv6 TCP spread (weights {weights:?}): {seen:?}");
    assert_shares(&seen, &weights, "IPv6 TCP");
    let (seen, failed) = spread(&t, 800, 2, || {
        topology::udp_request(vip6_addr(UDP_PORT), TIMEOUT)
    });
    assert!(
        failed.is_empty(),
        "{} IPv6 UDP exchanges failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert_shares(&seen, &weights, "IPv6 UDP");
}

#[test]
fn gue_encapsulation_end_to_end() {
    use lb_userspace::balancer::Encap;
    require_root();
    let t = Topology::build("e2g", 3).expect("topology");
    let mut bal = t.attach_balancer().expect("attach balancer");
    let weights = [1, 1, 1];
    for (addr, port, proto) in [
        (std::net::IpAddr::from(VIP), TCP_PORT, "tcp"),
        (VIP.into(), UDP_PORT, "udp"),
        (VIP6.into(), TCP_PORT, "tcp"),
    ] {
        let mut spec = VipSpec::new(vip(addr, port, proto));
        spec.backends = if addr.is_ipv4() {
            specs(&weights)
        } else {
            (0..3)
                .map(|i| BackendSpec::new(backend_addr6(i).into(), 1))
                .collect()
        };
        bal.set_vip(spec).expect("set VIP");
    }
    // Connections opened over IP-in-IP keep working when the balancer switches to GUE: the
    // backends' decap program takes both.
    let mut before = t
        .client
        .run(|| Conns::open(30, vip_addr(TCP_PORT), TIMEOUT))
        .unwrap()
        .unwrap();
    bal.set_encap(Encap::Gue, lb_common::DEFAULT_GUE_PORT)
        .unwrap();
    let s = bal.settings().unwrap();
    assert_eq!(
        (s.encap, s.gue_port),
        (lb_common::ENCAP_GUE, lb_common::DEFAULT_GUE_PORT)
    );
    let broken = t.client.run(move || before.broken()).unwrap();
    assert!(
        broken.is_empty(),
        "connections broke on the switch: {broken:?}"
    );

    // New TCP connections, UDP exchanges and IPv6 connections, all through GUE.
    let (seen, failed) = spread(&t, 600, 3, || {
        topology::tcp_request(vip_addr(TCP_PORT), TIMEOUT)
    });
    assert!(
        failed.is_empty(),
        "TCP over GUE failed: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert_shares(&seen, &weights, "TCP over GUE");
    let (_, failed) = spread(&t, 300, 2, || {
        topology::udp_request(vip_addr(UDP_PORT), TIMEOUT)
    });
    assert!(
        failed.is_empty(),
        "UDP over GUE failed: {:?}",
        &failed[..failed.len().min(5)]
    );
    let (seen6, failed) = spread(&t, 200, 2, || {
        topology::tcp_request(vip6_addr(TCP_PORT), TIMEOUT)
    });
    assert!(
        failed.is_empty(),
        "IPv6 over GUE failed: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert_eq!(seen6.len(), 3, "IPv6 flows reach every backend: {seen6:?}");
    // All of it encapsulated by the balancer (no kernel tunnel exists on the backends).
    assert!(bal.global_stat(stat::TX_ENCAP).packets >= 600 * 4);
}
