//! Leader election on a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it:
//! replicas race to write their identity into the Lease; the holder renews it every retry period
//! and gives up when it could not renew for the renew deadline; a candidate takes over when the
//! record has not changed for a lease duration *by its own clock* (renewTime is informative only,
//! so clock skew between nodes does not matter), or at once when the holder released it.
//! Updates carry the resourceVersion read, so two candidates never both win.

use std::time::{Duration, Instant};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use rand::Rng;

use crate::error::is_status;

/// Timings, with client-go's defaults.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long a record must stay unchanged before a candidate takes the Lease.
    pub lease_duration: Duration,
    /// How long the leader keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// Between two attempts, to acquire or to renew.
    pub retry_period: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// What a candidate saw of the Lease the last time it changed.
#[derive(Debug, Clone, PartialEq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    transitions: Option<i32>,
}

enum Outcome {
    /// We hold the Lease (acquired or renewed).
    Held,
    /// Someone else holds it, and it has not expired.
    HeldBy(String),
}

/// One replica's side of the election for Lease `namespace/name`.
pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    timing: Timing,
    observed: Option<(Record, Instant)>,
}

impl LeaderElector {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        identity: &str,
        timing: Timing,
    ) -> LeaderElector {
        LeaderElector {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            timing,
            observed: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Returns once this replica holds the Lease; tries every retry period (with jitter).
    pub async fn acquire(&mut self) {
        let mut last_holder = None;
        loop {
            match self.attempt().await {
                Ok(Outcome::Held) => {
                    tracing::info!(identity = %self.identity, lease = %self.name, "became the leader");
                    return;
                }
                Ok(Outcome::HeldBy(holder)) => {
                    if last_holder.as_ref() != Some(&holder) {
                        tracing::info!(%holder, "another replica leads; waiting");
                        last_holder = Some(holder);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "acquiring the leader Lease"),
            }
            tokio::time::sleep(self.jittered(self.timing.retry_period)).await;
        }
    }

    /// Renews the Lease every retry period while this replica holds it; returns when it lost
    /// it: another replica holds it, or no renewal succeeded within the renew deadline.
    pub async fn hold(&mut self) {
        let mut last_renewal = Instant::now();
        loop {
            tokio::time::sleep(self.timing.retry_period).await;
            match self.attempt().await {
                Ok(Outcome::Held) => last_renewal = Instant::now(),
                Ok(Outcome::HeldBy(holder)) => {
                    tracing::warn!(%holder, "lost the leader Lease to another replica");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "renewing the leader Lease"),
            }
            if last_renewal.elapsed() > self.timing.renew_deadline {
                tracing::warn!(
                    deadline = ?self.timing.renew_deadline,
                    "could not renew the leader Lease in time; stepping down"
                );
                return;
            }
        }
    }

    /// Gives the Lease up (on shutdown) so another replica takes over at once, as client-go's
    /// ReleaseOnCancel does: no holder, a one-second duration.
    pub async fn release(&mut self) {
        let result = async {
            let Some(mut lease) = self.api.get_opt(&self.name).await? else {
                return Ok(());
            };
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
                return Ok(());
            }
            let now = MicroTime(Timestamp::now());
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(now.clone());
            spec.acquire_time = Some(now);
            self.api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        }
        .await;
        match result {
            Ok(()) => tracing::info!("released the leader Lease"),
            Err(e) => tracing::warn!(error = %e, "releasing the leader Lease"),
        }
        self.observed = None;
    }

    fn jittered(&self, d: Duration) -> Duration {
        // client-go's JitterFactor 1.2: up to 1.2 times longer, so candidates spread out.
        d.mul_f64(1.0 + rand::rng().random_range(0.0..1.2))
    }

    fn lease_seconds(&self) -> i32 {
        self.timing
            .lease_duration
            .as_secs()
            .clamp(1, i32::MAX as u64) as i32
    }

    /// One attempt, bounded by the renew deadline: a hung API server must not keep a leader
    /// that can no longer renew.
    async fn attempt(&mut self) -> Result<Outcome, String> {
        let deadline = self.timing.renew_deadline;
        match tokio::time::timeout(deadline, self.try_acquire_or_renew()).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {deadline:?}")),
        }
    }

    async fn try_acquire_or_renew(&mut self) -> Result<Outcome, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(self.lease_seconds()),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(Outcome::Held)
                }
                // Another candidate created it first.
                Err(e) if is_status(&e, 409) => Ok(Outcome::HeldBy("?".into())),
                Err(e) => Err(e),
            };
        };

        self.observe(&lease);
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.identity.as_str());
        if let Some(holder) = holder.as_ref().filter(|_| !ours) {
            let duration = spec
                .lease_duration_seconds
                .map(|s| Duration::from_secs(s.max(1) as u64))
                .unwrap_or(self.timing.lease_duration);
            let unchanged_for = self.observed.as_ref().map(|(_, at)| at.elapsed());
            if unchanged_for.is_none_or(|d| d < duration) {
                return Ok(Outcome::HeldBy(holder.clone()));
            }
            tracing::info!(%holder, "the leader Lease expired; taking it over");
        }
        if !ours {
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(self.lease_seconds());
        spec.renew_time = Some(now);
        // The resourceVersion read makes this a compare-and-swap.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(updated) => {
                self.observe(&updated);
                Ok(Outcome::Held)
            }
            Err(e) if is_status(&e, 409) => Ok(Outcome::HeldBy(
                holder.unwrap_or_else(|| "another replica".into()),
            )),
            Err(e) => Err(e),
        }
    }

    /// Remembers when the record last changed, by our clock.
    fn observe(&mut self, lease: &Lease) {
        let spec = lease.spec.clone().unwrap_or_default();
        let record = Record {
            holder: spec.holder_identity,
            renew_time: spec.renew_time,
            transitions: spec.lease_transitions,
        };
        if self.observed.as_ref().map(|(r, _)| r) != Some(&record) {
            self.observed = Some((record, Instant::now()));
        }
        tracing::trace!(lease = %lease.name_any(), "observed the leader Lease");
    }
}

/// A default identity: the host (pod) name and a random suffix, so two processes on one host
/// differ.
pub fn default_identity() -> String {
    let host = std::env::var("POD_NAME")
        .ok()
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "tapestry-controller".into());
    format!("{host}_{:08x}", rand::rng().random::<u32>())
}
