//! Captured connections: the outbound path (a pod's captured connect,
//! accepted on its in-pod 127.0.0.1:15001 listener) and the inbound
//! plaintext path (a connection steered by `sk_lookup` to the pod's 15006
//! listener).
//!
//! Outbound: the original destination comes from the kernel ([`OrigDst`]:
//! the eBPF map, keyed by the pod's netns cookie and the client's own
//! address), the route from the inventory: an enrolled pod on this node gets
//! the bytes delivered inside its own netns (plaintext never leaves the
//! node, no TLS needed); an enrolled pod on another node goes through the
//! tunnel; anything else is passed through from the source pod's netns, so it
//! leaves with the pod's own address as if never captured.
//!
//! Inbound: `inventory::inbound_verdict` decides; refused connections are
//! reset at once.
//!
//! Every accepted connection runs as a task of its pod's scope and holds a
//! connection-table entry for its life.

mod inbound;
mod outbound;

use std::{net::SocketAddr, sync::Arc};

use tokio::net::{TcpListener, TcpStream};

use crate::{
    accept::Backoff,
    conns::ConnTable,
    kernel::OrigDst,
    mesh::Mesh,
    scope::Drain,
    state::{NodeState, PodEntry},
    stats::Stats,
};

/// What the proxy paths need (and nothing more).
#[derive(Clone)]
pub struct Proxy {
    /// Node state: inventory, served pods, deny records.
    pub state: Arc<NodeState>,
    /// The connection table.
    pub conns: ConnTable,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Original destinations of captured connections.
    pub orig_dst: Arc<dyn OrigDst>,
    /// The tunnel (absent when no CA is configured).
    pub mesh: Option<Arc<Mesh>>,
    /// The daemon's drain signal: listeners stop accepting.
    pub drain: Drain,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy").field("conns", &self.conns).finish_non_exhaustive()
    }
}

/// Which listener an accept loop serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    Outbound,
    Inbound,
}

impl Proxy {
    /// Starts `pod`'s accept loops in its scope.
    pub fn serve_pod(
        &self,
        pod: &Arc<PodEntry>,
        outbound: Vec<TcpListener>,
        inbound: Vec<TcpListener>,
    ) {
        for (l, side) in outbound
            .into_iter()
            .map(|l| (l, Side::Outbound))
            .chain(inbound.into_iter().map(|l| (l, Side::Inbound)))
        {
            pod.scope.spawn(self.clone().accept_loop(Arc::clone(pod), l, side));
        }
    }

    /// Accepts until the daemon drains (the pod's scope ending stops it
    /// too); each connection is a task of the pod's scope.
    async fn accept_loop(self, pod: Arc<PodEntry>, listener: TcpListener, side: Side) {
        let what = match side {
            Side::Outbound => "outbound",
            Side::Inbound => "inbound",
        };
        let mut backoff = Backoff::default();
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = self.drain.signalled() => return,
            };
            match accepted {
                Ok((stream, peer)) => {
                    backoff.reset();
                    let _ = stream.set_nodelay(true);
                    let (p, pod2) = (self.clone(), Arc::clone(&pod));
                    match side {
                        Side::Outbound => pod.scope.spawn(outbound::serve(p, pod2, stream, peer)),
                        Side::Inbound => pod.scope.spawn(inbound::serve(p, pod2, stream, peer)),
                    }
                }
                Err(e) => backoff.failed(&pod.key(), what, &e).await,
            }
        }
    }
}

/// Counts and logs a captured connection that cannot be relayed at all.
fn dropped(stats: &Stats, pod: &PodEntry, peer: SocketAddr, why: &str) {
    Stats::inc(&stats.connections_dropped);
    tracing::warn!(pod = %pod.key(), %peer, why, "captured connection dropped");
}

/// Closes with RST (`SO_LINGER` 0), so the peer sees a refusal, not an EOF.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}
