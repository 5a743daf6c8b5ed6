//! Encapsulation toward the backend: IPv4-in-IPv4, IPv6-in-IPv6, IPv4-in-IPv6.

use aya_ebpf::{
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{Backend, Config, FAMILY_V4, FAMILY_V6, PROTO_IPIP, PROTO_IPV6};
use lb_ebpf::{
    csum,
    parse::{
        ETH_HLEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, EthHdr, IP_DF, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr,
        Ipv6Hdr, Packet, VlanHdr, ptr_at,
    },
};

/// Bytes the outer header adds for this backend.
#[inline(always)]
pub fn overhead(b: &Backend) -> usize {
    if b.family == FAMILY_V4 {
        IPV4_HLEN
    } else {
        IPV6_HLEN
    }
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

/// Puts an outer IP header toward `b` in front of the packet's IP header and sets the MACs
/// for the next hop. The caller checked that the families fit and the size is within the MTU.
#[inline(never)]
pub fn encap(ctx: &XdpContext, pkt: &Packet, b: &Backend, cfg: &Config) -> Result<(), ()> {
    let mut l2 = read_l2(ctx, pkt)?;
    l2.dst = cfg.nh_mac;
    l2.src = cfg.if_mac;
    trim_to(ctx, pkt.l3_off + pkt.l3_len)?;
    let inner_proto = if pkt.flow.family == FAMILY_V4 {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };
    if b.family == FAMILY_V4 {
        grow_head(ctx, IPV4_HLEN)?;
        write_l2(ctx, pkt.l3_off, &l2, ETH_P_IP)?;
        let mut ip = Ipv4Hdr {
            vihl: 0x45,
            tos: pkt.tos,
            tot_len: ((pkt.l3_len + IPV4_HLEN) as u16).to_be(),
            id: 0,
            frag_off: if pkt.df { IP_DF.to_be() } else { 0 },
            ttl: 64,
            proto: inner_proto,
            check: 0,
            src: cfg.src_v4,
            dst: b.addr[0],
        };
        ip.check = csum::fold(csum::sum_struct(&ip));
        let out = ptr_at::<Ipv4Hdr>(ctx, pkt.l3_off).ok_or(())?;
        unsafe { *out = ip };
    } else if b.family == FAMILY_V6 {
        grow_head(ctx, IPV6_HLEN)?;
        write_l2(ctx, pkt.l3_off, &l2, ETH_P_IPV6)?;
        // The flow label carries flow entropy for ECMP between here and the backends.
        let f = &pkt.flow;
        let label = (f.src[3] ^ f.src[0] ^ (f.sport as u32) << 4 ^ f.dport as u32) & 0xf_ffff;
        let ip = Ipv6Hdr {
            vtcfl: (6u32 << 28 | (pkt.tos as u32) << 20 | label).to_be(),
            payload_len: (pkt.l3_len as u16).to_be(),
            nexthdr: inner_proto,
            hop_limit: 64,
            src: cfg.src_v6,
            dst: b.addr,
        };
        let out = ptr_at::<Ipv6Hdr>(ctx, pkt.l3_off).ok_or(())?;
        unsafe { *out = ip };
    } else {
        return Err(());
    }
    Ok(())
}
