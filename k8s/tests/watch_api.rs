//! `tlsmesh_k8s::run` against a fake API server: list + watch, label flips,
//! deletions, a `410 Gone` that forces a re-list, a forbidden resource that
//! holds back the first publication, and the CNI flow into the inventory.

mod support;

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use support::{
    namespace, node, pod, service, slice, FakeApi, NAMESPACES, NODES, PODS, SERVICES, SLICES,
};
use tlsmesh_inventory::{resolve_service, Inventory, Mode, ServicePicker};
use tlsmesh_k8s::{
    cni_server::{self, CniPods, Command, Request, Response, PROTOCOL_VERSION},
    run, Options,
};
use tokio::sync::watch;

const NODE: &str = "node-a";

async fn cluster() -> FakeApi {
    let api = FakeApi::start().await;
    api.apply(NAMESPACES, namespace("shop", Some("strict")));
    api.apply(NAMESPACES, namespace("lab", None));
    api.apply(PODS, pod("shop", "web", NODE, Some("10.244.1.2")));
    api.apply(PODS, pod("shop", "db", "node-b", Some("10.244.2.2")));
    api.apply(PODS, pod("lab", "exp", NODE, Some("10.244.1.3")));
    api.apply(NODES, node(NODE, "192.168.56.11"));
    api.apply(NODES, node("node-b", "192.168.56.12"));
    api.apply(SERVICES, service("shop", "db", "10.96.0.20", 5432));
    api.apply(SLICES, slice("shop", "db-1", "db", 5432, &[("10.244.2.2", true, "db")]));
    api
}

fn start(api: &FakeApi, opts: Options) -> watch::Receiver<Inventory> {
    let (tx, rx) = watch::channel(Inventory::default());
    tokio::spawn(run(api.client(), opts, tx));
    rx
}

/// Waits until the published inventory satisfies `cond`.
async fn until(
    rx: &mut watch::Receiver<Inventory>,
    what: &str,
    cond: impl FnMut(&Inventory) -> bool,
) -> Inventory {
    let found = match tokio::time::timeout(Duration::from_secs(15), rx.wait_for(cond)).await {
        Ok(Ok(inv)) => Some(inv.clone()),
        _ => None,
    };
    found.unwrap_or_else(|| {
        panic!("timed out waiting for {what}; last inventory: {:#?}", *rx.borrow())
    })
}

/// `None`: no such pod; `Some(None)`: present, not enrolled.
#[expect(clippy::option_option, reason = "absent and not enrolled are different answers here")]
fn mode(inv: &Inventory, key: &str) -> Option<Option<Mode>> {
    inv.pods.get(key).map(|p| p.mode)
}

#[tokio::test]
async fn lists_then_follows_watch_events() {
    let api = cluster().await;
    let mut rx = start(&api, Options::new(Some(NODE.into()), "cluster.local"));
    let inv = until(&mut rx, "first inventory", |i| !i.pods.is_empty()).await;
    assert_eq!(mode(&inv, "shop/web"), Some(Some(Mode::Strict)));
    assert_eq!(mode(&inv, "lab/exp"), Some(None));
    assert_eq!(inv.pods["shop/db"].node, "node-b");
    assert_eq!(
        inv.pods["shop/web"].spiffe_id(&inv.trust_domain),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(inv.node_addresses(NODE), ["192.168.56.11".parse().unwrap()].into());
    assert!(inv.node_addresses("node-b").is_empty(), "only this node is watched (field selector)");
    let vip: SocketAddr = "10.96.0.20:5432".parse().unwrap();
    assert_eq!(
        resolve_service(&inv, vip, &mut ServicePicker::new()),
        Some("10.244.2.2:5432".parse().unwrap())
    );

    api.until(5, "all watches open", |a| {
        [NAMESPACES, PODS, NODES, SERVICES, SLICES].iter().all(|r| a.watches(r) == 1)
    })
    .await;

    // Label flip on the namespace enrolls the running pod; removing it releases.
    api.apply(NAMESPACES, namespace("lab", Some("permissive")));
    until(&mut rx, "lab enrolled", |i| mode(i, "lab/exp") == Some(Some(Mode::Permissive))).await;
    api.apply(NAMESPACES, namespace("shop", None));
    until(&mut rx, "shop released", |i| mode(i, "shop/web") == Some(None)).await;

    // Pod opt-out label, then deletion.
    let mut exp = pod("lab", "exp", NODE, Some("10.244.1.3"));
    exp["metadata"]["labels"]["tlsmesh.io/mode"] = "off".into();
    api.apply(PODS, exp);
    until(&mut rx, "exp opted out", |i| mode(i, "lab/exp") == Some(None)).await;
    api.delete(PODS, "lab", "exp");
    until(&mut rx, "exp deleted", |i| !i.pods.contains_key("lab/exp")).await;

    // A second endpoint becomes ready: round robin over both.
    api.apply(PODS, pod("shop", "db-2", NODE, Some("10.244.1.9")));
    api.apply(
        SLICES,
        slice(
            "shop",
            "db-1",
            "db",
            5432,
            &[("10.244.2.2", true, "db"), ("10.244.1.9", true, "db-2")],
        ),
    );
    let inv = until(&mut rx, "two endpoints", |i| {
        i.services.get(&vip).is_some_and(|s| s.endpoints.len() == 2)
    })
    .await;
    let mut picker = ServicePicker::new();
    let a = resolve_service(&inv, vip, &mut picker).unwrap();
    let b = resolve_service(&inv, vip, &mut picker).unwrap();
    assert_ne!(a, b);
    assert_eq!(api.lists(PODS), 1, "no re-list without a reason");
}

#[tokio::test]
async fn gone_410_relists_and_replaces_state() {
    let api = cluster().await;
    let mut rx = start(&api, Options::new(Some(NODE.into()), "cluster.local"));
    until(&mut rx, "first inventory", |i| i.pods.contains_key("shop/db")).await;
    api.until(5, "watches open", |a| a.watches(PODS) == 1 && a.watches(NAMESPACES) == 1).await;

    // While the client was away: db deleted, cache created, shop unlabelled.
    // None of it is ever sent as a watch event.
    api.replace_silently(
        PODS,
        vec![
            pod("shop", "web", NODE, Some("10.244.1.2")),
            pod("shop", "cache", "node-b", Some("10.244.2.7")),
        ],
    );
    api.replace_silently(NAMESPACES, vec![namespace("shop", None), namespace("lab", None)]);
    api.expire_watches();

    let inv = until(&mut rx, "re-listed state", |i| {
        i.pods.contains_key("shop/cache") && mode(i, "shop/web") == Some(None)
    })
    .await;
    assert!(
        !inv.pods.contains_key("shop/db"),
        "deleted while disconnected: gone after the re-list"
    );
    assert!(!inv.pods.contains_key("lab/exp"));
    assert!(
        api.lists(PODS) >= 2 && api.lists(NAMESPACES) >= 2,
        "410 Gone made the watcher list again"
    );

    // A silently dropped connection: the watcher resumes from its version.
    api.until(5, "watches reopened", |a| a.watches(PODS) == 1).await;
    api.drop_watches();
    api.apply(PODS, pod("shop", "late", NODE, Some("10.244.1.8")));
    until(&mut rx, "event after reconnect", |i| i.pods.contains_key("shop/late")).await;
}

#[tokio::test]
async fn nothing_is_published_until_every_kind_is_listed() {
    let api = cluster().await;
    api.forbid(SLICES);
    let mut rx = start(&api, Options::new(Some(NODE.into()), "cluster.local"));
    api.until(5, "pods listed", |a| a.lists(PODS) >= 1 && a.lists(NAMESPACES) >= 1).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !rx.has_changed().unwrap(),
        "a half-listed cluster must not be published (it would release pods)"
    );
    api.allow(SLICES);
    let inv = until(&mut rx, "published after 403 cleared", |i| !i.pods.is_empty()).await;
    assert_eq!(inv.services.len(), 1);
}

#[tokio::test]
async fn cni_add_gives_the_pod_its_netns_and_the_plugin_its_answer() {
    let api = cluster().await;
    let pods = CniPods::new();
    let opts = Options {
        resolver: Arc::new(pods.clone()),
        refresh: pods.changed(),
        ..Options::new(Some(NODE.into()), "cluster.local")
    };
    let rx = start(&api, opts);

    // The daemon's handler, as it would be wired (minus the real enrollment).
    let dir = std::env::temp_dir().join(format!("tlsmesh-k8s-cni-{}", std::process::id()));
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
            match cni_server::wait_for_pod(&mut rx, &req.pod_key(), Duration::from_secs(5)).await {
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

    // A new pod: scheduled, not yet with an address in the API (as at CNI ADD time).
    api.apply(PODS, pod("shop", "new", NODE, None));
    let add = |name: &str, netns: &str| Request {
        version: PROTOCOL_VERSION,
        command: Command::Add,
        container_id: format!("sandbox-{name}"),
        netns: Some(netns.into()),
        ifname: "eth0".into(),
        pod_namespace: "shop".into(),
        pod_name: name.into(),
        pod_uid: Some(format!("uid-{name}")),
        ips: vec!["10.244.1.50".parse().unwrap()],
    };
    let call = |req: Request, socket: &Path| {
        let socket = socket.to_path_buf();
        tokio::task::spawn_blocking(move || {
            tlsmesh_cni::client::call(&socket, &req, Duration::from_secs(10))
        })
    };
    let answer = call(add("new", "/var/run/netns/cni-new"), &socket).await.unwrap().unwrap();
    assert_eq!(answer, Response::Enrolled { mode: "strict netns=/var/run/netns/cni-new".into() });

    let mut rx2 = start(&api, Options::new(Some(NODE.into()), "cluster.local"));
    let plain = until(&mut rx2, "plain watcher", |i| i.pods.contains_key("shop/new")).await;
    assert_eq!(plain.pods["shop/new"].netns, None, "without the CNI record the netns is unknown");

    // Unknown pod: the daemon answers with an error after its timeout.
    let answer = call(add("ghost", "/var/run/netns/cni-ghost"), &socket).await.unwrap().unwrap();
    assert!(
        matches!(answer, Response::Error { ref message } if message.contains("shop/ghost")),
        "{answer:?}"
    );

    let mut del = add("new", "");
    del.command = Command::Del;
    assert_eq!(call(del, &socket).await.unwrap().unwrap(), Response::Ok);
    assert!(pods.get("shop/new").is_none());
    let _ = std::fs::remove_dir_all(&dir);
}
