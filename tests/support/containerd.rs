//! A containerd of the test's own (issue 17): its root, state dir, socket, runc root, CNI
//! configuration and namespace mounts all under one temp dir, never the machine's
//! (`/var/lib/containerd`, `/run/containerd`, `/etc/cni/net.d`, `/run/netns`).
//!
//! It runs Debian's containerd 1.6 with its CRI plugin, runc, and the CNI plugins from
//! `containernetworking-plugins`: what the kubelet drives on a node. The CRI network is a bridge of
//! the test's own with `host-local` addresses from the tests' range (198.18.0.0/15). The guard
//! stops containerd (and so every shim it started) and removes the dir on drop, panics included.

use std::{
    fs,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use crate::{cgroup::command_in_all, images, pod::AddressBlock, sidecar::TempDir};

/// Where Debian's packages put the binaries.
pub const CONTAINERD: &str = "/usr/bin/containerd";
pub const CTR: &str = "/usr/bin/ctr";
pub const RUNC: &str = "/usr/sbin/runc";
pub const CNI_BIN_DIR: &str = "/usr/lib/cni";

/// How long containerd may take to answer on its socket.
const BOOT_WITHIN: Duration = Duration::from_secs(30);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// What the machine lacks to run a containerd node, if anything.
pub fn missing() -> Option<String> {
    let plugins =
        ["bridge", "host-local", "loopback"].map(|plugin| format!("{CNI_BIN_DIR}/{plugin}"));
    [CONTAINERD, CTR, RUNC]
        .into_iter()
        .chain(plugins.iter().map(String::as_str))
        .find(|path| !Path::new(path).exists())
        .map(|path| {
            format!(
                "{path} is not installed (containerd, runc, containernetworking-plugins: run \
                 `cargo xtask setup`)"
            )
        })
}

/// A running containerd of the test's own.
pub struct Containerd {
    child: Option<Child>,
    /// The CRI network's bridge, made by the CNI bridge plugin at the first sandbox.
    pub bridge: String,
    /// The CRI network's addresses.
    pub subnet: String,
    /// Held so that no other test's pods take the subnet's addresses.
    _block: AddressBlock,
    /// The OCI runtime binary the CRI plugin's runc runtime runs, and what containerd (so its
    /// shims, so the runtime) is given in its environment.
    runtime: PathBuf,
    env: Vec<(String, String)>,
    /// The cgroups (one per hierarchy) containerd runs in, and so its shims; none: the caller's.
    cgroups: Vec<PathBuf>,
    dir: TempDir,
}

impl Containerd {
    /// Writes the configuration and starts containerd with runc, returning once it answers on its
    /// socket.
    pub fn start() -> Self {
        Self::start_with_runtime(Path::new(RUNC), &[])
    }

    /// [`Self::start`], with `runtime` run in runc's place (a wrapper of it) and `env` in
    /// containerd's environment, which its shims and so the runtime inherit.
    pub fn start_with_runtime(runtime: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_in(runtime, env, Vec::new())
    }

    /// [`Self::start_with_runtime`], containerd (and so its shims) in `cgroups`, one directory
    /// per cgroup hierarchy, as a node's containerd runs in a cgroup of its own.
    pub fn start_in(runtime: &Path, env: &[(&str, &str)], cgroups: Vec<PathBuf>) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = TempDir::new("containerd");
        // A /24 of the tests' range that no test pod of any running test process has.
        let block = AddressBlock::for_runtime();
        let mut containerd = Self {
            child: None,
            bridge: format!("pbcri{}-{n}", std::process::id() % 10_000),
            subnet: block.first_24().to_string(),
            _block: block,
            runtime: runtime.to_owned(),
            env: env
                .iter()
                .map(|&(key, value)| (key.to_owned(), value.to_owned()))
                .collect(),
            cgroups,
            dir,
        };
        for sub in ["net.d", "cni", "root", "state", "runc", "opt"] {
            fs::create_dir_all(containerd.path(sub)).expect("make containerd's dirs");
        }
        fs::write(containerd.path("config.toml"), containerd.config()).expect("write config.toml");
        fs::write(
            containerd.path("net.d/10-probe-bypass-test.conflist"),
            containerd.cni_config(),
        )
        .expect("write the CNI configuration");
        containerd.spawn();
        containerd
    }

    /// Starts containerd on the configuration written, and waits until it answers.
    fn spawn(&mut self) {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("containerd.log"))
            .expect("containerd.log");
        let mut command = if self.cgroups.is_empty() {
            Command::new(CONTAINERD)
        } else {
            // A node's containerd, in a process group of its own as the node's other components
            // are: a terminal's Ctrl-C reaches the process that owns the node, which stops them
            // in order.
            let mut command = command_in_all(&self.cgroups, CONTAINERD, &[]);
            command.process_group(0);
            command
        };
        let child = command
            .arg("--config")
            .arg(self.path("config.toml"))
            .envs(self.env.iter().map(|(key, value)| (key, value)))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("containerd.log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|error| panic!("start {CONTAINERD}: {error}"));
        self.child = Some(child);
        self.wait_until_it_answers();
    }

    /// Stops containerd (SIGTERM, as systemd stops it) and starts it again on the same root, state
    /// and socket. The containers' shims, and so the containers, run on meanwhile.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Stops the containerd process itself, leaving its shims.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(i32::MAX));
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(10);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A path under the containerd's own dir.
    pub fn path(&self, sub: &str) -> PathBuf {
        self.dir.path.join(sub)
    }

    /// Its gRPC socket, which the CRI API and `ctr` talk to.
    pub fn socket(&self) -> PathBuf {
        self.path("containerd.sock")
    }

    /// The containerd process's id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// What containerd wrote to its log so far.
    pub fn log(&self) -> String {
        fs::read_to_string(self.path("containerd.log")).unwrap_or_default()
    }

    /// Runs `ctr` against this containerd, in the CRI plugin's `k8s.io` namespace.
    pub fn ctr(&self, args: &[&str]) -> Output {
        Command::new(CTR)
            .arg("--address")
            .arg(self.socket())
            .args(["--namespace", "k8s.io"])
            .args(args)
            .output()
            .unwrap_or_else(|error| panic!("run {CTR}: {error}"))
    }

    /// Imports the images of [`images::archives`] (the pause image its `sandbox_image` names, the
    /// test app, the sidecar, the mesh's init, the agent) into the CRI plugin's namespace, and
    /// checks each is listed under its name.
    pub fn import_images(&self) {
        for archive in images::archives(&self.path("")) {
            let path = archive.path.display().to_string();
            let output = self.ctr(&["images", "import", "--no-unpack=false", &path]);
            assert!(
                output.status.success(),
                "import {} from {path}: {}",
                archive.name,
                String::from_utf8_lossy(&output.stderr)
            );
            let listed = self.ctr(&["images", "ls", "-q"]);
            assert!(
                String::from_utf8_lossy(&listed.stdout)
                    .lines()
                    .any(|line| line == archive.name),
                "{} not among the imported images: {}",
                archive.name,
                String::from_utf8_lossy(&listed.stdout)
            );
        }
    }

    /// Lets the CRI plugin pull from the registry at `host` (`host:port`) over HTTPS, trusting
    /// the CA at `ca`: a `hosts.toml` in the registry configuration directory, read at each pull.
    pub fn trust_registry(&self, host: &str, ca: &Path) {
        let dir = self.path("certs.d").join(host);
        fs::create_dir_all(&dir)
            .unwrap_or_else(|error| panic!("create {}: {error}", dir.display()));
        fs::write(
            dir.join("hosts.toml"),
            format!(
                "server = \"https://{host}\"\n\n[host.\"https://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
                ca.display()
            ),
        )
        .unwrap_or_else(|error| panic!("write {}/hosts.toml: {error}", dir.display()));
    }

    fn wait_until_it_answers(&mut self) {
        let started = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|child| child.try_wait().expect("containerd's status"))
            {
                panic!(
                    "containerd exited ({status}) while starting:\n{}",
                    self.log()
                );
            }
            if self.socket().exists() && self.ctr(&["version"]).status.success() {
                return;
            }
            assert!(
                started.elapsed() < BOOT_WITHIN,
                "containerd did not answer on {} within {BOOT_WITHIN:?}:\n{}",
                self.socket().display(),
                self.log()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// containerd's configuration: every path its own, the CRI plugin on runc with the cgroupfs
    /// driver (this machine's PID 1 is not systemd), namespaces mounted under its state dir, and
    /// the plugins that would look at the machine's storage left out.
    fn config(&self) -> String {
        let dir = self.dir.path.display();
        let restrict_oom = !has_sys_resource();
        let runtime = self.runtime.display();
        format!(
            r#"version = 2
root = "{dir}/root"
state = "{dir}/state"
disabled_plugins = [
  "io.containerd.snapshotter.v1.aufs",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp",
  "io.containerd.internal.v1.tracing",
]

[grpc]
  address = "{dir}/containerd.sock"

[ttrpc]
  address = "{dir}/containerd.sock.ttrpc"

[debug]
  address = ""

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{dir}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "probe-bypass.test/pause:1"
  netns_mounts_under_state_dir = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  disable_apparmor = true
  # The kubelet's sandboxes ask for oom_score_adj -998, which lowering takes CAP_SYS_RESOURCE,
  # and the root that runs the tests may lack it (these machines' does): never below
  # containerd's own, as under rootless containerd.
  restrict_oom_score_adj = {restrict_oom}

  # Registries' hosts.toml (a test's own registry and the CA it trusts): `Containerd::trust_registry`.
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{dir}/certs.d"

  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{dir}/net.d"

  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"

    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"

      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        BinaryName = "{runtime}"
        Root = "{dir}/runc"
        SystemdCgroup = false
"#
        )
    }

    /// The CRI network: the bridge plugin on a bridge of the test's own, the pods' gateway, no
    /// masquerading, and host-local addresses kept in the containerd's own dir.
    fn cni_config(&self) -> String {
        serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "probe-bypass-test",
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{ "subnet": self.subnet }]],
                    "routes": [{ "dst": "0.0.0.0/0" }],
                    "dataDir": self.path("cni"),
                },
            }],
        })
        .to_string()
    }
}

impl Drop for Containerd {
    /// Stops containerd, then what outlives it: containers left running (a test that failed before
    /// removing its pods), their shims, and the mounts under the dir (rootfs overlays, sandbox
    /// namespaces), so that the dir can be removed.
    fn drop(&mut self) {
        self.stop();
        let runc_root = self.path("runc");
        for namespace in fs::read_dir(&runc_root).into_iter().flatten().flatten() {
            for container in fs::read_dir(namespace.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let _ = Command::new(RUNC)
                    .arg("--root")
                    .arg(namespace.path())
                    .args(["delete", "--force"])
                    .arg(container.file_name())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let socket = self.socket().display().to_string();
        for pid in processes_mentioning(&socket) {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
        unmount_under(&self.dir.path);
        // The bridge plugin's bridge outlives the pods; nothing else of containerd's is outside
        // its dir.
        let _ = Command::new("ip")
            .args(["link", "delete", &self.bridge])
            .stderr(Stdio::null())
            .status();
    }
}

/// Whether this process has CAP_SYS_RESOURCE, which lowering a process's oom_score_adj takes.
fn has_sys_resource() -> bool {
    const CAP_SYS_RESOURCE: u32 = 24;
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status
                .lines()
                .find_map(|line| line.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_SYS_RESOURCE) != 0)
}

/// The processes whose command line mentions `text`: the shims of a containerd, which are given
/// its socket's address.
fn processes_mentioning(text: &str) -> Vec<nix::unistd::Pid> {
    let own = std::process::id();
    fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmdline| {
                String::from_utf8_lossy(&cmdline)
                    .split('\0')
                    .any(|arg| arg.contains(text))
            })
        })
        .filter_map(|pid| i32::try_from(pid).ok().map(nix::unistd::Pid::from_raw))
        .collect()
}

/// Detaches every mount below `dir`, deepest first.
pub(crate) fn unmount_under(dir: &Path) {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|point| point.starts_with(dir))
        .collect();
    points.sort_by_key(|point| std::cmp::Reverse(point.components().count()));
    for point in points {
        let _ = nix::mount::umount2(&point, nix::mount::MntFlags::MNT_DETACH);
    }
}
