//! How soon the agent serves a pod that appears and forgets one that goes, with each pod source:
//! pod manifests (issue 3: "pods added or removed while running update the maps within 100 ms") and
//! the Kubernetes API (issue 4: "the listener and the map entries must be in place within 100 ms
//! of the pod's netns appearing").
//!
//! Test pods (network namespace and veth each) are made beforehand and serve both runs. Each run
//! starts one release-built agent with the eBPF datapath under a test cgroup of the run's own, its
//! pins on a bpffs of their own. Then, one pod at a time, the pod appears and the benchmark polls
//! until
//!
//! - the pod's address is in the datapath's pinned `PODS_BY_ADDR` map (read with
//!   [`datapath::mapped_addrs`], as an operator's tool would),
//! - the pod's healthcheck listener accepts a connection from the host; and
//! - the pod's `probe-bypass validate` (its validation init container, issue 14), started before
//!   the pod appears and waiting (as UID 65532 in the pod's netns), has exited 0;
//!
//! then the pod goes and the benchmark polls until both are gone again. Each time is taken from
//! just before the change, and each is set against a baseline taken in the same run from the same
//! instant: the floor for any agent that learns of the change the way this one does.
//!
//! **Manifests.** The pod appears when its manifest is written into the agent's directory
//! (atomically, as `tests/support/agent.rs` does), and goes when the file is deleted. Baseline: a
//! watcher of the benchmark's own on the directory, with the same inotify library the agent uses,
//! timed to the moment the event reaches it. The agent adds its debounce (20 ms, so that a burst
//! of writes is read once), a rescan of the directory, a netns switch to bind the listener, and
//! the map writes.
//!
//! **Kubernetes API** (`--pod-source kube` against the stand-in API server of
//! `tests/support/kube_api.rs`, through `KUBECONFIG`). Every pod is in the API with its IP from the
//! start, and its cgroup is in a `kubepods` tree with no process (below the test cgroup the agent is
//! given as `--cgroup-root`, where it looks for pods' cgroups as below a node's root), so the agent holds them all as
//! waiting for their network namespace (its lookups failing, their backoff growing to 10 s). A pod
//! appears when its first process enters its cgroup inside its network namespace, as a sandbox's
//! first process does: that is the pod's netns appearing as the agent can see it. Baseline: the
//! benchmark itself seeing the process both in the pod's cgroup (`populated 1` in its
//! `cgroup.events`, the signal the agent polls every 20 ms) and in the pod's namespace
//! (`/proc/<pid>/ns/net`), polling at [`POLL`]: the moment from which a lookup can succeed. The
//! agent adds its 20 ms poll of the cgroups, a scan of `/proc` (again 20, 40 ms later if the first
//! ran before the process entered the namespace), the netns switch and the map writes. A pod goes
//! when it is deleted from the API (a DELETED watch event). Baseline: a watch of the benchmark's own
//! on the same API server, with the same client library the agent uses, timed to the moment the
//! event reaches it.
//!
//! **CRI** (issue 17): the same agent and API server, with pods made through the CRI API of the
//! tests' own containerd (`tests/support/cri.rs`: runc, the CNI bridge), as the kubelet makes
//! them: RunPodSandbox, the pod's IP reported to the API server as soon as RunPodSandbox returns
//! (sooner than a kubelet, whose status update waits for its pod worker), then the validation init
//! container from the agent's image, then the app. Every time is taken from the sandbox's first
//! process entering the pod's cgroup (`populated 1` in its `cgroup.events`, polled at [`POLL`] by
//! a thread of the benchmark's own from before RunPodSandbox). Baseline: RunPodSandbox returning,
//! the runtime's own part. The validation's exit is containerd's `finished_at`. A pod goes through
//! StopPodSandbox and RemovePodSandbox, then its deletion from the API, from which the times are
//! taken; baseline: the DELETED event reaching a watch, as in the API run. The sandbox's veth is
//! gone by then, so the listener counts as closed once the agent holds no descriptor of the pod's
//! namespace.
//!
//! Needs root (and for the CRI run containerd, runc, the CNI plugins and the tests' images, which
//! `cargo xtask bench` builds); without it the benchmark says why and exits successfully, unless
//! `CI` is set. The pods, the cgroups, the pins, the processes and the agents are removed on exit
//! and on a panic, by their guards. `PB_BENCH_PODS` sets how many pods come and go in each run
//! (default 100).

#![expect(
    clippy::expect_used,
    reason = "a benchmark stops at the first failure, with a message"
)]

use std::{
    fs,
    net::{IpAddr, SocketAddr, TcpStream},
    path::Path,
    pin::pin,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Pod as K8sPod;
use kube::{
    Api,
    runtime::watcher::{self, Event},
};
use notify::{RecursiveMode, Watcher as _};
use probe_bypass::{datapath, netns::NetnsId};
use probe_bypass_testing::{
    agent::{Agent, ManifestDir, ebpf_args},
    bench::count_from_env,
    bpffs::TestPins,
    cgroup::TestCgroup,
    cri::{CgroupDriver, Container, CriNode, PodSpec as CriPodSpec},
    injected::{self, Mesh, VALIDATION_CONTAINER_NAME},
    kube_api::{FSM_POD, FakeApi},
    kubepods::{Kubepods, PodProcess},
    pod::TestPod,
    validation::Waiting,
};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

/// Pods that come and go in each run, one at a time, unless `PB_BENCH_PODS` says otherwise.
const PODS: usize = 100;

/// How often the state is polled; each poll costs a map read and a connect attempt.
const POLL: Duration = Duration::from_micros(200);

/// A change that takes longer than this is a failure, not a slow result.
const GIVE_UP: Duration = Duration::from_secs(5);

/// The requirement the figures are read against.
const TARGET: Duration = Duration::from_millis(100);

/// The `--timeout` of each pod's validation: far beyond [`GIVE_UP`], so that only the benchmark
/// gives up.
const VALIDATION_TIMEOUT: &str = "30s";

/// The node the kube run's agent and pods are on.
const NODE: &str = "worker-1";

fn main() {
    if !probe_bypass_testing::privilege::bench_can_run("reconcile") {
        return;
    }
    let count = pods();
    eprintln!("== making {count} pods");
    let pods: Vec<TestPod> = (0..count).map(|_| TestPod::new()).collect();
    eprintln!("== pod manifests: adding and removing them one at a time");
    let manifests = manifests_run(&pods);
    eprintln!("== Kubernetes API: starting and deleting them one at a time");
    let kube = kube_run(&pods);
    drop(pods);
    let cri = match cri_missing() {
        None => {
            eprintln!("== CRI: making and removing them through containerd one at a time");
            Some(cri_run(count))
        }
        Some(reason) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "the CRI run cannot run ({reason}) and CI is set"
            );
            eprintln!("SKIPPED the CRI run: {reason}");
            None
        }
    };
    println!("command: `cargo xtask bench reconcile` (PB_BENCH_PODS={count})");
    println!(
        "{count} pods added and removed one at a time in each run; agent built for release, \
         RUST_LOG=info, --datapath ebpf under a test cgroup; target: {}",
        millis(TARGET)
    );
    print_table(
        "--pod-manifests: manifest written, then deleted",
        [
            "baseline: inotify event, manifest written",
            "baseline: inotify event, manifest deleted",
        ],
        &manifests,
    );
    print_table(
        "--pod-source kube: pending pod's first process enters its cgroup and netns, then the pod \
         is deleted from the API",
        [
            "baseline: process seen in the pod's cgroup and netns",
            "baseline: DELETED event reaches a watch",
        ],
        &kube,
    );
    if let Some(cri) = &cri {
        print_table(
            "cri: pods made through containerd's CRI API (runc, CNI bridge), times from the \
             sandbox's first process; then stopped and removed through it and deleted from the \
             API, times from the deletion (listener closed: no descriptor of the namespace left)",
            [
                "baseline: RunPodSandbox returns",
                "baseline: DELETED event reaches a watch",
            ],
            cri,
        );
    }
}

/// What the CRI run lacks on this machine, if anything.
fn cri_missing() -> Option<String> {
    probe_bypass_testing::containerd::missing().or_else(probe_bypass_testing::images::missing)
}

/// Makes `count` pods through CRI, one at a time, each served and then removed.
fn cri_run(count: usize) -> Timings {
    let mut node = CriNode::start();
    let runtime = Runtime::new().expect("a tokio runtime");
    let api = runtime.block_on(FakeApi::start(NODE));
    // The probes this benchmark sends are the kubelet's: they start under the programs' cgroup.
    let _inside = node.cgroup().enter();
    let deletes = watch_api(&runtime, &api);
    let pins = TestPins::new();
    let kubeconfig = api.kubeconfig();
    let cgroup_root = node.cgroup_root().display().to_string();
    let pin_path = pins.arg();
    let agent = Agent::start_kube(
        &kubeconfig.path,
        NODE,
        &ebpf_args(&cgroup_root, &pin_path),
        "info",
    );
    agent.wait_ready(200, Duration::from_secs(20));
    let validation = validation_container();

    let mut timings = Timings::default();
    for i in 0..count {
        let mut spec = CriPodSpec::new(&pod_name(i), CgroupDriver::Cgroupfs);
        spec.init_containers.push(validation.clone());
        spec.containers.push(Container::app(&pod_name(i), &[8080]));
        let first_process = first_process_watch(node.pod_cgroup(&spec));
        let mut added = None;
        let pod = node.run_pod_then(&spec, |pod| {
            let returned = Instant::now();
            let mut value = kube_pod(i, &spec.uid, pod.ip);
            value["metadata"]["namespace"] = json!(spec.namespace);
            api.apply(value);
            let started = first_process
                .recv_timeout(GIVE_UP)
                .expect("the sandbox's first process entered its cgroup");
            timings
                .added_baseline
                .push(returned.saturating_duration_since(started));
            // Watched from a thread of its own while the kubelet goes on to the init container.
            let (ip, pins) = (pod.ip, pins.path().to_owned());
            added = Some((
                started,
                thread::spawn(move || until_addr(ip, &pins, true, started)),
            ));
        });
        let (started, seen) = added.expect("the sandbox was made");
        timings
            .added
            .push(seen.join().expect("the watch of the pod"));
        assert!(pod.initialized(), "{}", pod.log(VALIDATION_CONTAINER_NAME));
        let finished = node.finished_at(&pod.containers[VALIDATION_CONTAINER_NAME]);
        timings
            .validated
            .push(instant_of(finished).saturating_duration_since(started));

        let netns = fs::read_link(format!("/proc/{}/ns/net", node.pause_pid(&pod)))
            .expect("the sandbox's namespace");
        node.remove_pod(&pod);
        drain(&deletes);
        let started = Instant::now();
        api.delete(&pod_name(i));
        timings.removed.push(until_let_go(
            pod.ip,
            pins.path(),
            agent.pid(),
            &netns,
            started,
        ));
        timings
            .removed_baseline
            .push(first_event(&deletes, started));
    }
    assert_eq!(api.bad_requests(), Vec::<String>::new());
    timings
}

/// Polls until the pod's address is gone from the map and the agent holds no descriptor of its
/// namespace (`netns`, `net:[<inode>]`): its listener closed. (The sandbox's veth is gone with
/// it, so a connection attempt would only time out.)
fn until_let_go(addr: IpAddr, pins: &Path, agent: u32, netns: &Path, started: Instant) -> Seen {
    let holds = || {
        fs::read_dir(format!("/proc/{agent}/fd"))
            .expect("the agent's descriptors")
            .flatten()
            .any(|fd| fs::read_link(fd.path()).is_ok_and(|target| target == netns))
    };
    let (mut map, mut listener) = (None, None);
    loop {
        let now = Instant::now();
        if map.is_none()
            && !datapath::mapped_addrs(pins)
                .expect("read the pinned pod map")
                .contains(&addr)
        {
            map = Some(now - started);
        }
        if listener.is_none() && !holds() {
            listener = Some(now - started);
        }
        if let (Some(map), Some(listener)) = (map, listener) {
            return Seen { map, listener };
        }
        assert!(
            now - started < GIVE_UP,
            "pod {addr}: still not forgotten after {GIVE_UP:?} (map: {map:?}, namespace: {listener:?})"
        );
        thread::sleep(POLL);
    }
}

/// The validation init container as the rewriter writes it for FSM's injected pod.
fn validation_container() -> Container {
    let manifest = injected::replaced_fixture(Mesh::Fsm);
    let init = &manifest["spec"]["initContainers"][0];
    assert_eq!(init["name"], VALIDATION_CONTAINER_NAME, "{manifest}");
    let mut container = Container::from_manifest(init);
    container
        .args
        .extend(["--timeout", VALIDATION_TIMEOUT].map(str::to_owned));
    container
}

/// A thread polling at [`POLL`] until `cgroup` (made later, by the pod's start) holds a process;
/// it sends when.
fn first_process_watch(cgroup: std::path::PathBuf) -> mpsc::Receiver<Instant> {
    let (send, first) = mpsc::channel();
    let events = cgroup.join("cgroup.events");
    thread::spawn(move || {
        let started = Instant::now();
        while started.elapsed() < GIVE_UP {
            let now = Instant::now();
            if fs::read_to_string(&events)
                .is_ok_and(|events| events.lines().any(|line| line == "populated 1"))
            {
                let _ = send.send(now);
                return;
            }
            thread::sleep(POLL);
        }
    });
    first
}

/// The [`Instant`] of a wall-clock time in the recent past.
fn instant_of(time: std::time::SystemTime) -> Instant {
    let ago = std::time::SystemTime::now()
        .duration_since(time)
        .unwrap_or_default();
    Instant::now() - ago
}

fn pods() -> usize {
    // The address plan gives a test process 1024 pods.
    count_from_env("PB_BENCH_PODS", PODS, 1..=1024)
}

/// Writes each pod's manifest into the agent's directory, then deletes it.
fn manifests_run(pods: &[TestPod]) -> Timings {
    let cgroup = TestCgroup::new();
    // The probes this benchmark sends are the kubelet's: they start under the programs' cgroup.
    let _inside = cgroup.enter();
    let pins = TestPins::new();
    let dir = ManifestDir::new();
    let (events, _watcher) = watch_dir(&dir);
    let cgroup_root = cgroup.path().display().to_string();
    let pin_path = pins.arg();
    let agent =
        Agent::start_with_log_filter(&dir.path, &ebpf_args(&cgroup_root, &pin_path), "info");
    agent.wait_ready(200, Duration::from_secs(10));

    let mut timings = Timings::default();
    for (i, pod) in pods.iter().enumerate() {
        let file = format!("pod-{i}.json");
        let manifest = pod.manifest(&format!("pod-{i}"), &[8080]);
        let validation = Waiting::start(pod, &format!("pod-{i}"), "test", VALIDATION_TIMEOUT);
        drain(&events);
        let started = Instant::now();
        dir.write(&file, &manifest);
        timings.added.push(until(pod, &pins, true, started));
        timings.added_baseline.push(first_event(&events, started));
        timings.validated.push(validation.passed(started, GIVE_UP));

        drain(&events);
        let started = Instant::now();
        dir.remove(&file);
        timings.removed.push(until(pod, &pins, false, started));
        timings.removed_baseline.push(first_event(&events, started));
    }
    timings
}

/// The manifests' baseline: the benchmark's own inotify watcher on the directory, reporting when
/// each event arrives.
fn watch_dir(dir: &ManifestDir) -> (mpsc::Receiver<Instant>, notify::RecommendedWatcher) {
    let (send, events) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |_event| {
        let _ = send.send(Instant::now());
    })
    .expect("an inotify watcher");
    watcher
        .watch(&dir.path, RecursiveMode::NonRecursive)
        .expect("watch the manifests directory");
    (events, watcher)
}

/// Puts every pod in the API, waiting for its network namespace; then, one at a time, starts its
/// first process and deletes it from the API.
fn kube_run(pods: &[TestPod]) -> Timings {
    let runtime = Runtime::new().expect("a tokio runtime");
    let api = runtime.block_on(FakeApi::start(NODE));
    // The agent's --cgroup-root, where it attaches the programs and looks for pods' cgroups, as
    // on a node's root; before the pods' cgroups, which it must outlive.
    let cgroup = TestCgroup::new();
    // The probes this benchmark sends are the kubelet's: they start under the programs' cgroup.
    let _inside = cgroup.enter();
    let kubepods = Kubepods::under(cgroup.path());
    let sandboxes: Vec<PodProcess> = pods
        .iter()
        .enumerate()
        .map(|(i, pod)| {
            let uid = format!(
                "7b3f0e52-{:04x}-4c1d-9a6e-{:012x}",
                std::process::id() & 0xffff,
                u32::from(pod.ip)
            );
            api.apply(kube_pod(i, &uid, pod.ip.into()));
            kubepods.pod(&uid)
        })
        .collect();
    let deletes = watch_api(&runtime, &api);
    let pins = TestPins::new();
    let kubeconfig = api.kubeconfig();
    let cgroup_root = cgroup.path().display().to_string();
    let pin_path = pins.arg();
    let mut agent = Agent::start_kube(
        &kubeconfig.path,
        NODE,
        &ebpf_args(&cgroup_root, &pin_path),
        "info",
    );
    let all_pending = format!(
        "probe_bypass_kube_pods_pending{{reason=\"no_netns\"}} {}",
        pods.len()
    );
    agent.wait_until(
        "listing the pods, all waiting for their network namespace",
        Duration::from_secs(20),
        |agent| {
            agent
                .get("/metrics")
                .is_some_and(|(_, metrics)| metrics.contains(&all_pending))
        },
    );

    let mut timings = Timings::default();
    for (i, (pod, mut sandbox)) in pods.iter().zip(sandboxes).enumerate() {
        let validation = Waiting::start(pod, &pod_name(i), "bookstore", VALIDATION_TIMEOUT);
        let started = Instant::now();
        sandbox.enter(pod);
        timings
            .added_baseline
            .push(sandbox_seen(&sandbox, pod, started));
        timings.added.push(until(pod, &pins, true, started));
        timings.validated.push(validation.passed(started, GIVE_UP));

        drain(&deletes);
        let started = Instant::now();
        api.delete(&pod_name(i));
        timings.removed.push(until(pod, &pins, false, started));
        timings
            .removed_baseline
            .push(first_event(&deletes, started));
    }
    assert_eq!(api.bad_requests(), Vec::<String>::new());
    timings
}

fn pod_name(i: usize) -> String {
    format!("pod-{i}")
}

/// The fixture pod as pod `i` of the run, with UID `uid` and IP `ip`, on [`NODE`].
fn kube_pod(i: usize, uid: &str, ip: IpAddr) -> Value {
    let mut pod: Value = serde_json::from_str(FSM_POD).expect("the pod fixture");
    pod["metadata"]["name"] = json!(pod_name(i));
    pod["metadata"]["uid"] = json!(uid);
    pod["spec"]["nodeName"] = json!(NODE);
    pod["status"]["podIP"] = json!(ip.to_string());
    pod["status"]["podIPs"] = json!([{ "ip": ip.to_string() }]);
    pod
}

/// The API deletes' baseline: a watch of the benchmark's own on the stand-in API server, with the
/// client library the agent uses, reporting when each DELETED event arrives. Returns once the
/// watch has listed the pods.
fn watch_api(runtime: &Runtime, api: &FakeApi) -> mpsc::Receiver<Instant> {
    let (send, deletes) = mpsc::channel();
    let (listed, ready) = mpsc::channel();
    let url: hyper::Uri = api.url().parse().expect("the API server's URL");
    runtime.spawn(async move {
        let client = kube::Client::try_from(kube::Config::new(url)).expect("a client");
        let config = watcher::Config::default().fields(&format!("spec.nodeName={NODE}"));
        let mut events = pin!(watcher::watcher(Api::<K8sPod>::all(client), config));
        // An error ends the watch: before the list, the benchmark fails at once; after it, one
        // comes only when the API server stops at the end.
        while let Some(Ok(event)) = events.next().await {
            match event {
                Event::InitDone => {
                    let _ = listed.send(());
                }
                Event::Delete(_) => {
                    let _ = send.send(Instant::now());
                }
                Event::Init | Event::InitApply(_) | Event::Apply(_) => {}
            }
        }
    });
    ready
        .recv_timeout(GIVE_UP)
        .expect("the baseline watch listed the pods");
    deletes
}

/// The pod starts' baseline: polls until the sandbox's process is in the pod's cgroup (as its
/// `cgroup.events` says) and in the pod's network namespace, and returns when, from `started`.
fn sandbox_seen(sandbox: &PodProcess, pod: &TestPod, started: Instant) -> Duration {
    let events = sandbox.pod_cgroup().join("cgroup.events");
    let netns =
        NetnsId::of(&Path::new("/run/netns").join(&pod.netns_name)).expect("the pod's netns");
    let pid = sandbox.pid().expect("the pod's process");
    let process_netns = format!("/proc/{pid}/ns/net");
    loop {
        let now = Instant::now();
        let populated = fs::read_to_string(&events)
            .is_ok_and(|events| events.lines().any(|line| line == "populated 1"));
        if populated && NetnsId::of(Path::new(&process_netns)).is_ok_and(|id| id == netns) {
            return now - started;
        }
        assert!(
            now - started < GIVE_UP,
            "pod {}: its process is not in its cgroup and netns after {GIVE_UP:?}",
            pod.ip
        );
        thread::sleep(POLL);
    }
}

fn drain(events: &mpsc::Receiver<Instant>) {
    while events.try_recv().is_ok() {}
}

/// Time from `started` to the first event a baseline watcher received after it.
fn first_event(events: &mpsc::Receiver<Instant>, started: Instant) -> Duration {
    let at = events
        .recv_timeout(GIVE_UP)
        .expect("the baseline watcher saw the change");
    at.saturating_duration_since(started)
}

/// When a pod's address and healthcheck listener were first seen in the state `present`, each
/// from `started`.
struct Seen {
    map: Duration,
    listener: Duration,
}

/// Polls until the pod's map entry and listener are both present (or both gone).
fn until(pod: &TestPod, pins: &TestPins, present: bool, started: Instant) -> Seen {
    until_addr(IpAddr::V4(pod.ip), pins.path(), present, started)
}

/// [`until`] for the pod at `addr`, the datapath pinned in `pins`.
fn until_addr(addr: IpAddr, pins: &Path, present: bool, started: Instant) -> Seen {
    let healthcheck = SocketAddr::new(addr, 15904);
    let (mut map, mut listener) = (None, None);
    loop {
        let now = Instant::now();
        if map.is_none() {
            let addrs = datapath::mapped_addrs(pins).expect("read the pinned pod map");
            if addrs.contains(&addr) == present {
                map = Some(now - started);
            }
        }
        if listener.is_none() && listening(healthcheck) == present {
            listener = Some(now - started);
        }
        if let (Some(map), Some(listener)) = (map, listener) {
            return Seen { map, listener };
        }
        assert!(
            now - started < GIVE_UP,
            "pod {addr}: still not {} after {GIVE_UP:?} (map: {map:?}, listener: {listener:?})",
            if present { "served" } else { "forgotten" },
        );
        thread::sleep(POLL);
    }
}

/// Whether something accepts connections on `addr` (a refusal comes back at once over the veth).
fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
}

/// One run's times, each change with its baseline.
#[derive(Default)]
struct Timings {
    added: Vec<Seen>,
    added_baseline: Vec<Duration>,
    /// From the same instant as `added`: the pod's `probe-bypass validate`, waiting already,
    /// exits 0.
    validated: Vec<Duration>,
    removed: Vec<Seen>,
    removed_baseline: Vec<Duration>,
}

/// p50, p99 and max of a set of durations.
fn spread(mut values: Vec<Duration>) -> [Duration; 3] {
    values.sort();
    let at = |p: usize| values[(values.len() * p / 100).min(values.len() - 1)];
    [at(50), at(99), values[values.len() - 1]]
}

fn millis(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1e3)
}

/// One run's table, titled `title`, with its baselines named `[added, removed]`.
fn print_table(title: &str, baselines: [&str; 2], timings: &Timings) {
    let Timings {
        added,
        added_baseline,
        validated,
        removed,
        removed_baseline,
    } = timings;
    let [added_name, removed_name] = baselines;
    println!();
    println!("{title}");
    println!();
    println!("| change | p50 | p99 | max | p50 / baseline p50 | max within target |");
    println!("|---|---:|---:|---:|---:|---|");
    let rows: [(&str, Vec<Duration>, &[Duration]); 7] = [
        (added_name, added_baseline.clone(), added_baseline),
        (
            "added: address in PODS_BY_ADDR",
            added.iter().map(|seen| seen.map).collect(),
            added_baseline,
        ),
        (
            "added: healthcheck listener accepts",
            added.iter().map(|seen| seen.listener).collect(),
            added_baseline,
        ),
        (
            "added: the pod's `probe-bypass validate` exits 0",
            validated.clone(),
            added_baseline,
        ),
        (removed_name, removed_baseline.clone(), removed_baseline),
        (
            "removed: address gone from PODS_BY_ADDR",
            removed.iter().map(|seen| seen.map).collect(),
            removed_baseline,
        ),
        (
            "removed: healthcheck listener closed",
            removed.iter().map(|seen| seen.listener).collect(),
            removed_baseline,
        ),
    ];
    for (what, values, baseline) in rows {
        let [p50, p99, max] = spread(values);
        let [base50, _, _] = spread(baseline.to_vec());
        println!(
            "| {what} | {} | {} | {} | {:.0}× | {} |",
            millis(p50),
            millis(p99),
            millis(max),
            p50.as_secs_f64() / base50.as_secs_f64().max(1e-9),
            if max <= TARGET { "yes" } else { "no" },
        );
    }
}
