//! `bench`: the project's benchmark (issue 7). Builds the two-node netns
//! topology (client pod on node 0, server pod on node 1) and measures, in one
//! invocation, plaintext over the veth path, stunnel (mutual TLS 1.3), and
//! tlsmesh over TCP and over QUIC: throughput (1, 2, 8 streams), 1 KiB
//! request/response latency, new connections per second, proxy memory (idle
//! and per idle connection) and CPU per GB. Writes `results/<timestamp>/`
//! (report.md, results.json, plot.svg, logs) and `results/latest.md`, and
//! prints the report. Method and how to read it: docs/BENCHMARKS.md.
//!
//! `bench [--quick] [--rounds N] [--only LIST] [--no-spinners] [--server-permissive] [--out DIR]`

// `Duration::from_mins`/`from_hours` need Rust 1.91; the workspace MSRV is 1.85.
#![allow(clippy::duration_suboptimal_units, reason = "MSRV 1.85 lacks Duration::from_hours")]

mod apps;
mod iperf;
mod placement;
mod procfs;
mod report;
mod stats;
mod stunnel;
mod tlsmesh;
mod upgrade;

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use netkit::{require_root, sh, write_inventory, Pod, Role, Topology};

use crate::{
    report::{Candidate, Kind, MemLevel, Memory, Report, Setup},
    stats::{f, fu},
};

static STOP: AtomicBool = AtomicBool::new(false);

/// Has the user asked the run to stop (SIGINT/SIGTERM)? Every loop checks.
pub fn stopped() -> bool {
    STOP.load(Ordering::Relaxed)
}

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

const USAGE: &str = "usage: bench [--quick] [--rounds N] [--only plaintext,stunnel,tcp,quic] [--no-spinners] \
                     [--pin] [--server-permissive] [--upgrade | --no-upgrade] [--out DIR]\n\
  --quick              1 round, shorter durations (about 2-3 minutes)\n\
  --rounds N           rounds per candidate (default 3, quick 1); figures are medians over rounds\n\
  --only LIST          candidates to run (plaintext always runs: it is the baseline)\n\
  --no-spinners        do not run the two SCHED_IDLE busy loops that keep the vCPUs awake\n\
  --pin                give each simulated node its own CPUs (default: both share every vCPU)\n\
  --server-permissive  enroll the server pod as permissive (harness smoke test only; not a valid result)\n\
  --upgrade            run only the upgrade figure (connections handed over to a new daemon)\n\
  --no-upgrade         skip the upgrade figure (it runs after the candidates when tlsmesh TCP runs)\n\
  --out DIR            results directory (default: <repo>/results)";

/// Command line.
#[derive(Debug, Clone, PartialEq)]
#[allow(clippy::struct_excessive_bools)] // one per command-line flag
struct Opts {
    quick: bool,
    rounds: Option<u32>,
    kinds: Vec<Kind>,
    spinners: bool,
    pin: bool,
    server_permissive: bool,
    /// `Some(true)`: only the upgrade figure; `Some(false)`: none.
    upgrade: Option<bool>,
    out: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        quick: false,
        rounds: None,
        kinds: Kind::ALL.to_vec(),
        spinners: true,
        pin: false,
        server_permissive: false,
        upgrade: None,
        out: None,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut value =
            |name: &str| it.next().cloned().ok_or_else(|| format!("{name} needs a value"));
        match a.as_str() {
            "--quick" => o.quick = true,
            "--no-spinners" => o.spinners = false,
            "--pin" => o.pin = true,
            "--server-permissive" => o.server_permissive = true,
            "--upgrade" => o.upgrade = Some(true),
            "--no-upgrade" => o.upgrade = Some(false),
            "--rounds" => {
                let v = value("--rounds")?;
                let n: u32 = v.parse().map_err(|_| format!("--rounds: not a number: {v}"))?;
                if !(1..=20).contains(&n) {
                    return Err("--rounds must be 1..=20".into());
                }
                o.rounds = Some(n);
            }
            "--only" => {
                let v = value("--only")?;
                let mut kinds = vec![Kind::Plaintext];
                for name in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
                    let k = Kind::ALL
                        .into_iter()
                        .find(|k| k.flag() == name)
                        .ok_or_else(|| format!("--only: unknown candidate {name}"))?;
                    if !kinds.contains(&k) {
                        kinds.push(k);
                    }
                }
                kinds.sort_by_key(|k| Kind::ALL.iter().position(|x| x == k));
                o.kinds = kinds;
            }
            "--out" => o.out = Some(PathBuf::from(value("--out")?)),
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(o)
}

/// Durations and sizes of a run.
#[derive(Debug, Clone)]
struct Plan {
    rounds: u32,
    iperf_secs: u32,
    streams: Vec<u32>,
    rr_warmup: Duration,
    rr: Duration,
    rr_max: usize,
    cps: Duration,
    clients: Vec<u32>,
    idle_levels: Vec<usize>,
    mem_deadline: Duration,
}

impl Plan {
    fn new(o: &Opts) -> Self {
        let q = o.quick;
        Self {
            rounds: o.rounds.unwrap_or(if q { 1 } else { 3 }),
            iperf_secs: if q { 2 } else { 5 },
            streams: vec![1, 2, 8],
            rr_warmup: Duration::from_millis(if q { 200 } else { 300 }),
            rr: Duration::from_secs_f64(if q { 1.0 } else { 3.0 }),
            rr_max: 2_000_000,
            cps: Duration::from_secs_f64(if q { 1.5 } else { 3.0 }),
            clients: vec![1, 8],
            idle_levels: vec![1_000, 10_000],
            mem_deadline: Duration::from_secs(if q { 25 } else { 90 }),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, port] = args.as_slice() {
        if flag == "--hold" {
            apps::hold_main(port.parse().unwrap_or(apps::HOLD_PORT));
        }
    }
    let opts = match parse_args(&args) {
        Ok(o) => o,
        Err(e) => {
            if !e.is_empty() {
                eprintln!("bench: {e}");
            }
            eprintln!("{USAGE}");
            std::process::exit(2);
        }
    };
    if !require_root("bench") {
        std::process::exit(1);
    }
    if let Err(e) = preflight(&opts) {
        eprintln!("bench: {e}");
        std::process::exit(1);
    }
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    match procfs::raise_nofile(262_144) {
        Ok(n) if n < 25_000 => eprintln!(
            "bench: open-file limit {n} (cannot raise it further here); a proxy that needs two descriptors per connection cannot hold 10,000"
        ),
        Ok(n) => eprintln!("bench: open-file limit {n} (inherited by the proxies)"),
        Err(e) => eprintln!("bench: warning: {e}; 10,000 idle connections may not fit"),
    }
    let code = match run(&opts) {
        Ok(()) if stopped() => 130,
        Ok(()) => 0,
        Err(e) => {
            eprintln!("bench: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn preflight(o: &Opts) -> Result<(), String> {
    let mut tools = vec!["iperf3", "ip"];
    if o.kinds.contains(&Kind::Stunnel) {
        tools.extend(["stunnel", "openssl"]);
    }
    for t in tools {
        if sh(&["sh", "-c", &format!("command -v {t}")]).is_err() {
            return Err(format!(
                "{t} not found; scripts/bootstrap.sh (or `cargo xtask setup`) installs it"
            ));
        }
    }
    if o.kinds.iter().any(|k| k.is_tlsmesh()) {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let bin = exe.with_file_name("tlsmesh");
        if !bin.is_file() {
            return Err(format!(
                "{} not found; build it with `cargo build --release -p tlsmesh -p tlsmesh-tests --bins` (or run `cargo xtask bench`)",
                bin.display()
            ));
        }
    }
    Ok(())
}

/// What the measurements talk to.
struct Ctx<'a> {
    topo: &'a Topology,
    client: Pod,
    server: Pod,
    plan: &'a Plan,
    inventory: PathBuf,
    server_role: Role,
    pki: Result<stunnel::Pki, String>,
    /// The tlsmesh CA (`tlsmesh ca init`), made by the bench so it can be
    /// made again if the scratch directory disappears.
    ca_dir: PathBuf,
}

impl Ctx<'_> {
    /// Re-creates the scratch files a candidate needs when something outside
    /// the run removed them (e.g. `cargo xtask cleanup` run concurrently,
    /// which deletes every `/tmp/tmk-*`). Returns what it had to re-create.
    fn ensure_files(&self, kind: Kind) -> Result<Option<String>, String> {
        let mut redone = Vec::new();
        if kind == Kind::Stunnel {
            if let Ok(pki) = &self.pki {
                if !pki.all_exist() {
                    stunnel::make_pki(&pki.dir, self.server.ip4)?;
                    redone.push("stunnel certificates");
                }
            }
        }
        if kind.is_tlsmesh() {
            if !self.inventory.is_file() {
                let role = self.server_role;
                write_inventory(self.topo, "inventory.toml", &|p| {
                    if p.node == 1 {
                        role
                    } else {
                        Role::Strict
                    }
                });
                redone.push("inventory");
            }
            if !self.ca_dir.is_dir() {
                make_ca(&self.ca_dir)?;
                redone.push("CA");
            }
        }
        Ok((!redone.is_empty()).then(|| {
            format!("scratch files vanished during the run (removed by another process?); re-created: {}", redone.join(", "))
        }))
    }
}

/// `tlsmesh ca init` into `dir`.
fn make_ca(dir: &Path) -> Result<(), String> {
    let bin = netkit::tlsmesh_bin();
    let out = std::process::Command::new(&bin)
        .args(["ca", "init", "--trust-domain", "cluster.local", "--dir"])
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("run {} ca init: {e}", bin.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("tlsmesh ca init: {}", String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A started candidate.
enum Running {
    Plaintext,
    Stunnel(stunnel::Stunnel),
    Tlsmesh(Box<tlsmesh::Pair>),
}

impl Running {
    /// Where the client pod connects to reach application port `port`.
    fn dst(&self, ctx: &Ctx, port: u16) -> SocketAddr {
        match self {
            Running::Stunnel(_) => stunnel::local_addr(port),
            _ => SocketAddr::new(ctx.server.ip4.into(), port),
        }
    }

    /// The proxy processes: (what, pid), client side first.
    fn procs(&self) -> Vec<(String, u32)> {
        match self {
            Running::Plaintext => Vec::new(),
            Running::Stunnel(s) => {
                vec![
                    ("client side stunnel".into(), s.client.pid()),
                    ("server side stunnel".into(), s.server.pid()),
                ]
            }
            Running::Tlsmesh(p) => {
                vec![
                    ("client side daemon (n0)".into(), p.client.proc.pid()),
                    ("server side daemon (n1)".into(), p.server.proc.pid()),
                ]
            }
        }
    }
}

/// The upgrade figure alone (`--upgrade`), or after the candidates.
fn run_upgrade(opts: &Opts, out_dir: &Path) -> Result<(), String> {
    // Each local connection holds two sockets in the daemon: 10,000 fit
    // only where the open-file limit is above 22,000.
    let limit = procfs::raise_nofile(262_144).unwrap_or(20_000);
    let most = usize::try_from(limit.saturating_sub(2_000) / 2 / 1_000 * 1_000)
        .unwrap_or(10_000)
        .clamp(1_000, 10_000);
    // A tunnel stream holds one socket in the upgraded daemon: 10,000 fit.
    let tunnel_most = usize::try_from(limit.saturating_sub(2_000) / 1_000 * 1_000)
        .unwrap_or(10_000)
        .clamp(1_000, 10_000);
    let levels: Vec<(upgrade::Route, usize)> = if opts.quick {
        vec![(upgrade::Route::Local, 1_000), (upgrade::Route::Tunnel, 1_000)]
    } else {
        vec![
            (upgrade::Route::Local, 1_000),
            (upgrade::Route::Local, most),
            (upgrade::Route::Tunnel, 1_000),
            (upgrade::Route::Tunnel, tunnel_most),
        ]
    };
    let md = upgrade::markdown(&upgrade::run(&levels)?);
    let path = out_dir.join("upgrade.md");
    fs::write(&path, &md).map_err(|e| format!("write {}: {e}", path.display()))?;
    println!("\n{md}\nWritten: {}", path.display());
    Ok(())
}

fn run(opts: &Opts) -> Result<(), String> {
    if opts.upgrade == Some(true) {
        let (_, stamp) = utc_stamp(SystemTime::now());
        let out_root = opts.out.clone().unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new(".")).join("results")
        });
        let out_dir = out_root.join(&stamp);
        fs::create_dir_all(&out_dir).map_err(|e| format!("create {}: {e}", out_dir.display()))?;
        return run_upgrade(opts, &out_dir);
    }
    let t0 = Instant::now();
    let load_start = procfs::loadavg();
    let (started_utc, stamp) = utc_stamp(SystemTime::now());
    let plan = Plan::new(opts);
    let out_root = opts.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap_or(Path::new(".")).join("results")
    });
    let out_dir = out_root.join(&stamp);
    fs::create_dir_all(&out_dir).map_err(|e| format!("create {}: {e}", out_dir.display()))?;

    let placement = placement::init(opts.pin);
    eprintln!("bench: {placement}");
    eprintln!("bench: building the two-node topology");
    let topo = Topology::build(2, 1).map_err(|e| format!("build the topology: {e}"))?;
    let (client, server) = (topo.pod(0, 0).clone(), topo.pod(1, 0).clone());
    eprintln!(
        "bench: topology {} (client pod {} {}, server pod {} {})",
        topo.id(),
        client.name,
        client.ip4,
        server.name,
        server.ip4
    );
    // TIME_WAIT sockets of the new-connection runs must not exhaust the
    // client's ephemeral ports: reuse them (our namespaces only).
    for ns in [&client.netns, &server.netns, &topo.node(0).netns, &topo.node(1).netns] {
        sh(&["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
            .map_err(|e| e.to_string())?;
    }
    apps::start_echo(&server.netns, apps::ECHO_PORT)
        .map_err(|e| format!("start the echo server: {e}"))?;
    let pki = if opts.kinds.contains(&Kind::Stunnel) {
        stunnel::make_pki(&topo.scratch_dir().join("pki"), server.ip4)
    } else {
        Err("not selected".into())
    };
    let server_role = if opts.server_permissive { Role::Permissive } else { Role::Strict };
    let inventory = write_inventory(&topo, "inventory.toml", &|p| {
        if p.node == 1 {
            server_role
        } else {
            Role::Strict
        }
    });
    let ca_dir = topo.scratch_dir().join("bench-ca");
    if opts.kinds.iter().any(|k| k.is_tlsmesh()) {
        make_ca(&ca_dir)?;
    }
    let ctx = Ctx { topo: &topo, client, server, plan: &plan, inventory, server_role, pki, ca_dir };

    let condition = format!(
        "{}; {placement}",
        if opts.spinners {
            "Two SCHED_IDLE busy loops kept both vCPUs awake during all measurements"
        } else {
            "No busy loops: idle vCPUs (wake-up latency included)"
        }
    );
    let spinners = if opts.spinners {
        Some(apps::Spinners::start(2, Duration::from_secs(3600))?)
    } else {
        None
    };

    let mut cands: Vec<Candidate> =
        opts.kinds.iter().map(|k| Candidate::new(*k, &plan.streams, &plan.clients)).collect();
    if opts.server_permissive {
        for c in cands.iter_mut().filter(|c| c.kind.is_tlsmesh()) {
            c.notes.push("server pod PERMISSIVE (--server-permissive): harness smoke test, not a valid result".into());
        }
    }
    'rounds: for round in 0..plan.rounds {
        for c in &mut cands {
            if stopped() {
                break 'rounds;
            }
            eprintln!("bench: round {}/{}: {}", round + 1, plan.rounds, c.label);
            run_round(&ctx, c, round);
        }
    }
    drop(spinners);
    let logs = tlsmesh::keep_logs(&topo, &out_dir.join("logs"));
    drop(ctx);
    drop(topo);

    let targets = report::evaluate(&cands);
    let r = Report {
        setup: setup_info(opts, &plan, started_utc, &condition, t0, load_start),
        candidates: cands,
        targets,
    };
    write_outputs(&r, &out_root, &stamp, logs.len())?;
    if opts.upgrade.is_none() && opts.kinds.contains(&Kind::TlsmeshTcp) && !stopped() {
        run_upgrade(opts, &out_dir)?;
    }
    Ok(())
}

/// How the run was made, for the report.
fn setup_info(
    opts: &Opts,
    plan: &Plan,
    started_utc: String,
    condition: &str,
    t0: Instant,
    load_start: Option<f64>,
) -> Setup {
    Setup {
        started_utc,
        quick: opts.quick,
        rounds: plan.rounds,
        iperf_seconds: plan.iperf_secs,
        rr_seconds: plan.rr.as_secs_f64(),
        cps_seconds: plan.cps.as_secs_f64(),
        idle_levels: plan.idle_levels.clone(),
        condition: if stopped() {
            format!("{condition}. INTERRUPTED: incomplete")
        } else {
            condition.to_string()
        },
        cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        server_mode: if opts.server_permissive {
            "permissive (smoke test)".into()
        } else {
            "strict".into()
        },
        duration_seconds: t0.elapsed().as_secs_f64(),
        load_start,
        load_end: procfs::loadavg(),
    }
}

/// Writes results/<stamp>/{results.json,plot.svg,report.md} and
/// results/latest.md, and prints the report.
fn write_outputs(r: &Report, out_root: &Path, stamp: &str, logs: usize) -> Result<(), String> {
    let out_dir = out_root.join(stamp);
    let json = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    let write =
        |p: &Path, s: &str| fs::write(p, s).map_err(|e| format!("write {}: {e}", p.display()));
    write(&out_dir.join("results.json"), &json)?;
    write(&out_dir.join("plot.svg"), &report::svg(r))?;
    let md = report::markdown(r, Some("plot.svg"));
    write(&out_dir.join("report.md"), &md)?;
    write(&out_root.join("latest.md"), &report::markdown(r, Some(&format!("{stamp}/plot.svg"))))?;
    println!("{md}");
    println!(
        "\nWritten: {}/{{report.md,results.json,plot.svg}}{} and {}",
        out_dir.display(),
        if logs == 0 { String::new() } else { format!(", {logs} log(s) in logs/") },
        out_root.join("latest.md").display()
    );
    Ok(())
}

fn start(ctx: &Ctx, kind: Kind) -> Result<Running, String> {
    match kind {
        Kind::Plaintext => Ok(Running::Plaintext),
        Kind::Stunnel => {
            let pki = ctx.pki.as_ref().map_err(|e| format!("certificates: {e}"))?;
            stunnel::start(ctx.topo, pki, &ctx.client, &ctx.server).map(Running::Stunnel)
        }
        Kind::TlsmeshTcp => tlsmesh::start(ctx.topo, &ctx.inventory, &ctx.ca_dir, "tcp")
            .map(|p| Running::Tlsmesh(Box::new(p))),
        Kind::TlsmeshQuic => tlsmesh::start(ctx.topo, &ctx.inventory, &ctx.ca_dir, "quic")
            .map(|p| Running::Tlsmesh(Box::new(p))),
    }
}

fn stop(running: Running) -> Result<(), String> {
    match running {
        Running::Plaintext => Ok(()),
        Running::Stunnel(mut s) => {
            s.client.kill();
            s.server.kill();
            Ok(())
        }
        Running::Tlsmesh(p) => tlsmesh::stop(*p),
    }
}

/// After a tlsmesh candidate: clear what its daemons left in the pods.
fn clear_tlsmesh_residue(ctx: &Ctx, c: &mut Candidate) {
    let found = tlsmesh::clear_residue(&[&ctx.client, &ctx.server]);
    if !found.is_empty() {
        let note = format!(
            "the stopped daemons (after `tlsmesh node --uninstall`) left behind: {}; the benchmark removed that before the next candidate",
            found.join(", ")
        );
        if !c.notes.contains(&note) {
            c.notes.push(note);
        }
    }
}

fn fail_round(c: &mut Candidate, why: &str) {
    for p in c.throughput_gbps.iter_mut().chain(c.cps.iter_mut()) {
        p.figure.push(Err(why.to_string()));
    }
    for f in [&mut c.rr_p50_us, &mut c.rr_p99_us, &mut c.rr_p999_us, &mut c.rr_rate] {
        f.push(Err(why.to_string()));
    }
    if c.kind != Kind::Plaintext {
        c.cpu_s_per_gb.push(Err(why.to_string()));
    }
}

fn run_round(ctx: &Ctx, cand: &mut Candidate, round: u32) {
    match ctx.ensure_files(cand.kind) {
        Ok(Some(note)) => {
            eprintln!("bench:   {note}");
            cand.notes.push(format!("round {}: {note}", round + 1));
        }
        Ok(None) => {}
        Err(e) => {
            cand.notes.push(format!("round {}: cannot re-create scratch files: {e}", round + 1));
        }
    }
    let running = match start(ctx, cand.kind) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("bench:   {} did not start: {e}", cand.label);
            cand.setup_errors.push(format!("round {}: {e}", round + 1));
            fail_round(cand, &e);
            if cand.kind.is_tlsmesh() {
                clear_tlsmesh_residue(ctx, cand);
            }
            return;
        }
    };
    let procs = running.procs();
    let pids: Vec<u32> = procs.iter().map(|p| p.1).collect();
    if round == 0 && cand.kind != Kind::Plaintext {
        let m = memory(ctx, &running, &procs);
        eprintln!(
            "bench:   memory: idle {:?} KiB, {:?}",
            m.idle_kib,
            m.levels.iter().map(|l| (l.reached, &l.bytes_per_conn)).collect::<Vec<_>>()
        );
        cand.memory = Some(m);
    }
    let routes_before = match &running {
        Running::Tlsmesh(p) => tlsmesh::Routes::read(p).ok(),
        _ => None,
    };

    measure_throughput(ctx, cand, &running, &pids);
    if let (Running::Tlsmesh(p), Kind::TlsmeshQuic) = (&running, cand.kind) {
        let note = tlsmesh::quic_path_note(p)
            .unwrap_or_else(|e| format!("cannot read the QUIC path: {e}"));
        eprintln!("bench:   {note}");
        cand.notes.push(format!("round {}: {note}", round + 1));
    }
    if !stopped() {
        measure_rr(ctx, cand, &running);
    }
    measure_cps(ctx, cand, &running);

    if let (Running::Tlsmesh(p), Some(before)) = (&running, routes_before) {
        match tlsmesh::Routes::read(p) {
            Ok(after) => {
                let d = after.since(before);
                cand.routes.get_or_insert_with(tlsmesh::Routes::default).add(d);
                eprintln!("bench:   route counters this round: {d:?}");
            }
            Err(e) => {
                cand.notes
                    .push(format!("round {}: cannot read the route counters: {e}", round + 1));
            }
        }
    }
    if let Err(e) = stop(running) {
        eprintln!("bench:   stopping {}: {e}", cand.label);
        cand.setup_errors.push(format!("round {} (stop): {e}", round + 1));
    }
    if cand.kind.is_tlsmesh() {
        clear_tlsmesh_residue(ctx, cand);
    }
}

/// Throughput with 1, 2 and 8 streams; CPU per GB on the 1-stream run.
fn measure_throughput(ctx: &Ctx, cand: &mut Candidate, running: &Running, pids: &[u32]) {
    let plan = ctx.plan;
    for i in 0..cand.throughput_gbps.len() {
        if stopped() {
            break;
        }
        let n = cand.throughput_gbps[i].n;
        let mut cpu: Vec<Result<u64, String>> = Vec::new();
        let measure_cpu = n == 1 && !pids.is_empty();
        let res = iperf::run(
            ctx.topo,
            &ctx.client,
            &ctx.server,
            running.dst(ctx, iperf::PORT),
            n,
            plan.iperf_secs,
            &mut || {
                if measure_cpu {
                    cpu.push(procfs::cpu_ticks_sum(pids));
                }
            },
        );
        eprintln!(
            "bench:   throughput, {n} stream(s): {}",
            show(res.as_ref().map(|r| format!("{:.2} Gbit/s", r.bits_per_second / 1e9)))
        );
        if measure_cpu {
            let v = match (&res, cpu.as_slice()) {
                (Ok(run), [Ok(a), Ok(b)]) => {
                    Ok(f(b.saturating_sub(*a)) / f(procfs::ticks_per_second()) / (run.bytes / 1e9))
                }
                (Err(e), _) | (_, [Err(e), ..] | [_, Err(e)]) => Err(e.clone()),
                _ => Err("CPU not sampled".into()),
            };
            eprintln!("bench:   CPU: {}", show(v.as_ref().map(|v| format!("{v:.2} s/GB"))));
            cand.cpu_s_per_gb.push(v);
        }
        cand.throughput_gbps[i].figure.push(res.map(|r| r.bits_per_second / 1e9));
    }
}

/// 1 KiB request/response on one held connection.
fn measure_rr(ctx: &Ctx, cand: &mut Candidate, running: &Running) {
    let plan = ctx.plan;
    let r = apps::rr(
        &ctx.client.netns,
        running.dst(ctx, apps::ECHO_PORT),
        plan.rr_warmup,
        plan.rr,
        plan.rr_max,
    );
    eprintln!(
        "bench:   1 KiB RR: {}",
        show(r.as_ref().map(|r| format!(
            "p50 {:.1} µs, p99 {:.1} µs, p999 {:.1} µs, {:.0}/s ({} samples)",
            r.p50_us, r.p99_us, r.p999_us, r.rate, r.samples
        )))
    );
    cand.rr_p50_us.push(r.as_ref().map(|r| r.p50_us).map_err(Clone::clone));
    cand.rr_p99_us.push(r.as_ref().map(|r| r.p99_us).map_err(Clone::clone));
    cand.rr_p999_us.push(r.as_ref().map(|r| r.p999_us).map_err(Clone::clone));
    cand.rr_rate.push(r.map(|r| r.rate));
}

/// New connections per second with 1 and 8 client threads.
fn measure_cps(ctx: &Ctx, cand: &mut Candidate, running: &Running) {
    let plan = ctx.plan;
    for i in 0..cand.cps.len() {
        if stopped() {
            break;
        }
        let n = cand.cps[i].n;
        let threads = usize::try_from(n).unwrap_or(1);
        let r = apps::cps(&ctx.client.netns, running.dst(ctx, apps::ECHO_PORT), threads, plan.cps);
        eprintln!(
            "bench:   new connections, {n} client(s): {}",
            show(r.as_ref().map(|v| format!("{v:.0}/s")))
        );
        cand.cps[i].figure.push(r);
    }
}

fn show(r: Result<String, &String>) -> String {
    r.unwrap_or_else(|e| format!("FAILED: {e}"))
}

/// RSS of the proxies idle, then with 1,000 and 10,000 idle connections
/// (each confirmed end to end) open through them.
fn memory(ctx: &Ctx, running: &Running, procs: &[(String, u32)]) -> Memory {
    let mut m =
        Memory { processes: procs.iter().map(|p| p.0.clone()).collect(), ..Memory::default() };
    let rss = || procs.iter().map(|p| procfs::rss_kib(p.1)).collect::<Result<Vec<u64>, String>>();
    std::thread::sleep(Duration::from_millis(500));
    m.idle_kib = match rss() {
        Ok(v) => v,
        Err(e) => {
            m.error = Some(e);
            return m;
        }
    };
    let holder = match apps::Holder::start(ctx.topo, &ctx.server, apps::HOLD_PORT) {
        Ok(h) => h,
        Err(e) => {
            m.error = Some(format!("start the idle-connection holder: {e}"));
            return m;
        }
    };
    let dst = running.dst(ctx, apps::HOLD_PORT);
    let deadline = Instant::now() + ctx.plan.mem_deadline;
    let ceiling = procfs::thread_ceiling();
    let mut open: Vec<TcpStream> = Vec::new();
    for &level in &ctx.plan.idle_levels {
        if stopped() {
            break;
        }
        let o = apps::open_idle(
            &ctx.client.netns,
            dst,
            level.saturating_sub(open.len()),
            deadline,
            ceiling,
        );
        open.extend(o.conns);
        // Let the proxies finish their per-connection set-up.
        std::thread::sleep(Duration::from_secs(1));
        match rss() {
            Ok(now) => {
                let per = now
                    .iter()
                    .zip(&m.idle_kib)
                    .map(|(n, i)| {
                        if open.is_empty() {
                            f64::NAN
                        } else {
                            (f(*n) - f(*i)) * 1024.0 / fu(open.len())
                        }
                    })
                    .collect();
                m.levels.push(MemLevel {
                    target: level,
                    reached: open.len(),
                    rss_kib: now,
                    bytes_per_conn: per,
                });
            }
            Err(e) => {
                m.stopped_because = Some(format!("reading RSS: {e}"));
                break;
            }
        }
        if let Some(why) = o.stopped_because {
            m.stopped_because = Some(why);
            break;
        }
    }
    if m.levels.iter().all(|l| l.reached == 0) {
        m.error = m
            .error
            .take()
            .or_else(|| m.stopped_because.take())
            .or_else(|| Some("no connection opened".into()));
    }
    drop(open);
    drop(holder);
    std::thread::sleep(Duration::from_secs(1));
    m
}

/// (ISO 8601 UTC, directory-safe stamp) of a time.
fn utc_stamp(t: SystemTime) -> (String, String) {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(i64::try_from(days).unwrap_or(0));
    let (hour, min, sec) = (rem / 3600, rem % 3600 / 60, rem % 60);
    (
        format!("{year:04}-{month:02}-{day:02}T{hour:02}:{min:02}:{sec:02}Z"),
        format!("{year:04}{month:02}{day:02}T{hour:02}{min:02}{sec:02}Z"),
    )
}

/// Days since 1970-01-01 → (year, month, day), proleptic Gregorian
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn arguments() {
        let o = parse_args(&args("--quick")).unwrap();
        assert!(o.quick && o.spinners && !o.pin && !o.server_permissive);
        assert!(parse_args(&args("--pin")).unwrap().pin);
        assert_eq!(o.kinds, Kind::ALL);
        assert_eq!(Plan::new(&o).rounds, 1);
        let o =
            parse_args(&args("--only quic,stunnel --rounds 5 --no-spinners --out /tmp/x")).unwrap();
        assert_eq!(
            o.kinds,
            [Kind::Plaintext, Kind::Stunnel, Kind::TlsmeshQuic],
            "plaintext always, in run order"
        );
        assert_eq!((o.rounds, o.spinners, o.out), (Some(5), false, Some(PathBuf::from("/tmp/x"))));
        assert_eq!(Plan::new(&parse_args(&[]).unwrap()).rounds, 3);
        assert!(parse_args(&args("--rounds 0")).is_err());
        assert!(parse_args(&args("--only bogus")).is_err());
        assert!(parse_args(&args("--rounds")).is_err());
        assert!(parse_args(&args("--frobnicate")).is_err());
    }

    #[test]
    fn timestamps() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_723), (2024, 1, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(utc_stamp(t), ("2023-11-14T22:13:20Z".into(), "20231114T221320Z".into()));
    }
}
