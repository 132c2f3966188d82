//! tlsmesh: a transparent node-level mTLS tunnel for Kubernetes pods.
//!
//! This crate is the node daemon and the `tlsmesh` CLI. Modules by concern:
//! `capture` (eBPF load/attach/pin, maps), `netns` (namespaces and sockets in
//! them), `inventory` (who runs where), `config` (the one typed config),
//! `proxy` (outbound and inbound connection handling), `node` (the daemon's
//! wiring), `cli` (command line).

pub mod capture;
pub mod netns;
