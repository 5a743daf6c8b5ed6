//! The one validation of a desired state: every path that changes the state (CLI, API,
//! `apply`, the state file read at start) ends here, and the first problem found is the
//! error.

use std::{collections::BTreeSet, net::IpAddr};

use lb_common::{
    CONNTRACK_BYTES_PER_ENTRY, MAX_BACKENDS, MAX_CONNTRACK_ENTRIES, MAX_RING_SIZE, MAX_VIPS,
    MIN_CONNTRACK_ENTRIES, PREFIX_ENTRIES,
};

use super::{
    BackendEntry, BalancerSettings, BgpConfig, HealthCheck, MAX_WEIGHT, Policy, ProbeKind, Refusal,
    STATE_VERSION, State, Vip, VipId, VrrpConfig,
    vip_id::{backend_addr_problem, vip_addr_problem},
};
use crate::{addr, maglev};

impl State {
    /// Checks the whole state; the first problem found is the error.
    pub fn validate(&self) -> Result<(), Refusal> {
        if self.version != STATE_VERSION {
            return Err(Refusal::invalid(
                "version",
                format!(
                    "unsupported version {} (this maglb reads {STATE_VERSION})",
                    self.version
                ),
            ));
        }
        validate_balancer(&self.balancer)?;
        if self.vips.len() > MAX_VIPS as usize {
            return Err(Refusal::invalid(
                "vip",
                format!("{} VIPs, at most {MAX_VIPS}", self.vips.len()),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, v) in self.vips.iter().enumerate() {
            let field = format!("vip[{i}] {}", v.address);
            if !seen.insert(v.address) {
                return Err(Refusal::invalid(
                    field,
                    "listed twice; keep one entry per VIP",
                ));
            }
            v.validate(&field)?;
        }
        validate_prefix_totals(&self.vips)?;
        if let Some(v) = &self.vrrp {
            v.validate(&self.vips)?;
        }
        if let Some(b) = &self.bgp {
            b.validate()?;
        }
        let pairs: usize = self.vips.iter().map(|v| v.backends.len()).sum();
        if pairs > MAX_BACKENDS as usize {
            return Err(Refusal::invalid(
                "vip",
                format!("{pairs} VIP-backend pairs, at most {MAX_BACKENDS}"),
            ));
        }
        Ok(())
    }
}

/// The `[balancer]` section.
fn validate_balancer(b: &BalancerSettings) -> Result<(), Refusal> {
    if let Some(i) = &b.interface {
        check_ifname(i).map_err(|m| Refusal::invalid("balancer.interface", m))?;
    }
    if let Some(mtu) = b.mtu
        && !(576..=9216).contains(&mtu)
    {
        return Err(Refusal::invalid(
            "balancer.mtu",
            format!("{mtu} is out of range 576-9216 (the MTU of the link toward the backends)"),
        ));
    }
    if let Some(mac) = &b.nexthop_mac
        && addr::parse_mac(mac).is_none()
    {
        return Err(Refusal::invalid(
            "balancer.nexthop_mac",
            format!("{mac:?} is not a MAC address (write it as aa:bb:cc:dd:ee:ff)"),
        ));
    }
    validate_datapath_settings(b)
}

/// The source prefixes (allow and deny) of all VIPs, per family, against the datapath's
/// prefix tries.
fn validate_prefix_totals(vips: &[Vip]) -> Result<(), Refusal> {
    for (family, max) in [(4, PREFIX_ENTRIES), (6, PREFIX_ENTRIES)] {
        let n: usize = vips
            .iter()
            .flat_map(|v| v.allow.iter().chain(&v.deny))
            .filter(|p| (p.addr.is_ipv4()) == (family == 4))
            .count();
        if n > max as usize {
            return Err(Refusal::invalid(
                "vip",
                format!(
                    "{n} IPv{family} source prefixes (allow and deny), at most {max} over all VIPs"
                ),
            ));
        }
    }
    Ok(())
}

impl Vip {
    /// One VIP (`field` names it in errors): its address, ring, backends, check, policy
    /// and pools.
    fn validate(&self, field: &str) -> Result<(), Refusal> {
        if let Some(why) = vip_addr_problem(self.address.addr) {
            return Err(Refusal::invalid(field, why));
        }
        if self.ring_size < 3 || self.ring_size > MAX_RING_SIZE || !maglev::is_prime(self.ring_size)
        {
            return Err(Refusal::invalid(
                format!("{field}: ring_size"),
                format!(
                    "{} must be a prime between 3 and {MAX_RING_SIZE} (e.g. 65537)",
                    self.ring_size
                ),
            ));
        }
        let mut mine = BTreeSet::new();
        for b in &self.backends {
            if !mine.insert(b.address) {
                let bf = format!("{field}: backend {}", b.address);
                return Err(Refusal::invalid(bf, "listed twice for this VIP"));
            }
            b.validate(field, self.address)?;
        }
        if let Some(h) = &self.health {
            h.validate(&format!("{field}: health"), self.address.port)?;
        }
        validate_policy(&self.policy(), self.address.addr.is_ipv4(), field)?;
        self.validate_pools(field)
    }

    /// The pools' shares, each for a pool that has a backend of this VIP.
    fn validate_pools(&self, field: &str) -> Result<(), Refusal> {
        for (pool, share) in &self.pools {
            check_pool(pool).map_err(|m| Refusal::invalid(format!("{field}: pools"), m))?;
            if *share > 1000 {
                return Err(Refusal::invalid(
                    format!("{field}: pools.{pool}"),
                    format!("share {share} is out of range 0-1000"),
                ));
            }
            if !self.backends.iter().any(|b| b.pool() == pool) {
                return Err(Refusal::invalid(
                    format!("{field}: pools.{pool}"),
                    format!(
                        "no backend of this VIP is in pool {pool}; add one with `--pool {pool}`"
                    ),
                ));
            }
        }
        if !self.pools.is_empty() && self.pools.values().all(|w| *w == 0) {
            return Err(Refusal::invalid(
                format!("{field}: pools"),
                "every share is 0; give one pool a share",
            ));
        }
        Ok(())
    }
}

impl BackendEntry {
    /// One backend of the VIP `vip` (`field` names the VIP in errors).
    fn validate(&self, field: &str, vip: VipId) -> Result<(), Refusal> {
        // Named only when something is wrong: a VIP may have thousands of backends.
        let bf = || format!("{field}: backend {}", self.address);
        if self.weight > MAX_WEIGHT {
            return Err(Refusal::invalid(
                bf(),
                format!("weight {} is out of range 0-{MAX_WEIGHT}", self.weight),
            ));
        }
        if let Some(why) = backend_addr_problem(self.address) {
            return Err(Refusal::invalid(bf(), why));
        }
        if vip.addr.is_ipv6() && self.address.is_ipv4() {
            return Err(Refusal::invalid(
                bf(),
                "an IPv4 backend cannot carry an IPv6 VIP's traffic; use an IPv6 address",
            ));
        }
        if let Some(p) = &self.pool {
            check_pool(p).map_err(|m| Refusal::invalid(format!("{}: pool", bf()), m))?;
        }
        if let Some(h) = &self.health {
            h.validate(&format!("{}: health", bf()), vip.port)?;
        }
        Ok(())
    }
}

impl HealthCheck {
    fn validate(&self, field: &str, vip_port: u16) -> Result<(), Refusal> {
        let f = |what: &str| format!("{field}.{what}");
        if self.kind == ProbeKind::None {
            return Ok(());
        }
        if !(100..=3_600_000).contains(&self.interval_ms) {
            return Err(Refusal::invalid(
                f("interval_ms"),
                format!("{} is out of range 100-3600000", self.interval_ms),
            ));
        }
        if self.timeout_ms < 10 || self.timeout_ms > self.interval_ms {
            return Err(Refusal::invalid(
                f("timeout_ms"),
                format!(
                    "{} must be between 10 and interval_ms ({})",
                    self.timeout_ms, self.interval_ms
                ),
            ));
        }
        for (name, v) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=100).contains(&v) {
                return Err(Refusal::invalid(
                    f(name),
                    format!("{v} is out of range 1-100"),
                ));
            }
        }
        if self.port.unwrap_or(vip_port) == 0 {
            return Err(Refusal::invalid(
                f("port"),
                "the VIP takes all ports, so the check needs a port: set health.port",
            ));
        }
        if matches!(self.kind, ProbeKind::Http | ProbeKind::Https) {
            if !self.path.starts_with('/') || self.path.contains(char::is_whitespace) {
                return Err(Refusal::invalid(
                    f("path"),
                    format!("{:?} must start with / and have no spaces", self.path),
                ));
            }
            parse_statuses(&self.expect_status)
                .map_err(|m| Refusal::invalid(f("expect_status"), m))?;
            if self
                .host
                .as_deref()
                .is_some_and(|h| h.is_empty() || h.contains(char::is_whitespace))
            {
                return Err(Refusal::invalid(
                    f("host"),
                    "must be a host name without spaces",
                ));
            }
        }
        if let Some(ca) = &self.tls_ca
            && (self.kind != ProbeKind::Https || !ca.starts_with('/'))
        {
            return Err(Refusal::invalid(
                f("tls_ca"),
                "an absolute path to a PEM file, for kind = \"https\"",
            ));
        }
        if self.tls_insecure && self.kind != ProbeKind::Https {
            return Err(Refusal::invalid(
                f("tls_insecure"),
                "only for kind = \"https\"",
            ));
        }
        for (name, v) in [
            ("body_contains", &self.body_contains),
            ("payload", &self.payload),
        ] {
            if v.as_ref().is_some_and(|v| v.len() > 1024) {
                return Err(Refusal::invalid(f(name), "at most 1024 bytes"));
            }
        }
        Ok(())
    }
}

impl VrrpConfig {
    fn validate(&self, vips: &[Vip]) -> Result<(), Refusal> {
        if self.vrid == 0 {
            return Err(Refusal::invalid("vrrp.vrid", "must be 1-255"));
        }
        if self.priority == 0 {
            return Err(Refusal::invalid(
                "vrrp.priority",
                "must be 1-255 (0 is reserved for a master leaving)",
            ));
        }
        if !(1..=4095).contains(&self.advert_interval_cs) {
            return Err(Refusal::invalid(
                "vrrp.advert_interval_cs",
                format!("{} is out of range 1-4095", self.advert_interval_cs),
            ));
        }
        if let Some(i) = &self.interface {
            check_ifname(i).map_err(|m| Refusal::invalid("vrrp.interface", m))?;
        }
        if self.addresses.is_empty() || self.addresses.len() > 20 {
            return Err(Refusal::invalid(
                "vrrp.addresses",
                "give 1-20 addresses for the master to hold",
            ));
        }
        if self
            .addresses
            .iter()
            .any(|a| a.is_ipv4() != self.addresses[0].is_ipv4())
        {
            return Err(Refusal::invalid(
                "vrrp.addresses",
                "all IPv4 or all IPv6: VRRP runs one instance per family (use a second \
                 balancer pair, or keepalived, for the other family)",
            ));
        }
        if let Some(a) = self.addresses.iter().find(|a| {
            a.is_unspecified()
                || a.is_multicast()
                || a.is_loopback()
                || matches!(a, IpAddr::V6(v) if v.is_unicast_link_local())
        }) {
            return Err(Refusal::invalid(
                "vrrp.addresses",
                format!("{a} cannot be a VRRP address (give a unicast, non-link-local address)"),
            ));
        }

        for v in &self.track_vips {
            if !vips.iter().any(|x| x.address == *v) {
                return Err(Refusal::invalid(
                    "vrrp.track_vips",
                    format!("VIP {v} does not exist"),
                ));
            }
        }
        Ok(())
    }
}

impl BgpConfig {
    fn validate(&self) -> Result<(), Refusal> {
        if matches!(self.table, 0 | 253..=255) {
            return Err(Refusal::invalid(
                "bgp.table",
                format!(
                    "{} is a table the kernel uses (0 unspec, 253 default, 254 main, 255 local); \
                     give a table of maglb's own, e.g. 4242",
                    self.table
                ),
            ));
        }
        if self.min_live_backends == 0 || self.min_live_backends > 1024 {
            return Err(Refusal::invalid(
                "bgp.min_live_backends",
                format!("{} is out of range 1-1024", self.min_live_backends),
            ));
        }
        if self.announce_hold_ms > 60_000 {
            return Err(Refusal::invalid(
                "bgp.announce_hold_ms",
                format!("{} is out of range 0-60000", self.announce_hold_ms),
            ));
        }
        if self.withdraw_wait_ms > 60_000 {
            return Err(Refusal::invalid(
                "bgp.withdraw_wait_ms",
                format!("{} is out of range 0-60000", self.withdraw_wait_ms),
            ));
        }
        if let Some(i) = &self.interface {
            check_ifname(i).map_err(|m| Refusal::invalid("bgp.interface", m))?;
        }
        Ok(())
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

/// The datapath's settings in `[balancer]`.
fn validate_datapath_settings(b: &BalancerSettings) -> Result<(), Refusal> {
    if let Some(n) = b.conntrack_entries
        && !(MIN_CONNTRACK_ENTRIES..=MAX_CONNTRACK_ENTRIES).contains(&n)
    {
        return Err(Refusal::invalid(
            "balancer.conntrack_entries",
            format!(
                "{n} is out of range {MIN_CONNTRACK_ENTRIES}-{MAX_CONNTRACK_ENTRIES} (each entry \
                 takes about {CONNTRACK_BYTES_PER_ENTRY} bytes of kernel memory)"
            ),
        ));
    }
    if b.gue_port == Some(0) {
        return Err(Refusal::invalid("balancer.gue_port", "0 is not a port"));
    }
    Ok(())
}

/// A VIP's rate limits and source prefixes (`v4`: the VIP's family).
pub fn validate_policy(p: &Policy, v4: bool, field: &str) -> Result<(), Refusal> {
    for (name, r) in [
        ("rate_limit", p.rate_limit),
        ("new_flow_cap", p.new_flow_cap),
    ] {
        if let Some(r) = r
            && (r.new_flows_per_s == 0 || r.burst == 0)
        {
            return Err(Refusal::invalid(
                format!("{field}: {name}"),
                format!(
                    "{} new flows/s with burst {}: both must be at least 1 (remove {name} for no limit)",
                    r.new_flows_per_s, r.burst
                ),
            ));
        }
    }
    for (name, list) in [("allow", &p.allow), ("deny", &p.deny)] {
        let mut seen = BTreeSet::new();
        for p in list {
            if p.addr.is_ipv4() != v4 {
                return Err(Refusal::invalid(
                    format!("{field}: {name}"),
                    format!("{p} is not of the VIP's address family, so no client can match it"),
                ));
            }
            if !seen.insert(*p) {
                return Err(Refusal::invalid(
                    format!("{field}: {name}"),
                    format!("{p} is listed twice"),
                ));
            }
        }
    }
    Ok(())
}
