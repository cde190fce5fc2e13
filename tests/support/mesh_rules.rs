//! The mesh's own iptables rules, as FSM's init container installs them: the fixture of its fixed
//! rules, a pod's exclusions added as FSM adds them, and loading them into a test pod.

use std::{
    fmt, fs,
    io::Write as _,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use ipnet::{IpNet, Ipv4Net};

use crate::pod::TestPod;

/// The mesh's rules, copied from `shared/fixtures` into the repository (CI clones only the repo).
/// This crate is `tests/support`, so the fixtures are a directory up.
pub const FSM_INIT_RULES: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../fixtures/fsm-init.iptables");

/// The final rule of the fixture's outbound chain; FSM adds outbound exclusions before it.
pub const OUTBOUND_CATCH_ALL: &str = "-A FSM_PROXY_OUTBOUND -j FSM_PROXY_OUT_REDIRECT";

/// `--match multiport` takes at most this many ports.
const MULTIPORT_MAX: usize = 15;

/// The mesh's rules (the fixture, as `iptables-restore` input) with a pod's exclusions added the
/// way FSM adds them (see the fixture's header): `inbound_ports` at the head of the inbound chain,
/// `outbound_cidrs` and then `outbound_ports` just before the outbound chain's final catch-all.
/// Ports go [`MULTIPORT_MAX`] to a `multiport` rule, its limit.
pub fn fsm_rules(
    inbound_ports: &[u16],
    outbound_cidrs: &[impl fmt::Display],
    outbound_ports: &[u16],
) -> String {
    let fixture = fs::read_to_string(FSM_INIT_RULES)
        .unwrap_or_else(|error| panic!("read {FSM_INIT_RULES}: {error}"));
    let multiport = |chain: &str, ports: &[u16]| -> Vec<String> {
        ports
            .chunks(MULTIPORT_MAX)
            .map(|chunk| {
                format!(
                    "-A {chain} -p tcp --match multiport --dports {} -j RETURN",
                    comma_list(chunk)
                )
            })
            .collect()
    };
    let inbound = multiport("FSM_PROXY_INBOUND", inbound_ports);
    let mut outbound: Vec<String> = outbound_cidrs
        .iter()
        .map(|cidr| format!("-A FSM_PROXY_OUTBOUND -d {cidr} -j RETURN"))
        .collect();
    outbound.extend(multiport("FSM_PROXY_OUTBOUND", outbound_ports));

    let mut rules = String::new();
    let (mut inbound_placed, mut outbound_placed) = (false, false);
    for line in fixture.lines() {
        if !inbound_placed && line.starts_with("-A FSM_PROXY_INBOUND ") {
            // FSM inserts them (-I) at the head of the inbound chain.
            for rule in &inbound {
                rules.push_str(rule);
                rules.push('\n');
            }
            inbound_placed = true;
        }
        if line == OUTBOUND_CATCH_ALL {
            for rule in &outbound {
                rules.push_str(rule);
                rules.push('\n');
            }
            outbound_placed = true;
        }
        rules.push_str(line);
        rules.push('\n');
    }
    assert!(
        inbound_placed && outbound_placed,
        "{FSM_INIT_RULES} no longer has the chains the exclusions go into"
    );
    rules
}

/// Loads `rules` (`iptables-restore` input) into `pod`'s namespace, replacing the tables they
/// name. The rules go with the namespace.
pub fn load_iptables(pod: &TestPod, rules: &str) {
    let mut restore = Command::new("ip")
        .args(["netns", "exec", &pod.netns_name, "iptables-restore"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run iptables-restore (cargo xtask setup installs iptables)");
    restore
        .stdin
        .take()
        .expect("iptables-restore's stdin")
        .write_all(rules.as_bytes())
        .expect("write the rules");
    let output = restore
        .wait_with_output()
        .expect("wait for iptables-restore");
    assert!(
        output.status.success(),
        "iptables-restore in {}: {}",
        pod.netns_name,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Ports as a comma list, as `--dports` and the mesh's annotations take them.
pub fn comma_list(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Packets (first packets of connections, for a nat rule) through the REDIRECT rule of `chain` in
/// `pod`'s nat table: how a benchmark checks that the connections it made really met the rules.
pub fn redirect_packets(pod: &TestPod, chain: &str) -> u64 {
    let listing = pod.exec(&["iptables", "-t", "nat", "-L", chain, "-n", "-v", "-x"]);
    listing
        .lines()
        .find_map(|line| {
            // `pkts bytes target ...`: the rule's line, not the chain's heading.
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(2) == Some(&"REDIRECT")).then(|| fields[0].parse().ok())?
        })
        .unwrap_or_else(|| panic!("no REDIRECT counter in {chain}:\n{listing}"))
}

/// `n` ports that no benchmark traffic uses: 20000 and up.
pub fn unused_ports(n: usize) -> Vec<u16> {
    (0..n)
        .map(|i| 20_000 + u16::try_from(i).expect("fewer than 45,000 ports"))
        .collect()
}

/// `n` /24s in 10.0.0.0/8, where no benchmark traffic goes (the pods are in 198.18.0.0/15).
pub fn unused_cidrs(n: usize) -> Vec<IpNet> {
    (0..n)
        .map(|i| {
            let [_, _, b, c] = u32::try_from(i)
                .expect("fewer than 65,536 ranges")
                .to_be_bytes();
            IpNet::V4(Ipv4Net::new(Ipv4Addr::new(10, b, c, 0), 24).expect("a /24"))
        })
        .collect()
}

/// The mesh's rules with `n` exclusions of each kind that match no traffic (`n` inbound ports,
/// `n` outbound CIDRs, `n` outbound ports), and how many rules that makes.
pub fn fsm_rules_with_unused(n: usize) -> (String, usize) {
    let rules = fsm_rules(&unused_ports(n), &unused_cidrs(n), &unused_ports(n));
    let count = rules.lines().filter(|line| line.starts_with("-A ")).count();
    (rules, count)
}

/// How many `-A` rules `pod`'s nat table holds.
pub fn nat_rule_count(pod: &TestPod) -> usize {
    pod.exec(&["iptables", "-t", "nat", "-S"])
        .lines()
        .filter(|line| line.starts_with("-A "))
        .count()
}
