//! A VIP's limits on new flows in the maps: its `VIP_POLICY` entry (token-bucket parameters
//! and flags) and its source prefixes in the LPM tries.

use std::net::IpAddr;

use aya::maps::{Array, LpmTrie, MapData, lpm_trie::Key as LpmKey};
use lb_common::{
    FAMILY_V4, POLICY_F_ALLOW_ONLY, POLICY_F_PREFIXES, PREFIX_ALLOW, PREFIX_DENY, PrefixData4,
    PrefixData6, VipPolicy,
};

use super::{DatapathError, map_err};
use crate::{
    addr,
    state::{Policy, Prefix, RateLimit},
};

pub struct PolicyMaps {
    pub vip_policy: Array<MapData, VipPolicy>,
    pub prefixes_v4: LpmTrie<MapData, PrefixData4, u32>,
    pub prefixes_v6: LpmTrie<MapData, PrefixData6, u32>,
}

/// GCRA parameters (interval, tolerance) in ns of a rate, for `share` of it (each CPU's share
/// of a VIP cap), or zeros for no limit.
fn gcra(r: Option<RateLimit>, share: u32) -> (u64, u64) {
    let Some(r) = r else {
        return (0, 0);
    };
    let share = share.max(1) as u64;
    let interval = (1_000_000_000 * share / r.new_flows_per_s.max(1) as u64).max(1);
    let burst = (r.burst as u64 / share).max(1);
    (interval, interval * (burst - 1))
}

fn possible_cpus() -> u32 {
    aya::util::nr_cpus().map_or(1, |n| n.max(1)) as u32
}

impl PolicyMaps {
    /// Makes VIP index `index` carry `p`: its entry, and exactly its prefixes.
    pub fn set(&mut self, index: u32, p: &Policy) -> Result<(), DatapathError> {
        self.set_prefixes(index, &p.allow, &p.deny)?;
        let (src_interval_ns, src_tolerance_ns) = gcra(p.rate_limit, 1);
        let (cap_interval_ns, cap_tolerance_ns) = gcra(p.new_flow_cap, possible_cpus());
        let mut flags = 0;
        if !p.allow.is_empty() || !p.deny.is_empty() {
            flags |= POLICY_F_PREFIXES;
        }
        if !p.allow.is_empty() {
            flags |= POLICY_F_ALLOW_ONLY;
        }
        let entry = VipPolicy {
            src_interval_ns,
            src_tolerance_ns,
            cap_interval_ns,
            cap_tolerance_ns,
            flags,
            _pad: 0,
        };
        self.vip_policy
            .set(index, entry, 0)
            .map_err(map_err("VIP_POLICY"))
    }

    /// Replaces VIP index `index`'s prefixes (both families).
    fn set_prefixes(
        &mut self,
        index: u32,
        allow: &[Prefix],
        deny: &[Prefix],
    ) -> Result<(), DatapathError> {
        let old4: Vec<_> = self
            .prefixes_v4
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().vip == index)
            .collect();
        for k in old4 {
            let _ = self.prefixes_v4.remove(&k);
        }
        let old6: Vec<_> = self
            .prefixes_v6
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.data().vip == index)
            .collect();
        for k in old6 {
            let _ = self.prefixes_v6.remove(&k);
        }
        for (list, action) in [(allow, PREFIX_ALLOW), (deny, PREFIX_DENY)] {
            for p in list {
                self.insert(index, p, action)?;
            }
        }
        Ok(())
    }

    /// One prefix; the trie key's length is 32 (the VIP index, matched whole) plus the
    /// prefix's, and host bits are cleared.
    fn insert(&mut self, index: u32, p: &Prefix, action: u32) -> Result<(), DatapathError> {
        let (words, family) = addr::to_words(p.addr);
        if family == FAMILY_V4 {
            let len = p.len.min(32) as u32;
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            let data = PrefixData4 {
                vip: index,
                addr: (u32::from_be(words[0]) & mask).to_be(),
            };
            return self
                .prefixes_v4
                .insert(&LpmKey::new(32 + len, data), action, 0)
                .map_err(map_err("PREFIXES_V4"));
        }
        let len = p.len.min(128) as u32;
        let bits = u128::from_be_bytes(addr::bytes(p.addr).try_into().expect("16 bytes"));
        let mask = if len == 0 {
            0
        } else {
            u128::MAX << (128 - len)
        };
        let masked = IpAddr::from((bits & mask).to_be_bytes());
        let data = PrefixData6 {
            vip: index,
            addr: addr::to_words(masked).0,
        };
        self.prefixes_v6
            .insert(&LpmKey::new(32 + len, data), action, 0)
            .map_err(map_err("PREFIXES_V6"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_buckets_in_time_units() {
        let r = Some(RateLimit {
            new_flows_per_s: 100,
            burst: 20,
        });
        assert_eq!(gcra(r, 1), (10_000_000, 190_000_000));
        // A cap split over 2 CPUs: half the rate and half the burst each.
        assert_eq!(gcra(r, 2), (20_000_000, 180_000_000));
        assert_eq!(gcra(None, 1), (0, 0));
    }
}
