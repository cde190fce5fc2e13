//! Traffic that skips the sidecar proxy: the mesh's per-pod exclusion annotations and the node-wide
//! defaults given on the command line.
//!
//! The mesh's init container reads four pod annotations, each with FSM's prefix `flomesh.io/` or
//! OSM's `openservicemesh.io/` (`shared/reference/peers.md` §1, §4), and leaves the traffic they
//! name out of its redirect rules. The datapath that replaces those rules honours the same
//! annotations, with either prefix:
//!
//! | annotation (after the prefix) | value | effect |
//! |---|---|---|
//! | `inbound-port-exclusion-list` | ports | connections to these ports of the pod reach the app directly |
//! | `outbound-port-exclusion-list` | ports | the pod's connections to these ports go out directly |
//! | `outbound-ip-range-exclusion-list` | CIDRs | the pod's connections to these ranges go out directly |
//! | `outbound-ip-range-inclusion-list` | CIDRs | when not empty, only connections to these ranges go through the proxy |
//!
//! Syntax, for the annotations and for the node-wide flags alike:
//!
//! - A value is a comma-separated list; whitespace around each item is ignored
//!   (`"80, 443"` is `80` and `443`).
//! - An empty (or all-whitespace) value is an empty list, the same as no annotation.
//! - An empty item (`"80,,443"`, `"80,"`) is an error, as in the mesh, which rejects it too.
//! - A port is a decimal integer from 1 to 65535.
//! - A range is a CIDR, IPv4 or IPv6, with its prefix length (`10.0.0.0/8`, `fd00::/8`; a single
//!   address is `10.0.0.1/32` or `fd00::1/128`). Host bits are cleared: `10.0.0.1/8` means
//!   `10.0.0.0/8`, as the kernel's routing and iptables read it.
//!
//! A malformed annotation is ignored whole (as if it were absent) and reported as an
//! [`AnnotationError`]; the pod's other annotations, and every other pod, are unaffected. When a
//! pod carries the same annotation under both prefixes, the two lists are merged (their union),
//! so a pod annotated for FSM and for OSM keeps every exclusion either names. Node-wide defaults
//! are merged into every pod's settings the same way ([`Exclusions::union`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
};

use ipnet::IpNet;

use crate::defaults::{
    INBOUND_PORT_EXCLUSION_LIST, MESH_ANNOTATION_PREFIXES, OUTBOUND_IP_RANGE_EXCLUSION_LIST,
    OUTBOUND_IP_RANGE_INCLUSION_LIST, OUTBOUND_PORT_EXCLUSION_LIST,
};

/// The traffic of one pod (or, as node-wide defaults, of every pod) that skips the proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exclusions {
    /// Ports of the pod whose inbound connections reach the app directly.
    pub inbound_ports: BTreeSet<u16>,
    /// Destination ports whose outbound connections go out directly.
    pub outbound_ports: BTreeSet<u16>,
    /// Destination ranges whose outbound connections go out directly (host bits cleared).
    pub outbound_ip_ranges: BTreeSet<IpNet>,
    /// When not empty, the only destination ranges whose outbound connections go through the
    /// proxy; the exclusions above still apply within them (host bits cleared).
    pub outbound_ip_range_inclusions: BTreeSet<IpNet>,
}

impl Exclusions {
    /// Reads the exclusion annotations of a pod (`metadata.annotations`), under both prefixes.
    ///
    /// Returns what the valid annotations say, and one error for each malformed one, which is left
    /// out as if absent. Annotations other than the four exclusion ones are not looked at.
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
    ) -> (Exclusions, Vec<AnnotationError>) {
        let mut exclusions = Exclusions::default();
        let mut errors = Vec::new();
        for setting in Setting::ALL {
            for key in setting.annotation_keys() {
                let Some(value) = annotations.get(&key) else {
                    continue;
                };
                let parsed = match setting {
                    Setting::InboundPorts => {
                        parse_ports(value).map(|ports| exclusions.inbound_ports.extend(ports))
                    }
                    Setting::OutboundPorts => {
                        parse_ports(value).map(|ports| exclusions.outbound_ports.extend(ports))
                    }
                    Setting::OutboundIpRanges => parse_cidrs(value)
                        .map(|ranges| exclusions.outbound_ip_ranges.extend(ranges)),
                    Setting::OutboundIpRangeInclusions => parse_cidrs(value)
                        .map(|ranges| exclusions.outbound_ip_range_inclusions.extend(ranges)),
                };
                if let Err(problem) = parsed {
                    errors.push(AnnotationError {
                        key,
                        value: value.clone(),
                        problem,
                    });
                }
            }
        }
        (exclusions, errors)
    }

    /// These settings merged with `other` (for example the node-wide defaults with a pod's own):
    /// every list is the union of both.
    pub fn union(&self, other: &Exclusions) -> Exclusions {
        let mut merged = self.clone();
        merged.extend(other);
        merged
    }

    /// Adds `other`'s ports and ranges to these.
    pub fn extend(&mut self, other: &Exclusions) {
        self.inbound_ports.extend(&other.inbound_ports);
        self.outbound_ports.extend(&other.outbound_ports);
        self.outbound_ip_ranges
            .extend(other.outbound_ip_ranges.iter().copied());
        self.outbound_ip_range_inclusions
            .extend(other.outbound_ip_range_inclusions.iter().copied());
    }

    /// True when nothing is excluded and no inclusion list narrows the outbound redirect.
    pub fn is_empty(&self) -> bool {
        self == &Exclusions::default()
    }
}

/// One of the four exclusion settings, whatever the prefix of the annotation that gave it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Setting {
    InboundPorts,
    OutboundPorts,
    OutboundIpRanges,
    OutboundIpRangeInclusions,
}

impl Setting {
    pub const ALL: [Setting; 4] = [
        Setting::InboundPorts,
        Setting::OutboundPorts,
        Setting::OutboundIpRanges,
        Setting::OutboundIpRangeInclusions,
    ];

    /// The annotation's name after the mesh prefix, e.g. `inbound-port-exclusion-list`.
    pub fn annotation_suffix(self) -> &'static str {
        match self {
            Setting::InboundPorts => INBOUND_PORT_EXCLUSION_LIST,
            Setting::OutboundPorts => OUTBOUND_PORT_EXCLUSION_LIST,
            Setting::OutboundIpRanges => OUTBOUND_IP_RANGE_EXCLUSION_LIST,
            Setting::OutboundIpRangeInclusions => OUTBOUND_IP_RANGE_INCLUSION_LIST,
        }
    }

    /// The full annotation keys that carry this setting, FSM's first.
    pub fn annotation_keys(self) -> impl Iterator<Item = String> {
        let suffix = self.annotation_suffix();
        MESH_ANNOTATION_PREFIXES
            .into_iter()
            .map(move |prefix| format!("{prefix}{suffix}"))
    }
}

impl fmt::Display for Setting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.annotation_suffix())
    }
}

/// Every annotation key this module reads: the four settings under both prefixes.
pub fn annotation_keys() -> impl Iterator<Item = String> {
    Setting::ALL.into_iter().flat_map(Setting::annotation_keys)
}

/// A pod's exclusion annotation that the agent ignores because its value is malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("annotation {key}={value:?} is ignored: {problem}; the pod's other settings still apply")]
pub struct AnnotationError {
    /// The annotation's full key, e.g. `flomesh.io/outbound-port-exclusion-list`.
    pub key: String,
    /// Its whole value.
    pub value: String,
    /// The first item that is wrong, and why.
    pub problem: ListError,
}

/// Why a comma-separated list of ports or CIDRs is malformed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListError {
    /// Two commas in a row, or a comma at either end.
    #[error("item {position} is empty (a comma too many?)")]
    EmptyItem {
        /// Position of the item in the list, from 1.
        position: usize,
    },
    #[error("{item:?} is not a port number (a decimal integer from 1 to 65535)")]
    NotAPort { item: String },
    #[error("port {item} is outside 1-65535")]
    PortOutOfRange { item: String },
    #[error(
        "{item:?} is not a CIDR range such as 10.0.0.0/8 or fd00::/8 (a single address is written 10.0.0.1/32 or fd00::1/128)"
    )]
    NotACidr { item: String },
}

/// Parses a comma-separated port list, for a node-wide flag; usable as a clap `value_parser`.
pub fn parse_port_list(value: &str) -> Result<BTreeSet<u16>, String> {
    parse_ports(value).map_err(|e| e.to_string())
}

/// Parses a comma-separated CIDR list (host bits cleared), for a node-wide flag; usable as a clap
/// `value_parser`.
pub fn parse_cidr_list(value: &str) -> Result<BTreeSet<IpNet>, String> {
    parse_cidrs(value).map_err(|e| e.to_string())
}

/// Parses a comma-separated list of ports; see the module documentation for the syntax.
pub fn parse_ports(value: &str) -> Result<BTreeSet<u16>, ListError> {
    items(value).map(|item| parse_port(item?)).collect()
}

/// Parses a comma-separated list of CIDRs, clearing host bits; see the module documentation.
pub fn parse_cidrs(value: &str) -> Result<BTreeSet<IpNet>, ListError> {
    items(value)
        .map(|item| {
            let item = item?;
            item.parse::<IpNet>()
                .map(|net| net.trunc())
                .map_err(|_| ListError::NotACidr {
                    item: item.to_owned(),
                })
        })
        .collect()
}

/// The trimmed items of a comma-separated list; none for an empty value, an error for an empty
/// item.
fn items(value: &str) -> impl Iterator<Item = Result<&str, ListError>> {
    let value = value.trim();
    value
        .split(',')
        .filter(move |_| !value.is_empty())
        .enumerate()
        .map(|(index, item)| match item.trim() {
            "" => Err(ListError::EmptyItem {
                position: index + 1,
            }),
            item => Ok(item),
        })
}

fn parse_port(item: &str) -> Result<u16, ListError> {
    match item.parse::<u16>() {
        Ok(port) if port != 0 => Ok(port),
        _ => {
            let digits = item.strip_prefix(['+', '-']).unwrap_or(item);
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
                Err(ListError::PortOutOfRange {
                    item: item.to_owned(),
                })
            } else {
                Err(ListError::NotAPort {
                    item: item.to_owned(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn reads_every_setting_with_fsm_prefix() {
        let (exclusions, errors) = Exclusions::from_annotations(&annotations(&[
            ("flomesh.io/inbound-port-exclusion-list", "8080,9090"),
            ("flomesh.io/outbound-port-exclusion-list", "5432"),
            ("flomesh.io/outbound-ip-range-exclusion-list", "10.0.0.0/8"),
            (
                "flomesh.io/outbound-ip-range-inclusion-list",
                "192.168.0.0/16",
            ),
            ("probe-bypass/netns", "pod-a"),
        ]));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(exclusions.inbound_ports, BTreeSet::from([8080, 9090]));
        assert_eq!(exclusions.outbound_ports, BTreeSet::from([5432]));
        assert_eq!(
            exclusions.outbound_ip_ranges,
            BTreeSet::from([net("10.0.0.0/8")])
        );
        assert_eq!(
            exclusions.outbound_ip_range_inclusions,
            BTreeSet::from([net("192.168.0.0/16")])
        );
    }

    #[test]
    fn reads_every_setting_with_osm_prefix() {
        let (exclusions, errors) = Exclusions::from_annotations(&annotations(&[
            ("openservicemesh.io/inbound-port-exclusion-list", "15010"),
            ("openservicemesh.io/outbound-port-exclusion-list", "53"),
            (
                "openservicemesh.io/outbound-ip-range-exclusion-list",
                "169.254.169.254/32",
            ),
            (
                "openservicemesh.io/outbound-ip-range-inclusion-list",
                "10.96.0.0/12",
            ),
        ]));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(exclusions.inbound_ports, BTreeSet::from([15010]));
        assert_eq!(exclusions.outbound_ports, BTreeSet::from([53]));
        assert_eq!(
            exclusions.outbound_ip_ranges,
            BTreeSet::from([net("169.254.169.254/32")])
        );
        assert_eq!(
            exclusions.outbound_ip_range_inclusions,
            BTreeSet::from([net("10.96.0.0/12")])
        );
    }

    #[test]
    fn both_prefixes_for_one_setting_are_merged() {
        let (exclusions, errors) = Exclusions::from_annotations(&annotations(&[
            ("flomesh.io/outbound-port-exclusion-list", "80,443"),
            (
                "openservicemesh.io/outbound-port-exclusion-list",
                "443,8443",
            ),
        ]));
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(exclusions.outbound_ports, BTreeSet::from([80, 443, 8443]));
    }

    #[test]
    fn no_annotations_and_empty_values_mean_nothing_excluded() {
        let (exclusions, errors) = Exclusions::from_annotations(&BTreeMap::new());
        assert!(exclusions.is_empty() && errors.is_empty());
        let (exclusions, errors) = Exclusions::from_annotations(&annotations(&[
            ("flomesh.io/inbound-port-exclusion-list", ""),
            ("flomesh.io/outbound-ip-range-exclusion-list", "  "),
        ]));
        assert!(exclusions.is_empty(), "{exclusions:?}");
        assert!(errors.is_empty(), "{errors:?}");
    }

    #[test]
    fn whitespace_around_items_is_ignored() {
        assert_eq!(
            parse_ports(" 80 ,\t443,  8080 "),
            Ok(BTreeSet::from([80, 443, 8080]))
        );
        assert_eq!(
            parse_cidrs(" 10.0.0.0/8 , fd00::/8 "),
            Ok(BTreeSet::from([net("10.0.0.0/8"), net("fd00::/8")]))
        );
    }

    #[test]
    fn malformed_ports_are_rejected_with_the_reason() {
        let out_of_range = |item: &str| ListError::PortOutOfRange { item: item.into() };
        assert_eq!(parse_ports("80,0"), Err(out_of_range("0")));
        assert_eq!(parse_ports("70000"), Err(out_of_range("70000")));
        assert_eq!(parse_ports("-1"), Err(out_of_range("-1")));
        assert_eq!(
            parse_ports("99999999999999999999999"),
            Err(out_of_range("99999999999999999999999"))
        );
        assert_eq!(
            parse_ports("80,abc"),
            Err(ListError::NotAPort { item: "abc".into() })
        );
        assert_eq!(
            parse_ports("80-90"),
            Err(ListError::NotAPort {
                item: "80-90".into()
            })
        );
        assert_eq!(
            parse_ports("80,,443"),
            Err(ListError::EmptyItem { position: 2 })
        );
        assert_eq!(
            parse_ports("80,"),
            Err(ListError::EmptyItem { position: 2 })
        );
        assert_eq!(
            parse_ports(",80"),
            Err(ListError::EmptyItem { position: 1 })
        );
        assert_eq!(
            parse_ports("80, ,443"),
            Err(ListError::EmptyItem { position: 2 })
        );
    }

    #[test]
    fn malformed_cidrs_are_rejected_with_the_reason() {
        for bad in [
            "10.0.0.0",
            "10.0.0.0/33",
            "10.0.0/8",
            "fd00::/129",
            "abc",
            "10.0.0.0/-1",
        ] {
            assert_eq!(
                parse_cidrs(&format!("192.168.0.0/16,{bad}")),
                Err(ListError::NotACidr { item: bad.into() }),
                "{bad}"
            );
        }
        assert_eq!(
            parse_cidrs("10.0.0.0/8,"),
            Err(ListError::EmptyItem { position: 2 })
        );
    }

    #[test]
    fn cidr_host_bits_are_cleared_ipv4_and_ipv6() {
        assert_eq!(
            parse_cidrs("10.0.0.1/8,10.1.2.3/8,2001:db8::1/32,fd00::5/128"),
            Ok(BTreeSet::from([
                net("10.0.0.0/8"),
                net("2001:db8::/32"),
                net("fd00::5/128"),
            ]))
        );
    }

    #[test]
    fn only_the_malformed_annotation_is_dropped() {
        let (exclusions, errors) = Exclusions::from_annotations(&annotations(&[
            ("flomesh.io/inbound-port-exclusion-list", "8080"),
            ("flomesh.io/outbound-port-exclusion-list", "443,70000"),
            ("openservicemesh.io/outbound-port-exclusion-list", "5432"),
            ("flomesh.io/outbound-ip-range-exclusion-list", "10.0.0.0/8"),
            (
                "openservicemesh.io/outbound-ip-range-exclusion-list",
                "nope",
            ),
        ]));
        // The valid annotations all apply, the OSM port list included.
        assert_eq!(exclusions.inbound_ports, BTreeSet::from([8080]));
        assert_eq!(exclusions.outbound_ports, BTreeSet::from([5432]));
        assert_eq!(
            exclusions.outbound_ip_ranges,
            BTreeSet::from([net("10.0.0.0/8")])
        );
        // 443 is not kept: a malformed annotation is ignored whole.
        assert!(!exclusions.outbound_ports.contains(&443));
        assert_eq!(
            errors,
            vec![
                AnnotationError {
                    key: "flomesh.io/outbound-port-exclusion-list".into(),
                    value: "443,70000".into(),
                    problem: ListError::PortOutOfRange {
                        item: "70000".into()
                    },
                },
                AnnotationError {
                    key: "openservicemesh.io/outbound-ip-range-exclusion-list".into(),
                    value: "nope".into(),
                    problem: ListError::NotACidr {
                        item: "nope".into()
                    },
                },
            ]
        );
    }

    #[test]
    fn annotation_error_names_key_value_item_and_reason() {
        let (_, errors) = Exclusions::from_annotations(&annotations(&[(
            "flomesh.io/inbound-port-exclusion-list",
            "80,abc",
        )]));
        let message = errors[0].to_string();
        assert_eq!(
            message,
            "annotation flomesh.io/inbound-port-exclusion-list=\"80,abc\" is ignored: \"abc\" is \
             not a port number (a decimal integer from 1 to 65535); the pod's other settings \
             still apply"
        );
    }

    #[test]
    fn union_merges_node_defaults_with_a_pods_own() {
        let node = Exclusions {
            outbound_ports: BTreeSet::from([53]),
            outbound_ip_ranges: BTreeSet::from([net("169.254.169.254/32")]),
            ..Exclusions::default()
        };
        let pod = Exclusions {
            inbound_ports: BTreeSet::from([9090]),
            outbound_ports: BTreeSet::from([53, 5432]),
            outbound_ip_range_inclusions: BTreeSet::from([net("10.0.0.0/8")]),
            ..Exclusions::default()
        };
        let merged = node.union(&pod);
        assert_eq!(merged.inbound_ports, BTreeSet::from([9090]));
        assert_eq!(merged.outbound_ports, BTreeSet::from([53, 5432]));
        assert_eq!(
            merged.outbound_ip_ranges,
            BTreeSet::from([net("169.254.169.254/32")])
        );
        assert_eq!(
            merged.outbound_ip_range_inclusions,
            BTreeSet::from([net("10.0.0.0/8")])
        );
        assert_eq!(merged, pod.union(&node));
    }

    #[test]
    fn flag_parsers_give_a_readable_message() {
        assert_eq!(parse_port_list("22, 53"), Ok(BTreeSet::from([22, 53])));
        assert_eq!(parse_port_list(""), Ok(BTreeSet::new()));
        assert_eq!(
            parse_port_list("22,x"),
            Err("\"x\" is not a port number (a decimal integer from 1 to 65535)".to_owned())
        );
        assert_eq!(
            parse_cidr_list("fd00::1/8"),
            Ok(BTreeSet::from([net("fd00::/8")]))
        );
        let err = parse_cidr_list("10.0.0.1").unwrap_err();
        assert!(err.contains("10.0.0.1/32"), "{err}");
    }

    #[test]
    fn every_annotation_key_under_both_prefixes() {
        let keys: Vec<String> = annotation_keys().collect();
        assert_eq!(keys.len(), 8);
        assert!(keys.contains(&"flomesh.io/outbound-ip-range-inclusion-list".to_owned()));
        assert!(keys.contains(&"openservicemesh.io/inbound-port-exclusion-list".to_owned()));
    }
}
