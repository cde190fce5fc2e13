//! Whether a pod's cgroup holds a process yet: the cheap sign that its sandbox has started, polled
//! for the pods that wait for their network namespace so that their lookup (a scan of all of
//! `/proc`) runs as soon as it can succeed, and not on a backoff timer (issue 4: "the listener and
//! the map entries must be in place within 100 ms of the pod's netns appearing").
//!
//! Why polling `cgroup.events` rather than inotify on it: the file only exists once the kubelet has
//! made the pod's cgroup, which may be after the pod is seen in the API, so inotify would need a
//! watch on each parent too, kept in step with pods coming and going; a read of one small file
//! per waiting pod every 20 ms costs microseconds, and no pod waits long once its IP is known.
//! `populated 1` in `cgroup.events` covers the whole subtree: the pod cgroup's own `cgroup.procs`
//! is empty on cgroup v2, its processes sit in the containers' cgroups below it.
//!
//! The pod's cgroup is looked for below the `kubepods` trees of the cgroup v2 mount, found by a
//! shallow walk (three levels) done again at most once a second while a waiting pod's cgroup is
//! not found. Where no kubepods tree is visible (cgroup v1, a cgroup namespace hiding the host's
//! tree), every pod reads as not populated and the lookups keep their backoff.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use super::normalize_uid;

/// How often the `kubepods` trees may be looked for again while a pod's cgroup is missing.
const REWALK: Duration = Duration::from_secs(1);

/// How deep below the cgroup mount a `kubepods` tree is looked for: `/kubepods`,
/// `/kubepods.slice`, `/kubelet.slice/kubelet-kubepods.slice`, `/<nested node>/kubepods`.
const DEPTH: usize = 3;

/// The QoS classes' cgroups below `kubepods` (Guaranteed pods sit directly in it).
const QOS: [&str; 3] = ["", "burstable", "besteffort"];

pub struct PodCgroups {
    mount: Option<PathBuf>,
    roots: Mutex<Roots>,
}

#[derive(Default)]
struct Roots {
    dirs: Vec<PathBuf>,
    walked_at: Option<Instant>,
}

impl PodCgroups {
    /// Looks below `mount`, the cgroup v2 mount; none: nothing is ever populated.
    pub fn new(mount: Option<PathBuf>) -> Self {
        Self {
            mount,
            roots: Mutex::new(Roots::default()),
        }
    }

    /// Whether pod `uid`'s cgroup exists and holds a process.
    pub fn populated(&self, uid: &str) -> bool {
        let Some(mount) = &self.mount else {
            return false;
        };
        let mut roots = self.roots.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(populated) = find(&roots.dirs, uid) {
            return populated;
        }
        if roots.walked_at.is_some_and(|at| at.elapsed() < REWALK) {
            return false;
        }
        roots.dirs = kubepods_trees(mount);
        roots.walked_at = Some(Instant::now());
        find(&roots.dirs, uid).unwrap_or(false)
    }
}

/// Whether the pod's cgroup below one of `roots` is populated; none when it is not found.
fn find(roots: &[PathBuf], uid: &str) -> Option<bool> {
    let uid = normalize_uid(uid);
    let systemd_uid = uid.replace('-', "_");
    roots.iter().find_map(|root| {
        QOS.iter().find_map(|qos| {
            let dir = if root.extension().is_some_and(|ext| ext == "slice") {
                let (parent, prefix) = if qos.is_empty() {
                    (root.clone(), "kubepods".to_owned())
                } else {
                    let prefix = format!("kubepods-{qos}");
                    (root.join(format!("{prefix}.slice")), prefix)
                };
                parent.join(format!("{prefix}-pod{systemd_uid}.slice"))
            } else {
                root.join(qos).join(format!("pod{uid}"))
            };
            match fs::read_to_string(dir.join("cgroup.events")) {
                Ok(events) => Some(events.lines().any(|line| line == "populated 1")),
                Err(error) if error.kind() == io::ErrorKind::NotFound => None,
                Err(_) => Some(false),
            }
        })
    })
}

/// The `kubepods` trees within [`DEPTH`] levels of `mount`.
fn kubepods_trees(mount: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut level = vec![mount.to_owned()];
    for _ in 0..DEPTH {
        let mut next = Vec::new();
        for dir in level {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                    continue;
                }
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name == "kubepods"
                    || name == "kubepods.slice"
                    || name.ends_with("-kubepods.slice")
                {
                    found.push(entry.path());
                } else {
                    next.push(entry.path());
                }
            }
        }
        level = next;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b9c4d1e-7f2a-4c3b-9d8e-1a2b3c4d5e6f";

    /// A directory standing for a cgroup mount, removed on drop.
    struct TempTree(PathBuf);

    impl Drop for TempTree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tree(name: &str) -> TempTree {
        let dir = std::env::temp_dir().join(format!("pb-cgroups-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        TempTree(dir)
    }

    fn pod_cgroup(dir: &Path, populated: bool) {
        fs::create_dir_all(dir).expect("pod cgroup");
        let events = format!("populated {}\nfrozen 0\n", u8::from(populated));
        fs::write(dir.join("cgroup.events"), events).expect("cgroup.events");
    }

    #[test]
    fn cgroupfs_and_systemd_pod_cgroups_are_found_and_read() {
        let root = tree("drivers");
        let cgroups = PodCgroups::new(Some(root.0.clone()));
        let cgroupfs = root
            .0
            .join("test/kubepods/besteffort")
            .join(format!("pod{UID}"));
        pod_cgroup(&cgroupfs, false);
        assert!(!cgroups.populated(UID));
        pod_cgroup(&cgroupfs, true);
        assert!(cgroups.populated(UID), "found again without a new walk");

        let other = "11111111-2222-3333-4444-555555555555";
        let slice = root.0.join(
            "kubepods.slice/kubepods-burstable.slice/\
             kubepods-burstable-pod11111111_2222_3333_4444_555555555555.slice",
        );
        pod_cgroup(&slice, true);
        assert!(
            !cgroups.populated(other),
            "the kubepods trees are not walked again within a second"
        );
        cgroups.roots.lock().expect("lock").walked_at = None;
        assert!(cgroups.populated(other));
    }

    #[test]
    fn without_a_cgroup_mount_nothing_is_populated() {
        assert!(!PodCgroups::new(None).populated(UID));
    }
}
