//! Prometheus metrics on :15020 `/metrics` (prometheus-client) and readiness
//! on :15021 `/healthz/ready`.
//!
//! The daemon counts with lock-free atomics (`stats`); a collector turns a
//! snapshot of them, the kernel-side counters and the certificate state into
//! metrics at scrape time. The tunnel handshake latency is a real histogram.

use std::{
    convert::Infallible,
    fmt::Write as _,
    sync::{Arc, LazyLock, Weak},
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{service::service_fn, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::ConstCounter,
        gauge::ConstGauge,
        histogram::{exponential_buckets, Histogram},
        MetricType,
    },
    registry::Registry,
};

use crate::node::Shared;
use tlsmesh_common::counter;

/// Tunnel connection set-up time (TCP + TLS handshake), seconds.
pub static HANDSHAKE_SECONDS: LazyLock<Histogram> =
    LazyLock::new(|| Histogram::new(exponential_buckets(0.000_25, 2.0, 14)));

#[derive(Debug)]
struct DaemonCollector {
    shared: Weak<Shared>,
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
        let Some(shared) = self.shared.upgrade() else { return Ok(()) };
        let s = shared.stats.snapshot();
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
            ],
        )?;
        counter(
            &mut enc,
            "tlsmesh_policy_denied",
            "Tunnel connections denied by L4 policy",
            &[(&[], s.policy_denied)],
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
        let active = i64::try_from(s.active_connections).unwrap_or(i64::MAX);
        gauge(
            &mut enc,
            "tlsmesh_active_connections",
            "Connections open through the daemon",
            &[(vec![], active)],
        )?;
        let pods = i64::try_from(shared.pods.lock().expect("pods lock").len()).unwrap_or(0);
        gauge(
            &mut enc,
            "tlsmesh_enrolled_pods",
            "Pods on this node the daemon serves",
            &[(vec![], pods)],
        )?;
        let k = shared.capture.counters();
        counter(
            &mut enc,
            "tlsmesh_ebpf_events",
            "Kernel-side capture events",
            &[
                (&[("event", "captured")], k[counter::CAPTURED as usize]),
                (&[("event", "bypassed")], k[counter::BYPASSED as usize]),
                (&[("event", "daemon_skipped")], k[counter::DAEMON_SKIPPED as usize]),
                (&[("event", "orig_dst_recorded")], k[counter::ORIG_DST_RECORDED as usize]),
                (&[("event", "peer_rewritten")], k[counter::PEER_REWRITTEN as usize]),
                (&[("event", "inbound_steered")], k[counter::INBOUND_STEERED as usize]),
                (&[("event", "inbound_dropped")], k[counter::INBOUND_DROPPED as usize]),
                (&[("event", "inbound_delivery")], k[counter::INBOUND_DELIVERY as usize]),
                (&[("event", "delivery_recorded")], k[counter::DELIVERY_RECORDED as usize]),
            ],
        )?;
        let enrolled = i64::try_from(shared.capture.enrolled().len()).unwrap_or(0);
        gauge(
            &mut enc,
            "tlsmesh_ebpf_map_entries",
            "Entries in the eBPF maps",
            &[(vec![("map".into(), "enrolled".into())], enrolled)],
        )?;
        if let Some(mesh) = &shared.mesh {
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
pub fn registry(shared: &Arc<Shared>) -> Registry {
    let mut r = Registry::default();
    r.register_collector(Box::new(DaemonCollector { shared: Arc::downgrade(shared) }));
    r.register(
        "tlsmesh_tunnel_handshake_seconds",
        "Tunnel connection set-up time (TCP + TLS)",
        HANDSHAKE_SECONDS.clone(),
    );
    r
}

/// Why the daemon is not ready, or `Ok`.
pub fn readiness(shared: &Shared) -> Result<(), String> {
    if !*shared.ready.borrow() {
        return Err("starting".into());
    }
    if *shared.draining.borrow() {
        return Err("draining".into());
    }
    let inv = shared.inventory();
    // A pod whose netns is not known yet (Kubernetes: scheduled, CNI ADD not
    // yet run) cannot be enrolled yet and does not hold readiness back; the
    // CNI plugin's ADD waits for its enrollment instead.
    let wanted: Vec<String> = inv
        .enrolled_on(&shared.cfg.node)
        .iter()
        .filter(|p| p.netns.is_some())
        .map(|p| p.key())
        .collect();
    let pods = shared.pods.lock().expect("pods lock");
    let missing: Vec<&String> = wanted.iter().filter(|k| !pods.contains_key(*k)).collect();
    if !missing.is_empty() {
        return Err(format!("pods not enrolled yet: {missing:?}"));
    }
    if let Some(mesh) = &shared.mesh {
        let have: std::collections::HashSet<String> =
            mesh.certs.snapshot().into_iter().map(|c| c.identity).collect();
        let lacking: Vec<String> = pods
            .values()
            .map(|p| p.pod.spiffe_id(&inv.trust_domain))
            .filter(|id| !have.contains(id))
            .collect();
        if !lacking.is_empty() {
            return Err(format!("no certificate yet for {lacking:?}"));
        }
    }
    Ok(())
}

/// Serves `/metrics` (when `metrics`) or `/healthz/ready` on `listener`.
pub async fn serve(listener: tokio::net::TcpListener, shared: Arc<Shared>, metrics: bool) {
    let registry = Arc::new(registry(&shared));
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
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
                        (false, "/healthz/ready") => match readiness(&shared) {
                            Ok(()) => (StatusCode::OK, "ready\n".into(), "text/plain"),
                            Err(why) => {
                                let mut s = String::new();
                                let _ = writeln!(s, "not ready: {why}");
                                (StatusCode::SERVICE_UNAVAILABLE, s, "text/plain")
                            }
                        },
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
