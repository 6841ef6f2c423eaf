//! `healthCheckNodePort`: for every LoadBalancer Service with `externalTrafficPolicy: Local`,
//! kube-proxy's per-Service health check on `0.0.0.0:<healthCheckNodePort>`, so a load balancer
//! sends clients only to the nodes that have one of the Service's endpoints: 200 while this node
//! has a ready endpoint of it, 503 otherwise, with kube-proxy's JSON body and headers
//! (pkg/proxy/healthcheck/service_health.go, k8s.io/kubernetes v1.37.2).
//!
//! One listener per port, opened when a Service asks for it and closed when none does; a count
//! that changes only updates what the listener answers. A port that cannot be bound (another
//! process holds it) is logged and reported in the daemon's status, never fatal, and retried at
//! the next change.

use std::{collections::HashMap, net::Ipv4Addr, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

use super::Services;

/// One Service's health check, as the source computes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub namespace: String,
    pub name: String,
    /// `spec.healthCheckNodePort`.
    pub port: u16,
    /// Ready endpoints of the Service on this node (distinct addresses, over all its ports).
    pub local_endpoints: usize,
}

struct Listener {
    check: watch::Sender<HealthCheck>,
    task: JoinHandle<()>,
}

/// Keeps one listener per wanted port until `checks` closes.
pub async fn serve(services: Arc<Services>, mut checks: watch::Receiver<Vec<HealthCheck>>) {
    let mut open: HashMap<u16, Listener> = HashMap::new();
    loop {
        let wanted = checks.borrow_and_update().clone();
        let failed = sync(&mut open, &wanted).await;
        services.set_health_check_error((!failed.is_empty()).then(|| failed.join("; ")));
        if checks.changed().await.is_err() {
            break;
        }
    }
    for (_, l) in open {
        l.task.abort();
    }
}

/// Opens, updates and closes listeners to match `wanted`; returns the ports that could not be
/// opened, each with why.
async fn sync(open: &mut HashMap<u16, Listener>, wanted: &[HealthCheck]) -> Vec<String> {
    let mut by_port: HashMap<u16, &HealthCheck> = HashMap::new();
    for c in wanted {
        by_port.entry(c.port).or_insert(c);
    }
    open.retain(|port, l| {
        let keep = by_port.contains_key(port);
        if !keep {
            l.task.abort();
            info!(port, "health check port closed");
        }
        keep
    });
    let mut failed = Vec::new();
    let mut ports: Vec<_> = by_port.into_iter().collect();
    ports.sort_by_key(|(p, _)| *p);
    for (port, check) in ports {
        if let Some(l) = open.get(&port) {
            l.check.send_if_modified(|c| {
                let changed = c != check;
                *c = check.clone();
                changed
            });
            continue;
        }
        match tokio::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)).await {
            Ok(listener) => {
                let (tx, rx) = watch::channel(check.clone());
                let app = Router::new().fallback(answer).with_state(rx);
                let task = tokio::spawn(async move {
                    if let Err(e) = axum::serve(listener, app).await {
                        warn!(port, error = %e, "health check server stopped");
                    }
                });
                info!(
                    port,
                    service = %format!("{}/{}", check.namespace, check.name),
                    "health check port open"
                );
                open.insert(port, Listener { check: tx, task });
            }
            Err(e) => {
                let why = format!(
                    "health check port {port} of service {}/{}: {e}",
                    check.namespace, check.name
                );
                warn!("{why}");
                failed.push(why);
            }
        }
    }
    failed
}

/// Any path, as kube-proxy's handler answers every request on the port.
async fn answer(State(check): State<watch::Receiver<HealthCheck>>) -> Response {
    let c = check.borrow().clone();
    let status = if c.local_endpoints > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut resp = (status, body(&c)).into_response();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        "X-Load-Balancing-Endpoint-Weight",
        HeaderValue::from(c.local_endpoints),
    );
    resp
}

/// kube-proxy's body: the daemon answering at all is its proxy being healthy.
fn body(c: &HealthCheck) -> String {
    serde_json::json!({
        "service": {"namespace": c.namespace, "name": c.name},
        "localEndpoints": c.local_endpoints,
        "serviceProxyHealthy": true,
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(port: u16, n: usize) -> HealthCheck {
        HealthCheck {
            namespace: "shop".into(),
            name: "web".into(),
            port,
            local_endpoints: n,
        }
    }

    async fn get(port: u16) -> (u16, String, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .await
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap();
        (status, head.to_ascii_lowercase(), body.to_owned())
    }

    fn free_port() -> u16 {
        std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    #[tokio::test]
    async fn answers_as_kube_proxy_and_follows_the_count_then_closes() {
        let port = free_port();
        let mut open = HashMap::new();
        assert!(sync(&mut open, &[check(port, 2)]).await.is_empty());
        let (status, head, body) = get(port).await;
        assert_eq!(status, 200);
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{head}");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"service": {"namespace": "shop", "name": "web"},
                               "localEndpoints": 2, "serviceProxyHealthy": true})
        );

        assert!(sync(&mut open, &[check(port, 0)]).await.is_empty());
        let (status, _, body) = get(port).await;
        assert_eq!(status, 503);
        assert!(body.contains("\"localEndpoints\":0"), "{body}");

        assert!(sync(&mut open, &[]).await.is_empty());
        assert!(open.is_empty());
        // The listener is gone: nothing answers any more.
        let mut refused = false;
        for _ in 0..50 {
            if tokio::net::TcpStream::connect((Ipv4Addr::LOCALHOST, port))
                .await
                .is_err()
            {
                refused = true;
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(refused, "port {port} still answers after its Service went");
    }

    #[tokio::test]
    async fn a_port_in_use_is_reported_not_fatal() {
        let taken = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0)).unwrap();
        let port = taken.local_addr().unwrap().port();
        let other = free_port();
        let mut open = HashMap::new();
        let failed = sync(&mut open, &[check(port, 1), check(other, 1)]).await;
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(failed[0].contains(&format!("port {port}")), "{failed:?}");
        assert!(failed[0].contains("shop/web"), "{failed:?}");
        // The other port is served all the same.
        assert_eq!(get(other).await.0, 200);
    }
}
