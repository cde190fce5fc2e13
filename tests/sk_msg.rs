//! Privileged: which connections join the sockhash that sk_msg works on (issue 16). Only those
//! whose both ends are sockets of this node that join too may go in, since sk_msg can move
//! nothing for the others and they would pay for joining all the same: a connection inside a
//! meshed pod (its sidecar and its app over loopback), and one between two meshed pods. A
//! connection from another node must stay out, though its pod's sidecar takes it.
//!
//! Two meshed pods A and B on one node, each with HAProxy as its sidecar, B's app answering
//! HTTP; R is a pod of a second node. Each case holds one connection open and reads the pinned
//! sockhash's keys while it is.
#![expect(
    clippy::expect_used,
    reason = "a test fails by panicking, with a message naming the step that broke"
)]

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    process::{Child, Command, Stdio},
};

use probe_bypass::datapath::short_circuit_sockets;
use probe_bypass_testing::{
    cgroup::TestCgroup,
    in_process::{InProcessDatapath, unused_exclusions},
    pod::TestPod,
    require_privileges,
    sidecar::{HttpResponder, INBOUND_PORT, Sidecar, SidecarConfig},
};

const APP_PORT: u16 = 8080;

/// A client that opens one connection to `to`, sends a GET, reads the first byte of the answer,
/// says `up`, and holds the connection until it is killed.
fn holding_client(command: &mut Command, to: SocketAddr) -> Child {
    let script = format!(
        "exec 3<>/dev/tcp/{}/{} || exit 1; printf 'GET / HTTP/1.1\\r\\nHost: b\\r\\n\\r\\n' >&3; \
         head -c 1 <&3 >/dev/null || exit 1; echo up; exec sleep 30",
        to.ip(),
        to.port()
    );
    let mut child = command
        .args(["bash", "-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the client");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("the client's stdout"))
        .read_line(&mut line)
        .expect("read the client");
    if line.trim() != "up" {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the client to {to} got no answer");
    }
    child
}

struct Held(Child);

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn has(sockets: &[(SocketAddr, SocketAddr)], ip: IpAddr) -> bool {
    sockets
        .iter()
        .any(|(own, peer)| own.ip() == ip || peer.ip() == ip)
}

#[test]
fn only_connections_with_both_ends_on_the_node_join_the_sockhash() {
    require_privileges!();
    let [a, b] = [(); 2].map(|()| TestPod::routed());
    let node2 = TestPod::new();
    let r = TestPod::behind(&node2);
    let cgroup = TestCgroup::new();
    let _sidecars = [&a, &b].map(|pod| Sidecar::start_with(&cgroup, pod, &SidecarConfig::plain()));
    let _app = HttpResponder::start(&cgroup, &b, APP_PORT);
    // Last, so that it goes first: uninstalled before the processes and pods.
    let mut datapath = InProcessDatapath::new(&cgroup);
    datapath.install(true);
    for pod in [&a, &b] {
        datapath.mesh(pod, unused_exclusions(0));
    }
    let to_b = SocketAddr::new(b.ip.into(), APP_PORT);
    let sockets = || short_circuit_sockets(datapath.pin_path()).expect("read the sockhash");

    // From another node: B's sidecar takes the connection (sk_lookup), and hands it to the app
    // over loopback. Only the loopback pair may join.
    let mut outside = Command::new("ip");
    outside.args(["netns", "exec", &r.netns_name]);
    let held = Held(holding_client(&mut outside, to_b));
    let joined = sockets();
    assert!(
        !has(&joined, r.ip.into()),
        "a connection from another node joined the sockhash: {joined:?}"
    );
    assert!(
        joined
            .iter()
            .any(|(own, peer)| own.ip().is_loopback() && peer.port() == APP_PORT),
        "B's sidecar and app over loopback did not join: {joined:?}"
    );
    drop(held);

    // From A: A's client and sidecar, A's sidecar and B's, B's sidecar and app all join, each
    // pair with both of its ends.
    let mut inside = cgroup.command("ip", &["netns", "exec", &a.netns_name]);
    let _held = Held(holding_client(&mut inside, to_b));
    let joined = sockets();
    let between_pods = |own: IpAddr, port: Option<u16>, peer: IpAddr| {
        joined.iter().any(|(o, p)| {
            o.ip() == own && p.ip() == peer && port.is_none_or(|port| o.port() == port)
        })
    };
    assert!(
        between_pods(a.ip.into(), None, b.ip.into())
            && between_pods(b.ip.into(), Some(INBOUND_PORT), a.ip.into()),
        "A's sidecar's connection to B's did not join at both ends: {joined:?}"
    );
}
