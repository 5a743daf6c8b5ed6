//! Forwarding rate on a veth pair: a generator namespace sends UDP flows to a VIP with
//! `BPF_PROG_RUN` in live-frames mode (maglb's own `maglb_gen`, on the kernel mechanism of
//! xdp-trafficgen); the balancer's side runs either maglb (encapsulate, XDP_TX back) or a bare
//! XDP_TX (the limit of this set-up); a sink on the generator's side counts what comes back.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, TestRun, TestRunAttrs, TestRunOptions,
    maps::{Array, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use lb_common::Config;
use lb_userspace::{
    addr,
    balancer::Balancer,
    datapath::Mode,
    programs,
    state::{BackendSpec, VipSpec},
};

use super::{Report, median, verdict};
use crate::{
    fixture::vip,
    netns::{Netns, ip, unique_prefix},
    packet::{ETH_IP, UDP, V4, eth, ipv4, udp4},
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 1);
const SRC: Ipv4Addr = Ipv4Addr::new(10, 60, 0, 1);
const WINDOW: Duration = Duration::from_millis(1000);
const ROUNDS: usize = 3;

fn prog<'a>(e: &'a mut Ebpf, name: &str) -> &'a mut Xdp {
    e.program_mut(name).unwrap().try_into().unwrap()
}

/// Frames sent back to the generator's side per second, with `target` on the balancer's side.
fn measure(gen_ns: &Netns, ifindex: u32, frame: Vec<u8>, flows: u32) -> anyhow::Result<f64> {
    gen_ns.run(move || -> anyhow::Result<f64> {
        let mut tools = Ebpf::load(programs::TOOLS)?;
        for p in ["maglb_gen", "maglb_sink"] {
            prog(&mut tools, p).load()?;
        }
        let _sink = prog(&mut tools, "maglb_sink").attach("g0", XdpMode::Driver)?;
        let mut template = [0u8; 64];
        template[..frame.len().min(64)].copy_from_slice(&frame[..frame.len().min(64)]);
        Array::<_, [u8; 64]>::try_from(tools.map_mut("GEN_TEMPLATE").unwrap())?
            .set(0, template, 0)?;
        Array::<_, u32>::try_from(tools.map_mut("GEN_FLOWS").unwrap())?.set(0, flows, 0)?;
        // The context says on which interface the frames arrive (and leave with XDP_TX).
        let mut ctx = [0u8; 24];
        ctx[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        ctx[12..16].copy_from_slice(&ifindex.to_ne_bytes());
        let sink: PerCpuArray<_, u64> = tools.take_map("SINK_COUNT").unwrap().try_into()?;
        let count = || -> u64 { sink.get(&0, 0).map_or(0, |v| v.iter().sum()) };
        let gen_prog = prog(&mut tools, "maglb_gen");
        let mut rates = Vec::new();
        for _ in 0..ROUNDS {
            let (c0, t0) = (count(), Instant::now());
            while t0.elapsed() < WINDOW {
                gen_prog.test_run(TestRunOptions {
                    data_in: Some(&frame),
                    ctx_in: Some(&ctx),
                    repeat: 200_000,
                    attrs: TestRunAttrs::new().xdp_live_frames(64),
                    ..TestRunOptions::default()
                })?;
            }
            // Frames still in flight land within a moment.
            std::thread::sleep(Duration::from_millis(20));
            rates.push((count() - c0) as f64 / t0.elapsed().as_secs_f64());
        }
        Ok(median(rates))
    })?
}

pub fn run(report: &mut Report) -> anyhow::Result<()> {
    let p = unique_prefix("bfw");
    let gen_ns = Netns::new(&format!("{p}-gen"))?;
    let lb = Netns::new(&format!("{p}-lb"))?;
    ip(&[
        "link",
        "add",
        "g0",
        "netns",
        &gen_ns.name,
        "type",
        "veth",
        "peer",
        "name",
        "l0",
        "netns",
        &lb.name,
    ])?;
    for (ns, dev, a) in [(&gen_ns, "g0", "10.50.0.1/24"), (&lb, "l0", "10.50.0.2/24")] {
        ns.ip(&["addr", "add", a, "dev", dev])?;
        ns.exec(
            "ethtool",
            &[
                "-K", dev, "tx", "off", "tso", "off", "gso", "off", "gro", "off",
            ],
        )?;
        ns.ip(&["link", "set", dev, "up"])?;
    }
    let g0 = (gen_ns.ifindex("g0")?, gen_ns.mac("g0")?);
    let l0_mac = lb.mac("l0")?;

    let mut rows = Vec::new();
    for size in [64usize, 512] {
        let payload = vec![0u8; size - 42];
        let l3 = ipv4(
            V4::new(SRC, VIP, UDP),
            &[],
            &udp4(SRC, VIP, 1024, 9, &payload),
        );
        let frame = eth(l0_mac, g0.1, ETH_IP, &l3);
        for flows in [1u32, 64, 10_000] {
            // The limit: a bare XDP_TX on the balancer's side.
            let bare = {
                let f = frame.clone();
                let tx = lb.run(|| -> anyhow::Result<Ebpf> {
                    let mut t = Ebpf::load(programs::TOOLS)?;
                    prog(&mut t, "maglb_tx").load()?;
                    prog(&mut t, "maglb_tx").attach("l0", XdpMode::Driver)?;
                    Ok(t)
                })??;
                let r = measure(&gen_ns, g0.0, f, flows)?;
                drop(tx);
                r
            };
            // maglb: the VIP on three backends; encapsulated frames go back to g0.
            let lbr = {
                let cfg = Config {
                    src_v6: [0; 4],
                    src_v4: addr::to_words("10.50.0.2".parse()?).0[0],
                    mtu: 1500,
                    ready: 1,
                    if_mac: l0_mac,
                    nh_mac: g0.1,
                };
                let bal = lb.run(move || -> anyhow::Result<Balancer> {
                    let mut bal = Balancer::load()?;
                    bal.set_config(&cfg)?;
                    let mut spec = VipSpec::new(vip(VIP, 9, "udp"));
                    spec.backends = (1..=3)
                        .map(|i| BackendSpec::new(Ipv4Addr::new(10, 70, 0, i).into(), 1))
                        .collect();
                    bal.set_vip(spec)?;
                    bal.attach("l0", Mode::Native)?;
                    Ok(bal)
                })??;
                let r = measure(&gen_ns, g0.0, frame.clone(), flows)?;
                drop(bal);
                r
            };
            let ratio = lbr / bare;
            rows.push(vec![
                format!("{size} B"),
                flows.to_string(),
                format!("{:.2}", bare / 1e6),
                format!("{:.2}", lbr / 1e6),
                format!("{:.0}%", ratio * 100.0),
                verdict(ratio >= 0.7),
            ]);
        }
    }
    report.section(
        "2. Forwarding rate on a veth pair",
        &[
            "frame",
            "flows",
            "bare XDP_TX Mpps",
            "maglb Mpps",
            "maglb / bare",
            "target 70%",
        ],
        &rows,
        &[format!(
            "A generator namespace injects UDP frames to the VIP with BPF_PROG_RUN in live-frames \
             mode (maglb_gen, XDP_TX out of g0); the balancer's side (l0, native XDP) runs a bare \
             XDP_TX or maglb (Maglev, connection table, IP-in-IP, XDP_TX back); a sink on g0 \
             counts the returned frames. Medians of {ROUNDS} windows of {} ms. On one veth queue \
             the generator's core also runs both sides' XDP, so the rates are per core.",
            WINDOW.as_millis()
        )],
    );
    Ok(())
}
