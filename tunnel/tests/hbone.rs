//! HBONE end to end on 127.0.0.1: round trip, status codes, pooling,
//! failure handling and flow control.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::{
    echo_server, echo_through, hbone_server, key, memory_echo_handler, random_bytes, sha256,
    tcp_handler, Connector, Pki, Seen,
};
use tlsmesh_tunnel::hbone::{self, Pool, PoolConfig};
use tlsmesh_tunnel::{Accepted, ConnectHeaders, ConnectRequest, Error};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_16mib_with_headers() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let seen = Seen::default();
    let (addr, _server) = hbone_server(any(), &pki, tcp_handler(seen.clone()), |_| {}).await;
    let pool = Pool::new(PoolConfig::default());
    let conn = Connector::new(addr, &pki);
    let headers = ConnectHeaders {
        forwarded_for: Some("10.1.2.3:45678".parse().unwrap()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        baggage: Some("k8s.namespace.name=a".into()),
        ..ConnectHeaders::default()
    };
    let stream = pool.connect(&key(addr), echo, &headers, conn.make()).await.unwrap();

    let data = random_bytes(16 * 1024 * 1024 + 123, 1);
    let want = sha256(&data);
    let back = tokio::time::timeout(Duration::from_secs(120), echo_through(stream, data))
        .await
        .expect("round trip finished");
    assert_eq!(back.len(), 16 * 1024 * 1024 + 123);
    assert_eq!(sha256(&back), want, "data came back intact");

    let req = seen.last();
    assert_eq!(req.authority, echo);
    assert_eq!(req.forwarded_for, headers.forwarded_for);
    assert_eq!(req.traceparent, headers.traceparent);
    assert_eq!(req.baggage, headers.baggage);
    assert_eq!(req.local_addr, addr);
    assert_eq!(req.peer_addr.ip(), addr.ip());
    assert_eq!(req.peer_certs.len(), 1, "the client's certificate chain");
}

#[tokio::test]
async fn ipv6_forwarded_for_is_parsed() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let seen = Seen::default();
    let (addr, _server) = hbone_server(any(), &pki, tcp_handler(seen.clone()), |_| {}).await;
    let pool = Pool::new(PoolConfig::default());
    let headers = ConnectHeaders {
        forwarded_for: Some("[fd00::1:2]:999".parse().unwrap()),
        ..ConnectHeaders::default()
    };
    let s = pool.connect(&key(addr), echo, &headers, Connector::new(addr, &pki).make()).await;
    drop(s.unwrap());
    assert_eq!(seen.last().forwarded_for, headers.forwarded_for);
    assert_eq!(seen.last().traceparent, None);
}

#[tokio::test]
async fn refusals_map_to_status_codes() {
    let pki = Pki::new();
    let seen = Seen::default();
    let (addr, _server) = hbone_server(any(), &pki, tcp_handler(seen), |_| {}).await;
    let pool = Pool::new(PoolConfig::default());
    let conn = Connector::new(addr, &pki);
    let h = ConnectHeaders::default();

    // Handler denies port 1 → 401.
    let denied: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let e = pool.connect(&key(addr), denied, &h, conn.make()).await.unwrap_err();
    assert!(matches!(e, Error::Refused { status: 401, .. }), "{e}");
    assert!(e.to_string().contains("denied by policy at the destination"), "{e}");

    // Nothing listens upstream → 503.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let e = pool.connect(&key(addr), closed, &h, conn.make()).await.unwrap_err();
    assert_eq!(e.refused_status(), Some(503), "{e}");
    assert!(e.to_string().contains("destination unreachable"), "{e}");

    // Authority IP differs from the address the connection arrived at → 400.
    let other_ip: SocketAddr = "127.0.0.2:80".parse().unwrap();
    let e = pool.connect(&key(addr), other_ip, &h, conn.make()).await.unwrap_err();
    assert_eq!(e.refused_status(), Some(400), "{e}");

    // Refusals do not break the pooled connection.
    assert_eq!(conn.calls(), 1);
    assert_eq!(pool.connection_count(&key(addr)), 1);
}

#[tokio::test]
async fn connector_failure_is_reported_and_leaves_no_state() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let pki = Pki::new();
    let pool = Pool::new(PoolConfig::default());
    let conn = Connector::new(closed, &pki);
    let e = pool
        .connect(&key(closed), closed, &ConnectHeaders::default(), conn.make())
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Connect { .. }), "{e}");
    assert!(e.to_string().contains("could not open a tunnel connection"), "{e}");
    assert_eq!(pool.stats(), (0, 0));
}

#[tokio::test]
async fn ip_check_can_be_relaxed() {
    let pki = Pki::new();
    let seen = Seen::default();
    let (addr, _server) =
        hbone_server(any(), &pki, tcp_handler(seen.clone()), |c| c.check_authority_ip = false)
            .await;
    let pool = Pool::new(PoolConfig::default());
    // 127.0.0.2 is loopback too; nothing listens there on port 1 → 401 from
    // the handler shows the request got past the IP check.
    let other_ip: SocketAddr = "127.0.0.2:1".parse().unwrap();
    let e = pool
        .connect(
            &key(addr),
            other_ip,
            &ConnectHeaders::default(),
            Connector::new(addr, &pki).make(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.refused_status(), Some(401), "{e}");
    assert_eq!(seen.last().authority, other_ip);
}

#[tokio::test]
async fn sequential_connects_reuse_one_connection() {
    let pki = Pki::new();
    let (addr, _server) = hbone_server(any(), &pki, memory_echo_handler(), |_| {}).await;
    let pool = Pool::new(PoolConfig::default());
    let conn = Connector::new(addr, &pki);
    for i in 0..50u8 {
        let mut s =
            pool.connect(&key(addr), addr, &ConnectHeaders::default(), conn.make()).await.unwrap();
        s.write_all(&[i; 10]).await.unwrap();
        let mut b = [0u8; 10];
        s.read_exact(&mut b).await.unwrap();
        assert_eq!(b, [i; 10]);
    }
    assert_eq!(conn.calls(), 1, "one TLS connection for 50 sequential streams");
    assert_eq!(pool.connection_count(&key(addr)), 1);
    assert_eq!(pool.stats(), (1, 0), "no stream left open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousand_concurrent_streams() {
    let pki = Pki::new();
    let (addr, _server) = hbone_server(any(), &pki, memory_echo_handler(), |_| {}).await;
    let pool = Pool::new(PoolConfig::default());
    let conn = Connector::new(addr, &pki);
    let mut tasks = tokio::task::JoinSet::new();
    // Every stream stays open until all 1000 are: they are truly concurrent.
    let all_open = Arc::new(tokio::sync::Barrier::new(1000));
    let peak = Arc::new(AtomicU64::new(0));
    for i in 0..1000u32 {
        let pool = pool.clone();
        let conn = conn.clone();
        let all_open = all_open.clone();
        let peak = peak.clone();
        tasks.spawn(async move {
            let s = pool
                .connect(&key(addr), addr, &ConnectHeaders::default(), conn.make())
                .await
                .unwrap();
            if all_open.wait().await.is_leader() {
                peak.store(pool.stats().1 as u64, Ordering::SeqCst);
            }
            let data = random_bytes(4096, u64::from(i));
            let back = echo_through(s, data.clone()).await;
            assert_eq!(back, data);
        });
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    })
    .await
    .expect("1000 concurrent streams completed in time");
    assert_eq!(peak.load(Ordering::SeqCst), 1000, "1000 streams open at once");
    assert_eq!(conn.calls(), 10, "100 streams per connection → 10 connections");
    assert_eq!(pool.stats(), (10, 0));
}

#[tokio::test]
async fn full_connection_opens_a_second_one() {
    let pki = Pki::new();
    let (addr, _server) = hbone_server(any(), &pki, memory_echo_handler(), |_| {}).await;
    let pool = Pool::new(PoolConfig { max_streams_per_conn: 2, ..PoolConfig::default() });
    let conn = Connector::new(addr, &pki);
    let h = ConnectHeaders::default();
    let a = pool.connect(&key(addr), addr, &h, conn.make()).await.unwrap();
    let b = pool.connect(&key(addr), addr, &h, conn.make()).await.unwrap();
    assert_eq!(conn.calls(), 1);
    let c = pool.connect(&key(addr), addr, &h, conn.make()).await.unwrap();
    assert_eq!(conn.calls(), 2, "third stream needed a second connection");
    assert_eq!(pool.connection_count(&key(addr)), 2);
    assert_eq!(pool.stats(), (2, 3));
    drop((a, b, c));
    // A freed slot is reused rather than opening a third connection.
    let _d = pool.connect(&key(addr), addr, &h, conn.make()).await.unwrap();
    assert_eq!(conn.calls(), 2);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let pki = Pki::new();
    let (addr, _server) = hbone_server(any(), &pki, memory_echo_handler(), |_| {}).await;
    let pool =
        Pool::new(PoolConfig { idle_timeout: Duration::from_millis(200), ..PoolConfig::default() });
    let conn = Connector::new(addr, &pki);
    let h = ConnectHeaders::default();
    let s = pool.connect(&key(addr), addr, &h, conn.make()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(pool.connection_count(&key(addr)), 1, "a connection with an open stream stays");
    drop(s);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(pool.connection_count(&key(addr)), 0, "idle connection released");
    let _s = pool.connect(&key(addr), addr, &h, conn.make()).await.unwrap();
    assert_eq!(conn.calls(), 2);
}

/// Pushes data through `s` forever, counting bytes; returns the first error.
fn spawn_pump(
    s: tlsmesh_tunnel::hbone::TunnelStream,
) -> tokio::task::JoinHandle<(std::io::Error, std::io::Error)> {
    let (mut r, mut w) = tokio::io::split(s);
    tokio::spawn(async move {
        let writer = async {
            let chunk = vec![7u8; 64 * 1024];
            loop {
                if let Err(e) = w.write_all(&chunk).await {
                    return e;
                }
            }
        };
        let reader = async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match r.read(&mut buf).await {
                    Ok(0) => return std::io::Error::other("unexpected clean EOF"),
                    Ok(_) => {}
                    Err(e) => return e,
                }
            }
        };
        tokio::join!(writer, reader)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_errors_streams_and_pool_recovers() {
    let pki = Pki::new();
    let (addr, server) = hbone_server(any(), &pki, memory_echo_handler(), |_| {}).await;
    let pool = Pool::new(PoolConfig::default());
    let conn = Connector::new(addr, &pki);
    let h = ConnectHeaders::default();
    let s = pool.connect(&key(addr), addr, &h, conn.make()).await.unwrap();
    let pump = spawn_pump(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pump.is_finished(), "transfer is running");

    server.abort();
    let (we, re) = tokio::time::timeout(Duration::from_secs(5), pump)
        .await
        .expect("reads and writes fail promptly, no hang")
        .unwrap();
    eprintln!("after kill: write error {we}, read error {re}");

    // The server comes back on the same port; the pool notices the dead
    // connection and opens a fresh one transparently.
    let (addr2, _server2) = hbone_server(addr, &pki, memory_echo_handler(), |_| {}).await;
    assert_eq!(addr2, addr);
    let mut s = pool.connect(&key(addr), addr, &h, conn.make()).await.unwrap();
    s.write_all(b"again").await.unwrap();
    let mut b = [0u8; 5];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"again");
    assert_eq!(conn.calls(), 2);
}

async fn forward(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: tokio::sync::watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            n = r.read(&mut buf) => n.unwrap_or(0),
            _ = frozen.wait_for(|f| *f) => 0,
        };
        if *frozen.borrow() {
            // Frozen: hold the sockets open, forward nothing.
            std::future::pending::<()>().await;
        }
        if n == 0 || w.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// A TCP relay that can be frozen: it stops forwarding but keeps both
/// sockets open, like a peer whose node vanished.
async fn freezable_relay(
    target: SocketAddr,
) -> (SocketAddr, Arc<tokio::sync::watch::Sender<bool>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        loop {
            let Ok((inb, _)) = l.accept().await else { return };
            let out = tokio::net::TcpStream::connect(target).await.unwrap();
            let rx = rx.clone();
            let (ir, iw) = inb.into_split();
            let (or, ow) = out.into_split();
            tokio::spawn(forward(ir, ow, rx.clone()));
            tokio::spawn(forward(or, iw, rx.clone()));
        }
    });
    (addr, Arc::new(tx))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_peer_is_detected_by_keepalive() {
    let pki = Pki::new();
    let (server_addr, _server) = hbone_server(any(), &pki, memory_echo_handler(), |_| {}).await;
    let (relay, freeze) = freezable_relay(server_addr).await;
    let mut cfg = PoolConfig::default();
    cfg.h2.keepalive_interval = Some(Duration::from_millis(300));
    cfg.h2.keepalive_timeout = Duration::from_millis(700);
    let pool = Pool::new(cfg);
    let conn = Connector::new(relay, &pki);
    // The authority must be the server's address (the IP check).
    let s = pool
        .connect(&key(relay), server_addr, &ConnectHeaders::default(), conn.make())
        .await
        .unwrap();
    let pump = spawn_pump(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    freeze.send_replace(true);
    let (we, re) = tokio::time::timeout(Duration::from_secs(5), pump)
        .await
        .expect("the keepalive notices the silent peer")
        .unwrap();
    eprintln!("after freeze: write error {we}, read error {re}");
    assert_eq!(pool.connection_count(&key(relay)), 0, "dead connection evicted");
}

/// The handler's upstream is a small in-memory pipe whose far end the test
/// controls: it can stop reading (slow consumer) or stream data down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_blocks_the_writer() {
    let pki = Pki::new();
    let (far_tx, mut far_rx) = tokio::sync::mpsc::unbounded_channel();
    let handler = Arc::new(move |_req: ConnectRequest| {
        let far_tx = far_tx.clone();
        async move {
            let (near, far) = tokio::io::duplex(64 * 1024);
            far_tx.send(far).unwrap();
            Ok(Accepted::new(near))
        }
    });
    let (addr, _server) = hbone_server(any(), &pki, handler, |_| {}).await;
    let pool = Pool::new(PoolConfig::default());
    let conn = Connector::new(addr, &pki);
    let tunnel =
        pool.connect(&key(addr), addr, &ConnectHeaders::default(), conn.make()).await.unwrap();
    let mut far = far_rx.recv().await.unwrap();
    let (mut tunnel_r, mut tunnel_w) = tokio::io::split(tunnel);

    // Client → server: the far end does not read.
    let written = Arc::new(AtomicU64::new(0));
    let total = 64 * 1024 * 1024;
    let data = random_bytes(total, 9);
    let w_count = written.clone();
    let d2 = data.clone();
    let writer = tokio::spawn(async move {
        for chunk in d2.chunks(64 * 1024) {
            tunnel_w.write_all(chunk).await.unwrap();
            w_count.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        tunnel_w.shutdown().await.unwrap();
        tunnel_w
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!writer.is_finished(), "64 MiB must not fit while the reader is paused");
    let buffered = written.load(Ordering::SeqCst);
    eprintln!("client accepted {buffered} bytes while the far end was paused");
    // 4 MiB stream window + 1 MiB h2 send buffer + splice buffer + pipe.
    assert!(buffered > 0, "some bytes went through");
    assert!(buffered <= 8 * 1024 * 1024, "buffered {buffered} bytes: flow control is not bounding");

    // Resume: everything arrives intact.
    let mut got = Vec::with_capacity(total);
    tokio::time::timeout(Duration::from_secs(120), far.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sha256(&got), sha256(&data));
    let mut tunnel_w = writer.await.unwrap();

    // Server → client: the client does not read.
    let far_written = Arc::new(AtomicU64::new(0));
    let fw = far_written.clone();
    let (mut far_r, mut far_w) = tokio::io::split(far);
    let pusher = tokio::spawn(async move {
        let chunk = vec![1u8; 64 * 1024];
        for _ in 0..(total / chunk.len()) {
            far_w.write_all(&chunk).await.unwrap();
            fw.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
        far_w.shutdown().await.unwrap();
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!pusher.is_finished(), "64 MiB must not fit while the client is not reading");
    let buffered = far_written.load(Ordering::SeqCst);
    eprintln!("upstream wrote {buffered} bytes while the client was paused");
    assert!(buffered <= 8 * 1024 * 1024, "buffered {buffered} bytes: flow control is not bounding");

    let mut received = 0usize;
    let mut buf = vec![0u8; 256 * 1024];
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            let k = tunnel_r.read(&mut buf).await.unwrap();
            if k == 0 {
                break;
            }
            received += k;
        }
    })
    .await
    .unwrap();
    assert_eq!(received, total);
    pusher.await.unwrap();
    let mut rest = Vec::new();
    far_r.read_to_end(&mut rest).await.unwrap();
    assert!(rest.is_empty());
    let _ = tunnel_w.shutdown().await;
}

#[tokio::test]
async fn drain_sends_goaway_and_lets_open_streams_finish() {
    let pki = Pki::new();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let drain = Arc::new(tokio::sync::Notify::new());
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let signal = drain.clone();
    // The first connection is served with a drain signal, later ones plainly.
    let _server = tokio::spawn(async move {
        let mut first_tx = Some(first_tx);
        loop {
            let (tcp, peer) = listener.accept().await.unwrap();
            let tls = acceptor.accept(tcp).await.unwrap();
            let ctx = hbone::ServerCtx::new(addr, peer);
            if let Some(tx) = first_tx.take() {
                let signal = signal.clone();
                let drained = async move { signal.notified().await };
                let task =
                    tokio::spawn(hbone::serve_until(tls, ctx, memory_echo_handler(), drained));
                let _ = tx.send(task);
            } else {
                tokio::spawn(hbone::serve(tls, ctx, memory_echo_handler()));
            }
        }
    });
    let pool = Pool::new(PoolConfig::default());
    let conn = Connector::new(addr, &pki);
    let h = ConnectHeaders::default();
    let mut old = pool.connect(&key(addr), addr, &h, conn.make()).await.unwrap();
    let first = first_rx.await.unwrap();
    let mut buf = [0u8; 2];
    old.write_all(b"a1").await.unwrap();
    old.read_exact(&mut buf).await.unwrap();

    drain.notify_one();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // New streams go to a new connection, transparently.
    let fresh = pool.connect(&key(addr), addr, &h, conn.make()).await.unwrap();
    assert_eq!(conn.calls(), 2, "GOAWAY made the pool open a new connection");
    assert_eq!(echo_through(fresh, b"new".to_vec()).await, b"new");
    // The open stream keeps working until it ends.
    old.write_all(b"a2").await.unwrap();
    old.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"a2");
    assert!(!first.is_finished(), "drain waits for the open stream");
    old.shutdown().await.unwrap();
    let mut rest = Vec::new();
    old.read_to_end(&mut rest).await.unwrap();
    drop(old);
    tokio::time::timeout(Duration::from_secs(5), first)
        .await
        .expect("drained connection closes once its streams ended")
        .unwrap()
        .unwrap();
}

/// Early data rides behind the request: it arrives first and in order when
/// the request is accepted, and a refusal still surfaces as the status
/// (the bytes are discarded with the stream) on a connection that stays
/// usable.
#[tokio::test]
async fn early_data_arrives_first_and_a_refusal_discards_it() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let seen = Seen::default();
    let (addr, _server) = hbone_server(any(), &pki, tcp_handler(seen), |_| {}).await;
    let pool = Pool::new(PoolConfig::default());
    let conn = Connector::new(addr, &pki);
    let h = ConnectHeaders::default();
    let early = bytes::Bytes::from_static(b"hello before the 200; ");
    let mut s = pool
        .connect_with_early_data(&key(addr), echo, &h, early.clone(), conn.make())
        .await
        .unwrap();
    s.write_all(b"and after").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    s.read_to_end(&mut back).await.unwrap();
    assert_eq!(back, b"hello before the 200; and after");

    let denied: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let e =
        pool.connect_with_early_data(&key(addr), denied, &h, early, conn.make()).await.unwrap_err();
    assert!(matches!(e, Error::Refused { status: 401, .. }), "{e}");
    assert_eq!(conn.calls(), 1, "one pooled connection served both");
}

/// The resume extension's fields reach the handler, its answer reaches the
/// client, and an attached stream carries bytes both ways.
#[tokio::test]
async fn resume_fields_travel_and_an_attached_stream_relays() {
    use tlsmesh_tunnel::ResumeExt;
    let pki = Pki::new();
    let seen = Seen::default();
    let (addr, _server) =
        hbone_server(any(), &pki, common::attach_echo_handler(seen.clone()), |_| {}).await;
    let pool = Pool::new(PoolConfig::default());
    let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let offer = ConnectHeaders {
        resume: ResumeExt::Offer { token: common::TOKEN.into() },
        ..ConnectHeaders::default()
    };
    let s = pool.connect(&key(addr), target, &offer, Connector::new(addr, &pki).make()).await;
    let s = s.unwrap();
    assert!(s.response().resumable);
    assert_eq!(seen.last().resume, offer.resume);
    let data = random_bytes(300_000, 9);
    assert_eq!(echo_through(s, data.clone()).await, data);

    let quiesce = ConnectHeaders {
        resume: ResumeExt::Quiesce { token: common::TOKEN.into(), sent: 41 },
        ..ConnectHeaders::default()
    };
    let s = pool.connect(&key(addr), target, &quiesce, Connector::new(addr, &pki).make()).await;
    assert_eq!(s.unwrap().response().quiesce_sent, Some(42));
    let resume = ConnectHeaders {
        resume: ResumeExt::Resume { token: common::TOKEN.into(), sent: 1, received: 2 },
        ..ConnectHeaders::default()
    };
    let e = pool.connect(&key(addr), target, &resume, Connector::new(addr, &pki).make()).await;
    assert!(matches!(e, Err(Error::Refused { status: 404, .. })), "{e:?}");
    assert_eq!(seen.last().resume, resume.resume);
}
