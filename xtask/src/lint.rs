//! `cargo xtask lint`: formatting and clippy, warnings as errors, on every crate built the
//! way it must be built: the host crates with the toolchain that runs us (lb-userspace's
//! build script builds the XDP programs as usual), and `lb-ebpf` with nightly for the BPF
//! target, with `-Z build-std=core` and the cfg its build gets (see lb-userspace/build.rs).

use std::{path::Path, process::Command};

use anyhow::{Context as _, bail};

use crate::cmd;

pub fn run(root: &Path) -> anyhow::Result<()> {
    println!("lint: cargo fmt --check");
    cmd("cargo", &["fmt", "--all", "--", "--check"])
        .context("formatting differs: run `cargo fmt --all`")?;

    println!("lint: clippy, host crates");
    cmd(
        "cargo",
        &[
            "clippy",
            "--locked",
            "--workspace",
            "--exclude",
            "lb-ebpf",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
    )?;

    println!("lint: clippy, lb-ebpf (nightly, bpfel-unknown-none)");
    let arch = std::env::consts::ARCH;
    let target_dir = root.join("target").join("lint-ebpf");
    let ok = Command::new("cargo")
        .args(["+nightly", "clippy", "--locked", "--package", "lb-ebpf"])
        .args([
            "--lib",
            "--bins",
            "--release",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--target-dir"])
        .arg(&target_dir)
        .args(["--", "-D", "warnings"])
        .current_dir(root.join("lb-ebpf"))
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            format!("--cfg=bpf_target_arch=\"{arch}\""),
        )
        .env_remove("RUSTUP_TOOLCHAIN")
        .status()
        .context("running cargo +nightly clippy")?
        .success();
    if !ok {
        bail!("clippy found problems in lb-ebpf");
    }
    println!("lint: clean");
    Ok(())
}
