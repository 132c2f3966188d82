//! `tlsmesh_k8s::run` against a fake API server, for what a real one will
//! not do on demand: a `410 Gone` that forces a re-list (and a silently
//! dropped watch), and an API server that serves no endpoints resource at
//! all. List + watch, label flips, deletions, Services, RBAC that holds
//! back the first publication and the CNI flow run against a real
//! kube-apiserver in `real_watch.rs`.

mod support;

use std::{net::SocketAddr, time::Duration};

use support::{
    namespace, node, pod, service, slice, FakeApi, NAMESPACES, NODES, PODS, SERVICES, SLICES,
};
use tlsmesh_inventory::{Inventory, Mode, Problem};
use tlsmesh_k8s::{run, watch::UNSERVED_ENDPOINTS, Options};
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

// A real API server sends 410 Gone only when etcd has compacted past the
// client's version, which a test cannot bring about on demand: fake.
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

// A real API server serves v1 Endpoints in every version, so "nothing
// served" exists only on the fake (real_watch.rs covers 1.20's v1beta1
// slices and the v1 Endpoints fallback for real).
#[tokio::test]
async fn no_endpoints_source_served_is_a_problem_not_a_hang() {
    let api = cluster().await;
    api.unserve(SLICES);
    let (ptx, mut prx) = watch::channel(Vec::<Problem>::new());
    let opts = Options { problems: Some(ptx), ..Options::new(Some(NODE.into()), "cluster.local") };
    let mut rx = start(&api, opts);
    let inv = until(&mut rx, "published without endpoints", |i| !i.pods.is_empty()).await;
    assert_eq!(mode(&inv, "shop/web"), Some(Some(Mode::Strict)));
    let vip: SocketAddr = "10.96.0.20:5432".parse().unwrap();
    assert_eq!(inv.services[&vip].endpoints, [], "no endpoints source: no backends");
    let problems = tokio::time::timeout(Duration::from_secs(15), prx.wait_for(|p| !p.is_empty()))
        .await
        .expect("the unserved kind is reported")
        .unwrap()
        .clone();
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert_eq!(problems[0].message, UNSERVED_ENDPOINTS);
}

// Defect 11 of the daemon-core issue: watch failures were only logged. A
// forbidden kind is now a problem the daemon shows in `/config_dump`, and
// it clears once the kind can be listed. (A real server forbids by RBAC
// too; the fake makes the flip from forbidden to allowed instant.)
#[tokio::test]
async fn a_forbidden_kind_is_reported_until_it_can_be_listed() {
    let api = cluster().await;
    api.forbid(PODS);
    let (ptx, mut prx) = watch::channel(Vec::<Problem>::new());
    let opts = Options { problems: Some(ptx), ..Options::new(Some(NODE.into()), "cluster.local") };
    let mut rx = start(&api, opts);
    let problems = tokio::time::timeout(
        Duration::from_secs(15),
        prx.wait_for(|p| p.iter().any(|x| x.subject == "watch of Pod")),
    )
    .await
    .expect("the forbidden kind is reported")
    .unwrap()
    .clone();
    let text = format!("{problems:?}");
    assert!(text.contains("forbidden") && text.contains("deploy/rbac.yaml"), "{text}");
    api.allow(PODS);
    until(&mut rx, "the first inventory once pods can be listed", |i| !i.pods.is_empty()).await;
    tokio::time::timeout(
        Duration::from_secs(30),
        prx.wait_for(|p| !p.iter().any(|x| x.subject == "watch of Pod")),
    )
    .await
    .expect("the problem clears")
    .unwrap();
}
