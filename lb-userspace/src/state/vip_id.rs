//! A VIP's identity, `ADDR:PORT/tcp|udp`, and which addresses may be VIPs.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    str::FromStr,
};

use lb_common::{PROTO_TCP, PROTO_UDP};

/// Transport protocol of a VIP.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            PROTO_TCP => Some(Proto::Tcp),
            PROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

/// A VIP's identity: `ADDR:PORT/tcp|udp` (IPv6 as `[ADDR]:PORT/tcp`); port 0 is all ports.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct VipId {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

/// A VIP written wrongly.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid VIP {input:?}: {why}")]
pub struct BadVipId {
    pub input: String,
    pub why: String,
}

impl fmt::Display for VipId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        };
        match self.addr {
            IpAddr::V4(a) => write!(f, "{a}:{}/{proto}", self.port),
            IpAddr::V6(a) => write!(f, "[{a}]:{}/{proto}", self.port),
        }
    }
}

impl TryFrom<String> for VipId {
    type Error = BadVipId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<VipId> for String {
    fn from(v: VipId) -> String {
        v.to_string()
    }
}

impl FromStr for VipId {
    type Err = BadVipId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| BadVipId {
            input: s.into(),
            why: why.into(),
        };
        let (hostport, proto) = s
            .rsplit_once('/')
            .ok_or_else(|| bad("missing /tcp or /udp"))?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(bad("protocol must be tcp or udp")),
        };
        let sa: SocketAddr = hostport
            .parse()
            .map_err(|_| bad("expected ADDR:PORT (IPv6 as [ADDR]:PORT), port 0-65535"))?;
        if let SocketAddr::V6(v6) = sa
            && v6.scope_id() != 0
        {
            return Err(bad(
                "a scope (%...) is not allowed: a VIP is a global address, not a link-local one",
            ));
        }
        Ok(VipId {
            addr: sa.ip(),
            port: sa.port(),
            proto,
        })
    }
}

/// Why `a` cannot be a VIP address, if it cannot: only global unicast addresses can.
pub fn vip_addr_problem(a: IpAddr) -> Option<&'static str> {
    match a {
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address cannot be a VIP"),
        IpAddr::V4(v4) if v4.is_link_local() => Some("a link-local address cannot be a VIP"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => Some(
            "an IPv4-mapped IPv6 address cannot be a VIP; write the IPv4 address (e.g. 10.200.0.1:80/tcp)",
        ),
        IpAddr::V6(v6) if v6.is_unicast_link_local() => {
            Some("a link-local address cannot be a VIP")
        }
        _ if a.is_unspecified() => Some("the unspecified address cannot be a VIP"),
        _ if a.is_multicast() => Some("a multicast address cannot be a VIP"),
        _ if a.is_loopback() => Some("a loopback address cannot be a VIP"),
        _ => None,
    }
}

/// Why `a` cannot be a backend address, if it cannot.
pub fn backend_addr_problem(a: IpAddr) -> Option<&'static str> {
    match a {
        IpAddr::V4(v4) if v4.is_broadcast() => Some("the broadcast address cannot be a backend"),
        IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some() => {
            Some("an IPv4-mapped IPv6 address cannot be a backend; write the IPv4 address")
        }
        _ if a.is_unspecified() || a.is_multicast() => Some("a backend must be a unicast address"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vip_ids_parse_and_print() {
        let v: VipId = "10.0.0.1:80/tcp".parse().unwrap();
        assert_eq!(v.port, 80);
        assert_eq!(v.proto, Proto::Tcp);
        assert_eq!(v.to_string(), "10.0.0.1:80/tcp");
        let v: VipId = "[fd00::1]:0/udp".parse().unwrap();
        assert_eq!(v.to_string(), "[fd00::1]:0/udp");
        for bad in [
            "10.0.0.1:80",
            "10.0.0.1:80/sctp",
            "10.0.0.1/tcp",
            "10.0.0.1:70000/tcp",
            "fd00::1:80/tcp",
            "host:80/tcp",
            "[fe80::1%2]:80/tcp",
        ] {
            assert!(bad.parse::<VipId>().is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn odd_addresses_are_not_vips() {
        for (a, want) in [
            ("255.255.255.255", "broadcast"),
            ("::ffff:10.200.0.1", "IPv4-mapped"),
            ("fe80::1", "link-local"),
            ("169.254.1.1", "link-local"),
            ("127.0.0.1", "loopback"),
            ("::", "unspecified"),
            ("224.0.0.1", "multicast"),
        ] {
            let got = vip_addr_problem(a.parse().unwrap());
            assert!(got.is_some_and(|m| m.contains(want)), "{a}: {got:?}");
        }
        assert_eq!(vip_addr_problem("10.200.0.1".parse().unwrap()), None);
        assert_eq!(vip_addr_problem("2001:db8::1".parse().unwrap()), None);
    }
}
