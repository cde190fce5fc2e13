//! What the benchmarks share: their knobs from the environment, the load they generate (client
//! threads, connections that close with a reset, latencies), and what every report prints the same
//! way: the machine it ran on, and durations.

use std::{
    fs, io,
    net::{SocketAddr, TcpStream},
    ops::RangeInclusive,
    panic,
    path::Path,
    process::Command,
    sync::atomic::{AtomicBool, AtomicUsize, Ordering},
    thread,
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::pod::TestPod;

/// CPUs, CPU model and kernel, for reading the figures in context.
pub fn machine() -> String {
    let cpus = thread::available_parallelism().map_or(0, usize::from);
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let model = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("model name"))
        .and_then(|rest| rest.split_once(':'))
        .map(|(_, model)| model.trim().to_owned())
        .unwrap_or_else(|| "unknown CPU".to_owned());
    format!("{cpus} CPUs (nproc), {model}, Linux {}", kernel.trim())
}

/// The machine's load averages (1, 5, 15 minutes): other work on the two cores moves every figure.
pub fn load_average() -> String {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    text.split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// The installed HAProxy's version, as `haproxy -v` prints it.
pub fn haproxy_version() -> String {
    Command::new("haproxy")
        .arg("-v")
        .output()
        .ok()
        .and_then(|output| {
            String::from_utf8_lossy(&output.stdout)
                .split_whitespace()
                .nth(2)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "?".to_owned())
}

/// Which of `tools` is not installed, as a sentence for a skip or failure, if any is missing.
fn missing_tools(tools: &[&str]) -> Option<String> {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|tool| {
            !["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
                .iter()
                .any(|dir| Path::new(dir).join(tool).exists())
        })
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "{} not installed (run `cargo xtask setup`)",
            missing.join(", ")
        )
    })
}

/// Whether benchmark `name` can run here: root (see [`crate::privilege`]) and each of `tools`
/// installed. If not, it says why and the benchmark should return, unless `CI` is set, where a
/// benchmark that cannot run fails.
pub fn bench_may_run(name: &str, tools: &[&str]) -> bool {
    if !crate::privilege::bench_can_run(name) {
        return false;
    }
    let Some(missing) = missing_tools(tools) else {
        return true;
    };
    if std::env::var_os("CI").is_some() {
        panic!("bench {name}: cannot run ({missing}) and CI is set");
    }
    eprintln!("SKIPPED bench {name}: {missing}");
    false
}

/// The command that ran benchmark `name`, as the report's first line gives it.
pub fn command_line(name: &str) -> String {
    let skip = if std::env::var_os("AYA_BUILD_SKIP").is_some() {
        "AYA_BUILD_SKIP=1 "
    } else {
        ""
    };
    format!(
        "command: `{skip}cargo bench -p probe-bypass --bench {name}` (`cargo xtask bench {name}`)"
    )
}

/// Set by SIGINT or SIGTERM once [`catch_interrupts`] ran; the run stops at its next step.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// SIGINT and SIGTERM only set a flag: the run then panics at its next step
/// ([`stop_if_interrupted`]) and the guards remove everything on the way out. Children (exec'd, so
/// back to the default action) die of a Ctrl-C themselves, which ends the step in progress at once.
pub fn catch_interrupts() {
    use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
    extern "C" fn note(_: libc::c_int) {
        INTERRUPTED.store(true, Ordering::SeqCst);
    }
    let action = SigAction::new(SigHandler::Handler(note), SaFlags::empty(), SigSet::empty());
    for signal in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { sigaction(signal, &action) }.expect("install a signal handler");
    }
}

/// Panics (so that the guards clean up) if SIGINT or SIGTERM came since [`catch_interrupts`].
pub fn stop_if_interrupted() {
    assert!(
        !INTERRUPTED.load(Ordering::SeqCst),
        "interrupted; cleaning up"
    );
}

/// Runs a benchmark's own binary in its client role (`command`, with `role_variable=client` set
/// here) and returns what it printed, panicking with it if the client failed. `to` names the
/// client's target in the message.
pub fn client_output(
    mut command: Command,
    role_variable: &str,
    to: impl std::fmt::Display,
) -> String {
    let output = command
        .env(role_variable, "client")
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("run the client");
    stop_if_interrupted();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "client to {to} failed ({}): {stdout}",
        output.status
    );
    stdout
}

/// The median of `values`, which must not be empty.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Half the range of `values`, as a share of their median: `±3%`.
pub fn spread(values: &[f64]) -> String {
    let (low, high) = values.iter().fold((f64::MAX, f64::MIN), |(low, high), &v| {
        (low.min(v), high.max(v))
    });
    format!(
        "{:.0}%",
        (high - low) / 2.0 / median(values.to_vec()) * 100.0
    )
}

/// The CPU time process `pid` has used, all its threads together, user and system (the
/// scheduler's own count, `/proc/<pid>/task/*/schedstat`, in nanoseconds). A thread that ended is
/// no longer counted, so measure processes whose threads live as long as they do.
pub fn cpu_time(pid: u32) -> Duration {
    let tasks = format!("/proc/{pid}/task");
    let entries = fs::read_dir(&tasks).unwrap_or_else(|error| panic!("read {tasks}: {error}"));
    let nanos: u64 = entries
        .filter_map(Result::ok)
        .filter_map(|task| fs::read_to_string(task.path().join("schedstat")).ok())
        .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(nanos)
}

/// A duration in whole microseconds, as the reports' tables give latencies.
pub fn micros(duration: Duration) -> String {
    format!("{} µs", duration.as_micros())
}

/// The count the environment variable `name` sets, `default` without it. A value that is not a
/// number in `allowed` stops the benchmark, naming the variable: a typo must not measure the
/// default.
pub fn count_from_env(name: &str, default: usize, allowed: RangeInclusive<usize>) -> usize {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .ok()
            .filter(|n| allowed.contains(n))
            .unwrap_or_else(|| {
                if *allowed.end() == usize::MAX {
                    panic!("{name}={text:?} is not a positive number")
                }
                panic!(
                    "{name}={text:?} is not a number from {} to {}",
                    allowed.start(),
                    allowed.end()
                )
            }),
        Err(_) => default,
    }
}

/// `PB_BENCH_REQUESTS`, the requests (or connections) per measurement, every benchmark's knob for a
/// quick run; `default` without it.
pub fn requests(default: usize) -> usize {
    count_from_env("PB_BENCH_REQUESTS", default, 1..=usize::MAX)
}

/// A client socket with SO_LINGER 0, connected to `addr` within `timeout`: closing it resets the
/// connection instead of leaving it in TIME_WAIT. Tens of thousands of short connections to one
/// address would otherwise use up the ephemeral ports towards it within a run, and a benchmark's
/// paths all use it, so the comparisons stay fair.
pub fn connect_with_reset(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_linger(Some(Duration::ZERO))?;
    socket.connect_timeout(&addr.into(), timeout)?;
    Ok(socket.into())
}

/// What [`run_load`] measured.
pub struct Measured {
    /// From the first request's start to the last one's end.
    pub elapsed: Duration,
    /// The latency of each request that succeeded, sorted.
    pub latencies: Vec<Duration>,
    /// Why each failed request failed.
    pub failures: Vec<String>,
}

impl Measured {
    /// Nearest-rank percentile `p` (0 < p ≤ 100) of the latencies, which must not be empty.
    pub fn percentile(&self, p: usize) -> Duration {
        self.per_mille(p * 10)
    }

    /// Nearest-rank quantile `pm` per mille (0 < pm ≤ 1000), for p99.9; the latencies must not be
    /// empty.
    pub fn per_mille(&self, pm: usize) -> Duration {
        let rank = (self.latencies.len() * pm).div_ceil(1000).max(1);
        self.latencies[rank - 1]
    }
}

/// Makes `count` requests from `threads` client threads, each with one request at a time, and stops
/// early at `limit`. Request `i` is `one(&mut state, i)`, timed from its start to its end, where
/// `state` is what `setup` made for the thread when it started (a read buffer, say, or the
/// thread's scheduling class). Every request is made, failures included: the caller decides what a
/// failure means for its figures.
pub fn run_load<S>(
    threads: usize,
    count: usize,
    limit: Duration,
    setup: impl Fn() -> S + Sync,
    one: impl Fn(&mut S, usize) -> Result<(), String> + Sync,
) -> Measured {
    let next = AtomicUsize::new(0);
    let started = Instant::now();
    let deadline = started + limit;
    let clients: Vec<(Vec<Duration>, Vec<String>)> = thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut state = setup();
                    let mut latencies = Vec::with_capacity(count / threads + 1);
                    let mut failures = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count || Instant::now() >= deadline {
                            break;
                        }
                        let sent = Instant::now();
                        match one(&mut state, i) {
                            Ok(()) => latencies.push(sent.elapsed()),
                            Err(error) => failures.push(error),
                        }
                    }
                    (latencies, failures)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|worker| worker.join().expect("a client thread panicked"))
            .collect()
    });
    let elapsed = started.elapsed();
    let mut latencies = Vec::with_capacity(count);
    let mut failures = Vec::new();
    for (done, failed) in clients {
        latencies.extend(done);
        failures.extend(failed);
    }
    latencies.sort_unstable();
    Measured {
        elapsed,
        latencies,
        failures,
    }
}

/// Threads that create and delete the pods. Each pod takes about ten `ip` runs, mostly waiting on
/// the kernel rather than using a CPU, so a few in parallel make setup of 500 pods seconds instead
/// of a minute, even on 2 cores.
const SETUP_THREADS: usize = 8;

/// Creates `count` pods on [`SETUP_THREADS`] threads. If any creation fails, the pods already
/// made are deleted (by their guards) before the panic goes on.
pub fn create_pods(count: usize) -> Vec<TestPod> {
    let threads = SETUP_THREADS.min(count);
    thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let share = count / threads + usize::from(t < count % threads);
                scope.spawn(move || (0..share).map(|_| TestPod::new()).collect::<Vec<_>>())
            })
            .collect();
        let mut pods = Vec::with_capacity(count);
        let mut failure = None;
        for worker in workers {
            match worker.join() {
                Ok(mut made) => pods.append(&mut made),
                Err(payload) => failure = Some(payload),
            }
        }
        if let Some(payload) = failure {
            delete_pods(pods);
            panic::resume_unwind(payload);
        }
        pods
    })
}

/// Drops the pods' guards on [`SETUP_THREADS`] threads.
pub fn delete_pods(mut pods: Vec<TestPod>) {
    let share = pods.len().div_ceil(SETUP_THREADS).max(1);
    thread::scope(|scope| {
        while !pods.is_empty() {
            let batch: Vec<TestPod> = pods.drain(..share.min(pods.len())).collect();
            scope.spawn(move || drop(batch));
        }
    });
}
