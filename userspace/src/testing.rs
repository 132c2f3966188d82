//! Loopback fakes of the kernel edges (`kernel`), so the proxy and the mesh
//! halves of a daemon run in a test process without root, BPF or network
//! namespaces: a pod is served on loopback listeners, its "netns" sockets
//! are ordinary sockets, and the original destination of every captured
//! connection is whatever the test says.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
};

use crate::{
    inventory::{Mode, Pod},
    kernel::{Connecting, KernelCounters, OrigDst, PodNet},
    scope::Scope,
    state::PodEntry,
    sync::lock,
};

/// Sockets of a fake pod: plain loopback sockets. `deliver` cannot bind a
/// foreign source address without `IP_TRANSPARENT`, so it connects from
/// the loopback address and records the source it was asked for.
#[derive(Debug, Default)]
pub struct LoopbackPod {
    /// The `src` of every `deliver` call, in order.
    pub delivered_from: Mutex<Vec<Option<IpAddr>>>,
    /// The pod's application: where every connection made "inside the pod"
    /// goes, whatever its destination (`None`: to the destination itself).
    pub app: Option<SocketAddr>,
}

impl LoopbackPod {
    /// A pod whose application listens on `app`.
    pub fn with_app(app: SocketAddr) -> Self {
        Self { app: Some(app), ..Self::default() }
    }
}

impl PodNet for LoopbackPod {
    fn connect(&self, dst: SocketAddr) -> Connecting {
        Box::pin(tokio::net::TcpStream::connect(self.app.unwrap_or(dst)))
    }

    fn deliver(&self, src: Option<IpAddr>, dst: SocketAddr) -> Connecting {
        lock(&self.delivered_from).push(src);
        Box::pin(tokio::net::TcpStream::connect(self.app.unwrap_or(dst)))
    }

    fn bind_udp(&self, addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
        let s = std::net::UdpSocket::bind(addr)?;
        s.set_nonblocking(true)?;
        Ok(s)
    }
}

/// Original destinations: the same one for every captured connection, or
/// none (a connection the kernel did not record).
#[derive(Debug, Default)]
pub struct FixedOrigDst(pub Mutex<Option<SocketAddr>>);

impl FixedOrigDst {
    /// Every connection was going to `dst`.
    pub fn to(dst: SocketAddr) -> Self {
        Self(Mutex::new(Some(dst)))
    }
}

impl OrigDst for FixedOrigDst {
    fn take_orig_dst(&self, _cookie: u64, _client: SocketAddr) -> Option<SocketAddr> {
        *lock(&self.0)
    }
}

/// A kernel that counted nothing.
#[derive(Debug, Default)]
pub struct NoKernel;

impl KernelCounters for NoKernel {
    fn counters(&self) -> Vec<(&'static str, u64)> {
        Vec::new()
    }
    fn enrolled_netns(&self) -> usize {
        0
    }
    fn deliveries_open(&self) -> usize {
        0
    }
}

/// An inventory pod on `node` in namespace `ns`, enrolled with `mode`.
pub fn pod(ns: &str, name: &str, node: &str, ip: &str, mode: Mode) -> Pod {
    Pod {
        name: name.into(),
        namespace: ns.into(),
        service_account: name.into(),
        node: node.into(),
        ips: vec![ip.parse().expect("pod ip")],
        netns: None,
        mode: Some(mode),
        workload: None,
    }
}

/// A served pod backed by a default [`LoopbackPod`], in a child of `root`.
pub fn served(pod: Pod, root: &Scope, trust_domain: &str) -> (Arc<PodEntry>, Arc<LoopbackPod>) {
    served_with(pod, root, trust_domain, LoopbackPod::default())
}

/// A served pod backed by `net`, in a child of `root`.
pub fn served_with(
    pod: Pod,
    root: &Scope,
    trust_domain: &str,
    net: LoopbackPod,
) -> (Arc<PodEntry>, Arc<LoopbackPod>) {
    let net = Arc::new(net);
    let entry = Arc::new(PodEntry {
        identity: pod.spiffe_id(trust_domain),
        mode: pod.mode.unwrap_or(Mode::Strict),
        pod,
        cookie: 1,
        netns_ino: 0,
        net: Arc::clone(&net) as Arc<dyn PodNet>,
        netns: None,
        scope: root.child(),
    });
    (entry, net)
}

/// Waits (at most 10 s, polling every 10 ms) until `cond` holds; panics
/// naming `what` otherwise.
pub async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !cond() {
        assert!(std::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
