//! The tlsmesh CNI plugin run the way a container runtime runs it (the
//! chained plugin after the pod network's), for tests and benchmarks in
//! the netns topology.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc as std_mpsc,
    time::Duration,
};

use serde_json::{json, Value};

use crate::{tlsmesh_bin, Pod};

/// The `tlsmesh-cni` binary beside `tlsmesh`.
pub fn cni_bin() -> PathBuf {
    let p = tlsmesh_bin().with_file_name("tlsmesh-cni");
    assert!(p.is_file(), "{} not found; build it with `cargo build -p tlsmesh-cni`", p.display());
    p
}

/// What one plugin run printed and returned.
#[derive(Debug)]
pub struct CniRun {
    /// Exit code.
    pub code: Option<i32>,
    /// Standard output (the result or error JSON).
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// The previous plugin's result for `pod` (its interfaces and addresses).
pub fn prev_result(pod: &Pod) -> Value {
    let nn = pod.node + 1;
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pod.netns_path()}],
        "ips": [
            {"address": format!("{}/24", pod.ip4), "gateway": format!("10.77.{nn}.1"), "interface": 0},
            {"address": format!("{}/64", pod.ip6), "gateway": format!("fd77:{nn:x}::1"), "interface": 0},
        ],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dns": {}
    })
}

/// `CNI_COMMAND=ADD` for `ns/pod` (API object `uid`) against the daemon
/// socket `socket`, in the pod's own netns.
pub fn cni_add(socket: &Path, ns: &str, pod: &Pod, uid: &str) -> CniRun {
    let sandbox = format!("sandbox-{}", pod.name);
    cni_add_sandbox(socket, ns, pod, &pod.netns_path(), &sandbox, uid)
}

/// ADD for `ns/pod` with a given sandbox netns, container id and pod uid.
pub fn cni_add_sandbox(
    socket: &Path,
    ns: &str,
    pod: &Pod,
    netns: &Path,
    sandbox: &str,
    uid: &str,
) -> CniRun {
    let conf = json!({
        "cniVersion": "1.0.0",
        "name": "k8s-pod-network",
        "type": "tlsmesh-cni",
        "socketPath": socket,
        "timeoutSeconds": 30,
        "prevResult": prev_result(pod),
    });
    let mut child = Command::new(cni_bin())
        .env_clear()
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", sandbox)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={ns};K8S_POD_NAME={};K8S_POD_UID={uid}",
                pod.name
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tlsmesh-cni");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(conf.to_string().as_bytes())
        .expect("write config");
    let pid = child.id();
    let (tx, rx) = std_mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let Ok(out) = rx.recv_timeout(Duration::from_secs(45)) else {
        // Only the plugin process this function started.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")),
            nix::sys::signal::Signal::SIGKILL,
        );
        panic!("tlsmesh-cni ADD for {ns}/{} did not finish within 45 s", pod.name);
    };
    let out = out.expect("tlsmesh-cni output");
    CniRun {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}
