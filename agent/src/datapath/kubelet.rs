//! The kubelet's cgroup, for `--probe-bypass-from kubelet`: only a caller in it (or below it) gets
//! past the proxy on the probe ports; the rest of the host network namespace (hostNetwork pods,
//! node daemons, the container runtime) meets the proxy like any pod.
//!
//! The connect programs compare the caller's ancestor at the kubelet cgroup's level
//! (`bpf_get_current_ancestor_cgroup_id`) with the kubelet cgroup's id, which on cgroup v2 is the
//! inode number of its directory.

use std::{
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// How deep [`KubeletCgroup::find`] looks for the kubelet's cgroup under the hierarchy's root.
const SEARCH_DEPTH: usize = 8;

/// A cgroup v2 directory as the connect programs know it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KubeletCgroup {
    /// Its directory, as the agent sees it.
    pub path: PathBuf,
    /// Its id: the directory's inode number.
    pub id: u64,
    /// Its level in the hierarchy (the root is 0).
    pub level: u32,
}

impl KubeletCgroup {
    /// The cgroup v2 directory at `path` (`/host/sys/fs/cgroup/system.slice/kubelet.service`).
    pub fn at(path: &Path) -> Result<Self, String> {
        let meta = fs::metadata(path)
            .map_err(|error| format!("kubelet cgroup {}: {error}", path.display()))?;
        if !meta.is_dir() || !path.join("cgroup.procs").exists() {
            return Err(format!(
                "kubelet cgroup {}: not a cgroup v2 directory (no cgroup.procs)",
                path.display()
            ));
        }
        Ok(Self {
            path: path.to_path_buf(),
            id: meta.ino(),
            level: level(path),
        })
    }

    /// The cgroup of the `kubelet` process under `proc_root`, found under `cgroup_root` (the
    /// hierarchy's root as the agent sees it, `/host/sys/fs/cgroup`).
    ///
    /// The kubelet's `/proc/<pid>/cgroup` path is relative to the agent's cgroup namespace: in a
    /// container it starts with `..` for each level the namespace's root is below the
    /// hierarchy's. What follows the `..` is searched for under `cgroup_root` and must name one
    /// directory only. Without `..` it is the path from the hierarchy's root, and `cgroup_root`
    /// may be a cgroup below that root (the programs attached to a subtree): the kubelet must be
    /// in that subtree, or its connections would not pass the programs.
    pub fn find(proc_root: &Path, cgroup_root: &Path) -> Result<Self, String> {
        let (pid, line) = kubelet_cgroup_line(proc_root)?;
        let components: Vec<&str> = line
            .split('/')
            .filter(|part| !part.is_empty() && *part != ".")
            .collect();
        let climbed = components.iter().take_while(|part| **part == "..").count();
        let rest = &components[climbed..];
        if rest.is_empty() {
            return Err(format!(
                "the kubelet (pid {pid}) is in cgroup {line:?}, which names no directory below \
                 the root"
            ));
        }
        if climbed == 0 {
            return Self::at(&below_attach_point(pid, &line, rest, cgroup_root)?);
        }
        let mut found = Vec::new();
        search(cgroup_root, rest, SEARCH_DEPTH, &mut found);
        match found.as_slice() {
            [one] => Self::at(one),
            [] => Err(format!(
                "the kubelet (pid {pid}) is in cgroup {line:?}: no {} under {}",
                rest.join("/"),
                cgroup_root.display()
            )),
            several => Err(format!(
                "the kubelet (pid {pid}) is in cgroup {line:?}: {} directories under {} end in \
                 {}; pass --kubelet-cgroup",
                several.len(),
                cgroup_root.display(),
                rest.join("/")
            )),
        }
    }
}

/// The directory at `rest`, the kubelet's cgroup path from the hierarchy's root (`line`), as seen
/// under `cgroup_root`, which is that root or a cgroup below it.
fn below_attach_point(
    pid: u32,
    line: &str,
    rest: &[&str],
    cgroup_root: &Path,
) -> Result<PathBuf, String> {
    let depth = usize::try_from(level(cgroup_root)).unwrap_or(usize::MAX);
    let attached: Vec<&str> = cgroup_root
        .iter()
        .filter_map(|part| part.to_str())
        .collect();
    let attached = &attached[attached.len().saturating_sub(depth)..];
    let below = rest.strip_prefix(attached).ok_or_else(|| {
        format!(
            "the kubelet (pid {pid}) is in cgroup {line:?}, outside {} (cgroup /{}) where the \
             programs are attached: its connections would not pass them",
            cgroup_root.display(),
            attached.join("/")
        )
    })?;
    Ok(below
        .iter()
        .fold(cgroup_root.to_path_buf(), |path, part| path.join(part)))
}

/// The level of the cgroup at `path`: how many of it and its ancestors have `cgroup.events`,
/// which every cgroup but the root has.
fn level(path: &Path) -> u32 {
    let below_root = path
        .ancestors()
        .take_while(|dir| dir.join("cgroup.events").exists())
        .count();
    u32::try_from(below_root).unwrap_or(u32::MAX)
}

/// The pid of the process named `kubelet` under `proc_root` and its cgroup v2 path (`0::<path>`).
fn kubelet_cgroup_line(proc_root: &Path) -> Result<(u32, String), String> {
    let entries = fs::read_dir(proc_root)
        .map_err(|error| format!("reading {}: {error}", proc_root.display()))?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        let Ok(comm) = fs::read_to_string(dir.join("comm")) else {
            continue;
        };
        if comm.trim_end() != "kubelet" {
            continue;
        }
        let cgroups = fs::read_to_string(dir.join("cgroup"))
            .map_err(|error| format!("the kubelet (pid {pid}): reading its cgroup: {error}"))?;
        return cgroups
            .lines()
            .find_map(|line| line.strip_prefix("0::"))
            .map(|path| (pid, path.to_owned()))
            .ok_or_else(|| {
                format!("the kubelet (pid {pid}) has no cgroup v2 path in its cgroup file")
            });
    }
    Err(format!("no kubelet process under {}", proc_root.display()))
}

/// Collects the directories under `dir`, down to `depth` levels, whose path ends in `suffix`.
fn search(dir: &Path, suffix: &[&str], depth: usize, found: &mut Vec<PathBuf>) {
    if depth == 0 {
        return;
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
            continue;
        }
        let path = entry.path();
        let ends = path
            .iter()
            .rev()
            .zip(suffix.iter().rev())
            .all(|(part, wanted)| part == *wanted)
            && path.iter().count() >= suffix.len();
        if ends {
            found.push(path.clone());
        }
        search(&path, suffix, depth - 1, found);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A directory tree shaped like a cgroup v2 hierarchy: `cgroup.procs` everywhere,
    /// `cgroup.events` everywhere but the root. Removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new(name: &str, dirs: &[&str]) -> Self {
            let root =
                std::env::temp_dir().join(format!("pb-kubelet-{}-{name}", std::process::id()));
            let _ = fs::remove_dir_all(&root);
            fs::create_dir_all(&root).expect("root");
            fs::write(root.join("cgroup.procs"), "").expect("procs");
            for dir in dirs {
                let path = root.join(dir);
                fs::create_dir_all(&path).expect("dir");
                for ancestor in path.ancestors().take_while(|a| *a != root) {
                    fs::write(ancestor.join("cgroup.procs"), "").expect("procs");
                    fs::write(ancestor.join("cgroup.events"), "").expect("events");
                }
            }
            Self(root)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    /// A `/proc` with one process named `comm` in cgroup `cgroup` (v2 path).
    fn proc_with(tree: &Tree, comm: &str, cgroup: &str) -> PathBuf {
        let proc = tree.0.with_extension("proc");
        let _ = fs::remove_dir_all(&proc);
        fs::create_dir_all(proc.join("1234")).expect("pid");
        fs::create_dir_all(proc.join("self")).expect("self");
        fs::write(proc.join("1234/comm"), format!("{comm}\n")).expect("comm");
        fs::write(
            proc.join("1234/cgroup"),
            format!("1:name=systemd:/x\n0::{cgroup}\n"),
        )
        .expect("cgroup");
        proc
    }

    #[test]
    fn a_cgroups_level_counts_it_and_its_ancestors_below_the_root() {
        let tree = Tree::new("level", &["system.slice/kubelet.service"]);
        let kubelet = KubeletCgroup::at(&tree.0.join("system.slice/kubelet.service")).expect("at");
        assert_eq!(kubelet.level, 2);
        assert_eq!(KubeletCgroup::at(&tree.0).expect("root").level, 0);
        let error = KubeletCgroup::at(&tree.0.join("nowhere")).expect_err("missing");
        assert!(error.contains("nowhere"), "{error}");
    }

    #[test]
    fn finds_the_kubelet_by_its_path_seen_from_the_host_or_from_a_cgroup_namespace() {
        let tree = Tree::new(
            "find",
            &[
                "system.slice/kubelet.service",
                "kubepods.slice/kubepods-pod1.slice/cri-containerd-a.scope",
            ],
        );
        let want = tree.0.join("system.slice/kubelet.service");
        let proc = proc_with(&tree, "kubelet", "/system.slice/kubelet.service");
        assert_eq!(
            KubeletCgroup::find(&proc, &tree.0).expect("host").path,
            want
        );
        let proc = proc_with(&tree, "kubelet", "/../../../system.slice/kubelet.service");
        assert_eq!(
            KubeletCgroup::find(&proc, &tree.0).expect("namespace").path,
            want
        );
        let _ = fs::remove_dir_all(&proc);
    }

    #[test]
    fn finds_the_kubelet_below_programs_attached_to_a_subtree_of_the_hierarchy() {
        let tree = Tree::new(
            "subtree",
            &["node/kubelet.service", "other/kubelet.service"],
        );
        let subtree = tree.0.join("node");
        let proc = proc_with(&tree, "kubelet", "/node/kubelet.service");
        assert_eq!(
            KubeletCgroup::find(&proc, &subtree).expect("below").path,
            subtree.join("kubelet.service")
        );
        let proc = proc_with(&tree, "kubelet", "/other/kubelet.service");
        let error = KubeletCgroup::find(&proc, &subtree).expect_err("outside");
        assert!(
            error.contains("outside") && error.contains("(cgroup /node)"),
            "{error}"
        );
        let _ = fs::remove_dir_all(&proc);
    }

    #[test]
    fn says_why_when_the_kubelet_cannot_be_found() {
        let tree = Tree::new("missing", &["a/kubelet.service", "b/kubelet.service"]);
        let proc = proc_with(&tree, "containerd", "/system.slice/containerd.service");
        let error = KubeletCgroup::find(&proc, &tree.0).expect_err("no kubelet");
        assert!(error.contains("no kubelet process"), "{error}");
        let proc = proc_with(&tree, "kubelet", "/../kubelet.service");
        let error = KubeletCgroup::find(&proc, &tree.0).expect_err("two");
        assert!(
            error.contains("2 directories") && error.contains("--kubelet-cgroup"),
            "{error}"
        );
        let proc = proc_with(&tree, "kubelet", "/../../system.slice/kubelet.service");
        let error = KubeletCgroup::find(&proc, &tree.0).expect_err("none");
        assert!(error.contains("no system.slice/kubelet.service"), "{error}");
        let _ = fs::remove_dir_all(&proc);
    }
}
