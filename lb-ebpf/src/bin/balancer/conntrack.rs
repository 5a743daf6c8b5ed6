//! The connection table: established flows, idle timeouts, inserts and the flood mode.
//!
//! The table is an array of sets (`lb_common::conntrack`): the flow hash picks a set, a
//! lookup compares its slots, an insert takes the flow's own slot, an empty one or the one
//! idle longest. No helper call: the verifier inlines an array lookup.

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_jiffies64, bpf_ktime_get_coarse_ns};
use lb_common::{
    BACKEND_F_IN_USE, Backend, CLOCK_SHIFT, CONN_WAYS, ConnEntry, ConnSet, ConnSlot,
    FLOOD_WINDOW_SHIFT, FLOW_MEMO_TICKS, FlowKey, FlowMemo, MEMO_METER_SHIFT, MemoMeter, PROTO_UDP,
    Settings, TCP_FIN, TCP_RST, conn_check, conn_home, conn_set, flow_eq, hash, memo_pays,
    memo_sampled, memo_window,
};

use crate::maps::{
    BACKENDS, CLOCK, CONNTRACK, FLOOD, FLOW_MEMO, MEMO_METER, SETTINGS, conntrack_set_mask,
    flow_memo_mask,
};

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

/// The set of the flow of hash `h`. `None` never happens (the mask keeps the index in the
/// map), but the verifier wants the check.
#[inline(always)]
fn set_of(h: u32) -> Option<*mut ConnSet> {
    CONNTRACK.get_ptr_mut(conn_set(h, conntrack_set_mask()))
}

/// The slot of `flow` (hash `h`) in its set, if the set holds it whole.
#[inline(always)]
fn find(set: *mut ConnSet, flow: &FlowKey, h: u32) -> Option<*mut ConnSlot> {
    let home = conn_home(h);
    let mut i = 0;
    while i < CONN_WAYS {
        let w = (home + i) & (CONN_WAYS - 1);
        // SAFETY: `set` is a map value, valid for the program's run; `w` is in bounds.
        let slot = unsafe { core::ptr::addr_of_mut!((*set).slots[w]) };
        if unsafe { (*slot).holds(flow, h) } {
            return Some(slot);
        }
        i += 1;
    }
    None
}

/// The flow's entry while it is valid: its backend is in use with the same generation, and
/// it has not been idle longer than its protocol's timeout. Returns (backend index, backend,
/// VIP index). This CPU's memo answers first (`lb_common::FlowMemo`); the table answers when
/// the memo holds no recent copy, and its answer is then stamped and copied into the memo,
/// unless the memo slot holds another flow's recent copy: a flow seen once does not push out
/// a busy one (and with far more flows than slots, misses write nothing). While the memo
/// answers too few, it is off but for its samples (`lb_common::MemoMeter`).
#[inline(always)]
pub fn established(flow: &FlowKey, s: &Settings) -> Option<(u32, Backend, u32)> {
    let h = hash::flow_hash(flow);
    let idle = if flow.proto == PROTO_UDP {
        s.udp_idle_ticks
    } else {
        s.tcp_idle_ticks
    };
    let now = ticks(now_ns());
    let meter = memo_meter(h, now);
    let memo = if meter.is_some() { memo_of(h) } else { None };
    let mut take = false;
    if let (Some(m), Some(meter)) = (memo, meter) {
        // SAFETY: `m` is this CPU's memo slot, a map value valid for the program's run; only
        // this CPU writes it, and XDP does not nest on a CPU.
        let m = unsafe { &*m };
        let fresh = now.wrapping_sub(m.checked) < memo_window(idle);
        let mine = flow_eq(&m.key, flow);
        let found = if fresh && mine { from_memo(m) } else { None };
        count_memo(meter, found.is_some());
        if found.is_some() {
            return found;
        }
        take = mine || !fresh;
    }
    let (entry, b) = from_table(flow, h, now, idle)?;
    if let Some(m) = memo
        && take
    {
        // SAFETY: as above.
        unsafe {
            (*m).key = *flow;
            (*m).backend = entry.backend;
            (*m).generation = entry.generation;
            (*m).vip = entry.vip;
            (*m).checked = now;
        }
    }
    Some((entry.backend, b, entry.vip))
}

/// This CPU's memo slot for a flow of hash `h` (none when the memo has no room for this
/// CPU: the index is then past the map's end).
#[inline(always)]
fn memo_of(h: u32) -> Option<*mut FlowMemo> {
    // SAFETY: a helper without arguments (inlined by the verifier).
    let cpu = unsafe { bpf_get_smp_processor_id() };
    let mask = flow_memo_mask();
    FLOW_MEMO.get_ptr_mut(cpu * (mask + 1) + (h & mask))
}

/// This CPU's memo meter, if a flow of hash `h` uses the memo now: while the memo is on, or
/// if the flow is one of its samples (`lb_common::memo_sampled`). In a new window, first
/// decides from the last window counted whether the memo is on (`lb_common::memo_pays`).
#[inline(always)]
fn memo_meter(h: u32, now: u32) -> Option<&'static mut MemoMeter> {
    // SAFETY: this CPU's slot of a per-CPU array, valid for the program's run; XDP does not
    // nest on a CPU, and `established`, which holds the one reference, calls this once.
    let meter = unsafe { &mut *MEMO_METER.get_ptr_mut(0)? };
    let window = now >> MEMO_METER_SHIFT;
    if meter.window != window {
        meter.off = !memo_pays(meter.looked, meter.hits) as u32;
        meter.window = window;
        meter.looked = 0;
        meter.hits = 0;
    }
    (meter.off == 0 || memo_sampled(h)).then_some(meter)
}

/// Counts one memo lookup on this CPU's meter, answered or not.
#[inline(always)]
fn count_memo(meter: &mut MemoMeter, hit: bool) {
    meter.looked += 1;
    meter.hits += hit as u32;
}

/// A recent memo copy's answer: its backend, if still in use with that generation.
#[inline(always)]
fn from_memo(m: &FlowMemo) -> Option<(u32, Backend, u32)> {
    let b = live_backend(m.backend, m.generation)?;
    Some((m.backend, *b, m.vip))
}

/// Backend slot `index` while it is in use with `generation`: an entry made under another
/// generation (the backend left, went down, or the slot was reused) is no longer honoured.
#[inline(always)]
fn live_backend(index: u32, generation: u32) -> Option<&'static Backend> {
    let b = BACKENDS.get(index)?;
    (b.flags & BACKEND_F_IN_USE != 0 && b.generation == generation).then_some(b)
}

/// The table's entry of `flow` (hash `h`) and its backend, while valid; marks it used `now`
/// (a write at most once per tick).
#[inline(always)]
fn from_table(flow: &FlowKey, h: u32, now: u32, idle: u32) -> Option<(ConnEntry, Backend)> {
    let e = find(set_of(h)?, flow, h)?;
    // SAFETY: `e` points into a map value, valid for the program's run.
    let entry = unsafe { (*e).entry };
    let b = live_backend(entry.backend, entry.generation)?;
    // Signed: another CPU may have stamped the entry a tick after this CPU read the clock.
    let age = now.wrapping_sub(entry.last_seen) as i32;
    if age > 0 {
        if idle != 0 && age as u32 > idle {
            return None;
        }
        // SAFETY: as above; a racing writer's slot fails its check, whatever this stamps.
        unsafe { (*e).entry.last_seen = now };
    }
    Some((entry, *b))
}

/// `established`'s backend index, or `u32::MAX`. A subprogram for the ICMP error path:
/// inlined there, the table lookup's stack would take that path (the entry, `icmp::handle`
/// and its callees) past the verifier's 512 bytes.
#[inline(never)]
pub fn established_index(flow: &FlowKey, s: &Settings) -> u32 {
    established(flow, s).map_or(u32::MAX, |(i, _, _)| i)
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
    let h = hash::flow_hash(flow);
    let Some(set) = set_of(h) else {
        return;
    };
    let now = ticks(now_ns);
    let w = victim(set, flow, h, now);
    let entry = ConnEntry {
        backend: index,
        generation: b.generation,
        vip,
        last_seen: now,
    };
    // SAFETY: `set` is a map value; `w` < CONN_WAYS. The check word is cleared first and
    // written last, all volatile so that the compiler keeps the order (the CPU keeps it on
    // x86): a reader that sees a slot half written finds the check wrong and treats the
    // flow as new (the ring chooses again).
    unsafe {
        let slot = core::ptr::addr_of_mut!((*set).slots[w & (CONN_WAYS - 1)]);
        core::ptr::write_volatile(&mut (*slot).check, 0);
        core::ptr::write_volatile(&mut (*slot).key, *flow);
        core::ptr::write_volatile(&mut (*slot).entry, entry);
        core::ptr::write_volatile(&mut (*slot).check, conn_check(h, &entry));
    }
    forget(flow, h, now);
}

/// Makes this CPU's memo copy of `flow` (hash `h`), if it holds one, too old to answer: the
/// flow's entry was just written anew (a SYN starting the 5-tuple again may have chosen
/// another backend). Other CPUs' copies age out within their window; a NIC's RSS sends a
/// 5-tuple's packets to one CPU.
#[inline(always)]
fn forget(flow: &FlowKey, h: u32, now: u32) {
    if let Some(m) = memo_of(h) {
        // SAFETY: as in `established`.
        unsafe {
            if flow_eq(&(*m).key, flow) {
                (*m).checked = now.wrapping_sub(FLOW_MEMO_TICKS);
            }
        }
    }
}

/// The way a new flow takes in its set, scanning from its home way (`conn_home`): its own
/// slot if the set holds it, else an empty one, else the one idle longest (the first of
/// them). Slots never empty again, so every slot before a flow's own in its scan was in use
/// when it was inserted: the first empty slot comes after it.
#[inline(always)]
fn victim(set: *mut ConnSet, flow: &FlowKey, h: u32, now: u32) -> usize {
    let home = conn_home(h);
    let mut best = home;
    let mut best_age = -1i32;
    let mut i = 0;
    while i < CONN_WAYS {
        let w = (home + i) & (CONN_WAYS - 1);
        // SAFETY: as in `find`.
        let slot = unsafe { &*core::ptr::addr_of!((*set).slots[w]) };
        if slot.check == 0 || flow_eq(&slot.key, flow) {
            return w;
        }
        // Signed, as in `established`: another CPU may have stamped the slot a tick ahead.
        let age = (now.wrapping_sub(slot.entry.last_seen) as i32).max(0);
        if age > best_age {
            best_age = age;
            best = w;
        }
        i += 1;
    }
    best
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
