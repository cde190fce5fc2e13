//! A one-node Kubernetes cluster of the tests' own: upstream etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler, kubelet and kube-proxy, built from their Go modules
//! (`upstream/`, by `cargo xtask setup`), run as host processes on the tests' containerd.
//!
//! Everything it makes is its own and goes when it stops:
//! - its directory: the certificates of a CA of its own (one identity per component, as the
//!   default RBAC bindings expect), a kubeconfig per component, etcd's data, the kubelet's root
//!   and pod logs, containerd's root, state and socket;
//! - addresses from a block of the tests' range (198.18.0.0/15), held as a test process holds
//!   its block: the node's address on `lo`, the pods' /24 on the CNI bridge, the Services' /24
//!   routed to `lo` (so that a connection kube-proxy did not rewrite goes nowhere);
//! - a cgroup subtree, `probe-bypass-cluster-<pid>`, in every cgroup hierarchy: every process of
//!   the node runs below it (`node/<component>`), the kubelet's `cgroupRoot` is it (so every pod,
//!   hostNetwork pods included, is in `kubepods` below it), and the tests' callers run in
//!   `callers/`. The agent's DaemonSet attaches its programs there, never at the machine's root;
//! - the kernel settings the kubelet, kube-proxy and the CNI bridge change, restored;
//! - kube-proxy's and the kubelet's iptables chains, removed.
//!
//! The control plane's components each run in a process group of their own, so that a terminal's
//! Ctrl-C reaches the process that owns the cluster (which then tears it down in order) and not
//! each component on its own. Only one cluster runs on a machine at a time: its ports are the
//! usual ones, and the owner holds a lock for as long as anything of it is left.
//!
//! Tests share one cluster per test binary ([`shared`]), run by the `probe-bypass-cluster` binary
//! (`tests/support/bin/cluster.rs`): it tears the cluster down when the test process closes its
//! end of a pipe, which the kernel does however that process ends. `cargo xtask cluster up|down`
//! runs the same binary for a person.

use std::{
    fs,
    io::{BufRead as _, BufReader, ErrorKind, Write as _},
    net::Ipv4Addr,
    os::{
        linux::net::SocketAddrExt as _,
        unix::{
            net::{SocketAddr as UnixSocketAddr, UnixListener},
            process::CommandExt as _,
        },
    },
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Output, Stdio},
    sync::{Mutex, OnceLock},
    thread,
    time::{Duration, Instant},
};

use base64::{Engine as _, prelude::BASE64_STANDARD};
use probe_bypass::datapath::cgroup2_mount;
use serde_json::Value;

use crate::{
    cgroup::command_in_all,
    containerd::{self, Containerd, RUNC, unmount_under},
    cri::{in_every_hierarchy, remove_tree},
    images,
    pod::AddressBlock,
    sidecar::{Certificates, TempDir},
};

/// The node's name: the kubelet's `--hostname-override`, its certificate's identity.
pub const NODE: &str = "pb-node";

/// The API server's port on the node's address.
pub const API_PORT: u16 = 6443;

/// How long the cluster may take to come up from built binaries.
const READY_WITHIN: Duration = Duration::from_secs(120);

/// How long a second cluster waits for the first to finish tearing down.
const LOCK_WITHIN: Duration = Duration::from_secs(300);

/// How long the certificates are valid: a person's cluster (`cargo xtask cluster up`) may stay up
/// for days.
const CERTIFICATE_DAYS: u32 = 30;

/// What the supervisor binary is called, in the target directory's profile folder.
pub const SUPERVISOR: &str = "probe-bypass-cluster";

/// The kernel settings the kubelet sets at start (`vm.overcommit_memory`, `vm.panic_on_oom`,
/// `kernel.panic`, `kernel.panic_on_oops`, the root user's key quotas), and those kube-proxy and
/// the CNI bridge plugin set: each is read before the node starts and written back after.
const SYSCTLS: [&str; 9] = [
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
];

/// The binaries `cargo xtask setup` builds from the wrapper modules in `upstream/`.
pub struct Binaries {
    kubernetes: PathBuf,
    etcd: PathBuf,
}

impl Binaries {
    /// Finds them where setup builds them: `<cache>/kubernetes/<version>/bin` and
    /// `<cache>/etcd/<version>/bin`, the versions those modules require, the cache
    /// `$PROBE_BYPASS_UPSTREAM_CACHE` or `/var/cache/probe-bypass`.
    pub fn find() -> Result<Self, String> {
        let cache = std::env::var_os("PROBE_BYPASS_UPSTREAM_CACHE")
            .map_or_else(|| PathBuf::from("/var/cache/probe-bypass"), PathBuf::from);
        let upstream = upstream_dir();
        let kubernetes_version =
            required_version(&upstream.join("kubernetes/go.mod"), "k8s.io/kubernetes")?;
        let etcd_version =
            required_version(&upstream.join("etcd/go.mod"), "go.etcd.io/etcd/server/v3")?;
        let binaries = Self {
            kubernetes: cache
                .join("kubernetes")
                .join(kubernetes_version)
                .join("bin"),
            etcd: cache.join("etcd").join(etcd_version).join("bin"),
        };
        let needed = [
            "kube-apiserver",
            "kube-controller-manager",
            "kube-scheduler",
            "kubelet",
            "kube-proxy",
            "kubectl",
        ]
        .map(|name| binaries.kubernetes(name));
        match needed
            .iter()
            .chain([&binaries.etcd()])
            .find(|path| !path.is_file())
        {
            Some(path) => Err(format!(
                "{} is not built: `cargo xtask setup` builds Kubernetes and etcd from their Go \
                 modules (Go 1.24 or later)",
                path.display()
            )),
            None => Ok(binaries),
        }
    }

    /// The Kubernetes program `name`.
    pub fn kubernetes(&self, name: &str) -> PathBuf {
        self.kubernetes.join(name)
    }

    pub fn etcd(&self) -> PathBuf {
        self.etcd.join("etcd")
    }

    pub fn kubectl(&self) -> PathBuf {
        self.kubernetes("kubectl")
    }
}

/// The Kubernetes version the cluster runs: the one `upstream/kubernetes/go.mod` pins.
pub fn kubernetes_version() -> String {
    required_version(
        &upstream_dir().join("kubernetes/go.mod"),
        "k8s.io/kubernetes",
    )
    .unwrap_or_else(|reason| panic!("{reason}"))
}

/// The repository's wrapper Go modules of the upstream programs.
fn upstream_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../upstream")
}

/// The version of `module` that the Go module at `go_mod` requires.
fn required_version(go_mod: &Path, module: &str) -> Result<String, String> {
    let text = fs::read_to_string(go_mod)
        .map_err(|error| format!("read {}: {error}", go_mod.display()))?;
    text.lines()
        .map(|line| line.trim().trim_start_matches("require").trim())
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(module)).then(|| words.next().map(str::to_owned))?
        })
        .ok_or_else(|| format!("{} requires no {module}", go_mod.display()))
}

/// What the machine lacks to run the cluster, if anything: root, containerd and the CNI
/// plugins, the test images, the upstream binaries, the supervisor binary.
pub fn missing() -> Option<String> {
    if let Some(reason) = crate::privilege::missing_privileges() {
        return Some(reason);
    }
    if let Some(reason) = containerd::missing().or_else(images::missing) {
        return Some(reason);
    }
    if let Err(reason) = Binaries::find() {
        return Some(reason);
    }
    let supervisor = supervisor_bin();
    (!supervisor.is_file()).then(|| {
        format!(
            "{} is not built: `cargo xtask test` builds it, or `cargo build --package \
             probe-bypass-testing --bin {SUPERVISOR}`",
            supervisor.display()
        )
    })
}

/// The supervisor binary, built beside the running test.
pub fn supervisor_bin() -> PathBuf {
    images::profile_dir().join(SUPERVISOR)
}

/// Where the cluster is, as its supervisor reports it once the node is Ready.
#[derive(Clone, Debug)]
pub struct Info {
    /// The cluster's own directory.
    pub dir: PathBuf,
    /// The administrator's kubeconfig (`system:masters`).
    pub kubeconfig: PathBuf,
    /// `kubectl`, of the cluster's version.
    pub kubectl: PathBuf,
    /// The node's address: the API server's, the kubelet's, every hostNetwork pod's.
    pub node_ip: Ipv4Addr,
    /// The pods' /24 on the CNI bridge.
    pub pod_subnet: String,
    /// The cgroup subtree of the node in the v2 hierarchy, where the agent attaches.
    pub cgroup: PathBuf,
    /// The cgroup v2 directory the tests' callers run in, below [`Self::cgroup`].
    pub callers: PathBuf,
    /// The stand-in for the node's `/sys/fs/bpf`: a shared mount that the DaemonSet's init
    /// container mounts bpffs on.
    pub bpffs: PathBuf,
    /// The CA every component trusts, and its key, to issue the webhook's certificate.
    pub ca: PathBuf,
    pub ca_key: PathBuf,
}

impl Info {
    fn to_json(&self) -> Value {
        serde_json::json!({
            "dir": self.dir,
            "kubeconfig": self.kubeconfig,
            "kubectl": self.kubectl,
            "node_ip": self.node_ip.to_string(),
            "pod_subnet": self.pod_subnet,
            "cgroup": self.cgroup,
            "callers": self.callers,
            "bpffs": self.bpffs,
            "ca": self.ca,
            "ca_key": self.ca_key,
        })
    }

    fn from_json(value: &Value) -> Self {
        let path = |key: &str| {
            PathBuf::from(
                value[key]
                    .as_str()
                    .unwrap_or_else(|| panic!("no {key} in {value}")),
            )
        };
        Self {
            dir: path("dir"),
            kubeconfig: path("kubeconfig"),
            kubectl: path("kubectl"),
            node_ip: value["node_ip"]
                .as_str()
                .and_then(|ip| ip.parse().ok())
                .unwrap_or_else(|| panic!("no node_ip in {value}")),
            pod_subnet: value["pod_subnet"].as_str().unwrap_or_default().to_owned(),
            cgroup: path("cgroup"),
            callers: path("callers"),
            bpffs: path("bpffs"),
            ca: path("ca"),
            ca_key: path("ca_key"),
        }
    }

    /// Runs `kubectl` as the cluster's administrator.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .output()
            .unwrap_or_else(|error| panic!("run {}: {error}", self.kubectl.display()))
    }

    /// [`Self::kubectl`], which must succeed: what it printed on stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let output = self.kubectl(args);
        assert!(
            output.status.success(),
            "kubectl {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// `kubectl get ARGS -o json`, parsed.
    pub fn get_json(&self, args: &[&str]) -> Value {
        let mut all = vec!["get"];
        all.extend_from_slice(args);
        all.extend(["-o", "json"]);
        let text = self.kubectl_ok(&all);
        serde_json::from_str(&text).unwrap_or_else(|error| panic!("parse {text}: {error}"))
    }

    /// `kubectl apply -f -` of `manifest` (YAML or JSON).
    pub fn apply(&self, manifest: &str) -> String {
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(["apply", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("run {}: {error}", self.kubectl.display()));
        child
            .stdin
            .take()
            .expect("kubectl's stdin")
            .write_all(manifest.as_bytes())
            .expect("write the manifest to kubectl");
        let output = child.wait_with_output().expect("wait for kubectl");
        assert!(
            output.status.success(),
            "kubectl apply:\n{manifest}\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Waits for `kubectl rollout status` of `workload` (`daemonset/NAME`, `deployment/NAME`) in
    /// `namespace` to report it rolled out: its pods up to date and ready.
    pub fn wait_for_rollout(&self, namespace: &str, workload: &str) {
        self.kubectl_ok(&[
            "--namespace",
            namespace,
            "rollout",
            "status",
            workload,
            "--timeout=120s",
        ]);
    }

    /// Polls `done` until it gives `Some`, or panics naming `what` and the last state seen.
    pub fn wait_for<T>(
        &self,
        what: &str,
        within: Duration,
        mut done: impl FnMut() -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            match done() {
                Ok(value) => return value,
                Err(last) if Instant::now() >= deadline => {
                    panic!("{what}: not within {within:?}; last seen: {last}")
                }
                Err(_) => thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// A command that runs `program` with `args` as one of the tests' callers: in the cgroup
    /// below the node's subtree that the agent's programs see, in the host network namespace.
    pub fn caller(&self, program: &str, args: &[&str]) -> Command {
        crate::cgroup::command_in(&self.callers, program, args)
    }
}

/// The cluster shared by the tests of one test binary, started at the first call; `None`, after
/// saying why, where it cannot run (and a panic where CI is set: see [`crate::privilege::skip`]).
pub fn shared() -> Option<&'static Info> {
    static SHARED: OnceLock<Option<Supervised>> = OnceLock::new();
    let thread = thread::current();
    let test = thread.name().unwrap_or("test").to_owned();
    SHARED
        .get_or_init(|| match missing() {
            Some(reason) => {
                crate::privilege::skip(&test, &format!("no test cluster: {reason}"));
                None
            }
            None => Some(Supervised::start()),
        })
        .as_ref()
        .map(|supervised| &supervised.info)
}

/// The supervisor process of [`shared`] and the pipe whose closing tells it to tear down.
struct Supervised {
    info: Info,
}

/// The supervisor's process and its stdin: dropped at the test process's exit (see
/// [`wait_for_teardown`]), or closed by the kernel however it ends.
static SUPERVISOR_PROCESS: Mutex<Option<(Child, ChildStdin)>> = Mutex::new(None);

impl Supervised {
    fn start() -> Self {
        let supervisor = supervisor_bin();
        let mut child = Command::new(&supervisor)
            .arg("--until-stdin-closes")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("start {}: {error}", supervisor.display()));
        let stdin = child.stdin.take().expect("the supervisor's stdin");
        let stdout = child.stdout.take().expect("the supervisor's stdout");
        let mut lines = BufReader::new(stdout).lines();
        let ready = lines
            .by_ref()
            .map_while(Result::ok)
            .find_map(|line| line.strip_prefix("ready ").map(str::to_owned));
        let Some(ready) = ready else {
            let status = child.wait().expect("the supervisor's exit");
            panic!("the test cluster did not start ({status}); its output is above");
        };
        // What the supervisor says from now on (its teardown) goes to the test's output.
        thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                eprintln!("{line}");
            }
        });
        let info: Value = serde_json::from_str(&ready)
            .unwrap_or_else(|error| panic!("the supervisor's ready line {ready}: {error}"));
        *SUPERVISOR_PROCESS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((child, stdin));
        // SAFETY: `wait_for_teardown` is an `extern "C" fn()` that does not unwind.
        unsafe {
            libc::atexit(wait_for_teardown);
        }
        Self {
            info: Info::from_json(&info),
        }
    }
}

/// At the test process's exit: closes the supervisor's stdin and waits for it to tear the
/// cluster down, so that the next test binary (or CI's end) finds nothing left.
extern "C" fn wait_for_teardown() {
    let taken = SUPERVISOR_PROCESS
        .lock()
        .map(|mut held| held.take())
        .unwrap_or(None);
    if let Some((mut child, stdin)) = taken {
        drop(stdin);
        let _ = child.wait();
    }
}

/// The cgroup subtree of the node, in every hierarchy.
struct NodeCgroups {
    /// `probe-bypass-cluster-<pid>`.
    name: String,
    /// Every cgroup hierarchy's mount point, the v2 one first.
    hierarchies: Vec<PathBuf>,
}

impl NodeCgroups {
    fn create() -> Self {
        let v2 = cgroup2_mount().unwrap_or_else(|error| panic!("the cgroup v2 mount: {error}"));
        // Every hierarchy's root, the v2 one first: `dirs` answers it first.
        let mut hierarchies = in_every_hierarchy(&v2);
        hierarchies.sort_by_key(|hierarchy| *hierarchy != v2);
        let cgroups = Self {
            name: format!("probe-bypass-cluster-{}", std::process::id()),
            hierarchies,
        };
        cgroups.dirs("");
        cgroups
    }

    /// `sub` below the subtree in every hierarchy, made where missing. A new cpuset cgroup (v1)
    /// takes no process until it has CPUs and memory nodes: it gets its parent's.
    fn dirs(&self, sub: &str) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        for hierarchy in &self.hierarchies {
            let mut dir = hierarchy.join(&self.name);
            for part in Path::new(sub).components() {
                dir = dir.join(part);
            }
            let mut made = hierarchy.clone();
            let relative = dir.strip_prefix(hierarchy).expect("below the hierarchy");
            for part in relative.components() {
                let parent = made.clone();
                made = made.join(part);
                match fs::create_dir(&made) {
                    Ok(()) => inherit_cpuset(&parent, &made),
                    Err(error) if error.kind() == ErrorKind::AlreadyExists => {}
                    Err(error) => panic!("create {}: {error}", made.display()),
                }
            }
            dirs.push(dir);
        }
        dirs
    }

    /// The subtree's path from each hierarchy's root: the kubelet's `cgroupRoot`.
    fn relative(&self) -> String {
        format!("/{}", self.name)
    }

    /// Kills every process left in the subtree, in every hierarchy, and removes it.
    fn remove(&self) {
        // A v1 hierarchy has no cgroup.kill: its members are killed one by one first.
        for hierarchy in &self.hierarchies {
            kill_members(&hierarchy.join(&self.name));
        }
        for hierarchy in &self.hierarchies {
            remove_tree(&hierarchy.join(&self.name));
        }
    }
}

/// Gives a new cpuset cgroup its parent's CPUs and memory nodes, as a v1 cpuset needs before it
/// takes a process; nothing elsewhere.
fn inherit_cpuset(parent: &Path, child: &Path) {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        if let Ok(value) = fs::read_to_string(parent.join(file))
            && fs::read_to_string(child.join(file)).is_ok_and(|own| own.trim().is_empty())
        {
            let _ = fs::write(child.join(file), value.trim());
        }
    }
}

/// SIGKILLs the processes in every cgroup below `dir` (a v1 hierarchy has no `cgroup.kill`).
fn kill_members(dir: &Path) {
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs
            .lines()
            .filter_map(|pid| pid.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            kill_members(&entry.path());
        }
    }
}

/// A process of the node, stopped with SIGTERM (then SIGKILL) on teardown.
struct Component {
    name: &'static str,
    child: Child,
    log: PathBuf,
    /// What started it, to start it again.
    program: PathBuf,
    args: Vec<String>,
}

/// The running cluster. Dropping it tears everything down, in the reverse order of its start;
/// a start that fails half way tears down what it made.
pub struct Cluster {
    pub info: Info,
    binaries: Binaries,
    /// Held for as long as anything of the cluster is left (see the module's doc).
    _lock: Option<UnixListener>,
    _block: Option<AddressBlock>,
    dir: Option<TempDir>,
    certs: Option<Certificates>,
    cgroups: Option<NodeCgroups>,
    /// The node's address on `lo`, and the Services' route, once added.
    address_added: bool,
    route_added: Option<String>,
    /// The kernel settings as they were before the node started.
    sysctls: Vec<(String, String)>,
    bpffs_mounted: bool,
    containerd: Option<Containerd>,
    /// etcd and the control plane, the kubelet, kube-proxy: stopped last to first.
    components: Vec<Component>,
}

impl Cluster {
    /// Starts the cluster in `dir` (a temp dir of its own when `None`) and returns it once the
    /// node is Ready, the `default` service account exists and `kube-root-ca.crt` is published.
    pub fn start(dir: Option<PathBuf>) -> Self {
        let binaries = Binaries::find().unwrap_or_else(|reason| panic!("{reason}"));
        let lock = hold_lock();
        let (dir_guard, dir) = match dir {
            Some(dir) => {
                fs::create_dir_all(&dir)
                    .unwrap_or_else(|error| panic!("create {}: {error}", dir.display()));
                (None, dir)
            }
            None => {
                let guard = TempDir::new("cluster");
                let path = guard.path.clone();
                (Some(guard), path)
            }
        };
        let block = AddressBlock::for_runtime();
        let node_ip = block.nth_24(1).hosts().next().expect("the node's address");
        let services = block.nth_24(2);
        let kubectl = binaries.kubectl();
        let mut cluster = Self {
            info: Info {
                kubeconfig: dir.join("admin.kubeconfig"),
                kubectl,
                node_ip,
                pod_subnet: String::new(),
                cgroup: PathBuf::new(),
                callers: PathBuf::new(),
                bpffs: dir.join("bpffs"),
                ca: PathBuf::new(),
                ca_key: PathBuf::new(),
                dir,
            },
            binaries,
            _lock: Some(lock),
            _block: Some(block),
            dir: dir_guard,
            certs: None,
            cgroups: None,
            address_added: false,
            route_added: None,
            sysctls: Vec::new(),
            bpffs_mounted: false,
            containerd: None,
            components: Vec::new(),
        };
        cluster.sysctls = SYSCTLS
            .iter()
            .filter_map(|key| {
                let value = fs::read_to_string(Path::new("/proc/sys").join(key)).ok()?;
                Some(((*key).to_owned(), value.trim().to_owned()))
            })
            .collect();

        let cgroups = NodeCgroups::create();
        cluster.info.cgroup = cgroups.dirs("")[0].clone();
        cluster.info.callers = cgroups.dirs("callers")[0].clone();
        cluster.cgroups = Some(cgroups);

        cluster.network(services);
        cluster.pki(services);
        cluster.bpffs();

        let containerd = Containerd::start_in(
            Path::new(RUNC),
            &[],
            cluster.cgroups().dirs("node/containerd"),
        );
        containerd.import_images();
        cluster.info.pod_subnet.clone_from(&containerd.subnet);
        cluster.containerd = Some(containerd);

        cluster.start_etcd();
        cluster.start_api_server(services);
        cluster.start_controllers();
        cluster.start_kubelet();
        cluster.start_kube_proxy();
        cluster.wait_until_ready();
        cluster
    }

    fn cgroups(&self) -> &NodeCgroups {
        self.cgroups.as_ref().expect("the node's cgroups")
    }

    fn path(&self, sub: &str) -> PathBuf {
        self.info.dir.join(sub)
    }

    /// The node's address on `lo` (no dummy device: these kernels lack it), and the Services'
    /// /24 routed to `lo`.
    fn network(&mut self, services: ipnet::Ipv4Net) {
        let node = format!("{}/32", self.info.node_ip);
        run("ip", &["address", "add", &node, "dev", "lo"]);
        self.address_added = true;
        let services = services.to_string();
        run("ip", &["route", "add", &services, "dev", "lo"]);
        self.route_added = Some(services);
    }

    /// The CA, a certificate per component (its identity in the subject, as the default RBAC
    /// bindings and the Node authorizer read it), the service accounts' signing key, and a
    /// kubeconfig per client.
    fn pki(&mut self, services: ipnet::Ipv4Net) {
        let certs = Certificates::valid_for(CERTIFICATE_DAYS);
        let kubernetes_service = services
            .hosts()
            .next()
            .expect("the kubernetes Service's IP");
        let node_ip = self.info.node_ip.to_string();
        let serving_names = [
            "DNS:kubernetes".to_owned(),
            "DNS:kubernetes.default".to_owned(),
            "DNS:kubernetes.default.svc".to_owned(),
            "DNS:kubernetes.default.svc.cluster.local".to_owned(),
            "DNS:localhost".to_owned(),
            format!("DNS:{NODE}"),
            "IP:127.0.0.1".to_owned(),
            format!("IP:{node_ip}"),
            format!("IP:{kubernetes_service}"),
        ];
        let serving_names: Vec<&str> = serving_names.iter().map(String::as_str).collect();
        certs.issue_to(
            "apiserver",
            "/CN=kube-apiserver",
            "serverAuth",
            &serving_names,
        );
        certs.issue_to(
            "kubelet-serving",
            &format!("/CN={NODE}"),
            "serverAuth",
            &[&format!("DNS:{NODE}"), &format!("IP:{node_ip}")],
        );
        let clients = [
            ("admin", "/O=system:masters/CN=probe-bypass-admin"),
            (
                "apiserver-kubelet",
                "/O=system:masters/CN=kube-apiserver-kubelet-client",
            ),
            ("controller-manager", "/CN=system:kube-controller-manager"),
            ("scheduler", "/CN=system:kube-scheduler"),
            ("kubelet", &format!("/O=system:nodes/CN=system:node:{NODE}")),
            ("kube-proxy", "/CN=system:kube-proxy"),
        ];
        for (name, subject) in clients {
            let (cert, key) = certs.issue_to(name, subject, "clientAuth", &[]);
            if name != "apiserver-kubelet" {
                self.kubeconfig(name, &certs.ca(), &cert, &key);
            }
        }
        // The service accounts' tokens are signed with an EC key (ES256).
        let sa_key = self.path("sa.key");
        let sa_pub = self.path("sa.pub");
        let sa_key_text = sa_key.display().to_string();
        run(
            "openssl",
            &[
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &sa_key_text,
            ],
        );
        run(
            "openssl",
            &[
                "ec",
                "-in",
                &sa_key_text,
                "-pubout",
                "-out",
                &sa_pub.display().to_string(),
            ],
        );
        self.info.ca = PathBuf::from(certs.ca());
        self.info.ca_key = self.info.ca.with_file_name("ca.key");
        self.certs = Some(certs);
    }

    /// The certificate and key files of `name`, as [`Certificates::issue_to`] wrote them.
    fn cert(&self, name: &str) -> (String, String) {
        let dir = self.info.ca.parent().expect("the certificates' dir");
        (
            dir.join(format!("{name}.crt")).display().to_string(),
            dir.join(format!("{name}.key")).display().to_string(),
        )
    }

    /// Writes a component's configuration `config` to `name` in the cluster's directory, and
    /// returns its path.
    fn write_config(&self, name: &str, config: &Value) -> PathBuf {
        let path = self.path(name);
        fs::write(&path, config.to_string())
            .unwrap_or_else(|error| panic!("write {name}: {error}"));
        path
    }

    /// Writes `<name>.kubeconfig` (the admin's at [`Info::kubeconfig`]), naming the API server
    /// on the node's address.
    fn kubeconfig(&self, name: &str, ca: &str, cert: &str, key: &str) {
        let server = format!("https://{}:{API_PORT}", self.info.node_ip);
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "probe-bypass-test", "cluster": {
                "server": server, "certificate-authority": ca}}],
            "users": [{"name": name, "user": {
                "client-certificate": cert, "client-key": key}}],
            "contexts": [{"name": name, "context": {
                "cluster": "probe-bypass-test", "user": name}}],
            "current-context": name,
        });
        fs::write(self.path(&format!("{name}.kubeconfig")), config.to_string())
            .unwrap_or_else(|error| panic!("write {name}.kubeconfig: {error}"));
    }

    /// The node's `/sys/fs/bpf` stand-in: a directory bind-mounted on itself and made shared,
    /// so that the DaemonSet's init container's bpffs mount (Bidirectional) reaches the node.
    fn bpffs(&mut self) {
        let path = self.info.bpffs.display().to_string();
        fs::create_dir_all(&self.info.bpffs)
            .unwrap_or_else(|error| panic!("create {path}: {error}"));
        run("mount", &["--bind", &path, &path]);
        self.bpffs_mounted = true;
        run("mount", &["--make-rshared", &path]);
    }

    /// Starts `name` with `program` and `args` in its cgroup below the node's subtree, in a
    /// process group of its own, logging to `logs/<name>.log`; its pid goes to `run/<name>.pid`.
    fn spawn(&mut self, name: &'static str, program: &Path, args: &[String]) {
        let component = self.start_component(name, program, args);
        self.components.push(component);
    }

    fn start_component(&self, name: &'static str, program: &Path, args: &[String]) -> Component {
        for dir in ["logs", "run"] {
            fs::create_dir_all(self.path(dir)).expect("the cluster's dirs");
        }
        let log_path = self.path(&format!("logs/{name}.log"));
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|error| panic!("open {}: {error}", log_path.display()));
        let arg_refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let child = command_in_all(
            &self.cgroups().dirs(&format!("node/{name}")),
            &program.display().to_string(),
            &arg_refs,
        )
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("the log"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|error| panic!("start {name}: {error}"));
        fs::write(
            self.path(&format!("run/{name}.pid")),
            child.id().to_string(),
        )
        .unwrap_or_else(|error| panic!("write {name}'s pid: {error}"));
        Component {
            name,
            child,
            log: log_path,
            program: program.to_owned(),
            args: args.to_vec(),
        }
    }

    /// Starts again every component that has exited, as a node's service manager does
    /// (`Restart=always`), saying so on stderr. Returns the names of those restarted.
    pub fn restart_exited(&mut self) -> Vec<&'static str> {
        let mut restarted = Vec::new();
        for index in 0..self.components.len() {
            let exited = self.components[index].child.try_wait().ok().flatten();
            if let Some(status) = exited {
                let (name, program, args) = {
                    let old = &self.components[index];
                    (old.name, old.program.clone(), old.args.clone())
                };
                eprintln!("{name} exited ({status}); starting it again");
                self.components[index] = self.start_component(name, &program, &args);
                restarted.push(name);
            }
        }
        restarted
    }

    /// Waits until `url` answers 200 to curl, with the cluster's CA, or a component exits.
    fn wait_for_url(&mut self, what: &str, url: &str) {
        let ca = self.info.ca.display().to_string();
        let deadline = Instant::now() + READY_WITHIN;
        loop {
            self.check_components();
            let answered = Command::new("curl")
                .args([
                    "--silent",
                    "--fail",
                    "--max-time",
                    "2",
                    "--cacert",
                    &ca,
                    url,
                ])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|status| status.success());
            if answered {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not answer {url} within {READY_WITHIN:?}:\n{}",
                self.logs_tail()
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    /// Panics, with its log, if a component has exited.
    fn check_components(&mut self) {
        for component in &mut self.components {
            if let Ok(Some(status)) = component.child.try_wait() {
                panic!(
                    "{} exited ({status}):\n{}",
                    component.name,
                    tail(&component.log, 40)
                );
            }
        }
    }

    fn logs_tail(&self) -> String {
        self.components
            .iter()
            .map(|component| format!("--- {}\n{}", component.name, tail(&component.log, 15)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn start_etcd(&mut self) {
        let data = self.path("etcd").display().to_string();
        let etcd = self.binaries.etcd();
        self.spawn(
            "etcd",
            &etcd,
            &[
                format!("--data-dir={data}"),
                "--listen-client-urls=http://127.0.0.1:2379".to_owned(),
                "--advertise-client-urls=http://127.0.0.1:2379".to_owned(),
                "--listen-peer-urls=http://127.0.0.1:2380".to_owned(),
                "--initial-advertise-peer-urls=http://127.0.0.1:2380".to_owned(),
                "--initial-cluster=default=http://127.0.0.1:2380".to_owned(),
                "--listen-metrics-urls=".to_owned(),
                // A test cluster's data need not survive a power cut.
                "--unsafe-no-fsync".to_owned(),
            ],
        );
        self.wait_for_url("etcd", "http://127.0.0.1:2379/readyz");
    }

    fn start_api_server(&mut self, services: ipnet::Ipv4Net) {
        let (cert, key) = self.cert("apiserver");
        let (kubelet_cert, kubelet_key) = self.cert("apiserver-kubelet");
        let ca = self.info.ca.display().to_string();
        let node_ip = self.info.node_ip;
        let sa_key = self.path("sa.key").display().to_string();
        let sa_pub = self.path("sa.pub").display().to_string();
        let program = self.binaries.kubernetes("kube-apiserver");
        self.spawn(
            "kube-apiserver",
            &program,
            &[
                "--etcd-servers=http://127.0.0.1:2379".to_owned(),
                format!("--bind-address={node_ip}"),
                format!("--advertise-address={node_ip}"),
                format!("--secure-port={API_PORT}"),
                format!("--tls-cert-file={cert}"),
                format!("--tls-private-key-file={key}"),
                format!("--client-ca-file={ca}"),
                format!("--kubelet-client-certificate={kubelet_cert}"),
                format!("--kubelet-client-key={kubelet_key}"),
                format!("--kubelet-certificate-authority={ca}"),
                "--kubelet-preferred-address-types=InternalIP".to_owned(),
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
                format!("--service-account-key-file={sa_pub}"),
                format!("--service-account-signing-key-file={sa_key}"),
                format!("--service-cluster-ip-range={services}"),
                "--authorization-mode=Node,RBAC".to_owned(),
                "--enable-admission-plugins=NodeRestriction".to_owned(),
                // The DaemonSet's mount-bpffs init container is privileged.
                "--allow-privileged=true".to_owned(),
                // Webhooks are called at their endpoints' addresses, without a Service proxy.
                "--enable-aggregator-routing=true".to_owned(),
                "--profiling=false".to_owned(),
                "--v=2".to_owned(),
            ],
        );
        self.wait_for_url(
            "kube-apiserver",
            &format!("https://{node_ip}:{API_PORT}/readyz"),
        );
    }

    fn start_controllers(&mut self) {
        let config = self
            .path("controller-manager.kubeconfig")
            .display()
            .to_string();
        let ca = self.info.ca.display().to_string();
        let sa_key = self.path("sa.key").display().to_string();
        let program = self.binaries.kubernetes("kube-controller-manager");
        self.spawn(
            "kube-controller-manager",
            &program,
            &[
                format!("--kubeconfig={config}"),
                format!("--authentication-kubeconfig={config}"),
                format!("--authorization-kubeconfig={config}"),
                format!("--service-account-private-key-file={sa_key}"),
                format!("--root-ca-file={ca}"),
                "--use-service-account-credentials=true".to_owned(),
                "--controllers=*".to_owned(),
                "--leader-elect=false".to_owned(),
                "--bind-address=127.0.0.1".to_owned(),
                "--v=2".to_owned(),
            ],
        );
        let scheduler = self.path("scheduler.kubeconfig").display().to_string();
        let config = serde_json::json!({
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"kubeconfig": scheduler},
            "leaderElection": {"leaderElect": false},
        });
        let config_path = self.write_config("scheduler.yaml", &config);
        let program = self.binaries.kubernetes("kube-scheduler");
        self.spawn(
            "kube-scheduler",
            &program,
            &[
                format!("--config={}", config_path.display()),
                format!("--authentication-kubeconfig={scheduler}"),
                format!("--authorization-kubeconfig={scheduler}"),
                "--bind-address=127.0.0.1".to_owned(),
                "--v=2".to_owned(),
            ],
        );
    }

    fn start_kubelet(&mut self) {
        let containerd = self.containerd.as_ref().expect("containerd");
        let socket = containerd.socket().display().to_string();
        let ca = self.info.ca.display().to_string();
        let (cert, key) = self.cert("kubelet-serving");
        let resolv = if Path::new("/etc/resolv.conf").exists() {
            "/etc/resolv.conf"
        } else {
            ""
        };
        let config = serde_json::json!({
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "containerRuntimeEndpoint": format!("unix://{socket}"),
            // containerd 1.6 cannot tell the kubelet its driver (no RuntimeConfig call), and
            // this machine's PID 1 is not systemd.
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroups().relative(),
            "failSwapOn": false,
            "address": self.info.node_ip.to_string(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "tlsCertFile": cert,
            "tlsPrivateKeyFile": key,
            "authentication": {
                "anonymous": {"enabled": false},
                "webhook": {"enabled": true},
                "x509": {"clientCAFile": ca},
            },
            "authorization": {"mode": "Webhook"},
            "rotateCertificates": false,
            "serverTLSBootstrap": false,
            "staticPodPath": "",
            "resolvConf": resolv,
            "clusterDomain": "cluster.local",
            // The machine's disk is shared with everything else: evict nothing for it.
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            // The images are imported by hand and can be pulled from nowhere: never collect them.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "podLogsDirectory": self.path("pod-logs"),
            // Quick status updates: a test waits on them.
            "nodeStatusUpdateFrequency": "2s",
            "syncFrequency": "10s",
        });
        let config_path = self.write_config("kubelet.yaml", &config);
        let kubeconfig = self.path("kubelet.kubeconfig").display().to_string();
        let root = self.path("kubelet").display().to_string();
        let node_ip = self.info.node_ip.to_string();
        let program = self.binaries.kubernetes("kubelet");
        self.spawn(
            "kubelet",
            &program,
            &[
                format!("--config={}", config_path.display()),
                format!("--kubeconfig={kubeconfig}"),
                format!("--hostname-override={NODE}"),
                format!("--node-ip={node_ip}"),
                format!("--root-dir={root}"),
                format!("--cert-dir={root}/pki"),
                "--v=2".to_owned(),
            ],
        );
    }

    fn start_kube_proxy(&mut self) {
        let kubeconfig = self.path("kube-proxy.kubeconfig").display().to_string();
        let config = serde_json::json!({
            "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
            "kind": "KubeProxyConfiguration",
            "clientConnection": {"kubeconfig": kubeconfig},
            "hostnameOverride": NODE,
            "mode": "iptables",
            "clusterCIDR": self.info.pod_subnet,
            // NodePorts on localhost would take net.ipv4.conf.all.route_localnet=1.
            "iptables": {"localhostNodePorts": false},
            // No conntrack setting of the machine's is touched.
            "conntrack": {"maxPerCore": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
            "healthzBindAddress": "127.0.0.1:10256",
            "metricsBindAddress": "127.0.0.1:10249",
        });
        let config_path = self.write_config("kube-proxy.yaml", &config);
        let program = self.binaries.kubernetes("kube-proxy");
        self.spawn(
            "kube-proxy",
            &program,
            &[
                format!("--config={}", config_path.display()),
                "--v=2".to_owned(),
            ],
        );
    }

    /// Waits for the node to be Ready, the `default` service account and `kube-root-ca.crt`.
    fn wait_until_ready(&mut self) {
        let deadline = Instant::now() + READY_WITHIN;
        let checks: [(&str, &[&str]); 3] = [
            (
                "the node Ready",
                &[
                    "get",
                    "node",
                    NODE,
                    "-o",
                    "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}",
                ],
            ),
            (
                "the default service account",
                &["get", "serviceaccount", "default"],
            ),
            (
                "kube-root-ca.crt",
                &["get", "configmap", "kube-root-ca.crt"],
            ),
        ];
        for (what, args) in checks {
            loop {
                self.check_components();
                let output = self.info.kubectl(args);
                let printed = String::from_utf8_lossy(&output.stdout);
                let ready = output.status.success()
                    && (what != "the node Ready" || printed.trim() == "True");
                if ready {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: not within {READY_WITHIN:?} ({}{}):\n{}",
                    printed,
                    String::from_utf8_lossy(&output.stderr),
                    self.logs_tail()
                );
                thread::sleep(Duration::from_millis(250));
            }
        }
    }

    /// Stops one component: SIGTERM, then SIGKILL after 10 s.
    fn stop(component: &mut Component) {
        let pid =
            nix::unistd::Pid::from_raw(i32::try_from(component.child.id()).unwrap_or(i32::MAX));
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while component.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(50));
        }
        let _ = component.child.kill();
        let _ = component.child.wait();
    }

    /// Removes kube-proxy's rules (`kube-proxy --cleanup`, as upstream documents for leaving
    /// iptables mode) and the chains the kubelet adds (`KUBE-FIREWALL`, the canaries), in every
    /// table of both families.
    fn remove_iptables_chains(&self) {
        let config = self.path("kube-proxy.yaml");
        if config.exists() {
            let _ = Command::new(self.binaries.kubernetes("kube-proxy"))
                .arg(format!("--config={}", config.display()))
                .arg("--cleanup")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        for (save, tool) in [
            ("iptables-save", "iptables"),
            ("ip6tables-save", "ip6tables"),
        ] {
            let Ok(saved) = Command::new(save).output() else {
                continue;
            };
            let mut table = String::new();
            let mut chains = Vec::new();
            for line in String::from_utf8_lossy(&saved.stdout).lines() {
                if let Some(name) = line.strip_prefix('*') {
                    table = name.to_owned();
                } else if let Some(rule) = line.strip_prefix("-A ")
                    && rule.contains(" KUBE-")
                    && !rule.starts_with("KUBE-")
                {
                    // A rule of a built-in chain that jumps to one of theirs.
                    let mut args = vec!["-t", &table, "-D"];
                    args.extend(rule.split_whitespace());
                    let _ = Command::new(tool)
                        .args(&args)
                        .stderr(Stdio::null())
                        .status();
                } else if let Some(chain) = line.strip_prefix(":KUBE-") {
                    let name = chain.split_whitespace().next().unwrap_or_default();
                    chains.push((table.clone(), format!("KUBE-{name}")));
                }
            }
            for (table, chain) in &chains {
                let _ = Command::new(tool).args(["-t", table, "-F", chain]).status();
            }
            for (table, chain) in &chains {
                let _ = Command::new(tool)
                    .args(["-t", table, "-X", chain])
                    .stderr(Stdio::null())
                    .status();
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The kubelet first, so that it restarts nothing; then the pods, with the runtime.
        if let Some(index) = self.components.iter().position(|c| c.name == "kubelet") {
            let mut kubelet = self.components.remove(index);
            Self::stop(&mut kubelet);
        }
        drop(self.containerd.take());
        while let Some(mut component) = self.components.pop() {
            Self::stop(&mut component);
        }
        self.remove_iptables_chains();
        // The kubelet's mounts (its root bind-mounted on itself, the pods' volumes), the bpffs
        // stand-in and anything the DaemonSet mounted on it.
        unmount_under(&self.info.dir);
        if self.bpffs_mounted {
            let _ = nix::mount::umount2(&self.info.bpffs, nix::mount::MntFlags::MNT_DETACH);
        }
        if let Some(cgroups) = self.cgroups.take() {
            cgroups.remove();
        }
        if let Some(route) = self.route_added.take() {
            let _ = Command::new("ip")
                .args(["route", "delete", &route, "dev", "lo"])
                .status();
        }
        if self.address_added {
            let node = format!("{}/32", self.info.node_ip);
            let _ = Command::new("ip")
                .args(["address", "delete", &node, "dev", "lo"])
                .status();
        }
        for (key, value) in &self.sysctls {
            let path = Path::new("/proc/sys").join(key);
            if fs::read_to_string(&path).is_ok_and(|now| now.trim() != value) {
                let _ = fs::write(&path, value);
            }
        }
        drop(self.certs.take());
        drop(self.dir.take());
    }
}

/// Holds the machine's one cluster lock (an abstract Unix socket, released however its holder
/// ends), waiting for an earlier cluster to finish tearing down.
fn hold_lock() -> UnixListener {
    let address =
        UnixSocketAddr::from_abstract_name("probe-bypass-test-cluster").expect("an abstract name");
    let deadline = Instant::now() + LOCK_WITHIN;
    loop {
        match UnixListener::bind_addr(&address) {
            Ok(held) => return held,
            Err(error) if Instant::now() >= deadline => panic!(
                "another test cluster has run on this machine for over {LOCK_WITHIN:?} \
                 (`cargo xtask cluster down` stops a person's): {error}"
            ),
            Err(_) => thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// The last `lines` lines of the file at `path`.
fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Runs `program` with `args`, panicking with what it printed if it fails.
fn run(program: &str, args: &[&str]) {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|error| panic!("run {program}: {error}"));
    assert!(
        output.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// What the supervisor installs on the cluster before it reports it ready.
#[derive(Clone, Copy, Debug, Default)]
pub struct Installs {
    /// The agent from `deploy/` and the webhook from `deploy/webhook/`.
    pub probe_bypass: bool,
    /// The `demo` namespace's meshed pods (see [`Info::install_demo`]).
    pub demo: bool,
}

/// Runs the cluster for the supervisor binary: starts it, installs `installs`, prints `ready
/// <info as JSON>`, keeps its components running (see [`Cluster::restart_exited`]) until `stop`
/// says so, and tears it down.
pub fn supervise(dir: Option<PathBuf>, installs: Installs, stop: impl Fn() -> bool) {
    let mut cluster = Cluster::start(dir);
    if installs.probe_bypass || installs.demo {
        cluster.info.install_agent();
        cluster.info.install_webhook();
    }
    if installs.demo {
        cluster.info.install_demo();
    }
    // Once the test process that reads this is gone, nobody does: what is written is lost, and
    // the teardown must go on all the same.
    let say = |line: &str| {
        let mut stdout = std::io::stdout();
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    };
    say(&format!("ready {}", cluster.info.to_json()));
    while !stop() {
        cluster.restart_exited();
        thread::sleep(Duration::from_millis(100));
    }
    say("tearing the test cluster down");
    drop(cluster);
    say("the test cluster is torn down");
}

/// The repository's `deploy/` directory.
pub fn deploy_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy");
    fs::canonicalize(&dir).unwrap_or_else(|error| panic!("{}: {error}", dir.display()))
}

/// `to` as a path relative to `from` (both absolute): kustomize takes a base only by a relative
/// path.
fn relative_path(from: &Path, to: &Path) -> PathBuf {
    let from: Vec<_> = from.components().collect();
    let to: Vec<_> = to.components().collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut path: PathBuf = std::iter::repeat_n("..", from.len() - common).collect();
    path.extend(to[common..].iter());
    path
}

impl Info {
    /// Writes a kustomization in `<dir>/<name>` on the base `base` with `patches` (each a
    /// kustomize `patches` entry) and `extra` (more top-level fields), and applies it with
    /// `kubectl apply -k`, as a user applies an overlay of `deploy/`.
    pub fn apply_overlay(&self, name: &str, base: &Path, patches: &[Value], extra: &Value) {
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir)
            .unwrap_or_else(|error| panic!("create {}: {error}", dir.display()));
        let mut kustomization = serde_json::json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [relative_path(&dir, base)],
            "patches": patches,
        });
        if let (Some(all), Some(more)) = (kustomization.as_object_mut(), extra.as_object()) {
            all.extend(more.clone());
        }
        fs::write(dir.join("kustomization.yaml"), kustomization.to_string())
            .unwrap_or_else(|error| panic!("write {name}/kustomization.yaml: {error}"));
        self.kubectl_ok(&["apply", "-k", &dir.display().to_string()]);
    }

    /// Installs the agent from `deploy/` (`kubectl apply -k`) with what this node needs: its
    /// cgroup subtree as the agent's `--cgroup-root` (the programs attach there, never at the
    /// machine's root), the node's bpffs stand-in as the `bpffs` volume, and
    /// `PROBE_BYPASS_SERVE_HTTP_PROBES=true` (the tests' sidecar leaves 15901-15903 to the agent).
    /// Returns once the DaemonSet's pod is Ready.
    pub fn install_agent(&self) {
        let deploy = deploy_dir();
        let daemonset: Value = serde_norway::from_str(
            &fs::read_to_string(deploy.join("daemonset.yaml")).expect("read daemonset.yaml"),
        )
        .expect("parse daemonset.yaml");
        let agent = &daemonset["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(agent["name"], "agent", "the DaemonSet's first container");
        let mut args: Vec<String> = agent["args"]
            .as_array()
            .expect("the agent's args")
            .iter()
            .map(|arg| arg.as_str().expect("an arg").to_owned())
            .collect();
        let at = args
            .iter()
            .position(|arg| arg == "--cgroup-root")
            .expect("the DaemonSet names --cgroup-root");
        assert!(
            self.cgroup.starts_with("/sys/fs/cgroup"),
            "{} is not below the DaemonSet's cgroup volume",
            self.cgroup.display()
        );
        args[at + 1] = format!("/host{}", self.cgroup.display());
        let patch = serde_json::json!({
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": {"name": "probe-bypass", "namespace": "probe-bypass"},
            "spec": {"template": {"spec": {
                "containers": [{"name": "agent", "args": args}],
                "volumes": [{"name": "bpffs", "hostPath": {"path": self.bpffs}}],
            }}},
        });
        // The tests' sidecar holds no probe listener of its own on 15901-15903, so the agent
        // answers the rewritten httpGet probes there.
        let config = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "probe-bypass", "namespace": "probe-bypass"},
            "data": {"PROBE_BYPASS_SERVE_HTTP_PROBES": "true"},
        });
        self.apply_overlay(
            "deploy-agent",
            &deploy,
            &[
                serde_json::json!({"patch": patch.to_string()}),
                serde_json::json!({"patch": config.to_string()}),
            ],
            &serde_json::json!({}),
        );
        self.wait_for_rollout("probe-bypass", "daemonset/probe-bypass");
    }

    /// Installs the admission webhook from `deploy/webhook/` without cert-manager: its serving
    /// certificate from a CA of the test's own, in the Secret the Deployment mounts, and that CA
    /// as every webhook's `caBundle`, as `deploy/README.md` says to do by hand. Returns once both
    /// replicas are available.
    pub fn install_webhook(&self) {
        let deploy = deploy_dir().join("webhook");
        let certs = Certificates::valid_for(CERTIFICATE_DAYS);
        let (cert, key) = certs.issue_to(
            "webhook",
            "/CN=probe-bypass-webhook",
            "serverAuth",
            &[
                "DNS:probe-bypass-webhook.probe-bypass.svc",
                "DNS:probe-bypass-webhook.probe-bypass.svc.cluster.local",
            ],
        );
        let read = |path: &str| {
            fs::read_to_string(path).unwrap_or_else(|error| panic!("read {path}: {error}"))
        };
        let ca_bundle = BASE64_STANDARD.encode(read(&certs.ca()));
        let configuration: Value = serde_norway::from_str(&read(
            &deploy.join("mutatingwebhook.yaml").display().to_string(),
        ))
        .expect("parse mutatingwebhook.yaml");
        let webhooks = configuration["webhooks"].as_array().map_or(0, Vec::len);
        let ca_patch: Vec<Value> = (0..webhooks)
            .map(|index| {
                serde_json::json!({"op": "add",
                    "path": format!("/webhooks/{index}/clientConfig/caBundle"),
                    "value": ca_bundle})
            })
            .collect();
        let delete = |kind: &str, name: &str| {
            serde_json::json!({"patch": serde_json::json!({
                "apiVersion": "cert-manager.io/v1", "kind": kind,
                "metadata": {"name": name, "namespace": "probe-bypass"},
                "$patch": "delete"}).to_string()})
        };
        let secret = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": "probe-bypass-webhook-tls", "namespace": "probe-bypass"},
            "stringData": {"tls.crt": read(&cert), "tls.key": read(&key)},
        });
        self.apply(&secret.to_string());
        self.apply_overlay(
            "deploy-webhook",
            &deploy,
            &[
                delete("Issuer", "probe-bypass-selfsigned"),
                delete("Certificate", "probe-bypass-webhook-ca"),
                delete("Issuer", "probe-bypass-webhook-ca"),
                delete("Certificate", "probe-bypass-webhook"),
                serde_json::json!({
                    "target": {"kind": "MutatingWebhookConfiguration", "name": "probe-bypass"},
                    "patch": Value::Array(ca_patch).to_string(),
                }),
            ],
            &serde_json::json!({}),
        );
        self.wait_for_rollout("probe-bypass", "deployment/probe-bypass-webhook");
    }
    /// The `demo` namespace, which FSM monitors (its label), holding the Deployment `bookstore`:
    /// two pods of the test app marked meshed as FSM's injector marks them, with tcpSocket
    /// probes that the webhook rewrites to the agent's healthcheck (15904), which the kubelet
    /// then calls past the datapath. Returns once the pods are Ready.
    pub fn install_demo(&self) {
        self.apply(
            &serde_json::json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": "demo", "labels": {"flomesh.io/monitored-by": "fsm"}},
            })
            .to_string(),
        );
        let probe = serde_json::json!({"tcpSocket": {"port": 14001}, "periodSeconds": 5});
        self.apply(
            &serde_json::json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": "bookstore", "namespace": "demo"},
                "spec": {
                    "replicas": 2,
                    "selector": {"matchLabels": {"app": "bookstore"}},
                    "template": {
                        "metadata": {"labels": {
                            "app": "bookstore",
                            "fsm-proxy-uuid": "8c3a5b2e-0000-4000-8000-000000000001",
                        }},
                        "spec": {"containers": [{
                            "name": "bookstore",
                            "image": images::APP,
                            "imagePullPolicy": "Never",
                            "args": ["bookstore", "14001"],
                            "ports": [{"containerPort": 14001}],
                            "readinessProbe": probe,
                            "livenessProbe": probe,
                        }]},
                    },
                },
            })
            .to_string(),
        );
        self.wait_for_rollout("demo", "deployment/bookstore");
    }
}
