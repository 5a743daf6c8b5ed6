//! The connection table's slots: sets of [`CONN_WAYS`] slots that the datapath writes
//! without a lock, and the check word that lets readers tell a whole slot from a torn one.

use crate::{ConnEntry, FlowKey};

/// Ways per set of the connection table: a flow lives in one of the `CONN_WAYS` slots of the
/// set its flow hash picks (`conn_set`). 8: a set is 512 bytes, eight cache
/// lines, and with 4 ways the default table would leave about 1 flow in 230 without an entry
/// at 1 million flows, not 1 in 6,800.
pub const CONN_WAYS: usize = 8;

/// The set of a flow of hash `h` in a table of `mask + 1` sets (a power of two): the hash's
/// low bits. The datapath and user space's reader both find a flow's set with it.
#[inline(always)]
pub fn conn_set(h: u32, mask: u32) -> u32 {
    h & mask
}

/// The way at which a flow of hash `h` starts its scan of the set (its top bits; the set
/// comes from the low ones). Each flow scans from its own way, wrapping around: were every
/// scan to start at way 0, the busiest slots would all sit at the start of their 512-byte
/// sets, and so in one eighth of the CPU caches' sets.
#[inline(always)]
pub fn conn_home(h: u32) -> usize {
    (h >> (32 - CONN_WAYS.trailing_zeros())) as usize
}

/// One slot of the connection table: the flow, its entry, and a check word that ties them
/// together (`conn_check`; 0: the slot is empty). CPUs write slots without a lock: a writer
/// clears the check word, writes the key and entry, then the check word, so a reader that
/// meets a slot half written (or two writes mixed) finds the check wrong and treats the flow
/// as unknown.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnSlot {
    pub key: FlowKey,
    pub entry: ConnEntry,
    pub check: u32,
    pub _pad: u32,
}
const _: () = assert!(size_of::<ConnSlot>() == 64);

impl ConnSlot {
    /// Whether the slot holds `flow` (of hash `h`) whole: in use, the same key, and a check
    /// word that matches the key's hash and the entry.
    #[inline(always)]
    pub fn holds(&self, flow: &FlowKey, h: u32) -> bool {
        self.check != 0 && flow_eq(&self.key, flow) && self.check == conn_check(h, &self.entry)
    }
}

/// One set of the connection table (one array element).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnSet {
    pub slots: [ConnSlot; CONN_WAYS],
}

/// Slots of each CPU's flow memo (`FLOW_MEMO`), at most: 2^15, 2 MiB per CPU.
pub const FLOW_MEMO_SLOTS: u32 = 1 << 15;
/// Slots of the flow memo over all CPUs, at most (beyond 32 CPUs): 2^20, 64 MiB.
pub const FLOW_MEMO_MAX_SLOTS: u32 = 1 << 20;
/// Longest a memo entry answers for its flow's connection-table entry, in clock ticks
/// (about 134 ms; see [`memo_window`]).
pub const FLOW_MEMO_TICKS: u32 = 128;

/// Slots per CPU of the flow memo on a machine of `cpus` CPUs (a power of two):
/// [`FLOW_MEMO_SLOTS`] up to 32 CPUs, fewer beyond, so that all CPUs together take at most
/// [`FLOW_MEMO_MAX_SLOTS`], but never fewer than 4096 (256 KiB).
pub fn flow_memo_slots(cpus: u32) -> u32 {
    (FLOW_MEMO_MAX_SLOTS / cpus.max(1).next_power_of_two()).clamp(1 << 12, FLOW_MEMO_SLOTS)
}

/// One CPU's copy of a flow's connection-table entry, as that CPU last found it there
/// (`checked`: the clock tick it did). For that CPU's next packets of the flow, within the
/// memo's window ([`memo_window`]), it stands for the entry: a busy flow's packets read the
/// small per-CPU memo, not a line of the large shared table (with thousands of flows, those
/// lines are spread over more pages than the CPU's TLB covers). Only its CPU writes it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowMemo {
    pub key: FlowKey,
    pub backend: u32,
    pub generation: u32,
    pub vip: u32,
    pub checked: u32,
    pub _pad: [u32; 2],
}
const _: () = assert!(size_of::<FlowMemo>() == 64);

/// How many clock ticks a memo entry answers for a flow whose protocol's idle timeout is
/// `idle` ticks (0: none): [`FLOW_MEMO_TICKS`], and at most an eighth of the timeout.
///
/// Packets the memo answers do not stamp the table's entry, so its `last_seen` lags the
/// flow's last packet by up to one window: a flow idle after such a packet expires up to a
/// window early (at 7/8 of a timeout under 1 s, 134 ms early for longer ones), and a full set
/// chooses the flow idle longest to that precision.
#[inline(always)]
pub fn memo_window(idle: u32) -> u32 {
    if idle == 0 {
        FLOW_MEMO_TICKS
    } else {
        (idle / 8).min(FLOW_MEMO_TICKS)
    }
}

/// Each CPU's count of how well its memo answers (`MEMO_METER`), in windows of
/// 2^[`MEMO_METER_SHIFT`] clock ticks. With far more busy flows than slots (a million flows
/// all sending alike), nearly every packet reads a memo line for nothing, and that costs
/// more than the memo saves: the memo is then off for the next window, but for the flows of
/// one slot in 16 ([`memo_sampled`]), whose hits say when it pays again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoMeter {
    /// The window counted: clock tick >> [`MEMO_METER_SHIFT`].
    pub window: u32,
    /// Memo lookups in the window, and how many the memo answered.
    pub looked: u32,
    pub hits: u32,
    /// 1: off in this window (the last one counted answered too few, [`memo_pays`]).
    pub off: u32,
}
const _: () = assert!(size_of::<MemoMeter>() == 16);

/// Clock ticks per memo meter window, as a shift: 16 ticks, about 17 ms.
pub const MEMO_METER_SHIFT: u32 = 4;

/// Whether the memo is used for every flow in the window after one in which it made
/// `looked` lookups and answered `hits`: unless it answered fewer than a quarter of at least
/// 64.
#[inline(always)]
pub fn memo_pays(looked: u32, hits: u32) -> bool {
    looked < 64 || hits.saturating_mul(4) >= looked
}

/// Whether a flow of hash `h` uses the memo while it is off: the flows whose slot is one in
/// 16 (the hash's low four bits, which the slot's index starts with). They load those slots
/// as all flows load all slots, so their hit rate is the memo's.
#[inline(always)]
pub fn memo_sampled(h: u32) -> bool {
    h & 15 == 0
}

/// The check word of a slot holding a flow of hash `h` with entry `e` (never 0). It leaves
/// out `last_seen`, which readers stamp in place.
#[inline(always)]
pub fn conn_check(h: u32, e: &ConnEntry) -> u32 {
    let a = ((h as u64) << 32 | e.backend as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let b = a ^ ((e.generation as u64) << 32 | e.vip as u64);
    (b.wrapping_mul(0xc2b2_ae3d_27d4_eb4f) >> 32) as u32 | 1
}

/// Whether two flow keys are equal, word by word (a derived `==` may become a `bcmp` call,
/// which BPF has not).
#[inline(always)]
pub fn flow_eq(a: &FlowKey, b: &FlowKey) -> bool {
    // SAFETY: FlowKey is 40 bytes of plain data, 8-aligned.
    let (a, b) = unsafe {
        (
            &*(a as *const FlowKey as *const [u64; 5]),
            &*(b as *const FlowKey as *const [u64; 5]),
        )
    };
    (a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> FlowKey {
        FlowKey {
            src: [1, 2, 3, 4],
            dst: [5, 6, 7, 8],
            sport: 9,
            dport: 10,
            proto: 6,
            family: 2,
            _pad: [0; 2],
        }
    }

    #[test]
    fn the_memo_takes_2_mib_per_cpu_up_to_32_cpus_and_64_mib_beyond() {
        let per_cpu = [(0, 32768), (1, 32768), (2, 32768), (32, 32768), (48, 16384)];
        let more = [(64, 16384), (128, 8192), (256, 4096), (4096, 4096)];
        for (cpus, slots) in per_cpu.into_iter().chain(more) {
            assert_eq!(flow_memo_slots(cpus), slots, "{cpus} CPUs");
        }
    }

    #[test]
    fn the_memo_goes_off_below_a_quarter_of_hits_and_samples_one_slot_in_16() {
        assert!(memo_pays(0, 0), "no lookups: on");
        assert!(memo_pays(63, 0), "too few lookups to judge");
        assert!(!memo_pays(64, 15));
        assert!(memo_pays(64, 16));
        assert!(!memo_pays(u32::MAX, u32::MAX / 5));
        assert!(memo_pays(u32::MAX, u32::MAX / 2));
        let mask = FLOW_MEMO_SLOTS - 1;
        let sampled: Vec<u32> = (0..4096u32)
            .map(|i| i.wrapping_mul(0x9e37_79b9))
            .filter(|h| memo_sampled(*h))
            .collect();
        assert_eq!(sampled.len(), 256, "one flow in 16");
        assert!(
            sampled.iter().all(|h| (h & mask).is_multiple_of(16)),
            "one slot in 16"
        );
    }

    #[test]
    fn a_memo_answers_for_at_most_an_eighth_of_the_idle_timeout() {
        assert_eq!(memo_window(0), FLOW_MEMO_TICKS);
        assert_eq!(memo_window(96), 12);
        assert_eq!(
            memo_window(7),
            0,
            "a timeout under 8 ticks leaves the memo unused"
        );
        assert_eq!(memo_window(8 * FLOW_MEMO_TICKS), FLOW_MEMO_TICKS);
        assert_eq!(memo_window(u32::MAX), FLOW_MEMO_TICKS);
    }

    #[test]
    fn flow_eq_sees_every_field() {
        let a = flow();
        assert!(flow_eq(&a, &a));
        let changes: [fn(&mut FlowKey); 6] = [
            |f| f.src[3] ^= 1,
            |f| f.dst[0] ^= 1 << 31,
            |f| f.sport ^= 1,
            |f| f.dport ^= 1 << 15,
            |f| f.proto ^= 1,
            |f| f.family ^= 1,
        ];
        for change in changes {
            let mut b = a;
            change(&mut b);
            assert!(!flow_eq(&a, &b), "{b:?}");
        }
    }

    #[test]
    fn the_check_word_is_never_empty_and_ties_flow_to_entry() {
        let e = ConnEntry {
            backend: 7,
            generation: 3,
            vip: 2,
            last_seen: 100,
        };
        for h in [0, 1, u32::MAX] {
            assert_ne!(conn_check(h, &e), 0);
        }
        let check = conn_check(0x1234_5678, &e);
        // A slot mixing two writes: another flow's hash, or another entry's fields.
        assert_ne!(conn_check(0x1234_5679, &e), check);
        for other in [
            ConnEntry { backend: 8, ..e },
            ConnEntry { generation: 4, ..e },
            ConnEntry { vip: 3, ..e },
        ] {
            assert_ne!(conn_check(0x1234_5678, &other), check, "{other:?}");
        }
        // Readers stamp last_seen in place: it is not part of the check.
        assert_eq!(
            conn_check(0x1234_5678, &ConnEntry { last_seen: 5, ..e }),
            check
        );
    }

    #[test]
    fn home_ways_cover_the_set() {
        let mut seen = [false; CONN_WAYS];
        for i in 0..1000u32 {
            let w = conn_home(i.wrapping_mul(0x9e37_79b1));
            seen[w] = true;
        }
        assert!(seen.iter().all(|&s| s));
        assert_eq!(conn_home(u32::MAX), CONN_WAYS - 1);
    }

    #[test]
    fn a_slot_is_one_cache_line() {
        assert_eq!(size_of::<ConnSlot>(), 64);
        assert_eq!(size_of::<ConnSet>(), 64 * CONN_WAYS);
        assert_eq!(align_of::<FlowKey>(), 8);
    }
}
