//! An HTTP client that sends a probe the way the kubelet's prober does, byte for byte in the parts
//! that matter: GET, `User-Agent: kube-probe/<major>.<minor>`, `Accept: */*`, the probe's headers, and
//! `Connection: close` (the prober disables keep-alive).

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

/// The answer to a probe: status code and body; status 0 when no response came.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: String,
    pub body: String,
}

/// The request the kubelet sends for a rewritten tcpSocket probe of `port`.
pub fn request(addr: SocketAddr, path: &str, port: Option<&str>) -> Vec<u8> {
    let mut text = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: kube-probe/1.31\r\nAccept: */*\r\n"
    );
    if let Some(port) = port {
        text.push_str(&format!("Original-Tcp-Port: {port}\r\n"));
    }
    text.push_str("Connection: close\r\nAccept-Encoding: gzip\r\n\r\n");
    text.into_bytes()
}

/// Probes the healthcheck at `addr` for `port` on the FSM path.
pub fn probe(addr: SocketAddr, port: &str) -> Reply {
    send(addr, &request(addr, "/fsm-healthcheck", Some(port)))
}

/// Sends raw bytes and reads the whole answer (the server closes after one response).
pub fn send(addr: SocketAddr, raw: &[u8]) -> Reply {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("read timeout");
    stream.write_all(raw).expect("send request");
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    parse(&String::from_utf8_lossy(&response))
}

fn parse(response: &str) -> Reply {
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((response, ""));
    let status = head.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    Reply {
        status,
        headers: head.to_owned(),
        body: body.trim_end().to_owned(),
    }
}
