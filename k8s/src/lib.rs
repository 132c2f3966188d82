//! tlsmesh-k8s: the daemon's and the CA's view of a Kubernetes cluster.
//!
//! * [`state`]: the pure reducer from watch events to the
//!   [`Inventory`](tlsmesh_inventory::Inventory) (namespace and pod labels,
//!   identities, Services and their endpoints).
//! * [`watch`]: kube-rs watchers feeding the reducer; [`watch::run`]
//!   publishes the inventory on a `tokio::sync::watch` channel.
//! * [`policy`]: `L4Policy` and Istio's `AuthorizationPolicy` /
//!   `PeerAuthentication` watched live; [`policy::run`] publishes the
//!   compiled [`MeshPolicy`](tlsmesh_policy::mesh::MeshPolicy).
//! * [`cni_server`]: the daemon's end of the CNI plugin's Unix socket.
//! * [`proc_netns`]: netns discovery through `/proc` for pods that were
//!   running before tlsmesh was installed.
//! * [`tokenreview`]: the CA authenticates node daemons with `TokenReview`
//!   and allows workload certificates only for pods on the caller's node.
//!
//! docs/KUBERNETES.md describes the behaviour and the reasons for it.

#![forbid(unsafe_code)]
pub mod cni_server;
pub mod policy;
pub mod proc_netns;
pub mod state;
pub mod tokenreview;
pub mod watch;

pub use state::{
    ClusterState, Event, Kind, ModeOverrides, NetnsResolver, NoNetns, PodRef, Update, MODE_LABEL,
};
pub use watch::{run, Options};
