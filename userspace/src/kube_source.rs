//! The Kubernetes inventory source: watches namespaces, pods, this node,
//! services and endpoint slices (tlsmesh-k8s), learns each new pod's netns
//! from the chained CNI plugin over a Unix socket, and publishes the same
//! `Inventory` the static file gives. The CNI plugin's ADD is answered only
//! once the pod is enrolled (listeners, `sk_lookup`, map entry in place), so no
//! first packet leaks. Pods that ran before tlsmesh (no ADD ever reached
//! it) are found by their address in `/proc` (`ProcNetns`) and enrolled
//! the same way. Beside it runs the policy-object watcher (`L4Policy`,
//! Istio's `AuthorizationPolicy` and `PeerAuthentication`), whose modes the
//! inventory applies and whose authorizations the daemon enforces.

use std::{path::PathBuf, sync::Arc, time::Duration};

use tlsmesh_cni::protocol::{Command, Request, Response};
use tlsmesh_k8s::{
    cni_server::{self, CniPods},
    policy::PolicyOptions,
    proc_netns::{FirstOf, ProcNetns},
};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    config::NodeConfig, inventory::Inventory, policy::mesh::MeshPolicy, scope::Scope,
    state::NodeState,
};

/// Errors starting the Kubernetes source.
#[derive(Debug, thiserror::Error)]
pub enum KubeSourceError {
    /// No usable kubeconfig / in-cluster config.
    #[error("cannot reach the Kubernetes API: {0} (in a pod: is the ServiceAccount token mounted? outside: set KUBECONFIG)")]
    Client(String),
    /// The CNI state file.
    #[error("CNI pod state {path}: {source}")]
    State { path: PathBuf, source: std::io::Error },
    /// The API never delivered a complete first inventory.
    #[error("no complete inventory from the Kubernetes API within {0:?}; check RBAC (list/watch pods, namespaces, services, endpointslices)")]
    Timeout(Duration),
    /// The policy objects could not be listed.
    #[error("the policy objects could not be listed within {0:?}; check RBAC (list/watch l4policies.tlsmesh.io, authorizationpolicies and peerauthentications.security.istio.io); the daemon does not serve with a half-known policy")]
    PolicyTimeout(Duration),
}

/// A running Kubernetes source.
#[derive(Debug, Clone)]
pub struct KubeSource {
    /// The published inventory.
    pub inventory: watch::Receiver<Inventory>,
    /// What the CNI plugin reported.
    pub pods: CniPods,
    /// Problems of the Kubernetes source (watch failures, objects not
    /// used as they are), replaced as a whole each time.
    pub problems: watch::Receiver<Vec<crate::inventory::Problem>>,
    /// The policy objects, compiled (their problems included).
    pub policy: watch::Receiver<MeshPolicy>,
}

/// Starts the watchers and waits for the first complete inventory.
pub async fn start(cfg: &NodeConfig) -> Result<KubeSource, KubeSourceError> {
    let pods = match &cfg.cni_state {
        Some(p) => CniPods::with_state_file(p.clone())
            .map_err(|source| KubeSourceError::State { path: p.clone(), source })?,
        None => CniPods::new(),
    };
    let client =
        kube::Client::try_default().await.map_err(|e| KubeSourceError::Client(e.to_string()))?;
    let (tx, mut rx) = watch::channel(Inventory::default());
    let (problems_tx, problems) = watch::channel(Vec::new());
    let (policy_tx, mut policy) = watch::channel(MeshPolicy::default());
    let opts = tlsmesh_k8s::Options {
        // The CNI plugin's record first; pods it never saw (running before
        // tlsmesh) by their address in /proc.
        resolver: Arc::new(FirstOf(pods.clone(), ProcNetns::new())),
        refresh: pods.changed(),
        problems: Some(problems_tx),
        policy: Some(policy.clone()),
        ..tlsmesh_k8s::Options::new(Some(cfg.node.clone()), cfg.trust_domain.clone())
    };
    // Owned by their channels: each `run` returns when the last receiver
    // (the daemon's `KubeSource`) is gone.
    tokio::spawn(tlsmesh_k8s::policy::run(client.clone(), PolicyOptions::default(), policy_tx));
    tokio::spawn(tlsmesh_k8s::run(client, opts, tx));
    let limit = Duration::from_secs(60);
    tokio::time::timeout(limit, rx.changed())
        .await
        .map_err(|_| KubeSourceError::Timeout(limit))?
        .map_err(|_| KubeSourceError::Timeout(limit))?;
    info!(pods = rx.borrow().pods.len(), "first inventory from the Kubernetes API");
    tokio::time::timeout(limit, policy.changed())
        .await
        .map_err(|_| KubeSourceError::PolicyTimeout(limit))?
        .map_err(|_| KubeSourceError::PolicyTimeout(limit))?;
    info!(
        authorizations = policy.borrow().authorizations.len(),
        problems = policy.borrow().problems.len(),
        "policy objects listed"
    );
    Ok(KubeSource { inventory: rx, pods, problems, policy })
}

/// Serves the CNI plugin in `scope`: ADD waits until the pod is enrolled
/// (or known not to be), DEL forgets it.
pub fn serve_cni(scope: &Scope, path: PathBuf, source: KubeSource, state: Arc<NodeState>) {
    scope.spawn(async move {
        let handler = move |req: Request| {
            let (source, state) = (source.clone(), Arc::clone(&state));
            async move { handle(req, source, &state).await }
        };
        if let Err(e) = cni_server::serve(&path, handler).await {
            warn!(socket = %path.display(), error = %e, "CNI socket failed; new pods cannot be enrolled before they start");
        }
    });
}

async fn handle(req: Request, source: KubeSource, state: &NodeState) -> Response {
    let key = format!("{}/{}", req.pod_namespace, req.pod_name);
    match req.command {
        Command::Del => {
            source.pods.forget(&req);
            Response::Ok
        }
        Command::Add => {
            // The netns this sandbox lives in: a re-created sandbox (new
            // netns, same pod) must not be answered on the strength of the
            // previous sandbox's enrollment.
            let netns = req.netns.as_deref().filter(|n| !n.is_empty()).map(PathBuf::from);
            source.pods.record(&req);
            let mut rx = source.inventory.clone();
            let Some(pod) = cni_server::wait_for_pod(&mut rx, &key, Duration::from_secs(15)).await
            else {
                return Response::Error { message: format!("pod {key} not seen from the Kubernetes API within 15 s; the runtime will retry") };
            };
            let Some(mode) = pod.mode else {
                return Response::NotEnrolled {
                    reason: format!(
                        "pod {key}: namespace not labelled tlsmesh.io/mode or pod opted out"
                    ),
                };
            };
            // Wait until the reconcile has set the pod up.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
            while tokio::time::Instant::now() < deadline {
                if state.pod(&key).is_some_and(|e| netns.is_none() || e.pod.netns == netns) {
                    info!(pod = %key, %mode, "pod enrolled before its containers start");
                    return Response::Enrolled { mode: mode.to_string() };
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Response::Error {
                message: format!(
                    "pod {key} could not be enrolled within 15 s; see the tlsmesh daemon log"
                ),
            }
        }
    }
}
