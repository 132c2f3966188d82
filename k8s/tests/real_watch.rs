//! `tlsmesh_k8s::run` against a real kube-apiserver (v1.20.2, see
//! kubeharness/): list + watch of namespaces, pods, this node, Services and
//! their endpoints as the controller-manager writes them, label flips,
//! deletions; Service endpoints from whichever API the server serves
//! (1.20: `discovery.k8s.io/v1beta1` slices; without them `v1` Endpoints);
//! RBAC that forbids a kind holds back the first publication; the CNI flow.
//!
//! No kubelet runs: the tests bind pods to nodes themselves and write the
//! pod status (Running, Ready, podIP) as a kubelet would.

mod real;

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use real::{
    delete_pod, delete_service, grant_read, label_namespace, label_pod, namespace, node, pod,
    run_pod, service, service_account, until,
};
use serde_json::json;
use tlsmesh_inventory::{resolve_service, Inventory, Mode, Problem, ServicePicker};
use tlsmesh_k8s::{
    cni_server::{self, CniPods, Command, Request, Response, PROTOCOL_VERSION},
    run, Options,
};
use tlsmesh_kube_harness::ControlPlane;
use tokio::sync::watch;

const NODE: &str = "node-a";

/// `None`: no such pod; `Some(None)`: present, not enrolled.
#[expect(clippy::option_option, reason = "absent and not enrolled are different answers here")]
fn mode(inv: &Inventory, key: &str) -> Option<Option<Mode>> {
    inv.pods.get(key).map(|p| p.mode)
}

fn start(client: kube::Client, opts: Options) -> watch::Receiver<Inventory> {
    let (tx, rx) = watch::channel(Inventory::default());
    tokio::spawn(run(client, opts, tx));
    rx
}

/// The cluster of the fake-server tests, for real: `shop` (strict) with
/// `web` on node-a and `db` on node-b behind the Service `db`; `lab`
/// (unlabelled) with `exp` on node-a. Returns the Service's `ClusterIP:5432`.
async fn cluster(c: &kube::Client) -> SocketAddr {
    namespace(c, "shop", Some("strict")).await;
    namespace(c, "lab", None).await;
    node(c, NODE, "192.168.56.11").await;
    node(c, "node-b", "192.168.56.12").await;
    for (ns, sa) in [("shop", "web"), ("shop", "db"), ("lab", "exp")] {
        service_account(c, ns, sa).await;
    }
    for (ns, name, node, ip) in [
        ("shop", "web", NODE, "10.244.1.2"),
        ("shop", "db", "node-b", "10.244.2.2"),
        ("lab", "exp", NODE, "10.244.1.3"),
    ] {
        pod(c, ns, name, node, name, json!({"app": name})).await;
        run_pod(c, ns, name, ip).await;
    }
    let vip = service(c, "shop", "db", "db", 5432).await;
    SocketAddr::new(vip.parse().expect("a ClusterIP"), 5432)
}

#[tokio::test]
async fn real_apiserver_lists_then_follows_watch_events() {
    let cp = ControlPlane::start().await;
    let c = cp.client();
    let vip = cluster(&c).await;
    let (ptx, prx) = watch::channel(Vec::<Problem>::new());
    let opts = Options { problems: Some(ptx), ..Options::new(Some(NODE.into()), "cluster.local") };
    let mut rx = start(c.clone(), opts);

    // Published although 1.20 serves no discovery.k8s.io/v1 (the watcher
    // finds v1beta1), with the endpoints the controller-manager wrote.
    let inv = until(&mut rx, "first inventory with the db endpoint", |i| {
        i.services.get(&vip).is_some_and(|s| !s.endpoints.is_empty())
    })
    .await;
    assert_eq!(mode(&inv, "shop/web"), Some(Some(Mode::Strict)));
    assert_eq!(mode(&inv, "lab/exp"), Some(None));
    assert_eq!(inv.pods["shop/db"].node, "node-b");
    assert_eq!(
        inv.pods["shop/web"].spiffe_id(&inv.trust_domain),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(inv.node_addresses(NODE), ["192.168.56.11".parse().unwrap()].into());
    assert!(inv.node_addresses("node-b").is_empty(), "only this node is watched (field selector)");
    assert_eq!(
        resolve_service(&inv, vip, &mut ServicePicker::new()),
        Some("10.244.2.2:5432".parse().unwrap())
    );
    assert_eq!(*prx.borrow(), [], "nothing to report on a 1.20 server");

    // Label flip on the namespace enrolls the running pod; removing it releases.
    label_namespace(&c, "lab", Some("permissive")).await;
    until(&mut rx, "lab enrolled", |i| mode(i, "lab/exp") == Some(Some(Mode::Permissive))).await;
    label_namespace(&c, "shop", None).await;
    until(&mut rx, "shop released", |i| mode(i, "shop/web") == Some(None)).await;
    label_namespace(&c, "shop", Some("strict")).await;
    until(&mut rx, "shop enrolled again", |i| mode(i, "shop/web") == Some(Some(Mode::Strict)))
        .await;

    // Pod opt-out label, then deletion.
    label_pod(&c, "lab", "exp", json!({"tlsmesh.io/mode": "off"})).await;
    until(&mut rx, "exp opted out", |i| mode(i, "lab/exp") == Some(None)).await;
    delete_pod(&c, "lab", "exp").await;
    until(&mut rx, "exp deleted", |i| !i.pods.contains_key("lab/exp")).await;

    // A second db pod becomes ready: the controller adds it to the slice,
    // and connections to the ClusterIP round-robin over both.
    pod(&c, "shop", "db-2", NODE, "db", json!({"app": "db"})).await;
    run_pod(&c, "shop", "db-2", "10.244.1.9").await;
    let inv = until(&mut rx, "two endpoints", |i| {
        i.services.get(&vip).is_some_and(|s| s.endpoints.iter().filter(|e| e.ready).count() == 2)
    })
    .await;
    let mut picker = ServicePicker::new();
    let a = resolve_service(&inv, vip, &mut picker).unwrap();
    let b = resolve_service(&inv, vip, &mut picker).unwrap();
    assert_ne!(a, b);
    let db2 = inv.services[&vip].endpoints.iter().find(|e| e.addr.ip().to_string() == "10.244.1.9");
    assert_eq!(db2.and_then(|e| e.pod.as_deref()), Some("shop/db-2"), "targetRef names the pod");

    // The endpoint's pod is deleted, then the Service.
    delete_pod(&c, "shop", "db-2").await;
    until(&mut rx, "db-2 out of the Service", |i| {
        i.services.get(&vip).is_some_and(|s| s.endpoints.len() == 1)
    })
    .await;
    delete_service(&c, "shop", "db").await;
    until(&mut rx, "Service gone", |i| !i.services.contains_key(&vip)).await;
}

#[tokio::test]
async fn real_apiserver_endpoints_v1_when_no_endpoint_slices_are_served() {
    // The API server of a cluster without EndpointSlices: only v1 Endpoints.
    let cp = ControlPlane::start_with_apiserver_args(&[
        "--runtime-config=discovery.k8s.io/v1beta1=false",
    ])
    .await;
    let c = cp.client();
    let vip = cluster(&c).await;
    let (ptx, prx) = watch::channel(Vec::<Problem>::new());
    let opts = Options { problems: Some(ptx), ..Options::new(Some(NODE.into()), "cluster.local") };
    let mut rx = start(c.clone(), opts);
    let inv = until(&mut rx, "the db endpoint from v1 Endpoints", |i| {
        i.services.get(&vip).is_some_and(|s| !s.endpoints.is_empty())
    })
    .await;
    assert_eq!(
        resolve_service(&inv, vip, &mut ServicePicker::new()),
        Some("10.244.2.2:5432".parse().unwrap())
    );
    assert_eq!(inv.services[&vip].endpoints[0].pod.as_deref(), Some("shop/db"));
    assert_eq!(*prx.borrow(), []);

    // A pod that is not Ready is listed under notReadyAddresses: not picked.
    pod(&c, "shop", "db-2", NODE, "db", json!({"app": "db"})).await;
    run_pod(&c, "shop", "db-2", "10.244.1.9").await;
    until(&mut rx, "db-2 ready", |i| i.services.get(&vip).is_some_and(|s| s.endpoints.len() == 2))
        .await;
    let unready = json!({"status": {"conditions": [{"type": "Ready", "status": "False"}]}});
    kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(c.clone(), "shop")
        .patch_status(
            "db-2",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&unready),
        )
        .await
        .unwrap();
    let inv = until(&mut rx, "db-2 not ready", |i| {
        i.services.get(&vip).is_some_and(|s| s.endpoints.iter().any(|e| !e.ready))
    })
    .await;
    let mut picker = ServicePicker::new();
    for _ in 0..4 {
        assert_eq!(
            resolve_service(&inv, vip, &mut picker),
            Some("10.244.2.2:5432".parse().unwrap())
        );
    }
}

#[tokio::test]
async fn real_apiserver_nothing_is_published_until_rbac_allows_every_kind() {
    let cp = ControlPlane::start().await;
    let admin = cp.client();
    cluster(&admin).await;
    namespace(&admin, "tlsmesh-system", None).await;
    service_account(&admin, "tlsmesh-system", "tlsmesh-node").await;
    let core = [("", "namespaces"), ("", "pods"), ("", "nodes"), ("", "services")];
    grant_read(&admin, "tlsmesh-node", "tlsmesh-system", "tlsmesh-node", &core).await;
    let token = cp.service_account_token("tlsmesh-system", "tlsmesh-node").await;
    let daemon = cp.client_for_token("tlsmesh-node", &token).await;

    let mut rx = start(daemon, Options::new(Some(NODE.into()), "cluster.local"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        !rx.has_changed().unwrap(),
        "a half-listed cluster (endpointslices forbidden) must not be published: it would release pods"
    );

    let mut all = core.to_vec();
    all.push(("discovery.k8s.io", "endpointslices"));
    grant_read(&admin, "tlsmesh-node", "tlsmesh-system", "tlsmesh-node", &all).await;
    let inv = until(&mut rx, "published once RBAC allows endpointslices", |i| {
        i.services.values().any(|s| !s.endpoints.is_empty())
    })
    .await;
    assert_eq!(mode(&inv, "shop/web"), Some(Some(Mode::Strict)));
}

#[tokio::test]
async fn real_apiserver_cni_add_gives_the_pod_its_netns_and_the_plugin_its_answer() {
    let cp = ControlPlane::start().await;
    let c = cp.client();
    cluster(&c).await;
    let pods = CniPods::new();
    let opts = Options {
        resolver: Arc::new(pods.clone()),
        refresh: pods.changed(),
        ..Options::new(Some(NODE.into()), "cluster.local")
    };
    let rx = start(c.clone(), opts);

    // The daemon's handler, as it would be wired (minus the real enrollment).
    let dir = cp.dir().join("cni");
    let socket = dir.join("cni.sock");
    let listener = cni_server::bind(&socket).unwrap();
    let handler_pods = pods.clone();
    tokio::spawn(cni_server::serve_listener(listener, move |req: Request| {
        let pods = handler_pods.clone();
        let mut rx = rx.clone();
        async move {
            if req.command == Command::Del {
                pods.forget(&req);
                return Response::Ok;
            }
            pods.record(&req);
            match cni_server::wait_for_pod(&mut rx, &req.pod_key(), Duration::from_secs(10)).await {
                None => Response::Error {
                    message: format!("pod {} not seen from the API server", req.pod_key()),
                },
                Some(p) => match p.mode {
                    None => Response::NotEnrolled { reason: "not enrolled".into() },
                    Some(m) => Response::Enrolled {
                        mode: format!("{m} netns={}", p.netns.unwrap().display()),
                    },
                },
            }
        }
    }));

    // A new pod: scheduled, without an address in the API (as at CNI ADD time).
    service_account(&c, "shop", "new").await;
    let new = pod(&c, "shop", "new", NODE, "new", json!({})).await;
    let uid = new.metadata.uid.clone().expect("the server sets a uid");
    let add = |name: &str, netns: &str, uid: &str| Request {
        version: PROTOCOL_VERSION,
        command: Command::Add,
        container_id: format!("sandbox-{name}"),
        netns: Some(netns.into()),
        ifname: "eth0".into(),
        pod_namespace: "shop".into(),
        pod_name: name.into(),
        pod_uid: Some(uid.into()),
        ips: vec!["10.244.1.50".parse().unwrap()],
    };
    let call = |req: Request, socket: &Path| {
        let socket = socket.to_path_buf();
        tokio::task::spawn_blocking(move || {
            tlsmesh_cni::client::call(&socket, &req, Duration::from_secs(20))
        })
    };
    let answer = call(add("new", "/var/run/netns/cni-new", &uid), &socket).await.unwrap().unwrap();
    assert_eq!(answer, Response::Enrolled { mode: "strict netns=/var/run/netns/cni-new".into() });

    let mut rx2 = start(c.clone(), Options::new(Some(NODE.into()), "cluster.local"));
    let plain = until(&mut rx2, "plain watcher", |i| i.pods.contains_key("shop/new")).await;
    assert_eq!(plain.pods["shop/new"].netns, None, "without the CNI record the netns is unknown");

    // Unknown pod: the daemon answers with an error after its timeout.
    let answer =
        call(add("ghost", "/var/run/netns/cni-ghost", "no-uid"), &socket).await.unwrap().unwrap();
    assert!(
        matches!(answer, Response::Error { ref message } if message.contains("shop/ghost")),
        "{answer:?}"
    );

    let mut del = add("new", "", &uid);
    del.command = Command::Del;
    assert_eq!(call(del, &socket).await.unwrap().unwrap(), Response::Ok);
    assert!(pods.get("shop/new").is_none());
}
