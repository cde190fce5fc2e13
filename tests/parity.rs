//! Parity with the mesh itself (issue 3): the same calls, on the same node of pods, once behind the
//! mesh's own iptables rules and once behind the agent's eBPF datapath, must come out the same for
//! the user, except where the datapath is meant to differ.
//!
//! The node: meshed pods A (FSM annotations) and B (OSM annotations), each with an HTTP app and
//! HAProxy as its sidecar; non-meshed pods C and D with only the app. Every app answers
//! `app <pod>:<port>`. A's outbound exclusions: port 9091 and D's address; A's and B's inbound
//! exclusion: port 9090. The callers are the kubelet (host network namespace, in a cgroup of its
//! own), another host process (a cgroup beside the kubelet's), the pods' apps and
//! A's proxy UID, and a client pod R on a second node (a namespace routed to this node's pods
//! through veths, outside the test's cgroup) calling as an app and as a proxy's UID (issue 5);
//! see [`SCENARIOS`].
//!
//! `iptables_mode_matches_the_expected_table` checks the mesh's rules against outcomes written out
//! by hand, so that the comparison cannot pass by both modes being broken the same way;
//! `parity_ebpf_matches_iptables` runs both modes and compares them.
//! `ebpf_on_the_mesh_rules_gives_the_ebpf_table` runs the datapath over pods that still carry the
//! mesh's rules (injected before a node switched, issue 14): the outcomes must be the datapath's,
//! with the 15904 hole closed, not the mesh's.

use std::{fmt::Write as _, net::IpAddr};

use probe_bypass_testing::require_privileges;
use probe_bypass_testing::{
    containerd, images,
    mesh::{
        Call, Caller, Manifests, MeshSpec, Mode, Node, Outcome, PodSpec, Pods, REMOTE_POD, Report,
        Target,
    },
    privilege,
    sidecar::{ProxyEvent, ProxyLog},
};

/// The port every app answers on, and the one the meshed pods' probes name.
const APP_PORT: u16 = 8080;
/// Excluded from interception inbound, in both meshed pods.
const INBOUND_EXCLUDED: u16 = 9090;
/// Excluded from interception outbound, in A.
const OUTBOUND_EXCLUDED: u16 = 9091;

const APP_PORTS: &[u16] = &[APP_PORT, INBOUND_EXCLUDED, OUTBOUND_EXCLUDED];

fn node_spec() -> [PodSpec; 4] {
    [
        PodSpec {
            name: "A",
            app_ports: APP_PORTS,
            mesh: Some(MeshSpec {
                annotation_prefix: "flomesh.io/",
                probe_ports: &[APP_PORT],
                inbound_port_exclusions: &[INBOUND_EXCLUDED],
                outbound_port_exclusions: &[OUTBOUND_EXCLUDED],
                outbound_pod_exclusions: &["D"],
            }),
        },
        PodSpec {
            name: "B",
            app_ports: APP_PORTS,
            mesh: Some(MeshSpec {
                annotation_prefix: "openservicemesh.io/",
                probe_ports: &[APP_PORT],
                inbound_port_exclusions: &[INBOUND_EXCLUDED],
                outbound_port_exclusions: &[],
                outbound_pod_exclusions: &[],
            }),
        },
        PodSpec {
            name: "C",
            app_ports: APP_PORTS,
            mesh: None,
        },
        PodSpec {
            name: "D",
            app_ports: &[APP_PORT],
            mesh: None,
        },
    ]
}

/// One call, and what comes of it.
struct Scenario {
    what: &'static str,
    from: Caller,
    call: Call,
    /// What the user sees behind the mesh's own rules: what answered, and the proxies' log lines
    /// (see [`Outcome`]).
    iptables: (&'static str, &'static [&'static str]),
    /// How the eBPF datapath's outcome relates to that.
    ebpf: Ebpf,
}

enum Ebpf {
    /// The same as the mesh's, as observed in the same run.
    Same,
    /// Different on purpose: this outcome, for this reason.
    Differs {
        outcome: (&'static str, &'static [&'static str]),
        why: &'static str,
    },
}

/// What a plaintext client sees when the mesh sends it to a proxy's mTLS port.
const PLAINTEXT_TO_MTLS: &str = "error: empty reply";

const SCENARIOS: &[Scenario] = &[
    Scenario {
        what: "the kubelet probes B's healthcheck",
        from: Caller::Host,
        call: Call::Healthcheck {
            pod: "B",
            port: APP_PORT,
        },
        iptables: ("healthcheck 200", &[]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "the kubelet calls B's app: B's proxy demands mTLS",
        from: Caller::Host,
        call: Call::Http {
            to: Target::Pod("B"),
            port: APP_PORT,
        },
        iptables: (PLAINTEXT_TO_MTLS, &["B inbound: SSL handshake failure"]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "the kubelet calls B's inbound-excluded port",
        from: Caller::Host,
        call: Call::Http {
            to: Target::Pod("B"),
            port: INBOUND_EXCLUDED,
        },
        iptables: ("app B:9090", &[]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "a host process that is not the kubelet probes A's healthcheck",
        from: Caller::HostDaemon,
        call: Call::Healthcheck {
            pod: "A",
            port: APP_PORT,
        },
        iptables: ("healthcheck 200", &[]),
        ebpf: Ebpf::Differs {
            outcome: (PLAINTEXT_TO_MTLS, &["A inbound: SSL handshake failure"]),
            why: "only the kubelet's cgroup gets past the sidecar on the probe ports \
                  (--probe-bypass-from kubelet); a node daemon or a hostNetwork pod meets it",
        },
    },
    Scenario {
        what: "non-meshed C probes B's healthcheck",
        from: Caller::App("C"),
        call: Call::Healthcheck {
            pod: "B",
            port: APP_PORT,
        },
        iptables: ("healthcheck 200", &[]),
        ebpf: Ebpf::Differs {
            outcome: (PLAINTEXT_TO_MTLS, &["B inbound: SSL handshake failure"]),
            why: "a caller other than the kubelet reaches 15904 only through the sidecar",
        },
    },
    Scenario {
        what: "non-meshed C calls B's app",
        from: Caller::App("C"),
        call: Call::Http {
            to: Target::Pod("B"),
            port: APP_PORT,
        },
        iptables: (PLAINTEXT_TO_MTLS, &["B inbound: SSL handshake failure"]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "non-meshed C calls B's inbound-excluded port",
        from: Caller::App("C"),
        call: Call::Http {
            to: Target::Pod("B"),
            port: INBOUND_EXCLUDED,
        },
        iptables: ("app B:9090", &[]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "meshed A calls B's app: through both proxies, mTLS between them",
        from: Caller::App("A"),
        call: Call::Http {
            to: Target::Pod("B"),
            port: APP_PORT,
        },
        iptables: ("app B:8080", &["A outbound B:8080", "B inbound B:8080"]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "A calls B's inbound-excluded port: A's proxy still speaks mTLS, B's app does not",
        from: Caller::App("A"),
        call: Call::Http {
            to: Target::Pod("B"),
            port: INBOUND_EXCLUDED,
        },
        iptables: ("error: empty reply", &["A outbound B:9090"]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "A calls its own app on 127.0.0.1",
        from: Caller::App("A"),
        call: Call::Http {
            to: Target::Loopback,
            port: APP_PORT,
        },
        iptables: ("app A:8080", &[]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "A calls its own app on its pod IP",
        from: Caller::App("A"),
        call: Call::Http {
            to: Target::Pod("A"),
            port: APP_PORT,
        },
        iptables: ("app A:8080", &[]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "A's proxy UID calls B's app in plaintext",
        from: Caller::Proxy("A"),
        call: Call::Http {
            to: Target::Pod("B"),
            port: APP_PORT,
        },
        iptables: (PLAINTEXT_TO_MTLS, &["B inbound: SSL handshake failure"]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "A's proxy UID calls non-meshed C",
        from: Caller::Proxy("A"),
        call: Call::Http {
            to: Target::Pod("C"),
            port: APP_PORT,
        },
        iptables: ("app C:8080", &[]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "A's proxy UID calls 127.0.0.1",
        from: Caller::Proxy("A"),
        call: Call::Http {
            to: Target::Loopback,
            port: APP_PORT,
        },
        iptables: ("app A:8080", &[]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "A's proxy UID calls A's pod IP: the mesh sends it to A's own inbound",
        from: Caller::Proxy("A"),
        call: Call::Http {
            to: Target::Pod("A"),
            port: APP_PORT,
        },
        iptables: (PLAINTEXT_TO_MTLS, &["A inbound: SSL handshake failure"]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "A's proxy UID calls A's pod IP on an inbound-excluded port",
        from: Caller::Proxy("A"),
        call: Call::Http {
            to: Target::Pod("A"),
            port: INBOUND_EXCLUDED,
        },
        iptables: (PLAINTEXT_TO_MTLS, &["A inbound: SSL handshake failure"]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "A calls non-meshed C: A's proxy speaks mTLS to a plaintext app",
        from: Caller::App("A"),
        call: Call::Http {
            to: Target::Pod("C"),
            port: APP_PORT,
        },
        iptables: ("error: empty reply", &["A outbound C:8080"]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "A calls C on an outbound-excluded port",
        from: Caller::App("A"),
        call: Call::Http {
            to: Target::Pod("C"),
            port: OUTBOUND_EXCLUDED,
        },
        iptables: ("app C:9091", &[]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "A calls D, whose address is outbound-excluded",
        from: Caller::App("A"),
        call: Call::Http {
            to: Target::Pod("D"),
            port: APP_PORT,
        },
        iptables: ("app D:8080", &[]),
        ebpf: Ebpf::Same,
    },
    // From the other node: no hook of this node ran at connect() (issue 5).
    Scenario {
        what: "a client on another node calls B's app: B's proxy demands mTLS",
        from: Caller::Remote,
        call: Call::Http {
            to: Target::Pod("B"),
            port: APP_PORT,
        },
        iptables: (PLAINTEXT_TO_MTLS, &["B inbound: SSL handshake failure"]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "a client on another node calls A's app",
        from: Caller::Remote,
        call: Call::Http {
            to: Target::Pod("A"),
            port: APP_PORT,
        },
        iptables: (PLAINTEXT_TO_MTLS, &["A inbound: SSL handshake failure"]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "a client on another node probes B's healthcheck",
        from: Caller::Remote,
        call: Call::Healthcheck {
            pod: "B",
            port: APP_PORT,
        },
        iptables: ("healthcheck 200", &[]),
        ebpf: Ebpf::Differs {
            outcome: (PLAINTEXT_TO_MTLS, &["B inbound: SSL handshake failure"]),
            why: "the kubelet runs on the pod's own node: a probe port reached from another node \
                  goes through the sidecar",
        },
    },
    Scenario {
        what: "a client on another node calls B's inbound-excluded port",
        from: Caller::Remote,
        call: Call::Http {
            to: Target::Pod("B"),
            port: INBOUND_EXCLUDED,
        },
        iptables: ("app B:9090", &[]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "a client on another node calls non-meshed C",
        from: Caller::Remote,
        call: Call::Http {
            to: Target::Pod("C"),
            port: APP_PORT,
        },
        iptables: ("app C:8080", &[]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "a proxy on another node calls B's app over mTLS: B's proxy forwards it",
        from: Caller::RemoteProxy,
        call: Call::Mtls {
            pod: "B",
            port: APP_PORT,
        },
        iptables: ("app B:8080", &["B inbound B:8080"]),
        ebpf: Ebpf::Same,
    },
    Scenario {
        what: "a proxy on another node calls B's app in plaintext",
        from: Caller::RemoteProxy,
        call: Call::Http {
            to: Target::Pod("B"),
            port: APP_PORT,
        },
        iptables: (PLAINTEXT_TO_MTLS, &["B inbound: SSL handshake failure"]),
        ebpf: Ebpf::Same,
    },
];

fn outcome((answered, proxies): (&str, &[&str])) -> Outcome {
    Outcome::new(answered, proxies)
}

/// Builds the node in `mode`, makes every call of [`SCENARIOS`] in order, and takes the node down.
/// Prints each call with the proxies' raw log lines (shown when a test fails).
fn run_scenarios(mode: Mode) -> Vec<Outcome> {
    run_scenarios_from(mode, Manifests::Annotated)
}

/// Like [`run_scenarios`], the meshed pods' manifests and start-up as `manifests` says.
fn run_scenarios_from(mode: Mode, manifests: Manifests) -> Vec<Outcome> {
    run_scenarios_on(Pods::Netns, mode, manifests)
}

/// Like [`run_scenarios_from`], the pods made by `made_by`.
fn run_scenarios_on(made_by: Pods, mode: Mode, manifests: Manifests) -> Vec<Outcome> {
    let specs = node_spec();
    let node = Node::start_on(made_by, mode, manifests, &specs, &mut print_report);
    println!("--- {made_by:?} pods, {mode:?} mode, {manifests:?} manifests ---");
    SCENARIOS
        .iter()
        .map(|scenario| {
            let observed = node.call(scenario.from, scenario.call);
            println!(
                "{}: {}\n  $ {}",
                scenario.what, observed.outcome, observed.command
            );
            for line in &observed.log_lines {
                println!("  {line}");
            }
            observed.outcome
        })
        .collect()
}

/// Prints a step of the node's start-up (shown when a test fails).
fn print_report(report: Report<'_>) {
    match report {
        Report::MeshInit { pod, container } => println!("{pod}: ran {container}"),
        Report::Rewritten {
            pod,
            diff,
            warnings,
        } => println!("{pod}: rewritten{warnings}\n{diff}"),
        Report::AgentUp => println!("the agent serves the node"),
        Report::Validation {
            pod,
            agent_up,
            output,
        } => println!(
            "{pod}: validation {} the agent: {}\n{}",
            if agent_up { "with" } else { "before" },
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

/// A Markdown table of the scenarios with one column per set of outcomes.
fn table(columns: &[(&str, &[Outcome])]) -> String {
    let mut text = String::from("| # | scenario | call |");
    for (title, _) in columns {
        let _ = write!(text, " {title} |");
    }
    text.push_str("\n|---|---|---|");
    text.push_str(&"---|".repeat(columns.len()));
    text.push('\n');
    for (i, scenario) in SCENARIOS.iter().enumerate() {
        let _ = write!(
            text,
            "| {} | {} | {} → {} |",
            i + 1,
            scenario.what,
            scenario.from,
            scenario.call
        );
        for (_, outcomes) in columns {
            match outcomes.get(i) {
                Some(outcome) => {
                    let _ = write!(text, " {outcome} |");
                }
                None => text.push_str(" (not run) |"),
            }
        }
        text.push('\n');
    }
    text
}

/// The scenarios (1-based) where `got` is not `wanted`.
fn mismatches(wanted: &[Outcome], got: &[Outcome]) -> Vec<usize> {
    (0..SCENARIOS.len())
        .filter(|&i| wanted.get(i) != got.get(i))
        .map(|i| i + 1)
        .collect()
}

/// Prints the table of `columns`, then fails unless `got` is `wanted` in every scenario, with
/// `failure` (where `{wrong}` stands for the scenarios that differ) above the table.
fn assert_outcomes(
    columns: &[(&str, &[Outcome])],
    wanted: &[Outcome],
    got: &[Outcome],
    failure: &str,
) {
    let table = table(columns);
    println!("{table}");
    let wrong = mismatches(wanted, got);
    assert!(
        wrong.is_empty(),
        "{}:\n{table}",
        failure.replace("{wrong}", &format!("{wrong:?}"))
    );
}

#[test]
fn iptables_mode_matches_the_expected_table() {
    require_privileges!();
    let expected: Vec<Outcome> = SCENARIOS.iter().map(|s| outcome(s.iptables)).collect();

    let observed = run_scenarios(Mode::Iptables);

    assert_outcomes(
        &[("expected", &expected), ("iptables", &observed)],
        &expected,
        &observed,
        "behind the mesh's iptables rules, scenarios {wrong} did not come out as expected",
    );
}

/// The table the datapath must give, written out by hand: the mesh's outcome, except where the
/// datapath differs on purpose.
fn expected_ebpf() -> Vec<Outcome> {
    SCENARIOS
        .iter()
        .map(|scenario| match &scenario.ebpf {
            Ebpf::Same => outcome(scenario.iptables),
            Ebpf::Differs { outcome: o, .. } => outcome(*o),
        })
        .collect()
}

#[test]
fn parity_ebpf_matches_iptables() {
    require_privileges!();
    let iptables = run_scenarios(Mode::Iptables);
    let ebpf = run_scenarios(Mode::Ebpf);

    // What the datapath must do: the mesh's outcome as observed, except where it differs on purpose.
    let wanted: Vec<Outcome> = SCENARIOS
        .iter()
        .zip(&iptables)
        .map(|(scenario, observed)| match &scenario.ebpf {
            Ebpf::Same => observed.clone(),
            Ebpf::Differs { outcome: o, .. } => outcome(*o),
        })
        .collect();
    for (i, scenario) in SCENARIOS.iter().enumerate() {
        if let Ebpf::Differs { why, .. } = scenario.ebpf {
            println!("scenario {} differs on purpose: {why}", i + 1);
        }
    }
    assert_outcomes(
        &[
            ("iptables", &iptables),
            ("ebpf, wanted", &wanted),
            ("ebpf", &ebpf),
        ],
        &wanted,
        &ebpf,
        "with the eBPF datapath, scenarios {wrong} did not come out as behind the mesh's rules",
    );
}

#[test]
fn ebpf_on_the_mesh_rules_gives_the_ebpf_table() {
    require_privileges!();
    let expected = expected_ebpf();

    let layered = run_scenarios(Mode::EbpfOnMeshRules);

    assert_outcomes(
        &[
            ("ebpf, expected", &expected),
            ("ebpf on the mesh's rules", &layered),
        ],
        &expected,
        &layered,
        "with the datapath over pods that keep the mesh's rules, scenarios {wrong} did not come \
         out as the datapath's table",
    );
}

/// Issue 17: the same node with each pod's sandbox made by containerd over CRI, on its CNI bridge
/// (`support/cri.rs`), the apps and sidecars run in those namespaces: the mesh's rules give the
/// mesh's table, and the datapath its own.
#[test]
fn on_sandboxes_made_through_cri_the_mesh_and_the_datapath_give_their_tables() {
    require_privileges!();
    if let Some(reason) = containerd::missing().or_else(images::missing) {
        privilege::skip(
            "on_sandboxes_made_through_cri_the_mesh_and_the_datapath_give_their_tables",
            &reason,
        );
        return;
    }
    let mesh: Vec<Outcome> = SCENARIOS.iter().map(|s| outcome(s.iptables)).collect();
    let datapath = expected_ebpf();

    let iptables = run_scenarios_on(Pods::Containerd, Mode::Iptables, Manifests::Annotated);
    let ebpf = run_scenarios_on(Pods::Containerd, Mode::Ebpf, Manifests::Annotated);

    assert_outcomes(
        &[("expected", &mesh), ("iptables, CRI sandboxes", &iptables)],
        &mesh,
        &iptables,
        "behind the mesh's rules on CRI sandboxes, scenarios {wrong} did not come out as expected",
    );
    assert_outcomes(
        &[
            ("ebpf, expected", &datapath),
            ("ebpf, CRI sandboxes", &ebpf),
        ],
        &datapath,
        &ebpf,
        "with the datapath on CRI sandboxes, scenarios {wrong} did not come out as its table",
    );
}

/// The injector's own output, its init container run in each meshed pod, gives the mesh's table:
/// the script carries every exclusion that the annotated pods' rules have.
#[test]
fn the_injectors_init_container_gives_the_mesh_table() {
    require_privileges!();
    let expected: Vec<Outcome> = SCENARIOS.iter().map(|s| outcome(s.iptables)).collect();

    let observed = run_scenarios_from(Mode::Iptables, Manifests::Injected);

    assert_outcomes(
        &[
            ("expected", &expected),
            ("injector's init container", &observed),
        ],
        &expected,
        &observed,
        "with the injector's init container run in the pods, scenarios {wrong} did not come out \
         as behind the mesh's rules",
    );
}

/// The same output after `probe-bypass rewrite --replace-mesh-init`: no iptables in the pods, the
/// validation failing before the agent and passing with it, and the exclusions known to the
/// datapath only through what the rewriter carried from the script. The outcomes must be the
/// datapath's table: each carried exclusion does what the script's rule did.
#[test]
fn replacing_the_injectors_init_container_gives_the_ebpf_table() {
    require_privileges!();
    let expected = expected_ebpf();

    let replaced = run_scenarios_from(Mode::Ebpf, Manifests::Injected);

    assert_outcomes(
        &[("ebpf, expected", &expected), ("init replaced", &replaced)],
        &expected,
        &replaced,
        "with the mesh's init container replaced, scenarios {wrong} did not come out as the \
         datapath's table",
    );
}

#[test]
fn proxy_log_parses_a_forwarded_connection() {
    let line = "probe-bypass-test frontend=outbound client=198.18.0.2:4000 \
                original_dst=198.18.0.6:8080 server=198.18.0.6:8080 termination=--";
    let log = ProxyLog::parse(line);
    assert_eq!(log.frontend, "outbound");
    assert_eq!(log.client, "198.18.0.2:4000");
    assert_eq!(
        log.event,
        ProxyEvent::Forwarded {
            original_dst: "198.18.0.6:8080".parse().expect("address"),
            server: "198.18.0.6:8080".parse().expect("address"),
            termination: "--".to_owned(),
        }
    );
}

#[test]
fn proxy_log_parses_a_failed_handshake() {
    let line = "198.18.0.5:39956 [21/Nov/2026:02:14:44.872] inbound/inbound: SSL handshake failure";
    let log = ProxyLog::parse(line);
    assert_eq!(log.frontend, "inbound");
    assert_eq!(log.client, "198.18.0.5:39956");
    assert_eq!(
        log.event,
        ProxyEvent::Failed("SSL handshake failure".to_owned())
    );
}

#[test]
fn proxy_log_keeps_a_line_it_does_not_know() {
    let log = ProxyLog::parse("[WARNING]  (1) : something else");
    assert_eq!(log.event, ProxyEvent::Unparsed);
    assert_eq!(log.raw, "[WARNING]  (1) : something else");
}

/// Issue 5: nothing from the other node reaches a meshed pod's app except through its sidecar, on
/// every app port that is not excluded, whoever calls and however. The apps note every client they
/// accept: behind the sidecar that is the sidecar (on 127.0.0.1), never the other node's pod. The
/// excluded port shows that a direct connection would be noticed.
#[test]
fn no_connection_from_another_node_reaches_an_app_port_past_the_sidecar() {
    require_privileges!();
    const ROUNDS: usize = 5;
    let specs = node_spec();
    let node = Node::start(Mode::Ebpf, &specs);
    let remote = IpAddr::V4(node.remote_pod().ip);
    let meshed = ["A", "B"];
    let intercepted = [APP_PORT, OUTBOUND_EXCLUDED];
    // The node's set-up checked that R reaches the apps before anything intercepted; only what
    // the apps accept from here on counts.
    let mut accepted_before = Vec::new();
    for pod in meshed {
        for port in intercepted {
            accepted_before.push(node.app_peers(pod, port).len());
        }
    }

    let mut calls = 0;
    for _ in 0..ROUNDS {
        for pod in meshed {
            for port in intercepted {
                let plaintext = Call::Http {
                    to: Target::Pod(pod),
                    port,
                };
                for (from, call) in [
                    (Caller::Remote, plaintext),
                    (Caller::RemoteProxy, plaintext),
                    (Caller::RemoteProxy, Call::Mtls { pod, port }),
                ] {
                    let observed = node.call(from, call);
                    calls += 1;
                    let through_sidecar = observed
                        .outcome
                        .proxies
                        .iter()
                        .any(|line| line.starts_with(&format!("{pod} inbound")));
                    assert!(
                        through_sidecar,
                        "{from} → {call} did not meet {pod}'s sidecar: {}\n  $ {}",
                        observed.outcome, observed.command
                    );
                }
            }
        }
    }
    let mut before = accepted_before.into_iter();
    for pod in meshed {
        for port in intercepted {
            let skip = before.next().unwrap_or_default();
            let direct: Vec<_> = node
                .app_peers(pod, port)
                .into_iter()
                .skip(skip)
                .filter(|peer| peer.ip() == remote)
                .collect();
            assert!(
                direct.is_empty(),
                "{pod}'s app on {port} accepted {} connections straight from {REMOTE_POD} \
                 ({remote}) out of {calls} calls",
                direct.len()
            );
        }
    }

    // The excluded port is reached directly, and the app sees the other node's pod: the check
    // above would have seen a connection that skipped the sidecar.
    let observed = node.call(
        Caller::Remote,
        Call::Http {
            to: Target::Pod("B"),
            port: INBOUND_EXCLUDED,
        },
    );
    assert_eq!(observed.outcome, outcome(("app B:9090", &[])));
    assert!(
        node.app_peers("B", INBOUND_EXCLUDED)
            .iter()
            .any(|peer| peer.ip() == remote)
    );
}
