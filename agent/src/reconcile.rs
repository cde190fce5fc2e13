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

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::IpAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use probe_bypass_rewrite::ProbeKind;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::{
    datapath::{Datapath, DatapathError, PodRules, listeners},
    healthcheck::{self, Context, Endpoint},
    netns::{Netns, NetnsError, NetnsId, netns_cookie},
    pod::{Pod, PodKey},
    run::sleep_until,
    source::{Pending, PodSet, Snapshot},
};

/// The datapath, shared with the admin endpoint that reads its counters. Every operation on it is
/// a few map syscalls, so a plain mutex is enough.
pub type SharedDatapath = Arc<Mutex<Datapath>>;

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

    /// Takes a pod out of the datapath, logging a failure (the pod is gone either way).
    fn forget_in_datapath(&self, key: &PodKey, ip: IpAddr) {
        if let Err(error) = self.with_datapath(|datapath| datapath.remove_pod(ip)) {
            log::error!("pod {key}: cannot remove it from the datapath: {error}");
        }
    }

    /// Sorts the pods an earlier agent left in the datapath: those the source serves are rewritten
    /// by [`Self::apply`], those it knows but cannot serve yet are carried, the rest are gone.
    fn adopt_left(&mut self, snapshot: &Snapshot) {
        let left = match self.with_datapath(|datapath| Ok(datapath.pods())) {
            Ok(Some(left)) => left,
            Ok(None) => return,
            Err(error) => {
                log::error!("cannot list the datapath's pods: {error}");
                return;
            }
        };
        let served: BTreeSet<IpAddr> = snapshot.pods.values().map(|pod| pod.ip).collect();
        self.carried = left.difference(&served).copied().collect();
        if !self.carried.is_empty() {
            log::info!(
                "{} pods left in the datapath by an earlier agent are not served yet",
                self.carried.len()
            );
        }
        self.forget_carried(snapshot);
    }

    /// Removes the carried pods that the source no longer knows, and stops carrying the served
    /// ones.
    fn forget_carried(&mut self, snapshot: &Snapshot) {
        let served: BTreeSet<IpAddr> = snapshot.pods.values().map(|pod| pod.ip).collect();
        let pending: BTreeSet<IpAddr> = snapshot.pending.values().map(|pod| pod.ip).collect();
        let gone: Vec<IpAddr> = self
            .carried
            .iter()
            .filter(|ip| !pending.contains(ip))
            .copied()
            .collect();
        for ip in gone {
            self.carried.remove(&ip);
            if served.contains(&ip) {
                continue;
            }
            log::info!("pod {ip} left in the datapath by an earlier agent is gone: removing it");
            if let Err(error) = self.with_datapath(|datapath| datapath.remove_pod(ip)) {
                log::error!("cannot remove pod {ip} from the datapath: {error}");
            }
        }
    }

    /// Follows `pods` until `stop` fires, then closes every listener.
    pub async fn run(mut self, mut pods: watch::Receiver<Arc<Snapshot>>, stop: CancellationToken) {
        let mut revalidate = tokio::time::interval(REVALIDATE);
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

    async fn apply(&mut self, snapshot: &Snapshot) {
        self.pending.clone_from(&snapshot.pending);
        let now = Instant::now();
        self.pending_since
            .retain(|key, _| snapshot.pending.contains_key(key));
        for key in snapshot.pending.keys() {
            self.pending_since.entry(key.clone()).or_insert(now);
        }
        let pods: &PodSet = &snapshot.pods;
        let gone: Vec<PodKey> = self
            .entries
            .keys()
            .filter(|key| !pods.contains_key(*key))
            .cloned()
            .collect();
        for key in gone {
            if let Some(entry) = self.entries.remove(&key) {
                self.forget_in_datapath(&key, entry.pod.borrow().ip);
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
                self.report_annotation_errors(pod);
                let (sender, _) = watch::channel(Arc::clone(pod));
                let state = self.start(pod, &sender, 0, None, None).await;
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
            if current.annotation_errors != pod.annotation_errors
                || current.originals_error != pod.originals_error
            {
                self.report_annotation_errors(pod);
            }
            entry.pod.send_replace(Arc::clone(pod));
            if current.ip != pod.ip {
                self.forget_in_datapath(key, current.ip);
            }
            if moved || matches!(entry.state, State::Failing { .. }) {
                self.restart(key, 0).await;
            } else if let State::Listening { cookie, .. } = entry.state
                && let Err(error) =
                    self.with_datapath(|datapath| datapath.upsert_pod(&pod_rules(pod, cookie)))
            {
                log::error!("pod {key}: cannot update it in the datapath: {error}; retrying");
                self.restart(key, 0).await;
            }
        }
    }

    /// Opens `pod`'s listener and returns the resulting state. A failure is logged when it first
    /// happens or changes, not on every retry; `failing_since` is when the failures began, if this
    /// is a retry.
    async fn start(
        &self,
        pod: &Pod,
        sender: &watch::Sender<Arc<Pod>>,
        attempts: u32,
        previous_error: Option<&str>,
        failing_since: Option<Instant>,
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
                let now = Instant::now();
                State::Failing {
                    error,
                    attempts: attempts + 1,
                    retry_at: now + backoff,
                    since: failing_since.unwrap_or(now),
                }
            }
        }
    }

    /// Logs and counts a pod's malformed annotations; each only loses its own setting. An
    /// unreadable original-probes record leaves the pod's rewritten httpGet probes without an
    /// original to run: they are answered 404, saying why.
    fn report_annotation_errors(&self, pod: &Pod) {
        for error in &pod.annotation_errors {
            log::warn!("pod {}: ignoring an annotation: {error}", pod.key);
        }
        self.ctx
            .metrics
            .annotation_errors(&pod.key, &pod.annotation_errors);
        if let Some(error) = &pod.originals_error {
            log::warn!(
                "pod {}: ignoring an annotation: {error}; its rewritten httpGet probes cannot be \
                 answered",
                pod.key
            );
            self.ctx.metrics.original_probes_error(&pod.key);
        }
    }

    /// Puts `pod` in the datapath and opens its listener, in that order: the pod's redirects do not
    /// wait for the listener.
    async fn open(&self, pod: &Pod, sender: &watch::Sender<Arc<Pod>>) -> Result<State, ServeError> {
        let netns = Arc::new(Netns::open(&pod.netns.path())?);
        if let Some(expected) = pod.netns.expected()
            && netns.id() != expected
        {
            return Err(ServeError::Replaced {
                netns: pod.netns.to_string(),
            });
        }
        let cookie = if self.datapath.is_some() {
            let cookie = self.ctx.worker.run(&netns, netns_cookie).await?;
            self.with_datapath(|datapath| datapath.upsert_pod(&pod_rules(pod, cookie)))?;
            self.guard_inbound(pod, &netns, cookie).await?;
            cookie
        } else {
            0
        };
        let listener =
            healthcheck::bind(&self.ctx.worker, &netns, pod.ip, self.ctx.settings.port).await?;
        let stop = CancellationToken::new();
        tokio::spawn(healthcheck::serve(
            listener,
            Endpoint::Healthcheck,
            Arc::clone(&self.ctx),
            sender.subscribe(),
            Arc::clone(&netns),
            stop.clone(),
        ));
        let kinds: &[ProbeKind] = if self.ctx.settings.serve_http_probes {
            &ProbeKind::ALL
        } else {
            &[]
        };
        let missing = self
            .open_probe_ports(pod, &netns, sender, &stop, kinds, &BTreeMap::new())
            .await;
        Ok(State::Listening {
            netns,
            cookie,
            stop,
            missing,
        })
    }

    /// Opens the listeners of the probe ports of `kinds` (`--serve-http-probes`), closed with the
    /// others by `stop`, and returns those that could not be bound, with why. A port another
    /// process in the pod holds is that pod's problem only: it is logged with what to do (when its
    /// error differs from `before`'s), counted in `probe_bypass_listener_errors_total`, and the
    /// pod is served on the healthcheck port meanwhile.
    async fn open_probe_ports(
        &self,
        pod: &Pod,
        netns: &Arc<Netns>,
        sender: &watch::Sender<Arc<Pod>>,
        stop: &CancellationToken,
        kinds: &[ProbeKind],
        before: &BTreeMap<ProbeKind, String>,
    ) -> BTreeMap<ProbeKind, String> {
        let mut missing = BTreeMap::new();
        for &kind in kinds {
            let port = kind.port();
            match healthcheck::bind(&self.ctx.worker, netns, pod.ip, port).await {
                Ok(listener) => {
                    if before.contains_key(&kind) {
                        log::info!("pod {}: now answers {kind} probes on port {port}", pod.key);
                    }
                    tokio::spawn(healthcheck::serve(
                        listener,
                        Endpoint::Probes(kind),
                        Arc::clone(&self.ctx),
                        sender.subscribe(),
                        Arc::clone(netns),
                        stop.clone(),
                    ));
                }
                Err(error) => {
                    self.ctx.metrics.listener_error(&pod.key);
                    let taken = matches!(&error, NetnsError::Op { source, .. }
                        if source.kind() == std::io::ErrorKind::AddrInUse);
                    let error = error.to_string();
                    if before.get(&kind) == Some(&error) {
                        log::debug!("pod {}: port {port} still unavailable: {error}", pod.key);
                    } else if taken {
                        log::error!(
                            "pod {}: cannot answer its {kind} probes on port {port}: {error}. \
                             Something in the pod holds the port, usually the mesh's proxy, which \
                             then answers those probes; turn off the proxy's probe listeners, or \
                             run without --serve-http-probes. The pod is served on port {} \
                             meanwhile, and the port is retried",
                            pod.key,
                            self.ctx.settings.port
                        );
                    } else {
                        log::error!(
                            "pod {}: cannot answer its {kind} probes on port {port}: {error}; \
                             retrying",
                            pod.key
                        );
                    }
                    missing.insert(kind, error);
                }
            }
        }
        missing
    }

    /// Has the datapath hand the connections that arrive at the pod from other nodes to its proxy
    /// (issue 5): makes sure it knows the proxy's inbound listener, then attaches sk_lookup to the
    /// pod's namespace. In that order, so that a proxy already listening never sees a connection
    /// refused for want of a listener the datapath had not found yet.
    ///
    /// A listener that cannot be found is not the pod's failure: connections from other nodes are
    /// refused, as behind the mesh's rules when the proxy does not listen, until the proxy listens
    /// again (sockops then files it). It is logged with the reason.
    async fn guard_inbound(
        &self,
        pod: &Pod,
        netns: &Arc<Netns>,
        cookie: u64,
    ) -> Result<(), ServeError> {
        let Some((known, port, proc_root)) = self.with_datapath(|datapath| {
            let settings = datapath.settings();
            Ok((
                datapath.has_listener(cookie)?,
                settings.inbound_port,
                settings.proc_root.clone(),
            ))
        })?
        else {
            return Ok(());
        };
        if !known {
            match listeners::find(&self.ctx.worker, netns, port, &proc_root).await {
                Ok(found) => {
                    for listener in &found {
                        self.with_datapath(|datapath| datapath.add_listener(cookie, listener))?;
                    }
                    if !found.is_empty() {
                        log::info!(
                            "pod {}: took over its proxy's inbound listener on port {port}",
                            pod.key
                        );
                    }
                }
                Err(error) => log::warn!(
                    "pod {}: cannot find its proxy's inbound listener on port {port}: {error}; \
                     connections from other nodes are refused until the proxy listens anew",
                    pod.key
                ),
            }
        }
        self.with_datapath(|datapath| datapath.attach_netns(cookie, netns.file()))?;
        Ok(())
    }

    /// Replaces the listener of `key`: the new one is bound before the old one closes (SO_REUSEPORT),
    /// so a pod that moved keeps answering throughout.
    async fn restart(&mut self, key: &PodKey, attempts: u32) {
        let Some(entry) = self.entries.get(key) else {
            return;
        };
        let pod = Arc::clone(&entry.pod.borrow());
        let (previous_error, failing_since) = match &entry.state {
            State::Failing { error, since, .. } => (Some(error.as_str()), Some(*since)),
            State::Listening { .. } => (None, None),
        };
        let state = self
            .start(&pod, &entry.pod, attempts, previous_error, failing_since)
            .await;
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
    /// namespace, and tries again the probe ports that were taken.
    async fn revalidate(&mut self) {
        self.retry_probe_ports().await;
        let stale: Vec<PodKey> = self
            .entries
            .iter()
            .filter(|(_, entry)| match &entry.state {
                State::Listening { netns, .. } => {
                    let path = entry.pod.borrow().netns.path();
                    NetnsId::of(&path).ok() != Some(netns.id())
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

    /// Binds again the probe ports served pods could not bind.
    async fn retry_probe_ports(&mut self) {
        let due: Vec<PodKey> = self
            .entries
            .iter()
            .filter(|(_, entry)| {
                matches!(&entry.state, State::Listening { missing, .. } if !missing.is_empty())
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in due {
            let Some(entry) = self.entries.get(&key) else {
                continue;
            };
            let State::Listening {
                missing,
                netns,
                stop,
                ..
            } = &entry.state
            else {
                continue;
            };
            let pod = Arc::clone(&entry.pod.borrow());
            let kinds: Vec<ProbeKind> = missing.keys().copied().collect();
            let still = self
                .open_probe_ports(&pod, netns, &entry.pod, stop, &kinds, missing)
                .await;
            if let Some(Entry {
                state: State::Listening { missing, .. },
                ..
            }) = self.entries.get_mut(&key)
            {
                *missing = still;
            }
        }
    }

    /// Has the datapath count the probes that reach a pod before it is served (issue 4), and
    /// reports them once it is: a pending pod, or one whose listener has not opened, has no
    /// listener on its probe port, and the kubelet's probe to it is refused. The counts go to
    /// `probe_bypass_probes_before_served_total`, the pod's and only above 0. Without the eBPF
    /// datapath (`--datapath none`) nothing counts them.
    ///
    /// Runs after every change of the pods' states; the datapath's side is a diff, so a call that
    /// changes nothing makes no syscall.
    fn count_early_probes(&self) {
        if self.datapath.is_none() {
            return;
        }
        let mut served: BTreeMap<IpAddr, &PodKey> = BTreeMap::new();
        let mut waiting: BTreeSet<IpAddr> = self.pending.values().map(|pod| pod.ip).collect();
        for (key, entry) in &self.entries {
            let ip = entry.pod.borrow().ip;
            match entry.state {
                State::Listening { .. } => {
                    served.insert(ip, key);
                }
                State::Failing { .. } => {
                    waiting.insert(ip);
                }
            }
        }
        waiting.retain(|ip| !served.contains_key(ip));
        let now_served: Vec<(IpAddr, &PodKey)> = match self
            .with_datapath(|datapath| Ok(datapath.pending_addrs()))
        {
            Ok(counted) => counted
                .into_iter()
                .flatten()
                .filter_map(|ip| served.get(&ip).map(|&key| (ip, key)))
                .collect(),
            Err(error) => {
                log::error!("cannot count the probes that arrive before pods are served: {error}");
                return;
            }
        };
        for (ip, key) in now_served {
            match self.with_datapath(|datapath| datapath.take_early_probes(ip)) {
                Ok(Some(probes)) if probes > 0 => {
                    log::info!("pod {key}: {probes} probes arrived before it was served");
                    self.ctx.metrics.probes_before_served(key, probes);
                }
                Ok(_) => {}
                Err(error) => log::error!(
                    "pod {key}: cannot read the probes that arrived before it was served: {error}"
                ),
            }
        }
        if let Err(error) = self.with_datapath(|datapath| datapath.set_pending_addrs(&waiting)) {
            log::error!("cannot count the probes that arrive before pods are served: {error}");
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
                State::Failing { error, since, .. } => {
                    let failing = Failing {
                        reason: error.clone(),
                        since: *since,
                    };
                    status.failing.insert(key.clone(), failing);
                }
            }
        }
        for (key, pending) in &self.pending {
            let since = self
                .pending_since
                .get(key)
                .copied()
                .unwrap_or_else(Instant::now);
            let failing = Failing {
                reason: pending.reason.clone(),
                since,
            };
            status.failing.insert(key.clone(), failing);
        }
        self.ctx.metrics.set_pods(self.entries.len(), status.served);
        self.status.send_replace(status);
    }
}

/// What the datapath needs of a pod.
fn pod_rules(pod: &Pod, netns_cookie: u64) -> PodRules {
    PodRules {
        addrs: std::iter::once(pod.ip)
            .chain(pod.other_ips.iter().copied())
            .collect(),
        netns_cookie,
        exclusions: pod.exclusions.clone(),
    }
}

fn backoff(attempts: u32) -> Duration {
    FIRST_BACKOFF
        .saturating_mul(2u32.saturating_pow(attempts))
        .min(MAX_BACKOFF)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dual_stack_pod_is_in_the_datapath_by_both_its_addresses() {
        let pod = Pod {
            ip: "10.244.1.7".parse().expect("ip"),
            other_ips: vec!["fd00:10:244:1::7".parse().expect("ip")],
            ..Pod::for_tests()
        };
        let rules = pod_rules(&pod, 42);
        let addrs: Vec<String> = rules.addrs.iter().map(ToString::to_string).collect();
        assert_eq!(
            addrs,
            ["10.244.1.7", "fd00:10:244:1::7"],
            "the primary first"
        );
        assert_eq!(rules.netns_cookie, 42);
    }

    #[test]
    fn backoff_doubles_from_100ms_up_to_5s() {
        assert_eq!(backoff(0), Duration::from_millis(100));
        assert_eq!(backoff(1), Duration::from_millis(200));
        assert_eq!(backoff(5), Duration::from_millis(3200));
        assert_eq!(backoff(6), MAX_BACKOFF);
        assert_eq!(backoff(40), MAX_BACKOFF);
    }
}
