//! Health checks: probes of each backend ([`probe`], HTTP in [`http`]), direct or over the
//! tunnel ([`tunnel`]), the pure up/down state machine ([`Tracker`]), adaptive weights from
//! probe latencies ([`adaptive`]), and the supervisor task that runs one probe task per
//! checked backend and tells the writer about transitions ([`supervisor`]).
//!
//! `Tracker` is pure: results in, transitions out (up after `rise` consecutive successes,
//! down after `fall` consecutive failures, so one lost probe never flaps a backend).

pub mod adaptive;
mod http;
mod probe;
pub mod supervisor;
pub mod tunnel;

use std::time::{Duration, Instant};

pub use self::probe::{Probe, ProbeResult, Prober, Route};

/// Up/down state of one backend of one VIP.
#[derive(Clone, Debug)]
pub struct Tracker {
    pub up: bool,
    ok_run: u32,
    fail_run: u32,
    /// "ok", or why the last probe failed.
    pub last: Option<String>,
    pub latency: Option<Duration>,
    /// When `up` last changed (or tracking began).
    pub since: Instant,
    pub checks: u64,
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

impl Tracker {
    /// A new backend counts as up until `fall` probes fail, so adding one takes effect at once.
    pub fn new() -> Self {
        Self::starting(true)
    }

    /// A tracker that starts `up` or down (a backend the writer holds down: known down
    /// before a restart, or added with `initial = "down"`); down, it needs `rise` successes.
    pub fn starting(up: bool) -> Self {
        Self {
            up,
            ok_run: 0,
            fail_run: 0,
            last: None,
            latency: None,
            since: Instant::now(),
            checks: 0,
        }
    }

    /// Records a probe that says nothing about the backend (the balancer could not probe at
    /// all): counted and shown, and the verdict and its runs stay as they were.
    pub fn record_unjudged(&mut self, why: String, latency: Duration) {
        self.checks += 1;
        self.latency = Some(latency);
        self.last = Some(why);
    }

    /// Records a probe result; returns the new state when it changed.
    pub fn record(
        &mut self,
        r: &ProbeResult,
        latency: Duration,
        rise: u32,
        fall: u32,
    ) -> Option<bool> {
        self.checks += 1;
        self.latency = Some(latency);
        match r {
            Ok(()) => {
                self.last = Some("ok".into());
                self.ok_run += 1;
                self.fail_run = 0;
            }
            Err(why) => {
                self.last = Some(why.clone());
                self.fail_run += 1;
                self.ok_run = 0;
            }
        }
        let next = if self.up {
            self.fail_run < fall
        } else {
            self.ok_run >= rise
        };
        if next == self.up {
            return None;
        }
        self.up = next;
        self.since = Instant::now();
        Some(next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> ProbeResult {
        Ok(())
    }
    fn bad() -> ProbeResult {
        Err("timeout".into())
    }

    #[test]
    fn rise_and_fall_without_flapping() {
        let d = Duration::from_millis(1);
        let mut t = Tracker::new();
        assert!(t.up);
        // One or two lost probes do not take it down with fall = 3.
        assert_eq!(t.record(&bad(), d, 2, 3), None);
        assert_eq!(t.record(&bad(), d, 2, 3), None);
        assert_eq!(t.record(&ok(), d, 2, 3), None);
        assert_eq!(t.record(&bad(), d, 2, 3), None);
        assert_eq!(t.record(&bad(), d, 2, 3), None);
        assert_eq!(t.record(&bad(), d, 2, 3), Some(false));
        assert_eq!(t.last.as_deref(), Some("timeout"));
        // One success does not bring it back with rise = 2.
        assert_eq!(t.record(&ok(), d, 2, 3), None);
        assert_eq!(t.record(&bad(), d, 2, 3), None);
        assert_eq!(t.record(&ok(), d, 2, 3), None);
        assert_eq!(t.record(&ok(), d, 2, 3), Some(true));
        assert_eq!(t.checks, 10);
    }

    #[test]
    fn unjudged_probes_leave_the_verdict_and_its_runs() {
        let d = Duration::from_millis(1);
        let mut t = Tracker::new();
        assert_eq!(t.record(&bad(), d, 2, 3), None);
        assert_eq!(t.record(&bad(), d, 2, 3), None);
        for _ in 0..10 {
            t.record_unjudged("interface down".into(), d);
        }
        assert!(t.up);
        assert_eq!(t.last.as_deref(), Some("interface down"));
        // The run of two failures goes on where it was.
        assert_eq!(t.record(&bad(), d, 2, 3), Some(false));
        assert_eq!(t.checks, 13);
    }

    #[test]
    fn a_tracker_that_starts_down_needs_rise_successes() {
        let d = Duration::from_millis(1);
        let mut t = Tracker::starting(false);
        assert!(!t.up);
        assert_eq!(t.record(&bad(), d, 2, 3), None);
        assert_eq!(t.record(&ok(), d, 2, 3), None);
        assert_eq!(t.record(&ok(), d, 2, 3), Some(true));
    }
}
