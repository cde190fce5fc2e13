//! Test cgroups: a child of the cgroup v2 root for one test, with only that test's processes in it.
//!
//! A test attaches its eBPF programs here and never to the root, which would hook every process on
//! the machine. The guard kills what it started and removes the directory on drop, panics included.

use std::{
    fs,
    io::ErrorKind,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use probe_bypass::datapath::cgroup2_mount;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// How long a killed process may take to leave the cgroup before removal gives up.
const REMOVAL_TIMEOUT: Duration = Duration::from_secs(5);

/// A cgroup named after the test process and a counter, so parallel tests and leftovers of an
/// earlier run do not collide.
pub struct TestCgroup {
    path: PathBuf,
    children: Vec<Child>,
}

impl TestCgroup {
    pub fn new() -> Self {
        let root =
            cgroup2_mount().unwrap_or_else(|error| panic!("find the cgroup v2 mount: {error}"));
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("probe-bypass-test-{}-{n}", std::process::id()));
        fs::create_dir(&path).unwrap_or_else(|error| panic!("create {}: {error}", path.display()));
        Self {
            path,
            children: Vec::new(),
        }
    }

    /// The cgroup's directory, to attach programs to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command that runs `program` with `args` inside this cgroup. A shell moves itself in first
    /// (by writing its pid to `cgroup.procs`) and then becomes the program, so the program is in the
    /// cgroup from its first instruction on and none of its connections escapes the hook.
    ///
    /// The caller owns what it spawns from it; [`Drop`] still kills it through `cgroup.kill`.
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        command_in(&self.path, program, args)
    }

    /// Starts `program` with `args` inside this cgroup (see [`Self::command`]); killed on drop.
    pub fn spawn(&mut self, program: &str, args: &[&str]) -> &mut Child {
        let child = self
            .command(program, args)
            .spawn()
            .unwrap_or_else(|error| panic!("start {program} in {}: {error}", self.path.display()));
        self.children.push(child);
        let last = self.children.len() - 1;
        &mut self.children[last]
    }

    /// Runs `program` with `args` inside this cgroup (see [`Self::spawn`]) to the end.
    pub fn run(&mut self, program: &str, args: &[&str]) -> ExitStatus {
        self.spawn(program, args)
            .wait()
            .unwrap_or_else(|error| panic!("wait for {program}: {error}"))
    }

    /// Runs `program` with `args` inside this cgroup (see [`Self::command`]) to the end and returns
    /// its exit status and what it printed.
    pub fn output(&self, program: &str, args: &[&str]) -> Output {
        self.command(program, args)
            .output()
            .unwrap_or_else(|error| panic!("run {program} in {}: {error}", self.path.display()))
    }

    /// Moves the calling process, all its threads, into this cgroup until the guard drops, when it
    /// goes back where it was. For a benchmark whose own connections must meet the programs
    /// attached here, as the kubelet's meet them under the node's cgroup root: a connection from
    /// outside looks, to the pod's sk_lookup, like one from another node. Drop the guard before the
    /// cgroup, whose removal kills what is left in it.
    pub fn enter(&self) -> Entered {
        let own = fs::read_to_string("/proc/self/cgroup")
            .unwrap_or_else(|error| panic!("read /proc/self/cgroup: {error}"));
        let relative = own
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .unwrap_or_else(|| panic!("no cgroup v2 line in /proc/self/cgroup: {own:?}"));
        let root =
            cgroup2_mount().unwrap_or_else(|error| panic!("find the cgroup v2 mount: {error}"));
        let home = root.join(relative.trim_start_matches('/'));
        move_self(&self.path);
        Entered { home }
    }

    /// Kills every process left in the cgroup, including any a child started, with `cgroup.kill`
    /// (Linux 5.14+). On older kernels only the processes [`Self::spawn`] started are killed.
    fn kill_remaining(&self) {
        let kill = self.path.join("cgroup.kill");
        if kill.exists() {
            let _ = fs::write(&kill, "1");
        }
    }
}

/// The calling process inside a [`TestCgroup`], until dropped (see [`TestCgroup::enter`]).
#[must_use = "the process leaves the cgroup when this is dropped"]
pub struct Entered {
    home: PathBuf,
}

impl Drop for Entered {
    fn drop(&mut self) {
        move_self(&self.home);
    }
}

/// Moves the calling process into the cgroup at `dir`.
fn move_self(dir: &Path) {
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .unwrap_or_else(|error| panic!("move into {}: {error}", dir.display()));
}

/// A cgroup below a test's, for processes that must be told apart from the test's others (a
/// stand-in kubelet, say). Removed on drop, once its processes are gone; it must drop before the
/// test cgroup it is in.
pub struct ChildCgroup {
    path: PathBuf,
}

impl ChildCgroup {
    pub fn new(parent: &TestCgroup, name: &str) -> Self {
        let path = parent.path().join(name);
        fs::create_dir(&path).unwrap_or_else(|error| panic!("create {}: {error}", path.display()));
        Self { path }
    }

    /// Takes over the cgroup at `path`, made by someone else (an agent's test that creates it
    /// late), to remove it on drop.
    pub fn adopt(path: PathBuf) -> Self {
        Self { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A command that runs `program` with `args` inside this cgroup (see [`command_in`]).
    pub fn command(&self, program: &str, args: &[&str]) -> Command {
        command_in(&self.path, program, args)
    }
}

impl Drop for ChildCgroup {
    fn drop(&mut self) {
        remove_cgroup(&self.path);
    }
}

/// A command that runs `program` with `args` inside the cgroup at `dir`: a shell moves itself in
/// (by writing its pid to `cgroup.procs`) and then becomes the program, one pid throughout, so
/// the program is in the cgroup from its first instruction on.
pub fn command_in(dir: &Path, program: &str, args: &[&str]) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"echo $$ > "$0" && exec "$@""#)
        .arg(dir.join("cgroup.procs"))
        .arg(program)
        .args(args);
    command
}

/// [`command_in`] for a process that must be in several cgroups, one per hierarchy (`dirs`): a
/// node's process on a machine with cgroup v1 controllers beside the v2 hierarchy. The shell
/// writes its pid into each `cgroup.procs`, then becomes the program.
pub fn command_in_all(dirs: &[PathBuf], program: &str, args: &[&str]) -> Command {
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(r#"for procs in $PB_CGROUP_PROCS; do echo $$ > "$procs" || exit 125; done; exec "$@""#)
        .arg("sh")
        .arg(program)
        .args(args)
        .env(
            "PB_CGROUP_PROCS",
            dirs.iter()
                .map(|dir| dir.join("cgroup.procs").display().to_string())
                .collect::<Vec<_>>()
                .join(" "),
        );
    command
}

/// Removes the cgroup at `dir`, whose processes were killed: a killed process stays a member until
/// it has fully exited, and until then the directory cannot be removed (EBUSY), so this retries
/// for a while, then says what it left behind. Does not panic, so that a guard can call it while
/// a test unwinds.
pub fn remove_cgroup(dir: &Path) {
    let deadline = Instant::now() + REMOVAL_TIMEOUT;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return,
            Err(error) if error.kind() == ErrorKind::NotFound => return,
            Err(error) if Instant::now() >= deadline => {
                eprintln!("leaving test cgroup {} behind: {error}", dir.display());
                return;
            }
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// The eBPF programs attached to the cgroup at `path` itself (not inherited), as `bpftool`
/// reports them: `"<attach type>" "<program name>"`, sorted. An error says why bpftool could not
/// tell; it does not panic, so that a guard can call it while a test unwinds.
pub fn attached_programs(path: &Path) -> Result<Vec<String>, String> {
    let output = Command::new("bpftool")
        .args(["--json", "cgroup", "show"])
        .arg(path)
        .output()
        .map_err(|error| format!("run bpftool (cargo xtask setup installs it): {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "bpftool cgroup show {}: {}",
            path.display(),
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    // bpftool prints an empty line, not `[]`, when nothing is attached.
    if output.stdout.trim_ascii().is_empty() {
        return Ok(Vec::new());
    }
    let programs: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)
        .map_err(|error| format!("parse bpftool's output: {error}"))?;
    let mut programs: Vec<String> = programs
        .iter()
        .map(|program| format!("{} {}", program["attach_type"], program["name"]))
        .collect();
    programs.sort();
    Ok(programs)
}

/// The programs attached through bpf_links to the network namespace with inode `netns_ino`
/// (sk_lookup, for the datapath), as `<attach type> <program id>`, read with bpftool.
pub fn netns_links(netns_ino: u64) -> Result<Vec<String>, String> {
    let output = Command::new("bpftool")
        .args(["--json", "link", "show"])
        .output()
        .map_err(|error| format!("run bpftool (cargo xtask setup installs it): {error}"))?;
    if !output.status.success() {
        return Err(format!(
            "bpftool link show: {}",
            String::from_utf8_lossy(&output.stderr)
        ));
    }
    let links: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)
        .map_err(|error| format!("parse bpftool's output: {error}"))?;
    Ok(links
        .iter()
        .filter(|link| link["type"] == "netns" && link["netns_ino"] == netns_ino)
        .map(|link| format!("{} {}", link["attach_type"], link["prog_id"]))
        .collect())
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.kill_remaining();
        remove_cgroup(&self.path);
    }
}
