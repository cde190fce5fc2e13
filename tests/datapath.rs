//! The eBPF datapath in a real kernel: the embedded programs loaded, attached to a test cgroup,
//! and run by real connections from processes inside and outside that cgroup.
//!
//! Every test attaches under its own child cgroup (never the root), with 127.0.0.1 registered as
//! the meshed pod and a listener of its own on it. Guards detach, kill and remove on drop.
// clippy.toml's allow-expect-in-tests covers `#[test]` functions only, not the helpers they share.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking, with a message naming the step that broke"
)]

mod support;

use std::{
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, TcpListener, TcpStream},
    process::Command,
};

use probe_bypass::datapath::{Counters, Datapath};
use support::cgroup::TestCgroup;

/// The ports the mesh rewrites probes to; the tests' listeners use ephemeral ports, outside them.
const MESH_PROBE_PORTS: [u16; 4] = [15901, 15902, 15903, 15904];

const POD: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A datapath attached to a test cgroup, with [`POD`] meshed and a listener on it.
struct Node {
    // First, so that it detaches before the cgroup goes.
    datapath: Datapath,
    cgroup: TestCgroup,
    listener: TcpListener,
}

impl Node {
    /// `None` when the test cannot run here, after saying why (see [`load_datapath`]).
    fn new() -> Option<Self> {
        let cgroup = TestCgroup::new();
        let mut datapath = load_datapath()?;
        datapath
            .attach(cgroup.path())
            .expect("attach to the test cgroup");
        datapath.insert_pod(POD).expect("register the pod");
        let listener = TcpListener::bind((POD, 0)).expect("listen on the pod address");
        // Never blocks: a test whose connection did not arrive fails instead of hanging.
        listener
            .set_nonblocking(true)
            .expect("make the listener non-blocking");
        Some(Self {
            datapath,
            cgroup,
            listener,
        })
    }

    fn port(&self) -> u16 {
        self.listener.local_addr().expect("listener address").port()
    }

    /// Connects to the listener from a process inside the cgroup and checks that the connection
    /// arrived, unchanged.
    fn connect_from_inside(&mut self) {
        let script = format!("exec 3<>/dev/tcp/{POD}/{}", self.port());
        let status = self.cgroup.run("bash", &["-c", &script]);
        assert!(
            status.success(),
            "the connection from inside the cgroup failed: {status}"
        );
        self.accept();
    }

    /// Connects to the listener from a process outside the cgroup (a child, then the test itself).
    fn connect_from_outside(&mut self) {
        let script = format!("exec 3<>/dev/tcp/{POD}/{}", self.port());
        let status = Command::new("bash")
            .args(["-c", &script])
            .status()
            .expect("run bash");
        assert!(
            status.success(),
            "the connection from outside the cgroup failed: {status}"
        );
        self.accept();
        TcpStream::connect((POD, self.port())).expect("connect from the test process");
        self.accept();
    }

    fn accept(&self) {
        match self.listener.accept() {
            Ok((_, peer)) => assert_eq!(peer.ip(), POD),
            Err(error) if error.kind() == ErrorKind::WouldBlock => {
                panic!("the connection did not reach the listener")
            }
            Err(error) => panic!("accept: {error}"),
        }
    }

    fn counters(&self) -> Counters {
        self.datapath.counters().expect("read the counters")
    }
}

/// Loads the embedded programs. A kernel that refuses for lack of privilege is treated like a
/// missing privilege (skip here, fail in CI); anything else, a verifier rejection above all, fails.
fn load_datapath() -> Option<Datapath> {
    match Datapath::load() {
        Ok(datapath) => Some(datapath),
        Err(error) if error.is_permission_denied() => {
            let reason = format!("{:#}", anyhow::Error::new(error));
            let thread = std::thread::current();
            let test = thread.name().unwrap_or("test");
            if std::env::var_os("CI").is_some() {
                panic!(
                    "{test}: cannot load eBPF ({reason}) and CI is set: privileged tests must run in CI"
                );
            }
            eprintln!("SKIPPED {test}: cannot load eBPF: {reason}");
            None
        }
        Err(error) => panic!(
            "loading the datapath failed: {:?}",
            anyhow::Error::new(error)
        ),
    }
}

/// The programs attached to a cgroup itself (not inherited), as `bpftool` reports them.
fn attached_programs(cgroup: &TestCgroup) -> Vec<String> {
    let output = Command::new("bpftool")
        .args(["--json", "cgroup", "show"])
        .arg(cgroup.path())
        .output()
        .expect("run bpftool (cargo xtask setup installs it)");
    assert!(
        output.status.success(),
        "bpftool cgroup show: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    // bpftool prints an empty line, not `[]`, when nothing is attached.
    if output.stdout.trim_ascii().is_empty() {
        return Vec::new();
    }
    let programs: Vec<serde_json::Value> =
        serde_json::from_slice(&output.stdout).expect("parse bpftool's output");
    programs
        .iter()
        .map(|program| format!("{} {}", program["attach_type"], program["name"]))
        .collect()
}

#[test]
fn connect4_counts_connections_from_processes_in_its_cgroup() {
    require_privileges!();
    let Some(mut node) = Node::new() else { return };
    node.datapath
        .set_probe_ports(&[node.port()])
        .expect("set the probe ports");

    node.connect_from_inside();

    let counters = node.counters();
    assert_eq!(
        counters,
        Counters {
            connect4: 1,
            to_meshed_pod: 1,
            to_probe_port: 1
        }
    );
}

#[test]
fn connect4_ignores_processes_outside_its_cgroup() {
    require_privileges!();
    let Some(mut node) = Node::new() else { return };
    node.datapath
        .set_probe_ports(&[node.port()])
        .expect("set the probe ports");

    node.connect_from_outside();

    assert_eq!(node.counters(), Counters::default());
}

#[test]
fn connect4_counts_a_port_outside_the_probe_ports_as_meshed_only() {
    require_privileges!();
    let Some(mut node) = Node::new() else { return };
    let port = node.port();
    assert!(
        !MESH_PROBE_PORTS.contains(&port),
        "the listener took probe port {port}"
    );
    node.datapath
        .set_probe_ports(&[port, 15904])
        .expect("set the probe ports");
    // Replacing the set drops the listener's port from it.
    node.datapath
        .set_probe_ports(&MESH_PROBE_PORTS)
        .expect("replace the probe ports");

    node.connect_from_inside();

    assert_eq!(
        node.counters(),
        Counters {
            connect4: 1,
            to_meshed_pod: 1,
            to_probe_port: 0
        }
    );
}

#[test]
fn connect4_stops_counting_a_pod_once_it_is_removed() {
    require_privileges!();
    let Some(mut node) = Node::new() else { return };
    node.datapath
        .set_probe_ports(&[node.port()])
        .expect("set the probe ports");
    node.connect_from_inside();

    node.datapath.remove_pod(POD).expect("remove the pod");
    node.datapath
        .remove_pod(POD)
        .expect("removing it again is no error");
    node.connect_from_inside();

    assert_eq!(
        node.counters(),
        Counters {
            connect4: 2,
            to_meshed_pod: 1,
            to_probe_port: 1
        }
    );
}

#[test]
fn a_detached_datapath_no_longer_counts_connections() {
    require_privileges!();
    let Some(mut node) = Node::new() else { return };
    node.connect_from_inside();
    let before = node.counters();
    assert_eq!(before.to_meshed_pod, 1, "{before:?}");

    node.datapath.detach().expect("detach");
    node.connect_from_inside();

    assert_eq!(node.counters(), before);
}

#[test]
fn dropping_the_datapath_detaches_it_from_the_cgroup() {
    require_privileges!();
    let Some(node) = Node::new() else { return };
    let Node {
        datapath,
        cgroup,
        listener: _listener,
    } = node;
    assert_eq!(
        attached_programs(&cgroup),
        [r#""cgroup_inet4_connect" "connect4""#],
    );

    drop(datapath);

    assert_eq!(attached_programs(&cgroup), Vec::<String>::new());
}
