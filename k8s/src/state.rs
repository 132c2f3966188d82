//! The cluster as the daemon sees it, sans IO: [`ClusterState`] takes watch
//! events for namespaces, pods, this node, Services and `EndpointSlices`,
//! keeps a slim record of each object, and builds the
//! [`Inventory`](tlsmesh_inventory::Inventory) the daemon enrolls from.
//!
//! Rules (docs/KUBERNETES.md has the reasons):
//!
//! * A namespace labelled `tlsmesh.io/mode=strict|permissive` enrolls its
//!   pods; any other value is reported as a problem and enrolls nothing.
//! * A pod labelled `tlsmesh.io/mode=off` is not enrolled; `strict` or
//!   `permissive` on a pod overrides its enrolled namespace's mode (as in the
//!   static inventory file).
//! * Identity: `spiffe://<trust-domain>/ns/<namespace>/sa/<serviceAccountName>`.
//! * Left out: pods not yet scheduled, host-network pods (their addresses are
//!   the node's), and finished pods (`Succeeded`/`Failed`: their addresses
//!   are free for reuse).
//! * Pod addresses come from `status.podIPs`; for a pod of this node that
//!   the API does not show an address for yet, from the CNI plugin (through
//!   the [`NetnsResolver`]). The netns of this node's pods comes from the
//!   resolver only; `None` when it does not know.
//! * A `Restarted` event (a re-list: first start, reconnect, 410 Gone)
//!   **replaces** everything known of that kind, so objects deleted while
//!   the watch was down disappear.
//! * [`ClusterState::is_synced`] says every kind has been listed once; the
//!   inventory must not be used before, or a half-listed cluster would
//!   release enrolled pods.
//! * Service endpoints come from `EndpointSlices` (`discovery.k8s.io/v1`, or
//!   `v1beta1` converted to `v1` on Kubernetes 1.20) or, where neither is
//!   served, from `v1` `Endpoints`; the kind [`Kind::EndpointSlice`] stands
//!   for whichever source the watcher uses. A source that is not served at
//!   all ([`Update::Unserved`]) counts as listed and empty, and is reported
//!   as a [`Problem`]: the daemon runs without Service resolution rather
//!   than not at all.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::ResourceExt as _;
use tlsmesh_inventory::{self as inventory, Inventory, Mode, Problem, ServiceBackends};

/// The label on namespaces (`strict|permissive`) and pods (`off`, or a mode).
pub const MODE_LABEL: &str = "tlsmesh.io/mode";
/// The label tying an `EndpointSlice` to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One watch event, after the watcher's initial pages have been gathered.
#[derive(Debug, Clone, PartialEq)]
pub enum Event<K> {
    /// Added or modified.
    Applied(K),
    /// Deleted.
    Deleted(K),
    /// A complete list: replaces everything known of this kind.
    Restarted(Vec<K>),
}

/// An event of one of the watched kinds.
#[derive(Debug, Clone, PartialEq)]
#[expect(
    clippy::large_enum_variant,
    reason = "transient: each event is moved once from the watcher into the reducer"
)]
pub enum Update {
    /// Namespaces (all).
    Namespace(Event<Namespace>),
    /// Pods (all: this node's are enrolled, the others are tunnel targets).
    Pod(Event<Pod>),
    /// Nodes (only this one: its addresses are the kubelet's probe sources).
    Node(Event<Node>),
    /// Services (all).
    Service(Event<Service>),
    /// `EndpointSlices` (all).
    EndpointSlice(Event<EndpointSlice>),
    /// `v1` `Endpoints` (all), where the API server serves no `EndpointSlices`.
    Endpoints(Event<Endpoints>),
    /// The API server serves no resource for this kind: it counts as listed
    /// and empty, and `message` is reported as a problem.
    Unserved { kind: Kind, message: String },
}

/// The kinds the state is built from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Namespaces.
    Namespace,
    /// Pods.
    Pod,
    /// This node.
    Node,
    /// Services.
    Service,
    /// Service endpoints: `EndpointSlices`, or `Endpoints` where no slices are served.
    EndpointSlice,
}

impl Kind {
    /// All kinds.
    pub const ALL: [Kind; 5] =
        [Kind::Namespace, Kind::Pod, Kind::Node, Kind::Service, Kind::EndpointSlice];

    /// The API resource(s) the kind is read from, for messages.
    pub fn resource(self) -> &'static str {
        match self {
            Kind::Namespace => "namespaces",
            Kind::Pod => "pods",
            Kind::Node => "nodes",
            Kind::Service => "services",
            Kind::EndpointSlice => "endpointslices.discovery.k8s.io (or endpoints)",
        }
    }
}

impl Update {
    /// The kind this update is about, and whether it is a complete list
    /// (an unserved kind counts as one: listed, and empty).
    pub fn kind(&self) -> (Kind, bool) {
        fn restarted<K>(e: &Event<K>) -> bool {
            matches!(e, Event::Restarted(_))
        }
        match self {
            Update::Namespace(e) => (Kind::Namespace, restarted(e)),
            Update::Pod(e) => (Kind::Pod, restarted(e)),
            Update::Node(e) => (Kind::Node, restarted(e)),
            Update::Service(e) => (Kind::Service, restarted(e)),
            Update::EndpointSlice(e) => (Kind::EndpointSlice, restarted(e)),
            Update::Endpoints(e) => (Kind::EndpointSlice, restarted(e)),
            Update::Unserved { kind, .. } => (*kind, true),
        }
    }
}

/// A pod as the [`NetnsResolver`] is asked about it.
#[derive(Debug, Clone, Copy)]
pub struct PodRef<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Name.
    pub name: &'a str,
    /// `metadata.uid`.
    pub uid: &'a str,
    /// Addresses from the API (may be empty right after the sandbox started).
    pub ips: &'a [IpAddr],
}

/// Where the pods of this node have their network namespace, supplied by
/// the daemon: what the CNI plugin reported ([`CniPods`](crate::cni_server::CniPods)),
/// or `/proc/<pid>/ns/net` of a process found by the pod's address.
pub trait NetnsResolver: Send + Sync {
    /// The pod's netns path, if known.
    fn netns(&self, pod: &PodRef<'_>) -> Option<PathBuf>;

    /// Addresses the runtime gave the pod, for when the API does not show
    /// them yet (the CNI `ADD` runs before the kubelet reports `podIPs`).
    fn ips(&self, _pod: &PodRef<'_>) -> Vec<IpAddr> {
        Vec::new()
    }
}

/// A resolver that knows nothing: every netns is `None`.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNetns;

impl NetnsResolver for NoNetns {
    fn netns(&self, _: &PodRef<'_>) -> Option<PathBuf> {
        None
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum NsMode {
    Unlabelled,
    Mode(Mode),
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum PodLabel {
    None,
    Off,
    Mode(Mode),
    Invalid(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct PodInfo {
    namespace: String,
    name: String,
    uid: String,
    service_account: String,
    node: Option<String>,
    ips: Vec<IpAddr>,
    label: PodLabel,
    /// Its workload (owner references, canonical-name labels, or the pod
    /// name: `inventory::derive_workload`).
    workload: String,
    host_network: bool,
    finished: bool,
    deleting: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SvcPort {
    name: String,
    port: u16,
    tcp: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SvcInfo {
    cluster_ips: Vec<IpAddr>,
    ports: Vec<SvcPort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SliceEndpoint {
    addrs: Vec<IpAddr>,
    ready: bool,
    pod: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct SliceInfo {
    namespace: String,
    service: Option<String>,
    ipv6: Option<bool>,
    ports: Vec<SvcPort>,
    endpoints: Vec<SliceEndpoint>,
}

/// What the daemon knows of the cluster; a pure reducer over watch events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterState {
    node: Option<String>,
    trust_domain: String,
    namespaces: BTreeMap<String, NsMode>,
    pods: BTreeMap<String, PodInfo>,
    nodes: BTreeMap<String, Vec<IpAddr>>,
    services: BTreeMap<String, SvcInfo>,
    slices: BTreeMap<String, SliceInfo>,
    /// From `v1` `Endpoints`: one record per subset and address family.
    endpoints: BTreeMap<String, Vec<SliceInfo>>,
    /// Kinds the API server does not serve, and what to tell the operator.
    unserved: BTreeMap<Kind, String>,
    listed: BTreeSet<Kind>,
    overrides: ModeOverrides,
}

/// Modes of enrolled namespaces set by policy objects (Istio's
/// `PeerAuthentication`), over the namespace label's; a pod's own label
/// still wins. They never enroll a namespace (docs/KUBERNETES.md §11).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModeOverrides {
    /// By namespace.
    pub namespaces: BTreeMap<String, Mode>,
    /// For every namespace without its own.
    pub mesh: Option<Mode>,
}

impl From<&tlsmesh_policy::mesh::MeshPolicy> for ModeOverrides {
    /// `DISABLE` is permissive: tlsmesh accepts plaintext in but still
    /// sends mTLS between enrolled pods.
    fn from(p: &tlsmesh_policy::mesh::MeshPolicy) -> Self {
        use tlsmesh_policy::mesh::MtlsMode;
        let mode = |m: &MtlsMode| match m {
            MtlsMode::Strict => Mode::Strict,
            MtlsMode::Permissive | MtlsMode::Disable => Mode::Permissive,
        };
        Self {
            namespaces: p.namespace_modes.iter().map(|(n, m)| (n.clone(), mode(m))).collect(),
            mesh: p.mesh_mode.as_ref().map(mode),
        }
    }
}

fn key_of(ns: Option<&str>, name: &str) -> String {
    format!("{}/{name}", ns.unwrap_or_default())
}

fn parse_ips<'a>(it: impl IntoIterator<Item = &'a String>) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = it
        .into_iter()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect();
    v.dedup();
    v
}

fn port_u16(p: i32) -> Option<u16> {
    u16::try_from(p).ok().filter(|p| *p != 0)
}

fn is_tcp(protocol: Option<&String>) -> bool {
    protocol.is_none_or(|p| p == "TCP")
}

fn ns_mode(ns: &Namespace) -> NsMode {
    match ns.labels().get(MODE_LABEL).map(String::as_str) {
        None => NsMode::Unlabelled,
        Some("strict") => NsMode::Mode(Mode::Strict),
        Some("permissive") => NsMode::Mode(Mode::Permissive),
        Some(other) => NsMode::Invalid(other.to_owned()),
    }
}

fn pod_info(p: &Pod) -> PodInfo {
    let spec = p.spec.as_ref();
    let status = p.status.as_ref();
    let label = match p.labels().get(MODE_LABEL).map(String::as_str) {
        None => PodLabel::None,
        Some("off") => PodLabel::Off,
        Some("strict") => PodLabel::Mode(Mode::Strict),
        Some("permissive") => PodLabel::Mode(Mode::Permissive),
        Some(other) => PodLabel::Invalid(other.to_owned()),
    };
    let mut ips =
        parse_ips(status.and_then(|s| s.pod_ips.as_ref()).into_iter().flatten().map(|i| &i.ip));
    if ips.is_empty() {
        ips = parse_ips(status.and_then(|s| s.pod_ip.as_ref()));
    }
    let owners: Vec<inventory::Owner<'_>> = p
        .owner_references()
        .iter()
        .map(|o| inventory::Owner {
            kind: &o.kind,
            name: &o.name,
            controller: o.controller == Some(true),
        })
        .collect();
    let workload = inventory::derive_workload(
        &p.name_any(),
        p.metadata.generate_name.as_deref().is_some_and(|g| !g.is_empty()),
        &owners,
        &|k| p.labels().get(k).cloned(),
    );
    PodInfo {
        workload,
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        uid: p.uid().unwrap_or_default(),
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".into()),
        node: spec.and_then(|s| s.node_name.clone()).filter(|n| !n.is_empty()),
        ips,
        label,
        host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
        finished: matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")),
        deleting: p.metadata.deletion_timestamp.is_some(),
    }
}

fn node_addresses(n: &Node) -> Vec<IpAddr> {
    let addrs = n.status.as_ref().and_then(|s| s.addresses.as_ref());
    parse_ips(
        addrs
            .into_iter()
            .flatten()
            .filter(|a| a.type_ == "InternalIP" || a.type_ == "ExternalIP")
            .map(|a| &a.address),
    )
}

fn svc_info(s: &Service) -> SvcInfo {
    let spec = s.spec.as_ref();
    let mut ips: Vec<&String> =
        spec.and_then(|s| s.cluster_ips.as_ref()).into_iter().flatten().collect();
    if ips.is_empty() {
        ips.extend(spec.and_then(|s| s.cluster_ip.as_ref()));
    }
    // Headless ("None") and ExternalName services have no virtual address.
    let cluster_ips = parse_ips(ips);
    let ports = spec
        .and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(SvcPort {
                name: p.name.clone().unwrap_or_default(),
                port: port_u16(p.port)?,
                tcp: is_tcp(p.protocol.as_ref()),
            })
        })
        .collect();
    SvcInfo { cluster_ips, ports }
}

fn slice_info(s: &EndpointSlice) -> SliceInfo {
    let ipv6 = match s.address_type.as_str() {
        "IPv4" => Some(false),
        "IPv6" => Some(true),
        _ => None,
    };
    let ports = s
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            Some(SvcPort {
                name: p.name.clone().unwrap_or_default(),
                port: port_u16(p.port?)?,
                tcp: is_tcp(p.protocol.as_ref()),
            })
        })
        .collect();
    let endpoints = s
        .endpoints
        .iter()
        .map(|e| SliceEndpoint {
            addrs: parse_ips(&e.addresses),
            // The API says: a missing `ready` condition means ready.
            ready: e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true),
            pod: e.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).and_then(|r| {
                Some(key_of(
                    r.namespace.as_deref().or(s.metadata.namespace.as_deref()),
                    r.name.as_deref()?,
                ))
            }),
        })
        .collect();
    SliceInfo {
        namespace: s.namespace().unwrap_or_default(),
        service: s.labels().get(SERVICE_NAME_LABEL).cloned(),
        ipv6,
        ports,
        endpoints,
    }
}

/// A `v1` `Endpoints` object as slice records: one per subset and address
/// family (`addresses` are ready, `notReadyAddresses` are not).
fn endpoints_info(e: &Endpoints) -> Vec<SliceInfo> {
    let namespace = e.namespace().unwrap_or_default();
    let mut out = Vec::new();
    for subset in e.subsets.iter().flatten() {
        let ports: Vec<SvcPort> = subset
            .ports
            .iter()
            .flatten()
            .filter_map(|p| {
                Some(SvcPort {
                    name: p.name.clone().unwrap_or_default(),
                    port: port_u16(p.port)?,
                    tcp: is_tcp(p.protocol.as_ref()),
                })
            })
            .collect();
        let addrs = subset
            .addresses
            .iter()
            .flatten()
            .map(|a| (a, true))
            .chain(subset.not_ready_addresses.iter().flatten().map(|a| (a, false)));
        let mut by_family: [Vec<SliceEndpoint>; 2] = [Vec::new(), Vec::new()];
        for (a, ready) in addrs {
            let Some(ip) = parse_ips([&a.ip]).first().copied() else { continue };
            let pod =
                a.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).and_then(|r| {
                    Some(key_of(r.namespace.as_deref().or(Some(&namespace)), r.name.as_deref()?))
                });
            by_family[usize::from(ip.is_ipv6())].push(SliceEndpoint {
                addrs: vec![ip],
                ready,
                pod,
            });
        }
        for (ipv6, endpoints) in [false, true].into_iter().zip(by_family) {
            if !endpoints.is_empty() {
                out.push(SliceInfo {
                    namespace: namespace.clone(),
                    service: Some(e.name_any()),
                    ipv6: Some(ipv6),
                    ports: ports.clone(),
                    endpoints,
                });
            }
        }
    }
    out
}

/// Applies one event to a map of slim records; returns whether it changed.
fn reduce<K, V: PartialEq>(
    map: &mut BTreeMap<String, V>,
    ev: Event<K>,
    key: impl Fn(&K) -> String,
    slim: impl Fn(&K) -> V,
) -> bool {
    match ev {
        Event::Applied(o) => {
            let v = slim(&o);
            let k = key(&o);
            if map.get(&k) == Some(&v) {
                false
            } else {
                map.insert(k, v);
                true
            }
        }
        Event::Deleted(o) => map.remove(&key(&o)).is_some(),
        Event::Restarted(list) => {
            let fresh: BTreeMap<String, V> = list.iter().map(|o| (key(o), slim(o))).collect();
            let changed = *map != fresh;
            *map = fresh;
            changed
        }
    }
}

fn meta_key<K: kube::Resource>(o: &K) -> String {
    key_of(o.meta().namespace.as_deref(), o.meta().name.as_deref().unwrap_or_default())
}

impl ClusterState {
    /// State for the daemon of `node` (`None` for the CA, which has no pods
    /// of its own and does not watch a node), in `trust_domain`.
    pub fn new(node: Option<String>, trust_domain: impl Into<String>) -> Self {
        let mut listed = BTreeSet::new();
        if node.is_none() {
            listed.insert(Kind::Node);
        }
        Self {
            node,
            trust_domain: trust_domain.into(),
            namespaces: BTreeMap::new(),
            pods: BTreeMap::new(),
            nodes: BTreeMap::new(),
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            endpoints: BTreeMap::new(),
            unserved: BTreeMap::new(),
            listed,
            overrides: ModeOverrides::default(),
        }
    }

    /// Replaces the mode overrides; returns whether they changed.
    pub fn set_mode_overrides(&mut self, overrides: ModeOverrides) -> bool {
        if self.overrides == overrides {
            return false;
        }
        self.overrides = overrides;
        true
    }

    /// Applies one event. Returns whether anything the inventory is built
    /// from changed (or the state just became synced).
    pub fn apply(&mut self, update: Update) -> bool {
        let was_synced = self.is_synced();
        let (kind, restarted) = update.kind();
        let mut changed = false;
        if restarted && !matches!(update, Update::Unserved { .. }) {
            // The source of this kind is served (again).
            changed |= self.unserved.remove(&kind).is_some();
        }
        // Endpoints come from one source at a time: a (re-)list of one
        // replaces what the other said.
        match &update {
            Update::EndpointSlice(Event::Restarted(_)) if !self.endpoints.is_empty() => {
                self.endpoints.clear();
                changed = true;
            }
            Update::Endpoints(Event::Restarted(_)) if !self.slices.is_empty() => {
                self.slices.clear();
                changed = true;
            }
            _ => {}
        }
        changed |= match update {
            Update::Namespace(e) => {
                reduce(&mut self.namespaces, e, |n: &Namespace| n.name_any(), ns_mode)
            }
            Update::Pod(e) => reduce(&mut self.pods, e, meta_key, pod_info),
            Update::Node(e) => reduce(&mut self.nodes, e, |n: &Node| n.name_any(), node_addresses),
            Update::Service(e) => reduce(&mut self.services, e, meta_key, svc_info),
            Update::EndpointSlice(e) => reduce(&mut self.slices, e, meta_key, slice_info),
            Update::Endpoints(e) => reduce(&mut self.endpoints, e, meta_key, endpoints_info),
            Update::Unserved { kind, message } => self.set_unserved(kind, message),
        };
        if restarted {
            self.listed.insert(kind);
        }
        changed || (self.is_synced() && !was_synced)
    }

    /// Records that `kind` is not served: its state is emptied.
    fn set_unserved(&mut self, kind: Kind, message: String) -> bool {
        let mut changed = self.unserved.insert(kind, message.clone()) != Some(message);
        match kind {
            Kind::Namespace => changed |= !std::mem::take(&mut self.namespaces).is_empty(),
            Kind::Pod => changed |= !std::mem::take(&mut self.pods).is_empty(),
            Kind::Node => changed |= !std::mem::take(&mut self.nodes).is_empty(),
            Kind::Service => changed |= !std::mem::take(&mut self.services).is_empty(),
            Kind::EndpointSlice => {
                changed |= !std::mem::take(&mut self.slices).is_empty();
                changed |= !std::mem::take(&mut self.endpoints).is_empty();
            }
        }
        changed
    }

    /// Every kind has been listed at least once.
    pub fn is_synced(&self) -> bool {
        Kind::ALL.iter().all(|k| self.listed.contains(k))
    }

    /// The kinds not listed yet.
    pub fn unsynced(&self) -> Vec<Kind> {
        Kind::ALL.into_iter().filter(|k| !self.listed.contains(k)).collect()
    }

    /// This daemon's node, if any.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The effective mode of a pod's namespace (`None`: not enrolled): the
    /// namespace's override, else the mesh-wide one, else its label's.
    pub fn namespace_mode(&self, namespace: &str) -> Option<Mode> {
        match self.namespaces.get(namespace) {
            Some(NsMode::Mode(m)) => Some(
                self.overrides
                    .namespaces
                    .get(namespace)
                    .copied()
                    .or(self.overrides.mesh)
                    .unwrap_or(*m),
            ),
            _ => None,
        }
    }

    /// Why the pod `namespace/name` is not enrolled, in words for the CNI
    /// plugin's answer and the logs (`None`: it is enrolled, or unknown).
    pub fn not_enrolled_reason(&self, namespace: &str, name: &str) -> Option<String> {
        let p = self.pods.get(&key_of(Some(namespace), name))?;
        if p.host_network {
            return Some(format!("pod {namespace}/{name} uses the host network; host-network pods are never enrolled"));
        }
        match (self.namespaces.get(namespace), &p.label) {
            (_, PodLabel::Off) => {
                Some(format!("pod {namespace}/{name} is labelled {MODE_LABEL}=off"))
            }
            (Some(NsMode::Mode(_)), _) => None,
            (Some(NsMode::Invalid(v)), _) => Some(format!(
                "namespace {namespace} has {MODE_LABEL}={v:?}; use strict or permissive"
            )),
            _ => Some(format!(
                "namespace {namespace} is not labelled {MODE_LABEL}=strict|permissive"
            )),
        }
    }

    /// Builds the inventory and the problems found (bad label values,
    /// addresses claimed by two pods).
    pub fn inventory(&self, resolver: &dyn NetnsResolver) -> (Inventory, Vec<Problem>) {
        let mut problems: Vec<Problem> = self
            .unserved
            .iter()
            .map(|(kind, message)| Problem {
                subject: kind.resource().into(),
                message: message.clone(),
            })
            .collect();
        for (ns, m) in &self.namespaces {
            if let NsMode::Invalid(v) = m {
                problems.push(Problem {
                    subject: ns.clone(),
                    message: format!("namespace label {MODE_LABEL}={v:?} is not strict or permissive; the namespace is not enrolled"),
                });
            }
        }
        let mut inv = Inventory { trust_domain: self.trust_domain.clone(), ..Inventory::default() };
        for (name, addresses) in &self.nodes {
            inv.nodes.insert(
                name.clone(),
                inventory::Node { name: name.clone(), addresses: addresses.clone() },
            );
        }
        // Pods holding an address: the one not being deleted wins, then the
        // first by key; the loser is served without it and reported.
        let mut owner: HashMap<IpAddr, &str> = HashMap::new();
        let mut candidates: Vec<(&String, &PodInfo)> = self.pods.iter().collect();
        candidates.sort_by_key(|(k, p)| (p.deleting, *k));
        for (key, p) in candidates {
            let Some(node) = p.node.as_deref() else { continue };
            if p.host_network || p.finished {
                continue;
            }
            let local = self.node.as_deref() == Some(node);
            let pref = PodRef { namespace: &p.namespace, name: &p.name, uid: &p.uid, ips: &p.ips };
            let mut ips = p.ips.clone();
            if ips.is_empty() && local {
                ips = resolver.ips(&pref).into_iter().map(|ip| ip.to_canonical()).collect();
            }
            ips.retain(|ip| {
                if let Some(other) = owner.get(ip) {
                    problems.push(Problem {
                        subject: key.clone(),
                        message: format!(
                            "address {ip} is also claimed by pod {other}; left out for this pod"
                        ),
                    });
                    false
                } else {
                    owner.insert(*ip, key);
                    true
                }
            });
            if let PodLabel::Invalid(v) = &p.label {
                problems.push(Problem {
                    subject: key.clone(),
                    message: format!("pod label {MODE_LABEL}={v:?} is not off, strict or permissive; the namespace's mode applies"),
                });
            }
            let ns_mode = self.namespace_mode(&p.namespace);
            let mode = match &p.label {
                PodLabel::Off => None,
                PodLabel::Mode(m) => ns_mode.map(|_| *m),
                PodLabel::None | PodLabel::Invalid(_) => ns_mode,
            };
            inv.nodes.entry(node.to_owned()).or_insert_with(|| inventory::Node {
                name: node.to_owned(),
                addresses: Vec::new(),
            });
            inv.pods.insert(
                key.clone(),
                inventory::Pod {
                    name: p.name.clone(),
                    namespace: p.namespace.clone(),
                    service_account: p.service_account.clone(),
                    node: node.to_owned(),
                    ips,
                    netns: if local { resolver.netns(&pref) } else { None },
                    mode,
                    workload: Some(p.workload.clone()),
                },
            );
        }
        inv.services = self.services_table();
        (inv, problems)
    }

    /// `ClusterIP:port` → endpoints, from Services and their `EndpointSlices`.
    fn services_table(&self) -> BTreeMap<SocketAddr, ServiceBackends> {
        let mut slices_of: HashMap<(&str, &str), Vec<&SliceInfo>> = HashMap::new();
        for s in self.slices.values().chain(self.endpoints.values().flatten()) {
            if let Some(svc) = &s.service {
                slices_of.entry((s.namespace.as_str(), svc.as_str())).or_default().push(s);
            }
        }
        let mut table = BTreeMap::new();
        for (key, svc) in &self.services {
            let Some((ns, name)) = key.split_once('/') else { continue };
            let slices = slices_of.get(&(ns, name)).map(Vec::as_slice).unwrap_or_default();
            for vip in &svc.cluster_ips {
                // UDP and SCTP are not captured, so only TCP ports resolve.
                for port in svc.ports.iter().filter(|p| p.tcp) {
                    let mut endpoints: BTreeMap<SocketAddr, inventory::Endpoint> = BTreeMap::new();
                    for slice in slices.iter().filter(|s| s.ipv6 == Some(vip.is_ipv6())) {
                        // A Service port's backends are the slice port of the same name.
                        let Some(target) =
                            slice.ports.iter().find(|p| p.name == port.name && p.tcp)
                        else {
                            continue;
                        };
                        for e in &slice.endpoints {
                            for ip in e.addrs.iter().filter(|ip| ip.is_ipv6() == vip.is_ipv6()) {
                                let addr = SocketAddr::new(*ip, target.port);
                                let entry = endpoints.entry(addr).or_insert_with(|| {
                                    inventory::Endpoint { addr, ready: false, pod: e.pod.clone() }
                                });
                                // Listed twice (slices being rebalanced): ready if any says so.
                                entry.ready |= e.ready;
                            }
                        }
                    }
                    table.insert(
                        SocketAddr::new(*vip, port.port),
                        ServiceBackends {
                            service: key.clone(),
                            endpoints: endpoints.into_values().collect(),
                        },
                    );
                }
            }
        }
        table
    }
}

#[cfg(test)]
mod tests;
