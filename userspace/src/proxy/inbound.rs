//! Plaintext arriving at an enrolled pod (steered to its 15006 listener):
//! refused for strict pods, relayed to the app for node probes and, when
//! policy allows a source without a principal, for permissive pods.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;
use tracing::{info, info_span, warn, Instrument};

use super::{dropped, reset, Proxy};
use crate::{
    authz,
    conns::{ConnInfo, Direction, Failure, Route},
    inventory::{self, InboundVerdict, Pod},
    state::PodEntry,
    stats::Stats,
};

/// Serves one plaintext connection to `pod` from `peer`.
pub async fn serve(p: Proxy, pod: Arc<PodEntry>, client: TcpStream, peer: SocketAddr) {
    let dst = match client.local_addr() {
        Ok(d) => d,
        Err(e) => {
            dropped(&p.stats, &pod, peer, &format!("no local address: {e}"));
            return;
        }
    };
    let inv = p.state.inventory();
    let verdict = inventory::inbound_verdict(pod.mode, peer.ip(), inv.probe_sources());
    let span = info_span!("inbound", dst_pod = %pod.key(), src = %peer, %dst, ?verdict);
    async move {
        let peer_pod = inv.pod_by_ip(peer.ip());
        let info = |route: Route| ConnInfo {
            direction: Direction::Inbound,
            route,
            pod: pod.key(),
            src: peer,
            dst,
            peer_pod: peer_pod.map(Pod::key),
            src_identity: None,
            dst_identity: Some(pod.identity.clone()),
            transport: None,
            dst_service: None,
        };
        let route = match verdict {
            InboundVerdict::Refuse => {
                Stats::inc(&p.stats.inbound_plaintext_refused);
                p.conns.refused(&info(Route::Plaintext), Failure::PlaintextRefused);
                info!(mode = %pod.mode, "plaintext connection to a strict pod refused");
                p.state.record_deny(
                    peer.to_string(),
                    format!("{} {dst}", pod.key()),
                    "plaintext to a strict pod".into(),
                );
                reset(client);
                return;
            }
            InboundVerdict::AcceptPlaintext => {
                if let Err(reason) =
                    authz::authorize_plaintext(&p.state.policy(), &pod.pod, peer, dst)
                {
                    Stats::inc(&p.stats.policy_denied);
                    p.conns.refused(&info(Route::Plaintext), Failure::PolicyDenied);
                    info!(%reason, "plaintext connection denied by policy");
                    p.state.record_deny(peer.to_string(), format!("{} {dst}", pod.key()), reason);
                    reset(client);
                    return;
                }
                Stats::inc(&p.stats.inbound_plaintext_accepted);
                Route::Plaintext
            }
            InboundVerdict::AcceptProbe => {
                Stats::inc(&p.stats.inbound_probe_accepted);
                Route::Probe
            }
        };
        let app = match pod.net.connect(dst).await {
            Ok(a) => a,
            Err(e) => {
                p.conns.refused(&info(route), Failure::ConnectFailed);
                warn!(error = %e, "the pod's application refused the connection");
                reset(client);
                return;
            }
        };
        let guard = p.conns.open(info(route));
        // The remote client is the first side, the pod's app the second.
        super::relay_sockets(guard, client, app, false, tlsmesh_tunnel::SplicePoint::default())
            .await;
    }
    .instrument(span)
    .await;
}
