//! `tlsmesh ca`: create a CA, issue join tokens, print the trust bundle in
//! the SPIFFE bundle format (JWKS), and run the CA service.
//!
//! `init` writes `ca.pem` and `ca.key` (0600). `token` adds a node's join
//! token to the tokens file (0600) and prints it. `serve` signs workload
//! certificates for nodes that joined, only for identities placed on the
//! asking node; the CA files (external intermediate from cert-manager
//! included) and the deny list are re-read when they change.
//!
//! Where `serve` learns placement and node identity:
//!
//! | flag | `static` / `tokens` (default) | `kubernetes` |
//! |---|---|---|
//! | `--inventory-source` | the `--inventory` file, re-read when it changes | the CA's own watcher (`tlsmesh_k8s::run` with `node: None`), updated on every change |
//! | `--node-auth` | the `--tokens` file | `TokenReview` of the daemon's projected token (`--node-service-account`, `--node-token-audience`); the node is the one its pod runs on |

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Subcommand;
use tlsmesh_identity::{
    authz::{generate_token, JoinAuthenticator, JoinTokens, SharedPlacement},
    ca::{CaFiles, CaPaths, Overwrite},
    server::{CaServer, CaServerConfig},
    trust::DenyList,
};
use tlsmesh_k8s::tokenreview::{follow_placement, TokenReviewAuthenticator, DEFAULT_AUDIENCE};
use tracing::{info, warn};

use crate::{
    config::{InventorySource, LogFormat},
    inventory::Inventory,
};

/// `tlsmesh ca …`
#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a self-signed root in DIR (ca.pem, ca.key with mode 0600).
    Init {
        /// Directory for ca.pem and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Validity of the root in days.
        #[arg(long, default_value_t = 3650)]
        validity_days: u64,
        /// Replace an existing CA.
        #[arg(long)]
        force: bool,
    },
    /// Create a join token for NODE, add it to the tokens file, print it.
    Token {
        /// Tokens file (JSON, mode 0600).
        #[arg(long)]
        tokens: PathBuf,
        /// Node name.
        #[arg(long)]
        node: String,
    },
    /// Print the trust bundle as a SPIFFE bundle (JWK Set), for SPIRE
    /// federation or any reader of the SPIFFE bundle format.
    Bundle {
        /// CA directory: its ca.pem (the root) is the bundle.
        #[arg(long, conflicts_with = "file", required_unless_present = "file")]
        dir: Option<PathBuf>,
        /// A PEM file with the root(s), e.g. the chart's trust bundle.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Run the CA service.
    Serve(Box<ServeArgs>),
}

impl CaCommand {
    /// The log format asked for (`serve --log-format`; text otherwise).
    pub fn log_format(&self) -> LogFormat {
        match self {
            CaCommand::Serve(args) => args.log_format,
            _ => LogFormat::Text,
        }
    }
}

/// How `tlsmesh ca serve` authenticates a node's `join`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum NodeAuth {
    /// Join tokens from the `--tokens` file.
    #[default]
    Tokens,
    /// The daemon's projected `ServiceAccount` token, checked with `TokenReview`.
    Kubernetes,
}

/// `tlsmesh ca serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// Directory with ca.pem and ca.key (or use --cert/--key).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// CA (intermediate) certificate PEM, e.g. a cert-manager Secret's tls.crt.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// CA key PEM (mode 0600 or stricter).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Chain up to the root (e.g. ca.crt) when --cert is an intermediate.
    #[arg(long)]
    pub bundle: Option<PathBuf>,
    /// Listen address.
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: std::net::SocketAddr,
    /// Names/addresses for the CA's own certificate (what nodes dial).
    #[arg(long = "server-name", default_value = "localhost")]
    pub server_names: Vec<String>,
    /// Where placement (which pods run on which node) comes from.
    #[arg(long, value_enum, default_value_t = InventorySource::Static)]
    pub inventory_source: InventorySource,
    /// Inventory file (who runs where); required with --inventory-source static.
    #[arg(long)]
    pub inventory: Option<PathBuf>,
    /// SPIFFE trust domain [default: cluster.local; static: the inventory file's].
    #[arg(long)]
    pub trust_domain: Option<String>,
    /// How a node's join is authenticated.
    #[arg(long, value_enum, default_value_t = NodeAuth::Tokens)]
    pub node_auth: NodeAuth,
    /// Join tokens file; required with --node-auth tokens.
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// With --node-auth kubernetes: the node daemons' `ServiceAccount`
    /// (system:serviceaccount:<namespace>:<name>); repeat for several.
    #[arg(
        long = "node-service-account",
        default_value = "system:serviceaccount:tlsmesh-system:tlsmesh-node"
    )]
    pub node_service_accounts: Vec<String>,
    /// With --node-auth kubernetes: the audience of the daemons' projected token.
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    pub node_token_audience: String,
    /// Workload certificate lifetime in seconds (default 24 h, at least 60).
    #[arg(long, default_value_t = 86_400)]
    pub workload_lifetime: u64,
    /// Node certificate lifetime in seconds (default 24 h, at least 60).
    #[arg(long, default_value_t = 86_400)]
    pub node_lifetime: u64,
    /// Deny list (serials, SPIFFE ids), re-read when it changes.
    #[arg(long)]
    pub deny_list: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

#[derive(serde::Serialize, serde::Deserialize, Default)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct TokenEntry {
    node: String,
    token: String,
    #[serde(default)]
    one_time: bool,
}

/// Runs a `ca` subcommand.
pub fn run(cmd: CaCommand) -> Result<(), Box<dyn std::error::Error>> {
    match cmd {
        CaCommand::Init { dir, trust_domain, validity_days, force } => {
            let ov = if force { Overwrite::Replace } else { Overwrite::Refuse };
            CaFiles::init(&dir, &trust_domain, Duration::from_secs(validity_days * 86_400), ov)?;
            println!("created CA for {trust_domain} in {}", dir.display());
            Ok(())
        }
        CaCommand::Token { tokens, node } => {
            let mut file: TokenFile = match std::fs::read_to_string(&tokens) {
                Ok(t) => {
                    serde_json::from_str(&t).map_err(|e| format!("{}: {e}", tokens.display()))?
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => TokenFile::default(),
                Err(e) => return Err(format!("{}: {e}", tokens.display()).into()),
            };
            let token = generate_token();
            file.tokens.retain(|t| t.node != node);
            file.tokens.push(TokenEntry { node, token: token.clone(), one_time: false });
            write_private(&tokens, serde_json::to_string_pretty(&file)?.as_bytes())?;
            println!("{token}");
            Ok(())
        }
        CaCommand::Bundle { dir, file } => {
            let path = file.or_else(|| dir.map(|d| d.join("ca.pem"))).ok_or("--dir or --file")?;
            println!("{}", serde_json::to_string_pretty(&jwks_of_file(&path)?)?);
            Ok(())
        }
        CaCommand::Serve(args) => {
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(serve(*args))
        }
    }
}

/// The SPIFFE bundle of the roots in a PEM file; its sequence is the
/// file's modification time (seconds), which grows when the file changes.
fn jwks_of_file(path: &std::path::Path) -> Result<serde_json::Value, String> {
    let bundle = tlsmesh_identity::trust::TrustBundle::load("", path).map_err(|e| e.to_string())?;
    let sequence = std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    tlsmesh_identity::trust::spiffe_bundle(&bundle.roots(), sequence).map_err(|e| e.to_string())
}

fn write_private(path: &std::path::Path, data: &[u8]) -> std::io::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    std::fs::rename(&tmp, path)
}

/// Checks a `system:serviceaccount:<namespace>:<name>` user name.
fn check_service_account(user: &str) -> Result<(), String> {
    let ok = user
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
        .is_some_and(|(ns, name)| !ns.is_empty() && !name.is_empty() && !name.contains(':'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--node-service-account {user:?} is not of the form system:serviceaccount:<namespace>:<name>"
        ))
    }
}

async fn kube_client() -> Result<kube::Client, String> {
    kube::Client::try_default().await.map_err(|e| {
        format!("cannot reach the Kubernetes API: {e} (in a pod: is the ServiceAccount token mounted? outside: set KUBECONFIG)")
    })
}

/// Starts the CA's cluster watcher and waits for its first complete
/// inventory (never decide with a half-listed cluster); then `placement`
/// follows every change.
async fn watch_placement(
    client: kube::Client,
    trust_domain: &str,
    placement: &SharedPlacement,
) -> Result<(), Box<dyn std::error::Error>> {
    let (tx, mut rx) = tokio::sync::watch::channel(Inventory::default());
    tokio::spawn(tlsmesh_k8s::run(client, tlsmesh_k8s::Options::new(None, trust_domain), tx));
    let started = tokio::time::Instant::now();
    loop {
        tokio::select! {
            r = tokio::time::timeout(Duration::from_secs(10), rx.changed()) => match r {
                Ok(Ok(())) => break,
                Ok(Err(_)) => return Err("the Kubernetes watcher stopped".into()),
                Err(_) => warn!(waited_s = started.elapsed().as_secs(), "no complete inventory from the Kubernetes API yet; not serving until there is one (check RBAC: list/watch pods, namespaces, services, endpointslices)"),
            },
            _ = tokio::signal::ctrl_c() => return Err("interrupted".into()),
        }
    }
    info!(pods = rx.borrow().pods.len(), "first inventory from the Kubernetes API");
    tokio::spawn(follow_placement(rx, placement.clone()));
    Ok(())
}

/// The trust domain, and with `--inventory-source static` the inventory file
/// (whose placement is installed in `placement`).
fn static_placement(
    args: &ServeArgs,
    placement: &SharedPlacement,
) -> Result<(String, Option<PathBuf>), Box<dyn std::error::Error>> {
    match args.inventory_source {
        InventorySource::Static => {
            let path = args.inventory.clone().ok_or(
                "--inventory-source static needs --inventory (or use --inventory-source kubernetes)",
            )?;
            let (inv, _) = crate::inventory::load(&path)?;
            if let Some(td) = args.trust_domain.as_ref().filter(|td| **td != inv.trust_domain) {
                return Err(format!(
                    "--trust-domain {td} differs from {}'s trust domain {}",
                    path.display(),
                    inv.trust_domain
                )
                .into());
            }
            placement.replace(tlsmesh_k8s::tokenreview::placement(&inv));
            Ok((inv.trust_domain, Some(path)))
        }
        InventorySource::Kubernetes => {
            Ok((args.trust_domain.clone().unwrap_or_else(|| "cluster.local".into()), None))
        }
    }
}

async fn serve(args: ServeArgs) -> Result<(), Box<dyn std::error::Error>> {
    for user in &args.node_service_accounts {
        check_service_account(user)?;
    }
    let placement = SharedPlacement::default();
    let (trust_domain, inventory) = static_placement(&args, &placement)?;
    let paths = match (args.dir, args.cert, args.key) {
        (Some(d), None, None) => CaPaths::in_dir(d),
        (None, Some(cert), Some(key)) => CaPaths { cert, key, bundle: args.bundle },
        _ => return Err("give either --dir, or --cert and --key".into()),
    };
    let uses_kube = args.inventory_source == InventorySource::Kubernetes
        || args.node_auth == NodeAuth::Kubernetes;
    let client = if uses_kube { Some(kube_client().await?) } else { None };
    let files = Arc::new(CaFiles::open(paths, &trust_domain)?);
    let _reload = Arc::clone(&files).spawn_reload_loop(Duration::from_secs(5));
    let auth: Arc<dyn JoinAuthenticator> = if let (NodeAuth::Kubernetes, Some(client)) =
        (args.node_auth, &client)
    {
        info!(accounts = ?args.node_service_accounts, audience = %args.node_token_audience, "nodes join with their ServiceAccount token (TokenReview)");
        Arc::new(TokenReviewAuthenticator::new(
            client.clone(),
            args.node_token_audience,
            args.node_service_accounts,
        ))
    } else {
        let tokens = args
            .tokens
            .ok_or("--node-auth tokens needs --tokens (or use --node-auth kubernetes)")?;
        Arc::new(JoinTokens::load(&tokens)?)
    };
    let deny = match &args.deny_list {
        Some(p) if p.exists() => DenyList::load(p)?,
        _ => DenyList::default(),
    };
    let config = CaServerConfig {
        server_names: args.server_names,
        workload_lifetime: Duration::from_secs(args.workload_lifetime.max(60)),
        node_lifetime: Duration::from_secs(args.node_lifetime.max(60)),
        deny: deny.clone(),
        ..CaServerConfig::default()
    };
    if let (InventorySource::Kubernetes, Some(client)) = (args.inventory_source, client) {
        watch_placement(client, &trust_domain, &placement).await?;
    }
    let server =
        Arc::new(CaServer::with_authenticator(files.shared(), placement.clone(), auth, config));
    let listen = args.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    info!(%listen, %trust_domain, inventory_source = ?args.inventory_source, node_auth = ?args.node_auth, "tlsmesh CA serving");
    tokio::spawn(server.serve(listener));
    let mut last =
        inventory.as_ref().and_then(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        if let Some(path) = &inventory {
            let m = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            if m != last {
                last = m;
                match crate::inventory::load(path) {
                    Ok((inv, _)) => placement.replace(tlsmesh_k8s::tokenreview::placement(&inv)),
                    Err(e) => {
                        warn!(error = %e, "inventory reload failed; keeping the previous placement");
                    }
                }
            }
        }
        if let Some(p) = &args.deny_list {
            if p.exists() {
                if let Err(e) = deny.reload(p) {
                    warn!(error = %e, "deny list reload failed");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::cli::{Cli, Command};

    fn serve_args(args: &[&str]) -> ServeArgs {
        let command_line = ["tlsmesh", "ca", "serve"].iter().chain(args).copied();
        let parsed = Cli::try_parse_from(command_line).unwrap();
        let Command::Ca(CaCommand::Serve(serve)) = parsed.command else {
            panic!("parsed as {:?}", parsed.command)
        };
        *serve
    }

    #[test]
    fn serve_flags() {
        let a = serve_args(&["--dir", "/ca", "--inventory", "i.toml", "--tokens", "t.json"]);
        assert_eq!(a.inventory_source, InventorySource::Static);
        assert_eq!(a.node_auth, NodeAuth::Tokens);
        assert_eq!(a.log_format, LogFormat::Text);
        assert_eq!(a.trust_domain, None);
        let a = serve_args(&[
            "--cert=/c/tls.crt",
            "--key=/c/tls.key",
            "--inventory-source=kubernetes",
            "--trust-domain=example.org",
            "--node-auth=kubernetes",
            "--node-service-account=system:serviceaccount:mesh:node",
            "--log-format=json",
        ]);
        assert_eq!(a.inventory_source, InventorySource::Kubernetes);
        assert_eq!(a.node_auth, NodeAuth::Kubernetes);
        assert_eq!(a.node_service_accounts, ["system:serviceaccount:mesh:node"]);
        assert_eq!(a.node_token_audience, DEFAULT_AUDIENCE);
        assert_eq!(a.trust_domain.as_deref(), Some("example.org"));
        assert_eq!(CaCommand::Serve(Box::new(a)).log_format(), LogFormat::Json);
        assert!(check_service_account("system:serviceaccount:mesh:node").is_ok());
        for bad in ["tlsmesh-node", "system:serviceaccount:mesh", "system:serviceaccount::x"] {
            assert!(check_service_account(bad)
                .unwrap_err()
                .contains("system:serviceaccount:<namespace>:<name>"));
        }
    }

    #[test]
    fn serve_needs_its_files() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let e = rt.block_on(serve(serve_args(&["--dir", "/nonexistent"]))).unwrap_err();
        assert!(e.to_string().contains("needs --inventory"), "{e}");
    }
}
