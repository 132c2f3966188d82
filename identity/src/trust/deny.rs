//! The deny list: certificate serials (hex) and SPIFFE IDs that must be
//! refused even though their certificates chain to a trusted root.
//!
//! File format: one entry per line; `#` starts a comment; a line starting with
//! `spiffe://` is an identity (workload or node), anything else a serial in
//! hex (colons allowed, case and leading zero bytes ignored).

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::watch;

use super::TrustError;
use crate::spiffe::Identity;

/// Why a peer is refused by the deny list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Revoked {
    #[error("certificate serial {serial} is on the deny list (revoked)")]
    Serial { serial: String },
    #[error("identity {id} is on the deny list (revoked)")]
    Identity { id: String },
}

/// The contents of a deny list.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DenySet {
    serials: HashSet<String>,
    ids: HashSet<String>,
}

impl DenySet {
    /// Parses the deny-list file format; `what` names the source in errors.
    pub fn parse(text: &str, what: &str) -> Result<Self, TrustError> {
        let mut set = DenySet::default();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.split('#').next().unwrap_or_default().trim();
            if line.is_empty() {
                continue;
            }
            let err = |reason: String| TrustError::DenyLine {
                what: what.to_owned(),
                line: i + 1,
                reason,
            };
            if line.starts_with("spiffe://") {
                let id: Identity =
                    line.parse().map_err(|e: crate::spiffe::SpiffeError| err(e.to_string()))?;
                set.ids.insert(id.to_string());
            } else {
                let serial = normalize_serial(line).ok_or_else(|| {
                    err(format!("{line:?} is neither a spiffe:// ID nor a hex serial"))
                })?;
                set.serials.insert(serial);
            }
        }
        Ok(set)
    }

    pub fn insert_serial(&mut self, serial: &str) -> bool {
        normalize_serial(serial).is_some_and(|s| self.serials.insert(s))
    }

    pub fn insert_identity(&mut self, id: &Identity) -> bool {
        self.ids.insert(id.to_string())
    }

    pub fn len(&self) -> usize {
        self.serials.len() + self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a peer with this identity and certificate serials (leaf first,
    /// then its chain) is denied.
    pub fn check(&self, id: &Identity, serials: &[&str]) -> Result<(), Revoked> {
        let uri = id.to_string();
        if self.ids.contains(&uri) {
            return Err(Revoked::Identity { id: uri });
        }
        for serial in serials {
            if let Some(s) = normalize_serial(serial) {
                if self.serials.contains(&s) {
                    return Err(Revoked::Serial { serial: s });
                }
            }
        }
        Ok(())
    }
}

/// Lowercase hex without colons or leading zero bytes; `None` if not hex.
fn normalize_serial(s: &str) -> Option<String> {
    let hex: String = s.chars().filter(|c| *c != ':').map(|c| c.to_ascii_lowercase()).collect();
    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let padded = if hex.len() % 2 == 1 { format!("0{hex}") } else { hex };
    let mut rest = padded.as_str();
    while rest.len() > 2 && rest.starts_with("00") {
        rest = &rest[2..];
    }
    Some(rest.to_owned())
}

/// A shared, updatable deny list. Clones share the same list.
#[derive(Debug, Clone)]
pub struct DenyList {
    set: Arc<RwLock<Arc<DenySet>>>,
    changes: Arc<watch::Sender<u64>>,
}

impl Default for DenyList {
    fn default() -> Self {
        Self::new(DenySet::default())
    }
}

impl DenyList {
    pub fn new(set: DenySet) -> Self {
        Self { set: Arc::new(RwLock::new(Arc::new(set))), changes: Arc::new(watch::Sender::new(0)) }
    }

    /// Loads a deny-list file.
    pub fn load(path: &Path) -> Result<Self, TrustError> {
        Ok(Self::new(read(path)?))
    }

    /// Re-reads the file and replaces the list; on error the list is unchanged.
    pub fn reload(&self, path: &Path) -> Result<(), TrustError> {
        let set = read(path)?;
        self.replace(set);
        Ok(())
    }

    pub fn current(&self) -> Arc<DenySet> {
        self.set.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Replaces the list and notifies subscribers.
    pub fn replace(&self, set: DenySet) {
        self.update(|s| *s = set);
    }

    /// Adds a serial (hex).
    pub fn deny_serial(&self, serial: &str) {
        self.update(|s| {
            s.insert_serial(serial);
        });
    }

    /// Adds an identity.
    pub fn deny_identity(&self, id: &Identity) {
        self.update(|s| {
            s.insert_identity(id);
        });
    }

    /// See [`DenySet::check`].
    pub fn check(&self, id: &Identity, serials: &[&str]) -> Result<(), Revoked> {
        self.current().check(id, serials)
    }

    /// A receiver that sees a new generation number on every change; the
    /// daemon then re-checks the peer of each open tunnel with
    /// [`check`](Self::check) and closes the denied ones.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    fn update(&self, f: impl FnOnce(&mut DenySet)) {
        let mut guard = self.set.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = (**guard).clone();
        f(&mut next);
        let len = next.len();
        *guard = Arc::new(next);
        drop(guard);
        self.changes.send_modify(|g| *g += 1);
        tracing::info!(entries = len, "deny list changed");
    }
}

fn read(path: &Path) -> Result<DenySet, TrustError> {
    let what = path.display().to_string();
    let text = fs::read_to_string(path)
        .map_err(|source| TrustError::Read { path: what.clone(), source })?;
    DenySet::parse(&text, &what)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_file_format() {
        let set = DenySet::parse(
            "# revoked after incident 42\n00:8F:01\nspiffe://td/ns/a/sa/b  # compromised\n\nspiffe://td/node/n1\n",
            "deny.txt",
        )
        .unwrap();
        assert_eq!(set.len(), 3);
        let b: Identity = "spiffe://td/ns/a/sa/b".parse().unwrap();
        let c: Identity = "spiffe://td/ns/a/sa/c".parse().unwrap();
        assert_eq!(set.check(&b, &["01"]), Err(Revoked::Identity { id: b.to_string() }));
        assert_eq!(set.check(&c, &["8f01"]), Err(Revoked::Serial { serial: "8f01".into() }));
        assert_eq!(
            set.check(&c, &["aa", "008F01"]),
            Err(Revoked::Serial { serial: "8f01".into() })
        );
        assert_eq!(set.check(&c, &["8f02"]), Ok(()));

        let err = DenySet::parse("0f:ff\nnot-hex\n", "deny.txt").unwrap_err();
        assert!(err.to_string().contains("deny.txt line 2"), "{err}");
        assert!(DenySet::parse("spiffe://td/bogus\n", "d").is_err());
    }

    #[test]
    fn updates_notify_subscribers() {
        let list = DenyList::default();
        let mut rx = list.subscribe();
        let id: Identity = "spiffe://td/ns/a/sa/b".parse().unwrap();
        assert!(list.check(&id, &["0abc"]).is_ok());
        list.deny_serial("0A:BC");
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert!(list.check(&id, &["abc"]).is_err());
        list.deny_identity(&id);
        assert!(rx.has_changed().unwrap());
        list.replace(DenySet::default());
        assert!(list.check(&id, &["abc"]).is_ok());
    }
}
