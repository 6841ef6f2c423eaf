//! A client of the daemon's local API, for the CNI plugin, the CLI and tests.
//!
//! HTTP/1.1 over the unix socket with hyper. The blocking wrapper runs a current-thread runtime
//! per call, which costs microseconds: the CNI plugin and the CLI are short-lived processes.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, body::Bytes};
use hyper_util::rt::TokioIo;
use serde::{Serialize, de::DeserializeOwned};

use crate::types::{
    AttachRequest, AttachmentInfo, ConntrackEntry, EndpointGcRequest, EndpointInfo,
    EndpointRequest, ErrorBody, FlowsResponse, FlushResult, GuestInfo, ServiceInfo, Status, paths,
};

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

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: impl AsRef<Path>) -> Self {
        Self {
            socket: socket.as_ref().to_owned(),
        }
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
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ClientError::Unreachable {
                socket: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let has_body = body.is_some();
        let mut req = Request::builder()
            .method(method)
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
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?
            .to_bytes();
        conn.abort();
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
    use super::*;

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
