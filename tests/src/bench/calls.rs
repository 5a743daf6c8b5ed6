//! What a call and its return cost on this machine, in the same run as the per-packet
//! figures: a program making 16 helper calls, and one making 16 BPF-to-BPF calls, against
//! the empty program. Where every return goes through the kernel's safe-return thunk (an
//! SRSO mitigation on AMD CPUs), calls cost several times what they cost elsewhere, and the
//! datapath's per-packet figures with them.

use aya::{Ebpf, programs::Xdp};
use lb_userspace::programs;

use super::{Report, median, packet::time_calls};

/// Calls per run of each program (`lb-ebpf/src/bin/tools.rs`, `CALLS`).
const CALLS: f64 = 16.0;
const ROUNDS: usize = 5;
/// Test-run calls per round, and runs per call: the frame passes unchanged, so the kernel
/// runs the program on it again and again, and its clock's steps (about 10 ns) are spread
/// over the runs.
const TEST_CALLS: usize = 100;
const REPEAT: u32 = 1000;

fn load<'a>(e: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut Xdp> {
    let p: &mut Xdp = e
        .program_mut(name)
        .ok_or_else(|| anyhow::anyhow!("the tools object has no {name}"))?
        .try_into()?;
    p.load()?;
    Ok(p)
}

/// The section: nanoseconds per helper call and per subprogram call, each with its return.
pub fn run(report: &mut Report, empty: &Xdp) -> anyhow::Result<()> {
    let mut tools = Ebpf::load(programs::TOOLS)?;
    load(&mut tools, "maglb_calls_helper")?;
    load(&mut tools, "maglb_calls_sub")?;
    let frame = vec![0u8; 64];
    let time = |p: &Xdp| time_calls(p, TEST_CALLS, REPEAT, |_| frame.clone());
    let prog = |name: &str| -> &Xdp { tools.program(name).unwrap().try_into().unwrap() };
    let (helper, sub) = (prog("maglb_calls_helper"), prog("maglb_calls_sub"));
    let (mut e, mut h, mut s) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        e.push(time(empty));
        h.push(time(helper));
        s.push(time(sub));
    }
    let e = median(e);
    let per = |v: Vec<f64>| (median(v) - e) / CALLS;
    let (h, s) = (per(h), per(s));
    let rows = vec![
        vec![
            "a helper call (the coarse clock, whose own work is a few loads)".into(),
            format!("{h:.1}"),
        ],
        vec![
            "a BPF-to-BPF call (a subprogram that multiplies and adds)".into(),
            format!("{s:.1}"),
        ],
    ];
    report.section(
        "Cost of a call on this machine",
        &["call, with its return", "ns"],
        &rows,
        &[format!(
            "Two programs make {CALLS} calls each and nothing else; ns per call = (program - \
             empty program) / {CALLS}, medians of {ROUNDS} alternating rounds of {TEST_CALLS} \
             test runs x {REPEAT} repeats (empty: {e:.1} ns per run). The kernel reports the \
             CPU's return mitigation as `{}`. An established flow makes two calls: the \
             `established` subprogram and `bpf_xdp_adjust_head` (its connection-table \
             lookup is an array lookup, which the verifier inlines; the clock helper runs \
             once per jiffy). At these prices that is about {:.0} ns of the established row \
             above. A new flow makes more: its subprogram, the ring's inner map (a helper) and \
             `bpf_xdp_adjust_head`, about {:.0} ns; its VIP comes from the VIP table, an \
             array lookup the verifier inlines.",
            srso(),
            h + s,
            2.0 * h + s
        )],
    );
    Ok(())
}

/// What the kernel says of the CPU's speculative-return-stack-overflow mitigation.
fn srso() -> String {
    std::fs::read_to_string("/sys/devices/system/cpu/vulnerabilities/spec_rstack_overflow")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}
