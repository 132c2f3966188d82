//! Reducer tests: list/watch sequences as the watcher delivers them.

use std::{collections::HashMap, net::SocketAddr};

use serde_json::json;
use tlsmesh_inventory::{resolve_service, route, Route, ServicePicker};

use super::*;

pub(crate) fn ns(name: &str, mode: Option<&str>) -> Namespace {
    let labels = mode.map(|m| json!({ MODE_LABEL: m })).unwrap_or(json!({}));
    serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}})).unwrap()
}

pub(crate) fn pod(ns: &str, name: &str, node: &str, ip: Option<&str>, label: Option<&str>) -> Pod {
    let labels = label.map(|m| json!({ MODE_LABEL: m })).unwrap_or(json!({}));
    let status = match ip {
        Some(ip) => json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}),
        None => json!({"phase": "Pending"}),
    };
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": format!("sa-{name}"), "containers": []},
        "status": status,
    }))
    .unwrap()
}

fn node(name: &str, ip: &str) -> Node {
    serde_json::from_value(json!({"metadata": {"name": name},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}]}}))
    .unwrap()
}

fn service(ns: &str, name: &str, vip: &str, ports: &[(&str, i32)]) -> Service {
    let ports: Vec<_> =
        ports.iter().map(|(n, p)| json!({"name": n, "port": p, "protocol": "TCP"})).collect();
    serde_json::from_value(json!({"metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": vip, "clusterIPs": [vip], "ports": ports}}))
    .unwrap()
}

/// An `EndpointSlice` of `svc` with (address, ready, pod) endpoints on port `(name, port)`.
fn slice(
    ns: &str,
    name: &str,
    svc: &str,
    port: (&str, i32),
    eps: &[(&str, bool, &str)],
) -> EndpointSlice {
    let endpoints: Vec<_> = eps
        .iter()
        .map(|(a, ready, p)| {
            json!({"addresses": [a], "conditions": {"ready": ready},
                "targetRef": {"kind": "Pod", "namespace": ns, "name": p}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {SERVICE_NAME_LABEL: svc}},
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": port.0, "port": port.1, "protocol": "TCP"}],
    }))
    .unwrap()
}

/// A state for node `a` with every kind listed (empty unless given).
fn synced(nss: Vec<Namespace>, pods: Vec<Pod>) -> ClusterState {
    let mut s = ClusterState::new(Some("a".into()), "cluster.local");
    s.apply(Update::Namespace(Event::Restarted(nss)));
    s.apply(Update::Pod(Event::Restarted(pods)));
    s.apply(Update::Node(Event::Restarted(vec![node("a", "192.168.0.1")])));
    s.apply(Update::Service(Event::Restarted(vec![])));
    s.apply(Update::EndpointSlice(Event::Restarted(vec![])));
    s
}

fn inv(s: &ClusterState) -> Inventory {
    s.inventory(&NoNetns).0
}

fn modes(s: &ClusterState) -> Vec<(String, Option<Mode>)> {
    inv(s).pods.into_values().map(|p| (p.key(), p.mode)).collect()
}

#[test]
fn not_synced_until_every_kind_is_listed() {
    let mut s = ClusterState::new(Some("a".into()), "cluster.local");
    assert!(s.apply(Update::Pod(Event::Applied(pod("shop", "web", "a", Some("10.0.0.2"), None)))));
    assert!(!s.is_synced());
    s.apply(Update::Namespace(Event::Restarted(vec![ns("shop", Some("strict"))])));
    s.apply(Update::Pod(Event::Restarted(vec![])));
    s.apply(Update::Node(Event::Restarted(vec![])));
    s.apply(Update::Service(Event::Restarted(vec![])));
    assert_eq!(s.unsynced(), [Kind::EndpointSlice]);
    assert!(
        s.apply(Update::EndpointSlice(Event::Restarted(vec![]))),
        "becoming synced is a change"
    );
    assert!(s.is_synced());
    let ca = ClusterState::new(None, "cluster.local");
    assert!(!ca.unsynced().contains(&Kind::Node), "the CA watches no node");
}

#[test]
fn namespace_label_enrolls_and_pod_label_opts_out() {
    let s = synced(
        vec![ns("shop", Some("strict")), ns("lab", Some("permissive")), ns("other", None)],
        vec![
            pod("shop", "web", "a", Some("10.0.0.2"), None),
            pod("shop", "legacy", "a", Some("10.0.0.3"), Some("off")),
            pod("lab", "exp", "b", Some("10.0.1.2"), None),
            pod("lab", "pinned", "b", Some("10.0.1.3"), Some("strict")),
            pod("other", "x", "a", Some("10.0.0.4"), None),
        ],
    );
    assert_eq!(
        modes(&s),
        [
            ("lab/exp".into(), Some(Mode::Permissive)),
            ("lab/pinned".into(), Some(Mode::Strict)),
            ("other/x".into(), None),
            ("shop/legacy".into(), None),
            ("shop/web".into(), Some(Mode::Strict)),
        ]
    );
    let inv = inv(&s);
    assert_eq!(
        inv.pods["shop/web"].spiffe_id(&inv.trust_domain),
        "spiffe://cluster.local/ns/shop/sa/sa-web"
    );
    assert_eq!(inv.enrolled_on("a").len(), 1);
    assert_eq!(inv.node_addresses("a"), ["192.168.0.1".parse().unwrap()].into());
    assert!(inv.nodes.contains_key("b"), "nodes named by pods are listed");
    assert_eq!(
        route(&inv, "a", "10.0.1.2".parse().unwrap()),
        Route::RemotePod { pod: "lab/exp".into(), node: "b".into() }
    );
    assert_eq!(
        s.not_enrolled_reason("shop", "legacy").unwrap(),
        "pod shop/legacy is labelled tlsmesh.io/mode=off"
    );
    assert!(s
        .not_enrolled_reason("other", "x")
        .unwrap()
        .contains("namespace other is not labelled"));
    assert_eq!(s.not_enrolled_reason("shop", "web"), None);
}

#[test]
fn label_flips_enroll_and_release_running_pods() {
    let mut s =
        synced(vec![ns("shop", None)], vec![pod("shop", "web", "a", Some("10.0.0.2"), None)]);
    assert_eq!(modes(&s), [("shop/web".into(), None)]);
    assert!(s.apply(Update::Namespace(Event::Applied(ns("shop", Some("strict"))))));
    assert_eq!(modes(&s), [("shop/web".into(), Some(Mode::Strict))]);
    assert!(s.apply(Update::Namespace(Event::Applied(ns("shop", Some("permissive"))))));
    assert_eq!(modes(&s), [("shop/web".into(), Some(Mode::Permissive))]);
    assert!(s.apply(Update::Pod(Event::Applied(pod(
        "shop",
        "web",
        "a",
        Some("10.0.0.2"),
        Some("off")
    )))));
    assert_eq!(modes(&s), [("shop/web".into(), None)], "pod opted out while running");
    assert!(s.apply(Update::Pod(Event::Applied(pod("shop", "web", "a", Some("10.0.0.2"), None)))));
    assert!(s.apply(Update::Namespace(Event::Applied(ns("shop", None)))));
    assert_eq!(modes(&s), [("shop/web".into(), None)], "label removed: released");
    assert!(!s.apply(Update::Namespace(Event::Applied(ns("shop", None)))), "same again: no change");
    assert!(s.apply(Update::Namespace(Event::Applied(ns("shop", Some("yes"))))));
    let (_, problems) = s.inventory(&NoNetns);
    assert!(problems[0].message.contains("\"yes\""), "{problems:?}");
    assert_eq!(modes(&s), [("shop/web".into(), None)], "bad value enrolls nothing");
    assert!(s.apply(Update::Namespace(Event::Deleted(ns("shop", Some("yes"))))));
    assert!(s.inventory(&NoNetns).1.is_empty());
}

#[test]
fn pod_lifecycle() {
    let mut s = synced(vec![ns("shop", Some("strict"))], vec![]);
    // Scheduled, no address yet: known (the CA may issue for it) with no IPs.
    s.apply(Update::Pod(Event::Applied(pod("shop", "web", "a", None, None))));
    assert!(inv(&s).pods["shop/web"].ips.is_empty());
    s.apply(Update::Pod(Event::Applied(pod("shop", "web", "a", Some("10.0.0.2"), None))));
    assert_eq!(inv(&s).pods["shop/web"].ips, ["10.0.0.2".parse::<IpAddr>().unwrap()]);
    assert_eq!(inv(&s).placement()["spiffe://cluster.local/ns/shop/sa/sa-web"], ["a"]);
    assert!(s.apply(Update::Pod(Event::Deleted(pod("shop", "web", "a", Some("10.0.0.2"), None)))));
    assert!(inv(&s).pods.is_empty());
    assert!(
        !s.apply(Update::Pod(Event::Deleted(pod("shop", "web", "a", None, None)))),
        "deleting twice"
    );

    // Unscheduled, host-network and finished pods are left out.
    let mut unscheduled = pod("shop", "pending", "", None, None);
    unscheduled.spec.as_mut().unwrap().node_name = None;
    let mut host = pod("shop", "host", "a", Some("192.168.0.1"), None);
    host.spec.as_mut().unwrap().host_network = Some(true);
    let mut done = pod("shop", "job", "a", Some("10.0.0.9"), None);
    done.status.as_mut().unwrap().phase = Some("Succeeded".into());
    for p in [unscheduled, host, done] {
        s.apply(Update::Pod(Event::Applied(p)));
    }
    assert!(inv(&s).pods.is_empty(), "{:?}", inv(&s).pods.keys());
    assert!(s.not_enrolled_reason("shop", "host").unwrap().contains("host network"));
}

#[test]
fn restarted_replaces_state_after_a_relist() {
    let mut s = synced(
        vec![ns("shop", Some("strict"))],
        vec![
            pod("shop", "web", "a", Some("10.0.0.2"), None),
            pod("shop", "db", "b", Some("10.0.1.2"), None),
        ],
    );
    // Disconnected (410 Gone): meanwhile db was deleted and cache was created.
    // The re-list is the only news of either.
    let changed = s.apply(Update::Pod(Event::Restarted(vec![
        pod("shop", "web", "a", Some("10.0.0.2"), None),
        pod("shop", "cache", "b", Some("10.0.1.3"), None),
    ])));
    assert!(changed);
    let keys: Vec<_> = inv(&s).pods.into_keys().collect();
    assert_eq!(keys, ["shop/cache", "shop/web"]);
    // The namespace label was removed while disconnected.
    s.apply(Update::Namespace(Event::Restarted(vec![ns("shop", None)])));
    assert!(inv(&s).enrolled_on("a").is_empty());
    // An identical re-list changes nothing.
    let same = vec![
        pod("shop", "web", "a", Some("10.0.0.2"), None),
        pod("shop", "cache", "b", Some("10.0.1.3"), None),
    ];
    assert!(!s.apply(Update::Pod(Event::Restarted(same))));
}

struct Runtime(HashMap<String, (PathBuf, Vec<IpAddr>)>);

impl NetnsResolver for Runtime {
    fn netns(&self, pod: &PodRef<'_>) -> Option<PathBuf> {
        self.0.get(pod.name).map(|r| r.0.clone())
    }
    fn ips(&self, pod: &PodRef<'_>) -> Vec<IpAddr> {
        self.0.get(pod.name).map(|r| r.1.clone()).unwrap_or_default()
    }
}

#[test]
fn netns_and_early_addresses_come_from_the_resolver_for_local_pods() {
    let s = synced(
        vec![ns("shop", Some("strict"))],
        vec![
            pod("shop", "web", "a", None, None),
            pod("shop", "api", "a", Some("10.0.0.3"), None),
            pod("shop", "db", "b", None, None),
        ],
    );
    let rt = Runtime(
        [
            (
                "web".to_owned(),
                (PathBuf::from("/var/run/netns/cni-web"), vec!["10.0.0.2".parse().unwrap()]),
            ),
            (
                "api".to_owned(),
                (PathBuf::from("/var/run/netns/cni-api"), vec!["10.0.0.99".parse().unwrap()]),
            ),
            ("db".to_owned(), (PathBuf::from("/elsewhere"), vec!["10.0.1.2".parse().unwrap()])),
        ]
        .into(),
    );
    let (inv, _) = s.inventory(&rt);
    assert_eq!(
        inv.pods["shop/web"].netns.as_deref(),
        Some(std::path::Path::new("/var/run/netns/cni-web"))
    );
    assert_eq!(
        inv.pods["shop/web"].ips,
        ["10.0.0.2".parse::<IpAddr>().unwrap()],
        "CNI address before the API has one"
    );
    assert_eq!(
        inv.pods["shop/api"].ips,
        ["10.0.0.3".parse::<IpAddr>().unwrap()],
        "the API wins once it knows"
    );
    assert_eq!(inv.pods["shop/db"].netns, None, "other nodes' pods have no netns here");
    assert!(inv.pods["shop/db"].ips.is_empty());
    assert_eq!(self::inv(&s).pods["shop/web"].netns, None, "unknown netns stays None");
}

#[test]
fn a_reused_address_goes_to_the_pod_not_being_deleted() {
    let mut old = pod("shop", "a-old", "a", Some("10.0.0.2"), None);
    old.metadata.deletion_timestamp =
        serde_json::from_value(json!("2026-01-01T00:00:00Z")).unwrap();
    let s = synced(
        vec![ns("shop", Some("strict"))],
        vec![old, pod("shop", "b-new", "a", Some("10.0.0.2"), None)],
    );
    let (inv, problems) = s.inventory(&NoNetns);
    assert_eq!(inv.pod_by_ip("10.0.0.2".parse().unwrap()).unwrap().key(), "shop/b-new");
    assert!(inv.pods["shop/a-old"].ips.is_empty());
    assert_eq!(problems.len(), 1);
    assert!(problems[0].message.contains("shop/b-new"), "{problems:?}");
}

#[test]
fn endpoint_slice_updates_change_service_resolution() {
    let mut s = synced(
        vec![ns("shop", Some("strict"))],
        vec![
            pod("shop", "web-1", "a", Some("10.0.0.2"), None),
            pod("shop", "web-2", "b", Some("10.0.1.2"), None),
        ],
    );
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    s.apply(Update::Service(Event::Applied(service(
        "shop",
        "web",
        "10.96.0.10",
        &[("http", 80), ("metrics", 9090)],
    ))));
    let mut picker = ServicePicker::new();
    assert_eq!(inv(&s).services[&vip].endpoints, [], "no slices yet");
    assert_eq!(resolve_service(&inv(&s), vip, &mut picker), None);

    s.apply(Update::EndpointSlice(Event::Applied(slice(
        "shop",
        "web-abc",
        "web",
        ("http", 8080),
        &[("10.0.0.2", true, "web-1"), ("10.0.1.2", false, "web-2")],
    ))));
    let i = inv(&s);
    assert_eq!(i.services[&vip].service, "shop/web");
    assert_eq!(i.services[&vip].endpoints[0].pod.as_deref(), Some("shop/web-1"));
    assert_eq!(
        i.services[&"10.96.0.10:9090".parse().unwrap()].endpoints,
        [],
        "slice has no port named metrics"
    );
    let picks: Vec<_> =
        (0..3).map(|_| resolve_service(&i, vip, &mut picker).unwrap().to_string()).collect();
    assert_eq!(picks, ["10.0.0.2:8080"; 3], "only the ready one");

    // web-2 becomes ready: round robin over both.
    s.apply(Update::EndpointSlice(Event::Applied(slice(
        "shop",
        "web-abc",
        "web",
        ("http", 8080),
        &[("10.0.0.2", true, "web-1"), ("10.0.1.2", true, "web-2")],
    ))));
    let i = inv(&s);
    let picks: Vec<_> = (0..4).map(|_| resolve_service(&i, vip, &mut picker).unwrap()).collect();
    assert_eq!(picks.iter().filter(|a| a.ip() == "10.0.1.2".parse::<IpAddr>().unwrap()).count(), 2);
    assert_ne!(picks[0], picks[1]);
    // A second slice of the same Service adds endpoints (not enrolled: passthrough).
    s.apply(Update::EndpointSlice(Event::Applied(slice(
        "shop",
        "web-def",
        "web",
        ("http", 8080),
        &[("10.0.2.7", true, "ext")],
    ))));
    let i = inv(&s);
    assert_eq!(i.services[&vip].endpoints.len(), 3);
    assert_eq!(route(&i, "a", "10.0.2.7".parse().unwrap()), Route::Passthrough);
    // The slice is deleted; then the Service.
    s.apply(Update::EndpointSlice(Event::Deleted(slice(
        "shop",
        "web-abc",
        "web",
        ("http", 8080),
        &[],
    ))));
    assert_eq!(inv(&s).services[&vip].endpoints.len(), 1);
    s.apply(Update::Service(Event::Deleted(service("shop", "web", "10.96.0.10", &[]))));
    assert!(inv(&s).services.is_empty());
}

#[test]
fn headless_udp_and_other_family_services_do_not_resolve() {
    let mut s = synced(vec![], vec![]);
    s.apply(Update::Service(Event::Applied(service("shop", "headless", "None", &[("http", 80)]))));
    let mut dns = service("kube-system", "dns", "10.96.0.10", &[("dns", 53)]);
    dns.spec.as_mut().unwrap().ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
    s.apply(Update::Service(Event::Applied(dns)));
    assert!(inv(&s).services.is_empty());

    s.apply(Update::Service(Event::Applied(service("shop", "v6", "fd00::10", &[("http", 80)]))));
    s.apply(Update::EndpointSlice(Event::Applied(slice(
        "shop",
        "v6-x",
        "v6",
        ("http", 8080),
        &[("10.0.0.2", true, "p")],
    ))));
    let i = inv(&s);
    assert_eq!(
        i.services[&"[fd00::10]:80".parse().unwrap()].endpoints,
        [],
        "IPv4 slice does not serve an IPv6 VIP"
    );
}

fn endpoints(
    ns: &str,
    svc: &str,
    port: (&str, i32),
    ready: &[&str],
    not_ready: &[&str],
) -> Endpoints {
    let addr =
        |ip: &&str| json!({"ip": ip, "targetRef": {"kind": "Pod", "name": format!("p-{ip}")}});
    serde_json::from_value(json!({
        "metadata": {"name": svc, "namespace": ns},
        "subsets": [{
            "addresses": ready.iter().map(addr).collect::<Vec<_>>(),
            "notReadyAddresses": not_ready.iter().map(addr).collect::<Vec<_>>(),
            "ports": [{"name": port.0, "port": port.1, "protocol": "TCP"}],
        }],
    }))
    .unwrap()
}

#[test]
fn endpoints_v1_serve_services_where_no_slices_are_served() {
    let mut s = synced(vec![], vec![]);
    let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
    s.apply(Update::Service(Event::Applied(service("shop", "web", "10.96.0.10", &[("http", 80)]))));
    assert!(s.apply(Update::Endpoints(Event::Restarted(vec![endpoints(
        "shop",
        "web",
        ("http", 8080),
        &["10.0.0.2", "fd00::2"],
        &["10.0.0.3"],
    )]))));
    let eps = &inv(&s).services[&vip].endpoints;
    let seen: Vec<(String, bool, Option<&str>)> =
        eps.iter().map(|e| (e.addr.to_string(), e.ready, e.pod.as_deref())).collect();
    assert_eq!(
        seen,
        [
            ("10.0.0.2:8080".to_owned(), true, Some("shop/p-10.0.0.2")),
            ("10.0.0.3:8080".to_owned(), false, Some("shop/p-10.0.0.3")),
        ],
        "IPv4 addresses only for an IPv4 VIP; notReadyAddresses are not ready"
    );
    // Slices listed (the source changed): they replace what Endpoints said.
    assert!(s.apply(Update::EndpointSlice(Event::Restarted(vec![slice(
        "shop",
        "web-x",
        "web",
        ("http", 9000),
        &[("10.0.0.9", true, "p9")],
    )]))));
    let eps = &inv(&s).services[&vip].endpoints;
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].addr, "10.0.0.9:9000".parse().unwrap());
}

#[test]
fn an_unserved_kind_counts_as_listed_and_is_a_problem() {
    let mut s = ClusterState::new(Some("a".into()), "cluster.local");
    s.apply(Update::Namespace(Event::Restarted(vec![ns("shop", Some("strict"))])));
    s.apply(Update::Pod(Event::Restarted(vec![pod("shop", "web", "a", Some("10.0.0.2"), None)])));
    s.apply(Update::Node(Event::Restarted(vec![])));
    s.apply(Update::Service(Event::Restarted(vec![service(
        "shop",
        "web",
        "10.96.0.10",
        &[("http", 80)],
    )])));
    assert!(!s.is_synced());
    let message = "no EndpointSlices or Endpoints served".to_owned();
    assert!(s.apply(Update::Unserved { kind: Kind::EndpointSlice, message: message.clone() }));
    assert!(s.is_synced(), "an unserved kind must not hold back the inventory");
    assert!(!s.apply(Update::Unserved { kind: Kind::EndpointSlice, message: message.clone() }));
    let (i, problems) = s.inventory(&NoNetns);
    assert_eq!(i.pods["shop/web"].mode, Some(Mode::Strict));
    assert_eq!(i.services[&"10.96.0.10:80".parse().unwrap()].endpoints, []);
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].message, message);
    assert!(problems[0].subject.contains("endpointslices"), "{problems:?}");
    // Served again (after a re-discovery): the problem goes.
    assert!(s.apply(Update::EndpointSlice(Event::Restarted(vec![]))));
    assert_eq!(s.inventory(&NoNetns).1, []);
}

#[test]
fn mode_overrides_apply_to_enrolled_namespaces_under_pod_labels() {
    let mut s = synced(
        vec![ns("shop", Some("strict")), ns("lab", Some("strict")), ns("other", None)],
        vec![
            pod("shop", "web", "a", Some("10.0.0.2"), None),
            pod("shop", "pinned", "a", Some("10.0.0.3"), Some("strict")),
            pod("lab", "exp", "b", Some("10.0.1.2"), None),
            pod("other", "x", "a", Some("10.0.0.4"), None),
        ],
    );
    let overrides = ModeOverrides {
        namespaces: [("shop".to_owned(), Mode::Permissive), ("other".to_owned(), Mode::Strict)]
            .into(),
        mesh: Some(Mode::Permissive),
    };
    assert!(s.set_mode_overrides(overrides.clone()));
    assert!(!s.set_mode_overrides(overrides));
    assert_eq!(
        modes(&s),
        [
            ("lab/exp".into(), Some(Mode::Permissive)),
            ("other/x".into(), None),
            ("shop/pinned".into(), Some(Mode::Strict)),
            ("shop/web".into(), Some(Mode::Permissive)),
        ],
        "mesh-wide for lab; shop's own; the pod label wins; no enrollment by override"
    );
    assert!(s.set_mode_overrides(ModeOverrides::default()));
    assert_eq!(modes(&s)[3], ("shop/web".into(), Some(Mode::Strict)));
}

#[test]
fn the_workload_comes_from_owner_references_or_labels() {
    let mut deployed = pod("shop", "web-7d9f8c6b5-x2x4z", "a", Some("10.0.0.2"), None);
    deployed.metadata.generate_name = Some("web-7d9f8c6b5-".into());
    deployed
        .metadata
        .labels
        .get_or_insert_default()
        .insert("pod-template-hash".into(), "7d9f8c6b5".into());
    deployed.metadata.owner_references = Some(vec![serde_json::from_value(json!({
        "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8c6b5",
        "uid": "rs-uid", "controller": true
    }))
    .unwrap()]);
    let mut bare = pod("shop", "debug", "a", Some("10.0.0.3"), None);
    bare.metadata.labels.get_or_insert_default().insert("app".into(), "toolbox".into());
    let plain = pod("shop", "lonely", "a", Some("10.0.0.4"), None);
    let s = synced(vec![ns("shop", Some("strict"))], vec![deployed, bare, plain]);
    let inv = inv(&s);
    assert_eq!(inv.pods["shop/web-7d9f8c6b5-x2x4z"].workload_name(), "web");
    assert_eq!(inv.pods["shop/debug"].workload_name(), "toolbox");
    assert_eq!(inv.pods["shop/lonely"].workload_name(), "lonely");
}
