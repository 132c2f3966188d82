//! QUIC tunnel server: accepts connections on a daemon-bound endpoint and
//! answers every stream's request header.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use tracing::Instrument;

use super::wire::{self, RequestHeader, REQUEST_PREFIX_LEN};
use super::{TunnelStream, ALPN};
use crate::error::Error;
use crate::ext::ResumeExt;
use crate::handler::{validate_authority, ConnectRequest, Handler, Refusal, Upstream};
use crate::splice::{splice_with_buffer, DEFAULT_SPLICE_BUFFER};

/// How the QUIC server treats its connections.
#[derive(Clone, Debug)]
pub struct ServerCtx {
    /// Answer 400 when the authority IP is not the address the connection
    /// arrived at (same rule as HBONE). On by default.
    pub check_authority_ip: bool,
    /// Limit for a client's QUIC handshake.
    pub handshake_timeout: Duration,
    /// Limit for a stream's request header to arrive.
    pub header_timeout: Duration,
    /// Largest copy buffer per direction when splicing.
    pub splice_buffer: usize,
    /// Called once per connection after the handshake; what it returns is
    /// kept until the connection ends (e.g. a registration that lets the
    /// caller close the connection when the peer's certificate is revoked).
    pub on_connection: Option<OnConnection>,
    /// Called when a client's handshake fails, with the client's address
    /// and the error (`None`: it timed out), so the caller can count the
    /// refusal; the connection is gone by then.
    pub on_refused: Option<OnRefused>,
}

/// A hook for every client whose QUIC handshake failed.
#[derive(Clone)]
pub struct OnRefused(pub Arc<RefusedHook>);

/// The function behind [`OnRefused`].
pub type RefusedHook = dyn Fn(SocketAddr, Option<&quinn::ConnectionError>) + Send + Sync;

impl std::fmt::Debug for OnRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnRefused")
    }
}

/// A hook for every accepted QUIC connection: gets the connection (which it
/// may keep a clone of, to close it later) and the peer's certificate chain;
/// returns a guard that is dropped when the connection ends.
#[derive(Clone)]
pub struct OnConnection(pub Arc<ConnectionHook>);

/// The function behind [`OnConnection`].
pub type ConnectionHook =
    dyn Fn(&quinn::Connection, &[CertificateDer<'static>]) -> Box<dyn Send> + Send + Sync;

impl std::fmt::Debug for OnConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnConnection")
    }
}

impl Default for ServerCtx {
    fn default() -> Self {
        Self {
            check_authority_ip: true,
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            splice_buffer: DEFAULT_SPLICE_BUFFER,
            on_connection: None,
            on_refused: None,
        }
    }
}

/// Serves tunnel streams on `endpoint` (bound by the daemon, with a server
/// configuration from [`super::server_config`]) until the endpoint closes.
/// Every connection and stream is owned by this future: dropping it ends them.
pub async fn serve(endpoint: quinn::Endpoint, ctx: ServerCtx, handler: Arc<dyn Handler>) {
    serve_until(endpoint, ctx, handler, std::future::pending()).await;
}

/// [`serve`] with graceful drain: when `drain` completes, new connections
/// are refused (clients fall back or go elsewhere), open connections go on;
/// returns when the last of them has ended (or the endpoint was closed).
pub async fn serve_until(
    endpoint: quinn::Endpoint,
    ctx: ServerCtx,
    handler: Arc<dyn Handler>,
    drain: impl std::future::Future<Output = ()>,
) {
    let ctx = Arc::new(ctx);
    let local = match endpoint.local_addr() {
        Ok(a) => a,
        Err(e) => {
            tracing::error!(error = %e, "QUIC endpoint has no local address; not serving");
            return;
        }
    };
    let mut conns = tokio::task::JoinSet::new();
    tokio::pin!(drain);
    let mut draining = false;
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept(), if !draining => match i {
                Some(i) => i,
                None => break,
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
            () = &mut drain, if !draining => {
                tracing::debug!(%local, "draining QUIC endpoint: new connections refused");
                draining = true;
                continue;
            }
            else => break,
        };
        let ctx = ctx.clone();
        let handler = handler.clone();
        let peer = incoming.remote_address();
        let span = tracing::debug_span!("quic_conn", %peer);
        conns.spawn(
            async move {
                if let Err(e) = serve_conn(incoming, local, ctx, handler).await {
                    tracing::info!(%peer, error = %e, "QUIC tunnel connection ended with an error");
                }
            }
            .instrument(span),
        );
    }
    // Endpoint closed, or draining with no connection left.
    while conns.join_next().await.is_some() {}
}

async fn serve_conn(
    incoming: quinn::Incoming,
    endpoint_addr: SocketAddr,
    ctx: Arc<ServerCtx>,
    handler: Arc<dyn Handler>,
) -> Result<(), Error> {
    let peer = incoming.remote_address();
    let refused = |e: Option<&quinn::ConnectionError>| {
        if let Some(hook) = &ctx.on_refused {
            (hook.0)(peer, e);
        }
    };
    let conn = match tokio::time::timeout(ctx.handshake_timeout, incoming).await {
        Err(_) => {
            refused(None);
            return Err(Error::Timeout {
                dst: peer,
                what: "waiting for the QUIC handshake",
                after: ctx.handshake_timeout,
            });
        }
        Ok(Err(e)) => {
            refused(Some(&e));
            return Err(Error::Quic { dst: peer, reason: e.to_string() });
        }
        Ok(Ok(c)) => c,
    };
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    if alpn.as_deref() != Some(ALPN) {
        conn.close(quinn::VarInt::from_u32(wire::CLOSE_NO_ERROR), b"wrong ALPN");
        return Err(Error::Protocol {
            peer,
            reason: format!("QUIC ALPN {alpn:?} is not tlsmesh-q1"),
        });
    }
    let peer_certs: Arc<[CertificateDer<'static>]> = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map_or_else(|| Arc::from(Vec::new()), |c| (*c).into());
    let _guard = ctx.on_connection.as_ref().map(|hook| (hook.0)(&conn, &peer_certs));
    // The address the packets arrived at (needs IP_PKTINFO, which quinn
    // enables on Linux); fall back to the endpoint's bound address.
    let local_addr =
        SocketAddr::new(conn.local_ip().unwrap_or(endpoint_addr.ip()), endpoint_addr.port());
    // The streams of this connection: dropped (aborted) with it.
    let mut streams = tokio::task::JoinSet::new();
    loop {
        let accepted = tokio::select! {
            a = conn.accept_bi() => a,
            Some(_) = streams.join_next(), if !streams.is_empty() => continue,
        };
        let (send, recv) = match accepted {
            Ok(s) => s,
            Err(
                quinn::ConnectionError::ApplicationClosed(_)
                | quinn::ConnectionError::ConnectionClosed(_)
                | quinn::ConnectionError::LocallyClosed,
            ) => return Ok(()),
            Err(e) => return Err(Error::Quic { dst: peer, reason: e.to_string() }),
        };
        let ctx = ctx.clone();
        let handler = handler.clone();
        let peer_certs = peer_certs.clone();
        let span = tracing::debug_span!("quic_stream", id = %send.id());
        streams.spawn(
            handle_stream(send, recv, peer, local_addr, peer_certs, ctx, handler).instrument(span),
        );
    }
}

/// Reads and validates one stream's request header.
async fn read_request(
    recv: &mut quinn::RecvStream,
    peer: SocketAddr,
    local_addr: SocketAddr,
    peer_certs: &[CertificateDer<'static>],
    ctx: &ServerCtx,
) -> Result<ConnectRequest, Refusal> {
    let read = async {
        let mut prefix = [0u8; REQUEST_PREFIX_LEN];
        recv.read_exact(&mut prefix).await.map_err(|e| Refusal::malformed(e.to_string()))?;
        let len =
            RequestHeader::decode_prefix(&prefix).map_err(|e| Refusal::malformed(e.to_string()))?;
        let mut fields = vec![0u8; len];
        recv.read_exact(&mut fields).await.map_err(|e| Refusal::malformed(e.to_string()))?;
        RequestHeader::decode_fields(&fields).map_err(|e| Refusal::malformed(e.to_string()))
    };
    let header = tokio::time::timeout(ctx.header_timeout, read)
        .await
        .map_err(|_| Refusal::malformed("request header did not arrive in time"))??;
    let authority = validate_authority(&header.authority, local_addr, ctx.check_authority_ip)?;
    let resume =
        ResumeExt::parse(|f| header.ext.iter().find(|(g, _)| *g == f).map(|(_, v)| v.clone()))
            .map_err(Refusal::malformed)?;
    Ok(ConnectRequest {
        resume,
        authority,
        forwarded_for: header.forwarded_for(),
        traceparent: header.traceparent,
        baggage: header.baggage,
        peer_certs: peer_certs.to_vec(),
        local_addr,
        peer_addr: peer,
    })
}

async fn refuse(mut send: quinn::SendStream, mut recv: quinn::RecvStream, refusal: &Refusal) {
    let _ = recv.stop(quinn::VarInt::from_u32(wire::STREAM_CANCEL));
    let reply = wire::encode_response(refusal.status.code(), &refusal.reason);
    if send.write_all(&reply).await.is_ok() {
        let _ = send.finish();
    }
}

async fn handle_stream(
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    peer: SocketAddr,
    local_addr: SocketAddr,
    peer_certs: Arc<[CertificateDer<'static>]>,
    ctx: Arc<ServerCtx>,
    handler: Arc<dyn Handler>,
) {
    let request = match read_request(&mut recv, peer, local_addr, &peer_certs, &ctx).await {
        Ok(r) => r,
        Err(refusal) => {
            tracing::info!(%peer, status = refusal.status.code(), reason = %refusal.reason, "refused malformed QUIC tunnel request");
            refuse(send, recv, &refusal).await;
            return;
        }
    };
    let authority = request.authority;
    let accepted = match handler.connect(request).await {
        Ok(a) => a,
        Err(refusal) => {
            tracing::debug!(%peer, %authority, status = refusal.status.code(), reason = %refusal.reason, "QUIC tunnel request refused");
            refuse(send, recv, &refusal).await;
            return;
        }
    };
    let mut tunnel = TunnelStream::new(send, recv, None);
    let reply = wire::encode_response(200, &accepted.ext.to_reason());
    let outcome = match tunnel.send.write_all(&reply).await {
        Ok(()) => match accepted.upstream {
            Upstream::Splice(mut upstream) => {
                splice_with_buffer(&mut tunnel, &mut upstream, ctx.splice_buffer).await
            }
            Upstream::Attach(take) => {
                take(Box::new(tunnel));
                return;
            }
            Upstream::Answer => {
                let _ = tunnel.recv.stop(quinn::VarInt::from_u32(wire::STREAM_CANCEL));
                tunnel.read_eof = true;
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut tunnel).await;
                return;
            }
        },
        Err(e) => crate::splice::SpliceOutcome { a_to_b: 0, b_to_a: 0, error: Some(e.into()) },
    };
    if let Some(e) = &outcome.error {
        tracing::debug!(%peer, %authority, error = %e, "QUIC tunnel stream ended with an error");
    }
    if let Some(cb) = accepted.on_close {
        cb(&outcome);
    }
}
