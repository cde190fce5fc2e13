//! The probe rewriter on real manifests (`tests/fixtures/rewrite/`): the probes of the seed
//! documents, the Kubernetes documentation's probe examples and the peers' bug reports. Each case
//! states every probe the rewrite changes and the originals it records; every other part of the pod
//! must come out as it went in. Then `probe-bypass rewrite` itself, run as a user would. Needs no
//! privileges.
#![expect(
    clippy::expect_used,
    reason = "the helpers read test fixtures: a missing piece fails the test, naming it"
)]

use std::{
    path::{Path, PathBuf},
    process::Output,
};

use probe_bypass_rewrite::{
    OriginalProbes, ProbeKind, RewriteError, Style, contract::ORIGINAL_PROBES_ANNOTATION,
    rewrite_in_place, rewrite_pod,
};
use probe_bypass_testing::rewrite_cli::run_rewrite;
use serde::Deserialize as _;
use serde_json::{Value, json};

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/rewrite")
        .join(name)
}

/// The fixture's first (or only) document, YAML or JSON.
fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(fixture_path(name)).expect("fixture");
    let first = serde_norway::Deserializer::from_str(&text)
        .next()
        .expect("a document");
    Value::deserialize(first).expect("valid YAML")
}

/// Where an object of the fixtures keeps its pod.
fn pod_pointer(document: &Value) -> &'static str {
    match document["kind"].as_str().expect("a kind") {
        "Pod" => "",
        "CronJob" => "/spec/jobTemplate/spec/template",
        _ => "/spec/template",
    }
}

fn fixture_pod(name: &str) -> Value {
    let document = fixture(name);
    document
        .pointer(pod_pointer(&document))
        .expect("a pod template")
        .clone()
}

fn annotation(pod: &Value) -> Option<&str> {
    pod.get("metadata")?
        .get("annotations")?
        .get(ORIGINAL_PROBES_ANNOTATION)?
        .as_str()
}

fn container_mut<'a>(pod: &'a mut Value, name: &str) -> &'a mut Value {
    pod["spec"]["containers"]
        .as_array_mut()
        .expect("containers")
        .iter_mut()
        .find(|c| c["name"] == name)
        .expect("the container")
}

/// What a fixture must come to.
struct Expected {
    /// (container, probe field, the probe after the rewrite); every other probe is unchanged.
    probes: Vec<(&'static str, &'static str, Value)>,
    /// The original-probes annotation, as JSON; `None` when nothing is recorded.
    originals: Option<Value>,
    warnings: Vec<&'static str>,
}

/// Rewrites the fixture's pod and checks the whole pod against `expected`, then that a second
/// rewrite changes nothing.
fn check(name: &str, style: Style, expected: Expected) {
    let Expected {
        probes,
        originals,
        warnings,
    } = expected;
    let pod = fixture_pod(name);
    let rewrite = rewrite_pod(&pod, style).expect("the fixture rewrites");
    let mut after = pod.clone();
    json_patch::patch(&mut after, &rewrite.patch).expect("the patch applies");

    let recorded = annotation(&after).map(|text| {
        OriginalProbes::parse(text).expect("the annotation reads back");
        serde_json::from_str::<Value>(text).expect("JSON")
    });
    assert_eq!(
        recorded, originals,
        "{name} ({style:?}): recorded originals"
    );

    let mut wanted = pod;
    for (container, field, probe) in probes {
        container_mut(&mut wanted, container)[field] = probe;
    }
    if let Some(text) = annotation(&after) {
        wanted["metadata"]["annotations"][ORIGINAL_PROBES_ANNOTATION] = text.into();
    }
    assert_eq!(
        after,
        wanted,
        "{name} ({style:?}): the rewritten pod\n{}",
        serde_json::to_string_pretty(&after).expect("JSON")
    );

    let said: Vec<String> = rewrite.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(said, warnings, "{name} ({style:?}): warnings");

    let again = rewrite_pod(&after, style).expect("a rewritten pod rewrites");
    assert!(
        again.patch.is_empty(),
        "{name} ({style:?}): a second rewrite changed {}",
        again.patch
    );
}

fn tcp_healthcheck(port: &str) -> Value {
    json!({
        "httpHeaders": [{"name": "Original-Tcp-Port", "value": port}],
        "path": "/fsm-healthcheck",
        "port": 15904,
        "scheme": "HTTP",
    })
}

#[test]
fn seed_probes_take_the_shape_the_documentation_shows_with_the_container_in_the_path() {
    let liveness = json!({
        "httpGet": {"path": "/liveness", "port": 14001, "scheme": "HTTP"},
        "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3,
    });
    check(
        "seed-bookstore.yaml",
        Style::Osm,
        Expected {
            probes: vec![
                (
                    "bookstore-v1",
                    "livenessProbe",
                    json!({
                        "httpGet": {"path": "/fsm-liveness-probe/bookstore-v1", "port": 15901, "scheme": "HTTP"},
                        "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3,
                    }),
                ),
                (
                    "bookstore-v1",
                    "readinessProbe",
                    json!({"httpGet": tcp_healthcheck("14001")}),
                ),
            ],
            originals: Some(json!({"bookstore-v1": {
                "liveness": liveness,
                "readiness": {"tcpSocket": {"port": 14001}},
            }})),
            warnings: vec![],
        },
    );
}

#[test]
fn fsm_style_sends_http_probes_to_the_healthcheck_path_with_the_original_in_headers() {
    check(
        "seed-bookstore.yaml",
        Style::Fsm,
        Expected {
            probes: vec![
                (
                    "bookstore-v1",
                    "livenessProbe",
                    json!({
                        "httpGet": {
                            "path": "/fsm-healthcheck", "port": 15901, "scheme": "HTTP",
                            "httpHeaders": [
                                {"name": "Original-Http-Port", "value": "14001"},
                                {"name": "Original-Http-Path", "value": "/liveness"},
                            ],
                        },
                        "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3,
                    }),
                ),
                (
                    "bookstore-v1",
                    "readinessProbe",
                    json!({"httpGet": tcp_healthcheck("14001")}),
                ),
            ],
            originals: Some(json!({"bookstore-v1": {
                "liveness": {
                    "httpGet": {"path": "/liveness", "port": 14001, "scheme": "HTTP"},
                    "timeoutSeconds": 1, "periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3,
                },
                "readiness": {"tcpSocket": {"port": 14001}},
            }})),
            warnings: vec![],
        },
    );
}

#[test]
fn a_deployments_probes_keep_their_headers_and_every_timing_field() {
    let probe = |path: &str, port: u16, header: &str, failure: u32| {
        json!({
            "httpGet": {"path": path, "port": port, "httpHeaders": [{"name": "X-Probe", "value": header}]},
            "initialDelaySeconds": 10, "periodSeconds": 10, "timeoutSeconds": 5,
            "successThreshold": 1, "failureThreshold": failure,
        })
    };
    check(
        "seed-address-finder.yaml",
        Style::Osm,
        Expected {
            probes: vec![
                (
                    "golang",
                    "readinessProbe",
                    probe("/fsm-readiness-probe/golang", 15902, "readiness", 5),
                ),
                (
                    "golang",
                    "livenessProbe",
                    probe("/fsm-liveness-probe/golang", 15901, "liveness", 2),
                ),
            ],
            originals: Some(json!({"golang": {
                "liveness": probe("/health", 3000, "liveness", 2),
                "readiness": probe("/health", 3000, "readiness", 5),
            }})),
            warnings: vec![],
        },
    );
}

#[test]
fn exec_probes_are_never_changed() {
    for style in [Style::Osm, Style::Fsm] {
        check(
            "k8s-exec-liveness.yaml",
            style,
            Expected {
                probes: vec![],
                originals: None,
                warnings: vec![],
            },
        );
    }
}

#[test]
fn the_documentations_http_probe_keeps_its_custom_header() {
    check(
        "k8s-http-liveness.yaml",
        Style::Osm,
        Expected {
            probes: vec![(
                "liveness",
                "livenessProbe",
                json!({
                    "httpGet": {
                        "path": "/fsm-liveness-probe/liveness", "port": 15901,
                        "httpHeaders": [{"name": "Custom-Header", "value": "Awesome"}],
                    },
                    "initialDelaySeconds": 3, "periodSeconds": 3,
                }),
            )],
            originals: Some(json!({"liveness": {"liveness": {
                "httpGet": {
                    "path": "/healthz", "port": 8080,
                    "httpHeaders": [{"name": "Custom-Header", "value": "Awesome"}],
                },
                "initialDelaySeconds": 3, "periodSeconds": 3,
            }}})),
            warnings: vec![],
        },
    );
}

#[test]
fn tcp_probes_become_the_healthcheck_with_the_original_port_in_both_styles() {
    let rewritten = json!({
        "httpGet": tcp_healthcheck("8080"), "initialDelaySeconds": 15, "periodSeconds": 10,
    });
    let original = json!({
        "tcpSocket": {"port": 8080}, "initialDelaySeconds": 15, "periodSeconds": 10,
    });
    for style in [Style::Osm, Style::Fsm] {
        check(
            "k8s-tcp-liveness-readiness.yaml",
            style,
            Expected {
                probes: vec![
                    ("goproxy", "readinessProbe", rewritten.clone()),
                    ("goproxy", "livenessProbe", rewritten.clone()),
                ],
                originals: Some(json!({"goproxy": {
                    "liveness": original.clone(), "readiness": original.clone(),
                }})),
                warnings: vec![],
            },
        );
    }
}

#[test]
fn grpc_probes_go_to_the_agents_grpc_endpoint_with_port_and_service_headers() {
    check(
        "k8s-grpc-liveness.yaml",
        Style::Osm,
        Expected {
            probes: vec![(
                "etcd",
                "livenessProbe",
                json!({
                    "httpGet": {
                        "httpHeaders": [{"name": "Original-Grpc-Port", "value": "2379"}],
                        "path": "/probe-bypass-grpc", "port": 15904, "scheme": "HTTP",
                    },
                    "initialDelaySeconds": 10,
                }),
            )],
            originals: Some(json!({"etcd": {"liveness": {
                "grpc": {"port": 2379}, "initialDelaySeconds": 10,
            }}})),
            warnings: vec![],
        },
    );
    let grpc = |headers: Value, rest: Value| {
        let mut probe = json!({"httpGet": {
            "httpHeaders": headers, "path": "/probe-bypass-grpc", "port": 15904, "scheme": "HTTP",
        }});
        probe
            .as_object_mut()
            .expect("object")
            .extend(rest.as_object().expect("object").clone());
        probe
    };
    check(
        "bug-grpc-service.yaml",
        Style::Fsm,
        Expected {
            probes: vec![
                (
                    "server",
                    "readinessProbe",
                    grpc(
                        json!([
                            {"name": "Original-Grpc-Port", "value": "50051"},
                            {"name": "Original-Grpc-Service", "value": "payments.v1.Ledger"},
                        ]),
                        json!({"periodSeconds": 5}),
                    ),
                ),
                (
                    "server",
                    "livenessProbe",
                    grpc(
                        json!([{"name": "Original-Grpc-Port", "value": "50051"}]),
                        json!({}),
                    ),
                ),
            ],
            originals: Some(json!({"server": {
                "liveness": {"grpc": {"port": 50051}},
                "readiness": {"grpc": {"port": 50051, "service": "payments.v1.Ledger"}, "periodSeconds": 5},
            }})),
            warnings: vec![],
        },
    );
}

#[test]
fn named_ports_resolve_as_the_kubelet_resolves_them() {
    let http = |path: &str, port: u16, failure: u32| {
        json!({
            "httpGet": {"path": path, "port": port}, "failureThreshold": failure, "periodSeconds": 10,
        })
    };
    let originals = json!({"app": {
        "liveness": {"httpGet": {"path": "/healthz", "port": "liveness-port"}, "failureThreshold": 1, "periodSeconds": 10},
        "startup": {"httpGet": {"path": "/healthz", "port": "liveness-port"}, "failureThreshold": 30, "periodSeconds": 10},
    }});
    check(
        "k8s-startup-named-port.yaml",
        Style::Osm,
        Expected {
            probes: vec![
                (
                    "app",
                    "livenessProbe",
                    http("/fsm-liveness-probe/app", 15901, 1),
                ),
                (
                    "app",
                    "startupProbe",
                    http("/fsm-startup-probe/app", 15903, 30),
                ),
            ],
            originals: Some(originals.clone()),
            warnings: vec![],
        },
    );
    // The fsm style writes the resolved number where the kubelet would have connected.
    let fsm = |port: u16, failure: u32| {
        json!({
            "httpGet": {
                "path": "/fsm-healthcheck", "port": port,
                "httpHeaders": [
                    {"name": "Original-Http-Port", "value": "8080"},
                    {"name": "Original-Http-Path", "value": "/healthz"},
                ],
            },
            "failureThreshold": failure, "periodSeconds": 10,
        })
    };
    check(
        "k8s-startup-named-port.yaml",
        Style::Fsm,
        Expected {
            probes: vec![
                ("app", "livenessProbe", fsm(15901, 1)),
                ("app", "startupProbe", fsm(15903, 30)),
            ],
            originals: Some(originals),
            warnings: vec![],
        },
    );
    check(
        "bug-named-ports.yaml",
        Style::Osm,
        Expected {
            probes: vec![
                (
                    "app",
                    "livenessProbe",
                    json!({"httpGet": {"path": "/fsm-liveness-probe/app", "port": 15901}}),
                ),
                (
                    "app",
                    "readinessProbe",
                    json!({"httpGet": tcp_healthcheck("5432")}),
                ),
                (
                    "app",
                    "startupProbe",
                    json!({"httpGet": tcp_healthcheck("5432")}),
                ),
            ],
            originals: Some(json!({"app": {
                "liveness": {"httpGet": {"path": "/healthz", "port": "health"}},
                "readiness": {"tcpSocket": {"port": "db"}},
                "startup": {"tcpSocket": {"port": "5432"}},
            }})),
            warnings: vec![],
        },
    );
}

#[test]
fn an_unresolvable_port_leaves_that_probe_alone_and_says_why() {
    check(
        "bug-unresolvable-named-port.yaml",
        Style::Osm,
        Expected {
            probes: vec![(
                "app",
                "readinessProbe",
                json!({"httpGet": {"path": "/fsm-readiness-probe/app", "port": 15902}}),
            )],
            originals: Some(json!({"app": {
                "readiness": {"httpGet": {"path": "/ready", "port": "http"}},
            }})),
            warnings: vec![
                "pod typo: container app: liveness probe left unchanged: port \"htpp\" is not the \
                 name of one of the container's ports (it names http) and not a number",
                "pod typo: container cache: liveness probe left unchanged: port \"redis\" is not \
                 the name of one of the container's ports (it names none) and not a number",
            ],
        },
    );
}

#[test]
fn two_containers_probes_of_one_kind_get_endpoints_of_their_own() {
    let osm = |path: &str, port: u16| json!({"httpGet": {"path": path, "port": port}});
    let originals = json!({
        "api": {
            "liveness": {"httpGet": {"path": "/livez", "port": "http"}},
            "readiness": {"httpGet": {"path": "/readyz", "port": "http"}},
        },
        "worker": {
            "liveness": {"httpGet": {"path": "/livez", "port": "http"}},
            "readiness": {"httpGet": {"path": "/readyz", "port": "http"}},
        },
    });
    check(
        "bug-two-containers-same-kind.yaml",
        Style::Osm,
        Expected {
            probes: vec![
                (
                    "api",
                    "livenessProbe",
                    osm("/fsm-liveness-probe/api", 15901),
                ),
                (
                    "api",
                    "readinessProbe",
                    osm("/fsm-readiness-probe/api", 15902),
                ),
                (
                    "worker",
                    "livenessProbe",
                    osm("/fsm-liveness-probe/worker", 15901),
                ),
                (
                    "worker",
                    "readinessProbe",
                    osm("/fsm-readiness-probe/worker", 15902),
                ),
            ],
            originals: Some(originals.clone()),
            warnings: vec![],
        },
    );
    // In the fsm style the endpoint is shared, but each request names its own target: the named
    // port `http` is 8080 in one container and 9090 in the other.
    let fsm = |port: u16, target: &str, path: &str| {
        json!({"httpGet": {
            "path": "/fsm-healthcheck", "port": port,
            "httpHeaders": [
                {"name": "Original-Http-Port", "value": target},
                {"name": "Original-Http-Path", "value": path},
            ],
        }})
    };
    check(
        "bug-two-containers-same-kind.yaml",
        Style::Fsm,
        Expected {
            probes: vec![
                ("api", "livenessProbe", fsm(15901, "8080", "/livez")),
                ("api", "readinessProbe", fsm(15902, "8080", "/readyz")),
                ("worker", "livenessProbe", fsm(15901, "9090", "/livez")),
                ("worker", "readinessProbe", fsm(15902, "9090", "/readyz")),
            ],
            originals: Some(originals),
            warnings: vec![],
        },
    );
}

#[test]
fn the_rewritten_probe_has_no_host_and_the_original_keeps_it() {
    for style in [Style::Osm, Style::Fsm] {
        let liveness = match style {
            Style::Osm => json!({"httpGet": {"path": "/fsm-liveness-probe/app", "port": 15901}}),
            Style::Fsm => json!({"httpGet": {
                "path": "/fsm-healthcheck", "port": 15901,
                "httpHeaders": [
                    {"name": "Original-Http-Port", "value": "8080"},
                    {"name": "Original-Http-Path", "value": "/healthz"},
                ],
            }}),
        };
        check(
            "bug-host-field.yaml",
            style,
            Expected {
                probes: vec![
                    ("app", "livenessProbe", liveness),
                    (
                        "app",
                        "readinessProbe",
                        json!({"httpGet": tcp_healthcheck("8080")}),
                    ),
                ],
                originals: Some(json!({"app": {
                    "liveness": {"httpGet": {"host": "127.0.0.1", "path": "/healthz", "port": 8080}},
                    "readiness": {"tcpSocket": {"host": "10.1.2.3", "port": 8080}},
                }})),
                warnings: vec![],
            },
        );
    }
}

#[test]
fn a_host_header_is_kept_on_the_rewritten_probe_and_recorded() {
    let host = json!({"name": "Host", "value": "www.example.com"});
    check(
        "bug-host-header.yaml",
        Style::Osm,
        Expected {
            probes: vec![(
                "web",
                "livenessProbe",
                json!({
                    "httpGet": {"path": "/fsm-liveness-probe/web", "port": 15901, "httpHeaders": [host]},
                    "periodSeconds": 5,
                }),
            )],
            originals: Some(json!({"web": {"liveness": {
                "httpGet": {"path": "/status", "port": 80, "httpHeaders": [host]},
                "periodSeconds": 5,
            }}})),
            warnings: vec![],
        },
    );
    check(
        "bug-host-header.yaml",
        Style::Fsm,
        Expected {
            probes: vec![(
                "web",
                "livenessProbe",
                json!({
                    "httpGet": {
                        "path": "/fsm-healthcheck", "port": 15901,
                        "httpHeaders": [
                            host,
                            {"name": "Original-Http-Port", "value": "80"},
                            {"name": "Original-Http-Path", "value": "/status"},
                        ],
                    },
                    "periodSeconds": 5,
                }),
            )],
            originals: Some(json!({"web": {"liveness": {
                "httpGet": {"path": "/status", "port": 80, "httpHeaders": [host]},
                "periodSeconds": 5,
            }}})),
            warnings: vec![],
        },
    );
}

#[test]
fn an_https_probe_changes_port_only_in_osm_style_and_becomes_a_tcp_check_in_fsm_style() {
    let original = json!({"app": {"liveness": {
        "httpGet": {"path": "/healthz", "port": "https", "scheme": "HTTPS"},
        "timeoutSeconds": 2, "terminationGracePeriodSeconds": 30,
    }}});
    check(
        "bug-https.yaml",
        Style::Osm,
        Expected {
            probes: vec![(
                "app",
                "livenessProbe",
                json!({
                    "httpGet": {"path": "/healthz", "port": 15901, "scheme": "HTTPS"},
                    "timeoutSeconds": 2, "terminationGracePeriodSeconds": 30,
                }),
            )],
            originals: Some(original.clone()),
            warnings: vec![],
        },
    );
    check(
        "bug-https.yaml",
        Style::Fsm,
        Expected {
            probes: vec![(
                "app",
                "livenessProbe",
                json!({
                    "httpGet": {
                        "path": "/fsm-healthcheck", "port": 15901, "scheme": "HTTP",
                        "httpHeaders": [{"name": "Original-Tcp-Port", "value": "8443"}],
                    },
                    "timeoutSeconds": 2, "terminationGracePeriodSeconds": 30,
                }),
            )],
            originals: Some(original),
            warnings: vec![],
        },
    );
}

#[test]
fn a_second_containers_https_probe_of_a_kind_is_left_alone_in_osm_style() {
    check(
        "bug-two-https-containers.yaml",
        Style::Osm,
        Expected {
            probes: vec![(
                "front",
                "livenessProbe",
                json!({"httpGet": {"path": "/healthz", "port": 15901, "scheme": "HTTPS"}}),
            )],
            originals: Some(json!({"front": {"liveness": {
                "httpGet": {"path": "/healthz", "port": 8443, "scheme": "HTTPS"},
            }}})),
            warnings: vec![
                "pod two-tls: container back: liveness probe left unchanged: it is HTTPS, and \
                 container \"front\"'s HTTPS probe of the same kind already has the port; HTTPS \
                 probes keep their path in the osm style, so a second one could not be told apart \
                 (the fsm style can)",
            ],
        },
    );
    let tcp = |port: &str| {
        json!({"httpGet": {
            "path": "/fsm-healthcheck", "port": 15901, "scheme": "HTTP",
            "httpHeaders": [{"name": "Original-Tcp-Port", "value": port}],
        }})
    };
    check(
        "bug-two-https-containers.yaml",
        Style::Fsm,
        Expected {
            probes: vec![
                ("front", "livenessProbe", tcp("8443")),
                ("back", "livenessProbe", tcp("9443")),
            ],
            originals: Some(json!({
                "back": {"liveness": {"httpGet": {"path": "/healthz", "port": 9443, "scheme": "HTTPS"}}},
                "front": {"liveness": {"httpGet": {"path": "/healthz", "port": 8443, "scheme": "HTTPS"}}},
            })),
            warnings: vec![],
        },
    );
}

#[test]
fn init_sidecar_and_ephemeral_containers_are_left_alone() {
    check(
        "bug-sidecars-and-init.yaml",
        Style::Osm,
        Expected {
            probes: vec![(
                "app",
                "livenessProbe",
                json!({"httpGet": {"path": "/fsm-liveness-probe/app", "port": 15901}}),
            )],
            originals: Some(json!({"app": {"liveness": {
                "httpGet": {"path": "/healthz", "port": 8080},
            }}})),
            warnings: vec![],
        },
    );
}

#[test]
fn a_probe_the_mesh_rewrote_already_is_never_taken_for_an_original() {
    check(
        "bug-rewritten-by-mesh.yaml",
        Style::Osm,
        Expected {
            probes: vec![(
                "app",
                "readinessProbe",
                json!({"httpGet": {"path": "/fsm-readiness-probe/app", "port": 15902}}),
            )],
            originals: Some(json!({"app": {"readiness": {
                "httpGet": {"path": "/ready", "port": 14001},
            }}})),
            // FSM's shape goes to the agent as it is, with no warning; OSM's cannot.
            warnings: vec![
                "pod injected: container app: startup probe left unchanged: it already targets \
                 probe port 15903, and neither its headers nor the pod's \
                 probe-bypass.io/original-probes annotation say what it checks (OSM's injector \
                 keeps that in the proxy's configuration), so the agent cannot answer it",
            ],
        },
    );
}

#[test]
fn an_opted_out_pod_gets_no_patch_and_no_warning() {
    let pod = fixture_pod("opt-out.yaml");
    for style in [Style::Osm, Style::Fsm] {
        let rewrite = rewrite_pod(&pod, style).expect("rewrites");
        assert!(rewrite.patch.is_empty(), "{}", rewrite.patch);
        assert!(rewrite.warnings.is_empty(), "{:?}", rewrite.warnings);
    }
}

#[test]
fn an_opt_out_value_that_is_not_disabled_is_rewritten_with_a_warning() {
    let mut pod = fixture_pod("opt-out.yaml");
    pod["metadata"]["annotations"]["probe-bypass.io/rewrite"] = "off".into();
    let rewrite = rewrite_pod(&pod, Style::Osm).expect("rewrites");
    assert_eq!(rewrite.patch.len(), 2, "{}", rewrite.patch);
    let said: Vec<String> = rewrite.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        said,
        [
            "pod opted-out: annotation probe-bypass.io/rewrite is \"off\", not \"disabled\"; the \
          probes were rewritten"
        ]
    );
}

#[test]
fn the_webhook_gets_a_json_patch_with_escaped_paths_and_a_created_annotations_object() {
    let review = fixture("admission-review.json");
    let pod = &review["request"]["object"];
    let rewrite = rewrite_pod(pod, Style::Osm).expect("rewrites");
    assert_eq!(
        serde_json::to_value(&rewrite.patch).expect("JSON"),
        json!([
            {
                "op": "replace",
                "path": "/spec/containers/0/livenessProbe",
                "value": {"httpGet": tcp_healthcheck("14001"), "periodSeconds": 10},
            },
            {
                "op": "add",
                "path": "/metadata/annotations",
                "value": {
                    "probe-bypass.io/original-probes":
                        r#"{"bookstore-v1":{"liveness":{"tcpSocket":{"port":14001},"periodSeconds":10}}}"#,
                },
            },
        ])
    );

    // A template that has annotations of its own gets one more, by its escaped key.
    let pod = fixture_pod("bug-grpc-service.yaml");
    let rewrite = rewrite_pod(&pod, Style::Osm).expect("rewrites");
    let last = serde_json::to_value(rewrite.patch.last().expect("an operation")).expect("JSON");
    assert_eq!(last["op"], "add");
    assert_eq!(
        last["path"],
        "/metadata/annotations/probe-bypass.io~1original-probes"
    );
}

/// Every fixture pod, in both styles.
fn every_fixture_pod() -> Vec<(String, Value)> {
    // Subdirectories hold fixtures of their own tests (mesh-init/: tests/replace_mesh_init.rs).
    let mut names: Vec<String> = std::fs::read_dir(fixture_path(""))
        .expect("fixtures")
        .map(|entry| entry.expect("entry"))
        .filter(|entry| !entry.path().is_dir())
        .map(|entry| entry.file_name().into_string().expect("UTF-8"))
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|name| {
            let document = fixture(&name);
            let pod = match document.get("request") {
                Some(request) => request["object"].clone(),
                None => document
                    .pointer(pod_pointer(&document))
                    .expect("pod")
                    .clone(),
            };
            (name, pod)
        })
        .collect()
}

#[test]
fn rewriting_twice_equals_rewriting_once() {
    for (name, pod) in every_fixture_pod() {
        for style in [Style::Osm, Style::Fsm] {
            let mut once = pod.clone();
            rewrite_in_place(&mut once, style).expect("rewrites");
            let mut twice = once.clone();
            rewrite_in_place(&mut twice, style).expect("rewrites again");
            assert_eq!(twice, once, "{name} ({style:?})");
        }
    }
}

#[test]
fn a_style_change_rewrites_from_the_recorded_originals() {
    for (name, pod) in every_fixture_pod() {
        let mut direct = pod.clone();
        rewrite_in_place(&mut direct, Style::Fsm).expect("rewrites");
        let mut via_osm = pod.clone();
        rewrite_in_place(&mut via_osm, Style::Osm).expect("rewrites");
        rewrite_in_place(&mut via_osm, Style::Fsm).expect("rewrites again");
        assert_eq!(via_osm, direct, "{name}");
    }
}

#[test]
fn a_probe_changed_after_a_rewrite_is_the_new_original_and_a_removed_one_is_forgotten() {
    let mut pod = fixture_pod("seed-bookstore.yaml");
    rewrite_in_place(&mut pod, Style::Osm).expect("rewrites");

    // Someone edits the manifest that was rewritten: the new probe is what counts.
    container_mut(&mut pod, "bookstore-v1")["readinessProbe"] =
        json!({"tcpSocket": {"port": 14002}});
    container_mut(&mut pod, "bookstore-v1")
        .as_object_mut()
        .expect("object")
        .remove("livenessProbe");
    rewrite_in_place(&mut pod, Style::Osm).expect("rewrites");
    assert_eq!(
        container_mut(&mut pod, "bookstore-v1")["readinessProbe"],
        json!({"httpGet": tcp_healthcheck("14002")})
    );
    let originals = OriginalProbes::parse(annotation(&pod).expect("annotation")).expect("valid");
    let recorded: Vec<(&str, ProbeKind, &Value)> = originals
        .iter()
        .map(|(container, kind, original)| (container, kind, original.json()))
        .collect();
    assert_eq!(
        recorded,
        [(
            "bookstore-v1",
            ProbeKind::Readiness,
            &json!({"tcpSocket": {"port": 14002}})
        )]
    );

    // With no probe left to rewrite, the annotation goes.
    container_mut(&mut pod, "bookstore-v1")["readinessProbe"] =
        json!({"exec": {"command": ["true"]}});
    rewrite_in_place(&mut pod, Style::Osm).expect("rewrites");
    assert_eq!(annotation(&pod), None);
    assert_eq!(pod["metadata"]["annotations"], json!({}));
}

#[test]
fn a_number_in_a_probe_reads_back_from_the_record_exactly() {
    // Found by the fuzzer: without correctly rounded float parsing, the recorded copy of this
    // number came back one unit in the last place off, and each rewrite changed the pod again.
    let pod = json!({"spec": {"containers": [{"name": "app", "readinessProbe": {
        "httpGet": {"path": "/health", "port": 3000}, "futureSeconds": 1.777_777_777_777_778e59,
    }}]}});
    for style in [Style::Osm, Style::Fsm] {
        let mut once = pod.clone();
        rewrite_in_place(&mut once, style).expect("rewrites");
        let again = rewrite_pod(&once, style).expect("rewrites again");
        assert!(again.patch.is_empty(), "{style:?}: {}", again.patch);
    }
}

#[test]
fn pods_the_api_server_would_refuse_are_errors_not_guesses() {
    let mut pod = fixture_pod("bug-two-containers-same-kind.yaml");
    container_mut(&mut pod, "worker")["name"] = "api".into();
    let error = rewrite_pod(&pod, Style::Osm).expect_err("two containers named api");
    assert_eq!(
        error.to_string(),
        "/spec/containers/1/name is \"api\", the name of an earlier container too"
    );

    let mut pod = fixture_pod("seed-bookstore.yaml");
    pod["metadata"]["annotations"] = json!({ORIGINAL_PROBES_ANNOTATION: "{not json"});
    let error = rewrite_pod(&pod, Style::Osm).expect_err("a broken record");
    assert!(matches!(error, RewriteError::Original(_)), "{error}");

    let error = rewrite_pod(&json!({"spec": {}}), Style::Osm).expect_err("no containers");
    assert_eq!(
        error.to_string(),
        "/spec/containers is missing or not a list"
    );
    let error = rewrite_pod(&json!([]), Style::Osm).expect_err("not an object");
    assert_eq!(error.to_string(), "the pod is not a JSON object");
}

#[test]
fn a_probe_that_is_not_a_probe_is_left_alone_with_a_warning() {
    let pod = json!({"spec": {"containers": [
        {"name": "app", "livenessProbe": {"httpGet": {"port": true}}},
    ]}});
    let rewrite = rewrite_pod(&pod, Style::Osm).expect("rewrites the rest");
    assert!(rewrite.patch.is_empty());
    let said = rewrite.warnings[0].to_string();
    assert!(
        said.starts_with(
            "container app: liveness probe left unchanged: it is not a Kubernetes probe"
        ),
        "{said}"
    );
}

/// `probe-bypass rewrite` with `args`, `stdin` on its standard input.
fn run_cli(args: &[&str], stdin: &str) -> Output {
    run_rewrite(args, stdin.as_bytes())
}

fn text(bytes: &[u8]) -> &str {
    std::str::from_utf8(bytes).expect("UTF-8")
}

#[test]
fn cli_rewrites_a_deployment_and_answers_in_yaml() {
    let path = fixture_path("seed-address-finder.yaml");
    let output = run_cli(&["-f", path.to_str().expect("UTF-8")], "");
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stderr), "");
    let stdout = text(&output.stdout);
    let deployment: Value = serde_norway::from_str(stdout).expect("YAML out");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"],
        "/fsm-liveness-probe/golang"
    );
    assert!(
        annotation(&deployment["spec"]["template"]).is_some(),
        "{stdout}"
    );
    // The fields come back in the order they were written.
    assert!(
        stdout.starts_with("apiVersion: apps/v1\nkind: Deployment\n"),
        "{stdout}"
    );
}

#[test]
fn cli_rewrites_a_cronjob_from_stdin_and_answers_json_with_json() {
    let cronjob = serde_json::to_string(&fixture("cronjob.yaml")).expect("JSON");
    let output = run_cli(&["-f", "-", "--style", "fsm"], &cronjob);
    assert!(output.status.success(), "{}", text(&output.stderr));
    let rewritten: Value = serde_json::from_slice(&output.stdout).expect("JSON out");
    let probe = rewritten
        .pointer("/spec/jobTemplate/spec/template/spec/containers/0/livenessProbe")
        .expect("probe");
    assert_eq!(
        *probe,
        json!({
            "httpGet": {
                "path": "/fsm-healthcheck", "port": 15901,
                "httpHeaders": [
                    {"name": "Original-Http-Port", "value": "8000"},
                    {"name": "Original-Http-Path", "value": "/alive"},
                ],
            },
            "periodSeconds": 30,
        })
    );
}

#[test]
fn cli_rewrites_every_document_and_list_item_and_warns_on_stderr() {
    let read = |name: &str| std::fs::read_to_string(fixture_path(name)).expect("fixture");
    // The Service has no pods: it comes out as it went in, so a whole app can go through.
    let service = json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web"},
        "spec": {"ports": [{"port": 80, "targetPort": "http"}]},
    });
    let list = json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [fixture("k8s-grpc-liveness.yaml"), service, fixture("k8s-exec-liveness.yaml")],
    });
    let input = format!(
        "{}---\n{}---\n{}",
        read("bug-unresolvable-named-port.yaml"),
        read("cronjob.yaml"),
        serde_norway::to_string(&list).expect("YAML"),
    );
    let output = run_cli(&["-f", "-"], &input);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(
        text(&output.stderr),
        "warning: Pod typo: container app: liveness probe left unchanged: port \"htpp\" is not \
         the name of one of the container's ports (it names http) and not a number\n\
         warning: Pod typo: container cache: liveness probe left unchanged: port \"redis\" is not \
         the name of one of the container's ports (it names none) and not a number\n"
    );
    let documents: Vec<Value> = serde_norway::Deserializer::from_str(text(&output.stdout))
        .map(|document| Value::deserialize(document).expect("YAML"))
        .collect();
    assert_eq!(documents.len(), 3);
    assert_eq!(
        documents[1].pointer(
            "/spec/jobTemplate/spec/template/spec/containers/0/livenessProbe/httpGet/path"
        ),
        Some(&json!("/fsm-liveness-probe/report"))
    );
    assert_eq!(
        documents[2].pointer("/items/0/spec/containers/0/livenessProbe/httpGet/path"),
        Some(&json!("/probe-bypass-grpc"))
    );
    assert_eq!(documents[2]["items"][1], service);
    assert_eq!(documents[2]["items"][2], fixture("k8s-exec-liveness.yaml"));
}

#[test]
fn cli_refuses_bad_input_with_a_reason_and_prints_nothing() {
    let cases = [
        (
            "kind: Pod\nspec: {containers: []}\n---\n- a list, not an object\n".to_owned(),
            "error: document 2: it is not an object; rewrite reads Pod, Deployment, StatefulSet, \
             DaemonSet, ReplicaSet, Job, CronJob and List\n",
        ),
        (
            "kind: Pod\nspec:\n  containers: [\n".to_owned(),
            "error: document 1 is not valid YAML: ",
        ),
        (
            "{\"kind\": \"Pod\", \"spec\": ".to_owned(),
            "error: the input is not valid JSON: EOF while parsing a value at line 1 column 24\n",
        ),
        (
            "kind: Deployment\nmetadata: {name: web}\nspec: {}\n".to_owned(),
            "error: document 1: Deployment web has no pod template at /spec/template; rewrite \
             reads",
        ),
        (
            "kind: Pod\nmetadata: {name: web}\nspec: {containers: {}}\n".to_owned(),
            "error: document 1 (Pod web): /spec/containers is missing or not a list\n",
        ),
    ];
    for (input, message) in cases {
        let output = run_cli(&["-f", "-"], &input);
        assert_eq!(output.status.code(), Some(1), "{input}");
        assert_eq!(text(&output.stdout), "", "{input}");
        assert!(
            text(&output.stderr).starts_with(message),
            "{input}: {}",
            text(&output.stderr)
        );
    }
    let output = run_cli(&["-f", "/nonexistent/pod.yaml"], "");
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(
        text(&output.stderr),
        "error: cannot read /nonexistent/pod.yaml: No such file or directory (os error 2)\n"
    );
}
