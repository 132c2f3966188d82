//! The daemon's side of the tunnel: outbound streams to enrolled pods on
//! other nodes ([`Mesh::open`]), the per-pod tunnel servers (`server`: TCP
//! HBONE and QUIC on the pod's address, port 15008), the pure inbound
//! authorization (`authz`) and the registry of open tunnels for revocation
//! (`registry`).
//!
//! Addressing follows HBONE: the tunnel connection goes to the destination
//! pod's IP:15008 and the destination node's daemon takes it inside that
//! pod's netns. Pooling is per (source identity and certificate serial,
//! destination identity, destination pod address).

pub mod registry;
pub mod server;

use std::{
    future::Future,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    pin::Pin,
    sync::Arc,
};

use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use tlsmesh_identity::{tls, Identity, SpiffeId};
use tlsmesh_tunnel::{quic, ConnectHeaders, PoolKey, ResumeExt, Stream};
use tracing::warn;

use crate::{
    certs::{workload_id, Certs},
    config::Transport,
    conns::PausedStream,
    inventory::Pod,
    resumable::RequestError,
};
use registry::Registry;
use tlsmesh_common::{DAEMON_MARK, PORT_TUNNEL};

/// Errors of the outbound tunnel path.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    /// Identity or TLS config trouble.
    #[error(transparent)]
    Certs(#[from] crate::certs::CertsError),
    /// SPIFFE id.
    #[error(transparent)]
    Spiffe(#[from] tlsmesh_identity::spiffe::SpiffeError),
    /// The tunnel.
    #[error(transparent)]
    Tunnel(#[from] tlsmesh_tunnel::Error),
    /// The QUIC endpoint could not be made.
    #[error("cannot open the QUIC client socket in the node netns: {0}")]
    QuicSocket(std::io::Error),
}

impl MeshError {
    /// A short, stable label (for access logs and failure counters).
    pub fn kind(&self) -> &'static str {
        match self {
            MeshError::Certs(_) | MeshError::Spiffe(_) => "identity",
            MeshError::Tunnel(e) => e.kind(),
            MeshError::QuicSocket(_) => "quic_socket",
        }
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
    /// What its UDP socket got (buffers, GSO/GRO; `/config_dump`).
    pub quic_socket: Option<quic::UdpTuning>,
    /// Open tunnels.
    pub registry: Arc<Registry>,
    /// Resumable tunnel streams, by token.
    pub streams: Arc<crate::resumable::Registry>,
    /// Tunnel connection set-up time (TCP + TLS handshake), seconds.
    pub handshake_seconds: Histogram,
    /// The mark on tunnel sockets (`DAEMON_MARK`: capture lets them pass);
    /// `None` only where nothing captures (in-process tests, no root).
    socket_mark: Option<u32>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").finish_non_exhaustive()
    }
}

impl Mesh {
    /// Builds the tunnel side; `transport` decides whether a QUIC endpoint is made.
    pub fn new(certs: Certs, transport: Transport) -> Result<Self, MeshError> {
        let mut quic_socket = None;
        let quic_endpoint = match transport {
            Transport::Quic => {
                let sock = std::net::UdpSocket::bind((Ipv6Addr::UNSPECIFIED, 0))
                    .or_else(|_| std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)))
                    .map_err(MeshError::QuicSocket)?;
                match quic::tune_udp_socket(&sock) {
                    Ok(t) => {
                        if t.gso_segments <= 1 || t.gro_segments <= 1 {
                            warn!(gso_segments = t.gso_segments, gro_segments = t.gro_segments,
                                "the kernel offers no UDP GSO/GRO: QUIC sends and receives one datagram per system call (slow; TCP is faster here)");
                        }
                        quic_socket = Some(t);
                    }
                    Err(e) => warn!(error = %e, "cannot raise the QUIC socket buffers"),
                }
                Some(
                    quinn::Endpoint::new(
                        quinn::EndpointConfig::default(),
                        None,
                        sock,
                        Arc::new(quinn::TokioRuntime),
                    )
                    .map_err(MeshError::QuicSocket)?,
                )
            }
            Transport::Tcp => None,
        };
        Ok(Self {
            certs,
            client: tlsmesh_tunnel::Client::new(tlsmesh_tunnel::ClientConfig::default()),
            quic_endpoint,
            quic_socket,
            registry: Arc::new(Registry::default()),
            streams: Arc::default(),
            handshake_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 14)),
            socket_mark: Some(DAEMON_MARK),
        })
    }

    /// The same, with unmarked tunnel sockets (setting a mark needs
    /// `CAP_NET_ADMIN`): for running the mesh in a test process where no
    /// capture program would see them anyway.
    #[must_use]
    pub fn without_socket_mark(mut self) -> Self {
        self.socket_mark = None;
        self
    }

    /// Closes tunnels whose peer the deny list now refuses: inbound tunnel
    /// connections by the client's identity or certificate serial, and
    /// pooled outbound connections by the destination's identity (their
    /// streams end with them).
    pub fn enforce_deny_list(&self) -> usize {
        let deny = &self.certs.deny;
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

    /// Opens a tunnel stream from `src` (a pod on this node) to `dst` (the
    /// original destination, an enrolled pod `dst_pod` on another node),
    /// carrying `early` (what the client already sent) with the request.
    pub async fn open(
        &self,
        src: &Pod,
        dst_pod: &Pod,
        dst: SocketAddr,
        client_port: u16,
        early: bytes::Bytes,
        resume: ResumeExt,
    ) -> Result<Stream, MeshError> {
        let td = &self.certs.trust_domain;
        let src_id = workload_id(td, src)?;
        let dst_id = workload_id(td, dst_pod)?;
        let headers = ConnectHeaders {
            forwarded_for: same_family(&src.ips, dst.ip())
                .map(|ip| SocketAddr::new(ip, client_port)),
            traceparent: None,
            baggage: Some(format!(
                "k8s.namespace.name={},k8s.pod.name={}",
                src.namespace, src.name
            )),
            resume,
        };
        self.dial(&src_id, &dst_id, dst, &headers, early).await
    }

    /// Opens a tunnel stream as `src_id` (a pod this node serves) to `dst`,
    /// whose node must prove `dst_id`.
    async fn dial(
        &self,
        src_id: &SpiffeId,
        dst_id: &SpiffeId,
        dst: SocketAddr,
        headers: &ConnectHeaders,
        early: bytes::Bytes,
    ) -> Result<Stream, MeshError> {
        let tls = self.certs.client_config(src_id, dst_id).await?;
        let tunnel_addr = SocketAddr::new(dst.ip(), PORT_TUNNEL);
        // The pool key carries the source certificate's serial: after a
        // renewal, new streams open a connection with the new certificate
        // while the old connection serves its live streams until it idles out.
        let serial = self.certs.manager.cert_info(src_id).map(|i| i.serial).unwrap_or_default();
        let key = PoolKey {
            src_identity: format!("{src_id}#{serial}"),
            dst_identity: dst_id.to_string(),
            dst: tunnel_addr,
        };
        // A QUIESCE goes over TCP: it must arrive while the peer node's
        // daemons may be between QUIC sockets (a replaced daemon's UDP port
        // passes to the new one only once it is gone), and a lost answer
        // would cost the stream.
        let quic_ok = !matches!(headers.resume, ResumeExt::Quiesce { .. });
        let dial = self.quic_endpoint.as_ref().filter(|_| quic_ok).map(|endpoint| quic::Dial {
            endpoint: endpoint.clone(),
            tls: Arc::clone(&tls),
            server_name: tls::sni_string(dst_id),
        });
        let sni = tls::sni_for(dst_id);
        let histogram = self.handshake_seconds.clone();
        let mark = self.socket_mark;
        let connector = move || async move {
            let sock = if tunnel_addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            if let Some(m) = mark {
                socket2::SockRef::from(&sock).set_mark(m)?;
            }
            sock.set_nodelay(true)?;
            let started = std::time::Instant::now();
            let tcp = sock.connect(tunnel_addr).await?;
            let tls = tokio_rustls::TlsConnector::from(tls).connect(sni, tcp).await;
            histogram.observe(started.elapsed().as_secs_f64());
            tls
        };
        Ok(self.client.connect(&key, dst, headers, early, dial.as_ref(), connector).await?)
    }
}

impl crate::resumable::Dialer for Mesh {
    fn request<'a>(
        &'a self,
        stream: &'a PausedStream,
        ext: ResumeExt,
    ) -> Pin<Box<dyn Future<Output = Result<Stream, RequestError>> + Send + 'a>> {
        Box::pin(async move {
            let parse = |s: &str| {
                s.parse::<SpiffeId>()
                    .map_err(|e| RequestError::Failed(format!("identity {s:?}: {e}")))
            };
            let (src, dst) = (parse(&stream.local_identity)?, parse(&stream.peer_identity)?);
            let headers = ConnectHeaders { resume: ext, ..ConnectHeaders::default() };
            match self.dial(&src, &dst, stream.peer, &headers, bytes::Bytes::new()).await {
                Ok(s) => Ok(s),
                Err(MeshError::Tunnel(tlsmesh_tunnel::Error::Refused {
                    status, reason, ..
                })) => Err(RequestError::Refused { status, reason }),
                Err(e) => Err(RequestError::Failed(e.to_string())),
            }
        })
    }
}

fn same_family(ips: &[IpAddr], like: IpAddr) -> Option<IpAddr> {
    ips.iter().copied().find(|ip| ip.is_ipv4() == like.is_ipv4())
}
