//! Adaptive weights (`adaptive_weights = true` on a VIP): a backend whose probes stay much
//! slower than its peers' gets a smaller share of new flows, in steps, down to a floor, and
//! gets it back once it is fast again.
//!
//! Pure bookkeeping: probe latencies in, effective-weight steps out. Each backend's latency
//! is smoothed (an exponentially weighted moving average of its successful probes) and
//! compared with the median of its up peers' (the lower median when they are even). A
//! backend is *slow* while its average is above `SLOW_RATIO` times that median and at least
//! `MIN_EXCESS` above it, and *fast* while it is below `FAST_RATIO` times the median or
//! within half of `MIN_EXCESS` of it; in between it is neither, and nothing counts. After
//! `HOLD_DOWN` slow judgments in a row (the first `WARM_UP` probes are not judged) it steps down (100% -> 50% -> 25% -> 10% of its
//! configured weight, the floor), after `HOLD_UP` fast ones in a row it steps up, and every
//! step starts the count again. The gap between the two thresholds, the smoothing and the
//! longer hold to come back keep a backend near the threshold from flapping; a change needs
//! at least `HOLD_DOWN` probes after the previous one.

use std::{collections::BTreeMap, time::Duration};

use super::supervisor::BackendKey;
use crate::state::{State, VipId};

/// The effective weight's steps, in percent of the configured weight; the last is the floor.
pub const STEPS: [u32; 4] = [100, 50, 25, 10];
/// Weight of a new sample in the moving average.
const ALPHA: f64 = 0.3;
/// Slow: above this many times the peers' median...
const SLOW_RATIO: f64 = 2.0;
/// ...and at least this much above it (latencies of a few hundred microseconds differ by
/// large ratios and mean nothing).
const MIN_EXCESS: Duration = Duration::from_millis(20);
/// Fast: below this many times the median, or within `MIN_EXCESS / 2` of it.
const FAST_RATIO: f64 = 1.5;
/// Slow judgments in a row before a step down.
const HOLD_DOWN: u32 = 3;
/// Fast judgments in a row before a step up.
const HOLD_UP: u32 = 5;
/// Probes of a backend before it is judged (its first samples, e.g. a first connection's
/// set-up, would weigh too much in the average).
const WARM_UP: u32 = 5;

/// What one backend's probes say of its speed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Speed {
    /// Smoothed latency of its successful probes, seconds.
    pub average: Option<f64>,
    /// Index into `STEPS`.
    step: usize,
    samples: u32,
    slow_run: u32,
    fast_run: u32,
}

impl Speed {
    /// The effective weight, in percent of the configured one.
    pub fn percent(&self) -> u32 {
        STEPS[self.step]
    }

    fn observe(&mut self, took: Duration) {
        self.samples = self.samples.saturating_add(1);
        let x = took.as_secs_f64();
        self.average = Some(match self.average {
            Some(a) => a + ALPHA * (x - a),
            None => x,
        });
    }

    /// Judges the average against the peers' median; returns the new percent when it steps.
    fn judge(&mut self, median: f64) -> Option<u32> {
        let a = self.average.filter(|_| self.samples >= WARM_UP)?;
        let excess = a - median;
        let min = MIN_EXCESS.as_secs_f64();
        if a > SLOW_RATIO * median && excess >= min {
            self.slow_run = self.slow_run.saturating_add(1);
            self.fast_run = 0;
        } else if a < FAST_RATIO * median || excess < min / 2.0 {
            self.fast_run = self.fast_run.saturating_add(1);
            self.slow_run = 0;
        } else {
            self.slow_run = 0;
            self.fast_run = 0;
        }
        if self.slow_run >= HOLD_DOWN && self.step + 1 < STEPS.len() {
            self.step += 1;
        } else if self.fast_run >= HOLD_UP && self.step > 0 {
            self.step -= 1;
        } else {
            return None;
        }
        self.slow_run = 0;
        self.fast_run = 0;
        Some(self.percent())
    }
}

/// A step of one backend's effective weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub from: u32,
    pub to: u32,
    /// Its smoothed latency and its peers' median, seconds.
    pub average: f64,
    pub median: f64,
}

/// The speeds of the backends of VIPs with adaptive weights.
#[derive(Clone, Debug, Default)]
pub struct Adaptive {
    speeds: BTreeMap<BackendKey, Speed>,
    vips: Vec<VipId>,
}

impl Adaptive {
    /// Follows the state: only VIPs with adaptive weights and their backends are kept.
    pub fn follow(&mut self, state: &State) {
        self.vips = state
            .vips
            .iter()
            .filter(|v| v.adaptive_weights)
            .map(|v| v.address)
            .collect();
        self.speeds.retain(|(vip, b), _| {
            state
                .vip(vip)
                .is_some_and(|v| v.adaptive_weights && v.backends.iter().any(|x| x.address == *b))
        });
    }

    /// A probe of `key` succeeded in `took`. `up` says which backends are up (peers that
    /// are down do not count). Returns the step it causes, if any.
    pub fn record(
        &mut self,
        key: BackendKey,
        took: Duration,
        up: impl Fn(&BackendKey) -> bool,
    ) -> Option<Step> {
        if !self.vips.contains(&key.0) {
            return None;
        }
        self.speeds.entry(key).or_default().observe(took);
        let mut peers: Vec<f64> = self
            .speeds
            .iter()
            .filter(|(k, _)| k.0 == key.0 && **k != key && up(k))
            .filter_map(|(_, s)| s.average)
            .collect();
        if peers.is_empty() {
            return None;
        }
        peers.sort_by(f64::total_cmp);
        let median = peers[(peers.len() - 1) / 2];
        let s = self.speeds.get_mut(&key).expect("inserted above");
        let from = s.percent();
        let to = s.judge(median)?;
        Some(Step {
            from,
            to,
            average: s.average.unwrap_or_default(),
            median,
        })
    }

    /// What is known of one backend.
    pub fn speed(&self, key: &BackendKey) -> Option<&Speed> {
        self.speeds.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{BackendEntry, Vip};

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// One VIP with adaptive weights and backends .1, .2, .3.
    fn adaptive() -> (Adaptive, [BackendKey; 3]) {
        let id: VipId = "10.200.0.1:80/tcp".parse().unwrap();
        let mut v = Vip::new(id);
        v.adaptive_weights = true;
        let keys = [1, 2, 3].map(|i| (id, format!("10.0.0.{i}").parse().unwrap()));
        for k in &keys {
            v.backends.push(BackendEntry::new(k.1, 1));
        }
        let mut s = State::default();
        s.vips.push(v);
        let mut a = Adaptive::default();
        a.follow(&s);
        (a, keys)
    }

    /// One round of probes: `slow` takes `t` ms, the others 1 ms. Returns the steps.
    fn round(a: &mut Adaptive, keys: &[BackendKey; 3], slow: usize, t: u64) -> Vec<(usize, u32)> {
        let mut steps = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let took = if i == slow { ms(t) } else { ms(1) };
            if let Some(s) = a.record(*k, took, |_| true) {
                steps.push((i, s.to));
            }
        }
        steps
    }

    #[test]
    fn a_slow_backend_steps_down_to_the_floor_and_back() {
        let (mut a, keys) = adaptive();
        let mut steps = Vec::new();
        for n in 0..30 {
            for s in round(&mut a, &keys, 0, 100) {
                steps.push((n, s));
            }
        }
        // Judged from its fifth probe on; three steps down, each after three slow probes,
        // then it stays at the floor.
        let down: Vec<_> = steps.iter().map(|(_, s)| *s).collect();
        assert_eq!(down, vec![(0, 50), (0, 25), (0, 10)], "{steps:?}");
        let when: Vec<_> = steps.iter().map(|(n, _)| *n).collect();
        assert_eq!(when, vec![6, 9, 12], "{steps:?}");
        assert_eq!(a.speed(&keys[0]).unwrap().percent(), 10);
        assert_eq!(a.speed(&keys[1]).unwrap().percent(), 100);
        // Fast again: back up, one step per five fast probes once the average has come down.
        let mut up = Vec::new();
        for n in 0..40 {
            for s in round(&mut a, &keys, 0, 1) {
                up.push((n, s));
            }
        }
        let to: Vec<_> = up.iter().map(|(_, s)| *s).collect();
        assert_eq!(to, vec![(0, 25), (0, 50), (0, 100)], "{up:?}");
    }

    #[test]
    fn noise_and_a_backend_near_the_threshold_do_not_flap() {
        let (mut a, keys) = adaptive();
        // Peers at 1 ms; one backend between the two thresholds (1.5x-2x the median is
        // not enough excess; 15-25 ms swings around it) and single spikes on the others.
        let mut changes = 0;
        for n in 0..500u64 {
            for (i, k) in keys.iter().enumerate() {
                let took = match i {
                    0 => ms(if n % 2 == 0 { 15 } else { 25 }),
                    _ if n % 37 == 0 => ms(80),
                    _ => ms(1),
                };
                if a.record(*k, took, |_| true).is_some() {
                    changes += 1;
                }
            }
        }
        // The average of 15/25 ms settles near 20 ms: at most one step, never back and
        // forth.
        assert!(changes <= 1, "{changes} changes");
        assert_eq!(a.speed(&keys[1]).unwrap().percent(), 100);
        assert_eq!(a.speed(&keys[2]).unwrap().percent(), 100);
    }

    #[test]
    fn only_adaptive_vips_and_up_peers_count() {
        let (mut a, keys) = adaptive();
        // Without peers there is nothing to compare with.
        for _ in 0..10 {
            assert_eq!(a.record(keys[0], ms(100), |_| true), None);
        }
        // Peers that are down do not count.
        for _ in 0..10 {
            assert_eq!(a.record(keys[1], ms(1), |_| true), None);
        }
        for _ in 0..10 {
            assert_eq!(a.record(keys[0], ms(100), |k| *k == keys[0]), None);
        }
        // Turned off: forgotten, and nothing is judged.
        let mut s = State::default();
        s.vips.push(Vip::new(keys[0].0));
        a.follow(&s);
        assert!(a.speed(&keys[0]).is_none());
        assert_eq!(a.record(keys[0], ms(100), |_| true), None);
    }
}
