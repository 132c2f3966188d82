//! The CA server in a cluster, against a fake API server: nodes join with
//! their projected `ServiceAccount` token, which `TokenReview` maps to the
//! node the daemon's pod runs on, and get workload certificates only for
//! identities the CA's own watcher (`run` with `node: None`) places there.
//!
//! On the fake because node-a's daemon token carries the node-name extra of
//! Kubernetes 1.30+, which the real tests' 1.20 server cannot issue, and the
//! tests read back what the CA sent (`review_requests`). The `TokenReview`
//! paths themselves (pod-bound tokens, refusals, 403) run against a real
//! kube-apiserver in `real_tokenreview.rs`.

// `Duration::from_hours` needs Rust 1.91; the workspace MSRV is 1.85.
#![allow(clippy::duration_suboptimal_units, reason = "MSRV 1.85 lacks Duration::from_hours")]

mod support;

use std::{net::SocketAddr, sync::Arc, time::Duration};

use serde_json::json;
use support::{namespace, pod, FakeApi, NAMESPACES, PODS};
use tlsmesh_identity::{
    authz::SharedPlacement,
    ca::{Ca, SharedCa, MIN_LIFETIME},
    client::{CaClient, CaClientConfig, ClientError},
    keys::{CertInfo, PrivateKey},
    protocol::ErrorKind,
    server::{CaServer, CaServerConfig},
    trust::TrustBundle,
    Identity, NodeId, SpiffeId,
};
use tlsmesh_inventory::Inventory;
use tlsmesh_k8s::tokenreview::{
    follow_placement, TokenReviewAuthenticator, DEFAULT_AUDIENCE, NODE_NAME_EXTRA, POD_NAME_EXTRA,
    POD_UID_EXTRA,
};
use tokio::{net::TcpListener, sync::watch};

const TD: &str = "cluster.local";
const DAEMON: &str = "system:serviceaccount:tlsmesh-system:tlsmesh-node";

struct Cluster {
    api: FakeApi,
    addr: SocketAddr,
    root: TrustBundle,
    placement: SharedPlacement,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The fake cluster: `shop/web` on node-a, `shop/db` on node-b, daemon
/// tokens for both nodes; and the CA wired as `tlsmesh ca serve
/// --inventory-source kubernetes --node-auth kubernetes` wires it.
async fn start() -> Cluster {
    let api = FakeApi::start().await;
    api.apply(NAMESPACES, namespace("shop", Some("strict")));
    api.apply(PODS, pod("shop", "web", "node-a", Some("10.244.1.5")));
    api.apply(PODS, pod("shop", "db", "node-b", Some("10.244.2.7")));
    // node-a's daemon: Kubernetes 1.30+ names the node in the token.
    api.set_review(
        "t-daemon-node-a",
        json!({"authenticated": true, "audiences": [DEFAULT_AUDIENCE],
            "user": {"username": DAEMON, "extra": {NODE_NAME_EXTRA: ["node-a"], POD_NAME_EXTRA: ["tlsmesh-node-a1"], POD_UID_EXTRA: ["uid-tlsmesh-node-a1"]}}}),
    );
    // node-b's daemon: older API server, the node comes from the bound pod.
    api.apply(PODS, pod("tlsmesh-system", "tlsmesh-node-b1", "node-b", Some("192.168.56.12")));
    api.set_review(
        "t-daemon-node-b",
        json!({"authenticated": true, "audiences": [DEFAULT_AUDIENCE],
            "user": {"username": DAEMON, "extra": {POD_NAME_EXTRA: ["tlsmesh-node-b1"], POD_UID_EXTRA: ["uid-tlsmesh-node-b1"]}}}),
    );

    // Placement from the CA's own watcher.
    let placement = SharedPlacement::default();
    let (tx, rx) = watch::channel(Inventory::default());
    let watcher =
        tokio::spawn(tlsmesh_k8s::run(api.client(), tlsmesh_k8s::Options::new(None, TD), tx));
    let follower = tokio::spawn(follow_placement(rx, placement.clone()));
    let web = id("shop", "web");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while placement.current().nodes(&web).next().is_none() {
        assert!(tokio::time::Instant::now() < deadline, "the CA's watcher never placed shop/web");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let (ca, _) = Ca::generate_root(TD, Duration::from_secs(86_400)).unwrap();
    let root = TrustBundle::new(TD, ca.roots().to_vec()).unwrap();
    let auth = TokenReviewAuthenticator::new(api.client(), DEFAULT_AUDIENCE, vec![DAEMON.into()]);
    let config = CaServerConfig {
        server_names: vec!["localhost".into()],
        workload_lifetime: MIN_LIFETIME,
        request_timeout: Duration::from_secs(5),
        ..CaServerConfig::default()
    };
    let server = Arc::new(CaServer::with_authenticator(
        SharedCa::new(ca),
        placement.clone(),
        Arc::new(auth),
        config,
    ));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let serving = tokio::spawn(server.serve(listener));
    Cluster { api, addr, root, placement, tasks: vec![watcher, follower, serving] }
}

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

fn client(c: &Cluster, node: &str) -> CaClient {
    CaClient::new(CaClientConfig {
        addr: c.addr.to_string(),
        server_name: "localhost".into(),
        trust: TrustBundle::new(TD, c.root.roots()).unwrap(),
        node: node.into(),
        timeout: Duration::from_secs(5),
    })
    .unwrap()
}

fn refused(err: &ClientError) -> (ErrorKind, &str) {
    match err {
        ClientError::Refused { kind, message } => (*kind, message.as_str()),
        other => panic!("expected a refusal from the CA, got: {other}"),
    }
}

/// Requests a workload certificate for `id` with a fresh key.
async fn request(a: &CaClient, id: &SpiffeId) -> Result<CertInfo, ClientError> {
    let key = PrivateKey::generate().unwrap();
    let csr = key.csr_pem(&Identity::Workload(id.clone())).unwrap();
    let chain = a.request(&csr, id).await?;
    let certified = key.certified_key(&chain).unwrap();
    Ok(CertInfo::from_der(&certified.cert[0]).unwrap())
}

#[tokio::test]
async fn node_joins_with_its_daemon_token_and_gets_only_its_pods() {
    let c = start().await;
    let a = client(&c, "node-a");

    // The token TokenReview maps to node-a: a node certificate for node-a.
    let node = a.join("t-daemon-node-a").await.unwrap();
    assert_eq!(node.identity, Identity::Node(NodeId::new(TD, "node-a").unwrap()));
    let sent = c.api.review_requests();
    assert_eq!(sent.last().unwrap()["spec"]["token"], "t-daemon-node-a");
    assert_eq!(sent.last().unwrap()["spec"]["audiences"], json!([DEFAULT_AUDIENCE]));

    // shop/web runs on node-a: issued.
    let web = id("shop", "web");
    let info = request(&a, &web).await.unwrap();
    assert_eq!(info.identity, Identity::Workload(web));

    // shop/db runs only on node-b: refused, and the message says where it runs.
    let err = request(&a, &id("shop", "db")).await.unwrap_err();
    let (kind, message) = refused(&err);
    assert_eq!(kind, ErrorKind::Denied);
    assert!(message.contains("node node-a") && message.contains("[\"node-b\"]"), "{message}");

    // A pod of shop/db scheduled onto node-a later: the watcher updates the
    // placement and the same request is allowed.
    let mut db2 = pod("shop", "db-2", "node-a", Some("10.244.1.9"));
    db2["spec"]["serviceAccountName"] = json!("db");
    c.api.apply(PODS, db2);
    let db = id("shop", "db");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !c.placement.current().nodes(&db).any(|n| n == "node-a") {
        assert!(tokio::time::Instant::now() < deadline, "placement never followed the watcher");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    request(&a, &db).await.unwrap();
}

#[tokio::test]
async fn node_name_comes_from_the_api_server_when_the_token_has_none() {
    let c = start().await;
    // node-b's token carries only the pod; the CA reads the pod's node.
    let b = client(&c, "node-b");
    b.join("t-daemon-node-b").await.unwrap();
    request(&b, &id("shop", "db")).await.unwrap();
    let (kind, _) = refused(&request(&b, &id("shop", "web")).await.unwrap_err());
    assert_eq!(kind, ErrorKind::Denied);
}

#[tokio::test]
async fn joins_that_do_not_prove_the_claimed_node_are_refused() {
    let c = start().await;

    // node-b's daemon token, presented by a daemon claiming to be node-a.
    let fake_a = client(&c, "node-a");
    let err = fake_a.join("t-daemon-node-b").await.unwrap_err();
    let (kind, message) = refused(&err);
    assert_eq!(kind, ErrorKind::Unauthenticated);
    assert!(
        message.contains("join refused for node \"node-a\"")
            && message.contains("belongs to another node"),
        "{message}"
    );
    assert!(fake_a.node_certificate().is_none());
    // It cannot ask for node-a's workloads either.
    assert!(matches!(request(&fake_a, &id("shop", "web")).await, Err(ClientError::NotJoined)));

    // A token the API server does not authenticate.
    let err = fake_a.join("not-a-service-account-token").await.unwrap_err();
    let (kind, message) = refused(&err);
    assert_eq!(kind, ErrorKind::Unauthenticated);
    assert!(
        message.contains("join refused for node \"node-a\": wrong or unknown join token"),
        "{message}"
    );

    // A workload's own token (authenticated, but not the daemon's account).
    c.api.set_review(
        "t-workload",
        json!({"authenticated": true, "audiences": [DEFAULT_AUDIENCE],
            "user": {"username": "system:serviceaccount:shop:web", "extra": {NODE_NAME_EXTRA: ["node-a"]}}}),
    );
    let (kind, _) = refused(&fake_a.join("t-workload").await.unwrap_err());
    assert_eq!(kind, ErrorKind::Unauthenticated);

    // The CA may not create TokenReviews: not the node's fault, so "retry".
    c.api.forbid("tokenreviews");
    let err = fake_a.join("t-daemon-node-a").await.unwrap_err();
    let (kind, message) = refused(&err);
    assert_eq!(kind, ErrorKind::Internal);
    assert!(message.contains("could not be checked right now; retry"), "{message}");
    c.api.allow("tokenreviews");
    fake_a.join("t-daemon-node-a").await.unwrap();
}
