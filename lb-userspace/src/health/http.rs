//! HTTP and HTTPS probes: hyper's client over the probe's own sockets. Keep-alive (one idle
//! connection kept per backend), HTTP/1.1, chunked bodies, no redirects followed; TLS by
//! rustls ([`crate::tls`]). The sockets carry what the probe's route asks for: the mark and
//! interface of a probe over the tunnel, the check's source address.

use std::{
    future::Ready,
    io,
    iter::Once,
    net::{IpAddr, SocketAddr},
    task::{Context, Poll},
    time::Duration,
};

use http_body_util::{BodyExt as _, Empty};
use hyper::{Request, Uri, body::Bytes, header::USER_AGENT};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::{
    client::legacy::{
        Client,
        connect::{HttpConnector, dns::Name},
    },
    rt::{TokioExecutor, TokioTimer},
};

use super::ProbeResult;
use crate::error_chain;

/// Resolves every name to the probe's target: the name is the check's (`host`: the Host
/// header and the TLS server name), the address is always the probe's.
#[derive(Clone, Debug)]
struct Target(SocketAddr);

impl tower::Service<Name> for Target {
    type Response = Once<SocketAddr>;
    type Error = io::Error;
    type Future = Ready<Result<Self::Response, io::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Name) -> Self::Future {
        std::future::ready(Ok(std::iter::once(self.0)))
    }
}

/// What the probe's sockets are made with.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SocketOpts {
    /// `SO_MARK` (probes over the tunnel: which backend the classifier sends them to).
    pub mark: Option<u32>,
    /// `SO_BINDTODEVICE`: the interface the packets leave through.
    pub interface: Option<String>,
    /// Source address.
    pub source: Option<IpAddr>,
}

/// One backend's HTTP(S) client and the URL it probes.
#[derive(Clone)]
pub struct HttpClient {
    client: Client<HttpsConnector<HttpConnector<Target>>, Empty<Bytes>>,
    url: Uri,
}

impl HttpClient {
    /// `url`'s host is the check's name (or the target's address); connections go to
    /// `target` whatever the name. `tls`: the TLS settings of an HTTPS check.
    pub fn new(
        url: &str,
        target: SocketAddr,
        tls: Option<rustls::ClientConfig>,
        sock: &SocketOpts,
        timeout: Duration,
    ) -> Result<Self, String> {
        let url: Uri = url.parse().map_err(|e| format!("URL {url}: {e}"))?;
        let mut http = HttpConnector::new_with_resolver(Target(target));
        http.enforce_http(false);
        http.set_nodelay(true);
        // The probe's own timeout bounds every attempt; this one only backs it up (a connect
        // that timed out first would report less clearly than "timeout after N ms").
        http.set_connect_timeout(Some(2 * timeout));
        http.set_local_address(sock.source);
        http.set_mark(sock.mark);
        if let Some(i) = &sock.interface {
            http.set_interface(i.clone());
        }
        let tls = match tls {
            Some(t) => t,
            // A plain HTTP check never uses it; any configuration will do.
            None => crate::tls::client_config(None, true)?,
        };
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(1)
            .pool_timer(TokioTimer::new())
            .build(connector);
        Ok(Self { client, url })
    }

    /// GETs the URL: the status must be in `ranges`, and the body (up to `limit` bytes) must
    /// contain `want` when given. `host` names the server in reasons.
    pub async fn check(
        &self,
        ranges: &[(u16, u16)],
        want: Option<&str>,
        limit: usize,
        host: &str,
    ) -> ProbeResult {
        let req = Request::get(self.url.clone())
            .header(USER_AGENT, "maglb-health")
            .body(Empty::new())
            .map_err(|e| e.to_string())?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| http_error(&e, host))?;
        let status = resp.status().as_u16();
        if !ranges.iter().any(|(a, b)| (*a..=*b).contains(&status)) {
            return Err(format!("status {status}"));
        }
        let mut body = resp.into_body();
        let Some(want) = want else {
            // Read to the end, so that the connection can carry the next probe.
            while let Some(f) = body.frame().await {
                f.map_err(|e| http_error(&e, host))?;
            }
            return Ok(());
        };
        let mut seen = Vec::new();
        while seen.len() < limit {
            match body.frame().await {
                Some(f) => {
                    if let Some(d) = f.map_err(|e| http_error(&e, host))?.data_ref() {
                        seen.extend_from_slice(d);
                    }
                }
                None => break,
            }
        }
        if !String::from_utf8_lossy(&seen).contains(want) {
            return Err(format!("body lacks {want:?}"));
        }
        Ok(())
    }
}

/// A short reason for a failed HTTP(S) exchange: refused, timed out, or the TLS problem in
/// words (which certificate check failed, for which name, and what to do about it).
fn http_error(e: &(dyn std::error::Error + 'static), host: &str) -> String {
    let chain = error_chain(e);
    if let Some(tls) = rustls_error(e) {
        format!("TLS: {}", tls_reason(tls, host))
    } else if chain.contains("Connection refused") {
        "connection refused".into()
    } else if chain.contains("timed out") || chain.contains("deadline has elapsed") {
        "timeout".into()
    } else if e
        .downcast_ref::<hyper_util::client::legacy::Error>()
        .is_some_and(|e| e.is_connect())
    {
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
