//! Tunnel streams survive an upgrade of either node's daemon (issue 14,
//! the tunnel-stream bullet; docs/PROTOCOL.md §6): enrolled pods on two
//! nodes talk through the tunnel — a trickle (1 KiB every 100 ms), an idle
//! connection and a paced bulk stream — while first the source node's
//! daemon and then the destination node's is replaced. Each stream is
//! quiesced on the old tunnel connection, its app socket handed to the new
//! daemon, and resumed over a new tunnel connection with a new handshake:
//! every byte comes back intact and in order, the old daemons exit at once
//! (nothing left to drain), the new ones list the streams, and each side
//! logs the resume. For TCP (HBONE) and for QUIC. The failure cases: a stream nobody resumes
//! within the bound is closed; a stream whose peer does not answer the
//! QUIESCE stays with the old daemon and goes on. (A stream offer the new
//! daemon refuses: tests/handover.rs.)

use std::{net::SocketAddr, time::Duration};

use netkit::{
    echo_server, require_root, wait_for, write_inventory, Daemon, EchoStream, Role, Topology,
};

const KIB: u64 = 1024;

/// The tunnel connections `d` holds.
fn tunnels(d: &Daemon) -> usize {
    d.config_dump()["connections"]
        .as_array()
        .expect("connections")
        .iter()
        .filter(|c| c["route"] == "tunnel")
        .count()
}

/// Replaces `old`, asserting it handed everything over and did not drain.
fn replace(topo: &Topology, old: Daemon, extra: &[&str]) -> Daemon {
    let (new, log) = old.replace(topo, extra);
    assert!(log.contains("handing connections over to the new daemon"), "{log}");
    assert!(!log.contains("drain deadline reached"), "nothing was left to drain:\n{log}");
    assert!(!log.contains("resumable tunnel stream closed"), "{log}");
    new
}

fn streams_survive_an_upgrade_of_either_node(transport: &str) {
    let topo = Topology::build(2, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let extra = ["--drain-timeout", "120", "--transport", transport];
    let d0 = Daemon::start(&topo, 0, &inv, &extra);
    let d1 = Daemon::start(&topo, 1, &inv, &extra);
    let client = topo.pod(0, 0).clone();
    let dst = SocketAddr::new(topo.pod(1, 0).ip4.into(), 7000);
    echo_server(&topo.pod(1, 0).netns, dst);
    let trickle = EchoStream::start(&client.netns, dst, 1024, Duration::from_millis(100), u64::MAX)
        .expect("a trickle");
    let idle = EchoStream::start(&client.netns, dst, 1, Duration::from_secs(3600), u64::MAX)
        .expect("an idle connection");
    // 512 MiB, paced at most 16 KiB per millisecond (32 s or more), so that
    // it is in full flow at both upgrades.
    let bulk_total = 512 << 20;
    let bulk =
        EchoStream::start(&client.netns, dst, 16 * 1024, Duration::from_millis(1), bulk_total)
            .expect("a bulk stream");
    for (what, s) in [("trickle", &trickle), ("idle", &idle), ("bulk", &bulk)] {
        assert!(s.wait_echoed(1, Duration::from_secs(10)), "{what}: no echo before the upgrades");
    }
    let three = wait_for(Duration::from_secs(10), || {
        (tunnels(&d0) == 3 && tunnels(&d1) == 3).then_some(())
    });
    assert!(
        three.is_some(),
        "three tunnel streams on each node: {} and {}",
        tunnels(&d0),
        tunnels(&d1)
    );

    // The source node's daemon moves.
    let d0 = replace(&topo, d0, &extra);
    let at = trickle.echoed();
    assert!(
        trickle.wait_echoed(at + 5 * KIB, Duration::from_secs(10)),
        "the trickle goes on after the source's upgrade ({} bytes)",
        trickle.echoed()
    );
    assert_eq!(tunnels(&d0), 3, "the new source daemon holds the streams");
    assert!(d0.log_text().contains("tunnel stream resumed"), "{}", d0.log_text());
    assert!(d1.log_text().contains("tunnel stream resumed by the peer"), "{}", d1.log_text());
    assert!(bulk.echoed() < bulk_total, "the bulk stream is still running at the second upgrade");

    // Then the destination node's.
    let d1 = replace(&topo, d1, &extra);
    let at = trickle.echoed();
    assert!(
        trickle.wait_echoed(at + 5 * KIB, Duration::from_secs(10)),
        "the trickle goes on after the destination's upgrade ({} bytes)",
        trickle.echoed()
    );
    assert_eq!(tunnels(&d1), 3, "the new destination daemon holds the streams");
    assert!(d1.log_text().contains("tunnel stream resumed by the peer"), "{}", d1.log_text());

    let moved = bulk.finish(true).expect("the bulk stream came back intact");
    assert_eq!(moved, bulk_total);
    for (what, s) in [("trickle", trickle), ("idle", idle)] {
        let n = s.finish(false).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(n > 0, "{what}: nothing moved");
    }
    let gone = wait_for(Duration::from_secs(10), || {
        (tunnels(&d0) == 0 && tunnels(&d1) == 0).then_some(())
    });
    assert!(gone.is_some(), "entries end with their streams");
    for d in [&d0, &d1] {
        assert!(!d.log_text().contains("resumable tunnel stream closed"), "{}", d.log_text());
    }
}

#[test]
fn tcp_tunnel_streams_survive_an_upgrade_of_either_node() {
    if !require_root("tcp_tunnel_streams_survive_an_upgrade_of_either_node") {
        return;
    }
    streams_survive_an_upgrade_of_either_node("tcp");
}

#[test]
fn quic_tunnel_streams_survive_an_upgrade_of_either_node() {
    if !require_root("quic_tunnel_streams_survive_an_upgrade_of_either_node") {
        return;
    }
    streams_survive_an_upgrade_of_either_node("quic");
}

/// Two nodes, a daemon each (node 0's with a 120 s drain), and one trickle
/// (1 KiB every 100 ms) from node 0's pod to an echo server on node 1's.
struct One {
    topo: Topology,
    inv: std::path::PathBuf,
    d0: Daemon,
    d1: Daemon,
    s: EchoStream,
}

fn one_trickle_across() -> One {
    let topo = Topology::build(2, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let d0 = Daemon::start(&topo, 0, &inv, &["--drain-timeout", "120"]);
    let d1 = Daemon::start(&topo, 1, &inv, &[]);
    let dst = SocketAddr::new(topo.pod(1, 0).ip4.into(), 7000);
    echo_server(&topo.pod(1, 0).netns, dst);
    let s =
        EchoStream::start(&topo.pod(0, 0).netns, dst, 1024, Duration::from_millis(100), u64::MAX)
            .expect("a trickle");
    assert!(s.wait_echoed(2 * KIB, Duration::from_secs(10)), "echo before");
    One { topo, inv, d0, d1, s }
}

/// A paused stream that nobody resumes within the bound is closed, as
/// without the extension: the source's new daemon cannot reach the
/// destination (its certificates are from another CA, so every RESUME
/// handshake fails), the destination closes its side after 10 s, the
/// client sees its connection end.
#[test]
fn a_stream_not_resumed_within_the_bound_is_closed() {
    if !require_root("a_stream_not_resumed_within_the_bound_is_closed") {
        return;
    }
    let One { topo, d0, d1, s, .. } = one_trickle_across();
    let other_ca = topo.scratch_dir().join("other-ca");
    let out = std::process::Command::new(netkit::tlsmesh_bin())
        .args(["ca", "init", "--trust-domain", "cluster.local", "--dir"])
        .arg(&other_ca)
        .output()
        .expect("tlsmesh ca init");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let other_ca = other_ca.display().to_string();
    let (d0, _) = d0.replace(&topo, &["--ca-dir", &other_ca]);
    let closed = wait_for(Duration::from_secs(30), || s.closed().then_some(()));
    assert!(closed.is_some(), "the client's connection ended ({} bytes echoed)", s.echoed());
    let log1 = d1.log_text();
    assert!(log1.contains("not resumed within"), "the destination gave up at the bound:\n{log1}");
    let log0 = d0.log_text();
    assert!(log0.contains("resumable tunnel stream closed"), "{log0}");
    assert!(!log0.contains("tunnel stream resumed"), "{log0}");
}

/// A peer that does not answer the QUIESCE (here: its daemon is stopped
/// with SIGSTOP for a few seconds) keeps the stream where it was: the
/// moving daemon gives up after 4 s, relays the stream on itself and
/// drains as without the extension; once the peer runs again, the stream
/// goes on over the old tunnel connection, every byte intact, and the old
/// daemon exits when the stream ends.
#[test]
fn a_stream_whose_peer_does_not_answer_the_quiesce_stays_with_the_old_daemon() {
    use nix::sys::signal::Signal;
    if !require_root("a_stream_whose_peer_does_not_answer_the_quiesce_stays_with_the_old_daemon") {
        return;
    }
    let One { topo, mut d0, d1, s, inv } = one_trickle_across();
    let node = topo.node(0).clone();
    let new = Daemon::start_with_pin(&topo, &node, &d0.pin_dir, &inv, &[]);
    d1.proc.signal(Signal::SIGSTOP);
    d0.proc.signal(Signal::SIGTERM);
    let kept = wait_for(Duration::from_secs(20), || {
        d0.log_text().contains("could not be quiesced").then_some(())
    });
    d1.proc.signal(Signal::SIGCONT);
    let log = d0.log_text();
    assert!(kept.is_some(), "the old daemon keeps the stream:\n{log}");
    assert!(log.contains("did not answer the QUIESCE within 4s"), "it says why:\n{log}");
    let at = s.echoed();
    assert!(
        s.wait_echoed(at + 20 * KIB, Duration::from_secs(20)),
        "the stream goes on over the old connection ({} bytes)",
        s.echoed()
    );
    assert!(!s.closed(), "the stream is still open");
    let n = s.finish(false).expect("every byte came back, in order");
    assert!(n > at);
    // Holding nothing more, the old daemon exits before its deadline.
    assert!(d0.proc.wait_timeout(Duration::from_secs(30)).is_some(), "{}", d0.log_text());
    let log = d0.log_text();
    assert!(!log.contains("drain deadline reached"), "{log}");
    assert!(!log.contains("resumable tunnel stream closed"), "{log}");
    assert!(!d1.log_text().contains("resumable tunnel stream closed"), "{}", d1.log_text());
    assert_eq!(tunnels(&new), 0, "the new daemon holds no stream");
}
