//! A pod's listeners: opened in its network namespace, moved when it moves, checked, and retried
//! with backoff when they fail.

use std::{collections::BTreeMap, sync::Arc};

use probe_bypass_rewrite::ProbeKind;
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{Entry, RETRY, Reconciler, ServeError, State, pods::pod_rules};
use crate::{
    datapath::{Datapath, FiledListeners, Inbound},
    netns::{Netns, NetnsError, NetnsId, netns_cookie},
    pod::{Pod, PodKey},
    serve::healthcheck::{self, Endpoint},
};

impl Reconciler {
    /// Opens `pod`'s listener and returns the resulting state. A failure is logged when it first
    /// happens or changes, not on every retry; `failing_since` is when the failures began, if this
    /// is a retry. `filed` is shared by the pods of one pass ([`FiledListeners`]).
    pub(super) async fn start(
        &self,
        pod: &Pod,
        sender: &watch::Sender<Arc<Pod>>,
        filed: &FiledListeners,
        attempts: u32,
        previous_error: Option<&str>,
        failing_since: Option<Instant>,
    ) -> State {
        match self.open(pod, sender, filed).await {
            Ok(state) => {
                if attempts > 0 {
                    log::info!("pod {} served after {attempts} failed attempts", pod.key);
                }
                state
            }
            Err(error) => {
                self.ctx.metrics.listener_error(&pod.key);
                let backoff = RETRY.delay(attempts);
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

    /// Puts `pod` in the datapath and opens its listener, in that order: the pod's redirects do not
    /// wait for the listener.
    pub(super) async fn open(
        &self,
        pod: &Pod,
        sender: &watch::Sender<Arc<Pod>>,
        filed: &FiledListeners,
    ) -> Result<State, ServeError> {
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
            self.ctx
                .metrics
                .in_datapath(&pod.key, pod.replaced_mesh_init);
            self.guard_inbound(pod, &netns, cookie, filed).await?;
            cookie
        } else {
            0
        };
        let listener = healthcheck::bind(&self.ctx, &netns, pod.ip, self.ctx.settings.port).await?;
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
    pub(super) async fn open_probe_ports(
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
            match healthcheck::bind(&self.ctx, netns, pod.ip, port).await {
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
    pub(super) async fn guard_inbound(
        &self,
        pod: &Pod,
        netns: &Arc<Netns>,
        cookie: u64,
        filed: &FiledListeners,
    ) -> Result<(), ServeError> {
        let Some(datapath) = &self.datapath else {
            return Ok(());
        };
        match Datapath::guard_inbound(datapath, filed, &self.ctx.worker, netns, cookie).await? {
            Inbound::Known | Inbound::TookOver { listeners: 0, .. } => {}
            Inbound::TookOver { port, .. } => log::info!(
                "pod {}: took over its proxy's inbound listener on port {port}",
                pod.key
            ),
            Inbound::NotFound { port, error } => log::warn!(
                "pod {}: cannot find its proxy's inbound listener on port {port}: {error}; \
                 connections from other nodes are refused until the proxy listens anew",
                pod.key
            ),
        }
        Ok(())
    }

    /// Replaces the listener of `key`: the new one is bound before the old one closes (SO_REUSEPORT),
    /// so a pod that moved keeps answering throughout.
    pub(super) async fn restart(&mut self, key: &PodKey, attempts: u32, filed: &FiledListeners) {
        let Some(entry) = self.entries.get(key) else {
            return;
        };
        let pod = Arc::clone(&entry.pod.borrow());
        let (previous_error, failing_since) = match &entry.state {
            State::Failing { error, since, .. } => (Some(error.as_str()), Some(*since)),
            State::Listening { .. } => (None, None),
        };
        let state = self
            .start(
                &pod,
                &entry.pod,
                filed,
                attempts,
                previous_error,
                failing_since,
            )
            .await;
        if let Some(entry) = self.entries.get_mut(key) {
            let old = std::mem::replace(&mut entry.state, state);
            if let State::Listening { stop, .. } = old {
                stop.cancel();
            }
        }
    }

    pub(super) fn next_retry(&self) -> Option<Instant> {
        self.entries
            .values()
            .filter_map(|entry| match entry.state {
                State::Failing { retry_at, .. } => Some(retry_at),
                State::Listening { .. } => None,
            })
            .min()
    }

    pub(super) async fn retry_due(&mut self) {
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
        let filed = FiledListeners::default();
        for (key, attempts) in due {
            self.restart(&key, attempts, &filed).await;
        }
    }

    /// Re-opens the listener of every served pod whose namespace file is gone or now names another
    /// namespace, and tries again the probe ports that were taken.
    pub(super) async fn revalidate(&mut self) {
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
        let filed = FiledListeners::default();
        for key in stale {
            log::warn!("pod {key}: its network namespace is gone or was replaced; reopening");
            self.restart(&key, 0, &filed).await;
        }
    }

    /// Binds again the probe ports served pods could not bind.
    pub(super) async fn retry_probe_ports(&mut self) {
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
}
