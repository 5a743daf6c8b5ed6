//! ICMP: echo replies for VIPs, errors about VIP flows sent to the flow's backend, and
//! fragmentation-needed / packet-too-big answers for packets too big to encapsulate.
//!
//! Only ICMP of the packet's own family is handled (ICMPv4 in IPv4, ICMPv6 in IPv6); the
//! other pairing is passed like any protocol the balancer does not handle. Only well-formed
//! echo requests are answered: checksums right (IPv4 header, ICMP), or the request is dropped
//! as malformed, as the kernel would drop it.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{Config, FAMILY_V4, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP, stat};
use lb_ebpf::{
    csum,
    parse::{
        self, ETH_P_IP, ETH_P_IPV6, IPV4_HLEN, IPV6_HLEN, IcmpHdr, Ipv4Hdr, Ipv6Hdr, Packet, Ports,
        ptr_at,
    },
};

use crate::{encap, lookup, stats};

const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_FRAG_NEEDED: u8 = 4;
const ICMP_ECHO: u8 = 8;
const ICMPV6_DEST_UNREACH: u8 = 1;
const ICMPV6_PKT_TOOBIG: u8 = 2;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
const ICMP_HLEN: usize = 8;
/// Bytes of the offending packet quoted in a fragmentation-needed message: the largest IPv4
/// header (60) plus the 8 bytes RFC 792 asks for.
const V4_QUOTE: usize = 68;
/// Bytes quoted in a packet-too-big message: the IPv6 header plus enough of the transport
/// header for the sender to find its socket.
const V6_QUOTE: usize = 128;
const REPLY_TTL: u8 = 64;

/// Handles an ICMP or ICMPv6 packet (never a fragment). A function of its own (a BPF
/// subprogram) so its stack is not added to the TCP/UDP path's.
#[inline(never)]
pub fn handle(ctx: &XdpContext, pkt: &Packet, cfg: &Config) -> Result<u32, ()> {
    let Some(icmp) = ptr_at::<IcmpHdr>(ctx, pkt.l4_off) else {
        return Ok(crate::not_handled(ctx, pkt));
    };
    let ty = unsafe { (*icmp).ty };
    if pkt.flow.family == FAMILY_V4 {
        if pkt.flow.proto != PROTO_ICMP {
            return Ok(crate::not_handled(ctx, pkt));
        }
        match ty {
            ICMP_ECHO => echo(ctx, pkt, ICMP_ECHO_REPLY),
            ICMP_DEST_UNREACH => error(ctx, pkt, cfg),
            _ => Ok(crate::not_handled(ctx, pkt)),
        }
    } else {
        if pkt.flow.proto != PROTO_ICMPV6 {
            return Ok(crate::not_handled(ctx, pkt));
        }
        match ty {
            ICMPV6_ECHO_REQUEST => echo(ctx, pkt, ICMPV6_ECHO_REPLY),
            ICMPV6_DEST_UNREACH | ICMPV6_PKT_TOOBIG => error(ctx, pkt, cfg),
            _ => Ok(crate::not_handled(ctx, pkt)),
        }
    }
}

/// Answers an echo request to a VIP address in place: drop bytes after the IP packet, swap
/// MACs and addresses, new TTL, new type, checksums updated incrementally (the request's
/// were checked first, so the reply's are right).
#[inline(always)]
fn echo(ctx: &XdpContext, pkt: &Packet, reply: u8) -> Result<u32, ()> {
    if !lookup::is_vip_addr(&pkt.flow) {
        return Ok(crate::not_handled(ctx, pkt));
    }
    if !checksums_ok(ctx, pkt) {
        stats::global(stat::DROP_MALFORMED, pkt.l3_len);
        return Ok(xdp_action::XDP_DROP);
    }
    encap::trim_to(ctx, pkt.l3_off + pkt.l3_len)?;
    let mut l2 = encap::read_l2(ctx, pkt)?;
    core::mem::swap(&mut l2.src, &mut l2.dst);
    let ethertype = if pkt.flow.family == FAMILY_V4 {
        ETH_P_IP
    } else {
        ETH_P_IPV6
    };
    encap::write_l2(ctx, pkt.l3_off, &l2, ethertype)?;
    if pkt.flow.family == FAMILY_V4 {
        let ip = ptr_at::<Ipv4Hdr>(ctx, pkt.l3_off).ok_or(())?;
        unsafe {
            let old = u16::from_ne_bytes([(*ip).ttl, (*ip).proto]);
            (*ip).ttl = REPLY_TTL;
            let new = u16::from_ne_bytes([REPLY_TTL, (*ip).proto]);
            (*ip).check = csum::replace16((*ip).check, old, new);
            core::mem::swap(&mut (*ip).src, &mut (*ip).dst);
        }
    } else {
        let ip = ptr_at::<Ipv6Hdr>(ctx, pkt.l3_off).ok_or(())?;
        unsafe {
            (*ip).hop_limit = REPLY_TTL;
            core::mem::swap(&mut (*ip).src, &mut (*ip).dst);
        }
    }
    let icmp = ptr_at::<IcmpHdr>(ctx, pkt.l4_off).ok_or(())?;
    unsafe {
        let old = u16::from_ne_bytes([(*icmp).ty, (*icmp).code]);
        (*icmp).ty = reply;
        let new = u16::from_ne_bytes([reply, (*icmp).code]);
        // The pseudo-header of ICMPv6 holds both addresses; swapping them keeps the sum.
        let mut check = csum::replace16((*icmp).check, old, new);
        // An ICMPv4 reply of zeros only (identifier, sequence, data) sums to +0, which the
        // incremental update turns into 0x0000, a wrong checksum; 0xffff is right then, and
        // right whenever 0x0000 is (RFC 1624, section 3). ICMPv6 sums addresses too.
        if reply == ICMP_ECHO_REPLY && check == 0 {
            check = 0xffff;
        }
        (*icmp).check = check;
    }
    stats::global(stat::ICMP_ECHO_REPLY, pkt.l3_len);
    Ok(xdp_action::XDP_TX)
}

/// Whether an echo request's checksums are right: the IPv4 header's, and the ICMP message's
/// (over the IPv6 pseudo-header for ICMPv6). `parse` checked that the IP length fits the
/// frame and covers the ICMP header. A subprogram of its own, so that its locals stay out of
/// `handle`'s stack frame (main, `handle` and its callees share 512 bytes).
#[inline(never)]
fn checksums_ok(ctx: &XdpContext, pkt: &Packet) -> bool {
    let msg_len = pkt.l3_off + pkt.l3_len - pkt.l4_off;
    let Some(msg) = csum::sum_range(ctx, pkt.l4_off, msg_len) else {
        return false;
    };
    if pkt.flow.family == FAMILY_V4 {
        let hdr = csum::sum_ipv4_header(ctx, pkt.l3_off, pkt.l4_off - pkt.l3_off);
        hdr.is_some_and(|h| csum::fold(h) == 0) && csum::fold(msg) == 0
    } else {
        let mut sum = csum::add_addr(msg, &pkt.flow.src);
        sum = csum::add_addr(sum, &pkt.flow.dst);
        sum = csum::add32(sum, (msg_len as u32).to_be());
        sum = csum::add32(sum, (PROTO_ICMPV6 as u32).to_be());
        csum::fold(sum) == 0
    }
}

/// An ICMP error to a VIP address about a packet a backend sent from a VIP: the quoted header
/// is the reply (VIP -> client), so the client's flow is the quote reversed. The error goes to
/// the backend that owns that flow. The quote is read only inside the IP packet.
#[inline(always)]
fn error(ctx: &XdpContext, pkt: &Packet, cfg: &Config) -> Result<u32, ()> {
    if !lookup::is_vip_addr(&pkt.flow) {
        return Ok(crate::not_handled(ctx, pkt));
    }
    let end = pkt.l3_off + pkt.l3_len;
    let quote = pkt.l4_off + ICMP_HLEN;
    let mut flow;
    let l4_off;
    if pkt.flow.family == FAMILY_V4 {
        let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, quote).filter(|_| quote + IPV4_HLEN <= end) else {
            return Ok(crate::not_handled(ctx, pkt));
        };
        let ip = unsafe { *ip };
        let ihl = (ip.vihl & 0x0f) as usize;
        if ihl < 5 {
            return Ok(crate::not_handled(ctx, pkt));
        }
        flow = parse::v4_key(ip.dst, ip.src, ip.proto);
        l4_off = quote + ihl * 4;
    } else {
        let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, quote).filter(|_| quote + IPV6_HLEN <= end) else {
            return Ok(crate::not_handled(ctx, pkt));
        };
        let ip = unsafe { *ip };
        flow = parse::v6_key(ip.dst, ip.src, ip.nexthdr);
        l4_off = quote + IPV6_HLEN;
    }
    if flow.proto != PROTO_TCP && flow.proto != PROTO_UDP {
        return Ok(crate::not_handled(ctx, pkt));
    }
    let Some(ports) = ptr_at::<Ports>(ctx, l4_off).filter(|_| l4_off + 4 <= end) else {
        return Ok(crate::not_handled(ctx, pkt));
    };
    flow.sport = unsafe { (*ports).dst };
    flow.dport = unsafe { (*ports).src };
    let Some(vip) = lookup::map_vip(&flow) else {
        return Ok(crate::not_handled(ctx, pkt));
    };
    stats::global(stat::ICMP_ERROR_FWD, pkt.l3_len);
    crate::forward(ctx, pkt, &flow, &vip, cfg, crate::Reply::Drop)
}

/// Answers a packet that is too big to encapsulate with fragmentation-needed (IPv4, only when
/// DF is set; otherwise it is dropped) or packet-too-big (IPv6), advertising `mtu`: what the
/// sender may send so that it still fits once encapsulated.
#[inline(never)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: usize) -> Result<u32, ()> {
    if !pkt.df {
        stats::global(stat::DROP_TOO_BIG, pkt.l3_len);
        return Ok(xdp_action::XDP_DROP);
    }
    stats::global(stat::ICMP_TOO_BIG_SENT, pkt.l3_len);
    let mut l2 = encap::read_l2(ctx, pkt)?;
    core::mem::swap(&mut l2.src, &mut l2.dst);
    if pkt.flow.family == FAMILY_V4 {
        too_big_v4(ctx, pkt, &l2, mtu)
    } else {
        too_big_v6(ctx, pkt, &l2, mtu)
    }
}

#[inline(never)]
fn too_big_v4(ctx: &XdpContext, pkt: &Packet, l2: &encap::L2, mtu: usize) -> Result<u32, ()> {
    let l3 = pkt.l3_off;
    encap::grow_head(ctx, IPV4_HLEN + ICMP_HLEN)?;
    encap::trim_to(ctx, l3 + IPV4_HLEN + ICMP_HLEN + V4_QUOTE)?;
    encap::write_l2(ctx, l3, l2, ETH_P_IP)?;
    let mtu = (mtu as u16).to_be_bytes();
    let mut icmp = IcmpHdr {
        ty: ICMP_DEST_UNREACH,
        code: ICMP_FRAG_NEEDED,
        check: 0,
        rest: u32::from_ne_bytes([0, 0, mtu[0], mtu[1]]),
    };
    let quoted = csum::sum_packet::<V4_QUOTE>(ctx, l3 + IPV4_HLEN + ICMP_HLEN).ok_or(())?;
    icmp.check = csum::fold(csum::sum_struct(&icmp) + quoted);
    let orig = unsafe { *ptr_at::<Ipv4Hdr>(ctx, l3 + IPV4_HLEN + ICMP_HLEN).ok_or(())? };
    let mut ip = Ipv4Hdr {
        vihl: 0x45,
        tos: 0,
        tot_len: ((IPV4_HLEN + ICMP_HLEN + V4_QUOTE) as u16).to_be(),
        id: 0,
        frag_off: 0,
        ttl: REPLY_TTL,
        proto: PROTO_ICMP,
        check: 0,
        src: orig.dst,
        dst: orig.src,
    };
    ip.check = csum::fold(csum::sum_struct(&ip));
    unsafe {
        *ptr_at::<Ipv4Hdr>(ctx, l3).ok_or(())? = ip;
        *ptr_at::<IcmpHdr>(ctx, l3 + IPV4_HLEN).ok_or(())? = icmp;
    }
    Ok(xdp_action::XDP_TX)
}

#[inline(never)]
fn too_big_v6(ctx: &XdpContext, pkt: &Packet, l2: &encap::L2, mtu: usize) -> Result<u32, ()> {
    let l3 = pkt.l3_off;
    encap::grow_head(ctx, IPV6_HLEN + ICMP_HLEN)?;
    encap::trim_to(ctx, l3 + IPV6_HLEN + ICMP_HLEN + V6_QUOTE)?;
    encap::write_l2(ctx, l3, l2, ETH_P_IPV6)?;
    let orig = unsafe { *ptr_at::<Ipv6Hdr>(ctx, l3 + IPV6_HLEN + ICMP_HLEN).ok_or(())? };
    let len = (ICMP_HLEN + V6_QUOTE) as u32;
    let mut icmp = IcmpHdr {
        ty: ICMPV6_PKT_TOOBIG,
        code: 0,
        check: 0,
        rest: (mtu as u32).to_be(),
    };
    let quoted = csum::sum_packet::<V6_QUOTE>(ctx, l3 + IPV6_HLEN + ICMP_HLEN).ok_or(())?;
    let mut sum = csum::add_addr(0, &orig.src);
    sum = csum::add_addr(sum, &orig.dst);
    sum = csum::add32(sum, len.to_be());
    sum = csum::add32(sum, (PROTO_ICMPV6 as u32).to_be());
    icmp.check = csum::fold(sum + csum::sum_struct(&icmp) + quoted);
    let ip = Ipv6Hdr {
        vtcfl: (6u32 << 28).to_be(),
        payload_len: (len as u16).to_be(),
        nexthdr: PROTO_ICMPV6,
        hop_limit: REPLY_TTL,
        src: orig.dst,
        dst: orig.src,
    };
    unsafe {
        *ptr_at::<Ipv6Hdr>(ctx, l3).ok_or(())? = ip;
        *ptr_at::<IcmpHdr>(ctx, l3 + IPV6_HLEN).ok_or(())? = icmp;
    }
    Ok(xdp_action::XDP_TX)
}
