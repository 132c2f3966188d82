//! Inbound authorization of one tunnelled connection, as a pure function:
//! is the requested address the pod's, does L4 policy allow the
//! authenticated peer, and may the claimed client address (`forwarded: for`)
//! be used as the source the application sees.

use std::net::{IpAddr, SocketAddr};

use tlsmesh_identity::SpiffeId;

use crate::{
    inventory::Pod,
    policy::{Decision, Destination, Policy, Source},
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
}

/// Decides one request for `pod`: `authority` is what the peer asked for,
/// `peer` its authenticated identity, `forwarded_for` the client address it
/// claims, and `identity_of` the identity of the pod that owns an address
/// (from the inventory).
pub fn authorize(
    policy: &Policy,
    pod: &Pod,
    authority: SocketAddr,
    peer: &SpiffeId,
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
    let decision = policy.decide(
        Source { identity: Some(&peer_uri), namespace: Some(peer.namespace()) },
        Destination {
            namespace: &pod.namespace,
            pod: &pod.name,
            service_account: &pod.service_account,
            port: authority.port(),
        },
    );
    if let Decision::Deny(reason) = decision {
        return Err(Denial::Policy(reason));
    }
    let src_ip = forwarded_for.map(|f| f.ip()).filter(|ip| {
        // A claimed address is used only if a pod with the authenticated
        // identity owns it, and only in the destination's address family.
        ip.is_ipv4() == authority.is_ipv4() && identity_of(*ip).is_some_and(|id| id == peer_uri)
    });
    Ok(Allowed { src_ip, forwarded_ignored: forwarded_for.is_some() && src_ip.is_none() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{inventory::Mode, policy::Rule};

    fn pod() -> Pod {
        Pod {
            name: "db".into(),
            namespace: "shop".into(),
            service_account: "db".into(),
            node: "n1".into(),
            ips: vec!["10.0.1.2".parse().unwrap(), "fd00::1:2".parse().unwrap()],
            netns: None,
            mode: Some(Mode::Strict),
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

    #[test]
    fn the_authority_must_be_the_pods() {
        let e = authorize(
            &Policy::default(),
            &pod(),
            addr("10.0.1.3:5432"),
            &id("shop", "web"),
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
                authorize(&Policy::default(), &pod(), addr(a), &id("shop", "web"), None, owners)
                    .is_ok(),
                "{a}"
            );
        }
    }

    #[test]
    fn policy_denies_by_identity_namespace_and_port() {
        let policy = Policy {
            rules: vec![Rule {
                name: "only-web".into(),
                action: crate::policy::Action::Allow,
                to_namespace: "shop".into(),
                to_service_accounts: vec!["db".into()],
                to_pods: vec![],
                from_namespaces: vec![],
                from_identities: vec![id("shop", "web").to_string()],
                ports: vec![5432],
            }],
        };
        let ok =
            authorize(&policy, &pod(), addr("10.0.1.2:5432"), &id("shop", "web"), None, owners);
        assert!(ok.is_ok());
        for (peer, port) in [(id("lab", "exp"), 5432), (id("shop", "web"), 22)] {
            let e = authorize(
                &policy,
                &pod(),
                SocketAddr::new("10.0.1.2".parse().unwrap(), port),
                &peer,
                None,
                owners,
            )
            .unwrap_err();
            assert!(matches!(e, Denial::Policy(_)), "{peer} :{port}");
        }
    }

    #[test]
    fn a_forwarded_address_is_used_only_when_the_peer_owns_it() {
        let p = Policy::default();
        let dst = addr("10.0.1.2:5432");
        let web = id("shop", "web");
        // Owned by the peer: delivered from it.
        let a = authorize(&p, &pod(), dst, &web, Some(addr("10.0.0.5:40000")), owners).unwrap();
        assert_eq!(
            a,
            Allowed { src_ip: Some("10.0.0.5".parse().unwrap()), forwarded_ignored: false }
        );
        // Another workload's address, or nobody's: the pod's own, with a warning.
        for claimed in ["10.0.0.6:40000", "192.0.2.1:40000"] {
            let a = authorize(&p, &pod(), dst, &web, Some(addr(claimed)), owners).unwrap();
            assert_eq!(a, Allowed { src_ip: None, forwarded_ignored: true }, "{claimed}");
        }
        // No claim: nothing to warn about.
        let a = authorize(&p, &pod(), dst, &web, None, owners).unwrap();
        assert_eq!(a, Allowed { src_ip: None, forwarded_ignored: false });
        // Another family than the destination: not used.
        let a =
            authorize(&p, &pod(), addr("[fd00::1:2]:5432"), &web, Some(addr("10.0.0.5:1")), owners)
                .unwrap();
        assert_eq!(a.src_ip, None);
    }
}
