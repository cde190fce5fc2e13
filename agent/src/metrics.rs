//! The agent's Prometheus metrics, served on the admin endpoint's `/metrics`.

use std::time::Duration;

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

use crate::{healthcheck::Outcome, pod::PodKey};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub namespace: String,
    pub pod: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub namespace: String,
    pub pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DialLabels {
    pub result: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    probes: Family<ProbeLabels, Counter>,
    dial_seconds: HistogramFamily<DialLabels>,
    pods_known: Gauge,
    pods_served: Gauge,
    listener_errors: Family<PodLabels, Counter>,
}

fn dial_histogram() -> Histogram {
    // 50 µs to about 1.6 s: a local connect takes tens of microseconds, a dial timeout one second.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("probe_bypass");
        let probes = Family::<ProbeLabels, Counter>::default();
        registry.register(
            "healthcheck_probes",
            "Healthcheck requests answered, by pod and result",
            probes.clone(),
        );
        let dial_seconds: HistogramFamily<DialLabels> =
            Family::new_with_constructor(dial_histogram);
        registry.register(
            "healthcheck_dial_seconds",
            "Time to connect to the probed port from inside the pod, by result",
            dial_seconds.clone(),
        );
        let pods_known = Gauge::default();
        registry.register(
            "pods_known",
            "Meshed pods the pod source reports on this node",
            pods_known.clone(),
        );
        let pods_served = Gauge::default();
        registry.register(
            "pods_served",
            "Meshed pods with a healthcheck listener in their network namespace",
            pods_served.clone(),
        );
        let listener_errors = Family::<PodLabels, Counter>::default();
        registry.register(
            "listener_errors",
            "Failed attempts to open a pod's healthcheck listener (netns missing or unusable, bind failed)",
            listener_errors.clone(),
        );
        Self {
            registry,
            probes,
            dial_seconds,
            pods_known,
            pods_served,
            listener_errors,
        }
    }
}

fn pod_labels(pod: &PodKey) -> PodLabels {
    PodLabels {
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
    }
}

impl Metrics {
    pub fn probe(&self, pod: &PodKey, outcome: Outcome) {
        let labels = ProbeLabels {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            result: outcome.label(),
        };
        self.probes.get_or_create(&labels).inc();
    }

    pub fn dial(&self, connected: bool, took: Duration) {
        let result = if connected { "connected" } else { "failed" };
        self.dial_seconds
            .get_or_create(&DialLabels { result })
            .observe(took.as_secs_f64());
    }

    pub fn listener_error(&self, pod: &PodKey) {
        self.listener_errors.get_or_create(&pod_labels(pod)).inc();
    }

    pub fn set_pods(&self, known: usize, served: usize) {
        self.pods_known
            .set(i64::try_from(known).unwrap_or(i64::MAX));
        self.pods_served
            .set(i64::try_from(served).unwrap_or(i64::MAX));
    }

    /// Drops the series of a pod that is gone, so a node's churn does not grow the output forever.
    pub fn forget_pod(&self, pod: &PodKey) {
        for outcome in Outcome::ALL {
            self.probes.remove(&ProbeLabels {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                result: outcome.label(),
            });
        }
        self.listener_errors.remove(&pod_labels(pod));
    }

    /// The metrics in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
