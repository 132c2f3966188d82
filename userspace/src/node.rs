//! The node daemon's wiring: install capture, enroll this node's pods from
//! the inventory, run their in-pod listeners, follow inventory changes, and
//! serve the admin API. The decisions it applies live in `inventory` (pure);
//! the per-connection work lives in `proxy`.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, SystemTime},
};

use serde::Serialize;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::{
    capture::{Capture, CaptureError, CaptureSettings},
    config::NodeConfig,
    inventory::{self, Inventory, Mode, Pod, Problem},
    netns::{Netns, NetnsError, NetnsWorker, SocketOpts},
    proxy,
    stats::Stats,
};
use tlsmesh_common::{DAEMON_MARK, PORT_INBOUND, PORT_OUTBOUND, PORT_TUNNEL};

/// Errors that stop the daemon from starting.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
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
    /// A socket for the tunnel could not be created.
    #[error("tunnel set-up: {0}")]
    Io(#[from] std::io::Error),
    /// The admin API could not bind.
    #[error("cannot bind the admin API on {addr}: {source} (is another tlsmesh running?)")]
    Admin { addr: SocketAddr, source: std::io::Error },
}

/// Why a pod could not be enrolled.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The pod has no netns path.
    #[error("pod {0} has no netns path in the inventory")]
    NoNetns(String),
    /// Namespace trouble.
    #[error(transparent)]
    Netns(#[from] NetnsError),
    /// Map or attach trouble.
    #[error(transparent)]
    Capture(#[from] CaptureError),
    /// Transparent delivery set-up.
    #[error(transparent)]
    Deliver(#[from] crate::deliver::DeliverError),
    /// Tunnel servers.
    #[error(transparent)]
    Mesh(#[from] crate::mesh::MeshError),
    /// The set-up task itself failed (panicked or was cancelled).
    #[error("pod set-up did not finish: {0}")]
    SetUp(String),
}

/// Everything the connection handlers need, shared.
#[derive(Debug)]
pub struct Shared {
    /// Configuration.
    pub cfg: NodeConfig,
    /// The capture plane.
    pub capture: Capture,
    /// Current inventory.
    pub inventory: RwLock<Arc<Inventory>>,
    /// Running pods on this node by `namespace/name`.
    pub pods: Mutex<BTreeMap<String, Arc<PodRuntime>>>,
    /// Counters.
    pub stats: Arc<Stats>,
    /// The tunnel side (absent when no CA is configured).
    pub mesh: Option<crate::mesh::Mesh>,
    /// Round-robin state of Service resolution.
    pub services: Mutex<crate::inventory::ServicePicker>,
    /// True once SIGTERM arrived: listeners close, open connections finish.
    pub draining: watch::Sender<bool>,
    /// The most recent refusals (policy denies, strict plaintext), newest last.
    pub denies: Mutex<std::collections::VecDeque<DenyRecord>>,
    /// Problems of the last inventory load and enrollment.
    pub problems: Mutex<Vec<Problem>>,
    /// True once the first reconcile has completed.
    pub ready: watch::Sender<bool>,
}

impl Shared {
    /// The current inventory.
    pub fn inventory(&self) -> Arc<Inventory> {
        Arc::clone(&self.inventory.read().expect("inventory lock"))
    }

    /// The running pod with key `namespace/name`.
    pub fn pod(&self, key: &str) -> Option<Arc<PodRuntime>> {
        self.pods.lock().expect("pods lock").get(key).cloned()
    }

    /// Addresses allowed to probe strict pods in plaintext.
    pub fn probe_sources(&self) -> HashSet<IpAddr> {
        let mut s: HashSet<IpAddr> = self.cfg.probe_sources.iter().copied().collect();
        if self.cfg.allow_node_probes {
            s.extend(self.inventory().node_addresses(&self.cfg.node));
        }
        s
    }
}

/// One refused connection, for `tlsmesh status`.
#[derive(Debug, Clone, Serialize)]
pub struct DenyRecord {
    /// RFC 3339 time.
    pub at: String,
    /// Source (identity or address).
    pub source: String,
    /// Destination pod and address.
    pub destination: String,
    /// Why.
    pub reason: String,
}

impl Shared {
    /// Remembers a refusal (the last 64 are kept).
    pub fn record_deny(&self, source: String, destination: String, reason: String) {
        let at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut d = self.denies.lock().expect("denies lock");
        if d.len() >= 64 {
            d.pop_front();
        }
        d.push_back(DenyRecord { at, source, destination, reason });
    }
}

/// A listener with `SO_REUSEPORT`, so a new daemon can bind beside the old one.
pub fn reuse_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
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

/// A pod this daemon serves.
#[derive(Debug)]
pub struct PodRuntime {
    /// The inventory entry.
    pub pod: Pod,
    /// Its mode.
    pub mode: Mode,
    /// Its netns cookie.
    pub cookie: u64,
    /// Inode of its netns file when enrolled (to notice replacement).
    pub netns_ino: u64,
    /// Socket factory inside its netns.
    pub worker: NetnsWorker,
    /// Flips to true when the pod is removed: its listeners and connections end.
    pub shutdown: watch::Sender<bool>,
}

/// Pod summary for the admin API.
#[derive(Debug, Serialize)]
pub struct PodView {
    /// `namespace/name`.
    pub key: String,
    /// strict / permissive.
    pub mode: Mode,
    /// SPIFFE identity.
    pub identity: String,
    /// Addresses.
    pub ips: Vec<IpAddr>,
    /// netns cookie.
    pub netns_cookie: u64,
}

/// Runs the node daemon until SIGTERM/SIGINT or `/quitquitquit`.
#[expect(
    clippy::too_many_lines,
    reason = "the start-up wiring reads best top to bottom in one place"
)]
pub async fn run(cfg: NodeConfig) -> Result<(), NodeError> {
    info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "tlsmesh node starting");
    let capture = Capture::install(&CaptureSettings {
        pin_dir: cfg.pin_dir.clone(),
        cgroup_root: cfg.cgroup_root.clone(),
        outbound_port: PORT_OUTBOUND,
        daemon_mark: DAEMON_MARK,
        bypass_ports: cfg.bypass_ports.clone(),
        bypass_cidrs: cfg.cidrs(),
    })?;
    for (prog, how) in capture.adoption() {
        info!(program = prog, adoption = ?how, "cgroup program in place");
    }
    let kube = match cfg.inventory_source {
        crate::config::InventorySource::Kubernetes => Some(crate::kube_source::start(&cfg).await?),
        crate::config::InventorySource::Static => None,
    };
    let inv = match &kube {
        Some(k) => k.inventory.borrow().clone(),
        None => inventory::load(&cfg.inventory)?.0,
    };
    let mesh = if let Some(certs) =
        crate::certs::Certs::setup(&cfg.identity, &cfg.node, &inv).await?
    {
        let policy = match &cfg.policy {
            Some(p) => crate::policy::Policy::load(p)?,
            None => crate::policy::Policy::default(),
        };
        info!(transport = ?cfg.transport, rules = policy.rules.len(), "tunnel enabled");
        Some(crate::mesh::Mesh::new(certs, cfg.transport, policy)?)
    } else {
        warn!("no CA configured (identity.ca_dir or identity.ca_addr): the tunnel is off; connections to enrolled pods on other nodes are refused");
        None
    };
    let (ready, _) = watch::channel(false);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        capture,
        inventory: RwLock::new(Arc::new(inv)),
        pods: Mutex::new(BTreeMap::new()),
        stats: Arc::new(Stats::default()),
        problems: Mutex::new(Vec::new()),
        ready,
        mesh,
        services: Mutex::new(crate::inventory::ServicePicker::new()),
        draining: watch::channel(false).0,
        denies: Mutex::new(std::collections::VecDeque::new()),
    });
    let (quit_tx, mut quit_rx) = watch::channel(false);
    let admin = reuse_listener(cfg.admin_addr)
        .map_err(|source| NodeError::Admin { addr: cfg.admin_addr, source })?;
    tokio::spawn(crate::admin::serve(admin, Arc::clone(&shared), quit_tx));
    for (addr, metrics) in [(cfg.metrics_addr, true), (cfg.readiness_addr, false)] {
        match reuse_listener(addr) {
            Ok(l) => {
                tokio::spawn(crate::metrics::serve(l, Arc::clone(&shared), metrics));
            }
            Err(e) => {
                warn!(%addr, error = %e, "cannot serve {}", if metrics { "metrics" } else { "readiness" });
            }
        }
    }

    let mut last_mtime = None;
    let mut policy_mtime =
        cfg.policy.as_ref().and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    let mut feed = kube.as_ref().map(|k| k.inventory.clone());
    if let Some(k) = kube {
        let inv = k.inventory.borrow().clone();
        install(&shared, inv).await;
        crate::kube_source::serve_cni(cfg.cni_socket.clone(), k, Arc::clone(&shared));
    } else {
        reload(&shared, &mut last_mtime, true).await?;
    }
    shared.ready.send_replace(true);
    info!(pods = shared.pods.lock().expect("pods lock").len(), "ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("install SIGTERM handler");
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("install SIGHUP handler");
    let mut tick = tokio::time::interval(Duration::from_millis(cfg.inventory_poll_ms.max(50)));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if feed.is_none() {
                    if let Err(e) = reload(&shared, &mut last_mtime, false).await {
                        warn!(error = %e, "inventory reload failed; keeping the previous one");
                    }
                }
                follow_policy_and_deny_list(&shared, &mut policy_mtime);
            }
            Some(inv) = next_inventory(&mut feed) => install(&shared, inv).await,
            _ = hup.recv() => {
                last_mtime = None;
                if let Err(e) = reload(&shared, &mut last_mtime, false).await {
                    warn!(error = %e, "inventory reload failed; keeping the previous one");
                }
            }
            _ = term.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = tokio::signal::ctrl_c() => { info!("SIGINT: shutting down"); break; }
            _ = quit_rx.changed() => { info!("quitquitquit: shutting down"); break; }
        }
    }
    // Drain: listeners close (a daemon started beside this one takes the
    // queued and new connections: SO_REUSEPORT + tcp_migrate_req in each pod
    // netns), open connections get until the deadline to finish. Pinned
    // programs and maps stay: capture keeps failing closed until a daemon
    // takes over (or `tlsmesh node --uninstall` removes them).
    shared.draining.send_replace(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(cfg.drain_timeout_secs);
    loop {
        let open = shared.stats.snapshot().active_connections;
        if open == 0 {
            info!("drained: no open connections");
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            warn!(open, "drain deadline reached; closing the remaining connections");
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pods: Vec<_> = shared.pods.lock().expect("pods lock").values().cloned().collect();
    for p in pods {
        p.shutdown.send_replace(true);
    }
    Ok(())
}

/// Reloads the inventory if its file changed (or `force`), then reconciles.
async fn reload(
    shared: &Arc<Shared>,
    last: &mut Option<SystemTime>,
    force: bool,
) -> Result<(), NodeError> {
    let path = &shared.cfg.inventory;
    let mtime = std::fs::metadata(path).and_then(|m| m.modified()).ok();
    let changed = force || mtime != *last;
    if changed {
        let (inv, mut problems) = inventory::load(path)?;
        *last = mtime;
        for p in &problems {
            warn!(subject = %p.subject, problem = %p.message, "inventory entry skipped");
        }
        if let Some(m) = &shared.mesh {
            m.certs.on_inventory(&inv, &shared.cfg.node);
        }
        *shared.inventory.write().expect("inventory lock") = Arc::new(inv);
        problems.extend(reconcile(shared).await);
        *shared.problems.lock().expect("problems lock") = problems;
    } else {
        // Pods whose netns vanished or was replaced are re-checked every
        // tick, and pods that could not be enrolled are retried.
        let gone = vanished_pods(shared);
        let retry = !shared.problems.lock().expect("problems lock").is_empty();
        if retry && gone.is_empty() {
            let (_, mut problems) = inventory::load(path).unwrap_or_default();
            problems.extend(reconcile(shared).await);
            *shared.problems.lock().expect("problems lock") = problems;
        }
        if !gone.is_empty() {
            for key in &gone {
                warn!(pod = %key, "pod netns vanished or was replaced; releasing it");
                remove_pod(shared, key);
            }
            let problems = reconcile(shared).await;
            shared.problems.lock().expect("problems lock").extend(problems);
        }
    }
    Ok(())
}

/// The next inventory from the Kubernetes feed (pending forever without one).
async fn next_inventory(feed: &mut Option<watch::Receiver<Inventory>>) -> Option<Inventory> {
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

/// Installs a new inventory and reconciles the pods with it.
async fn install(shared: &Arc<Shared>, inv: Inventory) {
    if let Some(m) = &shared.mesh {
        m.certs.on_inventory(&inv, &shared.cfg.node);
    }
    shared.services.lock().expect("services lock").retain_known(&inv);
    *shared.inventory.write().expect("inventory lock") = Arc::new(inv);
    let problems = reconcile(shared).await;
    *shared.problems.lock().expect("problems lock") = problems;
}

/// Re-reads the policy file when it changed and the deny list; closes tunnels
/// of peers that are now revoked.
fn follow_policy_and_deny_list(shared: &Shared, policy_mtime: &mut Option<SystemTime>) {
    let Some(mesh) = &shared.mesh else { return };
    if let Some(p) = &shared.cfg.policy {
        let m = std::fs::metadata(p).and_then(|m| m.modified()).ok();
        if m != *policy_mtime {
            *policy_mtime = m;
            match crate::policy::Policy::load(p) {
                Ok(pol) => {
                    info!(rules = pol.rules.len(), "policy reloaded");
                    *mesh.policy.write().expect("policy lock") = Arc::new(pol);
                }
                Err(e) => warn!(error = %e, "policy reload failed; keeping the previous rules"),
            }
        }
    }
    if mesh.certs.reload_deny_list() {
        let closed = mesh.enforce_deny_list();
        info!(closed, "deny list changed");
    }
}

fn vanished_pods(shared: &Shared) -> Vec<String> {
    let pods = shared.pods.lock().expect("pods lock");
    pods.iter()
        .filter(|(_, rt)| {
            let path = rt.pod.netns.clone().unwrap_or_default();
            std::fs::metadata(&path).map_or(true, |m| m.ino() != rt.netns_ino)
        })
        .map(|(k, _)| k.clone())
        .collect()
}

/// Brings the running pods in line with the inventory. Returns the problems.
async fn reconcile(shared: &Arc<Shared>) -> Vec<Problem> {
    let inv = shared.inventory();
    let desired: BTreeMap<String, Pod> =
        inv.enrolled_on(&shared.cfg.node).into_iter().map(|p| (p.key(), p.clone())).collect();
    let running: Vec<(String, Arc<PodRuntime>)> = shared
        .pods
        .lock()
        .expect("pods lock")
        .iter()
        .map(|(k, v)| (k.clone(), Arc::clone(v)))
        .collect();
    for (key, rt) in &running {
        match desired.get(key) {
            Some(p) if p == &rt.pod => {}
            _ => {
                info!(pod = %key, "pod removed or changed; releasing");
                remove_pod(shared, key);
            }
        }
    }
    let mut problems = Vec::new();
    for (key, pod) in desired {
        if shared.pods.lock().expect("pods lock").contains_key(&key) {
            continue;
        }
        if pod.netns.is_none()
            && shared.cfg.inventory_source == crate::config::InventorySource::Kubernetes
        {
            tracing::debug!(pod = %key, "waiting for the CNI plugin to report the pod's netns");
            continue;
        }
        match add_pod(shared, &pod).await {
            Ok(rt) => {
                info!(pod = %key, mode = %rt.mode, cookie = rt.cookie, ips = ?pod.ips, "pod enrolled");
                shared.pods.lock().expect("pods lock").insert(key, rt);
            }
            Err(e) => {
                error!(pod = %key, error = %e, "cannot enroll pod; it is skipped, the others are served");
                problems.push(Problem { subject: key, message: e.to_string() });
            }
        }
    }
    // Enrollment entries nobody owns (pods removed while no daemon ran).
    let live: HashSet<u64> =
        shared.pods.lock().expect("pods lock").values().map(|p| p.cookie).collect();
    for (cookie, _) in shared.capture.enrolled() {
        if !live.contains(&cookie) {
            let _ = shared.capture.release(cookie);
            let _ = shared.capture.detach_inbound(cookie);
        }
    }
    problems
}

/// What [`prepare_pod`] made in a pod's netns (blocking work: namespace
/// switches, socket set-up, `ip` and nftables), before anything is started.
struct Prepared {
    ns: Netns,
    netns_ino: u64,
    cookie: u64,
    worker: NetnsWorker,
    outbound: Vec<std::net::TcpListener>,
    inbound: Vec<std::net::TcpListener>,
    tunnel_tcp: Vec<std::net::TcpListener>,
    tunnel_udp: Vec<std::net::UdpSocket>,
}

/// The blocking part of [`add_pod`]; runs on tokio's blocking pool so that
/// a pod's set-up (which runs `ip` and programs nftables) never stalls the
/// connections the daemon carries on its runtime thread.
fn prepare_pod(shared: &Shared, pod: &Pod, path: &Path) -> Result<Prepared, PodError> {
    let ns = Netns::open(path)?;
    let netns_ino = std::fs::metadata(path).map(|m| m.ino()).unwrap_or_default();
    let cookie = ns.cookie()?;
    let worker = NetnsWorker::start(&ns)?;
    // A listener closing (daemon replaced) hands its queued connections to
    // the other listener of its SO_REUSEPORT group instead of resetting them.
    let _ = worker.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"));
    let opts =
        SocketOpts { mark: DAEMON_MARK, reuse_port: true, v6_only: true, ..SocketOpts::default() };
    let out4 = ns.tcp_listener(SocketAddr::from((Ipv4Addr::LOCALHOST, PORT_OUTBOUND)), opts)?;
    let out6 = ns.tcp_listener(SocketAddr::from((Ipv6Addr::LOCALHOST, PORT_OUTBOUND)), opts).ok();
    let in4 = ns.tcp_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT_INBOUND)), opts)?;
    let in6 = ns.tcp_listener(SocketAddr::from((Ipv6Addr::UNSPECIFIED, PORT_INBOUND)), opts).ok();
    for ip in &pod.ips {
        match (ip, &in6) {
            (IpAddr::V4(_), _) => shared.capture.set_inbound_listener(*ip, &in4)?,
            (IpAddr::V6(_), Some(l6)) => shared.capture.set_inbound_listener(*ip, l6)?,
            (IpAddr::V6(_), None) => {
                warn!(pod = %pod.key(), %ip, "no IPv6 in the pod netns; IPv6 inbound not captured");
            }
        }
    }
    crate::deliver::setup(&worker, path)?;
    let (mut tunnel_tcp, mut tunnel_udp) = (Vec::new(), Vec::new());
    if shared.mesh.is_some() {
        let topts = SocketOpts {
            mark: DAEMON_MARK,
            reuse_port: true,
            v6_only: true,
            ..SocketOpts::default()
        };
        tunnel_tcp
            .push(ns.tcp_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT_TUNNEL)), topts)?);
        tunnel_tcp.extend(
            ns.tcp_listener(SocketAddr::from((Ipv6Addr::UNSPECIFIED, PORT_TUNNEL)), topts).ok(),
        );
        for ip in &pod.ips {
            let uopts = SocketOpts { mark: DAEMON_MARK, v6_only: true, ..SocketOpts::default() };
            match ns.udp_socket(SocketAddr::new(*ip, PORT_TUNNEL), uopts) {
                Ok(u) => tunnel_udp.push(u),
                Err(e) => {
                    warn!(pod = %pod.key(), %ip, error = %e, "no QUIC server on this address");
                }
            }
        }
    }
    Ok(Prepared {
        ns,
        netns_ino,
        cookie,
        worker,
        outbound: [Some(out4), out6].into_iter().flatten().collect(),
        inbound: [Some(in4), in6].into_iter().flatten().collect(),
        tunnel_tcp,
        tunnel_udp,
    })
}

/// Sets up one pod: listeners first, then inbound steering, then enrollment
/// (so no connect is captured before something listens for it).
async fn add_pod(shared: &Arc<Shared>, pod: &Pod) -> Result<Arc<PodRuntime>, PodError> {
    let mode = pod.mode.expect("only enrolled pods are added");
    let path: PathBuf = pod.netns.clone().ok_or_else(|| PodError::NoNetns(pod.key()))?;
    let p = {
        let (shared, pod, path) = (Arc::clone(shared), pod.clone(), path.clone());
        tokio::task::spawn_blocking(move || prepare_pod(&shared, &pod, &path))
            .await
            .map_err(|e| PodError::SetUp(e.to_string()))??
    };
    if let Some(mesh) = &shared.mesh {
        if let Ok(id) = crate::certs::workload_id(&mesh.certs.trust_domain, pod) {
            if let Err(e) = mesh.certs.manager.ensure(&id).await {
                warn!(pod = %pod.key(), identity = %id, error = %e, "cannot get the pod's certificate yet; retried on first use");
            }
        }
    }
    shared.capture.attach_inbound(&p.ns, p.cookie)?;
    let (shutdown, _) = watch::channel(false);
    let rt = Arc::new(PodRuntime {
        pod: pod.clone(),
        mode,
        cookie: p.cookie,
        netns_ino: p.netns_ino,
        worker: p.worker,
        shutdown,
    });
    crate::mesh::start_servers(shared, &rt, p.tunnel_tcp, p.tunnel_udp)?;
    let register = |l: std::net::TcpListener, what: &str| {
        tokio::net::TcpListener::from_std(l).map_err(|source| NetnsError::Socket {
            path: path.clone(),
            what: format!("register {what} listener"),
            source,
        })
    };
    for l in p.outbound {
        let l = register(l, "outbound")?;
        tokio::spawn(proxy::outbound_loop(Arc::clone(shared), Arc::clone(&rt), l));
    }
    for l in p.inbound {
        let l = register(l, "inbound")?;
        tokio::spawn(proxy::inbound_loop(Arc::clone(shared), Arc::clone(&rt), l));
    }
    shared.capture.enroll(p.cookie, mode.as_map_value())?;
    Ok(rt)
}

/// Releases a pod: enrollment, inbound steering, listeners, connections.
fn remove_pod(shared: &Shared, key: &str) {
    let Some(rt) = shared.pods.lock().expect("pods lock").remove(key) else { return };
    if let Err(e) = shared.capture.release(rt.cookie) {
        warn!(pod = %key, error = %e, "release failed");
    }
    if let Err(e) = shared.capture.detach_inbound(rt.cookie) {
        warn!(pod = %key, error = %e, "detaching inbound capture failed");
    }
    for ip in &rt.pod.ips {
        let _ = shared.capture.remove_inbound_listener(*ip);
    }
    rt.shutdown.send_replace(true);
    if let Some(path) = rt.pod.netns.clone() {
        // `ip` and `nft` processes: off the runtime thread.
        tokio::task::spawn_blocking(move || crate::deliver::teardown(&path));
    }
}

/// Pods for the admin API.
pub fn pod_views(shared: &Shared) -> Vec<PodView> {
    let td = shared.inventory().trust_domain.clone();
    shared
        .pods
        .lock()
        .expect("pods lock")
        .values()
        .map(|rt| PodView {
            key: rt.pod.key(),
            mode: rt.mode,
            identity: rt.pod.spiffe_id(&td),
            ips: rt.pod.ips.clone(),
            netns_cookie: rt.cookie,
        })
        .collect()
}

/// `tlsmesh node --uninstall`: removes every pinned object, and the
/// delivery routing the daemon programmed in the inventory's pods on this
/// node (when the inventory can be read).
pub fn uninstall(cfg: &NodeConfig) -> Result<usize, CaptureError> {
    match inventory::load(&cfg.inventory) {
        Ok((inv, _)) => {
            for pod in inv.pods.values().filter(|p| p.node == cfg.node) {
                if let Some(path) = &pod.netns {
                    crate::deliver::teardown(path);
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
