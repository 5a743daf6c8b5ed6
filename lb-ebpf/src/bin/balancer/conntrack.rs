//! The connection table: established flows, idle timeouts, inserts and the flood mode.

use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use lb_common::{
    BACKEND_F_IN_USE, Backend, CLOCK_SHIFT, ConnEntry, FLOOD_WINDOW_SHIFT, FlowKey, PROTO_UDP,
    Settings, TCP_FIN, TCP_RST,
};

use crate::maps::{BACKENDS, CLOCK, CONNTRACK, FLOOD, SETTINGS};

/// The runtime settings, read in place (all zero, i.e. no timeouts, no flood threshold,
/// IP-in-IP, until user space writes them). `None` never happens (slot 0 of a one-slot
/// array), but the verifier wants the check.
#[inline(always)]
pub fn settings() -> Option<&'static Settings> {
    SETTINGS.get(0)
}

/// The coarse monotonic clock (ns). The coarse clock moves only at the timer tick, as the
/// jiffies counter does, so a copy taken in the current jiffy is the clock's value: each CPU
/// keeps one (`CLOCK`) and calls the clock helper (a call and its return: about 20 ns on a
/// CPU whose returns go through the kernel's safe-return thunk) only in a new jiffy. The
/// jiffies counter costs one load: the verifier inlines `bpf_jiffies64` on 64-bit machines.
/// In the tick itself the copy may be taken between the two updates; it is then one tick
/// behind until the next jiffy, as the clock read a moment earlier would be.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helpers without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    let Some(c) = CLOCK.get_ptr_mut(0) else {
        return unsafe { bpf_ktime_get_coarse_ns() };
    };
    // SAFETY: `c` is this CPU's slot of a per-CPU array, valid for the program's run; no
    // other context writes it meanwhile (XDP does not nest on a CPU).
    unsafe {
        if (*c).jiffies != jiffies {
            (*c).ns = bpf_ktime_get_coarse_ns();
            (*c).jiffies = jiffies;
        }
        (*c).ns
    }
}

/// Clock ticks (`lb_common::CLOCK_SHIFT`) of a time in ns.
#[inline(always)]
pub fn ticks(ns: u64) -> u32 {
    (ns >> CLOCK_SHIFT) as u32
}

/// The flow's entry while it is valid: its backend is in use with the same generation, and
/// it has not been idle longer than its protocol's timeout. Marks it used now (a write at
/// most once per tick). Returns (backend index, backend, VIP index). The clock is read
/// after the lookup.
#[inline(always)]
pub fn established(flow: &FlowKey, s: &Settings) -> Option<(u32, Backend, u32)> {
    let e = CONNTRACK.get_ptr_mut(flow)?;
    let now = ticks(now_ns());
    let entry = unsafe { *e };
    let b = BACKENDS.get(entry.backend)?;
    if b.flags & BACKEND_F_IN_USE == 0 || b.generation != entry.generation {
        return None;
    }
    let idle = if flow.proto == PROTO_UDP {
        s.udp_idle_ticks
    } else {
        s.tcp_idle_ticks
    };
    // Signed: another CPU may have stamped the entry a tick after this CPU read the clock.
    let age = now.wrapping_sub(entry.last_seen) as i32;
    if age > 0 {
        if idle != 0 && age as u32 > idle {
            return None;
        }
        unsafe { (*e).last_seen = now };
    }
    Some((entry.backend, *b, entry.vip))
}

/// Remembers a new flow's backend, unless the packet ends the flow (RST, or FIN) or this CPU
/// is under flood.
#[inline(always)]
pub fn remember(
    flow: &FlowKey,
    tcp_flags: u8,
    index: u32,
    b: &Backend,
    vip: u32,
    s: &Settings,
    now_ns: u64,
) {
    if tcp_flags & (TCP_RST | TCP_FIN) != 0 {
        return;
    }
    if !flood_allows_insert(s, now_ns) {
        return;
    }
    let entry = ConnEntry {
        backend: index,
        generation: b.generation,
        vip,
        last_seen: ticks(now_ns),
    };
    // A full share evicts this CPU's least recently used entry; a failed insert only costs
    // the flow its stickiness, so the result is not checked.
    let _ = CONNTRACK.insert(flow, entry, 0);
}

/// The flood meter: counts this CPU's inserts per window and says whether one more is
/// allowed. Above `flood_new_flows_per_s` (scaled to the window) the CPU is under flood until
/// the window ends: new flows still get their backend from the ring, but are not inserted, so
/// a flood cannot evict established flows.
#[inline(always)]
fn flood_allows_insert(s: &Settings, now_ns: u64) -> bool {
    let rate = s.flood_new_flows_per_s as u64;
    if rate == 0 {
        return true;
    }
    let Some(m) = FLOOD.get_ptr_mut(0) else {
        return true;
    };
    // inserts / window > rate / s, i.e. inserts * 1e9 > rate * 2^FLOOD_WINDOW_SHIFT.
    let limit = rate << FLOOD_WINDOW_SHIFT;
    unsafe {
        if now_ns.wrapping_sub((*m).window_start) >> FLOOD_WINDOW_SHIFT != 0 {
            (*m).window_start = now_ns;
            (*m).inserts = 0;
        }
        if (*m).inserts * 1_000_000_000 >= limit {
            (*m).not_inserted += 1;
            return false;
        }
        (*m).inserts += 1;
        if (*m).inserts * 1_000_000_000 >= limit {
            (*m).flood_windows += 1;
        }
    }
    true
}
