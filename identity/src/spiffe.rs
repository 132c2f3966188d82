//! SPIFFE identities: workload IDs `spiffe://<td>/ns/<ns>/sa/<sa>`, node IDs
//! `spiffe://<td>/node/<name>`, and reading the one SPIFFE URI SAN out of a DER
//! certificate.

use std::fmt;
use std::str::FromStr;

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Why a SPIFFE ID or a certificate's identity could not be read.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum SpiffeError {
    #[error("{id:?} is not a SPIFFE ID: it must start with spiffe://")]
    NotSpiffe { id: String },
    #[error(
        "trust domain {trust_domain:?} in {id:?} is invalid: use lowercase letters, digits, '.', '-' and '_' only"
    )]
    BadTrustDomain { id: String, trust_domain: String },
    #[error(
        "SPIFFE ID {id:?} has an unsupported path: expected spiffe://<trust-domain>/ns/<namespace>/sa/<serviceaccount> or spiffe://<trust-domain>/node/<name>"
    )]
    BadPath { id: String },
    #[error(
        "path segment {segment:?} in {id:?} is invalid: use letters, digits, '.', '-' and '_' only, and not '.' or '..'"
    )]
    BadSegment { id: String, segment: String },
    #[error("certificate could not be parsed as X.509: {reason}")]
    BadCertificate { reason: String },
    #[error(
        "certificate (serial {serial}) has no SPIFFE ID: it carries no URI subjectAltName; was it issued by a tlsmesh CA?"
    )]
    NoUriSan { serial: String },
    #[error(
        "certificate (serial {serial}) has {count} URI subjectAltNames; a SPIFFE certificate must carry exactly one"
    )]
    TooManyUriSans { serial: String, count: usize },
    #[error("certificate (serial {serial}) carries an invalid SPIFFE ID: {source}")]
    BadUriSan {
        serial: String,
        #[source]
        source: Box<SpiffeError>,
    },
}

/// A workload identity: `spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// A node (daemon) identity: `spiffe://<trust_domain>/node/<name>`; used only
/// between a node daemon and the CA.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId {
    trust_domain: String,
    name: String,
}

/// Either kind of identity tlsmesh issues certificates for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identity {
    Workload(SpiffeId),
    Node(NodeId),
}

const SCHEME: &str = "spiffe://";

impl SpiffeId {
    /// Builds and validates a workload ID.
    pub fn new(
        trust_domain: impl Into<String>,
        namespace: impl Into<String>,
        service_account: impl Into<String>,
    ) -> Result<Self, SpiffeError> {
        let id = Self {
            trust_domain: trust_domain.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
        };
        let text = id.to_string();
        check_trust_domain(&text, &id.trust_domain)?;
        check_segment(&text, &id.namespace)?;
        check_segment(&text, &id.service_account)?;
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// The URI form, as placed in certificates.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl NodeId {
    /// Builds and validates a node ID.
    pub fn new(
        trust_domain: impl Into<String>,
        name: impl Into<String>,
    ) -> Result<Self, SpiffeError> {
        let id = Self { trust_domain: trust_domain.into(), name: name.into() };
        let text = id.to_string();
        check_trust_domain(&text, &id.trust_domain)?;
        check_segment(&text, &id.name)?;
        Ok(id)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The node name (the Kubernetes node name or inventory host name).
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Identity {
    pub fn trust_domain(&self) -> &str {
        match self {
            Identity::Workload(id) => id.trust_domain(),
            Identity::Node(id) => id.trust_domain(),
        }
    }

    /// Reads the single SPIFFE URI SAN of a DER certificate.
    pub fn from_cert_der(der: &[u8]) -> Result<Self, SpiffeError> {
        let (_, cert) = X509Certificate::from_der(der)
            .map_err(|e| SpiffeError::BadCertificate { reason: e.to_string() })?;
        Self::from_cert(&cert)
    }

    /// Reads the single SPIFFE URI SAN of a parsed certificate.
    pub fn from_cert(cert: &X509Certificate<'_>) -> Result<Self, SpiffeError> {
        let serial = serial_hex(cert.raw_serial());
        let san = cert
            .subject_alternative_name()
            .map_err(|e| SpiffeError::BadCertificate { reason: e.to_string() })?;
        let uris: Vec<&str> = san
            .map(|ext| {
                ext.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::URI(u) => Some(*u),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        match uris.as_slice() {
            [] => Err(SpiffeError::NoUriSan { serial }),
            [one] => {
                one.parse().map_err(|e| SpiffeError::BadUriSan { serial, source: Box::new(e) })
            }
            many => Err(SpiffeError::TooManyUriSans { serial, count: many.len() }),
        }
    }
}

/// Lowercase hex of a certificate serial's big-endian bytes, without leading
/// zero bytes (so `00:8f:01` and `8f01` are the same serial). This is the form
/// used in logs, the admin API and the deny list.
pub fn serial_hex(raw: &[u8]) -> String {
    let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len().saturating_sub(1));
    hex(&raw[start..])
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

fn check_trust_domain(id: &str, td: &str) -> Result<(), SpiffeError> {
    let ok = !td.is_empty()
        && td.len() <= 255
        && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpiffeError::BadTrustDomain { id: id.to_owned(), trust_domain: td.to_owned() })
    }
}

fn check_segment(id: &str, seg: &str) -> Result<(), SpiffeError> {
    let ok = !seg.is_empty()
        && seg != "."
        && seg != ".."
        && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(SpiffeError::BadSegment { id: id.to_owned(), segment: seg.to_owned() })
    }
}

impl FromStr for Identity {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest =
            s.strip_prefix(SCHEME).ok_or_else(|| SpiffeError::NotSpiffe { id: s.to_owned() })?;
        let (td, path) =
            rest.split_once('/').ok_or_else(|| SpiffeError::BadPath { id: s.to_owned() })?;
        check_trust_domain(s, td)?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", ns, "sa", sa] => {
                check_segment(s, ns)?;
                check_segment(s, sa)?;
                Ok(Identity::Workload(SpiffeId {
                    trust_domain: td.to_owned(),
                    namespace: (*ns).to_owned(),
                    service_account: (*sa).to_owned(),
                }))
            }
            ["node", name] => {
                check_segment(s, name)?;
                Ok(Identity::Node(NodeId { trust_domain: td.to_owned(), name: (*name).to_owned() }))
            }
            _ => Err(SpiffeError::BadPath { id: s.to_owned() }),
        }
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse()? {
            Identity::Workload(id) => Ok(id),
            Identity::Node(_) => Err(SpiffeError::BadPath { id: s.to_owned() }),
        }
    }
}

impl FromStr for NodeId {
    type Err = SpiffeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.parse()? {
            Identity::Node(id) => Ok(id),
            Identity::Workload(_) => Err(SpiffeError::BadPath { id: s.to_owned() }),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/node/{}", self.trust_domain, self.name)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Identity::Workload(id) => id.fmt(f),
            Identity::Node(id) => id.fmt(f),
        }
    }
}

impl From<SpiffeId> for Identity {
    fn from(id: SpiffeId) -> Self {
        Identity::Workload(id)
    }
}

impl From<NodeId> for Identity {
    fn from(id: NodeId) -> Self {
        Identity::Node(id)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_round_trip() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/web".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(SpiffeId::new("cluster.local", "default", "web").unwrap(), id);
    }

    #[test]
    fn node_round_trip() {
        let id: Identity = "spiffe://td/node/node-a".parse().unwrap();
        let Identity::Node(node) = &id else { panic!("expected a node id, got {id:?}") };
        assert_eq!(node.name(), "node-a");
        assert_eq!(id.to_string(), "spiffe://td/node/node-a");
        assert!("spiffe://td/node/node-a".parse::<SpiffeId>().is_err());
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "http://td/ns/a/sa/b",
            "spiffe://td",
            "spiffe://td/ns/a",
            "spiffe://td/ns/a/sa/b/extra",
            "spiffe://TD/ns/a/sa/b",
            "spiffe://td/ns//sa/b",
            "spiffe://td/ns/../sa/b",
            "spiffe://td/ns/a b/sa/b",
            "spiffe:///ns/a/sa/b",
        ] {
            assert!(bad.parse::<Identity>().is_err(), "{bad} should be rejected");
        }
        let err = "spiffe://td/ns/a%2f/sa/b".parse::<SpiffeId>().unwrap_err();
        assert!(err.to_string().contains("a%2f"), "{err}");
    }

    #[test]
    fn serial_hex_strips_leading_zeros() {
        assert_eq!(serial_hex(&[0, 0x8f, 0x01]), "8f01");
        assert_eq!(serial_hex(&[0x0a]), "0a");
        assert_eq!(serial_hex(&[0]), "00");
    }

    fn cert_with_sans(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        params.self_signed(&key).unwrap().der().to_vec()
    }

    fn uri(s: &str) -> rcgen::SanType {
        rcgen::SanType::URI(s.try_into().unwrap())
    }

    #[test]
    fn reads_uri_san_from_certificate() {
        let der = cert_with_sans(vec![
            rcgen::SanType::DnsName("x.example".try_into().unwrap()),
            uri("spiffe://td/ns/a/sa/b"),
        ]);
        let id = Identity::from_cert_der(&der).unwrap();
        assert_eq!(id, Identity::Workload(SpiffeId::new("td", "a", "b").unwrap()));
    }

    #[test]
    fn certificate_needs_exactly_one_spiffe_uri() {
        let none = cert_with_sans(vec![rcgen::SanType::DnsName("x.example".try_into().unwrap())]);
        let err = Identity::from_cert_der(&none).unwrap_err();
        assert!(matches!(err, SpiffeError::NoUriSan { .. }), "{err}");

        let two = cert_with_sans(vec![uri("spiffe://td/ns/a/sa/b"), uri("spiffe://td/ns/a/sa/c")]);
        let err = Identity::from_cert_der(&two).unwrap_err();
        assert!(matches!(err, SpiffeError::TooManyUriSans { count: 2, .. }), "{err}");

        let http = cert_with_sans(vec![uri("https://example.com/")]);
        let err = Identity::from_cert_der(&http).unwrap_err();
        assert!(err.to_string().contains("invalid SPIFFE ID"), "{err}");
    }
}
