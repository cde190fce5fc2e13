//! `probe-bypass validate`: the check of the validation init container that `--replace-mesh-init`
//! puts in place of the mesh's iptables init container. It exits 0 only once this pod's own
//! connections are redirected by the node's eBPF datapath; the pod's app and sidecar start after
//! it, so a pod never runs without its traffic going through the sidecar.
//!
//! # The check
//!
//! Init containers run in the pod's network namespace before the sidecar, so the sidecar's
//! outbound port is free. The check takes it, on the loopback address, where the datapath's
//! connect4/connect6 programs send a meshed pod's connections (as the mesh's iptables REDIRECT
//! did), and then, in each attempt ([`check::attempt`]):
//!
//! 1. connects to a random address of TEST-NET-1 (192.0.2.0/24) on a random port, with its socket
//!    bound to the loopback device;
//! 2. writes a random 16-byte nonce on it;
//! 3. accepts on the outbound port until the connection from the client's own address (its
//!    ephemeral port) arrives;
//! 4. reads `SO_ORIGINAL_DST` on the accepted socket, which the datapath's getsockopt program
//!    answers, and reads the nonce.
//!
//! The address is drawn from `--target-range` instead when the pod's exclusions would let the
//! documentation ranges through (`rewrite --replace-mesh-init` sets it: inside the pod's outbound
//! IP range inclusion list, say); only the families given a range are then checked.
//!
//! It passes only if the accepted connection comes from the client's address, its original
//! destination is exactly the address and port asked for, and the nonce arrives. A pod with an
//! IPv6 address (`POD_IP`, or any of `POD_IPS`) is checked the same way over IPv6, with an address
//! of 2001:db8::/32 and `IP6T_SO_ORIGINAL_DST`, on `::1`.
//!
//! # Why it cannot pass by accident
//!
//! - Nothing but a redirect can connect the client: bound to `lo`, its packets never leave the
//!   pod, and no address of the pod is in the documentation ranges on that port.
//! - A redirect by something else would have to land on the outbound port, from this very client
//!   port, and hand over the nonce, which is new in each attempt.
//! - The original destination is answered only for a connection the datapath redirected (the
//!   kernel's own `SO_ORIGINAL_DST` needs conntrack NAT, which a pod without the mesh's iptables
//!   rules has not), and it must name the random address and port of this attempt.
//! - The datapath lets the sidecar's own UID through unredirected, so the check refuses to run as
//!   it (`--proxy-uid`), rather than fail for that reason on a protected pod.
//!
//! # Bounds
//!
//! Each attempt is bounded ([`ATTEMPT`]; its connect, 100 ms, since a redirected connection is
//! made to loopback at once); a missed one is retried after [`RETRY`] until
//! `--timeout` (20 s by default). The agent serves a pod once its sandbox has an IP and a network
//! namespace, while the init containers run, so on a node whose agent is up the check passes on
//! its first or second attempt. Past the timeout it exits 1 with what to check, from the agent's
//! status answer on the healthcheck port ([`status`]); the kubelet restarts it after its back-off.

mod check;
mod status;

use std::{
    io::{self, Write as _},
    net::{IpAddr, SocketAddr},
    process::ExitCode,
    thread,
    time::{Duration, Instant},
};

use check::{Family, Miss, Outbound, Proof};
use ipnet::IpNet;
use status::{Names, Status};

use crate::cli::ValidateArgs;

/// Bound on one attempt: the connect, the accept, the reads.
pub const ATTEMPT: Duration = Duration::from_secs(1);
/// Wait before the next attempt after a miss.
pub const RETRY: Duration = Duration::from_millis(50);
/// How often a line says the check is still waiting.
const PROGRESS: Duration = Duration::from_secs(5);

/// What to check, from the environment and the flags.
#[derive(Debug)]
struct Plan {
    /// The range each checked family's attempts connect into.
    targets: Vec<IpNet>,
    pod_ip: IpAddr,
    pod: String,
    namespace: String,
    name: String,
    node: String,
}

/// Runs the check and prints its outcome: exit 0 when the pod is intercepted, 1 when not within
/// the timeout, 2 on bad input or a refusal.
pub fn main(args: &ValidateArgs) -> ExitCode {
    let plan = match plan(args) {
        Ok(plan) => plan,
        Err(message) => {
            eprintln!("probe-bypass validate: {message}");
            return ExitCode::from(2);
        }
    };
    match run(args, &plan) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(Failed::Refused(message)) => {
            eprintln!("probe-bypass validate: {message}");
            ExitCode::from(2)
        }
        Err(Failed::NotIntercepted(message)) => {
            eprintln!("probe-bypass validate: {message}");
            ExitCode::FAILURE
        }
    }
}

enum Failed {
    Refused(String),
    NotIntercepted(String),
}

/// The input checked, or the one message that says what is missing or wrong.
fn plan(args: &ValidateArgs) -> Result<Plan, String> {
    let given = |value: &Option<String>| {
        value
            .as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_owned)
    };
    let missing: Vec<&str> = [
        ("POD_IP (status.podIP)", &args.pod_ip),
        ("POD_NAME (metadata.name)", &args.pod_name),
        ("POD_NAMESPACE (metadata.namespace)", &args.pod_namespace),
        ("NODE_NAME (spec.nodeName)", &args.node_name),
    ]
    .into_iter()
    .filter(|(_, value)| given(value).is_none())
    .map(|(name, _)| name)
    .collect();
    if !missing.is_empty() {
        return Err(format!(
            "{} not set: the validation container gets them from the downward API \
             (env valueFrom.fieldRef), or pass --pod-ip, --pod-name, --pod-namespace, --node-name",
            missing.join(", ")
        ));
    }
    let text = given(&args.pod_ip).unwrap_or_default();
    let pod_ip: IpAddr = text
        .parse()
        .map_err(|_| format!("POD_IP {text:?} is not an IP address"))?;
    let mut families = vec![Family::of(pod_ip)];
    for ip in given(&args.pod_ips).iter().flat_map(|ips| ips.split(',')) {
        let ip: IpAddr = ip
            .trim()
            .parse()
            .map_err(|_| format!("POD_IPS {ip:?} is not an IP address"))?;
        if !families.contains(&Family::of(ip)) {
            families.push(Family::of(ip));
        }
    }
    let targets = targets(&families, &args.target_range)?;
    let namespace = given(&args.pod_namespace).unwrap_or_default();
    let name = given(&args.pod_name).unwrap_or_default();
    Ok(Plan {
        targets,
        pod_ip,
        pod: format!("{namespace}/{name}"),
        namespace,
        name,
        node: given(&args.node_name).unwrap_or_default(),
    })
}

/// The range to aim at for each of the pod's `families`: the default, or the one of
/// `--target-range` of that family; a family without one is not checked, since no connection of
/// it is redirected for the pod (its inclusion list names none).
fn targets(families: &[Family], given: &[IpNet]) -> Result<Vec<IpNet>, String> {
    if given.is_empty() {
        return Ok(families
            .iter()
            .map(|family| family.default_range())
            .collect());
    }
    for family in [Family::V4, Family::V6] {
        let of_family: Vec<String> = given
            .iter()
            .filter(|range| Family::of(range.addr()) == family)
            .map(ToString::to_string)
            .collect();
        if of_family.len() > 1 {
            return Err(format!(
                "--target-range has {} {} ranges ({}): give at most one per family",
                of_family.len(),
                family.label(),
                of_family.join(", ")
            ));
        }
    }
    let targets: Vec<IpNet> = families
        .iter()
        .filter_map(|&family| {
            given
                .iter()
                .find(|range| Family::of(range.addr()) == family)
                .copied()
        })
        .collect();
    if targets.is_empty() {
        let families: Vec<&str> = families.iter().map(|family| family.label()).collect();
        return Err(format!(
            "no --target-range of the pod's families ({}): nothing to check",
            families.join(", ")
        ));
    }
    Ok(targets)
}

fn run(args: &ValidateArgs, plan: &Plan) -> Result<String, Failed> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid == args.proxy_uid {
        return Err(Failed::Refused(format!(
            "refusing to run as UID {uid}, the sidecar proxy's (--proxy-uid): the datapath lets \
             the proxy's own connections through unredirected, so the check would fail even on a \
             protected pod. Run the container as another user (the webhook's validation \
             container runs as 65532)."
        )));
    }
    // The pod's IP must be an address of this namespace: otherwise this is not the pod.
    std::net::TcpListener::bind(SocketAddr::new(plan.pod_ip, 0)).map_err(|error| {
        Failed::Refused(format!(
            "POD_IP {} is not an address of this network namespace ({error}): run the check \
             inside the pod {}",
            plan.pod_ip, plan.pod
        ))
    })?;
    let mut outbounds = Vec::new();
    for &range in &plan.targets {
        let family = Family::of(range.addr());
        let outbound = Outbound::bind(range, args.outbound_port).map_err(|error| {
            let hint = if error.kind() == io::ErrorKind::AddrInUse {
                ": something in the pod listens on it already; the validation container must \
                 run before the sidecar (the mesh's proxy) starts"
            } else {
                ""
            };
            Failed::Refused(format!(
                "cannot listen on the outbound port {} ({}): {error}{hint}",
                args.outbound_port,
                family.label()
            ))
        })?;
        outbounds.push(outbound);
    }
    let started = Instant::now();
    let deadline = started + args.timeout;
    let mut attempts = 0;
    let mut proofs: Vec<Proof> = Vec::new();
    let mut next_progress = started + PROGRESS;
    let mut said_waiting = false;
    for outbound in &outbounds {
        loop {
            attempts += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            match check::attempt(outbound, ATTEMPT.min(left.max(Duration::from_millis(1)))) {
                Ok(proof) => {
                    proofs.push(proof);
                    break;
                }
                Err(miss) => {
                    if Instant::now() + RETRY >= deadline {
                        return Err(Failed::NotIntercepted(not_intercepted(
                            args, plan, outbound, &miss, attempts, started,
                        )));
                    }
                    if !said_waiting || Instant::now() >= next_progress {
                        say_waiting(plan, outbound.family(), &miss, started);
                        said_waiting = true;
                        next_progress = Instant::now() + PROGRESS;
                    }
                    thread::sleep(RETRY);
                }
            }
        }
    }
    let took = started.elapsed();
    let families: Vec<&str> = plan
        .targets
        .iter()
        .map(|range| Family::of(range.addr()).label())
        .collect();
    let shown: Vec<String> = proofs
        .iter()
        .map(|proof| format!("{} (from {})", proof.target, proof.client))
        .collect();
    let agent = match status::ask(plan.pod_ip, args.healthcheck_port) {
        Status::Answered(answer) => format!(
            "; agent {} on node {}",
            answer.agent_pod.as_deref().unwrap_or("(no POD_NAME)"),
            answer.node.as_deref().unwrap_or(&plan.node)
        ),
        _ => String::new(),
    };
    Ok(format!(
        "probe-bypass validate: pod {} is intercepted by the eBPF datapath ({}): connections to \
         {} arrived on the outbound port {} with their original destination and nonce, after {} \
         attempt(s) in {:.1} ms{agent}",
        plan.pod,
        families.join(", "),
        shown.join(" and "),
        args.outbound_port,
        attempts,
        took.as_secs_f64() * 1000.0
    ))
}

fn say_waiting(plan: &Plan, family: Family, miss: &Miss, started: Instant) {
    eprintln!(
        "probe-bypass validate: pod {} not intercepted yet ({}, {} ms): {miss}; retrying",
        plan.pod,
        family.label(),
        started.elapsed().as_millis()
    );
    let _ = io::stderr().flush();
}

fn not_intercepted(
    args: &ValidateArgs,
    plan: &Plan,
    outbound: &Outbound,
    miss: &Miss,
    attempts: u32,
    started: Instant,
) -> String {
    let status = status::ask(plan.pod_ip, args.healthcheck_port);
    let names = Names {
        pod: &plan.pod,
        namespace: &plan.namespace,
        name: &plan.name,
        node: &plan.node,
    };
    format!(
        "pod {} on node {} is not intercepted by the node's eBPF datapath ({}): after {} \
         attempt(s) in {} ms (--timeout {}), the last: {miss}. The pod does not start until this \
         check passes; the kubelet retries it. {}",
        plan.pod,
        plan.node,
        outbound.family().label(),
        attempts,
        started.elapsed().as_millis(),
        humantime::format_duration(args.timeout),
        status::advice(&status, &names, args.outbound_port)
    )
}
