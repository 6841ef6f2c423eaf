//! The local API: JSON over HTTP/1.1 on a unix socket (and /metrics on TCP for Prometheus).

use std::path::Path;

use anyhow::{Context, Result};
use axum::{
    Json, Router,
    extract::{Path as UrlPath, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use tapestry_api::types::{
    AttachRequest, AttachmentInfo, EndpointGcRequest, EndpointInfo, EndpointRequest, ErrorBody,
    FlushResult, GuestInfo, paths,
};
use tracing::info;

use crate::{datapath::ifindex_of, endpoints::EndpointError, metrics, node::SharedNode};

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

impl From<EndpointError> for ApiError {
    fn from(e: EndpointError) -> Self {
        match e {
            EndpointError::Invalid(m) => ApiError(StatusCode::BAD_REQUEST, m),
            EndpointError::NotFound(m) => ApiError(StatusCode::NOT_FOUND, m),
            EndpointError::Internal(e) => {
                ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
            }
        }
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Runs `f` with the node locked on a blocking thread: endpoint work enters network namespaces
/// and loads programs, which must not stall the async workers.
async fn with_node<T: Send + 'static>(
    node: &SharedNode,
    f: impl FnOnce(&mut crate::node::Node) -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let node = node.clone();
    tokio::task::spawn_blocking(move || f(&mut lock(&node)))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
}

async fn add_endpoint(
    State(node): State<SharedNode>,
    Json(req): Json<EndpointRequest>,
) -> ApiResult<EndpointInfo> {
    with_node(&node, move |n| {
        let n = &mut *n;
        Ok(Json(n.endpoints.add(&mut n.datapath, req)?))
    })
    .await
}

async fn list_endpoints(State(node): State<SharedNode>) -> ApiResult<Vec<EndpointInfo>> {
    let n = lock(&node);
    Ok(Json(n.endpoints.list(&n.datapath.maps)))
}

async fn get_endpoint(
    State(node): State<SharedNode>,
    UrlPath((container_id, ifname)): UrlPath<(String, String)>,
) -> ApiResult<EndpointInfo> {
    let n = lock(&node);
    n.endpoints
        .get(&container_id, &ifname, &n.datapath.maps)
        .map(Json)
        .ok_or_else(|| {
            ApiError(
                StatusCode::NOT_FOUND,
                format!("no endpoint {container_id}/{ifname} on this node"),
            )
        })
}

async fn delete_endpoint(
    State(node): State<SharedNode>,
    UrlPath((container_id, ifname)): UrlPath<(String, String)>,
) -> ApiResult<serde_json::Value> {
    with_node(&node, move |n| {
        let n = &mut *n;
        let removed = n
            .endpoints
            .remove(&mut n.datapath, &container_id, &ifname)?;
        Ok(Json(serde_json::json!({ "removed": removed.is_some() })))
    })
    .await
}

async fn gc_endpoints(
    State(node): State<SharedNode>,
    Json(req): Json<EndpointGcRequest>,
) -> ApiResult<Vec<EndpointInfo>> {
    with_node(&node, move |n| {
        let n = &mut *n;
        Ok(Json(n.endpoints.gc(
            &mut n.datapath,
            req.network.as_deref(),
            &req.valid,
        )?))
    })
    .await
}

async fn guests(State(node): State<SharedNode>) -> ApiResult<Vec<GuestInfo>> {
    let n = lock(&node);
    Ok(Json(n.endpoints.guests(&n.datapath.maps)))
}

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
        .route(paths::FLOWS, get(flows))
        .route(paths::ENDPOINTS, get(list_endpoints).post(add_endpoint))
        .route(paths::ENDPOINT, get(get_endpoint).delete(delete_endpoint))
        .route(paths::ENDPOINTS_GC, post(gc_endpoints))
        .route(paths::GUESTS, get(guests))
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
) -> ApiResult<tapestry_api::types::FlowsResponse> {
    Ok(Json(lock(&node).flows(q.since)?))
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
