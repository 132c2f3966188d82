//! The `tlsmesh` command line: `node` (the daemon), `node --uninstall`,
//! `status` (reads the admin API or a saved dump), `check` (is this node
//! healthy?), `ca`.

use std::{net::SocketAddr, path::PathBuf};

use clap::{Parser, Subcommand};

use crate::config::{LogFormat, NodeConfig, Transport};

/// tlsmesh: transparent node-level mTLS for pods.
#[derive(Debug, Parser)]
#[command(name = "tlsmesh", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the node daemon (or remove its pinned state with --uninstall).
    Node(NodeArgs),
    /// Show what a running daemon is doing (reads its admin API).
    Status(StatusArgs),
    /// Check that this node's tlsmesh is healthy; exits non-zero on a failure.
    Check(CheckArgs),
    /// Change a running daemon's logging: its filter, and whether the eBPF
    /// programs log their capture decisions.
    Logging(LoggingArgs),
    /// The certificate authority: init, join tokens, the CA service.
    #[command(subcommand)]
    Ca(crate::ca_cmd::CaCommand),
}

/// `tlsmesh node`.
#[derive(Debug, Default, clap::Args)]
pub struct NodeArgs {
    /// Config file (TOML); flags override it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// This node's name in the inventory.
    #[arg(long)]
    pub node: Option<String>,
    /// Static inventory file.
    #[arg(long)]
    pub inventory: Option<PathBuf>,
    /// Where the inventory comes from.
    #[arg(long, value_enum)]
    pub inventory_source: Option<crate::config::InventorySource>,
    /// SPIFFE trust domain (Kubernetes source).
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// CNI plugin socket (Kubernetes source).
    #[arg(long)]
    pub cni_socket: Option<PathBuf>,
    /// Unix socket for the connection handover between an old and a new
    /// daemon of this node.
    #[arg(long)]
    pub handover_socket: Option<PathBuf>,
    /// bpffs directory for pinned programs and maps.
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Admin API address.
    #[arg(long)]
    pub admin_addr: Option<SocketAddr>,
    /// Node-to-node transport.
    #[arg(long, value_enum)]
    pub transport: Option<Transport>,
    /// Log format.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Local CA directory (ca.pem + ca.key): sign workload certificates in-process.
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// Address of the `tlsmesh ca` service.
    #[arg(long)]
    pub ca_addr: Option<String>,
    /// Trust bundle (PEM) for --ca-addr.
    #[arg(long)]
    pub ca_bundle: Option<PathBuf>,
    /// Name in the CA service's certificate (default: host of --ca-addr).
    #[arg(long)]
    pub ca_server_name: Option<String>,
    /// File with this node's join token (for --ca-addr).
    #[arg(long)]
    pub join_token_file: Option<PathBuf>,
    /// Workload certificate lifetime in seconds (local CA).
    #[arg(long)]
    pub cert_lifetime: Option<u64>,
    /// Deny list file (revoked serials and SPIFFE ids).
    #[arg(long)]
    pub deny_list: Option<PathBuf>,
    /// L4 authorization policy file.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// On SIGTERM, how long open connections may take to finish (seconds).
    #[arg(long)]
    pub drain_timeout: Option<u64>,
    /// Threads of the proxy's async runtime (default 1).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Load this eBPF object instead of the built-in one.
    #[arg(long)]
    pub ebpf_object: Option<PathBuf>,
    /// Log the eBPF programs' capture decisions from the start (`ebpf_log`).
    #[arg(long)]
    pub ebpf_log: bool,
    /// Names and labels of the workload-pair metrics (`metrics.compat`).
    #[arg(long, value_enum)]
    pub metrics_compat: Option<crate::config::MetricsCompat>,
    /// Remove every pinned program, link and map, then exit.
    #[arg(long)]
    pub uninstall: bool,
}

impl NodeArgs {
    /// The effective config: file (if any) then flags.
    pub fn resolve(&self) -> Result<NodeConfig, crate::config::ConfigError> {
        let c = match &self.config {
            Some(p) => NodeConfig::load(p)?,
            None => NodeConfig::default(),
        };
        Ok(self.apply(c))
    }

    /// `c` with the flags that were given laid over it.
    pub fn apply(&self, mut c: NodeConfig) -> NodeConfig {
        if let Some(v) = &self.node {
            c.node.clone_from(v);
        }
        if let Some(v) = &self.inventory {
            c.inventory.clone_from(v);
        }
        if let Some(v) = self.inventory_source {
            c.inventory_source = v;
        }
        if let Some(v) = &self.trust_domain {
            c.trust_domain.clone_from(v);
        }
        if let Some(v) = &self.cni_socket {
            c.cni_socket.clone_from(v);
        }
        if let Some(v) = &self.handover_socket {
            c.handover_socket.clone_from(v);
        }
        if let Some(v) = &self.pin_dir {
            c.pin_dir.clone_from(v);
        }
        if let Some(v) = self.admin_addr {
            c.admin_addr = v;
        }
        if let Some(v) = self.transport {
            c.transport = v;
        }
        if let Some(v) = self.log_format {
            c.log_format = v;
        }
        if let Some(v) = self.metrics_compat {
            c.metrics.compat = v;
        }
        let id = &mut c.identity;
        for (dst, src) in [
            (&mut id.ca_dir, &self.ca_dir),
            (&mut id.ca_bundle, &self.ca_bundle),
            (&mut id.join_token_file, &self.join_token_file),
            (&mut id.deny_list, &self.deny_list),
        ] {
            if src.is_some() {
                dst.clone_from(src);
            }
        }
        if self.ca_addr.is_some() {
            id.ca_addr.clone_from(&self.ca_addr);
        }
        if self.ca_server_name.is_some() {
            id.ca_server_name.clone_from(&self.ca_server_name);
        }
        if self.cert_lifetime.is_some() {
            id.cert_lifetime_secs = self.cert_lifetime;
        }
        if let Some(v) = self.drain_timeout {
            c.drain_timeout_secs = v;
        }
        if let Some(v) = &self.ebpf_object {
            c.ebpf_object = Some(v.clone());
        }
        if self.ebpf_log {
            c.ebpf_log = true;
        }
        if let Some(v) = self.worker_threads {
            c.worker_threads = v;
        }
        if self.policy.is_some() {
            c.policy.clone_from(&self.policy);
        }
        c
    }
}

/// Output format of `tlsmesh status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StatusFormat {
    /// Aligned columns.
    #[default]
    Table,
    /// The view's data as JSON.
    Json,
    /// The view's data as YAML.
    Yaml,
}

/// What `tlsmesh status` shows (like `istioctl ztunnel-config`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum StatusView {
    /// Everything: pods, connections, tunnels, certificates, denies, counters.
    #[default]
    All,
    /// Enrolled pods on this node: address, mode, identity.
    Workloads,
    /// Workload certificates and trust roots.
    Certificates,
    /// Open connections: workload, direction, local, remote, peer identity.
    Connections,
    /// Deny list and policy files, modes, recent denies, problems.
    Policies,
}

/// `tlsmesh status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Which view.
    #[arg(value_enum, default_value_t)]
    pub view: StatusView,
    /// Admin API of the daemon.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: StatusFormat,
    /// Print JSON instead of tables (same as `-o json`).
    #[arg(long)]
    pub json: bool,
    /// Read a saved `/config_dump` (JSON) instead of asking the daemon.
    #[arg(long, value_name = "DUMP")]
    pub file: Option<PathBuf>,
}

/// `tlsmesh logging`.
#[derive(Debug, clap::Args)]
pub struct LoggingArgs {
    /// The daemon's log filter (`RUST_LOG` syntax, e.g. `debug`).
    #[arg(long, required_unless_present = "ebpf")]
    pub level: Option<String>,
    /// The eBPF programs' decision log: each captured or bypassed connect
    /// and each inbound SYN steered or dropped, with its reason and pod.
    #[arg(long, value_parser = ["on", "off"])]
    pub ebpf: Option<String>,
    /// Admin API of the daemon.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
}

impl StatusArgs {
    /// The output format, `--json` included.
    pub fn format(&self) -> StatusFormat {
        if self.json {
            StatusFormat::Json
        } else {
            self.output
        }
    }
}

/// Output format of `tlsmesh check`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CheckFormat {
    /// Grouped lines with a mark each, and hints.
    #[default]
    Text,
    /// The groups as JSON.
    Json,
}

/// `tlsmesh check`. The config is, first that exists: `--config`, the running
/// daemon's (from its admin API), the defaults; the flags below override it.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Config file (TOML) of the node daemon.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// Admin API of the daemon.
    #[arg(long)]
    pub admin_addr: Option<SocketAddr>,
    /// bpffs directory of the pinned programs and maps.
    #[arg(long)]
    pub pin_dir: Option<PathBuf>,
    /// Where the inventory comes from (`kubernetes` adds the API and CNI checks).
    #[arg(long, value_enum)]
    pub inventory_source: Option<crate::config::InventorySource>,
    /// Local CA directory (ca.pem + ca.key).
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// Address of the `tlsmesh ca` service.
    #[arg(long)]
    pub ca_addr: Option<String>,
    /// Trust bundle (PEM) for --ca-addr.
    #[arg(long)]
    pub ca_bundle: Option<PathBuf>,
    /// Name in the CA service's certificate (default: host of --ca-addr).
    #[arg(long)]
    pub ca_server_name: Option<String>,
    /// Deny list file.
    #[arg(long)]
    pub deny_list: Option<PathBuf>,
    /// L4 authorization policy file.
    #[arg(long)]
    pub policy: Option<PathBuf>,
    /// A workload certificate must stay valid at least this long (`90s`, `30m`, `1h`, `2d`).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub min_cert_validity: std::time::Duration,
    /// A trust root must stay valid at least this long.
    #[arg(long, default_value = "30d", value_parser = parse_duration)]
    pub min_root_validity: std::time::Duration,
    /// Host CNI binary directory (Kubernetes mode).
    #[arg(long, default_value = "/opt/cni/bin")]
    pub cni_bin_dir: PathBuf,
    /// Host CNI configuration directory (Kubernetes mode).
    #[arg(long, default_value = "/etc/cni/net.d")]
    pub cni_conf_dir: PathBuf,
    /// Output format.
    #[arg(long, short, value_enum, default_value_t)]
    pub output: CheckFormat,
}

impl CheckArgs {
    /// The flags that override the config, as `tlsmesh node` takes them.
    pub fn overrides(&self) -> NodeArgs {
        NodeArgs {
            pin_dir: self.pin_dir.clone(),
            admin_addr: self.admin_addr,
            inventory_source: self.inventory_source,
            ca_dir: self.ca_dir.clone(),
            ca_addr: self.ca_addr.clone(),
            ca_bundle: self.ca_bundle.clone(),
            ca_server_name: self.ca_server_name.clone(),
            deny_list: self.deny_list.clone(),
            policy: self.policy.clone(),
            ..NodeArgs::default()
        }
    }
}

/// Parses `90`, `90s`, `30m`, `1h`, `2d` into a duration.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("{s:?}: expected a number and a unit, e.g. 1h"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        other => return Err(format!("{s:?}: unknown unit {other:?}; use s, m, h or d")),
    };
    n.checked_mul(mult)
        .map(std::time::Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90").unwrap().as_secs(), 90);
        assert_eq!(parse_duration("30m").unwrap().as_secs(), 1800);
        assert_eq!(parse_duration("1h").unwrap().as_secs(), 3600);
        assert_eq!(parse_duration("30d").unwrap().as_secs(), 30 * 86_400);
        assert!(parse_duration("1w").unwrap_err().contains("unit"));
        assert!(parse_duration("h").unwrap_err().contains("number"));
    }

    #[test]
    fn status_json_is_an_alias_and_views_parse() {
        let cli = Cli::try_parse_from(["tlsmesh", "status", "connections", "--json"]).unwrap();
        let Command::Status(a) = cli.command else { panic!("status") };
        assert_eq!((a.view, a.format()), (StatusView::Connections, StatusFormat::Json));
        let cli = Cli::try_parse_from(["tlsmesh", "status", "-o", "yaml"]).unwrap();
        let Command::Status(a) = cli.command else { panic!("status") };
        assert_eq!((a.view, a.format()), (StatusView::All, StatusFormat::Yaml));
    }

    #[test]
    fn check_flags_override_the_config() {
        let cli =
            Cli::try_parse_from(["tlsmesh", "check", "--pin-dir", "/x", "-o", "json"]).unwrap();
        let Command::Check(a) = cli.command else { panic!("check") };
        assert_eq!(a.output, CheckFormat::Json);
        assert_eq!(a.min_cert_validity.as_secs(), 3600);
        let c = a.overrides().apply(NodeConfig::default());
        assert_eq!(c.pin_dir, PathBuf::from("/x"));
        assert_eq!(c.admin_addr.port(), 15000, "not given: the config's value stays");
    }
}
