//! `cargo xtask bench <which>`: benchmarks that measure the agent against a baseline run in the same
//! invocation, on this machine, and print a table with the ratios.

use anyhow::Result;
use clap::Subcommand;

use crate::{cargo, setup};

#[derive(Clone, Copy, Subcommand)]
pub enum Which {
    /// Probes/s, p50/p99 latency and memory through the agent for 1, 110 and 500 pods, against
    /// direct TCP connects to the same apps.
    Healthcheck,
}

pub fn run(which: Which) -> Result<()> {
    setup::ensure()?;
    match which {
        Which::Healthcheck => cargo(&[
            "bench",
            "--package",
            "probe-bypass",
            "--bench",
            "healthcheck",
        ]),
    }
}
