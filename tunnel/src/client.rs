//! One client in front of both transports: the daemon asks for a tunnel
//! stream and says whether QUIC may be tried; TCP (HBONE) is the fallback.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::error::Error;
use crate::handler::{ConnectHeaders, Io, PoolKey};
use crate::usage::lock;
use crate::{hbone, quic};

/// The transport a tunnel stream uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Transport {
    /// HBONE: HTTP/2 CONNECT over TLS 1.3 over TCP.
    Tcp,
    /// One QUIC stream per tunnelled connection.
    Quic,
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
        })
    }
}

/// Settings of both pools and of the fallback.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    pub hbone: hbone::PoolConfig,
    pub quic: quic::QuicConfig,
    /// After QUIC was unreachable at a destination, use TCP there without
    /// trying QUIC for this long.
    pub quic_retry_after: Duration,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            hbone: hbone::PoolConfig::default(),
            quic: quic::QuicConfig::default(),
            quic_retry_after: Duration::from_secs(60),
        }
    }
}

/// A tunnel stream of either transport.
#[derive(Debug)]
pub enum Stream {
    Hbone(hbone::TunnelStream),
    Quic(quic::TunnelStream),
}

impl Stream {
    /// Which transport carries it.
    pub fn transport(&self) -> Transport {
        match self {
            Stream::Hbone(_) => Transport::Tcp,
            Stream::Quic(_) => Transport::Quic,
        }
    }

    /// What the server's 200 said about the resume extension.
    pub fn response(&self) -> crate::ext::ResponseExt {
        match self {
            Stream::Hbone(s) => s.response(),
            Stream::Quic(s) => s.response(),
        }
    }

    /// Aborts both directions (HTTP/2 `RST_STREAM` / QUIC `RESET_STREAM`).
    pub fn reset(&mut self) {
        match self {
            Stream::Hbone(s) => s.reset(),
            Stream::Quic(s) => s.reset(),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Hbone(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Quic(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Hbone(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Quic(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Hbone(s) => Pin::new(s).poll_flush(cx),
            Stream::Quic(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Hbone(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Quic(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Both pools, with QUIC → TCP fallback. Share it in an `Arc`.
#[derive(Debug)]
pub struct Client {
    cfg: ClientConfig,
    hbone: hbone::Pool,
    quic: quic::Pool,
    /// Destinations where QUIC was unreachable, and when that was noticed.
    quic_down: Mutex<HashMap<SocketAddr, Instant>>,
}

impl Client {
    pub fn new(cfg: ClientConfig) -> Self {
        Self {
            hbone: hbone::Pool::new(cfg.hbone.clone()),
            quic: quic::Pool::new(cfg.quic.clone()),
            quic_down: Mutex::new(HashMap::new()),
            cfg,
        }
    }

    pub fn hbone(&self) -> &hbone::Pool {
        &self.hbone
    }

    pub fn quic(&self) -> &quic::Pool {
        &self.quic
    }

    /// Closes the pooled connections (both transports) whose key `doomed`
    /// selects, with their open streams. Returns how many were closed.
    pub fn close_where(&self, doomed: impl Fn(&PoolKey) -> bool) -> usize {
        self.hbone.close_where(&doomed) + self.quic.close_where(&doomed, "peer certificate revoked")
    }

    /// Whether QUIC is currently skipped for `dst` after a failure.
    pub fn quic_skipped(&self, dst: SocketAddr) -> bool {
        let mut down = lock(&self.quic_down);
        match down.get(&dst) {
            Some(t) if t.elapsed() < self.cfg.quic_retry_after => true,
            Some(_) => {
                down.remove(&dst);
                false
            }
            None => false,
        }
    }

    /// Opens a tunnel stream for `key` to `authority`, carrying `early`
    /// (bytes the client already sent; may be empty): over HBONE right
    /// behind the request (see [`hbone::Pool::connect_with_early_data`]),
    /// over QUIC written once the stream is accepted. With `quic` given (the
    /// destination node allows QUIC) QUIC is tried first; when it is
    /// unreachable the stream goes over TCP via `tcp_connector`, and QUIC is
    /// not retried at `key.dst` for [`ClientConfig::quic_retry_after`].
    /// Refusals (401/503/400) are returned as they are, never retried.
    pub async fn connect<C, Fut, T>(
        &self,
        key: &PoolKey,
        authority: SocketAddr,
        headers: &ConnectHeaders,
        early: Bytes,
        quic: Option<&quic::Dial>,
        tcp_connector: C,
    ) -> Result<Stream, Error>
    where
        C: FnOnce() -> Fut,
        Fut: Future<Output = io::Result<T>>,
        T: Io,
    {
        if let Some(dial) = quic {
            if !self.quic_skipped(key.dst) {
                match self.quic.connect(key, authority, headers, dial).await {
                    Ok(mut s) => {
                        if !early.is_empty() {
                            tokio::io::AsyncWriteExt::write_all(&mut s, &early)
                                .await
                                .map_err(|source| Error::Connect { dst: key.dst, source })?;
                        }
                        return Ok(Stream::Quic(s));
                    }
                    Err(e) if e.is_quic_unreachable() => {
                        tracing::warn!(dst = %key.dst, error = %e, retry_after = ?self.cfg.quic_retry_after, "QUIC unreachable; using TCP (HBONE)");
                        lock(&self.quic_down).insert(key.dst, Instant::now());
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        self.hbone
            .connect_with_early_data(key, authority, headers, early, tcp_connector)
            .await
            .map(Stream::Hbone)
    }
}
