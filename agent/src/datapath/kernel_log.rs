//! The kernel programs' decision log: each redirect, bypass, exclusion and refusal, with the pod,
//! the addresses and the rule that decided, written by aya-log into a ring buffer and drained here
//! into the agent's own log under the target [`names::LOG_TARGET`] (`probe_bypass::ebpf`).
//!
//! Off unless the log filter enables that target (`RUST_LOG=probe_bypass::ebpf=debug`, or
//! `--ebpf-log debug`, which sets it). Off, the programs are loaded with aya-log's level global at
//! 0: each log call is one load of that read-only value and a branch that the verifier already
//! knows is not taken, before any formatting or ring-buffer write.

use aya::Ebpf;
use aya_log::EbpfLogger;
use log::{Level, Metadata};
use probe_bypass_common::names;
use tokio::io::{Interest, unix::AsyncFd};
use tokio_util::sync::CancellationToken;

use super::DatapathError;

/// The level of the programs' decision records (the `decision!` macro of `ebpf/programs`).
const DECISIONS: Level = Level::Debug;

/// The level the programs are loaded to write at: the most verbose one the agent's logger takes
/// for their target, when that includes their decisions; `None` (nothing written, nothing read)
/// otherwise, as at the default `info`.
pub fn kernel_log_level() -> Option<Level> {
    let logger = log::logger();
    [Level::Trace, DECISIONS].into_iter().find(|&level| {
        logger.enabled(
            &Metadata::builder()
                .target(names::LOG_TARGET)
                .level(level)
                .build(),
        )
    })
}

/// aya-log's level global for `level`: a record is written when its level's number is at most
/// this (error 1 … trace 5); 0 writes nothing.
pub(super) fn level_byte(level: Option<Level>) -> u8 {
    level.map_or(0, |level| level as u8)
}

/// The reader of the programs' log ring buffer. The programs keep writing (and dropping records
/// once it is full) for as long as they run; this only takes what is there.
pub struct KernelLog {
    logger: EbpfLogger<&'static dyn log::Log>,
}

impl KernelLog {
    /// Takes the ring buffer out of a loaded object, before its programs load. `None` for an
    /// object built without the log (no ring buffer), which is said once.
    pub(super) fn open(ebpf: &mut Ebpf) -> Result<Option<Self>, DatapathError> {
        match EbpfLogger::init(ebpf) {
            Ok(logger) => Ok(Some(Self { logger })),
            Err(aya_log::Error::MapNotFound) => {
                log::warn!(
                    "the eBPF object was built without its decision log (no AYA_LOGS map): \
                     {} has nothing to show",
                    names::LOG_TARGET
                );
                Ok(None)
            }
            Err(error) => Err(DatapathError::KernelLog(error)),
        }
    }

    /// Passes each record to the agent's logger as it arrives, until `stop`.
    pub async fn drain(self, stop: CancellationToken) {
        // SAFETY: the fd is the ring buffer's, which the logger owns and keeps open, unchanged,
        // for as long as the `AsyncFd` holds the logger.
        let registered =
            unsafe { AsyncFd::register_with_interest(self.logger, Interest::READABLE) };
        let mut ring = match registered {
            Ok(ring) => ring,
            Err(error) => {
                log::error!("cannot wait on the eBPF programs' log: {error}; it stays unread");
                return;
            }
        };
        loop {
            tokio::select! {
                ready = ring.readable_mut() => match ready {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(error) => {
                        log::error!("waiting on the eBPF programs' log: {error}; it stays unread");
                        return;
                    }
                },
                () = stop.cancelled() => break,
            }
        }
        ring.get_mut().flush();
    }
}
