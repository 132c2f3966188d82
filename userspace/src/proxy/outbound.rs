//! A pod's captured outbound connection: route it, then relay it through
//! the tunnel, to a pod on this node, or out as passthrough.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use tokio::net::TcpStream;
use tracing::{info_span, warn, Instrument};

use super::{dropped, reset, Proxy};
use crate::{
    authz,
    conns::{ConnGuard, ConnInfo, Direction, Failure, PausedStream, Route, StreamRole, Transfer},
    inventory::{self, Pod},
    state::PodEntry,
    stats::Stats,
};

/// Most bytes read from a client before its tunnel stream is open.
const EARLY_DATA_MAX: usize = 16 * 1024;

/// Serves one captured connection of `pod` from its client `peer`.
pub async fn serve(p: Proxy, pod: Arc<PodEntry>, client: TcpStream, peer: SocketAddr) {
    Stats::inc(&p.stats.outbound_accepted);
    let Some(dst) = p.orig_dst.take_orig_dst(pod.cookie, peer) else {
        Stats::inc(&p.stats.outbound_no_orig_dst);
        warn!(pod = %pod.key(), %peer, "captured connection with no recorded original destination; closing");
        reset(client);
        return;
    };
    let inv = p.state.inventory();
    // A Service ClusterIP is resolved to a ready endpoint first (capture
    // happens before kube-proxy's DNAT could).
    let resolved = p.state.resolve_service(&inv, dst);
    let dst_service = resolved.and_then(|_| service_of(&inv.inv, dst));
    let dst = resolved.unwrap_or(dst);
    let route = inv.route(p.state.node(), dst.ip());
    let span = info_span!("outbound", src = %pod.key(), %dst, route = ?route);
    let src_ip = pod.pod.ips.iter().copied().find(|ip| ip.is_ipv4() == dst.ip().is_ipv4());
    let src = source_of(peer, src_ip);
    async move {
        let info = |route: Route, peer_pod: Option<&Pod>| ConnInfo {
            direction: Direction::Outbound,
            route,
            pod: pod.key(),
            src,
            dst,
            peer_pod: peer_pod.map(Pod::key),
            src_identity: Some(pod.identity.clone()),
            dst_identity: peer_pod.map(|d| d.spiffe_id(&inv.inv.trust_domain)),
            transport: None,
            dst_service: dst_service.clone(),
        };
        match route {
            inventory::Route::RemotePod { pod: dst_key, .. } => {
                let Some(dst_pod) = inv.inv.pods.get(&dst_key) else {
                    dropped(&p.stats, &pod, peer, "destination pod left the inventory");
                    reset(client);
                    return;
                };
                tunnel(&p, &pod, dst_pod, client, peer, dst, info(Route::Tunnel, Some(dst_pod)))
                    .await;
            }
            inventory::Route::LocalPod(key) => {
                if let Some(dst_pod) = p.state.pod(&key) {
                    // The same policy as through the tunnel: the source
                    // pod is known from the netns it was captured in.
                    let policy = p.state.policy();
                    if let Err(reason) =
                        authz::authorize_local(&policy, &dst_pod.pod, &pod.identity, src, dst)
                    {
                        Stats::inc(&p.stats.policy_denied);
                        p.conns.refused(&info(Route::Local, Some(&dst_pod.pod)), Failure::PolicyDenied);
                        tracing::info!(dst_pod = %key, %reason, "local connection denied by policy");
                        p.state.record_deny(
                            pod.identity.clone(),
                            format!("{key} {dst}"),
                            reason,
                        );
                        reset(client);
                        return;
                    }
                    Stats::inc(&p.stats.outbound_local);
                    let up = dst_pod.net.deliver(src_ip, dst).await;
                    relay(&p, client, up, info(Route::Local, Some(&dst_pod.pod))).await;
                } else {
                    // Enrolled but not served yet (being set up): as if
                    // not enrolled, like any pod the node does not serve.
                    Stats::inc(&p.stats.outbound_passthrough);
                    let up = pod.net.connect(dst).await;
                    relay(&p, client, up, info(Route::Passthrough, inv.pod_by_ip(dst.ip()))).await;
                }
            }
            inventory::Route::Passthrough => {
                Stats::inc(&p.stats.outbound_passthrough);
                let up = pod.net.connect(dst).await;
                relay(&p, client, up, info(Route::Passthrough, inv.pod_by_ip(dst.ip()))).await;
            }
        }
    }
    .instrument(span)
    .await;
}

/// The client's address as its destination sees it, and as policy and
/// telemetry name it. Capture points the app's connect at the daemon's
/// listener on the pod's loopback; the destination is reached from the
/// pod's own address (tunnel, local delivery and passthrough alike). Where
/// the accepted socket's peer reads `127.0.0.1:port` (every captured
/// connection of the benchmark's run logged so; the netns tests' peers read
/// the pod's address), it is named by the pod's address with the app's
/// port: an `ipBlocks` rule matched against `127.0.0.1` would let a
/// same-node client past a deny of its address, and deny one an allow names.
fn source_of(peer: SocketAddr, pod_ip: Option<IpAddr>) -> SocketAddr {
    match pod_ip {
        Some(ip) if peer.ip().to_canonical().is_loopback() => SocketAddr::new(ip, peer.port()),
        _ => peer,
    }
}

/// Relays the client with a plain TCP upstream (local delivery, passthrough).
async fn relay(p: &Proxy, client: TcpStream, upstream: std::io::Result<TcpStream>, info: ConnInfo) {
    let upstream = match upstream {
        Ok(s) => s,
        Err(e) => {
            Stats::inc(&p.stats.outbound_failed);
            p.conns.refused(&info, Failure::ConnectFailed);
            warn!(error = %e, "cannot reach the original destination; resetting the client");
            reset(client);
            return;
        }
    };
    let guard = p.conns.open(info);
    // The client (the pod) is the first side.
    super::relay_sockets(guard, client, upstream, true, tlsmesh_tunnel::SplicePoint::default())
        .await;
}

/// The remote-pod branch: through the mTLS tunnel to the destination node.
async fn tunnel(
    p: &Proxy,
    pod: &PodEntry,
    dst_pod: &Pod,
    mut client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    mut info: ConnInfo,
) {
    let Some(mesh) = &p.mesh else {
        Stats::inc(&p.stats.tunnel_failed);
        p.conns.refused(&info, Failure::IdentityError);
        warn!(dst_pod = %dst_pod.key(), "no CA configured (set identity.ca_dir or identity.ca_addr): cannot tunnel to an enrolled pod on another node; resetting the client");
        reset(client);
        return;
    };
    // What the client already sent travels with the CONNECT request
    // (saves a round trip for client-speaks-first protocols). An EOF here
    // is seen again by the splice.
    let early = early_data(&client);
    let early_len = early.len() as u64;
    // Boxed: the pool's connect future (TLS and HTTP/2 handshakes) is
    // large, and inline it would be reserved in every connection's task for
    // the connection's whole life; boxed it is freed once the stream is open.
    let token = crate::resumable::new_token();
    let offer = tlsmesh_tunnel::ResumeExt::Offer { token: token.clone() };
    let opening = Box::pin(mesh.open(&pod.pod, dst_pod, dst, peer.port(), early, offer));
    let mut stream = match opening.await {
        Ok(s) => s,
        Err(e) => {
            Stats::inc(&p.stats.tunnel_failed);
            p.conns.refused(&info, failure(&e));
            warn!(dst_pod = %dst_pod.key(), error = %e, kind = e.kind(), "tunnel to the destination failed; resetting the client");
            reset(client);
            return;
        }
    };
    Stats::inc(&p.stats.outbound_tunnel);
    info.transport = Some(match stream.transport() {
        tlsmesh_tunnel::Transport::Tcp => crate::config::Transport::Tcp,
        tlsmesh_tunnel::Transport::Quic => crate::config::Transport::Quic,
    });
    let resumable = stream.response().resumable;
    let peer_identity = info.dst_identity.clone();
    let mut guard = p.conns.open(info);
    if let (true, Some(peer_identity)) = (resumable, peer_identity) {
        // Both daemons speak the extension: the stream can move at an
        // upgrade of either.
        let relay = crate::resumable::Relay {
            guard,
            app: client,
            pod: pod.key(),
            stream: PausedStream {
                token,
                role: StreamRole::Client,
                local_identity: pod.identity.clone(),
                peer_identity,
                peer: dst,
                sent: early_len,
                received: 0,
                app_write_done: false,
            },
            registry: Arc::clone(&mesh.streams),
            dialer: Arc::clone(mesh) as Arc<dyn crate::resumable::Dialer>,
        };
        // A task of its own, in the pod's scope: this connection's task
        // ends here, so the stream's whole life costs the relay's state
        // only, not also this task's set-up (the connect, the policy
        // decision, the connection's description).
        let run = relay.run(Some(Box::new(stream))).instrument(tracing::Span::current());
        pod.scope.spawn(run);
        return;
    }
    let Some(o) = until_closed(&mut guard, tlsmesh_tunnel::splice(&mut client, &mut stream)).await
    else {
        stream.reset();
        reset(client);
        return;
    };
    let t = Transfer::pod_first(o.a_to_b + early_len, o.b_to_a);
    match o.error {
        // An error after bytes moved is the peer going away mid-stream; with
        // none moved, the stream never worked.
        Some(e) => {
            stream.reset();
            guard.failed(t, e);
        }
        None => guard.finished(t),
    }
}

/// The Service (`namespace/name`) whose address `dst` is.
fn service_of(inv: &inventory::Inventory, dst: SocketAddr) -> Option<String> {
    let vip = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    inv.services.get(&vip).map(|b| b.service.clone())
}

/// The `response_flags` of a tunnel that could not be opened.
fn failure(e: &crate::mesh::MeshError) -> Failure {
    match e.kind() {
        "identity" => return Failure::IdentityError,
        "denied" => return Failure::PolicyDenied,
        _ => {}
    }
    // A TLS error anywhere in the chain (the connector's handshake).
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = src {
        // An io::Error's source() skips the error it wraps: look inside.
        let inner = err.downcast_ref::<std::io::Error>().and_then(|io| io.get_ref());
        let inner: Option<&(dyn std::error::Error + 'static)> = inner.map(|e| e as _);
        if let Some(tls) =
            [Some(err), inner].into_iter().flatten().find_map(|e| e.downcast_ref::<rustls::Error>())
        {
            return crate::mesh::server::tls_failure(tls);
        }
        src = inner.or_else(|| err.source());
    }
    Failure::ConnectFailed
}

/// Runs `splice` until it ends, or until the connection is closed from
/// outside (`None`; the guard then records that it was closed).
pub(super) async fn until_closed<F: std::future::Future>(
    guard: &mut ConnGuard,
    splice: F,
) -> Option<F::Output> {
    let out = tokio::select! {
        o = splice => Some(o),
        () = guard.closed() => None,
    };
    if out.is_none() {
        guard.failed(Transfer::default(), "closed by the daemon (policy)");
    }
    out
}

/// Bytes a captured client sent before the tunnel was open, read without
/// waiting (none for server-speaks-first protocols).
fn early_data(client: &TcpStream) -> bytes::Bytes {
    let mut buf = [0u8; EARLY_DATA_MAX];
    match client.try_read(&mut buf) {
        Ok(n) if n > 0 => bytes::Bytes::copy_from_slice(&buf[..n]),
        _ => bytes::Bytes::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        conns::ConnTable,
        inventory::Mode,
        scope::{Drain, Scope},
        state::{NodeState, StateSettings},
        testing,
    };

    #[test]
    fn a_loopback_peer_is_named_by_the_pod_address() {
        let pod: IpAddr = "10.77.1.2".parse().unwrap();
        let got = source_of("127.0.0.1:56600".parse().unwrap(), Some(pod));
        assert_eq!(got, "10.77.1.2:56600".parse().unwrap());
        let v6: IpAddr = "fd77:1::2".parse().unwrap();
        assert_eq!(
            source_of("[::1]:4000".parse().unwrap(), Some(v6)),
            "[fd77:1::2]:4000".parse().unwrap()
        );
        assert_eq!(
            source_of("[::ffff:127.0.0.1]:4000".parse().unwrap(), Some(pod)),
            "10.77.1.2:4000".parse().unwrap()
        );
        // A peer that already is an address of the network is kept, and so
        // is a loopback peer of a pod without an address of that family.
        assert_eq!(
            source_of("10.77.1.9:1".parse().unwrap(), Some(pod)),
            "10.77.1.9:1".parse().unwrap()
        );
        assert_eq!(source_of("127.0.0.1:1".parse().unwrap(), None), "127.0.0.1:1".parse().unwrap());
    }

    /// The state an idle captured connection's task holds (every open
    /// connection but a resumable tunnel stream pays it; that one's relay
    /// runs in a task of its own): 2,224 bytes in a debug build, 5,776 when
    /// the tunnel's connect future was inline.
    #[tokio::test]
    async fn future_sizes() {
        let stats = Arc::new(Stats::default());
        let p = Proxy {
            state: Arc::new(NodeState::new(StateSettings::default())),
            conns: ConnTable::new(Arc::clone(&stats)),
            stats,
            orig_dst: Arc::new(testing::FixedOrigDst::default()),
            mesh: None,
            drain: Drain::new(),
        };
        let (pod, _) = testing::served(
            testing::pod("ns", "p", "n0", "10.0.0.2", Mode::Strict),
            &Scope::new(),
            "td",
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let peer = c.local_addr().unwrap();
        let f = serve(p, pod, c, peer);
        let size = std::mem::size_of_val(&f);
        eprintln!("outbound::serve future: {size} bytes");
        assert!(
            size < 2560,
            "a captured connection's task grew to {size} bytes (box what it awaits only at set-up)"
        );
        drop(f);
    }
}
