//! sock_ops: re-key a captured socket's original destination by the client's
//! own address, which is what the daemon sees on accept.
//!
//! At TCP_CONNECT_CB the source port is bound; the destination recorded by
//! connect4/6 under the socket cookie is copied to `ORIG_BY_ADDR` under
//! (netns cookie, local address). The socket asks for state callbacks so the
//! cookie entry is dropped when it closes.

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
use tlsmesh_common::{counter, ConnKey, SockAddr, FAMILY_V4, FAMILY_V6};

use crate::maps::{bump, ORIG_BY_ADDR, ORIG_BY_COOKIE};

#[sock_ops]
pub fn tlsmesh_sock_ops(ctx: SockOpsContext) -> u32 {
    let _ = try_sock_ops(&ctx);
    1
}

fn try_sock_ops(ctx: &SockOpsContext) -> Result<(), ()> {
    let op = ctx.op();
    if op == BPF_SOCK_OPS_STATE_CB {
        if ctx.arg(1) == BPF_TCP_CLOSE {
            // SAFETY: helper over the program's own context.
            let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
            let _ = ORIG_BY_COOKIE.remove(cookie);
        }
        return Ok(());
    }
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB {
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
