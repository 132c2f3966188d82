//! The per-pod tunnel servers: HBONE on TCP 15008 and QUIC on UDP 15008 at
//! the pod's addresses, inside its netns. Every task they run — accept
//! loops, one per tunnel connection, one per stream (owned by the tunnel
//! crate's server) — lives in the pod's scope, so removing the pod ends
//! them. On drain, HBONE connections get GOAWAY and QUIC endpoints refuse
//! new connections while the open ones finish.
//!
//! A QUIC socket that cannot be bound (a daemon being replaced still holds
//! the port) is retried with backoff until it can: UDP `SO_REUSEPORT` would
//! hash some of the old daemon's QUIC flows to the new socket, which does
//! not know them and would answer with stateless resets. Peers fall back to
//! HBONE meanwhile.

use std::{
    io,
    net::{SocketAddr, UdpSocket},
    sync::Arc,
    time::Duration,
};

use tlsmesh_identity::{tls, Identity};
use tlsmesh_tunnel::{
    hbone, quic, Accepted, ConnectRequest, Handler, Refusal, ResponseExt, ResumeExt,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    registry::{Closer, Tracked, TunnelView},
    Mesh,
};
use crate::{
    accept::Backoff,
    authz::{self, Denial},
    certs::workload_id,
    config::Transport,
    conns::{ConnInfo, ConnTable, Direction, Failure, PausedStream, Route, StreamRole, Transfer},
    scope::Drain,
    state::{NodeState, PodEntry},
    stats::Stats,
};

/// What the tunnel servers need (and nothing more).
#[derive(Debug, Clone)]
pub struct Inbound {
    /// Node state (inventory for source addresses, deny records).
    pub state: Arc<NodeState>,
    /// The connection table.
    pub conns: ConnTable,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Identities, policy, registry.
    pub mesh: Arc<Mesh>,
    /// The daemon's drain signal.
    pub drain: Drain,
}

/// Longest a tunnel TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a stream waits for this node to learn the claimed client address
/// (`forwarded: for`) when no pod has it yet: a pod just started on another
/// node connects before the API server has published its address to this
/// node's watch. Then the address is checked as always; after the bound the
/// stream goes on with the peer node as the source (not the claim).
const UNKNOWN_CLIENT_WAIT: Duration = Duration::from_secs(3);

/// Starts `pod`'s tunnel servers in its scope: HBONE on each TCP listener,
/// QUIC on each address of `udp` (with its socket, or `None` when the bind
/// failed and is to be retried).
pub fn serve_pod(
    ctx: &Inbound,
    pod: &Arc<PodEntry>,
    tcp: Vec<tokio::net::TcpListener>,
    udp: Vec<(SocketAddr, Option<UdpSocket>)>,
) -> Result<(), super::MeshError> {
    let pod_id = workload_id(&ctx.mesh.certs.trust_domain, &pod.pod)?;
    let server_tls = ctx.mesh.certs.server_config(&pod_id)?;
    let handler = |transport: Transport| -> Arc<dyn Handler> {
        let (ctx, pod) = (ctx.clone(), Arc::clone(pod));
        Arc::new(move |req: ConnectRequest| {
            let (ctx, pod) = (ctx.clone(), Arc::clone(&pod));
            async move { handle(&ctx, &pod, transport, req).await }
        })
    };
    let (hbone_handler, quic_handler) = (handler(Transport::Tcp), handler(Transport::Quic));
    for l in tcp {
        pod.scope.spawn(tcp_accept_loop(
            ctx.clone(),
            Arc::clone(pod),
            l,
            Arc::clone(&server_tls),
            Arc::clone(&hbone_handler),
        ));
    }
    for (addr, sock) in udp {
        let qcfg = quic::server_config(&server_tls, &ctx.mesh.client.quic().config().clone())?;
        pod.scope.spawn(quic_server(
            ctx.clone(),
            Arc::clone(pod),
            addr,
            sock,
            qcfg,
            Arc::clone(&quic_handler),
        ));
    }
    Ok(())
}

async fn tcp_accept_loop(
    ctx: Inbound,
    pod: Arc<PodEntry>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<dyn Handler>,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let mut backoff = Backoff::default();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = ctx.drain.signalled() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => {
                backoff.reset();
                x
            }
            Err(e) => {
                backoff.failed(&pod.key(), "tunnel", &e).await;
                continue;
            }
        };
        let (ctx2, pod2, acceptor, handler) =
            (ctx.clone(), Arc::clone(&pod), acceptor.clone(), Arc::clone(&handler));
        pod.scope.spawn(async move {
            serve_tcp_conn(ctx2, pod2, tcp, peer, acceptor, handler).await;
        });
    }
}

/// One tunnel TCP connection: handshake, registration for revocation, then
/// HBONE until the peer closes it, the daemon drains (GOAWAY), the peer is
/// revoked, or the pod's scope ends.
async fn serve_tcp_conn(
    ctx: Inbound,
    pod: Arc<PodEntry>,
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    handler: Arc<dyn Handler>,
) {
    let _ = tcp.set_nodelay(true);
    let Ok(local) = tcp.local_addr() else { return };
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(t)) => t,
        Ok(Err(e)) => {
            Stats::inc(&ctx.stats.inbound_tunnel_refused);
            let why = e
                .get_ref()
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                .map_or(Failure::TlsFailed, tls_failure);
            ctx.conns.refused(&handshake_info(&pod, peer, local, Transport::Tcp), why);
            warn!(pod = %pod.key(), %peer, reason = %tls_reason(&e), "tunnel handshake refused");
            return;
        }
        Err(_) => {
            Stats::inc(&ctx.stats.inbound_tunnel_refused);
            ctx.conns
                .refused(&handshake_info(&pod, peer, local, Transport::Tcp), Failure::TlsFailed);
            warn!(pod = %pod.key(), %peer, "tunnel handshake timed out");
            return;
        }
    };
    let revoked = CancellationToken::new();
    let _tracked = {
        let revoked = revoked.clone();
        track_inbound(
            &ctx.mesh,
            tls.get_ref().1.peer_certificates().unwrap_or_default(),
            "tcp",
            pod.key(),
            peer,
            Box::new(move || revoked.cancel()),
        )
    };
    let serve =
        hbone::serve_until(tls, hbone::ServerCtx::new(local, peer), handler, ctx.drain.signal());
    tokio::select! {
        r = serve => if let Err(e) = r {
            debug!(%peer, error = %e, "tunnel connection ended");
        },
        () = revoked.cancelled() => {}
    }
}

/// Closes the endpoint (`CONNECTION_CLOSE` to every peer) when dropped: the
/// pod's scope ended.
struct CloseOnDrop(quinn::Endpoint);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close(0u32.into(), b"pod removed");
    }
}

async fn quic_server(
    ctx: Inbound,
    pod: Arc<PodEntry>,
    addr: SocketAddr,
    sock: Option<UdpSocket>,
    qcfg: quinn::ServerConfig,
    handler: Arc<dyn Handler>,
) {
    let sock = match sock {
        Some(s) => s,
        None => match bind_with_retry(&ctx, &pod, addr).await {
            Some(s) => s,
            None => return,
        },
    };
    if let Err(e) = quic::tune_udp_socket(&sock) {
        warn!(pod = %pod.key(), error = %e, "cannot raise the QUIC socket buffers");
    }
    let endpoint = match quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(qcfg),
        sock,
        Arc::new(quinn::TokioRuntime),
    ) {
        Ok(e) => e,
        Err(e) => {
            warn!(pod = %pod.key(), %addr, error = %e, "cannot start the QUIC server");
            return;
        }
    };
    let _close = CloseOnDrop(endpoint.clone());
    let sctx = quic::ServerCtx {
        on_connection: Some(track_quic_inbound(&ctx.mesh, &pod)),
        on_refused: Some(count_quic_refused(&ctx, &pod, addr)),
        ..quic::ServerCtx::default()
    };
    quic::serve_until(endpoint, sctx, handler, ctx.drain.signal()).await;
}

/// Binds the pod's QUIC socket on `addr`, retrying with backoff (1 s to
/// 30 s) while the address is busy; `None` when the daemon drains first.
async fn bind_with_retry(ctx: &Inbound, pod: &PodEntry, addr: SocketAddr) -> Option<UdpSocket> {
    let mut delay = Duration::from_secs(1);
    let mut warned = false;
    loop {
        match pod.net.bind_udp(addr) {
            Ok(s) => {
                if warned {
                    info!(pod = %pod.key(), %addr, "QUIC server bound after all");
                }
                return Some(s);
            }
            Err(e) => {
                if !warned {
                    warn!(pod = %pod.key(), %addr, error = %e, "QUIC server address busy (another daemon still has it?); retrying until it is free, peers use HBONE meanwhile");
                    warned = true;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = ctx.drain.signalled() => return None,
        }
        delay = (delay * 2).min(Duration::from_secs(30));
    }
}

/// The `response_flags` of a TLS error: revoked, identity, or TLS.
pub(crate) fn tls_failure(e: &rustls::Error) -> Failure {
    tls::rejection(e).map_or(Failure::TlsFailed, |r| failure_of_kind(r.reason.kind()))
}

/// The `response_flags` of a refusal's `RejectReason::kind`.
fn failure_of_kind(kind: &str) -> Failure {
    match kind {
        "revoked" => Failure::Revoked,
        "no_spiffe_id" | "foreign_trust_domain" | "wrong_kind" | "wrong_identity" => {
            Failure::IdentityError
        }
        _ => Failure::TlsFailed,
    }
}

/// The `response_flags` of a failed QUIC handshake, from quinn's error
/// text (`None`: timed out): quinn keeps the TLS refusal only as text,
/// which names its kind.
fn quic_failure(error_text: Option<&str>) -> Failure {
    error_text.and_then(tls::rejection_kind_in).map_or(Failure::TlsFailed, failure_of_kind)
}

/// Counts a client whose QUIC handshake to `pod` failed, as the HBONE
/// server does: the refused counter, the workload-pair metrics, a warning.
fn count_quic_refused(ctx: &Inbound, pod: &Arc<PodEntry>, local: SocketAddr) -> quic::OnRefused {
    let (stats, conns, pod) = (Arc::clone(&ctx.stats), ctx.conns.clone(), Arc::clone(pod));
    quic::OnRefused(Arc::new(move |peer, e| {
        Stats::inc(&stats.inbound_tunnel_refused);
        let why = quic_failure(e.map(ToString::to_string).as_deref());
        conns.refused(&handshake_info(&pod, peer, local, Transport::Quic), why);
        if let Some(e) = e {
            warn!(pod = %pod.key(), %peer, reason = %e, "QUIC tunnel handshake refused");
        } else {
            warn!(pod = %pod.key(), %peer, "QUIC tunnel handshake timed out");
        }
    }))
}

/// A tunnel connection to `pod` whose handshake failed: the peer is known
/// only by its address.
fn handshake_info(
    pod: &PodEntry,
    peer: SocketAddr,
    local: SocketAddr,
    transport: Transport,
) -> ConnInfo {
    ConnInfo {
        direction: Direction::Inbound,
        route: Route::Tunnel,
        pod: pod.key(),
        src: peer,
        dst: local,
        peer_pod: None,
        src_identity: None,
        dst_identity: Some(pod.identity.clone()),
        transport: Some(transport),
        dst_service: None,
    }
}

fn tls_reason(e: &io::Error) -> String {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(tls::rejection)
        .map_or_else(|| e.to_string(), ToString::to_string)
}

/// Registers an inbound tunnel connection of `pod` from the peer its
/// certificate chain `certs` names, for the admin API and for revocation
/// (`close` ends the connection with all its streams).
fn track_inbound(
    mesh: &Mesh,
    certs: &[rustls_pki_types::CertificateDer<'static>],
    transport: &str,
    pod: String,
    remote: SocketAddr,
    close: Closer,
) -> Option<Tracked> {
    let info = tls::peer_cert_info(certs).ok()?;
    let view = TunnelView {
        direction: "inbound",
        peer: info.identity.to_string(),
        serial: info.serial.clone(),
        transport: transport.into(),
        pod,
        remote: remote.to_string(),
        age_s: 0,
    };
    Some(mesh.registry.track(view, Some(close)))
}

/// Registers each inbound QUIC connection of `pod` (closing it closes all
/// its streams); the registration ends with the connection.
fn track_quic_inbound(mesh: &Arc<Mesh>, pod: &PodEntry) -> quic::OnConnection {
    let (mesh, pod) = (Arc::clone(mesh), pod.key());
    quic::OnConnection(Arc::new(move |conn: &quinn::Connection, certs| {
        let closing = conn.clone();
        let close: Closer =
            Box::new(move || closing.close(0u32.into(), b"peer certificate revoked"));
        Box::new(track_inbound(&mesh, certs, "quic", pod.clone(), conn.remote_address(), close))
    }))
}

/// The decision for one tunnelled connection arriving at `pod`, and the
/// delivery when it is allowed.
#[expect(
    clippy::too_many_lines,
    reason = "the steps of the decision in order, each refusal counted where it happens"
)]
async fn handle(
    ctx: &Inbound,
    pod: &PodEntry,
    transport: Transport,
    req: ConnectRequest,
) -> Result<Accepted, Refusal> {
    let inv = ctx.state.inventory();
    // What the metrics know of a refused stream: the peer's identity once
    // its certificate was read, the client pod when its address is known.
    let refusal_info = |peer_id: Option<String>| {
        // The client pod only when the verified identity is its own.
        let client = req
            .forwarded_for
            .and_then(|f| inv.pod_by_ip(f.ip()))
            .filter(|c| peer_id.as_deref() == Some(c.spiffe_id(&inv.inv.trust_domain).as_str()));
        ConnInfo {
            src: req.forwarded_for.unwrap_or(req.peer_addr),
            dst: req.authority,
            peer_pod: client.map(crate::inventory::Pod::key),
            src_identity: peer_id,
            ..handshake_info(pod, req.peer_addr, req.authority, transport)
        }
    };
    let refused = |r: Refusal, peer_id: Option<String>, why: Failure| {
        Stats::inc(&ctx.stats.inbound_tunnel_refused);
        ctx.conns.refused(&refusal_info(peer_id), why);
        Err(r)
    };
    let info = match tls::peer_cert_info(&req.peer_certs) {
        Ok(i) => i,
        Err(e) => {
            return refused(
                Refusal::denied(format!("peer certificate unusable: {e}")),
                None,
                Failure::IdentityError,
            )
        }
    };
    let Identity::Workload(peer_id) = &info.identity else {
        return refused(
            Refusal::denied("peer is a node, not a workload"),
            Some(info.identity.to_string()),
            Failure::IdentityError,
        );
    };
    // The extension's control requests: only the stream's peer, by token.
    let peer = peer_id.to_string();
    match &req.resume {
        ResumeExt::Quiesce { token, sent } => {
            let mine = ctx.mesh.streams.quiesce(token, &pod.key(), &peer, *sent).await?;
            return Ok(Accepted::answer(ResponseExt {
                resumable: false,
                quiesce_sent: Some(mine),
            }));
        }
        ResumeExt::Resume { token, sent, received } => {
            let attach =
                ctx.mesh.streams.resume(token, &pod.key(), &peer, *sent, *received).await?;
            return Ok(Accepted::attach(move |io| {
                let _ = attach.send(io);
            }));
        }
        ResumeExt::Offer { .. } | ResumeExt::None => {}
    }
    // A claimed client address no pod has (yet): wait, bounded, for the
    // inventory that has it — else the app would see the peer node's address.
    let inv = match req.forwarded_for {
        Some(f) if inv.pod_by_ip(f.ip()).is_none() => {
            let t0 = std::time::Instant::now();
            let newer = ctx
                .state
                .wait_inventory(UNKNOWN_CLIENT_WAIT, |i| i.pod_by_ip(f.ip()).is_some())
                .await;
            debug!(claimed = %f, waited_ms = t0.elapsed().as_millis(), known = newer.pod_by_ip(f.ip()).is_some(),
                "waited for the claimed client address to be published");
            newer
        }
        _ => Arc::clone(&inv),
    };
    let td = inv.inv.trust_domain.clone();
    let decision = authz::authorize(
        &ctx.state.policy(),
        &pod.pod,
        req.authority,
        peer_id,
        req.peer_addr,
        req.forwarded_for,
        |ip| inv.pod_by_ip(ip).map(|p| p.spiffe_id(&td)),
    );
    let allowed = match decision {
        Ok(a) => a,
        Err(Denial::NotThisPod(why)) => {
            return refused(
                Refusal::malformed(why),
                Some(peer_id.to_string()),
                Failure::ConnectFailed,
            )
        }
        Err(Denial::Policy(reason)) => {
            Stats::inc(&ctx.stats.policy_denied);
            ctx.state.record_deny(
                peer_id.to_string(),
                format!("{} {}", pod.key(), req.authority),
                reason.clone(),
            );
            info!(peer = %peer_id, dst = %req.authority, pod = %pod.key(), %reason, "tunnel connection denied by policy");
            return refused(
                Refusal::denied(reason),
                Some(peer_id.to_string()),
                Failure::PolicyDenied,
            );
        }
    };
    if allowed.forwarded_ignored {
        warn!(peer = %peer_id, claimed = ?req.forwarded_for, "forwarded address does not belong to the peer's identity; not used");
    }
    match pod.net.deliver(allowed.src_ip, req.authority).await {
        Ok(up) => {
            let _ = up.set_nodelay(true);
            Stats::inc(&ctx.stats.inbound_tunnel_accepted);
            // The source is what policy saw (a re-check decides on it too):
            // the client pod when the peer owns the claimed address, else
            // the peer node.
            let mut guard = ctx.conns.open(ConnInfo {
                direction: Direction::Inbound,
                route: Route::Tunnel,
                pod: pod.key(),
                src: allowed.source,
                dst: req.authority,
                peer_pod: allowed
                    .src_ip
                    .and_then(|ip| inv.pod_by_ip(ip))
                    .map(crate::inventory::Pod::key),
                src_identity: Some(peer_id.to_string()),
                dst_identity: Some(pod.identity.clone()),
                transport: Some(transport),
                dst_service: None,
            });
            // A resumable stream: the daemon relays it itself (it can move
            // at an upgrade of either node). It needs the client pod's
            // address, where its QUIESCE would go.
            if let (ResumeExt::Offer { token }, Some(client)) = (&req.resume, req.forwarded_for) {
                let relay = crate::resumable::Relay {
                    guard,
                    app: up,
                    pod: pod.key(),
                    stream: PausedStream {
                        token: token.clone(),
                        role: StreamRole::Server,
                        local_identity: pod.identity.clone(),
                        peer_identity: peer_id.to_string(),
                        peer: client,
                        sent: 0,
                        received: 0,
                        app_write_done: false,
                    },
                    registry: Arc::clone(&ctx.mesh.streams),
                    dialer: Arc::clone(&ctx.mesh) as Arc<dyn crate::resumable::Dialer>,
                };
                let scope = pod.scope.clone();
                return Ok(Accepted::attach(move |io| scope.spawn(relay.run(Some(io))))
                    .with_ext(ResponseExt { resumable: true, quiesce_sent: None }));
            }
            // The tunnel is the splice's first side, the pod's socket the
            // second. If the stream's task is cancelled instead, the guard
            // drops with the closure.
            let up = guard.cancellable(up);
            Ok(Accepted::new(up).on_close(move |o| {
                let t = Transfer::pod_second(o.a_to_b, o.b_to_a);
                match &o.error {
                    Some(e) => guard.failed(t, e),
                    None => guard.finished(t),
                }
            }))
        }
        Err(e) => {
            warn!(dst = %req.authority, error = %e, "cannot connect to the destination pod");
            refused(
                Refusal::unreachable(e.to_string()),
                Some(peer_id.to_string()),
                Failure::ConnectFailed,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quic_refusal_keeps_its_reason_through_the_text() {
        let revoked = "the cryptographic handshake failed: error 46: invalid peer certificate: \
                       peer spiffe://td/ns/a/sa/b (serial 01) refused (revoked): serial 01 is on \
                       the deny list";
        assert_eq!(quic_failure(Some(revoked)), Failure::Revoked);
        let wrong = "invalid peer certificate: peer x refused (wrong_identity): y";
        assert_eq!(quic_failure(Some(wrong)), Failure::IdentityError);
        assert_eq!(quic_failure(Some("peer sent no certificates")), Failure::TlsFailed);
        assert_eq!(quic_failure(None), Failure::TlsFailed, "a timed-out handshake");
    }
}
