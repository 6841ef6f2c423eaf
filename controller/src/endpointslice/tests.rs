use std::collections::{BTreeMap, HashSet};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointSlice},
    },
    apimachinery::pkg::{
        apis::meta::v1::{ObjectMeta, Time},
        util::intstr::IntOrString,
    },
    jiff::Timestamp,
};
use tapestry_k8s::{
    ConditionStatus, Guest, GuestCondition, GuestConditionType, GuestPort, GuestSpec, GuestStatus,
    Protocol,
};

use super::*;

const NS: &str = "default";

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn port(name: &str, port: i32, target: IntOrString) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port,
        target_port: Some(target),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

fn service(name: &str, selector: &[(&str, &str)], ports: Vec<ServicePort>) -> Service {
    Service {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            uid: Some(format!("uid-{name}")),
            labels: Some(labels(&[("team", "a")])),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            selector: Some(labels(selector)),
            ports: Some(ports),
            cluster_ip: Some("10.96.0.10".into()),
            cluster_ips: Some(vec!["10.96.0.10".into()]),
            ip_families: Some(vec!["IPv4".into()]),
            type_: Some("ClusterIP".into()),
            ..Default::default()
        }),
        status: None,
    }
}

fn web() -> Service {
    service(
        "web",
        &[("app", "web")],
        vec![port("http", 80, IntOrString::Int(8080))],
    )
}

fn guest(name: &str, ips: &[&str], ready: bool) -> Guest {
    let mut g = Guest::new(
        name,
        GuestSpec {
            node_name: "node-a".into(),
            pod_ref: None,
            ips: ips.iter().map(|s| s.to_string()).collect(),
            mac: "52:54:00:00:00:01".into(),
            tap: "tap0".into(),
            ports: vec![],
            readiness_probe: None,
        },
    );
    g.metadata.namespace = Some(NS.into());
    g.metadata.uid = Some(format!("uid-{name}"));
    g.metadata.labels = Some(labels(&[("app", "web")]));
    g.status = Some(GuestStatus {
        conditions: vec![GuestCondition {
            type_: GuestConditionType::Ready,
            status: if ready {
                ConditionStatus::True
            } else {
                ConditionStatus::False
            },
            reason: None,
            message: None,
            last_transition_time: None,
        }],
        observed_generation: None,
        migration: None,
    });
    g
}

fn no_zone(_: &str) -> Option<String> {
    None
}

fn desired(svc: &Service, guests: &[Guest]) -> Vec<EndpointSlice> {
    desired_slices(svc, guests, &HashSet::new(), &no_zone).unwrap()
}

fn addresses(slice: &EndpointSlice) -> Vec<&str> {
    slice
        .endpoints
        .iter()
        .map(|e| e.addresses[0].as_str())
        .collect()
}

fn endpoint<'a>(slices: &'a [EndpointSlice], ip: &str) -> &'a Endpoint {
    slices
        .iter()
        .flat_map(|s| &s.endpoints)
        .find(|e| e.addresses == [ip])
        .unwrap_or_else(|| panic!("no endpoint {ip}"))
}

fn pod_slice(service: &str, ips: &[&str]) -> EndpointSlice {
    EndpointSlice {
        metadata: ObjectMeta {
            name: Some(format!("{service}-abcde")),
            namespace: Some(NS.into()),
            labels: Some(labels(&[
                (labels::SERVICE_NAME, service),
                (labels::MANAGED_BY, names::BUILTIN_MANAGED_BY),
            ])),
            ..Default::default()
        },
        address_type: "IPv4".into(),
        endpoints: ips
            .iter()
            .map(|ip| Endpoint {
                addresses: vec![ip.to_string()],
                ..Default::default()
            })
            .collect(),
        ports: None,
    }
}

#[test]
fn selector_matching() {
    let sel = labels(&[("app", "web"), ("tier", "front")]);
    assert!(selects(
        &sel,
        &labels(&[("app", "web"), ("tier", "front"), ("x", "y")])
    ));
    assert!(!selects(&sel, &labels(&[("app", "web")])));
    assert!(!selects(&sel, &labels(&[("app", "web"), ("tier", "back")])));

    let guests = [guest("a", &["10.0.0.1"], true), {
        let mut g = guest("b", &["10.0.0.2"], true);
        g.metadata.labels = Some(labels(&[("app", "db")]));
        g
    }];
    let slices = desired(&web(), &guests);
    assert_eq!(slices.len(), 1);
    assert_eq!(addresses(&slices[0]), ["10.0.0.1"]);
}

#[test]
fn services_without_a_selector_or_of_type_external_name_get_nothing() {
    let guests = [guest("a", &["10.0.0.1"], true)];
    let mut svc = web();
    svc.spec.as_mut().unwrap().selector = None;
    assert!(desired(&svc, &guests).is_empty());
    svc.spec.as_mut().unwrap().selector = Some(BTreeMap::new());
    assert!(
        desired(&svc, &guests).is_empty(),
        "an empty selector selects nothing here"
    );
    let mut svc = web();
    svc.spec.as_mut().unwrap().type_ = Some("ExternalName".into());
    assert!(desired(&svc, &guests).is_empty());
}

#[test]
fn guests_of_other_namespaces_are_ignored() {
    let mut other = guest("a", &["10.0.0.1"], true);
    other.metadata.namespace = Some("other".into());
    assert!(desired(&web(), &[other]).is_empty());
}

#[test]
fn guests_without_a_usable_address_are_skipped() {
    let guests = [guest("a", &["not-an-ip"], true), guest("b", &[], true)];
    assert!(desired(&web(), &guests).is_empty());
    // CIDR notation, as the CNI result has it, is read as the address.
    let slices = desired(&web(), &[guest("c", &["10.0.0.3/16"], true)]);
    assert_eq!(addresses(&slices[0]), ["10.0.0.3"]);
}

#[test]
fn addresses_in_pod_slices_are_left_to_the_builtin_controller() {
    let guests = [
        guest("a", &["10.0.0.1"], true),
        guest("b", &["10.0.0.2"], true),
    ];
    let pod_slices = [pod_slice("web", &["10.0.0.1", "10.0.0.9"])];
    let pods = pod_addresses(&pod_slices);
    let slices = desired_slices(&web(), &guests, &pods, &no_zone).unwrap();
    assert_eq!(slices.len(), 1);
    assert_eq!(addresses(&slices[0]), ["10.0.0.2"]);

    // Only the built-in controller's slices count: ours, or a third party's, do not.
    let mut ours = pod_slice("web", &["10.0.0.2"]);
    ours.metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(labels::MANAGED_BY.into(), names::MANAGED_BY.into());
    let mut other = pod_slice("web", &["10.0.0.2"]);
    other
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert(labels::MANAGED_BY.into(), "someone.example/else".into());
    assert!(pod_addresses([&ours, &other]).is_empty());
}

#[test]
fn slices_hold_at_most_100_endpoints_ordered_by_address() {
    let guests: Vec<Guest> = (0..250)
        .map(|i| {
            guest(
                &format!("vm-{i}"),
                &[&format!("10.0.{}.{}", i / 200, i % 200 + 1)],
                true,
            )
        })
        .collect();
    let slices = desired(&web(), &guests);
    let sizes: Vec<usize> = slices.iter().map(|s| s.endpoints.len()).collect();
    assert_eq!(sizes, [100, 100, 50]);
    let all: Vec<IpAddr> = slices
        .iter()
        .flat_map(|s| addresses(s))
        .map(|a| a.parse().unwrap())
        .collect();
    let mut sorted = all.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(all, sorted, "every address once, in order");
    let names: HashSet<_> = slices.iter().map(|s| s.metadata.name.clone()).collect();
    assert_eq!(names.len(), 3);

    // Exactly 100 is one slice.
    let slices = desired(&web(), &guests[..100]);
    assert_eq!(slices.len(), 1);
}

#[test]
fn numeric_and_named_target_ports() {
    let svc = service(
        "web",
        &[("app", "web")],
        vec![
            port("http", 80, IntOrString::String("http".into())),
            port("metrics", 9090, IntOrString::Int(9100)),
        ],
    );
    let mut with_http = guest("a", &["10.0.0.1"], true);
    with_http.spec.ports = vec![GuestPort {
        name: "http".into(),
        port: 8080,
        protocol: Protocol::Tcp,
    }];
    let without = guest("b", &["10.0.0.2"], true);
    let mut udp_http = guest("c", &["10.0.0.3"], true);
    udp_http.spec.ports = vec![GuestPort {
        name: "http".into(),
        port: 8081,
        protocol: Protocol::Udp,
    }];
    let slices = desired(&svc, &[with_http, without, udp_http]);
    assert_eq!(slices.len(), 2, "one slice per port set");

    let ports_of = |ip: &str| -> Vec<(String, i32)> {
        let s = slices.iter().find(|s| addresses(s).contains(&ip)).unwrap();
        s.ports
            .iter()
            .flatten()
            .map(|p| (p.name.clone().unwrap(), p.port.unwrap()))
            .collect()
    };
    assert_eq!(
        ports_of("10.0.0.1"),
        [("http".to_string(), 8080), ("metrics".to_string(), 9100)]
    );
    // No port named http of protocol TCP: only the numeric port.
    assert_eq!(ports_of("10.0.0.2"), [("metrics".to_string(), 9100)]);
    assert_eq!(ports_of("10.0.0.3"), [("metrics".to_string(), 9100)]);
    let both = slices
        .iter()
        .find(|s| addresses(s).contains(&"10.0.0.1"))
        .unwrap();
    let p = &both.ports.as_ref().unwrap()[0];
    assert_eq!(p.protocol.as_deref(), Some("TCP"));

    // A guest that serves none of the Service's ports is in no slice.
    let only_named = service(
        "named",
        &[("app", "web")],
        vec![port("http", 80, IntOrString::String("http".into()))],
    );
    assert!(desired(&only_named, &[guest("b", &["10.0.0.2"], true)]).is_empty());
}

#[test]
fn target_port_defaults_to_port() {
    let mut p = port("http", 80, IntOrString::Int(0));
    p.target_port = None;
    let svc = service("web", &[("app", "web")], vec![p]);
    let slices = desired(&svc, &[guest("a", &["10.0.0.1"], true)]);
    assert_eq!(slices[0].ports.as_ref().unwrap()[0].port, Some(80));
}

#[test]
fn headless_service_without_ports_takes_every_guest() {
    let mut svc = service("h", &[("app", "web")], vec![]);
    svc.spec.as_mut().unwrap().cluster_ip = Some("None".into());
    svc.spec.as_mut().unwrap().cluster_ips = Some(vec!["None".into()]);
    let slices = desired(&svc, &[guest("a", &["10.0.0.1"], true)]);
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0].ports.as_deref(), Some(&[][..]));
    assert_eq!(
        slices[0].labels().get(labels::HEADLESS).map(String::as_str),
        Some("")
    );
}

#[test]
fn conditions_follow_guest_readiness_and_deletion() {
    let ready = guest("ready", &["10.0.0.1"], true);
    let not_ready = guest("not-ready", &["10.0.0.2"], false);
    let mut no_status = guest("no-status", &["10.0.0.3"], true);
    no_status.status = None;
    let mut terminating = guest("terminating", &["10.0.0.4"], true);
    terminating.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let mut terminating_not_ready = guest("terminating-not-ready", &["10.0.0.5"], false);
    terminating_not_ready.metadata.deletion_timestamp = Some(Time(Timestamp::now()));
    let guests = [
        ready,
        not_ready,
        no_status,
        terminating,
        terminating_not_ready,
    ];

    let flags = |slices: &[EndpointSlice], ip: &str| {
        let c = endpoint(slices, ip).conditions.clone().unwrap();
        (c.ready.unwrap(), c.serving.unwrap(), c.terminating.unwrap())
    };
    let slices = desired(&web(), &guests);
    assert_eq!(flags(&slices, "10.0.0.1"), (true, true, false));
    assert_eq!(flags(&slices, "10.0.0.2"), (false, false, false));
    assert_eq!(flags(&slices, "10.0.0.3"), (false, false, false));
    assert_eq!(flags(&slices, "10.0.0.4"), (false, true, true));
    assert_eq!(flags(&slices, "10.0.0.5"), (false, false, true));

    // publishNotReadyAddresses: ready whatever the guest says.
    let mut svc = web();
    svc.spec.as_mut().unwrap().publish_not_ready_addresses = Some(true);
    let slices = desired(&svc, &guests);
    assert_eq!(flags(&slices, "10.0.0.2"), (true, false, false));
    assert_eq!(flags(&slices, "10.0.0.4"), (true, true, true));
}

#[test]
fn address_types_follow_the_service_families() {
    let dual = guest("a", &["10.0.0.1", "fd00::1"], true);
    let v6 = guest("b", &["fd00:0:0::2"], true);

    let slices = desired(&web(), &[dual.clone(), v6.clone()]);
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0].address_type, "IPv4");
    assert_eq!(addresses(&slices[0]), ["10.0.0.1"]);

    let mut svc = web();
    svc.spec.as_mut().unwrap().ip_families = Some(vec!["IPv6".into(), "IPv4".into()]);
    let slices = desired(&svc, &[dual.clone(), v6.clone()]);
    let by_type: BTreeMap<&str, Vec<&str>> = slices
        .iter()
        .map(|s| (s.address_type.as_str(), addresses(s)))
        .collect();
    assert_eq!(by_type["IPv4"], ["10.0.0.1"]);
    // Canonical spelling.
    assert_eq!(by_type["IPv6"], ["fd00::1", "fd00::2"]);

    // No families: from the cluster IPs.
    let mut svc = web();
    svc.spec.as_mut().unwrap().ip_families = None;
    svc.spec.as_mut().unwrap().cluster_ips = Some(vec!["fd00:96::10".into()]);
    svc.spec.as_mut().unwrap().cluster_ip = Some("fd00:96::10".into());
    let slices = desired(&svc, &[dual, v6]);
    assert_eq!(slices.len(), 1);
    assert_eq!(slices[0].address_type, "IPv6");
}

#[test]
fn endpoints_name_their_guest_node_and_zone() {
    let zone_of = |node: &str| (node == "node-a").then(|| "zone-1".to_string());
    let slices = desired_slices(
        &web(),
        &[guest("vm-1", &["10.0.0.1"], true)],
        &HashSet::new(),
        &zone_of,
    )
    .unwrap();
    let e = &slices[0].endpoints[0];
    assert_eq!(e.node_name.as_deref(), Some("node-a"));
    assert_eq!(e.zone.as_deref(), Some("zone-1"));
    let r = e.target_ref.as_ref().unwrap();
    assert_eq!(r.kind.as_deref(), Some("Guest"));
    assert_eq!(r.api_version.as_deref(), Some("tapestry.dev/v1alpha1"));
    assert_eq!(r.name.as_deref(), Some("vm-1"));
    assert_eq!(r.namespace.as_deref(), Some(NS));
    assert_eq!(r.uid.as_deref(), Some("uid-vm-1"));
}

#[test]
fn labels_and_owner_reference_are_the_builtin_controllers() {
    let slices = desired(&web(), &[guest("a", &["10.0.0.1"], true)]);
    let s = &slices[0];
    assert_eq!(
        s.labels(),
        &labels(&[
            ("team", "a"),
            (labels::SERVICE_NAME, "web"),
            (labels::MANAGED_BY, names::MANAGED_BY),
        ])
    );
    assert_eq!(s.metadata.namespace.as_deref(), Some(NS));
    let owner = &s.owner_references()[0];
    assert_eq!(
        (
            owner.api_version.as_str(),
            owner.kind.as_str(),
            owner.name.as_str(),
            owner.uid.as_str()
        ),
        ("v1", "Service", "web", "uid-web")
    );
    assert_eq!(owner.controller, Some(true));
    assert_eq!(owner.block_owner_deletion, Some(true));

    // A Service label cannot claim the slice for someone else.
    let mut svc = web();
    svc.metadata.labels = Some(labels(&[
        (labels::MANAGED_BY, "x"),
        (labels::SERVICE_NAME, "y"),
    ]));
    let slices = desired(&svc, &[guest("a", &["10.0.0.1"], true)]);
    assert_eq!(slices[0].labels()[labels::MANAGED_BY], names::MANAGED_BY);
    assert_eq!(slices[0].labels()[labels::SERVICE_NAME], "web");
}

#[test]
fn names_are_stable_and_distinct() {
    let guests: Vec<Guest> = (0..150)
        .map(|i| {
            guest(
                &format!("vm-{i}"),
                &[&format!("10.0.1.{}", i + 1)],
                i % 2 == 0,
            )
        })
        .collect();
    let a = desired(&web(), &guests);
    // Other guests, other readiness, same grouping: the same names.
    let b = desired(&web(), &guests[20..]);
    let names_a: Vec<_> = a.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
    let names_b: Vec<_> = b.iter().map(|s| s.metadata.name.clone().unwrap()).collect();
    assert_eq!(names_a, names_b);
    assert_eq!(names_a, {
        let mut n = names_a.clone();
        n.dedup();
        n
    });
    for n in &names_a {
        let hash = n.strip_prefix("web-tapestry-").unwrap();
        assert_eq!(hash.len(), 10);
        assert!(hash.chars().all(|c| c.is_ascii_hexdigit()));
    }
    // Pinned: a new spelling would replace every slice in every cluster on upgrade.
    let ports = [EndpointPort {
        name: Some("http".into()),
        port: Some(8080),
        protocol: Some("TCP".into()),
        app_protocol: None,
    }];
    assert_eq!(slice_name("web", AddressType::IPv4, &ports, 0), names_a[0]);
    assert_eq!(
        slice_name("web", AddressType::IPv4, &ports, 0),
        "web-tapestry-851964d9bc"
    );
    assert_ne!(
        slice_name("web", AddressType::IPv4, &ports, 0),
        slice_name("web", AddressType::IPv6, &ports, 0)
    );
    assert_ne!(
        slice_name("web", AddressType::IPv4, &ports, 0),
        slice_name("web", AddressType::IPv4, &[], 0)
    );
}

#[test]
fn one_endpoint_per_address_the_best_guests() {
    let mut old = guest("old", &["10.0.0.1"], false);
    old.spec.node_name = "node-a".into();
    let mut new = guest("new", &["10.0.0.1"], true);
    new.spec.node_name = "node-b".into();
    let slices = desired(&web(), &[old.clone(), new.clone()]);
    assert_eq!(slices[0].endpoints.len(), 1);
    assert_eq!(slices[0].endpoints[0].node_name.as_deref(), Some("node-b"));
    // Order of the input does not matter.
    let slices = desired(&web(), &[new, old]);
    assert_eq!(slices[0].endpoints[0].node_name.as_deref(), Some("node-b"));
}

#[test]
fn same_content_ignores_what_the_server_adds() {
    let slices = desired(&web(), &[guest("a", &["10.0.0.1"], true)]);
    let d = &slices[0];
    let mut existing = d.clone();
    existing.metadata.uid = Some("x".into());
    existing.metadata.resource_version = Some("42".into());
    assert!(same_content(d, &existing));
    existing.endpoints[0].conditions.as_mut().unwrap().ready = Some(false);
    assert!(!same_content(d, &existing));
    let mut relabelled = d.clone();
    relabelled
        .metadata
        .labels
        .as_mut()
        .unwrap()
        .insert("team".into(), "b".into());
    assert!(!same_content(d, &relabelled));
    let mut reowned = d.clone();
    reowned.metadata.owner_references.as_mut().unwrap()[0].uid = "other".into();
    assert!(!same_content(d, &reowned));

    // A slice without ports reads back with none at all.
    let mut svc = service("h", &[("app", "web")], vec![]);
    svc.spec.as_mut().unwrap().cluster_ip = Some("None".into());
    let d = &desired(&svc, &[guest("a", &["10.0.0.1"], true)])[0];
    let mut existing = d.clone();
    existing.ports = None;
    assert!(same_content(d, &existing));
}

#[test]
fn is_slice_of_needs_namespace_and_service_name() {
    let s = pod_slice("web", &[]);
    assert!(is_slice_of(&s, NS, "web"));
    assert!(!is_slice_of(&s, NS, "db"));
    assert!(!is_slice_of(&s, "other", "web"));
    assert_eq!(managed_by(&s), Some(names::BUILTIN_MANAGED_BY));
}
