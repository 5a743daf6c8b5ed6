//! Active/active behind ECMP: which VIP addresses this balancer offers for BGP, and why.
//!
//! maglb speaks no BGP. The agent decides what is announced and writes it where a BGP speaker
//! beside it (BIRD) picks it up: one host route (/32 or /128) per announced VIP address in a
//! kernel routing table of its own (`[bgp] table`, default 4242), with route protocol
//! [`ROUTE_PROTOCOL`]. BIRD's `kernel` protocol learns that table (`learn`) and its BGP
//! sessions export it; `packaging/bird/` has the configuration. That interface keeps BIRD's
//! configuration static (no reloads, no control socket), survives either side restarting
//! (the table is the state), is visible with `ip route show table 4242`, and works with any
//! speaker that can import a kernel table (FRR: `redistribute table 4242`). No rule points at
//! the table, so it never changes forwarding on the balancer.
//!
//! [`decide`] is pure: snapshot in, per-address decision out. [`announcer`] keeps the table
//! equal to it.

pub mod announcer;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{
    state::{BgpConfig, VipId, VipSpec},
    writer::Snapshot,
};

/// The route protocol number of maglb's routes (`ip route ... proto 201`); free in
/// `/etc/iproute2/rt_protos`. BIRD's `krt_source` shows it.
pub const ROUTE_PROTOCOL: u8 = 201;

/// Why everything is withdrawn, whatever the VIPs' health.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Hold {
    /// Announce what qualifies.
    None,
    /// `maglb bgp withdraw`, until `maglb bgp announce`.
    Operator,
    /// The agent is leaving: SIGTERM, or a detach in progress.
    Leaving(String),
}

/// The decision for one VIP address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub address: IpAddr,
    /// The VIPs on this address (one per port and protocol).
    pub vips: Vec<VipId>,
    pub announce: bool,
    pub reason: String,
}

/// Backends of a VIP that take new flows now (up, not disabled, weight above 0).
pub fn live_backends(spec: &VipSpec) -> usize {
    spec.backends
        .iter()
        .filter(|b| b.live && b.weight > 0)
        .count()
}

/// The backends of a VIP that take new flows now (what its Maglev table is built from).
pub fn live_set(spec: &VipSpec) -> BTreeSet<IpAddr> {
    spec.backends
        .iter()
        .filter(|b| b.live && b.weight > 0)
        .map(|b| b.addr)
        .collect()
}

/// What to announce. An address is announced while this balancer is attached and
/// forwarding, nothing holds announcements back, and at least one of the VIPs on it has
/// `min_live_backends` live backends: a client of a VIP that cannot be served on this
/// balancer is better served by another one, and a router that hears no announcement from
/// anyone stops attracting traffic it would drop. Several VIPs on one address (different
/// ports) share its route, so the address stays announced while any of them qualifies.
///
/// An address not announced now (`announced`) comes back only through a VIP that has
/// `settled` (its live backends the same for `announce_hold_ms`, and a probe verdict on each
/// checked backend): flows rehashed between balancers survive only while the balancers'
/// tables agree, backends coming back after an outage come up one probe at a time, and a
/// starting agent takes every backend as up until probed.
pub fn decide(
    snap: &Snapshot,
    cfg: &BgpConfig,
    hold: &Hold,
    announced: &BTreeSet<IpAddr>,
    settled: &dyn Fn(&VipId) -> bool,
) -> Vec<Decision> {
    let mut by_addr: BTreeMap<IpAddr, Vec<&VipSpec>> = BTreeMap::new();
    for s in snap.specs.iter() {
        by_addr.entry(s.id.addr).or_default().push(s);
    }
    let blanket = match hold {
        Hold::Operator => Some("withdrawn by the operator (`maglb bgp announce` undoes it)".into()),
        Hold::Leaving(why) => Some(format!("withdrawn: {why}")),
        Hold::None if !snap.attached => Some("withdrawn: the balancer is not attached".into()),
        Hold::None if !snap.forwarding() => Some(
            "withdrawn: the datapath does not forward yet (no next hop; see `maglb status`)".into(),
        ),
        Hold::None => None,
    };
    by_addr
        .into_iter()
        .map(|(address, specs)| {
            let vips = specs.iter().map(|s| s.id).collect();
            if let Some(why) = &blanket {
                return Decision {
                    address,
                    vips,
                    announce: false,
                    reason: why.clone(),
                };
            }
            let min = cfg.min_live_backends as usize;
            let counts: Vec<(VipId, usize)> =
                specs.iter().map(|s| (s.id, live_backends(s))).collect();
            let qualifies = counts.iter().any(|(_, n)| *n >= min);
            let was = announced.contains(&address);
            let ready = was || counts.iter().any(|(id, n)| *n >= min && settled(id));
            let announce = qualifies && ready;
            let detail = counts
                .iter()
                .map(|(id, n)| format!("{id} has {n} live"))
                .collect::<Vec<_>>()
                .join(", ");
            let reason = if announce {
                format!("announced: {detail} (at least {min} needed)")
            } else if qualifies {
                format!(
                    "withdrawn until its backends settle (the same live backends for \
                     announce_hold_ms {}, a probe verdict on each): {detail}",
                    cfg.announce_hold_ms
                )
            } else {
                format!("withdrawn: {detail}, fewer than min_live_backends {min}")
            };
            Decision {
                address,
                vips,
                announce,
                reason,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::state::{BackendEntry, State, Vip};

    fn snap(vips: &[(&str, usize)], down: &[(&str, &str)]) -> Snapshot {
        let mut st = State::default();
        for (id, n) in vips {
            let mut v = Vip::new(id.parse().unwrap());
            for i in 0..*n {
                v.backends.push(BackendEntry::new(
                    format!("10.10.3.{}", 11 + i).parse().unwrap(),
                    1,
                ));
            }
            st.vips.push(v);
        }
        let down: std::collections::BTreeSet<(VipId, IpAddr)> = down
            .iter()
            .map(|(v, b)| (v.parse().unwrap(), b.parse().unwrap()))
            .collect();
        let specs = st
            .vips
            .iter()
            .map(|v| v.spec(|a| !down.contains(&(v.address, *a))))
            .collect();
        let mut s = Snapshot {
            state: Arc::new(st),
            specs: Arc::new(specs),
            down: Arc::new(down),
            attached: true,
            ..Snapshot::default()
        };
        s.config.ready = 1;
        s
    }

    fn cfg(min: u32) -> BgpConfig {
        BgpConfig {
            min_live_backends: min,
            ..BgpConfig::default()
        }
    }

    /// Decides with every VIP settled and nothing announced yet.
    fn go(s: &Snapshot, min: u32, hold: &Hold) -> Vec<Decision> {
        decide(s, &cfg(min), hold, &BTreeSet::new(), &|_| true)
    }

    #[test]
    fn a_withdrawn_address_waits_for_its_backends_to_settle() {
        let s = snap(&[("10.200.0.1:80/tcp", 3)], &[]);
        let addr: IpAddr = "10.200.0.1".parse().unwrap();
        let d = decide(&s, &cfg(1), &Hold::None, &BTreeSet::new(), &|_| false);
        assert!(!d[0].announce);
        assert!(d[0].reason.contains("settle"), "{}", d[0].reason);
        // Announced already: a change in its backends does not withdraw it.
        let d = decide(&s, &cfg(1), &Hold::None, &BTreeSet::from([addr]), &|_| {
            false
        });
        assert!(d[0].announce, "{}", d[0].reason);
    }

    #[test]
    fn announces_only_what_this_balancer_can_serve() {
        let s = snap(&[("10.200.0.1:80/tcp", 3)], &[]);
        let d = go(&s, 1, &Hold::None);
        assert_eq!(d.len(), 1);
        assert!(d[0].announce, "{}", d[0].reason);
        assert!(d[0].reason.contains("3 live"), "{}", d[0].reason);
        // Two of three down: below a minimum of 2.
        let s = snap(
            &[("10.200.0.1:80/tcp", 3)],
            &[
                ("10.200.0.1:80/tcp", "10.10.3.11"),
                ("10.200.0.1:80/tcp", "10.10.3.12"),
            ],
        );
        let d = go(&s, 2, &Hold::None);
        assert!(!d[0].announce);
        assert!(d[0].reason.contains("fewer than min_live_backends 2"));
        assert!(go(&s, 1, &Hold::None)[0].announce);
        // No backends at all.
        assert!(!go(&snap(&[("10.200.0.1:80/tcp", 0)], &[]), 1, &Hold::None)[0].announce);
    }

    #[test]
    fn not_forwarding_or_held_withdraws_everything() {
        let mut s = snap(&[("10.200.0.1:80/tcp", 3), ("[fd20::1]:80/tcp", 3)], &[]);
        assert!(go(&s, 1, &Hold::None).iter().all(|d| d.announce));
        for hold in [
            Hold::Operator,
            Hold::Leaving("the agent is stopping".into()),
        ] {
            let d = go(&s, 1, &hold);
            assert!(
                d.iter()
                    .all(|d| !d.announce && d.reason.starts_with("withdrawn"))
            );
        }
        s.config.ready = 0;
        let d = go(&s, 1, &Hold::None);
        assert!(
            d.iter()
                .all(|d| !d.announce && d.reason.contains("does not forward"))
        );
        s.attached = false;
        assert!(go(&s, 1, &Hold::None)[0].reason.contains("not attached"));
    }

    #[test]
    fn vips_sharing_an_address_share_its_route() {
        let s = snap(
            &[("10.200.0.1:80/tcp", 1), ("10.200.0.1:443/tcp", 2)],
            &[("10.200.0.1:80/tcp", "10.10.3.11")],
        );
        let d = go(&s, 1, &Hold::None);
        assert_eq!(d.len(), 1, "one route per address");
        assert_eq!(d[0].vips.len(), 2);
        assert!(d[0].announce, "443 still qualifies: {}", d[0].reason);
        assert!(d[0].reason.contains("10.200.0.1:80/tcp has 0 live"));
    }
}
