//! What every benchmark's report prints the same way: the machine it ran on, and durations.

use std::{fs, thread, time::Duration};

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
