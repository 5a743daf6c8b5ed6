//! A `maglb agent` process for tests: started inside a namespace, with its socket, state
//! directory and BPF pins in places of its own; killed and its pins removed on drop.

use std::{
    path::{Path, PathBuf},
    process::{Child, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::{
    netns::{Netns, require_root, unique_prefix},
    topology::{Topology, wait_for},
};

/// Where an agent keeps things; the same paths let a new agent take over from a killed one.
#[derive(Clone)]
pub struct AgentPaths {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub bpffs: PathBuf,
    pub decap_pins: PathBuf,
}

impl AgentPaths {
    pub fn new(tag: &str) -> Self {
        let p = unique_prefix(tag);
        let dir = std::env::temp_dir().join(format!("maglb-{p}"));
        let _ = std::fs::remove_dir_all(&dir);
        Self {
            socket: dir.join("maglb.sock"),
            state_dir: dir.join("state"),
            bpffs: PathBuf::from(format!("/sys/fs/bpf/maglb-test-{p}")),
            decap_pins: PathBuf::from(format!("/sys/fs/bpf/maglb-test-{p}-decap")),
            dir,
        }
    }
}

/// Owns an `AgentPaths`: removes the pinned objects and files when dropped, also when a test
/// fails. Declare it before the agents and topology that use it, so it goes last.
pub struct Scratch(pub AgentPaths);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        Self(AgentPaths::new(tag))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for d in [&self.0.bpffs, &self.0.decap_pins] {
            let _ = std::fs::remove_dir_all(d);
        }
        let _ = std::fs::remove_dir_all(&self.0.dir);
    }
}

pub struct Agent {
    child: Option<Child>,
    pub paths: AgentPaths,
    bin: PathBuf,
}

impl Agent {
    /// Starts `bin agent` in `ns` and waits until it answers.
    pub fn start(bin: &Path, ns: &Netns, paths: &AgentPaths) -> anyhow::Result<Self> {
        Self::spawn(ns.command(bin)?, bin, paths)
    }

    /// Starts `bin agent` in `ns` inside a private mount namespace in which no BPF filesystem
    /// is mounted (as on a fresh machine): the agent has to mount one itself. The mount, and
    /// so the pins, end with the agent.
    pub fn start_without_bpffs(bin: &Path, ns: &Netns, paths: &AgentPaths) -> anyhow::Result<Self> {
        let script = "while grep -q ' /sys/fs/bpf ' /proc/mounts; do umount /sys/fs/bpf || exit 97; done; \
                      if grep -q ' bpf ' /proc/mounts; then exit 98; fi; exec \"$0\" \"$@\"";
        let mut cmd = ns.command("unshare")?;
        cmd.args(["--mount", "--propagation", "private", "sh", "-c", script])
            .arg(bin);
        Self::spawn(cmd, bin, paths)
    }

    /// Starts `bin agent` through `cmd` (a wrapper that ends by executing `bin` with the
    /// arguments appended, e.g. `sh -c 'umask 077; exec "$0" "$@"' BIN`), and waits until it
    /// answers.
    pub fn start_with(
        cmd: std::process::Command,
        bin: &Path,
        paths: &AgentPaths,
    ) -> anyhow::Result<Self> {
        Self::spawn(cmd, bin, paths)
    }

    /// The read-only socket next to the admin socket.
    pub fn read_socket(&self) -> PathBuf {
        lb_userspace::api::read_socket_for(&self.paths.socket)
    }

    fn spawn(
        mut cmd: std::process::Command,
        bin: &Path,
        paths: &AgentPaths,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(&paths.dir)?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(paths.dir.join("agent.log"))?;
        let child = cmd
            .args(["agent", "--socket"])
            .arg(&paths.socket)
            .arg("--state-dir")
            .arg(&paths.state_dir)
            .arg("--bpffs")
            .arg(&paths.bpffs)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting maglb agent")?;
        let mut a = Agent {
            child: Some(child),
            paths: paths.clone(),
            bin: bin.to_owned(),
        };
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(20) {
            if a.cli(&["status"]).status.success() {
                return Ok(a);
            }
            if let Some(Ok(Some(st))) = a.child.as_mut().map(|c| c.try_wait()) {
                bail!("agent exited with {st}: {}", a.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("agent did not answer within 20 s: {}", a.log())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.paths.dir.join("agent.log")).unwrap_or_default()
    }

    /// Runs `maglb ARGS` against this agent.
    pub fn cli(&self, args: &[&str]) -> Output {
        cli(&self.bin, &self.paths.socket, args)
    }

    /// Runs `maglb ARGS`; panics with its output unless it succeeds. Returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.cli(args);
        assert!(
            o.status.success(),
            "maglb {args:?} failed: {}{}",
            String::from_utf8_lossy(&o.stderr),
            String::from_utf8_lossy(&o.stdout)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// The agent's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the agent with SIGKILL (no clean-up of any kind).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops the agent with SIGTERM and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = rustix::process::Pid::from_raw(c.id() as i32) {
                let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `bin --socket SOCKET ARGS`.
pub fn cli(bin: &Path, socket: &Path, args: &[&str]) -> Output {
    std::process::Command::new(bin)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("running maglb")
}

/// The namespace topology operated the way an operator would: `maglb decap attach` on every
/// backend, `maglb agent` in the balancer's namespace, attached to l0. The test adds VIPs.
pub fn operated_topology(
    bin: &Path,
    tag: &str,
    scratch: &Scratch,
    backends: usize,
) -> (Topology, Agent) {
    require_root();
    let t = Topology::build_with(tag, backends, false).expect("topology");
    attach_decaps(bin, &t, scratch);
    let a = Agent::start(bin, &t.lb, &scratch.0).expect("agent");
    a.ok(&["attach", "--iface", "l0"]);
    (t, a)
}

/// `maglb decap attach --iface e0` on every backend of `t`.
pub fn attach_decaps(bin: &Path, t: &Topology, scratch: &Scratch) {
    for (i, b) in t.backends.iter().enumerate() {
        let pins = scratch.0.decap_pins.join(format!("b{i}"));
        let out = b
            .command(bin)
            .unwrap()
            .args(["decap", "attach", "--iface", "e0", "--pin-dir"])
            .arg(&pins)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "decap attach: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Agent {
    /// Waits until the datapath forwards (the next hop is resolved).
    pub fn wait_ready(&self) {
        assert!(
            wait_for(Duration::from_secs(10), || self
                .ok(&["status"])
                .contains("forwarding   yes")),
            "datapath not ready: {}\n{}",
            self.ok(&["status"]),
            self.log()
        );
    }
}

/// The `maglb` binary next to the running one (`cargo xtask demo` and `bench` build both).
pub fn sibling_maglb() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("own path");
    let dir = exe.parent().expect("target dir");
    for name in ["maglb", "maglb-cli"] {
        if dir.join(name).exists() {
            return dir.join(name);
        }
    }
    panic!(
        "no maglb binary next to {}; run it through cargo xtask",
        exe.display()
    );
}
