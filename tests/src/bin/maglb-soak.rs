//! `cargo xtask soak --minutes N`: see `maglb_tests::soak`. Puts its report into the `## Soak`
//! section of BENCHMARKS.md at the repository root (`cargo xtask bench` keeps that section).

use std::time::Duration;

use maglb_tests::{agent::sibling_maglb, netns::require_root, soak};

fn main() -> anyhow::Result<()> {
    require_root();
    let mut minutes = 10.0f64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--minutes" => {
                minutes = args
                    .next()
                    .and_then(|m| m.parse().ok())
                    .filter(|m: &f64| *m > 0.0)
                    .ok_or_else(|| anyhow::anyhow!("--minutes takes a positive number"))?;
            }
            other => anyhow::bail!("unknown argument {other:?} (maglb-soak --minutes N)"),
        }
    }
    let summary = soak::run(
        &sibling_maglb(),
        &soak::Options {
            duration: Duration::from_secs_f64(minutes * 60.0),
            every_kind_each_cycle: false,
        },
    )?;
    print!("{}", summary.report);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md");
    let doc = std::fs::read_to_string(path).unwrap_or_default();
    std::fs::write(path, soak::put_section(&doc, &summary.report))?;
    println!("written to the Soak section of BENCHMARKS.md");
    soak::check(&summary)
}
