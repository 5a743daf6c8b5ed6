//! Health probes and the per-backend up/down state machine.
//!
//! `Tracker` is pure: results in, transitions out (up after `rise` consecutive successes,
//! down after `fall` consecutive failures, so one lost probe never flaps a backend). The
//! probes are async: each backend has its own task (see the agent), so a slow or hung
//! backend only ever delays itself.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpSocket, UdpSocket},
};

use crate::state::{HealthCheck, ProbeKind, parse_statuses};

/// What one probe found.
pub type ProbeResult = Result<(), String>;

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
        Self {
            up: true,
            ok_run: 0,
            fail_run: 0,
            last: None,
            latency: None,
            since: Instant::now(),
            checks: 0,
        }
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

/// Where and how to probe one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub target: SocketAddr,
    pub check: HealthCheck,
}

impl Probe {
    pub fn new(backend: IpAddr, vip_port: u16, check: &HealthCheck) -> Self {
        Self {
            target: SocketAddr::new(backend, check.port.unwrap_or(vip_port)),
            check: check.clone(),
        }
    }

    /// Runs the probe once, within its timeout. Returns the result and how long it took.
    pub async fn run(&self) -> (ProbeResult, Duration) {
        let start = Instant::now();
        let timeout = Duration::from_millis(self.check.timeout_ms as u64);
        let r = match tokio::time::timeout(timeout, self.attempt()).await {
            Ok(r) => r,
            Err(_) => Err(format!("timeout after {} ms", self.check.timeout_ms)),
        };
        (r, start.elapsed())
    }

    async fn connect(&self) -> Result<tokio::net::TcpStream, String> {
        let sock = if self.target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| e.to_string())?;
        if let Some(src) = self.check.source {
            sock.bind(SocketAddr::new(src, 0))
                .map_err(|e| format!("binding {src}: {e}"))?;
        }
        sock.connect(self.target).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
            _ => e.to_string(),
        })
    }

    async fn attempt(&self) -> ProbeResult {
        match self.check.kind {
            ProbeKind::None => Ok(()),
            ProbeKind::Tcp => self.connect().await.map(drop),
            ProbeKind::Http => self.http().await,
            ProbeKind::Udp => self.udp().await,
        }
    }

    async fn http(&self) -> ProbeResult {
        let mut s = self.connect().await?;
        let host = self
            .check
            .host
            .clone()
            .unwrap_or_else(|| match self.target {
                SocketAddr::V4(a) => a.to_string(),
                SocketAddr::V6(a) => a.to_string(),
            });
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: maglb-health\r\nAccept: */*\r\nConnection: close\r\n\r\n",
            self.check.path
        );
        s.write_all(req.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        // Read until the server closes or 64 KiB: enough for a status and a health body.
        let mut buf = Vec::with_capacity(1024);
        let mut chunk = [0u8; 4096];
        while buf.len() < 64 * 1024 {
            match s.read(&mut chunk).await {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if buf.is_empty() => return Err(e.to_string()),
                Err(_) => break,
            }
        }
        let text = String::from_utf8_lossy(&buf);
        let status: u16 = text
            .split_whitespace()
            .nth(1)
            .filter(|_| text.starts_with("HTTP/"))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| "no HTTP response".to_owned())?;
        let ranges = parse_statuses(&self.check.expect_status).map_err(|e| e.to_string())?;
        if !ranges.iter().any(|(a, b)| (*a..=*b).contains(&status)) {
            return Err(format!("status {status}"));
        }
        if let Some(want) = &self.check.body_contains {
            let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            if !body.contains(want.as_str()) {
                return Err(format!("body lacks {want:?}"));
            }
        }
        Ok(())
    }

    async fn udp(&self) -> ProbeResult {
        let bind = match (self.check.source, self.target) {
            (Some(src), _) => SocketAddr::new(src, 0),
            (None, SocketAddr::V4(_)) => "0.0.0.0:0".parse().expect("literal"),
            (None, SocketAddr::V6(_)) => "[::]:0".parse().expect("literal"),
        };
        let s = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
        s.connect(self.target).await.map_err(|e| e.to_string())?;
        let payload = self
            .check
            .payload
            .clone()
            .unwrap_or_else(|| "maglb-health".into());
        s.send(payload.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = [0u8; 2048];
        match s.recv(&mut buf).await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Err("port unreachable".to_owned())
            }
            Err(e) => Err(e.to_string()),
        }
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

    fn check(kind: ProbeKind) -> HealthCheck {
        HealthCheck {
            kind,
            timeout_ms: 500,
            ..HealthCheck::default()
        }
    }

    #[tokio::test]
    async fn probes_against_local_servers() {
        use tokio::net::TcpListener;
        // TCP: a listener passes; a closed port is refused.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let p = Probe::new("127.0.0.1".parse().unwrap(), port, &check(ProbeKind::Tcp));
        assert_eq!(p.run().await.0, Ok(()));
        drop(l);
        assert_eq!(p.run().await.0, Err("connection refused".into()));

        // HTTP: status and body are judged; a server that never answers times out.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let answers = [
            "HTTP/1.1 200 OK\r\n\r\nall ok",
            "HTTP/1.1 503 Unavailable\r\n\r\n",
            "HTTP/1.1 200 OK\r\n\r\nbad",
            "",
        ];
        let server = tokio::spawn(async move {
            let mut held = Vec::new();
            for a in answers {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                if a.is_empty() {
                    held.push(s); // hung: accepts, never answers
                    tokio::time::sleep(Duration::from_secs(2)).await;
                } else {
                    s.write_all(a.as_bytes()).await.unwrap();
                }
            }
        });
        let mut h = check(ProbeKind::Http);
        h.body_contains = Some("ok".into());
        let p = Probe::new("127.0.0.1".parse().unwrap(), port, &h);
        assert_eq!(p.run().await.0, Ok(()));
        assert_eq!(p.run().await.0, Err("status 503".into()));
        assert_eq!(p.run().await.0, Err("body lacks \"ok\"".into()));
        let (r, took) = p.run().await;
        assert_eq!(r, Err("timeout after 500 ms".into()));
        assert!(took >= Duration::from_millis(500) && took < Duration::from_millis(1500));
        server.abort();

        // UDP: an answer passes; a closed port is unreachable.
        let u = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = u.local_addr().unwrap().port();
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let (n, from) = u.recv_from(&mut buf).await.unwrap();
            u.send_to(&buf[..n], from).await.unwrap();
        });
        let p = Probe::new("127.0.0.1".parse().unwrap(), port, &check(ProbeKind::Udp));
        assert_eq!(p.run().await.0, Ok(()));
        echo.await.unwrap();
        assert_eq!(p.run().await.0, Err("port unreachable".into()));
    }
}
