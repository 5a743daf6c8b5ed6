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
                .map(|b| b.weight as u64)
                .sum()
        };
        let weight = |b: &BackendEntry| -> u32 {
            if !serving(b) {
                return 0;
            }
            if self.pools.is_empty() {
                return b.weight;
            }
            let share = self.pools[b.pool()] as u64;
            let w = 10_000 * share * b.weight as u64 / (pool_total * pool_weight(b.pool())).max(1);
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
