//! Choosing the certificate to present: the server by the SNI naming the
//! destination identity (with a fallback identity), the client its one
//! workload certificate.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::SignatureScheme;

use crate::spiffe::SpiffeId;

/// Where the server finds the current certificate of each local identity.
/// Implemented by [`crate::manager::CertManager`] and [`StaticCertStore`].
pub trait CertStore: Send + Sync + std::fmt::Debug {
    /// The current certificate of `id`, if this node holds one.
    fn get(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>>;
    /// The current certificate of the identity whose [`super::sni_string`] is `sni`.
    fn get_by_sni(&self, sni: &str) -> Option<Arc<CertifiedKey>>;
}

/// A `ResolvesServerCert` picking the certificate named by the SNI, else the
/// `fallback` identity's (if any). Each handshake reads the store afresh, so
/// a renewed certificate is used from the next handshake on while existing
/// sessions keep theirs.
#[derive(Debug)]
pub struct SniResolver {
    store: Arc<dyn CertStore>,
    fallback: Option<SpiffeId>,
}

impl SniResolver {
    pub fn new(store: Arc<dyn CertStore>, fallback: Option<SpiffeId>) -> Self {
        Self { store, fallback }
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let sni = hello.server_name();
        if let Some(ck) = sni.and_then(|s| self.store.get_by_sni(s)) {
            return Some(ck);
        }
        let fallback = self.fallback.as_ref().and_then(|id| self.store.get(id));
        match (&fallback, sni) {
            (Some(_), Some(sni)) => {
                tracing::debug!(sni, fallback = ?self.fallback, "no certificate for the requested SNI; presenting the fallback identity");
            }
            (None, _) => {
                tracing::warn!(sni, "no certificate for the requested SNI and no fallback; aborting handshake (is the destination pod on this node?)");
            }
            (Some(_), None) => {}
        }
        fallback
    }
}

/// A simple in-memory [`CertStore`] (tests, demos, static setups).
#[derive(Debug, Default)]
pub struct StaticCertStore {
    by_sni: RwLock<HashMap<String, (SpiffeId, Arc<CertifiedKey>)>>,
}

impl StaticCertStore {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&self, id: SpiffeId, key: Arc<CertifiedKey>) {
        let sni = super::sni_string(&id);
        self.by_sni.write().unwrap_or_else(PoisonError::into_inner).insert(sni, (id, key));
    }

    pub fn remove(&self, id: &SpiffeId) {
        self.by_sni.write().unwrap_or_else(PoisonError::into_inner).remove(&super::sni_string(id));
    }
}

impl CertStore for StaticCertStore {
    fn get(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        self.get_by_sni(&super::sni_string(id))
    }

    fn get_by_sni(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        self.by_sni.read().unwrap_or_else(PoisonError::into_inner).get(sni).map(|(_, k)| k.clone())
    }
}

/// The client always presents its one workload certificate.
#[derive(Debug)]
pub(crate) struct FixedClientCert(pub(crate) Arc<CertifiedKey>);

impl ResolvesClientCert for FixedClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A server that always presents one certificate (the CA server).
#[derive(Debug)]
pub(crate) struct FixedServerCert(pub(crate) Arc<CertifiedKey>);

impl ResolvesServerCert for FixedServerCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}
