//! Real pods from a real container runtime (issue 17): the tests' own containerd with its CRI
//! plugin, runc and the CNI bridge, driven over the CRI API as the kubelet drives it
//! (`support/cri.rs`), and the agent finding and serving the pods it makes.
//!
//! Needs root, Debian's containerd, runc, containernetworking-plugins (`cargo xtask setup`), and
//! the images' programs (`cargo xtask test` builds them); without them the tests say why and pass,
//! unless `CI` is set.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking, with a message naming the step that broke"
)]

use std::{
    fs,
    net::{SocketAddr, TcpStream},
    path::Path,
    time::Duration,
};

use probe_bypass_testing::{
    agent::{Agent, free_loopback_port},
    bpffs::TestPins,
    cgroup::ChildCgroup,
    containerd::Containerd,
    cri::{Bind, CgroupDriver, Container, CriNode, CriPod, PodSpec, Propagation},
    ebpf_agent::EbpfAgent,
    images,
    injected::{self, Mesh},
    kube_api::{FSM_POD, FakeApi, ServiceAccount},
    kubelet::{self, KubeletProcess},
    pod::TestPod,
    privilege,
    registry::{self, Registry},
    require_privileges,
    sidecar::{
        Certificates, INBOUND, INBOUND_PORT, OUTBOUND_PORT, ProxyEvent, ProxyLog, SidecarConfig,
        SidecarContainer, TempDir,
    },
};
use serde_json::{Value, json};

const NODE: &str = "cri-node";
/// The port FSM's fixture pod's app listens on, which its rewritten tcpSocket probe checks.
const FIXTURE_APP_PORT: u16 = 14001;
/// The validation init container's name.
const VALIDATION: &str = probe_bypass_rewrite::contract::VALIDATION_CONTAINER_NAME;
/// The port the test app listens on, and the pod's rewritten tcpSocket probe checks.
const APP_PORT: u16 = 8080;

/// Whether the machine has what a containerd node needs; otherwise skips (fails under CI).
fn containerd_can_run() -> bool {
    match probe_bypass_testing::containerd::missing() {
        None => true,
        Some(reason) => {
            let thread = std::thread::current();
            privilege::skip(thread.name().unwrap_or("test"), &reason);
            false
        }
    }
}

/// [`containerd_can_run`], and the images' programs are built.
fn node_can_run() -> bool {
    if !containerd_can_run() {
        return false;
    }
    match images::missing() {
        None => true,
        Some(reason) => {
            let thread = std::thread::current();
            privilege::skip(thread.name().unwrap_or("test"), &reason);
            false
        }
    }
}

/// The node and the API server beside it, when the machine can run them (see [`node_can_run`]);
/// the runtime serves the API server and drops after it.
fn start_node() -> Option<(CriNode, FakeApi, tokio::runtime::Runtime)> {
    if !privilege::can_run() || !node_can_run() {
        return None;
    }
    let node = CriNode::start();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    // HTTPS with a CA of the test's own, as a cluster's API server: the agent verifies it.
    let api = runtime.block_on(FakeApi::start_tls(NODE));
    Some((node, api, runtime))
}

/// The pod as the API server would hold it once the kubelet reported its sandbox: the FSM-injected
/// fixture with the pod's name, namespace, real UID and CNI-given IP, its liveness probe checking
/// the app's port through the healthcheck.
fn api_pod(pod: &CriPod) -> Value {
    let mut value: Value = serde_json::from_str(FSM_POD).expect("fixture");
    value["metadata"]["name"] = json!(pod.spec.name);
    value["metadata"]["namespace"] = json!(pod.spec.namespace);
    value["metadata"]["uid"] = json!(pod.spec.uid);
    value["spec"]["nodeName"] = json!(NODE);
    value["spec"]["containers"][0]["livenessProbe"]["httpGet"]["httpHeaders"] =
        json!([{ "name": "Original-Tcp-Port", "value": APP_PORT.to_string() }]);
    let ip = pod.ip.to_string();
    value["status"]["podIP"] = json!(ip);
    value["status"]["podIPs"] = json!([{ "ip": ip }]);
    value
}

/// A pod whose one container is the test app on [`APP_PORT`].
fn app_pod(name: &str, driver: CgroupDriver) -> PodSpec {
    let mut spec = PodSpec::new(name, driver);
    spec.containers.push(Container::app(name, &[APP_PORT]));
    spec
}

fn healthcheck(pod: &CriPod) -> SocketAddr {
    SocketAddr::new(pod.ip, 15904)
}

fn ip_v4(ip: std::net::IpAddr) -> std::net::Ipv4Addr {
    match ip {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(ip) => panic!("the CNI gave an IPv6 address: {ip}"),
    }
}

fn answers(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// The agent's open file descriptors that are network namespace `netns` (`net:[<inode>]`).
fn fds_on(agent_pid: u32, netns: &str) -> Vec<String> {
    fs::read_dir(format!("/proc/{agent_pid}/fd"))
        .expect("the agent's fds")
        .flatten()
        .filter_map(|fd| fs::read_link(fd.path()).ok())
        .map(|target| target.display().to_string())
        .filter(|target| target == netns)
        .collect()
}

fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn containerd_boots_its_cri_plugin_on_paths_of_its_own_and_leaves_nothing() {
    require_privileges!();
    if !containerd_can_run() {
        return;
    }
    let machine_socket = Path::new("/run/containerd/containerd.sock").exists();
    let machine_root = Path::new("/var/lib/containerd").exists();

    let containerd = Containerd::start();
    let version = containerd.ctr(&["version"]);
    assert!(version.status.success(), "ctr version: {version:?}");
    assert!(stdout(&version).contains("Server:"), "{}", stdout(&version));

    // The CRI plugin is up, on the overlayfs snapshotter, with the runc runtime.
    let plugins = stdout(&containerd.ctr(&["plugins", "ls"]));
    for (kind, id) in [
        ("io.containerd.grpc.v1", "cri"),
        ("io.containerd.snapshotter.v1", "overlayfs"),
        ("io.containerd.runtime.v2", "task"),
    ] {
        let line = plugins
            .lines()
            .find(|line| line.starts_with(kind) && line.split_whitespace().nth(1) == Some(id))
            .unwrap_or_else(|| panic!("no {kind} {id} plugin in:\n{plugins}"));
        assert!(
            line.trim_end().ends_with("ok"),
            "{line}\n{}",
            containerd.log()
        );
    }
    let log = containerd.log();
    assert!(
        log.contains(&format!(
            "ContainerdRootDir:{}",
            containerd.path("root").display()
        )),
        "the CRI plugin uses the test's root:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "NetworkPluginConfDir:{}",
            containerd.path("net.d").display()
        )),
        "and the test's CNI configuration:\n{log}"
    );
    assert!(
        containerd
            .path("root")
            .read_dir()
            .expect("root")
            .next()
            .is_some()
    );
    // Nothing of the machine's own containerd was made.
    assert_eq!(
        Path::new("/run/containerd/containerd.sock").exists(),
        machine_socket
    );
    assert_eq!(Path::new("/var/lib/containerd").exists(), machine_root);

    let pid = containerd.pid();
    let dir = containerd.path("");
    drop(containerd);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "containerd {pid} stopped with its guard"
    );
    assert!(!dir.exists(), "{} removed with its guard", dir.display());
}

#[test]
fn pods_made_through_cri_are_found_and_served_then_leave_nothing_once_removed() {
    let Some((mut node, api, _runtime)) = start_node() else {
        return;
    };
    // Both cgroup parent namings the kubelet uses.
    let pods: Vec<CriPod> = [
        ("systemd-named", CgroupDriver::Systemd),
        ("cgroupfs-named", CgroupDriver::Cgroupfs),
    ]
    .into_iter()
    .map(|(name, driver)| {
        let pod = node.run_pod(&app_pod(name, driver));
        api.apply(api_pod(&pod));
        pod
    })
    .collect();
    // runc put each sandbox in the cgroup the kubelet named, below the node's subtree.
    for pod in &pods {
        let pause = node.pause_pid(pod);
        let cgroups = fs::read_to_string(format!("/proc/{pause}/cgroup")).expect("its cgroup");
        let cgroup = cgroups
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .expect("a cgroup v2 line");
        let relative = pod
            .cgroup
            .strip_prefix(probe_bypass::datapath::cgroup2_mount().expect("cgroup2"))
            .expect("below the mount");
        assert!(
            cgroup.starts_with(&format!("/{}/", relative.display())),
            "the pause process of {} is in {cgroup}, not below {}",
            pod.spec.name,
            pod.cgroup.display()
        );
    }

    let kubeconfig = api.kubeconfig();
    let mut agent = Agent::start_kube(&kubeconfig.path, NODE, &[], "probe_bypass=debug");
    for pod in &pods {
        agent.wait_until(
            &format!("the healthcheck listener in {}", pod.spec.name),
            Duration::from_secs(20),
            |_| answers(healthcheck(pod)),
        );
        // The kubelet's rewritten tcpSocket probe, from the host to the CNI address.
        let reply = kubelet::probe(healthcheck(pod), &APP_PORT.to_string());
        assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log_text());
        // The fixture's readiness probe checks 14001, where the app does not listen.
        let closed = kubelet::probe(healthcheck(pod), "14001");
        assert_eq!(closed.status, 503, "nothing listens on 14001: {closed:?}");
    }
    // The namespace was found from the sandbox's pause process.
    let pause = node.pause_pid(&pods[0]);
    let netns = fs::read_link(format!("/proc/{pause}/ns/net"))
        .expect("the pause process's namespace")
        .display()
        .to_string();
    assert!(
        fs::read_to_string(format!("/proc/{pause}/cmdline"))
            .expect("pause's cmdline")
            .starts_with("/pb-pause"),
        "pid {pause} is the sandbox's pause process"
    );
    let log = agent.log_text();
    assert!(
        log.contains(&format!("network namespace /proc/{pause}/ns/net")),
        "the agent names the pause process {pause} as the namespace's:\n{log}"
    );
    assert!(
        !fds_on(agent.pid(), &netns).is_empty(),
        "the agent holds {netns}"
    );

    // Deleting the pod, as the kubelet does: CRI first, then the API object goes.
    node.remove_pod(&pods[0]);
    api.delete(&pods[0].spec.name);
    agent.wait_until(
        "the deleted pod's listener closing",
        Duration::from_secs(20),
        |_| !answers(healthcheck(&pods[0])),
    );
    agent.wait_until(
        "the agent letting go of the deleted pod's namespace",
        Duration::from_secs(20),
        |agent| fds_on(agent.pid(), &netns).is_empty(),
    );
    // The other pod is still served.
    let reply = kubelet::probe(healthcheck(&pods[1]), &APP_PORT.to_string());
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(api.bad_requests(), Vec::<String>::new());
}

/// A node with pods made through CRI, the API server holding them, and the agent serving them
/// (`--pod-source kube`, `--datapath none`). Fields drop in order: the agent, the node (which
/// removes its pods), the API server before its runtime.
struct Served {
    agent: Agent,
    node: CriNode,
    api: FakeApi,
    _kubeconfig: probe_bypass_testing::kube_api::Kubeconfig,
    _runtime: tokio::runtime::Runtime,
}

impl Served {
    /// Makes `pods` on a new node and starts the agent; none when the machine cannot run them.
    fn start(pods: &[PodSpec]) -> Option<(Self, Vec<CriPod>)> {
        let (mut node, api, runtime) = start_node()?;
        let made: Vec<CriPod> = pods
            .iter()
            .map(|spec| {
                let pod = node.run_pod(spec);
                api.apply(api_pod(&pod));
                pod
            })
            .collect();
        let kubeconfig = api.kubeconfig();
        let agent = Agent::start_kube(&kubeconfig.path, NODE, &[], "probe_bypass=debug");
        let mut served = Self {
            agent,
            node,
            api,
            _kubeconfig: kubeconfig,
            _runtime: runtime,
        };
        for pod in &made {
            served.wait_served(pod);
        }
        Some((served, made))
    }

    /// Waits until the kubelet's probe of the pod's app port through the healthcheck passes.
    fn wait_served(&mut self, pod: &CriPod) {
        let addr = healthcheck(pod);
        self.agent.wait_until(
            &format!("{} served at {addr}", pod.spec.name),
            Duration::from_secs(20),
            |_| answers(addr) && kubelet::probe(addr, &APP_PORT.to_string()).status == 200,
        );
    }

    /// The value of the agent's metric `name` (a counter or gauge without labels).
    fn metric(&self, name: &str) -> Option<f64> {
        let (_, metrics) = self.agent.get("/metrics")?;
        metrics.lines().find_map(|line| {
            let (key, value) = line.split_once(' ')?;
            (key == name).then(|| value.parse().ok())?
        })
    }
}

#[test]
fn a_killed_pause_process_is_seen_and_reported_and_the_recreated_sandbox_served() {
    let spec = app_pod("pause-killed", CgroupDriver::Cgroupfs);
    let Some((mut served, pods)) = Served::start(std::slice::from_ref(&spec)) else {
        return;
    };
    let pod = &pods[0];
    assert_eq!(
        served.metric("probe_bypass_kube_netns_lost_total"),
        Some(0.0)
    );
    let pause = served.node.pause_pid(pod);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pause).expect("a pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the pause process");

    served.agent.wait_until(
        "the lost namespace counted",
        Duration::from_secs(20),
        |agent| {
            agent.get("/metrics").is_some_and(|(_, metrics)| {
                metrics.contains("probe_bypass_kube_netns_lost_total 1")
            })
        },
    );
    let log = served.agent.log_text();
    assert!(
        log.contains(&format!(
            "WARN  probe_bypass::source::kube::node_pods] pod test/pause-killed: /proc/{pause}/ns/net is gone"
        )),
        "a warning names the pod and the lost process:\n{log}"
    );
    // The app's container still holds the namespace, with the pod's IP: the agent finds it
    // through the app's process, and the pod stays served until the kubelet replaces the sandbox.
    served.agent.wait_until(
        "the namespace found again through the app's process",
        Duration::from_secs(20),
        |agent| {
            let log = agent.log_text();
            log.lines()
                .filter(|line| line.contains("pod test/pause-killed: network namespace /proc/"))
                .count()
                >= 2
        },
    );
    let reply = kubelet::probe(healthcheck(pod), &APP_PORT.to_string());
    assert_eq!(reply.status, 200, "{reply:?}");

    // The kubelet's part: the sandbox is dead, so the pod's containers are stopped, the sandbox
    // removed and a new one made for the same pod (same UID), with a new address from the CNI.
    served.node.remove_pod(pod);
    let again = served.node.run_pod(&spec);
    served.api.apply(api_pod(&again));
    served.wait_served(&again);
    let new_pause = served.node.pause_pid(&again);
    assert!(
        served
            .agent
            .log_text()
            .contains(&format!("network namespace /proc/{new_pause}/ns/net")),
        "the recreated sandbox is found through its own pause process"
    );
}

#[test]
fn restarting_containerd_leaves_served_pods_served() {
    let specs = [
        app_pod("through-restart-a", CgroupDriver::Systemd),
        app_pod("through-restart-b", CgroupDriver::Cgroupfs),
    ];
    let Some((mut served, pods)) = Served::start(&specs) else {
        return;
    };
    let pauses: Vec<u32> = pods.iter().map(|pod| served.node.pause_pid(pod)).collect();
    let old_pid = served.node.containerd().pid();

    served.node.restart_containerd();
    assert_ne!(served.node.containerd().pid(), old_pid, "a new containerd");
    for (pod, pause) in pods.iter().zip(&pauses) {
        // The same sandbox, known to the new containerd, with the same pause process.
        assert_eq!(served.node.pause_pid(pod), *pause, "{}", pod.spec.name);
        let reply = kubelet::probe(healthcheck(pod), &APP_PORT.to_string());
        assert_eq!(reply.status, 200, "{}: {reply:?}", pod.spec.name);
    }
    assert_eq!(
        served.metric("probe_bypass_kube_netns_lost_total"),
        Some(0.0)
    );
    assert!(
        !served.agent.log_text().contains(" WARN "),
        "nothing to warn about:\n{}",
        served.agent.log_text()
    );

    // The restarted containerd still removes them, and the agent lets them go.
    served.node.remove_pod(&pods[0]);
    served.api.delete(&pods[0].spec.name);
    served.agent.wait_until(
        "the removed pod's listener closing",
        Duration::from_secs(20),
        |_| !answers(healthcheck(&pods[0])),
    );
    let reply = kubelet::probe(healthcheck(&pods[1]), &APP_PORT.to_string());
    assert_eq!(reply.status, 200, "{reply:?}");
}

/// A pod of the rewritten fixture's shape: its validation init container, then the test app.
fn validated_pod(name: &str, rewritten: &Value, validation_args: &[&str]) -> PodSpec {
    let mut spec = PodSpec::new(name, CgroupDriver::Cgroupfs);
    spec.containers
        .push(Container::app(name, &[APP_PORT, FIXTURE_APP_PORT]));
    let init = rewritten["spec"]["initContainers"]
        .as_array()
        .expect("init containers");
    assert_eq!(init.len(), 1, "only the validation container: {init:?}");
    let mut validation = Container::from_manifest(&init[0]);
    assert_eq!(
        validation.image,
        format!("probe-bypass:{}", env!("CARGO_PKG_VERSION"))
    );
    validation
        .args
        .extend(validation_args.iter().map(|&arg| arg.to_owned()));
    spec.init_containers.push(validation);
    spec
}

/// The rewritten pod as the API server holds it once the kubelet reported `pod`'s sandbox: its
/// name, namespace, UID, node and IP.
fn rewritten_api_pod(rewritten: &Value, pod: &CriPod) -> Value {
    let mut value = rewritten.clone();
    let own = api_pod(pod);
    for field in ["name", "namespace", "uid"] {
        value["metadata"][field] = own["metadata"][field].clone();
    }
    value["spec"]["nodeName"] = json!(NODE);
    value["status"] = own["status"].clone();
    value
}

#[test]
fn the_validation_container_passes_in_a_pod_the_agent_serves_and_fails_in_one_it_does_not() {
    let Some((mut node, api, _runtime)) = start_node() else {
        return;
    };
    let kubeconfig = api.kubeconfig();
    // The datapath attached to the node's cgroup subtree, which holds every pod's cgroup.
    let ebpf = EbpfAgent::start_with(node.cgroup(), |args| {
        Agent::start_kube(&kubeconfig.path, NODE, args, "probe_bypass=debug")
    });
    let agent = ebpf.agent();
    agent.wait_ready(200, Duration::from_secs(20));
    let pins = ebpf.pin_path().to_owned();
    let rewritten = injected::replaced_fixture(Mesh::Fsm);

    // Served: the kubelet reports the sandbox's IP to the API server before the init containers
    // run, and the agent serves the pod from its sandbox meanwhile.
    let served_spec = validated_pod("validated", &rewritten, &[]);
    let served = node.run_pod_then(&served_spec, |pod| {
        api.apply(rewritten_api_pod(&rewritten, pod));
    });
    let validation = VALIDATION;
    assert_eq!(
        served.init_exits,
        vec![(validation.to_owned(), 0)],
        "the validation of a served pod:\n{}\n{}",
        served.log(validation),
        agent.log_text()
    );
    assert!(
        served.containers.contains_key("validated"),
        "the app started after it"
    );
    let ip = served.ip;
    let mapped = || probe_bypass::datapath::mapped_addrs(&pins).expect("the pod map");
    assert!(mapped().contains(&ip), "{ip} in the datapath's pod map");
    let netns_pins = || {
        fs::read_dir(pins.join("netns"))
            .map(|entries| entries.count())
            .unwrap_or(0)
    };
    assert_eq!(netns_pins(), 1, "the pod's namespace link is pinned");

    // Not served: a pod the API server does not hold (an unmeshed pod's, or one on a node whose
    // agent is down) fails its validation within its bound, and its app never starts.
    let unserved = node.run_pod(&validated_pod(
        "unvalidated",
        &rewritten,
        &["--timeout", "2s"],
    ));
    let (_, code) = &unserved.init_exits[0];
    assert_eq!(*code, 1, "{}", unserved.log(validation));
    assert!(
        unserved.log(validation).contains("not intercepted"),
        "the validation says why:\n{}",
        unserved.log(validation)
    );
    assert!(
        !unserved.containers.contains_key("unvalidated"),
        "the app of a pod whose validation failed does not start"
    );
    assert!(!mapped().contains(&unserved.ip));

    // Removed through CRI and from the API: nothing of the served pod stays in the agent.
    let pause = node.pause_pid(&served);
    let netns = fs::read_link(format!("/proc/{pause}/ns/net"))
        .expect("its namespace")
        .display()
        .to_string();
    node.remove_pod(&served);
    api.delete("validated");
    let gone =
        || !mapped().contains(&ip) && netns_pins() == 0 && fds_on(agent.pid(), &netns).is_empty();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !gone() {
        assert!(
            std::time::Instant::now() < deadline,
            "the removed pod's map entry, pin or namespace fd is still there:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!answers(healthcheck(&served)));
}

/// An HTTP GET of `url` with curl from `cgroup`, as the kubelet's prober sends it when `header` is
/// the probe's; the status, or curl's exit code as `curl:<code>` when no answer came.
fn get_from(cgroup: &ChildCgroup, url: &str, header: Option<&str>) -> String {
    let args = kubelet::curl_args(url, header);
    let output = cgroup.command("curl", &args).output().expect("curl");
    let code = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.success() {
        code
    } else {
        format!("curl:{}", output.status.code().unwrap_or(-1))
    }
}

#[test]
fn behind_a_sidecar_container_only_the_kubelet_gets_past_the_proxy_on_the_probe_ports() {
    let Some((mut node, api, _runtime)) = start_node() else {
        return;
    };
    // The kubelet's cgroup and another host daemon's, under the node's subtree where the
    // programs are attached.
    let kubelet = ChildCgroup::new(node.cgroup(), "kubelet.service");
    let daemon = ChildCgroup::new(node.cgroup(), "other-daemon.service");
    let kubeconfig = api.kubeconfig();
    let kubelet_cgroup = kubelet.path().display().to_string();
    let ebpf = EbpfAgent::start_with(node.cgroup(), |args| {
        let mut all = args.to_vec();
        all.extend([
            "--probe-bypass-from",
            "kubelet",
            "--kubelet-cgroup",
            &kubelet_cgroup,
        ]);
        Agent::start_kube(&kubeconfig.path, NODE, &all, "probe_bypass=debug")
    });
    // FSM's proxy as HAProxy (`support/sidecar.rs`), with mTLS, after the app as an injected
    // pod has it.
    let certs = Certificates::new();
    let pem = certs.issue("meshed");
    let mut sidecar = SidecarContainer::new(&SidecarConfig::mtls(&pem, &certs.ca()));
    let rewritten = injected::replaced_fixture(Mesh::Fsm);
    let mut spec = validated_pod("meshed", &rewritten, &[]);
    spec.containers.push(sidecar.container());
    let pod = node.run_pod_then(&spec, |pod| {
        api.apply(rewritten_api_pod(&rewritten, pod));
    });
    assert!(pod.initialized(), "{}", pod.log(VALIDATION));
    sidecar.started(pod.log_path(SidecarContainer::NAME));
    let named = TestPod::sandbox(
        node.pause_pid(&pod),
        ip_v4(pod.ip),
        &node.containerd().bridge,
    );
    assert!(
        named.wait_until_listening(
            &[INBOUND_PORT, OUTBOUND_PORT, APP_PORT],
            Duration::from_secs(10)
        ),
        "the sidecar and the app listen in the pod:\n{}",
        pod.log(SidecarContainer::NAME)
    );
    let inbound = || -> Vec<ProxyLog> {
        sidecar
            .log_since(0)
            .into_iter()
            .filter(|log| log.frontend == INBOUND)
            .collect()
    };
    let ip = pod.ip;
    let probe = format!("Original-Tcp-Port: {FIXTURE_APP_PORT}");
    let healthcheck = format!("http://{ip}:15904/fsm-healthcheck");
    let app = format!("http://{ip}:{APP_PORT}/");

    // The kubelet's rewritten probe gets past the proxy to the agent, which checks the app.
    let before = inbound().len();
    assert_eq!(get_from(&kubelet, &healthcheck, Some(&probe)), "200");
    assert_eq!(
        inbound().len(),
        before,
        "the kubelet's probe skipped the sidecar"
    );

    // Anyone else, on the probe port or the app's, goes to the sidecar, which wants mTLS; so does
    // the kubelet on a port that is no probe's.
    for (who, cgroup, url) in [
        (
            "another host daemon, on the probe port",
            &daemon,
            &healthcheck,
        ),
        ("another host daemon, on the app's port", &daemon, &app),
        ("the kubelet, on the app's port", &kubelet, &app),
    ] {
        let before = inbound().len();
        let answer = get_from(cgroup, url, Some(&probe));
        assert!(
            answer.starts_with("curl:"),
            "{who}: answered {answer}, not the sidecar's mTLS"
        );
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while inbound().len() == before {
            assert!(
                std::time::Instant::now() < deadline,
                "{who}: the sidecar logged no inbound connection:\n{}\n{}",
                pod.log("sidecar"),
                ebpf.agent().log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let logged = inbound().pop().expect("a line");
        assert!(
            matches!(&logged.event, ProxyEvent::Failed(reason) if reason.contains("SSL")),
            "{who}: {logged}"
        );
    }

    // The pod depends on the datapath (its mesh init container was replaced), so the agent's
    // guard could not uninstall it while the pod is there: the kubelet deletes it first.
    node.remove_pod(&pod);
    api.delete("meshed");
    let pins = ebpf.pin_path().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while probe_bypass::datapath::mapped_addrs(&pins).is_ok_and(|addrs| addrs.contains(&ip)) {
        assert!(std::time::Instant::now() < deadline, "the pod left the map");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `deploy/` file `name`, parsed.
fn deploy_manifest(name: &str) -> Value {
    let path = format!("{}/../deploy/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {path}: {error}"));
    serde_norway::from_str(&text).unwrap_or_else(|error| panic!("parse {path}: {error}"))
}

/// `args` with `flag`'s value replaced by `value`.
fn with_value(args: &mut [String], flag: &str, value: &str) {
    let at = args
        .iter()
        .position(|arg| arg == flag)
        .unwrap_or_else(|| panic!("the DaemonSet passes {flag}"));
    args[at + 1] = value.to_owned();
}

/// The DaemonSet's agent pod as the kubelet would run it here: `hostNetwork` and `hostPID`, the
/// agent container of `deploy/daemonset.yaml` with its arguments, its environment (the downward
/// API's and `deploy/config.yaml`'s ConfigMap), its user, capabilities, read-only root and the
/// pod's RuntimeDefault seccomp filter, and its volumes: the host's `/proc` and `/sys/fs/cgroup`
/// read-only, the test's bpffs for the node's, a directory for the admin socket's `emptyDir`, and
/// its service account (token, CA and the API server's address), from which the agent builds its
/// in-cluster client. Only what would reach beyond the test is changed: `--cgroup-root` is the
/// node's test cgroup (never the root), and the admin addresses are free loopback ports.
fn daemonset_agent(
    node: &CriNode,
    pins: &TestPins,
    admin: &TempDir,
    account: &ServiceAccount,
) -> PodSpec {
    let daemonset = deploy_manifest("daemonset.yaml");
    let pod = &daemonset["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    assert_eq!(pod["hostPID"], true);
    let manifest = pod["containers"]
        .as_array()
        .and_then(|all| all.iter().find(|container| container["name"] == "agent"))
        .expect("the agent container");
    let mut agent = Container::from_manifest(manifest);
    assert_eq!(
        agent.image,
        format!("probe-bypass:{}", env!("CARGO_PKG_VERSION"))
    );
    agent.seccomp_runtime_default =
        pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault";
    let config = deploy_manifest("config.yaml");
    for (key, value) in config["data"].as_object().expect("the ConfigMap's data") {
        agent
            .env
            .push((key.clone(), value.as_str().unwrap_or_default().to_owned()));
    }
    agent.env.extend(account.env.iter().cloned());
    // As the agents the tests run on the host log.
    agent
        .env
        .push(("RUST_LOG".to_owned(), "probe_bypass=debug".to_owned()));
    let cgroup_root = format!("/host{}", node.cgroup_root().display());
    with_value(&mut agent.args, "--cgroup-root", &cgroup_root);
    with_value(
        &mut agent.args,
        "--admin-addr",
        &free_loopback_port().to_string(),
    );
    with_value(
        &mut agent.args,
        "--secure-admin-addr",
        &free_loopback_port().to_string(),
    );
    // The host paths the DaemonSet's volumes name, the node's bpffs standing in for its
    // `/sys/fs/bpf`.
    let volume = |name: &str| match name {
        "admin-socket" => admin.path.clone(),
        "bpffs" => pins.mount_point().to_owned(),
        "cgroup" => std::path::PathBuf::from("/sys/fs/cgroup"),
        "proc" => std::path::PathBuf::from("/proc"),
        other => panic!("the DaemonSet mounts a volume {other} the test does not stand in for"),
    };
    agent.mounts = volume_mounts(manifest, volume);
    agent.mounts.push(Bind {
        host: account.dir.path.clone(),
        container: ServiceAccount::MOUNT.to_owned(),
        readonly: true,
        propagation: Propagation::Private,
    });
    // Its init container mounts the node's bpffs, where the agent's pins outlive it.
    let [init] = pod["initContainers"]
        .as_array()
        .expect("the DaemonSet's init containers")
        .as_slice()
    else {
        panic!("the DaemonSet has one init container, mount-bpffs")
    };
    let mut mount_bpffs = Container::from_manifest(init);
    mount_bpffs.image.clone_from(&agent.image);
    mount_bpffs.seccomp_runtime_default = agent.seccomp_runtime_default;
    mount_bpffs.mounts = volume_mounts(init, volume);
    let mut spec = PodSpec::new("probe-bypass-agent", CgroupDriver::Cgroupfs);
    spec.namespace = "probe-bypass".to_owned();
    spec.host_network = true;
    spec.host_pid = true;
    spec.init_containers.push(mount_bpffs);
    spec.containers.push(agent);
    spec
}

/// The `volumeMounts` of the container `manifest`, each on the host path `volume` gives its
/// volume, with its `readOnly` and `mountPropagation`.
fn volume_mounts(manifest: &Value, volume: impl Fn(&str) -> std::path::PathBuf) -> Vec<Bind> {
    manifest["volumeMounts"]
        .as_array()
        .expect("volume mounts")
        .iter()
        .map(|mount| Bind {
            host: volume(mount["name"].as_str().expect("a volume's name")),
            container: mount["mountPath"]
                .as_str()
                .expect("a mount path")
                .to_owned(),
            readonly: mount["readOnly"] == true,
            propagation: Propagation::from_manifest(&mount["mountPropagation"]),
        })
        .collect()
}

/// The exec command of the agent container's probe `kind` (`readinessProbe`, `livenessProbe`).
fn exec_probe(kind: &str) -> Vec<String> {
    let daemonset = deploy_manifest("daemonset.yaml");
    daemonset["spec"]["template"]["spec"]["containers"]
        .as_array()
        .and_then(|all| all.iter().find(|container| container["name"] == "agent"))
        .and_then(|agent| agent[kind]["exec"]["command"].as_array())
        .expect("an exec probe")
        .iter()
        .map(|arg| arg.as_str().expect("a word").to_owned())
        .collect()
}

#[test]
fn the_daemonsets_agent_runs_as_a_container_of_the_node_and_serves_its_pods() {
    if !privilege::can_run() || !node_can_run() {
        return;
    }
    // Before the node, so that it goes after the node's containers. Nothing is mounted there
    // yet: the agent pod's `mount-bpffs` init container mounts the bpffs.
    let pins = TestPins::unmounted_shared();
    let admin = TempDir::new("agent-admin");
    let Some((mut node, api, _runtime)) = start_node() else {
        return;
    };
    // The kubelet, as the agent looks for it: a process named `kubelet` in the node's subtree
    // where the programs are attached; another host daemon beside it.
    let kubelet_cgroup = ChildCgroup::new(node.cgroup(), "kubelet.service");
    let daemon = ChildCgroup::new(node.cgroup(), "other-daemon.service");
    let kubelet_process = KubeletProcess::start(&kubelet_cgroup);
    let account = api.service_account("probe-bypass");
    let agent_pod = node.run_pod(&daemonset_agent(&node, &pins, &admin, &account));
    let mounted = agent_pod.log("mount-bpffs");
    assert_eq!(
        agent_pod.init_exits,
        [("mount-bpffs".to_owned(), 0)],
        "the privileged init container mounts the node's bpffs:\n{mounted}"
    );
    assert!(
        mounted.contains("mounted bpffs on /host/sys/fs/bpf"),
        "mount-bpffs says it mounted: {mounted}"
    );
    let on_host = nix::sys::statfs::statfs(pins.mount_point()).expect("statfs the node's bpffs");
    assert_eq!(
        on_host.filesystem_type(),
        nix::sys::statfs::BPF_FS_MAGIC,
        "the bpffs mount made in the container reaches the host (Bidirectional)"
    );
    let agent = agent_pod.containers["agent"].clone();
    let readiness = exec_probe("readinessProbe");
    let readiness: Vec<&str> = readiness.iter().map(String::as_str).collect();
    let ready = |node: &CriNode| node.exec_sync(&agent, &readiness, Duration::from_secs(2));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (code, output) = ready(&node).unwrap_or_else(|error| {
            panic!(
                "{error}\nthe agent container's log:\n{}",
                agent_pod.log("agent")
            )
        });
        if code == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the agent container is not ready ({code}): {output}\n{}",
            agent_pod.log("agent")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = agent_pod.log("agent");
    assert!(
        log.contains("eBPF datapath attached to /host/sys/fs/cgroup"),
        "the agent attached its programs from inside its container:\n{log}"
    );
    let kubelet_at = format!("/host{}", kubelet_cgroup.path().display());
    assert!(
        log.contains(&kubelet_at),
        "the agent found the kubelet (pid {}) in {kubelet_at} through the host's /proc:\n{log}",
        kubelet_process.pid()
    );

    // A meshed pod: its validation passes on the containerised agent's datapath, and the
    // kubelet's probe through the healthcheck reaches its app.
    let rewritten = injected::replaced_fixture(Mesh::Fsm);
    let meshed = node.run_pod_then(&validated_pod("meshed", &rewritten, &[]), |pod| {
        api.apply(rewritten_api_pod(&rewritten, pod));
    });
    assert!(
        meshed.initialized(),
        "{}\n{}",
        meshed.log(VALIDATION),
        agent_pod.log("agent")
    );
    let probe = format!("Original-Tcp-Port: {FIXTURE_APP_PORT}");
    let url = format!("http://{}:15904/fsm-healthcheck", meshed.ip);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let code = get_from(&kubelet_cgroup, &url, Some(&probe));
        if code == "200" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the kubelet's probe through the healthcheck: {code}\n{}",
            agent_pod.log("agent")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Not the kubelet: the pod has no sidecar to meet, so the connection is refused.
    assert_eq!(get_from(&daemon, &url, Some(&probe)), "curl:7");
    let liveness = exec_probe("livenessProbe");
    let liveness: Vec<&str> = liveness.iter().map(String::as_str).collect();
    let (code, output) = node
        .exec_sync(&agent, &liveness, Duration::from_secs(2))
        .expect("the liveness probe runs");
    assert_eq!(code, 0, "{output}");

    // The pod goes first (it depends on the datapath), then the agent; the datapath stays
    // pinned for the next agent, as on a node, until it is uninstalled.
    node.remove_pod(&meshed);
    api.delete("meshed");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while probe_bypass::datapath::mapped_addrs(pins.path())
        .is_ok_and(|addrs| addrs.contains(&meshed.ip))
    {
        assert!(std::time::Instant::now() < deadline, "the pod left the map");
        std::thread::sleep(Duration::from_millis(20));
    }
    node.remove_pod(&agent_pod);
    assert!(pins.path().exists(), "the datapath outlives its agent");
    let uninstall = std::process::Command::new(probe_bypass_testing::agent_bin())
        .args(["uninstall", "--pin-path", &pins.arg()])
        .output()
        .expect("probe-bypass uninstall");
    assert!(uninstall.status.success(), "{uninstall:?}");
}

/// The agent's image as a user ships it: `cargo xtask image`'s archive pushed with `skopeo` to a
/// registry (Debian's `docker-registry`, over HTTPS with a CA of the test's own), pulled by the
/// node through CRI's image service as the kubelet pulls a pod's image, under the digest the
/// archive has, and run from the registry's reference.
#[test]
fn the_agents_image_pushed_to_a_registry_is_pulled_through_cri_and_runs() {
    if !privilege::can_run() || !node_can_run() {
        return;
    }
    if let Some(reason) = registry::missing() {
        privilege::skip(
            "the_agents_image_pushed_to_a_registry_is_pulled_through_cri_and_runs",
            &reason,
        );
        return;
    }
    let certs = Certificates::new();
    let registry = Registry::start(&certs);
    let archive = images::agent_archive();
    let version = env!("CARGO_PKG_VERSION");
    let reference = registry.push(&archive, &format!("probe-bypass/agent:{version}"));
    let mut node = CriNode::start();
    node.containerd()
        .trust_registry(&registry.host(), registry.ca());
    let digests = node.pull_image(&reference);
    let digest = registry::archive_digest(&archive);
    let repository = reference.rsplit_once(':').expect("a tag").0;
    assert_eq!(
        digests,
        [format!("{repository}@{digest}")],
        "the node holds the image under the digest of the archive `cargo xtask image` wrote"
    );

    let mut spec = PodSpec::new("pulled", CgroupDriver::Cgroupfs);
    let mut agent = Container::new("version", &reference, &["--version"]);
    agent.read_only_rootfs = true;
    agent.drop_all_capabilities = true;
    spec.init_containers.push(agent);
    let pod = node.run_pod(&spec);
    let log = pod.log_lines("version");
    assert_eq!(
        pod.init_exits,
        [("version".to_owned(), 0)],
        "the pulled image runs: {log:?}"
    );
    assert_eq!(log, [format!("probe-bypass {version}")]);
    node.remove_pod(&pod);
}
