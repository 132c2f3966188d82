//! Bulk throughput with iperf3: a one-off server in the server pod, the
//! client in the client pod, JSON output parsed for the receiver's rate.

use std::{
    fs,
    net::SocketAddr,
    process::Stdio,
    time::{Duration, Instant},
};

use netkit::{Pod, Topology};

/// Port of the iperf3 server in the server pod.
pub const PORT: u16 = 5201;

/// What one iperf3 run reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Run {
    /// Receiver's rate, bit/s.
    pub bits_per_second: f64,
    /// Bytes the receiver got.
    pub bytes: f64,
}

/// Runs `iperf3 -c dst -P streams -t secs` in `client` against a fresh
/// one-off server in `server`. Calls `around` just before the client starts
/// and just after it ends (for CPU accounting). Every wait is bounded.
pub fn run(
    topo: &Topology,
    client: &Pod,
    server: &Pod,
    dst: SocketAddr,
    streams: u32,
    secs: u32,
    around: &mut dyn FnMut(),
) -> Result<Run, String> {
    let mut cmd = Topology::command_in(
        &server.netns,
        Some(&server.cgroup),
        "iperf3",
        &["-s", "-1", "-p", &PORT.to_string()],
    )
    .map_err(|e| format!("iperf3 server command: {e}"))?;
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null());
    crate::placement::pin_command(&mut cmd, 1);
    let mut srv =
        topo.spawn("iperf3 server", cmd).map_err(|e| format!("start iperf3 server: {e}"))?;
    crate::procfs::wait_listening(srv.pid(), &[PORT], Duration::from_secs(5))?;
    let out = topo.scratch_dir().join(format!("iperf3-{}-{streams}.json", rand::random::<u32>()));
    let file = fs::File::create(&out).map_err(|e| format!("create {}: {e}", out.display()))?;
    let args = [
        "-c".to_string(),
        dst.ip().to_string(),
        "-p".into(),
        dst.port().to_string(),
        "-P".into(),
        streams.to_string(),
        "-t".into(),
        secs.to_string(),
        "-J".into(),
        "--connect-timeout".into(),
        "3000".into(),
    ];
    let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cmd = Topology::command_in(&client.netns, Some(&client.cgroup), "iperf3", &arg_refs)
        .map_err(|e| format!("iperf3 client command: {e}"))?;
    cmd.stdin(Stdio::null()).stdout(file).stderr(Stdio::null());
    crate::placement::pin_command(&mut cmd, 0);
    around();
    let mut cli = topo.spawn("iperf3 client", cmd).map_err(|e| e.to_string())?;
    let limit = Duration::from_secs(u64::from(secs) + 20);
    let t = Instant::now();
    let mut status = None;
    while t.elapsed() < limit && !crate::stopped() {
        if let Some(st) = cli.wait_timeout(Duration::from_millis(100)) {
            status = Some(st);
            break;
        }
    }
    around();
    cli.kill();
    srv.kill();
    let json = fs::read_to_string(&out).unwrap_or_default();
    let _ = fs::remove_file(&out);
    if status.is_none() {
        return Err(format!("iperf3 did not finish within {limit:?}"));
    }
    parse(&json)
}

/// Reads the receiver's totals (or iperf3's error) from `iperf3 -J` output.
pub fn parse(json: &str) -> Result<Run, String> {
    let v: serde_json::Value = serde_json::from_str(json).map_err(|e| {
        let head: String = json.chars().take(120).collect();
        format!("iperf3 output is not JSON ({e}): {head:?}")
    })?;
    if let Some(e) = v.get("error").and_then(serde_json::Value::as_str) {
        return Err(format!("iperf3: {e}"));
    }
    let sum = &v["end"]["sum_received"];
    match (sum["bits_per_second"].as_f64(), sum["bytes"].as_f64()) {
        (Some(bps), Some(bytes)) if bytes > 0.0 => Ok(Run { bits_per_second: bps, bytes }),
        _ => Err("iperf3 reported no received data".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_receiver_sum() {
        let j = r#"{"start":{},"end":{"sum_sent":{"bits_per_second":9e9,"bytes":5},
            "sum_received":{"bits_per_second":8.5e9,"bytes":5312500000}}}"#;
        assert_eq!(parse(j), Ok(Run { bits_per_second: 8.5e9, bytes: 5.3125e9 }));
    }

    #[test]
    fn reports_iperf_errors() {
        let j = r#"{"start":{},"intervals":[],"end":{},"error":"unable to connect to server: Connection refused"}"#;
        assert_eq!(parse(j), Err("iperf3: unable to connect to server: Connection refused".into()));
        assert!(parse("").is_err());
        assert!(parse(r#"{"end":{"sum_received":{"bits_per_second":0,"bytes":0}}}"#).is_err());
    }
}
