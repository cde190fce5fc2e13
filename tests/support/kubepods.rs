//! A pod's process where the kubelet leaves one: in the pod's cgroup, named after its UID as the
//! cgroupfs driver names it (`…/kubepods/besteffort/pod<uid>/<container>`), and in the pod's
//! network namespace. This is what the agent's `/proc` discovery looks for.
//!
//! The cgroups live in a subtree of the cgroup v2 hierarchy that the test owns
//! (`probe-bypass-test-<pid>-k<n>/…`); nothing is attached to them. The guard kills and reaps the
//! process and removes the cgroups on drop, panics included.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Child,
    sync::atomic::{AtomicU32, Ordering},
};

use probe_bypass::datapath::cgroup2_mount;

use crate::{
    cgroup::{command_in, remove_cgroup},
    pod::TestPod,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct PodProcess {
    /// The cgroups made, parents first.
    dirs: Vec<PathBuf>,
    child: Option<Child>,
}

impl PodProcess {
    /// Starts a long `sleep` in pod `uid`'s cgroup and in `pod`'s network namespace.
    pub fn start(pod: &TestPod, uid: &str) -> Self {
        let mut process = Self::cgroup(uid);
        process.enter(pod);
        process
    }

    /// Makes pod `uid`'s cgroup, as the kubelet does before the runtime starts the sandbox, with
    /// no process in it yet.
    pub fn cgroup(uid: &str) -> Self {
        let pod = format!("pod{uid}");
        let dirs = make_cgroups(test_root(), &["kubepods", "besteffort", &pod, "c0"]);
        Self { dirs, child: None }
    }

    /// The pod's own cgroup (`…/pod<uid>`), whose `cgroup.events` says whether it holds a process.
    pub fn pod_cgroup(&self) -> &Path {
        &self.dirs[self.dirs.len() - 2]
    }

    /// The process's id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Starts the process in the cgroup and in `pod`'s namespace (see [`Self::start`]).
    pub fn enter(&mut self, pod: &TestPod) {
        self.stop();
        let dir = self.dirs.last().expect("the container's cgroup");
        // `ip netns exec` enters the namespace and becomes the sleep: one pid throughout.
        let child = command_in(
            dir,
            "ip",
            &["netns", "exec", &pod.netns_name, "sleep", "600"],
        )
        .spawn()
        .expect("start the pod's process");
        self.child = Some(child);
    }

    /// Kills and reaps the process, leaving the cgroups (and the namespace) in place.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        self.stop();
        remove_cgroups(&self.dirs);
    }
}

/// A `kubepods` tree of the test's own (`<parent>/kubepods/besteffort`), for many pods' cgroups
/// side by side, as on a node. Drop it after the pods made in it.
pub struct Kubepods {
    /// The cgroups made, parents first.
    dirs: Vec<PathBuf>,
}

impl Kubepods {
    /// A `kubepods` tree below `parent`: the cgroup an agent is given as `--cgroup-root` is where
    /// it looks for pods' cgroups, as below a node's cgroup root.
    pub fn under(parent: &Path) -> Self {
        Self {
            dirs: make_cgroups(parent.join("kubepods"), &["besteffort"]),
        }
    }

    /// Makes pod `uid`'s cgroup in this tree, with no process in it yet (see [`PodProcess::cgroup`]).
    pub fn pod(&self, uid: &str) -> PodProcess {
        let besteffort = self.dirs.last().expect("the QoS class's cgroup");
        let dirs = make_cgroups(besteffort.join(format!("pod{uid}")), &["c0"]);
        PodProcess { dirs, child: None }
    }
}

impl Drop for Kubepods {
    fn drop(&mut self) {
        remove_cgroups(&self.dirs);
    }
}

/// A cgroup of the test's own below the cgroup v2 mount, not made yet.
fn test_root() -> PathBuf {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    cgroup2_mount()
        .expect("find the cgroup v2 mount")
        .join(format!("probe-bypass-test-{}-k{n}", std::process::id()))
}

/// Makes `top` and the cgroups `below` it, each in the one before; returns them parents first.
fn make_cgroups(top: PathBuf, below: &[&str]) -> Vec<PathBuf> {
    let mut dirs = vec![top];
    for part in below {
        let next = dirs[dirs.len() - 1].join(part);
        dirs.push(next);
    }
    for dir in &dirs {
        fs::create_dir(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    }
    dirs
}

/// Removes cgroups given parents first, waiting for killed processes to leave them.
fn remove_cgroups(dirs: &[PathBuf]) {
    for dir in dirs.iter().rev() {
        remove_cgroup(dir);
    }
}
