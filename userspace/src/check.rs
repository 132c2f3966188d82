//! `tlsmesh check` (like `linkerd check`): is tlsmesh healthy on this node?
//!
//! Three steps, the decision pure in the middle: [`gather`] collects
//! [`Facts`] at thin IO edges (the admin API's `/config_dump` and
//! `/healthz/ready`, the pin directory on bpffs, `/proc/mounts`, `uname`,
//! certificate, deny-list and policy files, the CA service, the Kubernetes
//! API and the CNI directories); [`checks`] decides, over those facts alone,
//! which checks pass, warn or fail and what to do about each; [`render`]
//! prints the groups (or `-o json`). The command exits non-zero when any
//! check fails; warnings do not fail it.
//!
//! "Programs of this build": the daemon reports the digest of the eBPF
//! object it embeds (`/config_dump`'s `ebpf_object`) and whether each cgroup
//! program was attached by it or re-adopted from an earlier daemon's pins.
//! The programs the kernel runs are not compared instruction by instruction
//! (that needs the loaded programs' tags): a re-adopted program is reported
//! as a warning, since it may come from an older build.
//!
//! Kernel features: cgroup v2 from `/proc/mounts`, bpffs by `statfs` of the
//! pin dir, BTF by `/sys/kernel/btf/vmlinux`, and `sk_lookup` by the kernel
//! release (≥ 5.9, where `BPF_PROG_TYPE_SK_LOOKUP` appeared) — a cheap
//! probe that needs no BPF load.

use crate::status::human;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Serialize;
use time::OffsetDateTime;

use crate::{
    cli::{CheckArgs, CheckFormat},
    config::{InventorySource, NodeConfig},
};

/// Errors of `tlsmesh check` itself (a failing check is not one).
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    /// The async runtime for the network checks could not start.
    #[error("cannot start the runtime for the network checks: {0}")]
    Runtime(std::io::Error),
    /// Output could not be written.
    #[error("cannot print the result: {0}")]
    Output(String),
    /// At least one check failed (the report says which).
    #[error("{0} check(s) failed")]
    Failed(usize),
}

/// The verdict of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Worth a look; does not fail the command.
    Warn,
    /// Broken; the command exits non-zero.
    Fail,
}

/// One check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What is checked.
    pub name: String,
    /// The verdict.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do (warnings and failures).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// A named group of checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Group {
    /// Group name, e.g. `tlsmesh-daemon`.
    pub name: &'static str,
    /// Its checks, in order.
    pub checks: Vec<Check>,
}

/// Limits the decision uses.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// A workload certificate must stay valid at least this long.
    pub min_cert_validity: Duration,
    /// A trust root must stay valid at least this long.
    pub min_root_validity: Duration,
}

impl Default for Thresholds {
    fn default() -> Self {
        Self {
            min_cert_validity: Duration::from_secs(3600),
            min_root_validity: Duration::from_secs(30 * 86_400),
        }
    }
}

/// A file the config names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FileState {
    /// Read and parsed.
    Readable,
    /// Not there.
    Missing,
    /// There, but unreadable or malformed (the reason).
    Broken(String),
}

/// A certificate's name and validity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFact {
    /// Subject (roots) or SPIFFE identity (workloads).
    pub name: String,
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

/// A workload certificate the daemon holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeafFact {
    /// Identity and validity (`None` when the dump's times do not parse).
    pub cert: Option<CertFact>,
    /// SPIFFE identity.
    pub identity: String,
    /// Consecutive failed renewals.
    pub failures: u64,
    /// The last renewal error.
    pub last_error: Option<String>,
}

/// An enrolled pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFact {
    /// `namespace/name`.
    pub key: String,
    /// Its SPIFFE identity.
    pub identity: String,
    /// Its netns cookie (names its `sk_lookup` pin).
    pub netns_cookie: u64,
}

/// What the running daemon reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonFacts {
    /// `Ok` when `/healthz/ready` says ready, else why not.
    pub ready: Result<(), String>,
    /// The daemon's version (`None`: a daemon too old to say).
    pub version: Option<String>,
    /// Digest of the eBPF object the daemon embeds.
    pub ebpf_object: Option<String>,
    /// Program → `attached` / `re-adopted` / `replaced (a → b)`.
    pub programs: BTreeMap<String, String>,
    /// Enrolled pods.
    pub pods: Vec<PodFact>,
    /// Workload certificates.
    pub certificates: Vec<LeafFact>,
    /// What the daemon reports as wrong.
    pub problems: Vec<String>,
}

impl Default for DaemonFacts {
    fn default() -> Self {
        Self {
            ready: Ok(()),
            version: None,
            ebpf_object: None,
            programs: BTreeMap::new(),
            pods: Vec::new(),
            certificates: Vec::new(),
            problems: Vec::new(),
        }
    }
}

/// What this `tlsmesh` binary is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Build {
    /// Crate version.
    pub version: String,
    /// Digest of its embedded eBPF object.
    pub ebpf_object: String,
}

/// The pin directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pins {
    /// Where.
    pub dir: PathBuf,
    /// On a bpffs mount (the dir, or its parent when the dir is missing).
    pub bpffs: bool,
    /// Names of the objects pinned there (empty when the dir is missing).
    pub names: BTreeSet<String>,
    /// Why the directory could not be listed (`None`: listed, or missing).
    pub error: Option<String>,
}

/// Kernel features.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelFacts {
    /// `uname -r`.
    pub release: String,
    /// The cgroup-v2 root in use or found, if any.
    pub cgroup2: Option<PathBuf>,
    /// `/sys/kernel/btf/vmlinux` exists.
    pub btf: bool,
}

/// The CNI plugin's installation (Kubernetes mode).
#[derive(Debug, Clone, PartialEq)]
pub struct CniFacts {
    /// Expected plugin binary.
    pub bin: PathBuf,
    /// The binary exists and is executable (`Err`: what is wrong).
    pub bin_ok: Result<(), String>,
    /// The primary network configuration and its JSON (`Err`: why none).
    pub conf: Result<(PathBuf, serde_json::Value), String>,
    /// The daemon's socket for the plugin.
    pub socket: PathBuf,
    /// The socket exists.
    pub socket_exists: bool,
}

/// Kubernetes mode.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeFacts {
    /// The API server's version, or why it could not be reached.
    pub api: Result<String, String>,
    /// The CNI plugin.
    pub cni: CniFacts,
}

/// Everything the decision looks at.
#[derive(Debug, Clone)]
pub struct Facts {
    /// The time of the check.
    pub now: OffsetDateTime,
    /// The admin API asked.
    pub admin_addr: SocketAddr,
    /// Where the config came from ("file …", "the running daemon", "defaults").
    pub config_from: String,
    /// Why the config could not be read, if it could not.
    pub config_error: Option<String>,
    /// The effective config.
    pub config: NodeConfig,
    /// What the daemon says (`Err`: it does not answer).
    pub daemon: Result<DaemonFacts, String>,
    /// This binary.
    pub build: Build,
    /// The pin directory.
    pub pins: Pins,
    /// Kernel features.
    pub kernel: KernelFacts,
    /// Trust roots read from the configured files (`None`: no CA configured).
    pub roots: Option<Result<Vec<CertFact>, String>>,
    /// The CA service answered (`None`: no `ca_addr`).
    pub ca: Option<Result<(), String>>,
    /// The deny list file, when configured.
    pub deny_list: Option<FileState>,
    /// The policy file, when configured.
    pub policy: Option<FileState>,
    /// Kubernetes mode only.
    pub kube: Option<KubeFacts>,
}

fn ok(name: impl Into<String>, detail: impl Into<String>) -> Check {
    Check { name: name.into(), status: Status::Ok, detail: detail.into(), hint: None }
}

fn warn(name: impl Into<String>, detail: impl Into<String>, hint: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status: Status::Warn,
        detail: detail.into(),
        hint: Some(hint.into()),
    }
}

fn fail(name: impl Into<String>, detail: impl Into<String>, hint: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status: Status::Fail,
        detail: detail.into(),
        hint: Some(hint.into()),
    }
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// The decision: which checks pass, warn or fail, with a hint each. Pure.
pub fn checks(f: &Facts, t: &Thresholds) -> Vec<Group> {
    let mut groups = vec![
        Group { name: "tlsmesh-config", checks: config_checks(f) },
        Group { name: "tlsmesh-daemon", checks: daemon_checks(f) },
        Group { name: "capture", checks: capture_checks(f) },
        Group { name: "identity", checks: identity_checks(f, t) },
        Group { name: "clock", checks: vec![clock_check(f)] },
        Group { name: "kernel", checks: kernel_checks(f) },
        Group { name: "policy", checks: policy_checks(f) },
    ];
    if let Some(k) = &f.kube {
        groups.push(Group { name: "kubernetes", checks: kube_checks(k) });
    }
    groups
}

fn config_checks(f: &Facts) -> Vec<Check> {
    match &f.config_error {
        None => vec![ok("config is readable", format!("from {}", f.config_from))],
        Some(e) => vec![fail(
            "config is readable",
            e.clone(),
            "fix the file named above, or leave out --config to use the running daemon's config",
        )],
    }
}

const DAEMON_HINT: &str = "start the daemon on this node (Kubernetes: `kubectl -n tlsmesh get pods -o wide` and its logs; \
     otherwise `tlsmesh node --config …`), or point --admin-addr at its admin API";

fn daemon_checks(f: &Facts) -> Vec<Check> {
    let d = match &f.daemon {
        Ok(d) => d,
        Err(e) => {
            return vec![fail(
                format!("admin API answers at {}", f.admin_addr),
                e.clone(),
                DAEMON_HINT,
            )]
        }
    };
    let mut v = vec![ok(format!("admin API answers at {}", f.admin_addr), "config_dump read")];
    v.push(match &d.ready {
        Ok(()) => ok("daemon is ready", "/healthz/ready: ready"),
        Err(why) => fail(
            "daemon is ready",
            format!("not ready: {why}"),
            "the reason names what is missing: a pod's netns or certificate (see `tlsmesh status`); \
             `starting` for long means the inventory or the Kubernetes API is not read (daemon log)",
        ),
    });
    v.push(match &d.version {
        Some(ver) if *ver == f.build.version => ok("daemon version", ver.clone()),
        Some(ver) => warn(
            "daemon version",
            format!("daemon {ver}, this tlsmesh {}", f.build.version),
            "run the check with the tlsmesh binary of the daemon's image, or finish the upgrade",
        ),
        None => warn(
            "daemon version",
            "the daemon does not report its version (older than this tlsmesh)",
            "upgrade the daemon",
        ),
    });
    v.push(if d.problems.is_empty() {
        ok("no problems reported", "config_dump.problems is empty")
    } else {
        warn(
            "no problems reported",
            d.problems.join("; "),
            "each problem names its subject; see the daemon log for details",
        )
    });
    v
}

fn capture_checks(f: &Facts) -> Vec<Check> {
    let pins = &f.pins;
    let dir = pins.dir.display();
    let mut out = vec![if pins.bpffs {
        ok("pin dir is on bpffs", dir.to_string())
    } else {
        fail(
            "pin dir is on bpffs",
            format!("{dir} is not on a bpffs mount"),
            "mount one (`mount -t bpf bpf /sys/fs/bpf`) or pass the daemon's --pin-dir",
        )
    }];
    if let Some(e) = &pins.error {
        out.push(fail(
            "cgroup programs attached",
            format!("cannot list {dir}: {e}"),
            "run tlsmesh check as root",
        ));
        return out;
    }
    let missing: Vec<String> = crate::capture::CGROUP_PROGRAMS
        .iter()
        .map(|n| format!("link_{n}"))
        .filter(|n| !pins.names.contains(n))
        .collect();
    out.push(if missing.is_empty() {
        ok(
            "cgroup programs attached",
            format!("{} links pinned in {dir}", crate::capture::CGROUP_PROGRAMS.len()),
        )
    } else {
        fail(
            "cgroup programs attached",
            format!("not pinned in {dir}: {}", missing.join(", ")),
            "outbound capture is off for those hooks; (re)start the daemon, which attaches and pins them \
             (check --pin-dir if the daemon uses another)",
        )
    });
    let Ok(d) = &f.daemon else { return out };
    let unpinned: Vec<&str> = d
        .pods
        .iter()
        .filter(|pod| !pins.names.contains(&format!("sk_lookup_{:x}", pod.netns_cookie)))
        .map(|pod| pod.key.as_str())
        .collect();
    out.push(if unpinned.is_empty() {
        ok("inbound capture attached", format!("{} enrolled pods", d.pods.len()))
    } else {
        fail(
            "inbound capture attached",
            format!("no sk_lookup pin for {}", unpinned.join(", ")),
            "inbound capture is off for those pods; the daemon log says why enrolling them failed",
        )
    });
    out.push(match &d.ebpf_object {
        Some(o) if *o == f.build.ebpf_object => ok("daemon's programs are of this build", format!("eBPF object {o}")),
        Some(o) => warn(
            "daemon's programs are of this build",
            format!("daemon's eBPF object {o}, this tlsmesh's {}", f.build.ebpf_object),
            "another build runs on this node: use the daemon image's tlsmesh to check, or upgrade the daemon",
        ),
        None => warn(
            "daemon's programs are of this build",
            "the daemon does not report its eBPF object",
            "upgrade the daemon",
        ),
    });
    // Re-adopted (same program code) and replaced in place are both fine:
    // the programs running are this daemon's. Anything else says why not.
    let odd: Vec<String> = d
        .programs
        .iter()
        .filter(|(_, how)| {
            !(how.as_str() == "attached"
                || how.as_str() == "re-adopted"
                || how.starts_with("replaced"))
        })
        .map(|(n, how)| format!("{n}: {how}"))
        .collect();
    out.push(if odd.is_empty() {
        ok("programs are the daemon's own", "attached, re-adopted or replaced in place at start-up")
    } else {
        warn(
            "programs are the daemon's own",
            odd.join(", "),
            "the daemon reports programs it did not put in place; restart it (it replaces them in place)",
        )
    });
    out
}

fn identity_checks(f: &Facts, t: &Thresholds) -> Vec<Check> {
    let id = &f.config.identity;
    if id.ca_dir.is_none() && id.ca_addr.is_none() {
        return vec![warn(
            "a CA is configured",
            "neither ca_dir nor ca_addr: the daemon runs without the mTLS tunnel",
            "set identity.ca_addr (+ ca_bundle, join_token_file) or identity.ca_dir",
        )];
    }
    let mut v = Vec::new();
    if let Ok(d) = &f.daemon {
        v.extend(leaf_checks(f.now, d, t));
    } else {
        v.push(warn(
            "workload certificates",
            "skipped: the daemon does not answer",
            "fix the daemon first (tlsmesh-daemon above)",
        ));
    }
    match &f.roots {
        None => {}
        Some(Err(e)) => v.push(fail(
            "trust roots readable",
            e.clone(),
            "the daemon needs the same file: fix ca_bundle / ca_dir",
        )),
        Some(Ok(roots)) => {
            let min = secs(t.min_root_validity);
            let short: Vec<String> = roots
                .iter()
                .filter(|r| (r.not_after - f.now).whole_seconds() < min)
                .map(|r| {
                    format!(
                        "{} expires in {}",
                        r.name,
                        human((r.not_after - f.now).whole_seconds())
                    )
                })
                .collect();
            v.push(if roots.is_empty() {
                fail("trust roots far from expiry", "no certificate in the trust roots file", "fix ca_bundle / ca_dir")
            } else if short.is_empty() {
                let first = roots.iter().map(|r| r.not_after).min().unwrap_or(f.now);
                ok(
                    "trust roots far from expiry",
                    format!("{} root(s); the first expires in {}", roots.len(), human((first - f.now).whole_seconds())),
                )
            } else {
                fail(
                    "trust roots far from expiry",
                    format!("{} (less than {})", short.join("; "), human(min)),
                    "rotate the CA: add the new root to the bundle beside the old one (docs/IDENTITY.md, CA rotation)",
                )
            });
        }
    }
    match &f.ca {
        None => {}
        Some(Ok(())) => v.push(ok(
            "CA reachable and answering",
            format!("{} answered a bundle request", id.ca_addr.as_deref().unwrap_or_default()),
        )),
        Some(Err(e)) => v.push(fail(
            "CA reachable and answering",
            e.clone(),
            "renewals fail until it answers: check the CA Deployment, the address and port 15012 \
             (NetworkPolicy, firewall), and ca_server_name",
        )),
    }
    v
}

fn leaf_checks(now: OffsetDateTime, d: &DaemonFacts, t: &Thresholds) -> Vec<Check> {
    let mut v = Vec::new();
    let held: BTreeSet<&str> = d.certificates.iter().map(|c| c.identity.as_str()).collect();
    let without: Vec<String> = d
        .pods
        .iter()
        .filter(|p| !held.contains(p.identity.as_str()))
        .map(|p| format!("{} ({})", p.identity, p.key))
        .collect();
    v.push(if without.is_empty() {
        ok("every local identity holds a certificate", format!("{} certificate(s)", d.certificates.len()))
    } else {
        fail(
            "every local identity holds a certificate",
            format!("no certificate for {}", without.join(", ")),
            "the CA refused or did not answer: see the daemon log (`certificate` lines) and the CA checks below",
        )
    });
    let min = secs(t.min_cert_validity);
    let short: Vec<String> = d
        .certificates
        .iter()
        .filter_map(|c| {
            let Some(cert) = &c.cert else {
                return Some(format!("{}: validity unreadable", c.identity));
            };
            let left = (cert.not_after - now).whole_seconds();
            (left < min).then(|| format!("{} expires in {}", c.identity, human(left)))
        })
        .collect();
    v.push(if short.is_empty() {
        ok(
            format!("certificates valid for more than {}", human(min)),
            format!("{} certificate(s)", d.certificates.len()),
        )
    } else {
        fail(
            format!("certificates valid for more than {}", human(min)),
            short.join("; "),
            "renewal runs at half-life: if it fails, the CA checks and the daemon log say why; if the CA issues \
             short certificates on purpose, lower --min-cert-validity",
        )
    });
    let failing: Vec<String> = d
        .certificates
        .iter()
        .filter(|c| c.failures > 0)
        .map(|c| {
            format!(
                "{}: {} failed renewal(s), last: {}",
                c.identity,
                c.failures,
                c.last_error.as_deref().unwrap_or("?")
            )
        })
        .collect();
    v.push(if failing.is_empty() {
        ok("renewals succeed", "no failed renewals")
    } else {
        warn(
            "renewals succeed",
            failing.join("; "),
            "the certificate in use stays valid until it expires; fix what the error names",
        )
    });
    v
}

fn clock_check(f: &Facts) -> Check {
    let mut certs: Vec<&CertFact> = Vec::new();
    if let Ok(d) = &f.daemon {
        certs.extend(d.certificates.iter().filter_map(|c| c.cert.as_ref()));
    }
    if let Some(Ok(r)) = &f.roots {
        certs.extend(r.iter());
    }
    let early: Vec<String> = certs
        .iter()
        .filter(|c| c.not_before > f.now)
        .map(|c| format!("{} is valid only from {}", c.name, rfc3339(c.not_before)))
        .collect();
    if !early.is_empty() {
        return fail(
            "clock is sane",
            format!("now is {}, but {}", rfc3339(f.now), early.join("; ")),
            "this node's clock is behind: fix time sync (`timedatectl`, chrony); peers refuse certificates not yet valid",
        );
    }
    if certs.is_empty() {
        return ok("clock is sane", format!("{} (no certificate to compare with)", rfc3339(f.now)));
    }
    ok("clock is sane", format!("{} is after every certificate's notBefore", rfc3339(f.now)))
}

/// `(major, minor)` of a kernel release like `6.18.0-1-amd64`.
pub fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut it = release.split(|c: char| !c.is_ascii_digit());
    let major = it.next()?.parse().ok()?;
    let minor = it.next()?.parse().ok()?;
    Some((major, minor))
}

fn kernel_checks(f: &Facts) -> Vec<Check> {
    let k = &f.kernel;
    let mut v = vec![match &k.cgroup2 {
        Some(p) => ok("cgroup v2 mounted", p.display().to_string()),
        None => fail(
            "cgroup v2 mounted",
            "no cgroup2 mount in /proc/mounts",
            "mount one: `mount -t cgroup2 none /sys/fs/cgroup/unified` (or boot with systemd.unified_cgroup_hierarchy=1)",
        ),
    }];
    v.push(if f.pins.bpffs {
        ok("bpffs mounted", f.pins.dir.display().to_string())
    } else {
        fail(
            "bpffs mounted",
            format!("{} is not on bpffs", f.pins.dir.display()),
            "`mount -t bpf bpf /sys/fs/bpf`; without it a daemon restart opens a plaintext window",
        )
    });
    v.push(match kernel_version(&k.release) {
        Some(ver) if ver >= (5, 9) => {
            ok("sk_lookup supported", format!("kernel {} (≥ 5.9)", k.release))
        }
        Some(_) => fail(
            "sk_lookup supported",
            format!("kernel {} is older than 5.9", k.release),
            "inbound capture needs BPF_PROG_TYPE_SK_LOOKUP: upgrade the kernel to 5.9 or newer",
        ),
        None => warn(
            "sk_lookup supported",
            format!("cannot read the kernel version from {:?}", k.release),
            "sk_lookup needs Linux 5.9 or newer; check `uname -r`",
        ),
    });
    v.push(if k.btf {
        ok("BTF available", "/sys/kernel/btf/vmlinux")
    } else {
        warn(
            "BTF available",
            "/sys/kernel/btf/vmlinux is missing",
            "use a kernel built with CONFIG_DEBUG_INFO_BTF=y if loading the programs fails",
        )
    });
    v
}

fn file_check(
    what: &str,
    path: Option<&Path>,
    state: Option<&FileState>,
    missing_ok: bool,
) -> Check {
    let name = format!("{what} readable");
    match (path, state) {
        (Some(p), Some(FileState::Readable)) => ok(name, p.display().to_string()),
        (Some(p), Some(FileState::Missing)) if missing_ok => warn(
            name,
            format!("{} does not exist (the daemon treats it as empty)", p.display()),
            "create it, or remove it from the config if it is not used",
        ),
        (Some(p), Some(FileState::Missing)) => fail(
            name,
            format!("{} does not exist", p.display()),
            "create it or fix the path in the config; the daemon will not start without it",
        ),
        (Some(p), Some(FileState::Broken(e))) => fail(
            name,
            format!("{}: {e}", p.display()),
            "fix the file; the daemon keeps the last good version until then",
        ),
        _ => ok(name, "not configured"),
    }
}

fn policy_checks(f: &Facts) -> Vec<Check> {
    vec![
        file_check("deny list", f.config.identity.deny_list.as_deref(), f.deny_list.as_ref(), true),
        file_check("policy file", f.config.policy.as_deref(), f.policy.as_ref(), false),
    ]
}

/// Where the tlsmesh plugin sits in a CNI configuration: `None` when absent,
/// `Some(true)` when it is the last plugin.
pub fn chained_last(conf: &serde_json::Value) -> Option<bool> {
    let plugins = conf.get("plugins")?.as_array()?;
    let ours = |p: &serde_json::Value| {
        p.get("type").and_then(serde_json::Value::as_str) == Some(tlsmesh_cni::plugin::PLUGIN_TYPE)
    };
    let pos = plugins.iter().position(ours)?;
    Some(pos + 1 == plugins.len())
}

fn kube_checks(k: &KubeFacts) -> Vec<Check> {
    let mut v = vec![match &k.api {
        Ok(ver) => ok("Kubernetes API reachable", format!("server {ver}")),
        Err(e) => fail(
            "Kubernetes API reachable",
            e.clone(),
            "set KUBECONFIG, or run in a pod with a ServiceAccount (in-cluster); check the API address and RBAC",
        ),
    }];
    let c = &k.cni;
    v.push(match &c.bin_ok {
        Ok(()) => ok("CNI plugin binary installed", c.bin.display().to_string()),
        Err(e) => fail(
            "CNI plugin binary installed",
            format!("{}: {e}", c.bin.display()),
            "the DaemonSet's init container runs `tlsmesh-cni install`; check its logs, or pass --cni-bin-dir",
        ),
    });
    v.push(match &c.conf {
        Err(e) => fail(
            "CNI plugin chained",
            e.clone(),
            "is the cluster's network plugin installed? then run `tlsmesh-cni install`, or pass --cni-conf-dir",
        ),
        Ok((path, conf)) => match chained_last(conf) {
            Some(true) => ok("CNI plugin chained", format!("last plugin in {}", path.display())),
            Some(false) => warn(
                "CNI plugin chained",
                format!("in {}, but not last", path.display()),
                "it must run after the main network plugin: `tlsmesh-cni install` puts it last",
            ),
            None => fail(
                "CNI plugin chained",
                format!("no tlsmesh-cni entry in {}", path.display()),
                "new pods start unenrolled: the main CNI may have rewritten its file; the `--watch` installer puts it back",
            ),
        },
    });
    v.push(if c.socket_exists {
        ok("CNI socket present", c.socket.display().to_string())
    } else {
        fail(
            "CNI socket present",
            format!("{} does not exist", c.socket.display()),
            "the daemon creates it in Kubernetes mode; is it running with the same cni_socket?",
        )
    });
    v
}

/// Number of failed checks.
pub fn failures(groups: &[Group]) -> usize {
    groups.iter().flat_map(|g| &g.checks).filter(|c| c.status == Status::Fail).count()
}

/// The text report: `√`/`‼`/`×` on a terminal, `[ok]`/`[warn]`/`[FAIL]` otherwise.
pub fn render(groups: &[Group], terminal: bool) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    for g in groups {
        let _ = writeln!(o, "{}\n{}", g.name, "-".repeat(g.name.len()));
        for c in &g.checks {
            let mark = match (c.status, terminal) {
                (Status::Ok, true) => "\u{221a}",
                (Status::Warn, true) => "\u{203c}",
                (Status::Fail, true) => "\u{d7}",
                (Status::Ok, false) => "[ok]",
                (Status::Warn, false) => "[warn]",
                (Status::Fail, false) => "[FAIL]",
            };
            let _ = writeln!(o, "{mark} {}: {}", c.name, c.detail);
            if let Some(h) = &c.hint {
                let _ = writeln!(o, "    hint: {h}");
            }
        }
        o.push('\n');
    }
    let n = failures(groups);
    let warned = groups.iter().flat_map(|g| &g.checks).filter(|c| c.status == Status::Warn).count();
    if n == 0 {
        let _ = writeln!(o, "Status check results: all passed ({warned} warning(s))");
    } else {
        let _ = writeln!(o, "Status check results: {n} failed, {warned} warning(s)");
    }
    o
}

fn parse_time(v: &serde_json::Value) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(v.as_str()?, &time::format_description::well_known::Rfc3339).ok()
}

fn text(v: &serde_json::Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

/// The daemon facts in a `/config_dump` (pure; a missing field is empty).
pub fn daemon_facts(dump: &serde_json::Value, ready: Result<(), String>) -> DaemonFacts {
    let list = |k: &str| dump[k].as_array().cloned().unwrap_or_default();
    DaemonFacts {
        ready,
        version: dump["version"].as_str().map(str::to_string),
        ebpf_object: dump["ebpf_object"].as_str().map(str::to_string),
        programs: dump["capture"]["programs"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| (k.clone(), text(v)))
            .collect(),
        pods: list("pods")
            .iter()
            .map(|p| PodFact {
                key: text(&p["key"]),
                identity: text(&p["identity"]),
                netns_cookie: p["netns_cookie"].as_u64().unwrap_or_default(),
            })
            .collect(),
        certificates: list("certificates")
            .iter()
            .map(|c| LeafFact {
                identity: text(&c["identity"]),
                cert: parse_time(&c["not_before"]).zip(parse_time(&c["not_after"])).map(
                    |(not_before, not_after)| CertFact {
                        name: text(&c["identity"]),
                        not_before,
                        not_after,
                    },
                ),
                failures: c["failures"].as_u64().unwrap_or_default(),
                last_error: c["last_error"].as_str().map(str::to_string),
            })
            .collect(),
        problems: list("problems").iter().map(text).collect(),
    }
}

// ---- IO edges ----

fn read_roots(path: &Path) -> Result<Vec<CertFact>, String> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let ders = tlsmesh_identity::keys::certs_from_pem(&pem, &path.display().to_string())
        .map_err(|e| e.to_string())?;
    ders.iter()
        .map(|der| {
            let (_, c) = x509_parser::parse_x509_certificate(der.as_ref())
                .map_err(|e| format!("{}: not a certificate: {e}", path.display()))?;
            Ok(CertFact {
                name: c.subject().to_string(),
                not_before: c.validity().not_before.to_datetime(),
                not_after: c.validity().not_after.to_datetime(),
            })
        })
        .collect()
}

fn file_state(path: &Path, parse: impl FnOnce(&Path) -> Result<(), String>) -> FileState {
    if !path.exists() {
        return FileState::Missing;
    }
    match parse(path) {
        Ok(()) => FileState::Readable,
        Err(e) => FileState::Broken(e),
    }
}

fn pins(dir: &Path) -> Pins {
    let on = |p: &Path| crate::capture::is_bpffs(p);
    let bpffs = if dir.exists() { on(dir) } else { dir.parent().is_some_and(on) };
    let (names, error) = match std::fs::read_dir(dir) {
        Ok(rd) => (
            rd.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            None,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (BTreeSet::new(), None),
        Err(e) => (BTreeSet::new(), Some(e.to_string())),
    };
    Pins { dir: dir.to_path_buf(), bpffs, names, error }
}

fn kernel(cfg: &NodeConfig) -> KernelFacts {
    let cgroup2 = if cfg.cgroup_root.as_os_str().is_empty() {
        crate::config::find_cgroup2()
    } else {
        Some(cfg.cgroup_root.clone()).filter(|p| p.join("cgroup.controllers").exists())
    };
    KernelFacts {
        release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        cgroup2,
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
    }
}

async fn ca_answers(cfg: &NodeConfig, addr: &str) -> Result<(), String> {
    use tlsmesh_identity::{
        client::{CaClient, CaClientConfig},
        trust::TrustBundle,
    };
    let id = &cfg.identity;
    let bundle_path = id.ca_bundle.as_ref().ok_or("ca_addr is set but ca_bundle is not")?;
    let trust = TrustBundle::load(&cfg.trust_domain, bundle_path).map_err(|e| e.to_string())?;
    let server_name = id.ca_server_name.clone().unwrap_or_else(|| {
        addr.rsplit_once(':').map_or(addr, |x| x.0).trim_matches(['[', ']']).to_string()
    });
    let node = if cfg.node.is_empty() { "tlsmesh-check".to_string() } else { cfg.node.clone() };
    let timeout = Duration::from_secs(5);
    let client =
        CaClient::new(CaClientConfig { addr: addr.to_string(), server_name, trust, node, timeout })
            .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, client.fetch_bundle()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("the CA at {addr} did not answer within {timeout:?}")),
    }
}

async fn kube_api() -> Result<String, String> {
    let fut = async {
        let client = kube::Client::try_default()
            .await
            .map_err(|e| format!("no Kubernetes client config (KUBECONFIG or in-cluster): {e}"))?;
        let v = client
            .apiserver_version()
            .await
            .map_err(|e| format!("the API server did not answer: {e}"))?;
        Ok(v.git_version)
    };
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| Err("the API server did not answer within 10 s".into()))
}

fn cni(args: &CheckArgs, cfg: &NodeConfig) -> CniFacts {
    use std::os::unix::fs::PermissionsExt as _;
    let bin = args.cni_bin_dir.join(tlsmesh_cni::plugin::PLUGIN_TYPE);
    let bin_ok = match std::fs::metadata(&bin) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err("not an executable file".into()),
        Err(e) => Err(e.to_string()),
    };
    let conf = match tlsmesh_cni::install::primary_conf(&args.cni_conf_dir) {
        Err(e) => Err(e.to_string()),
        Ok(None) => Err(format!("no CNI network configuration in {}", args.cni_conf_dir.display())),
        Ok(Some(p)) => std::fs::read(&p)
            .map_err(|e| format!("cannot read {}: {e}", p.display()))
            .and_then(|b| {
                serde_json::from_slice(&b).map_err(|e| format!("{} is not JSON: {e}", p.display()))
            })
            .map(|v| (p, v)),
    };
    CniFacts {
        bin,
        bin_ok,
        conf,
        socket: cfg.cni_socket.clone(),
        socket_exists: cfg.cni_socket.exists(),
    }
}

/// Collects the facts (all the IO of `tlsmesh check`).
pub fn gather(args: &CheckArgs) -> Result<Facts, CheckError> {
    let overrides = args.overrides();
    let (mut cfg, mut config_from, mut config_error) =
        (NodeConfig::default(), "defaults".to_string(), None);
    if let Some(p) = &args.config {
        match NodeConfig::load(p) {
            Ok(c) => (cfg, config_from) = (c, format!("file {}", p.display())),
            Err(e) => config_error = Some(e.to_string()),
        }
    }
    let admin_addr = args.admin_addr.unwrap_or(cfg.admin_addr);
    let dump = crate::status::fetch(admin_addr, "/config_dump").map_err(|e| e.to_string());
    if args.config.is_none() {
        if let Ok(d) = &dump {
            match serde_json::from_value::<NodeConfig>(d["config"].clone()) {
                Ok(c) => (cfg, config_from) = (c, "the running daemon".to_string()),
                Err(e) => {
                    config_error =
                        Some(format!("the daemon's config in /config_dump does not parse: {e}"));
                }
            }
        }
    }
    let cfg = overrides.apply(cfg);
    let daemon = dump.map(|d| {
        let ready = match crate::status::fetch(admin_addr, "/healthz/ready") {
            Ok(v) if v.as_str() == Some("ready") => Ok(()),
            Ok(v) => Err(v["not_ready"].as_str().map_or_else(|| v.to_string(), str::to_string)),
            Err(e) => Err(e.to_string()),
        };
        daemon_facts(&d, ready)
    });
    let id = &cfg.identity;
    let roots = if id.ca_addr.is_some() {
        Some(id.ca_bundle.as_deref().map_or_else(
            || Err("ca_addr is set but ca_bundle (the CA's root PEM) is not".to_string()),
            read_roots,
        ))
    } else {
        id.ca_dir.as_ref().map(|d| read_roots(&tlsmesh_identity::ca::CaPaths::in_dir(d).cert))
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(CheckError::Runtime)?;
    let ca = id.ca_addr.as_deref().map(|a| rt.block_on(ca_answers(&cfg, a)));
    let kube = (cfg.inventory_source == InventorySource::Kubernetes)
        .then(|| KubeFacts { api: rt.block_on(kube_api()), cni: cni(args, &cfg) });
    let deny_list = id.deny_list.as_deref().map(|p| {
        file_state(p, |p| {
            tlsmesh_identity::trust::DenyList::load(p).map(drop).map_err(|e| e.to_string())
        })
    });
    let policy = cfg.policy.as_deref().map(|p| {
        file_state(p, |p| crate::policy::Policy::load(p).map(drop).map_err(|e| e.to_string()))
    });
    Ok(Facts {
        now: OffsetDateTime::now_utc(),
        admin_addr,
        config_from,
        config_error,
        daemon,
        build: Build {
            version: env!("CARGO_PKG_VERSION").to_string(),
            ebpf_object: crate::capture::object_digest(),
        },
        pins: pins(&cfg.pin_dir),
        kernel: kernel(&cfg),
        roots,
        ca,
        deny_list,
        policy,
        kube,
        config: cfg,
    })
}

/// Runs `tlsmesh check`.
pub fn run(args: &CheckArgs, thresholds: &Thresholds) -> Result<(), CheckError> {
    let facts = gather(args)?;
    let groups = checks(&facts, thresholds);
    match args.output {
        CheckFormat::Json => {
            let out = serde_json::json!({ "passed": failures(&groups) == 0, "groups": groups });
            println!(
                "{}",
                serde_json::to_string_pretty(&out)
                    .map_err(|e| CheckError::Output(e.to_string()))?
            );
        }
        CheckFormat::Text => {
            print!("{}", render(&groups, std::io::IsTerminal::is_terminal(&std::io::stdout())));
        }
    }
    match failures(&groups) {
        0 => Ok(()),
        n => Err(CheckError::Failed(n)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> OffsetDateTime {
        OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
    }

    const NOW: &str = "2030-06-01T12:00:00Z";

    fn cert(name: &str, nb: &str, na: &str) -> CertFact {
        CertFact { name: name.into(), not_before: at(nb), not_after: at(na) }
    }

    fn leaf(id: &str, na: &str) -> LeafFact {
        LeafFact {
            identity: id.into(),
            cert: Some(cert(id, "2030-06-01T00:00:00Z", na)),
            failures: 0,
            last_error: None,
        }
    }

    const ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

    /// A healthy node.
    fn healthy() -> Facts {
        let mut names: BTreeSet<String> =
            crate::capture::CGROUP_PROGRAMS.iter().map(|n| format!("link_{n}")).collect();
        names.insert("sk_lookup_2a".into());
        names.insert("TLSMESH_ENROLLED".into());
        let mut config = NodeConfig::default();
        config.identity.ca_dir = Some("/etc/tlsmesh/ca".into());
        Facts {
            now: at(NOW),
            admin_addr: "127.0.0.1:15000".parse().unwrap(),
            config_from: "the running daemon".into(),
            config_error: None,
            config,
            daemon: Ok(DaemonFacts {
                ready: Ok(()),
                version: Some("0.1.0".into()),
                ebpf_object: Some("abcd".into()),
                programs: crate::capture::CGROUP_PROGRAMS
                    .iter()
                    .map(|n| ((*n).to_string(), "attached".to_string()))
                    .collect(),
                pods: vec![PodFact {
                    key: "shop/web".into(),
                    identity: ID.into(),
                    netns_cookie: 42,
                }],
                certificates: vec![leaf(ID, "2030-06-02T00:00:00Z")],
                problems: vec![],
            }),
            build: Build { version: "0.1.0".into(), ebpf_object: "abcd".into() },
            pins: Pins { dir: "/sys/fs/bpf/tlsmesh".into(), bpffs: true, names, error: None },
            kernel: KernelFacts {
                release: "6.18.0-1-amd64".into(),
                cgroup2: Some("/sys/fs/cgroup".into()),
                btf: true,
            },
            roots: Some(Ok(vec![cert("CN=root", "2030-01-01T00:00:00Z", "2040-01-01T00:00:00Z")])),
            ca: None,
            deny_list: None,
            policy: None,
            kube: None,
        }
    }

    /// The one failed check (panics unless exactly one failed).
    fn failed(f: &Facts) -> Check {
        let groups = checks(f, &Thresholds::default());
        let bad: Vec<Check> = groups
            .into_iter()
            .flat_map(|g| g.checks)
            .filter(|c| c.status == Status::Fail)
            .collect();
        assert_eq!(bad.len(), 1, "{bad:#?}");
        bad.into_iter().next().unwrap()
    }

    fn find(f: &Facts, name: &str) -> Check {
        checks(f, &Thresholds::default())
            .into_iter()
            .flat_map(|g| g.checks)
            .find(|c| c.name.contains(name))
            .unwrap_or_else(|| panic!("no check {name}"))
    }

    #[test]
    fn a_healthy_node_passes_everything() {
        let groups = checks(&healthy(), &Thresholds::default());
        let not_ok: Vec<&Check> =
            groups.iter().flat_map(|g| &g.checks).filter(|c| c.status != Status::Ok).collect();
        assert!(not_ok.is_empty(), "{not_ok:#?}");
        let names: Vec<&str> = groups.iter().map(|g| g.name).collect();
        assert_eq!(
            names,
            [
                "tlsmesh-config",
                "tlsmesh-daemon",
                "capture",
                "identity",
                "clock",
                "kernel",
                "policy"
            ]
        );
        assert!(render(&groups, false).contains("all passed"));
    }

    #[test]
    fn daemon_down_fails_once_with_the_hint() {
        let mut f = healthy();
        f.daemon = Err("cannot reach the tlsmesh admin API at 127.0.0.1:15000: refused".into());
        let c = failed(&f);
        assert!(c.name.contains("admin API answers"), "{c:?}");
        assert!(c.hint.unwrap().contains("start the daemon"));
        // The certificate checks say they were skipped rather than failing twice.
        assert_eq!(find(&f, "workload certificates").status, Status::Warn);
    }

    #[test]
    fn not_ready_fails_with_the_reason() {
        let mut f = healthy();
        f.daemon.as_mut().unwrap().ready = Err("pod strict/late: no netns".into());
        let c = failed(&f);
        assert_eq!(c.name, "daemon is ready");
        assert!(c.detail.contains("strict/late"));
    }

    #[test]
    fn a_certificate_about_to_expire_fails_naming_the_identity() {
        let mut f = healthy();
        f.daemon.as_mut().unwrap().certificates = vec![leaf(ID, "2030-06-01T12:01:00Z")];
        let c = failed(&f);
        assert!(c.name.contains("more than 1h0m"), "{c:?}");
        assert!(c.detail.contains(ID) && c.detail.contains("expires in 1m0s"), "{}", c.detail);
        // The threshold is a flag.
        let short =
            Thresholds { min_cert_validity: Duration::from_secs(30), ..Thresholds::default() };
        assert_eq!(failures(&checks(&f, &short)), 0);
    }

    #[test]
    fn an_identity_without_a_certificate_fails() {
        let mut f = healthy();
        f.daemon.as_mut().unwrap().certificates.clear();
        let c = failed(&f);
        assert!(c.detail.contains(ID) && c.detail.contains("shop/web"), "{c:?}");
    }

    #[test]
    fn failing_renewals_warn() {
        let mut f = healthy();
        let d = f.daemon.as_mut().unwrap();
        d.certificates[0].failures = 3;
        d.certificates[0].last_error = Some("CA timed out".into());
        let c = find(&f, "renewals succeed");
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains("CA timed out"));
    }

    #[test]
    fn a_root_near_expiry_fails() {
        let mut f = healthy();
        f.roots =
            Some(Ok(vec![cert("CN=old root", "2020-01-01T00:00:00Z", "2030-06-10T00:00:00Z")]));
        let c = failed(&f);
        assert!(c.detail.contains("CN=old root") && c.detail.contains("8d12h"), "{}", c.detail);
        assert!(c.hint.unwrap().contains("rotate"));
        f.roots = Some(Err("cannot read /etc/tlsmesh/ca/ca.pem: No such file".into()));
        assert_eq!(failed(&f).name, "trust roots readable");
    }

    #[test]
    fn ca_unreachable_fails() {
        let mut f = healthy();
        f.config.identity.ca_addr = Some("ca.tlsmesh:15012".into());
        f.ca = Some(Err("cannot connect to the CA at ca.tlsmesh:15012: refused".into()));
        let c = failed(&f);
        assert_eq!(c.name, "CA reachable and answering");
        assert!(c.hint.unwrap().contains("15012"));
        f.ca = Some(Ok(()));
        assert_eq!(failures(&checks(&f, &Thresholds::default())), 0);
    }

    #[test]
    fn clock_behind_the_certificates_fails() {
        let mut f = healthy();
        f.now = at("2030-05-31T00:00:00Z");
        let c = failed(&f);
        assert_eq!(c.name, "clock is sane");
        assert!(c.detail.contains(ID), "{}", c.detail);
    }

    #[test]
    fn detached_programs_fail() {
        let mut f = healthy();
        f.pins.names.retain(|n| n != &format!("link_{}", crate::capture::CGROUP_PROGRAMS[0]));
        let c = failed(&f);
        assert_eq!(c.name, "cgroup programs attached");
        assert!(c.detail.contains(crate::capture::CGROUP_PROGRAMS[0]), "{}", c.detail);
        let mut f = healthy();
        f.pins.names.remove("sk_lookup_2a");
        let c = failed(&f);
        assert!(c.detail.contains("shop/web"), "{c:?}");
        let mut f = healthy();
        f.pins.names.clear();
        f.pins.bpffs = false;
        let n = failures(&checks(&f, &Thresholds::default()));
        assert!(n >= 3, "bpffs, links, sk_lookup: {n}");
    }

    #[test]
    fn another_build_or_foreign_programs_warn() {
        let mut f = healthy();
        f.daemon.as_mut().unwrap().ebpf_object = Some("ffff".into());
        assert_eq!(find(&f, "of this build").status, Status::Warn);
        let mut f = healthy();
        let first = crate::capture::CGROUP_PROGRAMS[0];
        f.daemon.as_mut().unwrap().programs.insert(first.into(), "detached".into());
        let c = find(&f, "the daemon's own");
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.contains(first));
        assert_eq!(failures(&checks(&f, &Thresholds::default())), 0, "warnings do not fail");
    }

    #[test]
    fn kernel_features() {
        let mut f = healthy();
        f.kernel.release = "5.4.0-150-generic".into();
        assert!(failed(&f).detail.contains("older than 5.9"));
        let mut f = healthy();
        f.kernel.cgroup2 = None;
        assert!(failed(&f).hint.unwrap().contains("mount -t cgroup2"));
        assert_eq!(kernel_version("6.18.0-1-amd64"), Some((6, 18)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn deny_list_and_policy_files() {
        let mut f = healthy();
        f.config.identity.deny_list = Some("/etc/tlsmesh/deny.toml".into());
        f.deny_list = Some(FileState::Missing);
        assert_eq!(
            find(&f, "deny list").status,
            Status::Warn,
            "the daemon treats a missing list as empty"
        );
        f.deny_list = Some(FileState::Broken("line 2: bad serial".into()));
        assert!(failed(&f).detail.contains("bad serial"));
        let mut f = healthy();
        f.config.policy = Some("/etc/tlsmesh/policy.toml".into());
        f.policy = Some(FileState::Missing);
        assert_eq!(failed(&f).name, "policy file readable");
        f.policy = Some(FileState::Readable);
        assert_eq!(failures(&checks(&f, &Thresholds::default())), 0);
    }

    #[test]
    fn no_ca_configured_warns() {
        let mut f = healthy();
        f.config.identity.ca_dir = None;
        f.roots = None;
        assert_eq!(find(&f, "a CA is configured").status, Status::Warn);
    }

    #[test]
    fn kubernetes_mode() {
        let mut f = healthy();
        let conf = serde_json::json!({"plugins": [{"type": "calico"}, {"type": "tlsmesh-cni"}]});
        let good = KubeFacts {
            api: Ok("v1.30.0".into()),
            cni: CniFacts {
                bin: "/opt/cni/bin/tlsmesh-cni".into(),
                bin_ok: Ok(()),
                conf: Ok(("/etc/cni/net.d/10-calico.conflist".into(), conf)),
                socket: "/var/run/tlsmesh/cni.sock".into(),
                socket_exists: true,
            },
        };
        f.kube = Some(good.clone());
        assert_eq!(failures(&checks(&f, &Thresholds::default())), 0);
        let mut k = good.clone();
        k.api = Err("no Kubernetes client config".into());
        f.kube = Some(k);
        assert!(failed(&f).hint.unwrap().contains("KUBECONFIG"));
        let mut k = good.clone();
        k.cni.conf = Ok((
            "/etc/cni/net.d/10-calico.conflist".into(),
            serde_json::json!({"plugins": [{"type": "calico"}]}),
        ));
        f.kube = Some(k);
        assert!(failed(&f).detail.contains("no tlsmesh-cni entry"));
        let mut k = good;
        k.cni.bin_ok = Err("No such file or directory".into());
        f.kube = Some(k);
        assert_eq!(failed(&f).name, "CNI plugin binary installed");
        assert_eq!(
            chained_last(&serde_json::json!({"plugins": [{"type": "tlsmesh-cni"}, {"type": "x"}]})),
            Some(false)
        );
    }

    #[test]
    fn facts_from_a_dump() {
        let dump = serde_json::json!({
            "version": "0.1.0",
            "ebpf_object": "abcd",
            "pods": [{"key": "shop/web", "identity": ID, "netns_cookie": 42}],
            "certificates": [{"identity": ID, "serial": "1", "not_before": "2030-06-01T00:00:00Z",
                              "not_after": "2030-06-02T00:00:00Z", "failures": 0, "last_error": null}],
            "capture": {"programs": {"tlsmesh_connect4": "attached"}},
            "problems": ["x: y"],
        });
        let d = daemon_facts(&dump, Ok(()));
        assert_eq!(d.pods[0].netns_cookie, 42);
        assert_eq!(d.certificates[0], leaf(ID, "2030-06-02T00:00:00Z"));
        assert_eq!(d.programs["tlsmesh_connect4"], "attached");
        assert_eq!(d.problems, ["x: y"]);
        assert_eq!(daemon_facts(&serde_json::json!({}), Ok(())), DaemonFacts::default());
    }

    #[test]
    fn marks_on_a_terminal_and_off() {
        let mut f = healthy();
        f.daemon = Err("down".into());
        let g = checks(&f, &Thresholds::default());
        let plain = render(&g, false);
        assert!(
            plain.contains("[FAIL] admin API answers")
                && plain.contains("    hint: start the daemon"),
            "{plain}"
        );
        assert!(plain.contains("1 failed"));
        assert!(render(&g, true).contains("\u{d7} admin API answers"));
    }
}
