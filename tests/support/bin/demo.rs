//! `probe-bypass-demo`, run by `cargo xtask demo`: the product's main job on one machine.
//!
//! Pods A and B are meshed (an app on 8080 and HAProxy as the sidecar: inbound 15003 with mTLS,
//! outbound 15001 to the original destination); pod C is outside the mesh. A's and B's manifests
//! are FSM's injector output (`probe_bypass_testing::injected`): its iptables init container
//! `fsm-init`, its healthcheck container, the probes it rewrote. The same calls are made twice:
//!
//! - behind the mesh's own iptables rules: `fsm-init`'s script run in each meshed pod, the agent
//!   serving only the healthcheck in place of `fsm-healthcheck`;
//! - behind the agent's eBPF datapath, attached to the demo's own cgroup (never the cgroup root):
//!   the manifests passed through `probe-bypass rewrite --replace-mesh-init` (the diff printed),
//!   the validation init container run in each meshed pod before the agent (it fails) and after
//!   (it passes), and only then the sidecar and the app.
//!
//! Every outcome printed is observed: curl's answer and the proxies' logs (see
//! `probe_bypass_testing::mesh`). With `--keep`, the datapath's node stays up after the table,
//! with commands to poke at it, until Ctrl-C.
//!
//! Everything is owned by guards that remove it on drop. SIGINT and SIGTERM only set a flag, which
//! the demo checks between steps, so an interrupted demo unwinds through the same drops;
//! `cargo xtask demo` runs it in its own process group, so the terminal's Ctrl-C reaches only it.

use std::{
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use probe_bypass_testing::mesh::{
    Call, Caller, HEALTHCHECK_PORT, Manifests, MeshSpec, Mode, Node, Outcome, PodSpec, Report,
    Target,
};

const APP_PORT: u16 = 8080;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

#[expect(non_camel_case_types, reason = "the C type a signal handler takes")]
type libc_int = std::ffi::c_int;

/// The demo's node: A and B meshed (FSM annotations), C outside the mesh.
fn pods() -> [PodSpec; 3] {
    let meshed = || {
        Some(MeshSpec {
            annotation_prefix: "flomesh.io/",
            probe_ports: &[APP_PORT],
            inbound_port_exclusions: &[],
            outbound_port_exclusions: &[],
            outbound_pod_exclusions: &[],
        })
    };
    [
        PodSpec {
            name: "A",
            app_ports: &[APP_PORT],
            mesh: meshed(),
        },
        PodSpec {
            name: "B",
            app_ports: &[APP_PORT],
            mesh: meshed(),
        },
        PodSpec {
            name: "C",
            app_ports: &[APP_PORT],
            mesh: None,
        },
    ]
}

/// A row: who calls, what, and what the call is meant to show.
struct Row {
    who: &'static str,
    what: &'static str,
    from: Caller,
    call: Call,
}

fn rows() -> [Row; 5] {
    [
        Row {
            who: "kubelet (its cgroup, host netns)",
            what: "A:15904 healthcheck of 8080",
            from: Caller::Host,
            call: Call::Healthcheck {
                pod: "A",
                port: APP_PORT,
            },
        },
        Row {
            who: "kubelet (its cgroup, host netns)",
            what: "A:8080",
            from: Caller::Host,
            call: Call::Http {
                to: Target::Pod("A"),
                port: APP_PORT,
            },
        },
        Row {
            who: "node daemon (host netns)",
            what: "A:15904 healthcheck of 8080",
            from: Caller::HostDaemon,
            call: Call::Healthcheck {
                pod: "A",
                port: APP_PORT,
            },
        },
        Row {
            who: "C (outside the mesh)",
            what: "A:15904 healthcheck of 8080",
            from: Caller::App("C"),
            call: Call::Healthcheck {
                pod: "A",
                port: APP_PORT,
            },
        },
        Row {
            who: "A's app",
            what: "B:8080",
            from: Caller::App("A"),
            call: Call::Http {
                to: Target::Pod("B"),
                port: APP_PORT,
            },
        },
    ]
}

struct Interrupted;

fn check() -> Result<(), Interrupted> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        Err(Interrupted)
    } else {
        Ok(())
    }
}

/// Prints a step of a node's start-up, as a user would want to follow it.
fn print_report(report: Report<'_>) {
    match report {
        Report::MeshInit { pod, container } => {
            println!(
                "  {pod}: init container {container} ran the injector's iptables script in {pod}'s netns"
            );
        }
        Report::Rewritten {
            pod,
            diff,
            warnings,
        } => {
            println!(
                "  {pod}: $ probe-bypass rewrite -f - --replace-mesh-init --style fsm --diff < {pod}.injected.yaml"
            );
            for line in diff.lines() {
                println!("    {line}");
            }
            for line in warnings.lines() {
                println!("    warning: {line}");
            }
        }
        Report::AgentUp => println!("  the agent is up and serves the node's pods"),
        Report::Validation {
            pod,
            agent_up,
            output,
        } => {
            let when = if agent_up {
                "with the agent up"
            } else {
                "before the agent is up"
            };
            let code = output
                .status
                .code()
                .map_or_else(|| output.status.to_string(), |code| format!("exit {code}"));
            println!("  {pod}: init container probe-bypass-validation, {when}: {code}");
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
            // Its last attempt and what it says to do: the lines a user reads in its log.
            let lines: Vec<&str> = text.lines().collect();
            let from = lines
                .iter()
                .rposition(|line| line.starts_with("probe-bypass validate:"))
                .unwrap_or(0);
            for line in &lines[from..] {
                println!("    {line}");
            }
            if agent_up {
                println!("  {pod}: its sidecar (HAProxy) and app start");
            } else {
                println!("  {pod}: the pod waits; the kubelet would run the validation again");
            }
        }
    }
}

/// Runs the rows on a node intercepted in `mode`. The node is torn down before it returns, unless
/// `keep`, when it is returned.
fn run_mode(
    mode: Mode,
    label: &str,
    keep: bool,
) -> Result<(Vec<Outcome>, Option<Node>), Interrupted> {
    println!("\n{label}: starting pods A, B (from FSM's injector output) and C…");
    let node = Node::start_from(mode, Manifests::Injected, &pods(), &mut print_report);
    let mut outcomes = Vec::new();
    for row in rows() {
        check()?;
        let observation = node.call(row.from, row.call);
        println!("  $ {}", observation.command);
        for line in &observation.log_lines {
            println!("    proxy log {line}");
        }
        outcomes.push(observation.outcome);
    }
    if keep {
        return Ok((outcomes, Some(node)));
    }
    println!("{label}: tearing the pods down");
    drop(node);
    Ok((outcomes, None))
}

/// What `--keep` prints: commands to run against the datapath's node while it is up.
fn print_keep_commands(node: &Node) {
    let cgroup = node.cgroup().path().display().to_string();
    let kubelet = node.kubelet_cgroup().display().to_string();
    let a = node.pod("A");
    let enter = |dir: &str| format!("sh -c 'echo $$ > {dir}/cgroup.procs && exec \"$0\" \"$@\"'");
    println!(
        "\nthe datapath's node is up (Ctrl-C tears it down). Commands run inside the demo's cgroup,"
    );
    println!("where the programs are attached (a shell of yours outside it is not intercepted):");
    let probe = format!(
        "curl --noproxy '*' -s -w '%{{http_code}}\\n' -H 'Original-Tcp-Port: 8080' http://{}:{HEALTHCHECK_PORT}/fsm-healthcheck",
        a.ip
    );
    println!("  the kubelet's probe:  {} {probe}", enter(&kubelet));
    println!("  a node daemon's:      {} {probe}", enter(&cgroup));
    println!(
        "  A's app calling B:    {} ip netns exec {} curl --noproxy '*' -s http://{}:8080/",
        enter(&cgroup),
        a.netns_name,
        node.pod("B").ip
    );
    println!("  the programs:         bpftool cgroup tree {cgroup}");
    if let Some(pins) = node.pin_path() {
        println!("  the pinned maps:      ls {}", pins.display());
    }
    println!(
        "  the metrics:          curl --noproxy '*' -s http://{}/metrics | grep probe_bypass_datapath",
        node.agent().admin
    );
    println!(
        "  A's iptables (none):  ip netns exec {} iptables -t nat -S",
        a.netns_name
    );
}

/// The HTTP status and whether a sidecar saw the call, in a table cell.
fn cell(outcome: &Outcome) -> String {
    let status = match outcome.answered.as_str() {
        answer if answer.starts_with("app ") => format!("200 from {answer}"),
        answer => answer.strip_prefix("healthcheck ").map_or_else(
            || answer.to_owned(),
            |status| format!("{status} healthcheck"),
        ),
    };
    if outcome.proxies.is_empty() {
        format!("{status}, past the sidecars")
    } else {
        format!("{status}, via sidecar {}", outcome.proxies.join(" → "))
    }
}

fn main() -> ExitCode {
    let keep = match std::env::args().skip(1).collect::<Vec<_>>().as_slice() {
        [] => false,
        [flag] if flag == "--keep" => true,
        other => {
            eprintln!("usage: probe-bypass-demo [--keep] (got {other:?})");
            return ExitCode::from(2);
        }
    };
    let action = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        if let Err(error) = unsafe { sigaction(signal, &action) } {
            eprintln!("installing the {signal} handler: {error}");
            return ExitCode::FAILURE;
        }
    }
    let result = (|| -> Result<_, Interrupted> {
        let (iptables, _) = run_mode(Mode::Iptables, "the mesh's iptables rules", false)?;
        check()?;
        let (ebpf, kept) = run_mode(Mode::Ebpf, "the agent's eBPF datapath", keep)?;
        Ok((iptables, ebpf, kept))
    })();
    let Ok((iptables, ebpf, kept)) = result else {
        eprintln!("interrupted: everything the demo made is torn down");
        return ExitCode::from(130);
    };
    println!("\n| caller | calls | mesh's iptables rules | probe-bypass eBPF datapath |");
    println!("|---|---|---|---|");
    for ((row, before), after) in rows().iter().zip(&iptables).zip(&ebpf) {
        // C, or a host process that is not the kubelet, reaching A's app through 15904 without
        // meeting A's sidecar: the mesh's hole.
        let hole =
            matches!(row.from, Caller::App("C") | Caller::HostDaemon) && before.proxies.is_empty();
        let mark = if hole {
            " ⚠ hole: skips A's mTLS"
        } else {
            ""
        };
        println!(
            "| {} | {} | {}{mark} | {} |",
            row.who,
            row.what,
            cell(before),
            cell(after)
        );
    }
    if let Some(node) = kept {
        print_keep_commands(&node);
        while check().is_ok() {
            thread::sleep(Duration::from_millis(100));
        }
        println!("tearing the datapath's node down");
        drop(node);
    }
    println!("\ntorn down: namespaces, veths, cgroups, pins, processes and temp dirs removed");
    ExitCode::SUCCESS
}
