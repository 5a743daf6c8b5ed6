//! The maglb balancer: an XDP program that spreads packets to VIPs over backends with Maglev
//! hashing and a connection table, and sends them encapsulated (IP-in-IP, or GUE) back out
//! (XDP_TX).
//!
//! One packet: parse -> classify (VIP?) -> choose (connection table, or admit and ring) ->
//! encap -> emit. Every packet bumps exactly one per-CPU counter.
#![no_std]
#![no_main]
// Map keys are passed by reference on purpose: by value (as clippy suggests) each lookup
// copies its key onto the stack again, and the balancer then exceeds the verifier's
// 512-byte stack.
#![allow(clippy::needless_borrows_for_generic_args)]

mod conntrack;
mod encap;
mod icmp;
mod lookup;
mod maps;
mod policy;
mod stats;

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    Backend, Config, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP,
    Settings, TCP_ACK, TCP_SYN, VipMeta, stat, vip_stat,
};
use lb_ebpf::parse::{self, Kind, Packet};

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
    // Untagged IPv4 to an address that is no VIP goes to the kernel before anything else is
    // read or parsed: the same answer (and counter) as after it, for less.
    let plain_v4 = parse::plain_ipv4_dst(ctx);
    if let Some(dst) = plain_v4
        && !lookup::maybe_vip_addr(&[dst, 0, 0, 0])
    {
        stats::global(stat::PASS_NOT_VIP, 0);
        return Ok(xdp_action::XDP_PASS);
    }
    // Config and settings are read in place: a copy would cost stack, and would not protect
    // against a concurrent update any better.
    let (cfg, s) = match (maps::CONFIG.get(0), conntrack::settings()) {
        (Some(c), Some(s)) if c.ready != 0 => (c, s),
        _ => {
            stats::global(stat::PASS_NOT_READY, 0);
            return Ok(xdp_action::XDP_PASS);
        }
    };
    // Not zeroed: that would be a byte-by-byte memset loop on every packet (BPF has no
    // memset). `parse_into` writes it whenever it is read.
    let mut pkt = core::mem::MaybeUninit::<Packet>::uninit();
    let kind = parse::parse_into(ctx, &mut pkt);
    if kind == Kind::NotIp {
        stats::global(stat::PASS_NOT_VIP, 0);
        return Ok(xdp_action::XDP_PASS);
    }
    // SAFETY: parse_into wrote the packet for the other kinds.
    let pkt = unsafe { pkt.assume_init_ref() };
    if kind == Kind::Malformed {
        // Broken headers to a VIP go nowhere; anything else is the kernel's to judge.
        if lookup::maybe_vip(&pkt.flow) && lookup::is_vip_addr(&pkt.flow) {
            stats::global(stat::DROP_MALFORMED, 0);
            return Ok(xdp_action::XDP_DROP);
        }
        stats::global(stat::PASS_NOT_VIP, 0);
        return Ok(xdp_action::XDP_PASS);
    }
    // Not a VIP address: one array read decides, no hash lookup (made above already for
    // untagged IPv4).
    if plain_v4.is_none() && !lookup::maybe_vip(&pkt.flow) {
        stats::global(stat::PASS_NOT_VIP, 0);
        return Ok(xdp_action::XDP_PASS);
    }
    match pkt.flow.proto {
        PROTO_TCP | PROTO_UDP => {}
        PROTO_ICMP | PROTO_ICMPV6 if !pkt.fragment => return icmp::handle(ctx, pkt, cfg),
        _ => return Ok(not_handled(ctx, pkt)),
    }
    // A SYN starts a flow: it goes to the ring without a connection-table lookup (a
    // retransmitted SYN is chosen the same way again, unless the ring changed).
    let syn = pkt.flow.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
    if !syn {
        let action = established(ctx, pkt, cfg, s);
        if action != NOT_ESTABLISHED {
            return Ok(action);
        }
    }
    Ok(new_flow(ctx, pkt, cfg, s))
}

/// `established`'s answer for a flow the connection table does not know (or no longer
/// honours).
const NOT_ESTABLISHED: u32 = u32::MAX;

/// An established flow knows its backend and VIP: no VIP lookup. A subprogram, like
/// `new_flow`: the entry function's stack stays small, and with it the ICMP path's (entry
/// and `icmp::handle`), which must fit in 512 bytes. (Inlined, it measured no faster.)
/// Returns the action, or `NOT_ESTABLISHED`.
#[inline(never)]
fn established(ctx: &XdpContext, pkt: &Packet, cfg: &Config, s: &Settings) -> u32 {
    let Some((index, backend, vip)) = conntrack::established(&pkt.flow, s) else {
        return NOT_ESTABLISHED;
    };
    send(ctx, pkt, index, &backend, vip, cfg, s, Reply::TooBig, false).unwrap_or_else(|()| {
        stats::global(stat::ERR_HELPER, 0);
        xdp_action::XDP_ABORTED
    })
}

/// A packet that starts a flow (or whose flow the table does not know): the VIP's policy
/// admits it, the ring chooses, the table remembers. A function of its own (a BPF
/// subprogram), so that its stack is not added to the established path's, nor to the ICMP
/// path's. Returns the action (at most 5 arguments and a scalar result: no stack
/// arguments in BPF).
#[inline(never)]
fn new_flow(ctx: &XdpContext, pkt: &Packet, cfg: &Config, s: &Settings) -> u32 {
    let now = conntrack::now_ns();
    let vip = if pkt.fragment {
        // Later fragments carry no ports: all fragments hash on the addresses alone, to the
        // VIP that takes this address's fragments.
        lookup::fragment_vip(&pkt.flow)
    } else {
        lookup::vip(&pkt.flow)
    };
    let Some(vip) = &vip else {
        stats::global(stat::PASS_NOT_VIP, 0);
        return xdp_action::XDP_PASS;
    };
    if let Err(reason) = policy::admit(&pkt.flow, vip.index, now) {
        stats::vip_drop(vip.index, reason, pkt.l3_len);
        return xdp_action::XDP_DROP;
    }
    let sent = match lookup::choose(&pkt.flow, vip) {
        Ok((index, backend)) => {
            conntrack::remember(&pkt.flow, pkt.tcp_flags, index, &backend, vip.index, s, now);
            send(
                ctx,
                pkt,
                index,
                &backend,
                vip.index,
                cfg,
                s,
                Reply::TooBig,
                true,
            )
        }
        Err(reason) => {
            stats::vip_drop(vip.index, reason, pkt.l3_len);
            Ok(xdp_action::XDP_DROP)
        }
    };
    sent.unwrap_or_else(|()| {
        stats::global(stat::ERR_HELPER, 0);
        xdp_action::XDP_ABORTED
    })
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
        Ok((index, backend, new)) => match conntrack::settings() {
            Some(s) => send(ctx, pkt, index, &backend, vip.index, cfg, s, too_big, new),
            None => Err(()),
        },
        Err(reason) => {
            stats::vip_drop(vip.index, reason, pkt.l3_len);
            Ok(xdp_action::XDP_DROP)
        }
    }
}

/// Encapsulates `pkt` toward backend `index` of VIP `vip_index` and sends it (or answers
/// that it is too big). `new_flow`: the ring chose the backend.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn send(
    ctx: &XdpContext,
    pkt: &Packet,
    index: u32,
    backend: &Backend,
    vip_index: u32,
    cfg: &Config,
    s: &Settings,
    too_big: Reply,
    new_flow: bool,
) -> Result<u32, ()> {
    if pkt.flow.family == FAMILY_V6 && backend.family == FAMILY_V4 {
        stats::vip_drop(vip_index, vip_stat::FAMILY, pkt.l3_len);
        return Ok(xdp_action::XDP_DROP);
    }
    let gue_port = s.gue_dport();
    let overhead = encap::overhead(backend, gue_port);
    let outer = pkt.l3_len + overhead;
    let mtu = cfg.mtu as usize;
    if mtu != 0 && outer > mtu {
        if too_big == Reply::Drop {
            stats::global(stat::DROP_TOO_BIG, pkt.l3_len);
            return Ok(xdp_action::XDP_DROP);
        }
        return icmp::too_big(ctx, pkt, mtu.saturating_sub(overhead));
    }
    encap::encap(ctx, pkt, backend, cfg, gue_port)?;
    stats::backend(index, pkt.l3_len, new_flow);
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
