//! The VIP table: the VIPs (address, port, protocol -> `VipMeta`) in an array of buckets,
//! which the datapath reads without a call (the verifier inlines an array lookup, where a
//! hash-map lookup calls the kernel's hash and key compare).
//!
//! The hash map `VIPS` stays the truth; the table is a copy of it (`VIP_WAYS` keys per
//! bucket). A lookup has three answers ([`Lookup`]): the key's meta; the key is no VIP (no
//! slot holds it and its bucket never spilled); or unsure, and `VIPS` decides. A slot that
//! holds the key counts only when its check word matches its key and meta, so a slot that a
//! reader meets half written (user space rewrites a whole bucket in one update, which the
//! kernel copies without a lock) makes the answer unsure; a key that did not fit marks its
//! bucket spilled, and every miss in a spilled bucket is unsure. User space writes a key
//! into `VIPS` before the table and removes it from the table before `VIPS`, never moves a
//! key to another slot, and brings the table in line with `VIPS` whenever it takes over the
//! maps: the table never shows a VIP that `VIPS` does not hold, nor hides one it does.

use crate::{
    VipKey, VipMeta,
    hash::{K, round},
};

/// Slots per bucket.
pub const VIP_WAYS: usize = 4;
/// Buckets in the table (a power of two): 4096 slots for at most `MAX_VIPS` (512) keys, so
/// that a full bucket (whose fifth key is found through `VIPS`) is rare.
pub const VIP_BUCKETS: u32 = 1024;

/// One slot: a VIP's key and meta, and their check word (0: the slot is empty).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipSlot {
    pub key: VipKey,
    pub meta: VipMeta,
    pub check: u32,
}
const _: () = assert!(size_of::<VipSlot>() == 40);

/// One bucket of the table (one array element).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipBucket {
    pub slots: [VipSlot; VIP_WAYS],
    /// Not 0 once a key did not fit: a miss here proves nothing.
    pub spilled: u32,
}

/// What the table says of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lookup {
    Found(VipMeta),
    /// No such VIP.
    Absent,
    /// Ask `VIPS`: the key's slot was half written, or its bucket spilled.
    Unsure,
}

/// The key's last word: port, protocol and family, as memory holds them.
#[inline(always)]
pub fn vip_key_tail(k: &VipKey) -> u32 {
    let p = k.port.to_ne_bytes();
    u32::from_ne_bytes([p[0], p[1], k.proto, k.family])
}

#[inline(always)]
fn key_tail(k: &VipKey) -> u64 {
    vip_key_tail(k) as u64
}

/// The bucket of a key.
#[inline(always)]
pub fn vip_bucket(k: &VipKey) -> u32 {
    let a = &k.addr;
    let h = round(0x7669_7074_6162_6c65, (a[0] as u64) << 32 | a[1] as u64);
    let h = round(h, (a[2] as u64) << 32 | a[3] as u64);
    let h = round(h, key_tail(k)).wrapping_mul(K);
    (h >> 32) as u32 & (VIP_BUCKETS - 1)
}

/// The check word of a slot holding `key` with `meta` (never 0): every bit of both.
#[inline(always)]
pub fn vip_check(k: &VipKey, m: &VipMeta) -> u32 {
    let a = &k.addr;
    let h = round(0x6368_6563_6b76_6970, (a[0] as u64) << 32 | a[1] as u64);
    let h = round(h, (a[2] as u64) << 32 | a[3] as u64);
    let h = round(h, key_tail(k) << 32 | m.index as u64);
    let h = round(h, (m.flags as u64) << 32 | m.ring_size as u64);
    let h = (h ^ m.ring_off as u64).wrapping_mul(K);
    (h >> 32) as u32 | 1
}

/// Whether two VIP keys are equal, word by word (a derived `==` may become a `bcmp` call,
/// which BPF has not).
#[inline(always)]
pub fn vip_key_eq(a: &VipKey, b: &VipKey) -> bool {
    a.addr[0] ^ b.addr[0] | a.addr[1] ^ b.addr[1] | a.addr[2] ^ b.addr[2] | a.addr[3] ^ b.addr[3]
        == 0
        && key_tail(a) == key_tail(b)
}

impl VipSlot {
    /// A slot holding `key` with `meta`.
    pub fn new(key: VipKey, meta: VipMeta) -> Self {
        Self {
            key,
            meta,
            check: vip_check(&key, &meta),
        }
    }
}

impl VipBucket {
    /// Puts `key` with `meta` in its own slot, else in the first empty one. `false`: the
    /// bucket is full; it is marked spilled, and the key is found through `VIPS`.
    pub fn set(&mut self, key: VipKey, meta: VipMeta) -> bool {
        let own = self
            .slots
            .iter()
            .position(|s| s.check != 0 && vip_key_eq(&s.key, &key));
        match own.or_else(|| self.slots.iter().position(|s| s.check == 0)) {
            Some(i) => {
                self.slots[i] = VipSlot::new(key, meta);
                true
            }
            None => {
                self.spilled = 1;
                false
            }
        }
    }

    /// Empties `key`'s slot; `false` if the bucket does not hold it.
    pub fn remove(&mut self, key: &VipKey) -> bool {
        match self
            .slots
            .iter()
            .position(|s| s.check != 0 && vip_key_eq(&s.key, key))
        {
            Some(i) => {
                self.slots[i] = VipSlot::default();
                true
            }
            None => false,
        }
    }

    /// What the bucket says of `key`, as the datapath reads it (`lookup::table_vip`).
    pub fn lookup(&self, key: &VipKey) -> Lookup {
        match self
            .slots
            .iter()
            .find(|s| s.check != 0 && vip_key_eq(&s.key, key))
        {
            Some(s) if s.check == vip_check(key, &s.meta) => Lookup::Found(s.meta),
            Some(_) => Lookup::Unsure,
            None if self.spilled != 0 => Lookup::Unsure,
            None => Lookup::Absent,
        }
    }

    /// The meta of `key` if the bucket shows it.
    pub fn get(&self, key: &VipKey) -> Option<VipMeta> {
        match self.lookup(key) {
            Lookup::Found(m) => Some(m),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32, port: u16) -> VipKey {
        VipKey {
            addr: [0x0a00_0000 + i, 0, 0, 0],
            port,
            proto: 6,
            family: 4,
        }
    }

    fn meta(index: u32) -> VipMeta {
        VipMeta {
            index,
            flags: 0,
            ring_size: 65537,
            ring_off: 0,
        }
    }

    #[test]
    fn keys_spread_over_the_buckets() {
        let mut per = vec![0u32; VIP_BUCKETS as usize];
        for i in 0..512 {
            per[vip_bucket(&key(i, 80)) as usize] += 1;
        }
        let full = per.iter().filter(|n| **n > VIP_WAYS as u32).count();
        assert_eq!(full, 0, "512 sequential VIPs overflow a bucket");
        let ports: std::collections::HashSet<u32> =
            (0..512).map(|p| vip_bucket(&key(1, p as u16))).collect();
        assert!(
            ports.len() > 350,
            "ports of one address share {} buckets",
            ports.len()
        );
    }

    #[test]
    fn the_check_word_is_never_empty_and_sees_every_field() {
        let (k, m) = (key(1, 80), meta(3));
        let c = vip_check(&k, &m);
        assert_ne!(c, 0);
        let keys: [fn(&mut VipKey); 6] = [
            |k| k.addr[0] ^= 1,
            |k| k.addr[3] ^= 1 << 31,
            |k| k.port ^= 1,
            |k| k.proto ^= 1,
            |k| k.family ^= 2,
            |k| k.addr[1] ^= 1 << 7,
        ];
        for change in keys {
            let mut k2 = k;
            change(&mut k2);
            assert!(!vip_key_eq(&k, &k2), "{k2:?}");
            assert_ne!(vip_check(&k2, &m), c, "{k2:?}");
        }
        let metas: [fn(&mut VipMeta); 4] = [
            |m| m.index ^= 1,
            |m| m.flags ^= 1,
            |m| m.ring_size ^= 2,
            |m| m.ring_off = 65537,
        ];
        for change in metas {
            let mut m2 = m;
            change(&mut m2);
            assert_ne!(vip_check(&k, &m2), c, "{m2:?}");
        }
    }

    #[test]
    fn a_bucket_keeps_a_key_in_its_own_slot_and_says_when_it_is_full() {
        let mut b = VipBucket::default();
        for i in 0..VIP_WAYS as u32 {
            assert!(b.set(key(i, 80), meta(i)));
        }
        assert_eq!(b.lookup(&key(9, 80)), Lookup::Absent);
        assert!(!b.set(key(9, 80), meta(9)), "a fifth key");
        assert_eq!(
            b.lookup(&key(9, 80)),
            Lookup::Unsure,
            "a miss in a spilled bucket"
        );
        assert_eq!(b.lookup(&key(8, 80)), Lookup::Unsure);
        // A new meta for a key goes into its own slot, not into a free one.
        assert!(b.set(key(2, 80), meta(42)));
        assert_eq!(b.get(&key(2, 80)), Some(meta(42)));
        assert_eq!(b.slots.iter().filter(|s| s.check != 0).count(), VIP_WAYS);
        assert!(b.remove(&key(1, 80)));
        assert!(!b.remove(&key(1, 80)));
        assert_eq!(b.get(&key(1, 80)), None);
        assert!(b.set(key(9, 80), meta(9)), "the freed slot");
        assert_eq!(b.lookup(&key(9, 80)), Lookup::Found(meta(9)));
        assert_ne!(
            b.spilled, 0,
            "stays spilled: another key may still be left out"
        );
    }

    #[test]
    fn the_key_tail_is_the_word_the_datapath_reads() {
        let k = key(1, 0x5000);
        // SAFETY: VipKey is 20 bytes of plain data; its tail is the word at byte 16.
        let word = unsafe { (&raw const k).cast::<u32>().add(4).read_unaligned() };
        assert_eq!(vip_key_tail(&k), word);
    }

    #[test]
    fn a_slot_half_written_is_not_found() {
        let mut b = VipBucket::default();
        b.set(key(1, 80), meta(1));
        let i = b.slots.iter().position(|s| s.check != 0).unwrap();
        // The new meta landed, the check word is still the old one's.
        b.slots[i].meta.ring_off = 65537;
        assert_eq!(b.lookup(&key(1, 80)), Lookup::Unsure);
        // And a new key over an old slot's meta and check.
        b.slots[i] = VipSlot::new(key(1, 80), meta(1));
        b.slots[i].key = key(2, 80);
        assert_eq!(b.lookup(&key(2, 80)), Lookup::Unsure);
        assert_eq!(b.lookup(&key(1, 80)), Lookup::Absent);
    }
}
