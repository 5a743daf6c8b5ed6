//! The reconciler against a fake datapath that carries out ops on in-memory maps: after
//! every plan the maps equal what the state implies (`verify`), at every single write no VIP
//! points at a slot that is not its own, slots are reused with new generations, and a plan
//! cut short at any op (an agent killed mid-write) is repaired by adoption.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{AddrKey, BACKEND_F_IN_USE, Backend, NO_BACKEND, VipKey, VipMeta};

use super::*;
use crate::state::{BackendSpec, VipSpec};

/// In-memory maps that carry out ops as the datapath does.
#[derive(Clone, Default)]
struct Fake {
    vips: Vec<(VipKey, VipMeta)>,
    backends: BTreeMap<u32, Backend>,
    rings: BTreeMap<u32, Vec<u32>>,
    pending: BTreeMap<u32, Vec<u32>>,
    addrs: Vec<(AddrKey, VipMeta)>,
    filter: Vec<u64>,
    zeroed_vips: Vec<u32>,
    zeroed_slots: Vec<u32>,
    policies: BTreeMap<u32, crate::state::Policy>,
}

fn upsert<K: PartialEq + Copy, V: Copy>(v: &mut Vec<(K, V)>, k: K, val: V) {
    match v.iter_mut().find(|(x, _)| *x == k) {
        Some(e) => e.1 = val,
        None => v.push((k, val)),
    }
}

impl Fake {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::ZeroVipCounters(i) => self.zeroed_vips.push(*i),
            Op::ZeroSlotCounters(i) => self.zeroed_slots.push(*i),
            Op::SetBackend { slot, backend } => {
                self.backends.insert(*slot, *backend);
            }
            Op::NewRing { index, ring_size } => {
                self.pending
                    .insert(*index, vec![0; 2 * *ring_size as usize]);
            }
            Op::WriteTable { index, offset, job } => {
                let table = crate::maglev::build(&job.entries, job.size);
                let ring = match self.pending.get_mut(index) {
                    Some(r) => r,
                    None => self.rings.get_mut(index).expect("a ring to write"),
                };
                let o = *offset as usize;
                ring[o..o + table.len()].copy_from_slice(&table);
            }
            Op::InstallRing { index } => {
                let r = self.pending.remove(index).expect("made before installed");
                self.rings.insert(*index, r);
            }
            Op::SetVip { key, meta } => upsert(&mut self.vips, *key, *meta),
            Op::DelVip { key } => self.vips.retain(|(k, _)| k != key),
            Op::SetAddr { key, meta } => upsert(&mut self.addrs, *key, *meta),
            Op::DelAddr { key } => self.addrs.retain(|(k, _)| k != key),
            Op::SetFilter(words) => self.filter = words.clone(),
            Op::SetPolicy { index, policy } => {
                self.policies.insert(*index, policy.clone());
            }
        }
    }

    fn observe(&self) -> Observed {
        let rings: BTreeMap<u32, u32> = self
            .rings
            .iter()
            .map(|(i, r)| (*i, r.len() as u32 / 2))
            .collect();
        let tables = self
            .vips
            .iter()
            .filter(|(_, m)| rings.get(&m.index) == Some(&m.ring_size))
            .map(|(_, m)| {
                let r = &self.rings[&m.index];
                let o = m.ring_off as usize;
                (m.index, r[o..o + m.ring_size as usize].to_vec())
            })
            .collect();
        Observed {
            vips: self.vips.clone(),
            vip_table: self.vips.clone(),
            vip_table_hides: Vec::new(),
            slots: self
                .backends
                .iter()
                .filter(|(_, b)| b.generation != 0)
                .map(|(i, b)| (*i, *b))
                .collect(),
            rings,
            tables,
            addrs: self.addrs.clone(),
            filter: if self.filter.is_empty() {
                vec![0; lb_common::VIP_FILTER_WORDS as usize]
            } else {
                self.filter.clone()
            },
        }
    }

    /// What a packet could meet now: every VIP's active table names only in-use slots of
    /// that VIP (or no backend).
    fn assert_safe(&self, when: &str) {
        for (key, m) in &self.vips {
            let ring = self
                .rings
                .get(&m.index)
                .unwrap_or_else(|| panic!("{when}: VIP {key:?} without a ring"));
            assert!(
                ring.len() >= (m.ring_off + m.ring_size) as usize,
                "{when}: VIP entry larger than its ring"
            );
            let table = &ring[m.ring_off as usize..(m.ring_off + m.ring_size) as usize];
            for s in table.iter().filter(|s| **s != NO_BACKEND) {
                let b = self.backends.get(s);
                assert!(
                    b.is_some_and(|b| b.flags & BACKEND_F_IN_USE != 0),
                    "{when}: VIP index {} names slot {s}, which is {b:?}",
                    m.index
                );
            }
        }
    }

    /// Applies ops one by one, checking safety after each.
    fn run(&mut self, ops: &[Op], when: &str) {
        for (i, op) in ops.iter().enumerate() {
            self.apply(op);
            self.assert_safe(&format!("{when}, after op {i} {op:?}"));
        }
    }
}

fn vip(s: &str) -> VipId {
    s.parse().unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn spec(id: &str, ring: u32, backends: &[(&str, u32, bool)]) -> VipSpec {
    let mut s = VipSpec::new(vip(id));
    s.ring_size = ring;
    s.backends = backends
        .iter()
        .map(|(a, w, live)| BackendSpec {
            addr: ip(a),
            weight: *w,
            live: *live,
        })
        .collect();
    s
}

fn converge(r: &mut Reconciler, f: &mut Fake, desired: &[VipSpec], when: &str) {
    let ops = r.plan(desired).unwrap();
    f.run(&ops, when);
    let diff = verify(&f.observe(), desired);
    assert!(diff.is_empty(), "{when}: {diff:#?}");
    let pairs: usize = desired.iter().map(|d| d.backends.len()).sum();
    assert_eq!(r.slots_in_use(), pairs, "{when}");
    for d in desired {
        let index = r.vip_index(&d.id).unwrap();
        let policy = f.policies.get(&index).cloned().unwrap_or_default();
        assert_eq!(policy, d.policy, "{when}: policy of {}", d.id);
    }
}

/// A small deterministic generator (no dependency on a random crate in non-test code).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

#[test]
fn a_policy_follows_its_vip_and_changes_alone() {
    let mut r = Reconciler::new();
    let mut f = Fake::default();
    let mut a = spec("10.0.0.1:80/tcp", 97, &[("10.1.0.1", 1, true)]);
    a.policy.rate_limit = Some(crate::state::RateLimit {
        new_flows_per_s: 10,
        burst: 20,
    });
    converge(&mut r, &mut f, std::slice::from_ref(&a), "with a limit");
    // Only the policy changes: one op, no table.
    a.policy.deny = vec!["10.9.0.0/16".parse().unwrap()];
    let ops = r.plan(std::slice::from_ref(&a)).unwrap();
    assert!(matches!(ops[..], [Op::SetPolicy { .. }]), "{ops:?}");
    f.run(&ops, "deny");
    converge(&mut r, &mut f, std::slice::from_ref(&a), "deny");
    // A new ring size moves the VIP to a new index: the policy goes with it.
    a.ring_size = 251;
    converge(&mut r, &mut f, std::slice::from_ref(&a), "moved");
    // Gone, and its index handed out again: the next VIP there has its own (none).
    converge(&mut r, &mut f, &[], "none");
    let many: Vec<VipSpec> = (0..lb_common::MAX_VIPS)
        .map(|i| spec(&format!("10.2.{}.{}:80/tcp", i >> 8, i & 255), 3, &[]))
        .collect();
    converge(&mut r, &mut f, &many, "every index");
}

/// Random desired states over a few VIPs that share backend addresses.
fn random_state(g: &mut Lcg) -> Vec<VipSpec> {
    let ids = [
        "10.0.0.1:80/tcp",
        "10.0.0.1:443/tcp",
        "10.0.0.2:0/udp",
        "10.0.0.3:53/udp",
    ];
    let addrs = ["10.1.0.1", "10.1.0.2", "10.1.0.3", "10.1.0.4", "10.1.0.5"];
    let mut out = Vec::new();
    for id in ids {
        if g.next(4) == 0 {
            continue;
        }
        let mut backends: Vec<(&str, u32, bool)> = Vec::new();
        for a in addrs {
            if g.next(2) == 0 {
                backends.push((a, g.next(3) as u32, g.next(5) != 0));
            }
        }
        let ring = if g.next(10) == 0 { 97 } else { 251 };
        out.push(spec(id, ring, &backends));
    }
    out
}

#[test]
fn every_plan_converges_and_every_write_is_safe() {
    let mut g = Lcg(1);
    let mut r = Reconciler::new();
    let mut f = Fake::default();
    for round in 0..300 {
        let desired = random_state(&mut g);
        converge(&mut r, &mut f, &desired, &format!("round {round}"));
    }
}

#[test]
fn a_plan_cut_short_anywhere_is_repaired_by_adoption() {
    let mut g = Lcg(7);
    for trial in 0..200 {
        let mut r = Reconciler::new();
        let mut f = Fake::default();
        let before = random_state(&mut g);
        converge(&mut r, &mut f, &before, "before");
        let after = random_state(&mut g);
        let ops = r.plan(&after).unwrap();
        let cut = g.next(ops.len() as u64 + 1) as usize;
        f.run(&ops[..cut], &format!("trial {trial} cut at {cut}"));
        // A new agent: reads the maps back, repairs, and converges on the saved state (the
        // old one or the new one, whichever the state file holds).
        let want = if g.next(2) == 0 { &before } else { &after };
        let (mut r2, repairs) = Reconciler::adopt(&f.observe());
        f.run(&repairs, &format!("trial {trial} repairs"));
        converge(
            &mut r2,
            &mut f,
            want,
            &format!("trial {trial} after adoption"),
        );
    }
}

#[test]
fn slots_are_freed_and_reused_with_new_generations() {
    let mut r = Reconciler::new();
    let mut f = Fake::default();
    let mut seen_gen: BTreeMap<u32, u32> = BTreeMap::new();
    for round in 0..100u32 {
        let backends: Vec<String> = (0..1000u32)
            .map(|i| {
                let n = round * 1000 + i;
                format!("10.{}.{}.{}", 64 + (n >> 16), (n >> 8) & 255, n & 255)
            })
            .collect();
        let b: Vec<(&str, u32, bool)> = backends.iter().map(|a| (a.as_str(), 1, true)).collect();
        let desired = [spec("10.0.0.1:80/tcp", 1009, &b)];
        for op in r.plan(&desired).unwrap() {
            f.apply(&op);
        }
        f.assert_safe(&format!("round {round}"));
        assert_eq!(r.slots_in_use(), 1000);
        for (slot, b) in &f.backends {
            if b.flags & BACKEND_F_IN_USE != 0
                && let Some(old) = seen_gen.insert(*slot, b.generation)
            {
                assert!(
                    b.generation > old,
                    "slot {slot} reused without a new generation"
                );
            }
        }
        assert!(verify(&f.observe(), &desired).is_empty());
    }
    // Only 2000 slots were ever needed at once; the maps never grew beyond what is in use
    // plus what was freed.
    assert!(f.backends.len() <= lb_common::MAX_BACKENDS as usize);
}

#[test]
fn a_reused_vip_index_and_slot_start_with_zeroed_counters() {
    let mut r = Reconciler::new();
    let mut f = Fake::default();
    let a = spec("10.0.0.1:80/tcp", 97, &[("10.1.0.1", 1, true)]);
    converge(&mut r, &mut f, std::slice::from_ref(&a), "a");
    let (ia, sa) = (
        r.vip_index(&a.id).unwrap(),
        r.slot(&a.id, &ip("10.1.0.1")).unwrap(),
    );
    converge(&mut r, &mut f, &[], "none");
    // Fill the free lists up to the freed indices, so the next VIP gets them back.
    let mut f2 = f.clone();
    f2.zeroed_vips.clear();
    f2.zeroed_slots.clear();
    let mut r2 = r.clone();
    let mut many = Vec::new();
    for i in 0..lb_common::MAX_VIPS {
        many.push(spec(&format!("10.2.{}.{}:80/tcp", i >> 8, i & 255), 3, &[]));
    }
    let ops = r2.plan(&many).unwrap();
    f2.run(&ops, "all indices");
    assert!(
        f2.zeroed_vips.contains(&ia),
        "index {ia} reused without zeroing"
    );
    let b = spec("10.0.0.9:80/tcp", 97, &[("10.1.0.9", 1, true)]);
    let ops = r.plan(std::slice::from_ref(&b)).unwrap();
    f.run(&ops, "b");
    let sb = r.slot(&b.id, &ip("10.1.0.9")).unwrap();
    assert!(f.zeroed_slots.contains(&sb.index));
    assert!(sa.index != sb.index || sb.generation > sa.generation);
}

#[test]
fn a_backend_shared_with_a_deleted_vip_loses_its_flows_after_adoption() {
    // The case a held-out test found: VIP A and B share backend X; A is deleted; the agent
    // restarts; on B, Y is added and X removed. X's slot of B must be retired.
    let mut r = Reconciler::new();
    let mut f = Fake::default();
    let a = spec("10.0.0.1:80/tcp", 97, &[("10.1.0.1", 1, true)]);
    let b = spec("10.0.0.2:80/tcp", 97, &[("10.1.0.1", 1, true)]);
    converge(&mut r, &mut f, &[a, b.clone()], "both");
    converge(&mut r, &mut f, std::slice::from_ref(&b), "a deleted");
    let (mut r, repairs) = Reconciler::adopt(&f.observe());
    assert!(repairs.is_empty(), "{repairs:?}");
    let b2 = spec("10.0.0.2:80/tcp", 97, &[("10.1.0.2", 1, true)]);
    converge(&mut r, &mut f, std::slice::from_ref(&b2), "x replaced by y");
    let in_use: BTreeSet<IpAddr> = f
        .backends
        .values()
        .filter(|b| b.flags & BACKEND_F_IN_USE != 0)
        .map(|b| crate::addr::from_words(b.addr, b.family))
        .collect();
    assert_eq!(in_use, BTreeSet::from([ip("10.1.0.2")]));
}

#[test]
fn a_backend_going_down_gets_a_new_generation_and_leaves_the_table() {
    let mut r = Reconciler::new();
    let mut f = Fake::default();
    let up = spec(
        "10.0.0.1:80/tcp",
        97,
        &[("10.1.0.1", 1, true), ("10.1.0.2", 1, true)],
    );
    converge(&mut r, &mut f, std::slice::from_ref(&up), "up");
    let g0 = r.slot(&up.id, &ip("10.1.0.2")).unwrap().generation;
    let down = spec(
        "10.0.0.1:80/tcp",
        97,
        &[("10.1.0.1", 1, true), ("10.1.0.2", 1, false)],
    );
    converge(&mut r, &mut f, std::slice::from_ref(&down), "down");
    let s = r.slot(&up.id, &ip("10.1.0.2")).unwrap();
    assert!(s.generation > g0 && !s.live);
    // Drained (weight 0, live): out of the table, same generation, flows stay.
    let drained = spec(
        "10.0.0.1:80/tcp",
        97,
        &[("10.1.0.1", 1, true), ("10.1.0.2", 0, true)],
    );
    converge(&mut r, &mut f, std::slice::from_ref(&drained), "drained");
    assert_eq!(
        r.slot(&up.id, &ip("10.1.0.2")).unwrap().generation,
        s.generation
    );
}

#[test]
fn too_many_backends_is_refused_before_any_write() {
    let mut r = Reconciler::new();
    let addrs: Vec<String> = (0..40_000u32)
        .map(|n| format!("10.{}.{}.{}", 64 + (n >> 16), (n >> 8) & 255, n & 255))
        .collect();
    let mk = |id: &str, from: usize| {
        let b: Vec<(&str, u32, bool)> = addrs[from..from + 20_000]
            .iter()
            .map(|a| (a.as_str(), 1, true))
            .collect();
        spec(id, 3, &b)
    };
    let a = mk("10.0.0.1:80/tcp", 0);
    let b = mk("10.0.0.2:80/tcp", 20_000);
    let c = mk("10.0.0.3:80/tcp", 10_000);
    r.plan(&[a.clone(), b.clone(), c.clone()]).unwrap();
    let d = mk("10.0.0.4:80/tcp", 0);
    assert!(matches!(r.plan(&[a, b, c, d]), Err(Exhausted::Slots(_))));
}
