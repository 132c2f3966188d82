//! The QUIC transport (quinn, UDP port 15008): one bidirectional QUIC
//! stream per tunnelled TCP connection, opened with a small binary request
//! header (see [`wire`] and docs/PROTOCOL.md) and answered with the same
//! status codes as HBONE. Same certificates as the TCP transport; ALPN
//! `tlsmesh-q1`.
//!
//! Flow control is QUIC's own: per-stream and per-connection receive
//! windows, credit returned as the application reads. Dead peers surface as
//! a connection timeout after [`QuicConfig::idle_timeout`] (keepalive
//! packets every [`QuicConfig::keepalive_interval`] keep healthy idle
//! connections open).

mod pool;
mod server;
pub mod wire;

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use pool::{Dial, PathView, Pool};
pub use server::{serve, serve_until, OnConnection, OnRefused, ServerCtx};

use crate::error::Error;
use crate::hbone::AlpnConfig;
use crate::usage::Slot;

/// The ALPN protocol of the QUIC transport, version 1.
pub const ALPN: &[u8] = b"tlsmesh-q1";

/// QUIC settings for both sides.
#[derive(Clone, Debug)]
pub struct QuicConfig {
    /// Per-stream receive window.
    pub stream_window: u32,
    /// Per-connection receive window (and send window).
    pub connection_window: u32,
    /// Streams a client may have open on one connection: what a server
    /// advertises, and how many streams the client pool puts on one
    /// connection before opening another.
    pub max_streams: u32,
    /// Keepalive packet interval.
    pub keepalive_interval: Duration,
    /// A connection silent for this long is dead (QUIC `max_idle_timeout`).
    pub idle_timeout: Duration,
    /// A handshake slower than this means "QUIC unreachable, use TCP".
    pub handshake_timeout: Duration,
    /// Limit for the status reply to a stream request.
    pub response_timeout: Duration,
    /// Close a pooled connection after this long without streams.
    pub pool_idle_timeout: Duration,
    /// The `max_ack_delay` each side asks its peer to use (QUIC ACK
    /// frequency extension, which quinn negotiates; ignored by peers without
    /// it). QUIC's default of 25 ms holds the last packet of a short stream
    /// (and the stream's credit) unacknowledged for that long and adds it
    /// to every tail-loss probe timeout, which dominates the cost of a
    /// short-lived tunnel once a connection's congestion window is small.
    /// `None` keeps the peer's own delay.
    pub peer_max_ack_delay: Option<Duration>,
}

impl Default for QuicConfig {
    fn default() -> Self {
        Self {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_streams: 100,
            keepalive_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(15),
            pool_idle_timeout: Duration::from_secs(300),
            peer_max_ack_delay: Some(Duration::from_millis(1)),
        }
    }
}

impl QuicConfig {
    fn transport(&self, server: bool) -> Result<quinn::TransportConfig, Error> {
        let mut t = quinn::TransportConfig::default();
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| Error::Config("QUIC idle timeout out of range".into()))?;
        t.max_idle_timeout(Some(idle))
            .keep_alive_interval(Some(self.keepalive_interval))
            .stream_receive_window(self.stream_window.into())
            .receive_window(self.connection_window.into())
            .send_window(u64::from(self.connection_window))
            .max_concurrent_uni_streams(0u32.into())
            // Only clients open streams.
            .max_concurrent_bidi_streams(if server { self.max_streams } else { 0 }.into());
        if let Some(delay) = self.peer_max_ack_delay {
            let mut ack = quinn::AckFrequencyConfig::default();
            ack.max_ack_delay(Some(delay));
            t.ack_frequency_config(Some(ack));
        }
        Ok(t)
    }
}

/// Socket buffer size [`tune_udp_socket`] asks for (the kernel caps it at
/// `net.core.rmem_max` / `wmem_max`).
pub const UDP_SOCKET_BUFFER: usize = 4 * 1024 * 1024;

/// What [`tune_udp_socket`] obtained for a tunnel UDP socket: the buffer
/// sizes the kernel granted and the segmentation offloads quinn uses on it.
/// `gso_segments` > 1 means one `sendmsg` carries that many datagrams
/// (UDP GSO; quinn caps a transmit at 10), `gro_segments` > 1 that one
/// receive may return that many coalesced (UDP GRO). Both 1 means every
/// datagram costs a system call and a trip through the stack.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct UdpTuning {
    pub recv_buffer: usize,
    pub send_buffer: usize,
    pub gso_segments: usize,
    pub gro_segments: usize,
}

/// Raises a tunnel UDP socket's receive and send buffers to
/// [`UDP_SOCKET_BUFFER`] before it is handed to `quinn::Endpoint::new`.
/// The kernel default (about 208 KiB) overflows at a few Gbit/s whenever the
/// daemon is descheduled briefly; every drop is a loss that halves the
/// congestion window. Best effort: returns what was obtained.
pub fn tune_udp_socket(socket: &std::net::UdpSocket) -> io::Result<UdpTuning> {
    let state = quinn::udp::UdpSocketState::new(socket.into())?;
    // Errors (e.g. a capped size) are not fatal: whatever the kernel grants
    // is reported below.
    let _ = state.set_recv_buffer_size(socket.into(), UDP_SOCKET_BUFFER);
    let _ = state.set_send_buffer_size(socket.into(), UDP_SOCKET_BUFFER);
    Ok(UdpTuning {
        recv_buffer: state.recv_buffer_size(socket.into())?,
        send_buffer: state.send_buffer_size(socket.into())?,
        gso_segments: state.max_gso_segments(),
        gro_segments: state.gro_segments(),
    })
}

/// Builds the quinn server configuration from the node's rustls server
/// configuration (TLS 1.3, client auth required), with ALPN `tlsmesh-q1`.
pub fn server_config(
    tls: &Arc<rustls::ServerConfig>,
    cfg: &QuicConfig,
) -> Result<quinn::ServerConfig, Error> {
    let mut tls = (**tls).clone();
    tls.set_alpn(vec![ALPN.to_vec()]);
    // QUIC forbids other values; 0-RTT is not used.
    tls.max_early_data_size = 0;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| Error::Config(format!("TLS server config unusable for QUIC: {e}")))?;
    let mut sc = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    sc.transport_config(Arc::new(cfg.transport(true)?));
    Ok(sc)
}

/// Builds the quinn client configuration from a rustls client configuration
/// (the source workload's certificate), with ALPN `tlsmesh-q1`.
pub fn client_config(
    tls: &Arc<rustls::ClientConfig>,
    cfg: &QuicConfig,
) -> Result<quinn::ClientConfig, Error> {
    let mut tls = (**tls).clone();
    tls.set_alpn(vec![ALPN.to_vec()]);
    tls.enable_early_data = false;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)
        .map_err(|e| Error::Config(format!("TLS client config unusable for QUIC: {e}")))?;
    let mut cc = quinn::ClientConfig::new(Arc::new(crypto));
    cc.transport_config(Arc::new(cfg.transport(false)?));
    Ok(cc)
}

/// A tunnelled connection over one bidirectional QUIC stream.
///
/// `poll_shutdown` sends `FIN`; dropping it before shutting down resets the
/// stream (`RESET_STREAM`/`STOP_SENDING` with code [`wire::STREAM_CANCEL`])
/// rather than quinn's default of finishing it, so an aborted TCP
/// connection is not mistaken for a complete one.
pub struct TunnelStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    write_closed: bool,
    read_eof: bool,
    response: crate::ext::ResponseExt,
    _slot: Option<Slot>,
}

impl TunnelStream {
    pub(crate) fn new(
        send: quinn::SendStream,
        recv: quinn::RecvStream,
        slot: Option<Slot>,
    ) -> Self {
        Self {
            send,
            recv,
            write_closed: false,
            read_eof: false,
            response: crate::ext::ResponseExt::default(),
            _slot: slot,
        }
    }

    /// What the server's 200 said about the resume extension (client side).
    pub fn response(&self) -> crate::ext::ResponseExt {
        self.response
    }

    /// Aborts both directions.
    pub fn reset(&mut self) {
        let code = quinn::VarInt::from_u32(wire::STREAM_CANCEL);
        if !self.write_closed {
            let _ = self.send.reset(code);
            self.write_closed = true;
        }
        if !self.read_eof {
            let _ = self.recv.stop(code);
            self.read_eof = true;
        }
    }
}

impl std::fmt::Debug for TunnelStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("quic::TunnelStream")
            .field("id", &self.send.id())
            .field("write_closed", &self.write_closed)
            .finish_non_exhaustive()
    }
}

impl Drop for TunnelStream {
    fn drop(&mut self) {
        self.reset();
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.recv).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            if buf.filled().len() == before && buf.remaining() > 0 {
                this.read_eof = true;
            }
        }
        res
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.get_mut().send), cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.get_mut().send), cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        let res = AsyncWrite::poll_shutdown(Pin::new(&mut this.send), cx);
        if res.is_ready() {
            this.write_closed = true;
        }
        res
    }
}
