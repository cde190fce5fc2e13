//! `probe-bypass-demo`, run by `cargo xtask demo`: the product's main job on one machine.
//!
//! Pods A and B are meshed (an app on 8080 and HAProxy as the sidecar: inbound 15003 with mTLS,
//! outbound 15001 to the original destination); pod C is outside the mesh. The same calls are made
//! twice: once behind the mesh's own iptables rules (the agent serving only the healthcheck), once
//! behind the agent's eBPF datapath attached to the demo's own cgroup (never the cgroup root).
//! Every outcome printed is observed: curl's answer and the proxies' logs (see
//! `probe_bypass_testing::mesh`).
//!
//! Everything is owned by guards that remove it on drop. SIGINT and SIGTERM only set a flag, which
//! the demo checks between steps, so an interrupted demo unwinds through the same drops;
//! `cargo xtask demo` runs it in its own process group, so the terminal's Ctrl-C reaches only it.

use std::{
    process::ExitCode,
    sync::atomic::{AtomicBool, Ordering},
};

use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use probe_bypass_testing::mesh::{Call, Caller, MeshSpec, Mode, Node, Outcome, PodSpec, Target};

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

fn rows() -> [Row; 4] {
    [
        Row {
            who: "kubelet (host netns)",
            what: "A:15904 healthcheck of 8080",
            from: Caller::Host,
            call: Call::Healthcheck {
                pod: "A",
                port: APP_PORT,
            },
        },
        Row {
            who: "kubelet (host netns)",
            what: "A:8080",
            from: Caller::Host,
            call: Call::Http {
                to: Target::Pod("A"),
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

/// Runs the rows on a node intercepted in `mode`; the node is torn down before it returns.
fn run_mode(mode: Mode, label: &str) -> Result<Vec<Outcome>, Interrupted> {
    println!("{label}: starting pods A, B (app + HAProxy sidecar) and C, and the agent…");
    let node = Node::start(mode, &pods());
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
    println!("{label}: tearing the pods down");
    drop(node);
    Ok(outcomes)
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
        let iptables = run_mode(Mode::Iptables, "the mesh's iptables rules")?;
        check()?;
        let ebpf = run_mode(Mode::Ebpf, "the agent's eBPF datapath")?;
        Ok((iptables, ebpf))
    })();
    let Ok((iptables, ebpf)) = result else {
        eprintln!("interrupted: everything the demo made is torn down");
        return ExitCode::from(130);
    };
    println!("\n| caller | calls | mesh's iptables rules | probe-bypass eBPF datapath |");
    println!("|---|---|---|---|");
    for ((row, before), after) in rows().iter().zip(&iptables).zip(&ebpf) {
        // C reaching A's app through 15904 without meeting A's sidecar: the mesh's hole.
        let hole = matches!(row.from, Caller::App("C")) && before.proxies.is_empty();
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
    println!("\ntorn down: namespaces, veths, cgroups, pins, processes and temp dirs removed");
    ExitCode::SUCCESS
}
