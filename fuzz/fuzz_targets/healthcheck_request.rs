//! Arbitrary bytes as what a client sends to a pod's healthcheck (15904) or to one of its probe
//! ports (15901-15903), through the agent's request reader (`read_request`, over an in-memory
//! stream), the router of that port (`route` or `probes_route`) and the response writer
//! (`write_response`), as the listener chains them: nothing panics; the request read does not
//! depend on how the bytes are split into reads; a request is routed only to a port the pod's
//! probes name (unless any port is allowed) and a refusal's status matches its outcome; and every
//! answer is one well-formed HTTP response whose length is its body's, whatever the request put
//! into its text.
//!
//! The first byte picks the listener (bits 0-1: the healthcheck, or the liveness, readiness or
//! startup port), `--allow-any-port` (bit 2) and the size of each read (bits 3-7: 1-31 bytes, or
//! 0 for the bytes as one slice).
#![no_main]

use std::{sync::LazyLock, time::Duration};

use libfuzzer_sys::fuzz_target;
use probe_bypass::{
    defaults::NETNS_ANNOTATION,
    pod::Pod,
    serve::healthcheck::{
        Outcome, Settings, TcpTarget,
        fuzzing::{HEADERS, Rejection, Route, probes_route, route},
        http::{ReadError, Request, Response, read_request, write_response},
    },
};
use probe_bypass_rewrite::{ProbeKind, Style, rewrite_in_place};
use serde_json::json;
use tokio::io::AsyncWriteExt as _;

/// Far longer than reading from memory takes: a request read never times out here.
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// A pod as the rewriter leaves it: an httpGet, a tcpSocket and a gRPC probe in one container, an
/// httpGet probe with its own Host on a named port in another, their originals recorded.
static POD: LazyLock<Pod> = LazyLock::new(|| {
    let mut pod = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "bookstore", "namespace": "shop",
                     "annotations": {NETNS_ANNOTATION: "pod"}},
        "spec": {"containers": [
            {"name": "app", "ports": [{"name": "http", "containerPort": 8080}],
             "livenessProbe": {"httpGet": {"port": "http", "path": "/healthz"}},
             "readinessProbe": {"tcpSocket": {"port": 8081}},
             "startupProbe": {"grpc": {"port": 9090, "service": "ready"}}},
            {"name": "web", "ports": [{"name": "web", "containerPort": 80}],
             "readinessProbe": {"httpGet": {"port": "web", "path": "/ready?deep=1",
                 "httpHeaders": [{"name": "Host", "value": "web.example"}]}}}
        ]},
        "status": {"podIP": "10.1.2.3"}
    });
    rewrite_in_place(&mut pod, Style::Osm).expect("the rewriter takes the pod");
    Pod::from_manifest(pod).expect("a pod the agent serves").pod
});

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let kind = match selector & 3 {
        0 => None,
        n => Some(ProbeKind::ALL[usize::from(n - 1)]),
    };
    let settings = Settings {
        port: 15904,
        serve_http_probes: true,
        allow_any_port: selector & 4 != 0,
        tcp_target: TcpTarget::PodIp,
        dial_timeout: Duration::from_secs(1),
        header_timeout: HEADER_TIMEOUT,
    };
    let chunk = usize::from(selector >> 3);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("a runtime");
    runtime.block_on(async {
        let whole = read_request(&mut &bytes[..], &HEADERS, HEADER_TIMEOUT).await;
        if chunk > 0 {
            let split = read_in_chunks(bytes, chunk).await;
            assert_eq!(
                describe(&split),
                describe(&whole),
                "reads of {chunk} bytes read another request"
            );
        }
        let (response, head_only) = match whole {
            Ok(request) => {
                check_request(&request);
                let routed = match kind {
                    None => route(&request, &POD, settings.allow_any_port),
                    Some(kind) => probes_route(&request, &POD, kind, &settings),
                };
                match routed {
                    Ok(routed) => {
                        check_route(&routed, kind, settings.allow_any_port);
                        return;
                    }
                    Err(rejection) => (check_rejection(rejection), request.method == "HEAD"),
                }
            }
            // What the listener answers these with.
            Err(error @ (ReadError::TooLarge | ReadError::Malformed(_))) => {
                (Response::new(400, error.to_string()), false)
            }
            Err(_) => return,
        };
        let mut written = Vec::new();
        write_response(&mut written, &response, head_only)
            .await
            .expect("writing to memory");
        check_response(&written, &response, head_only);
    });
});

/// The request read from a stream that yields at most `chunk` bytes a read, and then closes.
async fn read_in_chunks(bytes: &[u8], chunk: usize) -> Result<Request, ReadError> {
    let (mut client, mut server) = tokio::io::duplex(chunk);
    let send = async move {
        // The reader may stop, and close, before everything is sent.
        let _ = client.write_all(bytes).await;
    };
    let read = async move { read_request(&mut server, &HEADERS, HEADER_TIMEOUT).await };
    tokio::join!(send, read).1
}

/// A read's result, to compare two reads: errors by kind and message.
fn describe(result: &Result<Request, ReadError>) -> String {
    match result {
        Ok(request) => format!("{request:?}"),
        Err(error) => format!("error: {error}"),
    }
}

fn check_request(request: &Request) {
    assert!(!request.method.is_empty(), "a method");
    assert!(
        !request.path.contains('?'),
        "the query is cut off: {request:?}"
    );
    for (name, _) in &request.headers {
        assert!(HEADERS.contains(name), "{name} was not asked for");
    }
}

fn check_route(routed: &Route, kind: Option<ProbeKind>, allow_any_port: bool) {
    match routed {
        Route::Tcp(port) | Route::Grpc { port, .. } => {
            assert_ne!(*port, 0);
            assert!(
                allow_any_port || POD.probe_ports.contains(port),
                "port {port} is named by no probe of the pod"
            );
        }
        Route::Http(http) => {
            assert_eq!(Some(http.kind), kind, "an httpGet probe of the port's kind");
            assert_ne!(http.probe.url.port, 0);
        }
    }
}

fn check_rejection(rejection: Rejection) -> Response {
    let Rejection { outcome, response } = rejection;
    let expected = match outcome {
        Outcome::BadRequest => 400,
        Outcome::Forbidden => 403,
        Outcome::NotFound => 404,
        Outcome::MethodNotAllowed => 405,
        Outcome::Error => 503,
        other => panic!("a refusal counted as {}", other.label()),
    };
    assert_eq!(response.status, expected, "{response:?}");
    assert!(!response.body.is_empty(), "a refusal says why");
    response
}

/// `written` is exactly one response, with `response`'s status and (unless `head_only`) its body.
fn check_response(written: &[u8], response: &Response, head_only: bool) {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Response::new(&mut headers);
    let head = match parsed.parse(written) {
        Ok(httparse::Status::Complete(head)) => head,
        other => panic!(
            "not one response ({other:?}): {:?}",
            String::from_utf8_lossy(written)
        ),
    };
    assert_eq!(parsed.code, Some(response.status));
    let length = parsed
        .headers
        .iter()
        .find(|header| header.name.eq_ignore_ascii_case("content-length"))
        .map(|header| std::str::from_utf8(header.value).expect("ASCII"))
        .expect("a length");
    let length: usize = length.parse().expect("a number");
    assert_eq!(length, response.body.len() + 1, "the body and its newline");
    let body = &written[head..];
    if head_only {
        assert!(body.is_empty(), "no body after a HEAD");
    } else {
        assert_eq!(body.len(), length, "the length is the body's");
    }
}
