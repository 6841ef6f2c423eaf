//! Deleting an object that may have been replaced meanwhile.

use std::fmt::Debug;

use kube::{
    Api,
    api::{DeleteParams, Preconditions},
};
use serde::de::DeserializeOwned;

/// Deletes object `name` through `api`, but only the one with `uid` when given (a `Preconditions
/// { uid }` delete). Returns whether this call deleted it: `false` when it was gone already
/// (404) or when the name now belongs to a new object (409, the uid precondition failed), both
/// of which mean the object meant is gone. Other answers are errors.
pub async fn delete_unless_replaced<K>(
    api: &Api<K>,
    name: &str,
    uid: Option<&str>,
) -> Result<bool, kube::Error>
where
    K: Clone + DeserializeOwned + Debug,
{
    let params = DeleteParams {
        preconditions: uid.map(|uid| Preconditions {
            uid: Some(uid.to_owned()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match api.delete(name, &params).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use http::{Request, Response};
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::{Client, client::Body};
    use serde_json::{Value, json};

    use super::*;

    /// What the stand-in API server saw: method, path and the request body.
    type Seen = Arc<Mutex<Vec<(String, String, Value)>>>;

    /// A client whose API server answers every request with `code` (an object for 200, else a
    /// Status) and records what it was asked.
    fn client_answering(code: u16) -> (Client, Seen) {
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let service = tower::service_fn(move |req: Request<Body>| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                let body = body.collect_bytes().await?;
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                log.lock().unwrap().push((
                    parts.method.to_string(),
                    parts.uri.path().to_owned(),
                    body,
                ));
                let answer = match code {
                    200 => json!({"apiVersion": "v1", "kind": "ConfigMap",
                                  "metadata": {"name": "cm", "namespace": "ns"}}),
                    _ => json!({"apiVersion": "v1", "kind": "Status", "status": "Failure",
                                "code": code, "reason": "Test", "message": "answered by the test"}),
                };
                Response::builder()
                    .status(code)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&answer)?))
                    .map_err(tower::BoxError::from)
            }
        });
        (Client::new(service, "ns"), seen)
    }

    #[tokio::test]
    async fn deleted_gone_and_replaced_are_done_other_answers_are_errors() {
        for (code, want) in [
            (200, Some(true)),
            (404, Some(false)),
            (409, Some(false)),
            (403, None),
        ] {
            let (client, seen) = client_answering(code);
            let api: Api<ConfigMap> = Api::namespaced(client, "ns");
            let got = delete_unless_replaced(&api, "cm", Some("uid-1")).await;
            match want {
                Some(deleted) => assert_eq!(got.unwrap(), deleted, "answer {code}"),
                None => assert!(
                    matches!(got, Err(kube::Error::Api(ref s)) if s.code == code),
                    "answer {code}: {got:?}"
                ),
            }
            let seen = seen.lock().unwrap();
            assert_eq!(seen.len(), 1, "one request for answer {code}");
            let (method, path, body) = &seen[0];
            assert_eq!(method, "DELETE");
            assert_eq!(path, "/api/v1/namespaces/ns/configmaps/cm");
            assert_eq!(body["preconditions"], json!({"uid": "uid-1"}), "{body}");
        }
    }

    #[tokio::test]
    async fn without_a_uid_there_is_no_precondition() {
        let (client, seen) = client_answering(200);
        let api: Api<ConfigMap> = Api::namespaced(client, "ns");
        assert!(delete_unless_replaced(&api, "cm", None).await.unwrap());
        let body = &seen.lock().unwrap()[0].2;
        assert!(body.get("preconditions").is_none(), "{body}");
    }
}
