//! What the agent answers on 15901-15903 with `--serve-http-probes` (issue 6): the pod's httpGet
//! probes of one kind each (liveness, readiness, startup), rewritten to the agent.
//!
//! A request on the kind's port is one of:
//! - the osm shape, `GET /fsm-<kind>-probe/<container>`: the agent runs that container's original
//!   probe of that kind, from the pod's `probe-bypass.io/original-probes` annotation, with the
//!   kubelet's rules ([`crate::serve::prober::http`]) and the probe's own `timeoutSeconds`;
//! - the fsm shape, `GET /fsm-healthcheck` with `Original-Http-Port` and `Original-Http-Path`: the
//!   same, for the recorded original of that kind with that port and path; with none recorded (a
//!   pod FSM's own injector rewrote), a plain GET of that port and path, only to a port the pod's
//!   probes name, bounded by `--dial-timeout`;
//! - `GET /fsm-healthcheck` with `Original-Tcp-Port` (the fsm shape of an HTTPS probe): a TCP
//!   connect, as on 15904;
//! - a TLS handshake (an osm-shape HTTPS probe keeps its scheme and path): relayed untouched to the
//!   port of the pod's one HTTPS original of the kind, so the kubelet's own TLS probe reaches the
//!   app and gets exactly the app's answer ([`pass_through`]).
//!
//! The answer to a probe the agent ran is what makes the kubelet's verdict the one it would have
//! given the original ([`answer`]).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{api::core::v1::HTTPGetAction, apimachinery::pkg::util::intstr::IntOrString};
use probe_bypass_rewrite::{
    ProbeKind,
    contract::{
        HEALTHCHECK_PATH, HEALTHCHECK_PATHS, ORIGINAL_HTTP_PATH_HEADER, ORIGINAL_HTTP_PORT_HEADER,
        ORIGINAL_PROBES_ANNOTATION,
    },
};
use tokio::net::TcpStream;

use super::{
    Context, Outcome, Passthrough, Settings,
    handler::{self, HttpRoute, Rejection, Route, check_method, check_port, parse_port, reject},
    http::{Request, Response},
};
use crate::{
    netns::Netns,
    pod::{Pod, timeout_of},
    serve::prober::{
        self, DEFAULT_USER_AGENT, NetnsConnector, Protocol, Verdict,
        http::{HttpProbe, connect_first},
    },
};

/// The first byte of a TLS connection: a handshake record (the ClientHello). No HTTP/1 request
/// starts with it.
const TLS_HANDSHAKE: u8 = 0x16;

/// How long a relayed TLS probe may last past the probe's own timeout, by which the kubelet has
/// given up and closed its end.
const RELAY_GRACE: Duration = Duration::from_secs(1);

/// Decides what a plain HTTP request on the `kind` probe port asks of `pod`.
pub fn route(
    request: &Request,
    pod: &Pod,
    kind: ProbeKind,
    settings: &Settings,
) -> Result<Route, Rejection> {
    if let Some((asked, container)) = osm_path(&request.path) {
        check_method(request)?;
        if asked != kind {
            return Err(reject(
                Outcome::NotFound,
                404,
                format!(
                    "port {} answers {kind} probes; {asked} probes are on port {}",
                    kind.port(),
                    asked.port()
                ),
            ));
        }
        return recorded(pod, container, kind);
    }
    if HEALTHCHECK_PATHS.contains(&request.path.as_str()) {
        if request.values(ORIGINAL_HTTP_PORT_HEADER).is_empty() {
            // An HTTPS probe in the fsm shape: only a TCP connect, as on the healthcheck port.
            return handler::route(request, pod, settings.allow_any_port);
        }
        check_method(request)?;
        return fsm(request, pod, kind, settings);
    }
    Err(reject(
        Outcome::NotFound,
        404,
        format!(
            "no probe at {} on port {}; use {}/<container>, or {HEALTHCHECK_PATH} with \
             {ORIGINAL_HTTP_PORT_HEADER} and {ORIGINAL_HTTP_PATH_HEADER}",
            request.path,
            kind.port(),
            kind.path()
        ),
    ))
}

/// The kind and container an osm-shape path names: `/fsm-<kind>-probe/<container>`.
fn osm_path(path: &str) -> Option<(ProbeKind, &str)> {
    ProbeKind::ALL.into_iter().find_map(|kind| {
        let container = path.strip_prefix(kind.path())?.strip_prefix('/')?;
        Some((kind, container))
    })
}

/// The recorded `kind` probe of `container`, which must be an httpGet probe.
fn recorded(pod: &Pod, container: &str, kind: ProbeKind) -> Result<Route, Rejection> {
    let not_found = |why: String| reject(Outcome::NotFound, 404, format!("pod {}: {why}", pod.key));
    let Some(original) = pod.originals.get(container, kind) else {
        return Err(not_found(match &pod.originals_error {
            Some(error) => error.clone(),
            None => format!(
                "no {kind} probe of container {container:?} is recorded in its \
                 {ORIGINAL_PROBES_ANNOTATION} annotation"
            ),
        }));
    };
    let Some(action) = &original.probe().http_get else {
        return Err(not_found(format!(
            "the recorded {kind} probe of container {container:?} is not an httpGet probe"
        )));
    };
    let probe = HttpProbe::from_action(
        action,
        pod.ports_of(container),
        pod.ip,
        timeout_of(original.probe()),
    )
    .map_err(|error| {
        reject(
            Outcome::Error,
            503,
            format!("cannot run the recorded {kind} probe of container {container:?}: {error}"),
        )
    })?;
    Ok(http_route(container, kind, probe))
}

fn http_route(container: &str, kind: ProbeKind, probe: HttpProbe) -> Route {
    Route::Http(Box::new(HttpRoute {
        container: container.to_owned(),
        kind,
        probe,
    }))
}

/// The fsm shape: the original's port and path in headers.
fn fsm(
    request: &Request,
    pod: &Pod,
    kind: ProbeKind,
    settings: &Settings,
) -> Result<Route, Rejection> {
    let bad_request = |reason| reject(Outcome::BadRequest, 400, reason);
    let port = parse_port(
        ORIGINAL_HTTP_PORT_HEADER,
        &request.values(ORIGINAL_HTTP_PORT_HEADER),
    )
    .map_err(bad_request)?;
    // The rewriter (and FSM's injector) writes the original path as it was, empty when absent.
    let path = match request.values(ORIGINAL_HTTP_PATH_HEADER).as_slice() {
        [] => String::new(),
        [value] => String::from_utf8_lossy(value).trim().to_owned(),
        values => {
            return Err(bad_request(format!(
                "Header {ORIGINAL_HTTP_PATH_HEADER} appears {} times; send it once",
                values.len()
            )));
        }
    };
    // The pod's record first: it has the original's host, headers, scheme and timeout.
    let found = recorded_http(pod, kind).find(|(_, action, probe)| {
        probe.protocol() == Protocol::Http
            && probe.url.port == port
            && action.path.as_deref().unwrap_or_default() == path
    });
    if let Some((container, _, probe)) = found {
        return Ok(http_route(container, kind, probe));
    }
    check_port(pod, port, settings.allow_any_port)?;
    let action = HTTPGetAction {
        port: IntOrString::Int(port.into()),
        path: Some(path),
        ..HTTPGetAction::default()
    };
    let probe = HttpProbe::from_action(&action, &[], pod.ip, settings.dial_timeout)
        .map_err(|error| bad_request(error.to_string()))?;
    Ok(http_route("", kind, probe))
}

/// The pod's recorded httpGet probes of `kind` that can be run, each with its container and action.
fn recorded_http(
    pod: &Pod,
    kind: ProbeKind,
) -> impl Iterator<Item = (&str, &HTTPGetAction, HttpProbe)> {
    pod.originals
        .iter()
        .filter(move |(_, recorded, _)| *recorded == kind)
        .filter_map(|(container, _, original)| {
            let action = original.probe().http_get.as_ref()?;
            let probe = HttpProbe::from_action(
                action,
                pod.ports_of(container),
                pod.ip,
                timeout_of(original.probe()),
            )
            .ok()?;
            Some((container, action, probe))
        })
}

/// Runs the probe `route` names from inside the pod, with the kubelet's `user_agent`, counts it,
/// and answers.
pub async fn check(
    ctx: &Context,
    pod: &Pod,
    netns: &Arc<Netns>,
    route: &HttpRoute,
    user_agent: Option<&str>,
) -> (Outcome, Response) {
    let connector = NetnsConnector::new(ctx.worker.clone(), Arc::clone(netns));
    let user_agent = user_agent.unwrap_or(DEFAULT_USER_AGENT);
    let outcome = prober::http::probe(&connector, &route.probe, user_agent).await;
    ctx.metrics.prober(
        &pod.key,
        &route.container,
        Some(route.kind),
        route.probe.protocol(),
        &outcome,
    );
    answer(&outcome)
}

/// The answer that gets the kubelet's verdict on the original probe out of the kubelet:
/// - a success (200-299) or an unfollowed redirect (300-399): the app's status, so the kubelet
///   sees the same success, or the same success with a warning. Never a `Location`: the kubelet
///   would follow it to the agent's port.
/// - the app answered 400-599: that status.
/// - no answer the kubelet would pass (refused, TLS failed, too many redirects, a 1xx): 503.
/// - no answer within the probe's `timeoutSeconds`: 504. The kubelet, whose own timeout is the
///   same, has usually given up just before; either way it fails the probe, as it would have.
fn answer(outcome: &prober::Outcome) -> (Outcome, Response) {
    let message = outcome.message.clone();
    match (outcome.verdict, outcome.status) {
        (Verdict::Success | Verdict::Warning, status) => (
            Outcome::Success,
            Response::new(status.unwrap_or(200), message),
        ),
        (Verdict::Failure, Some(status @ 400..=599)) => {
            (Outcome::Failed, Response::new(status, message))
        }
        (Verdict::Failure, _) => (Outcome::Failed, Response::new(503, message)),
        (Verdict::Timeout, _) => (Outcome::Timeout, Response::new(504, message)),
    }
}

/// Whether the connection starts with a TLS handshake; `None` when nothing arrives within
/// `timeout`, or the connection closes first.
pub async fn starts_tls(stream: &TcpStream, timeout: Duration) -> Option<bool> {
    let mut first = [0u8; 1];
    match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
        Ok(Ok(1)) => Some(first[0] == TLS_HANDSHAKE),
        _ => None,
    }
}

/// Relays a TLS connection on the `kind` probe port to the port of the pod's HTTPS original of
/// that kind, from inside the pod, untouched: the kubelet's own HTTPS probe runs against the app,
/// and its verdict is the original's by construction. Only that port is ever relayed to. With no
/// such original, or two naming different ports (the osm shape cannot tell them apart; the rewriter
/// warns), the connection is closed, which fails the kubelet's probe.
///
/// The relay lasts at most the probe's `timeoutSeconds` and a second: the kubelet has given up by
/// then.
pub async fn pass_through(
    mut client: TcpStream,
    kind: ProbeKind,
    ctx: &Context,
    pod: &Pod,
    netns: &Arc<Netns>,
) {
    let (container, probe) = match https_target(pod, kind) {
        Ok(target) => target,
        Err(result) => {
            log::warn!(
                "{}: a TLS connection on the {kind} probe port {}: {}; closed",
                pod.key,
                kind.port(),
                describe(result)
            );
            ctx.metrics.passthrough(&pod.key, "", Some(kind), result);
            return;
        }
    };
    let connector = NetnsConnector::new(ctx.worker.clone(), Arc::clone(netns));
    let started = Instant::now();
    let relay = async {
        let mut upstream = match connect_first(&connector, &probe).await {
            Ok(upstream) => upstream,
            Err(error) => {
                log::debug!("{}: {kind} probe {}: {error}", pod.key, probe.url);
                return Passthrough::Refused;
            }
        };
        if let Err(error) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
            log::debug!(
                "{}: relaying the {kind} probe to {}: {error}",
                pod.key,
                probe.url
            );
        }
        Passthrough::Relayed
    };
    let result = tokio::time::timeout(probe.timeout + RELAY_GRACE, relay)
        .await
        .unwrap_or(Passthrough::Timeout);
    log::debug!(
        "{}: {kind} probe {} passed through: {} after {:?}",
        pod.key,
        probe.url,
        result.label(),
        started.elapsed()
    );
    ctx.metrics
        .passthrough(&pod.key, container, Some(kind), result);
}

/// The container and the probe whose port TLS on the `kind` probe port goes to.
fn https_target(pod: &Pod, kind: ProbeKind) -> Result<(&str, HttpProbe), Passthrough> {
    let mut targets: Vec<(&str, HttpProbe)> = recorded_http(pod, kind)
        .filter(|(_, _, probe)| probe.protocol() == Protocol::Https)
        .map(|(container, _, probe)| (container, probe))
        .collect();
    let Some((container, first)) = targets.pop() else {
        return Err(Passthrough::NoProbe);
    };
    let addr = |probe: &HttpProbe| (probe.url.host.clone(), probe.url.port);
    if targets.iter().any(|(_, other)| addr(other) != addr(&first)) {
        return Err(Passthrough::Ambiguous);
    }
    Ok((container, first))
}

fn describe(result: Passthrough) -> &'static str {
    match result {
        Passthrough::NoProbe => "the pod records no HTTPS probe of this kind to relay it to",
        Passthrough::Ambiguous => {
            "several containers' HTTPS probes of this kind name different ports, and TLS does not \
             say which one this is; rewrite the pod in the fsm style"
        }
        Passthrough::Relayed | Passthrough::Refused | Passthrough::Timeout => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use probe_bypass_rewrite::OriginalProbes;

    fn pod(originals: &str) -> Pod {
        Pod {
            probe_ports: [8080, 8443].into(),
            originals: OriginalProbes::parse(originals).expect("originals"),
            container_ports: [(
                "api".to_owned(),
                vec![k8s_openapi::api::core::v1::ContainerPort {
                    name: Some("web".into()),
                    container_port: 8080,
                    ..Default::default()
                }],
            )]
            .into(),
            ..Pod::for_tests()
        }
    }

    const ORIGINALS: &str = r#"{
        "api": {"liveness": {"httpGet": {"path": "/live", "port": "web"}, "timeoutSeconds": 3},
                "readiness": {"httpGet": {"path": "/tls", "port": 8443, "scheme": "HTTPS"}}},
        "worker": {"liveness": {"httpGet": {"path": "/w", "port": 9000}},
                   "readiness": {"tcpSocket": {"port": 9001}}}
    }"#;

    fn settings() -> Settings {
        Settings {
            port: 15904,
            serve_http_probes: true,
            allow_any_port: false,
            tcp_target: super::super::TcpTarget::PodIp,
            dial_timeout: Duration::from_secs(1),
            header_timeout: Duration::from_secs(1),
        }
    }

    fn request(path: &str, headers: &[(&'static str, &str)]) -> Request {
        Request {
            method: "GET".into(),
            path: path.into(),
            headers: headers
                .iter()
                .map(|(name, value)| (*name, value.as_bytes().to_vec()))
                .collect(),
        }
    }

    fn routed(
        path: &str,
        headers: &[(&'static str, &str)],
        kind: ProbeKind,
    ) -> Result<(String, String, Duration), (u16, String)> {
        match route(&request(path, headers), &pod(ORIGINALS), kind, &settings()) {
            Ok(Route::Http(route)) => Ok((
                route.container,
                route.probe.url.to_string(),
                route.probe.timeout,
            )),
            Ok(other) => Err((0, format!("{other:?}"))),
            Err(rejection) => Err((rejection.response.status, rejection.response.body)),
        }
    }

    #[test]
    fn osm_path_runs_the_containers_recorded_probe_of_the_ports_kind() {
        assert_eq!(
            routed("/fsm-liveness-probe/api", &[], ProbeKind::Liveness),
            Ok((
                "api".into(),
                "http://198.18.0.2:8080/live".into(),
                Duration::from_secs(3)
            ))
        );
        assert_eq!(
            routed("/fsm-liveness-probe/worker", &[], ProbeKind::Liveness),
            Ok((
                "worker".into(),
                "http://198.18.0.2:9000/w".into(),
                Duration::from_secs(1)
            ))
        );
        let (status, body) =
            routed("/fsm-liveness-probe/api", &[], ProbeKind::Readiness).expect_err("404");
        assert_eq!(status, 404);
        assert!(body.contains("liveness probes are on port 15901"), "{body}");
        let (status, body) =
            routed("/fsm-startup-probe/api", &[], ProbeKind::Startup).expect_err("404");
        assert_eq!(status, 404);
        assert!(
            body.contains("no startup probe of container \"api\""),
            "{body}"
        );
        let (status, body) =
            routed("/fsm-readiness-probe/worker", &[], ProbeKind::Readiness).expect_err("404");
        assert_eq!(status, 404);
        assert!(body.contains("not an httpGet probe"), "{body}");
        assert_eq!(
            routed("/healthz", &[], ProbeKind::Liveness).map_err(|e| e.0),
            Err(404)
        );
    }

    #[test]
    fn fsm_headers_run_the_recorded_probe_with_that_port_and_path_or_a_declared_port() {
        let headers = [
            (ORIGINAL_HTTP_PORT_HEADER, "8080"),
            (ORIGINAL_HTTP_PATH_HEADER, "/live"),
        ];
        assert_eq!(
            routed(HEALTHCHECK_PATH, &headers, ProbeKind::Liveness),
            Ok((
                "api".into(),
                "http://198.18.0.2:8080/live".into(),
                Duration::from_secs(3)
            ))
        );
        // Not recorded: a plain GET of a port the pod's probes name, bounded by --dial-timeout.
        let other_path = [
            (ORIGINAL_HTTP_PORT_HEADER, "8080"),
            (ORIGINAL_HTTP_PATH_HEADER, "/x"),
        ];
        assert_eq!(
            routed(HEALTHCHECK_PATH, &other_path, ProbeKind::Liveness),
            Ok((
                String::new(),
                "http://198.18.0.2:8080/x".into(),
                Duration::from_secs(1)
            ))
        );
        let undeclared = [
            (ORIGINAL_HTTP_PORT_HEADER, "22"),
            (ORIGINAL_HTTP_PATH_HEADER, "/"),
        ];
        assert_eq!(
            routed(HEALTHCHECK_PATH, &undeclared, ProbeKind::Liveness).map_err(|e| e.0),
            Err(403)
        );
        let bad = [(ORIGINAL_HTTP_PORT_HEADER, "http")];
        assert_eq!(
            routed(HEALTHCHECK_PATH, &bad, ProbeKind::Liveness).map_err(|e| e.0),
            Err(400)
        );
        // Original-Tcp-Port: the connect of the healthcheck.
        let tcp = route(
            &request(
                HEALTHCHECK_PATH,
                &[(
                    probe_bypass_rewrite::contract::ORIGINAL_TCP_PORT_HEADER,
                    "8443",
                )],
            ),
            &pod(ORIGINALS),
            ProbeKind::Readiness,
            &settings(),
        );
        assert_eq!(tcp, Ok(Route::Tcp(8443)));
    }

    #[test]
    fn tls_goes_to_the_one_https_original_of_the_kind() {
        let pod = pod(ORIGINALS);
        let (container, probe) = https_target(&pod, ProbeKind::Readiness).expect("target");
        assert_eq!((container, probe.url.port), ("api", 8443));
        assert_eq!(
            https_target(&pod, ProbeKind::Liveness).err(),
            Some(Passthrough::NoProbe)
        );
        let two = pod_with_two_https();
        assert_eq!(
            https_target(&two, ProbeKind::Readiness).err(),
            Some(Passthrough::Ambiguous)
        );
    }

    fn pod_with_two_https() -> Pod {
        pod(r#"{
            "a": {"readiness": {"httpGet": {"port": 8443, "scheme": "HTTPS"}}},
            "b": {"readiness": {"httpGet": {"port": 9443, "scheme": "HTTPS"}}}
        }"#)
    }

    #[test]
    fn answers_give_the_kubelet_the_originals_verdict() {
        let outcome = |verdict, status| prober::Outcome {
            verdict,
            status,
            message: "why".into(),
            latency: Duration::ZERO,
        };
        for (verdict, status, expected) in [
            (Verdict::Success, Some(200), 200),
            (Verdict::Success, Some(204), 204),
            (Verdict::Warning, Some(302), 302),
            (Verdict::Failure, Some(500), 500),
            (Verdict::Failure, Some(404), 404),
            (Verdict::Failure, Some(101), 503),
            (Verdict::Failure, None, 503),
            (Verdict::Timeout, None, 504),
        ] {
            let (_, response) = answer(&outcome(verdict, status));
            assert_eq!(response.status, expected, "{verdict:?} {status:?}");
        }
    }
}
