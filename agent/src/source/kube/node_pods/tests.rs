use std::{
    collections::HashMap,
    path::PathBuf,
    sync::atomic::{AtomicUsize, Ordering},
};

use probe_bypass_rewrite::{
    ProbeKind,
    contract::{ORIGINAL_PROBES_ANNOTATION, REPLACED_MESH_INIT_ANNOTATION},
};
use serde_json::json;

use super::super::metrics::PendingLabels;
use super::*;
use crate::discovery::NetnsLookup;

/// An FSM-injected pod as the API server returns it.
const POD: &str = include_str!("../../../../../tests/support/kube_pod.json");
const NODE: &str = "worker-1";

/// The fixture pod named `name` (its UID derived from it), changed by `edit`.
fn pod(name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> K8sPod {
    let mut value: serde_json::Value = serde_json::from_str(POD).expect("fixture");
    value["metadata"]["name"] = json!(name);
    value["metadata"]["uid"] = json!(format!("uid-{name}"));
    edit(&mut value);
    serde_json::from_value(value).expect("a valid Pod")
}

fn with_ip(ip: &'static str) -> impl FnOnce(&mut serde_json::Value) {
    move |pod| {
        pod["status"]["podIP"] = json!(ip);
        pod["status"]["podIPs"] = json!([{ "ip": ip }]);
    }
}

/// A pod just scheduled: no IP yet.
fn pending(pod: &mut serde_json::Value) {
    let status = pod["status"].as_object_mut().expect("status");
    status.remove("podIP");
    status.remove("podIPs");
    status.remove("containerStatuses");
    status.insert("phase".into(), json!("Pending"));
}

fn unchanged(_: &mut serde_json::Value) {}

/// The pod without any of the injector's marks: its proxy label, its injection annotation,
/// and its sidecar's run as the proxy's UID.
fn unmarked(pod: &mut serde_json::Value) {
    let labels = pod["metadata"]["labels"].as_object_mut().expect("labels");
    labels.remove("fsm-proxy-uuid");
    let annotations = pod["metadata"]["annotations"]
        .as_object_mut()
        .expect("annotations");
    annotations.remove("flomesh.io/sidecar-injection");
    for container in pod["spec"]["containers"]
        .as_array_mut()
        .expect("containers")
    {
        if let Some(context) = container["securityContext"].as_object_mut() {
            context.remove("runAsUser");
        }
    }
}

/// Knows the namespaces of some pods by UID, and counts how often it is asked.
#[derive(Default)]
struct FakeLookup {
    known: HashMap<String, NetnsRef>,
    asked: AtomicUsize,
}

impl FakeLookup {
    fn knowing(pods: &[(&str, &str)]) -> Self {
        Self {
            known: pods
                .iter()
                .map(|(name, netns)| (format!("uid-{name}"), NetnsRef::Named((*netns).into())))
                .collect(),
            asked: AtomicUsize::new(0),
        }
    }
}

impl NetnsLookup for FakeLookup {
    fn lookup(&self, pods: &[NetnsQuery]) -> Vec<Result<NetnsRef, String>> {
        self.asked.fetch_add(pods.len(), Ordering::Relaxed);
        pods.iter()
            .map(|q| {
                self.known
                    .get(&q.uid)
                    .cloned()
                    .ok_or_else(|| format!("no process of pod {}", q.uid))
            })
            .collect()
    }
}

fn node_pods() -> (NodePods, KubeMetrics) {
    let metrics = KubeMetrics::default();
    let pods = NodePods::new(NODE.into(), MeshSelector::default(), metrics.clone());
    (pods, metrics)
}

/// Does the lookups due at `now`, as the source does after each event.
fn resolve(pods: &mut NodePods, lookup: &FakeLookup, now: Instant) {
    let due = pods.due_lookups(now);
    let queries: Vec<NetnsQuery> = due.iter().map(|(_, q)| q.clone()).collect();
    for ((key, query), answer) in due.iter().zip(lookup.lookup(&queries)) {
        pods.looked_up(key, query, answer, now);
    }
}

fn served(pods: &NodePods) -> Vec<(String, String, String)> {
    pods.pod_set()
        .values()
        .map(|p| (p.key.name.clone(), p.ip.to_string(), p.netns.to_string()))
        .collect()
}

fn key(name: &str) -> PodKey {
    PodKey {
        namespace: "bookstore".into(),
        name: name.into(),
    }
}

#[test]
fn injected_pod_is_served_with_its_probe_ports_once_its_netns_is_found() {
    let (mut pods, metrics) = node_pods();
    let lookup = FakeLookup::knowing(&[("a", "cni-a")]);
    let now = Instant::now();
    pods.handle(Event::Apply(pod("a", unchanged)), now);
    assert!(pods.pod_set().is_empty(), "not before its netns is known");
    assert_eq!(pods.pending(), (0, 1));
    resolve(&mut pods, &lookup, now);
    let set = pods.pod_set();
    let served = set.get(&key("a")).expect("pod a served");
    assert_eq!(served.ip.to_string(), "10.244.1.17");
    assert_eq!(served.netns, NetnsRef::Named("cni-a".into()));
    assert_eq!(served.probe_ports, BTreeSet::from([14001]));
    assert_eq!(served.exclusions.inbound_ports, BTreeSet::from([9090]));
    assert_eq!(pods.pending(), (0, 0));
    assert_eq!(metrics.netns_lookup_failures.get(), 0);
}

#[test]
fn pod_without_an_ip_is_held_until_the_ip_appears() {
    let (mut pods, metrics) = node_pods();
    let lookup = FakeLookup::knowing(&[("a", "cni-a")]);
    let now = Instant::now();
    pods.handle(Event::Apply(pod("a", pending)), now);
    assert_eq!(pods.pending(), (1, 0));
    assert!(
        pods.due_lookups(now).is_empty(),
        "nothing to look up without an IP"
    );
    assert_eq!(pods.next_lookup(), None);
    pods.handle(Event::Apply(pod("a", with_ip("10.244.1.23"))), now);
    resolve(&mut pods, &lookup, now);
    assert_eq!(
        served(&pods),
        [("a".into(), "10.244.1.23".into(), "/run/netns/cni-a".into())]
    );
    pods.handle(Event::Apply(pod("a", unchanged)), now);
    metrics.set_pending(pods.pending().0, pods.pending().1);
    let gauge = |reason| {
        metrics
            .pods_pending
            .get_or_create(&PendingLabels { reason })
            .get()
    };
    assert_eq!(
        (gauge("no_ip"), gauge("no_netns")),
        (0, 1),
        "new IP, new lookup"
    );
}

#[test]
fn terminating_pod_is_served_until_its_delete_event() {
    let (mut pods, _) = node_pods();
    let lookup = FakeLookup::knowing(&[("a", "cni-a"), ("b", "cni-b")]);
    let now = Instant::now();
    pods.handle(Event::Apply(pod("a", unchanged)), now);
    pods.handle(Event::Apply(pod("b", with_ip("10.244.1.18"))), now);
    resolve(&mut pods, &lookup, now);
    pods.handle(
        Event::Apply(pod("a", |p| {
            p["metadata"]["deletionTimestamp"] = json!("2025-03-11T10:00:00Z");
            p["metadata"]["deletionGracePeriodSeconds"] = json!(30);
        })),
        now,
    );
    assert_eq!(
        pods.pod_set().len(),
        2,
        "probes run during the grace period"
    );
    pods.handle(Event::Delete(pod("a", unchanged)), now);
    assert_eq!(served(&pods).len(), 1);
    assert_eq!(served(&pods)[0].0, "b");
}

#[test]
fn relist_replaces_the_set_whole_and_drops_the_pods_it_misses() {
    let (mut pods, _) = node_pods();
    let lookup = FakeLookup::knowing(&[("a", "cni-a"), ("b", "cni-b")]);
    let now = Instant::now();
    pods.handle(Event::Init, now);
    pods.handle(Event::InitApply(pod("a", unchanged)), now);
    pods.handle(Event::InitApply(pod("b", with_ip("10.244.1.18"))), now);
    assert!(
        pods.due_lookups(now).is_empty(),
        "nothing before the list is complete"
    );
    pods.handle(Event::InitDone, now);
    resolve(&mut pods, &lookup, now);
    assert_eq!(served(&pods).len(), 2);
    assert_eq!(
        lookup.asked.load(Ordering::Relaxed),
        2,
        "one lookup per pod"
    );

    // The watch restarts (410 Gone); b was deleted meanwhile, its Deleted event lost.
    pods.handle(Event::Init, now);
    pods.handle(Event::InitApply(pod("a", unchanged)), now);
    assert_eq!(
        served(&pods).len(),
        2,
        "the old set stays until the list is complete"
    );
    pods.handle(Event::InitDone, now);
    resolve(&mut pods, &lookup, now);
    assert_eq!(
        served(&pods),
        [("a".into(), "10.244.1.17".into(), "/run/netns/cni-a".into())]
    );
    assert_eq!(
        lookup.asked.load(Ordering::Relaxed),
        2,
        "a pod that did not change keeps its netns"
    );

    // A relist of a node without pods empties the set.
    pods.handle(Event::Init, now);
    pods.handle(Event::InitDone, now);
    assert!(pods.pod_set().is_empty());
}

#[test]
fn host_network_unmeshed_finished_and_other_nodes_pods_are_not_served() {
    let (mut pods, _) = node_pods();
    let lookup = FakeLookup::knowing(&[("host", "x"), ("plain", "x"), ("done", "x"), ("far", "x")]);
    let now = Instant::now();
    let events = [
        pod("host", |p| {
            p["spec"]["hostNetwork"] = json!(true);
            with_ip("172.18.0.3")(p);
        }),
        // A container named `sidecar` alone, not running as the proxy's UID, does not make a
        // pod meshed.
        pod("plain", unmarked),
        pod("done", |p| p["status"]["phase"] = json!("Succeeded")),
        pod("far", |p| p["spec"]["nodeName"] = json!("worker-2")),
    ];
    for event in events {
        pods.handle(Event::Apply(event), now);
    }
    resolve(&mut pods, &lookup, now);
    assert!(pods.pod_set().is_empty());
    assert_eq!(lookup.asked.load(Ordering::Relaxed), 0);
    assert_eq!(pods.pending(), (0, 0));
}

#[test]
fn pod_that_finishes_or_loses_its_mesh_marks_is_dropped() {
    let (mut pods, _) = node_pods();
    let lookup = FakeLookup::knowing(&[("a", "cni-a"), ("b", "cni-b")]);
    let now = Instant::now();
    pods.handle(Event::Apply(pod("a", unchanged)), now);
    pods.handle(Event::Apply(pod("b", with_ip("10.244.1.18"))), now);
    resolve(&mut pods, &lookup, now);
    pods.handle(
        Event::Apply(pod("a", |p| p["status"]["phase"] = json!("Failed"))),
        now,
    );
    pods.handle(
        Event::Apply(pod("b", |p| {
            with_ip("10.244.1.18")(p);
            unmarked(p);
        })),
        now,
    );
    assert!(pods.pod_set().is_empty());
}

#[test]
fn unresolved_netns_is_retried_with_backoff_and_holds_no_other_pod() {
    let (mut pods, metrics) = node_pods();
    let mut lookup = FakeLookup::knowing(&[("b", "cni-b")]);
    let now = Instant::now();
    pods.handle(Event::Apply(pod("a", unchanged)), now);
    pods.handle(Event::Apply(pod("b", with_ip("10.244.1.18"))), now);
    resolve(&mut pods, &lookup, now);
    assert_eq!(served(&pods)[0].0, "b");
    assert_eq!(pods.pending(), (0, 1));
    assert_eq!(metrics.netns_lookup_failures.get(), 1);
    assert_eq!(pods.next_lookup(), Some(now + FIRST_RETRY));
    assert!(pods.due_lookups(now).is_empty());
    let later = now + FIRST_RETRY;
    resolve(&mut pods, &lookup, later);
    assert_eq!(
        pods.next_lookup(),
        Some(later + FIRST_RETRY * 2),
        "backoff doubles"
    );
    lookup
        .known
        .insert("uid-a".into(), NetnsRef::Named("cni-a".into()));
    resolve(&mut pods, &lookup, later + FIRST_RETRY * 2);
    assert_eq!(served(&pods).len(), 2);
    assert_eq!(metrics.netns_lookup_failures.get(), 2);
    assert_eq!(RETRY.delay(40), MAX_RETRY);
}

#[test]
fn pending_pod_is_looked_up_at_once_when_its_cgroup_gets_a_process_then_every_20_ms_doubling() {
    let ms = Duration::from_millis;
    let (mut pods, _) = node_pods();
    let mut lookup = FakeLookup::default();
    let listed = Instant::now();
    pods.handle(Event::Apply(pod("a", unchanged)), listed);
    resolve(&mut pods, &lookup, listed);
    resolve(&mut pods, &lookup, listed + ms(200));
    assert_eq!(
        pods.next_lookup(),
        Some(listed + ms(600)),
        "without a process, the slow backoff: 200 ms, 400 ms…"
    );
    let [(key, query)] = &pods.awaiting_netns()[..] else {
        panic!("pod a waits for its netns");
    };
    pods.populated(key, query, false, listed + ms(300));
    assert_eq!(pods.next_lookup(), Some(listed + ms(600)));

    let arrived = listed + ms(320);
    pods.populated(key, query, true, arrived);
    assert_eq!(pods.due_lookups(arrived).len(), 1, "looked up at once");
    // The runtime has not moved the process into the pod's namespace yet.
    resolve(&mut pods, &lookup, arrived);
    assert_eq!(pods.next_lookup(), Some(arrived + ms(20)));
    pods.populated(key, query, true, arrived + ms(10));
    assert_eq!(
        pods.next_lookup(),
        Some(arrived + ms(20)),
        "a cgroup still populated does not start the backoff again"
    );
    resolve(&mut pods, &lookup, arrived + ms(20));
    assert_eq!(pods.next_lookup(), Some(arrived + ms(60)), "then 40 ms");
    lookup
        .known
        .insert("uid-a".into(), NetnsRef::Named("cni-a".into()));
    resolve(&mut pods, &lookup, arrived + ms(60));
    assert_eq!(
        served(&pods),
        [("a".into(), "10.244.1.17".into(), "/run/netns/cni-a".into())],
        "served 60 ms after its first process, not at the slow backoff's next try (600 ms)"
    );
    assert!(pods.awaiting_netns().is_empty());
}

#[test]
fn a_terminating_pod_whose_sandbox_is_gone_is_let_go_without_counting_a_lost_namespace() {
    let file = TempFile(std::env::temp_dir().join(format!("pb-kube-ended-{}", std::process::id())));
    std::fs::write(&file.0, "").expect("netns stand-in");
    let (mut pods, metrics) = node_pods();
    let mut lookup = FakeLookup::default();
    lookup
        .known
        .insert("uid-a".into(), NetnsRef::Path(file.0.clone()));
    let now = Instant::now();
    pods.handle(Event::Apply(pod("a", unchanged)), now);
    resolve(&mut pods, &lookup, now);
    pods.handle(
        Event::Apply(pod("a", |p| {
            p["metadata"]["deletionTimestamp"] = json!("2025-03-11T10:00:00Z");
        })),
        now,
    );
    assert_eq!(served(&pods).len(), 1, "served during the grace period");

    // The kubelet stopped its containers; the delete event has not come yet.
    std::fs::remove_file(&file.0).expect("remove");
    pods.revalidate(now);
    assert!(pods.pod_set().is_empty(), "let go");
    assert_eq!(metrics.netns_lost.get(), 0, "not a lost namespace");
    assert!(pods.due_lookups(now).is_empty(), "nothing looked for");
    assert!(
        pods.pending_pods().is_empty(),
        "nothing holds readiness back"
    );
    pods.handle(Event::Delete(pod("a", unchanged)), now);
    assert!(pods.pod_set().is_empty());
}

/// A file standing for a namespace file, removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn netns_is_looked_up_again_when_its_file_is_gone_or_the_pod_is_replaced() {
    let file = TempFile(std::env::temp_dir().join(format!("pb-kube-netns-{}", std::process::id())));
    let first = file.0.clone();
    std::fs::write(&first, "").expect("netns stand-in");
    let (mut pods, metrics) = node_pods();
    let mut lookup = FakeLookup::default();
    lookup
        .known
        .insert("uid-a".into(), NetnsRef::Path(first.clone()));
    let now = Instant::now();
    pods.handle(Event::Apply(pod("a", unchanged)), now);
    resolve(&mut pods, &lookup, now);
    pods.revalidate(now);
    assert!(pods.due_lookups(now).is_empty(), "the file is there");
    assert_eq!(metrics.netns_lost.get(), 0);

    std::fs::remove_file(&first).expect("remove");
    lookup
        .known
        .insert("uid-a".into(), NetnsRef::Named("cni-a2".into()));
    pods.revalidate(now);
    assert_eq!(metrics.netns_lost.get(), 1, "the file went away");
    assert_eq!(
        served(&pods)[0].2,
        first.display().to_string(),
        "served meanwhile"
    );
    resolve(&mut pods, &lookup, now);
    assert_eq!(served(&pods)[0].2, "/run/netns/cni-a2");

    // Deleted and created again under the same name: a new UID, a new sandbox.
    pods.handle(
        Event::Apply(pod("a", |p| p["metadata"]["uid"] = json!("uid-a-2"))),
        now,
    );
    assert!(pods.pod_set().is_empty());
    lookup
        .known
        .insert("uid-a-2".into(), NetnsRef::Named("cni-a3".into()));
    resolve(&mut pods, &lookup, now);
    assert_eq!(served(&pods)[0].2, "/run/netns/cni-a3");
}

#[test]
fn invalid_pod_ip_is_reported_once_per_change() {
    let (mut pods, metrics) = node_pods();
    let now = Instant::now();
    pods.handle(Event::Apply(pod("a", with_ip("10.244.1.300"))), now);
    pods.handle(
        Event::Apply(pod("a", |p| {
            with_ip("10.244.1.300")(p);
            p["metadata"]["resourceVersion"] = json!("418300");
            p["status"]["conditions"] = json!([]);
        })),
        now,
    );
    assert_eq!(metrics.pod_errors.get(), 1);
    assert!(pods.due_lookups(now).is_empty());
    assert!(pods.pod_set().is_empty());
}

/// The original probes and the record of a replaced init container reach `Pod::from_k8s`
/// through the trim: without them the pod's rewritten httpGet probes would fail with 404, and
/// `uninstall` would not know the pod depends on the datapath.
#[test]
fn the_annotations_the_pod_is_served_from_survive_the_trim() {
    let (pods, _) = node_pods();
    let originals = r#"{"bookstore":{"liveness":{"httpGet":{"path":"/live","port":14001}}}}"#;
    let annotated = pod("a", |pod| {
        let annotations = pod["metadata"]["annotations"]
            .as_object_mut()
            .expect("annotations");
        annotations.insert(ORIGINAL_PROBES_ANNOTATION.into(), json!(originals));
        annotations.insert(REPLACED_MESH_INIT_ANNOTATION.into(), json!("{}"));
    });
    let kept = trim(annotated, &pods.kept_annotations);
    let parsed = Pod::from_k8s(&kept, NetnsRef::Named("pod-a".into())).expect("a served pod");
    assert!(parsed.pod.replaced_mesh_init);
    assert!(parsed.pod.originals_error.is_none());
    assert_eq!(
        parsed
            .pod
            .originals
            .iter()
            .map(|(c, k, _)| (c.to_owned(), k))
            .collect::<Vec<_>>(),
        vec![("bookstore".to_owned(), ProbeKind::Liveness)]
    );
}

#[test]
fn only_the_fields_the_agent_serves_from_are_kept() {
    let (pods, _) = node_pods();
    let kept = trim(pod("a", unchanged), &pods.kept_annotations);
    assert!(kept.metadata.managed_fields.is_none());
    assert!(kept.metadata.labels.is_none());
    assert_eq!(
        kept.metadata
            .annotations
            .map(|a| a.into_keys().collect::<Vec<_>>()),
        Some(vec!["flomesh.io/inbound-port-exclusion-list".to_owned()])
    );
    let spec = kept.spec.expect("spec");
    assert!(spec.volumes.is_none() && spec.node_name.is_none());
    assert!(
        spec.containers
            .iter()
            .all(|c| c.env.is_none() && c.image.is_none())
    );
    assert!(spec.containers[0].liveness_probe.is_some());
    let status = kept.status.expect("status");
    assert_eq!(status.pod_ip.as_deref(), Some("10.244.1.17"));
    assert!(status.conditions.is_none() && status.container_statuses.is_none());
}

/// A pod whose validation init container (`--replace-mesh-init`) is running: the sandbox is up,
/// with its IP, but the pod is Pending, not initialized, and its app and sidecar wait. The agent
/// must serve it now, or the validation would wait for it forever.
fn initializing(pod: &mut serde_json::Value) {
    let status = pod["status"].as_object_mut().expect("status");
    status.insert("phase".into(), json!("Pending"));
    status.insert(
        "conditions".into(),
        json!([
            {"type": "PodReadyToStartContainers", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2025-03-11T09:14:29Z"},
            {"type": "Initialized", "status": "False", "lastProbeTime": null, "lastTransitionTime": "2025-03-11T09:14:27Z", "reason": "ContainersNotInitialized", "message": "containers with incomplete status: [probe-bypass-validation]"},
            {"type": "Ready", "status": "False", "lastProbeTime": null, "lastTransitionTime": "2025-03-11T09:14:27Z", "reason": "ContainersNotReady", "message": "containers with unready status: [bookstore sidecar]"},
            {"type": "ContainersReady", "status": "False", "lastProbeTime": null, "lastTransitionTime": "2025-03-11T09:14:27Z", "reason": "ContainersNotReady", "message": "containers with unready status: [bookstore sidecar]"},
            {"type": "PodScheduled", "status": "True", "lastProbeTime": null, "lastTransitionTime": "2025-03-11T09:14:27Z"}
        ]),
    );
    status.insert(
        "initContainerStatuses".into(),
        json!([{
            "name": "probe-bypass-validation",
            "state": {"running": {"startedAt": "2025-03-11T09:14:29Z"}},
            "lastState": {},
            "ready": false,
            "restartCount": 0,
            "image": "docker.io/flomesh/probe-bypass:0.1.0",
            "imageID": "",
            "containerID": "containerd://5a1f0c3e9d7b2a48e6c1f0d9b3a7e5c2d4f6a8b0c1e3d5f7a9b2c4d6e8f0a1b3",
            "started": true
        }]),
    );
    status.insert(
        "containerStatuses".into(),
        json!(["bookstore", "sidecar"].map(|name| json!({
            "name": name,
            "state": {"waiting": {"reason": "PodInitializing"}},
            "lastState": {},
            "ready": false,
            "restartCount": 0,
            "image": "",
            "imageID": "",
            "started": false
        }))),
    );
}

#[test]
fn pod_whose_init_containers_run_is_served_with_its_sandbox() {
    let (mut pods, _metrics) = node_pods();
    let lookup = FakeLookup::knowing(&[("a", "cni-a")]);
    let now = Instant::now();
    pods.handle(Event::Apply(pod("a", initializing)), now);
    resolve(&mut pods, &lookup, now);
    assert_eq!(
        served(&pods),
        [("a".into(), "10.244.1.17".into(), "/run/netns/cni-a".into())],
        "a Pending pod with an IP and a sandbox is served while its init containers run"
    );
    assert_eq!(pods.pending(), (0, 0));
    // When the validation has passed and the pod runs, it stays served as it was.
    pods.handle(Event::Apply(pod("a", unchanged)), now);
    resolve(&mut pods, &lookup, now);
    assert_eq!(
        served(&pods),
        [("a".into(), "10.244.1.17".into(), "/run/netns/cni-a".into())]
    );
}
