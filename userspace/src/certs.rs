//! The daemon's workload identities: trust bundle, deny list and the
//! certificate manager, set up from the config. Two sources of certificates:
//!
//! - `ca_addr` (+ `ca_bundle`, `join_token_file`): the `tlsmesh ca` service;
//!   the node joins with its token and asks for each workload on it.
//! - `ca_dir`: a CA on local files signing in-process (single host, the demo
//!   and the tests). The same placement check applies: only identities with
//!   a pod on this node.
//!
//! TLS configurations are built per new tunnel connection, so a renewed
//! certificate is used by the next handshake while live connections go on.

use std::{collections::HashSet, path::PathBuf, sync::Arc, time::Duration};

use rustls::{sign::CertifiedKey, ClientConfig, ServerConfig};
use tlsmesh_identity::{
    authz::SharedPlacement,
    ca::{CaFiles, CaPaths},
    client::{CaClient, CaClientConfig},
    manager::{CertManager, CertStatus, LocalCa},
    tls::{self, SniResolver},
    trust::{DenyList, TrustBundle},
    NodeId, SpiffeId,
};
use tracing::{info, warn};

use crate::{
    config::IdentityConfig,
    inventory::{Inventory, Pod},
    sync::lock,
};

/// Errors setting up identities.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// CA files.
    #[error("local CA: {0}")]
    Ca(#[from] tlsmesh_identity::ca::CaError),
    /// Trust bundle or deny list.
    #[error("{0}")]
    Trust(#[from] tlsmesh_identity::trust::TrustError),
    /// CA client.
    #[error("CA service: {0}")]
    Client(#[from] tlsmesh_identity::client::ClientError),
    /// Configuration.
    #[error("identity config: {0}")]
    Config(String),
    /// A SPIFFE id could not be formed.
    #[error("{0}")]
    Spiffe(#[from] tlsmesh_identity::spiffe::SpiffeError),
    /// Certificate manager.
    #[error("{0}")]
    Manager(#[from] tlsmesh_identity::manager::ManagerError),
    /// TLS configuration.
    #[error("{0}")]
    Tls(#[from] tlsmesh_identity::tls::TlsError),
}

/// The node's identity machinery.
#[derive(Debug)]
pub struct Certs {
    /// Trust domain.
    pub trust_domain: String,
    /// Roots.
    pub bundle: TrustBundle,
    /// Revoked serials and identities.
    pub deny: DenyList,
    /// Workload certificates.
    pub manager: Arc<CertManager>,
    /// Local-CA mode: who runs where (kept in sync with the inventory).
    placement: Option<SharedPlacement>,
    deny_path: Option<PathBuf>,
    /// Client configs by (source, destination) with the source certificate
    /// they present: building one per connection showed in profiles, and a
    /// config is reusable as long as the certificate is current (the
    /// verifier reads the shared bundle and deny list at each handshake).
    client_configs: ClientConfigCache,
}

type ClientConfigCache = std::sync::Mutex<
    std::collections::HashMap<(SpiffeId, SpiffeId), (Arc<CertifiedKey>, Arc<ClientConfig>)>,
>;

/// A pod's SPIFFE id.
pub fn workload_id(
    trust_domain: &str,
    pod: &Pod,
) -> Result<SpiffeId, tlsmesh_identity::spiffe::SpiffeError> {
    SpiffeId::new(trust_domain, pod.namespace.clone(), pod.service_account.clone())
}

/// The join token in `path` (surrounding whitespace removed), read afresh.
pub fn read_join_token(path: &std::path::Path) -> Result<zeroize::Zeroizing<String>, CertsError> {
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
        CertsError::Config(format!("cannot read join token {}: {e}", path.display()))
    })?);
    let token = text.trim();
    if token.is_empty() {
        return Err(CertsError::Config(format!("join token file {} is empty", path.display())));
    }
    Ok(zeroize::Zeroizing::new(token.to_owned()))
}

impl Certs {
    /// Sets up from the config; `None` when no CA is configured (no tunnel).
    pub async fn setup(
        cfg: &IdentityConfig,
        node: &str,
        inv: &Inventory,
    ) -> Result<Option<Self>, CertsError> {
        let td = inv.trust_domain.clone();
        let deny = match &cfg.deny_list {
            Some(p) if p.exists() => DenyList::load(p)?,
            _ => DenyList::default(),
        };
        let lifetime = Duration::from_secs(cfg.cert_lifetime_secs.unwrap_or(24 * 3600).max(60));
        if let Some(dir) = &cfg.ca_dir {
            let files = CaFiles::open(CaPaths::in_dir(dir), &td)?;
            let ca = files.shared();
            let bundle = TrustBundle::from_pem(&td, &ca.current().roots_pem())?;
            let placement = SharedPlacement::new(tlsmesh_k8s::tokenreview::placement(inv));
            let source = LocalCa::new(ca, placement.clone(), NodeId::new(td.clone(), node)?)
                .with_lifetime(lifetime);
            let manager = Arc::new(CertManager::new(Arc::new(source)));
            manager.spawn_renewal();
            info!(ca_dir = %dir.display(), lifetime_s = lifetime.as_secs(), "workload certificates from the local CA");
            return Ok(Some(Self {
                trust_domain: td,
                bundle,
                deny,
                manager,
                placement: Some(placement),
                deny_path: cfg.deny_list.clone(),
                client_configs: ClientConfigCache::default(),
            }));
        }
        let Some(addr) = &cfg.ca_addr else { return Ok(None) };
        let bundle_path = cfg.ca_bundle.clone().ok_or_else(|| {
            CertsError::Config("ca_addr needs ca_bundle (the CA's root PEM)".into())
        })?;
        let bundle = TrustBundle::load(&td, &bundle_path)?;
        let token_path = cfg
            .join_token_file
            .clone()
            .ok_or_else(|| CertsError::Config("ca_addr needs join_token_file".into()))?;
        let server_name = cfg.ca_server_name.clone().unwrap_or_else(|| {
            addr.rsplit_once(':')
                .map_or(addr.as_str(), |x| x.0)
                .trim_matches(['[', ']'])
                .to_string()
        });
        let client = Arc::new(CaClient::new(CaClientConfig {
            addr: addr.clone(),
            server_name,
            trust: bundle.clone(),
            node: node.to_string(),
            timeout: Duration::from_secs(10),
        })?);
        let mut delay = Duration::from_millis(200);
        loop {
            // Read before every attempt: in a cluster this is the projected
            // ServiceAccount token, which the kubelet rotates.
            let joined = match read_join_token(&token_path) {
                Ok(token) => client.join(&token).await.map_err(CertsError::from),
                Err(e) => Err(e),
            };
            match joined {
                Ok(info) => {
                    info!(ca = %addr, serial = %info.serial, "joined the CA");
                    break;
                }
                Err(e) if delay < Duration::from_secs(10) => {
                    warn!(ca = %addr, error = %e, "joining the CA failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay *= 2;
                }
                Err(e) => return Err(e),
            }
        }
        let manager = Arc::new(CertManager::new(client));
        manager.spawn_renewal();
        Ok(Some(Self {
            trust_domain: td,
            bundle,
            deny,
            manager,
            placement: None,
            deny_path: cfg.deny_list.clone(),
            client_configs: ClientConfigCache::default(),
        }))
    }

    /// Follows inventory changes: placement (local CA) and which certificates to keep.
    pub fn on_inventory(&self, inv: &Inventory, node: &str) {
        if let Some(p) = &self.placement {
            p.replace(tlsmesh_k8s::tokenreview::placement(inv));
        }
        let keep: HashSet<SpiffeId> = inv
            .enrolled_on(node)
            .into_iter()
            .filter_map(|p| workload_id(&inv.trust_domain, p).ok())
            .collect();
        let dropped = self.manager.retain(&keep);
        for id in dropped {
            info!(identity = %id, "certificate dropped: no pod on this node uses it");
        }
    }

    /// Re-reads the deny list file if it changed. Returns true when it did.
    pub fn reload_deny_list(&self) -> bool {
        let Some(p) = &self.deny_path else { return false };
        if !p.exists() {
            return false;
        }
        let before = self.deny.current();
        match self.deny.reload(p) {
            Ok(()) => *self.deny.current() != *before,
            Err(e) => {
                warn!(file = %p.display(), error = %e, "deny list unreadable; keeping the previous one");
                false
            }
        }
    }

    /// Server TLS config for a pod's tunnel listener: the certificate is
    /// chosen by SNI, defaulting to the pod's own identity (peers like
    /// ztunnel send no SNI of ours).
    pub fn server_config(&self, pod_id: &SpiffeId) -> Result<Arc<ServerConfig>, CertsError> {
        let resolver = Arc::new(SniResolver::new(self.manager.clone(), Some(pod_id.clone())));
        Ok(Arc::new(tls::server_config(resolver, &self.bundle, &self.deny)?))
    }

    /// Client TLS config presenting `src`'s certificate and requiring `dst`.
    pub async fn client_config(
        &self,
        src: &SpiffeId,
        dst: &SpiffeId,
    ) -> Result<Arc<ClientConfig>, CertsError> {
        let key = self.manager.ensure(src).await?;
        let ids = (src.clone(), dst.clone());
        if let Some((k, c)) = lock(&self.client_configs).get(&ids) {
            if Arc::ptr_eq(k, &key) {
                return Ok(Arc::clone(c));
            }
        }
        let config =
            Arc::new(tls::client_config(Arc::clone(&key), dst.clone(), &self.bundle, &self.deny)?);
        let mut cache = lock(&self.client_configs);
        // Entries of certificates no longer current would keep old keys alive.
        cache.retain(|(s, _), (k, _)| s != src || Arc::ptr_eq(k, &key));
        cache.insert(ids, (key, Arc::clone(&config)));
        Ok(config)
    }

    /// Certificates for the admin API.
    pub fn snapshot(&self) -> Vec<CertStatus> {
        self.manager.snapshot()
    }
}

#[cfg(test)]
mod tests {
    use tlsmesh_identity::{
        authz::JoinTokens,
        ca::{Ca, SharedCa},
        server::{CaServer, CaServerConfig},
    };

    use super::*;

    const GOOD: &str = "token-of-node-a-0123456789";

    /// The projected token is rotated by the kubelet: a join that failed with
    /// the old file content succeeds once the file holds the new token.
    #[tokio::test]
    #[allow(clippy::duration_suboptimal_units, reason = "MSRV 1.85 lacks Duration::from_hours")]
    async fn join_token_is_read_again_before_each_attempt() {
        let dir = std::env::temp_dir().join(format!("tlsmesh-certs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ca, _) = Ca::generate_root("cluster.local", Duration::from_secs(86_400)).unwrap();
        std::fs::write(dir.join("ca.crt"), ca.roots_pem()).unwrap();
        let token_file = dir.join("token");
        std::fs::write(&token_file, "  \n").unwrap();
        assert!(read_join_token(&token_file).unwrap_err().to_string().contains("is empty"));
        std::fs::write(&token_file, "an-old-token-0123456789\n").unwrap();

        let tokens = JoinTokens::new();
        tokens.insert("node-a", GOOD, false).unwrap();
        let server = Arc::new(CaServer::new(
            SharedCa::new(ca),
            SharedPlacement::default(),
            Arc::new(tokens),
            CaServerConfig::default(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let serving = tokio::spawn(server.serve(listener));

        let cfg = IdentityConfig {
            ca_addr: Some(addr.to_string()),
            ca_server_name: Some("localhost".into()),
            ca_bundle: Some(dir.join("ca.crt")),
            join_token_file: Some(token_file.clone()),
            ..IdentityConfig::default()
        };
        let inv = Inventory { trust_domain: "cluster.local".into(), ..Inventory::default() };
        let setup = tokio::spawn(async move { Certs::setup(&cfg, "node-a", &inv).await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!setup.is_finished(), "joined with the old token?");
        // What the kubelet does: write aside, rename over.
        std::fs::write(dir.join("token.new"), format!("{GOOD}\n")).unwrap();
        std::fs::rename(dir.join("token.new"), &token_file).unwrap();
        let certs = tokio::time::timeout(Duration::from_secs(10), setup)
            .await
            .expect("no join within 10 s of the token rotation")
            .unwrap()
            .unwrap();
        assert!(certs.is_some());
        serving.abort();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
