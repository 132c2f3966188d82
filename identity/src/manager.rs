//! The node daemon's workload certificates: [`CertManager`] fetches a
//! certificate for an identity the first time it is needed
//! ([`ensure`](CertManager::ensure)), renews it at half-life (with jittered
//! exponential backoff on failure, the old certificate staying in use), and
//! forgets identities whose pods left the node ([`retain`](CertManager::retain)).
//!
//! Keys are generated here (ECDSA P-256) and never leave the process; only
//! CSRs go to the [`CertSource`]. A renewal swaps the `Arc<CertifiedKey>` that
//! *new* handshakes pick up; established TLS sessions are not touched.
//!
//! The schedule is the pure [`next_renewal`]; the clock is injectable
//! ([`Clock`]) and [`renew_due`](CertManager::renew_due) can be driven
//! directly, so tests run in milliseconds.

mod schedule;
mod source;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use rustls::sign::CertifiedKey;
use serde::Serialize;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use tokio::sync::Notify;

pub use schedule::{next_renewal, RETRY_BASE, RETRY_MAX};
pub use source::{BoxFuture, CertSource, LocalCa, SourceError};

use crate::keys::{CertInfo, KeyError, PrivateKey};
use crate::spiffe::{Identity, SpiffeId};
use crate::tls::{sni_string, CertStore};

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum ManagerError {
    #[error("cannot generate a key or CSR for {id}: {source}")]
    Key {
        id: String,
        #[source]
        source: KeyError,
    },
    #[error("the CA did not issue a certificate for {id}: {source}")]
    Source {
        id: String,
        #[source]
        source: SourceError,
    },
    #[error("the certificate returned for {id} is unusable: {source}")]
    BadCertificate {
        id: String,
        #[source]
        source: KeyError,
    },
    #[error("asked the CA for {id} but got a certificate for {got}; the CA is misbehaving")]
    WrongIdentity { id: String, got: String },
}

/// The time source of the manager.
pub trait Clock: Send + Sync + std::fmt::Debug {
    fn now(&self) -> OffsetDateTime;
}

/// The system clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// Options of a [`CertManager`].
#[derive(Debug, Clone)]
pub struct ManagerOptions {
    pub clock: Arc<dyn Clock>,
    /// A fixed jitter in `[0, 1]` instead of a random one (tests).
    pub fixed_jitter: Option<f64>,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        Self { clock: Arc::new(SystemClock), fixed_jitter: None }
    }
}

/// One identity's state in the admin API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CertStatus {
    pub identity: String,
    /// Hex serial of the certificate in use.
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    /// RFC 3339.
    pub not_after: String,
    /// RFC 3339.
    pub next_renewal: String,
    /// Successful renewals since the identity was first fetched.
    pub renewals: u64,
    /// Consecutive failed renewals (0 when healthy).
    pub failures: u32,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone)]
struct Current {
    key: Arc<CertifiedKey>,
    info: CertInfo,
    /// max(notBefore, time received): the start of the renewal schedule.
    start: OffsetDateTime,
}

#[derive(Debug)]
struct Entry {
    current: Current,
    next_renewal: OffsetDateTime,
    renewals: u64,
    failures: u32,
    last_error: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    entries: HashMap<SpiffeId, Entry>,
    by_sni: HashMap<String, SpiffeId>,
}

/// Workload certificates of one node, renewed in the background.
#[derive(Debug)]
pub struct CertManager {
    source: Arc<dyn CertSource>,
    options: ManagerOptions,
    state: RwLock<State>,
    /// Serializes first fetches per identity.
    fetching: tokio::sync::Mutex<HashMap<SpiffeId, Arc<tokio::sync::Mutex<()>>>>,
    wake: Notify,
}

impl CertManager {
    pub fn new(source: Arc<dyn CertSource>) -> Self {
        Self::with_options(source, ManagerOptions::default())
    }

    pub fn with_options(source: Arc<dyn CertSource>, options: ManagerOptions) -> Self {
        Self {
            source,
            options,
            state: RwLock::new(State::default()),
            fetching: tokio::sync::Mutex::new(HashMap::new()),
            wake: Notify::new(),
        }
    }

    /// The current, unexpired certificate of `id`, fetching one first if
    /// this node has none yet. Concurrent callers for the same identity share
    /// one fetch.
    pub async fn ensure(&self, id: &SpiffeId) -> Result<Arc<CertifiedKey>, ManagerError> {
        if let Some(key) = CertStore::get(self, id) {
            return Ok(key);
        }
        let lock = self.fetching.lock().await.entry(id.clone()).or_default().clone();
        let _guard = lock.lock().await;
        if let Some(key) = CertStore::get(self, id) {
            return Ok(key);
        }
        let current = match self.fetch(id).await {
            Ok(current) => current,
            Err(e) => {
                self.fetching.lock().await.remove(id);
                return Err(e);
            }
        };
        let key = current.key.clone();
        let next = self.schedule(&current, 0);
        tracing::info!(%id, serial = %current.info.serial, not_after = %current.info.not_after, "obtained workload certificate");
        {
            let mut state = self.write();
            state.by_sni.insert(sni_string(id), id.clone());
            let entry = state.entries.entry(id.clone());
            match entry {
                std::collections::hash_map::Entry::Occupied(mut e) => {
                    // An expired certificate was replaced.
                    let e = e.get_mut();
                    e.current = current;
                    e.next_renewal = next;
                    e.failures = 0;
                    e.renewals += 1;
                    e.last_error = None;
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(Entry {
                        current,
                        next_renewal: next,
                        renewals: 0,
                        failures: 0,
                        last_error: None,
                    });
                }
            }
        }
        self.fetching.lock().await.remove(id);
        self.wake.notify_one();
        Ok(key)
    }

    /// Drops the certificates of identities not in `keep` (their pods left
    /// this node). Returns the dropped identities.
    pub fn retain(&self, keep: &HashSet<SpiffeId>) -> Vec<SpiffeId> {
        let mut state = self.write();
        let dropped: Vec<SpiffeId> =
            state.entries.keys().filter(|id| !keep.contains(*id)).cloned().collect();
        for id in &dropped {
            state.entries.remove(id);
            state.by_sni.remove(&sni_string(id));
            tracing::info!(%id, "dropped workload certificate: no pod with this identity on the node");
        }
        dropped
    }

    /// Renews every certificate whose renewal time is at or before `now`.
    /// On failure the old certificate stays in use and a retry is scheduled
    /// with backoff. Returns how many renewals succeeded.
    pub async fn renew_due(&self, now: OffsetDateTime) -> usize {
        let due: Vec<SpiffeId> = self
            .read()
            .entries
            .iter()
            .filter(|(_, e)| e.next_renewal <= now)
            .map(|(id, _)| id.clone())
            .collect();
        let mut renewed = 0;
        for id in due {
            let result = self.fetch(&id).await;
            let mut state = self.write();
            let Some(entry) = state.entries.get_mut(&id) else { continue };
            match result {
                Ok(current) => {
                    tracing::info!(%id, old_serial = %entry.current.info.serial, serial = %current.info.serial, not_after = %current.info.not_after, "renewed workload certificate");
                    entry.next_renewal = self.schedule(&current, 0);
                    entry.current = current;
                    entry.renewals += 1;
                    entry.failures = 0;
                    entry.last_error = None;
                    renewed += 1;
                }
                Err(e) => {
                    entry.failures = entry.failures.saturating_add(1);
                    entry.next_renewal = self.schedule(&entry.current, entry.failures);
                    tracing::warn!(%id, failures = entry.failures, retry_at = %entry.next_renewal, serial = %entry.current.info.serial, not_after = %entry.current.info.not_after, "certificate renewal failed; still using the current certificate: {e}");
                    entry.last_error = Some(e.to_string());
                }
            }
        }
        renewed
    }

    /// The earliest scheduled renewal, if any identity is held.
    pub fn next_due(&self) -> Option<OffsetDateTime> {
        self.read().entries.values().map(|e| e.next_renewal).min()
    }

    /// Runs renewals forever (until the task is aborted), sleeping until the
    /// next one is due, at most 30 s at a time, waking early when
    /// [`ensure`](Self::ensure) adds an identity.
    pub fn spawn_renewal(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                this.renew_due(this.options.clock.now()).await;
                let wait = this.next_due().map_or(Duration::from_secs(30), |at| {
                    (at - this.options.clock.now())
                        .clamp(time::Duration::ZERO, time::Duration::seconds(30))
                        .unsigned_abs()
                });
                tokio::select! {
                    () = tokio::time::sleep(wait.max(Duration::from_millis(50))) => {}
                    () = this.wake.notified() => {}
                }
            }
        })
    }

    /// The identities held, for the admin API (sorted by identity).
    pub fn snapshot(&self) -> Vec<CertStatus> {
        let fmt = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_else(|_| t.to_string());
        let mut out: Vec<CertStatus> = self
            .read()
            .entries
            .iter()
            .map(|(id, e)| CertStatus {
                identity: id.to_string(),
                serial: e.current.info.serial.clone(),
                not_before: fmt(e.current.info.not_before),
                not_after: fmt(e.current.info.not_after),
                next_renewal: fmt(e.next_renewal),
                renewals: e.renewals,
                failures: e.failures,
                last_error: e.last_error.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Facts of the certificate in use for `id` (even if expired).
    pub fn cert_info(&self, id: &SpiffeId) -> Option<CertInfo> {
        self.read().entries.get(id).map(|e| e.current.info.clone())
    }

    async fn fetch(&self, id: &SpiffeId) -> Result<Current, ManagerError> {
        let key = PrivateKey::generate()
            .map_err(|source| ManagerError::Key { id: id.to_string(), source })?;
        let identity = Identity::Workload(id.clone());
        let csr = key
            .csr_pem(&identity)
            .map_err(|source| ManagerError::Key { id: id.to_string(), source })?;
        let chain = self
            .source
            .issue(&csr, id)
            .await
            .map_err(|source| ManagerError::Source { id: id.to_string(), source })?;
        let bad = |source| ManagerError::BadCertificate { id: id.to_string(), source };
        let certified = key.certified_key(&chain).map_err(bad)?;
        let info = CertInfo::from_der(&certified.cert[0]).map_err(bad)?;
        if info.identity != identity {
            return Err(ManagerError::WrongIdentity {
                id: id.to_string(),
                got: info.identity.to_string(),
            });
        }
        let start = info.not_before.max(self.options.clock.now());
        Ok(Current { key: certified, info, start })
    }

    fn schedule(&self, current: &Current, failures: u32) -> OffsetDateTime {
        let jitter = self.options.fixed_jitter.unwrap_or_else(rand::random::<f64>);
        next_renewal(
            current.start,
            current.info.not_after,
            self.options.clock.now(),
            failures,
            jitter,
        )
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }
}

impl CertStore for CertManager {
    /// The certificate in use for `id`, unless it has expired.
    fn get(&self, id: &SpiffeId) -> Option<Arc<CertifiedKey>> {
        let now = self.options.clock.now();
        self.read()
            .entries
            .get(id)
            .filter(|e| e.current.info.not_after > now)
            .map(|e| e.current.key.clone())
    }

    fn get_by_sni(&self, sni: &str) -> Option<Arc<CertifiedKey>> {
        let id = self.read().by_sni.get(sni).cloned()?;
        CertStore::get(self, &id)
    }
}

#[cfg(test)]
mod tests;
