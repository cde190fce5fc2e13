//! `probe-bypass validate`, the validation init container's check (issue 14), in netns pods: run
//! inside the pod's network namespace, in the test's cgroup, as UID 65532 with the downward API's
//! environment, before the pod's app and sidecar start, as the kubelet runs it.
//!
//! - With the agent's eBPF datapath serving the pod it passes, over IPv4 and IPv6; then, with the
//!   sidecar and the app started and no iptables rule in the pod, the pod's outcomes hold: a call
//!   from another pod meets the sidecar, the pod's own call goes out through it with its original
//!   destination, and the kubelet's healthcheck call gets past it.
//! - Started before the agent, it says it waits, and passes once the agent serves the pod.
//! - Without an agent, and with the agent at `--datapath none`, it fails within its `--timeout`
//!   with the message that names the node, the agent's mode and what to do; the pod's app port is
//!   not reachable (the app never started).
//! - Told a `--target-range` inside the pod's outbound IP range inclusion list, it passes where
//!   the default range, outside the list, is never redirected.
//! - As the proxy's UID, and on bad input, it refuses with its message.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    net::{IpAddr, SocketAddr, TcpStream},
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use probe_bypass_testing::{
    require_privileges,
    sidecar::{Certificates, INBOUND, OUTBOUND, PROXY_UID, ProxyEvent, Sidecar},
    validation::{
        AGENT_POD, AgentMode, NODE, POD_NAME, POD_NAMESPACE, Stage, VALIDATION_UID, run_bounded,
    },
};

/// The port of the meshed pod's app, which its probe names.
const APP_PORT: u16 = 8080;
/// The `--timeout` of the failing runs: short, and a whole run must end well within [`BOUND`].
const SHORT: &str = "2s";
/// No run of the check may outlive this: its timeout, an attempt, and the status question.
const BOUND: Duration = Duration::from_secs(15);

fn text(output: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn passes_once_the_ebpf_datapath_serves_the_pod_and_the_pod_then_behaves_as_meshed() {
    require_privileges!();
    let stage = Stage::new(AgentMode::Ebpf, APP_PORT);
    let ipv6 = stage.a.add_ipv6();
    let pod_ips = format!("{},{ipv6}", stage.a.ip);
    let output = stage.validate(
        VALIDATION_UID,
        &["--outbound-port", "15001", "--timeout", "10s"],
        &[("POD_IPS", Some(&pod_ips))],
        BOUND,
    );
    eprintln!("{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}\nagent:\n{}",
        text(&output),
        stage.agent_log()
    );
    assert!(
        stdout.contains(&format!(
            "pod {POD_NAMESPACE}/{POD_NAME} is intercepted by the eBPF datapath (IPv4, IPv6)"
        )) && stdout.contains("192.0.2.")
            && stdout.contains("2001:db8:")
            && stdout.contains(&format!("agent {AGENT_POD} on node {NODE}")),
        "{}",
        text(&output)
    );
    assert_eq!(stdout.lines().count(), 1, "one line on success: {stdout}");

    // The pod starts as its init container let it: sidecar and app, and no iptables rule.
    let certs = Certificates::new();
    let sidecar = Sidecar::start(&stage.cgroup, &stage.a, &certs, &certs.issue("A"));
    let _app_a = stage.a.serve_http(any(APP_PORT), "app A");
    let _app_c = stage.c.serve_http(any(APP_PORT), "app C");
    let rules = stage.a.exec(&["iptables-save"]);
    assert!(
        !rules.lines().any(|line| line.starts_with("-A")),
        "the pod has iptables rules: {rules}"
    );

    // Another pod's call meets the sidecar's inbound port, which demands mTLS.
    let mark = sidecar.log_mark();
    let from_c = curl_in(
        &stage,
        Some(&stage.c.netns_name),
        &url(stage.a.ip.into(), APP_PORT),
        &[],
    );
    assert!(
        !from_c.status.success(),
        "plaintext past the sidecar: {}",
        text(&from_c)
    );
    let lines = sidecar.log_since(mark);
    assert!(
        lines.iter().any(|line| line.frontend == INBOUND),
        "C -> A:{APP_PORT} did not meet A's sidecar: {lines:?}"
    );

    // The pod's own call goes out through the sidecar, with its original destination (where the
    // sidecar then demands mTLS of C, which is not meshed, so the call itself fails there).
    let mark = sidecar.log_mark();
    let from_a = curl_in(
        &stage,
        Some(&stage.a.netns_name),
        &url(stage.c.ip.into(), APP_PORT),
        &[],
    );
    let c_app = SocketAddr::new(stage.c.ip.into(), APP_PORT);
    let lines = sidecar.log_since(mark);
    assert!(
        lines.iter().any(|line| line.frontend == OUTBOUND
            && matches!(line.event, ProxyEvent::Forwarded { original_dst, .. } if original_dst == c_app)),
        "A -> C:{APP_PORT} did not go through A's sidecar to {c_app}: {lines:?}\n{}",
        text(&from_a)
    );

    // The kubelet's rewritten probe gets past the sidecar to the agent, which dials the app.
    let mark = sidecar.log_mark();
    let probe = curl_in(
        &stage,
        None,
        &format!("http://{}:15904/fsm-healthcheck", stage.a.ip),
        &["--header", &format!("Original-Tcp-Port: {APP_PORT}")],
    );
    assert!(
        String::from_utf8_lossy(&probe.stdout).ends_with("200"),
        "{}",
        text(&probe)
    );
    let lines = sidecar.log_since(mark);
    assert!(lines.is_empty(), "the probe met the sidecar: {lines:?}");
}

/// The pod's validation starts before the node's agent, as on a node that just booted: it says it
/// waits, then passes once the agent serves the pod.
#[test]
fn waits_for_the_agent_then_passes() {
    require_privileges!();
    let mut stage = Stage::new(AgentMode::Absent, APP_PORT);
    let mut child = stage
        .validation(VALIDATION_UID, &["--timeout", "20s"], &[])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the validation");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
    let mut waiting = String::new();
    stderr.read_line(&mut waiting).expect("a line");
    assert!(
        waiting.contains("not intercepted yet") && waiting.contains("retrying"),
        "{waiting}"
    );
    stage.start_agent(AgentMode::Ebpf);
    let deadline = Instant::now() + BOUND;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the validation did not end once the agent served the pod");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut stdout)
        .expect("stdout");
    assert!(
        status.success() && stdout.contains("is intercepted by the eBPF datapath"),
        "{status}: {stdout}\nagent:\n{}",
        stage.agent_log()
    );
}

#[test]
fn fails_within_its_timeout_without_an_agent_and_names_the_daemonset() {
    require_privileges!();
    let stage = Stage::new(AgentMode::Absent, APP_PORT);
    let output = stage.validate(VALIDATION_UID, &["--timeout", SHORT], &[], BOUND);
    eprintln!("{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    for part in [
        format!("pod {POD_NAMESPACE}/{POD_NAME} on node {NODE} is not intercepted"),
        "--timeout 2s".to_owned(),
        "was not redirected".to_owned(),
        format!("the DaemonSet probe-bypass on node {NODE} is not running"),
        format!("kubectl -n probe-bypass get pods -o wide --field-selector spec.nodeName={NODE}"),
        "kubectl -n probe-bypass logs".to_owned(),
        format!("probe_bypass_datapath_pod{{namespace=\"{POD_NAMESPACE}\",pod=\"{POD_NAME}\"}}"),
    ] {
        assert!(stderr.contains(&part), "no {part:?} in:\n{}", text(&output));
    }
    assert!(output.stdout.is_empty(), "{}", text(&output));
    assert_app_unreachable(&stage);
}

#[test]
fn fails_within_its_timeout_with_the_agent_at_datapath_none_and_says_what_to_set() {
    require_privileges!();
    let stage = Stage::new(AgentMode::NoDatapath, APP_PORT);
    let output = stage.validate(VALIDATION_UID, &["--timeout", SHORT], &[], BOUND);
    eprintln!("{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{}", text(&output));
    for part in [
        format!("on node {NODE} is not intercepted"),
        format!("The agent {AGENT_POD} on node {NODE} serves this pod"),
        "the datapath mode none".to_owned(),
        "nothing replaces the mesh's iptables rules".to_owned(),
        "PROBE_BYPASS_DATAPATH=ebpf".to_owned(),
        "PROBE_BYPASS_WEBHOOK_REPLACE_MESH_INIT=false".to_owned(),
    ] {
        assert!(stderr.contains(&part), "no {part:?} in:\n{}", text(&output));
    }
    assert_app_unreachable(&stage);
}

/// A pod whose outbound IP range inclusion list (carried from FSM's MeshConfig, say) leaves the
/// documentation ranges out has none of its connections there redirected: the default check would
/// hold it forever. Aimed inside the list (`--target-range`, which the rewriter sets), it passes.
#[test]
fn aims_inside_the_pods_inclusion_list_when_told_to() {
    require_privileges!();
    let stage = Stage::with_annotations(
        AgentMode::Ebpf,
        APP_PORT,
        &[(
            "flomesh.io/outbound-ip-range-inclusion-list",
            "10.96.0.0/12",
        )],
    );
    let output = stage.validate(VALIDATION_UID, &["--timeout", SHORT], &[], BOUND);
    assert_eq!(
        output.status.code(),
        Some(1),
        "the default range is outside the inclusion list: {}",
        text(&output)
    );
    let output = stage.validate(
        VALIDATION_UID,
        &["--timeout", SHORT, "--target-range", "10.96.0.0/24"],
        &[],
        BOUND,
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("connections to 10.96.0."),
        "{}\nagent:\n{}",
        text(&output),
        stage.agent_log()
    );
}

#[test]
fn refuses_to_run_as_the_proxy_uid() {
    require_privileges!();
    let stage = Stage::new(AgentMode::Absent, APP_PORT);
    let output = stage.validate(PROXY_UID, &["--timeout", SHORT], &[], BOUND);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("refusing to run as UID 1500, the sidecar proxy's"),
        "{}",
        text(&output)
    );
}

#[test]
fn refuses_to_run_outside_the_pod_and_with_the_port_taken() {
    require_privileges!();
    let stage = Stage::new(AgentMode::Absent, APP_PORT);
    // C's address is not one of A's.
    let c_ip = stage.c.ip.to_string();
    let output = stage.validate(VALIDATION_UID, &[], &[("POD_IP", Some(&c_ip))], BOUND);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains(&format!(
            "POD_IP {c_ip} is not an address of this network namespace"
        )),
        "{}",
        text(&output)
    );
    // A sidecar that started first holds the outbound port.
    let _holder = stage.a.listen(SocketAddr::from(([127, 0, 0, 1], 15001)));
    let output = stage.validate(VALIDATION_UID, &[], &[], BOUND);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("must run before the sidecar"),
        "{}",
        text(&output)
    );
}

/// Bad input needs no pod: it is refused before anything is checked.
#[test]
fn refuses_bad_input_with_its_message() {
    let bin = probe_bypass_testing::agent_bin();
    let run = |args: &[&str], env: &[(&str, &str)]| {
        let mut command = std::process::Command::new(&bin);
        command.arg("validate").args(args);
        for name in [
            "NODE_NAME",
            "POD_NAME",
            "POD_NAMESPACE",
            "POD_IP",
            "POD_IPS",
        ] {
            command.env_remove(name);
        }
        command.envs(env.iter().copied());
        run_bounded(command, BOUND)
    };
    let env = [
        ("NODE_NAME", NODE),
        ("POD_NAME", POD_NAME),
        ("POD_NAMESPACE", POD_NAMESPACE),
    ];
    let output = run(&[], &env);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("POD_IP (status.podIP) not set") && stderr.contains("downward API"),
        "{}",
        text(&output)
    );
    let output = run(&[], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("POD_IP (status.podIP), POD_NAME (metadata.name), POD_NAMESPACE"),
        "{}",
        text(&output)
    );
    let mut full = env.to_vec();
    full.push(("POD_IP", "10.1.2.3.4"));
    let output = run(&[], &full);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr)
            .contains("POD_IP \"10.1.2.3.4\" is not an IP address"),
        "{}",
        text(&output)
    );
    full.pop();
    full.push(("POD_IP", "198.18.0.2"));
    let output = run(&["--outbound-port", "0"], &full);
    assert_eq!(output.status.code(), Some(2), "{}", text(&output));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("0 is not in 1..=65535"),
        "{}",
        text(&output)
    );
    for (range, says) in [
        (
            "10.0.0.0/8,10.1.0.0/16",
            "--target-range has 2 IPv4 ranges (10.0.0.0/8, 10.1.0.0/16)",
        ),
        ("fd00::/8", "no --target-range of the pod's families (IPv4)"),
        (
            "10.0.0.0/33",
            "invalid value '10.0.0.0/33' for '--target-range",
        ),
    ] {
        let output = run(&["--target-range", range], &full);
        assert_eq!(output.status.code(), Some(2), "{}", text(&output));
        assert!(
            String::from_utf8_lossy(&output.stderr).contains(says),
            "no {says:?} in: {}",
            text(&output)
        );
    }
}

fn any(port: u16) -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], port))
}

fn url(ip: IpAddr, port: u16) -> String {
    format!("http://{ip}:{port}/")
}

/// curl in the test's cgroup, in `netns` (the host's when `None`); prints the body, then the status.
fn curl_in(stage: &Stage, netns: Option<&str>, url: &str, extra: &[&str]) -> Output {
    let mut args: Vec<&str> = Vec::new();
    if let Some(netns) = netns {
        args.extend(["netns", "exec", netns]);
    }
    // The body, then the status on a line of its own.
    let curl = "curl -q --silent --show-error --noproxy * --max-time 3 --output -";
    args.extend(curl.split(' '));
    args.extend([
        "--user-agent",
        "kube-probe/1.31",
        "--write-out",
        "\n%{http_code}",
    ]);
    args.extend(extra);
    args.push(url);
    if netns.is_some() {
        stage.cgroup.output("ip", &args)
    } else {
        stage.cgroup.output(args[0], &args[1..])
    }
}

/// Nothing of the pod answers past the failed check: its app never started.
fn assert_app_unreachable(stage: &Stage) {
    let app = SocketAddr::new(stage.a.ip.into(), APP_PORT);
    let connected = TcpStream::connect_timeout(&app, Duration::from_secs(2));
    assert!(
        connected.is_err(),
        "{app} answered before the pod was validated"
    );
}
