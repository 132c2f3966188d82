//! Policy objects, as the API server returns them (JSON), compiled to a
//! [`MeshPolicy`]: tlsmesh's `L4Policy` (`tlsmesh.io/v1alpha1`), the L4
//! subset of Istio's `AuthorizationPolicy` and `PeerAuthentication`
//! (`security.istio.io/v1` and `v1beta1`, the same schema).
//!
//! Nothing is silently ignored: what is not used as written becomes a
//! [`Problem`]. Unsupported parts fail closed the way Istio's ambient mode
//! (istiod's conversion for ztunnel) does: an `ALLOW` rule with a field
//! tlsmesh cannot evaluate at L4 (`methods`, `paths`, `hosts`,
//! `requestPrincipals`, `request.*` conditions…) is dropped — it never
//! matches, which allows less than written; a `DENY` rule keeps its L4 part
//! and drops the rest — it denies everything its L4 part matches, which
//! denies more than written.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::{
    mesh::{
        Authorization, Condition, IpBlock, MatchRule, MeshPolicy, MtlsMode, PortMatch, Problem,
        Selector, SourceMatch,
    },
    Action,
};

/// `tlsmesh.io`, the API group of [`L4_POLICY`].
pub const GROUP: &str = "tlsmesh.io";
/// tlsmesh's kind.
pub const L4_POLICY: &str = "L4Policy";
/// Istio's API group.
pub const ISTIO_GROUP: &str = "security.istio.io";
/// Istio's kinds.
pub const AUTHORIZATION_POLICY: &str = "AuthorizationPolicy";
/// Istio's kinds.
pub const PEER_AUTHENTICATION: &str = "PeerAuthentication";
/// Istio's default root namespace (its policies apply mesh-wide).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// Pod labels by `namespace/name`, to resolve `selector.matchLabels`.
pub type PodLabels = BTreeMap<String, BTreeMap<String, String>>;

/// The objects of the three kinds, as JSON (whole objects: `metadata`
/// and `spec`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Objects {
    /// `L4Policy` objects.
    pub l4_policies: Vec<Value>,
    /// Istio `AuthorizationPolicy` objects.
    pub authorization_policies: Vec<Value>,
    /// Istio `PeerAuthentication` objects.
    pub peer_authentications: Vec<Value>,
}

struct Meta {
    namespace: String,
    name: String,
    created: String,
}

fn meta(o: &Value) -> Meta {
    let s = |k: &str| o["metadata"][k].as_str().unwrap_or_default().to_owned();
    Meta { namespace: s("namespace"), name: s("name"), created: s("creationTimestamp") }
}

/// Compiles the objects. `root_namespace` is Istio's (policies there
/// without a selector apply to every namespace); `pods` resolves label
/// selectors.
pub fn compile(objects: &Objects, pods: &PodLabels, root_namespace: &str) -> MeshPolicy {
    let mut out = MeshPolicy::default();
    for o in &objects.l4_policies {
        l4_policy(o, pods, &mut out);
    }
    for o in &objects.authorization_policies {
        authorization_policy(o, pods, root_namespace, &mut out);
    }
    peer_authentications(&objects.peer_authentications, root_namespace, &mut out);
    out.authorizations.sort_by(|a, b| a.name.cmp(&b.name));
    out.problems.sort_by(|a, b| (&a.subject, &a.message).cmp(&(&b.subject, &b.message)));
    out
}

/// The pods of `namespace` (`None`: every namespace) whose labels include
/// `wanted`.
fn by_labels(
    pods: &PodLabels,
    namespace: Option<&str>,
    wanted: &BTreeMap<String, String>,
) -> BTreeSet<String> {
    pods.iter()
        .filter(|(key, _)| {
            namespace.is_none_or(|n| key.split_once('/').is_some_and(|(ns, _)| ns == n))
        })
        .filter(|(_, labels)| wanted.iter().all(|(k, v)| labels.get(k) == Some(v)))
        .map(|(key, _)| key.clone())
        .collect()
}

/// tlsmesh's `L4Policy`: the TOML rule's fields, in the object's
/// namespace, read the way Istio's rules are: a field that does not read
/// (a typo kept by the CRD's `x-kubernetes-preserve-unknown-fields`, a bad
/// block) empties an `allow` (it matches nothing) and is left out of a
/// `deny` (which then denies more).
fn l4_policy(obj: &Value, pods: &PodLabels, out: &mut MeshPolicy) {
    let m = meta(obj);
    let subject = format!("{L4_POLICY} {}/{}", m.namespace, m.name);
    let spec = &obj["spec"];
    let action = match spec["action"].as_str() {
        Some("allow") => Action::Allow,
        Some("deny") => Action::Deny,
        other => {
            out.problems.push(Problem {
                subject,
                message: format!("action {other:?} is not allow or deny; the object is ignored (the CRD's schema should have refused it: is deploy/manifests/crds.yaml installed at this version?)"),
            });
            return;
        }
    };
    let mut r = Reading::default();
    let ok = |s: &str| Ok::<_, String>(s.to_owned());
    let mut selector = Selector { namespace: Some(m.namespace.clone()), ..Default::default() };
    let mut named: Option<BTreeSet<String>> = None;
    let mut labelled: Option<BTreeSet<String>> = None;
    let mut from = Vec::new();
    let mut to = Vec::new();
    for (k, v) in spec.as_object().into_iter().flatten() {
        match k.as_str() {
            "action" => {}
            "serviceAccounts" => {
                selector.service_accounts =
                    r.list(v, k, ok).filter(|l| !l.is_empty()).map(|l| l.into_iter().collect());
            }
            "pods" => {
                named = r
                    .list(v, k, ok)
                    .filter(|l| !l.is_empty())
                    .map(|l| l.iter().map(|p| format!("{}/{p}", m.namespace)).collect());
            }
            "matchLabels" => {
                let wanted: Option<BTreeMap<String, String>> = v.as_object().map(|labels| {
                    labels
                        .iter()
                        .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                        .collect()
                });
                match wanted {
                    Some(w) if !w.is_empty() => {
                        labelled = Some(by_labels(pods, Some(&m.namespace), &w));
                    }
                    Some(_) => {}
                    None => r.unsupported.push("matchLabels is not a map".into()),
                }
            }
            "fromNamespaces" => {
                if let Some(l) = r.list(v, k, ok).filter(|l| !l.is_empty()) {
                    from.push(SourceMatch { namespaces: Some(l), ..Default::default() });
                }
            }
            "fromIdentities" => {
                if let Some(l) = r.list(v, k, ok).filter(|l| !l.is_empty()) {
                    from.push(SourceMatch { principals: Some(l), ..Default::default() });
                }
            }
            "fromIpBlocks" => {
                if let Some(l) = r.list(v, k, str::parse::<IpBlock>).filter(|l| !l.is_empty()) {
                    from.push(SourceMatch { ip_blocks: Some(l), ..Default::default() });
                }
            }
            "ports" => {
                let ports: Option<Vec<u16>> = v.as_array().and_then(|a| {
                    a.iter()
                        .map(|p| p.as_u64().and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0))
                        .collect()
                });
                match ports {
                    Some(p) if !p.is_empty() => {
                        to.push(PortMatch { ports: Some(p), not_ports: None });
                    }
                    Some(_) => {}
                    None => r.unsupported.push(format!("ports: {v} are not all ports")),
                }
            }
            other => r.unsupported.push(format!("spec.{other}")),
        }
    }
    selector.pods = match (named, labelled) {
        (Some(n), Some(l)) => Some(n.intersection(&l).cloned().collect()),
        (n, l) => n.or(l),
    };
    let mut rules = vec![MatchRule { from, to, when: vec![] }];
    if !r.unsupported.is_empty() {
        let what = r.unsupported.join(", ");
        let message = if action == Action::Allow {
            rules.clear();
            format!("{what} not read; this allow matches nothing (its pods are default-deny), which is more restrictive than written")
        } else {
            format!("{what} not read; this deny applies without it, which is more restrictive than written")
        };
        out.problems.push(Problem { subject: subject.clone(), message });
    }
    out.authorizations.push(Authorization { name: subject, action, selector, rules });
}

/// Reads a list of strings; `Err` names what is not a string.
fn strings(v: &Value, field: &str) -> Result<Vec<String>, String> {
    match v {
        Value::Array(a) => a
            .iter()
            .map(|x| {
                x.as_str().map(str::to_owned).ok_or_else(|| format!("{field}: {x} is not a string"))
            })
            .collect(),
        _ => Err(format!("{field} is not a list")),
    }
}

fn port(s: &str, field: &str) -> Result<u16, String> {
    s.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| format!("{field}: {s:?} is not a port"))
}

/// One rule being read: what is not used goes to `unsupported`.
#[derive(Default)]
struct Reading {
    unsupported: Vec<String>,
}

impl Reading {
    fn list<T>(
        &mut self,
        v: &Value,
        field: &str,
        each: impl Fn(&str) -> Result<T, String>,
    ) -> Option<Vec<T>> {
        match strings(v, field).and_then(|l| l.iter().map(|s| each(s)).collect()) {
            Ok(l) => Some(l),
            Err(e) => {
                self.unsupported.push(e);
                None
            }
        }
    }

    fn source(&mut self, s: &Value) -> SourceMatch {
        let mut m = SourceMatch::default();
        let Some(obj) = s.as_object() else {
            self.unsupported.push("from[].source is not an object".into());
            return m;
        };
        for (k, v) in obj {
            let ok = |s: &str| Ok::<_, String>(s.to_owned());
            let ip = |s: &str| s.parse::<IpBlock>();
            match k.as_str() {
                "principals" => m.principals = self.list(v, k, ok),
                "notPrincipals" => m.not_principals = self.list(v, k, ok),
                "namespaces" => m.namespaces = self.list(v, k, ok),
                "notNamespaces" => m.not_namespaces = self.list(v, k, ok),
                "ipBlocks" => m.ip_blocks = self.list(v, k, ip),
                "notIpBlocks" => m.not_ip_blocks = self.list(v, k, ip),
                // remoteIpBlocks come from X-Forwarded-For (HTTP);
                // requestPrincipals from a JWT.
                other => self.unsupported.push(format!("source.{other}")),
            }
        }
        m
    }

    fn operation(&mut self, o: &Value) -> PortMatch {
        let mut m = PortMatch::default();
        let Some(obj) = o.as_object() else {
            self.unsupported.push("to[].operation is not an object".into());
            return m;
        };
        for (k, v) in obj {
            match k.as_str() {
                "ports" => m.ports = self.list(v, k, |s| port(s, "ports")),
                "notPorts" => m.not_ports = self.list(v, k, |s| port(s, "notPorts")),
                // hosts, methods, paths and their not- forms: HTTP.
                other => self.unsupported.push(format!("operation.{other}")),
            }
        }
        m
    }

    fn condition(&mut self, c: &Value) -> Option<Condition> {
        let key = c["key"].as_str().unwrap_or_default();
        let mut values = None;
        let mut not_values = None;
        for (k, v) in c.as_object().into_iter().flatten() {
            match k.as_str() {
                "key" => {}
                "values" => values = Some(v),
                "notValues" => not_values = Some(v),
                other => self.unsupported.push(format!("when.{other}")),
            }
        }
        let field = format!("when {key:?}");
        let ok = |s: &str| Ok::<_, String>(s.to_owned());
        macro_rules! read {
            ($each:expr) => {
                (
                    values.and_then(|v| self.list(v, &field, $each)),
                    not_values.and_then(|v| self.list(v, &field, $each)),
                )
            };
        }
        Some(match key {
            "source.ip" => {
                let (ip_blocks, not_ip_blocks) = read!(|s: &str| s.parse::<IpBlock>());
                Condition::Source(SourceMatch { ip_blocks, not_ip_blocks, ..Default::default() })
            }
            "source.namespace" => {
                let (namespaces, not_namespaces) = read!(ok);
                Condition::Source(SourceMatch { namespaces, not_namespaces, ..Default::default() })
            }
            "source.principal" => {
                let (principals, not_principals) = read!(ok);
                Condition::Source(SourceMatch { principals, not_principals, ..Default::default() })
            }
            "destination.port" => {
                let (ports, not_ports) = read!(|s: &str| port(s, "destination.port"));
                Condition::Port(PortMatch { ports, not_ports })
            }
            other => {
                self.unsupported.push(format!("when key {other:?}"));
                return None;
            }
        })
    }

    /// Reads one rule (`from`, `to`, `when`).
    fn rule(&mut self, r: &Value) -> MatchRule {
        let mut rule = MatchRule::default();
        for (k, v) in r.as_object().into_iter().flatten() {
            let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
            if !v.is_array() && matches!(k.as_str(), "from" | "to" | "when") {
                self.unsupported.push(format!("rules[].{k} is not a list"));
            }
            match k.as_str() {
                "from" => {
                    for f in items {
                        for (fk, fv) in f.as_object().into_iter().flatten() {
                            if fk == "source" {
                                rule.from.push(self.source(fv));
                            } else {
                                self.unsupported.push(format!("from[].{fk}"));
                            }
                        }
                    }
                }
                "to" => {
                    for t in items {
                        for (tk, tv) in t.as_object().into_iter().flatten() {
                            if tk == "operation" {
                                rule.to.push(self.operation(tv));
                            } else {
                                self.unsupported.push(format!("to[].{tk}"));
                            }
                        }
                    }
                }
                "when" => rule.when.extend(items.iter().filter_map(|c| self.condition(c))),
                other => self.unsupported.push(format!("rules[].{other}")),
            }
        }
        rule
    }
}

fn authorization_policy(o: &Value, pods: &PodLabels, root: &str, out: &mut MeshPolicy) {
    let m = meta(o);
    let subject = format!("{AUTHORIZATION_POLICY} {}/{}", m.namespace, m.name);
    let spec = &o["spec"];
    let problem = |out: &mut MeshPolicy, message: String| {
        out.problems.push(Problem { subject: subject.clone(), message });
    };
    for k in ["targetRef", "targetRefs"] {
        if !spec[k].is_null() {
            problem(out, format!("{k}: the policy applies to a waypoint, gateway or Service, which tlsmesh has not; ignored (as ztunnel does)"));
            return;
        }
    }
    let action = match spec["action"].as_str().unwrap_or("ALLOW") {
        "ALLOW" => Action::Allow,
        "DENY" => Action::Deny,
        "AUDIT" => {
            problem(out, "action AUDIT is not supported (tlsmesh has no audit log); the policy is ignored, which changes no decision".into());
            return;
        }
        "CUSTOM" => {
            problem(out, "action CUSTOM (an external authorizer) is not supported; enforced as DENY of what its rules match at L4, to fail closed".into());
            Action::Deny
        }
        other => {
            problem(out, format!("action {other:?} is unknown; the policy is ignored"));
            return;
        }
    };
    let namespace = (m.namespace != root).then(|| m.namespace.clone());
    let mut selector = Selector { namespace: namespace.clone(), ..Default::default() };
    for (k, v) in spec["selector"].as_object().into_iter().flatten() {
        if k == "matchLabels" {
            let wanted: BTreeMap<String, String> = v
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_owned())))
                .collect();
            selector.pods = Some(by_labels(pods, namespace.as_deref(), &wanted));
        } else {
            // Fail closed: a selector tlsmesh cannot read selects nothing
            // for an ALLOW... which would allow more; so the policy is
            // applied to the whole namespace instead.
            problem(out, format!("selector.{k} is not supported; the policy applies as if it selected every pod of the namespace"));
        }
    }
    for k in spec.as_object().into_iter().flatten().map(|(k, _)| k) {
        if !matches!(k.as_str(), "action" | "selector" | "rules" | "provider") {
            problem(out, format!("spec.{k} is not supported; ignored"));
        }
    }
    let mut rules = Vec::new();
    for (i, r) in spec["rules"].as_array().into_iter().flatten().enumerate() {
        let mut reading = Reading::default();
        let rule = reading.rule(r);
        if reading.unsupported.is_empty() {
            rules.push(rule);
        } else if action == Action::Allow {
            problem(out, format!("rules[{i}]: {} cannot be evaluated at L4 (needs HTTP, or malformed); this ALLOW rule never matches, which is more restrictive than written", reading.unsupported.join(", ")));
        } else {
            problem(out, format!("rules[{i}]: {} cannot be evaluated at L4 (needs HTTP, or malformed); this DENY rule denies everything its other fields match, which is more restrictive than written", reading.unsupported.join(", ")));
            rules.push(rule);
        }
    }
    out.authorizations.push(Authorization { name: subject, action, selector, rules });
}

fn peer_authentications(objects: &[Value], root: &str, out: &mut MeshPolicy) {
    let mut sorted: Vec<(Meta, &Value)> = objects.iter().map(|o| (meta(o), o)).collect();
    // Istio uses the oldest when several apply; then by name.
    sorted.sort_by(|(a, _), (b, _)| (&a.created, &a.name).cmp(&(&b.created, &b.name)));
    let mut chosen: BTreeMap<String, String> = BTreeMap::new();
    for (m, o) in sorted {
        let subject = format!("{PEER_AUTHENTICATION} {}/{}", m.namespace, m.name);
        let spec = &o["spec"];
        let mut problem =
            |message: String| out.problems.push(Problem { subject: subject.clone(), message });
        if !spec["selector"].is_null() {
            problem("selector (a per-workload mode) is not supported; the policy is ignored: set tlsmesh.io/mode on the pods instead".into());
            continue;
        }
        if !spec["portLevelMtls"].is_null() {
            problem(
                "portLevelMtls is not supported; the namespace-wide mode applies to every port"
                    .into(),
            );
        }
        let mode = match spec["mtls"]["mode"].as_str().unwrap_or("UNSET") {
            "STRICT" => MtlsMode::Strict,
            "PERMISSIVE" => MtlsMode::Permissive,
            "DISABLE" => MtlsMode::Disable,
            "UNSET" => continue,
            other => {
                problem(format!("mtls.mode {other:?} is unknown; the policy is ignored"));
                continue;
            }
        };
        if let Some(first) = chosen.get(&m.namespace) {
            problem(format!(
                "{first} applies to this namespace too and is older; this one is ignored"
            ));
            continue;
        }
        chosen.insert(m.namespace.clone(), subject);
        if m.namespace == root {
            out.mesh_mode = Some(mode);
        } else {
            out.namespace_modes.insert(m.namespace, mode);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::{mesh::Request, Decision, Destination, Source};

    fn ap(ns: &str, name: &str, spec: Value) -> Value {
        let mut o = json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"namespace": ns, "name": name}});
        o["spec"] = spec;
        o
    }

    fn istio(policies: Vec<Value>) -> MeshPolicy {
        let pods: PodLabels = [
            ("shop/db".to_owned(), [("app".to_owned(), "db".to_owned())].into()),
            ("shop/web".to_owned(), [("app".to_owned(), "web".to_owned())].into()),
        ]
        .into();
        compile(
            &Objects { authorization_policies: policies, ..Default::default() },
            &pods,
            "istio-system",
        )
    }

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const EXP: &str = "spiffe://cluster.local/ns/lab/sa/exp";

    fn to(p: &MeshPolicy, id: Option<&str>, ip: &str, pod: &str, port: u16) -> bool {
        let ns = id.map(|i| i.split('/').nth(4).unwrap());
        let r = Request {
            source: Source { identity: id, namespace: ns },
            source_ip: Some(ip.parse().unwrap()),
            destination: Destination { namespace: "shop", pod, service_account: pod, port },
        };
        p.decide(&r) == Decision::Allow
    }

    #[test]
    fn principals_namespaces_and_ports() {
        let p = istio(vec![ap(
            "shop",
            "db",
            json!({
            "selector": {"matchLabels": {"app": "db"}},
            "action": "ALLOW",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}],
                       "to": [{"operation": {"ports": ["5432"]}}]}]}),
        )]);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert!(to(&p, Some(WEB), "10.0.0.1", "db", 5432));
        assert!(!to(&p, Some(WEB), "10.0.0.1", "db", 22));
        assert!(!to(&p, Some(EXP), "10.0.0.1", "db", 5432));
        assert!(to(&p, Some(EXP), "10.0.0.1", "web", 80), "the selector picks db only");
        let p = istio(vec![ap(
            "shop",
            "ns",
            json!({
            "rules": [{"from": [{"source": {"namespaces": ["lab"]}}]}]}),
        )]);
        assert!(to(&p, Some(EXP), "10.0.0.1", "web", 80));
        assert!(
            !to(&p, Some(WEB), "10.0.0.1", "web", 80),
            "namespace-wide: web is default-deny too"
        );
    }

    #[test]
    fn not_forms_ip_blocks_and_when() {
        let p = istio(vec![ap(
            "shop",
            "deny",
            json!({
            "action": "DENY",
            "rules": [
                {"from": [{"source": {"notNamespaces": ["shop"], "notIpBlocks": ["10.9.0.0/16"]}}],
                 "to": [{"operation": {"notPorts": ["80"]}}]},
                {"from": [{"source": {"ipBlocks": ["192.168.0.0/16"]}}]},
                {"when": [{"key": "source.principal", "values": ["*/sa/evil"]},
                          {"key": "destination.port", "notValues": ["443"]}]},
            ]}),
        )]);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert!(!to(&p, Some(EXP), "10.0.0.1", "db", 5432), "not shop, not 10.9, not 80");
        assert!(to(&p, Some(EXP), "10.0.0.1", "db", 80));
        assert!(to(&p, Some(EXP), "10.9.0.1", "db", 5432));
        assert!(to(&p, Some(WEB), "10.0.0.1", "db", 5432));
        assert!(!to(&p, Some(WEB), "192.168.1.1", "db", 5432), "ipBlocks");
        let evil = "spiffe://cluster.local/ns/shop/sa/evil";
        assert!(!to(&p, Some(evil), "10.0.0.1", "db", 5432));
        assert!(to(&p, Some(evil), "10.0.0.1", "db", 443), "when: all conditions");
        let p = istio(vec![ap(
            "shop",
            "w",
            json!({
            "rules": [{"when": [{"key": "source.ip", "values": ["10.1.0.0/16"]},
                                {"key": "source.namespace", "values": ["lab"]}]}]}),
        )]);
        assert!(to(&p, Some(EXP), "10.1.2.3", "db", 1));
        assert!(!to(&p, Some(EXP), "10.2.2.3", "db", 1));
        assert!(!to(&p, Some(WEB), "10.1.2.3", "db", 1));
    }

    #[test]
    fn l7_in_allow_never_matches_in_deny_keeps_the_l4_part() {
        let p = istio(vec![ap(
            "shop",
            "get",
            json!({
            "rules": [
                {"from": [{"source": {"namespaces": ["lab"]}}], "to": [{"operation": {"methods": ["GET"]}}]},
                {"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]},
            ]}),
        )]);
        assert_eq!(p.problems.len(), 1);
        assert!(
            p.problems[0].message.contains("operation.methods")
                && p.problems[0].message.contains("never matches"),
            "{:?}",
            p.problems
        );
        assert!(!to(&p, Some(EXP), "10.0.0.1", "db", 80), "the GET rule is dropped");
        assert!(to(&p, Some(WEB), "10.0.0.1", "db", 80), "the other rule still allows");
        let p = istio(vec![ap(
            "shop",
            "nojwt",
            json!({
            "action": "DENY",
            "rules": [{"from": [{"source": {"namespaces": ["lab"], "requestPrincipals": ["*"]}}],
                       "to": [{"operation": {"paths": ["/admin"], "ports": ["8080"]}}],
                       "when": [{"key": "request.auth.claims[iss]", "values": ["x"]}]}]}),
        )]);
        let m = &p.problems[0].message;
        for f in [
            "source.requestPrincipals",
            "operation.paths",
            "request.auth.claims[iss]",
            "denies everything",
        ] {
            assert!(m.contains(f), "{m}");
        }
        assert!(!to(&p, Some(EXP), "10.0.0.1", "db", 8080), "denied by the L4 part");
        assert!(to(&p, Some(EXP), "10.0.0.1", "db", 80));
        assert!(to(&p, Some(WEB), "10.0.0.1", "db", 8080));
    }

    #[test]
    fn bad_values_are_problems_and_fail_closed() {
        let p = istio(vec![ap(
            "shop",
            "bad",
            json!({
            "rules": [{"to": [{"operation": {"ports": ["http"]}}]},
                      {"from": [{"source": {"ipBlocks": ["ten"]}}]},
                      {"from": {"source": {}}}]}),
        )]);
        assert_eq!(p.problems.len(), 3, "{:?}", p.problems);
        assert!(p.problems.iter().any(|x| x.message.contains("rules[].from is not a list")));
        assert!(p.problems.iter().any(|x| x.message.contains("\"http\" is not a port")));
        assert!(
            !to(&p, Some(WEB), "10.0.0.1", "db", 80),
            "an ALLOW with only broken rules allows nothing"
        );
    }

    #[test]
    fn actions_and_scopes() {
        let p = istio(vec![
            ap("shop", "audit", json!({"action": "AUDIT", "rules": [{}]})),
            ap(
                "shop",
                "custom",
                json!({"action": "CUSTOM", "provider": {"name": "x"}, "rules": [{"to": [{"operation": {"ports": ["22"]}}]}]}),
            ),
            ap(
                "shop",
                "waypoint",
                json!({"targetRefs": [{"kind": "Service", "name": "db"}], "rules": [{}]}),
            ),
        ]);
        let msgs: Vec<_> = p.problems.iter().map(|x| x.message.as_str()).collect();
        assert_eq!(msgs.len(), 3, "{msgs:?}");
        assert!(
            msgs.iter().any(|m| m.contains("AUDIT"))
                && msgs.iter().any(|m| m.contains("CUSTOM"))
                && msgs.iter().any(|m| m.contains("targetRefs"))
        );
        assert!(to(&p, Some(WEB), "10.0.0.1", "db", 80));
        assert!(!to(&p, Some(WEB), "10.0.0.1", "db", 22), "CUSTOM denies its L4 part");
        // The root namespace applies everywhere; an empty spec allows nothing.
        let p = istio(vec![ap("istio-system", "deny-all", json!({}))]);
        assert_eq!(p.authorizations[0].selector.namespace, None);
        assert!(!to(&p, Some(WEB), "10.0.0.1", "db", 80));
        // Another namespace's policy does not apply.
        let p = istio(vec![ap("lab", "deny-all", json!({}))]);
        assert!(to(&p, Some(WEB), "10.0.0.1", "db", 80));
    }

    #[test]
    fn l4_policy_is_the_toml_rule() {
        let l4 = json!({"apiVersion": "tlsmesh.io/v1alpha1", "kind": "L4Policy",
            "metadata": {"namespace": "shop", "name": "only-web"},
            "spec": {"action": "allow", "matchLabels": {"app": "db"}, "fromIdentities": [WEB],
                     "fromIpBlocks": ["10.5.0.0/16"], "ports": [5432]}});
        let pods: PodLabels =
            [("shop/db".to_owned(), [("app".to_owned(), "db".to_owned())].into())].into();
        let l4s = |v: Vec<Value>| {
            compile(&Objects { l4_policies: v, ..Default::default() }, &pods, "istio-system")
        };
        let p = l4s(vec![l4]);
        assert!(p.problems.is_empty(), "{:?}", p.problems);
        assert_eq!(p.authorizations[0].name, "L4Policy shop/only-web");
        assert!(to(&p, Some(WEB), "10.0.0.1", "db", 5432));
        assert!(to(&p, Some(EXP), "10.5.0.1", "db", 5432), "or from the block");
        assert!(!to(&p, Some(EXP), "10.0.0.1", "db", 5432));
        assert!(!to(&p, Some(WEB), "10.0.0.1", "db", 80));
        assert!(to(&p, Some(EXP), "10.0.0.1", "web", 80), "web has no app=db label");

        // A typo (kept by the CRD's preserve-unknown-fields): an allow
        // matches nothing, a deny applies without the field.
        let typo = |action: &str| {
            json!({"metadata": {"namespace": "shop", "name": "typo"},
                "spec": {"action": action, "pods": ["db"], "fromNamespace": ["lab"], "ports": [0]}})
        };
        let p = l4s(vec![typo("allow")]);
        assert_eq!(p.problems.len(), 1);
        let m = &p.problems[0].message;
        assert!(
            m.contains("spec.fromNamespace") && m.contains("[0]") && m.contains("matches nothing"),
            "{m}"
        );
        assert!(!to(&p, Some(EXP), "10.0.0.1", "db", 80));
        assert!(to(&p, Some(EXP), "10.0.0.1", "web", 80), "only db is selected");
        let p = l4s(vec![typo("deny")]);
        assert!(
            !to(&p, Some(WEB), "10.0.0.1", "db", 80),
            "the deny without its from: every source"
        );
        assert!(to(&p, Some(WEB), "10.0.0.1", "web", 80));
        let p = l4s(vec![
            json!({"metadata": {"namespace": "shop", "name": "x"}, "spec": {"action": "maybe"}}),
        ]);
        assert!(p.authorizations.is_empty() && p.problems[0].message.contains("maybe"));
    }

    fn pa(ns: &str, name: &str, created: &str, spec: Value) -> Value {
        let mut o =
            json!({"metadata": {"namespace": ns, "name": name, "creationTimestamp": created}});
        o["spec"] = spec;
        o
    }

    #[test]
    fn peer_authentication_modes() {
        let objects = Objects {
            peer_authentications: vec![
                pa(
                    "istio-system",
                    "mesh",
                    "2024-01-01T00:00:00Z",
                    json!({"mtls": {"mode": "STRICT"}}),
                ),
                pa("lab", "new", "2024-03-01T00:00:00Z", json!({"mtls": {"mode": "STRICT"}})),
                pa(
                    "lab",
                    "old",
                    "2024-02-01T00:00:00Z",
                    json!({"mtls": {"mode": "PERMISSIVE"}, "portLevelMtls": {"80": {"mode": "DISABLE"}}}),
                ),
                pa("shop", "unset", "2024-01-01T00:00:00Z", json!({"mtls": {"mode": "UNSET"}})),
                pa(
                    "shop",
                    "one",
                    "2024-01-01T00:00:00Z",
                    json!({"selector": {"matchLabels": {"app": "db"}}, "mtls": {"mode": "DISABLE"}}),
                ),
                pa("legacy", "off", "2024-01-01T00:00:00Z", json!({"mtls": {"mode": "DISABLE"}})),
            ],
            ..Default::default()
        };
        let p = compile(&objects, &PodLabels::new(), "istio-system");
        assert_eq!(p.mesh_mode, Some(MtlsMode::Strict));
        assert_eq!(p.mode_override("lab"), Some(MtlsMode::Permissive), "the oldest wins");
        assert_eq!(p.mode_override("legacy"), Some(MtlsMode::Disable));
        assert_eq!(
            p.mode_override("shop"),
            Some(MtlsMode::Strict),
            "UNSET inherits the mesh's; the selector one is ignored"
        );
        let subjects: Vec<_> =
            p.problems.iter().map(|x| (x.subject.as_str(), x.message.as_str())).collect();
        assert_eq!(subjects.len(), 3, "{subjects:?}");
        assert!(subjects
            .iter()
            .any(|(s, m)| *s == "PeerAuthentication lab/new" && m.contains("lab/old")));
        assert!(subjects
            .iter()
            .any(|(s, m)| *s == "PeerAuthentication lab/old" && m.contains("portLevelMtls")));
        assert!(subjects
            .iter()
            .any(|(s, m)| *s == "PeerAuthentication shop/one" && m.contains("selector")));
    }
}
