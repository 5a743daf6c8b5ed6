//! The desired state: which interface the balancer is attached to, its settings, the VIPs
//! and their backends. One schema serves the agent's state file (JSON) and the operator's
//! `maglb.toml` (TOML). Operations are pure: they return a new state, validated whole, or an
//! error that names the field and the fix, and leave the old one untouched.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use lb_common::{DEFAULT_RING_SIZE, MAX_BACKENDS, MAX_RING_SIZE, MAX_VIPS};
use serde::{Deserialize, Serialize};

use crate::{
    maglev, netdev,
    service::{BackendSpec, MAX_WEIGHT, VipId, VipSpec},
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
    pub fn to_mode(self) -> crate::balancer::Mode {
        match self {
            AttachMode::Native => crate::balancer::Mode::Native,
            AttachMode::Generic => crate::balancer::Mode::Generic,
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
    #[default]
    None,
    /// A TCP connect.
    Tcp,
    /// An HTTP GET, judged by status (and optionally body).
    Http,
    /// A UDP datagram that must be answered.
    Udp,
}

impl fmt::Display for ProbeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProbeKind::None => "none",
            ProbeKind::Tcp => "tcp",
            ProbeKind::Http => "http",
            ProbeKind::Udp => "udp",
        })
    }
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
}

impl Default for HealthCheck {
    fn default() -> Self {
        Self {
            kind: ProbeKind::None,
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
        }
    }
}

/// Parses a status list: `200`, `200-399`, `200,204,301-302`.
pub fn parse_statuses(s: &str) -> Result<Vec<(u16, u16)>, String> {
    let bad = || format!("{s:?} is not a status list (e.g. 200, 200-399, 200,204)");
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let (a, b) = part.split_once('-').unwrap_or((part, part));
        let (a, b): (u16, u16) = (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        );
        if !(100..=599).contains(&a) || !(100..=599).contains(&b) || a > b {
            return Err(bad());
        }
        out.push((a, b));
    }
    Ok(out)
}

impl HealthCheck {
    fn validate(&self, field: &str, vip_port: u16) -> Result<(), Refused> {
        let f = |what: &str| format!("{field}.{what}");
        if self.kind == ProbeKind::None {
            return Ok(());
        }
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return Err(Refused::invalid(
                f("interval_ms"),
                format!("{} is out of range 100-3600000", self.interval_ms),
            ));
        }
        if self.timeout_ms < 10 || self.timeout_ms > self.interval_ms {
            return Err(Refused::invalid(
                f("timeout_ms"),
                format!(
                    "{} must be between 10 and interval_ms ({})",
                    self.timeout_ms, self.interval_ms
                ),
            ));
        }
        for (name, v) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=100).contains(&v) {
                return Err(Refused::invalid(
                    f(name),
                    format!("{v} is out of range 1-100"),
                ));
            }
        }
        if self.port.unwrap_or(vip_port) == 0 {
            return Err(Refused::invalid(
                f("port"),
                "the VIP takes all ports, so the check needs a port: set health.port",
            ));
        }
        if self.kind == ProbeKind::Http {
            if !self.path.starts_with('/') || self.path.contains(char::is_whitespace) {
                return Err(Refused::invalid(
                    f("path"),
                    format!("{:?} must start with / and have no spaces", self.path),
                ));
            }
            parse_statuses(&self.expect_status)
                .map_err(|m| Refused::invalid(f("expect_status"), m))?;
            if self
                .host
                .as_deref()
                .is_some_and(|h| h.is_empty() || h.contains(char::is_whitespace))
            {
                return Err(Refused::invalid(
                    f("host"),
                    "must be a host name without spaces",
                ));
            }
        }
        for (name, v) in [
            ("body_contains", &self.body_contains),
            ("payload", &self.payload),
        ] {
            if v.as_ref().is_some_and(|v| v.len() > 1024) {
                return Err(Refused::invalid(f(name), "at most 1024 bytes"));
            }
        }
        Ok(())
    }
}

/// A check's kind, for change lines.
fn kind(h: &Option<HealthCheck>) -> String {
    h.as_ref().map_or("none".to_owned(), |h| h.kind.to_string())
}

/// A pool split, for change lines: "blue 95, green 5", or "every pool".
fn pools(p: &BTreeMap<String, u32>) -> String {
    if p.is_empty() {
        return "every pool".into();
    }
    p.iter()
        .map(|(n, w)| format!("{n} {w}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A valid pool name.
pub fn check_pool(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 32
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        return Err(format!(
            "{name:?} is not a pool name (1-32 of a-z, 0-9, - and _)"
        ));
    }
    Ok(())
}

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
    pub health: Option<HealthCheck>,
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
    pub health: Option<HealthCheck>,
    /// Which pools take new flows, and their relative shares (e.g. blue = 95, green = 5).
    /// Empty: every backend, whatever its pool.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pools: BTreeMap<String, u32>,
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
            backends: Vec::new(),
        }
    }

    /// The health check that applies to a backend, if any.
    pub fn check_for<'a>(&'a self, b: &'a BackendEntry) -> Option<&'a HealthCheck> {
        b.health
            .as_ref()
            .or(self.health.as_ref())
            .filter(|h| h.kind != ProbeKind::None)
    }

    /// What the datapath needs, given which backends are healthy (`up`).
    ///
    /// - Disabled or down: not live (out of the ring, flows move).
    /// - Drained, outside the active pools, or a backup while a primary is up: weight 0
    ///   (no new flows, established ones stay).
    /// - Otherwise a share of the ring: its weight, or with pools its pool's share divided
    ///   among the pool's eligible backends by weight.
    pub fn spec(&self, up: impl Fn(&IpAddr) -> bool) -> VipSpec {
        let live = |b: &BackendEntry| b.state != BackendState::Disabled && up(&b.address);
        let in_pool = |b: &BackendEntry| {
            self.pools.is_empty() || self.pools.get(b.pool()).is_some_and(|w| *w > 0)
        };
        let eligible = |b: &BackendEntry| {
            live(b) && b.state == BackendState::Active && in_pool(b) && b.weight > 0
        };
        let primaries = self.backends.iter().any(|b| eligible(b) && !b.backup);
        let serving = |b: &BackendEntry| eligible(b) && b.backup != primaries;
        let pool_total: u64 = self.pools.values().map(|w| *w as u64).sum();
        let pool_weight = |p: &str| -> u64 {
            self.backends
                .iter()
                .filter(|b| serving(b) && b.pool() == p)
                .map(|b| b.weight as u64)
                .sum()
        };
        let weight = |b: &BackendEntry| -> u32 {
            if !serving(b) {
                return 0;
            }
            if self.pools.is_empty() {
                return b.weight;
            }
            let share = self.pools[b.pool()] as u64;
            let w = 10_000 * share * b.weight as u64 / (pool_total * pool_weight(b.pool())).max(1);
            w.clamp(1, MAX_WEIGHT as u64) as u32
        };
        VipSpec {
            id: self.address,
            affinity_src_ip: self.affinity == Some(Affinity::SrcIp),
            ring_size: self.ring_size,
            backends: self
                .backends
                .iter()
                .map(|b| BackendSpec {
                    addr: b.address,
                    weight: weight(b),
                    live: live(b),
                })
                .collect(),
        }
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
    /// Addresses the master holds (IPv4): typically the next hop the router sends the VIPs
    /// to, or the VIPs themselves.
    pub addresses: Vec<std::net::Ipv4Addr>,
    /// Priority lost while the interface is down.
    #[serde(default = "d_penalty")]
    pub track_interface_penalty: u8,
    /// VIPs whose loss of every live backend lowers the priority by `track_vip_penalty`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub track_vips: Vec<VipId>,
    #[serde(default = "d_penalty")]
    pub track_vip_penalty: u8,
}

impl VrrpConfig {
    fn validate(&self, vips: &[Vip]) -> Result<(), Refused> {
        if self.vrid == 0 {
            return Err(Refused::invalid("vrrp.vrid", "must be 1-255"));
        }
        if self.priority == 0 {
            return Err(Refused::invalid(
                "vrrp.priority",
                "must be 1-255 (0 is reserved for a master leaving)",
            ));
        }
        if !(1..=4095).contains(&self.advert_interval_cs) {
            return Err(Refused::invalid(
                "vrrp.advert_interval_cs",
                format!("{} is out of range 1-4095", self.advert_interval_cs),
            ));
        }
        if let Some(i) = &self.interface {
            check_ifname(i).map_err(|m| Refused::invalid("vrrp.interface", m))?;
        }
        if self.addresses.is_empty() || self.addresses.len() > 20 {
            return Err(Refused::invalid(
                "vrrp.addresses",
                "give 1-20 IPv4 addresses for the master to hold",
            ));
        }
        for v in &self.track_vips {
            if !vips.iter().any(|x| x.address == *v) {
                return Err(Refused::invalid(
                    "vrrp.track_vips",
                    format!("VIP {v} does not exist"),
                ));
            }
        }
        Ok(())
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
    #[serde(default, rename = "vip")]
    pub vips: Vec<Vip>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            balancer: BalancerSettings::default(),
            vrrp: None,
            vips: Vec::new(),
        }
    }
}

/// Why a request was refused. `status` is the HTTP status the API answers with.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refused {
    pub status: u16,
    pub message: String,
}

impl Refused {
    pub fn invalid(field: impl fmt::Display, message: impl fmt::Display) -> Self {
        Self {
            status: 400,
            message: format!("{field}: {message}"),
        }
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: 404,
            message: message.into(),
        }
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self {
            status: 409,
            message: message.into(),
        }
    }
}

/// A valid interface name (what the kernel accepts).
pub fn check_ifname(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 15
        || name.contains(['/', ':'])
        || name.contains(char::is_whitespace)
    {
        return Err(format!(
            "{name:?} is not an interface name (1-15 characters, no '/', ':' or spaces)"
        ));
    }
    Ok(())
}

impl State {
    /// Parses a `maglb.toml`. Unknown fields are errors; nothing falls back to defaults.
    pub fn from_toml(text: &str) -> Result<Self, Refused> {
        let s: State = toml::from_str(text).map_err(|e| Refused {
            status: 400,
            message: format!("config: {}", e.to_string().trim()),
        })?;
        s.validate()?;
        Ok(s)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("state serializes to TOML")
    }

    pub fn vip(&self, id: &VipId) -> Option<&Vip> {
        self.vips.iter().find(|v| v.address == *id)
    }

    fn vip_mut(&mut self, id: &VipId) -> Result<&mut Vip, Refused> {
        self.vips
            .iter_mut()
            .find(|v| v.address == *id)
            .ok_or_else(|| {
                Refused::not_found(format!(
                    "VIP {id} does not exist: see `maglb vip list`, or add it with `maglb vip add {id}`"
                ))
            })
    }

    /// Checks the whole state; the first problem found is the error.
    pub fn validate(&self) -> Result<(), Refused> {
        if self.version != STATE_VERSION {
            return Err(Refused::invalid(
                "version",
                format!(
                    "unsupported version {} (this maglb reads {STATE_VERSION})",
                    self.version
                ),
            ));
        }
        let b = &self.balancer;
        if let Some(i) = &b.interface {
            check_ifname(i).map_err(|m| Refused::invalid("balancer.interface", m))?;
        }
        if let Some(mtu) = b.mtu {
            if !(576..=9216).contains(&mtu) {
                return Err(Refused::invalid(
                    "balancer.mtu",
                    format!(
                        "{mtu} is out of range 576-9216 (the MTU of the link toward the backends)"
                    ),
                ));
            }
        }
        if let Some(mac) = &b.nexthop_mac {
            if netdev::parse_mac(mac).is_none() {
                return Err(Refused::invalid(
                    "balancer.nexthop_mac",
                    format!("{mac:?} is not a MAC address (write it as aa:bb:cc:dd:ee:ff)"),
                ));
            }
        }
        if self.vips.len() > MAX_VIPS as usize {
            return Err(Refused::invalid(
                "vip",
                format!("{} VIPs, at most {MAX_VIPS}", self.vips.len()),
            ));
        }
        let mut seen = BTreeSet::new();
        let mut pairs = 0usize;
        for (i, v) in self.vips.iter().enumerate() {
            let field = format!("vip[{i}] {}", v.address);
            if !seen.insert(v.address) {
                return Err(Refused::invalid(
                    field,
                    "listed twice; keep one entry per VIP",
                ));
            }
            let a = v.address.addr;
            if a.is_unspecified() || a.is_multicast() || a.is_loopback() {
                return Err(Refused::invalid(field, "the VIP must be a unicast address"));
            }
            if v.ring_size < 3 || v.ring_size > MAX_RING_SIZE || !maglev::is_prime(v.ring_size) {
                return Err(Refused::invalid(
                    format!("{field}: ring_size"),
                    format!(
                        "{} must be a prime between 3 and {MAX_RING_SIZE} (e.g. 65537)",
                        v.ring_size
                    ),
                ));
            }
            let mut mine = BTreeSet::new();
            for b in &v.backends {
                let bf = format!("{field}: backend {}", b.address);
                if !mine.insert(b.address) {
                    return Err(Refused::invalid(bf, "listed twice for this VIP"));
                }
                if b.weight > MAX_WEIGHT {
                    return Err(Refused::invalid(
                        bf,
                        format!("weight {} is out of range 0-{MAX_WEIGHT}", b.weight),
                    ));
                }
                if b.address.is_unspecified() || b.address.is_multicast() {
                    return Err(Refused::invalid(bf, "a backend must be a unicast address"));
                }
                if a.is_ipv6() && b.address.is_ipv4() {
                    return Err(Refused::invalid(
                        bf,
                        "an IPv4 backend cannot carry an IPv6 VIP's traffic; use an IPv6 address",
                    ));
                }
                if let Some(p) = &b.pool {
                    check_pool(p).map_err(|m| Refused::invalid(format!("{bf}: pool"), m))?;
                }
                if let Some(h) = &b.health {
                    h.validate(&format!("{bf}: health"), v.address.port)?;
                }
                pairs += 1;
            }
            if let Some(h) = &v.health {
                h.validate(&format!("{field}: health"), v.address.port)?;
            }
            for (pool, share) in &v.pools {
                check_pool(pool).map_err(|m| Refused::invalid(format!("{field}: pools"), m))?;
                if *share > 1000 {
                    return Err(Refused::invalid(
                        format!("{field}: pools.{pool}"),
                        format!("share {share} is out of range 0-1000"),
                    ));
                }
                if !v.backends.iter().any(|b| b.pool() == pool) {
                    return Err(Refused::invalid(
                        format!("{field}: pools.{pool}"),
                        format!(
                            "no backend of this VIP is in pool {pool}; add one with `--pool {pool}`"
                        ),
                    ));
                }
            }
            if !v.pools.is_empty() && v.pools.values().all(|w| *w == 0) {
                return Err(Refused::invalid(
                    format!("{field}: pools"),
                    "every share is 0; give one pool a share",
                ));
            }
        }
        if let Some(v) = &self.vrrp {
            v.validate(&self.vips)?;
        }
        if pairs > MAX_BACKENDS as usize {
            return Err(Refused::invalid(
                "vip",
                format!("{pairs} VIP-backend pairs, at most {MAX_BACKENDS}"),
            ));
        }
        Ok(())
    }

    fn checked(self) -> Result<Self, Refused> {
        self.validate()?;
        Ok(self)
    }

    pub fn with_attach(&self, iface: &str, mode: AttachMode) -> Result<Self, Refused> {
        check_ifname(iface).map_err(|m| Refused::invalid("iface", m))?;
        let mut s = self.clone();
        s.balancer.interface = Some(iface.to_owned());
        s.balancer.mode = mode;
        s.checked()
    }

    pub fn with_detach(&self) -> Result<Self, Refused> {
        if self.balancer.interface.is_none() {
            return Err(Refused::conflict("not attached: nothing to detach"));
        }
        let mut s = self.clone();
        s.balancer.interface = None;
        s.checked()
    }

    pub fn with_vip(&self, vip: Vip) -> Result<Self, Refused> {
        if self.vip(&vip.address).is_some() {
            return Err(Refused::conflict(format!(
                "VIP {} already exists: delete it first, or change it with `maglb apply`",
                vip.address
            )));
        }
        let mut s = self.clone();
        s.vips.push(vip);
        s.vips.sort_by(|a, b| a.address.cmp(&b.address));
        s.checked()
    }

    pub fn without_vip(&self, id: &VipId) -> Result<Self, Refused> {
        let mut s = self.clone();
        s.vip_mut(id)?;
        s.vips.retain(|v| v.address != *id);
        s.checked()
    }

    pub fn with_backend(&self, id: &VipId, b: BackendEntry) -> Result<Self, Refused> {
        let mut s = self.clone();
        let v = s.vip_mut(id)?;
        let address = b.address;
        if v.backends.iter().any(|b| b.address == address) {
            return Err(Refused::conflict(format!(
                "backend {address} already belongs to VIP {id}: change its weight with `maglb backend set-weight`"
            )));
        }
        v.backends.push(b);
        v.backends.sort_by(|a, b| a.address.cmp(&b.address));
        s.checked()
    }

    fn backend_mut<'a>(v: &'a mut Vip, address: IpAddr) -> Result<&'a mut BackendEntry, Refused> {
        let id = v.address;
        v.backends
            .iter_mut()
            .find(|b| b.address == address)
            .ok_or_else(|| {
                Refused::not_found(format!(
                    "backend {address} is not a backend of VIP {id}: see `maglb backend list {id}`"
                ))
            })
    }

    pub fn without_backend(&self, id: &VipId, address: IpAddr) -> Result<Self, Refused> {
        let mut s = self.clone();
        let v = s.vip_mut(id)?;
        Self::backend_mut(v, address)?;
        v.backends.retain(|b| b.address != address);
        s.checked()
    }

    pub fn with_weight(&self, id: &VipId, address: IpAddr, weight: u32) -> Result<Self, Refused> {
        let mut s = self.clone();
        let b = Self::backend_mut(s.vip_mut(id)?, address)?;
        b.weight = weight;
        b.state = BackendState::Active;
        s.checked()
    }

    /// Drain, disable, or enable (active) a backend.
    pub fn with_backend_state(
        &self,
        id: &VipId,
        address: IpAddr,
        state: BackendState,
    ) -> Result<Self, Refused> {
        let mut s = self.clone();
        Self::backend_mut(s.vip_mut(id)?, address)?.state = state;
        s.checked()
    }

    /// Sets (or with `None` clears) a VIP's default health check.
    pub fn with_vip_health(&self, id: &VipId, h: Option<HealthCheck>) -> Result<Self, Refused> {
        let mut s = self.clone();
        s.vip_mut(id)?.health = h;
        s.checked()
    }

    /// Sets (or with `None` clears) a backend's own health check.
    pub fn with_backend_health(
        &self,
        id: &VipId,
        address: IpAddr,
        h: Option<HealthCheck>,
    ) -> Result<Self, Refused> {
        let mut s = self.clone();
        Self::backend_mut(s.vip_mut(id)?, address)?.health = h;
        s.checked()
    }

    /// Moves new flows to pool `to`: all of them, or `percent` of them with the pools that
    /// serve now sharing the rest in their current proportions.
    pub fn with_switch(&self, id: &VipId, to: &str, percent: Option<u32>) -> Result<Self, Refused> {
        check_pool(to).map_err(|m| Refused::invalid("to", m))?;
        let mut s = self.clone();
        let v = s.vip_mut(id)?;
        if !v.backends.iter().any(|b| b.pool() == to) {
            return Err(Refused::invalid(
                "to",
                format!(
                    "no backend of VIP {id} is in pool {to}; add one with `maglb backend add {id} ADDR --pool {to}`"
                ),
            ));
        }
        let percent = percent.unwrap_or(100);
        if !(1..=100).contains(&percent) {
            return Err(Refused::invalid(
                "percent",
                format!("{percent} is out of range 1-100"),
            ));
        }
        if percent == 100 {
            v.pools = BTreeMap::from([(to.to_owned(), 100)]);
            return s.checked();
        }
        // The others: the pools that serve now, or, with no split yet, every other pool.
        let mut others: BTreeMap<String, u64> = v
            .pools
            .iter()
            .filter(|(p, w)| p.as_str() != to && **w > 0)
            .map(|(p, w)| (p.clone(), *w as u64))
            .collect();
        if others.is_empty() && v.pools.is_empty() {
            for b in v.backends.iter().filter(|b| b.pool() != to) {
                others.insert(b.pool().to_owned(), 1);
            }
        }
        let total: u64 = others.values().sum();
        if total == 0 {
            return Err(Refused::invalid(
                "percent",
                format!(
                    "no other pool of VIP {id} serves, so there is nothing to split with; switch fully"
                ),
            ));
        }
        let mut pools = BTreeMap::from([(to.to_owned(), percent)]);
        for (p, w) in others {
            pools.insert(
                p,
                ((w * (100 - percent) as u64 + total / 2) / total).max(1) as u32,
            );
        }
        v.pools = pools;
        s.checked()
    }

    /// What changes from `self` to `new`, in words, one line per change.
    pub fn diff(&self, new: &State) -> Vec<String> {
        let mut out = Vec::new();
        let (a, b) = (&self.balancer, &new.balancer);
        match (&a.interface, &b.interface) {
            (None, Some(i)) => out.push(format!("attach to {i} ({})", b.mode)),
            (Some(i), None) => out.push(format!("detach from {i}")),
            (Some(x), Some(y)) if x != y || a.mode != b.mode => {
                out.push(format!("move from {x} to {y} ({})", b.mode))
            }
            _ => {}
        }
        let (mut a2, mut b2) = (a.clone(), b.clone());
        (a2.interface, a2.mode, b2.interface, b2.mode) = (None, b.mode, None, b.mode);
        if a2 != b2 {
            out.push("change balancer settings (mtu, sources, next hop)".to_owned());
        }
        if self.vrrp != new.vrrp {
            out.push(match &new.vrrp {
                Some(v) => format!("VRRP: vrid {} priority {}", v.vrid, v.priority),
                None => "VRRP off".to_owned(),
            });
        }
        for v in &new.vips {
            let Some(old) = self.vip(&v.address) else {
                out.push(format!(
                    "add VIP {} with {} backends",
                    v.address,
                    v.backends.len()
                ));
                continue;
            };
            let id = v.address;
            if old.affinity != v.affinity || old.ring_size != v.ring_size {
                out.push(format!("VIP {id}: affinity/ring size changed"));
            }
            if old.health != v.health {
                out.push(format!(
                    "VIP {id}: health check {} -> {}",
                    kind(&old.health),
                    kind(&v.health)
                ));
            }
            if old.pools != v.pools {
                out.push(format!("VIP {id}: new flows to {}", pools(&v.pools)));
            }
            for nb in &v.backends {
                let Some(ob) = old.backends.iter().find(|o| o.address == nb.address) else {
                    continue;
                };
                if ob.backup != nb.backup || ob.pool != nb.pool {
                    out.push(format!(
                        "VIP {id}: backend {} is now {} in pool {}",
                        nb.address,
                        if nb.backup { "a backup" } else { "a primary" },
                        nb.pool()
                    ));
                }
                if ob.health != nb.health {
                    out.push(format!(
                        "VIP {id}: backend {} health check {} -> {}",
                        nb.address,
                        kind(&ob.health),
                        kind(&nb.health)
                    ));
                }
            }
            for nb in &v.backends {
                match old.backends.iter().find(|o| o.address == nb.address) {
                    None => out.push(format!(
                        "VIP {id}: add backend {} (weight {})",
                        nb.address, nb.weight
                    )),
                    Some(ob) if ob.state != nb.state => out.push(format!(
                        "VIP {id}: backend {} {} -> {}",
                        nb.address, ob.state, nb.state
                    )),
                    Some(ob) if ob.weight != nb.weight => out.push(format!(
                        "VIP {id}: backend {} weight {} -> {}",
                        nb.address, ob.weight, nb.weight
                    )),
                    _ => {}
                }
            }
            for ob in &old.backends {
                if !v.backends.iter().any(|b| b.address == ob.address) {
                    out.push(format!("VIP {id}: delete backend {}", ob.address));
                }
            }
        }
        for v in &self.vips {
            if new.vip(&v.address).is_none() {
                out.push(format!("delete VIP {}", v.address));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> VipId {
        s.parse().unwrap()
    }

    const EXAMPLE: &str = r#"
[balancer]
interface = "eth0"
mode = "native"
mtu = 1500
nexthop = "10.0.0.1"

[[vip]]
address = "10.200.0.1:80/tcp"

  [[vip.backend]]
  address = "10.10.3.11"
  weight = 2

  [[vip.backend]]
  address = "10.10.3.12"
  state = "drain"

[[vip]]
address = "[fd20::1]:0/udp"
affinity = "src-ip"
ring_size = 251
backend = [{ address = "fd10:3::11" }]
"#;

    #[test]
    fn toml_round_trip() {
        let s = State::from_toml(EXAMPLE).unwrap();
        assert_eq!(s.vips.len(), 2);
        assert_eq!(s.vips[0].backends[0].weight, 2);
        assert_eq!(s.vips[0].backends[1].state, BackendState::Drain);
        assert_eq!(s.vips[0].backends[1].weight, 1);
        assert_eq!(s.vips[1].affinity, Some(Affinity::SrcIp));
        assert_eq!(State::from_toml(&s.to_toml()).unwrap(), s);
        let spec = s.vips[0].spec(|_| true);
        assert_eq!(
            spec.backends[1].weight, 0,
            "drained backend takes no new flows"
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let cases = [
            ("[balancer]\ninterfce = \"eth0\"", "unknown field"),
            ("[[vip]]\naddress = \"10.0.0.1:80\"", "missing /tcp"),
            ("[[vip]]\naddress = \"10.0.0.1:99999/tcp\"", "port"),
            (
                "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nring_size = 65536",
                "ring_size",
            ),
            (
                "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nbackend = [{address = \"10.1.0.1\", weight = 70000}]",
                "weight 70000",
            ),
            (
                "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nbackend = [{address = \"10.1.0.1\"}, {address = \"10.1.0.1\"}]",
                "listed twice",
            ),
            (
                "[[vip]]\naddress = \"[fd00::1]:80/tcp\"\nbackend = [{address = \"10.1.0.1\"}]",
                "IPv4 backend",
            ),
            (
                "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\n[[vip]]\naddress = \"10.0.0.1:80/tcp\"",
                "listed twice",
            ),
            ("[balancer]\nnexthop_mac = \"zz\"", "nexthop_mac"),
            ("[balancer]\nmtu = 100", "balancer.mtu"),
            ("[balancer]\ninterface = \"a/b\"", "interface"),
            ("version = 2", "unsupported version"),
            (
                "[[vip]]\naddress = \"10.0.0.1:80/tcp\"\nbackend = [{address = \"not-an-ip\"}]",
                "invalid",
            ),
        ];
        for (text, want) in cases {
            let err = State::from_toml(text).unwrap_err();
            assert!(err.message.contains(want), "{text:?}: {err}");
            assert_eq!(err.status, 400);
        }
    }

    #[test]
    fn operations_validate_and_leave_the_state_unchanged_on_error() {
        let s0 = State::default();
        let v = id("10.0.0.1:80/tcp");
        let s1 = s0.with_vip(Vip::new(v)).unwrap();
        assert_eq!(s1.with_vip(Vip::new(v)).unwrap_err().status, 409);
        let b: IpAddr = "10.1.0.1".parse().unwrap();
        let s2 = s1.with_backend(&v, BackendEntry::new(b, 3)).unwrap();
        assert_eq!(
            s2.with_backend(&v, BackendEntry::new(b, 1))
                .unwrap_err()
                .status,
            409
        );
        assert_eq!(
            s2.with_weight(&v, b, MAX_WEIGHT + 1).unwrap_err().status,
            400
        );
        let other = id("10.0.0.2:80/tcp");
        assert_eq!(
            s2.with_backend(&other, BackendEntry::new(b, 1))
                .unwrap_err()
                .status,
            404
        );
        assert_eq!(
            s2.without_backend(&v, "10.9.9.9".parse().unwrap())
                .unwrap_err()
                .status,
            404
        );
        let s3 = s2.with_backend_state(&v, b, BackendState::Drain).unwrap();
        assert_eq!(s3.vips[0].backends[0].state, BackendState::Drain);
        let s4 = s3.with_weight(&v, b, 5).unwrap();
        assert_eq!(s4.vips[0].backends[0].state, BackendState::Active);
        assert_eq!(s4.without_vip(&v).unwrap(), s0);
        assert_eq!(s0.with_detach().unwrap_err().status, 409);
        assert_eq!(
            s0.with_attach("a b", AttachMode::Native)
                .unwrap_err()
                .status,
            400
        );
        // Untouched by all the refusals above.
        assert_eq!(s2.vips[0].backends[0].weight, 3);
    }

    #[test]
    fn diff_says_what_changes() {
        let a = State::from_toml(EXAMPLE).unwrap();
        let mut b = a.clone();
        b.vips[0].backends[0].weight = 9;
        b.vips.remove(1);
        b.vips.push(Vip::new(id("10.9.0.1:53/udp")));
        b.vips[0].backends[1].state = BackendState::Active;
        b.balancer.interface = None;
        let d = a.diff(&b);
        assert_eq!(
            d,
            [
                "detach from eth0",
                "VIP 10.200.0.1:80/tcp: backend 10.10.3.11 weight 2 -> 9",
                "VIP 10.200.0.1:80/tcp: backend 10.10.3.12 drain -> active",
                "add VIP 10.9.0.1:53/udp with 0 backends",
                "delete VIP [fd20::1]:0/udp",
            ]
        );
        assert!(a.diff(&a).is_empty());
    }

    fn vip3() -> Vip {
        let mut v = Vip::new(id("10.0.0.1:80/tcp"));
        for (i, pool) in ["blue", "blue", "green"].iter().enumerate() {
            let mut b = BackendEntry::new(format!("10.1.0.{i}").parse().unwrap(), 1);
            b.pool = Some(pool.to_string());
            v.backends.push(b);
        }
        v
    }

    fn weights(v: &Vip, up: impl Fn(&IpAddr) -> bool) -> Vec<(u32, bool)> {
        v.spec(up)
            .backends
            .iter()
            .map(|b| (b.weight, b.live))
            .collect()
    }

    #[test]
    fn spec_follows_health_state_backups_and_pools() {
        let all = |_: &IpAddr| true;
        let mut v = vip3();
        assert_eq!(weights(&v, all), [(1, true), (1, true), (1, true)]);
        // Down: not live. Disabled: not live. Drained: live, no weight.
        let down0 = |a: &IpAddr| a.to_string() != "10.1.0.0";
        assert_eq!(weights(&v, down0), [(0, false), (1, true), (1, true)]);
        v.backends[1].state = BackendState::Disabled;
        v.backends[2].state = BackendState::Drain;
        assert_eq!(weights(&v, all), [(1, true), (0, false), (0, true)]);
        // Backups serve only while no primary is up; then all of them share.
        let mut v = vip3();
        v.backends[2].backup = true;
        assert_eq!(weights(&v, all), [(1, true), (1, true), (0, true)]);
        let primaries_down = |a: &IpAddr| a.to_string() == "10.1.0.2";
        assert_eq!(
            weights(&v, primaries_down),
            [(0, false), (0, false), (1, true)]
        );
        // Pools: only the active pool takes new flows; splits give shares by pool.
        let mut v = vip3();
        v.pools = BTreeMap::from([("blue".into(), 100)]);
        assert_eq!(weights(&v, all), [(5000, true), (5000, true), (0, true)]);
        v.pools = BTreeMap::from([("blue".into(), 75), ("green".into(), 25)]);
        assert_eq!(weights(&v, all), [(3750, true), (3750, true), (2500, true)]);
        // A down backend's share goes to the rest of its pool.
        assert_eq!(weights(&v, down0), [(0, false), (7500, true), (2500, true)]);
    }

    #[test]
    fn switch_moves_all_or_part_of_the_new_flows() {
        let v = vip3();
        let s = State::default().with_vip(v).unwrap();
        let id = id("10.0.0.1:80/tcp");
        let s1 = s.with_switch(&id, "blue", None).unwrap();
        assert_eq!(s1.vips[0].pools, BTreeMap::from([("blue".into(), 100)]));
        let s2 = s1.with_switch(&id, "green", Some(5)).unwrap();
        assert_eq!(
            s2.vips[0].pools,
            BTreeMap::from([("blue".into(), 95), ("green".into(), 5)])
        );
        let s3 = s2.with_switch(&id, "green", Some(25)).unwrap();
        assert_eq!(
            s3.vips[0].pools,
            BTreeMap::from([("blue".into(), 75), ("green".into(), 25)])
        );
        let s4 = s3.with_switch(&id, "green", None).unwrap();
        assert_eq!(s4.vips[0].pools, BTreeMap::from([("green".into(), 100)]));
        // Rolling back is the same command.
        assert_eq!(s4.with_switch(&id, "blue", None).unwrap(), s1);
        assert_eq!(s1.with_switch(&id, "red", None).unwrap_err().status, 400);
        assert_eq!(
            s1.with_switch(&id, "blue", Some(50)).unwrap_err().status,
            400
        );
    }

    #[test]
    fn health_checks_are_validated() {
        let mut v = Vip::new(id("10.0.0.1:0/tcp"));
        v.health = Some(HealthCheck {
            kind: ProbeKind::Tcp,
            ..HealthCheck::default()
        });
        let err = State::default().with_vip(v.clone()).unwrap_err();
        assert!(err.message.contains("health.port"), "{err}");
        v.health.as_mut().unwrap().port = Some(80);
        assert!(State::default().with_vip(v.clone()).is_ok());
        for (mutate, want) in [
            (
                Box::new(|h: &mut HealthCheck| h.timeout_ms = 5000)
                    as Box<dyn Fn(&mut HealthCheck)>,
                "timeout_ms",
            ),
            (Box::new(|h: &mut HealthCheck| h.fall = 0), "fall"),
            (
                Box::new(|h: &mut HealthCheck| {
                    h.kind = ProbeKind::Http;
                    h.expect_status = "2xx".into()
                }),
                "expect_status",
            ),
            (
                Box::new(|h: &mut HealthCheck| {
                    h.kind = ProbeKind::Http;
                    h.path = "healthz".into()
                }),
                "path",
            ),
        ] {
            let mut w = v.clone();
            mutate(w.health.as_mut().unwrap());
            let err = State::default().with_vip(w).unwrap_err();
            assert!(err.message.contains(want), "{want}: {err}");
        }
        assert_eq!(
            parse_statuses("200,204, 300-399").unwrap(),
            [(200, 200), (204, 204), (300, 399)]
        );
    }
}
