//! `--pod-source kube` against the Kubernetes API protocol over real HTTP: a stand-in API server
//! (`support/kube_api.rs`) serves list and watch for `/api/v1/pods`, a real kube-rs client talks
//! to it, and the agent's source follows this node's pods through adds, late IPs, deletes, refused
//! lists and a relist after the watch expired. The last test runs the agent binary against it,
//! with a pod's process in a real cgroup and network namespace, and probes the healthcheck the
//! agent opens there.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking, with a message naming the step that broke"
)]

#[path = "support/kube_api.rs"]
mod kube_api;
#[path = "support/kubepods.rs"]
mod kubepods;
mod support;

use std::{
    fs,
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener as StdTcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use kube_api::FakeApi;
use kubepods::PodProcess;
use probe_bypass::{
    metrics::KubeMetrics,
    pod::NetnsRef,
    source::{
        PodSet,
        kube::{self, MeshSelector, NetnsLookup, NetnsQuery, Settings},
    },
};
use serde_json::{Value, json};
use support::{kubelet, pod::TestPod};
use tokio::sync::watch;

const NODE: &str = "worker-1";

/// An FSM-injected pod as the API server returns it.
const POD: &str = include_str!("support/kube_pod.json");

/// The fixture pod named `name`, with UID `uid-<name>` and IP `ip` (none: not started yet).
fn pod(name: &str, ip: Option<&str>) -> Value {
    let mut pod: Value = serde_json::from_str(POD).expect("fixture");
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

fn start(api: &FakeApi, metrics: &KubeMetrics) -> watch::Receiver<Arc<PodSet>> {
    let settings = Settings {
        node_name: NODE.into(),
        mesh: MeshSelector::default(),
    };
    kube::watch(client(api), settings, Arc::new(ByUid), metrics.clone())
}

/// The served pods as `name@ip`.
fn served(set: &PodSet) -> Vec<String> {
    set.values()
        .map(|pod| format!("{}@{}", pod.key.name, pod.ip))
        .collect()
}

/// Waits until the source publishes `want`, and returns every set it published on the way.
async fn wait_for(pods: &mut watch::Receiver<Arc<PodSet>>, want: &[&str]) -> Vec<Vec<String>> {
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

/// A temporary kubeconfig naming the stand-in API server; deleted on drop.
struct Kubeconfig(PathBuf);

impl Kubeconfig {
    fn new(api: &FakeApi) -> Self {
        let path = std::env::temp_dir().join(format!(
            "pb-test-kubeconfig-{}-{}",
            std::process::id(),
            api.addr.port()
        ));
        let text = format!(
            "apiVersion: v1\nkind: Config\ncurrent-context: test\n\
             clusters:\n- name: test\n  cluster:\n    server: {}\n\
             contexts:\n- name: test\n  context:\n    cluster: test\n    user: test\n\
             users:\n- name: test\n  user:\n    token: test\n",
            api.url()
        );
        fs::write(&path, text).expect("write the kubeconfig");
        Self(path)
    }
}

impl Drop for Kubeconfig {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// The agent binary with `--pod-source kube`, finding the API server through `KUBECONFIG`; killed
/// on drop, its log printed if the test failed.
struct KubeAgent {
    child: Child,
    admin: SocketAddr,
    log: PathBuf,
}

impl KubeAgent {
    fn start(kubeconfig: &Kubeconfig) -> Self {
        let admin = StdTcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .expect("a free port");
        let log = std::env::temp_dir().join(format!(
            "pb-test-kube-agent-{}-{}.log",
            std::process::id(),
            admin.port()
        ));
        let child = Command::new(env!("CARGO_BIN_EXE_probe-bypass"))
            .args(["run", "--pod-source", "kube", "--node-name", NODE])
            .args(["--admin-addr", &admin.to_string(), "--datapath", "none"])
            .env("KUBECONFIG", &kubeconfig.0)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env("RUST_LOG", "probe_bypass=debug")
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("agent log"))
            .spawn()
            .expect("start the agent");
        Self { child, admin, log }
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the admin endpoint: status and body, or None if it does not answer.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&self.admin, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.get(9..12)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some((status, body))
    }

    /// Waits until `ready` holds, failing with the agent's log after `within`.
    fn wait_until(&mut self, what: &str, within: Duration, mut ready: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + within;
        while !ready(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the agent exited ({status}):\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not happen:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for KubeAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        let _ = fs::remove_file(&self.log);
    }
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
    let uid = format!(
        "7d3f0a52-{:04x}-4b8e-9c61-2f8d5a0c7e14",
        std::process::id() & 0xffff
    );
    let _process = PodProcess::start(&test_pod, &uid);
    let mut meshed = pod("bookstore", Some(&test_pod.ip.to_string()));
    meshed["metadata"]["uid"] = json!(uid);
    meshed["spec"]["containers"][0]["livenessProbe"]["httpGet"]["httpHeaders"] =
        json!([{ "name": "Original-Tcp-Port", "value": APP_PORT.to_string() }]);
    api.apply(meshed);

    let kubeconfig = Kubeconfig::new(&api);
    let mut agent = KubeAgent::start(&kubeconfig);
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
