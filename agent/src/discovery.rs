//! Finding a Kubernetes pod's network namespace from the host's `/proc` (issue 4).
//!
//! The API server knows a pod's UID and IP but not its network namespace, and each runtime keeps
//! its sandbox's namespace somewhere of its own. The pod's processes are the one thing every
//! runtime shares: they sit in the pod's cgroup, named after its UID, and in its namespace. So the
//! agent reads every process's cgroup once per scan from the host's `/proc` (in a container, the
//! host's `/proc` mounted at `/host/proc`: `hostPID` is not needed), keeps the pod's, and checks
//! which of their namespaces holds the pod's IP: a pod's processes are not all in its namespace
//! (CRI-O's `conmon` stays in the host's), and the IP is the proof.
//!
//! The namespace is then named by `/proc/<pid>/ns/net` of the oldest such process, normally the
//! sandbox's pause process, which lives as long as the pod.
//!
//! Opening another user's `/proc/<pid>/ns/net` takes `CAP_SYS_PTRACE`, and the pause process runs
//! as user 65535: a process that cannot be read is left out, and a pod is reported unreadable only
//! when none of its processes that could be read is in a namespace holding its IP.
//!
//! Static pods are named in cgroups by the kubelet's own UID for them (the mirror pod's
//! `kubernetes.io/config.mirror` annotation), not by the mirror pod's UID.

mod addresses;
mod cgroup;
mod choose;
mod lookup;
mod pod_cgroups;
mod proc;

use std::{
    collections::{BTreeSet, HashMap},
    fmt, io,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
};

use self::{
    addresses::interface_addresses,
    choose::choose,
    proc::{Process, Skipped, vanished},
};
pub use self::{
    cgroup::normalize_uid,
    lookup::{NetnsLookup, NetnsQuery, ProcLookup},
};
use crate::{
    netns::{Netns, NetnsError, NetnsId, NetnsWorker},
    pod::NetnsRef,
};

/// A pod's network namespace, as found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    /// The process whose namespace file names it: the pod's oldest in that namespace.
    pub pid: u32,
    /// `<proc_root>/<pid>/ns/net`.
    pub netns: NetnsRef,
    pub netns_id: NetnsId,
}

/// A network namespace of a pod's processes, with the addresses found in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeenNetns {
    pub id: NetnsId,
    /// The oldest process of the pod in it that was still there.
    pub pid: u32,
    /// That process's container cgroup (`crio-conmon-….scope` names CRI-O's monitor).
    pub container: Option<String>,
    pub addresses: Vec<IpAddr>,
}

impl fmt::Display for SeenNetns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            id,
            pid,
            container,
            addresses,
        } = self;
        write!(f, "{id} of pid {pid}")?;
        if let Some(container) = container {
            write!(f, " ({container})")?;
        }
        let addresses: Vec<String> = addresses.iter().map(IpAddr::to_string).collect();
        write!(f, " with [{}]", addresses.join(", "))
    }
}

/// A process whose files could not be read, left out of a scan.
#[derive(Clone, Debug)]
pub struct UnreadableProcess {
    pub pid: u32,
    /// The file that could not be read: `<pid>/cgroup`, `<pid>/stat` or `<pid>/ns/net`.
    pub path: PathBuf,
    pub error: Arc<io::Error>,
}

impl UnreadableProcess {
    /// Why it could not be read, with what to do about it where that is known.
    fn reason(&self) -> String {
        let Self {
            pid: _,
            path,
            error,
        } = self;
        if path.ends_with("ns/net") && error.kind() == io::ErrorKind::PermissionDenied {
            return "permission denied — the agent needs CAP_SYS_PTRACE to open other users' \
                    /proc/<pid>/ns/net"
                .to_owned();
        }
        format!("cannot read {}: {error}", path.display())
    }
}

/// Why a pod's network namespace was not found.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot read {path}: {source}")]
    ProcUnreadable { path: PathBuf, source: io::Error },
    #[error(
        "no process of pod {uid} among the {scanned} processes in {proc_root}: none has a cgroup \
         .../kubepods/[<qos>/]pod{uid}/... (cgroupfs driver; /../[<qos>/]pod{uid}/... seen from \
         a cgroup namespace) or ...kubepods-[<qos>-]pod{}.slice/... (systemd driver){}",
        .uid.replace('-', "_"),
        cgroups_unread(.unattributed)
    )]
    NoProcess {
        uid: String,
        proc_root: PathBuf,
        scanned: usize,
        /// Processes whose cgroup could not be read: any of them may be the pod's.
        unattributed: Vec<UnreadableProcess>,
    },
    #[error(
        "found processes of pod {uid} but could not open their network namespace: {}{}",
        unreadable(.processes),
        opened(.ip, .namespaces)
    )]
    Unreadable {
        uid: String,
        ip: IpAddr,
        processes: Vec<UnreadableProcess>,
        /// Those of its namespaces that could be opened, none holding `ip`.
        namespaces: Vec<SeenNetns>,
    },
    #[error(
        "no network namespace of pod {uid}'s processes holds {ip}; seen: {}",
        list(.namespaces)
    )]
    IpNotFound {
        uid: String,
        ip: IpAddr,
        namespaces: Vec<SeenNetns>,
    },
    #[error(
        "{ip} is in {} network namespaces of pod {uid}'s processes, not one: {}",
        .namespaces.len(),
        list(.namespaces)
    )]
    SeveralNetns {
        uid: String,
        ip: IpAddr,
        namespaces: Vec<SeenNetns>,
    },
    #[error(
        "{ip} of pod {uid} is in the agent's own network namespace {netns}, the host's: a \
         hostNetwork pod has no namespace of its own"
    )]
    HostNetns {
        uid: String,
        ip: IpAddr,
        netns: NetnsId,
    },
    #[error(
        "network namespace {netns} holding {ip} of pod {uid} holds processes of pods {} too: \
         shared as with hostNetwork, it is not the pod's own",
        .other_pods.join(", ")
    )]
    SharedNetns {
        uid: String,
        ip: IpAddr,
        netns: NetnsId,
        other_pods: Vec<String>,
    },
    #[error(
        "cannot list the addresses in the network namespace of pid {pid} of pod {uid}: {source}"
    )]
    Netns {
        uid: String,
        pid: u32,
        source: NetnsError,
    },
}

fn cgroups_unread(processes: &[UnreadableProcess]) -> String {
    match processes {
        [] => String::new(),
        [first, ..] => format!(
            "; the cgroup of {} processes could not be read ({})",
            processes.len(),
            first.reason()
        ),
    }
}

/// The first process's reason, and which processes could not be read.
fn unreadable(processes: &[UnreadableProcess]) -> String {
    let Some(first) = processes.first() else {
        return "none could be read".to_owned();
    };
    let pids: Vec<String> = processes.iter().map(|p| p.pid.to_string()).collect();
    let label = if pids.len() == 1 { "pid" } else { "pids" };
    format!("{} ({label} {})", first.reason(), pids.join(", "))
}

fn opened(ip: &IpAddr, namespaces: &[SeenNetns]) -> String {
    if namespaces.is_empty() {
        return String::new();
    }
    format!(
        "; those it could open do not hold {ip}: {}",
        list(namespaces)
    )
}

fn list(namespaces: &[SeenNetns]) -> String {
    if namespaces.is_empty() {
        return "none (the pod's processes exited during the scan)".to_owned();
    }
    let seen: Vec<String> = namespaces.iter().map(SeenNetns::to_string).collect();
    seen.join("; ")
}

/// One read of a `/proc`, to find the namespaces of many pods.
///
/// Blocking: it reads thousands of files and enters namespaces on the [`NetnsWorker`]'s thread,
/// so call it from a blocking thread (`tokio::task::spawn_blocking`), never a tokio worker.
#[derive(Debug)]
pub struct ProcScan {
    proc_root: PathBuf,
    processes: Vec<Process>,
    /// Indexes into `processes`, by pod UID.
    by_pod: HashMap<String, Vec<usize>>,
    /// The pods' processes that could not be read, by pod UID.
    unreadable: HashMap<String, Vec<UnreadableProcess>>,
    /// Processes whose cgroup could not be read, so of no known pod.
    unattributed: Vec<UnreadableProcess>,
    pods_by_netns: HashMap<NetnsId, BTreeSet<String>>,
    scanned: usize,
    /// The agent runs in the host's namespace; a pod IP found there is a hostNetwork pod's.
    own_netns: Option<NetnsId>,
    /// Pods share namespaces (CRI-O's monitors all sit in the host's): each is listed once a scan.
    addresses: Mutex<HashMap<NetnsId, Vec<IpAddr>>>,
}

impl ProcScan {
    /// Reads the processes under `proc_root`: the host's `/proc`, wherever the agent mounts it.
    pub fn new(proc_root: &Path) -> Result<Self, DiscoveryError> {
        let proc::Scanned {
            processes,
            skipped,
            scanned,
        } = proc::scan(proc_root)?;
        let mut unreadable: HashMap<String, Vec<UnreadableProcess>> = HashMap::new();
        let mut unattributed = Vec::new();
        for Skipped { uid, process } in skipped {
            match uid {
                Some(uid) => unreadable.entry(uid).or_default().push(process),
                None => unattributed.push(process),
            }
        }
        let mut by_pod: HashMap<String, Vec<usize>> = HashMap::new();
        let mut pods_by_netns: HashMap<NetnsId, BTreeSet<String>> = HashMap::new();
        for (index, process) in processes.iter().enumerate() {
            by_pod
                .entry(process.pod.uid.clone())
                .or_default()
                .push(index);
            pods_by_netns
                .entry(process.netns)
                .or_default()
                .insert(process.pod.uid.clone());
        }
        Ok(Self {
            proc_root: proc_root.to_owned(),
            processes,
            by_pod,
            unreadable,
            unattributed,
            pods_by_netns,
            scanned,
            own_netns: NetnsId::of(Path::new("/proc/thread-self/ns/net")).ok(),
            addresses: Mutex::new(HashMap::new()),
        })
    }

    /// The network namespace of the pod with UID `pod_uid` (dashes or the systemd underscores)
    /// that holds `pod_ip`, entering the candidates on `worker`'s thread to list their addresses.
    pub fn find(
        &self,
        worker: &NetnsWorker,
        pod_uid: &str,
        pod_ip: IpAddr,
    ) -> Result<Found, DiscoveryError> {
        let uid = normalize_uid(pod_uid);
        let members = self.by_pod.get(&uid).map_or(&[][..], Vec::as_slice);
        let mut unreadable = self.unreadable.get(&uid).cloned().unwrap_or_default();
        if members.is_empty() && unreadable.is_empty() {
            return Err(DiscoveryError::NoProcess {
                uid,
                proc_root: self.proc_root.clone(),
                scanned: self.scanned,
                unattributed: self.unattributed.clone(),
            });
        }
        let mut seen = Vec::new();
        for group in self.by_netns_oldest_first(members) {
            seen.extend(self.look_into(worker, &uid, &group, &mut unreadable)?);
        }
        // The pod's namespace may be behind the processes that could not be read.
        if !unreadable.is_empty() && !seen.iter().any(|s| s.addresses.contains(&pod_ip)) {
            unreadable.sort_by_key(|p| p.pid);
            return Err(DiscoveryError::Unreadable {
                uid,
                ip: pod_ip,
                processes: unreadable,
                namespaces: seen,
            });
        }
        let chosen = choose(&uid, pod_ip, seen, self.own_netns, |netns| {
            self.pods_by_netns.get(&netns).cloned().unwrap_or_default()
        })?;
        Ok(Found {
            pid: chosen.pid,
            netns: NetnsRef::Process {
                path: self.netns_path(chosen.pid),
                id: chosen.id,
            },
            netns_id: chosen.id,
        })
    }

    /// The pod's processes grouped by namespace, each group oldest first, the groups in the order
    /// of their oldest process.
    fn by_netns_oldest_first(&self, members: &[usize]) -> Vec<Vec<&Process>> {
        let mut processes: Vec<&Process> = members.iter().map(|&i| &self.processes[i]).collect();
        // The pid breaks ties between processes started in the same clock tick.
        processes.sort_by_key(|p| (p.start_time, p.pid));
        let mut groups: Vec<Vec<&Process>> = Vec::new();
        for process in processes {
            match groups.iter_mut().find(|g| g[0].netns == process.netns) {
                Some(group) => group.push(process),
                None => groups.push(vec![process]),
            }
        }
        groups
    }

    /// The addresses in the namespace of `group`, entered through its oldest process that is still
    /// there. A process that exited since the scan, or whose pid now belongs to a process
    /// elsewhere, is passed over, as is one that cannot be opened (added to `unreadable`: it may
    /// have dropped its privileges since the scan); `None` when all of them are.
    fn look_into(
        &self,
        worker: &NetnsWorker,
        uid: &str,
        group: &[&Process],
        unreadable: &mut Vec<UnreadableProcess>,
    ) -> Result<Option<SeenNetns>, DiscoveryError> {
        for process in group {
            let netns_error = |source| DiscoveryError::Netns {
                uid: uid.to_owned(),
                pid: process.pid,
                source,
            };
            let netns = match Netns::open(&self.netns_path(process.pid)) {
                Ok(netns) if netns.id() == process.netns => Arc::new(netns),
                Ok(_) => continue,
                Err(NetnsError::Open { source, .. }) if vanished(&source) => continue,
                Err(NetnsError::Open { path, source }) => {
                    unreadable.push(UnreadableProcess {
                        pid: process.pid,
                        path,
                        error: Arc::new(source),
                    });
                    continue;
                }
                Err(error) => return Err(netns_error(error)),
            };
            let addresses = self.addresses_in(worker, &netns).map_err(netns_error)?;
            return Ok(Some(SeenNetns {
                id: process.netns,
                pid: process.pid,
                container: process.pod.container.clone(),
                addresses,
            }));
        }
        Ok(None)
    }

    fn addresses_in(
        &self,
        worker: &NetnsWorker,
        netns: &Arc<Netns>,
    ) -> Result<Vec<IpAddr>, NetnsError> {
        let cache = || {
            self.addresses
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
        };
        if let Some(addresses) = cache().get(&netns.id()) {
            return Ok(addresses.clone());
        }
        let addresses = worker.run_blocking(netns, interface_addresses)?;
        cache().insert(netns.id(), addresses.clone());
        Ok(addresses)
    }

    fn netns_path(&self, pid: u32) -> PathBuf {
        self.proc_root.join(pid.to_string()).join("ns/net")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "0b9c4d1e-7f2a-4c3b-9d8e-1a2b3c4d5e6f";

    #[test]
    fn no_process_error_says_where_and_which_shapes() {
        let error = DiscoveryError::NoProcess {
            uid: UID.to_owned(),
            proc_root: PathBuf::from("/host/proc"),
            scanned: 1234,
            unattributed: Vec::new(),
        };
        let message = error.to_string();
        for part in [
            "/host/proc",
            "1234",
            &format!("pod{UID}/"),
            &format!("pod{}.slice", UID.replace('-', "_")),
        ] {
            assert!(message.contains(part), "{part:?} missing from: {message}");
        }
    }

    fn denied(pid: u32) -> UnreadableProcess {
        UnreadableProcess {
            pid,
            path: PathBuf::from(format!("/host/proc/{pid}/ns/net")),
            error: Arc::new(io::Error::from_raw_os_error(libc::EACCES)),
        }
    }

    #[test]
    fn unreadable_error_says_which_capability_is_missing() {
        let ip: IpAddr = "10.244.1.7".parse().expect("ip");
        let error = DiscoveryError::Unreadable {
            uid: UID.to_owned(),
            ip,
            processes: vec![denied(12), denied(13)],
            namespaces: Vec::new(),
        };
        assert_eq!(
            error.to_string(),
            format!(
                "found processes of pod {UID} but could not open their network namespace: \
                 permission denied — the agent needs CAP_SYS_PTRACE to open other users' \
                 /proc/<pid>/ns/net (pids 12, 13)"
            )
        );
        let conmon = SeenNetns {
            id: NetnsId { dev: 4, ino: 1 },
            pid: 11,
            container: Some("crio-conmon-abc.scope".to_owned()),
            addresses: vec!["192.0.2.10".parse().expect("ip")],
        };
        let error = DiscoveryError::Unreadable {
            uid: UID.to_owned(),
            ip,
            processes: vec![denied(12)],
            namespaces: vec![conmon],
        };
        let message = error.to_string();
        for part in [
            "CAP_SYS_PTRACE",
            "do not hold 10.244.1.7",
            "pid 11",
            "192.0.2.10",
        ] {
            assert!(message.contains(part), "{part:?} missing from: {message}");
        }
    }

    #[test]
    fn no_process_error_counts_the_processes_whose_cgroup_was_unreadable() {
        let unreadable = UnreadableProcess {
            pid: 7,
            path: PathBuf::from("/host/proc/7/cgroup"),
            error: Arc::new(io::Error::from_raw_os_error(libc::EACCES)),
        };
        let error = DiscoveryError::NoProcess {
            uid: UID.to_owned(),
            proc_root: PathBuf::from("/host/proc"),
            scanned: 1234,
            unattributed: vec![
                unreadable.clone(),
                UnreadableProcess {
                    pid: 8,
                    ..unreadable
                },
            ],
        };
        let message = error.to_string();
        assert!(
            message.ends_with(
                "; the cgroup of 2 processes could not be read (cannot read /host/proc/7/cgroup: \
                 Permission denied (os error 13))"
            ),
            "{message}"
        );
    }
}
