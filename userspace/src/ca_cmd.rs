//! `tlsmesh ca`: create a CA, issue join tokens, and run the CA service.
//!
//! `init` writes `ca.pem` and `ca.key` (0600). `token` adds a node's join
//! token to the tokens file (0600) and prints it. `serve` signs workload
//! certificates for nodes that joined, only for identities the inventory
//! places on the asking node; the inventory, the CA files (external
//! intermediate from cert-manager included) and the deny list are re-read
//! when they change.

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Subcommand;
use tlsmesh_identity::{
    authz::{generate_token, JoinTokens, SharedPlacement},
    ca::{CaFiles, CaPaths, Overwrite},
    server::{CaServer, CaServerConfig},
    trust::DenyList,
};
use tracing::{info, warn};

use crate::certs::placement_of;

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
    /// Run the CA service.
    Serve {
        /// Directory with ca.pem and ca.key (or use --cert/--key).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// CA (intermediate) certificate PEM, e.g. a cert-manager Secret's tls.crt.
        #[arg(long)]
        cert: Option<PathBuf>,
        /// CA key PEM (mode 0600 or stricter).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Chain up to the root (e.g. ca.crt) when --cert is an intermediate.
        #[arg(long)]
        bundle: Option<PathBuf>,
        /// Listen address.
        #[arg(long, default_value = "0.0.0.0:15012")]
        listen: std::net::SocketAddr,
        /// Names/addresses for the CA's own certificate (what nodes dial).
        #[arg(long = "server-name", default_value = "localhost")]
        server_names: Vec<String>,
        /// Inventory (who runs where) for the placement check.
        #[arg(long)]
        inventory: PathBuf,
        /// Join tokens file.
        #[arg(long)]
        tokens: PathBuf,
        /// Workload certificate lifetime in seconds (default 24 h, at least 60).
        #[arg(long, default_value_t = 86_400)]
        workload_lifetime: u64,
        /// Node certificate lifetime in seconds (default 24 h, at least 60).
        #[arg(long, default_value_t = 86_400)]
        node_lifetime: u64,
        /// Deny list (serials, SPIFFE ids), re-read when it changes.
        #[arg(long)]
        deny_list: Option<PathBuf>,
    },
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
        CaCommand::Serve {
            dir,
            cert,
            key,
            bundle,
            listen,
            server_names,
            inventory,
            tokens,
            workload_lifetime,
            node_lifetime,
            deny_list,
        } => {
            let paths = match (dir, cert, key) {
                (Some(d), None, None) => CaPaths::in_dir(d),
                (None, Some(cert), Some(key)) => CaPaths { cert, key, bundle },
                _ => return Err("give either --dir, or --cert and --key".into()),
            };
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            rt.block_on(serve(
                paths,
                listen,
                server_names,
                inventory,
                tokens,
                (workload_lifetime, node_lifetime),
                deny_list,
            ))
        }
    }
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

async fn serve(
    paths: CaPaths,
    listen: std::net::SocketAddr,
    server_names: Vec<String>,
    inventory: PathBuf,
    tokens: PathBuf,
    (lifetime, node_lifetime): (u64, u64),
    deny_list: Option<PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    let (inv, _) = crate::inventory::load(&inventory)?;
    let files = Arc::new(CaFiles::open(paths, &inv.trust_domain)?);
    let _reload = Arc::clone(&files).spawn_reload_loop(Duration::from_secs(5));
    let placement = SharedPlacement::new(placement_of(&inv));
    let tokens = Arc::new(JoinTokens::load(&tokens)?);
    let deny = match &deny_list {
        Some(p) if p.exists() => DenyList::load(p)?,
        _ => DenyList::default(),
    };
    let config = CaServerConfig {
        server_names,
        workload_lifetime: Duration::from_secs(lifetime.max(60)),
        node_lifetime: Duration::from_secs(node_lifetime.max(60)),
        deny: deny.clone(),
        ..CaServerConfig::default()
    };
    let server = Arc::new(CaServer::new(files.shared(), placement.clone(), tokens, config));
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    info!(%listen, trust_domain = %inv.trust_domain, "tlsmesh CA serving");
    tokio::spawn(server.serve(listener));
    let mut last = std::fs::metadata(&inventory).and_then(|m| m.modified()).ok();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
        let m = std::fs::metadata(&inventory).and_then(|m| m.modified()).ok();
        if m != last {
            last = m;
            match crate::inventory::load(&inventory) {
                Ok((inv, _)) => placement.replace(placement_of(&inv)),
                Err(e) => {
                    warn!(error = %e, "inventory reload failed; keeping the previous placement")
                }
            }
        }
        if let Some(p) = &deny_list {
            if p.exists() {
                if let Err(e) = deny.reload(p) {
                    warn!(error = %e, "deny list reload failed");
                }
            }
        }
    }
}
