//! The node's pods as the watch reports them, and which of them are served.
//!
//! Every pod on the node has an entry, meshed or not, so that what is logged about a pod is logged
//! when its state changes, not on every event. A meshed pod keeps only the fields
//! [`Pod::from_k8s`] reads; the rest of the object (managed fields, environment, volumes, status
//! conditions) is dropped as it arrives, so a node's pods take little memory.
//!
//! A meshed pod is published once it has an IP and its network namespace is known. The namespace
//! is looked up by UID and IP, again whenever the IP changes or the namespace file disappears;
//! failures are retried with backoff, one pod at a time, and at once when the pod's cgroup gets its
//! first process (the source polls for it), then on a short backoff while its namespace is set up.

mod fields;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
    time::Duration,
};

use k8s_openapi::api::core::v1::Pod as K8sPod;
use kube::runtime::watcher::Event;
use tokio::time::Instant;

use self::fields::{identity, pod_ip, trim};
use super::{KubeMetrics, mesh::MeshSelector};
use crate::{
    discovery::NetnsQuery,
    pod::{self, NetnsRef, Pod, PodKey},
    source::{Pending, PodSet},
    time::Backoff,
};

/// Retries of a namespace lookup that failed: 200 ms, doubling, at most 10 s.
/// The CNI plugin sets the pod's IP up inside its namespace before the kubelet reports the IP, so
/// a lookup usually succeeds at once; when it does not, the pod is probably just being set up.
const RETRY: Backoff = Backoff::new(FIRST_RETRY, MAX_RETRY);
const FIRST_RETRY: Duration = Duration::from_millis(200);
const MAX_RETRY: Duration = Duration::from_secs(10);

/// First retry of a lookup that failed after the pod's cgroup got its first process: the runtime
/// moves the process into the pod's namespace, and the CNI plugin sets the IP up, moments later.
const RETRY_POPULATED: Backoff = Backoff::new(Duration::from_millis(20), MAX_RETRY);

/// Phases after which no container runs again, so no probe comes.
const FINISHED_PHASES: [&str; 2] = ["Succeeded", "Failed"];

/// The node's pods, from the watch's events.
pub struct NodePods {
    node: String,
    mesh: MeshSelector,
    metrics: KubeMetrics,
    /// The annotations a served pod keeps: those [`Pod::from_k8s`] reads.
    kept_annotations: BTreeSet<String>,
    pods: BTreeMap<PodKey, Entry>,
    /// The pods of a relist in progress, applied all at once when it completes.
    relist: Option<Vec<Observed>>,
}

struct Entry {
    uid: String,
    state: State,
}

enum State {
    Ignored(Ignored),
    Meshed(Box<Meshed>),
}

/// Why a pod on the node is not served.
#[derive(Debug, PartialEq, Eq)]
enum Ignored {
    NotMeshed,
    HostNetwork { marker: String },
    Finished { phase: String },
    OtherNode { node: String },
}

struct Meshed {
    /// The fields [`Pod::from_k8s`] reads, nothing else.
    pod: K8sPod,
    ip: PodIp,
    netns: Netns,
    /// What is published: set once the IP and the namespace are known.
    served: Option<Arc<Pod>>,
    /// The problem last logged for this pod, so that it is logged once.
    problem: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PodIp {
    Missing,
    Invalid(String),
    Known(IpAddr),
}

enum Netns {
    Unknown {
        attempts: u32,
        retry_at: Instant,
        error: Option<String>,
        /// The pod's cgroup held a process when last checked.
        populated: bool,
    },
    Known(NetnsRef),
    /// The pod is terminating and its namespace is gone with its sandbox: nothing to serve, and
    /// nothing to look for until its delete event.
    Ended,
}

impl Netns {
    fn unknown(now: Instant) -> Self {
        Self::Unknown {
            attempts: 0,
            retry_at: now,
            error: None,
            populated: false,
        }
    }
}

/// One pod of an event, classified.
struct Observed {
    key: PodKey,
    uid: String,
    verdict: Verdict,
}

enum Verdict {
    Ignored(Ignored),
    Meshed { pod: Box<K8sPod>, marker: String },
}

impl NodePods {
    pub fn new(node: String, mesh: MeshSelector, metrics: KubeMetrics) -> Self {
        Self {
            node,
            mesh,
            metrics,
            kept_annotations: pod::read_annotations().collect(),
            pods: BTreeMap::new(),
            relist: None,
        }
    }

    /// Applies one event of the watch. A relist (`Init`, `InitApply`…, `InitDone`) takes effect
    /// whole at `InitDone`: until then the pods known before stay as they were.
    pub fn handle(&mut self, event: Event<K8sPod>, now: Instant) {
        match event {
            Event::Apply(pod) => {
                if let Some(observed) = self.observe(pod) {
                    self.apply(observed, now);
                }
            }
            Event::Delete(pod) => {
                if let Some((key, uid)) = identity(&pod) {
                    self.delete(&key, &uid);
                }
            }
            Event::Init => self.relist = Some(Vec::new()),
            Event::InitApply(pod) => {
                if let Some(observed) = self.observe(pod) {
                    match &mut self.relist {
                        Some(listed) => listed.push(observed),
                        None => self.apply(observed, now),
                    }
                }
            }
            Event::InitDone => {
                let listed = self.relist.take().unwrap_or_default();
                self.replace_all(listed, now);
            }
        }
    }

    /// The pods to publish: meshed, with an IP and a known network namespace.
    pub fn pod_set(&self) -> PodSet {
        self.meshed()
            .filter_map(|(key, meshed)| Some((key.clone(), Arc::clone(meshed.served.as_ref()?))))
            .collect()
    }

    /// Meshed pods not served yet: (waiting for an IP, waiting for their network namespace).
    pub fn pending(&self) -> (usize, usize) {
        let mut no_ip = 0;
        let mut no_netns = 0;
        for (_, meshed) in self.meshed() {
            match (&meshed.ip, &meshed.netns, &meshed.served) {
                (PodIp::Missing, _, _) => no_ip += 1,
                (PodIp::Known(_), Netns::Unknown { .. }, None) => no_netns += 1,
                _ => {}
            }
        }
        (no_ip, no_netns)
    }

    /// Meshed pods with an IP that are not served, and why.
    pub fn pending_pods(&self) -> BTreeMap<PodKey, Pending> {
        self.meshed()
            .filter_map(|(key, meshed)| {
                let PodIp::Known(ip) = meshed.ip else {
                    return None;
                };
                if meshed.served.is_some() || matches!(meshed.netns, Netns::Ended) {
                    return None;
                }
                let reason = match (&meshed.netns, &meshed.problem) {
                    (_, Some(problem)) => problem.clone(),
                    (
                        Netns::Unknown {
                            error: Some(error), ..
                        },
                        None,
                    ) => {
                        format!("network namespace not found: {error}")
                    }
                    _ => "network namespace not looked up yet".to_owned(),
                };
                Some((key.clone(), Pending { ip, reason }))
            })
            .collect()
    }

    /// Whether a pod with an IP waits for its network namespace.
    pub fn awaits_netns(&self) -> bool {
        self.meshed().any(|(_, meshed)| meshed.awaits_netns())
    }

    /// The pods with an IP that wait for their network namespace, to check for a first process.
    pub fn awaiting_netns(&self) -> Vec<(PodKey, NetnsQuery)> {
        self.pods
            .iter()
            .filter_map(|(key, entry)| {
                let State::Meshed(meshed) = &entry.state else {
                    return None;
                };
                let PodIp::Known(ip) = meshed.ip else {
                    return None;
                };
                meshed.awaits_netns().then(|| {
                    let query = NetnsQuery {
                        uid: entry.uid.clone(),
                        ip,
                    };
                    (key.clone(), query)
                })
            })
            .collect()
    }

    /// Takes whether the cgroup of the pod of `query` holds a process: when it just got its first,
    /// the lookup is due now, and retried on a short backoff.
    pub fn populated(
        &mut self,
        key: &PodKey,
        query: &NetnsQuery,
        now_populated: bool,
        now: Instant,
    ) {
        let Some(meshed) = queried(&mut self.pods, key, query) else {
            return;
        };
        if let Netns::Unknown {
            attempts,
            retry_at,
            populated,
            ..
        } = &mut meshed.netns
        {
            if now_populated && !*populated {
                log::debug!("pod {key}: its cgroup has a process; looking up its namespace");
                *attempts = 0;
                *retry_at = now;
            }
            *populated = now_populated;
        }
    }

    /// The pods whose network namespace is to be looked up now.
    pub fn due_lookups(&self, now: Instant) -> Vec<(PodKey, NetnsQuery)> {
        self.pods
            .iter()
            .filter_map(|(key, entry)| {
                let State::Meshed(meshed) = &entry.state else {
                    return None;
                };
                match (&meshed.ip, &meshed.netns) {
                    (PodIp::Known(ip), Netns::Unknown { retry_at, .. }) if *retry_at <= now => {
                        let query = NetnsQuery {
                            uid: entry.uid.clone(),
                            ip: *ip,
                        };
                        Some((key.clone(), query))
                    }
                    _ => None,
                }
            })
            .collect()
    }

    /// When the next lookup is due, if any pod waits for one.
    pub fn next_lookup(&self) -> Option<Instant> {
        self.meshed()
            .filter_map(|(_, meshed)| match (&meshed.ip, &meshed.netns) {
                (PodIp::Known(_), Netns::Unknown { retry_at, .. }) => Some(*retry_at),
                _ => None,
            })
            .min()
    }

    /// Takes the answer of a lookup of `query`, made for `key`. An answer for a pod that has
    /// changed since (deleted, replaced, a new IP) is dropped.
    pub fn looked_up(
        &mut self,
        key: &PodKey,
        query: &NetnsQuery,
        answer: Result<NetnsRef, String>,
        now: Instant,
    ) {
        let Some(meshed) = queried(&mut self.pods, key, query) else {
            return;
        };
        let Netns::Unknown {
            attempts,
            error,
            populated,
            ..
        } = &meshed.netns
        else {
            return;
        };
        let populated = *populated;
        match answer {
            Ok(netns) => {
                if *attempts > 0 {
                    log::info!(
                        "pod {key}: network namespace {netns} found after {attempts} failed lookups"
                    );
                } else {
                    log::debug!("pod {key}: network namespace {netns}");
                }
                meshed.netns = Netns::Known(netns);
                meshed.refresh(key, &self.metrics);
            }
            Err(reason) => {
                self.metrics.netns_lookup_failures.inc();
                let attempts = attempts.saturating_add(1);
                let backoff = if populated {
                    RETRY_POPULATED.delay(attempts - 1)
                } else {
                    RETRY.delay(attempts - 1)
                };
                if error.as_ref() == Some(&reason) || meshed.terminating() {
                    log::debug!(
                        "pod {key} ({}): network namespace still not found: {reason}; next try in {backoff:?}",
                        query.ip
                    );
                } else {
                    log::warn!(
                        "pod {key} ({}): network namespace not found: {reason}; retrying (other pods are not held up)",
                        query.ip
                    );
                }
                meshed.netns = Netns::Unknown {
                    attempts,
                    retry_at: now + backoff,
                    error: Some(reason),
                    populated,
                };
            }
        }
    }

    /// Looks the namespace up again for every pod whose namespace file is gone or names another
    /// namespace (the process that named it exited, and its pid may have been reused). The pod
    /// stays published with the old reference until the new one is found; the reconciler will not
    /// serve it through a path that names another namespace.
    pub fn revalidate(&mut self, now: Instant) {
        for (key, entry) in &mut self.pods {
            let State::Meshed(meshed) = &mut entry.state else {
                continue;
            };
            if let Netns::Known(netns) = &meshed.netns
                && !netns.is_current()
            {
                if meshed.terminating() {
                    // The kubelet stops a deleted pod's containers before the API server drops
                    // the object: an ordinary end, not a lost namespace.
                    log::info!(
                        "pod {key}: terminating, and {netns} is gone with its sandbox; no \
                         longer served"
                    );
                    meshed.netns = Netns::Ended;
                    meshed.served = None;
                    continue;
                }
                log::warn!(
                    "pod {key}: {netns} is gone or names another namespace (the process it was \
                     found through exited); looking again"
                );
                self.metrics.netns_lost.inc();
                meshed.netns = Netns::unknown(now);
            }
        }
    }

    fn meshed(&self) -> impl Iterator<Item = (&PodKey, &Meshed)> {
        self.pods
            .iter()
            .filter_map(|(key, entry)| match &entry.state {
                State::Meshed(meshed) => Some((key, &**meshed)),
                State::Ignored(_) => None,
            })
    }

    /// Classifies a pod of an event, keeping only what the agent uses of it.
    fn observe(&self, pod: K8sPod) -> Option<Observed> {
        let Some((key, uid)) = identity(&pod) else {
            log::warn!("a pod without metadata.name in the watch; ignored");
            return None;
        };
        let spec = pod.spec.as_ref();
        let node = spec.and_then(|s| s.node_name.as_deref()).unwrap_or("");
        let phase = pod
            .status
            .as_ref()
            .and_then(|s| s.phase.as_deref())
            .unwrap_or("");
        let verdict = if node != self.node {
            Verdict::Ignored(Ignored::OtherNode {
                node: node.to_owned(),
            })
        } else if FINISHED_PHASES.contains(&phase) {
            Verdict::Ignored(Ignored::Finished {
                phase: phase.to_owned(),
            })
        } else {
            match self.mesh.marker(&pod) {
                None => Verdict::Ignored(Ignored::NotMeshed),
                Some(marker) if spec.and_then(|s| s.host_network) == Some(true) => {
                    Verdict::Ignored(Ignored::HostNetwork { marker })
                }
                Some(marker) => Verdict::Meshed {
                    pod: Box::new(trim(pod, &self.kept_annotations)),
                    marker,
                },
            }
        };
        Some(Observed { key, uid, verdict })
    }

    fn apply(&mut self, observed: Observed, now: Instant) {
        let Observed { key, uid, verdict } = observed;
        let old = self.pods.remove(&key).filter(|entry| entry.uid == uid);
        let state = match (old.map(|entry| entry.state), verdict) {
            (Some(State::Meshed(mut meshed)), Verdict::Meshed { pod, .. }) => {
                meshed.update(&key, *pod, now, &self.metrics);
                State::Meshed(meshed)
            }
            (_, Verdict::Meshed { pod, marker }) => {
                log::debug!("pod {key} is meshed ({marker})");
                let mut meshed = Meshed {
                    ip: pod_ip(&pod),
                    pod: *pod,
                    netns: Netns::unknown(now),
                    served: None,
                    problem: None,
                };
                meshed.refresh(&key, &self.metrics);
                State::Meshed(Box::new(meshed))
            }
            (old, Verdict::Ignored(why)) => {
                self.log_ignored(&key, old.as_ref(), &why);
                State::Ignored(why)
            }
        };
        self.pods.insert(key, Entry { uid, state });
    }

    fn log_ignored(&self, key: &PodKey, old: Option<&State>, why: &Ignored) {
        let was_served = matches!(old, Some(State::Meshed(_)));
        if let Some(State::Ignored(old)) = old
            && old == why
        {
            return;
        }
        match why {
            Ignored::HostNetwork { marker } => log::info!(
                "pod {key} has the mesh's {marker} but uses the host's network: not served, as \
                 the agent never redirects or listens in the host's network namespace"
            ),
            Ignored::OtherNode { node } => log::warn!(
                "pod {key} is on node {node:?}, not {:?}: ignored",
                self.node
            ),
            Ignored::Finished { phase } if was_served => {
                log::info!("pod {key} has finished ({phase}): no longer served");
            }
            Ignored::NotMeshed if was_served => {
                log::info!("pod {key} is no longer marked as meshed: no longer served");
            }
            Ignored::Finished { .. } | Ignored::NotMeshed => {}
        }
    }

    /// Forgets a deleted pod; a delete of an earlier pod of the same name changes nothing.
    fn delete(&mut self, key: &PodKey, uid: &str) {
        if self.pods.get(key).is_some_and(|entry| entry.uid == uid) {
            self.pods.remove(key);
            log::debug!("pod {key} deleted");
        }
    }

    /// Makes the listed pods the node's pods: the ones missing from the list are gone.
    fn replace_all(&mut self, listed: Vec<Observed>, now: Instant) {
        let keys: BTreeSet<&PodKey> = listed.iter().map(|observed| &observed.key).collect();
        let gone: Vec<PodKey> = self
            .pods
            .keys()
            .filter(|key| !keys.contains(key))
            .cloned()
            .collect();
        for key in gone {
            if let Some(Entry {
                state: State::Meshed(_),
                ..
            }) = self.pods.remove(&key)
            {
                log::info!("pod {key} is gone (missing from a new list of the node's pods)");
            }
        }
        for observed in listed {
            self.apply(observed, now);
        }
    }
}

impl Meshed {
    /// Whether the pod is being deleted (it has a `deletionTimestamp`). It is served until its
    /// delete event, as long as its namespace lasts: the kubelet's readiness probes go on during
    /// the grace period.
    fn terminating(&self) -> bool {
        self.pod.metadata.deletion_timestamp.is_some()
    }

    /// Whether the pod's cgroup is worth polling: it has an IP, no namespace yet, and no process
    /// in its cgroup so far. Once it has one, the lookup's own backoff takes over.
    fn awaits_netns(&self) -> bool {
        matches!(
            (&self.ip, &self.netns, &self.served),
            (
                PodIp::Known(_),
                Netns::Unknown {
                    populated: false,
                    ..
                },
                None
            )
        )
    }

    /// Takes a new version of the pod; a new IP means a new namespace lookup.
    fn update(&mut self, key: &PodKey, pod: K8sPod, now: Instant, metrics: &KubeMetrics) {
        if pod == self.pod {
            return;
        }
        let ip = pod_ip(&pod);
        self.pod = pod;
        self.problem = None;
        if ip != self.ip {
            if let (PodIp::Known(old), PodIp::Known(new)) = (&self.ip, &ip) {
                log::info!("pod {key}: IP changed from {old} to {new}; looking up its namespace");
            }
            self.ip = ip;
            self.netns = Netns::unknown(now);
            self.served = None;
        }
        self.refresh(key, metrics);
    }

    /// Rebuilds what is served from the pod, once its IP and namespace are known.
    fn refresh(&mut self, key: &PodKey, metrics: &KubeMetrics) {
        match &self.ip {
            PodIp::Missing => {
                self.served = None;
                return;
            }
            PodIp::Invalid(value) => {
                self.served = None;
                let problem = format!("status.podIP {value:?} is not an IP address");
                self.report(key, problem, metrics);
                return;
            }
            PodIp::Known(_) => {}
        }
        let Netns::Known(netns) = &self.netns else {
            return;
        };
        match Pod::from_k8s(&self.pod, netns.clone()) {
            Ok(parsed) => {
                let pod = Arc::new(parsed.pod);
                if self.served.as_ref() != Some(&pod) {
                    for warning in parsed.warnings {
                        log::warn!("pod {key}: {warning}");
                    }
                }
                self.problem = None;
                self.served = Some(pod);
            }
            Err(error) => {
                self.served = None;
                self.report(key, error.to_string(), metrics);
            }
        }
    }

    fn report(&mut self, key: &PodKey, problem: String, metrics: &KubeMetrics) {
        if self.problem.as_ref() != Some(&problem) {
            log::error!("pod {key}: cannot serve it: {problem}");
            metrics.pod_errors.inc();
            self.problem = Some(problem);
        }
    }
}

/// The pod `query` was made for, unless it changed since (deleted, replaced, a new IP).
fn queried<'a>(
    pods: &'a mut BTreeMap<PodKey, Entry>,
    key: &PodKey,
    query: &NetnsQuery,
) -> Option<&'a mut Meshed> {
    let entry = pods.get_mut(key)?;
    let State::Meshed(meshed) = &mut entry.state else {
        return None;
    };
    (entry.uid == query.uid && meshed.ip == PodIp::Known(query.ip)).then_some(&mut **meshed)
}

#[cfg(test)]
mod tests;
