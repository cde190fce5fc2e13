//! The datapath's event counters: read from their per-CPU map, and exported at every scrape.

use probe_bypass_common::{Counter, names};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric as _},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::{Datapath, DatapathError, ProbeBypass, SharedDatapath, error::map_error};

/// The datapath's counters, summed over all CPUs since the maps were created (they survive
/// restarts of the agent).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub connects: u64,
    pub redirected_outbound: u64,
    pub redirected_inbound: u64,
    pub probe_bypassed: u64,
    pub bypass_refused: u64,
    pub orig_dst_lookups: u64,
    pub orig_dst_misses: u64,
    pub sk_msg_redirected: u64,
    pub remote_redirected: u64,
    pub remote_excluded: u64,
    pub remote_refused: u64,
}

impl Counters {
    fn field(&mut self, counter: Counter) -> &mut u64 {
        match counter {
            Counter::Connects => &mut self.connects,
            Counter::RedirectedOutbound => &mut self.redirected_outbound,
            Counter::RedirectedInbound => &mut self.redirected_inbound,
            Counter::ProbeBypassed => &mut self.probe_bypassed,
            Counter::BypassRefused => &mut self.bypass_refused,
            Counter::OrigDstLookups => &mut self.orig_dst_lookups,
            Counter::OrigDstMisses => &mut self.orig_dst_misses,
            Counter::SkMsgRedirected => &mut self.sk_msg_redirected,
            Counter::RemoteRedirected => &mut self.remote_redirected,
            Counter::RemoteExcluded => &mut self.remote_excluded,
            Counter::RemoteRefused => &mut self.remote_refused,
        }
    }

    /// Each counter with its metric name suffix and help text.
    pub fn describe(&self) -> [(&'static str, &'static str, u64); 11] {
        [
            (
                "connects",
                "TCP connects the datapath decided on",
                self.connects,
            ),
            (
                "redirected_outbound",
                "Meshed pods' connections sent to their proxy's outbound port",
                self.redirected_outbound,
            ),
            (
                "redirected_inbound",
                "Connections to meshed pods sent to their proxy's inbound port",
                self.redirected_inbound,
            ),
            (
                "probe_bypassed",
                "Connections from the host network namespace to a probe port, let past the proxy",
                self.probe_bypassed,
            ),
            (
                "bypass_refused",
                "Connections to a probe port from elsewhere, sent to the proxy",
                self.bypass_refused,
            ),
            (
                "orig_dst_lookups",
                "SO_ORIGINAL_DST lookups by proxies",
                self.orig_dst_lookups,
            ),
            (
                "orig_dst_misses",
                "SO_ORIGINAL_DST lookups for connections the datapath did not redirect",
                self.orig_dst_misses,
            ),
            (
                "sk_msg_redirected",
                "Messages handed straight to a same-node peer socket",
                self.sk_msg_redirected,
            ),
            (
                "remote_redirected",
                "Connections from other nodes to meshed pods, handed to their proxy's inbound listener",
                self.remote_redirected,
            ),
            (
                "remote_excluded",
                "Connections from other nodes to an excluded port of a meshed pod, let through",
                self.remote_excluded,
            ),
            (
                "remote_refused",
                "Connections from other nodes to meshed pods refused: no known proxy listener",
                self.remote_refused,
            ),
        ]
    }
}

impl Datapath {
    /// Reads the counters, summed over all CPUs.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        let mut counters = Counters::default();
        for counter in Counter::ALL {
            let per_cpu = self
                .counters
                .get(&counter.index(), 0)
                .map_err(|source| map_error(names::COUNTERS, "read", source))?;
            // Wrapping: a 64-bit count will not overflow, and if it did a metric should not panic.
            *counters.field(counter) = per_cpu
                .iter()
                .fold(0, |sum: u64, value| sum.wrapping_add(*value));
        }
        Ok(counters)
    }
}

/// Reads the eBPF datapath's per-CPU counters at every scrape, summed over CPUs, as
/// `probe_bypass_datapath_<counter>_total`. The counters live in pinned maps, so they carry on
/// across restarts of the agent.
#[derive(Debug)]
pub struct DatapathCollector(pub SharedDatapath);

impl Collector for DatapathCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), std::fmt::Error> {
        let (counters, probe_bypass) = match self.0.lock() {
            Ok(datapath) => (
                datapath.counters(),
                datapath.settings().probe_bypass.clone(),
            ),
            // A scrape must not fail because of this; the metric is simply absent this time.
            Err(_) => return Ok(()),
        };
        let gauges = [
            (
                "kubelet_cgroup_trusted",
                "1 when only the kubelet's cgroup gets past the proxy on the probe ports \
                 (--probe-bypass-from kubelet, the cgroup found)",
                matches!(probe_bypass, ProbeBypass::Kubelet(_)),
            ),
            (
                "kubelet_cgroup_not_found",
                "1 when --probe-bypass-from kubelet could not find the kubelet's cgroup and the \
                 whole host network namespace gets past the proxy on the probe ports meanwhile",
                probe_bypass.fallback().is_some(),
            ),
        ];
        for (name, help, on) in gauges {
            let metric = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            ConstGauge::new(i64::from(on)).encode(metric)?;
        }
        let counters = match counters {
            Ok(counters) => counters,
            Err(error) => {
                log::warn!("cannot read the datapath counters: {error}");
                return Ok(());
            }
        };
        for (name, help, value) in counters.describe() {
            let name = format!("datapath_{name}");
            let metric = encoder.encode_descriptor(&name, help, None, MetricType::Counter)?;
            ConstCounter::new(value).encode(metric)?;
        }
        Ok(())
    }
}
