//! An independent HBONE client written from docs/PROTOCOL.md alone (raw
//! `h2::client` over tokio-rustls, none of the crate's client code) talks to
//! the crate's server — proof that the document is enough to interoperate.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use common::{echo_server, hbone_server, tcp_handler, Pki, Seen, SERVER_NAME};
use http::{Method, Request, StatusCode};
use tokio::net::TcpStream;

/// PROTOCOL.md §1: TLS 1.3 with a client certificate, ALPN "h2", SNI = the
/// name the server's certificate carries; then HTTP/2 with prior knowledge.
async fn open(addr: SocketAddr, pki: &Pki) -> h2::client::SendRequest<Bytes> {
    let mut tls = (*pki.client).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(SERVER_NAME).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    assert_eq!(tls.get_ref().1.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
    let (send, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    send
}

/// PROTOCOL.md §2: CONNECT with `:authority` = ip:port (no :scheme/:path),
/// optional `forwarded`, `traceparent`, `baggage`.
async fn connect(
    send: &mut h2::client::SendRequest<Bytes>,
    authority: &str,
) -> (StatusCode, h2::SendStream<Bytes>, h2::RecvStream) {
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority)
        .header("forwarded", "for=\"10.9.8.7:6543\"")
        .header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
        .header("baggage", "k8s.pod.name=client")
        .body(())
        .unwrap();
    let mut send = send.clone().ready().await.unwrap();
    let (resp, body_tx) = send.send_request(req, false).unwrap();
    let resp = resp.await.unwrap();
    (resp.status(), body_tx, resp.into_body())
}

#[tokio::test]
async fn independent_client_gets_200_and_bytes_through() {
    let pki = Pki::new();
    let echo = echo_server().await;
    let seen = Seen::default();
    let (addr, _server) =
        hbone_server("127.0.0.1:0".parse().unwrap(), &pki, tcp_handler(seen.clone()), |_| {}).await;
    let mut h2 = open(addr, &pki).await;

    let (status, mut tx, mut rx) = connect(&mut h2, &echo.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    // DATA frames carry the bytes; END_STREAM is the TCP half-close.
    tx.send_data(Bytes::from_static(b"hello over hbone"), true).unwrap();
    let mut got = Vec::new();
    while let Some(chunk) = rx.data().await {
        let chunk = chunk.unwrap();
        let _ = rx.flow_control().release_capacity(chunk.len());
        got.extend_from_slice(&chunk);
    }
    assert_eq!(got, b"hello over hbone");

    let req = seen.last();
    assert_eq!(req.authority, echo);
    assert_eq!(req.forwarded_for, Some("10.9.8.7:6543".parse().unwrap()));
    assert_eq!(
        req.traceparent.as_deref(),
        Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")
    );
    assert_eq!(req.baggage.as_deref(), Some("k8s.pod.name=client"));
}

#[tokio::test]
async fn independent_client_malformed_requests_get_400() {
    let pki = Pki::new();
    let (addr, _server) =
        hbone_server("127.0.0.1:0".parse().unwrap(), &pki, tcp_handler(Seen::default()), |_| {})
            .await;
    let mut h2 = open(addr, &pki).await;

    // Not ip:port.
    let (status, _, _) = connect(&mut h2, "foo").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let (status, _, _) = connect(&mut h2, "foo:80").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    // IP differs from the address the connection arrived at.
    let (status, _, _) = connect(&mut h2, "127.0.0.3:80").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // Not CONNECT.
    let req =
        Request::builder().method(Method::GET).uri(format!("https://{addr}/")).body(()).unwrap();
    let mut send = h2.clone().ready().await.unwrap();
    let (resp, _) = send.send_request(req, true).unwrap();
    assert_eq!(resp.await.unwrap().status(), StatusCode::BAD_REQUEST);
}
