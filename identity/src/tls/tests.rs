//! In-process handshakes over `tokio::io::duplex` between `client_config`
//! and `server_config`.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use rustls::{ClientConfig, NamedGroup, ProtocolVersion, ServerConfig};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::*;
use crate::ca::{Ca, MIN_LIFETIME};
use crate::keys::PrivateKey;
use crate::spiffe::NodeId;
use crate::testutil::{id, root_ca, workload_cert, TD};
use crate::trust::{DenyList, TrustBundle};

const HOUR: Duration = Duration::from_secs(3600);

struct Outcome {
    /// Peer identity seen by the client, or the client's error.
    client: Result<SpiffeId, io::Error>,
    /// Peer identity seen by the server, or the server's error.
    server: Result<SpiffeId, io::Error>,
    group: Option<NamedGroup>,
    version: Option<ProtocolVersion>,
    alpn: Option<Vec<u8>>,
}

fn peer(certs: Option<&[CertificateDer<'static>]>) -> io::Result<SpiffeId> {
    peer_identity(certs.unwrap_or_default()).map_err(io::Error::other)
}

/// Runs a handshake and a one-message exchange (so that the server's
/// verdict on the client certificate reaches the client too).
async fn handshake(
    client: ClientConfig,
    server: ServerConfig,
    sni: ServerName<'static>,
) -> Outcome {
    let (c, s) = tokio::io::duplex(64 * 1024);
    let server = async move {
        let mut tls = TlsAcceptor::from(Arc::new(server)).accept(s).await?;
        let id = peer(tls.get_ref().1.peer_certificates())?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(b"pong").await?;
        tls.flush().await?;
        Ok::<_, io::Error>(id)
    };
    let client = async move {
        let mut tls = TlsConnector::from(Arc::new(client)).connect(sni, c).await?;
        let conn = tls.get_ref().1;
        let id = peer(conn.peer_certificates())?;
        let group =
            conn.negotiated_key_exchange_group().map(rustls::crypto::SupportedKxGroup::name);
        let version = conn.protocol_version();
        let alpn = conn.alpn_protocol().map(<[u8]>::to_vec);
        tls.write_all(b"ping").await?;
        tls.flush().await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        Ok::<_, io::Error>((id, group, version, alpn))
    };
    let (client, server) =
        tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(client, server) })
            .await
            .expect("handshake timed out");
    let (group, version, alpn) =
        client.as_ref().map_or((None, None, None), |(_, g, v, a)| (*g, *v, a.clone()));
    Outcome { client: client.map(|(id, ..)| id), server, group, version, alpn }
}

fn rustls_error(e: &io::Error) -> rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned()
        .unwrap_or_else(|| panic!("not a rustls error: {e}"))
}

/// The verifier's refusal on one side, with its text.
fn refusal(result: &Result<SpiffeId, io::Error>) -> (PeerRejected, String) {
    let err = result.as_ref().expect_err("expected the handshake to be refused");
    let tls = rustls_error(err);
    let text = tls.to_string();
    let rejected =
        rejection(&tls).unwrap_or_else(|| panic!("not a tlsmesh refusal: {text}")).clone();
    // Where only the text survives (QUIC's transport error), the kind can
    // be read back from it.
    assert_eq!(super::rejection_kind_in(&text), Some(rejected.reason.kind()), "{text}");
    (rejected, text)
}

struct Setup {
    bundle: TrustBundle,
    deny: DenyList,
    store: Arc<StaticCertStore>,
}

impl Setup {
    fn new(ca: &Ca) -> Self {
        Self {
            bundle: TrustBundle::new(TD, ca.roots().to_vec()).unwrap(),
            deny: DenyList::default(),
            store: Arc::new(StaticCertStore::new()),
        }
    }

    fn server(&self) -> ServerConfig {
        let resolver = Arc::new(SniResolver::new(self.store.clone(), None));
        server_config(resolver, &self.bundle, &self.deny).unwrap()
    }

    fn client(&self, cert: Arc<CertifiedKey>, expected: &SpiffeId) -> ClientConfig {
        client_config(cert, expected.clone(), &self.bundle, &self.deny).unwrap()
    }
}

fn serial(key: &CertifiedKey) -> String {
    CertInfo::from_der(&key.cert[0]).unwrap().serial
}

#[tokio::test]
async fn mutual_authentication_yields_peer_identities_both_ways() {
    let ca = root_ca();
    let now = OffsetDateTime::now_utc();
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    let setup = Setup::new(&ca);
    setup.store.insert(db.clone(), workload_cert(&ca, &db, HOUR, now));
    let client = setup.client(workload_cert(&ca, &web, HOUR, now), &db);

    let out = handshake(client, setup.server(), sni_for(&db)).await;
    assert_eq!(out.client.unwrap(), db, "the client sees the destination identity");
    assert_eq!(out.server.unwrap(), web, "the server sees the source identity");
    assert_eq!(out.version, Some(ProtocolVersion::TLSv1_3));
    assert_eq!(out.group, Some(NamedGroup::X25519MLKEM768));
    assert_eq!(out.alpn.as_deref(), Some(ALPN_H2));
}

#[tokio::test]
async fn falls_back_to_x25519_when_peer_lacks_mlkem() {
    let ca = root_ca();
    let now = OffsetDateTime::now_utc();
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    let setup = Setup::new(&ca);
    setup.store.insert(db.clone(), workload_cert(&ca, &db, HOUR, now));
    let mut only_x25519 = (*provider()).clone();
    only_x25519.kx_groups = vec![aws_lc_rs::kx_group::X25519];
    // A client with a classical-only provider.
    let verifier = Arc::new(SpiffeServerVerifier::new(
        setup.bundle.clone(),
        setup.deny.clone(),
        PeerKind::Workload,
        Some(db.clone()),
    ));
    let cert = workload_cert(&ca, &web, HOUR, now);
    let client = ClientConfig::builder_with_provider(Arc::new(only_x25519))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(resolve::FixedClientCert(cert)));
    let out = handshake(client, setup.server(), sni_for(&db)).await;
    assert_eq!(out.server.unwrap(), web);
    assert_eq!(out.group, Some(NamedGroup::X25519));
}

#[tokio::test]
async fn server_from_foreign_ca_is_refused() {
    let (ours, theirs) = (root_ca(), root_ca());
    let now = OffsetDateTime::now_utc();
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    let setup = Setup::new(&ours);
    setup.store.insert(db.clone(), workload_cert(&theirs, &db, HOUR, now));
    let client = setup.client(workload_cert(&ours, &web, HOUR, now), &db);

    let out = handshake(client, setup.server(), sni_for(&db)).await;
    let (rejected, text) = refusal(&out.client);
    assert_eq!(rejected.reason, RejectReason::ForeignCa);
    assert!(text.contains("foreign CA"), "{text}");
    assert!(text.contains("spiffe://cluster.local/ns/shop/sa/db"), "{text}");
}

#[tokio::test]
async fn client_from_foreign_ca_is_refused() {
    let (ours, theirs) = (root_ca(), root_ca());
    let now = OffsetDateTime::now_utc();
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    let setup = Setup::new(&ours);
    setup.store.insert(db.clone(), workload_cert(&ours, &db, HOUR, now));
    let client = setup.client(workload_cert(&theirs, &web, HOUR, now), &db);

    let out = handshake(client, setup.server(), sni_for(&db)).await;
    let (rejected, text) = refusal(&out.server);
    assert_eq!(rejected.reason, RejectReason::ForeignCa);
    assert!(text.contains("foreign CA") && text.contains("sa/web"), "{text}");
    assert!(out.client.is_err(), "the client learns of the refusal too");
}

#[tokio::test]
async fn expired_client_certificate_is_refused() {
    let ca = root_ca();
    let now = OffsetDateTime::now_utc();
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    let setup = Setup::new(&ca);
    setup.store.insert(db.clone(), workload_cert(&ca, &db, HOUR, now));
    // Issued two hours ago for one minute.
    let stale = workload_cert(&ca, &web, MIN_LIFETIME, now - time::Duration::hours(2));
    let client = setup.client(stale.clone(), &db);

    let out = handshake(client, setup.server(), sni_for(&db)).await;
    let (rejected, text) = refusal(&out.server);
    assert!(matches!(rejected.reason, RejectReason::Expired { not_after: Some(_) }), "{text}");
    assert!(text.contains("expired"), "{text}");
    assert!(text.contains(&serial(&stale)), "names the serial: {text}");
}

#[tokio::test]
async fn expired_server_certificate_is_refused() {
    let ca = root_ca();
    let now = OffsetDateTime::now_utc();
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    let setup = Setup::new(&ca);
    setup
        .store
        .insert(db.clone(), workload_cert(&ca, &db, MIN_LIFETIME, now - time::Duration::hours(2)));
    let client = setup.client(workload_cert(&ca, &web, HOUR, now), &db);
    let out = handshake(client, setup.server(), sni_for(&db)).await;
    let (rejected, text) = refusal(&out.client);
    assert_eq!(rejected.reason.kind(), "expired", "{text}");
}

#[tokio::test]
async fn wrong_server_identity_is_refused() {
    let ca = root_ca();
    let now = OffsetDateTime::now_utc();
    let (web, db, api) = (id("shop", "web"), id("shop", "db"), id("shop", "api"));
    let setup = Setup::new(&ca);
    setup.store.insert(db.clone(), workload_cert(&ca, &db, HOUR, now));
    // Ask for `api` but the server only has `db`: it answers with `db` via the
    // fallback, which the client must refuse.
    let resolver = Arc::new(SniResolver::new(setup.store.clone(), Some(db.clone())));
    let server = server_config(resolver, &setup.bundle, &setup.deny).unwrap();
    let client = setup.client(workload_cert(&ca, &web, HOUR, now), &api);

    let out = handshake(client, server, sni_for(&api)).await;
    let (rejected, text) = refusal(&out.client);
    assert_eq!(rejected.reason, RejectReason::WrongIdentity { expected: api });
    assert!(text.contains("wrong SPIFFE ID"), "{text}");
    assert!(text.contains("expected spiffe://cluster.local/ns/shop/sa/api"), "{text}");
    assert!(text.contains("peer spiffe://cluster.local/ns/shop/sa/db"), "{text}");
}

#[tokio::test]
async fn missing_client_certificate_is_refused() {
    let ca = root_ca();
    let now = OffsetDateTime::now_utc();
    let db = id("shop", "db");
    let setup = Setup::new(&ca);
    setup.store.insert(db.clone(), workload_cert(&ca, &db, HOUR, now));
    let verifier = Arc::new(SpiffeServerVerifier::new(
        setup.bundle.clone(),
        setup.deny.clone(),
        PeerKind::Workload,
        Some(db.clone()),
    ));
    let client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();

    let out = handshake(client, setup.server(), sni_for(&db)).await;
    let err = rustls_error(out.server.as_ref().unwrap_err());
    assert_eq!(err, rustls::Error::NoCertificatesPresented);
    assert!(err.to_string().contains("no certificates"), "{err}");
}

#[tokio::test]
async fn revoked_serial_and_identity_are_refused() {
    let ca = root_ca();
    let now = OffsetDateTime::now_utc();
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    let setup = Setup::new(&ca);
    setup.store.insert(db.clone(), workload_cert(&ca, &db, HOUR, now));
    let web_cert = workload_cert(&ca, &web, HOUR, now);
    let web_serial = serial(&web_cert);

    let changes = setup.deny.subscribe();
    setup.deny.deny_serial(&web_serial);
    assert!(changes.has_changed().unwrap(), "the daemon is told the list changed");
    let out = handshake(setup.client(web_cert.clone(), &db), setup.server(), sni_for(&db)).await;
    let (rejected, text) = refusal(&out.server);
    assert_eq!(rejected.reason.kind(), "revoked");
    assert!(text.contains("revoked") && text.contains(&web_serial), "{text}");

    // Denying the identity refuses even a fresh certificate.
    setup.deny.replace(crate::trust::DenySet::default());
    setup.deny.deny_identity(&Identity::Workload(web.clone()));
    let fresh = workload_cert(&ca, &web, HOUR, now);
    let out = handshake(setup.client(fresh, &db), setup.server(), sni_for(&db)).await;
    let (_, text) = refusal(&out.server);
    assert!(
        text.contains("identity spiffe://cluster.local/ns/shop/sa/web is on the deny list"),
        "{text}"
    );

    // Lifting it lets the same certificate through again.
    setup.deny.replace(crate::trust::DenySet::default());
    let out = handshake(setup.client(web_cert, &db), setup.server(), sni_for(&db)).await;
    assert_eq!(out.server.unwrap(), web);
}

#[tokio::test]
async fn node_identity_cannot_open_tunnels() {
    let ca = root_ca();
    let now = OffsetDateTime::now_utc();
    let db = id("shop", "db");
    let setup = Setup::new(&ca);
    setup.store.insert(db.clone(), workload_cert(&ca, &db, HOUR, now));
    let key = PrivateKey::generate().unwrap();
    let node = Identity::Node(NodeId::new(TD, "node-a").unwrap());
    let issued = ca.issue(&key.csr_pem(&node).unwrap(), &node, HOUR, now).unwrap();
    let node_cert = key.certified_key(&issued.chain_pem).unwrap();

    let out = handshake(setup.client(node_cert, &db), setup.server(), sni_for(&db)).await;
    let (rejected, text) = refusal(&out.server);
    assert_eq!(rejected.reason, RejectReason::WrongKind { expected: PeerKind::Workload }, "{text}");
}

#[tokio::test]
async fn ca_rotation_bundle_accepts_both_roots_until_old_is_removed() {
    let (old, new) = (root_ca(), root_ca());
    let now = OffsetDateTime::now_utc();
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    let setup = Setup::new(&old);
    setup.bundle.add_root(new.roots()[0].clone()).unwrap();
    setup.store.insert(db.clone(), workload_cert(&new, &db, HOUR, now));

    let from_old = workload_cert(&old, &web, HOUR, now);
    let from_new = workload_cert(&new, &web, HOUR, now);
    for cert in [from_old.clone(), from_new.clone()] {
        let out = handshake(setup.client(cert, &db), setup.server(), sni_for(&db)).await;
        assert_eq!(out.server.unwrap(), web);
        assert_eq!(out.client.unwrap(), db);
    }

    assert!(setup.bundle.remove_root(&old.roots()[0]).unwrap());
    let out = handshake(setup.client(from_old, &db), setup.server(), sni_for(&db)).await;
    let (rejected, _) = refusal(&out.server);
    assert_eq!(rejected.reason, RejectReason::ForeignCa);
    let out = handshake(setup.client(from_new, &db), setup.server(), sni_for(&db)).await;
    assert_eq!(out.server.unwrap(), web);
}

#[tokio::test]
async fn renewal_swaps_only_new_handshakes() {
    let ca = root_ca();
    let now = OffsetDateTime::now_utc();
    let (web, db) = (id("shop", "web"), id("shop", "db"));
    let setup = Setup::new(&ca);
    let first = workload_cert(&ca, &db, HOUR, now);
    setup.store.insert(db.clone(), first.clone());
    let server = Arc::new(setup.server());

    let (c, s) = tokio::io::duplex(64 * 1024);
    let acceptor = TlsAcceptor::from(server.clone());
    let connector =
        TlsConnector::from(Arc::new(setup.client(workload_cert(&ca, &web, HOUR, now), &db)));
    let (client, server_side) =
        tokio::join!(connector.connect(sni_for(&db), c), acceptor.accept(s));
    let (mut client, mut server_side) = (client.unwrap(), server_side.unwrap());
    let seen = |conn: &rustls::ClientConnection| {
        CertInfo::from_der(&conn.peer_certificates().unwrap()[0]).unwrap().serial
    };
    assert_eq!(seen(client.get_ref().1), serial(&first));

    // Renew: the store now hands out a new certificate.
    let second = workload_cert(&ca, &db, HOUR, now);
    setup.store.insert(db.clone(), second.clone());

    // The established session still works and still has the old peer cert.
    client.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    server_side.read_exact(&mut buf).await.unwrap();
    server_side.write_all(b"pong").await.unwrap();
    client.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong");
    assert_eq!(seen(client.get_ref().1), serial(&first));

    // A new handshake picks the renewed certificate.
    let (c, s) = tokio::io::duplex(64 * 1024);
    let (client2, _server2) = tokio::join!(connector.connect(sni_for(&db), c), acceptor.accept(s));
    assert_eq!(seen(client2.unwrap().get_ref().1), serial(&second));
}

#[test]
fn provider_offers_exactly_the_chosen_suites_and_groups() {
    let p = provider();
    let suites: Vec<_> = p.cipher_suites.iter().map(rustls::SupportedCipherSuite::suite).collect();
    assert_eq!(
        suites,
        vec![
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384,
            rustls::CipherSuite::TLS13_CHACHA20_POLY1305_SHA256,
        ]
    );
    let groups: Vec<_> = p.kx_groups.iter().map(|g| g.name()).collect();
    assert_eq!(groups, vec![NamedGroup::X25519MLKEM768, NamedGroup::X25519]);
}

#[test]
fn sni_is_a_valid_dns_name_for_any_identity() {
    let long = SpiffeId::new(
        "a-very-long-trust-domain.example.internal.corp",
        "n".repeat(63),
        "s".repeat(253),
    )
    .unwrap();
    let name = sni_for(&long);
    assert!(matches!(name, ServerName::DnsName(_)));
    let text = sni_string(&long);
    assert!(
        text.ends_with(".id.tlsmesh.invalid") && text.len() == 32 + ".id.tlsmesh.invalid".len()
    );
    assert_ne!(sni_string(&id("a", "b")), sni_string(&id("a", "c")));
    assert_eq!(sni_string(&id("a", "b")), sni_string(&id("a", "b")));
}

#[test]
fn client_config_refuses_expected_peer_of_other_trust_domain() {
    let ca = root_ca();
    let setup = Setup::new(&ca);
    let cert = workload_cert(&ca, &id("a", "b"), HOUR, OffsetDateTime::now_utc());
    let foreign = SpiffeId::new("other.domain", "a", "b").unwrap();
    let err = client_config(cert, foreign, &setup.bundle, &setup.deny).unwrap_err();
    assert!(err.to_string().contains("other.domain"), "{err}");
}
