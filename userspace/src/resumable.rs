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
    collections::HashMap,
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
    sync::{mpsc, oneshot},
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

struct Entry {
    pod: String,
    peer_identity: String,
    ctl: mpsc::Sender<Control>,
}

/// The resumable streams of this daemon, by token (a tunnel server looks a
/// QUIESCE or RESUME up here).
#[derive(Default)]
pub struct Registry {
    streams: Mutex<HashMap<String, Entry>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("streams", &lock(&self.streams).len()).finish()
    }
}

/// A stream's place in the registry; dropping it removes the stream.
struct Registration {
    registry: Arc<Registry>,
    token: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(&self.registry.streams).remove(&self.token);
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

    fn register(
        self: &Arc<Self>,
        pod: &str,
        s: &PausedStream,
    ) -> (Registration, mpsc::Receiver<Control>) {
        let (tx, rx) = mpsc::channel(4);
        lock(&self.streams).insert(
            s.token.clone(),
            Entry { pod: pod.to_owned(), peer_identity: s.peer_identity.clone(), ctl: tx },
        );
        (Registration { registry: Arc::clone(self), token: s.token.clone() }, rx)
    }

    fn control(
        &self,
        token: &str,
        pod: &str,
        peer: &str,
    ) -> Result<mpsc::Sender<Control>, Refusal> {
        let streams = lock(&self.streams);
        let e = streams.get(token).ok_or_else(unknown)?;
        if e.pod != pod || e.peer_identity != peer {
            return Err(unknown());
        }
        Ok(e.ctl.clone())
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
        ctl.send(Control::Quiesce { sent, answer }).await.map_err(|_| unknown())?;
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
        ctl.send(Control::Resume { sent, received, answer }).await.map_err(|_| unknown())?;
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
    pub async fn run(mut self, tunnel: Option<BoxIo>) {
        let (_registration, mut ctl) = self.registry.register(&self.pod, &self.stream);
        let start = (self.stream.sent, self.stream.received);
        let mut r = match tunnel {
            Some(_) => Resume::open_at(start.0, start.1),
            None => Resume::paused_at(start.0, start.1),
        };
        // The app side is read again after a pause (an EOF it gave is
        // given again); the tunnel side only until its end reached the app.
        let mut point = SplicePoint {
            a_to_b: start.0,
            b_to_a: start.1,
            a_to_b_done: false,
            b_to_a_done: self.stream.app_write_done,
        };
        let mut tunnel = tunnel;
        loop {
            let Some(mut t) = tunnel.take() else {
                // Paused with no stream: wait for (or send) the resume.
                match self.paused(&mut r, &mut ctl, &point, start, None).await {
                    Ok(Paused::Resumed(t)) => {
                        tunnel = Some(t);
                        continue;
                    }
                    Ok(Paused::HandedOver) => return,
                    Err(why) => return self.close(&point, start, &why),
                }
            };
            let mut msg = None;
            let end = {
                let stop = async {
                    tokio::select! {
                        () = self.guard.handover_requested() => {}
                        m = ctl.recv() => match m {
                            Some(m) => msg = Some(m),
                            None => std::future::pending().await,
                        },
                    }
                };
                let splice = tlsmesh_tunnel::splice_pausable(&mut self.app, &mut t, point, stop);
                tokio::select! {
                    end = splice => Some(end),
                    () = self.guard.closed() => None,
                }
            };
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
            let quiesced = match msg {
                Some(Control::Resume { answer, .. }) => {
                    let _ = answer.send(Err(ResumeRefused::NotPaused));
                    tunnel = Some(t);
                    continue;
                }
                Some(Control::Quiesce { sent, answer }) => {
                    self.peer_quiesced(&mut r, &mut t, &mut point, sent, answer, &mut ctl).await
                }
                None => self.quiesce(&mut r, &mut t, &mut point, &mut ctl).await,
            };
            match quiesced {
                Ok(()) => {}
                Err(Quiesce::NotPaused(why)) => {
                    // The peer never paused (it does not know the stream
                    // any more, or did not answer): relay on here.
                    info!(reason = %why, "tunnel stream could not be quiesced; it stays with this daemon");
                    self.guard.keep_here();
                    r = Resume::open_at(r.sent(), r.received());
                    tunnel = Some(t);
                    continue;
                }
                Err(Quiesce::Broken(why)) => return self.close(&point, start, &why),
            }
            match self.paused(&mut r, &mut ctl, &point, start, Some(t)).await {
                Ok(Paused::Resumed(t)) => tunnel = Some(t),
                Ok(Paused::HandedOver) => return,
                Err(why) => return self.close(&point, start, &why),
            }
        }
    }

    /// This daemon is going: QUIESCE the peer and read the old stream up
    /// to its answer.
    async fn quiesce(
        &mut self,
        r: &mut Resume,
        t: &mut BoxIo,
        point: &mut SplicePoint,
        ctl: &mut mpsc::Receiver<Control>,
    ) -> Result<(), Quiesce> {
        let acts = r.local_quiesce();
        closed(&acts).map_err(Quiesce::Broken)?;
        let ext = ResumeExt::Quiesce { token: self.stream.token.clone(), sent: r.sent() };
        let stream = self.stream.clone();
        let dialer = Arc::clone(&self.dialer);
        let ask = async move {
            let s = dialer.request(&stream, ext).await.map_err(|e| e.to_string())?;
            s.response().quiesce_sent.ok_or_else(|| "the peer's answer carried no count".to_owned())
        };
        let mut answers = Vec::new();
        let drained = tokio::time::timeout(
            PAUSE_BOUND,
            drain(t, &mut self.app, r, point, ask, false, ctl, &mut answers),
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
    async fn peer_quiesced(
        &mut self,
        r: &mut Resume,
        t: &mut BoxIo,
        point: &mut SplicePoint,
        peer_sent: u64,
        answer: oneshot::Sender<u64>,
        ctl: &mut mpsc::Receiver<Control>,
    ) -> Result<(), Quiesce> {
        let acts = r.peer_quiesce(peer_sent);
        closed(&acts).map_err(Quiesce::Broken)?;
        let never = std::future::pending::<Result<u64, String>>();
        let mut answers = vec![answer];
        let drained = tokio::time::timeout(
            PAUSE_BOUND,
            drain(t, &mut self.app, r, point, never, true, ctl, &mut answers),
        )
        .await
        .unwrap_or(Err(Drain::Broken("the peer's bytes did not arrive in time".into())));
        match drained {
            Ok(()) => {
                // Answered only now: the peer may go once it has ours.
                for a in answers {
                    let _ = a.send(r.sent());
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
    /// open until then.
    async fn paused(
        &mut self,
        r: &mut Resume,
        ctl: &mut mpsc::Receiver<Control>,
        point: &SplicePoint,
        start: (u64, u64),
        old: Option<BoxIo>,
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
                () = self.guard.handover_requested(), if !offered => {
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
    /// The stream cannot go on.
    Broken(String),
}

enum Drain {
    NoAnswer(String),
    Broken(String),
}

/// Copies the old stream to the app until the machine is paused: it has
/// received what the peer said it sent. The peer's count comes from `count`
/// (the answer to our QUIESCE, read meanwhile so that the peer can flush)
/// unless `known`.
///
/// A QUIESCE from the peer meanwhile (both moving at once) is the peer's
/// answer; its own answer waits in `answers` until this side is paused.
async fn drain(
    t: &mut BoxIo,
    app: &mut TcpStream,
    r: &mut Resume,
    point: &mut SplicePoint,
    count: impl Future<Output = Result<u64, String>>,
    known: bool,
    ctl: &mut mpsc::Receiver<Control>,
    answers: &mut Vec<oneshot::Sender<u64>>,
) -> Result<(), Drain> {
    tokio::pin!(count);
    let mut known = known;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.phase() {
            Phase::Paused => return Ok(()),
            Phase::Closed => return Err(Drain::Broken("the stream's counts do not add up".into())),
            _ => {}
        }
        let want = match r.phase() {
            Phase::Draining { peer_sent } => {
                usize::try_from(peer_sent - r.received()).unwrap_or(usize::MAX).min(buf.len())
            }
            _ => buf.len(),
        };
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
            n = t.read(&mut buf[..want]), if !point.b_to_a_done => {
                let n = n.map_err(|e| Drain::Broken(format!("reading the old stream: {e}")))?;
                if n == 0 {
                    // The peer's app had half-closed: its end reaches ours.
                    let _ = app.shutdown().await;
                    point.b_to_a_done = true;
                    continue;
                }
                app.write_all(&buf[..n])
                    .await
                    .map_err(|e| Drain::Broken(format!("writing to the app: {e}")))?;
                point.b_to_a += n as u64;
                closed(&r.tunnel_received(n as u64)).map_err(Drain::Broken)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_43_unguessable_characters() {
        let (a, b) = (new_token(), new_token());
        assert!(tlsmesh_tunnel::ext::valid_token(&a), "{a}");
        assert_ne!(a, b);
    }
}
