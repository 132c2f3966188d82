//! HBONE server: answers every CONNECT stream of one TLS connection.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use http::{Method, Request, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use super::{ping_loop, H2Config, TunnelStream, ALPN};
use crate::error::Error;
use crate::ext::{Field, ResumeExt};
use crate::handler::{
    parse_forwarded_for, validate_authority, ConnectRequest, Handler, Refusal, Status, Upstream,
};
use crate::splice::{splice_with_buffer, DEFAULT_SPLICE_BUFFER};

/// What the server knows about one accepted tunnel connection, and how to
/// treat it.
#[derive(Clone, Debug)]
pub struct ServerCtx {
    /// The address the connection arrived at (the destination pod's IP:15008).
    pub local_addr: SocketAddr,
    /// The connecting peer.
    pub peer_addr: SocketAddr,
    /// Answer 400 when a CONNECT's authority IP is not `local_addr`'s IP
    /// (ztunnel's rule). On by default; tests of the client that send
    /// other authorities turn it off.
    pub check_authority_ip: bool,
    /// HTTP/2 settings.
    pub h2: H2Config,
    /// Largest copy buffer per direction when splicing.
    pub splice_buffer: usize,
}

impl ServerCtx {
    /// A context with default settings and the authority IP check on.
    pub fn new(local_addr: SocketAddr, peer_addr: SocketAddr) -> Self {
        Self {
            local_addr,
            peer_addr,
            check_authority_ip: true,
            h2: H2Config::default(),
            splice_buffer: DEFAULT_SPLICE_BUFFER,
        }
    }
}

/// Serves all CONNECT streams of one server-side TLS connection until the
/// peer closes it (`Ok`) or it fails. Each stream runs in its own task,
/// owned by this future: when it returns or is dropped, every stream of the
/// connection ends with it. The connection's peer certificate chain is
/// passed to the handler with every request.
pub async fn serve<S>(
    tls: tokio_rustls::server::TlsStream<S>,
    ctx: ServerCtx,
    handler: Arc<dyn Handler>,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    serve_until(tls, ctx, handler, std::future::pending()).await
}

/// [`serve`] with graceful drain: when `drain` completes, the server sends
/// GOAWAY (the client pool then opens new streams elsewhere), lets the open
/// streams finish, and returns when the connection is closed.
pub async fn serve_until<S>(
    tls: tokio_rustls::server::TlsStream<S>,
    ctx: ServerCtx,
    handler: Arc<dyn Handler>,
    drain: impl std::future::Future<Output = ()>,
) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (_, session) = tls.get_ref();
    if let Some(alpn) = session.alpn_protocol() {
        if alpn != ALPN {
            return Err(Error::Protocol {
                peer: ctx.peer_addr,
                reason: format!(
                    "peer negotiated ALPN {:?}, HBONE needs \"h2\"",
                    String::from_utf8_lossy(alpn)
                ),
            });
        }
    }
    let peer_certs: Arc<[_]> =
        session.peer_certificates().map(<[_]>::to_vec).unwrap_or_default().into();

    let peer_addr = ctx.peer_addr;
    let h2_err = |source| Error::H2 { dst: peer_addr, source };
    let mut conn = h2::server::Builder::new()
        .initial_window_size(ctx.h2.stream_window)
        .initial_connection_window_size(ctx.h2.connection_window)
        .max_frame_size(ctx.h2.max_frame_size)
        .max_send_buffer_size(ctx.h2.max_send_buffer)
        .max_concurrent_streams(ctx.h2.max_concurrent_streams)
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(h2_err)?;
    let ping = conn.ping_pong();
    let ctx = Arc::new(ctx);
    let keepalive = ping_loop(ping, &ctx.h2, ctx.peer_addr);
    tokio::pin!(keepalive);
    tokio::pin!(drain);
    let mut draining = false;
    // The streams of this connection: dropped (aborted) with it.
    let mut streams = tokio::task::JoinSet::new();

    loop {
        tokio::select! {
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
            next = conn.accept() => match next {
                None => return Ok(()),
                Some(Err(e)) => {
                    // A clean close by the peer surfaces as an I/O EOF here.
                    if e.is_io() || e.is_go_away() {
                        tracing::debug!(peer = %ctx.peer_addr, error = %e, "tunnel connection closed");
                        return Ok(());
                    }
                    return Err(h2_err(e));
                }
                Some(Ok((req, respond))) => {
                    let ctx = ctx.clone();
                    let handler = handler.clone();
                    let peer_certs = peer_certs.clone();
                    let span = tracing::debug_span!("hbone_stream", peer = %ctx.peer_addr, authority = ?req.uri().authority().map(http::uri::Authority::as_str));
                    streams.spawn(
                        handle_stream(req, respond, ctx, handler, peer_certs).instrument(span),
                    );
                }
            },
            () = &mut drain, if !draining => {
                tracing::debug!(peer = %ctx.peer_addr, "draining tunnel connection (GOAWAY)");
                conn.graceful_shutdown();
                draining = true;
            }
            res = &mut keepalive => {
                if res.is_err() {
                    // Dropping `conn` errors every stream on it.
                    return Err(Error::Timeout {
                        dst: ctx.peer_addr,
                        what: "waiting for an HTTP/2 keepalive PONG",
                        after: ctx.h2.keepalive_timeout,
                    });
                }
            }
        }
    }
}

/// Parses and validates one request into a [`ConnectRequest`].
fn parse_request(
    req: &Request<h2::RecvStream>,
    ctx: &ServerCtx,
    peer_certs: &[rustls_pki_types::CertificateDer<'static>],
) -> Result<ConnectRequest, Refusal> {
    if req.method() != Method::CONNECT {
        return Err(Refusal::malformed(format!("method {} is not CONNECT", req.method())));
    }
    let Some(authority) = req.uri().authority() else {
        return Err(Refusal::malformed("CONNECT without :authority"));
    };
    let authority = validate_authority(authority.as_str(), ctx.local_addr, ctx.check_authority_ip)?;
    let header = |name: &str| -> Result<Option<String>, Refusal> {
        match req.headers().get(name) {
            None => Ok(None),
            Some(v) => v
                .to_str()
                .map(|s| Some(s.to_owned()))
                .map_err(|_| Refusal::malformed(format!("header {name} is not visible ASCII"))),
        }
    };
    let forwarded_for = header("forwarded")?.as_deref().and_then(parse_forwarded_for);
    let mut fields = Vec::new();
    for f in Field::ALL {
        fields.push((f, header(f.header())?));
    }
    let resume =
        ResumeExt::parse(|f| fields.iter().find(|(g, _)| *g == f).and_then(|(_, v)| v.clone()))
            .map_err(Refusal::malformed)?;
    Ok(ConnectRequest {
        resume,
        authority,
        forwarded_for,
        traceparent: header("traceparent")?,
        baggage: header("baggage")?,
        peer_certs: peer_certs.to_vec(),
        local_addr: ctx.local_addr,
        peer_addr: ctx.peer_addr,
    })
}

fn respond_refusal(mut respond: SendResponse<Bytes>, refusal: &Refusal) {
    let status = StatusCode::from_u16(refusal.status.code()).unwrap_or(StatusCode::BAD_REQUEST);
    let mut resp = Response::new(());
    *resp.status_mut() = status;
    let empty = refusal.reason.is_empty();
    if !empty {
        resp.headers_mut()
            .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    }
    match respond.send_response(resp, empty) {
        Ok(mut body) if !empty => {
            // The reason is best effort: it fits in the initial window.
            let _ = body.send_data(Bytes::from(refusal.reason.clone()), true);
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "could not send the refusal"),
    }
}

async fn handle_stream(
    req: Request<h2::RecvStream>,
    mut respond: SendResponse<Bytes>,
    ctx: Arc<ServerCtx>,
    handler: Arc<dyn Handler>,
    peer_certs: Arc<[rustls_pki_types::CertificateDer<'static>]>,
) {
    let request = match parse_request(&req, &ctx, &peer_certs) {
        Ok(r) => r,
        Err(refusal) => {
            tracing::info!(peer = %ctx.peer_addr, status = refusal.status.code(), reason = %refusal.reason, "refused malformed tunnel request");
            respond_refusal(respond, &refusal);
            return;
        }
    };
    let authority = request.authority;
    // A client that resets the stream before the answer (a QUIESCE it
    // gave up waiting for, a connect it abandoned) drops the handler's
    // work: nothing is done for a request nobody waits for.
    let connecting = tokio::select! {
        biased;
        reason = std::future::poll_fn(|cx| respond.poll_reset(cx)) => Err(reason),
        r = handler.connect(request) => Ok(r),
    };
    let connected = match connecting {
        Ok(r) => r,
        Err(reason) => {
            tracing::debug!(peer = %ctx.peer_addr, %authority, reset = ?reason, "client reset the stream before the answer");
            return;
        }
    };
    let accepted = match connected {
        Ok(a) => a,
        Err(refusal) => {
            tracing::debug!(peer = %ctx.peer_addr, %authority, status = refusal.status.code(), reason = %refusal.reason, "tunnel request refused");
            respond_refusal(respond, &refusal);
            return;
        }
    };
    let mut ok = Response::new(());
    for (name, value) in accepted.ext.headers() {
        if let Ok(v) = http::HeaderValue::from_str(&value) {
            ok.headers_mut().insert(name, v);
        }
    }
    let answer_only = matches!(accepted.upstream, Upstream::Answer);
    let send = match respond.send_response(ok, answer_only) {
        Ok(s) => s,
        Err(e) => {
            // The client gave up (reset) while we were connecting upstream.
            tracing::debug!(peer = %ctx.peer_addr, %authority, error = %e, "client went away before the 200");
            if let Some(cb) = accepted.on_close {
                cb(&crate::splice::SpliceOutcome {
                    a_to_b: 0,
                    b_to_a: 0,
                    error: Some(crate::error::h2_to_io(e)),
                });
            }
            return;
        }
    };
    debug_assert_eq!(Status::Ok.code(), 200);
    let mut tunnel = TunnelStream::new(send, req.into_body(), None);
    let mut upstream = match accepted.upstream {
        Upstream::Splice(s) => s,
        Upstream::Attach(take) => {
            take(Box::new(tunnel));
            return;
        }
        Upstream::Answer => return,
    };
    let outcome = splice_with_buffer(&mut tunnel, &mut upstream, ctx.splice_buffer).await;
    if let Some(e) = &outcome.error {
        tracing::debug!(peer = %ctx.peer_addr, %authority, error = %e, "tunnel stream ended with an error");
        tunnel.reset();
    }
    if let Some(cb) = accepted.on_close {
        cb(&outcome);
    }
}
