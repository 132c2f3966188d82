//! cgroup/connect4 and cgroup/connect6: outbound capture.
//!
//! Decision, in order: configuration written; TCP; not the daemon's own
//! socket (mark); the caller's netns is enrolled; the destination is not
//! loopback, link-local, a tlsmesh port or a configured bypass. Then the
//! original destination is stored under the socket cookie and the connect is
//! rewritten to 127.0.0.1 / ::1 at the outbound port, where the daemon owns a
//! listener inside the pod's netns. Returning 1 always lets the syscall go on.

use core::ptr::{addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use tlsmesh_common::{
    classify::{v4_mapped_bytes, v4_never_captured, v4_of_mapped, v6_never_captured},
    counter, SockAddr, FAMILY_V4, FAMILY_V6,
};

use crate::maps::{bump, bypassed, config, ENROLLED, ORIG_BY_COOKIE};

const SOCK_STREAM: u32 = 1;
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn tlsmesh_connect4(ctx: SockAddrContext) -> i32 {
    let _ = try_connect::<false>(&ctx);
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn tlsmesh_connect6(ctx: SockAddrContext) -> i32 {
    let _ = try_connect::<true>(&ctx);
    ALLOW
}

/// Generic over the family so each instance writes context fields at
/// constant offsets (the verifier rejects a computed context pointer).
#[inline(always)]
fn try_connect<const V6: bool>(ctx: &SockAddrContext) -> Result<(), ()> {
    let v6 = V6;
    let cfg = config().ok_or(())?;
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the kernel's context pointer, valid for this call; each
    // field is read with a 4-byte load as the verifier requires.
    let (ty, sk) = unsafe { (read_volatile(&(*sa).type_), (*sa).__bindgen_anon_1.sk) };
    if ty != SOCK_STREAM {
        return Ok(());
    }
    if !sk.is_null() {
        // SAFETY: a non-null `sk` in bpf_sock_addr is a valid bpf_sock.
        let mark = unsafe { read_volatile(&(*sk).mark) };
        if mark & cfg.daemon_mark == cfg.daemon_mark {
            bump(counter::DAEMON_SKIPPED);
            return Ok(());
        }
    }
    // SAFETY: helper over the program's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup of a plain value.
    if unsafe { ENROLLED.get(netns) }.is_none() {
        return Ok(());
    }
    // SAFETY: as above, 4-byte context loads.
    let port = unsafe { u16::from_be(read_volatile(&(*sa).user_port) as u16) };
    let mut orig = SockAddr { family: FAMILY_V4, port: u32::from(port), addr: [0; 4] };
    let (bytes, prefix_len, mapped);
    if v6 {
        // SAFETY: as above.
        let w = unsafe {
            [
                read_volatile(&(*sa).user_ip6[0]),
                read_volatile(&(*sa).user_ip6[1]),
                read_volatile(&(*sa).user_ip6[2]),
                read_volatile(&(*sa).user_ip6[3]),
            ]
        };
        mapped = v4_of_mapped(&w).is_some();
        if v6_never_captured(&w) {
            return bypass();
        }
        orig.family = FAMILY_V6;
        orig.addr = w;
        let mut b = [0u8; 16];
        let mut i = 0;
        while i < 4 {
            let q = w[i].to_ne_bytes();
            b[i * 4] = q[0];
            b[i * 4 + 1] = q[1];
            b[i * 4 + 2] = q[2];
            b[i * 4 + 3] = q[3];
            i += 1;
        }
        bytes = b;
        prefix_len = 128;
    } else {
        // SAFETY: as above.
        let ip4 = unsafe { read_volatile(&(*sa).user_ip4) };
        if v4_never_captured(ip4) {
            return bypass();
        }
        orig.addr[0] = ip4;
        bytes = v4_mapped_bytes(ip4);
        prefix_len = 128;
        mapped = false;
    }
    if bypassed(port, &bytes, prefix_len) {
        return bypass();
    }

    // SAFETY: helper over the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    ORIG_BY_COOKIE.insert(cookie, orig, 0).map_err(|_| ())?;

    let new_port = u32::from((cfg.outbound_port as u16).to_be());
    // SAFETY: context writes the verifier allows for connect hooks; volatile
    // so LLVM cannot merge two u32 stores into one u64 store (rejected).
    unsafe {
        if v6 {
            let ip6 = addr_of_mut!((*sa).user_ip6);
            if mapped {
                write_volatile(&mut (*ip6)[3], u32::from_ne_bytes([127, 0, 0, 1]));
            } else {
                write_volatile(&mut (*ip6)[0], 0);
                write_volatile(&mut (*ip6)[1], 0);
                write_volatile(&mut (*ip6)[2], 0);
                write_volatile(&mut (*ip6)[3], u32::from_ne_bytes([0, 0, 0, 1]));
            }
        } else {
            write_volatile(addr_of_mut!((*sa).user_ip4), u32::from_ne_bytes([127, 0, 0, 1]));
        }
        write_volatile(addr_of_mut!((*sa).user_port), new_port);
    }
    bump(counter::CAPTURED);
    // The test variant (a second, different object for the program
    // replacement test) also counts here; the product object never does.
    #[cfg(tlsmesh_variant)]
    bump(counter::VARIANT_CAPTURED);
    Ok(())
}

#[inline(always)]
fn bypass() -> Result<(), ()> {
    bump(counter::BYPASSED);
    Ok(())
}
