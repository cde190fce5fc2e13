//! The Kubernetes API server as the pod source: a watch on this node's pods (issue 4).
//!
//! kube-runtime's watcher lists the node's pods (`spec.nodeName=<node>`), then watches from the
//! list's resourceVersion, and lists again whenever the watch cannot resume (410 Gone). A new list
//! replaces the pods known before all at once when it is complete, so a relist never shows an
//! empty or partial set; pods missing from it are gone. API errors are retried with the watcher's
//! default backoff (0.8 s doubling to 30 s, as client-go's reflector), and the pods known so far
//! keep being served meanwhile.
//!
//! The API server does not know a pod's network namespace: a [`NetnsLookup`] finds it from the
//! pod's UID and IP. Which pods are meshed is for [`MeshSelector`] to say.

pub mod mesh;
mod metrics;
mod node_pods;

use std::{pin::pin, sync::Arc, time::Duration};

use futures::{Stream, StreamExt as _};
use k8s_openapi::api::core::v1::Pod as K8sPod;
use kube::{
    Api, Client, Config,
    config::InferConfigError,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use tokio::{sync::watch, time::Instant};

use self::node_pods::NodePods;
pub use self::{
    mesh::{LabelMatch, MeshSelector},
    metrics::{KubeMetrics, PendingLabels},
};
use super::Snapshot;
use crate::{
    defaults::NETNS_RECHECK,
    discovery::{NetnsLookup, NetnsQuery},
    error::error_chain,
    time::sleep_until,
};

/// How often the cgroups of pods waiting for their namespace are checked for a first process
/// ([`NetnsLookup::populated`]): a fifth of the 100 ms a new pod may wait to be served.
const ARRIVAL_POLL: Duration = Duration::from_millis(20);

/// What the source watches.
#[derive(Clone, Debug)]
pub struct Settings {
    /// This node's name, as in the pods' `spec.nodeName`.
    pub node_name: String,
    pub mesh: MeshSelector,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error(
        "cannot find the Kubernetes API server (in a pod: its service account; elsewhere: \
         KUBECONFIG or ~/.kube/config): {}", error_chain(.0)
    )]
    Config(#[from] InferConfigError),
    #[error("cannot set up the Kubernetes client: {}", error_chain(.0))]
    Client(#[from] kube::Error),
}

/// A client for the API server named by the kubeconfig (`KUBECONFIG`, else `~/.kube/config`) or,
/// when there is none, by the pod's service account (in-cluster).
pub async fn client() -> Result<Client, SourceError> {
    let config = Config::infer().await?;
    log::info!("Kubernetes API server: {}", config.cluster_url);
    Ok(Client::try_from(config)?)
}

/// Starts watching this node's pods on a task of its own, which ends when the receiver is dropped.
///
/// The receiver holds an empty snapshot until the first complete list of the node's pods has been
/// read, and its `changed()` fires when that list is in: wait for it before acting on the set, or
/// pods served by an earlier agent would look gone. From then on it always holds the current set.
pub fn watch(
    client: Client,
    settings: Settings,
    lookup: Arc<dyn NetnsLookup>,
    metrics: KubeMetrics,
) -> watch::Receiver<Arc<Snapshot>> {
    // Lists are consistent reads (no resourceVersion; kube's paginated lists never send one),
    // not answers from an API server's watch cache: a relist replaces the pod set whole, and one
    // from a server lagging behind could lack pods the agent serves, whose removal would let their
    // traffic skip the sidecar. It costs a read of etcd per agent start and per expired watch, for
    // the pods of one node. `tests/kube_source.rs` checks what goes on the wire.
    let config =
        watcher::Config::default().fields(&format!("spec.nodeName={}", settings.node_name));
    let events = watcher::watcher(Api::<K8sPod>::all(client), config).default_backoff();
    let pods = NodePods::new(settings.node_name, settings.mesh, metrics.clone());
    let (publish, receiver) = watch::channel(Arc::new(Snapshot::default()));
    tokio::spawn(follow(events, pods, lookup, metrics, publish));
    receiver
}

/// Applies the watch's events to `pods` and publishes the served and pending pods after each, once
/// the first list is complete.
async fn follow<S>(
    events: S,
    mut pods: NodePods,
    lookup: Arc<dyn NetnsLookup>,
    metrics: KubeMetrics,
    publish: watch::Sender<Arc<Snapshot>>,
) where
    S: Stream<Item = Result<Event<K8sPod>, watcher::Error>>,
{
    let mut events = pin!(events);
    let mut errors = ErrorStreak::default();
    let mut listed = false;
    let mut published = false;
    let mut revalidate = tokio::time::interval(NETNS_RECHECK);
    revalidate.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut arrivals = tokio::time::interval(ARRIVAL_POLL);
    arrivals.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        let retry_at = pods.next_lookup();
        let awaited = listed && pods.awaits_netns();
        tokio::select! {
            () = publish.closed() => return,
            event = events.next() => match event {
                Some(Ok(event)) => {
                    errors.ended();
                    if matches!(event, Event::InitDone) {
                        metrics.relists.inc();
                        listed = true;
                    }
                    pods.handle(event, Instant::now());
                }
                Some(Err(error)) => {
                    errors.failed(&error, &metrics);
                    continue;
                }
                // The watcher retries for ever; its stream does not end.
                None => return,
            },
            () = sleep_until(retry_at) => {}
            _ = revalidate.tick() => pods.revalidate(Instant::now()),
            _ = arrivals.tick(), if awaited => check_arrivals(&mut pods, &lookup).await,
        }
        if !listed {
            continue;
        }
        resolve_due(&mut pods, &lookup).await;
        let (no_ip, no_netns) = pods.pending();
        metrics.set_pending(no_ip, no_netns);
        let set = Snapshot {
            pods: pods.pod_set(),
            pending: pods.pending_pods(),
        };
        if !published {
            log::info!(
                "listed this node's pods: {} meshed pods served, {no_ip} waiting for an IP, \
                 {no_netns} for their network namespace",
                set.pods.len()
            );
            publish.send_replace(Arc::new(set));
            published = true;
        } else {
            publish.send_if_modified(|current| {
                let changed = **current != set;
                if changed {
                    *current = Arc::new(set);
                }
                changed
            });
        }
    }
}

/// Looks up the namespaces of the pods that wait for one, all in one call.
async fn resolve_due(pods: &mut NodePods, lookup: &Arc<dyn NetnsLookup>) {
    let due = pods.due_lookups(Instant::now());
    if due.is_empty() {
        return;
    }
    let queries: Vec<NetnsQuery> = due.iter().map(|(_, query)| query.clone()).collect();
    let lookup = Arc::clone(lookup);
    let answers = tokio::task::spawn_blocking(move || lookup.lookup(&queries))
        .await
        .unwrap_or_else(|error| {
            log::error!("the network namespace lookup failed: {error}");
            Vec::new()
        });
    let mut answers = answers.into_iter();
    let now = Instant::now();
    for (key, query) in due {
        let answer = answers
            .next()
            .unwrap_or_else(|| Err("the lookup gave no answer".to_owned()));
        pods.looked_up(&key, &query, answer, now);
    }
}

/// Makes the lookup of every pod whose first process just appeared due now.
async fn check_arrivals(pods: &mut NodePods, lookup: &Arc<dyn NetnsLookup>) {
    let waiting = pods.awaiting_netns();
    let queries: Vec<NetnsQuery> = waiting.iter().map(|(_, query)| query.clone()).collect();
    let lookup = Arc::clone(lookup);
    let answers = tokio::task::spawn_blocking(move || lookup.populated(&queries))
        .await
        .unwrap_or_default();
    let now = Instant::now();
    for ((key, query), populated) in waiting.iter().zip(answers) {
        pods.populated(key, query, populated, now);
    }
}

/// Logs a run of API errors once, not on every retry.
#[derive(Default)]
struct ErrorStreak {
    errors: u64,
    last: Option<String>,
}

impl ErrorStreak {
    fn failed(&mut self, error: &watcher::Error, metrics: &KubeMetrics) {
        if let watcher::Error::WatchError(status) = error
            && status.code == 410
        {
            log::info!(
                "the watch on this node's pods expired (410 Gone: {}); listing them again",
                status.message
            );
            return;
        }
        metrics.watch_errors.inc();
        self.errors += 1;
        let text = error_chain(error);
        if self.last.as_ref() == Some(&text) {
            log::debug!("watching this node's pods: {text} (again)");
        } else {
            log::warn!(
                "watching this node's pods: {text}; retrying with backoff, the pods known so far \
                 are still served"
            );
            self.last = Some(text);
        }
    }

    fn ended(&mut self) {
        if self.errors > 0 {
            log::info!(
                "watching this node's pods again, after {} failed attempts",
                self.errors
            );
            *self = Self::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use futures::channel::mpsc;
    use kube::core::Status;

    use super::*;
    use crate::pod::NetnsRef;

    const POD: &str = include_str!("../../../tests/support/kube_pod.json");

    fn pod(name: &str) -> K8sPod {
        let mut value: serde_json::Value = serde_json::from_str(POD).expect("fixture");
        value["metadata"]["name"] = name.into();
        value["metadata"]["uid"] = format!("uid-{name}").into();
        serde_json::from_value(value).expect("a valid Pod")
    }

    /// Every pod's namespace is a name under /run/netns made of its UID.
    struct ByUid;

    impl NetnsLookup for ByUid {
        fn lookup(&self, pods: &[NetnsQuery]) -> Vec<Result<NetnsRef, String>> {
            pods.iter()
                .map(|pod| Ok(NetnsRef::Named(pod.uid.clone())))
                .collect()
        }
    }

    fn names(pods: &watch::Receiver<Arc<Snapshot>>) -> Vec<String> {
        pods.borrow()
            .pods
            .keys()
            .map(|key| key.name.clone())
            .collect()
    }

    /// Waits for the next publication, or fails after a while.
    async fn next(pods: &mut watch::Receiver<Arc<Snapshot>>) -> Vec<String> {
        tokio::time::timeout(Duration::from_secs(5), pods.changed())
            .await
            .expect("a publication")
            .expect("the source runs");
        names(pods)
    }

    /// True when nothing is published for a while.
    async fn quiet(pods: &mut watch::Receiver<Arc<Snapshot>>) -> bool {
        tokio::time::timeout(Duration::from_millis(200), pods.changed())
            .await
            .is_err()
    }

    #[test]
    fn api_errors_are_described_once_with_their_causes() {
        let refused = Status::failure("pods is forbidden", "Forbidden").with_code(403);
        let error = watcher::Error::InitialListFailed(kube::Error::Api(refused.boxed()));
        let text = error_chain(&error);
        assert!(
            text.starts_with(
                "failed to perform initial object list: ApiError: pods is forbidden: Forbidden"
            ),
            "{text}"
        );
        assert_eq!(
            text.matches("pods is forbidden").count(),
            2,
            "once, and once in its Debug form: {text}"
        );
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "Connection refused");
        let error = watcher::Error::WatchFailed(kube::Error::ReadEvents(io));
        assert_eq!(
            error_chain(&error),
            "watch stream failed: Error reading events stream: Connection refused"
        );
    }

    #[tokio::test]
    async fn the_first_list_is_published_whole_and_errors_leave_the_set_as_it_was() {
        let (events, stream) = mpsc::unbounded();
        let metrics = KubeMetrics::default();
        let node_pods = NodePods::new("worker-1".into(), MeshSelector::default(), metrics.clone());
        let (publish, mut pods) = watch::channel(Arc::new(Snapshot::default()));
        let source = tokio::spawn(follow(
            stream,
            node_pods,
            Arc::new(ByUid),
            metrics.clone(),
            publish,
        ));
        let send = |event| events.unbounded_send(event).expect("source running");

        send(Err(watcher::Error::NoResourceVersion));
        send(Err(watcher::Error::NoResourceVersion));
        send(Ok(Event::Init));
        send(Ok(Event::InitApply(pod("a"))));
        assert!(
            quiet(&mut pods).await,
            "nothing before the list is complete"
        );
        send(Ok(Event::InitDone));
        assert_eq!(next(&mut pods).await, ["a"]);
        assert_eq!(metrics.watch_errors.get(), 2);

        let gone = Status::failure("too old resource version", "Expired").with_code(410);
        send(Err(watcher::Error::WatchError(gone.boxed())));
        send(Ok(Event::Init));
        send(Ok(Event::InitApply(pod("b"))));
        assert!(quiet(&mut pods).await, "the old set stays during a relist");
        assert_eq!(names(&pods), ["a"]);
        send(Ok(Event::InitDone));
        assert_eq!(next(&mut pods).await, ["b"]);
        assert_eq!(metrics.relists.get(), 2);
        assert_eq!(
            metrics.watch_errors.get(),
            2,
            "a 410 is a relist, not an error"
        );

        send(Ok(Event::Apply(pod("c"))));
        assert_eq!(next(&mut pods).await, ["b", "c"]);
        drop(pods);
        tokio::time::timeout(Duration::from_secs(5), source)
            .await
            .expect("the source stops when nobody listens")
            .expect("no panic");
    }
}
