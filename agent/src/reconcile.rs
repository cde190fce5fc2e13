//! Keeps one healthcheck listener per known pod: opens them, moves them, closes them, retries them.
//!
//! Each pod is handled on its own. A pod whose namespace is missing or unusable is reported, counted
//! and retried with backoff; it never delays or stops the others.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    healthcheck::{self, Context},
    netns::{Netns, NetnsError, NetnsId},
    pod::{Pod, PodKey},
    source::PodSet,
};

/// First retry delay of a failing pod; doubled on each failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// How often served pods' namespace files are checked: a pod whose namespace was deleted or replaced
/// under the same name must not keep a listener in the old one.
const REVALIDATE: Duration = Duration::from_secs(2);

/// What the node's pods look like, for readiness.
#[derive(Clone, Debug, Default)]
pub struct NodeStatus {
    /// The pod source has been read at least once.
    pub synced: bool,
    /// Pods with a listener.
    pub served: usize,
    /// Pods without one, and why.
    pub failing: BTreeMap<PodKey, String>,
}

impl NodeStatus {
    /// Ready when every known pod has its listener.
    pub fn ready(&self) -> bool {
        self.synced && self.failing.is_empty()
    }
}

enum State {
    Listening {
        netns: NetnsId,
        stop: CancellationToken,
    },
    Failing {
        error: String,
        attempts: u32,
        retry_at: Instant,
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
    entries: HashMap<PodKey, Entry>,
    status: watch::Sender<NodeStatus>,
}

impl Reconciler {
    pub fn new(ctx: Arc<Context>, status: watch::Sender<NodeStatus>) -> Self {
        Self {
            ctx,
            entries: HashMap::new(),
            status,
        }
    }

    /// Follows `pods` until `stop` fires, then closes every listener.
    pub async fn run(mut self, mut pods: watch::Receiver<Arc<PodSet>>, stop: CancellationToken) {
        let mut revalidate = tokio::time::interval(REVALIDATE);
        revalidate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let first = Arc::clone(&pods.borrow_and_update());
        self.apply(&first).await;
        loop {
            self.publish();
            let retry_at = self.next_retry();
            tokio::select! {
                () = stop.cancelled() => break,
                changed = pods.changed() => {
                    if changed.is_err() {
                        break;
                    }
                    let set = Arc::clone(&pods.borrow_and_update());
                    self.apply(&set).await;
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

    async fn apply(&mut self, pods: &PodSet) {
        let gone: Vec<PodKey> = self
            .entries
            .keys()
            .filter(|key| !pods.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            if let Some(entry) = self.entries.remove(&key) {
                if let State::Listening { stop, .. } = entry.state {
                    stop.cancel();
                }
                self.ctx.metrics.forget_pod(&key);
                log::info!("pod {key} removed: listener closed");
            }
        }
        for (key, pod) in pods {
            let Some(entry) = self.entries.get(key) else {
                log::info!("pod {key} added: ip {}, netns {}", pod.ip, pod.netns);
                let (sender, _) = watch::channel(Arc::clone(pod));
                let state = self.start(pod, &sender, 0, None).await;
                self.entries
                    .insert(key.clone(), Entry { pod: sender, state });
                continue;
            };
            let current = Arc::clone(&entry.pod.borrow());
            if current == *pod {
                continue;
            }
            let moved = current.ip != pod.ip || current.netns != pod.netns;
            log::info!(
                "pod {key} changed: ip {}, netns {}, probe ports {:?}",
                pod.ip,
                pod.netns,
                pod.probe_ports
            );
            entry.pod.send_replace(Arc::clone(pod));
            if moved || matches!(entry.state, State::Failing { .. }) {
                self.restart(key, 0).await;
            }
        }
    }

    /// Opens `pod`'s listener and returns the resulting state. A failure is logged when it first
    /// happens or changes, not on every retry.
    async fn start(
        &self,
        pod: &Pod,
        sender: &watch::Sender<Arc<Pod>>,
        attempts: u32,
        previous_error: Option<&str>,
    ) -> State {
        match self.open(pod, sender).await {
            Ok(state) => {
                if attempts > 0 {
                    log::info!("pod {} served after {attempts} failed attempts", pod.key);
                }
                state
            }
            Err(error) => {
                self.ctx.metrics.listener_error(&pod.key);
                let backoff = backoff(attempts);
                let error = error.to_string();
                if previous_error == Some(error.as_str()) {
                    log::debug!(
                        "pod {}: still cannot serve: {error}; retrying in {backoff:?}",
                        pod.key
                    );
                } else {
                    log::error!("pod {}: cannot serve: {error}; retrying", pod.key);
                }
                State::Failing {
                    error,
                    attempts: attempts + 1,
                    retry_at: Instant::now() + backoff,
                }
            }
        }
    }

    async fn open(&self, pod: &Pod, sender: &watch::Sender<Arc<Pod>>) -> Result<State, NetnsError> {
        let netns = Arc::new(Netns::open(&pod.netns.path())?);
        let listener =
            healthcheck::bind(&self.ctx.worker, &netns, pod.ip, self.ctx.settings.port).await?;
        let stop = CancellationToken::new();
        let id = netns.id();
        tokio::spawn(healthcheck::serve(
            listener,
            Arc::clone(&self.ctx),
            sender.subscribe(),
            netns,
            stop.clone(),
        ));
        Ok(State::Listening { netns: id, stop })
    }

    /// Replaces the listener of `key`: the new one is bound before the old one closes (SO_REUSEPORT),
    /// so a pod that moved keeps answering throughout.
    async fn restart(&mut self, key: &PodKey, attempts: u32) {
        let Some(entry) = self.entries.get(key) else {
            return;
        };
        let pod = Arc::clone(&entry.pod.borrow());
        let previous_error = match &entry.state {
            State::Failing { error, .. } => Some(error.as_str()),
            State::Listening { .. } => None,
        };
        let state = self.start(&pod, &entry.pod, attempts, previous_error).await;
        if let Some(entry) = self.entries.get_mut(key) {
            let old = std::mem::replace(&mut entry.state, state);
            if let State::Listening { stop, .. } = old {
                stop.cancel();
            }
        }
    }

    fn next_retry(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|entry| match entry.state {
                State::Failing { retry_at, .. } => Some(retry_at),
                State::Listening { .. } => None,
            })
            .min()
    }

    async fn retry_due(&mut self) {
        let now = Instant::now();
        let due: Vec<(PodKey, u32)> = self
            .entries
            .iter()
            .filter_map(|(key, entry)| match entry.state {
                State::Failing {
                    retry_at, attempts, ..
                } if retry_at <= now => Some((key.clone(), attempts)),
                _ => None,
            })
            .collect();
        for (key, attempts) in due {
            self.restart(&key, attempts).await;
        }
    }

    /// Re-opens the listener of every served pod whose namespace file is gone or now names another
    /// namespace.
    async fn revalidate(&mut self) {
        let stale: Vec<PodKey> = self
            .entries
            .iter()
            .filter(|(_, entry)| match &entry.state {
                State::Listening { netns, .. } => {
                    let path = entry.pod.borrow().netns.path();
                    NetnsId::of(&path).ok() != Some(*netns)
                }
                State::Failing { .. } => false,
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in stale {
            log::warn!("pod {key}: its network namespace is gone or was replaced; reopening");
            self.restart(&key, 0).await;
        }
    }

    fn publish(&self) {
        let mut status = NodeStatus {
            synced: true,
            ..NodeStatus::default()
        };
        for (key, entry) in &self.entries {
            match &entry.state {
                State::Listening { .. } => status.served += 1,
                State::Failing { error, .. } => {
                    status.failing.insert(key.clone(), error.clone());
                }
            }
        }
        self.ctx.metrics.set_pods(self.entries.len(), status.served);
        self.status.send_replace(status);
    }
}

fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(2u32.saturating_pow(attempts))
        .min(MAX_BACKOFF)
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_from_100ms_up_to_5s() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(5), Duration::from_millis(3200));
        assert_eq!(backoff(6), MAX_BACKOFF);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
