//! Node daemons with `--inventory-source kubernetes` against a real
//! kube-apiserver (kubeharness/), in the netns topology: the pods are network
//! namespaces with a process in them (the "sandbox", here `sleep`) and
//! objects in the real API whose status the test writes, as a kubelet
//! would. No CNI `ADD` ever reaches the daemons: these are pods that ran
//! before tlsmesh was installed, found through `/proc`.
//!
//! - `real_apiserver_running_pods_are_enrolled_without_a_restart`: pods
//!   running before the daemons start are enrolled and their traffic is
//!   carried through the tunnel (the payload never crosses the LAN in the
//!   clear); a namespace labelled later has its running pod enrolled too.
//! - `real_apiserver_policy_objects_are_enforced_and_open_streams_rechecked`:
//!   an Istio `AuthorizationPolicy` DENY applied while a stream is open
//!   closes it; removed, new connections pass; a tlsmesh `L4Policy` ALLOW
//!   makes the pod default-deny for others; an L7 field is reported and its
//!   ALLOW rule matches nothing.
//!
//! The daemons reach the API server on the host's loopback through a small
//! forwarder listening on 127.0.0.1 inside each node netns (same port, so
//! the kubeconfig and the server certificate fit unchanged).
//!
//! The two tests take turns ([`ONE_AT_A_TIME`]): every topology gives its
//! pods the same addresses, and `/proc` shows the processes of all of them,
//! so two at once would find each other's pods (on a real node an address
//! is in one netns only).

#![allow(clippy::too_many_lines, reason = "test scenarios, told step by step")]

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    time::Duration,
};

use kube::Client;
use netkit::{
    contains, echo_server, forward::LoopbackForwarder, require_root, wait_for, Daemon, LinkCapture,
    Pod, Proc, Topology,
};
use serde_json::{json, Value};
use tlsmesh_kube_harness::{
    objects::{
        authorization_policies, create_object, delete_object, install_crds, l4_policies,
        label_namespace, namespace, node, pod, service_account, yaml_docs,
    },
    ControlPlane,
};

const PORT: u16 = 7000;

/// Held by each test for its whole run (see the module docs).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The control plane, the topology and what ties them together.
struct Cluster {
    rt: tokio::runtime::Runtime,
    cp: ControlPlane,
    topo: Topology,
    _forwarders: Vec<LoopbackForwarder>,
    sandboxes: Vec<Proc>,
}

impl Cluster {
    fn start(pods_per_node: usize) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let cp = rt.block_on(ControlPlane::start());
        let topo = Topology::build(2, pods_per_node).expect("topology");
        let port = cp.port();
        let forwarders =
            topo.nodes().iter().map(|n| LoopbackForwarder::start(&n.netns, port)).collect();
        let c = cp.client();
        rt.block_on(async {
            for n in topo.nodes() {
                node(&c, &n.name, &n.ip4.to_string()).await;
            }
        });
        Self { rt, cp, topo, _forwarders: forwarders, sandboxes: Vec::new() }
    }

    fn client(&self) -> Client {
        self.cp.client()
    }

    /// A pod object for the topology pod `p` (namespace `ns`, service account
    /// `sa`), Running at its addresses, with a sandbox process in its netns.
    fn running_pod(&mut self, ns: &str, p: &Pod, sa: &str) {
        let c = self.client();
        let node = format!("n{}", p.node);
        let (ip4, ip6) = (p.ip4.to_string(), p.ip6.to_string());
        let name = p.name.clone();
        let ns2 = ns.to_string();
        self.rt.block_on(async move {
            service_account(&c, &ns2, sa).await;
            pod(&c, &ns2, &name, &node, sa, json!({"app": name})).await;
            let status = json!({"status": {
                "phase": "Running",
                "podIP": ip4,
                "podIPs": [{"ip": ip4}, {"ip": ip6}],
                "conditions": [{"type": "Ready", "status": "True"}],
            }});
            kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(c, &ns2)
                .patch_status(
                    &name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(&status),
                )
                .await
                .unwrap_or_else(|e| panic!("pod {ns2}/{name} status: {e}"));
        });
        let sandbox = self.topo.spawn_in_pod(p, "sleep", &["600"]).expect("sandbox process");
        self.sandboxes.push(sandbox);
    }

    fn daemon(&self, n: usize) -> Daemon {
        Daemon::start_kubernetes(&self.topo, n, self.cp.kubeconfig())
    }
}

fn problems(d: &Daemon) -> Vec<String> {
    d.config_dump()["problems"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p.as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// Waits until `d` serves exactly `keys`.
fn until_served(d: &Daemon, keys: &[&str], what: &str) {
    let ok = wait_for(Duration::from_secs(30), || (d.pod_keys() == keys).then_some(()));
    assert!(
        ok.is_some(),
        "{what}: {} serves {:?}, not {keys:?}; problems {:?}\n{}",
        d.node,
        d.pod_keys(),
        problems(d),
        d.log_text()
    );
}

/// One echo round trip on a new connection from `netns` to `dst`.
fn echo_once(netns: &str, dst: SocketAddr, payload: &'static [u8]) -> std::io::Result<Vec<u8>> {
    Topology::in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(payload)?;
        s.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        s.read_to_end(&mut back)?;
        Ok(back)
    })
}

/// A connection from `netns` to `dst` that stays open: one round trip done.
fn open_stream(netns: &str, dst: SocketAddr) -> TcpStream {
    Topology::in_netns(netns, move || {
        let mut s = TcpStream::connect_timeout(&dst, Duration::from_secs(5)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
        s.write_all(b"ping").expect("write");
        let mut b = [0u8; 4];
        s.read_exact(&mut b).expect("the echo of the first round trip");
        assert_eq!(&b, b"ping");
        s
    })
}

/// Whether an echo attempt was refused (reset, or closed with no echo).
fn refused(r: std::io::Result<Vec<u8>>, payload: &[u8]) -> bool {
    !matches!(r, Ok(b) if b == payload)
}

/// Whether the stream is closed: a write-then-read fails or reads EOF.
fn is_closed(s: &mut TcpStream) -> bool {
    let _ = s.write_all(b"more");
    let mut b = [0u8; 4];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

#[test]
fn real_apiserver_running_pods_are_enrolled_without_a_restart() {
    if !require_root("real_apiserver_running_pods_are_enrolled_without_a_restart") {
        return;
    }
    let _turn = one_at_a_time();
    let mut cl = Cluster::start(2);
    let (client, late, server) =
        (cl.topo.pod(0, 0).clone(), cl.topo.pod(0, 1).clone(), cl.topo.pod(1, 0).clone());
    let c = cl.client();
    cl.rt.block_on(async {
        namespace(&c, "shop", Some("strict")).await;
        namespace(&c, "lab", None).await;
    });
    cl.running_pod("shop", &client, "web");
    cl.running_pod("lab", &late, "exp");
    cl.running_pod("shop", &server, "db");
    echo_server(&server.netns, SocketAddr::new(server.ip4.into(), PORT));

    // The daemons start after the pods: nothing told them where they live.
    let d0 = cl.daemon(0);
    let d1 = cl.daemon(1);
    until_served(&d0, &["shop/n0p0"], "a pod running before the daemon");
    until_served(&d1, &["shop/n1p0"], "a pod running before the daemon");
    let view = d0.config_dump()["pods"][0].clone();
    assert_eq!(view["identity"], "spiffe://cluster.local/ns/shop/sa/web", "{view}");
    assert_eq!(view["mode"], "strict", "{view}");

    // Its traffic is captured and carried through the tunnel: the payload
    // never crosses the LAN in the clear.
    let link = LinkCapture::start(&cl.topo).expect("capture");
    let dst = SocketAddr::new(server.ip4.into(), PORT);
    let payload: &'static [u8] = b"secret-from-a-pod-that-ran-before-tlsmesh";
    let back = echo_once(&client.netns, dst, payload).expect("echo through the tunnel");
    assert_eq!(back, payload);
    let wire = link.finish();
    assert!(!contains(&wire, payload), "the payload crossed the LAN in the clear");
    assert!(d0.counter("outbound_tunnel") >= 1, "{}", d0.stats());
    assert!(d1.counter("inbound_tunnel_accepted") >= 1, "{}", d1.stats());

    // A namespace labelled later: its running pod is enrolled, no restart.
    cl.rt.block_on(label_namespace(&c, "lab", Some("permissive")));
    until_served(&d0, &["lab/n0p1", "shop/n0p0"], "a running pod of a namespace labelled later");

    // Its sandbox gone (the pod's netns empty of processes, as after a
    // crash the API has not seen yet): released, reported until found.
    let mut sandbox = cl.sandboxes.remove(1);
    sandbox.kill();
    until_served(&d0, &["shop/n0p0"], "a pod whose netns holds no process");
    let reported = wait_for(Duration::from_secs(15), || {
        problems(&d0)
            .iter()
            .any(|p| p.contains("lab/n0p1") && p.contains("network namespace is not known yet"))
            .then_some(())
    });
    assert!(reported.is_some(), "the unfound pod is reported: {:?}", problems(&d0));
    // A process appears in it again: found on the daemon's next look.
    cl.sandboxes.push(cl.topo.spawn_in_pod(&late, "sleep", &["600"]).expect("sandbox"));
    until_served(&d0, &["lab/n0p1", "shop/n0p0"], "a pod found again");
    drop(d0);
    drop(d1);
}

fn policy_crds(c: &Client) -> impl std::future::Future<Output = ()> + '_ {
    let mut crds = yaml_docs(&repo("deploy/manifests/crds.yaml"));
    crds.extend(yaml_docs(&repo("k8s/tests/fixtures/istio-crds.yaml")));
    install_crds(c, crds)
}

/// A cluster with the policy CRDs and a strict namespace `shop`: pod
/// `web` (node 0's first pod, the client) and pod `db` (the topology pod
/// `server`, an echo server on [`PORT`]), both Running.
fn shop_web_and_db(pods_per_node: usize, server: (usize, usize)) -> (Cluster, Client, Pod, Pod) {
    let mut cl = Cluster::start(pods_per_node);
    let (client, server) = (cl.topo.pod(0, 0).clone(), cl.topo.pod(server.0, server.1).clone());
    let c = cl.client();
    cl.rt.block_on(async {
        policy_crds(&c).await;
        namespace(&c, "shop", Some("strict")).await;
    });
    cl.running_pod("shop", &client, "web");
    cl.running_pod("shop", &server, "db");
    echo_server(&server.netns, SocketAddr::new(server.ip4.into(), PORT));
    (cl, c, client, server)
}

/// A client in pod `p` (its netns and cgroup, as a pod's app runs): one
/// connection to `dst`, `payload` sent, the write side shut, the echo read.
/// `None` when refused or reset.
fn echo_from_pod(topo: &Topology, p: &Pod, dst: SocketAddr, payload: &str) -> Option<String> {
    let script = format!(
        "import socket\ns = socket.create_connection(('{}', {}), 5)\ns.settimeout(10)\n\
         s.sendall(b'{payload}')\ns.shutdown(socket.SHUT_WR)\nb = b''\nwhile True:\n    \
         c = s.recv(4096)\n    if not c:\n        break\n    b += c\nprint(b.decode(), end='')\n",
        dst.ip(),
        dst.port()
    );
    let out = topo.run_in_pod(p, "python3", &["-c", &script]).expect("python3 in the pod");
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ipBlocks` match a same-node client (the local route, an app in its
/// pod's netns and cgroup) by its pod address: a DENY of it refuses, an
/// ALLOW of other addresses refuses, an ALLOW of it lets it through; the
/// access log names it by that address.
#[test]
fn real_apiserver_ip_blocks_match_a_same_node_client_by_its_pod_address() {
    if !require_root("real_apiserver_ip_blocks_match_a_same_node_client_by_its_pod_address") {
        return;
    }
    let _turn = one_at_a_time();
    let (cl, c, client, server) = shop_web_and_db(2, (0, 1));
    let d0 = cl.daemon(0);
    until_served(&d0, &["shop/n0p0", "shop/n0p1"], "both pods on node 0");
    let dst = SocketAddr::new(server.ip4.into(), PORT);
    let topo = &cl.topo;
    let passes = |what: &str| {
        wait_for(Duration::from_secs(20), || {
            echo_from_pod(topo, &client, dst, what).filter(|b| b == what)
        })
        .is_some()
    };
    let is_refused = |what: &str| {
        wait_for(Duration::from_secs(20), || {
            (echo_from_pod(topo, &client, dst, what).as_deref() != Some(what)).then_some(())
        })
        .is_some()
    };
    assert!(passes("open"), "no policy: the local route passes\n{}", d0.log_text());
    let row = d0.config_dump()["connections"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["direction"] == "outbound").cloned());
    assert!(row.is_none(), "the connection is over: {row:?}");
    let logged = d0
        .log_text()
        .lines()
        .filter(|l| l.contains("connection complete") && l.contains("route=\"local\""))
        .map(str::to_owned)
        .collect::<Vec<_>>();
    assert!(
        !logged.is_empty() && logged.iter().all(|l| l.contains(&format!("src={}:", client.ip4))),
        "the access log names the client by its pod address: {logged:#?}"
    );

    let aps = authorization_policies(&c, "shop");
    let block = format!("{}/32", client.ip4);
    cl.rt.block_on(create_object(
        &aps,
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "no-web-ip", "namespace": "shop"},
            "spec": {"action": "DENY", "rules": [{"from": [{"source": {"ipBlocks": [block]}}]}]}}),
    ));
    assert!(is_refused("deny"), "a DENY of the client's address refuses it\n{}", d0.log_text());
    assert!(d0.counter("policy_denied") >= 1, "{}", d0.stats());
    cl.rt.block_on(delete_object(&aps, "no-web-ip"));
    assert!(passes("after"), "the deny removed, connections pass");

    // An ALLOW of other addresses refuses the client (the ALLOW is in
    // force); added beside it, an ALLOW of the client's address lets it
    // through.
    let allow = |name: &str, block: &str| {
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"action": "ALLOW", "rules": [{"from": [{"source": {"ipBlocks": [block]}}]}]}})
    };
    cl.rt.block_on(create_object(&aps, allow("others-only", "192.0.2.0/24")));
    assert!(is_refused("others"), "an ALLOW of other addresses refuses the client");
    cl.rt.block_on(create_object(&aps, allow("web-ip-too", &block)));
    assert!(
        passes("allowed"),
        "an ALLOW of the client's address lets it through\n{}",
        d0.log_text()
    );
    cl.rt.block_on(delete_object(&aps, "others-only"));
    cl.rt.block_on(delete_object(&aps, "web-ip-too"));
    drop(d0);
}

#[test]
fn real_apiserver_policy_objects_are_enforced_and_open_streams_rechecked() {
    if !require_root("real_apiserver_policy_objects_are_enforced_and_open_streams_rechecked") {
        return;
    }
    let _turn = one_at_a_time();
    let (cl, c, client, server) = shop_web_and_db(1, (1, 0));
    let d0 = cl.daemon(0);
    let d1 = cl.daemon(1);
    until_served(&d0, &["shop/n0p0"], "client");
    until_served(&d1, &["shop/n1p0"], "server");
    let dst = SocketAddr::new(server.ip4.into(), PORT);

    // A stream is open when a DENY of its source is applied: closed.
    let mut open = open_stream(&client.netns, dst);
    let deny: Value = json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "no-web", "namespace": "shop"},
        "spec": {"action": "DENY", "rules": [{"from": [{"source": {
            "principals": ["cluster.local/ns/shop/sa/web"]}}]}]},
    });
    let aps = authorization_policies(&c, "shop");
    cl.rt.block_on(create_object(&aps, deny));
    let closed =
        wait_for(Duration::from_secs(20), || (d1.counter("policy_closed") == 1).then_some(()));
    assert!(
        closed.is_some(),
        "the open stream is re-checked and closed: n1 {}\n{}\nn0 {}\n{}",
        d1.stats(),
        d1.log_text(),
        d0.stats(),
        d0.log_text()
    );
    assert!(is_closed(&mut open), "the client sees its stream end");
    assert!(
        d1.log_text().contains("open connection denied by the new policy"),
        "the closing is logged"
    );
    // New connections: refused, and recorded as a deny.
    let again = echo_once(&client.netns, dst, b"again");
    assert!(refused(again, b"again"), "a new connection is denied");
    assert!(d1.counter("policy_denied") >= 1, "{}", d1.stats());

    // Removed: new connections pass.
    cl.rt.block_on(delete_object(&aps, "no-web"));
    let passes = wait_for(Duration::from_secs(20), || {
        echo_once(&client.netns, dst, b"after").ok().filter(|b| b == b"after")
    });
    assert!(passes.is_some(), "the deny removed, connections pass\n{}", d1.log_text());

    // tlsmesh's own L4Policy: an allow for another namespace only makes the
    // pod default-deny for everyone else.
    let l4 = l4_policies(&c, "shop");
    cl.rt.block_on(create_object(
        &l4,
        json!({"apiVersion": "tlsmesh.io/v1alpha1", "kind": "L4Policy",
            "metadata": {"name": "only-lab", "namespace": "shop"},
            "spec": {"action": "allow", "serviceAccounts": ["db"], "fromNamespaces": ["lab"]}}),
    ));
    let denied = wait_for(Duration::from_secs(20), || {
        refused(echo_once(&client.netns, dst, b"l4"), b"l4").then_some(())
    });
    assert!(denied.is_some(), "L4Policy allow for lab only denies shop/web");
    cl.rt.block_on(delete_object(&l4, "only-lab"));

    // An ALLOW with an L7 field: reported (never silently ignored), and the
    // rule matches nothing, as istiod makes it for ztunnel.
    cl.rt.block_on(create_object(
        &aps,
        json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "get-only", "namespace": "shop"},
            "spec": {"rules": [{"to": [{"operation": {"methods": ["GET"]}}]}]}}),
    ));
    let reported = wait_for(Duration::from_secs(20), || {
        problems(&d1).iter().any(|p| p.contains("get-only") && p.contains("methods")).then_some(())
    });
    assert!(reported.is_some(), "the L7 field is reported: {:?}", problems(&d1));
    let denied = wait_for(Duration::from_secs(20), || {
        refused(echo_once(&client.netns, dst, b"l7"), b"l7").then_some(())
    });
    assert!(denied.is_some(), "an ALLOW whose only rule has an L7 field allows nothing");
    cl.rt.block_on(delete_object(&aps, "get-only"));
    let passes = wait_for(Duration::from_secs(20), || {
        echo_once(&client.netns, dst, b"end").ok().filter(|b| b == b"end")
    });
    assert!(passes.is_some(), "all policies gone, connections pass");
    assert!(
        problems(&d1).iter().all(|p| !p.contains("get-only")),
        "the problem goes with the object: {:?}",
        problems(&d1)
    );
    drop(d0);
    drop(d1);
}
