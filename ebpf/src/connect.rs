//! cgroup/connect4 and cgroup/connect6: outbound capture.
//!
//! Decision, in order: configuration written; TCP; not the daemon's own
//! socket (mark); the caller's netns is enrolled; the destination is not
//! loopback, link-local, a tlsmesh port or a configured bypass. Then the
//! original destination is stored under the socket cookie and the connect is
//! rewritten to 127.0.0.1 / ::1 at the outbound port, where the daemon owns a
//! listener inside the pod's netns. Returning 1 always lets the syscall go on.
//!
//! With `CONFIG_LOG_DECISIONS` set, each decision about an enrolled pod's
//! connect (captured, or bypassed and why) is logged through aya-log, keyed
//! by the netns cookie (the daemon adds the pod's name).

use core::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    ptr::{addr_of_mut, read_volatile, write_volatile},
};

use aya_ebpf::{
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
    EbpfContext,
};
use aya_log_ebpf::{info, warn};
use tlsmesh_common::{
    classify::{v4_mapped_bytes, v4_never_captured, v4_of_mapped, v6_bytes, v6_never_captured},
    counter, CaptureConfig, SockAddr, CONFIG_LOG_DECISIONS, FAMILY_V4, FAMILY_V6,
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
    let (bytes, prefix_len, mapped, dst);
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
        let b = v6_bytes(&w);
        dst = IpAddr::V6(Ipv6Addr::from(b));
        if v6_never_captured(&w) {
            return bypass(ctx, &cfg, netns, dst, port, Skip::NeverCaptured);
        }
        orig.family = FAMILY_V6;
        orig.addr = w;
        bytes = b;
        prefix_len = 128;
    } else {
        // SAFETY: as above.
        let ip4 = unsafe { read_volatile(&(*sa).user_ip4) };
        dst = IpAddr::V4(Ipv4Addr::from(ip4.to_ne_bytes()));
        if v4_never_captured(ip4) {
            return bypass(ctx, &cfg, netns, dst, port, Skip::NeverCaptured);
        }
        orig.addr[0] = ip4;
        bytes = v4_mapped_bytes(ip4);
        prefix_len = 128;
        mapped = false;
    }
    if bypassed(port, &bytes, prefix_len) {
        return bypass(ctx, &cfg, netns, dst, port, Skip::BypassList);
    }

    // SAFETY: helper over the program's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        if logging(&cfg) {
            warn!(
                ctx,
                "connect not captured: netns={} dst={}:{} reason=orig-dst-map-full (the \
                 original destination could not be recorded)",
                netns,
                dst,
                port
            );
        }
        return Err(());
    }

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
    if logging(&cfg) {
        info!(
            ctx,
            "connect captured: netns={} dst={}:{} reason=enrolled (sent to the daemon's outbound \
             listener)",
            netns,
            dst,
            port
        );
    }
    // The test variant (a second, different object for the program
    // replacement test) also counts here; the product object never does.
    #[cfg(tlsmesh_variant)]
    bump(counter::VARIANT_CAPTURED);
    Ok(())
}

/// Why an enrolled pod's connect was left alone.
#[derive(Clone, Copy)]
enum Skip {
    /// Loopback, link-local or unspecified: never captured.
    NeverCaptured,
    /// A configured bypass port or CIDR (the daemon's own ports included).
    BypassList,
}

#[inline(always)]
fn logging(cfg: &CaptureConfig) -> bool {
    cfg.flags & CONFIG_LOG_DECISIONS != 0
}

#[inline(always)]
fn bypass(
    ctx: &SockAddrContext,
    cfg: &CaptureConfig,
    netns: u64,
    dst: IpAddr,
    port: u16,
    why: Skip,
) -> Result<(), ()> {
    bump(counter::BYPASSED);
    if logging(cfg) {
        match why {
            Skip::NeverCaptured => info!(
                ctx,
                "connect bypassed: netns={} dst={}:{} reason=never-captured (loopback, \
                 link-local or unspecified)",
                netns,
                dst,
                port
            ),
            Skip::BypassList => info!(
                ctx,
                "connect bypassed: netns={} dst={}:{} reason=bypass-list (a configured bypass \
                 port or CIDR, or a tlsmesh port)",
                netns,
                dst,
                port
            ),
        }
    }
    Ok(())
}
