//! Rough single-host throughput figures (not a benchmark, asserts nothing
//! about speed). Run with
//! `cargo test --release -p tlsmesh-tunnel --test throughput -- --ignored --nocapture`.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::{hbone_server, key, quic_dial, quic_server, tcp_handler, Connector, Pki, Seen};
use tlsmesh_tunnel::hbone::{Pool, PoolConfig};
use tlsmesh_tunnel::quic::{self, QuicConfig};
use tlsmesh_tunnel::ConnectHeaders;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOTAL: usize = 1 << 30;

/// A TCP server that reads everything and closes at EOF.
async fn discard_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else { return };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                }
            });
        }
    });
    addr
}

async fn push<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S, bytes: usize) {
    let chunk = vec![0x5a; 256 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        s.write_all(&chunk[..n]).await.unwrap();
        left -= n;
    }
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
}

fn report(what: &str, bytes: usize, took: Duration) {
    #[allow(clippy::cast_precision_loss)]
    let gbit = bytes as f64 * 8.0 / took.as_secs_f64() / 1e9;
    eprintln!("{what}: {} MiB in {took:.2?} = {gbit:.2} Gbit/s", bytes >> 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "throughput figures; run in release by hand"]
async fn throughput() {
    let pki = Pki::new();
    let sink = discard_server().await;

    let (addr, _server) =
        hbone_server("127.0.0.1:0".parse().unwrap(), &pki, tcp_handler(Seen::default()), |_| {})
            .await;
    let pool = Pool::new(PoolConfig::default());
    let conn = Connector::new(addr, &pki);
    for streams in [1usize, 8] {
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..streams {
            let h = ConnectHeaders::default();
            let s = pool.connect(&key(addr), sink, &h, conn.make()).await.unwrap();
            tasks.spawn(push(s, TOTAL / streams));
        }
        while tasks.join_next().await.is_some() {}
        report(&format!("HBONE, {streams} stream(s)"), TOTAL, start.elapsed());
    }

    let (qaddr, _ep) = quic_server(&pki, &QuicConfig::default(), tcp_handler(Seen::default()));
    let qpool = quic::Pool::new(QuicConfig::default());
    let dial = quic_dial(&pki);
    for streams in [1usize, 8] {
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..streams {
            let h = ConnectHeaders::default();
            let s = qpool.connect(&key(qaddr), sink, &h, &dial).await.unwrap();
            tasks.spawn(push(s, TOTAL / streams));
        }
        while tasks.join_next().await.is_some() {}
        report(&format!("QUIC, {streams} stream(s)"), TOTAL, start.elapsed());
    }
}
