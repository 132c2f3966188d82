//! The crate's error type: one variant per thing an operator can act on.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use crate::handler::Status;

/// Why a tunnel could not be opened or served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller's connector (TCP + TLS) failed.
    #[error("could not open a tunnel connection to {dst}: {source} (is port 15008 reachable, and does the peer accept our certificate?)")]
    Connect {
        dst: SocketAddr,
        #[source]
        source: io::Error,
    },

    /// Opening the connection or waiting for the answer took too long.
    #[error("timed out after {after:?} {what} (tunnel to {dst}); maybe a NetworkPolicy or firewall blocks port 15008")]
    Timeout { dst: SocketAddr, what: &'static str, after: Duration },

    /// The destination answered with a status other than 200.
    #[error("tunnel to {dst} refused with status {status}: {}{}", Status::meaning(*status), if reason.is_empty() { String::new() } else { format!(" ({reason})") })]
    Refused { dst: SocketAddr, status: u16, reason: String },

    /// HTTP/2 failed on an established tunnel connection.
    #[error("HTTP/2 error on the tunnel connection to {dst}: {source}")]
    H2 {
        dst: SocketAddr,
        #[source]
        source: h2::Error,
    },

    /// The QUIC handshake did not complete (nothing listening on UDP, UDP
    /// blocked, or too slow): the caller should fall back to TCP.
    #[error("QUIC to {dst} unreachable ({reason}); falling back to TCP is expected")]
    QuicUnreachable { dst: SocketAddr, reason: String },

    /// QUIC failed after the handshake.
    #[error("QUIC error on the tunnel connection to {dst}: {reason}")]
    Quic { dst: SocketAddr, reason: String },

    /// The peer broke the tunnel protocol (bad header, wrong ALPN, ...).
    #[error("tunnel protocol error with {peer}: {reason}")]
    Protocol { peer: SocketAddr, reason: String },

    /// The TLS configuration cannot be used for this transport.
    #[error("unusable TLS configuration: {0}")]
    Config(String),

    /// I/O on an established tunnel connection failed.
    #[error("I/O error on the tunnel connection with {peer}: {source}")]
    Io {
        peer: SocketAddr,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// True when QUIC could not reach the peer and the caller should use TCP.
    pub fn is_quic_unreachable(&self) -> bool {
        matches!(self, Error::QuicUnreachable { .. })
    }

    /// The refusal status, if the peer answered with one.
    pub fn refused_status(&self) -> Option<u16> {
        match self {
            Error::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Connect { .. } => "connect",
            Error::Timeout { .. } => "timeout",
            Error::Refused { status: 401, .. } => "denied",
            Error::Refused { status: 503, .. } => "unreachable",
            Error::Refused { .. } => "refused",
            Error::H2 { .. } => "h2",
            Error::QuicUnreachable { .. } => "quic_unreachable",
            Error::Quic { .. } => "quic",
            Error::Protocol { .. } => "protocol",
            Error::Config(_) => "config",
            Error::Io { .. } => "io",
        }
    }
}

/// Converts an h2 error into an `io::Error` for the `AsyncRead`/`AsyncWrite`
/// side, keeping the underlying I/O error when there is one.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e.into_io().unwrap_or_else(|| io::Error::other("h2 I/O error"));
    }
    let kind = if e.is_reset() || e.is_go_away() || e.is_remote() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::BrokenPipe
    };
    io::Error::new(kind, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_messages_are_readable() {
        let dst: SocketAddr = "10.0.0.1:15008".parse().unwrap();
        let e = Error::Refused { dst, status: 401, reason: String::new() };
        assert_eq!(
            e.to_string(),
            "tunnel to 10.0.0.1:15008 refused with status 401: denied by policy at the destination"
        );
        let e = Error::Refused { dst, status: 503, reason: "connection refused".into() };
        assert!(e.to_string().contains("destination unreachable"), "{e}");
        assert!(e.to_string().ends_with("(connection refused)"), "{e}");
        assert_eq!(e.kind(), "unreachable");
        assert_eq!(e.refused_status(), Some(503));
    }
}
