//! A pod's process where the kubelet leaves one: in the pod's cgroup, named after its UID as the
//! cgroupfs driver names it (`…/kubepods/besteffort/pod<uid>/<container>`), and in the pod's
//! network namespace. This is what the agent's `/proc` discovery looks for.
//!
//! The cgroups live in a subtree of the cgroup v2 hierarchy that the test owns
//! (`probe-bypass-test-<pid>-k<n>/…`); nothing is attached to them. The guard kills and reaps the
//! process and removes the cgroups on drop, panics included.

use std::{
    fs,
    io::ErrorKind,
    path::PathBuf,
    process::{Child, Command},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use probe_bypass::datapath::cgroup2_mount;

use crate::support::pod::TestPod;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// How long a killed process may take to leave its cgroup.
const REMOVAL_TIMEOUT: Duration = Duration::from_secs(5);

pub struct PodProcess {
    /// The cgroups made, parents first.
    dirs: Vec<PathBuf>,
    child: Child,
}

impl PodProcess {
    /// Starts a long `sleep` in pod `uid`'s cgroup and in `pod`'s network namespace.
    pub fn start(pod: &TestPod, uid: &str) -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let root = cgroup2_mount()
            .expect("find the cgroup v2 mount")
            .join(format!("probe-bypass-test-{}-k{n}", std::process::id()));
        let mut dirs = Vec::new();
        let mut dir = root;
        for part in [
            String::new(),
            "kubepods".into(),
            "besteffort".into(),
            format!("pod{uid}"),
            "c0".into(),
        ] {
            if !part.is_empty() {
                dir = dir.join(part);
            }
            fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
            dirs.push(dir.clone());
        }
        // The shell moves itself into the cgroup, then becomes `ip netns exec`, which enters the
        // namespace and becomes the sleep: one pid throughout.
        let child = Command::new("sh")
            .arg("-c")
            .arg(r#"echo $$ > "$0" && exec "$@""#)
            .arg(dir.join("cgroup.procs"))
            .args(["ip", "netns", "exec", &pod.netns_name, "sleep", "600"])
            .spawn()
            .expect("start the pod's process");
        Self { dirs, child }
    }
}

impl Drop for PodProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for dir in self.dirs.iter().rev() {
            let deadline = Instant::now() + REMOVAL_TIMEOUT;
            loop {
                match fs::remove_dir(dir) {
                    Err(e) if e.kind() != ErrorKind::NotFound && Instant::now() < deadline => {
                        thread::sleep(Duration::from_millis(10));
                    }
                    _ => break,
                }
            }
        }
    }
}
