//! The CNI side: what the plugin does for each `CNI_COMMAND`, as a function
//! of its environment, its stdin and the daemon's answer ([`run`]). The
//! socket is behind the [`Daemon`] trait, so every decision is tested
//! without one; `main.rs` only gathers the process's inputs.
//!
//! Behaviour (CNI spec 1.0/1.1, chained after the main network plugin):
//!
//! | command | does |
//! |---|---|
//! | `ADD` | asks the daemon to enroll the pod and waits for its answer; prints `prevResult` unchanged |
//! | `DEL` | tells the daemon (best effort, short timeout); always succeeds |
//! | `CHECK`, `GC`, `STATUS` | validate the config; succeed |
//! | `VERSION` | prints the supported versions |
//!
//! When the daemon cannot be reached on `ADD` the plugin fails the sandbox
//! (code 999) unless the config says `"failOpen": true`: the plugin cannot
//! know whether the pod's namespace is enrolled, and a pod that should be
//! protected must not start unprotected. The runtime retries the sandbox, so
//! the pod starts once the daemon is back.

use std::{
    collections::HashMap,
    fmt,
    hash::BuildHasher,
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::Deserialize;
use serde_json::{json, Value};

use crate::protocol::{Command, Request, Response, DEFAULT_SOCKET, PROTOCOL_VERSION};

/// CNI versions this plugin accepts. It never changes the result, so every
/// result format since 0.3.0 passes through as it came.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];

/// The plugin's `type` in a network configuration list.
pub const PLUGIN_TYPE: &str = "tlsmesh-cni";

/// Default time to wait for the daemon's answer on ADD.
pub const DEFAULT_TIMEOUT_SECONDS: u64 = 20;

/// Longest wait for the daemon on DEL: teardown must not hang on us.
const DEL_TIMEOUT: Duration = Duration::from_secs(3);

/// CNI well-known error codes (spec §"Error") and ours (100 and up).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// The daemon answered with an error: it knows the pod needs enrolling
    /// and could not do it.
    pub const DAEMON_REFUSED: u32 = 101;
    /// The daemon could not be reached or did not answer in time.
    pub const DAEMON_UNREACHABLE: u32 = 999;
}

/// The plugin's own entry in the network configuration list.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// `cniVersion` of the list.
    pub cni_version: String,
    /// Network name.
    #[serde(default)]
    pub name: String,
    /// The daemon's socket (a host path).
    #[serde(default = "default_socket")]
    pub socket_path: PathBuf,
    /// Let pods start when the daemon cannot be reached (they may then run
    /// unprotected until the daemon comes back and enrolls them).
    #[serde(default)]
    pub fail_open: bool,
    /// How long to wait for the daemon's answer on ADD.
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// Pods of these namespaces are left alone without asking the daemon
    /// (as Istio's `exclude_namespaces`): tlsmesh's own namespace, whose CA
    /// must start before any daemon can join it, and `kube-system`.
    #[serde(default = "default_excluded")]
    pub exclude_namespaces: Vec<String>,
    /// The result of the plugins before this one.
    #[serde(default)]
    pub prev_result: Option<Value>,
}

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECONDS
}

fn default_excluded() -> Vec<String> {
    vec!["kube-system".to_owned()]
}

/// Why the daemon gave no answer.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// Connecting failed (no socket, nobody listening).
    #[error("{0}")]
    Unreachable(std::io::Error),
    /// Connected, but no complete answer in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Answered something that is not a response.
    #[error("unintelligible answer: {0}")]
    Protocol(String),
}

/// Talks to the daemon: one request, one response.
pub trait Daemon {
    /// Sends `req` to the daemon at `socket` and waits up to `timeout`.
    fn call(
        &mut self,
        socket: &Path,
        req: &Request,
        timeout: Duration,
    ) -> Result<Response, DaemonError>;
}

/// What the process prints and how it exits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Written to stdout (a result, a version answer or an error object).
    pub stdout: String,
    /// Written to stderr (a human line for the runtime's log), may be empty.
    pub stderr: String,
    /// Process exit code.
    pub exit_code: i32,
}

impl Outcome {
    fn ok(stdout: String, stderr: String) -> Self {
        Self { stdout, stderr, exit_code: 0 }
    }
}

/// A CNI error result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// Error code.
    pub code: u32,
    /// Short message.
    pub msg: String,
    /// Longer explanation.
    pub details: String,
}

impl CniError {
    fn new(code: u32, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self { code, msg: msg.into(), details: details.into() }
    }

    /// The error object the spec asks for on stdout.
    pub fn to_json(&self, cni_version: &str) -> String {
        json!({ "cniVersion": cni_version, "code": self.code, "msg": self.msg, "details": self.details })
            .to_string()
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tlsmesh-cni error {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

/// Parses `CNI_ARGS` (`K=V;K=V`).
pub fn parse_cni_args(args: &str) -> HashMap<String, String> {
    args.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The pod addresses in a CNI result (`ips[].address` is `addr/prefix`).
pub fn result_ips(result: &Value) -> Vec<IpAddr> {
    let Some(ips) = result.get("ips").and_then(Value::as_array) else { return Vec::new() };
    ips.iter()
        .filter_map(|ip| ip.get("address")?.as_str())
        .filter_map(|a| a.split('/').next()?.parse().ok())
        .collect()
}

/// Runs one plugin invocation. `env` holds the `CNI_*` variables.
pub fn run<S: BuildHasher>(
    env: &HashMap<String, String, S>,
    stdin: &[u8],
    daemon: &mut dyn Daemon,
) -> Outcome {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or_default();
    if command == "VERSION" {
        return version(stdin);
    }
    let conf = match parse_conf(stdin) {
        Ok(c) => c,
        // DEL must succeed whatever happens: a failing DEL blocks the
        // sandbox's teardown forever.
        Err(_) if command == "DEL" => return Outcome::ok(String::new(), String::new()),
        Err(e) => return fail(&e, version_of(stdin).as_deref().unwrap_or("1.0.0")),
    };
    match command {
        "ADD" => add(env, &conf, daemon),
        "DEL" => del(env, &conf, daemon),
        "CHECK" | "GC" | "STATUS" => Outcome::ok(String::new(), String::new()),
        other => fail(
            &CniError::new(
                code::INVALID_ENV,
                format!("unknown CNI_COMMAND {other:?}"),
                "expected ADD, DEL, CHECK, GC, STATUS or VERSION",
            ),
            &conf.cni_version,
        ),
    }
}

fn fail(e: &CniError, cni_version: &str) -> Outcome {
    Outcome { stdout: e.to_json(cni_version), stderr: e.to_string(), exit_code: 1 }
}

fn version_of(stdin: &[u8]) -> Option<String> {
    let v: Value = serde_json::from_slice(stdin).ok()?;
    v.get("cniVersion")?.as_str().map(str::to_owned)
}

fn version(stdin: &[u8]) -> Outcome {
    let asked = version_of(stdin).filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()));
    let out = json!({
        "cniVersion": asked.as_deref().unwrap_or("1.0.0"),
        "supportedVersions": SUPPORTED_VERSIONS,
    });
    Outcome::ok(out.to_string(), String::new())
}

fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let conf: NetConf = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE,
            "cannot decode the network configuration on stdin",
            e.to_string(),
        )
    })?;
    if !SUPPORTED_VERSIONS.contains(&conf.cni_version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!("CNI version {} is not supported", conf.cni_version),
            format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        ));
    }
    Ok(conf)
}

/// The pod the runtime is working on, from the environment.
struct Invocation {
    container_id: String,
    netns: Option<String>,
    ifname: String,
    namespace: Option<String>,
    name: Option<String>,
    uid: Option<String>,
}

fn invocation<S: BuildHasher>(env: &HashMap<String, String, S>) -> Invocation {
    let get = |k: &str| env.get(k).filter(|v| !v.is_empty()).cloned();
    let args = parse_cni_args(env.get("CNI_ARGS").map(String::as_str).unwrap_or_default());
    let arg = |k: &str| args.get(k).filter(|v| !v.is_empty()).cloned();
    Invocation {
        container_id: get("CNI_CONTAINERID").unwrap_or_default(),
        netns: get("CNI_NETNS"),
        ifname: get("CNI_IFNAME").unwrap_or_default(),
        namespace: arg("K8S_POD_NAMESPACE"),
        name: arg("K8S_POD_NAME"),
        uid: arg("K8S_POD_UID"),
    }
}

fn request(command: Command, inv: &Invocation, ns: &str, name: &str, ips: Vec<IpAddr>) -> Request {
    Request {
        version: PROTOCOL_VERSION,
        command,
        container_id: inv.container_id.clone(),
        netns: inv.netns.clone(),
        ifname: inv.ifname.clone(),
        pod_namespace: ns.to_owned(),
        pod_name: name.to_owned(),
        pod_uid: inv.uid.clone(),
        ips,
    }
}

/// The result to print: `prevResult` unchanged; its `cniVersion` is filled
/// in from the config only when a runtime left it out.
fn pass_through(conf: &NetConf, prev: &Value) -> String {
    let mut out = prev.clone();
    if let Some(obj) = out.as_object_mut() {
        obj.entry("cniVersion").or_insert_with(|| Value::String(conf.cni_version.clone()));
    }
    out.to_string()
}

fn add<S: BuildHasher>(
    env: &HashMap<String, String, S>,
    conf: &NetConf,
    daemon: &mut dyn Daemon,
) -> Outcome {
    let Some(prev) = conf.prev_result.as_ref() else {
        return fail(
            &CniError::new(
                code::INVALID_CONFIG,
                "tlsmesh-cni is a chained plugin and got no prevResult",
                "list it after the main network plugin in the .conflist (`tlsmesh-cni install` does that)",
            ),
            &conf.cni_version,
        );
    };
    let inv = invocation(env);
    if inv.container_id.is_empty() {
        return fail(
            &CniError::new(code::INVALID_ENV, "CNI_CONTAINERID is not set", ""),
            &conf.cni_version,
        );
    }
    let (Some(ns), Some(name)) = (inv.namespace.as_deref(), inv.name.as_deref()) else {
        // Not a Kubernetes pod (no K8S_POD_* in CNI_ARGS): nothing to enroll.
        return Outcome::ok(
            pass_through(conf, prev),
            format!("tlsmesh-cni: sandbox {} is not a Kubernetes pod (no K8S_POD_NAME in CNI_ARGS); left alone", inv.container_id),
        );
    };
    if conf.exclude_namespaces.iter().any(|x| x == ns) {
        return Outcome::ok(
            pass_through(conf, prev),
            format!("tlsmesh-cni: pod {ns}/{name}: namespace {ns} is excluded (excludeNamespaces); left alone"),
        );
    }
    let req = request(Command::Add, &inv, ns, name, result_ips(prev));
    let timeout = Duration::from_secs(conf.timeout_seconds.max(1));
    let socket = conf.socket_path.display();
    match daemon.call(&conf.socket_path, &req, timeout) {
        Ok(Response::Enrolled { mode }) => {
            Outcome::ok(pass_through(conf, prev), format!("tlsmesh-cni: pod {ns}/{name} enrolled ({mode})"))
        }
        Ok(Response::NotEnrolled { reason }) => {
            Outcome::ok(pass_through(conf, prev), format!("tlsmesh-cni: pod {ns}/{name} not enrolled: {reason}"))
        }
        Ok(Response::Error { message }) => fail(
            &CniError::new(
                code::DAEMON_REFUSED,
                format!("tlsmesh daemon could not enroll pod {ns}/{name}: {message}"),
                "the pod needs tlsmesh protection and the daemon failed to set it up; see the tlsmesh DaemonSet pod's log on this node",
            ),
            &conf.cni_version,
        ),
        Ok(Response::Ok) => fail(
            &CniError::new(
                code::DAEMON_REFUSED,
                format!("tlsmesh daemon at {socket} answered ADD for {ns}/{name} with a DEL acknowledgement"),
                "plugin and daemon versions disagree; upgrade them together",
            ),
            &conf.cni_version,
        ),
        Err(e) if conf.fail_open => Outcome::ok(
            pass_through(conf, prev),
            format!(
                "tlsmesh-cni: WARNING: tlsmesh daemon not reachable at {socket} ({e}); failOpen is set, so pod {ns}/{name} starts and may run unprotected until the daemon enrolls it"
            ),
        ),
        Err(e) => {
            let msg = match &e {
                DaemonError::Timeout(_) => format!("tlsmesh daemon at {socket} did not answer in time; pod would run unprotected"),
                _ => format!("tlsmesh daemon not reachable at {socket}; pod would run unprotected"),
            };
            fail(
                &CniError::new(
                    code::DAEMON_UNREACHABLE,
                    msg,
                    format!(
                        "{e}. Is the tlsmesh DaemonSet pod running on this node? The runtime retries the sandbox; set \"failOpen\": true in the tlsmesh-cni config to let pods start without it"
                    ),
                ),
                &conf.cni_version,
            )
        }
    }
}

fn del<S: BuildHasher>(
    env: &HashMap<String, String, S>,
    conf: &NetConf,
    daemon: &mut dyn Daemon,
) -> Outcome {
    let inv = invocation(env);
    let (Some(ns), Some(name)) = (inv.namespace.as_deref(), inv.name.as_deref()) else {
        return Outcome::ok(String::new(), String::new());
    };
    let req = request(Command::Del, &inv, ns, name, Vec::new());
    let timeout = Duration::from_secs(conf.timeout_seconds.max(1)).min(DEL_TIMEOUT);
    let stderr = match daemon.call(&conf.socket_path, &req, timeout) {
        Ok(_) => String::new(),
        Err(e) => format!(
            "tlsmesh-cni: could not tell the daemon at {} that pod {ns}/{name} is gone ({e}); it notices on its own",
            conf.socket_path.display()
        ),
    };
    Outcome::ok(String::new(), stderr)
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake {
        answer: Option<Response>,
        seen: Vec<Request>,
    }

    impl Daemon for Fake {
        fn call(&mut self, _: &Path, req: &Request, _: Duration) -> Result<Response, DaemonError> {
            self.seen.push(req.clone());
            self.answer.clone().ok_or_else(|| {
                DaemonError::Unreachable(std::io::Error::from(
                    std::io::ErrorKind::ConnectionRefused,
                ))
            })
        }
    }

    fn env(cmd: &str) -> HashMap<String, String> {
        [
            ("CNI_COMMAND", cmd),
            ("CNI_CONTAINERID", "abc"),
            ("CNI_NETNS", "/var/run/netns/cni-1"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web;K8S_POD_UID=u1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    const CONF: &str = r#"{"cniVersion":"1.0.0","name":"k8s","type":"tlsmesh-cni",
        "prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/cni-1"}],
        "ips":[{"address":"10.244.1.5/24","interface":0},{"address":"fd00::5/64","interface":0}]}}"#;

    #[test]
    fn add_sends_the_pod_and_passes_prev_result_through() {
        let mut d =
            Fake { answer: Some(Response::Enrolled { mode: "strict".into() }), seen: vec![] };
        let out = run(&env("ADD"), CONF.as_bytes(), &mut d);
        assert_eq!(out.exit_code, 0, "{out:?}");
        let printed: Value = serde_json::from_str(&out.stdout).unwrap();
        let conf: Value = serde_json::from_str(CONF).unwrap();
        assert_eq!(printed, conf["prevResult"]);
        let req = &d.seen[0];
        assert_eq!(req.pod_key(), "shop/web");
        assert_eq!(req.pod_uid.as_deref(), Some("u1"));
        assert_eq!(req.netns.as_deref(), Some("/var/run/netns/cni-1"));
        assert_eq!(req.ips, ["10.244.1.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
    }

    #[test]
    fn daemon_down_fails_closed_or_open() {
        let mut d = Fake { answer: None, seen: vec![] };
        let out = run(&env("ADD"), CONF.as_bytes(), &mut d);
        assert_eq!(out.exit_code, 1);
        let e: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(e["code"], 999);
        assert_eq!(e["cniVersion"], "1.0.0");
        assert!(e["msg"].as_str().unwrap().contains(DEFAULT_SOCKET), "{e}");
        let open = CONF.replacen('{', r#"{"failOpen":true,"#, 1);
        let out = run(&env("ADD"), open.as_bytes(), &mut d);
        assert_eq!(out.exit_code, 0);
        assert!(out.stderr.contains("WARNING"));
    }

    #[test]
    fn excluded_namespaces_pass_without_asking_the_daemon() {
        // The daemon is down: an excluded namespace's pod still starts (the
        // CA in tlsmesh's own namespace must, before any daemon can join it).
        let mut d = Fake { answer: None, seen: vec![] };
        let conf = CONF.replacen('{', r#"{"excludeNamespaces":["tlsmesh-system","shop"],"#, 1);
        let out = run(&env("ADD"), conf.as_bytes(), &mut d);
        assert_eq!(out.exit_code, 0, "{out:?}");
        assert!(d.seen.is_empty(), "the daemon was not asked");
        assert!(out.stderr.contains("excluded"), "{out:?}");
        // Not excluded (the default is kube-system only): fails closed as before.
        let out = run(&env("ADD"), CONF.as_bytes(), &mut d);
        assert_eq!(out.exit_code, 1);
    }

    #[test]
    fn daemon_error_fails_even_when_fail_open() {
        let mut d =
            Fake { answer: Some(Response::Error { message: "no netns".into() }), seen: vec![] };
        let open = CONF.replacen('{', r#"{"failOpen":true,"#, 1);
        let out = run(&env("ADD"), open.as_bytes(), &mut d);
        assert_eq!(out.exit_code, 1);
        assert!(out.stdout.contains("\"code\":101"), "{}", out.stdout);
    }

    #[test]
    fn del_always_succeeds() {
        let mut d = Fake { answer: None, seen: vec![] };
        let out = run(&env("DEL"), CONF.as_bytes(), &mut d);
        assert_eq!((out.exit_code, out.stdout.as_str()), (0, ""));
        assert_eq!(d.seen[0].command, Command::Del);
        let out = run(&env("DEL"), b"not json", &mut d);
        assert_eq!(out.exit_code, 0);
    }

    #[test]
    fn config_errors() {
        let mut d = Fake { answer: None, seen: vec![] };
        let out = run(&env("ADD"), br#"{"cniVersion":"9.9.9"}"#, &mut d);
        assert!(out.stdout.contains("\"code\":1,"), "{}", out.stdout);
        let out = run(&env("ADD"), br#"{"cniVersion":"1.0.0","name":"x"}"#, &mut d);
        assert!(out.stdout.contains("no prevResult"), "{}", out.stdout);
        let out = run(&env("ADD"), b"{", &mut d);
        assert!(out.stdout.contains("\"code\":6"), "{}", out.stdout);
        assert!(d.seen.is_empty());
    }

    #[test]
    fn version_and_non_pods() {
        let mut d = Fake { answer: None, seen: vec![] };
        let out = run(&env("VERSION"), br#"{"cniVersion":"0.4.0"}"#, &mut d);
        let v: Value = serde_json::from_str(&out.stdout).unwrap();
        assert_eq!(v["cniVersion"], "0.4.0");
        assert_eq!(v["supportedVersions"].as_array().unwrap().len(), SUPPORTED_VERSIONS.len());
        let mut e = env("ADD");
        e.insert("CNI_ARGS".into(), "IgnoreUnknown=1".into());
        let out = run(&e, CONF.as_bytes(), &mut d);
        assert_eq!(out.exit_code, 0);
        assert!(d.seen.is_empty(), "not a pod: the daemon is not asked");
    }
}
