//! The controller: one kube-runtime `Controller` over Services, triggered by its own slices and
//! the built-in controller's (both owned by the Service) and by Guests (mapped to the Services
//! that select them, or that still list them). The reconciler reads the same reflector stores the
//! triggers fill, so there is one watch per kind.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, future};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt,
    api::{DeleteParams, ListParams, PartialObjectMeta, Patch, PatchParams, Preconditions},
    runtime::{
        Controller, WatchStreamExt,
        controller::{self, Action},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tapestry_k8s::{
    Guest,
    names::{self, labels},
};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, instrument, warn};

use crate::{
    endpointslice,
    error::{Error, Result, is_status},
    metrics::Metrics,
};

/// Tunables of [`run`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Every Service is reconciled again this often, and stale slices are swept, whatever the
    /// watches said (a safety net: zone changes, for one, trigger nothing).
    pub resync: Duration,
    /// Services reconciled at once.
    pub concurrency: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            resync: Duration::from_secs(300),
            concurrency: 4,
        }
    }
}

/// What the reconciler reads and writes with.
pub struct Context {
    client: Client,
    services: Store<Service>,
    guests: Store<Guest>,
    /// Every EndpointSlice with a service-name label: ours and the built-in controller's.
    slices: Store<EndpointSlice>,
    /// Node metadata, for zones; `None` when nodes are not readable.
    nodes: Option<Store<PartialObjectMeta<Node>>>,
    metrics: Arc<Metrics>,
    settings: Settings,
    /// Consecutive failures per Service, for the retry backoff.
    failures: Mutex<HashMap<ObjectRef<Service>, u32>>,
    /// The caches (bits of [`cache`]) that have had their first full list.
    ready: watch::Receiver<u8>,
    /// The bits [`Context::caches_ready`] waits for.
    needed: u8,
}

/// Which watch caches have had their first full list, one bit each.
///
/// Not `Store::wait_until_ready`: in kube-runtime 5.0.0 it wakes only the last of several tasks
/// waiting at once (one oneshot receiver behind a mutex, each poll replacing the waker), and the
/// applier already waits on the Service store; reconciles waiting as well hung for ever, now and
/// then. A watch channel wakes every waiter.
mod cache {
    pub const SERVICES: u8 = 1;
    pub const GUESTS: u8 = 2;
    pub const SLICES: u8 = 4;
    pub const NODES: u8 = 8;
}

/// Sets `bit` in `ready` when a watch stream finishes a (re)list.
fn mark_ready<K>(
    ready: &watch::Sender<u8>,
    bit: u8,
) -> impl FnMut(&std::result::Result<watcher::Event<K>, watcher::Error>) + use<K> {
    let ready = ready.clone();
    move |ev| {
        if let Ok(watcher::Event::InitDone) = ev {
            ready.send_if_modified(|b| {
                let was = *b;
                *b |= bit;
                was != *b
            });
        }
    }
}

impl Context {
    /// Waits until every watch cache has its first full list: a reconcile against a cache still
    /// filling would delete slices of guests it has not seen yet.
    async fn caches_ready(&self) -> Result<()> {
        let needed = self.needed;
        self.ready
            .clone()
            .wait_for(|b| b & needed == needed)
            .await
            .map(|_| ())
            .map_err(|_| Error::CacheClosed)
    }

    fn zone_of(&self, node: &str) -> Option<String> {
        let nodes = self.nodes.as_ref()?;
        nodes
            .get(&ObjectRef::new(node))?
            .labels()
            .get(labels::ZONE)
            .cloned()
    }

    fn slices_api(&self, namespace: &str) -> Api<EndpointSlice> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Deletes one of our slices, unless it was replaced meanwhile (uid precondition) or is
    /// gone already.
    async fn delete_slice(&self, slice: &EndpointSlice) -> Result<()> {
        let (Some(ns), Some(name)) = (
            slice.metadata.namespace.as_deref(),
            slice.metadata.name.as_deref(),
        ) else {
            return Ok(());
        };
        let dp = DeleteParams {
            preconditions: Some(Preconditions {
                uid: slice.metadata.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match self.slices_api(ns).delete(name, &dp).await {
            Ok(_) => {
                self.metrics.wrote("delete");
                info!(slice = name, namespace = ns, "deleted EndpointSlice");
                Ok(())
            }
            Err(e) if is_status(&e, 404) || is_status(&e, 409) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Services that should be reconciled when `guest` changed: those in its namespace whose
/// selector matches its labels now, and those whose slices of ours still list it (its labels
/// changed, or it is gone).
pub fn services_for_guest(
    guest: &Guest,
    services: &Store<Service>,
    slices: &Store<EndpointSlice>,
) -> Vec<ObjectRef<Service>> {
    let Some(ns) = guest.metadata.namespace.as_deref() else {
        return Vec::new();
    };
    let name = guest.name_any();
    let mut out = BTreeSet::new();
    for svc in services.state_filter(|s| s.metadata.namespace.as_deref() == Some(ns)) {
        if endpointslice::service_selector(&svc)
            .is_some_and(|sel| endpointslice::selects(sel, guest.labels()))
        {
            out.insert(svc.name_any());
        }
    }
    let lists_guest = |s: &EndpointSlice| {
        s.metadata.namespace.as_deref() == Some(ns)
            && endpointslice::managed_by(s) == Some(names::MANAGED_BY)
            && s.endpoints.iter().any(|e| {
                e.target_ref.as_ref().is_some_and(|r| {
                    r.kind.as_deref() == Some(names::GUEST_KIND) && r.name.as_deref() == Some(&name)
                })
            })
    };
    for slice in slices.state_filter(lists_guest) {
        if let Some(svc) = slice.labels().get(labels::SERVICE_NAME) {
            out.insert(svc.clone());
        }
    }
    out.into_iter()
        .map(|svc| ObjectRef::new(&svc).within(ns))
        .collect()
}

/// Makes the Service's slices of ours equal to [`endpointslice::desired_slices`].
#[instrument(skip_all, fields(service = %service.name_any(), namespace = service.namespace().unwrap_or_default()))]
pub async fn reconcile(service: Arc<Service>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = reconcile_service(&service, &ctx).await;
    ctx.metrics.reconciled(started.elapsed());
    if result.is_ok() {
        ctx.failures
            .lock()
            .unwrap()
            .remove(&ObjectRef::from_obj(&*service));
    }
    result
}

async fn reconcile_service(service: &Service, ctx: &Context) -> Result<Action> {
    ctx.caches_ready().await?;
    let (ns, name) = endpointslice::namespace_and_name(&service.metadata)?;

    let slices = ctx
        .slices
        .state_filter(|s| endpointslice::is_slice_of(s, ns, name));
    let pod_addresses = endpointslice::pod_addresses(slices.iter().map(|s| &**s));
    let ours: Vec<&EndpointSlice> = slices
        .iter()
        .map(|s| &**s)
        .filter(|s| endpointslice::managed_by(s) == Some(names::MANAGED_BY))
        .collect();
    let guests = ctx
        .guests
        .state_filter(|g| g.metadata.namespace.as_deref() == Some(ns));
    let zone_of = |node: &str| ctx.zone_of(node);
    let desired = endpointslice::desired_slices(
        service,
        guests.iter().map(|g| &**g),
        &pod_addresses,
        &zone_of,
    )?;

    let api = ctx.slices_api(ns);
    let pp = PatchParams::apply(names::CONTROLLER_FIELD_MANAGER).force();
    let mut applied = 0;
    for slice in &desired {
        let slice_name = slice.metadata.name.as_deref().unwrap_or_default();
        let unchanged = ours.iter().any(|o| {
            o.metadata.name.as_deref() == Some(slice_name) && endpointslice::same_content(slice, o)
        });
        if unchanged {
            continue;
        }
        api.patch(slice_name, &pp, &Patch::Apply(slice)).await?;
        ctx.metrics.wrote("apply");
        applied += 1;
    }
    let mut deleted = 0;
    for stale in ours
        .iter()
        .filter(|o| !desired.iter().any(|d| d.metadata.name == o.metadata.name))
    {
        ctx.delete_slice(stale).await?;
        deleted += 1;
    }
    let endpoints: usize = desired.iter().map(|s| s.endpoints.len()).sum();
    if applied + deleted > 0 {
        info!(
            slices = desired.len(),
            endpoints, applied, deleted, "reconciled"
        );
    } else {
        debug!(slices = desired.len(), endpoints, "up to date");
    }
    Ok(Action::requeue(ctx.settings.resync))
}

/// Retries a failed Service with exponential backoff (1 s doubling to 5 min) and counts the
/// failure by its label.
pub fn error_policy(service: Arc<Service>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(error);
    let failures = {
        let mut map = ctx.failures.lock().unwrap();
        let n = map.entry(ObjectRef::from_obj(&*service)).or_insert(0);
        *n = n.saturating_add(1);
        *n
    };
    let delay = Duration::from_secs(1u64 << failures.saturating_sub(1).min(9))
        .min(Duration::from_secs(300));
    warn!(
        service = %service.name_any(),
        namespace = service.namespace().unwrap_or_default(),
        %error,
        failures,
        retry_in = ?delay,
        "reconcile failed"
    );
    Action::requeue(delay)
}

/// Deletes slices of ours whose Service is gone: at once for a Service deletion the watch saw,
/// and by a sweep of every slice at start and every resync period (deletions missed while this
/// replica was not leading). With a garbage collector in the cluster the owner reference does the
/// same; this does not depend on one.
async fn sweep_orphans(
    ctx: Arc<Context>,
    mut deleted: mpsc::UnboundedReceiver<ObjectRef<Service>>,
) {
    if ctx.caches_ready().await.is_err() {
        return;
    }
    let mut tick = tokio::time::interval(ctx.settings.resync);
    loop {
        let only: Option<ObjectRef<Service>> = tokio::select! {
            _ = tick.tick() => None,
            svc = deleted.recv() => match svc {
                Some(svc) => Some(svc),
                None => return,
            },
        };
        let orphans = ctx.slices.state_filter(|s| {
            if endpointslice::managed_by(s) != Some(names::MANAGED_BY) {
                return false;
            }
            let (Some(ns), Some(svc)) = (
                s.metadata.namespace.as_deref(),
                s.labels().get(labels::SERVICE_NAME),
            ) else {
                return false;
            };
            let this = ObjectRef::<Service>::new(svc).within(ns);
            only.as_ref().is_none_or(|o| *o == this) && ctx.services.get(&this).is_none()
        });
        for slice in orphans {
            if let Err(e) = ctx.delete_slice(&slice).await {
                warn!(error = %e, slice = %slice.name_any(), "deleting an orphaned EndpointSlice");
            }
        }
    }
}

/// Checks that the Guest CRD is installed (a list of one Guest works).
pub async fn check_crd(client: &Client) -> Result<()> {
    match Api::<Guest>::all(client.clone())
        .list_metadata(&ListParams::default().limit(1))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_status(&e, 404) => Err(Error::CrdMissing),
        Err(e) => Err(e.into()),
    }
}

/// Runs the controller until the future is dropped (leadership lost, shutdown) or a watch cache
/// closes.
pub async fn run(client: Client, metrics: Arc<Metrics>, settings: Settings) -> Result<()> {
    let (svc_reader, svc_writer) = reflector::store::<Service>();
    let (guest_reader, guest_writer) = reflector::store::<Guest>();
    let (slice_reader, slice_writer) = reflector::store::<EndpointSlice>();
    let (deleted_tx, deleted_rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = watch::channel(0u8);

    let services = watcher(
        Api::<Service>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(svc_writer)
    .inspect(mark_ready(&ready_tx, cache::SERVICES))
    .inspect(move |ev| {
        if let Ok(watcher::Event::Delete(svc)) = ev {
            let _ = deleted_tx.send(ObjectRef::from_obj(svc));
        }
    })
    .applied_objects();
    let guests = watcher(
        Api::<Guest>::all(client.clone()),
        watcher::Config::default(),
    )
    .default_backoff()
    .reflect(guest_writer)
    .inspect(mark_ready(&ready_tx, cache::GUESTS))
    .touched_objects();
    let slices = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        watcher::Config::default().labels(labels::SERVICE_NAME),
    )
    .default_backoff()
    .reflect(slice_writer)
    .inspect(mark_ready(&ready_tx, cache::SLICES))
    .touched_objects();

    // Zones are optional: a controller that may not read Nodes writes endpoints without them.
    let mut needed = cache::SERVICES | cache::GUESTS | cache::SLICES;
    let (nodes, node_stream) = match Api::<Node>::all(client.clone())
        .list_metadata(&ListParams::default().limit(1))
        .await
    {
        Ok(_) => {
            let (reader, writer) = reflector::store();
            let stream = watcher(
                Api::<PartialObjectMeta<Node>>::all(client.clone()),
                watcher::Config::default(),
            )
            .default_backoff()
            .reflect(writer)
            .inspect(mark_ready(&ready_tx, cache::NODES))
            .for_each(|_| future::ready(()));
            needed |= cache::NODES;
            (Some(reader), Some(stream))
        }
        Err(e) => {
            warn!(error = %e, "cannot read Nodes: endpoints get no zone");
            (None, None)
        }
    };

    let ctx = Arc::new(Context {
        client,
        services: svc_reader.clone(),
        guests: guest_reader,
        slices: slice_reader.clone(),
        nodes,
        metrics,
        settings: settings.clone(),
        failures: Mutex::default(),
        ready: ready_rx,
        needed,
    });
    let mapper = {
        let services = svc_reader.clone();
        let slices = slice_reader;
        move |guest: Guest| services_for_guest(&guest, &services, &slices)
    };
    let controller = Controller::for_stream(services, svc_reader)
        .owns_stream(slices)
        .watches_stream(guests, mapper)
        .with_config(controller::Config::default().concurrency(settings.concurrency))
        .run(reconcile, error_policy, ctx.clone())
        .for_each(|res| {
            match res {
                Ok(_) => {}
                // A Service deleted between trigger and reconcile: nothing to do.
                Err(controller::Error::ObjectNotFound(obj)) => debug!(%obj, "object gone"),
                Err(controller::Error::ReconcilerFailed(..)) => {} // error_policy logged it
                Err(e) => warn!(error = %e, "controller"),
            }
            future::ready(())
        });

    info!("controller running");
    let nodes = async {
        match node_stream {
            Some(s) => s.await,
            None => future::pending().await,
        }
    };
    tokio::select! {
        _ = controller => {}
        _ = sweep_orphans(ctx.clone(), deleted_rx).instrument(info_span!("sweep")) => {}
        _ = nodes => {}
    }
    Err(Error::CacheClosed)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use k8s_openapi::{
        api::{
            core::v1::{ObjectReference, ServiceSpec},
            discovery::v1::Endpoint,
        },
        apimachinery::pkg::apis::meta::v1::ObjectMeta,
    };
    use kube::runtime::watcher::Event;
    use tapestry_k8s::GuestSpec;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Option<BTreeMap<String, String>> {
        Some(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    fn service(ns: &str, name: &str, app: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                name: Some(name.into()),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                selector: labels(&[("app", app)]),
                ..Default::default()
            }),
            status: None,
        }
    }

    fn our_slice(service: &str, guest: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("{service}-tapestry-0000000000")),
                namespace: Some("default".into()),
                labels: labels(&[
                    (labels::SERVICE_NAME, service),
                    (labels::MANAGED_BY, names::MANAGED_BY),
                ]),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: vec![Endpoint {
                addresses: vec!["10.0.0.1".into()],
                target_ref: Some(ObjectReference {
                    kind: Some("Guest".into()),
                    name: Some(guest.into()),
                    namespace: Some("default".into()),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            ports: None,
        }
    }

    fn store<K>(objects: Vec<K>) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        let (reader, mut writer) = reflector::store();
        writer.apply_watcher_event(&Event::Init);
        for o in objects {
            writer.apply_watcher_event(&Event::InitApply(o));
        }
        writer.apply_watcher_event(&Event::InitDone);
        reader
    }

    #[test]
    fn a_guest_maps_to_the_services_that_select_it_or_still_list_it() {
        let services = store(vec![
            service("default", "web", "web"),
            service("default", "db", "db"),
            service("default", "old", "old"),
            service("other", "web", "web"),
        ]);
        // vm-1 was app=old: the old Service's slice still lists it.
        let slices = store(vec![our_slice("old", "vm-1"), our_slice("db", "vm-2")]);
        let mut guest = Guest::new(
            "vm-1",
            GuestSpec {
                node_name: "n".into(),
                pod_ref: None,
                ips: vec!["10.0.0.1".into()],
                mac: "52:54:00:00:00:01".into(),
                tap: "tap0".into(),
                ports: vec![],
            },
        );
        guest.metadata.namespace = Some("default".into());
        guest.metadata.labels = labels(&[("app", "web")]);
        let refs = services_for_guest(&guest, &services, &slices);
        let names: Vec<String> = refs
            .iter()
            .map(|r| format!("{}/{}", r.namespace.as_deref().unwrap_or(""), r.name))
            .collect();
        assert_eq!(names, ["default/old", "default/web"]);
    }
}
