//! `cargo xtask bench [which]`: benchmarks that measure the agent against a baseline run in the same
//! invocation, on this machine, and print a table with the ratios. Without a name, all of them.

use anyhow::Result;
use clap::Subcommand;

use crate::{build_ebpf, cargo, cargo_with_env, setup};

#[derive(Clone, Copy, Subcommand)]
pub enum Which {
    /// Probes/s, p50/p99 latency and memory through the agent for 1, 110 and 500 pods, against
    /// direct TCP connects to the same apps.
    Healthcheck,
    /// Connects/s, p50/p99 connect + first byte and 1 MiB transfers through HAProxy sidecars, with
    /// the eBPF datapath (sk_msg off and on) against the mesh's iptables rules and no mesh, for 10,
    /// 100 and 1,000 exclusions per pod; same node and from a second node.
    Datapath,
    /// Time from a pod's manifest appearing (or going) to its map entry and healthcheck listener
    /// being there (or gone), against an inotify watcher's own latency on the same directory.
    Reconcile,
    /// Time until every pod's healthcheck answers again after the node's only agent is SIGKILLed
    /// and restarted, for 110 and 500 pods, against the agent's first start on the node.
    Restart,
    /// Requests/s, p50/p99/p99.9 and CPU per request between two meshed apps with `wrk` over 100
    /// kept-alive connections (same node, from another node) and with a new connection per
    /// request: direct, explicit proxying, the mesh's iptables rules, eBPF with sk_msg off and on.
    Mesh,
}

impl Which {
    const ALL: [Self; 5] = [
        Self::Healthcheck,
        Self::Datapath,
        Self::Reconcile,
        Self::Restart,
        Self::Mesh,
    ];

    /// The `[[bench]]` target's name in agent/Cargo.toml.
    fn target(self) -> &'static str {
        match self {
            Self::Healthcheck => "healthcheck",
            Self::Datapath => "datapath",
            Self::Reconcile => "reconcile",
            Self::Restart => "restart",
            Self::Mesh => "mesh",
        }
    }
}

pub fn run(which: Option<Which>) -> Result<()> {
    setup::ensure()?;
    let all = Which::ALL;
    let selected = match &which {
        Some(one) => std::slice::from_ref(one),
        None => &all[..],
    };
    for which in selected {
        let args = [
            "bench",
            "--package",
            "probe-bypass",
            "--bench",
            which.target(),
        ];
        if matches!(which, Which::Reconcile) {
            // Its `cri` run makes pods through containerd, from the tests' images.
            crate::image::test_programs()?;
            crate::image::run(None)?;
        }
        if matches!(which, Which::Mesh) {
            // The same programs without aya-log, to measure what the log costs when it is off.
            let object = build_ebpf::build_without_log(None)?;
            cargo_with_env(&args, &[("PB_BENCH_NO_LOG_OBJECT", object.as_os_str())])?;
        } else {
            cargo(&args)?;
        }
    }
    Ok(())
}
