//! Netns discovery for pods that were running before tlsmesh was installed
//! (no CNI `ADD` reached the daemon for them, so [`CniPods`] knows nothing):
//! [`ProcNetns`] finds the network namespace that holds the pod's address
//! by reading `/proc/<pid>/net/fib_trie` and `/proc/<pid>/net/if_inet6` of
//! every process — no `setns`, no netlink — and answers
//! `/proc/<pid>/ns/net` of one process in it (the pod's sandbox or one of
//! its containers, alive as long as the pod). [`FirstOf`] asks the CNI
//! record first and falls back to this.
//!
//! The index is rebuilt at most once per [`ProcNetns::ttl`], not per
//! lookup; the node's own netns (the daemon's) is never an answer, since
//! host-network pods are never enrolled.
//!
//! [`CniPods`]: crate::cni_server::CniPods

use std::{
    collections::{HashMap, HashSet},
    fs,
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use crate::state::{NetnsResolver, PodRef};

/// Local (assigned) IPv4 addresses in a `fib_trie` dump: the entries marked
/// `/32 host LOCAL`, loopback left out.
pub fn fib_trie_local_v4(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut last: Option<IpAddr> = None;
    for line in text.lines() {
        let t = line.trim();
        if let Some(addr) = t.strip_prefix("|-- ") {
            last = addr.trim().parse().ok();
        } else if t.starts_with("/32 host LOCAL") {
            if let Some(ip) = last.filter(|ip| !ip.is_loopback()) {
                if !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
    }
    out
}

/// Global and unique-local IPv6 addresses in an `if_inet6` dump (link-local
/// and loopback left out).
pub fn if_inet6_addrs(text: &str) -> Vec<IpAddr> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let (Some(hex), _, _, Some(scope)) = (f.next(), f.next(), f.next(), f.next()) else {
            continue;
        };
        let Ok(bits) = u128::from_str_radix(hex, 16) else { continue };
        // Scope 0x20 link-local, 0x10 host (loopback), 0x40 site.
        if hex.len() != 32 || scope != "00" {
            continue;
        }
        let ip = IpAddr::V6(Ipv6Addr::from(bits));
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// The netns inode `readlink /proc/<pid>/ns/net` names (`net:[4026531840]`).
pub fn netns_inode(link: &str) -> Option<u64> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Address → `<proc>/<pid>/ns/net`, one process per netns, the netns of
/// `exclude` (inode) left out. Processes that vanish mid-scan are skipped.
pub fn scan(proc_root: &Path, exclude: Option<u64>) -> HashMap<IpAddr, PathBuf> {
    let mut seen: HashSet<u64> = HashSet::new();
    let mut index = HashMap::new();
    let Ok(dir) = fs::read_dir(proc_root) else { return index };
    for entry in dir.flatten() {
        let name = entry.file_name();
        if !name.to_str().is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let pid_dir = entry.path();
        let ns = pid_dir.join("ns/net");
        let Some(inode) = fs::read_link(&ns).ok().and_then(|l| l.to_str().and_then(netns_inode))
        else {
            continue;
        };
        if Some(inode) == exclude || !seen.insert(inode) {
            continue;
        }
        let v4 = fs::read_to_string(pid_dir.join("net/fib_trie")).unwrap_or_default();
        let v6 = fs::read_to_string(pid_dir.join("net/if_inet6")).unwrap_or_default();
        for ip in fib_trie_local_v4(&v4).into_iter().chain(if_inet6_addrs(&v6)) {
            index.entry(ip).or_insert_with(|| ns.clone());
        }
    }
    index
}

struct Cached {
    at: Option<Instant>,
    index: HashMap<IpAddr, PathBuf>,
}

/// A [`NetnsResolver`] over `/proc` (see the module documentation).
pub struct ProcNetns {
    proc_root: PathBuf,
    exclude: Option<u64>,
    ttl: Duration,
    cache: Mutex<Cached>,
}

impl std::fmt::Debug for ProcNetns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcNetns")
            .field("proc_root", &self.proc_root)
            .field("exclude", &self.exclude)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl ProcNetns {
    /// Over `/proc`, leaving out the caller's own netns, re-scanned at most
    /// every 5 s.
    pub fn new() -> Self {
        let own =
            fs::read_link("/proc/self/ns/net").ok().and_then(|l| l.to_str().and_then(netns_inode));
        Self::with_root("/proc", own, Duration::from_secs(5))
    }

    /// Over another proc tree (tests), leaving out the netns `exclude`.
    pub fn with_root(proc_root: impl Into<PathBuf>, exclude: Option<u64>, ttl: Duration) -> Self {
        Self {
            proc_root: proc_root.into(),
            exclude,
            ttl,
            cache: Mutex::new(Cached { at: None, index: HashMap::new() }),
        }
    }

    /// How long a scan is reused.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    fn lookup(&self, ips: &[IpAddr]) -> Option<PathBuf> {
        let mut c = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let stale = c.at.is_none_or(|at| at.elapsed() >= self.ttl);
        if stale {
            c.index = scan(&self.proc_root, self.exclude);
            c.at = Some(Instant::now());
        }
        ips.iter().find_map(|ip| c.index.get(&ip.to_canonical()).cloned())
    }
}

impl Default for ProcNetns {
    fn default() -> Self {
        Self::new()
    }
}

impl NetnsResolver for ProcNetns {
    fn netns(&self, pod: &PodRef<'_>) -> Option<PathBuf> {
        if pod.ips.is_empty() {
            return None;
        }
        self.lookup(pod.ips)
    }
}

/// Asks `0` first, then `1` (e.g. the CNI record, then `/proc`).
#[derive(Debug, Clone, Default)]
pub struct FirstOf<A, B>(pub A, pub B);

impl<A: NetnsResolver, B: NetnsResolver> NetnsResolver for FirstOf<A, B> {
    fn netns(&self, pod: &PodRef<'_>) -> Option<PathBuf> {
        self.0.netns(pod).or_else(|| self.1.netns(pod))
    }

    fn ips(&self, pod: &PodRef<'_>) -> Vec<IpAddr> {
        let ips = self.0.ips(pod);
        if ips.is_empty() {
            self.1.ips(pod)
        } else {
            ips
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    const FIB: &str = "Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
     +-- 10.244.1.0/24 2 0 2
           |-- 10.244.1.0
              /24 link UNICAST
           |-- 10.244.1.7
              /32 host LOCAL
        |-- 10.244.1.255
           /32 link BROADCAST
Local:
           |-- 10.244.1.7
              /32 host LOCAL
";
    const INET6: &str = "fe8000000000000000fc00fffe000001 04 40 20 80     eth0
00000000000000000000000000000001 01 80 10 80       lo
fd000000000000000000000000000007 04 40 00 82     eth0
";

    #[test]
    fn parses_addresses() {
        assert_eq!(fib_trie_local_v4(FIB), ["10.244.1.7".parse::<IpAddr>().unwrap()]);
        assert_eq!(if_inet6_addrs(INET6), ["fd00::7".parse::<IpAddr>().unwrap()]);
        assert_eq!(netns_inode("net:[4026531840]"), Some(4_026_531_840));
        assert_eq!(netns_inode("mnt:[1]"), None);
    }

    fn fake_proc(root: &Path, pid: u32, inode: u64, fib: &str, inet6: &str) {
        let d = root.join(pid.to_string());
        fs::create_dir_all(d.join("ns")).unwrap();
        fs::create_dir_all(d.join("net")).unwrap();
        symlink(format!("net:[{inode}]"), d.join("ns/net")).unwrap();
        fs::write(d.join("net/fib_trie"), fib).unwrap();
        fs::write(d.join("net/if_inet6"), inet6).unwrap();
    }

    #[test]
    fn finds_the_netns_holding_a_pod_address() {
        let root = std::env::temp_dir().join(format!("tlsmesh-procnetns-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        // 1: the host (excluded); 40 and 41: one pod netns; 50: another.
        fake_proc(&root, 1, 100, &FIB.replace("10.244.1.7", "192.168.56.11"), "");
        fake_proc(&root, 40, 200, FIB, INET6);
        fake_proc(&root, 41, 200, FIB, INET6);
        fake_proc(&root, 50, 300, &FIB.replace("10.244.1.7", "10.244.1.8"), "");
        fs::create_dir_all(root.join("self")).unwrap();
        let r = ProcNetns::with_root(&root, Some(100), Duration::from_secs(30));
        let ask =
            |ips: &[IpAddr]| r.netns(&PodRef { namespace: "shop", name: "web", uid: "u", ips });
        let p = ask(&["10.244.1.7".parse().unwrap()]).unwrap();
        assert!(p == root.join("40/ns/net") || p == root.join("41/ns/net"), "{}", p.display());
        assert_eq!(ask(&["fd00::7".parse().unwrap()]), Some(p));
        assert_eq!(ask(&["10.244.1.8".parse().unwrap()]), Some(root.join("50/ns/net")));
        assert_eq!(
            ask(&["192.168.56.11".parse().unwrap()]),
            None,
            "the host's netns is never an answer"
        );
        assert_eq!(ask(&[]), None);
        // Cached: a new pod appears only after the ttl.
        fake_proc(&root, 60, 400, &FIB.replace("10.244.1.7", "10.244.1.9"), "");
        assert_eq!(ask(&["10.244.1.9".parse().unwrap()]), None);
        let fresh = ProcNetns::with_root(&root, Some(100), Duration::ZERO);
        let f = fresh.netns(&PodRef {
            namespace: "shop",
            name: "n",
            uid: "u",
            ips: &["10.244.1.9".parse().unwrap()],
        });
        assert_eq!(f, Some(root.join("60/ns/net")));
        let _ = fs::remove_dir_all(&root);
    }

    #[test]
    fn the_real_proc_excludes_our_own_netns() {
        // Whatever runs on this machine, none of our own addresses resolve.
        let r = ProcNetns::new();
        let own: Vec<IpAddr> =
            fib_trie_local_v4(&fs::read_to_string("/proc/self/net/fib_trie").unwrap_or_default());
        for ip in own {
            let found = r.netns(&PodRef { namespace: "x", name: "y", uid: "u", ips: &[ip] });
            if let Some(p) = found {
                // Another netns may hold the same address (a test topology);
                // it must not be ours.
                let inode = fs::read_link(&p).ok().and_then(|l| l.to_str().and_then(netns_inode));
                let ours = fs::read_link("/proc/self/ns/net")
                    .ok()
                    .and_then(|l| l.to_str().and_then(netns_inode));
                assert_ne!(inode, ours, "{ip} resolved to our own netns");
            }
        }
    }
}
