//! A steady stream of requests through a topology while something happens to it: new
//! connections in a loop, and long-lived ones asked now and then, until stopped.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use crate::topology::{self, Conns, TCP_PORT, Topology, vip_addr};

/// New connections in a loop, and long-lived ones asked now and then, until stopped.
pub struct Traffic {
    stop: Arc<AtomicBool>,
    done: Arc<Mutex<Vec<Instant>>>,
    handle: std::thread::JoinHandle<(usize, Vec<String>)>,
}

impl Traffic {
    pub fn start(t: &Topology) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(Mutex::new(Vec::new()));
        let (s, d) = (stop.clone(), done.clone());
        let handle = t
            .client
            .spawn(move || {
                let mut long = Conns::open(20, vip_addr(TCP_PORT), Duration::from_secs(5)).unwrap();
                let mut failed = 0;
                let mut broken = Vec::new();
                for round in 0..100_000 {
                    if s.load(Ordering::Relaxed) {
                        break;
                    }
                    // Generous timeout: a SYN lost in the failover gap is resent after 1 s.
                    match topology::tcp_request(vip_addr(TCP_PORT), Duration::from_secs(5)) {
                        Ok(_) => d.lock().unwrap().push(Instant::now()),
                        Err(_) => failed += 1,
                    }
                    if round % 10 == 0 {
                        broken.extend(long.broken());
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                broken.extend(long.broken());
                (failed, broken)
            })
            .unwrap();
        Self { stop, done, handle }
    }

    /// Stops; returns (failed requests, broken long-lived connections, longest gap between
    /// completed requests).
    pub fn stop(self) -> (usize, Vec<String>, Duration) {
        self.stop.store(true, Ordering::Relaxed);
        let (failed, broken) = self.handle.join().unwrap();
        let done = self.done.lock().unwrap();
        let gap = done
            .windows(2)
            .map(|w| w[1] - w[0])
            .max()
            .unwrap_or_default();
        (failed, broken, gap)
    }
}

/// One request of [`Requests`]: when it started and ended, and the backend that answered or
/// why it failed.
#[derive(Clone, Debug)]
pub struct Request {
    pub target: std::net::SocketAddr,
    pub start: Instant,
    pub end: Instant,
    pub result: Result<String, String>,
}

impl Request {
    pub fn ok(&self) -> bool {
        self.result.is_ok()
    }
}

/// Requests on new TCP connections, round robin over `targets`, one at a time with a pause
/// between them, each recorded, until stopped (or a bound of a million requests).
pub struct Requests {
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Request>>>,
    handle: std::thread::JoinHandle<()>,
}

impl Requests {
    /// Starts sending from `ns` (the client's namespace).
    pub fn start(
        ns: &crate::netns::Netns,
        targets: Vec<std::net::SocketAddr>,
        timeout: Duration,
        pause: Duration,
    ) -> Self {
        assert!(!targets.is_empty());
        Self::start_shared(ns, Arc::new(Mutex::new(targets)), timeout, pause)
    }

    /// As `start`, to targets the caller may change meanwhile (none: it waits).
    pub fn start_shared(
        ns: &crate::netns::Netns,
        targets: Arc<Mutex<Vec<std::net::SocketAddr>>>,
        timeout: Duration,
        pause: Duration,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let log = Arc::new(Mutex::new(Vec::new()));
        let (s, l) = (stop.clone(), log.clone());
        let handle = ns
            .spawn(move || {
                for i in 0..1_000_000usize {
                    if s.load(Ordering::Relaxed) {
                        break;
                    }
                    let Some(target) = ({
                        let t = targets.lock().unwrap();
                        (!t.is_empty()).then(|| t[i % t.len()])
                    }) else {
                        std::thread::sleep(pause);
                        continue;
                    };
                    let start = Instant::now();
                    let result =
                        topology::tcp_request(target, timeout).map_err(|e| format!("{e:#}"));
                    l.lock().unwrap().push(Request {
                        target,
                        start,
                        end: Instant::now(),
                        result,
                    });
                    std::thread::sleep(pause);
                }
            })
            .expect("client thread");
        Self { stop, log, handle }
    }

    /// The requests so far.
    pub fn log(&self) -> Vec<Request> {
        self.log.lock().unwrap().clone()
    }

    /// How many requests so far.
    pub fn count(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    /// Stops, and returns every request.
    pub fn stop(self) -> Vec<Request> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.join();
        std::mem::take(&mut *self.log.lock().unwrap())
    }
}
