//! The controller's one error type; every variant has a metric label.

/// Why a reconcile (or the controller) failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An API call failed (the server's status or the transport).
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// An object lacks a field the API server always sets (a malformed object in a cache).
    #[error("object has no {0}")]
    MissingObjectKey(&'static str),
    /// A watch cache's writer is gone: the controller is shutting down.
    #[error("watch cache closed")]
    CacheClosed,
    /// The Guest CRD is not installed.
    #[error(
        "the Guest CRD ({crd}) is not installed: run `tapestry-controller crd | kubectl apply -f -` \
         (or apply the chart), then start the controller again",
        crd = tapestry_k8s::names::GUEST_CRD
    )]
    CrdMissing,
}

impl Error {
    /// The `error` label of `tapestry_controller_reconcile_errors_total`.
    pub fn metric_label(&self) -> String {
        match self {
            Error::Kube(kube::Error::Api(status)) if !status.reason.is_empty() => {
                format!("api_{}", status.reason.to_lowercase())
            }
            Error::Kube(kube::Error::Api(status)) => format!("api_{}", status.code),
            Error::Kube(_) => "kube_transport".into(),
            Error::MissingObjectKey(_) => "missing_object_key".into(),
            Error::CacheClosed => "cache_closed".into(),
            Error::CrdMissing => "crd_missing".into(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Whether `e` is the API server's answer `code` (404 for a delete of what is gone already, ...).
pub fn is_status(e: &kube::Error, code: u16) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == code)
}
