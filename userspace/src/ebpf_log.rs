//! The eBPF programs' decision log, read into the daemon's log.
//!
//! With the switch on (`ebpf_log`, `--ebpf-log`, or at run time `POST
//! /logging?ebpf=on`), connect4/6 log every decision about an enrolled pod's
//! connect (captured, or bypassed and why) and `sk_lookup` every inbound SYN
//! it steers, passes or drops, through aya-log's ring buffer. This module
//! reads that ring (one task, owned by the daemon's root scope), names the
//! pod each record is about — by netns cookie (`netns=`) or by address
//! (`pod_ip=`) — and emits it as a `tracing` event with target
//! `tlsmesh::ebpf`, so `RUST_LOG`/`/logging?level=` filter it like any other.
//! Off, the programs test one bit per decision and write nothing, and the
//! ring is not even mapped: the reader starts at the first switch-on (and
//! then stays, reading nothing while the log is off).

use std::{
    net::IpAddr,
    sync::{Arc, Mutex},
};

use aya_log::EbpfLogger;
use tokio::io::{unix::AsyncFd, Interest};
use tracing::{info, warn};

use crate::{capture::Capture, kernel::DecisionSwitch, scope::Scope, state::NodeState, sync::lock};

/// Why the decision log cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum EbpfLogError {
    /// The ring was not found among the program's maps.
    #[error("cannot open the eBPF decision log of program {program}: {source}")]
    Open { program: u32, source: aya_log::Error },
    /// The ring's fd cannot be polled.
    #[error("cannot poll the eBPF decision log: {0}")]
    Poll(std::io::Error),
}

/// Appends ` pod=namespace/name` to a record that names a pod by its netns
/// cookie (`netns=N`) or its address (`pod_ip=A`) when the lookup knows it;
/// an address no pod of the inventory has gets ` pod=unknown` (the usual
/// reason an inbound SYN finds no listener while the daemon runs).
pub fn annotate(
    msg: &str,
    by_netns: impl Fn(u64) -> Option<String>,
    by_ip: impl Fn(IpAddr) -> Option<String>,
) -> String {
    let field = |name: &str| msg.split_whitespace().find_map(|w| w.strip_prefix(name));
    let pod = match (field("netns="), field("pod_ip=").and_then(|v| v.parse().ok())) {
        (Some(v), _) => v.parse().ok().and_then(by_netns),
        (None, Some(ip)) => Some(by_ip(ip).unwrap_or_else(|| "unknown".into())),
        (None, None) => None,
    };
    match pod {
        Some(p) => format!("{msg} pod={p}"),
        None => msg.to_string(),
    }
}

/// The `log::Log` the aya-log reader writes to: names the pod, re-emits
/// the record through `tracing`.
struct Forward {
    state: Arc<NodeState>,
}

impl log::Log for Forward {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        let msg = annotate(
            &record.args().to_string(),
            |cookie| self.state.pods().iter().find(|p| p.cookie == cookie).map(|p| p.key()),
            |ip| self.state.inventory().pod_by_ip(ip).map(tlsmesh_inventory::Pod::key),
        );
        let program = record.module_path().unwrap_or(record.target());
        match record.level() {
            log::Level::Error | log::Level::Warn => {
                warn!(target: "tlsmesh::ebpf", program, "{msg}");
            }
            _ => info!(target: "tlsmesh::ebpf", program, "{msg}"),
        }
    }

    fn flush(&self) {}
}

/// The decision log's switch: the flag in the programs' configuration, and
/// the reader, started when the log is first switched on.
pub struct DecisionLog {
    capture: Arc<Capture>,
    state: Arc<NodeState>,
    /// Owns the reader task.
    scope: Scope,
    reading: Mutex<bool>,
}

impl DecisionLog {
    /// The switch of `capture`'s programs; records name pods from `state`;
    /// the reader runs in `scope`.
    pub fn new(capture: Arc<Capture>, state: Arc<NodeState>, scope: Scope) -> Self {
        Self { capture, state, scope, reading: Mutex::new(false) }
    }
}

impl DecisionSwitch for DecisionLog {
    fn can_log(&self) -> bool {
        self.capture.decision_log_program().is_some()
    }

    fn logging(&self) -> bool {
        self.capture.log_decisions()
    }

    fn set_logging(&self, on: bool) -> Result<(), String> {
        if on {
            let Some(program) = self.capture.decision_log_program() else {
                return Err("the loaded eBPF object cannot log its decisions (it has no \
                            aya-log ring; an older or foreign --ebpf-object?)"
                    .into());
            };
            let mut reading = lock(&self.reading);
            if !*reading {
                start(&self.scope, program, Arc::clone(&self.state)).map_err(|e| e.to_string())?;
                *reading = true;
            }
        }
        self.capture.set_log_decisions(on).map_err(|e| e.to_string())
    }
}

/// Starts reading the decision log of the load that `program` (a kernel
/// program id) belongs to, until `scope` ends.
fn start(scope: &Scope, program: u32, state: Arc<NodeState>) -> Result<(), EbpfLogError> {
    let logger = EbpfLogger::init_from_id_with_logger(program, Forward { state })
        .map_err(|source| EbpfLogError::Open { program, source })?;
    // SAFETY: the fd is the ring map's, owned by `logger`, which the
    // `AsyncFd` owns for its whole life; it always returns that same fd.
    let mut ring = unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }
        .map_err(|e| EbpfLogError::Poll(e.into()))?;
    scope.spawn(async move {
        loop {
            let Ok(mut guard) = ring.readable_mut().await else {
                warn!("the eBPF decision log cannot be polled any more; decisions are no longer logged");
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods(cookie: u64) -> Option<String> {
        (cookie == 4097).then(|| "demo/client".to_string())
    }

    fn ips(ip: IpAddr) -> Option<String> {
        (ip == IpAddr::from([10, 0, 1, 5])).then(|| "demo/server".to_string())
    }

    #[test]
    fn a_record_gets_the_pod_it_names() {
        let m = "connect captured: netns=4097 dst=10.0.1.5:80 reason=enrolled";
        assert_eq!(annotate(m, pods, ips), format!("{m} pod=demo/client"));
        let m = "inbound SYN dropped: pod_ip=10.0.1.5 port=80 from=10.0.0.9:4000 reason=x";
        assert_eq!(annotate(m, pods, ips), format!("{m} pod=demo/server"));
    }

    #[test]
    fn an_address_no_pod_has_is_called_unknown() {
        let m = "inbound SYN dropped: pod_ip=10.9.9.9 port=80 from=10.0.0.9:4000";
        assert_eq!(annotate(m, pods, ips), format!("{m} pod=unknown"));
    }

    #[test]
    fn an_unknown_netns_or_a_record_without_a_pod_is_left_as_it_is() {
        for m in [
            "connect bypassed: netns=1 dst=127.0.0.1:80 reason=never-captured",
            "inbound SYN steered: pod_ip=garbage port=80",
            "something else",
        ] {
            assert_eq!(annotate(m, pods, ips), m);
        }
    }
}
