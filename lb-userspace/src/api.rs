//! The agent's JSON API over its Unix socket (HTTP/1.1, so `curl --unix-socket` works).
//! These types cross the socket; the CLI and the agent share them. See `docs/api.md`.

use std::{collections::BTreeMap, net::IpAddr};

use serde::{Deserialize, Serialize};

use crate::{
    service::VipId,
    state::{Affinity, AttachMode, BackendState, HealthCheck, ProbeKind},
};

pub const DEFAULT_SOCKET: &str = "/run/maglb/maglb.sock";
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
    /// None until the first probe finishes.
    pub health: Option<HealthView>,
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
    pub weight: u32,
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
    /// Flows that got a backend from the Maglev table.
    pub new_flows: u64,
    #[serde(flatten)]
    pub counters: CounterView,
    pub backends: Vec<BackendView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    pub vips: Vec<VipView>,
    /// Global counters by reason (`conntrack_hit`, `drop_no_backend`, ...).
    pub global: BTreeMap<String, CounterView>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub version: String,
    pub pid: u32,
    pub interface: Option<String>,
    pub mode: AttachMode,
    pub attached: bool,
    /// The datapath has its configuration and forwards (false: it passes everything).
    pub ready: bool,
    pub mtu: u16,
    pub source_v4: Option<String>,
    pub source_v6: Option<String>,
    pub nexthop: Option<String>,
    pub nexthop_mac: Option<String>,
    pub vips: usize,
    pub backends: usize,
    pub state_file: String,
    pub bpffs: String,
}
