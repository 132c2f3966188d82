//! The wire protocol between node daemons and the CA (documented in
//! docs/IDENTITY.md): over one TLS 1.3 connection the client sends one
//! request, a single line of JSON ended by `\n`; the server answers one line
//! of JSON and closes the connection. Messages are at most
//! [`MAX_MESSAGE`] bytes.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt as _, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _,
};

use crate::spiffe::SpiffeId;

/// Port the CA listens on by default (the port istiod's CA uses).
pub const DEFAULT_CA_PORT: u16 = 15012;
/// Largest request or response line, newline included.
pub const MAX_MESSAGE: usize = 64 * 1024;

/// Errors reading or writing protocol messages.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection error: {0}")]
    Io(#[from] std::io::Error),
    #[error("message larger than {MAX_MESSAGE} bytes")]
    TooLarge,
    #[error("connection closed before a complete message arrived")]
    Truncated,
    #[error("malformed message: {0}")]
    Json(#[from] serde_json::Error),
}

/// A request from a node daemon.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    /// Bootstrap, without a client certificate: prove the node with its join
    /// token and get a node certificate `spiffe://<td>/node/<node>` for `csr`.
    Join { node: String, token: String, csr: String },
    /// With the node certificate: renew it for the key in `csr`.
    RenewNode { csr: String },
    /// With the node certificate: a workload certificate for `id`, which must
    /// have a pod on the node named by the client certificate.
    Workload { id: SpiffeId, csr: String },
    /// With or without a client certificate: the current trust bundle.
    Bundle,
}

impl fmt::Debug for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Request::Join { node, .. } => f
                .debug_struct("Join")
                .field("node", node)
                .field("token", &"[redacted]")
                .finish_non_exhaustive(),
            Request::RenewNode { .. } => f.write_str("RenewNode"),
            Request::Workload { id, .. } => {
                f.debug_struct("Workload").field("id", id).finish_non_exhaustive()
            }
            Request::Bundle => f.write_str("Bundle"),
        }
    }
}

/// Classes of refusal, for the client to decide whether to retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Malformed request or CSR: retrying will not help.
    BadRequest,
    /// Wrong or missing credentials (join token, node certificate).
    Unauthenticated,
    /// Authenticated, but not allowed (identity not placed on this node).
    Denied,
    /// The CA failed; retry later.
    Internal,
}

/// The CA's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    /// `chain`: issued certificate then CA chain, PEM (empty for `bundle`).
    /// `bundle`: the trust bundle (all roots), PEM.
    Ok {
        chain: String,
        bundle: String,
    },
    Error {
        kind: ErrorKind,
        message: String,
    },
}

/// Reads one `\n`-terminated JSON message.
pub async fn read_message<T: DeserializeOwned>(
    reader: &mut (impl AsyncBufRead + Unpin),
) -> Result<T, ProtocolError> {
    let mut buf = Vec::new();
    let limit = u64::try_from(MAX_MESSAGE).unwrap_or(u64::MAX);
    let n = reader.take(limit + 1).read_until(b'\n', &mut buf).await?;
    if n > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge);
    }
    if buf.last() != Some(&b'\n') {
        return Err(ProtocolError::Truncated);
    }
    let value = serde_json::from_slice(&buf)?;
    zeroize::Zeroize::zeroize(&mut buf);
    Ok(value)
}

/// Writes one message as JSON plus `\n` and flushes.
pub async fn write_message<T: Serialize>(
    writer: &mut (impl AsyncWrite + Unpin),
    message: &T,
) -> Result<(), ProtocolError> {
    let mut buf = serde_json::to_vec(message)?;
    buf.push(b'\n');
    if buf.len() > MAX_MESSAGE {
        return Err(ProtocolError::TooLarge);
    }
    writer.write_all(&buf).await?;
    writer.flush().await?;
    zeroize::Zeroize::zeroize(&mut buf);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_format_is_stable() {
        let req =
            Request::Workload { id: "spiffe://td/ns/a/sa/b".parse().unwrap(), csr: "CSR".into() };
        assert_eq!(
            serde_json::to_string(&req).unwrap(),
            r#"{"type":"workload","id":"spiffe://td/ns/a/sa/b","csr":"CSR"}"#
        );
        let join: Request =
            serde_json::from_str(r#"{"type":"join","node":"n","token":"secret","csr":"C"}"#)
                .unwrap();
        assert!(!format!("{join:?}").contains("secret"));
        let resp = Response::Error { kind: ErrorKind::Denied, message: "no".into() };
        assert_eq!(
            serde_json::to_string(&resp).unwrap(),
            r#"{"status":"error","kind":"denied","message":"no"}"#
        );
        assert!(
            serde_json::from_str::<Request>(r#"{"type":"workload","id":"nope","csr":""}"#).is_err()
        );
    }

    #[tokio::test]
    async fn framing_round_trip_and_limits() {
        let (mut a, b) = tokio::io::duplex(1 << 20);
        write_message(&mut a, &Request::Bundle).await.unwrap();
        drop(a);
        let mut reader = tokio::io::BufReader::new(b);
        let got: Request = read_message(&mut reader).await.unwrap();
        assert_eq!(got, Request::Bundle);
        assert!(matches!(
            read_message::<Request>(&mut reader).await,
            Err(ProtocolError::Truncated)
        ));

        let (mut a, b) = tokio::io::duplex(1 << 20);
        let big = vec![b'x'; MAX_MESSAGE + 10];
        tokio::io::AsyncWriteExt::write_all(&mut a, &big).await.unwrap();
        drop(a);
        let mut reader = tokio::io::BufReader::new(b);
        assert!(matches!(read_message::<Request>(&mut reader).await, Err(ProtocolError::TooLarge)));
    }
}
