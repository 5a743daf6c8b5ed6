//! Input frames: random bytes, and valid frames of every kind the balancer handles (built with
//! [`crate::packet`]) with structure-aware mutations on top.

use std::net::{Ipv4Addr, Ipv6Addr};

use super::rng::Rng;
use crate::{fixture::*, packet::*};

/// Largest frame before extension: a VLAN tag plus the largest L3 length drawn (1560).
pub const MAX_FRAME: usize = 1600;
/// Most padding an extension adds.
const MAX_EXTEND: usize = 64;
const ETH_HLEN: usize = 14;
const ETH_VLAN: u16 = 0x8100;

/// A frame and where its layers start, for mutations aimed at header fields. The offsets are
/// those of the frame as built: after a mutation they may point past its end or at other
/// fields, and every mutation checks the bounds.
struct Frame {
    bytes: Vec<u8>,
    l3: usize,
    l4: usize,
    v6: bool,
}

/// Frame `index` of the run with `seed`.
pub fn frame(seed: u64, index: u64) -> Vec<u8> {
    let mut rng = Rng::for_frame(seed, index);
    if rng.chance(15) {
        return random(&mut rng);
    }
    let mut f = valid(&mut rng);
    let n = match rng.below(100) {
        0..25 => 0,
        25..65 => 1,
        65..85 => 2,
        85..95 => 3,
        _ => rng.range(4, 8),
    };
    for _ in 0..n {
        mutate(&mut rng, &mut f);
    }
    fixup(&mut rng, &mut f);
    f.bytes
}

/// Random bytes, half of them with an IPv4 or IPv6 header start to a VIP, so that the deeper
/// parsers see garbage too. At least an Ethernet header: BPF_PROG_TEST_RUN refuses shorter
/// XDP input (EINVAL), and no NIC delivers such frames.
fn random(rng: &mut Rng) -> Vec<u8> {
    let len = rng.range(ETH_HLEN, MAX_FRAME);
    let mut f = rng.bytes(len);
    if rng.chance(50) {
        let l3 = if rng.chance(20) {
            f[12..14].copy_from_slice(&ETH_VLAN.to_be_bytes());
            18
        } else {
            14
        };
        if rng.chance(60) && len >= l3 + 20 {
            f[l3 - 2..l3].copy_from_slice(&ETH_IP.to_be_bytes());
            f[l3] = 0x40 | (f[l3] & 0x0f);
            f[l3 + 16..l3 + 20].copy_from_slice(&dst4(rng).octets());
        } else if len >= l3 + 40 {
            f[l3 - 2..l3].copy_from_slice(&ETH_IPV6.to_be_bytes());
            f[l3] = 0x60 | (f[l3] & 0x0f);
            f[l3 + 24..l3 + 40].copy_from_slice(&VIP6.octets());
        }
    }
    f
}

fn mac(rng: &mut Rng) -> [u8; 6] {
    let mut m = [0; 6];
    rng.fill(&mut m);
    m
}

/// Ethernet, 802.1Q-tagged one time in five; returns the frame and the L3 offset.
fn l2(rng: &mut Rng, ethertype: u16, l3: &[u8]) -> (Vec<u8>, usize) {
    let dst = if rng.chance(90) { IF_MAC } else { mac(rng) };
    let src = if rng.chance(70) { CLIENT_MAC } else { mac(rng) };
    if rng.chance(20) {
        (eth_vlan(dst, src, rng.u16(), ethertype, l3), 18)
    } else {
        (eth(dst, src, ethertype, l3), 14)
    }
}

/// Destinations: mostly VIP addresses, sometimes others.
fn dst4(rng: &mut Rng) -> Ipv4Addr {
    match rng.below(20) {
        0..7 => VIP,
        7..10 => VIP_UDP3,
        10..13 => VIP_AFF,
        13..16 => VIP_ANY,
        16 => SRC_V4,
        17 => Ipv4Addr::new(10, 100, 0, rng.u8()),
        _ => Ipv4Addr::from(rng.u32()),
    }
}

fn src4(rng: &mut Rng) -> Ipv4Addr {
    if rng.chance(40) {
        CLIENT
    } else {
        Ipv4Addr::from(rng.u32())
    }
}

fn dst6(rng: &mut Rng) -> Ipv6Addr {
    match rng.below(10) {
        0..8 => VIP6,
        8 => SRC_V6,
        _ => Ipv6Addr::from(rng.next_u64() as u128 | (rng.next_u64() as u128) << 64),
    }
}

fn src6(rng: &mut Rng) -> Ipv6Addr {
    if rng.chance(40) {
        CLIENT6
    } else {
        Ipv6Addr::from(0x2001_0db8u128 << 96 | rng.next_u64() as u128)
    }
}

/// A target L3 length: mostly small, a fifth around the encapsulation limits (1460 and 1480
/// bytes fit an MTU of 1500 after a 40- or 20-byte outer header).
fn l3_len(rng: &mut Rng) -> usize {
    match rng.below(100) {
        0..50 => rng.range(0, 100),
        50..70 => rng.range(100, 600),
        70..80 => rng.range(600, 1440),
        _ => rng.range(1440, 1560),
    }
}

/// Payload bytes so that the L3 packet is about `l3_len` long with `headers` bytes of headers.
fn payload(rng: &mut Rng, headers: usize) -> Vec<u8> {
    let n = l3_len(rng).saturating_sub(headers);
    rng.bytes(n)
}

fn options(rng: &mut Rng) -> Vec<u8> {
    if rng.chance(70) {
        return Vec::new();
    }
    let words = rng.range(1, 10);
    if rng.chance(50) {
        // NOPs, then end of options.
        let mut o = vec![1; words * 4];
        o[words * 4 - 1] = 0;
        o
    } else {
        rng.bytes(words * 4)
    }
}

fn v4_header(rng: &mut Rng, src: Ipv4Addr, dst: Ipv4Addr, proto: u8) -> V4 {
    let mut h = V4::new(src, dst, proto);
    h.ttl = rng.u8();
    h.tos = if rng.chance(70) { 0 } else { rng.u8() };
    h.id = rng.u16();
    h.frag = if rng.chance(80) { DF } else { 0 };
    h
}

fn tcp_port(rng: &mut Rng) -> u16 {
    let any = rng.u16();
    rng.pick(&[80, 80, 80, 443, 22, 0, 5000, 53, any])
}

fn udp_port(rng: &mut Rng) -> u16 {
    let any = rng.u16();
    rng.pick(&[53, 53, 5000, 5000, 80, 0, any])
}

fn sport(rng: &mut Rng) -> u16 {
    if rng.chance(3) { 0 } else { rng.u16() }
}

/// A valid frame of one of the kinds the balancer sees.
fn valid(rng: &mut Rng) -> Frame {
    if rng.chance(65) {
        valid4(rng)
    } else {
        valid6(rng)
    }
}

fn valid4(rng: &mut Rng) -> Frame {
    let (src, dst) = (src4(rng), dst4(rng));
    let opts = options(rng);
    let hlen = 20 + opts.len();
    let (proto, l4): (u8, Vec<u8>) = match rng.below(100) {
        0..30 => {
            let p = payload(rng, hlen + 20);
            let any = rng.u8();
            let flags = rng.pick(&[SYN, ACK, ACK | 0x08, any]);
            (TCP, tcp4(src, dst, sport(rng), tcp_port(rng), flags, &p))
        }
        30..45 => {
            let p = payload(rng, hlen + 8);
            (UDP, udp4(src, dst, sport(rng), udp_port(rng), &p))
        }
        45..62 => {
            let p = payload(rng, hlen + 8);
            let code = if rng.chance(90) { 0 } else { rng.u8() };
            let rest = rng.u32().to_be_bytes();
            (ICMP, icmp4(8, code, rest, &p))
        }
        62..77 => (ICMP, error4(rng)),
        77..90 => return fragment4(rng, src, dst, opts),
        _ => other4(rng, hlen),
    };
    // Errors go to the VIP that sent the quoted packet.
    let dst = if proto == ICMP && l4.len() >= 24 && l4[0] == 3 && rng.chance(80) {
        Ipv4Addr::new(l4[20], l4[21], l4[22], l4[23])
    } else {
        dst
    };
    let ip = ipv4(v4_header(rng, src, dst, proto), &opts, &l4);
    let (bytes, l3) = l2(rng, ETH_IP, &ip);
    Frame {
        bytes,
        l3,
        l4: l3 + hlen,
        v6: false,
    }
}

/// The packet a backend sent from a VIP to a client, quoted in an ICMP error about it.
fn quoted4(rng: &mut Rng) -> Vec<u8> {
    let any = Ipv4Addr::from(rng.u32());
    let vip = rng.pick(&[VIP, VIP, VIP_UDP3, VIP_AFF, VIP_ANY, any]);
    let client = src4(rng);
    let tcp = rng.chance(60);
    let (proto, seg) = if tcp {
        let port = tcp_port(rng);
        (
            TCP,
            tcp4(vip, client, port, sport(rng), ACK, &rng.bytes(64)),
        )
    } else {
        let port = udp_port(rng);
        (UDP, udp4(vip, client, port, sport(rng), &rng.bytes(64)))
    };
    let mut h = v4_header(rng, vip, client, proto);
    h.frag = DF;
    let mut q = ipv4(h, &options(rng), &seg);
    let any = rng.range(20, q.len());
    let keep = rng.pick(&[28, 28, 48, 68, q.len(), any]);
    q.truncate(keep);
    q
}

/// Destination unreachable (fragmentation needed, mostly) about a VIP's packet.
fn error4(rng: &mut Rng) -> Vec<u8> {
    let any = rng.below(16) as u8;
    let code = rng.pick(&[4, 4, 4, 3, 1, 0, any]);
    let any = rng.u16();
    let mtu = rng.pick(&[1400u16, 1280, 576, any]).to_be_bytes();
    icmp4(3, code, [0, 0, mtu[0], mtu[1]], &quoted4(rng))
}

/// An IPv4 fragment of a TCP or UDP datagram: the first (MF, offset 0, with the L4 header)
/// or a later one (an offset, MF or not).
fn fragment4(rng: &mut Rng, src: Ipv4Addr, dst: Ipv4Addr, opts: Vec<u8>) -> Frame {
    let udp = rng.chance(70);
    let proto = if udp { UDP } else { TCP };
    let dst = if rng.chance(70) {
        rng.pick(&[VIP_UDP3, VIP_UDP3, VIP, VIP_ANY, VIP_AFF])
    } else {
        dst
    };
    let hlen = 20 + opts.len();
    let mut h = v4_header(rng, src, dst, proto);
    let body = if rng.chance(50) {
        h.frag = MF;
        let p = payload(rng, hlen + 8);
        let mut seg = if udp {
            udp4(src, dst, sport(rng), udp_port(rng), &p)
        } else {
            tcp4(src, dst, sport(rng), tcp_port(rng), ACK, &p)
        };
        // A first fragment carries a multiple of 8 bytes; keep the L4 header whole.
        let keep = (seg.len() / 8 * 8).max(24).min(seg.len());
        seg.truncate(keep);
        seg
    } else {
        let mf = if rng.chance(50) { MF } else { 0 };
        h.frag = mf | rng.range(1, 0x1fff) as u16;
        payload(rng, hlen)
    };
    let ip = ipv4(h, &opts, &body);
    let (bytes, l3) = l2(rng, ETH_IP, &ip);
    Frame {
        bytes,
        l3,
        l4: l3 + hlen,
        v6: false,
    }
}

/// Protocols the balancer does not handle, and ICMPv6 inside IPv4.
fn other4(rng: &mut Rng, hlen: usize) -> (u8, Vec<u8>) {
    let any = rng.u8();
    let proto = rng.pick(&[ICMPV6, ICMPV6, 47, IPIP, IPV6, 0, 2, 132, 255, any]);
    let p = payload(rng, hlen + 8);
    if proto == ICMPV6 {
        // An ICMPv6 echo request, checksummed as ICMPv4 would be (there is no pseudo-header).
        (proto, icmp4(128, 0, rng.u32().to_be_bytes(), &p))
    } else {
        (proto, p)
    }
}

fn valid6(rng: &mut Rng) -> Frame {
    let (src, dst) = (src6(rng), dst6(rng));
    let tc = if rng.chance(70) { 0 } else { rng.u8() };
    let flow = rng.u32() & 0xf_ffff;
    let (nh, l4): (u8, Vec<u8>) = match rng.below(100) {
        0..35 => {
            let p = payload(rng, 60);
            let any = rng.u8();
            let flags = rng.pick(&[SYN, ACK, any]);
            (TCP, tcp6(src, dst, sport(rng), tcp_port(rng), flags, &p))
        }
        35..45 => {
            let p = payload(rng, 48);
            (UDP, udp6(src, dst, sport(rng), udp_port(rng), &p))
        }
        45..65 => {
            let p = payload(rng, 48);
            let code = if rng.chance(90) { 0 } else { rng.u8() };
            (
                ICMPV6,
                icmp6(src, dst, 128, code, rng.u32().to_be_bytes(), &p),
            )
        }
        65..82 => {
            let (ty, code, rest) = if rng.chance(50) {
                let any = rng.u32();
                let mtu = rng.pick(&[1280u32, 1400, 1500, any]);
                (2, 0, mtu.to_be_bytes())
            } else {
                (1, rng.below(8) as u8, [0; 4])
            };
            let q = quoted6(rng);
            // Errors go to the VIP that sent the quoted packet.
            let dst = if rng.chance(80) {
                Ipv6Addr::from(<[u8; 16]>::try_from(&q[8..24]).expect("16 bytes"))
            } else {
                dst
            };
            let ip = ipv6(
                src,
                dst,
                ICMPV6,
                tc,
                flow,
                &icmp6(src, dst, ty, code, rest, &q),
            );
            return frame6(rng, ip);
        }
        82..90 => {
            // ICMPv4 echo inside IPv6.
            let p = payload(rng, 48);
            (ICMP, icmp4(8, 0, rng.u32().to_be_bytes(), &p))
        }
        _ => {
            // A fragment header, hop-by-hop, routing, no next header, GRE, ...
            let any = rng.u8();
            let nh = rng.pick(&[44, 44, 0, 43, 60, 59, 47, any]);
            (nh, payload(rng, 40))
        }
    };
    frame6(rng, ipv6(src, dst, nh, tc, flow, &l4))
}

fn frame6(rng: &mut Rng, ip: Vec<u8>) -> Frame {
    let (bytes, l3) = l2(rng, ETH_IPV6, &ip);
    Frame {
        bytes,
        l3,
        l4: l3 + 40,
        v6: true,
    }
}

fn quoted6(rng: &mut Rng) -> Vec<u8> {
    let vip = if rng.chance(85) { VIP6 } else { dst6(rng) };
    let client = src6(rng);
    let data = rng.bytes(64);
    let (nh, seg) = if rng.chance(70) {
        let port = tcp_port(rng);
        (TCP, tcp6(vip, client, port, sport(rng), ACK, &data))
    } else {
        let port = udp_port(rng);
        (UDP, udp6(vip, client, port, sport(rng), &data))
    };
    let mut q = ipv6(vip, client, nh, 0, 0, &seg);
    let any = rng.range(40, q.len());
    let keep = rng.pick(&[48, 48, 64, 128, q.len(), any]);
    q.truncate(keep);
    q
}

/// Values that hit edges of length and offset checks.
fn edgy16(rng: &mut Rng, near: usize) -> u16 {
    match rng.below(6) {
        0 => rng.u16(),
        1 => 0,
        2 => 0xffff,
        _ => (near as i64 + rng.range(0, 32) as i64 - 16).clamp(0, 0xffff) as u16,
    }
}

fn put16(b: &mut [u8], at: usize, v: u16) {
    if at + 2 <= b.len() {
        b[at..at + 2].copy_from_slice(&v.to_be_bytes());
    }
}

/// One structure-aware mutation.
fn mutate(rng: &mut Rng, f: &mut Frame) {
    let len = f.bytes.len();
    // The headers: L2, L3, L4 and a quoted IPv6 header with its ports.
    let hdr_end = (f.l4 + 96).min(len);
    match rng.below(15) {
        0 | 1 => {
            let end = if rng.chance(75) { hdr_end } else { len };
            for _ in 0..rng.range(1, 4) {
                let i = rng.below(end);
                f.bytes[i] ^= 1 << rng.below(8);
            }
        }
        2 => {
            let i = rng.below(hdr_end);
            let any = rng.u8();
            f.bytes[i] = rng.pick(&[0, 0xff, 0x7f, 0x80, 1, any]);
        }
        3 => {
            // IPv4 total length or IPv6 payload length.
            let l3_now = len.saturating_sub(f.l3);
            if f.v6 {
                let v = edgy16(rng, l3_now.saturating_sub(40));
                put16(&mut f.bytes, f.l3 + 4, v);
            } else {
                let near = rng.pick(&[l3_now, f.l4 - f.l3, 20]);
                let v = edgy16(rng, near);
                put16(&mut f.bytes, f.l3 + 2, v);
            }
        }
        4 => {
            if f.l3 < len && !f.v6 {
                f.bytes[f.l3] = (f.bytes[f.l3] & 0xf0) | rng.below(16) as u8;
            }
        }
        5 => {
            // UDP length, or a port.
            let at = f.l4 + rng.pick(&[4, 4, 0, 2]);
            let near = len.saturating_sub(f.l4);
            let v = edgy16(rng, near);
            put16(&mut f.bytes, at, v);
        }
        6 if !f.v6 => {
            let old = f
                .bytes
                .get(f.l3 + 6..f.l3 + 8)
                .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
            let v = match rng.below(5) {
                0 => old | MF,
                1 => (old & !0x1fff) | rng.range(1, 0x1fff) as u16,
                2 => old ^ DF,
                3 => 0,
                _ => rng.u16(),
            };
            put16(&mut f.bytes, f.l3 + 6, v);
        }
        7 => {
            // The protocol: IPv4's, IPv6's, or the quoted header's.
            let any = rng.u8();
            let p = rng.pick(&[ICMP, ICMPV6, TCP, UDP, IPIP, IPV6, 44, 47, 0, any]);
            let at = match (f.v6, rng.chance(70)) {
                (false, true) => f.l3 + 9,
                (true, true) => f.l3 + 6,
                (false, false) => f.l4 + 8 + 9,
                (true, false) => f.l4 + 8 + 6,
            };
            if at < len {
                f.bytes[at] = p;
            }
        }
        8 => {
            let any = rng.u16();
            let t = rng.pick(&[ETH_IP, ETH_IPV6, ETH_VLAN, ETH_ARP, any]);
            put16(&mut f.bytes, f.l3 - 2, t);
        }
        9 => {
            let to = if rng.chance(60) {
                f.l3 + rng.below(f.l4 - f.l3 + 64)
            } else {
                rng.range(ETH_HLEN, len)
            };
            f.bytes.truncate(to.clamp(ETH_HLEN, len));
        }
        10 => {
            let n = rng.range(1, MAX_EXTEND);
            if rng.chance(70) {
                f.bytes.resize(len + n, 0);
            } else {
                f.bytes.extend(rng.bytes(n));
            }
        }
        11 => {
            if f.l3 < len {
                let any = rng.below(16) as u8;
                let v = rng.pick(&[4, 6, 0, 5, any]);
                f.bytes[f.l3] = (f.bytes[f.l3] & 0x0f) | v << 4;
            }
        }
        12 => {
            // An address: the destination, the source, or the quoted source.
            let (at, n) = match (f.v6, rng.below(3)) {
                (false, 0) => (f.l3 + 16, 4),
                (false, 1) => (f.l3 + 12, 4),
                (false, _) => (f.l4 + 8 + 12, 4),
                (true, 0) => (f.l3 + 24, 16),
                (true, 1) => (f.l3 + 8, 16),
                (true, _) => (f.l4 + 8 + 8, 16),
            };
            let addr = if n == 4 {
                dst4(rng).octets().to_vec()
            } else {
                dst6(rng).octets().to_vec()
            };
            if at + n <= len {
                f.bytes[at..at + n].copy_from_slice(&addr);
            }
        }
        _ => {
            // ICMP type and code.
            if f.l4 + 2 <= len {
                let any = rng.u8();
                f.bytes[f.l4] = rng.pick(&[0, 3, 8, 11, 128, 129, 1, 2, 135, any]);
                if rng.chance(30) {
                    f.bytes[f.l4 + 1] = rng.u8();
                }
            }
        }
    }
}

/// After mutations, often make the checksums right again, so that frames with odd lengths
/// still reach the code behind checksum checks.
fn fixup(rng: &mut Rng, f: &mut Frame) {
    let len = f.bytes.len();
    if f.l4 + 4 > len || !rng.chance(60) {
        return fix_ip(rng, f);
    }
    let l3 = &f.bytes[f.l3..];
    // The L4 end as the IP header says, within the frame.
    let end = if f.v6 {
        f.l3 + 40 + u16::from_be_bytes([l3[4], l3[5]]) as usize
    } else {
        f.l3 + u16::from_be_bytes([l3[2], l3[3]]) as usize
    }
    .min(len);
    if end >= f.l4 + 4 {
        let nh = if f.v6 { l3[6] } else { l3[9] };
        f.bytes[f.l4 + 2..f.l4 + 4].copy_from_slice(&[0, 0]);
        let msg = &f.bytes[f.l4..end];
        let c = if f.v6 && nh == ICMPV6 {
            let mut pseudo = Vec::with_capacity(40 + msg.len());
            pseudo.extend_from_slice(&f.bytes[f.l3 + 8..f.l3 + 40]);
            pseudo.extend_from_slice(&(msg.len() as u32).to_be_bytes());
            pseudo.extend_from_slice(&[0, 0, 0, ICMPV6]);
            pseudo.extend_from_slice(msg);
            checksum(&pseudo)
        } else {
            checksum(msg)
        };
        f.bytes[f.l4 + 2..f.l4 + 4].copy_from_slice(&c.to_be_bytes());
    }
    fix_ip(rng, f)
}

fn fix_ip(rng: &mut Rng, f: &mut Frame) {
    if f.v6 || f.l3 >= f.bytes.len() || !rng.chance(70) {
        return;
    }
    let hlen = (f.bytes[f.l3] & 0x0f) as usize * 4;
    if hlen < 20 || f.l3 + hlen > f.bytes.len() {
        return;
    }
    f.bytes[f.l3 + 10..f.l3 + 12].copy_from_slice(&[0, 0]);
    let c = checksum(&f.bytes[f.l3..f.l3 + hlen]);
    f.bytes[f.l3 + 10..f.l3 + 12].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    #[test]
    fn frames_are_reproducible_and_bounded() {
        for i in 0..2000 {
            let f = super::frame(42, i);
            assert_eq!(f, super::frame(42, i));
            assert!(f.len() >= 14, "frame {i}: {} bytes", f.len());
            assert!(
                f.len() <= 1600 + 18 + 8 * 64,
                "frame {i}: {} bytes",
                f.len()
            );
        }
    }
}
