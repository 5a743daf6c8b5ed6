//! Builds the XDP programs (`lb-ebpf`, next to this crate) for the BPF target; `src/programs.rs`
//! embeds them.
//!
//! This does what `aya_build::build_ebpf` does (nightly cargo, `-Z build-std=core`, BTF, a
//! target directory of its own under `OUT_DIR`) but quietly: aya-build forwards every line of
//! the nested cargo's progress ("Compiling ...", "Finished ...") as a `cargo:warning`, so every
//! build of maglb printed a page of false warnings. Here the nested cargo runs with `--quiet`,
//! and only the compiler's warnings and errors (and cargo's own) come through.
//!
//! `AYA_BUILD_SKIP=1` skips the eBPF build and embeds empty objects: enough for `cargo check`
//! or clippy of the host crates, not for running anything.

use std::{
    env,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, anyhow, bail};

/// The eBPF crate and its programs (binary targets).
const PACKAGE: &str = "lb-ebpf";
const PROGRAMS: &[&str] = &[
    "maglb-balancer",
    "maglb-decap",
    "maglb-tools",
    "maglb-probe-encap",
];
/// The toolchain that builds them (`-Z build-std` needs nightly).
const TOOLCHAIN: &str = "nightly";

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")) {
        println!(
            "cargo:warning=AYA_BUILD_SKIP is set: the eBPF programs are not built (empty objects embedded)"
        );
        for p in PROGRAMS {
            std::fs::write(out_dir.join(p), [])?;
        }
        return Ok(());
    }
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../lb-ebpf");
    // The build-dependency on lb-ebpf rebuilds us when its library (or lb-common) changes;
    // this covers its binaries too.
    println!("cargo:rerun-if-changed={root}");
    build(Path::new(root), &out_dir).context(
        "building the eBPF programs (run `cargo xtask setup` if bpf-linker or the nightly \
         rust-src component is missing)",
    )
}

/// `CARGO_CFG_TARGET_ENDIAN` and `CARGO_CFG_TARGET_ARCH` as aya-build reads them: the BPF
/// target and the architecture the programs are built for.
fn target() -> anyhow::Result<(String, String)> {
    let endian = env::var("CARGO_CFG_TARGET_ENDIAN").context("CARGO_CFG_TARGET_ENDIAN not set")?;
    let target = match endian.as_str() {
        "little" => "bpfel-unknown-none",
        "big" => "bpfeb-unknown-none",
        e => bail!("unsupported endianness {e}"),
    };
    let arch = env::var("CARGO_CFG_TARGET_ARCH").context("CARGO_CFG_TARGET_ARCH not set")?;
    let arch = if arch.starts_with("riscv64") {
        "riscv64".to_owned()
    } else {
        arch
    };
    Ok((target.to_owned(), arch))
}

fn build(root: &Path, out_dir: &Path) -> anyhow::Result<()> {
    let (target, arch) = target()?;
    let target_dir = out_dir.join("aya-build").join("target").join(PACKAGE);
    // `rustup run nightly cargo`: the toolchain file of the workspace (if any) and the one
    // building us (stable) do not decide which compiler builds the BPF objects.
    let mut cmd = Command::new("rustup");
    cmd.args([
        "run",
        TOOLCHAIN,
        "cargo",
        "build",
        "--quiet",
        "--package",
        PACKAGE,
    ])
    .args([
        "--bins",
        "--release",
        "--message-format=json",
        "--target",
        &target,
    ])
    .args(["-Z", "build-std=core"])
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(root)
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        format!("--cfg=bpf_target_arch=\"{arch}\"\x1f-Cdebuginfo=2\x1f-Clink-arg=--btf"),
    )
    // The outer cargo's compiler (or clippy's wrapper) is not the nightly one.
    .env_remove("RUSTC")
    .env_remove("RUSTC_WORKSPACE_WRAPPER")
    .env_remove("RUSTC_WRAPPER")
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("running {cmd:?} (is rustup installed?)"))?;

    // With --quiet, cargo's stderr carries only its own warnings and errors.
    let stderr = BufReader::new(child.stderr.take().expect("piped"));
    let stderr = std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            println!("cargo:warning={line}");
        }
    });

    let mut built = Vec::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.context("reading the eBPF build's output")?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            println!("cargo:warning={line}");
            continue;
        };
        match msg["reason"].as_str() {
            Some("compiler-artifact") => {
                if let (Some(name), Some(exe)) =
                    (msg["target"]["name"].as_str(), msg["executable"].as_str())
                {
                    built.push((name.to_owned(), PathBuf::from(exe)));
                }
            }
            // Warnings and errors of the compiler and the linker, as rustc renders them.
            Some("compiler-message") => {
                let rendered = msg["message"]["rendered"].as_str().unwrap_or_default();
                for l in rendered.lines() {
                    println!("cargo:warning={l}");
                }
            }
            _ => {}
        }
    }
    let status = child.wait().context("waiting for the eBPF build")?;
    let _ = stderr.join();
    if !status.success() {
        return Err(anyhow!("{cmd:?} failed: {status}"));
    }
    for p in PROGRAMS {
        let (_, exe) = built
            .iter()
            .find(|(n, _)| n == p)
            .ok_or_else(|| anyhow!("the eBPF build made no {p}"))?;
        std::fs::copy(exe, out_dir.join(p))
            .with_context(|| format!("copying {} to {}", exe.display(), out_dir.display()))?;
    }
    Ok(())
}
