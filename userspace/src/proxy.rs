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
//!
//! Relays of two sockets (local delivery, passthrough, inbound plaintext)
//! pause when the daemon hands over and offer themselves to the next
//! daemon ([`relay_sockets`]); the next daemon relays them on from where
//! they paused ([`Proxy::adopt`]).

mod inbound;
mod outbound;

use std::{
    io,
    net::SocketAddr,
    os::fd::{AsFd, OwnedFd},
    sync::Arc,
};

use tlsmesh_tunnel::{SpliceEnd, SplicePoint};
use tokio::net::{TcpListener, TcpStream};

use crate::{
    accept::Backoff,
    conns::{ConnGuard, ConnInfo, ConnTable, Direction, Offered, PausedStream, Transfer},
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

/// A connection taken over from the previous daemon, not relayed yet.
pub struct Adopted {
    pod: Arc<PodEntry>,
    what: Moved,
}

impl std::fmt::Debug for Adopted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Adopted").field("pod", &self.pod.key()).finish_non_exhaustive()
    }
}

enum Moved {
    /// A relay of two sockets.
    Relay { guard: ConnGuard, sockets: (TcpStream, TcpStream), pod_first: bool, point: SplicePoint },
    /// A paused resumable tunnel stream.
    Stream(crate::resumable::Relay),
}

impl Proxy {
    /// Takes over a connection the previous daemon relayed for `pod`: its
    /// entry `info`, its two sockets (the relay's first and second side)
    /// and where the relay paused. The entry is in the table at once; the
    /// relay starts with [`Adopted::start`].
    pub fn adopt(
        &self,
        pod: &Arc<PodEntry>,
        info: ConnInfo,
        sockets: [OwnedFd; 2],
        point: SplicePoint,
    ) -> io::Result<Adopted> {
        let [a, b] = sockets;
        let sockets = (tcp_socket(a)?, tcp_socket(b)?);
        let pod_first = info.direction == Direction::Outbound;
        let guard = self.conns.adopt(info);
        Ok(Adopted {
            pod: Arc::clone(pod),
            what: Moved::Relay { guard, sockets, pod_first, point },
        })
    }
}

impl Proxy {
    /// Takes over a paused resumable tunnel stream the previous daemon
    /// relayed for `pod`: its entry, its app socket and how to resume it.
    pub fn adopt_stream(
        &self,
        pod: &Arc<PodEntry>,
        info: ConnInfo,
        app: OwnedFd,
        stream: PausedStream,
    ) -> io::Result<Adopted> {
        let Some(mesh) = &self.mesh else {
            return Err(io::Error::other("no tunnel here (no CA configured)"));
        };
        let app = tcp_socket(app)?;
        let guard = self.conns.adopt(info);
        let relay = crate::resumable::Relay {
            guard,
            app,
            pod: pod.key(),
            stream,
            registry: Arc::clone(&mesh.streams),
            dialer: Arc::clone(mesh) as Arc<dyn crate::resumable::Dialer>,
        };
        Ok(Adopted { pod: Arc::clone(pod), what: Moved::Stream(relay) })
    }
}

impl Adopted {
    /// Relays it on, as a task of its pod's scope.
    pub fn start(self) {
        match self.what {
            Moved::Relay { guard, sockets: (a, b), pod_first, point } => {
                self.pod.scope.spawn(relay_sockets(guard, a, b, pod_first, point));
            }
            Moved::Stream(relay) => self.pod.scope.spawn(relay.run(None)),
        }
    }
}

/// A socket passed by the previous daemon, checked to be a connected TCP
/// socket.
fn tcp_socket(fd: OwnedFd) -> io::Result<TcpStream> {
    let s = socket2::Socket::from(fd);
    if s.r#type()? != socket2::Type::STREAM {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "not a stream socket"));
    }
    let s = std::net::TcpStream::from(s);
    s.peer_addr()?;
    s.set_nonblocking(true)?;
    TcpStream::from_std(s)
}

/// Relays the two sockets of `guard`'s entry (`first` is the outbound
/// pod's own when `pod_first`, else the inbound client's) until they end,
/// the daemon closes the connection (`first` is reset), or the connection
/// moves to the next daemon. Bytes are counted from `from` on.
pub(crate) async fn relay_sockets(
    mut guard: ConnGuard,
    first: TcpStream,
    second: TcpStream,
    pod_first: bool,
    from: SplicePoint,
) {
    let (mut first, mut second) = (first, second);
    let moved = |at: &SplicePoint| {
        let (fwd, back) = (at.a_to_b - from.a_to_b, at.b_to_a - from.b_to_a);
        if pod_first {
            Transfer::pod_first(fwd, back)
        } else {
            Transfer::pod_second(fwd, back)
        }
    };
    let mut point = from;
    loop {
        let mut turn = None;
        let stop = async {
            guard.handover_requested().await;
            // Relays on until its turn (boxed: an idle relay's future does
            // not carry the wait).
            turn = Box::pin(guard.handover_turn()).await;
        };
        let end = tokio::select! {
            end = tlsmesh_tunnel::splice_pausable(&mut first, &mut second, point, stop) => Some(end),
            () = guard.closed() => None,
        };
        match end {
            None => {
                guard.failed(Transfer::default(), "closed by the daemon (policy)");
                drop(second);
                reset(first);
                return;
            }
            Some(SpliceEnd::Finished(out)) => {
                let at = SplicePoint { a_to_b: out.a_to_b, b_to_a: out.b_to_a, ..point };
                match out.error {
                    Some(error) => guard.failed(moved(&at), error),
                    None => guard.finished(moved(&at)),
                }
                return;
            }
            Some(SpliceEnd::Paused(at)) => {
                let what = Offered::Relay { point: at, sockets: [first.as_fd(), second.as_fd()] };
                let taken = guard.hand_off(moved(&at), what).await;
                drop(turn);
                if taken {
                    // The next daemon relays it: close our copies, no reset.
                    return;
                }
                point = at;
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
