//! The connection handover between two daemons of one node: when a new
//! daemon runs beside the old one (a rollout surge, a restart with the new
//! binary started first) and the old one is told to go, the old daemon
//! passes every connection whose whole state is in the kernel (local
//! deliveries, passthrough, plaintext accepted by a permissive pod, node
//! probes) to the new one, sockets and all, instead of draining it.
//!
//! - A daemon, once ready, listens on the node's handover socket
//!   (`handover_socket`, a `SOCK_SEQPACKET` Unix socket; binding replaces
//!   the name an older daemon bound). Each connection to it starts with a
//!   [`Hello`]: protocol version, node name, and the daemon's instance id
//!   (so a daemon that reaches its own listener knows it has no successor).
//! - The old daemon, at SIGTERM, connects. No listener, its own, another
//!   node's or another version: no successor, the drain goes on as before.
//!   Otherwise the connection table's relays pause (they stop reading,
//!   write out and flush what they hold: [`tlsmesh_tunnel::splice_pausable`])
//!   and each is offered: one message with the entry's description, which
//!   directions are already over, and its two sockets (`SCM_RIGHTS`).
//! - The new daemon takes an offer only for a pod it serves: it makes the
//!   sockets its own, adds the entry to its table, answers, and only then
//!   relays. The old daemon keeps its copies of the sockets until the
//!   answer: accepted, it closes them (the kernel socket lives on in the new
//!   daemon) and its entry ends as "handed over"; refused, or no answer
//!   because the new daemon went away, it relays on itself. A byte is never
//!   relayed by both, and nothing is lost in between: nothing is buffered
//!   in user space at a pause.
//!
//! Tunnel streams cannot be passed that way (their TLS, HTTP/2 and QUIC
//! state is in user space). A resumable one (both daemons speak
//! docs/PROTOCOL.md §6) first pauses with its peer (`resumable`) and is
//! then offered with its app socket and what resumes it; the new daemon
//! resumes it over a new tunnel connection. Other tunnel streams drain as
//! before.

use std::{
    collections::HashMap,
    future::Future,
    io::{self, IoSlice, IoSliceMut},
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
};

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};
use tlsmesh_tunnel::SplicePoint;
use tokio::{io::unix::AsyncFd, sync::oneshot};
use tracing::{info, warn};

use crate::{
    conns::{ConnInfo, Offered, PausedStream, Taker},
    proxy::Proxy,
    scope::Scope,
    state::NodeState,
    sync::lock,
};

/// The protocol version; a daemon speaking another one is not a successor.
pub const VERSION: u32 = 1;

/// Largest message (an offer is well under 2 KiB).
const MAX_MESSAGE: usize = 64 * 1024;

/// Errors of the handover socket.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// Binding or listening failed.
    #[error("cannot listen for the connection handover on {path}: {source} (is handover_socket's directory there and writable?)")]
    Listen { path: PathBuf, source: io::Error },
    /// A message could not be read or written.
    #[error("handover socket: {0}")]
    Io(#[from] io::Error),
    /// A message was not what the protocol says.
    #[error("handover protocol: {0}")]
    Protocol(String),
}

/// What a daemon says first on every handover connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// [`VERSION`].
    pub version: u32,
    /// The node it serves.
    pub node: String,
    /// Random per daemon process.
    pub instance: u64,
}

/// One offered connection as sent (its two sockets travel with it).
#[derive(Debug, Serialize)]
struct OfferRef<'a> {
    id: u64,
    info: &'a ConnInfo,
    a_to_b_done: bool,
    b_to_a_done: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream: Option<&'a PausedStream>,
}

/// One offered connection as received.
#[derive(Debug, Deserialize)]
struct OfferMsg {
    id: u64,
    info: ConnInfo,
    #[serde(default)]
    a_to_b_done: bool,
    #[serde(default)]
    b_to_a_done: bool,
    /// A paused resumable tunnel stream (one socket: its app's).
    #[serde(default)]
    stream: Option<PausedStream>,
}

/// The answer to an offer.
#[derive(Debug, Serialize, Deserialize)]
struct ReplyMsg {
    id: u64,
    accepted: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Whether the daemon that said `hello` takes over from `me`: same
/// version and node, another process. Pure.
pub fn is_successor(me: &Hello, hello: &Hello) -> Result<(), String> {
    if hello.version != me.version {
        return Err(format!(
            "it speaks handover version {}, this daemon {}",
            hello.version, me.version
        ));
    }
    if hello.node != me.node {
        return Err(format!(
            "it serves node {:?}, this daemon {:?} (each node needs its own handover_socket)",
            hello.node, me.node
        ));
    }
    if hello.instance == me.instance {
        return Err("it is this daemon itself (no newer daemon is running)".into());
    }
    Ok(())
}

/// `fd` in tokio's reactor.
fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the `OwnedFd` owns an open descriptor; it is moved into the
    // `AsyncFd`, which closes it only when dropped, and its `as_raw_fd`
    // always returns that same descriptor.
    unsafe { AsyncFd::register(fd) }.map_err(io::Error::from)
}

/// A connected `SOCK_SEQPACKET` Unix socket: one message per call, with
/// file descriptors.
struct Packets {
    fd: AsyncFd<OwnedFd>,
}

impl Packets {
    fn new(s: socket2::Socket) -> io::Result<Self> {
        s.set_nonblocking(true)?;
        Ok(Self { fd: register(OwnedFd::from(s))? })
    }

    async fn send(&self, data: &[u8], fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
        loop {
            let mut guard = self.fd.writable().await?;
            let sent = guard.try_io(|fd| {
                let iov = [IoSlice::new(data)];
                let cmsg: Vec<ControlMessage<'_>> =
                    if raw.is_empty() { Vec::new() } else { vec![ControlMessage::ScmRights(&raw)] };
                sendmsg::<()>(fd.as_raw_fd(), &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(io::Error::from)
            });
            match sent {
                Ok(r) => return r.map(drop),
                Err(_would_block) => {}
            }
        }
    }

    /// The next message and its descriptors; `None` once the peer closed.
    async fn recv(&self) -> io::Result<Option<(Vec<u8>, Vec<OwnedFd>)>> {
        loop {
            let mut guard = self.fd.readable().await?;
            let got = guard.try_io(|fd| {
                let mut buf = vec![0u8; MAX_MESSAGE];
                let mut space = nix::cmsg_space!([RawFd; 4]);
                let (n, fds) = {
                    let mut iov = [IoSliceMut::new(&mut buf)];
                    let msg = recvmsg::<()>(
                        fd.as_raw_fd(),
                        &mut iov,
                        Some(&mut space),
                        MsgFlags::MSG_CMSG_CLOEXEC,
                    )
                    .map_err(io::Error::from)?;
                    let mut fds = Vec::new();
                    for c in msg.cmsgs().map_err(io::Error::from)? {
                        if let ControlMessageOwned::ScmRights(v) = c {
                            // SAFETY: SCM_RIGHTS installed these descriptors
                            // in this process for this message; nothing else
                            // knows them, so each is owned exactly once here.
                            fds.extend(v.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }));
                        }
                    }
                    if msg.flags.intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC) {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "a handover message was truncated",
                        ));
                    }
                    (msg.bytes, fds)
                };
                buf.truncate(n);
                Ok((buf, fds))
            });
            match got {
                Ok(Ok((buf, fds))) if buf.is_empty() && fds.is_empty() => return Ok(None),
                Ok(r) => return r.map(Some),
                Err(_would_block) => {}
            }
        }
    }

    async fn send_json<T: Serialize>(&self, v: &T, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
        let data = serde_json::to_vec(v).map_err(io::Error::other)?;
        self.send(&data, fds).await
    }
}

fn parse<T: for<'de> Deserialize<'de>>(data: &[u8]) -> Result<T, HandoverError> {
    serde_json::from_slice(data).map_err(|e| HandoverError::Protocol(e.to_string()))
}

/// The listening side: a ready daemon takes connections over here.
pub struct Listener {
    fd: AsyncFd<OwnedFd>,
    path: PathBuf,
}

impl Listener {
    /// Binds `path` (replacing a name an older daemon bound: from now on
    /// the handover comes here).
    pub fn bind(path: &Path) -> Result<Self, HandoverError> {
        let fail = |source| HandoverError::Listen { path: path.to_owned(), source };
        let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)
            .map_err(fail)?;
        match std::fs::remove_file(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(fail(e)),
        }
        let addr = socket2::SockAddr::unix(path).map_err(fail)?;
        s.bind(&addr).map_err(fail)?;
        s.listen(16).map_err(fail)?;
        s.set_nonblocking(true).map_err(fail)?;
        Ok(Self { fd: register(OwnedFd::from(s)).map_err(fail)?, path: path.to_owned() })
    }

    async fn accept(&self) -> io::Result<socket2::Socket> {
        loop {
            let mut guard = self.fd.readable().await?;
            let listener = socket2::SockRef::from(guard.get_inner());
            match guard.try_io(|_| listener.accept().map(|(s, _)| s)) {
                Ok(r) => return r,
                Err(_would_block) => {}
            }
        }
    }

    /// Serves the handover until the scope ends: each connecting daemon in
    /// turn (one at a time; there is one predecessor).
    pub async fn serve(self, me: Hello, state: Arc<NodeState>, proxy: Proxy) {
        info!(path = %self.path.display(), "listening for a connection handover");
        loop {
            let s = match self.accept().await {
                Ok(s) => s,
                Err(e) => {
                    warn!(error = %e, "handover socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            match take_over(s, &me, &state, &proxy).await {
                Ok((0, 0)) => {}
                Ok((taken, refused)) => {
                    info!(taken, refused, "connections taken over from the previous daemon");
                }
                Err(e) => warn!(error = %e, "connection handover broke off"),
            }
        }
    }
}

/// One predecessor's offers: (taken, refused).
async fn take_over(
    s: socket2::Socket,
    me: &Hello,
    state: &NodeState,
    proxy: &Proxy,
) -> Result<(usize, usize), HandoverError> {
    let p = Packets::new(s)?;
    p.send_json(me, &[]).await?;
    let (mut taken, mut refused) = (0, 0);
    while let Some((data, fds)) = p.recv().await? {
        crate::faults::hold_if_fires(crate::faults::HANDOVER_TAKE).await;
        let offer: OfferMsg = parse(&data)?;
        let id = offer.id;
        match adopt(offer, fds, state, proxy) {
            Ok(adopted) => {
                // Answer first, relay after: until the old daemon reads
                // this it relays nothing, and it never relays again.
                p.send_json(&ReplyMsg { id, accepted: true, reason: None }, &[]).await?;
                adopted.start();
                taken += 1;
            }
            Err(reason) => {
                warn!(%reason, "a handed-over connection was refused; the previous daemon keeps it");
                p.send_json(&ReplyMsg { id, accepted: false, reason: Some(reason) }, &[]).await?;
                refused += 1;
            }
        }
    }
    Ok((taken, refused))
}

fn adopt(
    offer: OfferMsg,
    fds: Vec<OwnedFd>,
    state: &NodeState,
    proxy: &Proxy,
) -> Result<crate::proxy::Adopted, String> {
    let Some(pod) = state.pod(&offer.info.pod) else {
        return Err(format!("pod {} is not served by this daemon (yet)", offer.info.pod));
    };
    if pod.scope.is_ended() {
        return Err(format!("pod {} is being removed", offer.info.pod));
    }
    if let Some(stream) = offer.stream {
        let Ok::<[OwnedFd; 1], _>([app]) = fds.try_into() else {
            return Err("a tunnel stream's offer came without its one socket".into());
        };
        return proxy
            .adopt_stream(&pod, offer.info, app, stream)
            .map_err(|e| format!("taking the stream: {e}"));
    }
    let Ok::<[OwnedFd; 2], _>([a, b]) = fds.try_into() else {
        return Err("an offer came without its two sockets".into());
    };
    let point = SplicePoint {
        a_to_b: 0,
        b_to_a: 0,
        a_to_b_done: offer.a_to_b_done,
        b_to_a_done: offer.b_to_a_done,
    };
    proxy.adopt(&pod, offer.info, [a, b], point).map_err(|e| format!("taking the sockets: {e}"))
}

/// The handing-over side: a connection to the successor. Each relay sends
/// its own offer (the sockets are borrowed from the relay, which keeps them
/// open until the answer: no descriptor is copied, so a daemon at its
/// open-file limit can still hand over); [`Successor::read_answers`] hands
/// each answer to the relay waiting for it.
pub struct Successor {
    packets: Packets,
    hello: Hello,
    /// One offer on the socket at a time.
    sending: tokio::sync::Mutex<()>,
    next: std::sync::atomic::AtomicU64,
    /// Offers sent and not answered yet; `None` once the successor is gone
    /// (later offers are refused at once).
    waiting: std::sync::Mutex<Option<HashMap<u64, oneshot::Sender<bool>>>>,
    counts: std::sync::Mutex<(usize, usize)>,
}

impl Successor {
    /// The daemon that took over `path`, when there is one that may take
    /// this daemon's connections (see [`is_successor`]); `Err` says why not.
    pub async fn find(path: &Path, me: &Hello) -> Result<Self, String> {
        let s = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None)
            .map_err(|e| e.to_string())?;
        let addr = socket2::SockAddr::unix(path).map_err(|e| e.to_string())?;
        s.connect(&addr).map_err(|e| format!("no daemon listens on {}: {e}", path.display()))?;
        let packets = Packets::new(s).map_err(|e| e.to_string())?;
        let hello = tokio::time::timeout(std::time::Duration::from_secs(2), packets.recv())
            .await
            .map_err(|_| "it did not say hello within 2 s".to_owned())?
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "it closed at once".to_owned())?;
        let hello: Hello = parse(&hello.0).map_err(|e| e.to_string())?;
        is_successor(me, &hello)?;
        Ok(Self {
            packets,
            hello,
            sending: tokio::sync::Mutex::new(()),
            next: std::sync::atomic::AtomicU64::new(1),
            waiting: std::sync::Mutex::new(Some(HashMap::new())),
            counts: std::sync::Mutex::new((0, 0)),
        })
    }

    /// The successor's hello.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Reads the successor's answers and tells each waiting relay, until
    /// the successor closes the socket or breaks the protocol; then every
    /// unanswered offer is refused (its relay goes on here).
    pub async fn read_answers(self: Arc<Self>) {
        let why = loop {
            let reply = match self.packets.recv().await {
                Ok(Some((data, _))) => parse::<ReplyMsg>(&data),
                Ok(None) => break "the new daemon closed the handover".to_owned(),
                Err(e) => break e.to_string(),
            };
            let r = match reply {
                Ok(r) => r,
                Err(e) => break e.to_string(),
            };
            if let Some(why) = &r.reason {
                info!(reason = %why, "the new daemon did not take a connection; relaying it on");
            }
            let tx = lock(&self.waiting).as_mut().and_then(|w| w.remove(&r.id));
            if let Some(tx) = tx {
                let mut c = lock(&self.counts);
                if r.accepted {
                    c.0 += 1;
                } else {
                    c.1 += 1;
                }
                let _ = tx.send(r.accepted);
            }
        };
        // Refuse what is left: dropping the senders tells each relay.
        let left = lock(&self.waiting).take().map_or(0, |w| w.len());
        let (handed, kept) = *lock(&self.counts);
        if left > 0 {
            warn!(error = %why, unanswered = left, "connection handover broke off; relaying the rest here");
        }
        info!(handed_over = handed, kept = kept + left, "connection handover ended");
    }
}

impl Taker for Successor {
    fn offer<'a>(
        &'a self,
        info: &'a ConnInfo,
        what: Offered<'a>,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + 'a>> {
        Box::pin(async move {
            crate::faults::hold_if_fires(crate::faults::HANDOVER_OFFER).await;
            let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            match lock(&self.waiting).as_mut() {
                Some(w) => w.insert(id, tx),
                None => return false,
            };
            let (msg, fds) = match what {
                Offered::Relay { point, sockets } => (
                    OfferRef {
                        id,
                        info,
                        a_to_b_done: point.a_to_b_done,
                        b_to_a_done: point.b_to_a_done,
                        stream: None,
                    },
                    sockets.to_vec(),
                ),
                Offered::Stream { stream, app } => (
                    OfferRef {
                        id,
                        info,
                        a_to_b_done: false,
                        b_to_a_done: false,
                        stream: Some(stream),
                    },
                    vec![app],
                ),
            };
            let sent = {
                let _one = self.sending.lock().await;
                self.packets.send_json(&msg, &fds).await
            };
            if let Err(e) = sent {
                warn!(error = %e, "cannot offer a connection to the new daemon; keeping it");
                if let Some(w) = lock(&self.waiting).as_mut() {
                    w.remove(&id);
                }
                return false;
            }
            rx.await.unwrap_or(false)
        })
    }
}

/// Starts listening on `path` in `scope` (the daemon is ready); a failure
/// is logged and the daemon goes on without (its successor will drain).
pub fn listen(scope: &Scope, path: &Path, me: Hello, state: Arc<NodeState>, proxy: Proxy) {
    match Listener::bind(path) {
        Ok(l) => scope.spawn(l.serve(me, state, proxy)),
        Err(e) => warn!(error = %e, "connection handover off"),
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    fn hello(node: &str, instance: u64) -> Hello {
        Hello { version: VERSION, node: node.into(), instance }
    }

    #[test]
    fn only_another_daemon_of_the_same_node_and_version_is_a_successor() {
        let me = hello("n0", 1);
        assert!(is_successor(&me, &hello("n0", 2)).is_ok());
        let own = is_successor(&me, &hello("n0", 1)).unwrap_err();
        assert!(own.contains("itself"), "{own}");
        let other = is_successor(&me, &hello("n1", 2)).unwrap_err();
        assert!(other.contains("n1") && other.contains("handover_socket"), "{other}");
        let v = is_successor(&me, &Hello { version: VERSION + 1, ..hello("n0", 2) }).unwrap_err();
        assert!(v.contains("version"), "{v}");
    }

    /// Messages and descriptors cross a real socket pair: a descriptor
    /// received is a working copy of the one sent.
    #[tokio::test]
    async fn messages_carry_descriptors() {
        let (old, new) =
            socket2::Socket::pair(socket2::Domain::UNIX, socket2::Type::SEQPACKET, None).unwrap();
        let (old, new) = (Packets::new(old).unwrap(), Packets::new(new).unwrap());
        let (mut inner, passed) = std::os::unix::net::UnixStream::pair().unwrap();
        old.send(b"one", &[passed.as_fd()]).await.unwrap();
        old.send(b"two", &[]).await.unwrap();
        drop(passed);
        let (msg, mut fds) = new.recv().await.unwrap().unwrap();
        assert_eq!(msg, b"one");
        assert_eq!(fds.len(), 1);
        let mut w2 = std::os::unix::net::UnixStream::from(fds.remove(0));
        std::io::Write::write_all(&mut w2, b"through the copy").unwrap();
        drop(w2);
        let mut got = String::new();
        std::io::Read::read_to_string(&mut inner, &mut got).unwrap();
        assert_eq!(got, "through the copy");
        let (msg, fds) = new.recv().await.unwrap().unwrap();
        assert_eq!((msg.as_slice(), fds.len()), (b"two".as_slice(), 0));
        drop(old);
        assert!(new.recv().await.unwrap().is_none(), "EOF once the peer closed");
    }
}
