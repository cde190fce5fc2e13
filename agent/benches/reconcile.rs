//! How soon the agent serves a pod that appears and forgets one that goes (issue 3: "pods added or
//! removed while running update the maps within 100 ms").
//!
//! One release-built agent runs with the eBPF datapath under a test cgroup of this run's own, its
//! pins on a bpffs of its own, and an empty pod manifests directory. Test pods (network namespace
//! and veth each) are made beforehand. Then, one pod at a time, the benchmark writes the pod's
//! manifest into the directory (atomically, as `tests/support/agent.rs` does) and polls until
//!
//! - the pod's address is in the datapath's pinned `PODS_BY_ADDR` map (read with
//!   [`datapath::mapped_addrs`], as an operator's tool would), and
//! - the pod's healthcheck listener accepts a connection from the host;
//!
//! then deletes the manifest and polls until both are gone again. Each time is taken from just
//! before the file is written or deleted.
//!
//! The baseline, in the same run: a watcher of the benchmark's own on the same directory, with the
//! same inotify library the agent uses, timed from the same instant to the moment the event reaches
//! it. That is the floor for any agent that learns its pods from files; the agent adds its debounce
//! (20 ms, so that a burst of writes is read once), a rescan of the directory, a netns switch to
//! bind the listener, and the map writes.
//!
//! Needs root; without it the benchmark says why and exits successfully, unless `CI` is set. The
//! pods, the cgroup, the pins and the agent are removed on exit and on a panic, by their guards.
//! `PB_BENCH_PODS` sets how many pods come and go (default 100).

#![allow(
    clippy::expect_used,
    reason = "a benchmark stops at the first failure, with a message"
)]

#[path = "../../tests/support/mod.rs"]
mod support;

use std::{
    net::{IpAddr, SocketAddr, TcpStream},
    panic,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use notify::{RecursiveMode, Watcher as _};
use probe_bypass::datapath;
use support::{
    agent::{Agent, ManifestDir},
    bpffs::TestPins,
    cgroup::TestCgroup,
    pod::TestPod,
};

/// Pods that come and go, one at a time, unless `PB_BENCH_PODS` says otherwise.
const PODS: usize = 100;

/// How often the state is polled; each poll costs a map read and a connect attempt.
const POLL: Duration = Duration::from_micros(200);

/// A change that takes longer than this is a failure, not a slow result.
const GIVE_UP: Duration = Duration::from_secs(5);

/// The requirement the figures are read against.
const TARGET: Duration = Duration::from_millis(100);

fn main() {
    if !support::privilege::bench_can_run("reconcile") {
        return;
    }
    let count = pods();
    eprintln!("== making {count} pods");
    let pods: Vec<TestPod> = (0..count).map(|_| TestPod::new()).collect();
    let cgroup = TestCgroup::new();
    let pins = TestPins::new();
    let dir = ManifestDir::new();
    let (events, watcher) = watch(&dir);
    let cgroup_root = cgroup.path().display().to_string();
    let pin_path = pins.arg();
    let agent = Agent::start_with_log_filter(
        &dir.path,
        &[
            "--datapath",
            "ebpf",
            "--cgroup-root",
            &cgroup_root,
            "--pin-path",
            &pin_path,
        ],
        "info",
    );
    agent.wait_ready(200, Duration::from_secs(10));

    eprintln!("== adding and removing them one at a time");
    let mut timings = Timings::default();
    for (i, pod) in pods.iter().enumerate() {
        let file = format!("pod-{i}.json");
        let manifest = pod.manifest(&format!("pod-{i}"), &[8080]);
        drain(&events);
        let started = Instant::now();
        dir.write(&file, &manifest);
        timings.added.push(until(pod, &pins, true, started));
        timings.added_event.push(first_event(&events, started));

        drain(&events);
        let started = Instant::now();
        dir.remove(&file);
        timings.removed.push(until(pod, &pins, false, started));
        timings.removed_event.push(first_event(&events, started));
    }
    drop(watcher);
    drop(agent);
    print_report(count, &timings);
}

fn pods() -> usize {
    match std::env::var("PB_BENCH_PODS") {
        Ok(text) => text
            .parse()
            .ok()
            .filter(|&n| n > 0 && n <= 1024)
            .unwrap_or_else(|| panic!("PB_BENCH_PODS={text:?} is not a number from 1 to 1024")),
        Err(_) => PODS,
    }
}

/// The baseline: the benchmark's own inotify watcher on the directory, reporting when each event
/// arrives.
fn watch(dir: &ManifestDir) -> (mpsc::Receiver<Instant>, notify::RecommendedWatcher) {
    let (send, events) = mpsc::channel();
    let mut watcher = notify::recommended_watcher(move |_event| {
        let _ = send.send(Instant::now());
    })
    .expect("an inotify watcher");
    watcher
        .watch(&dir.path, RecursiveMode::NonRecursive)
        .expect("watch the manifests directory");
    (events, watcher)
}

fn drain(events: &mpsc::Receiver<Instant>) {
    while events.try_recv().is_ok() {}
}

/// Time from `started` to the first event the baseline watcher received after it.
fn first_event(events: &mpsc::Receiver<Instant>, started: Instant) -> Duration {
    let at = events
        .recv_timeout(GIVE_UP)
        .expect("the baseline watcher saw the change");
    at.saturating_duration_since(started)
}

/// When a pod's address and healthcheck listener were first seen in the state `present`, each
/// from `started`.
struct Seen {
    map: Duration,
    listener: Duration,
}

/// Polls until the pod's map entry and listener are both present (or both gone).
fn until(pod: &TestPod, pins: &TestPins, present: bool, started: Instant) -> Seen {
    let addr = IpAddr::V4(pod.ip);
    let healthcheck = SocketAddr::new(addr, 15904);
    let (mut map, mut listener) = (None, None);
    loop {
        let now = Instant::now();
        if map.is_none() {
            let addrs = datapath::mapped_addrs(pins.path()).expect("read the pinned pod map");
            if addrs.contains(&addr) == present {
                map = Some(now - started);
            }
        }
        if listener.is_none() && listening(healthcheck) == present {
            listener = Some(now - started);
        }
        if let (Some(map), Some(listener)) = (map, listener) {
            return Seen { map, listener };
        }
        assert!(
            now - started < GIVE_UP,
            "pod {addr}: still not {} after {GIVE_UP:?} (map: {map:?}, listener: {listener:?})",
            if present { "served" } else { "forgotten" },
        );
        thread::sleep(POLL);
    }
}

/// Whether something accepts connections on `addr` (a refusal comes back at once over the veth).
fn listening(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok()
}

#[derive(Default)]
struct Timings {
    added: Vec<Seen>,
    added_event: Vec<Duration>,
    removed: Vec<Seen>,
    removed_event: Vec<Duration>,
}

/// p50, p99 and max of a set of durations.
fn spread(mut values: Vec<Duration>) -> [Duration; 3] {
    values.sort();
    let at = |p: usize| values[(values.len() * p / 100).min(values.len() - 1)];
    [at(50), at(99), values[values.len() - 1]]
}

fn millis(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1e3)
}

fn print_report(count: usize, timings: &Timings) {
    println!("command: `cargo xtask bench reconcile` (PB_BENCH_PODS={count})");
    println!(
        "{count} pods added and removed one at a time; agent built for release, RUST_LOG=info, \
         --datapath ebpf under a test cgroup; target: {}",
        millis(TARGET)
    );
    println!();
    println!("| change | p50 | p99 | max | p50 / baseline p50 | max within target |");
    println!("|---|---:|---:|---:|---:|---|");
    let rows: [(&str, Vec<Duration>, &[Duration]); 6] = [
        (
            "baseline: inotify event, manifest written",
            timings.added_event.clone(),
            &timings.added_event,
        ),
        (
            "added: address in PODS_BY_ADDR",
            timings.added.iter().map(|seen| seen.map).collect(),
            &timings.added_event,
        ),
        (
            "added: healthcheck listener accepts",
            timings.added.iter().map(|seen| seen.listener).collect(),
            &timings.added_event,
        ),
        (
            "baseline: inotify event, manifest deleted",
            timings.removed_event.clone(),
            &timings.removed_event,
        ),
        (
            "removed: address gone from PODS_BY_ADDR",
            timings.removed.iter().map(|seen| seen.map).collect(),
            &timings.removed_event,
        ),
        (
            "removed: healthcheck listener closed",
            timings.removed.iter().map(|seen| seen.listener).collect(),
            &timings.removed_event,
        ),
    ];
    for (what, values, baseline) in rows {
        let [p50, p99, max] = spread(values);
        let [base50, _, _] = spread(baseline.to_vec());
        println!(
            "| {what} | {} | {} | {} | {:.0}× | {} |",
            millis(p50),
            millis(p99),
            millis(max),
            p50.as_secs_f64() / base50.as_secs_f64().max(1e-9),
            if max <= TARGET { "yes" } else { "no" },
        );
    }
}
