//! rustls configurations for the tunnel: TLS 1.3 only, AES-128-GCM,
//! AES-256-GCM and CHACHA20-POLY1305, key exchange X25519MLKEM768 preferred
//! with X25519 fallback, mutual authentication with SPIFFE certificates.
//!
//! * [`server_config`] requires a client certificate and picks its own
//!   certificate by SNI ([`sni_for`] names the destination identity) through
//!   an [`SniResolver`].
//! * [`client_config`] presents the source workload's certificate and accepts
//!   only a server whose SPIFFE ID equals the expected destination identity.
//!
//! Both verify the chain against the current [`TrustBundle`] (so rotation
//! takes effect on the next handshake), the validity period, that the URI SAN
//! is a workload SPIFFE ID of our trust domain, and the [`DenyList`]. Session
//! resumption is disabled so every handshake is fully re-verified. A refused
//! peer yields a rustls error whose text names the peer (identity, serial) and
//! the reason; [`rejection`] recovers the structured [`PeerRejected`] for logs
//! and metrics.
//!
//! ## SNI encoding of a SPIFFE ID
//!
//! `<h>.id.tlsmesh.invalid`, where `<h>` is the first 32 lowercase hex digits
//! of SHA-256 over the ID's URI text. It is always a valid DNS name whatever
//! the lengths of namespace, service account and trust domain; `.invalid` is
//! reserved (RFC 6761) so it can never collide with a real host name. The
//! server maps it back by hashing the identities it holds certificates for.

pub(crate) mod resolve;
mod verify;

use std::sync::{Arc, OnceLock};

use rustls::client::Resumption;
use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::server::{NoServerSessionStorage, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, ServerConfig};
use rustls_pki_types::{CertificateDer, ServerName};
use sha2::{Digest as _, Sha256};

pub use resolve::{CertStore, SniResolver, StaticCertStore};
pub use verify::{
    rejection, rejection_kind_in, PeerKind, PeerRejected, RejectReason, SpiffeClientVerifier,
    SpiffeServerVerifier,
};

use crate::keys::{CertInfo, KeyError};
use crate::spiffe::{Identity, SpiffeId};
use crate::trust::{DenyList, TrustBundle};

/// ALPN protocol the tunnel speaks by default (HBONE is HTTP/2 CONNECT).
pub const ALPN_H2: &[u8] = b"h2";

/// Errors building TLS configurations or reading a peer's identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot build the TLS configuration: {0}")]
    Config(#[source] rustls::Error),
    #[error("the peer presented no certificate")]
    NoPeerCertificate,
    #[error("cannot read the peer's identity: {0}")]
    PeerCertificate(#[source] KeyError),
    #[error("peer {id} is a node identity; tunnels carry only workload identities")]
    NotWorkload { id: String },
    #[error(
        "expected peer {expected} is in trust domain {:?} but the trust bundle is for {bundle:?}",
        expected.trust_domain()
    )]
    TrustDomain { expected: SpiffeId, bundle: String },
}

/// The crypto provider of every tlsmesh TLS endpoint: aws-lc-rs restricted to
/// the TLS 1.3 suites AES-128-GCM, AES-256-GCM, CHACHA20-POLY1305 and the key
/// exchanges X25519MLKEM768 (preferred) and X25519.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use aws_lc_rs::cipher_suite::{
                TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
            };
            use aws_lc_rs::kx_group::{X25519, X25519MLKEM768};
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    TLS13_AES_128_GCM_SHA256,
                    TLS13_AES_256_GCM_SHA384,
                    TLS13_CHACHA20_POLY1305_SHA256,
                ],
                kx_groups: vec![X25519MLKEM768, X25519],
                ..aws_lc_rs::default_provider()
            })
        })
        .clone()
}

/// The SNI server name that asks a tlsmesh server for `id`'s certificate
/// (see the module docs for the encoding).
pub fn sni_for(id: &SpiffeId) -> ServerName<'static> {
    ServerName::try_from(sni_string(id)).expect("hex labels always form a valid DNS name")
}

/// [`sni_for`] as a string.
pub fn sni_string(id: &SpiffeId) -> String {
    let digest = Sha256::digest(id.to_string().as_bytes());
    format!("{}.id.tlsmesh.invalid", &crate::spiffe::hex(&digest)[..32])
}

/// Server side of the tunnel: TLS 1.3, client certificate required and
/// verified by [`SpiffeClientVerifier`], own certificate chosen by `resolver`
/// (normally an [`SniResolver`]), ALPN `h2`, no session resumption.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    bundle: &TrustBundle,
    denylist: &DenyList,
) -> Result<ServerConfig, TlsError> {
    let verifier =
        Arc::new(SpiffeClientVerifier::new(bundle.clone(), denylist.clone(), PeerKind::Workload));
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Client side of the tunnel: presents `my_cert` (the source workload's
/// certificate) and accepts only a server whose chain verifies to `bundle`,
/// is not denied, and whose SPIFFE ID is exactly `expected_peer`. ALPN is
/// `h2`; set `alpn_protocols` on the result to change it. Connect with
/// [`sni_for`]`(&expected_peer)` as the server name.
pub fn client_config(
    my_cert: Arc<CertifiedKey>,
    expected_peer: SpiffeId,
    bundle: &TrustBundle,
    denylist: &DenyList,
) -> Result<ClientConfig, TlsError> {
    let td = bundle.trust_domain();
    if expected_peer.trust_domain() != td {
        return Err(TlsError::TrustDomain { expected: expected_peer, bundle: td });
    }
    let verifier = Arc::new(SpiffeServerVerifier::new(
        bundle.clone(),
        denylist.clone(),
        PeerKind::Workload,
        Some(expected_peer),
    ));
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(resolve::FixedClientCert(my_cert)));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// The workload identity of a verified peer, from
/// `ServerConnection::peer_certificates()` / `ClientConnection::peer_certificates()`.
pub fn peer_identity(certs: &[CertificateDer<'_>]) -> Result<SpiffeId, TlsError> {
    match peer_cert_info(certs)?.identity {
        Identity::Workload(id) => Ok(id),
        Identity::Node(id) => Err(TlsError::NotWorkload { id: id.to_string() }),
    }
}

/// Identity, serial and validity of a verified peer's leaf certificate (keep
/// the serial per tunnel to re-check it when the deny list changes).
pub fn peer_cert_info(certs: &[CertificateDer<'_>]) -> Result<CertInfo, TlsError> {
    let leaf = certs.first().ok_or(TlsError::NoPeerCertificate)?;
    CertInfo::from_der(leaf).map_err(TlsError::PeerCertificate)
}

#[cfg(test)]
mod tests;
