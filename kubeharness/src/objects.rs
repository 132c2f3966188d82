//! Objects on a real API server ([`crate::ControlPlane`]) for tests:
//! namespaces, service accounts, nodes, pods (no kubelet runs them, so a
//! test plays the kubelet by writing their status), Services, RBAC, tokens,
//! CRDs from YAML files and objects of any kind ([`DynamicObject`]). Every
//! helper panics with what failed: these are test steps.

use std::time::Duration;

use std::path::Path;

use k8s_openapi::{
    api::{
        authentication::v1::TokenRequest,
        core::v1::{Namespace, Node, Pod, Service, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    api::{ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams},
    Api, Client,
};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};

/// Upper bound for anything a test waits for on the real server (the
/// controller-manager's reconciliation included).
pub const WAIT: Duration = Duration::from_secs(30);

fn typed<T: DeserializeOwned>(v: Value) -> T {
    serde_json::from_value(v).expect("a valid object")
}

async fn create<K>(api: &Api<K>, obj: Value) -> K
where
    K: kube::Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = typed(obj);
    let name = obj.meta().name.clone().unwrap_or_default();
    api.create(&PostParams::default(), &obj).await.unwrap_or_else(|e| panic!("create {name}: {e}"))
}

/// A namespace, labelled `tlsmesh.io/mode=<mode>` when given.
pub async fn namespace(c: &Client, name: &str, mode: Option<&str>) {
    let labels = mode.map(|m| json!({"tlsmesh.io/mode": m})).unwrap_or(json!({}));
    create(
        &Api::<Namespace>::all(c.clone()),
        json!({"metadata": {"name": name, "labels": labels}}),
    )
    .await;
}

/// Sets (`Some`) or removes (`None`) the namespace's `tlsmesh.io/mode` label.
pub async fn label_namespace(c: &Client, name: &str, mode: Option<&str>) {
    let patch = json!({"metadata": {"labels": {"tlsmesh.io/mode": mode}}});
    Api::<Namespace>::all(c.clone())
        .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("label namespace {name}: {e}"));
}

/// A service account `ns/name`.
pub async fn service_account(c: &Client, ns: &str, name: &str) {
    create(&Api::<ServiceAccount>::namespaced(c.clone(), ns), json!({"metadata": {"name": name}}))
        .await;
}

/// A Node with an `InternalIP` (status written as the kubelet would).
pub async fn node(c: &Client, name: &str, ip: &str) {
    let api = Api::<Node>::all(c.clone());
    create(&api, json!({"metadata": {"name": name}})).await;
    let status = json!({"status": {"addresses": [{"type": "InternalIP", "address": ip}]}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("node {name} status: {e}"));
}

/// A pod bound to `node` running as `sa`, Pending (no address yet).
pub async fn pod(c: &Client, ns: &str, name: &str, node: &str, sa: &str, labels: Value) -> Pod {
    create(
        &Api::<Pod>::namespaced(c.clone(), ns),
        json!({
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "nodeName": node,
                "serviceAccountName": sa,
                // Nothing runs it; no token volume needed.
                "automountServiceAccountToken": false,
                "containers": [{"name": "app", "image": "tlsmesh.invalid/app"}],
            },
        }),
    )
    .await
}

/// Plays the kubelet: the pod is Running and Ready at `ip`.
pub async fn run_pod(c: &Client, ns: &str, name: &str, ip: &str) {
    let status = json!({"status": {
        "phase": "Running",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }});
    Api::<Pod>::namespaced(c.clone(), ns)
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap_or_else(|e| panic!("pod {ns}/{name} status: {e}"));
}

/// Replaces (merges) the pod's labels.
pub async fn label_pod(c: &Client, ns: &str, name: &str, labels: Value) {
    Api::<Pod>::namespaced(c.clone(), ns)
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(&json!({"metadata": {"labels": labels}})),
        )
        .await
        .unwrap_or_else(|e| panic!("label pod {ns}/{name}: {e}"));
}

/// Deletes at once (no kubelet would ever confirm a graceful deletion).
pub async fn delete_pod(c: &Client, ns: &str, name: &str) {
    Api::<Pod>::namespaced(c.clone(), ns)
        .delete(name, &DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() })
        .await
        .unwrap_or_else(|e| panic!("delete pod {ns}/{name}: {e}"));
}

/// A `ClusterIP` Service selecting `app=<selector>` on TCP port `port`
/// (name `http`); returns the `ClusterIP` the server allocated.
pub async fn service(c: &Client, ns: &str, name: &str, selector: &str, port: i32) -> String {
    let svc: Service = create(
        &Api::<Service>::namespaced(c.clone(), ns),
        json!({"metadata": {"name": name},
            "spec": {"selector": {"app": selector},
                "ports": [{"name": "http", "port": port, "protocol": "TCP"}]}}),
    )
    .await;
    svc.spec.and_then(|s| s.cluster_ip).expect("a ClusterIP was allocated")
}

/// Deletes the Service.
pub async fn delete_service(c: &Client, ns: &str, name: &str) {
    Api::<Service>::namespaced(c.clone(), ns)
        .delete(name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete service {ns}/{name}: {e}"));
}

/// A `ClusterRole` with get/list/watch on `resources` (`(apiGroup, resource)`),
/// bound to `ns/sa`. Called again with other resources, it replaces the rules.
pub async fn grant_read(c: &Client, role: &str, ns: &str, sa: &str, resources: &[(&str, &str)]) {
    let rules: Vec<Value> = resources
        .iter()
        .map(
            |(g, r)| json!({"apiGroups": [g], "resources": [r], "verbs": ["get", "list", "watch"]}),
        )
        .collect();
    let cluster_roles = Api::<ClusterRole>::all(c.clone());
    let obj = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
        "metadata": {"name": role}, "rules": rules});
    cluster_roles
        .patch(role, &PatchParams::apply("tlsmesh-tests").force(), &Patch::Apply(&obj))
        .await
        .unwrap_or_else(|e| panic!("ClusterRole {role}: {e}"));
    let binding = json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": role},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"kind": "ServiceAccount", "namespace": ns, "name": sa}]});
    Api::<ClusterRoleBinding>::all(c.clone())
        .patch(role, &PatchParams::apply("tlsmesh-tests").force(), &Patch::Apply(&binding))
        .await
        .unwrap_or_else(|e| panic!("ClusterRoleBinding {role}: {e}"));
}

/// A token for `ns/sa` from the `TokenRequest` API with `audiences`, bound
/// to `pod` (`(name, uid)`) if given.
pub async fn token_request(
    c: &Client,
    ns: &str,
    sa: &str,
    audiences: &[&str],
    pod: Option<(&str, &str)>,
) -> String {
    let mut spec = json!({"audiences": audiences, "expirationSeconds": 3600});
    if let Some((name, uid)) = pod {
        spec["boundObjectRef"] =
            json!({"kind": "Pod", "apiVersion": "v1", "name": name, "uid": uid});
    }
    let body =
        json!({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec});
    let done: TokenRequest = Api::<ServiceAccount>::namespaced(c.clone(), ns)
        .create_subresource("token", sa, &PostParams::default(), serde_json::to_vec(&body).unwrap())
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{sa}: {e}"));
    done.status.expect("a TokenRequest answer has a status").token
}

/// The documents of a YAML file (empty ones left out).
pub fn yaml_docs(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml::Deserializer::from_str(&text)
        .map(|d| <Value as serde::Deserialize>::deserialize(d).expect("YAML"))
        .filter(|v| !v.is_null())
        .collect()
}

/// Creates the CRDs and waits until their first served version lists.
pub async fn install_crds(c: &Client, crds: Vec<Value>) {
    let api = Api::<CustomResourceDefinition>::all(c.clone());
    for crd in crds {
        let crd: CustomResourceDefinition = serde_json::from_value(crd).expect("a CRD");
        let created = api.create(&PostParams::default(), &crd).await.expect("create CRD");
        let spec = &created.spec;
        let version = spec.versions.iter().find(|v| v.served).expect("a served version");
        let r = resource(&spec.group, &version.name, &spec.names.kind, &spec.names.plural);
        let objs = Api::<DynamicObject>::all_with(c.clone(), &r);
        let deadline = tokio::time::Instant::now() + WAIT;
        while objs.list(&ListParams::default()).await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "CRD {} never served",
                spec.names.plural
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The resource `kind` (`plural`) of `group/version`.
pub fn resource(group: &str, version: &str, kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: format!("{group}/{version}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Istio's `AuthorizationPolicy` objects of `ns` (`security.istio.io/v1`).
pub fn authorization_policies(c: &Client, ns: &str) -> Api<DynamicObject> {
    let r = resource("security.istio.io", "v1", "AuthorizationPolicy", "authorizationpolicies");
    Api::namespaced_with(c.clone(), ns, &r)
}

/// Istio's `PeerAuthentication` objects of `ns` (`security.istio.io/v1`).
pub fn peer_authentications(c: &Client, ns: &str) -> Api<DynamicObject> {
    let r = resource("security.istio.io", "v1", "PeerAuthentication", "peerauthentications");
    Api::namespaced_with(c.clone(), ns, &r)
}

/// tlsmesh's `L4Policy` objects of `ns` (`tlsmesh.io/v1alpha1`).
pub fn l4_policies(c: &Client, ns: &str) -> Api<DynamicObject> {
    Api::namespaced_with(
        c.clone(),
        ns,
        &resource("tlsmesh.io", "v1alpha1", "L4Policy", "l4policies"),
    )
}

/// Creates an object of any kind.
pub async fn create_object(api: &Api<DynamicObject>, obj: Value) {
    let o: DynamicObject = serde_json::from_value(obj).expect("an object");
    api.create(&PostParams::default(), &o).await.unwrap_or_else(|e| panic!("create: {e}"));
}

/// Merge-patches an object of any kind.
pub async fn merge_object(api: &Api<DynamicObject>, name: &str, patch: Value) {
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .unwrap_or_else(|e| panic!("patch {name}: {e}"));
}

/// Deletes an object of any kind.
pub async fn delete_object(api: &Api<DynamicObject>, name: &str) {
    api.delete(name, &DeleteParams::default())
        .await
        .unwrap_or_else(|e| panic!("delete {name}: {e}"));
}
