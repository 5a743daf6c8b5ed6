//! `maglb_probe_encap`: health probes that travel the data path.
//!
//! A tc classifier on the balancer interface's egress. The agent's probe sockets carry
//! `SO_MARK = PROBE_MARK_TAG | slot`; their packets are addressed to the VIP, and the kernel
//! routes them out of the balancer's interface. This program puts the outer header toward
//! the backend in `BACKENDS[slot]` in front of them, exactly as the XDP balancer does for a
//! client's packet (same outer source, TTL 64, TOS and DF copied, IPv6 flow label from the
//! inner flow, the MACs from `CONFIG`: the interface's and the next hop's). The backend
//! decapsulates, its VIP answers the balancer's address directly (DSR), and the answer
//! reaches the probe socket (the XDP program passes traffic not addressed to a VIP).
//!
//! `BACKENDS` and `CONFIG` are the balancer's pinned maps (the agent loads this object with
//! their pin paths), so the probe goes to the address the datapath itself would use.
//! Unmarked packets pass untouched; a marked packet that cannot be encapsulated is dropped
//! (sent bare it would reach the VIP through the router and the balancer, i.e. a backend
//! the ring chooses, and prove nothing about the one probed).
#![no_std]
#![no_main]
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{
    bindings::{
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV4, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, TC_ACT_OK, TC_ACT_SHOT,
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
    },
    macros::{classifier, map},
    maps::{Array, PerCpuArray},
    programs::TcContext,
};
use lb_common::{
    BACKEND_F_IN_USE, Backend, Config, Counter, FAMILY_V4, FAMILY_V6, MAX_BACKENDS,
    PROBE_MARK_MASK, PROBE_MARK_TAG, PROTO_IPIP, PROTO_IPV6, probe_stat,
};
use lb_ebpf::{
    csum,
    parse::{
        ETH_HLEN, ETH_P_IP, ETH_P_IPV6, EthHdr, IP_DF, IPV4_HLEN, IPV6_HLEN, Ipv4Hdr, Ipv6Hdr,
    },
};

/// The balancer's backend slots (its pinned map). Written by user space, read here.
#[map]
static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// Slot 0: the balancer's configuration (its pinned map). Written by user space.
#[map]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

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

/// What the outer header copies from the inner packet.
struct Inner {
    ethertype: u16,
    /// IPv4 TOS or IPv6 traffic class.
    tos: u8,
    df: bool,
    /// The flow label of an IPv6 outer header, computed as the XDP program computes it.
    label: u32,
}

#[inline(always)]
fn inner(ctx: &TcContext) -> Result<Inner, u32> {
    let eth: EthHdr = ctx.load(0).map_err(|_| probe_stat::FAMILY)?;
    let ethertype = u16::from_be(eth.proto);
    // The flow key's words and ports in memory order, as the XDP program hashes them.
    let (tos, df, src0, src3, l4_off) = match ethertype {
        ETH_P_IP => {
            let ip: Ipv4Hdr = ctx.load(ETH_HLEN).map_err(|_| probe_stat::FAMILY)?;
            let df = u16::from_be(ip.frag_off) & IP_DF != 0;
            let ihl = (ip.vihl & 0x0f) as usize * 4;
            (ip.tos, df, ip.src, 0, ETH_HLEN + ihl)
        }
        ETH_P_IPV6 => {
            let ip: Ipv6Hdr = ctx.load(ETH_HLEN).map_err(|_| probe_stat::FAMILY)?;
            let tc = (u32::from_be(ip.vtcfl) >> 20) as u8;
            (tc, true, ip.src[0], ip.src[3], ETH_HLEN + IPV6_HLEN)
        }
        _ => return Err(probe_stat::FAMILY),
    };
    // TCP and UDP ports; other protocols hash as port 0.
    let (sport, dport) = ctx
        .load::<[u16; 2]>(l4_off)
        .map_or((0, 0), |p| (p[0], p[1]));
    let label = (src3 ^ src0 ^ (sport as u32) << 4 ^ dport as u32) & 0xf_ffff;
    Ok(Inner {
        ethertype,
        tos,
        df,
        label,
    })
}

#[inline(always)]
fn encap(ctx: &TcContext, slot: u32) -> Result<(), u32> {
    let b = match BACKENDS.get(slot) {
        Some(b) if b.flags & BACKEND_F_IN_USE != 0 => *b,
        _ => return Err(probe_stat::NO_BACKEND),
    };
    let cfg = match CONFIG.get(0) {
        Some(c) if c.ready != 0 => *c,
        _ => return Err(probe_stat::NOT_READY),
    };
    let inner = inner(ctx)?;
    let inner_proto = if inner.ethertype == ETH_P_IP {
        PROTO_IPIP
    } else {
        PROTO_IPV6
    };
    // The IP packet: everything after the Ethernet header (a socket's packet carries no
    // padding and no VLAN tag in its data).
    let l3_len = ctx.len() as usize - ETH_HLEN;
    let (outer_type, grow, flags) = match b.family {
        FAMILY_V4 if inner.ethertype == ETH_P_IP => {
            (ETH_P_IP, IPV4_HLEN, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4)
        }
        FAMILY_V6 => (ETH_P_IPV6, IPV6_HLEN, BPF_F_ADJ_ROOM_ENCAP_L3_IPV6),
        _ => return Err(probe_stat::FAMILY),
    };
    ctx.adjust_room(grow as i32, BPF_ADJ_ROOM_MAC, flags as u64)
        .map_err(|_| probe_stat::ERROR)?;
    let eth = EthHdr {
        dst: cfg.nh_mac,
        src: cfg.if_mac,
        proto: outer_type.to_be(),
    };
    ctx.store(0, &eth, 0).map_err(|_| probe_stat::ERROR)?;
    if outer_type == ETH_P_IP {
        let mut ip = Ipv4Hdr {
            vihl: 0x45,
            tos: inner.tos,
            tot_len: ((l3_len + IPV4_HLEN) as u16).to_be(),
            id: 0,
            frag_off: if inner.df { IP_DF.to_be() } else { 0 },
            ttl: 64,
            proto: inner_proto,
            check: 0,
            src: cfg.src_v4,
            dst: b.addr[0],
        };
        ip.check = csum::fold(csum::sum_struct(&ip));
        ctx.store(ETH_HLEN, &ip, 0).map_err(|_| probe_stat::ERROR)?;
    } else {
        let ip = Ipv6Hdr {
            vtcfl: (6u32 << 28 | (inner.tos as u32) << 20 | inner.label).to_be(),
            payload_len: (l3_len as u16).to_be(),
            nexthdr: inner_proto,
            hop_limit: 64,
            src: cfg.src_v6,
            dst: b.addr,
        };
        ctx.store(ETH_HLEN, &ip, 0).map_err(|_| probe_stat::ERROR)?;
    }
    Ok(())
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
