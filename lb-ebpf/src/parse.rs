//! Packet parsing: Ethernet (one 802.1Q tag), IPv4 (with options), IPv6, then TCP/UDP ports.
//!
//! The result is a [`Packet`]: offsets of the layers, the lengths from the IP header and a
//! [`FlowKey`] for the lookup. Nothing is written here.

use core::mem::{MaybeUninit, size_of};

use aya_ebpf::programs::XdpContext;
use lb_common::{FAMILY_V4, FAMILY_V6, FlowKey, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_8021Q: u16 = 0x8100;
pub const ETH_HLEN: usize = 14;
pub const VLAN_HLEN: usize = 4;
pub const IPV4_HLEN: usize = 20;
pub const IPV6_HLEN: usize = 40;
/// IPv4 `frag_off` bits (host order).
pub const IP_DF: u16 = 0x4000;
pub const IP_MF: u16 = 0x2000;
pub const IP_OFFMASK: u16 = 0x1fff;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    /// Network order.
    pub proto: u16,
}

#[repr(C)]
pub struct VlanHdr {
    pub tci: u16,
    pub proto: u16,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    pub vihl: u8,
    pub tos: u8,
    pub tot_len: u16,
    pub id: u16,
    pub frag_off: u16,
    pub ttl: u8,
    pub proto: u8,
    pub check: u16,
    pub src: u32,
    pub dst: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv6Hdr {
    /// Version, traffic class, flow label (network order).
    pub vtcfl: u32,
    pub payload_len: u16,
    pub nexthdr: u8,
    pub hop_limit: u8,
    pub src: [u32; 4],
    pub dst: [u32; 4],
}

#[repr(C)]
pub struct IcmpHdr {
    pub ty: u8,
    pub code: u8,
    pub check: u16,
    pub rest: u32,
}

#[repr(C)]
pub struct Ports {
    pub src: u16,
    pub dst: u16,
}

/// The first 14 bytes of a TCP header: ports, sequence numbers, data offset and flags.
#[repr(C)]
pub struct TcpHead {
    pub src: u16,
    pub dst: u16,
    pub seq: u32,
    pub ack: u32,
    pub doff: u8,
    pub flags: u8,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    pub src: u16,
    pub dst: u16,
    pub len: u16,
    pub check: u16,
}

/// A pointer to a `T` at `off` bytes into the packet, if the packet is long enough.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, off: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + off + size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// Where the layers of a parsed IP packet are and what its flow is.
#[derive(Clone, Copy)]
pub struct Packet {
    /// Offset of the IP header, i.e. the length of the L2 header (14, or 18 with a VLAN tag).
    pub l3_off: usize,
    /// Offset of the L4 header.
    pub l4_off: usize,
    /// Length of the IP packet as its header says (header included).
    pub l3_len: usize,
    /// IPv4 TOS or IPv6 traffic class.
    pub tos: u8,
    /// IPv4 "don't fragment" set (always true for IPv6, which routers never fragment).
    pub df: bool,
    /// IPv4 fragment (first or later): ports are not used.
    pub fragment: bool,
    /// TCP flags (`lb_common::TCP_*`); 0 for other protocols and for fragments.
    pub tcp_flags: u8,
    /// The flow; ports are 0 for ICMP and for fragments.
    pub flow: FlowKey,
}

pub enum Parsed {
    /// Not IPv4/IPv6 (ARP, LLDP, ...), or an L2/L3 header too short to read: the kernel's.
    NotIp,
    /// The IP header is readable (so is `flow`'s addresses and protocol) but something after
    /// it is inconsistent: bad IHL or lengths, truncated TCP/UDP header.
    Malformed(Packet),
    Ok(Packet),
}

/// What [`parse_into`] found.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Nothing was written.
    NotIp,
    /// The packet was written (addresses and protocol are valid, the rest may not be).
    Malformed,
    /// The packet was written.
    Ok,
}

/// Parses Ethernet, an optional 802.1Q tag, IPv4 or IPv6, and TCP/UDP ports.
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Parsed {
    let mut pkt = MaybeUninit::uninit();
    match parse_into(ctx, &mut pkt) {
        // SAFETY: parse_into wrote the packet for these kinds.
        Kind::Ok => Parsed::Ok(unsafe { pkt.assume_init() }),
        Kind::Malformed => Parsed::Malformed(unsafe { pkt.assume_init() }),
        Kind::NotIp => Parsed::NotIp,
    }
}

/// As [`parse`], writing the packet into `out` as it goes (for `Kind::Ok` and
/// `Kind::Malformed`). In memory from the start, the fields are not carried in registers
/// (and spilled to the stack around every map lookup) by the caller.
#[inline(always)]
pub fn parse_into(ctx: &XdpContext, out: &mut MaybeUninit<Packet>) -> Kind {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Kind::NotIp;
    };
    let mut proto = u16::from_be(unsafe { (*eth).proto });
    let mut l3_off = ETH_HLEN;
    if proto == ETH_P_8021Q {
        let Some(vlan) = ptr_at::<VlanHdr>(ctx, ETH_HLEN) else {
            return Kind::NotIp;
        };
        proto = u16::from_be(unsafe { (*vlan).proto });
        l3_off = ETH_HLEN + VLAN_HLEN;
    }
    match proto {
        ETH_P_IP => parse_v4(ctx, l3_off, out),
        ETH_P_IPV6 => parse_v6(ctx, l3_off, out),
        _ => Kind::NotIp,
    }
}

/// The destination of an untagged IPv4 packet, read without parsing anything else (most
/// traffic that is not for a VIP is that, and one look at the address decides it).
#[inline(always)]
pub fn plain_ipv4_dst(ctx: &XdpContext) -> Option<u32> {
    let eth = ptr_at::<EthHdr>(ctx, 0)?;
    if unsafe { (*eth).proto } != ETH_P_IP.to_be() {
        return None;
    }
    let ip = ptr_at::<Ipv4Hdr>(ctx, ETH_HLEN)?;
    Some(unsafe { (*ip).dst })
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3_off: usize, out: &mut MaybeUninit<Packet>) -> Kind {
    let Some(ip) = ptr_at::<Ipv4Hdr>(ctx, l3_off) else {
        return Kind::NotIp;
    };
    let ip = unsafe { *ip };
    let pkt = out.write(Packet {
        l3_off,
        l4_off: 0,
        l3_len: u16::from_be(ip.tot_len) as usize,
        tos: ip.tos,
        df: false,
        fragment: false,
        tcp_flags: 0,
        flow: v4_key(ip.src, ip.dst, ip.proto),
    });
    let ihl = (ip.vihl & 0x0f) as usize;
    if ip.vihl >> 4 != 4 || ihl < 5 {
        return Kind::Malformed;
    }
    let hlen = ihl * 4;
    pkt.l4_off = l3_off + hlen;
    let avail = ctx.data_end() - ctx.data() - l3_off;
    if pkt.l3_len < hlen || pkt.l3_len > avail {
        return Kind::Malformed;
    }
    let frag = u16::from_be(ip.frag_off);
    pkt.df = frag & IP_DF != 0;
    pkt.fragment = frag & (IP_MF | IP_OFFMASK) != 0;
    if pkt.fragment {
        return Kind::Ok;
    }
    l4_ports(ctx, pkt)
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3_off: usize, out: &mut MaybeUninit<Packet>) -> Kind {
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, l3_off) else {
        return Kind::NotIp;
    };
    let ip = unsafe { *ip };
    let vtcfl = u32::from_be(ip.vtcfl);
    let pkt = out.write(Packet {
        l3_off,
        l4_off: l3_off + IPV6_HLEN,
        l3_len: IPV6_HLEN + u16::from_be(ip.payload_len) as usize,
        tos: (vtcfl >> 20) as u8,
        df: true,
        fragment: false,
        tcp_flags: 0,
        flow: v6_key(ip.src, ip.dst, ip.nexthdr),
    });
    let avail = ctx.data_end() - ctx.data() - l3_off;
    if vtcfl >> 28 != 6 || pkt.l3_len > avail {
        return Kind::Malformed;
    }
    l4_ports(ctx, pkt)
}

/// An IPv4 flow key without ports. Its zeros are [`opaque_zero`]s: as constant zeros, LLVM
/// merges their stores (the three unused words of an address, the ports) into a call to
/// `memset`, and a BPF memset is a byte-by-byte loop, 16 rounds on every IPv4 packet.
#[inline(always)]
pub fn v4_key(src: u32, dst: u32, proto: u8) -> FlowKey {
    let z = opaque_zero();
    FlowKey {
        src: [src, z, z, z],
        dst: [dst, z, z, z],
        sport: z as u16,
        dport: z as u16,
        proto,
        family: FAMILY_V4,
        _pad: [z as u8; 2],
    }
}

/// An IPv6 flow key without ports (see [`v4_key`]).
#[inline(always)]
pub fn v6_key(src: [u32; 4], dst: [u32; 4], proto: u8) -> FlowKey {
    let z = opaque_zero();
    FlowKey {
        src,
        dst,
        sport: z as u16,
        dport: z as u16,
        proto,
        family: FAMILY_V6,
        _pad: [z as u8; 2],
    }
}

/// 0, as a value the compiler cannot see: a volatile read of a local (a stack store and a
/// load). Stores of it are never merged into a `memset` call.
#[inline(always)]
pub fn opaque_zero() -> u32 {
    let zero = 0u32;
    // SAFETY: reads a local that is initialised and aligned.
    unsafe { core::ptr::read_volatile(&zero) }
}

/// Fills the ports of TCP and UDP flows (and the TCP flags); other protocols keep port 0.
#[inline(always)]
fn l4_ports(ctx: &XdpContext, pkt: &mut Packet) -> Kind {
    let need = match pkt.flow.proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        PROTO_ICMP | PROTO_ICMPV6 => 8,
        _ => return Kind::Ok,
    };
    if pkt.l4_off + need > pkt.l3_off + pkt.l3_len {
        return Kind::Malformed;
    }
    if pkt.flow.proto == PROTO_TCP {
        let Some(tcp) = ptr_at::<TcpHead>(ctx, pkt.l4_off) else {
            return Kind::Malformed;
        };
        pkt.flow.sport = unsafe { (*tcp).src };
        pkt.flow.dport = unsafe { (*tcp).dst };
        pkt.tcp_flags = unsafe { (*tcp).flags };
    } else if pkt.flow.proto == PROTO_UDP {
        let Some(ports) = ptr_at::<Ports>(ctx, pkt.l4_off) else {
            return Kind::Malformed;
        };
        pkt.flow.sport = unsafe { (*ports).src };
        pkt.flow.dport = unsafe { (*ports).dst };
    }
    Kind::Ok
}
