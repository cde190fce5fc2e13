//! The script reader on scripts shaped as the injectors render them, and on what they do not
//! render.

use super::{
    check::{AFTER_CATCH_ALL, EXCLUSION_AFTER_INCLUSION},
    *,
};

/// The injector's fixed rules, with `inbound` after the inbound ones and `outbound` after the
/// outbound ones, and `last` as the outbound chain's last rule; `P` is the chain prefix.
fn script(inbound: &[&str], outbound: &[&str], last: &str) -> String {
    let rules = include_str!("../../../../tests/fixtures/fsm-init.iptables");
    let mut out = String::from("iptables-restore --noflush <<EOF\n");
    for line in rules.lines().filter(|line| !line.starts_with('#')) {
        match line {
            "-A FSM_PROXY_OUT_REDIRECT -p tcp -j REDIRECT --to-port 15001" => {
                for extra in inbound {
                    out.push_str(extra);
                    out.push('\n');
                }
                out.push_str(line);
            }
            "-A FSM_PROXY_OUTBOUND -j FSM_PROXY_OUT_REDIRECT" => {
                for extra in outbound {
                    out.push_str(extra);
                    out.push('\n');
                }
                out.push_str(last);
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out.push_str("EOF\n");
    out
}

const LAST: &str = "-A FSM_PROXY_OUTBOUND -j FSM_PROXY_OUT_REDIRECT";

fn carried(script: &str, mesh: Mesh) -> Carried {
    match read(script, mesh) {
        Reading::Carried(carried) => carried,
        other => panic!("not carried: {other:?}\n{script}"),
    }
}

fn findings(script: &str) -> Vec<String> {
    match read(script, Mesh::Fsm) {
        Reading::Inexpressible(findings) => findings.iter().map(ToString::to_string).collect(),
        other => panic!("no findings: {other:?}\n{script}"),
    }
}

fn net(text: &str) -> IpNet {
    text.parse().expect("a CIDR")
}

#[test]
fn the_fixed_rules_carry_nothing_and_redirect_to_the_outbound_port() {
    let fsm = script(&[], &[], LAST);
    assert_eq!(
        carried(&fsm, Mesh::Fsm),
        Carried {
            outbound_port: 15001,
            ..Carried::default()
        }
    );
    let osm = fsm.replace("FSM_", "OSM_");
    assert_eq!(carried(&osm, Mesh::Osm).outbound_port, 15001);
    assert!(matches!(read(&osm, Mesh::Fsm), Reading::NotIptables(_)));
}

#[test]
fn exclusions_and_inclusions_are_carried_in_the_scripts_order() {
    let text = script(
        &["-I FSM_PROXY_INBOUND -p tcp --match multiport --dports 8081,9090 -j RETURN"],
        &[
            "-A FSM_PROXY_OUTBOUND -d 169.254.169.254/32 -j RETURN",
            "-A FSM_PROXY_OUTBOUND -d 10.1.2.3/8 -j RETURN",
            "-A FSM_PROXY_OUTBOUND -p tcp --match multiport --dports 5432,6379 -j RETURN",
            "-A FSM_PROXY_OUTBOUND -d 10.96.0.0/12 -j FSM_PROXY_OUT_REDIRECT",
            "-A FSM_PROXY_OUTBOUND -d 192.168.0.0/16 -j FSM_PROXY_OUT_REDIRECT",
        ],
        "-A FSM_PROXY_OUTBOUND -j RETURN",
    );
    assert_eq!(
        carried(&text, Mesh::Fsm),
        Carried {
            inbound_ports: vec![8081, 9090],
            outbound_ports: vec![5432, 6379],
            outbound_ip_ranges: vec![net("169.254.169.254/32"), net("10.0.0.0/8")],
            outbound_ip_range_inclusions: vec![net("10.96.0.0/12"), net("192.168.0.0/16")],
            outbound_port: 15001,
        }
    );
}

#[test]
fn iptables_commands_read_like_the_restore_format() {
    let text = "set -e\n\
        iptables -t nat -N FSM_PROXY_INBOUND\n\
        iptables -t nat -N FSM_PROXY_IN_REDIRECT\n\
        iptables -t nat -N FSM_PROXY_OUTBOUND\n\
        iptables -t nat -N FSM_PROXY_OUT_REDIRECT\n";
    let mut text = text.to_owned();
    let rules = script(
        &[],
        &["-A FSM_PROXY_OUTBOUND -p tcp --dport 53 -j RETURN"],
        LAST,
    );
    for line in rules.lines().filter(|line| line.starts_with('-')) {
        text.push_str(&format!("iptables -w -t nat {line}\n"));
    }
    assert_eq!(carried(&text, Mesh::Fsm).outbound_ports, [53]);
}

#[test]
fn an_interface_exclusion_is_named_rule_by_rule() {
    let text = script(
        &["-I FSM_PROXY_INBOUND -i eth1 -j RETURN"],
        &["-A FSM_PROXY_OUTBOUND -o eth1 -j RETURN"],
        LAST,
    );
    let why = "leaves interface eth1 out of interception (MeshConfig \
               traffic.networkInterfaceExclusionList); the datapath has no interface exclusion";
    assert_eq!(
        findings(&text),
        [
            format!("rule `-I FSM_PROXY_INBOUND -i eth1 -j RETURN` {why}"),
            format!("rule `-A FSM_PROXY_OUTBOUND -o eth1 -j RETURN` {why}"),
        ]
    );
}

#[test]
fn another_proxy_uid_or_redirect_port_is_named() {
    let text = script(&[], &[], LAST)
        .replace("--uid-owner 1500", "--uid-owner 1337")
        .replace("--to-port 15001", "--to-port 15006");
    let found = findings(&text);
    assert_eq!(found.len(), 4, "{found:#?}");
    assert_eq!(
        found[0],
        "rule `-A FSM_PROXY_OUT_REDIRECT -p tcp -j REDIRECT --to-port 15006` redirects outbound \
         connections to port 15006; the datapath sends them to 15001, the proxy's outbound port"
    );
    assert_eq!(
        found[3],
        "rule `-A FSM_PROXY_OUTBOUND -m owner --uid-owner 1337 -j RETURN` names the proxy by UID \
         1337; the datapath's proxy is UID 1500"
    );
}

#[test]
fn local_proxy_mode_pod_ip_is_named() {
    let dnat = "-I OUTPUT -p tcp -o lo -d 127.0.0.1/32 -m owner --uid-owner 1500 -j DNAT \
                --to-destination $POD_IP";
    let found = findings(&script(&[], &[dnat], LAST));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found[0].starts_with(&format!("rule `{dnat}` sends the proxy's connections")));
}

#[test]
fn a_rule_out_of_its_place_is_named() {
    let appended = "-A FSM_PROXY_INBOUND -p tcp --match multiport --dports 8081 -j RETURN";
    let text = script(&[appended], &[], LAST);
    assert_eq!(
        findings(&text),
        [format!("rule `{appended}` {AFTER_CATCH_ALL}")]
    );

    let late = "-A FSM_PROXY_OUTBOUND -d 10.0.0.0/8 -j RETURN";
    let text = script(
        &[],
        &[
            "-A FSM_PROXY_OUTBOUND -d 10.96.0.0/12 -j FSM_PROXY_OUT_REDIRECT",
            late,
        ],
        "-A FSM_PROXY_OUTBOUND -j RETURN",
    );
    assert_eq!(
        findings(&text),
        [format!("rule `{late}` {EXCLUSION_AFTER_INCLUSION}")]
    );
}

#[test]
fn catch_alls_that_change_the_inclusions_meaning_are_named() {
    let found = findings(&script(&[], &[], "-A FSM_PROXY_OUTBOUND -j RETURN"));
    assert_eq!(
        found,
        [
            "rule `-A FSM_PROXY_OUTBOUND -j RETURN` sends no outbound connection to the proxy; the \
          datapath sends them all"
        ]
    );
    let included = "-A FSM_PROXY_OUTBOUND -d 10.96.0.0/12 -j FSM_PROXY_OUT_REDIRECT";
    let found = findings(&script(&[], &[included], LAST));
    assert_eq!(found.len(), 1, "{found:#?}");
    assert!(found[0].contains("narrow nothing"), "{found:#?}");
}

#[test]
fn a_missing_fixed_rule_is_named() {
    let text =
        script(&[], &[], LAST).replace("-A FSM_PROXY_INBOUND -p tcp --dport 15904 -j RETURN\n", "");
    assert_eq!(
        findings(&text),
        [
            "the script lacks `-A FSM_PROXY_INBOUND -p tcp --dport 15904 -j RETURN`: the script \
          sends port 15904 to the proxy; the datapath lets the kubelet past it"
        ]
    );
}

#[test]
fn port_ranges_other_tables_and_other_commands_are_named() {
    let range = "-I FSM_PROXY_INBOUND -p tcp --match multiport --dports 8000:8100 -j RETURN";
    let mut text = script(&[range], &[], LAST);
    text.push_str("iptables -A INPUT -p tcp --dport 22 -j DROP\nsysctl -w net.ipv4.ip_forward=1\n");
    assert_eq!(
        findings(&text),
        [
            "rule `sysctl -w net.ipv4.ip_forward=1` is a shell command other than iptables, which \
             the datapath does not run"
                .to_owned(),
            "rule `iptables -A INPUT -p tcp --dport 22 -j DROP` is in table filter; the datapath \
             does what the injector's nat rules do, and nothing else"
                .to_owned(),
            format!(
                "rule `{range}` names the port range 8000:8100; the exclusion annotations name \
                 single ports"
            ),
        ]
    );
}

#[test]
fn scripts_that_are_not_iptables_rules_are_told_apart() {
    for (text, why) in [
        ("echo hello\n", "it runs no iptables-restore or iptables"),
        (
            "iptables-restore --noflush <<EOF\n*nat\nCOMMIT\n",
            "its here-document never ends (no line EOF)",
        ),
    ] {
        assert_eq!(read(text, Mesh::Fsm), Reading::NotIptables(why.to_owned()));
    }
}
