//! The connection handover, end to end (issue 14 item 2, the connections
//! whose state is all in the kernel): a node's daemon is replaced twice
//! while long-lived connections of every such route run through it — a
//! local delivery, a passthrough to a pod that is not enrolled and a
//! plaintext connection accepted by a permissive pod, each with a trickle
//! (1 KiB every 100 ms) and an idle connection, and a local bulk stream.
//! Every byte comes back intact and in order, the old daemon exits as soon
//! as it handed its table over (long before its drain deadline), and the
//! new one lists the connections. A daemon of another node is never a
//! successor, and a connection the new daemon cannot take (its pod is not
//! served there) stays with the old one: then the old daemon relays on and
//! drains as before — a tunnel stream, already paused with its peer, is
//! resumed by the old daemon itself (the resume tests: tests/resume.rs).

use std::{net::SocketAddr, time::Duration};

use netkit::{
    echo_server, require_root, wait_for, write_inventory, Daemon, EchoStream, Role, Topology,
};

const KIB: u64 = 1024;

/// Replaces `old` (node 0's daemon) by a new one with the same pins and
/// waits until the old one exited; returns the new one.
fn replace(topo: &Topology, old: Daemon) -> Daemon {
    let (new, log) = old.replace(topo, &["--drain-timeout", "120"]);
    // Its drain deadline is 120 s and its connections never end on their
    // own: it exited early only because it handed them over.
    assert!(
        log.contains("handing connections over to the new daemon"),
        "the old daemon found its successor:\n{log}"
    );
    assert!(!log.contains("drain deadline reached"), "nothing was left to drain:\n{log}");
    new
}

/// The routes of the connections `d` holds, sorted.
fn routes(d: &Daemon) -> Vec<String> {
    let mut v: Vec<String> = d.config_dump()["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter_map(|c| c["route"].as_str().map(str::to_owned))
        .collect();
    v.sort();
    v
}

#[test]
fn handover_moves_local_passthrough_and_plaintext_connections_to_the_new_daemon() {
    if !require_root("handover_moves_local_passthrough_and_plaintext_connections_to_the_new_daemon")
    {
        return;
    }
    let topo = Topology::build(2, 3).expect("topology");
    // Node 0: a client, a local server (both strict), a permissive server.
    // Node 1: a server and a client that are not enrolled.
    let inv = write_inventory(&topo, "inv.toml", &|p| match (p.node, p.name.as_str()) {
        (0, "n0p2") => Role::Permissive,
        (0, _) => Role::Strict,
        _ => Role::Plain,
    });
    let first = Daemon::start(&topo, 0, &inv, &["--drain-timeout", "120"]);
    let _d1 = Daemon::start(&topo, 1, &inv, &[]);
    let client = topo.pod(0, 0).clone();
    let outsider = topo.pod(1, 1).clone();
    let local = SocketAddr::new(topo.pod(0, 1).ip4.into(), 7000);
    let passthrough = SocketAddr::new(topo.pod(1, 0).ip4.into(), 7000);
    let plaintext = SocketAddr::new(topo.pod(0, 2).ip4.into(), 7000);
    for dst in [local, passthrough, plaintext] {
        let server = if dst == passthrough {
            topo.pod(1, 0)
        } else if dst == local {
            topo.pod(0, 1)
        } else {
            topo.pod(0, 2)
        };
        echo_server(&server.netns, dst);
    }
    let trickle = |netns: &str, dst| {
        EchoStream::start(netns, dst, 1024, Duration::from_millis(100), u64::MAX)
            .expect("start a trickle")
    };
    let idle = |netns: &str, dst| {
        EchoStream::start(netns, dst, 1, Duration::from_secs(3600), u64::MAX).expect("start idle")
    };
    let streams = vec![
        ("local trickle", trickle(&client.netns, local)),
        ("local idle", idle(&client.netns, local)),
        ("passthrough trickle", trickle(&client.netns, passthrough)),
        ("passthrough idle", idle(&client.netns, passthrough)),
        ("plaintext trickle", trickle(&outsider.netns, plaintext)),
        ("plaintext idle", idle(&outsider.netns, plaintext)),
    ];
    // 1 GiB, paced at most 64 KiB per millisecond (about 15 s or more) so
    // that it is in full flow at both replacements.
    let bulk_total = 1 << 30;
    let bulk =
        EchoStream::start(&client.netns, local, 64 * 1024, Duration::from_millis(1), bulk_total)
            .expect("start the bulk stream");
    for (what, s) in &streams {
        assert!(s.wait_echoed(1, Duration::from_secs(10)), "{what}: no echo before the upgrade");
    }
    // Seven relays on node 0 (the tunnel is not used by any).
    let seven = wait_for(Duration::from_secs(10), || (routes(&first).len() == 7).then_some(()));
    assert!(seven.is_some(), "connections on node 0 before: {:?}", routes(&first));
    assert!(bulk.echoed() < bulk_total, "the bulk stream is still running at the upgrade");

    let second = replace(&topo, first);
    let mid: Vec<u64> = streams.iter().map(|(_, s)| s.echoed()).collect();
    // The new daemon relays them: the trickles go on.
    for ((what, s), before) in streams.iter().zip(&mid) {
        if what.ends_with("trickle") {
            assert!(
                s.wait_echoed(before + 5 * KIB, Duration::from_secs(10)),
                "{what}: no echo after the handover ({} bytes)",
                s.echoed()
            );
        }
    }
    let expected = {
        let mut v =
            vec!["local", "local", "local", "passthrough", "passthrough", "plaintext", "plaintext"];
        v.sort_unstable();
        v
    };
    assert_eq!(routes(&second), expected, "the new daemon holds every connection");

    // Again: connections it took over move on once more.
    assert!(bulk.echoed() < bulk_total, "the bulk stream is still running at the second upgrade");
    let third = replace(&topo, second);
    assert_eq!(routes(&third), expected, "the third daemon holds every connection");
    let moved = bulk.finish(true).expect("the 1 GiB bulk stream came back intact");
    assert_eq!(moved, bulk_total);
    for (what, s) in streams {
        let n = s.finish(false).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(n > 0, "{what}: nothing moved");
    }
    let gone = wait_for(Duration::from_secs(10), || routes(&third).is_empty().then_some(()));
    assert!(gone.is_some(), "entries end with their connections: {:?}", routes(&third));
    let log = third.log_text();
    assert!(log.contains("connections taken over from the previous daemon"), "{log}");
}

#[test]
fn handover_never_goes_to_a_daemon_of_another_node() {
    if !require_root("handover_never_goes_to_a_daemon_of_another_node") {
        return;
    }
    let topo = Topology::build(2, 2).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    // Node 0's daemon is pointed at node 1's handover socket.
    // Node 1's daemon starts last, so the socket's name is its own.
    let n1_socket = Daemon::handover_socket(&topo, &topo.node(1).name).display().to_string();
    let mut d0 =
        Daemon::start(&topo, 0, &inv, &["--handover-socket", &n1_socket, "--drain-timeout", "3"]);
    let d1 = Daemon::start(&topo, 1, &inv, &[]);
    let local = SocketAddr::new(topo.pod(0, 1).ip4.into(), 7000);
    echo_server(&topo.pod(0, 1).netns, local);
    let s =
        EchoStream::start(&topo.pod(0, 0).netns, local, 1024, Duration::from_millis(100), u64::MAX)
            .expect("a local trickle");
    assert!(s.wait_echoed(2 * KIB, Duration::from_secs(10)), "echo before");
    d0.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(d0.proc.wait_timeout(Duration::from_secs(30)).is_some(), "node 0's daemon exits");
    let log = d0.log_text();
    assert!(log.contains("no connection handover"), "{log}");
    assert!(log.contains("serves node"), "it says why:\n{log}");
    assert!(log.contains("drain deadline reached"), "it drained as before:\n{log}");
    // The connection ended with the drain, as before; node 1 took nothing.
    let closed = wait_for(Duration::from_secs(10), || s.closed().then_some(()));
    assert!(closed.is_some(), "the drained connection was closed");
    assert!(d1.config_dump()["connections"].as_array().is_some_and(Vec::is_empty));
    assert!(!d1.log_text().contains("taken over"), "{}", d1.log_text());
}

#[test]
fn handover_refused_for_a_pod_the_new_daemon_does_not_serve_keeps_the_connection_relayed() {
    if !require_root(
        "handover_refused_for_a_pod_the_new_daemon_does_not_serve_keeps_the_connection_relayed",
    ) {
        return;
    }
    let topo = Topology::build(2, 2).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    // The new daemon's inventory lacks the client pod: it cannot take its
    // connections.
    let without_client = write_inventory(&topo, "inv-without-client.toml", &|p| {
        if p.name == "n0p0" {
            Role::Absent
        } else {
            Role::Strict
        }
    });
    let mut old = Daemon::start(&topo, 0, &inv, &["--drain-timeout", "8"]);
    let _d1 = Daemon::start(&topo, 1, &inv, &[]);
    // A local delivery and a tunnel stream (resumable: it pauses with the
    // peer before it is offered).
    let local = SocketAddr::new(topo.pod(0, 1).ip4.into(), 7000);
    let remote = SocketAddr::new(topo.pod(1, 0).ip4.into(), 7000);
    echo_server(&topo.pod(0, 1).netns, local);
    echo_server(&topo.pod(1, 0).netns, remote);
    let trickle = |dst| {
        EchoStream::start(&topo.pod(0, 0).netns, dst, 1024, Duration::from_millis(50), u64::MAX)
            .expect("a trickle")
    };
    let streams = [("local", trickle(local)), ("tunnel", trickle(remote))];
    for (what, s) in &streams {
        assert!(s.wait_echoed(2 * KIB, Duration::from_secs(10)), "{what}: echo before");
    }
    let node = topo.node(0).clone();
    let new = Daemon::start_with_pin(&topo, &node, &old.pin_dir, &without_client, &[]);
    old.proc.signal(nix::sys::signal::Signal::SIGTERM);
    // Refused: the old daemon relays on through its drain; the paused
    // tunnel stream it resumes itself.
    let refused = wait_for(Duration::from_secs(10), || {
        let log = old.log_text();
        (log.contains("did not take a connection") && log.contains("tunnel stream resumed"))
            .then_some(())
    });
    assert!(refused.is_some(), "the refusals and the resume are logged:\n{}", old.log_text());
    for (what, s) in &streams {
        let at = s.echoed();
        assert!(
            s.wait_echoed(at + 10 * KIB, Duration::from_secs(3)),
            "{what}: the refused connection is still relayed by the old daemon ({} bytes)",
            s.echoed()
        );
    }
    assert!(old.proc.wait_timeout(Duration::from_secs(30)).is_some(), "the old daemon exits");
    assert!(old.log_text().contains("drain deadline reached"), "{}", old.log_text());
    // The new daemon sums up once the old one closed the socket.
    let summed = wait_for(Duration::from_secs(10), || {
        new.log_text().contains("taken=0 refused=2").then_some(())
    });
    let log = new.log_text();
    assert!(summed.is_some(), "{log}");
    assert!(log.contains("is not served by this daemon"), "the new daemon says why:\n{log}");
}

// ---- Failure is safe (issue 14 point 4) ------------------------------------

/// An echo server on node 0's second pod, port 7000.
fn local_server(topo: &Topology) -> SocketAddr {
    let local = SocketAddr::new(topo.pod(0, 1).ip4.into(), 7000);
    echo_server(&topo.pod(0, 1).netns, local);
    local
}

/// `n` trickles (1 KiB every 100 ms) from node 0's first pod to `local`,
/// each echoed once.
fn local_trickles(topo: &Topology, local: SocketAddr, n: usize) -> Vec<EchoStream> {
    let streams: Vec<EchoStream> = (0..n)
        .map(|_| {
            EchoStream::start(
                &topo.pod(0, 0).netns,
                local,
                1024,
                Duration::from_millis(100),
                u64::MAX,
            )
            .expect("start a trickle")
        })
        .collect();
    for (i, s) in streams.iter().enumerate() {
        assert!(s.wait_echoed(KIB, Duration::from_secs(10)), "trickle {i}: no echo");
    }
    streams
}

/// The entries of the kernel's delivery table (`TLSMESH_DELIVERIES`) under
/// `pin_dir`: one per open delivery into a pod of this node.
fn kernel_deliveries(pin_dir: &std::path::Path) -> usize {
    use aya::maps::{HashMap, Map, MapData};
    use tlsmesh_common::{maps, DeliveryKey};
    let data = MapData::from_pin(pin_dir.join(maps::DELIVERIES)).expect("the pinned delivery map");
    let map: HashMap<_, DeliveryKey, u32> =
        HashMap::try_from(Map::LruHashMap(data)).expect("a hash map");
    map.keys().flatten().count()
}

/// Waits until `d` owns the admin API (the old daemon let it go) and holds
/// `n` connections.
fn wait_holds(d: &Daemon, n: usize) {
    let pid = u64::from(d.proc.pid());
    let holds = wait_for(Duration::from_secs(20), || {
        let dump = d.get("/config_dump").ok()?.1;
        (dump["pid"].as_u64() == Some(pid) && dump["connections"].as_array()?.len() == n)
            .then_some(())
    });
    assert!(holds.is_some(), "the new daemon took {n}:\n{}", d.log_text());
}

/// How many connections `d`'s log says it handed over ("handed over").
fn handed_over(d: &Daemon) -> usize {
    d.log_text().matches("outcome=handed over").count()
}

/// Waits until exactly `n_closed` of `streams` were closed and the others
/// still echo (5 KiB more each); returns the survivors.
fn survivors(streams: Vec<EchoStream>, n_closed: usize) -> Vec<EchoStream> {
    let total = streams.len();
    let settled = wait_for(Duration::from_secs(20), || {
        (streams.iter().filter(|s| s.closed()).count() >= n_closed).then_some(())
    });
    let closed = streams.iter().filter(|s| s.closed()).count();
    assert!(settled.is_some() && closed == n_closed, "{closed} of {total} closed, not {n_closed}");
    let alive: Vec<EchoStream> = streams.into_iter().filter(|s| !s.closed()).collect();
    for (i, s) in alive.iter().enumerate() {
        let at = s.echoed();
        assert!(
            s.wait_echoed(at + 5 * KIB, Duration::from_secs(10)),
            "survivor {i}: no echo ({} bytes)",
            s.echoed()
        );
    }
    // Still exactly `n_closed`: a survivor was not closed meanwhile.
    assert_eq!(alive.iter().filter(|s| s.closed()).count(), 0, "a survivor closed");
    alive
}

#[test]
fn a_new_daemon_that_dies_halfway_leaves_the_rest_with_the_old_one() {
    if !require_root("a_new_daemon_that_dies_halfway_leaves_the_rest_with_the_old_one") {
        return;
    }
    let topo = Topology::build(2, 2).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let mut old = Daemon::start(&topo, 0, &inv, &["--drain-timeout", "60"]);
    let local = local_server(&topo);
    let streams = local_trickles(&topo, local, 20);
    assert_eq!(kernel_deliveries(&old.pin_dir), 20, "one kernel entry per delivery");
    // The new daemon takes five connections, then hangs at the sixth.
    let node = topo.node(0).clone();
    let mut new = Daemon::start_with_env(
        &topo,
        &node,
        &old.pin_dir,
        &inv,
        &[],
        &[("FAILPOINTS", "handover-take=5*off->return")],
    );
    old.proc.signal(nix::sys::signal::Signal::SIGTERM);
    wait_holds(&new, 5);
    assert!(new.log_text().contains("fault injected"), "{}", new.log_text());
    // It dies: its five end; the old daemon relays the other fifteen on.
    new.proc.kill();
    let alive = survivors(streams, 5);
    let log = old.log_text();
    assert!(log.contains("connection handover broke off"), "{log}");
    let summed = wait_for(Duration::from_secs(10), || {
        old.log_text().contains("handed_over=5 kept=15").then_some(())
    });
    assert!(summed.is_some(), "the old daemon sums up:\n{}", old.log_text());
    assert_eq!(handed_over(&old), 5, "five entries ended as handed over");
    // The kernel table agrees with the survivor's: fifteen, then none.
    let agree =
        wait_for(Duration::from_secs(20), || (kernel_deliveries(&old.pin_dir) == 15).then_some(()));
    assert!(
        agree.is_some(),
        "kernel deliveries {} (the old daemon holds 15)",
        kernel_deliveries(&old.pin_dir)
    );
    for (i, s) in alive.into_iter().enumerate() {
        let n = s.finish(false).unwrap_or_else(|e| panic!("survivor {i}: {e}"));
        assert!(n > 0);
    }
    // Holding none, the old daemon exits, long before its deadline.
    assert!(old.proc.wait_timeout(Duration::from_secs(30)).is_some(), "{}", old.log_text());
    assert!(!old.log_text().contains("drain deadline reached"), "{}", old.log_text());
    let emptied =
        wait_for(Duration::from_secs(20), || (kernel_deliveries(&old.pin_dir) == 0).then_some(()));
    assert!(emptied.is_some(), "kernel deliveries left: {}", kernel_deliveries(&old.pin_dir));
}

#[test]
fn an_old_daemon_killed_mid_handover_loses_only_what_it_still_held() {
    if !require_root("an_old_daemon_killed_mid_handover_loses_only_what_it_still_held") {
        return;
    }
    let topo = Topology::build(2, 2).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    // The old daemon offers five connections, then hangs before the sixth.
    let node = topo.node(0).clone();
    let pin_dir = topo.pin_dir("n0");
    let mut old = Daemon::start_with_env(
        &topo,
        &node,
        &pin_dir,
        &inv,
        &["--drain-timeout", "60"],
        &[("FAILPOINTS", "handover-offer=5*off->return")],
    );
    let local = local_server(&topo);
    let streams = local_trickles(&topo, local, 20);
    let new = Daemon::start_with_pin(&topo, &node, &pin_dir, &inv, &[]);
    old.proc.signal(nix::sys::signal::Signal::SIGTERM);
    wait_holds(&new, 5);
    let held = wait_for(Duration::from_secs(10), || {
        (old.log_text().matches("fault injected").count() == 15).then_some(())
    });
    assert!(held.is_some(), "fifteen offers held:\n{}", old.log_text());
    // SIGKILL: what it still held ends with it; what it handed over lives.
    old.proc.kill();
    let alive = survivors(streams, 15);
    let summed = wait_for(Duration::from_secs(10), || {
        new.log_text().contains("taken=5 refused=0").then_some(())
    });
    assert!(summed.is_some(), "the new daemon sums up:\n{}", new.log_text());
    assert_eq!(routes(&new), ["local"; 5], "the new daemon holds the five");
    let agree =
        wait_for(Duration::from_secs(30), || (kernel_deliveries(&pin_dir) == 5).then_some(()));
    assert!(
        agree.is_some(),
        "kernel deliveries {} (the new daemon holds 5)",
        kernel_deliveries(&pin_dir)
    );
    // The survivor serves new connections too.
    netkit::echo_exchange(&topo.pod(0, 0).netns, local, 64 * 1024).expect("a fresh connection");
    for (i, s) in alive.into_iter().enumerate() {
        let n = s.finish(false).unwrap_or_else(|e| panic!("survivor {i}: {e}"));
        assert!(n > 0);
    }
    let gone = wait_for(Duration::from_secs(10), || routes(&new).is_empty().then_some(()));
    assert!(gone.is_some(), "entries end with their connections: {:?}", routes(&new));
    let emptied =
        wait_for(Duration::from_secs(20), || (kernel_deliveries(&pin_dir) == 0).then_some(()));
    assert!(emptied.is_some(), "kernel deliveries left: {}", kernel_deliveries(&pin_dir));
}
