//! tlsmesh eBPF programs: capture the TCP connections of enrolled pods.
//!
//! - `connect`: cgroup/connect4 and connect6 at the cgroup-v2 root rewrite an
//!   enrolled pod's connect to the daemon's in-pod outbound listener and
//!   remember the original destination by socket cookie.
//! - `sock_ops`: at TCP_CONNECT_CB re-keys that destination by the client's
//!   own address (netns cookie + 127.0.0.1:port) so the daemon can look it up
//!   on accept; forgets it when the socket closes.
//! - `peername`: cgroup/getpeername4/6 show the application its original peer.
//! - `sk_lookup`: attached per pod netns, steers inbound SYNs arriving from
//!   outside the pod to the daemon's in-pod inbound listener.
//!
//! Every entry point wraps a `try_*` function and maps any error to the verdict
//! that leaves the socket alone; capture decisions read only the maps.
#![no_std]
#![no_main]

mod connect;
mod maps;
mod peername;
mod sk_lookup;
mod sock_ops;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
