//! Start-up checks of the host, run before the agent starts its pod source and installs the eBPF
//! datapath.
//!
//! The agent refuses to start, with one message naming every problem and changing nothing, when a
//! capability it needs for what it is about to do is missing ([`needs`]: the Kubernetes pod source needs
//! one, the eBPF datapath three) or, with the eBPF datapath, when the kernel is too old, there is
//! no cgroup v2 hierarchy to attach to, or the pin directory is not on bpffs. The one thing it fixes itself: when the pin directory's
//! parent is exactly [`BPFFS_DEFAULT_MOUNT`] and bpffs is not mounted there, it mounts it, and
//! only once every other check has passed.
//!
//! # Kernel features the datapath uses
//!
//! | feature | since Linux | used for |
//! |---|---|---|
//! | `CGROUP_GETSOCKOPT` hook | 5.3 | answering the proxy's `SO_ORIGINAL_DST` for redirected connections |
//! | cgroup programs attached through a `bpf_link`, `BPF_LINK_UPDATE` | 5.7 | links pinned so they outlive the agent, and replaced in place by a new agent |
//! | `bpf_get_netns_cookie()` in `cgroup/sock_addr` programs | 5.7 | telling a pod's connects from the host's in `connect4` |
//! | `bpf_get_netns_cookie()` in `cgroup/sockopt` programs | 5.8 | the same in the getsockopt hook |
//! | `CAP_BPF` | 5.8 | loading programs without more than the capabilities below |
//! | BPF memory charged to the memory cgroup | 5.11 | no `RLIMIT_MEMLOCK` to raise |
//! | `SO_NETNS_COOKIE` | 5.14 | learning a pod's netns cookie from a socket made inside it |
//! | `bpf_get_netns_cookie()` in `sock_ops` and `sk_msg` programs | 5.15 | keying per-connection state by pod |
//! | `ingress_ifindex` in `sk_lookup` programs | 5.17 | telling a pod's own connections over `lo` from other nodes' (issue 5); sets [`MIN_KERNEL`] |
//!
//! The newest of them sets the minimum, so one version check covers the whole table.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use nix::{
    mount::{MsFlags, mount},
    sys::{
        statfs::{
            BPF_FS_MAGIC, BTRFS_SUPER_MAGIC, CGROUP_SUPER_MAGIC, CGROUP2_SUPER_MAGIC,
            EXT4_SUPER_MAGIC, FsType, OVERLAYFS_SUPER_MAGIC, PROC_SUPER_MAGIC, SYSFS_MAGIC,
            TMPFS_MAGIC, statfs,
        },
        utsname::uname,
    },
};

use crate::{
    datapath::{DatapathError, DatapathMode, cgroup2_mount},
    defaults::BPFFS_DEFAULT_MOUNT,
    source::PodSource,
};

/// The oldest kernel the datapath runs on.
pub const MIN_KERNEL: KernelVersion = KernelVersion::new(5, 17, 0);

/// Why [`MIN_KERNEL`] is what it is: the newest feature in the table of the module documentation.
pub const MIN_KERNEL_REASON: &str =
    "the sk_lookup program's ingress interface (ingress_ifindex) needs Linux 5.17";

/// The file the agent's effective capabilities are read from.
const PROC_SELF_STATUS: &str = "/proc/self/status";

/// A kernel version, as the first numbers of its release string (`uname -r`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl KernelVersion {
    pub const fn new(major: u32, minor: u32, patch: u32) -> Self {
        Self {
            major,
            minor,
            patch,
        }
    }

    /// Reads a release string such as `6.18.0-1-amd64`, `5.15.0-91-generic`, `5.4.0` or `6.1`:
    /// the dotted numbers before the first other character. A missing patch level is 0.
    pub fn parse(release: &str) -> Option<Self> {
        let numbers = release
            .split(|c: char| !(c.is_ascii_digit() || c == '.'))
            .next()?;
        let mut parts = numbers.split('.');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let patch = match parts.next() {
            None | Some("") => 0,
            Some(patch) => patch.parse().ok()?,
        };
        Some(Self::new(major, minor, patch))
    }

    /// The running kernel's version and its full release string.
    pub fn running() -> Result<(Self, String), PreflightError> {
        let uts = uname().map_err(PreflightError::Uname)?;
        let release = uts.release().to_string_lossy().into_owned();
        match Self::parse(&release) {
            Some(version) => Ok((version, release)),
            None => Err(PreflightError::UnknownKernel { release }),
        }
    }
}

impl fmt::Display for KernelVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Whether `found` is at least [`MIN_KERNEL`].
pub fn check_kernel(found: KernelVersion) -> Result<(), PreflightError> {
    if found >= MIN_KERNEL {
        Ok(())
    } else {
        Err(PreflightError::KernelTooOld { found })
    }
}

/// A Linux capability, by its bit in the `Cap*` masks of `/proc/<pid>/status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capability {
    pub bit: u8,
    pub name: &'static str,
}

pub const CAP_NET_ADMIN: Capability = Capability {
    bit: 12,
    name: "CAP_NET_ADMIN",
};
pub const CAP_SYS_PTRACE: Capability = Capability {
    bit: 19,
    name: "CAP_SYS_PTRACE",
};
pub const CAP_SYS_ADMIN: Capability = Capability {
    bit: 21,
    name: "CAP_SYS_ADMIN",
};
pub const CAP_BPF: Capability = Capability {
    bit: 39,
    name: "CAP_BPF",
};

impl Capability {
    /// Whether the mask has this capability.
    pub fn is_in(self, mask: u64) -> bool {
        mask & (1 << self.bit) != 0
    }
}

/// Something the agent does that needs privilege: any one of `any_of` allows it.
#[derive(Clone, Copy, Debug)]
pub struct Need {
    pub any_of: &'static [Capability],
    pub for_what: &'static str,
}

/// What the eBPF datapath needs, in the order a missing one is reported. The kernel accepts
/// `CAP_SYS_ADMIN` in place of `CAP_BPF` (it did before `CAP_BPF` existed, and still does).
pub const DATAPATH_NEEDS: [Need; 3] = [
    Need {
        any_of: &[CAP_SYS_ADMIN],
        for_what: "to enter pods' network namespaces (setns) and to mount bpffs",
    },
    Need {
        any_of: &[CAP_NET_ADMIN],
        for_what: "to load and attach the networking eBPF programs and their socket map",
    },
    Need {
        any_of: &[CAP_BPF, CAP_SYS_ADMIN],
        for_what: "to load eBPF programs and create their maps",
    },
];

/// What the Kubernetes pod source needs. A pod's network namespace is found by opening
/// `/proc/<pid>/ns/net` of its processes, which the kernel's ptrace access check allows only for
/// processes of the agent's own user holding no capability the agent lacks. The manifests source
/// names each pod's namespace and reads no other process.
pub const KUBE_SOURCE_NEEDS: [Need; 1] = [Need {
    any_of: &[CAP_SYS_PTRACE],
    for_what: "to open pods' /proc/<pid>/ns/net with --pod-source kube: without it, pods whose \
               processes run as another user than the agent's are never found",
}];

/// What serving pods needs whatever the datapath: entering their network namespaces. Checked at
/// start with the Kubernetes pod source (a cluster's agent); the manifests source, for
/// development, meets it only when it has a pod to serve.
pub const NETNS_NEEDS: [Need; 1] = [Need {
    any_of: &[CAP_SYS_ADMIN],
    for_what: "to enter pods' network namespaces (setns), to listen and dial inside them",
}];

/// What the agent needs to run `datapath` with pods from `source`, in the order a missing one is
/// reported. Public so that a deployment's grant can be checked against it (`tests/deploy.rs`).
pub fn needs(datapath: DatapathMode, source: PodSource) -> Vec<Need> {
    let datapath: &[Need] = match (datapath, source) {
        (DatapathMode::Ebpf, _) => &DATAPATH_NEEDS,
        (DatapathMode::None, PodSource::Kube) => &NETNS_NEEDS,
        (DatapathMode::None, PodSource::Manifests) => &[],
    };
    let source: &[Need] = match source {
        PodSource::Kube => &KUBE_SOURCE_NEEDS,
        PodSource::Manifests => &[],
    };
    datapath.iter().chain(source).copied().collect()
}

/// A capability the agent lacks, and what it needs it for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MissingCapability {
    /// The capability, or the alternatives that would each do (`CAP_BPF or CAP_SYS_ADMIN`).
    pub name: String,
    pub needed_for: &'static str,
}

impl fmt::Display for MissingCapability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name, self.needed_for)
    }
}

/// The effective capability mask of the `CapEff:` line of a `/proc/<pid>/status` file.
pub fn effective_capabilities(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
}

/// Every capability of `needs` that the effective mask lacks.
pub fn missing_capabilities(needs: &[Need], effective: u64) -> Vec<MissingCapability> {
    needs
        .iter()
        .filter(|need| !need.any_of.iter().any(|cap| cap.is_in(effective)))
        .map(|need| MissingCapability {
            name: need
                .any_of
                .iter()
                .map(|cap| cap.name)
                .collect::<Vec<_>>()
                .join(" or "),
            needed_for: need.for_what,
        })
        .collect()
}

/// Whether the effective mask has every capability of `needs`.
pub fn check_capabilities(needs: &[Need], effective: u64) -> Result<(), PreflightError> {
    let missing = missing_capabilities(needs, effective);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PreflightError::MissingCapabilities { missing })
    }
}

/// The agent's own effective capabilities.
fn own_capabilities() -> Result<u64, PreflightError> {
    let path = PathBuf::from(PROC_SELF_STATUS);
    let status = fs::read_to_string(&path).map_err(|source| PreflightError::ReadStatus {
        path: path.clone(),
        source,
    })?;
    effective_capabilities(&status).ok_or(PreflightError::NoCapEff { path })
}

/// The cgroup v2 hierarchy's mount point from `/proc/mounts`: the default attach point.
pub fn default_cgroup_root() -> Result<PathBuf, PreflightError> {
    cgroup2_mount().map_err(|error| match error {
        DatapathError::ReadMounts { path, source } => PreflightError::ReadMounts { path, source },
        _ => PreflightError::NoCgroup2,
    })
}

/// Whether `path` is a directory on a cgroup v2 filesystem, where the cgroup programs can attach.
pub fn check_cgroup_root(path: &Path) -> Result<(), PreflightError> {
    let fs_type = directory_fs_type(path).map_err(|problem| PreflightError::CgroupRoot {
        path: path.to_owned(),
        problem,
    })?;
    if fs_type == CGROUP2_SUPER_MAGIC {
        Ok(())
    } else {
        Err(PreflightError::NotCgroup2 {
            path: path.to_owned(),
            found: fs_type_name(fs_type),
        })
    }
}

/// What has to happen for the pin directory to be on bpffs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BpffsPlan {
    /// The pin directory's parent is already on bpffs.
    Mounted { at: PathBuf },
    /// The parent is [`BPFFS_DEFAULT_MOUNT`], which is not bpffs yet: the agent mounts it.
    Mount { at: PathBuf },
}

/// Whether the pin directory's parent is on bpffs, or is [`BPFFS_DEFAULT_MOUNT`] and can have it
/// mounted. Changes nothing.
pub fn check_pin_dir(pin_dir: &Path) -> Result<BpffsPlan, PreflightError> {
    let parent = pin_dir
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .ok_or_else(|| PreflightError::PinDirNoParent {
            pin_dir: pin_dir.to_owned(),
        })?;
    let fs_type = directory_fs_type(parent).map_err(|problem| PreflightError::PinParent {
        pin_dir: pin_dir.to_owned(),
        parent: parent.to_owned(),
        problem,
    })?;
    bpffs_plan(pin_dir, parent, fs_type)
}

/// The decision of [`check_pin_dir`], once the parent's filesystem is known.
fn bpffs_plan(pin_dir: &Path, parent: &Path, fs_type: FsType) -> Result<BpffsPlan, PreflightError> {
    if fs_type == BPF_FS_MAGIC {
        Ok(BpffsPlan::Mounted {
            at: parent.to_owned(),
        })
    } else if parent == Path::new(BPFFS_DEFAULT_MOUNT) {
        Ok(BpffsPlan::Mount {
            at: parent.to_owned(),
        })
    } else {
        Err(PreflightError::NotBpffs {
            pin_dir: pin_dir.to_owned(),
            parent: parent.to_owned(),
            found: fs_type_name(fs_type),
        })
    }
}

/// Mounts bpffs at `at` unless it is bpffs already; returns whether it mounted. For the
/// DaemonSet's init container (`probe-bypass mount-bpffs`): a mount made there, on the host's
/// `/sys/fs/bpf` with bidirectional propagation, reaches the host, where the agent's pins must
/// live to outlast its container. The agent itself then needs no propagation back to the host.
pub fn mount_bpffs(at: &Path) -> Result<bool, PreflightError> {
    let fs_type = directory_fs_type(at).map_err(|problem| PreflightError::PinParent {
        pin_dir: at.to_owned(),
        parent: at.to_owned(),
        problem,
    })?;
    if fs_type == BPF_FS_MAGIC {
        return Ok(false);
    }
    mount(Some("bpf"), at, Some("bpf"), MsFlags::empty(), None::<&str>).map_err(|source| {
        PreflightError::MountBpffs {
            at: at.to_owned(),
            source,
        }
    })?;
    Ok(true)
}

/// The filesystem type of a directory; an error message when it is missing or not a directory.
fn directory_fs_type(path: &Path) -> Result<FsType, String> {
    let meta = fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_dir() {
        return Err("it is not a directory".to_owned());
    }
    statfs(path)
        .map(|stat| stat.filesystem_type())
        .map_err(|e| format!("statfs: {e}"))
}

/// XFS's magic number: nix leaves it out on musl, whose libc lacks it, and the agent's image is
/// built for musl.
const XFS_SUPER_MAGIC: FsType = FsType(0x5846_5342);

/// A readable name for the filesystem types an operator is likely to meet, else the magic number.
fn fs_type_name(fs_type: FsType) -> String {
    let known = [
        (CGROUP2_SUPER_MAGIC, "cgroup2"),
        (CGROUP_SUPER_MAGIC, "cgroup (v1)"),
        (BPF_FS_MAGIC, "bpffs"),
        (TMPFS_MAGIC, "tmpfs"),
        (SYSFS_MAGIC, "sysfs"),
        (PROC_SUPER_MAGIC, "proc"),
        (OVERLAYFS_SUPER_MAGIC, "overlayfs"),
        (EXT4_SUPER_MAGIC, "ext4"),
        (XFS_SUPER_MAGIC, "xfs"),
        (BTRFS_SUPER_MAGIC, "btrfs"),
    ];
    known
        .iter()
        .find(|(magic, _)| *magic == fs_type)
        .map(|(_, name)| (*name).to_owned())
        .unwrap_or_else(|| format!("a filesystem of type {:#x}", fs_type.0))
}

/// One problem the checks found.
#[derive(Debug, thiserror::Error)]
pub enum PreflightError {
    #[error("Linux {found} is too old: {MIN_KERNEL_REASON} or later; upgrade the node's kernel")]
    KernelTooOld { found: KernelVersion },
    #[error("cannot tell the kernel version from its release {release:?} (uname -r)")]
    UnknownKernel { release: String },
    #[error("uname failed: {0}")]
    Uname(#[source] nix::Error),
    #[error("cannot read the agent's capabilities from {path}: {source}")]
    ReadStatus {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read the agent's capabilities: {path} has no valid CapEff line")]
    NoCapEff { path: PathBuf },
    #[error(
        "missing capabilities: {}; run the agent as root, or add them to its container's \
         securityContext.capabilities",
        list(missing)
    )]
    MissingCapabilities { missing: Vec<MissingCapability> },
    #[error("cannot read {path} to find the cgroup v2 hierarchy: {source}")]
    ReadMounts {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "no cgroup v2 hierarchy is mounted (/proc/mounts has no cgroup2 entry), and the eBPF \
         programs attach to one; mount it (mount -t cgroup2 none /sys/fs/cgroup/unified) or boot \
         the node with cgroup v2 (systemd.unified_cgroup_hierarchy=1)"
    )]
    NoCgroup2,
    #[error("cgroup root {path} is not usable: {problem}")]
    CgroupRoot { path: PathBuf, problem: String },
    #[error(
        "cgroup root {path} is on {found}, not on cgroup v2; give the cgroup2 mount point listed \
         in /proc/mounts, or a directory under it"
    )]
    NotCgroup2 { path: PathBuf, found: String },
    #[error(
        "pin directory {pin_dir} has no parent directory; give a path such as /sys/fs/bpf/probe-bypass"
    )]
    PinDirNoParent { pin_dir: PathBuf },
    #[error("pin directory {pin_dir}: its parent {parent} is not usable: {problem}")]
    PinParent {
        pin_dir: PathBuf,
        parent: PathBuf,
        problem: String,
    },
    #[error(
        "pin directory {pin_dir}: its parent {parent} is on {found}, not on bpffs; mount bpffs \
         there (mount -t bpf bpf {parent}) or choose a pin directory under a bpffs mount \
         (the agent mounts it by itself only at /sys/fs/bpf)"
    )]
    NotBpffs {
        pin_dir: PathBuf,
        parent: PathBuf,
        found: String,
    },
    #[error("failed to mount bpffs on {at} (mount -t bpf bpf {at}): {source}")]
    MountBpffs {
        at: PathBuf,
        #[source]
        source: nix::Error,
    },
}

fn list(items: &[impl fmt::Display]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every problem the start-up checks found; the host was left as it was.
#[derive(Debug, thiserror::Error)]
#[error(
    "the host is not ready for the agent, nothing was changed:{}",
    self.problems.iter().map(|p| format!("\n  - {p}")).collect::<String>()
)]
pub struct PreflightFailed {
    pub problems: Vec<PreflightError>,
}

/// What the checks found, for the agent's start-up log line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    pub kernel: KernelVersion,
    /// The full release string, e.g. `6.18.0-1-amd64`.
    pub kernel_release: String,
    /// The cgroup v2 directory the programs attach to.
    pub cgroup_root: PathBuf,
    /// The bpffs mount the pin directory is under.
    pub bpffs: PathBuf,
    /// True when the agent mounted bpffs itself during the checks.
    pub mounted_bpffs: bool,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Linux {} (at least {MIN_KERNEL} needed), capabilities present, cgroup v2 at {}, bpffs at {}",
            self.kernel_release,
            self.cgroup_root.display(),
            self.bpffs.display()
        )?;
        if self.mounted_bpffs {
            f.write_str(" (mounted by the agent)")?;
        }
        Ok(())
    }
}

/// Whether the agent has the capabilities of `needs`, for running without the eBPF datapath (with
/// it, [`check`] tells this among its checks). Reads nothing when `needs` is empty.
pub fn check_own_capabilities(needs: &[Need]) -> Result<(), PreflightFailed> {
    if needs.is_empty() {
        return Ok(());
    }
    own_capabilities()
        .and_then(|effective| check_capabilities(needs, effective))
        .map_err(|problem| PreflightFailed {
            problems: vec![problem],
        })
}

/// Runs every check the eBPF datapath needs, with the capabilities of `needs` (at least
/// [`DATAPATH_NEEDS`]), and reports every problem at once; changes nothing unless they all pass.
/// Then, if the pin directory's parent is [`BPFFS_DEFAULT_MOUNT`] without bpffs, mounts it.
///
/// `cgroup_root` is the directory the programs will attach to; `None` means the cgroup v2 mount
/// point from `/proc/mounts`. `pin_dir` is where links and maps will be pinned; it need not exist
/// yet, but its parent must be on bpffs.
pub fn check(
    needs: &[Need],
    cgroup_root: Option<&Path>,
    pin_dir: &Path,
) -> Result<Report, PreflightFailed> {
    let mut problems = Vec::new();
    let mut keep = |result| match result {
        Ok(()) => (),
        Err(problem) => problems.push(problem),
    };

    let kernel = KernelVersion::running();
    if let Ok((version, _)) = &kernel {
        keep(check_kernel(*version));
    }
    let kernel = kernel.map_err(|problem| keep(Err(problem))).ok();

    keep(own_capabilities().and_then(|effective| check_capabilities(needs, effective)));

    let cgroup_root = match cgroup_root {
        Some(path) => Ok(path.to_owned()),
        None => default_cgroup_root(),
    };
    if let Ok(root) = &cgroup_root {
        keep(check_cgroup_root(root));
    }
    let cgroup_root = cgroup_root.map_err(|problem| keep(Err(problem))).ok();

    let bpffs = check_pin_dir(pin_dir)
        .map_err(|problem| keep(Err(problem)))
        .ok();

    let (Some((kernel, kernel_release)), Some(cgroup_root), Some(bpffs)) =
        (kernel, cgroup_root, bpffs)
    else {
        return Err(PreflightFailed { problems });
    };
    if !problems.is_empty() {
        return Err(PreflightFailed { problems });
    }

    let (bpffs, mounted_bpffs) = match bpffs {
        BpffsPlan::Mounted { at } => (at, false),
        BpffsPlan::Mount { at } => {
            mount(
                Some("bpf"),
                &at,
                Some("bpf"),
                MsFlags::empty(),
                None::<&str>,
            )
            .map_err(|source| PreflightFailed {
                problems: vec![PreflightError::MountBpffs {
                    at: at.clone(),
                    source,
                }],
            })?;
            (at, true)
        }
    };
    Ok(Report {
        kernel,
        kernel_release,
        cgroup_root,
        bpffs,
        mounted_bpffs,
    })
}

#[cfg(test)]
mod tests;
