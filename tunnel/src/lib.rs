//! tlsmesh-tunnel: the node-to-node tunnel transports — HBONE (HTTP/2 CONNECT
//! over TLS 1.3, interoperable with Istio ambient's ztunnel) and a QUIC
//! transport with the same semantics — plus their client connection pools.
//!
//! The crate never opens sockets or builds certificates itself: the daemon
//! hands it TLS streams (HBONE) or a bound `quinn::Endpoint` (QUIC) and rustls
//! configurations built by `tlsmesh-identity`. The wire format is specified in
//! `docs/PROTOCOL.md`.
//!
//! * Server side: [`hbone::serve`] / [`quic::serve`] call a daemon-provided
//!   [`Handler`] for every tunnelled connection ([`ConnectRequest`]) and splice
//!   the accepted upstream stream.
//! * Client side: [`hbone::Pool`] / [`quic::Pool`] multiplex tunnel streams
//!   over pooled connections keyed by [`PoolKey`]; [`Client`] puts both behind
//!   one call and falls back from QUIC to TCP when QUIC is unreachable.

#![forbid(unsafe_code)]
mod client;
mod error;
pub mod ext;
mod handler;
pub mod hbone;
pub mod quic;
pub mod resume;
mod splice;
mod usage;

pub use client::{Client, ClientConfig, Stream, Transport};
pub use error::Error;
pub use ext::{ResponseExt, ResumeExt};
pub use handler::{
    Accepted, Attach, BoxIo, ConnectHeaders, ConnectRequest, Handler, HandlerFuture, Io, OnClose,
    PoolKey, Refusal, Status,
};
pub use splice::{
    splice, splice_pausable, splice_with_buffer, SpliceEnd, SpliceOutcome, SplicePoint,
    DEFAULT_SPLICE_BUFFER,
};
