//! Route, neighbour and address look-ups through rtnetlink, in the agent's network namespace.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use futures_util::TryStreamExt as _;
use rtnetlink::{
    Handle, RouteMessageBuilder,
    packet_route::{
        address::{AddressAttribute, AddressScope},
        link::{LinkAttribute, LinkFlags},
        neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState},
        route::{RouteAddress, RouteAttribute, RouteMessage, RouteType},
    },
};

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("netlink: {0}")]
    Netlink(#[from] rtnetlink::Error),
    #[error("netlink socket")]
    Io(#[from] std::io::Error),
    #[error("no route to {0}: add one (e.g. a default route) or set balancer.nexthop")]
    NoRoute(IpAddr),
    #[error(
        "next hop {0} did not answer ARP/neighbour discovery: check the link, or set balancer.nexthop_mac"
    )]
    Unresolved(IpAddr),
    #[error("no interface {0:?} here: see `ip link`")]
    NoLink(String),
}

/// What the agent needs to know of an interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    pub index: u32,
    pub mac: [u8; 6],
    pub mtu: u32,
    /// Up, with a carrier.
    pub running: bool,
}

/// The interface named `name`.
pub async fn link(h: &Handle, name: &str) -> Result<Link, NetlinkError> {
    let mut links = h.link().get().match_name(name.to_owned()).execute();
    let m = match links.try_next().await {
        Ok(Some(m)) => m,
        _ => return Err(NetlinkError::NoLink(name.to_owned())),
    };
    let mut out = Link {
        index: m.header.index,
        mac: [0; 6],
        mtu: 0,
        running: m.header.flags.contains(LinkFlags::Running)
            && m.header.flags.contains(LinkFlags::Up),
    };
    for a in &m.attributes {
        match a {
            LinkAttribute::Address(l) if l.len() == 6 => {
                out.mac.copy_from_slice(l);
            }
            LinkAttribute::Mtu(mtu) => out.mtu = *mtu,
            _ => {}
        }
    }
    Ok(out)
}

/// A connection to rtnetlink, driven by a task on the current tokio runtime.
pub fn connect() -> Result<Handle, NetlinkError> {
    let (conn, handle, _) = rtnetlink::new_connection()?;
    tokio::spawn(conn);
    Ok(handle)
}

/// The kernel's notices of changed links, addresses, routes and neighbour entries (what
/// `ip monitor` shows), on a connection of their own driven by a task on the current tokio
/// runtime. Each item says only that something changed: the caller looks again. The stream
/// ends if the socket fails (e.g. its buffer overflowed).
pub fn watch() -> Result<impl futures_util::Stream + Unpin, NetlinkError> {
    use rtnetlink::MulticastGroup as G;
    let (conn, _, notices) = rtnetlink::new_multicast_connection(&[
        G::Link,
        G::Ipv4Ifaddr,
        G::Ipv6Ifaddr,
        G::Ipv4Route,
        G::Ipv6Route,
        G::Neigh,
    ])?;
    tokio::spawn(conn);
    Ok(notices)
}

/// The kernel's route toward `to` (its own route lookup, as for a packet of this host).
async fn lookup_route(h: &Handle, to: IpAddr) -> Result<RouteMessage, NetlinkError> {
    let prefix = if to.is_ipv4() { 32 } else { 128 };
    let msg = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(to, prefix)
        .map_err(|_| NetlinkError::NoRoute(to))?
        .build();
    match h.route().get(msg).execute().try_next().await {
        Ok(Some(r)) => Ok(r),
        _ => Err(NetlinkError::NoRoute(to)),
    }
}

/// The next hop (gateway, or `to` itself when on-link) and outgoing interface toward `to`,
/// from the kernel's own route lookup.
pub async fn route_to(h: &Handle, to: IpAddr) -> Result<(IpAddr, u32), NetlinkError> {
    let route = lookup_route(h, to).await?;
    let mut gw = to;
    let mut oif = None;
    for a in &route.attributes {
        match a {
            RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = IpAddr::V4(*g),
            RouteAttribute::Gateway(RouteAddress::Inet6(g)) => gw = IpAddr::V6(*g),
            RouteAttribute::Oif(i) => oif = Some(*i),
            _ => {}
        }
    }
    Ok((gw, oif.ok_or(NetlinkError::NoRoute(to))?))
}

/// How the kernel sends a packet of this host to `to`: the outgoing interface, or none when
/// `to` is an address of this host (it never leaves it).
pub async fn route_oif(h: &Handle, to: IpAddr) -> Result<Option<u32>, NetlinkError> {
    let route = lookup_route(h, to).await?;
    if route.header.kind == RouteType::Local {
        return Ok(None);
    }
    route
        .attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Oif(i) => Some(Some(*i)),
            _ => None,
        })
        .ok_or(NetlinkError::NoRoute(to))
}

/// The MAC of `ip` on interface `ifindex`, if the neighbour table has a usable entry.
pub async fn neighbour(
    h: &Handle,
    ip: IpAddr,
    ifindex: u32,
) -> Result<Option<[u8; 6]>, NetlinkError> {
    let mut dump = h.neighbours().get().execute();
    while let Some(n) = dump.try_next().await? {
        if n.header.ifindex != ifindex
            || matches!(
                n.header.state,
                NeighbourState::Incomplete | NeighbourState::Failed | NeighbourState::None
            )
        {
            continue;
        }
        let mut dst = None;
        let mut mac = None;
        for a in &n.attributes {
            match a {
                NeighbourAttribute::Destination(NeighbourAddress::Inet(d)) => {
                    dst = Some(IpAddr::V4(*d))
                }
                NeighbourAttribute::Destination(NeighbourAddress::Inet6(d)) => {
                    dst = Some(IpAddr::V6(*d))
                }
                NeighbourAttribute::LinkLayerAddress(l) if l.len() == 6 => {
                    mac = Some([l[0], l[1], l[2], l[3], l[4], l[5]])
                }
                _ => {}
            }
        }
        if dst == Some(ip) && mac.is_some() {
            return Ok(mac);
        }
    }
    Ok(None)
}

/// The next-hop MAC toward `to`. Without a neighbour entry, one datagram to the discard
/// port of the next hop makes the kernel resolve it; then the table is polled for up to 2 s.
pub async fn nexthop_mac(h: &Handle, to: IpAddr) -> Result<(IpAddr, [u8; 6]), NetlinkError> {
    let (gw, oif) = route_to(h, to).await?;
    for attempt in 0..40 {
        if let Some(mac) = neighbour(h, gw, oif).await? {
            return Ok((gw, mac));
        }
        if attempt % 10 == 0 {
            let bind: SocketAddr = if gw.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }
                .parse()
                .expect("literal");
            if let Ok(s) = UdpSocket::bind(bind) {
                let _ = s.send_to(&[0], SocketAddr::new(gw, 9));
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(NetlinkError::Unresolved(gw))
}

/// The interface's first IPv4 address and first global IPv6 address.
pub async fn addresses(
    h: &Handle,
    ifindex: u32,
) -> Result<(Option<IpAddr>, Option<IpAddr>), NetlinkError> {
    let mut v4 = None;
    let mut v6 = None;
    let mut dump = h.address().get().set_link_index_filter(ifindex).execute();
    while let Some(m) = dump.try_next().await? {
        for a in &m.attributes {
            if let AddressAttribute::Address(ip) = a {
                match ip {
                    IpAddr::V4(_) if v4.is_none() => v4 = Some(*ip),
                    IpAddr::V6(_) if v6.is_none() && m.header.scope == AddressScope::Universe => {
                        v6 = Some(*ip)
                    }
                    _ => {}
                }
            }
        }
    }
    Ok((v4, v6))
}

/// Every address of every interface (for the decap program's "addressed to us" set).
pub async fn all_addresses(h: &Handle) -> Result<Vec<IpAddr>, NetlinkError> {
    let mut out = Vec::new();
    let mut dump = h.address().get().execute();
    while let Some(m) = dump.try_next().await? {
        for a in &m.attributes {
            if let AddressAttribute::Address(ip) = a {
                out.push(*ip);
            }
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The interface's IPv6 link-local address (the source of IPv6 VRRP advertisements).
pub async fn link_local_v6(
    h: &Handle,
    ifindex: u32,
) -> Result<Option<std::net::Ipv6Addr>, NetlinkError> {
    let mut dump = h.address().get().set_link_index_filter(ifindex).execute();
    while let Some(m) = dump.try_next().await? {
        for a in &m.attributes {
            if let AddressAttribute::Address(IpAddr::V6(ip)) = a
                && ip.is_unicast_link_local()
            {
                return Ok(Some(*ip));
            }
        }
    }
    Ok(None)
}
