//! A node of test pods meshed the way FSM meshes them, intercepted in one of two ways:
//!
//! - [`Mode::Iptables`]: the mesh's own rules (`tests/fixtures/fsm-init.iptables`, plus the pod's
//!   exclusions as FSM adds them) loaded in each meshed pod's namespace, and the agent serving only
//!   the healthcheck (`--datapath none`);
//! - [`Mode::Ebpf`]: no iptables; the agent's eBPF datapath, attached to the test's cgroup, does the
//!   redirecting, told the exclusions by the pods' annotations;
//! - [`Mode::EbpfOnMeshRules`]: both, as on a node switched to the datapath while its pods were
//!   injected before the switch: the mesh's rules are still in each meshed pod, and the datapath
//!   runs as in [`Mode::Ebpf`].
//!
//! Every meshed pod runs an HTTP app and a [`Sidecar`]; the others run only the app. Calls are made
//! with `curl` from inside the test's cgroup, from the host (as the kubelet calls) or from a pod,
//! as its app or as its proxy's UID, and each comes back as the [`Outcome`] a user would observe:
//! what answered, and which proxies the connection went through.
//!
//! A second node stands beside it ([`OtherNode`]): a network namespace routed to this node's pods
//! through veths, with a client pod of its own behind it, all outside the test's cgroup, so that
//! no hook of this node runs when its clients connect (issue 5).

use std::{
    fmt, fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

use crate::{
    agent::{Agent, ManifestDir},
    cgroup::{ChildCgroup, TestCgroup},
    cri::{CgroupDriver, Container, CriNode, CriPod},
    injected::{self, VALIDATION_CONTAINER_NAME},
    pod::{App, TestPod},
    sidecar::{
        Certificates, INBOUND_PORT, OUTBOUND_PORT, PROXY_UID, ProxyEvent, ProxyLog, Sidecar,
        SidecarConfig, SidecarContainer,
    },
    validation::{NODE, run_bounded, start_agent},
};
pub use crate::{
    ebpf_agent::EbpfAgent,
    mesh_rules::{FSM_INIT_RULES, OUTBOUND_CATCH_ALL, comma_list, fsm_rules, load_iptables},
};

/// The mesh's healthcheck port and path, written out here rather than taken from the agent, so
/// that a wrong value in the agent shows up as a difference from the mesh.
pub const HEALTHCHECK_PORT: u16 = 15904;
const HEALTHCHECK_PATH: &str = "/fsm-healthcheck";

/// curl as every call runs it: `-q` first, so no ~/.curlrc; `--noproxy`, so no proxy from the
/// environment either; and a bound on the call, so a connection the datapath swallows fails the
/// test instead of hanging it.
const CURL: [&str; 8] = [
    "curl",
    "-q",
    "--silent",
    "--show-error",
    "--noproxy",
    "*",
    "--max-time",
    "3",
];

/// A proxy's log is settled once it has not grown for this long after a call.
const LOG_QUIET: Duration = Duration::from_millis(200);

/// What makes the node's pods: their network namespaces, addresses and links to the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pods {
    /// The tests' own: a namespace and a veth per pod ([`TestPod::new`]).
    Netns,
    /// The sandboxes of a containerd of the test's own, made over CRI as the kubelet makes them,
    /// on its CNI bridge ([`CriNode`]), each pod's app and sidecar a container of it.
    Containerd,
}

/// How the meshed pods' traffic is made to go through their sidecars.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// The mesh's iptables rules in each meshed pod; no eBPF.
    Iptables,
    /// The agent's eBPF datapath; no iptables.
    Ebpf,
    /// The agent's eBPF datapath over pods that still carry the mesh's iptables rules.
    EbpfOnMeshRules,
}

impl Mode {
    /// Whether the meshed pods get the mesh's iptables rules.
    fn installs_mesh_rules(self) -> bool {
        matches!(self, Mode::Iptables | Mode::EbpfOnMeshRules)
    }
}

/// Where the meshed pods' manifests come from, and how they start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Manifests {
    /// Written from the [`MeshSpec`]: the annotations FSM's injector reads. In the modes with the
    /// mesh's rules, the rules of `tests/fixtures/fsm-init.iptables` with the pod's exclusions;
    /// on [`Pods::Containerd`], those the mesh's own init container loads, run as a container
    /// of the pod before its app (its script carries the same exclusions).
    Annotated,
    /// The injector's output ([`injected::injector_output`]): the exclusions only in its init
    /// container's script. In the modes with the mesh's rules, that init container runs in the
    /// pod. In [`Mode::Ebpf`], `probe-bypass rewrite --replace-mesh-init` replaces it, and the
    /// validation init container runs before the agent starts (it must fail within its bound) and
    /// after (it must pass); the sidecar and the app start only then.
    Injected,
}

/// A step of [`Node::start_from`], for a caller that shows how the node starts.
pub enum Report<'a> {
    /// The injector's init container `container` ran in `pod`: the mesh's rules are in.
    MeshInit { pod: &'a str, container: &'a str },
    /// `probe-bypass rewrite --replace-mesh-init` rewrote `pod`'s manifest: its diff, and what it
    /// warned of.
    Rewritten {
        pod: &'a str,
        diff: &'a str,
        warnings: &'a str,
    },
    /// The agent serves the node's pods.
    AgentUp,
    /// `pod`'s validation init container ran to its end, before the agent (`agent_up` false) or
    /// after.
    Validation {
        pod: &'a str,
        agent_up: bool,
        output: &'a Output,
    },
}

/// The bound the validation is given when it runs before the agent: it must fail, and the
/// kubelet would run it again; its default bound (20 s) would only make the wait longer.
const VALIDATION_EARLY: &str = "1s";
/// How long past its own bound a validation may run before the test calls it hung.
const VALIDATION_SLACK: Duration = Duration::from_secs(5);

/// A pod of the node, as a test declares it.
pub struct PodSpec {
    /// A short name (`A`): apps answer with it, and outcomes name addresses by it.
    pub name: &'static str,
    /// Ports its HTTP app answers on, on every address of the pod.
    pub app_ports: &'static [u16],
    /// `Some` for a meshed pod: it gets a sidecar, a manifest and the mesh's interception.
    pub mesh: Option<MeshSpec>,
}

/// How a meshed pod is meshed: the settings FSM takes from its annotations.
pub struct MeshSpec {
    /// Prefix of its mesh annotations: `flomesh.io/` (FSM) or `openservicemesh.io/` (OSM).
    pub annotation_prefix: &'static str,
    /// Ports its (rewritten) tcpSocket probes name, which the healthcheck dials.
    pub probe_ports: &'static [u16],
    /// Inbound ports that skip the proxy.
    pub inbound_port_exclusions: &'static [u16],
    /// Outbound ports that skip the proxy.
    pub outbound_port_exclusions: &'static [u16],
    /// Pods whose address (as a /32) is an outbound destination that skips the proxy. Test pods'
    /// addresses are known only once they exist, so the spec names the pods.
    pub outbound_pod_exclusions: &'static [&'static str],
}

/// Who makes a call. Every caller is a process inside the test's cgroup.
#[derive(Clone, Copy, Debug)]
pub enum Caller {
    /// The kubelet: a process in the host's network namespace, in the kubelet's cgroup (one of
    /// its own below the test's, which the agent is told with `--kubelet-cgroup`).
    Host,
    /// Another process in the host's network namespace, in a cgroup beside the kubelet's: a node
    /// daemon, or a hostNetwork pod.
    HostDaemon,
    /// An app in the named pod (root, in the pod's namespace).
    App(&'static str),
    /// A process in the named pod running as the proxy's UID: the proxy's own connections.
    Proxy(&'static str),
    /// An app in the client pod of the other node ([`REMOTE_POD`]), outside the test's cgroup.
    Remote,
    /// A process there running as the proxy's UID: a proxy on another node.
    RemoteProxy,
}

/// The name of the other node's client pod in outcomes and tables.
pub const REMOTE_POD: &str = "R";

impl Caller {
    fn is_remote(self) -> bool {
        matches!(self, Self::Remote | Self::RemoteProxy)
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Host => f.write_str("host"),
            Self::HostDaemon => f.write_str("host daemon"),
            Self::App(pod) => f.write_str(pod),
            Self::Proxy(pod) => write!(f, "{pod} uid {PROXY_UID}"),
            Self::Remote => write!(f, "node 2 {REMOTE_POD}"),
            Self::RemoteProxy => write!(f, "node 2 {REMOTE_POD} uid {PROXY_UID}"),
        }
    }
}

/// Where a call goes.
#[derive(Clone, Copy, Debug)]
pub enum Target {
    /// The named pod's IP.
    Pod(&'static str),
    /// 127.0.0.1, in the caller's own namespace.
    Loopback,
}

/// What is asked.
#[derive(Clone, Copy, Debug)]
pub enum Call {
    /// `GET /` on `port` of `to`.
    Http { to: Target, port: u16 },
    /// The kubelet's rewritten tcpSocket probe of `port`: `GET /fsm-healthcheck` on the pod's
    /// [`HEALTHCHECK_PORT`] with `Original-Tcp-Port: <port>`.
    Healthcheck { pod: &'static str, port: u16 },
    /// `GET /` on `port` of the named pod over mTLS, with the caller's mesh certificate: what a
    /// peer proxy sends.
    Mtls { pod: &'static str, port: u16 },
}

impl fmt::Display for Call {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Http {
                to: Target::Pod(pod),
                port,
            } => write!(f, "{pod}:{port}"),
            Self::Http {
                to: Target::Loopback,
                port,
            } => write!(f, "127.0.0.1:{port}"),
            Self::Healthcheck { pod, port } => {
                write!(f, "{pod}:{HEALTHCHECK_PORT} healthcheck of {port}")
            }
            Self::Mtls { pod, port } => write!(f, "{pod}:{port} over mTLS"),
        }
    }
}

/// A call's outcome as a user observes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    /// What answered: an app's body (`app B:8080`), `healthcheck <status>`, `HTTP <status> <body>`
    /// for anything else that answered, or `error: <class>` (`empty reply`, `connection refused`,
    /// `connection reset`, `timeout`, …) when nothing did.
    pub answered: String,
    /// What the proxies logged for the call, a line each, pods in the node's order:
    /// `<pod> <frontend> <original destination>` for a connection a proxy forwarded (or tried
    /// to), `<pod> <frontend>: <reason>` for one that failed first. Addresses of the node's pods
    /// are written by pod name (`B:8080`).
    pub proxies: Vec<String>,
}

impl Outcome {
    /// An outcome written by hand, for expected tables.
    pub fn new(answered: &str, proxies: &[&str]) -> Self {
        Self {
            answered: answered.to_owned(),
            proxies: proxies.iter().map(|line| (*line).to_owned()).collect(),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.answered)?;
        if self.proxies.is_empty() {
            return f.write_str(" (no proxy)");
        }
        write!(f, " via [{}]", self.proxies.join("; "))
    }
}

/// One call made on the node: its outcome, and the evidence behind it.
pub struct Observation {
    pub outcome: Outcome,
    /// The curl command line, as run.
    pub command: String,
    /// The proxies' raw log lines for the call, each after its pod's name.
    pub log_lines: Vec<String>,
}

/// A node: the pods, their apps and sidecars, the test's cgroup, and the interception of the mode.
/// Dropping it stops and removes everything, the agent and its pins first.
pub struct Node {
    // Fields drop in this order: the agent (and the datapath's pins) before the processes it
    // redirects, those before the cgroup that holds them, and that before the namespaces.
    interception: Interception,
    sidecars: Vec<(&'static str, Proxy)>,
    /// Each app with the pod and port it serves.
    apps: Vec<(&'static str, u16, App)>,
    /// The runtime that made the pods, with [`Pods::Containerd`]: its pods' cgroups are below the
    /// test's, so it goes before the test's cgroup (the test pods only name its namespaces).
    _cri: Option<CriNode>,
    host: HostCgroups,
    cgroup: TestCgroup,
    other_node: OtherNode,
    pods: Vec<(&'static str, TestPod)>,
    manifests: ManifestDir,
    /// Whether a pod's mesh init container was replaced: the datapath is all that intercepts it,
    /// so `probe-bypass uninstall` refuses until the pod is gone (see [`Drop`]).
    replaced: bool,
    certs: Certificates,
    /// The other node's client certificate (PEM with its key), for [`Call::Mtls`].
    remote_pem: String,
}

/// The second node: a namespace standing for its host network namespace, which forwards, and a
/// client pod behind it. Fields drop in order: the pod, then the node.
pub struct OtherNode {
    pub pod: TestPod,
    pub node: TestPod,
}

impl OtherNode {
    fn new() -> Self {
        let node = TestPod::new();
        let pod = TestPod::behind(&node);
        Self { pod, node }
    }
}

/// The cgroups of the host's processes, below the test's: the kubelet's, and a node daemon's
/// beside it.
struct HostCgroups {
    kubelet: ChildCgroup,
    daemon: ChildCgroup,
    /// Where calls from inside the pods run (their apps, their proxies' UID): a leaf of its own,
    /// as the test cgroup may hold the runtime's pods' cgroups, whose controllers a cgroup v2
    /// parent with processes of its own could not enable.
    pods: ChildCgroup,
}

impl HostCgroups {
    fn new(cgroup: &TestCgroup) -> Self {
        Self {
            kubelet: ChildCgroup::new(cgroup, "kubelet.service"),
            daemon: ChildCgroup::new(cgroup, "node-daemon.service"),
            pods: ChildCgroup::new(cgroup, "pod-callers"),
        }
    }
}

/// A meshed pod's sidecar: HAProxy in the pod's namespace, run by the test, or a container of its
/// CRI pod.
enum Proxy {
    Process(Sidecar),
    Container(SidecarContainer),
}

impl Proxy {
    /// Starts the sidecar container of `sandbox` on `node` with `config` and waits until it
    /// listens in `pod`, the sandbox's namespace.
    fn container(
        node: &mut CriNode,
        sandbox: &mut CriPod,
        pod: &TestPod,
        config: &SidecarConfig,
    ) -> Self {
        let mut sidecar = SidecarContainer::new(config);
        node.add_container(sandbox, &sidecar.container());
        sidecar.started(sandbox.log_path(SidecarContainer::NAME));
        assert!(
            pod.wait_until_listening(&[INBOUND_PORT, OUTBOUND_PORT], Duration::from_secs(10)),
            "the sidecar container of {} does not listen:\n{}",
            sandbox.spec.name,
            sandbox.log(SidecarContainer::NAME)
        );
        Self::Container(sidecar)
    }

    fn log_mark(&self) -> u64 {
        match self {
            Self::Process(sidecar) => sidecar.log_mark(),
            Self::Container(sidecar) => sidecar.log_mark(),
        }
    }

    fn log_since(&self, mark: u64) -> Vec<ProxyLog> {
        match self {
            Self::Process(sidecar) => sidecar.log_since(mark),
            Self::Container(sidecar) => sidecar.log_since(mark),
        }
    }
}

/// What intercepts the meshed pods' traffic, besides rules that live and die with the namespaces.
enum Interception {
    /// The mesh's iptables rules; the agent serves only the healthcheck.
    Iptables {
        agent: Agent,
    },
    Ebpf {
        agent: EbpfAgent,
    },
}

impl Node {
    /// Builds the node of `specs` and starts intercepting in `mode`, the meshed pods' manifests
    /// written from their [`MeshSpec`]s ([`Manifests::Annotated`]). Returns once every sidecar
    /// listens and the agent reports every meshed pod ready.
    pub fn start(mode: Mode, specs: &[PodSpec]) -> Self {
        Self::start_from(mode, Manifests::Annotated, specs, &mut |_| {})
    }

    /// Like [`Self::start`], the meshed pods' manifests and start-up as `manifests` says;
    /// `report` is told each step a user would want to see (the demo prints them).
    pub fn start_from(
        mode: Mode,
        manifests: Manifests,
        specs: &[PodSpec],
        report: &mut dyn FnMut(Report<'_>),
    ) -> Self {
        Self::start_on(Pods::Netns, mode, manifests, specs, report)
    }

    /// Like [`Self::start_from`], the pods made by `made_by`.
    pub fn start_on(
        made_by: Pods,
        mode: Mode,
        manifests: Manifests,
        specs: &[PodSpec],
        report: &mut dyn FnMut(Report<'_>),
    ) -> Self {
        assert!(
            made_by == Pods::Netns || manifests == Manifests::Annotated,
            "CRI pods take annotated manifests only: an injected pod's init containers and sidecar \
             run here as processes in its namespace"
        );
        let cgroup = TestCgroup::new();
        let host = HostCgroups::new(&cgroup);
        // The runtime's pods' cgroups below the test's, where the datapath is attached: their
        // sidecars' getsockopt and connects must run its programs.
        let mut cri = (made_by == Pods::Containerd).then(|| CriNode::start_under(&cgroup));
        let mut pods: Vec<(&'static str, TestPod)> = Vec::new();
        let mut sandboxes = Vec::new();
        for spec in specs {
            let pod = match cri.as_mut() {
                None => TestPod::new(),
                Some(node) => {
                    let (pod, made) = sandbox(node, spec, mode);
                    sandboxes.push(made);
                    pod
                }
            };
            pod.route_to_other_pods();
            pods.push((spec.name, pod));
        }
        let apps = start_apps(specs, &pods);
        assert_pods_reach_each_other(specs, &pods);
        let other_node = OtherNode::new();
        assert_other_node_reaches_the_pods(&other_node, specs, &pods);
        // An injected pod's app starts after its init containers, and a CRI pod's app is a
        // container that does: these only showed the way.
        // They must stop before those start on the same ports (shadowing would keep them).
        let apps = match (manifests, cri.is_some()) {
            (Manifests::Annotated, false) => Some(apps),
            (manifests, _) => {
                drop(apps);
                // A CRI pod's app container is not the node's to stop: none to keep.
                (manifests == Manifests::Annotated).then(Vec::new)
            }
        };
        // A CRI pod's containers in the kubelet's order: the mesh's init container (when its
        // rules are in use), then the app, then (below) the sidecar.
        if let Some(node) = cri.as_mut() {
            for ((spec, (name, pod)), sandbox) in specs.iter().zip(&pods).zip(&mut sandboxes) {
                if let Some(mesh) = &spec.mesh
                    && mode.installs_mesh_rules()
                {
                    let container = run_mesh_init_container(node, sandbox, pod, spec, mesh, &pods);
                    report(Report::MeshInit {
                        pod: name,
                        container,
                    });
                }
                start_app_container(node, sandbox, pod, spec);
            }
        }

        let certs = Certificates::new();
        let remote_pem = certs.issue(REMOTE_POD);
        let manifest_dir = ManifestDir::new();
        let mut sidecars = Vec::new();
        let mut validations = Vec::new();
        for (i, (spec, (name, pod))) in specs.iter().zip(&pods).enumerate() {
            let Some(mesh) = &spec.mesh else { continue };
            let exclusions = mesh.outbound_cidrs(&pods);
            let pod_name = format!("pod-{}", name.to_lowercase());
            match manifests {
                Manifests::Annotated => {
                    let annotations = mesh.annotations(&exclusions);
                    let annotations: Vec<(&str, &str)> = annotations
                        .iter()
                        .map(|(key, value)| (key.as_str(), value.as_str()))
                        .collect();
                    manifest_dir.write(
                        &format!("{name}.json"),
                        &pod.manifest_with_annotations(&pod_name, mesh.probe_ports, &annotations),
                    );
                    // A CRI pod's rules came from its init container.
                    if mode.installs_mesh_rules() && cri.is_none() {
                        install_fsm_rules(pod, mesh, &exclusions);
                    }
                }
                Manifests::Injected => {
                    let kind = injected::Mesh::of(mesh);
                    let injected = injected::injector_output(
                        &pod_name,
                        pod,
                        spec.app_ports,
                        mesh,
                        &exclusions,
                    );
                    let manifest = if mode.installs_mesh_rules() {
                        run_init_container(&injected, kind.init_container(), pod, &cgroup);
                        report(Report::MeshInit {
                            pod: name,
                            container: kind.init_container(),
                        });
                        injected
                    } else {
                        let replaced = injected::replace_mesh_init(&injected, kind);
                        report(Report::Rewritten {
                            pod: name,
                            diff: &replaced.diff,
                            warnings: &replaced.warnings,
                        });
                        assert!(
                            injected::has_init_container(
                                &replaced.manifest,
                                VALIDATION_CONTAINER_NAME
                            ),
                            "the rewriter kept {}'s mesh init container:\n{}",
                            name,
                            replaced.warnings
                        );
                        validations.push((*name, pod, replaced.manifest.clone()));
                        replaced.manifest
                    };
                    manifest_dir.write(&format!("{name}.yaml"), &manifest);
                }
            }
            if manifests == Manifests::Annotated {
                let pem = certs.issue(name);
                let proxy = match (cri.as_mut(), sandboxes.get_mut(i)) {
                    (Some(node), Some(sandbox)) => Proxy::container(
                        node,
                        sandbox,
                        pod,
                        &SidecarConfig::mtls(&pem, &certs.ca()),
                    ),
                    _ => Proxy::Process(Sidecar::start(&cgroup, pod, &certs, &pem)),
                };
                sidecars.push((*name, proxy));
            }
        }

        // No agent yet: each validation must fail, and within its bound.
        for (name, pod, manifest) in &validations {
            let output = run_validation(manifest, pod, &cgroup, &["--timeout", VALIDATION_EARLY]);
            report(Report::Validation {
                pod: name,
                agent_up: false,
                output: &output,
            });
            assert_eq!(
                output.status.code(),
                Some(1),
                "the validation of {name} did not fail without the agent:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let interception = match mode {
            Mode::Iptables => Interception::Iptables {
                agent: start_agent(&manifest_dir, &["--datapath", "none"]),
            },
            Mode::Ebpf | Mode::EbpfOnMeshRules => Interception::Ebpf {
                agent: EbpfAgent::start_with(&cgroup, |args| {
                    let kubelet = host.kubelet.path().display().to_string();
                    let mut all = args.to_vec();
                    all.extend([
                        "--probe-bypass-from",
                        "kubelet",
                        "--kubelet-cgroup",
                        &kubelet,
                    ]);
                    start_agent(&manifest_dir, &all)
                }),
            },
        };
        report(Report::AgentUp);
        // The kubelet runs the validation again: with the datapath, it must pass.
        for (name, pod, manifest) in &validations {
            let output = run_validation(manifest, pod, &cgroup, &[]);
            report(Report::Validation {
                pod: name,
                agent_up: true,
                output: &output,
            });
            assert!(
                output.status.success(),
                "the validation of {name} failed with the agent up ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let replaced = !validations.is_empty();
        // Only then do the injected pods' containers start: the sidecar and the app.
        if manifests == Manifests::Injected {
            for (spec, (name, pod)) in specs.iter().zip(&pods) {
                if spec.mesh.is_some() {
                    let pem = certs.issue(name);
                    let sidecar = Sidecar::start(&cgroup, pod, &certs, &pem);
                    sidecars.push((*name, Proxy::Process(sidecar)));
                }
            }
        }
        let apps = apps.unwrap_or_else(|| start_apps(specs, &pods));
        Self {
            interception,
            sidecars,
            apps,
            host,
            cgroup,
            other_node,
            pods,
            _cri: cri,
            manifests: manifest_dir,
            replaced,
            certs,
            remote_pem,
        }
    }

    /// The addresses of the clients that `pod`'s app on `port` accepted so far.
    pub fn app_peers(&self, pod: &str, port: u16) -> Vec<SocketAddr> {
        self.apps
            .iter()
            .find(|(name, app_port, _)| *name == pod && *app_port == port)
            .map(|(_, _, app)| app.peers())
            .unwrap_or_else(|| panic!("pod {pod} has no app on port {port}"))
    }

    /// The node's cgroup: its processes run in it, and the datapath is attached to it.
    pub fn cgroup(&self) -> &TestCgroup {
        &self.cgroup
    }

    /// The kubelet's cgroup (below the node's), which the agent is told with `--kubelet-cgroup`.
    pub fn kubelet_cgroup(&self) -> &std::path::Path {
        self.host.kubelet.path()
    }

    /// The node's agent.
    pub fn agent(&self) -> &Agent {
        match &self.interception {
            Interception::Iptables { agent } => agent,
            Interception::Ebpf { agent: guard } => guard.agent(),
        }
    }

    /// Where the datapath's programs and maps are pinned, when the node has the datapath.
    pub fn pin_path(&self) -> Option<&std::path::Path> {
        match &self.interception {
            Interception::Iptables { .. } => None,
            Interception::Ebpf { agent: guard } => Some(guard.pin_path()),
        }
    }

    /// The other node's client pod.
    pub fn remote_pod(&self) -> &TestPod {
        &self.other_node.pod
    }

    /// Makes `call` as `caller` and returns what came of it.
    pub fn call(&self, caller: Caller, call: Call) -> Observation {
        let marks: Vec<u64> = self
            .sidecars
            .iter()
            .map(|(_, sidecar)| sidecar.log_mark())
            .collect();
        let (program, args) = self.curl(caller, call);
        let output = if caller.is_remote() {
            // Outside the cgroup: no hook of this node runs for the other node's clients.
            Command::new(&program)
                .args(&args)
                .output()
                .unwrap_or_else(|error| panic!("run {program}: {error}"))
        } else {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let mut command = match caller {
                Caller::Host => self.host.kubelet.command(&program, &args),
                Caller::HostDaemon => self.host.daemon.command(&program, &args),
                _ => self.host.pods.command(&program, &args),
            };
            command
                .output()
                .unwrap_or_else(|error| panic!("run {program}: {error}"))
        };
        self.wait_for_quiet_logs();

        let mut proxies = Vec::new();
        let mut log_lines = Vec::new();
        for ((pod, sidecar), mark) in self.sidecars.iter().zip(marks) {
            for line in sidecar.log_since(mark) {
                proxies.push(format!("{pod} {}", self.describe_log(&line)));
                log_lines.push(format!("{pod}: {line}"));
            }
        }
        Observation {
            outcome: Outcome {
                answered: answered(call, &output),
                proxies,
            },
            command: shell_words(&program, &args),
            log_lines,
        }
    }

    /// The curl command line for `call` from `caller`.
    fn curl(&self, caller: Caller, call: Call) -> (String, Vec<String>) {
        let in_netns = |netns: &str| ["ip", "netns", "exec", netns].map(str::to_owned).to_vec();
        let as_proxy = [
            "setpriv",
            &format!("--reuid={PROXY_UID}"),
            &format!("--regid={PROXY_UID}"),
            "--clear-groups",
        ]
        .map(str::to_owned);
        let remote_netns = self.other_node.pod.netns_name.as_str();
        let mut command: Vec<String> = match caller {
            Caller::Host | Caller::HostDaemon => Vec::new(),
            Caller::App(pod) => in_netns(&self.pod(pod).netns_name),
            Caller::Proxy(pod) => [in_netns(&self.pod(pod).netns_name), as_proxy.to_vec()].concat(),
            Caller::Remote => in_netns(remote_netns),
            Caller::RemoteProxy => [in_netns(remote_netns), as_proxy.to_vec()].concat(),
        };
        command.extend(
            CURL.into_iter()
                .chain(["--output", "-", "--write-out", "\n%{http_code}"])
                .map(str::to_owned),
        );
        let url = match call {
            Call::Http { to, port } => {
                let ip = match to {
                    Target::Pod(pod) => IpAddr::V4(self.pod(pod).ip),
                    Target::Loopback => IpAddr::V4(Ipv4Addr::LOCALHOST),
                };
                format!("http://{ip}:{port}/")
            }
            Call::Healthcheck { pod, port } => {
                command.extend(
                    [
                        "--user-agent",
                        "kube-probe/1.31",
                        "--header",
                        &format!("Original-Tcp-Port: {port}"),
                    ]
                    .map(str::to_owned),
                );
                format!(
                    "http://{}:{HEALTHCHECK_PORT}{HEALTHCHECK_PATH}",
                    self.pod(pod).ip
                )
            }
            Call::Mtls { pod, port } => {
                // The peer's certificate is checked against the mesh's CA but not its name:
                // a proxy names its peer by its service identity, not by the address it dials.
                command.extend(
                    [
                        "--cacert",
                        &self.certs.ca(),
                        "--cert",
                        &self.remote_pem,
                        "--insecure",
                    ]
                    .map(str::to_owned),
                );
                format!("https://{}:{port}/", self.pod(pod).ip)
            }
        };
        command.push(url);
        let program = command.remove(0);
        (program, command)
    }

    /// Waits until no proxy's log has grown for [`LOG_QUIET`]. With `logasap` a proxy writes a
    /// connection's line before the client can see the answer, and a failure's line before it
    /// closes the client's connection, so the lines are as good as there when curl exits; this
    /// covers the write racing curl's exit.
    fn wait_for_quiet_logs(&self) {
        let sizes = || -> Vec<u64> { self.sidecars.iter().map(|(_, s)| s.log_mark()).collect() };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = sizes();
        let mut quiet_since = Instant::now();
        while quiet_since.elapsed() < LOG_QUIET && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(25));
            let now = sizes();
            if now != last {
                last = now;
                quiet_since = Instant::now();
            }
        }
    }

    /// A proxy's log line as an [`Outcome`] writes it (after the pod's name).
    fn describe_log(&self, line: &ProxyLog) -> String {
        match &line.event {
            ProxyEvent::Forwarded { original_dst, .. } => {
                format!("{} {}", line.frontend, self.describe_addr(*original_dst))
            }
            ProxyEvent::Failed(reason) => format!("{}: {reason}", line.frontend),
            ProxyEvent::Unparsed => format!("?: {}", line.raw),
        }
    }

    /// `addr` with a pod's IP written as the pod's name.
    fn describe_addr(&self, addr: SocketAddr) -> String {
        self.pods
            .iter()
            .find(|(_, pod)| IpAddr::V4(pod.ip) == addr.ip())
            .map_or_else(
                || addr.to_string(),
                |(name, _)| format!("{name}:{}", addr.port()),
            )
    }

    /// The pod called `name`.
    pub fn pod(&self, name: &str) -> &TestPod {
        self.pods
            .iter()
            .find(|(pod, _)| *pod == name)
            .map(|(_, pod)| pod)
            .unwrap_or_else(|| panic!("the node has no pod {name}"))
    }
}

impl Drop for Node {
    /// A pod whose mesh init container was replaced depends on the datapath, and `probe-bypass
    /// uninstall` (which the agent's guard runs) refuses while it is served. So, as a user rolls
    /// back, the pods go first: their manifests are removed, and the agent is waited for until it
    /// no longer has any such pod in its maps.
    fn drop(&mut self) {
        let Interception::Ebpf { agent: guard } = &self.interception else {
            return;
        };
        if !self.replaced {
            return;
        }
        if let Ok(entries) = fs::read_dir(&self.manifests.path) {
            for entry in entries.flatten() {
                let _ = fs::remove_file(entry.path());
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            let served = guard.agent().get("/metrics").is_none_or(|(_, body)| {
                body.lines().any(|line| {
                    line.starts_with("probe_bypass_datapath_pod{")
                        && line.contains("replaced_mesh_init=\"true\"")
                        && line.ends_with(" 1")
                })
            });
            if !served {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        eprintln!("the agent still serves pods whose mesh init was replaced after 10 s");
    }
}

impl MeshSpec {
    /// The outbound destinations this pod's traffic skips the proxy for, as CIDRs.
    fn outbound_cidrs(&self, pods: &[(&'static str, TestPod)]) -> Vec<String> {
        self.outbound_pod_exclusions
            .iter()
            .map(|excluded| {
                let (_, pod) = pods
                    .iter()
                    .find(|(name, _)| name == excluded)
                    .unwrap_or_else(|| panic!("outbound exclusion of unknown pod {excluded}"));
                format!("{}/32", pod.ip)
            })
            .collect()
    }

    /// The pod's mesh annotations, as FSM's injector reads them: comma lists, left out when empty.
    fn annotations(&self, outbound_cidrs: &[String]) -> Vec<(String, String)> {
        let prefix = self.annotation_prefix;
        [
            (
                "inbound-port-exclusion-list",
                comma_list(self.inbound_port_exclusions),
            ),
            (
                "outbound-port-exclusion-list",
                comma_list(self.outbound_port_exclusions),
            ),
            ("outbound-ip-range-exclusion-list", outbound_cidrs.join(",")),
        ]
        .into_iter()
        .filter(|(_, value)| !value.is_empty())
        .map(|(name, value)| (format!("{prefix}{name}"), value))
        .collect()
    }
}

/// `program` and `args` as one would type them (arguments with anything unusual quoted).
fn shell_words(program: &str, args: &[String]) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "-_./:=,".contains(c);
    let mut words = vec![program.to_owned()];
    words.extend(args.iter().map(|arg| {
        if !arg.is_empty() && arg.chars().all(plain) {
            arg.clone()
        } else {
            format!("{arg:?}")
        }
    }));
    words.join(" ")
}

/// The sandbox of `spec`'s pod, made through CRI on `node`, as a test pod; its containers start
/// later, the mesh's init container first when `mode` installs the mesh's rules.
fn sandbox(node: &mut CriNode, spec: &PodSpec, mode: Mode) -> (TestPod, CriPod) {
    let name = spec.name;
    let mut cri_spec = crate::cri::PodSpec::new(
        &format!("pod-{}", name.to_lowercase()),
        CgroupDriver::Cgroupfs,
    );
    cri_spec.privileged_later = mode.installs_mesh_rules()
        && spec
            .mesh
            .as_ref()
            .is_some_and(|mesh| injected::Mesh::of(mesh).init_container_is_privileged());
    let made = node.run_pod(&cri_spec);
    let IpAddr::V4(ip) = made.ip else {
        panic!("the CNI gave {name} an IPv6 address: {}", made.ip)
    };
    let pod = TestPod::sandbox(node.pause_pid(&made), ip, &node.containerd().bridge);
    (pod, made)
}

/// Starts the app container of `sandbox` (`pod`'s namespace), `pb-app` answering
/// `app <pod>:<port>` on every port of `spec`, and waits until it listens.
fn start_app_container(node: &mut CriNode, sandbox: &mut CriPod, pod: &TestPod, spec: &PodSpec) {
    let mut app = Container::app("app", spec.app_ports);
    app.args[0] = format!("app {}", spec.name);
    node.add_container(sandbox, &app);
    assert!(
        pod.wait_until_listening(spec.app_ports, Duration::from_secs(10)),
        "the app container of {} does not listen:\n{}",
        spec.name,
        sandbox.log("app")
    );
}

/// Runs the mesh's init container in `sandbox` (`pod`'s namespace) as the mesh's injector writes
/// it for this pod, from [`images::MESH_INIT`]: its command, its script with the pod's exclusions
/// (the ranges of the pods among `pods` it excludes), its user and capabilities. It must succeed
/// and leave the outbound chain ending in its catch-all. Returns the container's name.
fn run_mesh_init_container(
    node: &mut CriNode,
    sandbox: &mut CriPod,
    pod: &TestPod,
    spec: &PodSpec,
    mesh: &MeshSpec,
    pods: &[(&'static str, TestPod)],
) -> &'static str {
    let kind = injected::Mesh::of(mesh);
    let injected = injected::injector_output(
        &sandbox.spec.name,
        pod,
        spec.app_ports,
        mesh,
        &mesh.outbound_cidrs(pods),
    );
    let name = kind.init_container();
    let mut container = Container::from_manifest(&injected::init_container(&injected, name));
    container.image = crate::images::MESH_INIT.to_owned();
    let code = node.run_init_container(sandbox, &container);
    assert_eq!(
        code,
        0,
        "the init container {name} of {}:\n{}",
        spec.name,
        sandbox.log(name)
    );
    let chains = kind.chains();
    let outbound = outbound_chain(pod, chains);
    assert_eq!(
        outbound.last(),
        Some(&format!(
            "-A {chains}_PROXY_OUTBOUND -j {chains}_PROXY_OUT_REDIRECT"
        )),
        "the outbound chain in {} must end in its catch-all: {outbound:#?}",
        spec.name
    );
    name
}

/// Each pod's apps, started in its namespace: `app <pod>:<port>` on every port of its spec.
fn start_apps(
    specs: &[PodSpec],
    pods: &[(&'static str, TestPod)],
) -> Vec<(&'static str, u16, App)> {
    specs
        .iter()
        .zip(pods)
        .flat_map(|(spec, (name, pod))| {
            spec.app_ports.iter().map(move |&port| {
                let addr = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), port);
                (
                    *name,
                    port,
                    pod.serve_http(addr, &format!("app {name}:{port}")),
                )
            })
        })
        .collect()
}

/// Runs init container `container` of `manifest` in `pod` to its end; it must succeed.
fn run_init_container(manifest: &str, container: &str, pod: &TestPod, cgroup: &TestCgroup) {
    let command = injected::container_command(manifest, container, pod, cgroup, NODE, &[]);
    let output = run_bounded(command, Duration::from_secs(10));
    assert!(
        output.status.success(),
        "init container {container} failed in {} ({}): {}",
        pod.netns_name,
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Runs the validation init container of `manifest` in `pod` to its end, with `extra_args`.
fn run_validation(
    manifest: &str,
    pod: &TestPod,
    cgroup: &TestCgroup,
    extra_args: &[&str],
) -> Output {
    let command = injected::container_command(
        manifest,
        VALIDATION_CONTAINER_NAME,
        pod,
        cgroup,
        NODE,
        extra_args,
    );
    // Its own bound is at most its default, 20 s.
    run_bounded(command, Duration::from_secs(20) + VALIDATION_SLACK)
}

/// Pod-to-pod traffic goes through the host; a host that does not forward it (a `FORWARD` chain
/// that drops, say) would make every cross-pod scenario fail for a reason that is not the mesh's.
/// Checked once, before any interception, from each pod to the next.
fn assert_pods_reach_each_other(specs: &[PodSpec], pods: &[(&'static str, TestPod)]) {
    for (i, (from, pod)) in pods.iter().enumerate() {
        let next = (i + 1) % pods.len();
        let (to, peer) = &pods[next];
        if let Some(&port) = specs[next].app_ports.first() {
            assert_app_answers(&format!("pod {from}"), pod, to, peer, port);
        }
    }
}

/// Traffic from the other node's client pod must reach this node's pods through the veths before
/// any interception, or the cross-node scenarios would fail for a reason that is not the mesh's.
fn assert_other_node_reaches_the_pods(
    other: &OtherNode,
    specs: &[PodSpec],
    pods: &[(&'static str, TestPod)],
) {
    for (spec, (name, pod)) in specs.iter().zip(pods) {
        if let Some(&port) = spec.app_ports.first() {
            assert_app_answers("the other node's pod", &other.pod, name, pod, port);
        }
    }
}

/// Asserts that `caller` (described as `who`) gets the answer of pod `name`'s app on `port`.
fn assert_app_answers(who: &str, caller: &TestPod, name: &str, pod: &TestPod, port: u16) {
    let url = format!("http://{}:{port}/", pod.ip);
    let mut curl = CURL.to_vec();
    curl.push(&url);
    assert_eq!(
        caller.exec(&curl),
        format!("app {name}:{port}"),
        "{who} cannot reach pod {name}: is forwarding between veths blocked?"
    );
}

/// What the caller saw, from curl's exit status and output (the body, then the status code on a
/// line of its own).
fn answered(call: Call, output: &Output) -> String {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let Some(code) = output.status.code() else {
        return format!("error: curl killed ({})", output.status);
    };
    if code != 0 {
        return format!("error: {}", curl_error_class(code, &stderr));
    }
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", &stdout));
    match call {
        _ if body.starts_with("app ") && status == "200" => body.to_owned(),
        Call::Healthcheck { .. } => format!("healthcheck {status}"),
        Call::Http { .. } | Call::Mtls { .. } => format!("HTTP {status} {body}"),
    }
}

/// The kind of failure behind curl's exit `code`, in the words a user would use.
fn curl_error_class(code: i32, stderr: &str) -> String {
    match code {
        7 if stderr.contains("refused") => "connection refused".to_owned(),
        7 => "could not connect".to_owned(),
        28 => "timeout".to_owned(),
        52 => "empty reply".to_owned(),
        56 if stderr.contains("reset") => "connection reset".to_owned(),
        56 => "receive failure".to_owned(),
        _ => format!("curl exit {code}: {}", stderr.trim()),
    }
}

/// Loads the mesh's rules into `pod`'s namespace as FSM's init container does, with the pod's
/// exclusions added the way FSM adds them ([`fsm_rules`]).
fn install_fsm_rules(pod: &TestPod, mesh: &MeshSpec, outbound_cidrs: &[String]) {
    load_iptables(
        pod,
        &fsm_rules(
            mesh.inbound_port_exclusions,
            outbound_cidrs,
            mesh.outbound_port_exclusions,
        ),
    );
    let outbound = outbound_chain(pod, "FSM");
    assert_eq!(
        outbound.last().map(String::as_str),
        Some(OUTBOUND_CATCH_ALL),
        "the outbound chain in {} must end in its catch-all: {outbound:#?}",
        pod.netns_name
    );
}

/// The rules of `<chains>_PROXY_OUTBOUND` (`FSM`, `OSM`) in `pod`, as `iptables -S` writes them.
fn outbound_chain(pod: &TestPod, chains: &str) -> Vec<String> {
    let chain = format!("{chains}_PROXY_OUTBOUND");
    pod.exec(&["iptables", "-t", "nat", "-S", &chain])
        .lines()
        .filter(|line| line.starts_with("-A "))
        .map(str::to_owned)
        .collect()
}
