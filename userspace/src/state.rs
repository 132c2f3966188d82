//! Node state: the current inventory (indexed by address), the pods this
//! daemon serves, the authorization policy in force, the problems to
//! report, the most recent refusals, and the readiness inputs. Plain data behind short locks; the proxy, the mesh, the
//! admin API and metrics read it through the methods here, and only the
//! reconcile (`pods`) and the wiring (`app`) change it.

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
    time::Duration,
};

use serde::Serialize;
use tokio::sync::watch;

use crate::{
    inventory::{self, Inventory, Mode, Pod, Problem, ServicePicker},
    kernel::PodNet,
    policy::mesh::MeshPolicy,
    scope::Scope,
    sync::{lock, read, write},
};

/// A pod this daemon serves: what the inventory said when it was enrolled,
/// its kernel handles, and the scope that owns every task serving it.
#[derive(Debug)]
pub struct PodEntry {
    /// The inventory entry it was enrolled from.
    pub pod: Pod,
    /// Its mode.
    pub mode: Mode,
    /// Its SPIFFE identity (as a string).
    pub identity: String,
    /// Its netns cookie.
    pub cookie: u64,
    /// Inode of its netns file when enrolled (to notice replacement).
    pub netns_ino: u64,
    /// Sockets inside its netns.
    pub net: Arc<dyn PodNet>,
    /// Its netns, held open (`None` for pods served by test fakes).
    pub netns: Option<crate::netns::Netns>,
    /// Every task that serves it; ended when the pod is removed or changed.
    pub scope: Scope,
}

impl PodEntry {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        self.pod.key()
    }
}

/// One inventory, with the lookups the per-connection paths need made
/// cheap (no scan of every pod per connection).
#[derive(Debug, Default)]
pub struct InventoryIndex {
    /// The inventory.
    pub inv: Inventory,
    by_ip: HashMap<IpAddr, String>,
    probe_sources: HashSet<IpAddr>,
}

impl InventoryIndex {
    /// Indexes `inv`; `probe_sources` are the addresses allowed to probe
    /// strict pods in plaintext.
    pub fn new(inv: Inventory, probe_sources: HashSet<IpAddr>) -> Self {
        let mut by_ip = HashMap::new();
        for (key, p) in &inv.pods {
            for ip in &p.ips {
                by_ip.entry(ip.to_canonical()).or_insert_with(|| key.clone());
            }
        }
        Self { inv, by_ip, probe_sources }
    }

    /// The pod that owns `ip`.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.by_ip.get(&ip.to_canonical()).and_then(|k| self.inv.pods.get(k))
    }

    /// Where a connection from a pod on `node` to `dst` goes.
    pub fn route(&self, node: &str, dst: IpAddr) -> inventory::Route {
        inventory::route_to(node, self.pod_by_ip(dst))
    }

    /// Addresses allowed to probe strict pods in plaintext.
    pub fn probe_sources(&self) -> &HashSet<IpAddr> {
        &self.probe_sources
    }
}

/// Where a reported problem comes from (each source replaces its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProblemSource {
    /// The inventory file or the inventory as published.
    Inventory,
    /// Enrolling a pod on this node.
    Enrollment,
    /// The Kubernetes API (watch failures, objects not used as they are).
    Kubernetes,
    /// Policy objects not used as written.
    Policy,
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

/// Most refusals kept for `tlsmesh status`.
const DENIES_KEPT: usize = 64;

/// Pod summary for the admin API.
#[derive(Debug, Clone, Serialize)]
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
    /// Tasks serving it (listeners, connections, tunnel servers).
    pub tasks: usize,
}

/// Settings the state needs from the config.
#[derive(Debug, Clone, Default)]
pub struct StateSettings {
    /// This node's name.
    pub node: String,
    /// Extra plaintext probe sources.
    pub probe_sources: Vec<IpAddr>,
    /// Allow the node's own addresses to probe.
    pub allow_node_probes: bool,
}

/// The node's state.
#[derive(Debug)]
pub struct NodeState {
    settings: StateSettings,
    inventory: RwLock<Arc<InventoryIndex>>,
    pods: RwLock<BTreeMap<String, Arc<PodEntry>>>,
    policy: RwLock<Arc<MeshPolicy>>,
    problems: Mutex<BTreeMap<ProblemSource, Vec<Problem>>>,
    denies: Mutex<VecDeque<DenyRecord>>,
    services: Mutex<ServicePicker>,
    started: watch::Sender<bool>,
    draining: watch::Sender<bool>,
    /// Bumped at every [`NodeState::set_inventory`]: what
    /// [`NodeState::wait_inventory`] waits on.
    published: watch::Sender<u64>,
}

impl NodeState {
    /// Empty state for a node.
    pub fn new(settings: StateSettings) -> Self {
        Self {
            settings,
            inventory: RwLock::new(Arc::new(InventoryIndex::default())),
            pods: RwLock::new(BTreeMap::new()),
            policy: RwLock::new(Arc::new(MeshPolicy::default())),
            problems: Mutex::new(BTreeMap::new()),
            denies: Mutex::new(VecDeque::new()),
            services: Mutex::new(ServicePicker::new()),
            started: watch::channel(false).0,
            draining: watch::channel(false).0,
            published: watch::channel(0).0,
        }
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.settings.node
    }

    /// The current inventory.
    pub fn inventory(&self) -> Arc<InventoryIndex> {
        Arc::clone(&read(&self.inventory))
    }

    /// Installs a new inventory (indexed once, here).
    pub fn set_inventory(&self, inv: Inventory) {
        let mut probes: HashSet<IpAddr> = self.settings.probe_sources.iter().copied().collect();
        if self.settings.allow_node_probes {
            probes.extend(inv.node_addresses(&self.settings.node));
        }
        lock(&self.services).retain_known(&inv);
        *write(&self.inventory) = Arc::new(InventoryIndex::new(inv, probes));
        self.published.send_modify(|n| *n += 1);
    }

    /// The first inventory in which `ready` holds, waiting at most `bound`
    /// for new ones to be published; after that, the current one. (A pod
    /// another node just started connects before this node's watch has its
    /// address: the API server publishes it a moment later.)
    pub async fn wait_inventory(
        &self,
        bound: Duration,
        ready: impl Fn(&InventoryIndex) -> bool,
    ) -> Arc<InventoryIndex> {
        // Subscribed before the first look: no publication in between is missed.
        let mut published = self.published.subscribe();
        let deadline = tokio::time::Instant::now() + bound;
        loop {
            let inv = self.inventory();
            if ready(&inv) {
                return inv;
            }
            match tokio::time::timeout_at(deadline, published.changed()).await {
                Ok(Ok(())) => {}
                Ok(Err(_)) | Err(_) => return self.inventory(),
            }
        }
    }

    /// The authorization policy in force (policy objects and the TOML
    /// rules together; default: allow everything).
    pub fn policy(&self) -> Arc<MeshPolicy> {
        Arc::clone(&read(&self.policy))
    }

    /// Puts a new policy in force (the wiring only; it re-checks the open
    /// connections after).
    pub fn set_policy(&self, p: MeshPolicy) {
        *write(&self.policy) = Arc::new(p);
    }

    /// Resolves a Service address to one of its ready endpoints (round robin).
    pub fn resolve_service(
        &self,
        inv: &InventoryIndex,
        dst: std::net::SocketAddr,
    ) -> Option<std::net::SocketAddr> {
        inventory::resolve_service(&inv.inv, dst, &mut lock(&self.services))
    }

    /// The served pod with key `namespace/name`.
    pub fn pod(&self, key: &str) -> Option<Arc<PodEntry>> {
        read(&self.pods).get(key).cloned()
    }

    /// Every served pod.
    pub fn pods(&self) -> Vec<Arc<PodEntry>> {
        read(&self.pods).values().cloned().collect()
    }

    /// How many pods are served.
    pub fn pod_count(&self) -> usize {
        read(&self.pods).len()
    }

    /// Adds a served pod (the reconcile's executor only).
    pub fn insert_pod(&self, entry: Arc<PodEntry>) {
        write(&self.pods).insert(entry.key(), entry);
    }

    /// Removes a served pod (the reconcile's executor only).
    pub fn remove_pod(&self, key: &str) -> Option<Arc<PodEntry>> {
        write(&self.pods).remove(key)
    }

    /// Replaces the problems of one source.
    pub fn set_problems(&self, source: ProblemSource, problems: Vec<Problem>) {
        lock(&self.problems).insert(source, problems);
    }

    /// Every current problem, as text, by source order.
    pub fn problems(&self) -> Vec<String> {
        lock(&self.problems).values().flatten().map(ToString::to_string).collect()
    }

    /// Remembers a refusal (the last [`DENIES_KEPT`] are kept).
    pub fn record_deny(&self, source: String, destination: String, reason: String) {
        let at = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        let mut d = lock(&self.denies);
        if d.len() >= DENIES_KEPT {
            d.pop_front();
        }
        d.push_back(DenyRecord { at, source, destination, reason });
    }

    /// The most recent refusals, oldest first.
    pub fn denies(&self) -> Vec<DenyRecord> {
        lock(&self.denies).iter().cloned().collect()
    }

    /// Pods for the admin API.
    pub fn pod_views(&self) -> Vec<PodView> {
        read(&self.pods)
            .values()
            .map(|e| PodView {
                key: e.key(),
                mode: e.mode,
                identity: e.identity.clone(),
                ips: e.pod.ips.clone(),
                netns_cookie: e.cookie,
                tasks: e.scope.running(),
            })
            .collect()
    }

    /// Marks the first reconcile as done.
    pub fn set_started(&self) {
        self.started.send_replace(true);
    }

    /// Marks the drain as begun.
    pub fn set_draining(&self) {
        self.draining.send_replace(true);
    }

    /// The readiness inputs at this moment.
    pub fn readiness_inputs(&self) -> ReadinessInputs {
        let inv = self.inventory();
        ReadinessInputs {
            started: *self.started.borrow(),
            draining: *self.draining.borrow(),
            wanted: inv
                .inv
                .enrolled_on(&self.settings.node)
                .into_iter()
                .filter(|p| p.netns.is_some())
                .map(|p| (p.key(), p.spiffe_id(&inv.inv.trust_domain)))
                .collect(),
            served: read(&self.pods).keys().cloned().collect(),
        }
    }
}

/// What readiness is decided from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadinessInputs {
    /// The first reconcile has completed.
    pub started: bool,
    /// SIGTERM (or `/quitquitquit`) arrived.
    pub draining: bool,
    /// Pods the inventory puts on this node with a known netns: (key, identity).
    pub wanted: Vec<(String, String)>,
    /// Pods served.
    pub served: HashSet<String>,
}

/// Readiness, decided: `Ok`, or why not. `have_cert` answers whether an
/// identity has a certificate (`None`: no tunnel configured).
///
/// A pod whose netns is not known yet (Kubernetes: scheduled, CNI ADD not
/// yet run) cannot be enrolled yet and does not hold readiness back; the CNI
/// plugin's ADD waits for its enrollment instead.
pub fn readiness(
    i: &ReadinessInputs,
    have_cert: Option<&dyn Fn(&str) -> bool>,
) -> Result<(), String> {
    if !i.started {
        return Err("starting".into());
    }
    if i.draining {
        return Err("draining".into());
    }
    let missing: Vec<&str> =
        i.wanted.iter().filter(|(k, _)| !i.served.contains(k)).map(|(k, _)| k.as_str()).collect();
    if !missing.is_empty() {
        return Err(format!("pods not enrolled yet: {missing:?}"));
    }
    if let Some(have) = have_cert {
        let lacking: Vec<&str> = i
            .wanted
            .iter()
            .filter(|(_, id)| !have(id))
            .map(|(_, id)| id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !lacking.is_empty() {
            return Err(format!("no certificate yet for {lacking:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, ip: &str) -> Pod {
        Pod {
            name: name.into(),
            namespace: "ns".into(),
            service_account: name.into(),
            node: "n0".into(),
            ips: vec![ip.parse().unwrap()],
            netns: Some(format!("/run/netns/{name}").into()),
            mode: Some(Mode::Strict),
            workload: None,
        }
    }

    #[test]
    fn the_index_finds_pods_by_address_and_routes() {
        let mut inv = Inventory { trust_domain: "td".into(), ..Inventory::default() };
        for i in 0..2000 {
            let p = pod(&format!("p{i}"), &format!("10.1.{}.{}", i / 250, i % 250 + 1));
            inv.pods.insert(p.key(), p);
        }
        let idx = InventoryIndex::new(inv, HashSet::new());
        assert_eq!(idx.pod_by_ip("10.1.7.200".parse().unwrap()).unwrap().name, "p1949");
        // v4-mapped addresses find the same pod.
        assert_eq!(idx.pod_by_ip("::ffff:10.1.0.1".parse().unwrap()).unwrap().name, "p0");
        assert!(idx.pod_by_ip("10.9.9.9".parse().unwrap()).is_none());
        assert_eq!(
            idx.route("n0", "10.1.0.1".parse().unwrap()),
            inventory::Route::LocalPod("ns/p0".into())
        );
        assert_eq!(idx.route("n1", "10.9.9.9".parse().unwrap()), inventory::Route::Passthrough);
    }

    #[test]
    fn probe_sources_are_computed_once_per_inventory() {
        let s = NodeState::new(StateSettings {
            node: "n0".into(),
            probe_sources: vec!["192.0.2.9".parse().unwrap()],
            allow_node_probes: true,
        });
        let mut inv = Inventory::default();
        inv.nodes.insert(
            "n0".into(),
            inventory::Node { name: "n0".into(), addresses: vec!["192.0.2.1".parse().unwrap()] },
        );
        s.set_inventory(inv);
        let idx = s.inventory();
        let want: HashSet<IpAddr> =
            ["192.0.2.9", "192.0.2.1"].iter().map(|a| a.parse().unwrap()).collect();
        assert_eq!(idx.probe_sources(), &want);
    }

    #[tokio::test(start_paused = true)]
    async fn wait_inventory_returns_the_first_inventory_that_has_what_is_asked_or_the_current_at_the_bound(
    ) {
        let s = Arc::new(NodeState::new(StateSettings::default()));
        let ip: IpAddr = "10.1.0.7".parse().unwrap();
        let with = |names: &[(&str, &str)]| {
            let mut inv = Inventory { trust_domain: "td".into(), ..Inventory::default() };
            for (n, a) in names {
                let p = pod(n, a);
                inv.pods.insert(p.key(), p);
            }
            inv
        };
        // Published later, by another task: the wait sees it.
        let publisher = {
            let s = Arc::clone(&s);
            let (a, b) =
                (with(&[("a", "10.1.0.1")]), with(&[("a", "10.1.0.1"), ("b", "10.1.0.7")]));
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                s.set_inventory(a); // not yet
                tokio::time::sleep(Duration::from_millis(100)).await;
                s.set_inventory(b);
            })
        };
        let t0 = tokio::time::Instant::now();
        let inv = s.wait_inventory(Duration::from_secs(3), |i| i.pod_by_ip(ip).is_some()).await;
        assert_eq!(inv.pod_by_ip(ip).map(|p| p.name.as_str()), Some("b"));
        assert_eq!(
            t0.elapsed(),
            Duration::from_millis(200),
            "returned at the publication that had it"
        );
        publisher.await.unwrap();
        // Never published: the current inventory, at the bound.
        let other: IpAddr = "10.1.0.99".parse().unwrap();
        let t0 = tokio::time::Instant::now();
        let inv = s.wait_inventory(Duration::from_secs(3), |i| i.pod_by_ip(other).is_some()).await;
        assert!(inv.pod_by_ip(other).is_none());
        assert_eq!(inv.pod_by_ip(ip).map(|p| p.name.as_str()), Some("b"));
        assert_eq!(t0.elapsed(), Duration::from_secs(3));
        // Already there: no wait at all.
        let t0 = tokio::time::Instant::now();
        let _ = s.wait_inventory(Duration::from_secs(3), |i| i.pod_by_ip(ip).is_some()).await;
        assert_eq!(t0.elapsed(), Duration::ZERO);
    }

    #[test]
    fn problems_of_each_source_replace_only_their_own() {
        let s = NodeState::new(StateSettings::default());
        let p = |m: &str| Problem { subject: "x".into(), message: m.into() };
        s.set_problems(ProblemSource::Kubernetes, vec![p("watch of pods failed")]);
        s.set_problems(ProblemSource::Enrollment, vec![p("netns gone")]);
        s.set_problems(ProblemSource::Enrollment, vec![]);
        assert_eq!(s.problems().len(), 1);
        assert!(s.problems()[0].contains("watch of pods failed"));
    }

    #[test]
    fn readiness_decisions() {
        let mut i = ReadinessInputs::default();
        assert_eq!(readiness(&i, None).unwrap_err(), "starting");
        i.started = true;
        i.wanted = vec![("ns/a".into(), "spiffe://td/ns/ns/sa/a".into())];
        assert!(readiness(&i, None).unwrap_err().contains("ns/a"));
        i.served.insert("ns/a".into());
        assert_eq!(readiness(&i, None), Ok(()));
        let none = |_: &str| false;
        assert!(readiness(&i, Some(&none)).unwrap_err().contains("no certificate yet"));
        let all = |_: &str| true;
        assert_eq!(readiness(&i, Some(&all)), Ok(()));
        i.draining = true;
        assert_eq!(readiness(&i, Some(&all)).unwrap_err(), "draining");
    }
}
