//! Policy objects watched live: tlsmesh's `L4Policy` (`tlsmesh.io/v1alpha1`),
//! Istio's `AuthorizationPolicy` and `PeerAuthentication`
//! (`security.istio.io/v1`, else `v1beta1`), and pod labels (metadata only,
//! for `selector.matchLabels`), compiled by
//! [`tlsmesh_policy::objects::compile`] and published as a
//! [`MeshPolicy`] on a `tokio::sync::watch` channel ([`run`]).
//!
//! The CRDs may not be installed (Istio's rarely are): a kind the API
//! server does not serve (404) is tried at its older version, then reported
//! in [`MeshPolicy::problems`] and counted as empty, and asked for again
//! every [`PolicyOptions::recheck`] — installing the CRD later is picked up.
//! Other errors are retried with kube-rs's backoff, keeping the last state.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    time::Duration,
};

use futures::{stream, stream::BoxStream, FutureExt as _, Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    api::{ApiResource, DynamicObject},
    core::PartialObjectMeta,
    runtime::{metadata_watcher, watcher, WatchStreamExt as _},
    Api, Client, ResourceExt as _,
};
use serde_json::Value;
use tlsmesh_policy::{
    mesh::{MeshPolicy, Problem},
    objects::{self, Objects, PodLabels},
};
use tokio::sync::watch as channel;
use tracing::{debug, info, warn};

use crate::{state::Event, watch::InitBuffer};

/// The kinds watched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PolicyKind {
    /// `l4policies.tlsmesh.io`.
    L4Policy,
    /// `authorizationpolicies.security.istio.io`.
    AuthorizationPolicy,
    /// `peerauthentications.security.istio.io`.
    PeerAuthentication,
    /// Pod labels.
    Pod,
}

impl PolicyKind {
    /// The CRD kinds.
    pub const CRDS: [PolicyKind; 3] =
        [PolicyKind::L4Policy, PolicyKind::AuthorizationPolicy, PolicyKind::PeerAuthentication];

    /// `(group, versions in order of preference, kind, plural)`.
    pub fn resource(self) -> (&'static str, &'static [&'static str], &'static str, &'static str) {
        match self {
            PolicyKind::L4Policy => {
                (objects::GROUP, &["v1alpha1"], objects::L4_POLICY, "l4policies")
            }
            PolicyKind::AuthorizationPolicy => (
                objects::ISTIO_GROUP,
                &["v1", "v1beta1"],
                objects::AUTHORIZATION_POLICY,
                "authorizationpolicies",
            ),
            PolicyKind::PeerAuthentication => (
                objects::ISTIO_GROUP,
                &["v1", "v1beta1"],
                objects::PEER_AUTHENTICATION,
                "peerauthentications",
            ),
            PolicyKind::Pod => ("", &["v1"], "Pod", "pods"),
        }
    }

    fn api_resource(self, version: &str) -> ApiResource {
        let (group, _, kind, plural) = self.resource();
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: format!("{group}/{version}"),
            kind: kind.into(),
            plural: plural.into(),
        }
    }
}

/// What [`run`] is told.
#[derive(Debug, Clone)]
pub struct PolicyOptions {
    /// Istio's root namespace: its policies without a selector apply to
    /// every namespace (Istio's default: `istio-system`).
    pub root_namespace: String,
    /// How often a kind that is not served is asked for again.
    pub recheck: Duration,
}

impl Default for PolicyOptions {
    #[expect(clippy::duration_suboptimal_units, reason = "MSRV 1.85 lacks Duration::from_mins")]
    fn default() -> Self {
        Self {
            root_namespace: objects::DEFAULT_ROOT_NAMESPACE.into(),
            recheck: Duration::from_secs(60),
        }
    }
}

/// One watcher's news.
#[derive(Debug)]
pub enum PolicyUpdate {
    /// Objects of a CRD kind.
    Objects(Event<DynamicObject>),
    /// Pod metadata.
    Pods(Event<PartialObjectMeta<Pod>>),
    /// The kind is not served by the API server (the message says which
    /// versions were asked for).
    Unserved(String),
}

/// The sans-IO state: the objects and pod labels seen, compiled on demand.
#[derive(Debug, Default)]
pub struct PolicyState {
    objects: BTreeMap<PolicyKind, BTreeMap<String, Value>>,
    pods: PodLabels,
    synced: BTreeSet<PolicyKind>,
    unserved: BTreeMap<PolicyKind, String>,
}

fn key(ns: Option<String>, name: &str) -> String {
    format!("{}/{name}", ns.unwrap_or_default())
}

impl PolicyState {
    /// Applies one update; returns whether anything changed.
    pub fn apply(&mut self, kind: PolicyKind, update: PolicyUpdate) -> bool {
        match update {
            PolicyUpdate::Unserved(message) => {
                self.synced.insert(kind);
                let was = self.objects.remove(&kind).is_some_and(|o| !o.is_empty());
                self.unserved.insert(kind, message.clone()) != Some(message) || was
            }
            PolicyUpdate::Objects(ev) => {
                self.unserved.remove(&kind);
                let map = self.objects.entry(kind).or_default();
                let value = |o: &DynamicObject| serde_json::to_value(o).unwrap_or_default();
                match ev {
                    Event::Applied(o) => {
                        let v = value(&o);
                        map.insert(key(o.namespace(), &o.name_any()), v.clone()) != Some(v)
                    }
                    Event::Deleted(o) => map.remove(&key(o.namespace(), &o.name_any())).is_some(),
                    Event::Restarted(list) => {
                        self.synced.insert(kind);
                        *map = list
                            .iter()
                            .map(|o| (key(o.namespace(), &o.name_any()), value(o)))
                            .collect();
                        true
                    }
                }
            }
            PolicyUpdate::Pods(ev) => {
                let labels = |o: &PartialObjectMeta<Pod>| o.labels().clone().into_iter().collect();
                match ev {
                    Event::Applied(o) => {
                        let l: BTreeMap<String, String> = labels(&o);
                        self.pods.insert(key(o.namespace(), &o.name_any()), l.clone()) != Some(l)
                    }
                    Event::Deleted(o) => {
                        self.pods.remove(&key(o.namespace(), &o.name_any())).is_some()
                    }
                    Event::Restarted(list) => {
                        self.synced.insert(kind);
                        self.pods = list
                            .iter()
                            .map(|o| (key(o.namespace(), &o.name_any()), labels(o)))
                            .collect();
                        true
                    }
                }
            }
        }
    }

    /// Whether every kind has been listed (or found not served).
    pub fn is_synced(&self) -> bool {
        self.synced.len() == PolicyKind::CRDS.len() + 1
    }

    /// The policy the objects say, with the kinds not served among the
    /// problems.
    pub fn compile(&self, opts: &PolicyOptions) -> MeshPolicy {
        let list =
            |k| self.objects.get(&k).map(|m| m.values().cloned().collect()).unwrap_or_default();
        let o = Objects {
            l4_policies: list(PolicyKind::L4Policy),
            authorization_policies: list(PolicyKind::AuthorizationPolicy),
            peer_authentications: list(PolicyKind::PeerAuthentication),
        };
        let mut p = objects::compile(&o, &self.pods, &opts.root_namespace);
        p.problems.extend(self.unserved.iter().map(|(kind, message)| Problem {
            subject: format!("watch of {kind:?}"),
            message: message.clone(),
        }));
        p
    }
}

type Item = (PolicyKind, Result<Option<PolicyUpdate>, watcher::Error>);

fn not_found(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s))
            if s.code == 404
    ) || matches!(e, watcher::Error::WatchError(s) if s.code == 404)
}

fn version_stream(client: &Client, kind: PolicyKind, version: &str) -> BoxStream<'static, Item> {
    let api = Api::<DynamicObject>::all_with(client.clone(), &kind.api_resource(version));
    let mut buf = InitBuffer::default();
    watcher(api, watcher::Config::default())
        .default_backoff()
        .map(move |r| (kind, r.map(|ev| buf.push(ev).map(PolicyUpdate::Objects))))
        .boxed()
}

enum CrdState {
    Watching(usize, BoxStream<'static, Item>),
    Wait(Duration),
}

/// One CRD kind: its preferred version until the API server says 404, then
/// the next, then [`PolicyUpdate::Unserved`] and a new try after `recheck`.
fn crd_stream(
    client: Client,
    kind: PolicyKind,
    recheck: Duration,
) -> impl Stream<Item = Item> + Send {
    let (group, versions, _, plural) = kind.resource();
    let first = CrdState::Watching(0, version_stream(&client, kind, versions[0]));
    stream::unfold((client, first), move |(client, st)| async move {
        match st {
            CrdState::Watching(i, mut s) => {
                let item = s.next().await?;
                if !item.1.as_ref().is_err_and(not_found) {
                    return Some((item, (client, CrdState::Watching(i, s))));
                }
                if let Some(next) = versions.get(i + 1) {
                    debug!(?kind, "{plural}.{group}/{} not served; trying {next}", versions[i]);
                    let s = version_stream(&client, kind, next);
                    return Some(((kind, Ok(None)), (client, CrdState::Watching(i + 1, s))));
                }
                let message = format!(
                    "{plural}.{group} ({}) is not served by the API server (CRD not installed?): no such policy applies; asked again every {}s",
                    versions.join(", "),
                    recheck.as_secs()
                );
                info!(?kind, "{message}");
                Some((
                    (kind, Ok(Some(PolicyUpdate::Unserved(message)))),
                    (client, CrdState::Wait(recheck)),
                ))
            }
            CrdState::Wait(d) => {
                tokio::time::sleep(d).await;
                let s = version_stream(&client, kind, versions[0]);
                Some(((kind, Ok(None)), (client, CrdState::Watching(0, s))))
            }
        }
    })
}

fn pod_stream(client: Client) -> impl Stream<Item = Item> + Send {
    let mut buf = InitBuffer::default();
    metadata_watcher(Api::<Pod>::all(client), watcher::Config::default())
        .default_backoff()
        .map(move |r| (PolicyKind::Pod, r.map(|ev| buf.push(ev).map(PolicyUpdate::Pods))))
}

fn hint(e: &watcher::Error) -> &'static str {
    let forbidden = matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(s))
            | watcher::Error::WatchStartFailed(kube::Error::Api(s))
            | watcher::Error::WatchFailed(kube::Error::Api(s))
            if s.code == 403
    ) || matches!(e, watcher::Error::WatchError(s) if s.code == 403);
    if forbidden {
        "forbidden: the tlsmesh ServiceAccount needs get/list/watch on pods, l4policies.tlsmesh.io, authorizationpolicies and peerauthentications.security.istio.io (deploy/rbac.yaml)"
    } else {
        "is the API server reachable from this node?"
    }
}

/// Watches the policy objects and publishes the compiled [`MeshPolicy`] on
/// `tx` each time it changes, from the moment every kind has been listed
/// once or found not served (that first publication is always sent, so
/// `changed()` on the receiver means "synced"; before it `tx` keeps its
/// initial value; a
/// forbidden kind holds the first publication back and is logged with
/// what to grant). Runs until every receiver of `tx` is gone; API errors
/// never end it.
///
/// The daemon combines the result with its TOML rules
/// ([`MeshPolicy::with_rules`]) and decides with [`MeshPolicy::decide`];
/// [`MeshPolicy::mode_override`] is the `PeerAuthentication` mode of a
/// namespace (docs/KUBERNETES.md, "Policy objects").
pub async fn run(client: Client, opts: PolicyOptions, tx: channel::Sender<MeshPolicy>) {
    let mut streams: Vec<BoxStream<'static, Item>> = PolicyKind::CRDS
        .into_iter()
        .map(|k| crd_stream(client.clone(), k, opts.recheck).boxed())
        .collect();
    streams.push(pod_stream(client).boxed());
    let mut events = stream::select_all(streams);
    let mut state = PolicyState::default();
    let mut published = false;
    info!(root_namespace = %opts.root_namespace, "watching policy objects");
    loop {
        let mut changed = false;
        tokio::select! {
            item = events.next() => {
                let Some(item) = item else { return };
                changed |= handle(&mut state, item);
                for _ in 0..256 {
                    match events.next().now_or_never() {
                        Some(Some(item)) => changed |= handle(&mut state, item),
                        _ => break,
                    }
                }
            }
            () = tx.closed() => return,
        }
        if !changed || !state.is_synced() {
            continue;
        }
        let policy = state.compile(&opts);
        let first = !published;
        published = true;
        tx.send_if_modified(|cur| {
            // The first one is sent even if it equals the initial value: it
            // says "synced".
            if *cur == policy && !first {
                return false;
            }
            for p in policy.problems.iter().filter(|p| !cur.problems.contains(p)) {
                warn!(subject = %p.subject, problem = %p.message, "policy object not used as written");
            }
            *cur = policy;
            debug!("policy updated from the Kubernetes API");
            true
        });
    }
}

fn handle(state: &mut PolicyState, (kind, item): Item) -> bool {
    match item {
        Ok(Some(u)) => state.apply(kind, u),
        Ok(None) => false,
        Err(e) => {
            warn!(?kind, error = %e, hint = hint(&e), "policy watch failed; retrying with backoff (the last state is kept)");
            false
        }
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (group, _, _, plural) = self.resource();
        if group.is_empty() {
            f.write_str(plural)
        } else {
            write!(f, "{plural}.{group}")
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn dynamic(v: Value) -> DynamicObject {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn state_compiles_once_synced_and_follows_events() {
        let mut s = PolicyState::default();
        let opts = PolicyOptions::default();
        let deny =
            dynamic(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"namespace": "shop", "name": "deny-all"}, "spec": {}}));
        assert!(s.apply(
            PolicyKind::AuthorizationPolicy,
            PolicyUpdate::Objects(Event::Restarted(vec![deny.clone()]))
        ));
        assert!(!s.is_synced());
        s.apply(PolicyKind::L4Policy, PolicyUpdate::Objects(Event::Restarted(vec![])));
        s.apply(PolicyKind::Pod, PolicyUpdate::Pods(Event::Restarted(vec![])));
        assert!(
            s.apply(PolicyKind::PeerAuthentication, PolicyUpdate::Unserved("not served".into()))
        );
        assert!(
            !s.apply(PolicyKind::PeerAuthentication, PolicyUpdate::Unserved("not served".into()))
        );
        assert!(s.is_synced());
        let p = s.compile(&opts);
        assert_eq!(p.authorizations.len(), 1);
        assert_eq!(
            p.problems,
            [Problem {
                subject: "watch of PeerAuthentication".into(),
                message: "not served".into()
            }]
        );
        assert!(!s.apply(
            PolicyKind::AuthorizationPolicy,
            PolicyUpdate::Objects(Event::Applied(deny.clone()))
        ));
        assert!(
            s.apply(PolicyKind::AuthorizationPolicy, PolicyUpdate::Objects(Event::Deleted(deny)))
        );
        assert!(s.compile(&opts).authorizations.is_empty());
        assert_eq!(
            PolicyKind::AuthorizationPolicy.to_string(),
            "authorizationpolicies.security.istio.io"
        );
    }
}
