//! Counter bumps (per-CPU, so plain adds). A packet bumps exactly one counter.

use lb_common::{Counter, vip_stat};

use crate::maps::{BACKEND_STATS, GLOBAL_STATS, VIP_DROPS};

#[inline(always)]
fn bump(c: Option<*mut Counter>, bytes: usize) {
    if let Some(c) = c {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

/// A global counter by reason (`lb_common::stat`), for packets that belong to no VIP (or
/// whose VIP is not known).
#[inline(always)]
pub fn global(reason: u32, bytes: usize) {
    bump(GLOBAL_STATS.get_ptr_mut(reason), bytes);
}

/// A packet of VIP `vip` that is not forwarded, by reason (`lb_common::vip_stat`).
#[inline(always)]
pub fn vip_drop(vip: u32, reason: u32, bytes: usize) {
    bump(
        VIP_DROPS.get_ptr_mut(vip.wrapping_mul(vip_stat::STRIDE) + reason),
        bytes,
    );
}

/// A packet forwarded to backend slot `index`; `new_flow` when the ring chose the backend.
#[inline(always)]
pub fn backend(index: u32, bytes: usize, new_flow: bool) {
    if let Some(c) = BACKEND_STATS.get_ptr_mut(index) {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
            (*c).new_flows += new_flow as u64;
        }
    }
}
