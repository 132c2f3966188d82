//! The daemon's side of the CNI plugin's Unix socket ([`serve`]), the
//! record of what the plugin reported ([`CniPods`], a
//! [`NetnsResolver`]), and the wait for the watcher to know a new pod
//! ([`wait_for_pod`]). The protocol is `tlsmesh_cni::protocol`.
//!
//! The daemon's handler for `add`, in outline:
//!
//! ```text
//! pods.record(&req);                         // netns + IPs for the reducer
//! let pod = wait_for_pod(&mut inv_rx, &req.pod_key(), timeout).await;
//! match pod {
//!     None => Response::Error { "pod … not seen from the API server in …" },
//!     Some(p) if p.mode.is_none() => Response::NotEnrolled { reason },
//!     Some(p) => { node.enroll(&p).await?; Response::Enrolled { mode } }
//! }
//! ```

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::{Arc, PoisonError, RwLock},
    time::Duration,
};

pub use tlsmesh_cni::protocol::{
    Command, Request, Response, DEFAULT_SOCKET, MAX_MESSAGE, PROTOCOL_VERSION,
};
use tlsmesh_inventory::{Inventory, Pod};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{watch, Notify},
};
use tracing::{debug, warn};

use crate::state::{NetnsResolver, PodRef};

/// How long a plugin may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Binds the socket at `path` (replacing a stale one; the directory is
/// created; the socket is mode 0600, for the root-run plugin only) and
/// serves plugin requests with `handler` until the task is dropped.
pub async fn serve<H, F>(path: &Path, handler: H) -> io::Result<()>
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    serve_listener(bind(path)?, handler).await
}

/// Binds the plugin socket (see [`serve`]).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    let ctx = |what: &str, e: io::Error| {
        io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| ctx("cannot create the directory of", e))?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(ctx("cannot remove stale socket", e))
        }
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(|e| ctx("cannot listen on", e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| ctx("cannot chmod", e))?;
    Ok(listener)
}

/// Serves plugin requests on an already bound listener.
pub async fn serve_listener<H, F>(listener: UnixListener, handler: H) -> io::Result<()>
where
    H: Fn(Request) -> F + Send + Sync + 'static,
    F: Future<Output = Response> + Send + 'static,
{
    let handler = Arc::new(handler);
    loop {
        let (stream, _) = listener.accept().await?;
        let handler = Arc::clone(&handler);
        tokio::spawn(async move {
            if let Err(e) = connection(stream, handler.as_ref()).await {
                warn!(error = %e, "CNI plugin connection failed");
            }
        });
    }
}

async fn connection<H, F>(stream: UnixStream, handler: &H) -> io::Result<()>
where
    H: Fn(Request) -> F,
    F: Future<Output = Response>,
{
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read.take(MAX_MESSAGE as u64));
    let mut line = Vec::new();
    let response = match tokio::time::timeout(READ_TIMEOUT, reader.read_until(b'\n', &mut line)).await {
        Err(_) => Response::Error { message: format!("no request within {READ_TIMEOUT:?}") },
        Ok(Err(e)) => return Err(e),
        Ok(Ok(_)) if !line.ends_with(b"\n") => {
            Response::Error { message: format!("request not terminated by a newline within {MAX_MESSAGE} bytes") }
        }
        Ok(Ok(_)) => match serde_json::from_slice::<Request>(&line) {
            Err(e) => Response::Error { message: format!("malformed request: {e}") },
            Ok(req) if req.version != PROTOCOL_VERSION => Response::Error {
                message: format!(
                    "plugin speaks protocol version {}, this daemon {PROTOCOL_VERSION}; upgrade the plugin and the daemon together",
                    req.version
                ),
            },
            Ok(req) => {
                debug!(pod = %req.pod_key(), command = ?req.command, container = %req.container_id, "CNI request");
                handler(req).await
            }
        },
    };
    let mut out = serde_json::to_vec(&response).map_err(io::Error::other)?;
    out.push(b'\n');
    write.write_all(&out).await?;
    write.shutdown().await
}

/// What the plugin reported for one pod sandbox.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CniPod {
    /// Sandbox id.
    pub container_id: String,
    /// Network namespace path (as the daemon sees it: mount the host's
    /// `/var/run/netns` at the same path).
    pub netns: Option<PathBuf>,
    /// Addresses from the main plugin's result.
    pub ips: Vec<IpAddr>,
    /// Pod uid, when the runtime passed it.
    pub uid: Option<String>,
}

/// The pods the CNI plugin told this daemon about, by `namespace/name`; a
/// [`NetnsResolver`] for the watcher. Cheap to clone (shared).
///
/// With a state file ([`CniPods::with_state_file`], e.g.
/// `/var/run/tlsmesh/cni-pods.json` on the host's tmpfs) the record
/// survives a daemon restart, so a restarted daemon finds the netns of the
/// pods created before it; a node reboot clears it along with the pods.
#[derive(Debug, Clone, Default)]
pub struct CniPods {
    pods: Arc<RwLock<HashMap<String, CniPod>>>,
    changed: Arc<Notify>,
    state_file: Option<Arc<PathBuf>>,
}

impl CniPods {
    /// An empty record, in memory only.
    pub fn new() -> Self {
        Self::default()
    }

    /// A record kept in `path` too: loads what is there (dropping pods whose
    /// netns no longer exists) and rewrites the file on every change.
    pub fn with_state_file(path: PathBuf) -> io::Result<Self> {
        let mut pods: HashMap<String, CniPod> = match std::fs::read(&path) {
            Ok(data) => serde_json::from_slice(&data).unwrap_or_else(|e| {
                warn!(path = %path.display(), error = %e, "unreadable CNI pod record; starting empty");
                HashMap::new()
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => return Err(io::Error::new(e.kind(), format!("cannot read {}: {e}", path.display()))),
        };
        pods.retain(|_, p| p.netns.as_ref().is_none_or(|n| n.exists()));
        let me = Self {
            pods: Arc::new(RwLock::new(pods)),
            changed: Arc::default(),
            state_file: Some(Arc::new(path)),
        };
        me.save();
        Ok(me)
    }

    fn save(&self) {
        let Some(path) = self.state_file.as_deref() else { return };
        let data = {
            let pods = self.pods.read().unwrap_or_else(PoisonError::into_inner);
            serde_json::to_vec(&*pods).unwrap_or_default()
        };
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, data).and_then(|()| std::fs::rename(&tmp, path)) {
            warn!(path = %path.display(), error = %e, "cannot save the CNI pod record; a restarted daemon may not find pod netns");
        }
    }

    /// Records an `add` (a later sandbox of the same pod replaces the
    /// earlier one) and wakes the watcher to rebuild the inventory.
    pub fn record(&self, req: &Request) {
        let pod = CniPod {
            container_id: req.container_id.clone(),
            netns: req.netns.as_ref().filter(|n| !n.is_empty()).map(PathBuf::from),
            ips: req.ips.iter().map(IpAddr::to_canonical).collect(),
            uid: req.pod_uid.clone(),
        };
        self.pods.write().unwrap_or_else(PoisonError::into_inner).insert(req.pod_key(), pod);
        self.save();
        self.changed.notify_one();
    }

    /// Forgets a pod on `del`, if the sandbox is the one recorded.
    pub fn forget(&self, req: &Request) {
        let mut pods = self.pods.write().unwrap_or_else(PoisonError::into_inner);
        if pods.get(&req.pod_key()).is_some_and(|p| p.container_id == req.container_id) {
            pods.remove(&req.pod_key());
            drop(pods);
            self.save();
            self.changed.notify_one();
        }
    }

    /// Signalled on every change; pass it to [`crate::watch::Options::refresh`].
    pub fn changed(&self) -> Arc<Notify> {
        Arc::clone(&self.changed)
    }

    /// The record of `namespace/name`.
    pub fn get(&self, key: &str) -> Option<CniPod> {
        self.pods.read().unwrap_or_else(PoisonError::into_inner).get(key).cloned()
    }

    fn matching(&self, pod: &PodRef<'_>) -> Option<CniPod> {
        let p = self.get(&format!("{}/{}", pod.namespace, pod.name))?;
        // A pod deleted and re-created under the same name is another pod.
        match &p.uid {
            Some(uid) if !pod.uid.is_empty() && uid != pod.uid => None,
            _ => Some(p),
        }
    }
}

impl NetnsResolver for CniPods {
    fn netns(&self, pod: &PodRef<'_>) -> Option<PathBuf> {
        self.matching(pod)?.netns
    }

    fn ips(&self, pod: &PodRef<'_>) -> Vec<IpAddr> {
        self.matching(pod).map(|p| p.ips).unwrap_or_default()
    }
}

/// Waits until the published inventory has the pod `namespace/name` and,
/// when it is enrolled, knows its netns (the reducer has taken in what the
/// plugin reported). `None` after `timeout`: the daemon should answer with
/// an error, so the plugin fails the sandbox and the runtime retries.
pub async fn wait_for_pod(
    rx: &mut watch::Receiver<Inventory>,
    key: &str,
    timeout: Duration,
) -> Option<Pod> {
    let ready =
        |inv: &Inventory| inv.pods.get(key).is_some_and(|p| p.mode.is_none() || p.netns.is_some());
    let found = tokio::time::timeout(timeout, rx.wait_for(ready)).await.ok()?.ok()?;
    found.pods.get(key).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(name: &str, sandbox: &str, netns: &str) -> Request {
        Request {
            version: PROTOCOL_VERSION,
            command: Command::Add,
            container_id: sandbox.into(),
            netns: Some(netns.into()),
            ifname: "eth0".into(),
            pod_namespace: "shop".into(),
            pod_name: name.into(),
            pod_uid: Some(format!("uid-{name}")),
            ips: vec!["::ffff:10.0.0.2".parse().unwrap()],
        }
    }

    #[test]
    fn record_resolve_forget() {
        let pods = CniPods::new();
        pods.record(&req("web", "s1", "/var/run/netns/a"));
        let r = PodRef { namespace: "shop", name: "web", uid: "uid-web", ips: &[] };
        assert_eq!(pods.netns(&r), Some(PathBuf::from("/var/run/netns/a")));
        assert_eq!(pods.ips(&r), ["10.0.0.2".parse::<IpAddr>().unwrap()], "canonical addresses");
        let other = PodRef { uid: "uid-of-a-new-pod", ..r };
        assert_eq!(pods.netns(&other), None, "same name, another pod");
        // A DEL of an older sandbox does not forget the current one.
        pods.forget(&req("web", "s0", ""));
        assert!(pods.get("shop/web").is_some());
        pods.forget(&req("web", "s1", ""));
        assert!(pods.get("shop/web").is_none());
    }

    #[test]
    fn the_record_survives_a_restart() {
        let dir = std::env::temp_dir().join(format!("tlsmesh-cnipods-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("cni-pods.json");
        let _ = std::fs::remove_file(&file);
        let live = dir.join("netns-live");
        std::fs::write(&live, "").unwrap();
        let pods = CniPods::with_state_file(file.clone()).unwrap();
        pods.record(&req("web", "s1", live.to_str().unwrap()));
        pods.record(&req("gone", "s2", "/nonexistent/netns"));
        drop(pods);
        let again = CniPods::with_state_file(file.clone()).unwrap();
        assert_eq!(again.get("shop/web").unwrap().netns.as_deref(), Some(live.as_path()));
        assert!(again.get("shop/gone").is_none(), "a netns that no longer exists is dropped");
        std::fs::write(&file, "garbage").unwrap();
        assert!(
            CniPods::with_state_file(file).unwrap().get("shop/web").is_none(),
            "unreadable: start empty"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
