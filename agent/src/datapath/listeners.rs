//! Finds a proxy's inbound listener that was already listening when the datapath's programs were
//! attached, so that sk_lookup can hand it the connections from other nodes (issue 5).
//!
//! The sockops program files every socket that starts listening on the inbound port, in any
//! namespace, from the moment it is attached. Listeners older than that (the agent's first start on
//! a node with meshed pods running, or maps of a new layout) are found here instead: the socket's
//! inode among the listening TCP sockets of the pod's namespace, the process holding it among the
//! host's processes, and a duplicate of its descriptor through `pidfd_getfd` (Linux 5.6+,
//! CAP_SYS_PTRACE). The pids under the host's /proc must be the agent's own: it shares the host's
//! PID namespace (`hostPID`).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    os::fd::{FromRawFd as _, OwnedFd},
    path::{Path, PathBuf},
    sync::Arc,
};

use super::sock_diag;
use crate::netns::{Netns, NetnsError, NetnsId, NetnsWorker};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

/// `st` of a listening socket in /proc/net/tcp.
const TCP_LISTEN: &str = "0A";

/// A duplicate of a proxy's listening socket, owned by the agent.
#[derive(Debug)]
pub struct Listener {
    /// `AF_INET` or `AF_INET6`.
    pub family: u32,
    pub socket: OwnedFd,
}

/// Why a listener could not be taken over.
#[derive(Debug, thiserror::Error)]
pub enum ListenerError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("cannot read {path}: {source}")]
    Proc { path: PathBuf, source: io::Error },
    #[error(
        "the processes under {proc_root} are not in the agent's PID namespace (run the agent with \
         hostPID), so their listening sockets cannot be taken over"
    )]
    OtherPidNamespace { proc_root: PathBuf },
    #[error(
        "cannot take socket {fd} of process {pid}: {source} (pidfd_getfd needs Linux 5.6+ and \
         CAP_SYS_PTRACE)"
    )]
    Take {
        pid: u32,
        fd: u32,
        source: io::Error,
    },
    #[error("the lookup task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The sockets listening on TCP `port` in `netns`, one per address family, taken from the
/// processes that hold them. Empty if nothing listens there (yet).
pub async fn find(
    worker: &NetnsWorker,
    netns: &Arc<Netns>,
    port: u16,
    proc_root: &Path,
) -> Result<Vec<Listener>, ListenerError> {
    let inodes = worker.run(netns, move || listening_inodes(port)).await?;
    if inodes.is_empty() {
        return Ok(Vec::new());
    }
    let proc_root = proc_root.to_path_buf();
    let netns_id = netns.id();
    tokio::task::spawn_blocking(move || {
        if !same_pid_namespace(&proc_root) {
            return Err(ListenerError::OtherPidNamespace { proc_root });
        }
        holders(&proc_root, netns_id, &inodes)?
            .into_iter()
            .map(|(family, (pid, fd))| {
                let socket =
                    take_fd(pid, fd).map_err(|source| ListenerError::Take { pid, fd, source })?;
                Ok(Listener { family, socket })
            })
            .collect()
    })
    .await?
}

/// The inodes of the sockets listening on `port` in the calling thread's namespace, with their
/// families: asked of sock_diag, or read from /proc/net/tcp(6) where the kernel does not answer it
/// (no `inet_diag` module), which is much slower (see [`sock_diag`]).
fn listening_inodes(port: u16) -> io::Result<BTreeMap<u64, u32>> {
    let mut inodes = BTreeMap::new();
    for family in [AF_INET, AF_INET6] {
        #[expect(
            clippy::cast_possible_truncation,
            reason = "AF_INET and AF_INET6 fit in u8"
        )]
        match sock_diag::listening_inodes(family as u8, port) {
            Ok(found) => inodes.extend(found.into_iter().map(|inode| (inode, family))),
            Err(error) => {
                log::debug!("sock_diag cannot list the listening sockets ({error}): reading /proc");
                return table_inodes(port);
            }
        }
    }
    Ok(inodes)
}

/// [`listening_inodes`] from the namespace's /proc/net/tcp and tcp6 tables.
fn table_inodes(port: u16) -> io::Result<BTreeMap<u64, u32>> {
    let mut inodes = BTreeMap::new();
    for (table, family) in [("tcp", AF_INET), ("tcp6", AF_INET6)] {
        let path = Path::new("/proc/thread-self/net").join(table);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            // No IPv6 in this kernel: no IPv6 listeners either.
            Err(error) if error.kind() == io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        inodes.extend(
            parse_listeners(&text, port)
                .into_iter()
                .map(|inode| (inode, family)),
        );
    }
    Ok(inodes)
}

/// The inodes of the rows of a /proc/net/tcp(6) table that listen on `port`.
fn parse_listeners(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|row| {
            let fields: Vec<&str> = row.split_whitespace().collect();
            let (local, state, inode) = (fields.get(1)?, fields.get(3)?, fields.get(9)?);
            let (_, hex_port) = local.rsplit_once(':')?;
            let listening = *state == TCP_LISTEN && u16::from_str_radix(hex_port, 16).ok()? == port;
            listening.then(|| inode.parse().ok()).flatten()
        })
        .collect()
}

/// Whether the pids under `proc_root` are the agent's: its `self` is this process.
fn same_pid_namespace(proc_root: &Path) -> bool {
    fs::read_link(proc_root.join("self"))
        .ok()
        .and_then(|pid| pid.to_str()?.parse::<u32>().ok())
        == Some(std::process::id())
}

/// For each family among `inodes` (socket inode → family), a process in the namespace `netns`
/// holding one of those sockets, and the descriptor it holds it by: one pass over the processes,
/// which ends once every family has one. Processes that exit meanwhile are skipped.
fn holders(
    proc_root: &Path,
    netns: NetnsId,
    inodes: &BTreeMap<u64, u32>,
) -> Result<BTreeMap<u32, (u32, u32)>, ListenerError> {
    let families: BTreeSet<u32> = inodes.values().copied().collect();
    let mut found = BTreeMap::new();
    let entries = fs::read_dir(proc_root).map_err(|source| ListenerError::Proc {
        path: proc_root.to_path_buf(),
        source,
    })?;
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let dir = entry.path();
        if NetnsId::of(&dir.join("ns/net")).ok() != Some(netns) {
            continue;
        }
        let Ok(fds) = fs::read_dir(dir.join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let family = socket_inode(&fd.path()).and_then(|inode| inodes.get(&inode));
            if let Some(&family) = family
                && let Some(number) = fd.file_name().to_str().and_then(|s| s.parse().ok())
            {
                found.entry(family).or_insert((pid, number));
            }
        }
        if found.len() == families.len() {
            break;
        }
    }
    Ok(found)
}

/// The inode of the socket a `/proc/<pid>/fd/<n>` link points to (`socket:[<inode>]`), if it is
/// a socket.
fn socket_inode(fd: &Path) -> Option<u64> {
    let target = fs::read_link(fd).ok()?;
    target
        .to_str()?
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// A duplicate of descriptor `fd` of process `pid`.
fn take_fd(pid: u32, fd: u32) -> io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain syscalls with integer arguments; each returned descriptor is checked and then
    // owned by exactly one OwnedFd.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0);
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        let pidfd = OwnedFd::from_raw_fd(pidfd as i32);
        let socket = libc::syscall(
            libc::SYS_pidfd_getfd,
            std::os::fd::AsRawFd::as_raw_fd(&pidfd),
            fd,
            0,
        );
        if socket < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(OwnedFd::from_raw_fd(socket as i32))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TABLE: &str = "\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000:3A9B 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1500        0 4242 1 0 100 0 0 10 0
   1: 0100007F:3A99 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1500        0 4343 1 0 100 0 0 10 0
   2: 0200A8C0:3A9B 0300A8C0:D431 01 00000000:00000000 00:00000000 00000000  1500        0 4444 1 0 20 4 30 10 -1
";

    #[test]
    fn only_rows_listening_on_the_port_are_listeners() {
        // 0x3A9B is 15003; row 2 has that local port too, but is an established connection.
        assert_eq!(parse_listeners(TABLE, 15003), vec![4242]);
        assert_eq!(parse_listeners(TABLE, 15001), vec![4343]);
        assert!(parse_listeners(TABLE, 8080).is_empty());
    }

    #[test]
    fn a_short_or_garbled_row_is_skipped() {
        let table =
            "header\n   0: 00000000:3A9B\n   1: nonsense 00000000:0000 0A x x x x x notanumber\n";
        assert!(parse_listeners(table, 15003).is_empty());
    }

    #[test]
    fn sock_diag_and_the_tables_find_the_same_listeners() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let port = listener.local_addr().expect("its port").port();
        let found = listening_inodes(port).expect("sock_diag");
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found.values().collect::<Vec<_>>(), [&AF_INET]);
        assert_eq!(found, table_inodes(port).expect("the tables"));
    }

    #[test]
    fn the_agents_own_proc_is_its_pid_namespace() {
        assert!(same_pid_namespace(Path::new("/proc")));
        assert!(!same_pid_namespace(Path::new("/nonexistent")));
    }
}
