//! The flow hash that picks a ring slot for a new flow, and the flow entropy the outer
//! headers carry (the IPv6 flow label, GUE's source port).
//!
//! Both balancers of a pair must map a flow to the same ring slot, so the hash is fixed (no
//! per-boot seed) and depends only on the flow's bytes. It is plain integer arithmetic, the
//! same in the datapath and in user space (tests check its spread here).

use crate::FlowKey;

const SEED: u64 = 0x6d61_676c_6232_3031; // "maglb201"
pub(crate) const K: u64 = 0x9e37_79b9_7f4a_7c15;

/// One multiply-and-fold round: spreads every input bit over the high half, then folds the
/// high half into the low one.
#[inline(always)]
pub(crate) fn round(h: u64, x: u64) -> u64 {
    let m = (h ^ x).wrapping_mul(K);
    m ^ (m >> 32)
}

/// An address folded to 64 bits (IPv4 addresses keep all their bits).
#[inline(always)]
fn fold_addr(a: &[u32; 4]) -> u64 {
    ((a[0] ^ a[2]) as u64) << 32 | (a[1] ^ a[3]) as u64
}

/// Hash of the whole flow (addresses, ports, protocol): three multiply rounds.
#[inline(always)]
pub fn flow_hash(f: &FlowKey) -> u32 {
    let ports = ((f.sport as u64) << 16 | f.dport as u64) << 8 | f.proto as u64;
    let mut h = round(SEED, fold_addr(&f.src));
    h = round(h, fold_addr(&f.dst));
    h = (h ^ ports).wrapping_mul(K);
    (h >> 32) as u32
}

/// Hash of the client address only (VIPs with source-IP affinity).
#[inline(always)]
pub fn src_hash(f: &FlowKey) -> u32 {
    let h = round(SEED, fold_addr(&f.src)).wrapping_mul(K);
    (h >> 32) as u32
}

/// Hash of a per-source limiter key (VIP, family, source /32 or /64): 64 bits, for the
/// first-seen filter's slot and fingerprint (`crate::seen`).
#[inline(always)]
pub fn src_key_hash(k: &crate::SrcKey) -> u64 {
    let h = round(SEED, (k.vip as u64) << 32 | k.family as u64);
    round(h, (k.addr[0] as u64) << 32 | k.addr[1] as u64).wrapping_mul(K)
}

/// The IPv6 outer header's flow label: entropy of the inner flow for ECMP between the
/// balancer and the backends (20 bits).
#[inline(always)]
pub fn flow_label(f: &FlowKey) -> u32 {
    (f.src[3] ^ f.src[0] ^ (f.sport as u32) << 4 ^ f.dport as u32) & 0xf_ffff
}

/// GUE's UDP source port: a hash of the inner flow, in the dynamic port range 49152-65535,
/// so that a backend's NIC spreads flows over its receive queues (RSS).
#[inline(always)]
pub fn gue_sport(f: &FlowKey) -> u16 {
    let x = f.src[0] ^ f.src[3] ^ f.dst[0] ^ ((f.sport as u32) << 16 | f.dport as u32);
    (x.wrapping_mul(0x9e37_79b1) >> 18) as u16 | 0xc000
}

/// MurmurHash3 (x86, 32-bit) over the words of the flow: the hash before `flow_hash`, kept
/// for the benchmark that compares the two.
pub mod murmur3 {
    use crate::FlowKey;

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
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FAMILY_V4, FAMILY_V6, PROTO_TCP};

    fn v4(src: [u8; 4], sport: u16) -> FlowKey {
        FlowKey {
            src: [u32::from_ne_bytes(src), 0, 0, 0],
            dst: [u32::from_ne_bytes([10, 100, 0, 1]), 0, 0, 0],
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    /// Chi-square of `n` hashes over `buckets` slots (Maglev reduces modulo a prime).
    fn chi2(hashes: impl Iterator<Item = u32>, buckets: u32) -> f64 {
        let mut counts = vec![0u64; buckets as usize];
        let mut n = 0u64;
        for h in hashes {
            counts[(h % buckets) as usize] += 1;
            n += 1;
        }
        let e = n as f64 / buckets as f64;
        counts.iter().map(|&c| (c as f64 - e).powi(2) / e).sum()
    }

    /// The statistic of a random spread is about `buckets - 1`; allow 4 standard deviations
    /// (sqrt(2 * (buckets - 1)) each) above. Below is fine: sequential inputs may spread more
    /// evenly than random ones would.
    fn assert_uniform(what: &str, hashes: impl Iterator<Item = u32>, buckets: u32) {
        let df = (buckets - 1) as f64;
        let x = chi2(hashes, buckets);
        assert!(
            x - df < 4.0 * (2.0 * df).sqrt(),
            "{what}: chi-square {x:.0} over {buckets} slots (expected about {df})"
        );
    }

    #[test]
    fn sequential_ports_spread_evenly() {
        assert_uniform(
            "ports",
            (0..60_000u16).map(|p| flow_hash(&v4([192, 0, 2, 10], 1024 + p))),
            251,
        );
        assert_uniform(
            "ports, ring 65537",
            (0..2_000_000u32)
                .map(|i| flow_hash(&v4([198, 18, (i >> 16) as u8, (i >> 8) as u8], i as u16))),
            65537,
        );
    }

    #[test]
    fn sequential_addresses_spread_evenly() {
        assert_uniform(
            "addresses",
            (0..200_000u32).map(|i| {
                let b = (0x0a00_0000 + i).to_be_bytes();
                flow_hash(&v4(b, 40000))
            }),
            251,
        );
        assert_uniform(
            "source hash",
            (0..200_000u32).map(|i| src_hash(&v4((0x0a00_0000 + i).to_be_bytes(), 1))),
            101,
        );
        let v6 = |i: u32| {
            let mut f = v4([0; 4], 40000);
            f.family = FAMILY_V6;
            f.src = [0x2001_0db8u32.to_be(), 0, 0, i.to_be()];
            f.dst = [0xfd00_0100u32.to_be(), 0, 0, 1u32.to_be()];
            f
        };
        assert_uniform("IPv6", (0..200_000u32).map(|i| flow_hash(&v6(i))), 251);
    }

    #[test]
    fn hash_is_pinned() {
        // Balancers of a pair and of different versions must agree: a change here moves
        // flows after an upgrade.
        assert_eq!(flow_hash(&v4([192, 0, 2, 10], 40000)), 1_862_211_109);
    }
}
