//! The node daemon's client of the CA server: join with a token to get the
//! node credential, renew it, and request workload certificates with it.
//! [`CaClient`] is a [`CertSource`] for the [`crate::manager::CertManager`].
//!
//! Every successful response carries the CA's trust bundle; when it differs
//! from the client's [`TrustBundle`] the bundle is replaced, so a CA rotation
//! reaches the nodes with their next renewal (at most half a certificate
//! lifetime later).

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::client::{Resumption, WebPkiServerVerifier};
use rustls::sign::CertifiedKey;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use time::OffsetDateTime;
use tokio::io::{AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::keys::{certs_from_pem, CertInfo, KeyError, PrivateKey};
use crate::manager::{BoxFuture, CertSource, SourceError};
use crate::protocol::{read_message, write_message, ErrorKind, ProtocolError, Request, Response};
use crate::spiffe::{Identity, NodeId, SpiffeError, SpiffeId};
use crate::trust::TrustBundle;

/// Errors talking to the CA.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the CA at {addr}: {source}; check the CA address and that port 15012 is reachable (NetworkPolicy, firewall)")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with the CA at {addr} failed: {source}; check that {server_name:?} is one of the CA's server names and that the node's trust bundle holds the CA root")]
    Handshake {
        addr: String,
        server_name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the CA at {addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("talking to the CA at {addr}: {source}")]
    Protocol {
        addr: String,
        #[source]
        source: ProtocolError,
    },
    #[error("the CA refused ({kind:?}): {message}")]
    Refused { kind: ErrorKind, message: String },
    #[error("this node has no node credential yet; call join with the node's join token first")]
    NotJoined,
    #[error("invalid CA server name {0:?}; use a DNS name or IP address from the CA's --server-name list")]
    ServerName(String),
    #[error("node name {node:?} is invalid: {source}")]
    NodeName {
        node: String,
        #[source]
        source: SpiffeError,
    },
    #[error("cannot build the TLS config for the CA: {0}")]
    Config(String),
    #[error("{0}")]
    Key(#[from] KeyError),
    #[error("the CA returned a certificate for {got}, expected {expected}")]
    WrongIdentity { expected: String, got: String },
}

/// Where the CA is and how to trust it.
#[derive(Debug, Clone)]
pub struct CaClientConfig {
    /// `host:port` of the CA server (port 15012 by default).
    pub addr: String,
    /// The name to verify the CA's certificate against (one of its
    /// `server_names`).
    pub server_name: String,
    /// The trust bundle holding the CA root; replaced by the bundle the CA
    /// sends back.
    pub trust: TrustBundle,
    /// This node's name.
    pub node: String,
    /// Deadline per request.
    pub timeout: Duration,
}

/// The node's own certificate and key, used as TLS client certificate.
struct NodeCredential {
    key: Arc<CertifiedKey>,
    info: CertInfo,
    /// max(notBefore, time received).
    start: OffsetDateTime,
}

/// A client of the CA server for one node.
pub struct CaClient {
    config: CaClientConfig,
    node: NodeId,
    credential: RwLock<Option<Arc<NodeCredential>>>,
    renewing: tokio::sync::Mutex<()>,
}

impl fmt::Debug for CaClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaClient")
            .field("addr", &self.config.addr)
            .field("node", &self.node.to_string())
            .finish_non_exhaustive()
    }
}

impl CaClient {
    pub fn new(config: CaClientConfig) -> Result<Self, ClientError> {
        let node = NodeId::new(config.trust.trust_domain(), &config.node)
            .map_err(|source| ClientError::NodeName { node: config.node.clone(), source })?;
        ServerName::try_from(config.server_name.clone())
            .map_err(|_| ClientError::ServerName(config.server_name.clone()))?;
        Ok(Self {
            config,
            node,
            credential: RwLock::new(None),
            renewing: tokio::sync::Mutex::new(()),
        })
    }

    /// Bootstraps with the node's join token: obtains the node certificate
    /// (for a key generated here). Returns its facts.
    pub async fn join(&self, token: &str) -> Result<CertInfo, ClientError> {
        let key = PrivateKey::generate()?;
        let csr = key.csr_pem(&Identity::Node(self.node.clone()))?;
        let request =
            Request::Join { node: self.node.name().to_owned(), token: token.to_owned(), csr };
        let chain = self.call(&request, None).await?;
        let info = self.install_credential(&key, &chain)?;
        tracing::info!(node = %self.node, serial = %info.serial, not_after = %info.not_after, "joined the CA");
        Ok(info)
    }

    /// Renews the node certificate with the current one (new key).
    pub async fn renew_node(&self) -> Result<CertInfo, ClientError> {
        let _guard = self.renewing.lock().await;
        let current = self.credential().ok_or(ClientError::NotJoined)?;
        let key = PrivateKey::generate()?;
        let csr = key.csr_pem(&Identity::Node(self.node.clone()))?;
        let chain = self.call(&Request::RenewNode { csr }, Some(current.key.clone())).await?;
        let info = self.install_credential(&key, &chain)?;
        tracing::info!(node = %self.node, serial = %info.serial, not_after = %info.not_after, "renewed node certificate");
        Ok(info)
    }

    /// Requests a workload certificate for `id` from a PEM CSR; returns the
    /// chain PEM. Renews the node certificate first if it is past half-life
    /// (if that fails, the still-valid old one is used).
    pub async fn request(&self, csr_pem: &str, id: &SpiffeId) -> Result<String, ClientError> {
        let mut current = self.credential().ok_or(ClientError::NotJoined)?;
        let now = OffsetDateTime::now_utc();
        let half = current.start + (current.info.not_after - current.start) / 2;
        if now >= half {
            match self.renew_node().await {
                Ok(_) => current = self.credential().ok_or(ClientError::NotJoined)?,
                Err(e) if now < current.info.not_after => {
                    tracing::warn!(node = %self.node, error = %e, "node certificate renewal failed; using the current one");
                }
                Err(e) => return Err(e),
            }
        }
        let request = Request::Workload { id: id.clone(), csr: csr_pem.to_owned() };
        self.call(&request, Some(current.key.clone())).await
    }

    /// Fetches the CA's trust bundle (PEM) and installs it.
    pub async fn fetch_bundle(&self) -> Result<String, ClientError> {
        let cred = self.credential().map(|c| c.key.clone());
        self.call(&Request::Bundle, cred).await?;
        Ok(self.config.trust.to_pem())
    }

    /// Facts of the node certificate, if joined.
    pub fn node_certificate(&self) -> Option<CertInfo> {
        self.credential().map(|c| c.info.clone())
    }

    fn credential(&self) -> Option<Arc<NodeCredential>> {
        self.credential.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    fn install_credential(&self, key: &PrivateKey, chain: &str) -> Result<CertInfo, ClientError> {
        let certified = key.certified_key(chain)?;
        let info = CertInfo::from_der(&certified.cert[0])?;
        if info.identity != Identity::Node(self.node.clone()) {
            return Err(ClientError::WrongIdentity {
                expected: self.node.to_string(),
                got: info.identity.to_string(),
            });
        }
        let start = info.not_before.max(OffsetDateTime::now_utc());
        *self.credential.write().unwrap_or_else(PoisonError::into_inner) =
            Some(Arc::new(NodeCredential { key: certified, info: info.clone(), start }));
        Ok(info)
    }

    /// One request/response exchange; returns the `chain` of an Ok answer.
    async fn call(
        &self,
        request: &Request,
        client_cert: Option<Arc<CertifiedKey>>,
    ) -> Result<String, ClientError> {
        let addr = self.config.addr.clone();
        let timeout = self.config.timeout;
        tokio::time::timeout(timeout, self.exchange(request, client_cert))
            .await
            .unwrap_or(Err(ClientError::Timeout { addr, timeout }))
    }

    async fn exchange(
        &self,
        request: &Request,
        client_cert: Option<Arc<CertifiedKey>>,
    ) -> Result<String, ClientError> {
        let addr = &self.config.addr;
        let config = self.tls_config(client_cert)?;
        let server_name = ServerName::try_from(self.config.server_name.clone())
            .map_err(|_| ClientError::ServerName(self.config.server_name.clone()))?;
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr: addr.clone(), source })?;
        let tls = TlsConnector::from(Arc::new(config)).connect(server_name, tcp).await.map_err(
            |source| ClientError::Handshake {
                addr: addr.clone(),
                server_name: self.config.server_name.clone(),
                source,
            },
        )?;
        let (read, mut write) = tokio::io::split(tls);
        let protocol = |source| ClientError::Protocol { addr: addr.clone(), source };
        write_message(&mut write, request).await.map_err(protocol)?;
        let response: Response = read_message(&mut BufReader::new(read)).await.map_err(protocol)?;
        let _ = write.shutdown().await;
        match response {
            Response::Ok { chain, bundle } => {
                self.update_bundle(&bundle);
                Ok(chain)
            }
            Response::Error { kind, message } => Err(ClientError::Refused { kind, message }),
        }
    }

    fn update_bundle(&self, pem: &str) {
        let Ok(roots) = certs_from_pem(pem, "the CA's trust bundle") else {
            tracing::warn!("the CA sent an unreadable trust bundle; keeping the current one");
            return;
        };
        if roots != self.config.trust.roots() {
            match self.config.trust.replace(roots) {
                Ok(()) => tracing::info!(
                    roots = self.config.trust.roots().len(),
                    "installed the trust bundle sent by the CA"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, "the CA sent an unusable trust bundle; keeping the current one");
                }
            }
        }
    }

    fn tls_config(
        &self,
        client_cert: Option<Arc<CertifiedKey>>,
    ) -> Result<ClientConfig, ClientError> {
        let provider = crate::tls::provider();
        let verifier = WebPkiServerVerifier::builder_with_provider(
            self.config.trust.current().root_store(),
            provider.clone(),
        )
        .build()
        .map_err(|e| ClientError::Config(e.to_string()))?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| ClientError::Config(e.to_string()))?
            .with_webpki_verifier(verifier);
        let mut config = match client_cert {
            Some(key) => builder
                .with_client_cert_resolver(Arc::new(crate::tls::resolve::FixedClientCert(key))),
            None => builder.with_no_client_auth(),
        };
        config.resumption = Resumption::disabled();
        Ok(config)
    }
}

impl CertSource for CaClient {
    fn issue<'a>(
        &'a self,
        csr_pem: &'a str,
        id: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<String, SourceError>> {
        Box::pin(async move { self.request(csr_pem, id).await.map_err(Into::into) })
    }
}
