//! `cargo xtask bench`: see `maglb_tests::bench`. Writes BENCHMARKS.md at the repository root.

use maglb_tests::{agent::sibling_maglb, bench, netns::require_root};

/// With section names as arguments (`packet`, `forward`, `conns`, `control`, `flood`), runs
/// only those and prints them; BENCHMARKS.md is written only by a full run.
fn main() -> anyhow::Result<()> {
    require_root();
    // `maglb-bench packet forward ...` runs only those sections and writes no file (for
    // measuring one thing); without arguments every section runs and BENCHMARKS.md is written.
    let only: Vec<String> = std::env::args().skip(1).collect();
    let want = |s: &str| only.is_empty() || only.iter().any(|o| o == s);
    let start_load = bench::load_average(", ");
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
    if want("flood") {
        bench::flood::run(&mut r)?;
    }
    if !only.is_empty() {
        return Ok(());
    }
    r.0.push_str(&format!(
        "Load average (1, 5, 15 min) when the run began: {start_load}; when it ended: {}. \
         Above 2 on this 2-core machine, other work shared the cores with the benchmarks.\n\n",
        bench::load_average(", ")
    ));
    r.0.push_str(LIMITS);
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../BENCHMARKS.md");
    // The soak's section (`cargo xtask soak`) is kept as it is.
    let old = std::fs::read_to_string(path).unwrap_or_default();
    if let Some(soak) = maglb_tests::soak::section_of(&old) {
        r.0 = maglb_tests::soak::put_section(&r.0, soak);
    }
    std::fs::write(path, &r.0)?;
    println!("written to BENCHMARKS.md");
    Ok(())
}

/// What limits the targets these benchmarks miss, and what would fix it (measured reasoning,
/// not numbers: the tables above are this run's); and what was measured while choosing the
/// connection table (separate runs, not regenerated here).
const LIMITS: &str = "## What limits the missed targets

- **Per-packet cost.** Traffic for no VIP costs one array read (a VIP-address bitmap); \
  untagged IPv4 is judged by its destination address before anything else is parsed. An \
  established flow pays the flow hash (three multiply rounds), one read of its \
  connection-table set (an array lookup, which the verifier inlines: no call) and the \
  comparison of its slots (five 64-bit words each), the backend read, the coarse clock for \
  the idle timeout (a per-CPU copy taken once per jiffy), `bpf_xdp_adjust_head` and the \
  outer header, and exactly one per-CPU counter bump (its backend slot's; VIP totals, hits \
  and misses are derived in user space). Calls are dear on this machine's CPU: every return \
  goes through the kernel's safe-return thunk (its SRSO mitigation), and 'Cost of a call on \
  this machine' above measures each call and its return. Until layout maps-v6 the table \
  was the kernel's LRU hash (with per-CPU LRU lists): its lookup was a helper call that \
  called the key hash and the bucket walk, and its insert was most of a new flow, mostly the \
  kernel's LRU work (a table of 2^14 or 2^17 entries cost only 8-17% less than 2^21). The \
  array of sets took an established flow from 141 to 80-90 ns above empty and a new flow \
  from about 580 to 390-510 ns in this bench (two runs of the LRU table, four of the sets, \
  on a machine whose no-insert row moved by 60 ns between runs), and a new flow into a full \
  table from 760 to 510-560. An established flow now makes two calls, its subprogram and \
  `bpf_xdp_adjust_head` (about 30 ns at this machine's prices); what remains above 75 ns is \
  the set's cache lines and the outer header's writes. The same flow measured 80 to 121 ns \
  on five loads of the same program in one run and 61 to 99 in another (the row over 5 \
  loads): where a load lands in memory moves it by more than the target's margin. Two changes measured no faster \
  with the LRU table and were not kept: the `established` subprogram inlined into the \
  entry (its stack and spills grew; about 7 ns slower in the mean of a million runs of one \
  flow), and IPv4 flows in a table of their own with 16-byte keys instead of 40 (139 \
  against 141 ns above empty, within the clock's 10 ns step). The datapath keeps other \
  calls off the per-packet path: the outer headers are written inline, not in a \
  subprogram; and no program calls a `memset` or `memcpy`, which BPF runs byte by byte (a \
  test checks the objects). A new flow skips the lookup when it is a SYN, and adds the VIP \
  lookup (the VIP table, an array the verifier inlines; the hash map when the table does \
  not show the VIP), the flow hash, \
  the ring read (its inner map's lookup inlined for a ring of the default size, a helper \
  call for other sizes), the flood meter and the insert: \
  a scan of its set's eight slots (512 bytes, cold in a 256 MiB table) for its own, an \
  empty or the idle-longest slot, and the stores. Each flow scans its set from a home way \
  of its own (top bits of its hash): with every scan starting at way 0, the busiest slots \
  all sat at the start of their 512-byte sets, in an eighth of the caches' sets, and 10000 \
  flows on one queue forwarded at 43-63% of bare XDP_TX in two runs, against 58-71% with \
  home ways. The row under flood (no insert) shows \
  the rest. Sets of 4 slots measured a new flow at 391 ns against 441 for 8 in one run each, \
  within the run-to-run spread of the no-insert row (201 and 241 in the same two runs); 8 \
  were kept because 4 would leave about 1 flow in 230 without an entry at 1 million \
  concurrent flows in the default table, against 1 in 6,800. What stands between a new \
  flow and 300 ns is mostly memory: its insert writes a line of a random set of the 256 MiB \
  table, which no cache holds; the row with a 262144-entry table (16 MiB, within the CPU's \
  32 MiB last-level cache) runs the same path about 180 ns cheaper (321 against 502 ns in \
  the run that added it). At 200k flows most sets hold a flow or two, so the scan nearly \
  always stops at its first line: fewer lines per insert would not help. Two ways of \
  hiding that miss measured no gain and were not kept: loading the set's line at the start \
  of the new-flow path, before the VIP lookup and the ring (BPF has no prefetch \
  instruction; the plain load stalled the path instead: 581 against 511 ns, and 551 \
  against 261 under flood, where the line is not needed), and the table split into 16384 \
  inner maps of 16 KiB each (kmalloc'd: in the kernel's direct map with its 1 GiB pages, \
  not vmalloc's 4 KiB pages; 450, 511 and 600 ns for the 200k, empty and full rows against \
  511, 501 and 551, within the noise). On this virtual machine a miss also costs the \
  host's side of the page walk, which no layout in the guest avoids. Without the insert \
  (the row under flood) a new flow still costs 190-300 ns: the ring slot, a random line of \
  the VIP's 512 KiB ring, the policy and the flow hash. Until maps-v8 the ring's inner-map \
  lookup was a helper call for every VIP (each VIP's ring map has its own size, so the \
  outer map took inner maps of any size); a ring of the default size now sits in \
  `RINGS_FIXED`, whose inner maps all have that size, and its lookup is inlined: the ring \
  row in 'Per-packet cost of each setting' shows what that saves. Until maps-v7 the VIP was looked \
  up in the hash map, a call with the kernel's key hash and key compare behind it; the VIP \
  table (an array of buckets, inlined) saves a new flow what its row in 'Per-packet cost \
  of each setting' shows (51 ns in the run that added it: 391 against 431 ns per run). The policy settings cost a new flow 0 (the per-VIP cap, a per-CPU array), 40-80 ns \
  (the per-source limit, a hash lookup) and 50-90 ns (a deny list of 100 prefixes, an LPM \
  trie walk); a source's first new flow under a per-source limit adds a note in the \
  first-seen filter (a cold slot of an 8 MiB array), not an LRU insert. GUE costs an \
  established flow under 10 ns more than IP-in-IP.
- **Forwarding rate.** On one veth queue the generator, both sides' XDP and the sink share \
  one core; with two queues and a generator per core, each core carries its own frames. \
  maglb's per-packet work (above) shows directly as a lower share of bare XDP_TX. At 85% \
  of bare XDP_TX, maglb may add only 18% of bare's time per packet: at about 8 Mpps on the \
  two cores (about 245 ns per packet on each), that is about 43 ns, less than the two calls \
  and the connection-table read of an established flow. The 10000- and 1M-flow cases miss \
  the most: their connection-table sets spread over many pages of the 256 MiB table (TLB \
  misses), and a million flows outgrow every cache, so nearly every lookup is a cache and \
  TLB miss. Against the LRU table (before maps-v6) the array of sets forwards more with \
  few flows and with 1M flows on two queues, as much with 10000 flows on two queues, and \
  less with 10000 flows on one queue (58-71% against 72-77% in earlier runs): most likely \
  the TLB, as 10000 flows touch about 10000 pages of the array, where one CPU's LRU entries \
  came from its own contiguous free list (a trial follows). That, and the calls above, \
  is what stands between maglb and the 85% target at 10k and 1M flows. The table in the \
  direct map (1 GiB pages, through 16 KiB inner maps; see above) was tried for the TLB \
  misses: 77% and 68% (64 and 512 B frames) with 10000 flows on one queue against 50% and \
  56% with the table as it is, run back to back, but 47% and 59% against 68% and 66% on two \
  queues, while bare XDP_TX itself moved from 8.0 to 6.1-7.8 Mpps between the two runs: no \
  clear gain, not kept (both generators then sent every flow; see below). What decides \
  the 10000-flow rows is the TLB's reach, not the cache: with 10000 flows on one queue a \
  16384-entry table (1 MiB, 256 pages) forwarded 76-77% of bare XDP_TX, a 262144-entry one \
  (16 MiB, which the cache holds) 59-63%, the default (256 MiB) 55-56%, in runs back to \
  back. This CPU's second-level TLB holds about 3000 pages (12 MiB of 4 KiB pages): any \
  table larger spreads 10000 flows over more pages than it holds, so a smaller \
  `conntrack_entries` would not help unless it is tiny. Larger pages in the guest do not \
  help either: the table as 8323 inner maps of 63 sets (32 KiB each, the most the kernel \
  takes from kmalloc: none showed in /proc/vmallocinfo, so all sat in the guest's direct map \
  with its 1 GiB pages; both lookups inlined) forwarded 53-55% with 10000 flows on one \
  queue, 59-62% on two and 40-41% with 1M, the same as the table as it is, and took far \
  longer to load (a grace period per inner map). On this virtual machine a TLB entry covers \
  no more than the host's page behind the guest's, and the host's pages are what a spread \
  table misses; not kept. Until this run both \
  generators sent all the flows, so every flow's set line moved between the two cores \
  with its idle stamp; each now sends its own half, as a NIC's RSS sends each flow to one \
  queue: in runs back to back, 50-57% against 39-46% with 10000 flows on two queues, and \
  42-48% against 33-43% with 1M. Since this run each CPU answers the flows it found in \
  the table from its own flow memo for about 134 ms (`FLOW_MEMO`, 2 MiB per CPU, so \
  within the TLB's reach): with 10000 flows, 68-75% on one queue and 67-79% on two against \
  50-60% and 54-63% without it, over three runs of each; with 1M flows, where the memo mostly \
  misses, 33-42% over three runs against 41-50% without (3.0-4.0 Mpps against \
  3.4-3.5): about a tenth less, as nearly every packet read a memo line for nothing. So \
  each CPU now meters its memo (`MEMO_METER`): in a window of about 17 ms in which it \
  answered under a quarter of its lookups, the memo is off for the next window, but for \
  the flows of one slot in 16, whose hit rate says when it pays again. With the meter, \
  in runs back to back: 1M flows 39-46% (3.0-3.7 Mpps, the memo off, as its meter showed \
  during the run: no sampled lookup answered), 10000 flows 68-74% on one queue and \
  66-85% on two. Before a flow seen once could push a busy flow's copy out of the memo, 1M flows lost \
  more (34-42%). What is left at 10000 flows is the memo's own misses (flows sharing a \
  slot) and the per-packet work above. When the machine is shared, both the bare and the \
  maglb rates drop and vary between runs; the ratios are what compares.
- **Connections.** maglb terminates nothing, so its rate stays near that of no balancer; \
  its p99 adds the balancer's hop, and on a shared 2-core machine a few ms of scheduling \
  noise decide the 1.3x p99 target. HAProxy's rate falls from round to round here (its \
  first, fresh round is its best), so the ratio on best rounds, against that first round, \
  is the one that can miss 2x.
- **Control plane.** A change is an HTTP call, one validation, one `fdatasync` of the \
  journal, a Maglev build (about 1.3 ms for a 65537-slot table of 100 or 1000 backends) \
  and the table written into the inactive half of the VIP's memory-mapped ring map, then one \
  update of the VIP's entry: no RCU wait. The build is most of a change with many backends; \
  on a shared 2-core machine the fsync varies most. An apply of 100 new VIPs x 100 backends \
  also creates 100 ring maps and installs each in the outer array of maps (every install \
  waits for an RCU grace period; they run in parallel so the waits overlap), writes 10,000 \
  backend slots (one syscall each) and builds 100 tables on the 2 cores. What would cut it: \
  batched slot writes (`BPF_MAP_UPDATE_BATCH`), and ring maps made ahead of time for free \
  VIP indices.

## Design measurements (separate runs, while choosing the connection table)

Before layout maps-v6 (an array of sets, above), four connection-table designs in one experimental build, each behind its own balancer, \
measured in alternating chunks of 2000 new-flow SYNs (fresh 5-tuples, 65537-slot ring, 100 \
backends), so that all four saw the same machine load; 2^21 entries in all (1M per CPU for \
the per-CPU designs), one CPU pinned. Nanoseconds per run with the kernel's test-run \
overhead (about 80 ns, the empty program) included: medians over three runs of the chunks' \
25th percentiles; for both CPUs inserting at once, the median of nine two-thread runs. The \
machine was shared (load average 5 to 7): differences under about 50 ns are noise.

| connection table | empty | 200k flows | full (every insert evicts) | both CPUs inserting |
|---|---|---|---|---|
| LRU hash, common LRU (before) | 651 | 651 | 991 | 1112 |
| LRU hash, `BPF_F_NO_COMMON_LRU` (chosen until maps-v6) | 671 | 751 | 951 | 1082 |
| `LRU_PERCPU_HASH` | 691 | 681 | 1002 | 1072 |
| array of per-CPU LRU hashes (Katran) | 611 | 581 | 891 | 946 |

The array of per-CPU tables measured cheapest (a smaller table per CPU: fewer TLB misses). \
It was not chosen: a flow is known only to the CPU that inserted it, so a flow whose \
packets reach another CPU (veth and RPS here, an RSS change on a NIC) is chosen again from \
the ring there, and after a ring change (a drained or failed backend) it moves: established \
and drained flows would break. `LRU_PERCPU_HASH` has the same problem (per-CPU values). \
`BPF_F_NO_COMMON_LRU` keeps one table that every CPU reads, with per-CPU LRU lists: no LRU \
lock shared by the CPUs, and a flood on one CPU evicts only that CPU's entries. On this \
2-core machine it measured no cheaper than the common LRU (whose per-CPU free lists take \
the global lock only about every 128 inserts). The array of sets that replaced it is also \
one table that every CPU reads, without the LRU's locks or calls; what it gives up is that \
a flood on one CPU can evict any CPU's flows (the flood mode still caps every CPU's \
inserts), and that a set can fill before the table does.
";
