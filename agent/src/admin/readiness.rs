//! The node's status as readiness sees it: the reconciler publishes it, `/health/ready` answers
//! from it.

use std::{collections::BTreeMap, time::Duration};

use tokio::time::Instant;

use crate::pod::PodKey;

/// What the node's pods look like, for readiness.
#[derive(Clone, Debug, Default)]
pub struct NodeStatus {
    /// The pod source has been read at least once.
    pub synced: bool,
    /// Pods with a listener.
    pub served: usize,
    /// Pods without one: pods whose listener failed, and pods with an IP whose network namespace
    /// the source has not found.
    pub failing: BTreeMap<PodKey, Failing>,
}

/// A pod that is not served, why, and since when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failing {
    pub reason: String,
    /// When the pod was first seen not served; a pod that is retried keeps its first time.
    pub since: Instant,
}

impl NodeStatus {
    /// Ready when the source has been read and no pod has gone unserved for less than `grace`.
    ///
    /// A pod that stays unserved longer (a sandbox that never starts, a port its mesh holds) no
    /// longer holds the agent back: it keeps being retried, logged and counted, but a rolling update
    /// of the DaemonSet, which waits for readiness, must not wait for it forever. Within `grace`, a
    /// new agent is not ready until it serves what the old one did.
    pub fn ready(&self, now: Instant, grace: Duration) -> bool {
        self.synced
            && !self
                .failing
                .values()
                .any(|failing| failing.holds(now, grace))
    }
}

impl Failing {
    /// Whether the pod holds readiness back at `now`: unserved for less than `grace`.
    pub fn holds(&self, now: Instant, grace: Duration) -> bool {
        now.saturating_duration_since(self.since) < grace
    }
}
