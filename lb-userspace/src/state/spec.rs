//! What the datapath must carry for a VIP, given which of its backends are healthy.

use std::net::IpAddr;

use lb_common::DEFAULT_RING_SIZE;

use super::{Affinity, BackendEntry, BackendState, Policy, Vip, VipId};

/// Largest backend weight.
pub const MAX_WEIGHT: u32 = 65_535;

/// A backend of a VIP, as the datapath sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub addr: IpAddr,
    /// Share of new flows; 0 takes none (drained).
    pub weight: u32,
    /// False when the backend is down or disabled: out of the ring, and its established
    /// flows move elsewhere.
    pub live: bool,
}

impl BackendSpec {
    pub fn new(addr: IpAddr, weight: u32) -> Self {
        Self {
            addr,
            weight,
            live: true,
        }
    }
}

/// Everything the datapath needs of one VIP.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VipSpec {
    pub id: VipId,
    /// Hash on the client address only.
    pub affinity_src_ip: bool,
    /// Maglev ring size (prime).
    pub ring_size: u32,
    pub backends: Vec<BackendSpec>,
    /// Limits on who starts new flows, and how fast.
    pub policy: Policy,
}

impl VipSpec {
    pub fn new(id: VipId) -> Self {
        Self {
            id,
            affinity_src_ip: false,
            ring_size: DEFAULT_RING_SIZE,
            backends: Vec::new(),
            policy: Policy::default(),
        }
    }

    /// Whether `other` builds the same table (a policy change needs no new table).
    pub fn same_table(&self, other: &VipSpec) -> bool {
        self.id == other.id
            && self.affinity_src_ip == other.affinity_src_ip
            && self.ring_size == other.ring_size
            && self.backends == other.backends
    }

    /// Whether some backend would take new flows.
    pub fn has_live_backend(&self) -> bool {
        self.backends.iter().any(|b| b.live && b.weight > 0)
    }
}

impl Vip {
    /// What the datapath needs, given which backends are healthy (`up`).
    ///
    /// - Disabled or down: not live (out of the ring, flows move).
    /// - Drained, outside the active pools, or a backup while a primary is up: weight 0
    ///   (no new flows, established ones stay).
    /// - Otherwise a share of the ring: its weight, or with pools its pool's share divided
    ///   among the pool's eligible backends by weight.
    pub fn spec(&self, up: impl Fn(&IpAddr) -> bool) -> VipSpec {
        self.spec_scaled(up, |_| 100)
    }

    /// As [`Vip::spec`], with adaptive weights: when the VIP has them, each backend weighs
    /// `percent(addr)` percent of its configured weight. Every weight of such a VIP is then
    /// counted in twentieths (10%, 25% and 50% of weight 1 stay exact); Maglev tables depend
    /// only on the ratios of the weights, so at 100% everywhere the table is the one the VIP
    /// has without adaptive weights.
    pub fn spec_scaled(
        &self,
        up: impl Fn(&IpAddr) -> bool,
        percent: impl Fn(&IpAddr) -> u32,
    ) -> VipSpec {
        let scaled = |b: &BackendEntry| -> u64 {
            if self.adaptive_weights {
                b.weight as u64 * percent(&b.address).min(100) as u64 / 5
            } else {
                b.weight as u64
            }
        };
        let live = |b: &BackendEntry| b.state != BackendState::Disabled && up(&b.address);
        let in_pool = |b: &BackendEntry| {
            self.pools.is_empty() || self.pools.get(b.pool()).is_some_and(|w| *w > 0)
        };
        let eligible = |b: &BackendEntry| {
            live(b) && b.state == BackendState::Active && in_pool(b) && b.weight > 0
        };
        let primaries = self.backends.iter().any(|b| eligible(b) && !b.backup);
        let serving = |b: &BackendEntry| eligible(b) && b.backup != primaries;
        let pool_total: u64 = self.pools.values().map(|w| *w as u64).sum();
        let pool_weight = |p: &str| -> u64 {
            self.backends
                .iter()
                .filter(|b| serving(b) && b.pool() == p)
                .map(scaled)
                .sum()
        };
        let weight = |b: &BackendEntry| -> u32 {
            if !serving(b) {
                return 0;
            }
            if self.pools.is_empty() {
                return scaled(b).max(1).min(u32::MAX as u64) as u32;
            }
            let share = self.pools[b.pool()] as u64;
            let w = 10_000 * share * scaled(b) / (pool_total * pool_weight(b.pool())).max(1);
            w.clamp(1, MAX_WEIGHT as u64) as u32
        };
        VipSpec {
            id: self.address,
            affinity_src_ip: self.affinity == Some(Affinity::SrcIp),
            ring_size: self.ring_size,
            backends: self
                .backends
                .iter()
                .map(|b| BackendSpec {
                    addr: b.address,
                    weight: weight(b),
                    live: live(b),
                })
                .collect(),
            policy: self.policy(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maglev;

    fn vip(adaptive: bool) -> Vip {
        let mut v = Vip::new("10.200.0.1:80/tcp".parse().unwrap());
        v.adaptive_weights = adaptive;
        v.backends
            .push(BackendEntry::new("10.0.0.1".parse().unwrap(), 1));
        v.backends
            .push(BackendEntry::new("10.0.0.2".parse().unwrap(), 2));
        v
    }

    fn weights(s: &VipSpec) -> Vec<u32> {
        s.backends.iter().map(|b| b.weight).collect()
    }

    fn table(s: &VipSpec) -> Vec<u32> {
        let entries: Vec<_> = s
            .backends
            .iter()
            .enumerate()
            .map(|(i, b)| maglev::Entry {
                id: b.addr.to_string().into_bytes(),
                weight: b.weight,
                value: i as u32,
            })
            .collect();
        maglev::build(&entries, 65537)
    }

    #[test]
    fn adaptive_weights_scale_the_slow_backend_only() {
        let slow: IpAddr = "10.0.0.1".parse().unwrap();
        let pct = |a: &IpAddr| if *a == slow { 10 } else { 100 };
        let (plain, adaptive) = (vip(false), vip(true));
        assert_eq!(
            weights(&plain.spec_scaled(|_| true, pct)),
            vec![1, 2],
            "off: ignored"
        );
        let full = adaptive.spec_scaled(|_| true, |_| 100);
        assert_eq!(weights(&full), vec![20, 40]);
        // Counted in twentieths, the table is the one without adaptive weights.
        assert_eq!(table(&full), table(&plain.spec(|_| true)));
        assert_eq!(weights(&adaptive.spec_scaled(|_| true, pct)), vec![2, 40]);
        let t = table(&adaptive.spec_scaled(|_| true, pct));
        let share = t.iter().filter(|v| **v == 0).count() as f64 / t.len() as f64;
        assert!((share - 2.0 / 42.0).abs() < 0.01, "{share}");
        // Within pools, the pool keeps its share and the slow backend gives up its part.
        let mut pooled = vip(true);
        pooled.backends[0].pool = Some("blue".into());
        pooled.backends[1].pool = Some("blue".into());
        pooled
            .backends
            .push(BackendEntry::new("10.0.0.3".parse().unwrap(), 1));
        pooled.pools = [("blue".to_owned(), 50), ("default".to_owned(), 50)].into();
        let w = weights(&pooled.spec_scaled(|_| true, pct));
        assert!((w[0] + w[1]).abs_diff(w[2]) <= 2, "{w:?}");
        assert!(w[0] * 10 < w[1], "{w:?}");
    }
}
