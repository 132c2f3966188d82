//! The CA's `TokenReview` authentication against a fake API server, for
//! what the real 1.20 kube-apiserver of `real_tokenreview.rs` cannot answer:
//! tokens that carry the `authentication.kubernetes.io/node-name` extra
//! (Kubernetes 1.30+). Pod-bound tokens, refusals and a real 403 run
//! against the real server there.

mod support;

use serde_json::json;
use support::FakeApi;
use tlsmesh_k8s::tokenreview::{
    authorize_identity, NodeDaemon, TokenReviewAuthenticator, DEFAULT_AUDIENCE, NODE_NAME_EXTRA,
    POD_NAME_EXTRA, POD_UID_EXTRA,
};

const DAEMON: &str = "system:serviceaccount:tlsmesh-system:tlsmesh-node";

fn authenticator(api: &FakeApi) -> TokenReviewAuthenticator {
    TokenReviewAuthenticator::new(api.client(), DEFAULT_AUDIENCE, vec![DAEMON.into()])
}

// The node-name extra exists from Kubernetes 1.30; the real tests' 1.20
// server cannot produce it, so this stays on the fake.
#[tokio::test]
async fn node_name_from_the_token() {
    let api = FakeApi::start().await;
    api.set_review(
        "t-node-a",
        json!({"authenticated": true, "audiences": [DEFAULT_AUDIENCE],
            "user": {"username": DAEMON, "extra": {NODE_NAME_EXTRA: ["node-a"], POD_NAME_EXTRA: ["tlsmesh-node-x1"], POD_UID_EXTRA: ["u1"]}}}),
    );
    let who = authenticator(&api).authenticate("t-node-a").await.unwrap();
    assert_eq!(
        who,
        NodeDaemon {
            node: "node-a".into(),
            username: DAEMON.into(),
            pod: Some("tlsmesh-system/tlsmesh-node-x1".into())
        }
    );
    let sent = &api.review_requests()[0];
    assert_eq!(sent["spec"]["token"], "t-node-a");
    assert_eq!(
        sent["spec"]["audiences"],
        json!([DEFAULT_AUDIENCE]),
        "the CA asks for its own audience"
    );
}

// A 1.30+ API server names the node in the token (the node-name extra);
// the 1.20 server of the real tests cannot, so this stays on the fake.
#[tokio::test]
async fn authenticated_node_gets_only_its_pods_identities() {
    let api = FakeApi::start().await;
    api.set_review(
        "t-node-a",
        json!({"authenticated": true, "audiences": [DEFAULT_AUDIENCE], "user": {"username": DAEMON, "extra": {NODE_NAME_EXTRA: ["node-a"]}}}),
    );
    let who = authenticator(&api).authenticate("t-node-a").await.unwrap();
    let (inv, _) = tlsmesh_inventory::parse(
        r#"
        [[node]]
        name = "node-a"
        [[node]]
        name = "node-b"
        [[pod]]
        name = "web"
        namespace = "shop"
        service_account = "web"
        node = "node-a"
        [[pod]]
        name = "db"
        namespace = "shop"
        service_account = "db"
        node = "node-b"
        "#,
    )
    .unwrap();
    assert!(authorize_identity(&inv, &who.node, "spiffe://cluster.local/ns/shop/sa/web").is_ok());
    let e =
        authorize_identity(&inv, &who.node, "spiffe://cluster.local/ns/shop/sa/db").unwrap_err();
    assert!(e.to_string().contains("run only on [\"node-b\"]"), "{e}");
}
