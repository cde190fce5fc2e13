//! The webhook's two listeners: admission reviews over HTTPS, and `/healthz` over plain HTTP. A
//! connection's trouble (a failed handshake, a slow or broken client, a body too large) ends that
//! connection or request only.

use std::{convert::Infallible, sync::Arc, time::Duration};

use http_body_util::{BodyExt as _, Full, LengthLimitError, Limited};
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue},
    server::conn::{http1, http2},
    service::service_fn,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use probe_bypass_rewrite::{
    Options,
    review::{self, Admission},
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{self, ServerConfig},
};

use crate::{
    defaults::{WEBHOOK_HEALTHZ_PATH, WEBHOOK_MUTATE_PATH, WEBHOOK_REPLACE_MESH_INIT_PATH},
    http_text::text,
    serving_cert::{self, CurrentCert},
};

/// Largest review read. The API server caps a request at 3 MiB, and a CREATE's review carries the
/// pod once; a pod is a few KiB.
pub const MAX_BODY: usize = 4 << 20;

/// A client slower than this to finish its TLS handshake, or to send a request's headers or its
/// body, is disconnected or answered 408. The API server's own call times out after the
/// webhook's `timeoutSeconds`.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS configuration: TLS 1.2 and 1.3 with ring, HTTP/2 or HTTP/1.1 by ALPN (the API server
/// asks for HTTP/2), the certificate from `cert` at each handshake.
pub fn tls_config(cert: Arc<CurrentCert>) -> Result<ServerConfig, rustls::Error> {
    serving_cert::server_config(cert, &[b"h2", b"http/1.1"])
}

/// Serves admission reviews on `listener` until the task is dropped: with `options` at
/// [`WEBHOOK_MUTATE_PATH`], and with `--replace-mesh-init` on as well at
/// [`WEBHOOK_REPLACE_MESH_INIT_PATH`].
pub async fn serve_reviews(listener: TcpListener, tls: Arc<ServerConfig>, options: Options) {
    let options = Arc::new(options);
    let acceptor = TlsAcceptor::from(tls);
    loop {
        let Some(stream) = accept(&listener, "admission webhook").await else {
            continue;
        };
        let (acceptor, options) = (acceptor.clone(), Arc::clone(&options));
        tokio::spawn(async move {
            if let Err(error) = review_connection(stream, acceptor, options).await {
                log::debug!("admission webhook: {error}");
            }
        });
    }
}

/// Serves `/healthz` on `listener` until the task is dropped: 200 once the webhook is up.
pub async fn serve_healthz(listener: TcpListener) {
    loop {
        let Some(stream) = accept(&listener, "healthz").await else {
            continue;
        };
        tokio::spawn(async move {
            let service =
                service_fn(|request| async move { Ok::<_, Infallible>(healthz(&request)) });
            if let Err(error) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(CLIENT_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                log::debug!("healthz: {error}");
            }
        });
    }
}

/// The next connection; an accept error (out of file descriptors, say) is logged and waited out.
async fn accept(listener: &TcpListener, what: &str) -> Option<TcpStream> {
    match listener.accept().await {
        Ok((stream, _)) => Some(stream),
        Err(error) => {
            log::warn!("{what}: accept failed: {error}");
            tokio::time::sleep(Duration::from_millis(50)).await;
            None
        }
    }
}

async fn review_connection(
    stream: TcpStream,
    acceptor: TlsAcceptor,
    options: Arc<Options>,
) -> Result<(), String> {
    let peer = stream
        .peer_addr()
        .map_or_else(|_| "?".to_owned(), |peer| peer.to_string());
    let tls = serving_cert::handshake(stream, &acceptor, CLIENT_TIMEOUT).await?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let service = service_fn(move |request| {
        let options = Arc::clone(&options);
        async move { Ok::<_, Infallible>(handle(request, &options).await) }
    });
    let io = TokioIo::new(tls);
    let served = if h2 {
        http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .serve_connection(io, service)
            .await
    } else {
        http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(CLIENT_TIMEOUT)
            .serve_connection(io, service)
            .await
    };
    served.map_err(|error| format!("{peer}: {error}"))
}

async fn handle(request: Request<Incoming>, options: &Options) -> Response<Full<Bytes>> {
    let too_large = || {
        text(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("an admission review is at most {MAX_BODY} bytes\n"),
        )
    };
    let declared = request
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|length| length.to_str().ok()?.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY as u64) {
        return too_large();
    }
    let (head, body) = request.into_parts();
    // The body is read whatever the path and method, so that the client is not cut off while
    // it still writes one, and the connection can carry the next request.
    let body =
        match tokio::time::timeout(CLIENT_TIMEOUT, Limited::new(body, MAX_BODY).collect()).await {
            Err(_) => {
                return text(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the body did not arrive within {CLIENT_TIMEOUT:?}\n"),
                );
            }
            Ok(Ok(body)) => body.to_bytes(),
            Ok(Err(error)) if error.is::<LengthLimitError>() => return too_large(),
            Ok(Err(error)) => {
                return text(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the body: {error}\n"),
                );
            }
        };
    let path = head.uri.path();
    let options = match path {
        WEBHOOK_MUTATE_PATH => options.clone(),
        WEBHOOK_REPLACE_MESH_INIT_PATH => options.clone().replacing_mesh_init(),
        _ => {
            return text(
                StatusCode::NOT_FOUND,
                format!(
                    "no endpoint {path}; admission reviews go to POST {WEBHOOK_MUTATE_PATH} or \
                     {WEBHOOK_REPLACE_MESH_INIT_PATH}\n"
                ),
            );
        }
    };
    if head.method != Method::POST {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{path} takes POST, not {}\n", head.method),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return response;
    }
    match review::review_with(&body, &options) {
        Ok(admission) => answer(&admission),
        Err(error) => {
            log::warn!("admission webhook: refused a request: {error}");
            text(StatusCode::BAD_REQUEST, format!("{error}\n"))
        }
    }
}

/// The review's answer, and its log line.
fn answer(admission: &Admission) -> Response<Full<Bytes>> {
    let Admission {
        review: _,
        pod,
        operations,
        dry_run,
    } = admission;
    let dry_run = if *dry_run { " (dry run)" } else { "" };
    let outcome = if *operations == 0 {
        "unchanged".to_owned()
    } else {
        format!("patched ({operations} operations)")
    };
    let warnings = admission.warnings();
    if warnings.is_empty() {
        log::info!("pod {pod}{dry_run}: {outcome}");
    } else {
        log::info!("pod {pod}{dry_run}: {outcome}; {}", warnings.join("; "));
    }
    match admission.body() {
        Ok(body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)));
            response
                .headers_mut()
                .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
            response
        }
        Err(error) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot write the answer: {error}\n"),
        ),
    }
}

fn healthz(request: &Request<Incoming>) -> Response<Full<Bytes>> {
    match request.uri().path() {
        WEBHOOK_HEALTHZ_PATH => text(StatusCode::OK, "ok\n".to_owned()),
        path => text(
            StatusCode::NOT_FOUND,
            format!("no endpoint {path}; try {WEBHOOK_HEALTHZ_PATH}\n"),
        ),
    }
}
