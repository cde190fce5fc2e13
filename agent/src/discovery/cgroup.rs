//! Which pod a process belongs to, read from its cgroup path.
//!
//! The kubelet gives every pod a cgroup named after its UID, in the shape of its cgroup driver:
//! - cgroupfs: `…/kubepods[/burstable|/besteffort]/pod<uid>/…`, the UID as the API spells it;
//! - systemd: `…/kubepods[-burstable|-besteffort]-pod<uid>.slice/…`, the UID's dashes written as
//!   underscores, because systemd reads a dash in a slice name as the step to a parent slice.
//!
//! Below it, the runtime adds one cgroup per container (`<id>`, `cri-containerd-<id>.scope`,
//! `docker-<id>.scope`, `crio-<id>.scope`), and CRI-O one for the container's monitor
//! (`crio-conmon-<id>.scope`), which stays in the host's network namespace. Where the kubepods tree
//! sits varies (`/kubepods`, `/kubelet.slice/kubelet-kubepods.slice`, a cgroup namespace's root),
//! so the pod's cgroup is looked for in every component of the path.
//!
//! An agent in a container has a cgroup namespace of its own (the default on cgroup v2), rooted at
//! its container's cgroup, and the kernel shows it every other process's path relative to that
//! root: up to the common ancestor, then down, as in `/../../../besteffort/pod<uid>/<id>`. The
//! systemd driver's slice names spell out their parents (`kubepods-besteffort-pod<uid_>.slice`), so
//! they still say `kubepods`; a cgroupfs path has lost the `kubepods` above the common ancestor.

/// The pod a process's cgroup path places it in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodCgroup {
    /// The pod's UID as [`normalize_uid`] spells it.
    pub uid: String,
    /// The cgroup just below the pod's: a container's, or CRI-O's monitor's. A process in the pod's
    /// own cgroup has none.
    pub container: Option<String>,
}

/// The UID of a pod as this module compares it: dashes, lowercase. Accepts the systemd spelling.
pub fn normalize_uid(uid: &str) -> String {
    uid.trim()
        .chars()
        .map(|c| match c {
            '_' => '-',
            c => c.to_ascii_lowercase(),
        })
        .collect()
}

/// The pod named by the contents of a `/proc/<pid>/cgroup` file, with cgroup v1 lines
/// (`<id>:<controllers>:<path>`) and the v2 line (`0::<path>`) both considered.
///
/// On a real node every line that names a pod names the same one. Should they differ (a process
/// moved by hand in one hierarchy), the v2 line wins: it is the hierarchy the kubelet manages on
/// every current node.
pub fn pod_of_process(cgroup_file: &str) -> Option<PodCgroup> {
    let mut from_v1 = None;
    for line in cgroup_file.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(hierarchy), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let Some(pod) = pod_of_path(path) else {
            continue;
        };
        if hierarchy == "0" && controllers.is_empty() {
            return Some(pod);
        }
        from_v1.get_or_insert(pod);
    }
    from_v1
}

/// The pod whose cgroup is a component of `path`. The outermost one wins: a kubelet running inside
/// a pod (kind, nested clusters) makes pod cgroups below its own pod's, and every process there
/// belongs to the outer pod on this node.
///
/// A cgroupfs `pod<uid>` counts below a `kubepods` component, or anywhere in a path that starts
/// with `..`: seen from another cgroup namespace, whose root hides the `kubepods` above it. A path
/// that shows its whole ancestry (no leading `..`) and does not pass through `kubepods` is not a
/// pod's, whatever its components are named. A relative path cannot show that, and does not need
/// to: `pod<uid>` is a whole component holding a UUID that only the kubelet names a cgroup after
/// (the token must be all of it, [`uid_token`]), and the namespace found is then proved by the
/// pod's IP.
pub fn pod_of_path(path: &str) -> Option<PodCgroup> {
    let mut components = path.split('/').filter(|c| !c.is_empty()).peekable();
    // Whether `kubepods` is above the current component, or may be, hidden above the namespace root.
    let mut below_kubepods = components.peek() == Some(&"..");
    while let Some(component) = components.next() {
        let uid = if below_kubepods {
            cgroupfs_uid(component)
        } else {
            None
        };
        if let Some(uid) = uid.or_else(|| systemd_uid(component)) {
            return Some(PodCgroup {
                uid,
                container: components.next().map(str::to_owned),
            });
        }
        below_kubepods |= component == "kubepods";
    }
    None
}

/// `pod<uid>`, the cgroupfs driver's pod cgroup.
fn cgroupfs_uid(component: &str) -> Option<String> {
    uid_token(component.strip_prefix("pod")?, '-')
}

/// `<parents>-pod<uid_>.slice`, the systemd driver's pod slice, whose parents include `kubepods`.
fn systemd_uid(component: &str) -> Option<String> {
    let units = component.strip_suffix(".slice")?;
    let (parents, leaf) = units.rsplit_once('-')?;
    if !parents.split('-').any(|unit| unit == "kubepods") {
        return None;
    }
    uid_token(leaf.strip_prefix("pod")?, '_')
}

/// The whole of `token` as a UID whose parts are joined by `separator`. UIDs are UUIDs, or for
/// static pods a hex hash, so anything else is another cgroup that happens to start with `pod`.
fn uid_token(token: &str, separator: char) -> Option<String> {
    let valid = token
        .split(separator)
        .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric()));
    valid.then(|| normalize_uid(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b9c4d1e-7f2a-4c3b-9d8e-1a2b3c4d5e6f";
    const UID_: &str = "0b9c4d1e_7f2a_4c3b_9d8e_1a2b3c4d5e6f";
    const CID: &str = "4f1c2e9d8b7a";

    fn pod(container: Option<&str>) -> Option<PodCgroup> {
        Some(PodCgroup {
            uid: UID.to_owned(),
            container: container.map(str::to_owned),
        })
    }

    #[test]
    fn cgroupfs_paths_of_every_qos_class_name_the_pod() {
        for qos in ["", "/burstable", "/besteffort"] {
            let path = format!("/kubepods{qos}/pod{UID}/{CID}");
            assert_eq!(pod_of_path(&path), pod(Some(CID)), "{path}");
        }
        assert_eq!(pod_of_path(&format!("/kubepods/pod{UID}")), pod(None));
    }

    #[test]
    fn systemd_slices_of_every_runtime_name_the_pod() {
        let containers = [
            format!("cri-containerd-{CID}.scope"),
            format!("docker-{CID}.scope"),
            format!("crio-{CID}.scope"),
            format!("crio-conmon-{CID}.scope"),
        ];
        for container in &containers {
            let burstable = format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/{container}"
            );
            assert_eq!(pod_of_path(&burstable), pod(Some(container)), "{burstable}");
            let guaranteed = format!("/kubepods.slice/kubepods-pod{UID_}.slice/{container}");
            assert_eq!(
                pod_of_path(&guaranteed),
                pod(Some(container)),
                "{guaranteed}"
            );
        }
    }

    #[test]
    fn crio_conmon_scope_is_reported_as_the_container_below_the_pod() {
        let path = format!(
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{CID}.scope"
        );
        let found = pod_of_path(&path).expect("a pod");
        assert_eq!(found.uid, UID);
        assert_eq!(
            found.container.as_deref(),
            Some(format!("crio-conmon-{CID}.scope").as_str())
        );
    }

    #[test]
    fn kubepods_tree_is_found_anywhere_in_the_path() {
        let kind = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/\
             kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            pod_of_path(&kind),
            pod(Some(&format!("cri-containerd-{CID}.scope")))
        );
        let nested = format!("/probe-bypass-test-1-0/kubelet/kubepods/burstable/pod{UID}/{CID}");
        assert_eq!(pod_of_path(&nested), pod(Some(CID)));
    }

    /// The paths a containerised agent sees, its cgroup namespace rooted at its own container's
    /// cgroup (`kubepods/burstable/pod<agent>/<id>` or the systemd equivalent): `..` up to the
    /// common ancestor, then down to the pod of each QoS class, for each runtime.
    #[test]
    fn paths_relative_to_a_cgroup_namespace_name_the_pod_for_every_runtime() {
        let cgroupfs = [
            // containerd and Docker name the container's cgroup by its id, CRI-O adds `crio-`.
            (format!("/../../pod{UID}/{CID}"), CID.to_owned()),
            (
                format!("/../../../besteffort/pod{UID}/{CID}"),
                CID.to_owned(),
            ),
            (
                format!("/../../../pod{UID}/crio-{CID}"),
                format!("crio-{CID}"),
            ),
            (
                format!("/../../pod{UID}/crio-conmon-{CID}"),
                format!("crio-conmon-{CID}"),
            ),
        ];
        let systemd = [
            format!("/../../kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope"),
            format!(
                "/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope"
            ),
            format!(
                "/../../../kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{CID}.scope"
            ),
            format!("/../../../kubepods-pod{UID_}.slice/docker-{CID}.scope"),
        ]
        .map(|path| {
            let container = path.rsplit('/').next().unwrap_or_default().to_owned();
            (path, container)
        });
        for (path, container) in cgroupfs.iter().chain(&systemd) {
            assert_eq!(pod_of_path(path), pod(Some(container)), "{path}");
            let line = format!("0::{path}\n");
            assert_eq!(pod_of_process(&line), pod(Some(container)), "{line}");
        }
        assert_eq!(pod_of_path(&format!("/../../pod{UID}")), pod(None));
    }

    #[test]
    fn relative_paths_without_a_pod_cgroup_are_not_pods() {
        for path in [
            "/../../../../..".to_owned(),
            "/../../../../../system.slice/containerd.service".to_owned(),
            // The agent's own container's processes, and its pod's other containers.
            "/".to_owned(),
            format!("/../{CID}"),
            format!("/../../../../../system.slice/pod{UID}.service"),
            format!("/../../pod{UID_}/{CID}"),
            // Only a leading `..` says the ancestry is cut off; the kernel writes none elsewhere.
            format!("/system.slice/../pod{UID}/{CID}"),
        ] {
            assert_eq!(pod_of_path(&path), None, "{path}");
        }
    }

    #[test]
    fn uid_must_be_the_whole_token() {
        let longer = format!("/kubepods/burstable/pod{UID}0/{CID}");
        assert_ne!(pod_of_path(&longer).map(|p| p.uid), Some(UID.to_owned()));
        let shorter = format!("/kubepods/burstable/pod{}/{CID}", &UID[..UID.len() - 1]);
        assert_ne!(pod_of_path(&shorter).map(|p| p.uid), Some(UID.to_owned()));
        let suffixed = format!("/kubepods.slice/kubepods-pod{UID_}x.slice");
        assert_ne!(pod_of_path(&suffixed).map(|p| p.uid), Some(UID.to_owned()));
    }

    #[test]
    fn cgroups_outside_kubepods_or_only_resembling_pods_are_not_pods() {
        for path in [
            format!("/pod{UID}/{CID}"),
            format!("/system.slice/pod{UID}.service"),
            format!("/user.slice/user-pod{UID_}.slice"),
            "/kubepods/burstable".to_owned(),
            "/kubepods.slice/kubepods-burstable.slice".to_owned(),
            "/kubepods.slice/kubepods-pod.slice".to_owned(),
            format!("/kubepods/burstable/pod{UID_}/{CID}"),
            format!("/kubepods/burstable/pod-{UID}/{CID}"),
            "/".to_owned(),
        ] {
            assert_eq!(pod_of_path(&path), None, "{path}");
        }
    }

    #[test]
    fn outermost_pod_wins_when_a_kubelet_runs_inside_a_pod() {
        let inner = "11111111-2222-3333-4444-555555555555";
        let path = format!("/kubepods/burstable/pod{UID}/{CID}/kubepods/besteffort/pod{inner}/c2");
        assert_eq!(pod_of_path(&path), pod(Some(CID)));
    }

    #[test]
    fn reads_cgroup_v1_and_v2_lines() {
        let v2 = format!("0::/kubepods/burstable/pod{UID}/{CID}\n");
        assert_eq!(pod_of_process(&v2), pod(Some(CID)));
        let v1 = format!(
            "12:memory:/kubepods/burstable/pod{UID}/{CID}\n\
             1:name=systemd:/kubepods/burstable/pod{UID}/{CID}\n"
        );
        assert_eq!(pod_of_process(&v1), pod(Some(CID)));
        let hybrid_host = "4:memory:/user.slice\n1:name=systemd:/user.slice\n0::/init.scope\n";
        assert_eq!(pod_of_process(hybrid_host), None);
    }

    #[test]
    fn v2_line_wins_when_hierarchies_disagree() {
        let other = "11111111-2222-3333-4444-555555555555";
        let file = format!("4:memory:/kubepods/pod{other}/x\n0::/kubepods/pod{UID}/{CID}\n");
        assert_eq!(pod_of_process(&file), pod(Some(CID)));
    }

    #[test]
    fn uid_is_compared_lowercase_with_dashes() {
        assert_eq!(normalize_uid(&UID.to_uppercase()), UID);
        assert_eq!(normalize_uid(UID_), UID);
        let upper = format!("/kubepods/pod{}/{CID}", UID.to_uppercase());
        assert_eq!(pod_of_path(&upper), pod(Some(CID)));
    }
}
