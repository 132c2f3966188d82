//! Resumable tunnel streams (docs/PROTOCOL.md §6): the daemon's driver of
//! the sans-IO state machine [`tlsmesh_tunnel::resume`].
//!
//! A stream between two tlsmesh daemons that both speak the extension is
//! relayed here instead of by a plain splice. When this daemon is replaced
//! ([`ConnGuard::handover_requested`]) the relay stops reading its app
//! socket, flushes, sends QUIESCE to the peer and reads the old stream up to
//! the peer's count; paused, it offers the app socket and the stream's
//! [`PausedStream`] to the next daemon, which resumes the stream over a new
//! tunnel connection. When the peer moves, its QUIESCE arrives through the
//! tunnel server ([`Registry::quiesce`]); this side pauses the same way,
//! answers once it has read everything the peer sent, and waits for the
//! resume: the client side sends RESUME (retrying until the peer's new
//! daemon holds the stream), the server side waits for it
//! ([`Registry::resume`]). A stream not resumed within [`PAUSE_BOUND`] is
//! closed (reset), as every stream is without the extension.
//!
//! The moving side drops the old stream only once it has read all the peer
//! sent; the staying side keeps it until the resume, so neither side's
//! buffered bytes are discarded by a reset.

use std::{
    collections::{HashMap, VecDeque},
    future::Future,
    os::fd::AsFd,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use tlsmesh_tunnel::{
    resume::{Action, Phase, Resume, ResumeRefused},
    BoxIo, Refusal, ResumeExt, SpliceEnd, SplicePoint,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::oneshot,
};
use tracing::{debug, info, warn};

use crate::{
    conns::{ConnGuard, Offered, PausedStream, StreamRole, Transfer},
    sync::lock,
};

/// Longest a stream may be quiescing or paused before it is closed.
pub const PAUSE_BOUND: Duration = Duration::from_secs(10);

/// Longest one RESUME attempt may take before it is tried again (a pooled
/// connection to a daemon that is gone answers nothing).
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);

/// Longest the peer may take to answer a QUIESCE. A peer that does not
/// answer (stopped, overloaded, gone) keeps the stream where it is: it
/// relays on with this daemon, as every stream does without the extension.
const QUIESCE_TIMEOUT: Duration = Duration::from_secs(4);

/// A fresh stream token: 32 bytes from the OS CSPRNG, base64url.
pub fn new_token() -> String {
    use base64::Engine as _;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Sends this side's requests (QUIESCE, RESUME) to the peer of a stream:
/// the tunnel client, with the stream's local identity's certificate,
/// checking the peer's.
pub trait Dialer: Send + Sync {
    /// Opens a request carrying `ext` to `stream.peer`; `Ok` with the 200's
    /// stream.
    fn request<'a>(
        &'a self,
        stream: &'a PausedStream,
        ext: ResumeExt,
    ) -> Pin<Box<dyn Future<Output = Result<tlsmesh_tunnel::Stream, RequestError>> + Send + 'a>>;
}

/// Why a request to the peer failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The peer answered with a status (404: no such paused stream there).
    #[error("the peer answered {status}: {reason}")]
    Refused {
        /// The status.
        status: u16,
        /// Its reason.
        reason: String,
    },
    /// No answer (unreachable, handshake failed, ...).
    #[error("{0}")]
    Failed(String),
}

/// What the tunnel server passes to a stream's relay.
enum Control {
    Quiesce { sent: u64, answer: oneshot::Sender<u64> },
    Resume { sent: u64, received: u64, answer: oneshot::Sender<Result<Attach, ResumeRefused>> },
}

/// Where the tunnel stream of an accepted RESUME goes.
pub type Attach = oneshot::Sender<BoxIo>;

/// A stream's control messages, from the tunnel server to its relay. Not
/// a channel: messages are rare (a few per upgrade) and every open stream
/// holds one, so it allocates nothing until a message comes.
#[derive(Default)]
struct Mailbox {
    queue: Mutex<VecDeque<Control>>,
    notify: tokio::sync::Notify,
}

impl Mailbox {
    fn send(&self, m: Control) {
        lock(&self.queue).push_back(m);
        self.notify.notify_one();
    }

    fn try_recv(&self) -> Option<Control> {
        lock(&self.queue).pop_front()
    }

    /// The next message (cancel-safe: a message is taken only when
    /// returned).
    async fn recv(&self) -> Option<Control> {
        loop {
            if let Some(m) = self.try_recv() {
                return Some(m);
            }
            self.notify.notified().await;
        }
    }
}

struct Entry {
    /// A keyed hash of the stream's pod and peer identity: who may reach
    /// it (no copies of the strings in every entry).
    who: u64,
    ctl: Arc<Mailbox>,
}

/// A token as the registry's key (its 32 bytes; `None` for a malformed one).
fn key(token: &str) -> Option<[u8; 32]> {
    use base64::Engine as _;
    let mut k = [0u8; 32];
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode_slice(token, &mut k).ok()?;
    (n == 32).then_some(k)
}

/// At most this many of a going daemon's streams are moving (quiescing,
/// offered, waiting for the new daemon's resume) at once; the others relay
/// on until their turn. A stream stalls only while it moves itself, not
/// for the whole handover of every stream before it. The same bound as the
/// connection table's relays of two sockets, in a pool of its own.
const MOVING_AT_ONCE: usize = crate::conns::MOVING_AT_ONCE;

/// The resumable streams of this daemon, by token (a tunnel server looks a
/// QUIESCE or RESUME up here).
pub struct Registry {
    streams: Mutex<HashMap<[u8; 32], Entry>>,
    /// Keys `Entry::who`.
    hasher: std::hash::RandomState,
    /// Turns to move at a handover ([`MOVING_AT_ONCE`]).
    moving: Arc<tokio::sync::Semaphore>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            streams: Mutex::default(),
            hasher: std::hash::RandomState::default(),
            moving: Arc::new(tokio::sync::Semaphore::new(MOVING_AT_ONCE)),
        }
    }
}

/// A turn to move (see [`MOVING_AT_ONCE`]), held until the stream was
/// handed over or stays.
type Turn = Option<tokio::sync::OwnedSemaphorePermit>;

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("streams", &lock(&self.streams).len())
            .finish_non_exhaustive()
    }
}

/// A stream's place in the registry; dropping it removes the stream.
struct Registration {
    registry: Arc<Registry>,
    key: Option<[u8; 32]>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(k) = &self.key {
            lock(&self.registry.streams).remove(k);
        }
    }
}

/// The answer when a token is unknown or the request is not the stream's
/// peer's: the same either way, so a guess learns nothing.
fn unknown() -> Refusal {
    Refusal::not_found("no such resumable stream here")
}

impl Registry {
    /// Streams registered.
    pub fn len(&self) -> usize {
        lock(&self.streams).len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn who(&self, pod: &str, peer: &str) -> u64 {
        use std::hash::BuildHasher as _;
        self.hasher.hash_one((pod, peer))
    }

    fn register(self: &Arc<Self>, pod: &str, s: &PausedStream) -> (Registration, Arc<Mailbox>) {
        let rx = Arc::new(Mailbox::default());
        let key = key(&s.token);
        if let Some(k) = key {
            let who = self.who(pod, &s.peer_identity);
            lock(&self.streams).insert(k, Entry { who, ctl: Arc::clone(&rx) });
        }
        (Registration { registry: Arc::clone(self), key }, rx)
    }

    fn control(&self, token: &str, pod: &str, peer: &str) -> Result<Arc<Mailbox>, Refusal> {
        let k = key(token).ok_or_else(unknown)?;
        let who = self.who(pod, peer);
        let streams = lock(&self.streams);
        let e = streams.get(&k).ok_or_else(unknown)?;
        if e.who != who {
            return Err(unknown());
        }
        Ok(Arc::clone(&e.ctl))
    }

    /// The peer `peer` (its verified SPIFFE id) quiesces stream `token` of
    /// `pod` after sending `sent`; answers with this side's count once this
    /// side is paused (it has read all `sent`).
    pub async fn quiesce(
        &self,
        token: &str,
        pod: &str,
        peer: &str,
        sent: u64,
    ) -> Result<u64, Refusal> {
        let ctl = self.control(token, pod, peer)?;
        let (answer, rx) = oneshot::channel();
        ctl.send(Control::Quiesce { sent, answer });
        rx.await.map_err(|_| Refusal::not_found("the stream closed while quiescing"))
    }

    /// The peer `peer` resumes stream `token` of `pod` with its counts; on
    /// `Ok` the new tunnel stream goes to the returned sender.
    pub async fn resume(
        &self,
        token: &str,
        pod: &str,
        peer: &str,
        sent: u64,
        received: u64,
    ) -> Result<Attach, Refusal> {
        let ctl = self.control(token, pod, peer)?;
        let (answer, rx) = oneshot::channel();
        ctl.send(Control::Resume { sent, received, answer });
        match rx.await {
            Ok(Ok(attach)) => Ok(attach),
            Ok(Err(ResumeRefused::CountMismatch)) => {
                Err(Refusal::conflict(ResumeRefused::CountMismatch.to_string()))
            }
            Ok(Err(e)) => Err(Refusal::not_found(e.to_string())),
            Err(_) => Err(Refusal::not_found("the stream closed")),
        }
    }
}

/// One resumable stream's relay: the app socket, the stream's entry and
/// how to reach the peer.
pub struct Relay {
    /// The connection-table entry.
    pub guard: ConnGuard,
    /// The pod-side socket.
    pub app: TcpStream,
    /// The pod's key (QUIESCE and RESUME must arrive at its tunnel server).
    pub pod: String,
    /// The stream (its counts are where it is now).
    pub stream: PausedStream,
    /// This daemon's streams.
    pub registry: Arc<Registry>,
    /// This daemon's tunnel client.
    pub dialer: Arc<dyn Dialer>,
}

/// How a pause ended.
enum Paused {
    /// Relaying again over this stream.
    Resumed(BoxIo),
    /// Handed to the next daemon.
    HandedOver,
}

impl Relay {
    /// Relays `tunnel` (or, with `None`, a stream taken over paused) until
    /// the stream ends, is closed, or moves to the next daemon.
    ///
    /// A plain `fn` returning the relay's future, not an `async fn`: an
    /// `async fn` keeps its arguments twice in the future (the captured
    /// values and the locals they are moved to), and every open stream's
    /// task holds this future.
    #[expect(
        clippy::manual_async_fn,
        reason = "an `async fn` would hold `self` twice in every stream's task"
    )]
    pub fn run(mut self, mut tunnel: Option<BoxIo>) -> impl Future<Output = ()> {
        async move {
            let (_registration, ctl) = self.registry.register(&self.pod, &self.stream);
            let ctl = &*ctl;
            let (sent, received) = (self.stream.sent, self.stream.received);
            let mut r = match tunnel {
                Some(_) => Resume::open_at(sent, received),
                None => Resume::paused_at(sent, received),
            };
            // What this daemon moved is counted from here: a fresh stream from
            // 0 (its early data was sent by this daemon too), a stream taken
            // over from where the previous daemon paused it.
            let start = if tunnel.is_some() { (0, 0) } else { (sent, received) };
            // The app side is read again after a pause (an EOF it gave is
            // given again); the tunnel side only until its end reached the app.
            let mut point = SplicePoint {
                a_to_b: sent,
                b_to_a: received,
                a_to_b_done: false,
                b_to_a_done: self.stream.app_write_done,
            };
            let mut turn: Turn = None;
            // What the app wrote while this side drained a peer's QUIESCE
            // (see `drain`): not sent on the old stream, it goes first on
            // the stream this side relays on.
            let mut held: Vec<u8> = Vec::new();
            loop {
                let Some(mut t) = tunnel.take() else {
                    // Paused with no stream: wait for (or send) the resume.
                    // Boxed, and built in a statement of its own: an idle
                    // stream's task does not hold the pause's state.
                    let pausing = Box::pin(self.paused(&mut r, ctl, &point, start, None, false));
                    match pausing.await {
                        Ok(Paused::Resumed(t)) => {
                            tunnel = Some(t);
                            point.a_to_b_done = false;
                            continue;
                        }
                        Ok(Paused::HandedOver) => return,
                        Err(why) => return self.close(&point, start, &why),
                    }
                };
                if !held.is_empty() {
                    if let Err(e) = send_held(&mut t, &mut held, &mut r, &mut point).await {
                        return self.close(&point, start, &e);
                    }
                }
                let (end, msg) = self.relay(&mut t, point, ctl, &mut turn).await;
                let at = match end {
                    None => return self.close(&point, start, "closed by the daemon (policy)"),
                    Some(SpliceEnd::Finished(out)) => {
                        let t = moved(out.a_to_b, out.b_to_a, start);
                        match out.error {
                            Some(e) => self.guard.failed(t, e),
                            None => self.guard.finished(t),
                        }
                        return;
                    }
                    Some(SpliceEnd::Paused(at)) => at,
                };
                // What the splice moved since the last pause, for the machine.
                let wrote = at.a_to_b - point.a_to_b;
                r.app_read(wrote);
                let _ = r.tunnel_wrote(wrote);
                let _ = r.tunnel_received(at.b_to_a - point.b_to_a);
                point = at;
                let quiescing = match msg {
                    Some(Control::Resume { answer, .. }) => {
                        let _ = answer.send(Err(ResumeRefused::NotPaused));
                        tunnel = Some(t);
                        continue;
                    }
                    Some(Control::Quiesce { sent, answer }) => {
                        Box::pin(self.peer_quiesced(
                            &mut r, &mut t, &mut point, sent, answer, ctl, &mut held,
                        )) as Pin<Box<dyn Future<Output = _> + Send + '_>>
                    }
                    None => Box::pin(self.quiesce(&mut r, &mut t, &mut point, ctl)),
                };
                let quiesced = quiescing.await;
                match quiesced {
                    Ok(()) => {}
                    Err(Quiesce::NotPaused(why)) => {
                        // The peer never paused (it does not know the stream
                        // any more, or did not answer): relay on here.
                        info!(reason = %why, "tunnel stream could not be quiesced; it stays with this daemon");
                        self.guard.keep_here();
                        (turn, r) = (None, Resume::open_at(r.sent(), r.received()));
                        tunnel = Some(t);
                        continue;
                    }
                    Err(Quiesce::Withdrawn) => {
                        info!(
                            "the peer withdrew its QUIESCE; tunnel stream relays on where it was"
                        );
                        (turn, r) = (None, Resume::open_at(r.sent(), r.received()));
                        tunnel = Some(t);
                        continue;
                    }
                    Err(Quiesce::Broken(why)) => return self.close(&point, start, &why),
                }
                let holding = !held.is_empty();
                let pausing = Box::pin(self.paused(&mut r, ctl, &point, start, Some(t), holding));
                match pausing.await {
                    Ok(Paused::Resumed(t)) => {
                        // A new stream: an app that had half-closed gives its
                        // EOF again, and the new stream gets its FIN.
                        turn = None;
                        tunnel = Some(t);
                        point.a_to_b_done = false;
                    }
                    Ok(Paused::HandedOver) => return,
                    Err(why) => return self.close(&point, start, &why),
                }
            }
        }
    }

    /// Relays until the stream ends (`Finished`), the daemon closes it
    /// (`None`), or it must pause (`Paused`, with the peer's message when
    /// that is why).
    async fn relay(
        &mut self,
        t: &mut BoxIo,
        point: SplicePoint,
        ctl: &Mailbox,
        turn: &mut Turn,
    ) -> (Option<SpliceEnd>, Option<Control>) {
        use std::{future::poll_fn, pin::pin, task::Poll};
        type Waiting = Pin<Box<dyn Future<Output = Turn> + Send>>;
        // Polled by hand (no `select!`): every open stream's task holds
        // this state while idle, so it is kept small.
        let mut msg = None;
        let end = {
            let mut handover = pin!(self.guard.handover_requested());
            let mut message = pin!(ctl.recv());
            let mut closed = pin!(self.guard.closed());
            // Once the handover is asked for: waiting for a turn to move
            // (boxed, made only then), relaying on meanwhile.
            let mut waiting: Option<Waiting> = None;
            let moving = &self.registry.moving;
            let stop = poll_fn(|cx| {
                if waiting.is_none() && handover.as_mut().poll(cx).is_ready() {
                    let sem = Arc::clone(moving);
                    waiting = Some(Box::pin(async move { sem.acquire_owned().await.ok() }));
                }
                if let Some(w) = waiting.as_mut() {
                    if let Poll::Ready(got) = w.as_mut().poll(cx) {
                        *turn = got;
                        return Poll::Ready(());
                    }
                }
                match message.as_mut().poll(cx) {
                    Poll::Ready(m) => {
                        msg = m;
                        Poll::Ready(())
                    }
                    Poll::Pending => Poll::Pending,
                }
            });
            let mut splice = pin!(tlsmesh_tunnel::splice_pausable(&mut self.app, t, point, stop));
            poll_fn(|cx| {
                if closed.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(None);
                }
                splice.as_mut().poll(cx).map(Some)
            })
            .await
        };
        (end, msg)
    }

    /// This daemon is going: QUIESCE the peer and read the old stream up
    /// to its answer.
    async fn quiesce(
        &mut self,
        r: &mut Resume,
        t: &mut BoxIo,
        point: &mut SplicePoint,
        ctl: &Mailbox,
    ) -> Result<(), Quiesce> {
        let acts = r.local_quiesce();
        closed(&acts).map_err(Quiesce::Broken)?;
        let ext = ResumeExt::Quiesce { token: self.stream.token.clone(), sent: r.sent() };
        let stream = self.stream.clone();
        let dialer = Arc::clone(&self.dialer);
        let ask = async move {
            let s = tokio::time::timeout(QUIESCE_TIMEOUT, dialer.request(&stream, ext))
                .await
                .map_err(|_| {
                    format!("the peer did not answer the QUIESCE within {QUIESCE_TIMEOUT:?}")
                })?
                .map_err(|e| e.to_string())?;
            s.response().quiesce_sent.ok_or_else(|| "the peer's answer carried no count".to_owned())
        };
        let mut answers = Vec::new();
        let drained = tokio::time::timeout(
            PAUSE_BOUND,
            drain(t, &mut self.app, r, point, ask, false, ctl, &mut answers, None),
        )
        .await
        .unwrap_or(Err(Drain::Broken("not paused in time".into())));
        match drained {
            Ok(()) => {
                for a in answers {
                    let _ = a.send(r.sent());
                }
                Ok(())
            }
            Err(Drain::NoAnswer(why)) => Err(Quiesce::NotPaused(why)),
            Err(Drain::Broken(why)) => Err(Quiesce::Broken(why)),
        }
    }

    /// The peer is moving: pause, then answer with this side's count.
    #[expect(
        clippy::too_many_arguments,
        reason = "the machine, the stream and its point, the peer's count and answer, the mailbox, the held bytes: one step of the driver"
    )]
    async fn peer_quiesced(
        &mut self,
        r: &mut Resume,
        t: &mut BoxIo,
        point: &mut SplicePoint,
        peer_sent: u64,
        answer: oneshot::Sender<u64>,
        ctl: &Mailbox,
        held: &mut Vec<u8>,
    ) -> Result<(), Quiesce> {
        let acts = r.peer_quiesce(peer_sent);
        closed(&acts).map_err(Quiesce::Broken)?;
        let never = std::future::pending::<Result<u64, String>>();
        let mut answers = vec![answer];
        let drained = tokio::time::timeout(
            PAUSE_BOUND,
            drain(t, &mut self.app, r, point, never, true, ctl, &mut answers, Some(held)),
        )
        .await
        .unwrap_or(Err(Drain::Broken("the peer's bytes did not arrive in time".into())));
        match drained {
            Ok(()) => {
                // Answered only now: the peer may go once it has ours.
                // Every send is tried (no short cut): each waiting request
                // gets the count.
                let delivered =
                    answers.into_iter().fold(false, |any, a| a.send(r.sent()).is_ok() | any);
                if !delivered {
                    // The peer gave up waiting (it reset its QUIESCE): it
                    // relays on over the old stream, and so does this side.
                    return Err(Quiesce::Withdrawn);
                }
                debug!(
                    sent = r.sent(),
                    received = r.received(),
                    "tunnel stream paused by the peer"
                );
                Ok(())
            }
            Err(Drain::NoAnswer(why) | Drain::Broken(why)) => Err(Quiesce::Broken(why)),
        }
    }

    /// Paused: offer the stream to the next daemon when this one is going,
    /// else get it resumed (send RESUME as the client, wait for it as the
    /// server) within [`PAUSE_BOUND`]. `old` is the old tunnel stream, kept
    /// open until then. A stream `holding` bytes its app wrote during the
    /// pause is not offered (the bytes would stay behind): it is resumed
    /// here first, and moves at its next turn.
    async fn paused(
        &mut self,
        r: &mut Resume,
        ctl: &Mailbox,
        point: &SplicePoint,
        start: (u64, u64),
        old: Option<BoxIo>,
        holding: bool,
    ) -> Result<Paused, String> {
        self.stream.sent = r.sent();
        self.stream.received = r.received();
        self.stream.app_write_done = point.b_to_a_done;
        let deadline = tokio::time::Instant::now() + PAUSE_BOUND;
        let mut offered = false;
        let mut backoff = Duration::from_millis(20);
        let mut next_try = tokio::time::Instant::now();
        loop {
            let role = self.stream.role;
            tokio::select! {
                // A daemon that is going hands the stream over before it
                // would resume it itself.
                biased;
                () = self.guard.handover_requested(), if !offered && !holding => {
                    offered = true;
                    let t = moved(r.sent(), r.received(), start);
                    let what = Offered::Stream { stream: &self.stream, app: self.app.as_fd() };
                    if self.guard.hand_off(t, what).await {
                        debug!("paused tunnel stream handed to the next daemon");
                        drop(old);
                        return Ok(Paused::HandedOver);
                    }
                }
                () = tokio::time::sleep_until(next_try), if role == StreamRole::Client => {
                    let ext = ResumeExt::Resume {
                        token: self.stream.token.clone(),
                        sent: r.sent(),
                        received: r.received(),
                    };
                    let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, self.dialer.request(&self.stream, ext))
                        .await
                        .unwrap_or_else(|_| Err(RequestError::Failed("no answer in time".into())));
                    match attempt {
                        Ok(s) => {
                            closed(&r.resumed())?;
                            info!(sent = r.sent(), received = r.received(), transport = %s.transport(), "tunnel stream resumed");
                            return Ok(Paused::Resumed(Box::new(s)));
                        }
                        Err(RequestError::Refused { status: 409, reason }) => {
                            return Err(format!("the peer refused the resume: {reason}"));
                        }
                        Err(e) => {
                            // 404 until the peer's new daemon holds it.
                            debug!(error = %e, "resume not accepted yet; retrying");
                            next_try = tokio::time::Instant::now() + backoff;
                            backoff = (backoff * 2).min(Duration::from_millis(500));
                        }
                    }
                }
                m = ctl.recv() => match m {
                    Some(Control::Resume { sent, received, answer }) => match r.resume(sent, received) {
                        Ok(acts) => {
                            closed(&acts)?;
                            let (attach, stream) = oneshot::channel();
                            let _ = answer.send(Ok(attach));
                            let t = tokio::time::timeout_at(deadline, stream)
                                .await
                                .map_err(|_| "the resumed stream did not arrive".to_owned())?
                                .map_err(|_| "the resumed stream's 200 could not be sent".to_owned())?;
                            info!(sent = r.sent(), received = r.received(), "tunnel stream resumed by the peer");
                            return Ok(Paused::Resumed(t));
                        }
                        Err(e) => {
                            let mismatch = e == ResumeRefused::CountMismatch;
                            let _ = answer.send(Err(e));
                            if mismatch {
                                return Err("a resume with byte counts that do not match".into());
                            }
                        }
                    },
                    // A second QUIESCE while paused: the answer is the same.
                    Some(Control::Quiesce { answer, .. }) => {
                        let _ = answer.send(r.sent());
                    }
                    None => {}
                },
                () = tokio::time::sleep_until(deadline) => {
                    let _ = r.timed_out();
                    return Err(format!("not resumed within {PAUSE_BOUND:?}"));
                }
                () = self.guard.closed() => return Err("closed by the daemon (policy)".into()),
            }
        }
    }

    /// Ends the stream with a reset of the app socket.
    fn close(mut self, point: &SplicePoint, start: (u64, u64), why: &str) {
        warn!(reason = why, "resumable tunnel stream closed");
        self.guard.failed(moved(point.a_to_b, point.b_to_a, start), why);
        let _ = self.app.set_zero_linger();
    }
}

/// What this daemon moved of a stream that started (here) at `start`.
fn moved(sent: u64, received: u64, start: (u64, u64)) -> Transfer {
    Transfer::pod_first(sent.saturating_sub(start.0), received.saturating_sub(start.1))
}

/// Whether the machine closed the stream.
fn closed(acts: &[Action]) -> Result<(), String> {
    match acts.iter().find_map(|a| match a {
        Action::Close { reason } => Some(*reason),
        _ => None,
    }) {
        Some(reason) => Err(reason.to_owned()),
        None => Ok(()),
    }
}

enum Quiesce {
    /// The peer did not pause: the stream may relay on as it was.
    NotPaused(String),
    /// The peer asked for the pause and then gave up waiting for the
    /// answer: both sides relay on over the old stream.
    Withdrawn,
    /// The stream cannot go on.
    Broken(String),
}

enum Drain {
    NoAnswer(String),
    Broken(String),
}

/// Most bytes a side holds from its app while it drains a peer's QUIESCE
/// (see [`drain`]): enough to take what an echo of full socket buffers and
/// a full stream window writes back.
const HOLD_BUDGET: usize = 16 << 20;

/// Copies the old stream to the app until the machine is paused: it has
/// received what the peer said it sent. The peer's count comes from `count`
/// (the answer to our QUIESCE, read meanwhile so that the peer can flush)
/// unless `known`.
///
/// A QUIESCE from the peer meanwhile (both moving at once) is the peer's
/// answer; its own answer waits in `answers` until this side is paused.
///
/// With `hold` (the side that stays, answering a peer's QUIESCE), the app
/// is read meanwhile, into `hold`, up to [`HOLD_BUDGET`]: an app that
/// answers what it reads (an echo, a request/response server with full
/// windows both ways) is blocked writing to us and reads the peer's
/// in-flight bytes only once we read it. Those bytes are not sent on the
/// old stream (this side's count is already final) but first on the one it
/// relays on ([`send_held`]).
#[expect(
    clippy::too_many_arguments,
    reason = "the two streams, the machine and its point, the peer's count, its messages and the held bytes: one step of the driver"
)]
async fn drain(
    t: &mut BoxIo,
    app: &mut TcpStream,
    r: &mut Resume,
    point: &mut SplicePoint,
    count: impl Future<Output = Result<u64, String>>,
    known: bool,
    ctl: &Mailbox,
    answers: &mut Vec<oneshot::Sender<u64>>,
    mut hold: Option<&mut Vec<u8>>,
) -> Result<(), Drain> {
    use bytes::BufMut as _;
    tokio::pin!(count);
    let mut known = known;
    // Not zeroed: every moving stream drains, most of them nothing (the
    // kernel writes only what it reads).
    let mut buf: Vec<u8> = Vec::with_capacity(64 * 1024);
    let (mut app_r, mut app_w) = app.split();
    let mut holding = Holding { eof: false };
    loop {
        match r.phase() {
            Phase::Paused => return Ok(()),
            Phase::Closed => return Err(Drain::Broken("the stream's counts do not add up".into())),
            _ => {}
        }
        let want = match r.phase() {
            Phase::Draining { peer_sent } => {
                usize::try_from(peer_sent - r.received()).unwrap_or(usize::MAX).min(buf.capacity())
            }
            _ => buf.capacity(),
        };
        buf.clear();
        let mut room = (&mut buf).limit(want);
        if point.b_to_a_done && known {
            return Err(Drain::Broken("the old stream ended before the peer's count".into()));
        }
        tokio::select! {
            m = ctl.recv() => match m {
                Some(Control::Quiesce { sent, answer }) => {
                    known = true;
                    answers.push(answer);
                    closed(&r.peer_quiesce(sent)).map_err(Drain::Broken)?;
                }
                Some(Control::Resume { answer, .. }) => {
                    let _ = answer.send(Err(ResumeRefused::NotPaused));
                }
                None => {}
            },
            c = &mut count, if !known => {
                known = true;
                let m = c.map_err(Drain::NoAnswer)?;
                closed(&r.peer_quiesce(m)).map_err(Drain::Broken)?;
            }
            n = t.read_buf(&mut room), if !point.b_to_a_done => {
                let n = n.map_err(|e| Drain::Broken(format!("reading the old stream: {e}")))?;
                if n == 0 {
                    // The peer's app had half-closed: its end reaches ours.
                    let _ = app_w.shutdown().await;
                    point.b_to_a_done = true;
                    continue;
                }
                holding
                    .write_all(&mut app_w, &buf[..n], &mut app_r, hold.as_deref_mut())
                    .await
                    .map_err(|e| Drain::Broken(format!("writing to the app: {e}")))?;
                point.b_to_a += n as u64;
                closed(&r.tunnel_received(n as u64)).map_err(Drain::Broken)?;
            }
            got = holding.read(&mut app_r, hold.as_deref_mut()), if holding.may(hold.as_deref()) => {
                got.map_err(|e| Drain::Broken(format!("reading the app: {e}")))?;
            }
        }
    }
}

/// Reading an app into the held bytes while draining (see [`drain`]).
struct Holding {
    /// The app half-closed: read no more (the relay reads it again after
    /// the pause and sees the end again).
    eof: bool,
}

impl Holding {
    /// Whether the app may be read into `hold`.
    fn may(&self, hold: Option<&Vec<u8>>) -> bool {
        !self.eof && hold.is_some_and(|h| h.len() < HOLD_BUDGET)
    }

    /// One read of the app into `hold`, once it has something (an app with
    /// nothing to say costs no buffer). Cancel-safe: bytes are taken only
    /// when the read returns.
    async fn read(
        &mut self,
        app: &mut tokio::net::tcp::ReadHalf<'_>,
        hold: Option<&mut Vec<u8>>,
    ) -> std::io::Result<()> {
        use bytes::BufMut as _;
        let Some(hold) = hold else { return std::future::pending().await };
        loop {
            app.readable().await?;
            let room = HOLD_BUDGET.saturating_sub(hold.len()).min(64 * 1024);
            hold.reserve(room);
            match app.try_read_buf(&mut (&mut *hold).limit(room)) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(());
                }
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Writes `data` to the app, reading it into `hold` meanwhile.
    async fn write_all(
        &mut self,
        w: &mut tokio::net::tcp::WriteHalf<'_>,
        mut data: &[u8],
        r: &mut tokio::net::tcp::ReadHalf<'_>,
        mut hold: Option<&mut Vec<u8>>,
    ) -> std::io::Result<()> {
        while !data.is_empty() {
            let may = self.may(hold.as_deref());
            tokio::select! {
                n = w.write(data) => match n? {
                    0 => return Err(std::io::ErrorKind::WriteZero.into()),
                    n => data = &data[n..],
                },
                got = self.read(r, hold.as_deref_mut()), if may => got?,
            }
        }
        Ok(())
    }
}

/// Sends what the app wrote during the pause ([`drain`]) on the stream this
/// side relays on, before anything else, and counts it as sent.
async fn send_held(
    t: &mut BoxIo,
    held: &mut Vec<u8>,
    r: &mut Resume,
    point: &mut SplicePoint,
) -> Result<(), String> {
    let held = std::mem::take(held);
    t.write_all(&held)
        .await
        .map_err(|e| format!("sending what the app wrote during the pause: {e}"))?;
    t.flush().await.map_err(|e| format!("sending what the app wrote during the pause: {e}"))?;
    let n = held.len() as u64;
    r.app_read(n);
    let _ = r.tunnel_wrote(n);
    point.a_to_b += n;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(token: &str) -> PausedStream {
        PausedStream {
            token: token.into(),
            role: StreamRole::Server,
            local_identity: "spiffe://td/ns/a/sa/server".into(),
            peer_identity: "spiffe://td/ns/a/sa/client".into(),
            peer: "10.0.0.1:40000".parse().unwrap(),
            sent: 0,
            received: 0,
            app_write_done: false,
        }
    }

    /// Only the stream's peer, for the stream's pod, with its token reaches
    /// the stream; everything else gets the same 404.
    #[tokio::test]
    async fn only_the_peer_reaches_a_stream_by_its_token() {
        let reg = Arc::new(Registry::default());
        let token = new_token();
        let (registration, ctl) = reg.register("a/server", &stream(&token));
        let client = "spiffe://td/ns/a/sa/client";
        for (tok, pod, peer) in [
            (new_token().as_str(), "a/server", client),
            (token.as_str(), "a/other", client),
            (token.as_str(), "a/server", "spiffe://td/ns/a/sa/mallory"),
        ] {
            let e = reg.quiesce(tok, pod, peer, 1).await.unwrap_err();
            assert_eq!(e, unknown());
            let Err(e) = reg.resume(tok, pod, peer, 1, 1).await else { panic!("resumed") };
            assert_eq!(e, unknown());
        }
        assert!(ctl.try_recv().is_none(), "nothing reached the stream");
        // The peer does; the relay's answer is passed back.
        let asking = {
            let reg = Arc::clone(&reg);
            let token = token.clone();
            tokio::spawn(async move { reg.quiesce(&token, "a/server", client, 5).await })
        };
        let Some(Control::Quiesce { sent: 5, answer }) = ctl.recv().await else {
            panic!("the quiesce reached the stream")
        };
        answer.send(9).unwrap();
        assert_eq!(asking.await.unwrap().unwrap(), 9);
        // A resume with counts that do not match is a 409.
        let asking = {
            let reg = Arc::clone(&reg);
            let token = token.clone();
            tokio::spawn(async move { reg.resume(&token, "a/server", client, 1, 2).await })
        };
        let Some(Control::Resume { answer, .. }) = ctl.recv().await else { panic!("resume") };
        assert!(answer.send(Err(ResumeRefused::CountMismatch)).is_ok());
        let Err(e) = asking.await.unwrap() else { panic!("resumed") };
        assert_eq!(e.status, tlsmesh_tunnel::Status::Conflict);
        // Once the relay is gone, so is the token.
        drop(registration);
        assert!(reg.is_empty());
        assert_eq!(reg.quiesce(&token, "a/server", client, 1).await.unwrap_err(), unknown());
    }

    struct NoDialer;
    impl Dialer for NoDialer {
        fn request<'a>(
            &'a self,
            _: &'a PausedStream,
            _: ResumeExt,
        ) -> Pin<Box<dyn Future<Output = Result<tlsmesh_tunnel::Stream, RequestError>> + Send + 'a>>
        {
            Box::pin(async { Err(RequestError::Failed("none".into())) })
        }
    }

    /// What an idle resumable stream's task holds (every open tunnel stream
    /// pays it, on both nodes): the rare paths (quiesce, pause) are boxed.
    #[tokio::test]
    async fn an_idle_relay_is_small() {
        let table = crate::conns::ConnTable::new(Arc::default());
        let guard = table.open(crate::conns::example_info());
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let app = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let relay = Relay {
            guard,
            app,
            pod: "a/client".into(),
            stream: stream(&new_token()),
            registry: Arc::default(),
            dialer: Arc::new(NoDialer),
        };
        let f = relay.run(None);
        let size = std::mem::size_of_val(&f);
        eprintln!("resumable::Relay::run future: {size} bytes");
        // 1,408 B in a debug build (1,400 B release), 1,728 B while `run`
        // was an `async fn` (its arguments twice).
        assert!(size < 1536, "an idle resumable stream's task grew to {size} bytes");
    }

    /// The side that answers a QUIESCE writes the mover's in-flight bytes
    /// to an echo app that is itself blocked writing back (small socket
    /// buffers, more in flight than they hold): without holding what the
    /// app writes the drain can never finish; holding it, it does, and the
    /// held bytes are exactly what the app echoed, in order.
    #[tokio::test]
    async fn a_drain_into_an_echo_in_full_flow_completes_by_holding_what_it_writes_back() {
        async fn setup(data: &[u8]) -> (BoxIo, TcpStream, Resume) {
            let small = |s: &tokio::net::TcpSocket| {
                s.set_recv_buffer_size(16 << 10).unwrap();
                s.set_send_buffer_size(16 << 10).unwrap();
            };
            let ls = tokio::net::TcpSocket::new_v4().unwrap();
            small(&ls);
            ls.bind("127.0.0.1:0".parse().unwrap()).unwrap();
            let l = ls.listen(1).unwrap();
            let cs = tokio::net::TcpSocket::new_v4().unwrap();
            small(&cs);
            let app = cs.connect(l.local_addr().unwrap()).await.unwrap();
            let (mut echo, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut b = vec![0u8; 64 << 10];
                loop {
                    match echo.read(&mut b).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if echo.write_all(&b[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
            // The mover's side of the old stream: everything it sent.
            let (ours, mut peer) = tokio::io::duplex(64 << 10);
            let push = data.to_vec();
            tokio::spawn(async move {
                let _ = peer.write_all(&push).await;
                // Keep the old stream open (a pause does not end it).
                std::future::pending::<()>().await;
                drop(peer);
            });
            let mut r = Resume::open_at(0, 0);
            let _ = r.peer_quiesce(data.len() as u64);
            assert!(matches!(r.phase(), Phase::Draining { .. }), "{:?}", r.phase());
            (Box::new(ours), app, r)
        }

        const IN_FLIGHT: usize = 4 << 20;
        let data: Vec<u8> = (0..IN_FLIGHT).map(|i| u8::try_from(i % 251).unwrap()).collect();

        let point = || SplicePoint { a_to_b: 0, b_to_a: 0, a_to_b_done: false, b_to_a_done: false };
        let never = || std::future::pending::<Result<u64, String>>();

        // Without holding: stuck (the scenario is real).
        let (mut t, mut app, mut r) = setup(&data).await;
        let (ctl, mut answers, mut p) = (Mailbox::default(), Vec::new(), point());
        let stuck = tokio::time::timeout(
            Duration::from_secs(2),
            drain(&mut t, &mut app, &mut r, &mut p, never(), true, &ctl, &mut answers, None),
        )
        .await;
        assert!(stuck.is_err(), "the drain finished without holding: the echo was not blocked");

        // Holding: done, every in-flight byte written, the echo held.
        let (mut t, mut app, mut r) = setup(&data).await;
        let (ctl, mut answers, mut p) = (Mailbox::default(), Vec::new(), point());
        let mut held = Vec::new();
        let done = tokio::time::timeout(
            Duration::from_secs(60),
            drain(
                &mut t,
                &mut app,
                &mut r,
                &mut p,
                never(),
                true,
                &ctl,
                &mut answers,
                Some(&mut held),
            ),
        )
        .await;
        assert!(
            matches!(done, Ok(Ok(()))),
            "the drain did not finish holding the echo: {:?}",
            done.map(|r| r.is_ok())
        );
        assert_eq!(r.phase(), Phase::Paused);
        assert_eq!(p.b_to_a, IN_FLIGHT as u64, "every in-flight byte reached the app");
        assert_eq!(r.sent(), 0, "held bytes are not counted as sent on the old stream");
        assert!(!held.is_empty() && held.len() <= IN_FLIGHT);
        assert_eq!(held[..], data[..held.len()], "the held bytes are the echo, in order");

        // Relaying on: the held bytes go first on the new stream and are counted.
        let (new_ours, mut new_peer) = tokio::io::duplex(IN_FLIGHT * 2);
        let _ = r.resumed();
        let n = held.len();
        let mut new_t: BoxIo = Box::new(new_ours);
        send_held(&mut new_t, &mut held, &mut r, &mut p).await.unwrap();
        assert!(held.is_empty());
        assert_eq!((r.sent(), p.a_to_b), (n as u64, n as u64));
        let mut got = vec![0u8; n];
        new_peer.read_exact(&mut got).await.unwrap();
        assert_eq!(got[..], data[..n]);
    }

    #[test]
    fn tokens_are_43_unguessable_characters() {
        let (a, b) = (new_token(), new_token());
        assert!(tlsmesh_tunnel::ext::valid_token(&a), "{a}");
        assert_ne!(a, b);
    }
}
