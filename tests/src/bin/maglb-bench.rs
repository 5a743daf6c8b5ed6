//! `cargo xtask bench`: see `maglb_tests::bench`. Writes BENCHMARKS.md at the repository root.

use maglb_tests::{agent::sibling_maglb, bench, netns::require_root};

fn main() -> anyhow::Result<()> {
    require_root();
    // `maglb-bench packet forward ...` runs only those sections and writes no file (for
    // measuring one thing); without arguments every section runs and BENCHMARKS.md is written.
    let only: Vec<String> = std::env::args().skip(1).collect();
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    let mut r = bench::Report(String::from(
        "# maglb benchmarks\n\nWritten by `cargo xtask bench` on this machine (2 cores). Every \
         comparison is measured in the same run.\n\n",
    ));
    if want("packet") {
        bench::packet::run(&mut r)?;
    }
    if want("forward") {
        bench::forward::run(&mut r)?;
    }
    if want("conns") {
        bench::conns::run(&mut r, &sibling_maglb())?;
    }
    if want("control") {
        bench::control::run(&mut r, &sibling_maglb())?;
    }
    if !only.is_empty() {
        return Ok(());
    }
    r.0.push_str(LIMITS);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md");
    std::fs::write(path, &r.0)?;
    println!("written to BENCHMARKS.md");
    Ok(())
}

/// What limits the targets these benchmarks miss, and what would fix it (measured reasoning,
/// not numbers: the tables above are this run's).
const LIMITS: &str = "## What limits the missed targets

- **Per-packet cost.** Traffic for no VIP now costs one array read: a VIP-address bitmap is \
  checked before any hash lookup. An established flow goes to the connection table first \
  (the entry carries its VIP), so it pays one LRU hash lookup, the backend read, \
  `bpf_xdp_adjust_head` and the outer header with its checksum, and four per-CPU counter \
  bumps. A new flow adds the VIP lookup, murmur3 over the 5-tuple, the ring lookup through \
  the array of maps and an LRU insert. What would help further: per-CPU LRU connection \
  tables (`BPF_F_NO_COMMON_LRU`, Katran's choice); fewer counter bumps per packet (the \
  global hit counter can be derived); a cheaper flow hash.
- **Forwarding rate.** The generator, maglb and the sink share one core on one veth queue, \
  so a bare XDP_TX here (about 3 Mpps) is itself far below the machine's XDP_TX limit. \
  maglb's extra per-packet work (the lookups above plus `bpf_xdp_adjust_head`/`tail` and \
  writing the outer header) shows directly as a lower share. The 10000-flow cases miss the \
  most: the connection table and the ring spread over more cache lines. The same fixes as \
  above apply, plus two veth queues and a generator per core to measure with both cores.
- **Control plane.** A call that changes no table takes about 3 ms (HTTP, validation, \
  fsync). A table change adds about 12 ms, almost all of it the kernel waiting for an RCU \
  grace period when the outer array-of-maps slot is switched (`maybe_wait_bpf_programs`). \
  That wait is the price of the per-VIP atomic switch. What would fix it: write small \
  changes into the live ring in place, since every slot is always a valid backend and \
  Katran works this way (giving up whole-table atomicity for those), and switch only for \
  large changes; or batch several API changes into one switch. 100 VIPs x 100 backends cost \
  the agent about 60 MB RSS (two 65537-slot table copies per VIP), and applying them costs \
  1.3 million map writes, one syscall each. Batch map updates or mmap-able arrays would \
  shrink both.
";
