//! The stream-resume extension's request and response fields
//! (docs/PROTOCOL.md §6), pure: what a request carries ([`ResumeExt`]),
//! what a 200 says ([`ResponseExt`]), and their encodings as HBONE headers
//! and QUIC header fields / reasons. Peers without the extension send none
//! of it and ignore it, so interop with plain HBONE is unchanged.

/// The extension fields of one tunnel request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum ResumeExt {
    /// A plain request.
    #[default]
    None,
    /// A new stream the client may later resume under `token`.
    Offer {
        /// The stream's name between the two daemons.
        token: String,
    },
    /// QUIESCE: the sender stopped reading its app after sending `sent`.
    Quiesce {
        /// The stream.
        token: String,
        /// Bytes the sender wrote into the stream, in all.
        sent: u64,
    },
    /// RESUME the paused stream `token` on the stream this request opens.
    Resume {
        /// The stream.
        token: String,
        /// Bytes the sender wrote into the stream, in all.
        sent: u64,
        /// Bytes the sender read from the stream, in all.
        received: u64,
    },
}

/// What a 200 says about the extension.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ResponseExt {
    /// The server keeps the offered token: the stream is resumable.
    pub resumable: bool,
    /// The answer to a QUIESCE: what the answering side sent in all.
    pub quiesce_sent: Option<u64>,
}

/// One extension field of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Field {
    ResumeToken,
    QuiesceToken,
    QuiesceSent,
    ResumeSent,
    ResumeReceived,
}

impl Field {
    pub(crate) const ALL: [Field; 5] = [
        Field::ResumeToken,
        Field::QuiesceToken,
        Field::QuiesceSent,
        Field::ResumeSent,
        Field::ResumeReceived,
    ];

    /// Its HBONE header.
    pub(crate) fn header(self) -> &'static str {
        match self {
            Field::ResumeToken => "tlsmesh-resume-token",
            Field::QuiesceToken => "tlsmesh-quiesce-token",
            Field::QuiesceSent => "tlsmesh-quiesce-sent",
            Field::ResumeSent => "tlsmesh-resume-sent",
            Field::ResumeReceived => "tlsmesh-resume-received",
        }
    }

    /// Its QUIC header field type.
    pub(crate) fn quic_type(self) -> u8 {
        match self {
            Field::ResumeToken => 0x05,
            Field::QuiesceToken => 0x06,
            Field::QuiesceSent => 0x07,
            Field::ResumeSent => 0x08,
            Field::ResumeReceived => 0x09,
        }
    }

    pub(crate) fn from_quic_type(t: u8) -> Option<Self> {
        Field::ALL.into_iter().find(|f| f.quic_type() == t)
    }
}

/// The HBONE response header that confirms an offered token.
pub(crate) const HEADER_RESUMABLE: &str = "tlsmesh-resume";
/// The HBONE response header that answers a QUIESCE.
pub(crate) const HEADER_QUIESCE_SENT: &str = "tlsmesh-quiesce-sent";
/// The QUIC 200 reason that confirms an offered token.
const REASON_RESUMABLE: &str = "resume";

/// Length of a token: 32 bytes, base64url without padding.
pub const TOKEN_LEN: usize = 43;

/// Whether `t` looks like a token (43 base64url characters).
pub fn valid_token(t: &str) -> bool {
    t.len() == TOKEN_LEN && t.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl ResumeExt {
    /// The fields it is sent as.
    pub(crate) fn fields(&self) -> Vec<(Field, String)> {
        match self {
            ResumeExt::None => vec![],
            ResumeExt::Offer { token } => vec![(Field::ResumeToken, token.clone())],
            ResumeExt::Quiesce { token, sent } => {
                vec![(Field::QuiesceToken, token.clone()), (Field::QuiesceSent, sent.to_string())]
            }
            ResumeExt::Resume { token, sent, received } => vec![
                (Field::ResumeToken, token.clone()),
                (Field::ResumeSent, sent.to_string()),
                (Field::ResumeReceived, received.to_string()),
            ],
        }
    }

    /// Reads the fields back; a combination that is none of the requests,
    /// a bad token or a bad count is a malformed request (`Err` says why).
    pub(crate) fn parse(get: impl Fn(Field) -> Option<String>) -> Result<Self, String> {
        let [rt, qt, qs, rs, rr] = Field::ALL.map(&get);
        let token = |t: String| {
            if valid_token(&t) {
                Ok(t)
            } else {
                Err("resume token is not 43 base64url characters".to_owned())
            }
        };
        let count = |f: Field, v: String| {
            v.parse::<u64>().map_err(|_| format!("{} is not a byte count", f.header()))
        };
        match (rt, qt, qs, rs, rr) {
            (None, None, None, None, None) => Ok(ResumeExt::None),
            (Some(t), None, None, None, None) => Ok(ResumeExt::Offer { token: token(t)? }),
            (None, Some(t), Some(s), None, None) => {
                Ok(ResumeExt::Quiesce { token: token(t)?, sent: count(Field::QuiesceSent, s)? })
            }
            (Some(t), None, None, Some(s), Some(r)) => Ok(ResumeExt::Resume {
                token: token(t)?,
                sent: count(Field::ResumeSent, s)?,
                received: count(Field::ResumeReceived, r)?,
            }),
            _ => Err("an incomplete or mixed set of tlsmesh-resume fields".to_owned()),
        }
    }
}

impl ResponseExt {
    /// As a QUIC 200 reason.
    pub(crate) fn to_reason(self) -> String {
        match (self.quiesce_sent, self.resumable) {
            (Some(n), _) => n.to_string(),
            (None, true) => REASON_RESUMABLE.to_owned(),
            (None, false) => String::new(),
        }
    }

    /// From a QUIC 200 reason (anything else means nothing).
    pub(crate) fn from_reason(reason: &str) -> Self {
        Self { resumable: reason == REASON_RESUMABLE, quiesce_sent: reason.parse().ok() }
    }

    /// As HBONE response headers.
    pub(crate) fn headers(self) -> Vec<(&'static str, String)> {
        let mut h = Vec::new();
        if self.resumable {
            h.push((HEADER_RESUMABLE, "1".to_owned()));
        }
        if let Some(n) = self.quiesce_sent {
            h.push((HEADER_QUIESCE_SENT, n.to_string()));
        }
        h
    }

    /// From HBONE response headers.
    pub(crate) fn from_headers(h: &http::HeaderMap) -> Self {
        let get = |n: &str| h.get(n).and_then(|v| v.to_str().ok());
        Self {
            resumable: get(HEADER_RESUMABLE) == Some("1"),
            quiesce_sent: get(HEADER_QUIESCE_SENT).and_then(|v| v.parse().ok()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const T: &str = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNO-_";

    fn roundtrip(e: &ResumeExt) -> Result<ResumeExt, String> {
        let m: HashMap<&str, String> =
            e.fields().into_iter().map(|(f, v)| (f.header(), v)).collect();
        ResumeExt::parse(|f| m.get(f.header()).cloned())
    }

    #[test]
    fn every_request_reads_back_as_sent() {
        assert_eq!(T.len(), TOKEN_LEN);
        for e in [
            ResumeExt::None,
            ResumeExt::Offer { token: T.into() },
            ResumeExt::Quiesce { token: T.into(), sent: 7 },
            ResumeExt::Resume { token: T.into(), sent: u64::MAX, received: 0 },
        ] {
            assert_eq!(roundtrip(&e).unwrap(), e);
        }
        for (f, t) in Field::ALL.iter().map(|f| (f, f.quic_type())) {
            assert_eq!(Field::from_quic_type(t), Some(*f));
        }
    }

    #[test]
    fn mixed_or_bad_fields_are_malformed() {
        let bad = |pairs: &[(Field, &str)]| {
            let m: HashMap<&str, String> =
                pairs.iter().map(|(f, v)| (f.header(), (*v).to_owned())).collect();
            ResumeExt::parse(|f| m.get(f.header()).cloned()).unwrap_err()
        };
        assert!(bad(&[(Field::ResumeToken, "short")]).contains("43"));
        assert!(bad(&[(Field::QuiesceToken, T)]).contains("incomplete"));
        assert!(bad(&[(Field::QuiesceToken, T), (Field::QuiesceSent, "x")]).contains("count"));
        assert!(bad(&[(Field::ResumeToken, T), (Field::ResumeSent, "1")]).contains("incomplete"));
        assert!(bad(&[
            (Field::ResumeToken, T),
            (Field::QuiesceToken, T),
            (Field::QuiesceSent, "1")
        ])
        .contains("mixed"));
    }

    #[test]
    fn responses_read_back() {
        for r in [
            ResponseExt::default(),
            ResponseExt { resumable: true, quiesce_sent: None },
            ResponseExt { resumable: false, quiesce_sent: Some(12) },
        ] {
            assert_eq!(ResponseExt::from_reason(&r.to_reason()), r);
            let mut h = http::HeaderMap::new();
            for (n, v) in r.headers() {
                h.insert(n, v.parse().unwrap());
            }
            assert_eq!(ResponseExt::from_headers(&h), r);
        }
        assert_eq!(ResponseExt::from_reason("connection refused"), ResponseExt::default());
    }
}
