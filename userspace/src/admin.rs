//! The admin API on localhost (default 127.0.0.1:15000), JSON out:
//! `GET /healthz/ready`, `GET /stats` (daemon and kernel counters),
//! `GET /config_dump` (effective config, enrolled pods, open connections,
//! tunnels, certificates, problems), `POST /logging?level=…&ebpf=on|off`
//! (the daemon's filter; the eBPF programs' decision log), `GET
//! /spiffe_bundle` (the trust bundle as a SPIFFE bundle, a JWK Set),
//! `POST /quitquitquit`. State changes only on POST (a GET there is 405).
//!
//! One daemon owns the port at a time (no `SO_REUSEPORT`): while an old and
//! a new daemon overlap, `tlsmesh status` reaches the old one until it starts
//! draining and lets go of the port; the new one binds it as soon as it is
//! free (retried every 250 ms).

use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::{
    config::NodeConfig,
    conns::ConnTable,
    kernel::{DecisionSwitch, KernelCounters},
    mesh::Mesh,
    metrics,
    scope::Drain,
    state::NodeState,
    stats::Stats,
};

/// What the admin API reads.
#[derive(Clone)]
pub struct Admin {
    /// The effective configuration.
    pub cfg: Arc<NodeConfig>,
    /// Node state.
    pub state: Arc<NodeState>,
    /// Open connections.
    pub conns: ConnTable,
    /// Counters.
    pub stats: Arc<Stats>,
    /// Kernel counters.
    pub kernel: Arc<dyn KernelCounters>,
    /// The eBPF programs' decision log switch.
    pub ebpf_log: Arc<dyn DecisionSwitch>,
    /// The tunnel side.
    pub mesh: Option<Arc<Mesh>>,
    /// Pin directory and how each program came to be attached.
    pub capture: serde_json::Value,
    /// Started by `/quitquitquit`.
    pub drain: Drain,
}

/// Serves the admin API on `addr` until the daemon drains. When the port is
/// held by another daemon, binding is retried until it is free.
pub async fn serve(addr: SocketAddr, admin: Admin) {
    let mut warned = false;
    let listener = loop {
        match std::net::TcpListener::bind(addr).and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::TcpListener::from_std(l)
        }) {
            Ok(l) => break l,
            Err(e) => {
                if !warned {
                    warn!(%addr, error = %e, "admin API port busy (a draining daemon still has it?); retrying until it is free");
                    warned = true;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            () = admin.drain.signalled() => return,
        }
    };
    if warned {
        info!(%addr, "admin API bound");
    }
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            // Let go of the port for the daemon that replaces this one.
            () = admin.drain.signalled() => return,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(handle(&req, &admin)) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "admin connection error");
            }
        });
    }
}

/// Kernel counters by name.
pub fn kernel_counters(k: &dyn KernelCounters) -> serde_json::Value {
    let mut m: serde_json::Map<String, serde_json::Value> =
        k.counters().into_iter().map(|(n, v)| (n.to_string(), json!(v))).collect();
    m.insert("enrolled_netns".into(), json!(k.enrolled_netns()));
    serde_json::Value::Object(m)
}

/// Short SHA-256 fingerprints (hex, 16 chars) of DER certificates.
pub fn root_fingerprints(roots: &[rustls_pki_types::CertificateDer<'_>]) -> Vec<String> {
    use sha2::Digest as _;
    use std::fmt::Write as _;
    roots
        .iter()
        .map(|r| {
            sha2::Sha256::digest(r.as_ref()).iter().take(8).fold(String::new(), |mut s, b| {
                let _ = write!(s, "{b:02x}");
                s
            })
        })
        .collect()
}

/// The paths, with the method each takes.
const PATHS: [&str; 6] = [
    "GET /healthz/ready",
    "GET /stats",
    "GET /config_dump",
    "GET /spiffe_bundle",
    "POST /logging?level=&ebpf=on|off",
    "POST /quitquitquit",
];

fn handle(req: &Request<Incoming>, a: &Admin) -> Response<Full<Bytes>> {
    let post = req.method() == Method::POST;
    let (status, body) = match req.uri().path() {
        "/logging" | "/quitquitquit" if !post => (
            StatusCode::METHOD_NOT_ALLOWED,
            json!({ "error": format!("{} changes the daemon's state: use POST", req.uri().path()) }),
        ),
        "/healthz/ready" => match metrics::readiness(&a.state, a.mesh.as_deref()) {
            Ok(()) => (StatusCode::OK, json!("ready")),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, json!({ "not_ready": why })),
        },
        "/logging" => logging(req.uri().query().unwrap_or_default(), a.ebpf_log.as_ref()),
        "/stats" => {
            let mut daemon = serde_json::to_value(a.stats.snapshot()).unwrap_or_default();
            daemon["active_connections"] = json!(a.conns.len());
            (
                StatusCode::OK,
                json!({ "daemon": daemon, "kernel": kernel_counters(a.kernel.as_ref()) }),
            )
        }
        "/config_dump" => (StatusCode::OK, config_dump(a)),
        "/spiffe_bundle" => match a.mesh.as_deref() {
            None => (
                StatusCode::NOT_FOUND,
                json!({ "error": "no trust bundle: the tunnel is off (no CA configured)" }),
            ),
            Some(m) => {
                let b = m.certs.bundle.current();
                match tlsmesh_identity::trust::spiffe_bundle(b.roots(), b.generation()) {
                    Ok(jwks) => (StatusCode::OK, jwks),
                    Err(e) => {
                        (StatusCode::INTERNAL_SERVER_ERROR, json!({ "error": e.to_string() }))
                    }
                }
            }
        },
        "/quitquitquit" => {
            info!("quitquitquit: draining");
            a.drain.start();
            (StatusCode::OK, json!("bye"))
        }
        _ => (StatusCode::NOT_FOUND, json!({"error": "unknown path", "paths": PATHS})),
    };
    let mut r =
        Response::new(Full::new(Bytes::from(serde_json::to_vec_pretty(&body).unwrap_or_default())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

/// `POST /logging?level=F&ebpf=on|off`: either or both.
fn logging(query: &str, ebpf: &dyn DecisionSwitch) -> (StatusCode, serde_json::Value) {
    let arg = |name: &str| query.split('&').find_map(|kv| kv.strip_prefix(name));
    let (level, switch) = (arg("level="), arg("ebpf="));
    if level.is_none() && switch.is_none() {
        return (
            StatusCode::BAD_REQUEST,
            json!({ "error": "use POST /logging?level=debug (any RUST_LOG filter) and/or \
                              ?ebpf=on|off (the eBPF programs' capture decisions)" }),
        );
    }
    let on = match switch {
        None => None,
        Some("on") => Some(true),
        Some("off") => Some(false),
        Some(v) => {
            return (
                StatusCode::BAD_REQUEST,
                json!({ "error": format!("ebpf={v}: use on or off") }),
            )
        }
    };
    if let Some(Err(e)) = level.map(crate::logging::set_level) {
        return (StatusCode::BAD_REQUEST, json!({ "error": e }));
    }
    if let Some(Err(e)) = on.map(|on| ebpf.set_logging(on)) {
        return (StatusCode::BAD_REQUEST, json!({ "error": e }));
    }
    if let Some(on) = on {
        info!(on, "eBPF decision log switched");
    }
    let mut body = json!({ "ebpf": if ebpf.logging() { "on" } else { "off" } });
    if let Some(l) = level {
        body["level"] = json!(l);
    }
    (StatusCode::OK, body)
}

fn config_dump(a: &Admin) -> serde_json::Value {
    let mesh = a.mesh.as_deref();
    let mut capture = a.capture.clone();
    capture["deliveries_open"] = json!(a.kernel.deliveries_open());
    capture["reserved_counters"] = json!(a.kernel.reserved_counters());
    capture["decision_log"] = json!(match (a.ebpf_log.can_log(), a.ebpf_log.logging()) {
        (false, _) => "unavailable",
        (true, true) => "on",
        (true, false) => "off",
    });
    let inv = a.state.inventory();
    json!({
        "pid": std::process::id(),
        "inventory": {
            "nodes": inv.inv.nodes.len(),
            "pods": inv.inv.pods.len(),
            "service_ports": inv.inv.services.len(),
        },
        "version": env!("CARGO_PKG_VERSION"),
        "ebpf_object": capture["object"],
        "config": &*a.cfg,
        "pods": a.state.pod_views(),
        "connections": a.conns.list(),
        "certificates": mesh.map(|m| m.certs.snapshot()).unwrap_or_default(),
        "denies": a.state.denies(),
        "transport": a.cfg.transport,
        "trust_roots": mesh.map(|m| root_fingerprints(&m.certs.bundle.roots())).unwrap_or_default(),
        "tunnels": mesh.map(|m| m.registry.list()).unwrap_or_default(),
        "pool": mesh.map(|m| {
            let (hc, hs) = m.client.hbone().stats();
            let (qc, qs) = m.client.quic().stats();
            json!({"hbone_connections": hc, "hbone_streams": hs, "quic_connections": qc, "quic_streams": qs,
                "quic_socket": m.quic_socket, "quic_paths": m.client.quic().paths()})
        }),
        "problems": a.state.problems(),
        "capture": capture,
    })
}

/// The static part of `/config_dump`'s `capture`: pin dir and programs.
pub fn capture_info(capture: &crate::capture::Capture) -> serde_json::Value {
    let programs: BTreeMap<String, String> =
        capture.adoption().iter().map(|(k, v)| ((*k).to_string(), v.to_string())).collect();
    json!({
        "pin_dir": capture.pin_dir(),
        "object": capture.digest(),
        "previous_object": capture.previous(),
        "programs": programs,
    })
}
