//! Capture plane, end to end in network namespaces with a real daemon:
//! outbound capture (IPv4 and IPv6), what is not captured, inbound strict and
//! permissive, fail closed across a daemon kill and restart, uninstall,
//! 1,000 concurrent connections, pod churn, bad inventories.

#![allow(
    clippy::similar_names,
    clippy::many_single_char_names,
    clippy::cast_possible_truncation,
    clippy::format_push_string,
    clippy::items_after_statements,
    clippy::large_stack_arrays,
    clippy::too_many_lines,
    clippy::format_collect,
    reason = "test scenarios: long, explicit, with throwaway names"
)]

use std::{
    io::{Read, Write},
    net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream},
    process::Command,
    time::Duration,
};

use netkit::{require_root, wait_for, write_inventory, Daemon, Pod, Role, Topology};
use sha2::{Digest, Sha256};

/// A server in `netns` that reads until EOF and answers `<sha256> <peer>`.
fn hash_server(netns: &str, addr: SocketAddr) {
    let l = Topology::in_netns(netns, move || TcpListener::bind(addr).expect("bind hash server"));
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let peer = s.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                let mut h = Sha256::new();
                let mut buf = vec![0u8; 256 * 1024];
                loop {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => h.update(&buf[..n]),
                    }
                }
                let _ = write!(s, "{:x} {peer}", h.finalize());
            });
        }
    });
}

struct Sent {
    local_hash: String,
    server_hash: String,
    server_saw: String,
    peer_seen_by_client: SocketAddr,
}

/// Connects from `netns` to `dst`, streams `len` pseudo-random bytes, half-closes,
/// reads the server's answer.
fn send(netns: &str, dst: SocketAddr, len: usize) -> std::io::Result<Sent> {
    Topology::in_netns(netns, move || -> std::io::Result<Sent> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let peer_seen_by_client = s.peer_addr()?;
        let mut h = Sha256::new();
        let mut chunk = vec![0u8; 256 * 1024];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut left = len;
        while left > 0 {
            for b in &mut chunk {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            let n = left.min(chunk.len());
            s.write_all(&chunk[..n])?;
            h.update(&chunk[..n]);
            left -= n;
        }
        s.shutdown(Shutdown::Write)?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        let (server_hash, server_saw) = answer.split_once(' ').unwrap_or((&answer, ""));
        Ok(Sent {
            local_hash: format!("{:x}", h.finalize()),
            server_hash: server_hash.to_string(),
            server_saw: server_saw.to_string(),
            peer_seen_by_client,
        })
    })
}

fn ip_of(p: &Pod, v6: bool) -> IpAddr {
    netkit::pod_ip(p, v6)
}

#[test]
fn enrolled_pod_outbound_is_captured_v4_and_v6() {
    if !require_root("enrolled_pod_outbound_is_captured_v4_and_v6") {
        return;
    }
    let topo = Topology::build(2, 1).expect("topology");
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let inv = write_inventory(&topo, "inv.toml", &|p| {
        if p.name == "n0p0" {
            Role::Permissive
        } else {
            Role::Plain
        }
    });
    let d = Daemon::start(&topo, 0, &inv, &[]);
    for v6 in [false, true] {
        let dst = SocketAddr::new(ip_of(&server, v6), 9000 + u16::from(v6));
        hash_server(&server.netns, dst);
        let before = d.counter("outbound_accepted");
        let len = if v6 { 8 << 20 } else { 64 << 20 };
        let r = send(&client.netns, dst, len).expect("send through the daemon");
        assert_eq!(r.server_hash, r.local_hash, "bytes arrive intact ({len} bytes, v6={v6})");
        assert_eq!(r.peer_seen_by_client, dst, "getpeername shows the original destination");
        assert_eq!(
            r.server_saw,
            ip_of(&client, v6).to_string(),
            "passthrough leaves with the pod's own address"
        );
        assert_eq!(d.counter("outbound_accepted"), before + 1, "the daemon carried it (v6={v6})");
    }
    assert!(d.counter("outbound_passthrough") >= 2);
    assert!(d.kernel_counter("captured") >= 2);
}

#[test]
fn unenrolled_pods_the_node_and_the_daemon_are_not_captured() {
    if !require_root("unenrolled_pods_the_node_and_the_daemon_are_not_captured") {
        return;
    }
    let topo = Topology::build(2, 2).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|p| {
        if p.name == "n0p0" {
            Role::Strict
        } else {
            Role::Plain
        }
    });
    let d = Daemon::start(&topo, 0, &inv, &[]);
    let server = topo.pod(1, 0).clone();
    let dst = SocketAddr::new(server.ip4.into(), 9100);
    hash_server(&server.netns, dst);
    let node0 = topo.node(0).clone();
    let base = d.counter("outbound_accepted");
    // A pod that is not enrolled, and a process in the node netns.
    for ns in [topo.pod(0, 1).netns.clone(), node0.netns.clone()] {
        let r = send(&ns, dst, 1 << 20).expect("direct connection");
        assert_eq!(r.server_hash, r.local_hash);
    }
    assert_eq!(d.counter("outbound_accepted"), base, "nothing went through the daemon");
    // The daemon's own connects (its passthrough leg from inside the enrolled
    // pod's netns) carry its mark and are skipped by the program.
    let skipped = d.kernel_counter("daemon_skipped");
    let r = send(&topo.pod(0, 0).netns, dst, 1 << 20).expect("captured");
    assert_eq!(r.server_hash, r.local_hash);
    assert_eq!(d.counter("outbound_accepted"), base + 1);
    assert!(
        d.kernel_counter("daemon_skipped") > skipped,
        "the daemon's own connect was recognised and left alone"
    );
}

#[test]
fn inbound_strict_refuses_plaintext_permissive_counts_it_probes_pass() {
    if !require_root("inbound_strict_refuses_plaintext_permissive_counts_it_probes_pass") {
        return;
    }
    let topo = Topology::build(2, 2).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|p| match p.name.as_str() {
        "n1p0" => Role::Strict,
        "n1p1" => Role::Permissive,
        _ => Role::Plain,
    });
    let d1 = Daemon::start(&topo, 1, &inv, &[]);
    let (strict, permissive) = (topo.pod(1, 0).clone(), topo.pod(1, 1).clone());
    let outsider = topo.pod(0, 0).clone();
    for v6 in [false, true] {
        let s_addr = SocketAddr::new(ip_of(&strict, v6), 8080);
        let p_addr = SocketAddr::new(ip_of(&permissive, v6), 8080);
        hash_server(&strict.netns, s_addr);
        hash_server(&permissive.netns, p_addr);

        let refused_before = d1.counter("inbound_plaintext_refused");
        let r = send(&outsider.netns, s_addr, 64 * 1024);
        assert!(
            r.as_ref().map_or(true, |s| s.server_hash.is_empty()),
            "plaintext to a strict pod must not reach the app (v6={v6})"
        );
        assert_eq!(d1.counter("inbound_plaintext_refused"), refused_before + 1);

        let acc_before = d1.counter("inbound_plaintext_accepted");
        let r = send(&outsider.netns, p_addr, 1 << 20).expect("permissive accepts plaintext");
        assert_eq!(r.server_hash, r.local_hash);
        assert_eq!(
            d1.counter("inbound_plaintext_accepted"),
            acc_before + 1,
            "plaintext to permissive is counted"
        );
    }
    // A kubelet-style probe from the node itself reaches even the strict pod.
    let probe_before = d1.counter("inbound_probe_accepted");
    let r =
        send(&topo.node(1).netns, SocketAddr::new(strict.ip4.into(), 8080), 1024).expect("probe");
    assert_eq!(r.server_hash, r.local_hash);
    assert_eq!(d1.counter("inbound_probe_accepted"), probe_before + 1);
    assert!(d1.kernel_counter("inbound_steered") >= 5);
}

fn link_ids(pin_dir: &std::path::Path) -> Vec<u64> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(pin_dir).expect("pin dir").flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("link_") || name.starts_with("sk_lookup_")) {
            continue;
        }
        let out = Command::new("bpftool")
            .args(["-j", "link", "show", "pinned"])
            .arg(e.path())
            .output()
            .expect("bpftool");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("bpftool json");
        ids.push(v["id"].as_u64().expect("link id"));
    }
    ids
}

#[test]
fn fail_closed_restart_readopts_uninstall_leaves_nothing() {
    if !require_root("fail_closed_restart_readopts_uninstall_leaves_nothing") {
        return;
    }
    let topo = Topology::build(2, 1).expect("topology");
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let inv = write_inventory(&topo, "inv.toml", &|p| {
        if p.name == "n0p0" {
            Role::Strict
        } else {
            Role::Plain
        }
    });
    let dst = SocketAddr::new(server.ip4.into(), 9200);
    hash_server(&server.netns, dst);
    let mut d = Daemon::start(&topo, 0, &inv, &[]);
    assert!(send(&client.netns, dst, 4096).is_ok());
    let links = link_ids(&d.pin_dir);
    assert_eq!(links.len(), 6, "5 cgroup links + 1 sk_lookup link pinned");

    d.proc.kill();
    let err =
        send(&client.netns, dst, 4096).err().expect("with the daemon dead the connect must fail");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    let node = topo.node(0).clone();
    let d2 = Daemon::start_with_pin(&topo, &node, &d.pin_dir, &inv, &[]);
    let r = send(&client.netns, dst, 1 << 20).expect("restarted daemon serves again");
    assert_eq!(r.server_hash, r.local_hash);
    let dump = d2.config_dump();
    assert_eq!(dump["capture"]["programs"]["tlsmesh_connect4"], "re-adopted", "{dump}");
    assert_eq!(link_ids(&d2.pin_dir), links, "the same links, not a second attachment");

    let pin_dir = d2.pin_dir.clone();
    let has_table = |ns: &str| {
        Command::new("ip")
            .args(["netns", "exec", ns, "nft", "list", "table", "inet", "tlsmesh"])
            .output()
            .expect("nft")
            .status
            .success()
    };
    let has_rule = |ns: &str| {
        let out = Command::new("ip").args(["-n", ns, "rule", "list"]).output().expect("ip rule");
        String::from_utf8_lossy(&out.stdout).contains("lookup 100")
    };
    assert!(has_table(&client.netns), "the daemon programs delivery in its strict pod");
    assert!(has_rule(&client.netns), "the daemon adds the delivery routing rule");
    drop(d2);
    let out = Command::new(netkit::tlsmesh_bin())
        .args(["node", "--uninstall", "--node", &node.name, "--inventory"])
        .arg(&inv)
        .arg("--pin-dir")
        .arg(&pin_dir)
        .output()
        .expect("uninstall");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!pin_dir.exists());
    assert!(!has_table(&client.netns), "uninstall removes the nftables table from the pod");
    assert!(!has_rule(&client.netns), "uninstall removes the delivery routing rule");
    let all = Command::new("bpftool").args(["-j", "link", "list"]).output().expect("bpftool");
    let all: serde_json::Value = serde_json::from_slice(&all.stdout).expect("json");
    let live: Vec<u64> =
        all.as_array().expect("array").iter().filter_map(|l| l["id"].as_u64()).collect();
    for id in links {
        assert!(!live.contains(&id), "link {id} still exists after uninstall");
    }
    // With the programs gone, the pod connects directly again (not captured).
    let r = send(&client.netns, dst, 4096).expect("direct after uninstall");
    assert_eq!(r.server_saw, client.ip4.to_string());
}

#[test]
fn thousand_concurrent_connections_from_one_pod() {
    if !require_root("thousand_concurrent_connections_from_one_pod") {
        return;
    }
    let topo = Topology::build(2, 1).expect("topology");
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let inv = write_inventory(&topo, "inv.toml", &|p| {
        if p.name == "n0p0" {
            Role::Permissive
        } else {
            Role::Plain
        }
    });
    let d = Daemon::start(&topo, 0, &inv, &[]);
    let dst = SocketAddr::new(server.ip4.into(), 9300);
    // An echo server that answers each connection with its first 8 bytes.
    let l = Topology::in_netns(&server.netns, move || TcpListener::bind(dst).expect("bind"));
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut b = [0u8; 8];
                if s.read_exact(&mut b).is_ok() {
                    let _ = s.write_all(&b);
                }
            });
        }
    });
    let base = d.counter("outbound_accepted");
    let ok = Topology::in_netns(&client.netns, move || {
        // Open all 1,000 first (concurrently open), then exchange on each.
        let mut conns = Vec::new();
        for i in 0u64..1000 {
            let s = TcpStream::connect_timeout(&dst, Duration::from_secs(10)).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            conns.push((i, s));
        }
        let mut ok = 0;
        for (i, s) in &mut conns {
            s.write_all(&i.to_le_bytes()).unwrap();
        }
        for (i, s) in &mut conns {
            let mut b = [0u8; 8];
            if s.read_exact(&mut b).is_ok() && u64::from_le_bytes(b) == *i {
                ok += 1;
            }
        }
        ok
    });
    assert_eq!(ok, 1000, "every concurrent captured connection completes");
    assert_eq!(d.counter("outbound_accepted"), base + 1000);
}

fn daemon_fds(d: &Daemon) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", d.proc.pid())).map_or(0, Iterator::count)
}

#[test]
fn pod_churn_leaks_nothing_and_bad_inventory_keeps_valid_pods() {
    if !require_root("pod_churn_leaks_nothing_and_bad_inventory_keeps_valid_pods") {
        return;
    }
    let topo = Topology::build(1, 100).expect("topology of 100 pods");
    let only_first = |p: &Pod| if p.name == "n0p0" { Role::Strict } else { Role::Absent };
    let inv = write_inventory(&topo, "inv.toml", &only_first);
    let d = Daemon::start(&topo, 0, &inv, &["--config", "/dev/null"]);
    let fds0 = daemon_fds(&d);
    let enrolled0 = d.kernel_counter("enrolled_netns");
    assert_eq!(enrolled0, 1);
    for round in 0..2 {
        write_inventory(&topo, "inv.toml", &|_| Role::Permissive);
        assert!(
            wait_for(Duration::from_secs(30), || (d.config_dump()["pods"]
                .as_array()
                .map_or(0, Vec::len)
                == 100)
                .then_some(()))
            .is_some(),
            "round {round}: 100 pods enrolled"
        );
        assert_eq!(d.kernel_counter("enrolled_netns"), 100);
        write_inventory(&topo, "inv.toml", &only_first);
        // The final state, not a count on the way there: the 100 permissive
        // pods are released one after the other before the strict one is set
        // up, so "1 pod" is also seen while the last permissive one is left.
        assert!(
            wait_for(Duration::from_secs(30), || {
                let pods = d.config_dump()["pods"].as_array().cloned().unwrap_or_default();
                let only = pods.len() == 1 && pods[0]["key"] == "strict/n0p0";
                (only && d.kernel_counter("enrolled_netns") == 1).then_some(())
            })
            .is_some(),
            "round {round}: back to 1 pod, enrolled: {}",
            d.config_dump()["pods"]
        );
    }
    assert!(
        wait_for(Duration::from_secs(10), || (daemon_fds(&d) <= fds0 + 2).then_some(())).is_some(),
        "fds: {} vs {fds0}",
        daemon_fds(&d)
    );
    assert_eq!(d.kernel_counter("enrolled_netns"), 1, "no leaked enrollment entries");
    let pins = std::fs::read_dir(&d.pin_dir)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("sk_lookup_"))
        .count();
    assert_eq!(pins, 1, "no leaked sk_lookup attachments");

    // Bad entries: a missing netns and a duplicate pod are reported, the valid pod is served.
    let mut text = std::fs::read_to_string(&inv).unwrap();
    text += "[[pod]]\nname = \"ghost\"\nnamespace = \"strict\"\nnode = \"n0\"\nips = [\"10.77.1.250\"]\nnetns = \"/run/netns/does-not-exist\"\n";
    text += "[[pod]]\nname = \"n0p0\"\nnamespace = \"strict\"\nnode = \"n0\"\nips = [\"10.77.1.251\"]\nnetns = \"/run/netns/x\"\n";
    std::fs::write(&inv, &text).unwrap();
    let problems = wait_for(Duration::from_secs(10), || {
        let p = d.config_dump()["problems"].as_array().cloned().unwrap_or_default();
        (p.len() == 2).then_some(p)
    })
    .expect("two problems reported");
    let all = format!("{problems:?}");
    assert!(all.contains("does-not-exist") && all.contains("duplicate pod"), "{all}");
    assert_eq!(
        d.config_dump()["pods"].as_array().unwrap().len(),
        1,
        "the valid pod is still served"
    );
    // A malformed file keeps the previous inventory.
    std::fs::write(&inv, "this is [not toml").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(d.config_dump()["pods"].as_array().unwrap().len(), 1);
    // Not ready while a listed pod cannot be enrolled, and it says which.
    let (code, why) = d.get("/healthz/ready").unwrap();
    assert_eq!(code, 503);
    assert!(why.to_string().contains("strict/ghost"), "{why}");
}

#[test]
fn same_node_enrolled_pods_skip_tls_and_a_vanishing_netns_is_survived() {
    if !require_root("same_node_enrolled_pods_skip_tls_and_a_vanishing_netns_is_survived") {
        return;
    }
    let topo = Topology::build(1, 3).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let d = Daemon::start(&topo, 0, &inv, &[]);
    let (client, server, doomed) =
        (topo.pod(0, 0).clone(), topo.pod(0, 1).clone(), topo.pod(0, 2).clone());
    let dst = SocketAddr::new(server.ip4.into(), 9400);
    hash_server(&server.netns, dst);
    let r = send(&client.netns, dst, 8 << 20).expect("same-node delivery");
    assert_eq!(r.server_hash, r.local_hash);
    assert_eq!(r.server_saw, client.ip4.to_string(), "the app sees the client pod's address");
    assert_eq!(d.counter("outbound_local"), 1, "delivered on the node");
    assert_eq!(d.counter("outbound_tunnel"), 0, "no TLS for same-node traffic");
    assert_eq!(d.counter("inbound_tunnel_accepted"), 0);

    // A pod's netns disappears under the running daemon.
    netkit::sh(&["ip", "netns", "del", &doomed.netns]).unwrap();
    // The final state: no longer served, and reported (waited for together:
    // they need not appear in the same instant).
    let gone = wait_for(Duration::from_secs(10), || {
        let dump = d.config_dump();
        let listed =
            dump["pods"].as_array().is_some_and(|p| p.iter().any(|x| x["key"] == "strict/n0p2"));
        let reported = format!("{}", dump["problems"]).contains("n0p2");
        (!listed && reported).then_some(dump)
    });
    assert!(gone.is_some(), "the vanished pod is released and reported: {}", d.config_dump());
    let log = d.log_text();
    let errors =
        log.lines().filter(|l| l.contains("cannot enroll pod") && l.contains("n0p2")).count();
    std::thread::sleep(Duration::from_secs(3));
    let later = d.log_text();
    let errors_later =
        later.lines().filter(|l| l.contains("cannot enroll pod") && l.contains("n0p2")).count();
    assert!(
        errors_later <= errors + 1,
        "the vanished pod is not logged about at every tick: {errors} then {errors_later} lines"
    );
    let mut d = d;
    assert!(d.proc.running(), "the daemon did not crash");
    let r = send(&client.netns, dst, 1 << 20).expect("the other pods are still served");
    assert_eq!(r.server_hash, r.local_hash);
}

/// The eBPF programs' decision log: off by default (nothing written), on
/// at run time through the admin API, where each captured connect, each
/// bypassed one and each inbound SYN steered or dropped appears in the
/// daemon's log with its reason and pod; off again.
#[test]
fn ebpf_decisions_are_logged_with_their_reason_when_switched_on() {
    if !require_root("ebpf_decisions_are_logged_with_their_reason_when_switched_on") {
        return;
    }
    let topo = Topology::build(2, 1).expect("topology");
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let inv = write_inventory(&topo, "inv.toml", &|p| {
        if p.name == "n0p0" {
            Role::Permissive
        } else {
            Role::Plain
        }
    });
    let config = topo.scratch_dir().join("bypass.toml");
    std::fs::write(&config, "bypass_ports = [9402]\n").expect("config");
    let d = Daemon::start(&topo, 0, &inv, &["--config", &config.display().to_string()]);
    assert_eq!(d.config_dump()["capture"]["decision_log"], "off", "off by default");
    let to = |port| SocketAddr::new(server.ip4.into(), port);
    for port in 9400..=9402 {
        hash_server(&server.netns, to(port));
    }
    let intact = |r: std::io::Result<Sent>, what: &str| {
        let r = r.unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(r.server_hash, r.local_hash, "{what}: bytes intact");
    };
    // While off, a captured connect is not logged (checked at the end, once
    // later records have arrived: the ring is read in order).
    intact(send(&client.netns, to(9400), 1024), "captured while the log is off");

    let (code, body) = d.post("/logging?ebpf=maybe").expect("admin API");
    assert_eq!(code, 400, "{body}");
    let (code, body) = d.post("/logging?ebpf=on").expect("admin API");
    assert_eq!((code, body["ebpf"].as_str()), (200, Some("on")), "{body}");
    assert_eq!(d.config_dump()["capture"]["decision_log"], "on");

    intact(send(&client.netns, to(9401), 1024), "captured");
    intact(send(&client.netns, to(9402), 1024), "a bypass port goes direct");
    // Loopback inside the pod is never captured (nothing listens there).
    let _ = send(&client.netns, "127.0.0.1:9403".parse().expect("addr"), 1);
    // Plaintext into the permissive pod from the other node: steered.
    let app = SocketAddr::new(client.ip4.into(), 8080);
    hash_server(&client.netns, app);
    intact(send(&server.netns, app, 1024), "plaintext into a permissive pod");
    // An address of the pod that no inventory entry has: no daemon
    // listener for it, the SYN is dropped.
    let extra = "10.77.0.200";
    netkit::sh(&["ip", "-n", &client.netns, "addr", "add", &format!("{extra}/32"), "dev", "eth0"])
        .expect("extra address");
    let node0 = topo.node(0).netns.clone();
    netkit::sh(&["ip", "-n", &node0, "route", "add", &format!("{extra}/32"), "dev", "p0"])
        .expect("route to it");
    let dropped = Topology::in_netns(&node0, move || {
        TcpStream::connect_timeout(
            &format!("{extra}:8080").parse().expect("addr"),
            Duration::from_secs(1),
        )
    });
    let err = dropped.expect_err("a SYN to an address the daemon does not serve is dropped");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused, "{err}");

    let pod = "pod=permissive/n0p0";
    let s = server.ip4.to_string();
    let c = client.ip4.to_string();
    let expected: Vec<Vec<String>> = vec![
        vec![
            "connect captured:".into(),
            format!("dst={s}:9401 "),
            "reason=enrolled".into(),
            pod.into(),
        ],
        vec![
            "connect bypassed:".into(),
            format!("dst={s}:9402 "),
            "reason=bypass-list".into(),
            pod.into(),
        ],
        vec![
            "connect bypassed:".into(),
            "dst=127.0.0.1:9403 ".into(),
            "reason=never-captured".into(),
            pod.into(),
        ],
        vec![
            "inbound SYN steered:".into(),
            format!("pod_ip={c} port=8080 "),
            "reason=enrolled".into(),
            pod.into(),
        ],
        vec![
            "inbound SYN dropped:".into(),
            format!("pod_ip={extra} port=8080 "),
            "reason=no-daemon-listener".into(),
            "pod=unknown".into(),
        ],
    ];
    let logged = |log: &str, parts: &[String]| {
        log.lines()
            .filter(|l| l.contains("tlsmesh::ebpf") && parts.iter().all(|p| l.contains(p.as_str())))
            .count()
    };
    let all = wait_for(Duration::from_secs(20), || {
        let log = d.log_text();
        expected.iter().all(|e| logged(&log, e) > 0).then_some(log)
    });
    let Some(log) = all else {
        let log = d.log_text();
        let missing: Vec<_> = expected.iter().filter(|e| logged(&log, e) == 0).collect();
        panic!("not logged: {missing:?}\n--- daemon log ---\n{log}");
    };
    assert_eq!(logged(&log, &[format!("dst={s}:9400 ")]), 0, "nothing was logged while off");

    // Off again: a captured connect is not logged; a marker after switching
    // back on shows the ring was read past it.
    let (code, body) = d.post("/logging?ebpf=off").expect("admin API");
    assert_eq!((code, body["ebpf"].as_str()), (200, Some("off")), "{body}");
    intact(send(&client.netns, to(9401), 1024), "captured with the log off again");
    let _ = d.post("/logging?ebpf=on").expect("admin API");
    intact(send(&client.netns, to(9402), 1024), "the marker");
    let marker = [format!("dst={s}:9402 ")];
    let log = wait_for(Duration::from_secs(20), || {
        let log = d.log_text();
        (logged(&log, &marker) >= 2).then_some(log)
    })
    .expect("the marker is logged");
    assert_eq!(logged(&log, &expected[0]), 1, "the connect made while off again was not logged");
    for l in log.lines().filter(|l| l.contains("tlsmesh::ebpf")) {
        eprintln!("{l}");
    }

    // A restarted daemon re-adopts the links (same code) and runs its own
    // load's instance in them, so it reads what they log: `--ebpf-log`
    // logs from the start.
    let (mut d, node) = (d, topo.node(0).clone());
    d.proc.kill();
    let args = ["--config", &config.display().to_string(), "--ebpf-log"];
    let d2 = Daemon::start_with_pin(&topo, &node, &d.pin_dir, &inv, &args);
    let dump = d2.config_dump();
    assert_eq!(dump["capture"]["programs"]["tlsmesh_connect4"], "re-adopted", "{dump}");
    assert_eq!(dump["capture"]["decision_log"], "on", "{dump}");
    intact(send(&client.netns, to(9401), 1024), "captured by the restarted daemon");
    wait_for(Duration::from_secs(20), || (logged(&d2.log_text(), &expected[0]) == 1).then_some(()))
        .unwrap_or_else(|| panic!("the restarted daemon logs nothing:\n{}", d2.log_text()));
}
