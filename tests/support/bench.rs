//! What the benchmarks share: their knobs from the environment, the load they generate (client
//! threads, connections that close with a reset, latencies), and what every report prints the same
//! way: the machine it ran on, and durations.

use std::{
    fs, io,
    net::{SocketAddr, TcpStream},
    ops::RangeInclusive,
    panic,
    sync::atomic::{AtomicUsize, Ordering},
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
        let rank = (self.latencies.len() * p).div_ceil(100).max(1);
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
