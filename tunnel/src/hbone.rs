//! HBONE: tunnelled TCP connections as HTTP/2 CONNECT streams over TLS 1.3
//! (ALPN `h2`) to port 15008 — the format Istio ambient's ztunnel speaks.
//!
//! [`serve`] answers the CONNECT streams of one accepted TLS connection;
//! [`Pool`] opens them on pooled, multiplexed client connections. Both use
//! [`TunnelStream`], an `AsyncRead + AsyncWrite` over one HTTP/2 stream that
//! honours HTTP/2 flow control in both directions.
//!
//! Dead peers: both sides send HTTP/2 PINGs every
//! [`H2Config::keepalive_interval`] and drop the connection (erroring every
//! stream on it) when no PONG arrives within [`H2Config::keepalive_timeout`].
//! The daemon may additionally set TCP keepalive / `TCP_USER_TIMEOUT` on the
//! sockets it creates.

mod pool;
mod server;
mod stream;

use std::time::Duration;

pub use pool::{Pool, PoolConfig};
pub use server::{serve, serve_until, ServerCtx};
pub use stream::TunnelStream;

/// The ALPN protocol HBONE negotiates.
pub const ALPN: &[u8] = b"h2";

/// HTTP/2 settings used on both sides.
#[derive(Clone, Debug)]
pub struct H2Config {
    /// Per-stream receive window (`SETTINGS_INITIAL_WINDOW_SIZE`); ztunnel: 4 MiB.
    pub stream_window: u32,
    /// Connection receive window; ztunnel: 16 MiB.
    pub connection_window: u32,
    /// Largest DATA frame we accept (`SETTINGS_MAX_FRAME_SIZE`).
    pub max_frame_size: u32,
    /// Most bytes one stream may have queued in HTTP/2 before writes wait.
    pub max_send_buffer: usize,
    /// `SETTINGS_MAX_CONCURRENT_STREAMS` the server advertises.
    pub max_concurrent_streams: u32,
    /// How often to PING the peer; `None` disables keepalive.
    pub keepalive_interval: Option<Duration>,
    /// How long to wait for the PONG before declaring the connection dead.
    pub keepalive_timeout: Duration,
}

impl Default for H2Config {
    fn default() -> Self {
        Self {
            stream_window: 4 * 1024 * 1024,
            connection_window: 16 * 1024 * 1024,
            max_frame_size: 256 * 1024,
            max_send_buffer: 1024 * 1024,
            max_concurrent_streams: 100,
            keepalive_interval: Some(Duration::from_secs(10)),
            keepalive_timeout: Duration::from_secs(20),
        }
    }
}

/// rustls client and server configurations whose ALPN [`crate::quic`] sets.
pub trait AlpnConfig {
    fn alpn(&self) -> &[Vec<u8>];
    fn set_alpn(&mut self, alpn: Vec<Vec<u8>>);
}

impl AlpnConfig for rustls::ClientConfig {
    fn alpn(&self) -> &[Vec<u8>] {
        &self.alpn_protocols
    }
    fn set_alpn(&mut self, alpn: Vec<Vec<u8>>) {
        self.alpn_protocols = alpn;
    }
}

impl AlpnConfig for rustls::ServerConfig {
    fn alpn(&self) -> &[Vec<u8>] {
        &self.alpn_protocols
    }
    fn set_alpn(&mut self, alpn: Vec<Vec<u8>>) {
        self.alpn_protocols = alpn;
    }
}

/// Drives HTTP/2 PING keepalive next to a connection future. `ping` is the
/// connection's `PingPong`; returns when the connection future completes, or
/// with `Err(())` when a PONG did not arrive in time.
pub(crate) async fn ping_loop(
    ping: Option<h2::PingPong>,
    cfg: &H2Config,
    peer: std::net::SocketAddr,
) -> Result<(), ()> {
    let (Some(mut ping), Some(interval)) = (ping, cfg.keepalive_interval) else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(cfg.keepalive_timeout, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {}
            Ok(Err(e)) => {
                // The connection is closing; the connection future reports why.
                tracing::debug!(%peer, error = %e, "HTTP/2 keepalive ping failed");
                return std::future::pending().await;
            }
            Err(_) => {
                tracing::warn!(
                    %peer,
                    timeout = ?cfg.keepalive_timeout,
                    "tunnel peer did not answer the HTTP/2 keepalive PING in time; closing the connection and resetting its streams"
                );
                return Err(());
            }
        }
    }
}
