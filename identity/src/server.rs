//! The CA's network service (`tlsmesh ca serve`): TLS 1.3 on TCP, one JSON
//! request and one JSON response per connection (see [`crate::protocol`]).
//!
//! * `join` needs no client certificate: the node proves itself with a
//!   token, checked by a [`JoinAuthenticator`] (the token file, or
//!   `TokenReview` in a cluster), and gets a node certificate for the node
//!   name the authenticator proves, which must equal the one it claims.
//! * `renew_node` and `workload` need the node certificate as client
//!   certificate; the node name is taken from that certificate, never from
//!   the request, and a workload certificate is issued only for an identity
//!   placed on that node ([`crate::authz::authorize`]).
//!
//! Every refusal is logged with the node, the peer address and the reason.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use time::OffsetDateTime;
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::authz::{authorize, JoinAuthenticator, JoinRefusal, JoinTokens, SharedPlacement};
use crate::ca::{Ca, CaError, SharedCa, DEFAULT_LIFETIME};
use crate::protocol::{read_message, write_message, ErrorKind, ProtocolError, Request, Response};
use crate::spiffe::{Identity, NodeId};
use crate::tls::resolve::FixedServerCert;
use crate::tls::{peer_cert_info, PeerKind, SpiffeClientVerifier};
use crate::trust::{DenyList, TrustBundle, TrustError};

/// Errors of one CA connection (logged by [`CaServer::serve`]).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("TLS handshake with {peer} failed: {source}")]
    Handshake {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("request from {peer}: {source}")]
    Protocol {
        peer: SocketAddr,
        #[source]
        source: ProtocolError,
    },
    #[error("connection from {peer} took longer than {timeout:?}")]
    Timeout { peer: SocketAddr, timeout: Duration },
    #[error("cannot issue the CA server's own certificate: {0}")]
    Serving(#[source] CaError),
    #[error("cannot build the CA server's TLS config: {0}")]
    Config(String),
}

impl From<TrustError> for ServerError {
    fn from(e: TrustError) -> Self {
        ServerError::Config(e.to_string())
    }
}

/// Settings of the CA server.
#[derive(Debug, Clone)]
pub struct CaServerConfig {
    /// DNS names / IP addresses placed in the CA server's certificate; nodes
    /// must dial one of them (e.g. `tlsmesh-ca.tlsmesh-system.svc`).
    pub server_names: Vec<String>,
    /// Lifetime of workload certificates (default 24 h, at least 1 min).
    pub workload_lifetime: Duration,
    /// Lifetime of node certificates (default 24 h, at least 1 min).
    pub node_lifetime: Duration,
    /// Deadline for a whole connection (handshake, request, response).
    pub request_timeout: Duration,
    /// Node IDs and serials refused at join and as client certificates.
    pub deny: DenyList,
}

impl Default for CaServerConfig {
    fn default() -> Self {
        Self {
            server_names: vec!["localhost".into()],
            workload_lifetime: DEFAULT_LIFETIME,
            node_lifetime: DEFAULT_LIFETIME,
            request_timeout: Duration::from_secs(10),
            deny: DenyList::default(),
        }
    }
}

struct Serving {
    ca: Arc<Ca>,
    key: Arc<CertifiedKey>,
    renew_at: OffsetDateTime,
}

/// The CA service.
pub struct CaServer {
    ca: SharedCa,
    placement: SharedPlacement,
    auth: Arc<dyn JoinAuthenticator>,
    config: CaServerConfig,
    serving: Mutex<Option<Serving>>,
}

impl std::fmt::Debug for CaServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaServer").field("config", &self.config).finish_non_exhaustive()
    }
}

impl CaServer {
    /// Joins are checked against a token file; `placement` and `tokens`
    /// may be updated while serving.
    pub fn new(
        ca: SharedCa,
        placement: SharedPlacement,
        tokens: Arc<JoinTokens>,
        config: CaServerConfig,
    ) -> Self {
        Self::with_authenticator(ca, placement, tokens, config)
    }

    /// Joins are checked by `auth` (e.g. `TokenReview` in a cluster).
    pub fn with_authenticator(
        ca: SharedCa,
        placement: SharedPlacement,
        auth: Arc<dyn JoinAuthenticator>,
        config: CaServerConfig,
    ) -> Self {
        Self { ca, placement, auth, config, serving: Mutex::new(None) }
    }

    /// Accepts connections until the task is dropped; each is handled in
    /// its own task. Never returns on per-connection errors (they are logged).
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, names = ?self.config.server_names, "CA server listening");
        }
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "CA server accept failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let this = self.clone();
            tokio::spawn(async move {
                let timeout = this.config.request_timeout;
                let result = tokio::time::timeout(timeout, this.connection(stream, peer))
                    .await
                    .unwrap_or(Err(ServerError::Timeout { peer, timeout }));
                if let Err(e) = result {
                    tracing::warn!(%peer, error = %e, "CA connection failed");
                }
            });
        }
    }

    async fn connection(&self, stream: TcpStream, peer: SocketAddr) -> Result<(), ServerError> {
        let config = self.tls_config()?;
        let tls = TlsAcceptor::from(config)
            .accept(stream)
            .await
            .map_err(|source| ServerError::Handshake { peer, source })?;
        let node = tls.get_ref().1.peer_certificates().and_then(|certs| {
            match peer_cert_info(certs).ok()?.identity {
                Identity::Node(n) => Some(n),
                Identity::Workload(_) => None,
            }
        });
        let (read, mut write) = tokio::io::split(tls);
        let mut read = BufReader::new(read);
        let response = match read_message::<Request>(&mut read).await {
            Ok(request) => self.handle(node.as_ref(), request, peer).await,
            Err(e) => Response::Error { kind: ErrorKind::BadRequest, message: e.to_string() },
        };
        write_message(&mut write, &response)
            .await
            .map_err(|source| ServerError::Protocol { peer, source })?;
        // Best effort close_notify; the client has its answer already.
        let _ = write.shutdown().await;
        Ok(())
    }

    /// The answer to one request from `peer`, authenticated as `node` (from
    /// its verified client certificate) or anonymous. The only IO is the
    /// join authenticator's (none for a token file).
    pub async fn handle(
        &self,
        node: Option<&NodeId>,
        request: Request,
        peer: SocketAddr,
    ) -> Response {
        if let Request::Join { node: claimed, token, csr } = request {
            return match self.authenticate_join(&claimed, &token, peer).await {
                Ok(()) => self.join(&claimed, &csr, peer),
                Err(refused) => refused,
            };
        }
        let ca = self.ca.current();
        let now = OffsetDateTime::now_utc();
        let ok = |chain: String| Response::Ok { chain, bundle: ca.roots_pem() };
        let refuse = |kind, message: String| {
            tracing::warn!(%peer, node = node.map(NodeId::name), ?kind, "CA request refused: {message}");
            Response::Error { kind, message }
        };
        match request {
            Request::Join { .. } => unreachable!("handled above"),
            Request::RenewNode { csr } => {
                let Some(node) = node else {
                    return refuse(ErrorKind::Unauthenticated, NEED_NODE_CERT.into());
                };
                match ca.issue(&csr, &Identity::Node(node.clone()), self.config.node_lifetime, now)
                {
                    Ok(issued) => {
                        tracing::info!(%peer, node = node.name(), serial = %issued.info.serial, "renewed node certificate");
                        ok(issued.chain_pem)
                    }
                    Err(e) => refuse(ca_error_kind(&e), e.to_string()),
                }
            }
            Request::Workload { id, csr } => {
                let Some(node) = node else {
                    return refuse(ErrorKind::Unauthenticated, NEED_NODE_CERT.into());
                };
                if let Err(denied) = authorize(node, &id, &self.placement.current()) {
                    return refuse(ErrorKind::Denied, denied.to_string());
                }
                match ca.issue(
                    &csr,
                    &Identity::Workload(id.clone()),
                    self.config.workload_lifetime,
                    now,
                ) {
                    Ok(issued) => {
                        tracing::info!(%peer, node = node.name(), %id, serial = %issued.info.serial, "issued workload certificate");
                        ok(issued.chain_pem)
                    }
                    Err(e) => refuse(ca_error_kind(&e), e.to_string()),
                }
            }
            Request::Bundle => ok(String::new()),
        }
    }

    /// Runs the join authenticator; `Err` is the refusal to send. The token
    /// is never logged, and the node learns only the class of the refusal.
    async fn authenticate_join(
        &self,
        claimed: &str,
        token: &str,
        peer: SocketAddr,
    ) -> Result<(), Response> {
        match self.auth.authenticate(claimed, token).await {
            Ok(proven) if proven == claimed => Ok(()),
            Ok(proven) => {
                tracing::warn!(%peer, node = %claimed, token_node = %proven, "join refused: the token belongs to node {proven:?}, not to the node {claimed:?} the request claims");
                Err(Response::Error {
                    kind: ErrorKind::Unauthenticated,
                    message: format!(
                        "join refused for node {claimed:?}: the token belongs to another node (is the daemon's node name right? the CA log has details)"
                    ),
                })
            }
            Err(JoinRefusal::Unauthenticated(reason)) => {
                tracing::warn!(%peer, node = %claimed, %reason, "join refused");
                Err(Response::Error {
                    kind: ErrorKind::Unauthenticated,
                    message: format!(
                        "join refused for node {claimed:?}: wrong or unknown join token (the CA log has details)"
                    ),
                })
            }
            Err(JoinRefusal::Unavailable(reason)) => {
                tracing::warn!(%peer, node = %claimed, %reason, "join not checked: the authenticator is unavailable");
                Err(Response::Error {
                    kind: ErrorKind::Internal,
                    message: format!(
                        "join of node {claimed:?} could not be checked right now; retry (the CA log has details)"
                    ),
                })
            }
        }
    }

    /// Issues the node certificate of an authenticated join.
    fn join(&self, name: &str, csr: &str, peer: SocketAddr) -> Response {
        let ca = self.ca.current();
        let refuse = |kind, message: String| {
            tracing::warn!(%peer, node = %name, ?kind, "CA request refused: {message}");
            Response::Error { kind, message }
        };
        let id = match NodeId::new(ca.trust_domain(), name) {
            Ok(id) => id,
            Err(e) => return refuse(ErrorKind::BadRequest, e.to_string()),
        };
        if let Err(e) = self.config.deny.check(&Identity::Node(id.clone()), &[]) {
            return refuse(ErrorKind::Denied, format!("join refused: {e}"));
        }
        let now = OffsetDateTime::now_utc();
        match ca.issue(csr, &Identity::Node(id), self.config.node_lifetime, now) {
            Ok(issued) => {
                tracing::info!(%peer, node = %name, serial = %issued.info.serial, "node joined");
                Response::Ok { chain: issued.chain_pem, bundle: ca.roots_pem() }
            }
            Err(e) => refuse(ca_error_kind(&e), e.to_string()),
        }
    }

    fn tls_config(&self) -> Result<Arc<ServerConfig>, ServerError> {
        let ca = self.ca.current();
        let key = self.serving_key(&ca)?;
        let bundle = TrustBundle::new(ca.trust_domain(), ca.roots().to_vec())?;
        let verifier =
            SpiffeClientVerifier::optional(bundle, self.config.deny.clone(), PeerKind::Node);
        let mut config = ServerConfig::builder_with_provider(crate::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ServerError::Config(e.to_string()))?
            .with_client_cert_verifier(Arc::new(verifier))
            .with_cert_resolver(Arc::new(FixedServerCert(key)));
        config.send_tls13_tickets = 0;
        Ok(Arc::new(config))
    }

    /// The CA server's own certificate, re-issued at half-life or when the CA changes.
    fn serving_key(&self, ca: &Arc<Ca>) -> Result<Arc<CertifiedKey>, ServerError> {
        let now = OffsetDateTime::now_utc();
        let mut serving = self.serving.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = serving.as_ref() {
            if Arc::ptr_eq(&s.ca, ca) && now < s.renew_at {
                return Ok(s.key.clone());
            }
        }
        let lifetime = DEFAULT_LIFETIME;
        let (chain, key) = ca
            .issue_serving(&self.config.server_names, lifetime, now)
            .map_err(ServerError::Serving)?;
        let certified = key.certified_key_der(chain).map_err(|e| {
            ServerError::Serving(CaError::Parse { path: "serving certificate".into(), source: e })
        })?;
        *serving =
            Some(Serving { ca: ca.clone(), key: certified.clone(), renew_at: now + lifetime / 2 });
        Ok(certified)
    }
}

const NEED_NODE_CERT: &str =
    "this request needs the node certificate as TLS client certificate; join with the node's token first";

fn ca_error_kind(e: &CaError) -> ErrorKind {
    match e {
        CaError::BadCsr { .. } | CaError::Lifetime { .. } | CaError::TrustDomain { .. } => {
            ErrorKind::BadRequest
        }
        _ => ErrorKind::Internal,
    }
}
