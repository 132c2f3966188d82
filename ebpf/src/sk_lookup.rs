//! sk_lookup, attached to each enrolled pod's netns: inbound capture.
//!
//! A TCP SYN for any port but the tunnel port is assigned to the daemon's
//! in-pod inbound listener found under the destination address in `INBOUND`,
//! except: traffic on loopback addresses, the pod talking to its own address
//! (source == destination), and the daemon's own deliveries into the pod,
//! whose 4-tuple `sock_ops` records in `DELIVERIES` as they connect
//! (the ingress ifindex cannot tell them apart: for a local destination the
//! kernel reports the device that owns the address, not `lo`). With no
//! listener (daemon down) the SYN is dropped: an enrolled pod never takes
//! plaintext behind the daemon's back.
//!
//! With `CONFIG_LOG_DECISIONS` set, each steered, dropped or delivery SYN is
//! logged through aya-log, keyed by the pod's address (`pod_ip`; this
//! program type has no netns-cookie helper, the daemon adds the pod's name).

use core::{
    net::{Ipv4Addr, Ipv6Addr},
    ptr::read_volatile,
};

use aya_ebpf::{bindings::sk_action, macros::sk_lookup, programs::SkLookupContext};
use aya_log_ebpf::info;
use tlsmesh_common::{
    classify::{inbound_left_alone, v6_bytes},
    counter, DeliveryKey, IpKey, SockAddr, CONFIG_LOG_DECISIONS,
    FAMILY_V6, PORT_TUNNEL,
};

use crate::maps::{bump, config, DELIVERIES, INBOUND};

const IPPROTO_TCP: u32 = 6;

/// Logs one decision about a SYN (`local`/`remote`: `SockAddr`s) with the
/// address type of its family: one log call per family keeps each call's
/// arguments of one fixed type (the verifier rejects the spills of an
/// `IpAddr` enum built at run time).
macro_rules! decision {
    ($ctx:expr, $family:expr, $local:expr, $remote:expr, $fmt:tt) => {
        if $family == FAMILY_V6 {
            info!(
                $ctx,
                $fmt,
                Ipv6Addr::from(v6_bytes(&$local.addr)),
                $local.port,
                Ipv6Addr::from(v6_bytes(&$remote.addr)),
                $remote.port
            )
        } else {
            info!(
                $ctx,
                $fmt,
                Ipv4Addr::from($local.addr[0].to_ne_bytes()),
                $local.port,
                Ipv4Addr::from($remote.addr[0].to_ne_bytes()),
                $remote.port
            )
        }
    };
}

#[sk_lookup]
pub fn tlsmesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx)
}

fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: `l` is the kernel's context pointer; 4-byte loads.
    let (proto, port, family) = unsafe {
        (
            read_volatile(&(*l).protocol),
            read_volatile(&(*l).local_port),
            read_volatile(&(*l).family),
        )
    };
    if proto != IPPROTO_TCP || port == u32::from(PORT_TUNNEL) {
        return sk_action::SK_PASS;
    }
    let mut key = IpKey { family, addr: [0; 4] };
    let mut remote = SockAddr { family, port: 0, addr: [0; 4] };
    // SAFETY: as above; `remote_port` is a network-order u16 (2-byte load).
    unsafe {
        remote.port = u32::from(u16::from_be(read_volatile(&(*l).remote_port)));
        if family == FAMILY_V6 {
            key.addr = [
                read_volatile(&(*l).local_ip6[0]),
                read_volatile(&(*l).local_ip6[1]),
                read_volatile(&(*l).local_ip6[2]),
                read_volatile(&(*l).local_ip6[3]),
            ];
            remote.addr = [
                read_volatile(&(*l).remote_ip6[0]),
                read_volatile(&(*l).remote_ip6[1]),
                read_volatile(&(*l).remote_ip6[2]),
                read_volatile(&(*l).remote_ip6[3]),
            ];
        } else {
            key.addr[0] = read_volatile(&(*l).local_ip4);
            remote.addr[0] = read_volatile(&(*l).remote_ip4);
        }
    }
    if inbound_left_alone(family, &key.addr, &remote.addr) {
        return sk_action::SK_PASS;
    }
    let local = SockAddr { family, port, addr: key.addr };
    let delivery = DeliveryKey { src: remote, dst: local };
    let logging = config().is_some_and(|c| c.flags & CONFIG_LOG_DECISIONS != 0);
    // SAFETY: read-only lookup of a plain value.
    if unsafe { DELIVERIES.get(delivery) }.is_some() {
        bump(counter::INBOUND_DELIVERY);
        if logging {
            decision!(
                ctx,
                family,
                local,
                remote,
                "inbound SYN passed: pod_ip={} port={} from={}:{} reason=daemon-delivery (the \
                 daemon's own connection into the pod)"
            );
        }
        return sk_action::SK_PASS;
    }
    if INBOUND.redirect_sk_lookup(ctx, key, 0).is_ok() {
        bump(counter::INBOUND_STEERED);
        if logging {
            decision!(
                ctx,
                family,
                local,
                remote,
                "inbound SYN steered: pod_ip={} port={} from={}:{} reason=enrolled (sent to the \
                 daemon's inbound listener)"
            );
        }
        sk_action::SK_PASS
    } else {
        bump(counter::INBOUND_DROPPED);
        if logging {
            decision!(
                ctx,
                family,
                local,
                remote,
                "inbound SYN dropped: pod_ip={} port={} from={}:{} reason=no-daemon-listener (an \
                 enrolled pod takes no plaintext behind the daemon's back)"
            );
        }
        sk_action::SK_DROP
    }
}
