//! The built-in certificate authority: a signing certificate and key (a
//! self-signed root made by [`CaFiles::init`], or an external intermediate such
//! as a cert-manager Secret), and issuance of short-lived SPIFFE certificates
//! from CSRs. The CA never sees a workload's private key.
//!
//! [`Ca`] is the in-memory, validated CA (pure: every time-dependent call takes
//! `now`). [`CaFiles`] is the file edge: `ca init`, loading with permission
//! checks, and reloading when the files change. [`SharedCa`] is the handle the
//! server and local sources sign with; reloads swap it atomically.

mod files;

use std::fmt;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::server::ParsedCertificate;
use rustls::RootCertStore;
use rustls_pki_types::{CertificateDer, UnixTime};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

pub use files::{CaFiles, CaPaths, Overwrite};

use crate::keys::{certs_to_pem, CertInfo, KeyError, PrivateKey};
use crate::spiffe::{Identity, SpiffeId};

/// Default lifetime of workload and node certificates.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Shortest lifetime the CA issues.
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);
/// Longest lifetime the CA issues to workloads and nodes.
pub const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
/// Issued certificates start this far in the past so peers with a slightly
/// slow clock accept them.
pub const BACKDATE: Duration = Duration::from_secs(60);

/// Errors of the CA: loading its files, validating them, and signing.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("cannot read {path}: {source}; check the path and that this process may read it")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} already exists; refusing to overwrite a CA (remove it first, or ask for overwrite with --force)"
    )]
    Exists { path: String },
    #[error(
        "private key {path} is readable by group or others (mode {mode:04o}); run `chmod 600 {path}` (for a Kubernetes Secret volume set defaultMode: 0400)"
    )]
    KeyPermissions { path: String, mode: u32 },
    #[error("{path}: {source}")]
    Parse {
        path: String,
        #[source]
        source: KeyError,
    },
    #[error(
        "the first certificate in {path} is not a CA certificate (basicConstraints CA:TRUE missing); put the CA/intermediate certificate first, then its chain"
    )]
    NotCa { path: String },
    #[error(
        "the CA certificate in {path} does not allow certificate signing (keyUsage lacks keyCertSign)"
    )]
    CannotSign { path: String },
    #[error(
        "private key {key} does not belong to certificate {cert}; both must come from the same `tlsmesh ca init` run or the same Secret"
    )]
    KeyMismatch { cert: String, key: String },
    #[error(
        "certificate {path} is not valid before {not_before} but the clock says {now}: fix this host's clock (NTP) or wait until it becomes valid"
    )]
    NotYetValid { path: String, not_before: OffsetDateTime, now: OffsetDateTime },
    #[error(
        "certificate {path} expired at {not_after} (now {now}); rotate the CA (docs/IDENTITY.md, \"CA rotation\")"
    )]
    Expired { path: String, not_after: OffsetDateTime, now: OffsetDateTime },
    #[error(
        "{path} has no root certificate: append the self-signed root to it (after the intermediates) or pass a trust bundle file"
    )]
    NoTrustAnchor { path: String },
    #[error(
        "certificates issued with {path} would not verify against the trust bundle: {reason}; check that the chain in the file is complete and in order (CA first, root last)"
    )]
    BrokenChain { path: String, reason: String },
    #[error("the certificate signing request is invalid: {reason}")]
    BadCsr { reason: String },
    #[error("certificate lifetime of {secs} s is out of range: use between 60 s and 366 days")]
    Lifetime { secs: u64 },
    #[error("{id} is not in this CA's trust domain {trust_domain:?}")]
    TrustDomain { id: String, trust_domain: String },
    #[error("the CA expires at {ca_not_after}, before {id} would be issued for even one minute; rotate the CA")]
    CaExpiring { id: String, ca_not_after: OffsetDateTime },
    #[error("signing failed: {0}")]
    Sign(#[source] rcgen::Error),
}

/// A certificate just issued by the CA.
#[derive(Debug, Clone)]
pub struct Issued {
    /// Leaf first, then the CA chain up to (not including) the root.
    pub chain: Vec<CertificateDer<'static>>,
    /// `chain` as PEM.
    pub chain_pem: String,
    pub info: CertInfo,
}

/// A freshly generated CA certificate and key (from [`Ca::generate_root`] or
/// [`Ca::generate_intermediate`]).
#[derive(Debug)]
pub struct GeneratedCa {
    /// The CA certificate, followed by its chain up to and including the root.
    pub cert_pem: String,
    pub key: PrivateKey,
}

/// A validated, in-memory CA able to sign.
pub struct Ca {
    trust_domain: String,
    issuer: rcgen::Issuer<'static, PrivateKey>,
    /// Signing certificate, then intermediates, without self-signed roots.
    chain: Vec<CertificateDer<'static>>,
    roots: Vec<CertificateDer<'static>>,
    not_after: OffsetDateTime,
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl rcgen::PublicKeyData for PrivateKey {
    fn der_bytes(&self) -> &[u8] {
        rcgen::PublicKeyData::der_bytes(self.key_pair())
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        rcgen::PublicKeyData::algorithm(self.key_pair())
    }
}

impl rcgen::SigningKey for PrivateKey {
    fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.key_pair().sign(msg)
    }
}

impl Ca {
    /// Generates a self-signed ECDSA P-256 root valid from now for `validity`.
    pub fn generate_root(
        trust_domain: &str,
        validity: Duration,
    ) -> Result<(Ca, GeneratedCa), CaError> {
        let now = OffsetDateTime::now_utc();
        let generated = Self::generate_root_at(trust_domain, now - BACKDATE, now + validity)?;
        let ca = Ca::from_pem(
            &generated.cert_pem,
            &generated.key.to_pem(),
            &[],
            trust_domain,
            now,
            &PemNames::memory(),
        )?;
        Ok((ca, generated))
    }

    /// Generates a self-signed ECDSA P-256 root with explicit validity bounds
    /// (tests use it to make not-yet-valid and expired CAs).
    pub fn generate_root_at(
        trust_domain: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<GeneratedCa, CaError> {
        let key = PrivateKey::generate()
            .map_err(|source| CaError::Parse { path: "new root key".into(), source })?;
        let mut params = ca_params(trust_domain, "root", not_before, not_after)?;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(CaError::Sign)?;
        Ok(GeneratedCa { cert_pem: cert.pem(), key })
    }

    /// Issues an intermediate CA below this one (ECDSA P-256), e.g. to hand
    /// to another cluster or to test the external-CA path. Its `cert_pem`
    /// holds the intermediate followed by this CA's chain and root.
    pub fn generate_intermediate(
        &self,
        validity: Duration,
        now: OffsetDateTime,
    ) -> Result<GeneratedCa, CaError> {
        let key = PrivateKey::generate()
            .map_err(|source| CaError::Parse { path: "new intermediate key".into(), source })?;
        let not_after = (now + validity).min(self.not_after);
        let mut params = ca_params(&self.trust_domain, "intermediate", now - BACKDATE, not_after)?;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(CaError::Sign)?;
        let mut pem = cert.pem();
        pem.push_str(&certs_to_pem(self.chain.iter().chain(&self.roots)));
        Ok(GeneratedCa { cert_pem: pem, key })
    }

    /// Validates and loads a CA from PEM. `cert_pem` holds the signing
    /// certificate first, then any intermediates, optionally ending with the
    /// self-signed root. `extra_roots` are further trust anchors (a bundle
    /// file). Checks: the certificate is a CA allowed to sign, the key
    /// matches, it is valid at `now`, and a test leaf verifies to the roots.
    pub fn from_pem(
        cert_pem: &str,
        key_pem: &str,
        extra_roots: &[CertificateDer<'static>],
        trust_domain: &str,
        now: OffsetDateTime,
        names: &PemNames,
    ) -> Result<Ca, CaError> {
        let cert_path = || names.cert.clone();
        let all = crate::keys::certs_from_pem(cert_pem, &names.cert)
            .map_err(|source| CaError::Parse { path: cert_path(), source })?;
        let key = PrivateKey::from_pem(key_pem)
            .map_err(|source| CaError::Parse { path: names.key.clone(), source })?;

        let (_, signing) = X509Certificate::from_der(&all[0]).map_err(|e| CaError::Parse {
            path: cert_path(),
            source: KeyError::BadCertificate { reason: e.to_string() },
        })?;
        if !signing.is_ca() {
            return Err(CaError::NotCa { path: cert_path() });
        }
        if let Ok(Some(ku)) = signing.key_usage() {
            if !ku.value.key_cert_sign() {
                return Err(CaError::CannotSign { path: cert_path() });
            }
        }
        if signing.public_key().raw != key.public_key_der().as_slice() {
            return Err(CaError::KeyMismatch { cert: cert_path(), key: names.key.clone() });
        }
        for der in &all {
            check_validity(der, now, &names.cert)?;
        }
        let not_after = signing.validity().not_after.to_datetime();

        let mut chain = Vec::new();
        let mut roots = Vec::new();
        for der in &all {
            if is_self_signed(der) {
                roots.push(der.clone());
            } else {
                chain.push(der.clone());
            }
        }
        for root in extra_roots {
            if !roots.contains(root) {
                roots.push(root.clone());
            }
        }
        if roots.is_empty() {
            return Err(CaError::NoTrustAnchor { path: cert_path() });
        }
        let issuer = rcgen::Issuer::from_ca_cert_der(&all[0], key).map_err(|e| CaError::Parse {
            path: cert_path(),
            source: KeyError::BadCertificate { reason: e.to_string() },
        })?;
        let ca = Ca { trust_domain: trust_domain.to_owned(), issuer, chain, roots, not_after };
        ca.self_test(now, &names.cert)?;
        Ok(ca)
    }

    /// Issues a throwaway leaf and verifies it to the roots, so a broken
    /// chain is found at load time rather than at the first handshake.
    fn self_test(&self, now: OffsetDateTime, path: &str) -> Result<(), CaError> {
        let broken = |reason: String| CaError::BrokenChain { path: path.to_owned(), reason };
        let key = PrivateKey::generate().map_err(|e| broken(e.to_string()))?;
        let id = SpiffeId::new(&self.trust_domain, "tlsmesh-system", "ca-self-test")
            .map_err(|e| broken(e.to_string()))?;
        let params = leaf_params(&Identity::Workload(id), now, MIN_LIFETIME, self.not_after)?;
        let leaf = params.signed_by(&key, &self.issuer).map_err(CaError::Sign)?;
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store.add(root.clone()).map_err(|e| broken(e.to_string()))?;
        }
        let parsed = ParsedCertificate::try_from(leaf.der()).map_err(|e| broken(e.to_string()))?;
        let at = UnixTime::since_unix_epoch(Duration::from_secs(
            u64::try_from(now.unix_timestamp()).unwrap_or_default(),
        ));
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &store,
            &self.chain,
            at,
            crate::tls::provider().signature_verification_algorithms.all,
        )
        .map_err(|e| broken(e.to_string()))
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The trust anchors certificates from this CA verify to.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots as PEM (the trust bundle to distribute to nodes).
    pub fn roots_pem(&self) -> String {
        certs_to_pem(&self.roots)
    }

    /// The chain placed after each issued leaf (signing CA first, root excluded).
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// When the signing certificate expires.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// Signs a workload certificate for `id` from a PEM CSR; returns the chain PEM.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        id: &SpiffeId,
        lifetime: Duration,
    ) -> Result<String, CaError> {
        let issued = self.issue(
            csr_pem,
            &Identity::Workload(id.clone()),
            lifetime,
            OffsetDateTime::now_utc(),
        )?;
        Ok(issued.chain_pem)
    }

    /// Signs a certificate for `id` (workload or node) from a PEM CSR. Only
    /// the CSR's public key is used (after checking its self-signature); the
    /// SAN is the authorized `id` whatever the CSR asked for. EKU
    /// serverAuth+clientAuth, keyUsage digitalSignature, CA:FALSE, random
    /// 128-bit serial, notBefore = `now` − 1 min, notAfter = `now` +
    /// `lifetime` (capped at the CA's own expiry).
    pub fn issue(
        &self,
        csr_pem: &str,
        id: &Identity,
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<Issued, CaError> {
        if id.trust_domain() != self.trust_domain {
            return Err(CaError::TrustDomain {
                id: id.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        if !(MIN_LIFETIME..=MAX_LIFETIME).contains(&lifetime) {
            return Err(CaError::Lifetime { secs: lifetime.as_secs() });
        }
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr { reason: e.to_string() })?;
        let params = leaf_params(id, now, lifetime, self.not_after)?;
        let leaf = params.signed_by(&csr.public_key, &self.issuer).map_err(CaError::Sign)?;
        let info = CertInfo::from_der(leaf.der())
            .map_err(|source| CaError::Parse { path: "issued certificate".into(), source })?;
        let mut chain = vec![leaf.der().clone()];
        chain.extend(self.chain.iter().cloned());
        let chain_pem = certs_to_pem(&chain);
        Ok(Issued { chain, chain_pem, info })
    }
}

impl Ca {
    /// Issues the CA server's own TLS certificate: DNS/IP SANs `names`
    /// (what nodes dial, e.g. `tlsmesh-ca.tlsmesh-system.svc`), EKU
    /// serverAuth, with a fresh local key.
    pub fn issue_serving(
        &self,
        names: &[String],
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<(Vec<CertificateDer<'static>>, PrivateKey), CaError> {
        let key = PrivateKey::generate()
            .map_err(|source| CaError::Parse { path: "new serving key".into(), source })?;
        let mut params = CertificateParams::new(names.to_vec()).map_err(CaError::Sign)?;
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "tlsmesh CA server");
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(random_serial());
        params.not_before = now - BACKDATE;
        params.not_after = (now + lifetime).min(self.not_after);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(CaError::Sign)?;
        let mut chain = vec![cert.der().clone()];
        chain.extend(self.chain.iter().cloned());
        Ok((chain, key))
    }
}

/// Names used in error messages for the two PEM inputs of [`Ca::from_pem`].
#[derive(Debug, Clone)]
pub struct PemNames {
    pub cert: String,
    pub key: String,
}

impl PemNames {
    fn memory() -> Self {
        Self { cert: "in-memory CA certificate".into(), key: "in-memory CA key".into() }
    }
}

/// A cheap-to-clone handle on the current CA; file reloads swap it.
#[derive(Debug, Clone)]
pub struct SharedCa(Arc<RwLock<Arc<Ca>>>);

impl SharedCa {
    pub fn new(ca: Ca) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(ca))))
    }

    /// The CA to sign with now.
    pub fn current(&self) -> Arc<Ca> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces the CA (new files, rotation).
    pub fn replace(&self, ca: Ca) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(ca);
    }
}

fn ca_params(
    trust_domain: &str,
    kind: &str,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(DnType::OrganizationName, "tlsmesh");
    // A random tag tells apart the roots of a rotation (and of two clusters
    // that share a trust domain name) in logs and `openssl x509` output.
    let tag = crate::spiffe::hex(&rand::random::<[u8; 4]>());
    params
        .distinguished_name
        .push(DnType::CommonName, format!("tlsmesh {kind} CA {trust_domain} {tag}"));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = not_before;
    params.not_after = not_after;
    let uri = format!("spiffe://{trust_domain}");
    params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(|e| {
        CaError::TrustDomain { id: format!("{e}"), trust_domain: trust_domain.to_owned() }
    })?)];
    Ok(params)
}

fn leaf_params(
    id: &Identity,
    now: OffsetDateTime,
    lifetime: Duration,
    ca_not_after: OffsetDateTime,
) -> Result<CertificateParams, CaError> {
    let not_after = (now + lifetime).min(ca_not_after);
    if not_after < now + MIN_LIFETIME {
        return Err(CaError::CaExpiring { id: id.to_string(), ca_not_after });
    }
    let mut params = CertificateParams::default();
    // Empty subject: the identity is the URI SAN (marked critical by rcgen).
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().map_err(|_| {
        CaError::TrustDomain { id: id.to_string(), trust_domain: id.trust_domain().to_owned() }
    })?)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages =
        vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    params.serial_number = Some(random_serial());
    params.not_before = now - BACKDATE;
    params.not_after = not_after;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

/// 16 random bytes, positive and without a leading zero byte.
fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] = (bytes[0] & 0x7f).max(1);
    SerialNumber::from_slice(&bytes)
}

fn is_self_signed(der: &CertificateDer<'_>) -> bool {
    X509Certificate::from_der(der)
        .is_ok_and(|(_, c)| c.subject() == c.issuer() && c.verify_signature(None).is_ok())
}

fn check_validity(der: &[u8], now: OffsetDateTime, path: &str) -> Result<(), CaError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| CaError::Parse {
        path: path.to_owned(),
        source: KeyError::BadCertificate { reason: e.to_string() },
    })?;
    let not_before = cert.validity().not_before.to_datetime();
    let not_after = cert.validity().not_after.to_datetime();
    if now < not_before {
        return Err(CaError::NotYetValid { path: path.to_owned(), not_before, now });
    }
    if now > not_after {
        return Err(CaError::Expired { path: path.to_owned(), not_after, now });
    }
    Ok(())
}

#[cfg(test)]
mod tests;
