//! `maglb_probe_encap`: health probes that travel the data path.
//!
//! A tc classifier on the balancer interface's egress. The agent's probe sockets carry
//! `SO_MARK = PROBE_MARK_TAG | slot`; their packets are addressed to the VIP, and the kernel
//! routes them out of the balancer's interface. This program puts the outer headers toward
//! the backend in `BACKENDS[slot]` in front of them, exactly as the XDP balancer does for a
//! client's packet: IP-in-IP, or GUE (outer UDP to the GUE port from the flow's source port)
//! when `SETTINGS` says so; the same outer source, TTL 64, TOS and DF copied, the IPv6 flow
//! label from the inner flow, the MACs from `CONFIG` (the interface's and the next hop's).
//! The backend decapsulates, its VIP answers the balancer's address directly (DSR), and the
//! answer reaches the probe socket (the XDP program passes traffic not addressed to a VIP).
//! One difference: the XDP program answers a client's packet too big for the MTU with an
//! ICMP error; a probe's packet (a few hundred bytes at most) is never checked against it.
//!
//! `BACKENDS`, `CONFIG` and `SETTINGS` are the balancer's pinned maps (the agent loads this
//! object with their pin paths), so the probe goes to the address, and in the
//! encapsulation, the datapath itself would use. Unmarked packets pass untouched; a marked
//! packet that cannot be encapsulated is dropped (sent bare it would reach the VIP through
//! the router and the balancer, i.e. a backend the ring chooses, and prove nothing about
//! the one probed).
#![no_std]
#![no_main]
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP,
        TC_ACT_OK, TC_ACT_SHOT, bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    macros::{classifier, map},
    maps::{Array, PerCpuArray},
    programs::TcContext,
};
use lb_common::{
    BACKEND_F_IN_USE, Backend, Config, Counter, FAMILY_V4, FAMILY_V6, FlowKey, MAX_BACKENDS,
    PROBE_MARK_MASK, PROBE_MARK_TAG, PROTO_IPIP, PROTO_IPV6, PROTO_TCP, PROTO_UDP, Settings,
    probe_stat,
};
use lb_ebpf::{
    csum, hash,
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IP_DF, IP_MF, IP_OFFMASK, IPV4_HLEN, IPV6_HLEN,
        Ipv4Hdr, Ipv6Hdr, UdpHdr,
    },
};

const UDP_HLEN: usize = 8;

/// The balancer's backend slots (its pinned map). Written by user space, read here.
#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Slot 0: the balancer's configuration (its pinned map). Written by user space.
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

/// Slot 0: the balancer's runtime settings (its pinned map), for the encapsulation.
/// Written by user space.
#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// Per-CPU counters by `probe_stat::*`. Written here.
#[map]
static PROBE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(probe_stat::COUNT, 0);

#[classifier]
pub fn maglb_probe_encap(ctx: TcContext) -> i32 {
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & PROBE_MARK_MASK != PROBE_MARK_TAG {
        return TC_ACT_OK;
    }
    match encap(&ctx, mark & !PROBE_MARK_MASK) {
        Ok(()) => {
            count(probe_stat::ENCAP, ctx.len());
            TC_ACT_OK
        }
        Err(reason) => {
            count(reason, ctx.len());
            TC_ACT_SHOT
        }
    }
}

#[inline(always)]
fn count(reason: u32, bytes: u32) {
    if let Some(c) = PROBE_STATS.get_ptr_mut(reason) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

/// What the outer headers copy from the inner packet.
struct Inner {
    ethertype: u16,
    /// IPv4 TOS or IPv6 traffic class.
    tos: u8,
    df: bool,
    /// The flow as the XDP program's parser reads it (ports for TCP and UDP only, none in
    /// IPv4 fragments): the source of the flow label and of GUE's source port.
    flow: FlowKey,
}

#[inline(always)]
fn inner(ctx: &TcContext) -> Result<Inner, u32> {
    let eth: EthHdr = ctx.load(0).map_err(|_| probe_stat::FAMILY)?;
    let ethertype = u16::from_be(eth.proto);
    let mut flow = FlowKey::default();
    let (tos, df, fragment, l4_off) = match ethertype {
        ETH_P_IP => {
            let ip: Ipv4Hdr = ctx.load(ETH_HLEN).map_err(|_| probe_stat::FAMILY)?;
            let frag = u16::from_be(ip.frag_off);
            let ihl = (ip.vihl & 0x0f) as usize * 4;
            flow.src[0] = ip.src;
            flow.dst[0] = ip.dst;
            flow.proto = ip.proto;
            flow.family = FAMILY_V4;
            let fragment = frag & (IP_MF | IP_OFFMASK) != 0;
            (ip.tos, frag & IP_DF != 0, fragment, ETH_HLEN + ihl)
        }
        ETH_P_IPV6 => {
            let ip: Ipv6Hdr = ctx.load(ETH_HLEN).map_err(|_| probe_stat::FAMILY)?;
            flow.src = ip.src;
            flow.dst = ip.dst;
            flow.proto = ip.nexthdr;
            flow.family = FAMILY_V6;
            let tc = (u32::from_be(ip.vtcfl) >> 20) as u8;
            (tc, true, false, ETH_HLEN + IPV6_HLEN)
        }
        _ => return Err(probe_stat::FAMILY),
    };
    if !fragment
        && (flow.proto == PROTO_TCP || flow.proto == PROTO_UDP)
        && let Ok([sport, dport]) = ctx.load::<[u16; 2]>(l4_off)
    {
        flow.sport = sport;
        flow.dport = dport;
    }
    Ok(Inner {
        ethertype,
        tos,
        df,
        flow,
    })
}

#[inline(always)]
fn encap(ctx: &TcContext, slot: u32) -> Result<(), u32> {
    let b = match BACKENDS.get(slot) {
        Some(b) if b.flags & BACKEND_F_IN_USE != 0 => *b,
        _ => return Err(probe_stat::NO_BACKEND),
    };
    let (cfg, gue_port) = match (CONFIG.get(0), SETTINGS.get(0)) {
        (Some(c), Some(s)) if c.ready != 0 => (*c, s.gue_dport()),
        _ => return Err(probe_stat::NOT_READY),
    };
    let inner = inner(ctx)?;
    // The IP packet: everything after the Ethernet header (a socket's packet carries no
    // padding and no VLAN tag in its data).
    let l3_len = ctx.len() as usize - ETH_HLEN;
    let (outer_type, ip_len, mut flags) = match b.family {
        FAMILY_V4 if inner.ethertype == ETH_P_IP => {
            (ETH_P_IP, IPV4_HLEN, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4)
        }
        FAMILY_V6 => (ETH_P_IPV6, IPV6_HLEN, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6),
        _ => return Err(probe_stat::FAMILY),
    };
    let udp_len = if gue_port != 0 {
        flags |= BPF_F_ADJ_ROOM_ENCAP_L4_UDP;
        UDP_HLEN
    } else {
        0
    };
    ctx.adjust_room((ip_len + udp_len) as i32, BPF_ADJ_ROOM_MAC, flags as u64)
        .map_err(|_| probe_stat::ERROR)?;
    let eth = EthHdr {
        dst: cfg.nh_mac,
        src: cfg.if_mac,
        proto: outer_type.to_be(),
    };
    ctx.store(0, &eth, 0).map_err(|_| probe_stat::ERROR)?;
    let proto = if gue_port != 0 {
        PROTO_UDP
    } else if inner.ethertype == ETH_P_IP {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };
    let payload = l3_len + udp_len;
    if outer_type == ETH_P_IP {
        write_v4(ctx, &inner, &cfg, &b, proto, payload)?;
    } else {
        write_v6(ctx, &inner, &cfg, &b, proto, payload)?;
    }
    if gue_port != 0 {
        // No UDP checksum, as the XDP program sends it.
        let udp = UdpHdr {
            src: hash::gue_sport(&inner.flow).to_be(),
            dst: gue_port.to_be(),
            len: ((l3_len + UDP_HLEN) as u16).to_be(),
            check: 0,
        };
        ctx.store(ETH_HLEN + ip_len, &udp, 0)
            .map_err(|_| probe_stat::ERROR)?;
    }
    Ok(())
}

/// The outer IPv4 header, carrying `payload` bytes of `proto`.
#[inline(always)]
fn write_v4(
    ctx: &TcContext,
    inner: &Inner,
    cfg: &Config,
    b: &Backend,
    proto: u8,
    payload: usize,
) -> Result<(), u32> {
    let mut ip = Ipv4Hdr {
        vihl: 0x45,
        tos: inner.tos,
        tot_len: ((payload + IPV4_HLEN) as u16).to_be(),
        id: 0,
        frag_off: if inner.df { IP_DF.to_be() } else { 0 },
        ttl: 64,
        proto,
        check: 0,
        src: cfg.src_v4,
        dst: b.addr[0],
    };
    ip.check = csum::fold(csum::sum_struct(&ip));
    ctx.store(ETH_HLEN, &ip, 0).map_err(|_| probe_stat::ERROR)
}

/// The outer IPv6 header, carrying `payload` bytes of `proto`.
#[inline(always)]
fn write_v6(
    ctx: &TcContext,
    inner: &Inner,
    cfg: &Config,
    b: &Backend,
    proto: u8,
    payload: usize,
) -> Result<(), u32> {
    let label = hash::flow_label(&inner.flow);
    let ip = Ipv6Hdr {
        vtcfl: (6u32 << 28 | (inner.tos as u32) << 20 | label).to_be(),
        payload_len: (payload as u16).to_be(),
        nexthdr: proto,
        hop_limit: 64,
        src: cfg.src_v6,
        dst: b.addr,
    };
    ctx.store(ETH_HLEN, &ip, 0).map_err(|_| probe_stat::ERROR)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
