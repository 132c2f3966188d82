//! `tlsmesh status [all|workloads|certificates|connections|policies]`:
//! reads the daemon's admin API (or a saved `/config_dump` with `--file`)
//! and prints one view, like `istioctl ztunnel-config`, as a table, JSON or
//! YAML. Rendering is pure (`render_*` over the dump's JSON); the IO is
//! [`fetch`] and the file read. Also `tlsmesh logging` ([`logging`]), the
//! one admin-API change the CLI makes.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use serde_json::{json, Value};

use crate::cli::{LoggingArgs, StatusArgs, StatusFormat, StatusView};

/// Errors of `tlsmesh status`.
#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    /// The admin API did not answer.
    #[error("{0}")]
    Admin(String),
    /// The saved dump could not be read.
    #[error("cannot read the dump {path}: {message} (save one with `curl -s 127.0.0.1:15000/config_dump > dump.json`)")]
    File { path: String, message: String },
    /// Output could not be encoded.
    #[error("cannot encode the output: {0}")]
    Encode(String),
}

/// GETs `path` from the admin API and parses the JSON body.
pub fn fetch(
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    request(addr, "GET", path).map(|(_, body)| body)
}

/// One admin API request: the status code and the JSON body.
fn request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
) -> Result<(u16, serde_json::Value), Box<dyn std::error::Error>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("cannot reach the tlsmesh admin API at {addr}: {e} (is the daemon running on this node?)"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let code = buf.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).ok_or("malformed admin API response")?;
    Ok((code, serde_json::from_str(body)?))
}

/// `tlsmesh logging`: POSTs the change to `/logging`, returns what the
/// daemon answered (its filter and whether the eBPF programs log).
pub fn logging(args: &LoggingArgs) -> Result<String, StatusError> {
    let level = args.level.as_ref().map(|l| format!("level={}", l.replace('&', "%26")));
    let ebpf = args.ebpf.as_ref().map(|e| format!("ebpf={e}"));
    let path =
        format!("/logging?{}", [level, ebpf].into_iter().flatten().collect::<Vec<_>>().join("&"));
    let (code, body) =
        request(args.admin_addr, "POST", &path).map_err(|e| StatusError::Admin(e.to_string()))?;
    if code != 200 {
        return Err(StatusError::Admin(body["error"].as_str().unwrap_or("refused").to_string()));
    }
    Ok(body.to_string())
}

/// Runs the command.
pub fn run(args: &StatusArgs) -> Result<(), StatusError> {
    let (dump, stats, ready) = if let Some(path) = &args.file {
        let err = |message: String| StatusError::File { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let dump: Value = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
        // A `tlsmesh status --json` output holds the dump under `config_dump`.
        match dump.get("config_dump") {
            Some(d) => (d.clone(), dump["stats"].clone(), dump["ready"].clone()),
            None => (dump, Value::Null, Value::Null),
        }
    } else {
        let get =
            |path| fetch(args.admin_addr, path).map_err(|e| StatusError::Admin(e.to_string()));
        let dump = get("/config_dump")?;
        let stats = get("/stats")?;
        (dump, stats, get("/healthz/ready").unwrap_or_default())
    };
    let now = time::OffsetDateTime::now_utc();
    let out = match args.format() {
        StatusFormat::Table => {
            let colour = std::io::IsTerminal::is_terminal(&std::io::stdout());
            match args.view {
                StatusView::All => render(&dump, &stats, &ready, colour),
                StatusView::Workloads => render_workloads(&dump),
                StatusView::Certificates => render_certificates(&dump, now),
                StatusView::Connections => render_connections(&dump),
                StatusView::Policies => render_policies(&dump),
            }
        }
        StatusFormat::Json => {
            let v = view_value(args.view, &dump, &stats, &ready);
            serde_json::to_string_pretty(&v).map_err(|e| StatusError::Encode(e.to_string()))? + "\n"
        }
        StatusFormat::Yaml => {
            let v = view_value(args.view, &dump, &stats, &ready);
            serde_yaml::to_string(&v).map_err(|e| StatusError::Encode(e.to_string()))?
        }
    };
    print!("{out}");
    Ok(())
}

/// The data of a view, for `-o json|yaml`: the dump's own fields (pure).
pub fn view_value(view: StatusView, dump: &Value, stats: &Value, ready: &Value) -> Value {
    match view {
        StatusView::All => json!({"config_dump": dump, "stats": stats, "ready": ready}),
        StatusView::Workloads => json!({"node": dump["config"]["node"], "workloads": dump["pods"]}),
        StatusView::Certificates => {
            json!({"certificates": dump["certificates"], "trust_roots": dump["trust_roots"]})
        }
        StatusView::Connections => {
            json!({"connections": dump["connections"], "tunnels": dump["tunnels"]})
        }
        StatusView::Policies => json!({
            "deny_list": dump["config"]["identity"]["deny_list"],
            "policy": dump["config"]["policy"],
            "modes": dump["pods"].as_array().into_iter().flatten()
                .map(|p| json!({"pod": p["key"], "mode": p["mode"]})).collect::<Vec<_>>(),
            "denies": dump["denies"],
            "problems": dump["problems"],
        }),
    }
}

/// Lays out rows under a header, each column as wide as its widest cell.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        use std::fmt::Write as _;
        let mut l = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                l.push_str(c);
            } else {
                let _ = write!(l, "{c:<width$}  ", width = w[i]);
            }
        }
        l.trim_end().to_string() + "\n"
    };
    let mut o = line(header.to_vec());
    for r in rows {
        o += &line(r.iter().map(String::as_str).collect());
    }
    o
}

fn arr(v: &Value) -> impl Iterator<Item = &Value> {
    v.as_array().into_iter().flatten()
}

/// `tlsmesh status workloads` (pure).
pub fn render_workloads(dump: &Value) -> String {
    let node = s(&dump["config"]["node"]);
    let rows: Vec<Vec<String>> = arr(&dump["pods"])
        .map(|p| {
            let key = s(&p["key"]);
            let (ns, name) = key.split_once('/').unwrap_or(("", key.as_str()));
            let ips: Vec<String> = arr(&p["ips"]).map(s).collect();
            vec![
                ns.to_string(),
                name.to_string(),
                ips.join(","),
                node.clone(),
                s(&p["mode"]),
                s(&p["identity"]),
            ]
        })
        .collect();
    table(&["NAMESPACE", "POD NAME", "ADDRESS", "NODE", "MODE", "IDENTITY"], &rows)
}

/// `tlsmesh status certificates` (pure; `now` decides the status column).
pub fn render_certificates(dump: &Value, now: time::OffsetDateTime) -> String {
    let rfc = &time::format_description::well_known::Rfc3339;
    let mut rows: Vec<Vec<String>> = arr(&dump["certificates"])
        .map(|c| {
            let not_after = time::OffsetDateTime::parse(&s(&c["not_after"]), rfc).ok();
            let status = match not_after {
                Some(t) if t <= now => "Expired".to_string(),
                None => "Unknown".to_string(),
                Some(_) if c["failures"].as_u64().unwrap_or(0) > 0 => {
                    format!("Available, renewal failing ({})", s(&c["failures"]))
                }
                Some(_) => "Available".to_string(),
            };
            let left = not_after.map_or_else(String::new, |t| human((t - now).whole_seconds()));
            vec![
                s(&c["identity"]),
                "Leaf".into(),
                status,
                s(&c["serial"]),
                s(&c["not_before"]),
                s(&c["not_after"]),
                left,
                s(&c["renewals"]),
            ]
        })
        .collect();
    for r in arr(&dump["trust_roots"]) {
        let fp = format!("sha256:{}", s(r));
        rows.push(vec![
            "trust root".into(),
            "Root".into(),
            "Trusted".into(),
            fp,
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]);
    }
    table(
        &[
            "IDENTITY",
            "TYPE",
            "STATUS",
            "SERIAL / FINGERPRINT",
            "NOT BEFORE",
            "NOT AFTER",
            "EXPIRES IN",
            "RENEWALS",
        ],
        &rows,
    )
}

/// `tlsmesh status connections` (pure). Local/remote are seen from the pod
/// on this node; BYTES is `-` while open, since the daemon counts bytes when
/// a connection closes (`/config_dump` has none for open ones).
pub fn render_connections(dump: &Value) -> String {
    let rows: Vec<Vec<String>> = arr(&dump["connections"])
        .map(|c| {
            let outbound = c["direction"] == "outbound";
            let (local, remote, remote_id) = if outbound {
                (s(&c["src"]), s(&c["dst"]), s(&c["dst_identity"]))
            } else {
                (s(&c["dst"]), s(&c["src"]), s(&c["src_identity"]))
            };
            let transport = match (&c["transport"], s(&c["route"])) {
                (Value::String(t), r) => format!("{r}/{t}"),
                (_, r) => r,
            };
            let bytes = match (c["bytes_sent"].as_u64(), c["bytes_received"].as_u64()) {
                (Some(tx), Some(rx)) => format!("{tx}/{rx}"),
                _ => "-".into(),
            };
            let age = c["age_s"].as_i64().map_or_else(String::new, human);
            vec![
                s(&c["pod"]),
                s(&c["direction"]),
                local,
                remote,
                if remote_id.is_empty() { "-".into() } else { remote_id },
                transport,
                bytes,
                age,
            ]
        })
        .collect();
    table(
        &[
            "WORKLOAD",
            "DIRECTION",
            "LOCAL",
            "REMOTE",
            "REMOTE IDENTITY",
            "TRANSPORT",
            "BYTES",
            "AGE",
        ],
        &rows,
    )
}

/// `tlsmesh status policies` (pure): what the dump has about policy — the
/// files in force, each pod's mode, recent denies and problems.
pub fn render_policies(dump: &Value) -> String {
    let file = |v: &Value| if v.is_null() { "(none)".to_string() } else { s(v) };
    let mut o = format!(
        "deny list: {}\npolicy file: {}\n\n",
        file(&dump["config"]["identity"]["deny_list"]),
        file(&dump["config"]["policy"])
    );
    let modes: Vec<Vec<String>> =
        arr(&dump["pods"]).map(|p| vec![s(&p["key"]), s(&p["mode"])]).collect();
    o += &table(&["POD", "MODE"], &modes);
    o += "\nRECENT DENIES\n";
    let denies: Vec<Vec<String>> = arr(&dump["denies"])
        .map(|d| vec![s(&d["at"]), s(&d["source"]), s(&d["destination"]), s(&d["reason"])])
        .collect();
    if denies.is_empty() {
        o += "(none)\n";
    } else {
        o += &table(&["AT", "SOURCE", "DESTINATION", "REASON"], &denies);
    }
    let problems: Vec<String> = arr(&dump["problems"]).map(s).collect();
    if !problems.is_empty() {
        o += "\nPROBLEMS\n";
        for p in problems {
            o += &p;
            o.push('\n');
        }
    }
    o
}

fn s(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(x) => x.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The human-readable report (pure, for tests).
#[expect(clippy::too_many_lines, reason = "one table after the other")]
pub fn render(
    dump: &serde_json::Value,
    stats: &serde_json::Value,
    ready: &serde_json::Value,
    colour: bool,
) -> String {
    use std::fmt::Write as _;
    let (bold, green, red, reset) =
        if colour { ("\x1b[1m", "\x1b[32m", "\x1b[31m", "\x1b[0m") } else { ("", "", "", "") };
    let mut o = String::new();
    let is_ready = ready.as_str() == Some("ready");
    let _ = writeln!(
        o,
        "{bold}node {}{reset}  transport {}  {}",
        s(&dump["config"]["node"]),
        s(&dump["config"]["transport"]),
        if is_ready {
            format!("{green}ready{reset}")
        } else if ready.is_null() {
            "readiness unknown (saved dump)".to_string()
        } else {
            format!("{red}not ready: {}{reset}", s(&ready["not_ready"]))
        }
    );
    let _ = writeln!(
        o,
        "\n{bold}PODS{reset}\n{:<28} {:<11} {:<52} ADDRESSES",
        "POD", "MODE", "IDENTITY"
    );
    for p in dump["pods"].as_array().into_iter().flatten() {
        let ips: Vec<String> = p["ips"].as_array().into_iter().flatten().map(s).collect();
        let _ = writeln!(
            o,
            "{:<28} {:<11} {:<52} {}",
            s(&p["key"]),
            s(&p["mode"]),
            s(&p["identity"]),
            ips.join(",")
        );
    }
    // Open connections (the connection table), grouped by who talks to whom.
    let mut conns: std::collections::BTreeMap<(String, String, String, String), usize> =
        std::collections::BTreeMap::new();
    for c in dump["connections"].as_array().into_iter().flatten() {
        let peer = match (&c["peer_pod"], &c["direction"]) {
            (serde_json::Value::String(p), _) => p.clone(),
            (_, d) if d == "outbound" => s(&c["dst"]),
            _ => s(&c["src"]),
        };
        let key = (s(&c["direction"]), s(&c["route"]), s(&c["pod"]), peer);
        *conns.entry(key).or_default() += 1;
    }
    let _ = writeln!(
        o,
        "\n{bold}CONNECTIONS{reset}\n{:<9} {:<12} {:<28} {:<40} OPEN",
        "DIRECTION", "ROUTE", "POD", "PEER"
    );
    for ((dir, route, pod, peer), n) in &conns {
        let _ = writeln!(o, "{dir:<9} {route:<12} {pod:<28} {peer:<40} {n}");
    }
    // Tunnel connections from peer daemons (what revocation closes).
    let mut groups: std::collections::BTreeMap<(String, String, String), usize> =
        std::collections::BTreeMap::new();
    for t in dump["tunnels"].as_array().into_iter().flatten() {
        *groups.entry((s(&t["direction"]), s(&t["peer"]), s(&t["transport"]))).or_default() += 1;
    }
    let _ = writeln!(
        o,
        "\n{bold}TUNNEL CONNECTIONS{reset}\n{:<9} {:<52} {:<9} OPEN",
        "DIRECTION", "PEER", "TRANSPORT"
    );
    for ((dir, peer, tr), n) in &groups {
        let _ = writeln!(o, "{dir:<9} {peer:<52} {tr:<9} {n}");
    }
    if let Some(pool) = dump["pool"].as_object() {
        let _ = writeln!(
            o,
            "pool: {} TCP connections / {} streams, {} QUIC connections / {} streams",
            s(&pool["hbone_connections"]),
            s(&pool["hbone_streams"]),
            s(&pool["quic_connections"]),
            s(&pool["quic_streams"])
        );
    }
    let _ = writeln!(
        o,
        "\n{bold}CERTIFICATES{reset}\n{:<52} {:<34} {:<12} RENEWALS",
        "IDENTITY", "SERIAL", "EXPIRES IN"
    );
    let now = time::OffsetDateTime::now_utc();
    for c in dump["certificates"].as_array().into_iter().flatten() {
        let left = time::OffsetDateTime::parse(
            &s(&c["not_after"]),
            &time::format_description::well_known::Rfc3339,
        )
        .map_or(0, |t| (t - now).whole_seconds());
        let left = if left > 3600 {
            format!("{}h{}m", left / 3600, (left % 3600) / 60)
        } else {
            format!("{}m{}s", left / 60, left % 60)
        };
        let _ = writeln!(
            o,
            "{:<52} {:<34} {:<12} {}",
            s(&c["identity"]),
            s(&c["serial"]),
            left,
            s(&c["renewals"])
        );
    }
    let _ = writeln!(o, "\n{bold}RECENT DENIES{reset}");
    let denies: Vec<&serde_json::Value> = dump["denies"].as_array().into_iter().flatten().collect();
    if denies.is_empty() {
        let _ = writeln!(o, "(none)");
    }
    for d in denies.iter().rev().take(10) {
        let _ = writeln!(
            o,
            "{}  {} -> {}: {red}{}{reset}",
            s(&d["at"]),
            s(&d["source"]),
            s(&d["destination"]),
            s(&d["reason"])
        );
    }
    let problems: Vec<&serde_json::Value> =
        dump["problems"].as_array().into_iter().flatten().collect();
    if !problems.is_empty() {
        let _ = writeln!(o, "\n{bold}PROBLEMS{reset}");
        for p in problems {
            let _ = writeln!(o, "{red}{}{reset}", s(p));
        }
    }
    let _ = writeln!(o, "\n{bold}COUNTERS{reset}");
    for (k, v) in stats["daemon"].as_object().into_iter().flatten() {
        let _ = writeln!(o, "  {k:<28} {v}");
    }
    for (k, v) in stats["kernel"].as_object().into_iter().flatten() {
        let _ = writeln!(o, "  kernel.{k:<21} {v}");
    }
    o
}

/// `1d2h`, `3h4m`, `5m6s`, `7s`; negative as `-…`.
pub fn human(secs: i64) -> String {
    let sign = if secs < 0 { "-" } else { "" };
    let s = secs.unsigned_abs();
    let body = if s >= 86_400 {
        format!("{}d{}h", s / 86_400, (s % 86_400) / 3600)
    } else if s >= 3600 {
        format!("{}h{}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dump with the field names `admin.rs` emits (pods: `PodView`,
    /// connections: `ConnView`, certificates: `CertStatus`, tunnels:
    /// `TunnelView`).
    fn fixture() -> Value {
        serde_json::from_str(include_str!("status/fixture_dump.json")).unwrap()
    }

    fn now() -> time::OffsetDateTime {
        time::OffsetDateTime::parse(
            "2030-06-01T12:00:00Z",
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    }

    /// The cells of the row whose first cells are `first` (space separated).
    fn row<'a>(out: &'a str, first: &str) -> Vec<&'a str> {
        let want: Vec<&str> = first.split_whitespace().collect();
        out.lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|cells| cells.starts_with(&want))
            .unwrap_or_else(|| panic!("no row {first}:\n{out}"))
    }

    #[test]
    fn workloads_view() {
        let out = render_workloads(&fixture());
        assert!(out.starts_with("NAMESPACE"), "{out}");
        assert_eq!(
            row(&out, "shop web"),
            [
                "shop",
                "web",
                "10.77.1.2,fd00:77:1::2",
                "n0",
                "strict",
                "spiffe://cluster.local/ns/shop/sa/web"
            ]
        );
        assert_eq!(row(&out, "shop db")[4], "permissive");
    }

    #[test]
    fn certificates_view() {
        let out = render_certificates(&fixture(), now());
        let web = row(&out, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(&web[1..4], ["Leaf", "Available", "5ab1"], "{out}");
        assert!(web.contains(&"12h0m") && web.contains(&"3"), "{out}");
        let db = row(&out, "spiffe://cluster.local/ns/shop/sa/db");
        assert_eq!(db[2], "Expired", "{out}");
        assert!(out
            .lines()
            .any(|l| l.starts_with("trust root") && l.contains("sha256:a1b2c3d4e5f60718")));
    }

    #[test]
    fn connections_view() {
        let out = render_connections(&fixture());
        assert_eq!(
            out.lines().next().unwrap().split_whitespace().collect::<Vec<_>>(),
            [
                "WORKLOAD",
                "DIRECTION",
                "LOCAL",
                "REMOTE",
                "REMOTE",
                "IDENTITY",
                "TRANSPORT",
                "BYTES",
                "AGE"
            ]
        );
        assert_eq!(
            row(&out, "shop/web"),
            [
                "shop/web",
                "outbound",
                "10.77.1.2:40000",
                "10.77.2.2:7000",
                "spiffe://cluster.local/ns/pay/sa/api",
                "tunnel/tcp",
                "-",
                "1m15s"
            ]
        );
        // Inbound: local is the pod's side, remote the client; no identity in plaintext.
        assert_eq!(
            row(&out, "shop/db"),
            ["shop/db", "inbound", "10.77.1.3:5432", "192.0.2.7:4000", "-", "plaintext", "-", "4s"]
        );
    }

    #[test]
    fn policies_view() {
        let out = render_policies(&fixture());
        assert!(
            out.contains("deny list: /etc/tlsmesh/deny.toml")
                && out.contains("policy file: (none)"),
            "{out}"
        );
        assert_eq!(row(&out, "shop/web"), ["shop/web", "strict"]);
        assert!(out
            .lines()
            .any(|l| l.contains("192.0.2.9:5555") && l.ends_with("plaintext to a strict pod")));
        assert!(out.contains("PROBLEMS\nshop/old: netns gone"));
        let empty = render_policies(&json!({}));
        assert!(empty.contains("RECENT DENIES\n(none)"), "{empty}");
    }

    #[test]
    fn json_and_yaml_carry_the_view_data() {
        let d = fixture();
        let v = view_value(StatusView::Connections, &d, &Value::Null, &Value::Null);
        assert_eq!(v["connections"][0]["dst_identity"], "spiffe://cluster.local/ns/pay/sa/api");
        assert_eq!(v["tunnels"][0]["remote"], "10.77.2.2:51000");
        let v = view_value(StatusView::Policies, &d, &Value::Null, &Value::Null);
        assert_eq!(v["modes"][1], json!({"pod": "shop/db", "mode": "permissive"}));
        let yaml = serde_yaml::to_string(&view_value(
            StatusView::Workloads,
            &d,
            &Value::Null,
            &Value::Null,
        ))
        .unwrap();
        assert!(yaml.contains("node: n0") && yaml.contains("key: shop/web"), "{yaml}");
        let all = view_value(StatusView::All, &d, &json!({"daemon": {}}), &json!("ready"));
        assert_eq!(all["config_dump"]["pid"], 4242);
        // An offline dump has no readiness: said so, not "not ready".
        let text = render(&d, &Value::Null, &Value::Null, false);
        assert!(text.contains("readiness unknown"), "{text}");
    }

    #[test]
    fn renders_without_colour_off_a_terminal() {
        let dump = serde_json::json!({
            "config": {"node": "n0", "transport": "tcp"},
            "pods": [{"key": "shop/web", "mode": "strict", "identity": "spiffe://td/ns/shop/sa/web", "ips": ["10.0.0.2"]}],
            "tunnels": [{"direction": "inbound", "peer": "spiffe://td/ns/shop/sa/db", "transport": "tcp"}, {"direction": "inbound", "peer": "spiffe://td/ns/shop/sa/db", "transport": "tcp"}],
            "connections": [
                {"direction": "outbound", "route": "tunnel", "pod": "shop/web", "peer_pod": "shop/db", "dst": "10.0.1.2:5432"},
                {"direction": "outbound", "route": "tunnel", "pod": "shop/web", "peer_pod": "shop/db", "dst": "10.0.1.2:5432"},
                {"direction": "inbound", "route": "plaintext", "pod": "shop/web", "peer_pod": null, "src": "192.0.2.7:4000"}
            ],
            "certificates": [{"identity": "spiffe://td/ns/shop/sa/web", "serial": "ab", "not_after": "2999-01-01T00:00:00Z", "renewals": 2}],
            "denies": [{"at": "t", "source": "10.9.9.9:1", "destination": "shop/web", "reason": "plaintext to a strict pod"}],
        });
        let out = render(
            &dump,
            &serde_json::json!({"daemon": {"outbound_tunnel": 3}}),
            &serde_json::json!("ready"),
            false,
        );
        assert!(!out.contains('\x1b'), "no colour codes");
        assert!(out.contains("shop/web") && out.contains("strict"));
        assert!(
            out.lines().any(|l| l.starts_with("inbound")
                && l.contains("tcp")
                && l.trim_end().ends_with(" 2")),
            "tunnel connections grouped per peer:\n{out}"
        );
        assert!(
            out.lines().any(|l| l.starts_with("outbound")
                && l.contains("tunnel")
                && l.contains("shop/db")
                && l.trim_end().ends_with(" 2")),
            "connections grouped per pod pair:\n{out}"
        );
        assert!(
            out.lines().any(|l| l.contains("plaintext") && l.contains("192.0.2.7:4000")),
            "{out}"
        );
        assert!(out.contains("plaintext to a strict pod"));
        assert!(out.contains("outbound_tunnel"));
        let coloured = render(
            &dump,
            &serde_json::json!({}),
            &serde_json::json!({"not_ready": "starting"}),
            true,
        );
        assert!(coloured.contains("\x1b[31mnot ready: starting"));
    }
}
