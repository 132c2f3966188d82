//! sk_lookup, attached to each enrolled pod's netns: inbound capture.
//!
//! A TCP SYN that arrives at the pod from outside it (not via loopback) for
//! any port but the tunnel port is assigned to the daemon's in-pod inbound
//! listener found under the destination address in `INBOUND`. Arrivals via
//! loopback are the pod talking to itself or the daemon delivering into the
//! pod, and are left alone. With no listener (daemon down) the SYN is
//! dropped: an enrolled pod never takes plaintext behind the daemon's back.

use core::ptr::read_volatile;

use aya_ebpf::{bindings::sk_action, macros::sk_lookup, programs::SkLookupContext};
use tlsmesh_common::{counter, IpKey, FAMILY_V6, PORT_TUNNEL};

use crate::maps::{bump, INBOUND};

const IPPROTO_TCP: u32 = 6;
const LOOPBACK_IFINDEX: u32 = 1;

#[sk_lookup]
pub fn tlsmesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    try_sk_lookup(&ctx)
}

fn try_sk_lookup(ctx: &SkLookupContext) -> u32 {
    let l = ctx.lookup;
    // SAFETY: `l` is the kernel's context pointer; 4-byte loads.
    let (proto, ifindex, port, family) = unsafe {
        (
            read_volatile(&(*l).protocol),
            read_volatile(&(*l).ingress_ifindex),
            read_volatile(&(*l).local_port),
            read_volatile(&(*l).family),
        )
    };
    if proto != IPPROTO_TCP || ifindex == LOOPBACK_IFINDEX || port == u32::from(PORT_TUNNEL) {
        return sk_action::SK_PASS;
    }
    let mut key = IpKey { family, addr: [0; 4] };
    // SAFETY: as above.
    unsafe {
        if family == FAMILY_V6 {
            key.addr = [
                read_volatile(&(*l).local_ip6[0]),
                read_volatile(&(*l).local_ip6[1]),
                read_volatile(&(*l).local_ip6[2]),
                read_volatile(&(*l).local_ip6[3]),
            ];
        } else {
            key.addr[0] = read_volatile(&(*l).local_ip4);
        }
    }
    if INBOUND.redirect_sk_lookup(ctx, key, 0).is_ok() {
        bump(counter::INBOUND_STEERED);
        sk_action::SK_PASS
    } else {
        bump(counter::INBOUND_DROPPED);
        sk_action::SK_DROP
    }
}
