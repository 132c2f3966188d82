//! Authorization of connections to a pod on this node, as pure functions
//! over the policy in force ([`MeshPolicy`]: policy objects and the TOML
//! rules together):
//!
//! - [`authorize`]: one tunnelled connection — is the requested address the
//!   pod's, may the claimed client address (`forwarded: for`) be used as
//!   the source, does policy allow the authenticated peer;
//! - [`authorize_local`]: a pod on this node to another one here (no
//!   tunnel, but the same policy: the source pod's identity is known from
//!   the netns its connection was captured in);
//! - [`authorize_plaintext`]: plaintext accepted by a permissive pod (no
//!   principal, its source address only; node probes are not asked);
//! - [`recheck`]: an open connection of the connection table against a new
//!   policy (ztunnel's re-check: what the new policy denies is closed).
//!
//! The source address policy sees (`ipBlocks`, `source.ip`) is the claimed
//! client address when the peer owns it, else the address the tunnel came
//! from (the peer node), as in ztunnel; for plaintext and local delivery it
//! is the client's.

use std::net::{IpAddr, SocketAddr};

use tlsmesh_identity::SpiffeId;

use crate::{
    conns::{ConnInfo, Direction, Route},
    inventory::Pod,
    policy::{
        mesh::{MeshPolicy, Request},
        Decision, Destination, Source,
    },
};

/// Why a tunnelled connection is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// The authority is not an address of the pod the tunnel arrived at
    /// (answered 400, as ztunnel does).
    NotThisPod(String),
    /// L4 policy denies it (answered 401, logged and counted as a deny).
    Policy(String),
}

/// What is allowed: the source address to deliver from (`None`: the pod's
/// own address; the claimed one was absent or not the peer's), and whether
/// a claimed address was ignored (worth a warning).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allowed {
    /// Deliver from this address (transparent) when `Some`.
    pub src_ip: Option<IpAddr>,
    /// A `forwarded: for` address was sent but does not belong to the peer.
    pub forwarded_ignored: bool,
    /// The source as policy saw it (recorded in the connection table, so
    /// a re-check decides on the same address).
    pub source: SocketAddr,
}

/// The policy decision for a connection from `identity` (a SPIFFE URI;
/// `None`: plaintext) at `source_ip` to `pod` on `port`.
fn decide(
    policy: &MeshPolicy,
    pod: &Pod,
    identity: Option<&SpiffeId>,
    source_ip: IpAddr,
    port: u16,
) -> Result<(), String> {
    let uri = identity.map(ToString::to_string);
    let request = Request {
        source: Source { identity: uri.as_deref(), namespace: identity.map(SpiffeId::namespace) },
        source_ip: Some(source_ip.to_canonical()),
        destination: Destination {
            namespace: &pod.namespace,
            pod: &pod.name,
            service_account: &pod.service_account,
            port,
        },
    };
    match policy.decide(&request) {
        Decision::Allow => Ok(()),
        Decision::Deny(reason) => Err(reason),
    }
}

/// Decides one request for `pod`: `authority` is what the peer asked for,
/// `peer` its authenticated identity, `peer_addr` where the tunnel came
/// from, `forwarded_for` the client address it claims, and `identity_of`
/// the identity of the pod that owns an address (from the inventory).
pub fn authorize(
    policy: &MeshPolicy,
    pod: &Pod,
    authority: SocketAddr,
    peer: &SpiffeId,
    peer_addr: SocketAddr,
    forwarded_for: Option<SocketAddr>,
    identity_of: impl Fn(IpAddr) -> Option<String>,
) -> Result<Allowed, Denial> {
    if !pod.ips.iter().any(|ip| ip.to_canonical() == authority.ip().to_canonical()) {
        return Err(Denial::NotThisPod(format!(
            "{} is not an address of pod {}",
            authority.ip(),
            pod.key()
        )));
    }
    let peer_uri = peer.to_string();
    let claimed = forwarded_for.filter(|f| {
        // A claimed address is used only if a pod with the authenticated
        // identity owns it, and only in the destination's address family.
        f.is_ipv4() == authority.is_ipv4() && identity_of(f.ip()).is_some_and(|id| id == peer_uri)
    });
    let source = claimed.unwrap_or(peer_addr);
    decide(policy, pod, Some(peer), source.ip(), authority.port()).map_err(Denial::Policy)?;
    Ok(Allowed {
        src_ip: claimed.map(|c| c.ip()),
        forwarded_ignored: forwarded_for.is_some() && claimed.is_none(),
        source,
    })
}

/// Decides a connection of the pod with identity `src_identity` (a SPIFFE
/// URI) from `src` to `dst_pod` at `dst`, both on this node.
pub fn authorize_local(
    policy: &MeshPolicy,
    dst_pod: &Pod,
    src_identity: &str,
    src: SocketAddr,
    dst: SocketAddr,
) -> Result<(), String> {
    let id: SpiffeId = src_identity
        .parse()
        .map_err(|e| format!("source identity {src_identity} unreadable: {e}"))?;
    decide(policy, dst_pod, Some(&id), src.ip(), dst.port())
}

/// Decides plaintext from `peer` to `pod` at `dst` (a permissive pod).
pub fn authorize_plaintext(
    policy: &MeshPolicy,
    pod: &Pod,
    peer: SocketAddr,
    dst: SocketAddr,
) -> Result<(), String> {
    decide(policy, pod, None, peer.ip(), dst.port())
}

/// Re-decides an open connection under `policy`: `Err(reason)` when it
/// would not be allowed now. `pod_of` finds a pod of the inventory by key
/// (the destination: the entry's pod for inbound connections, its peer pod
/// for local delivery). Only what policy admitted is asked — inbound tunnel
/// streams, inbound plaintext, local delivery; tunnel streams out (decided
/// at the destination), passthrough and node probes stay. A destination
/// that left the inventory is not decided here (its pod's removal ends it).
pub fn recheck<'p>(
    policy: &MeshPolicy,
    info: &ConnInfo,
    pod_of: impl Fn(&str) -> Option<&'p Pod>,
) -> Result<(), String> {
    let (dst_key, identity) = match (info.direction, info.route) {
        (Direction::Inbound, Route::Tunnel) => match info.src_identity.as_deref() {
            Some(id) => (info.pod.as_str(), Some(id)),
            None => return Err("tunnel connection without a peer identity".into()),
        },
        (Direction::Inbound, Route::Plaintext) => (info.pod.as_str(), None),
        (Direction::Outbound, Route::Local) => match (&info.peer_pod, &info.src_identity) {
            (Some(dst), Some(id)) => (dst.as_str(), Some(id.as_str())),
            _ => return Ok(()),
        },
        _ => return Ok(()),
    };
    let Some(pod) = pod_of(dst_key) else { return Ok(()) };
    match identity {
        Some(uri) => {
            let id: SpiffeId =
                uri.parse().map_err(|e| format!("peer identity {uri} unreadable: {e}"))?;
            decide(policy, pod, Some(&id), info.src.ip(), info.dst.port())
        }
        None => decide(policy, pod, None, info.src.ip(), info.dst.port()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        inventory::Mode,
        policy::{
            mesh::{Authorization, IpBlock, MatchRule, Selector, SourceMatch},
            Action, Policy, Rule,
        },
    };

    fn pod() -> Pod {
        Pod {
            name: "db".into(),
            namespace: "shop".into(),
            service_account: "db".into(),
            node: "n1".into(),
            ips: vec!["10.0.1.2".parse().unwrap(), "fd00::1:2".parse().unwrap()],
            netns: None,
            mode: Some(Mode::Strict),
            workload: None,
        }
    }

    fn id(ns: &str, sa: &str) -> SpiffeId {
        SpiffeId::new("td", ns.to_string(), sa.to_string()).unwrap()
    }

    /// 10.0.0.5 belongs to shop/web; 10.0.0.6 to lab/exp.
    fn owners(ip: IpAddr) -> Option<String> {
        match ip.to_string().as_str() {
            "10.0.0.5" => Some(id("shop", "web").to_string()),
            "10.0.0.6" => Some(id("lab", "exp").to_string()),
            _ => None,
        }
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The peer node's address (where tunnels come from).
    const NODE: &str = "192.168.0.10:41000";

    fn only_web_to_db() -> MeshPolicy {
        MeshPolicy::default().with_rules(&Policy {
            rules: vec![Rule {
                name: "only-web".into(),
                action: Action::Allow,
                to_namespace: "shop".into(),
                to_service_accounts: vec!["db".into()],
                to_pods: vec![],
                from_namespaces: vec![],
                from_identities: vec![id("shop", "web").to_string()],
                ports: vec![5432],
            }],
        })
    }

    /// Denies sources in `block` to every pod of `shop`.
    fn deny_block(block: &str) -> MeshPolicy {
        let (a, p) = block.split_once('/').unwrap();
        MeshPolicy {
            authorizations: vec![Authorization {
                name: "AuthorizationPolicy shop/no-block".into(),
                action: Action::Deny,
                selector: Selector { namespace: Some("shop".into()), ..Selector::default() },
                rules: vec![MatchRule {
                    from: vec![SourceMatch {
                        ip_blocks: Some(vec![IpBlock {
                            addr: a.parse().unwrap(),
                            prefix: p.parse().unwrap(),
                        }]),
                        ..SourceMatch::default()
                    }],
                    ..MatchRule::default()
                }],
            }],
            ..MeshPolicy::default()
        }
    }

    #[test]
    fn the_authority_must_be_the_pods() {
        let any = MeshPolicy::default();
        let e = authorize(
            &any,
            &pod(),
            addr("10.0.1.3:5432"),
            &id("shop", "web"),
            addr(NODE),
            None,
            owners,
        )
        .unwrap_err();
        assert!(
            matches!(&e, Denial::NotThisPod(m) if m.contains("10.0.1.3") && m.contains("shop/db")),
            "{e:?}"
        );
        // Either of its addresses is fine, also written v4-mapped.
        for a in ["10.0.1.2:5432", "[fd00::1:2]:5432", "[::ffff:10.0.1.2]:5432"] {
            assert!(
                authorize(&any, &pod(), addr(a), &id("shop", "web"), addr(NODE), None, owners)
                    .is_ok(),
                "{a}"
            );
        }
    }

    #[test]
    fn policy_denies_by_identity_namespace_and_port() {
        let policy = only_web_to_db();
        let ok = authorize(
            &policy,
            &pod(),
            addr("10.0.1.2:5432"),
            &id("shop", "web"),
            addr(NODE),
            None,
            owners,
        );
        assert!(ok.is_ok());
        for (peer, port) in [(id("lab", "exp"), 5432), (id("shop", "web"), 22)] {
            let e = authorize(
                &policy,
                &pod(),
                SocketAddr::new("10.0.1.2".parse().unwrap(), port),
                &peer,
                addr(NODE),
                None,
                owners,
            )
            .unwrap_err();
            assert!(matches!(e, Denial::Policy(_)), "{peer} :{port}");
        }
    }

    #[test]
    fn a_forwarded_address_is_used_only_when_the_peer_owns_it() {
        let p = MeshPolicy::default();
        let dst = addr("10.0.1.2:5432");
        let web = id("shop", "web");
        let node = addr(NODE);
        // Owned by the peer: delivered from it, and it is the source.
        let a =
            authorize(&p, &pod(), dst, &web, node, Some(addr("10.0.0.5:40000")), owners).unwrap();
        assert_eq!(
            a,
            Allowed {
                src_ip: Some("10.0.0.5".parse().unwrap()),
                forwarded_ignored: false,
                source: addr("10.0.0.5:40000")
            }
        );
        // Another workload's address, or nobody's: the pod's own, with a
        // warning; the source is the peer node.
        for claimed in ["10.0.0.6:40000", "192.0.2.1:40000"] {
            let a = authorize(&p, &pod(), dst, &web, node, Some(addr(claimed)), owners).unwrap();
            assert_eq!(
                a,
                Allowed { src_ip: None, forwarded_ignored: true, source: node },
                "{claimed}"
            );
        }
        // No claim: nothing to warn about.
        let a = authorize(&p, &pod(), dst, &web, node, None, owners).unwrap();
        assert_eq!(a, Allowed { src_ip: None, forwarded_ignored: false, source: node });
        // Another family than the destination: not used.
        let a = authorize(
            &p,
            &pod(),
            addr("[fd00::1:2]:5432"),
            &web,
            node,
            Some(addr("10.0.0.5:1")),
            owners,
        )
        .unwrap();
        assert_eq!(a.src_ip, None);
    }

    #[test]
    fn ip_blocks_see_the_claimed_address_only_when_it_is_the_peers() {
        let web = id("shop", "web");
        let dst = addr("10.0.1.2:5432");
        let node = addr(NODE);
        // The peer's own pod address in the block: denied.
        let p = deny_block("10.0.0.0/29");
        let e = authorize(&p, &pod(), dst, &web, node, Some(addr("10.0.0.5:1")), owners);
        assert!(matches!(e, Err(Denial::Policy(ref r)) if r.contains("no-block")), "{e:?}");
        // A claimed address the peer does not own cannot steer policy:
        // the node's address is what policy sees (not in the block).
        let e = authorize(&p, &pod(), dst, &web, node, Some(addr("10.0.0.6:1")), owners);
        assert!(e.is_ok(), "{e:?}");
        // ... and cannot hide the peer either: a block holding the node denies.
        let p = deny_block("192.168.0.0/24");
        let e = authorize(&p, &pod(), dst, &web, node, Some(addr("10.0.0.6:1")), owners);
        assert!(e.is_err());
    }

    #[test]
    fn plaintext_has_no_principal_and_local_delivery_is_decided_too() {
        let policy = only_web_to_db();
        let dst = addr("10.0.1.2:5432");
        let e = authorize_plaintext(&policy, &pod(), addr("10.0.0.5:1"), dst).unwrap_err();
        assert!(e.contains("no allow policy matches"), "{e}");
        assert!(
            authorize_plaintext(&MeshPolicy::default(), &pod(), addr("10.0.0.5:1"), dst).is_ok()
        );
        let web = id("shop", "web").to_string();
        let exp = id("lab", "exp").to_string();
        assert!(authorize_local(&policy, &pod(), &web, addr("10.0.0.5:1"), dst).is_ok());
        assert!(authorize_local(&policy, &pod(), &exp, addr("10.0.0.6:1"), dst).is_err());
        let e = authorize_local(&policy, &pod(), "not-an-id", addr("10.0.0.6:1"), dst);
        assert!(e.is_err_and(|e| e.contains("unreadable")));
    }

    fn conn(direction: Direction, route: Route, pod: &str, peer: Option<&str>) -> ConnInfo {
        ConnInfo {
            direction,
            route,
            pod: pod.into(),
            src: addr("10.0.0.6:40000"),
            dst: addr("10.0.1.2:5432"),
            peer_pod: peer.map(Into::into),
            src_identity: Some(id("lab", "exp").to_string()),
            dst_identity: None,
            transport: None,
            dst_service: None,
        }
    }

    #[test]
    fn recheck_asks_what_policy_admitted_of_the_right_pod() {
        let policy = only_web_to_db();
        let db = pod();
        let pods = |k: &str| (k == "shop/db").then_some(&db);
        // Inbound tunnel stream and local delivery from lab/exp: denied now.
        for c in [
            conn(Direction::Inbound, Route::Tunnel, "shop/db", None),
            conn(Direction::Outbound, Route::Local, "lab/exp-0", Some("shop/db")),
        ] {
            assert!(recheck(&policy, &c, pods).is_err(), "{c:?}");
            assert!(recheck(&MeshPolicy::default(), &c, pods).is_ok(), "{c:?}");
        }
        // Plaintext: no principal, so not web.
        let mut plain = conn(Direction::Inbound, Route::Plaintext, "shop/db", None);
        plain.src_identity = None;
        assert!(recheck(&policy, &plain, pods).is_err());
        // Not asked: tunnel out (the destination decides), passthrough,
        // probes, and connections of pods no longer in the inventory.
        for c in [
            conn(Direction::Outbound, Route::Tunnel, "lab/exp-0", Some("shop/db")),
            conn(Direction::Outbound, Route::Passthrough, "lab/exp-0", None),
            conn(Direction::Inbound, Route::Probe, "shop/db", None),
            conn(Direction::Inbound, Route::Tunnel, "shop/gone", None),
        ] {
            assert!(recheck(&policy, &c, pods).is_ok(), "{c:?}");
        }
        // An inbound tunnel entry with no identity fails closed.
        let mut anon = conn(Direction::Inbound, Route::Tunnel, "shop/db", None);
        anon.src_identity = None;
        assert!(recheck(&policy, &anon, pods).is_err());
    }
}
