//! What a run produced and how it is shown: the result model (serialized to
//! JSON as is), the markdown tables, the target verdicts, and the SVG plot.
//! Everything here is pure: data in, text out.

use std::fmt::Write as _;

use serde::Serialize;

use crate::{stats::Figure, tlsmesh::Routes};

/// A candidate under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Plaintext,
    Stunnel,
    TlsmeshTcp,
    TlsmeshQuic,
}

impl Kind {
    /// All, in the order they run and are shown.
    pub const ALL: [Kind; 4] =
        [Kind::Plaintext, Kind::Stunnel, Kind::TlsmeshTcp, Kind::TlsmeshQuic];

    /// Column heading.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Plaintext => "plaintext",
            Kind::Stunnel => "stunnel",
            Kind::TlsmeshTcp => "tlsmesh TCP",
            Kind::TlsmeshQuic => "tlsmesh QUIC",
        }
    }

    /// Name on the command line (`--only`).
    pub fn flag(self) -> &'static str {
        match self {
            Kind::Plaintext => "plaintext",
            Kind::Stunnel => "stunnel",
            Kind::TlsmeshTcp => "tcp",
            Kind::TlsmeshQuic => "quic",
        }
    }

    /// Is it a tlsmesh candidate (the targets apply to it)?
    pub fn is_tlsmesh(self) -> bool {
        matches!(self, Kind::TlsmeshTcp | Kind::TlsmeshQuic)
    }
}

/// A figure measured with `n` parallel streams or client threads.
#[derive(Debug, Clone, Serialize)]
pub struct PerN {
    pub n: u32,
    #[serde(flatten)]
    pub figure: Figure,
}

/// One process's memory at one level of idle connections.
#[derive(Debug, Clone, Serialize)]
pub struct MemLevel {
    /// Connections asked for.
    pub target: usize,
    /// Connections actually open (confirmed end to end).
    pub reached: usize,
    /// RSS per process (same order as `Memory::processes`), KiB.
    pub rss_kib: Vec<u64>,
    /// (RSS here − RSS idle) / reached, bytes, per process.
    pub bytes_per_conn: Vec<f64>,
}

/// Memory of a candidate's processes, idle and with idle connections open.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Memory {
    /// What each process is ("client side", "server side").
    pub processes: Vec<String>,
    /// RSS right after start-up, before any traffic, KiB.
    pub idle_kib: Vec<u64>,
    pub levels: Vec<MemLevel>,
    /// Why opening connections stopped short, if it did.
    pub stopped_because: Option<String>,
    /// Why nothing could be measured, if so.
    pub error: Option<String>,
}

/// Everything measured for one candidate.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub kind: Kind,
    pub label: &'static str,
    /// Start-up or tear-down failures, one per round they happened in.
    pub setup_errors: Vec<String>,
    /// iperf3 receiver rate, Gbit/s.
    pub throughput_gbps: Vec<PerN>,
    pub rr_p50_us: Figure,
    pub rr_p99_us: Figure,
    pub rr_p999_us: Figure,
    /// Round trips per second.
    pub rr_rate: Figure,
    /// New connections per second.
    pub cps: Vec<PerN>,
    /// CPU seconds (all processes of the candidate) per 10^9 bytes.
    pub cpu_s_per_gb: Figure,
    pub memory: Option<Memory>,
    /// tlsmesh daemons' route counters summed over all rounds.
    pub routes: Option<Routes>,
    pub notes: Vec<String>,
}

impl Candidate {
    /// An empty result for `kind`.
    pub fn new(kind: Kind, streams: &[u32], clients: &[u32]) -> Self {
        let per =
            |ns: &[u32]| ns.iter().map(|n| PerN { n: *n, figure: Figure::default() }).collect();
        Self {
            kind,
            label: kind.label(),
            setup_errors: Vec::new(),
            throughput_gbps: per(streams),
            rr_p50_us: Figure::default(),
            rr_p99_us: Figure::default(),
            rr_p999_us: Figure::default(),
            rr_rate: Figure::default(),
            cps: per(clients),
            cpu_s_per_gb: Figure::default(),
            memory: None,
            routes: None,
            notes: Vec::new(),
        }
    }

    /// Throughput with `n` streams.
    pub fn tput(&self, n: u32) -> Option<&Figure> {
        self.throughput_gbps.iter().find(|p| p.n == n).map(|p| &p.figure)
    }

    /// New connections per second with `n` clients.
    pub fn cps_n(&self, n: u32) -> Option<&Figure> {
        self.cps.iter().find(|p| p.n == n).map(|p| &p.figure)
    }

    /// Why its figures are not those of what it claims to be (tlsmesh that
    /// did not use the tunnel).
    pub fn invalid(&self) -> Option<String> {
        let r = self.routes.as_ref().filter(|r| r.outbound_tunnel == 0)?;
        Some(format!(
            "NOT of the mTLS tunnel: no connection was tunnelled ({} passed through in plaintext, {} refused)",
            r.outbound_passthrough,
            r.inbound_plaintext_refused + r.outbound_failed
        ))
    }
}

/// How the run was made.
#[derive(Debug, Clone, Serialize)]
pub struct Setup {
    pub started_utc: String,
    pub quick: bool,
    pub rounds: u32,
    pub iperf_seconds: u32,
    pub rr_seconds: f64,
    pub cps_seconds: f64,
    pub idle_levels: Vec<usize>,
    pub condition: String,
    pub cpus: usize,
    pub kernel: String,
    pub server_mode: String,
    pub duration_seconds: f64,
    /// 1-minute load average when the run started and when it ended.
    pub load_start: Option<f64>,
    pub load_end: Option<f64>,
}

impl Setup {
    /// A warning when something else was using the machine.
    fn busy_warning(&self) -> Option<String> {
        // Only the load at the start says something about other work: the
        // run's own processes (and the spinners) count in the load at the end.
        let start = self.load_start?;
        (start > crate::stats::fu(self.cpus.max(1))).then(|| {
            format!(
                "**The machine was busy** (1-minute load average {start:.1} before the run on {} CPUs; {} at the end, which includes the run's own work): other work competed with the run, expect noisy figures; rerun on a quiet machine.",
                self.cpus,
                self.load_end.map_or("?".into(), |l| format!("{l:.1}")),
            )
        })
    }
}

/// The whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub setup: Setup,
    pub candidates: Vec<Candidate>,
    pub targets: Vec<Target>,
}

/// One target and its verdict per tlsmesh candidate.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub name: String,
    pub verdicts: Vec<Verdict>,
}

/// `met`: `Some(true/false)`, or `None` when it could not be judged.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub kind: Kind,
    pub met: Option<bool>,
    pub detail: String,
}

/// ztunnel's figures, measured elsewhere on this kind of machine
/// (docs: /work/shared/notes/ebpf-on-this-machine.md): shown, never measured.
pub mod ztunnel {
    pub const TPUT1_RATIO: f64 = 0.41;
    pub const RR_P50_US: f64 = 145.0;
    pub const RR_P50_PLAINTEXT_US: f64 = 21.0;
    pub const RR_P99_US: f64 = 217.0;
    pub const CPS_1: f64 = 1100.0;
    pub const CPS_8: f64 = 2100.0;
    pub const CPU_S_PER_GB: f64 = 2.15;
}

const KIB: f64 = 1024.0;
const MIB: f64 = 1024.0 * 1024.0;

fn find(cands: &[Candidate], k: Kind) -> Option<&Candidate> {
    cands.iter().find(|c| c.kind == k)
}

fn short(reason: &str) -> String {
    let one: String = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut s: String = one.chars().take(90).collect();
    if one.chars().count() > 90 {
        s.push('…');
    }
    s.replace('|', "\\|")
}

/// `x` with about three significant digits.
fn num(x: f64) -> String {
    let a = x.abs();
    if a >= 1000.0 {
        // Thousands separators for counts and rates.
        #[expect(clippy::cast_possible_truncation, reason = "rounded, far below i64::MAX")]
        let r = x.round() as i64;
        let digits = r.unsigned_abs().to_string();
        let first = match digits.len() % 3 {
            0 => 3,
            k => k,
        };
        let mut out = digits[..first].to_string();
        for group in digits.as_bytes()[first..].chunks(3) {
            out.push(',');
            out.push_str(std::str::from_utf8(group).unwrap_or_default());
        }
        if r < 0 {
            out.insert(0, '-');
        }
        out
    } else if a >= 100.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn range(f: &Figure) -> String {
    match (f.min, f.max, f.values.len()) {
        (Some(a), Some(b), n) if n > 1 => format!("; {}–{}", num(a), num(b)),
        _ => String::new(),
    }
}

fn failed(f: &Figure) -> Option<String> {
    f.failure().map(|r| format!("failed: {}", short(r)))
}

/// A "higher is better" cell: median (ratio to the baseline; min–max).
fn cell_ratio(f: &Figure, base: Option<&Figure>, is_base: bool) -> String {
    if let Some(fail) = failed(f) {
        return fail;
    }
    let m = num(f.median.unwrap_or(f64::NAN));
    let ratio = if is_base { None } else { base.and_then(|b| f.ratio_to(b)) };
    match ratio {
        Some(r) => format!("{m} ({r:.2}×{})", range(f)),
        None if f.values.len() > 1 => format!("{m} ({})", range(f).trim_start_matches("; ")),
        None => m,
    }
}

/// A latency cell: median (+added over the baseline; min–max).
fn cell_latency(f: &Figure, base: Option<&Figure>, is_base: bool) -> String {
    if let Some(fail) = failed(f) {
        return fail;
    }
    let m = num(f.median.unwrap_or(f64::NAN));
    let added = if is_base { None } else { base.and_then(|b| f.minus(b)) };
    match added {
        Some(a) => format!("{m} (+{}{})", num(a), range(f)),
        None if f.values.len() > 1 => format!("{m} ({})", range(f).trim_start_matches("; ")),
        None => m,
    }
}

fn cell_plain(f: &Figure) -> String {
    if let Some(fail) = failed(f) {
        return fail;
    }
    let m = num(f.median.unwrap_or(f64::NAN));
    if f.values.len() > 1 {
        format!("{m} ({})", range(f).trim_start_matches("; "))
    } else {
        m
    }
}

fn cell_memory(c: &Candidate, what: &dyn Fn(&Memory) -> Option<String>) -> String {
    match (&c.memory, c.kind) {
        (_, Kind::Plaintext) => "n/a (no proxy)".into(),
        (None, _) => "not measured".into(),
        (Some(m), _) => match &m.error {
            Some(e) => format!("failed: {}", short(e)),
            None => what(m).unwrap_or_else(|| "not reached".into()),
        },
    }
}

/// "client 1.2 / server 3.4" for per-process values.
fn per_process(m: &Memory, values: &[f64], unit: &str) -> String {
    let parts: Vec<String> = m
        .processes
        .iter()
        .zip(values)
        .map(|(p, v)| format!("{} {}", p.split_whitespace().next().unwrap_or(p), num(*v)))
        .collect();
    format!("{}{unit}", parts.join(" / "))
}

fn level_cell(m: &Memory, target: usize) -> Option<String> {
    let l = m.levels.iter().find(|l| l.target == target)?;
    if l.reached == 0 {
        return None;
    }
    let base = per_process(m, &l.bytes_per_conn, " B");
    Some(if l.reached < l.target {
        format!("{base} (only {} open)", num(crate::stats::fu(l.reached)))
    } else {
        base
    })
}

/// The results table (rows: figures; columns: candidates and ztunnel).
#[expect(clippy::too_many_lines, reason = "one row per figure, in the order the table shows them")]
pub fn results_table(r: &Report) -> String {
    let cands = &r.candidates;
    let pt = find(cands, Kind::Plaintext);
    let mut s = String::from("| figure |");
    for c in cands {
        let _ = write!(s, " {} |", c.label);
    }
    s += " ztunnel (reference, not measured here) |\n|---|";
    for _ in cands {
        s += "---|";
    }
    s += "---|\n";
    let mut row = |name: &str, cell: &dyn Fn(&Candidate) -> String, zt: &str| {
        let _ = write!(s, "| {name} |");
        for c in cands {
            let _ = write!(s, " {} |", cell(c));
        }
        let _ = writeln!(s, " {zt} |");
    };
    let streams: Vec<u32> =
        cands.first().map(|c| c.throughput_gbps.iter().map(|p| p.n).collect()).unwrap_or_default();
    for n in streams {
        let zt =
            if n == 1 { format!("{:.2}× plaintext", ztunnel::TPUT1_RATIO) } else { "—".into() };
        row(
            &format!("throughput, {n} stream{} (Gbit/s)", if n == 1 { "" } else { "s" }),
            &|c| {
                c.tput(n).map_or("—".into(), |f| {
                    cell_ratio(f, pt.and_then(|p| p.tput(n)), c.kind == Kind::Plaintext)
                })
            },
            &zt,
        );
    }
    let zt_added = ztunnel::RR_P50_US - ztunnel::RR_P50_PLAINTEXT_US;
    row(
        "1 KiB RR p50 (µs)",
        &|c| cell_latency(&c.rr_p50_us, pt.map(|p| &p.rr_p50_us), c.kind == Kind::Plaintext),
        &format!(
            "{} (+{}; plaintext {} there)",
            num(ztunnel::RR_P50_US),
            num(zt_added),
            num(ztunnel::RR_P50_PLAINTEXT_US)
        ),
    );
    row(
        "1 KiB RR p99 (µs)",
        &|c| cell_latency(&c.rr_p99_us, pt.map(|p| &p.rr_p99_us), c.kind == Kind::Plaintext),
        &num(ztunnel::RR_P99_US),
    );
    row(
        "1 KiB RR p999 (µs)",
        &|c| cell_latency(&c.rr_p999_us, pt.map(|p| &p.rr_p999_us), c.kind == Kind::Plaintext),
        "—",
    );
    row(
        "1 KiB RR rate (round trips/s)",
        &|c| cell_ratio(&c.rr_rate, pt.map(|p| &p.rr_rate), c.kind == Kind::Plaintext),
        "—",
    );
    let clients: Vec<u32> =
        cands.first().map(|c| c.cps.iter().map(|p| p.n).collect()).unwrap_or_default();
    for n in clients {
        let zt = match n {
            1 => num(ztunnel::CPS_1),
            8 => num(ztunnel::CPS_8),
            _ => "—".into(),
        };
        row(
            &format!("new connections/s, {n} client{}", if n == 1 { "" } else { "s" }),
            &|c| {
                c.cps_n(n).map_or("—".into(), |f| {
                    cell_ratio(f, pt.and_then(|p| p.cps_n(n)), c.kind == Kind::Plaintext)
                })
            },
            &zt,
        );
    }
    row(
        "CPU s per GB (both proxies)",
        &|c| {
            if c.kind == Kind::Plaintext {
                "n/a (kernel only)".into()
            } else {
                cell_plain(&c.cpu_s_per_gb)
            }
        },
        &num(ztunnel::CPU_S_PER_GB),
    );
    row(
        "RSS idle (MiB)",
        &|c| {
            cell_memory(c, &|m| {
                (!m.idle_kib.is_empty()).then(|| {
                    let v: Vec<f64> =
                        m.idle_kib.iter().map(|k| crate::stats::f(*k) * KIB / MIB).collect();
                    per_process(m, &v, "")
                })
            })
        },
        "—",
    );
    let levels: Vec<usize> = r.setup.idle_levels.clone();
    for l in levels {
        row(
            &format!("memory per idle connection at {} (bytes)", num(crate::stats::fu(l))),
            &|c| cell_memory(c, &|m| level_cell(m, l)),
            "—",
        );
    }
    s
}

fn verdict(kind: Kind, met: Option<bool>, detail: String) -> Verdict {
    Verdict { kind, met, detail }
}

/// Judges every target for every tlsmesh candidate.
#[expect(clippy::too_many_lines, reason = "one judgement per target, in the order of the issue")]
pub fn evaluate(cands: &[Candidate]) -> Vec<Target> {
    let pt = find(cands, Kind::Plaintext);
    let st = find(cands, Kind::Stunnel);
    let tl: Vec<&Candidate> = cands.iter().filter(|c| c.kind.is_tlsmesh()).collect();
    let judge = |name: &str, f: &dyn Fn(&Candidate) -> Verdict| Target {
        name: name.to_string(),
        verdicts: tl
            .iter()
            .map(|c| match c.invalid() {
                Some(why) => verdict(c.kind, None, format!("not judged: {}", short(&why))),
                None => f(c),
            })
            .collect(),
    };
    let ratio = |c: &Candidate,
                 base: Option<&Candidate>,
                 get: &dyn Fn(&Candidate) -> Option<&Figure>|
     -> Result<f64, String> {
        let mine = get(c).ok_or("not measured")?;
        if let Some(e) = mine.failure() {
            return Err(format!("failed: {}", short(e)));
        }
        let b = base.and_then(get).ok_or("baseline not measured")?;
        if let Some(e) = b.failure() {
            return Err(format!("baseline failed: {}", short(e)));
        }
        mine.ratio_to(b).ok_or_else(|| "no ratio".into())
    };
    let mut out = Vec::new();
    out.push(judge("throughput, 1 stream ≥ 0.5× plaintext and ≥ 1.5× stunnel", &|c| match (
        ratio(c, pt, &|c| c.tput(1)),
        ratio(c, st, &|c| c.tput(1)),
    ) {
        (Ok(p), Ok(s)) => verdict(
            c.kind,
            Some(p >= 0.5 && s >= 1.5),
            format!("{p:.2}× plaintext, {s:.2}× stunnel"),
        ),
        (Ok(p), Err(e)) => verdict(
            c.kind,
            if p < 0.5 { Some(false) } else { None },
            format!("{p:.2}× plaintext; stunnel: {e}"),
        ),
        (Err(e), _) => verdict(c.kind, None, e),
    }));
    out.push(judge("throughput, 8 streams ≥ 0.6× plaintext", &|c| match ratio(c, pt, &|c| {
        c.tput(8)
    }) {
        Ok(p) => verdict(c.kind, Some(p >= 0.6), format!("{p:.2}× plaintext")),
        Err(e) => verdict(c.kind, None, e),
    }));
    let added = |c: &Candidate, get: &dyn Fn(&Candidate) -> &Figure, limit: f64| {
        let mine = get(c);
        if let Some(e) = mine.failure() {
            return verdict(c.kind, None, format!("failed: {}", short(e)));
        }
        match pt.map(get).and_then(|b| mine.minus(b)) {
            Some(a) => verdict(
                c.kind,
                Some(a <= limit),
                format!("+{} µs ({} µs)", num(a), num(mine.median.unwrap_or(f64::NAN))),
            ),
            None => verdict(c.kind, None, "plaintext baseline missing".into()),
        }
    };
    out.push(judge("1 KiB RR added p50 ≤ 60 µs", &|c| added(c, &|c| &c.rr_p50_us, 60.0)));
    out.push(judge("1 KiB RR added p99 ≤ 200 µs", &|c| added(c, &|c| &c.rr_p99_us, 200.0)));
    let zt_goal = 1.5 * ztunnel::CPS_1;
    out.push(judge(
        &format!(
            "new connections/s (1 client) ≥ 5× stunnel and ≥ {}/s (1.5× ztunnel)",
            num(zt_goal)
        ),
        &|c| {
            let Some(f) = c.cps_n(1) else { return verdict(c.kind, None, "not measured".into()) };
            if let Some(e) = f.failure() {
                return verdict(c.kind, None, format!("failed: {}", short(e)));
            }
            let v = f.median.unwrap_or(0.0);
            match ratio(c, st, &|c| c.cps_n(1)) {
                Ok(s) => verdict(
                    c.kind,
                    Some(s >= 5.0 && v >= zt_goal),
                    format!("{}/s, {s:.1}× stunnel", num(v)),
                ),
                Err(e) => verdict(
                    c.kind,
                    if v < zt_goal { Some(false) } else { None },
                    format!("{}/s; stunnel: {e}", num(v)),
                ),
            }
        },
    ));
    out.push(judge("CPU ≤ 1.5 s per GB (both daemons)", &|c| {
        if let Some(e) = c.cpu_s_per_gb.failure() {
            return verdict(c.kind, None, format!("failed: {}", short(e)));
        }
        let v = c.cpu_s_per_gb.median.unwrap_or(f64::NAN);
        verdict(c.kind, Some(v <= 1.5), format!("{} s/GB", num(v)))
    }));
    out.push(judge("RSS idle ≤ 20 MiB (each daemon)", &|c| match &c.memory {
        Some(m) if m.error.is_none() && !m.idle_kib.is_empty() => {
            let worst = m.idle_kib.iter().copied().max().unwrap_or(0);
            let mib = crate::stats::f(worst) / KIB;
            verdict(c.kind, Some(mib <= 20.0), format!("largest {} MiB", num(mib)))
        }
        Some(m) => verdict(
            c.kind,
            None,
            format!("failed: {}", short(m.error.as_deref().unwrap_or("no data"))),
        ),
        None => verdict(c.kind, None, "not measured".into()),
    }));
    out.push(judge(
        "≤ 10 KiB per idle open connection (each daemon, largest level reached)",
        &|c| {
            let Some(m) = &c.memory else { return verdict(c.kind, None, "not measured".into()) };
            if let Some(e) = &m.error {
                return verdict(c.kind, None, format!("failed: {}", short(e)));
            }
            match m.levels.iter().filter(|l| l.reached > 0).max_by_key(|l| l.reached) {
                Some(l) => {
                    let worst = l.bytes_per_conn.iter().copied().fold(f64::MIN, f64::max);
                    verdict(
                        c.kind,
                        Some(worst <= 10.0 * KIB),
                        format!(
                            "largest {} B at {} connections",
                            num(worst),
                            num(crate::stats::fu(l.reached))
                        ),
                    )
                }
                None => verdict(
                    c.kind,
                    None,
                    m.stopped_because.clone().unwrap_or_else(|| "no connection opened".into()),
                ),
            }
        },
    ));
    out
}

/// The targets table.
pub fn targets_table(targets: &[Target]) -> String {
    let Some(first) = targets.first().filter(|t| !t.verdicts.is_empty()) else {
        return "No tlsmesh candidate was run.\n".into();
    };
    let mut s = String::from("| target |");
    for v in &first.verdicts {
        let _ = write!(s, " {} |", v.kind.label());
    }
    s += "\n|---|";
    for _ in &first.verdicts {
        s += "---|";
    }
    s += "\n";
    for t in targets {
        let _ = write!(s, "| {} |", t.name);
        for v in &t.verdicts {
            let mark = match v.met {
                Some(true) => "**met**",
                Some(false) => "**missed**",
                None => "not judged",
            };
            let detail = if v.detail.starts_with("not judged") {
                v.detail.trim_start_matches("not judged: ").to_string()
            } else {
                v.detail.clone()
            };
            let _ = write!(s, " {mark}: {} |", short(&detail));
        }
        s += "\n";
    }
    s
}

/// The full markdown report.
pub fn markdown(r: &Report, plot: Option<&str>) -> String {
    let su = &r.setup;
    let mut s = format!(
        "# tlsmesh benchmark, {}\n\n\
         {} run: {} round(s); iperf3 {} s per point; 1 KiB RR {} s; new connections {} s per point; \
         idle connections {:?}. {}. Server pod: {}. Machine: {} CPUs, Linux {}. Took {:.0} s.\n\n\
         Cells: median over rounds (ratio to plaintext from this run, or +µs added over plaintext for latency; \
         min–max over rounds). Method: docs/BENCHMARKS.md.\n\n## Results\n\n",
        su.started_utc,
        if su.quick { "Quick" } else { "Full" },
        su.rounds,
        su.iperf_seconds,
        su.rr_seconds,
        su.cps_seconds,
        su.idle_levels,
        su.condition,
        su.server_mode,
        su.cpus,
        su.kernel,
        su.duration_seconds,
    );
    if let Some(w) = su.busy_warning() {
        s += &w;
        s += "\n\n";
    }
    s += &results_table(r);
    let mut notes = Vec::new();
    for c in &r.candidates {
        for e in &c.setup_errors {
            notes.push(format!("- {}: {}", c.label, e));
        }
        if let Some(w) = c.routes.as_ref().and_then(Routes::caveat) {
            notes.push(format!("- {}: {w}", c.label));
        }
        if let Some(why) = c.memory.as_ref().and_then(|m| m.stopped_because.as_ref()) {
            notes.push(format!("- {}: opening idle connections stopped early: {why}", c.label));
        }
        for n in &c.notes {
            notes.push(format!("- {}: {n}", c.label));
        }
    }
    if !notes.is_empty() {
        s += "\nNotes:\n\n";
        s += &notes.join("\n");
        s += "\n";
    }
    s += "\n## Targets (tlsmesh, from issue 7)\n\n";
    s += &targets_table(&r.targets);
    if let Some(p) = plot {
        let _ = write!(s, "\n![throughput and latency]({p})\n");
    }
    s
}

/// The plot: throughput ratio per candidate and stream count (left), RR
/// latency p50 and p99 per candidate (right). Hand-written SVG.
pub fn svg(r: &Report) -> String {
    const W: f64 = 960.0;
    const H: f64 = 400.0;
    const TOP: f64 = 50.0;
    const BOTTOM: f64 = 330.0;
    let colors = ["#4e79a7", "#f28e2b", "#59a14f", "#e15759"];
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"20\" text-anchor=\"middle\" font-size=\"15\">tlsmesh benchmark {}</text>\n",
        W / 2.0,
        esc(&r.setup.started_utc)
    );
    let pt = find(&r.candidates, Kind::Plaintext);
    // Left panel: throughput ratio to plaintext.
    let streams: Vec<u32> = r
        .candidates
        .first()
        .map(|c| c.throughput_gbps.iter().map(|p| p.n).collect())
        .unwrap_or_default();
    let groups: Vec<(String, Vec<Option<f64>>)> = r
        .candidates
        .iter()
        .map(|c| {
            let v = streams
                .iter()
                .map(|n| {
                    c.tput(*n).and_then(|f| pt.and_then(|p| p.tput(*n)).and_then(|b| f.ratio_to(b)))
                })
                .collect();
            (c.label.to_string(), v)
        })
        .collect();
    let labels: Vec<String> =
        streams.iter().map(|n| format!("{n} stream{}", if *n == 1 { "" } else { "s" })).collect();
    panel(
        &mut s,
        (60.0, 450.0),
        (TOP, BOTTOM),
        "throughput / plaintext",
        &groups,
        &labels,
        &colors,
        &[(1.0, "plaintext"), (0.5, "1-stream target"), (0.6, "8-stream target")],
        2,
    );
    // Right panel: latency.
    let groups: Vec<(String, Vec<Option<f64>>)> = r
        .candidates
        .iter()
        .map(|c| (c.label.to_string(), vec![c.rr_p50_us.median, c.rr_p99_us.median]))
        .collect();
    panel(
        &mut s,
        (550.0, 940.0),
        (TOP, BOTTOM),
        "1 KiB request/response latency (µs)",
        &groups,
        &["p50".into(), "p99".into()],
        &colors[2..],
        &[],
        0,
    );
    s += "</svg>\n";
    s
}

fn esc(t: &str) -> String {
    t.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// One bar-chart panel: groups of bars (one group per candidate, one bar
/// per series), dashed reference lines, a legend.
#[expect(
    clippy::too_many_arguments,
    reason = "a drawing helper; a struct would only rename the arguments"
)]
fn panel(
    s: &mut String,
    (x0, x1): (f64, f64),
    (top, bottom): (f64, f64),
    title: &str,
    groups: &[(String, Vec<Option<f64>>)],
    series: &[String],
    colors: &[&str],
    refs: &[(f64, &str)],
    decimals: usize,
) {
    let max = groups
        .iter()
        .flat_map(|g| g.1.iter().flatten())
        .copied()
        .chain(refs.iter().map(|r| r.0))
        .fold(0.0_f64, f64::max);
    let ymax = if max > 0.0 { nice_ceiling(max * 1.1) } else { 1.0 };
    let y = |v: f64| bottom - (v / ymax) * (bottom - top);
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"13\">{}</text>",
        f64::midpoint(x0, x1),
        top - 15.0,
        esc(title)
    );
    let _ = writeln!(
        s,
        "<line x1=\"{x0}\" y1=\"{bottom}\" x2=\"{x1}\" y2=\"{bottom}\" stroke=\"black\"/>"
    );
    let _ = writeln!(
        s,
        "<line x1=\"{x0}\" y1=\"{top}\" x2=\"{x0}\" y2=\"{bottom}\" stroke=\"black\"/>"
    );
    for i in 0..=4 {
        let v = ymax * f64::from(i) / 4.0;
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"10\">{}</text><line x1=\"{x0}\" y1=\"{:.1}\" x2=\"{x1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>",
            x0 - 4.0,
            y(v) + 3.0,
            if decimals == 0 { format!("{v:.0}") } else { format!("{v:.2}") },
            y(v),
            y(v)
        );
    }
    for (i, (v, label)) in refs.iter().enumerate() {
        let _ = writeln!(
            s,
            "<line x1=\"{x0}\" y1=\"{:.1}\" x2=\"{x1}\" y2=\"{:.1}\" stroke=\"#888\" stroke-dasharray=\"5,4\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\" font-size=\"9\" fill=\"#666\">{}</text>",
            y(*v),
            y(*v),
            x1 - 2.0 - 80.0 * crate::stats::fu(i % 2),
            y(*v) - 3.0,
            esc(label)
        );
    }
    let gw = (x1 - x0) / crate::stats::fu(groups.len().max(1));
    let bw = (gw * 0.8) / crate::stats::fu(series.len().max(1));
    for (gi, (label, vals)) in groups.iter().enumerate() {
        let gx = x0 + gw * crate::stats::fu(gi) + gw * 0.1;
        for (si, v) in vals.iter().enumerate() {
            let bx = gx + bw * crate::stats::fu(si);
            let color = colors.get(si % colors.len().max(1)).copied().unwrap_or("#999");
            match v {
                Some(v) => {
                    let _ = writeln!(
                        s,
                        "<rect x=\"{bx:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\">{}</text>",
                        y(*v),
                        bw - 2.0,
                        (bottom - y(*v)).max(0.0),
                        bx + bw / 2.0 - 1.0,
                        y(*v) - 3.0,
                        if decimals == 0 { format!("{v:.0}") } else { format!("{v:.2}") }
                    );
                }
                None => {
                    let _ = writeln!(s, "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"9\" fill=\"#c00\">✗</text>", bx + bw / 2.0, bottom - 4.0);
                }
            }
        }
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            gx + gw * 0.4,
            bottom + 16.0,
            esc(label)
        );
    }
    for (si, name) in series.iter().enumerate() {
        let lx = x0 + 10.0 + 90.0 * crate::stats::fu(si);
        let color = colors.get(si % colors.len().max(1)).copied().unwrap_or("#999");
        let _ = writeln!(
            s,
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{color}\"/><text x=\"{:.1}\" y=\"{:.1}\">{}</text>",
            bottom + 34.0,
            lx + 14.0,
            bottom + 43.0,
            esc(name)
        );
    }
}

fn nice_ceiling(x: f64) -> f64 {
    let p = 10f64.powf(x.log10().floor());
    for m in [1.0, 1.25, 1.5, 2.0, 2.5, 5.0, 10.0] {
        if m * p >= x {
            return m * p;
        }
    }
    10.0 * p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::fig;

    fn cand(kind: Kind, t1: f64, t8: f64, p50: f64, p99: f64, cps: f64) -> Candidate {
        let mut c = Candidate::new(kind, &[1, 2, 8], &[1, 8]);
        c.throughput_gbps[0].figure = fig(&[t1]);
        c.throughput_gbps[2].figure = fig(&[t8]);
        c.rr_p50_us = fig(&[p50]);
        c.rr_p99_us = fig(&[p99]);
        c.cps[0].figure = fig(&[cps]);
        c
    }

    fn tunnelled() -> Routes {
        Routes { outbound_tunnel: 100, inbound_tunnel_accepted: 100, ..Routes::default() }
    }

    #[test]
    fn verdicts() {
        let pt = cand(Kind::Plaintext, 8.0, 10.0, 30.0, 60.0, 10_000.0);
        let st = cand(Kind::Stunnel, 2.0, 3.0, 90.0, 200.0, 300.0);
        let mut good = cand(Kind::TlsmeshTcp, 4.5, 7.0, 80.0, 200.0, 2000.0);
        good.routes = Some(tunnelled());
        good.cpu_s_per_gb = fig(&[1.2]);
        good.memory = Some(Memory {
            processes: vec!["client side".into(), "server side".into()],
            idle_kib: vec![8 * 1024, 9 * 1024],
            levels: vec![MemLevel {
                target: 1000,
                reached: 1000,
                rss_kib: vec![],
                bytes_per_conn: vec![4000.0, 12000.0],
            }],
            ..Memory::default()
        });
        let mut bad = cand(Kind::TlsmeshQuic, 3.0, 4.0, 200.0, 500.0, 1000.0);
        bad.routes = Some(tunnelled());
        let t = evaluate(&[pt, st, good, bad]);
        let met = |row: usize| t[row].verdicts.iter().map(|v| v.met).collect::<Vec<_>>();
        assert_eq!(met(0), [Some(true), Some(false)], "{:?}", t[0]);
        assert_eq!(met(1), [Some(true), Some(false)]);
        assert_eq!(met(2), [Some(true), Some(false)], "p50 added 50 vs 170");
        assert_eq!(met(3), [Some(true), Some(false)], "p99 added 140 vs 440");
        assert_eq!(met(4), [Some(true), Some(false)], "2000/s = 6.7x stunnel; 1000/s below 1650");
        assert_eq!(met(5), [Some(true), None], "cpu not measured for quic");
        assert_eq!(met(6), [Some(true), None]);
        assert_eq!(met(7), [Some(false), None], "12000 B > 10 KiB on the server side");
        assert_eq!(t[0].verdicts[0].detail, "0.56× plaintext, 2.25× stunnel");
    }

    #[test]
    fn passthrough_is_not_judged_and_failures_are_shown() {
        let pt = cand(Kind::Plaintext, 8.0, 10.0, 30.0, 60.0, 10_000.0);
        let mut pass = cand(Kind::TlsmeshTcp, 8.0, 10.0, 30.0, 60.0, 10_000.0);
        pass.routes = Some(Routes { outbound_passthrough: 50, ..Routes::default() });
        let mut failed = Candidate::new(Kind::TlsmeshQuic, &[1, 2, 8], &[1, 8]);
        failed.routes = Some(tunnelled());
        failed.throughput_gbps[0]
            .figure
            .push(Err("iperf3: control socket has closed unexpectedly".into()));
        let cands = vec![pt, pass, failed];
        let t = evaluate(&cands);
        assert!(t.iter().all(|t| t.verdicts[0].met.is_none()), "passthrough never meets a target");
        assert!(t[0].verdicts[0].detail.contains("NOT of the mTLS tunnel"));
        assert_eq!(t[0].verdicts[1].met, None);
        assert!(t[0].verdicts[1].detail.starts_with("failed: iperf3"));
        let report = Report {
            setup: Setup {
                started_utc: "2025-01-01T00:00:00Z".into(),
                quick: true,
                rounds: 1,
                iperf_seconds: 2,
                rr_seconds: 1.0,
                cps_seconds: 1.5,
                idle_levels: vec![1000, 10000],
                condition: "spinners".into(),
                cpus: 2,
                kernel: "6.18".into(),
                server_mode: "strict".into(),
                duration_seconds: 100.0,
                load_start: Some(3.5),
                load_end: Some(5.0),
            },
            candidates: cands,
            targets: t,
        };
        let md = markdown(&report, Some("plot.svg"));
        assert!(md.contains("| throughput, 1 stream (Gbit/s) | 8.00 | 8.00 (1.00×) | failed: iperf3: control socket has closed unexpectedly | 0.41× plaintext |"), "{md}");
        assert!(md.contains("| 1 KiB RR p50 (µs) | 30.0 | 30.0 (+0.00) |"), "{md}");
        assert!(md.contains("ztunnel (reference, not measured here)"));
        assert!(md.contains("n/a (kernel only)"));
        assert!(md.contains("**The machine was busy** (1-minute load average 3.5 before the run on 2 CPUs; 5.0 at the end"), "{md}");
        let svg = svg(&report);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<svg").count(), 1);
    }

    #[test]
    #[expect(clippy::float_cmp, reason = "exact round values")]
    fn numbers() {
        assert_eq!(num(8.123), "8.12");
        assert_eq!(num(21.04), "21.0");
        assert_eq!(num(145.4), "145");
        assert_eq!(num(12_345.6), "12,346");
        assert_eq!(num(1_100.0), "1,100");
        assert_eq!(nice_ceiling(0.87), 1.0);
        assert_eq!(nice_ceiling(1.3), 1.5);
        assert_eq!(nice_ceiling(1.6), 2.0);
        assert_eq!(nice_ceiling(230.0), 250.0);
        assert_eq!(short("a | b"), "a \\| b");
    }
}
