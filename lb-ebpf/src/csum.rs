//! Internet checksum (RFC 1071) arithmetic, with incremental updates (RFC 1624).
//!
//! Sums are kept in a `u64` of 16-bit words read in memory order; folding gives the
//! checksum in memory order, so no byte swapping is needed anywhere.

use aya_ebpf::{helpers::bpf_csum_diff, programs::XdpContext};

use crate::parse::ptr_at;

/// Folds a sum to 16 bits and complements it: the value to store in a checksum field.
#[inline(always)]
pub fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Adds the two 16-bit halves of a 32-bit memory word.
#[inline(always)]
pub fn add32(sum: u64, word: u32) -> u64 {
    sum + (word & 0xffff) as u64 + (word >> 16) as u64
}

/// Adds 16-byte addresses.
#[inline(always)]
pub fn add_addr(mut sum: u64, a: &[u32; 4]) -> u64 {
    sum = add32(sum, a[0]);
    sum = add32(sum, a[1]);
    sum = add32(sum, a[2]);
    add32(sum, a[3])
}

/// New checksum after a 16-bit word of the covered data changed from `old` to `new`.
#[inline(always)]
pub fn replace16(check: u16, old: u16, new: u16) -> u16 {
    fold((!check) as u64 + (!old) as u64 + new as u64)
}

/// Sum of `N` bytes of packet data at `off` (`N` a multiple of 4, at most 512), by the
/// kernel's `bpf_csum_diff`. `None` if the packet is shorter.
#[inline(always)]
pub fn sum_packet<const N: usize>(ctx: &XdpContext, off: usize) -> Option<u64> {
    let p = ptr_at::<[u8; N]>(ctx, off)?;
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p as *mut u32, N as u32, 0) };
    if sum < 0 {
        return None;
    }
    Some(sum as u64)
}

/// Sum of a header held on the stack, as 16-bit words (`T` of even size).
#[inline(always)]
pub fn sum_struct<T>(v: &T) -> u64 {
    let p = v as *const T as *const u16;
    let n = core::mem::size_of::<T>() / 2;
    let mut sum = 0u64;
    let mut i = 0;
    while i < n {
        sum += unsafe { *p.add(i) } as u64;
        i += 1;
    }
    sum
}
