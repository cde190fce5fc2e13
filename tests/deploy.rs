//! The manifests in `deploy/`, checked without a cluster: every object is a valid Kubernetes object
//! with no field the API server would drop, the DaemonSet runs the agent the way the agent reads
//! its command line and environment, its probes ask the real agent (each agent its own, also while
//! a rolling update runs two on a node), and it grants the privileges the agent's start-up check
//! asks for and no more. Needs no privileges.
#![expect(
    clippy::expect_used,
    reason = "the helpers read test fixtures: a missing piece fails the test, naming it"
)]

use std::{
    collections::{BTreeMap, BTreeSet},
    ffi::OsString,
    fs,
    io::ErrorKind,
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use clap::{CommandFactory as _, Parser as _};
use k8s_openapi::{
    api::{
        admissionregistration::v1::MutatingWebhookConfiguration,
        apps::v1::{DaemonSet, Deployment},
        batch::v1::Job,
        core::v1::{
            ConfigMap, Container, Namespace, PodSpec, Probe, Service, ServiceAccount, Volume,
            VolumeMount,
        },
        policy::v1::PodDisruptionBudget,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use probe_bypass::{
    cli::{Cli, Command as AgentCommand, HealthArgs, RunArgs, SelectedSource},
    datapath::DatapathMode,
    defaults::{
        ALIVE_PATH, BPFFS_DEFAULT_MOUNT, DEFAULT_ADMIN_ADDR, METRICS_PATH, READY_PATH,
        WEBHOOK_HEALTHZ_PATH, WEBHOOK_MUTATE_PATH, WEBHOOK_REPLACE_MESH_INIT_PATH,
    },
    preflight,
    source::PodSource,
};
use probe_bypass_testing::{
    agent::{Agent, NOBODY, free_loopback_port, with_flag},
    privilege::skip,
};
use serde::{Deserialize as _, Serialize, de::DeserializeOwned};
use serde_json::Value;

const NAMESPACE: &str = "probe-bypass";
const KUSTOMIZATION: &str = "kustomization.yaml";
/// Run by hand, once per node, at uninstall time; not part of the kustomization.
const UNINSTALL_JOB: &str = "uninstall-job.yaml";
/// The node name the tests give the downward API's `spec.nodeName`.
const NODE: &str = "node-a";
/// The agent's pod on it, as the DaemonSet controller names it.
const AGENT_POD: &str = "probe-bypass-7xk2p";

/// Environment variables are process-wide and clap reads them when the command is built: every
/// test that sets them, builds the agent's command, or starts a process holds this lock.
static ENV: Mutex<()> = Mutex::new(());

fn env_lock() -> MutexGuard<'static, ()> {
    ENV.lock().unwrap_or_else(PoisonError::into_inner)
}

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// One YAML document of a file in `deploy/`.
struct Doc {
    file: String,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.value["metadata"]["name"]
            .as_str()
            .or_else(|| self.value["metadata"]["generateName"].as_str())
            .unwrap_or_default()
    }

    /// The document as a typed Kubernetes object, refused if any of its fields is not one of the
    /// type's: the API server would drop such a field (or refuse it, with strict validation), so
    /// it is a typo or a field of another kind.
    fn try_typed<T: DeserializeOwned + Serialize>(&self) -> Result<T, String> {
        let what = format!("{} {} in deploy/{}", self.kind(), self.name(), self.file);
        let object: T = serde_json::from_value(self.value.clone())
            .map_err(|error| format!("{what}: {error}"))?;
        let back = serde_json::to_value(&object).map_err(|error| format!("{what}: {error}"))?;
        let lost = differences(&self.value, &back, "");
        if !lost.is_empty() {
            return Err(format!(
                "{what} has fields its type does not know (a typo?):\n  {}",
                lost.join("\n  ")
            ));
        }
        Ok(object)
    }

    fn typed<T: DeserializeOwned + Serialize>(&self) -> T {
        self.try_typed().unwrap_or_else(|error| panic!("{error}"))
    }
}

/// Where `typed`, the original after a trip through its Kubernetes type, lost or changed a value.
fn differences(original: &Value, typed: &Value, at: &str) -> Vec<String> {
    match (original, typed) {
        (Value::Object(original), Value::Object(typed)) => original
            .iter()
            .flat_map(|(key, value)| {
                let path = format!("{at}.{key}");
                match typed.get(key) {
                    Some(kept) => differences(value, kept, &path),
                    None => vec![format!("{path} is not a field")],
                }
            })
            .collect(),
        (Value::Array(original), Value::Array(typed)) if original.len() == typed.len() => original
            .iter()
            .zip(typed)
            .enumerate()
            .flat_map(|(i, (value, kept))| differences(value, kept, &format!("{at}[{i}]")))
            .collect(),
        _ if original == typed => Vec::new(),
        _ => vec![format!("{at}: {original} reads as {typed}")],
    }
}

/// The documents of a YAML text, empty ones left out.
fn parse_documents(file: &str, text: &str) -> Vec<Doc> {
    serde_norway::Deserializer::from_str(text)
        .map(|document| {
            Value::deserialize(document).unwrap_or_else(|error| panic!("deploy/{file}: {error}"))
        })
        .filter(|value| !value.is_null())
        .map(|value| Doc {
            file: file.to_owned(),
            value,
        })
        .collect()
}

/// The YAML files of `deploy/`, kustomization.yaml aside.
fn manifest_files() -> BTreeSet<String> {
    manifest_files_in("")
}

/// The YAML files of a directory under `deploy/` (`""`: deploy/ itself), kustomization.yaml
/// aside, as paths under `deploy/`.
fn manifest_files_in(dir: &str) -> BTreeSet<String> {
    fs::read_dir(deploy_dir().join(dir))
        .unwrap_or_else(|error| panic!("read deploy/{dir}: {error}"))
        .map(|entry| entry.expect("deploy/ entry").file_name())
        .map(|name| name.to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".yaml") || name.ends_with(".yml"))
        .filter(|name| name != KUSTOMIZATION)
        .map(|name| match dir {
            "" => name,
            dir => format!("{dir}/{name}"),
        })
        .collect()
}

fn documents_of(file: &str) -> Vec<Doc> {
    let text = fs::read_to_string(deploy_dir().join(file))
        .unwrap_or_else(|error| panic!("deploy/{file}: {error}"));
    parse_documents(file, &text)
}

fn all_documents() -> Vec<Doc> {
    manifest_files()
        .iter()
        .flat_map(|file| documents_of(file))
        .collect()
}

/// The one object of `kind` in `deploy/`.
fn the<T: DeserializeOwned + Serialize>(kind: &str) -> T {
    the_one_in(all_documents(), kind, "deploy/")
}

/// The one object of `kind` among `docs`, which are those of `place`.
fn the_one_in<T: DeserializeOwned + Serialize>(docs: Vec<Doc>, kind: &str, place: &str) -> T {
    let docs: Vec<Doc> = docs.into_iter().filter(|doc| doc.kind() == kind).collect();
    assert_eq!(docs.len(), 1, "expected one {kind} in {place}");
    docs[0].typed()
}

/// The documents of the files a kustomization (a path under `deploy/`) lists.
fn documents_listed_by(kustomization: &str) -> Vec<Doc> {
    kustomization_resources_of(kustomization)
        .iter()
        .flat_map(|file| documents_of(file))
        .collect()
}

fn kustomization_resources() -> Vec<String> {
    kustomization_resources_of(KUSTOMIZATION)
}

/// The files a kustomization (a path under `deploy/`) lists, as paths under `deploy/`.
fn kustomization_resources_of(kustomization: &str) -> Vec<String> {
    let dir = Path::new(kustomization)
        .parent()
        .map(|dir| dir.to_string_lossy().into_owned())
        .filter(|dir| !dir.is_empty());
    let docs = documents_of(kustomization);
    assert_eq!(docs.len(), 1, "one Kustomization");
    let kustomization = &docs[0].value;
    assert_eq!(kustomization["kind"], "Kustomization");
    kustomization["resources"]
        .as_array()
        .expect("resources")
        .iter()
        .map(|resource| resource.as_str().expect("a file name"))
        .map(|file| match &dir {
            Some(dir) => format!("{dir}/{file}"),
            None => file.to_owned(),
        })
        .collect()
}

fn pod_spec(daemon_set: &DaemonSet) -> &PodSpec {
    daemon_set
        .spec
        .template
        .spec
        .as_ref()
        .expect("DaemonSet pod spec")
}

/// The pod's one long-running container (init containers aside).
fn only_container(spec: &PodSpec) -> &Container {
    assert_eq!(spec.containers.len(), 1, "one container");
    &spec.containers[0]
}

fn agent_daemon_set() -> DaemonSet {
    the("DaemonSet")
}

/// The uninstall Job's pod spec.
fn uninstall_pod_spec() -> PodSpec {
    let job: Job = the("Job");
    job.spec
        .and_then(|spec| spec.template.spec)
        .expect("Job pod spec")
}

fn args_of(container: &Container) -> Vec<String> {
    assert!(
        container.command.is_none(),
        "{}: the image's entrypoint is the agent; give only args",
        container.name
    );
    container.args.clone().expect("args")
}

/// The environment the kubelet gives `container` on node [`NODE`]: its `env`, downward API
/// fields resolved, and the ConfigMaps its `envFrom` names, read from `deploy/`.
fn container_env(container: &Container) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    for from in container.env_from.iter().flatten() {
        let name = &from
            .config_map_ref
            .as_ref()
            .expect("envFrom a ConfigMap")
            .name;
        let config_map: ConfigMap = the("ConfigMap");
        assert_eq!(config_map.metadata.name.as_ref(), Some(name));
        let prefix = from.prefix.clone().unwrap_or_default();
        for (key, value) in config_map.data.expect("ConfigMap data") {
            env.insert(format!("{prefix}{key}"), value);
        }
    }
    for var in container.env.iter().flatten() {
        let value = match (&var.value, &var.value_from) {
            (Some(value), None) => value.clone(),
            (None, Some(from)) => {
                let field = from.field_ref.as_ref().expect("a downward API field");
                match field.field_path.as_str() {
                    "spec.nodeName" => NODE.to_owned(),
                    "metadata.name" => AGENT_POD.to_owned(),
                    other => panic!("env {}: the test does not fill field {other}", var.name),
                }
            }
            _ => panic!("env {}: a value or a field", var.name),
        };
        env.insert(var.name.clone(), value);
    }
    env
}

/// Every environment variable the agent's command line reads, by the long flag it sets.
fn agent_env_names() -> BTreeMap<String, String> {
    fn walk(command: &clap::Command, names: &mut BTreeMap<String, String>) {
        for arg in command.get_arguments() {
            if let (Some(env), Some(long)) = (arg.get_env(), arg.get_long()) {
                names.insert(env.to_string_lossy().into_owned(), format!("--{long}"));
            }
        }
        for subcommand in command.get_subcommands() {
            walk(subcommand, names);
        }
    }
    let _env = env_lock();
    let mut names = BTreeMap::new();
    walk(&Cli::command(), &mut names);
    names
}

/// Parses `probe-bypass <args>` as the agent does, with exactly `env` as the variables it reads.
fn parse_agent(args: &[String], env: &BTreeMap<String, String>) -> Result<Cli, clap::Error> {
    let names = agent_env_names();
    let _env = env_lock();
    let saved: Vec<(&String, Option<OsString>)> = names
        .keys()
        .map(|name| (name, std::env::var_os(name)))
        .collect();
    for name in names.keys() {
        // SAFETY: every test that reads or writes the environment, or starts a process, holds
        // `ENV`, so no other thread touches it meanwhile.
        unsafe {
            match env.get(name) {
                Some(value) => std::env::set_var(name, value),
                None => std::env::remove_var(name),
            }
        }
    }
    let parsed =
        Cli::try_parse_from(std::iter::once("probe-bypass".to_owned()).chain(args.iter().cloned()));
    for (name, value) in saved {
        // SAFETY: as above.
        unsafe {
            match value {
                Some(value) => std::env::set_var(name, value),
                None => std::env::remove_var(name),
            }
        }
    }
    parsed
}

fn run_args(cli: Cli) -> RunArgs {
    match cli.command {
        AgentCommand::Run(args) => *args,
        other => panic!("expected `run`, not {other:?}"),
    }
}

/// The DaemonSet's command line as the agent reads it, in the DaemonSet's environment.
fn daemon_set_run_args() -> RunArgs {
    let container = only_container(pod_spec(&agent_daemon_set())).clone();
    let parsed = parse_agent(&args_of(&container), &container_env(&container))
        .unwrap_or_else(|error| panic!("the DaemonSet's args do not parse:\n{error}"));
    run_args(parsed)
}

fn mount<'a>(container: &'a Container, host_path: &str, spec: &PodSpec) -> &'a VolumeMount {
    let volume = spec
        .volumes
        .iter()
        .flatten()
        .find(|volume| volume.host_path.as_ref().map(|h| h.path.as_str()) == Some(host_path))
        .unwrap_or_else(|| panic!("a hostPath volume of {host_path}"));
    assert_eq!(
        volume.host_path.as_ref().and_then(|h| h.type_.as_deref()),
        Some("Directory"),
        "{host_path} must exist on the node"
    );
    container
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| mount.name == volume.name)
        .unwrap_or_else(|| panic!("{} mounts {host_path}", container.name))
}

/// The volume `mount` mounts.
fn volume_of<'a>(spec: &'a PodSpec, mount: &VolumeMount) -> &'a Volume {
    spec.volumes
        .iter()
        .flatten()
        .find(|volume| volume.name == mount.name)
        .unwrap_or_else(|| panic!("no volume {} for its mount", mount.name))
}

#[test]
fn every_manifest_is_a_kubernetes_object_without_unknown_fields() {
    let docs = all_documents();
    let mut kinds = BTreeSet::new();
    for doc in &docs {
        let namespace = match doc.kind() {
            "Namespace" => {
                let object: Namespace = doc.typed();
                assert_eq!(object.metadata.name.as_deref(), Some(NAMESPACE));
                None
            }
            "ServiceAccount" => doc.typed::<ServiceAccount>().metadata.namespace,
            "ClusterRole" => doc.typed::<ClusterRole>().metadata.namespace,
            "ClusterRoleBinding" => doc.typed::<ClusterRoleBinding>().metadata.namespace,
            "ConfigMap" => doc.typed::<ConfigMap>().metadata.namespace,
            "DaemonSet" => doc.typed::<DaemonSet>().metadata.namespace,
            "Job" => doc.typed::<Job>().metadata.namespace,
            other => panic!("deploy/{}: unexpected kind {other:?}", doc.file),
        };
        let cluster_wide = ["Namespace", "ClusterRole", "ClusterRoleBinding"];
        let expected = (!cluster_wide.contains(&doc.kind())).then(|| NAMESPACE.to_owned());
        assert_eq!(namespace, expected, "{} {}", doc.kind(), doc.name());
        kinds.insert(doc.kind().to_owned());
    }
    assert_eq!(kinds.len(), 7, "every kind deploy/ needs: {kinds:?}");

    // The check itself catches a misspelt field.
    let typo = parse_documents(
        "typo.yaml",
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\ndat: {a: b}\n",
    );
    let refused = typo[0]
        .try_typed::<ConfigMap>()
        .expect_err("a misspelt field is refused");
    assert!(refused.contains(".dat is not a field"), "{refused}");
}

#[test]
fn the_kustomization_lists_every_manifest_but_the_uninstall_job() {
    let listed: Vec<String> = kustomization_resources();
    let unique: BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(unique.len(), listed.len(), "listed twice: {listed:?}");
    for file in &listed {
        assert!(
            deploy_dir().join(file).is_file(),
            "deploy/{file} is missing"
        );
    }
    let mut expected = manifest_files();
    assert!(expected.remove(UNINSTALL_JOB), "deploy/{UNINSTALL_JOB}");
    assert_eq!(unique, expected);
}

#[test]
fn kubectl_kustomize_renders_exactly_the_listed_objects() {
    assert_kustomize_renders(&deploy_dir(), &documents_listed_by(KUSTOMIZATION));
}

/// `kubectl kustomize <dir>` gives the objects of `listed`, unchanged (skipped without kubectl).
fn assert_kustomize_renders(dir: &Path, listed: &[Doc]) {
    let output = {
        let _env = env_lock();
        Command::new("kubectl").arg("kustomize").arg(dir).output()
    };
    let output = match output {
        Ok(output) => output,
        Err(error) if error.kind() == ErrorKind::NotFound => {
            return skip("kubectl_kustomize", "kubectl is not installed");
        }
        Err(error) => panic!("kubectl: {error}"),
    };
    assert!(
        output.status.success(),
        "kubectl kustomize {} failed:\n{}",
        dir.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let rendered = parse_documents(
        "(kubectl kustomize)",
        &String::from_utf8_lossy(&output.stdout),
    );
    let key = |doc: &Doc| (doc.kind().to_owned(), doc.name().to_owned());
    assert_eq!(
        rendered.iter().map(key).collect::<BTreeSet<_>>(),
        listed.iter().map(key).collect::<BTreeSet<_>>()
    );
    for doc in &rendered {
        assert!(
            listed.iter().any(|original| original.value == doc.value),
            "kustomize changed {} {}",
            doc.kind(),
            doc.name()
        );
    }
}

/// The ClusterRole of `deploy/` named `name`.
fn cluster_role(name: &str) -> ClusterRole {
    let docs = all_documents()
        .into_iter()
        .filter(|doc| doc.kind() == "ClusterRole" && doc.name() == name)
        .collect();
    the_one_in(docs, "ClusterRole", &format!("deploy/ named {name}"))
}

/// Each rule of `role` as (API groups, resources, verbs), sorted.
fn resource_rules(role: &ClusterRole) -> BTreeSet<(String, String, String)> {
    let join = |list: Option<&Vec<String>>| list.map(|list| list.join(",")).unwrap_or_default();
    role.rules
        .iter()
        .flatten()
        .map(|rule| {
            assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
            let mut verbs = rule.verbs.clone();
            verbs.sort();
            (
                join(rule.api_groups.as_ref()),
                join(rule.resources.as_ref()),
                verbs.join(","),
            )
        })
        .collect()
}

#[test]
fn the_cluster_role_grants_reading_pods_and_asking_for_reviews_only() {
    let role = cluster_role(NAMESPACE);
    let owned = |(groups, resources, verbs): (&str, &str, &str)| {
        (groups.to_owned(), resources.to_owned(), verbs.to_owned())
    };
    assert_eq!(
        resource_rules(&role),
        [
            ("", "pods", "get,list,watch"),
            // The HTTPS admin address's checks of its callers (`run --secure-admin-addr`).
            ("authentication.k8s.io", "tokenreviews", "create"),
            ("authorization.k8s.io", "subjectaccessreviews", "create"),
        ]
        .into_iter()
        .map(owned)
        .collect()
    );
    assert!(role.aggregation_rule.is_none());

    let binding: ClusterRoleBinding = the("ClusterRoleBinding");
    assert_eq!(
        (binding.role_ref.kind.as_str(), Some(&binding.role_ref.name)),
        ("ClusterRole", role.metadata.name.as_ref())
    );
    let account: ServiceAccount = the("ServiceAccount");
    let subjects = binding.subjects.expect("subjects");
    assert_eq!(subjects.len(), 1);
    assert_eq!(
        (
            subjects[0].kind.as_str(),
            Some(&subjects[0].name),
            subjects[0].namespace.as_deref()
        ),
        (
            "ServiceAccount",
            account.metadata.name.as_ref(),
            Some(NAMESPACE)
        )
    );
    assert_eq!(
        pod_spec(&agent_daemon_set()).service_account_name,
        account.metadata.name
    );
}

/// A scraper's role grants `get` on what the HTTPS admin address reviews, and nothing else.
#[test]
fn the_metrics_reader_role_grants_get_on_the_reviewed_paths_only() {
    let role = cluster_role("probe-bypass-metrics-reader");
    let rules = role.rules.expect("rules");
    assert_eq!(rules.len(), 1, "{rules:?}");
    let rule = &rules[0];
    assert!(rule.api_groups.is_none() && rule.resources.is_none());
    assert_eq!(rule.verbs, ["get"]);
    let urls: BTreeSet<&str> = rule
        .non_resource_urls
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();
    assert_eq!(urls, BTreeSet::from([METRICS_PATH, READY_PATH]));
}

const MONITORING_KUSTOMIZATION: &str = "monitoring/kustomization.yaml";

/// deploy/monitoring/: a headless Service on the DaemonSet's HTTPS admin port, prometheus-operator's
/// ServiceMonitor scraping it with a bearer token, and the metrics reader role bound to Prometheus.
#[test]
fn the_service_monitor_scrapes_the_https_admin_port_with_a_bearer_token() {
    let listed: BTreeSet<String> = kustomization_resources_of(MONITORING_KUSTOMIZATION)
        .into_iter()
        .collect();
    assert_eq!(listed, manifest_files_in("monitoring"));
    let docs = documents_listed_by(MONITORING_KUSTOMIZATION);
    let secure = daemon_set_run_args()
        .secure_admin_addr
        .expect("the DaemonSet gives --secure-admin-addr");

    let service: Service = the_one_in(
        documents_listed_by(MONITORING_KUSTOMIZATION),
        "Service",
        "deploy/monitoring/",
    );
    assert_eq!(service.metadata.namespace.as_deref(), Some(NAMESPACE));
    let spec = service.spec.expect("a spec");
    assert_eq!(spec.cluster_ip.as_deref(), Some("None"), "headless");
    let daemon_set = agent_daemon_set();
    let pod_labels = daemon_set
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|metadata| metadata.labels.clone())
        .expect("pod labels");
    for (key, value) in spec.selector.iter().flatten() {
        assert_eq!(
            pod_labels.get(key),
            Some(value),
            "the Service selects the agents"
        );
    }
    let ports = spec.ports.expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].port, i32::from(secure.port()));
    assert_eq!(
        ports[0].target_port,
        Some(IntOrString::Int(i32::from(secure.port())))
    );

    let monitor = docs
        .iter()
        .find(|doc| doc.kind() == "ServiceMonitor")
        .expect("a ServiceMonitor");
    assert_eq!(monitor.value["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor.value["metadata"]["namespace"], NAMESPACE);
    let service_labels = service.metadata.labels.expect("Service labels");
    for (key, value) in monitor.value["spec"]["selector"]["matchLabels"]
        .as_object()
        .expect("matchLabels")
    {
        assert_eq!(service_labels.get(key).map(String::as_str), value.as_str());
    }
    let endpoints = monitor.value["spec"]["endpoints"]
        .as_array()
        .expect("endpoints");
    assert_eq!(endpoints.len(), 1);
    let endpoint = &endpoints[0];
    assert_eq!(endpoint["port"].as_str(), ports[0].name.as_deref());
    assert_eq!(endpoint["path"], METRICS_PATH);
    assert_eq!(endpoint["scheme"], "https");
    assert_eq!(
        endpoint["bearerTokenFile"],
        "/var/run/secrets/kubernetes.io/serviceaccount/token"
    );

    let binding: ClusterRoleBinding = the_one_in(
        documents_listed_by(MONITORING_KUSTOMIZATION),
        "ClusterRoleBinding",
        "deploy/monitoring/",
    );
    assert_eq!(binding.role_ref.name, "probe-bypass-metrics-reader");
    assert_kustomize_renders(&deploy_dir().join("monitoring"), &docs);
}

#[test]
fn every_config_map_key_is_an_environment_variable_the_agent_reads() {
    let config_map: ConfigMap = the("ConfigMap");
    let read = agent_env_names();
    let container = only_container(pod_spec(&agent_daemon_set())).clone();
    let args = args_of(&container);
    let keys: Vec<String> = config_map.data.expect("data").into_keys().collect();
    let unknown: Vec<&String> = keys.iter().filter(|key| !read.contains_key(*key)).collect();
    assert!(
        unknown.is_empty(),
        "ConfigMap keys the agent does not read: {unknown:?}; it reads {read:?}"
    );
    for key in &keys {
        // A flag on the command line wins over its variable, which would then do nothing.
        assert!(
            !args.contains(&read[key]),
            "{key} is also given as {} in the DaemonSet's args",
            read[key]
        );
    }
    for var in container.env.iter().flatten() {
        assert!(read.contains_key(&var.name), "env {} is not read", var.name);
    }
}

/// A pod whose validation fails names the node's agent pod, which the agent learns from POD_NAME
/// (reported on its pods' 15904 as /probe-bypass-status): the DaemonSet must give it.
#[test]
fn the_agent_is_given_its_own_pod_name() {
    let container = only_container(pod_spec(&agent_daemon_set())).clone();
    let env = container_env(&container);
    assert_eq!(
        env.get("POD_NAME").map(String::as_str),
        Some(AGENT_POD),
        "the DaemonSet's env: {env:?}"
    );
}

#[test]
fn the_daemonset_command_line_parses_and_the_config_map_holds_the_defaults() {
    let args = daemon_set_run_args();
    let selected = {
        // `select` reads KUBERNETES_SERVICE_HOST.
        let _env = env_lock();
        args.pods.select()
    };
    assert_eq!(
        selected,
        Ok(SelectedSource::Kube {
            node_name: NODE.to_owned()
        })
    );
    let config_map: ConfigMap = the("ConfigMap");
    let datapath = &config_map.data.as_ref().expect("data")["PROBE_BYPASS_DATAPATH"];
    let mode = match datapath.as_str() {
        "none" => DatapathMode::None,
        "ebpf" => DatapathMode::Ebpf,
        other => panic!("PROBE_BYPASS_DATAPATH={other}"),
    };
    assert_eq!(args.datapath.mode, mode);

    // Without the ConfigMap the agent runs on its defaults; with it, the same but for the
    // datapath mode, which the ConfigMap chooses on purpose.
    let container = only_container(pod_spec(&agent_daemon_set())).clone();
    let node_only = BTreeMap::from([("NODE_NAME".to_owned(), NODE.to_owned())]);
    let mut defaults = run_args(parse_agent(&args_of(&container), &node_only).expect("parses"));
    defaults.datapath.mode = mode;
    assert_eq!(format!("{args:?}"), format!("{defaults:?}"));
}

#[test]
fn the_agent_paths_point_into_the_host_mounts() {
    let daemon_set = agent_daemon_set();
    let spec = pod_spec(&daemon_set);
    let container = only_container(spec);
    let args = daemon_set_run_args();

    // Pins go on the node's bpffs. Its mount is not /sys/fs/bpf, the one place the agent would
    // mount a bpffs of its own: in the container's mount namespace, pins there would vanish with
    // the container and detach the datapath.
    let bpffs = mount(container, "/sys/fs/bpf", spec);
    assert_eq!(
        args.datapath.pin_path.parent(),
        Some(Path::new(&bpffs.mount_path))
    );
    assert_ne!(bpffs.mount_path, BPFFS_DEFAULT_MOUNT);
    assert_ne!(bpffs.read_only, Some(true), "pins are written");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));

    // The programs attach to the node's cgroup v2 root, which covers every pod.
    let cgroup = mount(container, "/sys/fs/cgroup", spec);
    assert_eq!(
        args.datapath.cgroup_root.as_deref(),
        Some(Path::new(&cgroup.mount_path))
    );
    assert_eq!(cgroup.read_only, Some(true));

    let proc = mount(container, "/proc", spec);
    assert_eq!(args.pods.proc_root, Path::new(&proc.mount_path));
    assert_eq!(proc.read_only, Some(true));
    // The pids under it are the agent's own: a sidecar's listener is taken over by its pid.
    assert_eq!(
        spec.host_pid,
        Some(true),
        "pidfd_getfd takes pids of the agent's own PID namespace"
    );

    // The API server refuses Bidirectional propagation in a container that is not privileged.
    for (what, spec) in [
        ("DaemonSet", spec.clone()),
        ("uninstall Job", uninstall_pod_spec()),
    ] {
        let containers = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten());
        for container in containers {
            let privileged = container
                .security_context
                .as_ref()
                .and_then(|sc| sc.privileged)
                .unwrap_or(false);
            for mount in container.volume_mounts.iter().flatten() {
                assert!(
                    privileged || mount.mount_propagation.as_deref() != Some("Bidirectional"),
                    "{what}: Bidirectional {} needs a privileged container",
                    mount.mount_path
                );
            }
        }
    }
}

/// The one privileged container only mounts bpffs on the host's /sys/fs/bpf, where the agent pins,
/// and the command it runs really does that.
#[test]
fn the_init_container_mounts_bpffs_where_the_agent_pins_and_nothing_else() {
    let daemon_set = agent_daemon_set();
    let spec = pod_spec(&daemon_set);
    let inits = spec.init_containers.as_deref().unwrap_or_default();
    assert_eq!(inits.len(), 1, "one init container");
    let init = &inits[0];
    let parsed = parse_agent(&args_of(init), &BTreeMap::new())
        .unwrap_or_else(|error| panic!("the init container's args do not parse:\n{error}"));
    let AgentCommand::MountBpffs(mount_args) = parsed.command else {
        panic!("the init container must run `mount-bpffs`");
    };
    let pin_path = daemon_set_run_args().datapath.pin_path;
    assert_eq!(Some(mount_args.at.as_path()), pin_path.parent());
    let bpffs = mount(init, "/sys/fs/bpf", spec);
    assert_eq!(bpffs.mount_path, mount_args.at.display().to_string());
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("Bidirectional"));
    assert_eq!(
        init.volume_mounts.as_ref().map(Vec::len),
        Some(1),
        "bpffs only"
    );
    let agent_mount = mount(only_container(spec), "/sys/fs/bpf", spec);
    assert_eq!(agent_mount.mount_path, bpffs.mount_path);
    assert_eq!(
        agent_mount.mount_propagation.as_deref(),
        Some("HostToContainer")
    );

    // The command itself, on a directory of the test's own: it mounts bpffs, then finds it there.
    if !nix::unistd::geteuid().is_root() {
        return skip("running mount-bpffs", "mounting bpffs needs root");
    }
    let dir = std::env::temp_dir().join(format!("pb-deploy-bpffs-{}", std::process::id()));
    fs::create_dir_all(&dir).expect("create the mount point");
    let run = || {
        Command::new(probe_bypass_testing::agent_bin())
            .args(["mount-bpffs", "--at"])
            .arg(&dir)
            .output()
            .expect("run mount-bpffs")
    };
    let first = run();
    let second = run();
    let is_bpffs = nix::sys::statfs::statfs(&dir)
        .map(|fs| fs.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false);
    let _ = nix::mount::umount2(&dir, nix::mount::MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(&dir);
    assert!(first.status.success(), "{first:?}");
    assert_eq!(
        String::from_utf8_lossy(&first.stdout),
        format!("mounted bpffs on {}\n", dir.display())
    );
    assert!(is_bpffs, "{} is bpffs after the command", dir.display());
    assert_eq!(
        String::from_utf8_lossy(&second.stdout),
        format!("{} is bpffs already\n", dir.display())
    );
}

#[test]
fn the_uninstall_job_removes_the_pins_the_daemonset_makes() {
    let spec = &uninstall_pod_spec();
    let container = only_container(spec);
    let parsed = parse_agent(&args_of(container), &BTreeMap::new())
        .unwrap_or_else(|error| panic!("the Job's args do not parse:\n{error}"));
    let AgentCommand::Uninstall(uninstall) = parsed.command else {
        panic!("the Job must run `uninstall`");
    };
    let daemon_set = agent_daemon_set();
    let agent_spec = pod_spec(&daemon_set);
    assert_eq!(uninstall.pin_path, daemon_set_run_args().datapath.pin_path);
    assert_eq!(
        mount(container, "/sys/fs/bpf", spec).mount_path,
        mount(only_container(agent_spec), "/sys/fs/bpf", agent_spec).mount_path
    );
    // One node per Job, given by hand: the placeholder is not a valid node name, so the file
    // cannot be applied unedited.
    assert_eq!(spec.node_name.as_deref(), Some("NODE_NAME"));
    assert_eq!(spec.restart_policy.as_deref(), Some("Never"));
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert!(
        capabilities.add.is_none(),
        "removing pins needs no capability"
    );
}

#[test]
fn the_daemonset_grants_what_the_start_up_check_needs_and_nothing_more() {
    let daemon_set = agent_daemon_set();
    let spec = pod_spec(&daemon_set);
    let container = only_container(spec);
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_ne!(security.privileged, Some(true));
    assert_eq!(security.run_as_user, Some(0));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = capabilities
        .add
        .iter()
        .flatten()
        .map(String::as_str)
        .collect();

    // Everything the agent checks for with the DaemonSet's pod source and either datapath (the
    // ConfigMap chooses it; `ebpf` needs the most).
    let needs = preflight::needs(DatapathMode::Ebpf, PodSource::Kube);
    let name = |cap: preflight::Capability| cap.name.trim_start_matches("CAP_");
    for need in &needs {
        assert!(
            need.any_of.iter().any(|cap| added.contains(name(*cap))),
            "the agent needs one of {:?} {}; the DaemonSet adds {added:?}",
            need.any_of,
            need.for_what
        );
    }
    let documented: BTreeSet<&str> = needs
        .iter()
        .flat_map(|need| need.any_of.iter().map(|cap| name(*cap)))
        .collect();
    let extra: Vec<&&str> = added.difference(&documented).collect();
    assert!(extra.is_empty(), "capabilities nothing asks for: {extra:?}");

    // Each added capability says why, in a comment just above it.
    let text = fs::read_to_string(deploy_dir().join("daemonset.yaml")).expect("read");
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    for capability in &added {
        let at = lines
            .iter()
            .position(|line| *line == format!("- {capability}"))
            .unwrap_or_else(|| panic!("{capability} is not listed one per line"));
        assert!(
            at > 0 && lines[at - 1].starts_with('#'),
            "{capability} has no comment saying why"
        );
    }

    assert_eq!(spec.host_network, Some(true));
    let seccomp = spec
        .security_context
        .as_ref()
        .and_then(|sc| sc.seccomp_profile.as_ref())
        .expect("a seccomp profile");
    assert_eq!(seccomp.type_, "RuntimeDefault");
}

#[test]
fn rollout_surges_one_agent_per_node_without_host_ports() {
    let daemon_set = agent_daemon_set();
    let strategy = daemon_set
        .spec
        .update_strategy
        .as_ref()
        .expect("updateStrategy");
    assert_eq!(strategy.type_.as_deref(), Some("RollingUpdate"));
    let rolling = strategy.rolling_update.as_ref().expect("rollingUpdate");
    assert_eq!(rolling.max_surge, Some(IntOrString::Int(1)));
    assert_eq!(rolling.max_unavailable, Some(IntOrString::Int(0)));
    let spec = pod_spec(&daemon_set);
    // With hostNetwork every declared port is a host port, and the scheduler would keep the
    // surge pod off a node whose old pod holds it.
    assert!(
        only_container(spec)
            .ports
            .as_deref()
            .unwrap_or_default()
            .is_empty()
    );
    assert_eq!(
        spec.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerate every taint: {tolerations:?}"
    );
}

#[test]
fn the_images_are_this_version_of_the_agent() {
    let expected = format!("probe-bypass:{}", env!("CARGO_PKG_VERSION"));
    for container in [
        only_container(pod_spec(&agent_daemon_set())).clone(),
        only_container(&uninstall_pod_spec()).clone(),
    ] {
        assert_eq!(container.image.as_deref(), Some(expected.as_str()));
    }
    // The webhook's validation init container runs the agent's image, and replacing the mesh's
    // init container is off unless a namespace asks for it.
    let args = webhook_args();
    assert_eq!(args.validation_image, expected);
    assert!(!args.replace_mesh_init);
}

/// The command of an exec probe, and the `health` arguments the agent reads from it.
fn probe_command(probe: Option<&Probe>) -> (Vec<String>, HealthArgs) {
    let probe = probe.expect("a probe");
    assert!(
        probe.http_get.is_none() && probe.tcp_socket.is_none() && probe.grpc.is_none(),
        "an exec probe: under a surge another agent may answer on the shared admin port"
    );
    let command = probe
        .exec
        .as_ref()
        .and_then(|exec| exec.command.clone())
        .expect("an exec probe's command");
    let parsed = Cli::try_parse_from(&command)
        .unwrap_or_else(|error| panic!("the probe's command {command:?} does not parse:\n{error}"));
    let AgentCommand::Health(args) = parsed.command else {
        panic!("the probe must run `health`: {command:?}");
    };
    (command, args)
}

/// Runs the agent's binary with `args`, as nobody when the test runs as root: without the datapath
/// and without pods neither the agent nor its probes need any privilege, and so they prove it.
fn agent_command(args: &[OsString]) -> Command {
    let mut command = Command::new(probe_bypass_testing::agent_bin());
    command.args(args);
    if nix::unistd::geteuid().is_root() {
        command.uid(NOBODY).gid(NOBODY);
    }
    command
}

/// The agent started with the DaemonSet's command line and environment, changed only so that it
/// runs here: no API server (pods from a directory of its own, holding `pods`), no eBPF datapath,
/// `admin` as its admin port, and its admin socket in a directory of its own, as the DaemonSet's
/// emptyDir is. It runs as nobody (see [`agent_command`]). The start does not wait: under a surge
/// the other agent would answer on the shared port.
fn start_agent(admin: SocketAddr, pods: &[(&str, &str)]) -> Agent {
    let container = only_container(pod_spec(&agent_daemon_set())).clone();
    let agent = Agent::builder()
        .command_line(args_of(&container))
        .pods(pods)
        .flag("--datapath", "none")
        // It checks its callers with the API server; tests/admin_access.rs runs it.
        .without_flag("--secure-admin-addr")
        .admin_addr(admin)
        .admin_socket()
        .env_clear()
        .envs(container_env(&container))
        .rust_log("info")
        .as_nobody();
    let _env = env_lock();
    agent.spawn()
}

/// Runs a probe's `command` against `agent`'s socket, as the kubelet runs it in the agent's
/// container: the exit code and what it printed.
fn run_probe(agent: &Agent, command: &[String]) -> (Option<i32>, String) {
    let mut args: Vec<OsString> = command[1..].iter().map(OsString::from).collect();
    with_flag(&mut args, "--socket", agent.socket());
    let output = {
        let _env = env_lock();
        agent_command(&args)
            .env_clear()
            .output()
            .expect("run the probe")
    };
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.code(), printed)
}

/// Runs the probe's `command` until it exits `code` and prints `saying`, or fails the test after
/// `within`; what it printed.
fn wait_for_probe(
    agent: &mut Agent,
    command: &[String],
    code: i32,
    saying: &str,
    within: Duration,
) -> String {
    agent.poll(within, |agent| {
        let (got, printed) = run_probe(agent, command);
        if got == Some(code) && printed.contains(saying) {
            Ok(printed)
        } else {
            Err(format!(
                "{command:?} exited {got:?} ({printed:?}), not {code} saying {saying:?}"
            ))
        }
    })
}

/// Bytes of a Kubernetes memory quantity such as `64Mi`.
fn quantity_bytes(quantity: &str) -> u64 {
    let units = [("Ki", 1 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)];
    let (number, unit) = units
        .iter()
        .find_map(|(suffix, unit)| quantity.strip_suffix(suffix).map(|n| (n, *unit)))
        .unwrap_or((quantity, 1));
    number.parse::<u64>().expect("a whole number") * unit
}

#[test]
fn the_probes_ask_the_agent_on_its_socket_and_it_stops_within_the_grace_period() {
    let daemon_set = agent_daemon_set();
    let spec = pod_spec(&daemon_set);
    let container = only_container(spec);
    let run = daemon_set_run_args();

    // Prometheus and people use the admin port, 9091 as FSM's controller.
    let default_port = DEFAULT_ADMIN_ADDR
        .parse::<SocketAddr>()
        .expect("default admin address")
        .port();
    assert_eq!(run.admin_addr.port(), default_port);

    // The probes run the image's binary, which asks for liveness, then readiness, on the socket
    // the agent serves.
    let (liveness, alive) = probe_command(container.liveness_probe.as_ref());
    let (readiness, ready) = probe_command(container.readiness_probe.as_ref());
    assert_eq!((alive.ready, ready.ready), (false, true));
    for command in [&liveness, &readiness] {
        assert_eq!(command[0], "/probe-bypass", "the image's entrypoint");
    }
    let socket = run
        .admin_socket
        .expect("the DaemonSet's args give --admin-socket");
    assert_eq!((&alive.socket, &ready.socket), (&socket, &socket));

    // The socket's directory is the pod's own (each agent of a surge has one) and writable under
    // the read-only root filesystem: an emptyDir, in memory.
    let dir = socket.parent().expect("the socket's directory");
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| Path::new(&mount.mount_path) == dir)
        .unwrap_or_else(|| panic!("a volume mounted at {}", dir.display()));
    assert_ne!(mount.read_only, Some(true), "the agent creates the socket");
    let volume = volume_of(spec, mount);
    let empty_dir = volume.empty_dir.as_ref().expect("an emptyDir");
    assert_eq!(empty_dir.medium.as_deref(), Some("Memory"));
    assert!(empty_dir.size_limit.is_some(), "a small sizeLimit");

    // And the real agent answers them.
    let admin = free_loopback_port();
    let mut agent = start_agent(admin, &[]);
    let printed = wait_for_probe(&mut agent, &liveness, 0, "alive", Duration::from_secs(10));
    assert_eq!(printed, "alive\n");
    let printed = wait_for_probe(&mut agent, &readiness, 0, "ready", Duration::from_secs(10));
    assert_eq!(printed, "ready: 0 pods served\n");
    agent.wait_for_200(METRICS_PATH, Duration::from_secs(10));

    // What it needs at rest is well within what the DaemonSet requests.
    let resources = container.resources.as_ref().expect("resources");
    let request = &resources.requests.as_ref().expect("requests")["memory"];
    let rss = agent.memory().rss_kib * 1024;
    assert!(
        rss < quantity_bytes(&request.0),
        "the agent uses {rss} bytes at rest, more than its request {}",
        request.0
    );

    let grace = spec
        .termination_grace_period_seconds
        .expect("terminationGracePeriodSeconds");
    let (status, took) = agent.terminate();
    assert!(status.success(), "{status}:\n{}", agent.log_text());
    assert!(
        took < Duration::from_secs(u64::try_from(grace).expect("positive")),
        "the agent took {took:?} to stop; the kubelet kills it after {grace} s"
    );

    // With the agent gone, the probe fails and says why.
    let (code, printed) = run_probe(&agent, &liveness);
    assert_eq!(code, Some(2), "{printed}");
    assert!(
        printed.starts_with(&format!(
            "cannot reach the agent on {}: ",
            agent.socket().display()
        )),
        "{printed}"
    );
}

#[test]
fn requests_and_limits_are_set_and_consistent() {
    let daemon_set = agent_daemon_set();
    let container = only_container(pod_spec(&daemon_set));
    let resources = container.resources.as_ref().expect("resources");
    let requests = resources.requests.as_ref().expect("requests");
    let limits = resources.limits.as_ref().expect("limits");
    assert!(quantity_bytes(&requests["memory"].0) <= quantity_bytes(&limits["memory"].0));
    let millicores = |q: &str| -> u64 {
        q.strip_suffix('m')
            .map(|m| m.parse().expect("millicores"))
            .unwrap_or_else(|| q.parse::<u64>().expect("cores") * 1000)
    };
    assert!(millicores(&requests["cpu"].0) <= millicores(&limits["cpu"].0));
}

/// During a rolling update with maxSurge both agents of a node run at once, each binding the admin
/// port in the host network namespace; the new one must come up beside the old one.
#[test]
fn a_surge_agent_binds_the_admin_port_beside_the_old_one() {
    let admin = free_loopback_port();
    let mut old = start_agent(admin, &[]);
    old.wait_for_200(ALIVE_PATH, Duration::from_secs(10));
    let mut new = start_agent(admin, &[]);
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        new.is_running(),
        "the surge agent exited:\n{}",
        new.log_text()
    );
    let (status, _) = old.terminate();
    assert!(status.success());
    new.wait_for_200(READY_PATH, Duration::from_secs(10));
}

/// A pod the agent cannot serve: its network namespace does not exist.
const UNSERVABLE_POD: &str = r#"{"apiVersion":"v1","kind":"Pod",
  "metadata":{"name":"unservable","namespace":"surge",
    "annotations":{"probe-bypass/netns":"/nonexistent/pb-deploy-test/netns"}},
  "spec":{"containers":[{"name":"app","livenessProbe":{"tcpSocket":{"port":8080}}}]},
  "status":{"podIP":"198.18.0.2"}}"#;

/// Under a surge the two agents share the admin port, so a probe there could be answered by the
/// other one; each agent's probe asks that agent. The new agent here cannot serve its pod and is
/// not ready, while the old one is.
#[test]
fn under_a_surge_each_agents_probes_ask_that_agent() {
    let container = only_container(pod_spec(&agent_daemon_set())).clone();
    let (liveness, _) = probe_command(container.liveness_probe.as_ref());
    let (readiness, _) = probe_command(container.readiness_probe.as_ref());
    let admin = free_loopback_port();
    let mut old = start_agent(admin, &[]);
    wait_for_probe(&mut old, &readiness, 0, "ready", Duration::from_secs(10));
    let mut new = start_agent(admin, &[("unservable.json", UNSERVABLE_POD)]);
    wait_for_probe(&mut new, &liveness, 0, "alive", Duration::from_secs(10));

    let printed = wait_for_probe(
        &mut new,
        &readiness,
        1,
        "surge/unservable",
        Duration::from_secs(10),
    );
    assert!(
        printed.starts_with("not ready: 1 of 1 pods have no healthcheck listener\n"),
        "{printed}"
    );
    let (code, printed) = run_probe(&old, &readiness);
    assert_eq!(
        (code, printed.as_str()),
        (Some(0), "ready: 0 pods served\n")
    );
    assert_eq!(run_probe(&old, &liveness).0, Some(0));
}

/// Pod discovery opens other users' /proc/<pid>/ns/net, which needs CAP_SYS_PTRACE: with the
/// Kubernetes pod source the agent refuses to start without it, even with no eBPF datapath, rather
/// than never finding pods.
#[test]
fn the_kube_source_without_cap_sys_ptrace_is_refused_at_start_naming_why() {
    let container = only_container(pod_spec(&agent_daemon_set())).clone();
    let agent = Agent::builder()
        .command_line(args_of(&container))
        .flag("--datapath", "none")
        .env_clear()
        .envs(container_env(&container))
        // The agent's own default, as in the DaemonSet, which sets no RUST_LOG.
        .rust_log("info")
        .as_nobody();
    let mut agent = {
        let _env = env_lock();
        agent.spawn()
    };
    let status = agent.wait_for_exit(Duration::from_secs(10));
    let text = agent.log_text();
    assert!(
        status.is_some_and(|status| !status.success()),
        "the agent started ({status:?}):\n{text}"
    );
    assert!(
        text.contains("missing capabilities: CAP_SYS_ADMIN (to enter pods' network namespaces"),
        "{text}"
    );
    assert!(
        text.contains(
            "CAP_SYS_PTRACE (to open pods' /proc/<pid>/ns/net with --pod-source kube: without it, \
             pods whose processes run as another user than the agent's are never found)"
        ),
        "{text}"
    );
}

// The admission webhook: deploy/webhook/, its own kustomization in the agent's namespace.

const WEBHOOK_KUSTOMIZATION: &str = "webhook/kustomization.yaml";

/// The documents of deploy/webhook/'s kustomization.
fn webhook_documents() -> Vec<Doc> {
    documents_listed_by(WEBHOOK_KUSTOMIZATION)
}

/// The one object of `kind` in deploy/webhook/.
fn the_webhooks<T: DeserializeOwned + Serialize>(kind: &str) -> T {
    the_one_in(webhook_documents(), kind, "deploy/webhook/")
}

/// The cert-manager object of `kind` named `name` (no Rust type: plain JSON).
fn cert_manager(kind: &str, name: &str) -> Value {
    let found: Vec<Value> = webhook_documents()
        .into_iter()
        .filter(|doc| doc.kind() == kind && doc.name() == name)
        .map(|doc| doc.value)
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name} in deploy/webhook/");
    found.into_iter().next().expect("one")
}

fn webhook_deployment_container() -> (Deployment, Container) {
    let deployment: Deployment = the_webhooks("Deployment");
    let spec = deployment
        .spec
        .template
        .spec
        .as_ref()
        .expect("Deployment pod spec");
    let container = only_container(spec).clone();
    (deployment, container)
}

fn container_port(container: &Container, name: &str) -> i32 {
    container
        .ports
        .iter()
        .flatten()
        .find(|port| port.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("container port {name}"))
        .container_port
}

/// The Deployment's command line as the webhook reads it.
fn webhook_args() -> probe_bypass::cli::WebhookArgs {
    let (_, container) = webhook_deployment_container();
    let parsed = parse_agent(&args_of(&container), &container_env(&container))
        .unwrap_or_else(|error| panic!("the webhook Deployment's args do not parse:\n{error}"));
    match parsed.command {
        AgentCommand::Webhook(args) => args,
        other => panic!("expected `webhook`, not {other:?}"),
    }
}

#[test]
fn the_webhook_manifests_are_listed_typed_and_in_the_agents_namespace() {
    let listed = kustomization_resources_of(WEBHOOK_KUSTOMIZATION);
    assert_eq!(
        listed.iter().cloned().collect::<BTreeSet<_>>(),
        manifest_files_in("webhook"),
        "deploy/webhook/kustomization.yaml lists every manifest there"
    );
    let mut kinds = BTreeSet::new();
    for doc in webhook_documents() {
        let namespace = match doc.kind() {
            "ServiceAccount" => doc.typed::<ServiceAccount>().metadata.namespace,
            "Deployment" => doc.typed::<Deployment>().metadata.namespace,
            "PodDisruptionBudget" => doc.typed::<PodDisruptionBudget>().metadata.namespace,
            "Service" => doc.typed::<Service>().metadata.namespace,
            "MutatingWebhookConfiguration" => {
                doc.typed::<MutatingWebhookConfiguration>()
                    .metadata
                    .namespace
            }
            "Issuer" | "Certificate" => {
                assert_eq!(
                    doc.value["apiVersion"],
                    "cert-manager.io/v1",
                    "{}",
                    doc.name()
                );
                doc.value["metadata"]["namespace"]
                    .as_str()
                    .map(ToOwned::to_owned)
            }
            other => panic!("deploy/{}: unexpected kind {other:?}", doc.file),
        };
        let expected = (doc.kind() != "MutatingWebhookConfiguration").then(|| NAMESPACE.to_owned());
        assert_eq!(namespace, expected, "{} {}", doc.kind(), doc.name());
        kinds.insert(doc.kind().to_owned());
    }
    assert_eq!(kinds.len(), 7, "{kinds:?}");
}

#[test]
fn kubectl_kustomize_renders_exactly_the_webhooks_objects() {
    assert_kustomize_renders(&deploy_dir().join("webhook"), &webhook_documents());
}

#[test]
fn the_webhook_deployment_serves_where_its_service_and_probes_look() {
    let args = webhook_args();
    let (_, container) = webhook_deployment_container();
    let https = container_port(&container, "https");
    let healthz = container_port(&container, "healthz");
    assert_eq!(i32::from(args.listen.port()), https);
    assert_eq!(i32::from(args.healthz.port()), healthz);
    assert!(args.listen.ip().is_unspecified() && args.healthz.ip().is_unspecified());

    let service: Service = the_webhooks("Service");
    let ports = service.spec.expect("Service spec").ports.expect("ports");
    assert_eq!(ports.len(), 1);
    assert_eq!(
        ports[0].target_port,
        Some(IntOrString::String("https".to_owned()))
    );

    for probe in [&container.readiness_probe, &container.liveness_probe] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("an httpGet probe");
        assert_eq!(get.path.as_deref(), Some(WEBHOOK_HEALTHZ_PATH));
        assert_eq!(get.port, IntOrString::String("healthz".to_owned()));
    }

    // The certificate and key are the Secret cert-manager writes, where the pod mounts it.
    let (deployment, _) = webhook_deployment_container();
    let spec = deployment.spec.template.spec.expect("pod spec");
    let mount = container
        .volume_mounts
        .iter()
        .flatten()
        .find(|mount| args.tls_cert.starts_with(&mount.mount_path))
        .expect("the certificate is on a mount");
    assert_eq!(mount.read_only, Some(true));
    assert_eq!(args.tls_cert, Path::new(&mount.mount_path).join("tls.crt"));
    assert_eq!(args.tls_key, Path::new(&mount.mount_path).join("tls.key"));
    let volume = volume_of(&spec, mount);
    let secret = volume.secret.as_ref().and_then(|s| s.secret_name.clone());
    let certificate = cert_manager("Certificate", "probe-bypass-webhook");
    assert_eq!(
        secret.as_deref(),
        certificate["spec"]["secretName"].as_str()
    );

    // The certificate names the Service as the API server dials it, and its issuer exists.
    let service_name = service.metadata.name.expect("Service name");
    let dns_names = certificate["spec"]["dnsNames"].to_string();
    assert!(
        dns_names.contains(&format!("\"{service_name}.{NAMESPACE}.svc\"")),
        "{dns_names}"
    );
    let issuer = certificate["spec"]["issuerRef"]["name"]
        .as_str()
        .expect("issuer");
    let ca_secret = cert_manager("Issuer", issuer)["spec"]["ca"]["secretName"].clone();
    let ca = cert_manager("Certificate", ca_secret.as_str().expect("a CA secret"));
    assert_eq!(ca["spec"]["isCA"], true);
    assert_eq!(ca["spec"]["secretName"], ca_secret);
}

#[test]
fn every_webhook_sends_pod_creates_to_the_webhooks_path_and_never_blocks_them() {
    let configuration: MutatingWebhookConfiguration = the_webhooks("MutatingWebhookConfiguration");
    let service: Service = the_webhooks("Service");
    let certificate = cert_manager("Certificate", "probe-bypass-webhook");
    let annotations = configuration.metadata.annotations.expect("annotations");
    assert_eq!(
        annotations["cert-manager.io/inject-ca-from"],
        format!(
            "{NAMESPACE}/{}",
            certificate["metadata"]["name"].as_str().expect("name")
        )
    );
    let service_port = service.spec.and_then(|s| s.ports).expect("ports")[0].port;
    let webhooks = configuration.webhooks.expect("webhooks");
    let routes: BTreeSet<(String, String)> = webhooks
        .iter()
        .map(|webhook| {
            let client = webhook.client_config.service.as_ref().expect("a service");
            assert_eq!(Some(&client.name), service.metadata.name.as_ref());
            assert_eq!(client.namespace, NAMESPACE);
            let path = client.path.clone().expect("a path");
            assert_eq!(client.port, Some(service_port));
            assert_eq!(webhook.admission_review_versions, ["v1"]);
            assert_eq!(webhook.side_effects, "None");
            assert_eq!(webhook.failure_policy.as_deref(), Some("Ignore"));
            assert_eq!(webhook.reinvocation_policy.as_deref(), Some("IfNeeded"));
            assert!(webhook.timeout_seconds.is_some_and(|t| t <= 10));
            let rules = webhook.rules.as_ref().expect("rules");
            assert_eq!(rules.len(), 1);
            assert_eq!(
                rules[0].operations.as_deref(),
                Some(&["CREATE".to_owned()][..])
            );
            assert_eq!(rules[0].api_groups.as_deref(), Some(&[String::new()][..]));
            assert_eq!(
                rules[0].resources.as_deref(),
                Some(&["pods".to_owned()][..])
            );

            let expressions = webhook
                .namespace_selector
                .as_ref()
                .and_then(|s| s.match_expressions.clone())
                .expect("a namespace selector");
            let excluded = expressions
                .iter()
                .find(|e| e.key == "kubernetes.io/metadata.name" && e.operator == "NotIn")
                .and_then(|e| e.values.clone())
                .expect("excluded namespaces");
            for namespace in [NAMESPACE, "kube-system"] {
                assert!(excluded.iter().any(|n| n == namespace), "{namespace}");
            }
            let monitored = expressions
                .iter()
                .find(|e| e.operator == "Exists")
                .expect("a mesh label");
            // The namespace label sends a pod to exactly one of the two paths.
            let replace = expressions
                .iter()
                .find(|e| e.key == REPLACE_MESH_INIT_LABEL)
                .expect("the replace-mesh-init label");
            assert_eq!(replace.values.as_deref(), Some(&["enabled".to_owned()][..]));
            let expected_operator = match path.as_str() {
                WEBHOOK_MUTATE_PATH => "NotIn",
                WEBHOOK_REPLACE_MESH_INIT_PATH => "In",
                other => panic!("{}: path {other} is not the webhook's", webhook.name),
            };
            assert_eq!(replace.operator, expected_operator, "{}", webhook.name);
            (monitored.key.clone(), path)
        })
        .collect();
    let mut expected = BTreeSet::new();
    for label in ["flomesh.io/monitored-by", "openservicemesh.io/monitored-by"] {
        for path in [WEBHOOK_MUTATE_PATH, WEBHOOK_REPLACE_MESH_INIT_PATH] {
            expected.insert((label.to_owned(), path.to_owned()));
        }
    }
    assert_eq!(routes, expected);
    assert_eq!(
        webhooks.len(),
        expected.len(),
        "one entry per mesh and path"
    );
}

/// The namespace label that turns `--replace-mesh-init` on, through the webhook's second path.
const REPLACE_MESH_INIT_LABEL: &str = "probe-bypass.io/replace-mesh-init";

#[test]
fn the_webhook_runs_unprivileged_unmeshed_and_without_an_api_token() {
    let account: ServiceAccount = the_webhooks("ServiceAccount");
    assert_eq!(account.automount_service_account_token, Some(false));
    let (deployment, container) = webhook_deployment_container();
    let template = deployment.spec.template;
    let spec = template.spec.expect("pod spec");
    assert_eq!(spec.service_account_name, account.metadata.name);
    assert_eq!(spec.automount_service_account_token, Some(false));
    assert_eq!(
        spec.security_context.and_then(|c| c.run_as_non_root),
        Some(true)
    );
    let security = container
        .security_context
        .as_ref()
        .expect("securityContext");
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(security.allow_privilege_escalation, Some(false));
    let capabilities = security.capabilities.as_ref().expect("capabilities");
    assert_eq!(capabilities.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    assert_eq!(capabilities.add, None);
    let expected = format!("probe-bypass:{}", env!("CARGO_PKG_VERSION"));
    assert_eq!(container.image.as_deref(), Some(expected.as_str()));
    let resources = container.resources.as_ref().expect("resources");
    assert!(resources.requests.is_some() && resources.limits.is_some());

    let annotations = template
        .metadata
        .and_then(|m| m.annotations)
        .expect("annotations");
    for key in [
        "flomesh.io/sidecar-injection",
        "openservicemesh.io/sidecar-injection",
        "probe-bypass.io/rewrite",
    ] {
        assert_eq!(annotations[key], "disabled", "{key}");
    }
    let kinds: BTreeSet<String> = webhook_documents()
        .iter()
        .map(|doc| doc.kind().to_owned())
        .collect();
    for rbac in ["Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"] {
        assert!(!kinds.contains(rbac), "the webhook needs no {rbac}");
    }
}
