//! `tlsmesh status`: reads the daemon's admin API and prints what it does.

use std::{
    io::{Read, Write},
    net::TcpStream,
    time::Duration,
};

use crate::cli::StatusArgs;

/// GETs `path` from the admin API and parses the JSON body.
pub fn fetch(
    addr: std::net::SocketAddr,
    path: &str,
) -> Result<serde_json::Value, Box<dyn std::error::Error>> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .map_err(|e| format!("cannot reach the tlsmesh admin API at {addr}: {e} (is the daemon running on this node?)"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut buf = String::new();
    s.read_to_string(&mut buf)?;
    let body = buf.split_once("\r\n\r\n").map(|x| x.1).ok_or("malformed admin API response")?;
    Ok(serde_json::from_str(body)?)
}

/// Runs the command.
pub fn run(args: &StatusArgs) -> Result<(), Box<dyn std::error::Error>> {
    let dump = fetch(args.admin_addr, "/config_dump")?;
    let stats = fetch(args.admin_addr, "/stats")?;
    let ready = fetch(args.admin_addr, "/healthz/ready").unwrap_or_default();
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(
                &serde_json::json!({"config_dump": dump, "stats": stats, "ready": ready})
            )?
        );
        return Ok(());
    }
    let colour = std::io::IsTerminal::is_terminal(&std::io::stdout());
    print!("{}", render(&dump, &stats, &ready, colour));
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

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
