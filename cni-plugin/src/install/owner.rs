//! Whether the watching installer's stop is Tapestry's uninstall or only its pod going away.
//!
//! A DaemonSet's pods stop for two very different reasons: `helm uninstall` (the DaemonSet is
//! deleted; the step must go, or every pod created afterwards fails in a step nothing serves),
//! and a rolling update, a node restart or a deleted pod (the DaemonSet stays and starts a new
//! pod; removing the step would open a window in which pods are created without Tapestry, and
//! with kube-proxy replacement on those pods would have no ClusterIPs). So on SIGTERM the
//! installer asks the API for its DaemonSet: gone or being deleted means uninstall; present
//! means keep the step. When the API cannot answer, the step stays: a pod whose ADD fails with
//! code 11 is retried by its runtime, while a pod created without the step would silently lack
//! the datapath. `helm uninstall` also deletes the installer's ServiceAccount and Role right
//! after the DaemonSet, before the pods stop, so an answer of 401 or 403 means uninstalling too.

use std::fmt;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::Api;

/// What stopping means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnStop {
    /// Take the step and the binary out: Tapestry is being uninstalled.
    Uninstall(String),
    /// Leave them: the DaemonSet carries on (or nobody could tell).
    Keep(String),
}

/// `NAMESPACE/NAME` of the DaemonSet whose pod this installer runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSetRef {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for DaemonSetRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                Ok(DaemonSetRef {
                    namespace: ns.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("{s:?}: expected NAMESPACE/NAME")),
        }
    }
}

impl fmt::Display for DaemonSetRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Decides from the DaemonSet as the API shows it (`None`: not found).
pub fn decide(ds: &DaemonSetRef, found: Option<&DaemonSet>) -> OnStop {
    match found {
        None => OnStop::Uninstall(format!("DaemonSet {ds} is gone")),
        Some(d) if d.metadata.deletion_timestamp.is_some() => {
            OnStop::Uninstall(format!("DaemonSet {ds} is being deleted"))
        }
        Some(_) => OnStop::Keep(format!(
            "DaemonSet {ds} still exists (a rolling update, a restart or a deleted pod): the \
             step stays for the next pod"
        )),
    }
}

/// Asks the API (in-cluster configuration, else `$KUBECONFIG`).
pub async fn on_stop(ds: &DaemonSetRef) -> OnStop {
    let client = match tapestry_k8s::client(None).await {
        Ok(c) => c,
        Err(e) => return OnStop::Keep(format!("no Kubernetes client ({e}): the step stays")),
    };
    let api: Api<DaemonSet> = Api::namespaced(client, &ds.namespace);
    let lookup = tokio::time::timeout(std::time::Duration::from_secs(10), api.get_opt(&ds.name));
    match lookup.await {
        Ok(Ok(found)) => decide(ds, found.as_ref()),
        // `helm uninstall` deletes the DaemonSet and, right after it, the ServiceAccount and
        // the Role this installer reads it with, before the pods stop: losing those
        // credentials is the uninstall too.
        Ok(Err(kube::Error::Api(status))) if status.code == 401 || status.code == 403 => {
            OnStop::Uninstall(format!(
                "reading DaemonSet {ds}: {} {}: its credentials are gone with the release",
                status.code, status.reason
            ))
        }
        Ok(Err(e)) => OnStop::Keep(format!("reading DaemonSet {ds}: {e}: the step stays")),
        Err(_) => OnStop::Keep(format!(
            "reading DaemonSet {ds}: no answer in 10 s: the step stays"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ds() -> DaemonSetRef {
        "tapestry/tapestry-node".parse().unwrap()
    }

    #[test]
    fn parses_namespace_and_name_only() {
        assert_eq!(ds().to_string(), "tapestry/tapestry-node");
        for bad in ["tapestry", "/x", "x/", "a/b/c", ""] {
            assert!(bad.parse::<DaemonSetRef>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uninstalls_only_when_the_daemonset_goes() {
        assert!(matches!(decide(&ds(), None), OnStop::Uninstall(_)));
        let mut d = DaemonSet::default();
        assert!(matches!(decide(&ds(), Some(&d)), OnStop::Keep(_)));
        d.metadata.deletion_timestamp = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
            k8s_openapi::jiff::Timestamp::now(),
        ));
        assert!(matches!(decide(&ds(), Some(&d)), OnStop::Uninstall(_)));
    }
}
