//! The daemon's side of the tunnel: outbound streams to enrolled pods on
//! other nodes, and the per-pod tunnel servers (TCP/HBONE and QUIC on the
//! pod's address, port 15008) that check identity and policy and deliver to
//! the pod with the client's own address.
//!
//! Addressing follows HBONE: the tunnel connection goes to the destination
//! pod's IP:15008 and the destination node's daemon takes it inside that
//! pod's netns. Pooling is per (source identity, destination identity,
//! destination address). Open tunnel connections are registered with their
//! peer identity and certificate serial, so a deny-list change closes the
//! ones whose peer is now revoked.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex, RwLock,
    },
    time::{Duration, Instant},
};

use serde::Serialize;
use tlsmesh_identity::{tls, Identity, SpiffeId};
use tlsmesh_tunnel::{
    hbone, quic, Accepted, ConnectHeaders, ConnectRequest, PoolKey, Refusal, Stream,
};
use tokio::{net::TcpStream, task::AbortHandle};
use tracing::{info, warn};

use crate::{
    certs::{workload_id, Certs},
    config::Transport,
    deliver,
    inventory::Pod,
    node::{PodRuntime, Shared},
    policy::{Decision, Destination, Policy, Source},
    stats::Stats,
};
use tlsmesh_common::{DAEMON_MARK, PORT_TUNNEL};

/// Errors of the outbound tunnel path.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// No identity machinery configured.
    #[error("no CA configured (set identity.ca_dir or identity.ca_addr): cannot tunnel to enrolled pod {0}")]
    NoIdentity(String),
    /// Identity or TLS config trouble.
    #[error(transparent)]
    Certs(#[from] crate::certs::CertsError),
    /// SPIFFE id.
    #[error(transparent)]
    Spiffe(#[from] tlsmesh_identity::spiffe::SpiffeError),
    /// The tunnel.
    #[error(transparent)]
    Tunnel(#[from] tlsmesh_tunnel::Error),
}

/// One open tunnel connection (server side) or stream (client side).
#[derive(Debug, Clone, Serialize)]
pub struct TunnelView {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Peer SPIFFE id.
    pub peer: String,
    /// Peer certificate serial (inbound).
    pub serial: String,
    /// tcp or quic.
    pub transport: String,
    /// Local pod.
    pub pod: String,
    /// Remote address.
    pub remote: String,
    /// Seconds open.
    pub age_s: u64,
}

struct Entry {
    view: TunnelView,
    since: Instant,
    /// Closes the tunnel (inbound: aborts the TCP connection's task or
    /// closes the QUIC connection). Outbound streams have none: the pool
    /// closes the connection they ride on ([`Mesh::enforce_deny_list`]).
    close: Option<Closer>,
}

/// How the registry closes one tunnel.
pub type Closer = Box<dyn FnOnce() + Send>;

/// Open tunnels, for the admin API and for revocation.
#[derive(Default)]
pub struct Registry {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Entry>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").finish_non_exhaustive()
    }
}

impl Registry {
    fn add(&self, view: TunnelView, close: Option<Closer>) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.open
            .lock()
            .expect("registry lock")
            .insert(id, Entry { view, since: Instant::now(), close });
        id
    }

    fn remove(&self, id: u64) {
        self.open.lock().expect("registry lock").remove(&id);
    }

    /// The open tunnels.
    pub fn list(&self) -> Vec<TunnelView> {
        self.open
            .lock()
            .expect("registry lock")
            .values()
            .map(|e| TunnelView { age_s: e.since.elapsed().as_secs(), ..e.view.clone() })
            .collect()
    }

    /// Closes every tunnel whose peer fails `still_allowed`. Returns how many.
    pub fn close_where(&self, still_allowed: impl Fn(&TunnelView) -> bool) -> usize {
        let mut open = self.open.lock().expect("registry lock");
        // Entries without a closer (outbound streams) stay listed: their
        // pooled connection is closed through the pool.
        let doomed: Vec<u64> = open
            .iter()
            .filter(|(_, e)| e.close.is_some() && !still_allowed(&e.view))
            .map(|(k, _)| *k)
            .collect();
        for id in &doomed {
            if let Some(e) = open.remove(id) {
                warn!(peer = %e.view.peer, serial = %e.view.serial, direction = e.view.direction, "closing tunnel: peer revoked");
                if let Some(close) = e.close {
                    close();
                }
            }
        }
        doomed.len()
    }
}

/// The tunnel side of the daemon.
pub struct Mesh {
    /// Identities.
    pub certs: Certs,
    /// Pools for both transports.
    pub client: tlsmesh_tunnel::Client,
    /// QUIC client endpoint in the node netns (when QUIC is the transport).
    pub quic_endpoint: Option<quinn::Endpoint>,
    /// Authorization rules.
    pub policy: RwLock<Arc<Policy>>,
    /// Open tunnels.
    pub registry: Registry,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").finish_non_exhaustive()
    }
}

impl Mesh {
    /// Builds the tunnel side; `transport` decides whether a QUIC endpoint is made.
    pub fn new(certs: Certs, transport: Transport, policy: Policy) -> std::io::Result<Self> {
        let quic_endpoint = match transport {
            Transport::Quic => {
                let sock = std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))
                    .or_else(|_| std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))?;
                if let Err(e) = quic::tune_udp_socket(&sock) {
                    warn!(error = %e, "cannot raise the QUIC socket buffers");
                }
                Some(quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    None,
                    sock,
                    Arc::new(quinn::TokioRuntime),
                )?)
            }
            Transport::Tcp => None,
        };
        Ok(Self {
            certs,
            client: tlsmesh_tunnel::Client::new(tlsmesh_tunnel::ClientConfig::default()),
            quic_endpoint,
            policy: RwLock::new(Arc::new(policy)),
            registry: Registry::default(),
        })
    }

    /// Closes tunnels whose peer the deny list now refuses: inbound tunnel
    /// connections by the client's identity or certificate serial, and
    /// pooled outbound connections by the destination's identity (their
    /// streams end with them).
    pub fn enforce_deny_list(&self) -> usize {
        let deny = self.certs.deny.current();
        let inbound = self.registry.close_where(|v| {
            let Ok(id) = v.peer.parse::<SpiffeId>() else { return true };
            let serials: Vec<&str> =
                if v.serial.is_empty() { vec![] } else { vec![v.serial.as_str()] };
            deny.check(&Identity::Workload(id), &serials).is_ok()
        });
        let outbound = self.client.close_where(|key| {
            key.dst_identity
                .parse::<SpiffeId>()
                .is_ok_and(|id| deny.check(&Identity::Workload(id), &[]).is_err())
        });
        if outbound > 0 {
            warn!(
                connections = outbound,
                "closed pooled tunnel connections to a revoked destination"
            );
        }
        inbound + outbound
    }
}

fn same_family(ips: &[IpAddr], like: IpAddr) -> Option<IpAddr> {
    ips.iter().copied().find(|ip| ip.is_ipv4() == like.is_ipv4())
}

/// Opens a tunnel stream from `src` (a pod on this node) to `dst` (the
/// original destination, an enrolled pod `dst_pod` on another node),
/// carrying `early` (what the client already sent) with the request.
pub async fn open(
    shared: &Shared,
    src: &Pod,
    dst_pod: &Pod,
    dst: SocketAddr,
    client_port: u16,
    early: bytes::Bytes,
) -> Result<Stream, MeshError> {
    let mesh = shared.mesh.as_ref().ok_or_else(|| MeshError::NoIdentity(dst_pod.key()))?;
    let td = &mesh.certs.trust_domain;
    let src_id = workload_id(td, src)?;
    let dst_id = workload_id(td, dst_pod)?;
    let tls = mesh.certs.client_config(&src_id, &dst_id).await?;
    let tunnel_addr = SocketAddr::new(dst.ip(), PORT_TUNNEL);
    // The pool key carries the source certificate's serial: after a renewal,
    // new streams open a connection with the new certificate while the old
    // connection serves its live streams until it idles out.
    let serial = mesh.certs.manager.cert_info(&src_id).map(|i| i.serial).unwrap_or_default();
    let key = PoolKey {
        src_identity: format!("{src_id}#{serial}"),
        dst_identity: dst_id.to_string(),
        dst: tunnel_addr,
    };
    let headers = ConnectHeaders {
        forwarded_for: same_family(&src.ips, dst.ip()).map(|ip| SocketAddr::new(ip, client_port)),
        traceparent: None,
        baggage: Some(format!("k8s.namespace.name={},k8s.pod.name={}", src.namespace, src.name)),
    };
    let dial = mesh.quic_endpoint.as_ref().map(|endpoint| quic::Dial {
        endpoint: endpoint.clone(),
        tls: Arc::clone(&tls),
        server_name: tls::sni_string(&dst_id),
    });
    let sni = tls::sni_for(&dst_id);
    let connector = move || async move {
        let sock = if tunnel_addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket2::SockRef::from(&sock).set_mark(DAEMON_MARK)?;
        sock.set_nodelay(true)?;
        let started = std::time::Instant::now();
        let tcp = sock.connect(tunnel_addr).await?;
        let tls = tokio_rustls::TlsConnector::from(tls).connect(sni, tcp).await;
        crate::metrics::HANDSHAKE_SECONDS.observe(started.elapsed().as_secs_f64());
        tls
    };
    Ok(mesh.client.connect(&key, dst, &headers, early, dial.as_ref(), connector).await?)
}

/// A registry entry that is removed when dropped (its tunnel ended, also
/// when its task was aborted).
pub struct Tracked {
    shared: Arc<Shared>,
    id: Option<u64>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let (Some(mesh), Some(id)) = (self.shared.mesh.as_ref(), self.id) {
            mesh.registry.remove(id);
        }
    }
}

/// Registers an outbound tunnel stream (for the admin API; its pooled
/// connection is closed through the pool on revocation).
pub fn track_outbound(
    shared: &Arc<Shared>,
    pod: &Pod,
    peer: &Pod,
    transport: &str,
    remote: SocketAddr,
) -> Tracked {
    let id = shared.mesh.as_ref().map(|mesh| {
        let td = &mesh.certs.trust_domain;
        let view = TunnelView {
            direction: "outbound",
            peer: peer.spiffe_id(td),
            serial: String::new(),
            transport: transport.to_string(),
            pod: pod.key(),
            remote: remote.to_string(),
            age_s: 0,
        };
        mesh.registry.add(view, None)
    });
    Tracked { shared: Arc::clone(shared), id }
}

/// Registers an inbound tunnel connection of `pod` from the peer its
/// certificate chain `certs` names, for the admin API and for revocation
/// (`close` ends the connection with all its streams).
fn track_inbound(
    shared: &Arc<Shared>,
    certs: &[rustls_pki_types::CertificateDer<'static>],
    transport: &str,
    pod: String,
    remote: SocketAddr,
    close: Closer,
) -> Tracked {
    let id = match (shared.mesh.as_ref(), tls::peer_cert_info(certs)) {
        (Some(mesh), Ok(info)) => {
            let view = TunnelView {
                direction: "inbound",
                peer: info.identity.to_string(),
                serial: info.serial.clone(),
                transport: transport.into(),
                pod,
                remote: remote.to_string(),
                age_s: 0,
            };
            Some(mesh.registry.add(view, Some(close)))
        }
        _ => None,
    };
    Tracked { shared: Arc::clone(shared), id }
}

/// Registers each inbound QUIC connection of pod `rt` (closing it closes all
/// its streams); the registration ends with the connection.
fn track_quic_inbound(shared: &Arc<Shared>, rt: &Arc<PodRuntime>) -> quic::OnConnection {
    let (shared, pod) = (Arc::clone(shared), rt.pod.key());
    quic::OnConnection(Arc::new(move |conn: &quinn::Connection, certs| {
        let closing = conn.clone();
        let close: Closer =
            Box::new(move || closing.close(0u32.into(), b"peer certificate revoked"));
        Box::new(track_inbound(&shared, certs, "quic", pod.clone(), conn.remote_address(), close))
    }))
}

/// Starts the pod's tunnel servers (TCP 15008 on all its addresses, and
/// QUIC on each address when the node uses QUIC).
pub fn start_servers(
    shared: &Arc<Shared>,
    rt: &Arc<PodRuntime>,
    tcp: Vec<std::net::TcpListener>,
    udp: Vec<std::net::UdpSocket>,
) -> Result<(), MeshError> {
    let Some(mesh) = shared.mesh.as_ref() else { return Ok(()) };
    let pod_id = workload_id(&mesh.certs.trust_domain, &rt.pod)?;
    let server_tls = mesh.certs.server_config(&pod_id)?;
    let handler: Arc<dyn tlsmesh_tunnel::Handler> = {
        let (shared, rt) = (Arc::clone(shared), Arc::clone(rt));
        Arc::new(move |req: ConnectRequest| {
            let (shared, rt) = (Arc::clone(&shared), Arc::clone(&rt));
            async move { handle(&shared, &rt, req).await }
        })
    };
    for l in tcp {
        let Ok(l) = tokio::net::TcpListener::from_std(l) else { continue };
        tokio::spawn(tcp_accept_loop(
            Arc::clone(shared),
            Arc::clone(rt),
            l,
            Arc::clone(&server_tls),
            Arc::clone(&handler),
        ));
    }
    for sock in udp {
        let qcfg = quic::server_config(&server_tls, &mesh.client.quic().config().clone())?;
        if let Err(e) = quic::tune_udp_socket(&sock) {
            warn!(pod = %rt.pod.key(), error = %e, "cannot raise the QUIC socket buffers");
        }
        let endpoint = match quinn::Endpoint::new(
            quinn::EndpointConfig::default(),
            Some(qcfg),
            sock,
            Arc::new(quinn::TokioRuntime),
        ) {
            Ok(e) => e,
            Err(e) => {
                warn!(pod = %rt.pod.key(), error = %e, "cannot start the QUIC server");
                continue;
            }
        };
        let mut stop = rt.shutdown.subscribe();
        let h = Arc::clone(&handler);
        let ctx = quic::ServerCtx {
            on_connection: Some(track_quic_inbound(shared, rt)),
            ..quic::ServerCtx::default()
        };
        tokio::spawn(async move {
            let ep = endpoint.clone();
            tokio::select! {
                () = quic::serve(endpoint, ctx, h) => {}
                _ = stop.wait_for(|v| *v) => ep.close(0u32.into(), b"pod removed"),
            }
        });
    }
    Ok(())
}

async fn tcp_accept_loop(
    shared: Arc<Shared>,
    rt: Arc<PodRuntime>,
    listener: tokio::net::TcpListener,
    tls: Arc<rustls::ServerConfig>,
    handler: Arc<dyn tlsmesh_tunnel::Handler>,
) {
    let mut stop = rt.shutdown.subscribe();
    let mut draining = shared.draining.subscribe();
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = stop.wait_for(|v| *v) => return,
            _ = draining.wait_for(|v| *v) => return,
        };
        let (tcp, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                warn!(pod = %rt.pod.key(), error = %e, "tunnel accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let (shared, rt, acceptor, handler) =
            (Arc::clone(&shared), Arc::clone(&rt), acceptor.clone(), Arc::clone(&handler));
        // The task registers itself for revocation once the handshake named
        // the peer; it needs its own abort handle for that.
        let (abort_tx, abort_rx) = tokio::sync::oneshot::channel::<AbortHandle>();
        let task = tokio::spawn(async move {
            let _ = tcp.set_nodelay(true);
            let local = tcp.local_addr().unwrap_or_else(|_| {
                SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), PORT_TUNNEL)
            });
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    Stats::inc(&shared.stats.inbound_tunnel_refused);
                    let reason = tls_reason(&e);
                    warn!(pod = %rt.pod.key(), %peer, reason = %reason, "tunnel handshake refused");
                    return;
                }
                Err(_) => {
                    warn!(pod = %rt.pod.key(), %peer, "tunnel handshake timed out");
                    return;
                }
            };
            let Ok(abort) = abort_rx.await else { return };
            let _tracked = track_inbound(
                &shared,
                tls.get_ref().1.peer_certificates().unwrap_or_default(),
                "tcp",
                rt.pod.key(),
                peer,
                Box::new(move || abort.abort()),
            );
            let ctx = hbone::ServerCtx::new(local, peer);
            if let Err(e) = hbone::serve(tls, ctx, handler).await {
                tracing::debug!(%peer, error = %e, "tunnel connection ended");
            }
        });
        let _ = abort_tx.send(task.abort_handle());
    }
}

fn tls_reason(e: &std::io::Error) -> String {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(tls::rejection)
        .map_or_else(|| e.to_string(), ToString::to_string)
}

/// The decision for one tunnelled connection arriving at pod `rt`.
async fn handle(
    shared: &Shared,
    rt: &PodRuntime,
    req: ConnectRequest,
) -> Result<Accepted, Refusal> {
    let Some(mesh) = shared.mesh.as_ref() else {
        return Err(Refusal::unreachable("no identity configured"));
    };
    let refused = |r: Refusal| {
        Stats::inc(&shared.stats.inbound_tunnel_refused);
        Err(r)
    };
    let info = match tls::peer_cert_info(&req.peer_certs) {
        Ok(i) => i,
        Err(e) => return refused(Refusal::denied(format!("peer certificate unusable: {e}"))),
    };
    let Identity::Workload(peer_id) = &info.identity else {
        return refused(Refusal::denied("peer is a node, not a workload"));
    };
    if !rt.pod.ips.contains(&req.authority.ip()) {
        return refused(Refusal::malformed(format!(
            "{} is not an address of pod {}",
            req.authority.ip(),
            rt.pod.key()
        )));
    }
    let policy = Arc::clone(&mesh.policy.read().expect("policy lock"));
    let peer_uri = peer_id.to_string();
    let decision = policy.decide(
        Source { identity: Some(&peer_uri), namespace: Some(peer_id.namespace()) },
        Destination {
            namespace: &rt.pod.namespace,
            pod: &rt.pod.name,
            service_account: &rt.pod.service_account,
            port: req.authority.port(),
        },
    );
    if let Decision::Deny(reason) = decision {
        Stats::inc(&shared.stats.policy_denied);
        shared.record_deny(
            peer_id.to_string(),
            format!("{} {}", rt.pod.key(), req.authority),
            reason.clone(),
        );
        info!(peer = %peer_id, dst = %req.authority, pod = %rt.pod.key(), %reason, "tunnel connection denied by policy");
        return refused(Refusal::denied(reason));
    }
    // The claimed source address is used only if it belongs to a pod with the
    // authenticated identity; otherwise the app sees the pod's own address.
    let inv = shared.inventory();
    let src_ip = req.forwarded_for.map(|f| f.ip()).filter(|ip| {
        inv.pod_by_ip(*ip).is_some_and(|p| p.spiffe_id(&inv.trust_domain) == peer_uri)
    });
    if req.forwarded_for.is_some() && src_ip.is_none() {
        warn!(peer = %peer_id, claimed = ?req.forwarded_for, "forwarded address does not belong to the peer's identity; not used");
    }
    match deliver::connect(&rt.worker, src_ip, req.authority).await {
        Ok(up) => {
            let _ = up.set_nodelay(true);
            Stats::inc(&shared.stats.inbound_tunnel_accepted);
            Stats::inc(&shared.stats.active_connections);
            let started = Instant::now();
            let (stats, pod, peer, dst) =
                (Arc::clone(&shared.stats), rt.pod.key(), peer_uri.clone(), req.authority);
            Ok(Accepted::new(up).on_close(move |o| {
                Stats::dec(&stats.active_connections);
                Stats::add(&stats.bytes_to_pods, o.a_to_b);
                Stats::add(&stats.bytes_from_pods, o.b_to_a);
                info!(direction = "inbound", transport = "tunnel", src_identity = %peer, dst_pod = %pod, %dst, bytes_in = o.a_to_b, bytes_out = o.b_to_a, duration_ms = started.elapsed().as_millis(), "connection complete");
            }))
        }
        Err(e) => {
            warn!(dst = %req.authority, error = %e, "cannot connect to the destination pod");
            refused(Refusal::unreachable(e.to_string()))
        }
    }
}

/// Splices a captured client connection with a tunnel stream; returns
/// (bytes from the client, bytes to the client).
pub async fn splice(client: &mut TcpStream, stream: &mut Stream) -> std::io::Result<(u64, u64)> {
    let o = tlsmesh_tunnel::splice(client, stream).await;
    if let Some(e) = o.error {
        if o.a_to_b == 0 && o.b_to_a == 0 {
            return Err(e);
        }
    }
    Ok((o.a_to_b, o.b_to_a))
}
