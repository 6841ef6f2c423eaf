//! The local API: JSON over HTTP/1.1 on a unix socket (and /metrics on TCP for Prometheus).
//!
//! Handlers are thin: they parse, hand the work to a blocking thread (views walk maps with one
//! syscall per entry; endpoint work enters namespaces and loads programs), and map typed errors
//! to statuses ([`ApiError`]). `/healthz` touches nothing but two counters, so it answers while
//! any other request runs.
//!
//! The API can attach the datapath to any interface and flush conntrack, so its socket is for
//! root only: created with mode 0600 whatever the umask (0660 with `--api-socket-group`, that
//! group's), and every connection's peer credentials (SO_PEERCRED) are checked: uid 0, or a
//! process in the configured group; anyone else is answered 403 and logged.

use std::{
    os::unix::fs::{PermissionsExt, chown},
    path::Path,
    time::Duration,
};

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
use tokio::{
    io::AsyncWriteExt,
    net::{UnixListener, UnixStream, unix::UCred},
};
use tracing::{info, warn};

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
    let Json(mut req) = body?;
    crate::guests::migration::prepare_target(node.kube.as_ref(), &mut req).await?;
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
    blocking(move || {
        let mut status = node.views.status()?;
        // A registry file that had to be set aside at start stays visible until the next start.
        if let Some(recovery) = node.endpoints.recovery() {
            status.last_error = Some(match status.last_error.take() {
                Some(e) => format!("{e}; {recovery}"),
                None => recovery,
            });
        }
        Ok(Json(status))
    })
    .await
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

/// Who may use the local API besides root.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketAccess {
    /// Members of this group (primary or supplementary) may connect; the socket is 0660 and
    /// owned by it. None: root only, mode 0600.
    pub group: Option<u32>,
}

impl SocketAccess {
    fn mode(&self) -> u32 {
        if self.group.is_some() { 0o660 } else { 0o600 }
    }

    /// Whether the process with `cred` may use the API; the reason when it may not.
    fn check(&self, cred: &UCred) -> Result<(), String> {
        if cred.uid() == 0 {
            return Ok(());
        }
        let Some(group) = self.group else {
            return Err(format!(
                "uid {} is not root, and no --api-socket-group is configured",
                cred.uid()
            ));
        };
        if cred.gid() == group {
            return Ok(());
        }
        // Supplementary groups are not in SO_PEERCRED: read them from the peer process.
        let groups = cred
            .pid()
            .filter(|p| *p > 0)
            .and_then(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .and_then(|status| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix("Groups:"))
                    .map(|g| {
                        g.split_whitespace()
                            .filter_map(|n| n.parse::<u32>().ok())
                            .collect::<Vec<_>>()
                    })
            })
            .unwrap_or_default();
        if groups.contains(&group) {
            Ok(())
        } else {
            Err(format!(
                "uid {} (gid {}) is neither root nor in the API socket's group {group}",
                cred.uid(),
                cred.gid()
            ))
        }
    }
}

/// Binds the API socket at `socket` with the mode and group of `access` (not the umask's): a
/// socket file left by a killed daemon is replaced.
pub fn bind_socket(socket: &Path, access: SocketAccess) -> Result<UnixListener> {
    if let Some(dir) = socket.parent()
        && !dir.as_os_str().is_empty()
    {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // A socket file left by a killed daemon would make bind fail.
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket)
        .with_context(|| format!("binding the API socket {}", socket.display()))?;
    // Until these two calls the mode is the umask's; connections in that window are still
    // checked one by one (SocketAccess::check).
    if let Some(gid) = access.group {
        chown(socket, None, Some(gid))
            .with_context(|| format!("giving the API socket {} to gid {gid}", socket.display()))?;
    }
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(access.mode()))
        .with_context(|| format!("setting the mode of the API socket {}", socket.display()))?;
    Ok(listener)
}

/// The API socket's listener: hands axum only the connections whose peer may use the API.
pub struct CheckedListener {
    inner: UnixListener,
    access: SocketAccess,
}

impl CheckedListener {
    pub fn new(inner: UnixListener, access: SocketAccess) -> Self {
        CheckedListener { inner, access }
    }
}

/// Answers a refused connection with a 403 that says why, then closes it.
async fn refuse(mut stream: UnixStream, why: String) {
    let body = serde_json::to_string(&tapestry_api::types::ErrorBody {
        error: format!("permission denied: {why}"),
    })
    .unwrap_or_default();
    let response = format!(
        "HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

impl axum::serve::Listener for CheckedListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, addr) = match self.inner.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // As axum does: out of descriptors and the like; the listener stays.
                    warn!(error = %e, "accepting an API connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let verdict = stream
                .peer_cred()
                .map_err(|e| format!("its peer credentials are unreadable: {e}"))
                .and_then(|cred| self.access.check(&cred).map(|()| cred));
            match verdict {
                Ok(_) => return (stream, addr),
                Err(why) => {
                    let cred = stream.peer_cred().ok();
                    warn!(
                        uid = cred.map(|c| c.uid()),
                        gid = cred.map(|c| c.gid()),
                        pid = cred.and_then(|c| c.pid()),
                        reason = %why,
                        "API connection refused"
                    );
                    tokio::spawn(refuse(stream, why));
                }
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// Serves the API on `socket` until the task is aborted.
pub async fn serve_unix(socket: &Path, access: SocketAccess, node: Node) -> Result<()> {
    let listener = bind_socket(socket, access)?;
    info!(
        socket = %socket.display(),
        mode = %format!("{:o}", access.mode()),
        group = access.group,
        "local API listening"
    );
    axum::serve(CheckedListener::new(listener, access), router(node)).await?;
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

#[cfg(test)]
mod tests {
    use std::{
        os::unix::fs::MetadataExt,
        path::PathBuf,
        sync::atomic::{AtomicU32, Ordering},
    };

    use axum::{Router, routing::get};

    use super::*;

    /// Root is needed to give the socket away and to connect as another user: required in CI
    /// (fail loudly), skipped with a reason elsewhere.
    fn root() -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        if std::env::var_os("CI").is_some() {
            panic!("CI is set and this test needs root");
        }
        eprintln!("skipped: not root");
        false
    }

    /// A socket path in a fresh directory of its own (removed by the caller's guard).
    struct SocketDir(PathBuf);

    impl SocketDir {
        fn new(what: &str) -> SocketDir {
            static N: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "tapestry-api-{what}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            // Anyone may reach the socket through this directory: only the socket's own mode
            // and the peer check stand in the way.
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
            SocketDir(dir)
        }

        fn socket(&self) -> PathBuf {
            self.0.join("api.sock")
        }
    }

    impl Drop for SocketDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// [`bind_socket`] under `umask` (in the caller's runtime).
    fn bind_with_umask(socket: &Path, umask: libc::mode_t, access: SocketAccess) -> UnixListener {
        // SAFETY: umask has no preconditions; the old mask is put back right after.
        let old = unsafe { libc::umask(umask) };
        let listener = bind_socket(socket, access);
        unsafe { libc::umask(old) };
        listener.unwrap()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn the_socket_is_for_root_only_whatever_the_umask() {
        let dir = SocketDir::new("mode");
        let rt = runtime();
        let _g = rt.enter();
        let _l = bind_with_umask(&dir.socket(), 0, SocketAccess::default());
        let meta = std::fs::metadata(dir.socket()).unwrap();
        assert_eq!(
            meta.mode() & 0o7777,
            0o600,
            "mode {:o}",
            meta.mode() & 0o7777
        );
    }

    #[test]
    fn with_a_group_the_socket_is_that_groups_and_0660() {
        if !root() {
            return;
        }
        let dir = SocketDir::new("group");
        let rt = runtime();
        let _g = rt.enter();
        let _l = bind_with_umask(&dir.socket(), 0o077, SocketAccess { group: Some(4242) });
        let meta = std::fs::metadata(dir.socket()).unwrap();
        assert_eq!(
            meta.mode() & 0o7777,
            0o660,
            "mode {:o}",
            meta.mode() & 0o7777
        );
        assert_eq!(meta.gid(), 4242);
    }

    /// In a forked child that becomes `uid`:`gid` (no supplementary groups): connects to
    /// `socket`, sends a GET and returns the HTTP status it was answered with (0: no answer,
    /// -1: the connect itself failed, -2: could not change identity).
    fn status_as(socket: &Path, uid: u32, gid: u32) -> i32 {
        // Everything the child needs is made before the fork: it only makes system calls.
        // SAFETY: sockaddr_un is plain data; all-zero is valid.
        let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let path = socket.as_os_str().as_encoded_bytes();
        assert!(path.len() < addr.sun_path.len());
        for (d, s) in addr.sun_path.iter_mut().zip(path) {
            *d = *s as libc::c_char;
        }
        let request = b"GET / HTTP/1.1\r\nhost: tapestryd\r\nconnection: close\r\n\r\n";
        // SAFETY: the child makes async-signal-safe system calls only, then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork: {}", std::io::Error::last_os_error());
        if pid == 0 {
            unsafe {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    libc::_exit(2);
                }
                let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
                if fd < 0
                    || libc::connect(
                        fd,
                        &addr as *const _ as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
                    ) != 0
                {
                    libc::_exit(3);
                }
                libc::write(fd, request.as_ptr() as *const libc::c_void, request.len());
                let mut buf = [0u8; 64];
                let mut got = 0usize;
                while got < 12 {
                    let n = libc::read(
                        fd,
                        buf[got..].as_mut_ptr() as *mut libc::c_void,
                        buf.len() - got,
                    );
                    if n <= 0 {
                        break;
                    }
                    got += n as usize;
                }
                // "HTTP/1.1 200"
                let code = match (got >= 12, &buf[9..12]) {
                    (true, b"200") => 10,
                    (true, b"403") => 11,
                    (true, _) => 12,
                    _ => 13,
                };
                libc::_exit(code);
            }
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(libc::WIFEXITED(status), "child status {status}");
        match libc::WEXITSTATUS(status) {
            10 => 200,
            11 => 403,
            12 => 999,
            13 => 0,
            3 => -1,
            _ => -2,
        }
    }

    #[test]
    fn connections_from_other_users_are_refused_and_the_group_is_let_in() {
        if !root() {
            return;
        }
        const NOBODY: u32 = 65534;
        const GROUP: u32 = 4243;
        let dir = SocketDir::new("peer");
        let socket = dir.socket();
        let rt = runtime();
        let access = SocketAccess { group: Some(GROUP) };
        let listener = {
            let _g = rt.enter();
            bind_with_umask(&socket, 0o022, access)
        };
        // Anyone may connect as far as the file is concerned: only the peer check refuses.
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        rt.spawn(async move {
            let app = Router::new().route("/", get(|| async { "ok" }));
            axum::serve(CheckedListener::new(listener, access), app).await
        });

        assert_eq!(status_as(&socket, NOBODY, NOBODY), 403, "nobody was let in");
        assert_eq!(
            status_as(&socket, NOBODY, GROUP),
            200,
            "a member of the API group was refused"
        );
        assert_eq!(status_as(&socket, 0, 0), 200, "root was refused");
    }
}
