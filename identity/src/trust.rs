//! What a node trusts: the [`TrustBundle`] (one or more roots of our trust
//! domain, several during CA rotation) and the [`DenyList`] (revoked serials
//! and SPIFFE IDs). Both are cheap-to-clone handles, replaceable at run time;
//! TLS verifiers read the current contents on every handshake, and
//! [`subscribe`](DenyList::subscribe) tells the daemon when to re-check the
//! peers of open tunnels.

mod deny;
mod jwks;

use std::fs;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use tokio::sync::watch;

pub use deny::{DenyList, DenySet, Revoked};
pub use jwks::{spiffe_bundle, REFRESH_HINT_SECS};

use crate::keys::{certs_from_pem, certs_to_pem, KeyError};

/// Errors of trust bundles and deny lists.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Pem {
        what: String,
        #[source]
        source: KeyError,
    },
    #[error("{what}: certificate {index} cannot be used as a trust anchor: {reason}")]
    BadRoot { what: String, index: usize, reason: String },
    #[error(
        "a trust bundle needs at least one root; refusing to remove the last one (add the new root first)"
    )]
    Empty,
    #[error("{what} line {line}: {reason}")]
    DenyLine { what: String, line: usize, reason: String },
}

/// The roots of one trust domain.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    state: Arc<RwLock<Arc<BundleState>>>,
    changes: Arc<watch::Sender<u64>>,
}

/// One immutable version of a bundle.
#[derive(Debug)]
pub struct BundleState {
    trust_domain: String,
    roots: Vec<CertificateDer<'static>>,
    store: Arc<RootCertStore>,
    generation: u64,
}

impl BundleState {
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The roots in the form rustls/webpki verify with.
    pub fn root_store(&self) -> Arc<RootCertStore> {
        self.store.clone()
    }

    /// Increases by one on every change.
    pub fn generation(&self) -> u64 {
        self.generation
    }
}

fn build(
    trust_domain: &str,
    roots: Vec<CertificateDer<'static>>,
    generation: u64,
    what: &str,
) -> Result<BundleState, TrustError> {
    if roots.is_empty() {
        return Err(TrustError::Empty);
    }
    let mut store = RootCertStore::empty();
    for (index, root) in roots.iter().enumerate() {
        store.add(root.clone()).map_err(|e| TrustError::BadRoot {
            what: what.to_owned(),
            index,
            reason: e.to_string(),
        })?;
    }
    Ok(BundleState {
        trust_domain: trust_domain.to_owned(),
        roots,
        store: Arc::new(store),
        generation,
    })
}

impl TrustBundle {
    /// A bundle of `roots` for `trust_domain`.
    pub fn new(
        trust_domain: &str,
        roots: Vec<CertificateDer<'static>>,
    ) -> Result<Self, TrustError> {
        let state = build(trust_domain, roots, 0, "trust bundle")?;
        Ok(Self {
            state: Arc::new(RwLock::new(Arc::new(state))),
            changes: Arc::new(watch::Sender::new(0)),
        })
    }

    /// A bundle from PEM text holding one or more root certificates.
    pub fn from_pem(trust_domain: &str, pem: &str) -> Result<Self, TrustError> {
        let roots = certs_from_pem(pem, "trust bundle")
            .map_err(|source| TrustError::Pem { what: "trust bundle".into(), source })?;
        Self::new(trust_domain, roots)
    }

    /// A bundle from a PEM file holding one or more root certificates.
    pub fn load(trust_domain: &str, path: &Path) -> Result<Self, TrustError> {
        let roots = read_roots(path)?;
        let what = path.display().to_string();
        let state = build(trust_domain, roots, 0, &what)?;
        Ok(Self {
            state: Arc::new(RwLock::new(Arc::new(state))),
            changes: Arc::new(watch::Sender::new(0)),
        })
    }

    /// The current contents.
    pub fn current(&self) -> Arc<BundleState> {
        self.state.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn trust_domain(&self) -> String {
        self.current().trust_domain.clone()
    }

    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.current().roots.clone()
    }

    /// The roots as PEM.
    pub fn to_pem(&self) -> String {
        certs_to_pem(&self.current().roots)
    }

    /// Replaces all roots (e.g. after re-reading the bundle file).
    pub fn replace(&self, roots: Vec<CertificateDer<'static>>) -> Result<(), TrustError> {
        self.modify("trust bundle", |_| Ok(roots))
    }

    /// Re-reads the roots from a PEM file.
    pub fn reload(&self, path: &Path) -> Result<(), TrustError> {
        let roots = read_roots(path)?;
        self.modify(&path.display().to_string(), |_| Ok(roots))
    }

    /// Adds a root (first step of CA rotation). Adding a present root is a no-op.
    pub fn add_root(&self, root: CertificateDer<'static>) -> Result<(), TrustError> {
        self.modify("trust bundle", |roots| {
            let mut roots = roots.to_vec();
            if !roots.contains(&root) {
                roots.push(root);
            }
            Ok(roots)
        })
    }

    /// Removes a root (last step of CA rotation). Returns whether it was present.
    pub fn remove_root(&self, root: &CertificateDer<'_>) -> Result<bool, TrustError> {
        let mut found = false;
        self.modify("trust bundle", |roots| {
            let kept: Vec<_> =
                roots.iter().filter(|r| r.as_ref() != root.as_ref()).cloned().collect();
            found = kept.len() != roots.len();
            Ok(kept)
        })?;
        Ok(found)
    }

    /// Notified with the new generation on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn modify(
        &self,
        what: &str,
        f: impl FnOnce(&[CertificateDer<'static>]) -> Result<Vec<CertificateDer<'static>>, TrustError>,
    ) -> Result<(), TrustError> {
        let mut guard = self.state.write().unwrap_or_else(PoisonError::into_inner);
        let roots = f(&guard.roots)?;
        let next = build(&guard.trust_domain, roots, guard.generation + 1, what)?;
        let generation = next.generation;
        *guard = Arc::new(next);
        drop(guard);
        self.changes.send_replace(generation);
        tracing::info!(generation, "trust bundle changed");
        Ok(())
    }
}

fn read_roots(path: &Path) -> Result<Vec<CertificateDer<'static>>, TrustError> {
    let what = path.display().to_string();
    let text = fs::read_to_string(path)
        .map_err(|source| TrustError::Read { path: what.clone(), source })?;
    certs_from_pem(&text, &what).map_err(|source| TrustError::Pem { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::Ca;
    use std::time::Duration;

    fn root() -> CertificateDer<'static> {
        let (ca, _) = Ca::generate_root("td", Duration::from_secs(3600)).unwrap();
        ca.roots()[0].clone()
    }

    #[test]
    fn rotation_add_then_remove() {
        let (old, new) = (root(), root());
        let bundle = TrustBundle::new("td", vec![old.clone()]).unwrap();
        let mut rx = bundle.subscribe();
        bundle.add_root(new.clone()).unwrap();
        bundle.add_root(new.clone()).unwrap();
        assert_eq!(bundle.roots(), vec![old.clone(), new.clone()]);
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), 2);
        assert!(bundle.remove_root(&old).unwrap());
        assert!(!bundle.remove_root(&old).unwrap());
        assert_eq!(bundle.roots(), vec![new.clone()]);
        assert!(matches!(bundle.remove_root(&new), Err(TrustError::Empty)));
        assert_eq!(bundle.current().root_store().len(), 1);
    }

    #[test]
    fn loads_several_roots_from_one_pem_file() {
        let (a, b) = (root(), root());
        let dir = std::env::temp_dir().join(format!("tlsmesh-bundle-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bundle.pem");
        fs::write(&path, certs_to_pem([&a, &b])).unwrap();
        let bundle = TrustBundle::load("td", &path).unwrap();
        assert_eq!(bundle.roots(), vec![a.clone(), b]);
        fs::write(&path, certs_to_pem([&a])).unwrap();
        bundle.reload(&path).unwrap();
        assert_eq!(bundle.roots(), vec![a]);
        fs::write(&path, "garbage").unwrap();
        let err = bundle.reload(&path).unwrap_err();
        assert!(err.to_string().contains("bundle.pem"), "{err}");
        assert_eq!(bundle.roots().len(), 1, "a failed reload keeps the old roots");
        fs::remove_dir_all(&dir).unwrap();
    }
}
