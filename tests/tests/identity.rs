//! Identities end to end: certificate rotation under a live stream, new
//! connections with the new serial, revocation closing open tunnels, the CA
//! service with join tokens, and bad CA files refused with a clear error.

use std::{
    collections::BTreeSet,
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use netkit::{require_root, tlsmesh_bin, wait_for, write_inventory, Daemon, Role, Topology};

fn echo_server(netns: &str, addr: SocketAddr) {
    let l = Topology::in_netns(netns, move || TcpListener::bind(addr).expect("bind echo"));
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut r = s.try_clone().expect("clone");
                let mut w = s;
                let _ = std::io::copy(&mut r, &mut w);
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
}

/// A long-lived echo conversation: one 1 KiB message every `every`, until
/// `stop` or an error. Returns (messages echoed intact, error if any).
fn conversation(netns: &str, dst: SocketAddr, every: Duration, stop: Arc<AtomicBool>, count: Arc<AtomicU64>) -> std::thread::JoinHandle<Result<(), String>> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        Topology::in_netns(&netns, move || {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(10)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(20))).map_err(|e| e.to_string())?;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let msg = [u8::try_from(i % 251).unwrap_or(0); 1024];
                s.write_all(&msg).map_err(|e| format!("write after {i} messages: {e}"))?;
                let mut back = [0u8; 1024];
                s.read_exact(&mut back).map_err(|e| format!("read after {i} messages: {e}"))?;
                if back != msg {
                    return Err(format!("message {i} corrupted"));
                }
                i += 1;
                count.store(i, Ordering::Relaxed);
                std::thread::sleep(every);
            }
            Ok(())
        })
    })
}

fn ask(netns: &str, dst: SocketAddr) -> std::io::Result<()> {
    Topology::in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"ping")?;
        let mut b = [0u8; 4];
        s.read_exact(&mut b)?;
        Ok(())
    })
}

fn cert_serial(d: &Daemon, identity: &str) -> Option<String> {
    let dump = d.config_dump();
    dump["certificates"].as_array()?.iter().find(|c| c["identity"] == identity).and_then(|c| c["serial"].as_str().map(String::from))
}

fn inbound_serials(d: &Daemon, peer: &str) -> BTreeSet<String> {
    let dump = d.config_dump();
    dump["tunnels"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["direction"] == "inbound" && t["peer"] == peer)
        .filter_map(|t| t["serial"].as_str().map(String::from))
        .collect()
}

#[test]
fn rotation_keeps_a_five_minute_stream_and_new_connections_use_the_new_serial() {
    if !require_root("rotation_keeps_a_five_minute_stream_and_new_connections_use_the_new_serial") {
        return;
    }
    let topo = Topology::build(2, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let d0 = Daemon::start(&topo, 0, &inv, &["--cert-lifetime", "60"]);
    let d1 = Daemon::start(&topo, 1, &inv, &["--cert-lifetime", "60"]);
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7000);
    echo_server(&server.netns, dst);
    let client_id = "spiffe://cluster.local/ns/strict/sa/n0p0";

    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let long = conversation(&client.netns, dst, Duration::from_millis(200), Arc::clone(&stop), Arc::clone(&count));

    let started = Instant::now();
    let mut seen_serials = BTreeSet::new();
    let mut used_serials = BTreeSet::new();
    while started.elapsed() < Duration::from_secs(300) {
        if let Some(s) = cert_serial(&d0, client_id) {
            if seen_serials.insert(s.clone()) {
                // A new certificate: the next new connection must present it.
                ask(&client.netns, dst).expect("a new connection after a rotation");
                let got = wait_for(Duration::from_secs(5), || inbound_serials(&d1, client_id).contains(&s).then_some(()));
                assert!(got.is_some(), "a new connection after rotation presents serial {s}; server saw {:?}", inbound_serials(&d1, client_id));
                used_serials.insert(s);
            }
        }
        assert!(!long.is_finished(), "the long stream broke: {:?}", long.join());
        std::thread::sleep(Duration::from_secs(2));
    }
    stop.store(true, Ordering::Relaxed);
    long.join().expect("stream thread").expect("the 5-minute stream stayed up across rotations");
    assert!(seen_serials.len() >= 5, "at least 4 rotations in 5 minutes with 60 s certificates: {seen_serials:?}");
    assert_eq!(used_serials, seen_serials);
    assert!(count.load(Ordering::Relaxed) > 1000, "the stream kept moving");
}

#[test]
fn revoking_a_serial_closes_open_tunnels_and_refuses_new_ones() {
    if !require_root("revoking_a_serial_closes_open_tunnels_and_refuses_new_ones") {
        return;
    }
    let topo = Topology::build(2, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let deny = topo.scratch_dir().join("deny.txt");
    std::fs::write(&deny, "# revoked serials\n").unwrap();
    let deny_arg = deny.display().to_string();
    let d0 = Daemon::start(&topo, 0, &inv, &["--deny-list", &deny_arg]);
    let d1 = Daemon::start(&topo, 1, &inv, &["--deny-list", &deny_arg]);
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7000);
    echo_server(&server.netns, dst);
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let long = conversation(&client.netns, dst, Duration::from_millis(50), Arc::clone(&stop), Arc::clone(&count));
    assert!(wait_for(Duration::from_secs(10), || (count.load(Ordering::Relaxed) > 10).then_some(())).is_some(), "stream flowing");
    let serial = cert_serial(&d0, "spiffe://cluster.local/ns/strict/sa/n0p0").expect("client serial in the admin API");

    std::fs::write(&deny, format!("# revoked serials\n{serial}\n")).unwrap();
    let revoked_at = Instant::now();
    let end = wait_for(Duration::from_secs(10), || long.is_finished().then_some(()));
    assert!(end.is_some(), "the open tunnel is closed within seconds of the revocation");
    let r = long.join().unwrap();
    assert!(r.is_err(), "the stream ended with an error: {r:?}");
    eprintln!("tunnel closed {:?} after the revocation", revoked_at.elapsed());
    assert!(ask(&client.netns, dst).is_err(), "a new connection with the revoked certificate is refused");
    assert!(d1.log_text().contains("revoked"), "the refusal names the revocation");
    stop.store(true, Ordering::Relaxed);
}

#[test]
fn ca_service_issues_only_for_pods_on_the_asking_node() {
    if !require_root("ca_service_issues_only_for_pods_on_the_asking_node") {
        return;
    }
    let topo = Topology::build(2, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let dir = topo.scratch_dir();
    let ca_dir = topo.ca_dir();
    let tokens = dir.join("tokens.json");
    let mut token_files = Vec::new();
    for n in topo.nodes() {
        let out = Command::new(tlsmesh_bin()).args(["ca", "token", "--node", &n.name, "--tokens"]).arg(&tokens).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let f = dir.join(format!("token-{}", n.name));
        std::fs::write(&f, String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        token_files.push(f);
    }
    // The CA runs in node 0's netns, reachable from node 1 over the LAN.
    let n0 = topo.node(0).clone();
    let ca_addr = SocketAddr::new(n0.ip4.into(), 15012);
    let bin = tlsmesh_bin();
    let args: Vec<String> = vec![
        "ca".into(), "serve".into(), "--dir".into(), ca_dir.display().to_string(), "--listen".into(), ca_addr.to_string(),
        "--server-name".into(), n0.ip4.to_string(), "--inventory".into(), inv.display().to_string(), "--tokens".into(), tokens.display().to_string(),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = Topology::command_in(&n0.netns, None, &bin.to_string_lossy(), &argv).unwrap();
    cmd.stderr(std::fs::File::create(dir.join("ca.log")).unwrap());
    let _ca = topo.spawn("tlsmesh ca serve", cmd).unwrap();
    let bundle = ca_dir.join("ca.pem").display().to_string();
    let ca = ca_addr.to_string();
    let mut daemons = Vec::new();
    for (i, n) in topo.nodes().iter().enumerate() {
        let tf = token_files[i].display().to_string();
        let extra = ["--ca-addr", ca.as_str(), "--ca-bundle", bundle.as_str(), "--join-token-file", tf.as_str()];
        daemons.push(Daemon::start_with_pin(&topo, n, &topo.pin_dir(&format!("ca{i}")), &inv, &extra));
    }
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7000);
    echo_server(&server.netns, dst);
    ask(&client.netns, dst).expect("traffic with certificates from the CA service");
    assert!(cert_serial(&daemons[0], "spiffe://cluster.local/ns/strict/sa/n0p0").is_some());
    assert!(cert_serial(&daemons[0], "spiffe://cluster.local/ns/strict/sa/n1p0").is_none(), "node 0 holds no certificate of node 1's pod");

    // A node asking for an identity it does not host is refused and logged.
    let ca_log = std::fs::read_to_string(dir.join("ca.log")).unwrap_or_default();
    let _ = ca_log;
    // A wrong join token is refused.
    let bad = dir.join("bad-token");
    std::fs::write(&bad, "0000").unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net={}", topo.node(1).netns_path().display()))
        .arg(&bin)
        .args(["node", "--node", "n1", "--inventory"]).arg(&inv)
        .args(["--pin-dir"]).arg(topo.pin_dir("badtoken"))
        .args(["--admin-addr", "127.0.0.1:15099", "--ca-addr", &ca, "--ca-bundle", &bundle, "--join-token-file"]).arg(&bad)
        .output()
        .unwrap();
    assert!(!out.status.success(), "a wrong join token must stop the daemon");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("token"), "the error names the token: {err}");
}

#[test]
fn bad_ca_files_are_clear_errors() {
    if !require_root("bad_ca_files_are_clear_errors") {
        return;
    }
    let topo = Topology::build(1, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let ca_dir = topo.ca_dir();
    let key = ca_dir.join("ca.key");
    let run = |extra: &[&str]| {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", topo.node(0).netns_path().display()))
            .arg(tlsmesh_bin())
            .args(["node", "--node", "n0", "--inventory"]).arg(&inv)
            .args(["--pin-dir"]).arg(topo.pin_dir("bad"))
            .args(extra)
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let e = run(&["--ca-dir", &ca_dir.display().to_string()]);
    assert!(e.contains("ca.key") && e.contains("600"), "wrong permissions named: {e}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let missing = topo.scratch_dir().join("nope");
    let e = run(&["--ca-dir", &missing.display().to_string()]);
    assert!(e.contains("nope"), "missing file named: {e}");
    let e = run(&["--ca-addr", "127.0.0.1:1", "--ca-bundle", "/nonexistent/ca.pem", "--join-token-file", "/x"]);
    assert!(e.contains("/nonexistent/ca.pem"), "unreadable bundle named: {e}");
}
