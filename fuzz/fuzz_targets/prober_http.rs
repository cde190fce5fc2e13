//! Arbitrary bytes as what an app answers the agent's httpGet probe with, through the prober as it
//! runs a pod's probe (`http::probe`: hyper's HTTP/1.1 client, the body read up to 10 KiB, the
//! redirects it follows and the verdict), each connection an in-memory stream whose far end sends
//! the app's bytes once it has the request: nothing panics; the verdict agrees with the status it
//! reports; a failure's message never carries the app's body; no more than 10 requests are made;
//! and every request the app receives is a well-formed GET with one Host, the kubelet's User-Agent
//! and `Connection: close`, whatever the app's `Location` said.
//!
//! The bytes after the first are the answers to the connections in turn, separated by
//! [`NEXT_CONNECTION`]; connections past the last answer get the last one again (a redirect to
//! itself loops). The first byte's bit 0 keeps the app's end open after its answer (instead of
//! closing it), so that an answer with no end waits for the probe's timeout; bit 1 gives the probe
//! its own Host header.
#![no_main]

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use k8s_openapi::{
    api::core::v1::{HTTPGetAction, HTTPHeader},
    apimachinery::pkg::util::intstr::IntOrString,
};
use libfuzzer_sys::fuzz_target;
use probe_bypass::{
    dial::StreamError,
    serve::prober::{
        Connector, Verdict,
        fuzzing::MAX_REQUESTS,
        http::{HttpProbe, probe},
    },
};
use tokio::{io::DuplexStream, task::JoinHandle};

mod app;

/// What separates the app's answers to successive connections.
const NEXT_CONNECTION: &[u8] = b"\n--next-connection--\n";

const USER_AGENT: &str = "kube-probe/1.31";

/// The app: each connection answered with the next of `answers`; what the prober sent on each is
/// kept.
struct App {
    answers: Vec<Vec<u8>>,
    keep_open: bool,
    connections: Mutex<Vec<JoinHandle<Vec<u8>>>>,
}

impl Connector for App {
    type Stream = DuplexStream;

    async fn connect(&self, _addr: SocketAddr) -> Result<DuplexStream, StreamError> {
        let mut connections = self.connections.lock().expect("not poisoned");
        let answer = self.answers[connections.len().min(self.answers.len() - 1)].clone();
        // Like an HTTP server, the app answers once it has the request's head.
        let (prober, served) = app::connection(answer, self.keep_open, is_head);
        connections.push(served);
        Ok(prober)
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, bytes)) = data.split_first() else {
        return;
    };
    let answers: Vec<Vec<u8>> = split(bytes, NEXT_CONNECTION).map(<[u8]>::to_vec).collect();
    let app = Arc::new(App {
        answers,
        keep_open: selector & 1 != 0,
        connections: Mutex::new(Vec::new()),
    });
    let host = (selector & 2 != 0).then(|| HTTPHeader {
        name: "Host".to_owned(),
        value: "shop.example".to_owned(),
    });
    let action = HTTPGetAction {
        port: IntOrString::Int(8080),
        path: Some("/healthz".to_owned()),
        http_headers: host.map(|host| vec![host]),
        ..HTTPGetAction::default()
    };
    let pod_ip = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    let http = HttpProbe::from_action(&action, &[], pod_ip, Duration::from_secs(1))
        .expect("a probe that runs");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a runtime");
    let (outcome, requests) = runtime.block_on(async {
        let outcome = probe(&*app, &http, USER_AGENT).await;
        let connections = std::mem::take(&mut *app.connections.lock().expect("not poisoned"));
        let mut requests = Vec::new();
        for connection in connections {
            // The prober has dropped its end: each app's read ends, or its answer waits forever.
            if let Ok(Ok(request)) = tokio::time::timeout(Duration::from_secs(60), connection).await
            {
                requests.push(request);
            }
        }
        (outcome, requests)
    });
    match (outcome.verdict, outcome.status) {
        (Verdict::Success, Some(code)) => assert!((200..=299).contains(&code), "{outcome:?}"),
        (Verdict::Warning, Some(code)) => assert!((300..=399).contains(&code), "{outcome:?}"),
        (Verdict::Failure, Some(code)) => {
            assert!(!(200..=399).contains(&code), "{outcome:?}");
            assert_eq!(
                outcome.message,
                format!("HTTP probe failed with status code {code}")
            );
        }
        (Verdict::Failure | Verdict::Timeout, None) => {}
        _ => panic!("a verdict without its status: {outcome:?}"),
    }
    assert!(
        requests.len() <= MAX_REQUESTS,
        "{} requests",
        requests.len()
    );
    for request in &requests {
        // An https redirect's connection starts with the TLS handshake.
        if request.first() != Some(&0x16) {
            check_request(request);
        }
    }
});

/// Whether `request` holds a request's head, or the start of a TLS handshake (which the app can
/// answer with anything).
fn is_head(request: &[u8]) -> bool {
    request.first() == Some(&0x16) || request.windows(4).any(|window| window == b"\r\n\r\n")
}

/// `bytes` cut at each `separator`.
fn split<'a>(bytes: &'a [u8], separator: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
    let mut rest = Some(bytes);
    std::iter::from_fn(move || {
        let current = rest?;
        match current
            .windows(separator.len())
            .position(|window| window == separator)
        {
            Some(at) => {
                rest = Some(&current[at + separator.len()..]);
                Some(&current[..at])
            }
            None => {
                rest = None;
                Some(current)
            }
        }
    })
}

fn check_request(request: &[u8]) {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut parsed = httparse::Request::new(&mut headers);
    let end = match parsed.parse(request) {
        Ok(httparse::Status::Complete(end)) => end,
        other => panic!(
            "the prober sent no request ({other:?}): {:?}",
            String::from_utf8_lossy(request)
        ),
    };
    assert_eq!(end, request.len(), "a GET has no body");
    assert_eq!(parsed.method, Some("GET"));
    let target = parsed.path.expect("a target");
    assert!(target.starts_with('/'), "{target:?}");
    let values = |name: &str| -> Vec<&[u8]> {
        parsed
            .headers
            .iter()
            .filter(|header| header.name.eq_ignore_ascii_case(name))
            .map(|header| header.value)
            .collect()
    };
    assert_eq!(values("host").len(), 1, "one Host");
    assert_eq!(values("user-agent"), [USER_AGENT.as_bytes()]);
    assert_eq!(values("connection"), [b"close"]);
}
