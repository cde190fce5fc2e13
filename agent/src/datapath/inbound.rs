//! Connections from other nodes: the sk_lookup program attached to each meshed pod's network
//! namespace, and the proxies' inbound listeners it hands those connections to (issue 5).

use std::{
    collections::BTreeSet,
    fs, io,
    os::fd::{AsFd, AsRawFd as _},
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
};

use probe_bypass_common::{ListenerKey, names};

use super::{
    Datapath, DatapathError,
    error::map_error,
    listeners::{self, ListenerError},
    pins::{NETNS_LINKS, detach_pinned_link, netns_link_cookie, remove_pin},
    sys,
};
use crate::netns::{Netns, NetnsWorker};

impl Datapath {
    /// Takes over the sk_lookup links an earlier agent pinned: each pod's namespace runs this
    /// agent's program from now on, swapped in place. A link whose namespace is gone, or whose pod
    /// is no longer in the maps, is removed.
    pub(super) fn adopt_netns_links(&mut self) -> Result<(), DatapathError> {
        let dir = self.pins.join(NETNS_LINKS);
        let entries = fs::read_dir(&dir).map_err(|source| DatapathError::Pin {
            path: dir.clone(),
            source,
        })?;
        let known: BTreeSet<u64> = self.pods.values().map(|pod| pod.netns_cookie).collect();
        for entry in entries.flatten() {
            let pin = entry.path();
            let Some(cookie) = netns_link_cookie(&entry.file_name()) else {
                continue;
            };
            let adopted = if known.contains(&cookie) {
                sys::obj_get(&pin).and_then(|link| sys::link_update(link, &self.sk_lookup))
            } else {
                Err(io::Error::other("its pod is not in the maps"))
            };
            match adopted {
                Ok(()) => {
                    self.netns_links.insert(cookie);
                }
                // ENOLINK: the namespace is gone, and the link with it.
                Err(error) => {
                    log::info!(
                        "removing the sk_lookup link of network namespace {cookie} ({}): {error}",
                        pin.display()
                    );
                    remove_pin(&pin)?;
                }
            }
        }
        Ok(())
    }

    /// Attaches the sk_lookup program to the network namespace `netns`, whose cookie is `cookie`,
    /// and pins the link: connections from other nodes to the pod in it meet its proxy from now on,
    /// until [`Self::detach_netns`], also across restarts of the agent. Nothing is attached to
    /// the pod's interfaces. Attaching a namespace that has its link already does nothing.
    pub fn attach_netns(&mut self, cookie: u64, netns: impl AsFd) -> Result<(), DatapathError> {
        if self.netns_links.contains(&cookie) {
            return Ok(());
        }
        let pin = self.netns_pin(cookie);
        let link = sys::link_create(&self.sk_lookup, netns, sys::AttachType::SkLookup)
            .map_err(|source| DatapathError::AttachNetns { cookie, source })?;
        sys::obj_pin(&link, &pin).map_err(|source| DatapathError::Pin { path: pin, source })?;
        self.netns_links.insert(cookie);
        Ok(())
    }

    /// Detaches the sk_lookup program from a namespace by removing its link's pin (the only
    /// reference to the link): the namespace is left as it was before [`Self::attach_netns`].
    pub fn detach_netns(&mut self, cookie: u64) -> Result<(), DatapathError> {
        if self.netns_links.remove(&cookie) {
            let pin = self.netns_pin(cookie);
            detach_pinned_link(&pin);
            remove_pin(&pin)?;
        }
        Ok(())
    }

    fn netns_pin(&self, cookie: u64) -> PathBuf {
        self.pins.join(NETNS_LINKS).join(cookie.to_string())
    }

    /// The cookies of the namespaces whose proxy's inbound listener the datapath knows. The map is
    /// read whole, a system call a listener: [`FiledListeners`] reads it once for many pods.
    pub fn listener_namespaces(&self) -> Result<BTreeSet<u64>, DatapathError> {
        self.listeners
            .keys()
            .map(|key| {
                key.map(|key| key.netns)
                    .map_err(|source| map_error(names::LISTENERS, "read", source))
            })
            .collect()
    }

    /// Adds a proxy's inbound listener in the namespace `cookie`, found by [`listeners::find`].
    pub fn add_listener(
        &mut self,
        cookie: u64,
        listener: &listeners::Listener,
    ) -> Result<(), DatapathError> {
        let key = ListenerKey {
            netns: cookie,
            family: listener.family,
            _reserved: 0,
        };
        self.listeners
            .insert(key, listener.socket.as_raw_fd(), 0)
            .map_err(|source| map_error(names::LISTENERS, "insert", source))
    }

    /// Hands the connections from other nodes to the pod in `netns` (cookie `cookie`) to its
    /// proxy: the proxy's inbound listener is found and filed unless sockops filed it already, and
    /// sk_lookup is attached to the namespace. Attached even when no listener is found, so that
    /// such connections are refused rather than let past the proxy until it listens anew.
    ///
    /// Whether sockops filed the listener is answered by `filed`, shared by the pods served in
    /// the same pass.
    ///
    /// Takes the shared datapath, not `&mut self`: the listener is looked for in the pod's
    /// namespace and `/proc` without holding the lock.
    pub async fn guard_inbound(
        datapath: &Mutex<Self>,
        filed: &FiledListeners,
        worker: &NetnsWorker,
        netns: &Arc<Netns>,
        cookie: u64,
    ) -> Result<Inbound, DatapathError> {
        let lock = || datapath.lock().map_err(|_| DatapathError::Poisoned);
        let (known, port, proc_root) = {
            let datapath = lock()?;
            let settings = datapath.settings();
            (
                filed.contains(&datapath, cookie)?,
                settings.inbound_port,
                settings.proc_root.clone(),
            )
        };
        let inbound = if known {
            Inbound::Known
        } else {
            match listeners::find(worker, netns, port, &proc_root).await {
                Ok(found) => {
                    let mut datapath = lock()?;
                    for listener in &found {
                        datapath.add_listener(cookie, listener)?;
                    }
                    Inbound::TookOver {
                        port,
                        listeners: found.len(),
                    }
                }
                Err(error) => Inbound::NotFound { port, error },
            }
        };
        lock()?.attach_netns(cookie, netns.file())?;
        Ok(inbound)
    }
}

/// The namespaces whose proxy's inbound listener is in the datapath's map, read at most once for
/// all the pods one pass of the reconciler serves (the agent's start serves them all in one).
/// The map can only be read whole, so reading it for each pod cost a pass over n pods n² system
/// calls: 0.3 ms a pod at 500 pods, half of a restart.
///
/// A listener that sockops files after the read is looked for like one older than the programs
/// ([`listeners::find`]), and filed again: the same socket under the same key.
#[derive(Debug, Default)]
pub struct FiledListeners(OnceLock<BTreeSet<u64>>);

impl FiledListeners {
    /// Whether the namespace `cookie` has its listener in `datapath`'s map, as first read.
    pub fn contains(&self, datapath: &Datapath, cookie: u64) -> Result<bool, DatapathError> {
        let filed = match self.0.get() {
            Some(filed) => filed,
            None => {
                let read = datapath.listener_namespaces()?;
                self.0.get_or_init(|| read)
            }
        };
        Ok(filed.contains(&cookie))
    }
}

/// What [`Datapath::guard_inbound`] found of the proxy's inbound listener.
#[derive(Debug)]
pub enum Inbound {
    /// sockops had filed it already: the proxy started listening after the programs were attached.
    Known,
    /// Taken over from the proxy's process: `listeners` sockets (one per address family) on
    /// `port`; 0 when nothing listens there yet.
    TookOver { port: u16, listeners: usize },
    /// The lookup failed: connections from other nodes are refused until the proxy listens anew.
    NotFound { port: u16, error: ListenerError },
}
