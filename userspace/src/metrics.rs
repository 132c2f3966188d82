//! Prometheus metrics on :15020 `/metrics` (prometheus-client) and readiness
//! on :15021 `/healthz/ready`.
//!
//! The daemon counts with lock-free atomics (`stats`); a collector turns a
//! snapshot of them, the connection table, the kernel-side counters and the
//! certificate state into metrics at scrape time. The tunnel handshake
//! latency is a real histogram (owned by `mesh`). Per workload pair
//! (`pairs`): counted once per connection by the connection table's
//! observer. Also: certificate and trust-root expiry timestamps, build and
//! TLS settings info, readiness, and the process's CPU, memory and file
//! descriptors (`process_*`, as the Prometheus client libraries name them).

mod pairs;

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

pub use pairs::{Pairs, PairsObserver};

use crate::{
    config::MetricsConfig,
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
    /// The workload-pair series.
    pub pairs: Arc<Pairs>,
}

impl Pairs {
    /// The workload-pair series for `conns`, which from now on tells them
    /// about every connection; workloads are looked up in `state`'s
    /// inventory when a connection opens.
    pub fn install(conns: &ConnTable, cfg: &MetricsConfig, state: &Arc<NodeState>) -> Arc<Pairs> {
        let state = Arc::clone(state);
        let workload_of = move |key: &str| {
            state.inventory().inv.pods.get(key).map(|p| p.workload_name().to_owned())
        };
        let pairs = Arc::new(Pairs::new(cfg, Box::new(workload_of)));
        conns.observe(Arc::new(PairsObserver(Arc::clone(&pairs))));
        pairs
    }
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
            "tlsmesh_handover_connections",
            "Open connections handed over to the next daemon of the node at an upgrade, or taken over from the previous one",
            &[
                (&[("direction", "handed_over")], s.handed_over),
                (&[("direction", "taken_over")], s.taken_over),
            ],
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
        src.pairs.encode(&mut enc)?;
        let ready = i64::from(readiness(&src.state, src.mesh.as_deref()).is_ok());
        gauge(
            &mut enc,
            "tlsmesh_ready",
            "1 when the daemon is ready (/healthz/ready)",
            &[(vec![], ready)],
        )?;
        info(&mut enc)?;
        process(&mut enc)?;
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
            let stamps: Vec<(Vec<(String, String)>, i64)> =
                certs.into_iter().map(|(l, left)| (l, now.unix_timestamp() + left)).collect();
            gauge(
                &mut enc,
                "tlsmesh_certificate_expiration_timestamp_seconds",
                "When each workload certificate in use expires (Unix time)",
                &stamps,
            )?;
            let roots: Vec<(Vec<(String, String)>, i64)> =
                mesh.certs.bundle.roots().iter().filter_map(|r| root_expiry(r)).collect();
            gauge(
                &mut enc,
                "tlsmesh_trust_root_expiration_timestamp_seconds",
                "When each root of the trust bundle expires (Unix time)",
                &roots,
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

/// `fingerprint` (short SHA-256, as `/config_dump` `trust_roots`) and
/// `subject` labels and the notAfter of a root.
fn root_expiry(der: &[u8]) -> Option<(Vec<(String, String)>, i64)> {
    use sha2::Digest as _;
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let fp: String = sha2::Sha256::digest(der).iter().take(8).fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    });
    Some((
        vec![("fingerprint".into(), fp), ("subject".into(), cert.subject().to_string())],
        cert.validity().not_after.timestamp(),
    ))
}

/// Build and TLS settings, as info gauges (value 1).
fn info(enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let l = |k: &str, v: String| (k.to_string(), v);
    gauge(
        enc,
        "tlsmesh_build_info",
        "The daemon's build: version and the digest of its eBPF object",
        &[(
            vec![
                l("version", env!("CARGO_PKG_VERSION").into()),
                l("ebpf_object", crate::capture::object_digest()),
            ],
            1,
        )],
    )?;
    let p = tlsmesh_identity::tls::provider();
    let join = |v: Vec<String>| v.join(",");
    gauge(
        enc,
        "tlsmesh_tls_info",
        "The TLS settings in force for tunnels: protocol, cipher suites and key-exchange groups in preference order",
        &[(
            vec![
                l("protocol", "TLSv1.3".into()),
                l(
                    "cipher_suites",
                    join(p.cipher_suites.iter().map(|c| format!("{:?}", c.suite())).collect()),
                ),
                l(
                    "key_exchange_groups",
                    join(p.kx_groups.iter().map(|g| format!("{:?}", g.name())).collect()),
                ),
            ],
            1,
        )],
    )
}

/// The process's own figures from `/proc/self` (CPU, resident memory, open
/// file descriptors, start time), named as the Prometheus client libraries do.
fn process(enc: &mut DescriptorEncoder) -> std::fmt::Result {
    let Some(p) = ProcessStats::read() else { return Ok(()) };
    let mut m = enc.encode_descriptor(
        "process_cpu_seconds",
        "Total user and system CPU time spent in seconds",
        None,
        MetricType::Counter,
    )?;
    ConstCounter::new(p.cpu_seconds).encode(m.encode_family(&Vec::<(String, String)>::new())?)?;
    for (name, help, v) in [
        ("process_resident_memory_bytes", "Resident memory size in bytes", p.rss_bytes),
        ("process_open_fds", "Number of open file descriptors", p.open_fds),
        (
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
            p.start_time,
        ),
    ] {
        let mut m = enc.encode_descriptor(name, help, None, MetricType::Gauge)?;
        ConstGauge::new(v).encode(m.encode_family(&Vec::<(String, String)>::new())?)?;
    }
    Ok(())
}

/// What `/proc/self` says about the daemon.
#[derive(Debug, Clone, Copy, PartialEq)]
struct ProcessStats {
    cpu_seconds: f64,
    rss_bytes: i64,
    open_fds: i64,
    start_time: i64,
}

impl ProcessStats {
    fn read() -> Option<Self> {
        // SAFETY: sysconf only reads system configuration values.
        let (tick, page) =
            unsafe { (libc::sysconf(libc::_SC_CLK_TCK), libc::sysconf(libc::_SC_PAGESIZE)) };
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
        let btime = std::fs::read_to_string("/proc/stat").ok()?;
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
        Self::parse(&stat, &statm, &btime, tick, page, fds)
    }

    /// Pure: the figures from the files' text.
    #[expect(
        clippy::cast_precision_loss,
        reason = "CPU ticks and the clock rate stay far below 2^52"
    )]
    fn parse(
        stat: &str,
        statm: &str,
        proc_stat: &str,
        tick: i64,
        page: i64,
        fds: usize,
    ) -> Option<Self> {
        // Fields after the command name (which may hold spaces), from field 3.
        let rest = stat.rsplit_once(')')?.1.split_whitespace().collect::<Vec<_>>();
        let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
        let ticks = (field(14)? + field(15)?) as f64;
        let start_ticks = field(22)?;
        let rss_pages: i64 = statm.split_whitespace().nth(1)?.parse().ok()?;
        let btime: i64 =
            proc_stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
        let tick = tick.max(1);
        Some(Self {
            cpu_seconds: ticks / tick as f64,
            rss_bytes: rss_pages * page,
            open_fds: i64::try_from(fds).unwrap_or(i64::MAX),
            start_time: btime + i64::try_from(start_ticks).ok()? / tick,
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_figures_come_from_proc() {
        let stat = "4242 (tls mesh) S 1 4242 4242 0 -1 4194560 500 0 0 0 250 50 0 0 20 0 2 0 1000 123456 789 18446744073709551615";
        let p = ProcessStats::parse(
            stat,
            "5000 789 300 1 0 400 0",
            "cpu 1 2 3\nbtime 1700000000\n",
            100,
            4096,
            12,
        )
        .unwrap();
        assert_eq!(
            p,
            ProcessStats {
                cpu_seconds: 3.0,
                rss_bytes: 789 * 4096,
                open_fds: 12,
                start_time: 1_700_000_010
            }
        );
        assert!(ProcessStats::read().is_some(), "this process's own /proc");
    }
}
