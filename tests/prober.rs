//! The prober against real apps in a real pod network namespace: each probe is run from inside the
//! pod by the agent's own connector, and must end as the kubelet's would
//! (`shared/reference/peers.md` §5, quoted in each case's `kubelet` column). Then the gRPC probe
//! end to end: the agent binary, a rewritten gRPC probe sent to the healthcheck as the kubelet
//! sends it.

use std::{
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use probe_bypass::serve::prober::{
    NetnsConnector, Outcome, Verdict,
    grpc::{self, GrpcProbe},
    http::{self, HttpProbe, MAX_BODY},
};
use probe_bypass_testing::require_privileges;
use probe_bypass_testing::{
    agent::{Agent, ManifestDir},
    kubelet,
    pod::TestPod,
    probe_apps::{
        self, AppPod, BIG_BODY, CLOSED_PORT, GRPC_PORT, HTTP_PORT, HTTPS_PORT, Redirects,
    },
};

/// What the kubelet 1.31 sends as its User-Agent; the agent passes on the kubelet's own.
const USER_AGENT: &str = "kube-probe/1.31";

/// The timeout of the probes that must time out: well under the apps' [`probe_apps::SLOW`].
const SHORT_TIMEOUT: Duration = Duration::from_millis(500);

fn pod() -> AppPod {
    AppPod::start()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap_or_else(|error| panic!("tokio runtime: {error}"))
}

fn http_probe(pod: &TestPod, scheme: &str, port: u16, path: &str, timeout: Duration) -> HttpProbe {
    let action = k8s_openapi::api::core::v1::HTTPGetAction {
        scheme: Some(scheme.to_owned()),
        port: k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port.into()),
        path: Some(path.to_owned()),
        ..Default::default()
    };
    HttpProbe::from_action(&action, &[], pod.ip.into(), timeout)
        .unwrap_or_else(|error| panic!("{scheme} {port} {path}: {error}"))
}

async fn run_http(connector: &NetnsConnector, probe: &HttpProbe) -> Outcome {
    http::probe(connector, probe, USER_AGENT).await
}

/// A timeout ends the probe at its timeout, not at the app's pace: no sooner than the timeout,
/// and before the slow app would have answered ([`probe_apps::SLOW`], ten times the timeouts
/// here). Only the order is checked, not how close to the timeout it ended: that depends on the
/// machine's load.
fn assert_timed_out_on_time(outcome: &Outcome, timeout: Duration) {
    assert_eq!(outcome.verdict, Verdict::Timeout, "{outcome:?}");
    assert!(
        outcome.latency >= timeout && outcome.latency < probe_apps::SLOW,
        "timed out after {:?}, expected {timeout:?} (the app answers after {:?}): {outcome:?}",
        outcome.latency,
        probe_apps::SLOW
    );
}

#[test]
fn http_and_https_probes_end_as_the_kubelets_would() {
    require_privileges!();
    let apps = pod();
    let second = Duration::from_secs(1);
    // What the kubelet gets for each probe, and the rule of peers.md §5 that says so.
    // (scheme, port, path, timeout, the kubelet's verdict and status, why)
    #[rustfmt::skip]
    let cases = [
        ("HTTP", HTTP_PORT, "/ok", second, Verdict::Success, Some(200), "200-399 is success"),
        ("HTTP", HTTP_PORT, "/fail", second, Verdict::Failure, Some(500), "400 and above fail"),
        ("HTTP", HTTP_PORT, "/big", second, Verdict::Success, Some(200), "at most 10 KiB of body read"),
        ("HTTP", HTTP_PORT, "/redirect-same", second, Verdict::Success, Some(200), "followed to the same host"),
        ("HTTP", HTTP_PORT, "/redirect-https", second, Verdict::Success, Some(200), "same host name, other scheme and port"),
        ("HTTP", HTTP_PORT, "/redirect-other", second, Verdict::Warning, Some(302), "unfollowed 3xx: a warning, a success"),
        ("HTTP", HTTP_PORT, "/loop", second, Verdict::Failure, None, "up to 10 redirects"),
        ("HTTP", HTTP_PORT, "/slow", SHORT_TIMEOUT, Verdict::Timeout, None, "timeoutSeconds bounds the answer"),
        ("HTTP", HTTP_PORT, "/slow-body", SHORT_TIMEOUT, Verdict::Timeout, None, "timeoutSeconds bounds the body"),
        ("HTTP", CLOSED_PORT, "/ok", second, Verdict::Failure, None, "a refused connect fails"),
        ("HTTPS", HTTPS_PORT, "/ok", second, Verdict::Success, Some(200), "TLS not verified"),
        ("HTTPS", HTTPS_PORT, "/fail", second, Verdict::Failure, Some(500), "400 and above fail"),
        ("HTTPS", HTTPS_PORT, "/redirect-same", second, Verdict::Success, Some(200), "followed to the same host"),
        ("HTTPS", HTTPS_PORT, "/slow", SHORT_TIMEOUT, Verdict::Timeout, None, "timeoutSeconds bounds TLS and answer"),
    ];
    let connector = apps.pod.connector();
    runtime().block_on(async {
        for (scheme, port, path, timeout, verdict, status, kubelet) in cases {
            let probe = http_probe(&apps.pod, scheme, port, path, timeout);
            let outcome = run_http(&connector, &probe).await;
            assert_eq!(
                (outcome.verdict, outcome.status),
                (verdict, status),
                "{} (kubelet: {kubelet}): {outcome:?}",
                probe.url
            );
            assert_eq!(outcome.verdict.passed(), verdict.passed());
            if verdict == Verdict::Timeout {
                assert_timed_out_on_time(&outcome, timeout);
            }
        }
    });
}

#[test]
fn http_probe_sends_the_kubelets_headers_and_the_probes_own() {
    require_privileges!();
    let apps = pod();
    let mut probe = http_probe(
        &apps.pod,
        "HTTP",
        HTTP_PORT,
        "/ok?from=probe",
        Duration::from_secs(1),
    );
    probe.headers = vec![
        ("Host".into(), "shop.example".into()),
        ("X-Probe".into(), "1".into()),
    ];
    let outcome = runtime().block_on(run_http(&apps.pod.connector(), &probe));
    assert_eq!(outcome.verdict, Verdict::Success, "{outcome:?}");
    let seen = apps.http.seen_at("/ok?from=probe");
    let [request] = seen.as_slice() else {
        panic!("one request expected: {seen:?}");
    };
    for (name, value) in [
        ("user-agent", USER_AGENT),
        ("accept", "*/*"),
        ("host", "shop.example"),
        ("x-probe", "1"),
        ("connection", "close"),
    ] {
        assert_eq!(request.header(name), Some(value), "{name}: {request:?}");
    }
}

#[test]
fn redirect_loop_fails_after_ten_requests() {
    require_privileges!();
    let apps = pod();
    let probe = http_probe(
        &apps.pod,
        "HTTP",
        HTTP_PORT,
        "/loop",
        Duration::from_secs(2),
    );
    let outcome = runtime().block_on(run_http(&apps.pod.connector(), &probe));
    assert_eq!(outcome.verdict, Verdict::Failure, "{outcome:?}");
    assert!(
        outcome.message.contains("stopped after 10 redirects"),
        "{outcome:?}"
    );
    assert_eq!(apps.http.seen_at("/loop").len(), 10);
}

#[test]
fn redirect_to_another_host_is_not_followed_and_its_body_is_read_to_10_kib() {
    require_privileges!();
    let apps = pod();
    let probe = http_probe(
        &apps.pod,
        "HTTP",
        HTTP_PORT,
        "/redirect-other",
        Duration::from_secs(1),
    );
    let outcome = runtime().block_on(run_http(&apps.pod.connector(), &probe));
    assert_eq!(
        (outcome.verdict, outcome.status),
        (Verdict::Warning, Some(302)),
        "{}",
        outcome.message
    );
    assert!(
        outcome
            .message
            .contains(&format!("Location http://127.0.0.1:{HTTP_PORT}/ok")),
        "{}",
        &outcome.message[..200]
    );
    let body_read = outcome.message.bytes().filter(|b| *b == b'x').count();
    assert_eq!(body_read, MAX_BODY, "the app sent {BIG_BODY} bytes");
    assert!(
        apps.http.seen_at("/ok").is_empty(),
        "the redirect was followed"
    );
}

#[test]
fn probe_connects_from_inside_the_pod() {
    require_privileges!();
    let pod = TestPod::new();
    // Reachable only from inside the pod's network namespace.
    let redirects = Redirects {
        pod_ip: pod.ip.into(),
        https_port: HTTPS_PORT,
        http_port: HTTP_PORT,
    };
    let _app = probe_apps::http(
        &pod,
        SocketAddr::new(Ipv4Addr::LOCALHOST.into(), HTTP_PORT),
        redirects,
    );
    let action = k8s_openapi::api::core::v1::HTTPGetAction {
        host: Some("127.0.0.1".into()),
        port: k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(HTTP_PORT.into()),
        path: Some("/ok".into()),
        ..Default::default()
    };
    let probe = HttpProbe::from_action(&action, &[], pod.ip.into(), Duration::from_secs(1))
        .expect("valid probe");
    let outcome = runtime().block_on(run_http(&pod.connector(), &probe));
    assert_eq!(outcome.verdict, Verdict::Success, "{outcome:?}");
}

#[test]
fn grpc_probes_end_as_the_kubelets_would() {
    require_privileges!();
    let apps = pod();
    let second = Duration::from_secs(1);
    // (port, service, timeout, the kubelet's verdict, words of the message, why)
    #[rustfmt::skip]
    let cases = [
        (GRPC_PORT, "", second, Verdict::Success, "SERVING", "only SERVING passes"),
        (GRPC_PORT, "ready", second, Verdict::Success, "SERVING", "only SERVING passes"),
        (GRPC_PORT, "down", second, Verdict::Failure, "NOT_SERVING", "only SERVING passes"),
        (GRPC_PORT, "unset", second, Verdict::Failure, "UNKNOWN", "only SERVING passes"),
        (GRPC_PORT, "nope", second, Verdict::Failure, "NOT_FOUND", "a gRPC error status fails"),
        (GRPC_PORT, "slow", SHORT_TIMEOUT, Verdict::Timeout, "no answer within", "timeoutSeconds bounds the call"),
        (CLOSED_PORT, "", second, Verdict::Failure, "refused", "a refused connect fails"),
        (HTTP_PORT, "", second, Verdict::Failure, "HTTP/2", "an HTTP/1 server is no gRPC server"),
    ];
    let connector = apps.pod.connector();
    runtime().block_on(async {
        for (port, service, timeout, verdict, words, kubelet) in cases {
            let probe = GrpcProbe {
                addr: SocketAddr::new(apps.pod.ip.into(), port),
                service: service.into(),
                timeout,
            };
            let outcome = grpc::probe(&connector, &probe, USER_AGENT).await;
            assert_eq!(
                outcome.verdict, verdict,
                "{service:?} on {port} (kubelet: {kubelet}): {outcome:?}"
            );
            assert!(
                outcome.message.contains(words),
                "{words:?} in {:?}",
                outcome.message
            );
            if verdict == Verdict::Timeout {
                assert_timed_out_on_time(&outcome, timeout);
            }
        }
    });
    let seen = apps.grpc.seen_at("ready");
    assert_eq!(seen[0].header("user-agent"), Some(USER_AGENT), "{seen:?}");
}

/// The manifest of a pod whose readiness probe is a gRPC probe of `port`, rewritten to the
/// healthcheck.
fn rewritten_grpc_probe_manifest(pod: &TestPod, name: &str, port: u16) -> String {
    let mut manifest: serde_json::Value =
        serde_json::from_str(&pod.manifest(name, &[])).unwrap_or_else(|e| panic!("manifest: {e}"));
    manifest["spec"]["containers"] = serde_json::json!([{
        "name": "app",
        "image": "app",
        "readinessProbe": {"httpGet": {
            "path": "/probe-bypass-grpc",
            "port": 15904,
            "httpHeaders": [{"name": "Original-Grpc-Port", "value": port.to_string()}],
        }},
    }]);
    manifest.to_string()
}

/// The request the kubelet sends for that rewritten probe, with `service` if any.
fn grpc_request(addr: SocketAddr, port: Option<u16>, service: Option<&str>) -> Vec<u8> {
    let mut text = format!(
        "GET /probe-bypass-grpc HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: {USER_AGENT}\r\nAccept: */*\r\n"
    );
    if let Some(port) = port {
        text.push_str(&format!("Original-Grpc-Port: {port}\r\n"));
    }
    if let Some(service) = service {
        text.push_str(&format!("Original-Grpc-Service: {service}\r\n"));
    }
    text.push_str("Connection: close\r\n\r\n");
    text.into_bytes()
}

#[test]
fn grpc_probe_on_the_healthcheck_runs_the_health_check_inside_the_pod() {
    require_privileges!();
    let apps = pod();
    let dir = ManifestDir::new();
    dir.write(
        "grpc.json",
        &rewritten_grpc_probe_manifest(&apps.pod, "grpc", GRPC_PORT),
    );
    let agent = Agent::start(&dir.path, &[]);
    agent.wait_ready(200, Duration::from_secs(10));
    let addr = apps.pod.healthcheck();
    let ask = |port, service| kubelet::send(addr, &grpc_request(addr, port, service));

    let serving = ask(Some(GRPC_PORT), Some("ready"));
    assert_eq!(serving.status, 200, "{serving:?}");
    assert!(serving.body.ends_with("SERVING"), "{serving:?}");
    let overall = ask(Some(GRPC_PORT), None);
    assert_eq!(overall.status, 200, "{overall:?}");
    let down = ask(Some(GRPC_PORT), Some("down"));
    assert_eq!(down.status, 503, "{down:?}");
    assert!(down.body.contains("NOT_SERVING"), "{down:?}");
    let missing = ask(None, Some("ready"));
    assert_eq!(
        (missing.status, missing.body.as_str()),
        (400, "Header Original-Grpc-Port not found in request")
    );
    let undeclared = ask(Some(HTTP_PORT), None);
    assert_eq!(undeclared.status, 403, "{undeclared:?}");
    assert!(
        undeclared
            .body
            .contains(&format!("probed ports: {GRPC_PORT}")),
        "{undeclared:?}"
    );

    // The app saw the kubelet's User-Agent, and only the checks that were allowed.
    let seen = apps.grpc.seen();
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(
        seen.iter()
            .all(|s| s.header("user-agent") == Some(USER_AGENT))
    );

    let (_, metrics) = agent.get("/metrics").expect("metrics");
    let labels =
        "namespace=\"test\",pod=\"grpc\",container=\"\",probe=\"unknown\",protocol=\"grpc\"";
    for line in [
        format!("probe_bypass_prober_probes_total{{{labels},result=\"success\"}} 2"),
        format!("probe_bypass_prober_probes_total{{{labels},result=\"failure\"}} 1"),
        format!("probe_bypass_prober_probe_seconds_count{{{labels}}} 3"),
        "probe_bypass_healthcheck_probes_total{namespace=\"test\",pod=\"grpc\",result=\"failed\"} 1"
            .to_owned(),
    ] {
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
}
