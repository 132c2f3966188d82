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
//! Before connecting, the daemon registers the source address in the
//! `TLSMESH_DELIVERIES` map so the pod's `sk_lookup` program lets it through;
//! it stays registered until the connection ends (a syncookie handshake's
//! final ACK, or a SYN retransmission, goes through `sk_lookup` too).

use std::{ffi::CStr, io, net::SocketAddr, path::Path, process::Command};

use nftnl::{
    nft_expr, Batch, Chain, ChainType, FinalizedBatch, Hook, MsgType, Policy, ProtoFamily, Rule,
    Table,
};
use tokio::net::TcpStream;

use crate::{
    capture::{Capture, DeliveryGuard},
    netns::{NetnsError, NetnsWorker, SocketOpts},
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

fn ip(netns: &Path, args: &[&str]) -> Result<(), DeliverError> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("ip")
        .args(args)
        .output()
        .map_err(|e| DeliverError::Route {
            netns: netns.display().to_string(),
            command: format!("ip {}", args.join(" ")),
            message: e.to_string(),
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || stderr.contains("File exists") {
        Ok(())
    } else {
        Err(DeliverError::Route {
            netns: netns.display().to_string(),
            command: format!("ip {}", args.join(" ")),
            message: stderr.trim().to_string(),
        })
    }
}

/// Removes what `setup` programmed (the nftables table and the routing rule
/// and table); a namespace that is already gone is fine.
pub fn teardown(netns: &Path) {
    if !netns.exists() {
        return;
    }
    let _ = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["nft", "delete", "table", "inet", "tlsmesh"])
        .output();
    let mark = format!("{DELIVERY_MARK:#x}/{DELIVERY_MARK:#x}");
    let table = ROUTE_TABLE.to_string();
    for fam in ["-4", "-6"] {
        let _ = ip(netns, &[fam, "rule", "del", "fwmark", &mark, "lookup", &table]);
        let _ = ip(netns, &[fam, "route", "flush", "table", &table]);
    }
}

/// Programs a pod netns for transparent delivery (idempotent).
pub async fn setup(worker: &NetnsWorker, netns: &Path) -> Result<(), DeliverError> {
    let name = netns.display().to_string();
    worker
        .run(move || send(&batch()))
        .await?
        .map_err(|source| DeliverError::Nft { netns: name, source })?;
    let mark = format!("{DELIVERY_MARK:#x}/{DELIVERY_MARK:#x}");
    let table = ROUTE_TABLE.to_string();
    for fam in ["-4", "-6"] {
        // `ip rule add` is not idempotent: delete any earlier copy first.
        let _ = ip(netns, &[fam, "rule", "del", "fwmark", &mark, "lookup", &table]);
        ip(netns, &[fam, "rule", "add", "fwmark", &mark, "lookup", &table])?;
        let default = if fam == "-4" { "0.0.0.0/0" } else { "::/0" };
        ip(netns, &[fam, "route", "replace", "local", default, "dev", "lo", "table", &table])?;
    }
    Ok(())
}

/// A connection into a pod; `guard` (for transparent deliveries) keeps its
/// source registered with inbound capture and must live as long as `stream`.
#[derive(Debug)]
pub struct Delivered {
    /// The connection to the app.
    pub stream: TcpStream,
    /// Unregisters the source address when dropped.
    pub guard: Option<DeliveryGuard>,
}

impl Delivered {
    /// A connection that needs no registration.
    pub fn plain(stream: TcpStream) -> Self {
        Self { stream, guard: None }
    }
}

/// Connects to `dst` inside the pod netns of `worker`, from `src` when given
/// (transparent: the app sees `src` as its peer), else from the pod itself.
pub async fn connect(
    capture: &Capture,
    worker: &NetnsWorker,
    src: Option<std::net::IpAddr>,
    dst: SocketAddr,
) -> Result<Delivered, NetnsError> {
    let Some(src_ip) = src.filter(|s| *s != dst.ip() && s.is_ipv4() == dst.is_ipv4()) else {
        let opts = SocketOpts { mark: DAEMON_MARK, ..SocketOpts::default() };
        return worker.connect(dst, opts).await.map(Delivered::plain);
    };
    let opts = SocketOpts {
        mark: DAEMON_MARK | DELIVERY_MARK,
        transparent: true,
        ..SocketOpts::default()
    };
    let (sock, bound) = worker
        .run(move || -> io::Result<(socket2::Socket, SocketAddr)> {
            let s = crate::netns::new_socket(dst, socket2::Type::STREAM, opts)?;
            s.bind(&SocketAddr::new(src_ip, 0).into())?;
            let bound = s
                .local_addr()?
                .as_socket()
                .ok_or_else(|| io::Error::other("bound address is not IP"))?;
            Ok((s, bound))
        })
        .await?
        .map_err(|source| NetnsError::Socket {
            path: worker.path().to_path_buf(),
            what: format!("transparent socket from {src_ip}"),
            source,
        })?;
    let guard = capture.register_delivery(bound).ok();
    sock.set_nonblocking(true).map_err(|source| NetnsError::Socket {
        path: worker.path().to_path_buf(),
        what: "O_NONBLOCK".into(),
        source,
    })?;
    let ts = tokio::net::TcpSocket::from_std_stream(sock.into());
    let stream = ts.connect(dst).await.map_err(|source| NetnsError::Socket {
        path: worker.path().to_path_buf(),
        what: format!("connect {bound} -> {dst}"),
        source,
    })?;
    Ok(Delivered { stream, guard })
}
