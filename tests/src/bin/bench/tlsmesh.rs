//! The tlsmesh candidates: the real `tlsmesh node` daemons on both nodes
//! (netkit's `Daemon`), started per round with the transport under test and
//! removed again afterwards (`tlsmesh node --uninstall`), so the next
//! candidate runs on a machine without tlsmesh programs. Also reads the
//! daemons' route counters, which tell whether the traffic took the tunnel.

use std::{
    fs,
    path::{Path, PathBuf},
    time::Duration,
};

use netkit::{tlsmesh_bin, Daemon, Topology};
use serde::Serialize;

/// The two running daemons (node 0 = client side, node 1 = server side).
pub struct Pair {
    pub client: Daemon,
    pub server: Daemon,
}

/// Starts both daemons; a daemon that does not come up is a failure of
/// this candidate, not of the benchmark.
pub fn start(
    topo: &Topology,
    inventory: &Path,
    ca_dir: &Path,
    transport: &str,
) -> Result<Pair, String> {
    let ca = ca_dir.display().to_string();
    let extra = ["--transport", transport, "--ca-dir", ca.as_str()];
    let start_one = |n: usize| {
        let d = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Daemon::start(topo, n, inventory, &extra)
        }))
        .map_err(|p| format!("daemon n{n} did not start: {}", panic_message(p.as_ref())))?;
        if let Err(e) = crate::placement::pin_process(d.proc.pid(), n) {
            stop_one(d);
            return Err(e);
        }
        Ok(d)
    };
    let client = start_one(0)?;
    let server = match start_one(1) {
        Ok(s) => s,
        Err(e) => {
            stop_one(client);
            return Err(e);
        }
    };
    Ok(Pair { client, server })
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(ToString::to_string))
        .unwrap_or_default()
}

/// Stops both daemons (SIGTERM, then SIGKILL after 5 s) and removes their
/// pinned programs and maps, so nothing stays captured.
pub fn stop(pair: Pair) -> Result<(), String> {
    let mut problems = Vec::new();
    for d in [pair.client, pair.server] {
        let (pin, node, inventory) = (d.pin_dir.clone(), d.node.clone(), d.inventory.clone());
        stop_one(d);
        if let Err(e) = uninstall(&pin, &node, &inventory) {
            problems.push(e);
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems.join("; "))
    }
}

/// Removes what the daemons leave in the pod namespaces after they stop
/// (the `inet tlsmesh` nftables table, whose conntrack rules would slow
/// every later candidate down, and the delivery routing rule and table), so
/// plaintext and stunnel in later rounds run on the same path as in the
/// first. Only our own pod namespaces are touched.
pub fn clear_residue(pods: &[&netkit::Pod]) -> Vec<String> {
    let mut found = Vec::new();
    let mark = format!("{:#x}/{:#x}", tlsmesh_common::DELIVERY_MARK, tlsmesh_common::DELIVERY_MARK);
    for pod in pods {
        let ns = pod.netns.as_str();
        if netkit::sh(&["ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "tlsmesh"])
            .is_ok()
        {
            found.push(format!("nftables table inet tlsmesh in {}", pod.name));
        }
        for fam in ["-4", "-6"] {
            for _ in 0..8 {
                if netkit::sh(&[
                    "ip", "-n", ns, fam, "rule", "del", "fwmark", &mark, "lookup", "100",
                ])
                .is_err()
                {
                    break;
                }
            }
            let _ = netkit::sh(&["ip", "-n", ns, fam, "route", "flush", "table", "100"]);
        }
    }
    found
}

/// Stops one daemon and removes what it installed.
pub fn stop_and_uninstall(d: Daemon) -> Result<(), String> {
    let (pin, node, inventory) = (d.pin_dir.clone(), d.node.clone(), d.inventory.clone());
    stop_one(d);
    uninstall(&pin, &node, &inventory)
}

fn stop_one(mut d: Daemon) {
    d.proc.signal(nix::sys::signal::Signal::SIGTERM);
    if d.proc.wait_timeout(Duration::from_secs(5)).is_none() {
        d.proc.kill();
    }
}

fn uninstall(pin: &Path, node: &str, inventory: &Path) -> Result<(), String> {
    let bin = tlsmesh_bin();
    let out = std::process::Command::new(&bin)
        .args(["node", "--uninstall", "--node", node, "--inventory"])
        .arg(inventory)
        .arg("--pin-dir")
        .arg(pin)
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("run {} node --uninstall: {e}", bin.display()))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "tlsmesh node --uninstall --pin-dir {} failed: {}",
            pin.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Route counters of both daemons over one candidate's measurements.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct Routes {
    /// Client side: connections carried through the tunnel.
    pub outbound_tunnel: u64,
    /// Client side: connections passed through in plaintext.
    pub outbound_passthrough: u64,
    /// Client side: connections that could not reach their destination.
    pub outbound_failed: u64,
    /// Server side: tunnel streams accepted.
    pub inbound_tunnel_accepted: u64,
    /// Server side: tunnel streams refused.
    pub inbound_tunnel_refused: u64,
    /// Server side: plaintext refused (strict).
    pub inbound_plaintext_refused: u64,
    /// Server side: plaintext accepted (permissive).
    pub inbound_plaintext_accepted: u64,
}

/// The QUIC client's UDP socket (buffers, GSO/GRO) and its busiest pooled
/// connection's path (`/config_dump` `pool`): a note that tells whether the
/// offloads were on, what datagram size MTU discovery reached and whether
/// the throughput runs lost packets.
pub fn quic_path_note(pair: &Pair) -> Result<String, String> {
    let (_, v) = pair
        .client
        .get("/config_dump")
        .map_err(|e| format!("{} /config_dump: {e}", pair.client.node))?;
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let sock = &v["pool"]["quic_socket"];
    let path = v["pool"]["quic_paths"]
        .as_array()
        .and_then(|ps| ps.iter().max_by_key(|p| n(p, "sent_packets")))
        .ok_or("no QUIC connection in the client's pool")?;
    Ok(format!(
        "QUIC client socket: GSO {} segments, GRO {} segments, buffers {} / {} KiB (receive / send); \
         busiest connection after the throughput runs: {} B datagrams, {} of {} packets lost, \
         {} congestion events, RTT {} µs",
        n(sock, "gso_segments"),
        n(sock, "gro_segments"),
        n(sock, "recv_buffer") / 1024,
        n(sock, "send_buffer") / 1024,
        n(path, "mtu"),
        n(path, "lost_packets"),
        n(path, "sent_packets"),
        n(path, "congestion_events"),
        n(path, "rtt_us"),
    ))
}

impl Routes {
    /// Reads the counters now (missing counters read as 0).
    pub fn read(pair: &Pair) -> Result<Self, String> {
        let get = |d: &Daemon| {
            d.get("/stats")
                .map(|(_, v)| v["daemon"].clone())
                .map_err(|e| format!("{} /stats: {e}", d.node))
        };
        let (c, s) = (get(&pair.client)?, get(&pair.server)?);
        let n = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
        Ok(Self {
            outbound_tunnel: n(&c, "outbound_tunnel"),
            outbound_passthrough: n(&c, "outbound_passthrough"),
            outbound_failed: n(&c, "outbound_failed"),
            inbound_tunnel_accepted: n(&s, "inbound_tunnel_accepted"),
            inbound_tunnel_refused: n(&s, "inbound_tunnel_refused"),
            inbound_plaintext_refused: n(&s, "inbound_plaintext_refused"),
            inbound_plaintext_accepted: n(&s, "inbound_plaintext_accepted"),
        })
    }

    /// `self - earlier`, counter by counter.
    pub fn since(self, earlier: Self) -> Self {
        Self {
            outbound_tunnel: self.outbound_tunnel.saturating_sub(earlier.outbound_tunnel),
            outbound_passthrough: self
                .outbound_passthrough
                .saturating_sub(earlier.outbound_passthrough),
            outbound_failed: self.outbound_failed.saturating_sub(earlier.outbound_failed),
            inbound_tunnel_accepted: self
                .inbound_tunnel_accepted
                .saturating_sub(earlier.inbound_tunnel_accepted),
            inbound_tunnel_refused: self
                .inbound_tunnel_refused
                .saturating_sub(earlier.inbound_tunnel_refused),
            inbound_plaintext_refused: self
                .inbound_plaintext_refused
                .saturating_sub(earlier.inbound_plaintext_refused),
            inbound_plaintext_accepted: self
                .inbound_plaintext_accepted
                .saturating_sub(earlier.inbound_plaintext_accepted),
        }
    }

    /// Adds another interval.
    pub fn add(&mut self, o: Self) {
        self.outbound_tunnel += o.outbound_tunnel;
        self.outbound_passthrough += o.outbound_passthrough;
        self.outbound_failed += o.outbound_failed;
        self.inbound_tunnel_accepted += o.inbound_tunnel_accepted;
        self.inbound_tunnel_refused += o.inbound_tunnel_refused;
        self.inbound_plaintext_refused += o.inbound_plaintext_refused;
        self.inbound_plaintext_accepted += o.inbound_plaintext_accepted;
    }

    /// Did the traffic really take the tunnel? `None` when the counters say
    /// it is fine, else what the figures actually measured.
    pub fn caveat(&self) -> Option<String> {
        if self.outbound_tunnel > 0
            && self.outbound_passthrough == 0
            && self.inbound_plaintext_accepted == 0
        {
            return None;
        }
        Some(format!(
            "daemon counters: {} tunnelled, {} passed through in plaintext, {} failed upstream; server side {} tunnel streams accepted, {} plaintext refused, {} plaintext accepted{}",
            self.outbound_tunnel,
            self.outbound_passthrough,
            self.outbound_failed,
            self.inbound_tunnel_accepted,
            self.inbound_plaintext_refused,
            self.inbound_plaintext_accepted,
            if self.outbound_tunnel == 0 { " — these figures are NOT of the mTLS tunnel" } else { "" }
        ))
    }
}

/// Copies the daemons' logs of this run (netkit keeps them in the scratch
/// directory, which is removed on exit) into `dest`.
pub fn keep_logs(topo: &Topology, dest: &Path) -> Vec<PathBuf> {
    let mut kept = Vec::new();
    let Ok(entries) = fs::read_dir(topo.scratch_dir()) else { return kept };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let is_log = Path::new(&name).extension().is_some_and(|x| x.eq_ignore_ascii_case("log"));
        if (name.starts_with("daemon-") || name.starts_with("stunnel-"))
            && is_log
            && fs::create_dir_all(dest).is_ok()
            && fs::copy(e.path(), dest.join(&name)).is_ok()
        {
            kept.push(dest.join(name));
        }
    }
    kept
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caveat_flags_passthrough_and_refusals() {
        let ok = Routes { outbound_tunnel: 10, inbound_tunnel_accepted: 10, ..Routes::default() };
        assert_eq!(ok.caveat(), None);
        let pass =
            Routes { outbound_passthrough: 5, inbound_plaintext_refused: 5, ..Routes::default() };
        let c = pass.caveat().expect("caveat");
        assert!(c.contains("NOT of the mTLS tunnel"), "{c}");
        let mut sum = ok;
        sum.add(pass);
        assert_eq!(sum.since(ok), pass);
    }
}
