//! Apps for the prober's tests, each listening inside a test pod: an HTTP app whose paths answer
//! the way a probe needs (200, 500, slow, redirects, a big body), the same app over TLS with a
//! self-signed certificate, and a gRPC server of the standard health service.
//!
//! Each app runs on a thread of its own with its own tokio runtime, records every request it is
//! sent, and stops when dropped (its runtime, and every connection in it, with it).

use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::Command,
    sync::{Arc, Mutex},
    thread,
    time::Duration,
};

use futures::{StreamExt as _, stream};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::{
    HeaderMap, Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::{net::TcpStream, sync::oneshot};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        ServerConfig,
        crypto::ring,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _},
    },
};

use crate::{pod::TestPod, sidecar::TempDir};

/// Where [`AppPod`]'s apps listen, and a port where nothing does.
pub const HTTP_PORT: u16 = 8080;
pub const HTTPS_PORT: u16 = 8443;
pub const GRPC_PORT: u16 = 9090;
pub const CLOSED_PORT: u16 = 8081;

/// A test pod with the three apps listening: HTTP on every address of the pod (so that a redirect
/// to 127.0.0.1 would reach it if it were followed), HTTPS and gRPC on the pod IP.
pub struct AppPod {
    pub pod: TestPod,
    pub http: App,
    pub https: App,
    pub grpc: App,
}

impl AppPod {
    pub fn start() -> Self {
        let pod = TestPod::new();
        let ip = IpAddr::V4(pod.ip);
        let redirects = Redirects {
            pod_ip: ip,
            https_port: HTTPS_PORT,
            http_port: HTTP_PORT,
        };
        let http = http(
            &pod,
            SocketAddr::new(std::net::Ipv4Addr::UNSPECIFIED.into(), HTTP_PORT),
            redirects,
        );
        let https = https(&pod, SocketAddr::new(ip, HTTPS_PORT), redirects);
        let grpc = grpc_health(&pod, SocketAddr::new(ip, GRPC_PORT));
        Self {
            pod,
            http,
            https,
            grpc,
        }
    }
}

/// The kubelet's connector: connections from the host's network namespace, as the kubelet's probes
/// leave the node for the pod.
pub struct HostConnector;

impl probe_bypass::serve::prober::Connector for HostConnector {
    type Stream = TcpStream;

    async fn connect(
        &self,
        addr: SocketAddr,
    ) -> Result<TcpStream, probe_bypass::dial::StreamError> {
        TcpStream::connect(addr)
            .await
            .map_err(|source| probe_bypass::dial::StreamError::Connect { addr, source })
    }
}

/// How long the slow paths and the slow gRPC service take: longer than any probe timeout in the
/// tests.
pub const SLOW: Duration = Duration::from_secs(5);

/// Size of the big bodies: far past the 10 KiB the kubelet reads.
pub const BIG_BODY: usize = 1024 * 1024;

/// One request an app was sent: its target (for the gRPC server, the service asked about) and
/// headers, names in lower case.
#[derive(Clone, Debug)]
pub struct Seen {
    pub target: String,
    pub headers: Vec<(String, String)>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

type Log = Arc<Mutex<Vec<Seen>>>;
type Body = BoxBody<Bytes, Infallible>;

/// A running app, stopped on drop.
pub struct App {
    stop: Option<oneshot::Sender<()>>,
    thread: Option<thread::JoinHandle<()>>,
    log: Log,
}

impl App {
    /// Every request sent to the app so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.log.lock().expect("app log").clone()
    }

    /// The requests sent to the app so far with target `target`.
    pub fn seen_at(&self, target: &str) -> Vec<Seen> {
        self.seen()
            .into_iter()
            .filter(|seen| seen.target == target)
            .collect()
    }

    /// Accepts on `addr` inside `pod` and hands each connection to `serve`.
    fn start<F, Fut>(pod: &TestPod, addr: SocketAddr, serve: F) -> Self
    where
        F: Fn(TcpStream, Log) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener: std::net::TcpListener = pod.bind(addr).into();
        listener.set_nonblocking(true).expect("nonblocking");
        let log = Log::default();
        let app_log = Arc::clone(&log);
        let (stop, mut stopped) = oneshot::channel();
        let thread = thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("app runtime");
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        accepted = listener.accept() => {
                            if let Ok((stream, _)) = accepted {
                                tokio::spawn(serve(stream, Arc::clone(&app_log)));
                            }
                        }
                    }
                }
            });
        });
        Self {
            stop: Some(stop),
            thread: Some(thread),
            log,
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Where the HTTP app's redirects lead.
#[derive(Clone, Copy, Debug)]
pub struct Redirects {
    /// The pod's IP: the host of the probe, so of same-host redirects.
    pub pod_ip: IpAddr,
    /// The port of the HTTPS app, which `/redirect-https` leads to.
    pub https_port: u16,
    /// The HTTP app's own port, which `/redirect-other` leads to on 127.0.0.1: the same app, but
    /// another host name than the probe's.
    pub http_port: u16,
}

/// The HTTP app on `addr`. Its paths:
/// - `/ok` 200; `/fail` 500; `/slow` 200 after [`SLOW`]; `/slow-body` 200 and a body that stops
///   after 10 bytes; `/big` 200 with a [`BIG_BODY`] body;
/// - `/redirect-same` 302 to `/ok`; `/redirect-https` 302 to the HTTPS app's `/ok` on the pod IP;
///   `/redirect-other` 302 to `/ok` on 127.0.0.1, with a [`BIG_BODY`] body; `/loop` 302 to itself.
pub fn http(pod: &TestPod, addr: SocketAddr, redirects: Redirects) -> App {
    App::start(pod, addr, move |stream, log| async move {
        serve_http1(TokioIo::new(stream), log, redirects).await;
    })
}

/// The HTTP app over TLS, with a self-signed certificate for a name that is not the pod's.
pub fn https(pod: &TestPod, addr: SocketAddr, redirects: Redirects) -> App {
    let acceptor = TlsAcceptor::from(Arc::new(self_signed_server_config()));
    App::start(pod, addr, move |stream, log| {
        let acceptor = acceptor.clone();
        async move {
            if let Ok(stream) = acceptor.accept(stream).await {
                serve_http1(TokioIo::new(stream), log, redirects).await;
            }
        }
    })
}

async fn serve_http1<S>(io: TokioIo<S>, log: Log, redirects: Redirects)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(move |request: Request<Incoming>| {
        let log = Arc::clone(&log);
        async move {
            record(&log, target(&request), request.headers());
            Ok::<_, Infallible>(answer_http(&request, redirects).await)
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(io, service)
        .await;
}

fn target(request: &Request<Incoming>) -> String {
    request
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |target| target.as_str().to_owned())
}

fn record(log: &Log, target: String, headers: &HeaderMap) {
    let headers = headers
        .iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                String::from_utf8_lossy(value.as_bytes()).into_owned(),
            )
        })
        .collect();
    log.lock().expect("app log").push(Seen { target, headers });
}

fn full(bytes: impl Into<Bytes>) -> Body {
    http_body_util::Full::new(bytes.into()).boxed()
}

fn response(status: u16, location: Option<String>, body: Body) -> Response<Body> {
    let mut builder = Response::builder().status(status);
    if let Some(location) = location {
        builder = builder.header("location", location);
    }
    builder.body(body).expect("response")
}

async fn answer_http(request: &Request<Incoming>, redirects: Redirects) -> Response<Body> {
    let Redirects {
        pod_ip,
        https_port,
        http_port,
    } = redirects;
    let big = || full(vec![b'x'; BIG_BODY]);
    match request.uri().path() {
        "/ok" => response(200, None, full("ok")),
        "/fail" => response(500, None, full("the app's own failure detail")),
        "/slow" => {
            tokio::time::sleep(SLOW).await;
            response(200, None, full("late"))
        }
        "/slow-body" => {
            let first = stream::iter([Ok(Frame::data(Bytes::from_static(b"0123456789")))]);
            let stalled = first.chain(stream::pending());
            response(200, None, BodyExt::boxed(StreamBody::new(stalled)))
        }
        "/big" => response(200, None, big()),
        "/redirect-same" => response(302, Some("/ok".into()), full("")),
        "/redirect-https" => {
            let location = format!("https://{}/ok", SocketAddr::new(pod_ip, https_port));
            response(302, Some(location), full(""))
        }
        "/redirect-other" => {
            let location = format!("http://127.0.0.1:{http_port}/ok");
            response(302, Some(location), big())
        }
        "/loop" => response(302, Some("/loop".into()), full("")),
        _ => response(404, None, full("no such path")),
    }
}

/// A server configuration with a fresh self-signed certificate made by `openssl`.
fn self_signed_server_config() -> ServerConfig {
    let dir = TempDir::new("app-cert");
    let key = dir.path.join("key.pem");
    let cert = dir.path.join("cert.pem");
    let output = Command::new("openssl")
        .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
        .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
        .args(["-subj", "/CN=not-the-pod.example"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        output.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    server_config(&cert, &key)
}

/// A server configuration serving the certificate in `cert` with its key in `key` (PEM files).
pub fn server_config(cert: &Path, key: &Path) -> ServerConfig {
    let certs = CertificateDer::pem_file_iter(cert)
        .expect("read the certificate")
        .collect::<Result<Vec<_>, _>>()
        .expect("parse the certificate");
    let key = PrivateKeyDer::from_pem_file(key).expect("read the key");
    ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate")
}

/// A gRPC server of `grpc.health.v1.Health` over h2c on `addr`, written by hand as the agent's
/// client is, but from the protocol's documents, so that each checks the other. By service:
/// `""` and `ready` are SERVING, `down` NOT_SERVING, `unset` an empty response (UNKNOWN, the
/// default), `slow` SERVING after [`SLOW`]; any other is the NOT_FOUND status, as grpc-go's health
/// server answers. Another method is UNIMPLEMENTED. Each request is recorded with the service as
/// its target.
pub fn grpc_health(pod: &TestPod, addr: SocketAddr) -> App {
    App::start(pod, addr, |stream, log| async move {
        let service = service_fn(move |request: Request<Incoming>| {
            let log = Arc::clone(&log);
            async move { Ok::<_, Infallible>(answer_grpc(request, &log).await) }
        });
        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(stream), service)
            .await;
    })
}

async fn answer_grpc(request: Request<Incoming>, log: &Log) -> Response<Body> {
    let (head, body) = request.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let service = requested_service(&body);
    record(log, service.clone(), &head.headers);
    if head.uri.path() != "/grpc.health.v1.Health/Check" {
        return trailers_only(12, "unknown method");
    }
    // HealthCheckResponse: field 1 (varint) = the status; an empty message is status 0.
    let message: &[u8] = match service.as_str() {
        "" | "ready" => &[0x08, 1],
        "down" => &[0x08, 2],
        "unset" => &[],
        "slow" => {
            tokio::time::sleep(SLOW).await;
            &[0x08, 1]
        }
        _ => return trailers_only(5, "unknown service"),
    };
    let mut framed = vec![0];
    framed.extend_from_slice(&u32::try_from(message.len()).expect("small").to_be_bytes());
    framed.extend_from_slice(message);
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", "0".parse().expect("header"));
    let frames = stream::iter([
        Ok(Frame::data(Bytes::from(framed))),
        Ok(Frame::trailers(trailers)),
    ]);
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/grpc")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .expect("response")
}

/// The service of a framed HealthCheckRequest: field 1, a string, absent when empty.
fn requested_service(framed: &[u8]) -> String {
    match framed.get(5..) {
        Some([0x0a, length, service @ ..]) if usize::from(*length) == service.len() => {
            String::from_utf8_lossy(service).into_owned()
        }
        _ => String::new(),
    }
}

/// A failed call answered with headers only, as gRPC servers do.
fn trailers_only(code: u32, message: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/grpc")
        .header("grpc-status", code.to_string())
        .header("grpc-message", message)
        .body(full(""))
        .expect("response")
}
