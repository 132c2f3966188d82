//! The proxy half of a daemon run in this process against the loopback
//! fakes of the kernel edges (`tlsmesh::testing`): no root, no BPF, no
//! network namespaces. Each test names the defect it guards against.

#![allow(clippy::similar_names, clippy::many_single_char_names, reason = "short names in tests")]

use std::{net::SocketAddr, sync::Arc, time::Duration};

use tlsmesh::{
    conns::{ConnTable, Route},
    inventory::{Inventory, Mode},
    kernel::OrigDst,
    policies::Policies,
    policy::{Action, Policy, Rule},
    proxy::Proxy,
    scope::{Drain, Scope},
    state::{NodeState, StateSettings},
    stats::Stats,
    testing::{self, until, FixedOrigDst},
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

const TD: &str = "cluster.local";

struct Harness {
    state: Arc<NodeState>,
    conns: ConnTable,
    stats: Arc<Stats>,
    proxy: Proxy,
    root: Scope,
}

fn harness(orig: Arc<dyn OrigDst>) -> Harness {
    let stats = Arc::new(Stats::default());
    let conns = ConnTable::new(Arc::clone(&stats));
    let state = Arc::new(NodeState::new(StateSettings {
        node: "n0".into(),
        probe_sources: vec![],
        allow_node_probes: false,
    }));
    let proxy = Proxy {
        state: Arc::clone(&state),
        conns: conns.clone(),
        stats: Arc::clone(&stats),
        orig_dst: orig,
        mesh: None,
        drain: Drain::new(),
    };
    Harness { state, conns, stats, proxy, root: Scope::new() }
}

/// Serves a pod `ns/<name>` (on n0, with `mode` and the app `app`, if any)
/// on fresh loopback listeners: `(outbound, inbound)` addresses.
async fn serve(
    h: &Harness,
    name: &str,
    ip: &str,
    mode: Mode,
    app: Option<SocketAddr>,
) -> (Arc<tlsmesh::state::PodEntry>, SocketAddr, SocketAddr) {
    let p = testing::pod("ns", name, "n0", ip, mode);
    let net = app.map(testing::LoopbackPod::with_app).unwrap_or_default();
    let (pod, _) = testing::served_with(p, &h.root, TD, net);
    let outbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let inbound = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (o, i) = (outbound.local_addr().unwrap(), inbound.local_addr().unwrap());
    h.proxy.serve_pod(&pod, vec![outbound], vec![inbound]);
    (pod, o, i)
}

/// An app that reads everything, then answers with `reply` bytes and closes.
async fn app(reply: usize) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                let _ = s.write_all(&vec![b'r'; reply]).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// An app that accepts and holds every connection open, never answering.
async fn silent_app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

/// Sends `n` bytes, half-closes, reads to the end.
async fn exchange(to: SocketAddr, n: usize) -> Vec<u8> {
    let mut s = TcpStream::connect(to).await.unwrap();
    s.write_all(&vec![b'q'; n]).await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    back
}

#[tokio::test]
async fn passthrough_is_in_the_table_while_open_and_counted_when_closed() {
    let dst = app(300).await;
    let h = harness(Arc::new(FixedOrigDst::to(dst)));
    let mut inv = Inventory { trust_domain: TD.into(), ..Inventory::default() };
    let p = testing::pod("ns", "client", "n0", "10.0.0.2", Mode::Strict);
    inv.pods.insert(p.key(), p);
    h.state.set_inventory(inv);
    let (_pod, listen, _) = serve(&h, "client", "10.0.0.2", Mode::Strict, None).await;

    let back = exchange(listen, 1000).await;
    assert_eq!(back.len(), 300);
    until("the connection to leave the table", || h.conns.is_empty()).await;
    let s = h.stats.snapshot();
    assert_eq!((s.outbound_passthrough, s.bytes_from_pods, s.bytes_to_pods), (1, 1000, 300));
}

/// Defect 1: removing a pod used to drop its connections' futures with the
/// matching `dec` never run, so the open-connection count only grew and the
/// drain always waited its full deadline.
#[tokio::test]
async fn removing_a_pod_ends_its_connections_and_empties_the_table() {
    let dst = silent_app().await;
    let h = harness(Arc::new(FixedOrigDst::to(dst)));
    let (pod, listen, _) = serve(&h, "client", "10.0.0.2", Mode::Strict, None).await;

    let mut clients = Vec::new();
    for _ in 0..5 {
        let mut c = TcpStream::connect(listen).await.unwrap();
        c.write_all(b"hello").await.unwrap();
        clients.push(c);
    }
    until("five open connections", || h.conns.len() == 5).await;
    let listed = h.conns.list();
    assert!(listed.iter().all(|c| c.info.route == Route::Passthrough && c.info.pod == "ns/client"));
    assert!(h.state.pod_count() == 0 && pod.scope.running() >= 6, "listener + 5 connections");

    tokio::time::timeout(Duration::from_secs(5), pod.scope.end()).await.expect("scope ends");
    assert!(h.conns.is_empty(), "no entry outlives its pod: {:?}", h.conns.list());
    tokio::time::timeout(Duration::from_secs(5), h.conns.empty())
        .await
        .expect("a drain would not wait");
    for mut c in clients {
        let mut b = [0u8; 16];
        let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await.expect("closed");
        assert!(matches!(r, Ok(0) | Err(_)), "the client sees its connection end: {r:?}");
    }
}

/// Defect 10: on the inbound plaintext path the byte counters were swapped
/// (the splice's "pod side" there is the remote client).
#[tokio::test]
async fn inbound_plaintext_bytes_are_counted_the_right_way_round() {
    let app_addr = app(77).await;
    let h = harness(Arc::new(FixedOrigDst::default()));
    let (_pod, _, listen) =
        serve(&h, "server", "127.0.0.1", Mode::Permissive, Some(app_addr)).await;

    // A client that is not enrolled sends 1234 bytes to the pod; its app
    // answers with 77.
    let back = exchange(listen, 1234).await;
    assert_eq!(back.len(), 77);
    until("the connection to leave the table", || h.conns.is_empty()).await;
    let s = h.stats.snapshot();
    assert_eq!(s.inbound_plaintext_accepted, 1);
    assert_eq!(s.bytes_to_pods, 1234, "what the client sent reached the pod");
    assert_eq!(s.bytes_from_pods, 77, "what the pod's app answered left it");
}

#[tokio::test]
async fn a_strict_pod_refuses_plaintext_and_records_the_deny() {
    let app_addr = app(1).await;
    let h = harness(Arc::new(FixedOrigDst::default()));
    let (_pod, _, listen) = serve(&h, "server", "127.0.0.1", Mode::Strict, Some(app_addr)).await;
    let mut c = TcpStream::connect(listen).await.unwrap();
    let mut b = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await.expect("answered");
    assert!(r.is_err() || matches!(r, Ok(0)), "refused: {r:?}");
    until("the refusal to be counted", || h.stats.snapshot().inbound_plaintext_refused == 1).await;
    let d = h.state.denies();
    assert_eq!(d.len(), 1);
    assert!(d[0].reason.contains("strict") && d[0].destination.contains("ns/server"), "{d:?}");
    assert!(h.conns.is_empty());
}

/// Defect 12: a captured connection the daemon cannot relay leaves a
/// counter and a log line, and the client sees a reset, not a silent EOF.
#[tokio::test]
async fn a_capture_without_an_original_destination_is_counted_and_reset() {
    let h = harness(Arc::new(FixedOrigDst::default()));
    let (_pod, listen, _) = serve(&h, "client", "10.0.0.2", Mode::Strict, None).await;
    let mut c = TcpStream::connect(listen).await.unwrap();
    let mut b = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await.expect("answered");
    assert_eq!(r.map_err(|e| e.kind()).err(), Some(std::io::ErrorKind::ConnectionReset));
    until("the drop to be counted", || h.stats.snapshot().outbound_no_orig_dst == 1).await;
    assert!(h.conns.is_empty());
}

/// A remote enrolled destination with no tunnel configured is refused (and
/// counted), never passed through in plaintext.
#[tokio::test]
async fn no_tunnel_means_no_plaintext_to_a_remote_enrolled_pod() {
    let remote = app(5).await;
    let h = harness(Arc::new(FixedOrigDst::to(remote)));
    let mut inv = Inventory { trust_domain: TD.into(), ..Inventory::default() };
    let client = testing::pod("ns", "client", "n0", "10.0.0.2", Mode::Strict);
    let server = testing::pod("ns", "server", "n1", "127.0.0.1", Mode::Strict);
    inv.pods.insert(client.key(), client);
    inv.pods.insert(server.key(), server);
    h.state.set_inventory(inv);
    let (_pod, listen, _) = serve(&h, "client", "10.0.0.2", Mode::Strict, None).await;
    let mut c = TcpStream::connect(listen).await.unwrap();
    let mut b = [0u8; 8];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await.expect("answered");
    assert!(r.is_err(), "reset: {r:?}");
    until("the failure to be counted", || h.stats.snapshot().tunnel_failed == 1).await;
    assert_eq!(h.stats.snapshot().outbound_passthrough, 0);
}

/// Drain: accept loops stop, open connections finish on their own.
#[tokio::test]
async fn drain_stops_accepting_and_lets_open_connections_finish() {
    let dst = app(10).await;
    let h = harness(Arc::new(FixedOrigDst::to(dst)));
    let (_pod, listen, _) = serve(&h, "client", "10.0.0.2", Mode::Strict, None).await;
    let mut open = TcpStream::connect(listen).await.unwrap();
    open.write_all(b"abc").await.unwrap();
    until("the connection to be open", || h.conns.len() == 1).await;
    h.proxy.drain.start();
    until("the listener to close", || std::net::TcpStream::connect(listen).is_err()).await;
    // The open one still completes.
    open.shutdown().await.unwrap();
    let mut back = Vec::new();
    open.read_to_end(&mut back).await.unwrap();
    assert_eq!(back.len(), 10);
    tokio::time::timeout(Duration::from_secs(5), h.conns.empty()).await.expect("drained");
}

/// What a policy re-check does: closing the connections it selects ends
/// them at once (the client sees a reset) and empties their entries.
#[tokio::test]
async fn close_where_ends_the_selected_open_connections() {
    let dst = silent_app().await;
    let h = harness(Arc::new(FixedOrigDst::to(dst)));
    let (_pod, listen, _) = serve(&h, "client", "10.0.0.2", Mode::Strict, None).await;
    let mut c = TcpStream::connect(listen).await.unwrap();
    c.write_all(b"x").await.unwrap();
    until("the connection to be open", || h.conns.len() == 1).await;
    assert_eq!(h.conns.close_where(|i| i.pod == "ns/other"), 0, "selects nothing");
    assert_eq!(h.conns.close_where(|i| i.pod == "ns/client"), 1);
    let mut b = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await.expect("closed");
    assert!(r.is_err() || matches!(r, Ok(0)), "{r:?}");
    until("the entry to go", || h.conns.is_empty()).await;
}

/// A deny rule for every source in namespace `ns` (the TOML form).
fn deny_from_ns(ns: &str, to_ports: Vec<u16>) -> Policy {
    Policy {
        rules: vec![Rule {
            name: "no-ns".into(),
            action: Action::Deny,
            to_namespace: "ns".into(),
            to_service_accounts: vec![],
            to_pods: vec![],
            from_namespaces: vec![ns.into()],
            from_identities: vec![],
            ports: to_ports,
        }],
    }
}

/// Same-node delivery is decided by the same policy as the tunnel (it used
/// to bypass policy entirely), and putting a policy in force that denies an
/// open connection closes it (ztunnel's re-check).
#[tokio::test]
async fn local_delivery_obeys_policy_and_a_new_deny_closes_the_open_connection() {
    let db_app = silent_app().await;
    let h = harness(Arc::new(FixedOrigDst::to("10.0.0.3:5432".parse().unwrap())));
    let mut inv = Inventory { trust_domain: TD.into(), ..Inventory::default() };
    for (name, ip) in [("client", "10.0.0.2"), ("db", "10.0.0.3")] {
        let p = testing::pod("ns", name, "n0", ip, Mode::Strict);
        inv.pods.insert(p.key(), p);
    }
    h.state.set_inventory(inv);
    let (_client, listen, _) = serve(&h, "client", "10.0.0.2", Mode::Strict, None).await;
    let (db, _, _) = serve(&h, "db", "10.0.0.3", Mode::Strict, Some(db_app)).await;
    h.state.insert_pod(db);

    let mut policies = Policies::new(Policy::default());
    assert_eq!(policies.put_in_force(&h.state, &h.conns, &h.stats), 0);
    let mut open = TcpStream::connect(listen).await.unwrap();
    open.write_all(b"select 1").await.unwrap();
    until("the local connection to be open", || h.conns.len() == 1).await;
    assert_eq!(h.conns.list()[0].info.route, Route::Local);

    // A deny on another port leaves it; one that matches closes it.
    policies.set_file(deny_from_ns("ns", vec![22]));
    assert_eq!(policies.put_in_force(&h.state, &h.conns, &h.stats), 0);
    policies.set_file(deny_from_ns("ns", vec![]));
    assert_eq!(policies.put_in_force(&h.state, &h.conns, &h.stats), 1);
    let mut b = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(5), open.read(&mut b)).await.expect("closed");
    assert!(r.is_err() || matches!(r, Ok(0)), "{r:?}");
    until("the entry to go", || h.conns.is_empty()).await;
    assert_eq!(h.stats.snapshot().policy_closed, 1);

    // New connections are refused at once, and the refusal is recorded.
    let mut c = TcpStream::connect(listen).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await.expect("answered");
    assert!(r.is_err() || matches!(r, Ok(0)), "refused: {r:?}");
    until("the deny to be counted", || h.stats.snapshot().policy_denied == 1).await;
    let d = h.state.denies();
    assert!(
        d.iter().any(|d| d.destination.contains("ns/db") && d.reason.contains("no-ns")),
        "{d:?}"
    );
    assert_eq!(h.stats.snapshot().outbound_local, 1, "only the first was delivered");

    // The deny removed: new connections pass again.
    policies.set_file(Policy::default());
    policies.put_in_force(&h.state, &h.conns, &h.stats);
    let mut again = TcpStream::connect(listen).await.unwrap();
    again.write_all(b"select 2").await.unwrap();
    until("the new connection to be open", || h.conns.len() == 1).await;
}

/// Plaintext to a permissive pod has no principal: an allow policy naming
/// principals refuses it, and a re-check closes the open ones.
#[tokio::test]
async fn plaintext_to_a_permissive_pod_is_decided_by_policy() {
    let app_addr = silent_app().await;
    let h = harness(Arc::new(FixedOrigDst::default()));
    let (_pod, _, listen) =
        serve(&h, "server", "127.0.0.1", Mode::Permissive, Some(app_addr)).await;
    let mut open = TcpStream::connect(listen).await.unwrap();
    open.write_all(b"x").await.unwrap();
    until("the plaintext connection to be open", || h.conns.len() == 1).await;
    let inv_pod = testing::pod("ns", "server", "n0", "127.0.0.1", Mode::Permissive);
    let mut inv = Inventory { trust_domain: TD.into(), ..Inventory::default() };
    inv.pods.insert(inv_pod.key(), inv_pod);
    h.state.set_inventory(inv);
    let only_mesh = Policy {
        rules: vec![Rule {
            name: "only-mesh".into(),
            action: Action::Allow,
            to_namespace: "ns".into(),
            to_service_accounts: vec![],
            to_pods: vec![],
            from_namespaces: vec!["ns".into()],
            from_identities: vec![],
            ports: vec![],
        }],
    };
    let closed = Policies::new(only_mesh).put_in_force(&h.state, &h.conns, &h.stats);
    assert_eq!(closed, 1);
    until("the entry to go", || h.conns.is_empty()).await;
    let mut c = TcpStream::connect(listen).await.unwrap();
    let mut b = [0u8; 4];
    let r = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await.expect("answered");
    assert!(r.is_err() || matches!(r, Ok(0)), "refused: {r:?}");
    until("the deny to be counted", || h.stats.snapshot().policy_denied == 1).await;
    assert_eq!(h.stats.snapshot().inbound_plaintext_accepted, 1, "only the first");
}
