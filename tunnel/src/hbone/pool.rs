//! HBONE client pool: CONNECT streams multiplexed over pooled HTTP/2
//! connections, one set of connections per [`PoolKey`].
//!
//! Rules (see docs/PROTOCOL.md, "Pooling"):
//! * a connection carries at most `max_streams_per_conn` open streams; when
//!   all connections of a key are full, a new one is opened;
//! * at most one connection per key is being opened at a time (concurrent
//!   callers wait and then share it);
//! * a connection with no open stream for `idle_timeout` is closed (GOAWAY);
//! * a connection that fails (EOF, error, keepalive timeout) is evicted at
//!   once; a `connect` that hit a dead pooled connection before its request
//!   was accepted retries once on a fresh connection.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use http::{Method, Request};
use tracing::Instrument;

use super::{ping_loop, H2Config, TunnelStream};
use crate::error::Error;
use crate::ext::ResponseExt;
use crate::handler::{format_forwarded_for, ConnectHeaders, Io, PoolKey, Status};
use crate::usage::{lock, Slot, Usage};

/// Client pool settings.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// HTTP/2 settings.
    pub h2: H2Config,
    /// Most concurrent streams per connection (ztunnel: 100).
    pub max_streams_per_conn: usize,
    /// Close a connection after this long without streams (ztunnel: 5 min).
    pub idle_timeout: Duration,
    /// Limit for the caller's connector (TCP + TLS) and the HTTP/2 handshake.
    pub connect_timeout: Duration,
    /// Limit for the CONNECT answer (the peer connects upstream meanwhile).
    pub response_timeout: Duration,
}

impl Default for PoolConfig {
    fn default() -> Self {
        Self {
            h2: H2Config::default(),
            max_streams_per_conn: 100,
            idle_timeout: Duration::from_secs(300),
            connect_timeout: Duration::from_secs(10),
            response_timeout: Duration::from_secs(15),
        }
    }
}

/// A pool of HBONE client connections. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("hbone::Pool").field("config", &self.inner.cfg).finish_non_exhaustive()
    }
}

struct Inner {
    cfg: PoolConfig,
    keys: Mutex<HashMap<PoolKey, KeyState>>,
    next_id: AtomicU64,
}

#[derive(Default)]
struct KeyState {
    conns: Vec<Entry>,
    /// Serialises connection creation for this key.
    create: Arc<tokio::sync::Mutex<()>>,
}

struct Entry {
    usage: Arc<Usage>,
    send: SendRequest<Bytes>,
    /// The connection task: aborting it drops the connection and resets
    /// its streams.
    driver: tokio::task::AbortHandle,
}

impl Pool {
    /// An empty pool.
    pub fn new(cfg: PoolConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                cfg,
                keys: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// The pool's settings.
    pub fn config(&self) -> &PoolConfig {
        &self.inner.cfg
    }

    /// Closes every pooled connection whose key `doomed` selects, with all
    /// its open streams (e.g. the peer's certificate was revoked). Returns
    /// how many connections were closed.
    pub fn close_where(&self, doomed: impl Fn(&PoolKey) -> bool) -> usize {
        let gone: Vec<KeyState> = {
            let mut keys = lock(&self.inner.keys);
            let doomed_keys: Vec<PoolKey> = keys.keys().filter(|k| doomed(k)).cloned().collect();
            doomed_keys.iter().filter_map(|k| keys.remove(k)).collect()
        };
        let mut n = 0;
        for e in gone.iter().flat_map(|s| &s.conns) {
            e.driver.abort();
            n += 1;
        }
        n
    }

    /// Opens a tunnel stream to `authority` on a pooled connection for
    /// `key`, calling `connector` (which must return a TLS stream to
    /// `key.dst` that negotiated ALPN `h2`) only when a new connection is
    /// needed.
    pub async fn connect<C, Fut, T>(
        &self,
        key: &PoolKey,
        authority: SocketAddr,
        headers: &ConnectHeaders,
        connector: C,
    ) -> Result<TunnelStream, Error>
    where
        C: FnOnce() -> Fut,
        Fut: Future<Output = std::io::Result<T>>,
        T: Io,
    {
        self.connect_with_early_data(key, authority, headers, Bytes::new(), connector).await
    }

    /// [`Pool::connect`] that also sends `early` (bytes the client already
    /// sent) in DATA frames right behind the request, without waiting for
    /// the response: saves a round trip for client-speaks-first protocols.
    /// The server reads them only after it accepted the request (the
    /// application never sees them on a refusal); on a refusal they are
    /// discarded with the stream.
    pub async fn connect_with_early_data<C, Fut, T>(
        &self,
        key: &PoolKey,
        authority: SocketAddr,
        headers: &ConnectHeaders,
        early: Bytes,
        connector: C,
    ) -> Result<TunnelStream, Error>
    where
        C: FnOnce() -> Fut,
        Fut: Future<Output = std::io::Result<T>>,
        T: Io,
    {
        let mut connector = Some(connector);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let (slot, send, fresh) = self.checkout(key, &mut connector).await?;
            let conn_id = slot.conn_id();
            match self.open_stream(slot, send, key.dst, authority, headers, &early).await {
                Ok(s) => return Ok(s),
                Err(OpenError::Final(e)) => return Err(e),
                Err(OpenError::ConnectionDead(e)) => {
                    self.evict_conn(key, conn_id);
                    if fresh || connector.is_none() || attempts >= 3 {
                        return Err(e);
                    }
                    tracing::debug!(dst = %key.dst, error = %e, "pooled tunnel connection was dead; retrying on a new one");
                }
            }
        }
    }

    /// Number of pooled connections for `key` (for tests and the admin API).
    pub fn connection_count(&self, key: &PoolKey) -> usize {
        lock(&self.inner.keys).get(key).map_or(0, |k| k.conns.len())
    }

    /// (connections, open streams) over the whole pool.
    pub fn stats(&self) -> (usize, usize) {
        let keys = lock(&self.inner.keys);
        keys.values().flat_map(|k| &k.conns).fold((0, 0), |(c, s), e| (c + 1, s + e.usage.active()))
    }

    fn evict_conn(&self, key: &PoolKey, id: u64) {
        evict_conn(&self.inner, key, id);
    }

    /// Claims a stream slot on a connection with room, creating one if
    /// needed. Returns whether the connection was created by this call.
    async fn checkout<C, Fut, T>(
        &self,
        key: &PoolKey,
        connector: &mut Option<C>,
    ) -> Result<(Slot, SendRequest<Bytes>, bool), Error>
    where
        C: FnOnce() -> Fut,
        Fut: Future<Output = std::io::Result<T>>,
        T: Io,
    {
        if let Some((slot, send)) = self.try_checkout(key) {
            return Ok((slot, send, false));
        }
        let create = lock(&self.inner.keys).entry(key.clone()).or_default().create.clone();
        let creating = create.lock().await;
        if let Some((slot, send)) = self.try_checkout(key) {
            return Ok((slot, send, false));
        }
        let Some(connector) = connector.take() else {
            return Err(Error::Connect {
                dst: key.dst,
                source: std::io::Error::other(
                    "the pooled connection failed and no connector is left to retry",
                ),
            });
        };
        match self.create(key, connector).await {
            Ok((slot, send)) => Ok((slot, send, true)),
            Err(e) => {
                drop(creating);
                drop(create);
                let mut keys = lock(&self.inner.keys);
                if keys
                    .get(key)
                    .is_some_and(|s| s.conns.is_empty() && Arc::strong_count(&s.create) == 1)
                {
                    keys.remove(key);
                }
                Err(e)
            }
        }
    }

    fn try_checkout(&self, key: &PoolKey) -> Option<(Slot, SendRequest<Bytes>)> {
        let max = self.inner.cfg.max_streams_per_conn.max(1);
        let keys = lock(&self.inner.keys);
        let state = keys.get(key)?;
        // Fill the busiest connection that has room, so spare connections
        // drain and idle out.
        let entry = state
            .conns
            .iter()
            .filter(|e| !e.usage.is_broken() && e.usage.active() < max)
            .max_by_key(|e| e.usage.active())?;
        let slot = entry.usage.try_claim(max)?;
        Some((slot, entry.send.clone()))
    }

    async fn create<C, Fut, T>(
        &self,
        key: &PoolKey,
        connector: C,
    ) -> Result<(Slot, SendRequest<Bytes>), Error>
    where
        C: FnOnce() -> Fut,
        Fut: Future<Output = std::io::Result<T>>,
        T: Io,
    {
        let cfg = &self.inner.cfg;
        let dst = key.dst;
        let timeout = |what| Error::Timeout { dst, what, after: cfg.connect_timeout };
        let io = tokio::time::timeout(cfg.connect_timeout, connector())
            .await
            .map_err(|_| timeout("opening the TLS connection"))?
            .map_err(|source| Error::Connect { dst, source })?;
        let (send, mut conn) = tokio::time::timeout(
            cfg.connect_timeout,
            h2::client::Builder::new()
                .initial_window_size(cfg.h2.stream_window)
                .initial_connection_window_size(cfg.h2.connection_window)
                .max_frame_size(cfg.h2.max_frame_size)
                .max_send_buffer_size(cfg.h2.max_send_buffer)
                .enable_push(false)
                .handshake::<_, Bytes>(io),
        )
        .await
        .map_err(|_| timeout("in the HTTP/2 handshake"))?
        .map_err(|source| Error::H2 { dst, source })?;

        let usage = Usage::new_claimed(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        let ping = conn.ping_pong();
        let driver = drive(conn, ping, usage.clone(), Arc::downgrade(&self.inner), key.clone());
        let span = tracing::debug_span!("hbone_conn", %dst, src = %key.src_identity, peer_identity = %key.dst_identity, id = usage.id);
        let driver = tokio::spawn(driver.instrument(span)).abort_handle();
        tracing::debug!(%dst, id = usage.id, "opened pooled tunnel connection");

        lock(&self.inner.keys).entry(key.clone()).or_default().conns.push(Entry {
            usage: usage.clone(),
            send: send.clone(),
            driver,
        });
        Ok((usage.first_slot(), send))
    }

    async fn open_stream(
        &self,
        slot: Slot,
        send: SendRequest<Bytes>,
        dst: SocketAddr,
        authority: SocketAddr,
        headers: &ConnectHeaders,
        early: &Bytes,
    ) -> Result<TunnelStream, OpenError> {
        let req = build_request(authority, headers).map_err(OpenError::Final)?;
        let dead = |source| OpenError::ConnectionDead(Error::H2 { dst, source });
        let mut send = send.ready().await.map_err(dead)?;
        let (response, mut stream) = send.send_request(req, false).map_err(dead)?;
        if !early.is_empty() {
            // Queued behind the HEADERS frame and written as the peer's
            // stream window allows (early data is small: one read).
            stream.send_data(early.clone(), false).map_err(dead)?;
        }
        let response = match tokio::time::timeout(self.inner.cfg.response_timeout, response).await {
            Err(_) => {
                return Err(OpenError::Final(Error::Timeout {
                    dst,
                    what: "waiting for the CONNECT response",
                    after: self.inner.cfg.response_timeout,
                }))
            }
            Ok(Err(e)) if retryable(&e) => return Err(dead(e)),
            Ok(Err(e)) => return Err(OpenError::Final(Error::H2 { dst, source: e })),
            Ok(Ok(r)) => r,
        };
        let status = response.status().as_u16();
        if status != Status::Ok.code() {
            return Err(OpenError::Final(Error::Refused { dst, status, reason: String::new() }));
        }
        let ext = ResponseExt::from_headers(response.headers());
        Ok(TunnelStream::new(stream, response.into_body(), Some(slot)).with_response(ext))
    }
}

enum OpenError {
    /// The pooled connection was dead before the request was processed.
    ConnectionDead(Error),
    Final(Error),
}

/// Errors that mean the request never reached a live peer, so a retry on a
/// new connection is safe.
fn retryable(e: &h2::Error) -> bool {
    e.is_io() || e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM)
}

/// Builds the CONNECT request (see docs/PROTOCOL.md).
fn build_request(authority: SocketAddr, headers: &ConnectHeaders) -> Result<Request<()>, Error> {
    let bad = |what: &str| Error::Config(format!("cannot send {what} as an HTTP header"));
    let mut b = Request::builder().method(Method::CONNECT).uri(authority.to_string());
    if let Some(f) = headers.forwarded_for {
        b = b.header("forwarded", format_forwarded_for(f));
    }
    if let Some(t) = &headers.traceparent {
        b = b
            .header("traceparent", http::HeaderValue::from_str(t).map_err(|_| bad("traceparent"))?);
    }
    if let Some(t) = &headers.baggage {
        b = b.header("baggage", http::HeaderValue::from_str(t).map_err(|_| bad("baggage"))?);
    }
    for (field, value) in headers.resume.fields() {
        b = b.header(
            field.header(),
            http::HeaderValue::from_str(&value).map_err(|_| bad(field.header()))?,
        );
    }
    b.body(()).map_err(|e| Error::Config(format!("invalid CONNECT request: {e}")))
}

fn evict_conn(inner: &Inner, key: &PoolKey, id: u64) {
    let mut keys = lock(&inner.keys);
    if let Some(state) = keys.get_mut(key) {
        state.conns.retain(|e| {
            if e.usage.id == id {
                e.usage.mark_broken();
                false
            } else {
                true
            }
        });
        if state.conns.is_empty() && Arc::strong_count(&state.create) == 1 {
            keys.remove(key);
        }
    }
}

/// Removes the connection from the pool if it has been idle long enough.
/// Done under the pool lock, which also guards slot checkout, so no stream
/// can be claimed on it concurrently.
fn evict_if_idle(inner: &Inner, key: &PoolKey, usage: &Usage) -> bool {
    let mut keys = lock(&inner.keys);
    if !usage.idle_for(inner.cfg.idle_timeout) {
        return false;
    }
    if let Some(state) = keys.get_mut(key) {
        state.conns.retain(|e| e.usage.id != usage.id);
        if state.conns.is_empty() && Arc::strong_count(&state.create) == 1 {
            keys.remove(key);
        }
    }
    true
}

/// Runs one pooled connection: polls HTTP/2, sends keepalive PINGs, closes
/// it when idle and evicts it when it fails.
async fn drive<T: Io>(
    conn: h2::client::Connection<T, Bytes>,
    ping: Option<h2::PingPong>,
    usage: Arc<Usage>,
    pool: Weak<Inner>,
    key: PoolKey,
) {
    let Some(cfg) = pool.upgrade().map(|p| p.cfg.clone()) else { return };
    let keepalive = ping_loop(ping, &cfg.h2, key.dst);
    tokio::pin!(keepalive);
    tokio::pin!(conn);
    let tick = (cfg.idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(30));
    let mut idle_check = tokio::time::interval(tick);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut idle = false;
    loop {
        tokio::select! {
            res = &mut conn => {
                match res {
                    Ok(()) if idle => tracing::debug!(id = usage.id, "idle tunnel connection closed"),
                    Ok(()) => tracing::debug!(id = usage.id, "tunnel connection closed by the peer"),
                    Err(e) => tracing::info!(dst = %key.dst, id = usage.id, error = %e, "tunnel connection failed; evicted from the pool"),
                }
                break;
            }
            res = &mut keepalive => {
                debug_assert!(res.is_err());
                break;
            }
            _ = idle_check.tick(), if !idle => {
                let Some(inner) = pool.upgrade() else {
                    // The pool is gone: finish the open streams, then close.
                    idle = true;
                    continue;
                };
                if evict_if_idle(&inner, &key, &usage) {
                    // With our request handle gone and no streams, h2 sends
                    // GOAWAY and the connection future completes.
                    idle = true;
                }
            }
        }
    }
    if let Some(inner) = pool.upgrade() {
        evict_conn(&inner, &key, usage.id);
    }
    usage.mark_broken();
    // Dropping `conn` here fails every stream still on it.
}
