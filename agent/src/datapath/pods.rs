//! The pods in the maps: their entries, their exclusion rules and the node's, and the addresses
//! whose early probes are counted. Every update is a diff against what is installed, so that a
//! restarted agent picks up where the last one left off.

use std::{collections::BTreeSet, io::ErrorKind, net::IpAddr};

use aya::maps::{MapError, lpm_trie::Key as LpmKey};
use ipnet::IpNet;
use probe_bypass_common::{
    Addr, CidrRule, Config, PodEntry, PodName, PortRule, RULE_PRESENT, cidr_rule, names, port_rule,
};

use super::{
    Datapath, DatapathError, PodRules, ProbeBypass, Settings,
    error::{absent_is_fine, map_error},
};
use crate::exclusions::Exclusions;

/// The flag of a map update that adds a key only if it is not there yet (`BPF_NOEXIST`).
const BPF_NOEXIST: u64 = 1;

/// Rules of one scope (a pod, or the node), as installed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(super) struct Rules {
    ports: BTreeSet<PortRule>,
    cidrs: BTreeSet<(u32, CidrRule)>,
}

impl Rules {
    pub(super) fn of(scope: Addr, exclusions: &Exclusions, probe_ports: &BTreeSet<u16>) -> Self {
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
pub(super) struct Installed {
    addrs: BTreeSet<Addr>,
    pub(super) netns_cookie: u64,
    rules: Rules,
}

impl Datapath {
    /// Reads back what an earlier agent left in the pinned maps, so that updates are diffs.
    pub(super) fn adopt(&mut self) -> Result<(), DatapathError> {
        for entry in self.pods_by_addr.iter() {
            let (addr, pod) =
                entry.map_err(|source| map_error(names::PODS_BY_ADDR, "read", source))?;
            let installed = self.pods.entry(pod.id).or_default();
            installed.addrs.insert(addr);
            installed.netns_cookie = pod.netns_cookie;
        }
        let ports = self
            .port_rules
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| map_error(names::PORT_RULES, "read", source))?;
        for rule in ports {
            self.rules_of(rule.scope).ports.insert(rule);
        }
        let cidrs = self
            .cidr_rules
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| map_error(names::CIDR_RULES, "read", source))?;
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
            .map_err(|source| map_error(names::EARLY_PROBES, "read", source))?;
        // A dependent whose pod is no longer in the maps went while no agent ran.
        let dependents = self
            .dependents
            .keys()
            .collect::<Result<Vec<_>, _>>()
            .map_err(|source| map_error(names::DEPENDENTS, "read", source))?;
        for id in dependents {
            if !self.pods.contains_key(&id) {
                absent_is_fine(self.dependents.remove(&id))
                    .map_err(|source| map_error(names::DEPENDENTS, "remove", source))?;
            }
        }
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
    pub(super) fn apply_settings(&mut self, settings: Settings) -> Result<(), DatapathError> {
        let mut flags = 0;
        let (mut kubelet_cgroup_id, mut kubelet_cgroup_level) = (0, 0);
        match &settings.probe_bypass {
            ProbeBypass::Host | ProbeBypass::KubeletNotFound(_) => {}
            ProbeBypass::Any => flags |= Config::PROBE_BYPASS_FROM_ANY,
            ProbeBypass::Kubelet(kubelet) => {
                flags |= Config::PROBE_BYPASS_FROM_KUBELET;
                (kubelet_cgroup_id, kubelet_cgroup_level) = (kubelet.id, kubelet.level);
            }
        }
        if settings.sk_msg {
            flags |= Config::SK_MSG;
        }
        let config = Config {
            proxy_uid: settings.proxy_uid,
            inbound_port: settings.inbound_port,
            outbound_port: settings.outbound_port,
            flags,
            kubelet_cgroup_level,
            kubelet_cgroup_id,
        };
        self.config
            .set(0, config, 0)
            .map_err(|source| map_error(names::CONFIG, "write", source))?;
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
                .map_err(|source| map_error(names::PODS_BY_ADDR, "insert", source))?;
        }
        self.pods_by_netns
            .insert(pod.netns_cookie, entry, 0)
            .map_err(|source| map_error(names::PODS_BY_NETNS, "insert", source))?;
        self.record_dependent(id, pod.dependent.as_deref())?;
        for stale in current.addrs.difference(&addrs) {
            absent_is_fine(self.pods_by_addr.remove(stale))
                .map_err(|source| map_error(names::PODS_BY_ADDR, "remove", source))?;
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
                .map_err(|source| map_error(names::PODS_BY_ADDR, "remove", source))?;
        }
        self.remove_netns_entry(current.netns_cookie, id)?;
        self.record_dependent(id, None)?;
        self.detach_netns(current.netns_cookie)?;
        self.sync_rules(&current.rules, &Rules::default())
    }

    /// Records pod `id` as a dependent named `name`, or, with `None`, as none.
    fn record_dependent(&mut self, id: Addr, name: Option<&str>) -> Result<(), DatapathError> {
        match name {
            Some(name) => {
                let value = PodName::new(name);
                self.dependents
                    .insert(id, value, 0)
                    .map_err(|source| map_error(names::DEPENDENTS, "insert", source))
            }
            None => absent_is_fine(self.dependents.remove(&id))
                .map_err(|source| map_error(names::DEPENDENTS, "remove", source)),
        }
    }

    /// Removes a namespace's entry if it still belongs to pod `id` (a new pod may have its cookie).
    fn remove_netns_entry(&mut self, cookie: u64, id: Addr) -> Result<(), DatapathError> {
        match self.pods_by_netns.get(&cookie, 0) {
            Ok(entry) if entry.id == id => absent_is_fine(self.pods_by_netns.remove(&cookie))
                .map_err(|source| map_error(names::PODS_BY_NETNS, "remove", source)),
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
                .map_err(|source| map_error(names::EARLY_PROBES, "remove", source))?;
        }
        for addr in wanted.difference(&self.early_addrs) {
            match self.early_probes.insert(addr, 0, BPF_NOEXIST) {
                Ok(()) => {}
                Err(MapError::SyscallError(syscall))
                    if syscall.io_error.kind() == ErrorKind::AlreadyExists => {}
                Err(source) => return Err(map_error(names::EARLY_PROBES, "insert", source)),
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
            Err(source) => return Err(map_error(names::EARLY_PROBES, "read", source)),
        };
        absent_is_fine(self.early_probes.remove(&key))
            .map_err(|source| map_error(names::EARLY_PROBES, "remove", source))?;
        self.early_addrs.remove(&key);
        Ok(probes)
    }

    /// Adds the rules in `wanted` and then removes those only in `current`.
    fn sync_rules(&mut self, current: &Rules, wanted: &Rules) -> Result<(), DatapathError> {
        for rule in &wanted.ports {
            self.port_rules
                .insert(rule, RULE_PRESENT, 0)
                .map_err(|source| map_error(names::PORT_RULES, "insert", source))?;
        }
        for (bits, rule) in &wanted.cidrs {
            self.cidr_rules
                .insert(&LpmKey::new(*bits, *rule), RULE_PRESENT, 0)
                .map_err(|source| map_error(names::CIDR_RULES, "insert", source))?;
        }
        for rule in current.ports.difference(&wanted.ports) {
            absent_is_fine(self.port_rules.remove(rule))
                .map_err(|source| map_error(names::PORT_RULES, "remove", source))?;
        }
        for (bits, rule) in current.cidrs.difference(&wanted.cidrs) {
            absent_is_fine(self.cidr_rules.remove(&LpmKey::new(*bits, *rule)))
                .map_err(|source| map_error(names::CIDR_RULES, "remove", source))?;
        }
        Ok(())
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
