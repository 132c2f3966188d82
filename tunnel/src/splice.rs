//! Bidirectional copy between two byte streams with half-close propagation
//! and adaptive buffers (none for idle connections, large for bulk ones).
//!
//! A splice can also be paused ([`splice_pausable`]): it stops reading,
//! writes out and flushes what it holds, and returns where it stopped
//! ([`SplicePoint`]), so the two streams can be handed to another process
//! (sockets: their whole state is in the kernel) and spliced on from there.
//! While one direction's held bytes wait for their writer, the other keeps
//! copying (a bounded amount, [`UNBLOCK_BUDGET`]): the peer of the stuck
//! writer may itself be stuck writing to us — an echo, a request/response
//! server with full windows both ways — and would never read again if we
//! stopped reading it.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Default upper bound of each direction's copy buffer.
pub const DEFAULT_SPLICE_BUFFER: usize = 256 * 1024;
/// A direction that moves bulk data starts with this much heap buffer and
/// doubles it each time a read fills it, up to the maximum.
const INITIAL_BUFFER: usize = 16 * 1024;
/// Reads of a direction without a heap buffer go to the stack, this much at
/// a time, and are written straight through: an idle connection holds no
/// copy buffer at all, and a chatty one (request/response) none between
/// messages.
const STACK_READ: usize = 4 * 1024;
/// At most this many bytes are read, both directions together, while a
/// pause waits for a direction's writer (see the module header). Enough to
/// empty full socket buffers both ways; a pause that needs more waits.
pub const UNBLOCK_BUDGET: u64 = 16 << 20;

/// The result of a splice: bytes moved each way, and the error that ended it
/// early, if any.
#[derive(Debug)]
pub struct SpliceOutcome {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
    /// `None` when both directions reached end-of-stream cleanly.
    pub error: Option<io::Error>,
}

/// Where a paused splice stopped: the bytes moved each way so far, and
/// which directions are over (their reader reached end-of-stream and the
/// writer was shut down). Nothing is held in between: every byte read was
/// written and flushed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SplicePoint {
    /// Bytes read from `a` and written to `b`.
    pub a_to_b: u64,
    /// Bytes read from `b` and written to `a`.
    pub b_to_a: u64,
    /// `a → b` is over (`b`'s write side is shut down).
    pub a_to_b_done: bool,
    /// `b → a` is over (`a`'s write side is shut down).
    pub b_to_a_done: bool,
}

/// How a pausable splice ended.
#[derive(Debug)]
pub enum SpliceEnd {
    /// Both directions ended (or one failed), as [`splice`].
    Finished(SpliceOutcome),
    /// The stop signal came; nothing is buffered. Byte counts include the
    /// starting point's.
    Paused(SplicePoint),
}

/// [`splice`] from `from` (a point where an earlier splice of the same two
/// streams paused, or the default for a fresh one), until both directions
/// end or `stop` completes. On `stop` it reads no more, writes out what it
/// holds (also a pending half-close), flushes, and returns the point.
pub async fn splice_pausable<A, B, S>(a: &mut A, b: &mut B, from: SplicePoint, stop: S) -> SpliceEnd
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
    S: Future<Output = ()>,
{
    let mut ab = Direction::resumed(DEFAULT_SPLICE_BUFFER, from.a_to_b, from.a_to_b_done);
    let mut ba = Direction::resumed(DEFAULT_SPLICE_BUFFER, from.b_to_a, from.b_to_a_done);
    let mut stop = std::pin::pin!(stop);
    let mut stopping = false;
    let mut budget = UNBLOCK_BUDGET;
    let res = poll_fn(|cx| {
        if !stopping && stop.as_mut().poll(cx).is_ready() {
            stopping = true;
        }
        let mut a = Pin::new(&mut *a);
        let mut b = Pin::new(&mut *b);
        let ab_ready = match ab.poll_step(cx, stopping, a.as_mut(), b.as_mut()) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => false,
        };
        let ba_ready = match ba.poll_step(cx, stopping, b.as_mut(), a.as_mut()) {
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Pending => false,
        };
        if stopping && ab_ready != ba_ready {
            // One direction's held bytes wait for their writer: keep the
            // other one moving, in case that writer's peer waits for us.
            let unblocked = if ab_ready {
                ab.poll_unblock(cx, a, b, &mut budget)
            } else {
                ba.poll_unblock(cx, b, a, &mut budget)
            };
            if let Poll::Ready(Err(e)) = unblocked {
                return Poll::Ready(Err(e));
            }
            // The other direction is pending: its writer wakes us.
            return Poll::Pending;
        }
        if ab_ready && ba_ready {
            Poll::Ready(Ok(stopping && !(ab.done && ba.done)))
        } else {
            Poll::Pending
        }
    })
    .await;
    match res {
        Ok(true) => SpliceEnd::Paused(SplicePoint {
            a_to_b: ab.amount,
            b_to_a: ba.amount,
            a_to_b_done: ab.done,
            b_to_a_done: ba.done,
        }),
        Ok(false) => {
            SpliceEnd::Finished(SpliceOutcome { a_to_b: ab.amount, b_to_a: ba.amount, error: None })
        }
        Err(e) => SpliceEnd::Finished(SpliceOutcome {
            a_to_b: ab.amount,
            b_to_a: ba.amount,
            error: Some(e),
        }),
    }
}

/// Copies `a → b` and `b → a` until both directions reached end-of-stream.
/// End-of-stream on one side's read half shuts down the other side's write
/// half (TCP FIN ↔ HTTP/2 `END_STREAM` ↔ QUIC `FIN`). The first error ends
/// both directions; dropping the streams then resets them.
pub async fn splice<A, B>(a: &mut A, b: &mut B) -> SpliceOutcome
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    splice_with_buffer(a, b, DEFAULT_SPLICE_BUFFER).await
}

/// [`splice`] with an explicit maximum buffer size per direction.
pub async fn splice_with_buffer<A, B>(a: &mut A, b: &mut B, max_buffer: usize) -> SpliceOutcome
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let max_buffer = max_buffer.max(1024);
    let mut ab = Direction::new(max_buffer);
    let mut ba = Direction::new(max_buffer);
    let res = poll_fn(|cx| {
        let mut a = Pin::new(&mut *a);
        let mut b = Pin::new(&mut *b);
        let ab_ready = if ab.done {
            true
        } else {
            match ab.poll_copy(cx, a.as_mut(), b.as_mut()) {
                Poll::Ready(Ok(())) => true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => false,
            }
        };
        let ba_ready = if ba.done {
            true
        } else {
            match ba.poll_copy(cx, b, a) {
                Poll::Ready(Ok(())) => true,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => false,
            }
        };
        if ab_ready && ba_ready {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await;
    SpliceOutcome { a_to_b: ab.amount, b_to_a: ba.amount, error: res.err() }
}

/// One direction of the copy.
struct Direction {
    buf: Vec<u8>,
    max: usize,
    /// Bytes `buf[pos..end]` are read but not yet written.
    pos: usize,
    end: usize,
    read_eof: bool,
    need_flush: bool,
    done: bool,
    amount: u64,
}

impl Direction {
    fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
            pos: 0,
            end: 0,
            read_eof: false,
            need_flush: false,
            done: false,
            amount: 0,
        }
    }

    /// A direction that already moved `amount` bytes (and is over when
    /// `done`).
    fn resumed(max: usize, amount: u64, done: bool) -> Self {
        Self { amount, done, read_eof: done, ..Self::new(max) }
    }

    /// Copies, or drains once `stopping`; `Ready` at once when done.
    fn poll_step<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        stopping: bool,
        r: Pin<&mut R>,
        w: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        if self.done {
            Poll::Ready(Ok(()))
        } else if stopping {
            self.poll_drain(cx, w)
        } else {
            self.poll_copy(cx, r, w)
        }
    }

    /// Writes out `buf[pos..end]` (what was read and not yet written).
    fn poll_write_held<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        while self.pos < self.end {
            let n = ready!(w.as_mut().poll_write(cx, &self.buf[self.pos..self.end]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.pos += n;
            self.need_flush = true;
        }
        Poll::Ready(Ok(()))
    }

    /// The reader reached end-of-stream and all was written: flush, shut
    /// the writer down, done.
    fn poll_end<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        ready!(w.as_mut().poll_flush(cx))?;
        ready!(w.as_mut().poll_shutdown(cx))?;
        self.done = true;
        Poll::Ready(Ok(()))
    }

    /// Pausing: writes out what was read (and a pending half-close) and
    /// flushes, reading nothing more. `Ready(Ok)` once nothing is held.
    fn poll_drain<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        ready!(self.poll_write_held(cx, w.as_mut()))?;
        if self.read_eof {
            ready!(self.poll_end(cx, w.as_mut()))?;
        } else if self.need_flush {
            ready!(w.as_mut().poll_flush(cx))?;
        }
        self.need_flush = false;
        self.buf = Vec::new();
        self.pos = 0;
        self.end = 0;
        Poll::Ready(Ok(()))
    }

    /// Pausing, while the other direction waits for its writer: copies on
    /// (reads, writes, flushes) until the reader has nothing, the writer
    /// blocks, or `budget` is spent. `Ready(Ok)` when there is nothing more
    /// to do here (done, or no budget left).
    fn poll_unblock<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
        budget: &mut u64,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_write_held(cx, w.as_mut()))?;
            if self.read_eof {
                return self.poll_end(cx, w);
            }
            if *budget == 0 {
                return Poll::Ready(Ok(()));
            }
            if self.buf.is_empty() {
                self.buf.resize(INITIAL_BUFFER, 0);
            }
            let cap = usize::try_from(*budget).unwrap_or(usize::MAX).min(self.buf.len());
            match self.poll_fill(cx, r.as_mut(), cap) {
                Poll::Pending => return self.flush_then_pending(cx, w),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(n)) => *budget -= n as u64,
            }
        }
    }

    /// Reads into the buffer's first `cap` bytes, which are held from then
    /// on: the count, 0 at end-of-stream.
    fn poll_fill<R: AsyncRead + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        r: Pin<&mut R>,
        cap: usize,
    ) -> Poll<io::Result<usize>> {
        self.pos = 0;
        self.end = 0;
        let mut rb = ReadBuf::new(&mut self.buf[..cap]);
        ready!(r.poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        if n == 0 {
            self.read_eof = true;
        } else {
            self.end = n;
            self.amount += n as u64;
        }
        Poll::Ready(Ok(n))
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.end && !self.read_eof {
                self.pos = 0;
                self.end = 0;
                if self.buf.is_empty() {
                    ready!(self.poll_read_unbuffered(cx, r.as_mut(), w.as_mut()))?;
                } else {
                    match self.poll_fill(cx, r.as_mut(), self.buf.len()) {
                        Poll::Pending => {
                            if self.buf.len() <= INITIAL_BUFFER {
                                // Not a bulk stream: an idle connection holds
                                // no buffer.
                                self.buf = Vec::new();
                            }
                            return self.flush_then_pending(cx, w);
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Ready(Ok(n)) => {
                            if n == self.buf.len() && self.buf.len() < self.max {
                                // A full read: the sender has more; grow for throughput.
                                let grown = (self.buf.len() * 2).min(self.max);
                                self.buf.resize(grown, 0);
                            }
                        }
                    }
                }
            }
            ready!(self.poll_write_held(cx, w.as_mut()))?;
            if self.read_eof {
                ready!(self.poll_end(cx, w.as_mut()))?;
                // Release the buffer early: the other direction may run long.
                self.buf = Vec::new();
                return Poll::Ready(Ok(()));
            }
        }
    }

    /// The reader has nothing now: flush what was written, then wait.
    fn flush_then_pending<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        if self.need_flush {
            ready!(w.as_mut().poll_flush(cx))?;
            self.need_flush = false;
        }
        Poll::Pending
    }

    /// Reads without a heap buffer (an idle or chatty connection): into the
    /// stack, writing straight through. Only when the writer cannot take it
    /// all, or the read filled the stack buffer (bulk data), does the
    /// direction switch to a heap buffer, keeping what is left to write.
    /// `Ready(Ok)` means: go on with `pos..end` and `read_eof` as set.
    fn poll_read_unbuffered<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut r: Pin<&mut R>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        let mut stack = [0u8; STACK_READ];
        let stack = &mut stack[..STACK_READ.min(self.max)];
        let mut rb = ReadBuf::new(stack);
        match r.as_mut().poll_read(cx, &mut rb) {
            Poll::Pending => return self.flush_then_pending(cx, w),
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        let data = rb.filled();
        let n = data.len();
        if n == 0 {
            self.read_eof = true;
            return Poll::Ready(Ok(()));
        }
        self.amount += n as u64;
        let mut written = 0;
        while written < n {
            match w.as_mut().poll_write(cx, &data[written..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(k)) => {
                    written += k;
                    self.need_flush = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => break,
            }
        }
        if written < n || n == STACK_READ {
            let left = &data[written..];
            let mut buf = vec![0; INITIAL_BUFFER.min(self.max).max(left.len())];
            buf[..left.len()].copy_from_slice(left);
            self.buf = buf;
            self.end = left.len();
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn copies_both_ways_and_propagates_half_close() {
        let (mut a_app, mut a) = tokio::io::duplex(8 * 1024);
        let (mut b, mut b_app) = tokio::io::duplex(8 * 1024);
        let task = tokio::spawn(async move { splice_with_buffer(&mut a, &mut b, 64 * 1024).await });

        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
        let d2 = data.clone();
        let writer = tokio::spawn(async move {
            a_app.write_all(&d2).await.unwrap();
            a_app.shutdown().await.unwrap();
            // The other direction still works after our half-close.
            let mut back = Vec::new();
            a_app.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut got = Vec::new();
        b_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, data);
        b_app.write_all(b"reply").await.unwrap();
        b_app.shutdown().await.unwrap();
        assert_eq!(writer.await.unwrap(), b"reply");
        let out = task.await.unwrap();
        assert!(out.error.is_none(), "{:?}", out.error);
        assert_eq!(out.a_to_b, 1_000_000);
        assert_eq!(out.b_to_a, 5);
    }

    /// Splices `a → b` with a pause every few milliseconds, each time
    /// starting again from where the last one stopped, until the writer is
    /// done: everything arrives once and in order, and at each pause
    /// nothing is held (what `b` can read equals the point's count).
    #[tokio::test]
    async fn a_paused_splice_holds_nothing_and_goes_on_from_its_point() {
        let (mut a_app, mut a) = tokio::io::duplex(4 * 1024);
        let (mut b, mut b_app) = tokio::io::duplex(1 << 22);
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0])
            .collect();
        let d2 = data.clone();
        let writer = tokio::spawn(async move {
            for chunk in d2.chunks(10_000) {
                a_app.write_all(chunk).await.unwrap();
                tokio::task::yield_now().await;
            }
            a_app.shutdown().await.unwrap();
            a_app
        });
        // Nothing comes back: b → a ends at once (a_app sees EOF).
        b_app.shutdown().await.unwrap();
        let mut point = SplicePoint::default();
        let mut got = Vec::new();
        let mut pauses = 0;
        let outcome = loop {
            let stop = tokio::time::sleep(std::time::Duration::from_millis(2));
            match splice_pausable(&mut a, &mut b, point, stop).await {
                SpliceEnd::Paused(p) => {
                    pauses += 1;
                    assert!(p.a_to_b >= point.a_to_b);
                    // Nothing in flight: b holds exactly what was counted.
                    let mut buf = vec![0; 1 << 22];
                    while (got.len() as u64) < p.a_to_b {
                        let n = b_app.read(&mut buf).await.unwrap();
                        got.extend_from_slice(&buf[..n]);
                    }
                    assert_eq!(got.len() as u64, p.a_to_b, "more arrived than was counted");
                    point = p;
                }
                SpliceEnd::Finished(o) => break o,
            }
            assert!(pauses <= 10_000, "no end after {pauses} pauses");
        };
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        let mut a_app = writer.await.unwrap();
        // a → b ended with b's write side shut down: b_app reads to EOF.
        let mut rest = Vec::new();
        b_app.read_to_end(&mut rest).await.unwrap();
        got.extend_from_slice(&rest);
        assert!(pauses > 0, "the test never paused");
        assert_eq!(got.len(), data.len());
        assert!(got == data, "bytes were lost, repeated or reordered across {pauses} pauses");
        let mut back = Vec::new();
        a_app.read_to_end(&mut back).await.unwrap();
        assert!(back.is_empty());
    }

    /// A pause in full flow both ways, against an echo peer that writes
    /// each chunk back before it reads the next (so it stops reading while
    /// its writes are stuck): the pause completes — the splice keeps
    /// reading the echo while its own held bytes wait — and, resumed, every
    /// byte comes back once and in order.
    #[tokio::test]
    async fn a_pause_in_full_flow_against_an_echo_completes() {
        // A wide app side (the splice reads, and holds, up to its whole
        // buffer at once) and a narrow peer side.
        let (a_app, mut a) = tokio::io::duplex(1 << 20);
        let (mut b, mut b_peer) = tokio::io::duplex(8 * 1024);
        let echo = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = b_peer.read(&mut buf).await.unwrap();
                if n == 0 {
                    b_peer.shutdown().await.unwrap();
                    return;
                }
                b_peer.write_all(&buf[..n]).await.unwrap();
            }
        });
        let total = 4_000_000usize;
        let data: Vec<u8> = (0..total).map(|i| u8::try_from(i * 7 % 253).unwrap()).collect();
        let (mut a_read, mut a_write) = tokio::io::split(a_app);
        let d2 = data.clone();
        let writer = tokio::spawn(async move {
            a_write.write_all(&d2).await.unwrap();
            a_write.shutdown().await.unwrap();
        });
        let reader = tokio::spawn(async move {
            let mut back = Vec::new();
            a_read.read_to_end(&mut back).await.unwrap();
            back
        });
        let mut point = SplicePoint::default();
        let mut pauses = 0;
        let outcome = loop {
            let stop = tokio::time::sleep(std::time::Duration::from_millis(1));
            let end = tokio::time::timeout(
                std::time::Duration::from_secs(20),
                splice_pausable(&mut a, &mut b, point, stop),
            )
            .await
            .expect("the pause completes (no deadlock with the echo)");
            match end {
                SpliceEnd::Paused(p) => {
                    pauses += 1;
                    point = p;
                }
                SpliceEnd::Finished(o) => break o,
            }
            assert!(pauses <= 100_000, "no end after {pauses} pauses");
        };
        assert!(outcome.error.is_none(), "{:?}", outcome.error);
        writer.await.unwrap();
        echo.await.unwrap();
        let back = reader.await.unwrap();
        assert!(pauses > 0, "the test never paused");
        assert_eq!(back.len(), total);
        assert!(back == data, "bytes were lost, repeated or reordered across {pauses} pauses");
    }

    /// A direction that ended before the pause stays ended after it: the
    /// resumed splice neither reads its side again nor shuts its writer
    /// twice, and the other direction goes on.
    #[tokio::test]
    async fn a_half_closed_splice_pauses_and_resumes_half_closed() {
        let (mut a_app, mut a) = tokio::io::duplex(1024);
        let (mut b, mut b_app) = tokio::io::duplex(1024);
        a_app.write_all(b"request").await.unwrap();
        a_app.shutdown().await.unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let splice = tokio::spawn(async move {
            let end = splice_pausable(&mut a, &mut b, SplicePoint::default(), async {
                let _ = rx.await;
            })
            .await;
            (end, a, b)
        });
        let mut req = Vec::new();
        b_app.read_to_end(&mut req).await.unwrap();
        assert_eq!(req, b"request");
        tx.send(()).unwrap();
        let (end, mut a, mut b) = splice.await.unwrap();
        let SpliceEnd::Paused(p) = end else { panic!("not paused: {end:?}") };
        assert_eq!(p, SplicePoint { a_to_b: 7, b_to_a: 0, a_to_b_done: true, b_to_a_done: false });
        let resumed = tokio::spawn(async move {
            splice_pausable(&mut a, &mut b, p, std::future::pending()).await
        });
        b_app.write_all(b"reply").await.unwrap();
        b_app.shutdown().await.unwrap();
        let mut reply = Vec::new();
        a_app.read_to_end(&mut reply).await.unwrap();
        assert_eq!(reply, b"reply");
        let SpliceEnd::Finished(o) = resumed.await.unwrap() else { panic!("paused") };
        assert!(o.error.is_none());
        assert_eq!((o.a_to_b, o.b_to_a), (7, 5));
    }

    #[tokio::test]
    async fn an_idle_direction_holds_no_buffer_and_a_slow_writer_loses_nothing() {
        // Reader with nothing to read: Pending, and no heap buffer held.
        let (_keep, mut idle) = tokio::io::duplex(1024);
        let (mut sink, _sink_app) = tokio::io::duplex(1024);
        let mut d = Direction::new(DEFAULT_SPLICE_BUFFER);
        let polled = std::future::poll_fn(|cx| {
            Poll::Ready(d.poll_copy(cx, Pin::new(&mut idle), Pin::new(&mut sink)).is_pending())
        })
        .await;
        assert!(polled);
        assert_eq!(d.buf.capacity(), 0, "an idle direction holds no buffer");

        // A writer that takes 100 bytes at a time: the stack read's remainder
        // moves to the heap and arrives intact and in order.
        let (mut a_app, mut a) = tokio::io::duplex(64 * 1024);
        let (mut b, mut b_app) = tokio::io::duplex(100);
        let task = tokio::spawn(async move { splice(&mut a, &mut b).await });
        let msgs: Vec<Vec<u8>> = (0..200u32)
            .map(|i| (0..=(i * 37 % 3000)).map(|j| (i + j).to_le_bytes()[0]).collect())
            .collect();
        let expect: Vec<u8> = msgs.concat();
        let writer = tokio::spawn(async move {
            for m in msgs {
                a_app.write_all(&m).await.unwrap();
            }
            a_app.shutdown().await.unwrap();
            a_app
        });
        let mut got = Vec::new();
        b_app.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expect);
        drop(b_app);
        drop(writer.await.unwrap());
        let out = task.await.unwrap();
        assert_eq!(out.a_to_b, expect.len() as u64);
    }
}
