//! Keeps every known pod served: its entries in the eBPF datapath's maps and its listeners in its
//! network namespace, the healthcheck's and, with `--serve-http-probes`, one on each probe port
//! (15901-15903). Opens them, moves them, closes them, retries them.
//!
//! Each pod is handled on its own. A pod whose namespace is missing or unusable is reported, counted
//! and retried with backoff; it never delays or stops the others.
//!
//! The datapath's maps outlive the agent (they are pinned), so a restarted agent starts with the
//! pods the previous one left there. They keep their redirects until the pod source says they are
//! gone: no pod's traffic skips its proxy across a restart. A pod the source knows but cannot serve
//! yet (its network namespace not found again so far) is not gone, and keeps its entry until it is
//! served again or leaves the source (issue 4).

mod listeners;
mod pods;
mod status;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use probe_bypass_rewrite::ProbeKind;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    admin::NodeStatus,
    datapath::{Datapath, DatapathError, SharedDatapath},
    defaults::NETNS_RECHECK,
    netns::{Netns, NetnsError},
    pod::{Pod, PodKey},
    serve::healthcheck::Context,
    source::{Pending, Snapshot},
    time::{Backoff, sleep_until},
};

/// Why a pod cannot be served.
#[derive(Debug, thiserror::Error)]
enum ServeError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot update the eBPF datapath: {0}")]
    Datapath(#[from] DatapathError),
    #[error("the datapath lock is poisoned")]
    Poisoned,
    #[error(
        "{netns} now names another network namespace (the process it belonged to exited); \
         waiting for the pod source to find the pod's namespace again"
    )]
    Replaced { netns: String },
}

/// Retries of a pod that cannot be served: 100 ms, doubling, at most 5 s.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

enum State {
    Listening {
        /// The namespace the listeners are in: checked against the pod's namespace file, and
        /// where the probe ports are retried.
        netns: Arc<Netns>,
        /// The namespace's cookie, as the datapath knows the pod by it.
        cookie: u64,
        stop: CancellationToken,
        /// With `--serve-http-probes`: the probe ports that could not be bound (something else in
        /// the pod, the mesh's proxy usually, holds them), each with its error. Retried with the
        /// namespace checks; the pod is served on the healthcheck port meanwhile.
        missing: BTreeMap<ProbeKind, String>,
    },
    Failing {
        error: String,
        attempts: u32,
        retry_at: Instant,
        /// The first failure of this run of failures.
        since: Instant,
    },
}

struct Entry {
    /// The pod as the listener answers it; updated in place when only its probes change.
    pod: watch::Sender<Arc<Pod>>,
    state: State,
}

/// Drives listeners from the pod source's set.
pub struct Reconciler {
    ctx: Arc<Context>,
    datapath: Option<SharedDatapath>,
    entries: HashMap<PodKey, Entry>,
    /// Addresses an earlier agent left in the datapath for pods the source knows but does not
    /// serve yet: kept until the pod is served (its entry is then rewritten) or leaves the source.
    carried: BTreeSet<IpAddr>,
    /// The source's pending pods, for readiness and the datapath's count of early probes.
    pending: BTreeMap<PodKey, Pending>,
    /// When each pending pod was first seen pending.
    pending_since: HashMap<PodKey, Instant>,
    status: watch::Sender<NodeStatus>,
}

impl Reconciler {
    pub fn new(
        ctx: Arc<Context>,
        datapath: Option<SharedDatapath>,
        status: watch::Sender<NodeStatus>,
    ) -> Self {
        Self {
            ctx,
            datapath,
            entries: HashMap::new(),
            carried: BTreeSet::new(),
            pending: BTreeMap::new(),
            pending_since: HashMap::new(),
            status,
        }
    }

    /// Runs `op` on the datapath, if there is one.
    fn with_datapath<T>(
        &self,
        op: impl FnOnce(&mut Datapath) -> Result<T, DatapathError>,
    ) -> Result<Option<T>, ServeError> {
        let Some(datapath) = &self.datapath else {
            return Ok(None);
        };
        let mut datapath = datapath.lock().map_err(|_| ServeError::Poisoned)?;
        Ok(Some(op(&mut datapath)?))
    }

    /// Follows `pods` until `stop` fires, then closes every listener.
    pub async fn run(mut self, mut pods: watch::Receiver<Arc<Snapshot>>, stop: CancellationToken) {
        let mut revalidate = tokio::time::interval(NETNS_RECHECK);
        revalidate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let first = Arc::clone(&pods.borrow_and_update());
        self.apply(&first).await;
        self.adopt_left(&first);
        loop {
            self.count_early_probes();
            self.publish();
            let retry_at = self.next_retry();
            tokio::select! {
                () = stop.cancelled() => break,
                changed = pods.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let snapshot = Arc::clone(&pods.borrow_and_update());
                    self.apply(&snapshot).await;
                    self.forget_carried(&snapshot);
                }
                () = sleep_until(retry_at) => self.retry_due().await,
                _ = revalidate.tick() => self.revalidate().await,
            }
        }
        for entry in self.entries.values() {
            if let State::Listening { stop, .. } = &entry.state {
                stop.cancel();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100ms_up_to_5s() {
        assert_eq!(RETRY.delay(0), Duration::from_millis(100));
        assert_eq!(RETRY.delay(1), Duration::from_millis(200));
        assert_eq!(RETRY.delay(5), Duration::from_millis(3200));
        assert_eq!(RETRY.delay(6), Duration::from_secs(5));
        assert_eq!(RETRY.delay(40), Duration::from_secs(5));
    }
}
