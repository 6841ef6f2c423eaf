//! A client of the daemon's local API, for the CNI plugin, the CLI and tests.
//!
//! HTTP/1.1 over the unix socket with hyper. The blocking wrapper runs a current-thread runtime
//! per call, which costs microseconds: the CNI plugin and the CLI are short-lived processes.
//!
//! Nothing waits forever and nothing grows without bound: connecting has a timeout, the whole
//! request (connect, send, the answer's head and body) has another, and the answer's body is read
//! up to a limit ([`Client::with_connect_timeout`], [`Client::with_request_timeout`],
//! [`Client::with_max_response_bytes`]; the defaults are the `DEFAULT_*` constants). A daemon
//! that takes the connection and never answers, or dribbles an endless body, costs the caller at
//! most the request timeout.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    time::Duration,
};

use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
/// The request method of [`Client::request`] and of the errors that name a request.
pub use hyper::Method;
use hyper::{Request, StatusCode, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};

use crate::types::{
    AttachRequest, AttachmentInfo, ConntrackEntry, EndpointGcRequest, EndpointInfo,
    EndpointRequest, ErrorBody, FlowsResponse, FlushResult, GuestInfo, ServiceInfo, Status, paths,
};

/// How long [`Client::new`] waits for the socket to accept a connection.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long [`Client::new`] waits for one whole exchange: connecting, sending, the answer's
/// head and all of its body. Generous for the CLI (a full conntrack table is walked and
/// serialized in a few seconds); the CNI plugin sets a tighter one.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// The largest answer body [`Client::new`] reads: a full conntrack table (262,144 entries of
/// about 300 bytes of JSON each) with room to spare.
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach tapestryd at {socket}: {source} (is the daemon running? start it with \
         `tapestryd --state-file <file>`, or point --socket at its socket)"
    )]
    Unreachable {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("tapestryd answered {status}: {message}")]
    Api { status: u16, message: String },
    /// The daemon took a connection but did not finish answering in time (stuck, or
    /// overloaded).
    #[error(
        "tapestryd at {} did not answer {method} {path} within {after:?}",
        socket.display()
    )]
    Timeout {
        socket: PathBuf,
        method: Method,
        path: String,
        after: Duration,
    },
    /// The answer's body is larger than this client reads.
    #[error(
        "tapestryd's answer to {method} {path} is larger than this client's limit of {limit} \
         bytes; not reading it"
    )]
    TooLarge {
        method: Method,
        path: String,
        limit: usize,
    },
    #[error("talking to tapestryd: {0}")]
    Transport(String),
    #[error("tapestryd sent a body this client does not understand: {0}")]
    Decode(#[from] serde_json::Error),
}

impl ClientError {
    /// The daemon is not there (as opposed to: it refused the request).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
}

/// A client of one daemon socket. [`Client::new`] takes the defaults above; the `with_*`
/// methods set the connect timeout, the timeout of a whole request and the largest body read.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    connect_timeout: Duration,
    request_timeout: Duration,
    max_response_bytes: usize,
}

/// Aborts the connection task when the exchange ends, however it ends (a timeout drops the
/// exchange mid-way).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_owned(),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }

    /// How long to wait for the socket to accept a connection; then the daemon counts as
    /// unreachable.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// How long one request may take in all (connecting included); then it fails with
    /// [`ClientError::Timeout`].
    pub fn with_request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// The largest answer body read; a larger one fails with [`ClientError::TooLarge`].
    pub fn with_max_response_bytes(mut self, limit: usize) -> Self {
        self.max_response_bytes = limit;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request; returns the raw body of a 2xx answer.
    pub async fn request_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ClientError> {
        let exchange = self.exchange(method.clone(), path, body);
        let (status, bytes) = match tokio::time::timeout(self.request_timeout, exchange).await {
            Ok(answer) => answer?,
            Err(_) => {
                return Err(ClientError::Timeout {
                    socket: self.socket.clone(),
                    method,
                    path: path.to_owned(),
                    after: self.request_timeout,
                });
            }
        };
        if !status.is_success() {
            let message = serde_json::from_slice::<ErrorBody>(&bytes)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(ClientError::Api {
                status: status.as_u16(),
                message,
            });
        }
        Ok(bytes)
    }

    /// Connects, sends, and reads the answer's status and body (at most `max_response_bytes`).
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            socket: self.socket.clone(),
            source,
        };
        let connect = tokio::net::UnixStream::connect(&self.socket);
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(connected) => connected.map_err(unreachable)?,
            Err(_) => {
                return Err(unreachable(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the socket accepted no connection within {:?}",
                        self.connect_timeout
                    ),
                )));
            }
        };
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let _conn = AbortOnDrop(tokio::spawn(async move {
            let _ = conn.await;
        }));
        let too_large = || ClientError::TooLarge {
            method: method.clone(),
            path: path.to_owned(),
            limit: self.max_response_bytes,
        };
        let has_body = body.is_some();
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(hyper::header::HOST, "tapestryd");
        if has_body {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status();
        // A declared length over the limit is refused before a byte of the body is read.
        let declared = resp
            .headers()
            .get(hyper::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_response_bytes as u64) {
            return Err(too_large());
        }
        let bytes = match Limited::new(resp.into_body(), self.max_response_bytes)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => return Err(too_large()),
            Err(e) => return Err(ClientError::Transport(e.to_string())),
        };
        Ok((status, bytes))
    }

    pub async fn request<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ClientError> {
        let body = body.map(serde_json::to_vec).transpose()?;
        let bytes = self.request_raw(method, path, body).await?;
        Ok(serde_json::from_slice(&bytes)?)
    }

    pub async fn status(&self) -> Result<Status, ClientError> {
        self.request(Method::GET, paths::STATUS, None::<&()>).await
    }

    pub async fn services(&self) -> Result<Vec<ServiceInfo>, ClientError> {
        self.request(Method::GET, paths::SERVICES, None::<&()>)
            .await
    }

    pub async fn conntrack(&self) -> Result<Vec<ConntrackEntry>, ClientError> {
        self.request(Method::GET, paths::CONNTRACK, None::<&()>)
            .await
    }

    pub async fn flush_conntrack(&self) -> Result<FlushResult, ClientError> {
        self.request(Method::DELETE, paths::CONNTRACK, None::<&()>)
            .await
    }

    pub async fn attachments(&self) -> Result<Vec<AttachmentInfo>, ClientError> {
        self.request(Method::GET, paths::ATTACHMENTS, None::<&()>)
            .await
    }

    pub async fn attach(&self, ifname: &str) -> Result<AttachmentInfo, ClientError> {
        let req = AttachRequest {
            ifname: ifname.to_owned(),
        };
        self.request(Method::POST, paths::ATTACHMENTS, Some(&req))
            .await
    }

    pub async fn detach(&self, ifname: &str) -> Result<serde_json::Value, ClientError> {
        let path = format!("{}/{}", paths::ATTACHMENTS, segment(ifname));
        self.request(Method::DELETE, &path, None::<&()>).await
    }

    pub async fn metrics(&self) -> Result<String, ClientError> {
        let bytes = self.request_raw(Method::GET, paths::METRICS, None).await?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Flow events with sequence >= `since` (0 for all the daemon still holds).
    pub async fn flows(&self, since: u64) -> Result<FlowsResponse, ClientError> {
        let path = format!("{}?since={since}", paths::FLOWS);
        self.request(Method::GET, &path, None::<&()>).await
    }

    pub async fn guests(&self) -> Result<Vec<GuestInfo>, ClientError> {
        self.request(Method::GET, paths::GUESTS, None::<&()>).await
    }

    /// The daemon is up and has programmed its desired state.
    pub async fn healthz(&self) -> Result<(), ClientError> {
        self.request_raw(Method::GET, paths::HEALTHZ, None).await?;
        Ok(())
    }

    pub async fn add_endpoint(&self, req: &EndpointRequest) -> Result<EndpointInfo, ClientError> {
        self.request(Method::POST, paths::ENDPOINTS, Some(req))
            .await
    }

    pub async fn endpoints(&self) -> Result<Vec<EndpointInfo>, ClientError> {
        self.request(Method::GET, paths::ENDPOINTS, None::<&()>)
            .await
    }

    fn endpoint_path(container_id: &str, ifname: &str) -> String {
        format!(
            "{}/{}/{}",
            paths::ENDPOINTS,
            segment(container_id),
            segment(ifname)
        )
    }

    pub async fn endpoint(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<EndpointInfo, ClientError> {
        let path = Self::endpoint_path(container_id, ifname);
        self.request(Method::GET, &path, None::<&()>).await
    }

    /// Idempotent: removing an unknown endpoint succeeds.
    pub async fn delete_endpoint(
        &self,
        container_id: &str,
        ifname: &str,
    ) -> Result<(), ClientError> {
        let path = Self::endpoint_path(container_id, ifname);
        self.request_raw(Method::DELETE, &path, None).await?;
        Ok(())
    }

    /// Removes every endpoint not in `req.valid`; returns the removed ones.
    pub async fn gc_endpoints(
        &self,
        req: &EndpointGcRequest,
    ) -> Result<Vec<EndpointInfo>, ClientError> {
        self.request(Method::POST, paths::ENDPOINTS_GC, Some(req))
            .await
    }
}

/// `s` as one URL path segment: every byte but RFC 3986's unreserved ones
/// (`A-Z a-z 0-9 - . _ ~`) percent-encoded, and a segment of only dots (`.`, `..`, which a
/// router may resolve as "this" or "parent" segment) with its dots encoded too. The daemon's
/// router decodes each segment once, so it sees exactly `s`: `eth%30` stays `eth%30` and never
/// becomes `eth0`, and a `/` cannot split one value into two segments.
fn segment(s: &str) -> String {
    let all_dots = !s.is_empty() && s.bytes().all(|b| b == b'.');
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if !all_dots && (b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// The same calls, blocking: for short-lived processes without a runtime of their own.
pub mod blocking {
    use super::*;

    fn run<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime")
            .block_on(f)
    }

    #[derive(Debug, Clone)]
    pub struct Client(super::Client);

    impl Client {
        pub fn new(socket: impl AsRef<Path>) -> Self {
            Self(super::Client::new(socket))
        }
        /// See [`super::Client::with_connect_timeout`].
        pub fn with_connect_timeout(self, timeout: Duration) -> Self {
            Self(self.0.with_connect_timeout(timeout))
        }
        /// See [`super::Client::with_request_timeout`].
        pub fn with_request_timeout(self, timeout: Duration) -> Self {
            Self(self.0.with_request_timeout(timeout))
        }
        /// See [`super::Client::with_max_response_bytes`].
        pub fn with_max_response_bytes(self, limit: usize) -> Self {
            Self(self.0.with_max_response_bytes(limit))
        }
        pub fn socket(&self) -> &Path {
            self.0.socket()
        }
        pub fn status(&self) -> Result<Status, ClientError> {
            run(self.0.status())
        }
        pub fn services(&self) -> Result<Vec<ServiceInfo>, ClientError> {
            run(self.0.services())
        }
        pub fn conntrack(&self) -> Result<Vec<ConntrackEntry>, ClientError> {
            run(self.0.conntrack())
        }
        pub fn flush_conntrack(&self) -> Result<FlushResult, ClientError> {
            run(self.0.flush_conntrack())
        }
        pub fn attachments(&self) -> Result<Vec<AttachmentInfo>, ClientError> {
            run(self.0.attachments())
        }
        pub fn attach(&self, ifname: &str) -> Result<AttachmentInfo, ClientError> {
            run(self.0.attach(ifname))
        }
        pub fn detach(&self, ifname: &str) -> Result<serde_json::Value, ClientError> {
            run(self.0.detach(ifname))
        }
        pub fn metrics(&self) -> Result<String, ClientError> {
            run(self.0.metrics())
        }
        pub fn flows(&self, since: u64) -> Result<FlowsResponse, ClientError> {
            run(self.0.flows(since))
        }
        pub fn guests(&self) -> Result<Vec<GuestInfo>, ClientError> {
            run(self.0.guests())
        }
        pub fn healthz(&self) -> Result<(), ClientError> {
            run(self.0.healthz())
        }
        pub fn add_endpoint(&self, req: &EndpointRequest) -> Result<EndpointInfo, ClientError> {
            run(self.0.add_endpoint(req))
        }
        pub fn endpoints(&self) -> Result<Vec<EndpointInfo>, ClientError> {
            run(self.0.endpoints())
        }
        pub fn endpoint(
            &self,
            container_id: &str,
            ifname: &str,
        ) -> Result<EndpointInfo, ClientError> {
            run(self.0.endpoint(container_id, ifname))
        }
        pub fn delete_endpoint(&self, container_id: &str, ifname: &str) -> Result<(), ClientError> {
            run(self.0.delete_endpoint(container_id, ifname))
        }
        pub fn gc_endpoints(
            &self,
            req: &EndpointGcRequest,
        ) -> Result<Vec<EndpointInfo>, ClientError> {
            run(self.0.gc_endpoints(req))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{UnixListener, UnixStream},
    };

    use super::*;

    /// A socket in a directory of its own, removed on drop.
    struct Socket(PathBuf);

    impl Socket {
        fn new(tag: &str) -> Socket {
            let dir =
                std::env::temp_dir().join(format!("tapestry-client-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Socket(dir.join("s.sock"))
        }
    }

    impl Drop for Socket {
        fn drop(&mut self) {
            if let Some(dir) = self.0.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
    }

    /// A daemon that accepts every connection, reads the request's head, then does `answer`.
    fn fake_daemon<F, Fut>(socket: &Path, answer: F)
    where
        F: Fn(UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = UnixListener::bind(socket).unwrap();
        tokio::spawn(async move {
            loop {
                let (mut stream, _) = listener.accept().await.unwrap();
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                tokio::spawn(answer(stream));
            }
        });
    }

    /// `call` must end within `bound`, or the test fails (instead of hanging).
    async fn within<T>(bound: Duration, call: impl std::future::Future<Output = T>) -> T {
        tokio::time::timeout(bound, call)
            .await
            .expect("the client call did not end in bounded time")
    }

    #[tokio::test]
    async fn a_daemon_that_never_answers_times_out() {
        let socket = Socket::new("silent");
        fake_daemon(&socket.0, |stream| async move {
            // Holds the connection open and says nothing.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(stream);
        });
        let client = Client::new(&socket.0).with_request_timeout(Duration::from_millis(300));
        let started = Instant::now();
        let err = within(Duration::from_secs(5), client.status())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::Timeout { after, .. } if *after == Duration::from_millis(300)),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
        let msg = err.to_string();
        assert!(
            msg.contains("did not answer GET /v1/status within 300ms")
                && msg.contains(&socket.0.display().to_string()),
            "{msg}"
        );
        assert!(!err.is_unreachable());
    }

    #[tokio::test]
    async fn a_dribbled_endless_body_times_out() {
        let socket = Socket::new("dribble");
        fake_daemon(&socket.0, |mut stream| async move {
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            // One byte every 20 ms, forever: never too large, never finished.
            while stream.write_all(b"1\r\n[\r\n").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        let client = Client::new(&socket.0).with_request_timeout(Duration::from_millis(500));
        let started = Instant::now();
        let err = within(Duration::from_secs(5), client.services())
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Timeout { .. }), "{err:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn an_endless_body_is_too_large() {
        let socket = Socket::new("endless");
        fake_daemon(&socket.0, |mut stream| async move {
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            let chunk = format!("4000\r\n{}\r\n", "x".repeat(0x4000));
            while stream.write_all(chunk.as_bytes()).await.is_ok() {}
        });
        let client = Client::new(&socket.0)
            .with_request_timeout(Duration::from_secs(30))
            .with_max_response_bytes(1 << 20);
        let started = Instant::now();
        let err = within(Duration::from_secs(10), client.conntrack())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ClientError::TooLarge { limit, .. } if *limit == 1 << 20),
            "{err:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            err.to_string(),
            "tapestryd's answer to GET /v1/conntrack is larger than this client's limit of \
             1048576 bytes; not reading it"
        );
    }

    #[tokio::test]
    async fn a_declared_length_over_the_limit_is_refused_unread() {
        let socket = Socket::new("declared");
        fake_daemon(&socket.0, |mut stream| async move {
            // Declares 10 GiB, sends a little, then waits: only the header can end this fast.
            let head = b"HTTP/1.1 500 Internal Server Error\r\ncontent-length: 10737418240\r\n\r\n";
            let _ = stream.write_all(head).await;
            let _ = stream.write_all(b"{\"error\":").await;
            tokio::time::sleep(Duration::from_secs(3600)).await;
        });
        let client = Client::new(&socket.0)
            .with_request_timeout(Duration::from_secs(30))
            .with_max_response_bytes(4096);
        let err = within(Duration::from_secs(5), client.healthz())
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::TooLarge { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn an_answer_within_the_limits_is_read() {
        let socket = Socket::new("ok");
        fake_daemon(&socket.0, |mut stream| async move {
            let body = "[]";
            let answer = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(answer.as_bytes()).await;
        });
        let client = Client::new(&socket.0).with_max_response_bytes(2);
        let guests = within(Duration::from_secs(5), client.guests())
            .await
            .unwrap();
        assert!(guests.is_empty());
    }

    #[test]
    fn the_blocking_client_times_out_too() {
        let socket = Socket::new("blocking");
        let path = socket.0.clone();
        // The stand-in runs on a runtime of its own thread, as the daemon would.
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(async move {
                    fake_daemon(&path, |stream| async move {
                        tokio::time::sleep(Duration::from_secs(3600)).await;
                        drop(stream);
                    });
                    ready_tx.send(()).unwrap();
                    std::future::pending::<()>().await
                })
        });
        ready_rx.recv().unwrap();
        let client = blocking::Client::new(&socket.0)
            .with_connect_timeout(Duration::from_millis(200))
            .with_request_timeout(Duration::from_millis(300));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(client.delete_endpoint("c0ffee", "eth0")));
        let err = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the blocking client hung")
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("did not answer DELETE /v1/endpoints/c0ffee/eth0 within 300ms"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn the_defaults_are_bounded() {
        let client = Client::new("/nonexistent/tapestryd.sock");
        assert_eq!(client.connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(client.request_timeout, DEFAULT_REQUEST_TIMEOUT);
        assert_eq!(client.max_response_bytes, DEFAULT_MAX_RESPONSE_BYTES);
        let err = client.status().await.unwrap_err();
        assert!(err.is_unreachable(), "{err:?}");
    }

    #[test]
    fn endpoint_paths_percent_encode_every_segment() {
        // The daemon's router decodes each segment: `eth%30` must reach it as `eth%30`, not as
        // `eth0` (another attachment of the same container).
        assert_eq!(
            Client::endpoint_path("c0ffee", "eth%30"),
            "/v1/endpoints/c0ffee/eth%2530"
        );
        assert_eq!(
            Client::endpoint_path("a b/c?d#e", "net1"),
            "/v1/endpoints/a%20b%2Fc%3Fd%23e/net1"
        );
        assert_eq!(Client::endpoint_path("..", "."), "/v1/endpoints/%2E%2E/%2E");
        assert_eq!(
            Client::endpoint_path("Ab-9._~", "é"),
            "/v1/endpoints/Ab-9._~/%C3%A9"
        );
    }
}
