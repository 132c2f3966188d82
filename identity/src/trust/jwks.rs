//! The trust bundle in the SPIFFE bundle format: a JWK Set (RFC 7517) with
//! one `x509-svid` key per root (SPIFFE Trust Domain and Bundle, §4): the
//! root's public key (`kty` EC with `crv`/`x`/`y`, or RSA with `n`/`e`),
//! the certificate itself in `x5c` (standard base64 DER), plus
//! `spiffe_sequence` (the bundle's generation) and `spiffe_refresh_hint`.
//! What SPIRE's bundle endpoint and federation peers read.

use base64::{
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
    Engine as _,
};
use rustls_pki_types::CertificateDer;
use serde_json::{json, Value};
use x509_parser::{
    oid_registry::{OID_EC_P256, OID_NIST_EC_P384, OID_NIST_EC_P521},
    prelude::{FromDer, X509Certificate},
    public_key::PublicKey,
};

use super::TrustError;

/// How often a reader should fetch the bundle again, in seconds (SPIRE's
/// default refresh hint is 5 minutes).
pub const REFRESH_HINT_SECS: u64 = 300;

/// The JWK of one root certificate.
fn jwk(index: usize, root: &CertificateDer<'_>) -> Result<Value, TrustError> {
    let bad = |reason: String| TrustError::BadRoot { what: "SPIFFE bundle".into(), index, reason };
    let (_, cert) = X509Certificate::from_der(root).map_err(|e| bad(e.to_string()))?;
    let spki = cert.public_key();
    let mut key = match spki.parsed().map_err(|e| bad(e.to_string()))? {
        PublicKey::EC(point) => {
            let oid = spki.algorithm.parameters().and_then(|p| p.as_oid().ok());
            let (crv, len) = match oid {
                Some(o) if o == OID_EC_P256 => ("P-256", 32),
                Some(o) if o == OID_NIST_EC_P384 => ("P-384", 48),
                Some(o) if o == OID_NIST_EC_P521 => ("P-521", 66),
                other => {
                    return Err(bad(format!(
                        "elliptic curve {} has no JWK name",
                        other.map_or_else(|| "(none)".into(), |o| o.to_id_string())
                    )))
                }
            };
            let data = point.data();
            if data.len() != 1 + 2 * len || data[0] != 4 {
                return Err(bad(format!("{crv} point is not an uncompressed point")));
            }
            json!({
                "kty": "EC",
                "crv": crv,
                "x": URL_SAFE_NO_PAD.encode(&data[1..=len]),
                "y": URL_SAFE_NO_PAD.encode(&data[1 + len..]),
            })
        }
        PublicKey::RSA(rsa) => {
            let unsigned = |b: &[u8]| {
                let skip = b.iter().take_while(|&&x| x == 0).count();
                URL_SAFE_NO_PAD.encode(&b[skip.min(b.len().saturating_sub(1))..])
            };
            json!({ "kty": "RSA", "n": unsigned(rsa.modulus), "e": unsigned(rsa.exponent) })
        }
        _ => return Err(bad("only EC and RSA keys can be written as a JWK".into())),
    };
    key["use"] = json!("x509-svid");
    key["x5c"] = json!([STANDARD.encode(root.as_ref())]);
    Ok(key)
}

/// The SPIFFE bundle (JWK Set) of `roots`, at generation `sequence`.
pub fn spiffe_bundle(roots: &[CertificateDer<'_>], sequence: u64) -> Result<Value, TrustError> {
    let keys = roots.iter().enumerate().map(|(i, r)| jwk(i, r)).collect::<Result<Vec<_>, _>>()?;
    Ok(json!({
        "keys": keys,
        "spiffe_sequence": sequence,
        "spiffe_refresh_hint": REFRESH_HINT_SECS,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ca::Ca, keys::certs_from_pem};
    use std::time::Duration;

    /// A self-signed RSA-2048 root (`openssl req -x509 -newkey rsa:2048
    /// -subj /CN=rsa-root -days 3650 -nodes`): cert-manager's default key type.
    const RSA_ROOT: &str = include_str!("rsa_root.pem");

    #[test]
    fn an_ec_root_becomes_an_x509_svid_key_with_its_point_and_certificate() {
        let (ca, _) = Ca::generate_root("td", Duration::from_secs(3600)).unwrap();
        let root = ca.roots()[0].clone();
        let b = spiffe_bundle(std::slice::from_ref(&root), 7).unwrap();
        assert_eq!(b["spiffe_sequence"], 7);
        assert_eq!(b["spiffe_refresh_hint"], REFRESH_HINT_SECS);
        let k = &b["keys"][0];
        assert_eq!((k["use"].as_str(), k["kty"].as_str()), (Some("x509-svid"), Some("EC")));
        assert_eq!(k["crv"], "P-256");
        let der = STANDARD.decode(k["x5c"][0].as_str().unwrap()).unwrap();
        assert_eq!(der, root.as_ref(), "x5c is the root itself");
        // x and y are the certificate's public point.
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let point = cert.public_key().subject_public_key.data.to_vec();
        let x = URL_SAFE_NO_PAD.decode(k["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(k["y"].as_str().unwrap()).unwrap();
        assert_eq!([&[4u8][..], &x, &y].concat(), point);
    }

    #[test]
    fn an_rsa_root_has_its_modulus_and_exponent_and_every_root_is_listed() {
        let rsa = certs_from_pem(RSA_ROOT, "rsa").unwrap().remove(0);
        let (ca, _) = Ca::generate_root("td", Duration::from_secs(3600)).unwrap();
        let b = spiffe_bundle(&[ca.roots()[0].clone(), rsa], 1).unwrap();
        assert_eq!(b["keys"].as_array().unwrap().len(), 2, "one key per root, in order");
        let k = &b["keys"][1];
        assert_eq!(k["kty"], "RSA");
        assert_eq!(k["e"], "AQAB", "65537");
        let n = URL_SAFE_NO_PAD.decode(k["n"].as_str().unwrap()).unwrap();
        assert_eq!(n.len(), 256, "2048-bit modulus without its sign byte");
        assert!(n[0] & 0x80 != 0);
    }

    #[test]
    fn a_root_that_is_not_a_certificate_is_refused_naming_it() {
        let err = spiffe_bundle(&[CertificateDer::from(vec![1, 2, 3])], 0).unwrap_err();
        assert!(err.to_string().contains("SPIFFE bundle: certificate 0"), "{err}");
    }
}
