//! The `maglb` command: `maglb agent` runs the daemon; the other subcommands are clients of
//! its socket, except `maglb decap`, which works on a backend host without an agent.

use std::{
    io::Write as _,
    net::IpAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use clap::{Args, CommandFactory as _, Parser, Subcommand, ValueEnum};

use crate::{
    agent, api,
    client::{self, ClientError},
    decap, error_chain,
    service::VipId,
    state::{Affinity, AttachMode, HealthCheck, ProbeKind, State},
};

#[derive(Parser)]
#[command(
    name = "maglb",
    version,
    about = "maglb: an XDP layer-4 load balancer with Maglev hashing and direct server return",
    after_help = "Start the agent with `maglb agent` (root), then attach and add VIPs:\n  \
        maglb attach --iface eth0\n  \
        maglb vip add 10.200.0.1:80/tcp\n  \
        maglb backend add 10.200.0.1:80/tcp 10.10.3.11 --weight 2\n  \
        maglb stats"
)]
pub struct Cli {
    /// The agent's API socket.
    #[arg(long, global = true, env = "MAGLB_SOCKET", default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum ModeArg {
    /// In the driver (fast; needs driver support).
    Native,
    /// In the kernel stack (any interface; slow).
    Generic,
}

impl From<ModeArg> for AttachMode {
    fn from(m: ModeArg) -> Self {
        match m {
            ModeArg::Native => AttachMode::Native,
            ModeArg::Generic => AttachMode::Generic,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum AffinityArg {
    /// A client's connections all go to one backend.
    SrcIp,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent: owns the BPF maps and the state, serves the API (root).
    #[command(
        after_help = "Example:\n  maglb agent --state-dir /var/lib/maglb --bpffs /sys/fs/bpf/maglb"
    )]
    Agent {
        /// Where the state file lives.
        #[arg(long, default_value = api::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Where maps and the XDP link are pinned (on a BPF filesystem).
        #[arg(long, default_value = api::DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Log format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// Serve Prometheus metrics at ADDR:PORT (`off`: not at all).
        #[arg(long, default_value = api::DEFAULT_METRICS)]
        metrics_listen: String,
    },
    /// Attach the balancer to an interface.
    #[command(
        after_help = "Examples:\n  maglb attach --iface eth0\n  maglb attach --iface veth0 --mode generic"
    )]
    Attach {
        #[arg(long)]
        iface: String,
        #[arg(long, value_enum, default_value = "native")]
        mode: ModeArg,
    },
    /// Detach the balancer (VIPs and backends are kept).
    Detach,
    /// Manage VIPs.
    Vip {
        #[command(subcommand)]
        cmd: VipCmd,
    },
    /// Manage the backends of a VIP.
    Backend {
        #[command(subcommand)]
        cmd: BackendCmd,
    },
    /// Every health probe: state, last result, latency, time since the last change.
    Health {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Counters per VIP and backend, and by reason; `--watch` shows live rates.
    #[command(
        after_help = "Examples:\n  maglb stats\n  maglb stats --watch\n  maglb stats --output json"
    )]
    Stats {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
        /// A live view of rates (packets/s, bit/s, new flows/s) and health, like top.
        #[arg(long)]
        watch: bool,
        /// Time between refreshes of `--watch`.
        #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(100..=60000))]
        interval_ms: u64,
        /// Stop `--watch` after this many refreshes.
        #[arg(long)]
        count: Option<u64>,
    },
    /// The agent and datapath: attachment, next hop, counts.
    Status {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Make the running state match a file, with the smallest change.
    #[command(after_help = "Example:\n  maglb apply -f /etc/maglb/maglb.toml")]
    Apply {
        #[arg(short, long)]
        file: PathBuf,
    },
    /// Check a file without applying it (and show what `apply` would change).
    Validate {
        #[arg(short, long)]
        file: PathBuf,
    },
    /// The running state as a config file.
    Config {
        #[command(subcommand)]
        cmd: ConfigCmd,
    },
    /// Active/passive failover (VRRPv3): state, planned handover.
    Vrrp {
        #[command(subcommand)]
        cmd: VrrpCmd,
    },
    /// The backend-side decap program (no agent needed).
    Decap {
        #[command(subcommand)]
        cmd: DecapCmd,
    },
    /// Shell completions.
    #[command(after_help = "Example:\n  maglb completions bash > /etc/bash_completion.d/maglb")]
    Completions { shell: clap_complete::Shell },
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum VipCmd {
    /// Add a VIP: ADDR:PORT/tcp|udp, IPv6 as [ADDR]:PORT/tcp; port 0 takes every port.
    #[command(
        after_help = "Examples:\n  maglb vip add 10.200.0.1:80/tcp\n  maglb vip add [fd20::1]:0/udp --affinity src-ip"
    )]
    Add {
        vip: VipId,
        #[arg(long, value_enum)]
        affinity: Option<AffinityArg>,
        /// Maglev table size (a prime).
        #[arg(long)]
        ring_size: Option<u32>,
    },
    /// Delete a VIP and its backends.
    Del { vip: VipId },
    /// Move new flows to a pool of backends in one step (blue-green), or part of them
    /// (canary); established flows stay where they are. Rolling back is the same command.
    #[command(
        after_help = "Examples:\n  maglb vip switch 10.200.0.1:80/tcp --to green --percent 5\n  \
        maglb vip switch 10.200.0.1:80/tcp --to green --percent 25\n  \
        maglb vip switch 10.200.0.1:80/tcp --to green\n  \
        maglb vip switch 10.200.0.1:80/tcp --to blue      # roll back"
    )]
    Switch {
        vip: VipId,
        #[arg(long)]
        to: String,
        /// Share of new flows for the pool (1-100); the pools serving now share the rest.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=100))]
        percent: Option<u32>,
    },
    /// Set the VIP's default health check for its backends (`--kind none` removes it).
    #[command(
        after_help = "Examples:\n  maglb vip health 10.200.0.1:80/tcp --kind tcp --interval-ms 1000 --fall 3\n  \
        maglb vip health 10.200.0.1:80/tcp --kind http --port 8080 --path /healthz --expect 200-299"
    )]
    Health {
        vip: VipId,
        #[command(flatten)]
        check: HealthArgs,
    },
    /// List VIPs.
    List {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum BackendCmd {
    /// Add a backend to a VIP.
    #[command(after_help = "Example:\n  maglb backend add 10.200.0.1:80/tcp 10.10.3.11 --weight 2")]
    Add {
        vip: VipId,
        address: IpAddr,
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=65535))]
        weight: u32,
        /// Serve only while no primary backend of the VIP is up.
        #[arg(long)]
        backup: bool,
        /// Its pool, for blue-green and canary (`maglb vip switch`).
        #[arg(long)]
        pool: Option<String>,
    },
    /// Remove a backend now: its established flows end (use `drain` first to let them finish).
    Del { vip: VipId, address: IpAddr },
    /// List backends (of one VIP, or of all).
    List {
        vip: Option<VipId>,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Change a backend's weight (and make it active again if drained).
    #[command(after_help = "Example:\n  maglb backend set-weight 10.200.0.1:80/tcp 10.10.3.11 5")]
    SetWeight {
        vip: VipId,
        address: IpAddr,
        #[arg(value_parser = clap::value_parser!(u32).range(0..=65535))]
        weight: u32,
    },
    /// No new flows to this backend; established flows stay until they end.
    Drain { vip: VipId, address: IpAddr },
    /// Take a backend out of service: no new flows, and its established flows move.
    Disable { vip: VipId, address: IpAddr },
    /// Put a drained or disabled backend back in service.
    Enable { vip: VipId, address: IpAddr },
    /// Give a backend its own health check (`--inherit` goes back to the VIP's).
    #[command(
        after_help = "Example:\n  maglb backend health 10.200.0.1:80/tcp 10.10.3.11 --kind http --path /ready"
    )]
    Health {
        vip: VipId,
        address: IpAddr,
        /// Use the VIP's health check again.
        #[arg(long, conflicts_with = "kind")]
        inherit: bool,
        #[command(flatten)]
        check: HealthArgs,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum KindArg {
    None,
    Tcp,
    Http,
    Udp,
}

/// A health check on the command line; unset settings take their defaults.
#[derive(Args)]
struct HealthArgs {
    /// What to check.
    #[arg(long, value_enum)]
    kind: Option<KindArg>,
    /// Time between checks [default: 2000].
    #[arg(long)]
    interval_ms: Option<u32>,
    /// A check that takes longer fails [default: 1000].
    #[arg(long)]
    timeout_ms: Option<u32>,
    /// Successes that bring a backend up [default: 2].
    #[arg(long)]
    rise: Option<u32>,
    /// Failures that take a backend down [default: 3].
    #[arg(long)]
    fall: Option<u32>,
    /// Port to check [default: the VIP's port].
    #[arg(long)]
    port: Option<u16>,
    /// Source address of the checks.
    #[arg(long)]
    source: Option<IpAddr>,
    /// HTTP: path to GET [default: /].
    #[arg(long)]
    path: Option<String>,
    /// HTTP: statuses that pass, e.g. 200, 200-399, 200,204 [default: 200-399].
    #[arg(long)]
    expect: Option<String>,
    /// HTTP: a substring the body must contain.
    #[arg(long)]
    body: Option<String>,
    /// HTTP: the Host header.
    #[arg(long)]
    host: Option<String>,
    /// UDP: what to send.
    #[arg(long)]
    payload: Option<String>,
}

impl HealthArgs {
    fn check(&self) -> HealthCheck {
        let d = HealthCheck::default();
        HealthCheck {
            kind: match self.kind.unwrap_or(KindArg::None) {
                KindArg::None => ProbeKind::None,
                KindArg::Tcp => ProbeKind::Tcp,
                KindArg::Http => ProbeKind::Http,
                KindArg::Udp => ProbeKind::Udp,
            },
            interval_ms: self.interval_ms.unwrap_or(d.interval_ms),
            timeout_ms: self.timeout_ms.unwrap_or(d.timeout_ms),
            rise: self.rise.unwrap_or(d.rise),
            fall: self.fall.unwrap_or(d.fall),
            port: self.port,
            source: self.source,
            path: self.path.clone().unwrap_or(d.path),
            expect_status: self.expect.clone().unwrap_or(d.expect_status),
            body_contains: self.body.clone(),
            host: self.host.clone(),
            payload: self.payload.clone(),
        }
    }
}

/// STATE, LAST, LATENCY, SINCE cells of a health view ("-" without a check).
fn health_cells(h: Option<&api::HealthView>) -> (String, String, String, String) {
    match h {
        None => ("-".into(), "-".into(), "-".into(), "-".into()),
        Some(h) => (
            if h.up { "up" } else { "down" }.into(),
            h.last.clone().unwrap_or_else(|| "-".into()),
            h.latency_ms.map_or("-".into(), |l| format!("{l:.1}ms")),
            format!("{:.0}s", h.since_s),
        ),
    }
}

#[derive(Subcommand)]
enum VrrpCmd {
    /// State, master, priority, the last transition and why, refused advertisements.
    Status {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Planned handover: a master advertises priority 0 and steps down; this balancer stays
    /// backup until `maglb vrrp claim`.
    Release,
    /// Take part with the configured priority again after `release`.
    Claim,
}

#[derive(Subcommand)]
enum ConfigCmd {
    /// Print the running state as a maglb.toml.
    Export,
}

#[derive(Subcommand)]
enum DecapCmd {
    /// Load and attach the decap program; it stays attached after this command exits.
    #[command(after_help = "Example:\n  maglb decap attach --iface eth0")]
    Attach {
        #[arg(long)]
        iface: String,
        #[arg(long, value_enum, default_value = "native")]
        mode: ModeArg,
        #[arg(long, default_value = decap::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Detach it.
    Detach {
        #[arg(long)]
        iface: String,
        #[arg(long, default_value = decap::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
    /// Where it is attached, and what it decapsulated.
    Status {
        #[arg(long, default_value = decap::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
}

/// Entry point of the `maglb` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("maglb: {}", error_chain(e.as_ref()));
            ExitCode::FAILURE
        }
    }
}

fn print_json(body: &str) {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
}

fn print_changes(c: &api::Changes) {
    if c.changes.is_empty() {
        println!("no change");
    }
    for l in &c.changes {
        println!("{l}");
    }
}

fn run(cli: Cli) -> Result<(), Box<dyn std::error::Error>> {
    let sock = cli.socket.as_path();
    match cli.cmd {
        Cmd::Agent {
            state_dir,
            bpffs,
            log_format,
            metrics_listen,
        } => {
            let metrics = match metrics_listen.as_str() {
                "off" => None,
                a => Some(a.parse().map_err(|_| {
                    format!(
                        "--metrics-listen {a:?}: expected ADDR:PORT (e.g. 127.0.0.1:9477) or off"
                    )
                })?),
            };
            init_logs(log_format);
            agent::run(agent::Options {
                socket: cli.socket,
                state_dir,
                bpffs,
                metrics,
            })?;
        }
        Cmd::Attach { iface, mode } => {
            let req = api::AttachRequest {
                iface,
                mode: mode.into(),
            };
            print_changes(&client::send(sock, "POST", "/v1/attach", &req)?);
        }
        Cmd::Detach => print_changes(&client::send(sock, "POST", "/v1/detach", &())?),
        Cmd::Vip { cmd } => match cmd {
            VipCmd::Add {
                vip,
                affinity,
                ring_size,
            } => {
                let req = api::VipRequest {
                    address: vip,
                    affinity: affinity.map(|_| Affinity::SrcIp),
                    ring_size,
                };
                print_changes(&client::send(sock, "POST", "/v1/vips", &req)?);
            }
            VipCmd::Switch { vip, to, percent } => {
                let req = api::SwitchRequest {
                    address: vip,
                    to,
                    percent,
                };
                print_changes(&client::send(sock, "POST", "/v1/vips/switch", &req)?)
            }
            VipCmd::Health { vip, check } => {
                if check.kind.is_none() {
                    return Err("--kind is required (none removes the check)".into());
                }
                let check = check.check();
                let req = api::HealthRequest {
                    vip,
                    backend: None,
                    health: (check.kind != ProbeKind::None).then_some(check),
                };
                print_changes(&client::send(sock, "POST", "/v1/health", &req)?)
            }
            VipCmd::Del { vip } => print_changes(&client::send(
                sock,
                "DELETE",
                "/v1/vips",
                &api::VipRef { address: vip },
            )?),
            VipCmd::List { output } => {
                let body = client::call(sock, "GET", "/v1/vips", None)?;
                if output == Output::Json {
                    print_json(&body);
                } else {
                    let vips: Vec<api::VipView> = serde_json::from_str(&body)?;
                    println!(
                        "{:<28} {:<9} {:>9} {:>9} {:>12} {:>14}",
                        "VIP", "AFFINITY", "RING", "BACKENDS", "PACKETS", "BYTES"
                    );
                    for v in vips {
                        println!(
                            "{:<28} {:<9} {:>9} {:>9} {:>12} {:>14}",
                            v.address.to_string(),
                            if v.affinity.is_some() { "src-ip" } else { "-" },
                            v.ring_size,
                            v.backends.len(),
                            v.counters.packets,
                            v.counters.bytes
                        );
                    }
                }
            }
        },
        Cmd::Backend { cmd } => backend(sock, cmd)?,
        Cmd::Health { output } => {
            let body = client::call(sock, "GET", "/v1/health", None)?;
            if output == Output::Json {
                print_json(&body);
            } else {
                let probes: Vec<api::ProbeView> = serde_json::from_str(&body)?;
                println!(
                    "{:<24} {:<26} {:<5} {:<26} {:<5} {:<24} {:>9} {:>7}",
                    "VIP", "BACKEND", "KIND", "TARGET", "STATE", "LAST", "LATENCY", "SINCE"
                );
                for p in probes {
                    let h = health_cells(p.health.as_ref());
                    println!(
                        "{:<24} {:<26} {:<5} {:<26} {:<5} {:<24} {:>9} {:>7}",
                        p.vip.to_string(),
                        p.backend.to_string(),
                        p.kind.to_string(),
                        p.target,
                        h.0,
                        h.1,
                        h.2,
                        h.3
                    );
                }
            }
        }
        Cmd::Stats {
            watch: true,
            interval_ms,
            count,
            ..
        } => watch(sock, Duration::from_millis(interval_ms), count)?,
        Cmd::Stats { output, .. } => {
            let body = client::call(sock, "GET", "/v1/stats", None)?;
            if output == Output::Json {
                print_json(&body);
            } else {
                let s: api::Stats = serde_json::from_str(&body)?;
                println!(
                    "{:<28} {:<40} {:>12} {:>14}",
                    "VIP", "BACKEND", "PACKETS", "BYTES"
                );
                for v in &s.vips {
                    println!(
                        "{:<28} {:<40} {:>12} {:>14}",
                        v.address.to_string(),
                        "",
                        v.counters.packets,
                        v.counters.bytes
                    );
                    for b in &v.backends {
                        let name = format!("{} ({}, w{})", b.address, b.state, b.weight);
                        println!(
                            "{:<28} {:<40} {:>12} {:>14}",
                            "", name, b.counters.packets, b.counters.bytes
                        );
                    }
                }
                println!("\n{:<28} {:>12} {:>14}", "COUNTER", "PACKETS", "BYTES");
                for (name, c) in &s.global {
                    println!("{name:<28} {:>12} {:>14}", c.packets, c.bytes);
                }
            }
        }
        Cmd::Status { output } => {
            let body = client::call(sock, "GET", "/v1/status", None)?;
            if output == Output::Json {
                print_json(&body);
            } else {
                let s: api::Status = serde_json::from_str(&body)?;
                let or = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".into());
                println!("agent        maglb {} (pid {})", s.version, s.pid);
                println!(
                    "interface    {} ({}, {})",
                    or(&s.interface),
                    s.mode,
                    if s.attached {
                        "attached"
                    } else {
                        "not attached"
                    }
                );
                println!(
                    "forwarding   {}",
                    if s.ready {
                        "yes"
                    } else {
                        "no (passing everything to the kernel)"
                    }
                );
                println!("next hop     {} {}", or(&s.nexthop), or(&s.nexthop_mac));
                println!("outer source {} {}", or(&s.source_v4), or(&s.source_v6));
                println!("mtu          {}", s.mtu);
                println!("vips         {}", s.vips);
                println!("backends     {}", s.backends);
                println!("state file   {}", s.state_file);
                println!("bpffs        {}", s.bpffs);
            }
        }
        Cmd::Apply { file } => {
            let text = read_file(&file)?;
            // Checked here first: a bad file never reaches the agent.
            State::from_toml(&text).map_err(|e| format!("{}: {e}", file.display()))?;
            let c: api::Changes =
                client::send(sock, "POST", "/v1/apply", &api::ConfigText { config: text })?;
            print_changes(&c);
        }
        Cmd::Validate { file } => {
            let text = read_file(&file)?;
            let s = State::from_toml(&text).map_err(|e| format!("{}: {e}", file.display()))?;
            let backends: usize = s.vips.iter().map(|v| v.backends.len()).sum();
            println!(
                "{} is valid: {} VIPs, {backends} backends",
                file.display(),
                s.vips.len()
            );
            match client::send::<_, api::Changes>(
                sock,
                "POST",
                "/v1/validate",
                &api::ConfigText { config: text },
            ) {
                Ok(c) if c.changes.is_empty() => println!("apply would change nothing"),
                Ok(c) => {
                    println!("apply would:");
                    for l in c.changes {
                        println!("  {l}");
                    }
                }
                Err(ClientError::NoAgent { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Cmd::Vrrp { cmd } => match cmd {
            VrrpCmd::Status { output } => {
                let body = client::call(sock, "GET", "/v1/vrrp", None)?;
                if output == Output::Json {
                    print_json(&body);
                } else {
                    let v: agent::vrrp::VrrpStatus = serde_json::from_str(&body)?;
                    println!(
                        "state        {} (vrid {} on {})",
                        v.state, v.vrid, v.interface
                    );
                    println!("master       {}", v.master.unwrap_or_else(|| "-".into()));
                    let rel = if v.released { ", released" } else { "" };
                    println!(
                        "priority     {} (configured {}){rel}",
                        v.effective_priority, v.priority
                    );
                    println!("last change  {:.0} s ago: {}", v.since_s, v.reason);
                    println!("transitions  {}", v.transitions);
                    println!(
                        "adverts      {} sent, {} received",
                        v.adverts_sent, v.adverts_received
                    );
                    let invalid: Vec<String> =
                        v.invalid.iter().map(|(k, n)| format!("{k} {n}")).collect();
                    let invalid = if invalid.is_empty() {
                        "none".into()
                    } else {
                        invalid.join(", ")
                    };
                    println!("refused      {invalid}");
                }
            }
            VrrpCmd::Release => {
                print_changes(&client::send(sock, "POST", "/v1/vrrp/release", &())?)
            }
            VrrpCmd::Claim => print_changes(&client::send(sock, "POST", "/v1/vrrp/claim", &())?),
        },
        Cmd::Config {
            cmd: ConfigCmd::Export,
        } => {
            let c: api::ConfigText = client::get(sock, "/v1/config")?;
            print!("{}", c.config);
        }
        Cmd::Decap { cmd } => match cmd {
            DecapCmd::Attach {
                iface,
                mode,
                pin_dir,
            } => {
                let addrs =
                    decap::attach_pinned(&pin_dir, &iface, AttachMode::from(mode).to_mode())?;
                println!(
                    "decap attached to {iface}; decapsulating packets to {} local addresses",
                    addrs.len()
                );
            }
            DecapCmd::Detach { iface, pin_dir } => {
                decap::detach_pinned(&pin_dir, &iface)?;
                println!("decap detached from {iface}");
            }
            DecapCmd::Status { pin_dir, output } => {
                let st = decap::status_pinned(&pin_dir)?;
                if output == Output::Json {
                    println!("{}", serde_json::to_string_pretty(&st)?);
                } else if st.is_empty() {
                    println!(
                        "decap is not attached anywhere (pins under {})",
                        pin_dir.display()
                    );
                } else {
                    println!("{:<16} {:>12} {:>14}", "INTERFACE", "DECAPSULATED", "BYTES");
                    for s in st {
                        println!("{:<16} {:>12} {:>14}", s.iface, s.packets, s.bytes);
                    }
                }
            }
        },
        Cmd::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "maglb", &mut std::io::stdout());
            std::io::stdout().flush()?;
        }
    }
    Ok(())
}

fn backend(sock: &Path, cmd: BackendCmd) -> Result<(), Box<dyn std::error::Error>> {
    let req = |vip, address, weight| api::BackendRequest {
        vip,
        address,
        weight,
        backup: None,
        pool: None,
    };
    let call = |method: &str, path: &str, body: api::BackendRequest| -> Result<(), ClientError> {
        print_changes(&client::send(sock, method, path, &body)?);
        Ok(())
    };
    match cmd {
        BackendCmd::Add {
            vip,
            address,
            weight,
            backup,
            pool,
        } => {
            let mut r = req(vip, address, Some(weight));
            r.backup = Some(backup);
            r.pool = pool;
            call("POST", "/v1/backends", r)?
        }
        BackendCmd::Del { vip, address } => {
            call("DELETE", "/v1/backends", req(vip, address, None))?
        }
        BackendCmd::SetWeight {
            vip,
            address,
            weight,
        } => call(
            "POST",
            "/v1/backends/weight",
            req(vip, address, Some(weight)),
        )?,
        BackendCmd::Drain { vip, address } => {
            call("POST", "/v1/backends/drain", req(vip, address, None))?
        }
        BackendCmd::Disable { vip, address } => {
            call("POST", "/v1/backends/disable", req(vip, address, None))?
        }
        BackendCmd::Enable { vip, address } => {
            call("POST", "/v1/backends/enable", req(vip, address, None))?
        }
        BackendCmd::Health {
            vip,
            address,
            inherit,
            check,
        } => {
            if !inherit && check.kind.is_none() {
                return Err(
                    "give --kind (none turns checks off for this backend) or --inherit".into(),
                );
            }
            let r = api::HealthRequest {
                vip,
                backend: Some(address),
                health: (!inherit).then(|| check.check()),
            };
            print_changes(&client::send(sock, "POST", "/v1/health", &r)?)
        }
        BackendCmd::List { vip, output } => {
            let body = client::call(sock, "GET", "/v1/vips", None)?;
            let vips: Vec<api::VipView> = serde_json::from_str(&body)?;
            if let Some(v) = &vip {
                if !vips.iter().any(|x| x.address == *v) {
                    return Err(format!("VIP {v} does not exist: see `maglb vip list`").into());
                }
            }
            let vips: Vec<_> = vips
                .into_iter()
                .filter(|v| vip.is_none_or(|id| v.address == id))
                .collect();
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&vips)?);
                return Ok(());
            }
            println!(
                "{:<24} {:<26} {:>6} {:<8} {:<10} {:<5} {:<20} {:>8} {:>6} {:>10} {:>12}",
                "VIP",
                "BACKEND",
                "WEIGHT",
                "STATE",
                "POOL",
                "HEALTH",
                "LAST",
                "LATENCY",
                "SINCE",
                "PACKETS",
                "BYTES"
            );
            let any_backup = vips.iter().any(|v| v.backends.iter().any(|b| b.backup));
            for v in vips {
                for b in v.backends {
                    let h = health_cells(b.health.as_ref());
                    let state = if b.backup {
                        format!("{}*", b.state)
                    } else {
                        b.state.to_string()
                    };
                    println!(
                        "{:<24} {:<26} {:>6} {:<8} {:<10} {:<5} {:<20} {:>8} {:>6} {:>10} {:>12}",
                        v.address.to_string(),
                        b.address.to_string(),
                        b.weight,
                        state,
                        b.pool,
                        h.0,
                        h.1,
                        h.2,
                        h.3,
                        b.counters.packets,
                        b.counters.bytes
                    );
                }
            }
            if any_backup {
                println!("(* backup)");
            }
        }
    }
    Ok(())
}

/// `maglb stats --watch`: rates between two refreshes, per VIP and backend.
fn watch(
    sock: &Path,
    every: Duration,
    count: Option<u64>,
) -> Result<(), Box<dyn std::error::Error>> {
    let tty = unsafe { libc::isatty(1) } == 1;
    let mut prev: api::Stats = client::get(sock, "/v1/stats")?;
    let mut at = Instant::now();
    for _ in 0..count.unwrap_or(u64::MAX) {
        std::thread::sleep(every);
        let cur: api::Stats = client::get(sock, "/v1/stats")?;
        let dt = at.elapsed().as_secs_f64();
        at = Instant::now();
        let rate = |now: u64, before: u64| now.saturating_sub(before) as f64 / dt;
        if tty {
            print!("\x1b[2J\x1b[H");
        }
        println!(
            "maglb stats --watch (every {:.1} s, Ctrl-C to stop)",
            every.as_secs_f64()
        );
        println!(
            "{:<28} {:<26} {:>10} {:>12} {:>11} {:<8} {:<6}",
            "VIP", "BACKEND", "PKT/S", "BIT/S", "NEWFLOWS/S", "STATE", "HEALTH"
        );
        for v in &cur.vips {
            let old = prev.vips.iter().find(|o| o.address == v.address);
            let (p0, b0, f0) = old.map_or((0, 0, 0), |o| {
                (o.counters.packets, o.counters.bytes, o.new_flows)
            });
            println!(
                "{:<28} {:<26} {:>10.0} {:>12} {:>11.0}",
                v.address.to_string(),
                "",
                rate(v.counters.packets, p0),
                si(8.0 * rate(v.counters.bytes, b0)),
                rate(v.new_flows, f0)
            );
            for b in &v.backends {
                let ob = old.and_then(|o| o.backends.iter().find(|x| x.address == b.address));
                let (p0, b0) = ob.map_or((0, 0), |o| (o.counters.packets, o.counters.bytes));
                let health = b
                    .health
                    .as_ref()
                    .map_or("-", |h| if h.up { "up" } else { "down" });
                println!(
                    "{:<28} {:<26} {:>10.0} {:>12} {:>11} {:<8} {:<6}",
                    "",
                    b.address.to_string(),
                    rate(b.counters.packets, p0),
                    si(8.0 * rate(b.counters.bytes, b0)),
                    "",
                    b.state.to_string(),
                    health
                );
            }
        }
        let drops = |s: &api::Stats| -> u64 {
            s.global
                .iter()
                .filter(|(k, _)| k.starts_with("drop_"))
                .map(|(_, c)| c.packets)
                .sum()
        };
        println!("drops/s {:.0}", rate(drops(&cur), drops(&prev)));
        std::io::stdout().flush()?;
        prev = cur;
    }
    Ok(())
}

/// 1234567.0 -> "1.2M".
fn si(v: f64) -> String {
    match v {
        v if v >= 1e9 => format!("{:.1}G", v / 1e9),
        v if v >= 1e6 => format!("{:.1}M", v / 1e6),
        v if v >= 1e3 => format!("{:.1}k", v / 1e3),
        v => format!("{v:.0}"),
    }
}

fn read_file(p: &Path) -> Result<String, String> {
    std::fs::read_to_string(p).map_err(|e| format!("reading {}: {e}", p.display()))
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("MAGLB_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}
