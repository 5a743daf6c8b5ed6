//! `cargo xtask install`: builds maglb (release) and installs it with its man pages, shell
//! completions, systemd unit, Grafana dashboard and Prometheus alert rules, under a prefix,
//! optionally inside a staging directory (`--destdir`, as packagers use).

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

use crate::cmd;

/// Where each file goes, relative to the prefix.
pub mod dest {
    pub const BIN: &str = "bin/maglb";
    pub const MAN1: &str = "share/man/man1";
    pub const BASH: &str = "share/bash-completion/completions/maglb";
    pub const ZSH: &str = "share/zsh/site-functions/_maglb";
    pub const FISH: &str = "share/fish/vendor_completions.d/maglb.fish";
    pub const UNIT: &str = "lib/systemd/system/maglb.service";
    pub const SHARE: &str = "share/maglb";
}

/// What the shipped unit calls the binary; rewritten to the prefix's.
const UNIT_BINARY: &str = "/usr/local/bin/maglb";

/// `destdir` + `prefix`: where the prefix's files are written.
pub fn staged(prefix: &Path, destdir: Option<&Path>) -> anyhow::Result<PathBuf> {
    if !prefix.is_absolute() {
        bail!("--prefix {} is not an absolute path", prefix.display());
    }
    Ok(match destdir {
        Some(d) => d.join(prefix.strip_prefix("/").expect("absolute")),
        None => prefix.to_owned(),
    })
}

/// The systemd unit for a binary installed under `prefix`.
pub fn unit_for(shipped: &str, prefix: &Path) -> String {
    shipped.replace(UNIT_BINARY, &prefix.join(dest::BIN).display().to_string())
}

fn write(path: &Path, data: &[u8], mode: u32, done: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    done.push(path.to_owned());
    Ok(())
}

/// Runs the built maglb and returns its standard output.
fn maglb(bin: &Path, args: &[&str]) -> anyhow::Result<Vec<u8>> {
    let out = Command::new(bin)
        .args(args)
        .output()
        .with_context(|| format!("running {}", bin.display()))?;
    if !out.status.success() {
        bail!(
            "maglb {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out.stdout)
}

pub fn run(root: &Path, prefix: &Path, destdir: Option<&Path>) -> anyhow::Result<()> {
    let base = staged(prefix, destdir)?;
    cmd(
        "cargo",
        &[
            "build",
            "--release",
            "--locked",
            "--package",
            "lb-userspace",
            "--bin",
            "maglb",
        ],
    )?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let built = target.join("release").join("maglb");
    let mut done = Vec::new();

    let bin = base.join(dest::BIN);
    write(&bin, &std::fs::read(&built)?, 0o755, &mut done)?;

    let man1 = base.join(dest::MAN1);
    std::fs::create_dir_all(&man1)?;
    maglb(&bin, &["man", "--out-dir", man1.to_str().context("path")?])?;
    let mut pages: Vec<PathBuf> = std::fs::read_dir(&man1)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("maglb"))
        })
        .collect();
    pages.sort();
    for p in &pages {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o644))?;
    }

    for (shell, rel) in [
        ("bash", dest::BASH),
        ("zsh", dest::ZSH),
        ("fish", dest::FISH),
    ] {
        let script = maglb(&bin, &["completions", shell])?;
        write(&base.join(rel), &script, 0o644, &mut done)?;
    }

    let packaging = root.join("packaging");
    let unit = std::fs::read_to_string(packaging.join("maglb.service"))?;
    write(
        &base.join(dest::UNIT),
        unit_for(&unit, prefix).as_bytes(),
        0o644,
        &mut done,
    )?;
    for rel in [
        "grafana/maglb-dashboard.json",
        "prometheus/maglb-alerts.yml",
    ] {
        let data = std::fs::read(packaging.join(rel))?;
        write(&base.join(dest::SHARE).join(rel), &data, 0o644, &mut done)?;
    }

    println!("installed under {}:", base.display());
    for p in &done {
        println!("  {}", p.display());
    }
    println!(
        "  {} ({} man pages: maglb.1 and one per subcommand)",
        man1.display(),
        pages.len()
    );
    if destdir.is_none() {
        println!(
            "systemd: `systemctl daemon-reload && systemctl enable --now maglb`; man: `man maglb`"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staged_paths_and_the_unit_follow_the_prefix() {
        let p = Path::new("/usr");
        assert_eq!(staged(p, None).unwrap(), Path::new("/usr"));
        assert_eq!(
            staged(p, Some(Path::new("/tmp/stage"))).unwrap(),
            Path::new("/tmp/stage/usr")
        );
        assert!(staged(Path::new("usr"), None).is_err());
        let shipped = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../packaging/maglb.service"
        ))
        .unwrap();
        assert!(
            shipped.contains(UNIT_BINARY),
            "the unit no longer names {UNIT_BINARY}"
        );
        let unit = unit_for(&shipped, p);
        assert!(unit.contains("ExecStart=/usr/bin/maglb agent"), "{unit}");
        assert!(!unit.contains(UNIT_BINARY));
    }
}
