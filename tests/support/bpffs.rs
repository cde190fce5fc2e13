//! A bpffs of a test's own: mounted on a temporary directory, so that a test pins its datapath
//! without mounting anything on the machine's `/sys/fs/bpf` (which the agent mounts when it is
//! missing, and which would then stay mounted after the test).
//!
//! Dropping the guard uninstalls whatever is pinned (which detaches the programs), unmounts, and
//! removes the directory, panics included.

use std::{
    fs,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use probe_bypass::datapath;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A pin directory on a private bpffs mount.
pub struct TestPins {
    mount: PathBuf,
    path: PathBuf,
}

impl TestPins {
    pub fn new() -> Self {
        let pins = Self::directory();
        mount(
            Some("bpf"),
            &pins.mount,
            Some("bpf"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .unwrap_or_else(|error| panic!("mount bpffs on {}: {error}", pins.mount.display()));
        pins
    }

    /// A directory for bpffs that is not mounted yet, made a shared mount point (bound onto
    /// itself): where a container given it with `Bidirectional` propagation mounts bpffs that the
    /// host then sees, as the DaemonSet's `mount-bpffs` init container does on a node's
    /// `/sys/fs/bpf` (containerd accepts such a mount only from a shared mount).
    pub fn unmounted_shared() -> Self {
        let pins = Self::directory();
        let at = &pins.mount;
        mount(Some(at), at, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .unwrap_or_else(|error| panic!("bind {} onto itself: {error}", at.display()));
        mount(
            None::<&str>,
            at,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .unwrap_or_else(|error| panic!("make {} a shared mount: {error}", at.display()));
        pins
    }

    /// The guard of an empty temporary directory, nothing mounted on it yet.
    fn directory() -> Self {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let mount_point = std::env::temp_dir().join(format!("pb-bpffs-{}-{n}", std::process::id()));
        fs::create_dir_all(&mount_point)
            .unwrap_or_else(|error| panic!("create {}: {error}", mount_point.display()));
        Self {
            path: mount_point.join("probe-bypass"),
            mount: mount_point,
        }
    }

    /// The directory the bpffs is (or is to be) mounted on: the node's `/sys/fs/bpf`.
    pub fn mount_point(&self) -> &Path {
        &self.mount
    }

    /// Where the datapath pins (it need not exist yet; its parent is the bpffs).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// [`Self::path`] as an argument for `--pin-path`.
    pub fn arg(&self) -> String {
        self.path.display().to_string()
    }
}

impl Drop for TestPins {
    fn drop(&mut self) {
        match datapath::uninstall(&self.path) {
            Ok(report) if report.left.is_empty() => {}
            Ok(report) => eprintln!("uninstall left {:?} behind", report.left),
            Err(error) => eprintln!("uninstall {}: {error}", self.path.display()),
        }
        // Detached: an agent that still holds a map open must not keep the mount alive. Every
        // mount stacked there goes (a bpffs on the shared bind of `unmounted_shared`, the bind).
        // The first unmount must succeed; a later one fails once nothing is left there.
        let mut unmounted = 0;
        loop {
            match umount2(&self.mount, MntFlags::MNT_DETACH) {
                Ok(()) => unmounted += 1,
                Err(error) => {
                    if unmounted == 0 {
                        eprintln!("unmount {}: {error}", self.mount.display());
                    }
                    break;
                }
            }
        }
        let _ = fs::remove_dir(&self.mount);
    }
}
