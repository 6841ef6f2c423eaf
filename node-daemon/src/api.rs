//! The local API: JSON over HTTP/1.1 on a unix socket (and /metrics on TCP for Prometheus).
//!
//! Handlers are thin: they parse, hand the work to a blocking thread (views walk maps with one
//! syscall per entry; endpoint work enters namespaces and loads programs), and map typed errors
//! to statuses ([`ApiError`]). `/healthz` touches nothing but two counters, so it answers while
//! any other request runs.

use std::path::Path;

use anyhow::{Context, Result};
use axum::{
    Json, Router,
    extract::{
        Path as UrlPath, Query, State,
        rejection::{JsonRejection, PathRejection, QueryRejection},
    },
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::{delete, get, post},
};
use tapestry_api::types::{
    AttachRequest, AttachmentInfo, ConntrackEntry, EndpointGcRequest, EndpointInfo,
    EndpointRequest, FlowsResponse, FlushResult, GuestInfo, ServiceInfo, Status, paths,
};
use tracing::info;

use crate::{
    daemon::Node,
    datapath::{Maps, conntrack, ifindex_of},
    error::ApiError,
    metrics,
};

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f).await?
}

async fn add_endpoint(
    State(node): State<Node>,
    body: Result<Json<EndpointRequest>, JsonRejection>,
) -> ApiResult<EndpointInfo> {
    let Json(req) = body?;
    blocking(move || Ok(Json(node.endpoints.add(req)?))).await
}

async fn list_endpoints(State(node): State<Node>) -> ApiResult<Vec<EndpointInfo>> {
    blocking(move || Ok(Json(node.endpoints.list()))).await
}

async fn get_endpoint(
    State(node): State<Node>,
    path: Result<UrlPath<(String, String)>, PathRejection>,
) -> ApiResult<EndpointInfo> {
    let UrlPath((container_id, ifname)) = path?;
    blocking(move || {
        node.endpoints
            .get(&container_id, &ifname)
            .map(Json)
            .ok_or_else(|| {
                ApiError::NotFound(format!("no endpoint {container_id}/{ifname} on this node"))
            })
    })
    .await
}

async fn delete_endpoint(
    State(node): State<Node>,
    path: Result<UrlPath<(String, String)>, PathRejection>,
) -> ApiResult<serde_json::Value> {
    let UrlPath((container_id, ifname)) = path?;
    blocking(move || {
        let removed = node.endpoints.remove(&container_id, &ifname)?;
        Ok(Json(serde_json::json!({ "removed": removed.is_some() })))
    })
    .await
}

async fn gc_endpoints(
    State(node): State<Node>,
    body: Result<Json<EndpointGcRequest>, JsonRejection>,
) -> ApiResult<Vec<EndpointInfo>> {
    let Json(req) = body?;
    blocking(move || Ok(Json(node.endpoints.gc(req.network.as_deref(), &req.valid)?))).await
}

async fn guests(State(node): State<Node>) -> ApiResult<Vec<GuestInfo>> {
    blocking(move || Ok(Json(node.views.guests()))).await
}

pub fn router(node: Node) -> Router {
    Router::new()
        .route(paths::HEALTHZ, get(healthz))
        .route(paths::STATUS, get(status))
        .route(paths::SERVICES, get(services))
        .route(
            paths::CONNTRACK,
            get(list_conntrack).delete(flush_conntrack),
        )
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

async fn healthz(State(node): State<Node>) -> Response {
    if node.services.healthy() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "desired state not programmed yet\n",
        )
            .into_response()
    }
}

async fn status(State(node): State<Node>) -> ApiResult<Status> {
    blocking(move || Ok(Json(node.views.status()?))).await
}

async fn services(State(node): State<Node>) -> ApiResult<Vec<ServiceInfo>> {
    blocking(move || Ok(Json(node.views.services()?))).await
}

async fn list_conntrack(State(node): State<Node>) -> ApiResult<Vec<ConntrackEntry>> {
    blocking(move || Ok(Json(node.views.conntrack()))).await
}

async fn flush_conntrack(State(node): State<Node>) -> ApiResult<FlushResult> {
    let removed = blocking(move || {
        let mut maps = Maps::open(node.pins.dir())?;
        Ok(conntrack::flush(&mut maps.conntrack))
    })
    .await?;
    info!(removed, "conntrack flushed through the API");
    Ok(Json(FlushResult { removed }))
}

async fn attachments(State(node): State<Node>) -> ApiResult<Vec<AttachmentInfo>> {
    blocking(move || Ok(Json(node.views.attachments()))).await
}

async fn attach(
    State(node): State<Node>,
    body: Result<Json<AttachRequest>, JsonRejection>,
) -> ApiResult<AttachmentInfo> {
    let Json(req) = body?;
    blocking(move || {
        if ifindex_of(&req.ifname).is_err() {
            return Err(ApiError::NotFound(format!(
                "no interface named {:?} in the daemon's network namespace",
                req.ifname
            )));
        }
        let a = node.pins.attach(&req.ifname)?;
        info!(
            ifname = a.ifname,
            ifindex = a.ifindex,
            "attached through the API"
        );
        Ok(Json(AttachmentInfo {
            ifindex: a.ifindex,
            ifname: a.ifname,
        }))
    })
    .await
}

async fn detach(
    State(node): State<Node>,
    path: Result<UrlPath<String>, PathRejection>,
) -> ApiResult<serde_json::Value> {
    let UrlPath(ifname) = path?;
    blocking(move || {
        // By name, or by index for an interface that is already gone.
        let ifindex = match ifname.parse::<u32>() {
            Ok(i) => i,
            Err(_) => match ifindex_of(&ifname) {
                Ok(i) => i,
                // Gone: nothing can be attached to it any more.
                Err(_) => return Ok(Json(serde_json::json!({ "detached": false }))),
            },
        };
        let detached = node.pins.detach(ifindex)?;
        Ok(Json(serde_json::json!({ "detached": detached })))
    })
    .await
}

async fn metrics_text(State(node): State<Node>) -> Result<Response, ApiError> {
    // One conntrack walk a second at most, however many scrape (metrics::Scrapes).
    let text = blocking(move || Ok(metrics::scrape(&node.views)?.to_string())).await?;
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
    State(node): State<Node>,
    query: Result<Query<FlowsQuery>, QueryRejection>,
) -> ApiResult<FlowsResponse> {
    let Query(q) = query?;
    blocking(move || Ok(Json(node.views.flows(q.since)?))).await
}

/// Serves the API on `socket` until the task is aborted.
pub async fn serve_unix(socket: &Path, node: Node) -> Result<()> {
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

/// Serves /metrics and /healthz on TCP for Prometheus and the kubelet's probes.
pub async fn serve_tcp(addr: &str, node: Node) -> Result<()> {
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
