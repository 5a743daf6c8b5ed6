//! One probe of one backend: TCP connect, HTTP or HTTPS GET (reqwest with rustls; keep-alive,
//! chunked bodies, no redirects), or a UDP datagram that must be answered. Every probe is
//! bounded by its timeout.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use tokio::net::{TcpSocket, UdpSocket};

use crate::state::{HealthCheck, ProbeKind, parse_statuses};

/// What one probe found: `Ok`, or why it failed.
pub type ProbeResult = Result<(), String>;

/// Bytes of an HTTP body read, at most (enough for a status and a health body).
const BODY_LIMIT: usize = 64 * 1024;

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

    /// A prober that keeps what may be reused between probes (an HTTP client and its
    /// keep-alive connection).
    pub fn prober(&self) -> Result<Prober, String> {
        let http = match self.check.kind {
            ProbeKind::Http | ProbeKind::Https => Some(self.http_client()?),
            _ => None,
        };
        Ok(Prober {
            probe: self.clone(),
            http,
        })
    }

    /// The host name of the check (Host header and SNI), or the backend's address.
    fn host(&self) -> String {
        self.check
            .host
            .clone()
            .unwrap_or_else(|| match self.target.ip() {
                IpAddr::V4(a) => a.to_string(),
                IpAddr::V6(a) => format!("[{a}]"),
            })
    }

    fn url(&self) -> String {
        let scheme = if self.check.kind == ProbeKind::Https {
            "https"
        } else {
            "http"
        };
        format!(
            "{scheme}://{}:{}{}",
            self.host(),
            self.target.port(),
            self.check.path
        )
    }

    fn http_client(&self) -> Result<reqwest::Client, String> {
        crate::tls::install_provider();
        let timeout = Duration::from_millis(self.check.timeout_ms as u64);
        let mut b = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout)
            .pool_max_idle_per_host(1)
            .user_agent("maglb-health")
            .no_proxy();
        if let Some(host) = &self.check.host {
            // The name is the check's; the address is always the backend's.
            b = b.resolve(host, self.target);
        }
        if let Some(src) = self.check.source {
            b = b.local_address(src);
        }
        if self.check.kind == ProbeKind::Https {
            b = crate::tls::configure(b, self.check.tls_ca.as_deref(), self.check.tls_insecure)?;
        }
        b.build()
            .map_err(|e| format!("HTTP client: {}", crate::error_chain(&e)))
    }
}

/// Runs one backend's probes.
pub struct Prober {
    pub probe: Probe,
    http: Option<reqwest::Client>,
}

impl Prober {
    /// Runs the probe once, within its timeout. Returns the result and how long it took.
    pub async fn run(&self) -> (ProbeResult, Duration) {
        let start = Instant::now();
        let timeout = Duration::from_millis(self.probe.check.timeout_ms as u64);
        let r = match tokio::time::timeout(timeout, self.attempt()).await {
            Ok(r) => r,
            Err(_) => Err(format!("timeout after {} ms", self.probe.check.timeout_ms)),
        };
        (r, start.elapsed())
    }

    async fn attempt(&self) -> ProbeResult {
        match self.probe.check.kind {
            ProbeKind::None => Ok(()),
            ProbeKind::Tcp => self.connect().await,
            ProbeKind::Http | ProbeKind::Https => self.http().await,
            ProbeKind::Udp => self.udp().await,
        }
    }

    async fn connect(&self) -> ProbeResult {
        let target = self.probe.target;
        let sock = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| e.to_string())?;
        if let Some(src) = self.probe.check.source {
            sock.bind(SocketAddr::new(src, 0))
                .map_err(|e| format!("binding {src}: {e}"))?;
        }
        sock.connect(target)
            .await
            .map(drop)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::ConnectionRefused => "connection refused".to_owned(),
                _ => e.to_string(),
            })
    }

    async fn http(&self) -> ProbeResult {
        let client = self.http.as_ref().expect("made for HTTP checks");
        let check = &self.probe.check;
        let host = self.probe.host();
        let mut resp = client
            .get(self.probe.url())
            .send()
            .await
            .map_err(|e| http_error(&e, &host))?;
        let status = resp.status().as_u16();
        let ranges = parse_statuses(&check.expect_status)?;
        if !ranges.iter().any(|(a, b)| (*a..=*b).contains(&status)) {
            return Err(format!("status {status}"));
        }
        let Some(want) = &check.body_contains else {
            return Ok(());
        };
        let mut body = Vec::new();
        while body.len() < BODY_LIMIT {
            match resp.chunk().await.map_err(|e| http_error(&e, &host))? {
                Some(c) => body.extend_from_slice(&c),
                None => break,
            }
        }
        if !String::from_utf8_lossy(&body).contains(want.as_str()) {
            return Err(format!("body lacks {want:?}"));
        }
        Ok(())
    }

    async fn udp(&self) -> ProbeResult {
        let target = self.probe.target;
        let bind = match (self.probe.check.source, target) {
            (Some(src), _) => SocketAddr::new(src, 0),
            (None, SocketAddr::V4(_)) => "0.0.0.0:0".parse().expect("literal"),
            (None, SocketAddr::V6(_)) => "[::]:0".parse().expect("literal"),
        };
        let s = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
        s.connect(target).await.map_err(|e| e.to_string())?;
        let payload = self
            .probe
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

/// A short reason for a failed HTTP(S) exchange: refused, timed out, or the TLS problem in
/// words (which certificate check failed, for which name, and what to do about it).
fn http_error(e: &reqwest::Error, host: &str) -> String {
    let chain = crate::error_chain(e);
    if let Some(tls) = rustls_error(e) {
        format!("TLS: {}", tls_reason(tls, host))
    } else if chain.contains("Connection refused") {
        "connection refused".into()
    } else if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        format!("connect: {}", chain.rsplit(": ").next().unwrap_or(&chain))
    } else {
        chain
    }
}

/// The rustls error somewhere in `e`'s chain. hyper-rustls hands it on inside `io::Error`s
/// (nested twice), whose `source()` skips their payload, so each payload is searched too.
fn rustls_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    if let Some(r) = e.downcast_ref::<rustls::Error>() {
        return Some(r);
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        && let Some(r) = rustls_error(inner)
    {
        return Some(r);
    }
    e.source().and_then(rustls_error)
}

fn tls_reason(e: &rustls::Error, host: &str) -> String {
    use rustls::{CertificateError as C, Error as E};
    match e {
        E::InvalidCertificate(c) => match c {
            C::UnknownIssuer => "certificate not trusted: unknown issuer (set tls_ca to the CA \
                                 that signed it, or tls_insecure = true)"
                .into(),
            C::NotValidForNameContext { .. } => format!("{c} (set host to a name it has)"),
            C::NotValidForName => {
                format!("certificate not valid for the name {host} (set host to a name it has)")
            }
            C::Expired | C::ExpiredContext { .. } => format!("certificate expired: {c}"),
            C::NotValidYet | C::NotValidYetContext { .. } => {
                format!("certificate not valid yet: {c}")
            }
            C::BadSignature => "certificate signature does not verify against the trusted \
                                 certificates (is tls_ca the CA that signed it?)"
                .into(),
            C::InvalidPurpose | C::InvalidPurposeContext { .. } => {
                format!("certificate not for TLS servers: {c}")
            }
            other => format!("certificate refused: {other}"),
        },
        E::AlertReceived(alert) => format!("the server ended the handshake: {alert:?}"),
        E::InvalidMessage(_) | E::InappropriateMessage { .. } => {
            format!("the server does not speak TLS here ({e})")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use tokio::{
        io::{AsyncReadExt as _, AsyncWriteExt as _},
        net::TcpListener,
    };

    use super::*;

    fn check(kind: ProbeKind) -> HealthCheck {
        HealthCheck {
            kind,
            timeout_ms: 500,
            ..HealthCheck::default()
        }
    }

    fn prober(port: u16, h: &HealthCheck) -> Prober {
        Probe::new("127.0.0.1".parse().unwrap(), port, h)
            .prober()
            .unwrap()
    }

    #[tokio::test]
    async fn tcp_and_udp() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let p = prober(port, &check(ProbeKind::Tcp));
        assert_eq!(p.run().await.0, Ok(()));
        drop(l);
        assert_eq!(p.run().await.0, Err("connection refused".into()));

        let u = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let port = u.local_addr().unwrap().port();
        let echo = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let (n, from) = u.recv_from(&mut buf).await.unwrap();
            u.send_to(&buf[..n], from).await.unwrap();
        });
        let p = prober(port, &check(ProbeKind::Udp));
        assert_eq!(p.run().await.0, Ok(()));
        echo.await.unwrap();
        assert_eq!(p.run().await.0, Err("port unreachable".into()));
    }

    /// Serves `answers` in order on one keep-alive connection per answer list item; an empty
    /// answer hangs.
    async fn server(answers: Vec<&'static str>) -> (u16, tokio::task::JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            for a in answers {
                let mut buf = [0u8; 1024];
                if s.read(&mut buf).await.unwrap_or(0) == 0 {
                    let (n, _) = l.accept().await.unwrap();
                    s = n;
                    let _ = s.read(&mut buf).await;
                }
                if a.is_empty() {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    return;
                }
                s.write_all(a.as_bytes()).await.unwrap();
            }
        });
        (port, task)
    }

    #[tokio::test]
    async fn http_on_one_keep_alive_connection_with_chunked_bodies() {
        // The server never closes: a probe that waited for the close would time out.
        let (port, task) = server(vec![
            "HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nall ok",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nall\r\n3\r\n ok\r\n0\r\n\r\n",
            "HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbad",
            "HTTP/1.1 302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0\r\n\r\n",
            "",
        ])
        .await;
        let mut h = check(ProbeKind::Http);
        h.body_contains = Some("ok".into());
        let p = prober(port, &h);
        assert_eq!(p.run().await.0, Ok(()));
        assert_eq!(p.run().await.0, Ok(()));
        assert_eq!(p.run().await.0, Err("status 503".into()));
        assert_eq!(p.run().await.0, Err("body lacks \"ok\"".into()));
        h.body_contains = None;
        h.expect_status = "200".into();
        let p2 = Prober {
            probe: Probe::new("127.0.0.1".parse().unwrap(), port, &h),
            http: p.http.clone(),
        };
        assert_eq!(
            p2.run().await.0,
            Err("status 302".into()),
            "no redirect followed"
        );
        let (r, took) = p2.run().await;
        assert!(r.unwrap_err().contains("timeout"));
        assert!(took >= Duration::from_millis(500) && took < Duration::from_millis(1500));
        task.abort();
    }
}
