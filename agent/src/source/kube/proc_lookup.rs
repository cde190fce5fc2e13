//! The host's `/proc` as the [`NetnsLookup`], through [`crate::discovery`]: one scan per lookup,
//! however many pods it is for.

use std::path::PathBuf;

use super::{NetnsLookup, NetnsQuery};
use crate::{discovery::ProcScan, netns::NetnsWorker, pod::NetnsRef};

pub struct ProcLookup {
    proc_root: PathBuf,
    worker: NetnsWorker,
}

impl ProcLookup {
    /// Looks in `proc_root` (the host's `/proc`), entering namespaces on `worker`'s thread.
    pub fn new(proc_root: PathBuf, worker: NetnsWorker) -> Self {
        Self { proc_root, worker }
    }
}

impl NetnsLookup for ProcLookup {
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
