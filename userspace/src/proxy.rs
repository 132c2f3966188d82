//! Per-connection work: the outbound path (a pod's captured connect, accepted
//! on its in-pod 127.0.0.1:15001 listener) and the inbound plaintext path
//! (a connection steered by `sk_lookup` to the pod's 15006 listener).
//!
//! Outbound: the original destination comes from the eBPF map (keyed by the
//! pod's netns cookie and the client's own address), the route from the
//! inventory: an enrolled pod on this node gets the bytes delivered inside
//! its own netns (plaintext never leaves the node, no TLS needed); anything
//! not enrolled is passed through from the source pod's netns, so it leaves
//! with the pod's own address as if never captured. Every socket the daemon
//! opens in a pod netns carries `DAEMON_MARK`, so capture ignores it.
//!
//! Inbound: `inventory::inbound_verdict` decides; refused connections are
//! reset at once.

use std::{net::SocketAddr, sync::Arc, time::Instant};

use tokio::{io::AsyncWriteExt, net::TcpStream};
use tracing::{debug, info, info_span, warn, Instrument};

use crate::{
    inventory::{self, InboundVerdict, Route},
    netns::SocketOpts,
    node::{PodRuntime, Shared},
    stats::Stats,
};
use tlsmesh_common::DAEMON_MARK;

/// Options for sockets the daemon opens inside pods.
pub fn pod_socket_opts() -> SocketOpts {
    SocketOpts { mark: DAEMON_MARK, ..SocketOpts::default() }
}

/// What an accept loop does with each accepted connection.
type Serve = fn(
    Arc<Shared>,
    Arc<PodRuntime>,
    TcpStream,
    SocketAddr,
) -> futures::future::BoxFuture<'static, ()>;

/// Accepts on a pod's listener until the pod is removed or the daemon
/// drains; each connection runs until it ends or the pod is removed.
async fn accept_loop(
    shared: Arc<Shared>,
    pod: Arc<PodRuntime>,
    listener: tokio::net::TcpListener,
    what: &'static str,
    serve: Serve,
) {
    let mut shutdown = pod.shutdown.subscribe();
    let mut draining = shared.draining.subscribe();
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.wait_for(|v| *v) => return,
            _ = draining.wait_for(|v| *v) => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                let (shared, pod) = (Arc::clone(&shared), Arc::clone(&pod));
                tokio::spawn(async move {
                    let mut stop = pod.shutdown.subscribe();
                    tokio::select! {
                        () = serve(Arc::clone(&shared), Arc::clone(&pod), stream, peer) => {}
                        _ = stop.wait_for(|v| *v) => debug!(pod = %pod.pod.key(), what, "connection ended: pod removed"),
                    }
                });
            }
            Err(e) => {
                warn!(pod = %pod.pod.key(), error = %e, what, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        }
    }
}

/// Accept loop of a pod's outbound listener.
pub async fn outbound_loop(
    shared: Arc<Shared>,
    pod: Arc<PodRuntime>,
    listener: tokio::net::TcpListener,
) {
    accept_loop(shared, pod, listener, "outbound", |shared, pod, stream, peer| {
        Stats::inc(&shared.stats.outbound_accepted);
        Box::pin(outbound(shared, pod, stream, peer))
    })
    .await;
}

/// Accept loop of a pod's inbound plaintext listener.
pub async fn inbound_loop(
    shared: Arc<Shared>,
    pod: Arc<PodRuntime>,
    listener: tokio::net::TcpListener,
) {
    accept_loop(shared, pod, listener, "inbound", |shared, pod, stream, peer| {
        Box::pin(inbound(shared, pod, stream, peer))
    })
    .await;
}

async fn outbound(
    shared: Arc<Shared>,
    pod: Arc<PodRuntime>,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    let Some(dst) = shared.capture.take_orig_dst(pod.cookie, peer) else {
        Stats::inc(&shared.stats.outbound_no_orig_dst);
        warn!(pod = %pod.pod.key(), %peer, "captured connection with no recorded original destination; closing");
        let _ = client.shutdown().await;
        return;
    };
    let inv = shared.inventory();
    // A Service ClusterIP is resolved to a ready endpoint first (capture
    // happens before kube-proxy's DNAT could).
    let dst =
        inventory::resolve_service(&inv, dst, &mut shared.services.lock().expect("services lock"))
            .unwrap_or(dst);
    let route = inventory::route(&inv, &shared.cfg.node, dst.ip());
    let span = info_span!("outbound", src = %pod.pod.key(), %dst, route = ?route);
    async move {
        let started = Instant::now();
        let src_ip = pod.pod.ips.iter().copied().find(|ip| ip.is_ipv4() == dst.ip().is_ipv4());
        let upstream = match &route {
            Route::LocalPod(key) => {
                if let Some(dst_pod) = shared.pod(key) {
                    Stats::inc(&shared.stats.outbound_local);
                    crate::deliver::connect(&dst_pod.worker, src_ip, dst).await
                } else {
                    Stats::inc(&shared.stats.outbound_passthrough);
                    pod.worker.connect(dst, pod_socket_opts()).await
                }
            }
            Route::RemotePod { pod: dst_key, .. } => {
                let Some(dst_pod) = inv.pods.get(dst_key).cloned() else { return };
                tunnel(&shared, &pod, &dst_pod, client, peer, dst, started).await;
                return;
            }
            Route::Passthrough => {
                Stats::inc(&shared.stats.outbound_passthrough);
                pod.worker.connect(dst, pod_socket_opts()).await
            }
        };
        let mut upstream = match upstream {
            Ok(s) => s,
            Err(e) => {
                Stats::inc(&shared.stats.outbound_failed);
                warn!(error = %e, "cannot reach the original destination; resetting the client");
                reset(client);
                return;
            }
        };
        splice(&shared, &mut client, &mut upstream, started, "outbound").await;
    }
    .instrument(span)
    .await;
}

/// The remote-pod branch: through the mTLS tunnel to the destination node.
async fn tunnel(
    shared: &Arc<Shared>,
    pod: &Arc<PodRuntime>,
    dst_pod: &crate::inventory::Pod,
    mut client: TcpStream,
    peer: SocketAddr,
    dst: SocketAddr,
    started: Instant,
) {
    // What the client already sent travels with the CONNECT request
    // (saves a round trip for client-speaks-first protocols). An EOF here
    // is seen again by the splice.
    let early = early_data(&client);
    let early_len = early.len() as u64;
    let opened = crate::mesh::open(shared, &pod.pod, dst_pod, dst, peer.port(), early).await;
    let mut stream = match opened {
        Ok(s) => s,
        Err(e) => {
            Stats::inc(&shared.stats.tunnel_failed);
            warn!(dst_pod = %dst_pod.key(), error = %e, "tunnel to the destination failed; resetting the client");
            reset(client);
            return;
        }
    };
    Stats::inc(&shared.stats.outbound_tunnel);
    Stats::inc(&shared.stats.active_connections);
    let transport = stream.transport().to_string();
    let _ = client.set_nodelay(true);
    let tracked = crate::mesh::track_outbound(shared, &pod.pod, dst_pod, &transport, dst);
    let r = crate::mesh::splice(&mut client, &mut stream).await;
    drop(tracked);
    Stats::dec(&shared.stats.active_connections);
    match r {
        Ok((from_pod, to_pod)) => {
            let from_pod = from_pod + early_len;
            Stats::add(&shared.stats.bytes_from_pods, from_pod);
            Stats::add(&shared.stats.bytes_to_pods, to_pod);
            info!(direction = "outbound", %transport, dst_pod = %dst_pod.key(), bytes_sent = from_pod, bytes_received = to_pod, duration_ms = started.elapsed().as_millis(), outcome = "ok", "connection complete");
        }
        Err(e) => {
            stream.reset();
            info!(direction = "outbound", %transport, dst_pod = %dst_pod.key(), duration_ms = started.elapsed().as_millis(), outcome = "error", error = %e, "connection complete");
        }
    }
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

/// Most bytes read from a client before its tunnel stream is open.
const EARLY_DATA_MAX: usize = 16 * 1024;

async fn inbound(
    shared: Arc<Shared>,
    pod: Arc<PodRuntime>,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    let Ok(dst) = client.local_addr() else { return };
    let verdict = inventory::inbound_verdict(pod.mode, peer.ip(), &shared.probe_sources());
    let span = info_span!("inbound", dst_pod = %pod.pod.key(), src = %peer, %dst, ?verdict);
    async move {
        match verdict {
            InboundVerdict::Refuse => {
                Stats::inc(&shared.stats.inbound_plaintext_refused);
                info!(mode = %pod.mode, "plaintext connection to a strict pod refused");
                shared.record_deny(
                    peer.to_string(),
                    format!("{} {dst}", pod.pod.key()),
                    "plaintext to a strict pod".into(),
                );
                reset(client);
                return;
            }
            InboundVerdict::AcceptPlaintext => Stats::inc(&shared.stats.inbound_plaintext_accepted),
            InboundVerdict::AcceptProbe => Stats::inc(&shared.stats.inbound_probe_accepted),
        }
        let started = Instant::now();
        match pod.worker.connect(dst, pod_socket_opts()).await {
            Ok(mut app) => splice(&shared, &mut client, &mut app, started, "inbound").await,
            Err(e) => {
                warn!(error = %e, "the pod's application refused the connection");
                reset(client);
            }
        }
    }
    .instrument(span)
    .await;
}

/// Copies both ways until both sides are done; counts bytes; logs one access line.
async fn splice(
    shared: &Shared,
    pod_side: &mut TcpStream,
    other: &mut TcpStream,
    started: Instant,
    dir: &str,
) {
    Stats::inc(&shared.stats.active_connections);
    let r = tokio::io::copy_bidirectional_with_sizes(pod_side, other, 64 * 1024, 64 * 1024).await;
    Stats::dec(&shared.stats.active_connections);
    match r {
        Ok((from_pod, to_pod)) => {
            Stats::add(&shared.stats.bytes_from_pods, from_pod);
            Stats::add(&shared.stats.bytes_to_pods, to_pod);
            info!(
                direction = dir,
                bytes_sent = from_pod,
                bytes_received = to_pod,
                duration_ms = started.elapsed().as_millis(),
                outcome = "ok",
                "connection complete"
            );
        }
        Err(e) => {
            info!(direction = dir, duration_ms = started.elapsed().as_millis(), outcome = "error", error = %e, "connection complete");
        }
    }
}

/// Closes with RST (`SO_LINGER` 0), so the peer sees a refusal, not an EOF.
fn reset(s: TcpStream) {
    let _ = s.set_zero_linger();
    drop(s);
}
