//! Which backends count as down across a change of the desired state. The writer (a change
//! as it is made) and the store (the same change replayed from the journal at start) both
//! call [`down_after`], so a restarted agent holds the same set the running one did.

use std::{collections::BTreeSet, net::IpAddr};

use super::{Initial, State, VipId};

/// A backend of a VIP.
pub type BackendKey = (VipId, IpAddr);

/// The backends that count as down in `new`, given those that did in `old`:
/// - a backend that is down stays down while it exists and is probed;
/// - one that left its VIP, or is no longer probed (`kind = "none"`), is forgotten;
/// - one new to its VIP (a new VIP's backends included) whose check says
///   `initial = "down"` starts down, and comes up after `rise` probes pass.
pub fn down_after(old: &State, new: &State, down: &BTreeSet<BackendKey>) -> BTreeSet<BackendKey> {
    let mut out = BTreeSet::new();
    for v in &new.vips {
        let before = old.vip(&v.address);
        for b in &v.backends {
            let Some(check) = v.check_for(b) else {
                continue;
            };
            let key = (v.address, b.address);
            let added = before.is_none_or(|o| !o.backends.iter().any(|x| x.address == b.address));
            if down.contains(&key) || (added && check.initial == Initial::Down) {
                out.insert(key);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{BackendEntry, HealthCheck, ProbeKind, Vip};

    fn key(v: &str, b: &str) -> BackendKey {
        (v.parse().unwrap(), b.parse().unwrap())
    }

    fn state(vip: &str, backends: &[&str], initial: Option<Initial>) -> State {
        let mut v = Vip::new(vip.parse().unwrap());
        v.health = initial.map(|initial| {
            Box::new(HealthCheck {
                initial,
                ..HealthCheck::default()
            })
        });
        for b in backends {
            v.backends.push(BackendEntry::new(b.parse().unwrap(), 1));
        }
        State {
            vips: vec![v],
            ..State::default()
        }
    }

    #[test]
    fn new_backends_start_down_only_with_initial_down() {
        let vip = "10.0.0.1:80/tcp";
        let empty = State::default();
        let none = BTreeSet::new();
        // The default check starts up; `initial = "down"` starts every new backend down.
        let up = state(vip, &["10.1.0.1"], None);
        assert!(down_after(&empty, &up, &none).is_empty());
        let one = state(vip, &["10.1.0.1"], Some(Initial::Down));
        assert_eq!(
            down_after(&empty, &one, &none),
            BTreeSet::from([key(vip, "10.1.0.1")])
        );
        // A backend that was there keeps its verdict (up here); only the added one starts down.
        let two = state(vip, &["10.1.0.1", "10.1.0.2"], Some(Initial::Down));
        assert_eq!(
            down_after(&one, &two, &none),
            BTreeSet::from([key(vip, "10.1.0.2")])
        );
        // A down backend stays down until its probes say otherwise...
        let was = BTreeSet::from([key(vip, "10.1.0.1")]);
        assert_eq!(down_after(&two, &two, &was), was);
        // ...and is forgotten when it leaves, or when probing is turned off.
        let gone = state(vip, &["10.1.0.2"], Some(Initial::Down));
        assert!(down_after(&two, &gone, &was).is_empty());
        let mut off = two.clone();
        off.vips[0].health.as_mut().unwrap().kind = ProbeKind::None;
        assert!(down_after(&two, &off, &was).is_empty());
        // A port-0 VIP has no default check: nothing of it is ever down.
        let wild = state("10.0.0.1:0/tcp", &["10.1.0.1"], None);
        let w = BTreeSet::from([key("10.0.0.1:0/tcp", "10.1.0.1")]);
        assert!(down_after(&wild, &wild, &w).is_empty());
    }
}
