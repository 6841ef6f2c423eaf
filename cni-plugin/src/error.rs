//! The plugin's one error type, and its conversion to the spec's error object.
//!
//! Internal code returns `CniError`; only `main` turns it into `{"cniVersion", "code", "msg",
//! "details"}` on stdout and exit status 1 (SPEC.md, section 5 "Error").

use std::path::PathBuf;

use serde::Serialize;
use tapestry_api::client::ClientError;

/// Well-known error codes (SPEC.md, section 5; the reference plugins' `types.Err*`).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const PLUGIN_NOT_AVAILABLE: u32 = 50;
    pub const INTERNAL: u32 = 999;
}

#[derive(Debug, thiserror::Error)]
pub enum CniError {
    #[error("{msg}")]
    IncompatibleVersion { msg: String, details: String },

    #[error("unsupported field {field} = {value} in the tapestry-cni config: {hint}")]
    UnsupportedField {
        field: String,
        value: String,
        hint: String,
    },

    #[error("{0}")]
    UnknownContainer(String),

    #[error("invalid environment variable {var}: {msg}")]
    InvalidEnv { var: &'static str, msg: String },

    #[error("reading the network config from stdin: {0}")]
    Io(#[source] std::io::Error),

    #[error("the network config on stdin is larger than {limit} bytes: not reading it")]
    StdinTooLarge { limit: usize },

    #[error("cannot decode {what}: {source}")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },

    #[error("{0}")]
    InvalidConfig(String),

    /// The daemon is not there. ADD and CHECK can be retried once it runs.
    #[error(
        "cannot reach tapestryd at {}: {source}; tapestryd must run on this node before pods \
         start (check the tapestry DaemonSet, or set `socket` in the tapestry-cni config / \
         TAPESTRY_SOCKET to its socket)",
        socket.display()
    )]
    DaemonUnreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// STATUS: the plugin cannot serve ADD now.
    #[error("{0}")]
    NotAvailable(String),

    /// The daemon answered, but refused or failed.
    #[error("tapestryd {doing}: {source}")]
    Daemon {
        doing: String,
        #[source]
        source: ClientError,
    },

    /// Work in the pod's or the host's network namespace failed.
    #[error("{0}")]
    Network(String),
}

pub type Result<T, E = CniError> = std::result::Result<T, E>;

impl CniError {
    pub fn code(&self) -> u32 {
        match self {
            CniError::IncompatibleVersion { .. } => code::INCOMPATIBLE_VERSION,
            CniError::UnsupportedField { .. } => code::UNSUPPORTED_FIELD,
            CniError::UnknownContainer(_) => code::UNKNOWN_CONTAINER,
            CniError::InvalidEnv { .. } => code::INVALID_ENV,
            CniError::Io(_) => code::IO_FAILURE,
            CniError::Decode { .. } | CniError::StdinTooLarge { .. } => code::DECODE_FAILURE,
            CniError::InvalidConfig(_) => code::INVALID_CONFIG,
            CniError::DaemonUnreachable { .. } => code::TRY_AGAIN_LATER,
            // 409: another ADD or DEL of this endpoint is in progress, or the node is out of
            // guest slots; 503: the daemon is not ready. Both pass: the runtime retries.
            CniError::Daemon {
                source:
                    ClientError::Api {
                        status: 409 | 503, ..
                    },
                ..
            } => code::TRY_AGAIN_LATER,
            // Connected, but no answer in time: a stuck or overloaded daemon; the runtime
            // retries.
            CniError::Daemon {
                source: ClientError::Timeout { .. },
                ..
            } => code::TRY_AGAIN_LATER,
            CniError::NotAvailable(_) => code::PLUGIN_NOT_AVAILABLE,
            CniError::Daemon { .. } | CniError::Network(_) => code::INTERNAL,
        }
    }

    /// The longer text of the error object: what the message leaves out.
    fn details(&self) -> String {
        match self {
            CniError::IncompatibleVersion { details, .. } => details.clone(),
            _ => String::new(),
        }
    }

    /// A daemon call failed: unreachable becomes "try again later", anything else is the
    /// daemon's own answer.
    pub fn from_client(doing: impl Into<String>, err: ClientError) -> Self {
        match err {
            ClientError::Unreachable { socket, source } => {
                CniError::DaemonUnreachable { socket, source }
            }
            source => CniError::Daemon {
                doing: doing.into(),
                source,
            },
        }
    }

    pub fn network(msg: impl Into<String>) -> Self {
        CniError::Network(msg.into())
    }

    pub fn to_spec(&self, cni_version: &str) -> SpecError {
        SpecError {
            cni_version: cni_version.to_owned(),
            code: self.code(),
            msg: self.to_string(),
            details: self.details(),
        }
    }
}

/// The error object of SPEC.md section 5.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct SpecError {
    pub cni_version: String,
    pub code: u32,
    pub msg: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub details: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unreachable_daemon_is_try_again_later_and_names_the_socket() {
        let err = CniError::from_client(
            "adding the endpoint",
            ClientError::Unreachable {
                socket: "/run/tapestry/tapestryd.sock".into(),
                source: std::io::Error::from(std::io::ErrorKind::NotFound),
            },
        );
        let spec = err.to_spec("1.0.0");
        assert_eq!(spec.code, 11);
        assert!(
            spec.msg.contains("/run/tapestry/tapestryd.sock"),
            "{}",
            spec.msg
        );
        assert!(spec.msg.contains("tapestryd must run"), "{}", spec.msg);
    }

    #[test]
    fn a_busy_or_unready_daemon_is_try_again_later_and_a_refusal_is_not() {
        let daemon = |status| {
            CniError::from_client(
                "refused endpoint",
                ClientError::Api {
                    status,
                    message: "x".into(),
                },
            )
            .code()
        };
        assert_eq!(daemon(409), 11);
        assert_eq!(daemon(503), 11);
        assert_eq!(daemon(400), 999);
        assert_eq!(daemon(500), 999);
    }

    #[test]
    fn a_daemon_that_does_not_answer_in_time_is_try_again_later() {
        let err = CniError::from_client(
            "refused endpoint container c interface eth0",
            ClientError::Timeout {
                socket: "/run/tapestry/tapestryd.sock".into(),
                method: tapestry_api::client::Method::POST,
                path: "/v1/endpoints".into(),
                after: std::time::Duration::from_secs(30),
            },
        );
        let spec = err.to_spec("1.0.0");
        assert_eq!(spec.code, 11);
        assert!(
            spec.msg
                .contains("did not answer POST /v1/endpoints within 30s"),
            "{}",
            spec.msg
        );
        // An answer too large to read is the daemon's own failure, not a reason to retry.
        let err = CniError::from_client(
            "refused endpoint",
            ClientError::TooLarge {
                method: tapestry_api::client::Method::GET,
                path: "/v1/endpoints/c/eth0".into(),
                limit: 4 << 20,
            },
        );
        assert_eq!(err.code(), 999);
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[test]
    fn spec_error_serializes_with_the_spec_field_names() {
        let err = CniError::IncompatibleVersion {
            msg: "incompatible CNI versions".into(),
            details: "config is \"0.2.0\"".into(),
        };
        let json = serde_json::to_value(err.to_spec("0.2.0")).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "cniVersion": "0.2.0",
                "code": 1,
                "msg": "incompatible CNI versions",
                "details": "config is \"0.2.0\"",
            })
        );
        let no_details =
            serde_json::to_value(CniError::InvalidConfig("x".into()).to_spec("1.0.0")).unwrap();
        assert!(no_details.get("details").is_none());
    }
}
