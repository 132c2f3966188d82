//! The local cluster for real (`scripts/cluster.sh`, `cargo xtask cluster`):
//! a control plane and two nodes, each a network namespace with its own
//! containerd, kubelet, kube-proxy and bridge CNI, all Kubernetes v1.20.2
//! built from Debian's source package. The test brings the cluster up,
//! checks that both nodes are Ready, runs a server pod on one node and a
//! client pod on the other, and checks what the client got back: the server
//! pod's name and the client pod's own address — over the pod network
//! across the node-to-node bridge and through a Service's `ClusterIP`
//! (kube-proxy's rules in the client's node). Then tlsmesh is installed with
//! Helm (`install`, the image built from this build's binaries) and every
//! step of `scripts/cluster.sh demo` is asserted: mTLS across nodes with no
//! plaintext on the link, the client's own address at the server, the CNI
//! hook, a strict pod refusing a plaintext one, a running pod enrolled
//! without a restart, a `DaemonSet` rollout (docs/CLUSTER.md). Then `down`, and the test
//! checks itself that nothing is left: processes, netns, links, cgroups,
//! the state directory and the mount points `up` made.
//!
//! The cluster has fixed names and addresses (netns `tmc-n1`/`tmc-n2`,
//! bridge `tmc0`, 172.30.0.0/24): a cluster a user brought up is not
//! touched — the test fails and says so.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::{Namespace, Node, Pod, Service};
use kube::{
    api::{DeleteParams, LogParams, PostParams},
    Api, Client,
};
use netkit::require_root;
use serde_json::json;

const STATE_DIR: &str = "/var/lib/tlsmesh-cluster";
const NODES: [&str; 2] = ["tmc-n1", "tmc-n2"];
const BUSYBOX: &str = "tlsmesh.local/busybox:1.35";
const WAIT: Duration = Duration::from_secs(90);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn cluster(action: &str) -> Result<String, String> {
    cluster_with(action, &[])
}

fn cluster_with(action: &str, env: &[(&str, &Path)]) -> Result<String, String> {
    let out = Command::new("bash")
        .arg(repo().join("scripts/cluster.sh"))
        .arg(action)
        .envs(env.iter().map(|(k, v)| (*k, *v)))
        .current_dir(repo())
        .output()
        .map_err(|e| format!("cannot run scripts/cluster.sh {action}: {e}"))?;
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(text)
    } else {
        Err(format!("scripts/cluster.sh {action} failed ({}):\n{text}", out.status))
    }
}

/// Takes the cluster down when the test ends, also when it panics (then the
/// tail of the components' logs is printed first).
struct Down {
    done: bool,
}

impl Down {
    fn now(&mut self) -> Result<String, String> {
        self.done = true;
        cluster("down")
    }
}

impl Drop for Down {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if std::thread::panicking() {
            if let Ok(entries) = std::fs::read_dir(Path::new(STATE_DIR).join("logs")) {
                for e in entries.flatten() {
                    let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(15).collect();
                    eprintln!("--- {} ---", e.path().display());
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
        if let Err(e) = cluster("down") {
            eprintln!("{e}");
        }
    }
}

/// The text without terminal colour sequences (`ESC [ … m`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn ready(node: &Node) -> bool {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

async fn wait_pod(pods: &Api<Pod>, name: &str, phases: &[&str]) -> Pod {
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    loop {
        if let Ok(p) = pods.get(name).await {
            let phase = p.status.as_ref().and_then(|s| s.phase.clone()).unwrap_or_default();
            if phases.contains(&phase.as_str()) {
                return p;
            }
            last = format!("{phase} {:?}", p.status.as_ref().map(|s| &s.container_statuses));
        }
        assert!(Instant::now() < deadline, "pod {name} not {phases:?} within {WAIT:?}: {last}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn pod_ip(p: &Pod) -> String {
    p.status.as_ref().and_then(|s| s.pod_ip.clone()).expect("a running pod has an address")
}

fn busybox_pod(name: &str, node: &str, restart: &str, command: &[&str]) -> Pod {
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {
            "nodeName": node,
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "main", "image": BUSYBOX, "command": command}]
        }
    }))
    .expect("a valid pod")
}

fn left_behind() -> Vec<String> {
    let mut left = Vec::new();
    if Path::new(STATE_DIR).exists() {
        left.push(format!("{STATE_DIR} exists"));
    }
    let netns = Command::new("ip").args(["netns", "list"]).output().expect("ip netns list");
    for n in NODES {
        if String::from_utf8_lossy(&netns.stdout).split_whitespace().any(|w| w == n) {
            left.push(format!("netns {n}"));
        }
        for c in ["cpu", "memory", "pids", "cpuset", "systemd", "unified"] {
            let p = Path::new("/sys/fs/cgroup").join(c).join(n);
            if p.exists() {
                left.push(format!("cgroup {}", p.display()));
            }
        }
    }
    if Path::new("/sys/class/net/tmc0").exists() {
        left.push("link tmc0".into());
    }
    for p in ["/var/lib/kubelet", "/etc/cni", "/opt/cni", "/var/lib/cni"] {
        if Path::new(p).exists() {
            left.push(format!("{p} (made by up)"));
        }
    }
    if let Ok(procs) = std::fs::read_dir("/proc") {
        for e in procs.flatten() {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmd).contains(STATE_DIR) {
                left.push(format!("process {}", e.file_name().to_string_lossy()));
            }
        }
    }
    left
}

/// A server pod on node 1, a client pod on node 2 asking it by pod address
/// and by `ClusterIP`: the answers name the server and the client's address.
async fn pods_across_nodes(client: &Client) {
    let ns = format!("e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": ns}})).expect("a namespace"),
        )
        .await
        .expect("create the test namespace");
    // The namespace's `default` ServiceAccount (the controller-manager makes
    // it) must have its token Secret before a pod can be created in it: on
    // 1.20 the ServiceAccount admission refuses the pod until then ("No API
    // token found"), and the token controller adds it after the account.
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + WAIT;
    let has_token = |sa: &k8s_openapi::api::core::v1::ServiceAccount| {
        sa.secrets.as_ref().is_some_and(|s| !s.is_empty())
    };
    while !sas.get_opt("default").await.ok().flatten().is_some_and(|sa| has_token(&sa)) {
        assert!(Instant::now() < deadline, "no default ServiceAccount token in {ns}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    pods.create(
        &PostParams::default(),
        &busybox_pod("server", NODES[0], "Always", &["httpd", "-f", "-p", "8080", "-h", "/www"]),
    )
    .await
    .expect("create the server pod");
    let services: Api<Service> = Api::namespaced(client.clone(), &ns);
    let svc = services
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "server"},
                "spec": {"selector": {"app": "server"},
                         "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}
            }))
            .expect("a service"),
        )
        .await
        .expect("create the service");
    let cluster_ip = svc.spec.and_then(|s| s.cluster_ip).expect("the service got a ClusterIP");
    let server = wait_pod(&pods, "server", &["Running"]).await;
    let server_ip = pod_ip(&server);
    assert!(server_ip.starts_with("10.244.1."), "the server pod has node 1's range: {server_ip}");

    // The server pod answers the host too (routes to the pod ranges): the
    // pod is really serving before the client pod asks.
    let deadline = Instant::now() + WAIT;
    loop {
        let out = Command::new("busybox")
            .args(["nc", "-w", "2", &server_ip, "8080"])
            .stdin(std::process::Stdio::null())
            .output();
        if out.is_ok_and(|o| o.status.success()) {
            break;
        }
        assert!(Instant::now() < deadline, "the server pod at {server_ip}:8080 does not accept");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let script = format!("ask {server_ip} 8080; ask {cluster_ip} 80");
    pods.create(
        &PostParams::default(),
        &busybox_pod("client", NODES[1], "Never", &["sh", "-c", &script]),
    )
    .await
    .expect("create the client pod");
    let done = wait_pod(&pods, "client", &["Succeeded", "Failed"]).await;
    let client_ip = pod_ip(&done);
    assert!(client_ip.starts_with("10.244.2."), "the client pod has node 2's range: {client_ip}");
    let logs = pods.logs("client", &LogParams::default()).await.expect("the client pod's log");
    let want = format!("server [::ffff:{client_ip}]");
    let lines: Vec<&str> = logs.lines().collect();
    assert_eq!(
        lines,
        [want.as_str(), want.as_str()],
        "the client pod on {} reached the server pod on {} by pod address and by ClusterIP \
         {cluster_ip}, and the server saw the client pod's own address",
        NODES[1],
        NODES[0]
    );

    pods.delete("client", &DeleteParams::default()).await.expect("delete the client pod");
}

/// tlsmesh installed with Helm, then every step of the demo.
fn install_and_demo() {
    // tlsmesh installed as a user installs it (helm install of the chart,
    // the image built from the binaries of this build), then the demo's
    // steps on real pods, each asserted here.
    let bins = netkit::tlsmesh_bin().parent().expect("the binaries' directory").to_path_buf();
    assert!(bins.join("tlsmesh-cni").is_file(), "no tlsmesh-cni beside {}", bins.display());
    let out =
        cluster_with("install", &[("TLSMESH_BINARIES", &bins)]).unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("DaemonSet ready on 2 nodes, CA available"), "{out}");
    let t0 = Instant::now();
    let demo = cluster("demo");
    let text = match &demo {
        Ok(t) | Err(t) => strip_ansi(t),
    };
    eprintln!("demo in {:.0?}:\n{text}", t0.elapsed());
    let oks: Vec<&str> = text.lines().filter(|l| l.starts_with("demo: ok:")).collect();
    let fails: Vec<&str> = text.lines().filter(|l| l.starts_with("demo: FAIL:")).collect();
    assert!(fails.is_empty() && demo.is_ok(), "demo steps failed: {fails:#?}");
    for want in [
        "the server saw the client pod's own address",
        "found no plaintext request",
        "carried the client's first connection through the tunnel",
        "mTLS identities on tmc-n1: \"src_identity\":\"spiffe://cluster.local/ns/demo-strict/sa/default\"",
        "the strict server refused the plaintext connection",
        "the permissive server accepted it",
        "the capture does see plaintext",
        "enrolled the running pod demo-late/server",
        "now the plaintext client is refused",
        "the enrolled client gets through the tunnel",
        "same container, 0 restarts",
        "the DaemonSet rolled out on both nodes",
        "after the rollout a new client pod gets through the tunnel again",
    ] {
        assert!(oks.iter().any(|l| l.contains(want)), "no demo step says {want:?}; the steps: {oks:#?}");
    }
    // v1.20 has no DaemonSet maxSurge: the gap is counted and said why (or,
    // had no connect fallen into it, none refused).
    assert!(
        oks.iter().any(|l| l.contains("has no DaemonSet maxSurge (1.22+)")
            || l.contains("no connection refused during the rollout")),
        "the rollout step's result: {oks:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_node_cluster_runs_pods_across_nodes_and_down_leaves_nothing() {
    if !require_root("two_node_cluster_runs_pods_across_nodes_and_down_leaves_nothing") {
        return;
    }
    assert!(
        !Path::new(STATE_DIR).exists(),
        "a local cluster is up ({STATE_DIR} exists): the test would take it down. Run `cargo xtask cluster down` first."
    );
    let pre_existing: Vec<&str> = ["/var/lib/kubelet", "/etc/cni", "/opt/cni", "/var/lib/cni"]
        .into_iter()
        .filter(|p| Path::new(p).exists())
        .collect();
    let mut down = Down { done: false };

    let t0 = Instant::now();
    let out = cluster("up").unwrap_or_else(|e| panic!("{e}"));
    eprintln!("cluster up in {:.1?}: {}", t0.elapsed(), out.lines().last().unwrap_or(""));
    let again = cluster("up").unwrap_or_else(|e| panic!("a second up: {e}"));
    assert!(again.contains("2 nodes Ready"), "a second up keeps the cluster: {again}");
    let status = cluster("status").unwrap_or_else(|e| panic!("{e}"));
    assert!(
        status.contains("node tmc-n1: Ready") && status.contains("node tmc-n2: Ready"),
        "{status}"
    );

    let client: Client = tlsmesh_kube_harness::client_from_kubeconfig(
        &Path::new(STATE_DIR).join("admin.kubeconfig"),
    )
    .await;
    let nodes: Api<Node> = Api::all(client.clone());
    for n in NODES {
        let node = nodes.get(n).await.unwrap_or_else(|e| panic!("node {n}: {e}"));
        assert!(ready(&node), "node {n} is not Ready: {:?}", node.status);
        let addrs = node.status.as_ref().and_then(|s| s.addresses.clone()).unwrap_or_default();
        assert!(
            addrs.iter().any(|a| a.type_ == "InternalIP" && a.address.starts_with("172.30.0.1")),
            "node {n}'s InternalIP is its netns address: {addrs:?}"
        );
    }

    pods_across_nodes(&client).await;
    install_and_demo();

    // Down with pods still running: it must end their containers too.
    let out = down.now().unwrap_or_else(|e| panic!("{e}"));
    assert!(out.contains("nothing left"), "{out}");
    let left: Vec<String> = left_behind()
        .into_iter()
        .filter(|l| !pre_existing.iter().any(|p| l.starts_with(p)))
        .collect();
    assert!(left.is_empty(), "cluster down left behind: {left:?}");
    assert!(cluster("status").is_err(), "status reports a cluster that is down as not up");
}
