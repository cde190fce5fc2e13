//! The HTTP/1.1 the healthcheck speaks: one bounded request in, one response out, then close.
//!
//! A probe connection carries exactly one small GET with no body, and every malformed, oversized or
//! slow request must get a precise answer (400, or a close after the header timeout) rather than a
//! general-purpose server's defaults (431, keep-alive, pipelining). So the request head is read into a
//! fixed buffer and parsed with httparse, the parser hyper itself uses.

use std::{io, time::Duration};

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};

/// Largest request head accepted. A kubelet probe is a few hundred bytes.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;

/// Most headers accepted in one request.
const MAX_HEADERS: usize = 64;

/// The parts of a request the healthcheck looks at.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    /// The request target without its query string.
    pub path: String,
    /// The headers [`read_request`] was asked to collect, each under the name it was asked by,
    /// in the order they came.
    pub headers: Vec<(&'static str, Vec<u8>)>,
}

impl Request {
    /// Every value of the collected header `name`, in order.
    pub fn values(&self, name: &str) -> Vec<&[u8]> {
        self.headers
            .iter()
            .filter(|(collected, _)| *collected == name)
            .map(|(_, value)| value.as_slice())
            .collect()
    }
}

/// Why no request could be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no complete request head within {0:?}")]
    Timeout(Duration),
    #[error("connection closed before a complete request head")]
    Closed,
    #[error("request head larger than {MAX_REQUEST_HEAD} bytes")]
    TooLarge,
    #[error("malformed request: {0}")]
    Malformed(String),
    #[error("reading the request: {0}")]
    Io(#[from] io::Error),
}

/// Reads one request head within `timeout`, collecting the values of the headers `names`
/// (case-insensitive). A body, if any, is left unread: the healthcheck never needs it.
pub async fn read_request<R: AsyncRead + Unpin>(
    stream: &mut R,
    names: &[&'static str],
    timeout: Duration,
) -> Result<Request, ReadError> {
    tokio::time::timeout(timeout, read_head(stream, names))
        .await
        .map_err(|_| ReadError::Timeout(timeout))?
}

async fn read_head<R: AsyncRead + Unpin>(
    stream: &mut R,
    names: &[&'static str],
) -> Result<Request, ReadError> {
    let mut buf = vec![0u8; MAX_REQUEST_HEAD];
    let mut filled = 0;
    loop {
        if filled == buf.len() {
            return Err(ReadError::TooLarge);
        }
        let n = stream.read(&mut buf[filled..]).await?;
        if n == 0 {
            return Err(ReadError::Closed);
        }
        filled += n;
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut request = httparse::Request::new(&mut headers);
        match request.parse(&buf[..filled]) {
            Ok(httparse::Status::Partial) => continue,
            Ok(httparse::Status::Complete(_)) => return Ok(collect(&request, names)),
            Err(error) => return Err(ReadError::Malformed(error.to_string())),
        }
    }
}

fn collect(request: &httparse::Request<'_, '_>, names: &[&'static str]) -> Request {
    let target = request.path.unwrap_or_default();
    let path = target.split_once('?').map_or(target, |(path, _)| path);
    Request {
        method: request.method.unwrap_or_default().to_owned(),
        path: path.to_owned(),
        headers: request
            .headers
            .iter()
            .filter_map(|header| {
                let name = names
                    .iter()
                    .find(|name| header.name.eq_ignore_ascii_case(name))?;
                Some((*name, header.value.to_vec()))
            })
            .collect(),
    }
}

/// A complete response: status and a plain-text body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: String,
}

impl Response {
    pub fn new(status: u16, body: impl Into<String>) -> Self {
        Self {
            status,
            body: body.into(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    hyper::StatusCode::from_u16(status)
        .ok()
        .and_then(|status| status.canonical_reason())
        .unwrap_or_default()
}

/// Writes `response`. `head_only` answers a HEAD request: same headers, no body. The response says
/// `Connection: close` and carries its length, so the prober can close as soon as it has read it;
/// the kubelet never reuses probe connections. A 204 or 304 (an app's status passed through) has
/// neither body nor length, as HTTP wants.
pub async fn write_response<W: AsyncWrite + Unpin>(
    stream: &mut W,
    response: &Response,
    head_only: bool,
) -> io::Result<()> {
    let Response { status, body } = response;
    let bodyless = matches!(status, 204 | 304);
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\n",
        reason(*status),
    );
    if !bodyless {
        out.push_str(&format!("Content-Length: {}\r\n", body.len() + 1));
    }
    if *status == 405 {
        out.push_str("Allow: GET, HEAD\r\n");
    }
    out.push_str("Connection: close\r\n\r\n");
    if !head_only && !bodyless {
        out.push_str(body);
        out.push('\n');
    }
    stream.write_all(out.as_bytes()).await?;
    stream.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn parse(raw: &[u8]) -> Result<Request, ReadError> {
        let mut input = raw;
        read_request(
            &mut input,
            &["Original-Tcp-Port", "User-Agent"],
            Duration::from_secs(1),
        )
        .await
    }

    #[tokio::test]
    async fn reads_a_kubelet_probe() {
        let raw = b"GET /fsm-healthcheck?x=1 HTTP/1.1\r\nHost: 198.18.0.2:15904\r\nUser-Agent: kube-probe/1.31\r\nAccept: */*\r\noriginal-tcp-port: 8080\r\nConnection: close\r\n\r\n";
        let request = parse(raw).await.expect("valid request");
        assert_eq!(request.method, "GET");
        assert_eq!(request.path, "/fsm-healthcheck");
        assert_eq!(request.values("Original-Tcp-Port"), vec![b"8080"]);
        assert_eq!(request.values("User-Agent"), vec![b"kube-probe/1.31"]);
        assert_eq!(request.headers.len(), 2, "only the headers asked for");
    }

    #[tokio::test]
    async fn collects_repeated_headers() {
        let raw = b"GET / HTTP/1.1\r\nOriginal-Tcp-Port: 1\r\nOriginal-Tcp-Port: 2\r\n\r\n";
        let request = parse(raw).await.expect("valid");
        assert_eq!(request.values("Original-Tcp-Port"), vec![b"1", b"2"]);
    }

    #[tokio::test]
    async fn rejects_garbage_oversized_and_truncated_requests() {
        assert!(matches!(
            parse(b"\x16\x03\x01 hello\r\n\r\n").await,
            Err(ReadError::Malformed(_))
        ));
        let mut huge = b"GET / HTTP/1.1\r\nX: ".to_vec();
        huge.extend(std::iter::repeat_n(b'a', MAX_REQUEST_HEAD));
        assert!(matches!(parse(&huge).await, Err(ReadError::TooLarge)));
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\n").await,
            Err(ReadError::Closed)
        ));
    }

    #[tokio::test]
    async fn head_response_has_headers_but_no_body() {
        let mut out = Vec::new();
        write_response(&mut out, &Response::new(503, "down"), true)
            .await
            .expect("write");
        let text = String::from_utf8(out).expect("utf8");
        assert!(
            text.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Length: 5\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n"), "{text}");
    }
}
