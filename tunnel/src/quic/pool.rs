//! QUIC client pool: one bidirectional stream per tunnelled connection,
//! multiplexed over one QUIC connection per [`PoolKey`]. The server's
//! `max_concurrent_bidi_streams` bounds the streams per connection; when a
//! connection carries [`QuicConfig::max_streams`] streams (the limit tlsmesh
//! servers advertise), a further connection is opened instead of waiting,
//! so long-lived streams cannot starve new ones.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tracing::Instrument;

use super::wire::{self, RequestHeader, RESPONSE_PREFIX_LEN};
use super::{client_config, QuicConfig, TunnelStream};
use crate::error::Error;
use crate::handler::{ConnectHeaders, PoolKey, Status};
use crate::usage::{lock, Slot, Usage};

/// How to reach a destination over QUIC: the daemon's local endpoint, the
/// source workload's TLS client configuration and the SNI name (chosen by
/// the identity crate; see docs/IDENTITY.md).
#[derive(Clone, Debug)]
pub struct Dial {
    pub endpoint: quinn::Endpoint,
    pub tls: Arc<rustls::ClientConfig>,
    pub server_name: String,
}

/// A pool of QUIC tunnel connections. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("quic::Pool").field("config", &self.inner.cfg).finish_non_exhaustive()
    }
}

struct Inner {
    cfg: QuicConfig,
    keys: Mutex<HashMap<PoolKey, KeyState>>,
    next_id: AtomicU64,
}

/// One pooled QUIC connection's path (see [`Pool::paths`]).
#[derive(Clone, Debug, serde::Serialize)]
pub struct PathView {
    pub peer: SocketAddr,
    pub streams: usize,
    pub rtt_us: u64,
    pub cwnd: u64,
    /// The datagram size in use (MTU discovery raises it from 1,200).
    pub mtu: u16,
    pub sent_packets: u64,
    pub lost_packets: u64,
    pub congestion_events: u64,
}

impl PathView {
    fn of(c: &quinn::Connection, streams: usize) -> Self {
        let p = c.stats().path;
        Self {
            peer: c.remote_address(),
            streams,
            rtt_us: u64::try_from(p.rtt.as_micros()).unwrap_or(u64::MAX),
            cwnd: p.cwnd,
            mtu: p.current_mtu,
            sent_packets: p.sent_packets,
            lost_packets: p.lost_packets,
            congestion_events: p.congestion_events,
        }
    }
}

#[derive(Default)]
struct KeyState {
    conns: Vec<(Arc<Usage>, quinn::Connection)>,
    create: Arc<tokio::sync::Mutex<()>>,
}

impl Pool {
    /// An empty pool.
    pub fn new(cfg: QuicConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                cfg,
                keys: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// The pool's settings.
    pub fn config(&self) -> &QuicConfig {
        &self.inner.cfg
    }

    /// Number of pooled connections for `key`.
    pub fn connection_count(&self, key: &PoolKey) -> usize {
        lock(&self.inner.keys).get(key).map_or(0, |k| k.conns.len())
    }

    /// (connections, open streams) over the whole pool.
    pub fn stats(&self) -> (usize, usize) {
        let keys = lock(&self.inner.keys);
        keys.values().flat_map(|k| &k.conns).fold((0, 0), |(c, s), (u, _)| (c + 1, s + u.active()))
    }

    /// The path of every pooled connection as quinn sees it: what an
    /// operator (and the benchmark) reads to tell a lossy or mis-sized path
    /// from a slow daemon (`/config_dump` `pool.quic_paths`).
    pub fn paths(&self) -> Vec<PathView> {
        let keys = lock(&self.inner.keys);
        keys.values().flat_map(|k| &k.conns).map(|(u, c)| PathView::of(c, u.active())).collect()
    }

    /// Closes every pooled connection whose key `doomed` selects, with all
    /// its open streams (e.g. the peer's certificate was revoked). Returns
    /// how many connections were closed.
    pub fn close_where(&self, doomed: impl Fn(&PoolKey) -> bool, reason: &str) -> usize {
        let gone: Vec<KeyState> = {
            let mut keys = lock(&self.inner.keys);
            let doomed_keys: Vec<PoolKey> = keys.keys().filter(|k| doomed(k)).cloned().collect();
            doomed_keys.iter().filter_map(|k| keys.remove(k)).collect()
        };
        let mut n = 0;
        for (_, conn) in gone.iter().flat_map(|s| &s.conns) {
            conn.close(quinn::VarInt::from_u32(0), reason.as_bytes());
            n += 1;
        }
        n
    }

    /// Opens a tunnel stream to `authority` over the pooled QUIC connection
    /// for `key` (to `key.dst` over UDP), handshaking first if needed.
    /// Fails with [`Error::QuicUnreachable`] when the handshake does not
    /// complete in [`QuicConfig::handshake_timeout`]: use TCP then.
    pub async fn connect(
        &self,
        key: &PoolKey,
        authority: SocketAddr,
        headers: &ConnectHeaders,
        dial: &Dial,
    ) -> Result<TunnelStream, Error> {
        let header = RequestHeader::new(authority, headers)
            .encode()
            .map_err(|e| Error::Config(format!("cannot encode the tunnel header: {e}")))?;
        let mut retried = false;
        loop {
            let (slot, conn, fresh) = self.checkout(key, dial).await?;
            match self.open_stream(slot, &conn, key.dst, &header).await {
                Ok(s) => return Ok(s),
                Err(OpenError::Final(e)) => return Err(e),
                Err(OpenError::ConnectionDead(e)) => {
                    evict_conn(&self.inner, key, conn.stable_id());
                    if fresh || retried {
                        return Err(e);
                    }
                    retried = true;
                    tracing::debug!(dst = %key.dst, error = %e, "pooled QUIC connection was dead; retrying on a new one");
                }
            }
        }
    }

    async fn checkout(
        &self,
        key: &PoolKey,
        dial: &Dial,
    ) -> Result<(Slot, quinn::Connection, bool), Error> {
        if let Some((slot, conn)) = self.try_checkout(key) {
            return Ok((slot, conn, false));
        }
        let create = lock(&self.inner.keys).entry(key.clone()).or_default().create.clone();
        let creating = create.lock().await;
        if let Some((slot, conn)) = self.try_checkout(key) {
            return Ok((slot, conn, false));
        }
        let conn = match self.handshake(key.dst, dial).await {
            Ok(c) => c,
            Err(e) => {
                drop(creating);
                drop(create);
                forget_key_if_unused(&self.inner, key);
                return Err(e);
            }
        };
        let usage = Usage::new_claimed(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        lock(&self.inner.keys)
            .entry(key.clone())
            .or_default()
            .conns
            .push((usage.clone(), conn.clone()));
        let span = tracing::debug_span!("quic_conn", dst = %key.dst, src = %key.src_identity, peer_identity = %key.dst_identity);
        tokio::spawn(
            watch(conn.clone(), usage.clone(), Arc::downgrade(&self.inner), key.clone())
                .instrument(span),
        );
        Ok((usage.first_slot(), conn, true))
    }

    fn try_checkout(&self, key: &PoolKey) -> Option<(Slot, quinn::Connection)> {
        let max = usize::try_from(self.inner.cfg.max_streams).unwrap_or(usize::MAX).max(1);
        let keys = lock(&self.inner.keys);
        // Fill the busiest connection with room, so spare ones idle out.
        let (usage, conn) = keys
            .get(key)?
            .conns
            .iter()
            .filter(|(u, c)| !u.is_broken() && u.active() < max && c.close_reason().is_none())
            .max_by_key(|(u, _)| u.active())?;
        let slot = usage.try_claim(max)?;
        Some((slot, conn.clone()))
    }

    async fn handshake(&self, dst: SocketAddr, dial: &Dial) -> Result<quinn::Connection, Error> {
        let cfg = &self.inner.cfg;
        let client = client_config(&dial.tls, cfg)?;
        let unreachable = |reason: String| Error::QuicUnreachable { dst, reason };
        let connecting =
            dial.endpoint.connect_with(client, dst, &dial.server_name).map_err(|e| match e {
                quinn::ConnectError::InvalidServerName(n) => {
                    Error::Config(format!("invalid QUIC server name {n:?}"))
                }
                e => unreachable(e.to_string()),
            })?;
        match tokio::time::timeout(cfg.handshake_timeout, connecting).await {
            Err(_) => Err(unreachable(format!(
                "no QUIC handshake answer within {:?}",
                cfg.handshake_timeout
            ))),
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(e)) => Err(classify_handshake_error(dst, &e)),
        }
    }

    async fn open_stream(
        &self,
        slot: Slot,
        conn: &quinn::Connection,
        dst: SocketAddr,
        header: &[u8],
    ) -> Result<TunnelStream, OpenError> {
        let dead = |reason: String| OpenError::ConnectionDead(Error::Quic { dst, reason });
        // Waits only if the peer advertises fewer streams than we assume.
        let response_timeout = self.inner.cfg.response_timeout;
        let (send, recv) = tokio::time::timeout(response_timeout, conn.open_bi())
            .await
            .map_err(|_| {
                OpenError::Final(Error::Timeout {
                    dst,
                    what: "waiting for a free QUIC stream (peer stream limit)",
                    after: response_timeout,
                })
            })?
            .map_err(|e| dead(e.to_string()))?;
        let mut stream = TunnelStream::new(send, recv, Some(slot));
        stream.send.write_all(header).await.map_err(|e| dead(e.to_string()))?;
        let read = async {
            let mut prefix = [0u8; RESPONSE_PREFIX_LEN];
            stream.recv.read_exact(&mut prefix).await.map_err(|e| e.to_string())?;
            let (status, len) = wire::decode_response_prefix(&prefix).map_err(|e| e.to_string())?;
            let mut reason = vec![0u8; len];
            stream.recv.read_exact(&mut reason).await.map_err(|e| e.to_string())?;
            Ok::<_, String>((status, String::from_utf8_lossy(&reason).into_owned()))
        };
        let (status, reason) = match tokio::time::timeout(response_timeout, read).await {
            Err(_) => {
                return Err(OpenError::Final(Error::Timeout {
                    dst,
                    what: "waiting for the QUIC tunnel response",
                    after: response_timeout,
                }))
            }
            Ok(Err(reason)) if conn.close_reason().is_some() => return Err(dead(reason)),
            Ok(Err(reason)) => return Err(OpenError::Final(Error::Quic { dst, reason })),
            Ok(Ok(r)) => r,
        };
        if status != Status::Ok.code() {
            return Err(OpenError::Final(Error::Refused { dst, status, reason }));
        }
        stream.response = crate::ext::ResponseExt::from_reason(&reason);
        Ok(stream)
    }
}

enum OpenError {
    ConnectionDead(Error),
    Final(Error),
}

/// Handshake failures that mean "no tlsmesh QUIC peer there" become
/// [`Error::QuicUnreachable`]; others (e.g. a certificate rejected) are
/// reported as they are, since TCP would fail the same way.
fn classify_handshake_error(dst: SocketAddr, e: &quinn::ConnectionError) -> Error {
    use quinn::ConnectionError as E;
    // TLS alert 120 (no_application_protocol) as a QUIC crypto error.
    let no_alpn = quinn::TransportErrorCode::crypto(120);
    match e {
        E::TimedOut | E::VersionMismatch | E::Reset => {
            Error::QuicUnreachable { dst, reason: e.to_string() }
        }
        E::TransportError(t) if t.code == no_alpn => {
            Error::QuicUnreachable { dst, reason: e.to_string() }
        }
        E::ConnectionClosed(c) if c.error_code == no_alpn => {
            Error::QuicUnreachable { dst, reason: e.to_string() }
        }
        _ => Error::Quic { dst, reason: format!("QUIC handshake failed: {e}") },
    }
}

fn evict_conn(inner: &Inner, key: &PoolKey, stable_id: usize) {
    let mut keys = lock(&inner.keys);
    if let Some(state) = keys.get_mut(key) {
        state.conns.retain(|(u, c)| {
            let hit = c.stable_id() == stable_id;
            if hit {
                u.mark_broken();
            }
            !hit
        });
        if state.conns.is_empty() && Arc::strong_count(&state.create) == 1 {
            keys.remove(key);
        }
    }
}

/// Drops a key's bookkeeping when it has no connection and nobody is
/// creating one (after a failed handshake).
fn forget_key_if_unused(inner: &Inner, key: &PoolKey) {
    let mut keys = lock(&inner.keys);
    if keys.get(key).is_some_and(|s| s.conns.is_empty() && Arc::strong_count(&s.create) == 1) {
        keys.remove(key);
    }
}

/// Removes the connection from the pool if it has been idle long enough,
/// under the pool lock that also guards stream checkout.
fn evict_if_idle(inner: &Inner, key: &PoolKey, usage: &Arc<Usage>, timeout: Duration) -> bool {
    let mut keys = lock(&inner.keys);
    if !usage.idle_for(timeout) {
        return false;
    }
    if let Some(state) = keys.get_mut(key) {
        state.conns.retain(|(u, _)| !Arc::ptr_eq(u, usage));
        if state.conns.is_empty() && Arc::strong_count(&state.create) == 1 {
            keys.remove(key);
        }
    }
    usage.mark_broken();
    true
}

/// Evicts the connection when it closes, and closes it when idle.
async fn watch(conn: quinn::Connection, usage: Arc<Usage>, pool: Weak<Inner>, key: PoolKey) {
    let Some(cfg) = pool.upgrade().map(|p| p.cfg.clone()) else { return };
    let tick =
        (cfg.pool_idle_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(30));
    let mut idle_check = tokio::time::interval(tick);
    idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            reason = conn.closed() => {
                tracing::debug!(dst = %key.dst, %reason, "QUIC tunnel connection closed; evicted from the pool");
                break;
            }
            _ = idle_check.tick() => {
                let Some(inner) = pool.upgrade() else { return };
                if evict_if_idle(&inner, &key, &usage, cfg.pool_idle_timeout) {
                    conn.close(quinn::VarInt::from_u32(wire::CLOSE_NO_ERROR), b"idle");
                    tracing::debug!(dst = %key.dst, "idle QUIC tunnel connection closed");
                    break;
                }
            }
        }
    }
    if let Some(inner) = pool.upgrade() {
        evict_conn(&inner, &key, conn.stable_id());
    }
}
