//! The `tlsmesh` command line: `node` (the daemon), `node --uninstall`,
//! `status` (reads the admin API).

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
#[expect(clippy::large_enum_variant, reason = "parsed once at start-up")]
pub enum Command {
    /// Run the node daemon (or remove its pinned state with --uninstall).
    Node(NodeArgs),
    /// Show what a running daemon is doing (reads its admin API).
    Status(StatusArgs),
    /// The certificate authority: init, join tokens, the CA service.
    #[command(subcommand)]
    Ca(crate::ca_cmd::CaCommand),
}

/// `tlsmesh node`.
#[derive(Debug, clap::Args)]
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
    /// Remove every pinned program, link and map, then exit.
    #[arg(long)]
    pub uninstall: bool,
}

impl NodeArgs {
    /// The effective config: file (if any) then flags.
    pub fn resolve(&self) -> Result<NodeConfig, crate::config::ConfigError> {
        let mut c = match &self.config {
            Some(p) => NodeConfig::load(p)?,
            None => NodeConfig::default(),
        };
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
        if let Some(v) = self.worker_threads {
            c.worker_threads = v;
        }
        if self.policy.is_some() {
            c.policy.clone_from(&self.policy);
        }
        Ok(c)
    }
}

/// `tlsmesh status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Admin API of the daemon.
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub json: bool,
}
