//! What the read commands print: tables for people, JSON on request. Every function writes
//! to the given output and returns its I/O error, so that output to a closed pipe ends the
//! command quietly instead of panicking.

use std::{
    io::{self, Write},
    time::Duration,
};

use crate::{
    api::{self, Changes, ProbeView, Stats, Status, VipView, VrrpStatus},
    datapath::decap::DecapStatus,
};

pub fn json(out: &mut impl Write, body: &str) -> io::Result<()> {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    writeln!(
        out,
        "{}",
        serde_json::to_string_pretty(&v).unwrap_or_default()
    )
}

pub fn changes(out: &mut impl Write, c: &Changes) -> io::Result<()> {
    if c.changes.is_empty() {
        writeln!(out, "no change")?;
    }
    for l in &c.changes {
        writeln!(out, "{l}")?;
    }
    Ok(())
}

/// STATE, LAST, LATENCY, SINCE cells of a health view ("-" without a check).
fn health_cells(h: Option<&api::HealthView>) -> (String, String, String, String) {
    match h {
        None => ("-".into(), "-".into(), "-".into(), "-".into()),
        Some(h) => (
            if h.up { "up" } else { "down" }.into(),
            h.last.clone().unwrap_or_else(|| "-".into()),
            h.latency_ms.map_or("-".into(), |l| format!("{l:.1}ms")),
            format!("{:.0}s", h.since_s),
        ),
    }
}

pub fn vips(out: &mut impl Write, vips: &[VipView]) -> io::Result<()> {
    writeln!(
        out,
        "{:<28} {:<9} {:>9} {:>9} {:>12} {:>14}",
        "VIP", "AFFINITY", "RING", "BACKENDS", "PACKETS", "BYTES"
    )?;
    for v in vips {
        writeln!(
            out,
            "{:<28} {:<9} {:>9} {:>9} {:>12} {:>14}",
            v.address.to_string(),
            if v.affinity.is_some() { "src-ip" } else { "-" },
            v.ring_size,
            v.backends.len(),
            v.counters.packets,
            v.counters.bytes
        )?;
    }
    Ok(())
}

pub fn probes(out: &mut impl Write, probes: &[ProbeView]) -> io::Result<()> {
    writeln!(
        out,
        "{:<24} {:<26} {:<5} {:<7} {:<26} {:<5} {:>9} {:>7}  LAST",
        "VIP", "BACKEND", "KIND", "VIA", "TARGET", "STATE", "LATENCY", "SINCE"
    )?;
    let mut notes = Vec::new();
    for p in probes {
        let h = health_cells(p.health.as_ref());
        let mut via = p.via.to_string();
        if let Some(why) = &p.via_reason {
            via.push('*');
            notes.push(format!("{} {}: {via} because {why}", p.vip, p.backend));
        }
        writeln!(
            out,
            "{:<24} {:<26} {:<5} {:<7} {:<26} {:<5} {:>9} {:>7}  {}",
            p.vip.to_string(),
            p.backend.to_string(),
            p.kind.to_string(),
            via,
            p.target,
            h.0,
            h.2,
            h.3,
            h.1
        )?;
    }
    for n in notes {
        writeln!(out, "* {n}")?;
    }
    Ok(())
}

/// A weight for tables: whole numbers without decimals.
fn weight_cell(w: f64) -> String {
    if w.fract() == 0.0 {
        format!("{w:.0}")
    } else {
        format!("{w:.2}")
    }
}

pub fn stats(out: &mut impl Write, s: &Stats) -> io::Result<()> {
    writeln!(
        out,
        "{:<28} {:<40} {:>12} {:>14}",
        "VIP", "BACKEND", "PACKETS", "BYTES"
    )?;
    for v in &s.vips {
        writeln!(
            out,
            "{:<28} {:<40} {:>12} {:>14}",
            v.address.to_string(),
            "",
            v.counters.packets,
            v.counters.bytes
        )?;
        for (reason, n) in &v.drops {
            writeln!(out, "{:<28} {:<40} {:>12}", "", reason, n)?;
        }
        for b in &v.backends {
            let name = format!("{} ({}, w{})", b.address, b.state, b.weight);
            writeln!(
                out,
                "{:<28} {:<40} {:>12} {:>14}",
                "", name, b.counters.packets, b.counters.bytes
            )?;
        }
    }
    writeln!(out, "\n{:<28} {:>12} {:>14}", "COUNTER", "PACKETS", "BYTES")?;
    for (name, c) in &s.global {
        writeln!(out, "{name:<28} {:>12} {:>14}", c.packets, c.bytes)?;
    }
    writeln!(
        out,
        "{:<28} {:>12}",
        "flood_not_inserted", s.flood.not_inserted
    )?;
    writeln!(out, "{:<28} {:>12}", "flood_windows", s.flood.flood_windows)?;
    Ok(())
}

pub fn status(out: &mut impl Write, s: &Status) -> io::Result<()> {
    let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
    writeln!(out, "agent        maglb {} (pid {})", s.version, s.pid)?;
    writeln!(
        out,
        "interface    {} ({}, {})",
        or(&s.interface),
        s.mode,
        if s.attached { "attached" } else { "detached" }
    )?;
    if let Some(why) = &s.detached_reason {
        writeln!(out, "detached     {why}")?;
    }
    writeln!(
        out,
        "forwarding   {}",
        if s.ready {
            "yes"
        } else {
            "no (passing everything to the kernel)"
        }
    )?;
    writeln!(
        out,
        "next hop     {} {}",
        or(&s.nexthop),
        or(&s.nexthop_mac)
    )?;
    writeln!(
        out,
        "outer source {} {}",
        or(&s.source_v4),
        or(&s.source_v6)
    )?;
    writeln!(out, "mtu          {}", s.mtu)?;
    match (&s.probe_tunnel, &s.probe_tunnel_unavailable) {
        (Some(i), _) => writeln!(
            out,
            "probes       over the tunnel possible (classifier on {i})"
        )?,
        (None, Some(why)) => writeln!(out, "probes       direct only: {why}")?,
        (None, None) => writeln!(out, "probes       direct only")?,
    }
    writeln!(out, "vips         {}", s.vips)?;
    writeln!(out, "backends     {}", s.backends)?;
    writeln!(
        out,
        "conntrack    {} flows (sets of {})",
        s.conntrack_entries, s.conntrack_ways
    )?;
    writeln!(out, "state file   {}", s.state_file)?;
    writeln!(out, "bpffs        {}", s.bpffs)
}

pub fn vrrp(out: &mut impl Write, v: &VrrpStatus) -> io::Result<()> {
    writeln!(
        out,
        "state        {} (vrid {} on {})",
        v.state, v.vrid, v.interface
    )?;
    writeln!(
        out,
        "master       {}",
        v.master.clone().unwrap_or_else(|| "-".into())
    )?;
    let rel = if v.released { ", released" } else { "" };
    writeln!(
        out,
        "priority     {} (configured {}){rel}",
        v.effective_priority, v.priority
    )?;
    writeln!(out, "last change  {:.0} s ago: {}", v.since_s, v.reason)?;
    writeln!(out, "transitions  {}", v.transitions)?;
    writeln!(
        out,
        "adverts      {} sent, {} received",
        v.adverts_sent, v.adverts_received
    )?;
    let invalid: Vec<String> = v.invalid.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let invalid = if invalid.is_empty() {
        "none".into()
    } else {
        invalid.join(", ")
    };
    writeln!(out, "refused      {invalid}")?;
    if v.announcements > 0 {
        writeln!(out, "re-announced {} times while master", v.announcements)?;
    }
    for w in &v.warnings {
        writeln!(out, "warning      {w}")?;
    }
    Ok(())
}

pub fn bgp(out: &mut impl Write, b: &api::BgpStatus) -> io::Result<()> {
    writeln!(
        out,
        "routes       table {} proto {} via {} (BIRD exports them)",
        b.table,
        b.protocol,
        b.interface.as_deref().unwrap_or("-")
    )?;
    writeln!(
        out,
        "rules        at least {} live backends; withdraw wait {} ms",
        b.min_live_backends, b.withdraw_wait_ms
    )?;
    if b.withdrawn_by_operator {
        writeln!(
            out,
            "held         withdrawn by the operator (`maglb bgp announce` undoes it)"
        )?;
    }
    if b.leaving {
        writeln!(out, "held         leaving: everything withdrawn")?;
    }
    if let Some(e) = &b.error {
        writeln!(out, "error        {e}")?;
    }
    writeln!(out)?;
    writeln!(out, "{:<28} {:<10} {:>9}  WHY", "ADDRESS", "STATE", "SINCE")?;
    for a in &b.addresses {
        writeln!(
            out,
            "{:<28} {:<10} {:>8.0}s  {}",
            a.address,
            if a.announced {
                "announced"
            } else {
                "withdrawn"
            },
            a.since_s,
            a.reason
        )?;
    }
    Ok(())
}

pub fn backends(out: &mut impl Write, vips: &[VipView]) -> io::Result<()> {
    writeln!(
        out,
        "{:<24} {:<26} {:>6} {:>9} {:<8} {:<10} {:<5} {:<20} {:>8} {:>6} {:>10} {:>12}",
        "VIP",
        "BACKEND",
        "WEIGHT",
        "EFFECTIVE",
        "STATE",
        "POOL",
        "HEALTH",
        "LAST",
        "LATENCY",
        "SINCE",
        "PACKETS",
        "BYTES"
    )?;
    let any_backup = vips.iter().any(|v| v.backends.iter().any(|b| b.backup));
    for v in vips {
        for b in &v.backends {
            let h = health_cells(b.health.as_ref());
            let state = if b.backup {
                format!("{}*", b.state)
            } else {
                b.state.to_string()
            };
            writeln!(
                out,
                "{:<24} {:<26} {:>6} {:>9} {:<8} {:<10} {:<5} {:<20} {:>8} {:>6} {:>10} {:>12}",
                v.address.to_string(),
                b.address.to_string(),
                b.weight,
                weight_cell(b.effective_weight),
                state,
                b.pool,
                h.0,
                h.1,
                h.2,
                h.3,
                b.counters.packets,
                b.counters.bytes
            )?;
        }
    }
    if any_backup {
        writeln!(out, "(* backup)")?;
    }
    Ok(())
}

pub fn decap(
    out: &mut impl Write,
    st: &[DecapStatus],
    pin_dir: &std::path::Path,
) -> io::Result<()> {
    if st.is_empty() {
        return writeln!(
            out,
            "decap is not attached anywhere (pins under {})",
            pin_dir.display()
        );
    }
    writeln!(
        out,
        "{:<16} {:>12} {:>14}",
        "INTERFACE", "DECAPSULATED", "BYTES"
    )?;
    for s in st {
        writeln!(out, "{:<16} {:>12} {:>14}", s.iface, s.packets, s.bytes)?;
    }
    Ok(())
}

/// One screen of `maglb stats --watch`: rates between two reads, per VIP and backend.
pub fn rates(
    out: &mut impl Write,
    prev: &Stats,
    cur: &Stats,
    dt: f64,
    every: Duration,
    tty: bool,
) -> io::Result<()> {
    let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / dt;
    if tty {
        write!(out, "\x1b[2J\x1b[H")?;
    }
    writeln!(
        out,
        "maglb stats --watch (every {:.1} s, Ctrl-C to stop)",
        every.as_secs_f64()
    )?;
    writeln!(
        out,
        "{:<28} {:<26} {:>10} {:>12} {:>11} {:<8} {:<6}",
        "VIP", "BACKEND", "PKT/S", "BIT/S", "NEWFLOWS/S", "STATE", "HEALTH"
    )?;
    for v in &cur.vips {
        let old = prev.vips.iter().find(|o| o.address == v.address);
        let (p0, b0, f0) = old.map_or((0, 0, 0), |o| {
            (o.counters.packets, o.counters.bytes, o.new_flows)
        });
        writeln!(
            out,
            "{:<28} {:<26} {:>10.0} {:>12} {:>11.0}",
            v.address.to_string(),
            "",
            rate(v.counters.packets, p0),
            si(8.0 * rate(v.counters.bytes, b0)),
            rate(v.new_flows, f0)
        )?;
        for b in &v.backends {
            let ob = old.and_then(|o| o.backends.iter().find(|x| x.address == b.address));
            let (p0, b0) = ob.map_or((0, 0), |o| (o.counters.packets, o.counters.bytes));
            let health = b
                .health
                .as_ref()
                .map_or("-", |h| if h.up { "up" } else { "down" });
            writeln!(
                out,
                "{:<28} {:<26} {:>10.0} {:>12} {:>11} {:<8} {:<6}",
                "",
                b.address.to_string(),
                rate(b.counters.packets, p0),
                si(8.0 * rate(b.counters.bytes, b0)),
                "",
                b.state.to_string(),
                health
            )?;
        }
    }
    let drops = |s: &Stats| -> u64 {
        s.global
            .iter()
            .filter(|(k, _)| k.starts_with("drop_"))
            .map(|(_, c)| c.packets)
            .sum()
    };
    writeln!(out, "drops/s {:.0}", rate(drops(cur), drops(prev)))?;
    out.flush()
}

/// 1234567.0 -> "1.2M".
pub fn si(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.1}G", v / 1e9),
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}
