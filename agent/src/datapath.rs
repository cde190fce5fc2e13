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

mod cgroup;
mod error;
pub mod listeners;
mod sys;

use sys::AttachType;

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    io::{self, ErrorKind},
    net::IpAddr,
    os::{
        fd::{AsFd, AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, SockHash,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
    programs::{CgroupSockAddr, CgroupSockopt, ProgramError, SkLookup, SkMsg, SockOps},
};
use ipnet::IpNet;
use probe_bypass_common::{
    Addr, CidrRule, Config, ConnKey, Counter, LAYOUT_VERSION, ListenerKey, PodEntry, PortRule,
    RULE_PRESENT, cidr_rule, port_rule,
};

pub use cgroup::cgroup2_mount;
pub use error::DatapathError;

use crate::exclusions::Exclusions;

/// The kernel object built from `ebpf/programs`; empty when the build skipped it (`AYA_BUILD_SKIP`).
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-bypass-ebpf"));

/// Where the agent pins its links and maps unless told otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/probe-bypass";

/// The cgroup programs, each pinned as a link under `links/` by its name.
const CGROUP_PROGRAMS: [&str; 4] = ["pb_connect4", "pb_connect6", "pb_sockops", "pb_getsockopt"];
const SK_MSG: &str = "pb_sk_msg";
const SK_LOOKUP: &str = "pb_sk_lookup";

/// Where each meshed pod's sk_lookup link is pinned, under its namespace's cookie.
const NETNS_LINKS: &str = "netns";

/// Every map of the object, each pinned under `maps-v<LAYOUT_VERSION>/` by its name.
const MAPS: [&str; 12] = [
    "CONFIG",
    "PODS_BY_ADDR",
    "PODS_BY_NETNS",
    "PORT_RULES",
    "CIDR_RULES",
    "PENDING",
    "ORIG_DST",
    "SOCKETS",
    "COUNTERS",
    "EARLY_PROBES",
    "LISTENERS",
    "LOCAL_CONNECTS",
];

/// The flag of a map update that adds a key only if it is not there yet (`BPF_NOEXIST`).
const BPF_NOEXIST: u64 = 1;

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
    /// Let every caller reach the probe ports directly, as the mesh's iptables rules do.
    pub probe_bypass_from_any: bool,
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
}

/// Rules of one scope (a pod, or the node), as installed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Rules {
    ports: BTreeSet<PortRule>,
    cidrs: BTreeSet<(u32, CidrRule)>,
}

impl Rules {
    fn of(scope: Addr, exclusions: &Exclusions, probe_ports: &BTreeSet<u16>) -> Self {
        let port = |kind| move |&port: &u16| PortRule { scope, port, kind };
        let mut ports: BTreeSet<PortRule> = exclusions
            .inbound_ports
            .iter()
            .map(port(port_rule::INBOUND_EXCLUDED))
            .collect();
        ports.extend(
            exclusions
                .outbound_ports
                .iter()
                .map(port(port_rule::OUTBOUND_EXCLUDED)),
        );
        ports.extend(probe_ports.iter().map(port(port_rule::PROBE)));
        let cidr = |kind| move |net: &IpNet| cidr_key(scope, kind, net);
        let mut cidrs: BTreeSet<(u32, CidrRule)> = exclusions
            .outbound_ip_ranges
            .iter()
            .map(cidr(cidr_rule::EXCLUDED))
            .collect();
        cidrs.extend(
            exclusions
                .outbound_ip_range_inclusions
                .iter()
                .map(cidr(cidr_rule::INCLUDED)),
        );
        Self { ports, cidrs }
    }
}

/// The longest-prefix-match key of a range rule: scope and kind in full, then the range.
fn cidr_key(scope: Addr, kind: u32, net: &IpNet) -> (u32, CidrRule) {
    let (addr, bits) = match net.trunc() {
        IpNet::V4(v4) => (
            Addr::from(IpAddr::V4(v4.network())),
            96 + u32::from(v4.prefix_len()),
        ),
        IpNet::V6(v6) => (
            Addr::from(IpAddr::V6(v6.network())),
            u32::from(v6.prefix_len()),
        ),
    };
    (CidrRule::FIXED_BITS + bits, CidrRule { scope, kind, addr })
}

/// A pod as it is in the maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Installed {
    addrs: BTreeSet<Addr>,
    netns_cookie: u64,
    rules: Rules,
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
    /// The loaded sk_lookup program, which [`Self::attach_netns`] attaches to pods' namespaces.
    sk_lookup: OwnedFd,
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

/// The datapath's counters, summed over all CPUs since the maps were created (they survive
/// restarts of the agent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub connects: u64,
    pub redirected_outbound: u64,
    pub redirected_inbound: u64,
    pub probe_bypassed: u64,
    pub bypass_refused: u64,
    pub orig_dst_lookups: u64,
    pub orig_dst_misses: u64,
    pub sk_msg_redirected: u64,
    pub remote_redirected: u64,
    pub remote_excluded: u64,
    pub remote_refused: u64,
}

impl Counters {
    fn field(&mut self, counter: Counter) -> &mut u64 {
        match counter {
            Counter::Connects => &mut self.connects,
            Counter::RedirectedOutbound => &mut self.redirected_outbound,
            Counter::RedirectedInbound => &mut self.redirected_inbound,
            Counter::ProbeBypassed => &mut self.probe_bypassed,
            Counter::BypassRefused => &mut self.bypass_refused,
            Counter::OrigDstLookups => &mut self.orig_dst_lookups,
            Counter::OrigDstMisses => &mut self.orig_dst_misses,
            Counter::SkMsgRedirected => &mut self.sk_msg_redirected,
            Counter::RemoteRedirected => &mut self.remote_redirected,
            Counter::RemoteExcluded => &mut self.remote_excluded,
            Counter::RemoteRefused => &mut self.remote_refused,
        }
    }

    /// Each counter with its metric name suffix and help text.
    pub fn describe(&self) -> [(&'static str, &'static str, u64); 11] {
        [
            (
                "connects",
                "TCP connects the datapath decided on",
                self.connects,
            ),
            (
                "redirected_outbound",
                "Meshed pods' connections sent to their proxy's outbound port",
                self.redirected_outbound,
            ),
            (
                "redirected_inbound",
                "Connections to meshed pods sent to their proxy's inbound port",
                self.redirected_inbound,
            ),
            (
                "probe_bypassed",
                "Connections from the host network namespace to a probe port, let past the proxy",
                self.probe_bypassed,
            ),
            (
                "bypass_refused",
                "Connections to a probe port from elsewhere, sent to the proxy",
                self.bypass_refused,
            ),
            (
                "orig_dst_lookups",
                "SO_ORIGINAL_DST lookups by proxies",
                self.orig_dst_lookups,
            ),
            (
                "orig_dst_misses",
                "SO_ORIGINAL_DST lookups for connections the datapath did not redirect",
                self.orig_dst_misses,
            ),
            (
                "sk_msg_redirected",
                "Messages handed straight to a same-node peer socket",
                self.sk_msg_redirected,
            ),
            (
                "remote_redirected",
                "Connections from other nodes to meshed pods, handed to their proxy's inbound listener",
                self.remote_redirected,
            ),
            (
                "remote_excluded",
                "Connections from other nodes to an excluded port of a meshed pod, let through",
                self.remote_excluded,
            ),
            (
                "remote_refused",
                "Connections from other nodes to meshed pods refused: no known proxy listener",
                self.remote_refused,
            ),
        ]
    }
}

impl Datapath {
    /// Loads the embedded programs against the maps pinned under `pins` (creating them the first
    /// time), writes `settings`, and attaches the programs to `cgroup`, replacing the programs of
    /// links already pinned there. Pods already in the pinned maps stay until [`Self::remove_pod`]:
    /// a restarted agent reconciles them against its pod source instead of starting empty.
    ///
    /// `pins` must be on bpffs (see `preflight`).
    pub fn install(cgroup: &Path, pins: &Path, settings: Settings) -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::ObjectMissing);
        }
        let maps_dir = maps_dir(pins);
        let links_dir = pins.join("links");
        let netns_dir = pins.join(NETNS_LINKS);
        for dir in [pins, &links_dir, &netns_dir, &maps_dir] {
            create_dir(dir)?;
        }
        let cgroup_dir = fs::File::open(cgroup).map_err(|source| DatapathError::OpenCgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let cgroup_id = cgroup_dir
            .metadata()
            .map_err(|source| DatapathError::OpenCgroup {
                path: cgroup.to_path_buf(),
                source,
            })?
            .ino();

        let map_pins: Vec<(&str, PathBuf)> = MAPS
            .iter()
            .map(|name| (*name, maps_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        let mut ebpf = loader.load(EBPF_OBJECT).map_err(DatapathError::Object)?;

        let sk_lookup: &mut SkLookup = program(&mut ebpf, SK_LOOKUP)?;
        sk_lookup
            .load()
            .map_err(|error| load_error(SK_LOOKUP, error))?;
        let sk_lookup = sk_lookup
            .fd()
            .map_err(|source| program_error(SK_LOOKUP, "get its fd", source))?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| DatapathError::Pin {
                path: netns_dir.clone(),
                source,
            })?;

        let mut datapath = Self {
            config: take_map(&mut ebpf, "CONFIG")?,
            pods_by_addr: take_map(&mut ebpf, "PODS_BY_ADDR")?,
            pods_by_netns: take_map(&mut ebpf, "PODS_BY_NETNS")?,
            port_rules: take_map(&mut ebpf, "PORT_RULES")?,
            cidr_rules: take_map(&mut ebpf, "CIDR_RULES")?,
            counters: take_map(&mut ebpf, "COUNTERS")?,
            early_probes: take_map(&mut ebpf, "EARLY_PROBES")?,
            listeners: take_map(&mut ebpf, "LISTENERS")?,
            sk_lookup,
            netns_links: BTreeSet::new(),
            node_rules: Rules::default(),
            pods: BTreeMap::new(),
            early_addrs: BTreeSet::new(),
            pins: pins.to_path_buf(),
            settings: settings.clone(),
        };
        datapath.adopt()?;
        // Settings and node rules go in before any program can run with them.
        datapath.apply_settings(settings)?;

        // sk_msg is attached to the sockhash, which holds it for as long as the map lives.
        let sockets: SockHash<MapData, ConnKey> = take_map(&mut ebpf, "SOCKETS")?;
        let sk_msg: &mut SkMsg = program(&mut ebpf, SK_MSG)?;
        sk_msg.load().map_err(|error| load_error(SK_MSG, error))?;
        let link = sk_msg
            .attach(sockets.fd())
            .map_err(|source| program_error(SK_MSG, "attach to SOCKETS", source))?;
        let link = sk_msg
            .take_link(link)
            .map_err(|source| program_error(SK_MSG, "take its link", source))?;
        // Dropping the handle would detach the program; the pinned map keeps the attachment.
        std::mem::forget(link);

        for name in CGROUP_PROGRAMS {
            attach_or_update(&mut ebpf, name, &cgroup_dir, cgroup, cgroup_id, &links_dir)?;
        }
        datapath.adopt_netns_links()?;
        remove_other_layouts(pins, &maps_dir);
        Ok(datapath)
    }

    /// Takes over the sk_lookup links an earlier agent pinned: each pod's namespace runs this
    /// agent's program from now on, swapped in place. A link whose namespace is gone, or whose pod
    /// is no longer in the maps, is removed.
    fn adopt_netns_links(&mut self) -> Result<(), DatapathError> {
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

    /// Whether the datapath knows an inbound listener of the proxy in the namespace `cookie`.
    pub fn has_listener(&self, cookie: u64) -> Result<bool, DatapathError> {
        for key in self.listeners.keys() {
            let key = key.map_err(|source| map_error("LISTENERS", "read", source))?;
            if key.netns == cookie {
                return Ok(true);
            }
        }
        Ok(false)
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
            .map_err(|source| map_error("LISTENERS", "insert", source))
    }

    /// The node-wide settings the datapath runs with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Reads back what an earlier agent left in the pinned maps, so that updates are diffs.
    fn adopt(&mut self) -> Result<(), DatapathError> {
        for entry in self.pods_by_addr.iter() {
            let (addr, pod) = entry.map_err(|source| map_error("PODS_BY_ADDR", "read", source))?;
            let installed = self.pods.entry(pod.id).or_default();
            installed.addrs.insert(addr);
            installed.netns_cookie = pod.netns_cookie;
        }
        let ports = self
            .port_rules
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| map_error("PORT_RULES", "read", source))?;
        for rule in ports {
            self.rules_of(rule.scope).ports.insert(rule);
        }
        let cidrs = self
            .cidr_rules
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| map_error("CIDR_RULES", "read", source))?;
        for key in cidrs {
            let rule = key.data();
            self.rules_of(rule.scope)
                .cidrs
                .insert((key.prefix_len(), rule));
        }
        self.early_addrs = self
            .early_probes
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|source| map_error("EARLY_PROBES", "read", source))?;
        Ok(())
    }

    fn rules_of(&mut self, scope: Addr) -> &mut Rules {
        if scope == Addr::UNSPECIFIED {
            &mut self.node_rules
        } else {
            &mut self.pods.entry(scope).or_default().rules
        }
    }

    /// Writes the node-wide settings and rules; pods' inclusion flags follow the node's list.
    fn apply_settings(&mut self, settings: Settings) -> Result<(), DatapathError> {
        let mut flags = 0;
        if settings.probe_bypass_from_any {
            flags |= Config::PROBE_BYPASS_FROM_ANY;
        }
        if settings.sk_msg {
            flags |= Config::SK_MSG;
        }
        let config = Config {
            proxy_uid: settings.proxy_uid,
            inbound_port: settings.inbound_port,
            outbound_port: settings.outbound_port,
            flags,
            _reserved: 0,
        };
        self.config
            .set(0, config, 0)
            .map_err(|source| map_error("CONFIG", "write", source))?;
        let wanted = Rules::of(Addr::UNSPECIFIED, &settings.node, &settings.probe_ports);
        let current = std::mem::take(&mut self.node_rules);
        self.sync_rules(&current, &wanted)?;
        self.node_rules = wanted;
        self.settings = settings;
        Ok(())
    }

    /// Puts a pod in the maps, or brings its entries up to date. Its rules go in before its
    /// entries, so that its first connection already meets its exclusions.
    pub fn upsert_pod(&mut self, pod: &PodRules) -> Result<(), DatapathError> {
        let Some(&primary) = pod.addrs.first() else {
            return Ok(());
        };
        let id = Addr::from(primary);
        let wanted_rules = Rules::of(id, &pod.exclusions, &BTreeSet::new());
        let current = self.pods.get(&id).cloned().unwrap_or_default();
        self.sync_rules(&current.rules, &wanted_rules)?;

        let has_inclusions = !pod.exclusions.outbound_ip_range_inclusions.is_empty()
            || !self.settings.node.outbound_ip_range_inclusions.is_empty();
        let entry = PodEntry {
            id,
            netns_cookie: pod.netns_cookie,
            flags: if has_inclusions {
                PodEntry::HAS_INCLUSIONS
            } else {
                0
            },
            _reserved: 0,
        };
        let addrs: BTreeSet<Addr> = pod.addrs.iter().map(|&ip| Addr::from(ip)).collect();
        for addr in &addrs {
            self.pods_by_addr
                .insert(addr, entry, 0)
                .map_err(|source| map_error("PODS_BY_ADDR", "insert", source))?;
        }
        self.pods_by_netns
            .insert(pod.netns_cookie, entry, 0)
            .map_err(|source| map_error("PODS_BY_NETNS", "insert", source))?;
        for stale in current.addrs.difference(&addrs) {
            absent_is_fine(self.pods_by_addr.remove(stale))
                .map_err(|source| map_error("PODS_BY_ADDR", "remove", source))?;
        }
        if current.netns_cookie != 0 && current.netns_cookie != pod.netns_cookie {
            self.remove_netns_entry(current.netns_cookie, id)?;
            self.detach_netns(current.netns_cookie)?;
        }
        self.pods.insert(
            id,
            Installed {
                addrs,
                netns_cookie: pod.netns_cookie,
                rules: wanted_rules,
            },
        );
        Ok(())
    }

    /// Takes a pod out of the maps: its entries first, so no connection meets half a pod, then
    /// its rules. Removing a pod that is not there is not an error.
    pub fn remove_pod(&mut self, primary: IpAddr) -> Result<(), DatapathError> {
        let id = Addr::from(primary);
        let Some(current) = self.pods.remove(&id) else {
            return Ok(());
        };
        for addr in &current.addrs {
            absent_is_fine(self.pods_by_addr.remove(addr))
                .map_err(|source| map_error("PODS_BY_ADDR", "remove", source))?;
        }
        self.remove_netns_entry(current.netns_cookie, id)?;
        self.detach_netns(current.netns_cookie)?;
        self.sync_rules(&current.rules, &Rules::default())
    }

    /// Removes a namespace's entry if it still belongs to pod `id` (a new pod may have its cookie).
    fn remove_netns_entry(&mut self, cookie: u64, id: Addr) -> Result<(), DatapathError> {
        match self.pods_by_netns.get(&cookie, 0) {
            Ok(entry) if entry.id == id => absent_is_fine(self.pods_by_netns.remove(&cookie))
                .map_err(|source| map_error("PODS_BY_NETNS", "remove", source)),
            _ => Ok(()),
        }
    }

    /// The primary addresses of the pods in the maps, those an earlier agent left included.
    pub fn pods(&self) -> BTreeSet<IpAddr> {
        self.pods.keys().map(|&addr| IpAddr::from(addr)).collect()
    }

    /// Sets the addresses whose probes from the host network namespace are counted until their
    /// pod is served (issue 4): meshed pods the agent knows but does not serve yet. A new address
    /// starts at 0; one already there (an earlier agent's) keeps its count; the entries of the
    /// addresses not given are removed with their counts. Only addresses that are not in the pod
    /// maps count: a pod the datapath has keeps the probe bypass it always had.
    pub fn set_pending_addrs(&mut self, addrs: &BTreeSet<IpAddr>) -> Result<(), DatapathError> {
        let wanted: BTreeSet<Addr> = addrs.iter().map(|&ip| Addr::from(ip)).collect();
        // Removals first: a full map must still drain.
        for stale in self.early_addrs.difference(&wanted) {
            absent_is_fine(self.early_probes.remove(stale))
                .map_err(|source| map_error("EARLY_PROBES", "remove", source))?;
        }
        for addr in wanted.difference(&self.early_addrs) {
            match self.early_probes.insert(addr, 0, BPF_NOEXIST) {
                Ok(()) => {}
                Err(MapError::SyscallError(syscall))
                    if syscall.io_error.kind() == ErrorKind::AlreadyExists => {}
                Err(source) => return Err(map_error("EARLY_PROBES", "insert", source)),
            }
        }
        self.early_addrs = wanted;
        Ok(())
    }

    /// The addresses [`Self::set_pending_addrs`] set, those an earlier agent left included.
    pub fn pending_addrs(&self) -> BTreeSet<IpAddr> {
        self.early_addrs
            .iter()
            .map(|&addr| IpAddr::from(addr))
            .collect()
    }

    /// The probes counted for a pending address since it was set, for a pod that is now served;
    /// the address is no longer pending. An address that is not there counts 0.
    ///
    /// Read, then removed: a probe that lands between the two is lost, but by then the pod is in
    /// the pod maps, and probes to it are no longer counted.
    pub fn take_early_probes(&mut self, addr: IpAddr) -> Result<u64, DatapathError> {
        let key = Addr::from(addr);
        let probes = match self.early_probes.get(&key, 0) {
            Ok(probes) => probes,
            Err(MapError::KeyNotFound) => 0,
            Err(source) => return Err(map_error("EARLY_PROBES", "read", source)),
        };
        absent_is_fine(self.early_probes.remove(&key))
            .map_err(|source| map_error("EARLY_PROBES", "remove", source))?;
        self.early_addrs.remove(&key);
        Ok(probes)
    }

    /// Adds the rules in `wanted` and then removes those only in `current`.
    fn sync_rules(&mut self, current: &Rules, wanted: &Rules) -> Result<(), DatapathError> {
        for rule in &wanted.ports {
            self.port_rules
                .insert(rule, RULE_PRESENT, 0)
                .map_err(|source| map_error("PORT_RULES", "insert", source))?;
        }
        for (bits, rule) in &wanted.cidrs {
            self.cidr_rules
                .insert(&LpmKey::new(*bits, *rule), RULE_PRESENT, 0)
                .map_err(|source| map_error("CIDR_RULES", "insert", source))?;
        }
        for rule in current.ports.difference(&wanted.ports) {
            absent_is_fine(self.port_rules.remove(rule))
                .map_err(|source| map_error("PORT_RULES", "remove", source))?;
        }
        for (bits, rule) in current.cidrs.difference(&wanted.cidrs) {
            absent_is_fine(self.cidr_rules.remove(&LpmKey::new(*bits, *rule)))
                .map_err(|source| map_error("CIDR_RULES", "remove", source))?;
        }
        Ok(())
    }

    /// Reads the counters, summed over all CPUs.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        let mut counters = Counters::default();
        for counter in Counter::ALL {
            let per_cpu = self
                .counters
                .get(&counter.index(), 0)
                .map_err(|source| map_error("COUNTERS", "read", source))?;
            // Wrapping: a 64-bit count will not overflow, and if it did a metric should not panic.
            *counters.field(counter) = per_cpu
                .iter()
                .fold(0, |sum: u64, value| sum.wrapping_add(*value));
        }
        Ok(counters)
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

/// Loads cgroup program `name` and puts it in its pinned link: swapped in if the link exists,
/// attached and pinned if not.
fn attach_or_update(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup_dir: &fs::File,
    cgroup: &Path,
    cgroup_id: u64,
    links_dir: &Path,
) -> Result<(), DatapathError> {
    let pin = links_dir.join(name);
    let existing = match sys::obj_get(&pin) {
        Ok(fd) => Some(fd),
        Err(error) if error.kind() == ErrorKind::NotFound => None,
        Err(source) => return Err(DatapathError::Pin { path: pin, source }),
    };
    if let Some(link) = &existing {
        let attached_to = sys::link_cgroup_id(link).map_err(|source| DatapathError::Pin {
            path: pin.clone(),
            source,
        })?;
        if attached_to != cgroup_id {
            return Err(DatapathError::OtherCgroup {
                link: pin,
                cgroup: cgroup.to_path_buf(),
            });
        }
    }

    let program = ebpf.program_mut(name).ok_or(DatapathError::NotInObject {
        kind: "program",
        name,
    })?;
    macro_rules! load {
        ($kind:ty, $attach_type:expr) => {{
            let program: &mut $kind = program
                .try_into()
                .map_err(|source| program_error(name, "use it as its kind", source))?;
            program.load().map_err(|error| load_error(name, error))?;
            let fd = program
                .fd()
                .map_err(|source| program_error(name, "get its fd", source))?;
            (fd.as_fd().try_clone_to_owned(), $attach_type)
        }};
    }
    let (fd, attach_type) = match name {
        "pb_connect4" => load!(CgroupSockAddr, AttachType::Connect4),
        "pb_connect6" => load!(CgroupSockAddr, AttachType::Connect6),
        "pb_sockops" => load!(SockOps, AttachType::SockOps),
        _ => load!(CgroupSockopt, AttachType::GetSockopt),
    };
    let fd = fd.map_err(|source| DatapathError::Pin {
        path: pin.clone(),
        source,
    })?;
    if let Some(link) = &existing {
        return sys::link_update(link, &fd)
            .map_err(|source| DatapathError::Pin { path: pin, source });
    }
    let link =
        sys::link_create(&fd, cgroup_dir, attach_type).map_err(|source| DatapathError::Attach {
            program: name,
            cgroup: cgroup.to_path_buf(),
            source,
        })?;
    sys::obj_pin(&link, &pin).map_err(|source| DatapathError::Pin { path: pin, source })
}

/// Where the maps of this layout are pinned under `pins`.
fn maps_dir(pins: &Path) -> PathBuf {
    pins.join(format!("maps-v{LAYOUT_VERSION}"))
}

/// The addresses of the pods in the maps pinned under `pins`, read from outside the agent that
/// keeps them (by an operator's tool or a benchmark, while the agent runs).
pub fn mapped_addrs(pins: &Path) -> Result<BTreeSet<IpAddr>, DatapathError> {
    let data = MapData::from_pin(maps_dir(pins).join("PODS_BY_ADDR"))
        .map_err(|source| map_error("PODS_BY_ADDR", "open the pin of", source))?;
    let map: HashMap<MapData, Addr, PodEntry> = HashMap::try_from(Map::HashMap(data))
        .map_err(|source| map_error("PODS_BY_ADDR", "open the pin of", source))?;
    map.keys()
        .map(|addr| addr.map(IpAddr::from))
        .collect::<Result<_, _>>()
        .map_err(|source| map_error("PODS_BY_ADDR", "read", source))
}

/// Removes the pinned maps of other layouts, which no program uses any more.
fn remove_other_layouts(pins: &Path, current: &Path) {
    let Ok(entries) = fs::read_dir(pins) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if path != current && name.to_string_lossy().starts_with("maps-v") {
            log::info!("removing maps of an older layout: {}", path.display());
            remove_known(&path, &MAPS, &mut Vec::new());
        }
    }
}

/// What [`uninstall`] removed and what it left.
#[derive(Debug, Default)]
pub struct Uninstalled {
    pub removed: Vec<PathBuf>,
    /// Entries under the pin directory that are not the agent's, left in place.
    pub left: Vec<PathBuf>,
}

/// Detaches the datapath by removing its pins under `pins`: the links (which detaches the cgroup
/// programs) and the maps (which frees them and detaches sk_msg). Nothing else is touched, and
/// anything unexpected under `pins` is left and reported. A missing `pins` is not an error.
pub fn uninstall(pins: &Path) -> Result<Uninstalled, DatapathError> {
    let mut report = Uninstalled::default();
    if !pins.exists() {
        return Ok(report);
    }
    let entries = fs::read_dir(pins).map_err(|source| DatapathError::Pin {
        path: pins.to_path_buf(),
        source,
    })?;
    let mut names = entries
        .map(|entry| entry.map(|entry| entry.file_name().to_string_lossy().into_owned()))
        .collect::<Result<Vec<String>, io::Error>>()
        .map_err(|source| DatapathError::Pin {
            path: pins.to_path_buf(),
            source,
        })?;
    // Links first, so the programs stop running before their maps go.
    names.sort_by_key(|name| !(name == "links" || name == NETNS_LINKS));
    for name in names {
        let path = pins.join(&name);
        if name == "links" || name == NETNS_LINKS {
            detach_pinned_links(&path);
        }
        if name == "links" {
            report
                .left
                .extend(remove_known(&path, &CGROUP_PROGRAMS, &mut report.removed));
        } else if name == NETNS_LINKS {
            report.left.extend(remove_matching(
                &path,
                |name| netns_link_cookie(name).is_some(),
                &mut report.removed,
            ));
        } else if name.starts_with("maps-v") {
            report
                .left
                .extend(remove_known(&path, &MAPS, &mut report.removed));
        } else {
            report.left.push(path);
        }
    }
    if report.left.is_empty() {
        fs::remove_dir(pins).map_err(|source| DatapathError::Pin {
            path: pins.to_path_buf(),
            source,
        })?;
        report.removed.push(pins.to_path_buf());
    }
    Ok(report)
}

/// Removes the entries of `dir` named in `known`, then `dir` if it is empty. Returns what it left.
fn remove_known(dir: &Path, known: &[&str], removed: &mut Vec<PathBuf>) -> Vec<PathBuf> {
    remove_matching(
        dir,
        |name| known.iter().any(|known| name == *known),
        removed,
    )
}

/// Removes the entries of `dir` whose names `ours` accepts, then `dir` if it is empty. Returns
/// what it left.
fn remove_matching(
    dir: &Path,
    ours: impl Fn(&std::ffi::OsStr) -> bool,
    removed: &mut Vec<PathBuf>,
) -> Vec<PathBuf> {
    let mut left = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return vec![dir.to_path_buf()];
    };
    let mut paths: Vec<PathBuf> = entries.flatten().map(|entry| entry.path()).collect();
    paths.sort();
    for path in paths {
        if path.file_name().is_some_and(&ours) && fs::remove_file(&path).is_ok() {
            removed.push(path);
        } else {
            left.push(path);
        }
    }
    if left.is_empty() && fs::remove_dir(dir).is_ok() {
        removed.push(dir.to_path_buf());
    } else if left.is_empty() {
        left.push(dir.to_path_buf());
    }
    left
}

/// The namespace cookie a pin under `netns/` is named after, if it is one of ours.
fn netns_link_cookie(name: &std::ffi::OsStr) -> Option<u64> {
    name.to_str()?.parse().ok()
}

/// Removes a pin; one already gone is fine.
/// Detaches every link pinned in `dir` (see [`detach_pinned_link`]).
fn detach_pinned_links(dir: &Path) {
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        detach_pinned_link(&entry.path());
    }
}

/// Detaches the link pinned at `pin` before its pin is removed. Removing the pin alone drops the
/// kernel's reference in a deferred work item, so the program would still run for a moment after
/// `uninstall` returned, or for as long as any other process holds the link. A failure is logged
/// and left to the pin's removal.
fn detach_pinned_link(pin: &Path) {
    let detached = sys::obj_get(pin).and_then(sys::link_detach);
    match detached {
        Ok(()) => {}
        Err(error) if error.kind() == ErrorKind::NotFound => {}
        Err(error) => log::warn!(
            "cannot detach the link pinned at {}: {error}; removing its pin, which detaches it \
             once nothing else holds it",
            pin.display()
        ),
    }
}

fn remove_pin(pin: &Path) -> Result<(), DatapathError> {
    match fs::remove_file(pin) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Pin {
            path: pin.to_path_buf(),
            source,
        }),
    }
}

fn create_dir(dir: &Path) -> Result<(), DatapathError> {
    match fs::create_dir(dir) {
        Ok(()) => Ok(()),
        Err(error) if error.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(DatapathError::Pin {
            path: dir.to_path_buf(),
            source,
        }),
    }
}

/// A program of a loaded object, typed.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::NotInObject {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| program_error(name, "use it as its kind", source))
}

/// Takes a map out of a loaded object, typed.
fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, DatapathError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::NotInObject { kind: "map", name })?;
    M::try_from(map).map_err(|source| map_error(name, "open with the expected types", source))
}

/// Keeps the verifier log of a refused program in sight; other load failures keep their cause.
fn load_error(program: &'static str, error: ProgramError) -> DatapathError {
    match error {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => DatapathError::ProgramRejected {
            program,
            io_error,
            verifier_log: verifier_log.to_string(),
        },
        source => program_error(program, "load", source),
    }
}

fn program_error(
    program: &'static str,
    action: &'static str,
    source: ProgramError,
) -> DatapathError {
    DatapathError::Program {
        program,
        action,
        source,
    }
}

fn map_error(map: &'static str, action: &'static str, source: MapError) -> DatapathError {
    DatapathError::Map {
        map,
        action: action.to_owned(),
        source,
    }
}

/// A removal that found nothing to remove has done its job all the same.
fn absent_is_fine(removal: Result<(), MapError>) -> Result<(), MapError> {
    match removal {
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(syscall)) if syscall.io_error.kind() == ErrorKind::NotFound => {
            Ok(())
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn range_rules_match_scope_and_kind_in_full_then_the_range() {
        let scope = Addr::from(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)));
        let net: IpNet = "192.168.1.77/24".parse().expect("cidr");
        let (bits, rule) = cidr_key(scope, cidr_rule::EXCLUDED, &net);
        assert_eq!(bits, CidrRule::FIXED_BITS + 96 + 24);
        assert_eq!(
            IpAddr::from(rule.addr),
            IpAddr::V4(Ipv4Addr::new(192, 168, 1, 0)),
            "host bits are cleared"
        );
        let v6: IpNet = "fd00::/8".parse().expect("cidr");
        assert_eq!(
            cidr_key(scope, cidr_rule::INCLUDED, &v6).0,
            CidrRule::FIXED_BITS + 8
        );
    }

    #[test]
    fn a_scope_gets_one_rule_per_port_and_range() {
        let scope = Addr::UNSPECIFIED;
        let exclusions = Exclusions {
            inbound_ports: [9090].into(),
            outbound_ports: [9090, 5432].into(),
            outbound_ip_ranges: ["10.0.0.0/8".parse().expect("cidr")].into(),
            outbound_ip_range_inclusions: BTreeSet::new(),
        };
        let rules = Rules::of(scope, &exclusions, &[15904].into());
        assert_eq!(rules.ports.len(), 4);
        assert_eq!(rules.cidrs.len(), 1);
        assert!(rules.ports.contains(&PortRule {
            scope,
            port: 15904,
            kind: port_rule::PROBE
        }));
    }
}
