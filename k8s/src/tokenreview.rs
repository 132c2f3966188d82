//! The CA's authentication of node daemons in a cluster: a daemon presents
//! its projected `ServiceAccount` token (audience [`DEFAULT_AUDIENCE`]), the CA
//! asks the API server about it with a `TokenReview`, and learns which node
//! the daemon runs on: from the token's
//! `authentication.kubernetes.io/node-name` extra (Kubernetes 1.30+), or
//! else from the daemon pod the token is bound to (`spec.nodeName`, with the
//! pod's uid checked so a token of a deleted pod does not carry over to a
//! new pod of the same name). [`authorize_identity`] then allows a workload
//! certificate only for an identity with a pod on that node.
//!
//! This replaces join tokens when the CA runs in the cluster: the node
//! certificate's name comes from the API server, never from the request.
//! [`TokenReviewAuthenticator`] is a [`JoinAuthenticator`] for
//! `CaServer::with_authenticator`; the server refuses a join whose claimed
//! node differs from the one returned here.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus},
    core::v1::Pod,
};
use kube::{api::PostParams, Api, Client};
use tlsmesh_identity::{
    authz::{JoinAuthenticator, JoinFuture, JoinRefusal, Placement, SharedPlacement},
    SpiffeId,
};
use tlsmesh_inventory::Inventory;
use tokio::sync::watch;

/// The audience daemons request for the token they show the CA.
pub const DEFAULT_AUDIENCE: &str = "tlsmesh-ca";
/// The user-info extra naming the node a token's pod runs on.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// The user-info extra naming the pod a token is bound to.
pub const POD_NAME_EXTRA: &str = "authentication.kubernetes.io/pod-name";
/// The user-info extra with that pod's uid.
pub const POD_UID_EXTRA: &str = "authentication.kubernetes.io/pod-uid";

/// Why a token was not accepted. The text is for the CA's log; the daemon
/// is told only that it was not authenticated.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The API call failed.
    #[error("TokenReview request failed: {0}; the CA's ServiceAccount needs `create` on tokenreviews.authentication.k8s.io (and `get` on pods)")]
    Api(#[source] kube::Error),
    /// The API server did not authenticate the token.
    #[error("token not authenticated: {0}")]
    NotAuthenticated(String),
    /// Authenticated, but not for our audience.
    #[error("token audiences {got:?} do not include {want:?}; the daemon must request a token with audience {want:?}")]
    Audience { got: Vec<String>, want: String },
    /// Someone other than a tlsmesh daemon.
    #[error("{username} is not a tlsmesh node daemon (allowed: {allowed:?})")]
    NotDaemon { username: String, allowed: Vec<String> },
    /// The token says nothing about where its holder runs.
    #[error("token of {username} is not bound to a pod; mount a projected ServiceAccount token (expirationSeconds, audience) in the DaemonSet")]
    Unbound { username: String },
    /// The pod the token is bound to is gone or was replaced.
    #[error("token of {username} is bound to pod {pod} (uid {uid}), which no longer exists")]
    PodGone { username: String, pod: String, uid: String },
}

/// Who the token belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDaemon {
    /// The node the daemon runs on.
    pub node: String,
    /// Its `ServiceAccount` user name.
    pub username: String,
    /// `namespace/name` of the daemon pod, when the token names it.
    pub pod: Option<String>,
}

/// What a review says, before any pod lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reviewed {
    /// The node is named in the token.
    Node(NodeDaemon),
    /// The node must be read from this pod.
    LookupPod {
        /// User name.
        username: String,
        /// Pod namespace (the `ServiceAccount`'s).
        namespace: String,
        /// Pod name.
        name: String,
        /// Pod uid.
        uid: String,
    },
}

fn extra<'a>(extra: Option<&'a BTreeMap<String, Vec<String>>>, key: &str) -> Option<&'a str> {
    extra?.get(key)?.first().map(String::as_str).filter(|s| !s.is_empty())
}

/// Judges a `TokenReview` status (pure): authenticated, for `audience`, by
/// one of the `allowed` users (`system:serviceaccount:<ns>:<name>`).
pub fn judge(
    status: &TokenReviewStatus,
    audience: &str,
    allowed: &[String],
) -> Result<Reviewed, AuthError> {
    if status.authenticated != Some(true) {
        return Err(AuthError::NotAuthenticated(
            status.error.clone().unwrap_or_else(|| "no reason given".into()),
        ));
    }
    let got = status.audiences.clone().unwrap_or_default();
    if !got.iter().any(|a| a == audience) {
        return Err(AuthError::Audience { got, want: audience.into() });
    }
    let user = status.user.clone().unwrap_or_default();
    let username = user.username.unwrap_or_default();
    if !allowed.contains(&username) {
        return Err(AuthError::NotDaemon { username, allowed: allowed.to_vec() });
    }
    let pod_name = extra(user.extra.as_ref(), POD_NAME_EXTRA);
    let namespace = username
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
        .map(|(ns, _)| ns);
    if let Some(node) = extra(user.extra.as_ref(), NODE_NAME_EXTRA) {
        let pod = pod_name.zip(namespace).map(|(p, ns)| format!("{ns}/{p}"));
        return Ok(Reviewed::Node(NodeDaemon { node: node.into(), username, pod }));
    }
    match (pod_name, extra(user.extra.as_ref(), POD_UID_EXTRA), namespace) {
        (Some(name), Some(uid), Some(ns)) => Ok(Reviewed::LookupPod {
            namespace: ns.into(),
            name: name.into(),
            uid: uid.into(),
            username,
        }),
        _ => Err(AuthError::Unbound { username }),
    }
}

/// Authenticates node daemons with the `TokenReview` API.
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    client: Client,
    audience: String,
    allowed: Vec<String>,
}

impl std::fmt::Debug for TokenReviewAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewAuthenticator")
            .field("audience", &self.audience)
            .field("allowed", &self.allowed)
            .finish_non_exhaustive()
    }
}

impl TokenReviewAuthenticator {
    /// Accepts tokens with `audience` of the `ServiceAccounts` `allowed`
    /// (e.g. `system:serviceaccount:tlsmesh-system:tlsmesh-node`).
    pub fn new(client: Client, audience: impl Into<String>, allowed: Vec<String>) -> Self {
        Self { client, audience: audience.into(), allowed }
    }

    /// Returns the node of the daemon holding `token`.
    pub async fn authenticate(&self, token: &str) -> Result<NodeDaemon, AuthError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let done = api.create(&PostParams::default(), &review).await.map_err(AuthError::Api)?;
        match judge(&done.status.unwrap_or_default(), &self.audience, &self.allowed)? {
            Reviewed::Node(d) => Ok(d),
            Reviewed::LookupPod { username, namespace, name, uid } => {
                let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
                let key = format!("{namespace}/{name}");
                let gone = |username: String| AuthError::PodGone {
                    username,
                    pod: key.clone(),
                    uid: uid.clone(),
                };
                let pod = match pods.get_opt(&name).await.map_err(AuthError::Api)? {
                    Some(p) if p.metadata.uid.as_deref() == Some(uid.as_str()) => p,
                    _ => return Err(gone(username)),
                };
                let node = pod.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty());
                match node {
                    Some(node) => Ok(NodeDaemon { node, username, pod: Some(key) }),
                    None => Err(gone(username)),
                }
            }
        }
    }
}

impl AuthError {
    /// Whether the API server could not be asked (retry later), as opposed
    /// to having said no.
    pub fn is_unavailable(&self) -> bool {
        matches!(self, AuthError::Api(_))
    }
}

/// A join's token is the daemon's projected `ServiceAccount` token; the node
/// it proves is the one the API server names (the claimed name is not used
/// here: the CA server compares the two).
impl JoinAuthenticator for TokenReviewAuthenticator {
    fn authenticate<'a>(&'a self, claimed: &'a str, token: &'a str) -> JoinFuture<'a> {
        Box::pin(async move {
            match TokenReviewAuthenticator::authenticate(self, token).await {
                Ok(daemon) => {
                    tracing::debug!(claimed, node = %daemon.node, user = %daemon.username, pod = ?daemon.pod, "TokenReview authenticated a node daemon");
                    Ok(daemon.node)
                }
                Err(e) if e.is_unavailable() => Err(JoinRefusal::Unavailable(e.to_string())),
                Err(e) => Err(JoinRefusal::Unauthenticated(e.to_string())),
            }
        })
    }
}

/// Why a node was refused a workload certificate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No pod has that identity.
    #[error("node {node} asked for {id}, but no pod with that identity is scheduled; if it was just created the CA's view may lag: retry")]
    Unknown { node: String, id: String },
    /// Pods with that identity run elsewhere only.
    #[error("node {node} asked for {id}, but pods with that identity run only on {nodes:?}; a node gets certificates only for its own pods")]
    NotOnNode { node: String, id: String, nodes: Vec<String> },
}

/// Allows a certificate for SPIFFE id `requested` to `node` only if a pod
/// with that identity runs there (pure, over [`Inventory::placement`]).
pub fn authorize_identity(inv: &Inventory, node: &str, requested: &str) -> Result<(), Denied> {
    let placement = inv.placement();
    match placement.get(requested) {
        None => Err(Denied::Unknown { node: node.into(), id: requested.into() }),
        Some(nodes) if nodes.iter().any(|n| n == node) => Ok(()),
        Some(nodes) => {
            Err(Denied::NotOnNode { node: node.into(), id: requested.into(), nodes: nodes.clone() })
        }
    }
}

/// The CA's placement (which nodes run pods of each identity) from an
/// inventory of the whole cluster ([`crate::run`] with `node: None`). Pods
/// whose names cannot form a SPIFFE id are left out (the CA then refuses them).
pub fn placement(inv: &Inventory) -> Placement {
    inv.pods
        .values()
        .filter_map(|p| {
            let id = SpiffeId::new(&inv.trust_domain, &p.namespace, &p.service_account).ok()?;
            Some((id, p.node.clone()))
        })
        .collect()
}

/// Keeps `shared` equal to the placement of every inventory published on
/// `rx` (the first one included), until the sender is gone.
pub async fn follow_placement(mut rx: watch::Receiver<Inventory>, shared: SharedPlacement) {
    loop {
        let next = placement(&rx.borrow_and_update());
        shared.replace(next);
        if rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const DAEMON: &str = "system:serviceaccount:tlsmesh-system:tlsmesh-node";

    fn status(v: serde_json::Value) -> TokenReviewStatus {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn judges_reviews() {
        let allowed = vec![DAEMON.to_owned()];
        let node = status(json!({"authenticated": true, "audiences": ["tlsmesh-ca"],
            "user": {"username": DAEMON, "extra": {NODE_NAME_EXTRA: ["n1"], POD_NAME_EXTRA: ["tlsmesh-node-x"]}}}));
        assert_eq!(
            judge(&node, DEFAULT_AUDIENCE, &allowed).unwrap(),
            Reviewed::Node(NodeDaemon {
                node: "n1".into(),
                username: DAEMON.into(),
                pod: Some("tlsmesh-system/tlsmesh-node-x".into())
            })
        );
        let pod_only = status(json!({"authenticated": true, "audiences": ["tlsmesh-ca"],
            "user": {"username": DAEMON, "extra": {POD_NAME_EXTRA: ["p"], POD_UID_EXTRA: ["u"]}}}));
        assert!(
            matches!(judge(&pod_only, DEFAULT_AUDIENCE, &allowed).unwrap(), Reviewed::LookupPod { ref namespace, .. } if namespace == "tlsmesh-system")
        );
        let legacy = status(
            json!({"authenticated": true, "audiences": ["tlsmesh-ca"], "user": {"username": DAEMON}}),
        );
        assert!(matches!(
            judge(&legacy, DEFAULT_AUDIENCE, &allowed),
            Err(AuthError::Unbound { .. })
        ));
        let other = status(json!({"authenticated": true, "audiences": ["tlsmesh-ca"],
            "user": {"username": "system:serviceaccount:shop:web", "extra": {NODE_NAME_EXTRA: ["n1"]}}}));
        assert!(matches!(
            judge(&other, DEFAULT_AUDIENCE, &allowed),
            Err(AuthError::NotDaemon { .. })
        ));
        let aud = status(
            json!({"authenticated": true, "audiences": ["https://kubernetes.default.svc"], "user": {"username": DAEMON}}),
        );
        assert!(judge(&aud, DEFAULT_AUDIENCE, &allowed)
            .unwrap_err()
            .to_string()
            .contains("tlsmesh-ca"));
        let no = status(json!({"authenticated": false, "error": "token expired"}));
        assert!(judge(&no, DEFAULT_AUDIENCE, &allowed)
            .unwrap_err()
            .to_string()
            .contains("token expired"));
    }

    #[test]
    fn identities_only_for_pods_on_the_node() {
        let (inv, _) = tlsmesh_inventory::parse(
            r#"
            [[node]]
            name = "n1"
            [[node]]
            name = "n2"
            [[pod]]
            name = "web"
            namespace = "shop"
            service_account = "web"
            node = "n1"
            "#,
        )
        .unwrap();
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        assert_eq!(authorize_identity(&inv, "n1", web), Ok(()));
        let e = authorize_identity(&inv, "n2", web).unwrap_err();
        assert_eq!(
            e,
            Denied::NotOnNode { node: "n2".into(), id: web.into(), nodes: vec!["n1".into()] }
        );
        assert!(matches!(
            authorize_identity(&inv, "n1", "spiffe://cluster.local/ns/x/sa/y"),
            Err(Denied::Unknown { .. })
        ));
    }
}
