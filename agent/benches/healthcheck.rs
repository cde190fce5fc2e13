//! What a probe through the agent costs, next to the TCP connect it stands for.
//!
//! For 1, 110 (the kubelet's default pod limit) and 500 pods on one node, the benchmark builds real
//! test pods (network namespace + veth, an app listening on the pod IP's port 8080), starts one
//! release-built agent for all of them, and then, in the same run and against the same apps:
//!
//! - **direct**: a TCP connect to `pod_ip:8080`, closed at once. This is what the kubelet's
//!   tcpSocket probe does when no mesh is in the way, so it is the baseline.
//! - **agent**: the kubelet-like `GET /fsm-healthcheck` with `Original-Tcp-Port: 8080` to
//!   `pod_ip:15904`, reading the whole response and requiring a 200. The agent makes the same
//!   connect from inside the pod.
//! - **direct GET**: the kubelet-like `GET /healthz` to an HTTP app on `pod_ip:8081`: an httpGet
//!   probe without a mesh, the baseline for
//! - **agent GET**: the same probe rewritten by the real rewriter (osm style), `GET
//!   /fsm-liveness-probe/web` to `pod_ip:15901`, which the agent (`--serve-http-probes`) answers by
//!   running the original `GET /healthz` from inside the pod.
//!
//! Both get the same number of requests from the same number of client threads, spread round-robin
//! over the pods, after a warm-up that touches every pod. The agent's resident memory is read from
//! /proc when it is idle (all listeners up, no load) and after the load. The result is a markdown
//! table on stdout; progress goes to stderr.
//!
//! Needs root (network namespaces); without it the benchmark says why and exits successfully,
//! unless `CI` is set. Traffic only goes to the 198.18.0.0/15 addresses of the veths it created,
//! and every pod, process and file it made is removed on exit, panics included (the test support
//! guards own them).
//!
//! `PB_BENCH_REQUESTS` overrides the request count per measurement (default 10 000), for a quick run.
//! `PB_BENCH_PODS` (say `1,500`) measures only those node sizes. `PB_BENCH_PERF_DIR` records the
//! agent with `perf record -g -p <agent>` during each of its measured runs, into
//! `agent-<path>-<pods>.data` there: how the README's per-probe CPU at 1 and 500 pods was taken
//! apart.

#![expect(
    clippy::expect_used,
    reason = "a benchmark stops at the first failure, with a message"
)]

use std::{
    io::{self, Write as _},
    net::SocketAddr,
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

use probe_bypass_rewrite::{ProbeKind, Style, rewrite_in_place};
use probe_bypass_testing::{
    agent::{Agent, ManifestDir, Memory},
    bench::{
        Measured, command_line, connect_with_reset, cpu_time, create_pods, delete_pods, machine,
        micros, requests, run_load,
    },
    kubelet,
    pod::{App, TestPod},
};
use serde_json::{Value, json};

/// The pod counts measured: one pod, the kubelet's default `maxPods`, and a dense node.
const SIZES: [usize; 3] = [1, 110, 500];

/// The port every test app listens on and every probe names.
const APP_PORT: u16 = 8080;

/// The port of every pod's HTTP app, which the `web` container's httpGet probe names.
const HTTP_APP_PORT: u16 = 8081;

/// The path the HTTP app answers and the original httpGet probe asks.
const HTTP_PROBE_PATH: &str = "/healthz";

/// Where the rewritten httpGet probe of container `web` goes: the liveness port and path.
const REWRITTEN_PATH: &str = "/fsm-liveness-probe/web";

/// Requests per measurement, unless `PB_BENCH_REQUESTS` says otherwise.
const REQUESTS: usize = 10_000;

/// Concurrent clients: more than the 2 cores of a small node, so the agent always has work queued,
/// as it does when many pods' probes fall due at once. They run at idle priority (see
/// [`yield_to_the_measured`]).
const CLIENTS: usize = 8;

/// Warm-up requests before each measurement; at least two per pod (see [`warm_up_and_measure`]).
const WARM_UP: usize = 1_000;

/// Bounds on one warm-up and one measurement, so a pathologically slow build still finishes. A
/// measurement that hits its bound reports fewer requests than asked for, and says so.
const WARM_UP_LIMIT: Duration = Duration::from_secs(20);
const MEASURE_LIMIT: Duration = Duration::from_secs(60);

/// Bounds on a single connect and on reading a single response: far above any healthy figure, so
/// they only turn a hang into an error.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the agent may take to have a listener in every pod.
const READY_WITHIN: Duration = Duration::from_secs(60);

fn main() {
    if !probe_bypass_testing::privilege::bench_can_run("healthcheck") {
        return;
    }
    let requests = requests(REQUESTS);
    let rows: Vec<Row> = sizes()
        .iter()
        .map(|&pods| measure(pods, requests))
        .collect();
    print_report(requests, &rows);
}

/// One line of the report.
struct Row {
    pods: usize,
    direct: Load,
    agent: Load,
    direct_get: Load,
    agent_get: Load,
    /// The agent's CPU time per probe on each of its paths.
    agent_cpu: Option<Duration>,
    agent_get_cpu: Option<Duration>,
    idle: Memory,
    loaded: Memory,
}

/// Sets up `pods` pods and one agent, measures both paths, and tears everything down again.
fn measure(pods: usize, requests: usize) -> Row {
    eprintln!("== {pods} pod(s)");
    let started = Instant::now();
    let node = Node::new(pods);
    eprintln!(
        "   {pods} pod(s) and the agent ready in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let idle = node.agent.memory();

    let direct_targets: Vec<SocketAddr> = node
        .pods
        .iter()
        .map(|pod| SocketAddr::new(pod.ip.into(), APP_PORT))
        .collect();
    let agent_targets: Vec<Probe> = node.pods.iter().map(Probe::new).collect();
    let direct_get_targets: Vec<Probe> = node.pods.iter().map(Probe::direct_get).collect();
    let agent_get_targets: Vec<Probe> = node.pods.iter().map(Probe::agent_get).collect();
    let direct = warm_up_and_measure("direct", &direct_targets, requests, connect_only);
    let pid = Some(node.agent.pid());
    let (agent, agent_cpu) = measure_with_cpu("agent", &agent_targets, requests, pid, Probe::send);
    let direct_get = warm_up_and_measure("direct GET", &direct_get_targets, requests, Probe::send);
    let (agent_get, agent_get_cpu) =
        measure_with_cpu("agent GET", &agent_get_targets, requests, pid, Probe::send);
    let loaded = node.agent.memory();

    let started = Instant::now();
    node.remove();
    eprintln!("   torn down in {:.1} s", started.elapsed().as_secs_f64());
    Row {
        pods,
        direct,
        agent,
        direct_get,
        agent_get,
        agent_cpu,
        agent_get_cpu,
        idle,
        loaded,
    }
}

/// Everything one size needs. Fields drop in declaration order if a panic unwinds through here:
/// the agent first (it holds the pods' namespaces open), then the manifests, the apps, the pods.
struct Node {
    agent: Agent,
    _dir: ManifestDir,
    _apps: Vec<App>,
    pods: Vec<TestPod>,
}

impl Node {
    fn new(count: usize) -> Self {
        let pods = create_pods(count);
        let acceptors = app_acceptors(count);
        let apps: Vec<App> = pods
            .iter()
            .flat_map(|pod| {
                let ip = pod.ip.into();
                [
                    pod.listen_with_acceptors(SocketAddr::new(ip, APP_PORT), acceptors),
                    pod.serve_http(SocketAddr::new(ip, HTTP_APP_PORT), "ok"),
                ]
            })
            .collect();
        let dir = ManifestDir::new();
        for (i, pod) in pods.iter().enumerate() {
            let name = format!("app-{i}");
            dir.write(&format!("{name}.json"), &rewritten_manifest(pod, &name));
        }
        // At info level the agent logs pods coming and going, nothing per probe.
        let agent = Agent::start_with_log_filter(&dir.path, &["--serve-http-probes"], "info");
        agent.wait_ready(200, READY_WITHIN);
        Self {
            agent,
            _dir: dir,
            _apps: apps,
            pods,
        }
    }

    /// Tears down like a drop would, but deletes the pods in parallel.
    fn remove(self) {
        let Self {
            agent,
            _dir: dir,
            _apps: apps,
            pods,
        } = self;
        drop(agent);
        drop(dir);
        drop(apps);
        delete_pods(pods);
    }
}

/// The pod's manifest as the webhook would have admitted it: container `c0` with a tcpSocket probe
/// of [`APP_PORT`], container `web` with an httpGet probe of [`HTTP_APP_PORT`], both rewritten
/// (osm style) and the originals recorded.
fn rewritten_manifest(pod: &TestPod, name: &str) -> String {
    let mut manifest: Value =
        serde_json::from_str(&pod.manifest(name, &[APP_PORT])).expect("the test manifest");
    let containers = manifest["spec"]["containers"]
        .as_array_mut()
        .expect("containers");
    containers.push(json!({
        "name": "web",
        "image": "web",
        "livenessProbe": {"httpGet": {"port": HTTP_APP_PORT, "path": HTTP_PROBE_PATH}},
    }));
    rewrite_in_place(&mut manifest, Style::Osm).expect("the rewriter reads the test pod");
    let probe = &manifest["spec"]["containers"][1]["livenessProbe"]["httpGet"];
    assert_eq!(
        (&probe["port"], &probe["path"]),
        (&json!(ProbeKind::Liveness.port()), &json!(REWRITTEN_PATH)),
        "the rewritten probe"
    );
    manifest.to_string()
}

/// The baseline: a tcpSocket probe without a mesh, a connect and an immediate close.
fn connect_only(addr: &SocketAddr) -> Result<(), String> {
    connect_with_reset(*addr, CONNECT_TIMEOUT)
        .map(drop)
        .map_err(|error| format!("connect to {addr}: {error}"))
}

/// A kubelet-like HTTP probe: where it goes and the exact bytes the kubelet would send.
struct Probe {
    addr: SocketAddr,
    request: Vec<u8>,
}

impl Probe {
    /// The rewritten tcpSocket probe, to the agent's healthcheck.
    fn new(pod: &TestPod) -> Self {
        let addr = pod.healthcheck();
        let port = APP_PORT.to_string();
        Self {
            addr,
            request: kubelet::request(addr, "/fsm-healthcheck", Some(&port)),
        }
    }

    /// The original httpGet probe, straight to the HTTP app.
    fn direct_get(pod: &TestPod) -> Self {
        let addr = SocketAddr::new(pod.ip.into(), HTTP_APP_PORT);
        Self {
            addr,
            request: kubelet::request(addr, HTTP_PROBE_PATH, None),
        }
    }

    /// The rewritten httpGet probe, to the agent's liveness port.
    fn agent_get(pod: &TestPod) -> Self {
        let addr = SocketAddr::new(pod.ip.into(), ProbeKind::Liveness.port());
        Self {
            addr,
            request: kubelet::request(addr, REWRITTEN_PATH, None),
        }
    }

    /// Sends the request and reads the response as the kubelet does (head, then Content-Length
    /// bytes, then it closes). Anything but a 200 is a failure.
    fn send(&self) -> Result<(), String> {
        let fail = |error: io::Error| format!("probe {}: {error}", self.addr);
        let mut stream = connect_with_reset(self.addr, CONNECT_TIMEOUT).map_err(fail)?;
        stream.set_read_timeout(Some(READ_TIMEOUT)).map_err(fail)?;
        stream.write_all(&self.request).map_err(fail)?;
        let reply = kubelet::read_reply(&mut stream, false);
        if reply.status == 200 {
            Ok(())
        } else {
            Err(format!("probe {}: expected 200, got {reply:?}", self.addr))
        }
    }
}

/// The result of one measurement: the latencies of the requests, all of which succeeded.
type Load = Measured;

/// Requests that succeeded per second.
fn per_second(load: &Load) -> f64 {
    load.latencies.len() as f64 / load.elapsed.as_secs_f64()
}

/// The node sizes to measure: [`SIZES`], or those `PB_BENCH_PODS` lists.
fn sizes() -> Vec<usize> {
    let Ok(list) = std::env::var("PB_BENCH_PODS") else {
        return SIZES.to_vec();
    };
    list.split(',')
        .map(|size| {
            size.trim()
                .parse()
                .ok()
                .filter(|&pods| pods > 0)
                .unwrap_or_else(|| panic!("PB_BENCH_PODS={list}: {size:?} is not a pod count"))
        })
        .collect()
}

/// `perf record` of process `pid`, while it lives, when `PB_BENCH_PERF_DIR` names a directory.
struct Perf(Option<Child>);

impl Perf {
    fn start(pid: u32, path: &str, pods: usize) -> Self {
        let Some(dir) = std::env::var_os("PB_BENCH_PERF_DIR") else {
            return Self(None);
        };
        let output = Path::new(&dir).join(format!("agent-{path}-{pods}.data"));
        let perf = Command::new("perf")
            .args(["record", "--quiet", "-F", "1999", "-g", "-p"])
            .arg(pid.to_string())
            .arg("-o")
            .arg(&output)
            .spawn()
            .expect("PB_BENCH_PERF_DIR is set, and perf (linux-perf) could not start");
        eprintln!("   perf recording the agent into {}", output.display());
        Self(Some(perf))
    }
}

impl Drop for Perf {
    fn drop(&mut self) {
        if let Some(mut perf) = self.0.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(perf.id()).unwrap_or(i32::MAX));
            // perf writes its file out on SIGINT.
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
            let _ = perf.wait();
        }
    }
}

/// Warms the path up, then measures it. The warm-up sends at least two requests to every pod, so
/// first-contact costs (neighbour resolution on a fresh veth, the app's first accept, cold caches)
/// stay out of the figures.
fn warm_up_and_measure<T: Sync>(
    name: &str,
    targets: &[T],
    requests: usize,
    one: impl Fn(&T) -> Result<(), String> + Sync,
) -> Load {
    measure_with_cpu(name, targets, requests, None, one).0
}

/// [`warm_up_and_measure`], and the CPU time process `pid` used per measured request.
fn measure_with_cpu<T: Sync>(
    name: &str,
    targets: &[T],
    requests: usize,
    pid: Option<u32>,
    one: impl Fn(&T) -> Result<(), String> + Sync,
) -> (Load, Option<Duration>) {
    let warm_up = WARM_UP.max(2 * targets.len());
    run(targets, warm_up, WARM_UP_LIMIT, &one);
    let before = pid.map(cpu_time);
    let perf = pid.map(|pid| Perf::start(pid, &name.replace(' ', "-"), targets.len()));
    let load = run(targets, requests, MEASURE_LIMIT, &one);
    drop(perf);
    let cpu = pid.zip(before).map(|(pid, before)| {
        let done = u32::try_from(load.latencies.len().max(1)).unwrap_or(u32::MAX);
        cpu_time(pid).saturating_sub(before) / done
    });
    if load.latencies.len() < requests {
        eprintln!(
            "   {name}: stopped at the {MEASURE_LIMIT:?} bound after {} of {requests} requests",
            load.latencies.len()
        );
    }
    eprintln!(
        "   {name}: {:.0}/s, p50 {}, p99 {}, max {}",
        per_second(&load),
        micros(load.percentile(50)),
        micros(load.percentile(99)),
        micros(load.percentile(100))
    );
    (load, cpu)
}

/// Sends `count` requests from [`CLIENTS`] threads, request `i` to `targets[i % len]`, and stops
/// early at `limit`. Every request must succeed: figures from a path that fails under load would
/// mislead, so a failure ends the benchmark with the first error and the failure count.
fn run<T: Sync>(
    targets: &[T],
    count: usize,
    limit: Duration,
    one: &(impl Fn(&T) -> Result<(), String> + Sync),
) -> Load {
    let load = run_load(
        CLIENTS,
        count,
        limit,
        || yield_to_the_measured().expect("put a client thread in SCHED_IDLE"),
        |(), i| one(&targets[i % targets.len()]),
    );
    if let Some(first) = load.failures.first() {
        panic!(
            "{} of {count} requests failed; the first: {first}",
            load.failures.len()
        );
    }
    assert!(
        !load.latencies.is_empty(),
        "no request completed within {limit:?}"
    );
    load
}

/// Accept threads per app: as many as there are clients when all of them may hit one app, one
/// when the pods share the load.
///
/// A direct connect completes in the kernel, without the app: eight clients connect far faster
/// than one thread accepts, so at 1 pod the app's accept queue fills, the next SYN is dropped and
/// that client waits out the 1 s SYN retransmit, which then dominates the figure. That would be a
/// stall of the test app, not a cost of TCP. Together with the clients' idle priority (see
/// [`yield_to_the_measured`]) this keeps the queue short; each alone did not.
fn app_acceptors(pods: usize) -> usize {
    CLIENTS.div_ceil(pods.max(1))
}

/// Puts the calling client thread in the SCHED_IDLE class, so it runs only when the apps and the
/// agent, which share the 2 cores with it, have nothing to do: the load generator must not hold
/// up what it measures. At normal priority the clients starve the apps' accept threads (see
/// [`app_acceptors`]); in trials nice 10 was not enough, while an idle-class thread gives way as
/// soon as a normal one wakes up. The agent path runs under the same rule, so the comparison
/// stays fair.
fn yield_to_the_measured() -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: `param` is a valid sched_param that outlives the call; pid 0 is the calling thread.
    let result = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if result == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn print_report(requests: usize, rows: &[Row]) {
    println!("{}", command_line("healthcheck"));
    println!("machine: {}", machine());
    println!(
        "load: {requests} requests per path and size after a warm-up, {CLIENTS} client threads, \
         round-robin over the pods, at idle priority; agent built for release, RUST_LOG=info"
    );
    println!();
    println!(
        "| pods | direct connects/s | direct p50 | direct p99 | agent probes/s | agent p50 | agent p99 \
         | agent/direct | agent µs CPU/probe | agent RSS idle (MiB) | agent RSS after load (MiB) \
         | agent peak RSS (MiB) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            row.pods,
            compared(&row.direct, &row.agent),
            cpu_micros(row.agent_cpu),
            mib(row.idle.rss_kib),
            mib(row.loaded.rss_kib),
            mib(row.loaded.peak_kib),
        );
    }
    println!();
    println!(
        "httpGet probes (`--serve-http-probes`): the original `GET {HTTP_PROBE_PATH}` straight to the \
         app, and the rewritten `GET {REWRITTEN_PATH}` on {}, which the agent runs from inside the pod",
        ProbeKind::Liveness.port()
    );
    println!();
    println!(
        "| pods | direct GET/s | direct p50 | direct p99 | agent GET/s | agent p50 | agent p99 \
         | agent/direct | agent µs CPU/probe |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for row in rows {
        println!(
            "| {} | {} | {} |",
            row.pods,
            compared(&row.direct_get, &row.agent_get),
            cpu_micros(row.agent_get_cpu)
        );
    }
}

fn cpu_micros(cpu: Option<Duration>) -> String {
    cpu.map_or_else(
        || "–".to_owned(),
        |cpu| format!("{:.1}", cpu.as_secs_f64() * 1e6),
    )
}

/// The table cells of a baseline and the agent's path: rate, p50 and p99 of each, then the ratio.
fn compared(baseline: &Load, agent: &Load) -> String {
    format!(
        "{:.0} | {} | {} | {:.0} | {} | {} | {:.2}",
        per_second(baseline),
        micros(baseline.percentile(50)),
        micros(baseline.percentile(99)),
        per_second(agent),
        micros(agent.percentile(50)),
        micros(agent.percentile(99)),
        per_second(agent) / per_second(baseline),
    )
}
