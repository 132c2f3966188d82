//! L4 authorization: who may reach which workload on which port.
//!
//! Rules live in a TOML file (`policy` in the node config), reloaded when it
//! changes. The semantics are Istio's `AuthorizationPolicy` at L4, which users
//! of Istio ambient already know:
//!
//! 1. a `deny` rule that selects the destination and matches the source and
//!    port denies;
//! 2. if any `allow` rule selects the destination, one of them must match
//!    the source and port, else deny;
//! 3. a destination no rule selects is allowed.
//!
//! ```toml
//! [[rule]]
//! name = "only-frontend-to-api"
//! action = "allow"                 # or "deny"
//! to_namespace = "shop"            # destination workload's namespace
//! to_service_accounts = ["api"]    # optional: narrow to these workloads
//! to_pods = []                     # optional: or these pod names
//! from_namespaces = ["shop"]       # optional: sources by namespace
//! from_identities = []             # optional: sources by SPIFFE id
//! ports = [8080]                   # optional: destination ports
//! ```
//!
//! The same rules also come from Kubernetes objects: tlsmesh's `L4Policy`
//! and the L4 subset of Istio's `AuthorizationPolicy` and
//! `PeerAuthentication` ([`mesh`] holds the general form, [`objects`]
//! the conversion); docs/KUBERNETES.md describes both.

#![forbid(unsafe_code)]

pub mod mesh;
pub mod objects;

use std::path::Path;

use serde::{Deserialize, Serialize};

/// A rule's action.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Allow matching traffic (and make the selected workload default-deny).
    Allow,
    /// Deny matching traffic.
    Deny,
}

/// One rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Name, for logs and counters.
    pub name: String,
    /// What it does.
    pub action: Action,
    /// Destination namespace.
    pub to_namespace: String,
    /// Destination service accounts (empty: all in the namespace).
    #[serde(default)]
    pub to_service_accounts: Vec<String>,
    /// Destination pod names (empty: all in the namespace).
    #[serde(default)]
    pub to_pods: Vec<String>,
    /// Source namespaces (empty with `from_identities` empty: any source).
    #[serde(default)]
    pub from_namespaces: Vec<String>,
    /// Source SPIFFE ids.
    #[serde(default)]
    pub from_identities: Vec<String>,
    /// Destination ports (empty: all).
    #[serde(default)]
    pub ports: Vec<u16>,
}

/// A rule set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The rules.
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
}

/// The destination of a connection, as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Destination<'a> {
    /// Namespace.
    pub namespace: &'a str,
    /// Pod name.
    pub pod: &'a str,
    /// Service account.
    pub service_account: &'a str,
    /// Port.
    pub port: u16,
}

/// The source, as authenticated.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    /// SPIFFE id URI (`None` for plaintext).
    pub identity: Option<&'a str>,
    /// Namespace from the identity.
    pub namespace: Option<&'a str>,
}

/// Allowed, or denied and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Go ahead.
    Allow,
    /// Refuse; the reason names the rule.
    Deny(String),
}

/// Policy errors.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// Unreadable file.
    #[error("cannot read policy {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// Bad TOML.
    #[error("policy {path} is malformed: {message}")]
    Malformed { path: String, message: String },
}

impl Policy {
    /// Reads a policy file.
    pub fn load(path: &Path) -> Result<Self, PolicyError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| PolicyError::Read { path: path.display().to_string(), source })?;
        toml::from_str(&text).map_err(|e| PolicyError::Malformed {
            path: path.display().to_string(),
            message: e.to_string(),
        })
    }

    /// Decides.
    pub fn decide(&self, src: Source<'_>, dst: Destination<'_>) -> Decision {
        let selecting: Vec<&Rule> = self.rules.iter().filter(|r| selects(r, dst)).collect();
        if let Some(r) = selecting.iter().find(|r| r.action == Action::Deny && matches(r, src, dst))
        {
            return Decision::Deny(format!("denied by rule {:?}", r.name));
        }
        let allows: Vec<&&Rule> = selecting.iter().filter(|r| r.action == Action::Allow).collect();
        if allows.is_empty() || allows.iter().any(|r| matches(r, src, dst)) {
            Decision::Allow
        } else {
            Decision::Deny(format!(
                "no allow rule matches (rules selecting {}/{}: {})",
                dst.namespace,
                dst.pod,
                allows.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
        }
    }
}

fn selects(r: &Rule, d: Destination<'_>) -> bool {
    r.to_namespace == d.namespace
        && (r.to_service_accounts.is_empty()
            || r.to_service_accounts.iter().any(|s| s == d.service_account))
        && (r.to_pods.is_empty() || r.to_pods.iter().any(|p| p == d.pod))
}

fn matches(r: &Rule, s: Source<'_>, d: Destination<'_>) -> bool {
    let port_ok = r.ports.is_empty() || r.ports.contains(&d.port);
    let any_source = r.from_namespaces.is_empty() && r.from_identities.is_empty();
    let src_ok = any_source
        || s.namespace.is_some_and(|n| r.from_namespaces.iter().any(|x| x == n))
        || s.identity.is_some_and(|i| r.from_identities.iter().any(|x| x == i));
    port_ok && src_ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dst(port: u16) -> Destination<'static> {
        Destination { namespace: "shop", pod: "api-1", service_account: "api", port }
    }
    fn src(ns: &'static str) -> Source<'static> {
        Source { identity: None, namespace: Some(ns) }
    }

    #[test]
    fn no_rule_allows() {
        assert_eq!(Policy::default().decide(src("x"), dst(80)), Decision::Allow);
    }

    #[test]
    fn allow_rules_make_the_workload_default_deny() {
        let p: Policy = toml::from_str(
            r#"[[rule]]
            name = "fe"
            action = "allow"
            to_namespace = "shop"
            to_service_accounts = ["api"]
            from_namespaces = ["shop"]
            ports = [8080]"#,
        )
        .unwrap();
        assert_eq!(p.decide(src("shop"), dst(8080)), Decision::Allow);
        assert!(matches!(p.decide(src("lab"), dst(8080)), Decision::Deny(r) if r.contains("fe")));
        assert!(matches!(p.decide(src("shop"), dst(22)), Decision::Deny(_)));
        let other = Destination { namespace: "shop", pod: "db", service_account: "db", port: 1 };
        assert_eq!(p.decide(src("lab"), other), Decision::Allow, "rule does not select db");
    }

    #[test]
    fn deny_wins() {
        let p: Policy = toml::from_str(
            r#"[[rule]]
            name = "all"
            action = "allow"
            to_namespace = "shop"
            [[rule]]
            name = "no-lab"
            action = "deny"
            to_namespace = "shop"
            from_identities = ["spiffe://td/ns/lab/sa/x"]"#,
        )
        .unwrap();
        let lab = Source { identity: Some("spiffe://td/ns/lab/sa/x"), namespace: Some("lab") };
        assert_eq!(p.decide(lab, dst(1)), Decision::Deny("denied by rule \"no-lab\"".into()));
        assert_eq!(p.decide(src("lab"), dst(1)), Decision::Allow);
    }

    #[test]
    fn malformed_policy_names_the_file() {
        let dir = std::env::temp_dir().join(format!("tlsmesh-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("p.toml");
        std::fs::write(&f, "[[rule]]\nname = 1").unwrap();
        let e = Policy::load(&f).unwrap_err().to_string();
        assert!(e.contains("p.toml"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
