//! The desired state: which interface the balancer is attached to, its settings, the VIPs
//! and their backends. One schema serves the agent's state file (JSON) and the operator's
//! `maglb.toml` (TOML). Operations are pure: they return a new state, validated whole, or an
//! error that names the field and the fix, and leave the old one untouched.

use std::{
    collections::BTreeSet,
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
    /// Takes new flows in proportion to its weight.
    #[default]
    Active,
    /// Takes no new flows; its established flows stay until they end.
    Drain,
}

impl fmt::Display for BackendState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendState::Active => "active",
            BackendState::Drain => "drain",
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

/// A backend of a VIP (`[[vip.backend]]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendEntry {
    pub address: IpAddr,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default, skip_serializing_if = "is_active")]
    pub state: BackendState,
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
    #[serde(default, rename = "backend")]
    pub backends: Vec<BackendEntry>,
}

impl Vip {
    pub fn new(address: VipId) -> Self {
        Self {
            address,
            affinity: None,
            ring_size: DEFAULT_RING_SIZE,
            backends: Vec::new(),
        }
    }

    /// What the datapath needs: drained backends keep their slot (weight 0) so their
    /// established flows are still honoured.
    pub fn spec(&self) -> VipSpec {
        VipSpec {
            id: self.address,
            affinity_src_ip: self.affinity == Some(Affinity::SrcIp),
            ring_size: self.ring_size,
            backends: self
                .backends
                .iter()
                .map(|b| BackendSpec {
                    addr: b.address,
                    weight: if b.state == BackendState::Drain {
                        0
                    } else {
                        b.weight
                    },
                })
                .collect(),
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
    #[serde(default, rename = "vip")]
    pub vips: Vec<Vip>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            version: STATE_VERSION,
            balancer: BalancerSettings::default(),
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
        let mut all_backends = BTreeSet::new();
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
                all_backends.insert(b.address);
            }
        }
        if all_backends.len() > MAX_BACKENDS as usize {
            return Err(Refused::invalid(
                "vip",
                format!(
                    "{} distinct backends, at most {MAX_BACKENDS}",
                    all_backends.len()
                ),
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

    pub fn with_backend(&self, id: &VipId, address: IpAddr, weight: u32) -> Result<Self, Refused> {
        let mut s = self.clone();
        let v = s.vip_mut(id)?;
        if v.backends.iter().any(|b| b.address == address) {
            return Err(Refused::conflict(format!(
                "backend {address} already belongs to VIP {id}: change its weight with `maglb backend set-weight`"
            )));
        }
        v.backends.push(BackendEntry {
            address,
            weight,
            state: BackendState::Active,
        });
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

    pub fn with_drain(&self, id: &VipId, address: IpAddr) -> Result<Self, Refused> {
        let mut s = self.clone();
        Self::backend_mut(s.vip_mut(id)?, address)?.state = BackendState::Drain;
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
        let spec = s.vips[0].spec();
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
        let s2 = s1.with_backend(&v, b, 3).unwrap();
        assert_eq!(s2.with_backend(&v, b, 1).unwrap_err().status, 409);
        assert_eq!(
            s2.with_weight(&v, b, MAX_WEIGHT + 1).unwrap_err().status,
            400
        );
        let other = id("10.0.0.2:80/tcp");
        assert_eq!(s2.with_backend(&other, b, 1).unwrap_err().status, 404);
        assert_eq!(
            s2.without_backend(&v, "10.9.9.9".parse().unwrap())
                .unwrap_err()
                .status,
            404
        );
        let s3 = s2.with_drain(&v, b).unwrap();
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
}
