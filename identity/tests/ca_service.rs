//! The CA server and client over TCP on 127.0.0.1: join with a token, request
//! workload certificates, placement enforcement, and the certificate manager
//! driven by the network client.

// `Duration::from_hours` needs Rust 1.91; the workspace MSRV is 1.85.
#![allow(clippy::duration_suboptimal_units, reason = "MSRV 1.85 lacks Duration::from_hours")]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;
use tlsmesh_identity::authz::{JoinTokens, Placement, SharedPlacement};
use tlsmesh_identity::ca::{Ca, PemNames, SharedCa, MIN_LIFETIME};
use tlsmesh_identity::client::{CaClient, CaClientConfig, ClientError};
use tlsmesh_identity::keys::{CertInfo, PrivateKey};
use tlsmesh_identity::manager::CertManager;
use tlsmesh_identity::protocol::{ErrorKind, Request, Response};
use tlsmesh_identity::server::{CaServer, CaServerConfig};
use tlsmesh_identity::tls::CertStore as _;
use tlsmesh_identity::trust::{DenyList, TrustBundle};
use tlsmesh_identity::{Identity, NodeId, SpiffeId};
use tokio::net::TcpListener;

const TD: &str = "cluster.local";
const DAY: Duration = Duration::from_secs(86_400);
const TOKEN_A: &str = "token-for-node-a-0123456789";
const TOKEN_B: &str = "token-for-node-b-0123456789";

fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

struct Harness {
    addr: SocketAddr,
    server: Arc<CaServer>,
    placement: SharedPlacement,
    deny: DenyList,
    /// The CA's trust anchors: its own root and an extra (rotation) root.
    roots: usize,
    own_root: TrustBundle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start() -> Harness {
    let (_, own) = Ca::generate_root(TD, DAY).unwrap();
    let (next_root, _) = Ca::generate_root(TD, DAY).unwrap();
    // The CA signs with `own` and publishes both roots, as in a rotation.
    let ca = Ca::from_pem(
        &own.cert_pem,
        &own.key.to_pem(),
        next_root.roots(),
        TD,
        OffsetDateTime::now_utc(),
        &PemNames { cert: "ca.pem".into(), key: "ca.key".into() },
    )
    .unwrap();
    let own_root = TrustBundle::new(TD, ca.roots()[..1].to_vec()).unwrap();
    let roots = ca.roots().len();

    let placement: Placement = [(id("shop", "web"), "node-a".to_owned())].into_iter().collect();
    let placement = SharedPlacement::new(placement);
    let tokens = Arc::new(JoinTokens::new());
    tokens.insert("node-a", TOKEN_A, false).unwrap();
    tokens.insert("node-b", TOKEN_B, false).unwrap();
    let deny = DenyList::default();
    let config = CaServerConfig {
        server_names: vec!["localhost".into(), "127.0.0.1".into()],
        workload_lifetime: MIN_LIFETIME,
        node_lifetime: Duration::from_secs(3600),
        request_timeout: Duration::from_secs(5),
        deny: deny.clone(),
    };
    let server = Arc::new(CaServer::new(SharedCa::new(ca), placement.clone(), tokens, config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(server.clone().serve(listener));
    Harness { addr, server, placement, deny, roots, own_root, task }
}

fn client(h: &Harness, node: &str, trust: TrustBundle) -> CaClient {
    CaClient::new(CaClientConfig {
        addr: h.addr.to_string(),
        server_name: "localhost".into(),
        trust,
        node: node.into(),
        timeout: Duration::from_secs(5),
    })
    .unwrap()
}

fn csr_for(id: &SpiffeId) -> (PrivateKey, String) {
    let key = PrivateKey::generate().unwrap();
    let csr = key.csr_pem(&Identity::Workload(id.clone())).unwrap();
    (key, csr)
}

fn refused(err: &ClientError) -> (ErrorKind, &str) {
    match err {
        ClientError::Refused { kind, message } => (*kind, message.as_str()),
        other => panic!("expected a refusal from the CA, got: {other}"),
    }
}

#[tokio::test]
async fn join_then_request_allowed_and_disallowed_identities() {
    let h = start().await;
    let trust = TrustBundle::new(TD, h.own_root.roots()).unwrap();
    let a = client(&h, "node-a", trust.clone());
    let (web, db) = (id("shop", "web"), id("shop", "db"));

    // Before joining there is no node credential.
    let (_, csr) = csr_for(&web);
    assert!(matches!(a.request(&csr, &web).await, Err(ClientError::NotJoined)));

    // Wrong token: refused, and the message says so.
    let err = a.join("not-the-right-token-at-all").await.unwrap_err();
    let (kind, message) = refused(&err);
    assert_eq!(kind, ErrorKind::Unauthenticated);
    assert!(message.contains("join refused for node \"node-a\""), "{message}");
    assert!(a.node_certificate().is_none());

    // Right token: a node certificate for spiffe://cluster.local/node/node-a.
    let node = a.join(TOKEN_A).await.unwrap();
    assert_eq!(node.identity, Identity::Node(NodeId::new(TD, "node-a").unwrap()));
    assert_eq!(trust.roots().len(), h.roots, "the CA's bundle (both roots) was installed");

    // An identity with a pod on node-a: issued, with that SAN and 1 min lifetime.
    let (key, csr) = csr_for(&web);
    let chain = a.request(&csr, &web).await.unwrap();
    let certified = key.certified_key(&chain).unwrap();
    let info = CertInfo::from_der(&certified.cert[0]).unwrap();
    assert_eq!(info.identity, Identity::Workload(web.clone()));
    assert_eq!(
        info.not_after - info.not_before,
        time::Duration::seconds(120),
        "1 min + 1 min backdate"
    );

    // An identity not placed on node-a: refused.
    let (_, csr) = csr_for(&db);
    let err = a.request(&csr, &db).await.unwrap_err();
    let (kind, message) = refused(&err);
    assert_eq!(kind, ErrorKind::Denied);
    assert!(message.contains("node-a") && message.contains("sa/db"), "{message}");

    // The placement changes at run time: now allowed.
    h.placement.update(|p| p.insert(db.clone(), "node-a"));
    a.request(&csr, &db).await.unwrap();

    // Renewing the node certificate works with the current one.
    let renewed = a.renew_node().await.unwrap();
    assert_ne!(renewed.serial, node.serial);
    a.request(&csr, &db).await.unwrap();
}

#[tokio::test]
async fn node_name_comes_from_the_certificate() {
    let h = start().await;
    let b = client(&h, "node-b", h.own_root.clone());
    b.join(TOKEN_B).await.unwrap();
    // `web` runs only on node-a; node-b cannot get it, whatever it claims.
    let web = id("shop", "web");
    let (_, csr) = csr_for(&web);
    let err = b.request(&csr, &web).await.unwrap_err();
    let (kind, message) = refused(&err);
    assert_eq!(kind, ErrorKind::Denied);
    assert!(message.contains("node node-b"), "{message}");

    // node-b's token does not let it join as node-a.
    let fake_a = client(&h, "node-a", h.own_root.clone());
    let (kind, _) = refused(&fake_a.join(TOKEN_B).await.unwrap_err());
    assert_eq!(kind, ErrorKind::Unauthenticated);

    // Certificate requests without a node certificate are refused.
    let anon = h.server.handle(None, Request::Workload { id: web, csr }, h.addr).await;
    assert!(matches!(anon, Response::Error { kind: ErrorKind::Unauthenticated, .. }), "{anon:?}");
}

#[tokio::test]
async fn denied_node_cannot_talk_to_the_ca() {
    let h = start().await;
    let a = client(&h, "node-a", h.own_root.clone());
    let node = a.join(TOKEN_A).await.unwrap();
    h.deny.deny_serial(&node.serial);
    let web = id("shop", "web");
    let (_, csr) = csr_for(&web);
    let err = a.request(&csr, &web).await.unwrap_err();
    assert!(!matches!(err, ClientError::Refused { .. }), "refused at the TLS layer: {err}");

    h.deny.deny_identity(&node.identity);
    let err = a.join(TOKEN_A).await.unwrap_err();
    let (kind, message) = refused(&err);
    assert_eq!(kind, ErrorKind::Denied);
    assert!(message.contains("deny list"), "{message}");
}

#[tokio::test]
async fn unknown_ca_is_not_trusted() {
    let h = start().await;
    let (stranger, _) = Ca::generate_root(TD, DAY).unwrap();
    let a = client(&h, "node-a", TrustBundle::new(TD, stranger.roots().to_vec()).unwrap());
    let err = a.join(TOKEN_A).await.unwrap_err();
    assert!(matches!(err, ClientError::Handshake { .. }), "{err}");
    assert!(err.to_string().contains("trust bundle"), "{err}");
}

#[tokio::test]
async fn cert_manager_over_the_network() {
    let h = start().await;
    let a = Arc::new(client(&h, "node-a", h.own_root.clone()));
    a.join(TOKEN_A).await.unwrap();
    let manager = CertManager::new(a);
    let web = id("shop", "web");
    let key = manager.ensure(&web).await.unwrap();
    assert!(Arc::ptr_eq(&manager.get(&web).unwrap(), &key));
    assert_eq!(manager.snapshot()[0].identity, web.to_string());
    let err = manager.ensure(&id("shop", "db")).await.unwrap_err();
    assert!(err.to_string().contains("the CA did not issue"), "{err}");
}
