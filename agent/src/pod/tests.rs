use super::*;

#[test]
fn a_healthcheck_request_is_matched_to_the_recorded_probes_it_may_stand_for() {
    let mut pod = Pod::for_tests();
    pod.originals = OriginalProbes::parse(
        r#"{"app": {"liveness": {"grpc": {"port": 9090}, "timeoutSeconds": 4},
                        "readiness": {"grpc": {"port": 9090}},
                        "startup": {"tcpSocket": {"port": "db"}, "timeoutSeconds": 7}},
                "cache": {"liveness": {"grpc": {"port": 9091}, "timeoutSeconds": 2}}}"#,
    )
    .expect("a record");
    pod.container_ports.insert(
        "app".to_owned(),
        serde_json::from_str(r#"[{"name": "db", "containerPort": 5432}]"#).expect("ports"),
    );
    let grpc_on = |port: i32| {
        move |probe: &Probe, _: &[ContainerPort]| {
            probe.grpc.as_ref().is_some_and(|grpc| grpc.port == port)
        }
    };

    // Two probes of one container: its name, no kind, the longer timeout.
    let both = pod.recorded(grpc_on(9090));
    assert_eq!(both.count, 2);
    assert_eq!(both.labels(), ("app", None));
    assert_eq!(both.timeout, Some(Duration::from_secs(4)));

    let one = pod.recorded(grpc_on(9091));
    assert_eq!(one.labels(), ("cache", Some(ProbeKind::Liveness)));
    assert_eq!(one.timeout, Some(Duration::from_secs(2)));

    // A named port is resolved against the container's own ports.
    let tcp = pod.recorded(|probe, ports| {
        probe
            .tcp_socket
            .as_ref()
            .and_then(|tcp| resolve_port(&tcp.port, ports).ok())
            == Some(5432)
    });
    assert_eq!(tcp.labels(), ("app", Some(ProbeKind::Startup)));
    assert_eq!(tcp.timeout, Some(Duration::from_secs(7)));

    let none = pod.recorded(grpc_on(1));
    assert_eq!(none, Recorded::default());
    assert_eq!(none.labels(), ("", None));
}

#[test]
fn a_process_namespace_reference_holds_only_while_it_names_the_same_namespace() {
    let path = PathBuf::from("/proc/self/ns/net");
    let id = NetnsId::of(&path).expect("our own namespace");
    let current = NetnsRef::Process {
        path: path.clone(),
        id,
    };
    assert!(current.is_current());
    assert_eq!(current.expected(), Some(id));
    // The same path naming another namespace: what a reused pid looks like.
    let reused = NetnsRef::Process {
        path: path.clone(),
        id: NetnsId {
            dev: id.dev,
            ino: id.ino.wrapping_add(1),
        },
    };
    assert!(!reused.is_current());
    let gone = NetnsRef::Process {
        path: PathBuf::from("/proc/0/ns/net"),
        id,
    };
    assert!(!gone.is_current());
    assert!(NetnsRef::Path(path).is_current());
    assert_eq!(NetnsRef::Named("x".into()).expected(), None);
}

fn manifest(yaml: &str) -> serde_json::Value {
    serde_norway::from_str(yaml).unwrap_or_else(|e| panic!("test manifest: {e}"))
}

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: bookstore
  namespace: shop
  annotations:
    probe-bypass/netns: pod-a
spec:
  containers:
  - name: app
    image: bookstore
    ports:
    - name: http
      containerPort: 14001
    livenessProbe:
      tcpSocket:
        port: http
    readinessProbe:
      httpGet:
        path: /fsm-healthcheck
        port: 15904
        httpHeaders:
        - name: Original-Tcp-Port
          value: "14002"
    startupProbe:
      httpGet:
        path: /probe-bypass-grpc
        port: 15904
        httpHeaders:
        - name: Original-Grpc-Port
          value: "14003"
  initContainers:
  - name: sidecar
    image: proxy
    restartPolicy: Always
    livenessProbe:
      tcpSocket:
        port: 15000
status:
  podIP: 198.18.0.2
"#;

#[test]
fn reads_pod_key_ip_netns_and_every_probe_port() {
    let parsed = Pod::from_manifest(manifest(POD)).unwrap_or_else(|e| panic!("{e}"));
    let pod = parsed.pod;
    assert_eq!(pod.key.to_string(), "shop/bookstore");
    assert_eq!(pod.ip.to_string(), "198.18.0.2");
    assert_eq!(pod.netns.path(), PathBuf::from("/run/netns/pod-a"));
    assert_eq!(
        pod.probe_ports,
        BTreeSet::from([14001, 14002, 14003, 15000])
    );
    assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
}

#[test]
fn a_dual_stack_pods_other_address_is_kept_beside_its_primary() {
    let yaml = POD.replace(
        "  podIP: 198.18.0.2\n",
        "  podIP: 198.18.0.2\n  podIPs:\n  - ip: 198.18.0.2\n  - ip: 2001:2::2\n  - ip: nonsense\n",
    );
    let parsed = Pod::from_manifest(manifest(&yaml)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed.pod.ip.to_string(), "198.18.0.2");
    let others: Vec<String> = parsed
        .pod
        .other_ips
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(others, ["2001:2::2"]);
    assert_eq!(parsed.warnings.len(), 1, "{:?}", parsed.warnings);
    assert!(
        parsed.warnings[0].contains("\"nonsense\""),
        "{}",
        parsed.warnings[0]
    );
    let single = Pod::from_manifest(manifest(POD)).unwrap_or_else(|e| panic!("{e}"));
    assert!(single.pod.other_ips.is_empty());
}

#[test]
fn unresolvable_named_port_is_a_warning_not_an_error() {
    let yaml = POD.replace("port: http", "port: metrics");
    let parsed = Pod::from_manifest(manifest(&yaml)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        parsed.pod.probe_ports,
        BTreeSet::from([14002, 14003, 15000])
    );
    assert_eq!(parsed.warnings.len(), 1);
    assert!(
        parsed.warnings[0].contains("\"metrics\""),
        "{}",
        parsed.warnings[0]
    );
}

#[test]
fn out_of_range_probe_port_is_a_warning() {
    let yaml = POD.replace("port: 15000", "port: 70000");
    let parsed = Pod::from_manifest(manifest(&yaml)).unwrap_or_else(|e| panic!("{e}"));
    assert!(!parsed.pod.probe_ports.contains(&4464));
    assert!(parsed.warnings[0].contains("70000 is outside 1-65535"));
}

#[test]
fn pod_without_ip_or_netns_or_of_another_kind_is_rejected() {
    let no_ip = POD.replace("  podIP: 198.18.0.2", "  phase: Pending");
    assert_eq!(
        Pod::from_manifest(manifest(&no_ip)).err(),
        Some(PodError::MissingPodIp)
    );
    let bad_ip = POD.replace("198.18.0.2", "198.18.0.300");
    assert!(matches!(
        Pod::from_manifest(manifest(&bad_ip)).err(),
        Some(PodError::InvalidPodIp { .. })
    ));
    let no_netns = POD.replace("probe-bypass/netns", "other");
    assert_eq!(
        Pod::from_manifest(manifest(&no_netns)).err(),
        Some(PodError::MissingNetns)
    );
    let deployment = POD.replace("kind: Pod", "kind: Deployment");
    assert_eq!(
        Pod::from_manifest(manifest(&deployment)).err(),
        Some(PodError::NotAPod {
            kind: "Deployment".into()
        })
    );
}

#[test]
fn reads_exclusion_annotations_and_keeps_serving_past_a_malformed_one() {
    let yaml = POD.replace(
        "    probe-bypass/netns: pod-a\n",
        "    probe-bypass/netns: pod-a\n    \
         flomesh.io/inbound-port-exclusion-list: \"9090, 9091\"\n    \
         openservicemesh.io/outbound-ip-range-exclusion-list: 10.0.0.1/8\n    \
         flomesh.io/outbound-port-exclusion-list: \"443,0\"\n",
    );
    let parsed = Pod::from_manifest(manifest(&yaml)).unwrap_or_else(|e| panic!("{e}"));
    let pod = parsed.pod;
    assert_eq!(
        pod.probe_ports,
        BTreeSet::from([14001, 14002, 14003, 15000])
    );
    assert_eq!(pod.exclusions.inbound_ports, BTreeSet::from([9090, 9091]));
    assert_eq!(
        pod.exclusions.outbound_ip_ranges,
        BTreeSet::from(["10.0.0.0/8".parse().unwrap()])
    );
    assert!(pod.exclusions.outbound_ports.is_empty());
    assert_eq!(pod.annotation_errors.len(), 1);
    assert_eq!(
        pod.annotation_errors[0].key,
        "flomesh.io/outbound-port-exclusion-list"
    );
    assert!(parsed.warnings.is_empty(), "{:?}", parsed.warnings);
}

#[test]
fn kubernetes_pods_get_their_exclusions_too() {
    let mut pod: k8s_openapi::api::core::v1::Pod = serde_json::from_value(manifest(POD)).unwrap();
    pod.metadata.annotations = Some(
        [(
            "openservicemesh.io/outbound-port-exclusion-list".to_owned(),
            "5432".to_owned(),
        )]
        .into(),
    );
    let parsed = Pod::from_k8s(&pod, NetnsRef::Named("pod-a".into())).unwrap();
    assert_eq!(parsed.pod.exclusions.outbound_ports, BTreeSet::from([5432]));
    assert!(parsed.pod.annotation_errors.is_empty());
    pod.metadata.annotations = None;
    let parsed = Pod::from_k8s(&pod, NetnsRef::Named("pod-a".into())).unwrap();
    assert!(parsed.pod.exclusions.is_empty());
}

#[test]
fn original_probes_are_read_with_their_ports_and_a_malformed_record_does_not_stop_the_pod() {
    let originals = r#"{"app":{"liveness":{"httpGet":{"path":"/live","port":"http"}},"readiness":{"grpc":{"port":14005}}}}"#;
    let yaml = POD.replace(
        "    probe-bypass/netns: pod-a\n",
        &format!(
            "    probe-bypass/netns: pod-a\n    probe-bypass.io/original-probes: '{originals}'\n"
        ),
    );
    let parsed = Pod::from_manifest(manifest(&yaml)).unwrap_or_else(|e| panic!("{e}"));
    let pod = parsed.pod;
    assert!(pod.originals_error.is_none());
    let live = pod
        .originals
        .get("app", ProbeKind::Liveness)
        .expect("recorded");
    assert_eq!(
        live.probe()
            .http_get
            .as_ref()
            .and_then(|h| h.path.as_deref()),
        Some("/live")
    );
    assert_eq!(pod.ports_of("app")[0].container_port, 14001);
    assert!(pod.ports_of("nobody").is_empty());
    // The original's named port and its gRPC port are probed ports.
    assert_eq!(
        pod.probe_ports,
        BTreeSet::from([14001, 14002, 14003, 14005, 15000])
    );

    let broken = POD.replace(
        "    probe-bypass/netns: pod-a\n",
        "    probe-bypass/netns: pod-a\n    probe-bypass.io/original-probes: '{\"app\": 1}'\n",
    );
    let parsed = Pod::from_manifest(manifest(&broken)).unwrap_or_else(|e| panic!("{e}"));
    assert!(parsed.pod.originals.is_empty());
    let error = parsed.pod.originals_error.expect("an error");
    assert!(error.contains("probe-bypass.io/original-probes"), "{error}");
}

#[test]
fn netns_annotation_takes_a_name_or_an_absolute_path() {
    assert_eq!(
        NetnsRef::parse("/proc/42/ns/net").map(|n| n.path()),
        Ok(PathBuf::from("/proc/42/ns/net"))
    );
    assert!(NetnsRef::parse("a/b").is_err());
    assert!(NetnsRef::parse("..").is_err());
    assert!(NetnsRef::parse("").is_err());
}
