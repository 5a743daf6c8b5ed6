//! Packet fixtures through BPF_PROG_TEST_RUN: input frame, expected action, exact output.
//! Needs root (loading BPF programs); no interface is touched.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use lb_common::{
    stat,
    vip_table::{VIP_WAYS, VipBucket, vip_bucket},
};
use lb_userspace::datapath::decap::{self, Decap};
use maglb_tests::{
    fixture::{self, *},
    packet::{self, *},
};

const ABORTED: u32 = 0;
const DROP: u32 = 1;
const PASS: u32 = 2;
const TX: u32 = 3;

fn lab() -> Lab {
    Lab::new().expect("load the balancer (root needed)")
}

/// A frame from the router to the balancer.
fn to_lb(l3: &[u8], ethertype: u16) -> Vec<u8> {
    eth(IF_MAC, CLIENT_MAC, ethertype, l3)
}

fn syn4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    ipv4(
        V4::new(src, dst, TCP),
        &[],
        &tcp4(src, dst, sport, dport, SYN, &[]),
    )
}

/// A UDP datagram from `src` to `dst`.
fn udp4_ip(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    ipv4(
        V4::new(src, dst, UDP),
        &[],
        &udp4(src, dst, sport, dport, payload),
    )
}

/// A TCP ACK: a packet of an established flow (a SYN would be chosen from the ring again).
fn ack4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    ipv4(
        V4::new(src, dst, TCP),
        &[],
        &tcp4(src, dst, sport, dport, ACK, &[]),
    )
}

fn raw_port(p: u16) -> u32 {
    u16::from_ne_bytes(p.to_be_bytes()) as u32
}

/// The IPv6 flow label the balancer derives from the inner flow (ECMP entropy).
fn label(src: IpAddr, sport: u16, dport: u16) -> u32 {
    let (w, _) = lb_userspace::addr::to_words(src);
    (w[3] ^ w[0] ^ raw_port(sport) << 4 ^ raw_port(dport)) & 0xf_ffff
}

/// What the balancer sends for `inner` (an IPv4 packet) toward IPv4 backend `b`.
fn expect_4in4(inner: &[u8], b: Ipv4Addr) -> Vec<u8> {
    let tos = inner[1];
    let df = u16::from_be_bytes([inner[6], inner[7]]) & DF;
    let outer = V4 {
        src: SRC_V4,
        dst: b,
        proto: IPIP,
        ttl: 64,
        tos,
        id: 0,
        frag: df,
    };
    eth(NH_MAC, IF_MAC, ETH_IP, &ipv4(outer, &[], inner))
}

fn expect_in6(inner: &[u8], nh: u8, b: Ipv6Addr, tc: u8, label: u32) -> Vec<u8> {
    eth(
        NH_MAC,
        IF_MAC,
        ETH_IPV6,
        &ipv6(SRC_V6, b, nh, tc, label, inner),
    )
}

fn assert_frame(got: &(u32, Vec<u8>), action: u32, frame: &[u8], what: &str) {
    assert_eq!(got.0, action, "{what}: action");
    assert_eq!(hex(&got.1), hex(frame), "{what}: output bytes");
}

fn hex(b: &[u8]) -> String {
    b.chunks(16)
        .map(|c| {
            c.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The backend set changes: B1 stays listed but takes no new flows (drained), B2 takes them.
fn drain_b1_add_b2() -> Vec<lb_userspace::state::BackendSpec> {
    use lb_userspace::state::BackendSpec;
    vec![
        BackendSpec::new(B1.into(), 0),
        BackendSpec::new(B2.into(), 1),
    ]
}

#[test]
fn tcp_syn_ipv4_is_encapsulated_4in4() {
    let mut lab = lab();
    let mut inner = syn4(CLIENT, VIP, 40000, 80);
    inner[1] = 0x28; // TOS is copied to the outer header
    let got = lab.run(&to_lb(&inner, ETH_IP));
    assert_frame(&got, TX, &expect_4in4(&inner, B1), "SYN to VIP:80");
    assert!(packet::ipv4_header_ok(&got.1[14..]));
}

#[test]
fn udp_ipv4_is_encapsulated_and_padding_trimmed() {
    let mut lab = lab();
    let inner = udp4_ip(CLIENT, VIP, 5353, 53, b"q");
    let mut frame = to_lb(&inner, ETH_IP);
    assert!(frame.len() < 60);
    frame.resize(60, 0); // Ethernet minimum frame: padding after the IP packet
    let got = lab.run(&frame);
    assert_frame(&got, TX, &expect_4in4(&inner, B2), "UDP to VIP:53");
}

#[test]
fn ipv4_options_are_carried_untouched() {
    let mut lab = lab();
    let h = V4::new(CLIENT, VIP, TCP);
    let inner = ipv4(h, &[1, 1, 1, 0], &tcp4(CLIENT, VIP, 40001, 80, SYN, &[]));
    assert_eq!(inner[0], 0x46);
    let got = lab.run(&to_lb(&inner, ETH_IP));
    assert_frame(&got, TX, &expect_4in4(&inner, B1), "IHL 6");
}

#[test]
fn vlan_tag_is_kept() {
    let mut lab = lab();
    let inner = syn4(CLIENT, VIP, 40002, 80);
    let frame = eth_vlan(IF_MAC, CLIENT_MAC, 100, ETH_IP, &inner);
    let outer = expect_4in4(&inner, B1);
    let expected = eth_vlan(NH_MAC, IF_MAC, 100, ETH_IP, &outer[14..]);
    assert_frame(&lab.run(&frame), TX, &expected, "802.1Q");
}

#[test]
fn ipv6_is_encapsulated_6in6() {
    let mut lab = lab();
    let inner = ipv6(
        CLIENT6,
        VIP6,
        TCP,
        0x10,
        0,
        &tcp6(CLIENT6, VIP6, 40000, 80, SYN, &[]),
    );
    let expected = expect_in6(&inner, IPV6, B6_1, 0x10, label(CLIENT6.into(), 40000, 80));
    assert_frame(
        &lab.run(&to_lb(&inner, ETH_IPV6)),
        TX,
        &expected,
        "IPv6 SYN",
    );
}

#[test]
fn port_wildcard_vip_takes_any_port_4in6() {
    let mut lab = lab();
    for port in [1, 22, 8080, 65535] {
        let inner = syn4(CLIENT, VIP_ANY, 40000, port);
        let expected = expect_in6(&inner, IPIP, B6_2, 0, label(CLIENT.into(), 40000, port));
        assert_frame(
            &lab.run(&to_lb(&inner, ETH_IP)),
            TX,
            &expected,
            "wildcard VIP",
        );
    }
}

#[test]
fn not_for_a_vip_passes_untouched() {
    let mut lab = lab();
    let other = Ipv4Addr::new(10, 0, 0, 7);
    let frames = [
        to_lb(&syn4(CLIENT, other, 40000, 80), ETH_IP),
        // A VIP address, but a port no VIP has.
        to_lb(&syn4(CLIENT, VIP, 40000, 81), ETH_IP),
        // A VIP port, but UDP.
        to_lb(&udp4_ip(CLIENT, VIP, 1, 80, b"x"), ETH_IP),
        to_lb(
            &ipv6(
                CLIENT6,
                SRC_V6,
                TCP,
                0,
                0,
                &tcp6(CLIENT6, SRC_V6, 1, 80, SYN, &[]),
            ),
            ETH_IPV6,
        ),
        eth(IF_MAC, CLIENT_MAC, ETH_ARP, &[0u8; 28]),
        // ICMP echo to an address that is no VIP.
        to_lb(
            &ipv4(
                V4::new(CLIENT, other, ICMP),
                &[],
                &icmp4(8, 0, [0, 1, 0, 1], b"ping"),
            ),
            ETH_IP,
        ),
        // Other protocols to a VIP address (GRE) go to the kernel.
        to_lb(&ipv4(V4::new(CLIENT, VIP, 47), &[], &[0u8; 8]), ETH_IP),
    ];
    for f in frames {
        assert_frame(&lab.run(&f), PASS, &f, "not for a VIP");
    }
    assert!(lab.bal.global_stat(stat::PASS_NOT_VIP).packets >= 6);
    assert_eq!(lab.bal.global_stat(stat::PASS_VIP_OTHER).packets, 1);
}

#[test]
fn icmp_echo_to_vip_is_answered() {
    let mut lab = lab();
    let mut h = V4::new(CLIENT, VIP, ICMP);
    h.ttl = 61;
    let req = ipv4(h, &[], &icmp4(8, 0, [0x12, 0x34, 0, 7], b"abcdefgh"));
    let mut r = V4::new(VIP, CLIENT, ICMP);
    r.ttl = 64;
    let reply = ipv4(r, &[], &icmp4(0, 0, [0x12, 0x34, 0, 7], b"abcdefgh"));
    let expected = eth(CLIENT_MAC, IF_MAC, ETH_IP, &reply);
    assert_frame(&lab.run(&to_lb(&req, ETH_IP)), TX, &expected, "echo");

    let req6 = ipv6(
        CLIENT6,
        VIP6,
        ICMPV6,
        0,
        0,
        &icmp6(CLIENT6, VIP6, 128, 0, [0, 9, 0, 1], b"ping6"),
    );
    let reply6 = ipv6(
        VIP6,
        CLIENT6,
        ICMPV6,
        0,
        0,
        &icmp6(VIP6, CLIENT6, 129, 0, [0, 9, 0, 1], b"ping6"),
    );
    let expected6 = eth(CLIENT_MAC, IF_MAC, ETH_IPV6, &reply6);
    assert_frame(&lab.run(&to_lb(&req6, ETH_IPV6)), TX, &expected6, "echo6");
    assert_eq!(lab.bal.global_stat(stat::ICMP_ECHO_REPLY).packets, 2);
}

#[test]
fn icmp_errors_about_a_vip_flow_go_to_its_backend() {
    let mut lab = lab();
    let router = Ipv4Addr::new(192, 0, 2, 1);
    // The backend's reply VIP:80 -> client:40000 hit a link with MTU 1400 on the way.
    let reply = ipv4(
        V4::new(VIP, CLIENT, TCP),
        &[],
        &tcp4(VIP, CLIENT, 80, 40000, ACK, &[0; 32]),
    );
    let err = ipv4(
        V4::new(router, VIP, ICMP),
        &[],
        &icmp4(3, 4, [0, 0, 0x05, 0x78], &reply[..28]),
    );
    assert_frame(
        &lab.run(&to_lb(&err, ETH_IP)),
        TX,
        &expect_4in4(&err, B1),
        "frag needed",
    );

    // Same for IPv6 packet-too-big.
    let r6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    let reply6 = ipv6(
        VIP6,
        CLIENT6,
        TCP,
        0,
        0,
        &tcp6(VIP6, CLIENT6, 80, 40000, ACK, &[0; 32]),
    );
    let ptb = ipv6(
        r6,
        VIP6,
        ICMPV6,
        0,
        0,
        &icmp6(r6, VIP6, 2, 0, 1400u32.to_be_bytes(), &reply6[..48]),
    );
    let expected = expect_in6(&ptb, IPV6, B6_1, 0, label(r6.into(), 0, 0));
    assert_frame(
        &lab.run(&to_lb(&ptb, ETH_IPV6)),
        TX,
        &expected,
        "packet too big",
    );
    assert_eq!(lab.bal.global_stat(stat::ICMP_ERROR_FWD).packets, 2);

    // An error quoting a flow of no VIP is the kernel's.
    let other = ipv4(
        V4::new(VIP, CLIENT, TCP),
        &[],
        &tcp4(VIP, CLIENT, 9999, 40000, ACK, &[]),
    );
    let err = ipv4(
        V4::new(router, VIP, ICMP),
        &[],
        &icmp4(3, 3, [0; 4], &other[..28]),
    );
    let f = to_lb(&err, ETH_IP);
    assert_frame(&lab.run(&f), PASS, &f, "error about no VIP flow");
}

#[test]
fn icmp_error_to_its_flows_backend_even_after_the_table_changed() {
    let mut lab = lab();
    let router = Ipv4Addr::new(192, 0, 2, 1);
    // The flow starts on the only backend, B1 ...
    let syn = syn4(CLIENT, VIP, 40100, 80);
    assert_eq!(lab.run(&to_lb(&syn, ETH_IP)).0, TX);
    // ... then B1 is drained and B2 added: the error about the established flow still goes
    // to B1.
    let id = vip(VIP, 80, "tcp");
    lab.bal.set_backends(&id, drain_b1_add_b2()).unwrap();
    let reply = ipv4(
        V4::new(VIP, CLIENT, TCP),
        &[],
        &tcp4(VIP, CLIENT, 80, 40100, ACK, &[]),
    );
    let err = ipv4(
        V4::new(router, VIP, ICMP),
        &[],
        &icmp4(3, 4, [0, 0, 5, 0x78], &reply[..28]),
    );
    assert_frame(
        &lab.run(&to_lb(&err, ETH_IP)),
        TX,
        &expect_4in4(&err, B1),
        "owner",
    );
}

#[test]
fn too_big_answers_with_frag_needed_and_packet_too_big() {
    let mut lab = lab();
    // 1481 bytes + 20 outer = 1501 > MTU 1500.
    let payload = vec![0xab; 1481 - 40];
    let inner = ipv4(
        V4::new(CLIENT, VIP, TCP),
        &[],
        &tcp4(CLIENT, VIP, 40000, 80, ACK, &payload),
    );
    assert_eq!(inner.len(), 1481);
    let mut r = V4::new(VIP, CLIENT, ICMP);
    r.id = 0;
    r.frag = 0;
    let msg = icmp4(
        3,
        4,
        [0, 0, (1480u16 >> 8) as u8, 1480u16 as u8],
        &inner[..68],
    );
    let expected = eth(CLIENT_MAC, IF_MAC, ETH_IP, &ipv4(r, &[], &msg));
    assert_frame(
        &lab.run(&to_lb(&inner, ETH_IP)),
        TX,
        &expected,
        "frag needed",
    );

    // Exactly at the limit still goes through.
    let fits = ipv4(
        V4::new(CLIENT, VIP, TCP),
        &[],
        &tcp4(CLIENT, VIP, 40000, 80, ACK, &payload[1..]),
    );
    assert_frame(
        &lab.run(&to_lb(&fits, ETH_IP)),
        TX,
        &expect_4in4(&fits, B1),
        "1480 fits",
    );

    // Without DF the sender cannot learn; the packet is dropped and counted.
    let mut h = V4::new(CLIENT, VIP, TCP);
    h.frag = 0;
    let no_df = ipv4(h, &[], &tcp4(CLIENT, VIP, 40000, 80, ACK, &payload));
    assert_eq!(lab.run(&to_lb(&no_df, ETH_IP)).0, DROP);
    assert_eq!(lab.bal.global_stat(stat::DROP_TOO_BIG).packets, 1);

    // IPv6: 1461 + 40 > 1500 -> packet too big advertising 1460, quoting 128 bytes.
    let p6 = vec![0xcd; 1461 - 60];
    let inner6 = ipv6(
        CLIENT6,
        VIP6,
        TCP,
        0,
        0,
        &tcp6(CLIENT6, VIP6, 40000, 80, ACK, &p6),
    );
    let msg6 = icmp6(VIP6, CLIENT6, 2, 0, 1460u32.to_be_bytes(), &inner6[..128]);
    let expected6 = eth(
        CLIENT_MAC,
        IF_MAC,
        ETH_IPV6,
        &ipv6(VIP6, CLIENT6, ICMPV6, 0, 0, &msg6),
    );
    assert_frame(
        &lab.run(&to_lb(&inner6, ETH_IPV6)),
        TX,
        &expected6,
        "packet too big",
    );
    assert_eq!(lab.bal.global_stat(stat::ICMP_TOO_BIG_SENT).packets, 2);
}

#[test]
fn fragments_of_a_datagram_reach_one_backend() {
    let mut lab = lab();
    let mut outers = Vec::new();
    for client in 1..=20u8 {
        let src = Ipv4Addr::new(192, 0, 2, client);
        let udp = udp4(src, VIP_UDP3, 7000, 5000, &[7u8; 1600]);
        let mut first = V4::new(src, VIP_UDP3, UDP);
        first.frag = MF;
        let f1 = ipv4(first, &[], &udp[..1000]);
        let mut later = V4::new(src, VIP_UDP3, UDP);
        later.frag = 1000 / 8;
        let f2 = ipv4(later, &[], &udp[1000..]);
        let (a1, o1) = lab.run(&to_lb(&f1, ETH_IP));
        let (a2, o2) = lab.run(&to_lb(&f2, ETH_IP));
        assert_eq!((a1, a2), (TX, TX));
        assert_eq!(&o1[14 + 20..], &f1[..], "inner first fragment untouched");
        assert_eq!(&o2[14 + 20..], &f2[..], "inner later fragment untouched");
        assert_eq!(
            o1[30..34],
            o2[30..34],
            "client {client}: fragments split over backends"
        );
        outers.push(o1[30..34].to_vec());
    }
    outers.sort();
    outers.dedup();
    assert!(
        outers.len() > 1,
        "fragments of 20 clients all went to one backend"
    );
}

#[test]
fn source_ip_affinity_keeps_a_client_on_one_backend() {
    let mut lab = lab();
    let mut per_client = Vec::new();
    for client in 1..=30u8 {
        let src = Ipv4Addr::new(198, 51, 100, client);
        let mut seen = Vec::new();
        for port in 0..10 {
            let (a, out) = lab.run(&to_lb(&syn4(src, VIP_AFF, 30000 + port, 80), ETH_IP));
            assert_eq!(a, TX);
            seen.push(out[30..34].to_vec());
        }
        seen.dedup();
        assert_eq!(seen.len(), 1, "client {client} spread over backends");
        per_client.push(seen[0].clone());
    }
    per_client.sort();
    per_client.dedup();
    assert_eq!(
        per_client.len(),
        3,
        "30 clients should reach all three backends"
    );
}

#[test]
fn established_flows_keep_their_backend_until_reset() {
    let mut lab = lab();
    let id = vip(VIP, 80, "tcp");
    let syn = to_lb(&syn4(CLIENT, VIP, 41000, 80), ETH_IP);
    assert_eq!(lab.run(&syn).1[30..34], B1.octets());
    let old = to_lb(&ack4(CLIENT, VIP, 41000, 80), ETH_IP);
    lab.bal.set_backends(&id, drain_b1_add_b2()).unwrap();
    assert_eq!(
        lab.run(&old).1[30..34],
        B1.octets(),
        "established flow moved"
    );
    let new = to_lb(&syn4(CLIENT, VIP, 41001, 80), ETH_IP);
    assert_eq!(
        lab.run(&new).1[30..34],
        B2.octets(),
        "new flow not on the new table"
    );
    lab.bal.reset_flows(&id, B1.into()).unwrap();
    assert_eq!(
        lab.run(&old).1[30..34],
        B2.octets(),
        "reset flow kept its dead backend"
    );
    let hits = lab.bal.global_stat(stat::CT_HIT).packets;
    let misses = lab.bal.global_stat(stat::CT_MISS).packets;
    assert_eq!((hits, misses), (1, 3));
}

/// An IPv4 TCP segment with `flags`, no payload.
fn seg4(src: Ipv4Addr, sport: u16, flags: u8) -> Vec<u8> {
    ipv4(
        V4::new(src, VIP, TCP),
        &[],
        &tcp4(src, VIP, sport, 80, flags, &[]),
    )
}

fn in_table(lab: &Lab, src: Ipv4Addr, sport: u16) -> bool {
    let flow = flow4(src, VIP, sport, 80, lb_common::PROTO_TCP);
    lab.bal.conntrack(&flow).is_some()
}

#[test]
fn a_syn_is_chosen_from_the_ring_without_a_lookup_exact_bytes() {
    let mut lab = lab();
    let syn = seg4(CLIENT, 42000, SYN);
    assert_frame(
        &lab.run(&to_lb(&syn, ETH_IP)),
        TX,
        &expect_4in4(&syn, B1),
        "SYN",
    );
    lab.bal
        .set_backends(&vip(VIP, 80, "tcp"), drain_b1_add_b2())
        .unwrap();
    // The flow's entry still names B1 (an ACK goes there), but a SYN of the same 5-tuple
    // never looks: the ring sends it to B2.
    let ack = seg4(CLIENT, 42000, ACK);
    assert_frame(
        &lab.run(&to_lb(&ack, ETH_IP)),
        TX,
        &expect_4in4(&ack, B1),
        "ACK",
    );
    assert_frame(
        &lab.run(&to_lb(&syn, ETH_IP)),
        TX,
        &expect_4in4(&syn, B2),
        "SYN again",
    );
}

#[test]
fn a_rst_is_forwarded_exactly_and_not_inserted() {
    const RST: u8 = 0x04;
    let mut lab = lab();
    let rst = seg4(CLIENT, 42100, RST | ACK);
    assert_frame(
        &lab.run(&to_lb(&rst, ETH_IP)),
        TX,
        &expect_4in4(&rst, B1),
        "RST",
    );
    assert!(!in_table(&lab, CLIENT, 42100), "a RST made an entry");
}

#[test]
fn under_flood_a_new_flow_is_forwarded_exactly_and_not_inserted() {
    pin_to_cpu(0).unwrap();
    let mut lab = lab();
    // One new flow per second per CPU: the first insert of a window reaches the threshold.
    lab.bal.set_flood_threshold(Some(1)).unwrap();
    let mut inserted = 0;
    let t = std::time::Instant::now();
    for sport in 42200..42206 {
        let syn = seg4(CLIENT, sport, SYN);
        let got = lab.run(&to_lb(&syn, ETH_IP));
        assert_frame(&got, TX, &expect_4in4(&syn, B1), "SYN under flood");
        inserted += in_table(&lab, CLIENT, sport) as u64;
    }
    // One insert per flood window: six test runs take microseconds, so one window, or two
    // if one ended in between; more only if this thread was held up for a window or more.
    let windows = 2 + (t.elapsed().as_nanos() >> lb_common::FLOOD_WINDOW_SHIFT) as u64;
    assert!(
        inserted <= windows,
        "{inserted} of 6 inserted in {windows} windows at most"
    );
    assert_eq!(lab.bal.flood_stats().not_inserted, 6 - inserted);
}

/// Runs `frame`, which the VIP's policy refuses: dropped untouched, counted under `reason`.
fn assert_refused(lab: &mut Lab, l3: &[u8], reason: u32) {
    let frame = to_lb(l3, ETH_IP);
    assert_frame(&lab.run(&frame), DROP, &frame, "refused SYN");
    let vi = lab.bal.vip_index(&vip(VIP, 80, "tcp")).unwrap();
    let c = lab.bal.vip_drop(vi, reason);
    assert_eq!((c.packets, c.bytes), (1, l3.len() as u64));
}

#[test]
fn a_rate_limited_syn_is_dropped_untouched() {
    use lb_userspace::balancer::RateLimit;
    let mut lab = lab();
    let limit = RateLimit {
        new_flows_per_s: 1,
        burst: 1,
    };
    lab.bal
        .set_vip_source_limit(&vip(VIP, 80, "tcp"), Some(limit))
        .unwrap();
    let first = seg4(CLIENT, 42300, SYN);
    assert_frame(
        &lab.run(&to_lb(&first, ETH_IP)),
        TX,
        &expect_4in4(&first, B1),
        "first",
    );
    let second = seg4(CLIENT, 42301, SYN);
    assert_refused(&mut lab, &second, lb_common::vip_stat::SRC_RATE);
    assert!(!in_table(&lab, CLIENT, 42301));
}

#[test]
fn a_denied_source_is_dropped_untouched() {
    let mut lab = lab();
    let deny: lb_userspace::balancer::Prefix = "192.0.2.0/24".parse().unwrap();
    lab.bal
        .set_vip_prefixes(&vip(VIP, 80, "tcp"), &[], &[deny])
        .unwrap();
    assert_refused(
        &mut lab,
        &seg4(CLIENT, 42400, SYN),
        lb_common::vip_stat::DENIED,
    );
    // Another source still gets through, exactly.
    let other = seg4(Ipv4Addr::new(198, 51, 100, 7), 42401, SYN);
    let got = lab.run(&to_lb(&other, ETH_IP));
    assert_frame(&got, TX, &expect_4in4(&other, B1), "another source");
}

#[test]
fn vip_without_backends_drops_and_counts() {
    let mut lab = lab();
    let f = to_lb(&syn4(CLIENT, VIP, 40000, 443), ETH_IP);
    assert_eq!(lab.run(&f).0, DROP);
    assert_eq!(lab.bal.global_stat(stat::DROP_NO_BACKEND).packets, 1);
}

#[test]
fn counters_per_vip_and_backend() {
    let mut lab = lab();
    let inner = syn4(CLIENT, VIP, 40000, 80);
    for _ in 0..5 {
        assert_eq!(lab.run(&to_lb(&inner, ETH_IP)).0, TX);
    }
    let vi = lab.bal.vip_index(&vip(VIP, 80, "tcp")).unwrap();
    let bi = lab
        .bal
        .backend_index(&vip(VIP, 80, "tcp"), &B1.into())
        .unwrap();
    let v = lab.bal.vip_stats(vi);
    let b = lab.bal.backend_stats(bi);
    assert_eq!((v.packets, v.bytes), (5, 5 * inner.len() as u64));
    assert_eq!((b.packets, b.bytes), (5, 5 * inner.len() as u64));
    assert_eq!(lab.bal.global_stat(stat::TX_ENCAP).packets, 5);
}

#[test]
fn malformed_headers_never_forward() {
    let mut lab = lab();
    let good = syn4(CLIENT, VIP, 40000, 80);
    // Bad IHL (4) to a VIP: dropped.
    let mut bad_ihl = good.clone();
    bad_ihl[0] = 0x44;
    assert_eq!(lab.run(&to_lb(&bad_ihl, ETH_IP)).0, DROP);
    // Total length beyond the frame: dropped.
    let mut long = good.clone();
    long[2..4].copy_from_slice(&2000u16.to_be_bytes());
    assert_eq!(lab.run(&to_lb(&long, ETH_IP)).0, DROP);
    // TCP header cut short (the IP length says so too): dropped.
    let short = ipv4(
        V4::new(CLIENT, VIP, TCP),
        &[],
        &tcp4(CLIENT, VIP, 1, 80, SYN, &[])[..10],
    );
    assert_eq!(lab.run(&to_lb(&short, ETH_IP)).0, DROP);
    // Wrong IP version in an IPv4 frame: dropped.
    let mut v5 = good.clone();
    v5[0] = 0x55;
    assert_eq!(lab.run(&to_lb(&v5, ETH_IP)).0, DROP);
    // IPv6 payload length beyond the frame: dropped.
    let mut six = ipv6(
        CLIENT6,
        VIP6,
        TCP,
        0,
        0,
        &tcp6(CLIENT6, VIP6, 1, 80, SYN, &[]),
    );
    six[4..6].copy_from_slice(&500u16.to_be_bytes());
    assert_eq!(lab.run(&to_lb(&six, ETH_IPV6)).0, DROP);
    assert_eq!(lab.bal.global_stat(stat::DROP_MALFORMED).packets, 5);
    // Broken headers not for a VIP are the kernel's to judge: passed untouched.
    let mut other = syn4(CLIENT, Ipv4Addr::new(10, 0, 0, 7), 1, 80);
    other[0] = 0x44;
    let f = to_lb(&other, ETH_IP);
    assert_frame(&lab.run(&f), PASS, &f, "bad IHL, not a VIP");
}

#[test]
fn every_truncation_of_a_vip_frame_is_passed_or_dropped() {
    let mut lab = lab();
    let frames = [
        to_lb(&syn4(CLIENT, VIP, 40000, 80), ETH_IP),
        to_lb(
            &ipv6(
                CLIENT6,
                VIP6,
                TCP,
                0,
                0,
                &tcp6(CLIENT6, VIP6, 1, 80, SYN, &[]),
            ),
            ETH_IPV6,
        ),
        eth_vlan(IF_MAC, CLIENT_MAC, 7, ETH_IP, &syn4(CLIENT, VIP, 40000, 80)),
        to_lb(
            &ipv4(V4::new(CLIENT, VIP, ICMP), &[], &icmp4(8, 0, [0; 4], b"x")),
            ETH_IP,
        ),
    ];
    // BPF_PROG_TEST_RUN refuses XDP input shorter than an Ethernet header (no NIC delivers
    // such frames either), so truncations start there.
    for f in &frames {
        for len in 14..f.len() {
            let (a, _) = lab.run(&f[..len]);
            assert!(
                a == PASS || a == DROP,
                "{len} of {} bytes: action {a}",
                f.len()
            );
        }
    }
}

#[test]
fn random_frames_never_abort() {
    let mut lab = lab();
    // A fixed xorshift stream: reproducible, no dependency.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for i in 0..3000 {
        let len = 14 + (next() % 200) as usize;
        let mut f: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if len >= 34 && i % 2 == 0 {
            // Half of them look like IPv4 to a VIP, so the deeper parsers see garbage too.
            f[12..14].copy_from_slice(&ETH_IP.to_be_bytes());
            f[14] = 0x40 | (f[14] & 0x0f);
            f[30..34].copy_from_slice(&VIP.octets());
        }
        let (a, _) = lab.run(&f);
        assert_ne!(a, ABORTED, "frame {i} ({len} bytes) aborted");
    }
}

#[test]
fn config_not_written_yet_passes_everything() {
    let mut bal = lb_userspace::balancer::Balancer::load().unwrap();
    let f = to_lb(&syn4(CLIENT, VIP, 40000, 80), ETH_IP);
    let got = fixture::run(bal.program(), &f);
    assert_frame(&got, PASS, &f, "not ready");
    // With a VIP but no config yet: its packets pass as not ready, while untagged IPv4 to
    // other addresses is judged by the VIP bitmap first and passes as not for a VIP.
    bal.set_vip(lb_userspace::state::VipSpec::new(vip(VIP, 80, "tcp")))
        .unwrap();
    let other = to_lb(&syn4(CLIENT, Ipv4Addr::new(10, 0, 0, 7), 40000, 80), ETH_IP);
    let not_vip = bal.global_stat(stat::PASS_NOT_VIP).packets;
    assert_frame(&fixture::run(bal.program(), &f), PASS, &f, "VIP, not ready");
    assert_frame(&fixture::run(bal.program(), &other), PASS, &other, "no VIP");
    assert_eq!(bal.global_stat(stat::PASS_NOT_READY).packets, 1);
    assert_eq!(bal.global_stat(stat::PASS_NOT_VIP).packets, not_vip + 1);
}

fn decap_lab() -> Decap {
    let mut d = Decap::load().expect("load decap (root needed)");
    d.add_addr(B1.into()).unwrap();
    d.add_addr(B6_1.into()).unwrap();
    d
}

#[test]
fn decap_strips_outer_headers_addressed_to_us() {
    let mut d = decap_lab();
    let prog = d.program(decap::PROGRAM).unwrap();
    let inner4 = syn4(CLIENT, VIP, 40000, 80);
    let inner6 = ipv6(
        CLIENT6,
        VIP6,
        TCP,
        0,
        0,
        &tcp6(CLIENT6, VIP6, 1, 80, SYN, &[]),
    );
    let mac_a = [2, 0, 0, 0, 0, 0xaa];
    let mac_b = [2, 0, 0, 0, 0, 0xbb];
    let o4 = |dst, inner: &[u8]| ipv4(V4::new(SRC_V4, dst, IPIP), &[], inner);
    let cases: Vec<(&str, Vec<u8>, Vec<u8>)> = vec![
        (
            "4in4",
            eth(mac_a, mac_b, ETH_IP, &o4(B1, &inner4)),
            eth(mac_a, mac_b, ETH_IP, &inner4),
        ),
        (
            "6in6",
            eth(
                mac_a,
                mac_b,
                ETH_IPV6,
                &ipv6(SRC_V6, B6_1, IPV6, 0, 0, &inner6),
            ),
            eth(mac_a, mac_b, ETH_IPV6, &inner6),
        ),
        (
            "4in6",
            eth(
                mac_a,
                mac_b,
                ETH_IPV6,
                &ipv6(SRC_V6, B6_1, IPIP, 0, 0, &inner4),
            ),
            eth(mac_a, mac_b, ETH_IP, &inner4),
        ),
        (
            "4in4 with VLAN",
            eth_vlan(mac_a, mac_b, 9, ETH_IP, &o4(B1, &inner4)),
            eth_vlan(mac_a, mac_b, 9, ETH_IP, &inner4),
        ),
    ];
    for (what, input, expected) in cases {
        assert_frame(&fixture::run(prog, &input), PASS, &expected, what);
    }
    // Not ours, not encapsulated, or too short: untouched.
    let untouched = [
        eth(mac_a, mac_b, ETH_IP, &o4(B2, &inner4)),
        eth(mac_a, mac_b, ETH_IP, &inner4),
        eth(mac_a, mac_b, ETH_IP, &o4(B1, &inner4)[..30]),
        eth(mac_a, mac_b, ETH_ARP, &[0; 28]),
    ];
    for f in untouched {
        assert_frame(&fixture::run(prog, &f), PASS, &f, "untouched");
    }
    assert_eq!(d.decapsulated().packets, 4);
}

#[test]
fn balancer_output_decapsulates_to_the_original_packet() {
    let mut lab = lab();
    let mut d = decap_lab();
    for (inner, ethertype) in [
        (syn4(CLIENT, VIP, 40000, 80), ETH_IP),
        (
            ipv6(
                CLIENT6,
                VIP6,
                TCP,
                0,
                0,
                &tcp6(CLIENT6, VIP6, 1, 80, SYN, &[]),
            ),
            ETH_IPV6,
        ),
    ] {
        let (a, out) = lab.run(&to_lb(&inner, ethertype));
        assert_eq!(a, TX);
        let (a, back) = fixture::run(d.program(decap::PROGRAM).unwrap(), &out);
        assert_eq!(a, PASS);
        assert_eq!(back, eth(NH_MAC, IF_MAC, ethertype, &inner));
    }
}

#[test]
fn a_down_or_removed_backend_loses_its_flows() {
    use lb_userspace::state::BackendSpec;
    let mut lab = lab();
    let id = vip(VIP, 80, "tcp");
    let syn = to_lb(&syn4(CLIENT, VIP, 42000, 80), ETH_IP);
    assert_eq!(lab.run(&syn).1[30..34], B1.octets());
    let f = to_lb(&ack4(CLIENT, VIP, 42000, 80), ETH_IP);
    // B1 goes down (health): out of the ring, and its established flow moves to B2.
    let mut b1 = BackendSpec::new(B1.into(), 1);
    b1.live = false;
    let b2 = BackendSpec::new(B2.into(), 1);
    lab.bal.set_backends(&id, vec![b1, b2]).unwrap();
    assert_eq!(
        lab.run(&f).1[30..34],
        B2.octets(),
        "flow stayed on a down backend"
    );
    // B1 recovers: the moved flow stays where it is now.
    b1.live = true;
    lab.bal.set_backends(&id, vec![b1, b2]).unwrap();
    assert_eq!(lab.run(&f).1[30..34], B2.octets(), "flow moved back");
    // A flow on a backend that leaves the VIP moves too.
    let on = lab.run(&to_lb(&syn4(CLIENT, VIP, 42001, 80), ETH_IP)).1[30..34].to_vec();
    let g = to_lb(&ack4(CLIENT, VIP, 42001, 80), ETH_IP);
    let (stay, gone) = if on == B1.octets() {
        (b2, B1)
    } else {
        (b1, B2)
    };
    lab.bal.set_backends(&id, vec![stay]).unwrap();
    let now = lab.run(&g).1[30..34].to_vec();
    assert_ne!(now, gone.octets(), "flow stayed on a removed backend");
}

// Defects the fuzzer (`cargo xtask fuzz`) found, one fixture each.

/// An echo request to the VIP and the reply the balancer must send, both as frames.
fn echo4_pair(id_seq: [u8; 4], data: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let req = ipv4(V4::new(CLIENT, VIP, ICMP), &[], &icmp4(8, 0, id_seq, data));
    let mut r = V4::new(VIP, CLIENT, ICMP);
    r.ttl = 64;
    let reply = ipv4(r, &[], &icmp4(0, 0, id_seq, data));
    (to_lb(&req, ETH_IP), eth(CLIENT_MAC, IF_MAC, ETH_IP, &reply))
}

fn echo6_pair(data: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let req = ipv6(
        CLIENT6,
        VIP6,
        ICMPV6,
        0,
        0,
        &icmp6(CLIENT6, VIP6, 128, 0, [0, 9, 0, 1], data),
    );
    let reply = ipv6(
        VIP6,
        CLIENT6,
        ICMPV6,
        0,
        0,
        &icmp6(VIP6, CLIENT6, 129, 0, [0, 9, 0, 1], data),
    );
    (
        to_lb(&req, ETH_IPV6),
        eth(CLIENT_MAC, IF_MAC, ETH_IPV6, &reply),
    )
}

#[test]
fn icmp_of_the_other_family_is_passed() {
    let mut lab = lab();
    // ICMPv4 echo request inside IPv6: was answered with an ICMPv4 echo reply in IPv6.
    let v4_in_6 = to_lb(
        &ipv6(
            CLIENT6,
            VIP6,
            ICMP,
            0,
            0,
            &icmp4(8, 0, [0, 1, 0, 1], b"ping"),
        ),
        ETH_IPV6,
    );
    // ICMPv6 echo request inside IPv4: was answered with type 129.
    let v6_in_4 = to_lb(
        &ipv4(
            V4::new(CLIENT, VIP, ICMPV6),
            &[],
            &icmp4(128, 0, [0, 1, 0, 1], b"ping"),
        ),
        ETH_IP,
    );
    // Errors of the other family quoting a VIP flow: were forwarded to its backend.
    let reply = ipv4(
        V4::new(VIP, CLIENT, TCP),
        &[],
        &tcp4(VIP, CLIENT, 80, 40000, ACK, &[]),
    );
    let ptb_in_4 = to_lb(
        &ipv4(
            V4::new(Ipv4Addr::new(192, 0, 2, 1), VIP, ICMPV6),
            &[],
            &icmp4(2, 0, 1400u32.to_be_bytes(), &reply[..28]),
        ),
        ETH_IP,
    );
    let reply6 = ipv6(
        VIP6,
        CLIENT6,
        TCP,
        0,
        0,
        &tcp6(VIP6, CLIENT6, 80, 40000, ACK, &[]),
    );
    let unreach_in_6 = to_lb(
        &ipv6(
            CLIENT6,
            VIP6,
            ICMP,
            0,
            0,
            &icmp4(3, 4, [0, 0, 5, 0xdc], &reply6[..48]),
        ),
        ETH_IPV6,
    );
    for (what, f) in [
        ("ICMPv4 echo in IPv6", v4_in_6),
        ("ICMPv6 echo in IPv4", v6_in_4),
        ("ICMPv6 error in IPv4", ptb_in_4),
        ("ICMPv4 error in IPv6", unreach_in_6),
    ] {
        assert_frame(&lab.run(&f), PASS, &f, what);
    }
    assert_eq!(lab.bal.global_stat(stat::PASS_VIP_OTHER).packets, 4);
    assert_eq!(lab.bal.global_stat(stat::ICMP_ECHO_REPLY).packets, 0);
}

#[test]
fn echo_requests_with_bad_checksums_are_dropped() {
    let mut lab = lab();
    let (good, reply) = echo4_pair([0, 7, 0, 1], b"abcdefgh");
    // The ICMP checksum, the IPv4 header checksum, the ICMPv6 checksum off by one bit.
    let mut bad_icmp = good.clone();
    bad_icmp[14 + 20 + 2] ^= 0x01;
    let mut bad_ip = good.clone();
    bad_ip[14 + 10] ^= 0x01;
    let (good6, reply6) = echo6_pair(b"ping6");
    let mut bad6 = good6.clone();
    bad6[14 + 40 + 2] ^= 0x80;
    for (what, f) in [
        ("bad ICMP checksum", bad_icmp),
        ("bad IPv4 header checksum", bad_ip),
        ("bad ICMPv6 checksum", bad6),
    ] {
        assert_eq!(lab.run(&f).0, DROP, "{what}");
    }
    assert_eq!(lab.bal.global_stat(stat::DROP_MALFORMED).packets, 3);
    assert_eq!(lab.bal.global_stat(stat::ICMP_ECHO_REPLY).packets, 0);
    // The same requests with right checksums are answered.
    assert_frame(&lab.run(&good), TX, &reply, "good echo");
    assert_frame(&lab.run(&good6), TX, &reply6, "good echo6");
    // IPv4 options are in the header checksum too.
    let req = ipv4(
        V4::new(CLIENT, VIP, ICMP),
        &[1, 1, 1, 0],
        &icmp4(8, 0, [0, 1, 0, 2], b"opt"),
    );
    let mut r = V4::new(VIP, CLIENT, ICMP);
    r.ttl = 64;
    let rep = ipv4(r, &[1, 1, 1, 0], &icmp4(0, 0, [0, 1, 0, 2], b"opt"));
    let expected = eth(CLIENT_MAC, IF_MAC, ETH_IP, &rep);
    assert_frame(&lab.run(&to_lb(&req, ETH_IP)), TX, &expected, "options");
    let mut bad_opt = to_lb(&req, ETH_IP);
    bad_opt[14 + 21] ^= 0x01;
    assert_eq!(lab.run(&bad_opt).0, DROP, "bad checksum over the options");
}

#[test]
fn echo_reply_leaves_out_bytes_after_the_ip_packet() {
    let mut lab = lab();
    // Ethernet padding to the 60-byte minimum: the reply had kept it, so its IP length was
    // shorter than the frame.
    let (mut req, reply) = echo4_pair([0, 1, 0, 1], b"x");
    assert!(req.len() < 60);
    req.resize(60, 0);
    assert_frame(&lab.run(&req), TX, &reply, "padded echo");
    let (mut req6, reply6) = echo6_pair(b"ping6");
    req6.extend_from_slice(&[0xee; 9]);
    assert_frame(&lab.run(&req6), TX, &reply6, "echo6 with trailing bytes");
    // With a VLAN tag too.
    let (req, reply) = echo4_pair([0, 1, 0, 2], b"vlan");
    let mut tagged = eth_vlan(IF_MAC, CLIENT_MAC, 42, ETH_IP, &req[14..]);
    tagged.extend_from_slice(&[0; 11]);
    let expected = eth_vlan(CLIENT_MAC, IF_MAC, 42, ETH_IP, &reply[14..]);
    assert_frame(&lab.run(&tagged), TX, &expected, "tagged echo");
}

#[test]
fn echo_requests_of_every_length_are_answered_exactly() {
    // The request's checksum is summed in 64-byte chunks, 4-byte words and 1-3 last bytes:
    // every remainder, and sizes up to the MTU.
    let mut lab = lab();
    let sizes = (0..=130).chain([500, 1000, 1471, 1472]);
    for n in sizes {
        let data: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
        let (req, reply) = echo4_pair([0x12, 0x34, 0, n as u8], &data);
        assert_frame(&lab.run(&req), TX, &reply, &format!("echo of {n} bytes"));
        let (req6, reply6) = echo6_pair(&data[..n.min(1452)]);
        assert_frame(&lab.run(&req6), TX, &reply6, &format!("echo6 of {n} bytes"));
    }
}

#[test]
fn echo_reply_of_zeros_has_checksum_ffff() {
    // Identifier, sequence and data all zero: the reply's message is zeros but for the
    // checksum, which must be 0xffff; the incremental update had made it 0x0000.
    let mut lab = lab();
    for data in [&[][..], &[0; 3], &[0; 64]] {
        let (req, reply) = echo4_pair([0; 4], data);
        assert_eq!(reply[14 + 22..14 + 24], [0xff, 0xff]);
        assert_frame(&lab.run(&req), TX, &reply, "zero echo");
    }
}

#[test]
fn icmp_errors_are_forwarded_only_when_sent_to_a_vip_with_the_quote_inside() {
    let mut lab = lab();
    let router = Ipv4Addr::new(192, 0, 2, 1);
    let reply = ipv4(
        V4::new(VIP, CLIENT, TCP),
        &[],
        &tcp4(VIP, CLIENT, 80, 40000, ACK, &[]),
    );
    // The quoted ports lie after the IP packet, in the padding: they were read anyway, and
    // the error forwarded without them.
    let mut err = ipv4(
        V4::new(router, VIP, ICMP),
        &[],
        &icmp4(3, 4, [0, 0, 5, 0x78], &reply[..28]),
    );
    err.truncate(20 + 8 + 20);
    err[2..4].copy_from_slice(&48u16.to_be_bytes());
    err[10..12].copy_from_slice(&[0, 0]);
    let c = packet::checksum(&err[..20]);
    err[10..12].copy_from_slice(&c.to_be_bytes());
    let mut f = to_lb(&err, ETH_IP);
    f.extend_from_slice(&reply[20..28]);
    assert_frame(&lab.run(&f), PASS, &f, "quote beyond the IP packet");

    // An error to an address that is no VIP, though it shares a bit of the VIP address
    // filter with VIP6 (found by the fuzzer): was forwarded to VIP6's backend.
    let other: Ipv6Addr = "fd00:2100::400:1".parse().unwrap();
    let bit = |a: Ipv6Addr| lb_common::vip_filter_bit(&lb_userspace::addr::to_words(a.into()).0);
    assert_eq!(bit(other), bit(VIP6), "no longer a filter collision");
    let r6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
    let reply6 = ipv6(
        VIP6,
        CLIENT6,
        TCP,
        0,
        0,
        &tcp6(VIP6, CLIENT6, 80, 40000, ACK, &[]),
    );
    let ptb = ipv6(
        r6,
        other,
        ICMPV6,
        0,
        0,
        &icmp6(r6, other, 2, 0, 1400u32.to_be_bytes(), &reply6[..48]),
    );
    let f = to_lb(&ptb, ETH_IPV6);
    assert_frame(&lab.run(&f), PASS, &f, "error not to a VIP");
    assert_eq!(lab.bal.global_stat(stat::ICMP_ERROR_FWD).packets, 0);
}

/// The GUE source port the balancer derives from the inner flow (RSS entropy).
fn gue_sport(src: IpAddr, dst: IpAddr, sport: u16, dport: u16) -> u16 {
    let (s, _) = lb_userspace::addr::to_words(src);
    let (d, _) = lb_userspace::addr::to_words(dst);
    let x = s[0] ^ s[3] ^ d[0] ^ (raw_port(sport) << 16 | raw_port(dport));
    (x.wrapping_mul(0x9e37_79b1) >> 18) as u16 | 0xc000
}

/// A UDP header to `port` (checksum 0) followed by `inner`.
fn gue(sport: u16, port: u16, inner: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + inner.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&port.to_be_bytes());
    u.extend_from_slice(&((8 + inner.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(inner);
    u
}

fn gue_lab(port: u16) -> Lab {
    let mut lab = lab();
    lab.bal
        .set_encap(lb_userspace::balancer::Encap::Gue, port)
        .unwrap();
    lab
}

#[test]
fn gue_encapsulation_exact_bytes() {
    let mut lab = gue_lab(6080);
    // IPv4 in GUE over IPv4.
    let mut inner = syn4(CLIENT, VIP, 40000, 80);
    inner[1] = 0x28;
    let sport = gue_sport(CLIENT.into(), VIP.into(), 40000, 80);
    assert!(sport >= 0xc000);
    let outer = V4 {
        src: SRC_V4,
        dst: B1,
        proto: UDP,
        ttl: 64,
        tos: 0x28,
        id: 0,
        frag: DF,
    };
    let expected = eth(
        NH_MAC,
        IF_MAC,
        ETH_IP,
        &ipv4(outer, &[], &gue(sport, 6080, &inner)),
    );
    let got = lab.run(&to_lb(&inner, ETH_IP));
    assert_frame(&got, TX, &expected, "4 in GUE/IPv4");
    assert!(packet::ipv4_header_ok(&got.1[14..]));

    // IPv6 in GUE over IPv6, and IPv4 in GUE over IPv6 (with the flow label as before).
    let inner6 = ipv6(
        CLIENT6,
        VIP6,
        TCP,
        0x10,
        0,
        &tcp6(CLIENT6, VIP6, 40000, 80, SYN, &[]),
    );
    let sport6 = gue_sport(CLIENT6.into(), VIP6.into(), 40000, 80);
    let expected6 = eth(
        NH_MAC,
        IF_MAC,
        ETH_IPV6,
        &ipv6(
            SRC_V6,
            B6_1,
            UDP,
            0x10,
            label(CLIENT6.into(), 40000, 80),
            &gue(sport6, 6080, &inner6),
        ),
    );
    assert_frame(
        &lab.run(&to_lb(&inner6, ETH_IPV6)),
        TX,
        &expected6,
        "6 in GUE/IPv6",
    );
    let inner4 = syn4(CLIENT, VIP_ANY, 40000, 22);
    let expected46 = eth(
        NH_MAC,
        IF_MAC,
        ETH_IPV6,
        &ipv6(
            SRC_V6,
            B6_2,
            UDP,
            0,
            label(CLIENT.into(), 40000, 22),
            &gue(
                gue_sport(CLIENT.into(), VIP_ANY.into(), 40000, 22),
                6080,
                &inner4,
            ),
        ),
    );
    assert_frame(
        &lab.run(&to_lb(&inner4, ETH_IP)),
        TX,
        &expected46,
        "4 in GUE/IPv6",
    );

    // Source ports differ between flows (that is their point) and stay per flow.
    let ports: std::collections::BTreeSet<u16> = (0..64)
        .map(|p| {
            let out = lab.run(&to_lb(&syn4(CLIENT, VIP, 41000 + p, 80), ETH_IP)).1;
            u16::from_be_bytes([out[34], out[35]])
        })
        .collect();
    assert!(
        ports.len() > 48,
        "{} distinct GUE source ports",
        ports.len()
    );

    // Back to IP-in-IP: the default bytes again.
    lab.bal
        .set_encap(lb_userspace::balancer::Encap::Ipip, 6080)
        .unwrap();
    assert_frame(
        &lab.run(&to_lb(&inner, ETH_IP)),
        TX,
        &expect_4in4(&inner, B1),
        "IP-in-IP again",
    );
}

#[test]
fn gue_too_big_accounts_for_the_udp_header() {
    let mut lab = gue_lab(6080);
    // 1473 + 20 + 8 = 1501 > MTU 1500: fragmentation needed, advertising 1472.
    let payload = vec![0xab; 1473 - 40];
    let inner = ipv4(
        V4::new(CLIENT, VIP, TCP),
        &[],
        &tcp4(CLIENT, VIP, 40000, 80, ACK, &payload),
    );
    let got = lab.run(&to_lb(&inner, ETH_IP));
    assert_eq!(got.0, TX);
    assert_eq!(got.1[14 + 9], ICMP, "an ICMP answer");
    assert_eq!(&got.1[14 + 20..14 + 22], &[3, 4]);
    assert_eq!(u16::from_be_bytes([got.1[40], got.1[41]]), 1472);
    // 1472 fits.
    let fits = ipv4(
        V4::new(CLIENT, VIP, TCP),
        &[],
        &tcp4(CLIENT, VIP, 40000, 80, ACK, &payload[1..]),
    );
    let got = lab.run(&to_lb(&fits, ETH_IP));
    assert_eq!((got.0, got.1.len()), (TX, 14 + 28 + 1472));
}

#[test]
fn gue_output_decapsulates_to_the_original_packet() {
    for port in [6080, 7777] {
        let mut lab = gue_lab(port);
        let mut d = decap_lab();
        d.add_addr(B6_2.into()).unwrap();
        if port != lb_common::DEFAULT_GUE_PORT {
            d.set_gue_port(Some(port)).unwrap();
        }
        for (inner, ethertype) in [
            (syn4(CLIENT, VIP, 40000, 80), ETH_IP),
            (
                ipv6(
                    CLIENT6,
                    VIP6,
                    TCP,
                    0,
                    0,
                    &tcp6(CLIENT6, VIP6, 1, 80, SYN, &[]),
                ),
                ETH_IPV6,
            ),
            (syn4(CLIENT, VIP_ANY, 40000, 22), ETH_IP),
        ] {
            let (a, out) = lab.run(&to_lb(&inner, ethertype));
            assert_eq!(a, TX);
            let (a, back) = fixture::run(d.program(decap::PROGRAM).unwrap(), &out);
            assert_eq!(a, PASS);
            assert_eq!(
                hex(&back),
                hex(&eth(NH_MAC, IF_MAC, ethertype, &inner)),
                "port {port}"
            );
        }
    }
}

#[test]
fn decap_leaves_other_udp_alone() {
    let mut d = decap_lab();
    let inner = syn4(CLIENT, VIP, 40000, 80);
    let mac = [2, 0, 0, 0, 0, 0xaa];
    let outer = |dst, port, payload: &[u8]| {
        eth(
            mac,
            mac,
            ETH_IP,
            &ipv4(V4::new(SRC_V4, dst, UDP), &[], &gue(50000, port, payload)),
        )
    };
    let untouched = [
        // Ordinary UDP to this host on another port.
        outer(B1, 53, &inner),
        // GUE port, but not to one of our addresses.
        outer(B2, 6080, &inner),
        // GUE port, but what follows is no IP packet.
        outer(B1, 6080, b"\x00hello, not an IP packet"),
    ];
    for f in &untouched {
        assert_frame(
            &fixture::run(d.program(decap::PROGRAM).unwrap(), f),
            PASS,
            f,
            "untouched",
        );
    }
    // GUE turned off: left alone too.
    d.set_gue_port(None).unwrap();
    let f = outer(B1, 6080, &inner);
    assert_frame(
        &fixture::run(d.program(decap::PROGRAM).unwrap(), &f),
        PASS,
        &f,
        "off",
    );
    assert_eq!(d.decapsulated().packets, 0);
}

/// The bench's call-cost programs ("Cost of a call on this machine") pass the verifier and
/// pass the frame unchanged: the bench runs each again and again on one frame.
#[test]
fn call_cost_programs_pass_the_frame_unchanged() {
    let mut tools = aya::Ebpf::load(lb_userspace::programs::TOOLS).unwrap();
    let f = to_lb(&syn4(CLIENT, VIP, 40000, 80), ETH_IP);
    for name in ["maglb_calls_helper", "maglb_calls_sub"] {
        let p: &mut aya::programs::Xdp = tools.program_mut(name).unwrap().try_into().unwrap();
        p.load().unwrap();
        assert_frame(&fixture::run(p, &f), PASS, &f, name);
    }
}

/// New-flow frames to every VIP of the lab: `n` flows each (a port-wildcard VIP on `n` ports).
fn flows_to_every_vip(n: u16) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for v in &LAYOUT {
        for i in 0..n {
            let (sport, dport) = (30_000 + i, if v.port == 0 { 1_000 + i } else { v.port });
            let frame = match (v.addr, v.proto) {
                (IpAddr::V4(a), 6) => to_lb(&syn4(CLIENT, a, sport, dport), ETH_IP),
                (IpAddr::V4(a), _) => to_lb(&udp4_ip(CLIENT, a, sport, dport, b"q"), ETH_IP),
                (IpAddr::V6(a), proto) => {
                    let l4 = if proto == 6 {
                        tcp6(CLIENT6, a, sport, dport, SYN, &[])
                    } else {
                        udp6(CLIENT6, a, sport, dport, b"q")
                    };
                    to_lb(&ipv6(CLIENT6, a, proto, 0, 0, &l4), ETH_IPV6)
                }
            };
            out.push(frame);
        }
    }
    out
}

/// A new flow to a VIP that the VIP table does not show (its bucket full, its slot being
/// rewritten) is found in the VIP map: with the table emptied, every VIP of the lab gives
/// every flow the same answer, byte for byte, as with the table; a VIP changed afterwards is
/// shown again; a deleted VIP is forwarded by neither; and the table never shows what the VIP
/// map does not hold.
#[test]
fn a_vip_the_table_does_not_show_is_found_in_the_vip_map() {
    let frames = flows_to_every_vip(20);
    let (mut shown, mut hidden) = (lab(), lab());
    let table = |lab: &Lab| lab.bal.dp.observe().unwrap().vip_table;
    assert_eq!(table(&shown).len(), LAYOUT.len());
    hidden.bal.dp.use_vip_table(false).unwrap();
    assert!(table(&hidden).is_empty());
    let answers = |lab: &mut Lab| frames.iter().map(|f| lab.run(f)).collect::<Vec<_>>();
    let with_table = answers(&mut shown);
    // Every flow finds its VIP (forwarded, or dropped by the VIP without backends).
    assert!(with_table.iter().all(|(action, _)| *action != PASS));
    assert_eq!(with_table, answers(&mut hidden), "the table emptied");
    // Ports and protocols of VIP addresses that carry no VIP: no VIP either way.
    let none = [
        to_lb(&syn4(CLIENT, VIP, 40_000, 9_999), ETH_IP),
        to_lb(&udp4_ip(CLIENT, VIP_ANY, 1, 2, b"q"), ETH_IP),
    ];
    for f in &none {
        assert_eq!(shown.run(f).0, PASS);
        assert_eq!(hidden.run(f).0, PASS);
    }

    let id = vip(VIP, 80, "tcp");
    for lab in [&mut shown, &mut hidden] {
        lab.bal.set_backends(&id, drain_b1_add_b2()).unwrap();
    }
    let index = hidden.bal.vip_index(&id).unwrap();
    let again = table(&hidden);
    assert!(again.len() == 1 && again[0].1.index == index, "{again:?}");
    hidden.bal.dp.use_vip_table(false).unwrap();
    assert_eq!(
        answers(&mut shown),
        answers(&mut hidden),
        "after a backend change"
    );

    for lab in [&mut shown, &mut hidden] {
        lab.bal.del_vip(&id).unwrap();
        let obs = lab.bal.dp.observe().unwrap();
        assert!(
            obs.vip_table.iter().all(|s| obs.vips.contains(s)),
            "{obs:?}"
        );
        assert!(!obs.vip_table.iter().any(|(_, m)| m.index == index));
        let syn = to_lb(&syn4(CLIENT, VIP, 40_001, 80), ETH_IP);
        assert_eq!(lab.run(&syn).0, PASS, "a SYN to the deleted VIP");
    }
}

/// The balancer's VIP table map (found through the program's maps: other tests load
/// balancers of their own meanwhile).
fn vip_table_map(lab: &mut Lab) -> aya::maps::Array<aya::maps::MapData, VipBucket> {
    program_map(lab, "VIP_TABLE").try_into().unwrap()
}

/// The balancer's map named `name`, found through the program's maps.
fn program_map(lab: &mut Lab, name: &str) -> aya::maps::Map {
    let ids = lab
        .bal
        .program()
        .info()
        .unwrap()
        .map_ids()
        .unwrap()
        .unwrap();
    let data = ids
        .into_iter()
        .filter_map(|id| aya::maps::MapData::from_id(id).ok())
        .find(|m| {
            m.info()
                .ok()
                .and_then(|i| i.name_as_str().map(|n| n == name))
                == Some(true)
        })
        .expect("the program's map");
    aya::maps::Map::from_map_data(data).unwrap()
}

type RingOuter =
    aya::maps::ArrayOfMaps<aya::maps::MapData, aya::maps::Array<aya::maps::MapData, u32>>;

/// A VIP with the default ring size has its ring in `RINGS_FIXED` (whose lookup the verifier
/// inlines), not in `RINGS`, and the datapath reads it there: a ring map swapped in that
/// sends every slot to VIP:80's B1 takes the VIP's SYNs to B1. When the VIP is deleted and
/// its index goes to a VIP of another ring size, the index holds a ring in `RINGS` only.
#[test]
fn a_vip_of_the_default_ring_size_reads_its_ring_from_the_fixed_map() {
    use lb_common::{DEFAULT_RING_SIZE, FIXED_RING_MAP_FLAGS};
    use lb_userspace::state::VipSpec;
    /// VIP:`port`/tcp with a ring of `ring_size` slots and B2 as its backend.
    fn add(lab: &mut Lab, port: u16, ring_size: u32) -> u32 {
        let id = vip(VIP, port, "tcp");
        let mut spec = VipSpec::new(id);
        spec.ring_size = ring_size;
        spec.backends = backends(&[B2.into()]);
        lab.bal.set_vip(spec).unwrap();
        lab.bal.vip_index(&id).unwrap()
    }
    /// A SYN from `sport` to VIP:`port` leaves encapsulated toward `backend`.
    fn sent_to(lab: &mut Lab, port: u16, sport: u16, backend: Ipv4Addr, what: &str) {
        let syn = syn4(CLIENT, VIP, sport, port);
        let got = lab.run(&to_lb(&syn, ETH_IP));
        assert_frame(&got, TX, &expect_4in4(&syn, backend), what);
    }
    let mut lab = lab();
    let index = add(&mut lab, 8080, DEFAULT_RING_SIZE);
    sent_to(
        &mut lab,
        8080,
        40_000,
        B2,
        "SYN to the VIP of the default ring size",
    );
    let any: RingOuter = program_map(&mut lab, "RINGS").try_into().unwrap();
    let mut fixed: RingOuter = program_map(&mut lab, "RINGS_FIXED").try_into().unwrap();
    assert!(fixed.get(&index, 0).is_ok(), "no ring in RINGS_FIXED");
    assert!(any.get(&index, 0).is_err(), "a ring in RINGS too");
    // Every slot of a swapped-in ring names B1 (VIP:80's backend slot).
    let b1 = lab
        .bal
        .backend_index(&vip(VIP, 80, "tcp"), &B1.into())
        .unwrap();
    let mut ring =
        aya::maps::Array::<_, u32>::create(2 * DEFAULT_RING_SIZE, FIXED_RING_MAP_FLAGS).unwrap();
    for slot in 0..2 * DEFAULT_RING_SIZE {
        ring.set(slot, b1, 0).unwrap();
    }
    fixed.set(index, &ring, 0).unwrap();
    sent_to(
        &mut lab,
        8080,
        40_001,
        B1,
        "SYN through the swapped-in ring",
    );
    // The index, freed, goes to a VIP with a ring of another size (indices are handed out
    // oldest-freed first: VIPs come and go until one gets it).
    lab.bal.del_vip(&vip(VIP, 8080, "tcp")).unwrap();
    let port = (9000..9000 + lb_common::MAX_VIPS as u16)
        .find(|&port| {
            let got = add(&mut lab, port, 251) == index;
            if !got {
                lab.bal.del_vip(&vip(VIP, port, "tcp")).unwrap();
            }
            got
        })
        .expect("the index handed out again");
    assert!(
        fixed.get(&index, 0).is_err(),
        "the old ring left in RINGS_FIXED"
    );
    assert!(any.get(&index, 0).is_ok(), "no ring in RINGS");
    sent_to(
        &mut lab,
        port,
        40_002,
        B2,
        "SYN to the VIP of ring size 251",
    );
}

/// The datapath takes a VIP from the table when a slot holds its key with a matching check
/// word: VIP:443 (no backends: its SYNs are dropped) is forwarded like VIP:80 once its slot
/// carries VIP:80's meta, while the VIP map still holds its own.
#[test]
fn the_datapath_reads_the_vip_table() {
    let mut lab = lab();
    let syn = syn4(CLIENT, VIP, 40_000, 443);
    assert_eq!(lab.run(&to_lb(&syn, ETH_IP)).0, DROP);
    let obs = lab.bal.dp.observe().unwrap();
    let meta_of = |id| {
        let index = lab.bal.vip_index(&id).unwrap();
        *obs.vips.iter().find(|(_, m)| m.index == index).unwrap()
    };
    let (key, _) = meta_of(vip(VIP, 443, "tcp"));
    let (_, meta80) = meta_of(vip(VIP, 80, "tcp"));
    let mut map = vip_table_map(&mut lab);
    let i = vip_bucket(&key);
    let mut bucket = map.get(&i, 0).unwrap();
    assert!(bucket.set(key, meta80));
    map.set(i, bucket, 0).unwrap();
    let got = lab.run(&to_lb(&syn, ETH_IP));
    assert_frame(
        &got,
        TX,
        &expect_4in4(&syn, B1),
        "SYN to VIP:443 with VIP:80's meta",
    );
    // A slot whose check word does not match is passed over: the VIP map decides again.
    bucket.slots.iter_mut().for_each(|s| s.check ^= 2);
    map.set(i, bucket, 0).unwrap();
    assert_eq!(lab.run(&to_lb(&syn, ETH_IP)).0, DROP);
}

/// A VIP that did not fit its table bucket is found in the VIP map, and a miss in that
/// (spilled) bucket is not taken for "no VIP": of five VIPs on port 80 whose keys share a
/// bucket, the fifth is left out; its address also has a port-wildcard VIP, to another
/// backend; SYNs to port 80 still reach each VIP's own backend, and other ports the
/// wildcard's.
#[test]
fn a_vip_of_a_spilled_bucket_is_found_in_the_vip_map() {
    use lb_userspace::{reconcile::vip_key, state::VipSpec};
    let key = |a: Ipv4Addr, port| vip_key(&vip(a, port, "tcp"));
    let first = Ipv4Addr::new(10, 77, 0, 0);
    let bucket = vip_bucket(&key(first, 80));
    let same: Vec<Ipv4Addr> = (0..1u32 << 16)
        .map(|i| Ipv4Addr::from(u32::from(first) + i))
        .filter(|a| vip_bucket(&key(*a, 80)) == bucket)
        .take(VIP_WAYS + 1)
        .collect();
    assert_eq!(same.len(), VIP_WAYS + 1);
    let last = same[VIP_WAYS];
    let mut lab = lab();
    let mut add = |addr: Ipv4Addr, port, backend: Ipv4Addr| {
        let mut spec = VipSpec::new(vip(addr, port, "tcp"));
        spec.ring_size = 251;
        spec.backends = backends(&[backend.into()]);
        lab.bal.set_vip(spec).unwrap();
    };
    for a in &same {
        add(*a, 80, B1);
    }
    add(last, 0, B2);
    let obs = lab.bal.dp.observe().unwrap();
    assert!(obs.vips.iter().any(|(k, _)| *k == key(last, 80)));
    assert!(
        !obs.vip_table.iter().any(|(k, _)| *k == key(last, 80)),
        "the fifth fits"
    );
    assert!(obs.vip_table_hides.is_empty(), "{:?}", obs.vip_table_hides);
    for a in &same {
        let syn = syn4(CLIENT, *a, 40_000, 80);
        let got = lab.run(&to_lb(&syn, ETH_IP));
        assert_frame(&got, TX, &expect_4in4(&syn, B1), &format!("SYN to {a}:80"));
    }
    let syn = syn4(CLIENT, last, 40_000, 81);
    let got = lab.run(&to_lb(&syn, ETH_IP));
    assert_frame(&got, TX, &expect_4in4(&syn, B2), "SYN to the wildcard VIP");
}

/// The loaded balancer's instructions as the verifier left them (`xlated_prog_insns` of
/// `BPF_OBJ_GET_INFO_BY_FD`): inlined map lookups appear there as instructions, not calls.
fn xlated(lab: &mut Lab) -> Vec<[u8; 8]> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
    // The head of `struct bpf_prog_info` up to the xlated instructions' pointer.
    #[repr(C)]
    #[derive(Default)]
    struct Info {
        prog_type: u32,
        id: u32,
        tag: [u8; 8],
        jited_len: u32,
        xlated_len: u32,
        jited_insns: u64,
        xlated_insns: u64,
    }
    #[repr(C)]
    struct Attr {
        fd: u32,
        info_len: u32,
        info: u64,
    }
    let fd = lab.bal.program().fd().unwrap().as_fd().as_raw_fd() as u32;
    let get = |info: &mut Info| {
        let attr = Attr {
            fd,
            info_len: size_of::<Info>() as u32,
            info: std::ptr::from_mut(info) as u64,
        };
        // SAFETY: `attr` is a valid bpf_attr for the command; the kernel writes at most
        // `info_len` bytes into `info`, and the instructions into the buffer `info` names,
        // whose length it was told.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                std::ptr::from_ref(&attr),
                size_of::<Attr>() as u32,
            )
        };
        assert_eq!(r, 0, "prog info: {}", std::io::Error::last_os_error());
    };
    let mut info = Info::default();
    get(&mut info);
    let mut insns = vec![[0u8; 8]; info.xlated_len as usize / 8];
    let len = info.xlated_len;
    info = Info {
        xlated_len: len,
        xlated_insns: insns.as_mut_ptr() as u64,
        ..Info::default()
    };
    get(&mut info);
    insns
}

/// The ring lookup of a VIP with the default ring size is inlined: the verifier's inlined
/// array lookup bounds the index by the inner map's size (`if r0 >= 131074`), which no other
/// instruction compares with. It is not when LLVM merges that lookup with the `RINGS` one
/// (one call for two maps: the verifier then inlines neither), which this test caught.
#[test]
fn the_verifier_inlines_the_default_size_ring_lookup() {
    let mut lab = lab();
    let bound = (2 * lb_common::DEFAULT_RING_SIZE).to_le_bytes();
    // BPF_JMP | BPF_JGE | BPF_K, destination r0 (the lookup's result register).
    let inlined = xlated(&mut lab)
        .iter()
        .filter(|i| i[0] == 0x35 && i[1] & 0x0f == 0 && i[4..8] == bound)
        .count();
    assert!(inlined > 0, "no inlined lookup of a RINGS_FIXED inner map");
}

/// This CPU's memo slot of `flow` in the program's `FLOW_MEMO` (its index and content).
fn memo_slot(
    memo: &aya::maps::Array<aya::maps::MapData, lb_common::FlowMemo>,
    cpu: usize,
    flow: &lb_common::FlowKey,
) -> (u32, lb_common::FlowMemo) {
    let cpus = aya::util::nr_cpus().unwrap() as u32;
    let slots = lb_common::flow_memo_slots(cpus);
    let h = lb_common::hash::flow_hash(flow);
    let i = cpu as u32 * slots + (h & (slots - 1));
    (i, memo.get(&i, 0).unwrap())
}

/// An established flow's packets are answered from the CPU's memo (`FLOW_MEMO`) while its
/// copy is recent, and from the connection table otherwise: a copy that names another
/// backend moves the flow while it is recent and no longer once it is older than the memo's
/// window, or than an eighth of the idle timeout; a copy with a stale backend generation is
/// not used; another flow's recent copy is not pushed out by a flow the table answers.
#[test]
fn an_established_flow_is_answered_from_the_cpus_memo_while_its_copy_is_recent() {
    use lb_common::{FLOW_MEMO_TICKS, FlowMemo, PROTO_UDP};
    let cpu = pin_to_cpu(0).unwrap();
    let mut lab = lab();
    let id = vip(VIP_UDP3, 5000, "udp");
    let flow = flow4(CLIENT, VIP_UDP3, 41000, 5000, PROTO_UDP);
    let l3 = udp4_ip(CLIENT, VIP_UDP3, 41000, 5000, b"memo");
    let frame = to_lb(&l3, ETH_IP);
    // The first packet is a new flow (the table learns it), the second finds it in the table
    // (the memo learns it).
    let first = lab.run(&frame);
    let table_backend = Ipv4Addr::new(first.1[30], first.1[31], first.1[32], first.1[33]);
    assert_frame(
        &lab.run(&frame),
        TX,
        &expect_4in4(&l3, table_backend),
        "second packet",
    );
    let mut memo: aya::maps::Array<_, FlowMemo> =
        program_map(&mut lab, "FLOW_MEMO").try_into().unwrap();
    let backends: aya::maps::Array<_, lb_common::Backend> =
        program_map(&mut lab, "BACKENDS").try_into().unwrap();
    let other = [B1, B2, B3]
        .into_iter()
        .find(|b| *b != table_backend)
        .unwrap();
    let [table_index, other_index] =
        [table_backend, other].map(|b| lab.bal.backend_index(&id, &b.into()).unwrap());
    let (slot, learnt) = memo_slot(&memo, cpu, &flow);
    assert_eq!(learnt.key, flow, "the memo holds the flow");
    assert_eq!(learnt.backend, table_index);
    // A recent copy naming another backend of the VIP answers instead of the table.
    let other_gen = backends.get(&other_index, 0).unwrap().generation;
    let copy = |checked: u32, generation: u32| FlowMemo {
        backend: other_index,
        generation,
        checked,
        ..learnt
    };
    // (Recent: the datapath renews the copy from the table, and the test rewrites it with
    // that stamp; an attempt that stalled past the window before the packet ran is tried
    // again.)
    let mut answered = None;
    for _ in 0..3 {
        let t = std::time::Instant::now();
        with_memo(&mut lab, &mut memo, slot, FlowMemo::default(), &frame);
        let now = memo_slot(&memo, cpu, &flow).1.checked;
        memo.set(slot, copy(now, other_gen), 0).unwrap();
        let got = lab.run(&frame);
        answered = Some(got);
        if t.elapsed() < std::time::Duration::from_millis(100) {
            break;
        }
    }
    let got = answered.unwrap();
    assert_frame(&got, TX, &expect_4in4(&l3, other), "a recent copy answers");
    // A copy older than the window: the table answers, and the memo copies it again.
    let now = memo_slot(&memo, cpu, &flow).1.checked;
    let old = copy(now.wrapping_sub(FLOW_MEMO_TICKS), other_gen);
    let from_table = expect_4in4(&l3, table_backend);
    let got = with_memo(&mut lab, &mut memo, slot, old, &frame);
    assert_frame(&got, TX, &from_table, "an old copy");
    let renewed = memo_slot(&memo, cpu, &flow).1;
    assert_eq!(renewed.backend, table_index, "copied again");
    // A recent copy made under another generation of its backend: the table answers.
    let stale = copy(renewed.checked, other_gen.wrapping_add(1));
    let got = with_memo(&mut lab, &mut memo, slot, stale, &frame);
    assert_frame(&got, TX, &from_table, "a stale generation");
    // Another flow's recent copy in the slot stays: the table answers this flow.
    let stranger = FlowMemo {
        key: flow4(CLIENT, VIP_UDP3, 41001, 5000, PROTO_UDP),
        ..copy(memo_slot(&memo, cpu, &flow).1.checked, other_gen)
    };
    let got = with_memo(&mut lab, &mut memo, slot, stranger, &frame);
    assert_frame(&got, TX, &from_table, "another flow's copy");
    assert_eq!(memo.get(&slot, 0).unwrap(), stranger, "pushed out");
    // With a UDP idle timeout of 100 ms (96 ticks), a copy 20 ticks old is past its window
    // (12 ticks), though well inside the default one.
    lab.bal.set_idle_timeouts(None, Some(100)).unwrap();
    with_memo(&mut lab, &mut memo, slot, learnt, &frame);
    let now = memo_slot(&memo, cpu, &flow).1.checked;
    let aged = copy(now.wrapping_sub(20), other_gen);
    let got = with_memo(&mut lab, &mut memo, slot, aged, &frame);
    assert_frame(&got, TX, &from_table, "past an eighth of the timeout");
}

/// Writes `entry` into memo slot `slot`, then runs the balancer on `frame`.
fn with_memo(
    lab: &mut Lab,
    memo: &mut aya::maps::Array<aya::maps::MapData, lb_common::FlowMemo>,
    slot: u32,
    entry: lb_common::FlowMemo,
    frame: &[u8],
) -> (u32, Vec<u8>) {
    memo.set(slot, entry, 0).unwrap();
    lab.run(frame)
}

/// The memo goes off for a window after one in which it answered under a quarter of its
/// lookups (thousands of flows seen once each): a flow that is not one of its samples then
/// neither reads nor fills it. With a busy flow alone it is on again, and answers.
#[test]
fn the_memo_is_off_while_it_answers_few_and_on_again_once_it_pays() {
    use lb_common::{FlowMemo, MemoMeter, PROTO_UDP, memo_sampled};
    use std::time::{Duration, Instant};
    let cpu = pin_to_cpu(0).unwrap();
    let mut lab = lab();
    let meter = |lab: &mut Lab| -> MemoMeter {
        let m: aya::maps::PerCpuArray<_, MemoMeter> =
            program_map(lab, "MEMO_METER").try_into().unwrap();
        m.get(&0, 0).unwrap()[cpu]
    };
    let mut memo: aya::maps::Array<_, FlowMemo> =
        program_map(&mut lab, "FLOW_MEMO").try_into().unwrap();
    let flow = |sport: u16| flow4(CLIENT, VIP_UDP3, sport, 5000, PROTO_UDP);
    let sport = (42000..43000)
        .find(|p| !memo_sampled(lb_common::hash::flow_hash(&flow(*p))))
        .unwrap();
    let busy = to_lb(&udp4_ip(CLIENT, VIP_UDP3, sport, 5000, b"busy"), ETH_IP);
    let copied = |memo: &aya::maps::Array<_, FlowMemo>| {
        memo_slot(memo, cpu, &flow(sport)).1.key == flow(sport)
    };
    lab.run(&busy);
    let slot = memo_slot(&memo, cpu, &flow(sport)).0;
    // Flows seen once each until the meter's current window holds at least 64 lookups, under
    // a quarter of them answered (a window that ends early in a burst holds fewer: the burst
    // goes on). The next window is judged by this one: a window later, the busy flow (which
    // the table knows) finds the memo off, and neither reads nor fills its emptied slot.
    let t = Instant::now();
    let mut src = 0x0a70_0000u32;
    loop {
        let m = meter(&mut lab);
        if !lb_common::memo_pays(m.looked, m.hits) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "never judged off: {m:?}"
        );
        for _ in 0..500 {
            src += 1;
            let frame = udp4_ip(Ipv4Addr::from(src), VIP_UDP3, 1000, 5000, b"once");
            lab.run(&to_lb(&frame, ETH_IP));
        }
    }
    std::thread::sleep(Duration::from_millis(20));
    with_memo(&mut lab, &mut memo, slot, FlowMemo::default(), &busy);
    assert_eq!(meter(&mut lab).off, 1, "the memo did not go off");
    assert!(
        !copied(&memo),
        "the memo was off, yet the busy flow was copied into it"
    );
    // The busy flow alone: no sampled lookups to judge by, so the memo is on again in the
    // next window, copies the flow and answers its packets.
    let t = Instant::now();
    while meter(&mut lab).off == 1 || !copied(&memo) {
        assert!(t.elapsed() < Duration::from_secs(1), "the memo stayed off");
        std::thread::sleep(Duration::from_millis(5));
        lab.run(&busy);
    }
    let before = meter(&mut lab);
    for _ in 0..10 {
        lab.run(&busy);
    }
    let after = meter(&mut lab);
    assert_eq!(after.off, 0);
    assert!(
        after.window != before.window || after.hits >= before.hits + 10,
        "the memo did not answer: {before:?} -> {after:?}"
    );
}
