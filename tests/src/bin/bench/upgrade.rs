//! The upgrade figure (issue 14): a client and a server pod, both enrolled,
//! N idle connections held open, a trickle (1 KiB echoed every 10 ms) and a
//! bulk echo stream running; a second daemon is started beside the client
//! node's and that one gets SIGTERM. Two routes: both pods on one node
//! (local deliveries: the sockets are handed over), and the pods on two
//! nodes (tunnel streams over TCP: each is quiesced with the server node's
//! daemon, its app socket handed over, and resumed by the new daemon over
//! a new tunnel connection, docs/PROTOCOL.md §6). Measured: the time from SIGTERM to the old daemon's exit (it
//! exits as soon as it handed its table over), the longest pause of the
//! trickle's echo and of the bulk stream around the handover against the
//! same streams' longest pause in the seconds before (the baseline of the
//! same run), and how many connections the new daemon holds afterwards,
//! each checked to be open at the client.

use std::{
    fmt::Write as _,
    net::SocketAddr,
    time::{Duration, Instant},
};

use netkit::{echo_server, wait_for, write_inventory, Daemon, EchoStream, Role, Topology};

/// Which connections move.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Both pods on the upgraded node: local deliveries.
    Local,
    /// The server pod on a second node: tunnel streams (TCP).
    Tunnel,
}

impl Route {
    fn as_str(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Tunnel => "tunnel (TCP)",
        }
    }
}

/// One level's figures.
#[derive(Debug, Clone)]
pub struct Figures {
    /// What moved.
    pub route: Route,
    /// Idle connections opened (and asked for).
    pub idle: (usize, usize),
    /// SIGTERM to the old daemon's exit.
    pub handover: Duration,
    /// Longest gap between the trickle's echoes before / around the handover.
    pub trickle_gap: (Duration, Duration),
    /// Longest gap of the bulk stream before / around the handover.
    pub bulk_gap: (Duration, Duration),
    /// Connections the new daemon holds (idle + 2 streams).
    pub taken: usize,
    /// Idle connections still open at the client afterwards.
    pub alive: usize,
    /// Both streams ended intact (every byte back, in order).
    pub intact: Result<(), String>,
}

/// Measures each (route, level) in a topology of its own.
pub fn run(levels: &[(Route, usize)]) -> Result<Vec<Figures>, String> {
    levels.iter().map(|&(route, n)| one(route, n)).collect()
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

/// The report section.
pub fn markdown(figs: &[Figures]) -> String {
    let mut s = String::from(
        "## Upgrade: connections handed over to the new daemon\n\n\
         N idle connections, a trickle (1 KiB echoed every 10 ms) and a bulk echo stream \
         through the client node's daemon — local deliveries (both pods on that node) or tunnel \
         streams (the server pod on a second node; each stream is quiesced with that node's \
         daemon and resumed by the new one); a new daemon started beside it, then SIGTERM to the \
         old one. Pauses are the longest gap between two echoes, in the seconds before the upgrade \
         (baseline, same run) and from SIGTERM to one second after the old daemon exited.\n\n\
         | route | idle connections | SIGTERM → old daemon gone | trickle pause (before → during) | bulk pause (before → during) | taken over | open afterwards | streams intact |\n\
         |---|---|---|---|---|---|---|---|\n",
    );
    for f in figs {
        let _ = writeln!(
            s,
            "| {} | {} of {} | {} | {} → {} | {} → {} | {} | {} | {} |",
            f.route.as_str(),
            f.idle.0,
            f.idle.1,
            ms(f.handover),
            ms(f.trickle_gap.0),
            ms(f.trickle_gap.1),
            ms(f.bulk_gap.0),
            ms(f.bulk_gap.1),
            f.taken,
            f.alive,
            match &f.intact {
                Ok(()) => "yes".to_string(),
                Err(e) => format!("NO: {e}"),
            }
        );
    }
    s
}

fn one(route: Route, level: usize) -> Result<Figures, String> {
    eprintln!("bench: upgrade with {level} idle connections, {}", route.as_str());
    let (topo, server) = match route {
        Route::Local => {
            let topo = Topology::build(1, 2).map_err(|e| format!("build the topology: {e}"))?;
            let server = topo.pod(0, 1).clone();
            (topo, server)
        }
        Route::Tunnel => {
            let topo = Topology::build(2, 1).map_err(|e| format!("build the topology: {e}"))?;
            let server = topo.pod(1, 0).clone();
            (topo, server)
        }
    };
    let inv = write_inventory(&topo, "inventory.toml", &|_| Role::Strict);
    let client = topo.pod(0, 0).clone();
    let first = start(&topo, &inv, None)?;
    // The server node's daemon (tunnel streams): it stays.
    let peer = match route {
        Route::Local => None,
        Route::Tunnel => Some(start_node(&topo, &inv, 1)?),
    };
    let _holder = crate::apps::Holder::start(&topo, &server, crate::apps::HOLD_PORT)?;
    let echo = SocketAddr::new(server.ip4.into(), 7000);
    echo_server(&server.netns, echo);
    let hold = SocketAddr::new(server.ip4.into(), crate::apps::HOLD_PORT);
    let deadline = Instant::now() + Duration::from_secs(120);
    let opened = crate::apps::open_idle(
        &client.netns,
        hold,
        level,
        deadline,
        crate::procfs::thread_ceiling(),
    );
    if let Some(why) = &opened.stopped_because {
        eprintln!("bench:   opened {} idle connections ({why})", opened.conns.len());
    }
    let trickle = EchoStream::start(&client.netns, echo, 1024, Duration::from_millis(10), u64::MAX)
        .map_err(|e| format!("start the trickle: {e}"))?;
    let bulk = EchoStream::start(&client.netns, echo, 64 * 1024, Duration::ZERO, 1 << 40)
        .map_err(|e| format!("start the bulk stream: {e}"))?;
    let want = opened.conns.len() + 2;
    let count = |d: &Daemon| d.config_dump()["connections"].as_array().map_or(0, Vec::len);
    wait_for(Duration::from_secs(30), || (count(&first) >= want).then_some(())).ok_or_else(
        || with_log(&format!("the daemon holds {} of {want} connections", count(&first)), &first),
    )?;
    let second = start(&topo, &inv, Some(&first))?;
    // Baseline: the same streams' longest pauses over two seconds.
    trickle.reset_max_gap();
    bulk.reset_max_gap();
    std::thread::sleep(Duration::from_secs(2));
    let before = (trickle.max_gap(), bulk.max_gap());
    trickle.reset_max_gap();
    bulk.reset_max_gap();
    let mut first = first;
    let t = Instant::now();
    first.proc.signal(nix::sys::signal::Signal::SIGTERM);
    let exited = first.proc.wait_timeout(Duration::from_secs(150));
    let handover = t.elapsed();
    if exited.is_none() {
        first.proc.kill();
        return Err(with_log(
            &format!("the old daemon did not exit within {}", ms(handover)),
            &first,
        ));
    }
    std::thread::sleep(Duration::from_secs(1));
    let during = (trickle.max_gap(), bulk.max_gap());
    let pid = u64::from(second.proc.pid());
    wait_for(Duration::from_secs(20), || {
        (second.get("/config_dump").ok()?.1["pid"].as_u64() == Some(pid)).then_some(())
    })
    .ok_or("the new daemon did not take the admin port")?;
    let taken = count(&second);
    let alive = opened.conns.iter().filter(|s| is_open(s)).count();
    let intact =
        trickle.finish(false).and_then(|_| bulk.finish(false)).map(drop).map_err(|e| e.to_string());
    drop(opened);
    crate::tlsmesh::stop_and_uninstall(second)?;
    if let Some(p) = peer {
        crate::tlsmesh::stop_and_uninstall(p)?;
    }
    Ok(Figures {
        route,
        idle: (want - 2, level),
        handover,
        trickle_gap: (before.0, during.0),
        bulk_gap: (before.1, during.1),
        taken,
        alive,
        intact,
    })
}

/// `e` with the daemon's last warnings.
fn with_log(e: &str, d: &Daemon) -> String {
    let log = d.log_text();
    let warn: Vec<&str> = log.lines().filter(|l| l.contains("WARN")).collect();
    let last = &warn[warn.len().saturating_sub(5)..];
    format!("{e}; the daemon's last warnings:\n{}", last.join("\n"))
}

/// Starts node 0's daemon (beside `old`, on its pins, when given).
fn start(topo: &Topology, inv: &std::path::Path, old: Option<&Daemon>) -> Result<Daemon, String> {
    let pin = old.map(|d| d.pin_dir.clone());
    start_at(topo, inv, 0, pin)
}

/// Starts node `n`'s daemon on its own pins.
fn start_node(topo: &Topology, inv: &std::path::Path, n: usize) -> Result<Daemon, String> {
    start_at(topo, inv, n, None)
}

fn start_at(
    topo: &Topology,
    inv: &std::path::Path,
    n: usize,
    pin: Option<std::path::PathBuf>,
) -> Result<Daemon, String> {
    let node = topo.node(n).clone();
    let pin = pin.unwrap_or_else(|| topo.pin_dir(&node.name));
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Daemon::start_with_pin(topo, &node, &pin, inv, &["--drain-timeout", "120"])
    }))
    .map_err(|_| "a daemon did not start (see its log in the scratch directory)".to_string())
}

/// True while the connection is open: nothing to read and no EOF or reset.
fn is_open(s: &std::net::TcpStream) -> bool {
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    let mut b = [0u8; 1];
    matches!(s.peek(&mut b), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}
