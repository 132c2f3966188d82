//! The registry of open tunnel connections (inbound: a TLS or QUIC
//! connection from a peer daemon; outbound: a stream this daemon opened),
//! with the peer's identity and certificate serial, for the admin API and
//! for revocation: a deny-list change closes the inbound ones whose peer is
//! now refused. Entries are guards ([`Tracked`]) removed when dropped.

use std::{
    collections::HashMap,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::Instant,
};

use serde::Serialize;
use tracing::warn;

use crate::sync::lock;

/// One open tunnel connection (server side) or stream (client side).
#[derive(Debug, Clone, Serialize)]
pub struct TunnelView {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Peer SPIFFE id.
    pub peer: String,
    /// Peer certificate serial (inbound).
    pub serial: String,
    /// tcp or quic.
    pub transport: String,
    /// Local pod.
    pub pod: String,
    /// Remote address.
    pub remote: String,
    /// Seconds open.
    pub age_s: u64,
}

struct Entry {
    view: TunnelView,
    since: Instant,
    /// Closes the tunnel (inbound: aborts the TCP connection's task or
    /// closes the QUIC connection). Outbound streams have none: the pool
    /// closes the connection they ride on ([`Mesh::enforce_deny_list`]).
    close: Option<Closer>,
}

/// How the registry closes one tunnel.
pub type Closer = Box<dyn FnOnce() + Send>;

/// Open tunnels, for the admin API and for revocation.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    fn add(&self, view: TunnelView, close: Option<Closer>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, Entry { view, since: Instant::now(), close });
        id
    }

    fn remove(&self, id: u64) {
        lock(&self.open).remove(&id);
    }

    /// The open tunnels.
    pub fn list(&self) -> Vec<TunnelView> {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .values()
            .map(|e| TunnelView { age_s: e.since.elapsed().as_secs(), ..e.view.clone() })
            .collect()
    }

    /// Closes every tunnel whose peer fails `still_allowed`. Returns how many.
    pub fn close_where(&self, still_allowed: impl Fn(&TunnelView) -> bool) -> usize {
        let mut open = lock(&self.open);
        // Entries without a closer (outbound streams) stay listed: their
        // pooled connection is closed through the pool.
        let doomed: Vec<u64> = open
            .iter()
            .filter(|(_, e)| e.close.is_some() && !still_allowed(&e.view))
            .map(|(k, _)| *k)
            .collect();
        for id in &doomed {
            if let Some(e) = open.remove(id) {
                warn!(peer = %e.view.peer, serial = %e.view.serial, direction = e.view.direction, "closing tunnel: peer revoked");
                if let Some(close) = e.close {
                    close();
                }
            }
        }
        doomed.len()
    }
}

/// A registry entry that is removed when dropped (its tunnel ended, also
/// when its task was cancelled).
pub struct Tracked {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

impl Registry {
    /// Registers `view` (with `close` to end it on revocation) until the
    /// returned guard drops.
    pub fn track(self: &Arc<Self>, view: TunnelView, close: Option<Closer>) -> Tracked {
        Tracked { registry: Arc::clone(self), id: self.add(view, close) }
    }
}
