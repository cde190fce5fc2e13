use std::sync::atomic::{AtomicU32, Ordering};

use nix::mount::{MntFlags, umount2};

use super::*;

#[test]
fn parses_kernel_release_strings() {
    let cases = [
        ("6.18.0-1-amd64", KernelVersion::new(6, 18, 0)),
        ("5.15.0-91-generic", KernelVersion::new(5, 15, 0)),
        ("5.4.0", KernelVersion::new(5, 4, 0)),
        ("6.1", KernelVersion::new(6, 1, 0)),
        ("6.8.12+", KernelVersion::new(6, 8, 12)),
        ("6.10.0-rc3", KernelVersion::new(6, 10, 0)),
        ("5.14.0-427.13.1.el9_4.x86_64", KernelVersion::new(5, 14, 0)),
    ];
    for (release, version) in cases {
        assert_eq!(KernelVersion::parse(release), Some(version), "{release}");
    }
    for bad in ["", "linux", "6", "6.x", "-5.15"] {
        assert_eq!(KernelVersion::parse(bad), None, "{bad}");
    }
}

#[test]
fn kernel_minimum_is_5_17_and_the_error_says_why() {
    assert!(check_kernel(KernelVersion::new(5, 17, 0)).is_ok());
    assert!(check_kernel(KernelVersion::new(5, 16, 20)).is_err());
    assert!(check_kernel(KernelVersion::new(6, 18, 0)).is_ok());
    let old = KernelVersion::parse("5.14.21-150400-default").unwrap();
    let err = check_kernel(old).unwrap_err().to_string();
    assert_eq!(
        err,
        "Linux 5.14.21 is too old: the sk_lookup program's ingress interface \
         (ingress_ifindex) needs Linux 5.17 or later; upgrade the node's kernel"
    );
    assert!(check_kernel(KernelVersion::new(5, 4, 0)).is_err());
    assert!(check_kernel(KernelVersion::new(4, 19, 300)).is_err());
}

#[test]
fn running_kernel_parses() {
    let (version, release) = KernelVersion::running().unwrap();
    assert!(release.starts_with(&format!("{}.{}", version.major, version.minor)));
}

#[test]
fn reads_the_effective_mask_from_proc_status() {
    let status = "Name:\tprobe-bypass\nCapInh:\t0000000000000000\nCapPrm:\t000001ffffffffff\n\
                  CapEff:\t000001ffffffffff\nCapBnd:\t000001ffffffffff\n";
    assert_eq!(effective_capabilities(status), Some(0x1ff_ffff_ffff));
    assert_eq!(effective_capabilities("Name:\tx\n"), None);
    assert_eq!(effective_capabilities("CapEff:\tzz\n"), None);
    let own = fs::read_to_string(PROC_SELF_STATUS).unwrap();
    assert!(effective_capabilities(&own).is_some());
}

fn names(missing: &[MissingCapability]) -> Vec<&str> {
    missing.iter().map(|m| m.name.as_str()).collect()
}

#[test]
fn reports_every_missing_capability() {
    // Root on a current kernel: everything.
    assert_eq!(
        missing_capabilities(&DATAPATH_NEEDS, 0x1ff_ffff_ffff),
        vec![]
    );
    // Docker's default set: none of the three.
    assert_eq!(
        names(&missing_capabilities(&DATAPATH_NEEDS, 0xa804_25fb)),
        vec!["CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_BPF or CAP_SYS_ADMIN"]
    );
    // CAP_SYS_ADMIN covers loading programs without CAP_BPF.
    let sys_and_net = (1 << 21) | (1 << 12);
    assert_eq!(missing_capabilities(&DATAPATH_NEEDS, sys_and_net), vec![]);
    // CAP_BPF does not cover entering namespaces.
    let bpf_and_net = (1 << 39) | (1 << 12);
    assert_eq!(
        names(&missing_capabilities(&DATAPATH_NEEDS, bpf_and_net)),
        vec!["CAP_SYS_ADMIN"]
    );
    assert_eq!(
        names(&missing_capabilities(&DATAPATH_NEEDS, 1 << 21)),
        vec!["CAP_NET_ADMIN"]
    );
    let err = check_capabilities(&DATAPATH_NEEDS, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "missing capabilities: CAP_SYS_ADMIN (to enter pods' network namespaces (setns)"
        ),
        "{err}"
    );
    assert!(err.contains("CAP_NET_ADMIN (to load and attach"), "{err}");
    assert!(
        err.contains("CAP_BPF or CAP_SYS_ADMIN (to load eBPF"),
        "{err}"
    );
    assert!(err.contains("securityContext.capabilities"), "{err}");
}

#[test]
fn only_the_kube_source_needs_cap_sys_ptrace_and_the_error_says_why() {
    use PodSource::{Kube, Manifests};
    let (ebpf, no_datapath) = (DatapathMode::Ebpf, DatapathMode::None);
    assert!(needs(no_datapath, Manifests).is_empty());
    assert_eq!(needs(ebpf, Manifests).len(), DATAPATH_NEEDS.len());
    let kube_only = needs(no_datapath, Kube);
    // Root in a container with the runtime's default capabilities, which lack CAP_SYS_PTRACE.
    let err = check_capabilities(&kube_only, 0xa804_25fb)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(
            "missing capabilities: CAP_SYS_ADMIN (to enter pods' network namespaces (setns), \
             to listen and dial inside them), CAP_SYS_PTRACE (to open pods' /proc/<pid>/ns/net \
             with --pod-source kube: without it, pods whose processes run as another user \
             than the agent's are never found)"
        ),
        "{err}"
    );
    let (ptrace, sys_admin) = (1 << 19, 1 << 21);
    assert!(check_capabilities(&kube_only, ptrace | sys_admin).is_ok());
    let everything = needs(ebpf, Kube);
    assert_eq!(
        names(&missing_capabilities(&everything, ptrace)),
        vec!["CAP_SYS_ADMIN", "CAP_NET_ADMIN", "CAP_BPF or CAP_SYS_ADMIN"]
    );
    assert_eq!(
        names(&missing_capabilities(&everything, (1 << 21) | (1 << 12))),
        vec!["CAP_SYS_PTRACE"]
    );
    assert!(check_own_capabilities(&needs(no_datapath, Manifests)).is_ok());
}

#[test]
fn only_the_default_bpffs_place_is_mounted_by_the_agent() {
    let default = Path::new(BPFFS_DEFAULT_MOUNT);
    let pins = default.join("probe-bypass");
    assert_eq!(
        bpffs_plan(&pins, default, SYSFS_MAGIC).unwrap(),
        BpffsPlan::Mount {
            at: default.to_owned()
        }
    );
    assert_eq!(
        bpffs_plan(&pins, default, BPF_FS_MAGIC).unwrap(),
        BpffsPlan::Mounted {
            at: default.to_owned()
        }
    );
    let elsewhere = Path::new("/run/pins");
    let err = bpffs_plan(&elsewhere.join("pb"), elsewhere, TMPFS_MAGIC)
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "pin directory /run/pins/pb: its parent /run/pins is on tmpfs, not on bpffs; mount \
         bpffs there (mount -t bpf bpf /run/pins) or choose a pin directory under a bpffs \
         mount (the agent mounts it by itself only at /sys/fs/bpf)"
    );
    assert!(matches!(
        check_pin_dir(Path::new("pins")),
        Err(PreflightError::PinDirNoParent { .. })
    ));
}

#[test]
fn unknown_filesystems_are_named_by_their_magic_number() {
    assert_eq!(fs_type_name(CGROUP_SUPER_MAGIC), "cgroup (v1)");
    assert_eq!(
        fs_type_name(FsType(0x1234_5678)),
        "a filesystem of type 0x12345678"
    );
}

/// A directory of its own under `parent`, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(parent: &Path) -> Self {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = parent.join(format!(
            "probe-bypass-preflight-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir(&self.0);
    }
}

/// A directory on tmpfs (`/dev/shm`), or why there is none.
fn tmpfs_dir() -> Result<TempDir, String> {
    let shm = Path::new("/dev/shm");
    match statfs(shm) {
        Ok(stat) if stat.filesystem_type() == TMPFS_MAGIC => Ok(TempDir::new(shm)),
        Ok(_) => Err("/dev/shm is not tmpfs".into()),
        Err(e) => Err(format!("/dev/shm: {e}")),
    }
}

fn skip(test: &str, reason: &str) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} cannot run under CI: {reason}"
    );
    eprintln!("SKIPPED {test}: {reason}");
}

#[test]
fn a_tmpfs_directory_is_refused_as_cgroup_root_and_as_pin_parent() {
    let dir = match tmpfs_dir() {
        Ok(dir) => dir,
        Err(reason) => return skip("tmpfs_refused", &reason),
    };
    let err = check_cgroup_root(&dir.0).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "cgroup root {} is on tmpfs, not on cgroup v2; give the cgroup2 mount point \
             listed in /proc/mounts, or a directory under it",
            dir.0.display()
        )
    );
    let pins = dir.0.join("pins");
    let err = check_pin_dir(&pins).unwrap_err().to_string();
    assert!(err.contains("is on tmpfs, not on bpffs"), "{err}");

    // The entry point reports both problems at once, and leaves the directory as it was.
    let failed = check(&DATAPATH_NEEDS, Some(&dir.0), &pins).unwrap_err();
    let message = failed.to_string();
    assert!(message.contains("nothing was changed"), "{message}");
    assert!(
        failed
            .problems
            .iter()
            .any(|p| matches!(p, PreflightError::NotCgroup2 { .. })),
        "{message}"
    );
    assert!(
        failed
            .problems
            .iter()
            .any(|p| matches!(p, PreflightError::NotBpffs { .. })),
        "{message}"
    );
    assert_eq!(statfs(&dir.0).unwrap().filesystem_type(), TMPFS_MAGIC);
    assert!(!pins.exists());
}

#[test]
fn missing_and_non_directory_paths_are_refused() {
    let missing = Path::new("/nonexistent/probe-bypass");
    let err = check_cgroup_root(missing).unwrap_err().to_string();
    assert!(
        err.starts_with("cgroup root /nonexistent/probe-bypass is not usable: "),
        "{err}"
    );
    let err = check_pin_dir(&missing.join("pins"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("its parent /nonexistent/probe-bypass is not usable"),
        "{err}"
    );
    let err = check_cgroup_root(Path::new(PROC_SELF_STATUS))
        .unwrap_err()
        .to_string();
    assert!(err.ends_with("it is not a directory"), "{err}");
    let err = check_cgroup_root(Path::new("/proc"))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is on proc, not on cgroup v2"), "{err}");
}

#[test]
fn the_hosts_cgroup2_mount_is_accepted() {
    let root = match default_cgroup_root() {
        Ok(root) => root,
        Err(e) => return skip("cgroup2_mount_accepted", &e.to_string()),
    };
    check_cgroup_root(&root).unwrap();
}

/// bpffs mounted on a directory of the test's own, unmounted when dropped.
struct BpffsMount(TempDir);

impl Drop for BpffsMount {
    fn drop(&mut self) {
        let _ = umount2(&self.0.0, MntFlags::MNT_DETACH);
    }
}

#[test]
fn a_bpffs_parent_is_accepted_as_mounted() {
    if !nix::unistd::geteuid().is_root() {
        return skip("bpffs_parent_accepted", "needs root to mount bpffs");
    }
    let dir = BpffsMount(TempDir::new(&std::env::temp_dir()));
    mount(
        Some("bpf"),
        &dir.0.0,
        Some("bpf"),
        MsFlags::empty(),
        None::<&str>,
    )
    .unwrap();
    let pins = dir.0.0.join("probe-bypass");
    assert_eq!(
        check_pin_dir(&pins).unwrap(),
        BpffsPlan::Mounted {
            at: dir.0.0.clone()
        }
    );
    // bpffs is not cgroup v2.
    let err = check_cgroup_root(&dir.0.0).unwrap_err().to_string();
    assert!(err.contains("is on bpffs, not on cgroup v2"), "{err}");
}
