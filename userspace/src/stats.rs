//! Daemon-side counters (lock-free atomics), shared by the proxy paths and
//! read by the admin API and metrics. Counters only go up; what is open now
//! is the connection table's size (`conns`), never a counter pair.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use serde::Serialize;

macro_rules! counters {
    ($($(#[$m:meta])* $name:ident),* $(,)?) => {
        /// Live counters.
        #[derive(Debug, Default)]
        pub struct Stats { $($(#[$m])* pub $name: AtomicU64,)* }

        /// A copy of the counters at one moment.
        #[derive(Debug, Default, Clone, Copy, Serialize, serde::Deserialize, PartialEq, Eq)]
        pub struct Snapshot { $($(#[$m])* pub $name: u64,)* }

        impl Stats {
            /// Reads every counter.
            pub fn snapshot(&self) -> Snapshot {
                Snapshot { $($name: self.$name.load(Relaxed),)* }
            }
        }
    };
}

counters! {
    /// Outbound connections accepted from enrolled pods.
    outbound_accepted,
    /// Outbound connections whose original destination was unknown (dropped).
    outbound_no_orig_dst,
    /// Outbound connections that failed to reach their destination.
    outbound_failed,
    /// Delivered to an enrolled pod on this node (no TLS).
    outbound_local,
    /// Passed through in plaintext (destination not enrolled).
    outbound_passthrough,
    /// Carried through the tunnel.
    outbound_tunnel,
    /// Plaintext inbound accepted (permissive pods).
    inbound_plaintext_accepted,
    /// Plaintext inbound accepted as node probes.
    inbound_probe_accepted,
    /// Plaintext inbound refused (strict pods).
    inbound_plaintext_refused,
    /// Tunnel streams accepted.
    inbound_tunnel_accepted,
    /// Tunnel streams refused (policy, identity, upstream).
    inbound_tunnel_refused,
    /// Connections denied by L4 policy when they opened (tunnel streams,
    /// local delivery, plaintext to permissive pods).
    policy_denied,
    /// Open connections closed because a new policy denies them.
    policy_closed,
    /// Connections handed over to the next daemon of the node.
    handed_over,
    /// Connections taken over from the previous daemon of the node.
    taken_over,
    /// Outbound tunnel streams that could not be opened.
    tunnel_failed,
    /// Bytes from pods into the daemon.
    bytes_from_pods,
    /// Bytes from the daemon to pods.
    bytes_to_pods,
    /// Captured connections dropped before they could be relayed (the
    /// destination pod vanished between routing and connecting, or the
    /// accepted socket was already dead), each with a log line.
    connections_dropped,
}

impl Stats {
    /// Adds one.
    pub fn inc(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }

    /// Adds `n`.
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Relaxed);
    }
}
