//! The general form of L4 authorization that every source compiles to: the
//! TOML [`Rule`]s, tlsmesh's `L4Policy` objects and Istio's
//! `AuthorizationPolicy` (see [`crate::objects`]), plus the per-namespace
//! mTLS mode overrides from Istio's `PeerAuthentication`.
//!
//! Evaluation is Istio's, for one connection to one destination pod:
//!
//! 1. if any `Deny` authorization that selects the destination matches, deny;
//! 2. if any `Allow` authorization selects it, one of them must match, else
//!    deny (an `Allow` with no rules selects and matches nothing: "deny all");
//! 3. else allow.
//!
//! An authorization matches when any of its rules does; a rule matches when
//! any of its `from` entries (none: any source) and any of its `to` entries
//! (none: any port) and every `when` condition match; inside an entry every
//! field given must match (the `not_` forms: the value must not be listed).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    str::FromStr,
};

use serde::Serialize;

use crate::{Action, Decision, Destination, Policy, Rule, Source};

/// Which pods an authorization applies to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Selector {
    /// The pods' namespace (`None`: every namespace, for policies in Istio's
    /// root namespace).
    pub namespace: Option<String>,
    /// Only pods running as one of these service accounts.
    pub service_accounts: Option<BTreeSet<String>>,
    /// Only these pods, by `namespace/name` (label selectors are resolved to
    /// pods when the objects are compiled).
    pub pods: Option<BTreeSet<String>>,
}

impl Selector {
    /// Whether `d` is one of the selected pods.
    pub fn selects(&self, d: &Destination<'_>) -> bool {
        self.namespace.as_deref().is_none_or(|n| n == d.namespace)
            && self.service_accounts.as_ref().is_none_or(|s| s.contains(d.service_account))
            && self.pods.as_ref().is_none_or(|p| p.contains(&format!("{}/{}", d.namespace, d.pod)))
    }
}

/// An address block, `10.0.0.0/8` or a single address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IpBlock {
    /// First address.
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl IpBlock {
    /// Whether `ip` is inside (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for IpBlock {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s.split_once('/').map_or((s, None), |(a, p)| (a, Some(p)));
        let addr: IpAddr =
            a.parse().map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
        let addr = addr.to_canonical();
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= max)
                .ok_or_else(|| format!("{s:?} has a bad prefix length"))?,
        };
        Ok(Self { addr, prefix })
    }
}

impl fmt::Display for IpBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// Conditions on the source; every field given must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SourceMatch {
    /// Identities: SPIFFE ids with or without `spiffe://` (Istio writes
    /// `cluster.local/ns/x/sa/y`), `*`, `prefix*` or `*suffix`.
    pub principals: Option<Vec<String>>,
    /// Identities that must not match (plaintext matches none).
    pub not_principals: Option<Vec<String>>,
    /// Namespaces (from the identity), with the same wildcards.
    pub namespaces: Option<Vec<String>>,
    /// Namespaces that must not match.
    pub not_namespaces: Option<Vec<String>>,
    /// Source address blocks.
    pub ip_blocks: Option<Vec<IpBlock>>,
    /// Source address blocks that must not match.
    pub not_ip_blocks: Option<Vec<IpBlock>>,
}

/// Istio's string match: exact, `*` (any non-empty), `prefix*`, `*suffix`.
fn wildcard(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else {
        pattern == value
    }
}

fn principal(pattern: &str, identity: &str) -> bool {
    let id = identity.strip_prefix("spiffe://").unwrap_or(identity);
    wildcard(pattern.strip_prefix("spiffe://").unwrap_or(pattern), id)
}

/// `Some(list)`: the value must match one; `None`: no condition.
fn any_of<T>(list: Option<&Vec<T>>, hit: impl Fn(&T) -> bool) -> bool {
    list.is_none_or(|l| l.iter().any(hit))
}

fn none_of<T>(list: Option<&Vec<T>>, hit: impl Fn(&T) -> bool) -> bool {
    list.is_none_or(|l| !l.iter().any(hit))
}

impl SourceMatch {
    /// Whether the source matches.
    pub fn matches(&self, r: &Request<'_>) -> bool {
        let id = r.source.identity;
        let ns = r.source.namespace;
        let ip = r.source_ip;
        any_of(self.principals.as_ref(), |p| id.is_some_and(|i| principal(p, i)))
            && none_of(self.not_principals.as_ref(), |p| id.is_some_and(|i| principal(p, i)))
            && any_of(self.namespaces.as_ref(), |p| ns.is_some_and(|n| wildcard(p, n)))
            && none_of(self.not_namespaces.as_ref(), |p| ns.is_some_and(|n| wildcard(p, n)))
            && any_of(self.ip_blocks.as_ref(), |b| ip.is_some_and(|a| b.contains(a)))
            && none_of(self.not_ip_blocks.as_ref(), |b| ip.is_some_and(|a| b.contains(a)))
    }
}

/// Conditions on the destination port.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct PortMatch {
    /// One of these.
    pub ports: Option<Vec<u16>>,
    /// None of these.
    pub not_ports: Option<Vec<u16>>,
}

impl PortMatch {
    /// Whether the destination port matches.
    pub fn matches(&self, port: u16) -> bool {
        any_of(self.ports.as_ref(), |p| *p == port)
            && none_of(self.not_ports.as_ref(), |p| *p == port)
    }
}

/// One `when` condition (all of a rule's must hold).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum Condition {
    /// On the source (`source.ip`, `source.namespace`, `source.principal`).
    Source(SourceMatch),
    /// On the port (`destination.port`).
    Port(PortMatch),
}

/// One rule of an authorization.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MatchRule {
    /// Any of these sources (empty: any source).
    pub from: Vec<SourceMatch>,
    /// Any of these ports (empty: any port).
    pub to: Vec<PortMatch>,
    /// All of these.
    pub when: Vec<Condition>,
}

impl MatchRule {
    /// Whether the connection matches the rule.
    pub fn matches(&self, r: &Request<'_>) -> bool {
        (self.from.is_empty() || self.from.iter().any(|s| s.matches(r)))
            && (self.to.is_empty() || self.to.iter().any(|p| p.matches(r.destination.port)))
            && self.when.iter().all(|c| match c {
                Condition::Source(s) => s.matches(r),
                Condition::Port(p) => p.matches(r.destination.port),
            })
    }
}

/// One authorization: a TOML rule, an `L4Policy` or an Istio
/// `AuthorizationPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Authorization {
    /// Where it comes from, for denials and logs (`L4Policy shop/only-web`).
    pub name: String,
    /// Allow or deny.
    pub action: Action,
    /// The pods it applies to.
    pub selector: Selector,
    /// Matches when any rule does (none: matches nothing).
    pub rules: Vec<MatchRule>,
}

impl Authorization {
    /// Whether it matches the connection.
    pub fn matches(&self, r: &Request<'_>) -> bool {
        self.rules.iter().any(|m| m.matches(r))
    }
}

fn some_nonempty<T: Clone>(v: &[T]) -> Option<Vec<T>> {
    (!v.is_empty()).then(|| v.to_vec())
}

impl From<&Rule> for Authorization {
    /// A TOML rule: its sources are namespaces *or* identities (two `from`
    /// entries), its ports one `to` entry.
    fn from(r: &Rule) -> Self {
        let mut from = Vec::new();
        if !r.from_namespaces.is_empty() {
            from.push(SourceMatch {
                namespaces: some_nonempty(&r.from_namespaces),
                ..Default::default()
            });
        }
        if !r.from_identities.is_empty() {
            from.push(SourceMatch {
                principals: some_nonempty(&r.from_identities),
                ..Default::default()
            });
        }
        let to = if r.ports.is_empty() {
            vec![]
        } else {
            vec![PortMatch { ports: some_nonempty(&r.ports), not_ports: None }]
        };
        let set = |v: &[String]| (!v.is_empty()).then(|| v.iter().cloned().collect());
        Authorization {
            name: format!("rule {:?}", r.name),
            action: r.action,
            selector: Selector {
                namespace: Some(r.to_namespace.clone()),
                service_accounts: set(&r.to_service_accounts),
                pods: set(&r
                    .to_pods
                    .iter()
                    .map(|p| format!("{}/{p}", r.to_namespace))
                    .collect::<Vec<_>>()),
            },
            rules: vec![MatchRule { from, to, when: vec![] }],
        }
    }
}

/// A connection, as the policy sees it.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The authenticated source.
    pub source: Source<'a>,
    /// The source's address, if known (Istio's `ipBlocks` / `source.ip`;
    /// unknown matches no block).
    pub source_ip: Option<IpAddr>,
    /// The destination pod and port.
    pub destination: Destination<'a>,
}

/// Istio `PeerAuthentication` mTLS modes (`UNSET`: inherit, not recorded).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MtlsMode {
    /// Only mTLS in.
    Strict,
    /// mTLS and plaintext in.
    Permissive,
    /// Istio's "plaintext": tlsmesh still sends mTLS between enrolled pods
    /// and accepts plaintext in, i.e. [`MtlsMode::Permissive`].
    Disable,
}

/// Something in a policy object that is not used as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The object: `AuthorizationPolicy shop/web`.
    pub subject: String,
    /// What is wrong and what tlsmesh does instead.
    pub message: String,
}

/// Everything the policy objects say, as the daemon uses it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MeshPolicy {
    /// The authorizations, in a stable order (by name).
    pub authorizations: Vec<Authorization>,
    /// mTLS mode overrides by namespace (namespace-wide `PeerAuthentication`).
    pub namespace_modes: BTreeMap<String, MtlsMode>,
    /// The mesh-wide mode (a `PeerAuthentication` in the root namespace).
    pub mesh_mode: Option<MtlsMode>,
    /// What was not used as written.
    pub problems: Vec<Problem>,
}

impl MeshPolicy {
    /// The TOML rules added to these (the file and the objects apply
    /// together; a deny from either denies).
    #[must_use]
    pub fn with_rules(mut self, file: &Policy) -> Self {
        self.authorizations.extend(file.rules.iter().map(Authorization::from));
        self
    }

    /// The `PeerAuthentication` override for `namespace`, if any: the
    /// namespace's own, else the mesh-wide one.
    pub fn mode_override(&self, namespace: &str) -> Option<MtlsMode> {
        self.namespace_modes.get(namespace).copied().or(self.mesh_mode)
    }

    /// Decides (see the module docs).
    pub fn decide(&self, r: &Request<'_>) -> Decision {
        let d = &r.destination;
        let selecting = || self.authorizations.iter().filter(|a| a.selector.selects(d));
        if let Some(a) = selecting().find(|a| a.action == Action::Deny && a.matches(r)) {
            return Decision::Deny(format!("denied by {}", a.name));
        }
        let allows: Vec<&Authorization> =
            selecting().filter(|a| a.action == Action::Allow).collect();
        if allows.is_empty() || allows.iter().any(|a| a.matches(r)) {
            Decision::Allow
        } else {
            Decision::Deny(format!(
                "no allow policy matches (selecting {}/{}: {})",
                d.namespace,
                d.pod,
                allows.iter().map(|a| a.name.as_str()).collect::<Vec<_>>().join(", ")
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req<'a>(
        id: Option<&'a str>,
        ns: Option<&'a str>,
        ip: Option<&str>,
        port: u16,
    ) -> Request<'a> {
        Request {
            source: Source { identity: id, namespace: ns },
            source_ip: ip.map(|i| i.parse().unwrap()),
            destination: Destination { namespace: "shop", pod: "db", service_account: "db", port },
        }
    }

    #[test]
    fn ip_blocks() {
        let b: IpBlock = "10.1.0.0/16".parse().unwrap();
        assert!(b.contains("10.1.2.3".parse().unwrap()));
        assert!(b.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!b.contains("10.2.0.1".parse().unwrap()));
        assert!(!b.contains("fd00::1".parse().unwrap()));
        let one: IpBlock = "fd00::1".parse().unwrap();
        assert_eq!(one.to_string(), "fd00::1/128");
        assert!(one.contains("fd00::1".parse().unwrap()));
        let all: IpBlock = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains("1.2.3.4".parse().unwrap()));
        assert!("10.0.0.0/33".parse::<IpBlock>().is_err());
        assert!("ten".parse::<IpBlock>().is_err());
    }

    #[test]
    fn principals_and_wildcards() {
        assert!(principal("cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a/sa/b"));
        assert!(principal("spiffe://cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a/sa/b"));
        assert!(principal("*/sa/x", "spiffe://td/ns/a/sa/x"));
        assert!(principal("cluster.local/ns/a/*", "spiffe://cluster.local/ns/a/sa/x"));
        assert!(principal("*", "spiffe://td/ns/a/sa/x"));
        assert!(!principal("cluster.local/ns/a/sa/b", "spiffe://cluster.local/ns/a/sa/c"));
        assert!(wildcard("*-prod", "shop-prod") && !wildcard("*", ""));
    }

    #[test]
    fn not_forms_and_plaintext() {
        let m = SourceMatch { not_principals: Some(vec!["*".into()]), ..Default::default() };
        assert!(m.matches(&req(None, None, None, 1)), "notPrincipals: [*] is plaintext");
        assert!(!m.matches(&req(Some("spiffe://td/ns/a/sa/b"), Some("a"), None, 1)));
        let m = SourceMatch { not_namespaces: Some(vec!["lab".into()]), ..Default::default() };
        assert!(m.matches(&req(None, Some("shop"), None, 1)));
        assert!(!m.matches(&req(None, Some("lab"), None, 1)));
        let m = SourceMatch {
            ip_blocks: Some(vec!["10.0.0.0/8".parse().unwrap()]),
            not_ip_blocks: Some(vec!["10.9.0.0/16".parse().unwrap()]),
            ..Default::default()
        };
        assert!(m.matches(&req(None, None, Some("10.1.1.1"), 1)));
        assert!(!m.matches(&req(None, None, Some("10.9.1.1"), 1)));
        assert!(!m.matches(&req(None, None, None, 1)), "an unknown address is in no block");
        let p = PortMatch { ports: None, not_ports: Some(vec![22]) };
        assert!(p.matches(80) && !p.matches(22));
    }

    #[test]
    fn toml_rules_decide_as_before() {
        let file: Policy = toml::from_str(
            r#"[[rule]]
            name = "fe"
            action = "allow"
            to_namespace = "shop"
            to_pods = ["db"]
            from_namespaces = ["shop"]
            from_identities = ["spiffe://td/ns/lab/sa/ci"]
            ports = [5432]"#,
        )
        .unwrap();
        let p = MeshPolicy::default().with_rules(&file);
        for (id, ns, port) in [
            (None, Some("shop"), 5432),
            (Some("spiffe://td/ns/lab/sa/ci"), Some("lab"), 5432),
            (None, Some("lab"), 5432),
            (None, Some("shop"), 22),
        ] {
            let r = req(id, ns, None, port);
            let (a, b) = (p.decide(&r), file.decide(r.source, r.destination));
            assert_eq!(
                a == Decision::Allow,
                b == Decision::Allow,
                "{id:?} {ns:?} {port}: {a:?} vs {b:?}"
            );
        }
    }

    #[test]
    fn deny_before_allow_and_allow_makes_default_deny() {
        let all = |action, rules| Authorization {
            name: format!("{action:?}"),
            action,
            selector: Selector { namespace: Some("shop".into()), ..Default::default() },
            rules,
        };
        let lab = MatchRule {
            from: vec![SourceMatch { namespaces: Some(vec!["lab".into()]), ..Default::default() }],
            ..Default::default()
        };
        let p = MeshPolicy {
            authorizations: vec![
                all(Action::Allow, vec![MatchRule::default()]),
                all(Action::Deny, vec![lab.clone()]),
            ],
            ..Default::default()
        };
        assert_eq!(p.decide(&req(None, Some("shop"), None, 1)), Decision::Allow);
        assert!(
            matches!(p.decide(&req(None, Some("lab"), None, 1)), Decision::Deny(m) if m.contains("Deny"))
        );
        // An ALLOW with no rules allows nothing; a DENY with none denies nothing.
        let p =
            MeshPolicy { authorizations: vec![all(Action::Allow, vec![])], ..Default::default() };
        assert!(matches!(p.decide(&req(None, Some("shop"), None, 1)), Decision::Deny(_)));
        let p =
            MeshPolicy { authorizations: vec![all(Action::Deny, vec![])], ..Default::default() };
        assert_eq!(p.decide(&req(None, Some("shop"), None, 1)), Decision::Allow);
        // Not selected: allowed.
        let mut other = all(Action::Allow, vec![]);
        other.selector.pods = Some(["shop/web".to_owned()].into());
        let p = MeshPolicy { authorizations: vec![other], ..Default::default() };
        assert_eq!(p.decide(&req(None, Some("lab"), None, 1)), Decision::Allow);
    }

    #[test]
    fn mode_override_namespace_before_mesh() {
        let p = MeshPolicy {
            namespace_modes: [("lab".to_owned(), MtlsMode::Permissive)].into(),
            mesh_mode: Some(MtlsMode::Strict),
            ..Default::default()
        };
        assert_eq!(p.mode_override("lab"), Some(MtlsMode::Permissive));
        assert_eq!(p.mode_override("shop"), Some(MtlsMode::Strict));
        assert_eq!(MeshPolicy::default().mode_override("shop"), None);
    }
}
