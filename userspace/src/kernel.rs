//! The daemon's edges to the kernel, as small traits, so the proxy and the
//! mesh can be driven in a test without BPF or network namespaces:
//!
//! - [`OrigDst`]: where a captured connection was going (the eBPF map);
//! - [`PodNet`]: sockets inside one pod's network namespace (connect from
//!   the pod; transparent delivery to the pod's application);
//! - [`KernelCounters`]: what the eBPF side counted, for metrics and `/stats`;
//! - [`DecisionSwitch`]: the programs' decision log, on or off.
//!
//! The real implementations are `capture::Capture` and `deliver::PodNetns`;
//! `testing` has loopback ones.

use std::{
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
};

use tokio::net::TcpStream;

/// A boxed connect future.
pub type Connecting = Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

/// The original destination of captured connections.
pub trait OrigDst: Send + Sync {
    /// Takes (reads and removes) the original destination of the connection
    /// that pod netns `cookie`'s client `client` opened.
    fn take_orig_dst(&self, cookie: u64, client: SocketAddr) -> Option<SocketAddr>;
}

/// Sockets inside one pod's network namespace.
pub trait PodNet: Send + Sync + std::fmt::Debug {
    /// Connects from inside the pod to `dst`, with the pod's own address
    /// (passthrough; plaintext accepted for the pod's application).
    fn connect(&self, dst: SocketAddr) -> Connecting;

    /// Connects to the pod's application at `dst` from `src` (transparent
    /// delivery: the app sees `src` as its peer) or, without `src`, from
    /// the pod itself.
    fn deliver(&self, src: Option<IpAddr>, dst: SocketAddr) -> Connecting;

    /// A UDP socket bound to `addr` inside the pod (its QUIC server).
    fn bind_udp(&self, addr: SocketAddr) -> io::Result<std::net::UdpSocket>;
}

/// What the eBPF programs counted, by name, and the maps' sizes.
pub trait KernelCounters: Send + Sync {
    /// `(name, value)` for every kernel counter, in a stable order.
    fn counters(&self) -> Vec<(&'static str, u64)>;
    /// Enrolled network namespaces (entries of the enrollment map).
    fn enrolled_netns(&self) -> usize;
    /// Delivery records open (entries of the deliveries map).
    fn deliveries_open(&self) -> usize;
    /// Reserved counter slots that are not zero (index → value): counted by
    /// programs newer than this daemon, or by the test variant.
    fn reserved_counters(&self) -> std::collections::BTreeMap<u32, u64> {
        std::collections::BTreeMap::new()
    }
}

/// The switch of the eBPF programs' decision log (`/logging?ebpf=on|off`).
pub trait DecisionSwitch: Send + Sync {
    /// Whether the loaded programs can log at all (their object carries the
    /// log ring).
    fn can_log(&self) -> bool;
    /// Whether they log now.
    fn logging(&self) -> bool;
    /// Turns the log on or off.
    fn set_logging(&self, on: bool) -> Result<(), String>;
}
