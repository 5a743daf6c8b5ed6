//! The per-source first-seen filter: a fixed array in front of the LRU of token buckets.
//!
//! A source's first new flow in a while is admitted (its bucket would start full) and only
//! noted here: a fingerprint of its key and the time, in the slot its key hashes to. Its
//! bucket is made at its second new flow within one interval, as if it had been made at the
//! first. A random-source flood, whose sources are each seen once, then makes no buckets: an
//! LRU insert costs as much as a connection-table insert, and would double the cost of every
//! flood packet. Writing a slot is a plain store.
//!
//! Two sources sharing a slot overwrite each other's note: a source whose note was
//! overwritten between its first two flows has its bucket made one flow later. A match needs
//! the 24-bit fingerprint too, so one source is taken for another only when both the slot and
//! the fingerprint collide. The time wraps every 13 days: a note that old, never overwritten,
//! can pass for a recent one, and makes a source's bucket one flow early.

use crate::{SRC_SEEN_SLOTS, SrcKey, hash};

/// Bits of a slot holding the time (units of 1024 ns: 2^40 of them are 13 days); the
/// fingerprint takes the 24 above them.
const TIME_BITS: u32 = 40;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
const UNIT_SHIFT: u32 = 10;

/// Bits of the slot index.
const SLOT_BITS: u32 = SRC_SEEN_SLOTS.trailing_zeros();

/// The slot of `key` and its fingerprint, from the hash's top bits (a multiply mixes the
/// high bits best).
#[inline(always)]
pub fn slot(key: &SrcKey) -> (u32, u64) {
    let h = hash::src_key_hash(key);
    let slot = (h >> (64 - SLOT_BITS)) as u32;
    let fingerprint = (h >> (64 - SLOT_BITS - (64 - TIME_BITS))) & ((1 << (64 - TIME_BITS)) - 1);
    (slot, fingerprint)
}

/// A slot's value: `fingerprint` seen at `now` (ns).
#[inline(always)]
pub fn note(fingerprint: u64, now: u64) -> u64 {
    fingerprint << TIME_BITS | (now >> UNIT_SHIFT) & TIME_MASK
}

/// When the source of `fingerprint` was noted in a slot holding `value`, if that was less
/// than `window` ns before `now` (ns, rounded to 1024 ns).
#[inline(always)]
pub fn noted_within(value: u64, fingerprint: u64, now: u64, window: u64) -> Option<u64> {
    if value == 0 || value >> TIME_BITS != fingerprint {
        return None;
    }
    let age = ((now >> UNIT_SHIFT).wrapping_sub(value) & TIME_MASK) << UNIT_SHIFT;
    (age < window).then(|| now - age)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(addr: u32) -> SrcKey {
        SrcKey {
            vip: 3,
            family: crate::FAMILY_V4 as u32,
            addr: [addr, 0],
        }
    }

    #[test]
    fn a_note_is_found_within_its_window_only() {
        let (_, fp) = slot(&key(0x0a00_0001));
        let t0 = 5_000_000_000_000;
        let v = note(fp, t0);
        let at = noted_within(v, fp, t0 + 1_000_000, 10_000_000).expect("within");
        assert!(t0.abs_diff(at) < 1024, "rounded to the unit: {t0} vs {at}");
        assert_eq!(noted_within(v, fp, t0 + 10_001_024, 10_000_000), None);
        assert_eq!(
            noted_within(v, fp ^ 1, t0 + 1_000, 10_000_000),
            None,
            "other source"
        );
        assert_eq!(noted_within(0, 0, t0, u64::MAX), None, "an empty slot");
    }

    #[test]
    fn a_note_is_found_across_the_time_wrap() {
        let (_, fp) = slot(&key(7));
        // Noted just before the time bits wrap, looked for just after.
        let t0 = (TIME_MASK << UNIT_SHIFT) - 2048;
        let v = note(fp, t0);
        assert!(noted_within(v, fp, t0 + 4096, 1_000_000).is_some());
    }

    #[test]
    fn sources_spread_over_the_slots() {
        let mut used = std::collections::HashSet::new();
        for a in 0..100_000u32 {
            used.insert(slot(&key(0x6440_0000 + a)).0);
        }
        // 100k keys in 2^20 slots: about 4.6% collide at random.
        assert!(used.len() > 93_000, "{} distinct slots", used.len());
    }
}
