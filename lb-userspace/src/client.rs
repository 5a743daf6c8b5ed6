//! The CLI's side of the API: one HTTP/1.1 request per connection over the Unix socket.

use std::{
    io::{Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Serialize, de::DeserializeOwned};

use crate::api::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the maglb agent at {socket}: {source}. Start it with `maglb agent` (or `systemctl start maglb`), or point --socket at it"
    )]
    NoAgent {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Refused(String),
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
}

/// Sends a request; returns the JSON body of a 200 answer, or the agent's error message.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<String, ClientError> {
    let mut s = UnixStream::connect(socket).map_err(|source| ClientError::NoAgent {
        socket: socket.to_owned(),
        source,
    })?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: maglb\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| ClientError::Protocol(text.chars().take(200).collect()))?;
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::Protocol(head.to_owned()))?;
    if status == 200 {
        return Ok(body.to_owned());
    }
    let msg = serde_json::from_str::<ErrorBody>(body)
        .map(|e| e.error)
        .unwrap_or_else(|_| body.to_owned());
    Err(ClientError::Refused(msg))
}

pub fn get<T: DeserializeOwned>(socket: &Path, path: &str) -> Result<T, ClientError> {
    let body = call(socket, "GET", path, None)?;
    serde_json::from_str(&body).map_err(|e| ClientError::Protocol(e.to_string()))
}

pub fn send<B: Serialize, T: DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
    body: &B,
) -> Result<T, ClientError> {
    let body = serde_json::to_string(body).expect("serializes");
    let out = call(socket, method, path, Some(&body))?;
    serde_json::from_str(&out).map_err(|e| ClientError::Protocol(e.to_string()))
}
