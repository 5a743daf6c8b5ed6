//! The HTTP edge: hyper connections and axum routes. The admin socket (root only) takes every
//! call; the read-only socket and the metrics listener answer reads. Reads come from the
//! latest snapshot and never wait; writes queue for the one writer. Idle connections time
//! out and are not counted against anyone, so they cannot lock anyone out. Every error is
//! JSON with a message; HTTP status codes live here and nowhere else.

use std::{sync::Arc, time::Duration};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Extension, Path, State},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    middleware::{self, Next},
    response::{Html, IntoResponse, Response},
    routing::{get, post},
};
use hyper_util::{rt::TokioIo, rt::TokioTimer, service::TowerToHyperService};
use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, UnixListener},
    sync::watch,
};
use tracing::{info, warn};

use super::{
    AttachRequest, BackendRequest, Changes, ConfigText, ErrorBody, HealthRequest, PolicyRequest,
    REQUEST_ID_HEADER, RequestStatus, SwitchRequest, Verification, VipRef, VipRequest,
    VipSetRequest,
};
use crate::{
    bgp::announcer::{BgpHandle, Op as BgpOp},
    state::{BackendEntry, BackendState, Change, Refusal, State as DesiredState, Vip},
    views::Views,
    vrrp::speaker::Command as VrrpCommand,
    writer::{WriteError, WriterHandle},
};

/// Largest request body (a `maglb.toml` of thousands of backends fits).
pub const MAX_BODY: usize = 4 << 20;
/// A client that has not sent a whole request head by then is disconnected.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// What the handlers share.
pub struct Api {
    pub writer: WriterHandle,
    pub views: Views,
    pub vrrp: watch::Sender<VrrpCommand>,
    pub bgp: BgpHandle,
    pub metrics: Registry,
}

type Shared = Arc<Api>;

/// An error answer: a status and a message.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<Refusal> for ApiError {
    fn from(r: Refusal) -> Self {
        let status = match &r {
            Refusal::Invalid(_) => StatusCode::BAD_REQUEST,
            Refusal::NotFound(_) => StatusCode::NOT_FOUND,
            Refusal::Conflict(_) => StatusCode::CONFLICT,
        };
        ApiError(status, r.to_string())
    }
}

impl From<WriteError> for ApiError {
    fn from(e: WriteError) -> Self {
        let status = match &e {
            WriteError::Refused(r) => return r.clone().into(),
            WriteError::Exhausted(_) => StatusCode::CONFLICT,
            WriteError::Storage(s) if s.is_unwritable() => StatusCode::INSUFFICIENT_STORAGE,
            WriteError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            WriteError::Attach(_) => StatusCode::BAD_REQUEST,
            WriteError::Datapath(_) => StatusCode::INTERNAL_SERVER_ERROR,
            WriteError::Stopping => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(status, crate::error_chain(&e))
    }
}

type Answer<T> = Result<Json<T>, ApiError>;

/// A JSON body, refused with a message when it does not parse.
fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, format!("request body: {e}")))
}

fn request_id(headers: &HeaderMap) -> Option<String> {
    headers
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 64)
        .map(str::to_owned)
}

async fn write(api: &Api, headers: &HeaderMap, change: Change) -> Answer<Changes> {
    let changes = api.writer.change(change, request_id(headers)).await?;
    Ok(Json(Changes { changes }))
}

/// The routes every listener answers: reads.
fn read_routes() -> Router<Shared> {
    Router::new()
        .route(
            "/v1/status",
            get(|State(a): State<Shared>| async move { Json(a.views.status()) }),
        )
        .route(
            "/v1/vips",
            get(|State(a): State<Shared>| async move { Json(a.views.vips()) }),
        )
        .route(
            "/v1/stats",
            get(|State(a): State<Shared>| async move { Json(a.views.stats()) }),
        )
        .route(
            "/v1/health",
            get(|State(a): State<Shared>| async move { Json(a.views.probes()) }),
        )
        .route("/v1/vrrp", get(vrrp_status))
        .route("/v1/bgp", get(bgp_status))
        .route(
            "/v1/config",
            get(|State(a): State<Shared>| async move {
                Json(ConfigText {
                    config: a.views.config_text(),
                })
            }),
        )
        .route("/v1/validate", post(validate))
}

/// The admin socket's routes: reads and every change.
pub fn admin(api: Shared) -> Router {
    read_routes()
        .route("/v1/attach", post(attach))
        .route("/v1/detach", post(detach))
        .route("/v1/vips", post(vip_add).delete(vip_del))
        .route("/v1/vips/switch", post(switch))
        .route("/v1/vips/set", post(vip_set))
        .route("/v1/vips/policy", post(policy))
        .route("/v1/backends", post(backend_add).delete(backend_del))
        .route("/v1/backends/weight", post(backend_weight))
        .route("/v1/backends/{action}", post(backend_state))
        .route("/v1/health", post(health))
        .route("/v1/apply", post(apply))
        .route("/v1/vrrp/{action}", post(vrrp_command))
        .route("/v1/bgp/{action}", post(bgp_command))
        .route("/v1/requests/{id}", get(committed))
        .route("/v1/verify", get(verify))
        .fallback(not_found)
        .method_not_allowed_fallback(not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(json_errors))
        .layer(middleware::from_fn(audit))
        .with_state(api)
}

/// The read-only socket's routes.
pub fn read_only(api: Shared) -> Router {
    read_routes()
        .fallback(not_found)
        .method_not_allowed_fallback(|m: Method, uri: Uri| async move {
            ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{m} {uri}: this socket is read-only; changes go through the admin socket (root)"),
            )
        })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn(json_errors))
        .with_state(api)
}

/// The metrics listener's routes: `/metrics` and the live status page.
pub fn metrics(api: Shared) -> Router {
    Router::new()
        .route("/metrics", get(scrape))
        .route("/", get(|| async { Html(super::page::HTML) }))
        .route(
            "/status.json",
            get(|State(a): State<Shared>| async move { Json(super::page::data(&a.views)) }),
        )
        .fallback(|| async {
            ApiError(
                StatusCode::NOT_FOUND,
                "try /metrics, or / for the status page".into(),
            )
        })
        .layer(middleware::from_fn(json_errors))
        .with_state(api)
}

async fn not_found(m: Method, uri: Uri) -> ApiError {
    let msg = if uri.path().starts_with("/v1/") {
        format!("no such API call {m} {}; see docs/api.md", uri.path())
    } else {
        "the API lives under /v1/; see docs/api.md".into()
    };
    ApiError(StatusCode::NOT_FOUND, msg)
}

async fn not_allowed(m: Method, uri: Uri) -> ApiError {
    ApiError(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{m} is not an API call on {}; see docs/api.md", uri.path()),
    )
}

async fn scrape(State(a): State<Shared>, headers: HeaderMap) -> Response {
    let om = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains(crate::metrics::OPENMETRICS));
    let (ctype, text) = crate::metrics::render(&a.metrics, om);
    ([(header::CONTENT_TYPE, ctype)], text).into_response()
}

async fn vrrp_status(State(a): State<Shared>) -> Answer<super::VrrpStatus> {
    a.views.vrrp().map(Json).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "VRRP is not running: add a [vrrp] section with `maglb apply` (and attach)".into(),
        )
    })
}

async fn vrrp_command(State(a): State<Shared>, Path(action): Path<String>) -> Answer<Changes> {
    if a.views.vrrp().is_none() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "VRRP is not running".into(),
        ));
    }
    let (cmd, what) = match action.as_str() {
        "release" => (
            VrrpCommand::Release,
            "released: backup until `maglb vrrp claim`",
        ),
        "claim" => (
            VrrpCommand::Claim,
            "claimed: back to the configured priority",
        ),
        _ => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no VRRP action {action:?}; release or claim"),
            ));
        }
    };
    let _ = a.vrrp.send(cmd);
    Ok(Json(Changes {
        changes: vec![what.to_owned()],
    }))
}

async fn bgp_status(State(a): State<Shared>) -> Answer<super::BgpStatus> {
    a.views.bgp().map(Json).ok_or_else(|| {
        ApiError(
            StatusCode::NOT_FOUND,
            "BGP announcements are off: add a [bgp] section with `maglb apply`".into(),
        )
    })
}

/// `withdraw` answers once the routes are gone and `withdraw_wait_ms` has passed (the router
/// has stopped sending); `announce` once the routes that qualify are back.
async fn bgp_command(State(a): State<Shared>, Path(action): Path<String>) -> Answer<Changes> {
    if !a.bgp.active() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            "BGP announcements are off: add a [bgp] section with `maglb apply`".into(),
        ));
    }
    let line = match action.as_str() {
        "withdraw" => {
            let waited = a
                .bgp
                .withdraw_and_wait(BgpOp::Withdraw)
                .await
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
            format!(
                "withdrawn: every VIP address, until `maglb bgp announce` (took {} ms, the withdraw wait included)",
                waited.as_millis()
            )
        }
        "announce" => {
            a.bgp
                .request(BgpOp::Announce)
                .await
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
            let n = a
                .views
                .bgp()
                .map_or(0, |s| s.addresses.iter().filter(|x| x.announced).count());
            format!("announcing again: {n} VIP addresses qualify now")
        }
        _ => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no BGP action {action:?}; withdraw or announce"),
            ));
        }
    };
    Ok(Json(Changes {
        changes: vec![line],
    }))
}

async fn validate(State(a): State<Shared>, b: Bytes) -> Answer<Changes> {
    let t: ConfigText = body(&b)?;
    let file = DesiredState::from_toml(&t.config)?;
    Ok(Json(Changes {
        changes: a.views.preview(file)?,
    }))
}

async fn apply(State(a): State<Shared>, h: HeaderMap, b: Bytes) -> Answer<Changes> {
    let t: ConfigText = body(&b)?;
    let file = DesiredState::from_toml(&t.config)?;
    write(&a, &h, Change::Apply(file)).await
}

async fn attach(State(a): State<Shared>, h: HeaderMap, b: Bytes) -> Answer<Changes> {
    let r: AttachRequest = body(&b)?;
    write(
        &a,
        &h,
        Change::Attach {
            iface: r.iface,
            mode: r.mode,
        },
    )
    .await
}

/// A detach withdraws the BGP announcements first and keeps forwarding for
/// `withdraw_wait_ms`, so the router stops sending before the datapath goes.
async fn detach(State(a): State<Shared>, h: HeaderMap) -> Answer<Changes> {
    let mut lines = Vec::new();
    let attached = a.views.snapshot().state.balancer.interface.is_some();
    if a.bgp.active() && attached {
        let waited = a
            .bgp
            .withdraw_and_wait(BgpOp::Leave("detaching".into()))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e))?;
        lines.push(format!(
            "BGP routes withdrawn; forwarded {} ms more before detaching",
            waited.as_millis()
        ));
    }
    let r = write(&a, &h, Change::Detach).await;
    if a.bgp.active() {
        let _ = a.bgp.request(BgpOp::Rejoin).await;
    }
    let Json(mut c) = r?;
    lines.append(&mut c.changes);
    Ok(Json(Changes { changes: lines }))
}

async fn vip_add(State(a): State<Shared>, h: HeaderMap, b: Bytes) -> Answer<Changes> {
    let r: VipRequest = body(&b)?;
    let mut vip = Vip::new(r.address);
    vip.affinity = r.affinity;
    if let Some(size) = r.ring_size {
        vip.ring_size = size;
    }
    vip.adaptive_weights = r.adaptive_weights.unwrap_or(false);
    write(&a, &h, Change::AddVip(vip)).await
}

async fn vip_set(State(a): State<Shared>, h: HeaderMap, b: Bytes) -> Answer<Changes> {
    let r: VipSetRequest = body(&b)?;
    let Some(on) = r.adaptive_weights else {
        return Err(Refusal::invalid("adaptive_weights", "missing: nothing to set").into());
    };
    write(&a, &h, Change::SetAdaptiveWeights { vip: r.address, on }).await
}

async fn vip_del(State(a): State<Shared>, h: HeaderMap, b: Bytes) -> Answer<Changes> {
    let r: VipRef = body(&b)?;
    write(&a, &h, Change::DelVip(r.address)).await
}

async fn policy(State(a): State<Shared>, h: HeaderMap, b: Bytes) -> Answer<Changes> {
    let r: PolicyRequest = body(&b)?;
    let change = Change::SetPolicy {
        vip: r.address,
        rate_limit: r.rate_limit,
        new_flow_cap: r.new_flow_cap,
        allow: r.allow,
        deny: r.deny,
    };
    write(&a, &h, change).await
}

async fn switch(State(a): State<Shared>, h: HeaderMap, b: Bytes) -> Answer<Changes> {
    let r: SwitchRequest = body(&b)?;
    write(
        &a,
        &h,
        Change::Switch {
            vip: r.address,
            to: r.to,
            percent: r.percent,
        },
    )
    .await
}

async fn backend_add(State(a): State<Shared>, h: HeaderMap, b: Bytes) -> Answer<Changes> {
    let r: BackendRequest = body(&b)?;
    let mut backend = BackendEntry::new(r.address, r.weight.unwrap_or(1));
    backend.backup = r.backup.unwrap_or(false);
    backend.pool = r.pool;
    write(
        &a,
        &h,
        Change::AddBackend {
            vip: r.vip,
            backend,
        },
    )
    .await
}

async fn backend_del(State(a): State<Shared>, h: HeaderMap, b: Bytes) -> Answer<Changes> {
    let r: BackendRequest = body(&b)?;
    write(
        &a,
        &h,
        Change::DelBackend {
            vip: r.vip,
            address: r.address,
        },
    )
    .await
}

async fn backend_weight(State(a): State<Shared>, h: HeaderMap, b: Bytes) -> Answer<Changes> {
    let r: BackendRequest = body(&b)?;
    let weight = r
        .weight
        .ok_or_else(|| Refusal::invalid("weight", "missing"))?;
    write(
        &a,
        &h,
        Change::SetWeight {
            vip: r.vip,
            address: r.address,
            weight,
        },
    )
    .await
}

async fn backend_state(
    State(a): State<Shared>,
    Path(action): Path<String>,
    h: HeaderMap,
    b: Bytes,
) -> Answer<Changes> {
    let state = match action.as_str() {
        "drain" => BackendState::Drain,
        "disable" => BackendState::Disabled,
        "enable" => BackendState::Active,
        _ => return Err(not_found(Method::POST, Uri::from_static("/v1/backends/")).await),
    };
    let r: BackendRequest = body(&b)?;
    write(
        &a,
        &h,
        Change::SetBackendState {
            vip: r.vip,
            address: r.address,
            state,
        },
    )
    .await
}

async fn health(State(a): State<Shared>, h: HeaderMap, b: Bytes) -> Answer<Changes> {
    let r: HealthRequest = body(&b)?;
    write(
        &a,
        &h,
        Change::SetHealth {
            vip: r.vip,
            backend: r.backend,
            health: r.health,
        },
    )
    .await
}

async fn committed(State(a): State<Shared>, Path(id): Path<String>) -> Answer<RequestStatus> {
    let committed = a.writer.committed(id.clone()).await?;
    Ok(Json(RequestStatus { id, committed }))
}

async fn verify(State(a): State<Shared>) -> Answer<Verification> {
    Ok(Json(Verification {
        differences: a.writer.verify().await?,
    }))
}

/// Error answers made outside our handlers (axum's rejections: a body over [`MAX_BODY`], a
/// body that cannot be read, ...) are plain text; this turns them into the same JSON as ours.
async fn json_errors(req: axum::extract::Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    // Rejection texts are short; a longer body is cut, never buffered whole.
    let text = match axum::body::to_bytes(resp.into_body(), 4096).await {
        Ok(b) if !b.is_empty() => String::from_utf8_lossy(&b).trim().to_owned(),
        _ => status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_owned(),
    };
    let msg = if status == StatusCode::PAYLOAD_TOO_LARGE {
        format!("{text}: request bodies are limited to {MAX_BODY} bytes")
    } else {
        text
    };
    ApiError(status, msg).into_response()
}

/// Who is on the other end of a Unix socket.
#[derive(Clone, Copy, Debug)]
struct Peer {
    pid: Option<i32>,
    uid: Option<u32>,
}

/// The audit trail: who asked for which change, and how it ended. Only a summary of the
/// request is kept (its size and id), never whole bodies.
async fn audit(peer: Option<Extension<Peer>>, req: axum::extract::Request, next: Next) -> Response {
    if req.method() == Method::GET || req.method() == Method::HEAD {
        return next.run(req).await;
    }
    let (method, path) = (req.method().clone(), req.uri().path().to_owned());
    let id = request_id(req.headers());
    let size = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let resp = next.run(req).await;
    let peer = peer.map(|p| p.0);
    info!(
        target: "audit",
        peer_pid = peer.and_then(|p| p.pid),
        peer_uid = peer.and_then(|p| p.uid),
        %method,
        %path,
        request_id = id.as_deref().unwrap_or("-"),
        request_bytes = size.as_deref().unwrap_or("-"),
        status = resp.status().as_u16(),
        "admin request"
    );
    resp
}

/// Serves one connection with `router`.
async fn connection<I>(io: I, router: Router)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(router);
    let r = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), service)
        .await;
    if let Err(e) = r
        && !e.is_incomplete_message()
        && !e.is_timeout()
    {
        tracing::debug!(error = %e, "API connection");
    }
}

/// Serves a Unix socket; with `root_only`, other users get a 403 answer.
pub async fn serve_unix(listener: UnixListener, router: Router, root_only: bool) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "accepting an API connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let cred = stream.peer_cred().ok();
        let peer = Peer {
            pid: cred.and_then(|c| c.pid()),
            uid: cred.map(|c| c.uid()),
        };
        let router = if root_only && peer.uid != Some(0) {
            Router::new().fallback(|| async {
                ApiError(
                    StatusCode::FORBIDDEN,
                    "only root may use the maglb admin socket; the read-only socket serves status and lists".into(),
                )
            })
        } else {
            router.clone().layer(Extension(peer))
        };
        tokio::spawn(connection(stream, router));
    }
}

/// Serves a TCP listener (metrics and the status page).
pub async fn serve_tcp(listener: TcpListener, router: Router) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, router.clone()));
            }
            Err(e) => {
                warn!(error = %e, "accepting a metrics connection");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}
