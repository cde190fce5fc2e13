//! Loading the embedded kernel object and attaching its programs: to the cgroup through pinned
//! links, and sk_msg to its sockhash.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::ErrorKind,
    os::{fd::AsFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
    sync::Arc,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapError, SockHash},
    programs::{
        CgroupSockAddr, CgroupSockopt, ProgramError, SkLookup, SkMsg, SkReuseport, SockOps,
    },
};
use probe_bypass_common::{ConnKey, names};

use super::{
    Datapath, DatapathError, Settings,
    error::{map_error, program_error},
    kernel_log::{self, KernelLog},
    pins::{NETNS_LINKS, create_dir, maps_dir, remove_other_layouts},
    pods::Rules,
    sys::{self, AttachType},
};

/// The kernel object built from `ebpf/programs`; empty when the build skipped it (`AYA_BUILD_SKIP`).
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/probe-bypass-ebpf"));

/// Which kernel object [`Datapath::install_with`] loads, and what its programs log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Programs {
    /// A file to load instead of the embedded object (`--ebpf-object`, for benchmarks: the same
    /// programs built without their log).
    pub object: Option<PathBuf>,
    /// The programs' decision log: the most verbose level they write, `None` for nothing (the
    /// default). See [`KernelLog`].
    pub log: Option<log::Level>,
}

impl Datapath {
    /// Loads the embedded programs against the maps pinned under `pins` (creating them the first
    /// time), writes `settings`, and attaches the programs to `cgroup`, replacing the programs of
    /// links already pinned there. Pods already in the pinned maps stay until [`Self::remove_pod`]:
    /// a restarted agent reconciles them against its pod source instead of starting empty.
    ///
    /// `pins` must be on bpffs (see `preflight`).
    pub fn install(cgroup: &Path, pins: &Path, settings: Settings) -> Result<Self, DatapathError> {
        Self::install_with(cgroup, pins, settings, &Programs::default())
            .map(|(datapath, _)| datapath)
    }

    /// [`Self::install`] with `programs`: the object to load, and the level of its log. With a
    /// level, the log's reader comes back too; it must be kept, and drained
    /// ([`KernelLog::drain`]), for the records to reach the agent's log.
    pub fn install_with(
        cgroup: &Path,
        pins: &Path,
        settings: Settings,
        programs: &Programs,
    ) -> Result<(Self, Option<KernelLog>), DatapathError> {
        let file;
        let object = match &programs.object {
            Some(path) => {
                file = fs::read(path).map_err(|source| DatapathError::ReadObject {
                    path: path.clone(),
                    source,
                })?;
                &file[..]
            }
            None => EBPF_OBJECT,
        };
        if object.is_empty() {
            return Err(DatapathError::ObjectMissing);
        }
        let maps_dir = maps_dir(pins);
        let links_dir = pins.join("links");
        let netns_dir = pins.join(NETNS_LINKS);
        for dir in [pins, &links_dir, &netns_dir, &maps_dir] {
            create_dir(dir)?;
        }
        let cgroup_dir = fs::File::open(cgroup).map_err(|source| DatapathError::OpenCgroup {
            path: cgroup.to_path_buf(),
            source,
        })?;
        let cgroup_id = cgroup_dir
            .metadata()
            .map_err(|source| DatapathError::OpenCgroup {
                path: cgroup.to_path_buf(),
                source,
            })?
            .ino();

        let map_pins: Vec<(&str, PathBuf)> = names::MAPS
            .iter()
            .map(|name| (*name, maps_dir.join(name)))
            .collect();
        let mut loader = EbpfLoader::new();
        for (name, path) in &map_pins {
            loader.map_pin_path(name, path.as_path());
        }
        // Read-only once loaded: the verifier sees the level as a constant and drops the log
        // calls it disables. An object built without the log has no such global.
        let level = kernel_log::level_byte(programs.log);
        loader.override_global(aya_log::LEVEL, &level, false);
        let mut ebpf = loader.load(object).map_err(DatapathError::Object)?;
        // Taken before any program loads: the programs refer to the ring buffer by its fd.
        let kernel_log = match programs.log {
            Some(_) => KernelLog::open(&mut ebpf)?,
            None => None,
        };

        let sk_lookup: &mut SkLookup = program(&mut ebpf, names::SK_LOOKUP)?;
        sk_lookup
            .load()
            .map_err(|error| load_error(names::SK_LOOKUP, error))?;
        let sk_lookup = sk_lookup
            .fd()
            .map_err(|source| program_error(names::SK_LOOKUP, "get its fd", source))?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| DatapathError::Pin {
                path: netns_dir.clone(),
                source,
            })?;

        let reuseport: &mut SkReuseport = program(&mut ebpf, names::REUSEPORT)?;
        reuseport
            .load()
            .map_err(|error| load_error(names::REUSEPORT, error))?;
        let reuseport = reuseport
            .fd()
            .map_err(|source| program_error(names::REUSEPORT, "get its fd", source))?
            .as_fd()
            .try_clone_to_owned()
            .map_err(|source| DatapathError::Pin {
                path: pins.to_path_buf(),
                source,
            })?;

        let mut datapath = Self {
            config: take_map(&mut ebpf, names::CONFIG)?,
            pods_by_addr: take_map(&mut ebpf, names::PODS_BY_ADDR)?,
            pods_by_netns: take_map(&mut ebpf, names::PODS_BY_NETNS)?,
            port_rules: take_map(&mut ebpf, names::PORT_RULES)?,
            cidr_rules: take_map(&mut ebpf, names::CIDR_RULES)?,
            counters: take_map(&mut ebpf, names::COUNTERS)?,
            early_probes: take_map(&mut ebpf, names::EARLY_PROBES)?,
            listeners: take_map(&mut ebpf, names::LISTENERS)?,
            dependents: take_map(&mut ebpf, names::DEPENDENTS)?,
            sk_lookup,
            reuseport: Arc::new(reuseport),
            netns_links: BTreeSet::new(),
            node_rules: Rules::default(),
            pods: BTreeMap::new(),
            early_addrs: BTreeSet::new(),
            pins: pins.to_path_buf(),
            settings: settings.clone(),
        };
        datapath.adopt()?;
        // Settings and node rules go in before any program can run with them.
        datapath.apply_settings(settings)?;

        // sk_msg is attached to the sockhash, which holds it for as long as the map lives.
        let sockets: SockHash<MapData, ConnKey> = take_map(&mut ebpf, names::SOCKETS)?;
        let sk_msg: &mut SkMsg = program(&mut ebpf, names::SK_MSG)?;
        sk_msg
            .load()
            .map_err(|error| load_error(names::SK_MSG, error))?;
        let link = sk_msg
            .attach(sockets.fd())
            .map_err(|source| program_error(names::SK_MSG, "attach to SOCKETS", source))?;
        let link = sk_msg
            .take_link(link)
            .map_err(|source| program_error(names::SK_MSG, "take its link", source))?;
        #[expect(
            clippy::mem_forget,
            reason = "dropping the handle would detach the program; the pinned map keeps the \
                      attachment for as long as it lives"
        )]
        std::mem::forget(link);

        for name in names::CGROUP_PROGRAMS {
            attach_or_update(&mut ebpf, name, &cgroup_dir, cgroup, cgroup_id, &links_dir)?;
        }
        datapath.adopt_netns_links()?;
        remove_other_layouts(pins, &maps_dir);
        Ok((datapath, kernel_log))
    }
}

/// Loads cgroup program `name` and puts it in its pinned link: swapped in if the link exists,
/// attached and pinned if not.
fn attach_or_update(
    ebpf: &mut Ebpf,
    name: &'static str,
    cgroup_dir: &fs::File,
    cgroup: &Path,
    cgroup_id: u64,
    links_dir: &Path,
) -> Result<(), DatapathError> {
    let pin = links_dir.join(name);
    let existing = match sys::obj_get(&pin) {
        Ok(fd) => Some(fd),
        Err(error) if error.kind() == ErrorKind::NotFound => None,
        Err(source) => return Err(DatapathError::Pin { path: pin, source }),
    };
    if let Some(link) = &existing {
        let attached_to = sys::link_cgroup_id(link).map_err(|source| DatapathError::Pin {
            path: pin.clone(),
            source,
        })?;
        if attached_to != cgroup_id {
            return Err(DatapathError::OtherCgroup {
                link: pin,
                cgroup: cgroup.to_path_buf(),
            });
        }
    }

    let program = ebpf.program_mut(name).ok_or(DatapathError::NotInObject {
        kind: "program",
        name,
    })?;
    macro_rules! load {
        ($kind:ty, $attach_type:expr) => {{
            let program: &mut $kind = program
                .try_into()
                .map_err(|source| program_error(name, "use it as its kind", source))?;
            program.load().map_err(|error| load_error(name, error))?;
            let fd = program
                .fd()
                .map_err(|source| program_error(name, "get its fd", source))?;
            (fd.as_fd().try_clone_to_owned(), $attach_type)
        }};
    }
    let (fd, attach_type) = match name {
        names::CONNECT4 => load!(CgroupSockAddr, AttachType::Connect4),
        names::CONNECT6 => load!(CgroupSockAddr, AttachType::Connect6),
        names::SOCKOPS => load!(SockOps, AttachType::SockOps),
        _ => load!(CgroupSockopt, AttachType::GetSockopt),
    };
    let fd = fd.map_err(|source| DatapathError::Pin {
        path: pin.clone(),
        source,
    })?;
    if let Some(link) = &existing {
        return sys::link_update(link, &fd)
            .map_err(|source| DatapathError::Pin { path: pin, source });
    }
    let link =
        sys::link_create(&fd, cgroup_dir, attach_type).map_err(|source| DatapathError::Attach {
            program: name,
            cgroup: cgroup.to_path_buf(),
            source,
        })?;
    sys::obj_pin(&link, &pin).map_err(|source| DatapathError::Pin { path: pin, source })
}

/// A program of a loaded object, typed.
fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, DatapathError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or(DatapathError::NotInObject {
            kind: "program",
            name,
        })?
        .try_into()
        .map_err(|source| program_error(name, "use it as its kind", source))
}

/// Takes a map out of a loaded object, typed.
fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, DatapathError>
where
    M: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::NotInObject { kind: "map", name })?;
    M::try_from(map).map_err(|source| map_error(name, "open with the expected types", source))
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
