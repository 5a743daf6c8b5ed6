//! Maglev consistent hashing (Eisenbud et al., NSDI 2016) with weights.
//!
//! Pure code: a backend set in, a lookup table out. The table depends only on the backends'
//! identities (their addresses) and weights, never on the order they are given in or on the
//! machine, so the two balancers of a pair build the same table and a flow lands on the same
//! backend through either of them.
//!
//! Weights follow Katran's second Maglev version: in every round each backend adds its weight
//! to a credit, and takes a turn (its next preferred free slot) whenever the credit reaches
//! the largest weight. Shares of the table are then proportional to the weights to within a
//! slot or so.

use lb_common::NO_BACKEND;

/// One backend as the table builder sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Stable identity hashed to the backend's permutation (its address bytes).
    pub id: Vec<u8>,
    /// Relative weight; 0 takes no slot.
    pub weight: u32,
    /// What the table holds for this backend (its datapath index).
    pub value: u32,
}

/// Whether `n` is prime (ring sizes must be, so that every skip visits every slot).
pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    let mut d = 2u64;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// 64-bit hash of a byte string (splitmix64 rounds over 8-byte chunks), fixed forever: it
/// decides table layouts that two machines must agree on.
pub fn stable_hash(bytes: &[u8], seed: u64) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    let mut h = mix(seed ^ (bytes.len() as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    for chunk in bytes.chunks(8) {
        let mut w = [0u8; 8];
        w[..chunk.len()].copy_from_slice(chunk);
        h = mix(h ^ u64::from_le_bytes(w)).wrapping_add(0x9e37_79b9_7f4a_7c15);
    }
    mix(h)
}

/// Builds the lookup table of `size` slots (`size` prime). Slots hold `Entry::value`, or
/// `NO_BACKEND` when no backend has a positive weight.
pub fn build(entries: &[Entry], size: u32) -> Vec<u32> {
    assert!(is_prime(size), "Maglev table size {size} is not prime");
    let m = size as u64;
    let mut table = vec![NO_BACKEND; size as usize];
    let mut backends: Vec<&Entry> = entries.iter().filter(|e| e.weight > 0).collect();
    if backends.is_empty() {
        return table;
    }
    // Order by identity: the turn order decides contested slots, so it must not depend on the
    // caller's order.
    backends.sort_by(|a, b| a.id.cmp(&b.id));
    let max_weight = backends.iter().map(|e| e.weight as u64).max().unwrap_or(1);
    struct Walk {
        pos: u32,
        skip: u32,
        credit: u64,
        weight: u64,
        value: u32,
    }
    let mut walks: Vec<Walk> = backends
        .iter()
        .map(|e| Walk {
            pos: (stable_hash(&e.id, 0x6f66_6673_6574) % m) as u32,
            skip: (stable_hash(&e.id, 0x736b_6970) % (m - 1) + 1) as u32,
            credit: 0,
            weight: e.weight as u64,
            value: e.value,
        })
        .collect();
    // `pos + skip` stays below 2 * size, so one subtraction replaces the modulo.
    let step = |pos: u32, skip: u32| {
        let next = pos + skip;
        if next >= size { next - size } else { next }
    };
    // Which slots are taken, one bit each: 8 KiB for 65537 slots stays in the L1 cache, where
    // the table itself (256 KiB) does not, and a turn probes about 12 slots on average.
    let mut taken = vec![0u64; (size as usize).div_ceil(64)];
    let is_taken = |taken: &[u64], pos: u32| taken[(pos >> 6) as usize] & (1 << (pos & 63)) != 0;
    let mut filled = 0u32;
    loop {
        for w in walks.iter_mut() {
            w.credit += w.weight;
            if w.credit < max_weight {
                continue;
            }
            w.credit -= max_weight;
            while is_taken(&taken, w.pos) {
                w.pos = step(w.pos, w.skip);
            }
            taken[(w.pos >> 6) as usize] |= 1 << (w.pos & 63);
            table[w.pos as usize] = w.value;
            w.pos = step(w.pos, w.skip);
            filled += 1;
            if filled == size {
                return table;
            }
        }
    }
}

/// The input of one table build.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub entries: Vec<Entry>,
    pub size: u32,
}

#[cfg(test)]
mod tests {
    use rand::{SeedableRng, rngs::StdRng, seq::SliceRandom};

    use super::*;

    const M: u32 = lb_common::DEFAULT_RING_SIZE;

    fn entries(n: u32, weight: impl Fn(u32) -> u32) -> Vec<Entry> {
        (0..n)
            .map(|i| Entry {
                id: [10, 1, (i >> 8) as u8, i as u8].to_vec(),
                weight: weight(i),
                value: i,
            })
            .collect()
    }

    fn counts(table: &[u32], n: u32) -> Vec<u64> {
        let mut c = vec![0u64; n as usize];
        for &v in table {
            c[v as usize] += 1;
        }
        c
    }

    /// Each backend's share of slots is within 1% of its weight share (relative), or within
    /// one slot where 1% of the share is less than a slot.
    fn assert_shares(n: u32, weight: impl Fn(u32) -> u32 + Copy) {
        let e = entries(n, weight);
        let table = build(&e, M);
        let total: u64 = e.iter().map(|e| e.weight as u64).sum();
        for (i, &c) in counts(&table, n).iter().enumerate() {
            let expected = M as f64 * weight(i as u32) as f64 / total as f64;
            let tolerance = (expected * 0.01).max(1.0);
            assert!(
                (c as f64 - expected).abs() <= tolerance,
                "n={n} backend {i}: {c} slots, expected {expected:.1} ± {tolerance:.1}"
            );
        }
    }

    #[test]
    fn shares_follow_weights() {
        for n in [1, 2, 3, 10, 100, 1000] {
            assert_shares(n, |_| 1);
            assert_shares(n, |i| 1 + i % 5);
        }
        assert_shares(10, |i| if i == 0 { 1000 } else { 1 });
        assert_shares(3, |i| [5, 20, 75][i as usize]);
    }

    #[test]
    fn every_slot_is_filled_and_weight_zero_takes_none() {
        let e = entries(5, |i| if i == 2 { 0 } else { 1 });
        let table = build(&e, 251);
        assert!(table.iter().all(|&v| v != NO_BACKEND));
        assert!(!table.contains(&2));
        assert!(
            build(&entries(3, |_| 0), 251)
                .iter()
                .all(|&v| v == NO_BACKEND)
        );
        assert!(build(&[], 251).iter().all(|&v| v == NO_BACKEND));
    }

    #[test]
    fn removing_one_backend_moves_its_slots_and_at_most_one_percent_more() {
        for n in [2, 3, 10, 100, 1000] {
            let all = entries(n, |_| 1);
            let before = build(&all, M);
            for removed in [0, n / 2, n - 1] {
                let rest: Vec<Entry> = all.iter().filter(|e| e.value != removed).cloned().collect();
                let after = build(&rest, M);
                let moved_others = before
                    .iter()
                    .zip(&after)
                    .filter(|(b, a)| **b != removed && b != a)
                    .count();
                assert!(
                    moved_others as f64 <= 0.01 * M as f64,
                    "n={n}: removing {removed} moved {moved_others} slots of other backends"
                );
            }
        }
    }

    #[test]
    fn same_table_whatever_the_input_order() {
        let e = entries(100, |i| 1 + i % 3);
        let reference = build(&e, M);
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..5 {
            let mut shuffled = e.clone();
            shuffled.shuffle(&mut rng);
            assert_eq!(build(&shuffled, M), reference);
        }
    }

    #[test]
    fn table_is_pinned_across_machines_and_versions() {
        // The table decides where flows go on both balancers of a pair: it must never change
        // for the same input. If this fails, the hash or the algorithm changed.
        let table = build(&entries(3, |_| 1), 13);
        assert_eq!(table, [0, 2, 0, 0, 0, 1, 2, 1, 1, 1, 2, 0, 2]);
    }

    #[test]
    fn primes() {
        assert!(is_prime(65537) && is_prime(13) && is_prime(2));
        assert!(!is_prime(65536) && !is_prime(1) && !is_prime(0) && !is_prime(65535));
    }
}
