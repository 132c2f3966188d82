//! The admin API on localhost (default 127.0.0.1:15000): `/healthz/ready`,
//! `/stats` (daemon and kernel counters), `/config_dump` (effective config,
//! enrolled pods, inventory problems), `/quitquitquit`. JSON out.

use std::{convert::Infallible, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::sync::watch;
use tracing::debug;

use crate::node::{pod_views, Shared};
use tlsmesh_common::counter;

/// Serves the admin API until the process exits.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    quit: watch::Sender<bool>,
) {
    let quit = Arc::new(quit);
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let (shared, quit) = (Arc::clone(&shared), Arc::clone(&quit));
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let (shared, quit) = (Arc::clone(&shared), Arc::clone(&quit));
                async move { Ok::<_, Infallible>(handle(&req, &shared, &quit)) }
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
pub fn kernel_counters(shared: &Shared) -> serde_json::Value {
    let c = shared.capture.counters();
    json!({
        "captured": c[counter::CAPTURED as usize],
        "bypassed": c[counter::BYPASSED as usize],
        "daemon_skipped": c[counter::DAEMON_SKIPPED as usize],
        "orig_dst_recorded": c[counter::ORIG_DST_RECORDED as usize],
        "peer_rewritten": c[counter::PEER_REWRITTEN as usize],
        "inbound_steered": c[counter::INBOUND_STEERED as usize],
        "inbound_dropped": c[counter::INBOUND_DROPPED as usize],
        "inbound_delivery": c[counter::INBOUND_DELIVERY as usize],
        "delivery_recorded": c[counter::DELIVERY_RECORDED as usize],
        "enrolled_netns": shared.capture.enrolled().len(),
    })
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

fn handle(
    req: &Request<Incoming>,
    shared: &Shared,
    quit: &watch::Sender<bool>,
) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/healthz/ready" => match crate::metrics::readiness(shared) {
            Ok(()) => (StatusCode::OK, json!("ready")),
            Err(why) => (StatusCode::SERVICE_UNAVAILABLE, json!({ "not_ready": why })),
        },
        "/logging" => {
            let level = req
                .uri()
                .query()
                .unwrap_or_default()
                .split('&')
                .find_map(|kv| kv.strip_prefix("level="));
            match level.map(crate::logging::set_level) {
                Some(Ok(())) => (StatusCode::OK, json!({ "level": level })),
                Some(Err(e)) => (StatusCode::BAD_REQUEST, json!({ "error": e })),
                None => (
                    StatusCode::BAD_REQUEST,
                    json!({ "error": "use /logging?level=debug (any RUST_LOG filter)" }),
                ),
            }
        }
        "/stats" => (
            StatusCode::OK,
            json!({ "daemon": shared.stats.snapshot(), "kernel": kernel_counters(shared) }),
        ),
        "/config_dump" => {
            let problems: Vec<String> = shared
                .problems
                .lock()
                .expect("problems lock")
                .iter()
                .map(ToString::to_string)
                .collect();
            (
                StatusCode::OK,
                json!({
                    "config": shared.cfg,
                    "pods": pod_views(shared),
                    "certificates": shared.mesh.as_ref().map(|m| m.certs.snapshot()).unwrap_or_default(),
                    "denies": shared.denies.lock().expect("denies lock").iter().cloned().collect::<Vec<_>>(),
                    "transport": shared.cfg.transport,
                    "trust_roots": shared.mesh.as_ref().map(|m| root_fingerprints(&m.certs.bundle.roots())).unwrap_or_default(),
                    "tunnels": shared.mesh.as_ref().map(|m| m.registry.list()).unwrap_or_default(),
                    "pool": shared.mesh.as_ref().map(|m| {
                        let (hc, hs) = m.client.hbone().stats();
                        let (qc, qs) = m.client.quic().stats();
                        json!({"hbone_connections": hc, "hbone_streams": hs, "quic_connections": qc, "quic_streams": qs})
                    }),
                    "problems": problems,
                    "capture": {
                        "pin_dir": shared.capture.pin_dir(),
                        "deliveries_open": shared.capture.deliveries_open(),
                        "programs": shared.capture.adoption().iter().map(|(k, v)| (k.to_string(), format!("{v:?}"))).collect::<std::collections::BTreeMap<_, _>>(),
                    },
                }),
            )
        }
        "/quitquitquit" => {
            quit.send_replace(true);
            (StatusCode::OK, json!("bye"))
        }
        _ => (
            StatusCode::NOT_FOUND,
            json!({"error": "unknown path", "paths": ["/healthz/ready", "/stats", "/config_dump", "/logging?level=", "/quitquitquit"]}),
        ),
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
