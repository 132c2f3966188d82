//! Operations, end to end: Prometheus metrics after known traffic, readiness
//! flipping as pods are enrolled, `tlsmesh status` (text and JSON), the
//! run-time log level, and a rolling restart under load with zero failed
//! connections and a long transfer finishing within the drain deadline.

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
    net::{Shutdown, SocketAddr, TcpStream},
    process::{Command, Stdio},
    time::Duration,
};

use netkit::{
    echo_server, require_root, tlsmesh_bin, wait_for, write_inventory, ConnectLoop, Daemon, Role,
    Topology,
};

fn http_get(netns: &str, addr: &str, path: &str) -> Option<(u16, String)> {
    http_req(netns, "GET", addr, path)
}

fn http_req(netns: &str, method: &str, addr: &str, path: &str) -> Option<(u16, String)> {
    let (addr, path, method) = (addr.to_string(), path.to_string(), method.to_string());
    Topology::in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).ok()?;
        let code = buf.get(9..12)?.parse().ok()?;
        Some((code, buf.split_once("\r\n\r\n").map_or(String::new(), |x| x.1.to_string())))
    })
}

fn exchange(netns: &str, dst: SocketAddr, len: usize) -> std::io::Result<()> {
    netkit::echo_exchange(netns, dst, len)
}

/// The value of one sample line `name{labels} value` in a metrics page.
fn sample(page: &str, name_and_labels: &str) -> Option<f64> {
    page.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn metrics_count_known_traffic_and_status_shows_it() {
    if !require_root("metrics_count_known_traffic_and_status_shows_it") {
        return;
    }
    let topo = Topology::build(2, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let mut d0 = Daemon::start(&topo, 0, &inv, &[]);
    let _d1 = Daemon::start(&topo, 1, &inv, &[]);
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7000);
    echo_server(&server.netns, dst);
    for _ in 0..3 {
        exchange(&client.netns, dst, 100_000).expect("exchange through the tunnel");
    }
    let page = wait_for(Duration::from_secs(5), || {
        let (code, page) = http_get(&d0.netns, "127.0.0.1:15020", "/metrics")?;
        (code == 200
            && sample(&page, "tlsmesh_bytes_total{direction=\"from_pods\"}") >= Some(300_000.0))
        .then_some(page)
    })
    .expect("metrics with the traffic counted");
    assert_eq!(
        sample(&page, "tlsmesh_connections_opened_total{direction=\"outbound\",route=\"tunnel\"}"),
        Some(3.0),
        "{page}"
    );
    assert_eq!(sample(&page, "tlsmesh_bytes_total{direction=\"from_pods\"}"), Some(300_000.0));
    assert_eq!(sample(&page, "tlsmesh_bytes_total{direction=\"to_pods\"}"), Some(300_000.0));
    assert!(
        sample(&page, "tlsmesh_tunnel_handshake_seconds_count").unwrap_or(0.0) >= 1.0,
        "{page}"
    );
    let expiry = sample(
        &page,
        "tlsmesh_certificate_expiry_seconds{identity=\"spiffe://cluster.local/ns/strict/sa/n0p0\"}",
    )
    .expect("cert expiry");
    assert!(expiry > 3600.0 && expiry <= 86_400.0, "{expiry}");
    assert!(sample(&page, "tlsmesh_ebpf_events_total{event=\"captured\"}").unwrap_or(0.0) >= 3.0);
    assert_eq!(sample(&page, "tlsmesh_enrolled_pods"), Some(1.0));

    // tlsmesh status, text and JSON.
    let status = |json: bool| {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", topo.node(0).netns_path().display()))
            .arg(tlsmesh_bin())
            .arg("status");
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().expect("tlsmesh status");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let text = status(false);
    assert!(text.contains("node n0") && text.contains("ready"), "{text}");
    assert!(
        text.contains("strict/n0p0") && text.contains("spiffe://cluster.local/ns/strict/sa/n0p0"),
        "{text}"
    );
    assert!(
        text.contains("CERTIFICATES")
            && text.contains("TUNNEL CONNECTIONS")
            && text.contains("CONNECTIONS")
    );
    assert!(!text.contains('\x1b'), "no colour when not on a terminal");
    let json: serde_json::Value =
        serde_json::from_str(&status(true)).expect("status --json is JSON");
    assert_eq!(json["config_dump"]["pods"][0]["key"], "strict/n0p0");
    assert_eq!(json["stats"]["daemon"]["outbound_tunnel"], 3);

    // The log level changes at run time, by POST only (a GET changes nothing).
    let (code, body) = http_get(&d0.netns, "127.0.0.1:15000", "/logging?level=debug").unwrap();
    assert_eq!(code, 405, "{body}");
    let (code, _) = http_get(&d0.netns, "127.0.0.1:15000", "/quitquitquit").unwrap();
    assert_eq!(code, 405, "a GET of /quitquitquit does not stop the daemon");
    assert!(d0.proc.running());
    let (code, _) = http_req(&d0.netns, "POST", "127.0.0.1:15000", "/logging?level=debug").unwrap();
    assert_eq!(code, 200);
    let (code, body) =
        http_req(&d0.netns, "POST", "127.0.0.1:15000", "/logging?level=%%%").unwrap();
    assert_eq!(code, 400, "{body}");
}

#[test]
fn readiness_waits_for_every_pod() {
    if !require_root("readiness_waits_for_every_pod") {
        return;
    }
    let topo = Topology::build(1, 1).expect("topology");
    let pod = topo.pod(0, 0).clone();
    let late = format!("{}-late", pod.netns);
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    // A second pod whose netns does not exist yet.
    let mut text = std::fs::read_to_string(&inv).unwrap();
    text += &format!("[[pod]]\nname = \"late\"\nnamespace = \"strict\"\nnode = \"n0\"\nips = [\"10.77.1.99\"]\nnetns = \"/run/netns/{late}\"\n");
    std::fs::write(&inv, text).unwrap();
    struct Netns(String);
    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let node = topo.node(0).clone();
    let pin = topo.pin_dir("ready");
    let args: Vec<String> = vec![
        "node".into(),
        "--node".into(),
        "n0".into(),
        "--inventory".into(),
        inv.display().to_string(),
        "--pin-dir".into(),
        pin.display().to_string(),
        "--ca-dir".into(),
        topo.ca_dir().display().to_string(),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd =
        Topology::command_in(&node.netns, None, &tlsmesh_bin().to_string_lossy(), &argv).unwrap();
    cmd.stdout(Stdio::null()).stderr(Stdio::null());
    let _d = topo.spawn("tlsmesh node", cmd).unwrap();
    let not_ready = wait_for(Duration::from_secs(20), || {
        let (code, body) = http_get(&node.netns, "127.0.0.1:15021", "/healthz/ready")?;
        (code == 503 && body.contains("strict/late")).then_some(body)
    });
    assert!(not_ready.is_some(), "not ready while a pod is missing");
    assert!(
        http_get(&node.netns, "127.0.0.1:15000", "/config_dump")
            .is_some_and(|(_, b)| b.contains("strict/n0p0")),
        "the other pod is served meanwhile"
    );
    let _late = Netns(late.clone());
    netkit::sh(&["ip", "netns", "add", &late]).unwrap();
    netkit::sh(&["ip", "-n", &late, "link", "set", "lo", "up"]).unwrap();
    let ready = wait_for(Duration::from_secs(20), || {
        let (code, _) = http_get(&node.netns, "127.0.0.1:15021", "/healthz/ready")?;
        (code == 200).then_some(())
    });
    assert!(ready.is_some(), "ready once the pod's netns appeared and it was enrolled");
}

#[test]
fn rolling_restart_refuses_no_connection_and_drains_long_transfers() {
    if !require_root("rolling_restart_refuses_no_connection_and_drains_long_transfers") {
        return;
    }
    let topo = Topology::build(2, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let old = Daemon::start(&topo, 0, &inv, &["--drain-timeout", "60"]);
    let _d1 = Daemon::start(&topo, 1, &inv, &[]);
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7000);
    echo_server(&server.netns, dst);
    exchange(&client.netns, dst, 1000).expect("warm-up");

    let looper = ConnectLoop::start(&client.netns, dst, Duration::from_millis(10));
    // A long transfer through the old daemon, paced so it outlives SIGTERM.
    let long = {
        let netns = client.netns.clone();
        std::thread::spawn(move || {
            Topology::in_netns(&netns, move || -> std::io::Result<usize> {
                let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
                s.set_read_timeout(Some(Duration::from_secs(30)))?;
                let mut r = s.try_clone()?;
                let reader = std::thread::spawn(move || {
                    let mut n = 0usize;
                    let mut b = vec![0u8; 65536];
                    while let Ok(k) = r.read(&mut b) {
                        if k == 0 {
                            break;
                        }
                        n += k;
                    }
                    n
                });
                for _ in 0..80 {
                    s.write_all(&[7u8; 64 * 1024])?;
                    std::thread::sleep(Duration::from_millis(50));
                }
                s.shutdown(Shutdown::Write)?;
                reader.join().map_err(|_| std::io::Error::other("reader"))
            })
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    // The new daemon starts beside the old one, then the old one gets SIGTERM.
    let node = topo.node(0).clone();
    let new = Daemon::start_with_pin(&topo, &node, &old.pin_dir, &inv, &[]);
    // The admin port has one owner: still the old daemon.
    let owner = |d: &Daemon| d.config_dump()["pid"].as_u64();
    assert_eq!(owner(&new), Some(u64::from(old.proc.pid())), "the old daemon keeps the admin API");
    std::thread::sleep(Duration::from_millis(500));
    let mut old = old;
    old.proc.signal(nix::sys::signal::Signal::SIGTERM);
    // Once the old daemon drains, the new one takes the admin API over.
    let took = wait_for(Duration::from_secs(10), || {
        (new.get("/config_dump").ok()?.1["pid"].as_u64() == Some(u64::from(new.proc.pid())))
            .then_some(())
    });
    assert!(took.is_some(), "the new daemon owns the admin API once the old one drains");
    let moved = long.join().unwrap().expect("the long transfer completed across the SIGTERM");
    assert_eq!(moved, 80 * 64 * 1024, "every byte of the long transfer came back");
    // The old daemon exits as soon as its last connection ended, well
    // before its 60 s deadline (its open-connection count no longer leaks).
    let exited = old.proc.wait_timeout(Duration::from_secs(30));
    assert!(exited.is_some(), "the old daemon exits once drained, not at the 60 s deadline");
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, failed) = looper.stop();
    assert!(ok > 50, "the loop ran ({ok} ok)");
    assert_eq!(failed, 0, "no connection failed across the replacement");
    assert!(new.counter("outbound_accepted") > 0, "the new daemon took connections");
}

/// Defects 3 and 5 of the daemon-core issue: on drain the HBONE server now
/// sends GOAWAY, and a daemon started beside another gets each pod's QUIC
/// server once the old daemon lets the UDP port go (it used to warn once
/// and never retry, so existing pods never had QUIC again).
#[test]
fn a_replaced_daemon_sends_goaway_and_its_successor_gets_quic_back() {
    if !require_root("a_replaced_daemon_sends_goaway_and_its_successor_gets_quic_back") {
        return;
    }
    let topo = Topology::build(2, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let quic = ["--transport", "quic"];
    let d0 = Daemon::start(&topo, 0, &inv, &quic);
    let node1 = topo.node(1).clone();
    let pin1 = topo.pin_dir("n1");
    let old = Daemon::start_with_env(
        &topo,
        &node1,
        &pin1,
        &inv,
        &quic,
        &[("RUST_LOG", "info,tlsmesh_tunnel=debug")],
    );
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7200);
    echo_server(&server.netns, dst);
    exchange(&client.netns, dst, 1000).expect("through QUIC");
    let new = Daemon::start_with_pin(&topo, &node1, &pin1, &inv, &quic);
    let busy = wait_for(Duration::from_secs(10), || {
        new.log_text().contains("QUIC server address busy").then_some(())
    });
    assert!(busy.is_some(), "the old daemon holds the QUIC port while it runs");
    let mut old = old;
    old.proc.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(old.proc.wait_timeout(Duration::from_secs(30)).is_some(), "the old daemon exits");
    let bound = wait_for(Duration::from_secs(15), || {
        new.log_text().contains("QUIC server bound after all").then_some(())
    });
    assert!(bound.is_some(), "the new daemon binds the pod's QUIC port:\n{}", new.log_text());
    // New connections reach the new daemon over QUIC again.
    let quic_in = wait_for(Duration::from_secs(20), || {
        exchange(&client.netns, dst, 1000).ok()?;
        let t = new.config_dump()["tunnels"].clone();
        t.as_array()?.iter().any(|x| x["transport"] == "quic").then_some(())
    });
    assert!(quic_in.is_some(), "a QUIC tunnel into the new daemon: {}", new.config_dump());
    let _ = d0;
}

/// Defect 3: the HBONE server sends GOAWAY when the daemon drains.
#[test]
fn draining_sends_goaway_on_open_tunnel_connections() {
    if !require_root("draining_sends_goaway_on_open_tunnel_connections") {
        return;
    }
    let topo = Topology::build(2, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let _d0 = Daemon::start(&topo, 0, &inv, &[]);
    let node1 = topo.node(1).clone();
    let mut d1 = Daemon::start_with_env(
        &topo,
        &node1,
        &topo.pin_dir("n1"),
        &inv,
        &["--drain-timeout", "30"],
        &[("RUST_LOG", "info,tlsmesh_tunnel=debug")],
    );
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    let dst = SocketAddr::new(server.ip4.into(), 7300);
    echo_server(&server.netns, dst);
    // A stream that stays open across the SIGTERM.
    let mut s = Topology::in_netns(&client.netns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(b"one").unwrap();
        let mut b = [0u8; 3];
        s.read_exact(&mut b).unwrap();
        s
    });
    d1.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let goaway = wait_for(Duration::from_secs(10), || {
        d1.log_text().contains("draining tunnel connection (GOAWAY)").then_some(())
    });
    assert!(goaway.is_some(), "GOAWAY sent:\n{}", d1.log_text());
    // The open stream still works during the drain, then ends cleanly.
    s.write_all(b"two").unwrap();
    let mut b = [0u8; 3];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"two");
    s.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(d1.proc.wait_timeout(Duration::from_secs(20)).is_some(), "drained and exited");
}

/// The trust bundle as a SPIFFE bundle (JWKS): the admin API's and `tlsmesh
/// ca bundle`'s agree and hold the CA's root; `tlsmesh logging` switches
/// the eBPF decision log of the running daemon.
#[test]
fn spiffe_bundle_and_the_logging_command_reach_the_running_daemon() {
    if !require_root("spiffe_bundle_and_the_logging_command_reach_the_running_daemon") {
        return;
    }
    let topo = Topology::build(1, 1).expect("topology");
    let inv = write_inventory(&topo, "inv.toml", &|_| Role::Strict);
    let d = Daemon::start(&topo, 0, &inv, &[]);
    let (code, api) = d.get("/spiffe_bundle").expect("admin API");
    assert_eq!(code, 200, "{api}");
    let pem = std::fs::read_to_string(topo.ca_dir().join("ca.pem")).expect("ca.pem");
    let root_b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let keys = api["keys"].as_array().expect("keys");
    assert_eq!(keys.len(), 1, "{api}");
    assert_eq!((keys[0]["use"].as_str(), keys[0]["kty"].as_str()), (Some("x509-svid"), Some("EC")));
    assert_eq!(keys[0]["x5c"][0].as_str(), Some(root_b64.as_str()), "x5c is the CA's root");
    assert!(api["spiffe_sequence"].is_u64() && api["spiffe_refresh_hint"].is_u64(), "{api}");
    let out = Command::new(tlsmesh_bin())
        .args(["ca", "bundle", "--dir"])
        .arg(topo.ca_dir())
        .output()
        .expect("tlsmesh ca bundle");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cli: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(cli["keys"], api["keys"], "the CLI and the daemon describe the same root");

    let logging = |args: &[&str]| {
        let bin = tlsmesh_bin();
        let mut all = vec!["logging"];
        all.extend_from_slice(args);
        Topology::command_in(&d.netns, None, &bin.to_string_lossy(), &all)
            .expect("command")
            .output()
            .expect("tlsmesh logging")
    };
    let out = logging(&["--ebpf", "on"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(r#""ebpf":"on""#));
    assert_eq!(d.config_dump()["capture"]["decision_log"], "on");
    let out = logging(&["--level", "%%%"]);
    assert!(!out.status.success(), "a bad filter is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("bad log level"), "{out:?}");
    let out = logging(&[]);
    assert!(!out.status.success(), "nothing to change is a usage error");
    let out = logging(&["--ebpf", "off", "--level", "info"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(d.config_dump()["capture"]["decision_log"], "off");
}
