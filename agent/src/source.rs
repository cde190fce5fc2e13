//! Where the node's meshed pods come from: the Kubernetes API server ([`kube`]) or a directory of
//! Pod manifests ([`manifests`]).
//!
//! A source publishes the complete set of pods it knows, level-triggered like a Kubernetes
//! informer's store: consumers compare it with what they serve, so a missed or repeated update
//! never leaves them out of step.

pub mod kube;
pub mod manifests;

use std::{collections::BTreeMap, net::IpAddr, sync::Arc};

use crate::pod::{Pod, PodKey};

/// Where the node's pods come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum PodSource {
    /// Watch this node's pods on the Kubernetes API server.
    Kube,
    /// Read Pod manifests from a directory (`--pod-manifests`).
    Manifests,
}

/// Every meshed pod a source can serve, by key.
pub type PodSet = BTreeMap<PodKey, Arc<Pod>>;

/// What a source publishes, as one value so that a pod moves from pending to served atomically.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The pods to serve.
    pub pods: PodSet,
    /// Meshed pods with an IP that cannot be served yet (their network namespace is not found).
    /// They are not gone: a restarted agent keeps what an earlier one left in the datapath for
    /// them (issue 4), and readiness counts them as failing.
    pub pending: BTreeMap<PodKey, Pending>,
}

/// A meshed pod the source knows but cannot serve yet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pending {
    pub ip: IpAddr,
    /// Why it is not served, for readiness and the log.
    pub reason: String,
}

impl Snapshot {
    /// A snapshot of pods that are all served.
    pub fn served(pods: PodSet) -> Self {
        Self {
            pods,
            pending: BTreeMap::new(),
        }
    }
}
