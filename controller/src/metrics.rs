//! Prometheus metrics (`tapestry_controller_*`) and the `/metrics` + `/healthz` endpoint.

use std::{
    net::SocketAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::error::Error;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusalLabels {
    /// [`crate::trust::Refusal::label`].
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabels {
    /// `apply` or `delete`.
    pub op: &'static str,
}

/// Every metric of the controller, registered in [`Metrics::registry`].
pub struct Metrics {
    registry: Registry,
    pub reconciliations: Counter,
    pub reconcile_errors: Family<ErrorLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub slice_writes: Family<WriteLabels, Counter>,
    pub leader: Gauge,
    pub leader_transitions: Counter,
    pub initial_sync_seconds: Gauge<f64, AtomicU64>,
    pub guests_not_published: Family<RefusalLabels, Counter>,
    pub guests_refused: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tapestry_controller");
        let reconciliations = Counter::default();
        registry.register(
            "reconciliations",
            "Service reconciliations run",
            reconciliations.clone(),
        );
        let reconcile_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "reconcile_errors",
            "Failed Service reconciliations, by error",
            reconcile_errors.clone(),
        );
        // 1 ms .. ~16 s
        let reconcile_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "reconcile_duration_seconds",
            "Time a Service reconciliation took",
            reconcile_duration.clone(),
        );
        let slice_writes = Family::<WriteLabels, Counter>::default();
        registry.register(
            "endpointslice_writes",
            "EndpointSlices applied or deleted",
            slice_writes.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and reconciles",
            leader.clone(),
        );
        let leader_transitions = Counter::default();
        registry.register(
            "leader_acquisitions",
            "Times this replica became the leader",
            leader_transitions.clone(),
        );
        let initial_sync_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "initial_sync_seconds",
            "Time from taking the lead (or starting) to the end of the first reconcile of every \
             Service; 0 until then",
            initial_sync_seconds.clone(),
        );
        let guests_not_published = Family::<RefusalLabels, Counter>::default();
        registry.register(
            "guests_not_published",
            "Guests found not to agree with what backs them (trust.rs), by reason; counted once \
             per Guest and change of reason",
            guests_not_published.clone(),
        );
        let guests_refused = Gauge::default();
        registry.register(
            "guests_refused",
            "Guests not published now, for a disagreement with what backs them",
            guests_refused.clone(),
        );
        Metrics {
            registry,
            guests_not_published,
            guests_refused,
            initial_sync_seconds,
            reconciliations,
            reconcile_errors,
            reconcile_duration,
            slice_writes,
            leader,
            leader_transitions,
        }
    }
}

impl Metrics {
    pub fn reconciled(&self, took: Duration) {
        self.reconciliations.inc();
        self.reconcile_duration.observe(took.as_secs_f64());
    }

    pub fn failed(&self, error: &Error) {
        self.reconcile_errors
            .get_or_create(&ErrorLabels {
                error: error.metric_label(),
            })
            .inc();
    }

    pub fn not_published(&self, reason: &'static str) {
        self.guests_not_published
            .get_or_create(&RefusalLabels { reason })
            .inc();
    }

    pub fn wrote(&self, op: &'static str) {
        self.slice_writes.get_or_create(&WriteLabels { op }).inc();
    }

    /// The OpenMetrics text of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

async fn render_metrics(State(m): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
}

/// Serves `/metrics` and `/healthz` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>) -> anyhow::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(metrics);
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics and /healthz");
    axum::serve(listener, app).await?;
    Ok(())
}
