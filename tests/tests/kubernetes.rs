//! The daemon with `--inventory-source kubernetes`, end to end in the netns
//! topology against a real kube-apiserver (kubeharness/: v1.20.2, etcd,
//! controller-manager — which makes the Service's `EndpointSlice` from the
//! Ready pod, as in a cluster): its pods, namespaces, node, Services and
//! slices come from the real API, each pod's netns from the real
//! `tlsmesh-cni` binary run the way a container runtime runs it. A client
//! pod connects to a Service `ClusterIP`; the daemon resolves it to the
//! server pod on the other node and carries it through the tunnel. Then a
//! re-created sandbox is answered only once its new netns is enrolled, a
//! namespace label flip releases the pods, and the CNI plugin fails closed
//! (code 999) when the daemon is down. The daemons reach the API server on
//! the host's loopback through `netkit::forward::LoopbackForwarder`.

#![allow(
    clippy::similar_names,
    clippy::many_single_char_names,
    clippy::too_many_lines,
    reason = "test scenarios: long, explicit, with throwaway names"
)]

use std::{
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    time::Duration,
};

use k8s_openapi::api::core::v1::{Pod as ApiPod, Service};
use kube::{
    api::{Patch, PatchParams, PostParams},
    Api,
};
use netkit::{
    cni::{cni_add, cni_add_sandbox, prev_result},
    forward::LoopbackForwarder,
    require_root, wait_for, Daemon, Pod, Topology,
};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tlsmesh_kube_harness::{
    objects::{label_namespace, namespace, node, pod, service_account},
    ControlPlane,
};

const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 7000;

/// Plays the kubelet: `pod` Running and Ready at both its addresses.
async fn run_pod(c: &kube::Client, ns: &str, p: &Pod) {
    let status = json!({"status": {
        "phase": "Running",
        "podIP": p.ip4.to_string(),
        "podIPs": [{"ip": p.ip4.to_string()}, {"ip": p.ip6.to_string()}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    Api::<ApiPod>::namespaced(c.clone(), ns)
        .patch_status(&p.name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("pod {ns}/{} status: {e}", p.name));
}

// ---------------------------------------------------------------------------
// Apps and clients inside pods.

/// Answers each connection with the peer address it sees and a newline,
/// then echoes everything back.
fn whoami_echo_server(netns: &str, addr: SocketAddr) {
    let l = Topology::in_netns(netns, move || TcpListener::bind(addr).expect("bind server"));
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let peer = s.peer_addr().map(|p| p.ip().to_string()).unwrap_or_default();
                let mut w = s.try_clone().expect("clone");
                let mut r = s;
                if w.write_all(format!("{peer}\n").as_bytes()).is_ok() {
                    let _ = std::io::copy(&mut r, &mut w);
                }
                let _ = w.shutdown(Shutdown::Write);
            });
        }
    });
}

/// What a client in a pod saw of one connection.
#[derive(Debug)]
struct Seen {
    /// `getpeername()` of the client's socket.
    peer: SocketAddr,
    /// The address the server saw the connection come from.
    server_saw: String,
    /// SHA-256 of what was sent and of what came back.
    sent: String,
    received: String,
}

/// Connects from inside `netns` to `dst`, reads the server's greeting, sends
/// `len` bytes and reads them back.
fn exchange(netns: &str, dst: SocketAddr, len: usize) -> std::io::Result<Seen> {
    Topology::in_netns(netns, move || {
        let stream = TcpStream::connect_timeout(&dst, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let peer = stream.peer_addr()?;
        let mut rd = stream.try_clone()?;
        let mut greeting = Vec::new();
        let mut byte = [0u8; 1];
        while byte[0] != b'\n' {
            if rd.read(&mut byte)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before the greeting",
                ));
            }
            greeting.push(byte[0]);
        }
        let server_saw = String::from_utf8_lossy(&greeting).trim().to_owned();
        let reader = std::thread::spawn(move || -> std::io::Result<String> {
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let got = rd.read(&mut buf)?;
                if got == 0 {
                    return Ok(format!("{:x}", hash.finalize()));
                }
                hash.update(&buf[..got]);
            }
        });
        let mut wr = stream;
        let mut hash = Sha256::new();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut left = len;
        while left > 0 {
            for c in &mut chunk {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                *c = state.to_le_bytes()[0];
            }
            let take = left.min(chunk.len());
            wr.write_all(&chunk[..take])?;
            hash.update(&chunk[..take]);
            left -= take;
        }
        wr.shutdown(Shutdown::Write)?;
        let received = reader.join().map_err(|_| std::io::Error::other("reader panicked"))??;
        Ok(Seen { peer, server_saw, sent: format!("{:x}", hash.finalize()), received })
    })
}

#[test]
fn real_apiserver_daemon_follows_the_api_enrolls_via_cni_and_tunnels_a_cluster_ip() {
    if !require_root(
        "real_apiserver_daemon_follows_the_api_enrolls_via_cni_and_tunnels_a_cluster_ip",
    ) {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let cp = rt.block_on(ControlPlane::start());
    let c = cp.client();
    let topo = Topology::build(2, 2).expect("topology");
    let (client, other, server) =
        (topo.pod(0, 0).clone(), topo.pod(0, 1).clone(), topo.pod(1, 0).clone());
    let port = cp.port();
    let _forwarders: Vec<LoopbackForwarder> =
        topo.nodes().iter().map(|n| LoopbackForwarder::start(&n.netns, port)).collect();

    // The cluster: `shop` enrolled (strict), `lab` not, a Service.
    let vip: String = rt.block_on(async {
        namespace(&c, "shop", Some("strict")).await;
        namespace(&c, "lab", None).await;
        for (ns, p) in [("shop", &client), ("lab", &other), ("shop", &server)] {
            service_account(&c, ns, &format!("sa-{}", p.name)).await;
        }
        for n in topo.nodes() {
            node(&c, &n.name, &n.ip4.to_string()).await;
        }
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": {"app": server.name},
                "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": TARGET_PORT, "protocol": "TCP"}]}}))
        .expect("a Service");
        let svc = Api::<Service>::namespaced(c.clone(), "shop")
            .create(&PostParams::default(), &svc)
            .await
            .expect("create Service");
        svc.spec.and_then(|s| s.cluster_ip).expect("a ClusterIP")
    });

    let socket = |n: usize| Daemon::cni_socket(&topo, n);
    let start = |n: usize| Daemon::start_kubernetes(&topo, n, cp.kubeconfig());
    let d0 = start(0);
    let mut d1 = start(1);

    // Pods are scheduled (created after the daemons are up, so their
    // readiness wait does not depend on them) but have no address yet, as
    // while their sandboxes are being set up.
    let uids: Vec<String> = rt.block_on(async {
        let mut uids = Vec::new();
        for (ns, p, n) in [("shop", &client, "n0"), ("lab", &other, "n0"), ("shop", &server, "n1")]
        {
            let labels = json!({"app": p.name});
            let created = pod(&c, ns, &p.name, n, &format!("sa-{}", p.name), labels).await;
            uids.push(created.metadata.uid.unwrap_or_default());
        }
        uids
    });
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        d0.pod_keys().is_empty() && d1.pod_keys().is_empty(),
        "no netns known before the CNI plugin ran"
    );

    // The runtime runs the chained plugin for each new sandbox; ADD is
    // answered (prevResult unchanged) only once the pod is enrolled.
    for (d, n, ns, pod, uid) in
        [(&d0, 0, "shop", &client, &uids[0]), (&d1, 1, "shop", &server, &uids[2])]
    {
        let run = cni_add(&socket(n), ns, pod, uid);
        assert_eq!(
            run.code,
            Some(0),
            "ADD {ns}/{}: {run:?}\ndaemon log:\n{}",
            pod.name,
            d.log_text()
        );
        let out: Value = serde_json::from_str(run.stdout.trim()).expect("ADD prints a result");
        assert_eq!(out, prev_result(pod), "ADD prints prevResult unchanged");
        let key = format!("{ns}/{}", pod.name);
        assert!(
            d.pod_keys().contains(&key),
            "{key} enrolled when ADD returns: {}",
            d.config_dump()
        );
        let dump = d.config_dump();
        let view = dump["pods"]
            .as_array()
            .expect("pods")
            .iter()
            .find(|p| p["key"] == key.as_str())
            .expect("pod view")
            .clone();
        assert_eq!(view["mode"], "strict");
        assert_eq!(view["identity"], format!("spiffe://cluster.local/ns/shop/sa/sa-{}", pod.name));
        assert!(
            view["ips"].as_array().expect("ips").contains(&json!(pod.ip4.to_string())),
            "{view}"
        );
    }
    // A pod of an unlabelled namespace: ADD succeeds, nothing enrolled.
    let run = cni_add(&socket(0), "lab", &other, &uids[1]);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains("not enrolled"), "{run:?}");
    assert_eq!(d0.pod_keys(), ["shop/n0p0"]);

    // The kubelet reports the addresses; the controller-manager gives the
    // Service its endpoint (a real EndpointSlice).
    rt.block_on(async {
        for (ns, p) in [("shop", &client), ("lab", &other), ("shop", &server)] {
            run_pod(&c, ns, p).await;
        }
    });

    // ClusterIP from the client pod: resolved by node 0's daemon to the
    // server pod on node 1, carried through the tunnel. No route to the
    // ClusterIP is needed (no kube-proxy here): the connect is rewritten
    // before routing, so even an `unreachable` route does not stop it.
    let vip_route = format!("{vip}/32");
    netkit::sh(&["ip", "-n", &client.netns, "route", "add", "unreachable", &vip_route])
        .expect("unreachable route");
    whoami_echo_server(&server.netns, SocketAddr::new(server.ip4.into(), TARGET_PORT));
    let vip: SocketAddr = SocketAddr::new(vip.parse().expect("vip"), SERVICE_PORT);
    let tunnel_before = d0.counter("outbound_tunnel");
    let accepted_before = d1.counter("inbound_tunnel_accepted");
    // The daemons learn the addresses and the slice a moment after the
    // API has them; until then the connection is not tunnelled.
    let seen = wait_for(Duration::from_secs(30), || exchange(&client.netns, vip, 1 << 20).ok());
    let seen = seen.unwrap_or_else(|| {
        panic!(
            "ClusterIP {vip} never answered through the tunnel: {:?}\nn0 log:\n{}\nn1 log:\n{}",
            exchange(&client.netns, vip, 1),
            d0.log_text(),
            d1.log_text()
        )
    });
    assert_eq!(seen.server_saw, client.ip4.to_string(), "the server sees the client pod's address");
    assert_eq!(seen.peer, vip, "getpeername shows the ClusterIP the app dialled");
    assert_eq!(seen.sent, seen.received, "1 MiB round-trips intact");
    assert!(d0.counter("outbound_tunnel") > tunnel_before, "node 0 tunnelled it: {}", d0.stats());
    assert!(
        d1.counter("inbound_tunnel_accepted") > accepted_before,
        "node 1 took it from the tunnel: {}",
        d1.stats()
    );

    // The sandbox is re-created (new netns; here the spare pod's) and its
    // DEL never reached the daemon: ADD must answer only once the new netns
    // is enrolled, not on the strength of the old.
    let cookie = |d: &Daemon, key: &str| {
        d.config_dump()["pods"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["key"] == key))
            .and_then(|p| p["netns_cookie"].as_u64())
    };
    let old_cookie = cookie(&d0, "shop/n0p0").expect("client enrolled");
    let run =
        cni_add_sandbox(&socket(0), "shop", &client, &other.netns_path(), "sandbox-2", &uids[0]);
    assert_eq!(run.code, Some(0), "{run:?}");
    let new_cookie = cookie(&d0, "shop/n0p0");
    assert!(
        new_cookie.is_some_and(|c| c != old_cookie),
        "ADD answered before the new sandbox was enrolled: cookie {old_cookie} -> {new_cookie:?}\n{}",
        d0.log_text()
    );

    // Removing the namespace label releases the pods on both nodes.
    rt.block_on(label_namespace(&c, "shop", None));
    let released = wait_for(Duration::from_secs(15), || {
        (d0.pod_keys().is_empty() && d1.pod_keys().is_empty()).then_some(())
    });
    assert!(
        released.is_some(),
        "label removed: pods released; n0 {:?} n1 {:?}",
        d0.pod_keys(),
        d1.pod_keys()
    );
    // Not captured any more: the pods talk plaintext, directly.
    let tunnel_before = d0.counter("outbound_tunnel");
    let direct = exchange(&client.netns, SocketAddr::new(server.ip4.into(), TARGET_PORT), 4096)
        .expect("direct connection");
    assert_eq!(direct.server_saw, client.ip4.to_string());
    assert_eq!(direct.sent, direct.received);
    assert_eq!(d0.counter("outbound_tunnel"), tunnel_before, "released pods are not tunnelled");

    // The control for "no route needed": uncaptured, the ClusterIP is unreachable.
    let err = exchange(&client.netns, vip, 1).expect_err("uncaptured ClusterIP connect");
    assert_eq!(err.raw_os_error(), Some(libc::EHOSTUNREACH), "{err}");

    // Daemon down: the plugin fails closed, naming the socket.
    d1.proc.kill();
    let run = cni_add(&socket(1), "shop", &server, &uids[2]);
    assert_eq!(run.code, Some(1), "{run:?}");
    let err: Value = serde_json::from_str(run.stdout.trim()).expect("CNI error JSON on stdout");
    assert_eq!(err["code"], 999, "{err}");
    assert_eq!(err["cniVersion"], "1.0.0", "{err}");
    let sock = socket(1).display().to_string();
    assert!(err["msg"].as_str().is_some_and(|m| m.contains(&sock)), "{err}");

    drop(d0);
    drop(d1);
    drop(topo);
    drop(cp);
    rt.shutdown_background();
}
