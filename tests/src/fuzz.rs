//! A fuzzer for the balancer XDP program through BPF_PROG_TEST_RUN (no interface, no traffic).
//!
//! Frames come from a seeded generator ([`input`]): random bytes, and valid frames of every kind
//! the balancer handles with structure-aware mutations. Every result is judged by an oracle
//! written apart from the datapath ([`oracle`]). A violating frame is saved as a hex fixture
//! under `tests/fuzz-findings/`, named by seed and index; frame `i` of seed `s` can be
//! regenerated on its own with [`input::frame`].
//!
//! `cargo xtask fuzz [--frames N] [--seed S]` runs [`main`]; `tests/fuzz.rs` runs a bounded
//! run with a fixed seed and replays the saved findings.

pub mod input;
pub mod oracle;
pub mod rng;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use crate::fixture::Lab;
use oracle::Outcome;

/// Where findings are saved (and replayed from by the fuzz test).
pub const FINDINGS_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fuzz-findings");
/// Findings kept (and saved) per kind of violation in one run.
pub const KEEP_PER_KIND: usize = 5;
/// Frames between progress lines, when asked for.
const PROGRESS_EVERY: u64 = 1_000_000;

pub struct Options {
    pub frames: u64,
    pub seed: u64,
    /// Save findings here.
    pub save_to: Option<PathBuf>,
    /// Print a line every million frames (to stderr).
    pub progress: bool,
}

/// One violating frame.
pub struct Finding {
    pub seed: u64,
    pub index: u64,
    pub action: u32,
    pub violation: oracle::Violation,
    pub input: Vec<u8>,
    pub output: Vec<u8>,
}

impl Finding {
    /// The fixture file: the input in hex, what happened in comments.
    pub fn fixture(&self) -> String {
        let mut s = format!(
            "# maglb fuzz finding: seed {}, frame {}\n# {}\n# action {} ({})\n",
            self.seed,
            self.index,
            self.violation,
            self.action,
            action_name(self.action)
        );
        for line in hex(&self.output).lines() {
            let _ = writeln!(s, "# out {line}");
        }
        s.push_str(&hex(&self.input));
        s.push('\n');
        s
    }
}

/// The result of a run.
#[derive(Default)]
pub struct Summary {
    pub seed: u64,
    pub frames: u64,
    /// Per XDP action 0-3 (ABORTED, DROP, PASS, TX); other actions count as violations.
    pub actions: [u64; 4],
    /// Per allowed outcome (XDP_TX split by what was sent).
    pub outcomes: BTreeMap<Outcome, u64>,
    pub violations: u64,
    pub by_kind: BTreeMap<&'static str, u64>,
    /// The first [`KEEP_PER_KIND`] findings of each kind.
    pub findings: Vec<Finding>,
    pub saved: Vec<PathBuf>,
    pub elapsed: Duration,
}

pub fn action_name(a: u32) -> &'static str {
    match a {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        2 => "XDP_PASS",
        3 => "XDP_TX",
        _ => "unknown",
    }
}

impl Summary {
    pub fn per_second(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The report `cargo xtask fuzz` prints.
    pub fn report(&self) -> String {
        let mut s = format!(
            "{} frames, seed {}, in {:.1} s: {:.0} frames/s\n",
            self.frames,
            self.seed,
            self.elapsed.as_secs_f64(),
            self.per_second()
        );
        for (a, n) in self.actions.iter().enumerate() {
            let pct = 100.0 * *n as f64 / self.frames.max(1) as f64;
            let _ = writeln!(s, "  {:<12} {n:>10}  {pct:5.1}%", action_name(a as u32));
        }
        for (o, n) in &self.outcomes {
            let _ = writeln!(s, "    {:<10} {n:>10}", format!("{o:?}"));
        }
        let _ = writeln!(s, "violations: {}", self.violations);
        for (k, n) in &self.by_kind {
            let _ = writeln!(s, "  {n:>8}  {k}");
        }
        for f in &self.findings {
            let _ = writeln!(
                s,
                "  frame {}: {} ({} bytes)",
                f.index,
                f.violation,
                f.input.len()
            );
        }
        for p in &self.saved {
            let _ = writeln!(s, "  saved {}", p.display());
        }
        s
    }
}

/// Runs `opts.frames` frames of seed `opts.seed` through the balancer of `lab`.
pub fn run(lab: &mut Lab, opts: &Options) -> anyhow::Result<Summary> {
    let mut sum = Summary {
        seed: opts.seed,
        ..Summary::default()
    };
    let start = Instant::now();
    for index in 0..opts.frames {
        let input = input::frame(opts.seed, index);
        let (action, output) = lab.run(&input);
        sum.frames += 1;
        if let Some(n) = sum.actions.get_mut(action as usize) {
            *n += 1;
        }
        match oracle::check(&input, action, &output) {
            Ok(o) => *sum.outcomes.entry(o).or_default() += 1,
            Err(violation) => {
                sum.violations += 1;
                let n = sum.by_kind.entry(violation.kind).or_default();
                *n += 1;
                if *n as usize <= KEEP_PER_KIND {
                    let f = Finding {
                        seed: opts.seed,
                        index,
                        action,
                        violation,
                        input,
                        output,
                    };
                    if let Some(dir) = &opts.save_to {
                        sum.saved.push(save(dir, &f)?);
                    }
                    sum.findings.push(f);
                }
            }
        }
        if opts.progress && (index + 1) % PROGRESS_EVERY == 0 {
            eprintln!(
                "  {} frames, {} violations, {:.0} frames/s",
                index + 1,
                sum.violations,
                (index + 1) as f64 / start.elapsed().as_secs_f64()
            );
        }
    }
    sum.elapsed = start.elapsed();
    Ok(sum)
}

/// Writes `f` as `seed-S-frame-I.hex` in `dir`.
pub fn save(dir: &Path, f: &Finding) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("seed-{}-frame-{}.hex", f.seed, f.index));
    std::fs::write(&path, f.fixture())?;
    Ok(path)
}

/// Bytes as hex, 16 to a line.
pub fn hex(b: &[u8]) -> String {
    b.chunks(16)
        .map(|c| {
            c.iter()
                .map(|x| format!("{x:02x}"))
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The frame of a fixture file: hex bytes, `#` lines are comments.
pub fn parse_fixture(text: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    for line in text.lines().filter(|l| !l.trim_start().starts_with('#')) {
        for tok in line.split_whitespace() {
            out.push(
                u8::from_str_radix(tok, 16)
                    .map_err(|e| anyhow::anyhow!("bad hex byte {tok:?}: {e}"))?,
            );
        }
    }
    Ok(out)
}

/// Runs every saved finding in `dir` again: (file, violation) for those still violating.
pub fn replay(lab: &mut Lab, dir: &Path) -> anyhow::Result<Vec<(PathBuf, oracle::Violation)>> {
    let mut bad = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(bad);
    };
    for e in entries {
        let path = e?.path();
        if path.extension().is_none_or(|x| x != "hex") {
            continue;
        }
        let input = parse_fixture(&std::fs::read_to_string(&path)?)?;
        let (action, output) = lab.run(&input);
        if let Err(v) = oracle::check(&input, action, &output) {
            bad.push((path, v));
        }
    }
    Ok(bad)
}

/// `maglb-fuzz [--frames N] [--seed S]`: runs, prints the report, exits 1 on any violation.
pub fn main() -> anyhow::Result<()> {
    crate::netns::require_root();
    let mut frames = 10_000_000u64;
    let mut seed = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = |name: &str| -> anyhow::Result<u64> {
            let v = args
                .next()
                .ok_or_else(|| anyhow::anyhow!("{name} needs a value"))?;
            v.parse()
                .map_err(|e| anyhow::anyhow!("{name} {v:?}: {e} (want a number)"))
        };
        match a.as_str() {
            "--frames" => frames = value("--frames")?,
            "--seed" => seed = Some(value("--seed")?),
            _ => anyhow::bail!("unknown argument {a:?}; usage: maglb-fuzz [--frames N] [--seed S]"),
        }
    }
    // Without a seed, a new one each run (printed, so the run can be repeated).
    let seed = seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
    });
    println!("maglb fuzz: {frames} frames, seed {seed} (repeat with --seed {seed})");
    let mut lab = Lab::new()?;
    let sum = run(
        &mut lab,
        &Options {
            frames,
            seed,
            save_to: Some(PathBuf::from(FINDINGS_DIR)),
            progress: true,
        },
    )?;
    print!("{}", sum.report());
    if sum.violations > 0 {
        eprintln!(
            "maglb fuzz: {} violations; fixtures under {FINDINGS_DIR}",
            sum.violations
        );
        std::process::exit(1);
    }
    Ok(())
}
