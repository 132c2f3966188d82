//! Certificate verifiers for SPIFFE peers: webpki path validation (chain to
//! the current trust bundle, validity period, key usage) without DNS name
//! checks, then the SPIFFE checks (one URI SAN, our trust domain, the right
//! kind of identity, the expected ID) and the deny list.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::keys::CertInfo;
use crate::spiffe::{serial_hex, Identity, SpiffeId};
use crate::trust::{BundleState, DenyList, Revoked, TrustBundle};

/// Which kind of identity a verifier accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerKind {
    /// Workload IDs `spiffe://<td>/ns/<ns>/sa/<sa>` (the tunnel).
    Workload,
    /// Node IDs `spiffe://<td>/node/<name>` (the CA server's clients).
    Node,
}

/// Why a peer certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RejectReason {
    /// The chain does not lead to a root in the trust bundle.
    ForeignCa,
    Expired {
        not_after: Option<OffsetDateTime>,
    },
    NotYetValid {
        not_before: Option<OffsetDateTime>,
    },
    /// Chain problems other than the above (bad signature, wrong key usage…).
    BadChain {
        detail: String,
    },
    /// No usable SPIFFE ID in the certificate.
    NoSpiffeId {
        detail: String,
    },
    ForeignTrustDomain {
        expected: String,
    },
    WrongKind {
        expected: PeerKind,
    },
    WrongIdentity {
        expected: SpiffeId,
    },
    Revoked(Revoked),
}

/// Every [`RejectReason::kind`], for [`rejection_kind_in`].
const KINDS: [&str; 9] = [
    "foreign_ca",
    "expired",
    "not_yet_valid",
    "bad_chain",
    "no_spiffe_id",
    "foreign_trust_domain",
    "wrong_kind",
    "wrong_identity",
    "revoked",
];

/// The [`RejectReason::kind`] named in the text of a refusal (a
/// [`PeerRejected`] shown as `peer … refused (<kind>): …`), where only the
/// text survived: QUIC's transport error carries the TLS error as a string.
pub fn rejection_kind_in(text: &str) -> Option<&'static str> {
    let (_, rest) = text.split_once(" refused (")?;
    let (kind, _) = rest.split_once(')')?;
    KINDS.into_iter().find(|k| *k == kind)
}

impl RejectReason {
    /// A short stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            RejectReason::ForeignCa => "foreign_ca",
            RejectReason::Expired { .. } => "expired",
            RejectReason::NotYetValid { .. } => "not_yet_valid",
            RejectReason::BadChain { .. } => "bad_chain",
            RejectReason::NoSpiffeId { .. } => "no_spiffe_id",
            RejectReason::ForeignTrustDomain { .. } => "foreign_trust_domain",
            RejectReason::WrongKind { .. } => "wrong_kind",
            RejectReason::WrongIdentity { .. } => "wrong_identity",
            RejectReason::Revoked(_) => "revoked",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectReason::ForeignCa => f.write_str(
                "certificate is not issued by a CA in our trust bundle (foreign CA); add that CA's root to the trust bundle if it should be trusted",
            ),
            RejectReason::Expired { not_after: Some(t) } => write!(
                f,
                "certificate expired at {t}; the peer's daemon is not renewing it (can it reach the CA?) or the clocks differ"
            ),
            RejectReason::Expired { not_after: None } => f.write_str("certificate expired"),
            RejectReason::NotYetValid { not_before: Some(t) } => write!(
                f,
                "certificate is not valid before {t}; check clock skew between the nodes (NTP)"
            ),
            RejectReason::NotYetValid { not_before: None } => {
                f.write_str("certificate is not yet valid; check clock skew between the nodes (NTP)")
            }
            RejectReason::BadChain { detail } => write!(f, "invalid certificate chain: {detail}"),
            RejectReason::NoSpiffeId { detail } => write!(f, "no usable SPIFFE ID: {detail}"),
            RejectReason::ForeignTrustDomain { expected } => write!(
                f,
                "SPIFFE ID is outside our trust domain {expected:?} (foreign trust domain)"
            ),
            RejectReason::WrongKind { expected: PeerKind::Workload } => {
                f.write_str("presents a node identity where a workload identity is required")
            }
            RejectReason::WrongKind { expected: PeerKind::Node } => f.write_str(
                "presents a workload identity where a node identity is required (use the node credential)",
            ),
            RejectReason::WrongIdentity { expected } => {
                write!(f, "wrong SPIFFE ID: expected {expected}")
            }
            RejectReason::Revoked(r) => r.fmt(f),
        }
    }
}

/// A refused peer: who (as far as its certificate says) and why.
#[derive(Clone, thiserror::Error)]
#[error("peer {peer} refused ({}): {reason}", reason.kind())]
pub struct PeerRejected {
    /// `<spiffe id> (serial <hex>)`, or what could be read of it.
    pub peer: String,
    pub reason: RejectReason,
}

// rustls prints `CertificateError::Other` with `{:?}`; make that readable.
impl fmt::Debug for PeerRejected {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<PeerRejected> for rustls::Error {
    fn from(r: PeerRejected) -> Self {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(r))))
    }
}

/// The [`PeerRejected`] inside a rustls handshake error, if the refusal came
/// from a tlsmesh verifier (on the refusing side).
pub fn rejection(err: &rustls::Error) -> Option<&PeerRejected> {
    match err {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(inner))) => {
            inner.downcast_ref::<PeerRejected>()
        }
        _ => None,
    }
}

/// The decision shared by both verifiers, given the outcome of webpki path
/// validation (`chain`). Pure apart from parsing.
fn check_peer(
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    chain: Result<(), rustls::Error>,
    bundle: &BundleState,
    deny: &crate::trust::DenySet,
    kind: PeerKind,
    expected: Option<&SpiffeId>,
) -> Result<Identity, PeerRejected> {
    let parsed = CertInfo::from_der(end_entity);
    let peer = match &parsed {
        Ok(info) => info.to_string(),
        Err(_) => X509Certificate::from_der(end_entity).map_or_else(
            |_| "with an unparseable certificate".to_owned(),
            |(_, c)| format!("without SPIFFE ID (serial {})", serial_hex(c.raw_serial())),
        ),
    };
    let reject = |reason| PeerRejected { peer: peer.clone(), reason };

    if let Err(e) = chain {
        let (nb, na) =
            parsed.as_ref().map_or((None, None), |i| (Some(i.not_before), Some(i.not_after)));
        let reason = match e {
            rustls::Error::InvalidCertificate(ce) => match ce {
                // BadSignature: an issuer with a trusted name but another key.
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    RejectReason::ForeignCa
                }
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    RejectReason::Expired { not_after: na }
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    RejectReason::NotYetValid { not_before: nb }
                }
                CertificateError::Revoked => RejectReason::Revoked(Revoked::Serial {
                    serial: parsed.as_ref().map(|i| i.serial.clone()).unwrap_or_default(),
                }),
                other => RejectReason::BadChain { detail: format!("{other}") },
            },
            other => RejectReason::BadChain { detail: other.to_string() },
        };
        return Err(reject(reason));
    }
    let info = parsed.map_err(|e| reject(RejectReason::NoSpiffeId { detail: e.to_string() }))?;
    if info.identity.trust_domain() != bundle.trust_domain() {
        return Err(reject(RejectReason::ForeignTrustDomain {
            expected: bundle.trust_domain().to_owned(),
        }));
    }
    let kind_ok = matches!(
        (&info.identity, kind),
        (Identity::Workload(_), PeerKind::Workload) | (Identity::Node(_), PeerKind::Node)
    );
    if !kind_ok {
        return Err(reject(RejectReason::WrongKind { expected: kind }));
    }
    let mut serials = vec![info.serial.clone()];
    serials.extend(intermediates.iter().filter_map(|c| {
        X509Certificate::from_der(c).ok().map(|(_, c)| serial_hex(c.raw_serial()))
    }));
    let serial_refs: Vec<&str> = serials.iter().map(String::as_str).collect();
    deny.check(&info.identity, &serial_refs).map_err(|r| reject(RejectReason::Revoked(r)))?;
    if let Some(expected) = expected {
        if !matches!(&info.identity, Identity::Workload(id) if id == expected) {
            return Err(reject(RejectReason::WrongIdentity { expected: expected.clone() }));
        }
    }
    Ok(info.identity)
}

fn log_rejection(side: &str, r: &PeerRejected) {
    tracing::warn!(side, peer = %r.peer, reason = r.reason.kind(), "refused TLS peer: {r}");
}

/// Verifies server certificates (client side): chain to the bundle without
/// DNS-name checks, then SPIFFE identity, deny list and the expected ID.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: TrustBundle,
    deny: DenyList,
    kind: PeerKind,
    expected: Option<SpiffeId>,
}

impl SpiffeServerVerifier {
    /// `expected: None` accepts any identity of `kind` (used nowhere in the
    /// tunnel; the tunnel always knows the destination identity).
    pub fn new(
        bundle: TrustBundle,
        deny: DenyList,
        kind: PeerKind,
        expected: Option<SpiffeId>,
    ) -> Self {
        Self { bundle, deny, kind, expected }
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bundle = self.bundle.current();
        let chain = ParsedCertificate::try_from(end_entity).and_then(|parsed| {
            verify_server_cert_signed_by_trust_anchor(
                &parsed,
                &bundle.root_store(),
                intermediates,
                now,
                super::provider().signature_verification_algorithms.all,
            )
        });
        check_peer(
            end_entity,
            intermediates,
            chain,
            &bundle,
            &self.deny.current(),
            self.kind,
            self.expected.as_ref(),
        )
        .map(|_| ServerCertVerified::assertion())
        .map_err(|r| {
            log_rejection("client", &r);
            r.into()
        })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &super::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &super::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        super::provider().signature_verification_algorithms.supported_schemes()
    }
}

/// Verifies client certificates (server side): webpki client-auth path
/// validation against the current bundle, then SPIFFE identity and deny list.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: TrustBundle,
    deny: DenyList,
    kind: PeerKind,
    mandatory: bool,
    /// The webpki verifier for the bundle generation it was built from.
    cache: Mutex<Option<(u64, Arc<dyn ClientCertVerifier>)>>,
}

impl SpiffeClientVerifier {
    /// A verifier that requires a client certificate of `kind`.
    pub fn new(bundle: TrustBundle, deny: DenyList, kind: PeerKind) -> Self {
        Self { bundle, deny, kind, mandatory: true, cache: Mutex::new(None) }
    }

    /// A verifier that lets clients without a certificate through (the CA
    /// server's join request), but verifies any certificate presented.
    pub fn optional(bundle: TrustBundle, deny: DenyList, kind: PeerKind) -> Self {
        Self { mandatory: false, ..Self::new(bundle, deny, kind) }
    }

    fn webpki(&self, bundle: &BundleState) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((generation, v)) = cache.as_ref() {
            if *generation == bundle.generation() {
                return Ok(v.clone());
            }
        }
        let v = WebPkiClientVerifier::builder_with_provider(bundle.root_store(), super::provider())
            .build()
            .map_err(|e| rustls::Error::General(format!("cannot build client verifier: {e}")))?;
        *cache = Some((bundle.generation(), v.clone()));
        Ok(v)
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Each tlsmesh client has exactly one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let bundle = self.bundle.current();
        let chain = self
            .webpki(&bundle)
            .and_then(|v| v.verify_client_cert(end_entity, intermediates, now))
            .map(|_| ());
        check_peer(end_entity, intermediates, chain, &bundle, &self.deny.current(), self.kind, None)
            .map(|_| ClientCertVerified::assertion())
            .map_err(|r| {
                log_rejection("server", &r);
                r.into()
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &super::provider().signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &super::provider().signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        super::provider().signature_verification_algorithms.supported_schemes()
    }
}
