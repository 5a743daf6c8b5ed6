//! Builds frames byte by byte for the packet fixtures, with checksums computed here, apart
//! from the datapath's own checksum code.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_IP: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86DD;
pub const ETH_ARP: u16 = 0x0806;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;
pub const IPIP: u8 = 4;
pub const IPV6: u8 = 41;
pub const DF: u16 = 0x4000;
pub const MF: u16 = 0x2000;
pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;

/// RFC 1071 checksum of `data`.
pub fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for c in data.chunks(2) {
        let w = if c.len() == 2 {
            u16::from_be_bytes([c[0], c[1]])
        } else {
            u16::from_be_bytes([c[0], 0])
        };
        sum += w as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

pub fn eth_vlan(dst: [u8; 6], src: [u8; 6], vid: u16, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(18 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&0x8100u16.to_be_bytes());
    f.extend_from_slice(&vid.to_be_bytes());
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// IPv4 header fields that tests vary.
#[derive(Clone, Copy)]
pub struct V4 {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub proto: u8,
    pub ttl: u8,
    pub tos: u8,
    pub id: u16,
    /// Flags and fragment offset (host order), e.g. `DF`.
    pub frag: u16,
}

impl V4 {
    pub fn new(src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> Self {
        Self {
            src,
            dst,
            proto,
            ttl: 64,
            tos: 0,
            id: 0x1234,
            frag: DF,
        }
    }
}

/// An IPv4 packet with `options` (a multiple of 4 bytes) and a correct header checksum.
pub fn ipv4(h: V4, options: &[u8], payload: &[u8]) -> Vec<u8> {
    assert_eq!(options.len() % 4, 0);
    let hlen = 20 + options.len();
    let mut p = Vec::with_capacity(hlen + payload.len());
    p.push(0x40 | (hlen / 4) as u8);
    p.push(h.tos);
    p.extend_from_slice(&((hlen + payload.len()) as u16).to_be_bytes());
    p.extend_from_slice(&h.id.to_be_bytes());
    p.extend_from_slice(&h.frag.to_be_bytes());
    p.push(h.ttl);
    p.push(h.proto);
    p.extend_from_slice(&[0, 0]);
    p.extend_from_slice(&h.src.octets());
    p.extend_from_slice(&h.dst.octets());
    p.extend_from_slice(options);
    let c = checksum(&p[..hlen]);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, nh: u8, tc: u8, flow: u32, payload: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(40 + payload.len());
    let vtcfl: u32 = 6 << 28 | (tc as u32) << 20 | (flow & 0xf_ffff);
    p.extend_from_slice(&vtcfl.to_be_bytes());
    p.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    p.push(nh);
    p.push(64);
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    p
}

fn pseudo_v4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, seg: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&src.octets());
    v.extend_from_slice(&dst.octets());
    v.extend_from_slice(&[0, proto]);
    v.extend_from_slice(&(seg.len() as u16).to_be_bytes());
    v.extend_from_slice(seg);
    v
}

fn pseudo_v6(src: Ipv6Addr, dst: Ipv6Addr, nh: u8, seg: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&src.octets());
    v.extend_from_slice(&dst.octets());
    v.extend_from_slice(&(seg.len() as u32).to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, nh]);
    v.extend_from_slice(seg);
    v
}

fn tcp_raw(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(20 + payload.len());
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&1000u32.to_be_bytes());
    t.extend_from_slice(&0u32.to_be_bytes());
    t.push(5 << 4);
    t.push(flags);
    t.extend_from_slice(&64240u16.to_be_bytes());
    t.extend_from_slice(&[0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}

fn udp_raw(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

/// A TCP segment with its checksum over the IPv4 pseudo-header.
pub fn tcp4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut t = tcp_raw(sport, dport, flags, payload);
    let c = checksum(&pseudo_v4(src, dst, TCP, &t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

pub fn udp4(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = udp_raw(sport, dport, payload);
    let c = checksum(&pseudo_v4(src, dst, UDP, &u));
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

pub fn tcp6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    sport: u16,
    dport: u16,
    flags: u8,
    payload: &[u8],
) -> Vec<u8> {
    let mut t = tcp_raw(sport, dport, flags, payload);
    let c = checksum(&pseudo_v6(src, dst, TCP, &t));
    t[16..18].copy_from_slice(&c.to_be_bytes());
    t
}

pub fn udp6(src: Ipv6Addr, dst: Ipv6Addr, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = udp_raw(sport, dport, payload);
    let c = checksum(&pseudo_v6(src, dst, UDP, &u));
    u[6..8].copy_from_slice(&c.to_be_bytes());
    u
}

/// An ICMP message (`rest` is the 4 bytes after the checksum).
pub fn icmp4(ty: u8, code: u8, rest: [u8; 4], payload: &[u8]) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(payload);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

pub fn icmp6(
    src: Ipv6Addr,
    dst: Ipv6Addr,
    ty: u8,
    code: u8,
    rest: [u8; 4],
    payload: &[u8],
) -> Vec<u8> {
    let mut m = vec![ty, code, 0, 0];
    m.extend_from_slice(&rest);
    m.extend_from_slice(payload);
    let c = checksum(&pseudo_v6(src, dst, ICMPV6, &m));
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// Whether an IPv4 header (at the start of `p`) has a correct checksum.
pub fn ipv4_header_ok(p: &[u8]) -> bool {
    let hlen = ((p[0] & 0x0f) as usize) * 4;
    checksum(&p[..hlen]) == 0
}
