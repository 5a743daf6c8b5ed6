//! Operations on the desired state. Each returns a new state, validated whole, or a refusal;
//! the state it starts from is never changed.

use std::{collections::BTreeMap, net::IpAddr};

use super::{
    AttachMode, BackendEntry, BackendState, HealthCheck, Prefix, RateLimit, Refusal, State, Vip,
    VipId, check_ifname, check_pool,
};

impl State {
    fn checked(self) -> Result<Self, Refusal> {
        self.validate()?;
        Ok(self)
    }

    pub fn with_attach(&self, iface: &str, mode: AttachMode) -> Result<Self, Refusal> {
        check_ifname(iface).map_err(|m| Refusal::invalid("iface", m))?;
        let mut s = self.clone();
        s.balancer.interface = Some(iface.to_owned());
        s.balancer.mode = mode;
        s.checked()
    }

    pub fn with_detach(&self) -> Result<Self, Refusal> {
        if self.balancer.interface.is_none() {
            return Err(Refusal::conflict("not attached: nothing to detach"));
        }
        let mut s = self.clone();
        s.balancer.interface = None;
        s.checked()
    }

    pub fn with_vip(&self, vip: Vip) -> Result<Self, Refusal> {
        if self.vip(&vip.address).is_some() {
            return Err(Refusal::conflict(format!(
                "VIP {} already exists: delete it first, or change it with `maglb apply`",
                vip.address
            )));
        }
        let mut s = self.clone();
        s.vips.push(vip);
        s.vips.sort_by_key(|a| a.address);
        s.checked()
    }

    pub fn without_vip(&self, id: &VipId) -> Result<Self, Refusal> {
        let mut s = self.clone();
        s.vip_mut(id)?;
        s.vips.retain(|v| v.address != *id);
        s.checked()
    }

    pub fn with_backend(&self, id: &VipId, b: BackendEntry) -> Result<Self, Refusal> {
        let mut s = self.clone();
        let v = s.vip_mut(id)?;
        let address = b.address;
        if v.backends.iter().any(|b| b.address == address) {
            return Err(Refusal::conflict(format!(
                "backend {address} already belongs to VIP {id}: change its weight with `maglb backend set-weight`"
            )));
        }
        v.backends.push(b);
        v.backends.sort_by_key(|a| a.address);
        s.checked()
    }

    fn backend_mut(v: &mut Vip, address: IpAddr) -> Result<&mut BackendEntry, Refusal> {
        let id = v.address;
        v.backends
            .iter_mut()
            .find(|b| b.address == address)
            .ok_or_else(|| {
                Refusal::not_found(format!(
                    "backend {address} is not a backend of VIP {id}: see `maglb backend list {id}`"
                ))
            })
    }

    pub fn without_backend(&self, id: &VipId, address: IpAddr) -> Result<Self, Refusal> {
        let mut s = self.clone();
        let v = s.vip_mut(id)?;
        Self::backend_mut(v, address)?;
        v.backends.retain(|b| b.address != address);
        s.checked()
    }

    pub fn with_weight(&self, id: &VipId, address: IpAddr, weight: u32) -> Result<Self, Refusal> {
        let mut s = self.clone();
        let b = Self::backend_mut(s.vip_mut(id)?, address)?;
        b.weight = weight;
        b.state = BackendState::Active;
        s.checked()
    }

    /// Drain, disable, or enable (active) a backend.
    pub fn with_backend_state(
        &self,
        id: &VipId,
        address: IpAddr,
        state: BackendState,
    ) -> Result<Self, Refusal> {
        let mut s = self.clone();
        Self::backend_mut(s.vip_mut(id)?, address)?.state = state;
        s.checked()
    }

    /// Sets (or with `None` clears) a VIP's default health check.
    pub fn with_vip_health(&self, id: &VipId, h: Option<HealthCheck>) -> Result<Self, Refusal> {
        let mut s = self.clone();
        s.vip_mut(id)?.health = h.map(Box::new);
        s.checked()
    }

    /// Sets (or with `None` clears) a backend's own health check.
    pub fn with_backend_health(
        &self,
        id: &VipId,
        address: IpAddr,
        h: Option<HealthCheck>,
    ) -> Result<Self, Refusal> {
        let mut s = self.clone();
        Self::backend_mut(s.vip_mut(id)?, address)?.health = h.map(Box::new);
        s.checked()
    }

    /// Turns adaptive weights of a VIP on or off.
    pub fn with_adaptive_weights(&self, id: &VipId, on: bool) -> Result<Self, Refusal> {
        let mut s = self.clone();
        s.vip_mut(id)?.adaptive_weights = on;
        s.checked()
    }

    /// Moves new flows to pool `to`: all of them, or `percent` of them with the pools that
    /// serve now sharing the rest in their current proportions.
    pub fn with_switch(&self, id: &VipId, to: &str, percent: Option<u32>) -> Result<Self, Refusal> {
        check_pool(to).map_err(|m| Refusal::invalid("to", m))?;
        let mut s = self.clone();
        let v = s.vip_mut(id)?;
        if !v.backends.iter().any(|b| b.pool() == to) {
            return Err(Refusal::invalid(
                "to",
                format!(
                    "no backend of VIP {id} is in pool {to}; add one with `maglb backend add {id} ADDR --pool {to}`"
                ),
            ));
        }
        let percent = percent.unwrap_or(100);
        if !(1..=100).contains(&percent) {
            return Err(Refusal::invalid(
                "percent",
                format!("{percent} is out of range 1-100"),
            ));
        }
        if percent == 100 {
            v.pools = BTreeMap::from([(to.to_owned(), 100)]);
            return s.checked();
        }
        // The others: the pools that serve now, or, with no split yet, every other pool.
        let mut others: BTreeMap<String, u64> = v
            .pools
            .iter()
            .filter(|(p, w)| p.as_str() != to && **w > 0)
            .map(|(p, w)| (p.clone(), *w as u64))
            .collect();
        if others.is_empty() && v.pools.is_empty() {
            for b in v.backends.iter().filter(|b| b.pool() != to) {
                others.insert(b.pool().to_owned(), 1);
            }
        }
        let total: u64 = others.values().sum();
        if total == 0 {
            return Err(Refusal::invalid(
                "percent",
                format!(
                    "no other pool of VIP {id} serves, so there is nothing to split with; switch fully"
                ),
            ));
        }
        let mut pools = BTreeMap::from([(to.to_owned(), percent)]);
        for (p, w) in others {
            pools.insert(
                p,
                ((w * (100 - percent) as u64 + total / 2) / total).max(1) as u32,
            );
        }
        v.pools = pools;
        s.checked()
    }
}

/// A change to the desired state, as the CLI and the API ask for it (and as the journal
/// records it).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Change {
    Attach {
        iface: String,
        mode: AttachMode,
    },
    Detach,
    AddVip(Vip),
    DelVip(VipId),
    AddBackend {
        vip: VipId,
        backend: BackendEntry,
    },
    DelBackend {
        vip: VipId,
        address: IpAddr,
    },
    SetWeight {
        vip: VipId,
        address: IpAddr,
        weight: u32,
    },
    SetBackendState {
        vip: VipId,
        address: IpAddr,
        state: BackendState,
    },
    /// A VIP's default check (`backend` none) or a backend's own; `None` clears it.
    SetHealth {
        vip: VipId,
        backend: Option<IpAddr>,
        health: Option<HealthCheck>,
    },
    Switch {
        vip: VipId,
        to: String,
        percent: Option<u32>,
    },
    /// A VIP's adaptive weights on or off.
    SetAdaptiveWeights {
        vip: VipId,
        on: bool,
    },
    /// A VIP's limits on new flows (replacing the ones it had).
    SetPolicy {
        vip: VipId,
        rate_limit: Option<RateLimit>,
        new_flow_cap: Option<RateLimit>,
        allow: Vec<Prefix>,
        deny: Vec<Prefix>,
    },
    /// The whole state of a file. A file without `[balancer] interface` keeps the current
    /// attachment.
    Apply(State),
}

impl Change {
    /// The state after this change, validated whole, or why not.
    pub fn apply_to(&self, s: &State) -> Result<State, Refusal> {
        match self {
            Change::Attach { iface, mode } => s.with_attach(iface, *mode),
            Change::Detach => s.with_detach(),
            Change::AddVip(v) => s.with_vip(v.clone()),
            Change::DelVip(id) => s.without_vip(id),
            Change::AddBackend { vip, backend } => s.with_backend(vip, backend.clone()),
            Change::DelBackend { vip, address } => s.without_backend(vip, *address),
            Change::SetWeight {
                vip,
                address,
                weight,
            } => s.with_weight(vip, *address, *weight),
            Change::SetBackendState {
                vip,
                address,
                state,
            } => s.with_backend_state(vip, *address, *state),
            Change::SetHealth {
                vip,
                backend: Some(b),
                health,
            } => s.with_backend_health(vip, *b, health.clone()),
            Change::SetHealth {
                vip,
                backend: None,
                health,
            } => s.with_vip_health(vip, health.clone()),
            Change::Switch { vip, to, percent } => s.with_switch(vip, to, *percent),
            Change::SetAdaptiveWeights { vip, on } => s.with_adaptive_weights(vip, *on),
            Change::SetPolicy {
                vip,
                rate_limit,
                new_flow_cap,
                allow,
                deny,
            } => {
                let mut s = s.clone();
                let v = s.vip_mut(vip)?;
                v.rate_limit = *rate_limit;
                v.new_flow_cap = *new_flow_cap;
                v.allow = allow.clone();
                v.deny = deny.clone();
                s.checked()
            }
            Change::Apply(file) => {
                let mut new = file.clone();
                if new.balancer.interface.is_none() {
                    new.balancer.interface = s.balancer.interface.clone();
                    new.balancer.mode = s.balancer.mode;
                }
                new.checked()
            }
        }
    }

    /// What it is, in the words of the CLI (for logs and the audit trail).
    pub fn name(&self) -> &'static str {
        match self {
            Change::Attach { .. } => "attach",
            Change::Detach => "detach",
            Change::AddVip(_) => "vip add",
            Change::DelVip(_) => "vip del",
            Change::AddBackend { .. } => "backend add",
            Change::DelBackend { .. } => "backend del",
            Change::SetWeight { .. } => "backend set-weight",
            Change::SetBackendState {
                state: BackendState::Drain,
                ..
            } => "backend drain",
            Change::SetBackendState {
                state: BackendState::Disabled,
                ..
            } => "backend disable",
            Change::SetBackendState { .. } => "backend enable",
            Change::SetHealth { .. } => "health",
            Change::Switch { .. } => "vip switch",
            Change::SetAdaptiveWeights { .. } => "vip set",
            Change::SetPolicy { .. } => "vip policy",
            Change::Apply(_) => "apply",
        }
    }
}
