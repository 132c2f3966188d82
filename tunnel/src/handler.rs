//! The types shared by both transports: what a tunnelled connection asks for
//! ([`ConnectRequest`]), how the daemon answers ([`Handler`], [`Accepted`],
//! [`Refusal`]), pool keys, and the pure request-validation rules.

use std::fmt;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;

use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::ext::{ResponseExt, ResumeExt};
use crate::splice::SpliceOutcome;

/// A byte stream the tunnel can splice: what handlers return and connectors
/// produce.
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A boxed [`Io`].
pub type BoxIo = Box<dyn Io>;

/// The answer codes of a tunnel request, shared by HBONE (HTTP status) and
/// QUIC (the status field of the response header).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Status {
    /// 200: policy allowed it and the upstream connection is open.
    Ok,
    /// 400: malformed request (bad method, authority, header, or IP mismatch).
    BadRequest,
    /// 401: denied by policy at the destination.
    Denied,
    /// 503: the destination node could not connect to the destination pod.
    Unreachable,
    /// 404: a quiesce or resume for a stream this daemon does not hold
    /// (unknown token, not paused, already resumed).
    NotFound,
    /// 409: a resume whose byte counts do not match (the stream is closed).
    Conflict,
}

impl Status {
    /// The numeric code on the wire.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::Denied => 401,
            Status::Unreachable => 503,
            Status::NotFound => 404,
            Status::Conflict => 409,
        }
    }

    /// Maps a wire code back; unknown codes return `None`.
    pub fn from_code(code: u16) -> Option<Self> {
        match code {
            200 => Some(Status::Ok),
            400 => Some(Status::BadRequest),
            401 => Some(Status::Denied),
            503 => Some(Status::Unreachable),
            404 => Some(Status::NotFound),
            409 => Some(Status::Conflict),
            _ => None,
        }
    }

    /// What a refusal with `code` means, for error messages and logs.
    pub fn meaning(code: u16) -> &'static str {
        match code {
            200 => "ok",
            400 => "malformed tunnel request (bad authority, or the authority IP is not the address the tunnel connection arrived at)",
            401 => "denied by policy at the destination",
            403 => "forbidden at the destination",
            404 => "not found at the destination (no tunnel server there, or, for a resume, no such paused stream)",
            405 => "the peer does not serve tunnel CONNECT requests here",
            409 => "the resumed stream's byte counts do not match (the stream is closed)",
            503 => "destination unreachable (the destination node could not connect to the pod)",
            500..=599 => "server error at the destination",
            _ => "unexpected status from the destination",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code())
    }
}

/// One tunnelled connection as the destination daemon sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectRequest {
    /// The original destination (`:authority` / QUIC authority field).
    pub authority: SocketAddr,
    /// The original source, from `forwarded: for="ip:port"`.
    pub forwarded_for: Option<SocketAddr>,
    /// W3C trace context, passed through.
    pub traceparent: Option<String>,
    /// W3C baggage (source workload metadata), passed through.
    pub baggage: Option<String>,
    /// The TLS peer certificate chain, end-entity first (verified by rustls).
    pub peer_certs: Vec<CertificateDer<'static>>,
    /// The address the tunnel connection arrived at.
    pub local_addr: SocketAddr,
    /// The address of the peer (the source node's daemon).
    pub peer_addr: SocketAddr,
    /// The stream-resume fields (docs/PROTOCOL.md §6).
    pub resume: ResumeExt,
}

/// The optional request metadata the client side sends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectHeaders {
    /// The original source address (sent as `forwarded: for="ip:port"`).
    pub forwarded_for: Option<SocketAddr>,
    /// W3C `traceparent`.
    pub traceparent: Option<String>,
    /// W3C `baggage`.
    pub baggage: Option<String>,
    /// The stream-resume fields (docs/PROTOCOL.md §6).
    pub resume: ResumeExt,
}

/// What a connection pool is keyed by. Streams with equal keys may share a
/// connection.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolKey {
    /// SPIFFE ID of the source workload (selects the client certificate).
    pub src_identity: String,
    /// SPIFFE ID the destination must prove.
    pub dst_identity: String,
    /// Where the tunnel connection goes: the destination pod's `ip:15008`
    /// (HBONE addressing).
    pub dst: SocketAddr,
}

/// Called once when a server-side splice ends, with the byte counts (for
/// access logs and metrics).
pub type OnClose = Box<dyn FnOnce(&SpliceOutcome) + Send>;

/// Takes the tunnel stream of an accepted request (see [`Accepted::attach`]).
pub type Attach = Box<dyn FnOnce(BoxIo) + Send>;

/// What the server does with the tunnel stream once it answered 200.
pub(crate) enum Upstream {
    /// Splice it with this stream.
    Splice(BoxIo),
    /// Give it to the daemon.
    Attach(Attach),
    /// Nothing: the 200 ends the stream (a control request's answer).
    Answer,
}

/// The handler's "yes": the upstream stream to splice the tunnel with (or
/// who takes the tunnel stream), and what the 200 says.
pub struct Accepted {
    pub(crate) upstream: Upstream,
    pub(crate) on_close: Option<OnClose>,
    pub(crate) ext: ResponseExt,
}

impl Accepted {
    /// Accepts with `stream` as the upstream (normally the TCP connection to
    /// the destination pod).
    pub fn new(stream: impl Io) -> Self {
        Self {
            upstream: Upstream::Splice(Box::new(stream)),
            on_close: None,
            ext: ResponseExt::default(),
        }
    }

    /// Accepts and hands the tunnel stream to `take` once the 200 is sent
    /// (the daemon relays it itself: resumable streams). A stream whose 200
    /// cannot be sent is dropped instead.
    pub fn attach(take: impl FnOnce(BoxIo) + Send + 'static) -> Self {
        Self {
            upstream: Upstream::Attach(Box::new(take)),
            on_close: None,
            ext: ResponseExt::default(),
        }
    }

    /// Answers 200 and ends the stream cleanly (the answer to a control
    /// request, such as a QUIESCE, carried in `ext`).
    pub fn answer(ext: ResponseExt) -> Self {
        Self { upstream: Upstream::Answer, on_close: None, ext }
    }

    /// What the 200 says about the resume extension.
    #[must_use]
    pub fn with_ext(mut self, ext: ResponseExt) -> Self {
        self.ext = ext;
        self
    }

    /// Registers a callback run when the splice ends.
    #[must_use]
    pub fn on_close(mut self, f: impl FnOnce(&SpliceOutcome) + Send + 'static) -> Self {
        self.on_close = Some(Box::new(f));
        self
    }
}

impl fmt::Debug for Accepted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Accepted")
            .field("on_close", &self.on_close.is_some())
            .finish_non_exhaustive()
    }
}

/// The handler's "no": the status to answer and a reason (sent to the peer
/// in the QUIC response and as the HBONE response body; keep it short).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    pub status: Status,
    pub reason: String,
}

impl Refusal {
    /// 404: no such paused stream here.
    pub fn not_found(reason: impl Into<String>) -> Self {
        Self { status: Status::NotFound, reason: reason.into() }
    }
    /// 409: the counts of a resume do not match.
    pub fn conflict(reason: impl Into<String>) -> Self {
        Self { status: Status::Conflict, reason: reason.into() }
    }
    /// 401: policy denies it.
    pub fn denied(reason: impl Into<String>) -> Self {
        Self { status: Status::Denied, reason: reason.into() }
    }
    /// 503: could not connect to the destination pod.
    pub fn unreachable(reason: impl Into<String>) -> Self {
        Self { status: Status::Unreachable, reason: reason.into() }
    }
    /// 400: malformed request.
    pub fn malformed(reason: impl Into<String>) -> Self {
        Self { status: Status::BadRequest, reason: reason.into() }
    }
}

/// The boxed future a [`Handler`] returns.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Result<Accepted, Refusal>> + Send>>;

/// The daemon's decision for each tunnelled connection: check policy, open
/// the upstream connection, and return it (→ 200) or refuse (→ 401/503/400).
///
/// Implemented for every `Fn(ConnectRequest) -> impl Future<Output =
/// Result<Accepted, Refusal>>`.
pub trait Handler: Send + Sync + 'static {
    fn connect(&self, req: ConnectRequest) -> HandlerFuture;
}

impl<F, Fut> Handler for F
where
    F: Fn(ConnectRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Accepted, Refusal>> + Send + 'static,
{
    fn connect(&self, req: ConnectRequest) -> HandlerFuture {
        Box::pin(self(req))
    }
}

// ---- pure request rules, shared by both transports ----

/// Parses an `ip:port` authority (IPv6 in brackets). Host names are refused:
/// the tunnel carries addresses, not names.
pub(crate) fn parse_authority(s: &str) -> Result<SocketAddr, Refusal> {
    s.parse::<SocketAddr>()
        .map_err(|_| Refusal::malformed(format!("authority {s:?} is not an ip:port")))
}

/// ztunnel's rule: the authority IP must be the address the tunnel connection
/// arrived at (the destination pod's IP). IPv4-mapped IPv6 is compared as
/// IPv4.
pub(crate) fn check_arrival(authority: SocketAddr, local: SocketAddr) -> Result<(), Refusal> {
    let a = authority.ip().to_canonical();
    let l = local.ip().to_canonical();
    if a == l {
        Ok(())
    } else {
        Err(Refusal::malformed(format!(
            "ip mismatch: authority {authority} but the tunnel connection arrived at {l}"
        )))
    }
}

/// Parses the `for=` element of a `forwarded` header (RFC 7239), e.g.
/// `for="10.0.0.1:3456"` or `for="[fd00::1]:3456"`. Other elements and
/// parameters are ignored; a missing or unparsable `for` yields `None`.
pub(crate) fn parse_forwarded_for(value: &str) -> Option<SocketAddr> {
    // Only the first element (closest to the originator) is meaningful here.
    let first = value.split(',').next()?;
    for pair in first.split(';') {
        let (name, val) = pair.trim().split_once('=')?;
        if name.trim().eq_ignore_ascii_case("for") {
            let v = val.trim().trim_matches('"');
            return v.parse::<SocketAddr>().ok();
        }
    }
    None
}

/// Formats the `forwarded` header value for `addr`.
pub(crate) fn format_forwarded_for(addr: SocketAddr) -> String {
    // SocketAddr's Display already brackets IPv6 addresses.
    format!("for=\"{addr}\"")
}

/// Whether `ip` is one the tunnel may be asked to reach (not unspecified or
/// multicast); used before calling the handler.
pub(crate) fn routable(ip: IpAddr) -> bool {
    !(ip.is_unspecified() || ip.is_multicast())
}

/// Validates a parsed request's authority (shared tail of both transports).
pub(crate) fn validate_authority(
    authority: &str,
    local: SocketAddr,
    check_ip: bool,
) -> Result<SocketAddr, Refusal> {
    let addr = parse_authority(authority)?;
    if !routable(addr.ip()) || addr.port() == 0 {
        return Err(Refusal::malformed(format!("authority {addr} is not a reachable address")));
    }
    if check_ip {
        check_arrival(addr, local)?;
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn authority_parsing() {
        assert_eq!(parse_authority("10.1.2.3:80").unwrap(), sa("10.1.2.3:80"));
        assert_eq!(parse_authority("[fd00::1]:443").unwrap(), sa("[fd00::1]:443"));
        for bad in ["foo", "foo:80", "10.1.2.3", "10.1.2.3:99999", "", "fd00::1:80"] {
            let r = parse_authority(bad).unwrap_err();
            assert_eq!(r.status, Status::BadRequest, "{bad}");
        }
    }

    #[test]
    fn arrival_check() {
        assert!(check_arrival(sa("10.0.0.5:8080"), sa("10.0.0.5:15008")).is_ok());
        assert!(check_arrival(sa("10.0.0.5:8080"), sa("[::ffff:10.0.0.5]:15008")).is_ok());
        let r = check_arrival(sa("10.0.0.6:8080"), sa("10.0.0.5:15008")).unwrap_err();
        assert_eq!(r.status, Status::BadRequest);
        assert!(r.reason.contains("ip mismatch"), "{}", r.reason);
    }

    #[test]
    fn validate_rules() {
        let local = sa("10.0.0.5:15008");
        assert!(validate_authority("10.0.0.5:80", local, true).is_ok());
        assert!(validate_authority("10.0.0.9:80", local, true).is_err());
        assert!(validate_authority("10.0.0.9:80", local, false).is_ok());
        assert!(validate_authority("0.0.0.0:80", local, false).is_err());
        assert!(validate_authority("10.0.0.5:0", local, false).is_err());
    }

    #[test]
    fn forwarded_header() {
        assert_eq!(parse_forwarded_for("for=\"10.0.0.1:3456\""), Some(sa("10.0.0.1:3456")));
        assert_eq!(parse_forwarded_for("for=\"[fd00::1]:3456\""), Some(sa("[fd00::1]:3456")));
        assert_eq!(
            parse_forwarded_for("proto=http; For=\"10.0.0.1:1\", for=\"10.0.0.2:2\""),
            Some(sa("10.0.0.1:1"))
        );
        assert_eq!(parse_forwarded_for("for=10.0.0.1:7"), Some(sa("10.0.0.1:7")));
        assert_eq!(parse_forwarded_for("for=unknown"), None);
        assert_eq!(parse_forwarded_for("by=\"10.0.0.1:1\""), None);
        for a in ["10.0.0.1:3456", "[fd00::1]:3456"] {
            assert_eq!(parse_forwarded_for(&format_forwarded_for(sa(a))), Some(sa(a)));
        }
        assert_eq!(format_forwarded_for(sa("[fd00::1]:1")), "for=\"[fd00::1]:1\"");
    }

    #[test]
    fn status_codes() {
        for s in [
            Status::Ok,
            Status::BadRequest,
            Status::Denied,
            Status::Unreachable,
            Status::NotFound,
            Status::Conflict,
        ] {
            assert_eq!(Status::from_code(s.code()), Some(s));
        }
        assert_eq!(Status::meaning(401), "denied by policy at the destination");
        assert!(Status::meaning(503).starts_with("destination unreachable"));
    }
}
