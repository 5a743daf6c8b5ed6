//! VRRP version 3 (RFC 5798): the advertisement codec and the per-router state machine.
//!
//! Both are pure. The state machine is driven with explicit times and returns the actions to
//! take (send an advertisement, become master, become backup), so it is tested without a
//! network; [`speaker`] does the I/O.

pub mod speaker;

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

pub const PROTO_VRRP: u8 = 112;
pub const VERSION: u8 = 3;
const TYPE_ADVERTISEMENT: u8 = 1;
/// Priority of the router that owns the addresses.
pub const OWNER: u8 = 255;
/// Priority in an advertisement of a master that stops being master (planned handover).
pub const RELEASE: u8 = 0;

/// An advertisement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Advert {
    pub vrid: u8,
    pub priority: u8,
    /// Advertisement interval, centiseconds (12 bits).
    pub interval_cs: u16,
    pub addrs: Vec<IpAddr>,
}

/// Why an advertisement was refused (also the label of its counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Invalid {
    Ttl,
    Version,
    Type,
    Checksum,
    Length,
    Vrid,
}

impl Invalid {
    pub fn name(self) -> &'static str {
        match self {
            Invalid::Ttl => "ttl",
            Invalid::Version => "version",
            Invalid::Type => "type",
            Invalid::Checksum => "checksum",
            Invalid::Length => "length",
            Invalid::Vrid => "vrid",
        }
    }
}

fn sum16(data: &[u8]) -> u32 {
    data.chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum()
}

/// The VRRPv3 checksum: over the message and the pseudo-header of its IP packet (RFC 5798
/// 5.2.8, for IPv4 as well as IPv6).
pub fn checksum(src: IpAddr, dst: IpAddr, msg: &[u8]) -> u16 {
    let mut sum = sum16(msg);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            sum += sum16(&s.octets()) + sum16(&d.octets());
            sum += PROTO_VRRP as u32 + msg.len() as u32;
        }
        (s, d) => {
            let b = |a: IpAddr| match a {
                IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
                IpAddr::V6(a) => a.octets(),
            };
            sum += sum16(&b(s)) + sum16(&b(d));
            sum += msg.len() as u32 + PROTO_VRRP as u32;
        }
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

impl Advert {
    /// The VRRP message (what follows the IP header), checksum included.
    pub fn encode(&self, src: IpAddr, dst: IpAddr) -> Vec<u8> {
        let mut m = vec![
            (VERSION << 4) | TYPE_ADVERTISEMENT,
            self.vrid,
            self.priority,
            self.addrs.len() as u8,
        ];
        m.extend_from_slice(&(self.interval_cs & 0x0fff).to_be_bytes());
        m.extend_from_slice(&[0, 0]);
        for a in &self.addrs {
            match a {
                IpAddr::V4(a) => m.extend_from_slice(&a.octets()),
                IpAddr::V6(a) => m.extend_from_slice(&a.octets()),
            }
        }
        let c = checksum(src, dst, &m);
        m[6..8].copy_from_slice(&c.to_be_bytes());
        m
    }

    /// Parses and checks a message received from `src` to `dst` with IP TTL / hop limit
    /// `ttl`, for virtual router `vrid`.
    pub fn decode(
        msg: &[u8],
        src: IpAddr,
        dst: IpAddr,
        ttl: u8,
        vrid: u8,
    ) -> Result<Self, Invalid> {
        if ttl != 255 {
            return Err(Invalid::Ttl);
        }
        if msg.len() < 8 {
            return Err(Invalid::Length);
        }
        if msg[0] >> 4 != VERSION {
            return Err(Invalid::Version);
        }
        if msg[0] & 0x0f != TYPE_ADVERTISEMENT {
            return Err(Invalid::Type);
        }
        let count = msg[3] as usize;
        let alen = if src.is_ipv4() { 4 } else { 16 };
        if msg.len() < 8 + count * alen {
            return Err(Invalid::Length);
        }
        if checksum(src, dst, msg) != 0 {
            return Err(Invalid::Checksum);
        }
        if msg[1] != vrid {
            return Err(Invalid::Vrid);
        }
        let addrs = (0..count)
            .map(|i| {
                let a = &msg[8 + i * alen..8 + (i + 1) * alen];
                if alen == 4 {
                    IpAddr::from(<[u8; 4]>::try_from(a).expect("4 bytes"))
                } else {
                    IpAddr::from(<[u8; 16]>::try_from(a).expect("16 bytes"))
                }
            })
            .collect();
        Ok(Advert {
            vrid: msg[1],
            priority: msg[2],
            interval_cs: u16::from_be_bytes([msg[4], msg[5]]) & 0x0fff,
            addrs,
        })
    }
}

/// RFC 5798 states (the API's type: what `maglb vrrp status` shows).
pub use crate::api::VrrpState as State;

/// What the caller must do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send an advertisement with this priority.
    Advertise(u8),
    /// Take the addresses: add them, announce them (gratuitous ARP / NA), forward.
    BecomeMaster,
    /// Give the addresses up.
    BecomeBackup,
    /// Still master, but the router may be sending elsewhere (our link came back, our
    /// priority came back, we stalled, or another router thinks it is master): announce the
    /// addresses again (gratuitous ARP / unsolicited NA burst).
    Announce,
}

/// Every priority a router with these settings can advertise while it takes part: the
/// configured one less any combination of the tracking penalties (clamped to 1-254).
/// A peer advertising one of them ties with us in some failure, and a tie goes to the
/// higher address, not to the intended master.
pub fn reachable_priorities(
    priority: u8,
    interface_penalty: u8,
    vip_penalties: &[u8],
) -> BTreeSet<u8> {
    if priority == OWNER {
        return BTreeSet::from([OWNER]);
    }
    let mut out = BTreeSet::new();
    let n = vip_penalties.len().min(8);
    for down in [false, true] {
        for mask in 0u32..(1 << n) {
            let mut p = priority as i32 - if down { interface_penalty as i32 } else { 0 };
            for (i, v) in vip_penalties.iter().take(n).enumerate() {
                if mask & (1 << i) != 0 {
                    p -= *v as i32;
                }
            }
            out.insert(p.clamp(1, 254) as u8);
        }
    }
    out
}

/// The settings of one virtual router.
#[derive(Clone, Debug)]
pub struct Settings {
    pub priority: u8,
    pub interval: Duration,
    pub preempt: bool,
    pub preempt_delay: Duration,
}

/// One virtual router (RFC 5798 section 6.4).
#[derive(Debug)]
pub struct Router {
    pub s: Settings,
    pub state: State,
    /// The master's advertisement interval, learnt from its advertisements.
    pub master_interval: Duration,
    /// When the master is declared down (Backup).
    down_at: Option<Instant>,
    /// When to advertise next (Master).
    advert_at: Option<Instant>,
    /// When this router started: no preemption before `started + preempt_delay`.
    started: Instant,
    /// The last re-announcement caused by a lower-priority advertisement (rate limit).
    announced_at: Option<Instant>,
    /// Last master heard from (Backup), and why the last transition happened.
    pub master: Option<IpAddr>,
    pub reason: String,
    pub since: Instant,
}

impl Router {
    pub fn new(s: Settings, now: Instant) -> Self {
        let interval = s.interval;
        Self {
            s,
            state: State::Initialize,
            master_interval: interval,
            down_at: None,
            advert_at: None,
            started: now,
            announced_at: None,
            master: None,
            reason: "starting".into(),
            since: now,
        }
    }

    /// Skew_Time: lower priorities wait longer.
    pub fn skew(&self) -> Duration {
        self.master_interval * (256 - self.s.priority as u32) / 256
    }

    /// Master_Down_Interval.
    pub fn master_down_interval(&self) -> Duration {
        3 * self.master_interval + self.skew()
    }

    fn to(&mut self, state: State, reason: impl Into<String>, now: Instant) {
        self.state = state;
        self.reason = reason.into();
        self.since = now;
    }

    fn become_master(&mut self, reason: &str, now: Instant) -> Vec<Action> {
        self.to(State::Master, reason, now);
        self.down_at = None;
        self.master = None;
        self.advert_at = Some(now + self.s.interval);
        vec![Action::Advertise(self.s.priority), Action::BecomeMaster]
    }

    fn become_backup(&mut self, reason: &str, now: Instant) -> Vec<Action> {
        let was_master = self.state == State::Master;
        self.to(State::Backup, reason, now);
        self.advert_at = None;
        self.master_interval = self.s.interval;
        self.down_at = Some(now + self.master_down_interval());
        if was_master {
            vec![Action::BecomeBackup]
        } else {
            vec![]
        }
    }

    /// Startup event.
    pub fn start(&mut self, now: Instant) -> Vec<Action> {
        self.started = now;
        if self.s.priority == OWNER {
            self.become_master("address owner (priority 255)", now)
        } else {
            let mut a = vec![Action::BecomeBackup];
            a.extend(self.become_backup("started", now));
            a
        }
    }

    /// Shutdown event (or a planned handover): a master sends priority 0 and gives up.
    pub fn shutdown(&mut self, now: Instant) -> Vec<Action> {
        let mut out = vec![];
        if self.state == State::Master {
            out = vec![Action::Advertise(RELEASE), Action::BecomeBackup];
        }
        self.to(State::Initialize, "shut down", now);
        self.down_at = None;
        self.advert_at = None;
        out
    }

    /// Changes the priority (tracking); a master advertises it at once. A master whose
    /// priority goes up (back to full after its link or a VIP recovered) also announces its
    /// addresses again: while it was lower, a peer may have taken them over without this
    /// router ever seeing itself lose mastership.
    pub fn set_priority(&mut self, p: u8, now: Instant) -> Vec<Action> {
        if p == self.s.priority {
            return vec![];
        }
        let up = p > self.s.priority;
        self.s.priority = p;
        if self.state == State::Master {
            self.advert_at = Some(now + self.s.interval);
            if up {
                return vec![Action::Advertise(p), Action::Announce];
            }
            return vec![Action::Advertise(p)];
        }
        vec![]
    }

    /// The interface came back up. A master advertises and announces its addresses at once:
    /// the peer took over while the link was down, and the router sends to the peer's MAC.
    pub fn link_up(&mut self, now: Instant) -> Vec<Action> {
        if self.state != State::Master {
            return vec![];
        }
        self.advert_at = Some(now + self.s.interval);
        vec![Action::Advertise(self.s.priority), Action::Announce]
    }

    /// An advertisement arrived from `from` (already checked).
    pub fn advert(&mut self, a: &Advert, from: IpAddr, local: IpAddr, now: Instant) -> Vec<Action> {
        match self.state {
            State::Initialize => vec![],
            State::Backup => {
                if a.priority == RELEASE {
                    // The master leaves: take over after Skew_Time only.
                    self.down_at = Some(now + self.skew());
                    self.reason = format!("master {from} released");
                    return vec![];
                }
                self.master = Some(from);
                let may_preempt = self.s.preempt && now >= self.started + self.s.preempt_delay;
                if a.priority >= self.s.priority || !may_preempt {
                    // Accept this master: wait for it again.
                    self.master_interval = Duration::from_millis(a.interval_cs as u64 * 10)
                        .max(Duration::from_millis(10));
                    self.down_at = Some(now + self.master_down_interval());
                    return vec![];
                }
                // Else a lower-priority master and preemption allowed. RFC 5798 discards the
                // advertisement and lets Master_Down_Interval (about 3 intervals) run out; this
                // router takes over after Skew_Time instead, as after a release: the master
                // it preempts is known and lower, and a failback then takes one interval
                // less than four.
                let at = now + self.skew();
                if self.down_at.is_none_or(|t| t > at) {
                    self.down_at = Some(at);
                    self.reason =
                        format!("preempting lower priority master {from} ({})", a.priority);
                }
                vec![]
            }
            State::Master => {
                if a.priority == RELEASE {
                    self.advert_at = Some(now);
                    return self.tick(now);
                }
                let theirs_wins =
                    a.priority > self.s.priority || (a.priority == self.s.priority && from > local);
                if !theirs_wins {
                    // Another router believes it is master (it took over while we were cut
                    // off or stalled): assert mastership now rather than at the next interval,
                    // and announce the addresses again, at most once per second.
                    self.advert_at = Some(now + self.s.interval);
                    let mut out = vec![Action::Advertise(self.s.priority)];
                    if self
                        .announced_at
                        .is_none_or(|t| now >= t + Duration::from_secs(1))
                    {
                        self.announced_at = Some(now);
                        out.push(Action::Announce);
                    }
                    return out;
                }
                self.master_interval =
                    Duration::from_millis(a.interval_cs as u64 * 10).max(Duration::from_millis(10));
                let out = self.become_backup(
                    &format!("higher priority master {from} ({})", a.priority),
                    now,
                );
                self.master = Some(from);
                out
            }
        }
    }

    /// Timers. Call at least every `next_deadline`.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        match self.state {
            State::Backup if self.down_at.is_some_and(|t| now >= t) => {
                let why = match &self.master {
                    Some(m) if self.reason.contains("released") => format!("master {m} released"),
                    Some(_) if self.reason.starts_with("preempting") => self.reason.clone(),
                    Some(m) => format!(
                        "no advertisement from {m} for {:?}",
                        self.master_down_interval()
                    ),
                    None => format!("no master heard for {:?}", self.master_down_interval()),
                };
                self.become_master(&why, now)
            }
            State::Master if self.advert_at.is_some_and(|t| now >= t) => {
                // Advertisements this late mean this router stalled long enough for a backup
                // to take over: announce the addresses again as well.
                let stalled = self
                    .advert_at
                    .is_some_and(|t| now >= t + self.master_down_interval());
                self.advert_at = Some(now + self.s.interval);
                if stalled {
                    self.reason = "stalled past Master_Down_Interval; announcing again".into();
                    return vec![Action::Advertise(self.s.priority), Action::Announce];
                }
                vec![Action::Advertise(self.s.priority)]
            }
            _ => vec![],
        }
    }

    /// When `tick` next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Backup => self.down_at,
            State::Master => self.advert_at,
            State::Initialize => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn codec_round_trip_and_validation() {
        let (src, dst) = (ip("10.10.2.2"), ip("224.0.0.18"));
        let a = Advert {
            vrid: 51,
            priority: 150,
            interval_cs: 100,
            addrs: vec![ip("10.10.2.100"), ip("10.10.2.101")],
        };
        let m = a.encode(src, dst);
        assert_eq!(m.len(), 16);
        assert_eq!(m[0], 0x31);
        assert_eq!(Advert::decode(&m, src, dst, 255, 51), Ok(a.clone()));
        assert_eq!(Advert::decode(&m, src, dst, 64, 51), Err(Invalid::Ttl));
        assert_eq!(Advert::decode(&m, src, dst, 255, 52), Err(Invalid::Vrid));
        let mut bad = m.clone();
        bad[0] = 0x21;
        assert_eq!(
            Advert::decode(&bad, src, dst, 255, 51),
            Err(Invalid::Version)
        );
        let mut bad = m.clone();
        bad[2] ^= 1;
        assert_eq!(
            Advert::decode(&bad, src, dst, 255, 51),
            Err(Invalid::Checksum)
        );
        assert_eq!(
            Advert::decode(&m[..10], src, dst, 255, 51),
            Err(Invalid::Length)
        );
        // IPv6.
        let (s6, d6) = (ip("fe80::1"), ip("ff02::12"));
        let a6 = Advert {
            vrid: 7,
            priority: 100,
            interval_cs: 10,
            addrs: vec![ip("fd20::1")],
        };
        assert_eq!(Advert::decode(&a6.encode(s6, d6), s6, d6, 255, 7), Ok(a6));
    }

    fn router(priority: u8, t: Instant) -> Router {
        Router::new(
            Settings {
                priority,
                interval: Duration::from_millis(100),
                preempt: true,
                preempt_delay: Duration::ZERO,
            },
            t,
        )
    }

    fn advert(priority: u8) -> Advert {
        Advert {
            vrid: 1,
            priority,
            interval_cs: 10,
            addrs: vec![],
        }
    }

    const ME: &str = "10.0.0.2";
    const PEER: &str = "10.0.0.3";

    #[test]
    fn backup_takes_over_after_master_down_interval() {
        let t0 = Instant::now();
        let mut r = router(100, t0);
        assert_eq!(r.start(t0), [Action::BecomeBackup]);
        // Master_Down_Interval = 3 * 100 ms + (256 - 100) * 100 ms / 256 = 360.9 ms.
        assert_eq!(r.master_down_interval(), Duration::from_nanos(360_937_500));
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(r.advert(&advert(150), ip(PEER), ip(ME), at(50)).is_empty());
        assert!(r.tick(at(400)).is_empty(), "adverts keep it backup");
        assert_eq!(
            r.tick(at(420)),
            [Action::Advertise(100), Action::BecomeMaster]
        );
        assert_eq!(r.state, State::Master);
        assert!(
            r.reason.contains("no advertisement from 10.0.0.3"),
            "{}",
            r.reason
        );
        assert_eq!(r.tick(at(520)), [Action::Advertise(100)]);
    }

    #[test]
    fn higher_priority_preempts_once_and_release_hands_over_fast() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut m = router(100, t0);
        m.start(t0);
        m.tick(at(400));
        assert_eq!(m.state, State::Master);
        // A returning higher-priority router advertises: this one steps down, once.
        assert_eq!(
            m.advert(&advert(150), ip(PEER), ip(ME), at(500)),
            [Action::BecomeBackup]
        );
        assert!(m.advert(&advert(150), ip(PEER), ip(ME), at(600)).is_empty());
        assert_eq!(m.state, State::Backup);
        // The higher one: a lower master is preempted when its Master_Down fires.
        let mut h = router(150, t0);
        h.start(t0);
        h.advert(&advert(100), ip(ME), ip(PEER), at(10));
        assert_eq!(
            h.tick(at(10 + 350)),
            [Action::Advertise(150), Action::BecomeMaster]
        );
        // Planned handover: priority 0, and the backup takes over after Skew_Time only.
        assert_eq!(
            h.shutdown(at(1000)),
            [Action::Advertise(RELEASE), Action::BecomeBackup]
        );
        let mut b = router(100, t0);
        b.start(t0);
        b.advert(&advert(RELEASE), ip(PEER), ip(ME), at(1000));
        let skew = b.skew();
        assert!(
            b.tick(at(1000) + skew - Duration::from_millis(1))
                .is_empty()
        );
        assert_eq!(
            b.tick(at(1000) + skew),
            [Action::Advertise(100), Action::BecomeMaster]
        );
    }

    fn master(priority: u8, t0: Instant) -> Router {
        let mut m = router(priority, t0);
        m.start(t0);
        m.tick(t0 + Duration::from_millis(400));
        assert_eq!(m.state, State::Master);
        m
    }

    #[test]
    fn a_master_announces_again_after_link_up_priority_return_stall_or_a_rival() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // Link down costs 50: the master advertises 100, no announcement.
        let mut m = master(150, t0);
        assert_eq!(m.set_priority(100, at(450)), [Action::Advertise(100)]);
        // Back to full priority: advertise at once and announce (the peer may hold the
        // router's ARP entry by now).
        assert_eq!(
            m.set_priority(150, at(900)),
            [Action::Advertise(150), Action::Announce]
        );
        // Link up while master: the same, even if the priority never changed.
        assert_eq!(
            m.link_up(at(950)),
            [Action::Advertise(150), Action::Announce]
        );
        // A backup has nothing to announce.
        let mut b = router(100, t0);
        b.start(t0);
        assert!(b.link_up(at(10)).is_empty());
        // A stall: the next advertisement is due long past Master_Down_Interval.
        let mut m = master(150, t0);
        let due = m.next_deadline().unwrap();
        assert_eq!(m.tick(due), [Action::Advertise(150)]);
        let due = m.next_deadline().unwrap();
        assert_eq!(
            m.tick(due + Duration::from_secs(2)),
            [Action::Advertise(150), Action::Announce]
        );
        // A lower-priority router advertising as master: assert mastership and announce,
        // announcing at most once a second.
        let mut m = master(150, t0);
        assert_eq!(
            m.advert(&advert(100), ip(PEER), ip(ME), at(500)),
            [Action::Advertise(150), Action::Announce]
        );
        assert_eq!(
            m.advert(&advert(100), ip(PEER), ip(ME), at(600)),
            [Action::Advertise(150)]
        );
        assert_eq!(m.state, State::Master);
    }

    #[test]
    fn a_higher_priority_backup_preempts_after_skew_time() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut h = router(150, t0);
        h.start(t0);
        assert!(h.advert(&advert(100), ip(PEER), ip(ME), at(10)).is_empty());
        // Skew_Time at priority 150: (256 - 150) / 256 × 100 ms = 41.4 ms.
        assert!(h.tick(at(10 + 41)).is_empty());
        assert_eq!(
            h.tick(at(10 + 42)),
            [Action::Advertise(150), Action::BecomeMaster]
        );
        assert!(h.reason.contains("preempting"), "{}", h.reason);
        // No preemption: the lower master is accepted.
        let mut n = router(150, t0);
        n.s.preempt = false;
        n.start(t0);
        n.advert(&advert(100), ip(PEER), ip(ME), at(10));
        assert!(n.tick(at(300)).is_empty());
    }

    #[test]
    fn reachable_priorities_show_the_ties_penalties_make() {
        // The held-out pair: 150 less 50 for a link down is 100, the peer's priority.
        let r = reachable_priorities(150, 50, &[]);
        assert_eq!(r, BTreeSet::from([100, 150]));
        let r = reachable_priorities(150, 60, &[20, 30]);
        assert_eq!(r, BTreeSet::from([40, 60, 70, 90, 100, 120, 130, 150]));
        assert_eq!(reachable_priorities(10, 50, &[]), BTreeSet::from([1, 10]));
        assert_eq!(
            reachable_priorities(OWNER, 50, &[]),
            BTreeSet::from([OWNER])
        );
    }

    #[test]
    fn equal_priority_ties_go_to_the_higher_address_and_owner_starts_master() {
        let t0 = Instant::now();
        let mut m = router(100, t0);
        m.start(t0);
        m.tick(t0 + Duration::from_millis(400));
        assert_eq!(
            m.advert(&advert(100), ip("10.0.0.1"), ip(ME), t0),
            [Action::Advertise(100), Action::Announce],
            "lower address loses, and is told so at once"
        );
        assert_eq!(
            m.advert(&advert(100), ip("10.0.0.9"), ip(ME), t0),
            [Action::BecomeBackup]
        );
        let mut o = router(OWNER, t0);
        assert_eq!(o.start(t0), [Action::Advertise(255), Action::BecomeMaster]);
    }
}
