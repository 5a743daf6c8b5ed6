//! Encapsulation toward the backend: IPv4-in-IPv4, IPv6-in-IPv6, IPv4-in-IPv6; or, with
//! `ENCAP_GUE`, the same outer headers followed by a UDP header (GUE variant 1: the inner IP
//! packet follows the UDP header directly), whose source port carries per-flow entropy so
//! that a backend's NIC spreads flows over its receive queues (RSS).

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{Backend, Config, FAMILY_V4, FAMILY_V6, PROTO_IPIP, PROTO_IPV6, PROTO_UDP};
use lb_ebpf::{
    csum, hash,
    parse::{
        ETH_HLEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, EthHdr, IP_DF, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr,
        Ipv6Hdr, Packet, UdpHdr, VlanHdr, ptr_at,
    },
};

const UDP_HLEN: usize = 8;

/// Bytes the outer headers add for this backend (`gue_port`: `Settings::gue_dport`).
#[inline(always)]
pub fn overhead(b: &Backend, gue_port: u16) -> usize {
    let ip = if b.family == FAMILY_V4 {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    };
    if gue_port != 0 { ip + UDP_HLEN } else { ip }
}

/// The L2 header of the frame as received: what a rewrite keeps.
#[derive(Clone, Copy)]
pub struct L2 {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// 802.1Q TCI (network order) when `l3_off` is 18.
    pub tci: u16,
}

#[inline(always)]
pub fn read_l2(ctx: &XdpContext, pkt: &Packet) -> Result<L2, ()> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    let mut l2 = L2 {
        dst: unsafe { (*eth).dst },
        src: unsafe { (*eth).src },
        tci: 0,
    };
    if pkt.l3_off != ETH_HLEN {
        let vlan = ptr_at::<VlanHdr>(ctx, ETH_HLEN).ok_or(())?;
        l2.tci = unsafe { (*vlan).tci };
    }
    Ok(l2)
}

/// Writes the L2 header (with the VLAN tag when `l3_off` is 18) at the start of the frame.
#[inline(always)]
pub fn write_l2(ctx: &XdpContext, l3_off: usize, l2: &L2, ethertype: u16) -> Result<(), ()> {
    let eth = ptr_at::<EthHdr>(ctx, 0).ok_or(())?;
    unsafe {
        (*eth).dst = l2.dst;
        (*eth).src = l2.src;
    }
    if l3_off == ETH_HLEN {
        unsafe { (*eth).proto = ethertype.to_be() };
    } else {
        let vlan = ptr_at::<VlanHdr>(ctx, ETH_HLEN).ok_or(())?;
        unsafe {
            (*eth).proto = ETH_P_8021Q.to_be();
            (*vlan).tci = l2.tci;
            (*vlan).proto = ethertype.to_be();
        }
    }
    Ok(())
}

/// Drops bytes after the IP packet (Ethernet padding), so the outer length is exact.
#[inline(always)]
pub fn trim_to(ctx: &XdpContext, len: usize) -> Result<(), ()> {
    let frame = ctx.data_end() - ctx.data();
    if frame > len {
        let delta = (len as i64 - frame as i64) as i32;
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
            return Err(());
        }
    }
    Ok(())
}

/// Grows the head of the frame by `bytes`.
#[inline(always)]
pub fn grow_head(ctx: &XdpContext, bytes: usize) -> Result<(), ()> {
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(bytes as i32)) } != 0 {
        return Err(());
    }
    Ok(())
}

/// Puts the outer headers toward `b` in front of the packet's IP header (with a UDP header
/// to `gue_port` unless it is 0) and sets the MACs for the next hop. The caller checked that
/// the families fit and the size is within the MTU.
///
/// Inlined into each path: as a subprogram it cost a call and a return on every forwarded
/// packet, about 10 ns (measured on a CPU whose returns go through the kernel's safe-return
/// thunk). Few values live across its helper calls, so it adds little to the ICMP path's
/// stack (entry and `icmp::handle`), which must fit in 512 bytes.
#[inline(always)]
pub fn encap(
    ctx: &XdpContext,
    pkt: &Packet,
    b: &Backend,
    cfg: &Config,
    gue_port: u16,
) -> Result<(), ()> {
    // Only the VLAN tag is kept from the received L2 header; the MACs come from the config.
    let tci = if pkt.l3_off != ETH_HLEN {
        let vlan = ptr_at::<VlanHdr>(ctx, ETH_HLEN).ok_or(())?;
        unsafe { (*vlan).tci }
    } else {
        0
    };
    trim_to(ctx, pkt.l3_off + pkt.l3_len)?;
    let gue = gue_port != 0;
    let udp_len = if gue { UDP_HLEN } else { 0 };
    let inner_proto = if gue {
        PROTO_UDP
    } else if pkt.flow.family == FAMILY_V4 {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };
    // Headers are written in place, field by field: built on the stack first, they would
    // cost stack space this subprogram shares with the ICMP path.
    let ip_len;
    if b.family == FAMILY_V4 {
        ip_len = IPV4_HLEN;
        grow_head(ctx, IPV4_HLEN + udp_len)?;
        let l2 = L2 {
            dst: cfg.nh_mac,
            src: cfg.if_mac,
            tci,
        };
        write_l2(ctx, pkt.l3_off, &l2, ETH_P_IP)?;
        let ip = ptr_at::<Ipv4Hdr>(ctx, pkt.l3_off).ok_or(())?;
        let tot_len = ((pkt.l3_len + IPV4_HLEN + udp_len) as u16).to_be();
        let frag_off = if pkt.df { IP_DF.to_be() } else { 0 };
        let vihl_tos = u16::from_ne_bytes([0x45, pkt.tos]);
        let ttl_proto = u16::from_ne_bytes([64, inner_proto]);
        let mut sum = vihl_tos as u64 + tot_len as u64 + frag_off as u64 + ttl_proto as u64;
        sum = csum::add32(sum, cfg.src_v4);
        sum = csum::add32(sum, b.addr[0]);
        unsafe {
            (*ip).vihl = 0x45;
            (*ip).tos = pkt.tos;
            (*ip).tot_len = tot_len;
            (*ip).id = 0;
            (*ip).frag_off = frag_off;
            (*ip).ttl = 64;
            (*ip).proto = inner_proto;
            (*ip).check = csum::fold(sum);
            (*ip).src = cfg.src_v4;
            (*ip).dst = b.addr[0];
        }
    } else if b.family == FAMILY_V6 {
        ip_len = IPV6_HLEN;
        grow_head(ctx, IPV6_HLEN + udp_len)?;
        let l2 = L2 {
            dst: cfg.nh_mac,
            src: cfg.if_mac,
            tci,
        };
        write_l2(ctx, pkt.l3_off, &l2, ETH_P_IPV6)?;
        // The flow label carries flow entropy for ECMP between here and the backends.
        let label = hash::flow_label(&pkt.flow);
        let ip = ptr_at::<Ipv6Hdr>(ctx, pkt.l3_off).ok_or(())?;
        unsafe {
            (*ip).vtcfl = (6u32 << 28 | (pkt.tos as u32) << 20 | label).to_be();
            (*ip).payload_len = ((pkt.l3_len + udp_len) as u16).to_be();
            (*ip).nexthdr = inner_proto;
            (*ip).hop_limit = 64;
            (*ip).src = cfg.src_v6;
            (*ip).dst = b.addr;
        }
    } else {
        return Err(());
    }
    if gue {
        // No UDP checksum (0): allowed for IPv4, and for IPv6 tunnels by RFC 6935 / 6936; the
        // inner packet keeps its own checksums.
        let udp = ptr_at::<UdpHdr>(ctx, pkt.l3_off + ip_len).ok_or(())?;
        unsafe {
            (*udp).src = hash::gue_sport(&pkt.flow).to_be();
            (*udp).dst = gue_port.to_be();
            (*udp).len = ((pkt.l3_len + UDP_HLEN) as u16).to_be();
            (*udp).check = 0;
        }
    }
    Ok(())
}
