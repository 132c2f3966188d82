//! The CA's `TokenReview` authentication against a fake API server.

mod support;

use serde_json::json;
use support::{pod, FakeApi, PODS};
use tlsmesh_k8s::tokenreview::{
    authorize_identity, AuthError, NodeDaemon, TokenReviewAuthenticator, DEFAULT_AUDIENCE,
    NODE_NAME_EXTRA, POD_NAME_EXTRA, POD_UID_EXTRA,
};

const DAEMON: &str = "system:serviceaccount:tlsmesh-system:tlsmesh-node";

fn authenticator(api: &FakeApi) -> TokenReviewAuthenticator {
    TokenReviewAuthenticator::new(api.client(), DEFAULT_AUDIENCE, vec![DAEMON.into()])
}

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

#[tokio::test]
async fn node_name_from_the_bound_pod_when_the_token_has_none() {
    let api = FakeApi::start().await;
    api.apply(PODS, pod("tlsmesh-system", "tlsmesh-node-x2", "node-b", Some("192.168.56.12")));
    let bound = |uid: &str| {
        json!({"authenticated": true, "audiences": [DEFAULT_AUDIENCE],
            "user": {"username": DAEMON, "extra": {POD_NAME_EXTRA: ["tlsmesh-node-x2"], POD_UID_EXTRA: [uid]}}})
    };
    api.set_review("t-old-k8s", bound("uid-tlsmesh-node-x2"));
    let who = authenticator(&api).authenticate("t-old-k8s").await.unwrap();
    assert_eq!(who.node, "node-b");

    // Same pod name, another uid: the token belonged to a pod that is gone.
    api.set_review("t-stale", bound("uid-of-a-deleted-pod"));
    let e = authenticator(&api).authenticate("t-stale").await.unwrap_err();
    assert!(matches!(e, AuthError::PodGone { .. }), "{e}");
}

#[tokio::test]
async fn refusals() {
    let api = FakeApi::start().await;
    let e = authenticator(&api).authenticate("garbage").await.unwrap_err();
    assert!(e.to_string().contains("invalid bearer token"), "{e}");

    api.set_review(
        "t-workload",
        json!({"authenticated": true, "audiences": [DEFAULT_AUDIENCE],
            "user": {"username": "system:serviceaccount:shop:web", "extra": {NODE_NAME_EXTRA: ["node-a"]}}}),
    );
    let e = authenticator(&api).authenticate("t-workload").await.unwrap_err();
    assert!(
        matches!(e, AuthError::NotDaemon { .. }),
        "a workload's token cannot claim a node: {e}"
    );

    api.forbid("tokenreviews");
    let e = authenticator(&api).authenticate("t-workload").await.unwrap_err();
    assert!(matches!(e, AuthError::Api(_)), "{e}");
    assert!(e.to_string().contains("create` on tokenreviews"), "{e}");
}

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
