//! How long a node's meshed pods go without a healthcheck when the node's only agent dies (issue
//! 15): the agent of a node of 110 and of 500 pods is SIGKILLed and a new one started at once, as
//! the kubelet restarts a crashed container, and the benchmark times, from the new agent's start,
//! until every pod's 15904 accepts again.
//!
//! Each size runs on its own test cgroup and a directory of the pods' manifests, three times, each
//! time an agent started, then SIGKILLed and a new one started:
//!
//! - **baseline**: with `--datapath none`: the new agent only opens a listener in every pod;
//! - **restart**: with the eBPF datapath (release-built, its pins on a bpffs of the run's own),
//!   each pod with its sidecar's inbound listener (a socket on 15003, opened once the programs were
//!   attached, so that sockops filed it in the pinned map, as on a running node). The new agent
//!   adopts the pinned datapath (the programs and maps the dead agent left, which kept
//!   redirecting meanwhile) and opens a listener in every pod again;
//! - **no sidecars**: the same restart with the datapath, no pod's sidecar listening (yet): the
//!   new agent looks for each pod's inbound listener in its namespace and finds none;
//! - **limit**: the new agent's admin endpoint answering `/health/alive`, before any pod is
//!   served: what a restart costs that opens no listener at all.
//!
//! The benchmark polls from inside the programs' cgroup, as the kubelet's probes start there; each
//! poll is a connect to every pod not answering yet.
//!
//! Needs root; without it the benchmark says why and exits successfully, unless `CI` is set.
//! `PB_BENCH_RESTART_SIZES` (for example `110`) picks the sizes.

#![expect(
    clippy::expect_used,
    reason = "a benchmark stops at the first failure, with a message"
)]

use std::{
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use probe_bypass_testing::{
    agent::{Agent, ManifestDir, ebpf_args},
    bench::{create_pods, delete_pods, machine},
    bpffs::TestPins,
    cgroup::TestCgroup,
    pod::TestPod,
};

/// The kubelet's default `maxPods`, and a dense node.
const SIZES: [usize; 2] = [110, 500];

/// The sidecar's inbound port, where its listener is.
const INBOUND_PORT: u16 = 15003;

/// Between two rounds of connects.
const POLL: Duration = Duration::from_millis(1);

/// A restart slower than this is a failure, not a slow result.
const GIVE_UP: Duration = Duration::from_secs(60);

fn main() {
    if !probe_bypass_testing::privilege::bench_can_run("restart") {
        return;
    }
    let sizes: Vec<usize> = std::env::var("PB_BENCH_RESTART_SIZES").map_or_else(
        |_| SIZES.to_vec(),
        |text| {
            text.split(',')
                .map(|n| {
                    n.trim()
                        .parse()
                        .expect("PB_BENCH_RESTART_SIZES: a list of counts")
                })
                .collect()
        },
    );
    let mut rows = Vec::new();
    for &count in &sizes {
        eprintln!("== making {count} pods");
        let pods = create_pods(count);
        rows.push((count, run(&pods)));
        delete_pods(pods);
    }
    println!("command: `cargo xtask bench restart`");
    println!("{}", machine());
    println!(
        "the node's only agent SIGKILLed and a new one started at once; agent built for release, \
         RUST_LOG=info, --datapath ebpf under a test cgroup; times from the agent's start"
    );
    println!();
    println!(
        "| pods | baseline: restart without the datapath, every pod answers | restart with the \
         datapath, every pod answers | restart / baseline | same, no sidecar listening | no \
         sidecars / baseline | limit: restarted agent alive |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for (count, times) in rows {
        let ratio = |time: Duration| time.as_secs_f64() / times.baseline.as_secs_f64();
        println!(
            "| {count} | {} | {} | {:.2}× | {} | {:.2}× | {} |",
            millis(times.baseline),
            millis(times.restart),
            ratio(times.restart),
            millis(times.no_sidecars),
            ratio(times.no_sidecars),
            millis(times.alive),
        );
    }
}

struct Times {
    baseline: Duration,
    restart: Duration,
    no_sidecars: Duration,
    alive: Duration,
}

fn run(pods: &[TestPod]) -> Times {
    let cgroup = TestCgroup::new();
    // The polls are the kubelet's: they start under the programs' cgroup. The agents started
    // meanwhile are in it too, which changes nothing of theirs.
    let inside = cgroup.enter();
    let pins = TestPins::new();
    let dir = ManifestDir::new();
    for (i, pod) in pods.iter().enumerate() {
        dir.write(
            &format!("pod-{i}.json"),
            &pod.manifest(&format!("pod-{i}"), &[8080]),
        );
    }
    let addrs: Vec<SocketAddr> = pods.iter().map(TestPod::healthcheck).collect();
    let cgroup_root = cgroup.path().display().to_string();
    let pin_path = pins.arg();
    let ebpf = ebpf_args(&cgroup_root, &pin_path);
    let start = |args: &[&str]| {
        Agent::builder()
            .pod_manifests(&dir.path)
            .args(args)
            .rust_log("info")
            .spawn()
    };
    let restart = |args: &[&str], before: &dyn Fn()| {
        let first = start(args);
        until_all_answer(&first, &addrs, Instant::now());
        before();
        drop(first); // SIGKILL
        let started = Instant::now();
        let second = start(args);
        until_all_answer(&second, &addrs, started)
    };

    let (baseline, _) = restart(&["--datapath", "none"], &|| {});
    eprintln!(
        "== {} pods: restart without the datapath {baseline:?}",
        pods.len()
    );
    let (no_sidecars, _) = restart(&ebpf, &|| {});
    eprintln!(
        "== {} pods: restart with the datapath, no sidecars {no_sidecars:?}",
        pods.len()
    );
    let sidecars = std::cell::RefCell::new(Vec::new());
    let (with_datapath, alive) = restart(&ebpf, &|| {
        // The sidecars start listening under the programs, as on a running node.
        let mut sidecars = sidecars.borrow_mut();
        for pod in pods {
            sidecars.push(pod.bind(SocketAddr::new([0, 0, 0, 0].into(), INBOUND_PORT)));
        }
    });
    eprintln!(
        "== {} pods: restart with the datapath {with_datapath:?} (alive {alive:?})",
        pods.len()
    );
    drop(sidecars);
    drop(inside);
    Times {
        baseline,
        restart: with_datapath,
        no_sidecars,
        alive,
    }
}

/// Polls until every address accepts a connection, and returns how long after `started` that was
/// and when `agent` first answered `/health/alive`.
fn until_all_answer(agent: &Agent, addrs: &[SocketAddr], started: Instant) -> (Duration, Duration) {
    let mut waiting: Vec<SocketAddr> = addrs.to_vec();
    let mut alive = None;
    while !waiting.is_empty() {
        if alive.is_none() && agent.get("/health/alive").is_some() {
            alive = Some(started.elapsed());
        }
        waiting
            .retain(|addr| TcpStream::connect_timeout(addr, Duration::from_millis(100)).is_err());
        assert!(
            started.elapsed() < GIVE_UP,
            "{} of {} pods still unanswered after {GIVE_UP:?}:\n{}",
            waiting.len(),
            addrs.len(),
            agent.log_text()
        );
        thread::sleep(POLL);
    }
    let all = started.elapsed();
    while alive.is_none() {
        if agent.get("/health/alive").is_some() {
            alive = Some(started.elapsed());
        }
        assert!(
            started.elapsed() < GIVE_UP,
            "the agent never answered /health/alive"
        );
    }
    (all, alive.unwrap_or(all))
}

fn millis(duration: Duration) -> String {
    format!("{:.0} ms", duration.as_secs_f64() * 1e3)
}
