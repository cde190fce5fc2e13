//! `probe-bypass health`: the container's liveness and readiness probes. They ask the agent over
//! its admin socket, which only this container can reach: the admin port may answer for another
//! agent while a rolling update runs two on the node (issue 4).

use std::{
    io::{self, Read as _, Write as _},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    time::Duration,
};

use crate::defaults::{ALIVE_PATH, READY_PATH};

/// Bound on connecting, sending and reading the answer; the kubelet's own timeout is longer.
const TIMEOUT: Duration = Duration::from_secs(2);

/// The most an answer may hold; a not-ready answer lists at most 20 pods.
const MAX_ANSWER: u64 = 64 * 1024;

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Answer {
    pub fn is_ok(&self) -> bool {
        self.status == 200
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error(
        "cannot reach the agent on {path}: {source}; is `probe-bypass run --admin-socket {path}` \
         running in this container?",
        path = path.display()
    )]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("asking the agent on {path}: {source}", path = path.display())]
    Exchange {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the agent on {path} answered something that is not HTTP: {problem}", path = path.display())]
    Malformed { path: PathBuf, problem: String },
}

/// Asks the agent listening on `socket` whether it is alive, or with `ready`, ready.
pub fn ask(socket: &Path, ready: bool) -> Result<Answer, HealthError> {
    let path = if ready { READY_PATH } else { ALIVE_PATH };
    let mut stream = UnixStream::connect(socket).map_err(|source| HealthError::Connect {
        path: socket.to_owned(),
        source,
    })?;
    let exchange = |source| HealthError::Exchange {
        path: socket.to_owned(),
        source,
    };
    stream.set_read_timeout(Some(TIMEOUT)).map_err(exchange)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(exchange)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nUser-Agent: probe-bypass-health\r\nConnection: close\r\n\r\n"
    )
    .map_err(exchange)?;
    let mut response = Vec::new();
    stream
        .take(MAX_ANSWER)
        .read_to_end(&mut response)
        .map_err(exchange)?;
    parse(&response).map_err(|problem| HealthError::Malformed {
        path: socket.to_owned(),
        problem,
    })
}

/// The status and body of a whole HTTP/1.1 response, as the admin endpoints send it (with a
/// Content-Length, then the connection closed).
fn parse(response: &[u8]) -> Result<Answer, String> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut head = httparse::Response::new(&mut headers);
    let body_at = match head.parse(response) {
        Ok(httparse::Status::Complete(at)) => at,
        Ok(httparse::Status::Partial) => return Err("the answer ends within its head".to_owned()),
        Err(error) => return Err(error.to_string()),
    };
    let status = head.code.ok_or("no status code")?;
    let body = response.get(body_at..).unwrap_or_default();
    Ok(Answer {
        status,
        body: String::from_utf8_lossy(body).into_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;

    use super::*;

    #[test]
    fn reads_the_status_and_body_of_an_answer() {
        let answer = parse(
            b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 21\r\n\r\nnot ready: 1 of 1 ...",
        )
        .unwrap();
        assert_eq!(answer.status, 503);
        assert_eq!(answer.body, "not ready: 1 of 1 ...");
        assert!(!answer.is_ok());
        assert!(parse(b"HTTP/1.1 200 OK\r\ncontent-le").is_err());
        assert!(parse(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    #[test]
    fn nothing_on_the_socket_is_a_connect_error_naming_the_path() {
        let dir = std::env::temp_dir().join(format!("pb-health-{}", std::process::id()));
        let path = dir.join("admin.sock");
        let error = ask(&path, true).unwrap_err().to_string();
        assert!(
            error.starts_with(&format!("cannot reach the agent on {}: ", path.display())),
            "{error}"
        );
    }

    #[test]
    fn an_answer_that_is_not_http_is_refused() {
        let dir = std::env::temp_dir().join(format!("pb-health-junk-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("admin.sock");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut request = Vec::new();
            let mut byte = [0u8];
            while !request.ends_with(b"\r\n\r\n") && stream.read(&mut byte).unwrap() == 1 {
                request.push(byte[0]);
            }
            stream.write_all(b"hello\r\n\r\n").unwrap();
        });
        let error = ask(&path, false);
        let _ = server.join();
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            matches!(error, Err(HealthError::Malformed { .. })),
            "{error:?}"
        );
    }
}
