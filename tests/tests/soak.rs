//! A short soak (`cargo xtask soak` runs the long one): one cycle with every kind of event
//! (a health flap, an apply, VIP deletes and adds with and without traffic, a backend
//! removed and added, a planned handover and back, the backup's agent killed, the master's
//! agent killed and stopped, each restarted), under real traffic through a VRRP pair. No
//! request may fail outside the fault windows; maps, slots, RSS and fds are checked.

use std::{path::Path, time::Duration};

use maglb_tests::soak;

#[test]
fn one_cycle_of_every_fault_under_traffic() {
    let s = soak::run(
        Path::new(env!("CARGO_BIN_EXE_maglb-cli")),
        &soak::Options {
            // One cycle: the loop starts one, and the cycle takes longer than this.
            duration: Duration::from_secs(1),
            every_kind_each_cycle: true,
        },
    )
    .expect("soak");
    println!("{}", s.report);
    soak::check(&s).unwrap();
}
