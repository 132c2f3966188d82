//! sock_ops: two jobs at connect time, both keyed by the socket's own
//! address, which only exists once the kernel has chosen the source port.
//!
//! 1. Captured sockets: the original destination recorded by connect4/6
//!    under the socket cookie is copied to `ORIG_BY_ADDR` under (netns
//!    cookie, local address) — what the daemon sees on accept.
//! 2. The daemon's deliveries into pods (sockets marked `DAEMON_MARK |
//!    DELIVERY_MARK`, bound to the client pod's IP): the 4-tuple goes into
//!    `DELIVERIES`, so the pod's sk_lookup lets every packet of that
//!    connection through — also a syncookie handshake's last ACK, which
//!    meets sk_lookup after connect() returned. The daemon binds with
//!    `IP_BIND_ADDRESS_NO_PORT`, so the port is chosen here by the 4-tuple
//!    rather than by a bind-time scan. Only deliveries into a netns this
//!    daemon enrolled are recorded: the program sees every socket of the
//!    cgroup tree, and another daemon's deliveries (a second instance on
//!    the machine, as in the tests) are not this one's to track.
//!
//! Both ask for state callbacks; the entries are dropped when the socket
//! closes.

use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_SOCK_OPS_TCP_CONNECT_CB,
        BPF_TCP_CLOSE,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::sock_ops,
    programs::SockOpsContext,
    EbpfContext,
};
use core::ptr::read_volatile;

use tlsmesh_common::{
    counter, ConnKey, DeliveryKey, SockAddr, DAEMON_MARK, DELIVERY_MARK, FAMILY_V4, FAMILY_V6,
};

use crate::maps::{bump, DELIVERIES, ENROLLED, ORIG_BY_ADDR, ORIG_BY_COOKIE};

#[sock_ops]
pub fn tlsmesh_sock_ops(ctx: SockOpsContext) -> u32 {
    let _ = try_sock_ops(&ctx);
    1
}

/// True for the daemon's transparent deliveries into pods.
#[inline(always)]
fn is_delivery(ctx: &SockOpsContext) -> bool {
    // SAFETY: `ops` is the kernel's context pointer, valid for this call.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: a non-null `sk` in bpf_sock_ops is a valid bpf_sock.
    let mark = unsafe { read_volatile(&(*sk).mark) };
    mark & (DAEMON_MARK | DELIVERY_MARK) == DAEMON_MARK | DELIVERY_MARK
}

/// The connection's 4-tuple (local = source, remote = destination).
#[inline(always)]
fn delivery_key(ctx: &SockOpsContext) -> DeliveryKey {
    let family = ctx.family();
    let mut k = DeliveryKey {
        src: SockAddr { family, port: ctx.local_port(), addr: [0; 4] },
        dst: SockAddr { family, port: u32::from_be(ctx.remote_port()), addr: [0; 4] },
    };
    if family == FAMILY_V6 {
        let o = ctx.ops;
        // SAFETY: `o` is the kernel's context pointer; each word is read with
        // its own 4-byte load at a constant offset (a copied array would be a
        // load through a modified context pointer, which the verifier
        // rejects).
        unsafe {
            k.src.addr = [
                read_volatile(&(*o).local_ip6[0]),
                read_volatile(&(*o).local_ip6[1]),
                read_volatile(&(*o).local_ip6[2]),
                read_volatile(&(*o).local_ip6[3]),
            ];
            k.dst.addr = [
                read_volatile(&(*o).remote_ip6[0]),
                read_volatile(&(*o).remote_ip6[1]),
                read_volatile(&(*o).remote_ip6[2]),
                read_volatile(&(*o).remote_ip6[3]),
            ];
        }
    } else {
        k.src.addr[0] = ctx.local_ip4();
        k.dst.addr[0] = ctx.remote_ip4();
    }
    k
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), ()> {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_STATE_CB {
        if ctx.arg(1) == BPF_TCP_CLOSE {
            if is_delivery(ctx) {
                let _ = DELIVERIES.remove(&delivery_key(ctx));
                return Ok(());
            }
            // SAFETY: helper over the program's own context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = ORIG_BY_COOKIE.remove(cookie);
        }
        return Ok(());
    }
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB {
        return Ok(());
    }
    if is_delivery(ctx) {
        // SAFETY: helper over the program's own context.
        let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
        // SAFETY: a presence check; nothing is read through the pointer.
        if unsafe { ENROLLED.get(netns) }.is_none() {
            return Ok(());
        }
        DELIVERIES.insert(&delivery_key(ctx), &1, 0).map_err(|_| ())?;
        let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
        bump(counter::DELIVERY_RECORDED);
        return Ok(());
    }
    // SAFETY: helper over the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value, copied out at once.
    let orig: SockAddr = *unsafe { ORIG_BY_COOKIE.get(cookie) }.ok_or(())?;
    // SAFETY: helper over the program's own context.
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let mut client = SockAddr { family: FAMILY_V4, port: ctx.local_port(), addr: [0; 4] };
    if ctx.family() == FAMILY_V6 {
        let ip6 = ctx.local_ip6();
        if ip6[0] == 0 && ip6[1] == 0 && ip6[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]) {
            // A dual-stack socket talking IPv4: the daemon's v4 listener sees
            // a plain IPv4 peer, so key it as one.
            client.addr[0] = ip6[3];
        } else {
            client.family = FAMILY_V6;
            client.addr = ip6;
        }
    } else {
        client.addr[0] = ctx.local_ip4();
    }
    ORIG_BY_ADDR.insert(ConnKey { netns_cookie, client }, orig, 0).map_err(|_| ())?;
    let _ = ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG as i32);
    bump(counter::ORIG_DST_RECORDED);
    Ok(())
}
