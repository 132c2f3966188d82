//! A real Kubernetes control plane for tests: etcd, kube-apiserver and
//! kube-controller-manager (v1.20.2, built from Debian's source package by
//! `scripts/kube-control-plane.sh`) on 127.0.0.1, each instance on free
//! ports in a directory of its own with throw-away PKI ([`pki`]).
//!
//! [`ControlPlane::start`] returns once `/readyz` answers and the
//! controller-manager has given the `default` namespace its `default`
//! `ServiceAccount` and token `Secret`; the test gets an admin
//! [`kube::Client`] and a kubeconfig. Dropping the [`ControlPlane`] stops
//! exactly the processes it started (by PID: SIGTERM, then SIGKILL after
//! 5 s) and removes its directory — also when the test panics (then the
//! tail of each log is printed first). The children also get SIGKILL from
//! the kernel if the thread that started them dies (`PR_SET_PDEATHSIG`), so a
//! killed test run leaves no API server behind: start it from the test's own
//! thread or a runtime worker, not from `spawn_blocking`.
//!
//! At most [`parallel`] instances run at once per test process (each takes
//! ≈ 500 MB and two cores' worth of start-up); the others wait their turn.
//!
//! Missing binaries are a failure, never a silent skip: the panic says to
//! run `scripts/bootstrap.sh`.

pub mod objects;
pub mod pki;

use std::{
    fmt,
    fs::{self, File},
    io,
    net::TcpListener,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicU32, Ordering},
        OnceLock,
    },
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{
    config::{KubeConfigOptions, Kubeconfig},
    Api, Client,
};
use nix::{
    sys::signal::{kill, Signal},
    unistd::Pid,
};
use tokio::sync::{Semaphore, SemaphorePermit};

/// The Kubernetes version the harness runs.
pub const KUBE_VERSION: &str = "v1.20.2";
/// The machine-wide cache `scripts/kube-control-plane.sh` builds into.
pub const MACHINE_CACHE: &str = "/var/cache/tlsmesh/kubernetes-v1.20.2/bin";
/// `--service-cluster-ip-range` of every instance.
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

const READY_TIMEOUT: Duration = Duration::from_secs(90);
const STOP_GRACE: Duration = Duration::from_secs(5);
const START_ATTEMPTS: u32 = 3;

/// Where the three binaries are.
#[derive(Debug, Clone)]
pub struct Binaries {
    pub etcd: PathBuf,
    pub kube_apiserver: PathBuf,
    pub kube_controller_manager: PathBuf,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("kubeharness has a parent").to_path_buf()
}

fn missing(what: &str, looked: &[PathBuf]) -> ! {
    let ci = std::env::var("CI").is_ok_and(|v| v == "true");
    panic!(
        "{what} not found (looked in {looked:?}). The real-API-server tests need the Kubernetes \
         {KUBE_VERSION} control plane: run scripts/bootstrap.sh as root (it builds kube-apiserver \
         and kube-controller-manager once per machine, about 7 minutes, into {MACHINE_CACHE}, and \
         installs etcd-server).{}",
        if ci { " Under CI=true this is a failure of the CI machine's set-up." } else { "" }
    )
}

/// Finds the binaries: `$TLSMESH_KUBE_BIN`, else the checkout's
/// `target/tools/kubernetes/bin` (a link to the machine cache), else the
/// machine cache itself; etcd: `$TLSMESH_ETCD`, else `/usr/bin/etcd`.
/// Panics, saying what to run, when one is missing.
pub fn binaries() -> Binaries {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(d) = std::env::var_os("TLSMESH_KUBE_BIN") {
        dirs.push(d.into());
    }
    dirs.push(workspace_root().join("target/tools/kubernetes/bin"));
    dirs.push(MACHINE_CACHE.into());
    let find = |name: &str| {
        dirs.iter()
            .map(|d| d.join(name))
            .find(|p| p.is_file())
            .unwrap_or_else(|| missing(name, &dirs))
    };
    let etcd: PathBuf =
        std::env::var_os("TLSMESH_ETCD").map_or_else(|| "/usr/bin/etcd".into(), Into::into);
    if !etcd.is_file() {
        missing("etcd (Debian package etcd-server)", &[etcd]);
    }
    Binaries {
        etcd,
        kube_apiserver: find("kube-apiserver"),
        kube_controller_manager: find("kube-controller-manager"),
    }
}

/// How many instances may run at once in one test process:
/// `$TLSMESH_KUBE_PARALLEL`, default 2.
pub fn parallel() -> usize {
    std::env::var("TLSMESH_KUBE_PARALLEL").ok().and_then(|v| v.parse().ok()).unwrap_or(2).max(1)
}

fn slots() -> &'static Semaphore {
    static SLOTS: OnceLock<Semaphore> = OnceLock::new();
    SLOTS.get_or_init(|| Semaphore::new(parallel()))
}

struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &'static str, bin: &Path, args: &[String], dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out =
            File::create(&log).unwrap_or_else(|e| panic!("cannot create {}: {e}", log.display()));
        let err = out.try_clone().expect("dup the log file");
        let mut cmd = Command::new(bin);
        cmd.args(args).current_dir(dir).stdin(Stdio::null()).stdout(out).stderr(err);
        // SAFETY: the closure runs in the forked child before exec and makes
        // one prctl(2) call, which is async-signal-safe; it touches no memory
        // of the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)
            });
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
        Proc { name, child, log }
    }

    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(format!("{} exited ({st})", self.name)),
            Ok(None) => None,
            Err(e) => Some(format!("{}: wait failed: {e}", self.name)),
        }
    }

    fn tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// SIGTERM, then SIGKILL after [`STOP_GRACE`]; only this child's PID.
    fn stop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        let pid = Pid::from_raw(i32::try_from(self.child.id()).expect("PIDs fit in i32"));
        let _ = kill(pid, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One running control plane; see the crate documentation.
pub struct ControlPlane {
    dir: PathBuf,
    url: String,
    kubeconfig: PathBuf,
    client: Client,
    /// kube-controller-manager, kube-apiserver, etcd: stopped in this order.
    procs: Vec<Proc>,
    startup: Duration,
    /// Held while running: see [`parallel`].
    slot: Option<SemaphorePermit<'static>>,
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.url)
            .field("dir", &self.dir)
            .field("pids", &self.pids())
            .finish_non_exhaustive()
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral loopback port")
        .port()
}

fn instance_dir() -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    // etcd fsyncs on every write; on tmpfs that costs nothing.
    let base = Path::new("/dev/shm");
    let base = if base.is_dir() { base.to_path_buf() } else { std::env::temp_dir() };
    let dir = base.join(format!(
        "tlsmesh-kube-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A kubeconfig for `server` with the given user section.
fn kubeconfig_text(url: &str, ca: &Path, user: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    \
         certificate-authority: {ca}\ncontexts:\n- name: test\n  context:\n    cluster: test\n    \
         user: test\n    namespace: default\ncurrent-context: test\nusers:\n- name: test\n  user:\n{user}",
        ca = ca.display()
    )
}

/// A kube client from a kubeconfig file.
pub async fn client_from_kubeconfig(path: &Path) -> Client {
    let kc = Kubeconfig::read_from(path)
        .unwrap_or_else(|e| panic!("cannot read kubeconfig {}: {e}", path.display()));
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .unwrap_or_else(|e| panic!("bad kubeconfig {}: {e}", path.display()));
    Client::try_from(config).unwrap_or_else(|e| panic!("cannot build a kube client: {e}"))
}

/// Why one start attempt failed.
struct StartFailure {
    message: String,
    /// Another attempt on other ports may succeed (a port was taken).
    retry: bool,
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver and kube-controller-manager and waits
    /// until they serve (bounded: panics with the logs after 90 s).
    pub async fn start() -> ControlPlane {
        Self::start_with_apiserver_args(&[]).await
    }

    /// [`ControlPlane::start`] with extra kube-apiserver flags, e.g.
    /// `--runtime-config=discovery.k8s.io/v1beta1=false` to take an API
    /// version away.
    pub async fn start_with_apiserver_args(extra: &[&str]) -> ControlPlane {
        let bins = binaries();
        let slot = slots().acquire().await.expect("the slot semaphore is never closed");
        let mut attempt = 1;
        loop {
            match Self::try_start(&bins, extra).await {
                Ok(mut cp) => {
                    cp.slot = Some(slot);
                    return cp;
                }
                Err(StartFailure { message, retry }) => {
                    assert!(
                        retry && attempt < START_ATTEMPTS,
                        "the Kubernetes control plane did not start (attempt {attempt}): {message}"
                    );
                    attempt += 1;
                }
            }
        }
    }

    async fn try_start(bins: &Binaries, extra: &[&str]) -> Result<ControlPlane, StartFailure> {
        let t0 = Instant::now();
        let dir = instance_dir();
        pki::generate(&dir);
        let p = |name: &str| dir.join(name).display().to_string();
        let (etcd_client, etcd_peer, secure) = (free_port(), free_port(), free_port());
        let url = format!("https://127.0.0.1:{secure}");
        let admin_user = format!(
            "    client-certificate: {}\n    client-key: {}\n",
            p(pki::ADMIN_CERT),
            p(pki::ADMIN_KEY)
        );
        let kubeconfig = dir.join("admin.kubeconfig");
        fs::write(&kubeconfig, kubeconfig_text(&url, &dir.join(pki::SERVER_CA), &admin_user))
            .expect("write the admin kubeconfig");

        let mut cp = ControlPlane {
            client: client_from_kubeconfig(&kubeconfig).await,
            dir: dir.clone(),
            url,
            kubeconfig,
            procs: Vec::new(),
            startup: Duration::ZERO,
            slot: None,
        };

        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let etcd_args = [
            "--name=default".to_owned(),
            format!("--data-dir={}", p("etcd")),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=default={peer_url}"),
            "--logger=zap".to_owned(),
            "--log-level=warn".to_owned(),
        ];
        cp.procs.push(Proc::spawn("etcd", &bins.etcd, &etcd_args, &dir));

        let mut apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            format!("--secure-port={secure}"),
            format!("--tls-cert-file={}", p(pki::SERVER_CERT)),
            format!("--tls-private-key-file={}", p(pki::SERVER_KEY)),
            format!("--client-ca-file={}", p(pki::CLIENT_CA)),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
            format!("--service-account-key-file={}", p(pki::SA_PUB)),
            format!("--service-account-signing-key-file={}", p(pki::SA_KEY)),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
            "--authorization-mode=RBAC".to_owned(),
            // Else it tries to publish 127.0.0.1 as the `kubernetes` endpoint
            // and logs an error every 10 s.
            "--endpoint-reconciler-type=none".to_owned(),
            format!("--cert-dir={}", p("apiserver-certs")),
            "--allow-privileged=true".to_owned(),
            "--profiling=false".to_owned(),
        ];
        apiserver_args.extend(extra.iter().map(|a| (*a).to_owned()));
        cp.procs
            .insert(0, Proc::spawn("kube-apiserver", &bins.kube_apiserver, &apiserver_args, &dir));

        if let Err(m) = cp.wait_ready().await {
            return Err(cp.failed(&m));
        }

        // Started only now: in 1.20 it gives up (exits) if the API server
        // is not healthy within 10 s.
        let kcm_args = [
            format!("--kubeconfig={}", cp.kubeconfig.display()),
            "--leader-elect=false".to_owned(),
            "--port=0".to_owned(),
            "--secure-port=0".to_owned(),
            format!("--service-account-private-key-file={}", p(pki::SA_KEY)),
            format!("--root-ca-file={}", p(pki::SERVER_CA)),
            format!("--cluster-signing-cert-file={}", p(pki::CLIENT_CA)),
            format!("--cluster-signing-key-file={}", p(pki::CLIENT_CA_KEY)),
            format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        ];
        cp.procs.insert(
            0,
            Proc::spawn("kube-controller-manager", &bins.kube_controller_manager, &kcm_args, &dir),
        );
        if let Err(m) = cp.wait_controllers().await {
            return Err(cp.failed(&m));
        }
        cp.startup = t0.elapsed();
        Ok(cp)
    }

    /// Stops what this attempt started; the directory goes with `self`.
    fn failed(&mut self, message: &str) -> StartFailure {
        let logs = self.tails(25);
        let retry = logs.contains("address already in use");
        self.stop_all();
        StartFailure { message: format!("{message}\n{logs}"), retry }
    }

    fn check_alive(&mut self) -> Result<(), String> {
        for p in &mut self.procs {
            if let Some(why) = p.exited() {
                return Err(why);
            }
        }
        Ok(())
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last;
        loop {
            self.check_alive()?;
            let req = http::Request::get("/readyz").body(Vec::new()).expect("a valid request");
            match self.client.request_text(req).await {
                Ok(body) if body.trim() == "ok" => return Ok(()),
                Ok(body) => last = body,
                Err(e) => last = e.to_string(),
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "kube-apiserver at {} not ready after {READY_TIMEOUT:?}: {last}",
                    self.url
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn wait_controllers(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), "default");
        loop {
            self.check_alive()?;
            if let Ok(Some(sa)) = sas.get_opt("default").await {
                if sa.secrets.is_some_and(|s| !s.is_empty()) {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "kube-controller-manager did not create default/default's ServiceAccount token within {READY_TIMEOUT:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// An admin client (`O=system:masters`).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The admin kubeconfig (certificate and key files next to it).
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The API server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("the URL ends in a port")
    }

    /// The CA that signed the API server's serving certificate (PEM file).
    pub fn server_ca(&self) -> PathBuf {
        self.dir.join(pki::SERVER_CA)
    }

    /// How long [`ControlPlane::start`] took for this instance.
    pub fn startup(&self) -> Duration {
        self.startup
    }

    /// PIDs of kube-controller-manager, kube-apiserver and etcd.
    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.child.id()).collect()
    }

    /// This instance's directory (PKI, logs, etcd data).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Writes a kubeconfig that authenticates with a bearer `token` (e.g.
    /// a `ServiceAccount`'s) and returns its path.
    pub fn kubeconfig_for_token(&self, name: &str, token: &str) -> PathBuf {
        let path = self.dir.join(format!("{name}.kubeconfig"));
        let user = format!("    token: {token}\n");
        fs::write(&path, kubeconfig_text(&self.url, &self.server_ca(), &user))
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
        path
    }

    /// A client that authenticates with a bearer `token`.
    pub async fn client_for_token(&self, name: &str, token: &str) -> Client {
        client_from_kubeconfig(&self.kubeconfig_for_token(name, token)).await
    }

    /// Waits (≤ 60 s) for the controller-manager's token controller to
    /// give `namespace/name` its legacy token `Secret`, and returns the token.
    pub async fn service_account_token(&self, namespace: &str, name: &str) -> String {
        let sas: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sa = sas.get_opt(name).await.ok().flatten();
            for r in sa.and_then(|s| s.secrets).unwrap_or_default() {
                let Some(secret) = r.name else { continue };
                let token = secrets
                    .get_opt(&secret)
                    .await
                    .ok()
                    .flatten()
                    .and_then(|s| s.data.and_then(|d| d.get("token").map(|t| t.0.clone())));
                if let Some(t) = token {
                    return String::from_utf8(t).expect("a token is ASCII");
                }
            }
            assert!(
                Instant::now() < deadline,
                "no token Secret for ServiceAccount {namespace}/{name} after 60 s (is kube-controller-manager's token controller running? log:\n{})",
                self.tails(20)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The last `lines` of every process's log.
    pub fn tails(&self, lines: usize) -> String {
        self.procs
            .iter()
            .map(|p| format!("--- {} ({}) ---\n{}", p.name, p.log.display(), p.tail(lines)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn stop_all(&mut self) {
        for p in &mut self.procs {
            p.stop();
        }
        self.procs.clear();
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "tlsmesh-kube-harness: test panicked; control plane logs ({}):\n{}",
                self.url,
                self.tails(30)
            );
        }
        self.stop_all();
        if std::env::var_os("TLSMESH_KUBE_KEEP").is_some() {
            eprintln!("tlsmesh-kube-harness: kept {} (TLSMESH_KUBE_KEEP)", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}
