//! Minimal HTTP/1.1 over the Unix socket: one request per connection, JSON bodies, capped
//! sizes. Enough for the CLI and for `curl --unix-socket`.

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Largest request head and body.
pub const MAX_HEAD: usize = 16 * 1024;
pub const MAX_BODY: usize = 4 * 1024 * 1024;

pub struct Request {
    pub method: String,
    pub path: String,
    pub body: Vec<u8>,
}

/// Reads one request; `Err` is the status and message to answer with.
pub async fn read_request<S: tokio::io::AsyncRead + Unpin>(
    s: &mut S,
) -> Result<Request, (u16, String)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        if buf.len() > MAX_HEAD {
            return Err((431, "request head too large".into()));
        }
        let n = s.read(&mut chunk).await.map_err(|e| (400, e.to_string()))?;
        if n == 0 {
            return Err((
                400,
                "connection closed before the request was complete".into(),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let first = lines.next().unwrap_or_default();
    let mut parts = first.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err((400, format!("bad request line {first:?}")));
    };
    let mut len = 0usize;
    for l in lines {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                len = v
                    .trim()
                    .parse()
                    .map_err(|_| (400, "bad Content-Length".to_string()))?;
            }
        }
    }
    if len > MAX_BODY {
        return Err((413, format!("request body over {MAX_BODY} bytes")));
    }
    let mut body = buf[head_end + 4..].to_vec();
    while body.len() < len {
        let n = s.read(&mut chunk).await.map_err(|e| (400, e.to_string()))?;
        if n == 0 {
            return Err((400, "connection closed inside the body".into()));
        }
        body.extend_from_slice(&chunk[..n]);
    }
    body.truncate(len);
    let path = target.split('?').next().unwrap_or(target).to_owned();
    Ok(Request {
        method: method.to_owned(),
        path,
        body,
    })
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

pub async fn write_response<S: tokio::io::AsyncWrite + Unpin>(s: &mut S, status: u16, body: &str) {
    write_typed(s, status, "application/json", body).await
}

pub async fn write_typed<S: tokio::io::AsyncWrite + Unpin>(
    s: &mut S,
    status: u16,
    content_type: &str,
    body: &str,
) {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    let _ = s.write_all(head.as_bytes()).await;
    let _ = s.write_all(body.as_bytes()).await;
    let _ = s.shutdown().await;
}
