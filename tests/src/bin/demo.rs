//! The local two-node demo (`cargo xtask demo`): two "nodes" and four "pods"
//! as network namespaces, a tlsmesh daemon per node driven by a static
//! inventory, real traffic, and a report of what happened: which connections
//! were captured, the identities on both ends, the transport, the bytes, and
//! whether the node-to-node link carried any plaintext.

use std::{
    io::{Read, Write},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use netkit::{contains, require_root, write_inventory, Daemon, LinkCapture, Role, Topology};

const MARKER: &[u8] = b"TLSMESH-PLAINTEXT-MARKER-";

#[expect(clippy::too_many_lines, reason = "the demo's script reads top to bottom")]
fn main() {
    if !require_root("demo") {
        std::process::exit(1);
    }
    let transport =
        std::env::args().skip_while(|a| a != "--transport").nth(1).unwrap_or_else(|| "tcp".into());
    println!("tlsmesh demo: two nodes, four pods, network namespaces on this machine\n");
    let topo = Topology::build(2, 2).expect("build the demo topology (needs root, iproute2)");
    let role = |name: &str| match name {
        "n0p0" | "n1p0" => Role::Strict,
        "n1p1" => Role::Permissive,
        _ => Role::Plain,
    };
    let describe = |r: Role| match r {
        Role::Strict => "enrolled, strict",
        Role::Permissive => "enrolled, permissive",
        Role::Plain | Role::Absent => "not enrolled",
    };
    let inv = write_inventory(&topo, "inventory.toml", &|p| role(&p.name));
    for n in topo.nodes() {
        println!("node {} ({}, {})", n.name, n.ip4, n.ip6);
        for p in &n.pods {
            println!(
                "  pod {:<5} {:<11} {:<22} spiffe://cluster.local/ns/{}/sa/{}",
                p.name,
                p.ip4,
                describe(role(&p.name)),
                match role(&p.name) {
                    Role::Strict => "strict",
                    Role::Permissive => "permissive",
                    _ => "plain",
                },
                p.name
            );
        }
    }
    println!("\ninventory: {}", inv.display());
    let extra = ["--transport", transport.as_str()];
    let d0 = Daemon::start(&topo, 0, &inv, &extra);
    let d1 = Daemon::start(&topo, 1, &inv, &extra);
    println!(
        "daemons: n0 pid {}, n1 pid {} (transport {transport}), both ready\n",
        d0.proc.pid(),
        d1.proc.pid()
    );

    let (client, server, lab, legacy) = (
        topo.pod(0, 0).clone(),
        topo.pod(1, 0).clone(),
        topo.pod(1, 1).clone(),
        topo.pod(0, 1).clone(),
    );
    for p in [&server, &lab] {
        serve(&p.netns, SocketAddr::new(p.ip4.into(), 8080));
    }

    let link = LinkCapture::start(&topo).expect("start the link capture");
    let mut failures = 0;

    // 1. Enrolled client -> enrolled strict server on the other node.
    let dst = SocketAddr::new(server.ip4.into(), 8080);
    let before = d0.stats();
    let t = Instant::now();
    match exchange(&client.netns, dst, 16 << 20) {
        Ok(r) => {
            let after = d0.stats();
            let delta = |k: &str| {
                after["daemon"][k].as_u64().unwrap_or(0) - before["daemon"][k].as_u64().unwrap_or(0)
            };
            println!("1. {} -> {}:8080, 16 MiB with a plaintext marker", client.name, server.ip4);
            println!(
                "   captured by n0's daemon: {}",
                if delta("outbound_accepted") == 1 { "yes" } else { "NO" }
            );
            println!(
                "   route: {}",
                if delta("outbound_tunnel") == 1 {
                    format!("mTLS tunnel ({transport}) to n1's daemon")
                } else {
                    "plaintext passthrough".into()
                }
            );
            println!("   identities: spiffe://cluster.local/ns/strict/sa/{} -> spiffe://cluster.local/ns/strict/sa/{}", client.name, server.name);
            println!(
                "   the app saw its peer as {} (client pod {})",
                r.server_saw_peer, client.ip4
            );
            println!("   the client saw getpeername {} (original destination)", r.peer);
            println!("   bytes intact: {} ({} in {:.0?})", r.intact, r.bytes, t.elapsed());
            failures += usize::from(!r.intact);
        }
        Err(e) => {
            println!("1. {} -> {}:8080 FAILED: {e}", client.name, server.ip4);
            failures += 1;
        }
    }

    let pcap = link.finish();
    let leaked = contains(&pcap, MARKER);
    println!(
        "   node-to-node link during the transfer: {} bytes captured on the LAN bridge; plaintext marker {}",
        pcap.len(),
        if leaked { "FOUND: plaintext crossed the nodes" } else { "absent: only ciphertext crossed" }
    );
    failures += usize::from(leaked);

    // 2. Not enrolled -> permissive pod: plaintext accepted and counted. The
    // capture here is the control: the same marker is visible in the clear.
    let control = LinkCapture::start(&topo).expect("start the control capture");
    let r = exchange(&legacy.netns, SocketAddr::new(lab.ip4.into(), 8080), 1 << 20);
    let control_seen = contains(&control.finish(), MARKER);
    println!(
        "\n2. {} (not enrolled) -> {} (permissive) plaintext: {} (n1 counted {} plaintext connection(s))",
        legacy.name,
        lab.name,
        if r.as_ref().is_ok_and(|r| r.intact) { "accepted" } else { "FAILED" },
        d1.counter("inbound_plaintext_accepted")
    );
    failures += usize::from(!r.is_ok_and(|r| r.intact));
    println!(
        "   control: the same marker {} on the link for this plaintext connection",
        if control_seen { "is visible" } else { "was NOT seen (capture broken?)" }
    );
    failures += usize::from(!control_seen);

    // 3. Not enrolled -> strict pod: refused.
    let r = exchange(&legacy.netns, SocketAddr::new(server.ip4.into(), 8080), 4096);
    let refused = r.as_ref().map_or(true, |r| !r.intact);
    println!(
        "3. {} (not enrolled) -> {} (strict) plaintext: {} (n1 refused {})",
        legacy.name,
        server.name,
        if refused { "refused" } else { "ACCEPTED (wrong)" },
        d1.counter("inbound_plaintext_refused")
    );
    failures += usize::from(!refused);

    println!("\ncounters n0: {}", d0.stats()["daemon"]);
    println!("counters n1: {}", d1.stats()["daemon"]);
    if failures > 0 {
        eprintln!("\ndemo: {failures} step(s) failed");
        std::process::exit(1);
    }
    println!("\ndemo: all steps behaved as expected");
}

struct Exchange {
    intact: bool,
    bytes: usize,
    peer: SocketAddr,
    server_saw_peer: String,
}

/// A server that reads until EOF and answers with the byte count and the peer it saw.
fn serve(netns: &str, addr: SocketAddr) {
    let l = Topology::in_netns(netns, move || TcpListener::bind(addr).expect("bind demo server"));
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let peer = s.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                let mut n = 0usize;
                let mut sum = 0u64;
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(k) = s.read(&mut buf) {
                    if k == 0 {
                        break;
                    }
                    n += k;
                    sum = buf[..k]
                        .iter()
                        .fold(sum, |a, &b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
                }
                let _ = write!(s, "{n} {sum} {peer}");
            });
        }
    });
}

fn exchange(netns: &str, dst: SocketAddr, len: usize) -> std::io::Result<Exchange> {
    Topology::in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let peer = s.peer_addr()?;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sum = 0u64;
        let mut sent = 0;
        let mut i = 0u64;
        while sent < len {
            let line = format!("{}{i:012}\n", String::from_utf8_lossy(MARKER));
            for (j, b) in chunk.iter_mut().enumerate() {
                *b = line.as_bytes()[j % line.len()];
            }
            let k = chunk.len().min(len - sent);
            s.write_all(&chunk[..k])?;
            sum =
                chunk[..k].iter().fold(sum, |a, &b| a.wrapping_mul(31).wrapping_add(u64::from(b)));
            sent += k;
            i += 1;
        }
        s.shutdown(Shutdown::Write)?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        let mut f = answer.split_whitespace();
        let n: usize = f.next().and_then(|x| x.parse().ok()).unwrap_or(0);
        let their_sum: u64 = f.next().and_then(|x| x.parse().ok()).unwrap_or(1);
        let server_saw_peer = f.next().unwrap_or("").to_string();
        Ok(Exchange { intact: n == len && their_sum == sum, bytes: n, peer, server_saw_peer })
    })
}
