//! The agent's own endpoints: liveness, readiness and metrics.
//!
//! Served on a TCP address in the host network namespace, for Prometheus and people, and on a
//! Unix socket private to the agent's container, for its probes (`probe-bypass health`). During a
//! rolling update two agents share the TCP port (SO_REUSEPORT), so a request there may reach
//! either one; the socket reaches this one only (issue 4).

use std::{
    convert::Infallible, fmt::Write as _, fs, io, os::unix::fs::FileTypeExt as _, path::Path,
    sync::Arc,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{CONTENT_TYPE, HeaderValue},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::watch,
};
use tokio_util::sync::CancellationToken;

use crate::{metrics::Metrics, reconcile::NodeStatus};

pub const ALIVE_PATH: &str = "/health/alive";
pub const READY_PATH: &str = "/health/ready";
pub const METRICS_PATH: &str = "/metrics";

/// Pods listed by name in a not-ready answer; the rest are counted.
const MAX_LISTED: usize = 20;

/// What the admin endpoints report on.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub status: watch::Receiver<NodeStatus>,
}

/// A listener the admin endpoints are served on.
pub trait Listener: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn accept(&self) -> impl Future<Output = io::Result<Self::Io>> + Send;
}

impl Listener for TcpListener {
    type Io = TcpStream;

    async fn accept(&self) -> io::Result<TcpStream> {
        Self::accept(self).await.map(|(stream, _)| stream)
    }
}

impl Listener for UnixListener {
    type Io = UnixStream;

    async fn accept(&self) -> io::Result<UnixStream> {
        Self::accept(self).await.map(|(stream, _)| stream)
    }
}

/// Listens on the Unix socket `path`, first removing the socket an earlier run of the agent left
/// there (a restarted container keeps its emptyDir). Anything else at `path` is left alone, and
/// the bind fails.
pub fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => fs::remove_file(path)?,
        Ok(_) => {}
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error),
    }
    UnixListener::bind(path)
}

/// Serves the admin endpoints on `listener` until `stop` fires.
pub async fn serve(listener: impl Listener, admin: Arc<Admin>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok(stream) => stream,
            Err(error) => {
                log::warn!("admin endpoint: accept failed: {error}");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let response = respond(&admin, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            if let Err(error) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                log::debug!("admin endpoint: {error}");
            }
        });
    }
}

fn respond(admin: &Admin, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned());
    }
    match request.uri().path() {
        ALIVE_PATH => text(StatusCode::OK, "alive\n".to_owned()),
        READY_PATH => ready(&admin.status.borrow()),
        METRICS_PATH => match admin.metrics.encode() {
            Ok(body) => {
                let mut response = text(StatusCode::OK, body);
                response.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static(
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    ),
                );
                response
            }
            Err(error) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
        },
        path => text(
            StatusCode::NOT_FOUND,
            format!("no endpoint {path}; try {ALIVE_PATH}, {READY_PATH} or {METRICS_PATH}\n"),
        ),
    }
}

fn ready(status: &NodeStatus) -> Response<Full<Bytes>> {
    if !status.synced {
        return text(
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: pod source not read yet\n".to_owned(),
        );
    }
    if status.ready() {
        return text(
            StatusCode::OK,
            format!("ready: {} pods served\n", status.served),
        );
    }
    let mut body = format!(
        "not ready: {} of {} pods have no healthcheck listener\n",
        status.failing.len(),
        status.failing.len() + status.served
    );
    for (pod, error) in status.failing.iter().take(MAX_LISTED) {
        let _ = writeln!(body, "{pod}: {error}");
    }
    if status.failing.len() > MAX_LISTED {
        let _ = writeln!(body, "… and {} more", status.failing.len() - MAX_LISTED);
    }
    text(StatusCode::SERVICE_UNAVAILABLE, body)
}

/// A plain-text answer; the webhook's endpoints use it too.
pub(crate) fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
