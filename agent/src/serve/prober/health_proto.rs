//! The two messages of `grpc.health.v1.Health/Check`, encoded by hand, and gRPC's message framing.
//!
//! The health protocol is frozen and tiny: `HealthCheckRequest { string service = 1; }` and
//! `HealthCheckResponse { ServingStatus status = 1; }`. A protobuf code generator and a gRPC
//! framework (prost, tonic and tower) would be most of the agent's dependency tree for the few
//! lines below; hand encoding keeps the tree lean, and the tests pin the bytes.

/// `HealthCheckResponse.ServingStatus`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServingStatus {
    Unknown,
    Serving,
    NotServing,
    /// Sent only by the streaming `Watch`, but a server may answer `Check` with it too.
    ServiceUnknown,
    /// A value the protocol does not define.
    Other(u64),
}

impl ServingStatus {
    fn from_number(number: u64) -> Self {
        match number {
            0 => Self::Unknown,
            1 => Self::Serving,
            2 => Self::NotServing,
            3 => Self::ServiceUnknown,
            other => Self::Other(other),
        }
    }
}

impl std::fmt::Display for ServingStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Unknown => f.write_str("UNKNOWN"),
            Self::Serving => f.write_str("SERVING"),
            Self::NotServing => f.write_str("NOT_SERVING"),
            Self::ServiceUnknown => f.write_str("SERVICE_UNKNOWN"),
            Self::Other(number) => write!(f, "status {number}"),
        }
    }
}

/// Why a response could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("the response has no message")]
    NoMessage,
    #[error("the response message is cut short")]
    Truncated,
    #[error("the response message is compressed, which the request did not allow")]
    Compressed,
    #[error("the response carries {0} bytes after its message")]
    TrailingBytes(usize),
    #[error("the response message is not a HealthCheckResponse: {0}")]
    Malformed(&'static str),
}

/// Protobuf wire types.
const VARINT: u64 = 0;
const FIXED64: u64 = 1;
const LENGTH_DELIMITED: u64 = 2;
const FIXED32: u64 = 5;

/// The framed request body: gRPC's 5-byte prefix (not compressed, length), then the message. The
/// service field is left out when empty, as proto3 leaves out default values.
pub fn encode_request(service: &str) -> Vec<u8> {
    let mut message = Vec::new();
    if !service.is_empty() {
        put_varint(&mut message, (1 << 3) | LENGTH_DELIMITED);
        put_varint(&mut message, service.len() as u64);
        message.extend_from_slice(service.as_bytes());
    }
    let mut framed = Vec::with_capacity(5 + message.len());
    framed.push(0);
    // A service name longer than 4 GiB cannot reach here: it came in an HTTP header.
    framed.extend_from_slice(
        &u32::try_from(message.len())
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    framed.extend_from_slice(&message);
    framed
}

/// Reads the one framed `HealthCheckResponse` of a response body. Fields other than `status` are
/// skipped, as protobuf readers do, so a newer server's additions do not break the probe.
pub fn decode_response(body: &[u8]) -> Result<ServingStatus, DecodeError> {
    let Some((&compressed, rest)) = body.split_first() else {
        return Err(DecodeError::NoMessage);
    };
    if compressed != 0 {
        return Err(DecodeError::Compressed);
    }
    let (length, rest) = rest
        .split_first_chunk::<4>()
        .ok_or(DecodeError::Truncated)?;
    let length =
        usize::try_from(u32::from_be_bytes(*length)).map_err(|_| DecodeError::Truncated)?;
    if rest.len() < length {
        return Err(DecodeError::Truncated);
    }
    let (mut message, trailing) = rest.split_at(length);
    if !trailing.is_empty() {
        return Err(DecodeError::TrailingBytes(trailing.len()));
    }
    let mut status = 0;
    while !message.is_empty() {
        let key = take_varint(&mut message)?;
        match (key >> 3, key & 7) {
            (1, VARINT) => status = take_varint(&mut message)?,
            (1, _) => return Err(DecodeError::Malformed("status is not a varint")),
            (_, VARINT) => {
                take_varint(&mut message)?;
            }
            (_, FIXED64) => skip(&mut message, 8)?,
            (_, LENGTH_DELIMITED) => {
                let length = take_varint(&mut message)?;
                skip(
                    &mut message,
                    usize::try_from(length).map_err(|_| DecodeError::Truncated)?,
                )?;
            }
            (_, FIXED32) => skip(&mut message, 4)?,
            _ => return Err(DecodeError::Malformed("unknown wire type")),
        }
    }
    Ok(ServingStatus::from_number(status))
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn take_varint(input: &mut &[u8]) -> Result<u64, DecodeError> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = input.split_first().ok_or(DecodeError::Truncated)?;
        *input = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(DecodeError::Malformed("varint longer than 10 bytes"))
}

fn skip(input: &mut &[u8], count: usize) -> Result<(), DecodeError> {
    *input = input.get(count..).ok_or(DecodeError::Truncated)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(message: &[u8]) -> Vec<u8> {
        let mut out = vec![0];
        out.extend_from_slice(&(message.len() as u32).to_be_bytes());
        out.extend_from_slice(message);
        out
    }

    #[test]
    fn request_encodes_the_service_as_field_one_and_leaves_an_empty_one_out() {
        assert_eq!(encode_request(""), vec![0, 0, 0, 0, 0]);
        assert_eq!(
            encode_request("ready"),
            framed(&[0x0a, 5, b'r', b'e', b'a', b'd', b'y'])
        );
        // A length past 127 takes a two-byte varint.
        let long = "s".repeat(200);
        let encoded = encode_request(&long);
        assert_eq!(&encoded[..8], &[0, 0, 0, 0, 203, 0x0a, 0xc8, 0x01]);
        assert_eq!(encoded.len(), 5 + 3 + 200);
    }

    #[test]
    fn response_status_is_read_and_a_missing_one_is_unknown() {
        assert_eq!(
            decode_response(&framed(&[0x08, 1])),
            Ok(ServingStatus::Serving)
        );
        assert_eq!(
            decode_response(&framed(&[0x08, 2])),
            Ok(ServingStatus::NotServing)
        );
        assert_eq!(
            decode_response(&framed(&[0x08, 3])),
            Ok(ServingStatus::ServiceUnknown)
        );
        // proto3 leaves out a field at its default: UNKNOWN is an empty message.
        assert_eq!(decode_response(&framed(&[])), Ok(ServingStatus::Unknown));
        assert_eq!(
            decode_response(&framed(&[0x08, 0x96, 0x01])),
            Ok(ServingStatus::Other(150))
        );
    }

    #[test]
    fn unknown_fields_are_skipped() {
        // field 2 varint, field 3 bytes, field 4 fixed32, field 5 fixed64, then status SERVING.
        let message = [
            0x10, 0xff, 0x01, 0x1a, 2, b'h', b'i', 0x25, 1, 2, 3, 4, 0x29, 1, 2, 3, 4, 5, 6, 7, 8,
            0x08, 1,
        ];
        assert_eq!(
            decode_response(&framed(&message)),
            Ok(ServingStatus::Serving)
        );
    }

    #[test]
    fn short_compressed_or_malformed_responses_are_errors() {
        assert_eq!(decode_response(&[]), Err(DecodeError::NoMessage));
        assert_eq!(decode_response(&[0, 0, 0]), Err(DecodeError::Truncated));
        assert_eq!(
            decode_response(&[0, 0, 0, 0, 3, 0x08]),
            Err(DecodeError::Truncated)
        );
        assert_eq!(
            decode_response(&[1, 0, 0, 0, 2, 0x08, 1]),
            Err(DecodeError::Compressed)
        );
        let mut two = framed(&[0x08, 1]);
        two.extend_from_slice(&framed(&[0x08, 2]));
        assert_eq!(decode_response(&two), Err(DecodeError::TrailingBytes(7)));
        assert!(matches!(
            decode_response(&framed(&[0x0a, 1, 1])),
            Err(DecodeError::Malformed(_))
        ));
        assert_eq!(
            decode_response(&framed(&[0x08, 0x80])),
            Err(DecodeError::Truncated)
        );
        assert!(matches!(
            decode_response(&framed(&[0x0b])),
            Err(DecodeError::Malformed(_))
        ));
    }
}
