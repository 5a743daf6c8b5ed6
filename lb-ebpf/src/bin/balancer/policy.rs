//! Admission of new flows per VIP: source prefixes (allow / deny), a per-source rate limit and
//! a cap on the VIP's new flows. Only packets that would start a flow come here; established
//! flows are never limited.

use aya_ebpf::maps::lpm_trie::Key;
use lb_common::{
    FAMILY_V4, FlowKey, POLICY_F_ALLOW_ONLY, POLICY_F_PREFIXES, PREFIX_ALLOW, PREFIX_DENY,
    PrefixData4, PrefixData6, SrcKey, VipPolicy, seen, vip_stat,
};

use crate::maps::{PREFIXES_V4, PREFIXES_V6, SRC_LIMIT, SRC_SEEN, VIP_CAP, VIP_POLICY};

/// GCRA (a token bucket counted in time): admits when the theoretical arrival time `tat` is
/// at most `tolerance` ahead of `now`, and then moves it `interval` on.
#[inline(always)]
fn gcra(tat: *mut u64, now: u64, interval: u64, tolerance: u64) -> bool {
    unsafe {
        let t = if *tat > now { *tat } else { now };
        if t - now > tolerance {
            return false;
        }
        *tat = t + interval;
    }
    true
}

/// Whether VIP `vip`'s policy admits a new flow `flow` at `now` (coarse ns). `Err` carries
/// the drop reason (`vip_stat`).
#[inline(always)]
pub fn admit(flow: &FlowKey, vip: u32, now: u64) -> Result<(), u32> {
    let Some(p) = VIP_POLICY.get(vip) else {
        return Ok(());
    };
    if p.flags & POLICY_F_PREFIXES != 0 {
        prefixes(flow, vip, p)?;
    }
    if p.src_interval_ns != 0 {
        source(flow, vip, p, now)?;
    }
    if p.cap_interval_ns != 0
        && let Some(tat) = VIP_CAP.get_ptr_mut(vip)
        && !gcra(tat, now, p.cap_interval_ns, p.cap_tolerance_ns)
    {
        return Err(vip_stat::VIP_CAP);
    }
    Ok(())
}

/// The longest source prefix of the VIP that matches decides; no match refuses only on a VIP
/// with an allow list.
#[inline(never)]
fn prefixes(flow: &FlowKey, vip: u32, p: &VipPolicy) -> Result<(), u32> {
    let found = if flow.family == FAMILY_V4 {
        let key = Key::new(
            64,
            PrefixData4 {
                vip,
                addr: flow.src[0],
            },
        );
        PREFIXES_V4.get(&key).copied()
    } else {
        let key = Key::new(
            160,
            PrefixData6 {
                vip,
                addr: flow.src,
            },
        );
        PREFIXES_V6.get(&key).copied()
    };
    match found {
        Some(PREFIX_DENY) => Err(vip_stat::DENIED),
        Some(PREFIX_ALLOW) => Ok(()),
        _ if p.flags & POLICY_F_ALLOW_ONLY != 0 => Err(vip_stat::NOT_ALLOWED),
        _ => Ok(()),
    }
}

/// The source's bucket (/32 for IPv4, /64 for IPv6), made at its second new flow within an
/// interval (see [`first_flows`]). Buckets are shared by the CPUs without locks: two CPUs
/// admitting at the same instant may both pass, so a source may exceed its burst by one flow
/// per CPU.
#[inline(always)]
fn source(flow: &FlowKey, vip: u32, p: &VipPolicy, now: u64) -> Result<(), u32> {
    let key = SrcKey {
        vip,
        family: flow.family as u32,
        addr: if flow.family == FAMILY_V4 {
            [flow.src[0], 0]
        } else {
            [flow.src[0], flow.src[1]]
        },
    };
    match SRC_LIMIT.get_ptr_mut(key) {
        Some(tat) if !gcra(tat, now, p.src_interval_ns, p.src_tolerance_ns) => {
            Err(vip_stat::SRC_RATE)
        }
        Some(_) => Ok(()),
        None => first_flows(&key, p, now),
    }
}

/// A source without a bucket. Its first flow in an interval is admitted (a bucket starts
/// full) and noted in the first-seen filter; at its second, the bucket is made as if at the
/// first, and judges this flow. A random-source flood (each source seen once) so costs a
/// store per packet, not an LRU insert.
#[inline(always)]
fn first_flows(key: &SrcKey, p: &VipPolicy, now: u64) -> Result<(), u32> {
    let (slot, fingerprint) = seen::slot(key);
    let Some(note) = SRC_SEEN.get_ptr_mut(slot) else {
        return Ok(());
    };
    let first = seen::noted_within(unsafe { *note }, fingerprint, now, p.src_interval_ns);
    let Some(first) = first else {
        unsafe { *note = seen::note(fingerprint, now) };
        return Ok(());
    };
    let mut tat = first + p.src_interval_ns;
    let admitted = gcra(&mut tat, now, p.src_interval_ns, p.src_tolerance_ns);
    let _ = SRC_LIMIT.insert(key, tat, 0);
    if admitted {
        Ok(())
    } else {
        Err(vip_stat::SRC_RATE)
    }
}
