//! `TunnelStream`: one HTTP/2 stream as a byte stream, with flow control
//! tied to the consumer: writes wait for send window, reads return window to
//! the peer only as the bytes are consumed.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use h2::{Reason, RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::h2_to_io;
use crate::ext::ResponseExt;
use crate::usage::Slot;

/// A tunnelled connection over one HTTP/2 CONNECT stream.
///
/// * `poll_write` waits for HTTP/2 send capacity, so at most the peer's
///   stream window plus [`super::H2Config::max_send_buffer`] is ever in
///   flight or queued.
/// * `poll_read` releases receive window as the caller consumes bytes, so a
///   reader that stops reading stops the sender.
/// * `poll_shutdown` sends `END_STREAM` (half-close); dropping the stream
///   before both directions ended sends `RST_STREAM(CANCEL)`, as does
///   [`TunnelStream::reset`].
pub struct TunnelStream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received but not yet consumed.
    pending: Bytes,
    write_closed: bool,
    /// What the 200 said (client side).
    response: ResponseExt,
    /// Pool bookkeeping (client side only); released on drop.
    _slot: Option<Slot>,
}

impl TunnelStream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Option<Slot>) -> Self {
        Self {
            send,
            recv,
            pending: Bytes::new(),
            write_closed: false,
            response: ResponseExt::default(),
            _slot: slot,
        }
    }

    pub(crate) fn with_response(mut self, r: ResponseExt) -> Self {
        self.response = r;
        self
    }

    /// What the server's 200 said about the resume extension (client side).
    pub fn response(&self) -> ResponseExt {
        self.response
    }

    /// Aborts both directions with `RST_STREAM(CANCEL)`.
    pub fn reset(&mut self) {
        self.send.send_reset(Reason::CANCEL);
        self.write_closed = true;
    }

    fn reset_error(&mut self, cx: &mut Context<'_>) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("tunnel stream reset by the peer ({reason})"),
            ),
            Poll::Ready(Err(e)) => h2_to_io(e),
            Poll::Pending => {
                io::Error::new(io::ErrorKind::BrokenPipe, "tunnel stream closed for writing")
            }
        }
    }
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TunnelStream")
            .field("stream_id", &self.send.stream_id())
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.pending.is_empty() {
                let n = this.pending.len().min(buf.remaining());
                buf.put_slice(&this.pending[..n]);
                this.pending.advance(n);
                // Give the window back only now that the bytes are consumed.
                // An error means the stream is already gone; the next read
                // reports it.
                let _ = this.recv.flow_control().release_capacity(n);
                return Poll::Ready(Ok(()));
            }
            if buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            match ready!(this.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => this.pending = data,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            }
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown of the tunnel stream",
            )));
        }
        loop {
            let cap = this.send.capacity();
            if cap > 0 {
                let n = cap.min(buf.len());
                return match this.send.send_data(Bytes::copy_from_slice(&buf[..n]), false) {
                    Ok(()) => Poll::Ready(Ok(n)),
                    Err(_) => Poll::Ready(Err(this.reset_error(cx))),
                };
            }
            // Ask for as much as the caller offers; h2 assigns it as the
            // peer's window and our send buffer allow.
            this.send.reserve_capacity(buf.len());
            match ready!(this.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return Poll::Ready(Err(this.reset_error(cx))),
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Data handed to h2 is written by the connection task.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        this.write_closed = true;
        this.send.reserve_capacity(0);
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(_) => Poll::Ready(Err(this.reset_error(cx))),
        }
    }
}
