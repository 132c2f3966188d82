//! Test kit: a throwaway CA, TLS 1.3 configs with client auth, HBONE/QUIC
//! servers on 127.0.0.1, echo upstreams and a counting connector.
#![allow(dead_code, clippy::missing_panics_doc)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tlsmesh_tunnel::{hbone, quic, Accepted, ConnectRequest, Handler, Refusal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

pub const SERVER_NAME: &str = "dst.test";
pub const SRC_ID: &str = "spiffe://test.local/ns/a/sa/client";
pub const DST_ID: &str = "spiffe://test.local/ns/b/sa/server";

pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A CA plus one server and one client certificate.
pub struct Pki {
    pub server: Arc<rustls::ServerConfig>,
    pub client: Arc<rustls::ClientConfig>,
}

fn leaf(
    issuer: &Issuer<'_, KeyPair>,
    dns: &str,
    spiffe: &str,
) -> (CertificateDer<'static>, PrivateKeyDer<'static>) {
    let key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![dns.to_owned()]).unwrap();
    p.subject_alt_names.push(SanType::URI(spiffe.try_into().unwrap()));
    p.distinguished_name.push(DnType::CommonName, dns);
    let cert = p.signed_by(&key, issuer).unwrap();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    (cert.der().clone(), key)
}

impl Pki {
    pub fn new() -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "tlsmesh test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let roots = Arc::new(roots);

        let (scert, skey) = leaf(&issuer, SERVER_NAME, DST_ID);
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .unwrap();
        let mut server = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![scert], skey)
            .unwrap();
        server.alpn_protocols = vec![hbone::ALPN.to_vec()];

        let (ccert, ckey) = leaf(&issuer, "client.test", SRC_ID);
        let mut client = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![ccert], ckey)
            .unwrap();
        client.alpn_protocols = vec![hbone::ALPN.to_vec()];
        Self { server: Arc::new(server), client: Arc::new(client) }
    }
}

/// Records every request the handler saw.
#[derive(Clone, Default)]
pub struct Seen(pub Arc<Mutex<Vec<ConnectRequest>>>);

impl Seen {
    pub fn last(&self) -> ConnectRequest {
        self.0.lock().unwrap().last().cloned().expect("handler was called")
    }
}

/// A handler that connects to the authority over TCP (503 when that fails)
/// and records the request; authority port 1 is denied (401).
pub fn tcp_handler(seen: Seen) -> Arc<dyn Handler> {
    Arc::new(move |req: ConnectRequest| {
        let seen = seen.clone();
        async move {
            seen.0.lock().unwrap().push(req.clone());
            if req.authority.port() == 1 {
                return Err(Refusal::denied("port 1 is not allowed"));
            }
            match TcpStream::connect(req.authority).await {
                Ok(s) => Ok(Accepted::new(s)),
                Err(e) => Err(Refusal::unreachable(e.to_string())),
            }
        }
    })
}

/// A handler whose upstream is an in-memory echo (no sockets).
pub fn memory_echo_handler() -> Arc<dyn Handler> {
    Arc::new(|_req: ConnectRequest| async move {
        let (a, mut b) = tokio::io::duplex(64 * 1024);
        tokio::spawn(async move {
            let (mut r, mut w) = tokio::io::split(&mut b);
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        });
        Ok(Accepted::new(a))
    })
}

/// A TCP echo server on 127.0.0.1; echoes until EOF, then closes.
pub async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// An HBONE server on `bind` (127.0.0.1:0 for any port). Aborting the
/// returned task closes every connection it accepted.
pub async fn hbone_server(
    bind: SocketAddr,
    pki: &Pki,
    handler: Arc<dyn Handler>,
    tweak: impl Fn(&mut hbone::ServerCtx) + Send + Sync + 'static,
) -> (SocketAddr, JoinHandle<()>) {
    let l = TcpListener::bind(bind).await.unwrap();
    let addr = l.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let task = tokio::spawn(async move {
        let mut conns = tokio::task::JoinSet::new();
        loop {
            let Ok((tcp, peer)) = l.accept().await else { return };
            tcp.set_nodelay(true).unwrap();
            let local = tcp.local_addr().unwrap();
            let acceptor = acceptor.clone();
            let handler = handler.clone();
            let mut ctx = hbone::ServerCtx::new(local, peer);
            tweak(&mut ctx);
            conns.spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let _ = hbone::serve(tls, ctx, handler).await;
            });
        }
    });
    (addr, task)
}

/// Opens TCP + TLS to `addr`, counting calls.
#[derive(Clone)]
pub struct Connector {
    pub addr: SocketAddr,
    pub tls: Arc<rustls::ClientConfig>,
    pub calls: Arc<AtomicUsize>,
}

impl Connector {
    pub fn new(addr: SocketAddr, pki: &Pki) -> Self {
        Self { addr, tls: pki.client.clone(), calls: Arc::new(AtomicUsize::new(0)) }
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// The closure `Pool::connect` takes.
    pub fn make(
        &self,
    ) -> impl FnOnce() -> std::pin::Pin<
        Box<
            dyn std::future::Future<
                    Output = std::io::Result<tokio_rustls::client::TlsStream<TcpStream>>,
                > + Send,
        >,
    > {
        let this = self.clone();
        move || {
            Box::pin(async move {
                this.calls.fetch_add(1, Ordering::SeqCst);
                let tcp = TcpStream::connect(this.addr).await?;
                tcp.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
                tokio_rustls::TlsConnector::from(this.tls).connect(name, tcp).await
            })
        }
    }
}

pub fn key(dst: SocketAddr) -> tlsmesh_tunnel::PoolKey {
    tlsmesh_tunnel::PoolKey { src_identity: SRC_ID.into(), dst_identity: DST_ID.into(), dst }
}

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut v = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
    v
}

pub fn sha256(data: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(data).into()
}

/// Writes `data` (then half-closes) while reading everything back; returns
/// what was read.
pub async fn echo_through<S>(stream: S, data: Vec<u8>) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let writer = tokio::spawn(async move {
        for chunk in data.chunks(100 * 1024) {
            w.write_all(chunk).await.unwrap();
        }
        w.shutdown().await.unwrap();
        w
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    drop(writer.await.unwrap());
    back
}

/// A QUIC tunnel server on 127.0.0.1.
pub fn quic_server(
    pki: &Pki,
    cfg: &quic::QuicConfig,
    handler: Arc<dyn Handler>,
) -> (SocketAddr, quinn::Endpoint) {
    let sc = quic::server_config(&pki.server, cfg).unwrap();
    let ep = quinn::Endpoint::server(sc, "127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = ep.local_addr().unwrap();
    tokio::spawn(quic::serve(ep.clone(), quic::ServerCtx::default(), handler));
    (addr, ep)
}

pub fn quic_dial(pki: &Pki) -> quic::Dial {
    quic::Dial {
        endpoint: quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap(),
        tls: pki.client.clone(),
        server_name: SERVER_NAME.into(),
    }
}

/// A handler for the resume extension's plumbing: an offered stream is
/// confirmed and attached to an echo task of the daemon's own (the server
/// does not splice it); a QUIESCE is answered with its count plus one;
/// anything else is refused (404).
pub fn attach_echo_handler(seen: Seen) -> Arc<dyn Handler> {
    use tlsmesh_tunnel::{ResponseExt, ResumeExt};
    Arc::new(move |req: ConnectRequest| {
        let seen = seen.clone();
        async move {
            seen.0.lock().unwrap().push(req.clone());
            match req.resume {
                ResumeExt::Offer { .. } => Ok(Accepted::attach(|io| {
                    tokio::spawn(async move {
                        let (mut r, mut w) = tokio::io::split(io);
                        let _ = tokio::io::copy(&mut r, &mut w).await;
                        let _ = w.shutdown().await;
                    });
                })
                .with_ext(ResponseExt { resumable: true, quiesce_sent: None })),
                ResumeExt::Quiesce { sent, .. } => Ok(Accepted::answer(ResponseExt {
                    resumable: false,
                    quiesce_sent: Some(sent + 1),
                })),
                _ => Err(Refusal::not_found("no such stream")),
            }
        }
    })
}

/// A valid resume token.
pub const TOKEN: &str = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFG";
