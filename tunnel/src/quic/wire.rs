//! The QUIC tunnel header (sans-IO): the request that opens each
//! bidirectional stream and the status reply. Byte layout in
//! docs/PROTOCOL.md, "QUIC transport".

use std::net::SocketAddr;

use crate::ext::Field;
use crate::handler::{format_forwarded_for, parse_forwarded_for, ConnectHeaders};

/// "TMQ" + version 1.
pub const MAGIC: [u8; 3] = *b"TMQ";
pub const VERSION: u8 = 1;
/// Fixed part of the request: magic, version, fields length.
pub const REQUEST_PREFIX_LEN: usize = 6;
/// Largest fields block a receiver must accept.
pub const MAX_FIELDS_LEN: usize = 16 * 1024;
/// Fixed part of the response: status, reason length.
pub const RESPONSE_PREFIX_LEN: usize = 4;
/// Longest reason a sender may send.
pub const MAX_REASON_LEN: usize = 1024;

pub const FIELD_AUTHORITY: u8 = 0x01;
pub const FIELD_FORWARDED: u8 = 0x02;
pub const FIELD_TRACEPARENT: u8 = 0x03;
pub const FIELD_BAGGAGE: u8 = 0x04;

/// QUIC application error code for a stream aborted by the tunnel
/// (`RESET_STREAM` / `STOP_SENDING`), like HTTP/2 `CANCEL`.
pub const STREAM_CANCEL: u32 = 0x08;
/// Connection close code for a normal close (idle, shutdown).
pub const CLOSE_NO_ERROR: u32 = 0x00;

/// A wire format violation.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("not a tlsmesh QUIC tunnel header (bad magic)")]
    BadMagic,
    #[error("unsupported tunnel header version {0}")]
    Version(u8),
    #[error("tunnel header fields too long ({0} bytes, max {MAX_FIELDS_LEN})")]
    TooLong(usize),
    #[error("tunnel header field truncated")]
    Truncated,
    #[error("tunnel header field {0:#04x} repeated")]
    Duplicate(u8),
    #[error("tunnel header field {0:#04x} is not UTF-8")]
    NotUtf8(u8),
    #[error("tunnel header has no authority field")]
    NoAuthority,
}

/// A decoded request header. The authority stays text so both transports
/// validate it with the same rules.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RequestHeader {
    pub authority: String,
    pub forwarded: Option<String>,
    pub traceparent: Option<String>,
    pub baggage: Option<String>,
    /// The stream-resume fields (types 0x05–0x09).
    pub(crate) ext: Vec<(Field, String)>,
}

impl RequestHeader {
    /// The header a client sends.
    pub fn new(authority: SocketAddr, headers: &ConnectHeaders) -> Self {
        Self {
            authority: authority.to_string(),
            forwarded: headers.forwarded_for.map(format_forwarded_for),
            traceparent: headers.traceparent.clone(),
            baggage: headers.baggage.clone(),
            ext: headers.resume.fields(),
        }
    }

    /// `forwarded_for` as the handler sees it.
    pub fn forwarded_for(&self) -> Option<SocketAddr> {
        self.forwarded.as_deref().and_then(parse_forwarded_for)
    }

    /// Encodes the whole request header.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut fields = Vec::with_capacity(64);
        put_field(&mut fields, FIELD_AUTHORITY, &self.authority)?;
        for (t, v) in [
            (FIELD_FORWARDED, &self.forwarded),
            (FIELD_TRACEPARENT, &self.traceparent),
            (FIELD_BAGGAGE, &self.baggage),
        ] {
            if let Some(v) = v {
                put_field(&mut fields, t, v)?;
            }
        }
        for (f, v) in &self.ext {
            put_field(&mut fields, f.quic_type(), v)?;
        }
        if fields.len() > MAX_FIELDS_LEN {
            return Err(WireError::TooLong(fields.len()));
        }
        let mut out = Vec::with_capacity(REQUEST_PREFIX_LEN + fields.len());
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&u16::try_from(fields.len()).expect("bounded above").to_be_bytes());
        out.extend_from_slice(&fields);
        Ok(out)
    }

    /// Decodes the fixed prefix; returns the length of the fields block that
    /// follows.
    pub fn decode_prefix(prefix: &[u8; REQUEST_PREFIX_LEN]) -> Result<usize, WireError> {
        if prefix[..3] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if prefix[3] != VERSION {
            return Err(WireError::Version(prefix[3]));
        }
        let len = usize::from(u16::from_be_bytes([prefix[4], prefix[5]]));
        if len > MAX_FIELDS_LEN {
            return Err(WireError::TooLong(len));
        }
        Ok(len)
    }

    /// Decodes the fields block. Unknown field types are skipped.
    pub fn decode_fields(mut buf: &[u8]) -> Result<Self, WireError> {
        let mut h = RequestHeader::default();
        let mut authority = None;
        while !buf.is_empty() {
            if buf.len() < 3 {
                return Err(WireError::Truncated);
            }
            let t = buf[0];
            let len = usize::from(u16::from_be_bytes([buf[1], buf[2]]));
            let value = buf.get(3..3 + len).ok_or(WireError::Truncated)?;
            buf = &buf[3 + len..];
            let slot = match t {
                FIELD_AUTHORITY => &mut authority,
                FIELD_FORWARDED => &mut h.forwarded,
                FIELD_TRACEPARENT => &mut h.traceparent,
                FIELD_BAGGAGE => &mut h.baggage,
                _ => {
                    if let Some(f) = Field::from_quic_type(t) {
                        if h.ext.iter().any(|(g, _)| *g == f) {
                            return Err(WireError::Duplicate(t));
                        }
                        let s = std::str::from_utf8(value).map_err(|_| WireError::NotUtf8(t))?;
                        h.ext.push((f, s.to_owned()));
                    }
                    continue;
                }
            };
            if slot.is_some() {
                return Err(WireError::Duplicate(t));
            }
            let s = std::str::from_utf8(value).map_err(|_| WireError::NotUtf8(t))?;
            *slot = Some(s.to_owned());
        }
        h.authority = authority.ok_or(WireError::NoAuthority)?;
        Ok(h)
    }
}

fn put_field(out: &mut Vec<u8>, t: u8, v: &str) -> Result<(), WireError> {
    let len = u16::try_from(v.len()).map_err(|_| WireError::TooLong(v.len()))?;
    out.push(t);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(v.as_bytes());
    Ok(())
}

/// Encodes a status reply; the reason is cut to [`MAX_REASON_LEN`] bytes at
/// a character boundary.
pub fn encode_response(status: u16, reason: &str) -> Vec<u8> {
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = &reason.as_bytes()[..end];
    let mut out = Vec::with_capacity(RESPONSE_PREFIX_LEN + reason.len());
    out.extend_from_slice(&status.to_be_bytes());
    out.extend_from_slice(&u16::try_from(reason.len()).expect("bounded above").to_be_bytes());
    out.extend_from_slice(reason);
    out
}

/// Decodes the fixed part of a reply: (status, reason length).
pub fn decode_response_prefix(p: &[u8; RESPONSE_PREFIX_LEN]) -> Result<(u16, usize), WireError> {
    let status = u16::from_be_bytes([p[0], p[1]]);
    let len = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if len > MAX_REASON_LEN {
        return Err(WireError::TooLong(len));
    }
    Ok((status, len))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layout_is_as_documented() {
        let h = RequestHeader {
            authority: "10.0.0.2:80".into(),
            forwarded: None,
            traceparent: Some("tp".into()),
            baggage: None,
            ext: vec![],
        };
        let b = h.encode().unwrap();
        let mut want = b"TMQ\x01".to_vec();
        let fields_len = (3 + 11) + (3 + 2);
        want.extend_from_slice(&u16::try_from(fields_len).unwrap().to_be_bytes());
        want.extend_from_slice(&[0x01, 0x00, 11]);
        want.extend_from_slice(b"10.0.0.2:80");
        want.extend_from_slice(&[0x03, 0x00, 2]);
        want.extend_from_slice(b"tp");
        assert_eq!(b, want);
    }

    /// The example in docs/PROTOCOL.md §3.3 and §3.4, byte for byte.
    #[test]
    fn protocol_md_examples() {
        let headers = ConnectHeaders {
            forwarded_for: Some("10.244.0.7:51234".parse().unwrap()),
            ..ConnectHeaders::default()
        };
        let b = RequestHeader::new("10.244.1.5:8080".parse().unwrap(), &headers).encode().unwrap();
        let hex: Vec<String> = b.iter().map(|x| format!("{x:02x}")).collect();
        assert_eq!(
            hex.join(" "),
            "54 4d 51 01 00 2b 01 00 0f 31 30 2e 32 34 34 2e \
             31 2e 35 3a 38 30 38 30 02 00 16 66 6f 72 3d 22 \
             31 30 2e 32 34 34 2e 30 2e 37 3a 35 31 32 33 34 \
             22"
        );
        assert_eq!(encode_response(401, "denied"), b"\x01\x91\x00\x06denied");
    }

    #[test]
    fn request_round_trip() {
        let headers = ConnectHeaders {
            forwarded_for: Some("[fd00::7]:999".parse().unwrap()),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            baggage: Some("k8s.namespace.name=a".into()),
            resume: crate::ext::ResumeExt::Resume {
                token: "A".repeat(crate::ext::TOKEN_LEN),
                sent: 5,
                received: 6,
            },
        };
        let h = RequestHeader::new("[fd00::1]:8080".parse().unwrap(), &headers);
        let b = h.encode().unwrap();
        let len = RequestHeader::decode_prefix(b[..6].try_into().unwrap()).unwrap();
        assert_eq!(len, b.len() - 6);
        let d = RequestHeader::decode_fields(&b[6..]).unwrap();
        assert_eq!(d, h);
        assert_eq!(d.forwarded_for(), headers.forwarded_for);
    }

    #[test]
    fn request_errors() {
        assert_eq!(RequestHeader::decode_prefix(b"XMQ\x01\0\0"), Err(WireError::BadMagic));
        assert_eq!(RequestHeader::decode_prefix(b"TMQ\x02\0\0"), Err(WireError::Version(2)));
        assert_eq!(
            RequestHeader::decode_prefix(b"TMQ\x01\xff\xff"),
            Err(WireError::TooLong(65535))
        );
        assert_eq!(RequestHeader::decode_fields(&[]), Err(WireError::NoAuthority));
        assert_eq!(RequestHeader::decode_fields(&[1, 0]), Err(WireError::Truncated));
        assert_eq!(RequestHeader::decode_fields(&[1, 0, 5, b'a']), Err(WireError::Truncated));
        assert_eq!(
            RequestHeader::decode_fields(&[1, 0, 1, b'a', 1, 0, 1, b'b']),
            Err(WireError::Duplicate(1))
        );
        assert_eq!(RequestHeader::decode_fields(&[1, 0, 1, 0xff]), Err(WireError::NotUtf8(1)));
        // Unknown fields are skipped.
        let d = RequestHeader::decode_fields(&[0x7f, 0, 2, 9, 9, 1, 0, 1, b'a']).unwrap();
        assert_eq!(d.authority, "a");
    }

    #[test]
    fn response_round_trip() {
        let b = encode_response(401, "denied");
        assert_eq!(&b[..4], &[0x01, 0x91, 0x00, 0x06]);
        let (s, l) = decode_response_prefix(b[..4].try_into().unwrap()).unwrap();
        assert_eq!((s, l), (401, 6));
        assert_eq!(&b[4..], b"denied");
        let long = "é".repeat(1000);
        let b = encode_response(400, &long);
        assert!(b.len() - 4 <= MAX_REASON_LEN);
        assert!(std::str::from_utf8(&b[4..]).is_ok());
    }
}
