//! One probe of one backend: TCP connect, HTTP or HTTPS GET (hyper with rustls; keep-alive,
//! chunked bodies, no redirects), or a UDP datagram that must be answered. Every probe is
//! bounded by its timeout.
//!
//! A probe goes direct (to the backend's own address) or over the tunnel (to the VIP, its
//! sockets marked for the balancer's probe classifier, which encapsulates them toward the
//! backend exactly like client traffic; see [`Route`]).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use socket2::SockRef;
use tokio::net::{TcpSocket, UdpSocket};

use super::http::{HttpClient, SocketOpts};
use crate::state::{HealthCheck, ProbeKind, ProbeVia, parse_statuses};

/// What one probe found: `Ok`, or why it failed.
pub type ProbeResult = Result<(), String>;

/// Bytes of an HTTP body read, at most (enough for a status and a health body).
const BODY_LIMIT: usize = 64 * 1024;

/// Which way a probe goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// To the backend's own address, as an ordinary connection. `because`: why not over the
    /// tunnel, when the check left the choice to the agent.
    Direct { because: Option<String> },
    /// To the VIP, leaving through `interface` with `SO_MARK = mark`; the probe classifier
    /// there encapsulates it toward the backend.
    Tunnel { mark: u32, interface: String },
    /// The check asks for the tunnel and the balancer cannot carry it now (why): every probe
    /// fails with that reason, and nothing is sent.
    Unavailable(String),
}

/// Where and how to probe one backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub target: SocketAddr,
    pub check: HealthCheck,
    pub route: Route,
}

impl Probe {
    /// A direct probe of `backend`.
    pub fn new(backend: IpAddr, vip_port: u16, check: &HealthCheck) -> Self {
        Self {
            target: SocketAddr::new(backend, check.port.unwrap_or(vip_port)),
            check: check.clone(),
            route: Route::Direct { because: None },
        }
    }

    /// A probe over the tunnel: to the VIP's address, marked for the backend's slot.
    pub fn tunnel(vip: IpAddr, vip_port: u16, check: &HealthCheck, route: Route) -> Self {
        Self {
            target: SocketAddr::new(vip, check.port.unwrap_or(vip_port)),
            check: check.clone(),
            route,
        }
    }

    /// The way it goes, for views.
    pub fn via(&self) -> ProbeVia {
        match self.route {
            Route::Direct { .. } => ProbeVia::Direct,
            Route::Tunnel { .. } | Route::Unavailable(_) => ProbeVia::Tunnel,
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

    /// The host name of the check (Host header and SNI), or the target's address.
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

    fn socket_opts(&self) -> SocketOpts {
        let (mark, interface) = match &self.route {
            Route::Tunnel { mark, interface } => (Some(*mark), Some(interface.clone())),
            _ => (None, None),
        };
        SocketOpts {
            mark,
            interface,
            source: self.check.source,
        }
    }

    fn http_client(&self) -> Result<HttpClient, String> {
        let timeout = Duration::from_millis(self.check.timeout_ms as u64);
        let tls = match self.check.kind {
            ProbeKind::Https => Some(crate::tls::client_config(
                self.check.tls_ca.as_deref(),
                self.check.tls_insecure,
            )?),
            _ => None,
        };
        HttpClient::new(&self.url(), self.target, tls, &self.socket_opts(), timeout)
    }
}

/// Runs one backend's probes.
pub struct Prober {
    pub probe: Probe,
    http: Option<HttpClient>,
}

impl Prober {
    /// Runs the probe once, within its timeout. Returns the result and how long it took.
    pub async fn run(&self) -> (ProbeResult, Duration) {
        let start = Instant::now();
        if let Route::Unavailable(why) = &self.probe.route {
            return (Err(format!("no tunnel: {why}")), start.elapsed());
        }
        let timeout = Duration::from_millis(self.probe.check.timeout_ms as u64);
        let r = match tokio::time::timeout(timeout, self.attempt()).await {
            Ok(r) => r,
            Err(_) => Err(format!("timeout after {} ms", self.probe.check.timeout_ms)),
        };
        let r = match (&self.probe.route, r) {
            (Route::Tunnel { .. }, Err(why)) => Err(tunnel_reason(&why, self.probe.target)),
            (_, r) => r,
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

    /// Applies the route's mark and interface to a socket.
    fn route_socket(&self, sock: SockRef<'_>) -> ProbeResult {
        if let Route::Tunnel { mark, interface } = &self.probe.route {
            sock.set_mark(*mark)
                .map_err(|e| format!("setting the probe mark: {e}"))?;
            sock.bind_device(Some(interface.as_bytes()))
                .map_err(|e| format!("binding to {interface}: {e}"))?;
        }
        Ok(())
    }

    async fn connect(&self) -> ProbeResult {
        let target = self.probe.target;
        let sock = if target.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| e.to_string())?;
        self.route_socket(SockRef::from(&sock))?;
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
        let ranges = parse_statuses(&check.expect_status)?;
        client
            .check(
                &ranges,
                check.body_contains.as_deref(),
                BODY_LIMIT,
                &self.probe.host(),
            )
            .await
    }

    async fn udp(&self) -> ProbeResult {
        let target = self.probe.target;
        let bind = match (self.probe.check.source, target) {
            (Some(src), _) => SocketAddr::new(src, 0),
            (None, SocketAddr::V4(_)) => "0.0.0.0:0".parse().expect("literal"),
            (None, SocketAddr::V6(_)) => "[::]:0".parse().expect("literal"),
        };
        let s = UdpSocket::bind(bind).await.map_err(|e| e.to_string())?;
        self.route_socket(SockRef::from(&s))?;
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

/// A failure over the tunnel, with what it says about the backend. The probe reached the
/// backend encapsulated like client traffic: no answer at all means the backend did not
/// take the packet off the tunnel or has no VIP to give it to, and a refusal means the VIP
/// is there but nothing listens on it.
fn tunnel_reason(why: &str, target: SocketAddr) -> String {
    if why.starts_with("timeout") {
        format!(
            "{why} over the tunnel: the VIP does not answer on the backend (decap missing, or \
             the VIP not on its loopback?)"
        )
    } else if why == "connection refused" || why == "port unreachable" {
        format!("{why} over the tunnel: the backend has the VIP, but nothing serves {target}")
    } else {
        format!("{why} (over the tunnel)")
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
