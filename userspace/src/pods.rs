//! Reconcile: bringing the pods this daemon serves in line with the
//! inventory. [`plan`] is a pure function from the desired pods, the served
//! ones and the record of failed enrollments to an ordered list of
//! [`Action`]s; [`Reconciler`] executes them one after the other — a changed
//! pod is removed (its scope ended, its delivery rules torn down) before its
//! new version is set up, so a teardown can never delete what a set-up just
//! installed.
//!
//! A pod that cannot be enrolled is reported (`/config_dump` `problems`)
//! and retried with backoff (1 s doubling to 30 s; at once when its netns
//! appears or its inventory entry changes). Its error is logged when it
//! first occurs or changes, not at every retry.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{debug, error, info, warn};

use crate::{
    capture::{Capture, CaptureError},
    certs::workload_id,
    deliver::{self, PodNetns},
    inventory::{Pod, Problem},
    mesh::server::Inbound,
    netns::{Netns, NetnsError, SocketOpts},
    proxy::Proxy,
    scope::Scope,
    state::{NodeState, PodEntry, ProblemSource},
};
use tlsmesh_common::{DAEMON_MARK, PORT_INBOUND, PORT_OUTBOUND, PORT_TUNNEL};

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
    /// The served pod's netns is gone or was replaced.
    #[error("network namespace {0} vanished or was replaced; the pod was released")]
    Vanished(PathBuf),
}

/// One step of a reconcile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Stop serving the pod (removed, changed, or its netns vanished).
    Remove { key: String, vanished: bool },
    /// Start serving the pod.
    Add(Pod),
}

/// A served pod as [`plan`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    /// What it was enrolled from.
    pub pod: Pod,
    /// Its netns is gone or was replaced (checked by the caller).
    pub vanished: bool,
}

/// A pod whose enrollment failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The inventory entry it failed with.
    pub pod: Pod,
    /// The error, as reported.
    pub error: String,
    /// Consecutive failures.
    pub failures: u32,
    /// No retry before this.
    pub next_at: Instant,
    /// It failed because its netns did not exist.
    pub netns_missing: bool,
}

/// First retry delay after a failed enrollment.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest retry delay.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The delay before retry number `failures` (1-based).
pub fn retry_delay(failures: u32) -> Duration {
    RETRY_FIRST.saturating_mul(1 << failures.saturating_sub(1).min(16)).min(RETRY_MAX)
}

/// The ordered actions that bring `served` in line with `desired`.
///
/// - served but no longer desired, desired differently, or vanished:
///   `Remove` (and, when still desired, `Add` after it);
/// - desired, not served: `Add` — unless it failed before with the same
///   entry and its retry is not due (`now < next_at`, and its netns, if that
///   was what was missing, is still not in `netns_present`);
/// - `wait_for_netns`: desired pods without a netns path (Kubernetes: the
///   CNI plugin has not reported it yet) are left for later, not failed.
pub fn plan<S: std::hash::BuildHasher>(
    desired: &BTreeMap<String, Pod>,
    served: &BTreeMap<String, Served>,
    failures: &BTreeMap<String, Failure>,
    netns_present: &HashSet<String, S>,
    now: Instant,
    wait_for_netns: bool,
) -> Vec<Action> {
    let mut removes = Vec::new();
    let mut adds = Vec::new();
    for (key, s) in served {
        match desired.get(key) {
            Some(p) if *p == s.pod && !s.vanished => {}
            _ => removes.push(Action::Remove { key: key.clone(), vanished: s.vanished }),
        }
    }
    for (key, pod) in desired {
        if served.get(key).is_some_and(|s| s.pod == *pod && !s.vanished) {
            continue;
        }
        if pod.netns.is_none() && wait_for_netns {
            continue;
        }
        if let Some(f) = failures.get(key) {
            let same = f.pod == *pod;
            let due = now >= f.next_at || (f.netns_missing && netns_present.contains(key));
            if same && !due {
                continue;
            }
        }
        adds.push(Action::Add(pod.clone()));
    }
    removes.extend(adds);
    removes
}

/// Desired pods that have an address but no netns path yet (Kubernetes:
/// neither the CNI plugin nor `/proc` told where they live): reported,
/// not failed. Pods with no address yet are being set up by the runtime.
pub fn waiting_for_netns(desired: &BTreeMap<String, Pod>) -> Vec<String> {
    desired
        .iter()
        .filter(|(_, p)| p.netns.is_none() && !p.ips.is_empty())
        .map(|(k, _)| k.clone())
        .collect()
}

/// Runs reconciles: owns the record of failures, executes the plan.
pub struct Reconciler {
    /// Node state (the served pods are inserted and removed here only).
    pub state: Arc<NodeState>,
    /// The kernel side.
    pub capture: Arc<Capture>,
    /// The proxy paths, started for each pod.
    pub proxy: Proxy,
    /// The tunnel servers, started for each pod (absent without a CA).
    pub inbound: Option<Inbound>,
    /// The daemon's root scope; each pod's scope is a child.
    pub root: Scope,
    /// Kubernetes: wait for the CNI plugin to report pods' netns.
    pub wait_for_netns: bool,
    failures: BTreeMap<String, Failure>,
    /// Desired pods with an address whose netns is not known yet.
    waiting: Vec<String>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler").field("failures", &self.failures.len()).finish_non_exhaustive()
    }
}

impl Reconciler {
    /// A reconciler with no failures recorded.
    pub fn new(
        state: Arc<NodeState>,
        capture: Arc<Capture>,
        proxy: Proxy,
        inbound: Option<Inbound>,
        root: Scope,
        wait_for_netns: bool,
    ) -> Self {
        Self {
            state,
            capture,
            proxy,
            inbound,
            root,
            wait_for_netns,
            failures: BTreeMap::new(),
            waiting: Vec::new(),
        }
    }

    /// One reconcile: plan from the current inventory, execute in order,
    /// report what failed.
    pub async fn reconcile(&mut self) {
        let inv = self.state.inventory();
        let desired: BTreeMap<String, Pod> = inv
            .inv
            .enrolled_on(self.state.node())
            .into_iter()
            .map(|p| (p.key(), p.clone()))
            .collect();
        // Failures of pods no longer desired are forgotten.
        self.failures.retain(|k, _| desired.contains_key(k));
        let served: BTreeMap<String, Served> = self
            .state
            .pods()
            .into_iter()
            .map(|e| (e.key(), Served { pod: e.pod.clone(), vanished: netns_vanished(&e) }))
            .collect();
        let present: HashSet<String> = self
            .failures
            .iter()
            .filter(|(_, f)| f.netns_missing && f.pod.netns.as_deref().is_some_and(Path::exists))
            .map(|(k, _)| k.clone())
            .collect();
        let actions =
            plan(&desired, &served, &self.failures, &present, Instant::now(), self.wait_for_netns);
        self.waiting = if self.wait_for_netns { waiting_for_netns(&desired) } else { Vec::new() };
        for action in actions {
            match action {
                Action::Remove { key, vanished } => {
                    if vanished {
                        if let Some(e) = self.state.pod(&key) {
                            let path = e.pod.netns.clone().unwrap_or_default();
                            warn!(pod = %key, netns = %path.display(), "pod netns vanished or was replaced; releasing it");
                            // Reported before the pod leaves the table, so
                            // nobody sees it neither served nor reported.
                            self.record_failure(&e.pod, &PodError::Vanished(path), true);
                            self.publish_problems();
                        }
                    } else {
                        info!(pod = %key, "pod removed or changed; releasing");
                    }
                    self.remove(&key).await;
                }
                Action::Add(pod) => {
                    let key = pod.key();
                    match self.add(&pod).await {
                        Ok(e) => {
                            if self.failures.remove(&key).is_some() {
                                info!(pod = %key, "pod enrolled after earlier failures");
                            }
                            info!(pod = %key, mode = %e.mode, cookie = e.cookie, ips = ?pod.ips, "pod enrolled");
                        }
                        Err(err) => {
                            let missing = matches!(&err, PodError::Netns(NetnsError::Open { .. }));
                            self.record_failure(&pod, &err, missing);
                        }
                    }
                }
            }
        }
        self.publish_problems();
        self.release_orphans();
    }

    fn record_failure(&mut self, pod: &Pod, err: &PodError, netns_missing: bool) {
        let key = pod.key();
        let error = err.to_string();
        let prev = self.failures.get(&key).filter(|f| f.pod == *pod);
        let failures = prev.map_or(1, |f| f.failures.saturating_add(1));
        if prev.is_none_or(|f| f.error != error) {
            error!(pod = %key, error = %error, "cannot enroll pod; it is skipped (retried with backoff), the others are served");
        } else {
            debug!(pod = %key, error = %error, failures, "enrollment retry failed");
        }
        self.failures.insert(
            key,
            Failure {
                pod: pod.clone(),
                error,
                failures,
                next_at: Instant::now() + retry_delay(failures),
                netns_missing,
            },
        );
    }

    fn publish_problems(&self) {
        let problems = self
            .failures
            .iter()
            .map(|(k, f)| Problem { subject: k.clone(), message: f.error.clone() })
            .chain(self.waiting.iter().map(|k| Problem {
                subject: k.clone(),
                message: "its network namespace is not known yet: no CNI ADD for it reached this daemon and no process on this node holds its address; it is enrolled once found (its traffic is not captured until then)".into(),
            }))
            .collect();
        self.state.set_problems(ProblemSource::Enrollment, problems);
    }

    /// Enrollment entries nobody owns (pods removed while no daemon ran).
    fn release_orphans(&self) {
        let live: HashSet<u64> = self.state.pods().iter().map(|p| p.cookie).collect();
        for (cookie, _) in self.capture.enrolled() {
            if !live.contains(&cookie) {
                let _ = self.capture.release(cookie);
                let _ = self.capture.detach_inbound(cookie);
            }
        }
    }

    /// Sets up one pod: listeners first, then inbound steering, then
    /// enrollment (so no connect is captured before something listens).
    async fn add(&self, pod: &Pod) -> Result<Arc<PodEntry>, PodError> {
        let mode = pod.mode.expect("only enrolled pods are planned");
        let path: PathBuf = pod.netns.clone().ok_or_else(|| PodError::NoNetns(pod.key()))?;
        let tunnel = self.inbound.is_some();
        let p = {
            let (capture, pod, path) = (Arc::clone(&self.capture), pod.clone(), path.clone());
            tokio::task::spawn_blocking(move || prepare(&capture, &pod, &path, tunnel))
                .await
                .map_err(|e| PodError::SetUp(e.to_string()))??
        };
        let td = self.state.inventory().inv.trust_domain.clone();
        let entry = Arc::new(PodEntry {
            pod: pod.clone(),
            mode,
            identity: pod.spiffe_id(&td),
            cookie: p.cookie,
            netns_ino: p.netns_ino,
            net: Arc::new(PodNetns(p.ns.clone())),
            netns: Some(p.ns.clone()),
            scope: self.root.child(),
        });
        match self.start(&entry, p).await {
            Ok(()) => {
                self.state.insert_pod(Arc::clone(&entry));
                Ok(entry)
            }
            Err(e) => {
                self.undo(&entry).await;
                Err(e)
            }
        }
    }

    /// The async part of [`Reconciler::add`]: certificate, `sk_lookup`,
    /// servers, enrollment.
    async fn start(&self, entry: &Arc<PodEntry>, p: Prepared) -> Result<(), PodError> {
        if let Some(inbound) = &self.inbound {
            let certs = &inbound.mesh.certs;
            if let Ok(id) = workload_id(&certs.trust_domain, &entry.pod) {
                if let Err(e) = certs.manager.ensure(&id).await {
                    warn!(pod = %entry.key(), identity = %id, error = %e, "cannot get the pod's certificate yet; retried on first use");
                }
            }
        }
        self.capture.attach_inbound(&p.ns, p.cookie)?;
        let listeners = |ls: Vec<std::net::TcpListener>, what: &str| {
            ls.into_iter()
                .map(|l| {
                    tokio::net::TcpListener::from_std(l).map_err(|source| NetnsError::Socket {
                        path: p.ns.path().to_path_buf(),
                        what: format!("register {what} listener"),
                        source,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        };
        if let Some(inbound) = &self.inbound {
            let tcp = listeners(p.tunnel_tcp, "tunnel")?;
            crate::mesh::server::serve_pod(inbound, entry, tcp, p.tunnel_udp)?;
        }
        let outbound = listeners(p.outbound, "outbound")?;
        let inbound = listeners(p.inbound, "inbound")?;
        self.proxy.serve_pod(entry, outbound, inbound);
        self.capture.enroll(p.cookie, entry.mode.as_map_value())?;
        Ok(())
    }

    /// Undoes a pod's set-up, whole or half done: kernel entries, then its
    /// scope (awaited), then its delivery rules (`ip` processes: off the
    /// runtime thread, but awaited).
    async fn undo(&self, entry: &PodEntry) {
        self.release_kernel(entry);
        entry.scope.end().await;
        if let Some(ns) = entry.netns.clone() {
            let _ = tokio::task::spawn_blocking(move || deliver::teardown(&ns)).await;
        }
    }

    fn release_kernel(&self, entry: &PodEntry) {
        if let Err(e) = self.capture.release(entry.cookie) {
            warn!(pod = %entry.key(), error = %e, "release failed");
        }
        if let Err(e) = self.capture.detach_inbound(entry.cookie) {
            warn!(pod = %entry.key(), error = %e, "detaching inbound capture failed");
        }
        for ip in &entry.pod.ips {
            let _ = self.capture.remove_inbound_listener(*ip);
        }
    }

    /// Releases a pod: enrollment, inbound steering, then every task that
    /// serves it (listeners, connections, tunnel servers), then its
    /// delivery rules — in this order, awaited.
    async fn remove(&self, key: &str) {
        let Some(entry) = self.state.remove_pod(key) else { return };
        self.undo(&entry).await;
    }

    /// Releases every pod (the daemon is exiting): their scopes end, the
    /// pinned programs and maps stay (fail closed).
    pub async fn end_all(&self) {
        for e in self.state.pods() {
            e.scope.end().await;
        }
    }
}

/// True when the pod's netns file is gone or names another namespace.
fn netns_vanished(e: &PodEntry) -> bool {
    let path = e.pod.netns.clone().unwrap_or_default();
    std::fs::metadata(&path).map_or(true, |m| m.ino() != e.netns_ino)
}

/// What [`prepare`] made in a pod's netns, before anything is started.
struct Prepared {
    ns: Netns,
    netns_ino: u64,
    cookie: u64,
    outbound: Vec<std::net::TcpListener>,
    inbound: Vec<std::net::TcpListener>,
    tunnel_tcp: Vec<std::net::TcpListener>,
    tunnel_udp: Vec<(SocketAddr, Option<std::net::UdpSocket>)>,
}

/// The blocking part of a pod's set-up (namespace switches, socket set-up,
/// `ip` and nftables); runs on tokio's blocking pool so it never stalls the
/// connections the daemon carries on its runtime thread.
fn prepare(capture: &Capture, pod: &Pod, path: &Path, tunnel: bool) -> Result<Prepared, PodError> {
    let ns = Netns::open(path)?;
    let netns_ino = std::fs::metadata(path).map(|m| m.ino()).unwrap_or_default();
    let cookie = ns.cookie()?;
    ns.check()?;
    // A listener closing (daemon replaced) hands its queued connections to
    // the other listener of its SO_REUSEPORT group instead of resetting them.
    let _ = ns.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"));
    let opts =
        SocketOpts { mark: DAEMON_MARK, reuse_port: true, v6_only: true, ..SocketOpts::default() };
    let out4 = ns.tcp_listener(SocketAddr::from((Ipv4Addr::LOCALHOST, PORT_OUTBOUND)), opts)?;
    let out6 = ns.tcp_listener(SocketAddr::from((Ipv6Addr::LOCALHOST, PORT_OUTBOUND)), opts).ok();
    let in4 = ns.tcp_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT_INBOUND)), opts)?;
    let in6 = ns.tcp_listener(SocketAddr::from((Ipv6Addr::UNSPECIFIED, PORT_INBOUND)), opts).ok();
    for ip in &pod.ips {
        match (ip, &in6) {
            (IpAddr::V4(_), _) => capture.set_inbound_listener(*ip, &in4)?,
            (IpAddr::V6(_), Some(l6)) => capture.set_inbound_listener(*ip, l6)?,
            (IpAddr::V6(_), None) => {
                warn!(pod = %pod.key(), %ip, "no IPv6 in the pod netns; IPv6 inbound not captured");
            }
        }
    }
    deliver::setup(&ns)?;
    let (mut tunnel_tcp, mut tunnel_udp) = (Vec::new(), Vec::new());
    if tunnel {
        tunnel_tcp
            .push(ns.tcp_listener(SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT_TUNNEL)), opts)?);
        tunnel_tcp.extend(
            ns.tcp_listener(SocketAddr::from((Ipv6Addr::UNSPECIFIED, PORT_TUNNEL)), opts).ok(),
        );
        for ip in &pod.ips {
            let addr = SocketAddr::new(*ip, PORT_TUNNEL);
            // A failed bind is retried by the QUIC server task.
            tunnel_udp.push((addr, ns.udp_socket(addr, deliver::tunnel_udp_opts()).ok()));
        }
    }
    Ok(Prepared {
        ns,
        netns_ino,
        cookie,
        outbound: [Some(out4), out6].into_iter().flatten().collect(),
        inbound: [Some(in4), in6].into_iter().flatten().collect(),
        tunnel_tcp,
        tunnel_udp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inventory::Mode;

    fn pod(name: &str) -> Pod {
        Pod {
            name: name.into(),
            namespace: "ns".into(),
            service_account: "sa".into(),
            node: "n0".into(),
            ips: vec!["10.0.0.2".parse().unwrap()],
            netns: Some(format!("/run/netns/{name}").into()),
            mode: Some(Mode::Strict),
            workload: None,
        }
    }

    fn map<T: Clone>(items: &[(&str, T)]) -> BTreeMap<String, T> {
        items.iter().map(|(k, v)| (format!("ns/{k}"), v.clone())).collect()
    }

    fn served(p: Pod) -> Served {
        Served { pod: p, vanished: false }
    }

    #[test]
    fn pods_with_an_address_but_no_netns_are_waiting() {
        let mut found = pod("found");
        found.ips.clear();
        found.netns = None; // no address yet: the runtime is setting it up
        let mut lost = pod("lost");
        lost.netns = None;
        let desired = map(&[("a", pod("a")), ("found", found), ("lost", lost.clone())]);
        assert_eq!(waiting_for_netns(&desired), ["ns/lost"]);
        // ... and the plan leaves it for later instead of failing it.
        let actions = plan(
            &desired,
            &BTreeMap::new(),
            &BTreeMap::new(),
            &HashSet::new(),
            Instant::now(),
            true,
        );
        assert_eq!(actions, vec![Action::Add(pod("a"))]);
    }

    #[test]
    fn a_changed_pod_is_removed_before_it_is_added_again() {
        let mut changed = pod("a");
        changed.ips = vec!["10.0.0.9".parse().unwrap()];
        let desired = map(&[("a", changed.clone()), ("b", pod("b"))]);
        let running = map(&[("a", served(pod("a"))), ("c", served(pod("c")))]);
        let now = Instant::now();
        let actions = plan(&desired, &running, &BTreeMap::new(), &HashSet::new(), now, false);
        assert_eq!(
            actions,
            vec![
                Action::Remove { key: "ns/a".into(), vanished: false },
                Action::Remove { key: "ns/c".into(), vanished: false },
                Action::Add(changed),
                Action::Add(pod("b")),
            ]
        );
        // In line: nothing to do.
        let running = map(&[("a", served(pod("a")))]);
        let desired = map(&[("a", pod("a"))]);
        assert!(plan(&desired, &running, &BTreeMap::new(), &HashSet::new(), now, false).is_empty());
    }

    #[test]
    fn a_vanished_pod_is_released_and_not_hammered() {
        let now = Instant::now();
        let desired = map(&[("a", pod("a"))]);
        let running = map(&[("a", Served { pod: pod("a"), vanished: true })]);
        let a = plan(&desired, &running, &BTreeMap::new(), &HashSet::new(), now, false);
        assert_eq!(
            a,
            vec![Action::Remove { key: "ns/a".into(), vanished: true }, Action::Add(pod("a"))]
        );

        // It failed; a reconcile at 10 Hz for a minute retries on the
        // backoff schedule only: 1, 2, 4, 8, 16, 30 s…
        let mut failures = BTreeMap::new();
        let mut f = Failure {
            pod: pod("a"),
            error: "gone".into(),
            failures: 1,
            next_at: now + retry_delay(1),
            netns_missing: true,
        };
        failures.insert("ns/a".to_string(), f.clone());
        let mut attempts = 0;
        for tick in 1..=600u64 {
            let t = now + Duration::from_millis(100 * tick);
            let a = plan(&desired, &BTreeMap::new(), &failures, &HashSet::new(), t, false);
            if !a.is_empty() {
                attempts += 1;
                f.failures += 1;
                f.next_at = t + retry_delay(f.failures);
                failures.insert("ns/a".to_string(), f.clone());
            }
        }
        assert_eq!(attempts, 5, "retries at 1, 3, 7, 15, 31 s (then 61 s)");
        // Its netns appears: retried at once.
        let present: HashSet<String> = ["ns/a".to_string()].into();
        let t = now + Duration::from_secs(61);
        failures.get_mut("ns/a").unwrap().next_at = t + Duration::from_secs(30);
        assert_eq!(plan(&desired, &BTreeMap::new(), &failures, &present, t, false).len(), 1);
        // Its inventory entry changes: retried at once.
        let mut other = pod("a");
        other.netns = Some("/run/netns/a2".into());
        let desired2 = map(&[("a", other.clone())]);
        assert_eq!(
            plan(&desired2, &BTreeMap::new(), &failures, &HashSet::new(), t, false),
            vec![Action::Add(other)]
        );
    }

    #[test]
    fn pods_without_a_netns_wait_for_the_cni_plugin_in_kubernetes() {
        let mut p = pod("a");
        p.netns = None;
        let desired = map(&[("a", p.clone())]);
        let now = Instant::now();
        assert!(plan(&desired, &BTreeMap::new(), &BTreeMap::new(), &HashSet::new(), now, true)
            .is_empty());
        assert_eq!(
            plan(&desired, &BTreeMap::new(), &BTreeMap::new(), &HashSet::new(), now, false),
            vec![Action::Add(p)]
        );
    }

    #[test]
    fn retry_delays() {
        assert_eq!(retry_delay(1), Duration::from_secs(1));
        assert_eq!(retry_delay(3), Duration::from_secs(4));
        assert_eq!(retry_delay(6), Duration::from_secs(30));
        assert_eq!(retry_delay(1000), Duration::from_secs(30));
    }
}
