//! What the writer publishes after every change: an immutable picture that status, lists,
//! metrics, the health supervisor and the VRRP speaker read without waiting for a write in
//! progress.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use lb_common::Config;

use crate::{
    datapath::Owners,
    state::{State, VipId, VipSpec},
};

/// Where a VIP sits in the maps: its index and its backends' slots (for the counters).
#[derive(Clone, Debug, Default)]
pub struct Placement {
    pub index: u32,
    pub slots: BTreeMap<IpAddr, u32>,
}

#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Increases with every publication.
    pub serial: u64,
    pub state: Arc<State>,
    /// What the datapath carries for each VIP (given the backends' health).
    pub specs: Arc<Vec<VipSpec>>,
    pub placement: Arc<BTreeMap<VipId, Placement>>,
    /// Backends whose probes say down.
    pub down: Arc<BTreeSet<(VipId, IpAddr)>>,
    /// Adaptive weights below 100%: percent of the configured weight.
    pub weights: Arc<BTreeMap<(VipId, IpAddr), u32>>,
    pub attached: bool,
    /// Why the datapath is detached although no one detached it (a defunct pinned link).
    pub detached_why: Option<Arc<str>>,
    /// The datapath configuration in the map.
    pub config: Config,
    /// The resolved next hop (address, MAC), when it was resolved rather than configured.
    pub nexthop: Option<(IpAddr, [u8; 6])>,
    pub slots_in_use: usize,
    /// Which VIP index each used backend slot counts for (VIP totals are their sums).
    pub owners: Arc<Owners>,
    /// The connection table's size in flows.
    pub conntrack: u32,
}

impl Snapshot {
    /// What is known before the writer takes over the datapath: the state and the
    /// backends last known down.
    pub fn preliminary(state: State, down: BTreeSet<(VipId, IpAddr)>, attached: bool) -> Self {
        Self {
            specs: Arc::new(
                state
                    .vips
                    .iter()
                    .map(|v| v.spec(|a| !down.contains(&(v.address, *a))))
                    .collect(),
            ),
            state: Arc::new(state),
            down: Arc::new(down),
            attached,
            ..Self::default()
        }
    }

    /// Whether the datapath forwards (attached, with a next hop).
    pub fn forwarding(&self) -> bool {
        self.attached && self.config.ready != 0
    }

    /// Whether a backend counts as up (no check, or its probes say so).
    pub fn is_up(&self, vip: &VipId, addr: &IpAddr) -> bool {
        !self.down.contains(&(*vip, *addr))
    }

    /// A backend's effective weight in percent of its configured one (adaptive weights).
    pub fn weight_percent(&self, vip: &VipId, addr: &IpAddr) -> u32 {
        self.weights.get(&(*vip, *addr)).copied().unwrap_or(100)
    }

    /// Whether some backend of the VIP takes new flows (for VRRP tracking and announcements).
    pub fn vip_has_live_backend(&self, vip: &VipId) -> bool {
        self.specs
            .iter()
            .find(|s| s.id == *vip)
            .is_some_and(VipSpec::has_live_backend)
    }
}
