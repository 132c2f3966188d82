//! Identities end to end: certificate rotation under a live stream, new
//! connections with the new serial, revocation closing open tunnels, the CA
//! service with join tokens, and bad CA files refused with a clear error.

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
    collections::BTreeSet,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::Command,
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use netkit::{
    echo_server, require_root, tlsmesh_bin, wait_for, write_inventory, Daemon, Role, Topology,
};

/// A long-lived echo conversation: one 1 KiB message every `every`, until
/// `stop` or an error. Returns (messages echoed intact, error if any).
fn conversation(
    netns: &str,
    dst: SocketAddr,
    every: Duration,
    stop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> std::thread::JoinHandle<Result<(), String>> {
    let netns = netns.to_string();
    std::thread::spawn(move || {
        Topology::in_netns(&netns, move || {
            let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))
                .map_err(|e| e.to_string())?;
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
    dump["certificates"]
        .as_array()?
        .iter()
        .find(|c| c["identity"] == identity)
        .and_then(|c| c["serial"].as_str().map(String::from))
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
    let long = conversation(
        &client.netns,
        dst,
        Duration::from_millis(200),
        Arc::clone(&stop),
        Arc::clone(&count),
    );

    let started = Instant::now();
    let mut seen_serials = BTreeSet::new();
    let mut used_serials = BTreeSet::new();
    while started.elapsed() < Duration::from_secs(300) {
        if let Some(s) = cert_serial(&d0, client_id) {
            if seen_serials.insert(s.clone()) {
                // A new certificate: the next new connection must present it.
                ask(&client.netns, dst).expect("a new connection after a rotation");
                let got = wait_for(Duration::from_secs(5), || {
                    inbound_serials(&d1, client_id).contains(&s).then_some(())
                });
                assert!(
                    got.is_some(),
                    "a new connection after rotation presents serial {s}; server saw {:?}",
                    inbound_serials(&d1, client_id)
                );
                used_serials.insert(s);
            }
        }
        assert!(!long.is_finished(), "the long stream broke: {:?}", long.join());
        std::thread::sleep(Duration::from_secs(2));
    }
    stop.store(true, Ordering::Relaxed);
    long.join().expect("stream thread").expect("the 5-minute stream stayed up across rotations");
    assert!(
        seen_serials.len() >= 5,
        "at least 4 rotations in 5 minutes with 60 s certificates: {seen_serials:?}"
    );
    assert_eq!(used_serials, seen_serials);
    assert!(count.load(Ordering::Relaxed) > 1000, "the stream kept moving");
}

#[test]
fn revoking_a_serial_closes_open_tunnels_and_refuses_new_ones() {
    if !require_root("revoking_a_serial_closes_open_tunnels_and_refuses_new_ones") {
        return;
    }
    revocation_closes_open_tunnels("tcp");
}

#[test]
fn revoking_a_serial_closes_open_quic_tunnels_and_refuses_new_ones() {
    if !require_root("revoking_a_serial_closes_open_quic_tunnels_and_refuses_new_ones") {
        return;
    }
    revocation_closes_open_tunnels("quic");
}

#[test]
fn denying_the_destination_closes_pooled_outbound_connections() {
    if !require_root("denying_the_destination_closes_pooled_outbound_connections") {
        return;
    }
    for transport in ["tcp", "quic"] {
        // Only the client's daemon gets the deny list: the close must come
        // from its outbound side, not from the server's inbound side.
        let mut r = Revocation::start(transport, [true, false]);
        r.deny_and_expect_closed("spiffe://cluster.local/ns/strict/sa/n1p0\n");
        assert!(
            r.d0.log_text().contains("revoked destination"),
            "{transport}: the client's daemon says why it closed the connection"
        );
    }
}

fn revocation_closes_open_tunnels(transport: &str) {
    let mut r = Revocation::start(transport, [true, true]);
    let serial = cert_serial(&r.d0, "spiffe://cluster.local/ns/strict/sa/n0p0")
        .expect("client serial in the admin API");
    let dump = r.d1.config_dump();
    assert!(
        dump["tunnels"].as_array().into_iter().flatten().any(|t| t["direction"] == "inbound"
            && t["transport"] == transport
            && t["serial"] == serial.as_str()),
        "the server daemon lists the inbound {transport} tunnel with the client's serial: {}",
        dump["tunnels"]
    );
    r.deny_and_expect_closed(&format!("# revoked serials\n{serial}\n"));
    assert!(r.d1.log_text().contains("revoked"), "the refusal names the revocation");
    // The server counts the refused handshake per workload pair, flagged
    // revoked, on the transport it came over.
    let netns = r.d1.netns.clone();
    let page = netkit::Topology::in_netns(&netns, || {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect("127.0.0.1:15020").expect("metrics port");
        write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut page = String::new();
        s.read_to_string(&mut page).unwrap();
        page
    });
    let refused = page.lines().find(|l| {
        l.starts_with("tlsmesh_tcp_connections_failed_total{reporter=\"destination\"")
            && l.contains(&format!("transport=\"{transport}\""))
            && l.contains("response_flags=\"revoked\"")
    });
    assert!(
        refused.is_some_and(|l| !l.ends_with(" 0")),
        "{transport}: no revoked handshake counted by the server:\n{page}"
    );
    if transport == "quic" {
        let log = r.d1.log_text();
        assert!(
            log.lines()
                .any(|l| l.contains("QUIC tunnel handshake refused") && l.contains("revoked")),
            "the QUIC server logs the refused handshake with its reason:\n{log}"
        );
    }
}

/// A revocation scenario: two strict nodes on `transport`, an (empty) deny
/// list given to the daemons `deny_on` selects, an echo server in n1p0 and
/// a conversation from n0p0 that is flowing through the tunnel.
struct Revocation {
    transport: String,
    deny: std::path::PathBuf,
    d0: Daemon,
    d1: Daemon,
    client_netns: String,
    dst: SocketAddr,
    stop: Arc<AtomicBool>,
    long: Option<std::thread::JoinHandle<Result<(), String>>>,
    /// Declared last: dropped after the daemons.
    _topo: Topology,
}

impl Revocation {
    fn start(transport: &str, deny_on: [bool; 2]) -> Self {
        let topo = Topology::build(2, 1).expect("topology");
        let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
        let deny = topo.scratch_dir().join("deny.txt");
        std::fs::write(&deny, "# revoked\n").unwrap();
        let deny_arg = deny.display().to_string();
        let start = |n: usize| {
            let mut args = vec!["--transport", transport];
            if deny_on[n] {
                args.extend(["--deny-list", deny_arg.as_str()]);
            }
            Daemon::start(&topo, n, &inv, &args)
        };
        let (d0, d1) = (start(0), start(1));
        let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
        let dst = SocketAddr::new(server.ip4.into(), 7000);
        echo_server(&server.netns, dst);
        let stop = Arc::new(AtomicBool::new(false));
        let count = Arc::new(AtomicU64::new(0));
        let long = conversation(
            &client.netns,
            dst,
            Duration::from_millis(50),
            Arc::clone(&stop),
            Arc::clone(&count),
        );
        assert!(
            wait_for(Duration::from_secs(10), || (count.load(Ordering::Relaxed) > 10)
                .then_some(()))
            .is_some(),
            "{transport}: stream flowing"
        );
        Self {
            transport: transport.to_string(),
            deny,
            d0,
            d1,
            client_netns: client.netns,
            dst,
            stop,
            long: Some(long),
            _topo: topo,
        }
    }

    /// Writes `entries` to the deny list; the open conversation must end
    /// with an error within seconds and a new connection must be refused.
    fn deny_and_expect_closed(&mut self, entries: &str) {
        let t = self.transport.clone();
        std::fs::write(&self.deny, entries).unwrap();
        let denied_at = Instant::now();
        let long = self.long.take().expect("one denial per scenario");
        let end = wait_for(Duration::from_secs(10), || long.is_finished().then_some(()));
        assert!(end.is_some(), "{t}: the open tunnel is closed within seconds of the denial");
        eprintln!("{t}: tunnel closed {:?} after the denial", denied_at.elapsed());
        let r = long.join().unwrap();
        assert!(r.is_err(), "{t}: the stream ended with an error: {r:?}");
        assert!(
            ask(&self.client_netns, self.dst).is_err(),
            "{t}: a new connection to or from the denied peer is refused"
        );
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Drop for Revocation {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
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
        let out = Command::new(tlsmesh_bin())
            .args(["ca", "token", "--node", &n.name, "--tokens"])
            .arg(&tokens)
            .output()
            .unwrap();
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
        "ca".into(),
        "serve".into(),
        "--dir".into(),
        ca_dir.display().to_string(),
        "--listen".into(),
        ca_addr.to_string(),
        "--server-name".into(),
        n0.ip4.to_string(),
        "--inventory".into(),
        inv.display().to_string(),
        "--tokens".into(),
        tokens.display().to_string(),
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
        let extra = [
            "--ca-addr",
            ca.as_str(),
            "--ca-bundle",
            bundle.as_str(),
            "--join-token-file",
            tf.as_str(),
        ];
        daemons.push(Daemon::start_with_pin(
            &topo,
            n,
            &topo.pin_dir(&format!("ca{i}")),
            &inv,
            &extra,
        ));
    }
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7000);
    echo_server(&server.netns, dst);
    ask(&client.netns, dst).expect("traffic with certificates from the CA service");
    assert!(cert_serial(&daemons[0], "spiffe://cluster.local/ns/strict/sa/n0p0").is_some());
    assert!(
        cert_serial(&daemons[0], "spiffe://cluster.local/ns/strict/sa/n1p0").is_none(),
        "node 0 holds no certificate of node 1's pod"
    );

    // A node asking for an identity it does not host is refused and logged.
    let ca_log = std::fs::read_to_string(dir.join("ca.log")).unwrap_or_default();
    let _ = ca_log;
    // A wrong join token is refused.
    let bad = dir.join("bad-token");
    std::fs::write(&bad, "0000").unwrap();
    let out = Command::new("nsenter")
        .arg(format!("--net={}", topo.node(1).netns_path().display()))
        .arg(&bin)
        .args(["node", "--node", "n1", "--inventory"])
        .arg(&inv)
        .args(["--pin-dir"])
        .arg(topo.pin_dir("badtoken"))
        .args([
            "--admin-addr",
            "127.0.0.1:15099",
            "--ca-addr",
            &ca,
            "--ca-bundle",
            &bundle,
            "--join-token-file",
        ])
        .arg(&bad)
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
            .args(["node", "--node", "n0", "--inventory"])
            .arg(&inv)
            .args(["--pin-dir"])
            .arg(topo.pin_dir("bad"))
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
    let e = run(&[
        "--ca-addr",
        "127.0.0.1:1",
        "--ca-bundle",
        "/nonexistent/ca.pem",
        "--join-token-file",
        "/x",
    ]);
    assert!(e.contains("/nonexistent/ca.pem"), "unreadable bundle named: {e}");
}

fn fingerprint(pem_path: &std::path::Path) -> String {
    use sha2::Digest as _;
    let pem = std::fs::read_to_string(pem_path).unwrap();
    let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let der = decode_base64(&b64);
    sha2::Sha256::digest(&der).iter().take(8).map(|b| format!("{b:02x}")).collect()
}

fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => 0,
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| *c != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let mut n = 0u32;
        for (i, c) in chunk.iter().enumerate() {
            n |= val(*c) << (18 - 6 * i);
        }
        let k = chunk.len() * 6 / 8;
        for i in 0..k {
            out.push(u8::try_from((n >> (16 - 8 * i)) & 0xff).unwrap());
        }
    }
    out
}

fn roots_of(d: &Daemon) -> BTreeSet<String> {
    d.config_dump()["trust_roots"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(String::from))
        .collect()
}

#[test]
fn ca_rotation_runbook_without_interruption() {
    if !require_root("ca_rotation_runbook_without_interruption") {
        return;
    }
    let topo = Topology::build(2, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let dir = topo.scratch_dir();
    let bin = tlsmesh_bin();
    let old = topo.ca_dir();
    let new = dir.join("ca-new");
    let out = Command::new(&bin)
        .args(["ca", "init", "--trust-domain", "cluster.local", "--dir"])
        .arg(&new)
        .output()
        .unwrap();
    assert!(out.status.success());
    // The CA serves from a "live" directory the runbook edits.
    let live = dir.join("ca-live");
    std::fs::create_dir_all(&live).unwrap();
    let install = |from: &std::path::Path, bundle: &[&std::path::Path]| {
        use std::os::unix::fs::PermissionsExt;
        for f in ["ca.pem", "ca.key"] {
            let tmp = live.join(format!("{f}.tmp"));
            std::fs::copy(from.join(f), &tmp).unwrap();
            std::fs::set_permissions(
                &tmp,
                std::fs::Permissions::from_mode(if f == "ca.key" { 0o600 } else { 0o644 }),
            )
            .unwrap();
            std::fs::rename(&tmp, live.join(f)).unwrap();
        }
        let text: String =
            bundle.iter().map(|d| std::fs::read_to_string(d.join("ca.pem")).unwrap()).collect();
        std::fs::write(live.join("bundle.tmp"), text).unwrap();
        std::fs::rename(live.join("bundle.tmp"), live.join("bundle.pem")).unwrap();
    };
    install(&old, &[&old]);
    let tokens = dir.join("tokens.json");
    let mut token_files = Vec::new();
    for n in topo.nodes() {
        let out = Command::new(&bin)
            .args(["ca", "token", "--node", &n.name, "--tokens"])
            .arg(&tokens)
            .output()
            .unwrap();
        let f = dir.join(format!("token-{}", n.name));
        std::fs::write(&f, String::from_utf8_lossy(&out.stdout).trim()).unwrap();
        token_files.push(f);
    }
    let n0 = topo.node(0).clone();
    let ca_addr = SocketAddr::new(n0.ip4.into(), 15012);
    let args: Vec<String> = vec![
        "ca".into(),
        "serve".into(),
        "--cert".into(),
        live.join("ca.pem").display().to_string(),
        "--key".into(),
        live.join("ca.key").display().to_string(),
        "--bundle".into(),
        live.join("bundle.pem").display().to_string(),
        "--listen".into(),
        ca_addr.to_string(),
        "--server-name".into(),
        n0.ip4.to_string(),
        "--inventory".into(),
        inv.display().to_string(),
        "--tokens".into(),
        tokens.display().to_string(),
        "--workload-lifetime".into(),
        "60".into(),
        "--node-lifetime".into(),
        "60".into(),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = Topology::command_in(&n0.netns, None, &bin.to_string_lossy(), &argv).unwrap();
    cmd.stderr(std::fs::File::create(dir.join("ca.log")).unwrap());
    let _ca = topo.spawn("tlsmesh ca serve", cmd).unwrap();
    let bundle = old.join("ca.pem").display().to_string();
    let ca = ca_addr.to_string();
    let mut d = Vec::new();
    for (i, n) in topo.nodes().iter().enumerate() {
        let tf = token_files[i].display().to_string();
        let extra = [
            "--ca-addr",
            ca.as_str(),
            "--ca-bundle",
            bundle.as_str(),
            "--join-token-file",
            tf.as_str(),
        ];
        d.push(Daemon::start_with_pin(&topo, n, &topo.pin_dir(&format!("rot{i}")), &inv, &extra));
    }
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7000);
    echo_server(&server.netns, dst);

    // Traffic throughout: one long stream, and a new connection every 500 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicU64::new(0));
    let long = conversation(
        &client.netns,
        dst,
        Duration::from_millis(200),
        Arc::clone(&stop),
        Arc::clone(&count),
    );
    let failures = Arc::new(AtomicU64::new(0));
    let attempts = Arc::new(AtomicU64::new(0));
    let prober = {
        let (stop, failures, attempts, netns) =
            (Arc::clone(&stop), Arc::clone(&failures), Arc::clone(&attempts), client.netns.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                attempts.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = ask(&netns, dst) {
                    eprintln!("new connection failed during rotation: {e}");
                    failures.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
    };
    let (fp_old, fp_new) = (fingerprint(&old.join("ca.pem")), fingerprint(&new.join("ca.pem")));
    let both: BTreeSet<String> = [fp_old.clone(), fp_new.clone()].into();
    let only_new: BTreeSet<String> = [fp_new.clone()].into();
    let all_roots = |want: &BTreeSet<String>| d.iter().all(|x| &roots_of(x) == want);

    // 1. Add the new root to the bundle; nodes learn it at their next renewal.
    install(&old, &[&old, &new]);
    assert!(
        wait_for(Duration::from_secs(120), || all_roots(&both).then_some(())).is_some(),
        "nodes trust old+new: {:?}",
        d.iter().map(roots_of).collect::<Vec<_>>()
    );
    // 2. Sign with the new root; wait until every workload certificate was
    // re-issued twice and a whole node-certificate lifetime has passed.
    install(&new, &[&old, &new]);
    let switched = std::time::Instant::now();
    let ids =
        ["spiffe://cluster.local/ns/strict/sa/n0p0", "spiffe://cluster.local/ns/strict/sa/n1p0"];
    for _round in 0..2 {
        let before: Vec<Option<String>> =
            ids.iter().zip(&d).map(|(id, x)| cert_serial(x, id)).collect();
        let changed = wait_for(Duration::from_secs(120), || {
            ids.iter()
                .zip(&d)
                .zip(&before)
                .all(|((id, x), b)| cert_serial(x, id) != *b)
                .then_some(())
        });
        assert!(changed.is_some(), "certificates re-issued under the new root");
    }
    while switched.elapsed() < Duration::from_secs(75) {
        std::thread::sleep(Duration::from_secs(1));
    }
    // 3. Remove the old root.
    install(&new, &[&new]);
    assert!(
        wait_for(Duration::from_secs(120), || all_roots(&only_new).then_some(())).is_some(),
        "nodes trust only the new root"
    );
    std::thread::sleep(Duration::from_secs(2));
    ask(&client.netns, dst).expect("new connections work under the new root alone");
    stop.store(true, Ordering::Relaxed);
    prober.join().unwrap();
    long.join().unwrap().expect("the long stream was never interrupted");
    assert_eq!(
        failures.load(Ordering::Relaxed),
        0,
        "no new connection failed in {} attempts",
        attempts.load(Ordering::Relaxed)
    );
    assert!(attempts.load(Ordering::Relaxed) > 20);
}
