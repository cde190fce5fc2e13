//! The one error type of the datapath module.

use std::{
    io::{self, ErrorKind},
    path::PathBuf,
};

use aya::{EbpfError, maps::MapError, programs::ProgramError};

/// What went wrong while loading, attaching or updating the eBPF datapath.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// A task panicked while it held the shared datapath; its maps may be half updated.
    #[error("the datapath's lock was poisoned by a panic")]
    Poisoned,

    /// The agent was compiled with `AYA_BUILD_SKIP=1`, so it carries no kernel programs.
    #[error("this binary was built without its eBPF object (AYA_BUILD_SKIP)")]
    ObjectMissing,

    /// The object given with `--ebpf-object` could not be read.
    #[error("failed to read the eBPF object {path}")]
    ReadObject {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// The programs' log ring buffer could not be opened for reading.
    #[error("failed to read the eBPF programs' log")]
    KernelLog(#[source] aya_log::Error),

    /// The embedded object could not be parsed, relocated or have its maps created.
    #[error("failed to load the eBPF object")]
    Object(#[source] EbpfError),

    /// The embedded object lacks a program or map the agent expects: agent and object disagree.
    #[error("the eBPF object has no {kind} `{name}`")]
    NotInObject {
        /// "program" or "map".
        kind: &'static str,
        /// The name the agent looked for.
        name: &'static str,
    },

    /// The kernel refused a program. The verifier log says why.
    #[error("the kernel refused to load program `{program}`; verifier log:\n{verifier_log}")]
    ProgramRejected {
        /// The program's name.
        program: &'static str,
        /// The error of the `BPF_PROG_LOAD` call.
        #[source]
        io_error: io::Error,
        /// The kernel verifier's output.
        verifier_log: String,
    },

    /// Preparing, loading or detaching a program failed for a reason other than the verifier.
    #[error("program `{program}`: failed to {action}")]
    Program {
        /// The program's name.
        program: &'static str,
        /// What was being done, e.g. "load".
        action: &'static str,
        /// The cause.
        #[source]
        source: ProgramError,
    },

    /// The cgroup directory to attach to could not be opened.
    #[error("failed to open cgroup {path}")]
    OpenCgroup {
        /// The cgroup directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// The kernel refused to attach a program to a cgroup.
    #[error("failed to attach program `{program}` to cgroup {cgroup}")]
    Attach {
        /// The program's name.
        program: &'static str,
        /// The cgroup directory.
        cgroup: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// The kernel refused to attach the sk_lookup program to a pod's network namespace.
    #[error("failed to attach program `pb_sk_lookup` to network namespace {cookie}")]
    AttachNetns {
        /// The namespace's cookie.
        cookie: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// Reading or writing a map failed.
    #[error("map `{map}`: failed to {action}")]
    Map {
        /// The map's name.
        map: &'static str,
        /// What was being done, e.g. "insert 10.1.0.7".
        action: String,
        /// The cause.
        #[source]
        source: MapError,
    },

    /// A pin (or the pin directory) on bpffs could not be created, opened or used.
    #[error("pin {path}")]
    Pin {
        /// The pinned object or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// A pinned link of the agent is attached to another cgroup than the one asked for.
    #[error(
        "the pinned link {link} is attached to another cgroup than {cgroup}; run `probe-bypass uninstall` (same --pin-path) before attaching elsewhere"
    )]
    OtherCgroup {
        /// The pinned link.
        link: PathBuf,
        /// The cgroup asked for.
        cgroup: PathBuf,
    },

    /// The mount table could not be read.
    #[error("failed to read {path}")]
    ReadMounts {
        /// The file read, `/proc/mounts`.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },

    /// The machine has no cgroup v2 hierarchy, which the cgroup programs attach to.
    #[error(
        "no cgroup v2 hierarchy is mounted (no `cgroup2` entry in /proc/mounts); the eBPF datapath needs one"
    )]
    NoCgroup2,
}

impl DatapathError {
    /// True when the kernel refused for lack of privilege (`EPERM`: the process has neither
    /// `CAP_BPF` with `CAP_NET_ADMIN` nor `CAP_SYS_ADMIN`), as opposed to, say, the verifier
    /// rejecting a program, which fails with `EACCES` or `EINVAL`.
    pub fn is_permission_denied(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(error) = cause {
            if let Some(io_error) = error.downcast_ref::<io::Error>()
                && io_error.raw_os_error() == Some(nix::errno::Errno::EPERM as i32)
            {
                return true;
            }
            cause = error.source();
        }
        false
    }
}

pub(super) fn program_error(
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

pub(super) fn map_error(
    map: &'static str,
    action: &'static str,
    source: MapError,
) -> DatapathError {
    DatapathError::Map {
        map,
        action: action.to_owned(),
        source,
    }
}

/// A removal that found nothing to remove has done its job all the same.
pub(super) fn absent_is_fine(removal: Result<(), MapError>) -> Result<(), MapError> {
    match removal {
        Err(MapError::KeyNotFound | MapError::ElementNotFound) => Ok(()),
        Err(MapError::SyscallError(syscall)) if syscall.io_error.kind() == ErrorKind::NotFound => {
            Ok(())
        }
        other => other,
    }
}
