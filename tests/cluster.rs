//! probe-bypass on a real one-node cluster: upstream etcd, kube-apiserver, controller-manager,
//! scheduler, kubelet and kube-proxy, built from their Go modules, on the tests' containerd
//! (`probe_bypass_testing::cluster`). Each test asserts what the real components do: the agent
//! installed with `kubectl apply -k deploy/` under real RBAC and Pod Security admission, the
//! webhook called by the API server, the kubelet's own probes, the pod source against the real
//! watch.
//!
//! The tests of this binary share one cluster, started at the first test and torn down when the
//! binary exits. Each test works in namespaces of its own. Needs root, containerd, the test images
//! and the upstream binaries (`cargo xtask setup`); skips without them, and fails when `CI` is set.
#![expect(
    clippy::expect_used,
    reason = "a test that cannot read what the cluster answered fails, naming it"
)]

use std::{
    collections::BTreeSet,
    fs,
    path::Path,
    process::Command,
    sync::{Mutex, OnceLock, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::Duration,
    time::Instant,
};

use probe_bypass_testing::{
    cgroup::attached_programs,
    cluster::{self, Info},
    images,
    rewrite_cli::run_rewrite,
    sidecar::{Certificates, SidecarConfig, SidecarContainer},
};
use serde_json::{Value, json};

/// How long the cluster may take to act on what a test asked (a pod scheduled, started, Ready).
const SETTLE: Duration = Duration::from_secs(90);

/// Held shared by every test, and alone by a test that disrupts the whole cluster (the agent
/// taken down, the API server restarted).
static CLUSTER: RwLock<()> = RwLock::new(());

/// How a test holds the cluster.
enum Hold {
    Shared(#[expect(dead_code, reason = "held, not read")] RwLockReadGuard<'static, ()>),
    Alone(#[expect(dead_code, reason = "held, not read")] RwLockWriteGuard<'static, ()>),
}

/// The shared cluster, held as `alone` says; `None` where it cannot run (see
/// [`cluster::shared`]).
fn cluster(alone: bool) -> Option<(&'static Info, Hold)> {
    let info = cluster::shared()?;
    let hold = if alone {
        Hold::Alone(CLUSTER.write().unwrap_or_else(PoisonError::into_inner))
    } else {
        Hold::Shared(CLUSTER.read().unwrap_or_else(PoisonError::into_inner))
    };
    Some((info, hold))
}

/// [`cluster`], with the agent installed from `deploy/` (once per test binary).
fn with_agent(alone: bool) -> Option<(&'static Info, Hold)> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    let (info, hold) = cluster(alone)?;
    INSTALLED.get_or_init(|| info.install_agent());
    Some((info, hold))
}

/// [`with_agent`], and the admission webhook from `deploy/webhook/`.
fn with_webhook() -> Option<(&'static Info, Hold)> {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    let (info, hold) = with_agent(false)?;
    INSTALLED.get_or_init(|| info.install_webhook());
    Some((info, hold))
}

/// Held by the tests that take the webhook down, and by those that need it up.
static WEBHOOK: Mutex<()> = Mutex::new(());

/// Creates the namespace `name` with `labels`, deleting any left by an earlier run first.
fn namespace(info: &Info, name: &str, labels: &[(&str, &str)]) {
    let _ = info.kubectl(&[
        "delete",
        "namespace",
        name,
        "--wait=true",
        "--ignore-not-found",
    ]);
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(key, value)| ((*key).to_owned(), json!(value)))
        .collect();
    info.apply(
        &json!({"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": labels}})
        .to_string(),
    );
    // The service account admission needs, made by the controller-manager.
    info.wait_for(
        &format!("namespace {name}'s default service account"),
        SETTLE,
        || {
            let output = info.kubectl(&["--namespace", name, "get", "serviceaccount", "default"]);
            output
                .status
                .success()
                .then_some(())
                .ok_or_else(|| String::from_utf8_lossy(&output.stderr).into_owned())
        },
    );
}

/// The fixture `name` under `tests/fixtures/rewrite/`, as JSON, without its namespace.
fn fixture(name: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/rewrite")
        .join(name);
    let text =
        fs::read_to_string(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    let mut pod: Value =
        serde_norway::from_str(&text).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    if let Some(metadata) = pod["metadata"].as_object_mut() {
        metadata.remove("namespace");
    }
    pod
}

/// Creates `pod` in `namespace` with a server-side dry run: admission runs (the webhook is
/// called: it declares no side effects) and the API server answers with the pod as it would
/// store it, defaults and all, and nothing is stored or run.
fn dry_run_create(info: &Info, namespace: &str, pod: &Value) -> Value {
    let path = info.dir.join(format!(
        "dry-run-{namespace}-{}.json",
        pod["metadata"]["name"].as_str().unwrap_or("pod")
    ));
    fs::write(&path, pod.to_string()).expect("write the manifest");
    let text = info.kubectl_ok(&[
        "--namespace",
        namespace,
        "create",
        "--dry-run=server",
        "--output=json",
        "--filename",
        &path.display().to_string(),
    ]);
    serde_json::from_str(&text).unwrap_or_else(|error| panic!("{text}: {error}"))
}

/// What of a stored pod depends on the object's identity rather than on its manifest (its
/// namespace, its generated service account volume's name) or on the pod before admission (its
/// QoS class).
fn comparable(mut pod: Value) -> Value {
    if let Some(metadata) = pod["metadata"].as_object_mut() {
        for key in [
            "namespace",
            "uid",
            "creationTimestamp",
            "resourceVersion",
            "managedFields",
        ] {
            metadata.remove(key);
        }
    }
    // The API server computes a pod's QoS class before admission and keeps it: a pod whose mesh
    // init and healthcheck containers (with their requests) the webhook removed keeps the class
    // of the pod the injector wrote, and the CLI's pod gets the class of what is left.
    if let Some(status) = pod["status"].as_object_mut() {
        status.remove("qosClass");
    }
    // The original-probes annotation is compared as the JSON it holds: the webhook writes each
    // probe's fields in the API's order, the CLI of a JSON manifest in sorted order.
    let annotation = &mut pod["metadata"]["annotations"]["probe-bypass.io/original-probes"];
    if let Some(text) = annotation.as_str() {
        *annotation = serde_json::from_str(text).expect("the annotation's JSON");
    }
    let text = pod.to_string();
    // `kube-api-access-<5 random characters>`, in the volume and in each container's mount.
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(at) = rest.find("kube-api-access-") {
        let end = at + "kube-api-access-".len();
        out.push_str(&rest[..end]);
        out.push_str("xxxxx");
        rest = rest.get(end + 5..).unwrap_or_default();
    }
    out.push_str(rest);
    serde_json::from_str(&out).expect("the same JSON")
}

/// Asserts that the pods are the same but for what [`comparable`] leaves out; otherwise panics
/// with the lines of their pretty JSON that differ.
fn assert_same_pod(by_webhook: &Value, by_cli: &Value, name: &str) {
    let pretty =
        |pod: &Value| serde_json::to_string_pretty(&sorted(comparable(pod.clone()))).expect("JSON");
    let (webhook, cli) = (pretty(by_webhook), pretty(by_cli));
    if webhook != cli {
        let differing: Vec<String> = webhook
            .lines()
            .zip(cli.lines())
            .filter(|(a, b)| a != b)
            .map(|(a, b)| format!("webhook: {a}\n    cli: {b}"))
            .collect();
        panic!(
            "{name}: the webhook's pod differs from the CLI's:\n{}",
            differing.join("\n")
        );
    }
}

/// `value` with every object's keys in sorted order, for a line-by-line comparison.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|(a, _), (b, _)| a.cmp(b));
            Value::Object(
                entries
                    .into_iter()
                    .map(|(key, value)| (key, sorted(value)))
                    .collect(),
            )
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

/// `probe-bypass rewrite` of `pod` as the API server hands it to the webhook: after its
/// defaulting (a server-side dry run in `plain_namespace`, which no webhook reviews), so that the
/// original-probes annotation records the same defaulted fields. Then stored through the same
/// dry run, for a comparison with what the webhook made of it.
fn rewritten_by_cli(info: &Info, plain_namespace: &str, pod: &Value, args: &[&str]) -> Value {
    let defaulted = dry_run_create(info, plain_namespace, pod);
    dry_run_create(info, plain_namespace, &cli_rewrite(&defaulted, args))
}

/// `probe-bypass rewrite` of `pod`, as JSON.
fn cli_rewrite(pod: &Value, args: &[&str]) -> Value {
    let mut all = vec!["--filename", "-"];
    all.extend_from_slice(args);
    let output = run_rewrite(&all, pod.to_string().as_bytes());
    assert!(
        output.status.success(),
        "probe-bypass rewrite: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).expect("rewrite's JSON")
}

#[test]
fn the_node_runs_the_pinned_kubernetes_on_the_tests_containerd() {
    let Some((info, _hold)) = cluster(false) else {
        return;
    };
    let node = info.get_json(&["node", cluster::NODE]);
    let version = cluster::kubernetes_version();
    assert_eq!(
        node["status"]["nodeInfo"]["kubeletVersion"],
        version.as_str()
    );
    let runtime = node["status"]["nodeInfo"]["containerRuntimeVersion"]
        .as_str()
        .expect("the runtime's version");
    assert!(runtime.starts_with("containerd://1.6"), "{runtime}");
    let server: Value =
        serde_json::from_str(&info.kubectl_ok(&["get", "--raw", "/version"])).expect("/version");
    assert_eq!(server["gitVersion"], version.as_str());
    let addresses = node["status"]["addresses"].to_string();
    assert!(addresses.contains(&info.node_ip.to_string()), "{addresses}");
    // The controllers run: a new namespace gets its service account and the cluster's CA.
    namespace(info, "pb-node-basics", &[]);
    let ca = info.get_json(&[
        "--namespace",
        "pb-node-basics",
        "configmap",
        "kube-root-ca.crt",
    ]);
    let ca_file = fs::read_to_string(&info.ca).expect("the cluster's CA");
    assert_eq!(
        ca["data"]["ca.crt"].as_str().map(str::trim),
        Some(ca_file.trim())
    );
    info.kubectl_ok(&["delete", "namespace", "pb-node-basics", "--wait=false"]);
}

#[test]
fn deploy_installs_the_agent_under_real_rbac_and_pod_security() {
    let Some((info, _hold)) = with_agent(false) else {
        return;
    };
    let daemonset = info.get_json(&["--namespace", "probe-bypass", "daemonset", "probe-bypass"]);
    assert_eq!(
        daemonset["status"]["numberReady"], 1,
        "{}",
        daemonset["status"]
    );
    let pods = info.get_json(&[
        "--namespace",
        "probe-bypass",
        "pods",
        "--selector",
        "app.kubernetes.io/name=probe-bypass",
    ]);
    let pod = &pods["items"][0];
    assert_eq!(pod["spec"]["nodeName"], cluster::NODE);

    // The privileged init container mounted bpffs on the node's stand-in for /sys/fs/bpf, and
    // exited 0 before the agent started.
    let init = &pod["status"]["initContainerStatuses"][0];
    assert_eq!(init["name"], "mount-bpffs");
    assert_eq!(init["state"]["terminated"]["exitCode"], 0, "{init}");
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    let bpffs = info.bpffs.display().to_string();
    assert!(
        mountinfo.lines().any(|line| {
            line.split(' ').nth(4) == Some(bpffs.as_str()) && line.contains(" - bpf ")
        }),
        "no bpffs on {bpffs}"
    );

    // The programs are attached at the node's subtree, and none at the machine's cgroup root.
    let attached = attached_programs(&info.cgroup).expect("bpftool");
    for program in ["pb_connect4", "pb_connect6", "pb_sockops", "pb_getsockopt"] {
        assert!(
            attached.iter().any(|line| line.contains(program)),
            "{program} not attached at {}: {attached:?}",
            info.cgroup.display()
        );
    }
    let root = probe_bypass::datapath::cgroup2_mount().expect("the cgroup v2 mount");
    let at_root = attached_programs(&root).expect("bpftool");
    assert!(
        at_root.iter().all(|line| !line.contains("\"pb_")),
        "the agent attached at the machine's root: {at_root:?}"
    );

    // It found the kubelet's cgroup, and the pods through the real API server's watch.
    let logs = info.kubectl_ok(&[
        "--namespace",
        "probe-bypass",
        "logs",
        "daemonset/probe-bypass",
        "--container",
        "agent",
    ]);
    assert!(
        logs.contains("only the kubelet's cgroup") && logs.contains("node/kubelet"),
        "{logs}"
    );
    assert!(logs.contains("listed this node's pods"), "{logs}");

    // The namespace's Pod Security label is what admits it: the same pod in a namespace that
    // enforces the baseline level is refused, naming what it violates.
    let labels = info.get_json(&["namespace", "probe-bypass"])["metadata"]["labels"].clone();
    assert_eq!(labels["pod-security.kubernetes.io/enforce"], "privileged");
    namespace(
        info,
        "pb-baseline",
        &[("pod-security.kubernetes.io/enforce", "baseline")],
    );
    let mut copy = json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "agent-copy"},
        "spec": daemonset["spec"]["template"]["spec"],
    });
    copy["spec"]["serviceAccountName"] = json!("default");
    let path = info.dir.join("agent-copy.json");
    fs::write(&path, copy.to_string()).expect("write the pod");
    let refused = info.kubectl(&[
        "--namespace",
        "pb-baseline",
        "create",
        "--dry-run=server",
        "--filename",
        &path.display().to_string(),
    ]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "admitted under baseline");
    assert!(said.contains("violates PodSecurity \"baseline"), "{said}");
    for violation in [
        "host namespaces",
        "privileged",
        "hostPath volumes",
        "non-default capabilities",
    ] {
        assert!(said.contains(violation), "{violation} not named: {said}");
    }
    info.kubectl_ok(&["delete", "namespace", "pb-baseline", "--wait=false"]);

    // Its service account may read pods and review tokens, and nothing else.
    let agent = "system:serviceaccount:probe-bypass:probe-bypass";
    let can = |verb: &str, resource: &str| {
        let output = info.kubectl(&[
            "auth",
            "can-i",
            verb,
            resource,
            "--as",
            agent,
            "--all-namespaces",
        ]);
        String::from_utf8_lossy(&output.stdout).trim() == "yes"
    };
    for (verb, resource) in [
        ("get", "pods"),
        ("list", "pods"),
        ("watch", "pods"),
        ("create", "tokenreviews.authentication.k8s.io"),
        ("create", "subjectaccessreviews.authorization.k8s.io"),
    ] {
        assert!(can(verb, resource), "the agent may not {verb} {resource}");
    }
    for (verb, resource) in [
        ("get", "secrets"),
        ("list", "secrets"),
        ("get", "configmaps"),
        ("create", "pods"),
        ("patch", "pods"),
        ("delete", "pods"),
        ("update", "pods/status"),
        ("create", "pods/exec"),
        ("patch", "nodes"),
        ("create", "events"),
        ("create", "serviceaccounts/token"),
    ] {
        assert!(!can(verb, resource), "the agent may {verb} {resource}");
    }
}

#[test]
fn the_api_server_calls_the_webhook_as_deploy_configures_it() {
    let Some((info, _hold)) = with_webhook() else {
        return;
    };
    let _webhook = WEBHOOK.lock().unwrap_or_else(PoisonError::into_inner);
    namespace(info, "pb-fsm", &[("flomesh.io/monitored-by", "fsm")]);
    namespace(
        info,
        "pb-fsm-replace",
        &[
            ("flomesh.io/monitored-by", "fsm"),
            ("probe-bypass.io/replace-mesh-init", "enabled"),
        ],
    );
    namespace(
        info,
        "pb-osm-replace",
        &[
            ("openservicemesh.io/monitored-by", "osm"),
            ("probe-bypass.io/replace-mesh-init", "enabled"),
        ],
    );
    namespace(info, "pb-unmeshed", &[]);

    // A pod created in a meshed namespace comes back rewritten, exactly as `probe-bypass
    // rewrite` rewrites its manifest: the same pod, stored through the same API server's
    // defaults, from the CLI's output in a namespace the webhook leaves alone.
    for name in [
        "k8s-tcp-liveness-readiness.yaml",
        "k8s-http-liveness.yaml",
        "k8s-grpc-liveness.yaml",
        "seed-bookstore.yaml",
    ] {
        let pod = fixture(name);
        let admitted = dry_run_create(info, "pb-fsm", &pod);
        assert!(
            admitted["metadata"]["annotations"]["probe-bypass.io/original-probes"].is_string(),
            "{name}: not rewritten: {}",
            admitted["metadata"]
        );
        let by_cli = rewritten_by_cli(info, "pb-unmeshed", &pod, &[]);
        assert_same_pod(&admitted, &by_cli, name);
        // A namespace without the mesh's label is left alone.
        let untouched = dry_run_create(info, "pb-unmeshed", &pod);
        let as_written = untouched["metadata"]["annotations"]
            .get("probe-bypass.io/original-probes")
            .cloned();
        assert_eq!(as_written, None, "{name}: rewritten outside the mesh");
    }

    // With the namespace labelled for it, pods in the shapes FSM's and OSM's injectors write
    // lose the mesh's init and healthcheck containers and gain the validation init container.
    for (name, namespace_name) in [
        ("mesh-init/fsm-bookstore.yaml", "pb-fsm-replace"),
        ("mesh-init/osm-bookbuyer.yaml", "pb-osm-replace"),
    ] {
        let pod = fixture(name);
        // The injected pods name a service account of their own, which admission requires.
        if let Some(account) = pod["spec"]["serviceAccountName"].as_str() {
            for namespace_name in [namespace_name, "pb-unmeshed"] {
                info.apply(
                    &json!({"apiVersion": "v1", "kind": "ServiceAccount",
                        "metadata": {"name": account, "namespace": namespace_name}})
                    .to_string(),
                );
            }
        }
        let admitted = dry_run_create(info, namespace_name, &pod);
        let init: Vec<&str> = admitted["spec"]["initContainers"]
            .as_array()
            .expect("init containers")
            .iter()
            .filter_map(|container| container["name"].as_str())
            .collect();
        assert_eq!(init, ["probe-bypass-validation"], "{name}");
        let containers: Vec<&str> = admitted["spec"]["containers"]
            .as_array()
            .expect("containers")
            .iter()
            .filter_map(|container| container["name"].as_str())
            .collect();
        assert!(
            containers
                .iter()
                .all(|name| !name.ends_with("-healthcheck")),
            "{name}: the mesh's healthcheck container kept: {containers:?}"
        );
        assert_eq!(
            containers.len(),
            2,
            "{name}: the app and its sidecar: {containers:?}"
        );
        let by_cli = rewritten_by_cli(info, "pb-unmeshed", &pod, &["--replace-mesh-init"]);
        assert_same_pod(&admitted, &by_cli, name);
    }

    // With no webhook answering, pods are created with their probes as written: the
    // configuration's failurePolicy is Ignore, as the README says.
    info.kubectl_ok(&[
        "--namespace",
        "probe-bypass",
        "scale",
        "deployment/probe-bypass-webhook",
        "--replicas=0",
    ]);
    info.wait_for("the webhook's endpoints to empty", SETTLE, || {
        let slices = info.get_json(&[
            "--namespace",
            "probe-bypass",
            "endpointslices",
            "--selector",
            "kubernetes.io/service-name=probe-bypass-webhook",
        ]);
        let ready = slices["items"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|slice| slice["endpoints"].as_array().cloned().unwrap_or_default())
            .count();
        (ready == 0)
            .then_some(())
            .ok_or_else(|| format!("{ready} endpoints"))
    });
    let pod = fixture("k8s-tcp-liveness-readiness.yaml");
    let admitted = dry_run_create(info, "pb-fsm", &pod);
    assert_eq!(
        admitted["metadata"]["annotations"].get("probe-bypass.io/original-probes"),
        None,
        "rewritten with no webhook up"
    );
    assert_eq!(
        admitted["spec"]["containers"][0]["readinessProbe"]["tcpSocket"]["port"],
        8080
    );
    info.kubectl_ok(&[
        "--namespace",
        "probe-bypass",
        "scale",
        "deployment/probe-bypass-webhook",
        "--replicas=2",
    ]);
    info.wait_for_rollout("probe-bypass", "deployment/probe-bypass-webhook");
    for name in ["pb-fsm", "pb-fsm-replace", "pb-osm-replace", "pb-unmeshed"] {
        info.kubectl_ok(&["delete", "namespace", name, "--wait=false"]);
    }
}

/// A pod running the test app on `port` in `namespace`, meshed (FSM's injector's label) or not.
fn app_pod(name: &str, meshed: bool, port: u16) -> Value {
    let mut labels = json!({"app": name});
    if meshed {
        labels["fsm-proxy-uuid"] = json!("00000000-0000-4000-8000-000000000000");
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "app",
                "image": images::APP,
                "imagePullPolicy": "Never",
                "args": [name, port.to_string()],
            }],
        },
    })
}

/// What the agent's `/metrics` says, on its loopback admin port.
fn agent_metrics() -> String {
    let output = Command::new("curl")
        .args([
            "--silent",
            "--fail",
            "--max-time",
            "5",
            "http://127.0.0.1:9091/metrics",
        ])
        .output()
        .expect("run curl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The pods of `namespace` the agent has in its datapath, from its metrics
/// (`probe_bypass_datapath_pod`, on its loopback admin port).
fn served_in(namespace: &str) -> BTreeSet<String> {
    let metrics = agent_metrics();
    let wanted = format!("namespace=\"{namespace}\"");
    metrics
        .lines()
        .filter(|line| line.starts_with("probe_bypass_datapath_pod{") && line.contains(&wanted))
        .filter(|line| {
            line.rsplit(' ')
                .next()
                .is_some_and(|value| value.trim() != "0")
        })
        .filter_map(|line| {
            let at = line.find("pod=\"")? + 5;
            let end = line[at..].find('"')?;
            Some(line[at..at + end].to_owned())
        })
        .collect()
}

#[test]
fn the_agent_follows_the_real_api_servers_pods() {
    // Alone: it restarts the API server.
    let Some((info, _hold)) = with_agent(true) else {
        return;
    };
    let ns = "pb-source";
    namespace(info, ns, &[]);
    for (name, meshed) in [("meshed-a", true), ("meshed-b", true), ("plain", false)] {
        let mut pod = app_pod(name, meshed, 8080);
        pod["metadata"]["namespace"] = json!(ns);
        info.apply(&pod.to_string());
    }
    info.kubectl_ok(&[
        "--namespace",
        ns,
        "wait",
        "--for=condition=Ready",
        "pod",
        "--all",
        "--timeout=90s",
    ]);
    let expect = |what: &str, wanted: &[&str]| {
        let wanted: BTreeSet<String> = wanted.iter().map(|&name| name.to_owned()).collect();
        info.wait_for(what, SETTLE, || {
            let served = served_in(ns);
            (served == wanted)
                .then_some(())
                .ok_or_else(|| format!("{served:?}"))
        });
    };
    expect("the meshed pods served", &["meshed-a", "meshed-b"]);

    // Relabelled: the pod that left the mesh is let go, the one that joined it is served.
    info.kubectl_ok(&[
        "--namespace",
        ns,
        "label",
        "pod",
        "meshed-b",
        "fsm-proxy-uuid-",
    ]);
    info.kubectl_ok(&[
        "--namespace",
        ns,
        "label",
        "pod",
        "plain",
        "fsm-proxy-uuid=00000000-0000-4000-8000-000000000001",
    ]);
    expect("the relabelled pods", &["meshed-a", "plain"]);

    // The API server crashes and is started again: the agent's watch breaks, and once it is
    // back the agent follows the pods again, from where it was or with a new list.
    restart_api_server(info);
    let mut late = app_pod("meshed-late", true, 8080);
    late["metadata"]["namespace"] = json!(ns);
    info.apply(&late.to_string());
    expect(
        "the pods after the API server's restart",
        &["meshed-a", "meshed-late", "plain"],
    );
    info.kubectl_ok(&[
        "--namespace",
        ns,
        "delete",
        "pod",
        "meshed-a",
        "--wait=true",
    ]);
    expect("the pods after a deletion", &["meshed-late", "plain"]);
    let logs = info.kubectl_ok(&[
        "--namespace",
        "probe-bypass",
        "logs",
        "daemonset/probe-bypass",
        "--container",
        "agent",
    ]);
    // The client library reports the refused connections while the API server is down; the
    // agent itself only warns, and retries.
    assert!(!logs.contains(" ERROR probe_bypass"), "{logs}");

    info.kubectl_ok(&["delete", "namespace", ns, "--wait=true", "--timeout=90s"]);
    expect("nothing once the namespace is gone", &[]);
}

/// Kills the API server (SIGKILL), as a crash does; the cluster's supervisor starts it again, as
/// a node's service manager would. Returns once it answers. (A SIGTERM'd API server waits a
/// minute for its watches' connections before it exits.)
fn restart_api_server(info: &Info) {
    let pid_file = info.dir.join("run/kube-apiserver.pid");
    let read_pid = || fs::read_to_string(&pid_file).expect("the API server's pid");
    let old = read_pid();
    let pid = nix::unistd::Pid::from_raw(old.trim().parse().expect("a pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill the API server");
    info.wait_for("the API server started again", SETTLE, || {
        let new = read_pid();
        (new != old)
            .then_some(())
            .ok_or_else(|| "not yet".to_owned())
    });
    info.wait_for("the API server answering again", SETTLE, || {
        let output = info.kubectl(&["get", "--raw", "/readyz"]);
        output
            .status
            .success()
            .then_some(())
            .ok_or_else(|| String::from_utf8_lossy(&output.stderr).into_owned())
    });
}

/// The pid of the container `container` of the pod `name` in `namespace`: the process in the
/// container's cgroup, which the kubelet's cgroupfs driver names
/// `kubepods/<qos>/pod<uid>/<container id>` below the node's subtree.
fn container_pid(info: &Info, namespace: &str, name: &str, container: &str) -> i32 {
    let pod = info.get_json(&["--namespace", namespace, "pod", name]);
    let uid = pod["metadata"]["uid"].as_str().expect("the pod's uid");
    let id = pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|status| status["name"] == container)
        .and_then(|status| status["containerID"].as_str())
        .and_then(|id| id.strip_prefix("containerd://"))
        .expect("the container's id");
    let qos = pod["status"]["qosClass"]
        .as_str()
        .unwrap_or("BestEffort")
        .to_lowercase();
    let procs = info
        .cgroup
        .join("kubepods")
        .join(qos)
        .join(format!("pod{uid}"))
        .join(id)
        .join("cgroup.procs");
    let text =
        fs::read_to_string(&procs).unwrap_or_else(|error| panic!("{}: {error}", procs.display()));
    text.lines()
        .next()
        .and_then(|pid| pid.trim().parse().ok())
        .unwrap_or_else(|| panic!("no process in {}", procs.display()))
}

/// The pod's condition `kind` (`Ready`, ...) and its containers' restart counts.
fn pod_state(info: &Info, namespace: &str, name: &str) -> (String, i64) {
    let pod = info.get_json(&["--namespace", namespace, "pod", name]);
    let ready = pod["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|condition| condition["type"] == "Ready")
        .and_then(|condition| condition["status"].as_str())
        .unwrap_or("unknown")
        .to_owned();
    let restarts = pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|status| status["restartCount"].as_i64())
        .sum();
    (ready, restarts)
}

/// A pod of the test app on `port` with HAProxy as the mesh's sidecar (mTLS inbound with the
/// certificate `pem`, trusting `ca`), a readiness tcpSocket probe and a liveness httpGet probe on
/// the app's port, in `namespace`.
fn sidecar_pod(
    name: &str,
    namespace: &str,
    meshed: bool,
    port: u16,
    sidecar: &SidecarContainer,
) -> Value {
    let mut pod = app_pod(name, meshed, port);
    pod["metadata"]["namespace"] = json!(namespace);
    let app = &mut pod["spec"]["containers"][0];
    app["readinessProbe"] =
        json!({"tcpSocket": {"port": port}, "periodSeconds": 1, "failureThreshold": 1});
    app["livenessProbe"] =
        json!({"httpGet": {"path": "/", "port": port}, "periodSeconds": 2, "failureThreshold": 3});
    let (container, volumes) = sidecar.pod_container();
    pod["spec"]["containers"]
        .as_array_mut()
        .expect("containers")
        .push(container);
    pod["spec"]["volumes"] = json!(volumes);
    pod
}

#[test]
fn the_kubelets_rewritten_probes_go_through_the_agent_and_catch_a_dead_app() {
    let Some((info, _hold)) = with_webhook() else {
        return;
    };
    let _webhook = WEBHOOK.lock().unwrap_or_else(PoisonError::into_inner);
    let certs = Certificates::new();
    let sidecar = SidecarContainer::new(&SidecarConfig::mtls(&certs.issue("pod"), &certs.ca()));

    // A meshed pod as the injector leaves it, its app and HAProxy as its sidecar, in a namespace
    // the mesh monitors: the webhook rewrites its probes to the agent's ports.
    let ns = "pb-probes";
    namespace(info, ns, &[("flomesh.io/monitored-by", "fsm")]);
    info.apply(&sidecar_pod("probed", ns, true, 8080, &sidecar).to_string());
    let stored = info.get_json(&["--namespace", ns, "pod", "probed"]);
    let app = &stored["spec"]["containers"][0];
    assert_eq!(app["readinessProbe"]["httpGet"]["port"], 15904, "{app}");
    assert_eq!(app["livenessProbe"]["httpGet"]["port"], 15901, "{app}");

    // Beside it, the same pod behind the mesh's own iptables rules (FSM's init container, as its
    // injector writes it), its tcpSocket probe as written: outside the webhook's namespaces, and
    // not marked meshed, so the agent leaves it alone.
    let plain_ns = "pb-probes-iptables";
    namespace(info, plain_ns, &[]);
    let mut twin = sidecar_pod("iptables", plain_ns, false, 8080, &sidecar);
    // Its tcpSocket probe alone: an httpGet probe as written would meet the sidecar's mTLS and
    // fail whatever the app does, which is why the meshes rewrite those.
    if let Some(app) = twin["spec"]["containers"][0].as_object_mut() {
        app.remove("livenessProbe");
    }
    let mut init = fixture("mesh-init/fsm-bookstore.yaml")["spec"]["initContainers"][0].clone();
    assert_eq!(init["name"], "fsm-init");
    init["image"] = json!(images::MESH_INIT);
    init["imagePullPolicy"] = json!("Never");
    twin["spec"]["initContainers"] = json!([init]);
    info.apply(&twin.to_string());
    for (namespace, name) in [(ns, "probed"), (plain_ns, "iptables")] {
        info.kubectl_ok(&[
            "--namespace",
            namespace,
            "wait",
            "--for=condition=Ready",
            &format!("pod/{name}"),
            "--timeout=90s",
        ]);
    }

    // Both apps stop listening. Through the agent, which asks the app from inside the pod, the
    // probes fail: the pod turns NotReady and the liveness probe restarts the container.
    for (namespace, name) in [(ns, "probed"), (plain_ns, "iptables")] {
        let pid = container_pid(info, namespace, name, "app");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGUSR1,
        )
        .expect("signal the app");
    }
    info.wait_for("the pod NotReady", SETTLE, || {
        let (ready, restarts) = pod_state(info, ns, "probed");
        (ready == "False")
            .then_some(())
            .ok_or(format!("Ready={ready}, restarts {restarts}"))
    });
    info.wait_for("the container restarted", SETTLE, || {
        let (ready, restarts) = pod_state(info, ns, "probed");
        (restarts >= 1)
            .then_some(())
            .ok_or(format!("Ready={ready}, restarts {restarts}"))
    });
    // Under the mesh's rules the kubelet's connection lands on the sidecar, which accepts every
    // port: the dead app's pod has stayed Ready all along. The failure probe-bypass exists for.
    assert_eq!(
        pod_state(info, plain_ns, "iptables"),
        ("True".to_owned(), 0),
        "the pod behind the mesh's rules"
    );
    let events = info.get_json(&[
        "--namespace",
        ns,
        "events",
        "--field-selector",
        "involvedObject.name=probed,reason=Unhealthy",
    ]);
    let messages: Vec<&str> = events["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|event| event["message"].as_str())
        .collect();
    assert!(
        messages
            .iter()
            .any(|message| message.starts_with("Liveness probe failed"))
            && messages
                .iter()
                .any(|message| message.starts_with("Readiness probe failed")),
        "{messages:?}"
    );
    assert!(
        messages.iter().any(|message| message.contains("refused")),
        "the agent's reason in the kubelet's event: {messages:?}"
    );
    // The restarted app listens again, and the pod is Ready again.
    info.kubectl_ok(&[
        "--namespace",
        ns,
        "wait",
        "--for=condition=Ready",
        "pod/probed",
        "--timeout=90s",
    ]);
    for namespace in [ns, plain_ns] {
        info.kubectl_ok(&[
            "delete",
            "namespace",
            namespace,
            "--wait=true",
            "--timeout=90s",
        ]);
    }
}

#[test]
fn the_validation_init_container_holds_a_pod_until_the_agent_serves_the_node() {
    // Alone: it takes the agent down.
    let Some((info, _hold)) = cluster(true) else {
        return;
    };
    // No agent on the node: the DaemonSet deleted (its pinned programs stay attached, as they do
    // across an agent's upgrade), or never installed yet.
    let _ = info.kubectl(&[
        "--namespace",
        "probe-bypass",
        "delete",
        "daemonset/probe-bypass",
        "--wait=true",
        "--ignore-not-found",
    ]);
    info.wait_for("the agent's pod gone", SETTLE, || {
        let pods = info.get_json(&[
            "--namespace",
            "probe-bypass",
            "pods",
            "--selector",
            "app.kubernetes.io/name=probe-bypass",
        ]);
        let left = pods["items"].as_array().map_or(0, Vec::len);
        (left == 0).then_some(()).ok_or(format!("{left} left"))
    });

    // A meshed pod whose mesh init container the rewriter replaced: its validation init
    // container, as `probe-bypass rewrite --replace-mesh-init` writes it for FSM's injected pod,
    // before the test app.
    let ns = "pb-validation";
    namespace(info, ns, &[]);
    let rewritten = cli_rewrite(
        &fixture("mesh-init/fsm-bookstore.yaml"),
        &["--replace-mesh-init"],
    );
    let validation = rewritten["spec"]["initContainers"][0].clone();
    assert_eq!(validation["name"], "probe-bypass-validation");
    let mut pod = app_pod("validated", true, 14001);
    pod["metadata"]["namespace"] = json!(ns);
    pod["metadata"]["annotations"] = rewritten["metadata"]["annotations"].clone();
    pod["spec"]["initContainers"] = json!([validation]);
    info.apply(&pod.to_string());

    // The kubelet runs it, it fails, and the kubelet holds the app back and retries.
    let failed = info.wait_for("the validation to fail", SETTLE, || {
        let stored = info.get_json(&["--namespace", ns, "pod", "validated"]);
        let status = &stored["status"]["initContainerStatuses"][0];
        let terminated = if status["state"]["terminated"].is_object() {
            &status["state"]["terminated"]
        } else {
            &status["lastState"]["terminated"]
        };
        match terminated["exitCode"].as_i64() {
            Some(code) if code != 0 => Ok((stored["status"].clone(), terminated.clone())),
            _ => Err(status.to_string()),
        }
    });
    let (status, terminated) = failed;
    assert_eq!(status["phase"], "Pending", "the app held back: {status}");
    assert!(
        status["containerStatuses"][0]["state"]["waiting"]["reason"] == "PodInitializing",
        "{status}"
    );
    let logs = info.kubectl_ok(&[
        "--namespace",
        ns,
        "logs",
        "validated",
        "--container",
        "probe-bypass-validation",
    ]);
    assert!(
        logs.contains("probe-bypass") && logs.to_lowercase().contains("agent"),
        "the validation says why: {logs}\n{terminated}"
    );

    // The agent comes up; the kubelet's next retry of the init container passes.
    info.install_agent();
    let agent_ready = Instant::now();
    info.kubectl_ok(&[
        "--namespace",
        ns,
        "wait",
        "--for=condition=Ready",
        "pod/validated",
        "--timeout=120s",
    ]);
    eprintln!(
        "the validated pod was Ready {:?} after the agent's pod turned Ready",
        agent_ready.elapsed()
    );
    info.kubectl_ok(&["delete", "namespace", ns, "--wait=false"]);
}
