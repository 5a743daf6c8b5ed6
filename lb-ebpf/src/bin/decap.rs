//! maglb's backend-side programs.
//!
//! `maglb_decap` strips the outer header of IPv4-in-IPv4, IPv6-in-IPv6 and IPv4-in-IPv6
//! packets addressed to this host, and the outer IP and UDP headers of GUE (variant 1, direct
//! IP) packets to the GUE port, and passes the inner packet (client -> VIP, the VIP bound on
//! loopback) up the stack. Everything else passes untouched. It does what the kernel's ipip /
//! ip6_tunnel / fou devices would, for hosts that lack them or want it cheaper.
//!
//! `maglb_pass` passes everything: the empty program benchmarks subtract, and the program a
//! veth peer needs so that frames sent to it with XDP_TX arrive.
#![no_std]
#![no_main]
// Map keys are passed by reference on purpose: by value (as clippy suggests) each lookup
// copies its key onto the stack again, and the balancer then exceeds the verifier's
// 512-byte stack.
#![allow(clippy::needless_borrows_for_generic_args)]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, HashMap, PerCpuArray},
    programs::XdpContext,
};
use lb_common::{
    AddrKey, Counter, DECAP_GUE_OFF, DECAP_STATS_ENTRIES, DEFAULT_GUE_PORT, FAMILY_V4, FAMILY_V6,
    MAX_DECAP_ADDRS, PROTO_IPIP, PROTO_IPV6, PROTO_UDP, stat,
};
use lb_ebpf::parse::{
    ETH_HLEN, ETH_P_8021Q, ETH_P_IP, ETH_P_IPV6, EthHdr, IP_MF, IP_OFFMASK, IPV6_HLEN, Ipv4Hdr,
    Ipv6Hdr, UdpHdr, VlanHdr, ptr_at,
};

/// Outer destination addresses this host decapsulates for (`proto` 0). Written by user space.
#[map]
static DECAP_ADDRS: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_DECAP_ADDRS, 0);

/// Slot 0: the UDP port of GUE packets to decapsulate: 0 for `DEFAULT_GUE_PORT`, a port, or
/// `DECAP_GUE_OFF`. Written by user space.
#[map]
static DECAP_GUE: Array<u32> = Array::with_max_entries(1, 0);

/// Per-CPU counters, indexed by `stat::DECAP_OK` / `stat::DECAP_PASS`. Written here.
#[map]
static DECAP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(DECAP_STATS_ENTRIES, 0);

#[xdp]
pub fn maglb_decap(ctx: XdpContext) -> u32 {
    decap(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[xdp]
pub fn maglb_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn count(reason: u32, bytes: usize) {
    if let Some(c) = DECAP_STATS.get_ptr_mut(reason) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

#[inline(always)]
fn ours(addr: [u32; 4], family: u8) -> bool {
    let key = AddrKey {
        addr,
        family,
        proto: 0,
        _pad: [0; 2],
    };
    unsafe { DECAP_ADDRS.get(key) }.is_some()
}

/// The UDP header of GUE: 8 bytes, then the inner IP packet (variant 1).
const GUE_HLEN: usize = 8;

/// For a UDP header at `off` to the GUE port followed by an IP packet: the inner packet's
/// ethertype (from its version nibble).
#[inline(always)]
fn gue(ctx: &XdpContext, off: usize) -> Option<u16> {
    let port = match DECAP_GUE.get(0).copied().unwrap_or(0) {
        0 => DEFAULT_GUE_PORT,
        DECAP_GUE_OFF => return None,
        p => p as u16,
    };
    let udp = unsafe { *ptr_at::<UdpHdr>(ctx, off)? };
    if u16::from_be(udp.dst) != port {
        return None;
    }
    let version = unsafe { *ptr_at::<u8>(ctx, off + GUE_HLEN)? } >> 4;
    match version {
        4 => Some(ETH_P_IP),
        6 => Some(ETH_P_IPV6),
        _ => None,
    }
}

/// Returns `None` (pass untouched) for anything that is not an encapsulated packet for us.
#[inline(always)]
fn decap(ctx: &XdpContext) -> Option<u32> {
    // Copies of the L2 header: it is rewritten after the head moves.
    let src_eth = unsafe { *ptr_at::<EthHdr>(ctx, 0)? };
    let mut proto = u16::from_be(src_eth.proto);
    let mut l3 = ETH_HLEN;
    let mut tci = 0;
    if proto == ETH_P_8021Q {
        let vlan = ptr_at::<VlanHdr>(ctx, ETH_HLEN)?;
        proto = u16::from_be(unsafe { (*vlan).proto });
        tci = unsafe { (*vlan).tci };
        l3 = ETH_HLEN + 4;
    }
    let (outer_len, inner) = match proto {
        ETH_P_IP => {
            let ip = unsafe { *ptr_at::<Ipv4Hdr>(ctx, l3)? };
            let ihl = (ip.vihl & 0x0f) as usize;
            // Outer fragments are left to the kernel.
            if ihl < 5 || u16::from_be(ip.frag_off) & (IP_MF | IP_OFFMASK) != 0 {
                return None;
            }
            if !ours([ip.dst, 0, 0, 0], FAMILY_V4) {
                return None;
            }
            (ihl * 4, ip.proto)
        }
        ETH_P_IPV6 => {
            let ip = unsafe { *ptr_at::<Ipv6Hdr>(ctx, l3)? };
            if !ours(ip.dst, FAMILY_V6) {
                return None;
            }
            (IPV6_HLEN, ip.nexthdr)
        }
        _ => return None,
    };
    let (inner_type, strip) = match inner {
        PROTO_IPIP => (ETH_P_IP, outer_len),
        PROTO_IPV6 => (ETH_P_IPV6, outer_len),
        PROTO_UDP => match gue(ctx, l3 + outer_len) {
            Some(t) => (t, outer_len + GUE_HLEN),
            // Ordinary UDP to this host.
            None => {
                count(stat::DECAP_PASS, 0);
                return None;
            }
        },
        _ => {
            count(stat::DECAP_PASS, 0);
            return None;
        }
    };
    // The inner header must be there before anything is moved.
    ptr_at::<[u8; 20]>(ctx, l3 + strip)?;
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip as i32) } != 0 {
        return None;
    }
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    unsafe {
        (*eth).dst = src_eth.dst;
        (*eth).src = src_eth.src;
    }
    if l3 == ETH_HLEN {
        unsafe { (*eth).proto = inner_type.to_be() };
    } else {
        let vlan = ptr_at::<VlanHdr>(ctx, ETH_HLEN)?;
        unsafe {
            (*eth).proto = ETH_P_8021Q.to_be();
            (*vlan).tci = tci;
            (*vlan).proto = inner_type.to_be();
        }
    }
    count(stat::DECAP_OK, ctx.data_end() - ctx.data());
    Some(xdp_action::XDP_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
