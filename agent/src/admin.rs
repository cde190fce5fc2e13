//! The agent's own endpoints: liveness, readiness and metrics.
//!
//! Served on three kinds of listener (issue 15):
//! - the HTTPS admin address, in the host network namespace, for Prometheus: `/metrics`, and a
//!   `/health/ready` that names pods, only to a caller whose bearer token the API server accepts
//!   and whose user may `get` that path ([`access`]); `/health/alive` and the bare status line of
//!   `/health/ready` to anyone;
//! - the plain-HTTP admin address, 127.0.0.1 by default, for people on the node: everything;
//! - a Unix socket private to the agent's container, for its probes (`probe-bypass health`):
//!   everything. During a rolling update two agents share the TCP ports (SO_REUSEPORT), so a
//!   request there may reach either one; the socket reaches this one only (issue 4).

use std::{
    convert::Infallible, fmt::Write as _, fs, io, os::unix::fs::FileTypeExt as _, path::Path,
    sync::Arc, time::Duration,
};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, WWW_AUTHENTICATE},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream, UnixListener, UnixStream},
    sync::watch,
    time::Instant,
};
use tokio_rustls::{TlsAcceptor, rustls::ServerConfig};
use tokio_util::sync::CancellationToken;

use crate::{
    datapath::SharedDatapath,
    defaults::{ALIVE_PATH, METRICS_PATH, READY_PATH},
    http_text::text,
    pod::PodKey,
    serve::metrics::Metrics,
    serving_cert,
};

pub mod access;
pub mod health;
mod readiness;

pub use readiness::{Failing, NodeStatus};

use self::access::{Refusal, Reviewer};

/// Pods listed by name in a not-ready answer; the rest are counted.
const MAX_LISTED: usize = 20;

/// A caller slower than this to finish its TLS handshake or send its request's headers is
/// disconnected.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// What the admin endpoints report on.
pub struct Admin {
    pub metrics: Arc<Metrics>,
    pub status: watch::Receiver<NodeStatus>,
    /// How long an unserved pod holds readiness back (`run --ready-grace`).
    pub ready_grace: Duration,
    /// The datapath, whose fallbacks `/health/ready` reports.
    pub datapath: Option<SharedDatapath>,
}

/// Who a listener's callers are, and so what they are told.
#[derive(Clone)]
enum Callers {
    /// The Unix socket and the plain-HTTP address: every answer to every caller.
    Local,
    /// The HTTPS address: what names pods only to callers the API server allows.
    Reviewed(Arc<Reviewer>),
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

/// The HTTPS admin address's TLS configuration: HTTP/1.1, the certificate from `cert`.
pub fn tls_config(
    cert: Arc<serving_cert::CurrentCert>,
) -> Result<ServerConfig, tokio_rustls::rustls::Error> {
    serving_cert::server_config(cert, &[b"http/1.1"])
}

/// Serves every admin endpoint to every caller of `listener` (the Unix socket, the plain-HTTP
/// address) until `stop` fires.
pub async fn serve(listener: impl Listener, admin: Arc<Admin>, stop: CancellationToken) {
    while let Some(stream) = next(&listener, &stop).await {
        tokio::spawn(connection(stream, Arc::clone(&admin), Callers::Local));
    }
}

/// Serves the admin endpoints over TLS on `listener` until `stop` fires, what names pods only to
/// callers `reviewer` allows.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    reviewer: Arc<Reviewer>,
    admin: Arc<Admin>,
    stop: CancellationToken,
) {
    let acceptor = TlsAcceptor::from(tls);
    while let Some(stream) = next(&listener, &stop).await {
        let (acceptor, admin) = (acceptor.clone(), Arc::clone(&admin));
        let callers = Callers::Reviewed(Arc::clone(&reviewer));
        tokio::spawn(async move {
            match serving_cert::handshake(stream, &acceptor, CLIENT_TIMEOUT).await {
                Ok(tls) => connection(tls, admin, callers).await,
                Err(error) => log::debug!("admin endpoint: {error}"),
            }
        });
    }
}

/// The next connection, or `None` once `stop` fires; an accept error (out of file descriptors,
/// say) is logged and waited out.
async fn next<L: Listener>(listener: &L, stop: &CancellationToken) -> Option<L::Io> {
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return None,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok(stream) => return Some(stream),
            Err(error) => {
                log::warn!("admin endpoint: accept failed: {error}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn connection(
    stream: impl AsyncRead + AsyncWrite + Unpin + Send + 'static,
    admin: Arc<Admin>,
    callers: Callers,
) {
    let service = service_fn(move |request| {
        let (admin, callers) = (Arc::clone(&admin), callers.clone());
        async move { Ok::<_, Infallible>(respond(&admin, &callers, &request).await) }
    });
    if let Err(error) = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(CLIENT_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        log::debug!("admin endpoint: {error}");
    }
}

async fn respond(
    admin: &Admin,
    callers: &Callers,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n".to_owned());
    }
    let path = request.uri().path();
    let authorization = request
        .headers()
        .get(AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    // Whether the caller may read `path`: a local one always, another as the API server says.
    let allowed = async |path| match callers {
        Callers::Local => Ok(()),
        Callers::Reviewed(reviewer) => reviewer.check(authorization, path).await.map(drop),
    };
    match path {
        ALIVE_PATH => text(StatusCode::OK, "alive\n".to_owned()),
        // A caller that sends no token gets the bare status: the code and its first line,
        // which counts pods and names none.
        READY_PATH if matches!(callers, Callers::Reviewed(_)) && authorization.is_none() => {
            let (code, body) = ready(admin);
            let first = body.lines().next().unwrap_or_default();
            text(
                code,
                format!(
                    "{first}\n(pods are named to a caller whose bearer token may `get` \
                     {READY_PATH})\n"
                ),
            )
        }
        READY_PATH => match allowed(READY_PATH).await {
            Ok(()) => {
                let (code, body) = ready(admin);
                text(code, body)
            }
            Err(refused) => refusal(&refused, READY_PATH),
        },
        METRICS_PATH => match allowed(METRICS_PATH).await {
            Ok(()) => metrics(admin),
            Err(refused) => refusal(&refused, METRICS_PATH),
        },
        path => text(
            StatusCode::NOT_FOUND,
            format!("no endpoint {path}; try {ALIVE_PATH}, {READY_PATH} or {METRICS_PATH}\n"),
        ),
    }
}

/// `/health/ready`'s whole answer.
fn ready(admin: &Admin) -> (StatusCode, String) {
    let fallback = admin.datapath.as_ref().and_then(|datapath| {
        let datapath = datapath.lock().ok()?;
        datapath
            .settings()
            .probe_bypass
            .fallback()
            .map(str::to_owned)
    });
    let (code, mut body) = readiness(&admin.status.borrow(), Instant::now(), admin.ready_grace);
    if let Some(why) = fallback {
        let _ = writeln!(
            body,
            "probe bypass: host, not kubelet (every caller in the host network namespace gets \
             past the proxy on the probe ports): {why}"
        );
    }
    (code, body)
}

fn metrics(admin: &Admin) -> Response<Full<Bytes>> {
    match admin.metrics.encode() {
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
    }
}

/// The answer to a caller the API server did not allow `path`.
fn refusal(refused: &Refusal, path: &str) -> Response<Full<Bytes>> {
    match refused {
        Refusal::Unauthenticated { reason } => {
            let mut response = text(
                StatusCode::UNAUTHORIZED,
                format!("{path} needs a bearer token the API server accepts: {reason}\n"),
            );
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"probe-bypass\""),
            );
            response
        }
        Refusal::Forbidden { user, reason } => text(
            StatusCode::FORBIDDEN,
            format!("{user} may not get {path}: {reason}\n"),
        ),
        Refusal::Unavailable { reason } => text(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot check the caller's token, so {path} is refused: {reason}\n"),
        ),
    }
}

/// The readiness answer: 503 while the source is unread or a pod unserved for less than `grace`
/// holds it back, listing those pods; 200 otherwise, listing the pods unserved for longer.
fn readiness(status: &NodeStatus, now: Instant, grace: Duration) -> (StatusCode, String) {
    if !status.synced {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: pod source not read yet\n".to_owned(),
        );
    }
    let (holding, given_up): (Vec<_>, Vec<_>) = status
        .failing
        .iter()
        .partition(|(_, failing)| failing.holds(now, grace));
    let mut body;
    let code = if status.ready(now, grace) {
        body = format!("ready: {} pods served\n", status.served);
        StatusCode::OK
    } else {
        body = format!(
            "not ready: {} of {} pods have no healthcheck listener\n",
            holding.len(),
            status.failing.len() + status.served
        );
        list(&mut body, holding.into_iter(), now);
        StatusCode::SERVICE_UNAVAILABLE
    };
    if !given_up.is_empty() {
        let _ = writeln!(
            body,
            "not served for longer than {} (--ready-grace), still retried, not holding readiness:",
            humantime::format_duration(grace)
        );
        list(&mut body, given_up.into_iter(), now);
    }
    (code, body)
}

/// Lists at most [`MAX_LISTED`] pods, each with why and for how long it has not been served.
fn list<'a>(
    body: &mut String,
    pods: impl ExactSizeIterator<Item = (&'a PodKey, &'a Failing)>,
    now: Instant,
) {
    let count = pods.len();
    for (pod, failing) in pods.take(MAX_LISTED) {
        // Whole seconds: the answer is for people, and a retry's timing is in the log.
        let seconds = now.saturating_duration_since(failing.since).as_secs();
        let _ = writeln!(
            body,
            "{pod}: {} (for {})",
            failing.reason,
            humantime::format_duration(Duration::from_secs(seconds))
        );
    }
    if count > MAX_LISTED {
        let _ = writeln!(body, "… and {} more", count - MAX_LISTED);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> PodKey {
        PodKey {
            namespace: "shop".to_owned(),
            name: name.to_owned(),
        }
    }

    fn status(failing: &[(&str, Instant)]) -> NodeStatus {
        NodeStatus {
            synced: true,
            served: 3,
            failing: failing
                .iter()
                .map(|(name, since)| {
                    let reason = format!("{name} has no network namespace");
                    (
                        key(name),
                        Failing {
                            reason,
                            since: *since,
                        },
                    )
                })
                .collect(),
        }
    }

    const GRACE: Duration = Duration::from_secs(60);

    #[test]
    fn an_unread_source_is_not_ready() {
        let now = Instant::now();
        let unread = NodeStatus::default();
        assert_eq!(
            readiness(&unread, now, GRACE),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: pod source not read yet\n".to_owned()
            )
        );
    }

    #[test]
    fn a_pod_unserved_within_the_grace_holds_readiness_and_one_past_it_does_not() {
        let now = Instant::now();
        let new = now - Duration::from_secs(5);
        let old = now - Duration::from_secs(125);
        assert_eq!(
            readiness(&status(&[("cart", new), ("stuck", old)]), now, GRACE),
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: 1 of 5 pods have no healthcheck listener\n\
                 shop/cart: cart has no network namespace (for 5s)\n\
                 not served for longer than 1m (--ready-grace), still retried, not holding \
                 readiness:\n\
                 shop/stuck: stuck has no network namespace (for 2m 5s)\n"
                    .to_owned()
            )
        );
        assert_eq!(
            readiness(&status(&[("stuck", old)]), now, GRACE),
            (
                StatusCode::OK,
                "ready: 3 pods served\n\
                 not served for longer than 1m (--ready-grace), still retried, not holding \
                 readiness:\n\
                 shop/stuck: stuck has no network namespace (for 2m 5s)\n"
                    .to_owned()
            )
        );
        assert_eq!(
            readiness(&status(&[]), now, GRACE),
            (StatusCode::OK, "ready: 3 pods served\n".to_owned())
        );
    }

    #[test]
    fn a_zero_grace_never_holds_readiness() {
        let now = Instant::now();
        let (code, _) = readiness(&status(&[("cart", now)]), now, Duration::ZERO);
        assert_eq!(code, StatusCode::OK);
    }

    #[test]
    fn long_lists_are_cut_with_a_count() {
        let now = Instant::now();
        let names: Vec<String> = (0..25).map(|i| format!("pod-{i:02}")).collect();
        let failing: Vec<(&str, Instant)> = names.iter().map(|name| (name.as_str(), now)).collect();
        let (_, body) = readiness(&status(&failing), now, GRACE);
        assert!(body.starts_with("not ready: 25 of 28 pods"), "{body}");
        assert_eq!(body.lines().count(), 1 + MAX_LISTED + 1, "{body}");
        assert!(body.ends_with("… and 5 more\n"), "{body}");
    }
}
