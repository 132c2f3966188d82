//! Types shared by the tlsmesh eBPF programs and the node daemon: map keys,
//! map values, counter indices, well-known ports and marks.
//!
//! Every type is `#[repr(C)]`, `Copy`, built from explicit fixed-width
//! integers and free of implicit padding, so the kernel and userspace agree
//! on its layout byte for byte (the sizes are asserted in the tests below).
//! With the `user` feature the types implement `aya::Pod`.
#![no_std]

/// Outbound capture listener, inside each enrolled pod's netns (127.0.0.1 / ::1).
pub const PORT_OUTBOUND: u16 = 15001;
/// Inbound plaintext capture listener, inside each enrolled pod's netns.
pub const PORT_INBOUND: u16 = 15006;
/// Tunnel (HBONE over TLS, and QUIC), at the pod address, served by the node daemon.
pub const PORT_TUNNEL: u16 = 15008;
/// Admin API (localhost of the node).
pub const PORT_ADMIN: u16 = 15000;
/// Prometheus metrics.
pub const PORT_METRICS: u16 = 15020;
/// Readiness.
pub const PORT_READY: u16 = 15021;

/// `SO_MARK` the daemon puts on every socket it opens inside a pod netns, so
/// the capture programs never capture the daemon itself (ztunnel's 0x539).
/// The programs test `mark & DAEMON_MARK == DAEMON_MARK`, so other bits can
/// be added (see `DELIVERY_MARK`).
pub const DAEMON_MARK: u32 = 0x539;

/// Mark bit of the daemon's transparent deliveries into a pod (connections
/// from the original client's address). Its connections' replies are routed
/// back to the daemon inside the pod netns (ct mark + `ip rule fwmark`).
pub const DELIVERY_MARK: u32 = 0x1000;

/// `Enrollment::mode`: plaintext inbound is accepted (and counted).
pub const MODE_PERMISSIVE: u32 = 1;
/// `Enrollment::mode`: only mTLS inbound.
pub const MODE_STRICT: u32 = 2;

/// `AF_INET` as the kernel numbers it.
pub const FAMILY_V4: u32 = 2;
/// `AF_INET6` as the kernel numbers it.
pub const FAMILY_V6: u32 = 10;

/// Value of the enrollment map, keyed by a pod's network-namespace cookie (`u64`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Enrollment {
    /// `MODE_PERMISSIVE` or `MODE_STRICT`.
    pub mode: u32,
    /// Reserved, zero.
    pub flags: u32,
}

/// A socket address as the eBPF side sees it.
///
/// `addr` holds the address in network byte order, one `u32` word at a time
/// exactly as `bpf_sock_addr.user_ip6` does; IPv4 uses `addr[0]` and leaves
/// the rest zero. `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct SockAddr {
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u32,
    /// Port, host byte order.
    pub port: u32,
    /// Address words, network byte order.
    pub addr: [u32; 4],
}

/// Key of the original-destination map: the captured client socket's own
/// (local) address, qualified by the pod netns it lives in (every pod's
/// loopback looks alike).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct ConnKey {
    /// Network-namespace cookie of the pod.
    pub netns_cookie: u64,
    /// The client socket's local address (127.0.0.1 or ::1 and its port).
    pub client: SockAddr,
}

/// Key of the deliveries map: one connection the daemon opened into a pod
/// from the original client's address, as `sk_lookup` sees its packets:
/// `src` is the delivery socket's own address (the client pod's IP and the
/// port the kernel chose), `dst` the application's address in the pod.
/// Written by `sock_ops` at connect time for sockets with `DELIVERY_MARK`,
/// removed when they close.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct DeliveryKey {
    /// The delivery socket's address (the original client's IP).
    pub src: SockAddr,
    /// The application's address inside the pod.
    pub dst: SockAddr,
}

/// Key of the inbound socket map: a pod address (port unused, zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Hash)]
pub struct IpKey {
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u32,
    /// Address words, network byte order (IPv4 in `addr[0]`).
    pub addr: [u32; 4],
}

/// Data of a bypass-CIDR LPM-trie key: an IPv6 address, IPv4 written as
/// IPv4-mapped (`::ffff:a.b.c.d`, prefix length + 96).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CidrKey {
    /// Address bytes in network order.
    pub addr: [u8; 16],
}

/// The one element of the capture configuration array.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct CaptureConfig {
    /// Port the outbound listener has inside each pod (host order).
    pub outbound_port: u32,
    /// Sockets carrying this mark are never captured.
    pub daemon_mark: u32,
    /// Set to 1 once the daemon has written the configuration; until then the
    /// programs capture nothing.
    pub ready: u32,
    /// `CONFIG_LOG_DECISIONS`, other bits reserved (zero). Programs that
    /// predate a bit ignore it, so a new bit needs no layout version.
    pub flags: u32,
}

/// `CaptureConfig.flags` bit: the programs log each capture decision
/// through aya-log (off by default; switched at run time by the daemon's
/// admin `/logging?ebpf=on`). Off, a decision costs one test of this bit.
pub const CONFIG_LOG_DECISIONS: u32 = 1;

/// Indices of the per-CPU counter array the programs bump.
pub mod counter {
    /// connect4/6 rewrote an enrolled pod's connect to the outbound listener.
    pub const CAPTURED: u32 = 0;
    /// An enrolled pod's connect matched the bypass list.
    pub const BYPASSED: u32 = 1;
    /// A connect carried the daemon's mark and was left alone.
    pub const DAEMON_SKIPPED: u32 = 2;
    /// sock_ops recorded an original destination under the client address.
    pub const ORIG_DST_RECORDED: u32 = 3;
    /// getpeername was answered with the original destination.
    pub const PEER_REWRITTEN: u32 = 4;
    /// sk_lookup steered an inbound SYN to the daemon's in-pod listener.
    pub const INBOUND_STEERED: u32 = 5;
    /// sk_lookup dropped an inbound SYN because no daemon listener was there.
    pub const INBOUND_DROPPED: u32 = 6;
    /// sk_lookup let one of the daemon's own deliveries through.
    pub const INBOUND_DELIVERY: u32 = 7;
    /// sock_ops recorded one of the daemon's deliveries into a pod.
    pub const DELIVERY_RECORDED: u32 = 8;
    /// Only the test variant object (built with `--cfg tlsmesh_variant`,
    /// for the program-replacement test) bumps this, on every captured
    /// connect: which programs run is observable from outside.
    pub const VARIANT_CAPTURED: u32 = 63;
    /// Number of named counters.
    pub const COUNT: u32 = 9;
    /// Slots of the counter map. Those past `COUNT` are reserved so a later
    /// object can count more without changing the map's layout.
    pub const SLOTS: u32 = 64;
}

/// Version of the maps' meaning. The daemon refuses to run new programs
/// against pinned maps of another version (or of another shape: type, key,
/// value, size, flags), because old programs and new maps must never mix
/// silently. Version 1 was the layout before `TLSMESH_META` existed.
/// Bump it when a map keeps its shape but its contents change meaning.
pub const MAP_LAYOUT_VERSION: u32 = 2;

/// The one value of `TLSMESH_META`: what the daemon last put in place
/// (written by the daemon after attaching or replacing the programs).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ObjectMeta {
    /// `MAP_LAYOUT_VERSION` of the maps.
    pub layout: u32,
    /// Reserved, zero.
    pub flags: u32,
    /// The first 8 bytes of the SHA-256 of the object whose programs are
    /// attached (all zero before the first daemon wrote it).
    pub digest: [u8; 8],
}

/// Names of the maps in the eBPF object (the daemon opens them by name).
pub mod maps {
    /// `HashMap<u64 netns cookie, Enrollment>`.
    pub const ENROLLED: &str = "TLSMESH_ENROLLED";
    /// `Array<CaptureConfig>` of one element.
    pub const CONFIG: &str = "TLSMESH_CONFIG";
    /// `LruHashMap<u64 socket cookie, SockAddr>`: original destination per captured socket.
    pub const ORIG_BY_COOKIE: &str = "TLSMESH_ORIG_COOKIE";
    /// `LruHashMap<ConnKey, SockAddr>`: original destination by client address.
    pub const ORIG_BY_ADDR: &str = "TLSMESH_ORIG_ADDR";
    /// `HashMap<u32 port, u32>`: destination ports never captured.
    pub const BYPASS_PORTS: &str = "TLSMESH_BYPASS_PORTS";
    /// `LpmTrie<CidrKey, u32>`: destination CIDRs never captured.
    pub const BYPASS_CIDRS: &str = "TLSMESH_BYPASS_CIDRS";
    /// `SockHash<IpKey>`: the daemon's inbound listener for each pod address.
    pub const INBOUND: &str = "TLSMESH_INBOUND";
    /// `LruHashMap<DeliveryKey, u32>`: the daemon's open deliveries into
    /// pods (sk_lookup leaves them alone); maintained by sock_ops.
    pub const DELIVERIES: &str = "TLSMESH_DELIVERIES";
    /// `PerCpuArray<u64>` of `counter::SLOTS`.
    pub const COUNTERS: &str = "TLSMESH_COUNTERS";
    /// `Array<ObjectMeta>` of one element: layout version and the digest of
    /// the object whose programs are attached.
    pub const META: &str = "TLSMESH_META";
}

/// Names of the programs in the eBPF object.
pub mod programs {
    /// cgroup/connect4.
    pub const CONNECT4: &str = "tlsmesh_connect4";
    /// cgroup/connect6.
    pub const CONNECT6: &str = "tlsmesh_connect6";
    /// sock_ops (records the original destination by client address).
    pub const SOCK_OPS: &str = "tlsmesh_sock_ops";
    /// cgroup/getpeername4.
    pub const GETPEERNAME4: &str = "tlsmesh_getpeername4";
    /// cgroup/getpeername6.
    pub const GETPEERNAME6: &str = "tlsmesh_getpeername6";
    /// sk_lookup (inbound capture, attached per pod netns).
    pub const SK_LOOKUP: &str = "tlsmesh_sk_lookup";
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: each type is repr(C), Copy, made of plain integers with no
    // padding (sizes asserted below), so any bit pattern is a valid value.
    unsafe impl aya::Pod for super::Enrollment {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::SockAddr {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ConnKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::DeliveryKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::IpKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CidrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::CaptureConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ObjectMeta {}
}

/// The capture decisions the eBPF programs make on addresses, as plain
/// functions over the words they read from their contexts (each `u32` holds
/// four address bytes in network order, in native memory order, as
/// `user_ip4`/`user_ip6`/`local_ip6` do), so the host tests them and both
/// sides agree by construction.
pub mod classify {
    use super::FAMILY_V6;

    /// The third word of an IPv4-mapped IPv6 address (`::ffff:0:0/96`).
    const MAPPED: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);
    /// The last word of `::1`.
    const ONE: u32 = u32::from_ne_bytes([0, 0, 0, 1]);

    /// An IPv4 destination whose connect is never captured: loopback
    /// (127/8), link-local (169.254/16), unspecified.
    #[inline(always)]
    pub fn v4_never_captured(ip4: u32) -> bool {
        let b = ip4.to_ne_bytes();
        b[0] == 127 || (b[0] == 169 && b[1] == 254) || ip4 == 0
    }

    /// The IPv4 address inside an IPv4-mapped IPv6 address, if it is one.
    #[inline(always)]
    pub fn v4_of_mapped(w: &[u32; 4]) -> Option<u32> {
        if w[0] == 0 && w[1] == 0 && w[2] == MAPPED {
            Some(w[3])
        } else {
            None
        }
    }

    /// An IPv6 destination whose connect is never captured: `::1`,
    /// link-local (`fe80::/10`), `::`, and the mapped forms of the IPv4
    /// ones.
    #[inline(always)]
    pub fn v6_never_captured(w: &[u32; 4]) -> bool {
        if let Some(v4) = v4_of_mapped(w) {
            return v4_never_captured(v4);
        }
        let b0 = w[0].to_ne_bytes();
        let zero3 = w[0] == 0 && w[1] == 0 && w[2] == 0;
        let loopback = zero3 && w[3] == ONE;
        let unspecified = zero3 && w[3] == 0;
        let link_local = b0[0] == 0xfe && (b0[1] & 0xc0) == 0x80;
        loopback || link_local || unspecified
    }

    /// An IPv4 address as the 16 bytes of its IPv4-mapped IPv6 form (the
    /// bypass LPM trie's key).
    #[inline(always)]
    pub fn v4_mapped_bytes(ip4: u32) -> [u8; 16] {
        let b = ip4.to_ne_bytes();
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, b[0], b[1], b[2], b[3]]
    }

    /// The 16 bytes of an IPv6 address held as four network-order words
    /// (`bpf_sock_addr.user_ip6`, `SockAddr.addr`).
    #[inline(always)]
    pub fn v6_bytes(w: &[u32; 4]) -> [u8; 16] {
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
        b
    }

    /// A SYN arriving at a pod that inbound capture leaves alone: to a
    /// loopback address (`127/8`, `::1`), or from the pod's own address to
    /// itself. `local`/`remote` use word 0 only for IPv4.
    #[inline(always)]
    pub fn inbound_left_alone(family: u32, local: &[u32; 4], remote: &[u32; 4]) -> bool {
        let loopback = if family == FAMILY_V6 {
            local[0] == 0 && local[1] == 0 && local[2] == 0 && local[3] == ONE
        } else {
            local[0].to_ne_bytes()[0] == 127
        };
        loopback || local == remote
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::{align_of, size_of};

    #[test]
    fn layouts_have_no_padding() {
        assert_eq!(size_of::<Enrollment>(), 8);
        assert_eq!(size_of::<SockAddr>(), 24);
        assert_eq!(size_of::<ConnKey>(), 32);
        assert_eq!(size_of::<DeliveryKey>(), 48);
        assert_eq!(align_of::<ConnKey>(), 8);
        assert_eq!(size_of::<IpKey>(), 20);
        assert_eq!(size_of::<CidrKey>(), 16);
        assert_eq!(size_of::<CaptureConfig>(), 16);
        assert_eq!(size_of::<ObjectMeta>(), 16);
    }

    #[test]
    fn ports_are_ztunnels() {
        assert_eq!(
            [PORT_OUTBOUND, PORT_INBOUND, PORT_TUNNEL, PORT_ADMIN, PORT_METRICS, PORT_READY],
            [15001, 15006, 15008, 15000, 15020, 15021]
        );
    }

    mod classification {
        extern crate std;
        use super::super::{classify::*, FAMILY_V4, FAMILY_V6};
        use std::net::{Ipv4Addr, Ipv6Addr};

        fn w4(a: &str) -> u32 {
            u32::from_ne_bytes(a.parse::<Ipv4Addr>().unwrap().octets())
        }

        fn w6(a: &str) -> [u32; 4] {
            let o = a.parse::<Ipv6Addr>().unwrap().octets();
            core::array::from_fn(|i| {
                u32::from_ne_bytes([o[4 * i], o[4 * i + 1], o[4 * i + 2], o[4 * i + 3]])
            })
        }

        #[test]
        fn v4_destinations() {
            for a in ["127.0.0.1", "127.9.9.9", "169.254.169.254", "0.0.0.0"] {
                assert!(v4_never_captured(w4(a)), "{a}");
            }
            for a in ["10.0.0.1", "169.253.0.1", "128.0.0.1", "192.168.1.1"] {
                assert!(!v4_never_captured(w4(a)), "{a}");
            }
        }

        #[test]
        fn v6_destinations() {
            for a in ["::1", "::", "fe80::1", "febf::1", "::ffff:127.0.0.1", "::ffff:169.254.1.1"] {
                assert!(v6_never_captured(&w6(a)), "{a}");
            }
            for a in ["fd00::1", "2001:db8::1", "fec0::1", "::2", "::ffff:10.0.0.1"] {
                assert!(!v6_never_captured(&w6(a)), "{a}");
            }
            assert_eq!(v4_of_mapped(&w6("::ffff:10.1.2.3")), Some(w4("10.1.2.3")));
            assert_eq!(v4_of_mapped(&w6("fd00::10.1.2.3")), None);
            assert_eq!(
                v4_mapped_bytes(w4("10.1.2.3")),
                "::ffff:10.1.2.3".parse::<Ipv6Addr>().unwrap().octets()
            );
        }

        #[test]
        fn inbound_arrivals() {
            let v4 = |a: &str| [w4(a), 0, 0, 0];
            assert!(inbound_left_alone(FAMILY_V4, &v4("127.0.0.1"), &v4("10.0.0.9")));
            assert!(inbound_left_alone(FAMILY_V4, &v4("10.0.0.2"), &v4("10.0.0.2")), "to itself");
            assert!(!inbound_left_alone(FAMILY_V4, &v4("10.0.0.2"), &v4("10.0.0.9")));
            assert!(inbound_left_alone(FAMILY_V6, &w6("::1"), &w6("fd00::9")));
            assert!(!inbound_left_alone(FAMILY_V6, &w6("fd00::2"), &w6("fd00::9")));
        }
    }
}
