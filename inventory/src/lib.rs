//! tlsmesh-inventory: the inventory: which pods exist, where they run, who they are.
//!
//! Without Kubernetes a static TOML file is the inventory (the demo, the
//! tests and plain Linux hosts use it); the Kubernetes watcher produces the
//! same `Inventory` value. Everything here is pure: parsing, validation and
//! the questions the daemon asks (which pods are mine and enrolled? who owns
//! this address?) are functions over data.
//!
//! ```toml
//! trust_domain = "cluster.local"
//!
//! [[node]]
//! name = "n0"
//! addresses = ["192.168.77.1", "fd77::1"]
//!
//! [[namespace]]
//! name = "demo"
//! mode = "strict"          # or "permissive"; a namespace not listed is not enrolled
//!
//! [[pod]]
//! name = "client"
//! namespace = "demo"
//! service_account = "client"   # default "default"
//! node = "n0"
//! ips = ["10.77.1.2", "fd77:1::2"]
//! netns = "/run/netns/client"
//! # mode = "off"              # opts this one pod out
//! # workload = "client"       # its workload in metrics (default: the pod name)
//! ```

#![forbid(unsafe_code)]
use std::{
    collections::{BTreeMap, HashMap, HashSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

/// Errors that make the whole file unusable.
#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    /// Cannot read the file.
    #[error("cannot read inventory {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Not valid TOML or not the expected shape.
    #[error("inventory {path} is malformed: {message}")]
    Malformed { path: PathBuf, message: String },
}

/// A problem with one entry; the entry is skipped and the rest is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `namespace/name` of the pod, or the node name.
    pub subject: String,
    /// What is wrong and what to do.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.subject, self.message)
    }
}

/// Inbound policy mode of an enrolled pod.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize, Hash, PartialOrd, Ord,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Only mTLS inbound.
    Strict,
    /// Plaintext inbound also accepted, and counted.
    Permissive,
}

impl Mode {
    /// The value the eBPF enrollment map stores.
    pub fn as_map_value(self) -> u32 {
        match self {
            Mode::Strict => tlsmesh_common::MODE_STRICT,
            Mode::Permissive => tlsmesh_common::MODE_PERMISSIVE,
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Strict => "strict",
            Mode::Permissive => "permissive",
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum PodMode {
    Off,
    Strict,
    Permissive,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawInventory {
    #[serde(default = "default_trust_domain")]
    trust_domain: String,
    #[serde(default, rename = "node")]
    nodes: Vec<RawNode>,
    #[serde(default, rename = "namespace")]
    namespaces: Vec<RawNamespace>,
    #[serde(default, rename = "pod")]
    pods: Vec<RawPod>,
}

fn default_trust_domain() -> String {
    "cluster.local".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    name: String,
    #[serde(default)]
    addresses: Vec<IpAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNamespace {
    name: String,
    mode: Mode,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPod {
    name: String,
    namespace: String,
    #[serde(default = "default_sa")]
    service_account: String,
    node: String,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    netns: Option<PathBuf>,
    #[serde(default)]
    mode: Option<PodMode>,
    #[serde(default)]
    workload: Option<String>,
}

fn default_sa() -> String {
    "default".into()
}

/// A node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Node {
    /// Node name.
    pub name: String,
    /// Addresses (kubelet probes come from these).
    pub addresses: Vec<IpAddr>,
}

/// A pod.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
    /// Node it runs on.
    pub node: String,
    /// Pod addresses.
    pub ips: Vec<IpAddr>,
    /// Its network namespace (required for pods on this node).
    pub netns: Option<PathBuf>,
    /// Effective mode: `None` when not enrolled.
    pub mode: Option<Mode>,
    /// The workload it belongs to (Deployment, `StatefulSet`, … or the
    /// inventory's `workload`), for metrics; `None`: the pod name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
}

impl Pod {
    /// Its workload's name (metrics label `*_workload`): [`Pod::workload`],
    /// else the pod name.
    pub fn workload_name(&self) -> &str {
        self.workload.as_deref().unwrap_or(&self.name)
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Its SPIFFE identity in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        format!("spiffe://{trust_domain}/ns/{}/sa/{}", self.namespace, self.service_account)
    }
}

/// A validated inventory.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Inventory {
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Nodes by name.
    pub nodes: BTreeMap<String, Node>,
    /// Pods by `namespace/name`.
    pub pods: BTreeMap<String, Pod>,
    /// Service ports by virtual address (`ClusterIP:port`), so a captured
    /// connect to a Service can be resolved before kube-proxy's DNAT would
    /// have done it (see [`resolve_service`]). Filled by the Kubernetes
    /// watcher; the static inventory file has no services.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub services: BTreeMap<SocketAddr, ServiceBackends>,
}

/// The backends of one Service port (one `ClusterIP:port`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ServiceBackends {
    /// `namespace/name` of the Service.
    pub service: String,
    /// Its endpoints, in a stable order (sorted by address).
    pub endpoints: Vec<Endpoint>,
}

/// One endpoint of a Service port.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Endpoint {
    /// Where the connection goes: endpoint address and target port.
    pub addr: SocketAddr,
    /// Ready to receive traffic (the `EndpointSlice` `ready` condition).
    pub ready: bool,
    /// `namespace/name` of the backing pod, when the `EndpointSlice` names one.
    pub pod: Option<String>,
}

/// Round-robin position per Service address, kept by the daemon between
/// calls to [`resolve_service`]. Plain data: no clock, no randomness.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServicePicker {
    next: HashMap<SocketAddr, usize>,
}

impl ServicePicker {
    /// A picker that starts every Service at its first ready endpoint.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets positions of Service addresses that `inv` no longer has.
    pub fn retain_known(&mut self, inv: &Inventory) {
        self.next.retain(|vip, _| inv.services.contains_key(vip));
    }
}

/// Resolves a connection to a Service address (`ClusterIP:port`) to one of
/// its ready endpoints, round robin. Captured connects are rewritten before
/// kube-proxy's DNAT, so the daemon must do this itself.
///
/// `None`: `dst` is not a known Service port, or the Service has no ready
/// endpoint. The daemon then passes the connection through to `dst`
/// unchanged, and kube-proxy does what it would have done without tlsmesh
/// (which, with no endpoints, is to refuse it).
///
/// The result is an ordinary destination: the daemon routes it with
/// [`route`] like any other, so an endpoint pod that is not enrolled (or an
/// endpoint that is no pod at all) is passed through in plaintext.
pub fn resolve_service(
    inv: &Inventory,
    dst: SocketAddr,
    picker: &mut ServicePicker,
) -> Option<SocketAddr> {
    let vip = SocketAddr::new(dst.ip().to_canonical(), dst.port());
    let backends = inv.services.get(&vip)?;
    let ready = backends.endpoints.iter().filter(|e| e.ready).count();
    if ready == 0 {
        return None;
    }
    let slot = picker.next.entry(vip).or_insert(0);
    let pick = *slot % ready;
    *slot = pick.wrapping_add(1);
    backends.endpoints.iter().filter(|e| e.ready).nth(pick).map(|e| e.addr)
}

/// Reads and validates an inventory file.
pub fn load(path: &Path) -> Result<(Inventory, Vec<Problem>), InventoryError> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| InventoryError::Read { path: path.to_path_buf(), source })?;
    parse(&text).map_err(|message| InventoryError::Malformed { path: path.to_path_buf(), message })
}

/// Parses and validates inventory text. A syntax or shape error fails the
/// whole file; a bad entry is reported as a `Problem` and skipped.
pub fn parse(text: &str) -> Result<(Inventory, Vec<Problem>), String> {
    let raw: RawInventory = toml::from_str(text).map_err(|e| e.to_string())?;
    let mut problems = Vec::new();
    let mut inv = Inventory { trust_domain: raw.trust_domain, ..Inventory::default() };
    if inv.trust_domain.is_empty() || inv.trust_domain.contains('/') {
        return Err(format!(
            "trust_domain {:?} is not a valid SPIFFE trust domain",
            inv.trust_domain
        ));
    }
    for n in raw.nodes {
        if inv.nodes.contains_key(&n.name) {
            problems.push(Problem {
                subject: n.name.clone(),
                message: "duplicate node; the first entry is used".into(),
            });
            continue;
        }
        inv.nodes.insert(n.name.clone(), Node { name: n.name, addresses: n.addresses });
    }
    let modes: HashMap<&str, Mode> =
        raw.namespaces.iter().map(|n| (n.name.as_str(), n.mode)).collect();
    let mut seen_ips: HashMap<IpAddr, String> = HashMap::new();
    for p in raw.pods {
        let key = format!("{}/{}", p.namespace, p.name);
        let problem = |m: String| Problem { subject: key.clone(), message: m };
        if inv.pods.contains_key(&key) {
            problems.push(problem(
                "duplicate pod; the first entry is used, this one is ignored".into(),
            ));
            continue;
        }
        if !inv.nodes.contains_key(&p.node) {
            problems.push(problem(format!(
                "names node {:?}, which the inventory does not list; add a [[node]] entry",
                p.node
            )));
            continue;
        }
        if let Some(owner) = p.ips.iter().find_map(|ip| seen_ips.get(ip)) {
            problems.push(problem(format!(
                "shares an address with {owner}; pod addresses must be unique, ignored"
            )));
            continue;
        }
        let ns_mode = modes.get(p.namespace.as_str()).copied();
        let mode = match p.mode {
            Some(PodMode::Off) => None,
            Some(PodMode::Strict) => ns_mode.map(|_| Mode::Strict),
            Some(PodMode::Permissive) => ns_mode.map(|_| Mode::Permissive),
            None => ns_mode,
        };
        for ip in &p.ips {
            seen_ips.insert(*ip, key.clone());
        }
        inv.pods.insert(
            key,
            Pod {
                name: p.name,
                namespace: p.namespace,
                service_account: p.service_account,
                node: p.node,
                ips: p.ips,
                netns: p.netns,
                mode,
                workload: p.workload.filter(|w| !w.is_empty()),
            },
        );
    }
    Ok((inv, problems))
}

impl Inventory {
    /// The enrolled pods that run on `node`.
    pub fn enrolled_on(&self, node: &str) -> Vec<&Pod> {
        self.pods.values().filter(|p| p.node == node && p.mode.is_some()).collect()
    }

    /// The pod that owns `ip`, if any.
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        let ip = ip.to_canonical();
        self.pods.values().find(|p| p.ips.contains(&ip))
    }

    /// Addresses of `node` (the sources of kubelet-style probes).
    pub fn node_addresses(&self, node: &str) -> HashSet<IpAddr> {
        self.nodes.get(node).map(|n| n.addresses.iter().copied().collect()).unwrap_or_default()
    }

    /// Node-pod placement: SPIFFE id -> nodes where a pod with it runs.
    pub fn placement(&self) -> BTreeMap<String, Vec<String>> {
        let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for p in self.pods.values() {
            let v = m.entry(p.spiffe_id(&self.trust_domain)).or_default();
            if !v.contains(&p.node) {
                v.push(p.node.clone());
            }
        }
        m
    }
}

/// Where a captured outbound connection goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// An enrolled pod on this node: deliver locally, no TLS.
    LocalPod(String),
    /// An enrolled pod on another node: through the tunnel.
    RemotePod { pod: String, node: String },
    /// Anything else (not enrolled, outside the cluster): plaintext passthrough
    /// from the source pod's own address, as if not captured.
    Passthrough,
}

/// Decides the route of a connection to `dst` from a pod on `my_node`.
pub fn route(inv: &Inventory, my_node: &str, dst: IpAddr) -> Route {
    route_to(my_node, inv.pod_by_ip(dst))
}

/// [`route`] given the pod that owns the destination address (found by the
/// caller, e.g. through an address index), if any.
pub fn route_to(my_node: &str, owner: Option<&Pod>) -> Route {
    match owner {
        Some(p) if p.mode.is_some() && p.node == my_node => Route::LocalPod(p.key()),
        Some(p) if p.mode.is_some() => Route::RemotePod { pod: p.key(), node: p.node.clone() },
        _ => Route::Passthrough,
    }
}

/// What the inbound side does with a plaintext connection to an enrolled pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundVerdict {
    /// Proxy it to the app (permissive, counted as plaintext).
    AcceptPlaintext,
    /// A kubelet-style probe from the node: proxy it in any mode.
    AcceptProbe,
    /// Refuse it (strict).
    Refuse,
}

/// Inbound plaintext policy: probes from `probe_sources` are always allowed.
pub fn inbound_verdict<S: std::hash::BuildHasher>(
    mode: Mode,
    src: IpAddr,
    probe_sources: &HashSet<IpAddr, S>,
) -> InboundVerdict {
    if probe_sources.contains(&src.to_canonical()) {
        InboundVerdict::AcceptProbe
    } else if mode == Mode::Permissive {
        InboundVerdict::AcceptPlaintext
    } else {
        InboundVerdict::Refuse
    }
}

/// The owner reference of a pod, as far as [`derive_workload`] needs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner<'a> {
    /// `kind` (`ReplicaSet`, `StatefulSet`, `DaemonSet`, `Job`, …).
    pub kind: &'a str,
    /// `name`.
    pub name: &'a str,
    /// `controller: true`.
    pub controller: bool,
}

/// The labels that name a pod's application, first found wins (Istio's order).
pub const CANONICAL_NAME_LABELS: [&str; 3] =
    ["service.istio.io/canonical-name", "app.kubernetes.io/name", "app"];

/// The label that overrides a pod's workload name (as in Istio).
pub const WORKLOAD_NAME_LABEL: &str = "service.istio.io/workload-name";

/// A Kubernetes pod's workload name, Istio's heuristic
/// (`GetWorkloadMetaFromPod`): the `service.istio.io/workload-name` label;
/// else, for a pod with a generated name, its controller — a `ReplicaSet`
/// named `<deployment>-<pod-template-hash>` is its Deployment, a `Job` named
/// `<cronjob>-<8 to 10 digits>` its `CronJob`, a `StatefulSet`, `DaemonSet`
/// or other `Job` itself; else (a bare pod) the first of the canonical-name
/// labels `service.istio.io/canonical-name`, `app.kubernetes.io/name`,
/// `app`; else the pod name. (Istio names a bare pod's workload after the
/// pod and uses those labels only for its canonical service.)
pub fn derive_workload(
    pod_name: &str,
    generated_name: bool,
    owners: &[Owner<'_>],
    label: &dyn Fn(&str) -> Option<String>,
) -> String {
    if let Some(w) = label(WORKLOAD_NAME_LABEL).filter(|w| !w.is_empty()) {
        return w;
    }
    let Some(c) = owners.iter().find(|o| o.controller).filter(|_| generated_name) else {
        return CANONICAL_NAME_LABELS
            .iter()
            .find_map(|l| label(l).filter(|v| !v.is_empty()))
            .unwrap_or_else(|| pod_name.to_owned());
    };
    let trimmed = |hash_label: &str| {
        let hash = label(hash_label).filter(|h| !h.is_empty())?;
        c.name.strip_suffix(hash.as_str())?.strip_suffix('-').map(str::to_owned)
    };
    match c.kind {
        "ReplicaSet" => trimmed("pod-template-hash")
            .or_else(|| trimmed("rollouts-pod-template-hash"))
            .unwrap_or_else(|| c.name.to_owned()),
        "ReplicationController" => label("deploymentconfig").unwrap_or_else(|| c.name.to_owned()),
        "Job" => match c.name.rsplit_once('-') {
            Some((cron, ts))
                if !cron.is_empty()
                    && (8..=10).contains(&ts.len())
                    && ts.bytes().all(|b| b.is_ascii_digit()) =>
            {
                cron.to_owned()
            }
            _ => c.name.to_owned(),
        },
        _ => c.name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        trust_domain = "example.org"
        [[node]]
        name = "a"
        addresses = ["192.168.0.1"]
        [[node]]
        name = "b"
        [[namespace]]
        name = "shop"
        mode = "strict"
        [[namespace]]
        name = "lab"
        mode = "permissive"
        [[pod]]
        name = "web"
        namespace = "shop"
        service_account = "web"
        node = "a"
        ips = ["10.0.0.2"]
        netns = "/run/netns/web"
        [[pod]]
        name = "db"
        namespace = "shop"
        node = "b"
        ips = ["10.0.1.2"]
        [[pod]]
        name = "opt-out"
        namespace = "shop"
        node = "a"
        ips = ["10.0.0.3"]
        mode = "off"
        [[pod]]
        name = "legacy"
        namespace = "other"
        node = "a"
        ips = ["10.0.0.4"]
        [[pod]]
        name = "exp"
        namespace = "lab"
        node = "a"
        ips = ["10.0.0.5"]
    "#;

    #[test]
    fn modes_follow_namespace_and_pod_labels() {
        let (inv, problems) = parse(GOOD).unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(inv.pods["shop/web"].mode, Some(Mode::Strict));
        assert_eq!(inv.pods["shop/opt-out"].mode, None, "pod label off opts out");
        assert_eq!(inv.pods["other/legacy"].mode, None, "unlabelled namespace is not enrolled");
        assert_eq!(inv.pods["lab/exp"].mode, Some(Mode::Permissive));
        let mine: Vec<_> = inv.enrolled_on("a").iter().map(|p| p.key()).collect();
        assert_eq!(mine, ["lab/exp", "shop/web"]);
        assert_eq!(
            inv.pods["shop/db"].spiffe_id(&inv.trust_domain),
            "spiffe://example.org/ns/shop/sa/default"
        );
    }

    #[test]
    fn routes() {
        let (inv, _) = parse(GOOD).unwrap();
        assert_eq!(
            route(&inv, "a", "10.0.0.5".parse().unwrap()),
            Route::LocalPod("lab/exp".into())
        );
        assert_eq!(
            route(&inv, "a", "10.0.1.2".parse().unwrap()),
            Route::RemotePod { pod: "shop/db".into(), node: "b".into() }
        );
        assert_eq!(
            route(&inv, "a", "10.0.0.3".parse().unwrap()),
            Route::Passthrough,
            "opted-out pod"
        );
        assert_eq!(route(&inv, "a", "8.8.8.8".parse().unwrap()), Route::Passthrough);
        assert_eq!(
            route(&inv, "a", "::ffff:10.0.1.2".parse().unwrap()),
            Route::RemotePod { pod: "shop/db".into(), node: "b".into() }
        );
    }

    #[test]
    fn bad_entries_are_skipped_and_reported() {
        let text = format!(
            "{GOOD}
            [[pod]]
            name = \"web\"
            namespace = \"shop\"
            node = \"a\"
            ips = [\"10.0.0.9\"]
            [[pod]]
            name = \"ghost\"
            namespace = \"shop\"
            node = \"zz\"
            [[pod]]
            name = \"twin\"
            namespace = \"shop\"
            node = \"a\"
            ips = [\"10.0.0.2\"]
            "
        );
        let (inv, problems) = parse(&text).unwrap();
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(problems[0].message.contains("duplicate pod"));
        assert!(problems[1].message.contains("\"zz\""));
        assert!(problems[2].message.contains("shop/web"));
        assert_eq!(inv.pods.len(), 5, "the valid pods are still served");
        assert_eq!(inv.pods["shop/web"].ips, vec!["10.0.0.2".parse::<IpAddr>().unwrap()]);
    }

    #[test]
    fn malformed_files_fail_whole() {
        assert!(parse("[[pod]]\nname = 3").is_err());
        assert!(parse(
            "[[pod]]\nname = \"x\"\nnamespace = \"y\"\nnode = \"a\"\nips = [\"not-an-ip\"]"
        )
        .is_err());
        let e = parse("bogus_key = 1").unwrap_err();
        assert!(e.contains("bogus_key"), "{e}");
        let e = load(Path::new("/nonexistent/inv.toml")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/inv.toml"));
    }

    fn with_service(endpoints: &[(&str, bool)]) -> Inventory {
        let (mut inv, _) = parse(GOOD).unwrap();
        inv.services.insert(
            "10.96.0.10:80".parse().unwrap(),
            ServiceBackends {
                service: "shop/web".into(),
                endpoints: endpoints
                    .iter()
                    .map(|(a, ready)| Endpoint {
                        addr: a.parse().unwrap(),
                        ready: *ready,
                        pod: None,
                    })
                    .collect(),
            },
        );
        inv
    }

    #[test]
    fn services_resolve_round_robin_over_ready_endpoints() {
        let inv = with_service(&[
            ("10.0.0.2:8080", true),
            ("10.0.0.3:8080", false),
            ("10.0.1.2:8080", true),
        ]);
        let mut picker = ServicePicker::new();
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let picks: Vec<_> =
            (0..4).map(|_| resolve_service(&inv, vip, &mut picker).unwrap().to_string()).collect();
        assert_eq!(
            picks,
            ["10.0.0.2:8080", "10.0.1.2:8080", "10.0.0.2:8080", "10.0.1.2:8080"],
            "not-ready skipped"
        );
        let mapped: SocketAddr = "[::ffff:10.96.0.10]:80".parse().unwrap();
        assert_eq!(
            resolve_service(&inv, mapped, &mut picker).unwrap().to_string(),
            "10.0.0.2:8080",
            "v4-mapped VIP"
        );
        assert_eq!(
            resolve_service(&inv, "10.96.0.10:81".parse().unwrap(), &mut picker),
            None,
            "other port"
        );
        assert_eq!(
            resolve_service(&inv, "10.96.0.11:80".parse().unwrap(), &mut picker),
            None,
            "not a service"
        );
        // The endpoint is then routed like any destination: enrolled or not.
        assert_eq!(
            route(&inv, "a", "10.0.1.2".parse().unwrap()),
            Route::RemotePod { pod: "shop/db".into(), node: "b".into() }
        );
        assert_eq!(route(&inv, "a", "10.0.0.3".parse().unwrap()), Route::Passthrough);
    }

    #[test]
    fn services_without_ready_endpoints_are_not_resolved() {
        let inv = with_service(&[("10.0.0.2:8080", false)]);
        let mut picker = ServicePicker::new();
        assert_eq!(resolve_service(&inv, "10.96.0.10:80".parse().unwrap(), &mut picker), None);
        let inv = with_service(&[]);
        assert_eq!(resolve_service(&inv, "10.96.0.10:80".parse().unwrap(), &mut picker), None);
    }

    #[test]
    fn round_robin_survives_endpoint_changes() {
        let mut picker = ServicePicker::new();
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let three =
            with_service(&[("10.0.0.2:1", true), ("10.0.0.3:1", true), ("10.0.0.4:1", true)]);
        for _ in 0..2 {
            resolve_service(&three, vip, &mut picker);
        }
        // Scaled down to one endpoint: the stored position is past the end.
        let one = with_service(&[("10.0.0.9:1", true)]);
        assert_eq!(resolve_service(&one, vip, &mut picker).unwrap().to_string(), "10.0.0.9:1");
        assert_eq!(resolve_service(&one, vip, &mut picker).unwrap().to_string(), "10.0.0.9:1");
        picker.retain_known(&Inventory::default());
        assert_eq!(picker, ServicePicker::new(), "forgets services that are gone");
    }

    #[test]
    fn services_serialize_with_address_keys() {
        let inv = with_service(&[("10.0.0.2:8080", true)]);
        // The admin API serves the inventory as JSON, whose map keys must be
        // strings; toml has the same rule and is a dependency already.
        let text = toml::to_string(&inv).unwrap();
        assert!(text.contains("[services.\"10.96.0.10:80\"]"), "{text}");
        assert!(text.contains("service = \"shop/web\""), "{text}");
        let (plain, _) = parse(GOOD).unwrap();
        assert!(!toml::to_string(&plain).unwrap().contains("services"), "omitted when empty");
    }

    #[test]
    fn inbound_policy() {
        let probes: HashSet<IpAddr> = ["192.168.0.1".parse().unwrap()].into();
        let node = "192.168.0.1".parse().unwrap();
        let other = "10.9.9.9".parse().unwrap();
        assert_eq!(inbound_verdict(Mode::Strict, node, &probes), InboundVerdict::AcceptProbe);
        assert_eq!(inbound_verdict(Mode::Strict, other, &probes), InboundVerdict::Refuse);
        assert_eq!(
            inbound_verdict(Mode::Permissive, other, &probes),
            InboundVerdict::AcceptPlaintext
        );
    }

    #[test]
    fn workload_names_follow_istio() {
        let labels = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(l, _)| *l == k).map(|(_, v)| (*v).to_owned())
        };
        let rs = [Owner { kind: "ReplicaSet", name: "web-7d9f8c6b5", controller: true }];
        let hash = labels(&[("pod-template-hash", "7d9f8c6b5")]);
        assert_eq!(derive_workload("web-7d9f8c6b5-x2x4z", true, &rs, &hash), "web");
        // Without the hash label the ReplicaSet is the workload.
        assert_eq!(
            derive_workload("web-7d9f8c6b5-x2x4z", true, &rs, &labels(&[])),
            "web-7d9f8c6b5"
        );
        let sts = [Owner { kind: "StatefulSet", name: "db", controller: true }];
        assert_eq!(derive_workload("db-0", true, &sts, &labels(&[])), "db");
        let ds = [Owner { kind: "DaemonSet", name: "agent", controller: true }];
        assert_eq!(derive_workload("agent-abcde", true, &ds, &labels(&[])), "agent");
        let cron = [Owner { kind: "Job", name: "backup-28391040", controller: true }];
        assert_eq!(derive_workload("backup-28391040-q8k2j", true, &cron, &labels(&[])), "backup");
        let job = [Owner { kind: "Job", name: "migrate-42", controller: true }];
        assert_eq!(derive_workload("migrate-42-abcde", true, &job, &labels(&[])), "migrate-42");
        // A name not generated, or no controller: the pod itself.
        assert_eq!(derive_workload("static", false, &sts, &labels(&[])), "static");
        // A bare pod: the canonical-name labels, in Istio's order.
        let app = labels(&[("app", "shop"), ("app.kubernetes.io/name", "storefront")]);
        assert_eq!(derive_workload("static", false, &[], &app), "storefront");
        let not_ctl = [Owner { kind: "StatefulSet", name: "db", controller: false }];
        assert_eq!(derive_workload("db-0", true, &not_ctl, &labels(&[])), "db-0");
        // The override label wins.
        let over = labels(&[(WORKLOAD_NAME_LABEL, "frontend"), ("pod-template-hash", "7d9f8c6b5")]);
        assert_eq!(derive_workload("web-7d9f8c6b5-x2x4z", true, &rs, &over), "frontend");
    }

    #[test]
    fn the_workload_field_defaults_to_the_pod_name() {
        let (inv, _) = parse(GOOD).unwrap();
        assert_eq!(inv.pods["shop/web"].workload_name(), "web");
        let (inv, _) = parse(&GOOD.replace(
            "netns = \"/run/netns/web\"",
            "netns = \"/run/netns/web\"\n        workload = \"frontend\"",
        ))
        .unwrap();
        assert_eq!(inv.pods["shop/web"].workload.as_deref(), Some("frontend"));
        assert_eq!(inv.pods["shop/web"].workload_name(), "frontend");
    }
}
