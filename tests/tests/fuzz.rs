//! The fuzzer's bounded run: a million frames of a fixed seed through BPF_PROG_TEST_RUN, no
//! violation allowed; and every saved finding replayed. Needs root (loading BPF programs).

use maglb_tests::{
    fixture::Lab,
    fuzz::{self, FINDINGS_DIR, Options, hex},
};

/// "maglbfuz".
const SEED: u64 = 0x6d61_676c_6266_757a;
const FRAMES: u64 = 1_000_000;

fn lab() -> Lab {
    Lab::new().expect("load the balancer (root needed)")
}

#[test]
fn a_million_fuzzed_frames_break_no_rule() {
    let mut lab = lab();
    let sum = fuzz::run(
        &mut lab,
        &Options {
            frames: FRAMES,
            seed: SEED,
            save_to: Some(FINDINGS_DIR.into()),
            progress: false,
        },
    )
    .unwrap();
    println!("{}", sum.report());
    if let Some(f) = sum.findings.first() {
        panic!(
            "{} violations; the first, frame {} ({}):\ninput:\n{}\noutput (action {}):\n{}",
            sum.violations,
            f.index,
            f.violation,
            hex(&f.input),
            f.action,
            hex(&f.output)
        );
    }
    // The run reached every outcome, so the oracle's every branch was exercised.
    assert_eq!(sum.outcomes.len(), 5, "outcomes: {:?}", sum.outcomes);
}

#[test]
fn saved_findings_replay_clean() {
    let mut lab = lab();
    let bad = fuzz::replay(&mut lab, FINDINGS_DIR.as_ref()).unwrap();
    let list: Vec<String> = bad
        .iter()
        .map(|(p, v)| format!("{}: {v}", p.display()))
        .collect();
    assert!(
        bad.is_empty(),
        "findings still violate:\n{}",
        list.join("\n")
    );
}
