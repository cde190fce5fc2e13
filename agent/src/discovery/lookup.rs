//! What a pod source asks of discovery, [`NetnsLookup`], and its answer from the host's `/proc`,
//! [`ProcLookup`]: one scan per lookup, however many pods it is for.

use std::{net::IpAddr, path::PathBuf};

use super::{ProcScan, pod_cgroups::PodCgroups};
use crate::{datapath::cgroup2_mount, netns::NetnsWorker, pod::NetnsRef};

/// A pod whose network namespace is wanted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetnsQuery {
    pub uid: String,
    /// `status.podIP`: the namespace is the pod's one that holds it.
    pub ip: IpAddr,
}

/// Finds pods' network namespaces.
///
/// Blocking (it may read all of `/proc` and enter namespaces): the source calls it on a blocking
/// thread, with every pod it needs a namespace for at that moment, so that one scan serves them all.
pub trait NetnsLookup: Send + Sync + 'static {
    /// One answer per query, in the queries' order: the namespace, or why it was not found.
    fn lookup(&self, pods: &[NetnsQuery]) -> Vec<Result<NetnsRef, String>>;

    /// Whether each pod has a process yet, in the queries' order: a cheap check, polled often
    /// (the Kubernetes source: every 20 ms) for the pods waiting for their namespace, so that a pod is looked up as
    /// soon as its sandbox starts rather than when its backoff ends. Without it (the default:
    /// never), lookups are retried on their backoff alone.
    fn populated(&self, pods: &[NetnsQuery]) -> Vec<bool> {
        vec![false; pods.len()]
    }
}

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
