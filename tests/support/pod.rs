//! Test pods: a network namespace joined to the host by a veth, with apps listening inside.
//!
//! Addresses come from 198.18.0.0/15 (the benchmarking range), one /30 per pod: the host end is
//! `.1`, the pod `.2`. A pod asked for IPv6 also gets the same subnet number in 2001:2::/48 (the
//! IPv6 benchmarking range), one /64 per pod, `::1` and `::2`. Names carry the test process id, and
//! each process takes its addresses from a block no other running process holds, so test binaries
//! and benchmarks that run at once do not collide. Everything is deleted when the guard drops.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpStream},
    os::{
        linux::net::SocketAddrExt as _,
        unix::net::{SocketAddr as UnixSocketAddr, UnixListener},
    },
    process::Command,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::Duration,
};

use probe_bypass::{
    netns::{Netns, NetnsWorker, netns_cookie},
    serve::prober::NetnsConnector,
};
use socket2::{Domain, Protocol, Socket, Type};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Pods one test process may create: the address plan gives each process a block of 1024 /30
/// subnets, and the 32768 subnets of 198.18.0.0/15 make [`BLOCKS`] blocks.
const PODS_PER_PROCESS: u32 = 1024;
const BLOCKS: u32 = 32;

/// The block of the address plan this process holds. Test processes that run at once (two test
/// binaries, a benchmark beside a test) must not make pods with the same addresses, whose routes
/// would then go to the other's veth. A block is held by binding an abstract Unix socket named
/// after it, which the kernel releases when the process ends however it ends, and which leaves no
/// file behind.
fn address_block() -> u32 {
    static HELD: OnceLock<AddressBlock> = OnceLock::new();
    HELD.get_or_init(|| {
        AddressBlock::hold(std::process::id() % BLOCKS)
            .unwrap_or_else(|| panic!("all {BLOCKS} address blocks are held by other processes"))
    })
    .number
}

/// A block of the address plan held for as long as the guard lives (see [`address_block`]).
pub struct AddressBlock {
    number: u32,
    _held: UnixListener,
}

impl AddressBlock {
    /// Holds the first block not held by anyone, looking from `first` on.
    fn hold(first: u32) -> Option<Self> {
        (0..BLOCKS).map(|i| (first + i) % BLOCKS).find_map(|block| {
            let name = format!("probe-bypass-test-address-block-{block}");
            let addr = UnixSocketAddr::from_abstract_name(name).expect("abstract name");
            UnixListener::bind_addr(&addr).ok().map(|held| Self {
                number: block,
                _held: held,
            })
        })
    }

    /// A block of its own for a container runtime's pod network (a CNI bridge's subnet), beside
    /// this process's, so that its addresses collide with no test pod's.
    pub fn for_runtime() -> Self {
        address_block();
        Self::hold(std::process::id() % BLOCKS)
            .unwrap_or_else(|| panic!("all {BLOCKS} address blocks are held"))
    }

    /// The block's first /24 (a block spans 16).
    pub fn first_24(&self) -> ipnet::Ipv4Net {
        self.nth_24(0)
    }

    /// The block's `n`th /24, from 0 to 15.
    pub fn nth_24(&self, n: u32) -> ipnet::Ipv4Net {
        assert!(n < 16, "a block spans 16 /24s, not {n}");
        let base =
            u32::from(Ipv4Addr::new(198, 18, 0, 0)) + self.number * PODS_PER_PROCESS * 4 + n * 256;
        ipnet::Ipv4Net::new(Ipv4Addr::from(base), 24).expect("a /24")
    }
}

/// Runs `ip` with `args` and returns what it printed, panicking with its stderr on failure.
pub fn ip(args: &[&str]) -> String {
    let output = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        output.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A pod: network namespace, veth pair and addresses.
pub struct TestPod {
    /// The namespace's name under /run/netns.
    pub netns_name: String,
    pub ip: Ipv4Addr,
    /// The pod's number in the address plan, which also numbers its IPv6 subnet.
    subnet: u32,
    /// The host's link to the pod: the veth this guard made, or a runtime's bridge.
    host_veth: String,
    /// Whether `host_veth` is this guard's to delete (not a runtime's bridge).
    owns_link: bool,
    /// For a pod on another node ([`Self::behind`]): the host's route to it, through that node.
    host_route: Option<String>,
    netns: Arc<Netns>,
    worker: NetnsWorker,
}

impl TestPod {
    pub fn new() -> Self {
        Self::create(None)
    }

    /// A pod that can reach the other test pods through the host ([`Self::route_to_other_pods`]).
    pub fn routed() -> Self {
        let pod = Self::new();
        pod.route_to_other_pods();
        pod
    }

    /// A pod on another node: its veth joins it to `node` (a pod that stands for that node's host
    /// network namespace, which routes for it) instead of to this host, and this host reaches it
    /// through `node`. Its traffic arrives at this node's pods from outside, as from another node.
    pub fn behind(node: &TestPod) -> Self {
        node.exec(&["sysctl", "-qw", "net.ipv4.ip_forward=1"]);
        node.route_to_other_pods();
        Self::create(Some(node))
    }

    fn create(node: Option<&TestPod>) -> Self {
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            n < PODS_PER_PROCESS,
            "a test process may create {PODS_PER_PROCESS} pods"
        );
        let subnet = address_block() * PODS_PER_PROCESS + n;
        let base = u32::from(Ipv4Addr::new(198, 18, 0, 0)) + subnet * 4;
        let host_ip = Ipv4Addr::from(base + 1);
        let pod_ip = Ipv4Addr::from(base + 2);
        let netns_name = format!("pb-test-{pid}-{n}");
        let host_veth = format!("pbt{pid}x{n}");
        ip(&["netns", "add", &netns_name]);
        // From here on, dropping the guard deletes what was made, even if a later step panics.
        let netns = Arc::new(
            Netns::open(&std::path::Path::new("/run/netns").join(&netns_name)).expect("open netns"),
        );
        let mut pod = Self {
            netns_name,
            ip: pod_ip,
            subnet,
            host_veth,
            owns_link: true,
            host_route: None,
            netns,
            worker: NetnsWorker::spawn().expect("netns worker"),
        };
        let ns = pod.netns_name.clone();
        let ns = ns.as_str();
        let veth = pod.host_veth.clone();
        let veth = veth.as_str();
        // The other end of the veth: in this host's namespace, or in the other node's.
        let on_node = |args: &[&str]| match node {
            None => ip(args),
            Some(node) => {
                let mut all = vec!["-n", node.netns_name.as_str()];
                all.extend_from_slice(args);
                ip(&all)
            }
        };
        on_node(&[
            "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
        ]);
        on_node(&["addr", "add", &format!("{host_ip}/30"), "dev", veth]);
        on_node(&["link", "set", veth, "up"]);
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{pod_ip}/30"),
            "dev",
            "eth0",
        ]);
        ip(&["-n", ns, "link", "set", "eth0", "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        ip(&[
            "-n",
            ns,
            "route",
            "add",
            "default",
            "via",
            &host_ip.to_string(),
        ]);
        if let Some(node) = node {
            let route = format!("{pod_ip}/32");
            ip(&["route", "add", &route, "via", &node.ip.to_string()]);
            pod.host_route = Some(route);
        }
        pod.assert_routed_through(node.map_or(veth, |node| node.host_veth.as_str()));
        pod
    }

    /// A pod whose namespace and address a container runtime made: the sandbox of
    /// [`crate::cri::CriNode`] whose pause process is `pid`, with the IP `ip` the CNI gave it and
    /// the runtime's `bridge` joining it to the host. Its namespace is named under /run/netns as
    /// the other test pods' are (`ip netns attach`), so that what runs in a pod runs in it; the
    /// guard removes that name only, and the runtime the rest.
    pub fn sandbox(pid: u32, ip: Ipv4Addr, bridge: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let netns_name = format!("pb-test-{}-cri{n}", std::process::id());
        self::ip(&["netns", "attach", &netns_name, &pid.to_string()]);
        let pod = Self {
            netns: Arc::new(
                Netns::open(&std::path::Path::new("/run/netns").join(&netns_name))
                    .expect("open the sandbox's netns"),
            ),
            netns_name,
            ip,
            subnet: u32::MAX,
            host_veth: bridge.to_owned(),
            owns_link: false,
            host_route: None,
            worker: NetnsWorker::spawn().expect("netns worker"),
        };
        pod.assert_routed_through(bridge);
        pod
    }

    /// Traffic to test pods must only ever leave through a veth this test made.
    fn assert_routed_through(&self, veth: &str) {
        let route = ip(&["route", "get", &self.ip.to_string()]);
        assert!(
            route.contains(&format!("dev {veth} ")),
            "route to test pod {} does not go through {veth}: {route}",
            self.ip,
        );
    }

    /// Gives the pod an IPv6 address beside its IPv4 one, reachable from the host, and returns it.
    /// Duplicate address detection is skipped so that the address is usable at once.
    pub fn add_ipv6(&self) -> Ipv6Addr {
        assert!(
            self.owns_link,
            "a runtime's sandbox has the addresses its CNI gave it"
        );
        let subnet = u16::try_from(self.subnet).expect("the plan has 32768 subnets");
        let host_ip = Ipv6Addr::new(0x2001, 2, 0, subnet, 0, 0, 0, 1);
        let pod_ip = Ipv6Addr::new(0x2001, 2, 0, subnet, 0, 0, 0, 2);
        let veth = self.host_veth.as_str();
        ip(&[
            "addr",
            "add",
            &format!("{host_ip}/64"),
            "dev",
            veth,
            "nodad",
        ]);
        let ns = self.netns_name.as_str();
        ip(&[
            "-n",
            ns,
            "addr",
            "add",
            &format!("{pod_ip}/64"),
            "dev",
            "eth0",
            "nodad",
        ]);
        pod_ip
    }

    /// The pod's network namespace, held open.
    pub fn netns(&self) -> &Arc<Netns> {
        &self.netns
    }

    /// The agent's connector for this pod: its connections start inside the pod's namespace.
    pub fn connector(&self) -> NetnsConnector {
        NetnsConnector::new(self.worker.clone(), Arc::clone(&self.netns))
    }

    /// The cookie of the pod's network namespace, by which the datapath knows the pod.
    pub fn netns_cookie(&self) -> u64 {
        self.worker
            .run_blocking(&self.netns, netns_cookie)
            .expect("the netns cookie")
    }

    /// Address of the healthcheck as the kubelet reaches it.
    pub fn healthcheck(&self) -> SocketAddr {
        SocketAddr::new(self.ip.into(), 15904)
    }

    /// Starts an app listening on `addr` inside the pod (bound in the pod's namespace).
    pub fn listen(&self, addr: SocketAddr) -> App {
        self.listen_with_acceptors(addr, 1)
    }

    /// Like [`Self::listen`], with `acceptors` threads accepting on the one socket. A benchmark
    /// connects faster than a single thread accepts, and a full accept queue drops the next SYN,
    /// which costs that client a 1 s retransmit: a stall of the load generator, not of TCP.
    pub fn listen_with_acceptors(&self, addr: SocketAddr, acceptors: usize) -> App {
        App::accepting(self.bind(addr), acceptors.max(1), |_connection| {})
    }

    /// Starts an HTTP app on `addr` inside the pod that answers every request with 200 and `body`.
    /// It notes the address of every client it accepts ([`App::peers`]).
    pub fn serve_http(&self, addr: SocketAddr, body: &str) -> App {
        let body = body.to_owned();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let noted = Arc::clone(&peers);
        let mut app = App::accepting(self.bind(addr), 1, move |connection| {
            if let Ok(Some(peer)) = connection.peer_addr().map(|peer| peer.as_socket()) {
                noted.lock().expect("peers").push(peer);
            }
            let body = body.clone();
            // A client that is slow to close must not hold up the next one.
            thread::spawn(move || answer_http(connection.into(), &body));
        });
        app.peers = peers;
        app
    }

    /// A listening socket on `addr`, made inside the pod's namespace.
    pub fn bind(&self, addr: SocketAddr) -> Socket {
        self.worker
            .run_blocking(&self.netns, move || listener(addr))
            .unwrap_or_else(|e| panic!("listen on {addr} in {}: {e}", self.netns_name))
    }

    /// Lets this pod reach the other test pods through the host: IPv4 forwarding is switched on for
    /// the host end of this pod's veth only (the kernel checks it on the interface a packet comes
    /// in on). The host's own `ip_forward` is left alone, and the setting goes with the veth.
    pub fn route_to_other_pods(&self) {
        let knob = format!("/proc/sys/net/ipv4/conf/{}/forwarding", self.host_veth);
        std::fs::write(&knob, "1").unwrap_or_else(|e| panic!("write {knob}: {e}"));
    }

    /// Whether something listens (TCP) on each of `ports` in the pod now.
    pub fn listens_on(&self, ports: &[u16]) -> bool {
        let listening = self.exec(&["ss", "-Hltn"]);
        ports.iter().all(|port| {
            listening
                .split_whitespace()
                .any(|field| field.ends_with(&format!(":{port}")))
        })
    }

    /// [`Self::listens_on`], waiting up to `within`.
    pub fn wait_until_listening(&self, ports: &[u16], within: Duration) -> bool {
        let deadline = std::time::Instant::now() + within;
        loop {
            if self.listens_on(ports) {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs a command inside the pod's namespace (`ip netns exec`) and returns what it printed,
    /// panicking if it fails.
    pub fn exec(&self, command: &[&str]) -> String {
        let mut args = vec!["netns", "exec", self.netns_name.as_str()];
        args.extend_from_slice(command);
        ip(&args)
    }

    /// TCP sockets in TIME_WAIT inside the pod's namespace, as `ss` lists them.
    pub fn time_wait_sockets(&self) -> String {
        self.exec(&["ss", "-Htan", "state", "time-wait"])
    }

    /// The manifest the agent reads for this pod, declaring `ports` as tcpSocket probe ports.
    pub fn manifest(&self, name: &str, ports: &[u16]) -> String {
        self.manifest_with_annotations(name, ports, &[])
    }

    /// Like [`Self::manifest`], with `annotations` (name, value) added to the pod's metadata.
    pub fn manifest_with_annotations(
        &self,
        name: &str,
        ports: &[u16],
        annotations: &[(&str, &str)],
    ) -> String {
        let containers: Vec<serde_json::Value> = ports
            .iter()
            .enumerate()
            .map(|(i, port)| {
                serde_json::json!({
                    "name": format!("c{i}"),
                    "image": "app",
                    "livenessProbe": {"tcpSocket": {"port": port}},
                })
            })
            .collect();
        let mut all = serde_json::Map::new();
        all.insert(
            "probe-bypass/netns".to_owned(),
            self.netns_name.clone().into(),
        );
        for (key, value) in annotations {
            all.insert((*key).to_owned(), (*value).into());
        }
        serde_json::json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": "test", "annotations": all},
            "spec": {"containers": containers},
            "status": {"podIP": self.ip.to_string()},
        })
        .to_string()
    }
}

impl Drop for TestPod {
    fn drop(&mut self) {
        if let Some(route) = &self.host_route {
            let _ = Command::new("ip")
                .args(["route", "del", route])
                .stderr(std::process::Stdio::null())
                .status();
        }
        // Deleting the namespace deletes its end of the veth, and with it the host end.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.netns_name])
            .status();
        if self.owns_link {
            let _ = Command::new("ip")
                .args(["link", "del", &self.host_veth])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// A listening socket on `addr` in the calling thread's network namespace, as every app binds
/// one: `SO_REUSEADDR`, so that an app can listen again on the port of one just stopped, and a
/// backlog of 1024, so that a burst of connects does not overflow it.
pub fn listener(addr: SocketAddr) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket)
}

/// A listening app that accepts connections and hands each to its handler, until dropped. The
/// plain app's handler closes the connection at once; the HTTP app's answers first; the sending
/// app's writes its payload first.
pub struct App {
    socket: Arc<Socket>,
    acceptors: Vec<thread::JoinHandle<()>>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
}

impl App {
    fn accepting(
        socket: Socket,
        acceptors: usize,
        handle: impl Fn(Socket) + Clone + Send + 'static,
    ) -> Self {
        let socket = Arc::new(socket);
        let acceptors = (0..acceptors)
            .map(|_| {
                let listener = Arc::clone(&socket);
                let handle = handle.clone();
                thread::spawn(move || {
                    while let Ok((connection, _peer)) = listener.accept() {
                        handle(connection);
                    }
                })
            })
            .collect();
        Self {
            socket,
            acceptors,
            peers: Arc::default(),
        }
    }

    /// An app on `socket` (see [`listener`]) with `acceptors` threads, each serving one connection
    /// at a time: it writes `payload` and then waits for the client to close, so that the client
    /// (with a reset, say), not the app, ends the connection. A benchmark that must make the app's
    /// sockets inside a cgroup runs it in a process of its own there.
    pub fn sending(socket: Socket, acceptors: usize, payload: Arc<[u8]>) -> Self {
        Self::accepting(socket, acceptors.max(1), move |connection| {
            send_then_wait(connection.into(), &payload);
        })
    }

    /// The addresses of the clients an HTTP app accepted, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().expect("peers").clone()
    }
}

/// Answers whatever the client sends first (a request, or the TLS hello of a proxy that expected
/// a peer proxy here) with 200 and `body`, then waits for the client to close: closing with
/// unread bytes would send a reset instead of the answer's FIN.
fn answer_http(mut stream: TcpStream, body: &str) {
    let mut buf = [0u8; 4096];
    if stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .is_err()
        || !matches!(stream.read(&mut buf), Ok(n) if n > 0)
    {
        return;
    }
    let response = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    if stream.write_all(response.as_bytes()).is_ok() {
        let _ = stream.shutdown(Shutdown::Write);
        while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
    }
}

/// Writes `payload`, then reads until the client closes (or is silent for 5 s).
fn send_then_wait(mut stream: TcpStream, payload: &[u8]) {
    if stream.write_all(payload).is_err() {
        return;
    }
    let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 512];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

impl Drop for App {
    fn drop(&mut self) {
        // Shutting a listening socket down wakes every blocked accept() with an error.
        let _ = self.socket.shutdown(Shutdown::Both);
        for acceptor in self.acceptors.drain(..) {
            let _ = acceptor.join();
        }
    }
}
