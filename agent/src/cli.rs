//! The command line.

use std::{collections::BTreeSet, net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgAction, Args, Parser, Subcommand, ValueEnum};
use ipnet::IpNet;
use probe_bypass_rewrite::{
    Options, Style,
    contract::{DEFAULT_VALIDATION_IMAGE, HEALTHCHECK_PORT},
};

use crate::{
    datapath::DatapathMode,
    defaults::{
        BPFFS_DEFAULT_MOUNT, DEFAULT_ADMIN_ADDR, DEFAULT_ADMIN_SOCKET, DEFAULT_MESH_LABELS,
        DEFAULT_PIN_DIR, DEFAULT_PROBE_PORTS, DEFAULT_PROC_ROOT, DEFAULT_WEBHOOK_HEALTHZ,
        DEFAULT_WEBHOOK_LISTEN, PROXY_INBOUND_PORT, PROXY_OUTBOUND_PORT, PROXY_UID,
    },
    exclusions::{parse_cidr_list, parse_port_list},
    serve::healthcheck::TcpTarget,
    source::{
        PodSource,
        kube::{LabelMatch, MeshSelector},
    },
};

/// Lets kubelet health probes past a service mesh's sidecar, for every meshed pod on the node.
#[derive(Debug, Parser)]
#[command(name = "probe-bypass", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Install the eBPF datapath and serve the healthcheck for every meshed pod on this node.
    Run(Box<RunArgs>),
    /// Detach and unpin the eBPF datapath. Only the agent's own pins are removed; programs other
    /// tools attached to the same cgroup are not touched. Pods' traffic then flows without a proxy
    /// in the way (as before the mesh), so stop the mesh's sidecars' users first. Refuses, naming
    /// them, while pods depend on the datapath alone (their mesh's init container was replaced),
    /// unless `--force`.
    Uninstall(UninstallArgs),
    /// Ask the agent of this container, over its admin socket, whether it is alive (or, with
    /// `--ready`, ready); for the container's probes. Prints the answer; exits 0 on 200, 1 on any
    /// other answer, 2 when the agent cannot be reached.
    Health(HealthArgs),
    /// Mount bpffs at a directory unless it is bpffs already (for the DaemonSet's init container,
    /// which mounts it on the host's /sys/fs/bpf with bidirectional propagation).
    MountBpffs(MountBpffsArgs),
    /// Rewrite the probes of a manifest's pods as the webhook would, and print the manifest (YAML
    /// in, YAML out; JSON in, JSON out). Reads Pods and the pod templates of Deployments,
    /// StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs, also in a List or a multi-document
    /// YAML file. Warnings go to stderr; on an error nothing is printed and the exit code is 1.
    Rewrite(RewriteArgs),
    /// Serve the mutating admission webhook that rewrites new Pods' probes as `rewrite` does:
    /// AdmissionReview v1 over HTTPS on `--listen`, at `/mutate`, with a plain-HTTP `/healthz`.
    Webhook(WebhookArgs),
    /// The validation init container's check (`--replace-mesh-init`): exits 0 once this pod's
    /// outbound connections are redirected by the node's eBPF datapath to the sidecar's outbound
    /// port, which it listens on itself; run inside the pod, before the sidecar. Exits 1 with what
    /// to check when that does not happen within `--timeout`, 2 on bad input.
    Validate(ValidateArgs),
}

#[derive(Clone, Debug, Args)]
pub struct ValidateArgs {
    /// The sidecar's outbound port, where the datapath sends the pod's own connections.
    #[arg(long, value_name = "PORT", default_value_t = PROXY_OUTBOUND_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub outbound_port: u16,

    /// How long to keep trying before exiting 1. The kubelet then restarts the container after
    /// its back-off (10 s, doubling up to 5 min), so a longer wait here spares a pod that comes
    /// up with its node's agent most of that back-off.
    #[arg(long, value_name = "DURATION", default_value = "20s", value_parser = positive_duration)]
    pub timeout: Duration,

    /// The sidecar proxy's UID, whose connections the datapath lets through: the check refuses to
    /// run as it.
    #[arg(long, value_name = "UID", default_value_t = PROXY_UID, env = "PROBE_BYPASS_PROXY_UID")]
    pub proxy_uid: u32,

    /// The agent's healthcheck port in the pod, asked which agent serves the pod when the check
    /// fails.
    #[arg(long, value_name = "PORT", default_value_t = HEALTHCHECK_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub healthcheck_port: u16,

    /// The ranges the check connects into, at most one per family (comma-separated, or the flag
    /// repeated); only the pod's families that have one are checked. `rewrite --replace-mesh-init`
    /// sets them when the pod's outbound IP range inclusion list (or an exclusion covering the
    /// default) means the default would not be redirected for the pod.
    /// [default: 192.0.2.0/24 and 2001:db8::/32]
    #[arg(long, value_name = "CIDR", value_delimiter = ',')]
    pub target_range: Vec<IpNet>,

    /// The pod's IP (downward API `status.podIP`); its family picks the check's (IPv4 or IPv6).
    #[arg(long, value_name = "IP", env = "POD_IP")]
    pub pod_ip: Option<String>,

    /// All the pod's IPs, comma-separated (downward API `status.podIPs`): a dual-stack pod is
    /// checked in both families.
    #[arg(long, value_name = "IPS", env = "POD_IPS")]
    pub pod_ips: Option<String>,

    /// The pod's name (downward API `metadata.name`), for the messages.
    #[arg(long, value_name = "NAME", env = "POD_NAME")]
    pub pod_name: Option<String>,

    /// The pod's namespace (downward API `metadata.namespace`), for the messages.
    #[arg(long, value_name = "NAMESPACE", env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,

    /// The node's name (downward API `spec.nodeName`), for the messages.
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,
}

#[derive(Clone, Debug, Args)]
pub struct WebhookArgs {
    /// Where the API server reaches the webhook (HTTPS; port 0 picks a free port, logged at start).
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_WEBHOOK_LISTEN,
          env = "PROBE_BYPASS_WEBHOOK_LISTEN")]
    pub listen: SocketAddr,

    /// The serving certificate (PEM, the leaf first, then any intermediates). Re-read when it
    /// changes: a new certificate serves new connections; a broken one is logged and the old one
    /// kept.
    #[arg(long, value_name = "FILE", env = "PROBE_BYPASS_WEBHOOK_TLS_CERT")]
    pub tls_cert: PathBuf,

    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1). Re-read with the certificate.
    #[arg(long, value_name = "FILE", env = "PROBE_BYPASS_WEBHOOK_TLS_KEY")]
    pub tls_key: PathBuf,

    /// Plain-HTTP `/healthz` for the webhook's own probes.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_WEBHOOK_HEALTHZ,
          env = "PROBE_BYPASS_WEBHOOK_HEALTHZ")]
    pub healthz: SocketAddr,

    /// The shape of rewritten httpGet probes, as `rewrite --style`.
    #[arg(long, value_enum, default_value_t = Style::Osm, env = "PROBE_BYPASS_WEBHOOK_STYLE")]
    pub style: Style,

    /// Also replace the mesh's iptables init container on `/mutate`, as `rewrite
    /// --replace-mesh-init`. `/mutate/replace-mesh-init` replaces it whatever this says, so that
    /// a MutatingWebhookConfiguration can turn it on namespace by namespace.
    #[arg(long, env = "PROBE_BYPASS_WEBHOOK_REPLACE_MESH_INIT")]
    pub replace_mesh_init: bool,

    /// The image of the validation init container, as `rewrite --validation-image`.
    #[arg(long, value_name = "IMAGE", default_value = DEFAULT_VALIDATION_IMAGE,
          env = "PROBE_BYPASS_WEBHOOK_VALIDATION_IMAGE")]
    pub validation_image: String,
}

impl WebhookArgs {
    /// What `/mutate` does to a pod.
    pub fn options(&self) -> Options {
        Options {
            style: self.style,
            replace_mesh_init: self.replace_mesh_init,
            validation_image: self.validation_image.clone(),
        }
    }
}

#[derive(Clone, Debug, Args)]
pub struct RewriteArgs {
    /// The manifest to read; `-` reads standard input.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,

    /// The shape of rewritten httpGet probes: osm (the container in the path, the original in an
    /// annotation) or fsm (the original port and path in headers, as FSM's injector writes).
    #[arg(long, value_enum, default_value_t = Style::Osm)]
    pub style: Style,

    /// Also replace the mesh's iptables init container (`fsm-init`, `osm-init`) with the
    /// validation init container `probe-bypass-validation`, carry its exclusions onto the pod's
    /// annotations, and remove the mesh's healthcheck container: the node's datapath then does
    /// what the init container's rules did. A rule the datapath cannot do keeps the init
    /// container, with a warning naming the rule.
    #[arg(long)]
    pub replace_mesh_init: bool,

    /// The image of the validation init container: the agent's.
    #[arg(long, value_name = "IMAGE", default_value = DEFAULT_VALIDATION_IMAGE)]
    pub validation_image: String,

    /// Print a unified diff of the manifest, as read to as rewritten, instead of the manifest.
    #[arg(long)]
    pub diff: bool,
}

impl RewriteArgs {
    /// What `rewrite` does to each pod.
    pub fn options(&self) -> Options {
        Options {
            style: self.style,
            replace_mesh_init: self.replace_mesh_init,
            validation_image: self.validation_image.clone(),
        }
    }
}

#[derive(Clone, Debug, Args)]
pub struct MountBpffsArgs {
    /// The directory to mount bpffs on.
    #[arg(long, value_name = "PATH", default_value = BPFFS_DEFAULT_MOUNT)]
    pub at: PathBuf,
}

#[derive(Clone, Debug, Args)]
pub struct HealthArgs {
    /// Ask whether the agent is ready (/health/ready) rather than alive (/health/alive).
    #[arg(long)]
    pub ready: bool,

    /// The agent's admin socket (`run --admin-socket`).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_ADMIN_SOCKET)]
    pub socket: PathBuf,
}

#[derive(Clone, Debug, Args)]
pub struct UninstallArgs {
    /// Where the agent pinned its links and maps (bpffs).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_PIN_DIR, env = "PROBE_BYPASS_PIN_PATH")]
    pub pin_path: PathBuf,

    /// Remove the datapath even while pods depend on it alone (their mesh's iptables init
    /// container was replaced by `--replace-mesh-init`): their traffic then skips their sidecars
    /// until they are restarted with the mesh's own init container. The pods are named in a warning.
    #[arg(long)]
    pub force: bool,
}

/// Which pods the agent serves, and where it learns of them.
#[derive(Clone, Debug, Args)]
pub struct PodSourceArgs {
    /// Where the node's pods come from. Default: `kube` in a pod (KUBERNETES_SERVICE_HOST is set),
    /// else `manifests`. `kube` finds the API server through the kubeconfig (KUBECONFIG or
    /// ~/.kube/config) or, when there is none, the pod's service account.
    #[arg(
        long,
        value_enum,
        value_name = "SOURCE",
        env = "PROBE_BYPASS_POD_SOURCE"
    )]
    pub pod_source: Option<PodSource>,

    /// With `--pod-source manifests`: directory of Pod manifests (YAML or JSON), one pod per
    /// file, each with `status.podIP` and the annotation `probe-bypass/netns` (a name under
    /// /run/netns or an absolute path). Files added, changed and removed while the agent runs are
    /// picked up.
    #[arg(long, value_name = "DIR", env = "PROBE_BYPASS_POD_MANIFESTS")]
    pub pod_manifests: Option<PathBuf>,

    /// With `--pod-source kube`: this node's name, as in its pods' `spec.nodeName`. In a
    /// DaemonSet, set NODE_NAME from the downward API (fieldRef `spec.nodeName`).
    #[arg(long, value_name = "NAME", env = "NODE_NAME")]
    pub node_name: Option<String>,

    /// With `--pod-source kube`: the host's /proc, where a pod's network namespace is found from
    /// its UID and IP. An agent in a container gets it as a mount of the host's /proc (for
    /// example at /host/proc).
    #[arg(
        long,
        value_name = "PATH",
        default_value = DEFAULT_PROC_ROOT,
        env = "PROBE_BYPASS_PROC_ROOT"
    )]
    pub proc_root: PathBuf,

    /// With `--pod-source kube`: a label that marks a pod as meshed, `KEY` (any value) or
    /// `KEY=VALUE`. Repeat the flag or separate labels with commas; giving it replaces the
    /// default, the labels FSM's and OSM's injectors put on every pod they inject. The injectors'
    /// other marks count as well: the pod's `flomesh.io/` or `openservicemesh.io/`
    /// `sidecar-injection` annotation set to enabled, and their sidecar container (`sidecar`,
    /// `envoy`) running as `--proxy-uid`.
    #[arg(long = "mesh-label", value_name = "KEY[=VALUE]", value_delimiter = ',',
          default_value = DEFAULT_MESH_LABELS, env = "PROBE_BYPASS_MESH_LABELS")]
    pub mesh_labels: Vec<LabelMatch>,

    /// With `--pod-source kube`: a container name that marks a pod as meshed whatever UID the
    /// container runs as. Repeat the flag or separate names with commas. None by default: an
    /// application may have a container called `sidecar` without a mesh, and redirecting a pod
    /// that has no proxy would cut it off. hostNetwork pods are never served, whatever marks
    /// them.
    #[arg(
        long = "mesh-sidecar-name",
        value_name = "NAME",
        value_delimiter = ',',
        env = "PROBE_BYPASS_MESH_SIDECAR_NAMES"
    )]
    pub mesh_sidecar_names: Vec<String>,
}

/// The pod source to run, with what it needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SelectedSource {
    Manifests { dir: PathBuf },
    Kube { node_name: String },
}

/// A pod source without what it needs.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum PodSourceError {
    #[error(
        "the pod source is manifests ({why}), which needs --pod-manifests DIR (or \
         PROBE_BYPASS_POD_MANIFESTS)"
    )]
    NoManifestsDir { why: &'static str },
    #[error(
        "the pod source is kube ({why}), which needs --node-name NAME (or NODE_NAME, which a \
         DaemonSet sets from the downward API's spec.nodeName)"
    )]
    NoNodeName { why: &'static str },
}

impl SelectedSource {
    /// Which source this is.
    pub fn kind(&self) -> PodSource {
        match self {
            Self::Manifests { .. } => PodSource::Manifests,
            Self::Kube { .. } => PodSource::Kube,
        }
    }
}

impl PodSourceArgs {
    /// The source `--pod-source` names, or the default for where the agent runs.
    pub fn select(&self) -> Result<SelectedSource, PodSourceError> {
        self.select_in(std::env::var_os("KUBERNETES_SERVICE_HOST").is_some())
    }

    fn select_in(&self, in_a_pod: bool) -> Result<SelectedSource, PodSourceError> {
        let (source, why) = match self.pod_source {
            Some(PodSource::Kube) => (PodSource::Kube, "--pod-source kube"),
            Some(PodSource::Manifests) => (PodSource::Manifests, "--pod-source manifests"),
            None if in_a_pod => (
                PodSource::Kube,
                "the default in a pod: KUBERNETES_SERVICE_HOST is set",
            ),
            None => (
                PodSource::Manifests,
                "the default outside a cluster: KUBERNETES_SERVICE_HOST is not set",
            ),
        };
        match source {
            PodSource::Manifests => match &self.pod_manifests {
                Some(dir) => Ok(SelectedSource::Manifests { dir: dir.clone() }),
                None => Err(PodSourceError::NoManifestsDir { why }),
            },
            PodSource::Kube => match self.node_name.as_deref().map(str::trim) {
                Some(name) if !name.is_empty() => Ok(SelectedSource::Kube {
                    node_name: name.to_owned(),
                }),
                _ => Err(PodSourceError::NoNodeName { why }),
            },
        }
    }

    /// Which pods are meshed, for `--pod-source kube`; `proxy_uid` is the sidecar's
    /// (`--proxy-uid`), by which the injectors' sidecar container is told.
    pub fn mesh(&self, proxy_uid: u32) -> MeshSelector {
        MeshSelector {
            labels: self.mesh_labels.clone(),
            sidecar_names: self.mesh_sidecar_names.clone(),
            proxy_uid,
        }
    }
}

/// Which callers reach the probe ports of a meshed pod without its proxy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProbeBypassFrom {
    /// Only the host network namespace, where the kubelet runs.
    Host,
    /// Every caller, as the mesh's iptables rules do.
    Any,
    /// Only the kubelet: callers in the host network namespace whose cgroup is the kubelet's
    /// (`--kubelet-cgroup`, or found from the kubelet's process), or below it.
    Kubelet,
}

#[derive(Clone, Debug, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub pods: PodSourceArgs,

    /// Address of the admin endpoints (/health/alive, /health/ready, /metrics) over plain HTTP,
    /// in the host network namespace, for people on the node. Every caller that reaches it is
    /// told everything, pod names included: keep it on loopback, and give Prometheus
    /// `--secure-admin-addr`.
    #[arg(long, value_name = "ADDR", default_value = DEFAULT_ADMIN_ADDR, env = "PROBE_BYPASS_ADMIN_ADDR")]
    pub admin_addr: SocketAddr,

    /// Also serve the admin endpoints over HTTPS on this address, for Prometheus: `/metrics`, and
    /// a `/health/ready` that names pods, only to a caller whose bearer token the API server
    /// accepts (TokenReview) and whose user may `get` the path (SubjectAccessReview on the
    /// non-resource URL); `/health/alive` and `/health/ready`'s bare status line to anyone.
    /// Needs the Kubernetes API server, found as `--pod-source kube` finds it. None by default;
    /// deploy/ sets 0.0.0.0:9092.
    #[arg(long, value_name = "ADDR", env = "PROBE_BYPASS_SECURE_ADMIN_ADDR")]
    pub secure_admin_addr: Option<SocketAddr>,

    /// The HTTPS admin address's certificate (PEM, the leaf first), re-read when it changes.
    /// Without it the agent makes a self-signed certificate at start, as Kubernetes' own
    /// components do; the scraper then cannot verify it.
    #[arg(
        long,
        value_name = "FILE",
        env = "PROBE_BYPASS_ADMIN_TLS_CERT",
        requires = "admin_tls_key",
        requires = "secure_admin_addr"
    )]
    pub admin_tls_cert: Option<PathBuf>,

    /// The certificate's private key (PEM), re-read with it.
    #[arg(
        long,
        value_name = "FILE",
        env = "PROBE_BYPASS_ADMIN_TLS_KEY",
        requires = "admin_tls_cert"
    )]
    pub admin_tls_key: Option<PathBuf>,

    /// Also serve the admin endpoints on this Unix socket, for the container's own probes
    /// (`probe-bypass health`): while a rolling update runs two agents on the admin port, only
    /// the socket is sure to reach this agent. A socket left at the path by an earlier run is
    /// replaced. None by default.
    #[arg(long, value_name = "PATH", env = "PROBE_BYPASS_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,

    /// Port of the healthcheck listener inside each pod.
    #[arg(long, value_name = "PORT", default_value_t = HEALTHCHECK_PORT,
          value_parser = clap::value_parser!(u16).range(1..),
          env = "PROBE_BYPASS_HEALTHCHECK_PORT")]
    pub healthcheck_port: u16,

    /// Also listen on 15901-15903 inside each pod and answer its rewritten httpGet probes (liveness,
    /// readiness, startup): the agent runs the original probe, recorded in the pod's
    /// `probe-bypass.io/original-probes` annotation, from inside the pod with the kubelet's rules,
    /// and relays an HTTPS probe's TLS to the app. Off: those ports are left to the mesh's proxy.
    #[arg(long, env = "PROBE_BYPASS_SERVE_HTTP_PROBES")]
    pub serve_http_probes: bool,

    /// Dial any port a request names, not only the ports the pod's probes name. This is FSM's and
    /// OSM's behaviour; it lets anyone who reaches the healthcheck probe every port of the pod.
    #[arg(long, env = "PROBE_BYPASS_ALLOW_ANY_PORT")]
    pub allow_any_port: bool,

    /// Which address of the pod a probe connects to.
    #[arg(long, value_enum, default_value_t = TcpTarget::PodIp, env = "PROBE_BYPASS_TCP_TARGET")]
    pub tcp_target: TcpTarget,

    /// Bound on the connect a tcpSocket probe makes, and on the whole gRPC health check a
    /// `/probe-bypass-grpc` request runs (for example 500ms, 2s), when the pod's
    /// original-probes annotation records no such probe; a recorded probe's own `timeoutSeconds`
    /// bounds it otherwise.
    #[arg(long, value_name = "DURATION", default_value = "1s", value_parser = positive_duration,
          env = "PROBE_BYPASS_DIAL_TIMEOUT")]
    pub dial_timeout: Duration,

    /// How long a pod the agent cannot serve keeps it not ready (`/health/ready`). Past this, the
    /// pod is still retried, logged and counted, and listed in the readiness answer, but no longer
    /// holds back the agent, so a rolling update does not wait on it forever. 0 never holds.
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = humantime::parse_duration,
          env = "PROBE_BYPASS_READY_GRACE")]
    pub ready_grace: Duration,

    /// Bound on reading a request's head; a slower client is disconnected.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = positive_duration,
          env = "PROBE_BYPASS_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: Duration,

    #[command(flatten)]
    pub datapath: DatapathArgs,
}

/// The eBPF datapath's settings. Exclusion lists are comma-separated, like the mesh's annotations,
/// and apply to every meshed pod on top of its own annotations.
#[derive(Clone, Debug, Args)]
pub struct DatapathArgs {
    /// `ebpf` replaces the mesh's iptables rules; `none` serves the healthcheck only.
    #[arg(long = "datapath", value_enum, default_value_t = DatapathMode::Ebpf, env = "PROBE_BYPASS_DATAPATH")]
    pub mode: DatapathMode,

    /// cgroup v2 directory to attach the programs to. Default: the root of the cgroup v2 hierarchy,
    /// found in /proc/mounts, which covers every pod on the node.
    #[arg(long, value_name = "PATH", env = "PROBE_BYPASS_CGROUP_ROOT")]
    pub cgroup_root: Option<PathBuf>,

    /// Where to pin the links and maps, on bpffs (mounted at /sys/fs/bpf if it is not).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_PIN_DIR, env = "PROBE_BYPASS_PIN_PATH")]
    pub pin_path: PathBuf,

    /// UID of the sidecar proxy: its own connections are not sent back to it.
    #[arg(long, value_name = "UID", default_value_t = PROXY_UID,
          env = "PROBE_BYPASS_PROXY_UID")]
    pub proxy_uid: u32,

    /// The proxy's inbound port: where connections to a meshed pod are sent.
    #[arg(long, value_name = "PORT", default_value_t = PROXY_INBOUND_PORT,
          value_parser = clap::value_parser!(u16).range(1..),
          env = "PROBE_BYPASS_PROXY_INBOUND_PORT")]
    pub proxy_inbound_port: u16,

    /// The proxy's outbound port: where a meshed pod's own connections are sent.
    #[arg(long, value_name = "PORT", default_value_t = PROXY_OUTBOUND_PORT,
          value_parser = clap::value_parser!(u16).range(1..),
          env = "PROBE_BYPASS_PROXY_OUTBOUND_PORT")]
    pub proxy_outbound_port: u16,

    /// Ports of a meshed pod that the kubelet reaches without the proxy: the probe ports, the
    /// healthcheck and the proxy's metrics port.
    #[arg(long, value_name = "PORTS", default_value = DEFAULT_PROBE_PORTS,
          value_parser = parse_port_list, env = "PROBE_BYPASS_PROBE_PORTS")]
    pub probe_ports: BTreeSet<u16>,

    /// `host`: only the host network namespace (the kubelet, and hostNetwork pods and node
    /// daemons with it) gets past the proxy on the probe ports. `kubelet`: only the kubelet's
    /// cgroup in it; when that cannot be found, the agent falls back to `host` and says so. `any`:
    /// every caller does, as under the mesh's iptables rules.
    #[arg(long, value_enum, default_value_t = ProbeBypassFrom::Kubelet,
          env = "PROBE_BYPASS_PROBE_BYPASS_FROM")]
    pub probe_bypass_from: ProbeBypassFrom,

    /// With `--probe-bypass-from kubelet`: the kubelet's cgroup v2 directory
    /// (`/host/sys/fs/cgroup/system.slice/kubelet.service`). Without it, the agent finds the
    /// `kubelet` process under `--proc-root` and its cgroup under the cgroup root.
    #[arg(long, value_name = "PATH", env = "PROBE_BYPASS_KUBELET_CGROUP")]
    pub kubelet_cgroup: Option<PathBuf>,

    /// Short-circuit connections between sockets on this node with sk_msg (`--sk-msg=false` to
    /// turn it off).
    #[arg(long, value_name = "BOOL", default_value_t = true, action = ArgAction::Set,
          env = "PROBE_BYPASS_SK_MSG")]
    pub sk_msg: bool,

    /// The kernel programs' decision log: each redirect, bypass, exclusion and refusal, with the
    /// pod, the addresses and the rule, in the agent's log under the target `probe_bypass::ebpf`
    /// (`debug` shows them; `off`, `error`, `warn`, `info` show none). Default: what `RUST_LOG` says
    /// for that target, which at the default `info` is nothing. Off, it costs the programs one
    /// load and a branch per decision.
    #[arg(long, value_name = "LEVEL", env = "PROBE_BYPASS_EBPF_LOG")]
    pub ebpf_log: Option<log::LevelFilter>,

    /// For benchmarks: load the kernel programs from this object file instead of the embedded
    /// one, such as the same programs built without their log (`cargo xtask build-ebpf --no-log`).
    #[arg(long, value_name = "PATH", hide = true)]
    pub ebpf_object: Option<PathBuf>,

    /// Inbound ports that skip the proxy on every meshed pod.
    #[arg(long, value_name = "PORTS", default_value = "", value_parser = parse_port_list,
          env = "PROBE_BYPASS_INBOUND_PORT_EXCLUSION_LIST")]
    pub inbound_port_exclusion_list: BTreeSet<u16>,

    /// Outbound ports that skip the proxy on every meshed pod.
    #[arg(long, value_name = "PORTS", default_value = "", value_parser = parse_port_list,
          env = "PROBE_BYPASS_OUTBOUND_PORT_EXCLUSION_LIST")]
    pub outbound_port_exclusion_list: BTreeSet<u16>,

    /// Outbound destinations (CIDRs) that skip the proxy on every meshed pod.
    #[arg(long, value_name = "CIDRS", default_value = "", value_parser = parse_cidr_list,
          env = "PROBE_BYPASS_OUTBOUND_IP_RANGE_EXCLUSION_LIST")]
    pub outbound_ip_range_exclusion_list: BTreeSet<IpNet>,

    /// When set, the only outbound destinations (CIDRs) that go through the proxy, on every pod.
    #[arg(long, value_name = "CIDRS", default_value = "", value_parser = parse_cidr_list,
          env = "PROBE_BYPASS_OUTBOUND_IP_RANGE_INCLUSION_LIST")]
    pub outbound_ip_range_inclusion_list: BTreeSet<IpNet>,
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text).map_err(|e| e.to_string())?;
    if duration.is_zero() {
        return Err("must be more than zero".to_owned());
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut argv = vec!["probe-bypass", "run", "--pod-manifests", "/pods"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Run(args) => *args,
            other => panic!("parsed as {other:?}"),
        })
    }

    #[test]
    fn defaults_match_the_mesh() {
        let args = parse(&[]).expect("defaults parse");
        assert_eq!(args.healthcheck_port, 15904);
        assert_eq!(args.admin_addr.to_string(), "127.0.0.1:9091");
        assert_eq!(args.secure_admin_addr, None);
        assert_eq!(args.admin_socket, None);
        assert_eq!(args.tcp_target, TcpTarget::PodIp);
        assert_eq!(args.dial_timeout, Duration::from_secs(1));
        assert!(!args.allow_any_port);
        assert!(!args.serve_http_probes);
        let datapath = args.datapath;
        assert_eq!(datapath.mode, DatapathMode::Ebpf);
        assert_eq!(datapath.proxy_uid, 1500);
        assert_eq!(
            (datapath.proxy_inbound_port, datapath.proxy_outbound_port),
            (15003, 15001)
        );
        assert_eq!(
            datapath.probe_ports,
            [15010, 15901, 15902, 15903, 15904].into()
        );
        assert_eq!(datapath.probe_bypass_from, ProbeBypassFrom::Kubelet);
        assert_eq!(datapath.kubelet_cgroup, None);
        assert!(datapath.sk_msg);
        assert_eq!(datapath.ebpf_log, None);
        assert_eq!(datapath.ebpf_object, None);
        assert!(datapath.inbound_port_exclusion_list.is_empty());
        assert!(datapath.outbound_ip_range_inclusion_list.is_empty());
        assert_eq!(datapath.pin_path, PathBuf::from("/sys/fs/bpf/probe-bypass"));
    }

    #[test]
    fn ebpf_log_takes_a_level_and_the_object_a_path() {
        let args = parse(&["--ebpf-log", "debug", "--ebpf-object", "/tmp/no-log.o"])
            .expect("the flags parse");
        assert_eq!(args.datapath.ebpf_log, Some(log::LevelFilter::Debug));
        assert_eq!(
            args.datapath.ebpf_object,
            Some(PathBuf::from("/tmp/no-log.o"))
        );
        let off = parse(&["--ebpf-log", "off"]).expect("off parses");
        assert_eq!(off.datapath.ebpf_log, Some(log::LevelFilter::Off));
        assert!(parse(&["--ebpf-log", "loud"]).is_err());
    }

    #[test]
    fn datapath_flags_parse_like_the_mesh_annotations() {
        let args = parse(&[
            "--datapath",
            "none",
            "--sk-msg=false",
            "--probe-bypass-from",
            "any",
            "--outbound-port-exclusion-list",
            "5432, 6379",
            "--outbound-ip-range-exclusion-list",
            "10.96.0.1/12",
        ])
        .expect("valid");
        assert_eq!(args.datapath.mode, DatapathMode::None);
        assert!(!args.datapath.sk_msg);
        assert_eq!(args.datapath.probe_bypass_from, ProbeBypassFrom::Any);
        assert_eq!(
            args.datapath.outbound_port_exclusion_list,
            [5432, 6379].into()
        );
        assert_eq!(
            args.datapath.outbound_ip_range_exclusion_list,
            ["10.96.0.0/12".parse().expect("cidr")].into()
        );
        assert!(parse(&["--outbound-port-exclusion-list", "0"]).is_err());
        assert!(parse(&["--outbound-ip-range-exclusion-list", "10.0.0.0"]).is_err());
        assert!(parse(&["--proxy-inbound-port", "0"]).is_err());
        assert!(parse(&["--datapath", "iptables"]).is_err());
    }

    #[test]
    fn odd_values_are_refused() {
        assert!(parse(&["--dial-timeout", "0s"]).is_err());
        assert!(parse(&["--dial-timeout", "soon"]).is_err());
        assert!(parse(&["--healthcheck-port", "0"]).is_err());
        assert!(parse(&["--tcp-target", "everywhere"]).is_err());
        assert_eq!(
            parse(&["--tcp-target", "either", "--dial-timeout", "250ms"])
                .map(|a| (a.tcp_target, a.dial_timeout))
                .expect("valid"),
            (TcpTarget::Either, Duration::from_millis(250))
        );
    }

    fn parse_only(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let argv = ["probe-bypass", "run"].iter().chain(args);
        Cli::try_parse_from(argv).map(|cli| match cli.command {
            Command::Run(args) => *args,
            other => panic!("parsed as {other:?}"),
        })
    }

    #[test]
    fn pod_source_defaults_to_kube_in_a_pod_and_to_manifests_elsewhere() {
        let args = parse_only(&["--node-name", "node-a"]).expect("valid");
        assert_eq!(
            args.pods.select_in(true),
            Ok(SelectedSource::Kube {
                node_name: "node-a".into()
            })
        );
        let error = args.pods.select_in(false).expect_err("no manifests dir");
        assert_eq!(
            error.to_string(),
            "the pod source is manifests (the default outside a cluster: KUBERNETES_SERVICE_HOST \
             is not set), which needs --pod-manifests DIR (or PROBE_BYPASS_POD_MANIFESTS)"
        );
        let args = parse(&[]).expect("valid");
        assert_eq!(
            args.pods.select_in(false),
            Ok(SelectedSource::Manifests {
                dir: "/pods".into()
            })
        );
        assert!(matches!(
            args.pods.select_in(true),
            Err(PodSourceError::NoNodeName { .. })
        ));
    }

    #[test]
    fn kube_source_needs_a_node_name() {
        let args = parse_only(&["--pod-source", "kube"]).expect("valid");
        let error = args.pods.select_in(false).expect_err("no node name");
        assert!(
            error.to_string().starts_with(
                "the pod source is kube (--pod-source kube), which needs --node-name NAME"
            ),
            "{error}"
        );
        let args = parse_only(&["--pod-source", "kube", "--node-name", " "]).expect("valid");
        assert!(args.pods.select_in(true).is_err());
        assert!(parse_only(&["--pod-source", "apiserver"]).is_err());
    }

    #[test]
    fn meshed_pods_are_the_injected_ones_unless_told_otherwise() {
        let args = parse(&[]).expect("valid");
        assert_eq!(args.pods.mesh(PROXY_UID), MeshSelector::default());
        assert_eq!(args.pods.proc_root, PathBuf::from("/proc"));
        let labels = |args: &RunArgs| -> Vec<String> {
            args.pods
                .mesh_labels
                .iter()
                .map(ToString::to_string)
                .collect()
        };
        assert_eq!(labels(&args), ["fsm-proxy-uuid", "osm-proxy-uuid"]);
        let args = parse(&[
            "--mesh-label",
            "mesh=blue,team",
            "--mesh-label",
            "injected=true",
            "--mesh-sidecar-name",
            "sidecar",
            "--mesh-sidecar-name",
            "envoy",
        ])
        .expect("valid");
        assert_eq!(labels(&args), ["mesh=blue", "team", "injected=true"]);
        assert_eq!(
            args.pods.mesh(PROXY_UID).sidecar_names,
            ["sidecar", "envoy"]
        );
        assert!(parse(&["--mesh-label", "=x"]).is_err());
    }
}
