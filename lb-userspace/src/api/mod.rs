//! The agent's JSON API over its Unix sockets (HTTP/1.1, so `curl --unix-socket` works).
//! These types cross the socket; the CLI and the agent share them. See `docs/api.md`.
//! [`server`] serves them (hyper and axum), [`client`] is the CLI's side.

pub mod client;
mod page;
pub mod server;

use std::{collections::BTreeMap, fmt, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::state::{
    Affinity, AttachMode, BackendState, HealthCheck, Prefix, ProbeKind, ProbeVia, RateLimit, VipId,
};

pub const DEFAULT_SOCKET: &str = "/run/maglb/maglb.sock";
/// The read-only socket next to an API socket (`maglb.sock` -> `maglb-read.sock`): status,
/// lists, counters and health for any local user.
pub fn read_socket_for(socket: &std::path::Path) -> std::path::PathBuf {
    let stem = socket
        .file_stem()
        .map_or("maglb".into(), |s| s.to_string_lossy().into_owned());
    socket.with_file_name(format!("{stem}-read.sock"))
}
/// The header that carries a client's request id.
pub const REQUEST_ID_HEADER: &str = "x-maglb-request-id";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/maglb";
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf/maglb";
/// Where the agent serves Prometheus metrics.
pub const DEFAULT_METRICS: &str = "127.0.0.1:9477";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    pub iface: String,
    #[serde(default)]
    pub mode: AttachMode,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipRequest {
    pub address: VipId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ring_size: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_weights: Option<bool>,
}

/// Changes settings of an existing VIP (those given).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipSetRequest {
    pub address: VipId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adaptive_weights: Option<bool>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VipRef {
    pub address: VipId,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRequest {
    pub vip: VipId,
    pub address: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Add: a backup backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<bool>,
    /// Add: its pool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
}

/// Sets a VIP's default health check (`vip` only) or a backend's own (`vip` and `backend`);
/// `health` null clears it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthRequest {
    pub vip: VipId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<IpAddr>,
    pub health: Option<HealthCheck>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwitchRequest {
    pub address: VipId,
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
}

/// A VIP's limits on new flows, replacing the ones it had (absent fields: none).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRequest {
    pub address: VipId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flow_cap: Option<RateLimit>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Prefix>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Prefix>,
}

/// What the probes of one backend found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HealthView {
    pub up: bool,
    /// "ok", or why the last probe failed.
    pub last: Option<String>,
    pub latency_ms: Option<f64>,
    /// Seconds since the last change of `up` (or since probing began).
    pub since_s: f64,
    pub checks: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ProbeView {
    pub vip: VipId,
    pub backend: IpAddr,
    pub kind: ProbeKind,
    pub target: String,
    /// The way the probes go: over the tunnel (to the VIP, encapsulated like client
    /// traffic) or direct (to the backend's address).
    pub via: ProbeVia,
    /// Why not over the tunnel, when the check left the choice to the agent and it went
    /// direct; or why a probe the check sends over the tunnel cannot go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via_reason: Option<String>,
    /// None until the first probe finishes.
    pub health: Option<HealthView>,
    /// The datapath has taken the backend out of its VIP's table: the writer applied a
    /// down verdict. It follows `health.up` once the writer has caught up.
    #[serde(default)]
    pub out_of_table: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigText {
    /// A `maglb.toml`, as text.
    pub config: String,
}

/// What a change did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Changes {
    pub changes: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CounterView {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendView {
    pub address: IpAddr,
    /// The configured weight.
    pub weight: u32,
    /// The weight it gets now: the configured one, lowered by adaptive weights while its
    /// probes are much slower than its peers'.
    pub effective_weight: f64,
    pub state: BackendState,
    pub backup: bool,
    pub pool: String,
    /// Present when the backend has a health check.
    pub health: Option<HealthView>,
    #[serde(flatten)]
    pub counters: CounterView,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VipView {
    pub address: VipId,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    pub ring_size: u32,
    pub pools: BTreeMap<String, u32>,
    #[serde(default)]
    pub adaptive_weights: bool,
    /// Flows that got a backend from the Maglev table.
    pub new_flows: u64,
    #[serde(flatten)]
    pub counters: CounterView,
    /// Packets of the VIP not forwarded, by reason (`drop_no_backend`, `drop_src_rate`, ...;
    /// only reasons that counted any).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub drops: BTreeMap<String, u64>,
    pub backends: Vec<BackendView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    pub vips: Vec<VipView>,
    /// Global counters by reason (`conntrack_hit`, `drop_no_backend`, ...).
    pub global: BTreeMap<String, CounterView>,
    /// What the flood mode did.
    #[serde(default)]
    pub flood: crate::datapath::FloodStats,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub interface: Option<String>,
    pub mode: AttachMode,
    pub attached: bool,
    /// Why it is detached although no one detached it (a defunct pinned link at start).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detached_reason: Option<String>,
    /// The datapath has its configuration and forwards (false: it passes everything).
    pub ready: bool,
    pub mtu: u16,
    pub source_v4: Option<String>,
    pub source_v6: Option<String>,
    pub nexthop: Option<String>,
    pub nexthop_mac: Option<String>,
    pub vips: usize,
    pub backends: usize,
    /// The interface whose egress carries probes over the tunnel, if any.
    #[serde(default)]
    pub probe_tunnel: Option<String>,
    /// Why probes cannot go over the tunnel now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub probe_tunnel_unavailable: Option<String>,
    /// Connection-table size in flows, and the slots of each of its sets.
    #[serde(default)]
    pub conntrack_entries: u32,
    #[serde(default)]
    pub conntrack_ways: u32,
    pub state_file: String,
    pub bpffs: String,
}

/// Whether a request (by its id) was committed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RequestStatus {
    pub id: String,
    pub committed: bool,
}

/// Differences between the maps and the state (`maglb verify`); empty when they agree.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Verification {
    pub differences: Vec<String>,
}

/// A VRRP router's state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VrrpState {
    #[default]
    Initialize,
    Backup,
    Master,
}

impl fmt::Display for VrrpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            VrrpState::Initialize => "initialize",
            VrrpState::Backup => "backup",
            VrrpState::Master => "master",
        })
    }
}

/// What `maglb vrrp status` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct VrrpStatus {
    pub state: VrrpState,
    pub vrid: u8,
    pub interface: String,
    /// Configured priority, and the one advertised now (after tracking and release).
    pub priority: u8,
    pub effective_priority: u8,
    pub master: Option<String>,
    pub reason: String,
    pub since_s: f64,
    pub transitions: u64,
    pub adverts_sent: u64,
    pub adverts_received: u64,
    /// Advertisements refused, by reason (ttl, version, checksum, vrid, ...).
    pub invalid: BTreeMap<String, u64>,
    /// Released with `maglb vrrp release`: stays backup until `maglb vrrp claim`.
    pub released: bool,
    /// Times a master announced its addresses again without a transition (link up,
    /// priority back, a stall, a rival master).
    #[serde(default)]
    pub announcements: u64,
    /// Configuration problems seen at run time (a peer whose priority ties with ours).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// One VIP address as `maglb bgp status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BgpAddress {
    pub address: IpAddr,
    /// The VIPs on this address.
    pub vips: Vec<VipId>,
    /// Its route is in the table now (BIRD announces it).
    pub announced: bool,
    /// Why it is announced or withdrawn.
    pub reason: String,
    /// Seconds since `announced` last changed.
    pub since_s: f64,
}

/// What `maglb bgp status` shows.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct BgpStatus {
    /// The kernel routing table the routes live in, and their route protocol number.
    pub table: u32,
    pub protocol: u8,
    /// The interface the routes point at.
    pub interface: Option<String>,
    pub min_live_backends: u32,
    pub withdraw_wait_ms: u32,
    /// `maglb bgp withdraw` holds every address back (until `maglb bgp announce`).
    pub withdrawn_by_operator: bool,
    /// The agent is leaving (SIGTERM or detach): everything is withdrawn.
    pub leaving: bool,
    pub addresses: Vec<BgpAddress>,
    /// The last error writing the routes, if the last attempt failed.
    pub error: Option<String>,
}
