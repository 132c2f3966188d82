//! `tlsmesh_k8s::policy::run` against a real kube-apiserver (v1.20.2, see
//! kubeharness/): tlsmesh's `L4Policy` CRD (deploy/manifests/crds.yaml) and
//! stand-ins for Istio's CRDs (tests/fixtures/istio-crds.yaml) installed,
//! objects created, changed and deleted, pod labels flipped, and the
//! published `MeshPolicy` followed live; an unsupported field is reported;
//! CRDs that are not installed are reported, then picked up when installed
//! (at `v1beta1` when that is all Istio's CRD serves).

mod real;

use std::{path::Path, time::Duration};

use kube::{
    api::{DynamicObject, PostParams},
    Api, Client,
};
use real::{
    authorization_policies, create_object as create, delete_object as delete, install_crds,
    l4_policies, label_pod, merge_object as merge, namespace, node, peer_authentications, pod,
    resource, run_pod, service_account, yaml_docs, WAIT,
};
use serde_json::json;
use tlsmesh_inventory::{Inventory, Mode};
use tlsmesh_k8s::{
    policy::{run, PolicyOptions},
    Options,
};
use tlsmesh_kube_harness::ControlPlane;
use tlsmesh_policy::{
    mesh::{MeshPolicy, MtlsMode, Request},
    Decision, Destination, Source,
};
use tokio::sync::watch;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

async fn until(
    rx: &mut watch::Receiver<MeshPolicy>,
    what: &str,
    cond: impl FnMut(&MeshPolicy) -> bool,
) -> MeshPolicy {
    let found = match tokio::time::timeout(WAIT, rx.wait_for(cond)).await {
        Ok(Ok(p)) => Some(p.clone()),
        _ => None,
    };
    found.unwrap_or_else(|| {
        panic!("timed out after {WAIT:?} waiting for {what}; last policy: {:#?}", *rx.borrow())
    })
}

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const EXP: &str = "spiffe://cluster.local/ns/lab/sa/exp";

/// Whether `id` may reach shop/`pod` (service account = pod name) on `port`.
fn allows(p: &MeshPolicy, id: &str, pod: &str, port: u16) -> bool {
    let ns = id.split('/').nth(4).unwrap();
    let r = Request {
        source: Source { identity: Some(id), namespace: Some(ns) },
        source_ip: Some("10.244.1.2".parse().unwrap()),
        destination: Destination { namespace: "shop", pod, service_account: pod, port },
    };
    p.decide(&r) == Decision::Allow
}

async fn pods(c: &Client) {
    namespace(c, "shop", Some("strict")).await;
    node(c, "node-a", "192.168.56.11").await;
    for (sa, ip) in [("web", "10.244.1.2"), ("db", "10.244.1.3")] {
        service_account(c, "shop", sa).await;
        pod(c, "shop", sa, "node-a", sa, json!({"app": sa})).await;
        run_pod(c, "shop", sa, ip).await;
    }
}

#[tokio::test]
#[expect(clippy::too_many_lines, reason = "one scenario: create, change, delete, check after each")]
async fn real_apiserver_policy_objects_are_followed_live() {
    let cp = ControlPlane::start().await;
    let c = cp.client();
    let mut crds = yaml_docs(&repo("../deploy/manifests/crds.yaml"));
    crds.extend(yaml_docs(&repo("tests/fixtures/istio-crds.yaml")));
    install_crds(&c, crds).await;
    pods(&c).await;
    namespace(&c, "istio-system", None).await;
    let (tx, mut rx) = watch::channel(MeshPolicy::default());
    tokio::spawn(run(c.clone(), PolicyOptions::default(), tx));
    // The inventory watcher takes its modes from the same policy.
    let (itx, mut inv) = watch::channel(Inventory::default());
    let opts = Options {
        policy: Some(rx.clone()),
        ..Options::new(Some("node-a".into()), "cluster.local")
    };
    tokio::spawn(tlsmesh_k8s::run(c.clone(), opts, itx));
    rx.changed().await.expect("a first policy");
    let p = rx.borrow().clone();
    assert!(p.authorizations.is_empty() && p.problems.is_empty(), "{p:#?}");

    // ALLOW to app=db from web on 5432.
    let aps = authorization_policies(&c, "shop");
    create(
        &aps,
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "db"},
        "spec": {"selector": {"matchLabels": {"app": "db"}}, "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}],
                       "to": [{"operation": {"ports": ["5432"]}}]}]}}),
    )
    .await;
    let p = until(&mut rx, "the ALLOW policy", |p| !p.authorizations.is_empty()).await;
    assert!(allows(&p, WEB, "db", 5432));
    assert!(!allows(&p, EXP, "db", 5432) && !allows(&p, WEB, "db", 22));
    assert!(allows(&p, EXP, "web", 80), "web is not selected");

    // A pod label flip moves the selector.
    label_pod(&c, "shop", "web", json!({"app": "db"})).await;
    let p = until(&mut rx, "web selected too", |p| !allows(p, EXP, "web", 80)).await;
    assert!(allows(&p, WEB, "web", 5432));
    label_pod(&c, "shop", "web", json!({"app": "web"})).await;
    until(&mut rx, "web no longer selected", |p| allows(p, EXP, "web", 80)).await;

    // An HTTP field makes the rule a reported problem that never matches.
    merge(
        &aps,
        "db",
        json!({"spec": {"rules": [{
        "from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}],
        "to": [{"operation": {"ports": ["5432"], "methods": ["GET"]}}]}]}}),
    )
    .await;
    let p = until(&mut rx, "the methods problem", |p| !p.problems.is_empty()).await;
    assert_eq!(p.problems.len(), 1, "{:#?}", p.problems);
    assert_eq!(p.problems[0].subject, "AuthorizationPolicy shop/db");
    assert!(p.problems[0].message.contains("operation.methods"), "{}", p.problems[0].message);
    assert!(!allows(&p, WEB, "db", 5432), "fails closed");

    // tlsmesh's own kind: a DENY from lab to the whole namespace.
    create(
        &l4_policies(&c, "shop"),
        json!({"apiVersion": "tlsmesh.io/v1alpha1", "kind": "L4Policy",
        "metadata": {"name": "no-lab"}, "spec": {"action": "deny", "fromNamespaces": ["lab"]}}),
    )
    .await;
    let p = until(&mut rx, "the L4Policy", |p| p.authorizations.len() == 2).await;
    assert!(!allows(&p, EXP, "web", 80));
    assert!(
        p.decide(&Request {
            source: tlsmesh_policy::Source { identity: Some(EXP), namespace: Some("lab") },
            source_ip: None,
            destination: Destination {
                namespace: "shop",
                pod: "web",
                service_account: "web",
                port: 80
            },
        }) == Decision::Deny("denied by L4Policy shop/no-lab".into())
    );
    // The CRD's schema refuses what the code would not read.
    let bad: DynamicObject = serde_json::from_value(json!({"apiVersion": "tlsmesh.io/v1alpha1",
        "kind": "L4Policy", "metadata": {"name": "bad"}, "spec": {"action": "maybe"}}))
    .unwrap();
    assert!(l4_policies(&c, "shop").create(&PostParams::default(), &bad).await.is_err());
    // A typo is kept (not pruned) and reported; the allow fails closed.
    create(&l4_policies(&c, "shop"), json!({"apiVersion": "tlsmesh.io/v1alpha1", "kind": "L4Policy",
        "metadata": {"name": "typo"}, "spec": {"action": "allow", "pods": ["web"], "fromNamespace": ["lab"]}}))
    .await;
    let p = until(&mut rx, "the typo reported", |p| {
        p.problems.iter().any(|x| x.subject == "L4Policy shop/typo")
    })
    .await;
    assert!(
        p.problems.iter().any(|x| x.message.contains("spec.fromNamespace")),
        "{:#?}",
        p.problems
    );
    assert!(!allows(&p, WEB, "web", 80), "web is default-deny, the allow matches nothing");
    delete(&l4_policies(&c, "shop"), "typo").await;
    until(&mut rx, "the typo gone", |p| p.authorizations.len() == 2).await;

    // PeerAuthentication: mesh-wide STRICT, shop PERMISSIVE.
    create(&peer_authentications(&c, "istio-system"), json!({"apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication", "metadata": {"name": "default"}, "spec": {"mtls": {"mode": "STRICT"}}}))
    .await;
    create(&peer_authentications(&c, "shop"), json!({"apiVersion": "security.istio.io/v1",
        "kind": "PeerAuthentication", "metadata": {"name": "default"}, "spec": {"mtls": {"mode": "PERMISSIVE"}}}))
    .await;
    let p =
        until(&mut rx, "both modes", |p| p.mesh_mode.is_some() && !p.namespace_modes.is_empty())
            .await;
    assert_eq!(p.mode_override("shop"), Some(MtlsMode::Permissive));
    assert_eq!(p.mode_override("lab"), Some(MtlsMode::Strict));
    let mode = |i: &Inventory| i.pods.get("shop/db").and_then(|p| p.mode);
    real::until(&mut inv, "shop/db permissive by PeerAuthentication", |i| {
        mode(i) == Some(Mode::Permissive)
    })
    .await;

    // Deletions.
    delete(&aps, "db").await;
    delete(&peer_authentications(&c, "shop"), "default").await;
    let p = until(&mut rx, "the AuthorizationPolicy and shop's mode gone", |p| {
        p.authorizations.len() == 1 && p.namespace_modes.is_empty()
    })
    .await;
    assert!(p.problems.is_empty(), "the problem went with its object: {:#?}", p.problems);
    assert!(allows(&p, WEB, "db", 5432));
    assert_eq!(p.mode_override("shop"), Some(MtlsMode::Strict));
    real::until(&mut inv, "shop/db strict (mesh-wide)", |i| mode(i) == Some(Mode::Strict)).await;
    delete(&peer_authentications(&c, "istio-system"), "default").await;
    delete(&l4_policies(&c, "shop"), "no-lab").await;
    until(&mut rx, "nothing left", |p| *p == MeshPolicy::default()).await;
    assert_eq!(mode(&inv.borrow()), Some(Mode::Strict), "the namespace label's again");
}

#[tokio::test]
async fn real_apiserver_policy_crds_not_installed_are_reported_then_picked_up() {
    let cp = ControlPlane::start().await;
    let c = cp.client();
    pods(&c).await;
    let (tx, mut rx) = watch::channel(MeshPolicy::default());
    let opts = PolicyOptions { recheck: Duration::from_secs(1), ..PolicyOptions::default() };
    tokio::spawn(run(c.clone(), opts, tx));
    let p =
        until(&mut rx, "a policy with the three kinds reported", |p| p.problems.len() == 3).await;
    assert!(p.authorizations.is_empty());
    let subjects: Vec<&str> = p.problems.iter().map(|x| x.subject.as_str()).collect();
    assert_eq!(
        subjects,
        ["watch of L4Policy", "watch of AuthorizationPolicy", "watch of PeerAuthentication"]
    );
    assert!(
        p.problems[1]
            .message
            .contains("authorizationpolicies.security.istio.io (v1, v1beta1) is not served"),
        "{}",
        p.problems[1].message
    );

    // Istio's AuthorizationPolicy as an older Istio serves it: v1beta1 only.
    let mut istio = yaml_docs(&repo("tests/fixtures/istio-crds.yaml"));
    istio.truncate(1);
    istio[0]["spec"]["versions"][0]["served"] = json!(false);
    istio[0]["spec"]["versions"][0]["storage"] = json!(false);
    istio[0]["spec"]["versions"][1]["storage"] = json!(true);
    install_crds(&c, istio).await;
    let r =
        resource("security.istio.io", "v1beta1", "AuthorizationPolicy", "authorizationpolicies");
    create(
        &Api::namespaced_with(c.clone(), "shop", &r),
        json!({"apiVersion": "security.istio.io/v1beta1",
        "kind": "AuthorizationPolicy", "metadata": {"name": "deny-all"}, "spec": {}}),
    )
    .await;
    let p = until(&mut rx, "the v1beta1 policy", |p| !p.authorizations.is_empty()).await;
    assert!(!allows(&p, WEB, "db", 1), "an empty ALLOW policy allows nothing");
    let subjects: Vec<&str> = p.problems.iter().map(|x| x.subject.as_str()).collect();
    assert_eq!(subjects, ["watch of L4Policy", "watch of PeerAuthentication"]);
}
