//! The CA's authorization decisions, as pure functions over data: which node
//! may obtain certificates for which workload identity ([`Placement`],
//! [`authorize`]), and which node may bootstrap with which join token
//! ([`JoinTokens`]). How a join is authenticated is pluggable
//! ([`JoinAuthenticator`]): the token file here, or, in a cluster, the
//! API server's `TokenReview` (`tlsmesh_k8s::tokenreview`).
//!
//! Join tokens are **reusable** by default: a node that loses its state (a
//! re-imaged host, a `DaemonSet` pod without a host volume) re-joins with the
//! same token, and every join is logged by the CA. A token can be marked
//! `one_time`; its use is remembered in memory only, so it becomes usable
//! again if the CA restarts. Revoke a node by deleting its token and adding
//! its node ID (`spiffe://<td>/node/<name>`) to the deny list. Tokens are kept
//! as SHA-256 digests and compared in constant time.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::future::Future;
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use sha2::{Digest as _, Sha256};

use crate::spiffe::{NodeId, SpiffeId};

/// Why a node was refused a workload certificate.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum Denied {
    #[error(
        "node {node} asked for {id}, which is in trust domain {id_trust_domain:?}, not the node's {node_trust_domain:?}"
    )]
    TrustDomain { node: String, id: String, id_trust_domain: String, node_trust_domain: String },
    #[error(
        "node {node} asked for {id}, but no pod with that identity is scheduled on any node; if the pod was just created, the CA's view of placements may lag: retry"
    )]
    UnknownIdentity { node: String, id: String },
    #[error(
        "node {node} asked for {id}, but pods with that identity run only on {nodes:?}; a node gets certificates only for its own pods"
    )]
    NotOnNode { node: String, id: String, nodes: Vec<String> },
}

/// Why a join was refused.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("no join token is configured for node {node:?}; add one to the CA's token file")]
    UnknownNode { node: String },
    #[error("wrong join token for node {node:?}")]
    WrongToken { node: String },
    #[error("the one-time join token of node {node:?} was already used; issue a new one")]
    AlreadyUsed { node: String },
    #[error("cannot read token file {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "token file {path} is readable by group or others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    Permissions { path: String, mode: u32 },
    #[error("token file {path} is not valid JSON of the form {{\"tokens\": [{{\"node\": ..., \"token\": ...}}]}}: {source}")]
    Parse {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("join token for node {node:?} is too short ({len} characters); use at least 16 (see `generate_token`)")]
    TooShort { node: String, len: usize },
}

/// Which nodes run pods of each workload identity.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Placement {
    nodes: HashMap<SpiffeId, BTreeSet<String>>,
}

impl Placement {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that a pod with identity `id` runs on `node`.
    pub fn insert(&mut self, id: SpiffeId, node: impl Into<String>) {
        self.nodes.entry(id).or_default().insert(node.into());
    }

    /// The nodes running pods with identity `id`.
    pub fn nodes(&self, id: &SpiffeId) -> impl Iterator<Item = &str> {
        self.nodes.get(id).into_iter().flatten().map(String::as_str)
    }

    /// The identities with a pod on `node` (what the daemon there needs).
    pub fn identities_on(&self, node: &str) -> BTreeSet<SpiffeId> {
        self.nodes.iter().filter(|(_, n)| n.contains(node)).map(|(id, _)| id.clone()).collect()
    }
}

impl FromIterator<(SpiffeId, String)> for Placement {
    fn from_iter<T: IntoIterator<Item = (SpiffeId, String)>>(iter: T) -> Self {
        let mut p = Placement::new();
        for (id, node) in iter {
            p.insert(id, node);
        }
        p
    }
}

/// Decides whether `node` may obtain a certificate for `requested`: only if
/// a pod with that identity is placed on that node, in the same trust domain.
pub fn authorize(node: &NodeId, requested: &SpiffeId, placement: &Placement) -> Result<(), Denied> {
    if requested.trust_domain() != node.trust_domain() {
        return Err(Denied::TrustDomain {
            node: node.name().to_owned(),
            id: requested.to_string(),
            id_trust_domain: requested.trust_domain().to_owned(),
            node_trust_domain: node.trust_domain().to_owned(),
        });
    }
    let nodes: Vec<String> = placement.nodes(requested).map(str::to_owned).collect();
    if nodes.is_empty() {
        return Err(Denied::UnknownIdentity {
            node: node.name().to_owned(),
            id: requested.to_string(),
        });
    }
    if nodes.iter().any(|n| n == node.name()) {
        Ok(())
    } else {
        Err(Denied::NotOnNode { node: node.name().to_owned(), id: requested.to_string(), nodes })
    }
}

/// The placement the CA decides with, replaceable at run time (the lead's
/// inventory or Kubernetes watcher calls [`replace`](Self::replace)).
#[derive(Debug, Clone, Default)]
pub struct SharedPlacement(Arc<RwLock<Arc<Placement>>>);

impl SharedPlacement {
    pub fn new(placement: Placement) -> Self {
        Self(Arc::new(RwLock::new(Arc::new(placement))))
    }

    pub fn current(&self) -> Arc<Placement> {
        self.0.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub fn replace(&self, placement: Placement) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(placement);
    }

    /// Applies `f` to a copy of the placement and installs the result.
    pub fn update(&self, f: impl FnOnce(&mut Placement)) {
        let mut guard = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let mut next = (**guard).clone();
        f(&mut next);
        *guard = Arc::new(next);
    }
}

/// One entry of the token file.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct TokenEntry {
    pub node: String,
    pub token: String,
    #[serde(default)]
    pub one_time: bool,
}

#[derive(serde::Deserialize)]
struct TokenFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Debug)]
struct Stored {
    digest: [u8; 32],
    one_time: bool,
    used: bool,
}

/// Join tokens per node name, as SHA-256 digests.
#[derive(Debug, Default)]
pub struct JoinTokens {
    by_node: Mutex<HashMap<String, Stored>>,
}

/// Minimum token length accepted.
pub const MIN_TOKEN_LEN: usize = 16;

impl JoinTokens {
    pub fn new() -> Self {
        Self::default()
    }

    /// Loads `{"tokens": [{"node": "node-a", "token": "…", "one_time": false}]}`
    /// from a file that must not be readable by group or others.
    pub fn load(path: &Path) -> Result<Self, JoinError> {
        let p = path.display().to_string();
        let meta =
            fs::metadata(path).map_err(|source| JoinError::Read { path: p.clone(), source })?;
        let mode = meta.permissions().mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(JoinError::Permissions { path: p, mode });
        }
        let text = zeroize::Zeroizing::new(
            fs::read_to_string(path)
                .map_err(|source| JoinError::Read { path: p.clone(), source })?,
        );
        let file: TokenFile =
            serde_json::from_str(&text).map_err(|source| JoinError::Parse { path: p, source })?;
        let tokens = Self::new();
        for entry in file.tokens {
            tokens.insert(&entry.node, &entry.token, entry.one_time)?;
        }
        Ok(tokens)
    }

    /// Adds or replaces the token of `node`.
    pub fn insert(&self, node: &str, token: &str, one_time: bool) -> Result<(), JoinError> {
        if token.len() < MIN_TOKEN_LEN {
            return Err(JoinError::TooShort { node: node.to_owned(), len: token.len() });
        }
        let stored = Stored { digest: digest(token), one_time, used: false };
        self.by_node.lock().unwrap_or_else(PoisonError::into_inner).insert(node.to_owned(), stored);
        Ok(())
    }

    /// Removes the token of `node` (it can no longer join).
    pub fn remove(&self, node: &str) -> bool {
        self.by_node.lock().unwrap_or_else(PoisonError::into_inner).remove(node).is_some()
    }

    /// Checks `(node, token)`; a one-time token is consumed on success.
    pub fn check(&self, node: &str, token: &str) -> Result<(), JoinError> {
        let presented = digest(token);
        let mut map = self.by_node.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(stored) = map.get_mut(node) else {
            return Err(JoinError::UnknownNode { node: node.to_owned() });
        };
        if !constant_time_eq(&stored.digest, &presented) {
            return Err(JoinError::WrongToken { node: node.to_owned() });
        }
        if stored.one_time {
            if stored.used {
                return Err(JoinError::AlreadyUsed { node: node.to_owned() });
            }
            stored.used = true;
        }
        Ok(())
    }
}

/// Why a join was not authenticated. The text is for the CA's log; the node
/// is told only the class (see [`crate::server`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoinRefusal {
    /// The credential does not prove any node, or not the claimed one
    /// (wrong, unknown, expired or foreign token). Retrying will not help.
    #[error("{0}")]
    Unauthenticated(String),
    /// The authenticator could not decide (e.g. the API server is
    /// unreachable, or the CA may not create `TokenReviews`): retry later.
    #[error("{0}")]
    Unavailable(String),
}

/// The future an authenticator returns (boxed, so the trait can be used as
/// `Arc<dyn JoinAuthenticator>`).
pub type JoinFuture<'a> = Pin<Box<dyn Future<Output = Result<String, JoinRefusal>> + Send + 'a>>;

/// Authenticates a node's `join`: given the node name the request claims and
/// the token it presents, returns the node name the **credential** proves.
/// The CA server issues a node certificate only if that name equals the
/// claimed one (and logs a refusal otherwise), so an authenticator that knows
/// where a token comes from (`TokenReview`: the node its pod runs on) must
/// return that, never just echo `claimed`.
pub trait JoinAuthenticator: Send + Sync {
    /// The node proven by `token`, or why there is none.
    fn authenticate<'a>(&'a self, claimed: &'a str, token: &'a str) -> JoinFuture<'a>;
}

/// Token-file authentication: a token proves exactly the node it was issued
/// for (a one-time token is consumed).
impl JoinAuthenticator for JoinTokens {
    fn authenticate<'a>(&'a self, claimed: &'a str, token: &'a str) -> JoinFuture<'a> {
        let result = self
            .check(claimed, token)
            .map(|()| claimed.to_owned())
            .map_err(|e| JoinRefusal::Unauthenticated(e.to_string()));
        Box::pin(std::future::ready(result))
    }
}

/// A new random join token (256 bits, hex).
pub fn generate_token() -> String {
    let bytes: [u8; 32] = rand::random();
    crate::spiffe::hex(&bytes)
}

fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Compares two digests without data-dependent early exit.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("td", ns, sa).unwrap()
    }

    fn node(name: &str) -> NodeId {
        NodeId::new("td", name).unwrap()
    }

    #[test]
    fn node_gets_only_identities_placed_on_it() {
        let placement: Placement = [
            (id("shop", "web"), "node-a".to_owned()),
            (id("shop", "web"), "node-b".to_owned()),
            (id("shop", "db"), "node-b".to_owned()),
        ]
        .into_iter()
        .collect();
        assert_eq!(authorize(&node("node-a"), &id("shop", "web"), &placement), Ok(()));
        assert_eq!(authorize(&node("node-b"), &id("shop", "db"), &placement), Ok(()));
        let err = authorize(&node("node-a"), &id("shop", "db"), &placement).unwrap_err();
        assert_eq!(
            err,
            Denied::NotOnNode {
                node: "node-a".into(),
                id: "spiffe://td/ns/shop/sa/db".into(),
                nodes: vec!["node-b".into()]
            }
        );
        assert!(err.to_string().contains("only on [\"node-b\"]"), "{err}");
        assert!(matches!(
            authorize(&node("node-a"), &id("shop", "nope"), &placement),
            Err(Denied::UnknownIdentity { .. })
        ));
        let foreign = SpiffeId::new("other", "shop", "web").unwrap();
        assert!(matches!(
            authorize(&node("node-a"), &foreign, &placement),
            Err(Denied::TrustDomain { .. })
        ));
        assert_eq!(placement.identities_on("node-b").len(), 2);
    }

    #[test]
    fn shared_placement_updates_at_run_time() {
        let shared = SharedPlacement::default();
        assert!(authorize(&node("n"), &id("a", "b"), &shared.current()).is_err());
        shared.update(|p| p.insert(id("a", "b"), "n"));
        assert!(authorize(&node("n"), &id("a", "b"), &shared.current()).is_ok());
        shared.replace(Placement::new());
        assert!(authorize(&node("n"), &id("a", "b"), &shared.current()).is_err());
    }

    #[test]
    fn join_tokens() {
        let tokens = JoinTokens::new();
        tokens.insert("node-a", "0123456789abcdef-a", false).unwrap();
        tokens.insert("node-b", "0123456789abcdef-b", true).unwrap();
        assert!(tokens.insert("node-c", "short", false).is_err());

        tokens.check("node-a", "0123456789abcdef-a").unwrap();
        tokens.check("node-a", "0123456789abcdef-a").unwrap();
        assert!(matches!(
            tokens.check("node-a", "0123456789abcdef-b"),
            Err(JoinError::WrongToken { .. })
        ));
        assert!(matches!(tokens.check("node-x", "whatever"), Err(JoinError::UnknownNode { .. })));

        tokens.check("node-b", "0123456789abcdef-b").unwrap();
        assert!(matches!(
            tokens.check("node-b", "0123456789abcdef-b"),
            Err(JoinError::AlreadyUsed { .. })
        ));
        assert!(tokens.remove("node-a"));
        assert!(tokens.check("node-a", "0123456789abcdef-a").is_err());
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(f)
    }

    #[test]
    fn join_tokens_as_authenticator() {
        let tokens = JoinTokens::new();
        tokens.insert("node-a", "0123456789abcdef-a", false).unwrap();
        tokens.insert("node-b", "0123456789abcdef-b", true).unwrap();
        let auth: Arc<dyn JoinAuthenticator> = Arc::new(tokens);

        // A token proves the node it belongs to, and reusable tokens stay usable.
        for _ in 0..2 {
            assert_eq!(
                block_on(auth.authenticate("node-a", "0123456789abcdef-a")),
                Ok("node-a".to_owned())
            );
        }
        // Node b's token does not prove node a.
        let e = block_on(auth.authenticate("node-a", "0123456789abcdef-b")).unwrap_err();
        assert_eq!(e, JoinRefusal::Unauthenticated("wrong join token for node \"node-a\"".into()));
        let e = block_on(auth.authenticate("node-x", "0123456789abcdef-a")).unwrap_err();
        assert!(
            matches!(&e, JoinRefusal::Unauthenticated(m) if m.contains("no join token is configured for node \"node-x\"")),
            "{e}"
        );
        // A one-time token works once.
        assert_eq!(
            block_on(auth.authenticate("node-b", "0123456789abcdef-b")),
            Ok("node-b".to_owned())
        );
        let e = block_on(auth.authenticate("node-b", "0123456789abcdef-b")).unwrap_err();
        assert!(e.to_string().contains("already used"), "{e}");
    }

    #[test]
    fn generated_tokens_are_long_and_distinct() {
        let a = generate_token();
        assert_eq!(a.len(), 64);
        assert_ne!(a, generate_token());
    }

    #[test]
    fn token_file_must_be_private() {
        let dir = std::env::temp_dir().join(format!("tlsmesh-tokens-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tokens.json");
        fs::write(&path, r#"{"tokens":[{"node":"n1","token":"0123456789abcdef0"}]}"#).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = JoinTokens::load(&path).unwrap_err();
        assert!(err.to_string().contains("chmod 600"), "{err}");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let tokens = JoinTokens::load(&path).unwrap();
        tokens.check("n1", "0123456789abcdef0").unwrap();
        fs::remove_dir_all(&dir).unwrap();
    }
}
