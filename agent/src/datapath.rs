//! The eBPF datapath: the kernel programs embedded in this binary, and their loader.
//!
//! The programs (`ebpf/programs`) are built by `build.rs` and carried inside the agent, so the
//! agent and its programs always agree on the layout of the maps (`probe-bypass-common`).
//! [`Datapath`] loads them, attaches them to a cgroup v2 directory, fills their maps and reads
//! their counters. What it attaches stays attached for as long as the `Datapath` lives.

mod cgroup;
mod error;

use std::{collections::BTreeSet, fmt, fs::File, io, net::IpAddr, path::Path};

use aya::{
    Ebpf,
    maps::{HashMap, MapData, MapError, PerCpuArray},
    programs::{
        CgroupAttachMode, CgroupSockAddr, Link as _, ProgramError,
        cgroup_sock_addr::CgroupSockAddrLink,
    },
};
use probe_bypass_common::{Counter, PROBE_PORT_PRESENT, PodAddr, PodInfo};

pub use cgroup::cgroup2_mount;
pub use error::DatapathError;

/// The kernel object built from `ebpf/programs`; empty when the build skipped it (`AYA_BUILD_SKIP`).
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-bypass-ebpf"));

/// Names of the programs and maps in the object (the names of their `#[map]` statics and functions).
const CONNECT4: &str = "connect4";
const MESHED_PODS: &str = "MESHED_PODS";
const PROBE_PORTS: &str = "PROBE_PORTS";
const COUNTERS: &str = "COUNTERS";

/// The loaded kernel programs and their maps.
///
/// Dropping it detaches every program it attached and frees the programs and maps.
pub struct Datapath {
    // Declared first so that they are dropped, and the programs detached, before anything else goes.
    links: Vec<CgroupSockAddrLink>,
    meshed_pods: HashMap<MapData, PodAddr, PodInfo>,
    probe_ports: HashMap<MapData, u16, u8>,
    counters: PerCpuArray<MapData, u64>,
    /// Owns the loaded programs.
    ebpf: Ebpf,
}

/// The datapath's counters, summed over all CPUs since it was loaded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// `connect()` calls on IPv4 sockets in the attached cgroups.
    pub connect4: u64,
    /// Those whose destination is a meshed pod.
    pub to_meshed_pod: u64,
    /// Those to a meshed pod whose destination port is a probe port.
    pub to_probe_port: u64,
}

impl Datapath {
    /// Loads the embedded programs into the kernel, with empty maps, attached nowhere yet.
    ///
    /// Needs `CAP_BPF` and `CAP_NET_ADMIN` (Linux 5.8+) or `CAP_SYS_ADMIN`; see
    /// [`DatapathError::is_permission_denied`]. Before Linux 5.11 the maps are also charged to
    /// `RLIMIT_MEMLOCK`, which the caller must then raise.
    pub fn load() -> Result<Self, DatapathError> {
        if EBPF_OBJECT.is_empty() {
            return Err(DatapathError::ObjectMissing);
        }
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(DatapathError::Object)?;

        // Loading runs the verifier now, so a program the kernel refuses fails here rather than
        // at the first attach.
        connect4(&mut ebpf)?
            .load()
            .map_err(|error| load_error(CONNECT4, error))?;

        Ok(Self {
            links: Vec::new(),
            meshed_pods: take_map(&mut ebpf, MESHED_PODS)?,
            probe_ports: take_map(&mut ebpf, PROBE_PORTS)?,
            counters: take_map(&mut ebpf, COUNTERS)?,
            ebpf,
        })
    }

    /// Attaches the programs to a cgroup v2 directory: they then see the sockets of every process
    /// in it and in its descendants. Programs that other tools attached there are left alone.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let directory = File::open(cgroup).map_err(|source| DatapathError::OpenCgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let program = connect4(&mut self.ebpf)?;
        // Single, not AllowMultiple: from 5.7 aya attaches through a bpf_link, which is
        // multi-attach already, and the kernel refuses the extra flag with EINVAL (aya #1078).
        let link_id = program
            .attach(&directory, CgroupAttachMode::Single)
            .map_err(|source| DatapathError::Attach {
                program: CONNECT4,
                cgroup: cgroup.to_path_buf(),
                source,
            })?;
        // Owning the link ties the attachment to this value rather than to the program.
        let link = program
            .take_link(link_id)
            .map_err(|source| program_error(CONNECT4, "take its link", source))?;
        self.links.push(link);
        Ok(())
    }

    /// Detaches the programs from every cgroup they were attached to. The maps stay, so the
    /// counters can still be read.
    pub fn detach(&mut self) -> Result<(), DatapathError> {
        for link in self.links.drain(..) {
            link.detach()
                .map_err(|source| program_error(CONNECT4, "detach", source))?;
        }
        Ok(())
    }

    /// Marks an address as a meshed pod's. An IPv4 address and its IPv4-mapped IPv6 form are the
    /// same pod.
    pub fn insert_pod(&mut self, addr: IpAddr) -> Result<(), DatapathError> {
        self.meshed_pods
            .insert(PodAddr::from(addr), PodInfo::MESHED, 0)
            .map_err(|source| map_error(MESHED_PODS, format!("insert {addr}"), source))
    }

    /// Forgets a meshed pod's address. Forgetting an address that is not there is not an error.
    pub fn remove_pod(&mut self, addr: IpAddr) -> Result<(), DatapathError> {
        absent_is_fine(self.meshed_pods.remove(&PodAddr::from(addr)))
            .map_err(|source| map_error(MESHED_PODS, format!("remove {addr}"), source))
    }

    /// Makes `ports` the set of probe ports, replacing the previous set. Ports in both sets stay
    /// in the map throughout, so a connection to one of them is never misjudged meanwhile.
    pub fn set_probe_ports(&mut self, ports: &[u16]) -> Result<(), DatapathError> {
        let wanted: BTreeSet<u16> = ports.iter().copied().collect();
        for &port in &wanted {
            self.probe_ports
                .insert(port, PROBE_PORT_PRESENT, 0)
                .map_err(|source| map_error(PROBE_PORTS, format!("insert port {port}"), source))?;
        }

        // Collected first: deleting while walking the keys would make the walk restart.
        let present = self
            .probe_ports
            .keys()
            .collect::<Result<Vec<u16>, MapError>>()
            .map_err(|source| map_error(PROBE_PORTS, "list ports".to_owned(), source))?;
        for port in present.into_iter().filter(|port| !wanted.contains(port)) {
            absent_is_fine(self.probe_ports.remove(&port))
                .map_err(|source| map_error(PROBE_PORTS, format!("remove port {port}"), source))?;
        }
        Ok(())
    }

    /// Reads the counters, summed over all CPUs.
    pub fn counters(&self) -> Result<Counters, DatapathError> {
        let mut counters = Counters::default();
        for counter in Counter::ALL {
            let per_cpu = self.counters.get(&counter.index(), 0).map_err(|source| {
                map_error(COUNTERS, format!("read counter {counter:?}"), source)
            })?;
            // Wrapping: a 64-bit count will not overflow, and if it did a metric should not panic.
            let total = per_cpu
                .iter()
                .fold(0, |sum: u64, value| sum.wrapping_add(*value));
            let field = match counter {
                Counter::Connect4 => &mut counters.connect4,
                Counter::ToMeshedPod => &mut counters.to_meshed_pod,
                Counter::ToProbePort => &mut counters.to_probe_port,
            };
            *field = total;
        }
        Ok(counters)
    }
}

// By hand because aya's per-CPU array has no Debug; the handles say little anyway beyond the links.
impl fmt::Debug for Datapath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let Self {
            links,
            meshed_pods: _,
            probe_ports: _,
            counters: _,
            ebpf,
        } = self;
        f.debug_struct("Datapath")
            .field("links", links)
            .field("ebpf", ebpf)
            .finish_non_exhaustive()
    }
}

/// The connect4 program of a loaded object.
fn connect4(ebpf: &mut Ebpf) -> Result<&mut CgroupSockAddr, DatapathError> {
    ebpf.program_mut(CONNECT4)
        .ok_or(DatapathError::NotInObject {
            kind: "program",
            name: CONNECT4,
        })?
        .try_into()
        .map_err(|source| program_error(CONNECT4, "use it as a cgroup sock_addr program", source))
}

/// Takes a map out of a loaded object, typed.
fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, DatapathError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::NotInObject { kind: "map", name })?;
    M::try_from(map)
        .map_err(|source| map_error(name, "open it with the expected types".to_owned(), source))
}

/// Keeps the verifier log of a refused program in sight; other load failures keep their cause.
fn load_error(program: &'static str, error: ProgramError) -> DatapathError {
    match error {
        ProgramError::LoadError {
            io_error,
            verifier_log,
        } => DatapathError::ProgramRejected {
            program,
            io_error,
            verifier_log: verifier_log.to_string(),
        },
        source => program_error(program, "load", source),
    }
}

fn program_error(
    program: &'static str,
    action: &'static str,
    source: ProgramError,
) -> DatapathError {
    DatapathError::Program {
        program,
        action,
        source,
    }
}

fn map_error(map: &'static str, action: String, source: MapError) -> DatapathError {
    DatapathError::Map {
        map,
        action,
        source,
    }
}

/// A removal that found nothing to remove has done its job all the same.
fn absent_is_fine(removal: Result<(), MapError>) -> Result<(), MapError> {
    match removal {
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(syscall))
            if syscall.io_error.kind() == io::ErrorKind::NotFound =>
        {
            Ok(())
        }
        other => other,
    }
}
