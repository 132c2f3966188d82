//! Where the certificate manager gets certificates: the [`CertSource`] trait,
//! implemented by [`crate::client::CaClient`] (the network CA) and by
//! [`LocalCa`] (an in-process CA for tests, the demo and single-host setups).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use time::OffsetDateTime;

use crate::authz::{authorize, SharedPlacement};
use crate::ca::{SharedCa, DEFAULT_LIFETIME};
use crate::spiffe::{Identity, NodeId, SpiffeId};

/// A boxed future, so that `CertSource` can be used as a trait object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The error a source reports; its text is shown in logs and the admin API.
pub type SourceError = Box<dyn std::error::Error + Send + Sync>;

/// Something that turns a CSR for a workload identity into a certificate
/// chain (PEM, leaf first).
pub trait CertSource: Send + Sync + std::fmt::Debug {
    fn issue<'a>(
        &'a self,
        csr_pem: &'a str,
        id: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<String, SourceError>>;
}

/// An in-process CA acting for one node: it applies the same placement
/// check as the CA server, then signs.
#[derive(Debug, Clone)]
pub struct LocalCa {
    ca: SharedCa,
    placement: SharedPlacement,
    node: NodeId,
    lifetime: Duration,
}

impl LocalCa {
    /// A source signing with `ca` for the pods of `node` (workload
    /// certificates of [`DEFAULT_LIFETIME`]).
    pub fn new(ca: SharedCa, placement: SharedPlacement, node: NodeId) -> Self {
        Self { ca, placement, node, lifetime: DEFAULT_LIFETIME }
    }

    /// Sets the lifetime of issued certificates (at least 1 minute).
    #[must_use]
    pub fn with_lifetime(mut self, lifetime: Duration) -> Self {
        self.lifetime = lifetime;
        self
    }
}

impl CertSource for LocalCa {
    fn issue<'a>(
        &'a self,
        csr_pem: &'a str,
        id: &'a SpiffeId,
    ) -> BoxFuture<'a, Result<String, SourceError>> {
        Box::pin(async move {
            authorize(&self.node, id, &self.placement.current())?;
            let issued = self.ca.current().issue(
                csr_pem,
                &Identity::Workload(id.clone()),
                self.lifetime,
                OffsetDateTime::now_utc(),
            )?;
            Ok(issued.chain_pem)
        })
    }
}
