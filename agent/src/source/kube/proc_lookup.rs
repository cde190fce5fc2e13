//! The host's `/proc` as the [`NetnsLookup`], through [`crate::discovery`]: one scan per lookup,
//! however many pods it is for.

use std::path::PathBuf;

use super::{NetnsLookup, NetnsQuery, pod_cgroups::PodCgroups};
use crate::{datapath::cgroup2_mount, discovery::ProcScan, netns::NetnsWorker, pod::NetnsRef};

pub struct ProcLookup {
    proc_root: PathBuf,
    worker: NetnsWorker,
    cgroups: PodCgroups,
}

impl ProcLookup {
    /// Looks in `proc_root` (the host's `/proc`), entering namespaces on `worker`'s thread, and
    /// watches pods' cgroups for their first process under `cgroup_root`: the host's cgroup v2
    /// root (`--cgroup-root`; in a container its own `/sys/fs/cgroup` is a cgroup namespace of
    /// its own, with no pods in it), or by default the cgroup v2 mount.
    pub fn new(proc_root: PathBuf, cgroup_root: Option<PathBuf>, worker: NetnsWorker) -> Self {
        let mount = cgroup_root
            .map_or_else(cgroup2_mount, Ok)
            .inspect_err(|error| {
                log::info!(
                    "no cgroup v2 mount ({error}): pods waiting for their network namespace are \
                     looked up on a backoff timer only"
                );
            })
            .ok();
        Self {
            proc_root,
            worker,
            cgroups: PodCgroups::new(mount),
        }
    }
}

impl NetnsLookup for ProcLookup {
    fn populated(&self, pods: &[NetnsQuery]) -> Vec<bool> {
        pods.iter()
            .map(|pod| self.cgroups.populated(&pod.uid))
            .collect()
    }

    fn lookup(&self, pods: &[NetnsQuery]) -> Vec<Result<NetnsRef, String>> {
        match ProcScan::new(&self.proc_root) {
            Ok(scan) => pods
                .iter()
                .map(|pod| {
                    scan.find(&self.worker, &pod.uid, pod.ip)
                        .map(|found| found.netns)
                        .map_err(|error| error.to_string())
                })
                .collect(),
            Err(error) => {
                let error = error.to_string();
                pods.iter().map(|_| Err(error.clone())).collect()
            }
        }
    }
}
