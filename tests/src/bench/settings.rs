//! What each datapath setting costs per packet: the same packets with the setting on and off
//! in alternating rounds on one balancer, and what a packet the setting drops costs against
//! the empty program.
//!
//! The new-flow settings (source prefixes, per-source limit, per-VIP cap) are measured on
//! new flows that are not inserted (the CPU is kept under flood): the insert costs several
//! times more than any of them and varies more between runs than they cost, so it would hide
//! them. Their cost is the same with an insert.

use std::net::Ipv4Addr;

use aya::programs::Xdp;
use lb_common::DEFAULT_RING_SIZE;
use lb_userspace::{
    balancer::Balancer,
    state::{Encap, Prefix, RateLimit, VipId, VipSpec},
};

use super::{
    Report, median,
    packet::{Fresh, ack4, time_runs, v4_backends},
    paired_cost,
};
use crate::fixture::{self, VIP, vip};

/// Rounds per row, alternating, and runs per round: many short rounds, so that the paired
/// difference of each round (with the setting, then without it, a moment apart) rides out the
/// machine's load changing.
const ROUNDS: usize = 20;
const RUNS: usize = 2_500;

/// Deny prefixes in the list that new flows are looked up in: none matches the new flows'
/// sources (100.64.0.0/10), so every lookup walks the trie and admits.
const PREFIXES: u8 = 100;
/// The GUE destination port of the GUE rows.
const GUE_PORT: u16 = 6080;

/// One row: `with` the setting, `base` without it (or the empty program), per round.
struct Row {
    name: String,
    with: Vec<f64>,
    base: Vec<f64>,
    baseline: String,
}

impl Row {
    /// The cost is the median of the rounds' paired differences.
    fn cells(self) -> Vec<String> {
        let cost = paired_cost(&self.with, &self.base);
        vec![
            self.name,
            format!("{:.0}", median(self.with)),
            format!("{:.0}", median(self.base)),
            format!("{cost:.0}"),
            self.baseline,
        ]
    }
}

/// A setting turned on (`true`) and off between rounds.
type Toggle<'a> = &'a mut dyn FnMut(&mut Balancer, bool) -> anyhow::Result<()>;

/// Rounds alternating the setting off and on, each `RUNS` packets from `frame`.
fn toggled(
    bal: &mut Balancer,
    name: &str,
    baseline: &str,
    set: Toggle,
    frame: &mut dyn FnMut() -> Vec<u8>,
) -> anyhow::Result<Row> {
    let mut row = Row {
        name: name.into(),
        with: Vec::new(),
        base: Vec::new(),
        baseline: baseline.into(),
    };
    for _ in 0..ROUNDS {
        set(bal, false)?;
        row.base.push(time_runs(bal.program(), RUNS, |_| frame()));
        set(bal, true)?;
        row.with.push(time_runs(bal.program(), RUNS, |_| frame()));
    }
    // The measured packets were forwarded with the setting on, not refused.
    expect(bal, &frame(), XDP_TX, name)?;
    set(bal, false)?;
    Ok(row)
}

/// Rounds alternating the empty program and maglb with the setting on.
fn dropped(
    bal: &mut Balancer,
    empty: &Xdp,
    name: &str,
    set: Toggle,
    space: u8,
) -> anyhow::Result<Row> {
    let (mut ours, mut theirs) = (Fresh::new(space), Fresh::new(space + 1));
    let mut row = Row {
        name: name.into(),
        with: Vec::new(),
        base: Vec::new(),
        baseline: "the empty program".into(),
    };
    set(bal, true)?;
    for _ in 0..ROUNDS {
        row.base.push(time_runs(empty, RUNS, |_| theirs.next()));
        row.with
            .push(time_runs(bal.program(), RUNS, |_| ours.next()));
    }
    // A source's first flow is always admitted (its bucket would start full): the next
    // source's second is checked.
    fixture::run(bal.program(), &ours.next());
    expect(bal, &ours.next(), XDP_DROP, name)?;
    set(bal, false)?;
    Ok(row)
}

/// A ring size of the other class than the default's (`lb_common::ring_is_fixed`): prime,
/// near the default.
const OTHER_RING: u32 = 65521;

/// Gives VIP `id` (the bench's VIP:80, its backends unchanged) a ring of `size` slots.
fn ring_size(b: &mut Balancer, id: &VipId, size: u32) -> anyhow::Result<()> {
    let mut spec = VipSpec::new(*id);
    spec.ring_size = size;
    spec.backends = v4_backends();
    Ok(b.set_vip(spec)?)
}

const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;

/// Fails the bench when `frame` does not get `action`: a row must measure what it names.
fn expect(bal: &mut Balancer, frame: &[u8], action: u32, row: &str) -> anyhow::Result<()> {
    let got = fixture::run(bal.program(), frame).0;
    anyhow::ensure!(got == action, "{row}: action {got}, expected {action}");
    Ok(())
}

/// A rate limit while `on`, else none.
fn limit(on: bool, per_s: u32, burst: u32) -> Option<RateLimit> {
    on.then_some(RateLimit {
        new_flows_per_s: per_s,
        burst,
    })
}

/// While `on`, a deny list: `PREFIXES` /16s in 10.0.0.0/8 that no new flow matches, and with
/// `all` also the new flows' 100.64.0.0/10. Else none.
fn deny(on: bool, all: bool) -> Vec<Prefix> {
    if !on {
        return Vec::new();
    }
    let mut v: Vec<Prefix> = (0..PREFIXES)
        .map(|i| Prefix {
            addr: Ipv4Addr::new(10, i, 0, 0).into(),
            len: 16,
        })
        .collect();
    if all {
        v.push(Prefix {
            addr: Ipv4Addr::new(100, 64, 0, 0).into(),
            len: 10,
        });
    }
    v
}

/// The per-setting costs, on `bal` (set up by `packet::run`: VIP:80/tcp on 100 backends, an
/// established flow from `ack4(40_000)`).
pub fn run(report: &mut Report, bal: &mut Balancer, empty: &Xdp) -> anyhow::Result<()> {
    let id: VipId = vip(VIP, 80, "tcp");
    let ack = ack4(40_000);
    // The table above ended full: make sure the flow is in it.
    fixture::run(bal.program(), &ack);
    let mut rows = vec![toggled(
        bal,
        "`encap = \"gue\"`, established TCP flow",
        "IP-in-IP",
        &mut |b, on| {
            let e = if on { Encap::Gue } else { Encap::Ipip };
            Ok(b.set_encap(e, GUE_PORT)?)
        },
        &mut || ack.clone(),
    )?];
    // New flows from here on are not inserted.
    bal.set_flood_threshold(Some(1))?;
    let mut fresh = Fresh::new(20);
    let no_insert = "the same new flows without it";
    rows.push(toggled(
        bal,
        "the VIP table (no call), new flow",
        "the same new flows, each VIP from the hash map",
        &mut |b, on| Ok(b.dp.use_vip_table(on)?),
        &mut || fresh.next(),
    )?);
    rows.push(toggled(
        bal,
        "a ring of the default size (no call), new flow",
        &format!("the same new flows, the VIP's ring of {OTHER_RING} slots (`RINGS`: a call)"),
        &mut |b, on| ring_size(b, &id, if on { DEFAULT_RING_SIZE } else { OTHER_RING }),
        &mut || fresh.next(),
    )?);
    ring_size(bal, &id, DEFAULT_RING_SIZE)?;
    rows.push(toggled(
        bal,
        &format!("`deny` ({PREFIXES} prefixes, none matching), new flow"),
        no_insert,
        &mut |b, on| Ok(b.set_vip_prefixes(&id, &[], &deny(on, false))?),
        &mut || fresh.next(),
    )?);
    rows.push(toggled(
        bal,
        "`rate_limit` (under it), new flow",
        no_insert,
        &mut |b, on| Ok(b.set_vip_source_limit(&id, limit(on, 1_000_000, 1_000_000))?),
        &mut || fresh.next(),
    )?);
    // A random-source flood: every SYN's source is new, noted in the first-seen filter,
    // with no bucket made.
    let mut spoofed = Fresh::spoofed(26);
    rows.push(toggled(
        bal,
        "`rate_limit`, new flow from a new source (its first)",
        no_insert,
        &mut |b, on| Ok(b.set_vip_source_limit(&id, limit(on, 1_000_000, 1_000_000))?),
        &mut || spoofed.next(),
    )?);
    rows.push(toggled(
        bal,
        "`new_flow_cap` (under it), new flow",
        no_insert,
        &mut |b, on| Ok(b.set_vip_new_flow_cap(&id, limit(on, 1_000_000, 1_000_000))?),
        &mut || fresh.next(),
    )?);
    rows.push(dropped(
        bal,
        empty,
        "SYN from a denied source (dropped)",
        &mut |b, on| Ok(b.set_vip_prefixes(&id, &[], &deny(on, true))?),
        22,
    )?);
    rows.push(dropped(
        bal,
        empty,
        "SYN over its source's `rate_limit` (dropped)",
        &mut |b, on| Ok(b.set_vip_source_limit(&id, limit(on, 1, 1))?),
        24,
    )?);
    bal.set_flood_threshold(None)?;
    let table: Vec<Vec<String>> = rows.into_iter().map(Row::cells).collect();
    report.section(
        "Per-packet cost of each setting",
        &["case", "with it ns", "baseline ns", "cost ns", "baseline"],
        &table,
        &[format!(
            "{ROUNDS} rounds of {RUNS} runs each, one packet per run, on the balancer of the \
             table above; the setting is turned on and off between alternating rounds, or the \
             empty program alternates with maglb. The columns are medians of the rounds' \
             medians; the cost is the median of the rounds' paired differences. The new-flow \
             rows keep the CPU under flood, so nothing is inserted: the insert (above) costs \
             more, and varies more from run to run, than these settings cost, and they cost \
             the same with it. Every new flow is a SYN from a (source address, port) never \
             sent before; a source sends 50,000 of them, so its `rate_limit` bucket exists, \
             except in the new-source row, where each SYN comes from an address of its own \
             (a random-source flood's). The dropped rows are what a flood \
             from a refused source costs per packet. The flood threshold itself (below it) \
             adds one per-CPU read and write to an insert. The VIP-table row is not a setting \
             but the datapath's own VIP lookup: its baseline empties the table, so that every \
             new flow finds its VIP in the hash map (as a VIP whose bucket is full does); a \
             negative cost is what the table saves. The ring row is the datapath's own too: \
             its baseline gives VIP:80 a ring of {OTHER_RING} slots, which lives in `RINGS` \
             (rings of any size, whose lookup is a helper call) instead of `RINGS_FIXED`."
        )],
    );
    Ok(())
}
