//! netkit: "nodes" and "pods" as network namespaces joined by veth pairs, for
//! tests, the demo and the benchmark.
//!
//! Layout of a topology with N nodes and M pods per node (all addresses are
//! private and exist only inside the namespaces this kit creates):
//!
//! ```text
//!   pod n0p0 (10.77.1.2, fd77:1::2) ─veth─┐            ┌─veth─ pod n1p0 (10.77.2.2)
//!   pod n0p1 (10.77.1.3)           ─veth─ node n0 ─┐ ┌─ node n1 ─veth─ pod n1p1 (10.77.2.3)
//!                                   192.168.77.1   │ │  192.168.77.2
//!                                                  lan (bridge br0)
//! ```
//!
//! Pods route via their node (default route to 10.77.(n+1).1); nodes forward
//! and route other nodes' pod subnets via the shared LAN bridge. Each pod gets
//! its own cgroup-v2 cgroup. Namespace names carry a per-topology id, so
//! tests run in parallel. Pins go to a bpffs the topology mounts for itself
//! (`/tmp/tmk-<id>-bpf`), never to the host's `/sys/fs/bpf`: every bpffs
//! mount gets the kernel's `maps.debug`/`progs.debug` iterators
//! (`CONFIG_BPF_PRELOAD`), which cannot be unlinked and go only with the
//! mount. `Drop` tears everything down — processes started through the kit,
//! namespaces (their veths go with them), cgroups, pin directories and the
//! bpffs mount — on success, failure and panic alike. `cleanup_leaked`
//! removes what a killed test left behind.

use std::{
    fs,
    io::{self, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::{fd::AsRawFd, unix::process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

pub mod cni;
pub mod forward;

/// Prefix of every namespace, cgroup and pin directory the kit creates.
pub const PREFIX: &str = "tmk-";

/// True when running as root (the kit needs it).
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Call at the top of a test that needs root and eBPF. Returns `false` (after
/// printing why) when the test cannot run here and should return early; under
/// `CI=true` it panics instead, because a skip in CI is a failure.
pub fn require_root(test: &str) -> bool {
    let why = if !is_root() {
        Some("not running as root".to_string())
    } else if cgroup2_root().is_none() {
        Some("no cgroup v2 mount".to_string())
    } else if !bpffs_supported() {
        Some("the kernel has no bpffs (needs CONFIG_BPF_SYSCALL)".to_string())
    } else {
        None
    };
    match why {
        None => true,
        Some(why) => {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "{test}: cannot run ({why}) and CI=true forbids skipping"
            );
            eprintln!("SKIP {test}: {why}; run the tests as root (cargo xtask test)");
            false
        }
    }
}

/// Whether the kernel can mount bpffs.
pub fn bpffs_supported() -> bool {
    fs::read_to_string("/proc/filesystems")
        .is_ok_and(|f| f.lines().any(|l| l.split_whitespace().last() == Some("bpf")))
}

/// The cgroup-v2 mount point, if any.
pub fn cgroup2_root() -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    })
}

/// Runs a command, failing with its output when it fails.
pub fn sh(args: &[&str]) -> io::Result<Output> {
    let out = Command::new(args[0]).args(&args[1..]).output()?;
    if out.status.success() {
        Ok(out)
    } else {
        Err(io::Error::other(format!(
            "`{}` failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        )))
    }
}

fn ip(ns: &str, args: &str) -> io::Result<()> {
    let mut v = vec!["ip", "-n", ns];
    v.extend(args.split_whitespace());
    sh(&v).map(|_| ())
}

/// A pod: a network namespace behind its node, with a cgroup.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Short name, e.g. `n0p1`.
    pub name: String,
    /// Namespace name (under /run/netns).
    pub netns: String,
    /// IPv4 address.
    pub ip4: Ipv4Addr,
    /// IPv6 address.
    pub ip6: Ipv6Addr,
    /// Index of its node.
    pub node: usize,
    /// Its cgroup-v2 directory.
    pub cgroup: PathBuf,
}

/// A node: a network namespace on the LAN, routing for its pods.
#[derive(Debug, Clone)]
pub struct Node {
    /// Short name, e.g. `n0`.
    pub name: String,
    /// Namespace name.
    pub netns: String,
    /// LAN IPv4 address.
    pub ip4: Ipv4Addr,
    /// LAN IPv6 address.
    pub ip6: Ipv6Addr,
    /// Its pods.
    pub pods: Vec<Pod>,
}

impl Pod {
    /// `/run/netns/<netns>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }
}

impl Node {
    /// `/run/netns/<netns>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.netns)
    }
}

/// A process started through the kit; killed (by PID) when dropped.
#[derive(Debug)]
pub struct Proc {
    child: Option<Child>,
    /// What it is, for messages.
    pub label: String,
}

impl Proc {
    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Sends a signal.
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        if let Some(c) = &self.child {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(c.id()).expect("pid fits i32"));
            let _ = nix::sys::signal::kill(pid, sig);
        }
    }

    /// Kills and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits up to `timeout` for it to exit; `None` if it is still running.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(c) = self.child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    self.child = None;
                    return Some(st);
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Takes the child's stdout (if piped).
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.as_mut().and_then(|c| c.stdout.take())
    }

    /// Is it still running?
    pub fn running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

struct Inner {
    id: String,
    nodes: Vec<Node>,
    lan: String,
    cgroup_dir: Option<PathBuf>,
    extra_dirs: Mutex<Vec<PathBuf>>,
    procs: Mutex<Vec<u32>>,
    ca_dir: Mutex<Option<PathBuf>>,
    /// The topology's own bpffs mount, once a pin directory was asked for.
    bpffs: Mutex<Option<PathBuf>>,
}

/// A built topology. Everything is torn down on drop.
#[derive(Clone)]
pub struct Topology {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Topology {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Topology").field("id", &self.inner.id).finish_non_exhaustive()
    }
}

fn unique_id() -> String {
    let r: u32 = rand::random();
    format!("{:x}{:04x}", std::process::id() % 0xfff, r & 0xffff)
}

impl Topology {
    /// Builds `nodes` nodes with `pods_per_node` pods each.
    pub fn build(nodes: usize, pods_per_node: usize) -> io::Result<Self> {
        assert!((1..=200).contains(&nodes) && pods_per_node <= 250, "topology too large");
        let id = unique_id();
        let lan = format!("{PREFIX}{id}-lan");
        let cgroup_dir = cgroup2_root().map(|r| r.join(format!("{PREFIX}{id}")));
        // Build into a value whose Drop cleans up, so a failure half-way leaks nothing.
        let mut t = Inner {
            id: id.clone(),
            nodes: Vec::new(),
            lan: lan.clone(),
            cgroup_dir: cgroup_dir.clone(),
            extra_dirs: Mutex::new(Vec::new()),
            procs: Mutex::new(Vec::new()),
            ca_dir: Mutex::new(None),
            bpffs: Mutex::new(None),
        };
        sh(&["ip", "netns", "add", &lan])?;
        ip(&lan, "link set lo up")?;
        ip(&lan, "link add br0 type bridge")?;
        ip(&lan, "link set br0 up")?;
        if let Some(d) = &cgroup_dir {
            fs::create_dir_all(d)?;
        }
        for n in 0..nodes {
            let node = Self::add_node(&mut t, &id, n, nodes, pods_per_node)?;
            t.nodes.push(node);
        }
        Ok(Self { inner: Arc::new(t) })
    }

    fn add_node(t: &mut Inner, id: &str, n: usize, total: usize, pods: usize) -> io::Result<Node> {
        let nn = u8::try_from(n + 1).expect("<= 200 nodes");
        let ns = format!("{PREFIX}{id}-n{n}");
        let node = Node {
            name: format!("n{n}"),
            netns: ns.clone(),
            ip4: Ipv4Addr::new(192, 168, 77, nn),
            ip6: format!("fd77::{nn:x}").parse().expect("valid v6"),
            pods: Vec::new(),
        };
        // Register first so Drop removes it even if a step below fails.
        t.nodes.push(node.clone());
        sh(&["ip", "netns", "add", &ns])?;
        ip(&ns, "link set lo up")?;
        sh(&[
            "ip",
            "netns",
            "exec",
            &ns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ])?;
        ip(&t.lan, &format!("link add l{n} type veth peer name eth0 netns {ns}"))?;
        ip(&t.lan, &format!("link set l{n} master br0 up"))?;
        ip(&ns, &format!("addr add {}/24 dev eth0", node.ip4))?;
        ip(&ns, &format!("addr add {}/64 dev eth0 nodad", node.ip6))?;
        ip(&ns, "link set eth0 up")?;
        for m in 0..total {
            if m == n {
                continue;
            }
            let mm = u8::try_from(m + 1).expect("<= 200 nodes");
            ip(&ns, &format!("route add 10.77.{mm}.0/24 via 192.168.77.{mm}"))?;
            ip(&ns, &format!("-6 route add fd77:{mm:x}::/64 via fd77::{mm:x}"))?;
        }
        let mut node = node;
        for p in 0..pods {
            let pod = Self::add_pod(t, id, n, p)?;
            node.pods.push(pod);
        }
        t.nodes.pop();
        Ok(node)
    }

    fn add_pod(t: &Inner, id: &str, n: usize, p: usize) -> io::Result<Pod> {
        let nn = u8::try_from(n + 1).expect("<= 200 nodes");
        let pp = u8::try_from(p + 2).expect("<= 250 pods");
        let node_ns = format!("{PREFIX}{id}-n{n}");
        let ns = format!("{PREFIX}{id}-n{n}p{p}");
        let cgroup = t.cgroup_dir.as_ref().map(|d| d.join(format!("n{n}p{p}"))).unwrap_or_default();
        let pod = Pod {
            name: format!("n{n}p{p}"),
            netns: ns.clone(),
            ip4: Ipv4Addr::new(10, 77, nn, pp),
            ip6: format!("fd77:{nn:x}::{pp:x}").parse().expect("valid v6"),
            node: n,
            cgroup: cgroup.clone(),
        };
        sh(&["ip", "netns", "add", &ns])?;
        ip(&ns, "link set lo up")?;
        ip(&node_ns, &format!("link add p{p} type veth peer name eth0 netns {ns}"))?;
        if p == 0 {
            ip(&node_ns, &format!("addr add 10.77.{nn}.1/32 dev lo"))?;
        }
        ip(&node_ns, &format!("link set p{p} up"))?;
        ip(&node_ns, &format!("route add {}/32 dev p{p} src 10.77.{nn}.1", pod.ip4))?;
        ip(&node_ns, &format!("-6 route add {}/128 dev p{p}", pod.ip6))?;
        ip(&ns, &format!("addr add {}/24 dev eth0", pod.ip4))?;
        ip(&ns, &format!("addr add {}/64 dev eth0 nodad", pod.ip6))?;
        ip(&ns, "link set eth0 up")?;
        // The node side is an unnumbered point-to-point link: the pod reaches
        // its gateway on-link and the node answers ARP/ND by proxy.
        ip(&ns, &format!("route add 10.77.{nn}.1/32 dev eth0"))?;
        ip(&ns, &format!("route replace default via 10.77.{nn}.1 dev eth0"))?;
        ip(&ns, &format!("-6 route add fd77:{nn:x}::1/128 dev eth0"))?;
        ip(&ns, &format!("-6 route replace default via fd77:{nn:x}::1 dev eth0"))?;
        sh(&[
            "ip",
            "netns",
            "exec",
            &node_ns,
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.p{p}.proxy_arp=1"),
            &format!("net.ipv6.conf.p{p}.proxy_ndp=1"),
        ])?;
        ip(&node_ns, &format!("-6 neigh add proxy fd77:{nn:x}::1 dev p{p}"))?;
        if !cgroup.as_os_str().is_empty() {
            fs::create_dir_all(&cgroup)?;
        }
        Ok(pod)
    }

    /// The topology's unique id.
    pub fn id(&self) -> &str {
        &self.inner.id
    }

    /// The nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.inner.nodes
    }

    /// The LAN namespace (holds the bridge `br0` joining the nodes).
    pub fn lan_netns(&self) -> &str {
        &self.inner.lan
    }

    /// Node `n`.
    pub fn node(&self, n: usize) -> &Node {
        &self.inner.nodes[n]
    }

    /// Pod `p` of node `n`.
    pub fn pod(&self, n: usize, p: usize) -> &Pod {
        &self.inner.nodes[n].pods[p]
    }

    /// A fresh directory for pins on the topology's own bpffs (mounted on
    /// first use at `/tmp/tmk-<id>-bpf`, unmounted on drop).
    pub fn pin_dir(&self, label: &str) -> PathBuf {
        let mut mount = self.inner.bpffs.lock().expect("lock");
        if mount.is_none() {
            let r = std::env::temp_dir().join(format!("{PREFIX}{}-bpf", self.inner.id));
            fs::create_dir_all(&r).expect("create the bpffs mount point");
            nix::mount::mount(
                Some("bpf"),
                &r,
                Some("bpf"),
                nix::mount::MsFlags::empty(),
                None::<&str>,
            )
            .unwrap_or_else(|e| panic!("mount bpffs at {}: {e}", r.display()));
            *mount = Some(r);
        }
        let root = mount.as_ref().expect("mounted above");
        root.join(label)
    }

    /// The topology's CA directory (created with `tlsmesh ca init` on first use).
    pub fn ca_dir(&self) -> PathBuf {
        let mut slot = self.inner.ca_dir.lock().expect("lock");
        if let Some(d) = slot.as_ref() {
            return d.clone();
        }
        let d = self.scratch_dir().join("ca");
        let out = Command::new(tlsmesh_bin())
            .args(["ca", "init", "--trust-domain", "cluster.local", "--dir"])
            .arg(&d)
            .output()
            .expect("run tlsmesh ca init");
        assert!(out.status.success(), "tlsmesh ca init: {}", String::from_utf8_lossy(&out.stderr));
        *slot = Some(d.clone());
        d
    }

    /// A scratch directory (files, configs) removed on drop.
    pub fn scratch_dir(&self) -> PathBuf {
        let d = std::env::temp_dir().join(format!("{PREFIX}{}", self.inner.id));
        fs::create_dir_all(&d).expect("create scratch dir");
        let mut dirs = self.inner.extra_dirs.lock().expect("lock");
        if !dirs.contains(&d) {
            dirs.push(d.clone());
        }
        d
    }

    /// A command that will run inside `netns` (and `cgroup`, if given).
    pub fn command_in(
        netns: &str,
        cgroup: Option<&Path>,
        program: &str,
        args: &[&str],
    ) -> io::Result<Command> {
        let f = fs::File::open(Path::new("/run/netns").join(netns))?;
        let procs = match cgroup {
            Some(c) if !c.as_os_str().is_empty() => {
                Some(fs::OpenOptions::new().write(true).open(c.join("cgroup.procs"))?)
            }
            _ => None,
        };
        let mut cmd = Command::new(program);
        cmd.args(args);
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe calls (setns, write).
        unsafe {
            cmd.pre_exec(move || {
                if let Some(p) = &procs {
                    let mut p: &fs::File = p;
                    p.write_all(b"0")?;
                }
                if libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Starts a tracked process from a prepared command.
    pub fn spawn(&self, label: &str, mut cmd: Command) -> io::Result<Proc> {
        let child = cmd.spawn().map_err(|e| io::Error::other(format!("spawn {label}: {e}")))?;
        self.inner.procs.lock().expect("lock").push(child.id());
        Ok(Proc { child: Some(child), label: label.to_string() })
    }

    /// Starts a process inside pod `pod` (in its cgroup).
    pub fn spawn_in_pod(&self, pod: &Pod, program: &str, args: &[&str]) -> io::Result<Proc> {
        let mut cmd = Self::command_in(&pod.netns, Some(&pod.cgroup), program, args)?;
        cmd.stdin(Stdio::null());
        self.spawn(&format!("{program} in {}", pod.name), cmd)
    }

    /// Runs a command to completion inside a pod.
    pub fn run_in_pod(&self, pod: &Pod, program: &str, args: &[&str]) -> io::Result<Output> {
        let mut cmd = Self::command_in(&pod.netns, Some(&pod.cgroup), program, args)?;
        cmd.stdin(Stdio::null());
        cmd.output()
    }

    /// Runs `f` on a thread inside the given namespace.
    pub fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let file = fs::File::open(Path::new("/run/netns").join(netns)).expect("open netns");
        std::thread::spawn(move || {
            nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            f()
        })
        .join()
        .expect("netns thread panicked")
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for pid in self.procs.lock().map(|p| p.clone()).unwrap_or_default() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(0));
            if nix::sys::signal::kill(pid, None).is_ok() {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                let _ = nix::sys::wait::waitpid(pid, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
            }
        }
        for node in &self.nodes {
            for pod in &node.pods {
                kill_netns_pids(&pod.netns);
                let _ = sh(&["ip", "netns", "del", &pod.netns]);
            }
            kill_netns_pids(&node.netns);
            let _ = sh(&["ip", "netns", "del", &node.netns]);
        }
        let _ = sh(&["ip", "netns", "del", &self.lan]);
        if let Some(d) = &self.cgroup_dir {
            remove_cgroup_tree(d);
        }
        let keep_logs = std::env::var_os("NETKIT_KEEP_LOGS").is_some();
        for d in self.extra_dirs.lock().map(|d| d.clone()).unwrap_or_default() {
            if keep_logs {
                eprintln!("netkit: kept {}", d.display());
                continue;
            }
            let _ = fs::remove_dir_all(&d);
        }
        // The daemons are dead: unmounting drops their pins (links detach).
        if let Some(root) = self.bpffs.lock().ok().and_then(|mut m| m.take()) {
            unmount_bpffs(&root);
        }
    }
}

/// Unmounts a kit bpffs (lazily, so a straggling reader cannot keep it) and
/// removes its mount point.
fn unmount_bpffs(root: &Path) {
    let _ = nix::mount::umount2(root, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(root);
}

/// Whether `p` is a bpffs mount point.
fn is_bpffs(p: &Path) -> bool {
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
    nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
}

/// Kills the processes that live in a kit namespace (only kit namespaces are
/// touched: their processes were started by tests).
fn kill_netns_pids(ns: &str) {
    if !ns.starts_with(PREFIX) {
        return;
    }
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

fn remove_cgroup_tree(d: &Path) {
    if let Ok(entries) = fs::read_dir(d) {
        for e in entries.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    // A cgroup can be removed once its processes are gone; they were killed above.
    for _ in 0..50 {
        if fs::remove_dir(d).is_ok() || !d.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes everything a killed test run left behind: kit namespaces (and the
/// processes in them), cgroups and bpffs pin directories. Returns what it removed.
pub fn cleanup_leaked() -> Vec<String> {
    let mut removed = Vec::new();
    if let Ok(entries) = fs::read_dir("/run/netns") {
        let mut names: Vec<String> =
            entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
        // Pods before nodes before LANs: longer names first.
        names.sort_by_key(|n| std::cmp::Reverse(n.len()));
        for n in names.into_iter().filter(|n| n.starts_with(PREFIX)) {
            kill_netns_pids(&n);
            if sh(&["ip", "netns", "del", &n]).is_ok() {
                removed.push(format!("netns {n}"));
            }
        }
    }
    if let Some(root) = cgroup2_root() {
        if let Ok(entries) = fs::read_dir(&root) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(PREFIX) {
                    remove_cgroup_tree(&e.path());
                    removed.push(format!("cgroup {}", e.path().display()));
                }
            }
        }
    }
    // /sys/fs/bpf: pin directories of runs from before the kit had its own
    // bpffs.
    for dir in ["/sys/fs/bpf", &std::env::temp_dir().to_string_lossy()] {
        if let Ok(entries) = fs::read_dir(dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(PREFIX) {
                    let path = e.path();
                    if is_bpffs(&path) && dir != "/sys/fs/bpf" {
                        unmount_bpffs(&path);
                        removed.push(format!("bpffs {}", path.display()));
                    } else {
                        let _ = fs::remove_dir_all(&path);
                        removed.push(format!("dir {}", path.display()));
                    }
                }
            }
        }
    }
    removed
}

/// Path of the `tlsmesh` binary built alongside the tests.
pub fn tlsmesh_bin() -> PathBuf {
    if let Some(p) = option_env!("CARGO_BIN_EXE_tlsmesh") {
        return PathBuf::from(p);
    }
    // Integration tests live in target/<profile>/deps; the binary one up.
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    for cand in [dir.join("tlsmesh"), dir.join("../tlsmesh")] {
        if cand.is_file() {
            return cand;
        }
    }
    panic!(
        "tlsmesh binary not found next to {}; build it with `cargo build -p tlsmesh`",
        exe.display()
    );
}

/// Waits until `f` returns `Some`, polling, up to `timeout`.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// IP of the given family.
pub fn pod_ip(pod: &Pod, v6: bool) -> IpAddr {
    if v6 {
        IpAddr::V6(pod.ip6)
    } else {
        IpAddr::V4(pod.ip4)
    }
}

/// A packet capture on the node-to-node LAN (`br0`), for proving what
/// crossed the wire. Stops and is read with `finish`.
#[derive(Debug)]
pub struct LinkCapture {
    proc: Proc,
    file: PathBuf,
}

impl LinkCapture {
    /// Starts tcpdump on the LAN bridge.
    pub fn start(topo: &Topology) -> io::Result<Self> {
        let file = topo.scratch_dir().join(format!("lan-{}.pcap", rand::random::<u32>()));
        let f = file.display().to_string();
        let mut cmd = Topology::command_in(
            topo.lan_netns(),
            None,
            "tcpdump",
            &["-i", "br0", "-U", "-s", "0", "-w", &f, "ip or ip6"],
        )?;
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let proc = topo.spawn("tcpdump", cmd)?;
        // tcpdump writes the pcap header once it is capturing.
        wait_for(Duration::from_secs(5), || {
            fs::metadata(&file).ok().filter(|m| m.len() > 0).map(|_| ())
        })
        .ok_or_else(|| {
            io::Error::other(
                "tcpdump did not start (is it installed? scripts/bootstrap.sh installs it)",
            )
        })?;
        std::thread::sleep(Duration::from_millis(200));
        Ok(Self { proc, file })
    }

    /// Stops the capture and returns the raw pcap bytes.
    pub fn finish(mut self) -> Vec<u8> {
        std::thread::sleep(Duration::from_millis(300));
        self.proc.signal(nix::sys::signal::Signal::SIGINT);
        let _ = self.proc.wait_timeout(Duration::from_secs(5));
        fs::read(&self.file).unwrap_or_default()
    }
}

/// A TCP echo server inside `netns` (a thread per connection; it half-closes
/// after the client did). Lives until the process ends or the netns goes.
pub fn echo_server(netns: &str, addr: std::net::SocketAddr) {
    let l = Topology::in_netns(netns, move || {
        std::net::TcpListener::bind(addr).expect("bind echo server")
    });
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let Ok(mut r) = s.try_clone() else { return };
                let mut w = s;
                let _ = io::copy(&mut r, &mut w);
                let _ = w.shutdown(std::net::Shutdown::Write);
            });
        }
    });
}

/// One connection to the echo server at `dst` from `netns`: sends `len`
/// patterned bytes, half-closes, and checks every byte came back.
pub fn echo_exchange(netns: &str, dst: std::net::SocketAddr, len: usize) -> io::Result<()> {
    use std::io::{Read as _, Write as _};
    Topology::in_netns(netns, move || {
        let mut s = std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let data: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap_or(0)).collect();
        let mut r = s.try_clone()?;
        let reader = std::thread::spawn(move || {
            let mut back = Vec::new();
            r.read_to_end(&mut back).map(|_| back)
        });
        s.write_all(&data)?;
        s.shutdown(std::net::Shutdown::Write)?;
        let back = reader.join().map_err(|_| io::Error::other("reader panicked"))??;
        if back == data {
            Ok(())
        } else {
            Err(io::Error::other(format!("got {} of {} bytes back", back.len(), data.len())))
        }
    })
}

/// A client that makes one short echo exchange every `every` from a pod
/// (bounded: at most 20,000), counting the ones that worked and failed.
pub struct ConnectLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
    failed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ConnectLoop {
    /// Starts the loop: 1 KiB echoed to `dst` from `netns` every `every`.
    pub fn start(netns: &str, dst: std::net::SocketAddr, every: Duration) -> Self {
        use std::sync::{atomic::Ordering, Arc};
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let ok = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let thread = {
            let (stop, ok, failed, netns) =
                (Arc::clone(&stop), Arc::clone(&ok), Arc::clone(&failed), netns.to_string());
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 20_000 {
                    n += 1;
                    match echo_exchange(&netns, dst, 1024) {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("connect loop: connection {n} failed: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                    std::thread::sleep(every);
                }
            })
        };
        Self { stop, ok, failed, thread: Some(thread) }
    }

    /// Exchanges that worked so far.
    pub fn ok(&self) -> u64 {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the loop and returns (worked, failed).
    pub fn stop(mut self) -> (u64, u64) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        (self.ok(), self.failed.load(std::sync::atomic::Ordering::Relaxed))
    }
}

impl Drop for ConnectLoop {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The byte at offset `i` of an [`EchoStream`]: position-dependent, so a
/// lost, repeated or reordered byte shows.
fn pattern(i: u64) -> u8 {
    (i.wrapping_mul(31) ^ (i >> 9) ^ (i >> 17)).to_le_bytes()[0]
}

/// One long-lived connection to an echo server: a writer sends `chunk`
/// bytes every `every` (back to back when zero) up to `total`, a reader
/// checks every byte that comes back against the pattern as it arrives.
pub struct EchoStream {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    echoed: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Longest wait between two reads since the last reset, in µs.
    max_gap_us: std::sync::Arc<std::sync::atomic::AtomicU64>,
    writer: std::thread::JoinHandle<io::Result<u64>>,
    reader: std::thread::JoinHandle<io::Result<u64>>,
}

impl EchoStream {
    /// Connects from `netns` to `dst` and starts writing and checking.
    pub fn start(
        netns: &str,
        dst: std::net::SocketAddr,
        chunk: usize,
        every: Duration,
        total: u64,
    ) -> io::Result<Self> {
        use std::io::{Read as _, Write as _};
        use std::sync::{atomic::Ordering, Arc};
        let s = Topology::in_netns(netns, move || {
            std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(5))
        })?;
        s.set_read_timeout(Some(Duration::from_secs(1)))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let echoed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let max_gap_us = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let mut r = s.try_clone()?;
        let reader = {
            let (echoed, stop) = (Arc::clone(&echoed), Arc::clone(&stop));
            let max_gap_us = Arc::clone(&max_gap_us);
            std::thread::spawn(move || -> io::Result<u64> {
                let mut buf = vec![0u8; 64 * 1024];
                let mut at = 0u64;
                // An idle stream may wait any time for its next echo; once
                // the writer stopped, the rest must come within 30 s.
                let mut waited_after_stop = 0;
                let mut last = std::time::Instant::now();
                loop {
                    let got = r.read(&mut buf);
                    let gap = u64::try_from(last.elapsed().as_micros()).unwrap_or(u64::MAX);
                    if !stop.load(Ordering::Relaxed) {
                        max_gap_us.fetch_max(gap, Ordering::Relaxed);
                    }
                    let n = match got {
                        Ok(n) => n,
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) =>
                        {
                            if stop.load(Ordering::Relaxed) {
                                waited_after_stop += 1;
                                if waited_after_stop > 30 {
                                    return Err(io::Error::other(format!(
                                        "no end of the echo within 30 s of the last write ({at} bytes back)"
                                    )));
                                }
                            }
                            continue;
                        }
                        Err(e) => return Err(e),
                    };
                    if n == 0 {
                        return Ok(at);
                    }
                    for (k, b) in buf[..n].iter().enumerate() {
                        let i = at + k as u64;
                        if *b != pattern(i) {
                            return Err(io::Error::other(format!(
                                "byte {i} came back as {b:#04x}, sent {:#04x}",
                                pattern(i)
                            )));
                        }
                    }
                    at += n as u64;
                    echoed.store(at, Ordering::Relaxed);
                    last = std::time::Instant::now();
                }
            })
        };
        let writer = {
            let stop = Arc::clone(&stop);
            let mut w = s;
            std::thread::spawn(move || -> io::Result<u64> {
                let mut at = 0u64;
                let mut buf = vec![0u8; chunk.max(1)];
                while at < total && !stop.load(Ordering::Relaxed) {
                    let n = buf.len().min(usize::try_from(total - at).unwrap_or(usize::MAX));
                    for (k, b) in buf[..n].iter_mut().enumerate() {
                        *b = pattern(at + k as u64);
                    }
                    w.write_all(&buf[..n])?;
                    at += n as u64;
                    let until = std::time::Instant::now() + every;
                    while !stop.load(Ordering::Relaxed) {
                        let left = until.saturating_duration_since(std::time::Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        std::thread::sleep(left.min(Duration::from_millis(20)));
                    }
                }
                w.shutdown(std::net::Shutdown::Write)?;
                Ok(at)
            })
        };
        Ok(Self { stop, echoed, max_gap_us, writer, reader })
    }

    /// Bytes that came back intact so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The longest wait for the echo between two reads since the stream
    /// started or [`EchoStream::reset_max_gap`] (a read timeout of the
    /// reader is part of a wait, not its end).
    pub fn max_gap(&self) -> Duration {
        Duration::from_micros(self.max_gap_us.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// Starts measuring [`EchoStream::max_gap`] afresh.
    pub fn reset_max_gap(&self) {
        self.max_gap_us.store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// True once the echo ended (EOF, reset or a wrong byte).
    pub fn closed(&self) -> bool {
        self.reader.is_finished()
    }

    /// Waits until at least `n` bytes came back (up to `timeout`).
    pub fn wait_echoed(&self, n: u64, timeout: Duration) -> bool {
        wait_for(timeout, || (self.echoed() >= n).then_some(())).is_some()
    }

    /// Stops writing (or lets a bounded stream finish), half-closes, and
    /// waits for the echo's end: `Ok(bytes)` when every byte sent came
    /// back intact and the connection closed cleanly.
    pub fn finish(self, let_it_finish: bool) -> io::Result<u64> {
        if !let_it_finish {
            self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let sent = self.writer.join().map_err(|_| io::Error::other("writer panicked"))??;
        // Written and half-closed: from now on the reader's wait is bounded.
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let back = self.reader.join().map_err(|_| io::Error::other("reader panicked"))??;
        if back == sent {
            Ok(back)
        } else {
            Err(io::Error::other(format!("sent {sent} bytes, {back} came back")))
        }
    }
}

/// True when `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

/// How a test pod is enrolled in a generated inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Namespace `strict` (mode strict).
    Strict,
    /// Namespace `permissive`.
    Permissive,
    /// Namespace `plain` (not enrolled).
    Plain,
    /// Not in the inventory at all.
    Absent,
}

/// The start of a static inventory for the topology: the trust domain and
/// every node with its addresses (pods and namespaces are the caller's).
pub fn inventory_nodes(topo: &Topology) -> String {
    use std::fmt::Write as _;
    let mut s = String::from("trust_domain = \"cluster.local\"\n");
    for n in topo.nodes() {
        let _ = writeln!(
            s,
            "[[node]]\nname = \"{}\"\naddresses = [\"{}\", \"{}\", \"{}\"]",
            n.name,
            n.ip4,
            n.ip6,
            gateway4(n)
        );
    }
    s
}

/// Writes an inventory for the topology: every pod in the namespace its role
/// names, with service account = pod name. Returns the file's path.
pub fn write_inventory(topo: &Topology, file: &str, role: &dyn Fn(&Pod) -> Role) -> PathBuf {
    use std::fmt::Write as _;
    let mut s = inventory_nodes(topo);
    s += "[[namespace]]\nname = \"strict\"\nmode = \"strict\"\n[[namespace]]\nname = \"permissive\"\nmode = \"permissive\"\n";
    for n in topo.nodes() {
        for p in &n.pods {
            let ns = match role(p) {
                Role::Strict => "strict",
                Role::Permissive => "permissive",
                Role::Plain => "plain",
                Role::Absent => continue,
            };
            let _ = writeln!(
                s,
                "[[pod]]\nname = \"{}\"\nnamespace = \"{ns}\"\nservice_account = \"{}\"\nnode = \"{}\"\nips = [\"{}\", \"{}\"]\nnetns = \"{}\"",
                p.name, p.name, n.name, p.ip4, p.ip6, p.netns_path().display()
            );
        }
    }
    let path = topo.scratch_dir().join(file);
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, s).expect("write inventory");
    fs::rename(&tmp, &path).expect("rename inventory");
    path
}

/// The node's address on its pod links (the source of its probes to pods).
pub fn gateway4(n: &Node) -> Ipv4Addr {
    let o = n.ip4.octets();
    Ipv4Addr::new(10, 77, o[3], 1)
}

/// A `tlsmesh node` daemon started in a node's netns.
#[derive(Debug)]
pub struct Daemon {
    /// The process.
    pub proc: Proc,
    /// Its pin directory.
    pub pin_dir: PathBuf,
    /// The node netns it runs in.
    pub netns: String,
    /// Its inventory file.
    pub inventory: PathBuf,
    /// Node name.
    pub node: String,
    /// Its log file (stderr).
    pub log: PathBuf,
}

impl Daemon {
    /// Starts `tlsmesh node` for node `n` and waits until it is ready.
    pub fn start(topo: &Topology, n: usize, inventory: &Path, extra: &[&str]) -> Self {
        let node = topo.node(n).clone();
        let pin_dir = topo.pin_dir(&format!("n{n}"));
        Self::start_with_pin(topo, &node, &pin_dir, inventory, extra)
    }

    /// Starts a daemon with an explicit pin directory (restarts reuse it).
    pub fn start_with_pin(
        topo: &Topology,
        node: &Node,
        pin_dir: &Path,
        inventory: &Path,
        extra: &[&str],
    ) -> Self {
        Self::start_with_env(topo, node, pin_dir, inventory, extra, &[])
    }

    /// Like [`Daemon::start_with_pin`], with extra environment variables
    /// (e.g. `KUBECONFIG`) set on the daemon's process.
    pub fn start_with_env(
        topo: &Topology,
        node: &Node,
        pin_dir: &Path,
        inventory: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let bin = tlsmesh_bin();
        let mut args = vec![
            "node".to_string(),
            "--node".into(),
            node.name.clone(),
            "--inventory".into(),
            inventory.display().to_string(),
            "--pin-dir".into(),
            pin_dir.display().to_string(),
        ];
        if !extra.iter().any(|a| *a == "--ca-addr" || *a == "--ca-dir" || *a == "--no-ca") {
            args.push("--ca-dir".into());
            args.push(topo.ca_dir().display().to_string());
        }
        if !extra.contains(&"--handover-socket") {
            // One per node: the nodes' daemons share this host.
            args.push("--handover-socket".into());
            args.push(Self::handover_socket(topo, &node.name).display().to_string());
        }
        args.extend(extra.iter().filter(|a| **a != "--no-ca").map(ToString::to_string));
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut cmd = Topology::command_in(&node.netns, None, &bin.to_string_lossy(), &arg_refs)
            .expect("daemon command");
        let log_path =
            topo.scratch_dir().join(format!("daemon-{}-{}.log", node.name, rand::random::<u32>()));
        let log = fs::File::create(&log_path).expect("daemon log");
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.envs(env.iter().copied());
        let proc = topo.spawn(&format!("tlsmesh node {}", node.name), cmd).expect("start daemon");
        let mut d = Self {
            proc,
            pin_dir: pin_dir.to_path_buf(),
            netns: node.netns.clone(),
            inventory: inventory.to_path_buf(),
            node: node.name.clone(),
            log: log_path,
        };
        d.wait_ready();
        d
    }

    /// Starts node `n`'s daemon with `--inventory-source kubernetes`
    /// (trust domain `cluster.local`), the API from `kubeconfig`, its CNI
    /// socket at [`Daemon::cni_socket`].
    pub fn start_kubernetes(topo: &Topology, n: usize, kubeconfig: &Path) -> Self {
        let node = topo.node(n).clone();
        let sock = Self::cni_socket(topo, n).display().to_string();
        let unused = topo.scratch_dir().join("unused-inventory.toml");
        let kubeconfig = kubeconfig.display().to_string();
        Self::start_with_env(
            topo,
            &node,
            &topo.pin_dir(&node.name),
            &unused,
            &[
                "--inventory-source",
                "kubernetes",
                "--trust-domain",
                "cluster.local",
                "--cni-socket",
                &sock,
            ],
            &[("KUBECONFIG", kubeconfig.as_str())],
        )
    }

    /// Where the daemons of node `node` hand connections over.
    pub fn handover_socket(topo: &Topology, node: &str) -> PathBuf {
        topo.scratch_dir().join(format!("handover-{node}.sock"))
    }

    /// Where [`Daemon::start_kubernetes`] puts node `n`'s CNI socket.
    pub fn cni_socket(topo: &Topology, n: usize) -> PathBuf {
        topo.scratch_dir().join(format!("cni-n{n}.sock"))
    }

    /// The keys of the pods it serves, sorted.
    pub fn pod_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.config_dump()["pods"]
            .as_array()
            .map(|a| a.iter().filter_map(|p| p["key"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        keys.sort();
        keys
    }

    /// Waits until this daemon is ready: it logged that it serves its pods,
    /// and the admin API answers ready — this daemon's, or, while an older
    /// daemon still holds the admin port, that one's (the port has one
    /// owner; the new daemon binds it when the old one drains). Panics with
    /// the daemon's log when it dies.
    pub fn wait_ready(&mut self) {
        let pid = self.proc.pid();
        let ok = wait_for(Duration::from_secs(20), || {
            assert!(
                self.proc.running(),
                "daemon for {} exited during start-up:\n{}",
                self.node,
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            if !self.log_text().contains("daemon ready") {
                return None;
            }
            let (code, _) = self.get("/healthz/ready").ok()?;
            let owner = self.get("/config_dump").ok()?.1["pid"].as_u64();
            (code == 200 || owner != Some(u64::from(pid))).then_some(())
        });
        assert!(ok.is_some(), "daemon for {} not ready within 20 s", self.node);
    }

    /// GET on the admin API (from inside the node netns): (status, JSON body).
    pub fn get(&self, path: &str) -> io::Result<(u16, serde_json::Value)> {
        self.request("GET", path)
    }

    /// `POST path` on the admin API: status code and JSON body.
    pub fn post(&self, path: &str) -> io::Result<(u16, serde_json::Value)> {
        self.request("POST", path)
    }

    fn request(&self, method: &'static str, path: &str) -> io::Result<(u16, serde_json::Value)> {
        let path = path.to_string();
        Topology::in_netns(&self.netns, move || -> io::Result<(u16, serde_json::Value)> {
            use std::io::Read as _;
            let mut s = std::net::TcpStream::connect_timeout(
                &"127.0.0.1:15000".parse().expect("addr"),
                Duration::from_secs(2),
            )?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                s,
                "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )?;
            let mut buf = String::new();
            s.read_to_string(&mut buf)?;
            let code = buf.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
            let body = buf.split_once("\r\n\r\n").map_or("", |x| x.1);
            let v = serde_json::from_str(body).map_err(io::Error::other)?;
            Ok((code, v))
        })
    }

    /// Everything the daemon has logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Daemon counters (`/stats`).
    pub fn stats(&self) -> serde_json::Value {
        self.get("/stats").expect("admin /stats").1
    }

    /// One daemon counter.
    pub fn counter(&self, name: &str) -> u64 {
        self.stats()["daemon"][name].as_u64().unwrap_or_else(|| panic!("no daemon counter {name}"))
    }

    /// One kernel counter.
    pub fn kernel_counter(&self, name: &str) -> u64 {
        self.stats()["kernel"][name].as_u64().unwrap_or_else(|| panic!("no kernel counter {name}"))
    }

    /// `/config_dump`.
    pub fn config_dump(&self) -> serde_json::Value {
        self.get("/config_dump").expect("admin /config_dump").1
    }

    /// The upgrade of one node's daemon: starts a new daemon beside this
    /// one (same node, pins and inventory, `extra` arguments), sends this
    /// one SIGTERM, waits until it exited (within 60 s) and the new one
    /// owns the admin API. Returns the new daemon and the old one's log.
    pub fn replace(self, topo: &Topology, extra: &[&str]) -> (Daemon, String) {
        let node = topo
            .nodes()
            .iter()
            .find(|n| n.name == self.node)
            .cloned()
            .expect("the daemon's node is in the topology");
        let new = Daemon::start_with_pin(topo, &node, &self.pin_dir, &self.inventory, extra);
        let mut old = self;
        old.proc.signal(nix::sys::signal::Signal::SIGTERM);
        let exited = old.proc.wait_timeout(Duration::from_secs(60));
        assert!(exited.is_some(), "the old daemon did not exit:\n{}", old.log_text());
        let pid = u64::from(new.proc.pid());
        let took = wait_for(Duration::from_secs(20), || {
            (new.get("/config_dump").ok()?.1["pid"].as_u64() == Some(pid)).then_some(())
        });
        assert!(took.is_some(), "the new daemon owns the admin API");
        (new, old.log_text())
    }
}
