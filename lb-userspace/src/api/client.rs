//! The CLI's side of the API: HTTP/1.1 (hyper) over the agent's Unix socket.
//!
//! Every change carries a request id. If the connection breaks before the answer (the agent
//! was killed mid-change), the client waits for an agent to answer again and asks whether the
//! change was committed, so its answer is the truth either way.

use std::{
    path::{Path, PathBuf},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use http_body_util::{BodyExt as _, Full};
use hyper::{Request, StatusCode, body::Bytes, header};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};
use tokio::net::UnixStream;

use super::{Changes, ErrorBody, REQUEST_ID_HEADER, RequestStatus};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the maglb agent at {socket}: {error}. Start it with `maglb agent` (or `systemctl start maglb`), or point --socket at it"
    )]
    NoAgent {
        socket: PathBuf,
        error: std::io::Error,
    },
    /// The socket exists but is not open to this user (the admin socket is root only).
    #[error(
        "{socket} is open to root only: changes need root (sudo maglb ...); status, lists, stats and health work for any user through the read-only socket"
    )]
    Forbidden { socket: PathBuf },
    #[error("talking to the agent: {0}")]
    Io(String),
    /// The connection broke after the request was sent: the outcome is not known yet.
    #[error("the connection to the agent broke before it answered: {0}")]
    Interrupted(String),
    #[error("{0}")]
    Refused(String),
    #[error("unexpected answer from the agent: {0}")]
    Protocol(String),
}

/// How long a call may take (an `apply` of thousands of backends included).
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a client whose change was interrupted waits for an agent to answer again.
const RECONNECT_FOR: Duration = Duration::from_secs(20);

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime for the API client")
    })
}

/// A request id unique to this process and call.
fn new_request_id() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "{}-{:x}-{}",
        std::process::id(),
        nanos,
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

async fn connect(socket: &Path) -> Result<UnixStream, ClientError> {
    let mut tries = 0;
    loop {
        match UnixStream::connect(socket).await {
            Ok(s) => return Ok(s),
            // A full accept queue: wait a little and try again.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && tries < 50 => {
                tries += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
                return Err(ClientError::Forbidden {
                    socket: socket.to_owned(),
                });
            }
            Err(error) => {
                return Err(ClientError::NoAgent {
                    socket: socket.to_owned(),
                    error,
                });
            }
        }
    }
}

/// One request and its answer: (status, body).
async fn exchange(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<String>,
    request_id: Option<&str>,
) -> Result<(StatusCode, Bytes), ClientError> {
    let stream = connect(socket).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ClientError::Io(e.to_string()))?;
    tokio::spawn(conn);
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "maglb")
        .header(header::CONTENT_TYPE, "application/json");
    if let Some(id) = request_id {
        req = req.header(REQUEST_ID_HEADER, id);
    }
    let req = req
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|e| ClientError::Protocol(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ClientError::Interrupted(crate::error_chain(&e)))?;
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| ClientError::Interrupted(crate::error_chain(&e)))?
        .to_bytes();
    Ok((status, bytes))
}

fn answer(status: StatusCode, body: Bytes) -> Result<String, ClientError> {
    let text = String::from_utf8_lossy(&body).into_owned();
    if status == StatusCode::OK {
        return Ok(text);
    }
    let msg = serde_json::from_str::<ErrorBody>(&text)
        .map(|e| e.error)
        .unwrap_or_else(|_| format!("{status}: {text}"));
    Err(ClientError::Refused(msg))
}

/// Sends a request; returns the JSON body of a 200 answer, or the agent's error message.
pub fn call(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<String, ClientError> {
    let body = body.map(str::to_owned);
    runtime().block_on(async {
        let (status, bytes) =
            tokio::time::timeout(CALL_TIMEOUT, exchange(socket, method, path, body, None))
                .await
                .map_err(|_| ClientError::Io("no answer within 120 s".into()))??;
        answer(status, bytes)
    })
}

pub fn get<T: DeserializeOwned>(socket: &Path, path: &str) -> Result<T, ClientError> {
    let body = call(socket, "GET", path, None)?;
    serde_json::from_str(&body).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// Sends a change. When the connection breaks before the answer, asks the agent (waiting
/// for one to answer again) whether the change was committed.
pub fn send<B: Serialize, T: DeserializeOwned>(
    socket: &Path,
    method: &str,
    path: &str,
    body: &B,
) -> Result<T, ClientError> {
    let body = serde_json::to_string(body).expect("serializes");
    let id = new_request_id();
    let out = runtime().block_on(async {
        let sent = tokio::time::timeout(
            CALL_TIMEOUT,
            exchange(socket, method, path, Some(body), Some(&id)),
        )
        .await
        .map_err(|_| ClientError::Interrupted("no answer within 120 s".into()))?;
        match sent {
            Ok((status, bytes)) => answer(status, bytes),
            Err(ClientError::Interrupted(why)) => outcome(socket, &id, &why).await,
            Err(e) => Err(e),
        }
    })?;
    serde_json::from_str(&out).map_err(|e| ClientError::Protocol(e.to_string()))
}

/// What became of request `id` after its connection broke.
async fn outcome(socket: &Path, id: &str, why: &str) -> Result<String, ClientError> {
    let started = Instant::now();
    while started.elapsed() < RECONNECT_FOR {
        let asked = exchange(socket, "GET", &format!("/v1/requests/{id}"), None, None).await;
        if let Ok((StatusCode::OK, bytes)) = asked {
            let st: RequestStatus =
                serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
            return if st.committed {
                let c = Changes {
                    changes: vec![
                        "the agent stopped while applying this change; it was committed, and the restarted agent carries it".into(),
                    ],
                };
                Ok(serde_json::to_string(&c).expect("serializes"))
            } else {
                Err(ClientError::Refused(format!(
                    "the agent stopped before committing this change ({why}); nothing changed: run the command again"
                )))
            };
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(ClientError::Interrupted(format!(
        "{why}; no agent answered within {} s, so whether the change was committed is unknown: check with `maglb config export` once the agent runs",
        RECONNECT_FOR.as_secs()
    )))
}
