//! The daemon with `--inventory-source kubernetes`, end to end in the netns
//! topology: its pods, namespaces, node, Services and `EndpointSlices` come
//! from a fake Kubernetes API server on loopback (list + chunked watch, the
//! way kube-rs's watcher asks), each pod's netns from the real
//! `tlsmesh-cni` binary run the way a container runtime runs it. A client
//! pod connects to a Service `ClusterIP`; the daemon resolves it to the
//! server pod on the other node and carries it through the tunnel. Then a
//! re-created sandbox is answered only once its new netns is enrolled, a
//! namespace label flip releases the pods, and the CNI plugin fails closed
//! (code 999) when the daemon is down.

#![allow(
    clippy::similar_names,
    clippy::many_single_char_names,
    clippy::cast_possible_truncation,
    clippy::format_push_string,
    clippy::items_after_statements,
    clippy::large_stack_arrays,
    clippy::too_many_lines,
    clippy::format_collect,
    reason = "test scenarios: long, explicit, with throwaway names"
)]

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    io::{Read as _, Write as _},
    net::{Shutdown, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, StreamBody};
use hyper::{body::Frame, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use netkit::{
    cni::{cni_add, cni_add_sandbox, prev_result},
    require_root, wait_for, Daemon, Pod, Topology,
};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256};
use tokio::sync::mpsc;

// ---------------------------------------------------------------------------
// A fake Kubernetes API server (after k8s/tests/support): list, and
// `?watch=true` as chunked JSON lines replaying history after the asked
// resourceVersion. One shared state, served on several listeners (one per
// node netns, all on 127.0.0.1:<port>).

const NAMESPACES: &str = "/api/v1/namespaces";
const PODS: &str = "/api/v1/pods";
const NODES: &str = "/api/v1/nodes";
const SERVICES: &str = "/api/v1/services";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const RESOURCES: [&str; 5] = [NAMESPACES, PODS, NODES, SERVICES, SLICES];

fn kind_of(path: &str) -> (&'static str, &'static str) {
    match path {
        NAMESPACES => ("v1", "Namespace"),
        PODS => ("v1", "Pod"),
        NODES => ("v1", "Node"),
        SERVICES => ("v1", "Service"),
        SLICES => ("discovery.k8s.io/v1", "EndpointSlice"),
        _ => unreachable!("unknown resource {path}"),
    }
}

type Body = BoxBody<Bytes, Infallible>;

struct Watcher {
    path: String,
    field: Option<String>,
    tx: mpsc::UnboundedSender<Bytes>,
}

#[derive(Default)]
struct Inner {
    rv: u64,
    items: HashMap<String, BTreeMap<String, Value>>,
    history: Vec<(u64, String, &'static str, Value)>,
    watchers: Vec<Watcher>,
    requests: Vec<String>,
}

#[derive(Clone, Default)]
struct FakeApi {
    inner: Arc<Mutex<Inner>>,
}

fn obj_key(o: &Value) -> String {
    let m = &o["metadata"];
    format!("{}/{}", m["namespace"].as_str().unwrap_or_default(), m["name"].as_str().expect("name"))
}

fn matches_field(o: &Value, field: Option<&str>) -> bool {
    match field.and_then(|f| f.strip_prefix("metadata.name=")) {
        Some(name) => o["metadata"]["name"] == name,
        None => true,
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).expect("ascii");
                out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("utf-8 query")
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .expect("response")
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

impl FakeApi {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves `listener` (a std listener, possibly bound in another netns)
    /// on the current tokio runtime.
    fn serve(&self, listener: TcpListener) {
        listener.set_nonblocking(true).expect("nonblocking");
        let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
        let api = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let api = api.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(&req)) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }

    fn handle(&self, req: &Request<hyper::body::Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let q: HashMap<String, String> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), decode(v)))
            .collect();
        let mut inner = self.lock();
        inner.requests.push(format!("{} {}", req.method(), req.uri()));
        let Some(res) = RESOURCES.iter().find(|r| **r == path) else {
            let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": format!("no route {path}"), "reason": "NotFound", "code": 404});
            return json_response(StatusCode::NOT_FOUND, &status);
        };
        let field = q.get("fieldSelector").cloned().filter(|f| !f.is_empty());
        if q.get("watch").map(String::as_str) == Some("true") {
            let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
            for (rv, p, ty, o) in &inner.history {
                if *rv > from && p == res && matches_field(o, field.as_deref()) {
                    let _ = tx.send(line(&json!({"type": ty, "object": o})));
                }
            }
            inner.watchers.push(Watcher { path: (*res).to_owned(), field, tx });
            let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
            }));
            return Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(body.boxed())
                .expect("watch response");
        }
        let (api_version, kind) = kind_of(res);
        let items: Vec<Value> = inner
            .items
            .get(*res)
            .map(|m| m.values().filter(|o| matches_field(o, field.as_deref())).cloned().collect())
            .unwrap_or_default();
        let list = json!({"apiVersion": api_version, "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items});
        json_response(StatusCode::OK, &list)
    }

    /// Creates or replaces an object; watchers see ADDED or MODIFIED.
    fn apply(&self, path: &str, mut obj: Value) {
        let mut inner = self.lock();
        inner.rv += 1;
        let (api_version, kind) = kind_of(path);
        obj["apiVersion"] = json!(api_version);
        obj["kind"] = json!(kind);
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        let old =
            inner.items.entry(path.to_owned()).or_default().insert(obj_key(&obj), obj.clone());
        let ty = if old.is_some() { "MODIFIED" } else { "ADDED" };
        let rv = inner.rv;
        inner.history.push((rv, path.to_owned(), ty, obj.clone()));
        let ev = line(&json!({"type": ty, "object": obj}));
        inner.watchers.retain(|w| {
            w.path != path
                || !matches_field(&obj, w.field.as_deref())
                || w.tx.send(ev.clone()).is_ok()
        });
    }

    /// Open watches on a resource.
    fn watches(&self, path: &str) -> usize {
        self.lock().watchers.iter().filter(|w| w.path == path && !w.tx.is_closed()).count()
    }

    fn requests(&self) -> Vec<String> {
        self.lock().requests.clone()
    }
}

fn namespace(name: &str, mode: Option<&str>) -> Value {
    let labels = mode.map_or(json!({}), |m| json!({"tlsmesh.io/mode": m}));
    json!({"metadata": {"name": name, "uid": format!("ns-{name}"), "labels": labels}})
}

/// A pod as the API shows it: scheduled to `node`; `Running` with its
/// addresses once `running` (before that `Pending`, no address yet — what
/// the API says while the CNI plugins run).
fn api_pod(ns: &str, pod: &Pod, node: &str, running: bool) -> Value {
    let status = if running {
        json!({"phase": "Running", "podIP": pod.ip4.to_string(),
            "podIPs": [{"ip": pod.ip4.to_string()}, {"ip": pod.ip6.to_string()}]})
    } else {
        json!({"phase": "Pending"})
    };
    json!({
        "metadata": {"name": pod.name, "namespace": ns, "uid": format!("uid-{}", pod.name), "labels": {"app": pod.name}},
        "spec": {"nodeName": node, "serviceAccountName": format!("sa-{}", pod.name),
            "containers": [{"name": "app", "image": "app"}]},
        "status": status,
    })
}

fn api_node(name: &str, ip: &str) -> Value {
    json!({"metadata": {"name": name}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}

// ---------------------------------------------------------------------------
// The CNI plugin, run like a container runtime runs it.

const VIP: &str = "10.96.0.10";
const SERVICE_PORT: u16 = 80;
const TARGET_PORT: u16 = 7000;

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

fn pod_keys(d: &Daemon) -> Vec<String> {
    let mut keys: Vec<String> = d.config_dump()["pods"]
        .as_array()
        .map(|a| a.iter().filter_map(|p| p["key"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default();
    keys.sort();
    keys
}

fn write_kubeconfig(dir: &Path, port: u16) -> PathBuf {
    let path = dir.join("kubeconfig");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://127.0.0.1:{port}\n\
         contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
         current-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
    );
    std::fs::write(&path, text).expect("write kubeconfig");
    path
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told step by step")]
fn daemon_follows_the_api_enrolls_via_cni_and_tunnels_a_cluster_ip() {
    if !require_root("daemon_follows_the_api_enrolls_via_cni_and_tunnels_a_cluster_ip") {
        return;
    }
    let topo = Topology::build(2, 2).expect("topology");
    let (client, other, server) =
        (topo.pod(0, 0).clone(), topo.pod(0, 1).clone(), topo.pod(1, 0).clone());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");

    // The cluster: `shop` enrolled (strict), `lab` not, a Service.
    let api = FakeApi::default();
    api.apply(NAMESPACES, namespace("shop", Some("strict")));
    api.apply(NAMESPACES, namespace("lab", None));
    for n in topo.nodes() {
        api.apply(NODES, api_node(&n.name, &n.ip4.to_string()));
    }
    api.apply(
        SERVICES,
        json!({"metadata": {"name": "web", "namespace": "shop"},
            "spec": {"type": "ClusterIP", "clusterIP": VIP, "clusterIPs": [VIP], "selector": {"app": server.name},
                "ports": [{"name": "http", "port": SERVICE_PORT, "targetPort": TARGET_PORT, "protocol": "TCP"}]}}),
    );

    // One listener per node netns, the same port in each, one shared state.
    let l0 = Topology::in_netns(&topo.node(0).netns, || {
        TcpListener::bind("127.0.0.1:0").expect("bind api n0")
    });
    let port = l0.local_addr().expect("addr").port();
    let l1 = Topology::in_netns(&topo.node(1).netns, move || {
        TcpListener::bind(("127.0.0.1", port)).expect("bind api n1")
    });
    {
        let _guard = rt.enter();
        api.serve(l0);
        api.serve(l1);
    }
    let kubeconfig = write_kubeconfig(&topo.scratch_dir(), port);
    let kubeconfig = kubeconfig.to_str().expect("utf-8 path");
    let unused_inventory = topo.scratch_dir().join("unused-inventory.toml");
    let socket = |n: usize| topo.scratch_dir().join(format!("cni-n{n}.sock"));
    let start = |n: usize| {
        let node = topo.node(n).clone();
        let sock = socket(n).display().to_string();
        let args = [
            "--inventory-source",
            "kubernetes",
            "--trust-domain",
            "cluster.local",
            "--cni-socket",
            &sock,
        ];
        let env = [("KUBECONFIG", kubeconfig)];
        Daemon::start_with_env(
            &topo,
            &node,
            &topo.pin_dir(&node.name),
            &unused_inventory,
            &args,
            &env,
        )
    };
    let d0 = start(0);
    let mut d1 = start(1);
    for r in RESOURCES {
        let ok = wait_for(Duration::from_secs(10), || (api.watches(r) >= 2).then_some(()));
        assert!(
            ok.is_some(),
            "both daemons watch {r}; requests: {:#?}\nn0 log:\n{}",
            api.requests(),
            d0.log_text()
        );
    }
    // The node watch is this node's only.
    assert!(
        api.requests().iter().any(|r| r.contains("/api/v1/nodes?") && r.contains("fieldSelector=metadata.name%3Dn0")),
        "{:#?}",
        api.requests()
    );

    // Pods are scheduled (created after the daemons are up, so their
    // readiness wait does not depend on them) but have no address yet, as
    // while their sandboxes are being set up.
    api.apply(PODS, api_pod("shop", &client, "n0", false));
    api.apply(PODS, api_pod("lab", &other, "n0", false));
    api.apply(PODS, api_pod("shop", &server, "n1", false));
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        pod_keys(&d0).is_empty() && pod_keys(&d1).is_empty(),
        "no netns known before the CNI plugin ran"
    );

    // The runtime runs the chained plugin for each new sandbox; ADD is
    // answered (prevResult unchanged) only once the pod is enrolled.
    for (d, n, ns, pod) in [(&d0, 0, "shop", &client), (&d1, 1, "shop", &server)] {
        let run = cni_add(&socket(n), ns, pod);
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
        assert!(pod_keys(d).contains(&key), "{key} enrolled when ADD returns: {}", d.config_dump());
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
    let run = cni_add(&socket(0), "lab", &other);
    assert_eq!(run.code, Some(0), "{run:?}");
    assert!(run.stderr.contains("not enrolled"), "{run:?}");
    assert_eq!(pod_keys(&d0), ["shop/n0p0"]);

    // The kubelet reports the addresses; the Service gets its endpoint.
    for (ns, pod, node) in [("shop", &client, "n0"), ("lab", &other, "n0"), ("shop", &server, "n1")]
    {
        api.apply(PODS, api_pod(ns, pod, node, true));
    }
    api.apply(
        SLICES,
        json!({"metadata": {"name": "web-abc", "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [server.ip4.to_string()], "conditions": {"ready": true},
                "nodeName": "n1", "targetRef": {"kind": "Pod", "namespace": "shop", "name": server.name}}],
            "ports": [{"name": "http", "port": TARGET_PORT, "protocol": "TCP"}]}),
    );

    // ClusterIP from the client pod: resolved by node 0's daemon to the
    // server pod on node 1, carried through the tunnel. No route to the
    // ClusterIP is needed (no kube-proxy here): the connect is rewritten
    // before routing, so even an `unreachable` route does not stop it.
    netkit::sh(&["ip", "-n", &client.netns, "route", "add", "unreachable", "10.96.0.0/12"])
        .expect("unreachable route");
    whoami_echo_server(&server.netns, SocketAddr::new(server.ip4.into(), TARGET_PORT));
    let vip: SocketAddr = SocketAddr::new(VIP.parse().expect("vip"), SERVICE_PORT);
    let tunnel_before = d0.counter("outbound_tunnel");
    let accepted_before = d1.counter("inbound_tunnel_accepted");
    // The daemons learn the addresses and the slice a moment after the
    // API has them; until then the connection is not tunnelled.
    let seen = wait_for(Duration::from_secs(15), || exchange(&client.netns, vip, 1 << 20).ok());
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

    // The sandbox is re-created (new netns; here the spare pod's, unused
    // by the API) and its DEL never reached the daemon: ADD must answer
    // only once the new netns is enrolled, not on the strength of the old.
    let cookie = |d: &Daemon, key: &str| {
        d.config_dump()["pods"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["key"] == key))
            .and_then(|p| p["netns_cookie"].as_u64())
    };
    let old_cookie = cookie(&d0, "shop/n0p0").expect("client enrolled");
    let run = cni_add_sandbox(&socket(0), "shop", &client, &other.netns_path(), "sandbox-2");
    assert_eq!(run.code, Some(0), "{run:?}");
    let new_cookie = cookie(&d0, "shop/n0p0");
    assert!(
        new_cookie.is_some_and(|c| c != old_cookie),
        "ADD answered before the new sandbox was enrolled: cookie {old_cookie} -> {new_cookie:?}\n{}",
        d0.log_text()
    );

    // Removing the namespace label releases the pods on both nodes.
    api.apply(NAMESPACES, namespace("shop", None));
    let released = wait_for(Duration::from_secs(5), || {
        (pod_keys(&d0).is_empty() && pod_keys(&d1).is_empty()).then_some(())
    });
    assert!(
        released.is_some(),
        "label removed: pods released; n0 {:?} n1 {:?}",
        pod_keys(&d0),
        pod_keys(&d1)
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
    let run = cni_add(&socket(1), "shop", &server);
    assert_eq!(run.code, Some(1), "{run:?}");
    let err: Value = serde_json::from_str(run.stdout.trim()).expect("CNI error JSON on stdout");
    assert_eq!(err["code"], 999, "{err}");
    assert_eq!(err["cniVersion"], "1.0.0", "{err}");
    let sock = socket(1).display().to_string();
    assert!(err["msg"].as_str().is_some_and(|m| m.contains(&sock)), "{err}");

    drop(d0);
    drop(d1);
    rt.shutdown_background();
}
