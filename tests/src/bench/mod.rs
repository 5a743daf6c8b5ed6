//! `cargo xtask bench`: every benchmark measures maglb and its baseline in the same run and
//! reports medians and ratios; the report goes to stdout and to BENCHMARKS.md.

mod calls;
pub mod conns;
pub mod control;
pub mod flood;
pub mod forward;
pub mod packet;
mod settings;

use std::fmt::Write as _;

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The median of the paired differences `with[i] - base[i]`: rounds measured a moment apart,
/// so that a change in the machine's load between rounds cancels out of each pair.
pub fn paired_cost(with: &[f64], base: &[f64]) -> f64 {
    median(with.iter().zip(base).map(|(w, b)| w - b).collect())
}

/// A markdown report, one section per benchmark.
#[derive(Default)]
pub struct Report(pub String);

impl Report {
    /// A section: a table (header, rows) and notes under it. Printed as it is added.
    pub fn section(
        &mut self,
        title: &str,
        header: &[&str],
        rows: &[Vec<String>],
        notes: &[String],
    ) {
        let mut s = format!(
            "## {title}\n\n| {} |\n|{}\n",
            header.join(" | "),
            "---|".repeat(header.len())
        );
        for r in rows {
            let _ = writeln!(s, "| {} |", r.join(" | "));
        }
        for n in notes {
            let _ = write!(s, "\n{n}\n");
        }
        s.push('\n');
        print!("{s}");
        self.0.push_str(&s);
    }
}

/// The 1, 5 and 15 minute load averages, joined by `sep`.
pub fn load_average(sep: &str) -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(sep)
}

/// "met" / "missed" against a limit.
pub fn verdict(ok: bool) -> String {
    if ok { "met".into() } else { "missed".into() }
}
