//! maglb's tasks: `cargo xtask setup | build | test | lint | install | demo | bench | soak |
//! fuzz`.

mod install;
mod lint;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "maglb development tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what this machine lacks: nightly rust-src, bpf-linker built against nightly's
    /// LLVM, Debian packages. Idempotent.
    Setup,
    /// Build everything, the XDP programs included.
    Build,
    /// Run every test: unit tests, packet fixtures (BPF_PROG_TEST_RUN) and the end-to-end
    /// namespace tests. Needs root; fails (never skips) when it cannot run them.
    Test,
    /// Formatting and clippy with warnings as errors: the host crates, and lb-ebpf built
    /// with nightly for the BPF target. CI runs it.
    Lint,
    /// Build maglb (release) and install it: the binary, man pages, shell completions
    /// (bash, zsh, fish), the systemd unit, the Grafana dashboard and Prometheus alert rules.
    Install {
        /// Where the files belong on the target system.
        #[arg(long, default_value = "/usr/local")]
        prefix: PathBuf,
        /// Write them under this directory instead (staging for a package); the unit still
        /// names the binary under --prefix.
        #[arg(long)]
        destdir: Option<PathBuf>,
    },
    /// Show the datapath at work in namespaces: real traffic to a VIP, the spread over
    /// backends, the counters. Needs root.
    Demo,
    /// Benchmarks against their baselines, measured in the same run (per-packet cost, veth
    /// forwarding rate vs bare XDP_TX, connections vs HAProxy, control plane, legitimate
    /// traffic under a SYN flood vs without); prints medians and ratios and writes
    /// BENCHMARKS.md. Needs root.
    Bench {
        /// Run only these sections (packet, forward, conns, control, flood) and print them;
        /// a run of only some sections leaves BENCHMARKS.md alone.
        only: Vec<String>,
    },
    /// A VRRP pair under real traffic for N minutes with faults and churn (health flaps,
    /// backends removed and added, applies, VIP adds and deletes, agent restarts, handovers):
    /// fails if a request failed outside the fault windows, or RSS, fds or map entries grow,
    /// or the maps and the state disagree. Writes the Soak section of BENCHMARKS.md. Needs
    /// root.
    Soak {
        /// How long the churn goes on (set-up and checks come on top).
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
    },
    /// Fuzz the balancer XDP program through BPF_PROG_TEST_RUN: random and mutated frames,
    /// each result checked by an oracle. Prints counts per action, frames/s and violations
    /// (saved under tests/fuzz-findings/); fails on any violation. Needs root.
    Fuzz {
        /// Frames to run.
        #[arg(long, default_value_t = 10_000_000)]
        frames: u64,
        /// Seed of the frame generator; a run with the same seed sees the same frames.
        /// Default: a new one, printed.
        #[arg(long)]
        seed: Option<u64>,
    },
}

/// Runs a command, failing if it fails.
pub fn cmd(prog: &str, args: &[&str]) -> anyhow::Result<()> {
    let ok = Command::new(prog)
        .args(args)
        .status()
        .with_context(|| format!("running {prog}"))?
        .success();
    if !ok {
        bail!("`{prog} {}` failed", args.join(" "));
    }
    Ok(())
}

/// Runs `cargo test --locked ARGS -- HARNESS_ARGS`, showing its output, and returns the
/// passed and failed counts from its `test result:` lines. Fails if any test failed.
fn cargo_test(args: &[&str], harness: &[&str]) -> anyhow::Result<(u64, u64)> {
    use std::io::{BufRead as _, BufReader};
    let mut child = Command::new("cargo")
        .args(["test", "--locked"])
        .args(args)
        .arg("--")
        .args(harness)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0, 0);
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|p| {
                        p.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    if !child.wait()?.success() || failed > 0 {
        bail!(
            "cargo test {} failed ({passed} passed, {failed} failed)",
            args.join(" ")
        );
    }
    Ok((passed, failed))
}

/// Builds the real `maglb` binary, then runs `bin` of the tests package, which finds `maglb`
/// next to itself (the demo and the benches drive it as an operator would).
fn run_with_maglb(bin: &str, args: &[String]) -> anyhow::Result<()> {
    let build = [
        "build",
        "--release",
        "--locked",
        "--package",
        "lb-userspace",
        "--bin",
        "maglb",
    ];
    cmd("cargo", &build)?;
    let mut run = vec![
        "run",
        "--release",
        "--locked",
        "--package",
        "maglb-tests",
        "--bin",
        bin,
        "--",
    ];
    run.extend(args.iter().map(String::as_str));
    cmd("cargo", &run)
}

/// Runs a command and returns its standard output.
pub fn output(prog: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(prog).args(args).output()?;
    if !out.status.success() {
        bail!("`{prog} {}` failed", args.join(" "));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ensure_setup() -> anyhow::Result<()> {
    let missing = setup::missing();
    if !missing.is_empty() {
        println!("xtask: missing {}; running setup", missing.join(", "));
        setup::run()?;
    }
    Ok(())
}

/// Installs what building maglb needs, when something is missing (no Debian packages).
fn ensure_toolchain() -> anyhow::Result<()> {
    let missing = setup::missing_toolchain();
    if !missing.is_empty() {
        println!("xtask: missing {}; installing it", missing.join(", "));
        setup::run_toolchain()?;
    }
    Ok(())
}

/// The workspace's root directory.
fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn require_root(task: &str) -> anyhow::Result<()> {
    if !setup::is_root() {
        bail!(
            "`cargo xtask {task}` needs root (it loads XDP programs and creates network namespaces); run it with sudo"
        );
    }
    if !std::path::Path::new("/sys/fs/bpf").exists() {
        bail!("/sys/fs/bpf is missing: this kernel has no BPF filesystem");
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => {
            ensure_setup()?;
            cmd(
                "cargo",
                &[
                    "build",
                    "--release",
                    "--locked",
                    "--workspace",
                    "--exclude",
                    "lb-ebpf",
                ],
            )
        }
        Task::Test => {
            ensure_setup()?;
            require_root("test")?;
            // Unit tests, then the root tests one at a time (each builds its own namespaces).
            // Doc tests are left out: there are none, and their empty runs would end the log.
            let unit = cargo_test(
                &[
                    "--workspace",
                    "--exclude",
                    "lb-ebpf",
                    "--exclude",
                    "maglb-tests",
                    "--lib",
                    "--bins",
                    "--tests",
                ],
                &[],
            )?;
            let root = cargo_test(
                &["--package", "maglb-tests", "--tests"],
                &["--test-threads=1"],
            )?;
            println!(
                "xtask test: {} passed, {} failed",
                unit.0 + root.0,
                unit.1 + root.1
            );
            Ok(())
        }
        Task::Lint => {
            ensure_toolchain()?;
            lint::run(root())
        }
        Task::Install { prefix, destdir } => {
            ensure_toolchain()?;
            install::run(root(), &prefix, destdir.as_deref())
        }
        Task::Demo => {
            ensure_setup()?;
            require_root("demo")?;
            run_with_maglb("maglb-demo", &[])
        }
        Task::Bench { only } => {
            ensure_setup()?;
            require_root("bench")?;
            run_with_maglb("maglb-bench", &only)
        }
        Task::Soak { minutes } => {
            ensure_setup()?;
            require_root("soak")?;
            run_with_maglb("maglb-soak", &["--minutes".into(), minutes.to_string()])
        }
        Task::Fuzz { frames, seed } => {
            ensure_setup()?;
            require_root("fuzz")?;
            let frames = frames.to_string();
            let seed = seed.map(|s| s.to_string());
            let mut args = vec![
                "run",
                "--release",
                "--locked",
                "--package",
                "maglb-tests",
                "--bin",
                "maglb-fuzz",
                "--",
                "--frames",
                &frames,
            ];
            if let Some(s) = &seed {
                args.extend(["--seed", s]);
            }
            cmd("cargo", &args)
        }
    }
}
