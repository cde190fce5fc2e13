//! `--pod-source kube` against the Kubernetes API protocol over real HTTP: a stand-in API server
//! (`support/kube_api.rs`) serves list and watch for `/api/v1/pods`, a real kube-rs client talks
//! to it, and the agent's source follows this node's pods through adds, late IPs, deletes, refused
//! lists and a relist after the watch expired. The last tests run the agent binary against it,
//! with a pod's process in a real cgroup and network namespace: one probes the healthcheck the
//! agent opens there, one restarts an agent whose eBPF datapath serves the pod while the pod's
//! namespace cannot be found, and checks that the pod keeps its datapath entry throughout; one
//! probes a pod before its namespace is found and finds that probe counted in `/metrics` once the
//! pod is served.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking, with a message naming the step that broke"
)]

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    sync::Arc,
    time::{Duration, Instant},
};

use probe_bypass::{
    datapath,
    discovery::{NetnsLookup, NetnsQuery},
    pod::NetnsRef,
    source::{
        Snapshot,
        kube::{self, KubeMetrics, MeshSelector, Settings},
    },
};
use probe_bypass_testing::require_privileges;
use probe_bypass_testing::{
    agent::{Agent, ebpf_args},
    bpffs::TestPins,
    cgroup::TestCgroup,
    kube_api::{FSM_POD, FakeApi, Kubeconfig},
    kubelet,
    kubepods::PodProcess,
    pod::TestPod,
};
use serde_json::{Value, json};
use tokio::sync::watch;

const NODE: &str = "worker-1";

/// The fixture pod named `name`, with UID `uid-<name>` and IP `ip` (none: not started yet).
fn pod(name: &str, ip: Option<&str>) -> Value {
    let mut pod: Value = serde_json::from_str(FSM_POD).expect("fixture");
    pod["metadata"]["name"] = json!(name);
    pod["metadata"]["uid"] = json!(format!("uid-{name}"));
    let status = pod["status"].as_object_mut().expect("status");
    match ip {
        Some(ip) => {
            status.insert("podIP".into(), json!(ip));
            status.insert("podIPs".into(), json!([{ "ip": ip }]));
        }
        None => {
            status.remove("podIP");
            status.remove("podIPs");
            status.insert("phase".into(), json!("Pending"));
        }
    }
    pod
}

/// Names a pod's namespace after its UID: what the test checks is the source, not the lookup.
struct ByUid;

impl NetnsLookup for ByUid {
    fn lookup(&self, pods: &[NetnsQuery]) -> Vec<Result<NetnsRef, String>> {
        pods.iter()
            .map(|pod| Ok(NetnsRef::Named(pod.uid.clone())))
            .collect()
    }
}

fn client(api: &FakeApi) -> ::kube::Client {
    let config = ::kube::Config::new(api.url().parse().expect("the API server's URL"));
    ::kube::Client::try_from(config).expect("a client")
}

fn start(api: &FakeApi, metrics: &KubeMetrics) -> watch::Receiver<Arc<Snapshot>> {
    let settings = Settings {
        node_name: NODE.into(),
        mesh: MeshSelector::default(),
    };
    kube::watch(client(api), settings, Arc::new(ByUid), metrics.clone())
}

/// The served pods as `name@ip`.
fn served(snapshot: &Snapshot) -> Vec<String> {
    snapshot
        .pods
        .values()
        .map(|pod| format!("{}@{}", pod.key.name, pod.ip))
        .collect()
}

/// Waits until the source publishes `want`, and returns every set it published on the way.
async fn wait_for(pods: &mut watch::Receiver<Arc<Snapshot>>, want: &[&str]) -> Vec<Vec<String>> {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let now = served(&pods.borrow_and_update());
        seen.push(now.clone());
        if now == want {
            return seen;
        }
        match tokio::time::timeout_at(deadline, pods.changed()).await {
            Ok(changed) => changed.expect("the source runs"),
            Err(_) => panic!("the source published {seen:?}, never {want:?}"),
        }
    }
}

#[tokio::test]
async fn source_follows_this_nodes_pods_through_watch_events_and_a_relist() {
    let api = FakeApi::start(NODE).await;
    api.apply(pod("a", Some("10.244.1.17")));
    let mut elsewhere = pod("far", Some("10.244.2.9"));
    elsewhere["spec"]["nodeName"] = json!("worker-2");
    api.apply(elsewhere);
    let mut host = pod("host", Some("172.18.0.3"));
    host["spec"]["hostNetwork"] = json!(true);
    api.apply(host);
    let metrics = KubeMetrics::default();
    let mut pods = start(&api, &metrics);

    tokio::time::timeout(Duration::from_secs(20), pods.changed())
        .await
        .expect("a first list")
        .expect("the source runs");
    assert_eq!(served(&pods.borrow_and_update()), ["a@10.244.1.17"]);

    // Added without an IP: held; the IP appears later.
    api.apply(pod("b", None));
    api.apply(pod("b", Some("10.244.1.18")));
    wait_for(&mut pods, &["a@10.244.1.17", "b@10.244.1.18"]).await;

    // Terminating pods keep being served until they are deleted.
    let mut terminating = pod("a", Some("10.244.1.17"));
    terminating["metadata"]["deletionTimestamp"] = json!("2025-03-11T10:00:00Z");
    api.apply(terminating);
    api.delete("a");
    wait_for(&mut pods, &["b@10.244.1.18"]).await;

    // The watch expires while b is deleted and c added: the relist shows c and not b, and the
    // set goes from one to the other without an empty or partial set between.
    api.delete_unseen("b");
    api.apply(pod("c", Some("10.244.1.19")));
    api.expire_watches();
    let seen = wait_for(&mut pods, &["c@10.244.1.19"]).await;
    assert!(seen.iter().all(|set| !set.is_empty()), "{seen:?}");
    assert_eq!(
        api.lists(),
        2,
        "one list at start, one after the watch expired"
    );
    assert_eq!(metrics.relists.get(), 2);
    assert_eq!(metrics.watch_errors.get(), 0);
    assert_eq!(api.bad_requests(), Vec::<String>::new());
    // Both lists are consistent reads: a relist served from a lagging API server's watch cache
    // could lack pods the agent serves, and removing them would let traffic skip their sidecars.
    assert_eq!(api.list_versions(), [None, None]);
}

#[tokio::test]
async fn refused_lists_are_retried_and_counted_until_the_api_server_answers() {
    let api = FakeApi::start(NODE).await;
    api.apply(pod("a", Some("10.244.1.17")));
    api.refuse_lists(2);
    let metrics = KubeMetrics::default();
    let mut pods = start(&api, &metrics);
    tokio::time::timeout(Duration::from_secs(30), pods.changed())
        .await
        .expect("a list once the API server answers")
        .expect("the source runs");
    assert_eq!(served(&pods.borrow()), ["a@10.244.1.17"]);
    assert_eq!(metrics.watch_errors.get(), 2);
    assert_eq!(api.lists(), 1);
}

fn answers(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

#[test]
fn agent_serves_the_healthcheck_of_a_pod_it_learns_from_the_api_server() {
    require_privileges!();
    const APP_PORT: u16 = 8080;
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    let api = runtime.block_on(FakeApi::start(NODE));
    let test_pod = TestPod::new();
    let _app = test_pod.listen(SocketAddr::new(IpAddr::V4(test_pod.ip), APP_PORT));
    let uid = meshed_pod(&api, &test_pod, "bookstore", APP_PORT);
    let _process = PodProcess::start(&test_pod, &uid);

    let kubeconfig = api.kubeconfig();
    let mut agent = Agent::start_kube(&kubeconfig.path, NODE, &[], "probe_bypass=debug");
    let healthcheck = test_pod.healthcheck();
    agent.wait_until(
        "the healthcheck listener in the pod",
        Duration::from_secs(20),
        |_| answers(healthcheck),
    );
    let reply = kubelet::probe(healthcheck, &APP_PORT.to_string());
    assert_eq!(reply.status, 200, "{reply:?}\n{}", agent.log_text());
    let (status, body) = agent.get("/health/ready").expect("readiness");
    assert_eq!(status, 200, "{body}");
    let (_, metrics) = agent.get("/metrics").expect("metrics");
    assert!(
        metrics.contains("probe_bypass_kube_relists_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("probe_bypass_kube_pods_pending{reason=\"no_netns\"} 0"),
        "{metrics}"
    );

    api.delete("bookstore");
    agent.wait_until(
        "closing the listener of the deleted pod",
        Duration::from_secs(20),
        |_| !answers(healthcheck),
    );
    assert_eq!(api.bad_requests(), Vec::<String>::new());
}

/// A meshed pod in the API server whose process is in `test_pod`'s namespace, under a UID of its
/// own; `app_port` is what its liveness probe checks.
fn meshed_pod(api: &FakeApi, test_pod: &TestPod, name: &str, app_port: u16) -> String {
    let uid = format!(
        "5c2e8b41-{:04x}-4a7d-8e90-{:012x}",
        std::process::id() & 0xffff,
        u32::from(test_pod.ip)
    );
    let mut meshed = pod(name, Some(&test_pod.ip.to_string()));
    meshed["metadata"]["uid"] = json!(uid);
    meshed["spec"]["containers"][0]["livenessProbe"]["httpGet"]["httpHeaders"] =
        json!([{ "name": "Original-Tcp-Port", "value": app_port.to_string() }]);
    api.apply(meshed);
    uid
}

/// What the tests of the agent binary with its eBPF datapath share: the API server with the meshed
/// pod `bookstore` in it (its liveness probe checking port 8080), the pod's namespace, a test
/// cgroup for the programs and a bpffs for their pins. Fields drop in order: the pins (which
/// detaches the programs) before the cgroup, the API server before its runtime.
struct EbpfNode {
    kubeconfig: Kubeconfig,
    test_pod: TestPod,
    uid: String,
    pins: TestPins,
    cgroup: TestCgroup,
    api: FakeApi,
    _runtime: tokio::runtime::Runtime,
}

impl EbpfNode {
    const APP_PORT: u16 = 8080;

    fn new() -> Self {
        let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
        let api = runtime.block_on(FakeApi::start(NODE));
        let test_pod = TestPod::new();
        let uid = meshed_pod(&api, &test_pod, "bookstore", Self::APP_PORT);
        Self {
            kubeconfig: api.kubeconfig(),
            test_pod,
            uid,
            pins: TestPins::new(),
            cgroup: TestCgroup::new(),
            api,
            _runtime: runtime,
        }
    }

    /// Whether `addr` accepts a connection made as the kubelet's: from the host network namespace,
    /// inside the cgroup the programs run for. (The test's own process is outside it, and the
    /// datapath takes its connections to a meshed pod for another node's, which the probe ports do
    /// not let past the sidecar.)
    fn kubelet_answers(&self, addr: SocketAddr) -> bool {
        let connect = format!("exec 3<>/dev/tcp/{}/{}", addr.ip(), addr.port());
        self.cgroup
            .output("timeout", &["1", "bash", "-c", &connect])
            .status
            .success()
    }

    /// The status of the kubelet's rewritten tcpSocket probe of the app's port, sent from the
    /// cgroup as [`Self::kubelet_answers`] connects.
    fn kubelet_probe(&self, healthcheck: SocketAddr) -> String {
        let url = format!("http://{healthcheck}/fsm-healthcheck");
        let header = format!("Original-Tcp-Port: {}", Self::APP_PORT);
        let output = self
            .cgroup
            .output("curl", &kubelet::curl_args(&url, Some(&header)));
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Starts the agent with the kube source and the eBPF datapath confined to the test cgroup.
    fn agent(&self) -> Agent {
        let cgroup_root = self.cgroup.path().display().to_string();
        let pin_path = self.pins.arg();
        let args = ebpf_args(&cgroup_root, &pin_path);
        Agent::start_kube(&self.kubeconfig.path, NODE, &args, "probe_bypass=debug")
    }

    /// Whether the pod's address is in the datapath's pinned pod map.
    fn mapped(&self) -> bool {
        let ip = IpAddr::V4(self.test_pod.ip);
        datapath::mapped_addrs(self.pins.path()).is_ok_and(|addrs| addrs.contains(&ip))
    }
}

/// Whether `/health/ready` fails naming the pod `bookstore` as waiting for its network namespace.
fn pending_in_readiness(agent: &Agent) -> bool {
    agent.get("/health/ready").is_some_and(|(status, body)| {
        status == 503 && body.contains("bookstore") && body.contains("network namespace")
    })
}

/// Issue 4: "an agent that restarts rebuilds its state from the API and /proc without disturbing
/// pods that are already served". The pod's process is gone when the new agent starts (as while a
/// sandbox restarts), so its namespace cannot be found: the pod is not served yet, but it is not
/// gone, and the entry the earlier agent left in the datapath for it must stay.
#[test]
fn restarted_agent_keeps_the_datapath_entry_of_a_pod_whose_netns_it_has_not_found_yet() {
    require_privileges!();
    let node = EbpfNode::new();
    let test_pod = &node.test_pod;
    let _app = test_pod.listen(SocketAddr::new(IpAddr::V4(test_pod.ip), EbpfNode::APP_PORT));
    let mut process = PodProcess::start(test_pod, &node.uid);
    let mapped = || node.mapped();
    let healthcheck = test_pod.healthcheck();

    let mut first = node.agent();
    first.wait_until("serving the pod", Duration::from_secs(20), |_| {
        node.kubelet_answers(healthcheck) && mapped()
    });
    process.stop();
    let (status, _) = first.terminate();
    assert!(status.success(), "the first agent exits cleanly");
    assert!(mapped(), "the entry outlives the agent (pinned)");

    let mut second = node.agent();
    second.wait_until(
        "readiness naming the pod and why it is not served",
        Duration::from_secs(20),
        pending_in_readiness,
    );
    // The namespace lookup fails and is retried meanwhile; the entry stays all along.
    let until = Instant::now() + Duration::from_secs(2);
    while Instant::now() < until {
        assert!(
            mapped(),
            "the pod's datapath entry was removed while its netns was pending:\n{}",
            second.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    process.enter(test_pod);
    second.wait_until(
        "serving the pod again once its process is back",
        Duration::from_secs(20),
        |_| node.kubelet_answers(healthcheck),
    );
    assert!(mapped(), "{}", second.log_text());
    assert_eq!(
        node.kubelet_probe(healthcheck),
        "200",
        "{}",
        second.log_text()
    );
    second.wait_ready(200, Duration::from_secs(10));

    // Gone from the API: gone from the datapath.
    node.api.delete("bookstore");
    second.wait_until(
        "removing the deleted pod's entry",
        Duration::from_secs(20),
        |_| !mapped(),
    );
    assert_eq!(node.api.bad_requests(), Vec::<String>::new());
}

/// A pending pod that leaves the API while the restarted agent still looks for its namespace has
/// its entry removed: carrying it ends with the pod.
#[test]
fn restarted_agent_removes_the_entry_of_a_pending_pod_deleted_from_the_api() {
    require_privileges!();
    let node = EbpfNode::new();
    let mut process = PodProcess::start(&node.test_pod, &node.uid);
    let mapped = || node.mapped();

    let mut first = node.agent();
    first.wait_until("mapping the pod", Duration::from_secs(20), |_| mapped());
    process.stop();
    first.terminate();

    let mut second = node.agent();
    second.wait_until(
        "readiness naming the pending pod",
        Duration::from_secs(20),
        pending_in_readiness,
    );
    assert!(mapped(), "{}", second.log_text());
    node.api.delete("bookstore");
    second.wait_until(
        "removing the deleted pending pod's entry",
        Duration::from_secs(20),
        |_| !mapped(),
    );
    second.wait_ready(200, Duration::from_secs(10));
}

/// Issue 4: the kubelet's probes that reach a pod the agent knows but cannot serve yet (its
/// process has not entered its cgroup, so its namespace is not found) are refused, as in other
/// meshes (istio#18505); the datapath counts them, and once the pod is served the count shows in
/// `/metrics` under the pod's name.
#[test]
fn probes_refused_before_a_pod_is_served_show_in_the_metrics_once_it_is() {
    require_privileges!();
    let node = EbpfNode::new();
    let mut process = PodProcess::cgroup(&node.uid);
    let healthcheck = node.test_pod.healthcheck();
    let mut agent = node.agent();
    agent.wait_until(
        "readiness naming the pending pod",
        Duration::from_secs(20),
        pending_in_readiness,
    );

    // The kubelet's probe, from the host network namespace (in the test cgroup, where the
    // programs run): nothing listens yet.
    let probe = format!(
        "exec 3<>/dev/tcp/{}/{}",
        healthcheck.ip(),
        healthcheck.port()
    );
    let refused = node.cgroup.output("timeout", &["3", "bash", "-c", &probe]);
    assert!(!refused.status.success(), "{}", agent.log_text());

    process.enter(&node.test_pod);
    // Served once ready: a kubelet-like connection to tell would itself be counted meanwhile.
    agent.wait_ready(200, Duration::from_secs(20));
    assert!(node.kubelet_answers(healthcheck), "{}", agent.log_text());
    let counted =
        "probe_bypass_probes_before_served_total{namespace=\"bookstore\",pod=\"bookstore\"} 1";
    agent.wait_until(
        "the early probe in the metrics",
        Duration::from_secs(10),
        |agent| {
            agent
                .get("/metrics")
                .is_some_and(|(_, body)| body.contains(counted))
        },
    );
    assert!(
        agent
            .log_text()
            .contains("pod bookstore/bookstore: 1 probes arrived before it was served"),
        "{}",
        agent.log_text()
    );
    assert_eq!(node.api.bad_requests(), Vec::<String>::new());
}
