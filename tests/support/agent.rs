//! The agent under test, run as its real binary, and a temporary pod manifests directory.

use std::{
    ffi::OsString,
    fs,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

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
/// fails, so a red test shows what the agent saw.
pub struct Agent {
    child: Child,
    pub admin: SocketAddr,
    log: PathBuf,
}

/// Picks a free loopback port for the admin endpoints.
fn free_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr")
}

/// A test never attaches the eBPF datapath to the cgroup root, which would hook every process on the
/// machine: without `--datapath` the agent runs with `--datapath none`, and `--datapath ebpf` must
/// come with `--cgroup-root` (a test cgroup).
fn datapath_args(args: &[&str]) -> &'static [&'static str] {
    let Some(at) = args.iter().position(|arg| *arg == "--datapath") else {
        return &["--datapath", "none"];
    };
    if args.get(at + 1) == Some(&"ebpf") {
        assert!(
            args.contains(&"--cgroup-root"),
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

impl Agent {
    /// Starts the agent on `dir` with extra `args` and waits until its admin endpoint answers. It
    /// logs at debug level, so the log of a failing test shows every request the agent answered.
    pub fn start(dir: &Path, args: &[&str]) -> Self {
        Self::start_with_log_filter(dir, args, "probe_bypass=debug")
    }

    /// Like [`Self::start`], with `rust_log` as the agent's log filter (`RUST_LOG`). The benchmark
    /// runs the agent at `info`: a debug line per probe would be part of what it measures.
    pub fn start_with_log_filter(dir: &Path, args: &[&str], rust_log: &str) -> Self {
        let source = [OsString::from("--pod-manifests"), dir.into()];
        Self::spawn(&source, args, &[], rust_log)
    }

    /// Starts the agent with `--pod-source kube` on node `node`, finding the API server through
    /// the kubeconfig at `kubeconfig` (`KUBECONFIG`), with extra `args` and log filter `rust_log`.
    pub fn start_kube(kubeconfig: &Path, node: &str, args: &[&str], rust_log: &str) -> Self {
        let source = ["--pod-source", "kube", "--node-name", node].map(OsString::from);
        // Not in-cluster, whatever the machine running the tests is.
        let env = [
            ("KUBECONFIG", Some(kubeconfig.into())),
            ("KUBERNETES_SERVICE_HOST", None),
        ];
        Self::spawn(&source, args, &env, rust_log)
    }

    /// Starts `probe-bypass run` with the pod source's arguments `source`, `args`, and `env` set
    /// (`None`: removed), and waits until its admin endpoint answers.
    fn spawn(
        source: &[OsString],
        args: &[&str],
        env: &[(&str, Option<OsString>)],
        rust_log: &str,
    ) -> Self {
        let admin = free_port();
        let n = NEXT_DIR.fetch_add(1, Ordering::Relaxed);
        let log = std::env::temp_dir().join(format!(
            "pb-test-agent-{}-{n}-{}.log",
            std::process::id(),
            admin.port()
        ));
        let log_file = fs::File::create(&log).expect("agent log file");
        let mut command = Command::new(agent_bin());
        command
            .arg("run")
            .args(source)
            .arg("--admin-addr")
            .arg(admin.to_string())
            .args(datapath_args(args))
            .args(args)
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::null())
            .stderr(log_file);
        for (name, value) in env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        let child = command.spawn().expect("start the agent");
        let mut agent = Self { child, admin, log };
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
        let deadline = Instant::now() + within;
        while !done(self) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the agent exited ({status}):\n{}", self.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not happen:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends SIGTERM and waits for the exit, returning its status and how long it took.
    pub fn terminate(mut self) -> (ExitStatus, Duration) {
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
