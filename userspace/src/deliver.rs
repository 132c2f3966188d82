//! Delivery into a pod with the original client's address.
//!
//! The daemon connects from inside the destination pod's netns with a socket
//! bound (`IP_TRANSPARENT`) to the client pod's address, so the application
//! sees its real peer. The replies must come back to the daemon rather than
//! leave the pod, which takes three things in the pod netns:
//!
//! - an nftables `route` chain on output (programmed with nftnl): packets of
//!   the daemon's delivery sockets (`DELIVERY_MARK` bit) stamp their
//!   conntrack entry; packets of a stamped connection (the app's replies)
//!   get `DELIVERY_MARK` as packet mark, which re-routes them;
//! - `ip rule fwmark DELIVERY_MARK/DELIVERY_MARK lookup 100` and
//! - `ip route add local default dev lo table 100` (IPv4 and IPv6),
//!
//! so the app's replies are delivered locally to the transparent socket.
//! The delivery socket carries `DELIVERY_MARK`; the `sock_ops` program
//! records its 4-tuple in `TLSMESH_DELIVERIES` when it connects and removes
//! it when it closes, so the pod's `sk_lookup` program lets every packet of
//! it through (also a syncookie handshake's final ACK, which meets
//! `sk_lookup` after `connect()` returned).

use std::{
    ffi::CStr,
    io,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
};

use nftnl::{
    nft_expr, Batch, Chain, ChainType, FinalizedBatch, Hook, MsgType, Policy, ProtoFamily, Rule,
    Table,
};
use tokio::net::TcpStream;

use crate::{
    kernel::{Connecting, PodNet},
    netns::{Netns, NetnsError, SocketOpts},
};
use tlsmesh_common::{DAEMON_MARK, DELIVERY_MARK};

const TABLE: &CStr = c"tlsmesh";
const CHAIN: &CStr = c"deliver";
/// Routing table the marked replies use.
pub const ROUTE_TABLE: u32 = 100;

/// Errors setting up transparent delivery.
#[derive(Debug, thiserror::Error)]
pub enum DeliverError {
    /// nftables.
    #[error("programming nftables in {netns}: {source} (needs CAP_NET_ADMIN and nf_tables)")]
    Nft { netns: String, source: io::Error },
    /// Routing.
    #[error("`{command}` in {netns} failed: {message}")]
    Route { netns: String, command: String, message: String },
    /// Namespace.
    #[error(transparent)]
    Netns(#[from] NetnsError),
}

/// The nftables batch (idempotent: the table is created, deleted and
/// created again, so re-running replaces the old rules).
fn batch() -> FinalizedBatch {
    let mut batch = Batch::new();
    let table = Table::new(TABLE, ProtoFamily::Inet);
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.add(&table, MsgType::Add);
    let mut chain = Chain::new(CHAIN, &table);
    chain.set_hook(Hook::Out, -150);
    chain.set_type(ChainType::Route);
    chain.set_policy(Policy::Accept);
    batch.add(&chain, MsgType::Add);
    // meta mark & DELIVERY_MARK == DELIVERY_MARK  ->  ct mark set DELIVERY_MARK
    let mut stamp = Rule::new(&chain);
    stamp.add_expr(&nft_expr!(meta mark));
    stamp.add_expr(&nft_expr!(bitwise mask DELIVERY_MARK, xor 0u32));
    stamp.add_expr(&nft_expr!(cmp == DELIVERY_MARK));
    stamp.add_expr(&nft_expr!(immediate data DELIVERY_MARK));
    stamp.add_expr(&nft_expr!(ct mark set));
    batch.add(&stamp, MsgType::Add);
    // ct mark == DELIVERY_MARK  ->  meta mark set DELIVERY_MARK (re-route)
    let mut restore = Rule::new(&chain);
    restore.add_expr(&nft_expr!(ct mark));
    restore.add_expr(&nft_expr!(cmp == DELIVERY_MARK));
    restore.add_expr(&nft_expr!(immediate data DELIVERY_MARK));
    restore.add_expr(&nft_expr!(meta mark set));
    batch.add(&restore, MsgType::Add);
    batch.finalize()
}

/// The batch that removes the table (and with it the chain and rules).
fn delete_batch() -> FinalizedBatch {
    let mut batch = Batch::new();
    let table = Table::new(TABLE, ProtoFamily::Inet);
    // Add-then-delete: deleting a table that does not exist is an error,
    // adding one that exists is not.
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    batch.finalize()
}

fn send(batch: &FinalizedBatch) -> io::Result<()> {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter)?;
    let portid = socket.portid();
    socket.send_all(batch)?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut expected = batch.sequence_numbers();
    while !expected.is_empty() {
        for message in socket.recv(&mut buffer[..])? {
            let message = message?;
            let seq = expected.next().ok_or_else(|| io::Error::other("unexpected netlink ACK"))?;
            mnl::cb_run(message, seq, portid)?;
        }
    }
    Ok(())
}

fn ip(ns: &Netns, args: &[&str]) -> Result<(), DeliverError> {
    ip_output(ns, args).map(drop)
}

/// Runs `ip ARGS` in `ns`; its standard output ("File exists" is success).
fn ip_output(ns: &Netns, args: &[&str]) -> Result<String, DeliverError> {
    let err = |message: String| DeliverError::Route {
        netns: ns.path().display().to_string(),
        command: format!("ip {}", args.join(" ")),
        message,
    };
    let out = Command::new("nsenter")
        .arg(format!("--net={}", ns.proc_path().display()))
        .arg("ip")
        .args(args)
        .output()
        .map_err(|e| err(e.to_string()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || stderr.contains("File exists") {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(err(stderr.trim().to_string()))
    }
}

/// Removes what [`setup`] programmed in `ns` (the nftables table, the
/// routing rule and table); a namespace that is already going away is fine.
pub fn teardown(ns: &Netns) {
    let _ = ns.run(|| send(&delete_batch()));
    let mark = format!("{DELIVERY_MARK:#x}/{DELIVERY_MARK:#x}");
    let table = ROUTE_TABLE.to_string();
    for fam in ["-4", "-6"] {
        let _ = ip(ns, &[fam, "rule", "del", "fwmark", &mark, "lookup", &table]);
        let _ = ip(ns, &[fam, "route", "flush", "table", &table]);
    }
}

/// [`teardown`] of the namespace at `path` (`tlsmesh node --uninstall`).
pub fn teardown_path(path: &Path) {
    if let Ok(ns) = Netns::open(path) {
        teardown(&ns);
    }
}

/// Programs a pod netns for transparent delivery (idempotent).
pub fn setup(ns: &Netns) -> Result<(), DeliverError> {
    let name = ns.path().display().to_string();
    ns.run(|| send(&batch()))?.map_err(|source| DeliverError::Nft { netns: name, source })?;
    let mark = format!("{DELIVERY_MARK:#x}/{DELIVERY_MARK:#x}");
    let table = ROUTE_TABLE.to_string();
    for fam in ["-4", "-6"] {
        // `ip rule add` is not idempotent (it adds a copy), and deleting
        // first would leave an instant without the rule, in which an app's
        // reply to a delivered connection (one a daemon beside this one
        // relays, e.g. during an upgrade) is routed out of the pod and the
        // connection reset: add it only when it is not there.
        let rules = ip_output(ns, &[fam, "rule", "show"])?;
        if !rule_present(&rules, &mark, &table) {
            ip(ns, &[fam, "rule", "add", "fwmark", &mark, "lookup", &table])?;
        }
        let default = if fam == "-4" { "0.0.0.0/0" } else { "::/0" };
        ip(ns, &[fam, "route", "replace", "local", default, "dev", "lo", "table", &table])?;
    }
    Ok(())
}

/// True when `ip rule show` output `rules` has the rule `fwmark MARK
/// lookup TABLE`. Pure.
fn rule_present(rules: &str, mark: &str, table: &str) -> bool {
    rules.lines().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        words.windows(2).any(|w| w == ["fwmark", mark])
            && words.windows(2).any(|w| w == ["lookup", table])
    })
}

/// Options for sockets the daemon opens inside pods: marked, so capture
/// ignores them.
pub fn pod_socket_opts() -> SocketOpts {
    SocketOpts { mark: DAEMON_MARK, ..SocketOpts::default() }
}

/// Sockets inside a pod's real network namespace.
#[derive(Debug, Clone)]
pub struct PodNetns(pub Netns);

impl PodNet for PodNetns {
    fn connect(&self, dst: SocketAddr) -> Connecting {
        let ns = self.0.clone();
        Box::pin(async move { ns.connect(dst, pod_socket_opts()).await.map_err(io::Error::other) })
    }

    fn deliver(&self, src: Option<IpAddr>, dst: SocketAddr) -> Connecting {
        let ns = self.0.clone();
        Box::pin(async move { connect(&ns, src, dst).await.map_err(io::Error::other) })
    }

    fn bind_udp(&self, addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
        self.0.udp_socket(addr, tunnel_udp_opts()).map_err(io::Error::other)
    }
}

/// Options of a pod's QUIC server socket: marked; no `SO_REUSEPORT` (see
/// `mesh::server`).
pub fn tunnel_udp_opts() -> SocketOpts {
    SocketOpts { mark: DAEMON_MARK, v6_only: true, ..SocketOpts::default() }
}

/// Connects to `dst` inside the pod netns `ns`, from `src` when given
/// (transparent: the app sees `src` as its peer), else from the pod itself.
pub async fn connect(
    ns: &Netns,
    src: Option<IpAddr>,
    dst: SocketAddr,
) -> Result<TcpStream, NetnsError> {
    let Some(src_ip) = src.filter(|s| *s != dst.ip() && s.is_ipv4() == dst.is_ipv4()) else {
        return ns.connect(dst, pod_socket_opts()).await;
    };
    let opts = SocketOpts {
        mark: DAEMON_MARK | DELIVERY_MARK,
        transparent: true,
        ..SocketOpts::default()
    };
    let sock = ns
        .run(move || -> io::Result<socket2::Socket> {
            let s = crate::netns::new_socket(dst, socket2::Type::STREAM, opts)?;
            // The port is chosen at connect() by the whole 4-tuple (cheap,
            // and TIME_WAIT entries of other destinations do not block it),
            // not by a bind-time scan of the ports in use for `src_ip`.
            bind_address_no_port(&s)?;
            s.bind(&SocketAddr::new(src_ip, 0).into())?;
            Ok(s)
        })?
        .map_err(|source| NetnsError::Socket {
            path: ns.path().to_path_buf(),
            what: format!("transparent socket from {src_ip}"),
            source,
        })?;
    // sock_ops records the 4-tuple in TLSMESH_DELIVERIES as the SYN leaves
    // (DELIVERY_MARK), so the pod's sk_lookup lets this connection through.
    let ts = tokio::net::TcpSocket::from_std_stream(sock.into());
    ts.connect(dst).await.map_err(|source| NetnsError::Socket {
        path: ns.path().to_path_buf(),
        what: format!("connect {src_ip} -> {dst}"),
        source,
    })
}

/// `IP_BIND_ADDRESS_NO_PORT`: bind the address now, the port at connect.
fn bind_address_no_port(s: &socket2::Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on a socket we own, with a c_int option value of
    // the size passed.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            std::ptr::from_ref(&one).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::rule_present;

    #[test]
    fn the_delivery_rule_is_found_in_ip_rule_show() {
        let rules = "0:\tfrom all lookup local\n32765:\tfrom all fwmark 0x400/0x400 lookup 100\n32766:\tfrom all lookup main\n";
        assert!(rule_present(rules, "0x400/0x400", "100"));
        assert!(!rule_present(rules, "0x400/0x400", "101"));
        assert!(!rule_present(rules, "0x800/0x800", "100"));
        assert!(!rule_present("0:\tfrom all lookup local\n", "0x400/0x400", "100"));
    }
}
