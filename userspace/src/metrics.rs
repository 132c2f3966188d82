//! Prometheus metrics on :15020 `/metrics` (prometheus-client) and readiness
//! on :15021 `/healthz/ready`.
//!
//! The daemon counts with lock-free atomics (`stats`); a collector turns a
//! snapshot of them, the connection table, the kernel-side counters and the
//! certificate state into metrics at scrape time. The tunnel handshake
//! latency is a real histogram (owned by `mesh`).

use std::{convert::Infallible, fmt::Write as _, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{service::service_fn, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{counter::ConstCounter, gauge::ConstGauge, MetricType},
    registry::Registry,
};

use crate::{
    conns::ConnTable,
    kernel::KernelCounters,
    mesh::Mesh,
    state::{self, NodeState},
    stats::Stats,
};

/// What metrics are made from.
#[derive(Clone)]
pub struct Sources {
    /// Node state.
    pub state: Arc<NodeState>,
    /// Open connections.
    pub conns: ConnTable,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Kernel counters.
    pub kernel: Arc<dyn KernelCounters>,
    /// The tunnel side.
    pub mesh: Option<Arc<Mesh>>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

#[derive(Debug)]
struct DaemonCollector {
    src: Sources,
}

fn counter(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(&[(&str, &str)], u64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, v) in samples {
        let labels: Vec<(String, String)> =
            labels.iter().map(|(k, v)| ((*k).to_string(), (*v).to_string())).collect();
        ConstCounter::new(*v).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

fn gauge(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    samples: &[(Vec<(String, String)>, i64)],
) -> std::fmt::Result {
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for (labels, v) in samples {
        ConstGauge::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

impl Collector for DaemonCollector {
    #[expect(clippy::too_many_lines, reason = "one metric family after the other")]
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let src = &self.src;
        let s = src.stats.snapshot();
        counter(
            &mut enc,
            "tlsmesh_connections_opened",
            "Connections handled, by direction and route",
            &[
                (&[("direction", "outbound"), ("route", "tunnel")], s.outbound_tunnel),
                (&[("direction", "outbound"), ("route", "local")], s.outbound_local),
                (&[("direction", "outbound"), ("route", "passthrough")], s.outbound_passthrough),
                (&[("direction", "inbound"), ("route", "tunnel")], s.inbound_tunnel_accepted),
                (&[("direction", "inbound"), ("route", "plaintext")], s.inbound_plaintext_accepted),
                (&[("direction", "inbound"), ("route", "probe")], s.inbound_probe_accepted),
            ],
        )?;
        counter(
            &mut enc,
            "tlsmesh_connections_failed",
            "Connections refused or failed, by reason",
            &[
                (
                    &[("direction", "outbound"), ("reason", "no_original_destination")],
                    s.outbound_no_orig_dst,
                ),
                (
                    &[("direction", "outbound"), ("reason", "upstream_unreachable")],
                    s.outbound_failed,
                ),
                (&[("direction", "outbound"), ("reason", "tunnel")], s.tunnel_failed),
                (
                    &[("direction", "inbound"), ("reason", "tunnel_refused")],
                    s.inbound_tunnel_refused,
                ),
                (
                    &[("direction", "inbound"), ("reason", "plaintext_strict")],
                    s.inbound_plaintext_refused,
                ),
                (&[("direction", "any"), ("reason", "dropped")], s.connections_dropped),
            ],
        )?;
        counter(
            &mut enc,
            "tlsmesh_policy_denied",
            "Connections denied by L4 policy when they opened (tunnel, local, plaintext)",
            &[(&[], s.policy_denied)],
        )?;
        counter(
            &mut enc,
            "tlsmesh_policy_closed",
            "Open connections closed because a new policy denies them",
            &[(&[], s.policy_closed)],
        )?;
        counter(
            &mut enc,
            "tlsmesh_plaintext_accepted",
            "Plaintext connections accepted by permissive pods",
            &[(&[], s.inbound_plaintext_accepted)],
        )?;
        counter(
            &mut enc,
            "tlsmesh_bytes",
            "Bytes relayed, by direction relative to the pods",
            &[
                (&[("direction", "from_pods")], s.bytes_from_pods),
                (&[("direction", "to_pods")], s.bytes_to_pods),
            ],
        )?;
        let active = i64::try_from(src.conns.len()).unwrap_or(i64::MAX);
        gauge(
            &mut enc,
            "tlsmesh_active_connections",
            "Connections open through the daemon",
            &[(vec![], active)],
        )?;
        let pods = i64::try_from(src.state.pod_count()).unwrap_or(0);
        gauge(
            &mut enc,
            "tlsmesh_enrolled_pods",
            "Pods on this node the daemon serves",
            &[(vec![], pods)],
        )?;
        let k = src.kernel.counters();
        let events: Vec<(Vec<(&str, &str)>, u64)> =
            k.iter().map(|(name, v)| (vec![("event", *name)], *v)).collect();
        let events: Vec<(&[(&str, &str)], u64)> =
            events.iter().map(|(l, v)| (l.as_slice(), *v)).collect();
        counter(&mut enc, "tlsmesh_ebpf_events", "Kernel-side capture events", &events)?;
        let enrolled = i64::try_from(src.kernel.enrolled_netns()).unwrap_or(0);
        gauge(
            &mut enc,
            "tlsmesh_ebpf_map_entries",
            "Entries in the eBPF maps",
            &[(vec![("map".into(), "enrolled".into())], enrolled)],
        )?;
        if let Some(mesh) = &src.mesh {
            let now = time::OffsetDateTime::now_utc();
            let certs: Vec<(Vec<(String, String)>, i64)> = mesh
                .certs
                .snapshot()
                .into_iter()
                .filter_map(|c| {
                    let t = time::OffsetDateTime::parse(
                        &c.not_after,
                        &time::format_description::well_known::Rfc3339,
                    )
                    .ok()?;
                    Some((vec![("identity".to_string(), c.identity)], (t - now).whole_seconds()))
                })
                .collect();
            gauge(
                &mut enc,
                "tlsmesh_certificate_expiry_seconds",
                "Seconds until each workload certificate expires",
                &certs,
            )?;
            let (hc, hs) = mesh.client.hbone().stats();
            let (qc, qs) = mesh.client.quic().stats();
            let n = |x: usize| i64::try_from(x).unwrap_or(i64::MAX);
            gauge(
                &mut enc,
                "tlsmesh_pool_connections",
                "Pooled tunnel connections",
                &[
                    (vec![("transport".into(), "tcp".into())], n(hc)),
                    (vec![("transport".into(), "quic".into())], n(qc)),
                ],
            )?;
            gauge(
                &mut enc,
                "tlsmesh_pool_streams",
                "Open tunnel streams",
                &[
                    (vec![("transport".into(), "tcp".into())], n(hs)),
                    (vec![("transport".into(), "quic".into())], n(qs)),
                ],
            )?;
        }
        Ok(())
    }
}

/// The registry for a daemon.
pub fn registry(src: &Sources) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(DaemonCollector { src: src.clone() }));
    if let Some(mesh) = &src.mesh {
        r.register(
            "tlsmesh_tunnel_handshake_seconds",
            "Tunnel connection set-up time (TCP + TLS)",
            mesh.handshake_seconds.clone(),
        );
    }
    r
}

/// Why the daemon is not ready, or `Ok`.
pub fn readiness(state: &NodeState, mesh: Option<&Mesh>) -> Result<(), String> {
    let inputs = state.readiness_inputs();
    match mesh {
        Some(m) => {
            let have: std::collections::HashSet<String> =
                m.certs.snapshot().into_iter().map(|c| c.identity).collect();
            state::readiness(&inputs, Some(&|id: &str| have.contains(id)))
        }
        None => state::readiness(&inputs, None),
    }
}

/// Serves `/metrics` (when `metrics`) or `/healthz/ready` on `listener`.
/// Runs until the process exits (readiness must keep answering "draining"
/// while the daemon drains).
pub async fn serve(listener: tokio::net::TcpListener, src: Sources, metrics: bool) {
    let registry = Arc::new(registry(&src));
    let shared = Arc::new(src);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let (shared, registry) = (Arc::clone(&shared), Arc::clone(&registry));
        tokio::spawn(async move {
            let svc = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (shared, registry) = (Arc::clone(&shared), Arc::clone(&registry));
                async move {
                    let (status, body, ctype) = match (metrics, req.uri().path()) {
                        (true, "/metrics") => {
                            let mut out = String::new();
                            match prometheus_client::encoding::text::encode(&mut out, &registry) {
                                Ok(()) => (
                                    StatusCode::OK,
                                    out,
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                ),
                                Err(e) => {
                                    (StatusCode::INTERNAL_SERVER_ERROR, e.to_string(), "text/plain")
                                }
                            }
                        }
                        (false, "/healthz/ready") => {
                            match readiness(&shared.state, shared.mesh.as_deref()) {
                                Ok(()) => (StatusCode::OK, "ready\n".into(), "text/plain"),
                                Err(why) => {
                                    let mut s = String::new();
                                    let _ = writeln!(s, "not ready: {why}");
                                    (StatusCode::SERVICE_UNAVAILABLE, s, "text/plain")
                                }
                            }
                        }
                        _ => (StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
                    };
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = status;
                    r.headers_mut().insert(
                        hyper::header::CONTENT_TYPE,
                        hyper::header::HeaderValue::from_static(ctype),
                    );
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
