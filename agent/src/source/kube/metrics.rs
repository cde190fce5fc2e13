//! The Kubernetes pod source's own metrics.

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PendingLabels {
    /// What the pod waits for: `no_ip` or `no_netns`.
    pub reason: &'static str,
}

/// The Kubernetes pod source's metrics, as `probe_bypass_kube_*`; cheap to clone, as every clone
/// counts into the same series. [`Default`] makes a set that is exported nowhere, for tests.
#[derive(Clone, Debug, Default)]
pub struct KubeMetrics {
    /// Errors of the watch on the node's pods (API unreachable or refusing, a broken stream); each
    /// is retried with backoff. A 410 Gone (the watch fell too far behind) is a relist, not an error.
    pub watch_errors: Counter,
    /// Complete lists of the node's pods: at start and after every watch restart that needed one.
    pub relists: Counter,
    /// Meshed pods not served yet, by what they wait for.
    pub pods_pending: Family<PendingLabels, Gauge>,
    /// Failed attempts to find a pod's network namespace, each retried with backoff.
    pub netns_lookup_failures: Counter,
    /// Served pods whose network namespace file went away or came to name another namespace (the
    /// process it was found through exited: a sandbox's pause process killed, a sandbox
    /// recreated), so the namespace was looked for again.
    pub netns_lost: Counter,
    /// Meshed pods the API server describes in a way the agent cannot serve (an invalid podIP),
    /// counted once per change of the pod.
    pub pod_errors: Counter,
}

impl KubeMetrics {
    pub fn set_pending(&self, no_ip: usize, no_netns: usize) {
        for (reason, count) in [("no_ip", no_ip), ("no_netns", no_netns)] {
            self.pods_pending
                .get_or_create(&PendingLabels { reason })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Exports these metrics, as `probe_bypass_kube_*` under the registry's prefix.
    pub fn register(&self, registry: &mut Registry) {
        let Self {
            watch_errors,
            relists,
            pods_pending,
            netns_lookup_failures,
            netns_lost,
            pod_errors,
        } = self;
        registry.register(
            "kube_watch_errors",
            "Errors of the watch on this node's pods (API server unreachable or refusing, stream broken), each retried with backoff",
            watch_errors.clone(),
        );
        registry.register(
            "kube_relists",
            "Complete lists of this node's pods: at start and after every watch restart that needed one (410 Gone)",
            relists.clone(),
        );
        registry.register(
            "kube_pods_pending",
            "Meshed pods not served yet, by what they wait for (no_ip: no pod IP yet; no_netns: network namespace not found yet)",
            pods_pending.clone(),
        );
        registry.register(
            "kube_netns_lookup_failures",
            "Failed attempts to find a meshed pod's network namespace, each retried with backoff",
            netns_lookup_failures.clone(),
        );
        registry.register(
            "kube_netns_lost",
            "Served pods whose network namespace file went away or came to name another namespace (the process it was found through exited: a sandbox's pause process killed, a sandbox recreated), so it was looked for again",
            netns_lost.clone(),
        );
        registry.register(
            "kube_pod_errors",
            "Meshed pods the API server describes in a way the agent cannot serve (an invalid podIP), once per change of the pod",
            pod_errors.clone(),
        );
        self.set_pending(0, 0);
    }
}
