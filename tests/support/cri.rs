//! A node of the tests' own (issue 17): the tests' containerd with its CRI plugin, runc and CNI,
//! driven over the CRI API as the kubelet drives it, with the images of [`crate::images`].
//!
//! The test plays the kubelet: it makes the pod's cgroup, asks for the sandbox with the kubelet's
//! cgroup parent naming, reads the IP the CNI gave, then creates and starts the init containers
//! one after another (each must exit 0, as the kubelet requires before the next), then the
//! others. Every pod's cgroups sit in a test cgroup of the node's own
//! (`probe-bypass-test-<pid>-<n>/…`), which is also where a test attaches the agent's programs:
//! never the machine's root.
//!
//! A pod of [`CgroupDriver::Systemd`] gets the kubelet's slice name as its cgroup parent
//! (`kubepods-besteffort-pod<uid_>.slice`), from which containerd writes runc's systemd form of
//! the container's cgroup (`<slice>:cri-containerd:<id>`). This machine's PID 1 is not systemd,
//! so runc cannot ask systemd for the unit: `pb-runc-systemd` (`tests/images`) stands in for
//! runc, lays the path out as systemd would (`kubepods.slice/kubepods-besteffort.slice/
//! kubepods-besteffort-pod<uid_>.slice/cri-containerd-<id>.scope`) below the node's subtree, and
//! hands the rest to runc's cgroupfs driver (`docs/real-runtime.md`).
//!
//! On a machine with cgroup v1 controllers beside the v2 hierarchy (these machines'), runc makes
//! each container's cgroup in every hierarchy; the guard removes the node's subtree from all of
//! them.
//!
//! The guard removes every pod it made through CRI (`StopPodSandbox`, `RemovePodSandbox`), then
//! stops containerd (whose guard kills whatever is left) and removes the cgroups, panics included.

use std::{
    collections::HashMap,
    fs,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, ImageStatusRequest, KeyValue, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata, PodSandboxStatusRequest,
    PullImageRequest, RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest,
    StatusRequest, StopPodSandboxRequest, image_service_client::ImageServiceClient,
    runtime_service_client::RuntimeServiceClient,
};
use probe_bypass::datapath::cgroup2_mount;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::{
    cgroup::{TestCgroup, remove_cgroup},
    containerd::Containerd,
    images,
};

/// How long a CRI call may take (RunPodSandbox runs the CNI plugins).
const CALL_WITHIN: Duration = Duration::from_secs(60);
/// How long the runtime may take to report ready after it answers on its socket.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long an init container may run before the test calls it stuck.
const INIT_WITHIN: Duration = Duration::from_secs(60);

static NEXT: AtomicU32 = AtomicU32::new(0);

/// The kubelet's cgroup driver, whose naming of the pod's cgroup the pod gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice`.
    Systemd,
    /// `kubepods/besteffort/pod<uid>`.
    Cgroupfs,
}

/// A container of a pod, as the kubelet hands it to CRI; the node fills in the downward API's
/// variables ([`CriNode::run_pod`]).
#[derive(Clone, Debug)]
pub struct Container {
    pub name: String,
    pub image: String,
    /// Replaces the image's entrypoint when not empty.
    pub command: Vec<String>,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Variables from the downward API: name and `fieldPath` (`metadata.name`, `status.podIP`…).
    pub env_fields: Vec<(String, String)>,
    /// `securityContext.runAsUser` and `runAsGroup`; none: the image's (root).
    pub run_as_user: Option<i64>,
    pub run_as_group: Option<i64>,
    /// `readOnlyRootFilesystem`, `capabilities.drop: [ALL]`, `allowPrivilegeEscalation: false`.
    pub read_only_rootfs: bool,
    pub drop_all_capabilities: bool,
    pub no_new_privs: bool,
    /// Host paths mounted into the container.
    pub mounts: Vec<Bind>,
    /// `capabilities.add`, with or without `drop: [ALL]`.
    pub add_capabilities: Vec<String>,
    /// `seccompProfile: RuntimeDefault`: the runtime's default filter.
    pub seccomp_runtime_default: bool,
    /// `securityContext.privileged`: every capability, the host's devices, no seccomp filter; the
    /// kubelet then makes the pod's sandbox privileged too.
    pub privileged: bool,
}

/// A host path mounted into a container (a `hostPath` or `emptyDir` volume's mount).
#[derive(Clone, Debug)]
pub struct Bind {
    pub host: PathBuf,
    pub container: String,
    pub readonly: bool,
    /// The volume mount's `mountPropagation`.
    pub propagation: Propagation,
}

/// A volume mount's `mountPropagation`, as the kubelet hands it to CRI.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Propagation {
    /// `None`: the container sees neither the host's later mounts nor makes any the host sees.
    #[default]
    Private,
    /// `HostToContainer`: mounts the host makes under the path later reach the container.
    HostToContainer,
    /// `Bidirectional` (privileged containers only): mounts the container makes reach the host.
    Bidirectional,
}

impl Propagation {
    /// A manifest's `mountPropagation` (absent is `None`).
    pub fn from_manifest(value: &serde_json::Value) -> Self {
        match value.as_str() {
            None | Some("None") => Self::Private,
            Some("HostToContainer") => Self::HostToContainer,
            Some("Bidirectional") => Self::Bidirectional,
            Some(other) => panic!("mountPropagation {other} is not one the kubelet knows"),
        }
    }

    fn cri(self) -> k8s_cri::v1::MountPropagation {
        match self {
            Self::Private => k8s_cri::v1::MountPropagation::PropagationPrivate,
            Self::HostToContainer => k8s_cri::v1::MountPropagation::PropagationHostToContainer,
            Self::Bidirectional => k8s_cri::v1::MountPropagation::PropagationBidirectional,
        }
    }
}

impl Bind {
    /// `path` read-only at the same path (a configuration, certificates).
    pub fn same(path: &Path) -> Self {
        Self {
            host: path.to_owned(),
            container: path.display().to_string(),
            readonly: true,
            propagation: Propagation::Private,
        }
    }
}

impl Container {
    pub fn new(name: &str, image: &str, args: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            image: image.to_owned(),
            command: Vec::new(),
            args: args.iter().map(|&arg| arg.to_owned()).collect(),
            env: Vec::new(),
            env_fields: Vec::new(),
            run_as_user: None,
            run_as_group: None,
            read_only_rootfs: false,
            drop_all_capabilities: false,
            no_new_privs: false,
            mounts: Vec::new(),
            add_capabilities: Vec::new(),
            seccomp_runtime_default: false,
            privileged: false,
        }
    }

    /// A container of a pod manifest (`spec.containers[]` or `spec.initContainers[]`), as the
    /// kubelet turns it into CRI's: image, command, args, literal and downward API variables,
    /// and the security context's user, group, read-only root, dropped capabilities and no
    /// privilege escalation. Panics on what the tests' node does not carry over (volumes,
    /// resources are ignored: nothing here depends on them).
    pub fn from_manifest(container: &serde_json::Value) -> Self {
        let text = |value: &serde_json::Value| value.as_str().map(str::to_owned);
        let strings = |value: &serde_json::Value| -> Vec<String> {
            value
                .as_array()
                .map(|all| all.iter().filter_map(text).collect())
                .unwrap_or_default()
        };
        let name = text(&container["name"]).expect("a container's name");
        let mut made = Self::new(
            &name,
            &text(&container["image"]).unwrap_or_else(|| panic!("{name} has no image")),
            &[],
        );
        made.command = strings(&container["command"]);
        made.args = strings(&container["args"]);
        for var in container["env"].as_array().into_iter().flatten() {
            let var_name = text(&var["name"]).expect("a variable's name");
            if let Some(value) = text(&var["value"]) {
                made.env.push((var_name, value));
            } else if let Some(path) = text(&var["valueFrom"]["fieldRef"]["fieldPath"]) {
                made.env_fields.push((var_name, path));
            } else {
                panic!("{name}: the variable {var_name} has neither a value nor a fieldRef");
            }
        }
        let security = &container["securityContext"];
        made.run_as_user = security["runAsUser"].as_i64();
        made.run_as_group = security["runAsGroup"].as_i64();
        made.read_only_rootfs = security["readOnlyRootFilesystem"] == true;
        made.no_new_privs = security["allowPrivilegeEscalation"] == false;
        made.drop_all_capabilities = strings(&security["capabilities"]["drop"])
            .iter()
            .any(|capability| capability == "ALL");
        made.add_capabilities = strings(&security["capabilities"]["add"]);
        made.seccomp_runtime_default = security["seccompProfile"]["type"] == "RuntimeDefault";
        made.privileged = security["privileged"] == true;
        made
    }

    /// The test app answering HTTP on `ports` with `name`.
    pub fn app(name: &str, ports: &[u16]) -> Self {
        let mut args = vec![name.to_owned()];
        args.extend(ports.iter().map(u16::to_string));
        Self {
            args,
            ..Self::new(name, images::APP, &[])
        }
    }
}

/// A pod to create: its metadata as the API server has it, and its containers.
#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub namespace: String,
    pub uid: String,
    pub driver: CgroupDriver,
    pub init_containers: Vec<Container>,
    pub containers: Vec<Container>,
    /// `hostNetwork` and `hostPID`: the node's namespaces instead of the pod's own.
    pub host_network: bool,
    pub host_pid: bool,
    /// Whether a container the test starts only after the sandbox ([`CriNode::run_init_container`],
    /// [`CriNode::add_container`]) is privileged. The kubelet knows every container before it
    /// asks for the sandbox, and makes the sandbox privileged for one, as it does here for a
    /// privileged container of `init_containers` or `containers`.
    pub privileged_later: bool,
}

impl PodSpec {
    /// A pod named `name` in namespace `test`, with a fresh UID.
    pub fn new(name: &str, driver: CgroupDriver) -> Self {
        Self {
            name: name.to_owned(),
            namespace: "test".to_owned(),
            uid: fresh_uid(),
            driver,
            init_containers: Vec::new(),
            containers: Vec::new(),
            host_network: false,
            host_pid: false,
            privileged_later: false,
        }
    }
}

/// A UUID (version 4 in form) unique to this process and call: what the API server gives a pod.
pub fn fresh_uid() -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |time| time.subsec_nanos());
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        std::process::id(),
        n & 0xffff,
        nanos & 0xfff,
        (nanos >> 12) & 0xfff,
        u64::from(nanos) << 8 | u64::from(n & 0xff)
    )
}

/// A pod the node made.
#[derive(Clone, Debug)]
pub struct CriPod {
    pub spec: PodSpec,
    pub sandbox_id: String,
    /// The IP the CNI gave the sandbox.
    pub ip: IpAddr,
    /// The pod's cgroup (`…/pod<uid>` or `…-pod<uid_>.slice`).
    pub cgroup: PathBuf,
    /// The ids of its containers, by name, init containers included.
    pub containers: HashMap<String, String>,
    /// Each init container's exit code, in order; a pod whose init container failed has no
    /// other containers started, as under the kubelet.
    pub init_exits: Vec<(String, i32)>,
    /// The sandbox's log directory, which holds each container's log (`<name>.log`).
    pub log_dir: PathBuf,
}

impl CriPod {
    /// What the container `name` wrote, in CRI's log format.
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// The file CRI writes the container `name`'s output to.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.log_dir.join(format!("{name}.log"))
    }

    /// The lines the container `name` wrote, without CRI's prefix (`<time> <stream> <tag> `).
    pub fn log_lines(&self, name: &str) -> Vec<String> {
        self.log(name)
            .lines()
            .filter_map(|line| line.splitn(4, ' ').nth(3).map(str::to_owned))
            .collect()
    }

    /// Whether every init container exited 0.
    pub fn initialized(&self) -> bool {
        self.init_exits.iter().all(|(_, code)| *code == 0)
    }
}

/// The node: containerd, the CRI client, and the pods made through it.
pub struct CriNode {
    containerd: Option<Containerd>,
    client: RuntimeServiceClient<Channel>,
    images: ImageServiceClient<Channel>,
    runtime: tokio::runtime::Runtime,
    /// The subtree of the cgroup hierarchy that every pod's cgroup is in.
    cgroup_root: PathBuf,
    /// Its guard (`probe-bypass-test-<pid>-<n>`), which a test attaches the agent's programs to;
    /// none when the subtree is below a test cgroup of the caller's ([`Self::start_under`]).
    cgroup: Option<TestCgroup>,
    /// Sandboxes still to remove on drop, with their pod cgroups.
    made: Vec<(String, PathBuf)>,
    /// The node's name, which the downward API's `spec.nodeName` gives.
    pub node_name: String,
}

impl CriNode {
    /// Starts containerd, imports the images, and connects to its CRI API.
    pub fn start() -> Self {
        let cgroup = TestCgroup::new();
        let root = cgroup.path().to_owned();
        Self::start_in(root, Some(cgroup))
    }

    /// [`Self::start`], the pods' cgroups below `parent` (a test cgroup that also holds the
    /// test's callers, where the datapath is attached): in `parent/kubepods-node`.
    pub fn start_under(parent: &TestCgroup) -> Self {
        let root = parent.path().join("kubepods-node");
        fs::create_dir(&root).unwrap_or_else(|error| panic!("create {}: {error}", root.display()));
        Self::start_in(root, None)
    }

    fn start_in(cgroup_root: PathBuf, cgroup: Option<TestCgroup>) -> Self {
        let mount = cgroup2_mount().expect("the cgroup v2 mount");
        let relative = cgroup_root.strip_prefix(&mount).expect("below the mount");
        let subtree = format!("/{}", relative.display());
        let wrapper = images::program("pb-runc-systemd");
        let containerd = Containerd::start_with_runtime(
            &wrapper,
            &[
                ("PB_CGROUP_ROOT", &subtree),
                ("PB_RUNC", crate::containerd::RUNC),
            ],
        );
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime for the CRI client");
        let channel = runtime.block_on(connect(&containerd.socket()));
        let node = Self {
            containerd: Some(containerd),
            client: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
            runtime,
            cgroup_root,
            cgroup,
            made: Vec::new(),
            node_name: "cri-node".to_owned(),
        };
        node.wait_until_ready();
        node.containerd().import_images();
        node
    }

    /// Waits until the runtime's `Status` reports it ready, as the kubelet does before it makes
    /// pods: containerd answers on its socket before its CRI plugin has loaded its state, and
    /// until then every pod call fails with "server is not initialized yet".
    fn wait_until_ready(&self) {
        let deadline = Instant::now() + READY_WITHIN;
        let mut last = String::new();
        while Instant::now() < deadline {
            let mut client = self.client.clone();
            match self.call(client.status(StatusRequest { verbose: false })) {
                Ok(answer) => {
                    let conditions = answer.status.map(|status| status.conditions);
                    let ready = conditions.as_ref().is_some_and(|conditions| {
                        ["RuntimeReady", "NetworkReady"].iter().all(|wanted| {
                            conditions
                                .iter()
                                .any(|condition| condition.r#type == *wanted && condition.status)
                        })
                    });
                    if ready {
                        return;
                    }
                    last = format!("{conditions:?}");
                }
                Err(status) => last = status.to_string(),
            }
            thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "the runtime did not report ready within {READY_WITHIN:?}: {last}\n{}",
            self.containerd().log()
        );
    }

    pub fn containerd(&self) -> &Containerd {
        self.containerd.as_ref().expect("containerd")
    }

    /// The cgroup subtree that holds every pod of the node: where a test attaches the datapath.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// [`Self::cgroup_root`]'s guard, for what takes a test cgroup ([`crate::ebpf_agent::EbpfAgent`],
    /// a kubelet's cgroup below it).
    pub fn cgroup(&self) -> &TestCgroup {
        self.cgroup
            .as_ref()
            .expect("a node started with a cgroup of its own (CriNode::start)")
    }

    /// Creates the pod as the kubelet does (see the module's doc) and returns it once its
    /// containers are started, or once an init container failed.
    pub fn run_pod(&mut self, spec: &PodSpec) -> CriPod {
        self.run_pod_then(spec, |_| {})
    }

    /// [`Self::run_pod`], calling `sandbox_ready` once the sandbox has its IP and before any
    /// container starts: where the kubelet reports the pod's IP to the API server.
    pub fn run_pod_then(&mut self, spec: &PodSpec, sandbox_ready: impl FnOnce(&CriPod)) -> CriPod {
        let cgroup = self.pod_cgroup(spec);
        fs::create_dir_all(&cgroup).expect("make the pod's cgroup, as the kubelet does");
        let log_dir = self
            .containerd()
            .path("pods")
            .join(format!("{}_{}_{}", spec.namespace, spec.name, spec.uid));
        fs::create_dir_all(&log_dir).expect("the pod's log dir");
        let sandbox_config = self.sandbox_config(spec, &cgroup, &log_dir);
        let mut client = self.client.clone();
        let sandbox_id = self
            .call(client.run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: String::new(),
            }))
            .unwrap_or_else(|status| {
                panic!(
                    "RunPodSandbox {}: {status}\ncontainerd's log:\n{}",
                    spec.name,
                    self.containerd().log()
                )
            })
            .pod_sandbox_id;
        self.made.push((sandbox_id.clone(), cgroup.clone()));
        let status = self
            .call(client.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: sandbox_id.clone(),
                verbose: false,
            }))
            .unwrap_or_else(|status| panic!("PodSandboxStatus {}: {status}", spec.name));
        // A hostNetwork pod has the node's addresses, which the tests reach on loopback.
        let ip: IpAddr = if spec.host_network {
            IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        } else {
            status
                .status
                .and_then(|status| status.network)
                .and_then(|network| network.ip.parse().ok())
                .unwrap_or_else(|| panic!("the sandbox of {} has no IP from the CNI", spec.name))
        };
        let mut pod = CriPod {
            spec: spec.clone(),
            sandbox_id,
            ip,
            cgroup,
            containers: HashMap::new(),
            init_exits: Vec::new(),
            log_dir,
        };
        sandbox_ready(&pod);
        for container in &spec.init_containers {
            if self.run_to_exit(&mut pod, container, &sandbox_config) != 0 {
                return pod;
            }
        }
        for container in &spec.containers {
            let id = self.start_container(&pod, container, &sandbox_config);
            pod.containers.insert(container.name.clone(), id);
        }
        pod
    }

    /// Creates and starts `container` in the running `pod`, after the others: how a test starts a
    /// pod's containers one at a time.
    pub fn add_container(&mut self, pod: &mut CriPod, container: &Container) {
        let sandbox_config = self.sandbox_config(&pod.spec, &pod.cgroup, &pod.log_dir);
        let id = self.start_container(pod, container, &sandbox_config);
        pod.containers.insert(container.name.clone(), id);
        pod.spec.containers.push(container.clone());
    }

    /// Runs the init container `container` in the running `pod` to its end, as the kubelet does
    /// before the pod's containers: its exit code, also recorded in the pod's `init_exits`.
    pub fn run_init_container(&mut self, pod: &mut CriPod, container: &Container) -> i32 {
        let sandbox_config = self.sandbox_config(&pod.spec, &pod.cgroup, &pod.log_dir);
        let code = self.run_to_exit(pod, container, &sandbox_config);
        pod.spec.init_containers.push(container.clone());
        code
    }

    /// Starts the init container `container` in `pod`, waits for its end and records it: its
    /// exit code.
    fn run_to_exit(
        &self,
        pod: &mut CriPod,
        container: &Container,
        sandbox_config: &PodSandboxConfig,
    ) -> i32 {
        let id = self.start_container(pod, container, sandbox_config);
        let code = self.wait_exited(&id, &container.name);
        pod.containers.insert(container.name.clone(), id);
        pod.init_exits.push((container.name.clone(), code));
        code
    }

    /// Pulls `image` through CRI's image service, as the kubelet does for a pod whose image the
    /// node lacks: the image's repo digests (`<repository>@sha256:…`) once it is pulled.
    pub fn pull_image(&mut self, image: &str) -> Vec<String> {
        let spec = || ImageSpec {
            image: image.to_owned(),
            ..ImageSpec::default()
        };
        let mut images = self.images.clone();
        self.call(images.pull_image(PullImageRequest {
            image: Some(spec()),
            auth: None,
            sandbox_config: None,
        }))
        .unwrap_or_else(|status| {
            panic!(
                "PullImage {image}: {status}\ncontainerd's log:\n{}",
                self.containerd().log()
            )
        });
        self.call(images.image_status(ImageStatusRequest {
            image: Some(spec()),
            verbose: false,
        }))
        .unwrap_or_else(|status| panic!("ImageStatus {image}: {status}"))
        .image
        .unwrap_or_else(|| panic!("{image} is not on the node after its pull"))
        .repo_digests
    }

    /// Stops and removes the pod's sandbox through CRI, as the kubelet does for a deleted pod, then
    /// removes its cgroup.
    pub fn remove_pod(&mut self, pod: &CriPod) {
        self.remove_sandbox(&pod.sandbox_id);
        self.made.retain(|(id, _)| *id != pod.sandbox_id);
        self.remove_pod_cgroup(&pod.cgroup);
    }

    /// Removes the pod's cgroup, in every hierarchy, as the kubelet does once the pod is gone.
    fn remove_pod_cgroup(&self, cgroup: &Path) {
        for (pod, root) in in_every_hierarchy(cgroup)
            .iter()
            .zip(in_every_hierarchy(&self.cgroup_root))
        {
            remove_pod_cgroup(pod, &root);
        }
    }

    /// The pid of the sandbox's pause process, from the runtime's verbose sandbox status.
    pub fn pause_pid(&self, pod: &CriPod) -> u32 {
        let mut client = self.client.clone();
        let status = self
            .call(client.pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.sandbox_id.clone(),
                verbose: true,
            }))
            .unwrap_or_else(|status| panic!("PodSandboxStatus {}: {status}", pod.spec.name));
        let info: serde_json::Value = status
            .info
            .get("info")
            .and_then(|info| serde_json::from_str(info).ok())
            .unwrap_or_else(|| panic!("no verbose info for {}: {:?}", pod.spec.name, status.info));
        info["pid"]
            .as_u64()
            .and_then(|pid| u32::try_from(pid).ok())
            .unwrap_or_else(|| panic!("no pid in the sandbox's info: {info}"))
    }

    /// Stops containerd and starts it again on the same root, state and socket, as a node's
    /// upgrade does; the pods' shims and processes run on meanwhile.
    pub fn restart_containerd(&mut self) {
        let containerd = self.containerd.as_mut().expect("containerd");
        containerd.restart();
        let channel = self.runtime.block_on(connect(&containerd.socket()));
        self.client = RuntimeServiceClient::new(channel.clone());
        self.images = ImageServiceClient::new(channel);
        self.wait_until_ready();
    }

    /// Runs `command` in the container `id` as the kubelet runs an exec probe (ExecSync, within
    /// `timeout`): its exit code and what it printed on stdout and stderr, or why the runtime
    /// could not run it (the container has exited, say).
    pub fn exec_sync(
        &self,
        id: &str,
        command: &[&str],
        timeout: Duration,
    ) -> Result<(i32, String), String> {
        let mut client = self.client.clone();
        let answer = self
            .call(client.exec_sync(k8s_cri::v1::ExecSyncRequest {
                container_id: id.to_owned(),
                cmd: command.iter().map(|&arg| arg.to_owned()).collect(),
                timeout: i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX),
            }))
            .map_err(|status| format!("ExecSync {command:?} in {id}: {status}"))?;
        let output = format!(
            "{}{}",
            String::from_utf8_lossy(&answer.stdout),
            String::from_utf8_lossy(&answer.stderr)
        );
        Ok((answer.exit_code, output))
    }

    /// When the container `id` exited, as containerd recorded it.
    pub fn finished_at(&self, id: &str) -> std::time::SystemTime {
        let status = self.container_status(id, id);
        let nanos =
            u64::try_from(status.finished_at).unwrap_or_else(|_| panic!("{id} has not exited"));
        std::time::UNIX_EPOCH + Duration::from_nanos(nanos)
    }

    /// The cgroup the pod of `spec` gets (in the v2 hierarchy), as the kubelet names it.
    pub fn pod_cgroup(&self, spec: &PodSpec) -> PathBuf {
        match spec.driver {
            CgroupDriver::Cgroupfs => self
                .cgroup_root
                .join("kubepods/besteffort")
                .join(format!("pod{}", spec.uid)),
            CgroupDriver::Systemd => self
                .cgroup_root
                .join("kubepods.slice/kubepods-besteffort.slice")
                .join(format!(
                    "kubepods-besteffort-pod{}.slice",
                    spec.uid.replace('-', "_")
                )),
        }
    }

    /// The sandbox's configuration as the kubelet writes it: its metadata, labels, log dir, the
    /// pod's cgroup as parent (relative to the cgroup mount, as runc takes it), a network
    /// namespace of the pod's own, a PID namespace per container.
    fn sandbox_config(&self, spec: &PodSpec, cgroup: &Path, log_dir: &Path) -> PodSandboxConfig {
        let parent = match spec.driver {
            // The slice's name alone, as the kubelet's systemd driver gives it.
            CgroupDriver::Systemd => cgroup
                .file_name()
                .expect("the pod's slice")
                .to_string_lossy()
                .into_owned(),
            // The path from the hierarchy's root, as the kubelet's cgroupfs driver gives it.
            CgroupDriver::Cgroupfs => {
                let mount = cgroup2_mount().expect("the cgroup v2 mount");
                let relative = cgroup.strip_prefix(&mount).expect("under the mount");
                Path::new("/").join(relative).display().to_string()
            }
        };
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: spec.name.clone(),
                uid: spec.uid.clone(),
                namespace: spec.namespace.clone(),
                attempt: 0,
            }),
            // A hostNetwork pod keeps the node's name: it has no UTS namespace of its own.
            hostname: if spec.host_network {
                String::new()
            } else {
                spec.name.clone()
            },
            log_directory: log_dir.display().to_string(),
            labels: HashMap::from([
                ("io.kubernetes.pod.name".to_owned(), spec.name.clone()),
                (
                    "io.kubernetes.pod.namespace".to_owned(),
                    spec.namespace.clone(),
                ),
                ("io.kubernetes.pod.uid".to_owned(), spec.uid.clone()),
            ]),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: parent,
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces(spec)),
                    // As the kubelet: a pod with a privileged container has a privileged sandbox,
                    // which containerd requires of it.
                    privileged: spec.privileged_later
                        || spec
                            .init_containers
                            .iter()
                            .chain(&spec.containers)
                            .any(|container| container.privileged),
                    ..LinuxSandboxSecurityContext::default()
                }),
                ..LinuxPodSandboxConfig::default()
            }),
            ..PodSandboxConfig::default()
        }
    }

    fn start_container(
        &self,
        pod: &CriPod,
        container: &Container,
        sandbox_config: &PodSandboxConfig,
    ) -> String {
        let ip = pod.ip.to_string();
        let fields = container.env_fields.iter().map(|(key, path)| {
            let value = match path.as_str() {
                "metadata.name" => pod.spec.name.clone(),
                "metadata.namespace" => pod.spec.namespace.clone(),
                "metadata.uid" => pod.spec.uid.clone(),
                "spec.nodeName" => self.node_name.clone(),
                "status.podIP" | "status.podIPs" => ip.clone(),
                other => panic!("{}: the downward API field {other}", container.name),
            };
            (key.clone(), value)
        });
        let envs = container
            .env
            .iter()
            .cloned()
            .chain(fields)
            .map(|(key, value)| KeyValue { key, value })
            .collect();
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: container.name.clone(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: container.image.clone(),
                ..ImageSpec::default()
            }),
            command: container.command.clone(),
            args: container.args.clone(),
            envs,
            mounts: container
                .mounts
                .iter()
                .map(|bind| k8s_cri::v1::Mount {
                    container_path: bind.container.clone(),
                    host_path: bind.host.display().to_string(),
                    readonly: bind.readonly,
                    propagation: bind.propagation.cri() as i32,
                    ..k8s_cri::v1::Mount::default()
                })
                .collect(),
            labels: HashMap::from([
                (
                    "io.kubernetes.container.name".to_owned(),
                    container.name.clone(),
                ),
                ("io.kubernetes.pod.name".to_owned(), pod.spec.name.clone()),
                (
                    "io.kubernetes.pod.namespace".to_owned(),
                    pod.spec.namespace.clone(),
                ),
                ("io.kubernetes.pod.uid".to_owned(), pod.spec.uid.clone()),
            ]),
            log_path: format!("{}.log", container.name),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(namespaces(&pod.spec)),
                    run_as_user: container
                        .run_as_user
                        .map(|value| k8s_cri::v1::Int64Value { value }),
                    run_as_group: container
                        .run_as_group
                        .map(|value| k8s_cri::v1::Int64Value { value }),
                    readonly_rootfs: container.read_only_rootfs,
                    no_new_privs: container.no_new_privs,
                    privileged: container.privileged,
                    capabilities: (container.drop_all_capabilities
                        || !container.add_capabilities.is_empty())
                    .then(|| k8s_cri::v1::Capability {
                        drop_capabilities: if container.drop_all_capabilities {
                            vec!["ALL".to_owned()]
                        } else {
                            Vec::new()
                        },
                        add_capabilities: container.add_capabilities.clone(),
                        ..k8s_cri::v1::Capability::default()
                    }),
                    seccomp: container.seccomp_runtime_default.then(|| {
                        k8s_cri::v1::SecurityProfile {
                            profile_type: k8s_cri::v1::security_profile::ProfileType::RuntimeDefault
                                as i32,
                            ..k8s_cri::v1::SecurityProfile::default()
                        }
                    }),
                    ..LinuxContainerSecurityContext::default()
                }),
                ..LinuxContainerConfig::default()
            }),
            ..ContainerConfig::default()
        };
        let mut client = self.client.clone();
        let id = self
            .call(client.create_container(CreateContainerRequest {
                pod_sandbox_id: pod.sandbox_id.clone(),
                config: Some(config),
                sandbox_config: Some(sandbox_config.clone()),
            }))
            .unwrap_or_else(|status| {
                panic!(
                    "CreateContainer {} in {}: {status}",
                    container.name, pod.spec.name
                )
            })
            .container_id;
        self.call(client.start_container(StartContainerRequest {
            container_id: id.clone(),
        }))
        .unwrap_or_else(|status| {
            panic!(
                "StartContainer {} in {}: {status}\n{}",
                container.name,
                pod.spec.name,
                pod.log(&container.name)
            )
        });
        id
    }

    /// Waits until the container has exited and returns its exit code.
    fn wait_exited(&self, id: &str, name: &str) -> i32 {
        let started = Instant::now();
        loop {
            let status = self.container_status(id, name);
            if status.state == ContainerState::ContainerExited as i32 {
                return status.exit_code;
            }
            assert!(
                started.elapsed() < INIT_WITHIN,
                "the init container {name} still runs after {INIT_WITHIN:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// ContainerStatus of the container `id`, called `name` in a panic's message.
    fn container_status(&self, id: &str, name: &str) -> k8s_cri::v1::ContainerStatus {
        let mut client = self.client.clone();
        self.call(client.container_status(ContainerStatusRequest {
            container_id: id.to_owned(),
            verbose: false,
        }))
        .unwrap_or_else(|status| panic!("ContainerStatus {name}: {status}"))
        .status
        .unwrap_or_else(|| panic!("no status for the container {name}"))
    }

    fn remove_sandbox(&self, id: &str) {
        let mut client = self.client.clone();
        self.call(client.stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        }))
        .unwrap_or_else(|status| panic!("StopPodSandbox {id}: {status}"));
        self.call(client.remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: id.to_owned(),
        }))
        .unwrap_or_else(|status| panic!("RemovePodSandbox {id}: {status}"));
    }

    /// Runs one CRI call to its answer, within [`CALL_WITHIN`].
    fn call<T>(
        &self,
        call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        self.runtime.block_on(async {
            match tokio::time::timeout(CALL_WITHIN, call).await {
                Ok(answer) => answer.map(tonic::Response::into_inner),
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "no answer within {CALL_WITHIN:?}"
                ))),
            }
        })
    }
}

impl Drop for CriNode {
    fn drop(&mut self) {
        for (id, cgroup) in std::mem::take(&mut self.made) {
            // Best effort: a failing test may have left containerd unable to answer, and
            // containerd's guard then kills what is left.
            let removed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.remove_sandbox(&id);
            }));
            if removed.is_err() {
                eprintln!("could not remove the sandbox {id} through CRI");
            }
            self.remove_pod_cgroup(&cgroup);
        }
        drop(self.containerd.take());
        for tree in in_every_hierarchy(&self.cgroup_root) {
            remove_tree(&tree);
        }
        // Below a caller's test cgroup, runc made that cgroup's directory in the v1 hierarchies
        // too; the caller's guard removes only the v2 one.
        if self.cgroup.is_none()
            && let Some(parent) = self.cgroup_root.parent()
        {
            for dir in in_every_hierarchy(parent) {
                if dir != parent {
                    let _ = fs::remove_dir(dir);
                }
            }
        }
    }
}

/// `cgroup` (a path in the v2 hierarchy) in every mounted cgroup hierarchy: runc on a machine
/// with v1 controllers makes a container's cgroup in each of them.
pub(crate) fn in_every_hierarchy(cgroup: &Path) -> Vec<PathBuf> {
    let v2 = cgroup2_mount().expect("the cgroup v2 mount");
    let relative = cgroup.strip_prefix(&v2).expect("under the v2 mount");
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    mountinfo
        .lines()
        .filter(|line| {
            line.split(" - ")
                .nth(1)
                .is_some_and(|fs| fs.starts_with("cgroup ") || fs.starts_with("cgroup2 "))
        })
        .filter_map(|line| line.split(' ').nth(4))
        .map(|mount| Path::new(mount).join(relative))
        .collect()
}

/// The kubelet's namespaces for a pod: the network and IPC namespaces shared by the pod (or the
/// node's network with `hostNetwork`), a PID namespace per container (or the node's with
/// `hostPID`).
fn namespaces(spec: &PodSpec) -> NamespaceOption {
    let mode = |node: bool, otherwise: NamespaceMode| {
        if node {
            NamespaceMode::Node as i32
        } else {
            otherwise as i32
        }
    };
    NamespaceOption {
        network: mode(spec.host_network, NamespaceMode::Pod),
        pid: mode(spec.host_pid, NamespaceMode::Container),
        ipc: NamespaceMode::Pod as i32,
        ..NamespaceOption::default()
    }
}

async fn connect(socket: &Path) -> Channel {
    let socket = socket.to_owned();
    Endpoint::try_from("http://[::]:0")
        .expect("a placeholder endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .expect("connect to containerd's CRI API")
}

/// Removes the pod's cgroup, as the kubelet does once the pod is gone, and the parents it made
/// that are left empty, up to the node's subtree.
fn remove_pod_cgroup(cgroup: &Path, root: &Path) {
    remove_tree(cgroup);
    let mut dir = cgroup.parent();
    while let Some(parent) = dir.filter(|dir| dir.starts_with(root) && *dir != root) {
        if fs::remove_dir(parent).is_err() {
            break;
        }
        dir = parent.parent();
    }
}

/// Removes a cgroup and everything below it, deepest first, killing what still runs there (a
/// container that neither CRI nor containerd's guard stopped).
pub(crate) fn remove_tree(dir: &Path) {
    let _ = fs::write(dir.join("cgroup.kill"), "1");
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_tree(&entry.path());
            }
        }
    }
    if dir.exists() {
        remove_cgroup(dir);
    }
}
