//! QUIC transport end to end on 127.0.0.1, and the fallback to TCP.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{
    echo_server, echo_through, hbone_server, key, memory_echo_handler, quic_dial, quic_server,
    random_bytes, sha256, tcp_handler, Connector, Pki, Seen,
};
use tlsmesh_tunnel::quic::{Pool, QuicConfig};
use tlsmesh_tunnel::{Client, ClientConfig, ConnectHeaders, Error, Transport};

fn test_config() -> QuicConfig {
    QuicConfig { handshake_timeout: Duration::from_millis(800), ..QuicConfig::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_trip_16mib_with_headers() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let seen = Seen::default();
    let (addr, _ep) = quic_server(&pki, &test_config(), tcp_handler(seen.clone()));
    let pool = Pool::new(test_config());
    let dial = quic_dial(&pki);
    let headers = ConnectHeaders {
        forwarded_for: Some("[fd00::5]:40000".parse().unwrap()),
        traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
        baggage: None,
        ..ConnectHeaders::default()
    };
    let stream = pool.connect(&key(addr), echo, &headers, &dial).await.unwrap();
    let data = random_bytes(16 * 1024 * 1024 + 7, 3);
    let want = sha256(&data);
    let back = tokio::time::timeout(Duration::from_secs(120), echo_through(stream, data))
        .await
        .expect("round trip finished");
    assert_eq!(back.len(), 16 * 1024 * 1024 + 7);
    assert_eq!(sha256(&back), want);

    let req = seen.last();
    assert_eq!(req.authority, echo);
    assert_eq!(req.forwarded_for, headers.forwarded_for);
    assert_eq!(req.traceparent, headers.traceparent);
    assert_eq!(req.baggage, None);
    assert_eq!(req.peer_certs.len(), 1);
    assert_eq!(req.local_addr, addr);

    // A second stream reuses the connection.
    let s = pool.connect(&key(addr), echo, &headers, &dial).await.unwrap();
    assert_eq!(echo_through(s, b"again".to_vec()).await, b"again");
    assert_eq!(pool.connection_count(&key(addr)), 1);
}

#[tokio::test]
async fn refusals_carry_status_and_reason() {
    let pki = Pki::new();
    let (addr, _ep) = quic_server(&pki, &test_config(), tcp_handler(Seen::default()));
    let pool = Pool::new(test_config());
    let dial = quic_dial(&pki);
    let h = ConnectHeaders::default();

    let denied: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let e = pool.connect(&key(addr), denied, &h, &dial).await.unwrap_err();
    assert!(
        matches!(&e, Error::Refused { status: 401, reason, .. } if reason == "port 1 is not allowed"),
        "{e}"
    );
    assert!(e.to_string().contains("denied by policy"), "{e}");

    let other_ip: SocketAddr = "127.0.0.2:80".parse().unwrap();
    let e = pool.connect(&key(addr), other_ip, &h, &dial).await.unwrap_err();
    assert_eq!(e.refused_status(), Some(400), "{e}");

    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let e = pool.connect(&key(addr), closed, &h, &dial).await.unwrap_err();
    assert_eq!(e.refused_status(), Some(503), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_fill_connections_up_to_the_limit() {
    let pki = Pki::new();
    let (addr, _ep) = quic_server(&pki, &test_config(), memory_echo_handler());
    let pool = Pool::new(test_config());
    let dial = quic_dial(&pki);
    let mut tasks = tokio::task::JoinSet::new();
    let all_open = std::sync::Arc::new(tokio::sync::Barrier::new(300));
    // Nobody finishes its stream before the count was taken.
    let counted = std::sync::Arc::new(tokio::sync::Barrier::new(300));
    for i in 0..300u32 {
        let pool = pool.clone();
        let dial = dial.clone();
        let all_open = all_open.clone();
        let counted = counted.clone();
        tasks.spawn(async move {
            let s =
                pool.connect(&key(addr), addr, &ConnectHeaders::default(), &dial).await.unwrap();
            if all_open.wait().await.is_leader() {
                assert_eq!(pool.stats(), (3, 300), "100 streams per connection");
            }
            counted.wait().await;
            let data = random_bytes(4096, u64::from(i));
            assert_eq!(echo_through(s, data.clone()).await, data);
        });
    }
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(r) = tasks.join_next().await {
            r.unwrap();
        }
    })
    .await
    .expect("300 concurrent streams (3× the stream limit) completed");
    assert_eq!(pool.connection_count(&key(addr)), 3);
    // Sequential streams reuse a connection.
    let s = pool.connect(&key(addr), addr, &ConnectHeaders::default(), &dial).await.unwrap();
    assert_eq!(echo_through(s, b"x".to_vec()).await, b"x");
    assert_eq!(pool.connection_count(&key(addr)), 3);
}

#[tokio::test]
async fn nothing_listening_is_quic_unreachable_quickly() {
    let pki = Pki::new();
    // A UDP socket that never answers.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dst = silent.local_addr().unwrap();
    let pool = Pool::new(QuicConfig {
        handshake_timeout: Duration::from_millis(500),
        ..QuicConfig::default()
    });
    let start = Instant::now();
    let e = pool
        .connect(&key(dst), dst, &ConnectHeaders::default(), &quic_dial(&pki))
        .await
        .unwrap_err();
    assert!(e.is_quic_unreachable(), "{e}");
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
}

#[tokio::test]
async fn client_falls_back_to_tcp() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let (addr, _server) =
        hbone_server("127.0.0.1:0".parse().unwrap(), &pki, tcp_handler(Seen::default()), |_| {})
            .await;
    // Nothing answers QUIC on the HBONE server's port number.
    let client = Client::new(ClientConfig {
        quic: QuicConfig { handshake_timeout: Duration::from_millis(300), ..QuicConfig::default() },
        ..ClientConfig::default()
    });
    let conn = Connector::new(addr, &pki);
    let dial = quic_dial(&pki);
    let h = ConnectHeaders::default();

    let s =
        client.connect(&key(addr), echo, &h, Bytes::new(), Some(&dial), conn.make()).await.unwrap();
    assert_eq!(s.transport(), Transport::Tcp);
    assert_eq!(echo_through(s, b"via tcp".to_vec()).await, b"via tcp");
    assert!(client.quic_skipped(addr));

    // Next time QUIC is not retried: no handshake delay.
    let start = Instant::now();
    let s =
        client.connect(&key(addr), echo, &h, Bytes::new(), Some(&dial), conn.make()).await.unwrap();
    assert_eq!(s.transport(), Transport::Tcp);
    assert!(start.elapsed() < Duration::from_millis(250), "QUIC was retried");
}

#[tokio::test]
async fn client_uses_quic_when_it_answers() {
    let pki = Pki::new();
    let (addr, _ep) = quic_server(&pki, &test_config(), memory_echo_handler());
    let client = Client::new(ClientConfig { quic: test_config(), ..ClientConfig::default() });
    let conn = Connector::new(addr, &pki);
    let s = client
        .connect(
            &key(addr),
            addr,
            &ConnectHeaders::default(),
            Bytes::new(),
            Some(&quic_dial(&pki)),
            conn.make(),
        )
        .await
        .unwrap();
    assert_eq!(s.transport(), Transport::Quic);
    assert_eq!(echo_through(s, b"via quic".to_vec()).await, b"via quic");
    assert_eq!(conn.calls(), 0, "TCP connector not used");
}

/// Stream credit comes back: many more sequential streams than the server's
/// stream limit (4 here) all open on one pooled connection, without waiting
/// for a stream (the wait would fail after `response_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sequential_streams_beyond_the_stream_limit_reuse_one_connection() {
    let cfg =
        QuicConfig { max_streams: 4, response_timeout: Duration::from_secs(5), ..test_config() };
    let pki = Pki::new();
    let echo = echo_server().await;
    let (addr, _ep) = quic_server(&pki, &cfg, tcp_handler(Seen::default()));
    let pool = Pool::new(cfg);
    let dial = quic_dial(&pki);
    for i in 0..40u8 {
        let s = pool.connect(&key(addr), echo, &ConnectHeaders::default(), &dial).await.unwrap();
        assert_eq!(echo_through(s, vec![i; 1024]).await, vec![i; 1024]);
        assert_eq!(pool.stats(), (1, 0), "stream {i}: one connection, slot released");
    }
}

/// The socket helper raises the UDP buffers above the kernel default and
/// reports the segmentation offloads quinn will use.
#[test]
fn udp_socket_buffers_are_raised() {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let before = socket_rcvbuf(&sock);
    let t = tlsmesh_tunnel::quic::tune_udp_socket(&sock).unwrap();
    assert!(t.recv_buffer >= before && t.send_buffer > 0, "{t:?} (receive buffer was {before})");
    // Linux has had UDP GSO and GRO since 4.18 / 5.0: quinn uses both.
    assert!(t.gso_segments > 1 && t.gro_segments > 1, "segmentation offloads off: {t:?}");
}

fn socket_rcvbuf(sock: &std::net::UdpSocket) -> usize {
    quinn::udp::UdpSocketState::new(sock.into()).unwrap().recv_buffer_size(sock.into()).unwrap()
}

/// The resume extension's fields reach the handler over QUIC, its answer
/// reaches the client, and an attached stream carries bytes both ways.
#[tokio::test]
async fn resume_fields_travel_and_an_attached_stream_relays() {
    use tlsmesh_tunnel::ResumeExt;
    let pki = Pki::new();
    let seen = Seen::default();
    let (addr, _ep) = quic_server(&pki, &test_config(), common::attach_echo_handler(seen.clone()));
    let pool = Pool::new(test_config());
    let dial = quic_dial(&pki);
    let target: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let offer = ConnectHeaders {
        resume: ResumeExt::Offer { token: common::TOKEN.into() },
        ..ConnectHeaders::default()
    };
    let s = pool.connect(&key(addr), target, &offer, &dial).await.unwrap();
    assert!(s.response().resumable);
    assert_eq!(seen.last().resume, offer.resume);
    let data = random_bytes(300_000, 10);
    assert_eq!(echo_through(s, data.clone()).await, data);
    let quiesce = ConnectHeaders {
        resume: ResumeExt::Quiesce { token: common::TOKEN.into(), sent: 0 },
        ..ConnectHeaders::default()
    };
    let s = pool.connect(&key(addr), target, &quiesce, &dial).await.unwrap();
    assert_eq!(s.response().quiesce_sent, Some(1));
    assert!(!s.response().resumable);
    let resume = ConnectHeaders {
        resume: ResumeExt::Resume { token: common::TOKEN.into(), sent: 1, received: 2 },
        ..ConnectHeaders::default()
    };
    let e = pool.connect(&key(addr), target, &resume, &dial).await;
    assert!(matches!(e, Err(Error::Refused { status: 404, .. })), "{e:?}");
}
