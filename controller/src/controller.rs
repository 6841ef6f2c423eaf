//! The controller: one kube-runtime `Controller` over Services, triggered by its own slices and
//! the built-in controller's (both owned by the Service) and by Guests (mapped to the Services
//! that select them, or that still list them). The reconciler reads the same reflector stores the
//! triggers fill, so there is one watch per kind.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use futures::{StreamExt, future};
use k8s_openapi::api::{
    core::v1::{Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, ResourceExt,
    api::{ListParams, PartialObjectMeta, Patch, PatchParams, WatchEvent, WatchParams},
    runtime::{
        Controller, WatchStreamExt,
        controller::{self, Action},
        events::{Event as KubeEvent, EventType, Recorder, Reporter},
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};
use tapestry_k8s::{
    Guest, delete_unless_replaced,
    names::{self, annotations, labels},
};
use tokio::sync::{mpsc, watch};
use tracing::{Instrument, debug, info, info_span, instrument, warn};

use crate::{
    endpointslice,
    error::{Error, Result, is_status},
    index::{Index, label_key, name_key},
    metrics::Metrics,
    trust::{self, Refusal},
};

/// Tunables of [`run`].
#[derive(Debug, Clone)]
pub struct Settings {
    /// Every Service is reconciled again this often, and stale slices are swept, whatever the
    /// watches said (a safety net: zone changes, for one, trigger nothing).
    pub resync: Duration,
    /// Services reconciled at once.
    pub concurrency: u16,
    /// This replica's name, as the reporting instance of its Events.
    pub instance: Option<String>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            resync: Duration::from_secs(300),
            concurrency: 4,
            instance: None,
        }
    }
}

/// The watch caches, each with the index that finds its objects without a scan.
#[derive(Clone)]
pub struct Caches {
    pub services: Store<Service>,
    /// Services by the label pairs of their selectors ([`service_keys`]).
    pub services_by_selector: Index<Service>,
    pub guests: Store<Guest>,
    /// Guests by their label pairs ([`guest_keys`]).
    pub guests_by_label: Index<Guest>,
    /// Every EndpointSlice with a service-name label: ours and the built-in controller's.
    pub slices: Store<EndpointSlice>,
    /// Slices by their Service, and ours by the Guests they list ([`slice_keys`]).
    pub slices_by_owner: Index<EndpointSlice>,
    /// Pods, slimmed to what [`trust::check`] reads.
    pub pods: Store<Pod>,
    /// Guests by the pods they claim ([`guest_pod_keys`]).
    pub guests_by_pod: Index<Guest>,
}

/// A Service's index keys: the pairs of its selector, when it has endpoints of ours.
pub fn service_keys(service: &Service) -> Vec<String> {
    let ns = service.metadata.namespace.as_deref().unwrap_or_default();
    endpointslice::service_selector(service)
        .into_iter()
        .flatten()
        .map(|(k, v)| label_key(ns, k, v))
        .collect()
}

/// A Guest's index keys: its label pairs.
pub fn guest_keys(guest: &Guest) -> Vec<String> {
    let ns = guest.metadata.namespace.as_deref().unwrap_or_default();
    guest
        .labels()
        .iter()
        .map(|(k, v)| label_key(ns, k, v))
        .collect()
}

/// A Guest's pod index keys: every pod it names (owner references of kind Pod, `spec.podRef`),
/// so that a pod's change reaches the Guest whichever name [`trust::check`] finds wrong.
pub fn guest_pod_keys(guest: &Guest) -> Vec<String> {
    let ns = guest.metadata.namespace.as_deref().unwrap_or_default();
    guest
        .owner_references()
        .iter()
        .filter(|o| o.kind == "Pod")
        .map(|o| o.name.as_str())
        .chain(guest.spec.pod_ref.as_ref().map(|r| r.name.as_str()))
        .map(|pod| name_key(ns, pod))
        .collect()
}

fn slice_service_key(namespace: &str, service: &str) -> String {
    format!("service\0{}", name_key(namespace, service))
}

fn slice_guest_key(namespace: &str, guest: &str) -> String {
    format!("guest\0{}", name_key(namespace, guest))
}

/// The Guests an endpoint of `slice` points to.
fn listed_guests(slice: &EndpointSlice) -> impl Iterator<Item = &str> {
    slice.endpoints.iter().filter_map(|e| {
        let r = e.target_ref.as_ref()?;
        (r.kind.as_deref() == Some(names::GUEST_KIND))
            .then_some(r.name.as_deref())
            .flatten()
    })
}

/// A slice's index keys: its Service, and for ours every Guest it lists.
pub fn slice_keys(slice: &EndpointSlice) -> Vec<String> {
    let ns = slice.metadata.namespace.as_deref().unwrap_or_default();
    let mut keys = BTreeSet::new();
    if let Some(svc) = slice.labels().get(labels::SERVICE_NAME) {
        keys.insert(slice_service_key(ns, svc));
    }
    if endpointslice::managed_by(slice) == Some(names::MANAGED_BY) {
        keys.extend(listed_guests(slice).map(|g| slice_guest_key(ns, g)));
    }
    keys.into_iter().collect()
}

impl Caches {
    /// Empty caches with their indexes; the writers fill the stores, [`Index::feeder`] the
    /// indexes.
    pub fn new(
        services: Store<Service>,
        guests: Store<Guest>,
        slices: Store<EndpointSlice>,
        pods: Store<Pod>,
    ) -> Caches {
        Caches {
            services,
            services_by_selector: Index::new(service_keys),
            guests,
            guests_by_label: Index::new(guest_keys),
            slices,
            slices_by_owner: Index::new(slice_keys),
            pods,
            guests_by_pod: Index::new(guest_pod_keys),
        }
    }

    /// The Guests that claim pod `namespace/name`.
    pub fn guests_of_pod(&self, namespace: &str, name: &str) -> Vec<Arc<Guest>> {
        self.guests_by_pod
            .get(&name_key(namespace, name))
            .into_iter()
            .filter_map(|n| self.guests.get(&ObjectRef::new(&n.1).within(&n.0)))
            .filter(|g| g.metadata.namespace.as_deref() == Some(namespace))
            .collect()
    }

    /// Every slice of Service `namespace/name` (with its service-name label).
    pub fn slices_of(&self, namespace: &str, name: &str) -> Vec<Arc<EndpointSlice>> {
        self.slices_by_owner
            .get(&slice_service_key(namespace, name))
            .into_iter()
            .filter_map(|n| self.slices.get(&ObjectRef::new(&n.1).within(&n.0)))
            .filter(|s| endpointslice::is_slice_of(s, namespace, name))
            .collect()
    }

    /// The Guests in `namespace` that `selector` selects.
    pub fn guests_selected(
        &self,
        namespace: &str,
        selector: &BTreeMap<String, String>,
    ) -> Vec<Arc<Guest>> {
        let keys: Vec<String> = selector
            .iter()
            .map(|(k, v)| label_key(namespace, k, v))
            .collect();
        self.guests_by_label
            .smallest(&keys)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|n| self.guests.get(&ObjectRef::new(&n.1).within(&n.0)))
            .filter(|g| {
                g.metadata.namespace.as_deref() == Some(namespace)
                    && endpointslice::selects(selector, g.labels())
            })
            .collect()
    }
}

/// What the reconciler reads and writes with.
pub struct Context {
    client: Client,
    caches: Caches,
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
    /// The first pass over every Service, for `tapestry_controller_initial_sync_seconds`.
    initial_sync: Mutex<InitialSync>,
    /// Guests not published and why, so that each refusal (and its end) is told once.
    refused: Arc<Mutex<HashMap<ObjectRef<Guest>, Refusal>>>,
    /// Events on Guests.
    recorder: Recorder,
}

/// Progress of the first reconcile of every Service that existed when the caches filled.
enum InitialSync {
    /// The caches are not full yet.
    Waiting {
        started: Instant,
    },
    Pending {
        started: Instant,
        services: HashSet<ObjectRef<Service>>,
    },
    Done,
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
    pub const PODS: u8 = 16;
}

/// Drops what no reconcile reads before an object is cached, so that 50,000 Guests fit in
/// little memory: managed fields and annotations (`kubectl.kubernetes.io/last-applied-configuration`
/// alone is a copy of the object), and the bookkeeping fields. The watcher has read each event's
/// resourceVersion before this runs. Owner references stay: they map our slices to their Service.
fn slim<K: kube::Resource>(obj: &mut K) {
    let meta = obj.meta_mut();
    meta.managed_fields = None;
    meta.annotations = None;
    meta.resource_version = None;
    meta.creation_timestamp = None;
    meta.generation = None;
}

/// [`slim`], and the Guest's fields that no endpoint is made from: MAC, tap, and its
/// conditions' reasons, messages and times (their type and status make readiness). The pod
/// reference and the registrar annotation stay: [`trust::check`] reads them.
fn slim_guest(guest: &mut Guest) {
    let registrar = guest.annotations().get(annotations::REGISTERED_BY).cloned();
    slim(guest);
    if let Some(r) = registrar {
        guest
            .annotations_mut()
            .insert(annotations::REGISTERED_BY.into(), r);
    }
    guest.spec.mac = String::new();
    guest.spec.tap = String::new();
    for c in guest
        .status
        .iter_mut()
        .flat_map(|s| s.conditions.iter_mut())
    {
        c.reason = None;
        c.message = None;
        c.last_transition_time = None;
    }
}

/// [`slim`], and the Service's status (load balancer ingress), which no slice is made from.
fn slim_service(service: &mut Service) {
    slim(service);
    service.status = None;
}

/// Sets `bit` in `ready` when a watch stream finishes a (re)list, and logs how long the first
/// list took and what it held (`what`: the kind, for the log).
fn mark_ready<K>(
    ready: &watch::Sender<u8>,
    bit: u8,
    what: &'static str,
) -> impl FnMut(&std::result::Result<watcher::Event<K>, watcher::Error>) + use<K> {
    let ready = ready.clone();
    let started = Instant::now();
    let mut listed = 0usize;
    move |ev| match ev {
        Ok(watcher::Event::Init) => listed = 0,
        Ok(watcher::Event::InitApply(_)) => listed += 1,
        Ok(watcher::Event::InitDone) => {
            let first = ready.send_if_modified(|b| {
                let was = *b;
                *b |= bit;
                was != *b
            });
            if first {
                info!(cache = what, objects = listed, took = ?started.elapsed(), "listed");
            }
        }
        _ => {}
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
            .map_err(|_| Error::CacheClosed)?;
        // The first caller past this point (before any reconcile goes on) notes every Service.
        let mut sync = self.initial_sync.lock().unwrap();
        if let InitialSync::Waiting { started } = *sync {
            let services: HashSet<_> = self
                .caches
                .services
                .state()
                .iter()
                .map(|s| ObjectRef::from_obj(&**s))
                .collect();
            info!(
                services = services.len(),
                guests = self.caches.guests.len(),
                slices = self.caches.slices.len(),
                took = ?started.elapsed(),
                "caches filled"
            );
            *sync = InitialSync::Pending { started, services };
        }
        Ok(())
    }

    /// Notes `service` reconciled (or, with `None`, Services deleted before their turn) and
    /// reports the first full pass once every Service had one.
    fn initial_sync_progress(&self, service: Option<&ObjectRef<Service>>) {
        let mut sync = self.initial_sync.lock().unwrap();
        let InitialSync::Pending { started, services } = &mut *sync else {
            return;
        };
        match service {
            Some(s) => {
                services.remove(s);
            }
            None => services.retain(|s| self.caches.services.get(s).is_some()),
        }
        if services.is_empty() {
            let took = started.elapsed();
            self.metrics.initial_sync_seconds.set(took.as_secs_f64());
            info!(
                took = ?took,
                services = self.caches.services.len(),
                "every Service reconciled"
            );
            *sync = InitialSync::Done;
        }
    }

    /// Whether `guest` may be published ([`trust::check`] against the Pod cache). A refusal,
    /// and a Guest published again after one, is logged, counted and recorded as an Event on
    /// the Guest, once per change (a Guest several Services select is checked by each).
    async fn trusted(&self, guest: &Guest) -> bool {
        let ns = guest.metadata.namespace.clone().unwrap_or_default();
        let verdict = trust::check(guest, |pod| {
            self.caches.pods.get(&ObjectRef::new(pod).within(&ns))
        });
        let key = ObjectRef::from_obj(guest);
        let changed = {
            let mut refused = self.refused.lock().unwrap();
            let changed = match &verdict {
                Err(r) => refused.insert(key, r.clone()).as_ref() != Some(r),
                Ok(()) => refused.remove(&key).is_some(),
            };
            self.metrics.guests_refused.set(refused.len() as i64);
            changed
        };
        if !changed {
            return verdict.is_ok();
        }
        let name = guest.name_any();
        let event = match &verdict {
            Err(r) => {
                self.metrics.not_published(r.label());
                warn!(guest = %name, namespace = %ns, reason = r.label(), "not published: {r}");
                KubeEvent {
                    type_: EventType::Warning,
                    reason: names::GUEST_NOT_PUBLISHED.into(),
                    note: Some(format!("not published in any EndpointSlice: {r}")),
                    action: r.action().into(),
                    secondary: None,
                }
            }
            Ok(()) => {
                info!(guest = %name, namespace = %ns, "published again: what backs it agrees");
                KubeEvent {
                    type_: EventType::Normal,
                    reason: names::GUEST_PUBLISHED.into(),
                    note: Some("published: what backs it agrees with it".into()),
                    action: "Publish".into(),
                    secondary: None,
                }
            }
        };
        if let Err(e) = self
            .recorder
            .publish(&event, &kube::Resource::object_ref(guest, &()))
            .await
        {
            warn!(guest = %name, namespace = %ns, error = %e, "recording an Event");
        }
        verdict.is_ok()
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
        let deleted =
            delete_unless_replaced(&self.slices_api(ns), name, slice.metadata.uid.as_deref())
                .await?;
        if deleted {
            self.metrics.wrote("delete");
            info!(slice = name, namespace = ns, "deleted EndpointSlice");
        }
        Ok(())
    }
}

/// Services that should be reconciled when `guest` changed: those in its namespace whose
/// selector matches its labels now, and those whose slices of ours still list it (its labels
/// changed, or it is gone).
pub fn services_for_guest(guest: &Guest, caches: &Caches) -> Vec<ObjectRef<Service>> {
    let Some(ns) = guest.metadata.namespace.as_deref() else {
        return Vec::new();
    };
    let name = guest.name_any();
    let mut out = BTreeSet::new();
    for svc in caches.services_by_selector.union(&guest_keys(guest)) {
        let Some(service) = caches.services.get(&ObjectRef::new(&svc.1).within(&svc.0)) else {
            continue;
        };
        if service.metadata.namespace.as_deref() == Some(ns)
            && endpointslice::service_selector(&service)
                .is_some_and(|sel| endpointslice::selects(sel, guest.labels()))
        {
            out.insert(svc.1.clone());
        }
    }
    for slice in caches.slices_by_owner.get(&slice_guest_key(ns, &name)) {
        let Some(slice) = caches
            .slices
            .get(&ObjectRef::new(&slice.1).within(&slice.0))
        else {
            continue;
        };
        if slice.metadata.namespace.as_deref() == Some(ns)
            && endpointslice::managed_by(&slice) == Some(names::MANAGED_BY)
            && listed_guests(&slice).any(|g| g == name)
            && let Some(svc) = slice.labels().get(labels::SERVICE_NAME)
        {
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
        let key = ObjectRef::from_obj(&*service);
        ctx.failures.lock().unwrap().remove(&key);
        ctx.initial_sync_progress(Some(&key));
    }
    result
}

async fn reconcile_service(service: &Service, ctx: &Context) -> Result<Action> {
    ctx.caches_ready().await?;
    let (ns, name) = endpointslice::namespace_and_name(&service.metadata)?;

    let slices = ctx.caches.slices_of(ns, name);
    let pod_addresses = endpointslice::pod_addresses(slices.iter().map(|s| &**s));
    let ours: Vec<&EndpointSlice> = slices
        .iter()
        .map(|s| &**s)
        .filter(|s| endpointslice::managed_by(s) == Some(names::MANAGED_BY))
        .collect();
    let selected = endpointslice::service_selector(service)
        .map(|sel| ctx.caches.guests_selected(ns, sel))
        .unwrap_or_default();
    let mut guests = Vec::with_capacity(selected.len());
    for guest in selected {
        if ctx.trusted(&guest).await {
            guests.push(guest);
        }
    }
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
        let is_orphan = |s: &EndpointSlice| {
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
            ctx.caches.services.get(&this).is_none()
        };
        let orphans: Vec<Arc<EndpointSlice>> = match &only {
            // A deleted Service: its own slices only, from the index.
            Some(svc) => ctx
                .caches
                .slices_of(svc.namespace.as_deref().unwrap_or_default(), &svc.name)
                .into_iter()
                .filter(|s| is_orphan(s))
                .collect(),
            None => ctx.caches.slices.state_filter(is_orphan),
        };
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

/// Whether the API server serves streaming lists (the WatchList feature, on by default from
/// Kubernetes 1.34): a watch of Guests asking for its initial events, on a label no object has,
/// answers with the end-of-initial-events bookmark. A server without it refuses the request.
///
/// Streaming lists fill the caches from the API server's watch cache as one stream, decoded while
/// it is sent; paged lists wait for each page, and their continuations may go to etcd. At 50,000
/// Guests the first took 4 s where the second took 21 (bench/results/controller.md).
pub async fn streaming_lists_supported(client: &Client) -> bool {
    let probe = async {
        let wp = WatchParams::default()
            .labels("tapestry.dev/streaming-list-probe=none")
            .timeout(10)
            .initial_events();
        let mut events = Api::<Guest>::all(client.clone())
            .watch(&wp, "0")
            .await?
            .boxed();
        Ok::<_, kube::Error>(matches!(
            events.next().await,
            Some(Ok(WatchEvent::Bookmark(_)))
        ))
    };
    match tokio::time::timeout(Duration::from_secs(15), probe).await {
        Ok(Ok(true)) => true,
        Ok(Ok(false)) | Err(_) => {
            info!("the API server sent no initial-events bookmark: paged lists");
            false
        }
        Ok(Err(e)) => {
            info!(error = %e, "the API server refuses streaming lists: paged lists");
            false
        }
    }
}

/// Runs the controller until the future is dropped (leadership lost, shutdown) or a watch cache
/// closes.
pub async fn run(client: Client, metrics: Arc<Metrics>, settings: Settings) -> Result<()> {
    let (svc_reader, svc_writer) = reflector::store::<Service>();
    let (guest_reader, guest_writer) = reflector::store::<Guest>();
    let (slice_reader, slice_writer) = reflector::store::<EndpointSlice>();
    let (pod_reader, pod_writer) = reflector::store::<Pod>();
    let caches = Caches::new(svc_reader.clone(), guest_reader, slice_reader, pod_reader);
    let refused: Arc<Mutex<HashMap<ObjectRef<Guest>, Refusal>>> = Arc::default();
    let (deleted_tx, deleted_rx) = mpsc::unbounded_channel();
    let (ready_tx, ready_rx) = watch::channel(0u8);

    let streaming = streaming_lists_supported(&client).await;
    let config = move || {
        let c = watcher::Config::default();
        if streaming { c.streaming_lists() } else { c }
    };

    // Each stream: the cache, then its index, then the ready bit (so that a full cache has a
    // full index).
    let services = watcher(Api::<Service>::all(client.clone()), config())
        .default_backoff()
        .modify(slim_service)
        .reflect(svc_writer)
        .inspect(caches.services_by_selector.feeder())
        .inspect(mark_ready(&ready_tx, cache::SERVICES, "services"))
        .inspect(move |ev| {
            if let Ok(watcher::Event::Delete(svc)) = ev {
                let _ = deleted_tx.send(ObjectRef::from_obj(svc));
            }
        })
        .applied_objects();
    let guests = watcher(Api::<Guest>::all(client.clone()), config())
        .default_backoff()
        .modify(slim_guest)
        .reflect(guest_writer)
        .inspect(caches.guests_by_label.feeder())
        .inspect(caches.guests_by_pod.feeder())
        .inspect(mark_ready(&ready_tx, cache::GUESTS, "guests"))
        .inspect({
            let refused = refused.clone();
            move |ev| {
                if let Ok(watcher::Event::Delete(g)) = ev {
                    refused.lock().unwrap().remove(&ObjectRef::from_obj(g));
                }
            }
        })
        .touched_objects();
    // Pods: what backs a pod's Guest (trust.rs). A pod's change reaches its Guests' Services.
    let pods = watcher(Api::<Pod>::all(client.clone()), config())
        .default_backoff()
        .modify(trust::slim_pod)
        .reflect(pod_writer)
        .inspect(mark_ready(&ready_tx, cache::PODS, "pods"))
        .touched_objects();
    let slices = watcher(
        Api::<EndpointSlice>::all(client.clone()),
        config().labels(labels::SERVICE_NAME),
    )
    .default_backoff()
    .modify(slim)
    .reflect(slice_writer)
    .inspect(caches.slices_by_owner.feeder())
    .inspect(mark_ready(&ready_tx, cache::SLICES, "endpointslices"))
    .touched_objects();

    // Zones are optional: a controller that may not read Nodes writes endpoints without them.
    let mut needed = cache::SERVICES | cache::GUESTS | cache::SLICES | cache::PODS;
    let (nodes, node_stream) = match Api::<Node>::all(client.clone())
        .list_metadata(&ListParams::default().limit(1))
        .await
    {
        Ok(_) => {
            let (reader, writer) = reflector::store();
            let stream = watcher(
                Api::<PartialObjectMeta<Node>>::all(client.clone()),
                config(),
            )
            .default_backoff()
            .modify(slim)
            .reflect(writer)
            .inspect(mark_ready(&ready_tx, cache::NODES, "nodes"))
            .for_each(|_| future::ready(()));
            needed |= cache::NODES;
            (Some(reader), Some(stream))
        }
        Err(e) => {
            warn!(error = %e, "cannot read Nodes: endpoints get no zone");
            (None, None)
        }
    };

    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: names::CONTROLLER.into(),
            instance: settings.instance.clone(),
        },
    );
    let ctx = Arc::new(Context {
        refused,
        recorder,
        client,
        caches: caches.clone(),
        nodes,
        metrics,
        settings: settings.clone(),
        failures: Mutex::default(),
        ready: ready_rx,
        needed,
        initial_sync: Mutex::new(InitialSync::Waiting {
            started: Instant::now(),
        }),
    });
    let pod_caches = caches.clone();
    let mapper = move |guest: Guest| services_for_guest(&guest, &caches);
    let pod_mapper = move |pod: Pod| {
        let ns = pod.metadata.namespace.as_deref().unwrap_or_default();
        let mut out = HashSet::new();
        for guest in pod_caches.guests_of_pod(ns, &pod.name_any()) {
            out.extend(services_for_guest(&guest, &pod_caches));
        }
        out
    };
    let controller = Controller::for_stream(services, svc_reader)
        .owns_stream(slices)
        .watches_stream(guests, mapper)
        .watches_stream(pods, pod_mapper)
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

    info!(streaming_lists = streaming, "controller running");
    let nodes = async {
        match node_stream {
            Some(s) => s.await,
            None => future::pending().await,
        }
    };
    let initial_sync = {
        let ctx = ctx.clone();
        async move {
            // Services deleted before their first reconcile would hold the first pass open.
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                ctx.initial_sync_progress(None);
                if matches!(*ctx.initial_sync.lock().unwrap(), InitialSync::Done) {
                    return future::pending::<()>().await;
                }
            }
        }
    };
    tokio::select! {
        _ = controller => {}
        _ = sweep_orphans(ctx.clone(), deleted_rx).instrument(info_span!("sweep")) => {}
        _ = nodes => {}
        _ = initial_sync => {}
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

    /// A store and its index, filled with `objects` as a watch's first list fills them.
    fn store<K>(objects: Vec<K>, index: Option<&Index<K>>) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()> + Clone + 'static,
    {
        let (reader, mut writer) = reflector::store();
        let mut events = vec![Event::Init];
        events.extend(objects.into_iter().map(Event::InitApply));
        events.push(Event::InitDone);
        for ev in &events {
            writer.apply_watcher_event(ev);
            if let Some(index) = index {
                index.apply_watcher_event(ev);
            }
        }
        reader
    }

    fn caches(services: Vec<Service>, guests: Vec<Guest>, slices: Vec<EndpointSlice>) -> Caches {
        let empty = Caches::new(
            store(vec![], None),
            store(vec![], None),
            store(vec![], None),
            store(vec![], None),
        );
        Caches {
            services: store(services, Some(&empty.services_by_selector)),
            guests: store(guests, Some(&empty.guests_by_label)),
            slices: store(slices, Some(&empty.slices_by_owner)),
            ..empty
        }
    }

    fn guest(name: &str, app: &str) -> Guest {
        let mut guest = Guest::new(
            name,
            GuestSpec {
                node_name: "n".into(),
                pod_ref: None,
                ips: vec!["10.0.0.1".into()],
                mac: "52:54:00:00:00:01".into(),
                tap: "tap0".into(),
                ports: vec![],
                readiness_probe: None,
            },
        );
        guest.metadata.namespace = Some("default".into());
        guest.metadata.labels = labels(&[("app", app)]);
        guest
    }

    #[test]
    fn a_guest_maps_to_the_services_that_select_it_or_still_list_it() {
        let guest = guest("vm-1", "web");
        let caches = caches(
            vec![
                service("default", "web", "web"),
                service("default", "db", "db"),
                service("default", "old", "old"),
                service("other", "web", "web"),
            ],
            vec![guest.clone()],
            // vm-1 was app=old: the old Service's slice still lists it.
            vec![our_slice("old", "vm-1"), our_slice("db", "vm-2")],
        );
        let refs = services_for_guest(&guest, &caches);
        let names: Vec<String> = refs
            .iter()
            .map(|r| format!("{}/{}", r.namespace.as_deref().unwrap_or(""), r.name))
            .collect();
        assert_eq!(names, ["default/old", "default/web"]);
    }

    #[test]
    fn a_service_finds_its_guests_and_slices_through_the_indexes() {
        let mut two = guest("vm-2", "web");
        two.metadata.labels = labels(&[("app", "web"), ("tier", "a")]);
        let mut elsewhere = guest("vm-9", "web");
        elsewhere.metadata.namespace = Some("other".into());
        let caches = caches(
            vec![service("default", "web", "web")],
            vec![guest("vm-1", "web"), two, guest("vm-3", "db"), elsewhere],
            vec![our_slice("web", "vm-1"), our_slice("db", "vm-3")],
        );
        let selected = |ns: &str, sel: &[(&str, &str)]| -> Vec<String> {
            let mut v: Vec<String> = caches
                .guests_selected(ns, &labels(sel).unwrap())
                .iter()
                .map(|g| g.name_any())
                .collect();
            v.sort();
            v
        };
        assert_eq!(selected("default", &[("app", "web")]), ["vm-1", "vm-2"]);
        assert_eq!(
            selected("default", &[("app", "web"), ("tier", "a")]),
            ["vm-2"]
        );
        assert!(selected("default", &[("app", "web"), ("tier", "b")]).is_empty());
        assert_eq!(selected("other", &[("app", "web")]), ["vm-9"]);
        let slices = caches.slices_of("default", "web");
        assert_eq!(slices.len(), 1);
        assert_eq!(slices[0].name_any(), "web-tapestry-0000000000");
        assert!(caches.slices_of("other", "web").is_empty());
    }

    #[test]
    fn slimming_changes_no_slice() {
        use k8s_openapi::{
            api::core::v1::ServicePort, apimachinery::pkg::util::intstr::IntOrString,
        };
        use tapestry_k8s::{
            ConditionStatus, GuestCondition, GuestConditionType, GuestPodRef, GuestPort,
            GuestStatus, Protocol,
        };
        let mut svc = service("default", "web", "web");
        svc.metadata.uid = Some("svc-uid".into());
        svc.metadata.resource_version = Some("12".into());
        svc.spec.as_mut().unwrap().ports = Some(vec![ServicePort {
            port: 80,
            target_port: Some(IntOrString::String("http".into())),
            ..Default::default()
        }]);
        let mut g = guest("vm-1", "web");
        g.metadata.uid = Some("guest-uid".into());
        g.metadata.resource_version = Some("7".into());
        g.spec.pod_ref = Some(GuestPodRef {
            name: "vm-1".into(),
            uid: Some("pod-uid".into()),
        });
        g.spec.ports = vec![GuestPort {
            name: "http".into(),
            port: 8080,
            protocol: Protocol::Tcp,
        }];
        g.status = Some(GuestStatus {
            conditions: vec![GuestCondition {
                type_: GuestConditionType::Ready,
                status: ConditionStatus::True,
                reason: Some("DhcpBound".into()),
                message: Some("bound 10.0.0.1".into()),
                last_transition_time: None,
            }],
            observed_generation: Some(1),
            migration: None,
        });
        let zone = |_: &str| Some("zone-a".to_string());
        let none = std::collections::HashSet::new();
        let before = endpointslice::desired_slices(&svc, [&g], &none, &zone).unwrap();
        let (mut slim_svc, mut slim_g) = (svc.clone(), g.clone());
        slim_service(&mut slim_svc);
        slim_guest(&mut slim_g);
        assert_eq!(slim_g.spec.mac, "");
        assert_eq!(slim_g.metadata.resource_version, None);
        let after = endpointslice::desired_slices(&slim_svc, [&slim_g], &none, &zone).unwrap();
        assert_eq!(before, after);
        let e = &after[0].endpoints[0];
        assert_eq!(e.conditions.as_ref().unwrap().ready, Some(true));
        assert_eq!(
            e.target_ref.as_ref().unwrap().uid.as_deref(),
            Some("guest-uid")
        );
        assert_eq!(after[0].ports.as_ref().unwrap()[0].port, Some(8080));
    }
}
