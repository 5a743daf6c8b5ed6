//! `cargo xtask setup`: installs what a fresh machine lacks, idempotently, building from
//! source where a binary would otherwise be downloaded.

use std::process::Command;

use anyhow::{Context as _, bail};

use crate::{cmd, output};

/// Debian packages the tests, the demo and the benches use.
/// (`prometheus` brings promtool, which checks the metrics and the alert rules; keepalived
/// is the VRRP peer of the interoperability test; bird2 speaks BGP and BFD for the ECMP
/// tests; nginx serves the probe tests and the benches, HAProxy and wrk the benches;
/// chromium renders the status page in its test; openssl makes the probe tests'
/// certificates.)
pub const PACKAGES: &[&str] = &[
    "iproute2",
    "ethtool",
    "procps",
    "iputils-ping",
    "curl",
    "prometheus",
    "keepalived",
    "bird2",
    "nginx-light",
    "haproxy",
    "wrk",
    "chromium",
    "openssl",
];

/// What is missing, as human-readable items (empty when all is there).
pub fn missing() -> Vec<String> {
    let mut m = missing_toolchain();
    for p in missing_packages() {
        m.push(format!("Debian package {p}"));
    }
    m
}

/// What building maglb needs and this machine lacks (no Debian packages: those serve the
/// tests, the demo and the benches).
pub fn missing_toolchain() -> Vec<String> {
    let mut m = Vec::new();
    if !has_nightly() {
        m.push("the nightly toolchain".into());
    } else if !has_rust_src() {
        m.push("rust-src for nightly".into());
    }
    match (bpf_linker_llvm(), nightly_llvm_major()) {
        (None, _) => m.push("bpf-linker".into()),
        (Some(l), Some(n)) if l != n => m.push(format!(
            "bpf-linker for LLVM {n} (the installed one uses LLVM {l})"
        )),
        _ => {}
    }
    for c in missing_lint_components() {
        m.push(c.to_string());
    }
    m
}

/// What `cargo xtask lint` runs and this machine lacks: rustfmt and clippy of the toolchain
/// that builds the host crates (the one running us), clippy for the eBPF crate (nightly).
fn missing_lint_components() -> Vec<&'static str> {
    let mut m = Vec::new();
    for (sub, component) in [("fmt", "rustfmt"), ("clippy", "clippy")] {
        if output("cargo", &[sub, "--version"]).is_err() {
            m.push(component);
        }
    }
    if has_nightly() && !has_component("nightly", "clippy") {
        m.push("clippy for nightly");
    }
    m
}

fn has_component(toolchain: &str, component: &str) -> bool {
    output(
        "rustup",
        &["component", "list", "--toolchain", toolchain, "--installed"],
    )
    .is_ok_and(|o| o.lines().any(|l| l.starts_with(component)))
}

fn has_nightly() -> bool {
    output("rustup", &["toolchain", "list"])
        .is_ok_and(|o| o.lines().any(|l| l.starts_with("nightly")))
}

fn has_rust_src() -> bool {
    output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .is_ok_and(|o| o.lines().any(|l| l.starts_with("rust-src")))
}

/// The LLVM major version of nightly rustc.
fn nightly_llvm_major() -> Option<String> {
    let v = output("rustc", &["+nightly", "-vV"]).ok()?;
    let line = v.lines().find_map(|l| l.strip_prefix("LLVM version: "))?;
    Some(line.split('.').next()?.to_owned())
}

/// The LLVM major version bpf-linker is linked against, if it runs at all.
fn bpf_linker_llvm() -> Option<String> {
    output("bpf-linker", &["--version"]).ok()?;
    let path = output("sh", &["-c", "command -v bpf-linker"]).ok()?;
    let ldd = output("ldd", &[path.trim()]).ok()?;
    if ldd.contains("not found") {
        return None;
    }
    let lib = ldd
        .lines()
        .find_map(|l| l.trim().strip_prefix("libLLVM.so."))?;
    Some(lib.split(['.', '-', ' ']).next()?.to_owned())
}

fn missing_packages() -> Vec<&'static str> {
    PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            !output("dpkg-query", &["-W", "-f=${Status}", p])
                .is_ok_and(|s| s.contains("install ok installed"))
        })
        .collect()
}

pub fn run() -> anyhow::Result<()> {
    let want = run_toolchain()?;
    let pkgs = missing_packages();
    if !pkgs.is_empty() {
        if !is_root() {
            bail!("Debian packages {pkgs:?} are missing; run `sudo cargo xtask setup`");
        }
        cmd("apt-get", &["update", "-q"])?;
        let mut args = vec!["install", "-y", "-q", "--no-install-recommends"];
        args.extend(pkgs);
        let ok = Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?
            .success();
        if !ok {
            bail!("apt-get {} failed", args.join(" "));
        }
    }
    let left = missing();
    if !left.is_empty() {
        bail!("still missing after set-up: {}", left.join(", "));
    }
    println!("setup: all there (nightly + rust-src, bpf-linker for LLVM {want}, {PACKAGES:?})");
    Ok(())
}

/// Installs what building and linting maglb needs (`missing_toolchain`); returns the LLVM
/// major version bpf-linker uses.
pub fn run_toolchain() -> anyhow::Result<String> {
    if !has_nightly() {
        cmd(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    if !has_rust_src() {
        cmd(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    for c in missing_lint_components() {
        match c.split_once(" for ") {
            Some((component, toolchain)) => cmd(
                "rustup",
                &["component", "add", component, "--toolchain", toolchain],
            )?,
            None => cmd("rustup", &["component", "add", c])?,
        }
    }
    let want = nightly_llvm_major().context("reading nightly rustc's LLVM version")?;
    if bpf_linker_llvm().as_deref() != Some(want.as_str()) {
        install_bpf_linker(&want)?;
    }
    Ok(want)
}

/// bpf-linker must use the same LLVM as nightly rustc. No prebuilt binary: it is built
/// against the nightly toolchain's own libLLVM.
fn install_bpf_linker(major: &str) -> anyhow::Result<()> {
    let sysroot = output("rustc", &["+nightly", "--print", "sysroot"])?;
    let libdir = format!("{}/lib", sysroot.trim());
    let so = std::fs::read_dir(&libdir)?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {libdir}"))?;
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    let prefix = format!("{home}/.cargo/bpf-linker-llvm");
    std::fs::create_dir_all(format!("{prefix}/lib"))?;
    for link in ["libLLVM.so".to_owned(), so.clone()] {
        let dst = format!("{prefix}/lib/{link}");
        let _ = std::fs::remove_file(&dst);
        std::os::unix::fs::symlink(format!("{libdir}/{so}"), &dst)?;
    }
    println!("setup: building bpf-linker against nightly's LLVM {major} (about a minute)");
    let ok = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--force",
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .env("LLVM_PREFIX", &prefix)
        .status()?
        .success();
    if !ok {
        bail!("building bpf-linker failed");
    }
    Ok(())
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}
