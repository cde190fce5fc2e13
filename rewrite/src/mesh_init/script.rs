//! The mesh's iptables init container script, read rule by rule to decide whether the datapath can
//! take its place, and what of it must be carried onto the pod.
//!
//! FSM's and OSM's injectors (`pkg/injector/iptables.go`, `GenerateIptablesCommands` /
//! `generateIptablesCommands`) write one shell script, `iptables-restore --noflush <<EOF ... EOF`,
//! whose `*nat` table has four chains of their own (`FSM_PROXY_INBOUND`, `FSM_PROXY_IN_REDIRECT`,
//! `FSM_PROXY_OUTBOUND`, `FSM_PROXY_OUT_REDIRECT`; `OSM_` for OSM) and jumps to them from
//! `PREROUTING` and `OUTPUT`. Its fixed rules are what the datapath does
//! (`tests/fixtures/fsm-init.iptables`); its other rules come from the pod's annotations and the
//! MeshConfig, and the datapath does them too when they are exclusions:
//!
//! | rule | carried as |
//! |---|---|
//! | `-I <P>_PROXY_INBOUND -p tcp --match multiport --dports <ports> -j RETURN` | inbound ports |
//! | `-A <P>_PROXY_OUTBOUND -d <cidr> -j RETURN` | outbound IP ranges excluded |
//! | `-A <P>_PROXY_OUTBOUND -p tcp --match multiport --dports <ports> -j RETURN` | outbound ports |
//! | `-A <P>_PROXY_OUTBOUND -d <cidr> -j <P>_PROXY_OUT_REDIRECT`, then `-j RETURN` last | outbound IP ranges included |
//!
//! The chains are built as iptables-restore builds them (`-A` appends, `-I` inserts) and then
//! read in their final order, because order is meaning: an exclusion after an inclusion rule, or
//! any rule after a chain's catch-all, does not do what the same rule does in its place. Every
//! rule that is not of these shapes is a [`Finding`], and so is a fixed rule the script lacks;
//! one finding keeps the mesh's init container in the pod. That covers, among others, the
//! MeshConfig's network interface exclusions (`-i`/`-o <iface> -j RETURN`), a proxy UID other
//! than 1500, redirects to ports other than 15003 and 15001, `localProxyMode: PodIP`'s DNAT, other
//! tables, chains and targets, and any shell command but iptables.

mod check;

use std::{collections::BTreeMap, fmt};

use ipnet::IpNet;

use self::check::Check;
use super::Mesh;
use crate::contract::{PROXY_INBOUND_PORT, PROXY_OUTBOUND_PORT};

/// What a script the datapath can take over applied beyond the datapath's fixed rules: its
/// exclusions, each list in the order the script names it, without repeats.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Carried {
    pub inbound_ports: Vec<u16>,
    pub outbound_ports: Vec<u16>,
    /// Host bits cleared, as iptables reads them.
    pub outbound_ip_ranges: Vec<IpNet>,
    pub outbound_ip_range_inclusions: Vec<IpNet>,
    /// Where the script sends outbound connections: the proxy's outbound port.
    pub outbound_port: u16,
}

/// A rule of the script the datapath cannot do as the script does, or a rule it lacks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// The rule as the script writes it (trimmed), or, when `missing`, as it would be written.
    pub rule: String,
    /// True when the script lacks the rule.
    pub missing: bool,
    /// What the rule does that the datapath does not (or the reverse).
    pub why: String,
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self { rule, missing, why } = self;
        if *missing {
            write!(f, "the script lacks `{rule}`: {why}")
        } else {
            write!(f, "rule `{rule}` {why}")
        }
    }
}

/// What the script comes to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reading {
    /// Every rule is one the datapath does: the exclusions to carry.
    Carried(Carried),
    /// Not the injector's iptables script at all (why).
    NotIptables(String),
    /// Rules the datapath cannot do as the script does.
    Inexpressible(Vec<Finding>),
}

/// Reads the script `mesh`'s injector wrote into its init container.
pub fn read(script: &str, mesh: Mesh) -> Reading {
    let parsed = match parse(script) {
        Ok(parsed) => parsed,
        Err(why) => return Reading::NotIptables(why),
    };
    let names = Chains::of(mesh);
    if !parsed
        .chains
        .iter()
        .any(|(_, chain, _)| *chain == names.inbound)
    {
        return Reading::NotIptables(format!(
            "its rules do not declare {}, the chain {} names its rules by",
            names.inbound,
            mesh.injector()
        ));
    }
    let mut check = Check {
        names: &names,
        mesh,
        carried: Carried::default(),
        findings: parsed.findings,
    };
    for (table, chain, line) in &parsed.chains {
        if *table != "nat" {
            check.bad(
                line,
                format!("declares a chain in table {table}; {NAT_ONLY}"),
            );
        } else if !names.own().contains(chain) {
            check.bad(
                line,
                format!("declares chain {chain}, {}", check.not_injectors()),
            );
        }
    }
    let mut chains: BTreeMap<&str, Vec<&Rule<'_>>> = BTreeMap::new();
    for rule in &parsed.rules {
        if rule.table != "nat" {
            check.bad(rule.line, format!("is in table {}; {NAT_ONLY}", rule.table));
            continue;
        }
        let list = chains.entry(rule.chain).or_default();
        match rule.insert_at {
            None => list.push(rule),
            Some(position) if (1..=list.len() + 1).contains(&position) => {
                list.insert(position - 1, rule);
            }
            Some(position) => check.bad(
                rule.line,
                format!(
                    "inserts at position {position} of a chain of {} rules, which iptables-restore \
                     refuses",
                    list.len()
                ),
            ),
        }
    }
    let mut take = |chain: &str| chains.remove(chain).unwrap_or_default();
    let (prerouting, output) = (take("PREROUTING"), take("OUTPUT"));
    let (inbound, in_redirect) = (take(names.inbound.as_str()), take(&names.in_redirect));
    let (outbound, out_redirect) = (take(&names.outbound), take(&names.out_redirect));
    check.jump("PREROUTING", &names.inbound, &prerouting);
    check.jump("OUTPUT", &names.outbound, &output);
    check.redirect(
        &names.in_redirect,
        PROXY_INBOUND_PORT,
        "inbound",
        &in_redirect,
    );
    check.redirect(
        &names.out_redirect,
        PROXY_OUTBOUND_PORT,
        "outbound",
        &out_redirect,
    );
    check.inbound(&inbound);
    check.outbound(&outbound);
    for (chain, rules) in chains {
        for rule in rules {
            check.bad(
                rule.line,
                format!("is in chain {chain}, {}", check.not_injectors()),
            );
        }
    }
    let Check {
        carried, findings, ..
    } = check;
    if findings.is_empty() {
        Reading::Carried(carried)
    } else {
        Reading::Inexpressible(findings)
    }
}

pub(super) const NAT_ONLY: &str =
    "the datapath does what the injector's nat rules do, and nothing else";

/// The names of one mesh's chains.
pub(super) struct Chains {
    pub(super) inbound: String,
    pub(super) in_redirect: String,
    pub(super) outbound: String,
    pub(super) out_redirect: String,
}

impl Chains {
    fn of(mesh: Mesh) -> Chains {
        let prefix = mesh.chain_prefix();
        Chains {
            inbound: format!("{prefix}_PROXY_INBOUND"),
            in_redirect: format!("{prefix}_PROXY_IN_REDIRECT"),
            outbound: format!("{prefix}_PROXY_OUTBOUND"),
            out_redirect: format!("{prefix}_PROXY_OUT_REDIRECT"),
        }
    }

    fn own(&self) -> [&str; 4] {
        [
            &self.inbound,
            &self.in_redirect,
            &self.outbound,
            &self.out_redirect,
        ]
    }
}

/// One rule, as `-A`/`-I` gives it, in the script's order.
pub(super) struct Rule<'a> {
    pub(super) table: &'a str,
    pub(super) chain: &'a str,
    /// `-I`'s position (from 1); `None` for `-A`.
    pub(super) insert_at: Option<usize>,
    pub(super) spec: Vec<&'a str>,
    pub(super) line: &'a str,
}

/// The script's rules and chains, before their meaning is looked at.
#[derive(Default)]
struct Parsed<'a> {
    /// (table, chain, line) of every chain the script declares.
    chains: Vec<(&'a str, &'a str, &'a str)>,
    rules: Vec<Rule<'a>>,
    findings: Vec<Finding>,
}

impl<'a> Parsed<'a> {
    fn bad(&mut self, line: &str, why: impl Into<String>) {
        self.findings.push(Finding {
            rule: line.to_owned(),
            missing: false,
            why: why.into(),
        });
    }

    /// A rule line, from `-A`/`-I` on (`tokens`), of `table`.
    fn rule(&mut self, table: &'a str, line: &'a str, tokens: &[&'a str]) {
        let (chain, insert_at, spec) = match tokens {
            ["-A" | "--append", chain, spec @ ..] => (*chain, None, spec),
            ["-I" | "--insert", chain, position, spec @ ..]
                if position.parse::<usize>().is_ok() =>
            {
                (*chain, position.parse().ok(), spec)
            }
            ["-I" | "--insert", chain, spec @ ..] => (*chain, Some(1), spec),
            _ => {
                self.bad(
                    line,
                    "is not a rule the injector writes (it appends with -A and inserts with -I)",
                );
                return;
            }
        };
        self.rules.push(Rule {
            table,
            chain,
            insert_at,
            spec: spec.to_vec(),
            line,
        });
    }

    /// The lines of an iptables-restore input.
    fn restore(&mut self, lines: &[&'a str]) {
        let mut table = None;
        for line in lines.iter().map(|line| line.trim()) {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if let Some(name) = line.strip_prefix('*') {
                table = Some(name);
                continue;
            }
            if line == "COMMIT" {
                table = None;
                continue;
            }
            let Some(table) = table else {
                self.bad(
                    line,
                    "comes before any table (`*nat`), which iptables-restore refuses",
                );
                continue;
            };
            if let Some(declaration) = line.strip_prefix(':') {
                let chain = declaration.split_whitespace().next().unwrap_or_default();
                self.chains.push((table, chain, line));
                continue;
            }
            let tokens: Vec<&str> = line.split_whitespace().collect();
            self.rule(table, line, &tokens);
        }
        if let Some(table) = table {
            self.bad(
                &format!("*{table}"),
                "is never committed (no COMMIT), so iptables-restore applies none of it",
            );
        }
    }

    /// An `iptables` command line.
    fn command(&mut self, line: &'a str, tokens: &[&'a str]) {
        let mut table = "filter";
        let mut rest = tokens.get(1..).unwrap_or_default();
        loop {
            match rest {
                ["-t" | "--table", name, more @ ..] => {
                    table = name;
                    rest = more;
                }
                ["-w" | "--wait", more @ ..] => rest = more,
                _ => break,
            }
        }
        match rest {
            ["-N" | "--new-chain", chain] => self.chains.push((table, chain, line)),
            _ => self.rule(table, line, rest),
        }
    }
}

/// The flags of `iptables-restore` that leave its rules' meaning as written.
const RESTORE_FLAGS: [&str; 6] = ["--noflush", "-n", "--wait", "-w", "--verbose", "-v"];

/// Reads the shell script: `iptables-restore` with a here-document, `iptables` commands, comments,
/// and `set -e`-like lines. Any other command is a finding; a script with no iptables rule at all
/// is not the injector's (`Err`, why).
fn parse(script: &str) -> Result<Parsed<'_>, String> {
    let mut parsed = Parsed::default();
    let lines: Vec<&str> = script.lines().collect();
    let mut index = 0;
    let mut iptables = false;
    while let Some(line) = lines.get(index).map(|line| line.trim()) {
        index += 1;
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let tokens: Vec<&str> = line.split_whitespace().collect();
        match tokens.as_slice() {
            ["iptables-restore", args @ ..] => {
                iptables = true;
                let mut delimiter = None;
                let mut args = args.iter();
                while let Some(arg) = args.next() {
                    if let Some(word) = arg.strip_prefix("<<") {
                        let word = if word.is_empty() {
                            args.next().copied().unwrap_or_default()
                        } else {
                            word
                        };
                        delimiter = Some(word.trim_matches(['\'', '"']));
                    } else if !RESTORE_FLAGS.contains(arg) {
                        parsed.bad(line, format!("passes {arg} to iptables-restore"));
                    }
                }
                let Some(delimiter) = delimiter.filter(|word| !word.is_empty()) else {
                    parsed.bad(
                        line,
                        "reads its rules from outside the script, so what they do is unknown",
                    );
                    continue;
                };
                let start = index;
                let Some(length) = lines[start..]
                    .iter()
                    .position(|line| line.trim() == delimiter)
                else {
                    return Err(format!(
                        "its here-document never ends (no line {delimiter})"
                    ));
                };
                parsed.restore(&lines[start..start + length]);
                index = start + length + 1;
            }
            ["iptables", ..] => {
                iptables = true;
                parsed.command(line, &tokens);
            }
            ["set", flags @ ..]
                if flags.iter().all(|flag| {
                    flag.strip_prefix('-')
                        .is_some_and(|f| !f.is_empty() && f.chars().all(|c| "eux".contains(c)))
                }) => {}
            _ => parsed.bad(
                line,
                "is a shell command other than iptables, which the datapath does not run",
            ),
        }
    }
    if !iptables {
        return Err("it runs no iptables-restore or iptables".to_owned());
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests;
