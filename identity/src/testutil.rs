//! Helpers shared by the unit tests.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rustls::sign::CertifiedKey;
use time::OffsetDateTime;

use crate::ca::Ca;
use crate::keys::PrivateKey;
use crate::spiffe::{Identity, SpiffeId};

pub(crate) const TD: &str = "cluster.local";

/// A fresh root CA valid for a day (starting a day ago).
pub(crate) fn root_ca() -> Ca {
    let now = OffsetDateTime::now_utc();
    let generated =
        Ca::generate_root_at(TD, now - time::Duration::days(1), now + time::Duration::days(1))
            .unwrap();
    Ca::from_pem(
        &generated.cert_pem,
        &generated.key.to_pem(),
        &[],
        TD,
        now,
        &crate::ca::PemNames { cert: "test ca".into(), key: "test key".into() },
    )
    .unwrap()
}

pub(crate) fn id(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new(TD, ns, sa).unwrap()
}

/// A workload certificate for `id` issued by `ca` as if at `now`.
pub(crate) fn workload_cert(
    ca: &Ca,
    id: &SpiffeId,
    lifetime: Duration,
    now: OffsetDateTime,
) -> Arc<CertifiedKey> {
    let key = PrivateKey::generate().unwrap();
    let identity = Identity::Workload(id.clone());
    let csr = key.csr_pem(&identity).unwrap();
    let issued = ca.issue(&csr, &identity, lifetime, now).unwrap();
    key.certified_key(&issued.chain_pem).unwrap()
}

/// A temporary directory removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "tlsmesh-identity-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
