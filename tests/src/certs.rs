//! Test certificates, made with openssl.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// A self-signed server certificate for the DNS name `name` (and the address `ip`, if any),
/// not a CA: it is its own trust anchor when given as `tls_ca`. Written with its key under
/// `dir` as `stem.pem` and `stem.key`.
pub fn self_signed(dir: &Path, stem: &str, name: &str, ip: Option<&str>) -> (PathBuf, PathBuf) {
    let (cert, key) = (
        dir.join(format!("{stem}.pem")),
        dir.join(format!("{stem}.key")),
    );
    let san = match ip {
        Some(ip) => format!("subjectAltName=DNS:{name},IP:{ip}"),
        None => format!("subjectAltName=DNS:{name}"),
    };
    let out = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", &format!("/CN={name}")])
        .args([
            "-addext",
            &san,
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}
