//! The command line: what `maglb` takes (clap). Dispatch and output live next to it.

use std::{net::IpAddr, path::PathBuf};

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{
    api,
    datapath::decap,
    state::{AttachMode, HealthCheck, Initial, Prefix, ProbeKind, ProbeVia, VipId},
};

#[derive(Parser)]
#[command(
    name = "maglb",
    version,
    about = "An XDP layer-4 load balancer with Maglev hashing and direct server return",
    after_help = "Start the agent with `maglb agent` (root), then attach and add VIPs:\n  \
        maglb attach --iface eth0\n  \
        maglb vip add 10.200.0.1:80/tcp\n  \
        maglb backend add 10.200.0.1:80/tcp 10.10.3.11 --weight 2\n  \
        maglb stats"
)]
pub struct Cli {
    /// The agent's API socket (root only).
    #[arg(long, global = true, env = "MAGLB_SOCKET", default_value = api::DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The agent's read-only socket, used for reads when the API socket is not open to you
    /// [default: next to the API socket, NAME-read.sock].
    #[arg(long, global = true, env = "MAGLB_READ_SOCKET")]
    pub read_socket: Option<PathBuf>,
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ModeArg {
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
pub enum AffinityArg {
    /// A client's connections all go to one backend.
    SrcIp,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Run the agent: owns the BPF maps and the state, serves the API (root).
    #[command(
        after_help = "Example:\n  maglb agent --state-dir /var/lib/maglb --bpffs /sys/fs/bpf/maglb"
    )]
    Agent {
        /// Where the state file lives. The state file is the truth about VIPs and backends.
        #[arg(long, default_value = api::DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Where maps and the XDP link are pinned. A BPF filesystem is mounted there (at
        /// /sys/fs/bpf, or the directory's parent) when none is.
        #[arg(long, default_value = api::DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Log format.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
        /// Serve Prometheus metrics and the status page at ADDR:PORT (`off`: not at all).
        #[arg(long, default_value = api::DEFAULT_METRICS)]
        metrics_listen: String,
        /// Serve status, lists and counters to any local user on this socket (`off`: not at
        /// all) [default: next to the API socket, NAME-read.sock].
        #[arg(long = "read-socket-path")]
        read_socket_path: Option<String>,
        /// A maglb.toml to start from on the first start (no state file yet); later starts
        /// ignore it.
        #[arg(long)]
        initial_config: Option<PathBuf>,
        /// Start with an empty state when the state file is unreadable (it is moved aside to
        /// state.json.unreadable). Without it, the agent refuses to start.
        #[arg(long)]
        start_empty: bool,
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
    /// Active/active behind ECMP: which VIP addresses BIRD announces, and why; graceful
    /// withdraw.
    Bgp {
        #[command(subcommand)]
        cmd: BgpCmd,
    },
    /// The backend-side decap program (no agent needed).
    Decap {
        #[command(subcommand)]
        cmd: DecapCmd,
    },
    /// Compare the maps with the state, slot for slot (empty output: they agree).
    Verify,
    /// Shell completions.
    #[command(after_help = "Example:\n  maglb completions bash > /etc/bash_completion.d/maglb")]
    Completions { shell: clap_complete::Shell },
    /// Man pages (roff): maglb(1) on standard output, or one page per subcommand into a
    /// directory (`cargo xtask install` does this).
    #[command(after_help = "Example:\n  maglb man | man -l -")]
    Man {
        /// Write maglb.1, maglb-vip.1, maglb-vip-add.1, ... into this directory instead.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
pub enum VipCmd {
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
        /// Lower the weight of backends whose probes stay much slower than their peers'.
        #[arg(long)]
        adaptive_weights: bool,
    },
    /// Change settings of a VIP.
    #[command(after_help = "Example:\n  maglb vip set 10.200.0.1:80/tcp --adaptive-weights on")]
    Set {
        vip: VipId,
        /// Lower the effective weight of backends whose probes stay much slower than their
        /// peers' (in steps, down to 10%), and raise it again when they are fast.
        #[arg(long, value_enum)]
        adaptive_weights: Option<OnOff>,
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
    /// Set the health check of the VIP's backends (`--kind none` turns probing off,
    /// `--default` goes back to the default: a TCP connect to the VIP's port).
    #[command(
        after_help = "Examples:\n  maglb vip health 10.200.0.1:80/tcp --kind tcp --interval-ms 1000 --fall 3\n  \
        maglb vip health 10.200.0.1:80/tcp --kind http --port 8080 --path /healthz --expect 200-299\n  \
        maglb vip health 10.200.0.1:80/tcp --kind none\n  \
        maglb vip health 10.200.0.1:80/tcp --default"
    )]
    Health {
        vip: VipId,
        /// Remove the configured check: the default applies (a TCP connect to the VIP's
        /// port every 2000 ms, timeout 1000 ms, rise 2, fall 3; none for port-0 and UDP VIPs).
        #[arg(long = "default", conflicts_with = "kind")]
        default: bool,
        #[command(flatten)]
        check: HealthArgs,
    },
    /// Limit who starts new flows to the VIP, and how fast (replaces the VIP's limits;
    /// without options, removes them). Established flows are never limited.
    #[command(
        after_help = "Examples:\n  maglb vip policy 10.200.0.1:80/tcp --rate-limit 100 --rate-burst 200\n  \
        maglb vip policy 10.200.0.1:80/tcp --cap 50000 --allow 10.0.0.0/8 --deny 10.9.0.0/16\n  \
        maglb vip policy 10.200.0.1:80/tcp        # no limits"
    )]
    Policy {
        vip: VipId,
        /// New flows per second from one source /32 (IPv4) or /64 (IPv6).
        #[arg(long)]
        rate_limit: Option<u32>,
        /// Flows one source may start at once [default: the rate].
        #[arg(long, requires = "rate_limit")]
        rate_burst: Option<u32>,
        /// New flows per second to the VIP from all sources together.
        #[arg(long)]
        cap: Option<u32>,
        /// Flows the VIP admits at once [default: the cap].
        #[arg(long, requires = "cap")]
        cap_burst: Option<u32>,
        /// Only sources in these prefixes start flows (repeatable).
        #[arg(long)]
        allow: Vec<Prefix>,
        /// Sources in these prefixes never start flows; the longest matching prefix decides
        /// (repeatable).
        #[arg(long)]
        deny: Vec<Prefix>,
    },
    /// List VIPs.
    List {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
pub enum BackendCmd {
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
pub enum OnOff {
    On,
    Off,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ViaArg {
    Tunnel,
    Direct,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum InitialArg {
    Up,
    Down,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum KindArg {
    None,
    Tcp,
    Http,
    Https,
    Udp,
}

/// A health check on the command line; unset settings take their defaults.
#[derive(Args)]
pub struct HealthArgs {
    /// What to check.
    #[arg(long, value_enum)]
    pub kind: Option<KindArg>,
    /// Time between checks [default: 2000].
    #[arg(long)]
    pub interval_ms: Option<u32>,
    /// A check that takes longer fails [default: 1000].
    #[arg(long)]
    pub timeout_ms: Option<u32>,
    /// Successes that bring a backend up [default: 2].
    #[arg(long)]
    pub rise: Option<u32>,
    /// Failures that take a backend down [default: 3].
    #[arg(long)]
    pub fall: Option<u32>,
    /// Port to check [default: the VIP's port].
    #[arg(long)]
    pub port: Option<u16>,
    /// Source address of the checks.
    #[arg(long)]
    pub source: Option<IpAddr>,
    /// HTTP: path to GET [default: /].
    #[arg(long)]
    pub path: Option<String>,
    /// HTTP: statuses that pass, e.g. 200, 200-399, 200,204 [default: 200-399].
    #[arg(long)]
    pub expect: Option<String>,
    /// HTTP: a substring the body must contain.
    #[arg(long)]
    pub body: Option<String>,
    /// HTTP: the Host header.
    #[arg(long)]
    pub host: Option<String>,
    /// UDP: what to send.
    #[arg(long)]
    pub payload: Option<String>,
    /// HTTPS: a PEM file of the certificate authorities to trust [default: the system's].
    #[arg(long)]
    pub tls_ca: Option<String>,
    /// HTTPS: do not verify the certificate.
    #[arg(long)]
    pub tls_insecure: bool,
    /// The way probes go: tunnel (to the VIP, encapsulated toward the backend like client
    /// traffic) or direct (to the backend's address) [default: tunnel when the balancer can
    /// carry it, else direct].
    #[arg(long, value_enum)]
    pub via: Option<ViaArg>,
    /// How a backend added later starts: up at once, or down until `rise` probes pass
    /// [default: up].
    #[arg(long, value_enum)]
    pub initial: Option<InitialArg>,
}

impl HealthArgs {
    pub fn check(&self) -> HealthCheck {
        let d = HealthCheck::default();
        HealthCheck {
            kind: match self.kind.unwrap_or(KindArg::None) {
                KindArg::None => ProbeKind::None,
                KindArg::Tcp => ProbeKind::Tcp,
                KindArg::Http => ProbeKind::Http,
                KindArg::Https => ProbeKind::Https,
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
            tls_ca: self.tls_ca.clone(),
            tls_insecure: self.tls_insecure,
            via: self.via.map(|v| match v {
                ViaArg::Tunnel => ProbeVia::Tunnel,
                ViaArg::Direct => ProbeVia::Direct,
            }),
            initial: match self.initial {
                Some(InitialArg::Down) => Initial::Down,
                _ => Initial::Up,
            },
        }
    }
}

#[derive(Subcommand)]
pub enum VrrpCmd {
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
pub enum BgpCmd {
    /// Per VIP address: announced or withdrawn, and why.
    Status {
        #[arg(long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Withdraw every VIP address and keep forwarding for `withdraw_wait_ms`; returns when
    /// the router has stopped sending (a planned removal). Lasts until `maglb bgp announce`.
    Withdraw,
    /// Announce what qualifies again after `withdraw`.
    Announce,
}

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Print the running state as a maglb.toml.
    Export,
}

#[derive(Subcommand)]
pub enum DecapCmd {
    /// Load and attach the decap program; it stays attached after this command exits.
    #[command(
        after_help = "Example:\n  maglb decap attach --iface eth0\n  maglb decap attach --iface eth0 --gue-port 7000"
    )]
    Attach {
        #[arg(long)]
        iface: String,
        #[arg(long, value_enum, default_value = "native")]
        mode: ModeArg,
        /// UDP port of GUE packets to decapsulate: the balancer's `gue_port` when it runs
        /// with `encap = "gue"`. 0: IP-in-IP only.
        #[arg(long, default_value_t = lb_common::DEFAULT_GUE_PORT)]
        gue_port: u16,
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
