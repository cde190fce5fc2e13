//! Meshed test pods as the mesh's injector writes them, and run as a container runtime would run
//! them, for the tests and the demo of `--replace-mesh-init` (issue 14).
//!
//! [`injector_output`] takes the injector's output for a real pod (the fixtures
//! `tests/fixtures/rewrite/mesh-init/fsm-bookstore.yaml` and `osm-bookbuyer.yaml`, written from
//! FSM's and OSM's `pkg/injector`) and makes it the output for a test pod: its name, address and
//! app container, and the init container's script rendered with the pod's exclusions as the
//! injector renders them. The exclusions are only in that script, as MeshConfig's global ones are,
//! so a datapath that knows of them can only have been told by what the rewriter carried.
//!
//! [`replace_mesh_init`] runs the real `probe-bypass rewrite --replace-mesh-init` on it, and
//! [`container_command`] runs one of a manifest's containers in the pod the way the kubelet
//! would: its command and arguments, its user, and its environment with the downward API's values,
//! in the pod's network namespace and the test's cgroup. There are no images here: the host's
//! `/bin/sh` and `iptables-restore` stand in for the mesh's init image, and the agent's binary for
//! `/probe-bypass` in the agent's.

use std::{fmt, fs, process::Command};

use serde_json::{Value, json};

use crate::{
    agent::agent_bin, cgroup::TestCgroup, mesh::MeshSpec, pod::TestPod, rewrite_cli::run_rewrite,
};

/// The injector fixtures, a directory up from this crate (`tests/support`).
const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures");

/// The agent's binary as the validation container names it, in the agent's image.
const IMAGE_AGENT_BINARY: &str = "/probe-bypass";

/// The rewriter's validation init container, written out here rather than taken from the rewriter.
pub const VALIDATION_CONTAINER_NAME: &str = "probe-bypass-validation";

/// The namespace the test pods' manifests are in.
pub const NAMESPACE: &str = "test";

/// The mesh whose injector wrote a pod, from its annotations' prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mesh {
    Fsm,
    Osm,
}

impl Mesh {
    pub fn of(spec: &MeshSpec) -> Self {
        match spec.annotation_prefix {
            "openservicemesh.io/" => Self::Osm,
            _ => Self::Fsm,
        }
    }

    /// The fixture of this injector's output that the test pods are made from.
    fn fixture(self) -> &'static str {
        match self {
            Self::Fsm => "fsm-bookstore.yaml",
            Self::Osm => "osm-bookbuyer.yaml",
        }
    }

    /// The injector's output this mesh's test pods are made from, parsed, and its path.
    fn fixture_manifest(self) -> (Value, String) {
        let path = format!("{FIXTURES}/rewrite/mesh-init/{}", self.fixture());
        let text = fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {path}: {error}"));
        let manifest =
            serde_norway::from_str(&text).unwrap_or_else(|error| panic!("parse {path}: {error}"));
        (manifest, path)
    }

    /// Whether the injector makes its iptables init container privileged (OSM's is, FSM's adds
    /// only `NET_ADMIN`): the kubelet then makes the pod's sandbox privileged.
    pub fn init_container_is_privileged(self) -> bool {
        let (manifest, _) = self.fixture_manifest();
        init_containers(&manifest)
            .iter()
            .find(|container| container["name"] == self.init_container())
            .is_some_and(|container| container["securityContext"]["privileged"] == true)
    }

    /// The name of the injector's iptables init container.
    pub fn init_container(self) -> &'static str {
        match self {
            Self::Fsm => "fsm-init",
            Self::Osm => "osm-init",
        }
    }

    /// The prefix of the mesh's iptables chains (`FSM_PROXY_INBOUND`…).
    pub fn chains(self) -> &'static str {
        match self {
            Self::Fsm => "FSM",
            Self::Osm => "OSM",
        }
    }

    /// The path of the mesh's healthcheck, which its rewritten tcpSocket probes ask for.
    fn healthcheck_path(self) -> &'static str {
        match self {
            Self::Fsm => "/fsm-healthcheck",
            Self::Osm => "/osm-healthcheck",
        }
    }

    /// `probe-bypass rewrite --style` for the mesh.
    fn style(self) -> &'static str {
        match self {
            Self::Fsm => "fsm",
            Self::Osm => "osm",
        }
    }
}

impl fmt::Display for Mesh {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.style())
    }
}

/// The injector's output for test pod `pod`, named `name`, with an app container on `app_ports`
/// whose tcpSocket probes of `mesh.probe_ports` the injector rewrote to its healthcheck, and the
/// script of its init container rendered with the pod's exclusions (`outbound_cidrs` are the
/// outbound ranges, which name other test pods' addresses). YAML, as the fixtures are.
pub fn injector_output(
    name: &str,
    pod: &TestPod,
    app_ports: &[u16],
    mesh: &MeshSpec,
    outbound_cidrs: &[String],
) -> String {
    let kind = Mesh::of(mesh);
    let (mut manifest, path) = kind.fixture_manifest();

    manifest["metadata"]["name"] = name.into();
    manifest["metadata"]["namespace"] = NAMESPACE.into();
    // How the manifests source finds a pod's sandbox without a runtime (see `TestPod::manifest`).
    manifest["metadata"]["annotations"] = json!({"probe-bypass/netns": pod.netns_name});
    // The kubelet runs init containers while the pod is Pending, with its address assigned.
    manifest["status"] = json!({"phase": "Pending", "podIP": pod.ip.to_string()});

    let spec = &mut manifest["spec"];
    let script = injector_script(
        kind,
        mesh.inbound_port_exclusions,
        outbound_cidrs,
        mesh.outbound_port_exclusions,
    );
    let init = spec["initContainers"]
        .as_array_mut()
        .and_then(|all| {
            all.iter_mut()
                .find(|container| container["name"] == kind.init_container())
        })
        .unwrap_or_else(|| panic!("{path} has no {} init container", kind.init_container()));
    init["args"] = json!(["-c", script]);

    // The fixture's app container (the first) becomes the test pod's app.
    let containers = spec["containers"]
        .as_array_mut()
        .unwrap_or_else(|| panic!("{path} has no containers"));
    let probes: Vec<Value> = mesh
        .probe_ports
        .iter()
        .map(|port| {
            json!({"httpGet": {
                "path": kind.healthcheck_path(),
                "port": 15904,
                "httpHeaders": [{"name": "Original-Tcp-Port", "value": port.to_string()}],
            }})
        })
        .collect();
    let mut app = json!({
        "name": "app",
        "image": "probe-bypass-test/app",
        "ports": app_ports.iter().map(|port| json!({"containerPort": port})).collect::<Vec<_>>(),
    });
    if let Some(liveness) = probes.first() {
        app["livenessProbe"] = liveness.clone();
    }
    if let Some(readiness) = probes.get(1) {
        app["readinessProbe"] = readiness.clone();
    }
    containers[0] = app;

    serde_norway::to_string(&manifest).expect("a pod serializes")
}

/// The init container's script as the injector renders it (`GenerateIptablesCommands` /
/// `generateIptablesCommands`): the fixed rules of `tests/fixtures/fsm-init.iptables` (with the
/// mesh's chain names), inbound port exclusions inserted at the head of the inbound chain,
/// outbound ranges and then outbound ports before the outbound chain's final catch-all, fed to
/// `iptables-restore --noflush` from a here-document.
pub fn injector_script(
    mesh: Mesh,
    inbound_ports: &[u16],
    outbound_cidrs: &[String],
    outbound_ports: &[u16],
) -> String {
    let path = crate::mesh_rules::FSM_INIT_RULES;
    let fixed = fs::read_to_string(path).unwrap_or_else(|error| panic!("read {path}: {error}"));
    let chains = mesh.chains();
    let ports = |list: &[u16]| {
        list.iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(",")
    };
    let inbound_catch_all =
        format!("-A {chains}_PROXY_INBOUND -p tcp -j {chains}_PROXY_IN_REDIRECT");
    let outbound_catch_all = format!("-A {chains}_PROXY_OUTBOUND -j {chains}_PROXY_OUT_REDIRECT");

    let mut script =
        format!("iptables-restore --noflush <<EOF\n# {chains} sidecar interception rules\n");
    for line in fixed.lines().filter(|line| !line.starts_with('#')) {
        let line = line.replace("FSM_", &format!("{chains}_"));
        if line == outbound_catch_all {
            for cidr in outbound_cidrs {
                script.push_str(&format!("-A {chains}_PROXY_OUTBOUND -d {cidr} -j RETURN\n"));
            }
            if !outbound_ports.is_empty() {
                script.push_str(&format!(
                    "-A {chains}_PROXY_OUTBOUND -p tcp --match multiport --dports {} -j RETURN\n",
                    ports(outbound_ports)
                ));
            }
        }
        script.push_str(&line);
        script.push('\n');
        if line == inbound_catch_all && !inbound_ports.is_empty() {
            script.push_str(&format!(
                "-I {chains}_PROXY_INBOUND -p tcp --match multiport --dports {} -j RETURN\n",
                ports(inbound_ports)
            ));
        }
    }
    script.push_str("EOF\n");
    script
}

/// A pod after `probe-bypass rewrite --replace-mesh-init`.
pub struct Replaced {
    /// The rewritten pod, as `rewrite` prints it.
    pub manifest: String,
    /// `rewrite --diff`'s unified diff of it.
    pub diff: String,
    /// What `rewrite` warned of (its standard error).
    pub warnings: String,
}

/// Runs `probe-bypass rewrite --replace-mesh-init` (in `mesh`'s style) on `manifest`, once for
/// the pod and once with `--diff`. Panics if either fails.
pub fn replace_mesh_init(manifest: &str, mesh: Mesh) -> Replaced {
    let run = |extra: &[&str]| {
        let mut args = vec!["-f", "-", "--replace-mesh-init", "--style", mesh.style()];
        args.extend(extra);
        let output = run_rewrite(&args, manifest.as_bytes());
        assert!(
            output.status.success(),
            "probe-bypass rewrite {args:?} failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        output
    };
    let pod = run(&[]);
    let diff = run(&["--diff"]);
    Replaced {
        manifest: String::from_utf8_lossy(&pod.stdout).into_owned(),
        diff: String::from_utf8_lossy(&diff.stdout).into_owned(),
        warnings: String::from_utf8_lossy(&pod.stderr).into_owned(),
    }
}

/// `mesh`'s injector fixture as it is (its own names and addresses) after `probe-bypass rewrite
/// --replace-mesh-init`: the pod as the webhook admits it, the mesh's init container replaced by
/// the validation container.
pub fn replaced_fixture(mesh: Mesh) -> Value {
    let path = format!("{FIXTURES}/rewrite/mesh-init/{}", mesh.fixture());
    let text = fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {path}: {error}"));
    let replaced = replace_mesh_init(&text, mesh);
    serde_norway::from_str(&replaced.manifest)
        .unwrap_or_else(|error| panic!("parse the rewritten {path}: {error}"))
}

/// Whether `manifest` (YAML or JSON) has an init container named `name`.
pub fn has_init_container(manifest: &str, name: &str) -> bool {
    init_containers(&parse(manifest))
        .iter()
        .any(|container| container["name"] == name)
}

/// The command that runs init container `name` of `manifest` in `pod`, inside `cgroup`, as the
/// kubelet would on node `node`: the container's command and arguments (the image's binaries are
/// the host's, [`IMAGE_AGENT_BINARY`] the agent's), as its `runAsUser` (with no groups and no
/// capabilities left), with its environment, the downward API's fields filled in from the manifest
/// and the pod. `extra_args` go after the container's own.
pub fn container_command(
    manifest: &str,
    name: &str,
    pod: &TestPod,
    cgroup: &TestCgroup,
    node: &str,
    extra_args: &[&str],
) -> Command {
    let container = init_container(manifest, name);
    let manifest = parse(manifest);
    let strings = |value: &Value| -> Vec<String> {
        value
            .as_array()
            .map(|all| {
                all.iter()
                    .map(|item| item.as_str().expect("a string").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut argv = strings(&container["command"]);
    argv.extend(strings(&container["args"]));
    argv.extend(extra_args.iter().map(|arg| (*arg).to_owned()));
    if argv.first().map(String::as_str) == Some(IMAGE_AGENT_BINARY) {
        argv[0] = agent_bin().display().to_string();
    }
    assert!(!argv.is_empty(), "init container {name} runs nothing");

    let mut all = vec![
        "netns".to_owned(),
        "exec".to_owned(),
        pod.netns_name.clone(),
    ];
    let uid = container["securityContext"]["runAsUser"]
        .as_u64()
        .unwrap_or(0);
    if uid != 0 {
        let gid = container["securityContext"]["runAsGroup"]
            .as_u64()
            .unwrap_or(uid);
        all.extend([
            "setpriv".to_owned(),
            format!("--reuid={uid}"),
            format!("--regid={gid}"),
            "--clear-groups".to_owned(),
        ]);
    }
    all.extend(argv);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let mut command = cgroup.command("ip", &all);
    // A container's environment is what its manifest gives, not the test's.
    command
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    for variable in container["env"].as_array().into_iter().flatten() {
        let name = variable["name"].as_str().expect("an env name");
        let value = match (
            &variable["value"],
            &variable["valueFrom"]["fieldRef"]["fieldPath"],
        ) {
            (Value::String(value), _) => value.clone(),
            (_, Value::String(field)) => downward_api(&manifest, field, pod, node),
            _ => panic!("env {name} of {name}: neither a value nor a fieldRef"),
        };
        command.env(name, value);
    }
    command
}

/// The value the downward API gives `field` of the pod.
fn downward_api(manifest: &Value, field: &str, pod: &TestPod, node: &str) -> String {
    match field {
        "metadata.name" => manifest["metadata"]["name"]
            .as_str()
            .unwrap_or("")
            .to_owned(),
        "metadata.namespace" => NAMESPACE.to_owned(),
        "spec.nodeName" => node.to_owned(),
        "status.podIP" | "status.podIPs" => pod.ip.to_string(),
        other => panic!("the test runtime does not fill fieldRef {other}"),
    }
}

/// The init container `name` of `manifest` (YAML or JSON), as it stands there.
pub fn init_container(manifest: &str, name: &str) -> Value {
    init_containers(&parse(manifest))
        .iter()
        .find(|container| container["name"] == name)
        .unwrap_or_else(|| panic!("the pod has no init container {name}"))
        .clone()
}

fn parse(manifest: &str) -> Value {
    serde_norway::from_str(manifest).unwrap_or_else(|error| panic!("parse a manifest: {error}"))
}

fn init_containers(manifest: &Value) -> &[Value] {
    manifest["spec"]["initContainers"]
        .as_array()
        .map_or(&[], Vec::as_slice)
}
