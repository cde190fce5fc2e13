//! `probe-bypass run --serve-http-probes` end to end: pods with an HTTP, an HTTPS and a gRPC app;
//! their probes rewritten by the real rewriter in both styles; the agent binary serving them; each
//! rewritten probe sent from the host as the kubelet sends it (the prober's own HTTP client, from
//! the host's network namespace, with the kubelet's User-Agent, to the scheme, port, path and
//! headers of the rewritten manifest). Each must end as the original probe ends when the same
//! client runs it directly against the app from inside the pod, and as the kubelet's rules
//! (`shared/reference/peers.md` §5) say, written in each case: both sides cannot be wrong together.
//!
//! The agent runs with `--datapath none`: nothing stands between the host and the pod here. That
//! the eBPF datapath lets the kubelet's connections to 15901-15904 past the sidecar is tested in
//! `tests/datapath.rs`.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use futures::future::join_all;
use k8s_openapi::api::core::v1::{ContainerPort, Probe};
use probe_bypass::pod::timeout_of;
use probe_bypass::serve::prober::{
    Connector as _, NetnsConnector, Outcome, Verdict,
    grpc::{self, GrpcProbe},
    http::{self, HttpProbe},
};
use probe_bypass_rewrite::{ProbeKind, Style, ports::resolve_port, rewrite_in_place};
use probe_bypass_testing::require_privileges;
use probe_bypass_testing::{
    agent::{Agent, ManifestDir},
    kubelet,
    pod::TestPod,
    probe_apps::{AppPod, CLOSED_PORT, GRPC_PORT, HTTP_PORT, HTTPS_PORT, HostConnector, SLOW},
};
use serde_json::{Value, json};

/// What the kubelet 1.31 sends as its User-Agent.
const USER_AGENT: &str = "kube-probe/1.31";

const SERVE: &str = "--serve-http-probes";

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().unwrap_or_else(|error| panic!("tokio runtime: {error}"))
}

/// The ports every test container declares, so that probes can name them.
fn declared_ports() -> Value {
    json!([
        {"name": "http", "containerPort": HTTP_PORT},
        {"name": "https", "containerPort": HTTPS_PORT},
        {"name": "grpc", "containerPort": GRPC_PORT},
    ])
}

fn http_get(scheme: &str, port: Value, path: &str) -> Value {
    json!({"httpGet": {"scheme": scheme, "port": port, "path": path}, "timeoutSeconds": 1})
}

/// The manifest of a pod at `pod` named `name`, with `probes` (container, kind, probe), rewritten
/// in `style` by the rewriter, which must have nothing to warn about.
fn rewritten_manifest(
    pod: &TestPod,
    name: &str,
    probes: &[(String, ProbeKind, Value)],
    style: Style,
) -> Value {
    let mut manifest: Value =
        serde_json::from_str(&pod.manifest(name, &[])).unwrap_or_else(|e| panic!("manifest: {e}"));
    let containers: Vec<Value> = probes
        .iter()
        .map(|(container, kind, probe)| {
            json!({
                "name": container,
                "image": "app",
                "ports": declared_ports(),
                kind.field(): probe,
            })
        })
        .collect();
    manifest["spec"]["containers"] = containers.into();
    let warnings = rewrite_in_place(&mut manifest, style)
        .unwrap_or_else(|error| panic!("rewrite {name}: {error}"));
    assert!(warnings.is_empty(), "{name}: {warnings:?}");
    manifest
}

/// The `kind` probe of `container` in a manifest.
fn probe_in(manifest: &Value, container: &str, kind: ProbeKind) -> Probe {
    let containers = manifest["spec"]["containers"]
        .as_array()
        .unwrap_or_else(|| panic!("no containers in {manifest}"));
    let found = containers
        .iter()
        .find(|c| c["name"] == container)
        .unwrap_or_else(|| panic!("container {container}"));
    serde_json::from_value(found[kind.field()].clone())
        .unwrap_or_else(|e| panic!("{container} {kind}: {e}"))
}

/// Runs a rewritten probe (an httpGet, without `host`) as the kubelet does: from the host, to the
/// pod IP.
async fn as_the_kubelet(pod_ip: IpAddr, rewritten: &Probe) -> Outcome {
    let action = rewritten
        .http_get
        .as_ref()
        .unwrap_or_else(|| panic!("not rewritten to an httpGet: {rewritten:?}"));
    assert_eq!(action.host, None, "the kubelet must probe the pod IP");
    let probe = HttpProbe::from_action(action, &[], pod_ip, timeout_of(rewritten))
        .unwrap_or_else(|e| panic!("{e}"));
    http::probe(&HostConnector, &probe, USER_AGENT).await
}

/// Runs an original probe directly against the app, from inside the pod, as the kubelet would
/// without a mesh in the way.
async fn directly(
    connector: &NetnsConnector,
    pod_ip: IpAddr,
    ports: &[ContainerPort],
    original: &Probe,
) -> Outcome {
    let timeout = timeout_of(original);
    if let Some(action) = &original.http_get {
        let probe = HttpProbe::from_action(action, ports, pod_ip, timeout)
            .unwrap_or_else(|e| panic!("{e}"));
        return http::probe(connector, &probe, USER_AGENT).await;
    }
    if let Some(action) = &original.grpc {
        let probe =
            GrpcProbe::from_action(action, pod_ip, timeout).unwrap_or_else(|e| panic!("{e}"));
        return grpc::probe(connector, &probe, USER_AGENT).await;
    }
    let tcp = original
        .tcp_socket
        .as_ref()
        .unwrap_or_else(|| panic!("no handler in {original:?}"));
    let port = resolve_port(&tcp.port, ports).unwrap_or_else(|e| panic!("{e}"));
    let started = Instant::now();
    let connected =
        tokio::time::timeout(timeout, connector.connect(SocketAddr::new(pod_ip, port))).await;
    let (verdict, message) = match connected {
        Ok(Ok(_)) => (Verdict::Success, "connected".to_owned()),
        Ok(Err(error)) => (Verdict::Failure, error.to_string()),
        Err(_) => (Verdict::Timeout, "no answer".to_owned()),
    };
    Outcome {
        verdict,
        status: None,
        message,
        latency: started.elapsed(),
    }
}

fn container_ports() -> Vec<ContainerPort> {
    serde_json::from_value(declared_ports()).unwrap_or_else(|e| panic!("ports: {e}"))
}

/// One original probe, and what the kubelet makes of it.
struct Case {
    name: &'static str,
    original: Value,
    /// The kubelet's verdict on the original probe, run against the app without a mesh.
    kubelet: Verdict,
    /// The status the kubelet's last response has (HTTP and HTTPS probes).
    status: Option<u16>,
    /// The rule of peers.md §5 that gives that verdict.
    why: &'static str,
    /// The fsm shape of an HTTPS probe checks only a TCP connect (docs/probe-rewriting.md): what
    /// its rewritten probe ends with, where that differs from the original's.
    fsm_tcp_only: Option<Verdict>,
}

#[rustfmt::skip]
fn cases() -> Vec<Case> {
    use Verdict::{Failure, Success, Timeout, Warning};
    let case = |name, original, kubelet, status, why| Case { name, original, kubelet, status, why, fsm_tcp_only: None };
    let https = |name, port: u16, path, kubelet, status, why, tcp| Case {
        fsm_tcp_only: Some(tcp),
        ..case(name, http_get("HTTPS", port.into(), path), kubelet, status, why)
    };
    vec![
        case("http ok", http_get("HTTP", "http".into(), "/ok"), Success, Some(200), "200-399 is success"),
        case("http 500", http_get("HTTP", HTTP_PORT.into(), "/fail"), Failure, Some(500), "400 and above fail"),
        case("http refused", http_get("HTTP", CLOSED_PORT.into(), "/ok"), Failure, None, "a refused connect fails"),
        case("http timeout", http_get("HTTP", HTTP_PORT.into(), "/slow"), Timeout, None, "timeoutSeconds bounds the answer"),
        case("http redirect, same host", http_get("HTTP", HTTP_PORT.into(), "/redirect-same"), Success, Some(200), "redirects to the same host are followed"),
        case("http redirect, other host", http_get("HTTP", HTTP_PORT.into(), "/redirect-other"), Warning, Some(302), "a redirect to another host is not followed: a success with a warning"),
        https("https ok", HTTPS_PORT, "/ok", Success, Some(200), "TLS is not verified", Success),
        https("https 500", HTTPS_PORT, "/fail", Failure, Some(500), "400 and above fail", Success),
        https("https refused", CLOSED_PORT, "/ok", Failure, None, "a refused connect fails", Failure),
        https("https timeout", HTTPS_PORT, "/slow", Timeout, None, "timeoutSeconds bounds TLS and answer", Success),
        https("https redirect, same host", HTTPS_PORT, "/redirect-same", Success, Some(200), "redirects to the same host are followed", Success),
        case("tcp open", json!({"tcpSocket": {"port": HTTP_PORT}, "timeoutSeconds": 1}), Success, None, "a connect that succeeds passes"),
        case("tcp refused", json!({"tcpSocket": {"port": CLOSED_PORT}, "timeoutSeconds": 1}), Failure, None, "a refused connect fails"),
        case("grpc slow, within its timeout", json!({"grpc": {"port": GRPC_PORT, "service": "slow"}, "timeoutSeconds": 6}), Success, None, "the probe's own timeoutSeconds bounds the call, not the agent's --dial-timeout"),
        case("grpc serving", json!({"grpc": {"port": GRPC_PORT}, "timeoutSeconds": 1}), Success, None, "only SERVING passes"),
        case("grpc not serving", json!({"grpc": {"port": GRPC_PORT, "service": "down"}, "timeoutSeconds": 1}), Failure, None, "only SERVING passes"),
        case("grpc timeout", json!({"grpc": {"port": GRPC_PORT, "service": "slow"}, "timeoutSeconds": 1}), Timeout, None, "timeoutSeconds bounds the call"),
        case("grpc refused", json!({"grpc": {"port": CLOSED_PORT}, "timeoutSeconds": 1}), Failure, None, "a refused connect fails"),
    ]
}

impl Case {
    fn is_http(&self) -> bool {
        self.original.get("httpGet").is_some()
    }

    fn is_https(&self) -> bool {
        self.original["httpGet"]["scheme"] == "HTTPS"
    }

    /// What the rewritten probe must end with, in `style`.
    fn rewritten_verdict(&self, style: Style) -> Verdict {
        match (style, self.fsm_tcp_only) {
            (Style::Fsm, Some(tcp)) => tcp,
            _ => self.kubelet,
        }
    }
}

/// Where a case's probe is: pod `pod` (of its style), container `c<index>`, kind `kind`. Each pod
/// holds three cases, one of each kind, so that every probe port is exercised and no pod has two
/// HTTPS probes of one kind (which the osm shape cannot tell apart).
struct Slot {
    pod: usize,
    container: String,
    kind: ProbeKind,
}

fn slot(index: usize) -> Slot {
    Slot {
        pod: index / 3,
        container: format!("c{index}"),
        kind: ProbeKind::ALL[index % 3],
    }
}

fn style_name(style: Style) -> &'static str {
    match style {
        Style::Osm => "osm",
        Style::Fsm => "fsm",
    }
}

#[test]
fn every_rewritten_probe_ends_as_the_original_would_for_the_kubelet() {
    require_privileges!();
    let cases = cases();
    let styles = [Style::Osm, Style::Fsm];
    let pods_per_style = cases.len().div_ceil(3);
    let dir = ManifestDir::new();
    // (style, pod index) → the pod with its apps, and its rewritten manifest.
    let mut pods: Vec<(Style, AppPod, Value)> = Vec::new();
    for style in styles {
        for pod_index in 0..pods_per_style {
            let apps = AppPod::start();
            let name = format!("{}-{pod_index}", style_name(style));
            let probes: Vec<(String, ProbeKind, Value)> = (0..cases.len())
                .filter(|index| slot(*index).pod == pod_index)
                .map(|index| {
                    let Slot {
                        container, kind, ..
                    } = slot(index);
                    (container, kind, cases[index].original.clone())
                })
                .collect();
            let manifest = rewritten_manifest(&apps.pod, &name, &probes, style);
            dir.write(&format!("{name}.json"), &manifest.to_string());
            pods.push((style, apps, manifest));
        }
    }
    let agent = Agent::start(&dir.path, &[SERVE]);
    agent.wait_ready(200, Duration::from_secs(10));

    let ports = container_ports();
    let runs = pods
        .iter()
        .enumerate()
        .flat_map(|(at, (style, apps, manifest))| {
            let pod_index = at % pods_per_style;
            let ports = &ports;
            cases
                .iter()
                .enumerate()
                .filter(move |(index, _)| slot(*index).pod == pod_index)
                .map(move |(index, case)| async move {
                    let Slot {
                        container, kind, ..
                    } = slot(index);
                    let original: Probe =
                        serde_json::from_value(case.original.clone()).expect("original probe");
                    let rewritten = probe_in(manifest, &container, kind);
                    let ip = IpAddr::V4(apps.pod.ip);
                    let connector = apps.pod.connector();
                    let (direct, relayed) = tokio::join!(
                        directly(&connector, ip, ports, &original),
                        as_the_kubelet(ip, &rewritten)
                    );
                    (*style, at, index, direct, relayed)
                })
        });
    let results = runtime().block_on(join_all(runs));
    assert_eq!(results.len(), cases.len() * styles.len());

    let mut failures = Vec::new();
    let mut lines = Vec::new();
    for (style, at, index, direct, relayed) in &results {
        let case = &cases[*index];
        let Slot {
            container, kind, ..
        } = slot(*index);
        let pod = pods_name(*style, *at % pods_per_style);
        let label = format!(
            "{} {} ({kind} probe of {pod}/{container}; kubelet: {})",
            style_name(*style),
            case.name,
            case.why
        );
        match check(case, *style, direct, relayed) {
            Err(why) => failures.push(format!("{label}: {why}")),
            Ok(()) => lines.extend(
                expected_metric(case, *style, &pod, &container, kind, direct)
                    .map(|line| (label, line)),
            ),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The agent's own timeouts may end a moment after the kubelet-like client's.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let metrics = agent.get("/metrics").expect("metrics").1;
        let missing: Vec<String> = lines
            .iter()
            .filter(|(_, line)| !metrics.contains(line.as_str()))
            .map(|(label, line)| format!("{label}: no {line}"))
            .collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{}\nin /metrics:\n{metrics}",
            missing.join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pods_name(style: Style, pod_index: usize) -> String {
    format!("{}-{pod_index}", style_name(style))
}

/// Whether the original (run directly) and the rewritten probe (run as the kubelet) both end as
/// the case says.
fn check(case: &Case, style: Style, direct: &Outcome, relayed: &Outcome) -> Result<(), String> {
    if direct.verdict != case.kubelet {
        return Err(format!(
            "the original probe, run directly, ended {direct:?}"
        ));
    }
    if case.is_http() && direct.status != case.status {
        return Err(format!(
            "the original probe got status {:?}: {direct:?}",
            direct.status
        ));
    }
    let expected = case.rewritten_verdict(style);
    let same = match expected {
        // The kubelet's own timeout and the agent's are the same: either ends it, both fail it.
        Verdict::Timeout => matches!(relayed.verdict, Verdict::Timeout | Verdict::Failure),
        verdict => relayed.verdict == verdict,
    };
    if !same || relayed.verdict.passed() != expected.passed() {
        return Err(format!(
            "the rewritten probe ended {relayed:?}, expected {expected:?}"
        ));
    }
    let original: Probe =
        serde_json::from_value(case.original.clone()).unwrap_or_else(|e| panic!("{e}"));
    // Ended by the probe's own timeout, not at the slow app's pace. Only the order is checked:
    // how close to the timeout it ends depends on the machine's load.
    let timeout = timeout_of(&original);
    if relayed.latency >= SLOW.max(timeout + Duration::from_secs(1)) {
        return Err(format!(
            "the rewritten probe took {:?}, its timeout is {timeout:?}",
            relayed.latency
        ));
    }
    let passes_status = case.is_http() && case.fsm_tcp_only.is_none_or(|_| style == Style::Osm);
    if passes_status && case.status.is_some() && relayed.status != case.status {
        return Err(format!(
            "the rewritten probe got status {:?}, the app's was {:?}",
            relayed.status, case.status
        ));
    }
    Ok(())
}

/// The line of `/metrics` that counts the case's probe, where the agent knows its container: the
/// prober's count of an HTTP probe it ran, and the relay of an osm-shape HTTPS probe.
fn expected_metric(
    case: &Case,
    style: Style,
    pod: &str,
    container: &str,
    kind: ProbeKind,
    direct: &Outcome,
) -> Option<String> {
    let labels =
        format!("namespace=\"test\",pod=\"{pod}\",container=\"{container}\",probe=\"{kind}\"");
    match (case.is_http(), case.is_https(), style) {
        (true, false, _) => Some(format!(
            "probe_bypass_prober_probes_total{{{labels},protocol=\"http\",result=\"{}\"}} 1",
            direct.verdict.label()
        )),
        (true, true, Style::Osm) => {
            let result = if case.status.is_some() || case.kubelet == Verdict::Timeout {
                "relayed"
            } else {
                "refused"
            };
            Some(format!(
                "probe_bypass_prober_passthrough_total{{{labels},protocol=\"https\",result=\"{result}\"}}"
            ))
        }
        // The request names only the port and service; the pod's record says which probe it is.
        _ if case.original.get("grpc").is_some() => Some(format!(
            "probe_bypass_prober_probes_total{{{labels},protocol=\"grpc\",result=\"{}\"}} 1",
            direct.verdict.label()
        )),
        _ => None,
    }
}

/// osm#3773: two containers' probes of one kind are answered each for itself, in both styles.
#[test]
fn two_containers_probes_of_one_kind_get_their_own_answers() {
    require_privileges!();
    let dir = ManifestDir::new();
    let probes = [
        (
            "api".to_owned(),
            ProbeKind::Liveness,
            http_get("HTTP", HTTP_PORT.into(), "/ok"),
        ),
        (
            "worker".to_owned(),
            ProbeKind::Liveness,
            http_get("HTTP", HTTP_PORT.into(), "/fail"),
        ),
    ];
    let osm = AppPod::start();
    let fsm = AppPod::start();
    let manifests = [
        (
            "two-osm",
            rewritten_manifest(&osm.pod, "two-osm", &probes, Style::Osm),
            &osm,
        ),
        (
            "two-fsm",
            rewritten_manifest(&fsm.pod, "two-fsm", &probes, Style::Fsm),
            &fsm,
        ),
    ];
    for (name, manifest, _) in &manifests {
        dir.write(&format!("{name}.json"), &manifest.to_string());
    }
    let agent = Agent::start(&dir.path, &[SERVE]);
    agent.wait_ready(200, Duration::from_secs(10));
    runtime().block_on(async {
        for (name, manifest, apps) in &manifests {
            let ip = IpAddr::V4(apps.pod.ip);
            let api = as_the_kubelet(ip, &probe_in(manifest, "api", ProbeKind::Liveness)).await;
            let worker =
                as_the_kubelet(ip, &probe_in(manifest, "worker", ProbeKind::Liveness)).await;
            assert_eq!(
                (api.verdict, api.status),
                (Verdict::Success, Some(200)),
                "{name}: {api:?}"
            );
            assert_eq!(
                (worker.verdict, worker.status),
                (Verdict::Failure, Some(500)),
                "{name}: {worker:?}"
            );
        }
    });
    let metrics = agent.get("/metrics").expect("metrics").1;
    for pod in ["two-osm", "two-fsm"] {
        for (container, result) in [("api", "success"), ("worker", "failure")] {
            let line = format!(
                "probe_bypass_prober_probes_total{{namespace=\"test\",pod=\"{pod}\",\
                 container=\"{container}\",probe=\"liveness\",protocol=\"http\",result=\"{result}\"}} 1"
            );
            assert!(metrics.contains(&line), "{line} in\n{metrics}");
        }
    }
}

/// A raw kubelet request for an osm-shape liveness probe of `container`.
fn osm_liveness(pod: &TestPod, container: &str) -> kubelet::Reply {
    let addr = SocketAddr::new(pod.ip.into(), ProbeKind::Liveness.port());
    let path = format!("{}/{container}", ProbeKind::Liveness.path());
    kubelet::send(addr, &kubelet::request(addr, &path, None))
}

#[test]
fn without_the_flag_the_probe_ports_are_left_alone() {
    require_privileges!();
    let apps = AppPod::start();
    let dir = ManifestDir::new();
    let probes = [(
        "app".to_owned(),
        ProbeKind::Liveness,
        http_get("HTTP", HTTP_PORT.into(), "/ok"),
    )];
    let manifest = rewritten_manifest(&apps.pod, "plain", &probes, Style::Osm);
    dir.write("plain.json", &manifest.to_string());
    let agent = Agent::start(&dir.path, &[]);
    agent.wait_ready(200, Duration::from_secs(10));
    for kind in ProbeKind::ALL {
        let addr = SocketAddr::new(apps.pod.ip.into(), kind.port());
        let refused = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        assert!(refused.is_err(), "something listens on {addr}");
    }
    let healthcheck = kubelet::probe(apps.pod.healthcheck(), &HTTP_PORT.to_string());
    assert_eq!(healthcheck.status, 200, "{healthcheck:?}");
}

/// A probe port another process holds in one pod (the mesh's proxy, say) is that pod's problem
/// only, and so is an unreadable original-probes annotation: both are logged, counted, and the
/// pods stay served on 15904, as the other pods are on every port.
#[test]
fn a_taken_probe_port_or_a_broken_record_stays_the_pods_own_problem() {
    require_privileges!();
    let taken = AppPod::start();
    let fine = AppPod::start();
    let broken = AppPod::start();
    let proxy = taken.pod.listen(SocketAddr::new(
        std::net::Ipv4Addr::UNSPECIFIED.into(),
        ProbeKind::Liveness.port(),
    ));
    let dir = ManifestDir::new();
    let probes = [
        (
            "app".to_owned(),
            ProbeKind::Liveness,
            http_get("HTTP", HTTP_PORT.into(), "/ok"),
        ),
        (
            "app".to_owned(),
            ProbeKind::Readiness,
            json!({"tcpSocket": {"port": HTTP_PORT}}),
        ),
    ];
    // One container with both probes.
    let both = |pod: &TestPod, name: &str| {
        let mut manifest: Value = serde_json::from_str(&pod.manifest(name, &[])).expect("manifest");
        manifest["spec"]["containers"] = json!([{
            "name": "app", "image": "app", "ports": declared_ports(),
            "livenessProbe": probes[0].2, "readinessProbe": probes[1].2,
        }]);
        rewrite_in_place(&mut manifest, Style::Osm).expect("rewrite");
        manifest
    };
    dir.write("taken.json", &both(&taken.pod, "taken").to_string());
    dir.write("fine.json", &both(&fine.pod, "fine").to_string());
    let mut unreadable = both(&broken.pod, "broken");
    unreadable["metadata"]["annotations"]["probe-bypass.io/original-probes"] = "{\"app\": 1".into();
    dir.write("broken.json", &unreadable.to_string());

    let mut agent = Agent::start(&dir.path, &[SERVE]);
    agent.wait_ready(200, Duration::from_secs(10));
    agent.wait_until("the taken port reported", Duration::from_secs(5), |agent| {
        agent
            .log_text()
            .contains("pod test/taken: cannot answer its liveness probes on port 15901")
    });
    let log = agent.log_text();
    assert!(log.contains("usually the mesh's proxy"), "{log}");
    assert!(log.contains("run without --serve-http-probes"), "{log}");

    // The taken pod: 15904 and its other probe ports are served; 15901 is the proxy's.
    let readiness = kubelet::probe(taken.pod.healthcheck(), &HTTP_PORT.to_string());
    assert_eq!(readiness.status, 200, "{readiness:?}");
    let addr = SocketAddr::new(taken.pod.ip.into(), ProbeKind::Readiness.port());
    let other_kind = kubelet::send(
        addr,
        &kubelet::request(addr, "/fsm-readiness-probe/app", None),
    );
    assert_eq!(other_kind.status, 404, "{other_kind:?}");
    drop(proxy);
    // The other pods are served on every port.
    let live = osm_liveness(&fine.pod, "app");
    assert_eq!(live.status, 200, "{live:?}");
    assert!(
        live.body.contains("succeeded with status code 200"),
        "{live:?}"
    );
    // The broken record: served, and the probe says why it cannot be run.
    let unrun = osm_liveness(&broken.pod, "app");
    assert_eq!(unrun.status, 404, "{unrun:?}");
    assert!(
        unrun.body.contains("probe-bypass.io/original-probes"),
        "{unrun:?}"
    );
    let readiness = kubelet::probe(broken.pod.healthcheck(), &HTTP_PORT.to_string());
    assert_eq!(readiness.status, 200, "{readiness:?}");

    let metrics = agent.get("/metrics").expect("metrics").1;
    for line in [
        "probe_bypass_listener_errors_total{namespace=\"test\",pod=\"taken\"}",
        "probe_bypass_pod_annotation_errors_total{namespace=\"test\",pod=\"broken\",\
         annotation=\"probe-bypass.io/original-probes\"} 1",
        "probe_bypass_pods_served 3",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    assert!(
        !metrics.contains("probe_bypass_listener_errors_total{namespace=\"test\",pod=\"fine\"}"),
        "{metrics}"
    );

    // Once the port is free, the agent takes it (the namespace checks run every 2 s).
    agent.wait_until("15901 taken over", Duration::from_secs(6), |agent| {
        agent
            .log_text()
            .contains("pod test/taken: now answers liveness probes on port 15901")
    });
    let live = osm_liveness(&taken.pod, "app");
    assert_eq!(live.status, 200, "{live:?}");
}

/// The app gets what the original probe would have sent it: the kubelet's User-Agent (passed on
/// by the agent), the probe's own headers, its `Host` header, and with `host` set, the request at
/// that address (from inside the pod).
#[test]
fn the_app_sees_the_kubelets_user_agent_and_the_probes_own_host_and_headers() {
    require_privileges!();
    let dir = ManifestDir::new();
    let pods: Vec<(Style, AppPod, Value)> = [Style::Osm, Style::Fsm]
        .into_iter()
        .map(|style| {
            let apps = AppPod::start();
            let name = style_name(style);
            let with_headers = json!({"httpGet": {
                "path": format!("/ok?headers={name}"), "port": HTTP_PORT,
                "httpHeaders": [{"name": "Host", "value": "shop.example"}, {"name": "X-Probe", "value": name}],
            }});
            let loopback = json!({"httpGet": {
                "path": format!("/ok?loopback={name}"), "port": HTTP_PORT, "host": "127.0.0.1",
            }});
            let probes = [
                ("app".to_owned(), ProbeKind::Liveness, with_headers),
                ("other".to_owned(), ProbeKind::Readiness, loopback),
            ];
            let manifest = rewritten_manifest(&apps.pod, name, &probes, style);
            dir.write(&format!("{name}.json"), &manifest.to_string());
            (style, apps, manifest)
        })
        .collect();
    let agent = Agent::start(&dir.path, &[SERVE]);
    agent.wait_ready(200, Duration::from_secs(10));
    for (style, apps, manifest) in &pods {
        let name = style_name(*style);
        let ip = IpAddr::V4(apps.pod.ip);
        let liveness = probe_in(manifest, "app", ProbeKind::Liveness);
        let readiness = probe_in(manifest, "other", ProbeKind::Readiness);
        let (headers, loopback) = runtime().block_on(async {
            tokio::join!(
                as_the_kubelet(ip, &liveness),
                as_the_kubelet(ip, &readiness)
            )
        });
        assert_eq!(headers.verdict, Verdict::Success, "{name}: {headers:?}");
        assert_eq!(loopback.verdict, Verdict::Success, "{name}: {loopback:?}");
        let seen = apps.http.seen_at(&format!("/ok?headers={name}"));
        let [request] = seen.as_slice() else {
            panic!("{name}: one request expected: {seen:?}");
        };
        for (header, value) in [
            ("user-agent", USER_AGENT),
            ("host", "shop.example"),
            ("x-probe", name),
            ("accept", "*/*"),
        ] {
            assert_eq!(request.header(header), Some(value), "{name}: {request:?}");
        }
        assert!(
            request.header("original-http-port").is_none(),
            "{name}: {request:?}"
        );
        let seen = apps.http.seen_at(&format!("/ok?loopback={name}"));
        let [request] = seen.as_slice() else {
            panic!("{name}: one request expected: {seen:?}");
        };
        assert_eq!(
            request.header("host"),
            Some(format!("127.0.0.1:{HTTP_PORT}").as_str()),
            "{name}: {request:?}"
        );
    }
}
