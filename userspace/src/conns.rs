//! The connection table: every connection the daemon relays — outbound
//! through the tunnel, local delivery to a pod on this node, passthrough,
//! inbound tunnel stream, inbound plaintext — is an entry held by a
//! [`ConnGuard`]. The guard's drop removes the entry, adds the bytes to the
//! counters and writes the access-log line, so a connection that ends any
//! way (finished, failed, its task cancelled because its pod was removed)
//! leaves nothing behind. The open-connection gauge is the table's size.
//!
//! `/config_dump` lists the table (like `istioctl ztunnel-config
//! connections`); the drain waits until it is empty.
//!
//! An [`Observer`] (the workload-pair metrics) is told when each entry
//! opens and closes, and about connections refused before they had one
//! ([`ConnTable::refused`]): once per connection, never per read.
//!
//! Handover ([`ConnTable::hand_over`]): the table tells the relays whose
//! sockets can move to the next daemon to pause; each offers itself
//! ([`ConnGuard::hand_off`]) to the [`Taker`] (the `handover` module's
//! successor) and learns whether it was taken.

use std::{
    collections::HashMap,
    net::SocketAddr,
    os::fd::BorrowedFd,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, OnceLock,
    },
    time::{Instant, SystemTime},
};

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
};

use serde::{Deserialize, Serialize};
use tlsmesh_tunnel::SplicePoint;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::watch,
};
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{config::Transport, stats::Stats, sync::lock};

/// Which way a connection goes, seen from the pod this daemon serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// A pod on this node opened it.
    Outbound,
    /// It arrives at a pod on this node.
    Inbound,
}

impl Direction {
    /// The lower-case name (as in `/config_dump`).
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// How the connection is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Route {
    /// Through the mTLS tunnel (outbound stream, or inbound stream).
    Tunnel,
    /// Delivered to an enrolled pod on the same node (no TLS needed).
    Local,
    /// To something not enrolled, from the pod's own address.
    Passthrough,
    /// Plaintext accepted by a permissive pod.
    Plaintext,
    /// A node probe accepted in plaintext.
    Probe,
}

impl Route {
    /// The lower-case name (as in `/config_dump`).
    pub fn as_str(self) -> &'static str {
        match self {
            Route::Tunnel => "tunnel",
            Route::Local => "local",
            Route::Passthrough => "passthrough",
            Route::Plaintext => "plaintext",
            Route::Probe => "probe",
        }
    }
}

/// What is known about a connection when it opens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnInfo {
    /// Outbound or inbound.
    pub direction: Direction,
    /// How it is carried.
    pub route: Route,
    /// The pod on this node it belongs to (`namespace/name`).
    pub pod: String,
    /// The source: the client's address.
    pub src: SocketAddr,
    /// The destination: the original destination address.
    pub dst: SocketAddr,
    /// The other workload (`namespace/name`), when it is a known pod.
    pub peer_pod: Option<String>,
    /// The SPIFFE identity of the source workload, when known.
    pub src_identity: Option<String>,
    /// The SPIFFE identity of the destination workload, when known.
    pub dst_identity: Option<String>,
    /// `tcp` (HBONE) or `quic` for tunnel connections.
    pub transport: Option<Transport>,
    /// The Service (`namespace/name`) an outbound connection was addressed
    /// to, when it went to a Service address.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dst_service: Option<String>,
}

/// Why a connection was refused or failed before it was relayed (the
/// metrics' `response_flags`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Failure {
    /// L4 policy denied it.
    PolicyDenied,
    /// Plaintext to a strict pod.
    PlaintextRefused,
    /// The destination (app, passthrough target, tunnel peer) could not be
    /// reached.
    ConnectFailed,
    /// The TLS handshake failed.
    TlsFailed,
    /// A certificate or identity problem (wrong or missing SPIFFE ID, no
    /// certificate, no CA).
    IdentityError,
    /// The peer's certificate is revoked (deny list).
    Revoked,
}

/// Told about every connection of the table (the workload-pair metrics).
/// Called on the connection's task, once when it opens and once when it
/// closes: keep it cheap and never block.
pub trait Observer: Send + Sync {
    /// A connection opened; what is returned is told when it closes.
    fn opened(&self, info: &ConnInfo) -> Option<Box<dyn Closing>>;
    /// A connection was refused or failed before it was relayed.
    fn refused(&self, info: &ConnInfo, why: Failure);
    /// A connection the previous daemon opened was taken over (it did not
    /// open now).
    fn adopted(&self, info: &ConnInfo) -> Option<Box<dyn Closing>> {
        self.opened(info)
    }
}

/// Told when one observed connection closes.
pub trait Closing: Send + Sync {
    /// The connection closed, having moved `t`.
    fn closed(self: Box<Self>, t: Transfer);
    /// The connection moved to the next daemon after moving `t` here (it
    /// did not close).
    fn handed_over(self: Box<Self>, t: Transfer) {
        self.closed(t);
    }
}

/// Which side of a resumable tunnel stream this daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamRole {
    /// The source node's side: it sent the CONNECT, it sends RESUME.
    Client,
    /// The destination node's side: it answers RESUME.
    Server,
}

/// A paused resumable tunnel stream (docs/PROTOCOL.md §6), as it moves to
/// the next daemon with its app socket. The token is never logged.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausedStream {
    /// The stream's name between the two daemons.
    pub token: String,
    /// This side's role.
    pub role: StreamRole,
    /// The SPIFFE id this side presents (its pod's).
    pub local_identity: String,
    /// The peer's SPIFFE id: only it may quiesce or resume the stream.
    pub peer_identity: String,
    /// Where this side sends its requests: the peer pod's address.
    pub peer: SocketAddr,
    /// Bytes read from the app and sent into the tunnel, in all.
    pub sent: u64,
    /// Bytes received from the tunnel and written to the app, in all.
    pub received: u64,
    /// The tunnel's end-of-stream reached the app (its writer is shut).
    pub app_write_done: bool,
}

impl std::fmt::Debug for PausedStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PausedStream")
            .field("role", &self.role)
            .field("peer_identity", &self.peer_identity)
            .field("peer", &self.peer)
            .field("sent", &self.sent)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

/// What a relay offers to the next daemon.
#[derive(Debug)]
pub enum Offered<'a> {
    /// A relay of two sockets, paused at `point` (its first and second side).
    Relay {
        /// Where it paused.
        point: SplicePoint,
        /// The relay's first and second socket.
        sockets: [BorrowedFd<'a>; 2],
    },
    /// A paused resumable tunnel stream and its app socket.
    Stream {
        /// How to resume it.
        stream: &'a PausedStream,
        /// The pod-side socket.
        app: BorrowedFd<'a>,
    },
}

/// Whoever takes connections over (the next daemon of the node).
pub trait Taker: Send + Sync {
    /// Offers one connection: its entry and what moves with it; the caller
    /// keeps the sockets open until the answer. `true` once the taker owns
    /// it.
    fn offer<'a>(
        &'a self,
        info: &'a ConnInfo,
        what: Offered<'a>,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>>;
}

/// One row of the table as the admin API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ConnView {
    /// The entry's id (unique for the daemon's life).
    pub id: u64,
    /// What it is.
    #[serde(flatten)]
    pub info: ConnInfo,
    /// When it opened (seconds since the Unix epoch).
    pub opened_unix_s: u64,
    /// Seconds open.
    pub age_s: u64,
}

/// Bytes a finished connection moved, relative to the pod it belongs to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes the pod sent.
    pub from_pod: u64,
    /// Bytes delivered to the pod.
    pub to_pod: u64,
}

impl Transfer {
    /// The transfer of a splice whose first side `a` is the pod's own
    /// socket: what went a→b left the pod.
    pub fn pod_first(a_to_b: u64, b_to_a: u64) -> Self {
        Self { from_pod: a_to_b, to_pod: b_to_a }
    }

    /// The transfer of a splice whose second side `b` is the pod's socket.
    pub fn pod_second(a_to_b: u64, b_to_a: u64) -> Self {
        Self { from_pod: b_to_a, to_pod: a_to_b }
    }
}

struct Entry {
    info: ConnInfo,
    opened: SystemTime,
    since: Instant,
    close: CancellationToken,
}

/// An I/O object that fails once its connection is closed from outside
/// ([`ConnTable::close_where`]): for splices the daemon does not run itself
/// (inbound tunnel streams, spliced by the tunnel crate's server).
pub struct Cancellable<T> {
    inner: T,
    closed: Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl<T> Cancellable<T> {
    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.closed.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "connection closed by the daemon (policy)",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Cancellable<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Cancellable<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

struct Inner {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
    stats: Arc<Stats>,
    /// The number of open entries, for waiters (the drain).
    len: watch::Sender<usize>,
    /// Told about each connection (set once, by the metrics).
    observer: OnceLock<Arc<dyn Observer>>,
    /// Cancelled when the relays are to pause and offer themselves.
    handover: CancellationToken,
    /// Where the offers go (set once, with `handover`).
    successor: OnceLock<Arc<dyn Taker>>,
    /// Turns to pause and be offered at a handover ([`MOVING_AT_ONCE`]).
    moving: Arc<tokio::sync::Semaphore>,
}

/// At most this many relays are paused and offered (waiting for the next
/// daemon's answer) at once at a handover; the others relay on until their
/// turn. A connection stalls only while it moves itself: with every relay
/// pausing at once, the last of 9,000 local connections stood still for
/// the whole handover (a trickle's echo paused 598 ms).
pub const MOVING_AT_ONCE: usize = 1024;

/// The table of open connections (cheap to clone).
#[derive(Clone)]
pub struct ConnTable {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ConnTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnTable").field("open", &self.len()).finish()
    }
}

impl ConnTable {
    /// An empty table whose closed connections add to `stats`.
    pub fn new(stats: Arc<Stats>) -> Self {
        Self {
            inner: Arc::new(Inner {
                next: AtomicU64::new(1),
                open: Mutex::new(HashMap::new()),
                stats,
                len: watch::channel(0).0,
                observer: OnceLock::new(),
                handover: CancellationToken::new(),
                successor: OnceLock::new(),
                moving: Arc::new(tokio::sync::Semaphore::new(MOVING_AT_ONCE)),
            }),
        }
    }

    /// Tells `observer` about every connection from now on (once; a
    /// second observer is ignored and `false` returned).
    pub fn observe(&self, observer: Arc<dyn Observer>) -> bool {
        self.inner.observer.set(observer).is_ok()
    }

    /// Records a connection refused or failed before it had an entry
    /// (denied, refused plaintext, unreachable, handshake failure).
    pub fn refused(&self, info: &ConnInfo, why: Failure) {
        if let Some(o) = self.inner.observer.get() {
            o.refused(info, why);
        }
    }

    /// Tells every relay that can move to pause and offer itself to `to`
    /// (once; the daemon is going, a successor is there).
    pub fn hand_over(&self, to: Arc<dyn Taker>) {
        if self.inner.successor.set(to).is_ok() {
            self.inner.handover.cancel();
        }
    }

    /// Adds a connection; it stays in the table as long as the guard lives.
    /// Its task must end it when [`ConnGuard::closed`] completes.
    pub fn open(&self, info: ConnInfo) -> ConnGuard {
        let closing = self.inner.observer.get().and_then(|o| o.opened(&info));
        self.insert(info, closing)
    }

    /// Adds a connection taken over from the previous daemon (counted as
    /// open, not as opened).
    pub fn adopt(&self, info: ConnInfo) -> ConnGuard {
        let closing = self.inner.observer.get().and_then(|o| o.adopted(&info));
        Stats::inc(&self.inner.stats.taken_over);
        self.insert(info, closing)
    }

    fn insert(&self, info: ConnInfo, closing: Option<Box<dyn Closing>>) -> ConnGuard {
        let id = self.inner.next.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        let mut open = lock(&self.inner.open);
        open.insert(
            id,
            Entry { info, opened: SystemTime::now(), since: Instant::now(), close: close.clone() },
        );
        self.inner.len.send_replace(open.len());
        ConnGuard { table: Arc::clone(&self.inner), id, done: None, close, closing, stays: false }
    }

    /// Open connections.
    pub fn len(&self) -> usize {
        lock(&self.inner.open).len()
    }

    /// True when nothing is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The open connections, oldest first.
    pub fn list(&self) -> Vec<ConnView> {
        let open = lock(&self.inner.open);
        let mut v: Vec<ConnView> = open
            .iter()
            .map(|(id, e)| ConnView {
                id: *id,
                info: e.info.clone(),
                opened_unix_s: e
                    .opened
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
                age_s: e.since.elapsed().as_secs(),
            })
            .collect();
        v.sort_by_key(|c| c.id);
        v
    }

    /// Closes every open connection `doomed` selects (e.g. now denied by
    /// policy); returns how many. Their entries go when their tasks end.
    pub fn close_where(&self, doomed: impl Fn(&ConnInfo) -> bool) -> usize {
        let doomed: Vec<CancellationToken> = lock(&self.inner.open)
            .values()
            .filter(|e| doomed(&e.info) && !e.close.is_cancelled())
            .map(|e| e.close.clone())
            .collect();
        for t in &doomed {
            t.cancel();
        }
        doomed.len()
    }

    /// Completes once the table is empty.
    pub async fn empty(&self) {
        let mut rx = self.inner.len.subscribe();
        let _ = rx.wait_for(|n| *n == 0).await;
    }
}

/// How a connection ended, for the access log.
#[derive(Debug, Clone)]
enum Done {
    Finished(Transfer),
    Failed(Transfer, String),
    HandedOver(Transfer),
}

/// Holds one table entry; dropping it closes the entry.
pub struct ConnGuard {
    table: Arc<Inner>,
    id: u64,
    done: Option<Done>,
    close: CancellationToken,
    closing: Option<Box<dyn Closing>>,
    /// Offered to the next daemon and not taken: relays on here.
    stays: bool,
}

impl std::fmt::Debug for ConnGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnGuard").field("id", &self.id).finish_non_exhaustive()
    }
}

impl ConnGuard {
    /// Records that the connection ended normally, having moved `t`.
    pub fn finished(&mut self, t: Transfer) {
        self.done = Some(Done::Finished(t));
    }

    /// Records that the connection ended with `error` after moving `t`.
    pub fn failed(&mut self, t: Transfer, error: impl std::fmt::Display) {
        self.done = Some(Done::Failed(t, error.to_string()));
    }

    /// The entry's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Completes when the connection is closed from outside.
    pub async fn closed(&self) {
        self.close.cancelled().await;
    }

    /// Completes when the daemon hands its connections over (pending
    /// forever for one that was offered and not taken).
    pub async fn handover_requested(&self) {
        if self.stays {
            std::future::pending::<()>().await;
        }
        self.table.handover.cancelled().await;
    }

    /// Waits for a turn to pause and be offered ([`MOVING_AT_ONCE`]); the
    /// relay holds it until its offer was answered.
    pub async fn handover_turn(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        Arc::clone(&self.table.moving).acquire_owned().await.ok()
    }

    /// Offers the connection to the next daemon, with its sockets, after
    /// its relay paused at `point` having moved `t` here.
    /// `true`: the next daemon owns it now, the entry ends as handed over
    /// (the caller closes its copies without a reset). `false`: it stays
    /// here, is not offered again, and the caller relays on.
    pub async fn hand_off(&mut self, t: Transfer, what: Offered<'_>) -> bool {
        self.stays = true;
        let Some(to) = self.table.successor.get() else { return false };
        let Some(info) = lock(&self.table.open).get(&self.id).map(|e| e.info.clone()) else {
            return false;
        };
        // The sockets stay open here until the answer (they are borrowed
        // for the whole offer): the kernel passes the same sockets, no copy
        // of a descriptor is made.
        if to.offer(&info, what).await {
            Stats::inc(&self.table.stats.handed_over);
            self.done = Some(Done::HandedOver(t));
            true
        } else {
            false
        }
    }

    /// Not to be offered to the next daemon (it could not pause cleanly):
    /// it relays on here through the drain.
    pub fn keep_here(&mut self) {
        self.stays = true;
    }

    /// `io`, failing once the connection is closed from outside.
    pub fn cancellable<T>(&self, io: T) -> Cancellable<T> {
        Cancellable { inner: io, closed: Box::pin(self.close.clone().cancelled_owned()) }
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let entry = {
            let mut open = lock(&self.table.open);
            let e = open.remove(&self.id);
            self.table.len.send_replace(open.len());
            e
        };
        let Some(e) = entry else { return };
        let (t, outcome, error) = match self.done.take() {
            Some(Done::Finished(t)) => (t, "ok", None),
            Some(Done::Failed(t, err)) => (t, "error", Some(err)),
            Some(Done::HandedOver(t)) => (t, "handed over", None),
            // The task was cancelled mid-connection: its pod was removed, or
            // the daemon's drain deadline passed.
            None => (Transfer::default(), "cancelled", None),
        };
        Stats::add(&self.table.stats.bytes_from_pods, t.from_pod);
        Stats::add(&self.table.stats.bytes_to_pods, t.to_pod);
        if let Some(c) = self.closing.take() {
            if outcome == "handed over" {
                c.handed_over(t);
            } else {
                c.closed(t);
            }
        }
        let i = &e.info;
        info!(
            direction = i.direction.as_str(),
            route = i.route.as_str(),
            pod = %i.pod,
            src = %i.src,
            dst = %i.dst,
            peer_pod = %i.peer_pod.as_deref().unwrap_or("-"),
            src_identity = %i.src_identity.as_deref().unwrap_or("-"),
            dst_identity = %i.dst_identity.as_deref().unwrap_or("-"),
            transport = %i.transport.map_or("-", Transport::as_str),
            bytes_from_pod = t.from_pod,
            bytes_to_pod = t.to_pod,
            duration_ms = e.since.elapsed().as_millis(),
            outcome = %outcome,
            error = %error.as_deref().unwrap_or("-"),
            "connection complete"
        );
    }
}

/// An entry for tests.
#[cfg(test)]
pub(crate) fn example_info() -> ConnInfo {
    ConnInfo {
        direction: Direction::Inbound,
        route: Route::Plaintext,
        pod: "ns/p".into(),
        src: "10.0.0.1:4000".parse().unwrap(),
        dst: "10.0.0.2:80".parse().unwrap(),
        peer_pod: None,
        src_identity: None,
        dst_identity: None,
        transport: None,
        dst_service: None,
    }
}

#[cfg(test)]
mod tests {
    use super::example_info as info;
    use super::*;

    #[test]
    fn a_guard_is_the_entry_and_its_drop_counts() {
        let stats = Arc::new(Stats::default());
        let t = ConnTable::new(Arc::clone(&stats));
        let mut a = t.open(info());
        let b = t.open(info());
        assert_eq!(t.len(), 2);
        assert_eq!(t.list()[0].id, a.id());
        a.finished(Transfer::pod_second(10, 3));
        drop(a);
        assert_eq!(t.len(), 1);
        let s = stats.snapshot();
        assert_eq!((s.bytes_to_pods, s.bytes_from_pods), (10, 3), "pod is b: a->b reached it");
        // Dropped without an outcome (its task was cancelled): still removed.
        drop(b);
        assert!(t.is_empty());
    }

    #[tokio::test]
    async fn empty_completes_when_the_last_guard_goes() {
        let t = ConnTable::new(Arc::new(Stats::default()));
        let g = t.open(info());
        let waiter = tokio::spawn({
            let t = t.clone();
            async move { t.empty().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        drop(g);
        tokio::time::timeout(std::time::Duration::from_secs(2), waiter)
            .await
            .expect("empty() completes")
            .unwrap();
    }

    #[test]
    fn transfer_sides() {
        assert_eq!(Transfer::pod_first(5, 7), Transfer { from_pod: 5, to_pod: 7 });
        assert_eq!(Transfer::pod_second(5, 7), Transfer { from_pod: 7, to_pod: 5 });
    }
}
