//! The node daemon's wiring, and nothing else: start-up order, the main loop
//! (inventory changes, policy and deny-list files, signals) and the drain.
//! Nothing imports this module; `main.rs` calls [`run`] and [`uninstall`].
//!
//! Start-up: capture installed (or re-adopted) → inventory → identities and
//! tunnel → admin, metrics, readiness servers → first reconcile → ready.
//! Once ready it listens for a connection handover (`handover`).
//! Shutdown (SIGTERM, SIGINT, `POST /quitquitquit`): readiness says
//! draining, the admin port is let go, listeners stop accepting, HBONE peers
//! get GOAWAY, QUIC endpoints refuse new connections; when a newer daemon of
//! this node listens for the handover, every relay of two sockets moves to
//! it; the daemon exits when the connection table is empty or at the drain
//! deadline, ending every pod's scope. Pinned programs and maps stay: capture keeps failing closed
//! until a daemon takes over (or `tlsmesh node --uninstall` removes them).

use std::{net::SocketAddr, sync::Arc, time::Duration, time::SystemTime};

use tokio::sync::watch;
use tracing::{info, warn};

use crate::{
    admin::{self, Admin},
    capture::{Capture, CaptureError, CaptureSettings},
    config::{InventorySource, NodeConfig},
    conns::ConnTable,
    inventory::{self, Inventory},
    kernel::{DecisionSwitch as _, KernelCounters, OrigDst},
    mesh::{server::Inbound, Mesh},
    metrics::{self, Sources},
    pods::Reconciler,
    policies::Policies,
    proxy::Proxy,
    scope::{Drain, Scope},
    state::{NodeState, ProblemSource, StateSettings},
    stats::Stats,
};
use tlsmesh_common::{DAEMON_MARK, PORT_OUTBOUND};

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// Capture could not be installed.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// The inventory could not be read.
    #[error(transparent)]
    Inventory(#[from] inventory::InventoryError),
    /// The Kubernetes source could not start.
    #[error(transparent)]
    Kube(#[from] crate::kube_source::KubeSourceError),
    /// Identities could not be set up.
    #[error("workload identity: {0}")]
    Certs(#[from] crate::certs::CertsError),
    /// The policy file is bad.
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    /// The tunnel could not be set up.
    #[error(transparent)]
    Mesh(#[from] crate::mesh::MeshError),
}

/// Gives the heap that start-up freed back to the kernel (glibc keeps it
/// otherwise): loading the eBPF object parses the kernel's BTF, and the
/// first reconcile and certificates allocate and free more. Measured: idle
/// RSS −1.9 MiB (anonymous 3.7 → 1.7 MiB), nothing in use is touched.
fn return_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim has no preconditions and is thread-safe; it only
    // releases free memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// A listener with `SO_REUSEPORT`, so a new daemon can bind beside the old
/// one (metrics and readiness: both daemons answer for themselves).
fn reuse_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(s.into())
}

/// Runs the node daemon until SIGTERM/SIGINT or `/quitquitquit`, then drains.
#[expect(
    clippy::too_many_lines,
    reason = "the start-up wiring reads best top to bottom in one place"
)]
pub async fn run(cfg: NodeConfig) -> Result<(), AppError> {
    info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "tlsmesh node starting");
    let capture = Arc::new(Capture::install(&CaptureSettings {
        pin_dir: cfg.pin_dir.clone(),
        cgroup_root: cfg.cgroup_root.clone(),
        outbound_port: PORT_OUTBOUND,
        daemon_mark: DAEMON_MARK,
        bypass_ports: cfg.bypass_ports.clone(),
        bypass_cidrs: cfg.cidrs(),
        object: cfg.ebpf_object.clone(),
        log_decisions: cfg.ebpf_log,
    })?);
    for (prog, how) in capture.adoption() {
        info!(program = prog, adoption = %how, object = capture.digest(), "eBPF program in place");
    }
    let kube = match cfg.inventory_source {
        InventorySource::Kubernetes => Some(crate::kube_source::start(&cfg).await?),
        InventorySource::Static => None,
    };
    let (inv, inv_problems) = match &kube {
        Some(k) => (k.inventory.borrow().clone(), Vec::new()),
        None => inventory::load(&cfg.inventory)?,
    };
    // The policy applies with or without the tunnel (local delivery,
    // plaintext to permissive pods).
    let mut policies = Policies::new(match &cfg.policy {
        Some(p) => crate::policy::Policy::load(p)?,
        None => crate::policy::Policy::default(),
    });
    if let Some(k) = &kube {
        policies.set_objects(k.policy.borrow().clone());
    }
    let mesh = if let Some(certs) =
        crate::certs::Certs::setup(&cfg.identity, &cfg.node, &inv).await?
    {
        info!(transport = ?cfg.transport, "tunnel enabled");
        Some(Arc::new(Mesh::new(certs, cfg.transport)?))
    } else {
        warn!("no CA configured (identity.ca_dir or identity.ca_addr): the tunnel is off; connections to enrolled pods on other nodes are refused");
        None
    };

    let stats = Arc::new(Stats::default());
    let conns = ConnTable::new(Arc::clone(&stats));
    let node_state = Arc::new(NodeState::new(StateSettings {
        node: cfg.node.clone(),
        probe_sources: cfg.probe_sources.clone(),
        allow_node_probes: cfg.allow_node_probes,
    }));
    let root = Scope::new();
    let drain = Drain::new();
    let kernel: Arc<dyn KernelCounters> = capture.clone();
    let ebpf_log = Arc::new(crate::ebpf_log::DecisionLog::new(
        Arc::clone(&capture),
        Arc::clone(&node_state),
        root.clone(),
    ));
    if cfg.ebpf_log {
        if let Err(e) = ebpf_log.set_logging(true) {
            warn!(error = %e, "the eBPF programs' decisions cannot be logged");
        }
    }
    let orig_dst: Arc<dyn OrigDst> = capture.clone();
    let proxy = Proxy {
        state: Arc::clone(&node_state),
        conns: conns.clone(),
        stats: Arc::clone(&stats),
        orig_dst,
        mesh: mesh.clone(),
        drain: drain.clone(),
    };
    let inbound = mesh.as_ref().map(|m| Inbound {
        state: Arc::clone(&node_state),
        conns: conns.clone(),
        stats: Arc::clone(&stats),
        mesh: Arc::clone(m),
        drain: drain.clone(),
    });
    let handover_proxy = proxy.clone();
    let me = crate::handover::Hello {
        version: crate::handover::VERSION,
        node: cfg.node.clone(),
        instance: rand::random(),
    };
    let mut reconciler = Reconciler::new(
        Arc::clone(&node_state),
        Arc::clone(&capture),
        proxy,
        inbound,
        root.clone(),
        cfg.inventory_source == InventorySource::Kubernetes,
    );

    let cfg = Arc::new(cfg);
    root.spawn(admin::serve(
        cfg.admin_addr,
        Admin {
            cfg: Arc::clone(&cfg),
            state: Arc::clone(&node_state),
            conns: conns.clone(),
            stats: Arc::clone(&stats),
            kernel: Arc::clone(&kernel),
            ebpf_log: ebpf_log.clone(),
            mesh: mesh.clone(),
            capture: admin::capture_info(&capture),
            drain: drain.clone(),
        },
    ));
    let sources = Sources {
        state: Arc::clone(&node_state),
        conns: conns.clone(),
        stats: Arc::clone(&stats),
        kernel,
        mesh: mesh.clone(),
        pairs: metrics::Pairs::install(&conns, &cfg.metrics, &node_state),
    };
    for (addr, is_metrics) in [(cfg.metrics_addr, true), (cfg.readiness_addr, false)] {
        match reuse_listener(addr) {
            Ok(l) => root.spawn(metrics::serve(l, sources.clone(), is_metrics)),
            Err(e) => {
                warn!(%addr, error = %e, "cannot serve {}", if is_metrics { "metrics" } else { "readiness" });
            }
        }
    }

    let mut files = Files::new(&cfg);
    for p in &inv_problems {
        warn!(subject = %p.subject, problem = %p.message, "inventory entry skipped");
    }
    install(&node_state, mesh.as_deref(), inv);
    node_state.set_problems(ProblemSource::Inventory, inv_problems);
    policies.put_in_force(&node_state, &conns, &stats);
    reconciler.reconcile().await;
    let mut feed = kube.as_ref().map(|k| k.inventory.clone());
    let mut kube_problems = kube.as_ref().map(|k| k.problems.clone());
    let mut kube_policy = kube.as_ref().map(|k| k.policy.clone());
    if let Some(k) = kube {
        crate::kube_source::serve_cni(&root, cfg.cni_socket.clone(), k, Arc::clone(&node_state));
    }
    node_state.set_started();
    crate::handover::listen(
        &root,
        &cfg.handover_socket,
        me.clone(),
        Arc::clone(&node_state),
        handover_proxy,
    );
    info!(pods = node_state.pod_count(), "daemon ready: serving every enrolled pod it can");
    return_freed_heap();

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("install SIGHUP handler");
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.inventory_poll_ms.max(50)));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if feed.is_none() {
                    files.reload_inventory(&node_state, mesh.as_deref(), false);
                }
                if let Some(file) = files.follow_policy_and_deny_list(mesh.as_deref()) {
                    policies.set_file(file);
                    policies.put_in_force(&node_state, &conns, &stats);
                }
                // Also re-checks served pods' netns and retries failed ones.
                reconciler.reconcile().await;
            }
            Some(p) = next_value(&mut kube_problems) => {
                node_state.set_problems(ProblemSource::Kubernetes, p);
            }
            Some(objects) = next_value(&mut kube_policy) => {
                policies.set_objects(objects);
                policies.put_in_force(&node_state, &conns, &stats);
            }
            Some(inv) = next_value(&mut feed) => {
                install(&node_state, mesh.as_deref(), inv);
                reconciler.reconcile().await;
            }
            _ = hup.recv() => {
                files.reload_inventory(&node_state, mesh.as_deref(), true);
                reconciler.reconcile().await;
            }
            _ = term.recv() => { info!("SIGTERM: draining"); break; }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: draining"); break; }
            () = drain.signalled() => break,
        }
    }
    node_state.set_draining();
    drain.start();
    match crate::handover::Successor::find(&cfg.handover_socket, &me).await {
        Ok(next) => {
            info!(successor = next.hello().instance, "handing connections over to the new daemon");
            let next = Arc::new(next);
            root.spawn(Arc::clone(&next).read_answers());
            conns.hand_over(next);
        }
        Err(why) => info!(%why, "no connection handover: draining"),
    }
    let deadline = Duration::from_secs(cfg.drain_timeout_secs);
    if tokio::time::timeout(deadline, conns.empty()).await.is_ok() {
        info!("drained: no open connections");
    } else {
        warn!(open = conns.len(), "drain deadline reached; closing the remaining connections");
    }
    reconciler.end_all().await;
    if tokio::time::timeout(Duration::from_secs(5), root.end()).await.is_err() {
        warn!("some tasks did not stop within 5 s of the end of the drain");
    }
    Ok(())
}

/// Installs a new inventory: identities follow it, then the state.
fn install(state: &NodeState, mesh: Option<&Mesh>, inv: Inventory) {
    if let Some(m) = mesh {
        m.certs.on_inventory(&inv, state.node());
    }
    state.set_inventory(inv);
}

/// The files the daemon follows, with the modification times last seen.
struct Files {
    cfg: Arc<NodeConfig>,
    inventory: Option<SystemTime>,
    policy: Option<SystemTime>,
}

fn mtime(p: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl Files {
    fn new(cfg: &Arc<NodeConfig>) -> Self {
        Self {
            cfg: Arc::clone(cfg),
            inventory: mtime(&cfg.inventory),
            policy: cfg.policy.as_deref().and_then(mtime),
        }
    }

    /// Reloads the static inventory if its file changed (or `force`).
    fn reload_inventory(&mut self, state: &NodeState, mesh: Option<&Mesh>, force: bool) {
        let m = mtime(&self.cfg.inventory);
        if !force && m == self.inventory {
            return;
        }
        self.inventory = m;
        match inventory::load(&self.cfg.inventory) {
            Ok((inv, problems)) => {
                for p in &problems {
                    warn!(subject = %p.subject, problem = %p.message, "inventory entry skipped");
                }
                install(state, mesh, inv);
                state.set_problems(ProblemSource::Inventory, problems);
            }
            Err(e) => warn!(error = %e, "inventory reload failed; keeping the previous one"),
        }
    }

    /// Re-reads the deny list (closing tunnels of peers that are now
    /// revoked) and the policy file: its new rules when it changed.
    fn follow_policy_and_deny_list(
        &mut self,
        mesh: Option<&Mesh>,
    ) -> Option<crate::policy::Policy> {
        if let Some(mesh) = mesh {
            if mesh.certs.reload_deny_list() {
                let closed = mesh.enforce_deny_list();
                info!(closed, "deny list changed");
            }
        }
        let p = self.cfg.policy.as_ref()?;
        let m = mtime(p);
        if m == self.policy {
            return None;
        }
        self.policy = m;
        match crate::policy::Policy::load(p) {
            Ok(pol) => {
                info!(rules = pol.rules.len(), "policy file reloaded");
                Some(pol)
            }
            Err(e) => {
                warn!(error = %e, "policy reload failed; keeping the previous rules");
                None
            }
        }
    }
}

/// The next value of a Kubernetes feed (pending forever without one).
async fn next_value<T: Clone>(feed: &mut Option<watch::Receiver<T>>) -> Option<T> {
    match feed {
        Some(rx) => {
            if rx.changed().await.is_err() {
                *feed = None;
                return None;
            }
            let inv = rx.borrow_and_update().clone();
            Some(inv)
        }
        None => std::future::pending().await,
    }
}

/// `tlsmesh node --uninstall`: removes every pinned object, and the
/// delivery routing the daemon programmed in the inventory's pods on this
/// node (when the inventory can be read).
pub fn uninstall(cfg: &NodeConfig) -> Result<usize, CaptureError> {
    match inventory::load(&cfg.inventory) {
        Ok((inv, _)) => {
            for pod in inv.pods.values().filter(|p| p.node == cfg.node) {
                if let Some(path) = &pod.netns {
                    crate::deliver::teardown_path(path);
                }
            }
        }
        Err(e) => warn!(
            error = %e,
            "not removing the delivery routing from pod namespaces (pass the daemon's --node and --inventory to remove it too)"
        ),
    }
    Capture::uninstall(&cfg.pin_dir)
}
