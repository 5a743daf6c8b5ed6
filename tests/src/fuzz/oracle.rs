//! The oracle: what the balancer may do with a frame, judged from the bytes alone.
//!
//! Written from the documented behaviour (README "What the datapath does") and the fixture
//! layout ([`LAYOUT`]), not from the datapath code; it parses with its own code and checks
//! sums with [`crate::packet::checksum`]. The rules:
//!
//! - never XDP_ABORTED (nor an action other than DROP, PASS, TX);
//! - XDP_PASS hands the frame on byte for byte;
//! - XDP_TX sends one of:
//!   - the input's IP packet (without Ethernet padding) encapsulated toward a backend of the
//!     VIP the packet addresses: TCP/UDP by (address, port, protocol) with the port-wildcard
//!     VIP as fallback; IPv4 fragments to the VIP that takes the address's fragments (the
//!     port-wildcard VIP, else the lowest port); ICMP errors sent to a VIP address to the
//!     VIP of the quoted flow, reversed;
//!   - an echo reply to a well-formed echo request of the same family sent to a VIP address;
//!   - fragmentation-needed / packet-too-big about a packet to a VIP that is too big to
//!     encapsulate, advertising the MTU minus the outer header;
//! - XDP_DROP is always allowed.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    fixture::*,
    packet::{DF, ETH_IP, ETH_IPV6, ICMP, ICMPV6, IPIP, IPV6, MF, TCP, UDP, checksum},
};

pub const ABORTED: u32 = 0;
pub const DROP: u32 = 1;
pub const PASS: u32 = 2;
pub const TX: u32 = 3;

const ETH_VLAN: u16 = 0x8100;
const OFFSET: u16 = 0x1fff;
/// Bytes quoted in the balancer's fragmentation-needed and packet-too-big messages.
const QUOTE_V4: usize = 68;
const QUOTE_V6: usize = 128;

/// What a frame turned into, when that was allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Drop,
    Pass,
    Encap,
    EchoReply,
    TooBig,
}

/// A broken rule: a short, stable kind (for counting) and what exactly was wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    pub kind: &'static str,
    pub detail: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.detail.is_empty() {
            f.write_str(self.kind)
        } else {
            write!(f, "{}: {}", self.kind, self.detail)
        }
    }
}

fn fail<T>(kind: &'static str, detail: impl Into<String>) -> Result<T, Violation> {
    Err(Violation {
        kind,
        detail: detail.into(),
    })
}

/// Judges one run: `input` gave `action` and `output`.
pub fn check(input: &[u8], action: u32, output: &[u8]) -> Result<Outcome, Violation> {
    match action {
        ABORTED => fail("aborted", "XDP_ABORTED"),
        DROP => Ok(Outcome::Drop),
        PASS if output == input => Ok(Outcome::Pass),
        PASS => fail(
            "pass changed the frame",
            format!("{} bytes in, {} out", input.len(), output.len()),
        ),
        TX => check_tx(input, output),
        a => fail("unknown action", format!("action {a}")),
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr4(b: &[u8], at: usize) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3]))
}

fn addr6(b: &[u8], at: usize) -> IpAddr {
    IpAddr::V6(Ipv6Addr::from(
        <[u8; 16]>::try_from(&b[at..at + 16]).expect("16 bytes"),
    ))
}

/// The Ethernet header, with its 802.1Q tag if there is one.
#[derive(Clone, Copy, PartialEq, Eq)]
struct L2 {
    dst: [u8; 6],
    src: [u8; 6],
    tci: Option<u16>,
    ethertype: u16,
    /// Where the IP header starts.
    l3: usize,
}

fn l2(f: &[u8]) -> Option<L2> {
    if f.len() < 14 {
        return None;
    }
    let mut l = L2 {
        dst: f[0..6].try_into().expect("6 bytes"),
        src: f[6..12].try_into().expect("6 bytes"),
        tci: None,
        ethertype: be16(f, 12),
        l3: 14,
    };
    if l.ethertype == ETH_VLAN {
        if f.len() < 18 {
            return None;
        }
        l.tci = Some(be16(f, 14));
        l.ethertype = be16(f, 16);
        l.l3 = 18;
    }
    Some(l)
}

/// An IP packet whose header is readable and whose length field fits the bytes at hand.
struct Ip<'a> {
    /// Exactly the packet, as long as its header says (padding after it left out).
    pkt: &'a [u8],
    v6: bool,
    hlen: usize,
    proto: u8,
    src: IpAddr,
    dst: IpAddr,
    /// IPv4 flags and offset (0 for IPv6).
    frag: u16,
}

impl Ip<'_> {
    fn fragment(&self) -> bool {
        self.frag & (MF | OFFSET) != 0
    }
    fn l4(&self) -> &[u8] {
        &self.pkt[self.hlen..]
    }
}

fn ip(l3: &[u8], ethertype: u16) -> Option<Ip<'_>> {
    match ethertype {
        ETH_IP => {
            if l3.len() < 20 || l3[0] >> 4 != 4 {
                return None;
            }
            let hlen = (l3[0] & 0x0f) as usize * 4;
            let len = be16(l3, 2) as usize;
            if hlen < 20 || len < hlen || len > l3.len() {
                return None;
            }
            Some(Ip {
                pkt: &l3[..len],
                v6: false,
                hlen,
                proto: l3[9],
                src: addr4(l3, 12),
                dst: addr4(l3, 16),
                frag: be16(l3, 6),
            })
        }
        ETH_IPV6 => {
            if l3.len() < 40 || l3[0] >> 4 != 6 {
                return None;
            }
            let len = 40 + be16(l3, 4) as usize;
            if len > l3.len() {
                return None;
            }
            Some(Ip {
                pkt: &l3[..len],
                v6: true,
                hlen: 40,
                proto: l3[6],
                src: addr6(l3, 8),
                dst: addr6(l3, 24),
                frag: 0,
            })
        }
        _ => None,
    }
}

/// RFC 1071 sum is right over `data` (checksum field included).
fn sum_ok(data: &[u8]) -> bool {
    checksum(data) == 0
}

/// ICMPv6 checksum right, over the pseudo-header of `src`, `dst` and the message.
fn icmp6_ok(src: &IpAddr, dst: &IpAddr, msg: &[u8]) -> bool {
    let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) else {
        return false;
    };
    let mut p = Vec::with_capacity(40 + msg.len());
    p.extend_from_slice(&s.octets());
    p.extend_from_slice(&d.octets());
    p.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    p.extend_from_slice(&[0, 0, 0, ICMPV6]);
    p.extend_from_slice(msg);
    sum_ok(&p)
}

fn is_vip_addr(a: &IpAddr) -> bool {
    LAYOUT.iter().any(|v| v.addr == *a)
}

/// The VIP of a TCP/UDP flow to `addr:port`: exact, else the port-wildcard VIP.
fn vip(addr: &IpAddr, port: u16, proto: u8) -> Option<&'static VipLayout> {
    let on = |p: u16| {
        LAYOUT
            .iter()
            .find(|v| v.addr == *addr && v.proto == proto && v.port == p)
    };
    on(port).or_else(|| on(0))
}

/// The VIP that takes IPv4 fragments to `addr` of `proto`: the port-wildcard VIP, else the
/// lowest port.
fn fragment_vip(addr: &IpAddr, proto: u8) -> Option<&'static VipLayout> {
    LAYOUT
        .iter()
        .filter(|v| v.addr == *addr && v.proto == proto)
        .min_by_key(|v| v.port)
}

/// Where a packet to a VIP may go.
struct Target {
    backends: Vec<IpAddr>,
    /// The packet is an ICMP error (never answered with one).
    icmp_error: bool,
}

/// The backends the packet `p` may be sent to, or why it addresses no VIP.
fn target(p: &Ip) -> Result<Target, Violation> {
    let icmp_error = if p.v6 {
        p.proto == ICMPV6 && matches!(p.l4().first(), Some(1 | 2))
    } else {
        p.proto == ICMP && !p.fragment() && p.l4().first() == Some(&3)
    };
    let mut vips: Vec<&VipLayout> = Vec::new();
    if icmp_error {
        // About a packet a VIP sent: the client's flow is the quoted one reversed.
        if !is_vip_addr(&p.dst) {
            return fail(
                "forwarded an ICMP error not sent to a VIP",
                format!("error to {}", p.dst),
            );
        }
        let q = &p.l4()[8.min(p.l4().len())..];
        let (qsrc, qproto, qhlen) = if p.v6 {
            if q.len() < 40 {
                return fail("forwarded an ICMP error without its quote", "quote < 40");
            }
            (addr6(q, 8), q[6], 40)
        } else {
            if q.len() < 20 || (q[0] & 0x0f) < 5 {
                return fail("forwarded an ICMP error without its quote", "quote < 20");
            }
            (addr4(q, 12), q[9], (q[0] & 0x0f) as usize * 4)
        };
        if qproto != TCP && qproto != UDP || q.len() < qhlen + 4 {
            return fail(
                "forwarded an ICMP error without a quoted TCP/UDP flow",
                format!("quoted protocol {qproto}, {} bytes quoted", q.len()),
            );
        }
        let (qsport, qdport) = (be16(q, qhlen), be16(q, qhlen + 2));
        vips.extend(vip(&qsrc, qsport, qproto));
        if qsport == 0 && qdport == 0 && !p.v6 {
            // The reversed flow has the connection-table key of a fragment flow.
            vips.extend(fragment_vip(&qsrc, qproto));
        }
    } else if p.proto != TCP && p.proto != UDP {
        return fail(
            "forwarded a protocol no VIP takes",
            format!("protocol {} to {}", p.proto, p.dst),
        );
    } else if p.fragment() {
        vips.extend(fragment_vip(&p.dst, p.proto));
    } else {
        let l4 = p.l4();
        if l4.len() < 4 {
            return fail("forwarded a packet without ports", "L4 < 4 bytes");
        }
        let (sport, dport) = (be16(l4, 0), be16(l4, 2));
        vips.extend(vip(&p.dst, dport, p.proto));
        if sport == 0 && dport == 0 && !p.v6 {
            // Ports 0/0 share the connection-table key of the address's fragment flow.
            vips.extend(fragment_vip(&p.dst, p.proto));
        }
    }
    let backends: Vec<IpAddr> = vips.iter().flat_map(|v| v.backends).copied().collect();
    if backends.is_empty() {
        return fail(
            "forwarded a packet of no VIP with backends",
            format!("protocol {} to {}", p.proto, p.dst),
        );
    }
    Ok(Target {
        backends,
        icmp_error,
    })
}

fn check_tx(input: &[u8], output: &[u8]) -> Result<Outcome, Violation> {
    let (Some(inl), Some(outl)) = (l2(input), l2(output)) else {
        return fail("tx of a frame without Ethernet header", "");
    };
    if inl.tci != outl.tci || inl.l3 != outl.l3 {
        return fail(
            "tx changed the VLAN tag",
            format!("{:?} -> {:?}", inl.tci, outl.tci),
        );
    }
    let Some(inp) = ip(&input[inl.l3..], inl.ethertype) else {
        return fail(
            "tx of a frame whose IP header is not valid",
            format!("ethertype {:#06x}", inl.ethertype),
        );
    };
    let out = &output[outl.l3..];
    let proto = match outl.ethertype {
        ETH_IP if out.len() >= 20 => out[9],
        ETH_IPV6 if out.len() >= 40 => out[6],
        t => return fail("tx of no IP packet", format!("ethertype {t:#06x}")),
    };
    match proto {
        IPIP | IPV6 => check_encap(&inp, &outl, out).map(|()| Outcome::Encap),
        ICMP | ICMPV6 => check_reply(&inl, &inp, &outl, out),
        p => fail("tx of an unexpected protocol", format!("protocol {p}")),
    }
}

/// An encapsulated packet toward a backend.
fn check_encap(inp: &Ip, outl: &L2, out: &[u8]) -> Result<(), Violation> {
    if outl.dst != NH_MAC || outl.src != IF_MAC {
        return fail(
            "encap with wrong MACs",
            format!("dst {:02x?} src {:02x?}", outl.dst, outl.src),
        );
    }
    let (hlen, proto, src, dst) = if outl.ethertype == ETH_IP {
        if out[0] != 0x45 || !sum_ok(&out[..20]) {
            return fail(
                "encap outer IPv4 header broken",
                format!("vihl {:#x}, checksum ok {}", out[0], sum_ok(&out[..20])),
            );
        }
        if be16(out, 2) as usize != out.len() {
            return fail(
                "encap outer length differs from the frame",
                format!("total length {}, {} bytes", be16(out, 2), out.len()),
            );
        }
        let frag = be16(out, 6);
        if frag & (MF | OFFSET) != 0 || (!inp.v6 && frag & DF != inp.frag & DF) {
            return fail("encap outer fragment bits", format!("{frag:#06x}"));
        }
        (20, out[9], addr4(out, 12), addr4(out, 16))
    } else {
        if out[0] >> 4 != 6 || 40 + be16(out, 4) as usize != out.len() {
            return fail(
                "encap outer length differs from the frame",
                format!("payload length {}, {} bytes", be16(out, 4), out.len()),
            );
        }
        (40, out[6], addr6(out, 8), addr6(out, 24))
    };
    let want_src: IpAddr = if hlen == 20 {
        SRC_V4.into()
    } else {
        SRC_V6.into()
    };
    let want_proto = if inp.v6 { IPV6 } else { IPIP };
    if src != want_src || proto != want_proto {
        return fail(
            "encap outer source or protocol",
            format!("src {src}, protocol {proto}"),
        );
    }
    if &out[hlen..] != inp.pkt {
        return fail(
            "encap inner packet differs from the input",
            format!(
                "{} bytes inner, {} bytes input packet",
                out.len() - hlen,
                inp.pkt.len()
            ),
        );
    }
    let t = target(inp)?;
    if !t.backends.contains(&dst) {
        return fail(
            "encap to a backend not of the packet's VIP",
            format!("to {dst}, allowed {:?}", t.backends),
        );
    }
    Ok(())
}

/// An ICMP message the balancer answered with itself: echo reply or too-big.
fn check_reply(inl: &L2, inp: &Ip, outl: &L2, out: &[u8]) -> Result<Outcome, Violation> {
    if outl.dst != inl.src || outl.src != inl.dst || outl.ethertype != inl.ethertype {
        return fail(
            "reply with wrong L2 header",
            "MACs not swapped or ethertype",
        );
    }
    let v6 = outl.ethertype == ETH_IPV6;
    let proto = if v6 { out[6] } else { out[9] };
    if proto != if v6 { ICMPV6 } else { ICMP } {
        return fail(
            "ICMP reply of the other family",
            format!(
                "IPv{} packet with protocol {proto}, type {:?}",
                if v6 { 6 } else { 4 },
                out.get(if v6 { 40 } else { 20 })
            ),
        );
    }
    let hlen = if v6 { 40 } else { (out[0] & 0x0f) as usize * 4 };
    let ty = out.get(hlen).copied();
    match (v6, ty) {
        (false, Some(0)) | (true, Some(129)) => check_echo(inp, out).map(|()| Outcome::EchoReply),
        (false, Some(3)) | (true, Some(2)) => check_too_big(inp, out).map(|()| Outcome::TooBig),
        _ => fail("reply of an unexpected ICMP type", format!("type {ty:?}")),
    }
}

/// An echo reply: to a valid echo request of the same family to a VIP address, with the
/// request's identifier, sequence and data, and right lengths and checksums.
fn check_echo(req: &Ip, out: &[u8]) -> Result<(), Violation> {
    let msg = req.l4();
    if req.v6 {
        if req.proto != ICMPV6 || msg.first() != Some(&128) {
            return fail(
                "echo reply to no ICMPv6 echo request",
                format!("protocol {}, type {:?}", req.proto, msg.first()),
            );
        }
        if !icmp6_ok(&req.src, &req.dst, msg) {
            return fail("echo reply to a request with a bad ICMP checksum", "");
        }
    } else {
        if req.proto != ICMP || msg.first() != Some(&8) || req.fragment() {
            return fail(
                "echo reply to no ICMP echo request",
                format!(
                    "protocol {}, type {:?}, frag {:#x}",
                    req.proto,
                    msg.first(),
                    req.frag
                ),
            );
        }
        if !sum_ok(&req.pkt[..req.hlen]) {
            return fail(
                "echo reply to a request with a bad IPv4 header checksum",
                "",
            );
        }
        if msg.len() < 8 || !sum_ok(msg) {
            return fail("echo reply to a request with a bad ICMP checksum", "");
        }
    }
    if !is_vip_addr(&req.dst) {
        return fail("echo reply for no VIP address", format!("to {}", req.dst));
    }
    // The reply itself.
    let ethertype = if req.v6 { ETH_IPV6 } else { ETH_IP };
    let Some(rep) = ip(out, ethertype) else {
        return fail(
            "echo reply IP length differs from the frame",
            "length field beyond the frame",
        );
    };
    if rep.pkt.len() != out.len() {
        return fail(
            "echo reply IP length differs from the frame",
            format!(
                "IP length {}, L3 bytes {} (trailing bytes kept)",
                rep.pkt.len(),
                out.len()
            ),
        );
    }
    if !req.v6 && !sum_ok(&out[..rep.hlen]) {
        return fail("echo reply with a bad IPv4 header checksum", "");
    }
    let ok = if req.v6 {
        icmp6_ok(&rep.src, &rep.dst, rep.l4())
    } else {
        sum_ok(rep.l4())
    };
    if !ok {
        return fail("echo reply with a bad ICMP checksum", "");
    }
    if rep.src != req.dst || rep.dst != req.src {
        return fail("echo reply addresses not swapped", "");
    }
    let body = |m: &[u8]| (m.get(1).copied(), m.get(4..).map(<[u8]>::to_vec));
    if rep.pkt.len() != req.pkt.len() || body(rep.l4()) != body(msg) || rep.hlen != req.hlen {
        return fail(
            "echo reply body differs from the request",
            format!("{} bytes, request {}", rep.pkt.len(), req.pkt.len()),
        );
    }
    Ok(())
}

/// Fragmentation needed / packet too big about `inp`, which must be a packet to a VIP too
/// big to encapsulate (and, for IPv4, with DF set).
fn check_too_big(inp: &Ip, out: &[u8]) -> Result<(), Violation> {
    let t = match target(inp) {
        Ok(t) if !t.icmp_error => t,
        Ok(_) => return fail("too-big reply to an ICMP error", ""),
        Err(v) => return fail("too-big reply to a packet of no VIP", v.detail),
    };
    if !inp.v6 && inp.frag & DF == 0 {
        return fail("frag-needed for a packet without DF", "");
    }
    let (quote, len) = if inp.v6 {
        (QUOTE_V6, 40 + 8 + QUOTE_V6)
    } else {
        (QUOTE_V4, 20 + 8 + QUOTE_V4)
    };
    let ethertype = if inp.v6 { ETH_IPV6 } else { ETH_IP };
    let rep = match ip(out, ethertype) {
        Some(r) if r.pkt.len() == out.len() && out.len() == len => r,
        _ => {
            return fail(
                "too-big reply length",
                format!("{} L3 bytes, want {len}", out.len()),
            );
        }
    };
    let msg = rep.l4();
    let ok = if inp.v6 {
        icmp6_ok(&rep.src, &rep.dst, msg)
    } else {
        out[0] == 0x45 && sum_ok(&out[..20]) && sum_ok(msg)
    };
    if !ok {
        return fail("too-big reply with a bad checksum", "");
    }
    // IPv4 keeps the MTU in the low 16 bits (the high ones are unused, 0).
    let (code, mtu) = (msg[1], u32::from_be_bytes([msg[4], msg[5], msg[6], msg[7]]));
    let want_code = if inp.v6 { 0 } else { 4 };
    let allowed: Vec<u32> = t
        .backends
        .iter()
        .map(|b| MTU as u32 - if b.is_ipv4() { 20 } else { 40 })
        .collect();
    if code != want_code || !allowed.contains(&mtu) || inp.pkt.len() as u32 <= mtu {
        return fail(
            "too-big reply with a wrong code or MTU",
            format!(
                "code {code}, MTU {mtu} (allowed {allowed:?}), packet {}",
                inp.pkt.len()
            ),
        );
    }
    if rep.src != inp.dst || rep.dst != inp.src || msg[8..] != inp.pkt[..quote] {
        return fail("too-big reply addresses or quote", "");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! The oracle against hand-made outputs: it must accept what the packet fixtures expect,
    //! and catch each defect the first fuzzing run found.
    use super::*;
    use crate::packet::{SYN, V4, eth, icmp4, ipv4, ipv6, tcp4};

    fn to_lb(l3: &[u8], t: u16) -> Vec<u8> {
        eth(IF_MAC, CLIENT_MAC, t, l3)
    }

    fn echo4() -> Vec<u8> {
        ipv4(
            V4::new(CLIENT, VIP, ICMP),
            &[],
            &icmp4(8, 0, [0, 1, 0, 2], b"abcdefgh"),
        )
    }

    fn reply4() -> Vec<u8> {
        let mut r = V4::new(VIP, CLIENT, ICMP);
        r.ttl = 64;
        ipv4(r, &[], &icmp4(0, 0, [0, 1, 0, 2], b"abcdefgh"))
    }

    fn from_lb(l3: &[u8], t: u16) -> Vec<u8> {
        eth(CLIENT_MAC, IF_MAC, t, l3)
    }

    #[test]
    fn accepts_right_answers() {
        let req = to_lb(&echo4(), ETH_IP);
        let rep = from_lb(&reply4(), ETH_IP);
        assert_eq!(check(&req, TX, &rep), Ok(Outcome::EchoReply));
        assert_eq!(check(&req, PASS, &req), Ok(Outcome::Pass));
        assert_eq!(check(&req, DROP, &[]), Ok(Outcome::Drop));

        let syn = ipv4(
            V4::new(CLIENT, VIP, TCP),
            &[],
            &tcp4(CLIENT, VIP, 1000, 80, SYN, &[]),
        );
        let mut padded = to_lb(&syn, ETH_IP);
        padded.resize(80, 0);
        let mut outer = V4::new(SRC_V4, B1, IPIP);
        outer.id = 0;
        let enc = eth(NH_MAC, IF_MAC, ETH_IP, &ipv4(outer, &[], &syn));
        assert_eq!(check(&padded, TX, &enc), Ok(Outcome::Encap));
        let wrong = eth(
            NH_MAC,
            IF_MAC,
            ETH_IP,
            &ipv4(V4::new(SRC_V4, B2, IPIP), &[], &syn),
        );
        assert_eq!(
            check(&padded, TX, &wrong).unwrap_err().kind,
            "encap to a backend not of the packet's VIP"
        );
    }

    #[test]
    fn catches_the_defects_of_the_first_run() {
        // ICMPv4 echo reply inside IPv6.
        let req6 = ipv6(CLIENT6, VIP6, ICMP, 0, 0, &icmp4(8, 0, [0; 4], b"x"));
        let rep6 = ipv6(VIP6, CLIENT6, ICMP, 0, 0, &icmp4(0, 0, [0; 4], b"x"));
        let v = check(&to_lb(&req6, ETH_IPV6), TX, &from_lb(&rep6, ETH_IPV6));
        assert_eq!(v.unwrap_err().kind, "ICMP reply of the other family");

        // A request with a bad ICMP checksum, answered (the reply's is bad too).
        let mut bad = echo4();
        bad[22] ^= 1;
        let mut rep = reply4();
        rep[22] ^= 1;
        let v = check(&to_lb(&bad, ETH_IP), TX, &from_lb(&rep, ETH_IP));
        assert_eq!(
            v.unwrap_err().kind,
            "echo reply to a request with a bad ICMP checksum"
        );

        // A bad IPv4 header checksum kept in the reply.
        let mut bad = echo4();
        bad[10] ^= 1;
        let mut rep = reply4();
        rep[10] ^= 1;
        let v = check(&to_lb(&bad, ETH_IP), TX, &from_lb(&rep, ETH_IP));
        assert_eq!(
            v.unwrap_err().kind,
            "echo reply to a request with a bad IPv4 header checksum"
        );

        // Trailing bytes kept in the reply.
        let mut req = to_lb(&echo4(), ETH_IP);
        req.extend_from_slice(&[0; 6]);
        let mut rep = from_lb(&reply4(), ETH_IP);
        rep.extend_from_slice(&[0; 6]);
        let v = check(&req, TX, &rep);
        assert_eq!(
            v.unwrap_err().kind,
            "echo reply IP length differs from the frame"
        );

        assert_eq!(check(&req, ABORTED, &req).unwrap_err().kind, "aborted");
        let mut changed = req.clone();
        changed[20] ^= 1;
        assert_eq!(
            check(&req, PASS, &changed).unwrap_err().kind,
            "pass changed the frame"
        );
    }
}
