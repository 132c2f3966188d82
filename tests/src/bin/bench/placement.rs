//! CPU placement of the two simulated nodes.
//!
//! The topology simulates two Kubernetes nodes on one machine. By default
//! (the method the ztunnel reference was measured with) the
//! processes of both "nodes" share every vCPU, so the two tlsmesh daemons
//! (or the two stunnels), which in a cluster run on different machines, can
//! wait for each other on one vCPU: a woken daemon sat up to 120 µs runnable
//! behind the other one in `perf sched timehist`, and the 4 ms tick shows up
//! as p999. `--pin` gives each node its own share of the CPUs instead, for
//! every candidate alike: node 0 (the client pod, its stunnel or daemon, the
//! benchmark's client threads) the even-numbered CPUs the benchmark may use,
//! node 1 (the server pod's applications, its stunnel or daemon) the
//! odd-numbered ones. That models two machines, but each "node" then has one
//! vCPU for its applications and its proxy.

use std::{os::unix::process::CommandExt, process::Command, sync::OnceLock};

use nix::{sched::CpuSet, unistd::Pid};

/// The CPU set of each node, or `None` when placement is off.
static SETS: OnceLock<Option<[CpuSet; 2]>> = OnceLock::new();

/// Decides the placement once. Returns a sentence for the report.
pub fn init(enabled: bool) -> String {
    let (sets, said) = decide(enabled);
    let _ = SETS.set(sets);
    said
}

fn decide(enabled: bool) -> (Option<[CpuSet; 2]>, String) {
    if !enabled {
        return (None, "no CPU placement: the scheduler spread both nodes over every vCPU (--pin gives each its own)".into());
    }
    let cpus: Vec<usize> = match nix::sched::sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count()).filter(|&c| set.is_set(c).unwrap_or(false)).collect(),
        Err(e) => return (None, format!("no CPU placement: sched_getaffinity failed: {e}")),
    };
    if cpus.len() < 2 {
        return (None, format!("no CPU placement: only {} CPU available", cpus.len()));
    }
    let mut sets = [CpuSet::new(), CpuSet::new()];
    let mut named: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for (i, &c) in cpus.iter().enumerate() {
        if sets[i % 2].set(c).is_ok() {
            named[i % 2].push(c.to_string());
        }
    }
    let said = format!(
        "each simulated node pinned to its own CPUs (node 0, client side: CPU {}; node 1, server side: CPU {})",
        named[0].join(","),
        named[1].join(",")
    );
    (Some(sets), said)
}

fn set(node: usize) -> Option<CpuSet> {
    SETS.get().copied().flatten().map(|s| s[node % 2])
}

/// Pins the calling thread (and the threads it starts later) to `node`'s CPUs.
pub fn pin_thread(node: usize) {
    if let Some(s) = set(node) {
        let _ = nix::sched::sched_setaffinity(Pid::from_raw(0), &s);
    }
}

/// Makes a command's process start on `node`'s CPUs.
pub fn pin_command(cmd: &mut Command, node: usize) {
    if let Some(s) = set(node) {
        // SAFETY: the closure runs between fork and exec; it makes one
        // async-signal-safe system call on a copied value and allocates
        // nothing.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::sched_setaffinity(Pid::from_raw(0), &s).map_err(std::io::Error::from)
            });
        }
    }
}

/// Pins every thread of a running process to `node`'s CPUs (threads it
/// starts later inherit it).
pub fn pin_process(pid: u32, node: usize) -> Result<(), String> {
    let Some(s) = set(node) else { return Ok(()) };
    let dir = format!("/proc/{pid}/task");
    let tasks = std::fs::read_dir(&dir).map_err(|e| format!("read {dir}: {e}"))?;
    for t in tasks.flatten() {
        if let Some(tid) = t.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) {
            nix::sched::sched_setaffinity(Pid::from_raw(tid), &s)
                .map_err(|e| format!("pin thread {tid} of {pid}: {e}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_when_asked() {
        let (sets, said) = decide(false);
        assert!(sets.is_none());
        assert!(said.contains("--pin"), "{said}");
    }

    #[test]
    fn nodes_get_disjoint_cpus_when_there_are_two() {
        let (sets, said) = decide(true);
        let n = std::thread::available_parallelism().map_or(1, usize::from);
        match sets {
            Some([a, b]) => {
                assert!(n >= 2, "{said}");
                for c in 0..CpuSet::count() {
                    assert!(
                        !(a.is_set(c).unwrap_or(false) && b.is_set(c).unwrap_or(false)),
                        "CPU {c} in both nodes"
                    );
                }
                assert!(a.is_set(0).is_ok() && said.contains("node 0"), "{said}");
            }
            None => assert!(n < 2, "placement off on a {n}-CPU machine: {said}"),
        }
    }
}
