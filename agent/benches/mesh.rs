//! Requests per second between two meshed apps, as the anchors measure it (issue 16): `wrk` with
//! 100 kept-alive connections, app to app through both sidecars, against the same sidecars used
//! explicitly (no interception at all) and against the mesh's iptables rules.
//!
//! A node is four test pods (network namespace + veth each): **A** and **B** are meshed, each with
//! HAProxy as its sidecar (UID 1500, inbound 15003, outbound 15001, plain TCP between the proxies);
//! B's app is HAProxy answering every request itself ([`HttpResponder`]), so that the proxies and
//! the interception, not the app, are what is measured. **R** is a pod of a second node (a
//! namespace routed to this node's pods through another namespace, outside the node's cgroup, so
//! that no hook of this node runs at its connect()). Three paths:
//!
//! - **kept-alive, same node**: `wrk -t2 -c100` in A (in A's namespace and the node's cgroup) →
//!   B:8080: A's sidecar, B's sidecar, B's app;
//! - **kept-alive, from another node**: the same `wrk` in R → B:8080, through B's sidecar;
//! - **new connection per request**: this benchmark's own HTTP client (the binary again, with
//!   `PB_BENCH_MESH_ROLE=client`) in A, [`CLIENTS`] threads, each connection one GET and then a
//!   close with a reset (no TIME_WAIT piles up), for N = 10, 100 and 1,000 exclusions per pod.
//!
//! Each way of intercepting, on a node of its own so that no rule, program or conntrack entry of
//! one touches another:
//!
//! - **direct**: no sidecars in the path; the app is called at B:8080;
//! - **explicit proxying**: the same two sidecars with two more frontends each
//!   ([`SidecarConfig::explicit`]): the client calls 127.0.0.1:15080 in A, A's proxy forwards to
//!   B:15081, B's proxy to its app. No interception; the limit any interception can reach without
//!   short-circuiting. From the other node, R calls B:15081;
//! - **iptables**: `tests/fixtures/fsm-init.iptables` in A's and B's namespaces, with N unused
//!   exclusions of each kind where FSM inserts them;
//! - **eBPF, sk_msg off / on**: the agent's datapath driven in-process ([`InProcessDatapath`]),
//!   attached to the node's cgroup (never the root), reinstalled over its pins to switch sk_msg as
//!   a restarted agent with `--sk-msg=false` would be, pods meshed with the same N exclusions;
//! - **eBPF, sk_msg on, built without aya-log**: the same programs compiled without their decision
//!   log (`cargo xtask build-ebpf --no-log`, which `cargo xtask bench mesh` runs and passes as
//!   `PB_BENCH_NO_LOG_OBJECT`): against it, the log compiled in and off must cost nothing. N = 10
//!   only; not measured when run without that object.
//!
//! Every setting is measured once in each of [`ROUNDS`] rounds, each round starting at a different
//! setting, and the report gives the rounds' median and half their range: load from anything else
//! on a small machine then falls on every setting alike. Per path and setting: requests/s, p50,
//! p99 and p99.9 (wrk's own latency histogram, read by a `done` script), and the CPU time per
//! request of both sidecars and of B's app (the scheduler's count of their threads, which includes
//! the kernel's work in their context: loopback and veth delivery, the nat rules, the programs).
//! The measured connections are checked: wrk and the client must report no error, the iptables
//! REDIRECT counters and the datapath's own must count at least the connections made, and sk_msg
//! must move messages exactly when it is on.
//!
//! Then, with `kernel.bpf_stats_enabled` set (it times every program run, so never during the
//! rounds), each path is run once more per sk_msg setting, and the kernel's run time of each of the
//! datapath's programs is reported per request: that is where the datapath's own cost is, and the
//! agent's share of the CPU (its userspace, this process here, does nothing per request; its CPU
//! time over the rounds is reported too).
//!
//! Needs root, `wrk` and `haproxy` (`cargo xtask setup`); without them the benchmark says why and
//! exits successfully, unless `CI` is set. Nothing is attached to the cgroup root. Namespaces,
//! cgroups, processes and pins are removed on exit, on a panic and on Ctrl-C.
//!
//! `PB_BENCH_SECONDS` sets each wrk run's length (default 3), `PB_BENCH_REQUESTS` the new
//! connections per setting over all rounds (default 5,000). `PB_BENCH_SETTINGS` and
//! `PB_BENCH_ROUTES` measure only the settings and paths whose labels contain their text, to
//! profile one (`perf record -a -g` around the run), with no bpf_stats pass. The default run takes about four
//! minutes.
#![expect(
    clippy::expect_used,
    reason = "a benchmark stops at the first failure, with a message"
)]

use std::{
    env, fmt, fs,
    io::{self, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use probe_bypass_testing::{
    bench::{
        bench_may_run, catch_interrupts, client_output, command_line, connect_with_reset,
        count_from_env, cpu_time, haproxy_version, load_average, machine, median, requests,
        run_load, spread, stop_if_interrupted,
    },
    cgroup::TestCgroup,
    in_process::{InProcessDatapath, Redirects, unused_exclusions},
    mesh::load_iptables,
    mesh_rules::{fsm_rules_with_unused, nat_rule_count},
    pod::TestPod,
    sidecar::{
        EXPLICIT_INBOUND_PORT, EXPLICIT_OUTBOUND_PORT, HttpResponder, INBOUND_PORT, OUTBOUND_PORT,
        PROXY_UID, Sidecar, SidecarConfig,
    },
};

/// Set in the environment of the benchmark's own client: `client`.
const ROLE: &str = "PB_BENCH_MESH_ROLE";

/// B's app.
const APP_PORT: u16 = 8080;

/// Every setting is measured once per round; the report gives the median of the rounds.
const ROUNDS: usize = 5;
/// wrk's kept-alive connections and threads.
const CONNECTIONS: usize = 100;
const WRK_THREADS: usize = 2;
/// Seconds per wrk run, unless `PB_BENCH_SECONDS` says otherwise.
const SECONDS: usize = 3;
/// New connections per setting over all rounds, unless `PB_BENCH_REQUESTS` says otherwise.
const REQUESTS: usize = 5_000;
/// The new-connection client's threads, each with one connection at a time.
const CLIENTS: usize = 4;
/// Warm-up connections before each new-connection measurement, not counted.
const WARM_UP: usize = 100;
/// Exclusions per meshed pod, of each kind, for the new-connection path; the kept-alive paths are
/// measured with the first.
const EXCLUSIONS: [usize; 3] = [10, 100, 1_000];

/// Bounds that turn a hang into an error; far above any healthy figure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const MEASURE_LIMIT: Duration = Duration::from_secs(60);

/// wrk's `done` hook: one line with what the report needs, latencies in microseconds from wrk's
/// own histogram.
const WRK_SCRIPT: &str = r#"done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("pb-wrk %d %d %d %d %d %d %d\n", summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(99), latency:percentile(99.9)))
end
"#;

fn main() {
    if env::var(ROLE).as_deref() == Ok("client") {
        return client::main();
    }
    if let Ok(other) = env::var(ROLE) {
        panic!("{ROLE}={other:?}: expected client");
    }
    if !bench_may_run(
        "mesh",
        &["wrk", "haproxy", "iptables-restore", "ss", "bpftool"],
    ) {
        return;
    }
    catch_interrupts();
    let plan = Plan::from_env();
    let outside_load = load_average();
    let started = Instant::now();
    let script = WrkScript::new();
    let mut nodes = Nodes::new();
    let mut samples = Vec::new();
    nodes.run_rounds(&plan, &script, &mut samples);
    let profiles = if plan.partial() {
        Vec::new()
    } else {
        eprintln!("== kernel run time of the datapath's programs (bpf_stats)");
        nodes.ebpf.profile(&plan, &script)
    };
    drop(nodes);
    eprintln!("== done in {:.0} s", started.elapsed().as_secs_f64());
    let report = Report {
        plan: &plan,
        samples: &samples,
        profiles: &profiles,
        outside_load: &outside_load,
    };
    report.print();
}

/// How much to measure, per measurement.
struct Plan {
    seconds: usize,
    new_connections: usize,
    /// `PB_BENCH_SETTINGS` and `PB_BENCH_ROUTES`: measure only the settings and paths whose
    /// labels contain this text (`eBPF, sk_msg on, N = 10`, `new connection`), to profile one of
    /// them. Unset, everything is measured.
    settings: Option<String>,
    routes: Option<String>,
    /// `PB_BENCH_NO_LOG_OBJECT`: the programs built without aya-log, which `cargo xtask bench
    /// mesh` builds and names here; without it that setting is not measured.
    no_log_object: Option<std::path::PathBuf>,
}

impl Plan {
    fn from_env() -> Self {
        Self {
            seconds: count_from_env("PB_BENCH_SECONDS", SECONDS, 1..=600),
            new_connections: requests(REQUESTS).div_ceil(ROUNDS),
            settings: env::var("PB_BENCH_SETTINGS").ok(),
            routes: env::var("PB_BENCH_ROUTES").ok(),
            no_log_object: env::var_os("PB_BENCH_NO_LOG_OBJECT").map(Into::into),
        }
    }

    fn selects(&self, label: &str, filter: &Option<String>) -> bool {
        filter
            .as_ref()
            .is_none_or(|text| label.contains(text.as_str()))
    }

    /// Whether only some settings or paths are measured.
    fn partial(&self) -> bool {
        self.settings.is_some() || self.routes.is_some()
    }
}

/// How B's app is reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Way {
    Direct,
    Explicit,
    Iptables,
    Ebpf {
        sk_msg: bool,
    },
    /// sk_msg on, the programs built without aya-log (`PB_BENCH_NO_LOG_OBJECT`): what the log
    /// costs when it is compiled in and off.
    EbpfWithoutLog,
}

impl Way {
    const ALL: [Self; 6] = [
        Self::Direct,
        Self::Explicit,
        Self::Iptables,
        Self::Ebpf { sk_msg: false },
        Self::Ebpf { sk_msg: true },
        Self::EbpfWithoutLog,
    ];

    fn intercepts(self) -> bool {
        matches!(
            self,
            Self::Iptables | Self::Ebpf { .. } | Self::EbpfWithoutLog
        )
    }

    fn ebpf(self) -> bool {
        matches!(self, Self::Ebpf { .. } | Self::EbpfWithoutLog)
    }

    fn sk_msg(self) -> bool {
        matches!(self, Self::Ebpf { sk_msg: true } | Self::EbpfWithoutLog)
    }
}

impl fmt::Display for Way {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct (no sidecars)",
            Self::Explicit => "explicit proxying",
            Self::Iptables => "iptables",
            Self::Ebpf { sk_msg: false } => "eBPF, sk_msg off",
            Self::Ebpf { sk_msg: true } => "eBPF, sk_msg on",
            Self::EbpfWithoutLog => "eBPF, sk_msg on, built without aya-log",
        })
    }
}

/// A measured path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// wrk in A → B, 100 kept-alive connections.
    KeptAlive,
    /// wrk in R (another node) → B, 100 kept-alive connections.
    CrossNode,
    /// The benchmark's client in A → B, a new connection per request.
    NewConnection,
}

impl Route {
    const ALL: [Self; 3] = [Self::KeptAlive, Self::CrossNode, Self::NewConnection];

    fn label(self) -> &'static str {
        match self {
            Self::KeptAlive => "kept-alive, same node: A → B",
            Self::CrossNode => "kept-alive, from another node: R → B",
            Self::NewConnection => "new connection per request: A → B",
        }
    }

    /// Whether the path passes B's inbound redirect and A's outbound redirect.
    fn redirects(self) -> (bool, bool) {
        match self {
            Self::KeptAlive | Self::NewConnection => (true, true),
            Self::CrossNode => (true, false),
        }
    }
}

/// A way of reaching the app with its exclusions per meshed pod (0 where nothing is meshed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Setting {
    way: Way,
    exclusions: usize,
}

impl Setting {
    /// Every setting: each way with the first N, then the interceptions with the other Ns.
    fn all() -> Vec<Self> {
        let mut all: Vec<Self> = Way::ALL
            .into_iter()
            .map(|way| Self {
                way,
                exclusions: if way.intercepts() { EXCLUSIONS[0] } else { 0 },
            })
            .collect();
        for n in &EXCLUSIONS[1..] {
            let ways = Way::ALL.into_iter().filter(|way| way.intercepts());
            for way in ways.filter(|way| *way != Way::EbpfWithoutLog) {
                all.push(Self {
                    way,
                    exclusions: *n,
                });
            }
        }
        all
    }

    /// The paths measured in this setting: the kept-alive ones with the first N only (exclusions
    /// are looked at once per connection, and these make 100).
    fn routes(self) -> Vec<Route> {
        if self.exclusions <= EXCLUSIONS[0] {
            Route::ALL.to_vec()
        } else {
            vec![Route::NewConnection]
        }
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.way)?;
        if self.way.intercepts() {
            write!(f, ", N = {}", self.exclusions)?;
        }
        Ok(())
    }
}

/// One measurement.
struct Sample {
    setting: Setting,
    route: Route,
    load: Load,
    /// Both sidecars' CPU time per request (none where no sidecar is in the path).
    sidecars_per_request: Option<Duration>,
    /// B's app's CPU time per request.
    app_per_request: Duration,
    /// The agent's userspace CPU time per request: this process's, which holds the datapath as
    /// the agent does (none where there is no datapath).
    agent_per_request: Option<Duration>,
}

/// What one measurement measured.
#[derive(Clone, Copy)]
struct Load {
    requests: u64,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    p999: Duration,
    /// The connections it opened (checked against the redirect counters).
    connections: u64,
    /// Requests made before the measurement, in the same process (the programs ran for them too).
    warm_up: u64,
}

impl Load {
    fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }
}

impl fmt::Display for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.0} req/s, p50 {}, p99 {}, p99.9 {}",
            self.per_second(),
            micros(self.p50),
            micros(self.p99),
            micros(self.p999)
        )
    }
}

fn micros(duration: Duration) -> String {
    format!("{:.0} µs", duration.as_secs_f64() * 1e6)
}

/// wrk's `done` script, written once for the run.
struct WrkScript {
    path: std::path::PathBuf,
}

impl WrkScript {
    fn new() -> Self {
        let path = env::temp_dir().join(format!("pb-bench-mesh-{}.lua", std::process::id()));
        fs::write(&path, WRK_SCRIPT).expect("write wrk's script");
        Self { path }
    }
}

impl Drop for WrkScript {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// One node per interception (direct and explicit proxying share one with no interception), all
/// set up before the first measurement and kept until the last, so that the rounds can alternate.
struct Nodes {
    plain: Node,
    iptables: Node,
    ebpf: Node,
}

impl Nodes {
    fn new() -> Self {
        let started = Instant::now();
        let nodes = Self {
            plain: Node::new(Kind::Plain),
            iptables: Node::new(Kind::Intercepted),
            ebpf: Node::new(Kind::Intercepted),
        };
        eprintln!(
            "== 3 nodes of 4 pods, apps and proxies ready in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        nodes
    }

    fn node(&mut self, way: Way) -> &mut Node {
        match way {
            Way::Direct | Way::Explicit => &mut self.plain,
            Way::Iptables => &mut self.iptables,
            Way::Ebpf { .. } | Way::EbpfWithoutLog => &mut self.ebpf,
        }
    }

    /// Measures every setting's paths once per round, starting each round at a different setting.
    fn run_rounds(&mut self, plan: &Plan, script: &WrkScript, samples: &mut Vec<Sample>) {
        let settings: Vec<Setting> = Setting::all()
            .into_iter()
            .filter(|setting| plan.selects(&setting.to_string(), &plan.settings))
            .filter(|setting| setting.way != Way::EbpfWithoutLog || plan.no_log_object.is_some())
            .collect();
        for round in 0..ROUNDS {
            eprintln!("== round {} of {ROUNDS}", round + 1);
            let start = round * settings.len() / ROUNDS;
            for i in 0..settings.len() {
                let setting = settings[(start + i) % settings.len()];
                let node = self.node(setting.way);
                node.apply(setting, plan);
                let routes = setting.routes().into_iter();
                for route in routes.filter(|route| plan.selects(route.label(), &plan.routes)) {
                    samples.push(node.measure(plan, script, setting, route));
                }
            }
        }
    }
}

/// Whether a node's sidecars are used explicitly (no interception) or intercepted.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Plain,
    Intercepted,
}

/// The pods, the app, the proxies, the cgroup and the datapath of one way of intercepting. Fields
/// drop in declaration order if a panic unwinds through here: the datapath's pins first, then the
/// processes, the cgroup that holds them, and the namespaces last.
struct Node {
    ebpf: Option<InProcessDatapath>,
    sidecars: Vec<Sidecar>,
    app: HttpResponder,
    cgroup: TestCgroup,
    a: TestPod,
    b: TestPod,
    /// The second node's client pod, then the namespace standing for that node.
    r: TestPod,
    _node2: TestPod,
    current: Option<Setting>,
}

/// Who runs a client.
#[derive(Clone, Copy)]
enum Caller<'a> {
    /// A pod of this node, in the node's cgroup.
    Pod(&'a TestPod),
    /// A pod on the second node, outside the cgroup.
    Remote(&'a TestPod),
}

impl Node {
    fn new(kind: Kind) -> Self {
        let [a, b] = [(); 2].map(|()| TestPod::routed());
        let node2 = TestPod::new();
        let r = TestPod::behind(&node2);
        let cgroup = TestCgroup::new();
        // The sidecars close with a reset, as the new-connection client does, so that they leave
        // no TIME_WAIT behind.
        let config = |peer: &TestPod| match kind {
            Kind::Plain => SidecarConfig::plain()
                .nolinger()
                .explicit(peer.ip, APP_PORT),
            Kind::Intercepted => SidecarConfig::plain().nolinger(),
        };
        let sidecars = vec![
            Sidecar::start_with(&cgroup, &a, &config(&b)),
            Sidecar::start_with(&cgroup, &b, &config(&a)),
        ];
        let app = HttpResponder::start(&cgroup, &b, APP_PORT);
        Self {
            ebpf: None,
            sidecars,
            app,
            cgroup,
            a,
            b,
            r,
            _node2: node2,
            current: None,
        }
    }

    /// Sets the interception up for `setting`, changing only what differs from the current one.
    fn apply(&mut self, setting: Setting, plan: &Plan) {
        let current = self.current.replace(setting);
        match setting.way {
            Way::Direct | Way::Explicit => {}
            Way::Iptables => {
                if current != Some(setting) {
                    let (rules, count) = fsm_rules_with_unused(setting.exclusions);
                    for pod in [&self.a, &self.b] {
                        load_iptables(pod, &rules);
                        assert_eq!(
                            nat_rule_count(pod),
                            count,
                            "nat rules in {}",
                            pod.netns_name
                        );
                    }
                }
            }
            Way::Ebpf { .. } | Way::EbpfWithoutLog => {
                let ebpf = match &mut self.ebpf {
                    Some(ebpf) => ebpf,
                    None => self.ebpf.insert(InProcessDatapath::new(&self.cgroup)),
                };
                if current.is_none_or(|c| c.way != setting.way) {
                    let object = match setting.way {
                        Way::EbpfWithoutLog => plan.no_log_object.as_deref(),
                        _ => None,
                    };
                    ebpf.install_object(setting.way.sk_msg(), object);
                }
                if current.is_none_or(|c| c.exclusions != setting.exclusions) {
                    for pod in [&self.a, &self.b] {
                        ebpf.mesh(pod, unused_exclusions(setting.exclusions));
                    }
                }
            }
        }
    }

    /// Where the caller of `route` sends its requests in `way`.
    fn target(&self, way: Way, route: Route) -> (Caller<'_>, SocketAddr) {
        let caller = match route {
            Route::KeptAlive | Route::NewConnection => Caller::Pod(&self.a),
            Route::CrossNode => Caller::Remote(&self.r),
        };
        let to = match (way, route) {
            (Way::Explicit, Route::CrossNode) => {
                SocketAddr::new(self.b.ip.into(), EXPLICIT_INBOUND_PORT)
            }
            (Way::Explicit, _) => {
                SocketAddr::new(Ipv4Addr::LOCALHOST.into(), EXPLICIT_OUTBOUND_PORT)
            }
            _ => SocketAddr::new(self.b.ip.into(), APP_PORT),
        };
        (caller, to)
    }

    /// Measures `route` once, and checks that the interception really sent it through the
    /// proxies.
    fn measure(&self, plan: &Plan, script: &WrkScript, setting: Setting, route: Route) -> Sample {
        stop_if_interrupted();
        let (caller, to) = self.target(setting.way, route);
        let before = self.redirects(setting.way);
        let sidecars_before = self.sidecars_cpu();
        let app_before = cpu_time(self.app.pid());
        let agent_before = cpu_time(std::process::id());
        let load = match route {
            Route::KeptAlive | Route::CrossNode => self.run_wrk(caller, to, plan.seconds, script),
            Route::NewConnection => self.run_client(caller, to, plan.new_connections),
        };
        let sidecars = self.sidecars_cpu().saturating_sub(sidecars_before);
        let app = cpu_time(self.app.pid()).saturating_sub(app_before);
        let agent = cpu_time(std::process::id()).saturating_sub(agent_before);
        let after = self.redirects(setting.way);
        stop_if_interrupted();
        let label = format!("{} / {setting}", route.label());
        let checked = match (before, after) {
            (Some(before), Some(after)) => {
                let delta = after.since(&before);
                delta.check(
                    route.redirects(),
                    setting.way.sk_msg(),
                    load.connections,
                    &label,
                );
                format!("; {delta}")
            }
            _ => String::new(),
        };
        eprintln!("   {label}: {load}{checked}");
        let per_request =
            |cpu: Duration| cpu / u32::try_from(load.requests.max(1)).unwrap_or(u32::MAX);
        Sample {
            setting,
            route,
            load,
            // Direct calls pass no sidecar.
            sidecars_per_request: (setting.way != Way::Direct).then(|| per_request(sidecars)),
            app_per_request: per_request(app),
            agent_per_request: setting.way.ebpf().then(|| per_request(agent)),
        }
    }

    fn sidecars_cpu(&self) -> Duration {
        self.sidecars
            .iter()
            .map(|sidecar| cpu_time(sidecar.pid()))
            .sum()
    }

    /// Runs `wrk` with [`CONNECTIONS`] kept-alive connections for `seconds` from `caller`.
    fn run_wrk(
        &self,
        caller: Caller<'_>,
        to: SocketAddr,
        seconds: usize,
        script: &WrkScript,
    ) -> Load {
        let url = format!("http://{to}/");
        let script = script.path.display().to_string();
        let args: Vec<String> = [
            "wrk",
            "-t",
            &WRK_THREADS.to_string(),
            "-c",
            &CONNECTIONS.to_string(),
            "-d",
            &format!("{seconds}s"),
            "--timeout",
            "5s",
            "-s",
            &script,
            &url,
        ]
        .map(str::to_owned)
        .to_vec();
        let output = self.command(caller, &args).output().expect("run wrk");
        stop_if_interrupted();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "wrk to {url} failed ({}): {stdout}{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        let line = stdout
            .lines()
            .find_map(|line| line.strip_prefix("pb-wrk "))
            .unwrap_or_else(|| panic!("wrk to {url} printed no result: {stdout}"));
        let numbers: Vec<u64> = line
            .split_whitespace()
            .map(|n| n.parse().expect("wrk's script prints numbers"))
            .collect();
        let &[requests, duration_us, errors, non_2xx, p50, p99, p999] = numbers.as_slice() else {
            panic!("wrk to {url}: unexpected result {line:?}");
        };
        assert!(
            errors == 0 && non_2xx == 0 && requests > 0,
            "wrk to {url}: {errors} socket errors and {non_2xx} answers not 2xx in {requests} \
             requests:\n{stdout}"
        );
        Load {
            requests,
            elapsed: Duration::from_micros(duration_us),
            p50: Duration::from_micros(p50),
            p99: Duration::from_micros(p99),
            p999: Duration::from_micros(p999),
            connections: CONNECTIONS as u64,
            warm_up: 0,
        }
    }

    /// Runs this benchmark's client: `count` requests, each on a new connection.
    fn run_client(&self, caller: Caller<'_>, to: SocketAddr, count: usize) -> Load {
        let exe = env::current_exe().expect("the benchmark's own path");
        let args: Vec<String> = vec![
            exe.to_str().expect("a UTF-8 path").to_owned(),
            to.to_string(),
            count.to_string(),
        ];
        let stdout = client_output(self.command(caller, &args), ROLE, to);
        client::decode(&stdout)
            .unwrap_or_else(|| panic!("client to {to}: unexpected output {stdout:?}"))
    }

    /// `args` run in the caller's pod, and in the node's cgroup unless the caller is on the other
    /// node (no hook of this node may run for it).
    fn command(&self, caller: Caller<'_>, args: &[String]) -> Command {
        let pod = match caller {
            Caller::Pod(pod) | Caller::Remote(pod) => pod,
        };
        let mut full: Vec<&str> = vec!["netns", "exec", &pod.netns_name];
        full.extend(args.iter().map(String::as_str));
        let mut command = match caller {
            Caller::Pod(_) => self.cgroup.command("ip", &full),
            Caller::Remote(_) => {
                let mut command = Command::new("ip");
                command.args(&full);
                command
            }
        };
        command.stdin(Stdio::null());
        command
    }

    /// The interception's redirect counters, if it has any.
    fn redirects(&self, way: Way) -> Option<Redirects> {
        match way {
            Way::Direct | Way::Explicit => None,
            Way::Iptables => Some(Redirects::of_iptables(&self.b, &self.a)),
            Way::Ebpf { .. } | Way::EbpfWithoutLog => Some(Redirects::of_datapath(
                self.ebpf.as_ref().expect("installed"),
            )),
        }
    }

    /// With bpf_stats on, each path once per sk_msg setting (N = the first): the kernel's run time
    /// of each program per request.
    fn profile(&mut self, plan: &Plan, script: &WrkScript) -> Vec<Profile> {
        let _stats = BpfStats::enable();
        let mut profiles = Vec::new();
        for sk_msg in [false, true] {
            let setting = Setting {
                way: Way::Ebpf { sk_msg },
                exclusions: EXCLUSIONS[0],
            };
            self.apply(setting, plan);
            for route in Route::ALL {
                let pins = self.ebpf.as_ref().expect("installed").pin_path().to_owned();
                let before = program_stats(&pins);
                let sample = self.measure(plan, script, setting, route);
                let after = program_stats(&pins);
                let requests = (sample.load.requests + sample.load.warm_up).max(1) as f64;
                // By program ID: a name can be loaded more than once.
                let mut programs: Vec<(String, f64, f64)> = Vec::new();
                for (id, name, time, runs) in after {
                    let (time0, runs0) = before
                        .iter()
                        .find(|(other, ..)| *other == id)
                        .map_or((0, 0), |(_, _, time, runs)| (*time, *runs));
                    let runs = runs.saturating_sub(runs0) as f64 / requests;
                    let time = time.saturating_sub(time0) as f64 / requests;
                    match programs.iter_mut().find(|(other, ..)| *other == name) {
                        Some(entry) => {
                            entry.1 += runs;
                            entry.2 += time;
                        }
                        None => programs.push((name, runs, time)),
                    }
                }
                programs.retain(|(_, runs, _)| *runs > 0.0);
                profiles.push(Profile {
                    sk_msg,
                    route,
                    programs,
                });
            }
        }
        profiles
    }
}

/// `kernel.bpf_stats_enabled` on for the guard's life, then back to what it was.
struct BpfStats {
    was: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Self {
        let was = fs::read_to_string(BPF_STATS).unwrap_or_else(|_| "0".to_owned());
        fs::write(BPF_STATS, "1").unwrap_or_else(|error| panic!("write {BPF_STATS}: {error}"));
        Self { was }
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = fs::write(BPF_STATS, self.was.trim());
    }
}

/// Each of the datapath's programs (those that use a map pinned under `pins`): its ID, name, total
/// run time in nanoseconds and run count, as bpftool reports them.
fn program_stats(pins: &Path) -> Vec<(u64, String, u64, u64)> {
    let mut maps = Vec::new();
    let mut dirs = vec![pins.to_owned()];
    while let Some(dir) = dirs.pop() {
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Some(id) =
                bpftool(&["map", "show", "pinned", &path.display().to_string()])
                    .and_then(|map| map["id"].as_u64())
            {
                maps.push(id);
            }
        }
    }
    let programs = bpftool(&["prog", "show"]).expect("bpftool prog show");
    programs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|prog| {
            prog["map_ids"].as_array().is_some_and(|ids| {
                ids.iter()
                    .any(|id| id.as_u64().is_some_and(|id| maps.contains(&id)))
            })
        })
        .map(|prog| {
            let id = prog["id"].as_u64().unwrap_or(0);
            let name = prog["name"].as_str().unwrap_or("?").to_owned();
            let time = prog["run_time_ns"].as_u64().unwrap_or(0);
            let runs = prog["run_cnt"].as_u64().unwrap_or(0);
            (id, name, time, runs)
        })
        .collect()
}

/// `bpftool --json <args>`, parsed; `None` if it fails (a pin that is a link, not a map).
fn bpftool(args: &[&str]) -> Option<serde_json::Value> {
    let output = Command::new("bpftool")
        .arg("--json")
        .args(args)
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| serde_json::from_slice(&output.stdout).ok())?
}

/// The programs' run time per request on one path with one sk_msg setting.
struct Profile {
    sk_msg: bool,
    route: Route,
    /// Program name, runs per request, nanoseconds per request.
    programs: Vec<(String, f64, f64)>,
}

/// The client role: `<addr> <count>`. Warms up with [`WARM_UP`] requests, then makes `count`, each
/// a new connection with one `GET /` whose answer it reads whole before closing with a reset, and
/// prints one line: `ok <requests> <elapsed> <p50> <p99> <p99.9>`, durations in nanoseconds. On any
/// failed request it prints the first error and exits with 1.
mod client {
    use super::*;

    const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: b\r\nUser-Agent: probe-bypass-bench\r\n\r\n";

    pub fn main() {
        let args: Vec<String> = env::args().skip(1).collect();
        let [addr, count] = args.as_slice() else {
            panic!("client arguments: <addr> <count>, got {args:?}");
        };
        let addr: SocketAddr = addr.parse().expect("an address");
        let count: usize = count.parse().expect("a count");
        match run(addr, WARM_UP).and_then(|_| run(addr, count)) {
            Ok(line) => println!("{line}"),
            Err(error) => {
                println!("{error}");
                std::process::exit(1);
            }
        }
    }

    fn run(addr: SocketAddr, count: usize) -> Result<String, String> {
        let measured = run_load(
            CLIENTS,
            count,
            MEASURE_LIMIT,
            || vec![0u8; 4096],
            |buf, _| one(addr, buf).map_err(|error| format!("{addr}: {error}")),
        );
        if let Some(first) = measured.failures.first() {
            return Err(format!(
                "{} of {count} requests failed; the first: {first}",
                measured.failures.len()
            ));
        }
        if measured.latencies.len() < count {
            return Err(format!(
                "{} of {count} requests within {MEASURE_LIMIT:?}",
                measured.latencies.len()
            ));
        }
        Ok(format!(
            "ok {} {} {} {} {}",
            measured.latencies.len(),
            measured.elapsed.as_nanos(),
            measured.percentile(50).as_nanos(),
            measured.percentile(99).as_nanos(),
            measured.per_mille(999).as_nanos()
        ))
    }

    /// One request on a new connection, read until the whole answer (`ok` after the headers) is
    /// in.
    fn one(addr: SocketAddr, buf: &mut [u8]) -> io::Result<()> {
        let mut stream = connect_with_reset(addr, CONNECT_TIMEOUT)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        stream.write_all(REQUEST)?;
        let mut len = 0;
        let tail = format!("\r\n\r\n{}", HttpResponder::BODY);
        while !buf[..len].ends_with(tail.as_bytes()) {
            if len == buf.len() {
                return Err(io::Error::other("an answer longer than 4 KiB"));
            }
            match stream.read(&mut buf[len..])? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("closed after {len} bytes of the answer"),
                    ));
                }
                n => len += n,
            }
        }
        if !buf.starts_with(b"HTTP/1.1 200 ") {
            return Err(io::Error::other(format!(
                "answered {:?}",
                String::from_utf8_lossy(&buf[..len.min(40)])
            )));
        }
        Ok(())
    }

    /// The [`Load`] of the client's line.
    pub fn decode(text: &str) -> Option<Load> {
        let line = text.lines().find_map(|line| line.strip_prefix("ok "))?;
        let numbers: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let &[requests, elapsed, p50, p99, p999] = numbers.as_slice() else {
            return None;
        };
        Some(Load {
            requests,
            elapsed: Duration::from_nanos(elapsed),
            p50: Duration::from_nanos(p50),
            p99: Duration::from_nanos(p99),
            p999: Duration::from_nanos(p999),
            connections: requests,
            warm_up: WARM_UP as u64,
        })
    }
}

/// Everything the run measured, printed as markdown on stdout.
struct Report<'a> {
    plan: &'a Plan,
    samples: &'a [Sample],
    profiles: &'a [Profile],
    outside_load: &'a str,
}

/// The rounds' samples of one path in one setting.
struct Row<'a> {
    setting: Setting,
    samples: Vec<&'a Sample>,
}

impl Row<'_> {
    fn median(&self, of: impl Fn(&Sample) -> f64) -> f64 {
        median(self.samples.iter().map(|sample| of(sample)).collect())
    }

    fn rate(&self) -> f64 {
        self.median(|sample| sample.load.per_second())
    }

    fn latency(&self, of: impl Fn(&Load) -> Duration) -> Duration {
        Duration::from_secs_f64(self.median(|sample| of(&sample.load).as_secs_f64()))
    }

    fn spread(&self) -> String {
        let rates: Vec<f64> = self.samples.iter().map(|s| s.load.per_second()).collect();
        spread(&rates)
    }

    fn cpu(&self, of: impl Fn(&Sample) -> Option<Duration>) -> String {
        if self.samples.iter().any(|sample| of(sample).is_none()) {
            return "–".to_owned();
        }
        let us = self.median(|sample| of(sample).unwrap_or_default().as_secs_f64() * 1e6);
        if us < 1.0 {
            format!("{us:.3}")
        } else {
            format!("{us:.1}")
        }
    }
}

impl Report<'_> {
    fn row(&self, route: Route, setting: Setting) -> Option<Row<'_>> {
        let samples: Vec<&Sample> = self
            .samples
            .iter()
            .filter(|sample| sample.route == route && sample.setting == setting)
            .collect();
        (!samples.is_empty()).then_some(Row { setting, samples })
    }

    fn rows(&self, route: Route) -> Vec<Row<'_>> {
        let mut order = Setting::all();
        order.sort_by_key(|setting| {
            (
                setting.way.intercepts() as usize * setting.exclusions,
                Way::ALL.iter().position(|w| *w == setting.way),
            )
        });
        order
            .into_iter()
            .filter_map(|setting| self.row(route, setting))
            .collect()
    }

    fn rate(&self, route: Route, way: Way, exclusions: usize) -> Option<f64> {
        let exclusions = if way.intercepts() { exclusions } else { 0 };
        self.row(route, Setting { way, exclusions })
            .map(|row| row.rate())
    }

    fn p99(&self, route: Route, way: Way, exclusions: usize) -> Option<Duration> {
        let exclusions = if way.intercepts() { exclusions } else { 0 };
        self.row(route, Setting { way, exclusions })
            .map(|row| row.latency(|load| load.p99))
    }

    fn print(&self) {
        println!("{}", command_line("mesh"));
        println!(
            "machine: {}; load average before the run {}",
            machine(),
            self.outside_load
        );
        println!(
            "load: {ROUNDS} interleaved rounds; kept-alive: `wrk -t{WRK_THREADS} -c{CONNECTIONS} \
             -d{}s` per round; new connection per request: {} GETs per round from {CLIENTS} \
             threads, each connection closed with a reset after its answer. Figures are the \
             rounds' medians, ± half the range of their rates",
            self.plan.seconds, self.plan.new_connections
        );
        println!(
            "pods: A and B meshed, each with HAProxy {} as its sidecar (UID {PROXY_UID}, inbound \
             {INBOUND_PORT}, outbound {OUTBOUND_PORT}, plain TCP between them); B's app is HAProxy \
             answering every request itself; R on a second node. Exclusions N per meshed pod: N \
             inbound ports + N outbound ports + N outbound CIDRs, none matching",
            haproxy_version()
        );
        println!(
            "CPU per request: both sidecars' threads, B's app's, and the agent's userspace (this \
             process, which holds the datapath as the agent does), as the scheduler counts them \
             (kernel work in their context included)"
        );
        for route in Route::ALL {
            println!();
            println!("{}:", route.label());
            println!();
            println!(
                "| interception | N | requests/s | ± | p50 | p99 | p99.9 | sidecars µs CPU/req | app µs CPU/req | agent µs CPU/req | / iptables | / explicit |"
            );
            println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
            for row in self.rows(route) {
                let rate = row.rate();
                let against = |way: Way| {
                    self.rate(route, way, row.setting.exclusions)
                        .map_or_else(String::new, |base| format!("{:.2}", rate / base))
                };
                let n = if row.setting.way.intercepts() {
                    row.setting.exclusions.to_string()
                } else {
                    "–".to_owned()
                };
                println!(
                    "| {} | {n} | {rate:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                    row.setting.way,
                    row.spread(),
                    micros(row.latency(|load| load.p50)),
                    micros(row.latency(|load| load.p99)),
                    micros(row.latency(|load| load.p999)),
                    row.cpu(|sample| sample.sidecars_per_request),
                    row.cpu(|sample| Some(sample.app_per_request)),
                    row.cpu(|sample| sample.agent_per_request),
                    against(Way::Iptables),
                    against(Way::Explicit),
                );
            }
        }
        self.print_goals();
        self.print_profiles();
    }

    fn print_goals(&self) {
        let on = Way::Ebpf { sk_msg: true };
        let off = Way::Ebpf { sk_msg: false };
        let n = EXCLUSIONS[0];
        let ratio = |route, way, base| Some(self.rate(route, way, n)? / self.rate(route, base, n)?);
        let p99_ratio = |route, way, n| {
            Some(
                self.p99(route, way, n)?.as_secs_f64()
                    / self.p99(route, Way::Iptables, n)?.as_secs_f64(),
            )
        };
        println!();
        println!("Goals (issue 16), from this run:");
        println!();
        println!("| figure | goal | measured | met |");
        println!("|---|---|---:|---|");
        let goal = |figure: &str, goal: &str, value: Option<f64>, met: fn(f64) -> bool| {
            let (text, verdict) = value.map_or(("–".to_owned(), "not measured"), |v| {
                (format!("{v:.2}×"), if met(v) { "yes" } else { "no" })
            });
            println!("| {figure} | {goal} | {text} | {verdict} |");
        };
        goal(
            "eBPF (sk_msg on) / iptables, kept-alive, same node",
            "≥ 1.7×",
            ratio(Route::KeptAlive, on, Way::Iptables),
            |v| v >= 1.7,
        );
        goal(
            "eBPF (sk_msg on) / explicit proxying, same",
            "≥ 1.5×",
            ratio(Route::KeptAlive, on, Way::Explicit),
            |v| v >= 1.5,
        );
        goal(
            "eBPF (sk_msg off) / explicit proxying, same",
            "≥ 0.98×",
            ratio(Route::KeptAlive, off, Way::Explicit),
            |v| v >= 0.98,
        );
        for way in [off, on] {
            goal(
                &format!("{way} p99 / iptables p99, kept-alive"),
                "≤ 1.0×",
                p99_ratio(Route::KeptAlive, way, n),
                |v| v <= 1.0,
            );
        }
        for n in EXCLUSIONS {
            let rate = self
                .rate(Route::NewConnection, on, n)
                .zip(self.rate(Route::NewConnection, Way::Iptables, n))
                .map(|(on, ipt)| on / ipt);
            goal(
                &format!("eBPF (sk_msg on) / iptables, new connection per request, N = {n}"),
                "≥ 1.1×",
                rate,
                |v| v >= 1.1,
            );
            goal(
                &format!("eBPF (sk_msg on) p99 / iptables p99, new connection, N = {n}"),
                "≤ 1.0×",
                p99_ratio(Route::NewConnection, on, n),
                |v| v <= 1.0,
            );
        }
        for route in Route::ALL {
            goal(
                &format!(
                    "aya-log compiled in and off / built without it (sk_msg on), {}",
                    route.label()
                ),
                "≥ 0.99×",
                ratio(route, on, Way::EbpfWithoutLog),
                |v| v >= 0.99,
            );
        }
    }

    fn print_profiles(&self) {
        println!();
        println!(
            "The datapath's programs, kernel run time per request (`kernel.bpf_stats_enabled`, one \
             more run per path after the rounds, N = {}):",
            EXCLUSIONS[0],
        );
        println!();
        println!("| path | sk_msg | program | runs/req | ns/req |");
        println!("|---|---|---|---:|---:|");
        for profile in self.profiles {
            let total: f64 = profile.programs.iter().map(|(_, _, ns)| ns).sum();
            for (name, runs, ns) in &profile.programs {
                println!(
                    "| {} | {} | {name} | {runs:.2} | {ns:.0} |",
                    profile.route.label(),
                    if profile.sk_msg { "on" } else { "off" },
                );
            }
            println!(
                "| {} | {} | **all** | | **{total:.0}** |",
                profile.route.label(),
                if profile.sk_msg { "on" } else { "off" },
            );
        }
    }
}
