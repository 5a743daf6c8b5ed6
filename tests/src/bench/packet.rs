//! Per-packet cost of the balancer through BPF_PROG_TEST_RUN, against an empty XDP program
//! measured the same way, and Maglev table build times.
//!
//! With repeat > 1 the kernel runs the program again on the frame it already rewrote, so
//! every measurement is one packet per run, and many runs give a median.
//!
//! The set-up is a production-sized one: a 65537-slot ring with 100 backends, and a
//! connection table already holding 200,000 flows. Every new-flow run sends a 5-tuple never
//! seen before (a counter walks source addresses and ports), so no run hits the table. The
//! new-flow cost is also measured with an empty table and with a full one (every insert
//! evicts), to show whether it stays flat as the table fills. The thread is pinned to one
//! CPU, so the per-CPU parts of the datapath see one CPU's state.

use std::{
    net::{Ipv4Addr, Ipv6Addr},
    time::Instant,
};

use aya::{TestRun, TestRunOptions, programs::Xdp};
use lb_userspace::{
    balancer::{Balancer, LoadOptions},
    datapath::decap::{self, Decap},
    maglev,
    state::{BackendSpec, VipSpec},
};

use super::{Report, median, paired_cost};
use crate::{
    fixture::{self, CLIENT, CLIENT_MAC, CLIENT6, IF_MAC, VIP, VIP6, vip},
    packet::*,
};

/// Runs per round and case, and rounds per row: many short rounds, maglb's alternating with
/// the empty program's, so that each round's paired difference (a moment apart) rides out
/// the machine's load changing, which moves a long round's median by tens of ns.
const RUNS: usize = 1_250;
const ROUNDS: usize = 40;
const BACKENDS: u32 = 100;
const FILL: u32 = 200_000;
/// A connection table that fits this CPU's last-level cache (16 MiB), for the row that shows
/// what the default table's size costs a new flow.
const SMALL_TABLE: u32 = 1 << 18;
/// Flows in the small table before its row (a quarter of it).
const SMALL_FILL: u32 = SMALL_TABLE / 4;

/// Median nanoseconds of one run of `prog`, over `RUNS` runs; `frame(i)` is run `i`'s input.
fn time(prog: &Xdp, frame: impl FnMut(usize) -> Vec<u8>) -> f64 {
    time_runs(prog, RUNS, frame)
}

/// As `time`, over `runs` runs.
pub(super) fn time_runs(prog: &Xdp, runs: usize, frame: impl FnMut(usize) -> Vec<u8>) -> f64 {
    time_calls(prog, runs, 1, frame)
}

/// Median nanoseconds per run over `calls` test-run calls of `repeat` runs each (the kernel
/// reports a call's mean per run). `repeat` > 1 only for frames the program leaves as they
/// are: the kernel runs it again on the frame the previous run left.
pub(super) fn time_calls(
    prog: &Xdp,
    calls: usize,
    repeat: u32,
    mut frame: impl FnMut(usize) -> Vec<u8>,
) -> f64 {
    let mut out = vec![0u8; 4096];
    let mut ns = Vec::with_capacity(calls);
    for i in 0..calls {
        let f = frame(i);
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&f),
                data_out: Some(&mut out),
                repeat,
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        ns.push(r.duration.as_nanos() as f64);
    }
    median(ns)
}

/// Runs per call of the pass row measured with repeats: a packet not for a VIP is left as
/// it is, so the kernel can run the program on it again and again, and its clock's
/// resolution (about 10 ns a call here) is spread over the runs.
const PASS_REPEAT: u32 = 100;

/// As `time`, on both CPUs at once (one thread pinned to each, each with its own stream of
/// new flows): the cost of a new flow while the other CPU inserts too. The mean of the two
/// CPUs' medians.
fn time_both_cpus(prog: &Xdp, streams: &mut [Fresh; 2]) -> f64 {
    std::thread::scope(|s| {
        let threads: Vec<_> = streams
            .iter_mut()
            .enumerate()
            .map(|(cpu, f)| {
                s.spawn(move || {
                    fixture::pin_to_cpu(cpu).expect("pin");
                    time(prog, |_| f.next())
                })
            })
            .collect();
        let ns: Vec<f64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        ns.iter().sum::<f64>() / ns.len() as f64
    })
}

/// Runs `prog` once on `f`, returns the action.
fn once(prog: &Xdp, f: &[u8]) -> u32 {
    fixture::run(prog, f).0
}

/// Sends `n` SYNs of `stream` through `prog`, each inserted as a new flow.
fn insert(prog: &Xdp, stream: &mut Fresh, n: u32) {
    for _ in 0..n {
        assert_eq!(once(prog, &stream.next()), 3, "fill SYN not forwarded");
    }
}

/// A stream of TCP SYNs to VIP:80, each from a (source address, port) pair used once.
/// `space` keeps streams apart: fills, measured runs and the empty program's runs.
pub(super) struct Fresh {
    space: u8,
    n: u32,
    /// Source ports per source address.
    ports: u32,
}

impl Fresh {
    /// 50,000 ports per address, 2^16 addresses per space.
    pub(super) fn new(space: u8) -> Self {
        Self {
            space,
            n: 0,
            ports: 50_000,
        }
    }
    /// Each SYN from an address of its own (a random-source flood's), 2^16 per space.
    pub(super) fn spoofed(space: u8) -> Self {
        Self {
            ports: 1,
            ..Self::new(space)
        }
    }
    pub(super) fn next(&mut self) -> Vec<u8> {
        let n = self.n;
        self.n += 1;
        let a = n / self.ports;
        let src = Ipv4Addr::new(100, 64 + self.space, (a >> 8) as u8, a as u8);
        let sport = 10_000 + (n % self.ports) as u16;
        syn(src, sport)
    }
}

fn syn(src: Ipv4Addr, sport: u16) -> Vec<u8> {
    eth(
        IF_MAC,
        CLIENT_MAC,
        ETH_IP,
        &ipv4(
            V4::new(src, VIP, TCP),
            &[],
            &tcp4(src, VIP, sport, 80, SYN, &[0; 64]),
        ),
    )
}

pub(super) fn ack4(sport: u16) -> Vec<u8> {
    eth(
        IF_MAC,
        CLIENT_MAC,
        ETH_IP,
        &ipv4(
            V4::new(CLIENT, VIP, TCP),
            &[],
            &tcp4(CLIENT, VIP, sport, 80, ACK, &[0; 64]),
        ),
    )
}

fn udp(sport: u16) -> Vec<u8> {
    eth(
        IF_MAC,
        CLIENT_MAC,
        ETH_IP,
        &ipv4(
            V4::new(CLIENT, VIP, UDP),
            &[],
            &udp4(CLIENT, VIP, sport, 53, &[0; 64]),
        ),
    )
}

fn ack6(sport: u16) -> Vec<u8> {
    eth(
        IF_MAC,
        CLIENT_MAC,
        ETH_IPV6,
        &ipv6(
            CLIENT6,
            VIP6,
            TCP,
            0,
            0,
            &tcp6(CLIENT6, VIP6, sport, 80, ACK, &[0; 64]),
        ),
    )
}

fn pass() -> Vec<u8> {
    let other = Ipv4Addr::new(10, 0, 0, 7);
    eth(
        IF_MAC,
        CLIENT_MAC,
        ETH_IP,
        &ipv4(
            V4::new(CLIENT, other, TCP),
            &[],
            &tcp4(CLIENT, other, 1, 80, ACK, &[0; 64]),
        ),
    )
}

/// The IPv4 VIPs' backends.
pub(super) fn v4_backends() -> Vec<BackendSpec> {
    (0..BACKENDS)
        .map(|i| BackendSpec::new(Ipv4Addr::new(10, 1, (i >> 8) as u8, i as u8 + 1).into(), 1))
        .collect()
}

/// The balancer with VIP:80/tcp, VIP:53/udp and VIP6:80/tcp, each on 100 backends with a
/// 65537-slot ring, and a connection table of `conntrack_entries`.
fn balancer(conntrack_entries: u32) -> anyhow::Result<Balancer> {
    let mut bal = Balancer::load_with(&LoadOptions { conntrack_entries })?;
    bal.set_config(&fixture::config())?;
    let v4 = v4_backends();
    let v6: Vec<BackendSpec> = (0..BACKENDS)
        .map(|i| {
            BackendSpec::new(
                Ipv6Addr::new(0xfd00, 1, 0, 0, 0, 0, 0, i as u16 + 1).into(),
                1,
            )
        })
        .collect();
    for (id, backends) in [
        (vip(VIP, 80, "tcp"), v4.clone()),
        (vip(VIP, 53, "udp"), v4),
        (vip(VIP6, 80, "tcp"), v6),
    ] {
        let mut spec = VipSpec::new(id);
        spec.ring_size = lb_common::DEFAULT_RING_SIZE;
        spec.backends = backends;
        bal.set_vip(spec)?;
    }
    Ok(bal)
}

/// Loads of the program in the row that measures one established flow on each.
const LOADS: usize = 5;

/// One established flow on `LOADS` balancers loaded one after another (small tables: the
/// flow's line is cached either way), `ROUNDS / LOADS` paired rounds each: a program loaded
/// anew lands elsewhere in memory, and the same code has measured tens of ns apart in runs
/// back to back. The note gives each load's paired cost.
fn established_over_loads(empty: &Xdp, ack: &[u8]) -> anyhow::Result<Row> {
    let mut row = Row::new(
        &format!("established TCP flow, {LOADS} loads of the program"),
        String::new(),
    );
    let mut each = Vec::new();
    for _ in 0..LOADS {
        let mut bal = balancer(SMALL_TABLE)?;
        once(bal.program(), ack);
        let (mut maglb, mut base) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS / LOADS {
            base.push(time(empty, |_| ack.to_vec()));
            maglb.push(time(bal.program(), |_| ack.to_vec()));
        }
        each.push(format!("{:.0}", paired_cost(&maglb, &base)));
        row.maglb.extend(maglb);
        row.empty.extend(base);
    }
    row.note = format!("ns per load: {}", each.join(", "));
    Ok(row)
}

/// One row: maglb and the empty program, `ROUNDS` alternating rounds of `RUNS` runs.
struct Row {
    name: String,
    maglb: Vec<f64>,
    empty: Vec<f64>,
    note: String,
}

impl Row {
    fn new(name: &str, note: String) -> Self {
        Self {
            name: name.into(),
            maglb: Vec::new(),
            empty: Vec::new(),
            note,
        }
    }
    /// The difference is the median of the rounds' paired differences; the ratio that of
    /// the columns' medians.
    fn cells(self) -> Vec<String> {
        let cost = paired_cost(&self.maglb, &self.empty);
        let (m, e) = (median(self.maglb), median(self.empty));
        vec![
            self.name,
            format!("{m:.0}"),
            format!("{e:.0}"),
            format!("{cost:.0}"),
            format!("{:.2}", m / e),
            self.note,
        ]
    }
}

/// Per-packet costs and Maglev build times.
pub fn run(report: &mut Report) -> anyhow::Result<()> {
    let cpu = fixture::pin_to_last_cpu()?;
    let mut bal = balancer(lb_common::DEFAULT_CONNTRACK_ENTRIES)?;
    // The bench inserts far faster than any flood threshold: measure inserts, not the flood
    // mode (which has its own row).
    bal.set_flood_threshold(None)?;
    let mut empty = Decap::load()?;
    let empty = empty.program(decap::PASS_PROGRAM)?;
    let capacity = bal.conntrack_entries();

    let mut fill = Fresh::new(0);
    let mut fresh = Fresh::new(1);
    let mut fresh_empty = Fresh::new(2);
    let mut filled = 0u32;
    let mut fill_to = |bal: &mut Balancer, n: u32| -> u32 {
        insert(bal.program(), &mut fill, n.saturating_sub(filled));
        filled = filled.max(n);
        filled
    };

    let mut rows = Vec::new();
    // New flows on an empty table: the table grows by the measured runs.
    let mut new_at = |bal: &mut Balancer, name: &str, note: String| -> Row {
        let mut row = Row::new(name, note);
        for _ in 0..ROUNDS {
            row.empty.push(time(empty, |_| fresh_empty.next()));
            row.maglb.push(time(bal.program(), |_| fresh.next()));
        }
        row
    };
    let grow = (RUNS * ROUNDS) as u32;
    // Warm-up, so that the first row does not pay for cold code and test-run paths: the
    // whole new-flow path under flood (nothing is inserted), and the empty program.
    bal.set_flood_threshold(Some(1))?;
    let mut warm = Fresh::new(7);
    for _ in 0..2 {
        time(empty, |_| warm.next());
        time(bal.program(), |_| warm.next());
    }
    bal.set_flood_threshold(None)?;
    rows.push(new_at(
        &mut bal,
        "new TCP flow (SYN), empty table",
        format!("table 0 -> {grow}"),
    ));
    // The measured runs above count toward the fill.
    let in_table = grow + fill_to(&mut bal, FILL - grow);
    rows.insert(
        0,
        new_at(
            &mut bal,
            "new TCP flow (SYN)",
            format!("table {in_table} -> {}", in_table + grow),
        ),
    );
    // Both CPUs insert at once: a table shared by the CPUs pays for it here.
    let cpus = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1);
    if cpus >= 2 {
        let mut row = Row::new(
            "new TCP flow (SYN), both CPUs inserting at once",
            format!("table {} -> {}", in_table + grow, in_table + 3 * grow),
        );
        let mut for_empty = [Fresh::new(3), Fresh::new(4)];
        let mut for_maglb = [Fresh::new(5), Fresh::new(6)];
        for _ in 0..ROUNDS {
            row.empty.push(time_both_cpus(empty, &mut for_empty));
            row.maglb
                .push(time_both_cpus(bal.program(), &mut for_maglb));
        }
        rows.insert(1, row);
    }
    // The same on a table that fits the cache: a new flow of the default table writes a line
    // of a random set of hundreds of MiB, which no cache holds.
    {
        let mut small = balancer(SMALL_TABLE)?;
        small.set_flood_threshold(None)?;
        insert(small.program(), &mut Fresh::new(8), SMALL_FILL);
        let entries = small.conntrack_entries();
        let memory = small.conntrack_memory().unwrap_or(0) >> 20;
        rows.push(new_at(
            &mut small,
            &format!("new TCP flow (SYN), {entries}-entry table ({memory} MiB)"),
            format!("table {SMALL_FILL} -> {}", SMALL_FILL + grow),
        ));
    }
    // Under flood: the ring still chooses, nothing is inserted.
    bal.set_flood_threshold(Some(1))?;
    rows.push(new_at(
        &mut bal,
        "new TCP flow (SYN), CPU under flood (no insert)",
        "no inserts".into(),
    ));
    bal.set_flood_threshold(None)?;
    let ack = ack4(40_000);
    let udp = udp(40_001);
    let six = ack6(40_000);
    for f in [&ack, &udp, &six] {
        once(bal.program(), f);
    }
    let passf = pass();
    for (name, f) in [
        ("established TCP flow", &ack),
        ("UDP (established)", &udp),
        ("IPv6 TCP (established)", &six),
        ("not for a VIP (pass)", &passf),
    ] {
        let mut row = Row::new(name, format!("table {}", in_table + 3 * grow));
        for _ in 0..ROUNDS {
            row.empty.push(time(empty, |_| f.clone()));
            row.maglb.push(time(bal.program(), |_| f.clone()));
        }
        rows.push(row);
    }
    rows.push(established_over_loads(empty, &ack)?);
    let mut row = Row::new(
        &format!("not for a VIP (pass), {PASS_REPEAT} runs per call"),
        format!("table {}", in_table + 3 * grow),
    );
    let calls = RUNS / PASS_REPEAT as usize;
    for _ in 0..ROUNDS {
        row.empty
            .push(time_calls(empty, calls, PASS_REPEAT, |_| passf.clone()));
        row.maglb
            .push(time_calls(bal.program(), calls, PASS_REPEAT, |_| {
                passf.clone()
            }));
    }
    rows.push(row);
    // Full: twice the table's size inserted, so nearly all its sets are full (the row says
    // how many slots are in use) and nearly every insert evicts.
    fill_to(&mut bal, 2 * capacity);
    let in_use = bal.conntrack_len();
    rows.push(new_at(
        &mut bal,
        "new TCP flow (SYN), full table",
        format!("{in_use} of {capacity} (nearly every insert evicts)"),
    ));

    let memory = bal.conntrack_memory().unwrap_or(0);
    let entries = bal.conntrack_entries();
    let table: Vec<Vec<String>> = rows.into_iter().map(Row::cells).collect();
    report.section(
        "1. Per-packet cost (BPF_PROG_TEST_RUN)",
        &[
            "case",
            "maglb ns",
            "empty XDP ns",
            "maglb - empty",
            "maglb / empty",
            "connection table (flows)",
        ],
        &table,
        &[format!(
            "{ROUNDS} rounds of {RUNS} runs each, one packet per run, on CPU {cpu}; the empty \
             program is measured in rounds alternating with maglb's, on frames of the same \
             kind. The columns are medians of the rounds' medians; maglb - empty is the \
             median of the rounds' paired differences. The per-run time includes the kernel's test-run overhead, which the \
             subtraction removes. Three VIPs (TCP, UDP, IPv6 TCP), each with {BACKENDS} \
             backends on a {}-slot ring. Every new-flow run is a SYN from a (source address, \
             port) never sent before, so it never hits the connection table; the table's \
             fill is shown before -> after the measured runs. The table has {entries} entries \
             (the default `conntrack_entries`) in sets of {}; its kernel memory is {} MiB, {} \
             bytes per entry. One row loads a second balancer with a {SMALL_TABLE}-entry \
             table, which fits this CPU's last-level cache: its difference to the rows above \
             is what the default table's size costs a new flow (the line of a random set, in \
             no cache). The flood threshold is off except in its own row. The row over \
             {LOADS} loads runs the established flow on {LOADS} balancers loaded one after \
             another, {} paired rounds each: a program loaded anew lands elsewhere in memory, \
             and the note gives each load's cost. The last pass row makes {} calls of {PASS_REPEAT} runs each: the kernel runs the \
             program again on the frame it left unchanged and reports the mean per run, so \
             its clock's steps (about 10 ns) and the per-call overhead are spread over the \
             runs (hence the lower empty column).",
            lb_common::DEFAULT_RING_SIZE,
            lb_common::CONN_WAYS,
            memory >> 20,
            memory / entries.max(1) as u64,
            ROUNDS / LOADS,
            RUNS / PASS_REPEAT as usize,
        )],
    );
    super::calls::run(report, empty)?;
    super::settings::run(report, &mut bal, empty)?;
    maglev_build(report);
    flow_hash(report);
    Ok(())
}

/// The flow hash against murmur3 (the previous one), in user space: the same integer code
/// the datapath runs, compiled natively. Their difference is a few ns, below what the
/// per-packet bench resolves.
fn flow_hash(report: &mut Report) {
    use lb_common::hash;
    use std::hint::black_box;
    const N: u32 = 2_000_000;
    let flows: Vec<lb_common::FlowKey> = (0..N)
        .map(|i| fixture::flow4(Ipv4Addr::from(0x6440_0000 + i), VIP, i as u16, 80, TCP))
        .collect();
    let mut rows = Vec::new();
    let mut per = |name: &str, f: fn(&lb_common::FlowKey) -> u32| -> f64 {
        let mut ns = Vec::new();
        for _ in 0..7 {
            let t = Instant::now();
            let mut acc = 0u32;
            for k in &flows {
                acc ^= f(black_box(k));
            }
            black_box(acc);
            ns.push(t.elapsed().as_secs_f64() * 1e9 / N as f64);
        }
        let m = median(ns);
        rows.push(vec![name.to_string(), format!("{m:.2}")]);
        m
    };
    let old = per("murmur3 (before)", hash::murmur3::flow_hash);
    let new = per("3 multiply rounds (now)", hash::flow_hash);
    report.section(
        "Flow hash (user space, same code)",
        &["hash", "ns per flow"],
        &rows,
        &[format!(
            "Medians of 7 passes over {N} flows. Now / before: {:.2}. Both spread sequential \
             ports and addresses evenly over ring sizes (lb-common's hash tests).",
            new / old
        )],
    );
}

fn maglev_build(report: &mut Report) {
    let mut build = Vec::new();
    for n in [10u32, 100, 1000] {
        let entries: Vec<maglev::Entry> = (0..n)
            .map(|i| maglev::Entry {
                id: vec![10, 1, (i >> 8) as u8, i as u8],
                weight: 1 + i % 3,
                value: i,
            })
            .collect();
        let mut ms = Vec::new();
        let mut table = Vec::new();
        for _ in 0..7 {
            let t = Instant::now();
            table = maglev::build(&entries, lb_common::DEFAULT_RING_SIZE);
            ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let without_one = maglev::build(&entries[1..], lb_common::DEFAULT_RING_SIZE);
        let changed = table
            .iter()
            .zip(&without_one)
            .filter(|(a, b)| a != b)
            .count();
        build.push(vec![
            n.to_string(),
            format!("{:.2}", median(ms)),
            changed.to_string(),
        ]);
    }
    report.section(
        "Maglev table build (65537 slots)",
        &[
            "backends",
            "median ms",
            "slots written when one backend leaves",
        ],
        &build,
        &[],
    );
}
