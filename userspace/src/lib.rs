//! tlsmesh: a transparent node-level mTLS tunnel for Kubernetes pods.
//!
//! This crate is the node daemon and the `tlsmesh` CLI. Modules by concern,
//! arrows one way (docs/ARCHITECTURE.md has the map):
//!
//! - wiring: `app` (start-up, main loop, drain; nothing imports it);
//! - state and ownership: `state` (inventory index, served pods, problems,
//!   denies, readiness), `scope` (task ownership, drain signal), `conns` (the
//!   connection table), `pods` (reconcile: pure plan + ordered executor);
//! - data path: `proxy` (captured outbound, inbound plaintext), `mesh`
//!   (tunnel client, per-pod tunnel servers, registry), `resumable`
//!   (tunnel streams that move at an upgrade), `handover` (connections to
//!   the next daemon), `accept` (accept-loop backoff);
//! - kernel edges: `kernel` (the traits), `capture` (eBPF), `ebpf_log`
//!   (the programs' decision log), `netns`, `deliver` (transparent delivery
//!   into pods);
//! - identity and policy: `certs`, `policy` (the rules and objects),
//!   `authz` (pure decisions), `policies` (the policy in force, re-checks);
//! - operations: `admin`, `metrics`, `stats`, `logging`, `kube_source`;
//! - CLI: `cli`, `status`, `check`, `ca_cmd`; `config` (the one typed config);
//! - `testing`: loopback fakes of the kernel edges, for tests; `faults`:
//!   named fault points the failure tests arm (feature `failpoints`).

#![deny(unsafe_op_in_unsafe_fn)]

pub mod accept;
pub mod admin;
pub mod app;
pub mod authz;
pub mod ca_cmd;
pub mod capture;
pub mod certs;
pub mod check;
pub mod cli;
pub mod config;
pub mod conns;
pub mod deliver;
pub mod ebpf_log;
pub mod faults;
pub mod handover;
pub use tlsmesh_inventory as inventory;
pub mod kernel;
pub mod kube_source;
pub mod logging;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod pods;
pub mod policies;
pub use tlsmesh_policy as policy;
pub mod proxy;
pub mod resumable;
pub mod scope;
pub mod state;
pub mod stats;
pub mod status;
pub mod sync;
pub mod testing;
