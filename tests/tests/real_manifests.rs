//! The static manifests (`deploy/manifests/`) applied for real: server-side
//! apply of every object to a real kube-apiserver (v1.20.2, kubeharness/),
//! then the RBAC they grant checked by doing what the code does with it —
//! the node daemon's watcher and the CA's watcher and `TokenReview`, each
//! with its own `ServiceAccount`'s token — and by asking the server what the
//! daemon may *not* do. The controller-manager's `DaemonSet` controller
//! creates the daemon pod; the test binds it to the node as the scheduler
//! would, and the CA authenticates a token bound to that pod.
//!
//! Runs no network namespaces; safe to run on a busy machine.

use std::{collections::BTreeSet, path::Path, time::Duration};

use k8s_openapi::api::{
    authorization::v1::{ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec},
    core::v1::{Namespace, Node, Pod, ServiceAccount},
};
use kube::{
    api::{DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams},
    discovery::{Discovery, Scope},
    Api, Client,
};
use serde_json::{json, Value};
use tlsmesh::{
    inventory::{Inventory, Mode},
    policy::mesh::MeshPolicy,
};
use tlsmesh_k8s::policy::PolicyOptions;
use tlsmesh_k8s::tokenreview::{NodeDaemon, TokenReviewAuthenticator, DEFAULT_AUDIENCE};
use tlsmesh_kube_harness::ControlPlane;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(60);
const NODE: &str = "node-a";

/// Objects of the manifests a 1.20 server does not serve, and why that is
/// expected. Anything else that does not apply fails the test.
const UNSERVED_ON_1_20: &[(&str, &str, &str)] = &[(
    "policy/v1",
    "PodDisruptionBudget",
    "policy/v1 arrived in Kubernetes 1.21 (1.20 serves policy/v1beta1)",
)];

/// Fields of the manifests a 1.20 server rejects (server-side apply checks
/// the schema: "field not declared in schema"), and why: `(field name, the
/// version it arrived in)`. The test expects exactly these rejections, then
/// applies the objects without those fields to go on.
const NEWER_THAN_1_20: &[(&str, &str)] = &[
    ("appArmorProfile", "securityContext.appArmorProfile is Kubernetes 1.30+"),
    ("maxSurge", "a DaemonSet's rollingUpdate.maxSurge is Kubernetes 1.22+ (1.21 alpha)"),
];

fn manifests() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/manifests");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml"))
        .collect();
    files.sort();
    let mut docs = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let v: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
            if !v.is_null() {
                docs.push(yaml11_file_modes(v));
            }
        }
    }
    docs
}

/// kubectl reads YAML 1.1, where an unquoted `0400` is octal (256);
/// `serde_yaml` reads YAML 1.2 and keeps it as the string "0400". File modes
/// (`defaultMode`, `mode`) are the manifests' only such numbers.
fn yaml11_file_modes(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .map(|(k, v)| {
                    let v = match (&*k, &v) {
                        ("defaultMode" | "mode", Value::String(s)) if s.starts_with('0') => {
                            json!(u32::from_str_radix(s, 8).expect("an octal file mode"))
                        }
                        _ => yaml11_file_modes(v),
                    };
                    (k, v)
                })
                .collect(),
        ),
        Value::Array(a) => Value::Array(a.into_iter().map(yaml11_file_modes).collect()),
        other => other,
    }
}

fn gvk(obj: &Value) -> GroupVersionKind {
    let api_version = obj["apiVersion"].as_str().expect("apiVersion");
    let kind = obj["kind"].as_str().expect("kind");
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    GroupVersionKind::gvk(group, version, kind)
}

/// `obj` without the fields named in [`NEWER_THAN_1_20`], anywhere.
/// A `rollingUpdate` that loses `maxSurge` gets `maxUnavailable: 1` (0 is
/// valid only beside a surge): the one-at-a-time update of old clusters.
fn without_newer_fields(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out: serde_json::Map<String, Value> = m
                .iter()
                .filter(|(k, _)| !NEWER_THAN_1_20.iter().any(|(f, _)| f == k))
                .map(|(k, v)| (k.clone(), without_newer_fields(v)))
                .collect();
            if m.contains_key("maxSurge") {
                out.insert("maxUnavailable".into(), Value::from(1));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(without_newer_fields).collect()),
        other => other.clone(),
    }
}

/// What server-side apply made of the manifests.
#[derive(Debug, Default, PartialEq, Eq)]
struct Applied {
    /// `(apiVersion, kind)` the server does not serve.
    unserved: BTreeSet<(String, String)>,
    /// `(kind/name, field)` rejected as not in the server's schema.
    rejected: BTreeSet<(String, String)>,
}

/// Server-side applies every object; an object rejected for a field of
/// [`NEWER_THAN_1_20`] is recorded and applied again without those fields.
async fn apply_all(client: &Client, docs: &[Value]) -> Applied {
    let discovery = Discovery::new(client.clone()).run().await.expect("API discovery");
    let mut out = Applied::default();
    for obj in docs {
        let gvk = gvk(obj);
        let name = obj["metadata"]["name"].as_str().expect("metadata.name");
        let Some((ar, caps)) = discovery.resolve_gvk(&gvk) else {
            out.unserved.insert((obj["apiVersion"].as_str().unwrap().to_owned(), gvk.kind.clone()));
            continue;
        };
        let api: Api<DynamicObject> = match caps.scope {
            Scope::Cluster => Api::all_with(client.clone(), &ar),
            Scope::Namespaced => Api::namespaced_with(
                client.clone(),
                obj["metadata"]["namespace"].as_str().expect("namespaced objects name theirs"),
                &ar,
            ),
        };
        let pp = PatchParams::apply("tlsmesh-tests").force();
        let err = match api.patch(name, &pp, &Patch::Apply(obj)).await {
            Ok(_) => continue,
            Err(e) => e.to_string(),
        };
        let newer: Vec<&str> = NEWER_THAN_1_20
            .iter()
            .map(|(f, _)| *f)
            .filter(|f| err.contains(&format!(".{f}: field not declared in schema")))
            .collect();
        assert!(!newer.is_empty(), "server-side apply of {} {name} failed: {err}", gvk.kind);
        for f in newer {
            out.rejected.insert((format!("{}/{name}", gvk.kind), f.to_owned()));
        }
        api.patch(name, &pp, &Patch::Apply(&without_newer_fields(obj))).await.unwrap_or_else(|e| {
            panic!(
                "server-side apply of {} {name} without {NEWER_THAN_1_20:?} failed: {e}",
                gvk.kind
            )
        });
    }
    out
}

async fn until<T>(what: &str, mut f: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {WAIT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn until_inv(
    rx: &mut watch::Receiver<Inventory>,
    what: &str,
    cond: impl FnMut(&Inventory) -> bool,
) -> Inventory {
    let found = match tokio::time::timeout(WAIT, rx.wait_for(cond)).await {
        Ok(Ok(inv)) => Some(inv.clone()),
        _ => None,
    };
    found.unwrap_or_else(|| {
        panic!("timed out after {WAIT:?} waiting for {what}; last: {:#?}", *rx.borrow())
    })
}

async fn create(client: &Client, api_path: &str, obj: Value) {
    let req = http::Request::post(api_path)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(&obj).unwrap())
        .unwrap();
    client.request_text(req).await.unwrap_or_else(|e| panic!("POST {api_path}: {e}"));
}

/// Whether `client` may `verb` `resource` (`group`), by the server's RBAC.
async fn can(client: &Client, verb: &str, group: &str, resource: &str) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                group: Some(group.into()),
                resource: Some(resource.into()),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    let done = Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectAccessReview");
    done.status.is_some_and(|s| s.allowed)
}

#[tokio::test]
async fn real_apiserver_manifests_apply_and_their_rbac_is_what_the_code_needs() {
    let cp = ControlPlane::start().await;
    let admin = cp.client();
    let docs = manifests();
    assert!(docs.len() >= 8, "read {} objects from deploy/manifests", docs.len());

    let applied = apply_all(&admin, &docs).await;
    let expected = Applied {
        unserved: UNSERVED_ON_1_20
            .iter()
            .map(|(v, k, _)| ((*v).to_owned(), (*k).to_owned()))
            .collect(),
        rejected: ["appArmorProfile", "maxSurge"]
            .map(|f| ("DaemonSet/tlsmesh-node".to_owned(), f.to_owned()))
            .into(),
    };
    assert_eq!(
        applied, expected,
        "what a 1.20 server does not take of deploy/manifests (expected: {UNSERVED_ON_1_20:?}, {NEWER_THAN_1_20:?})"
    );
    // Applying again (same field manager) succeeds the same way: no conflicts.
    assert_eq!(apply_all(&admin, &docs).await, expected);
    let ns = Api::<Namespace>::all(admin.clone()).get("tlsmesh-system").await.unwrap();
    assert!(ns
        .metadata
        .labels
        .unwrap_or_default()
        .contains_key("pod-security.kubernetes.io/enforce"));

    workload(&admin).await;
    daemon_reads_and_never_writes(&cp).await;
    let (pod_name, token) = daemon_pod_token(&admin).await;
    ca_authenticates_the_daemon(&cp, &pod_name, &token).await;
}

/// A node and an enrolled pod on it, for the watchers to find.
async fn workload(admin: &Client) {
    create(
        admin,
        "/api/v1/nodes",
        json!({"apiVersion": "v1", "kind": "Node",
        "metadata": {"name": NODE}}),
    )
    .await;
    Api::<Node>::all(admin.clone())
        .patch_status(
            NODE,
            &PatchParams::default(),
            &Patch::Merge(&json!({"status": {
            "addresses": [{"type": "InternalIP", "address": "192.168.56.11"}],
            "conditions": [{"type": "Ready", "status": "True"}]}})),
        )
        .await
        .unwrap();
    create(
        admin,
        "/api/v1/namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "shop", "labels": {"tlsmesh.io/mode": "strict"}}}),
    )
    .await;
    until("shop/default ServiceAccount", async || {
        Api::<ServiceAccount>::namespaced(admin.clone(), "shop").get_opt("default").await.ok()?
    })
    .await;
    create(
        admin,
        "/api/v1/namespaces/shop/pods",
        json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web"},
        "spec": {"nodeName": NODE, "automountServiceAccountToken": false,
            "containers": [{"name": "app", "image": "tlsmesh.invalid/app"}]}}),
    )
    .await;
}

/// The daemon, with the `ServiceAccount` and RBAC of rbac.yaml: its watcher
/// publishes; it may not write (rbac.yaml: "it never writes to the API").
async fn daemon_reads_and_never_writes(cp: &ControlPlane) {
    let node_token = cp.service_account_token("tlsmesh-system", "tlsmesh-node").await;
    let daemon = cp.client_for_token("tlsmesh-node", &node_token).await;
    let (tx, mut rx) = watch::channel(Inventory::default());
    tokio::spawn(tlsmesh_k8s::run(
        daemon.clone(),
        tlsmesh_k8s::Options::new(Some(NODE.into()), "cluster.local"),
        tx,
    ));
    let inv =
        until_inv(&mut rx, "the daemon's first inventory", |i| i.pods.contains_key("shop/web"))
            .await;
    assert_eq!(inv.pods["shop/web"].mode, Some(Mode::Strict));
    assert_eq!(inv.node_addresses(NODE), ["192.168.56.11".parse().unwrap()].into());
    // "It never writes to the API" (rbac.yaml), and reads no Secrets.
    assert!(can(&daemon, "watch", "", "pods").await);
    assert!(can(&daemon, "list", "discovery.k8s.io", "endpointslices").await);
    assert!(can(&daemon, "watch", "", "endpoints").await, "the fallback without EndpointSlices");
    for (group, resource) in [
        ("tlsmesh.io", "l4policies"),
        ("security.istio.io", "authorizationpolicies"),
        ("security.istio.io", "peerauthentications"),
    ] {
        assert!(
            can(&daemon, "watch", group, resource).await,
            "the daemon may not watch {resource}"
        );
    }
    // The policy watcher, with the daemon's token: the L4Policy CRD of
    // crds.yaml is served and readable (a 403 would hold the publication
    // back); Istio's CRDs are not installed, which is reported.
    let (tx, mut rx) = watch::channel(MeshPolicy::default());
    tokio::spawn(tlsmesh_k8s::policy::run(daemon.clone(), PolicyOptions::default(), tx));
    tokio::time::timeout(WAIT, rx.changed())
        .await
        .expect("the daemon's first policy")
        .expect("the policy watcher runs");
    let subjects: Vec<String> = rx.borrow().problems.iter().map(|p| p.subject.clone()).collect();
    assert_eq!(subjects, ["watch of AuthorizationPolicy", "watch of PeerAuthentication"]);
    for (verb, group, resource) in [
        ("get", "", "secrets"),
        ("create", "", "pods"),
        ("patch", "", "nodes"),
        ("update", "", "namespaces"),
        ("create", "authentication.k8s.io", "tokenreviews"),
    ] {
        assert!(!can(&daemon, verb, group, resource).await, "the daemon may {verb} {resource}");
    }
}

/// The `DaemonSet` controller creates the daemon pod for the node; no
/// scheduler runs, so the test binds it as the scheduler would, then asks
/// for the token the kubelet would project into it (audience tlsmesh-ca).
/// Returns the pod's name and the token.
async fn daemon_pod_token(admin: &Client) -> (String, String) {
    let pods = Api::<Pod>::namespaced(admin.clone(), "tlsmesh-system");
    let ds_pod = until("a tlsmesh-node pod from the DaemonSet", async || {
        let lp = ListParams::default().labels("app.kubernetes.io/name=tlsmesh-node");
        pods.list(&lp).await.ok()?.items.into_iter().next()
    })
    .await;
    let pod_name = ds_pod.metadata.name.clone().unwrap();
    let pod_uid = ds_pod.metadata.uid.clone().unwrap();
    create(
        admin,
        &format!("/api/v1/namespaces/tlsmesh-system/pods/{pod_name}/binding"),
        json!({"apiVersion": "v1", "kind": "Binding", "metadata": {"name": pod_name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE}}),
    )
    .await;
    let req = json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": [DEFAULT_AUDIENCE], "expirationSeconds": 3600,
            "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod_name, "uid": pod_uid}}});
    let done: k8s_openapi::api::authentication::v1::TokenRequest =
        Api::<ServiceAccount>::namespaced(admin.clone(), "tlsmesh-system")
            .create_subresource(
                "token",
                "tlsmesh-node",
                &PostParams::default(),
                serde_json::to_vec(&req).unwrap(),
            )
            .await
            .expect("TokenRequest for the daemon pod");
    (pod_name, done.status.unwrap().token)
}

/// The CA, with the `ServiceAccount` and RBAC of rbac.yaml: its watcher
/// publishes, and its `TokenReview` of the daemon pod's token names the node.
async fn ca_authenticates_the_daemon(cp: &ControlPlane, pod_name: &str, projected: &str) {
    let ca_token = cp.service_account_token("tlsmesh-system", "tlsmesh-ca").await;
    let ca = cp.client_for_token("tlsmesh-ca", &ca_token).await;
    let (tx, mut rx) = watch::channel(Inventory::default());
    tokio::spawn(tlsmesh_k8s::run(
        ca.clone(),
        tlsmesh_k8s::Options::new(None, "cluster.local"),
        tx,
    ));
    until_inv(&mut rx, "the CA's first inventory", |i| i.pods.contains_key("shop/web")).await;
    let auth = TokenReviewAuthenticator::new(
        ca.clone(),
        DEFAULT_AUDIENCE,
        vec!["system:serviceaccount:tlsmesh-system:tlsmesh-node".into()],
    );
    let who = auth.authenticate(projected).await.expect("the CA authenticates the daemon");
    assert_eq!(
        who,
        NodeDaemon {
            node: NODE.into(),
            username: "system:serviceaccount:tlsmesh-system:tlsmesh-node".into(),
            pod: Some(format!("tlsmesh-system/{pod_name}")),
        }
    );
    assert!(
        !can(&ca, "get", "", "secrets").await,
        "the CA reads its key from a mounted Secret only"
    );
}
