//! The local API: JSON over HTTP/1.1 on a unix socket (and /metrics on TCP for Prometheus).

use std::path::Path;

use anyhow::{Context, Result};
use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{delete, get},
};
use tapestry_api::types::{AttachRequest, AttachmentInfo, ErrorBody, FlushResult, paths};
use tracing::info;

use crate::{datapath::ifindex_of, metrics, node::SharedNode};

/// An error answer: status and a message a user can act on.
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorBody { error: self.1 })).into_response()
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

pub fn router(node: SharedNode) -> Router {
    Router::new()
        .route(paths::HEALTHZ, get(healthz))
        .route(paths::STATUS, get(status))
        .route(paths::SERVICES, get(services))
        .route(paths::CONNTRACK, get(conntrack).delete(flush_conntrack))
        .route(paths::ATTACHMENTS, get(attachments).post(attach))
        .route(
            &format!("{}/{{ifname}}", paths::ATTACHMENTS),
            delete(detach),
        )
        .route(paths::METRICS, get(metrics_text))
        .route("/v1/flows", get(flows))
        .with_state(node)
}

fn lock(node: &SharedNode) -> std::sync::MutexGuard<'_, crate::node::Node> {
    // A panic while holding the lock would leave the maps as consistent as the kernel keeps
    // them; keep serving.
    node.lock().unwrap_or_else(|p| p.into_inner())
}

async fn healthz(State(node): State<SharedNode>) -> Response {
    let n = lock(&node);
    if n.generation > 0 || n.source.generation == 0 {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "desired state not programmed yet\n",
        )
            .into_response()
    }
}

async fn status(State(node): State<SharedNode>) -> ApiResult<tapestry_api::types::Status> {
    Ok(Json(lock(&node).status()?))
}

async fn services(
    State(node): State<SharedNode>,
) -> ApiResult<Vec<tapestry_api::types::ServiceInfo>> {
    Ok(Json(lock(&node).services()?))
}

async fn conntrack(
    State(node): State<SharedNode>,
) -> ApiResult<Vec<tapestry_api::types::ConntrackEntry>> {
    Ok(Json(lock(&node).conntrack()))
}

async fn flush_conntrack(State(node): State<SharedNode>) -> ApiResult<FlushResult> {
    let removed = lock(&node).flush_conntrack();
    info!(removed, "conntrack flushed through the API");
    Ok(Json(FlushResult { removed }))
}

async fn attachments(State(node): State<SharedNode>) -> ApiResult<Vec<AttachmentInfo>> {
    let n = lock(&node);
    Ok(Json(
        n.datapath
            .attachments()
            .into_iter()
            .map(|a| AttachmentInfo {
                ifindex: a.ifindex,
                ifname: a.ifname,
            })
            .collect(),
    ))
}

async fn attach(
    State(node): State<SharedNode>,
    Json(req): Json<AttachRequest>,
) -> ApiResult<AttachmentInfo> {
    if ifindex_of(&req.ifname).is_err() {
        return Err(ApiError(
            StatusCode::NOT_FOUND,
            format!(
                "no interface named {:?} in the daemon's network namespace",
                req.ifname
            ),
        ));
    }
    let a = lock(&node).datapath.attach(&req.ifname)?;
    info!(
        ifname = a.ifname,
        ifindex = a.ifindex,
        "attached through the API"
    );
    Ok(Json(AttachmentInfo {
        ifindex: a.ifindex,
        ifname: a.ifname,
    }))
}

async fn detach(
    State(node): State<SharedNode>,
    UrlPath(ifname): UrlPath<String>,
) -> ApiResult<serde_json::Value> {
    // By name, or by index for an interface that is already gone.
    let ifindex = match ifname.parse::<u32>() {
        Ok(i) => i,
        Err(_) => match ifindex_of(&ifname) {
            Ok(i) => i,
            // Gone: nothing can be attached to it any more.
            Err(_) => return Ok(Json(serde_json::json!({ "detached": false }))),
        },
    };
    let detached = lock(&node).datapath.detach(ifindex)?;
    Ok(Json(serde_json::json!({ "detached": detached })))
}

async fn metrics_text(State(node): State<SharedNode>) -> Result<Response, ApiError> {
    let text = metrics::render(&lock(&node))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

#[derive(serde::Deserialize)]
struct FlowsQuery {
    /// Sequence to start from (as returned in `next`).
    #[serde(default)]
    since: u64,
}

async fn flows(
    State(node): State<SharedNode>,
    axum::extract::Query(q): axum::extract::Query<FlowsQuery>,
) -> ApiResult<serde_json::Value> {
    let log = lock(&node).flows.clone();
    let (flows, next) = log.since(q.since);
    Ok(Json(serde_json::json!({ "flows": flows, "next": next })))
}

/// Serves the API on `socket` until the task is aborted.
pub async fn serve_unix(socket: &Path, node: SharedNode) -> Result<()> {
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file left by a killed daemon would make bind fail.
    let _ = std::fs::remove_file(socket);
    let listener = tokio::net::UnixListener::bind(socket)
        .with_context(|| format!("binding the API socket {}", socket.display()))?;
    info!(socket = %socket.display(), "local API listening");
    axum::serve(listener, router(node)).await?;
    Ok(())
}

/// Serves /metrics (and the rest, read-only use expected) on TCP for Prometheus.
pub async fn serve_tcp(addr: &str, node: SharedNode) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the metrics address {addr}"))?;
    info!(addr, "metrics listening");
    let app = Router::new()
        .route(paths::METRICS, get(metrics_text))
        .route(paths::HEALTHZ, get(healthz))
        .with_state(node);
    axum::serve(listener, app).await?;
    Ok(())
}
