//! The agent under test, run as its real binary, and a temporary pod manifests directory.

use std::{
    ffi::{OsStr, OsString},
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use crate::sidecar::TempDir;

/// The agent's binary, `probe-bypass`, as cargo built it for the test or benchmark running now.
///
/// `env!("CARGO_BIN_EXE_probe-bypass")` is set only while cargo compiles the agent package's own
/// tests and benchmarks, not this crate, so the binary is found the way assert_cmd's `cargo_bin`
/// finds it: beside the running executable's directory. A test or benchmark runs from
/// `target/<profile>/deps/<name>-<hash>`, and cargo puts the package's binaries, which it builds
/// for its integration tests and benchmarks, in `target/<profile>/`.
pub fn agent_bin() -> PathBuf {
    let exe = std::env::current_exe()
        .unwrap_or_else(|error| panic!("the path of the running test: {error}"));
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(format!("probe-bypass{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "the agent binary is not at {} (next to the running {}): run the tests and benchmarks \
         through cargo (`cargo test -p probe-bypass`, `cargo bench -p probe-bypass`), which \
         builds it",
        bin.display(),
        exe.display()
    );
    bin
}

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

/// A pod manifests directory, deleted on drop. Writes are atomic (write a dotfile, then rename), as a
/// careful operator or the kubelet's own static-pod writer does.
pub struct ManifestDir {
    pub path: PathBuf,
}

impl ManifestDir {
    pub fn new() -> Self {
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("pb-test-pods-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        fs::create_dir_all(&path).expect("create manifests dir");
        Self { path }
    }

    pub fn write(&self, file: &str, text: &str) {
        let tmp = self.path.join(format!(".{file}.tmp"));
        fs::write(&tmp, text).expect("write manifest");
        fs::rename(&tmp, self.path.join(file)).expect("rename manifest");
    }

    pub fn remove(&self, file: &str) {
        fs::remove_file(self.path.join(file)).expect("remove manifest");
    }
}

impl Drop for ManifestDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A running `probe-bypass run`, killed on drop. Its log goes to a file that is printed if the test
/// fails, so a red test shows what the agent saw. Started by [`AgentBuilder`] ([`Agent::builder`]),
/// or by one of the shorthands for the usual cases ([`Agent::start`], [`Agent::start_kube`]).
pub struct Agent {
    child: Child,
    pub admin: SocketAddr,
    log: PathBuf,
    /// `--admin-socket`, in a directory of the agent's own ([`AgentBuilder::admin_socket`]).
    socket: Option<PathBuf>,
    // Removed on drop, after the agent is killed.
    _run_dir: Option<TempDir>,
    _manifests: Option<ManifestDir>,
}

/// Picks a free loopback port, for an agent's admin endpoints: bound, read, and released, so the
/// agent (or two agents of a surge, which share it) can bind it next.
pub fn free_loopback_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr")
}

/// A test never attaches the eBPF datapath to the cgroup root, which would hook every process on
/// the machine: a command line without `--datapath` gets `--datapath none` (which also wins over a
/// `PROBE_BYPASS_DATAPATH` in the environment), and `--datapath ebpf` must come with
/// `--cgroup-root` (a test cgroup).
fn datapath_args(args: &[OsString]) -> &'static [&'static str] {
    let Some(at) = args.iter().position(|arg| arg == "--datapath") else {
        return &["--datapath", "none"];
    };
    if args.get(at + 1).is_some_and(|mode| mode == "ebpf") {
        assert!(
            args.iter().any(|arg| arg == "--cgroup-root"),
            "a test must confine the datapath to a test cgroup (--cgroup-root)"
        );
    }
    &[]
}

/// The arguments that run the eBPF datapath confined to `cgroup_root`, pinned in `pin_path`.
pub fn ebpf_args<'a>(cgroup_root: &'a str, pin_path: &'a str) -> [&'a str; 6] {
    [
        "--datapath",
        "ebpf",
        "--cgroup-root",
        cgroup_root,
        "--pin-path",
        pin_path,
    ]
}

/// `args` with the value of `flag` replaced by `value`, or the flag and value added when `args`
/// does not have it: how a test runs a command line written elsewhere (a manifest's, a probe's)
/// with the few flags that make it run here.
pub fn with_flag(args: &mut Vec<OsString>, flag: &str, value: impl Into<OsString>) {
    let value = value.into();
    match args.iter().position(|arg| arg == flag) {
        Some(at) if at + 1 < args.len() => args[at + 1] = value,
        _ => args.extend([flag.into(), value]),
    }
}

/// How to run the agent. By default: `probe-bypass run` on a free loopback admin port, without
/// the datapath (see [`datapath_args`]), logging at debug level, in the test's environment; the
/// start waits until its admin endpoint answers.
#[must_use]
pub struct AgentBuilder {
    command_line: Vec<OsString>,
    env: Vec<(OsString, Option<OsString>)>,
    clear_env: bool,
    rust_log: String,
    admin: Option<SocketAddr>,
    admin_socket: bool,
    pods: Option<Vec<(String, String)>>,
    as_nobody: bool,
}

impl AgentBuilder {
    /// Runs `command_line` (what follows the binary's name, `run` first) instead of a bare `run`:
    /// the command line of a manifest, say the DaemonSet's.
    pub fn command_line<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.command_line = args.into_iter().map(|arg| arg.as_ref().into()).collect();
        self
    }

    /// Sets `flag` to `value`: replaces its value in the command line, or adds both.
    pub fn flag(mut self, flag: &str, value: impl Into<OsString>) -> Self {
        with_flag(&mut self.command_line, flag, value);
        self
    }

    /// Removes `flag` and its value from the command line: a flag of a manifest's command line
    /// that cannot work here (one that needs an API server, say).
    pub fn without_flag(mut self, flag: &str) -> Self {
        if let Some(at) = self.command_line.iter().position(|arg| arg == flag) {
            let end = (at + 2).min(self.command_line.len());
            self.command_line.drain(at..end);
        }
        self
    }

    /// Adds `args` at the end of the command line.
    pub fn args<S: AsRef<OsStr>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.command_line
            .extend(args.into_iter().map(|arg| arg.as_ref().into()));
        self
    }

    /// Reads pods from the manifests directory `dir` (`--pod-manifests`).
    pub fn pod_manifests(self, dir: &Path) -> Self {
        self.flag("--pod-manifests", dir)
    }

    /// Reads pods from a manifests directory of the agent's own, holding `pods` (file name,
    /// manifest), removed with the agent (`--pod-source manifests --pod-manifests <it>`).
    pub fn pods(mut self, pods: &[(&str, &str)]) -> Self {
        let pods = pods
            .iter()
            .map(|(file, manifest)| ((*file).to_owned(), (*manifest).to_owned()))
            .collect();
        self.pods = Some(pods);
        self
    }

    /// Sets the environment variable `name` for the agent.
    pub fn env(mut self, name: impl Into<OsString>, value: impl Into<OsString>) -> Self {
        self.env.push((name.into(), Some(value.into())));
        self
    }

    /// Sets every variable of `vars` for the agent.
    pub fn envs<K: Into<OsString>, V: Into<OsString>>(
        mut self,
        vars: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.env.extend(
            vars.into_iter()
                .map(|(name, value)| (name.into(), Some(value.into()))),
        );
        self
    }

    /// Removes the environment variable `name` for the agent.
    pub fn env_remove(mut self, name: impl Into<OsString>) -> Self {
        self.env.push((name.into(), None));
        self
    }

    /// Starts the agent with none of the test's environment: only what [`Self::env`] sets, and
    /// `RUST_LOG`. A test of a manifest gives it exactly the manifest's environment.
    pub fn env_clear(mut self) -> Self {
        self.clear_env = true;
        self
    }

    /// The agent's log filter (`RUST_LOG`); `probe_bypass=debug` unless set. A benchmark runs the
    /// agent at `info`: a debug line per probe would be part of what it measures.
    pub fn rust_log(mut self, filter: &str) -> Self {
        filter.clone_into(&mut self.rust_log);
        self
    }

    /// Serves the admin endpoints on `addr` rather than on a free port of its own: two agents of a
    /// rolling update share the port.
    pub fn admin_addr(mut self, addr: SocketAddr) -> Self {
        self.admin = Some(addr);
        self
    }

    /// Serves the admin socket (`--admin-socket`) in a directory of the agent's own, open to every
    /// user as a pod's emptyDir is, removed with the agent; [`Agent::socket`] says where.
    pub fn admin_socket(mut self) -> Self {
        self.admin_socket = true;
        self
    }

    /// Runs the agent as nobody (65534) when the test runs as root: an agent without the datapath
    /// and without pods needs no privilege, and so proves it.
    pub fn as_nobody(mut self) -> Self {
        self.as_nobody = true;
        self
    }

    /// Starts the agent and waits until its admin endpoint answers, failing with its log if it
    /// exits first or does not answer within 10 s.
    pub fn start(self) -> Agent {
        let mut agent = self.spawn();
        let deadline = Instant::now() + Duration::from_secs(10);
        while agent.get("/health/alive").is_none() {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!(
                    "the agent exited at start ({status}):\n{}",
                    agent.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not come up:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    /// Starts the agent and returns at once, for a test that waits in its own way (on the admin
    /// socket, say, or for the agent to refuse to start).
    pub fn spawn(self) -> Agent {
        let Self {
            mut command_line,
            env,
            clear_env,
            rust_log,
            admin,
            admin_socket,
            pods,
            as_nobody,
        } = self;
        let admin = admin.unwrap_or_else(free_loopback_port);
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!(
            "pb-test-agent-{}-{n}-{}.log",
            std::process::id(),
            admin.port()
        ));
        with_flag(&mut command_line, "--admin-addr", admin.to_string());
        let manifests = pods.map(|pods| {
            let dir = ManifestDir::new();
            for (file, manifest) in &pods {
                dir.write(file, manifest);
            }
            with_flag(&mut command_line, "--pod-source", "manifests");
            with_flag(&mut command_line, "--pod-manifests", &dir.path);
            dir
        });
        let (run_dir, socket) = if admin_socket {
            let dir = TempDir::new("agent-run");
            // Open to every user, as an emptyDir is: the agent may run as nobody.
            fs::set_permissions(&dir.path, fs::Permissions::from_mode(0o777))
                .expect("open the socket's directory");
            let socket = dir.path.join("admin.sock");
            with_flag(&mut command_line, "--admin-socket", &socket);
            (Some(dir), Some(socket))
        } else {
            (None, None)
        };
        let datapath = datapath_args(&command_line);
        command_line.extend(datapath.iter().map(OsString::from));

        let log_file = fs::File::create(&log).expect("agent log file");
        let mut command = Command::new(agent_bin());
        command.args(&command_line);
        if clear_env {
            command.env_clear();
        }
        for (name, value) in env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        command
            .env("RUST_LOG", rust_log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        if as_nobody && nix::unistd::geteuid().is_root() {
            command.uid(NOBODY).gid(NOBODY);
        }
        let child = command.spawn().expect("start the agent");
        Agent {
            child,
            admin,
            log,
            socket,
            _run_dir: run_dir,
            _manifests: manifests,
        }
    }
}

/// The user and group an unprivileged process runs as.
pub const NOBODY: u32 = 65534;

impl Agent {
    /// How to start an agent, from the defaults of [`AgentBuilder`].
    pub fn builder() -> AgentBuilder {
        AgentBuilder {
            command_line: vec!["run".into()],
            env: Vec::new(),
            clear_env: false,
            rust_log: "probe_bypass=debug".to_owned(),
            admin: None,
            admin_socket: false,
            pods: None,
            as_nobody: false,
        }
    }

    /// Starts the agent on `dir` with extra `args` and waits until its admin endpoint answers. It
    /// logs at debug level, so the log of a failing test shows every request the agent answered.
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        Self::builder().pod_manifests(dir).args(args).start()
    }

    /// Like [`Self::start`], with `rust_log` as the agent's log filter (`RUST_LOG`).
    pub fn start_with_log_filter(dir: &Path, args: &[&str], rust_log: &str) -> Self {
        Self::builder()
            .pod_manifests(dir)
            .args(args)
            .rust_log(rust_log)
            .start()
    }

    /// Starts the agent with `--pod-source kube` on node `node`, finding the API server through
    /// the kubeconfig at `kubeconfig` (`KUBECONFIG`), with extra `args` and log filter `rust_log`.
    pub fn start_kube(kubeconfig: &Path, node: &str, args: &[&str], rust_log: &str) -> Self {
        Self::builder()
            .flag("--pod-source", "kube")
            .flag("--node-name", node)
            .args(args)
            .rust_log(rust_log)
            .env("KUBECONFIG", kubeconfig)
            // Not in-cluster, whatever the machine running the tests is.
            .env_remove("KUBERNETES_SERVICE_HOST")
            .start()
    }

    /// The admin socket, when the agent was started with one ([`AgentBuilder::admin_socket`]).
    pub fn socket(&self) -> &Path {
        self.socket
            .as_deref()
            .expect("the agent was started with an admin socket (AgentBuilder::admin_socket)")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET on the admin endpoint: status and body, or None if it does not answer.
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect_timeout(&self.admin, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            self.admin
        )
        .ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.get(9..12)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
        Some((status, body))
    }

    /// Waits until `/health/ready` answers `status` about the pods (once the pod source is read),
    /// returning its body.
    pub fn wait_ready(&self, status: u16, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            if let Some((got, body)) = self.get("/health/ready") {
                // Until the pod source is read the agent is not ready whatever the pods are;
                // a test waiting for a 503 waits for the one about its pods.
                let unread = body.starts_with("not ready: pod source not read yet");
                if got == status && !unread {
                    return body;
                }
                assert!(
                    Instant::now() < deadline,
                    "/health/ready stayed {got} ({body}), expected {status}:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `done` holds, failing with the agent's log after `within` or if it exits.
    pub fn wait_until(
        &mut self,
        what: &str,
        within: Duration,
        mut done: impl FnMut(&Self) -> bool,
    ) {
        self.poll(within, |agent| {
            if done(agent) {
                Ok(())
            } else {
                Err(format!("{what} did not happen"))
            }
        });
    }

    /// Polls `check` until it is `Ok`, failing the test with the last `Err` and the agent's log
    /// after `within`, or if the agent exits.
    pub fn poll<T>(
        &mut self,
        within: Duration,
        mut check: impl FnMut(&Self) -> Result<T, String>,
    ) -> T {
        let deadline = Instant::now() + within;
        loop {
            let last = match check(self) {
                Ok(value) => return value,
                Err(last) => last,
            };
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the agent exited ({status}):\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{last}, within {within:?}:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Polls `path` on the admin endpoint until it answers 200, failing the test after `within`.
    pub fn wait_for_200(&mut self, path: &str, within: Duration) {
        self.poll(within, |agent| match agent.get(path) {
            Some((200, _)) => Ok(()),
            answer => Err(format!(
                "{path} answered {:?}, not 200",
                answer.map(|(status, _)| status)
            )),
        });
    }

    /// Whether the agent is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait for the agent").is_none()
    }

    /// Waits up to `within` for the agent to exit on its own: its exit status, or `None` (and the
    /// agent killed) if it still ran then.
    pub fn wait_for_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the agent") {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit, returning its status and how long it took. The log,
    /// the admin socket's directory and the manifests stay until the agent is dropped.
    pub fn terminate(&mut self) -> (ExitStatus, Duration) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"));
        let started = Instant::now();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM");
        let deadline = started + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return (status, started.elapsed());
            }
            assert!(
                Instant::now() < deadline,
                "the agent ignored SIGTERM:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The agent's memory now, from /proc.
    pub fn memory(&self) -> Memory {
        Memory::of(self.pid())
    }

    /// Open file descriptors of the agent process.
    pub fn open_fds(&self) -> usize {
        fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read the agent's fds")
            .count()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "--- agent log ({}) ---\n{}",
                self.log.display(),
                self.log_text()
            );
        }
        let _ = fs::remove_file(&self.log);
    }
}

/// A process's memory, from /proc/<pid>/status.
#[derive(Clone, Copy, Debug)]
pub struct Memory {
    /// Resident set size now (VmRSS), in KiB.
    pub rss_kib: u64,
    /// Highest resident set size so far (VmHWM), in KiB.
    pub peak_kib: u64,
}

impl Memory {
    pub fn of(pid: u32) -> Self {
        let path = format!("/proc/{pid}/status");
        let status = fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|line| line.strip_prefix(name))
                .and_then(|rest| rest.trim().strip_suffix("kB"))
                .and_then(|kib| kib.trim().parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {path}:\n{status}"))
        };
        Self {
            rss_kib: field("VmRSS:"),
            peak_kib: field("VmHWM:"),
        }
    }
}
