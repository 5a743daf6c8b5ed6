//! TLS for HTTPS health checks: rustls with the ring provider, the system's roots (through
//! rustls-platform-verifier) or a CA file, and verification on unless a check turns it off.

use std::sync::{Arc, Once};

use rustls::{
    ClientConfig, DigitallySignedStruct, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject as _},
};

/// Installs rustls' crypto provider for the process (once).
pub fn install_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // Fails only when a provider is installed already, which is what we want.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

fn provider() -> Arc<CryptoProvider> {
    install_provider();
    CryptoProvider::get_default()
        .cloned()
        .unwrap_or_else(|| Arc::new(rustls::crypto::ring::default_provider()))
}

/// A client's TLS settings: trust only the PEM certificates of `ca` when
/// given, else the system's roots; `insecure` accepts any certificate.
pub fn client_config(ca: Option<&str>, insecure: bool) -> Result<ClientConfig, String> {
    let provider = provider();
    let b = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS settings: {e}"))?;
    let c = if insecure {
        b.dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerifier(provider)))
            .with_no_client_auth()
    } else if let Some(path) = ca {
        let pem = std::fs::read(path).map_err(|e| format!("reading tls_ca {path}: {e}"))?;
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&pem) {
            let cert = cert.map_err(|e| format!("tls_ca {path}: {e}"))?;
            roots.add(cert).map_err(|e| format!("tls_ca {path}: {e}"))?;
        }
        if roots.is_empty() {
            return Err(format!("tls_ca {path}: no PEM certificate in it"));
        }
        b.with_root_certificates(roots).with_no_client_auth()
    } else {
        let system = rustls_platform_verifier::Verifier::new(provider)
            .map_err(|e| format!("the system's certificate authorities: {e}"))?;
        b.dangerous()
            .with_custom_certificate_verifier(Arc::new(system))
            .with_no_client_auth()
    };
    Ok(c)
}

/// Accepts every certificate (`tls_insecure`).
#[derive(Debug)]
struct NoVerifier(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn verify_tls13_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Ok(HandshakeSignatureValid::assertion())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
