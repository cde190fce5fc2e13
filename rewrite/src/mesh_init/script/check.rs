//! What the script's final chains mean, rule by rule: each rule is one the datapath does (the
//! fixed ones), an exclusion to carry, or a [`Finding`].

use std::net::IpAddr;

use ipnet::IpNet;

use super::{Carried, Chains, Finding, Mesh, Rule};
use crate::contract::{
    HEALTHCHECK_PORT, LIVENESS_PROBE_PORT, PROXY_METRICS_PORT, PROXY_UID, READINESS_PROBE_PORT,
    STARTUP_PROBE_PORT,
};

/// The proxy's admin port: the injector lets connections to it through, in a rule placed after
/// the redirect that catches every connection first, so it never matches.
const PROXY_ADMIN_PORT: &str = "15000";

/// The ports the injector's fixed rules leave alone on the way in, in the order it writes them.
const PROBE_PORTS: [u16; 5] = [
    PROXY_METRICS_PORT,
    LIVENESS_PROBE_PORT,
    READINESS_PROBE_PORT,
    STARTUP_PROBE_PORT,
    HEALTHCHECK_PORT,
];

/// The meaning of the final chains, rule by rule.
pub(super) struct Check<'n> {
    pub(super) names: &'n Chains,
    pub(super) mesh: Mesh,
    pub(super) carried: Carried,
    pub(super) findings: Vec<Finding>,
}

impl Check<'_> {
    pub(super) fn bad(&mut self, line: &str, why: impl Into<String>) {
        self.findings.push(Finding {
            rule: line.to_owned(),
            missing: false,
            why: why.into(),
        });
    }

    fn missing(&mut self, rule: String, why: impl Into<String>) {
        self.findings.push(Finding {
            rule,
            missing: true,
            why: why.into(),
        });
    }

    pub(super) fn not_injectors(&self) -> String {
        format!(
            "which {} does not write, so what it does cannot be carried over",
            self.mesh.injector()
        )
    }

    fn unknown(&mut self, rule: &Rule<'_>) {
        let why = format!("is not a rule {}", self.not_injectors());
        self.bad(rule.line, why);
    }

    /// `builtin` holds one rule: the jump to the mesh's `target` chain for TCP.
    pub(super) fn jump(&mut self, builtin: &str, target: &str, rules: &[&Rule<'_>]) {
        let mut jumped = false;
        for rule in rules {
            match rule.spec.as_slice() {
                ["-p", "tcp", "-j", to] if to == &target && !jumped => jumped = true,
                [
                    "-p",
                    "tcp",
                    "-o",
                    "lo",
                    "-d",
                    "127.0.0.1/32",
                    "-m",
                    "owner",
                    "--uid-owner",
                    _,
                    "-j",
                    "DNAT",
                    "--to-destination",
                    _,
                ] => self.bad(
                    rule.line,
                    "sends the proxy's connections to 127.0.0.1 to the pod's IP instead \
                     (MeshConfig sidecar.localProxyMode: PodIP); the datapath leaves them on \
                     loopback",
                ),
                _ => self.unknown(rule),
            }
        }
        if !jumped {
            self.missing(
                format!("-A {builtin} -p tcp -j {target}"),
                format!(
                    "without it the script's {target} rules apply to nothing; the datapath's apply"
                ),
            );
        }
    }

    /// `chain` redirects TCP to `port`, the proxy's `direction` port.
    pub(super) fn redirect(
        &mut self,
        chain: &str,
        port: u16,
        direction: &str,
        rules: &[&Rule<'_>],
    ) {
        let mut redirected = false;
        for rule in rules {
            match rule.spec.as_slice() {
                [
                    "-p",
                    "tcp",
                    "-j",
                    "REDIRECT",
                    "--to-port" | "--to-ports",
                    to,
                ] if !redirected => {
                    redirected = true;
                    if to.parse::<u16>() == Ok(port) {
                        if direction == "outbound" {
                            self.carried.outbound_port = port;
                        }
                    } else {
                        self.bad(
                            rule.line,
                            format!(
                                "redirects {direction} connections to port {to}; the datapath \
                                 sends them to {port}, the proxy's {direction} port"
                            ),
                        );
                    }
                }
                // After the redirect, which catches every TCP connection: never reached.
                ["-p", "tcp", "--dport", PROXY_ADMIN_PORT, "-j", "ACCEPT"]
                    if redirected && direction == "outbound" => {}
                _ => self.unknown(rule),
            }
        }
        if !redirected {
            self.missing(
                format!("-A {chain} -p tcp -j REDIRECT --to-port {port}"),
                format!(
                    "the script sends no {direction} connection to the proxy; the datapath does"
                ),
            );
        }
    }

    pub(super) fn inbound(&mut self, rules: &[&Rule<'_>]) {
        let (chain, in_redirect) = (self.names.inbound.clone(), self.names.in_redirect.clone());
        let mut probe_ports = Vec::new();
        let mut caught = false;
        for rule in rules {
            if caught {
                self.bad(rule.line, AFTER_CATCH_ALL);
                continue;
            }
            if let Some(list) = returned_ports(&rule.spec) {
                match list.parse::<u16>() {
                    Ok(port) if PROBE_PORTS.contains(&port) => probe_ports.push(port),
                    _ => {
                        if let Some(ports) = self.ports(rule, list) {
                            push_new(&mut self.carried.inbound_ports, ports);
                        }
                    }
                }
                continue;
            }
            match rule.spec.as_slice() {
                ["-i", interface, "-j", "RETURN"] => self.interface(rule, interface),
                ["-p", "tcp", "-j", to] if to == &in_redirect => caught = true,
                _ => self.unknown(rule),
            }
        }
        for port in PROBE_PORTS.into_iter().filter(|p| !probe_ports.contains(p)) {
            self.missing(
                format!("-A {chain} -p tcp --dport {port} -j RETURN"),
                format!(
                    "the script sends port {port} to the proxy; the datapath lets the kubelet past it"
                ),
            );
        }
        if !caught {
            self.missing(
                format!("-A {chain} -p tcp -j {in_redirect}"),
                "the script sends no inbound connection to the proxy; the datapath does",
            );
        }
    }

    pub(super) fn outbound(&mut self, rules: &[&Rule<'_>]) {
        let (chain, in_redirect) = (self.names.outbound.clone(), self.names.in_redirect.clone());
        let out_redirect = self.names.out_redirect.clone();
        // The fixed rules that keep the proxy's own and loopback connections from the proxy.
        let fixed = [
            format!("-o lo ! -d 127.0.0.1/32 -m owner --uid-owner {PROXY_UID} -j {in_redirect}"),
            format!("-o lo -m owner ! --uid-owner {PROXY_UID} -j RETURN"),
            format!("-m owner --uid-owner {PROXY_UID} -j RETURN"),
            "-d 127.0.0.1/32 -j RETURN".to_owned(),
        ];
        let mut seen = [false; 4];
        let mut including = false;
        let mut last = false;
        for rule in rules {
            if last {
                self.bad(rule.line, AFTER_CATCH_ALL);
                continue;
            }
            if let Some(list) = returned_ports(&rule.spec) {
                if including {
                    self.bad(rule.line, EXCLUSION_AFTER_INCLUSION);
                } else if let Some(ports) = self.ports(rule, list) {
                    push_new(&mut self.carried.outbound_ports, ports);
                }
                continue;
            }
            match rule.spec.as_slice() {
                [
                    "-o",
                    "lo",
                    "!",
                    "-d",
                    "127.0.0.1/32",
                    "-m",
                    "owner",
                    "--uid-owner",
                    uid,
                    "-j",
                    to,
                ] if to == &in_redirect => self.fixed(rule, &mut seen, 0, uid),
                [
                    "-o",
                    "lo",
                    "-m",
                    "owner",
                    "!",
                    "--uid-owner",
                    uid,
                    "-j",
                    "RETURN",
                ] => {
                    self.fixed(rule, &mut seen, 1, uid);
                }
                ["-m", "owner", "--uid-owner", uid, "-j", "RETURN"] => {
                    self.fixed(rule, &mut seen, 2, uid);
                }
                ["-d", "127.0.0.1/32", "-j", "RETURN"] => seen[3] = true,
                ["-o", interface, "-j", "RETURN"] => self.interface(rule, interface),
                ["-d", ranges, "-j", "RETURN"] => {
                    if including {
                        self.bad(rule.line, EXCLUSION_AFTER_INCLUSION);
                    } else if let Some(ranges) = self.ranges(rule, ranges) {
                        push_new(&mut self.carried.outbound_ip_ranges, ranges);
                    }
                }
                ["-d", ranges, "-j", to] if to == &out_redirect => {
                    including = true;
                    self.before_fixed(rule, &seen);
                    if let Some(ranges) = self.ranges(rule, ranges) {
                        push_new(&mut self.carried.outbound_ip_range_inclusions, ranges);
                    }
                }
                ["-j", to] if to == &out_redirect => {
                    last = true;
                    self.before_fixed(rule, &seen);
                    if including {
                        self.bad(
                            rule.line,
                            "sends every other connection to the proxy too, so the inclusion \
                             rules before it narrow nothing; the datapath's inclusion list would",
                        );
                    }
                }
                ["-j", "RETURN"] => {
                    last = true;
                    if !including {
                        self.bad(
                            rule.line,
                            "sends no outbound connection to the proxy; the datapath sends them \
                             all",
                        );
                    }
                }
                _ => self.unknown(rule),
            }
        }
        for (rule, seen) in fixed.iter().zip(seen) {
            if !seen {
                self.missing(
                    format!("-A {chain} {rule}"),
                    "the datapath keeps the proxy's own and loopback connections from the proxy \
                     as this rule does",
                );
            }
        }
        if !last {
            self.missing(
                format!("-A {chain} -j {out_redirect}"),
                "the script sends no outbound connection to the proxy; the datapath does",
            );
        }
    }

    /// Fixed rule `index` of the outbound chain, which names the proxy by `uid`.
    fn fixed(&mut self, rule: &Rule<'_>, seen: &mut [bool; 4], index: usize, uid: &str) {
        seen[index] = true;
        if uid.parse::<u32>() != Ok(PROXY_UID) {
            self.bad(
                rule.line,
                format!("names the proxy by UID {uid}; the datapath's proxy is UID {PROXY_UID}"),
            );
        }
    }

    /// An inclusion or catch-all rule before the fixed rules would send the proxy's own
    /// connections back to it.
    fn before_fixed(&mut self, rule: &Rule<'_>, seen: &[bool; 4]) {
        if !seen.iter().all(|seen| *seen) {
            self.bad(
                rule.line,
                "comes before the rules that keep the proxy's own and loopback connections from \
                 the proxy; the datapath applies those first",
            );
        }
    }

    fn interface(&mut self, rule: &Rule<'_>, interface: &str) {
        self.bad(
            rule.line,
            format!(
                "leaves interface {interface} out of interception (MeshConfig \
                 traffic.networkInterfaceExclusionList); the datapath has no interface exclusion"
            ),
        );
    }

    /// The ports of a `--dport` or `--dports` value, or `None` with a finding.
    fn ports(&mut self, rule: &Rule<'_>, list: &str) -> Option<Vec<u16>> {
        let mut ports = Vec::new();
        for item in list.split(',') {
            match item.parse::<u16>() {
                Ok(port) if port != 0 => ports.push(port),
                _ if item.contains(':') => {
                    self.bad(
                        rule.line,
                        format!(
                            "names the port range {item}; the exclusion annotations name single ports"
                        ),
                    );
                    return None;
                }
                _ => {
                    self.bad(rule.line, format!("names {item:?}, which is not a port"));
                    return None;
                }
            }
        }
        Some(ports)
    }

    /// The ranges of a `-d` value, or `None` with a finding.
    fn ranges(&mut self, rule: &Rule<'_>, list: &str) -> Option<Vec<IpNet>> {
        let mut ranges = Vec::new();
        for item in list.split(',') {
            match item.parse::<IpNet>() {
                Ok(range) => ranges.push(range.trunc()),
                Err(_) => match item.parse::<IpAddr>() {
                    Ok(address) => ranges.push(IpNet::from(address)),
                    Err(_) => {
                        self.bad(
                            rule.line,
                            format!("names {item:?}, which is not an address range"),
                        );
                        return None;
                    }
                },
            }
        }
        Some(ranges)
    }
}

pub(super) const AFTER_CATCH_ALL: &str = "comes after the chain's last rule, which every connection matches \
                               first; the datapath would apply it";

pub(super) const EXCLUSION_AFTER_INCLUSION: &str = "comes after an inclusion rule, so it excludes nothing \
                                         inside the included ranges; the datapath's exclusions \
                                         apply there too";

/// The ports of a rule that lets TCP to them skip the proxy: `-p tcp --dport <port> -j RETURN`
/// or `-p tcp --match multiport --dports <ports> -j RETURN`.
fn returned_ports<'a>(spec: &[&'a str]) -> Option<&'a str> {
    match spec {
        [
            "-p",
            "tcp",
            "--dport" | "--destination-port",
            ports,
            "-j",
            "RETURN",
        ]
        | [
            "-p",
            "tcp",
            "--match" | "-m",
            "multiport",
            "--dports" | "--destination-ports",
            ports,
            "-j",
            "RETURN",
        ] => Some(ports),
        _ => None,
    }
}

fn push_new<T: PartialEq>(list: &mut Vec<T>, items: Vec<T>) {
    for item in items {
        if !list.contains(&item) {
            list.push(item);
        }
    }
}
