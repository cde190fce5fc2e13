//! `--replace-mesh-init` on pods as FSM's and OSM's injectors write them
//! (`tests/fixtures/rewrite/mesh-init/`, each saying which injector code it follows). Each case
//! compares the whole pod after the rewrite with the fixture's `.expected.yaml` beside it, states
//! the exclusion annotations it carries and the warnings, and rewrites the result again to check
//! that nothing changes. Then `probe-bypass rewrite --replace-mesh-init`, with and without
//! `--diff`, as a user runs it. Needs no privileges.
//!
//! `PROBE_BYPASS_BLESS=1` writes the expected files from the rewriter's output instead of
//! comparing; review their diff before committing them.
#![expect(
    clippy::expect_used,
    reason = "the helpers read test fixtures: a missing piece fails the test, naming it"
)]

use std::path::{Path, PathBuf};

use probe_bypass_rewrite::{
    Options, Style,
    contract::{REPLACED_MESH_INIT_ANNOTATION, VALIDATION_CONTAINER_NAME},
    rewrite_pod, rewrite_pod_with,
};
use probe_bypass_testing::rewrite_cli::run_rewrite;
use serde_json::{Value, json};

fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/rewrite/mesh-init")
        .join(name)
}

fn read_yaml(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
}

fn replacing() -> Options {
    Options::new(Style::Osm).replacing_mesh_init()
}

/// What a fixture must come to, beyond its expected file.
struct Case {
    name: &'static str,
    /// The mesh's exclusion annotations after the rewrite (key, value); every other one is as
    /// the fixture has it.
    exclusions: &'static [(&'static str, &'static str)],
    /// The record of what was removed; `None` when the init container is kept.
    record: Option<Value>,
    warnings: &'static [&'static str],
}

fn annotations(pod: &Value) -> &serde_json::Map<String, Value> {
    pod["metadata"]["annotations"]
        .as_object()
        .expect("annotations")
}

fn init_names(pod: &Value) -> Vec<&str> {
    let names = pod["spec"]["initContainers"]
        .as_array()
        .expect("init containers");
    names.iter().filter_map(|c| c["name"].as_str()).collect()
}

fn check(case: &Case) {
    let Case {
        name,
        exclusions,
        record,
        warnings,
    } = case;
    let pod = read_yaml(&fixture_path(&format!("{name}.yaml")));
    let rewrite = rewrite_pod_with(&pod, &replacing()).expect("the fixture rewrites");
    let mut after = pod.clone();
    json_patch::patch(&mut after, &rewrite.patch).expect("the patch applies");

    let expected_path = fixture_path(&format!("{name}.expected.yaml"));
    if std::env::var_os("PROBE_BYPASS_BLESS").is_some() {
        let text = format!(
            "# {name}.yaml after `probe-bypass rewrite --replace-mesh-init` (tests/replace_mesh_init.rs).\n{}",
            serde_norway::to_string(&after).expect("YAML")
        );
        std::fs::write(&expected_path, text).expect("written");
    }
    assert_eq!(
        after,
        read_yaml(&expected_path),
        "{name}: the pod after the rewrite\n{}",
        serde_norway::to_string(&after).expect("YAML")
    );

    let said: Vec<String> = rewrite.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(said, *warnings, "{name}: warnings");

    for (key, value) in *exclusions {
        assert_eq!(annotations(&after)[*key], *value, "{name}: {key}");
    }
    for (key, value) in annotations(&pod) {
        if !exclusions.iter().any(|(k, _)| k == key) {
            assert_eq!(
                annotations(&after).get(key),
                Some(value),
                "{name}: {key} kept"
            );
        }
    }
    let written = annotations(&after)
        .get(REPLACED_MESH_INIT_ANNOTATION)
        .map(|text| serde_json::from_str::<Value>(text.as_str().expect("a string")).expect("JSON"));
    assert_eq!(written, *record, "{name}: the record");
    match record {
        Some(_) => assert!(
            init_names(&after).contains(&VALIDATION_CONTAINER_NAME),
            "{name}: validation container"
        ),
        None => assert_eq!(
            init_names(&after),
            init_names(&pod),
            "{name}: init containers kept"
        ),
    }

    let again = rewrite_pod_with(&after, &replacing()).expect("the result rewrites");
    assert_eq!(
        again.patch.0,
        [],
        "{name}: a second rewrite changes nothing"
    );
    // Without the option the init containers are the rewriter's no business, as before.
    let plain = rewrite_pod(&pod, Style::Osm).expect("rewrites");
    let touched: Vec<String> = plain
        .patch
        .0
        .iter()
        .map(|op| op.path().to_string())
        .filter(|path| !path.contains("Probe") && !path.contains("original-probes"))
        .collect();
    assert_eq!(
        touched,
        Vec::<String>::new(),
        "{name}: without --replace-mesh-init"
    );
}

fn record(
    init: (&str, &str),
    healthcheck: Option<(&str, &str)>,
    mesh: &str,
    carried: Value,
) -> Value {
    let mut record = json!({"mesh": mesh, "initContainer": {"name": init.0, "image": init.1}});
    if let Some((name, image)) = healthcheck {
        record["healthcheckContainer"] = json!({"name": name, "image": image});
    }
    record["carried"] = carried;
    record
}

const FSM_INIT: (&str, &str) = ("fsm-init", "flomesh/fsm-sidecar-init:1.6.0");
const FSM_HEALTHCHECK: (&str, &str) = ("fsm-healthcheck", "flomesh/fsm-healthcheck:1.6.0");
const OSM_INIT: (&str, &str) = ("osm-init", "openservicemesh/init:v1.2.4");
const OSM_HEALTHCHECK: (&str, &str) = ("osm-healthcheck", "openservicemesh/osm-healthcheck:v1.2.4");

#[test]
fn fsm_pod_without_exclusions_gets_the_validation_container_and_loses_the_healthcheck() {
    check(&Case {
        name: "fsm-bookstore",
        exclusions: &[],
        record: Some(record(FSM_INIT, Some(FSM_HEALTHCHECK), "fsm", json!({}))),
        warnings: &[],
    });
}

#[test]
fn fsm_exclusions_from_annotations_and_mesh_config_are_merged_into_the_annotations() {
    check(&Case {
        name: "fsm-exclusions",
        exclusions: &[
            ("flomesh.io/inbound-port-exclusion-list", "8081,9090"),
            ("flomesh.io/outbound-port-exclusion-list", "5432,6379"),
            (
                "flomesh.io/outbound-ip-range-exclusion-list",
                "10.10.0.0/16,169.254.169.254/32",
            ),
            (
                "flomesh.io/outbound-ip-range-inclusion-list",
                "10.96.0.0/12",
            ),
        ],
        record: Some(record(
            FSM_INIT,
            Some(FSM_HEALTHCHECK),
            "fsm",
            json!({
                "flomesh.io/inbound-port-exclusion-list": "9090,8081",
                "flomesh.io/outbound-port-exclusion-list": "6379,5432",
                "flomesh.io/outbound-ip-range-exclusion-list": "10.10.0.0/16,169.254.169.254/32",
                "flomesh.io/outbound-ip-range-inclusion-list": "10.96.0.0/12",
            }),
        )),
        warnings: &[],
    });
}

#[test]
fn osm_pod_keeps_its_annotations_as_written_and_its_envoy_probe_warns_as_before() {
    check(&Case {
        name: "osm-bookbuyer",
        exclusions: &[
            (
                "openservicemesh.io/outbound-ip-range-exclusion-list",
                "192.168.100.0/24, 10.20.0.0/16",
            ),
            ("openservicemesh.io/outbound-port-exclusion-list", "3306"),
        ],
        record: Some(record(
            OSM_INIT,
            Some(OSM_HEALTHCHECK),
            "osm",
            json!({
                "openservicemesh.io/outbound-port-exclusion-list": "3306",
                "openservicemesh.io/outbound-ip-range-exclusion-list": "192.168.100.0/24,10.20.0.0/16",
            }),
        )),
        warnings: &[
            "pod bookbuyer-6c8d9f7b5-q8w2e: container bookbuyer: readiness probe left unchanged: \
             it already targets probe port 15902, and neither its headers nor the pod's \
             probe-bypass.io/original-probes annotation say what it checks (OSM's injector keeps \
             that in the proxy's configuration), so the agent cannot answer it",
        ],
    });
}

#[test]
fn a_native_sidecar_starts_after_the_validation_container_as_it_did_after_fsm_init() {
    check(&Case {
        name: "fsm-native-sidecar",
        exclusions: &[("flomesh.io/outbound-port-exclusion-list", "53")],
        record: Some(record(
            FSM_INIT,
            Some(FSM_HEALTHCHECK),
            "fsm",
            json!({"flomesh.io/outbound-port-exclusion-list": "53"}),
        )),
        warnings: &[],
    });
    let after = read_yaml(&fixture_path("fsm-native-sidecar.expected.yaml"));
    assert_eq!(init_names(&after), [VALIDATION_CONTAINER_NAME, "sidecar"]);
}

#[test]
fn an_interface_exclusion_keeps_fsm_init_and_names_both_rules() {
    let why = "leaves interface net1 out of interception (MeshConfig \
               traffic.networkInterfaceExclusionList); the datapath has no interface exclusion";
    let kept = "pod bookthief-69f7c8d5b-z4x6c: init container fsm-init kept, and with it the \
                mesh's iptables rules: rule";
    let inbound = format!("{kept} `-I FSM_PROXY_INBOUND -i net1 -j RETURN` {why}");
    let outbound = format!("{kept} `-A FSM_PROXY_OUTBOUND -o net1 -j RETURN` {why}");
    let (inbound, outbound): (&'static str, &'static str) = (inbound.leak(), outbound.leak());
    check(&Case {
        name: "fsm-interface-exclusion",
        exclusions: &[("flomesh.io/outbound-port-exclusion-list", "8443")],
        record: None,
        warnings: Box::leak(Box::new([inbound, outbound])),
    });
}

#[test]
fn local_proxy_mode_pod_ip_keeps_osm_init_and_names_the_rule() {
    check(&Case {
        name: "osm-local-proxy-pod-ip",
        exclusions: &[],
        record: None,
        warnings: &[
            "pod bookstore-5b7d8c9f4-h2j5k: init container osm-init kept, and with it the mesh's \
             iptables rules: rule `-I OUTPUT -p tcp -o lo -d 127.0.0.1/32 -m owner --uid-owner \
             1500 -j DNAT --to-destination $POD_IP` sends the proxy's connections to 127.0.0.1 \
             to the pod's IP instead (MeshConfig sidecar.localProxyMode: PodIP); the datapath \
             leaves them on loopback",
        ],
    });
}

#[test]
fn an_fsm_init_of_another_shape_is_kept_with_a_warning() {
    check(&Case {
        name: "fsm-init-other-shape",
        exclusions: &[],
        record: None,
        warnings: &[
            "pod orders-7d9b8c6f5-w3e8r: init container fsm-init kept, and with it the mesh's \
             iptables rules: it has the name of the mesh's iptables init container but not the \
             injector's shape: it does not run a shell script (`/bin/sh -c <script>`) as the \
             injector's does",
        ],
    });
}

fn fixture_arg(name: &str) -> String {
    fixture_path(name).to_str().expect("UTF-8").to_owned()
}

#[test]
fn cli_replaces_the_mesh_init_as_the_library_does() {
    let path = fixture_arg("fsm-exclusions.yaml");
    let output = run_rewrite(&["--replace-mesh-init", "-f", &path], b"");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stderr), "");
    let printed: Value = serde_norway::from_slice(&output.stdout).expect("YAML");
    assert_eq!(
        printed,
        read_yaml(&fixture_path("fsm-exclusions.expected.yaml"))
    );

    let output = run_rewrite(
        &[
            "--replace-mesh-init",
            "--validation-image",
            "registry.example/pb:1.2",
            "-f",
            &path,
        ],
        b"",
    );
    let printed: Value = serde_norway::from_slice(&output.stdout).expect("YAML");
    let validation = &printed["spec"]["initContainers"][1];
    assert_eq!(validation["name"], VALIDATION_CONTAINER_NAME);
    assert_eq!(validation["image"], "registry.example/pb:1.2");
}

#[test]
fn cli_diff_shows_what_was_removed_and_added_and_nothing_else() {
    let path = fixture_arg("fsm-bookstore.yaml");
    let output = run_rewrite(&["--replace-mesh-init", "--diff", "-f", &path], b"");
    assert!(output.status.success(), "{output:?}");
    let diff = String::from_utf8(output.stdout).expect("UTF-8");
    assert!(
        diff.starts_with(&format!("--- {path}\n+++ {path} (rewritten)\n@@ ")),
        "{diff}"
    );
    for line in [
        "-  - name: fsm-init",
        "+  - name: probe-bypass-validation",
        "+    - /probe-bypass",
        "-  - name: fsm-healthcheck",
        "+    probe-bypass.io/replaced-mesh-init: '{\"mesh\":\"fsm\",\"initContainer\":{\"name\":\"fsm-init\",\"image\":\"flomesh/fsm-sidecar-init:1.6.0\"},\"healthcheckContainer\":{\"name\":\"fsm-healthcheck\",\"image\":\"flomesh/fsm-healthcheck:1.6.0\"},\"carried\":{}}'",
    ] {
        assert!(diff.lines().any(|l| l == line), "{line:?} not in\n{diff}");
    }
    // The app's container and the sidecar are not in the diff: only context lines name them.
    assert!(
        !diff
            .lines()
            .any(|l| l.starts_with(['-', '+']) && l.contains("bookstore:latest")),
        "{diff}"
    );

    // Without the option nothing changes, so the diff is empty.
    let output = run_rewrite(&["--diff", "-f", &path], b"");
    assert!(output.status.success(), "{output:?}");
    assert_eq!(String::from_utf8_lossy(&output.stdout), "");
}

#[test]
fn a_mesh_init_container_added_again_is_removed_without_a_second_validation_container() {
    let pod = read_yaml(&fixture_path("fsm-bookstore.yaml"));
    let mut replaced = read_yaml(&fixture_path("fsm-bookstore.expected.yaml"));
    // An injector reinvoked after the webhook appends its init container again.
    let init = pod["spec"]["initContainers"][0].clone();
    replaced["spec"]["initContainers"]
        .as_array_mut()
        .expect("init containers")
        .push(init);
    let rewrite = rewrite_pod_with(&replaced, &replacing()).expect("rewrites");
    let mut after = replaced.clone();
    json_patch::patch(&mut after, &rewrite.patch).expect("the patch applies");
    assert_eq!(init_names(&after), [VALIDATION_CONTAINER_NAME]);
    assert_eq!(
        after["spec"]["initContainers"],
        read_yaml(&fixture_path("fsm-bookstore.expected.yaml"))["spec"]["initContainers"]
    );
}

/// A pod whose script excludes every outbound address leaves the validation's check nothing the
/// datapath would redirect: replacing its init container would hold it forever, so it is kept,
/// with a warning that says why.
#[test]
fn a_pod_that_excludes_every_outbound_address_keeps_its_init_container() {
    let mut pod = read_yaml(&fixture_path("fsm-bookstore.yaml"));
    let script = &mut pod["spec"]["initContainers"][0]["args"][1];
    let catch_all = "-A FSM_PROXY_OUTBOUND -j FSM_PROXY_OUT_REDIRECT";
    let text = script.as_str().expect("the script").to_owned();
    assert!(text.contains(catch_all), "the fixture's script changed");
    *script = text
        .replace(
            catch_all,
            &format!("-A FSM_PROXY_OUTBOUND -d 0.0.0.0/0 -j RETURN\n{catch_all}"),
        )
        .into();

    let rewrite = rewrite_pod_with(&pod, &replacing()).expect("rewrites");
    let mut after = pod.clone();
    json_patch::patch(&mut after, &rewrite.patch).expect("the patch applies");

    assert_eq!(init_names(&after), init_names(&pod), "init containers kept");
    assert!(!annotations(&after).contains_key(REPLACED_MESH_INIT_ANNOTATION));
    let said: Vec<String> = rewrite.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(
        said,
        [
            "pod bookstore-v1-5d8c7b9f6-x2k4q: init container fsm-init kept, and with it the \
             mesh's iptables rules: the pod could not be validated: its outbound IP range \
             exclusions cover every documentation range of IPv4, so the validation's check has \
             no address the datapath would redirect"
        ]
    );
}
