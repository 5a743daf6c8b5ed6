//! The maglb balancer: an XDP program that spreads packets to VIPs over backends with Maglev
//! hashing and a connection table, and sends them IP-in-IP encapsulated back out (XDP_TX).
//!
//! One packet: parse -> classify (VIP?) -> choose (conntrack, ring) -> encap -> emit.
#![no_std]
#![no_main]
// Map keys are passed by reference on purpose: by value (as clippy suggests) each lookup
// copies its key onto the stack again, and the balancer then exceeds the verifier's
// 512-byte stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod encap;
mod icmp;
mod lookup;
mod maps;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    Backend, Config, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    VipMeta, stat,
};
use lb_ebpf::parse::{self, Packet, Parsed};

#[xdp]
pub fn maglb_balancer(ctx: XdpContext) -> u32 {
    match balance(&ctx) {
        Ok(action) => action,
        Err(()) => {
            stats::global(stat::ERR_HELPER, 0);
            xdp_action::XDP_ABORTED
        }
    }
}

#[inline(always)]
fn balance(ctx: &XdpContext) -> Result<u32, ()> {
    let cfg = match maps::CONFIG.get(0) {
        Some(c) if c.ready != 0 => *c,
        _ => {
            stats::global(stat::PASS_NOT_READY, 0);
            return Ok(xdp_action::XDP_PASS);
        }
    };
    let pkt = match parse::parse(ctx) {
        Parsed::Ok(p) => p,
        Parsed::NotIp => {
            stats::global(stat::PASS_NOT_VIP, 0);
            return Ok(xdp_action::XDP_PASS);
        }
        Parsed::Malformed(p) => {
            // Broken headers to a VIP go nowhere; anything else is the kernel's to judge.
            if lookup::maybe_vip(&p.flow) && lookup::is_vip_addr(&p.flow) {
                stats::global(stat::DROP_MALFORMED, 0);
                return Ok(xdp_action::XDP_DROP);
            }
            stats::global(stat::PASS_NOT_VIP, 0);
            return Ok(xdp_action::XDP_PASS);
        }
    };
    // Not a VIP address: one array read decides, no hash lookup.
    if !lookup::maybe_vip(&pkt.flow) {
        stats::global(stat::PASS_NOT_VIP, 0);
        return Ok(xdp_action::XDP_PASS);
    }
    match pkt.flow.proto {
        PROTO_TCP | PROTO_UDP => {}
        PROTO_ICMP | PROTO_ICMPV6 if !pkt.fragment => return icmp::handle(ctx, &pkt, &cfg),
        _ => return Ok(not_handled(ctx, &pkt)),
    }
    // An established flow knows its backend and VIP: no VIP lookup.
    if let Some((index, backend, vip_index)) = lookup::established(&pkt.flow) {
        return send(ctx, &pkt, index, &backend, vip_index, &cfg, Reply::TooBig);
    }
    let vip = if pkt.fragment {
        // Later fragments carry no ports: all fragments hash on the addresses alone, to the
        // VIP that takes this address's fragments.
        lookup::fragment_vip(&pkt.flow)
    } else {
        lookup::vip(&pkt.flow)
    };
    let Some(vip) = vip else {
        stats::global(stat::PASS_NOT_VIP, 0);
        return Ok(xdp_action::XDP_PASS);
    };
    match lookup::choose(&pkt.flow, &vip) {
        Ok((index, backend)) => send(ctx, &pkt, index, &backend, vip.index, &cfg, Reply::TooBig),
        Err(reason) => {
            stats::global(reason, pkt.l3_len);
            Ok(xdp_action::XDP_DROP)
        }
    }
}

/// What to do with a packet too big to encapsulate.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Reply {
    /// Answer with fragmentation-needed / packet-too-big.
    TooBig,
    /// Drop it: the packet is itself an ICMP error, and errors are never answered with errors
    /// (RFC 1122 3.2.2).
    Drop,
}

/// Sends `pkt` to the backend that `flow` maps to on `vip` (for ICMP errors the flow comes
/// from the quoted packet, not from `pkt`).
#[inline(always)]
pub(crate) fn forward(
    ctx: &XdpContext,
    pkt: &Packet,
    flow: &FlowKey,
    vip: &VipMeta,
    cfg: &Config,
    too_big: Reply,
) -> Result<u32, ()> {
    match lookup::backend(flow, vip) {
        Ok((index, backend)) => send(ctx, pkt, index, &backend, vip.index, cfg, too_big),
        Err(reason) => {
            stats::global(reason, pkt.l3_len);
            Ok(xdp_action::XDP_DROP)
        }
    }
}

/// Encapsulates `pkt` toward backend `index` of VIP `vip_index` and sends it (or answers
/// that it is too big).
#[inline(always)]
fn send(
    ctx: &XdpContext,
    pkt: &Packet,
    index: u32,
    backend: &Backend,
    vip_index: u32,
    cfg: &Config,
    too_big: Reply,
) -> Result<u32, ()> {
    if pkt.flow.family == FAMILY_V6 && backend.family == FAMILY_V4 {
        stats::global(stat::DROP_FAMILY, pkt.l3_len);
        return Ok(xdp_action::XDP_DROP);
    }
    let overhead = encap::overhead(backend);
    let outer = pkt.l3_len + overhead;
    let mtu = cfg.mtu as usize;
    if mtu != 0 && outer > mtu {
        if too_big == Reply::Drop {
            stats::global(stat::DROP_TOO_BIG, pkt.l3_len);
            return Ok(xdp_action::XDP_DROP);
        }
        return icmp::too_big(ctx, pkt, mtu.saturating_sub(overhead));
    }
    encap::encap(ctx, pkt, backend, cfg)?;
    stats::vip(vip_index, pkt.l3_len);
    stats::backend(index, pkt.l3_len);
    stats::global(stat::TX_ENCAP, outer);
    Ok(xdp_action::XDP_TX)
}

/// VIP traffic the balancer does not handle (other protocols and ICMP types, e.g. neighbour
/// discovery) and everything else goes to the kernel untouched.
#[inline(always)]
pub fn not_handled(_ctx: &XdpContext, pkt: &Packet) -> u32 {
    if lookup::is_vip_addr(&pkt.flow) {
        stats::global(stat::PASS_VIP_OTHER, 0);
    } else {
        stats::global(stat::PASS_NOT_VIP, 0);
    }
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
