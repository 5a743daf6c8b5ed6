//! What a change does, in words: one line per effective change.

use std::collections::BTreeMap;

use super::{HealthCheck, State};

/// A check's kind (and its `via`, when set), for change lines.
fn kind(h: &Option<Box<HealthCheck>>) -> String {
    h.as_ref().map_or("none".to_owned(), |h| match h.via {
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

impl State {
    /// What changes from `self` to `new`, in words, one line per change.
    pub fn diff(&self, new: &State) -> Vec<String> {
        let mut out = Vec::new();
        let (a, b) = (&self.balancer, &new.balancer);
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
            out.push("change balancer settings (mtu, sources, next hop)".to_owned());
        }
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
        for v in &new.vips {
            let Some(old) = self.vip(&v.address) else {
                out.push(format!(
                    "add VIP {} with {} backends",
                    v.address,
                    v.backends.len()
                ));
                continue;
            };
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
            for nb in &v.backends {
                let Some(ob) = old.backends.iter().find(|o| o.address == nb.address) else {
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
            for nb in &v.backends {
                match old.backends.iter().find(|o| o.address == nb.address) {
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
            for ob in &old.backends {
                if !v.backends.iter().any(|b| b.address == ob.address) {
                    out.push(format!("VIP {id}: delete backend {}", ob.address));
                }
            }
        }
        for v in &self.vips {
            if new.vip(&v.address).is_none() {
                out.push(format!("delete VIP {}", v.address));
            }
        }
        out
    }
}
