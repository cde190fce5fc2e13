//! A meshed test pod whose validation init container runs before its app and sidecar, as a pod
//! rewritten with `--replace-mesh-init` starts: `probe-bypass validate` inside the pod's network
//! namespace, in the test's cgroup, as the container's user (65532), with the downward API's
//! environment.
//!
//! [`Stage`] holds the pod, a client pod beside it, the cgroup, the manifests and an agent (eBPF,
//! `--datapath none`, or none at all); the sidecar and the app are the test's to start once the
//! validation passed.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    process::{Command, ExitStatus, Output, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::{
    agent::{Agent, ManifestDir, agent_bin},
    cgroup::TestCgroup,
    ebpf_agent::EbpfAgent,
    pod::TestPod,
};

/// The user the validation container runs as (the webhook's `runAsUser`).
pub const VALIDATION_UID: u32 = 65532;
/// The node name the validation container and the agent are given.
pub const NODE: &str = "node-validate";
/// The agent's pod name (its POD_NAME).
pub const AGENT_POD: &str = "probe-bypass-test-agent";
/// The meshed pod's name and namespace, as its manifest gives them.
pub const POD_NAME: &str = "pod-a";
pub const POD_NAMESPACE: &str = "test";

/// Which agent serves the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentMode {
    /// None at all: the DaemonSet's pod is not running.
    Absent,
    /// `--datapath none`.
    NoDatapath,
    /// `--datapath ebpf`, attached to the stage's cgroup.
    Ebpf,
}

/// The node's agent. With the datapath, its guard uninstalls the pins when it drops, which
/// detaches its programs from the test cgroup, and fails the test if anything is left.
enum Running {
    NoDatapath(Agent),
    Ebpf(EbpfAgent),
}

impl Running {
    fn agent(&self) -> &Agent {
        match self {
            Self::NoDatapath(agent) => agent,
            Self::Ebpf(guard) => guard.agent(),
        }
    }
}

/// The meshed pod `a`, the client pod `c`, and the node's agent.
pub struct Stage {
    running: Option<Running>,
    pub cgroup: TestCgroup,
    pub a: TestPod,
    pub c: TestPod,
    manifests: ManifestDir,
}

impl Stage {
    /// Builds the pods, writes the meshed pod's manifest (a tcpSocket probe on `probe_port`) and
    /// starts the agent in `mode`, waiting until it serves the pod.
    pub fn new(mode: AgentMode, probe_port: u16) -> Self {
        Self::with_annotations(mode, probe_port, &[])
    }

    /// Like [`Self::new`], the meshed pod's manifest with `annotations` (its exclusions, say).
    pub fn with_annotations(
        mode: AgentMode,
        probe_port: u16,
        annotations: &[(&str, &str)],
    ) -> Self {
        let a = TestPod::new();
        let c = TestPod::new();
        a.route_to_other_pods();
        c.route_to_other_pods();
        let cgroup = TestCgroup::new();
        let manifests = ManifestDir::new();
        manifests.write(
            "a.json",
            &a.manifest_with_annotations(POD_NAME, &[probe_port], annotations),
        );
        let mut stage = Self {
            running: None,
            cgroup,
            a,
            c,
            manifests,
        };
        stage.start_agent(mode);
        stage
    }

    /// Starts the node's agent in `mode` (none for [`AgentMode::Absent`]) and waits until it
    /// serves the pod.
    pub fn start_agent(&mut self, mode: AgentMode) {
        assert!(self.running.is_none(), "the node has an agent already");
        let manifests = &self.manifests;
        self.running = match mode {
            AgentMode::Absent => None,
            AgentMode::NoDatapath => Some(Running::NoDatapath(start_agent(
                manifests,
                &["--datapath", "none"],
            ))),
            AgentMode::Ebpf => Some(Running::Ebpf(EbpfAgent::start_with(&self.cgroup, |args| {
                start_agent(manifests, args)
            }))),
        };
    }
    /// The agent's log, or a note that there is none.
    pub fn agent_log(&self) -> String {
        self.running.as_ref().map_or_else(
            || "(no agent)".to_owned(),
            |running| running.agent().log_text(),
        )
    }

    /// The validation container's command in pod `a`: `probe-bypass validate` with `args`, as
    /// `uid`, with the downward API's variables (`env` set on top; a `None` value removes one).
    pub fn validation(&self, uid: u32, args: &[&str], env: &[(&str, Option<&str>)]) -> Command {
        let bin = agent_bin();
        let mut all = vec![
            "netns".to_owned(),
            "exec".to_owned(),
            self.a.netns_name.clone(),
            "setpriv".to_owned(),
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".to_owned(),
            bin.display().to_string(),
            "validate".to_owned(),
        ];
        all.extend(args.iter().map(|arg| (*arg).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        let mut command = self.cgroup.command("ip", &all);
        command
            .env("NODE_NAME", NODE)
            .env("POD_NAME", POD_NAME)
            .env("POD_NAMESPACE", POD_NAMESPACE)
            .env("POD_IP", self.a.ip.to_string())
            .env_remove("POD_IPS")
            .env_remove("PROBE_BYPASS_PROXY_UID");
        for (name, value) in env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        command
    }

    /// Runs [`Self::validation`] to its end, killed (and the test failed) if it outlives `bound`.
    pub fn validate(
        &self,
        uid: u32,
        args: &[&str],
        env: &[(&str, Option<&str>)],
        bound: Duration,
    ) -> Output {
        run_bounded(self.validation(uid, args, env), bound)
    }
}

/// Runs `command` to its end and returns its status and output; kills it and panics when it has
/// not exited within `bound`, which no run of a bounded check may outlive.
pub fn run_bounded(mut command: Command, bound: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|error| panic!("start {command:?}: {error}"));
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let out = thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stdout.read_to_end(&mut text);
        text
    });
    let err = thread::spawn(move || {
        let mut text = Vec::new();
        let _ = stderr.read_to_end(&mut text);
        text
    });
    let deadline = Instant::now() + bound;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the command") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} still ran after {bound:?}");
        }
        thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out.join().expect("stdout reader"),
        stderr: err.join().expect("stderr reader"),
    }
}

/// The agent on `manifests` with `args`, once it serves every pod. It is given the node's name and
/// its own pod's ([`NODE`], [`AGENT_POD`]) as the DaemonSet gives them (the downward API), so that
/// a validation names it.
pub(crate) fn start_agent(manifests: &ManifestDir, args: &[&str]) -> Agent {
    let agent = Agent::builder()
        .pod_manifests(&manifests.path)
        .args(args)
        .env("NODE_NAME", NODE)
        .env("POD_NAME", AGENT_POD)
        .start();
    agent.wait_ready(200, Duration::from_secs(10));
    agent
}

/// `probe-bypass validate` running in a pod, as its init container, in the calling process's
/// cgroup (a benchmark enters the programs' cgroup itself); its end is timed by a thread of its own.
pub struct Waiting {
    /// When the validation exited, and how; sent by the thread that waits for it.
    exited: mpsc::Receiver<(Instant, ExitStatus, String)>,
    pid: u32,
}

impl Waiting {
    /// Starts the validation of `pod` (named `name` in namespace `namespace` for its messages)
    /// with `--timeout timeout`, and returns once it has said that it waits: it runs before the
    /// pod is served.
    pub fn start(pod: &TestPod, name: &str, namespace: &str, timeout: &str) -> Self {
        let uid = VALIDATION_UID.to_string();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &pod.netns_name, "setpriv"])
            .args([format!("--reuid={uid}"), format!("--regid={uid}")])
            .arg("--clear-groups")
            .arg(agent_bin())
            .args(["validate", "--timeout", timeout])
            .env("NODE_NAME", NODE)
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", namespace)
            .env("POD_IP", pod.ip.to_string())
            .env_remove("POD_IPS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("start the validation of {name}: {error}"));
        let pid = child.id();
        let mut stderr = BufReader::new(child.stderr.take().expect("stderr"));
        let mut first = String::new();
        stderr
            .read_line(&mut first)
            .expect("the validation's first line");
        assert!(
            first.contains("not intercepted yet"),
            "the validation of {name} did not wait: {first}"
        );
        let (send, exited) = mpsc::channel();
        thread::spawn(move || {
            let status = child.wait().expect("wait for the validation");
            let at = Instant::now();
            let mut text = String::new();
            let _ = child
                .stdout
                .take()
                .map(|mut out| out.read_to_string(&mut text));
            let _ = stderr.read_to_string(&mut text);
            let _ = send.send((at, status, text));
        });
        Self { exited, pid }
    }

    /// Waits (at most `bound`) for the validation to pass, and returns how long after `started`
    /// it exited; panics, with what it printed, if it failed or is still running.
    pub fn passed(self, started: Instant, bound: Duration) -> Duration {
        match self.exited.recv_timeout(bound) {
            Ok((at, status, text)) => {
                assert!(status.success(), "the validation failed ({status}): {text}");
                at.saturating_duration_since(started)
            }
            Err(_) => {
                let _ = Command::new("kill").arg(self.pid.to_string()).status();
                panic!("the validation still ran after {bound:?}");
            }
        }
    }
}
