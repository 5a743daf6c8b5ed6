//! Counter bumps (per-CPU, so plain adds).

use lb_common::Counter;

use crate::maps::{BACKEND_STATS, GLOBAL_STATS, VIP_NEW_FLOWS, VIP_STATS};

#[inline(always)]
fn bump(c: Option<*mut Counter>, bytes: usize) {
    if let Some(c) = c {
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes as u64;
        }
    }
}

/// A global counter by reason (`lb_common::stat`).
#[inline(always)]
pub fn global(reason: u32, bytes: usize) {
    bump(GLOBAL_STATS.get_ptr_mut(reason), bytes);
}

#[inline(always)]
pub fn vip(index: u32, bytes: usize) {
    bump(VIP_STATS.get_ptr_mut(index), bytes);
}

#[inline(always)]
pub fn backend(index: u32, bytes: usize) {
    bump(BACKEND_STATS.get_ptr_mut(index), bytes);
}

/// A new flow of a VIP.
#[inline(always)]
pub fn new_flow(index: u32) {
    if let Some(c) = VIP_NEW_FLOWS.get_ptr_mut(index) {
        unsafe { *c += 1 };
    }
}
