//! cgroup/getpeername4 and getpeername6: a captured socket reports its
//! original destination as its peer, not the daemon's listener.

use core::ptr::{addr_of_mut, write_volatile};

use aya_ebpf::{
    helpers::bpf_get_socket_cookie, macros::cgroup_sock_addr, programs::SockAddrContext,
    EbpfContext,
};
use tlsmesh_common::{counter, FAMILY_V4, FAMILY_V6};

use crate::maps::{bump, ORIG_BY_COOKIE};

#[cgroup_sock_addr(getpeername4)]
pub fn tlsmesh_getpeername4(ctx: SockAddrContext) -> i32 {
    rewrite::<false>(&ctx);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn tlsmesh_getpeername6(ctx: SockAddrContext) -> i32 {
    rewrite::<true>(&ctx);
    1
}

#[inline(always)]
fn rewrite<const V6: bool>(ctx: &SockAddrContext) {
    let v6 = V6;
    // SAFETY: helper over the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value, copied out at once.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let sa = ctx.sock_addr;
    let port = u32::from((orig.port as u16).to_be());
    // SAFETY: 4-byte context stores the verifier allows for getpeername hooks.
    unsafe {
        if v6 {
            let ip6 = addr_of_mut!((*sa).user_ip6);
            if orig.family == FAMILY_V6 {
                write_volatile(&mut (*ip6)[0], orig.addr[0]);
                write_volatile(&mut (*ip6)[1], orig.addr[1]);
                write_volatile(&mut (*ip6)[2], orig.addr[2]);
                write_volatile(&mut (*ip6)[3], orig.addr[3]);
            } else {
                write_volatile(&mut (*ip6)[0], 0);
                write_volatile(&mut (*ip6)[1], 0);
                write_volatile(&mut (*ip6)[2], u32::from_ne_bytes([0, 0, 0xff, 0xff]));
                write_volatile(&mut (*ip6)[3], orig.addr[0]);
            }
        } else if orig.family == FAMILY_V4 {
            write_volatile(addr_of_mut!((*sa).user_ip4), orig.addr[0]);
        } else {
            return;
        }
        write_volatile(addr_of_mut!((*sa).user_port), port);
    }
    bump(counter::PEER_REWRITTEN);
}
