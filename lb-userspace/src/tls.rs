//! TLS for HTTPS health checks: rustls with the ring provider, the system's roots (through
//! rustls-platform-verifier) or a CA file, and verification on unless a check turns it off.

use std::sync::Once;

/// Installs rustls' crypto provider for the process (once).
pub fn install_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only when a provider is installed already, which is what we want.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Sets up a client's TLS: trust only the PEM certificates of `ca` when given, else the
/// system's roots; `insecure` accepts any certificate.
pub fn configure(
    b: reqwest::ClientBuilder,
    ca: Option<&str>,
    insecure: bool,
) -> Result<reqwest::ClientBuilder, String> {
    let mut b = b.tls_danger_accept_invalid_certs(insecure);
    if let Some(path) = ca {
        let pem = std::fs::read(path).map_err(|e| format!("reading tls_ca {path}: {e}"))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("tls_ca {path}: {}", crate::error_chain(&e)))?;
        if certs.is_empty() {
            return Err(format!("tls_ca {path}: no PEM certificate in it"));
        }
        b = b.tls_certs_only(certs);
    }
    Ok(b)
}
