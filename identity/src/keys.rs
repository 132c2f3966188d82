//! Private keys and certificate plumbing shared by the CA and the node daemon:
//! ECDSA P-256 key generation, CSRs, PEM encoding/decoding, reading the facts
//! of a certificate (identity, serial, validity) and building rustls
//! `CertifiedKey`s.
//!
//! Keys live in memory (zeroized on drop) or in files of mode 0600; they are
//! never logged (`Debug` of [`PrivateKey`] prints no key material).

use std::fmt;
use std::sync::Arc;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};
use zeroize::Zeroizing;

use crate::spiffe::{serial_hex, Identity, SpiffeError};

/// Errors of key and certificate handling.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("could not generate an ECDSA P-256 key: {0}")]
    Generate(#[source] rcgen::Error),
    #[error("could not parse the private key PEM (expected a PKCS#8, SEC1 or PKCS#1 key): {0}")]
    ParseKey(#[source] rcgen::Error),
    #[error("could not build a certificate signing request for {id}: {source}")]
    Csr {
        id: String,
        #[source]
        source: rcgen::Error,
    },
    #[error("no PEM certificate found in {what}; expected one or more -----BEGIN CERTIFICATE----- blocks")]
    NoCertificates { what: String },
    #[error("invalid PEM in {what}: {reason}")]
    BadPem { what: String, reason: String },
    #[error("certificate could not be parsed as X.509: {reason}")]
    BadCertificate { reason: String },
    #[error(transparent)]
    Identity(#[from] SpiffeError),
    #[error("the private key does not match the certificate {what}: {reason}")]
    KeyMismatch { what: String, reason: String },
}

/// A private key (ECDSA P-256 when generated here), held as PKCS#8 and
/// zeroized on drop.
pub struct PrivateKey {
    pair: Zeroizing<rcgen::KeyPair>,
}

impl fmt::Debug for PrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKey([redacted])")
    }
}

impl PrivateKey {
    /// Generates a fresh ECDSA P-256 key.
    pub fn generate() -> Result<Self, KeyError> {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(KeyError::Generate)?;
        Ok(Self { pair: Zeroizing::new(pair) })
    }

    /// Parses a PEM private key (PKCS#8, or SEC1/PKCS#1 as written by other tools).
    pub fn from_pem(pem: &str) -> Result<Self, KeyError> {
        let pair = rcgen::KeyPair::from_pem(pem).map_err(KeyError::ParseKey)?;
        Ok(Self { pair: Zeroizing::new(pair) })
    }

    /// The key as PKCS#8 PEM (zeroized when dropped). Write it only to 0600 files.
    pub fn to_pem(&self) -> Zeroizing<String> {
        Zeroizing::new(self.pair.serialize_pem())
    }

    /// The DER `SubjectPublicKeyInfo` of the key.
    pub fn public_key_der(&self) -> Vec<u8> {
        rcgen::PublicKeyData::subject_public_key_info(&*self.pair)
    }

    pub(crate) fn key_pair(&self) -> &rcgen::KeyPair {
        &self.pair
    }

    /// A PEM CSR for `id`. The CA ignores everything in it but the public key
    /// (and checks its self-signature); the SAN is set for readability.
    pub fn csr_pem(&self, id: &Identity) -> Result<String, KeyError> {
        let err = |source| KeyError::Csr { id: id.to_string(), source };
        let mut params = rcgen::CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.subject_alt_names =
            vec![rcgen::SanType::URI(id.to_string().try_into().map_err(err)?)];
        params.serialize_request(&*self.pair).and_then(|csr| csr.pem()).map_err(err)
    }

    /// A rustls `CertifiedKey` for this key and a PEM chain (leaf first).
    /// Fails if the leaf's public key is not this key.
    pub fn certified_key(&self, chain_pem: &str) -> Result<Arc<CertifiedKey>, KeyError> {
        let chain = certs_from_pem(chain_pem, "the issued certificate chain")?;
        self.certified_key_der(chain)
    }

    /// As [`certified_key`](Self::certified_key), with a DER chain.
    pub fn certified_key_der(
        &self,
        chain: Vec<CertificateDer<'static>>,
    ) -> Result<Arc<CertifiedKey>, KeyError> {
        let what = chain
            .first()
            .map(|c| CertInfo::from_der(c).map_or_else(|_| "?".into(), |i| i.to_string()))
            .unwrap_or_default();
        // Borrow the key's DER rather than copying it into a buffer nobody zeroizes.
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.pair.serialized_der()));
        let signer = rustls::crypto::aws_lc_rs::sign::any_supported_type(&der)
            .map_err(|e| KeyError::KeyMismatch { what: what.clone(), reason: e.to_string() })?;
        let ck = CertifiedKey::new(chain, signer);
        ck.keys_match().map_err(|e| KeyError::KeyMismatch { what, reason: e.to_string() })?;
        Ok(Arc::new(ck))
    }
}

/// The facts of a certificate the daemon and the CA care about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertInfo {
    pub identity: Identity,
    /// Lowercase hex, no leading zero bytes (see [`serial_hex`]).
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl CertInfo {
    /// Parses a DER certificate that carries a SPIFFE ID.
    pub fn from_der(der: &[u8]) -> Result<Self, KeyError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| KeyError::BadCertificate { reason: e.to_string() })?;
        let identity = Identity::from_cert(&cert)?;
        Ok(Self {
            identity,
            serial: serial_hex(cert.raw_serial()),
            not_before: cert.validity().not_before.to_datetime(),
            not_after: cert.validity().not_after.to_datetime(),
        })
    }
}

impl fmt::Display for CertInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (serial {})", self.identity, self.serial)
    }
}

/// All certificates in a PEM text, in order. `what` names the source in errors
/// (e.g. a file path).
pub fn certs_from_pem(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, KeyError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| KeyError::BadPem { what: what.to_owned(), reason: e.to_string() })?;
    if certs.is_empty() {
        return Err(KeyError::NoCertificates { what: what.to_owned() });
    }
    Ok(certs)
}

/// PEM-encodes DER certificates (one `CERTIFICATE` block each).
pub fn certs_to_pem<'a>(certs: impl IntoIterator<Item = &'a CertificateDer<'a>>) -> String {
    let mut out = String::new();
    for cert in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64(cert);
        for line in b64.as_bytes().chunks(64) {
            // base64 output is ASCII.
            out.push_str(std::str::from_utf8(line).unwrap_or_default());
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [chunk[0], chunk.get(1).copied().unwrap_or(0), chunk.get(2).copied().unwrap_or(0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe::SpiffeId;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn pem_round_trip() {
        let key = PrivateKey::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names =
            vec![rcgen::SanType::URI("spiffe://td/ns/a/sa/b".try_into().unwrap())];
        let cert = params.self_signed(key.key_pair()).unwrap();
        let pem = certs_to_pem([cert.der(), cert.der()]);
        let back = certs_from_pem(&pem, "test").unwrap();
        assert_eq!(back, vec![cert.der().clone(), cert.der().clone()]);
        assert!(certs_from_pem("nothing", "test.pem")
            .unwrap_err()
            .to_string()
            .contains("test.pem"));
    }

    #[test]
    fn csr_and_key_stay_private() {
        let key = PrivateKey::generate().unwrap();
        let id = Identity::Workload(SpiffeId::new("td", "a", "b").unwrap());
        let csr = key.csr_pem(&id).unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        assert_eq!(format!("{key:?}"), "PrivateKey([redacted])");
        let again = PrivateKey::from_pem(&key.to_pem()).unwrap();
        assert_eq!(again.public_key_der(), key.public_key_der());
    }

    #[test]
    fn certified_key_rejects_foreign_key() {
        let key = PrivateKey::generate().unwrap();
        let other = PrivateKey::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names =
            vec![rcgen::SanType::URI("spiffe://td/ns/a/sa/b".try_into().unwrap())];
        let cert = params.self_signed(key.key_pair()).unwrap();
        assert!(key.certified_key(&cert.pem()).is_ok());
        let err = other.certified_key(&cert.pem()).unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }
}
