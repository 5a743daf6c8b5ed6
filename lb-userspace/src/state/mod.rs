//! The desired state: which interface the balancer is attached to, its settings, the VIPs
//! and their backends. One schema serves the agent's state file (JSON) and the operator's
//! `maglb.toml` (TOML).
//!
//! Everything here is pure (no I/O). Operations ([`ops`]) return a new state, checked whole
//! by the one validation ([`validate`]), or a [`Refusal`] that names the field and the fix,
//! and leave the old state untouched. [`spec`] turns a VIP into what the datapath must carry,
//! given its backends' health; [`diff`] says what a change does, in words.

mod diff;
mod down;
mod ops;
mod policy;
mod spec;
#[cfg(test)]
mod tests;
mod validate;
mod vip_id;

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::DEFAULT_RING_SIZE;
use serde::{Deserialize, Serialize};

pub use self::{
    down::{BackendKey, down_after},
    ops::Change,
    policy::{Encap, Policy, Prefix, RateLimit},
    spec::{BackendSpec, MAX_WEIGHT, VipSpec},
    validate::{check_ifname, check_pool, parse_statuses, validate_policy},
    vip_id::{Proto, VipId},
};

pub const STATE_VERSION: u32 = 1;

/// How the XDP program is attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    #[default]
    Native,
    Generic,
}

impl AttachMode {
    pub fn to_mode(self) -> crate::datapath::Mode {
        match self {
            AttachMode::Native => crate::datapath::Mode::Native,
            AttachMode::Generic => crate::datapath::Mode::Generic,
        }
    }
}

impl fmt::Display for AttachMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AttachMode::Native => "native",
            AttachMode::Generic => "generic",
        })
    }
}

/// Client affinity of a VIP.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Affinity {
    /// Hash on the client address only: a client keeps its backend across connections.
    #[serde(rename = "src-ip")]
    SrcIp,
}

/// Operator state of a backend.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendState {
    /// Takes new flows in proportion to its weight (while healthy).
    #[default]
    Active,
    /// Takes no new flows; its established flows stay until they end.
    Drain,
    /// Out of service: no new flows, and its established flows move elsewhere.
    Disabled,
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendState::Active => "active",
            BackendState::Drain => "drain",
            BackendState::Disabled => "disabled",
        })
    }
}

/// The balancer's settings (`[balancer]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalancerSettings {
    /// Interface the XDP program is attached to; none when detached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(default)]
    pub mode: AttachMode,
    /// Largest outer packet toward the backends; default: the interface's MTU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
    /// Outer source address for IPv4 backends; default: the interface's first IPv4 address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_v4: Option<Ipv4Addr>,
    /// Outer source address for IPv6 backends; default: the interface's first global IPv6.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_v6: Option<Ipv6Addr>,
    /// Next hop toward the backends; default: the route to the first backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nexthop: Option<IpAddr>,
    /// A fixed next-hop MAC instead of resolving one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nexthop_mac: Option<String>,
    /// Size of the connection table in flows, rounded up to a power of two; fixed when the
    /// maps are made (default 4,194,304, 64 bytes each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conntrack_entries: Option<u32>,
    /// A TCP flow idle this long loses its connection-table entry (default 3600000, 1 h;
    /// 0: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_idle_timeout_ms: Option<u32>,
    /// The same for UDP (default 30000; 0: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_idle_timeout_ms: Option<u32>,
    /// New flows per second per CPU above which a CPU stops inserting connection-table
    /// entries for a while (flood mode; default 100000; 0: off).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flood_new_flows_per_s: Option<u32>,
    /// How packets reach the backends: `ipip` (default) or `gue`.
    #[serde(default, skip_serializing_if = "is_ipip")]
    pub encap: Encap,
    /// GUE's UDP destination port (default 6080).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gue_port: Option<u16>,
}

fn is_ipip(e: &Encap) -> bool {
    *e == Encap::Ipip
}

fn default_ring() -> u32 {
    DEFAULT_RING_SIZE
}
fn default_weight() -> u32 {
    1
}
fn default_version() -> u32 {
    STATE_VERSION
}
fn is_active(s: &BackendState) -> bool {
    *s == BackendState::Active
}
fn is_default_ring(r: &u32) -> bool {
    *r == DEFAULT_RING_SIZE
}

/// What a health check does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeKind {
    /// No check: the backend counts as up.
    None,
    /// A TCP connect (the default kind, and the default check of a TCP VIP).
    #[default]
    Tcp,
    /// An HTTP GET, judged by status (and optionally body).
    Http,
    /// The same over TLS (SNI from `host`; the certificate is verified unless
    /// `tls_insecure`).
    Https,
    /// A UDP datagram that must be answered.
    Udp,
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProbeKind::None => "none",
            ProbeKind::Tcp => "tcp",
            ProbeKind::Http => "http",
            ProbeKind::Https => "https",
            ProbeKind::Udp => "udp",
        })
    }
}

/// Which way a probe travels (`via`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeVia {
    /// To the VIP address and port, encapsulated toward the backend exactly like client
    /// traffic, leaving through the balancer's interface; the answer comes back directly
    /// (DSR). Proves the whole path: the backend's decapsulation, the VIP on its loopback,
    /// the service on the VIP, and its answers reaching clients' side of the network.
    Tunnel,
    /// To the backend's own address and the check's port, as an ordinary connection. Proves
    /// only that the service answers on the backend's address.
    Direct,
}

impl fmt::Display for ProbeVia {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProbeVia::Tunnel => "tunnel",
            ProbeVia::Direct => "direct",
        })
    }
}

/// How a backend new to a VIP starts, until its probes say otherwise.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Initial {
    /// Up at once (as HAProxy): it takes new flows until `fall` probes fail.
    #[default]
    Up,
    /// Down until `rise` probes pass: no new flows before it has proved itself.
    Down,
}

impl fmt::Display for Initial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Initial::Up => "up",
            Initial::Down => "down",
        })
    }
}

fn is_initial_up(i: &Initial) -> bool {
    *i == Initial::Up
}

fn d_interval() -> u32 {
    2000
}
fn d_timeout() -> u32 {
    1000
}
fn d_rise() -> u32 {
    2
}
fn d_fall() -> u32 {
    3
}
fn d_path() -> String {
    "/".into()
}
fn d_expect() -> String {
    "200-399".into()
}

/// A health check (`health` of a VIP: the default for its backends; of a backend: its own).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthCheck {
    /// Default `tcp`; `none` turns probing off.
    #[serde(default)]
    pub kind: ProbeKind,
    /// Time between checks.
    #[serde(default = "d_interval")]
    pub interval_ms: u32,
    /// A check that takes longer fails.
    #[serde(default = "d_timeout")]
    pub timeout_ms: u32,
    /// Consecutive successes that bring a down backend up.
    #[serde(default = "d_rise")]
    pub rise: u32,
    /// Consecutive failures that take an up backend down.
    #[serde(default = "d_fall")]
    pub fall: u32,
    /// Port to check; default: the VIP's port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// Source address of the checks; default: chosen by the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<IpAddr>,
    /// HTTP: the path to GET.
    #[serde(default = "d_path")]
    pub path: String,
    /// HTTP: statuses that pass, e.g. "200", "200-399", "200,204,301-302".
    #[serde(default = "d_expect")]
    pub expect_status: String,
    /// HTTP: a substring the body must contain.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_contains: Option<String>,
    /// HTTP: the Host header; default: the backend's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// UDP: what to send (any answer passes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// HTTPS: a PEM file of the certificate authorities to trust (default: the system's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<String>,
    /// HTTPS: do not verify the certificate (a self-signed one passes).
    #[serde(default, skip_serializing_if = "is_false")]
    pub tls_insecure: bool,
    /// Which way the probes travel; default: over the tunnel when the balancer can carry
    /// them (attached and forwarding), else direct.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub via: Option<ProbeVia>,
    /// How a backend added to the VIP starts: `up` (default) or `down` until `rise` probes
    /// pass.
    #[serde(default, skip_serializing_if = "is_initial_up")]
    pub initial: Initial,
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: ProbeKind::Tcp,
            interval_ms: d_interval(),
            timeout_ms: d_timeout(),
            rise: d_rise(),
            fall: d_fall(),
            port: None,
            source: None,
            path: d_path(),
            expect_status: d_expect(),
            body_contains: None,
            host: None,
            payload: None,
            tls_ca: None,
            tls_insecure: false,
            via: None,
            initial: Initial::Up,
        }
    }
}

/// The check of a VIP whose backends have none configured: a TCP connect to the VIP's port
/// with the defaults above (every 2000 ms, timeout 1000 ms, rise 2, fall 3).
static DEFAULT_CHECK: std::sync::LazyLock<HealthCheck> =
    std::sync::LazyLock::new(HealthCheck::default);

/// The pool of backends that name none.
pub const DEFAULT_POOL: &str = "default";

fn is_false(b: &bool) -> bool {
    !*b
}

/// A backend of a VIP (`[[vip.backend]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendEntry {
    pub address: IpAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "is_active")]
    pub state: BackendState,
    /// Takes traffic only while no primary backend of the VIP is up.
    #[serde(default, skip_serializing_if = "is_false")]
    pub backup: bool,
    /// The group it belongs to, for blue-green and canary splits; default "default".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    /// Its own health check instead of the VIP's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Box<HealthCheck>>,
}

impl BackendEntry {
    pub fn new(address: IpAddr, weight: u32) -> Self {
        Self {
            address,
            weight,
            state: BackendState::Active,
            backup: false,
            pool: None,
            health: None,
        }
    }

    pub fn pool(&self) -> &str {
        self.pool.as_deref().unwrap_or(DEFAULT_POOL)
    }
}

/// A VIP (`[[vip]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vip {
    /// `ADDR:PORT/tcp|udp`, IPv6 as `[ADDR]:PORT/tcp`; port 0 takes all ports.
    pub address: VipId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default = "default_ring", skip_serializing_if = "is_default_ring")]
    pub ring_size: u32,
    /// The default health check of its backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<Box<HealthCheck>>,
    /// Which pools take new flows, and their relative shares (e.g. blue = 95, green = 5).
    /// Empty: every backend, whatever its pool.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pools: BTreeMap<String, u32>,
    /// Lower the effective weight of a backend whose probes stay much slower than its
    /// peers' (in steps, down to a floor; back up with hysteresis).
    #[serde(default, skip_serializing_if = "is_false")]
    pub adaptive_weights: bool,
    /// New flows per client (/32 or /64), e.g. `{ new_flows_per_s = 100, burst = 20 }`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// New flows of the VIP, all clients together.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub new_flow_cap: Option<RateLimit>,
    /// Only these source prefixes start flows (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<Prefix>,
    /// These source prefixes never start flows.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<Prefix>,
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendEntry>,
}

impl Vip {
    pub fn new(address: VipId) -> Self {
        Self {
            address,
            affinity: None,
            ring_size: DEFAULT_RING_SIZE,
            health: None,
            pools: BTreeMap::new(),
            adaptive_weights: false,
            rate_limit: None,
            new_flow_cap: None,
            allow: Vec::new(),
            deny: Vec::new(),
            backends: Vec::new(),
        }
    }

    /// What the datapath applies to its new flows.
    pub fn policy(&self) -> Policy {
        Policy {
            rate_limit: self.rate_limit,
            new_flow_cap: self.new_flow_cap,
            allow: self.allow.clone(),
            deny: self.deny.clone(),
        }
    }

    /// The health check that applies to a backend, if any: its own, else the VIP's, else
    /// the default check. `kind = "none"` turns probing off.
    pub fn check_for<'a>(&'a self, b: &'a BackendEntry) -> Option<&'a HealthCheck> {
        b.health
            .as_deref()
            .or(self.health.as_deref())
            .or_else(|| self.default_check())
            .filter(|h| h.kind != ProbeKind::None)
    }

    /// The check a VIP without one gets: a TCP connect to its port. A port-0 VIP has no
    /// port to probe, and a UDP VIP no check that holds for every UDP service (a TCP
    /// connect to a UDP port proves nothing), so neither gets one ([`Vip::unprobed`]).
    pub fn default_check(&self) -> Option<&'static HealthCheck> {
        (self.address.port != 0 && self.address.proto == Proto::Tcp).then(|| &*DEFAULT_CHECK)
    }

    /// Why no backend of this VIP is probed although no one turned probing off: no check
    /// is configured and there is no default for it.
    pub fn unprobed(&self) -> Option<&'static str> {
        if self.health.is_some() || self.default_check().is_some() {
            return None;
        }
        if self.backends.iter().any(|b| b.health.is_some()) {
            return None;
        }
        Some(if self.address.port == 0 {
            "not health-checked: a port-0 VIP has no default check (set one with a port, \
             e.g. `maglb vip health VIP --kind tcp --port 80`, or kind = \"none\")"
        } else {
            "not health-checked: a UDP VIP has no default check (set one, e.g. \
             `maglb vip health VIP --kind udp --payload PING` or `--kind tcp --port N`, or \
             kind = \"none\")"
        })
    }
}

fn d_vrrp_priority() -> u8 {
    100
}
fn d_advert_cs() -> u16 {
    100
}
fn d_true() -> bool {
    true
}
fn d_penalty() -> u8 {
    50
}

/// Active/passive failover with VRRPv3 (`[vrrp]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VrrpConfig {
    /// Virtual router ID, 1-255; both balancers of a pair use the same.
    pub vrid: u8,
    /// 1-254, or 255 for the address owner; the higher wins.
    #[serde(default = "d_vrrp_priority")]
    pub priority: u8,
    /// Advertisement interval, centiseconds (1-4095).
    #[serde(default = "d_advert_cs")]
    pub advert_interval_cs: u16,
    /// Take over from a lower-priority master.
    #[serde(default = "d_true")]
    pub preempt: bool,
    /// No preemption during this long after start.
    #[serde(default)]
    pub preempt_delay_ms: u32,
    /// Interface for advertisements and addresses; default: the balancer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// Addresses the master holds, all IPv4 or all IPv6 (one family per instance, as
    /// keepalived has it): typically the next hop the router sends the VIPs to, or the VIPs
    /// themselves. IPv6 advertises to ff02::12 from the link-local address.
    pub addresses: Vec<IpAddr>,
    /// Priority lost while the interface is down.
    #[serde(default = "d_penalty")]
    pub track_interface_penalty: u8,
    /// VIPs whose loss of every live backend lowers the priority by `track_vip_penalty`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub track_vips: Vec<VipId>,
    #[serde(default = "d_penalty")]
    pub track_vip_penalty: u8,
}

fn d_bgp_table() -> u32 {
    4242
}
fn d_min_live() -> u32 {
    1
}
fn d_withdraw_wait() -> u32 {
    2000
}
fn d_announce_hold() -> u32 {
    1000
}

/// Active/active behind ECMP (`[bgp]`): which VIP addresses this balancer offers to a BGP
/// speaker (BIRD) running beside it. The agent keeps one host route per announced VIP
/// address in a kernel routing table of its own (`table`), with route protocol
/// [`crate::bgp::ROUTE_PROTOCOL`]; BIRD's `kernel` protocol learns that table and its BGP
/// sessions export it. No rule points at the table, so it never changes forwarding here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BgpConfig {
    /// The kernel routing table the announced VIP routes live in (not 0, 253, 254 or 255).
    #[serde(default = "d_bgp_table")]
    pub table: u32,
    /// A VIP is announced only while at least this many of its backends take new flows.
    #[serde(default = "d_min_live")]
    pub min_live_backends: u32,
    /// Graceful leave: after withdrawing (SIGTERM, `maglb bgp withdraw`, detach), keep
    /// forwarding this long so the router stops sending first (0-60000).
    #[serde(default = "d_withdraw_wait")]
    pub withdraw_wait_ms: u32,
    /// A withdrawn VIP is announced again only once the set of its live backends has not
    /// changed for this long (0-60000): backends recovering together come up within a
    /// probe interval or two of each other, and a balancer announced in between would hash
    /// new flows on a table the others do not have.
    #[serde(default = "d_announce_hold")]
    pub announce_hold_ms: u32,
    /// The interface the routes point at; default: the balancer's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
}

impl Default for BgpConfig {
    fn default() -> Self {
        Self {
            table: d_bgp_table(),
            min_live_backends: d_min_live(),
            withdraw_wait_ms: d_withdraw_wait(),
            announce_hold_ms: d_announce_hold(),
            interface: None,
        }
    }
}

/// The whole desired state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct State {
    #[serde(default = "default_version")]
    pub version: u32,
    #[serde(default)]
    pub balancer: BalancerSettings,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vrrp: Option<VrrpConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<BgpConfig>,
    #[serde(default, rename = "vip")]
    pub vips: Vec<Vip>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            balancer: BalancerSettings::default(),
            vrrp: None,
            bgp: None,
            vips: Vec::new(),
        }
    }
}

/// Why a desired state, or a change to it, is refused. The message says what is wrong, on
/// which object, and what to do.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Invalid input: the field, and why.
    #[error("{0}")]
    Invalid(String),
    /// The VIP or backend named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// It exists already, or the request contradicts the state.
    #[error("{0}")]
    Conflict(String),
}

impl Refusal {
    pub fn invalid(field: impl fmt::Display, message: impl fmt::Display) -> Self {
        Self::Invalid(format!("{field}: {message}"))
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::NotFound(message.into())
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::Conflict(message.into())
    }
}

impl State {
    /// Parses a `maglb.toml`. Unknown fields are errors; nothing falls back to defaults.
    pub fn from_toml(text: &str) -> Result<Self, Refusal> {
        let s: State = toml::from_str(text)
            .map_err(|e| Refusal::Invalid(format!("config: {}", e.to_string().trim())))?;
        s.validate()?;
        Ok(s)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("state serializes to TOML")
    }

    pub fn vip(&self, id: &VipId) -> Option<&Vip> {
        self.vips.iter().find(|v| v.address == *id)
    }

    fn vip_mut(&mut self, id: &VipId) -> Result<&mut Vip, Refusal> {
        self.vips
            .iter_mut()
            .find(|v| v.address == *id)
            .ok_or_else(|| {
                Refusal::not_found(format!(
                    "VIP {id} does not exist: see `maglb vip list`, or add it with `maglb vip add {id}`"
                ))
            })
    }
}
