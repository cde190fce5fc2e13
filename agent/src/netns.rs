//! Network namespaces: a handle that owns the namespace file, and one dedicated thread that enters them.
//!
//! A socket belongs to the namespace of the thread that created it and stays there, so the agent
//! serves inside every pod from one process: it enters a pod's namespace only around `socket()` and
//! `bind()`, then uses the socket from tokio as usual. `setns` changes the namespace of the calling
//! thread, so it never runs on a tokio worker (the next task on that worker would run inside the pod);
//! it runs on [`NetnsWorker`]'s own thread, which always returns to the host namespace afterwards.

use std::{
    fmt,
    fs::File,
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::{Arc, mpsc},
    thread,
};

use nix::sched::{CloneFlags, setns};
use tokio::sync::oneshot;

/// Identity of a network namespace: the device and inode of its nsfs file, stable for its lifetime
/// whatever path it was opened through.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NetnsId {
    pub dev: u64,
    pub ino: u64,
}

impl NetnsId {
    /// The identity of the namespace whose nsfs file `path` is, without opening it.
    pub fn of(path: &Path) -> io::Result<Self> {
        std::fs::metadata(path).map(|meta| Self::from(&meta))
    }
}

impl From<&std::fs::Metadata> for NetnsId {
    fn from(meta: &std::fs::Metadata) -> Self {
        Self {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }
}

impl fmt::Display for NetnsId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "net:[{}]", self.ino)
    }
}

/// The cookie of the calling thread's network namespace: the number the kernel's eBPF programs see
/// for it (`bpf_get_netns_cookie`). Run it inside a pod's namespace with [`NetnsWorker::run`].
///
/// Read from a throwaway socket with `SO_NETNS_COOKIE` (Linux 5.14+).
pub fn netns_cookie() -> io::Result<u64> {
    use std::os::fd::AsRawFd as _;

    /// `SO_NETNS_COOKIE`, at level `SOL_SOCKET`.
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are live for the call and `len` is `cookie`'s size.
    let ret = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            std::ptr::from_mut(&mut cookie).cast(),
            &mut len,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// An open network namespace. Holding it keeps the namespace alive.
#[derive(Debug)]
pub struct Netns {
    file: File,
    id: NetnsId,
    path: PathBuf,
}

impl PartialEq for Netns {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}

impl Eq for Netns {}

/// Why a namespace could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot open network namespace {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot enter network namespace {path}: {}", enter_failure(*.source))]
    Enter { path: PathBuf, source: nix::Error },
    #[error("in network namespace {path}: {source}")]
    Op { path: PathBuf, source: io::Error },
    #[error("the netns worker thread is gone")]
    WorkerGone,
}

/// What a failed `setns` says about the agent or the file.
fn enter_failure(errno: nix::Error) -> String {
    match errno {
        nix::Error::EPERM => {
            "setns: EPERM: the agent lacks CAP_SYS_ADMIN, which entering a namespace needs"
                .to_owned()
        }
        nix::Error::EINVAL => "not a network namespace (setns: EINVAL)".to_owned(),
        errno => format!("setns: {errno}"),
    }
}

impl Netns {
    /// Opens the namespace at `path` (`/run/netns/<name>`, `/proc/<pid>/ns/net`, …).
    pub fn open(path: &Path) -> Result<Self, NetnsError> {
        let open_error = |source| NetnsError::Open {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(open_error)?;
        let meta = file.metadata().map_err(open_error)?;
        Ok(Self {
            file,
            id: NetnsId::from(&meta),
            path: path.to_owned(),
        })
    }

    /// The namespace of the calling thread.
    pub fn current() -> Result<Self, NetnsError> {
        Self::open(Path::new("/proc/thread-self/ns/net"))
    }

    pub fn id(&self) -> NetnsId {
        self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's nsfs file, which is what attaches a program to the namespace.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Moves the calling thread into this namespace.
    fn enter(&self) -> Result<(), NetnsError> {
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })
    }
}

type Job = Box<dyn FnOnce(&Netns) + Send>;

/// A thread that runs short jobs (creating and binding sockets) inside network namespaces.
///
/// Cheap to clone; the thread ends when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct NetnsWorker {
    jobs: mpsc::Sender<Job>,
}

impl NetnsWorker {
    /// Starts the worker thread in the caller's namespace, which it returns to after every job.
    pub fn spawn() -> Result<Self, NetnsError> {
        let home = Netns::current()?;
        let (jobs, queue) = mpsc::channel::<Job>();
        thread::Builder::new()
            .name("netns-worker".to_owned())
            .spawn(move || {
                for job in queue {
                    job(&home);
                }
            })
            .map_err(|source| NetnsError::Op {
                path: PathBuf::from("/proc/thread-self/ns/net"),
                source,
            })?;
        Ok(Self { jobs })
    }

    /// Runs `op` inside `netns` on the worker thread and returns its result.
    pub async fn run<T, F>(&self, netns: &Arc<Netns>, op: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        self.submit(netns, op)?
            .await
            .map_err(|_| NetnsError::WorkerGone)?
    }

    /// Like [`run`](Self::run), for callers outside an async context.
    pub fn run_blocking<T, F>(&self, netns: &Arc<Netns>, op: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        self.submit(netns, op)?
            .blocking_recv()
            .map_err(|_| NetnsError::WorkerGone)?
    }

    fn submit<T, F>(
        &self,
        netns: &Arc<Netns>,
        op: F,
    ) -> Result<oneshot::Receiver<Result<T, NetnsError>>, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> io::Result<T> + Send + 'static,
    {
        let (done, result) = oneshot::channel();
        let target = Arc::clone(netns);
        let job: Job = Box::new(move |home| {
            let outcome = target.enter().and_then(|()| {
                let value = op().map_err(|source| NetnsError::Op {
                    path: target.path.clone(),
                    source,
                });
                if let Err(error) = home.enter() {
                    // Staying in a pod's namespace would create the next pod's sockets in the wrong
                    // pod. The host namespace file is held open, so this cannot happen short of a
                    // kernel bug; stop rather than risk it.
                    log::error!("cannot return the netns worker to the host namespace: {error}");
                    std::process::abort();
                }
                value
            });
            // The caller may have stopped waiting (shutdown); the socket is then simply closed.
            let _ = done.send(outcome);
        });
        self.jobs.send(job).map_err(|_| NetnsError::WorkerGone)?;
        Ok(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enter_error_names_the_missing_capability_on_eperm() {
        let enter = |source| NetnsError::Enter {
            path: PathBuf::from("/host/proc/42/ns/net"),
            source,
        };
        let denied = enter(nix::Error::EPERM).to_string();
        assert!(denied.contains("CAP_SYS_ADMIN"), "{denied}");
        assert!(denied.contains("/host/proc/42/ns/net"), "{denied}");
        assert!(!denied.contains("not a network namespace"), "{denied}");
        let wrong_file = enter(nix::Error::EINVAL).to_string();
        assert!(
            wrong_file.contains("not a network namespace"),
            "{wrong_file}"
        );
    }
}
