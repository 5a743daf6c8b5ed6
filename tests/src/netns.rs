//! Network namespaces for tests: created with `ip`, removed on drop (also when a test
//! panics), and entered per thread with `setns`, so one test process can run sockets and
//! attach programs in several namespaces at once.

use std::{
    fs::File,
    os::fd::AsFd as _,
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use rustix::thread::{self as rthread, LinkNameSpaceType};

use anyhow::{Context as _, bail};

/// Runs a command; fails with its output if it fails.
pub fn sh(prog: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(prog)
        .args(args)
        .output()
        .with_context(|| format!("running {prog} (is it installed? `cargo xtask setup`)"))?;
    if !out.status.success() {
        bail!(
            "{prog} {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS...`
pub fn ip(args: &[&str]) -> anyhow::Result<String> {
    sh("ip", args)
}

/// A namespace that is deleted when dropped.
pub struct Netns {
    pub name: String,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A name prefix unique to this process and call, short enough for interface names.
pub fn unique_prefix(tag: &str) -> String {
    format!(
        "{tag}{}{}",
        std::process::id() % 10000,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        let ns = Self { name: name.into() };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `ip -n NAME ARGS...`
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut a = vec!["-n", &self.name];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// Runs a program inside the namespace (`ip netns exec`).
    pub fn exec(&self, prog: &str, args: &[&str]) -> anyhow::Result<String> {
        let mut a = vec!["netns", "exec", &self.name, prog];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// The MAC address of `iface` in this namespace.
    pub fn mac(&self, iface: &str) -> anyhow::Result<[u8; 6]> {
        let out = self.ip(&["-j", "link", "show", "dev", iface])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        let s = v[0]["address"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("no address for {iface}: {out}"))?;
        lb_userspace::addr::parse_mac(s).ok_or_else(|| anyhow::anyhow!("bad MAC {s}"))
    }

    /// The index of `iface` in this namespace.
    pub fn ifindex(&self, iface: &str) -> anyhow::Result<u32> {
        let out = self.ip(&["-j", "link", "show", "dev", iface])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        v[0]["ifindex"]
            .as_u64()
            .map(|i| i as u32)
            .ok_or_else(|| anyhow::anyhow!("no ifindex for {iface}: {out}"))
    }

    pub fn sysctl(&self, kv: &str) -> anyhow::Result<()> {
        self.exec("sysctl", &["-qw", kv]).map(drop)
    }

    /// A command that will run inside this namespace. Unlike `ip netns exec`, it keeps the
    /// caller's mounts, so `/sys/fs/bpf` pins stay visible: `nsenter` enters only the network
    /// namespace and then executes `prog` (same process, so the child's pid is `prog`'s).
    pub fn command(
        &self,
        prog: impl AsRef<std::ffi::OsStr>,
    ) -> anyhow::Result<std::process::Command> {
        let path = format!("/run/netns/{}", self.name);
        if !std::path::Path::new(&path).exists() {
            bail!("no namespace {path}");
        }
        let mut cmd = std::process::Command::new("nsenter");
        cmd.arg(format!("--net={path}")).arg("--").arg(prog);
        Ok(cmd)
    }

    /// Runs `f` on a new thread that has entered this namespace, and returns its result.
    pub fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<T> {
        let handle = self.spawn(f)?;
        handle
            .join()
            .map_err(|_| anyhow::anyhow!("thread in netns {} panicked", self.name))
    }

    /// Starts `f` on a new thread inside this namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> anyhow::Result<thread::JoinHandle<T>> {
        let path = format!("/run/netns/{}", self.name);
        let file = File::open(&path).with_context(|| format!("opening {path}"))?;
        Ok(thread::spawn(move || {
            // Only this thread changes namespace; the network namespace is per thread.
            rthread::move_into_link_name_space(file.as_fd(), Some(LinkNameSpaceType::Network))
                .expect("setns into the test's network namespace");
            f()
        }))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Whether this process runs as root.
pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Fails loudly unless this process can run the namespace tests.
pub fn require_root() {
    assert!(
        is_root(),
        "the maglb integration tests need root (network namespaces, XDP); run `sudo cargo xtask test`"
    );
}
