//! tlsmesh: a transparent node-level mTLS tunnel for Kubernetes pods.
//!
//! This crate is the node daemon and the `tlsmesh` CLI. Modules by concern:
//! `capture` (eBPF load/attach/pin, maps), `netns` (namespaces and sockets in
//! them), `inventory` (who runs where; pure decisions), `config` (the one
//! typed config), `proxy` (outbound and inbound connection handling), `node`
//! (the daemon's wiring), `certs` (workload identities), `mesh` (the tunnel:
//! outbound streams, per-pod tunnel servers), `deliver` (transparent delivery
//! into pods), `policy` (L4 authorization), `admin` (localhost API), `stats`,
//! `logging`, `cli`, `status`.

pub mod admin;
pub mod ca_cmd;
pub mod capture;
pub mod certs;
pub mod cli;
pub mod config;
pub mod deliver;
pub use tlsmesh_inventory as inventory;
pub mod kube_source;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod node;
pub mod policy;
pub mod proxy;
pub mod stats;
pub mod status;
