//! The node daemon's one typed configuration: read from a TOML file, then
//! overridden by command-line flags, validated, logged at start-up and served
//! by the admin API.

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Configuration errors.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Cannot read the file.
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// Bad TOML or bad values.
    #[error("config {path} is malformed: {message}")]
    Malformed { path: PathBuf, message: String },
    /// A required setting is missing.
    #[error("{0}")]
    Invalid(String),
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Node-to-node transport.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    Default,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// TLS 1.3 over TCP, HTTP/2 CONNECT (HBONE).
    #[default]
    Tcp,
    /// QUIC (falls back to TCP when UDP is blocked).
    Quic,
}

impl Transport {
    /// The lower-case name (as in the config and `/config_dump`).
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Quic => "quic",
        }
    }
}

/// Where the inventory comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum InventorySource {
    /// The static TOML file (`inventory`), re-read when it changes.
    #[default]
    Static,
    /// The Kubernetes API (watchers; the node daemon adds the CNI plugin).
    Kubernetes,
}

/// Which names and labels the workload-pair metrics use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum MetricsCompat {
    /// `tlsmesh_tcp_*` with tlsmesh's labels.
    #[default]
    Tlsmesh,
    /// `istio_tcp_*` with Istio's labels (Kiali and Istio's dashboards).
    Istio,
}

/// Metrics settings of the node config (`[metrics]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Names and labels of the workload-pair metrics.
    pub compat: MetricsCompat,
    /// Most workload-pair series kept; connections of new pairs beyond it
    /// are counted in `tlsmesh_metrics_series_dropped_total` only.
    pub max_series: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { compat: MetricsCompat::Tlsmesh, max_series: 10_000 }
    }
}

/// Identity settings of the node config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Local CA directory (`ca.pem`, `ca.key`): sign in-process.
    pub ca_dir: Option<PathBuf>,
    /// Address of the `tlsmesh ca` service (`host:port`).
    pub ca_addr: Option<String>,
    /// Name in the CA service's certificate (default: the host part of `ca_addr`).
    pub ca_server_name: Option<String>,
    /// Trust bundle (PEM, one or more roots) for `ca_addr` mode.
    pub ca_bundle: Option<PathBuf>,
    /// File holding this node's join token (`ca_addr` mode).
    pub join_token_file: Option<PathBuf>,
    /// Lifetime of workload certificates in seconds (local CA mode; the CA
    /// service decides its own). Default 24 h, at least 60 s.
    pub cert_lifetime_secs: Option<u64>,
    /// Deny list file (serials and SPIFFE IDs), re-read when it changes.
    pub deny_list: Option<PathBuf>,
}

/// The node daemon's configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// This node's name in the inventory.
    pub node: String,
    /// Where the inventory comes from.
    pub inventory_source: InventorySource,
    /// Static inventory file.
    pub inventory: PathBuf,
    /// SPIFFE trust domain (Kubernetes source; the static file names its own).
    pub trust_domain: String,
    /// Unix socket the CNI plugin talks to (Kubernetes source).
    pub cni_socket: PathBuf,
    /// Unix socket where a ready daemon takes over the connections of the
    /// daemon it replaces (both must use the same path; one per node).
    pub handover_socket: PathBuf,
    /// File where what the CNI plugin reported survives daemon restarts.
    pub cni_state: Option<PathBuf>,
    /// bpffs directory for pinned programs and maps.
    pub pin_dir: PathBuf,
    /// cgroup-v2 root (empty: found from /proc/mounts).
    pub cgroup_root: PathBuf,
    /// An eBPF object file to load instead of the one built in (a hotfix
    /// build of the programs; the replacement test). Unset: the built-in one.
    pub ebpf_object: Option<PathBuf>,
    /// The eBPF programs log each capture decision (captured, bypassed and
    /// why, inbound SYN steered or dropped) into the daemon's log. Off by
    /// default; switched at run time with `POST /logging?ebpf=on|off`.
    pub ebpf_log: bool,
    /// Admin API (localhost).
    pub admin_addr: SocketAddr,
    /// Prometheus metrics (`/metrics`).
    pub metrics_addr: SocketAddr,
    /// Readiness (`/healthz/ready`).
    pub readiness_addr: SocketAddr,
    /// On SIGTERM: how long open connections may take to finish, in seconds.
    pub drain_timeout_secs: u64,
    /// Destination ports never captured (tlsmesh's own are always added).
    pub bypass_ports: Vec<u16>,
    /// Destination CIDRs never captured, e.g. "169.254.0.0/16".
    pub bypass_cidrs: Vec<String>,
    /// Extra sources allowed to send plaintext to strict pods (kubelet
    /// probes). The node's own inventory addresses are always allowed.
    pub probe_sources: Vec<IpAddr>,
    /// Allow the node's addresses to probe strict pods in plaintext.
    pub allow_node_probes: bool,
    /// How often the inventory file is checked for changes, in milliseconds.
    pub inventory_poll_ms: u64,
    /// Node-to-node transport.
    pub transport: Transport,
    /// Log format.
    pub log_format: LogFormat,
    /// Workload identities (where certificates come from).
    pub identity: IdentityConfig,
    /// L4 authorization rules file (see `policy`), re-read when it changes.
    pub policy: Option<PathBuf>,
    /// Metrics (`[metrics]`: `compat`, `max_series`).
    pub metrics: MetricsConfig,
    /// Threads of the async runtime that runs the proxy. Default 1: on the
    /// 2-vCPU benchmark machine one worker beat two on every figure (fewer
    /// cross-thread wake-ups; 1 KiB RR p999 0.36 ms vs 4.1 ms). Raise it on
    /// nodes with many cores and many concurrent bulk streams.
    pub worker_threads: usize,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node: String::new(),
            inventory_source: InventorySource::Static,
            inventory: PathBuf::from("/etc/tlsmesh/inventory.toml"),
            trust_domain: "cluster.local".into(),
            cni_socket: PathBuf::from("/var/run/tlsmesh/cni.sock"),
            handover_socket: PathBuf::from("/var/run/tlsmesh/handover.sock"),
            cni_state: None,
            pin_dir: PathBuf::from("/sys/fs/bpf/tlsmesh"),
            cgroup_root: PathBuf::new(),
            ebpf_object: None,
            ebpf_log: false,
            admin_addr: SocketAddr::from(([127, 0, 0, 1], tlsmesh_common::PORT_ADMIN)),
            metrics_addr: SocketAddr::from(([0, 0, 0, 0], tlsmesh_common::PORT_METRICS)),
            readiness_addr: SocketAddr::from(([0, 0, 0, 0], tlsmesh_common::PORT_READY)),
            drain_timeout_secs: 30,
            bypass_ports: Vec::new(),
            bypass_cidrs: Vec::new(),
            probe_sources: Vec::new(),
            allow_node_probes: true,
            inventory_poll_ms: 500,
            transport: Transport::Tcp,
            log_format: LogFormat::Text,
            identity: IdentityConfig::default(),
            policy: None,
            metrics: MetricsConfig::default(),
            worker_threads: 1,
        }
    }
}

impl NodeConfig {
    /// Reads a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
        toml::from_str(&text).map_err(|e| ConfigError::Malformed {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Checks the values and fills in what can be discovered.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        if self.node.is_empty() {
            return Err(ConfigError::Invalid(
                "no node name: set `node` in the config or pass --node".into(),
            ));
        }
        for c in &self.bypass_cidrs {
            parse_cidr(c).map_err(ConfigError::Invalid)?;
        }
        if !(1..=256).contains(&self.worker_threads) {
            return Err(ConfigError::Invalid(format!(
                "worker_threads = {}: use 1 to 256 (1 suits small nodes; about one per core on large ones)",
                self.worker_threads
            )));
        }
        if self.cgroup_root.as_os_str().is_empty() {
            self.cgroup_root = find_cgroup2().ok_or_else(|| {
                ConfigError::Invalid(
                    "no cgroup v2 mount found; mount one with `mount -t cgroup2 none /sys/fs/cgroup/unified`".into(),
                )
            })?;
        }
        Ok(self)
    }

    /// The bypass CIDRs, parsed.
    pub fn cidrs(&self) -> Vec<(IpAddr, u8)> {
        self.bypass_cidrs.iter().filter_map(|c| parse_cidr(c).ok()).collect()
    }
}

/// Parses `addr/len`.
pub fn parse_cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (a, l) = s.split_once('/').ok_or_else(|| format!("CIDR {s:?} has no /prefix-length"))?;
    let ip: IpAddr = a.parse().map_err(|_| format!("CIDR {s:?}: {a:?} is not an IP address"))?;
    let len: u8 = l.parse().map_err(|_| format!("CIDR {s:?}: bad prefix length"))?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(format!("CIDR {s:?}: prefix length above {max}"));
    }
    Ok((ip, len))
}

/// The first cgroup-v2 mount in /proc/mounts.
pub fn find_cgroup2() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_, path, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_validates() {
        let c: NodeConfig = toml::from_str(
            "node = \"n0\"\nbypass_cidrs = [\"10.96.0.0/12\"]\ntransport = \"quic\"",
        )
        .unwrap();
        assert_eq!(c.transport, Transport::Quic);
        assert_eq!(c.admin_addr.port(), 15000);
        assert_eq!(c.metrics.compat, MetricsCompat::Tlsmesh);
        let c = c.validate().unwrap();
        let m: NodeConfig =
            toml::from_str("node = \"n0\"\n[metrics]\ncompat = \"istio\"\nmax_series = 5").unwrap();
        assert_eq!((m.metrics.compat, m.metrics.max_series), (MetricsCompat::Istio, 5));
        assert_eq!(c.cidrs(), vec![("10.96.0.0".parse().unwrap(), 12)]);
    }

    #[test]
    fn clear_errors() {
        assert!(NodeConfig::default().validate().unwrap_err().to_string().contains("--node"));
        let e = toml::from_str::<NodeConfig>("nod = \"x\"").unwrap_err().to_string();
        assert!(e.contains("nod"), "{e}");
        assert!(parse_cidr("10.0.0.0/40").unwrap_err().contains("above 32"));
        let c: NodeConfig = toml::from_str("node = \"n0\"\nworker_threads = 0").unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("worker_threads = 0"));
        assert!(parse_cidr("10.0.0.0").unwrap_err().contains("prefix"));
    }
}
