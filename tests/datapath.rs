//! The eBPF datapath in a real kernel: the embedded programs installed under a test cgroup (never
//! the root), pods in real network namespaces, and real connections from processes in the cgroup.
//!
//! What answers is a small Perl listener (perl-base is part of every Debian system) started in the
//! cgroup inside a pod's namespace: for each connection it prints the port it accepted on and
//! what `getsockopt(SO_ORIGINAL_DST)` says, so one line shows both where a connection landed and
//! what the proxy would be told. The full mesh, with HAProxy as the sidecar, is `tests/parity.rs`.
//!
//! Guards detach (uninstall), kill and remove on drop, panics included.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking, with a message naming the step that broke"
)]

use std::{
    collections::BTreeSet,
    fs,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{IpAddr, Ipv4Addr},
    os::fd::AsFd as _,
    process::{Child, Command, Stdio},
    sync::{Mutex, mpsc},
    thread,
    time::Duration,
};

use probe_bypass::{
    datapath::{
        self, Counters, Datapath, FiledListeners, Inbound, KubeletCgroup, PodRules, ProbeBypass,
        Settings,
    },
    exclusions::Exclusions,
    netns::NetnsWorker,
    preflight,
};
use probe_bypass_testing::require_privileges;
use probe_bypass_testing::{
    agent::Agent,
    bpffs::TestPins,
    cgroup::{ChildCgroup, TestCgroup, attached_programs, netns_links},
    ebpf_agent::EbpfAgent,
    pod::TestPod,
};

/// Prints `<port it accepted on> <original destination or none>` for each connection on the ports
/// given as arguments, on IPv4 and IPv6, and `ready` once it listens. The original destination is
/// what `getsockopt(SO_ORIGINAL_DST)` (IPv4) or `getsockopt(IP6T_SO_ORIGINAL_DST)` (IPv6) says,
/// written `1.2.3.4:80` or `[2001:2::2]:80`.
const ORIGDST_SERVER: &str = r#"
use Socket qw(:all); use IO::Select;
$| = 1; my $sel = IO::Select->new; my (%port, %v6);
sub listener { my ($family, $addr, $p) = @_;
  socket(my $s, $family, SOCK_STREAM, 0) or die "socket: $!";
  setsockopt($s, SOL_SOCKET, SO_REUSEADDR, 1);
  setsockopt($s, IPPROTO_IPV6, IPV6_V6ONLY, 1) if $family == PF_INET6;
  bind($s, $addr) or die "bind $p: $!";
  listen($s, 64) or die "listen: $!";
  $sel->add($s); $port{fileno $s} = $p; $v6{fileno $s} = $family == PF_INET6;
}
for my $p (@ARGV) {
  listener(PF_INET, pack_sockaddr_in($p, INADDR_ANY), $p);
  listener(PF_INET6, pack_sockaddr_in6($p, IN6ADDR_ANY), $p);
}
print "ready\n";
while (1) { for my $s ($sel->can_read) {
  accept(my $c, $s) or next;
  my $d = "none";
  if ($v6{fileno $s}) {
    my $o = getsockopt($c, IPPROTO_IPV6, 80);
    if (defined $o) { my ($p, $a) = unpack_sockaddr_in6($o); $d = "[" . inet_ntop(AF_INET6, $a) . "]:$p"; }
  } else {
    my $o = getsockopt($c, IPPROTO_IP, 80);
    if (defined $o) { my ($p, $a) = unpack_sockaddr_in($o); $d = inet_ntoa($a) . ":$p"; }
  }
  print "$port{fileno $s} $d\n"; close $c;
} }
"#;

/// The ports a pod's listener answers on: an app port, the proxy's two, and the healthcheck.
const PORTS: [&str; 4] = ["8080", "15001", "15003", "15904"];

/// A pod with the Perl listener in it, running inside the test cgroup.
struct Listening {
    pod: TestPod,
    server: Child,
    lines: mpsc::Receiver<String>,
}

impl Listening {
    fn new(cgroup: &TestCgroup) -> Self {
        Self::on(cgroup, &PORTS)
    }

    /// A pod listening on `ports` only.
    fn on(cgroup: &TestCgroup, ports: &[&str]) -> Self {
        let pod = routed_pod();
        let mut args = vec![
            "netns",
            "exec",
            &pod.netns_name,
            "perl",
            "-e",
            ORIGDST_SERVER,
        ];
        args.extend(ports);
        let mut server = cgroup
            .command("ip", &args)
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the listener");
        let stdout = server.stdout.take().expect("listener stdout");
        let (tx, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(5))
            .expect("the listener starts");
        assert_eq!(first, "ready");
        Self { pod, server, lines }
    }

    /// The next connection the listener accepted, as `<port> <original destination>`.
    fn next(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(3))
            .expect("a connection reached the pod")
    }

    fn ip(&self) -> IpAddr {
        IpAddr::V4(self.pod.ip)
    }
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}

/// A test pod that can reach the other test pods through the host.
fn routed_pod() -> TestPod {
    TestPod::routed()
}

/// The datapath installed under a test cgroup, pinned on a bpffs of its own; uninstalled on drop.
struct Node {
    datapath: Option<Datapath>,
    pins: TestPins,
    // Last: the cgroup goes once nothing is attached to it.
    cgroup: TestCgroup,
}

impl Node {
    fn new() -> Self {
        Self::with_cgroup(TestCgroup::new())
    }

    /// A node whose programs are attached to `cgroup`, which may already hold processes.
    fn with_cgroup(cgroup: TestCgroup) -> Self {
        let mut node = Self {
            datapath: None,
            pins: TestPins::new(),
            cgroup,
        };
        node.install(settings());
        node
    }

    /// Installs (or, the second time, re-installs over the pins, as a restarted agent does).
    fn install(&mut self, settings: Settings) {
        preflight::check(
            &preflight::DATAPATH_NEEDS,
            Some(self.cgroup.path()),
            self.pins.path(),
        )
        .expect("host checks");
        self.datapath = Some(
            Datapath::install(self.cgroup.path(), self.pins.path(), settings)
                .unwrap_or_else(|error| panic!("install: {:?}", anyhow::Error::new(error))),
        );
    }

    fn datapath(&mut self) -> &mut Datapath {
        self.datapath.as_mut().expect("installed")
    }

    fn mesh(&mut self, pod: &TestPod, exclusions: Exclusions) {
        self.mesh_with_addrs(pod, vec![IpAddr::V4(pod.ip)], exclusions);
    }

    /// Meshes a pod known by these addresses (for example IPv4 and IPv6).
    fn mesh_with_addrs(&mut self, pod: &TestPod, addrs: Vec<IpAddr>, exclusions: Exclusions) {
        let netns_cookie = pod.netns_cookie();
        self.datapath()
            .upsert_pod(&PodRules {
                addrs,
                netns_cookie,
                exclusions,
                dependent: None,
            })
            .expect("mesh the pod");
    }

    /// Connects from a process in the cgroup, in `netns` (or the host's), as `uid` (or root), and
    /// closes at once. Returns whether the connection was made.
    fn connect(&self, netns: Option<&TestPod>, uid: Option<u32>, to: IpAddr, port: u16) -> bool {
        let args = connect_command(netns, uid, to, port);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.cgroup.output(args[0], &args[1..]).status.success()
    }

    /// Like [`Self::connect`], from a process outside the cgroup: none of the cgroup programs
    /// runs for it, as for a connection made on another node. Only the receiving pod's sk_lookup
    /// program sees it.
    fn connect_from_another_node(
        &self,
        netns: Option<&TestPod>,
        uid: Option<u32>,
        to: IpAddr,
        port: u16,
    ) -> bool {
        let args = connect_command(netns, uid, to, port);
        Command::new(&args[0])
            .args(&args[1..])
            .status()
            .expect("run the client")
            .success()
    }

    /// Has the datapath hand a meshed pod's connections from other nodes to its proxy, as the
    /// agent does when it serves the pod ([`Datapath::guard_inbound`]), with `filed` shared by the
    /// pods of one pass.
    fn guard_inbound_as_the_agent(&mut self, pod: &TestPod, filed: &FiledListeners) -> Inbound {
        let shared = Mutex::new(self.datapath.take().expect("installed"));
        let worker = NetnsWorker::spawn().expect("netns worker");
        let inbound = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime")
            .block_on(Datapath::guard_inbound(
                &shared,
                filed,
                &worker,
                pod.netns(),
                pod.netns_cookie(),
            ));
        self.datapath = Some(shared.into_inner().expect("the datapath's lock"));
        inbound.expect("guard the pod's inbound connections")
    }

    /// Attaches sk_lookup to a meshed pod's namespace, as the agent does when it serves the pod.
    fn guard_inbound(&mut self, pod: &TestPod) {
        let cookie = pod.netns_cookie();
        self.datapath()
            .attach_netns(cookie, pod.netns().file())
            .expect("attach sk_lookup");
    }

    fn counters(&mut self) -> Counters {
        self.datapath().counters().expect("read the counters")
    }

    fn attached(&self) -> Vec<String> {
        attached_programs(self.cgroup.path()).unwrap_or_else(|error| panic!("{error}"))
    }
}

/// The command line of a client that connects to `to`:`port` in `netns` (or the host's), as `uid`
/// (or root), and closes at once.
fn connect_command(
    netns: Option<&TestPod>,
    uid: Option<u32>,
    to: IpAddr,
    port: u16,
) -> Vec<String> {
    let script = format!("exec 3<>/dev/tcp/{to}/{port}");
    let mut args: Vec<String> = Vec::new();
    if let Some(pod) = netns {
        args.extend(["ip", "netns", "exec", &pod.netns_name].map(str::to_owned));
    }
    if let Some(uid) = uid {
        args.extend(
            [
                "setpriv",
                &format!("--reuid={uid}"),
                &format!("--regid={uid}"),
                "--clear-groups",
            ]
            .map(str::to_owned),
        );
    }
    args.extend(["timeout", "3", "bash", "-c", &script].map(str::to_owned));
    args
}

fn settings() -> Settings {
    Settings {
        proxy_uid: 1500,
        inbound_port: 15003,
        outbound_port: 15001,
        probe_ports: [15010, 15901, 15902, 15903, 15904].into(),
        probe_bypass: ProbeBypass::Host,
        sk_msg: true,
        node: Exclusions::default(),
        proc_root: "/proc".into(),
    }
}

const ATTACHED: [&str; 4] = [
    "\"cgroup_getsockopt\" \"pb_getsockopt\"",
    "\"cgroup_inet4_connect\" \"pb_connect4\"",
    "\"cgroup_inet6_connect\" \"pb_connect6\"",
    "\"cgroup_sock_ops\" \"pb_sockops\"",
];

#[test]
fn install_attaches_each_program_once_and_uninstall_removes_everything() {
    require_privileges!();
    let mut node = Node::new();
    assert_eq!(node.attached(), ATTACHED);
    assert!(node.pins.path().join("links/pb_connect4").exists());

    // A second install over the same pins (a restarted agent) swaps the programs in place.
    node.install(settings());
    assert_eq!(node.attached(), ATTACHED, "no second set of programs");

    node.datapath = None;
    // Another holder of a link (an agent still running, bpftool) does not keep its program
    // attached past `uninstall`, and nothing waits on the kernel's deferred release of the pins.
    let held =
        aya::programs::links::PinnedLink::from_pin(node.pins.path().join("links/pb_connect4"))
            .expect("open the pinned link");
    let report = datapath::uninstall(node.pins.path()).expect("uninstall");
    assert!(report.left.is_empty(), "left behind: {:?}", report.left);
    assert!(!node.pins.path().exists());
    assert_eq!(node.attached(), Vec::<String>::new());
    drop(held);
}

#[test]
fn uninstall_leaves_what_is_not_the_agents() {
    require_privileges!();
    let node = Node::new();
    let foreign = node.pins.path().join("someone-elses");
    fs::create_dir(&foreign).expect("mkdir on bpffs");
    let report = datapath::uninstall(node.pins.path()).expect("uninstall");
    assert_eq!(report.left, vec![foreign.clone()]);
    assert_eq!(node.attached(), Vec::<String>::new(), "ours are detached");
    fs::remove_dir(&foreign).expect("clean up");
}

#[test]
fn connections_to_a_meshed_pod_meet_its_proxy_except_the_kubelets_probes() {
    require_privileges!();
    let mut node = Node::new();
    let target = Listening::new(&node.cgroup);
    let other = routed_pod();
    node.mesh(&target.pod, Exclusions::default());
    let ip = target.ip();

    // From the host: the app port goes to the inbound port, which learns the original port.
    assert!(node.connect(None, None, ip, 8080));
    assert_eq!(target.next(), format!("15003 {ip}:8080"));
    // From the host: the healthcheck is reached directly, the kubelet's bypass.
    assert!(node.connect(None, None, ip, 15904));
    assert_eq!(target.next(), "15904 none");
    // From another pod: the healthcheck is just another port, behind the proxy.
    assert!(node.connect(Some(&other), None, ip, 15904));
    assert_eq!(target.next(), format!("15003 {ip}:15904"));

    let counters = node.counters();
    assert_eq!(counters.redirected_inbound, 2);
    assert_eq!(counters.probe_bypassed, 1);
    assert_eq!(counters.bypass_refused, 1);
    assert_eq!(counters.orig_dst_lookups, 3);
    assert_eq!(counters.orig_dst_misses, 1, "the bypassed connection");
}

/// Issue 4: the kubelet's probes to a pod the agent knows but does not serve yet are counted, and
/// go where they would have gone; nothing else is.
#[test]
fn host_probes_to_a_pending_pod_are_counted_until_its_count_is_taken() {
    require_privileges!();
    let mut node = Node::new();
    let target = Listening::new(&node.cgroup);
    let other = routed_pod();
    let ip = target.ip();
    node.datapath()
        .set_pending_addrs(&[ip].into())
        .expect("mark the pod pending");

    // From the host to a probe port: counted, and not redirected.
    for _ in 0..2 {
        assert!(node.connect(None, None, ip, 15904));
        assert_eq!(target.next(), "15904 none");
    }
    // Another port, or another pod's namespace: not the kubelet's probes.
    assert!(node.connect(None, None, ip, 8080));
    assert_eq!(target.next(), "8080 none");
    assert!(node.connect(Some(&other), None, ip, 15904));
    assert_eq!(target.next(), "15904 none");

    // The count is pinned: a restarted agent finds it, and marking the pod pending again keeps it.
    node.install(settings());
    assert_eq!(node.datapath().pending_addrs(), [ip].into());
    node.datapath()
        .set_pending_addrs(&[ip].into())
        .expect("mark the pod pending again");
    assert_eq!(node.datapath().take_early_probes(ip).expect("take"), 2);
    assert!(node.datapath().pending_addrs().is_empty());
    assert_eq!(node.datapath().take_early_probes(ip).expect("take"), 0);

    // Once the pod is meshed its probes take the usual bypass, uncounted.
    node.datapath()
        .set_pending_addrs(&[ip].into())
        .expect("mark the pod pending");
    node.mesh(&target.pod, Exclusions::default());
    assert!(node.connect(None, None, ip, 15904));
    assert_eq!(target.next(), "15904 none");
    assert_eq!(node.datapath().take_early_probes(ip).expect("take"), 0);

    // A pod that is no longer pending (deleted) loses its entry.
    node.datapath()
        .set_pending_addrs(&[ip].into())
        .expect("mark the pod pending");
    node.datapath()
        .set_pending_addrs(&BTreeSet::new())
        .expect("unmark it");
    assert!(node.datapath().pending_addrs().is_empty());
}

#[test]
fn probe_bypass_from_any_lets_every_caller_reach_the_probe_ports() {
    require_privileges!();
    let mut node = Node::new();
    node.install(Settings {
        probe_bypass: ProbeBypass::Any,
        ..settings()
    });
    let target = Listening::new(&node.cgroup);
    let other = routed_pod();
    node.mesh(&target.pod, Exclusions::default());

    assert!(node.connect(Some(&other), None, target.ip(), 15904));
    assert_eq!(target.next(), "15904 none");
}

/// Like [`Node::connect`], from a process in `cgroup`, in the host network namespace.
fn connect_from(cgroup: &ChildCgroup, to: IpAddr, port: u16) -> bool {
    let args = connect_command(None, None, to, port);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    cgroup
        .command(args[0], &args[1..])
        .status()
        .expect("run the client")
        .success()
}

/// With `--probe-bypass-from kubelet`, a stand-in kubelet (a host-netns process in a cgroup of
/// its own, under the test's) reaches every probe port directly, over IPv4 and IPv6; a host-netns
/// process in a sibling cgroup (a node daemon, a hostNetwork pod) meets the proxy on each, like
/// any pod. The cross-node path is unchanged: sk_lookup gives no probe port a bypass.
#[test]
fn probe_bypass_from_kubelet_lets_only_the_kubelets_cgroup_past_the_proxy() {
    require_privileges!();
    let mut node = Node::new();
    let kubelet = ChildCgroup::new(&node.cgroup, "kubelet.service");
    let daemon = ChildCgroup::new(&node.cgroup, "node-exporter.service");
    let found = KubeletCgroup::at(kubelet.path()).expect("the stand-in kubelet's cgroup");
    node.install(Settings {
        probe_bypass: ProbeBypass::Kubelet(found),
        ..settings()
    });
    let probe_ports = ["15901", "15902", "15903", "15904"];
    let mut ports = vec!["15003"];
    ports.extend(probe_ports);
    let target = Listening::on(&node.cgroup, &ports);
    let v6 = IpAddr::V6(target.pod.add_ipv6());
    let v4 = target.ip();
    node.mesh_with_addrs(&target.pod, vec![v4, v6], Exclusions::default());
    node.guard_inbound(&target.pod);

    for ip in [v4, v6] {
        let shown = |port: &str| match ip {
            IpAddr::V4(_) => format!("{ip}:{port}"),
            IpAddr::V6(_) => format!("[{ip}]:{port}"),
        };
        for port in probe_ports {
            let number: u16 = port.parse().expect("a port");
            assert!(
                connect_from(&kubelet, ip, number),
                "the kubelet to {}",
                shown(port)
            );
            assert_eq!(target.next(), format!("{port} none"), "the kubelet");
            assert!(
                connect_from(&daemon, ip, number),
                "the daemon to {}",
                shown(port)
            );
            assert_eq!(
                target.next(),
                format!("15003 {}", shown(port)),
                "a host process that is not the kubelet"
            );
        }
    }
    // From another node: no hook of this node's cgroup runs, and sk_lookup sends the probe port
    // to the proxy, as before.
    let remote = routed_pod();
    assert!(node.connect_from_another_node(Some(&remote), None, v4, 15904));
    assert_eq!(target.next(), format!("15003 {v4}:15904"));
}

/// The agent with `--probe-bypass-from kubelet` and a `--kubelet-cgroup` that does not exist yet:
/// it falls back to host and says so in `/health/ready` and its metrics; once the cgroup appears
/// it is found on the next look and trusted alone, without a restart.
#[test]
fn the_agent_falls_back_to_host_until_the_kubelets_cgroup_appears() {
    require_privileges!();
    let cgroup = TestCgroup::new();
    let kubelet = cgroup.path().join("kubelet.service");
    let kubelet_arg = kubelet.display().to_string();
    let guard = EbpfAgent::start_with(&cgroup, |args| {
        Agent::builder()
            .pods(&[])
            .args(args)
            .args([
                "--probe-bypass-from",
                "kubelet",
                "--kubelet-cgroup",
                &kubelet_arg,
            ])
            .start()
    });
    let agent = guard.agent();
    let metric = |name: &str| {
        agent.get("/metrics").and_then(|(_, body)| {
            body.lines().find_map(|line| {
                line.strip_prefix(&format!("probe_bypass_{name} "))
                    .map(str::to_owned)
            })
        })
    };
    let (_, ready) = agent.get("/health/ready").expect("ready answers");
    assert!(
        ready.contains("probe bypass: host, not kubelet") && ready.contains(&kubelet_arg),
        "{ready}"
    );
    assert_eq!(metric("kubelet_cgroup_not_found").as_deref(), Some("1"));
    assert_eq!(metric("kubelet_cgroup_trusted").as_deref(), Some("0"));
    assert!(
        agent.log_text().contains("falling back to host"),
        "{}",
        agent.log_text()
    );

    fs::create_dir(&kubelet).expect("the kubelet's cgroup appears");
    let created = ChildCgroup::adopt(kubelet);
    // The agent looks again every 10 s.
    let deadline = std::time::Instant::now() + Duration::from_secs(25);
    while metric("kubelet_cgroup_trusted").as_deref() != Some("1") {
        assert!(
            std::time::Instant::now() < deadline,
            "the agent did not take the kubelet's cgroup:\n{}",
            agent.log_text()
        );
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(metric("kubelet_cgroup_not_found").as_deref(), Some("0"));
    let (_, ready) = agent.get("/health/ready").expect("ready answers");
    assert!(!ready.contains("probe bypass"), "{ready}");
    assert!(
        agent.log_text().contains("the kubelet's cgroup is now"),
        "{}",
        agent.log_text()
    );
    drop(guard);
    drop(created);
}

/// Two listeners of one SO_REUSEPORT group, as an old and a new agent have during a rolling
/// update, one given the datapath's sk_reuseport program. Connections the kernel queued at the
/// first, which nobody accepted, must go to the second when the first closes (as when its agent
/// is killed), not be reset: every client is accepted by the second and gets its byte through.
#[test]
fn a_closing_listeners_queued_connections_move_to_the_other_listener_of_its_group() {
    require_privileges!();
    let mut node = Node::new();
    let program = node.datapath().reuseport_program();
    let probe = probe_bypass::listen::shared("127.0.0.1:0".parse().expect("an address"))
        .expect("a free port");
    let addr = probe.local_addr().expect("its address");
    drop(probe);
    let first = probe_bypass::listen::shared(addr).expect("the first listener");
    probe_bypass::listen::migrate_on_close(&first, program.as_fd()).expect("attach the program");
    let second = probe_bypass::listen::shared(addr).expect("the second listener");

    const CLIENTS: usize = 32;
    let clients: Vec<std::net::TcpStream> = (0..CLIENTS)
        .map(|_| {
            let mut client = std::net::TcpStream::connect(addr).expect("connect");
            client.write_all(b"x").expect("write");
            client
        })
        .collect();
    // Both listeners have some of them queued; the first closes without accepting any.
    drop(first);
    let mut accepted = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while accepted < CLIENTS && std::time::Instant::now() < deadline {
        match second.accept() {
            Ok((mut conn, _)) => {
                conn.set_nonblocking(false).expect("blocking");
                conn.set_read_timeout(Some(Duration::from_secs(1)))
                    .expect("timeout");
                let mut byte = [0u8; 1];
                conn.read_exact(&mut byte).expect("the client's byte");
                accepted += 1;
            }
            Err(error) if error.kind() == std::io::ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(error) => panic!("accept: {error}"),
        }
    }
    assert_eq!(
        accepted, CLIENTS,
        "the second listener accepted {accepted} of {CLIENTS}: the rest were lost with the first"
    );
    drop(clients);
}

#[test]
fn a_meshed_pods_own_connections_meet_its_outbound_port_but_not_the_proxys() {
    require_privileges!();
    let mut node = Node::new();
    let source = Listening::new(&node.cgroup);
    let elsewhere = Listening::new(&node.cgroup);
    node.mesh(&source.pod, Exclusions::default());
    let (to, own) = (elsewhere.ip(), source.ip());

    // The app's call lands on the proxy's outbound port, which learns where it was going.
    assert!(node.connect(Some(&source.pod), None, to, 8080));
    assert_eq!(source.next(), format!("15001 {to}:8080"));
    // The proxy's own call (UID 1500) goes where it asked.
    assert!(node.connect(Some(&source.pod), Some(1500), to, 8080));
    assert_eq!(elsewhere.next(), "8080 none");
    // Loopback and the pod's own address stay inside the pod, as under iptables.
    assert!(node.connect(
        Some(&source.pod),
        None,
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        8080
    ));
    assert_eq!(source.next(), "8080 none");
    assert!(node.connect(Some(&source.pod), None, own, 8080));
    assert_eq!(source.next(), "8080 none");
    // The proxy calling its own pod's address meets the inbound redirect, as under iptables.
    assert!(node.connect(Some(&source.pod), Some(1500), own, 8080));
    assert_eq!(source.next(), format!("15003 {own}:8080"));
}

#[test]
fn ipv6_connections_meet_the_proxy_and_learn_their_original_destination() {
    require_privileges!();
    let mut node = Node::new();
    let target = Listening::new(&node.cgroup);
    let source = Listening::new(&node.cgroup);
    let (target_v6, source_v6) = (target.pod.add_ipv6(), source.pod.add_ipv6());
    for (pod, v6) in [(&target.pod, target_v6), (&source.pod, source_v6)] {
        let addrs = vec![IpAddr::V4(pod.ip), IpAddr::V6(v6)];
        node.mesh_with_addrs(pod, addrs, Exclusions::default());
    }
    let target_v6 = IpAddr::V6(target_v6);

    // Inbound: from the host to the pod's IPv6 address, through the inbound port, which learns
    // the original address with IP6T_SO_ORIGINAL_DST.
    assert!(node.connect(None, None, target_v6, 8080));
    assert_eq!(target.next(), format!("15003 [{target_v6}]:8080"));
    // The kubelet's bypass holds on IPv6 too.
    assert!(node.connect(None, None, target_v6, 15904));
    assert_eq!(target.next(), "15904 none");

    // Outbound: the pod's own IPv6 call lands on its proxy's outbound port on ::1. The
    // destination need not exist: the redirect happens before any packet leaves.
    let away: IpAddr = "2001:db8::7".parse().expect("address");
    assert!(node.connect(Some(&source.pod), None, away, 8080));
    assert_eq!(source.next(), format!("15001 [{away}]:8080"));
    // The pod's own IPv6 address stays inside the pod.
    assert!(node.connect(Some(&source.pod), None, IpAddr::V6(source_v6), 8080));
    assert_eq!(source.next(), "8080 none");

    let counters = node.counters();
    assert_eq!(counters.redirected_inbound, 1);
    assert_eq!(counters.redirected_outbound, 1);
    assert_eq!(counters.probe_bypassed, 1);
}

#[test]
fn exclusions_keep_connections_away_from_the_proxy() {
    require_privileges!();
    let mut node = Node::new();
    let source = Listening::new(&node.cgroup);
    let target = Listening::new(&node.cgroup);
    let elsewhere = Listening::new(&node.cgroup);
    node.mesh(
        &source.pod,
        Exclusions {
            outbound_ports: [8080].into(),
            outbound_ip_ranges: [format!("{}/32", target.ip()).parse().expect("cidr")].into(),
            ..Exclusions::default()
        },
    );
    node.mesh(
        &target.pod,
        Exclusions {
            inbound_ports: [15001].into(),
            ..Exclusions::default()
        },
    );

    // Excluded outbound port: straight to the destination.
    assert!(node.connect(Some(&source.pod), None, elsewhere.ip(), 8080));
    assert_eq!(elsewhere.next(), "8080 none");
    // Excluded outbound range: the source's proxy is skipped, the target's inbound rules apply.
    assert!(node.connect(Some(&source.pod), None, target.ip(), 15904));
    assert_eq!(target.next(), format!("15003 {}:15904", target.ip()));
    // Excluded inbound port, from the host.
    assert!(node.connect(None, None, target.ip(), 15001));
    assert_eq!(target.next(), "15001 none");
    // Not excluded: through the proxy.
    assert!(node.connect(Some(&source.pod), None, elsewhere.ip(), 15904));
    assert_eq!(source.next(), format!("15001 {}:15904", elsewhere.ip()));
}

/// Runs `probe-bypass uninstall` on the node's pins with `extra` arguments.
fn run_uninstall(node: &Node, extra: &[&str]) -> std::process::Output {
    Command::new(probe_bypass_testing::agent_bin())
        .arg("uninstall")
        .arg("--pin-path")
        .arg(node.pins.path())
        .args(extra)
        .output()
        .expect("run probe-bypass uninstall")
}

#[test]
fn uninstall_refuses_while_pods_depend_on_the_datapath_and_names_them() {
    require_privileges!();
    let mut node = Node::new();
    let (replaced, kept, gone) = (routed_pod(), routed_pod(), routed_pod());
    for (pod, dependent) in [
        (&replaced, Some("shop/replaced")),
        (&kept, None),
        (&gone, Some("shop/gone")),
    ] {
        node.datapath()
            .upsert_pod(&PodRules {
                addrs: vec![IpAddr::V4(pod.ip)],
                netns_cookie: pod.netns_cookie(),
                exclusions: Exclusions::default(),
                dependent: dependent.map(str::to_owned),
            })
            .expect("mesh the pod");
    }
    node.datapath()
        .remove_pod(IpAddr::V4(gone.ip))
        .expect("remove a pod");
    assert_eq!(
        datapath::dependents(node.pins.path()).expect("read the dependents"),
        ["shop/replaced"],
        "a removed pod leaves no record"
    );

    // The agent stops; the datapath stays, and so does what it knows of its dependents.
    node.datapath = None;
    let refused = run_uninstall(&node, &[]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "uninstall went ahead: {stderr}");
    assert!(
        stderr.contains("shop/replaced") && stderr.contains("--force"),
        "the refusal names the pod and the way out: {stderr}"
    );
    assert!(node.pins.path().join("links/pb_connect4").exists());
    assert_eq!(node.attached(), ATTACHED, "the datapath is left in place");

    // A restarted agent keeps the record of a pod still in the maps.
    node.install(settings());
    assert_eq!(
        datapath::dependents(node.pins.path()).expect("read the dependents"),
        ["shop/replaced"]
    );
    node.datapath = None;

    let forced = run_uninstall(&node, &["--force"]);
    let stderr = String::from_utf8_lossy(&forced.stderr);
    assert!(
        forced.status.success(),
        "uninstall --force failed: {stderr}"
    );
    assert!(
        stderr.contains("shop/replaced"),
        "the warning names the pod: {stderr}"
    );
    assert!(!node.pins.path().exists());
    assert_eq!(node.attached(), Vec::<String>::new());
}

#[test]
fn a_removed_pod_leaves_no_entry_and_meets_no_redirect() {
    require_privileges!();
    let mut node = Node::new();
    let target = Listening::new(&node.cgroup);
    node.mesh(
        &target.pod,
        Exclusions {
            inbound_ports: [9999].into(),
            ..Exclusions::default()
        },
    );
    assert_eq!(node.datapath().pods(), [target.ip()].into());
    node.datapath().remove_pod(target.ip()).expect("remove");
    assert!(node.datapath().pods().is_empty());

    assert!(node.connect(None, None, target.ip(), 8080));
    assert_eq!(target.next(), "8080 none");

    // A fresh install over the same pins finds nothing left of the pod.
    node.install(settings());
    assert!(node.datapath().pods().is_empty());
}

#[test]
fn pods_survive_a_reinstall_and_keep_their_redirects_meanwhile() {
    require_privileges!();
    let mut node = Node::new();
    let target = Listening::new(&node.cgroup);
    node.mesh(&target.pod, Exclusions::default());
    let ip = target.ip();

    // The agent goes away: the handles are dropped, the pinned programs and maps stay.
    node.datapath = None;
    assert_eq!(node.attached(), ATTACHED);
    assert!(node.connect(None, None, ip, 8080));
    assert_eq!(target.next(), format!("15003 {ip}:8080"));

    // The next agent finds the pod in the pinned maps.
    node.install(settings());
    assert_eq!(node.datapath().pods(), [ip].into());
    assert!(node.connect(None, None, ip, 8080));
    assert_eq!(target.next(), format!("15003 {ip}:8080"));
}

#[test]
fn processes_outside_the_cgroup_are_not_touched() {
    require_privileges!();
    let mut node = Node::new();
    let target = Listening::new(&node.cgroup);
    node.mesh(&target.pod, Exclusions::default());
    let status = Command::new("timeout")
        .args([
            "3",
            "bash",
            "-c",
            &format!("exec 3<>/dev/tcp/{}/8080", target.ip()),
        ])
        .status()
        .expect("run bash");
    assert!(status.success());
    assert_eq!(target.next(), "8080 none");
    assert_eq!(node.counters().connects, 0);
}

/// Connects `count` times to `dst`:`port`, from source ports `first_port`, `first_port + 1`, …,
/// waiting each time for the server to close first.
const CLIENT: &str = r#"
use Socket; my ($dst, $port, $first, $count) = @ARGV;
for my $i (0 .. $count - 1) {
  socket(my $s, PF_INET, SOCK_STREAM, 0) or die "socket: $!";
  setsockopt($s, SOL_SOCKET, SO_REUSEADDR, 1);
  bind($s, pack_sockaddr_in($first + $i, INADDR_ANY)) or die "bind: $!";
  connect($s, pack_sockaddr_in($port, inet_aton($dst))) or die "connect: $!";
  my $eof; sysread($s, $eof, 1); close $s;
}
"#;

#[test]
fn two_pods_calling_out_at_once_on_the_same_ports_each_reach_their_own_destination() {
    require_privileges!();
    let mut node = Node::new();
    let pods = [Listening::new(&node.cgroup), Listening::new(&node.cgroup)];
    let destinations = [routed_pod(), routed_pod()];
    for pod in &pods {
        node.mesh(&pod.pod, Exclusions::default());
    }
    const CALLS: usize = 50;
    // Both pods use the same source ports towards their proxies at the same moment, so the two
    // connections have identical loopback addresses and ports, told apart by namespace only.
    let clients: Vec<Child> = pods
        .iter()
        .zip(&destinations)
        .map(|(pod, destination)| {
            let args = [
                "netns",
                "exec",
                &pod.pod.netns_name,
                "perl",
                "-e",
                CLIENT,
                &destination.ip.to_string(),
                "8080",
                "41000",
                &CALLS.to_string(),
            ];
            node.cgroup
                .command("ip", &args)
                .spawn()
                .expect("start a client")
        })
        .collect();
    for mut client in clients {
        assert!(client.wait().expect("wait for a client").success());
    }
    for (pod, destination) in pods.iter().zip(&destinations) {
        let wanted = format!("15001 {}:8080", destination.ip);
        for call in 0..CALLS {
            assert_eq!(pod.next(), wanted, "call {call} from {}", pod.ip());
        }
    }
}

#[test]
fn restarting_or_killing_the_agent_under_traffic_loses_no_redirect() {
    use probe_bypass_testing::agent::{Agent, ManifestDir};

    require_privileges!();
    let cgroup = TestCgroup::new();
    // The agent serves the healthcheck on 15904 itself.
    let target = Listening::on(&cgroup, &PORTS[..3]);
    let pin_guard = TestPins::new();
    let pins = pin_guard.arg();
    let cgroup_root = cgroup.path().to_string_lossy().into_owned();
    let args = [
        "--datapath",
        "ebpf",
        "--cgroup-root",
        &cgroup_root,
        "--pin-path",
        &pins,
    ];
    let dir = ManifestDir::new();
    dir.write("target.json", &target.pod.manifest("target", &[8080]));
    let mut agent = Agent::start(&dir.path, &args);
    agent.wait_ready(200, Duration::from_secs(5));

    // Steady traffic from the host to the pod's app port for the whole test.
    let script = format!(
        "while :; do exec 3<>/dev/tcp/{}/8080 && exec 3>&-; done",
        target.ip()
    );
    let mut traffic = cgroup
        .command("bash", &["-c", &script])
        .spawn()
        .expect("start the traffic");

    let wait_for_traffic = |least: usize| {
        for _ in 0..least {
            let line = target.next();
            assert_eq!(
                line,
                format!("15003 {}:8080", target.ip()),
                "a connection skipped the proxy"
            );
        }
    };
    wait_for_traffic(20);
    let (status, _) = agent.terminate();
    assert!(status.success());
    wait_for_traffic(20);

    let agent = Agent::start(&dir.path, &args);
    agent.wait_ready(200, Duration::from_secs(5));
    wait_for_traffic(20);
    let pid = nix::unistd::Pid::from_raw(i32::try_from(agent.pid()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("SIGKILL");
    drop(agent);
    wait_for_traffic(20);

    let agent = Agent::start(&dir.path, &args);
    agent.wait_ready(200, Duration::from_secs(5));
    wait_for_traffic(20);

    let _ = traffic.kill();
    let _ = traffic.wait();
    drop(agent);
    let report = datapath::uninstall(pin_guard.path()).expect("uninstall");
    assert!(report.left.is_empty(), "left behind: {:?}", report.left);
}

#[test]
fn connections_from_another_node_meet_the_proxy_and_learn_their_original_destination() {
    require_privileges!();
    let mut node = Node::new();
    let target = Listening::on(&node.cgroup, &["8080", "9090", "15003", "15904"]);
    let target_v6 = target.pod.add_ipv6();
    node.mesh_with_addrs(
        &target.pod,
        vec![target.ip(), IpAddr::V6(target_v6)],
        Exclusions {
            inbound_ports: [9090].into(),
            ..Exclusions::default()
        },
    );
    node.guard_inbound(&target.pod);
    let (ip, ip_v6) = (target.ip(), IpAddr::V6(target_v6));

    // An app port, from an app and from a proxy's UID: the proxy's inbound port, which learns the
    // original destination (IPv4 and IPv6 alike).
    assert!(node.connect_from_another_node(None, None, ip, 8080));
    assert_eq!(target.next(), format!("15003 {ip}:8080"));
    assert!(node.connect_from_another_node(None, Some(1500), ip, 8080));
    assert_eq!(target.next(), format!("15003 {ip}:8080"));
    assert!(node.connect_from_another_node(None, None, ip_v6, 8080));
    assert_eq!(target.next(), format!("15003 [{ip_v6}]:8080"));
    // A probe port: not the kubelet, so the proxy.
    assert!(node.connect_from_another_node(None, None, ip, 15904));
    assert_eq!(target.next(), format!("15003 {ip}:15904"));
    // The inbound-excluded port and the proxy's own port: straight through.
    assert!(node.connect_from_another_node(None, None, ip, 9090));
    assert_eq!(target.next(), "9090 none");
    assert!(node.connect_from_another_node(None, None, ip_v6, 15003));
    assert_eq!(target.next(), "15003 none");

    // Connections made on this node keep the path connect() chose for them: no second redirect.
    assert!(node.connect(None, None, ip, 15904));
    assert_eq!(target.next(), "15904 none");
    assert!(node.connect(None, None, ip_v6, 8080));
    assert_eq!(target.next(), format!("15003 [{ip_v6}]:8080"));

    let counters = node.counters();
    assert_eq!(counters.remote_redirected, 4);
    assert_eq!(counters.remote_excluded, 1);
    assert_eq!(counters.remote_refused, 0);
    assert_eq!(counters.probe_bypassed, 1);
    assert_eq!(counters.redirected_inbound, 1);
}

#[test]
fn one_pass_takes_over_a_proxy_listening_before_the_programs_and_a_pod_without_one_refuses() {
    require_privileges!();
    // The proxy listens first; the datapath is installed afterwards, so sockops never saw it.
    let cgroup = TestCgroup::new();
    let older = Listening::on(&cgroup, &["8080", "15003"]);
    let mut node = Node::with_cgroup(cgroup);
    // These listen under the programs: sockops files the first one's listeners.
    let newer = Listening::on(&node.cgroup, &["8080", "15003"]);
    let without = Listening::on(&node.cgroup, &["8080"]);
    for pod in [&older, &newer, &without] {
        node.mesh(&pod.pod, Exclusions::default());
    }

    // Without a listener the datapath knows, a connection from another node is refused, as the
    // mesh's redirect to a port nobody listens on is; it never reaches the app.
    node.guard_inbound(&older.pod);
    assert!(!node.connect_from_another_node(None, None, older.ip(), 8080));
    assert_eq!(node.counters().remote_refused, 1);

    // One pass over the pods, as at the agent's start: the map of listeners is read once, for
    // all of them. The older proxy's listeners are found among the processes of its namespace
    // and taken over.
    let filed = FiledListeners::default();
    let inbound = node.guard_inbound_as_the_agent(&newer.pod, &filed);
    assert!(matches!(inbound, Inbound::Known), "{inbound:?}");
    let inbound = node.guard_inbound_as_the_agent(&older.pod, &filed);
    assert!(
        matches!(inbound, Inbound::TookOver { listeners: 2, .. }),
        "the IPv4 and the IPv6 listener: {inbound:?}"
    );
    let inbound = node.guard_inbound_as_the_agent(&without.pod, &filed);
    assert!(
        matches!(inbound, Inbound::TookOver { listeners: 0, .. }),
        "{inbound:?}"
    );
    // A proxy that listens after the pass read the map: sockops files it, the pass does not know
    // and takes it over, the same sockets under the same keys.
    let late = Listening::on(&node.cgroup, &["8080", "15003"]);
    node.mesh(&late.pod, Exclusions::default());
    let inbound = node.guard_inbound_as_the_agent(&late.pod, &filed);
    assert!(
        matches!(inbound, Inbound::TookOver { listeners: 2, .. }),
        "{inbound:?}"
    );

    for pod in [&older, &newer, &late] {
        assert!(node.connect_from_another_node(None, None, pod.ip(), 8080));
        assert_eq!(pod.next(), format!("15003 {}:8080", pod.ip()));
    }
    // sk_lookup is attached without a listener too: refused, not let past the proxy.
    assert!(!node.connect_from_another_node(None, None, without.ip(), 8080));
    assert_eq!(node.counters().remote_refused, 2);
    for pod in [&older, &newer, &without, &late] {
        let links = netns_links(pod.pod.netns().id().ino).unwrap_or_else(|error| panic!("{error}"));
        assert_eq!(links.len(), 1, "sk_lookup attached to each pod");
    }
}

#[test]
fn detaching_a_pod_leaves_its_namespace_as_it_was_and_a_reinstall_keeps_the_rest() {
    require_privileges!();
    let mut node = Node::new();
    let kept = Listening::new(&node.cgroup);
    let removed = Listening::new(&node.cgroup);
    for pod in [&kept.pod, &removed.pod] {
        node.mesh(pod, Exclusions::default());
        node.guard_inbound(pod);
    }
    let links =
        |pod: &TestPod| netns_links(pod.netns().id().ino).unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(links(&kept.pod).len(), 1, "one sk_lookup link per pod");

    // The agent goes away: the links stay, and so does the interception.
    node.datapath = None;
    assert!(node.connect_from_another_node(None, None, kept.ip(), 8080));
    assert_eq!(kept.next(), format!("15003 {}:8080", kept.ip()));

    // The next agent takes the links over and swaps in its own program.
    let before = links(&kept.pod);
    node.install(settings());
    assert_eq!(links(&kept.pod).len(), 1);
    assert_ne!(
        links(&kept.pod),
        before,
        "the new agent's program runs in the link"
    );

    // A removed pod's namespace has nothing attached any more, and its app is reached directly.
    node.datapath().remove_pod(removed.ip()).expect("remove");
    assert!(links(&removed.pod).is_empty());
    assert!(node.connect_from_another_node(None, None, removed.ip(), 8080));
    assert_eq!(removed.next(), "8080 none");

    // Uninstalling detaches the rest.
    node.datapath = None;
    let report = datapath::uninstall(node.pins.path()).expect("uninstall");
    assert!(report.left.is_empty(), "{report:?}");
    assert!(links(&kept.pod).is_empty());
    assert!(node.connect_from_another_node(None, None, kept.ip(), 8080));
    assert_eq!(kept.next(), "8080 none");
}

/// The line of `log` under the kernel programs' target that holds every one of `parts`.
fn decision_line<'a>(log: &'a str, parts: &[&str]) -> Option<&'a str> {
    log.lines().find(|line| {
        line.contains(" probe_bypass::ebpf]") && parts.iter().all(|part| line.contains(part))
    })
}

/// The kernel programs' decision log, asked for with `--ebpf-log debug` or with `RUST_LOG`: the
/// agent's log shows the kubelet's probe bypass, a refused probe from another host process, an
/// inbound and an outbound redirect, an excluded outbound port, `SO_ORIGINAL_DST` and a connection
/// from another node, each with the pod, the addresses and the rule. At the default (`info`, no
/// flag) none of it appears, and nothing reads the programs' log.
#[test]
fn the_kernel_logs_its_decisions_only_when_asked() {
    require_privileges!();
    let cgroup = TestCgroup::new();
    let kubelet = ChildCgroup::new(&cgroup, "kubelet.service");
    let daemon = ChildCgroup::new(&cgroup, "node-exporter.service");
    let kubelet_arg = kubelet.path().display().to_string();
    let target = Listening::on(&cgroup, &["8080", "15001", "15003", "15901"]);
    let other = routed_pod();
    let remote = routed_pod();
    let ip = target.ip();
    let other_ip = IpAddr::V4(other.ip);
    let manifest = target.pod.manifest_with_annotations(
        "target",
        &[8080],
        &[("flomesh.io/outbound-port-exclusion-list", "5432")],
    );
    let runs: [(&str, &[&str], bool); 3] = [
        ("info", &["--ebpf-log", "debug"], true),
        ("info,probe_bypass::ebpf=debug", &[], true),
        ("info", &[], false),
    ];
    for (rust_log, flags, on) in runs {
        let guard = EbpfAgent::start_with(&cgroup, |args| {
            Agent::builder()
                .pods(&[("target.json", &manifest)])
                .args(args)
                .args([
                    "--probe-bypass-from",
                    "kubelet",
                    "--kubelet-cgroup",
                    &kubelet_arg,
                ])
                .args(flags)
                .rust_log(rust_log)
                .start()
        });
        let agent = guard.agent();
        agent.wait_ready(200, Duration::from_secs(10));
        let run = format!("RUST_LOG={rust_log} {flags:?}");

        assert!(connect_from(&kubelet, ip, 15901), "{run}: the kubelet");
        assert_eq!(target.next(), "15901 none", "{run}: the kubelet");
        assert!(connect_from(&daemon, ip, 15901), "{run}: the daemon");
        assert_eq!(
            target.next(),
            format!("15003 {ip}:15901"),
            "{run}: the daemon"
        );
        assert!(connect_from(&daemon, ip, 8080), "{run}: the daemon to 8080");
        assert_eq!(target.next(), format!("15003 {ip}:8080"), "{run}: to 8080");
        let from_pod = |port: u16| {
            let args = connect_command(Some(&target.pod), None, other_ip, port);
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            cgroup.output(args[0], &args[1..]).status.success()
        };
        assert!(from_pod(8080), "{run}: the pod's own call out");
        assert_eq!(
            target.next(),
            format!("15001 {other_ip}:8080"),
            "{run}: out"
        );
        // Nothing listens there: the call fails, past the sidecar.
        assert!(
            !from_pod(5432),
            "{run}: the excluded port reached something"
        );
        let args = connect_command(Some(&remote), None, ip, 8080);
        let status = Command::new(&args[0])
            .args(&args[1..])
            .status()
            .expect("run the client");
        assert!(status.success(), "{run}: from another node");
        assert_eq!(
            target.next(),
            format!("15003 {ip}:8080"),
            "{run}: from another node"
        );

        // Addresses show IPv4-mapped.
        let pod = format!("pod ::ffff:{ip}: ");
        let host_to = |port: u16| format!("{pod}connect to [::ffff:{ip}]:{port} from netns ");
        let wanted: [Vec<String>; 7] = [
            vec![
                host_to(15901),
                "probe port 15901 bypass: caller is kubelet".into(),
            ],
            vec![
                host_to(15901),
                "refused: probe port from non-kubelet caller (host netns, another cgroup)".into(),
            ],
            vec![host_to(8080), "inbound redirect to sidecar 15003".into()],
            vec![
                "SO_ORIGINAL_DST for ".into(),
                format!("answered [::ffff:{ip}]:15901"),
            ],
            vec![format!(
                "(netns {}): connect to [::ffff:{other_ip}]:8080: outbound redirect to sidecar 15001",
                target.pod.netns_cookie()
            )],
            vec![format!(
                "{pod}connect to [::ffff:{other_ip}]:5432: excluded outbound port 5432 by annotation"
            )],
            vec![
                format!("{pod}sk_lookup [::ffff:{}]:", remote.ip),
                format!(
                    "-> [::ffff:{ip}]:8080 from another node: steered to the sidecar's inbound \
                     listener"
                ),
            ],
        ];
        if on {
            for parts in &wanted {
                let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
                // The records reach the agent's log through its ring buffer reader.
                let deadline = std::time::Instant::now() + Duration::from_secs(10);
                while decision_line(&agent.log_text(), &parts).is_none() {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "{run}: no decision line with {parts:?}:\n{}",
                        agent.log_text()
                    );
                    thread::sleep(Duration::from_millis(20));
                }
            }
        } else {
            let log = agent.log_text();
            assert!(
                !log.contains("probe_bypass::ebpf"),
                "{run}: the kernel's log is on:\n{log}"
            );
        }
        drop(guard);
    }
}
