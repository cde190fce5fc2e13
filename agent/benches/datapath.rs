//! What the eBPF datapath costs a meshed pod's connections, next to the mesh's own iptables rules
//! and to no mesh at all (issue 3).
//!
//! A node is three test pods (network namespace + veth each): **C** and **S** are meshed (each
//! with an HAProxy sidecar as the mesh's proxy, UID 1500, inbound port 15003, outbound port 15001),
//! **D** never is. S and D run an app that, for every connection, writes one byte (port 8080) or
//! 1 MiB (port 8081) and then waits for the client to close. Clients connect, read, and close with
//! a reset (SO_LINGER 0), so no TIME_WAIT or conntrack entry piles up over a run. Three paths:
//!
//! - **inbound**: a client in the host network namespace connects to `S:8080`; the mesh sends it
//!   to S's proxy (15003), which connects to the app on 127.0.0.1:8080.
//! - **outbound**: a client in C connects to `D:8080`; the mesh sends it to C's proxy (15001),
//!   which connects, as UID 1500, to D.
//! - **pod to pod**: a client in C connects to `S:8080` (or `S:8081` for the transfer): C's proxy,
//!   then S's proxy, then the app, all on this node.
//! - **cross-node inbound** (issue 5): a client in pod R of a second node (a namespace routed to
//!   the node's pods through veths, outside the cgroup, so no hook of this node runs at its
//!   connect()) connects to `S:8080`; the mesh's PREROUTING rule, or the datapath's sk_lookup
//!   program in S's namespace, sends it to S's proxy.
//!
//! Each path is measured under four interceptions, each on a node of its own, so that no rule,
//! program or conntrack state of one touches another: **direct** (nothing meshed: no rules, no
//! programs, no proxies in the path; the baseline), **iptables**
//! (`tests/fixtures/fsm-init.iptables` loaded into C's and S's namespaces), and the **eBPF**
//! datapath with sk_msg off and on. The mesh's rules and the datapath are measured with N = 10, 100
//! and 1,000 exclusions per meshed pod: N inbound ports, N outbound ports and N outbound CIDRs,
//! none of which matches the traffic. For iptables they are inserted where the fixture's header
//! says FSM inserts them (inbound ports at the head of the inbound chain, CIDRs then ports before
//! the outbound catch-all; ports 15 to a `multiport` rule, its limit); for eBPF they are the pods'
//! [`Exclusions`] in [`PodRules`].
//!
//! All three nodes are built first, and then every configuration is measured once in each of
//! [`ROUNDS`] rounds, each round starting at a different configuration. The report gives the
//! median of the rounds and the spread of their rates: on a small shared machine, load from
//! anything else then falls on every configuration alike instead of on whichever ran at the time.
//!
//! Figures: connects per second and p50/p99 of connect + first byte, and for 1 MiB transfers pod
//! to pod (where sk_msg should matter: it moves data, not handshakes) transfers and MiB per second.
//! Ratios are against the direct row of the same path and, for eBPF, against iptables with the
//! same N. A markdown report goes to stdout, progress to stderr.
//!
//! Choices:
//!
//! - **The proxies speak plain TCP** to each other. The mesh's proxies use mTLS (the sidecar of
//!   `tests/support/sidecar.rs`), whose handshakes cost far more than any redirect and would bury
//!   the difference being measured; and a client in the host namespace would have to speak mTLS to
//!   reach S at all. The sidecars here are that sidecar configured without TLS and without
//!   logging, closing with a reset ([`SidecarConfig::plain`], `nolinger`). To show what mTLS
//!   adds, the pod-to-pod connects are measured once more per interception with that mTLS sidecar
//!   swapped in (N = 10, at most [`MTLS_REQUESTS`], since it leaves TIME_WAIT behind).
//! - **The datapath is driven in-process** through [`Datapath`], as `tests/datapath.rs` does:
//!   installed under the eBPF node's cgroup with a pin directory of this run's own under
//!   /sys/fs/bpf, reinstalled over its pins to switch sk_msg (as a restarted agent with
//!   `--sk-msg=false` would be), pods upserted with their exclusions. It needs no manifests and no
//!   agent restart between settings, and its counters show that every measured connection really
//!   was redirected, and that sk_msg moved messages exactly when on. iptables' REDIRECT counters
//!   are checked the same way.
//! - **Clients and apps are this benchmark's own binary**, started again with
//!   `PB_BENCH_DATAPATH_ROLE=client|app` inside the node's cgroup (the programs see only its
//!   processes) and, for pods, inside the pod's namespace. The apps must be in the cgroup too: only
//!   sockets made there reach sockops, and so the sockhash that sk_msg works on. Unlike the
//!   healthcheck benchmark's, the clients run at normal priority: each has one connection at a
//!   time, so no accept queue can overflow, and at idle priority any other process on the machine
//!   would stall them.
//!
//! Needs root; without it the benchmark says why and exits successfully, unless `CI` is set.
//! Nothing is attached to the cgroup root. Namespaces, cgroups, every process and the pins are
//! removed on exit, on a panic and on Ctrl-C (SIGINT/SIGTERM end the run at the next step, through
//! the same guards); the pins with [`datapath::uninstall`], after which nothing may be attached to
//! the cgroup.
//!
//! `PB_BENCH_REQUESTS` sets the connections per path and configuration, over all rounds (default
//! 5,000; 1 MiB transfers are an eighth of it, mTLS connects at most 3,000). The default run takes
//! about a minute.

#![expect(
    clippy::expect_used,
    reason = "a benchmark stops at the first failure, with a message"
)]

use std::{
    env, fmt,
    io::{self, BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Child, ChildStdout, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use probe_bypass_testing::{
    bench::{
        bench_may_run, catch_interrupts, client_output, command_line, connect_with_reset,
        haproxy_version, load_average, machine, median, micros, requests, run_load, spread,
        stop_if_interrupted,
    },
    cgroup::TestCgroup,
    in_process::{InProcessDatapath, Redirects, unused_exclusions},
    mesh::load_iptables,
    mesh_rules::{fsm_rules_with_unused, nat_rule_count},
    pod::{App, TestPod, listener},
    sidecar::{Certificates, INBOUND_PORT, OUTBOUND_PORT, PROXY_UID, Sidecar, SidecarConfig},
};

/// Set in the environment of the benchmark's own children: `client` or `app`.
const ROLE: &str = "PB_BENCH_DATAPATH_ROLE";

/// Exclusions per meshed pod, of each kind (inbound ports, outbound ports, outbound CIDRs).
const EXCLUSIONS: [usize; 3] = [10, 100, 1_000];

/// The app's ports: one byte per connection, or 1 MiB.
const BYTE_PORT: u16 = 8080;
const MIB_PORT: u16 = 8081;
const MIB: usize = 1 << 20;

/// Connections per path and configuration, over all rounds, unless `PB_BENCH_REQUESTS` says
/// otherwise.
const REQUESTS: usize = 5_000;
/// Every configuration is measured once per round, and the report gives the median of the rounds.
const ROUNDS: usize = 5;
/// Transfers are this many times fewer than connections.
const TRANSFER_DIVISOR: usize = 8;
/// Cap on the mTLS measurement: each connection leaves a TIME_WAIT entry in C (the sidecar's
/// config has no `nolinger`), and 28,000 of them to one destination would use up the ephemeral
/// ports.
const MTLS_REQUESTS: usize = 3_000;

/// Concurrent client threads, each with one connection at a time: more than the two cores, so
/// the proxies always have work queued, and few enough that no accept queue can overflow.
const CLIENTS: usize = 4;
/// Warm-up connections before each measurement, not counted.
const WARM_UP: usize = 100;
/// Accepting threads per app port; each serves one connection at a time.
const APP_THREADS: usize = 8;

/// Bounds that turn a hang into an error; far above any healthy figure.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A measurement that reaches this bound reports the connections it made, and says so.
const MEASURE_LIMIT: Duration = Duration::from_secs(30);

fn main() {
    match env::var(ROLE).as_deref() {
        Ok("client") => return client::main(),
        Ok("app") => return app::main(),
        Ok(other) => panic!("{ROLE}={other:?}: expected client or app"),
        Err(_) => {}
    }
    if !bench_may_run(
        "datapath",
        &["haproxy", "iptables-restore", "openssl", "ss", "bpftool"],
    ) {
        return;
    }
    catch_interrupts();
    let plan = Plan::from_env();
    let outside_load = load_average();
    let started = Instant::now();
    let mut samples = Vec::new();
    let mut nodes = Nodes::new();
    nodes.run_rounds(&plan, &Config::all(), Config::routes, &mut samples);
    eprintln!("== mTLS sidecars");
    nodes.iptables.start_mtls_sidecars();
    nodes.ebpf.start_mtls_sidecars();
    let mtls = |_| vec![Route::PodToPodMtls];
    nodes.run_rounds(&plan, &Config::mtls(), mtls, &mut samples);
    drop(nodes);
    eprintln!("== done in {:.0} s", started.elapsed().as_secs_f64());
    print_report(&plan, &samples, &outside_load);
}

/// How much to measure, per measurement (one path, one configuration, one round).
struct Plan {
    connects: usize,
    transfers: usize,
    mtls: usize,
}

impl Plan {
    fn from_env() -> Self {
        let total = requests(REQUESTS);
        Self {
            connects: total.div_ceil(ROUNDS),
            transfers: (total / TRANSFER_DIVISOR).div_ceil(ROUNDS).max(1),
            mtls: total.min(MTLS_REQUESTS).div_ceil(ROUNDS),
        }
    }

    fn count(&self, route: Route) -> usize {
        match route {
            Route::Transfer => self.transfers,
            Route::PodToPodMtls => self.mtls,
            Route::Inbound | Route::Outbound | Route::PodToPod | Route::CrossNode => self.connects,
        }
    }
}

/// What intercepts the meshed pods' connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interception {
    Direct,
    Iptables,
    Ebpf { sk_msg: bool },
}

impl fmt::Display for Interception {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Direct => "direct (no mesh)",
            Self::Iptables => "iptables",
            Self::Ebpf { sk_msg: false } => "eBPF, sk_msg off",
            Self::Ebpf { sk_msg: true } => "eBPF, sk_msg on",
        })
    }
}

/// An interception with its number of exclusions (of each kind, per meshed pod; none for direct).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Config {
    interception: Interception,
    exclusions: Option<usize>,
}

impl Config {
    /// Every configuration measured with plain proxies: direct, then iptables, then eBPF.
    fn all() -> Vec<Self> {
        let mut all = vec![Self {
            interception: Interception::Direct,
            exclusions: None,
        }];
        for n in EXCLUSIONS {
            all.push(Self {
                interception: Interception::Iptables,
                exclusions: Some(n),
            });
        }
        for n in EXCLUSIONS {
            for sk_msg in [false, true] {
                all.push(Self {
                    interception: Interception::Ebpf { sk_msg },
                    exclusions: Some(n),
                });
            }
        }
        all
    }

    /// The configurations measured with the mTLS sidecar: the mesh's, with the fewest exclusions.
    fn mtls() -> Vec<Self> {
        [
            Interception::Iptables,
            Interception::Ebpf { sk_msg: false },
            Interception::Ebpf { sk_msg: true },
        ]
        .map(|interception| Self {
            interception,
            exclusions: Some(EXCLUSIONS[0]),
        })
        .to_vec()
    }

    /// The plain paths measured in this configuration: the connects always, the transfer with the
    /// fewest exclusions only (exclusions are looked at once per connection, not per byte).
    fn routes(self) -> Vec<Route> {
        let mut routes = Route::CONNECTS.to_vec();
        if self.exclusions.is_none_or(|n| n == EXCLUSIONS[0]) {
            routes.push(Route::Transfer);
        }
        routes
    }
}

impl fmt::Display for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.interception)?;
        if let Some(n) = self.exclusions {
            write!(f, ", N = {n}")?;
        }
        Ok(())
    }
}

/// A measured path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// Host → S:8080, through S's proxy.
    Inbound,
    /// C → D:8080, through C's proxy.
    Outbound,
    /// C → S:8080, through C's proxy and S's.
    PodToPod,
    /// C → S:8081, 1 MiB per connection.
    Transfer,
    /// C → S:8080 with the mTLS sidecar of `tests/support/sidecar.rs`.
    PodToPodMtls,
    /// R (on the second node) → S:8080, through S's proxy.
    CrossNode,
}

impl Route {
    const CONNECTS: [Self; 4] = [
        Self::Inbound,
        Self::Outbound,
        Self::PodToPod,
        Self::CrossNode,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Inbound => "inbound: host → S",
            Self::Outbound => "outbound: C → D",
            Self::PodToPod => "pod to pod: C → S",
            Self::Transfer => "pod to pod: C → S, 1 MiB",
            Self::PodToPodMtls => "pod to pod: C → S, mTLS between proxies",
            Self::CrossNode => "cross-node inbound: node 2 → S",
        }
    }

    /// Whether the path passes S's inbound redirect and C's outbound redirect.
    fn redirects(self) -> (bool, bool) {
        match self {
            Self::Inbound | Self::CrossNode => (true, false),
            Self::Outbound => (false, true),
            Self::PodToPod | Self::Transfer | Self::PodToPodMtls => (true, true),
        }
    }
}

/// One measurement.
struct Sample {
    config: Config,
    route: Route,
    load: Load,
}

/// One node per interception, all set up before the first measurement and kept until the last, so
/// that the rounds can alternate between them.
struct Nodes {
    direct: Node,
    iptables: Node,
    ebpf: Node,
}

impl Nodes {
    fn new() -> Self {
        let started = Instant::now();
        let direct = Node::new();
        let mut iptables = Node::new();
        iptables.start_plain_proxies();
        let mut ebpf = Node::new();
        ebpf.start_plain_proxies();
        eprintln!(
            "== 3 nodes of 3 pods, apps and proxies ready in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Self {
            direct,
            iptables,
            ebpf,
        }
    }

    fn node(&mut self, interception: Interception) -> &mut Node {
        match interception {
            Interception::Direct => &mut self.direct,
            Interception::Iptables => &mut self.iptables,
            Interception::Ebpf { .. } => &mut self.ebpf,
        }
    }

    /// Measures every configuration's paths once per round, the configurations in an order that
    /// starts at a different place each round.
    fn run_rounds(
        &mut self,
        plan: &Plan,
        configs: &[Config],
        routes: impl Fn(Config) -> Vec<Route>,
        samples: &mut Vec<Sample>,
    ) {
        for round in 0..ROUNDS {
            eprintln!("== round {} of {ROUNDS}", round + 1);
            let start = round * configs.len() / ROUNDS;
            for i in 0..configs.len() {
                let config = configs[(start + i) % configs.len()];
                let node = self.node(config.interception);
                node.apply(config);
                for route in routes(config) {
                    let load = node.measure(route, config, plan.count(route));
                    samples.push(Sample {
                        config,
                        route,
                        load,
                    });
                }
            }
        }
    }
}

/// The pods, their apps and proxies, the cgroup and the datapath of one interception. Fields
/// drop in declaration order if a panic unwinds through here: the datapath's pins first, then the
/// processes it redirects, the cgroup that holds them, and the namespaces last.
struct Node {
    ebpf: Option<InProcessDatapath>,
    /// The meshed pods' proxies: plain ones, then the mTLS ones in their place.
    sidecars: Vec<Sidecar>,
    apps: Vec<AppProcess>,
    certs: Option<Certificates>,
    cgroup: TestCgroup,
    c: TestPod,
    s: TestPod,
    d: TestPod,
    /// The second node's client pod, then the namespace standing for that node.
    r: TestPod,
    _node2: TestPod,
    /// What the interception is set up for now.
    current: Option<Config>,
}

/// Who runs a client.
#[derive(Clone, Copy)]
enum Caller<'a> {
    Host,
    Pod(&'a TestPod),
    /// A pod on the second node, outside the cgroup.
    Remote(&'a TestPod),
}

impl Node {
    /// Three pods that reach each other through the host, and the apps in S and D.
    fn new() -> Self {
        let [c, s, d] = [(); 3].map(|()| TestPod::routed());
        let node2 = TestPod::new();
        let r = TestPod::behind(&node2);
        let cgroup = TestCgroup::new();
        let mut node = Self {
            ebpf: None,
            sidecars: Vec::new(),
            apps: Vec::new(),
            certs: None,
            cgroup,
            c,
            s,
            d,
            r,
            _node2: node2,
            current: None,
        };
        let apps = [&node.s, &node.d].map(|pod| AppProcess::start(&node.cgroup, pod));
        node.apps.extend(apps);
        node
    }

    /// The sidecar in C and S without TLS and without a log, closing with a reset (`nolinger`) as
    /// the clients do, so that it leaves no TIME_WAIT behind.
    fn start_plain_proxies(&mut self) {
        let config = SidecarConfig::plain().nolinger();
        let proxies = [&self.c, &self.s].map(|pod| Sidecar::start_with(&self.cgroup, pod, &config));
        self.sidecars.extend(proxies);
    }

    /// Replaces the plain proxies with the mTLS sidecar of the parity tests.
    fn start_mtls_sidecars(&mut self) {
        self.sidecars.clear();
        let certs = Certificates::new();
        for (pod, name) in [(&self.c, "c"), (&self.s, "s")] {
            let pem = certs.issue(name);
            self.sidecars
                .push(Sidecar::start(&self.cgroup, pod, &certs, &pem));
        }
        self.certs = Some(certs);
    }

    /// Sets the interception up for `config`, changing only what differs from the current one.
    fn apply(&mut self, config: Config) {
        let current = self.current.replace(config);
        let Some(n) = config.exclusions else { return };
        match config.interception {
            Interception::Direct => {}
            Interception::Iptables => {
                if current != Some(config) {
                    self.load_iptables(n);
                }
            }
            Interception::Ebpf { sk_msg } => {
                let reinstall = current.is_none_or(|c| c.interception != config.interception);
                let rules = current.is_none_or(|c| c.exclusions != config.exclusions);
                self.configure_ebpf(sk_msg, n, reinstall, rules);
            }
        }
    }

    /// Loads the mesh's rules with `n` exclusions of each kind into C and S, replacing their nat
    /// table.
    fn load_iptables(&self, n: usize) {
        let (rules, count) = fsm_rules_with_unused(n);
        for pod in [&self.c, &self.s] {
            load_iptables(pod, &rules);
            assert_eq!(
                nat_rule_count(pod),
                count,
                "nat rules in {}",
                pod.netns_name
            );
        }
    }

    /// Installs the datapath (or reinstalls it over its pins, to switch sk_msg) and gives C and S
    /// `n` exclusions of each kind.
    fn configure_ebpf(&mut self, sk_msg: bool, n: usize, reinstall: bool, rules: bool) {
        let ebpf = match &mut self.ebpf {
            Some(ebpf) => ebpf,
            None => self.ebpf.insert(InProcessDatapath::new(&self.cgroup)),
        };
        if reinstall {
            ebpf.install(sk_msg);
        }
        if rules {
            for pod in [&self.c, &self.s] {
                ebpf.mesh(pod, unused_exclusions(n));
            }
        }
    }

    /// Measures `route` with `count` connections, and checks that the interception really sent
    /// them through the proxies.
    fn measure(&self, route: Route, config: Config, count: usize) -> Load {
        stop_if_interrupted();
        let (caller, target, kind) = match route {
            Route::Inbound => (Caller::Host, &self.s, Kind::Byte),
            Route::Outbound => (Caller::Pod(&self.c), &self.d, Kind::Byte),
            Route::PodToPod | Route::PodToPodMtls => (Caller::Pod(&self.c), &self.s, Kind::Byte),
            Route::Transfer => (Caller::Pod(&self.c), &self.s, Kind::Mib),
            Route::CrossNode => (Caller::Remote(&self.r), &self.s, Kind::Byte),
        };
        let before = self.redirects(config.interception);
        let load = self.run_client(
            caller,
            SocketAddr::new(target.ip.into(), kind.port()),
            kind,
            count,
        );
        let after = self.redirects(config.interception);
        stop_if_interrupted();
        let label = format!("{} / {config}", route.label());
        match (before, after) {
            (Some(before), Some(after)) => {
                let delta = after.since(&before);
                eprintln!("   {label}: {load}; {delta}");
                delta.check(
                    route.redirects(),
                    config.interception == Interception::Ebpf { sk_msg: true },
                    load.done as u64,
                    &label,
                );
            }
            _ => eprintln!("   {label}: {load}"),
        }
        load
    }

    /// Runs the client in the test cgroup (and in the caller's pod) and reads its result.
    fn run_client(&self, caller: Caller<'_>, to: SocketAddr, kind: Kind, count: usize) -> Load {
        let exe = env::current_exe().expect("the benchmark's own path");
        let exe = exe.to_str().expect("a UTF-8 path");
        let client_args = [
            to.to_string(),
            kind.name().to_owned(),
            count.to_string(),
            WARM_UP.to_string(),
            CLIENTS.to_string(),
        ];
        let mut args: Vec<&str> = Vec::new();
        let program = match caller {
            Caller::Host => exe,
            Caller::Pod(pod) | Caller::Remote(pod) => {
                args.extend(["netns", "exec", &pod.netns_name, exe]);
                "ip"
            }
        };
        args.extend(client_args.iter().map(String::as_str));
        let command = match caller {
            // No hook of this node may run for the other node's client.
            Caller::Remote(_) => {
                let mut command = Command::new(program);
                command.args(&args).stdin(Stdio::null());
                command
            }
            Caller::Host | Caller::Pod(_) => self.cgroup.command(program, &args),
        };
        let stdout = client_output(command, ROLE, to);
        Load::decode(&stdout)
            .unwrap_or_else(|| panic!("client to {to}: unexpected output {stdout:?}"))
    }

    /// The interception's redirect counters, if it has any.
    fn redirects(&self, interception: Interception) -> Option<Redirects> {
        match interception {
            Interception::Direct => None,
            Interception::Iptables => Some(Redirects::of_iptables(&self.s, &self.c)),
            Interception::Ebpf { .. } => Some(Redirects::of_datapath(
                self.ebpf.as_ref().expect("installed"),
            )),
        }
    }
}

/// The app of a pod: this binary in the `app` role, in the pod's namespace and the test cgroup.
struct AppProcess {
    child: Child,
    _stdout: ChildStdout,
}

impl AppProcess {
    fn start(cgroup: &TestCgroup, pod: &TestPod) -> Self {
        let exe = env::current_exe().expect("the benchmark's own path");
        let exe = exe.to_str().expect("a UTF-8 path");
        let mut child = cgroup
            .command("ip", &["netns", "exec", &pod.netns_name, exe])
            .env(ROLE, "app")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the app");
        let mut stdout = BufReader::new(child.stdout.take().expect("the app's stdout"));
        let mut line = String::new();
        let read = stdout.read_line(&mut line);
        let app = Self {
            child,
            _stdout: stdout.into_inner(),
        };
        assert!(
            read.is_ok() && line.trim() == "ready",
            "the app in {} did not start: {read:?} {line:?}",
            pod.netns_name
        );
        app
    }
}

impl Drop for AppProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a connection reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Byte,
    Mib,
}

impl Kind {
    fn port(self) -> u16 {
        match self {
            Self::Byte => BYTE_PORT,
            Self::Mib => MIB_PORT,
        }
    }

    fn bytes(self) -> usize {
        match self {
            Self::Byte => 1,
            Self::Mib => MIB,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Byte => "byte",
            Self::Mib => "mib",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        [Self::Byte, Self::Mib]
            .into_iter()
            .find(|kind| kind.name() == name)
    }
}

/// The result of one measurement, as the client reports it.
struct Load {
    done: usize,
    asked: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    bytes: usize,
}

impl Load {
    fn per_second(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64()
    }

    fn mib_per_second(&self) -> f64 {
        (self.done * self.bytes) as f64 / MIB as f64 / self.elapsed.as_secs_f64()
    }

    /// One line: `done asked elapsed p50 p99 max bytes`, durations in nanoseconds.
    fn encode(&self) -> String {
        format!(
            "ok {} {} {} {} {} {} {}",
            self.done,
            self.asked,
            self.elapsed.as_nanos(),
            self.p50.as_nanos(),
            self.p99.as_nanos(),
            self.max.as_nanos(),
            self.bytes
        )
    }

    fn decode(text: &str) -> Option<Self> {
        let line = text.lines().find_map(|line| line.strip_prefix("ok "))?;
        let numbers: Vec<u64> = line
            .split_whitespace()
            .map(str::parse)
            .collect::<Result<_, _>>()
            .ok()?;
        let &[done, asked, elapsed, p50, p99, max, bytes] = numbers.as_slice() else {
            return None;
        };
        Some(Self {
            done: usize::try_from(done).ok()?,
            asked: usize::try_from(asked).ok()?,
            elapsed: Duration::from_nanos(elapsed),
            p50: Duration::from_nanos(p50),
            p99: Duration::from_nanos(p99),
            max: Duration::from_nanos(max),
            bytes: usize::try_from(bytes).ok()?,
        })
    }
}

impl fmt::Display for Load {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:.0}/s, p50 {}, p99 {}, max {}",
            self.per_second(),
            micros(self.p50),
            micros(self.p99),
            micros(self.max)
        )?;
        if self.bytes > 1 {
            write!(f, ", {:.0} MiB/s", self.mib_per_second())?;
        }
        if self.done < self.asked {
            write!(
                f,
                " (stopped at the {MEASURE_LIMIT:?} bound after {} of {})",
                self.done, self.asked
            )?;
        }
        Ok(())
    }
}

/// The client role: `<addr> <byte|mib> <count> <warm-up> <threads>`. Warms up, measures, and
/// prints one [`Load::encode`] line; on any failed connection it prints the first error and exits
/// with 1.
mod client {
    use super::*;

    pub fn main() {
        let args: Vec<String> = env::args().skip(1).collect();
        let [addr, kind, count, warm_up, threads] = args.as_slice() else {
            panic!("client arguments: <addr> <byte|mib> <count> <warm-up> <threads>, got {args:?}");
        };
        let addr: SocketAddr = addr.parse().expect("an address");
        let kind = Kind::parse(kind).expect("byte or mib");
        let count: usize = count.parse().expect("a count");
        let warm_up: usize = warm_up.parse().expect("a warm-up count");
        let threads: usize = threads.parse().expect("a thread count");
        let outcome =
            run(addr, kind, warm_up, threads).and_then(|_| run(addr, kind, count, threads));
        match outcome {
            Ok(load) => println!("{}", load.encode()),
            Err(error) => {
                println!("{error}");
                std::process::exit(1);
            }
        }
    }

    /// Makes `count` connections from `threads` threads, each timed from connect to the last byte
    /// it expects.
    fn run(addr: SocketAddr, kind: Kind, count: usize, threads: usize) -> Result<Load, String> {
        let measured = run_load(
            threads,
            count,
            MEASURE_LIMIT,
            || vec![0u8; 64 * 1024],
            |buf, _| one(addr, kind, buf).map_err(|error| format!("{addr}: {error}")),
        );
        if let Some(first) = measured.failures.first() {
            return Err(format!(
                "{} of {count} connections failed; the first: {first}",
                measured.failures.len()
            ));
        }
        if measured.latencies.is_empty() {
            return Err(format!("no connection completed within {MEASURE_LIMIT:?}"));
        }
        Ok(Load {
            done: measured.latencies.len(),
            asked: count,
            elapsed: measured.elapsed,
            p50: measured.percentile(50),
            p99: measured.percentile(99),
            max: measured.percentile(100),
            bytes: kind.bytes(),
        })
    }

    /// One connection: connect, read what the app sends, and close with a reset (SO_LINGER 0), so
    /// that no TIME_WAIT entry is left per connection.
    fn one(addr: SocketAddr, kind: Kind, buf: &mut [u8]) -> io::Result<()> {
        let mut stream = connect_with_reset(addr, CONNECT_TIMEOUT)?;
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        let mut left = kind.bytes();
        while left > 0 {
            let want = left.min(buf.len());
            match stream.read(&mut buf[..want])? {
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("closed with {left} bytes still to come"),
                    ));
                }
                n => left -= n,
            }
        }
        Ok(())
    }
}

/// The app role: the test support's sending app ([`App::sending`]) on 0.0.0.0 (so both the pod
/// IP and 127.0.0.1, where the inbound proxy goes, reach it), [`APP_THREADS`] threads on each of
/// [`BYTE_PORT`] and [`MIB_PORT`]. It prints `ready`, and for every connection writes its payload
/// and waits for the client to close, so that the client's reset, not the app, ends it. Runs until
/// killed.
mod app {
    use super::*;

    pub fn main() {
        let _apps = [Kind::Byte, Kind::Mib].map(|kind| {
            let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), kind.port());
            let socket = listener(addr).unwrap_or_else(|error| panic!("listen on {addr}: {error}"));
            App::sending(socket, APP_THREADS, vec![b'x'; kind.bytes()].into())
        });
        println!("ready");
        io::stdout().flush().expect("tell the benchmark");
        loop {
            thread::park();
        }
    }
}

fn ratio(value: f64, baseline: Option<f64>) -> String {
    baseline.map_or_else(String::new, |baseline| format!("{:.2}", value / baseline))
}

/// The rounds' measurements of one path in one configuration.
struct Row<'a> {
    config: Config,
    loads: Vec<&'a Load>,
}

impl Row<'_> {
    fn median(&self, of: impl Fn(&Load) -> f64) -> f64 {
        median(self.loads.iter().map(|load| of(load)).collect())
    }

    fn rate(&self) -> f64 {
        self.median(Load::per_second)
    }

    /// Half the range of the rounds' rates, as a share of their median.
    fn spread(&self) -> String {
        let rates: Vec<f64> = self.loads.iter().map(|load| load.per_second()).collect();
        spread(&rates)
    }

    fn p50(&self) -> String {
        micros(Duration::from_secs_f64(
            self.median(|load| load.p50.as_secs_f64()),
        ))
    }

    fn p99(&self) -> String {
        micros(Duration::from_secs_f64(
            self.median(|load| load.p99.as_secs_f64()),
        ))
    }
}

/// The rows of `route`: direct first, then for each number of exclusions iptables and eBPF.
fn rows_of(samples: &[Sample], route: Route) -> Vec<Row<'_>> {
    let mut order = Config::all();
    order.sort_by_key(|config| {
        let kind = match config.interception {
            Interception::Direct => 0,
            Interception::Iptables => 1,
            Interception::Ebpf { sk_msg } => 2 + usize::from(sk_msg),
        };
        (config.exclusions, kind)
    });
    order
        .into_iter()
        .map(|config| Row {
            config,
            loads: samples
                .iter()
                .filter(|sample| sample.route == route && sample.config == config)
                .map(|sample| &sample.load)
                .collect(),
        })
        .filter(|row| !row.loads.is_empty())
        .collect()
}

/// The median rate of `route` in `config`, if it was measured.
fn rate_of(samples: &[Sample], route: Route, config: Config) -> Option<f64> {
    rows_of(samples, route)
        .into_iter()
        .find(|row| row.config == config)
        .map(|row| row.rate())
}

const DIRECT: Config = Config {
    interception: Interception::Direct,
    exclusions: None,
};

/// The same configuration under iptables, for eBPF rows.
fn iptables_twin(config: Config) -> Option<Config> {
    matches!(config.interception, Interception::Ebpf { .. }).then_some(Config {
        interception: Interception::Iptables,
        ..config
    })
}

fn print_report(plan: &Plan, samples: &[Sample], outside_load: &str) {
    let exclusions = |row: &Row<'_>| {
        row.config
            .exclusions
            .map_or_else(|| "–".to_owned(), |n| n.to_string())
    };
    let twin_rate =
        |route, config| iptables_twin(config).and_then(|twin| rate_of(samples, route, twin));
    println!("{}", command_line("datapath"));
    println!(
        "machine: {}; load average before the run {outside_load}",
        machine()
    );
    println!(
        "load: per path and configuration {ROUNDS} rounds of {} connections ({} for 1 MiB \
         transfers, {} with mTLS), each after {WARM_UP} warm-up ones, from {CLIENTS} client \
         threads that close with a reset; figures are the rounds' medians, ± half the range of \
         their rates; the rounds alternate between configurations",
        plan.connects, plan.transfers, plan.mtls
    );
    println!(
        "proxies: HAProxy {} in each meshed pod (UID {PROXY_UID}, inbound {INBOUND_PORT}, \
         outbound {OUTBOUND_PORT}), plain TCP unless stated",
        haproxy_version()
    );
    println!(
        "pods: C and S meshed (not in the direct rows), D never; S and D run the app. Exclusions \
         N: per meshed pod N inbound ports + N outbound ports + N outbound CIDRs, none matching \
         the traffic; under iptables {} nat rules per pod at N = {}, {} at N = {} (the fixture \
         alone: {})",
        fsm_rules_with_unused(EXCLUSIONS[0]).1,
        EXCLUSIONS[0],
        fsm_rules_with_unused(EXCLUSIONS[2]).1,
        EXCLUSIONS[2],
        fsm_rules_with_unused(0).1
    );
    println!();
    println!("Connect + first byte:");
    println!();
    println!(
        "| path | interception | N | connects/s | ± | p50 | p99 | rate / direct | rate / iptables |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for route in Route::CONNECTS {
        let direct = rate_of(samples, route, DIRECT);
        for row in rows_of(samples, route) {
            let rate = row.rate();
            println!(
                "| {} | {} | {} | {rate:.0} | {} | {} | {} | {} | {} |",
                route.label(),
                row.config.interception,
                exclusions(&row),
                row.spread(),
                row.p50(),
                row.p99(),
                ratio(rate, direct),
                ratio(rate, twin_rate(route, row.config)),
            );
        }
    }
    println!();
    println!(
        "1 MiB transfers, pod to pod (C → S), N = {}:",
        EXCLUSIONS[0]
    );
    println!();
    println!(
        "| interception | transfers/s | ± | MiB/s | p50 | p99 | rate / direct | rate / iptables |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    let direct = rate_of(samples, Route::Transfer, DIRECT);
    for row in rows_of(samples, Route::Transfer) {
        let rate = row.rate();
        println!(
            "| {} | {rate:.0} | {} | {:.0} | {} | {} | {} | {} |",
            row.config.interception,
            row.spread(),
            row.median(Load::mib_per_second),
            row.p50(),
            row.p99(),
            ratio(rate, direct),
            ratio(rate, twin_rate(Route::Transfer, row.config)),
        );
    }
    println!();
    println!(
        "Pod to pod with mTLS between the proxies (the sidecar of tests/support/sidecar.rs), N = {}:",
        EXCLUSIONS[0]
    );
    println!();
    println!(
        "| interception | connects/s | ± | p50 | p99 | rate / same without TLS | rate / iptables |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for row in rows_of(samples, Route::PodToPodMtls) {
        let rate = row.rate();
        println!(
            "| {} | {rate:.0} | {} | {} | {} | {} | {} |",
            row.config.interception,
            row.spread(),
            row.p50(),
            row.p99(),
            ratio(rate, rate_of(samples, Route::PodToPod, row.config)),
            ratio(rate, twin_rate(Route::PodToPodMtls, row.config)),
        );
    }
}
