//! Benchmark tools (not part of a deployment):
//!
//! - `maglb_gen`: a packet generator for `BPF_PROG_RUN` in live-frames mode. It writes the
//!   frame's headers from a template on every run (live frames are reused buffers, and what
//!   they carried last time may have been rewritten), varies the UDP source port (and beyond
//!   32768 flows the source address) over N flows, and sends the frame out with XDP_TX. With
//!   G generators (one per CPU), each sends its own N / G of the flows, as a NIC's RSS
//!   would steer each flow to one queue and CPU.
//! - `maglb_tx`: a bare XDP_TX, the limit of a veth pair.
//! - `maglb_sink`: counts and drops what comes back.
//! - `maglb_calls_helper`, `maglb_calls_sub`: 16 helper calls, or 16 calls of a BPF
//!   subprogram, and nothing else: what a call and its return cost on this machine.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns},
    macros::{map, xdp},
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use lb_ebpf::{csum::replace16, parse::ptr_at};

/// Bytes of the template written into each frame (Ethernet + IPv4 + UDP headers).
const HEADER: usize = 42;

/// Slot 0: the header template. Written by user space.
#[map]
static GEN_TEMPLATE: Array<[u8; 64]> = Array::with_max_entries(1, 0);
/// Slot 0: the number of flows; slot 1: the number of generators (CPUs 0..G, one each).
/// Written by user space.
#[map]
static GEN_FLOWS: Array<u32> = Array::with_max_entries(2, 0);
/// Per-CPU frame sequence. Written here.
#[map]
static GEN_SEQ: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);
/// Per-CPU count of frames received by the sink. Written here.
#[map]
static SINK_COUNT: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[xdp]
pub fn maglb_gen(ctx: XdpContext) -> u32 {
    let (Some(t), Some(p)) = (GEN_TEMPLATE.get(0), ptr_at::<[u8; HEADER]>(&ctx, 0)) else {
        return xdp_action::XDP_ABORTED;
    };
    unsafe { core::ptr::copy_nonoverlapping(t.as_ptr(), p as *mut u8, HEADER) };
    let flows = GEN_FLOWS.get(0).copied().unwrap_or(1).max(1);
    let gens = GEN_FLOWS.get(1).copied().unwrap_or(1).max(1);
    // SAFETY: a helper without arguments.
    let cpu = unsafe { bpf_get_smp_processor_id() } % gens;
    let share = flows / gens;
    let Some(seq) = GEN_SEQ.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    let n = unsafe {
        *seq = (*seq).wrapping_add(1);
        *seq
    };
    // Fewer flows than generators (one flow): all send the same.
    let k = if share == 0 {
        n % flows
    } else {
        cpu * share + n % share
    };
    if let Some(port) = ptr_at::<u16>(&ctx, 34) {
        unsafe { *port = ((1024 + (k & 0x7fff)) as u16).to_be() };
    }
    // Beyond 32768 flows the source address varies too: k / 32768 is added to its low 16
    // bits, and the IPv4 header checksum follows.
    let hi = (k >> 15) as u16;
    if hi != 0
        && let (Some(addr), Some(check)) = (ptr_at::<u16>(&ctx, 28), ptr_at::<u16>(&ctx, 24))
    {
        unsafe {
            let old = *addr;
            let new = u16::from_be(old).wrapping_add(hi).to_be();
            *addr = new;
            *check = replace16(*check, old, new);
        }
    }
    xdp_action::XDP_TX
}

#[xdp]
pub fn maglb_tx(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_TX
}

#[xdp]
pub fn maglb_sink(_ctx: XdpContext) -> u32 {
    if let Some(c) = SINK_COUNT.get_ptr_mut(0) {
        unsafe { *c += 1 };
    }
    xdp_action::XDP_DROP
}

/// Calls per run of the `maglb_calls_*` programs.
pub const CALLS: u32 = 16;

/// `CALLS` calls of the cheapest helper (the coarse clock), their results summed so none is
/// dropped. Passes the frame unchanged, so a test run can repeat it.
#[xdp]
pub fn maglb_calls_helper(_ctx: XdpContext) -> u32 {
    let mut sum = 0u64;
    for _ in 0..CALLS {
        sum = sum.wrapping_add(unsafe { bpf_ktime_get_coarse_ns() });
    }
    if sum == 1 {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

/// One multiply and add: the body of a subprogram call that costs next to nothing.
#[inline(never)]
fn step(x: u64) -> u64 {
    x.wrapping_mul(3).wrapping_add(1)
}

/// `CALLS` calls of a BPF subprogram (BPF-to-BPF calls), each on the result of the last.
/// Passes the frame unchanged.
#[xdp]
pub fn maglb_calls_sub(ctx: XdpContext) -> u32 {
    let mut x = (ctx.data_end() - ctx.data()) as u64;
    for _ in 0..CALLS {
        x = step(x);
    }
    if x == 1 {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
