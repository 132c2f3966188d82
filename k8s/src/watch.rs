//! The IO edge around [`ClusterState`]: one kube-rs watcher per kind, their
//! initial pages gathered into `Restarted` events ([`InitBuffer`]), the
//! events applied, and the inventory published on a `tokio::sync::watch`
//! channel whenever it changes — but only once every kind has been listed.
//!
//! kube-rs's watcher re-lists by itself after a disconnect or a `410 Gone`
//! (with backoff); the re-list arrives here as `Init`, `InitApply`…,
//! `InitDone` and is applied as one `Restarted`, which replaces that kind's
//! state atomically.

use std::{fmt, sync::Arc};

use futures::{stream, FutureExt as _, Stream, StreamExt as _};
use k8s_openapi::api::{
    core::v1::{Namespace, Node, Pod, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    runtime::{watcher, WatchStreamExt as _},
    Api, Client,
};
use serde::de::DeserializeOwned;
use tlsmesh_inventory::{Inventory, Problem};
use tokio::sync::{watch as channel, Notify};
use tracing::{debug, info, warn};

use crate::state::{ClusterState, Event, Kind, NetnsResolver, NoNetns, Update};

/// Most events applied before the inventory is rebuilt and published.
const COALESCE: usize = 256;

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
}

impl Options {
    /// Options for `node` with no netns resolver.
    pub fn new(node: Option<String>, trust_domain: impl Into<String>) -> Self {
        Self {
            node,
            trust_domain: trust_domain.into(),
            resolver: Arc::new(NoNetns),
            refresh: Arc::new(Notify::new()),
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

fn kind_stream<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    wrap: fn(Event<K>) -> Update,
) -> impl Stream<Item = Item> + Send + 'static
where
    K: kube::Resource + Clone + DeserializeOwned + fmt::Debug + Send + Sync + 'static,
{
    let mut buf = InitBuffer::default();
    watcher(api, config).default_backoff().map(move |r| (kind, r.map(|ev| buf.push(ev).map(wrap))))
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
            Update::Namespace,
        )
        .boxed(),
        kind_stream(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default(),
            Kind::Pod,
            Update::Pod,
        )
        .boxed(),
        kind_stream(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            Kind::Service,
            Update::Service,
        )
        .boxed(),
        kind_stream(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default(),
            Kind::EndpointSlice,
            Update::EndpointSlice,
        )
        .boxed(),
    ];
    if let Some(node) = &opts.node {
        let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
        streams.push(
            kind_stream(Api::<Node>::all(client.clone()), config, Kind::Node, Update::Node).boxed(),
        );
    }
    let mut events = stream::select_all(streams);
    let mut state = ClusterState::new(opts.node.clone(), opts.trust_domain.clone());
    let mut last_problems: Vec<Problem> = Vec::new();
    info!(node = ?opts.node, trust_domain = %opts.trust_domain, "watching the Kubernetes API");
    loop {
        let mut changed = false;
        tokio::select! {
            item = events.next() => {
                let Some(item) = item else { return };
                changed |= handle(&mut state, item);
                // Take what is already waiting before rebuilding.
                for _ in 0..COALESCE {
                    match events.next().now_or_never() {
                        Some(Some(item)) => changed |= handle(&mut state, item),
                        _ => break,
                    }
                }
            }
            () = opts.refresh.notified() => changed = true,
            () = tx.closed() => return,
        }
        if !changed || !state.is_synced() {
            continue;
        }
        let (inv, problems) = state.inventory(opts.resolver.as_ref());
        if problems != last_problems {
            for p in &problems {
                warn!(subject = %p.subject, problem = %p.message, "Kubernetes object not used as is");
            }
            last_problems = problems;
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
}

fn handle(state: &mut ClusterState, (kind, item): Item) -> bool {
    match item {
        Ok(Some(update)) => {
            let restarted = matches!(
                &update,
                Update::Namespace(Event::Restarted(_))
                    | Update::Pod(Event::Restarted(_))
                    | Update::Node(Event::Restarted(_))
                    | Update::Service(Event::Restarted(_))
                    | Update::EndpointSlice(Event::Restarted(_))
            );
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
        Some(403) => "forbidden: the tlsmesh ServiceAccount needs get/list/watch on namespaces, pods, nodes, services and endpointslices (deploy/rbac.yaml)",
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
}
