//! The tunnel, end to end between two node daemons in network namespaces:
//! TCP (HBONE) and QUIC round trips with a capture of the node link, the
//! destination app seeing the client pod's address, refused peers (foreign
//! CA, expired, wrong identity, no certificate), policy denies, 1,000
//! concurrent streams, a destination daemon killed mid-transfer, and the
//! QUIC to TCP fallback when UDP is blocked.

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
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    process::Command,
    sync::Arc,
    time::Duration,
};

use netkit::{
    contains, echo_server, require_root, wait_for, write_inventory, Daemon, LinkCapture, Role,
    Topology,
};
use sha2::{Digest, Sha256};
use tlsmesh_identity::{
    ca::{Ca, CaFiles, CaPaths},
    keys::PrivateKey,
    tls,
    trust::{DenyList, TrustBundle},
    Identity, SpiffeId,
};

const MARKER: &[u8] = b"TUNNEL-TEST-PLAINTEXT-MARKER";

/// A server that answers each connection with the peer address it sees.
fn whoami_server(netns: &str, addr: SocketAddr) {
    let l = Topology::in_netns(netns, move || TcpListener::bind(addr).expect("bind whoami"));
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            let mut s = s;
            let peer = s.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
            let _ = s.write_all(peer.as_bytes());
        }
    });
}

fn ask(netns: &str, dst: SocketAddr) -> std::io::Result<String> {
    Topology::in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(15)))?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        if out.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no answer"));
        }
        Ok(out)
    })
}

/// Sends `len` bytes (marker-laden) and reads them back; returns (sent hash, received hash).
fn round_trip(netns: &str, dst: SocketAddr, len: usize) -> std::io::Result<(String, String)> {
    Topology::in_netns(netns, move || {
        let s = TcpStream::connect_timeout(&dst, Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut r = s.try_clone()?;
        let reader = std::thread::spawn(move || -> std::io::Result<String> {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0usize;
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                got += n;
                h.update(&buf[..n]);
            }
            let _ = got;
            Ok(format!("{:x}", h.finalize()))
        });
        let mut w = s;
        let mut h = Sha256::new();
        let mut chunk = vec![0u8; 128 * 1024];
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut left = len;
        let mut block = 0u64;
        while left > 0 {
            for b in &mut chunk {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            // A readable marker every 4 KiB so a capture can look for plaintext.
            for off in (0..chunk.len()).step_by(4096) {
                chunk[off..off + MARKER.len()].copy_from_slice(MARKER);
            }
            block += 1;
            let n = left.min(chunk.len());
            w.write_all(&chunk[..n])?;
            h.update(&chunk[..n]);
            left -= n;
        }
        let _ = block;
        w.shutdown(Shutdown::Write)?;
        let received = reader.join().map_err(|_| std::io::Error::other("reader panicked"))??;
        Ok((format!("{:x}", h.finalize()), received))
    })
}

fn two_strict_nodes(extra: &[&str]) -> (Topology, Daemon, Daemon) {
    let topo = Topology::build(2, 2).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|p| {
        if p.name.ends_with("p0") {
            Role::Strict
        } else {
            Role::Plain
        }
    });
    let d0 = Daemon::start(&topo, 0, &inv, extra);
    let d1 = Daemon::start(&topo, 1, &inv, extra);
    (topo, d0, d1)
}

fn tunnel_round_trip(transport: &str) {
    let (topo, d0, d1) = two_strict_nodes(&["--transport", transport]);
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7000);
    echo_server(&server.netns, dst);
    whoami_server(&server.netns, SocketAddr::new(server.ip4.into(), 7001));

    // The destination app sees the client pod's own address.
    let seen = ask(&client.netns, SocketAddr::new(server.ip4.into(), 7001))
        .expect("whoami through the tunnel");
    assert_eq!(seen, client.ip4.to_string(), "{transport}: the app sees the client pod's IP");

    let link = LinkCapture::start(&topo).expect("capture");
    let (sent, received) = round_trip(&client.netns, dst, 256 << 20).expect("round trip");
    let pcap = link.finish();
    assert_eq!(sent, received, "{transport}: 256 MiB round-trips intact");
    assert!(pcap.len() > 1 << 20, "the capture saw the transfer ({} bytes)", pcap.len());
    assert!(!contains(&pcap, MARKER), "{transport}: plaintext marker on the node-to-node link");
    let dump = d0.config_dump();
    assert!(d0.counter("outbound_tunnel") >= 2, "{dump}");
    assert!(d1.counter("inbound_tunnel_accepted") >= 2);
    let used = wait_for(Duration::from_secs(10), || {
        d0.log_text().contains(&format!("transport={transport}")).then_some(())
    });
    assert!(used.is_some(), "{transport} used:\n{}", d0.log_text());
}

#[test]
fn tcp_round_trip_ciphertext_only_and_client_ip_preserved() {
    if !require_root("tcp_round_trip_ciphertext_only_and_client_ip_preserved") {
        return;
    }
    tunnel_round_trip("tcp");
}

#[test]
fn quic_round_trip_ciphertext_only_and_client_ip_preserved() {
    if !require_root("quic_round_trip_ciphertext_only_and_client_ip_preserved") {
        return;
    }
    tunnel_round_trip("quic");
}

#[test]
fn ipv6_tunnel_delivers_with_the_client_pods_v6_address() {
    if !require_root("ipv6_tunnel_delivers_with_the_client_pods_v6_address") {
        return;
    }
    let (topo, d0, d1) = two_strict_nodes(&[]);
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let echo = SocketAddr::new(server.ip6.into(), 7000);
    let whoami = SocketAddr::new(server.ip6.into(), 7001);
    echo_server(&server.netns, echo);
    whoami_server(&server.netns, whoami);
    let recorded = d1.kernel_counter("delivery_recorded");

    // Transparent IPv6 delivery: the app sees the client pod's v6 address,
    // so the sock_ops IPv6 branch recorded the delivery's 4-tuple and the
    // pod's sk_lookup let its packets through.
    let seen = ask(&client.netns, whoami).expect("v6 whoami through the tunnel");
    assert_eq!(seen, client.ip6.to_string(), "the app sees the client pod's IPv6 address");
    let (sent, received) = round_trip(&client.netns, echo, 16 << 20).expect("v6 round trip");
    assert_eq!(sent, received, "16 MiB over IPv6 intact");
    assert!(d0.counter("outbound_tunnel") >= 2, "{}", d0.config_dump());
    assert!(
        d1.kernel_counter("delivery_recorded") >= recorded + 2,
        "sock_ops recorded the IPv6 deliveries"
    );
    let open = wait_for(Duration::from_secs(20), || {
        let n = d1.config_dump()["capture"]["deliveries_open"].as_u64().unwrap();
        (n == 0).then_some(n)
    });
    assert_eq!(open, Some(0), "IPv6 delivery records are removed when the connections close");
}

#[test]
fn plaintext_exists_only_inside_the_destination_pod() {
    if !require_root("plaintext_exists_only_inside_the_destination_pod") {
        return;
    }
    // The control for the capture tests: on the destination pod's loopback
    // (where the daemon delivers) the marker is visible.
    let (topo, _d0, _d1) = two_strict_nodes(&[]);
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7000);
    echo_server(&server.netns, dst);
    let file = topo.scratch_dir().join("lo.pcap");
    let f = file.display().to_string();
    let mut cmd = Topology::command_in(
        &server.netns,
        None,
        "tcpdump",
        &["-i", "lo", "-U", "-s", "0", "-w", &f, "tcp port 7000"],
    )
    .unwrap();
    cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null());
    let mut dump = topo.spawn("tcpdump lo", cmd).unwrap();
    wait_for(Duration::from_secs(5), || {
        std::fs::metadata(&file).ok().filter(|m| m.len() > 0).map(|_| ())
    })
    .expect("tcpdump started");
    std::thread::sleep(Duration::from_millis(300));
    let (a, b) = round_trip(&client.netns, dst, 1 << 20).unwrap();
    assert_eq!(a, b);
    std::thread::sleep(Duration::from_millis(300));
    dump.signal(nix::sys::signal::Signal::SIGINT);
    let _ = dump.wait_timeout(Duration::from_secs(5));
    assert!(
        contains(&std::fs::read(&file).unwrap(), MARKER),
        "plaintext is delivered inside the destination pod"
    );
}

/// A TLS client with the given certificate, against a pod's tunnel port,
/// from the node netns of node 0. Returns the error the peer's refusal
/// surfaced as, or Ok if it was accepted.
fn tls_probe(
    topo: &Topology,
    key: Arc<rustls::sign::CertifiedKey>,
    expect: &SpiffeId,
    bundle: &TrustBundle,
    dst: SocketAddr,
) -> Result<(), String> {
    let cfg = tls::client_config(key, expect.clone(), bundle, &DenyList::default())
        .map_err(|e| e.to_string())?;
    let name = tls::sni_for(expect);
    let netns = topo.node(0).netns.clone();
    Topology::in_netns(&netns, move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let tcp = tokio::net::TcpStream::connect(dst).await.map_err(|e| e.to_string())?;
            let mut s = tokio_rustls::TlsConnector::from(Arc::new(cfg))
                .connect(name, tcp)
                .await
                .map_err(|e| e.to_string())?;
            s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await.map_err(|e| e.to_string())?;
            let mut b = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(5), s.read(&mut b)).await {
                Ok(Ok(n)) if n > 0 => Ok(()),
                Ok(Ok(_)) => Err("closed".into()),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("timeout".into()),
            }
        })
    })
}

struct Refusals {
    topo: Topology,
    d1: Daemon,
    _d0: Daemon,
    ca: Arc<Ca>,
    bundle: TrustBundle,
    server_id: SpiffeId,
    client_id: SpiffeId,
    dst: SocketAddr,
}

impl Refusals {
    fn new() -> Self {
        let (topo, d0, d1) = two_strict_nodes(&[]);
        let server = topo.pod(1, 0).clone();
        let dst = SocketAddr::new(server.ip4.into(), 15008);
        let files = CaFiles::open(CaPaths::in_dir(topo.ca_dir()), "cluster.local").unwrap();
        let ca = files.shared().current();
        let bundle = TrustBundle::from_pem("cluster.local", &ca.roots_pem()).unwrap();
        let server_id = SpiffeId::new("cluster.local", "strict", "n1p0").unwrap();
        let client_id = SpiffeId::new("cluster.local", "strict", "n0p0").unwrap();
        Self { topo, d1, _d0: d0, ca, bundle, server_id, client_id, dst }
    }

    fn issue(&self, ca: &Ca, lifetime: u64, ago: i64) -> Arc<rustls::sign::CertifiedKey> {
        let key = PrivateKey::generate().unwrap();
        let csr = key.csr_pem(&Identity::Workload(self.client_id.clone())).unwrap();
        let now = time::OffsetDateTime::now_utc() - time::Duration::seconds(ago);
        let issued = ca
            .issue(
                &csr,
                &Identity::Workload(self.client_id.clone()),
                Duration::from_secs(lifetime),
                now,
            )
            .unwrap();
        key.certified_key(&issued.chain_pem).unwrap()
    }

    fn probe(&self, key: Arc<rustls::sign::CertifiedKey>) -> Result<(), String> {
        tls_probe(&self.topo, key, &self.server_id, &self.bundle, self.dst)
    }

    /// Asserts one more refusal was counted and the log names `words` (any of them).
    fn assert_refused_and_logged(&self, before: u64, words: &[&str]) {
        assert!(
            wait_for(Duration::from_secs(5), || (self.d1.counter("inbound_tunnel_refused")
                > before)
                .then_some(()))
            .is_some(),
            "the refusal is counted"
        );
        let log = wait_for(Duration::from_secs(5), || {
            let log = self.d1.log_text();
            words.iter().any(|w| log.contains(w)).then_some(log)
        });
        assert!(log.is_some(), "the log names the reason ({words:?}):\n{}", self.d1.log_text());
    }
}

#[test]
fn good_certificate_is_accepted_control() {
    if !require_root("good_certificate_is_accepted_control") {
        return;
    }
    let r = Refusals::new();
    r.probe(r.issue(&r.ca, 3600, 0)).expect("a good certificate is accepted");
}

#[test]
fn foreign_ca_is_refused() {
    if !require_root("foreign_ca_is_refused") {
        return;
    }
    let r = Refusals::new();
    let before = r.d1.counter("inbound_tunnel_refused");
    let (foreign, _) = Ca::generate_root("cluster.local", Duration::from_secs(3600)).unwrap();
    let e = r.probe(r.issue(&foreign, 3600, 0)).expect_err("foreign CA refused");
    assert!(!e.is_empty());
    r.assert_refused_and_logged(before, &["foreign CA", "foreign_ca"]);
}

#[test]
fn expired_certificate_is_refused() {
    if !require_root("expired_certificate_is_refused") {
        return;
    }
    let r = Refusals::new();
    let before = r.d1.counter("inbound_tunnel_refused");
    let e = r.probe(r.issue(&r.ca, 60, 7200)).expect_err("expired refused");
    assert!(!e.is_empty());
    r.assert_refused_and_logged(before, &["expired", "Expired"]);
}

#[test]
fn no_client_certificate_is_refused() {
    if !require_root("no_client_certificate_is_refused") {
        return;
    }
    let r = Refusals::new();
    let before = r.d1.counter("inbound_tunnel_refused");
    let out = Command::new("nsenter")
        .arg(format!("--net={}", r.topo.node(0).netns_path().display()))
        .args(["openssl", "s_client", "-connect", &r.dst.to_string(), "-tls1_3", "-ign_eof"])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(
        text.contains("certificate required") || !out.status.success(),
        "s_client without a certificate must fail:\n{text}"
    );
    r.assert_refused_and_logged(
        before,
        &["certificate", "NoCertificatesPresented", "no certificate"],
    );
}

#[test]
fn wrong_destination_identity_is_refused_by_the_client_side() {
    if !require_root("wrong_destination_identity_is_refused_by_the_client_side") {
        return;
    }
    let topo = Topology::build(2, 1).expect("topology");
    let good = write_inventory(&topo, "good.toml", &|_| Role::Strict);
    // Node 0 believes the server runs as another service account.
    let text = std::fs::read_to_string(&good)
        .unwrap()
        .replace("service_account = \"n1p0\"", "service_account = \"imposter-check\"");
    let skewed = topo.scratch_dir().join("skewed.toml");
    std::fs::write(&skewed, text).unwrap();
    let d0 = Daemon::start(&topo, 0, &skewed, &[]);
    let _d1 = Daemon::start(&topo, 1, &good, &[]);
    let server = topo.pod(1, 0).clone();
    whoami_server(&server.netns, SocketAddr::new(server.ip4.into(), 7001));
    let r = ask(&topo.pod(0, 0).netns, SocketAddr::new(server.ip4.into(), 7001));
    assert!(r.is_err(), "no data may flow to a peer with the wrong identity: {r:?}");
    assert_eq!(d0.counter("tunnel_failed"), 1);
    let log = d0.log_text();
    assert!(
        log.contains("imposter-check") && log.contains("n1p0"),
        "the log names expected and presented identity:\n{log}"
    );
}

#[test]
fn policy_deny_refuses_and_counts() {
    if !require_root("policy_deny_refuses_and_counts") {
        return;
    }
    let topo = Topology::build(2, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let policy = topo.scratch_dir().join("policy.toml");
    std::fs::write(&policy, "[[rule]]\nname = \"no-7002\"\naction = \"deny\"\nto_namespace = \"strict\"\nports = [7002]\n").unwrap();
    let p = policy.display().to_string();
    let _d0 = Daemon::start(&topo, 0, &inv, &[]);
    let d1 = Daemon::start(&topo, 1, &inv, &["--policy", &p]);
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    whoami_server(&server.netns, SocketAddr::new(server.ip4.into(), 7001));
    whoami_server(&server.netns, SocketAddr::new(server.ip4.into(), 7002));
    assert_eq!(
        ask(&client.netns, SocketAddr::new(server.ip4.into(), 7001)).unwrap(),
        client.ip4.to_string()
    );
    let e = ask(&client.netns, SocketAddr::new(server.ip4.into(), 7002)).expect_err("denied");
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset
                | std::io::ErrorKind::UnexpectedEof
                | std::io::ErrorKind::ConnectionRefused
        ),
        "{e}"
    );
    assert_eq!(d1.counter("policy_denied"), 1);
    assert!(d1.log_text().contains("no-7002"));
}

#[test]
fn thousand_concurrent_streams_share_pooled_connections() {
    if !require_root("thousand_concurrent_streams_share_pooled_connections") {
        return;
    }
    let (topo, d0, d1) = two_strict_nodes(&[]);
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7000);
    echo_server(&server.netns, dst);
    let (ok, streams) = Topology::in_netns(&client.netns, {
        let d0_netns = d0.netns.clone();
        move || {
            let mut conns = Vec::new();
            for _ in 0..1000 {
                let s = TcpStream::connect_timeout(&dst, Duration::from_secs(10)).expect("connect");
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                conns.push(s);
            }
            for (i, s) in conns.iter_mut().enumerate() {
                s.write_all(&(i as u64).to_le_bytes()).unwrap();
            }
            let mut ok = 0;
            for (i, s) in conns.iter_mut().enumerate() {
                let mut b = [0u8; 8];
                if s.read_exact(&mut b).is_ok() && u64::from_le_bytes(b) == i as u64 {
                    ok += 1;
                }
            }
            let _ = d0_netns;
            (ok, conns)
        }
    });
    assert_eq!((ok, streams.len()), (1000, 1000), "all 1,000 concurrent streams complete");
    assert_eq!(
        d1.config_dump()["capture"]["deliveries_open"].as_u64(),
        Some(1000),
        "sock_ops recorded every open delivery"
    );
    drop(streams);
    let pool = &d0.config_dump()["pool"];
    let conns = pool["hbone_connections"].as_u64().unwrap();
    assert!((1..=12).contains(&conns), "streams are multiplexed (100 per connection): {pool}");
    assert!(d1.counter("inbound_tunnel_accepted") >= 1000);
    // Each delivery stays recorded for inbound capture while its connection
    // lives (a syncookie handshake's last ACK meets sk_lookup late), and no
    // longer: all are gone once the client closed.
    let open = wait_for(Duration::from_secs(20), || {
        let n = d1.config_dump()["capture"]["deliveries_open"].as_u64().unwrap();
        (n == 0).then_some(n)
    });
    assert_eq!(open, Some(0), "delivery records are removed when their connections close");
}

#[test]
fn destination_daemon_killed_mid_transfer_resets_then_recovers() {
    if !require_root("destination_daemon_killed_mid_transfer_resets_then_recovers") {
        return;
    }
    let (topo, _d0, mut d1) = two_strict_nodes(&[]);
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7000);
    echo_server(&server.netns, dst);
    let transfer = std::thread::spawn({
        let netns = client.netns.clone();
        move || round_trip(&netns, dst, 4 << 30)
    });
    std::thread::sleep(Duration::from_millis(1500));
    d1.proc.kill();
    let started = std::time::Instant::now();
    let r = transfer.join().unwrap();
    assert!(r.is_err(), "the client sees an error, not a completed transfer: {r:?}");
    assert!(started.elapsed() < Duration::from_secs(40), "no hang: {:?}", started.elapsed());
    let node1 = topo.node(1).clone();
    let d1b = Daemon::start_with_pin(&topo, &node1, &d1.pin_dir, &d1.inventory, &[]);
    let (a, b) = wait_for(Duration::from_secs(20), || round_trip(&client.netns, dst, 1 << 20).ok())
        .expect("new connections succeed after the restart");
    assert_eq!(a, b);
    assert!(d1b.counter("inbound_tunnel_accepted") >= 1);
}

#[test]
fn quic_falls_back_to_tcp_when_udp_is_blocked() {
    if !require_root("quic_falls_back_to_tcp_when_udp_is_blocked") {
        return;
    }
    let (topo, d0, _d1) = two_strict_nodes(&["--transport", "quic"]);
    // Node 1 routes for its pods: drop UDP to the tunnel port there.
    let n1 = topo.node(1).netns.clone();
    netkit::sh(&["ip", "netns", "exec", &n1, "nft", "add table inet block; add chain inet block blockudp { type filter hook forward priority 0; }; add rule inet block blockudp udp dport 15008 drop"]).expect("nft");
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    whoami_server(&server.netns, SocketAddr::new(server.ip4.into(), 7001));
    let seen =
        ask(&client.netns, SocketAddr::new(server.ip4.into(), 7001)).expect("falls back to TCP");
    assert_eq!(seen, client.ip4.to_string());
    let log = wait_for(Duration::from_secs(10), || {
        let log = d0.log_text();
        log.contains("transport=tcp").then_some(log)
    });
    let log = log.unwrap_or_else(|| d0.log_text());
    assert!(log.contains("QUIC unreachable"), "fallback logged:\n{log}");
    assert!(log.contains("transport=tcp"), "the connection went over TCP:\n{log}");
}

/// Opens a connection from `netns` to `dst` through the tunnel and checks
/// one echo; the caller holds it open.
fn open_echo(netns: &str, dst: SocketAddr) -> TcpStream {
    Topology::in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.write_all(b"ping").expect("write");
        let mut b = [0u8; 4];
        s.read_exact(&mut b).expect("echo");
        assert_eq!(&b, b"ping");
        s
    })
}

/// Defect 2 of the daemon-core issue: a peer's pooled HBONE connection kept
/// serving streams into a pod that had been removed (its connection task
/// ignored the pod's shutdown). Removing the pod now ends its tunnel
/// connections and every stream on them.
#[test]
fn removing_a_pod_ends_its_inbound_tunnel_streams() {
    if !require_root("removing_a_pod_ends_its_inbound_tunnel_streams") {
        return;
    }
    let (topo, d0, d1) = two_strict_nodes(&[]);
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7100);
    echo_server(&server.netns, dst);
    let mut open = open_echo(&client.netns, dst);
    let both = wait_for(Duration::from_secs(10), || {
        let c = d1.config_dump();
        let conns = c["connections"].as_array().map_or(0, Vec::len);
        let tunnels = c["tunnels"].as_array().map_or(0, Vec::len);
        (conns == 1 && tunnels == 1).then_some(())
    });
    assert!(both.is_some(), "the stream is in the server node's tables: {}", d1.config_dump());

    // The server pod leaves the inventory (both daemons read this file).
    write_inventory(&topo, "inv.toml", &|p| {
        if p.name == client.name {
            Role::Strict
        } else {
            Role::Plain
        }
    });
    let released = wait_for(Duration::from_secs(15), || {
        let c = d1.config_dump();
        let pods = c["pods"].as_array().map_or(1, Vec::len);
        let conns = c["connections"].as_array().map_or(1, Vec::len);
        let tunnels = c["tunnels"].as_array().map_or(1, Vec::len);
        (pods == 0 && conns == 0 && tunnels == 0).then_some(())
    });
    assert!(released.is_some(), "pod, stream and tunnel connection are gone: {}", d1.config_dump());
    // The client's connection has ended too (EOF or reset), not lingering.
    let mut b = [0u8; 16];
    let ended = match open.read(&mut b) {
        Ok(0) | Err(_) => true,
        Ok(_) => false,
    };
    assert!(ended, "the client's connection into the removed pod ended");
    let _ = d0;
}
