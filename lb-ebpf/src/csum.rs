//! Internet checksum (RFC 1071) arithmetic, with incremental updates (RFC 1624).
//!
//! Sums are kept in a `u64` of 16-bit words read in memory order; folding gives the
//! checksum in memory order, so no byte swapping is needed anywhere.

use aya_ebpf::{
    helpers::{bpf_csum_diff, bpf_xdp_load_bytes},
    programs::XdpContext,
};

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

/// Bytes [`sum_range`] sums at a time in place.
const CHUNK: usize = 64;
/// Longest range [`sum_range`] sums: a whole frame of a 4 KiB page.
pub const SUM_MAX: usize = 4096;

/// Sum of `len` bytes of packet data at `off` (any `len` up to [`SUM_MAX`]), as 16-bit words
/// in memory order (an odd last byte counts as the word `[byte, 0]`, as RFC 1071 pads).
/// `None` if the range is longer or not inside the packet.
///
/// 64-byte chunks are summed in place; the rest (under 64 bytes) is copied 4 bytes at a time
/// with `bpf_xdp_load_bytes` into a zeroed word, then the last 1-3 bytes the same way, so no
/// packet-bound proof is needed for a variable length. Every copy has a constant length and
/// both loops fixed bounds: the verifier walks at most 64 x 16 x 4 paths.
#[inline(always)]
pub fn sum_range(ctx: &XdpContext, off: usize, len: usize) -> Option<u64> {
    if len > SUM_MAX {
        return None;
    }
    let mut sum = 0u64;
    let mut done = 0usize;
    let mut i = 0;
    while i < SUM_MAX / CHUNK {
        if len - done < CHUNK {
            break;
        }
        sum += sum_packet::<CHUNK>(ctx, off + done)?;
        done += CHUNK;
        i += 1;
    }
    let mut i = 0;
    while i < CHUNK / 4 - 1 {
        if len - done < 4 {
            break;
        }
        sum = add32(sum, load::<4>(ctx, off + done)?);
        done += 4;
        i += 1;
    }
    let last = match len - done {
        0 => 0,
        1 => load::<1>(ctx, off + done)?,
        2 => load::<2>(ctx, off + done)?,
        3 => load::<3>(ctx, off + done)?,
        _ => return None,
    };
    Some(add32(sum, last))
}

/// Sum of an IPv4 header of `hlen` bytes (20-60, a multiple of 4) at `off`: the fixed 20
/// bytes in place, the options word by word. Cheaper for the verifier than [`sum_range`].
#[inline(always)]
pub fn sum_ipv4_header(ctx: &XdpContext, off: usize, hlen: usize) -> Option<u64> {
    let mut sum = sum_packet::<20>(ctx, off)?;
    let mut at = 20;
    while at < 60 {
        if at >= hlen {
            break;
        }
        sum = add32(sum, load::<4>(ctx, off + at)?);
        at += 4;
    }
    Some(sum)
}

/// `N` (1-4) bytes of packet data at `off`, at the start of an otherwise zero word.
#[inline(always)]
fn load<const N: u32>(ctx: &XdpContext, off: usize) -> Option<u32> {
    let mut word = 0u32;
    let p = (&mut word as *mut u32).cast();
    let r = unsafe { bpf_xdp_load_bytes(ctx.ctx, off as u32, p, N) };
    (r == 0).then_some(word)
}
