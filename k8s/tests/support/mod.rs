//! A small fake Kubernetes API server on 127.0.0.1 (hyper, HTTP/1.1): list,
//! `?watch=true` as chunked JSON lines with resourceVersion replay, `410
//! Gone` for expired versions, 403 for a forbidden resource, 404 for an
//! unserved one (and for every discovery document), `TokenReview` and `GET
//! pod`. Enough of the API for kube-rs's watcher and client.
//!
//! Only for faults and answers a real API server will not produce on
//! demand (a 410 Gone now, a resource no version of Kubernetes lacks, the
//! node-name extra of 1.30+ tokens); everything else runs against the real
//! kube-apiserver of kubeharness/ (the `real_apiserver_*` tests).

#![allow(dead_code, reason = "each test file uses a different part")]

use std::{
    collections::{BTreeMap, HashMap},
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt as _, Full, StreamBody};
use hyper::{body::Frame, service::service_fn, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::{net::TcpListener, sync::mpsc};

/// The resources the watcher asks for, by collection path.
pub const NAMESPACES: &str = "/api/v1/namespaces";
pub const PODS: &str = "/api/v1/pods";
pub const NODES: &str = "/api/v1/nodes";
pub const SERVICES: &str = "/api/v1/services";
pub const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";

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
    /// Versions at or below this are gone from history (410 on watch).
    compacted: u64,
    items: HashMap<String, BTreeMap<String, Value>>,
    history: Vec<(u64, String, &'static str, Value)>,
    watchers: Vec<Watcher>,
    forbidden: Vec<String>,
    unserved: Vec<String>,
    lists: HashMap<String, usize>,
    reviews: HashMap<String, Value>,
    review_requests: Vec<Value>,
}

/// The fake API server; dropped servers keep running until the test ends.
#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Mutex<Inner>>,
    pub addr: SocketAddr,
}

fn obj_key(o: &Value) -> String {
    let m = &o["metadata"];
    format!("{}/{}", m["namespace"].as_str().unwrap_or_default(), m["name"].as_str().unwrap())
}

fn matches_field(o: &Value, field: Option<&str>) -> bool {
    match field.and_then(|f| f.strip_prefix("metadata.name=")) {
        Some(name) => o["metadata"]["name"] == name,
        None => true,
    }
}

fn decode(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' if i + 2 < b.len() => {
                let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap();
                out.push(u8::from_str_radix(hex, 16).unwrap());
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
    String::from_utf8(out).unwrap()
}

fn query(req: &Request<hyper::body::Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), decode(v)))
        .collect()
}

fn json_response(code: StatusCode, v: &Value) -> Response<Body> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(v.to_string())).boxed())
        .unwrap()
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code})
}

fn line(v: &Value) -> Bytes {
    let mut s = v.to_string();
    s.push('\n');
    Bytes::from(s)
}

impl FakeApi {
    /// Starts the server on an ephemeral loopback port.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api = FakeApi { inner: Arc::default(), addr: listener.local_addr().unwrap() };
        let server = api.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let api = server.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req| {
                        let api = api.clone();
                        async move { Ok::<_, Infallible>(api.handle(req).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        api
    }

    /// A kube client for this server.
    pub fn client(&self) -> kube::Client {
        let config = kube::Config::new(format!("http://{}", self.addr).parse().unwrap());
        kube::Client::try_from(config).unwrap()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    async fn handle(&self, req: Request<hyper::body::Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let q = query(&req);
        if req.method() == hyper::Method::POST
            && path == "/apis/authentication.k8s.io/v1/tokenreviews"
        {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let mut review: Value = serde_json::from_slice(&body).unwrap();
            let mut inner = self.lock();
            inner.review_requests.push(review.clone());
            if inner.forbidden.iter().any(|f| f == "tokenreviews") {
                return json_response(
                    StatusCode::FORBIDDEN,
                    &status(403, "Forbidden", "tokenreviews is forbidden"),
                );
            }
            let token = review["spec"]["token"].as_str().unwrap_or_default().to_owned();
            review["status"] = inner
                .reviews
                .get(&token)
                .cloned()
                .unwrap_or(json!({"authenticated": false, "error": "invalid bearer token"}));
            review["apiVersion"] = json!("authentication.k8s.io/v1");
            review["kind"] = json!("TokenReview");
            return json_response(StatusCode::CREATED, &review);
        }
        // GET /api/v1/namespaces/{ns}/pods/{name}
        let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        if let ["api", "v1", "namespaces", ns, "pods", name] = parts.as_slice() {
            let inner = self.lock();
            let found = inner.items.get(PODS).and_then(|m| m.get(&format!("{ns}/{name}"))).cloned();
            return match found {
                Some(mut p) => {
                    p["apiVersion"] = json!("v1");
                    p["kind"] = json!("Pod");
                    json_response(StatusCode::OK, &p)
                }
                None => json_response(
                    StatusCode::NOT_FOUND,
                    &status(404, "NotFound", &format!("pods \"{name}\" not found")),
                ),
            };
        }
        let known = [NAMESPACES, PODS, NODES, SERVICES, SLICES];
        let Some(res) = known.iter().find(|r| **r == path) else {
            return json_response(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", &format!("no route {path}")),
            );
        };
        let (api_version, kind) = kind_of(res);
        if self.lock().unserved.iter().any(|u| u == res) {
            return json_response(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", "the server could not find the requested resource"),
            );
        }
        let field = q.get("fieldSelector").cloned().filter(|f| !f.is_empty());
        let mut inner = self.lock();
        if inner.forbidden.iter().any(|f| f == res) {
            return json_response(
                StatusCode::FORBIDDEN,
                &status(403, "Forbidden", &format!("{kind} is forbidden: User \"system:serviceaccount:tlsmesh-system:tlsmesh-node\" cannot list")),
            );
        }
        if q.get("watch").map(String::as_str) == Some("true") {
            let from: u64 = q.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
            if from < inner.compacted {
                let _ = tx.send(line(&json!({"type": "ERROR",
                    "object": status(410, "Expired", &format!("too old resource version: {from} ({})", inner.compacted))})));
                drop(tx);
            } else {
                for (rv, p, ty, o) in &inner.history {
                    if *rv > from && p == res && matches_field(o, field.as_deref()) {
                        let _ = tx.send(line(&json!({"type": ty, "object": o})));
                    }
                }
                inner.watchers.push(Watcher { path: (*res).to_owned(), field, tx });
            }
            let body = StreamBody::new(futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|b| (Ok::<_, Infallible>(Frame::data(b)), rx))
            }));
            return Response::builder()
                .status(StatusCode::OK)
                .header("content-type", "application/json")
                .body(body.boxed())
                .unwrap();
        }
        *inner.lists.entry((*res).to_owned()).or_default() += 1;
        let items: Vec<Value> = inner
            .items
            .get(*res)
            .map(|m| m.values().filter(|o| matches_field(o, field.as_deref())).cloned().collect())
            .unwrap_or_default();
        let list = json!({"apiVersion": api_version, "kind": format!("{kind}List"),
            "metadata": {"resourceVersion": inner.rv.to_string()}, "items": items});
        json_response(StatusCode::OK, &list)
    }

    fn stamp(inner: &mut Inner, path: &str, mut obj: Value) -> Value {
        inner.rv += 1;
        let (api_version, kind) = kind_of(path);
        obj["apiVersion"] = json!(api_version);
        obj["kind"] = json!(kind);
        obj["metadata"]["resourceVersion"] = json!(inner.rv.to_string());
        obj
    }

    fn notify(inner: &mut Inner, path: &str, ty: &'static str, obj: &Value) {
        inner.history.push((inner.rv, path.to_owned(), ty, obj.clone()));
        let ev = line(&json!({"type": ty, "object": obj}));
        inner.watchers.retain(|w| {
            w.path != path
                || !matches_field(obj, w.field.as_deref())
                || w.tx.send(ev.clone()).is_ok()
        });
    }

    /// Creates or replaces an object; watchers see ADDED or MODIFIED.
    pub fn apply(&self, path: &str, obj: Value) {
        let mut inner = self.lock();
        let obj = Self::stamp(&mut inner, path, obj);
        let key = obj_key(&obj);
        let old = inner.items.entry(path.to_owned()).or_default().insert(key, obj.clone());
        Self::notify(&mut inner, path, if old.is_some() { "MODIFIED" } else { "ADDED" }, &obj);
    }

    /// Deletes an object; watchers see DELETED.
    pub fn delete(&self, path: &str, namespace: &str, name: &str) {
        let mut inner = self.lock();
        let Some(old) =
            inner.items.get_mut(path).and_then(|m| m.remove(&format!("{namespace}/{name}")))
        else {
            return;
        };
        let obj = Self::stamp(&mut inner, path, old);
        Self::notify(&mut inner, path, "DELETED", &obj);
    }

    /// Replaces a resource's objects without telling any watcher, and
    /// forgets history up to now: what a client that was away misses.
    pub fn replace_silently(&self, path: &str, objs: Vec<Value>) {
        let mut inner = self.lock();
        let mut fresh = BTreeMap::new();
        for o in objs {
            let o = Self::stamp(&mut inner, path, o);
            fresh.insert(obj_key(&o), o);
        }
        inner.items.insert(path.to_owned(), fresh);
        inner.compacted = inner.rv;
        inner.history.clear();
    }

    /// Ends every open watch with `410 Gone`: the client must re-list.
    pub fn expire_watches(&self) {
        let mut inner = self.lock();
        let ev = line(
            &json!({"type": "ERROR", "object": status(410, "Expired", "too old resource version")}),
        );
        for w in inner.watchers.drain(..) {
            let _ = w.tx.send(ev.clone());
        }
    }

    /// Ends every open watch without a word (a dropped connection).
    pub fn drop_watches(&self) {
        self.lock().watchers.clear();
    }

    /// Answers 403 for a resource path (or "tokenreviews") until allowed.
    pub fn forbid(&self, what: &str) {
        self.lock().forbidden.push(what.to_owned());
    }

    /// Answers 404 for a resource path, as a server that does not serve it.
    pub fn unserve(&self, path: &str) {
        self.lock().unserved.push(path.to_owned());
    }

    pub fn allow(&self, what: &str) {
        self.lock().forbidden.retain(|f| f != what);
    }

    /// How many times a resource was listed.
    pub fn lists(&self, path: &str) -> usize {
        self.lock().lists.get(path).copied().unwrap_or(0)
    }

    /// Open watches on a resource.
    pub fn watches(&self, path: &str) -> usize {
        self.lock().watchers.iter().filter(|w| w.path == path && !w.tx.is_closed()).count()
    }

    /// The `TokenReview` status returned for `token`.
    pub fn set_review(&self, token: &str, status: Value) {
        self.lock().reviews.insert(token.to_owned(), status);
    }

    pub fn review_requests(&self) -> Vec<Value> {
        self.lock().review_requests.clone()
    }

    /// Waits until `cond` holds (polling), panicking after `secs`.
    pub async fn until(&self, secs: u64, what: &str, mut cond: impl FnMut(&FakeApi) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        while !cond(self) {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

pub fn namespace(name: &str, mode: Option<&str>) -> Value {
    let labels = mode.map(|m| json!({"tlsmesh.io/mode": m})).unwrap_or(json!({}));
    json!({"metadata": {"name": name, "labels": labels, "uid": format!("ns-{name}")}})
}

pub fn pod(ns: &str, name: &str, node: &str, ip: Option<&str>) -> Value {
    let status = match ip {
        Some(ip) => json!({"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}),
        None => json!({"phase": "Pending"}),
    };
    json!({
        "metadata": {"name": name, "namespace": ns, "uid": format!("uid-{name}"), "labels": {}},
        "spec": {"nodeName": node, "serviceAccountName": name, "containers": [{"name": "app", "image": "x"}]},
        "status": status,
    })
}

pub fn node(name: &str, ip: &str) -> Value {
    json!({"metadata": {"name": name}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}})
}

pub fn service(ns: &str, name: &str, vip: &str, port: i32) -> Value {
    json!({"metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIP": vip, "clusterIPs": [vip], "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}})
}

pub fn slice(ns: &str, name: &str, svc: &str, port: i32, eps: &[(&str, bool, &str)]) -> Value {
    let endpoints: Vec<Value> = eps
        .iter()
        .map(|(a, ready, p)| json!({"addresses": [a], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "namespace": ns, "name": p}}))
        .collect();
    json!({"metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "endpoints": endpoints, "ports": [{"name": "http", "port": port, "protocol": "TCP"}]})
}
