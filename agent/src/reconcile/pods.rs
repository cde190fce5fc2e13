//! The pod set's diff: pods added, changed and removed, and their entries in the datapath, those
//! an earlier agent left there included.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    sync::Arc,
};

use tokio::{sync::watch, time::Instant};

use super::{Entry, Reconciler, State};
use crate::{
    datapath::{FiledListeners, PodRules},
    pod::{Pod, PodKey},
    source::{PodSet, Snapshot},
};

impl Reconciler {
    /// Takes a pod out of the datapath, logging a failure (the pod is gone either way).
    pub(super) fn forget_in_datapath(&self, key: &PodKey, ip: IpAddr) {
        if let Err(error) = self.with_datapath(|datapath| datapath.remove_pod(ip)) {
            log::error!("pod {key}: cannot remove it from the datapath: {error}");
        }
    }

    /// Sorts the pods an earlier agent left in the datapath: those the source serves are rewritten
    /// by [`Self::apply`], those it knows but cannot serve yet are carried, the rest are gone.
    pub(super) fn adopt_left(&mut self, snapshot: &Snapshot) {
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
    pub(super) fn forget_carried(&mut self, snapshot: &Snapshot) {
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

    pub(super) async fn apply(&mut self, snapshot: &Snapshot) {
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
        // The pods this pass starts or restarts read the datapath's listeners once between them.
        let filed = FiledListeners::default();
        for (key, pod) in pods {
            let Some(entry) = self.entries.get(key) else {
                log::info!("pod {key} added: ip {}, netns {}", pod.ip, pod.netns);
                self.report_annotation_errors(pod);
                let (sender, _) = watch::channel(Arc::clone(pod));
                let state = self.start(pod, &sender, &filed, 0, None, None).await;
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
                self.restart(key, 0, &filed).await;
            } else if let State::Listening { cookie, .. } = entry.state {
                match self.with_datapath(|datapath| datapath.upsert_pod(&pod_rules(pod, cookie))) {
                    Ok(Some(())) => self.ctx.metrics.in_datapath(key, pod.replaced_mesh_init),
                    Ok(None) => {}
                    Err(error) => {
                        log::error!(
                            "pod {key}: cannot update it in the datapath: {error}; retrying"
                        );
                        self.restart(key, 0, &filed).await;
                    }
                }
            }
        }
    }

    /// Logs and counts a pod's malformed annotations; each only loses its own setting. An
    /// unreadable original-probes record leaves the pod's rewritten httpGet probes without an
    /// original to run: they are answered 404, saying why.
    pub(super) fn report_annotation_errors(&self, pod: &Pod) {
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

    /// Has the datapath count the probes that reach a pod before it is served (issue 4), and
    /// reports them once it is: a pending pod, or one whose listener has not opened, has no
    /// listener on its probe port, and the kubelet's probe to it is refused. The counts go to
    /// `probe_bypass_probes_before_served_total`, the pod's and only above 0. Without the eBPF
    /// datapath (`--datapath none`) nothing counts them.
    ///
    /// Runs after every change of the pods' states; the datapath's side is a diff, so a call that
    /// changes nothing makes no syscall.
    pub(super) fn count_early_probes(&self) {
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
}

/// What the datapath needs of a pod.
pub(super) fn pod_rules(pod: &Pod, netns_cookie: u64) -> PodRules {
    PodRules {
        addrs: std::iter::once(pod.ip)
            .chain(pod.other_ips.iter().copied())
            .collect(),
        netns_cookie,
        exclusions: pod.exclusions.clone(),
        dependent: pod.replaced_mesh_init.then(|| pod.key.to_string()),
    }
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
}
