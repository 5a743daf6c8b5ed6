//! The flow hash: MurmurHash3 (x86, 32-bit) over the words of the flow.
//!
//! Both balancers of a pair must map a flow to the same ring slot, so the hash is fixed (no
//! per-boot seed) and depends only on the flow's bytes.

use lb_common::FlowKey;

const SEED: u32 = 0x6d61_676c; // "magl"
const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of the whole flow (addresses, ports, protocol).
#[inline(always)]
pub fn flow_hash(f: &FlowKey) -> u32 {
    let mut h = SEED;
    h = mix(h, f.src[0]);
    h = mix(h, f.src[1]);
    h = mix(h, f.src[2]);
    h = mix(h, f.src[3]);
    h = mix(h, f.dst[0]);
    h = mix(h, f.dst[1]);
    h = mix(h, f.dst[2]);
    h = mix(h, f.dst[3]);
    h = mix(h, (f.sport as u32) << 16 | f.dport as u32);
    h = mix(h, f.proto as u32);
    finish(h, 40)
}

/// Hash of the client address only (VIPs with source-IP affinity).
#[inline(always)]
pub fn src_hash(f: &FlowKey) -> u32 {
    let mut h = SEED;
    h = mix(h, f.src[0]);
    h = mix(h, f.src[1]);
    h = mix(h, f.src[2]);
    h = mix(h, f.src[3]);
    finish(h, 16)
}
