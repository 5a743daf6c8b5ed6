//! Who may start flows to a VIP, and how fast: per-source rate limits, a cap on the VIP's new
//! flows, and source prefix lists. The datapath applies them to new flows only; established
//! flows are never limited.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Serialize};

/// A new-flow rate: a token bucket of `burst` flows refilled at `new_flows_per_s`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// New flows per second (at least 1).
    pub new_flows_per_s: u32,
    /// Flows admitted at once after a quiet period (at least 1).
    pub burst: u32,
}

/// A source prefix: `10.0.0.0/8`, `2001:db8::/32` (host bits are ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Prefix {
    pub addr: IpAddr,
    pub len: u8,
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

impl FromStr for Prefix {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a prefix (ADDRESS/LENGTH, e.g. 10.0.0.0/8)");
        let (a, l) = s.split_once('/').ok_or_else(bad)?;
        let addr: IpAddr = a.parse().map_err(|_| bad())?;
        let len: u8 = l.parse().map_err(|_| bad())?;
        if len > if addr.is_ipv4() { 32 } else { 128 } {
            return Err(bad());
        }
        Ok(Self { addr, len })
    }
}

impl TryFrom<String> for Prefix {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Prefix> for String {
    fn from(p: Prefix) -> String {
        p.to_string()
    }
}

/// What the datapath applies to a VIP's new flows.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Per source /32 or /64.
    pub rate_limit: Option<RateLimit>,
    /// All sources together.
    pub new_flow_cap: Option<RateLimit>,
    /// With an allow list, only matching sources start flows.
    pub allow: Vec<Prefix>,
    /// Matching sources never start flows. The longest matching prefix decides.
    pub deny: Vec<Prefix>,
}

/// How packets reach the backends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encap {
    /// IP-in-IP (an IPv4 or IPv6 outer header).
    #[default]
    Ipip,
    /// GUE variant 1: outer IP and UDP to `gue_port` from a per-flow source port, so the
    /// backends' NICs spread flows over their queues (RSS). 8 bytes more per packet.
    Gue,
}

impl fmt::Display for Encap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encap::Ipip => "ipip",
            Encap::Gue => "gue",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_print() {
        let p: Prefix = "10.1.0.0/16".parse().unwrap();
        assert_eq!((p.to_string(), p.len), ("10.1.0.0/16".into(), 16));
        assert_eq!("2001:db8::/32".parse::<Prefix>().unwrap().len, 32);
        for bad in ["10.1.0.0", "10.1.0.0/33", "x/8", "2001:db8::/129"] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
    }
}
