//! Finding pods' network namespaces in the machine's real `/proc`: real network namespaces
//! ([`TestPod`]), real cgroups shaped like each runtime's kubepods tree, and real processes moved
//! into both.
//!
//! The cgroups live in a subtree of the cgroup v2 hierarchy that the test owns
//! (`probe-bypass-test-<pid>-d<n>/…`), so the paths the kernel shows in `/proc/<pid>/cgroup` are
//! the runtime's shapes below that prefix. On a hybrid host the same file has the cgroup v1 lines
//! too. Nothing is attached to any cgroup. Guards kill and reap the processes, remove the cgroups
//! and delete the namespaces on drop, panics included.
//!
//! What the agent sees from its container, a cgroup namespace of its own and fewer capabilities
//! than the test, is reproduced by scanning from a child process so placed: this test binary
//! re-executed to run [`scan_from_a_child_process`] alone.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking, with a message naming the step that broke"
)]

use std::{
    collections::HashMap,
    env, fs,
    io::ErrorKind,
    iter,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use probe_bypass::{
    datapath::cgroup2_mount,
    discovery::{DiscoveryError, Found, ProcScan},
    netns::{NetnsId, NetnsWorker},
    pod::NetnsRef,
};
use probe_bypass_testing::require_privileges;
use probe_bypass_testing::{
    cgroup,
    pod::{TestPod, ip},
};

const PROC: &str = "/proc";

/// How long a started process may take to reach its cgroup and namespace, and a killed one to
/// leave its cgroup.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// A pod's process, as root with the test's capabilities.
const SLEEP: &[&str] = &["sleep", "600"];
/// A pod's process of another user, as the sandbox's `pause` is (user 65535).
const SLEEP_AS_NOBODY: &[&str] = &[
    "setpriv",
    "--reuid=65534",
    "--regid=65534",
    "--clear-groups",
    "sleep",
    "600",
];
/// A pod's process as root with no capabilities: a container's root holds fewer than the agent,
/// and only a process whose capabilities the reader holds too may be read without
/// `CAP_SYS_PTRACE`.
const SLEEP_AS_ROOT_WITHOUT_CAPS: &[&str] = &[
    "setpriv",
    "--inh-caps=-all",
    "--bounding-set=-all",
    "sleep",
    "600",
];

/// Where a pod's cgroup is, as each cgroup driver and runtime lays it out.
#[derive(Clone, Copy, Debug)]
enum Shape {
    /// cgroupfs driver (containerd or CRI-O): `kubepods/<qos>/pod<uid>/<id>`.
    Cgroupfs,
    /// cgroupfs driver, Guaranteed QoS: `kubepods/pod<uid>/<id>`.
    CgroupfsGuaranteed,
    /// systemd driver, containerd: `…-burstable-pod<uid_>.slice/cri-containerd-<id>.scope`.
    SystemdContainerd,
    /// systemd driver, Docker (cri-dockerd), Guaranteed QoS:
    /// `kubepods-pod<uid_>.slice/docker-<id>.scope`.
    SystemdDockerGuaranteed,
    /// systemd driver, CRI-O: `…-besteffort-pod<uid_>.slice/crio-<id>.scope`.
    Crio,
    /// CRI-O's container monitor beside it: `…-pod<uid_>.slice/crio-conmon-<id>.scope`.
    CrioConmon,
}

impl Shape {
    /// The cgroup of container `id` of pod `uid`, relative to the test's subtree.
    fn cgroup(self, uid: &str, id: &str) -> String {
        let uid_ = uid.replace('-', "_");
        match self {
            Self::Cgroupfs => format!("kubepods/besteffort/pod{uid}/{id}"),
            Self::CgroupfsGuaranteed => format!("kubepods/pod{uid}/{id}"),
            Self::SystemdContainerd => format!(
                "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{id}.scope"
            ),
            Self::SystemdDockerGuaranteed => {
                format!("kubepods.slice/kubepods-pod{uid_}.slice/docker-{id}.scope")
            }
            Self::Crio => format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-{id}.scope"
            ),
            Self::CrioConmon => format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-conmon-{id}.scope"
            ),
        }
    }
}

/// A node's kubepods tree in a test-owned cgroup subtree, and the processes started in it.
struct Node {
    root: PathBuf,
    /// The cgroups made below `root`, parents first.
    dirs: Vec<PathBuf>,
    processes: Vec<Child>,
}

impl Node {
    fn new() -> Self {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let root = cgroup2_mount()
            .expect("find the cgroup v2 mount")
            .join(format!("probe-bypass-test-{}-d{n}", std::process::id()));
        fs::create_dir(&root).unwrap_or_else(|e| panic!("create {}: {e}", root.display()));
        Self {
            root,
            dirs: Vec::new(),
            processes: Vec::new(),
        }
    }

    /// Starts a long `sleep` in the cgroup `relative` (made if needed) and, if given, in `pod`'s
    /// network namespace, otherwise in the host's; returns its pid once it is in both.
    fn start(&mut self, relative: &str, pod: Option<&TestPod>) -> u32 {
        self.start_sleep(relative, pod, SLEEP)
    }

    /// Like [`Self::start`], the `sleep` started by `sleep` (one of the `SLEEP…` commands). The pid
    /// is the sleep's: the shell moves itself into the cgroup, then `exec`s `ip netns exec`, which
    /// enters the namespace and `exec`s the command, which becomes the sleep.
    fn start_sleep(&mut self, relative: &str, pod: Option<&TestPod>, sleep: &[&str]) -> u32 {
        let mut args = Vec::new();
        if let Some(pod) = pod {
            args.extend(["ip", "netns", "exec", &pod.netns_name]);
        }
        args.extend(sleep);
        let child = self
            .command_in(relative, args[0], &args[1..])
            .spawn()
            .expect("start sleep");
        let pid = child.id();
        self.processes.push(child);
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        while fs::read_to_string(format!("{PROC}/{pid}/comm"))
            .ok()
            .as_deref()
            != Some("sleep\n")
        {
            assert!(
                Instant::now() < deadline,
                "process {pid} never became sleep"
            );
            thread::sleep(Duration::from_millis(5));
        }
        // Start times count clock ticks (10 ms): the next process must be visibly younger.
        thread::sleep(Duration::from_millis(30));
        pid
    }

    /// Kills and reaps the process `pid` that [`Self::start`] started.
    fn stop(&mut self, pid: u32) {
        let index = self
            .processes
            .iter()
            .position(|child| child.id() == pid)
            .expect("a process this node started");
        let mut child = self.processes.remove(index);
        child.kill().expect("kill");
        child.wait().expect("reap");
    }

    /// A command that runs `program` with `args` in the cgroup `relative` (made if needed), from
    /// its first instruction on ([`cgroup::command_in`]).
    fn command_in(&mut self, relative: &str, program: &str, args: &[&str]) -> Command {
        cgroup::command_in(&self.make_cgroup(relative), program, args)
    }

    fn make_cgroup(&mut self, relative: &str) -> PathBuf {
        let mut path = self.root.clone();
        for component in relative.split('/') {
            path.push(component);
            match fs::create_dir(&path) {
                Ok(()) => self.dirs.push(path.clone()),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => panic!("create {}: {e}", path.display()),
            }
        }
        path
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        for child in &mut self.processes {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Kills the whole subtree, in case a process escaped its guard.
        let _ = fs::write(self.root.join("cgroup.kill"), "1");
        for dir in self.dirs.iter().rev().chain([&self.root]) {
            cgroup::remove_cgroup(dir);
        }
    }
}

/// A UID no other test (or earlier run) uses.
fn new_uid() -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    format!("{:08x}-5e57-4d15-8c0f-{n:012x}", std::process::id())
}

fn netns_id(pod: &TestPod) -> NetnsId {
    NetnsId::of(&Path::new("/run/netns").join(&pod.netns_name)).expect("stat the pod's netns")
}

fn worker() -> NetnsWorker {
    NetnsWorker::spawn().expect("netns worker")
}

fn scan() -> ProcScan {
    ProcScan::new(Path::new(PROC)).expect("scan /proc")
}

/// Asserts that `found` names `pod`'s namespace through process `pid`.
fn assert_found(found: &Found, pod: &TestPod, pid: u32) {
    assert_eq!(found.netns_id, netns_id(pod), "{found:?}");
    assert_eq!(found.pid, pid, "{found:?}");
    let path = PathBuf::from(format!("{PROC}/{pid}/ns/net"));
    assert_eq!(
        found.netns,
        NetnsRef::Process {
            path: path.clone(),
            id: netns_id(pod),
        }
    );
    assert_eq!(NetnsId::of(&path).expect("stat"), netns_id(pod));
}

#[test]
fn one_scan_finds_the_pods_of_every_runtime_shape() {
    require_privileges!();
    let worker = worker();
    let mut node = Node::new();
    let shapes = [
        Shape::Cgroupfs,
        Shape::SystemdContainerd,
        Shape::SystemdDockerGuaranteed,
        Shape::Crio,
    ];
    let pods: Vec<(Shape, TestPod, String, u32)> = shapes
        .into_iter()
        .map(|shape| {
            let pod = TestPod::new();
            let uid = new_uid();
            let pid = node.start(&shape.cgroup(&uid, "0a1b2c3d4e5f"), Some(&pod));
            (shape, pod, uid, pid)
        })
        .collect();

    let scan = scan();
    for (shape, pod, uid, pid) in &pods {
        let found = scan
            .find(&worker, uid, IpAddr::V4(pod.ip))
            .unwrap_or_else(|e| panic!("{shape:?}: {e}"));
        assert_found(&found, pod, *pid);
    }
}

#[test]
fn pod_is_found_by_its_ipv6_address_and_its_uid_in_systemd_spelling() {
    require_privileges!();
    let worker = worker();
    let mut node = Node::new();
    let pod = TestPod::new();
    // Only inside the pod's namespace: the host never routes to it.
    let ipv6 = Ipv6Addr::new(0x2001, 0xdb8, 0x5e57, 0, 0, 0, 0, 2);
    ip(&[
        "-n",
        &pod.netns_name,
        "addr",
        "add",
        &format!("{ipv6}/64"),
        "dev",
        "eth0",
        "nodad",
    ]);
    let uid = new_uid();
    let pid = node.start(
        &Shape::SystemdDockerGuaranteed.cgroup(&uid, "d0c"),
        Some(&pod),
    );

    let found = scan()
        .find(&worker, &uid.replace('-', "_"), IpAddr::V6(ipv6))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_found(&found, &pod, pid);
}

#[test]
fn crio_conmon_in_the_host_netns_is_passed_over_though_older() {
    require_privileges!();
    let worker = worker();
    let mut node = Node::new();
    let pod = TestPod::new();
    let uid = new_uid();
    // CRI-O starts the monitor before the container it monitors.
    let conmon = node.start(&Shape::CrioConmon.cgroup(&uid, "c0ffee"), None);
    let container = node.start(&Shape::Crio.cgroup(&uid, "c0ffee"), Some(&pod));

    let found = scan()
        .find(&worker, &uid, IpAddr::V4(pod.ip))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_found(&found, &pod, container);
    assert_ne!(found.pid, conmon);
}

#[test]
fn oldest_process_is_preferred_even_with_a_higher_pid() {
    require_privileges!();
    let worker = worker();
    let mut node = Node::new();
    let pod = TestPod::new();
    let uid = new_uid();
    // Steer the kernel's next pids so the older process has the higher pid: choosing by pid
    // instead of start time would then pick the wrong one. Only this test touches the knob.
    let pid_max: u32 = fs::read_to_string("/proc/sys/kernel/pid_max")
        .expect("read pid_max")
        .trim()
        .parse()
        .expect("pid_max is a number");
    let next_pid_after = |pid: u32| {
        fs::write("/proc/sys/kernel/ns_last_pid", pid.to_string()).expect("write ns_last_pid");
    };
    next_pid_after(pid_max - 200);
    let pause = node.start(&Shape::SystemdContainerd.cgroup(&uid, "pause"), Some(&pod));
    next_pid_after(300);
    let app = node.start(&Shape::SystemdContainerd.cgroup(&uid, "app"), Some(&pod));
    assert!(
        app < pause,
        "setup: the younger process {app} should have a lower pid than the older {pause}"
    );

    let found = scan()
        .find(&worker, &uid, IpAddr::V4(pod.ip))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_found(&found, &pod, pause);
}

#[test]
fn pod_whose_uid_extends_the_wanted_one_is_not_taken_for_it() {
    require_privileges!();
    let worker = worker();
    let mut node = Node::new();
    let pod = TestPod::new();
    let stale = TestPod::new();
    let uid = new_uid();
    // A namespace that holds the same IP: were the longer UID matched, the IP would be in two
    // namespaces of "the pod" and the answer ambiguous.
    ip(&[
        "-n",
        &stale.netns_name,
        "addr",
        "add",
        &format!("{}/32", pod.ip),
        "dev",
        "lo",
    ]);
    node.start(
        &Shape::Cgroupfs.cgroup(&format!("{uid}0"), "1ee7"),
        Some(&stale),
    );
    let pid = node.start(&Shape::Cgroupfs.cgroup(&uid, "1ee7"), Some(&pod));

    let found = scan()
        .find(&worker, &uid, IpAddr::V4(pod.ip))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_found(&found, &pod, pid);
}

#[test]
fn process_gone_since_the_scan_is_passed_over() {
    require_privileges!();
    let worker = worker();
    let mut node = Node::new();
    let pod = TestPod::new();
    let uid = new_uid();
    let oldest = node.start(&Shape::Cgroupfs.cgroup(&uid, "pause"), Some(&pod));
    let app = node.start(&Shape::Cgroupfs.cgroup(&uid, "app"), Some(&pod));

    let scan = scan();
    node.stop(oldest);
    let found = scan
        .find(&worker, &uid, IpAddr::V4(pod.ip))
        .unwrap_or_else(|e| panic!("{e}"));
    assert_found(&found, &pod, app);
}

#[test]
fn pod_without_processes_is_reported_with_where_it_looked() {
    require_privileges!();
    let uid = new_uid();
    let error = scan()
        .find(&worker(), &uid, IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7)))
        .expect_err("no process of the pod");
    assert!(
        matches!(&error, DiscoveryError::NoProcess { uid: u, proc_root, .. } if *u == uid && proc_root == Path::new(PROC)),
        "{error}"
    );
    let message = error.to_string();
    for part in [
        format!("pod{uid}/"),
        format!("pod{}.slice", uid.replace('-', "_")),
        PROC.to_owned(),
    ] {
        assert!(message.contains(&part), "{part:?} missing from: {message}");
    }
}

#[test]
fn pod_whose_namespaces_lack_its_ip_lists_the_namespaces_and_addresses_seen() {
    require_privileges!();
    let worker = worker();
    let mut node = Node::new();
    let pod = TestPod::new();
    let uid = new_uid();
    let conmon = node.start(&Shape::CrioConmon.cgroup(&uid, "b0b"), None);
    let container = node.start(&Shape::Crio.cgroup(&uid, "b0b"), Some(&pod));
    let wanted = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));

    let error = scan()
        .find(&worker, &uid, wanted)
        .expect_err("the IP is in no namespace of the pod");
    let DiscoveryError::IpNotFound { namespaces, .. } = &error else {
        panic!("expected IpNotFound, got: {error}");
    };
    let pids: Vec<u32> = namespaces.iter().map(|n| n.pid).collect();
    assert_eq!(pids, [conmon, container], "{error}");
    assert_eq!(namespaces[1].id, netns_id(&pod));
    assert!(namespaces[1].addresses.contains(&IpAddr::V4(pod.ip)));
    let message = error.to_string();
    for part in [
        uid,
        wanted.to_string(),
        pod.ip.to_string(),
        netns_id(&pod).to_string(),
        "crio-conmon-b0b.scope".to_owned(),
    ] {
        assert!(message.contains(&part), "{part:?} missing from: {message}");
    }
}

#[test]
fn netns_shared_by_two_pods_is_refused_naming_the_other() {
    require_privileges!();
    let worker = worker();
    let mut node = Node::new();
    let pod = TestPod::new();
    let uid = new_uid();
    let other = new_uid();
    node.start(&Shape::SystemdContainerd.cgroup(&uid, "a"), Some(&pod));
    node.start(&Shape::Cgroupfs.cgroup(&other, "b"), Some(&pod));

    let error = scan()
        .find(&worker, &uid, IpAddr::V4(pod.ip))
        .expect_err("shared namespace");
    assert!(
        matches!(&error, DiscoveryError::SharedNetns { netns, other_pods, .. }
            if *netns == netns_id(&pod) && *other_pods == [other.clone()]),
        "{error}"
    );
    assert!(error.to_string().contains(&other), "{error}");
}

#[test]
fn pod_in_the_hosts_netns_is_refused_as_host_network() {
    require_privileges!();
    let worker = worker();
    let mut node = Node::new();
    // Its veth gives the host an address of its own to look for: the pod's minus one.
    let pod = TestPod::new();
    let host_ip = Ipv4Addr::from(u32::from(pod.ip) - 1);
    let uid = new_uid();
    node.start(&Shape::SystemdContainerd.cgroup(&uid, "h0s7"), None);

    let error = scan()
        .find(&worker, &uid, IpAddr::V4(host_ip))
        .expect_err("host network");
    let own = NetnsId::of(Path::new("/proc/self/ns/net")).expect("stat own netns");
    assert!(
        matches!(&error, DiscoveryError::HostNetns { netns, .. } if *netns == own),
        "{error}"
    );
}

/// The pods [`scan_from_a_child_process`] looks for, `<uid>=<ip>` separated by spaces. Set only
/// in that child process.
const QUERIES_ENV: &str = "PROBE_BYPASS_TEST_DISCOVERY_QUERIES";

/// Not a test of its own: the scan that other tests run in a child process which they put where
/// the agent runs in its container. Does nothing unless [`QUERIES_ENV`] is set. Prints for each
/// pod `FOUND <uid> <pid> <dev>:<ino> <v2 cgroup path as this process sees it>` or
/// `ERROR <uid> <message>`.
#[test]
#[ignore = "run by other tests, as their child process"]
fn scan_from_a_child_process() {
    let Ok(queries) = env::var(QUERIES_ENV) else {
        return;
    };
    let worker = worker();
    let scan = scan();
    for query in queries.split_whitespace() {
        let (uid, ip) = query.split_once('=').expect("a query is <uid>=<ip>");
        match scan.find(&worker, uid, ip.parse().expect("an IP")) {
            Ok(Found { pid, netns_id, .. }) => {
                let cgroup = fs::read_to_string(format!("{PROC}/{pid}/cgroup"))
                    .expect("read the found process's cgroup");
                let v2 = cgroup
                    .lines()
                    .find_map(|line| line.strip_prefix("0::"))
                    .expect("a cgroup v2 line");
                println!("FOUND {uid} {pid} {}:{} {v2}", netns_id.dev, netns_id.ino);
            }
            Err(error) => println!("ERROR {uid} {error}"),
        }
    }
}

/// What the child process found of a pod.
#[derive(Debug)]
struct ChildFound {
    pid: u32,
    netns_id: NetnsId,
    /// The pod's cgroup path as the child sees it.
    cgroup: String,
}

/// Runs [`scan_from_a_child_process`] for `pods` (UID and IP) in `command`, a command that runs
/// its arguments where the scan is to be made, and returns what it found of each pod, by UID.
fn scan_in_child(
    mut command: Command,
    pods: &[(&str, IpAddr)],
) -> HashMap<String, Result<ChildFound, String>> {
    let queries: Vec<String> = pods.iter().map(|(uid, ip)| format!("{uid}={ip}")).collect();
    let output = command
        .arg(env::current_exe().expect("the test binary"))
        .args([
            "--ignored",
            "--exact",
            "scan_from_a_child_process",
            "--nocapture",
        ])
        .env(QUERIES_ENV, queries.join(" "))
        .output()
        .expect("run the child scan");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "child scan: {}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut found = HashMap::new();
    for line in stdout.lines() {
        if let Some(rest) = line.strip_prefix("FOUND ") {
            let mut fields = rest.splitn(4, ' ');
            let mut field = || fields.next().expect("a FOUND line has 4 fields");
            let uid = field().to_owned();
            let pid = field().parse().expect("a pid");
            let (dev, ino) = field().split_once(':').expect("<dev>:<ino>");
            let netns_id = NetnsId {
                dev: dev.parse().expect("a device number"),
                ino: ino.parse().expect("an inode number"),
            };
            let cgroup = field().to_owned();
            let child = ChildFound {
                pid,
                netns_id,
                cgroup,
            };
            found.insert(uid, Ok(child));
        } else if let Some(rest) = line.strip_prefix("ERROR ") {
            let (uid, message) = rest.split_once(' ').expect("ERROR <uid> <message>");
            found.insert(uid.to_owned(), Err(message.to_owned()));
        }
    }
    assert_eq!(found.len(), pods.len(), "child scan printed:\n{stdout}");
    found
}

/// The cgroup `to` as the kernel shows it to a process whose cgroup namespace is rooted at `from`
/// (both relative to the same directory): up to their common ancestor, then down.
fn seen_from(from: &str, to: &str) -> String {
    let from: Vec<&str> = from.split('/').collect();
    let to: Vec<&str> = to.split('/').collect();
    let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let path: Vec<&str> = iter::repeat_n("..", from.len() - common)
        .chain(to[common..].iter().copied())
        .collect();
    format!("/{}", path.join("/"))
}

/// The agent in a container has a cgroup namespace of its own, rooted at its container's cgroup:
/// the kernel shows it the pods' cgroups as paths that start with `..`, and a cgroupfs path then
/// lacks the `kubepods` above the common ancestor. Each driver is a node of its own, as on a real
/// cluster, with the agent's pod beside the others.
#[test]
fn pods_are_found_from_an_agent_in_its_own_cgroup_namespace() {
    require_privileges!();
    let drivers = [
        (
            Shape::Cgroupfs,
            [Shape::Cgroupfs, Shape::CgroupfsGuaranteed].as_slice(),
        ),
        (
            Shape::SystemdContainerd,
            [
                Shape::SystemdContainerd,
                Shape::SystemdDockerGuaranteed,
                Shape::Crio,
            ]
            .as_slice(),
        ),
    ];
    for (agent_shape, shapes) in drivers {
        let mut node = Node::new();
        let agent = agent_shape.cgroup(&new_uid(), "a9e47");
        let pods: Vec<(Shape, TestPod, String, u32)> = shapes
            .iter()
            .map(|&shape| {
                let pod = TestPod::new();
                let uid = new_uid();
                let pid = node.start(&shape.cgroup(&uid, "0a1b2c3d4e5f"), Some(&pod));
                (shape, pod, uid, pid)
            })
            .collect();

        let command = node.command_in(&agent, "unshare", &["--cgroup"]);
        let queries: Vec<(&str, IpAddr)> = pods
            .iter()
            .map(|(_, pod, uid, _)| (uid.as_str(), IpAddr::V4(pod.ip)))
            .collect();
        let found = scan_in_child(command, &queries);

        for (shape, pod, uid, pid) in &pods {
            let child = found[uid]
                .as_ref()
                .unwrap_or_else(|e| panic!("{shape:?} seen from {agent}: {e}"));
            assert_eq!(child.pid, *pid, "{shape:?}: {child:?}");
            assert_eq!(child.netns_id, netns_id(pod), "{shape:?}: {child:?}");
            let expected = seen_from(&agent, &shape.cgroup(uid, "0a1b2c3d4e5f"));
            assert_eq!(child.cgroup, expected, "{shape:?}: the kernel's rendering");
            assert!(child.cgroup.starts_with("/../"), "{shape:?}: {child:?}");
            if matches!(shape, Shape::Cgroupfs | Shape::CgroupfsGuaranteed) {
                assert!(!child.cgroup.contains("kubepods"), "{shape:?}: {child:?}");
            }
        }
    }
}

/// Without `CAP_SYS_PTRACE` the agent cannot open another user's `/proc/<pid>/ns/net`. Such a
/// process costs its own pod at most: a pod with another process that can be read is found
/// through it, one with none is reported saying what the agent lacks, and the other pods of the
/// same scan are found.
#[test]
fn process_the_agent_may_not_read_fails_only_its_pod() {
    require_privileges!();
    let mut node = Node::new();
    let unreadable = TestPod::new();
    let unreadable_uid = new_uid();
    let nobody = node.start_sleep(
        &Shape::Cgroupfs.cgroup(&unreadable_uid, "n0b0d7"),
        Some(&unreadable),
        SLEEP_AS_NOBODY,
    );
    let readable = TestPod::new();
    let readable_uid = new_uid();
    let root = node.start_sleep(
        &Shape::SystemdContainerd.cgroup(&readable_uid, "r007"),
        Some(&readable),
        SLEEP_AS_ROOT_WITHOUT_CAPS,
    );
    // The sandbox is older and another user; the app runs as root.
    let mixed = TestPod::new();
    let mixed_uid = new_uid();
    let pause = node.start_sleep(
        &Shape::Cgroupfs.cgroup(&mixed_uid, "pause"),
        Some(&mixed),
        SLEEP_AS_NOBODY,
    );
    let app = node.start_sleep(
        &Shape::Cgroupfs.cgroup(&mixed_uid, "app"),
        Some(&mixed),
        SLEEP_AS_ROOT_WITHOUT_CAPS,
    );
    let pods = [
        (unreadable_uid.as_str(), IpAddr::V4(unreadable.ip)),
        (readable_uid.as_str(), IpAddr::V4(readable.ip)),
        (mixed_uid.as_str(), IpAddr::V4(mixed.ip)),
    ];

    let mut without_ptrace = Command::new("setpriv");
    without_ptrace.args(["--inh-caps=-sys_ptrace", "--bounding-set=-sys_ptrace"]);
    let found = scan_in_child(without_ptrace, &pods);

    let error = found[&unreadable_uid]
        .as_ref()
        .expect_err("the pod's only process is another user's");
    for part in [
        format!("found processes of pod {unreadable_uid} but could not open their network namespace"),
        "permission denied — the agent needs CAP_SYS_PTRACE to open other users' /proc/<pid>/ns/net"
            .to_owned(),
        format!("(pid {nobody})"),
    ] {
        assert!(error.contains(&part), "{part:?} missing from: {error}");
    }
    let child = found[&readable_uid]
        .as_ref()
        .expect("found in the same scan");
    assert_eq!((child.pid, child.netns_id), (root, netns_id(&readable)));
    let child = found[&mixed_uid].as_ref().expect("found through its app");
    assert_eq!((child.pid, child.netns_id), (app, netns_id(&mixed)));

    // With the capability, the same processes are all read: the sandbox is the one chosen.
    let worker = worker();
    let scan = scan();
    for (pod, uid, pid) in [
        (&unreadable, &unreadable_uid, nobody),
        (&mixed, &mixed_uid, pause),
    ] {
        let found = scan
            .find(&worker, uid, IpAddr::V4(pod.ip))
            .unwrap_or_else(|e| panic!("{e}"));
        assert_found(&found, pod, pid);
    }
}
