//! The IO edge around [`ClusterState`]: one kube-rs watcher per kind, their
//! initial pages gathered into `Restarted` events ([`InitBuffer`]), the
//! events applied, and the inventory published on a `tokio::sync::watch`
//! channel whenever it changes — but only once every kind has been listed.
//!
//! kube-rs's watcher re-lists by itself after a disconnect or a `410 Gone`
//! (with backoff); the re-list arrives here as `Init`, `InitApply`…,
//! `InitDone` and is applied as one `Restarted`, which replaces that kind's
//! state atomically.
//!
//! Service endpoints are read from what the API server serves
//! ([`EndpointsSource`]): `discovery.k8s.io/v1` `EndpointSlices` first;
//! when that is not served (404: Kubernetes 1.20 has only `v1beta1`) the
//! watcher asks discovery and switches to `v1beta1` slices, else to `v1`
//! `Endpoints`, else reports the kind as a problem and publishes without
//! Service endpoints instead of waiting forever ([`Update::Unserved`]).

use std::{collections::BTreeMap, fmt, sync::Arc, time::Duration};

use futures::{stream, stream::BoxStream, FutureExt as _, Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Endpoints, Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    api::{ApiResource, DynamicObject},
    runtime::{watcher, WatchStreamExt as _},
    Api, Client,
};
use serde::de::DeserializeOwned;
use tlsmesh_inventory::{Inventory, Problem};
use tlsmesh_policy::mesh::MeshPolicy;
use tokio::sync::{watch as channel, Notify};
use tracing::{debug, info, warn};

use crate::state::{ClusterState, Event, Kind, ModeOverrides, NetnsResolver, NoNetns, Update};

/// Most events applied before the inventory is rebuilt and published.
const COALESCE: usize = 256;

/// Least time between two inventory rebuilds (istiod's debounce is 100 ms
/// too): a pod's enrollment waits at most this long for it.
const REBUILD_EVERY: Duration = Duration::from_millis(100);

/// Gathers a watcher's `Init`/`InitApply`/`InitDone` into one `Restarted`.
#[derive(Debug)]
pub struct InitBuffer<K> {
    pending: Option<Vec<K>>,
}

impl<K> Default for InitBuffer<K> {
    fn default() -> Self {
        Self { pending: None }
    }
}

impl<K> InitBuffer<K> {
    /// Takes one watcher event; returns the event to apply, if any.
    pub fn push(&mut self, ev: watcher::Event<K>) -> Option<Event<K>> {
        match ev {
            watcher::Event::Init => {
                self.pending = Some(Vec::new());
                None
            }
            watcher::Event::InitApply(o) => {
                self.pending.get_or_insert_with(Vec::new).push(o);
                None
            }
            watcher::Event::InitDone => {
                Some(Event::Restarted(self.pending.take().unwrap_or_default()))
            }
            watcher::Event::Apply(o) => Some(Event::Applied(o)),
            watcher::Event::Delete(o) => Some(Event::Deleted(o)),
        }
    }
}

/// What [`run`] is told.
#[derive(Clone)]
pub struct Options {
    /// This daemon's node (`None`: the CA, which enrolls nothing).
    pub node: Option<String>,
    /// SPIFFE trust domain.
    pub trust_domain: String,
    /// Where the netns (and early addresses) of this node's pods come from.
    pub resolver: Arc<dyn NetnsResolver>,
    /// Signalled when the resolver learned something; the inventory is
    /// rebuilt then (e.g. [`CniPods::changed`](crate::cni_server::CniPods::changed)).
    pub refresh: Arc<Notify>,
    /// Where the problems found are published each time they change (they
    /// are logged in any case); `None`: only logged.
    pub problems: Option<channel::Sender<Vec<Problem>>>,
    /// The policy objects ([`crate::policy::run`]'s receiver): their
    /// `PeerAuthentication` modes override enrolled namespaces' labels
    /// ([`ModeOverrides`]); `None`: labels only.
    pub policy: Option<channel::Receiver<MeshPolicy>>,
    /// How often the published inventory is checked for enrolled pods of
    /// this node with an address but no netns that exists (not found yet,
    /// or the process it was found through is gone); while there are any,
    /// it is rebuilt at this pace, so a resolver that looks (e.g.
    /// [`ProcNetns`](crate::proc_netns::ProcNetns)) finds them without an
    /// event from the API.
    pub unresolved_retry: Duration,
}

impl Options {
    /// Options for `node` with no netns resolver.
    pub fn new(node: Option<String>, trust_domain: impl Into<String>) -> Self {
        Self {
            node,
            trust_domain: trust_domain.into(),
            resolver: Arc::new(NoNetns),
            refresh: Arc::new(Notify::new()),
            problems: None,
            policy: None,
            unresolved_retry: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("node", &self.node)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

type Item = (Kind, Result<Option<Update>, watcher::Error>);

/// Where Service endpoints are read from, in order of preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndpointsSource {
    /// `discovery.k8s.io/v1` `EndpointSlices` (Kubernetes 1.21+).
    SlicesV1,
    /// `discovery.k8s.io/v1beta1` `EndpointSlices` (1.17–1.24), converted to `v1`.
    SlicesV1beta1,
    /// `v1` `Endpoints` (every version).
    EndpointsV1,
}

impl EndpointsSource {
    /// In order of preference.
    pub const ALL: [EndpointsSource; 3] =
        [EndpointsSource::SlicesV1, EndpointsSource::SlicesV1beta1, EndpointsSource::EndpointsV1];

    /// `(apiVersion, resource)`.
    pub fn resource(self) -> (&'static str, &'static str) {
        match self {
            EndpointsSource::SlicesV1 => ("discovery.k8s.io/v1", "endpointslices"),
            EndpointsSource::SlicesV1beta1 => ("discovery.k8s.io/v1beta1", "endpointslices"),
            EndpointsSource::EndpointsV1 => ("v1", "endpoints"),
        }
    }

    /// The preferred source among what is served (`served`: `(apiVersion,
    /// resource)` pairs from discovery); `None` if none is.
    pub fn choose(served: &[(String, String)]) -> Option<EndpointsSource> {
        Self::ALL.into_iter().find(|s| {
            let (v, r) = s.resource();
            served.iter().any(|(sv, sr)| sv == v && sr == r)
        })
    }
}

/// The message for an API server that serves no endpoints source at all.
pub const UNSERVED_ENDPOINTS: &str = "the API server serves neither discovery.k8s.io/v1 nor v1beta1 EndpointSlices nor v1 Endpoints: Service ClusterIPs are not resolved to their pods; discovery is asked again every 5 minutes";

/// How long to wait before asking discovery again after it found nothing.
#[expect(clippy::duration_suboptimal_units, reason = "MSRV 1.85 lacks Duration::from_mins")]
const REDISCOVER: Duration = Duration::from_secs(300);

fn not_found(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s))
            if s.code == 404
    ) || matches!(e, watcher::Error::WatchError(s) if s.code == 404)
}

/// Asks the API server's discovery which endpoints sources it serves.
async fn discover(client: &Client) -> Result<Option<EndpointsSource>, kube::Error> {
    let mut served = Vec::new();
    for source in EndpointsSource::ALL {
        let (version, _) = source.resource();
        let list = if version.contains('/') {
            client.list_api_group_resources(version).await
        } else {
            client.list_core_api_resources(version).await
        };
        match list {
            Ok(list) => {
                served.extend(list.resources.into_iter().map(|r| (version.to_owned(), r.name)));
            }
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e),
        }
    }
    Ok(EndpointsSource::choose(&served))
}

/// A `discovery.k8s.io/v1beta1` slice as a `v1` one: the fields the state
/// reads (addresses, conditions, targetRef, ports, addressType, the
/// service-name label) are the same in both.
fn slice_from_v1beta1(o: DynamicObject) -> Option<EndpointSlice> {
    let name = o.metadata.name.clone();
    let mut v = serde_json::to_value(o).ok()?;
    v["apiVersion"] = "discovery.k8s.io/v1".into();
    v["kind"] = "EndpointSlice".into();
    match serde_json::from_value(v) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(slice = ?name, error = %e, "a discovery.k8s.io/v1beta1 EndpointSlice could not be read; left out");
            None
        }
    }
}

fn v1beta1_event(ev: Event<DynamicObject>) -> Option<Update> {
    let ev = match ev {
        Event::Applied(o) => Event::Applied(slice_from_v1beta1(o)?),
        Event::Deleted(o) => Event::Deleted(slice_from_v1beta1(o)?),
        Event::Restarted(list) => {
            Event::Restarted(list.into_iter().filter_map(slice_from_v1beta1).collect())
        }
    };
    Some(Update::EndpointSlice(ev))
}

fn source_stream(client: &Client, source: EndpointsSource) -> BoxStream<'static, Item> {
    let config = watcher::Config::default();
    match source {
        EndpointsSource::SlicesV1 => kind_stream(
            Api::<EndpointSlice>::all(client.clone()),
            config,
            Kind::EndpointSlice,
            |e| Some(Update::EndpointSlice(e)),
        )
        .boxed(),
        EndpointsSource::SlicesV1beta1 => {
            let ar = ApiResource {
                group: "discovery.k8s.io".into(),
                version: "v1beta1".into(),
                api_version: "discovery.k8s.io/v1beta1".into(),
                kind: "EndpointSlice".into(),
                plural: "endpointslices".into(),
            };
            kind_stream(
                Api::<DynamicObject>::all_with(client.clone(), &ar),
                config,
                Kind::EndpointSlice,
                v1beta1_event,
            )
            .boxed()
        }
        EndpointsSource::EndpointsV1 => {
            kind_stream(Api::<Endpoints>::all(client.clone()), config, Kind::EndpointSlice, |e| {
                Some(Update::Endpoints(e))
            })
            .boxed()
        }
    }
}

enum EndpointsState {
    Watching(EndpointsSource, BoxStream<'static, Item>),
    /// Ask discovery after `delay`; `backoff` is the delay after a failure.
    Discover {
        delay: Duration,
        backoff: Duration,
    },
}

/// Service endpoints from the first source that is served: `v1` slices
/// until the API server says 404, then whatever discovery finds.
fn endpoints_stream(client: Client) -> impl Stream<Item = Item> + Send + 'static {
    let first = EndpointsState::Watching(
        EndpointsSource::SlicesV1,
        source_stream(&client, EndpointsSource::SlicesV1),
    );
    stream::unfold((client, first), |(client, st)| async move {
        match st {
            EndpointsState::Watching(source, mut s) => {
                let item = s.next().await?;
                let next = match &item.1 {
                    Err(e) if not_found(e) => {
                        info!(?source, "Service endpoints: {} {} not served by this API server; asking discovery what is", source.resource().0, source.resource().1);
                        EndpointsState::Discover {
                            delay: Duration::ZERO,
                            backoff: Duration::from_secs(1),
                        }
                    }
                    _ => EndpointsState::Watching(source, s),
                };
                Some((item, (client, next)))
            }
            EndpointsState::Discover { delay, backoff } => {
                tokio::time::sleep(delay).await;
                let (item, next) = match discover(&client).await {
                    Ok(Some(source)) => {
                        let (v, r) = source.resource();
                        info!(?source, "Service endpoints from {r} ({v})");
                        let s = source_stream(&client, source);
                        (Ok(None), EndpointsState::Watching(source, s))
                    }
                    Ok(None) => (
                        Ok(Some(Update::Unserved {
                            kind: Kind::EndpointSlice,
                            message: UNSERVED_ENDPOINTS.into(),
                        })),
                        EndpointsState::Discover {
                            delay: REDISCOVER,
                            backoff: Duration::from_secs(1),
                        },
                    ),
                    Err(e) => (
                        Err(watcher::Error::InitialListFailed(e)),
                        EndpointsState::Discover {
                            delay: backoff,
                            backoff: (backoff * 2).min(Duration::from_secs(30)),
                        },
                    ),
                };
                Some(((Kind::EndpointSlice, item), (client, next)))
            }
        }
    })
}

fn kind_stream<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    wrap: fn(Event<K>) -> Option<Update>,
) -> impl Stream<Item = Item> + Send + 'static
where
    K: kube::Resource + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
{
    let mut buf = InitBuffer::default();
    watcher(api, config)
        .default_backoff()
        .map(move |r| (kind, r.map(|ev| buf.push(ev).and_then(wrap))))
}

/// Watches the cluster and publishes the inventory on `tx` each time it
/// changes, from the moment every kind has been listed once (before that
/// `tx` keeps its initial value: the daemon should wait for the first
/// change). Runs until every receiver of `tx` is gone. API errors are
/// logged and retried with backoff; they never end the loop.
pub async fn run(client: Client, opts: Options, tx: channel::Sender<Inventory>) {
    let mut streams = vec![
        kind_stream(
            Api::<Namespace>::all(client.clone()),
            watcher::Config::default(),
            Kind::Namespace,
            |e| Some(Update::Namespace(e)),
        )
        .boxed(),
        kind_stream(Api::<Pod>::all(client.clone()), watcher::Config::default(), Kind::Pod, |e| {
            Some(Update::Pod(e))
        })
        .boxed(),
        kind_stream(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            Kind::Service,
            |e| Some(Update::Service(e)),
        )
        .boxed(),
        endpoints_stream(client.clone()).boxed(),
    ];
    if let Some(node) = &opts.node {
        let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
        streams.push(
            kind_stream(Api::<Node>::all(client.clone()), config, Kind::Node, |e| {
                Some(Update::Node(e))
            })
            .boxed(),
        );
    }
    let mut events = stream::select_all(streams);
    let mut state = ClusterState::new(opts.node.clone(), opts.trust_domain.clone());
    let mut policy = opts.policy.clone();
    if let Some(rx) = &mut policy {
        state.set_mode_overrides(ModeOverrides::from(&*rx.borrow_and_update()));
    }
    let mut last_problems: Vec<Problem> = Vec::new();
    // Looks for pods whose netns is not known (or no longer exists).
    let mut unresolved = tokio::time::interval(opts.unresolved_retry);
    unresolved.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // The last watch failure of each kind, until that kind delivers again:
    // reported with the problems (a forbidden kind holds back the first
    // inventory, so this may be the only thing the daemon can show).
    let mut failing: BTreeMap<Kind, String> = BTreeMap::new();
    let mut last_failing = failing.clone();
    info!(node = ?opts.node, trust_domain = %opts.trust_domain, "watching the Kubernetes API");
    // Changes not yet rebuilt into an inventory, the last rebuild, and when
    // the next may be (rebuilds are debounced: at most one per
    // `REBUILD_EVERY`, so an event stream of thousands of pods costs a few
    // rebuilds a second, not one per event).
    let mut dirty = false;
    let mut last_build: Option<tokio::time::Instant> = None;
    let mut rebuild_at: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            item = events.next() => {
                let Some(item) = item else { return };
                dirty |= handle(&mut state, &mut failing, item);
                // Take what is already waiting before rebuilding.
                for _ in 0..COALESCE {
                    match events.next().now_or_never() {
                        Some(Some(item)) => dirty |= handle(&mut state, &mut failing, item),
                        _ => break,
                    }
                }
            }
            () = opts.refresh.notified() => dirty = true,
            _ = unresolved.tick() => {
                dirty |= opts.node.as_deref().is_some_and(|n| has_unresolved(&tx.borrow(), n));
            }
            next = next_policy(&mut policy) => match next {
                Some(overrides) => dirty |= state.set_mode_overrides(overrides),
                // The policy watcher ended: keep its last modes.
                None => policy = None,
            },
            () = sleep_until(rebuild_at) => rebuild_at = None,
            () = tx.closed() => return,
        }
        if failing != last_failing {
            last_failing = failing.clone();
            publish_problems(&opts, &last_problems, &failing);
        }
        if !dirty || !state.is_synced() || rebuild_at.is_some() {
            continue;
        }
        if let Some(at) = last_build.map(|t| t + REBUILD_EVERY) {
            if tokio::time::Instant::now() < at {
                rebuild_at = Some(at);
                continue;
            }
        }
        dirty = false;
        last_build = Some(tokio::time::Instant::now());
        rebuild(&state, &opts, &tx, &mut last_problems, &failing);
    }
}

/// Builds the inventory, reports changed problems, publishes it if it
/// differs from the last one.
fn rebuild(
    state: &ClusterState,
    opts: &Options,
    tx: &channel::Sender<Inventory>,
    last_problems: &mut Vec<Problem>,
    failing: &BTreeMap<Kind, String>,
) {
    let (inv, problems) = state.inventory(opts.resolver.as_ref());
    if problems != *last_problems {
        for p in &problems {
            warn!(subject = %p.subject, problem = %p.message, "Kubernetes object not used as is");
        }
        publish_problems(opts, &problems, failing);
        *last_problems = problems;
    }
    let published = tx.send_if_modified(|cur| {
        if *cur == inv {
            false
        } else {
            *cur = inv;
            true
        }
    });
    if published {
        debug!("inventory updated from the Kubernetes API");
    }
}

/// Completes at `at`; never without one.
async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The mode overrides of the next policy publication (`None`: the policy
/// watcher ended); pending forever without a policy receiver.
async fn next_policy(policy: &mut Option<channel::Receiver<MeshPolicy>>) -> Option<ModeOverrides> {
    let Some(rx) = policy.as_mut() else { return std::future::pending().await };
    rx.changed().await.ok()?;
    Some(ModeOverrides::from(&*rx.borrow_and_update()))
}

/// Whether an enrolled pod of `node` has an address but no netns that
/// exists (not found yet, or the process it was found through is gone).
fn has_unresolved(inv: &Inventory, node: &str) -> bool {
    inv.pods.values().any(|p| {
        p.node == node
            && p.mode.is_some()
            && !p.ips.is_empty()
            && p.netns.as_deref().is_none_or(|n| !n.exists())
    })
}

/// Sends the object problems and the failing watches to `opts.problems`.
fn publish_problems(opts: &Options, problems: &[Problem], failing: &BTreeMap<Kind, String>) {
    let Some(out) = &opts.problems else { return };
    let mut all = problems.to_vec();
    all.extend(failing.iter().map(|(kind, why)| Problem {
        subject: format!("watch of {kind:?}"),
        message: why.clone(),
    }));
    let _ = out.send(all);
}

fn handle(
    state: &mut ClusterState,
    failing: &mut BTreeMap<Kind, String>,
    (kind, item): Item,
) -> bool {
    if item.is_ok() {
        failing.remove(&kind);
    }
    match item {
        Ok(Some(update)) => {
            let (_, restarted) = update.kind();
            let was_synced = state.is_synced();
            let changed = state.apply(update);
            if restarted {
                debug!(?kind, "listed");
                if state.is_synced() && !was_synced {
                    info!("Kubernetes state synced: every kind listed");
                }
            }
            changed
        }
        Ok(None) => false,
        Err(e) => {
            warn!(?kind, error = %e, hint = hint(&e), "watch failed; retrying with backoff (the state is kept and re-listed)");
            failing.insert(kind, format!("{e}; {}", hint(&e)));
            false
        }
    }
}

fn hint(e: &watcher::Error) -> &'static str {
    let code = match e {
        watcher::Error::WatchError(s)
        | watcher::Error::InitialListFailed(kube::Error::Api(s))
        | watcher::Error::WatchStartFailed(kube::Error::Api(s))
        | watcher::Error::WatchFailed(kube::Error::Api(s)) => Some(s.code),
        _ => None,
    };
    match code {
        Some(403) => "forbidden: the tlsmesh ServiceAccount needs get/list/watch on namespaces, pods, nodes, services and endpointslices (or endpoints, on a cluster without EndpointSlices) (deploy/rbac.yaml)",
        Some(404) => "not served by this API server (for Service endpoints the watcher asks discovery for another version)",
        Some(410) => "410 Gone: the resource version expired; re-listing",
        _ => "is the API server reachable from this node?",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_pages_become_one_restarted() {
        let mut b = InitBuffer::default();
        assert_eq!(b.push(watcher::Event::Init), None);
        assert_eq!(b.push(watcher::Event::InitApply(1)), None);
        assert_eq!(b.push(watcher::Event::InitApply(2)), None);
        assert_eq!(b.push(watcher::Event::InitDone), Some(Event::Restarted(vec![1, 2])));
        assert_eq!(b.push(watcher::Event::Apply(3)), Some(Event::Applied(3)));
        assert_eq!(b.push(watcher::Event::Delete(3)), Some(Event::Deleted(3)));
        // A re-list that finds nothing still replaces (empties) the state.
        assert_eq!(b.push(watcher::Event::Init), None);
        assert_eq!(b.push(watcher::Event::InitDone), Some(Event::Restarted(vec![])));
    }

    #[test]
    fn endpoints_source_is_the_first_served() {
        let served = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
        };
        let v1_21 = served(&[
            ("discovery.k8s.io/v1", "endpointslices"),
            ("discovery.k8s.io/v1beta1", "endpointslices"),
            ("v1", "endpoints"),
        ]);
        assert_eq!(EndpointsSource::choose(&v1_21), Some(EndpointsSource::SlicesV1));
        let v1_20 = served(&[("discovery.k8s.io/v1beta1", "endpointslices"), ("v1", "endpoints")]);
        assert_eq!(EndpointsSource::choose(&v1_20), Some(EndpointsSource::SlicesV1beta1));
        let no_slices = served(&[("v1", "pods"), ("v1", "endpoints")]);
        assert_eq!(EndpointsSource::choose(&no_slices), Some(EndpointsSource::EndpointsV1));
        assert_eq!(EndpointsSource::choose(&served(&[("v1", "pods")])), None);
    }

    #[test]
    fn v1beta1_slices_read_as_v1() {
        let o: DynamicObject = serde_json::from_value(serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
            "metadata": {"name": "db-x", "namespace": "shop", "labels": {"kubernetes.io/service-name": "db"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.244.2.2"], "conditions": {"ready": true},
                "topology": {"kubernetes.io/hostname": "node-b"},
                "targetRef": {"kind": "Pod", "namespace": "shop", "name": "db"}}],
            "ports": [{"name": "http", "port": 5432, "protocol": "TCP"}],
        }))
        .unwrap();
        let s = slice_from_v1beta1(o).expect("converts");
        assert_eq!(s.endpoints[0].addresses, ["10.244.2.2"]);
        assert_eq!(s.endpoints[0].conditions.as_ref().unwrap().ready, Some(true));
        assert_eq!(s.ports.unwrap()[0].port, Some(5432));
        let Some(Update::EndpointSlice(Event::Restarted(list))) =
            v1beta1_event(Event::Restarted(vec![]))
        else {
            panic!("a re-list stays a re-list")
        };
        assert!(list.is_empty());
    }
}
