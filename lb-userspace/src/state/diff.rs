//! What a change does, in words: one line per effective change.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use super::{BackendEntry, BalancerSettings, HealthCheck, State, Vip, VipId};

/// A check's kind (and its `via`, when set), for change lines ("default" when none is
/// configured).
fn kind(h: &Option<Box<HealthCheck>>) -> String {
    h.as_ref().map_or("default".to_owned(), |h| match h.via {
        Some(via) => format!("{} via {via}", h.kind),
        None => h.kind.to_string(),
    })
}

/// A pool split, for change lines: "blue 95, green 5", or "every pool".
fn pools(p: &BTreeMap<String, u32>) -> String {
    if p.is_empty() {
        return "every pool".into();
    }
    p.iter()
        .map(|(n, w)| format!("{n} {w}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A VIP's limits on new flows, for change lines.
fn limits(v: &Vip) -> String {
    let rate = |r: Option<crate::state::RateLimit>| {
        r.map_or("none".to_owned(), |r| {
            format!("{}/s burst {}", r.new_flows_per_s, r.burst)
        })
    };
    let prefixes = |p: &[crate::state::Prefix]| match p.len() {
        0 => "none".to_owned(),
        1..=4 => p
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(" "),
        n => format!("{n} prefixes"),
    };
    format!(
        "(per client {}, whole VIP {}, allow {}, deny {})",
        rate(v.rate_limit),
        rate(v.new_flow_cap),
        prefixes(&v.allow),
        prefixes(&v.deny)
    )
}

impl State {
    /// What changes from `self` to `new`, in words, one line per change.
    pub fn diff(&self, new: &State) -> Vec<String> {
        let mut out = Vec::new();
        diff_balancer(&self.balancer, &new.balancer, &mut out);
        if self.vrrp != new.vrrp {
            out.push(match &new.vrrp {
                Some(v) => format!("VRRP: vrid {} priority {}", v.vrid, v.priority),
                None => "VRRP off".to_owned(),
            });
        }
        if self.bgp != new.bgp {
            out.push(match &new.bgp {
                Some(b) => format!(
                    "BGP announcements: table {}, at least {} live backends, withdraw wait {} ms",
                    b.table, b.min_live_backends, b.withdraw_wait_ms
                ),
                None => "BGP announcements off".to_owned(),
            });
        }
        let old_vips: BTreeMap<VipId, &Vip> = self.vips.iter().map(|v| (v.address, v)).collect();
        for v in &new.vips {
            match old_vips.get(&v.address) {
                Some(old) => diff_vip(old, v, &mut out),
                None => {
                    out.push(format!(
                        "add VIP {} with {} backends",
                        v.address,
                        v.backends.len()
                    ));
                    if let Some(why) = v.unprobed() {
                        out.push(format!("note: VIP {}: {why}", v.address));
                    }
                }
            }
        }
        let new_ids: BTreeSet<VipId> = new.vips.iter().map(|v| v.address).collect();
        for v in &self.vips {
            if !new_ids.contains(&v.address) {
                out.push(format!("delete VIP {}", v.address));
            }
        }
        out
    }
}

/// The `[balancer]` section's changes.
fn diff_balancer(a: &BalancerSettings, b: &BalancerSettings, out: &mut Vec<String>) {
    match (&a.interface, &b.interface) {
        (None, Some(i)) => out.push(format!("attach to {i} ({})", b.mode)),
        (Some(i), None) => out.push(format!("detach from {i}")),
        (Some(x), Some(y)) if x != y || a.mode != b.mode => {
            out.push(format!("move from {x} to {y} ({})", b.mode))
        }
        _ => {}
    }
    let (mut a2, mut b2) = (a.clone(), b.clone());
    (a2.interface, a2.mode, b2.interface, b2.mode) = (None, b.mode, None, b.mode);
    if a2 != b2 {
        out.push(
            "change balancer settings (mtu, sources, next hop, connection table, encapsulation)"
                .to_owned(),
        );
    }
    if a.conntrack_entries != b.conntrack_entries {
        let size = |n: Option<u32>| n.unwrap_or(lb_common::DEFAULT_CONNTRACK_ENTRIES);
        out.push(format!(
            "connection table size {} -> {}: takes effect when the agent next starts (a new \
             table; established flows then keep their backend through the Maglev table)",
            size(a.conntrack_entries),
            size(b.conntrack_entries)
        ));
    }
}

/// A VIP's changes, its own settings first, then its backends'.
fn diff_vip(old: &Vip, v: &Vip, out: &mut Vec<String>) {
    let id = v.address;
    if old.affinity != v.affinity || old.ring_size != v.ring_size {
        out.push(format!("VIP {id}: affinity/ring size changed"));
    }
    if old.health != v.health {
        out.push(format!(
            "VIP {id}: health check {} -> {}",
            kind(&old.health),
            kind(&v.health)
        ));
        if let Some(why) = v.unprobed() {
            out.push(format!("note: VIP {id}: {why}"));
        }
    }
    if old.adaptive_weights != v.adaptive_weights {
        out.push(format!(
            "VIP {id}: adaptive weights {}",
            if v.adaptive_weights { "on" } else { "off" }
        ));
    }
    if old.pools != v.pools {
        out.push(format!("VIP {id}: new flows to {}", pools(&v.pools)));
    }
    if old.policy() != v.policy() {
        out.push(format!("VIP {id}: limits on new flows {}", limits(v)));
    }
    diff_backends(id, &old.backends, &v.backends, out);
}

/// The changes of a VIP's backends: roles and checks, then additions, state and weight
/// changes, then deletions.
fn diff_backends(id: VipId, old: &[BackendEntry], new: &[BackendEntry], out: &mut Vec<String>) {
    let old_backends: BTreeMap<IpAddr, &BackendEntry> =
        old.iter().map(|b| (b.address, b)).collect();
    for nb in new {
        let Some(ob) = old_backends.get(&nb.address) else {
            continue;
        };
        if ob.backup != nb.backup || ob.pool != nb.pool {
            out.push(format!(
                "VIP {id}: backend {} is now {} in pool {}",
                nb.address,
                if nb.backup { "a backup" } else { "a primary" },
                nb.pool()
            ));
        }
        if ob.health != nb.health {
            out.push(format!(
                "VIP {id}: backend {} health check {} -> {}",
                nb.address,
                kind(&ob.health),
                kind(&nb.health)
            ));
        }
    }
    for nb in new {
        match old_backends.get(&nb.address) {
            None => out.push(format!(
                "VIP {id}: add backend {} (weight {})",
                nb.address, nb.weight
            )),
            Some(ob) if ob.state != nb.state => out.push(format!(
                "VIP {id}: backend {} {} -> {}",
                nb.address, ob.state, nb.state
            )),
            Some(ob) if ob.weight != nb.weight => out.push(format!(
                "VIP {id}: backend {} weight {} -> {}",
                nb.address, ob.weight, nb.weight
            )),
            _ => {}
        }
    }
    let new_backends: BTreeSet<IpAddr> = new.iter().map(|b| b.address).collect();
    for ob in old {
        if !new_backends.contains(&ob.address) {
            out.push(format!("VIP {id}: delete backend {}", ob.address));
        }
    }
}
