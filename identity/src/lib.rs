//! Identity and certificates for tlsmesh: SPIFFE IDs, the built-in CA (or an
//! external intermediate), the CA's network service and its client, the
//! node-side certificate manager with half-life rotation, trust bundles and
//! deny lists, and the rustls configurations of the mTLS tunnel.
//!
//! See `docs/IDENTITY.md` for the design, the CA protocol and operations
//! (CA rotation, revocation, external CA).
//!
//! | module | responsibility |
//! |---|---|
//! | [`spiffe`] | SPIFFE ID types, parsing, reading the URI SAN of a certificate |
//! | [`keys`] | key generation, CSRs, PEM, certificate facts, `CertifiedKey` |
//! | [`ca`] | the CA: init/load/reload files, validate, sign CSRs |
//! | [`authz`] | pure decisions: placement authorization, join tokens |
//! | [`trust`] | trust bundle (several roots) and deny list |
//! | [`tls`] | rustls client/server configs, SPIFFE verifiers, SNI resolver |
//! | [`protocol`] | the CA wire protocol (JSON lines over TLS) |
//! | [`server`] | the CA network service |
//! | [`client`] | the node's CA client (join, renew, request) |
//! | [`manager`] | the node's certificate manager (fetch, renew at half-life, retain) |

#![forbid(unsafe_code)]
// `Duration::from_mins`/`from_hours` need Rust 1.91; the workspace MSRV is 1.85.
#![allow(clippy::duration_suboptimal_units, reason = "MSRV 1.85 lacks Duration::from_mins")]

pub mod authz;
pub mod ca;
pub mod client;
pub mod keys;
pub mod manager;
pub mod protocol;
pub mod server;
pub mod spiffe;
pub mod tls;
pub mod trust;

#[cfg(test)]
mod testutil;

pub use spiffe::{Identity, NodeId, SpiffeId};
