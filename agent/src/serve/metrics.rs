//! The agent's Prometheus metrics, served on the admin endpoint's `/metrics`.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Mutex, PoisonError},
    time::Duration,
};

use probe_bypass_rewrite::{ProbeKind, contract::ORIGINAL_PROBES_ANNOTATION};
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

use crate::{
    datapath::{DatapathCollector, SharedDatapath},
    exclusions::{self, AnnotationError},
    pod::PodKey,
    serve::healthcheck::{Outcome, Passthrough},
    serve::prober::{self, Protocol, Verdict},
    source::kube::KubeMetrics,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProbeLabels {
    pub namespace: String,
    pub pod: String,
    pub result: &'static str,
}

/// One probe the agent ran itself: which pod, container and probe, and what it speaks.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProberLabels {
    pub namespace: String,
    pub pod: String,
    /// Empty when the probe's request does not say (a gRPC probe on the healthcheck port).
    pub container: String,
    /// liveness, readiness, startup, or unknown.
    pub probe: &'static str,
    /// http, https or grpc.
    pub protocol: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProberResultLabels {
    #[prometheus(flatten)]
    pub probe: ProberLabels,
    /// success, warning, failure or timeout: [`Verdict::label`].
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PodLabels {
    pub namespace: String,
    pub pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AnnotationLabels {
    pub namespace: String,
    pub pod: String,
    /// The annotation's full key, e.g. `flomesh.io/outbound-port-exclusion-list`.
    pub annotation: String,
}

/// A pod in the datapath: whether the datapath is its only interception (its mesh's iptables init
/// container was replaced), `"true"` or `"false"`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DatapathPodLabels {
    pub namespace: String,
    pub pod: String,
    pub replaced_mesh_init: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DialLabels {
    pub result: &'static str,
}

/// The labels of a pod's prober series other than the pod's: container, probe kind (none when
/// unknown) and protocol.
type ProberSeries = (String, Option<ProbeKind>, Protocol);

/// The `probe` label of a probe that reached the healthcheck port, whose request names neither the
/// container nor the kind of probe it stands for; a known kind is labelled [`ProbeKind::name`].
const UNKNOWN_PROBE: &str = "unknown";

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every metric the agent exports.
pub struct Metrics {
    registry: Registry,
    probes: Family<ProbeLabels, Counter>,
    dial_seconds: HistogramFamily<DialLabels>,
    pods_known: Gauge,
    pods_served: Gauge,
    datapath_pods: Family<DatapathPodLabels, Gauge>,
    listener_errors: Family<PodLabels, Counter>,
    annotation_errors: Family<AnnotationLabels, Counter>,
    probes_before_served: Family<PodLabels, Counter>,
    prober_results: Family<ProberResultLabels, Counter>,
    prober_seconds: HistogramFamily<ProberLabels>,
    passthrough: Family<ProberResultLabels, Counter>,
    /// The prober's series of each pod, so that [`Metrics::forget_pod`] can remove them: their
    /// container names are known only from the probes that ran.
    prober_series: Mutex<BTreeMap<PodKey, BTreeSet<ProberSeries>>>,
}

fn prober_histogram() -> Histogram {
    // 1 ms to about 16 s in 8 buckets: one histogram per probe of every pod, so few buckets. A
    // probe on the pod's own interface takes a millisecond or two; timeouts are whole seconds.
    Histogram::new(exponential_buckets(0.001, 4.0, 8))
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
        let datapath_pods = Family::<DatapathPodLabels, Gauge>::default();
        registry.register(
            "datapath_pod",
            "1 for each meshed pod in the eBPF datapath's maps (its traffic meets its sidecar), with \
             replaced_mesh_init=\"true\" when the datapath is its only interception; always absent \
             with --datapath none",
            datapath_pods.clone(),
        );
        let listener_errors = Family::<PodLabels, Counter>::default();
        registry.register(
            "listener_errors",
            "Failed attempts to open a pod's listeners (netns missing or unusable, bind failed; \
             with --serve-http-probes, a probe port 15901-15903 taken in the pod)",
            listener_errors.clone(),
        );
        let annotation_errors = Family::<AnnotationLabels, Counter>::default();
        registry.register(
            "pod_annotation_errors",
            "Malformed pod annotations (mesh exclusion lists, the original-probes record), ignored, \
             by pod and annotation",
            annotation_errors.clone(),
        );
        let probes_before_served = Family::<PodLabels, Counter>::default();
        registry.register(
            "probes_before_served",
            "Probes from the host network namespace (the kubelet) that reached a meshed pod before \
             the agent served it, when nothing listened on the probe port yet; a series appears \
             once a pod is served with at least one. Counted by the eBPF datapath: always absent \
             with --datapath none",
            probes_before_served.clone(),
        );
        let prober_results = Family::<ProberResultLabels, Counter>::default();
        registry.register(
            "prober_probes",
            "Probes the agent ran itself from inside the pod (the original httpGet and gRPC probes), \
             by pod, container, probe, protocol and result (warning: a redirect the kubelet does not \
             follow, a success to it)",
            prober_results.clone(),
        );
        let prober_seconds: HistogramFamily<ProberLabels> =
            Family::new_with_constructor(prober_histogram);
        registry.register(
            "prober_probe_seconds",
            "Time the agent's own probes took, from the connect to the verdict, by pod, container, \
             probe and protocol",
            prober_seconds.clone(),
        );
        let passthrough = Family::<ProberResultLabels, Counter>::default();
        registry.register(
            "prober_passthrough",
            "TLS connections on the probe ports 15901-15903 (HTTPS probes in the osm shape) relayed \
             to the app's port of the pod's HTTPS probe of the port's kind, by pod, container, probe \
             and result (relayed, refused, timeout; no_probe and ambiguous: closed unrelayed)",
            passthrough.clone(),
        );
        Self {
            registry,
            probes,
            dial_seconds,
            pods_known,
            pods_served,
            datapath_pods,
            listener_errors,
            annotation_errors,
            probes_before_served,
            prober_results,
            prober_seconds,
            passthrough,
            prober_series: Mutex::default(),
        }
    }
}

fn pod_labels(pod: &PodKey) -> PodLabels {
    PodLabels {
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
    }
}

fn prober_labels(
    pod: &PodKey,
    container: &str,
    kind: Option<ProbeKind>,
    protocol: Protocol,
) -> ProberLabels {
    ProberLabels {
        namespace: pod.namespace.clone(),
        pod: pod.name.clone(),
        container: container.to_owned(),
        probe: kind.map_or(UNKNOWN_PROBE, ProbeKind::name),
        protocol: protocol.label(),
    }
}

impl Metrics {
    /// Exports the Kubernetes pod source's metrics.
    pub fn register_kube(&mut self, kube: &KubeMetrics) {
        kube.register(&mut self.registry);
    }

    /// Exports the datapath's counters along with the agent's own metrics.
    pub fn register_datapath(&mut self, datapath: SharedDatapath) {
        self.registry
            .register_collector(Box::new(DatapathCollector(datapath)));
    }

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

    /// Counts a probe the agent ran itself: its result in `probe_bypass_prober_probes_total` and
    /// its latency in `probe_bypass_prober_probe_seconds`, by pod, `container`, `kind` (none when
    /// the request does not say) and `protocol`.
    pub fn prober(
        &self,
        pod: &PodKey,
        container: &str,
        kind: Option<ProbeKind>,
        protocol: Protocol,
        outcome: &prober::Outcome,
    ) {
        let probe = prober_labels(pod, container, kind, protocol);
        self.prober_seconds
            .get_or_create(&probe)
            .observe(outcome.latency.as_secs_f64());
        self.prober_results
            .get_or_create(&ProberResultLabels {
                probe,
                result: outcome.verdict.label(),
            })
            .inc();
        self.note_series(pod, container, kind, protocol);
    }

    /// Counts a TLS connection on a probe port in `probe_bypass_prober_passthrough_total`, by pod,
    /// `container` (empty when none was found) and `kind`.
    pub fn passthrough(
        &self,
        pod: &PodKey,
        container: &str,
        kind: Option<ProbeKind>,
        result: Passthrough,
    ) {
        let probe = prober_labels(pod, container, kind, Protocol::Https);
        self.passthrough
            .get_or_create(&ProberResultLabels {
                probe,
                result: result.label(),
            })
            .inc();
        self.note_series(pod, container, kind, Protocol::Https);
    }

    fn note_series(
        &self,
        pod: &PodKey,
        container: &str,
        kind: Option<ProbeKind>,
        protocol: Protocol,
    ) {
        self.prober_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(pod.clone())
            .or_default()
            .insert((container.to_owned(), kind, protocol));
    }

    /// Counts a pod whose original-probes annotation cannot be read, in
    /// `probe_bypass_pod_annotation_errors_total` under that annotation.
    pub fn original_probes_error(&self, pod: &PodKey) {
        self.annotation_errors
            .get_or_create(&AnnotationLabels {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                annotation: ORIGINAL_PROBES_ANNOTATION.to_owned(),
            })
            .inc();
    }

    pub fn listener_error(&self, pod: &PodKey) {
        self.listener_errors.get_or_create(&pod_labels(pod)).inc();
    }

    /// Counts a pod's malformed exclusion annotations, in
    /// `probe_bypass_pod_annotation_errors_total{namespace,pod,annotation}`, one increment per
    /// annotation each time it is called: call it when a pod is added or changed, with
    /// [`Pod::annotation_errors`](crate::pod::Pod::annotation_errors).
    ///
    /// What a user sees for, say, `flomesh.io/outbound-port-exclusion-list: "443,0"`: a warning in
    /// the log (the reconciler logs each [`AnnotationError`], which names the annotation, its value,
    /// the bad item and why), this counter at 1 for that pod and annotation, and the pod served
    /// with that one annotation ignored, as if it were absent.
    pub fn annotation_errors(&self, pod: &PodKey, errors: &[AnnotationError]) {
        for error in errors {
            self.annotation_errors
                .get_or_create(&AnnotationLabels {
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                    annotation: error.key.clone(),
                })
                .inc();
        }
    }

    /// Adds `probes` to `probe_bypass_probes_before_served_total{namespace,pod}`: the probes the
    /// eBPF datapath counted for a pod while the agent knew it but did not serve it yet (issue 4).
    /// Call it once the pod is served, and only with a count above 0, so that the pods that never
    /// missed a probe (most of them) add no series. With `--datapath none` nothing counts them.
    pub fn probes_before_served(&self, pod: &PodKey, probes: u64) {
        self.probes_before_served
            .get_or_create(&pod_labels(pod))
            .inc_by(probes);
    }

    /// Marks `pod` as in the datapath, replacing its earlier series if the label changed.
    pub fn in_datapath(&self, pod: &PodKey, replaced_mesh_init: bool) {
        let labels = |replaced: bool| DatapathPodLabels {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
            replaced_mesh_init: if replaced { "true" } else { "false" },
        };
        self.datapath_pods.remove(&labels(!replaced_mesh_init));
        self.datapath_pods
            .get_or_create(&labels(replaced_mesh_init))
            .set(1);
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
        self.probes_before_served.remove(&pod_labels(pod));
        for replaced_mesh_init in ["true", "false"] {
            self.datapath_pods.remove(&DatapathPodLabels {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                replaced_mesh_init,
            });
        }
        let series = self
            .prober_series
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(pod);
        for (container, kind, protocol) in series.into_iter().flatten() {
            let probe = prober_labels(pod, &container, kind, protocol);
            for verdict in Verdict::ALL {
                self.prober_results.remove(&ProberResultLabels {
                    probe: probe.clone(),
                    result: verdict.label(),
                });
            }
            for result in Passthrough::ALL {
                self.passthrough.remove(&ProberResultLabels {
                    probe: probe.clone(),
                    result: result.label(),
                });
            }
            self.prober_seconds.remove(&probe);
        }
        let annotations =
            exclusions::annotation_keys().chain([ORIGINAL_PROBES_ANNOTATION.to_owned()]);
        for annotation in annotations {
            self.annotation_errors.remove(&AnnotationLabels {
                namespace: pod.namespace.clone(),
                pod: pod.name.clone(),
                annotation,
            });
        }
    }

    /// The metrics in the Prometheus/OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::exclusions::Exclusions;

    #[test]
    fn prober_outcomes_are_counted_by_probe_and_forgotten_with_the_pod() {
        let metrics = Metrics::default();
        let pod = PodKey {
            namespace: "shop".into(),
            name: "bookstore".into(),
        };
        let outcome = |verdict, millis| prober::Outcome {
            verdict,
            status: Some(200),
            message: String::new(),
            latency: Duration::from_millis(millis),
        };
        let (http, grpc) = (Protocol::Http, Protocol::Grpc);
        metrics.prober(
            &pod,
            "app",
            Some(ProbeKind::Readiness),
            http,
            &outcome(Verdict::Success, 2),
        );
        metrics.prober(
            &pod,
            "app",
            Some(ProbeKind::Readiness),
            http,
            &outcome(Verdict::Success, 3),
        );
        metrics.prober(
            &pod,
            "app",
            Some(ProbeKind::Readiness),
            http,
            &outcome(Verdict::Timeout, 1000),
        );
        metrics.prober(&pod, "", None, grpc, &outcome(Verdict::Failure, 5));
        let text = metrics.encode().unwrap();
        let readiness = "namespace=\"shop\",pod=\"bookstore\",container=\"app\",\
                         probe=\"readiness\",protocol=\"http\"";
        for line in [
            format!("probe_bypass_prober_probes_total{{{readiness},result=\"success\"}} 2"),
            format!("probe_bypass_prober_probes_total{{{readiness},result=\"timeout\"}} 1"),
            format!("probe_bypass_prober_probe_seconds_count{{{readiness}}} 3"),
            "probe_bypass_prober_probes_total{namespace=\"shop\",pod=\"bookstore\",container=\"\",\
             probe=\"unknown\",protocol=\"grpc\",result=\"failure\"} 1"
                .to_owned(),
        ] {
            assert!(text.contains(&line), "{line} in {text}");
        }
        metrics.forget_pod(&pod);
        let text = metrics.encode().unwrap();
        assert!(!text.contains("bookstore"), "{text}");
    }

    #[test]
    fn annotation_errors_are_counted_per_annotation_and_forgotten_with_the_pod() {
        let metrics = Metrics::default();
        let pod = PodKey {
            namespace: "shop".into(),
            name: "bookstore".into(),
        };
        let annotations = BTreeMap::from([
            (
                "flomesh.io/outbound-port-exclusion-list".to_owned(),
                "443,0".to_owned(),
            ),
            (
                "openservicemesh.io/outbound-ip-range-inclusion-list".to_owned(),
                "x".to_owned(),
            ),
        ]);
        let (_, errors) = Exclusions::from_annotations(&annotations);
        metrics.annotation_errors(&pod, &errors);
        metrics.annotation_errors(&pod, &errors[..1]);
        let text = metrics.encode().unwrap();
        assert!(
            text.contains(
                "probe_bypass_pod_annotation_errors_total{namespace=\"shop\",pod=\"bookstore\",\
                 annotation=\"flomesh.io/outbound-port-exclusion-list\"} 2"
            ),
            "{text}"
        );
        assert!(
            text.contains("annotation=\"openservicemesh.io/outbound-ip-range-inclusion-list\"} 1"),
            "{text}"
        );
        metrics.forget_pod(&pod);
        let text = metrics.encode().unwrap();
        assert!(!text.contains("bookstore"), "{text}");
    }

    #[test]
    fn a_pod_in_the_datapath_has_one_series_until_it_is_forgotten() {
        let metrics = Metrics::default();
        let pod = PodKey {
            namespace: "shop".into(),
            name: "bookstore".into(),
        };
        let series = |replaced| {
            format!(
                "probe_bypass_datapath_pod{{namespace=\"shop\",pod=\"bookstore\",\
                 replaced_mesh_init=\"{replaced}\"}} 1"
            )
        };
        metrics.in_datapath(&pod, true);
        let text = metrics.encode().unwrap();
        assert!(text.contains(&series(true)), "{text}");
        // The pod re-created without the replacement: its series says so, and only it.
        metrics.in_datapath(&pod, false);
        let text = metrics.encode().unwrap();
        assert!(text.contains(&series(false)), "{text}");
        assert!(!text.contains(&series(true)), "{text}");
        metrics.forget_pod(&pod);
        let text = metrics.encode().unwrap();
        assert!(!text.contains("bookstore"), "{text}");
    }
}
