//! Both halves of two daemons in this process — the proxy of node n0 and the
//! mesh (tunnel client and per-pod tunnel server) of both — against the
//! loopback fakes of the kernel edges and a throw-away CA: bytes cross real
//! mTLS (HBONE) on loopback, no root, no BPF, no network namespaces. Pods
//! are loopback addresses (each test its own 127.0.N.0/24), the
//! destination pod's tunnel server listens on its address, port 15008.

#![allow(clippy::similar_names, reason = "short names in tests")]

use std::{net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use tlsmesh::{
    certs::Certs,
    config::{IdentityConfig, Transport},
    conns::{ConnTable, Direction, Route},
    inventory::{Inventory, Mode, Node, Pod},
    mesh::{server::Inbound, Mesh},
    policies::Policies,
    policy::{Action, Policy, Rule},
    proxy::Proxy,
    scope::{Drain, Scope},
    state::{NodeState, PodEntry, StateSettings},
    stats::Stats,
    testing::{self, until, FixedOrigDst, LoopbackPod},
};
use tlsmesh_identity::ca::{CaFiles, Overwrite};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const TD: &str = "cluster.local";
const APP_PORT: u16 = 7000;

/// One daemon's halves.
struct Side {
    state: Arc<NodeState>,
    conns: ConnTable,
    stats: Arc<Stats>,
    mesh: Arc<Mesh>,
    root: Scope,
}

/// Node n0 (the client pod, its proxy) and node n1 (the server pod, its
/// tunnel server), both with the mesh.
struct Pair {
    n0: Side,
    n1: Side,
    /// Where the client pod's captured connections are accepted.
    outbound: SocketAddr,
    /// The served server pod (its scope owns its tunnel server).
    server: Arc<PodEntry>,
    _ca: TempDir,
}

struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn pod(name: &str, node: &str, ip: &str) -> Pod {
    testing::pod("shop", name, node, ip, Mode::Strict)
}

async fn side(node: &str, inv: &Inventory, ca_dir: &std::path::Path) -> Side {
    let stats = Arc::new(Stats::default());
    let conns = ConnTable::new(Arc::clone(&stats));
    let state = Arc::new(NodeState::new(StateSettings {
        node: node.into(),
        probe_sources: vec![],
        allow_node_probes: false,
    }));
    state.set_inventory(inv.clone());
    let cfg = IdentityConfig { ca_dir: Some(ca_dir.to_path_buf()), ..IdentityConfig::default() };
    let certs = Certs::setup(&cfg, node, inv).await.expect("certs").expect("a CA is configured");
    let mesh = Arc::new(Mesh::new(certs, Transport::Tcp).expect("mesh").without_socket_mark());
    Side { state, conns, stats, mesh, root: Scope::new() }
}

/// Builds the pair in 127.0.`net`.0/24: client 127.0.`net`.2 on n0, server
/// 127.0.`net`.3 on n1 whose app is `app`.
async fn pair(net: u8, app: SocketAddr) -> Pair {
    let ca = TempDir(std::env::temp_dir().join(format!(
        "tlsmesh-inproc-ca-{}-{net}-{}",
        std::process::id(),
        rand_suffix()
    )));
    CaFiles::init(&ca.0, TD, Duration::from_secs(86_400), Overwrite::Refuse).expect("CA");
    let (cip, sip) = (format!("127.0.{net}.2"), format!("127.0.{net}.3"));
    let mut inv = Inventory { trust_domain: TD.into(), ..Inventory::default() };
    for n in ["n0", "n1"] {
        inv.nodes.insert(n.into(), Node { name: n.into(), addresses: vec![] });
    }
    for p in [pod("client", "n0", &cip), pod("server", "n1", &sip)] {
        inv.pods.insert(p.key(), p);
    }
    let (n0, n1) = (side("n0", &inv, &ca.0).await, side("n1", &inv, &ca.0).await);

    // n1 serves the server pod: tunnel server on its address, port 15008.
    let (server, _) =
        testing::served_with(pod("server", "n1", &sip), &n1.root, TD, LoopbackPod::with_app(app));
    n1.state.insert_pod(Arc::clone(&server));
    let id = tlsmesh::certs::workload_id(TD, &server.pod).expect("server identity");
    n1.mesh.certs.manager.ensure(&id).await.expect("server certificate");
    let inbound = Inbound {
        state: Arc::clone(&n1.state),
        conns: n1.conns.clone(),
        stats: Arc::clone(&n1.stats),
        mesh: Arc::clone(&n1.mesh),
        drain: Drain::new(),
    };
    let tunnel = TcpListener::bind((sip.as_str(), tlsmesh_common::PORT_TUNNEL)).await.unwrap();
    tlsmesh::mesh::server::serve_pod(&inbound, &server, vec![tunnel], vec![]).expect("serve");

    // n0 serves the client pod: its captured connections go to the server.
    let dst: SocketAddr = format!("{sip}:{APP_PORT}").parse().unwrap();
    let proxy = Proxy {
        state: Arc::clone(&n0.state),
        conns: n0.conns.clone(),
        stats: Arc::clone(&n0.stats),
        orig_dst: Arc::new(FixedOrigDst::to(dst)),
        mesh: Some(Arc::clone(&n0.mesh)),
        drain: Drain::new(),
    };
    let (client, _) = testing::served(pod("client", "n0", &cip), &n0.root, TD);
    n0.state.insert_pod(Arc::clone(&client));
    let out = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inb = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let outbound = out.local_addr().unwrap();
    proxy.serve_pod(&client, vec![out], vec![inb]);
    Pair { n0, n1, outbound, server, _ca: ca }
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

/// An app that echoes everything back, connection by connection.
async fn echo_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A connection through the client pod that has done one round trip.
async fn open(p: &Pair) -> TcpStream {
    let mut s = TcpStream::connect(p.outbound).await.unwrap();
    s.write_all(b"ping").await.unwrap();
    let mut b = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut b))
        .await
        .expect("the echo in time")
        .expect("the echo");
    assert_eq!(&b, b"ping");
    s
}

/// Whether `s` is closed (reset, or EOF on a read).
async fn closed(s: &mut TcpStream) -> bool {
    let _ = s.write_all(b"more").await;
    let mut b = [0u8; 4];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), s.read(&mut b)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn a_connection_crosses_mtls_and_both_tables_show_it() {
    let p = pair(21, echo_app().await).await;
    let mut s = open(&p).await;
    until("both entries", || p.n0.conns.len() == 1 && p.n1.conns.len() == 1).await;
    let (out, inb) = (p.n0.conns.list().remove(0), p.n1.conns.list().remove(0));
    assert_eq!(
        (
            out.info.direction,
            out.info.route,
            out.info.transport.map(tlsmesh::config::Transport::as_str)
        ),
        (Direction::Outbound, Route::Tunnel, Some("tcp"))
    );
    assert_eq!((inb.info.direction, inb.info.route), (Direction::Inbound, Route::Tunnel));
    assert_eq!(inb.info.src_identity.as_deref(), Some("spiffe://cluster.local/ns/shop/sa/client"));
    assert_eq!(inb.info.pod, "shop/server");
    // The client pod owns its claimed address: it is the source policy saw.
    assert_eq!(inb.info.src.ip(), "127.0.21.2".parse::<std::net::IpAddr>().unwrap());
    assert_eq!(inb.info.peer_pod.as_deref(), Some("shop/client"));

    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    until("both tables empty", || p.n0.conns.is_empty() && p.n1.conns.is_empty()).await;
    let (a, b) = (p.n0.stats.snapshot(), p.n1.stats.snapshot());
    assert_eq!((a.outbound_tunnel, b.inbound_tunnel_accepted), (1, 1));
    assert_eq!((a.bytes_from_pods, a.bytes_to_pods), (4, 4), "n0: what the client sent and got");
    assert_eq!((b.bytes_to_pods, b.bytes_from_pods), (4, 4), "n1: what reached the server's app");
    assert_eq!(p.n1.mesh.registry.list().len(), 1, "the pooled tunnel connection stays");
}

#[tokio::test]
async fn a_new_deny_on_the_destination_closes_the_open_stream_and_refuses_new_ones() {
    let p = pair(22, echo_app().await).await;
    let mut s = open(&p).await;
    until("the inbound entry", || p.n1.conns.len() == 1).await;
    let deny = Policy {
        rules: vec![Rule {
            name: "no-client".into(),
            action: Action::Deny,
            to_namespace: "shop".into(),
            to_service_accounts: vec!["server".into()],
            to_pods: vec![],
            from_namespaces: vec![],
            from_identities: vec!["spiffe://cluster.local/ns/shop/sa/client".into()],
            ports: vec![],
        }],
    };
    let mut policies = Policies::new(deny);
    assert_eq!(policies.put_in_force(&p.n1.state, &p.n1.conns, &p.n1.stats), 1);
    assert!(closed(&mut s).await, "the client sees its stream end");
    until("both tables empty", || p.n0.conns.is_empty() && p.n1.conns.is_empty()).await;

    // A new connection: refused at the destination (401), reset at the client.
    let mut again = TcpStream::connect(p.outbound).await.unwrap();
    again.write_all(b"x").await.unwrap();
    assert!(closed(&mut again).await);
    until("the deny counted", || p.n1.stats.snapshot().policy_denied == 1).await;
    assert!(p.n1.state.denies().iter().any(|d| d.reason.contains("no-client")));

    // Lifted: connections pass again.
    policies.set_file(Policy::default());
    policies.put_in_force(&p.n1.state, &p.n1.conns, &p.n1.stats);
    drop(open(&p).await);
}

/// Defect 2: a peer's pooled HBONE connection used to keep opening streams
/// into a removed pod. Ending the pod's scope ends its tunnel server, its
/// inbound streams and its pooled connections.
#[tokio::test]
async fn removing_the_destination_pod_ends_its_streams_and_its_tunnel_server() {
    let p = pair(23, echo_app().await).await;
    let mut s = open(&p).await;
    until("the inbound entry", || p.n1.conns.len() == 1).await;
    p.n1.state.remove_pod("shop/server");
    tokio::time::timeout(Duration::from_secs(5), p.server.scope.end())
        .await
        .expect("the pod's scope ends");
    assert!(closed(&mut s).await, "the stream into the removed pod ends");
    until("n1's table empty", || p.n1.conns.is_empty()).await;
    // The pooled connection is gone with the server: a new stream fails.
    let mut again = TcpStream::connect(p.outbound).await.unwrap();
    again.write_all(b"x").await.unwrap();
    assert!(closed(&mut again).await, "nothing serves the removed pod");
    assert_eq!(p.n1.stats.snapshot().inbound_tunnel_accepted, 1);
    assert!(p.n1.mesh.registry.list().is_empty(), "no tunnel connection left registered");
}
