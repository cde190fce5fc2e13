//! An HTTP client that sends a probe the way the kubelet's prober does, byte for byte in the parts
//! that matter: GET, `User-Agent: kube-probe/<major>.<minor>`, `Accept: */*`, the probe's headers, and
//! `Connection: close` (the prober disables keep-alive).

use std::{
    io::{Read, Write as _},
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

/// curl's arguments for a GET of `url` as the kubelet's prober sends it (its user agent, the
/// probe's `header` if any, at most 3 s), printing only the status code: for a probe that must
/// start in a given cgroup, where curl is run.
pub fn curl_args<'a>(url: &'a str, header: Option<&'a str>) -> Vec<&'a str> {
    let mut args = vec![
        "-q",
        "--silent",
        "--noproxy",
        "*",
        "--max-time",
        "3",
        "--user-agent",
        "kube-probe/1.31",
        "--output",
        "/dev/null",
        "--write-out",
        "%{http_code}",
    ];
    if let Some(header) = header {
        args.extend(["--header", header]);
    }
    args.push(url);
    args
}

/// Probes the healthcheck at `addr` for `port` on the FSM path.
pub fn probe(addr: SocketAddr, port: &str) -> Reply {
    send(addr, &request(addr, "/fsm-healthcheck", Some(port)))
}

/// Sends raw bytes and reads the answer as the kubelet's Go client does: the head, then
/// `Content-Length` bytes of body (none for HEAD), then it closes the connection itself. Without a
/// `Content-Length` it reads until the server closes.
pub fn send(addr: SocketAddr, raw: &[u8]) -> Reply {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("read timeout");
    stream.write_all(raw).expect("send request");
    read_reply(&mut stream, raw.starts_with(b"HEAD "))
}

/// Reads one response from `stream` (see [`send`]); status 0 when none came.
pub fn read_reply(stream: &mut impl Read, head_only: bool) -> Reply {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = find(&received, b"\r\n\r\n") {
            break end + 4;
        }
        match stream.read(&mut buf) {
            Ok(0) => return parse(&String::from_utf8_lossy(&received)),
            // Go's client retries an interrupted read, and so does the kubelet.
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => {
                // No response: say why in the reply, so a failing test shows it.
                let mut reply = parse(&String::from_utf8_lossy(&received));
                reply.headers = format!("read error after {} bytes: {error}", received.len());
                return reply;
            }
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    };
    let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
    let length = head.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.eq_ignore_ascii_case("content-length")
            .then(|| value.trim().parse::<usize>().ok())
            .flatten()
    });
    let wanted = match (head_only, length) {
        (true, _) => Some(0),
        (false, length) => length,
    };
    while wanted.is_none_or(|wanted| received.len() < head_end + wanted) {
        match stream.read(&mut buf) {
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
    parse(&String::from_utf8_lossy(&received))
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
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

/// A process named `kubelet` in a cgroup of the test's, where an agent that looks for the kubelet
/// by its name (`/proc/<pid>/comm`) finds it and its cgroup: a copy of `sleep` under that name.
/// Killed and reaped on drop, before its cgroup goes.
pub struct KubeletProcess {
    child: std::process::Child,
    _dir: crate::sidecar::TempDir,
}

impl KubeletProcess {
    pub fn start(cgroup: &crate::cgroup::ChildCgroup) -> Self {
        let dir = crate::sidecar::TempDir::new("kubelet");
        let program = dir.path.join("kubelet");
        let sleep = crate::images::which("sleep");
        std::fs::copy(&sleep, &program)
            .unwrap_or_else(|error| panic!("copy {} as the kubelet: {error}", sleep.display()));
        let child = cgroup
            .command(program.to_str().expect("a UTF-8 path"), &["600"])
            .spawn()
            .expect("start the stand-in kubelet");
        Self { child, _dir: dir }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for KubeletProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
