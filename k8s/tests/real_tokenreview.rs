//! The CA's `TokenReview` authentication against a real kube-apiserver
//! (v1.20.2): tokens from the `TokenRequest` API bound to a daemon pod, the
//! legacy token `Secret` the controller-manager creates, and the refusals a
//! real server produces (wrong audience, unbound token, a workload's token,
//! a deleted pod, an authenticator without RBAC for `tokenreviews`).
//!
//! A 1.20 token carries the pod's name and uid but not its node (the
//! `authentication.kubernetes.io/node-name` extra arrived in 1.30), so the
//! node always comes from the bound pod here; the node-name path stays on
//! the fake server (`tokenreview_api.rs`).

mod real;

use real::{delete_pod, grant_read, namespace, pod, service_account, token_request};
use serde_json::json;
use tlsmesh_k8s::tokenreview::{AuthError, NodeDaemon, TokenReviewAuthenticator, DEFAULT_AUDIENCE};
use tlsmesh_kube_harness::ControlPlane;

const DAEMON: &str = "system:serviceaccount:tlsmesh-system:tlsmesh-node";

fn authenticator(client: kube::Client) -> TokenReviewAuthenticator {
    TokenReviewAuthenticator::new(client, DEFAULT_AUDIENCE, vec![DAEMON.into()])
}

/// `tlsmesh-system/tlsmesh-node-b1` (the daemon pod on node-b) and
/// `shop/web` (a workload on node-b); returns the daemon pod's uid.
async fn cluster(c: &kube::Client) -> String {
    namespace(c, "tlsmesh-system", None).await;
    service_account(c, "tlsmesh-system", "tlsmesh-node").await;
    namespace(c, "shop", Some("strict")).await;
    service_account(c, "shop", "web").await;
    pod(c, "shop", "web", "node-b", "web", json!({})).await;
    let p = pod(c, "tlsmesh-system", "tlsmesh-node-b1", "node-b", "tlsmesh-node", json!({})).await;
    p.metadata.uid.expect("the server sets a uid")
}

#[tokio::test]
async fn real_apiserver_tokenreview_names_the_node_of_the_bound_pod() {
    let cp = ControlPlane::start().await;
    let c = cp.client();
    let uid = cluster(&c).await;
    let token = token_request(
        &c,
        "tlsmesh-system",
        "tlsmesh-node",
        &[DEFAULT_AUDIENCE],
        Some(("tlsmesh-node-b1", &uid)),
    )
    .await;
    let who = authenticator(c.clone()).authenticate(&token).await.unwrap();
    assert_eq!(
        who,
        NodeDaemon {
            node: "node-b".into(),
            username: DAEMON.into(),
            pod: Some("tlsmesh-system/tlsmesh-node-b1".into())
        }
    );

    // The pod is deleted, and another one of the same name created: the
    // API server no longer authenticates the old pod's token.
    delete_pod(&c, "tlsmesh-system", "tlsmesh-node-b1").await;
    pod(&c, "tlsmesh-system", "tlsmesh-node-b1", "node-a", "tlsmesh-node", json!({})).await;
    let e = authenticator(c.clone()).authenticate(&token).await.unwrap_err();
    assert!(
        matches!(e, AuthError::NotAuthenticated(_) | AuthError::PodGone { .. }),
        "a token of a deleted pod must not name the new pod's node: {e}"
    );
}

#[tokio::test]
async fn real_apiserver_tokenreview_refusals() {
    let cp = ControlPlane::start().await;
    let c = cp.client();
    let uid = cluster(&c).await;
    let auth = authenticator(c.clone());

    let e = auth.authenticate("garbage").await.unwrap_err();
    assert!(matches!(e, AuthError::NotAuthenticated(_)), "{e}");

    // The daemon's token for another audience (the API server's own).
    let other_aud = token_request(
        &c,
        "tlsmesh-system",
        "tlsmesh-node",
        &["https://kubernetes.default.svc.cluster.local"],
        Some(("tlsmesh-node-b1", &uid)),
    )
    .await;
    let e = auth.authenticate(&other_aud).await.unwrap_err();
    assert!(matches!(e, AuthError::NotAuthenticated(_) | AuthError::Audience { .. }), "{e}");

    // The legacy token Secret (no audience, bound to nothing).
    let legacy = cp.service_account_token("tlsmesh-system", "tlsmesh-node").await;
    let e = auth.authenticate(&legacy).await.unwrap_err();
    assert!(
        matches!(
            e,
            AuthError::NotAuthenticated(_) | AuthError::Audience { .. } | AuthError::Unbound { .. }
        ),
        "{e}"
    );

    // The right audience, but bound to no pod: nothing says where it runs.
    let unbound =
        token_request(&c, "tlsmesh-system", "tlsmesh-node", &[DEFAULT_AUDIENCE], None).await;
    let e = auth.authenticate(&unbound).await.unwrap_err();
    assert!(matches!(e, AuthError::Unbound { .. }), "{e}");

    // A workload's token, bound to its pod: authenticated, but not a daemon.
    let web_uid = kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(c.clone(), "shop")
        .get("web")
        .await
        .unwrap()
        .metadata
        .uid
        .unwrap();
    let workload =
        token_request(&c, "shop", "web", &[DEFAULT_AUDIENCE], Some(("web", &web_uid))).await;
    let e = auth.authenticate(&workload).await.unwrap_err();
    assert!(matches!(e, AuthError::NotDaemon { .. }), "{e}");

    // A CA whose ServiceAccount may not create TokenReviews: a real 403.
    namespace(&c, "ca", None).await;
    service_account(&c, "ca", "tlsmesh-ca").await;
    grant_read(&c, "tlsmesh-ca-reader", "ca", "tlsmesh-ca", &[("", "pods")]).await;
    let ca_token = cp.service_account_token("ca", "tlsmesh-ca").await;
    let weak = authenticator(cp.client_for_token("tlsmesh-ca", &ca_token).await);
    let good = token_request(
        &c,
        "tlsmesh-system",
        "tlsmesh-node",
        &[DEFAULT_AUDIENCE],
        Some(("tlsmesh-node-b1", &uid)),
    )
    .await;
    let e = weak.authenticate(&good).await.unwrap_err();
    assert!(matches!(&e, AuthError::Api(kube::Error::Api(s)) if s.code == 403), "{e}");
    assert!(e.is_unavailable(), "not the node's fault: the CA says retry");
    assert!(e.to_string().contains("create` on tokenreviews"), "{e}");
}
