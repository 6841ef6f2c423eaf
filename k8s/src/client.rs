//! A Kubernetes client as every Tapestry program finds the API: an explicit kubeconfig, else
//! what kube-rs infers from the environment (`$KUBECONFIG` or `~/.kube/config`, then the
//! in-cluster service account).

use std::path::{Path, PathBuf};

use kube::{
    Client, Config,
    config::{InferConfigError, KubeConfigOptions, Kubeconfig, KubeconfigError},
};

/// Why no client could be made; each says what was tried.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The kubeconfig given explicitly could not be read or parsed.
    #[error("reading kubeconfig {}", path.display())]
    ReadKubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    /// The kubeconfig given explicitly was read, but is unusable (no such context, ...).
    #[error("kubeconfig {}", path.display())]
    Kubeconfig {
        path: PathBuf,
        #[source]
        source: KubeconfigError,
    },
    /// A context was asked for, and the kubeconfig of the environment is missing or unusable.
    #[error("loading the kubeconfig ($KUBECONFIG or ~/.kube/config)")]
    DefaultKubeconfig(#[source] KubeconfigError),
    /// Neither a kubeconfig nor an in-cluster service account.
    #[error(
        "no Kubernetes configuration: no --kubeconfig, no $KUBECONFIG or ~/.kube/config, and \
         not in a cluster"
    )]
    NoConfiguration(#[source] InferConfigError),
    /// The configuration was found, but makes no client (its TLS settings, ...).
    #[error("creating the Kubernetes client for {url}")]
    Client {
        url: String,
        #[source]
        source: kube::Error,
    },
}

/// A client from the kubeconfig at `kubeconfig` (its current context), or, without one, from the
/// environment (`$KUBECONFIG` or `~/.kube/config`, then the in-cluster service account).
pub async fn client(kubeconfig: Option<&Path>) -> Result<Client, ClientError> {
    ConfigSource {
        kubeconfig: kubeconfig.map(Path::to_path_buf),
        context: None,
    }
    .client()
    .await
}

/// Where the configuration comes from, with kubectl's `--kubeconfig` and `--context`.
#[derive(Clone, Debug, Default)]
pub struct ConfigSource {
    /// The kubeconfig file; `None`: the environment's.
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context; `None`: its current context (or in-cluster, without a
    /// kubeconfig).
    pub context: Option<String>,
}

impl ConfigSource {
    /// The configuration: the kubeconfig given, else with a context the environment's
    /// kubeconfig, else whatever kube-rs infers (the environment's kubeconfig, then in-cluster).
    pub async fn config(&self) -> Result<Config, ClientError> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        match &self.kubeconfig {
            Some(path) => {
                let kc =
                    Kubeconfig::read_from(path).map_err(|source| ClientError::ReadKubeconfig {
                        path: path.clone(),
                        source,
                    })?;
                Config::from_custom_kubeconfig(kc, &options)
                    .await
                    .map_err(|source| ClientError::Kubeconfig {
                        path: path.clone(),
                        source,
                    })
            }
            // A context exists only in a kubeconfig: no in-cluster fallback.
            None if self.context.is_some() => Config::from_kubeconfig(&options)
                .await
                .map_err(ClientError::DefaultKubeconfig),
            None => Config::infer().await.map_err(ClientError::NoConfiguration),
        }
    }

    /// A client for [`ConfigSource::config`].
    pub async fn client(&self) -> Result<Client, ClientError> {
        client_for(self.config().await?)
    }
}

/// A client for `config`; an error names its server.
pub fn client_for(config: Config) -> Result<Client, ClientError> {
    let url = config.cluster_url.to_string();
    Client::try_from(config).map_err(|source| ClientError::Client { url, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_chain(e: &dyn std::error::Error) -> String {
        let mut s = e.to_string();
        let mut cur = e.source();
        while let Some(c) = cur {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cur = c.source();
        }
        s
    }

    /// A kubeconfig with one context, `ctx`, at `server`.
    fn write_kubeconfig(path: &Path, server: &str) {
        std::fs::write(
            path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: ctx\n\
                 clusters: [{{name: c, cluster: {{server: '{server}'}}}}]\n\
                 users: [{{name: u, user: {{token: t}}}}]\n\
                 contexts: [{{name: ctx, context: {{cluster: c, user: u, namespace: ns1}}}}]\n"
            ),
        )
        .unwrap();
    }

    fn temp_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tapestry-k8s-{tag}-{}.yaml", std::process::id()))
    }

    #[tokio::test]
    async fn an_explicit_kubeconfig_and_its_context() {
        let path = temp_path("kubeconfig");
        write_kubeconfig(&path, "http://127.0.0.1:6443");
        let source = ConfigSource {
            kubeconfig: Some(path.clone()),
            context: None,
        };
        let config = source.config().await.unwrap();
        assert_eq!(config.cluster_url.to_string(), "http://127.0.0.1:6443/");
        assert_eq!(config.default_namespace, "ns1");
        let client = client(Some(&path)).await.unwrap();
        assert_eq!(client.default_namespace(), "ns1");

        let missing = ConfigSource {
            kubeconfig: Some(path.clone()),
            context: Some("nope".into()),
        };
        let err = missing.config().await.unwrap_err();
        assert!(matches!(err, ClientError::Kubeconfig { .. }), "{err}");
        assert!(
            error_chain(&err).starts_with(&format!("kubeconfig {}: ", path.display())),
            "{}",
            error_chain(&err)
        );
        std::fs::remove_file(&path).unwrap();
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_is_named() {
        let path = temp_path("missing");
        let Err(err) = client(Some(&path)).await else {
            panic!("a client from a missing kubeconfig");
        };
        assert!(matches!(err, ClientError::ReadKubeconfig { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            format!("reading kubeconfig {}", path.display())
        );
    }
}
