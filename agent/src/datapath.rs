//! The eBPF datapath: the kernel programs embedded in this binary, and their installer.
//!
//! The programs (`ebpf/programs`) are built by `build.rs` and carried inside the agent, so the
//! agent and its programs always agree on the layout of the maps (`probe-bypass-common`).
//!
//! [`Datapath::install`] attaches them to a cgroup v2 directory through bpf_links and pins links and
//! maps on bpffs, so that they keep working when the agent exits, crashes or restarts. Each meshed
//! pod's network namespace gets the sk_lookup program the same way, when the pod is served
//! ([`Datapath::attach_netns`]):
//!
//! ```text
//! <pins>/links/pb_connect4, pb_connect6, pb_sockops, pb_getsockopt   the cgroup attachments
//! <pins>/netns/<netns cookie>                                         a pod's sk_lookup attachment
//! <pins>/maps-v<LAYOUT_VERSION>/CONFIG, PODS_BY_ADDR, ...             the state, sk_msg included
//! ```
//!
//! A restarted agent loads its programs against the pinned maps (so nothing is lost) and swaps them
//! into the pinned links with `BPF_LINK_UPDATE`, which never leaves a cgroup or a pod without a
//! program.
//! Maps of an older layout are replaced the same way: the new programs come with new maps, and
//! the old maps are removed once no link uses them. [`uninstall`] removes exactly these pins,
//! which detaches everything; other tools' programs on the same cgroup are never touched.
//!
//! - `load`: the embedded object loaded against the pinned maps, its programs attached.
//! - `pods`: the pods' entries and exclusion rules in the maps, kept as diffs.
//! - `inbound`: connections from other nodes, through sk_lookup and the proxies' listeners
//!   ([`listeners`] finds those that listened before the programs were attached, asking
//!   `sock_diag` for the listening sockets of a pod's namespace).
//! - `counters`: the event counters, and their `/metrics` collector.
//! - `kernel_log`: the programs' decision log (aya-log), off unless the `log` filter enables
//!   [`probe_bypass_common::names::LOG_TARGET`], drained into the agent's log.
//! - `pins`: where everything is pinned, and [`uninstall`].

mod cgroup;
mod counters;
mod error;
mod inbound;
mod kernel_log;
mod kubelet;
pub mod listeners;
mod load;
mod pins;
mod pods;
mod sock_diag;
mod sys;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
    os::fd::OwnedFd,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
};

use aya::maps::{Array, HashMap, MapData, PerCpuArray, SockHash, lpm_trie::LpmTrie};
use probe_bypass_common::{Addr, CidrRule, Config, ListenerKey, PodEntry, PodName, PortRule};

pub use cgroup::cgroup2_mount;
pub use counters::{Counters, DatapathCollector};
pub use error::DatapathError;
pub use inbound::{FiledListeners, Inbound};
pub use kernel_log::{KernelLog, kernel_log_level};
pub use kubelet::KubeletCgroup;
pub use load::Programs;
pub use pins::{Uninstalled, dependents, mapped_addrs, short_circuit_sockets, uninstall};

use crate::exclusions::Exclusions;
use pods::{Installed, Rules};

/// Which datapath the agent runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DatapathMode {
    /// The eBPF programs replace the mesh's per-pod iptables rules.
    Ebpf,
    /// No eBPF: the mesh keeps its own iptables rules and the agent only serves the healthcheck,
    /// which still removes the healthcheck container from every pod.
    None,
}

/// The datapath as the agent's tasks share it: the reconciler updates it, `/metrics` reads its
/// counters.
pub type SharedDatapath = Arc<Mutex<Datapath>>;

/// Who gets past the proxy on a meshed pod's probe ports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeBypass {
    /// Every caller in the host network namespace: the kubelet, and hostNetwork pods and node
    /// daemons with it.
    Host,
    /// Every caller, as the mesh's iptables rules let them.
    Any,
    /// Only callers in the host network namespace whose cgroup is the kubelet's, or below it.
    Kubelet(KubeletCgroup),
    /// The kubelet's cgroup was asked for but not found (why): as [`Self::Host`], until it is.
    KubeletNotFound(String),
}

impl ProbeBypass {
    /// Why the kubelet's cgroup is not what the datapath trusts, when it was asked for.
    pub fn fallback(&self) -> Option<&str> {
        match self {
            Self::KubeletNotFound(why) => Some(why),
            _ => None,
        }
    }
}

/// Node-wide settings of the datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The sidecar proxy's UID (1500 in FSM and OSM).
    pub proxy_uid: u32,
    /// The proxy's inbound port (15003).
    pub inbound_port: u16,
    /// The proxy's outbound port (15001).
    pub outbound_port: u16,
    /// Ports that the host network namespace (the kubelet) reaches directly.
    pub probe_ports: BTreeSet<u16>,
    /// Who reaches the probe ports directly.
    pub probe_bypass: ProbeBypass,
    /// Short-circuit same-node connections with sk_msg.
    pub sk_msg: bool,
    /// Exclusions for every meshed pod, on top of each pod's own.
    pub node: Exclusions,
    /// The host's /proc, where the proxies' inbound listeners that predate the programs are found
    /// (see [`listeners`]).
    pub proc_root: PathBuf,
}

/// What the datapath knows about one meshed pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodRules {
    /// The pod's addresses, its primary (`status.podIP`) first: the pod's identity in the maps.
    pub addrs: Vec<IpAddr>,
    /// The cookie of the pod's network namespace (see [`crate::netns::netns_cookie`]).
    pub netns_cookie: u64,
    /// The pod's own exclusions (its annotations); the node's apply as well.
    pub exclusions: Exclusions,
    /// `namespace/name` of a pod whose only interception is this datapath (its mesh's iptables
    /// init container was replaced): recorded in the pinned `DEPENDENTS` map, which
    /// [`dependents`] reads for `probe-bypass uninstall`. `None` for a pod that keeps its mesh's
    /// rules.
    pub dependent: Option<String>,
}

/// The installed datapath: handles on its pinned maps, and what it has put in them.
pub struct Datapath {
    config: Array<MapData, Config>,
    pods_by_addr: HashMap<MapData, Addr, PodEntry>,
    pods_by_netns: HashMap<MapData, u64, PodEntry>,
    port_rules: HashMap<MapData, PortRule, u8>,
    cidr_rules: LpmTrie<MapData, CidrRule, u8>,
    counters: PerCpuArray<MapData, u64>,
    early_probes: HashMap<MapData, Addr, u64>,
    listeners: SockHash<MapData, ListenerKey>,
    dependents: HashMap<MapData, Addr, PodName>,
    /// The loaded sk_lookup program, which [`Self::attach_netns`] attaches to pods' namespaces.
    sk_lookup: OwnedFd,
    /// The loaded sk_reuseport program, which the agent's listeners are given
    /// ([`Self::reuseport_program`]).
    reuseport: Arc<OwnedFd>,
    /// The cookies of the namespaces with a pinned sk_lookup link.
    netns_links: BTreeSet<u64>,
    settings: Settings,
    node_rules: Rules,
    /// Pods by their primary address.
    pods: BTreeMap<Addr, Installed>,
    /// The addresses in `EARLY_PROBES`.
    early_addrs: BTreeSet<Addr>,
    pins: PathBuf,
}

impl Datapath {
    /// Changes who gets past the proxy on the probe ports, at once (the kubelet's cgroup moved,
    /// or was found).
    pub fn set_probe_bypass(&mut self, probe_bypass: ProbeBypass) -> Result<(), DatapathError> {
        let settings = Settings {
            probe_bypass,
            ..self.settings.clone()
        };
        self.apply_settings(settings)
    }

    /// The sk_reuseport program that makes the kernel hand a closing listener's queued
    /// connections to another listener of its SO_REUSEPORT group (see `listen::migrate_on_close`).
    pub fn reuseport_program(&self) -> Arc<OwnedFd> {
        Arc::clone(&self.reuseport)
    }

    /// The node-wide settings the datapath runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Where the links and maps are pinned.
    pub fn pins(&self) -> &Path {
        &self.pins
    }
}

// By hand because aya's map handles have no Debug.
impl fmt::Debug for Datapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Datapath")
            .field("pins", &self.pins)
            .field("pods", &self.pods.len())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}
