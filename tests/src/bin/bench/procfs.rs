//! What the benchmark reads from /proc: resident memory and CPU time of the
//! processes under test, whether a process's network namespace has a TCP
//! listener on a port, and the system's thread head-room.

use std::{fs, time::Duration};

/// `VmRSS` of a process in KiB.
pub fn rss_kib(pid: u32) -> Result<u64, String> {
    let s = fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("read /proc/{pid}/status: {e}"))?;
    parse_vmrss(&s).ok_or_else(|| format!("no VmRSS in /proc/{pid}/status (process exited?)"))
}

fn parse_vmrss(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// utime + stime of a process (all its threads), in clock ticks.
pub fn cpu_ticks(pid: u32) -> Result<u64, String> {
    let s = fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("read /proc/{pid}/stat: {e}"))?;
    parse_stat_cpu(&s).ok_or_else(|| format!("cannot parse /proc/{pid}/stat"))
}

fn parse_stat_cpu(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses: fields
    // after the last ')' start at field 3 (state); utime is 14, stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Clock ticks per second (`_SC_CLK_TCK`).
pub fn ticks_per_second() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// Summed CPU ticks of several processes.
pub fn cpu_ticks_sum(pids: &[u32]) -> Result<u64, String> {
    pids.iter().map(|p| cpu_ticks(*p)).sum()
}

/// Does the network namespace of `pid` have a TCP listener on `port`?
pub fn listening(pid: u32, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|f| {
        fs::read_to_string(format!("/proc/{pid}/net/{f}")).is_ok_and(|s| has_listener(&s, port))
    })
}

fn has_listener(table: &str, port: u16) -> bool {
    let want = format!(":{port:04X}");
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&want) && f[3] == "0A"
    })
}

/// Waits until `pid`'s namespace listens on every port in `ports`.
pub fn wait_listening(pid: u32, ports: &[u16], timeout: Duration) -> Result<(), String> {
    netkit::wait_for(timeout, || ports.iter().all(|p| listening(pid, *p)).then_some(()))
        .ok_or_else(|| format!("pid {pid} not listening on {ports:?} within {timeout:?}"))
}

/// The 1-minute load average.
pub fn loadavg() -> Option<f64> {
    fs::read_to_string("/proc/loadavg").ok()?.split_whitespace().next()?.parse().ok()
}

/// Threads (scheduling entities) on the system now, from /proc/loadavg.
pub fn system_threads() -> Option<u64> {
    let s = fs::read_to_string("/proc/loadavg").ok()?;
    s.split_whitespace().nth(3)?.split_once('/')?.1.parse().ok()
}

/// The most threads the benchmark lets the system reach: `pid_max` and
/// threads-max less a margin for everything else on the machine (stunnel
/// runs a thread per connection; `pid_max` is 32768 on some machines).
pub fn thread_ceiling() -> u64 {
    let read = |p: &str| fs::read_to_string(p).ok().and_then(|s| s.trim().parse::<u64>().ok());
    let lim = read("/proc/sys/kernel/pid_max")
        .unwrap_or(32768)
        .min(read("/proc/sys/kernel/threads-max").unwrap_or(u64::MAX));
    lim.saturating_sub(6000)
}

/// Raises this process's open-file limit (children inherit it) towards
/// `want`: both limits when allowed (`CAP_SYS_RESOURCE`), else the soft limit
/// up to the hard one. Returns the limit in force.
pub fn raise_nofile(want: u64) -> Result<u64, String> {
    let nr_open = fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(1 << 20);
    let n = want.min(nr_open);
    let mut cur = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes into a valid rlimit struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut cur) } != 0 {
        return Err(format!("getrlimit(RLIMIT_NOFILE): {}", std::io::Error::last_os_error()));
    }
    if cur.rlim_cur >= n {
        return Ok(cur.rlim_cur);
    }
    let both = libc::rlimit { rlim_cur: n, rlim_max: n.max(cur.rlim_max) };
    // SAFETY: setrlimit reads a valid rlimit struct.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const both) } == 0 {
        return Ok(n);
    }
    let soft = libc::rlimit { rlim_cur: n.min(cur.rlim_max), rlim_max: cur.rlim_max };
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const soft) } == 0 {
        return Ok(soft.rlim_cur);
    }
    Err(format!("setrlimit(RLIMIT_NOFILE, {n}): {}", std::io::Error::last_os_error()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmrss() {
        assert_eq!(parse_vmrss("Name:\tx\nVmPeak:\t 10 kB\nVmRSS:\t   12345 kB\n"), Some(12345));
        assert_eq!(parse_vmrss("Name:\tx\n"), None);
    }

    #[test]
    fn stat_cpu_with_odd_comm() {
        let s = "42 (a b) c) S 1 42 42 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 1000 0 0";
        assert_eq!(parse_stat_cpu(s), Some(325));
    }

    #[test]
    fn listener_lookup() {
        let t = "  sl  local_address rem_address   st\n   0: 00000000:1451 00000000:0000 0A 0\n   1: 0200A8C0:1B59 0100A8C0:D431 01 0\n";
        assert!(has_listener(t, 5201));
        assert!(!has_listener(t, 7001), "established, not listening");
        assert!(!has_listener(t, 80));
    }
}
