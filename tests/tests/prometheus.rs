//! The metrics against a real Prometheus (Debian's `prometheus`, installed
//! by scripts/bootstrap.sh): it scrapes both daemons of the two-node netns
//! topology while known traffic runs — tunnelled exchanges, a policy deny, a
//! refused plaintext connection, a garbled tunnel handshake — and then every
//! `PromQL` expression of the Grafana dashboard and of the alert rules shipped
//! in the Helm chart is evaluated through Prometheus' HTTP API, its result
//! compared with the traffic. An expression that matches no exported metric
//! returns nothing and fails. With `metrics.compat = "istio"`, the
//! `istio_tcp_*` expressions of Istio's own dashboards (copied into
//! `fixtures/istio_dashboards.json`, source named there) are evaluated the
//! same way.
//!
//! Prometheus runs inside node 0's netns and scrapes
//! 192.168.77.1:15020 and 192.168.77.2:15020 every second; nothing leaves
//! the namespaces the test made.

#![allow(
    clippy::too_many_lines,
    clippy::cast_precision_loss,
    clippy::many_single_char_names,
    clippy::float_cmp,
    reason = "test scenarios: long, explicit, with throwaway names; the values compared exactly are counts"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use netkit::{echo_server, require_root, wait_for, Daemon, Proc, Topology};
use serde_json::Value;

/// The two daemons' metrics endpoints, as Prometheus' `instance` label.
const N0: &str = "192.168.77.1:15020";
const N1: &str = "192.168.77.2:15020";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn chart_file(name: &str) -> PathBuf {
    repo().join("deploy/helm/tlsmesh/files").join(name)
}

/// Debian's `prometheus` (and `promtool`), or a failure saying how to get it.
fn tool(name: &str) -> PathBuf {
    let found = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "no `{name}` binary: install Debian's prometheus package with scripts/bootstrap.sh \
             (run by cargo xtask test), or apt-get install prometheus"
        )
    })
}

/// A Prometheus server in node 0's netns, killed and removed on drop (the
/// topology owns the process and the directory).
struct Prometheus {
    netns: String,
    _proc: Proc,
    log: PathBuf,
}

impl Prometheus {
    /// Starts it scraping both daemons every second (with `target_labels`
    /// per node), with the chart's alert rules loaded.
    fn start(topo: &Topology, target_labels: [&str; 2]) -> Self {
        let dir = topo.scratch_dir().join("prometheus");
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let rules = chart_file("tlsmesh-alerts.yaml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n  evaluation_interval: 1s\n\
             rule_files: [\"{}\"]\n\
             scrape_configs:\n  - job_name: tlsmesh\n    static_configs:\n\
             \x20     - targets: [\"{N0}\"]\n        labels: {{{}}}\n\
             \x20     - targets: [\"{N1}\"]\n        labels: {{{}}}\n",
            rules.display(),
            target_labels[0],
            target_labels[1],
        );
        let cfg = dir.join("prometheus.yml");
        std::fs::write(&cfg, config).unwrap();
        let log = dir.join("prometheus.log");
        let mut cmd = Topology::command_in(
            &topo.node(0).netns,
            None,
            &tool("prometheus").to_string_lossy(),
            &[
                &format!("--config.file={}", cfg.display()),
                &format!("--storage.tsdb.path={}", dir.join("data").display()),
                "--web.listen-address=127.0.0.1:9090",
                "--log.level=warn",
            ],
        )
        .unwrap();
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(std::fs::File::create(&log).unwrap());
        let proc = topo.spawn("prometheus", cmd).expect("start prometheus");
        let p = Self { netns: topo.node(0).netns.clone(), _proc: proc, log };
        let up = wait_for(Duration::from_secs(30), || {
            let v = p.try_query("up").ok()?;
            let up: BTreeSet<String> = v
                .iter()
                .filter(|s| value(s) == 1.0)
                .filter_map(|s| s["metric"]["instance"].as_str().map(str::to_owned))
                .collect();
            (up.len() == 2).then_some(())
        });
        assert!(
            up.is_some(),
            "Prometheus did not scrape both daemons within 30 s:\n{}",
            p.log_text()
        );
        p
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on its HTTP API (HTTP/1.0: no chunked answer): the JSON body.
    fn get(&self, path_and_query: &str) -> Result<Value, String> {
        let req = path_and_query.to_owned();
        Topology::in_netns(&self.netns, move || {
            let mut s = TcpStream::connect_timeout(
                &"127.0.0.1:9090".parse().unwrap(),
                Duration::from_secs(2),
            )
            .map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(10))).map_err(|e| e.to_string())?;
            write!(s, "GET {req} HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .map_err(|e| e.to_string())?;
            let mut buf = String::new();
            s.read_to_string(&mut buf).map_err(|e| e.to_string())?;
            let body = buf.split_once("\r\n\r\n").map_or("", |x| x.1);
            serde_json::from_str(body).map_err(|e| format!("{e}: {buf}"))
        })
    }

    /// An instant query: the result vector, or the error Prometheus gave.
    fn try_query(&self, q: &str) -> Result<Vec<Value>, String> {
        let v = self.get(&format!("/api/v1/query?query={}", urlencode(q)))?;
        if v["status"] != "success" {
            return Err(format!("{q}: {v}"));
        }
        match v["data"]["resultType"].as_str() {
            Some("vector") => Ok(v["data"]["result"].as_array().cloned().unwrap_or_default()),
            Some("scalar") => {
                Ok(vec![serde_json::json!({"metric": {}, "value": v["data"]["result"]})])
            }
            other => Err(format!("{q}: unexpected result type {other:?}")),
        }
    }

    fn query(&self, q: &str) -> Vec<Value> {
        self.try_query(q).unwrap_or_else(|e| panic!("query failed: {e}"))
    }

    /// Waits until `q` has a series whose value is `want`.
    fn wait_value(&self, q: &str, want: f64) {
        let ok = wait_for(Duration::from_secs(20), || {
            self.query(q).iter().any(|s| value(s) == want).then_some(())
        });
        assert!(ok.is_some(), "{q} did not reach {want} within 20 s: {:?}", self.query(q));
    }
}

fn urlencode(s: &str) -> String {
    s.bytes().fold(String::new(), |mut o, b| {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            o.push(b as char);
        } else {
            let _ = write!(o, "%{b:02X}");
        }
        o
    })
}

/// A sample's value (`NaN` spelled as Prometheus spells it).
fn value(sample: &Value) -> f64 {
    sample["value"][1].as_str().and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

/// A sample's labels, without `__name__`.
fn labels(sample: &Value) -> BTreeMap<String, String> {
    sample["metric"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| *k != "__name__")
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// The one sample of `result` whose labels include all of `want`.
fn find<'a>(result: &'a [Value], want: &[(&str, &str)], what: &str) -> &'a Value {
    let hits: Vec<&Value> = result
        .iter()
        .filter(|s| {
            let l = labels(s);
            want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .collect();
    assert_eq!(hits.len(), 1, "{what}: want one series with {want:?}, got {result:#?}");
    hits[0]
}

/// Sends `len` bytes from `netns` to `dst` and checks they come back.
fn exchange(netns: &str, dst: SocketAddr, len: usize) -> std::io::Result<()> {
    netkit::echo_exchange(netns, dst, len)
}

/// A connection that must be refused: reset or closed before any byte
/// comes back.
fn refused(netns: &str, dst: SocketAddr) {
    let got = Topology::in_netns(netns, move || -> std::io::Result<usize> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        let _ = s.write_all(b"hello");
        let mut buf = [0u8; 16];
        s.read(&mut buf)
    });
    assert!(matches!(got, Ok(0) | Err(_)), "connection to {dst} was not refused: {got:?}");
}

/// Garbage (not a TLS `ClientHello`) to a pod's tunnel port, from the node:
/// the destination daemon's handshake fails.
fn garbled_handshake(netns: &str, pod_ip: std::net::Ipv4Addr) {
    let dst = SocketAddr::from((pod_ip, 15008));
    let got = Topology::in_netns(netns, move || -> std::io::Result<usize> {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")?;
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
        Ok(buf.len())
    });
    assert!(got.is_ok(), "tunnel port of {pod_ip} unreachable: {got:?}");
}

/// Node 0: `client` (n0p0, strict) and `n0p1` (not enrolled, namespace
/// `plain`); node 1: `server` (n1p0) and `locked` (n1p1), both strict.
/// Workload names come from the inventory's `workload` field.
fn inventory(topo: &Topology) -> PathBuf {
    let mut s = netkit::inventory_nodes(topo);
    s += "[[namespace]]\nname = \"strict\"\nmode = \"strict\"\n";
    for (p, ns, workload) in [
        (topo.pod(0, 0), "strict", Some("client")),
        (topo.pod(0, 1), "plain", None),
        (topo.pod(1, 0), "strict", Some("server")),
        (topo.pod(1, 1), "strict", Some("locked")),
    ] {
        let node = &topo.node(p.node).name;
        let _ = writeln!(
            s,
            "[[pod]]\nname = \"{}\"\nnamespace = \"{ns}\"\nservice_account = \"{}\"\nnode = \"{node}\"\nips = [\"{}\", \"{}\"]\nnetns = \"{}\"",
            p.name,
            p.name,
            p.ip4,
            p.ip6,
            p.netns_path().display()
        );
        if let Some(w) = workload {
            let _ = writeln!(s, "workload = \"{w}\"");
        }
    }
    let path = topo.scratch_dir().join("inventory.toml");
    std::fs::write(&path, s).unwrap();
    path
}

/// Node 1's policy: `client` may not reach `locked`.
fn policy(topo: &Topology) -> PathBuf {
    let path = topo.scratch_dir().join("policy.toml");
    std::fs::write(
        &path,
        "[[rule]]\nname = \"client-not-to-locked\"\naction = \"deny\"\nto_namespace = \"strict\"\n\
         to_pods = [\"n1p1\"]\nfrom_identities = [\"spiffe://cluster.local/ns/strict/sa/n0p0\"]\n",
    )
    .unwrap();
    path
}

/// The topology, both daemons (`extra` flags on both; node 1 also gets the
/// policy and two-hour certificates, so the expiry alert has something to
/// say), echo servers on `server` and `locked`, and Prometheus.
struct Mesh {
    topo: Topology,
    d0: Daemon,
    d1: Daemon,
    prom: Prometheus,
    server: SocketAddr,
    locked: SocketAddr,
}

fn mesh(extra: &[&str], target_labels: [&str; 2]) -> Mesh {
    let topo = Topology::build(2, 2).expect("topology");
    let inv = inventory(&topo);
    let pol = policy(&topo).display().to_string();
    let d0 = Daemon::start(&topo, 0, &inv, extra);
    let mut n1_args = vec!["--policy", &pol, "--cert-lifetime", "7200"];
    n1_args.extend_from_slice(extra);
    let d1 = Daemon::start(&topo, 1, &inv, &n1_args);
    let server = SocketAddr::from((topo.pod(1, 0).ip4, 7000));
    let locked = SocketAddr::from((topo.pod(1, 1).ip4, 7001));
    echo_server(&topo.pod(1, 0).netns, server);
    echo_server(&topo.pod(1, 1).netns, locked);
    let prom = Prometheus::start(&topo, target_labels);
    Mesh { topo, d0, d1, prom, server, locked }
}

impl Mesh {
    /// One round of the known traffic: `exchanges` tunnelled exchanges of
    /// 100,000 bytes client → server, one policy deny (client → locked),
    /// one refused plaintext connection (n0p1 → server), one garbled
    /// handshake to server's tunnel port.
    fn traffic(&self, exchanges: usize) {
        let client = &self.topo.pod(0, 0).netns;
        for _ in 0..exchanges {
            exchange(client, self.server, 100_000).expect("exchange through the tunnel");
        }
        refused(client, self.locked);
        refused(&self.topo.pod(0, 1).netns, self.server);
        garbled_handshake(&self.topo.node(0).netns, self.topo.pod(1, 0).ip4);
    }
}

/// A dashboard's expressions: (panel title, expression).
fn dashboard_exprs() -> Vec<(String, String)> {
    let d: Value = serde_json::from_str(
        &std::fs::read_to_string(chart_file("tlsmesh-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((
                p["title"].as_str().unwrap().to_owned(),
                t["expr"].as_str().unwrap().to_owned(),
            ));
        }
    }
    for v in d["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push((format!("variable {}", v["name"]), q.to_owned()));
        }
    }
    out
}

/// Grafana's variables as a person would set them on this dashboard;
/// `label_values(m, l)` (Grafana's, not `PromQL`) as the query it stands for.
fn grafana(expr: &str, vars: &[(&str, &str)]) -> String {
    let mut e = expr.replace("$__rate_interval", "2m");
    for (k, v) in vars {
        e = e.replace(&format!("${k}"), v);
    }
    if let Some(args) = e.strip_prefix("label_values(").and_then(|r| r.strip_suffix(')')) {
        let (m, l) = args.rsplit_once(',').unwrap();
        e = format!("count by ({}) ({m})", l.trim());
    }
    assert!(!e.contains('$'), "a Grafana variable left in {e}");
    e
}

/// The rules of the chart's alert file: (alert, expression).
fn alert_rules() -> Vec<(String, String)> {
    let v: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(chart_file("tlsmesh-alerts.yaml")).unwrap())
            .unwrap();
    v["groups"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_sequence().unwrap().iter())
        .map(|r| (r["alert"].as_str().unwrap().to_owned(), r["expr"].as_str().unwrap().to_owned()))
        .collect()
}

const PAIR_CLIENT_SERVER: [(&str, &str); 4] = [
    ("source_workload_namespace", "strict"),
    ("source_workload", "client"),
    ("destination_workload_namespace", "strict"),
    ("destination_workload", "server"),
];

#[test]
fn prometheus_scrapes_the_dashboard_and_alerts_match_known_traffic() {
    if !require_root("prometheus_scrapes_the_dashboard_and_alerts_match_known_traffic") {
        return;
    }
    let out = Command::new(tool("promtool"))
        .args(["check", "rules"])
        .arg(chart_file("tlsmesh-alerts.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "promtool check rules: {}", String::from_utf8_lossy(&out.stdout));

    let mut m = mesh(&[], ["node: n0", "node: n1"]);
    let p = &m.prom;
    // Round one, then wait until Prometheus has every series it made: a
    // counter's first sample has no rate, so round two is what the rates see.
    m.traffic(1);
    p.wait_value(
        "sum(tlsmesh_tcp_connections_closed_total{reporter=\"destination\",destination_workload=\"server\",response_flags=\"-\"})",
        1.0,
    );
    p.wait_value("sum(tlsmesh_tcp_connections_failed_total)", 4.0);
    m.traffic(3);
    // The final state: 4 exchanges, 2 of each refusal, counted on both sides.
    p.wait_value(
        "sum(tlsmesh_tcp_received_bytes_total{reporter=\"destination\",destination_workload=\"server\"})",
        400_000.0,
    );
    p.wait_value(
        "sum(tlsmesh_tcp_received_bytes_total{reporter=\"source\",destination_workload=\"server\"})",
        400_000.0,
    );
    p.wait_value("sum(tlsmesh_tcp_connections_failed_total)", 8.0);
    p.wait_value("sum(tlsmesh_active_connections)", 0.0);

    // Every expression of the dashboard, with what the traffic makes of it.
    let vars = [("namespace", ".*")];
    let mut seen = BTreeSet::new();
    for (panel, expr) in dashboard_exprs() {
        let q = grafana(&expr, &vars);
        let r = p.query(&q);
        assert!(
            !r.is_empty(),
            "panel {panel:?}: {q} returned nothing (does it match an exported metric?)"
        );
        let what = format!("panel {panel:?}: {q}");
        let positive = |want: &[(&str, &str)]| {
            let v = value(find(&r, want, &what));
            assert!(v > 0.0, "{what}: {want:?} = {v}");
        };
        let exact = |want: &[(&str, &str)], n: f64| {
            let v = value(find(&r, want, &what));
            assert!((v - n).abs() < 1e-9, "{what}: {want:?} = {v}, want {n}");
        };
        let per_instance = |check: &dyn Fn(f64) -> bool| {
            for i in [N0, N1] {
                let v = value(find(&r, &[("instance", i)], &what));
                assert!(check(v), "{what}: {i} = {v}");
            }
        };
        match panel.as_str() {
            "Bytes per workload pair (client → server)"
            | "Bytes per workload pair (server → client)" => {
                positive(&PAIR_CLIENT_SERVER);
                assert_eq!(
                    r.len(),
                    4,
                    "{what}: server, locked, plaintext and garbled pairs: {r:#?}"
                );
            }
            "Connections opened per workload pair" => {
                positive(
                    &[&PAIR_CLIENT_SERVER[..], &[("connection_security_policy", "mutual_tls")]]
                        .concat(),
                );
                positive(&[("source_workload", "client"), ("destination_workload", "locked")]);
                positive(&[
                    ("source_workload", "n0p1"),
                    ("source_workload_namespace", "plain"),
                    ("destination_workload", "server"),
                    ("connection_security_policy", "none"),
                ]);
                positive(&[("source_workload", "unknown"), ("destination_workload", "server")]);
            }
            "Outbound connections per workload pair (source side)" => {
                positive(
                    &[&PAIR_CLIENT_SERVER[..], &[("route", "tunnel"), ("transport", "tcp")]]
                        .concat(),
                );
                positive(&[("destination_workload", "locked")]);
            }
            "Connections closed per workload pair (since the daemons started)" => {
                for reporter in ["source", "destination"] {
                    exact(
                        &[
                            &PAIR_CLIENT_SERVER[..],
                            &[("reporter", reporter), ("response_flags", "-")],
                        ]
                        .concat(),
                        4.0,
                    );
                    exact(
                        &[
                            ("reporter", reporter),
                            ("destination_workload", "locked"),
                            ("response_flags", "policy_denied"),
                        ],
                        2.0,
                    );
                }
                exact(&[("source_workload", "n0p1"), ("response_flags", "plaintext_refused")], 2.0);
                exact(&[("source_workload", "unknown"), ("response_flags", "tls_failed")], 2.0);
            }
            "Open connections" => per_instance(&|v| v == 0.0),
            "Failures by reason (response flags)" => {
                positive(&[("reporter", "source"), ("response_flags", "policy_denied")]);
                positive(&[("reporter", "destination"), ("response_flags", "policy_denied")]);
                positive(&[("reporter", "destination"), ("response_flags", "plaintext_refused")]);
                positive(&[("reporter", "destination"), ("response_flags", "tls_failed")]);
                assert_eq!(r.len(), 4, "{what}: {r:#?}");
            }
            "Failed connections per workload pair" => {
                exact(&[("reporter", "source"), ("destination_workload", "locked")], 2.0);
                exact(&[("reporter", "destination"), ("destination_workload", "locked")], 2.0);
                exact(&[("source_workload", "n0p1")], 2.0);
                exact(&[("source_workload", "unknown"), ("response_flags", "tls_failed")], 2.0);
            }
            "Refusals by daemon counter" => {
                positive(&[("instance", N0), ("direction", "outbound"), ("reason", "tunnel")]);
                positive(&[
                    ("instance", N1),
                    ("direction", "inbound"),
                    ("reason", "tunnel_refused"),
                ]);
                positive(&[
                    ("instance", N1),
                    ("direction", "inbound"),
                    ("reason", "plaintext_strict"),
                ]);
                exact(
                    &[("instance", N0), ("direction", "inbound"), ("reason", "plaintext_strict")],
                    0.0,
                );
            }
            "Policy denies" => {
                positive(&[("instance", N1)]);
                exact(&[("instance", N0)], 0.0);
            }
            "Tunnel handshake failures" => {
                positive(&[
                    ("instance", N1),
                    ("reporter", "destination"),
                    ("reason", "tls_failed"),
                ]);
                exact(&[("instance", N0), ("reporter", "source"), ("reason", "tls_failed")], 0.0);
                assert_eq!(r.len(), 12, "{what}: 2 instances x 2 reporters x 3 reasons");
            }
            "Tunnel handshake latency" => {
                // Node 0 opened the tunnels (node 1 none: no rate, NaN).
                let v = value(find(&r, &[("instance", N0)], &what));
                assert!(v > 0.0 && v < 10.0, "{what}: {v}");
            }
            "Tunnel handshakes" => {
                positive(&[("instance", N0)]);
                exact(&[("instance", N1)], 0.0);
            }
            "Pooled tunnel connections" | "Open tunnel streams" => {
                assert_eq!(r.len(), 4, "{what}: tcp and quic per instance: {r:#?}");
                exact(&[("instance", N1), ("transport", "tcp")], 0.0);
                if panel == "Open tunnel streams" {
                    exact(&[("instance", N0), ("transport", "tcp")], 0.0);
                }
            }
            "Workload certificates: time left" => {
                let left = |id: &str| {
                    value(find(
                        &r,
                        &[("identity", &format!("spiffe://cluster.local/ns/strict/sa/{id}"))],
                        &what,
                    ))
                };
                assert!(
                    (23.0 * 3600.0..=86_400.0).contains(&left("n0p0")),
                    "{what}: {}",
                    left("n0p0")
                );
                for id in ["n1p0", "n1p1"] {
                    assert!((3600.0..=7200.0).contains(&left(id)), "{what}: {id} {}", left(id));
                }
            }
            "Trust roots: time left" => {
                assert!(r.iter().all(|s| value(s) > 30.0 * 86_400.0), "{what}: {r:#?}");
            }
            "Kernel capture events" => {
                positive(&[("instance", N0), ("event", "captured")]);
                positive(&[("instance", N1), ("event", "inbound_steered")]);
            }
            "Enrolled pods" => {
                exact(&[("instance", N0)], 1.0);
                exact(&[("instance", N1)], 2.0);
            }
            "Daemon CPU" => per_instance(&|v| (0.0..2.0).contains(&v)),
            "Daemon memory" => per_instance(&|v| v > 1e6 && v < 1e9),
            "Daemon ready" => per_instance(&|v| v == 1.0),
            "Builds running" => {
                assert_eq!(r.len(), 1, "{what}: one build");
                exact(&[("version", env!("CARGO_PKG_VERSION"))], 2.0);
            }
            "TLS settings in force" => {
                let s = find(&r, &[("protocol", "TLSv1.3")], &what);
                let l = labels(s);
                assert!(l["key_exchange_groups"].starts_with("X25519MLKEM768"), "{what}: {l:?}");
                assert!(l["cipher_suites"].contains("TLS13_"), "{what}: {l:?}");
                assert_eq!(value(s), 2.0);
            }
            "Workload-pair series dropped (cardinality cap)" => per_instance(&|v| v == 0.0),
            "variable \"namespace\"" => {
                let ns: BTreeSet<String> =
                    r.iter().map(|s| labels(s)["destination_workload_namespace"].clone()).collect();
                assert_eq!(ns, BTreeSet::from(["strict".to_owned()]), "{what}");
            }
            other => panic!("no expectation for the dashboard's panel {other:?}; add one here"),
        }
        seen.insert(panel);
    }
    assert!(seen.len() >= 20, "the dashboard has its panels: {seen:?}");

    // Alert rules: every one loaded and healthy, and their expressions say
    // what the topology is: node 1's two-hour certificates expire within
    // 6 h, handshakes fail on node 1, both daemons ready and up.
    let rules = p.get("/api/v1/rules").unwrap();
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .collect();
    assert_eq!(loaded.len(), alert_rules().len(), "{rules}");
    assert!(loaded.iter().all(|r| r["health"] == "ok"), "{rules}");
    let eval = |name: &str| {
        let (_, expr) = alert_rules().into_iter().find(|(a, _)| a == name).unwrap();
        p.query(&expr)
    };
    let expiring: BTreeSet<String> = eval("TlsmeshCertificateExpiringSoon")
        .iter()
        .map(|s| format!("{} {}", labels(s)["instance"], labels(s)["identity"]))
        .collect();
    assert_eq!(
        expiring,
        BTreeSet::from([
            format!("{N1} spiffe://cluster.local/ns/strict/sa/n1p0"),
            format!("{N1} spiffe://cluster.local/ns/strict/sa/n1p1"),
        ])
    );
    assert!(eval("TlsmeshTrustRootExpiringSoon").is_empty());
    let failing = eval("TlsmeshHandshakeFailuresRising");
    assert_eq!(failing.len(), 1, "{failing:#?}");
    let l = labels(&failing[0]);
    assert_eq!(
        (l["instance"].as_str(), l["reporter"].as_str(), l["reason"].as_str()),
        (N1, "destination", "tls_failed")
    );
    assert!(eval("TlsmeshDaemonNotReady").is_empty());
    assert!(eval("TlsmeshDaemonDown").is_empty());

    // Node 0 drains (a connection held open keeps it draining, not ready):
    // the not-ready alert names it. Then node 1 dies: the down alert.
    let hold = Topology::in_netns(&m.topo.pod(0, 0).netns.clone(), {
        let server = m.server;
        move || {
            TcpStream::connect_timeout(&server, Duration::from_secs(5)).expect("held connection")
        }
    });
    p.wait_value("sum(tlsmesh_active_connections{instance=\"192.168.77.1:15020\"})", 1.0);
    m.d0.proc.signal(nix::sys::signal::Signal::SIGTERM);
    p.wait_value("tlsmesh_ready{instance=\"192.168.77.1:15020\"}", 0.0);
    let not_ready = eval("TlsmeshDaemonNotReady");
    assert_eq!(not_ready.len(), 1, "{not_ready:#?}");
    assert_eq!(labels(&not_ready[0])["instance"], N0);
    drop(hold);
    m.d1.proc.kill();
    p.wait_value("up{instance=\"192.168.77.2:15020\"}", 0.0);
    let down = eval("TlsmeshDaemonDown");
    assert!(down.iter().any(|s| labels(s)["instance"] == N1), "{down:#?}");
}

/// One expression of Istio's dashboards, as the fixture holds it.
#[derive(Debug, serde::Deserialize)]
struct IstioExpr {
    id: String,
    panel: String,
    expr: String,
}

#[test]
fn prometheus_evaluates_istio_dashboards_with_metrics_compat_istio() {
    if !require_root("prometheus_evaluates_istio_dashboards_with_metrics_compat_istio") {
        return;
    }
    // Prometheus' Kubernetes service discovery would label a ztunnel
    // DaemonSet's pods so; Istio's ztunnel dashboard selects by them.
    let m = mesh(
        &["--metrics-compat", "istio"],
        ["pod: ztunnel-n0, app: ztunnel", "pod: ztunnel-n1, app: ztunnel"],
    );
    let p = &m.prom;
    m.traffic(1);
    p.wait_value("sum(istio_tcp_connections_failed_total)", 4.0);
    // The workload dashboard uses irate (the last two samples): traffic
    // flows while the expressions are evaluated.
    let stop = Arc::new(AtomicBool::new(false));
    let background = std::thread::spawn({
        let (stop, netns, server) = (Arc::clone(&stop), m.topo.pod(0, 0).netns.clone(), m.server);
        move || {
            while !stop.load(Ordering::Relaxed) {
                exchange(&netns, server, 20_000).expect("background exchange");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    });
    m.traffic(0);
    p.wait_value("sum(istio_tcp_connections_failed_total)", 8.0);
    std::thread::sleep(Duration::from_secs(3));

    let fixture: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/tests/fixtures/istio_dashboards.json"))
            .unwrap(),
    )
    .unwrap();
    let exprs: Vec<IstioExpr> = serde_json::from_value(fixture["expressions"].clone()).unwrap();
    assert!(exprs.len() >= 18, "the fixture holds the expressions");
    for e in &exprs {
        // The workload dashboard looked at for `server` (incoming) or
        // `client` (outgoing), as a person picks it; everything else All.
        let workload = if e.panel.contains("Client") || e.panel.contains("Outgoing") {
            "client"
        } else {
            "server"
        };
        let vars = [
            ("qrep", "destination"),
            ("namespace", "strict"),
            ("workload", workload),
            ("srcwl", ".*"),
            ("srcns", ".*"),
            ("dstsvc", ".*"),
        ];
        let q = grafana(&e.expr, &vars);
        let r = p.query(&q);
        let what = format!("{} ({}): {q}", e.id, e.panel);
        let series = |want: &[(&str, &str)]| value(find(&r, want, &what));
        let both_pods = |check: &dyn Fn(f64) -> bool| {
            assert_eq!(r.len(), 2, "{what}: {r:#?}");
            for pod in ["ztunnel-n0", "ztunnel-n1"] {
                let v = series(&[("pod", pod)]);
                assert!(check(v), "{what}: {pod} = {v}");
            }
        };
        match e.id.as_str() {
            "ztunnel-dashboard#1" | "ztunnel-dashboard#3" | "ztunnel-dashboard#4" => {
                both_pods(&|v| v > 0.0);
            }
            "ztunnel-dashboard#2" => both_pods(&|v| v < 0.0),
            "ztunnel-dashboard#5" | "ztunnel-dashboard#6" => {
                both_pods(&|v| (0.0..=2.0).contains(&v));
            }
            "istio-workload-dashboard#1" | "istio-workload-dashboard#2" => {
                assert_eq!(r.len(), 1, "{what}: {r:#?}");
                assert!(value(&r[0]) > 0.0, "{what}: {r:#?}");
            }
            "istio-workload-dashboard#3" | "istio-workload-dashboard#5" => {
                // (The garbled handshake's series, from an unknown source, moved nothing.)
                assert!(
                    series(&[
                        ("source_workload", "client"),
                        ("source_workload_namespace", "strict")
                    ]) > 0.0
                );
            }
            // Plaintext to the server: refused, so no bytes.
            "istio-workload-dashboard#4" | "istio-workload-dashboard#6" => {
                let v =
                    series(&[("source_workload", "n0p1"), ("source_workload_namespace", "plain")]);
                assert!(v == 0.0, "{what}: {v}");
            }
            "istio-workload-dashboard#7" | "istio-workload-dashboard#9" => {
                assert_eq!(r.len(), 1, "{what}: {r:#?}");
                assert!(series(&[("destination_service", "unknown")]) > 0.0, "{what}");
            }
            // The client sends nothing outside mutual TLS.
            "istio-workload-dashboard#8" | "istio-workload-dashboard#10" => {
                assert!(r.is_empty(), "{what}: {r:#?}");
            }
            "istio-mesh-dashboard#1" | "istio-mesh-dashboard#2" => {
                let v = series(&[
                    ("destination_workload", "server"),
                    ("destination_workload_namespace", "strict"),
                    ("destination_workload_var", "server.strict"),
                ]);
                assert!(v > 0.0, "{what}: {v}");
                // The denied connection to `locked` moved nothing.
                assert!(series(&[("destination_workload", "locked")]) == 0.0, "{what}");
            }
            other => panic!("no expectation for {other} ({}); add one here", e.panel),
        }
    }
    // Istio's own label set on a series, checked against ztunnel's
    // CommonTrafficLabels (fixture's label_set_source).
    let r = p.query("istio_tcp_connections_opened_total{reporter=\"destination\",destination_workload=\"server\",response_flags=\"-\",source_workload=\"client\"}");
    let keys: BTreeSet<String> = labels(&r[0]).into_keys().collect();
    let istio: BTreeSet<String> = [
        "reporter",
        "source_workload",
        "source_canonical_service",
        "source_canonical_revision",
        "source_workload_namespace",
        "source_principal",
        "source_app",
        "source_version",
        "source_cluster",
        "destination_service",
        "destination_service_namespace",
        "destination_service_name",
        "destination_workload",
        "destination_canonical_service",
        "destination_canonical_revision",
        "destination_workload_namespace",
        "destination_principal",
        "destination_app",
        "destination_version",
        "destination_cluster",
        "request_protocol",
        "response_flags",
        "connection_security_policy",
        // Prometheus' own target labels.
        "instance",
        "job",
        "pod",
        "app",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(keys, istio);
    let l = labels(&r[0]);
    assert_eq!(l["source_principal"], "spiffe://cluster.local/ns/strict/sa/n0p0");
    assert_eq!(l["connection_security_policy"], "mutual_tls");
    let denied =
        p.query("sum by (reporter) (istio_tcp_connections_failed_total{response_flags=\"DENY\"})");
    assert_eq!(denied.len(), 2, "deny and refused plaintext are DENY on both sides: {denied:#?}");
    stop.store(true, Ordering::Relaxed);
    background.join().expect("background traffic");
}
