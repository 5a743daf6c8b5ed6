//! A balancer loaded with a known set of VIPs, for `BPF_PROG_TEST_RUN` fixtures and the
//! per-packet benchmark. Nothing is attached to an interface.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use aya::{TestRun, TestRunOptions};
use lb_common::Config;
use lb_userspace::{
    addr,
    balancer::{Balancer, LoadOptions},
    state::{BackendSpec, VipId, VipSpec},
};

pub const IF_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const NH_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xfe];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
pub const MTU: u16 = 1500;
pub const SRC_V4: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 254);
pub const SRC_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xfe);
pub const CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
pub const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10);
/// 80/tcp -> B1 only; 53/udp -> B2 only; 443/tcp -> no backends.
pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 1);
/// 0/tcp (all ports) -> B6_2 (IPv4 in IPv6).
pub const VIP_ANY: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 2);
/// 80/tcp with source-IP affinity -> B1, B2, B3.
pub const VIP_AFF: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 3);
/// 80/tcp -> B6_1 only.
/// 5000/udp -> B1, B2, B3 (the only UDP VIP on its address, so it takes its fragments).
pub const VIP_UDP3: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 4);
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 1);
pub const B1: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 1);
pub const B2: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 2);
pub const B3: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 3);
pub const B6_1: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 1);
pub const B6_2: Ipv6Addr = Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, 2);

/// One VIP of the layout [`Lab::new`] sets up: address, port (0: all ports), protocol number,
/// backends and source-IP affinity. Checks that must know the layout without reading the maps
/// (the fuzzer's oracle) read it here too.
pub struct VipLayout {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: u8,
    pub backends: &'static [IpAddr],
    pub affinity: bool,
}

const fn v4(a: Ipv4Addr) -> IpAddr {
    IpAddr::V4(a)
}

/// The VIPs of [`Lab::new`], as data.
pub const LAYOUT: [VipLayout; 7] = [
    VipLayout {
        addr: v4(VIP),
        port: 80,
        proto: 6,
        backends: &[v4(B1)],
        affinity: false,
    },
    VipLayout {
        addr: v4(VIP),
        port: 53,
        proto: 17,
        backends: &[v4(B2)],
        affinity: false,
    },
    VipLayout {
        addr: v4(VIP_UDP3),
        port: 5000,
        proto: 17,
        backends: &[v4(B1), v4(B2), v4(B3)],
        affinity: false,
    },
    VipLayout {
        addr: v4(VIP),
        port: 443,
        proto: 6,
        backends: &[],
        affinity: false,
    },
    VipLayout {
        addr: v4(VIP_ANY),
        port: 0,
        proto: 6,
        backends: &[IpAddr::V6(B6_2)],
        affinity: false,
    },
    VipLayout {
        addr: v4(VIP_AFF),
        port: 80,
        proto: 6,
        backends: &[v4(B1), v4(B2), v4(B3)],
        affinity: true,
    },
    VipLayout {
        addr: IpAddr::V6(VIP6),
        port: 80,
        proto: 6,
        backends: &[IpAddr::V6(B6_1)],
        affinity: false,
    },
];

pub struct Lab {
    pub bal: Balancer,
}

pub fn vip(addr: impl Into<IpAddr>, port: u16, proto: &str) -> VipId {
    let addr: IpAddr = addr.into();
    let s = match addr {
        IpAddr::V4(a) => format!("{a}:{port}/{proto}"),
        IpAddr::V6(a) => format!("[{a}]:{port}/{proto}"),
    };
    s.parse().expect("valid VIP")
}

pub fn backends(addrs: &[IpAddr]) -> Vec<BackendSpec> {
    addrs
        .iter()
        .map(|&addr| BackendSpec::new(addr, 1))
        .collect()
}

pub fn config() -> Config {
    Config {
        src_v6: addr::to_words(SRC_V6.into()).0,
        src_v4: addr::to_words(SRC_V4.into()).0[0],
        mtu: MTU,
        ready: 1,
        if_mac: IF_MAC,
        nh_mac: NH_MAC,
    }
}

/// The connection-table size of fixtures: small keeps loading fast (the default table is
/// allocated up front).
pub const LAB_CONNTRACK: u32 = 1 << 16;

impl Lab {
    /// Loads the balancer and configures the VIPs above. Ring size 251 keeps set-up fast.
    pub fn new() -> anyhow::Result<Self> {
        Self::with(&LoadOptions {
            conntrack_entries: LAB_CONNTRACK,
        })
    }

    /// As [`Lab::new`], with other load options.
    pub fn with(opts: &LoadOptions) -> anyhow::Result<Self> {
        let mut bal = Balancer::load_with(opts)?;
        bal.set_config(&config())?;
        for v in &LAYOUT {
            let proto = if v.proto == 17 { "udp" } else { "tcp" };
            let mut spec = VipSpec::new(vip(v.addr, v.port, proto));
            spec.ring_size = 251;
            spec.affinity_src_ip = v.affinity;
            spec.backends = backends(v.backends);
            bal.set_vip(spec)?;
        }
        Ok(Self { bal })
    }

    /// Runs the balancer once on `frame`: (XDP action, output frame).
    pub fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        run(self.bal.program(), frame)
    }
}

/// Runs an XDP program once on `frame` through `BPF_PROG_TEST_RUN`.
pub fn run(prog: &aya::programs::Xdp, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 512];
    let r = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

/// Pins the calling thread to one CPU, so that BPF_PROG_TEST_RUN always runs the program
/// on that CPU and its per-CPU state (counters, the flood meter, its copy of the clock) is the
/// same from run to run. Returns the CPU.
pub fn pin_to_cpu(cpu: usize) -> anyhow::Result<usize> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; the calls only read it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
    }
    Ok(cpu)
}

/// Pins the calling thread to the highest-numbered online CPU (see [`pin_to_cpu`]).
pub fn pin_to_last_cpu() -> anyhow::Result<usize> {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize;
    pin_to_cpu(n - 1)
}

/// `CLOCK_MONOTONIC_COARSE`, the datapath's clock: (now, resolution) in ns.
pub fn coarse_clock() -> (u64, u64) {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let mut res = now;
    // SAFETY: valid out-pointers; both calls only write them.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut now);
        libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut res);
    }
    let ns = |t: libc::timespec| t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64;
    (ns(now), ns(res))
}

/// A frame from the router to the balancer carrying `l3` (an IP packet).
pub fn to_lb(l3: &[u8], ethertype: u16) -> Vec<u8> {
    crate::packet::eth(IF_MAC, CLIENT_MAC, ethertype, l3)
}

/// An IPv4 TCP segment with `flags` (and a correct checksum), no payload.
pub fn tcp_packet(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    use crate::packet::{TCP, V4, ipv4, tcp4};
    ipv4(
        V4::new(src, dst, TCP),
        &[],
        &tcp4(src, dst, sport, dport, flags, &[]),
    )
}

/// The frame of [`tcp_packet`].
pub fn tcp_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    to_lb(
        &tcp_packet(src, dst, sport, dport, flags),
        crate::packet::ETH_IP,
    )
}

/// An IPv4 UDP datagram frame with a one-byte payload.
pub fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    use crate::packet::{ETH_IP, UDP, V4, ipv4, udp4};
    to_lb(
        &ipv4(
            V4::new(src, dst, UDP),
            &[],
            &udp4(src, dst, sport, dport, b"q"),
        ),
        ETH_IP,
    )
}

/// The datapath flow key of an IPv4 flow (what the connection table is keyed by).
pub fn flow4(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    proto: u8,
) -> lb_common::FlowKey {
    lb_common::FlowKey {
        src: addr::to_words(src.into()).0,
        dst: addr::to_words(dst.into()).0,
        sport: sport.to_be(),
        dport: dport.to_be(),
        proto,
        family: lb_common::FAMILY_V4,
        _pad: [0; 2],
    }
}
