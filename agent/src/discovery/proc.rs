//! Reading a `/proc`: the processes that belong to pods, with their network namespace and age.
//!
//! Processes come and go while the directory is read; one that is gone by the time its files are
//! read (`ENOENT`, or `ESRCH` from a file opened just before it exited) is simply not there. One
//! whose files cannot be read (`EACCES` on another user's `ns/net` without `CAP_SYS_PTRACE`) is
//! left out with the reason, and the rest of the scan goes on: it costs that process's pod at most.

use std::{
    fs::{self, File},
    io::{self, Read as _},
    path::Path,
    sync::Arc,
};

use super::{
    DiscoveryError, UnreadableProcess,
    cgroup::{PodCgroup, pod_of_process},
};
use crate::netns::NetnsId;

/// A process in a pod's cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub pid: u32,
    pub pod: PodCgroup,
    /// Clock ticks after boot at which the process started (field 22 of `<pid>/stat`).
    pub start_time: u64,
    pub netns: NetnsId,
}

/// A process left out of a scan because a file of it could not be read.
#[derive(Debug)]
pub struct Skipped {
    /// Its pod's UID; `None` when its cgroup was what could not be read.
    pub uid: Option<String>,
    pub process: UnreadableProcess,
}

/// What a scan of a `/proc` found.
#[derive(Debug)]
pub struct Scanned {
    pub processes: Vec<Process>,
    pub skipped: Vec<Skipped>,
    /// How many processes were looked at, for the error that finds none of a pod.
    pub scanned: usize,
}

/// Reads every process under `proc_root`. Only the `cgroup` file of a process outside the pods is
/// read, so a node's thousands of host processes cost one read each.
pub fn scan(proc_root: &Path) -> Result<Scanned, DiscoveryError> {
    let unreadable = |source| DiscoveryError::ProcUnreadable {
        path: proc_root.to_owned(),
        source,
    };
    let mut processes = Vec::new();
    let mut skipped = Vec::new();
    let mut scanned = 0;
    // One buffer for every file read: the scan reads thousands of small files.
    let mut text = String::new();
    for entry in fs::read_dir(proc_root).map_err(unreadable)? {
        let entry = entry.map_err(unreadable)?;
        let Some(pid) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        scanned += 1;
        match read_process(&entry.path(), pid, &mut text) {
            Ok(Some(process)) => processes.push(process),
            Ok(None) => {}
            Err(skip) => skipped.push(skip),
        }
    }
    Ok(Scanned {
        processes,
        skipped,
        scanned,
    })
}

/// The process whose directory is `dir`, if it is in a pod's cgroup and still there.
fn read_process(dir: &Path, pid: u32, text: &mut String) -> Result<Option<Process>, Skipped> {
    let cgroup = dir.join("cgroup");
    let not_a_pods = |process| Skipped { uid: None, process };
    if present(pid, &cgroup, read_into(&cgroup, text))
        .map_err(not_a_pods)?
        .is_none()
    {
        return Ok(None);
    }
    let Some(pod) = pod_of_process(text) else {
        return Ok(None);
    };
    let pods = |process| Skipped {
        uid: Some(pod.uid.clone()),
        process,
    };
    let stat = dir.join("stat");
    if present(pid, &stat, read_into(&stat, text))
        .map_err(pods)?
        .is_none()
    {
        return Ok(None);
    }
    let start_time = start_time(text).ok_or_else(|| {
        pods(UnreadableProcess {
            pid,
            path: stat.clone(),
            error: Arc::new(io::Error::new(
                io::ErrorKind::InvalidData,
                "no start time in field 22",
            )),
        })
    })?;
    let ns = dir.join("ns/net");
    let Some(netns) = present(pid, &ns, NetnsId::of(&ns)).map_err(pods)? else {
        return Ok(None);
    };
    Ok(Some(Process {
        pid,
        pod,
        start_time,
        netns,
    }))
}

fn read_into(path: &Path, text: &mut String) -> io::Result<()> {
    text.clear();
    File::open(path)?.read_to_string(text).map(drop)
}

/// `Ok(None)` when process `pid`, whose file `path` is, is gone; other failures say why it could
/// not be read.
fn present<T>(
    pid: u32,
    path: &Path,
    result: io::Result<T>,
) -> Result<Option<T>, UnreadableProcess> {
    match result {
        Ok(value) => Ok(Some(value)),
        Err(error) if vanished(&error) => Ok(None),
        Err(error) => Err(UnreadableProcess {
            pid,
            path: path.to_owned(),
            error: Arc::new(error),
        }),
    }
}

/// Whether `error` says the process is gone: its directory (`ENOENT`) or the task behind an open
/// file (`ESRCH`). A zombie's `ns/net` is `ENOENT` too.
pub fn vanished(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::NotFound || error.raw_os_error() == Some(libc::ESRCH)
}

/// Field 22 of a `<pid>/stat` line. The command name (field 2) is in parentheses and may itself
/// hold spaces and parentheses, so the fields are counted from the last `)`.
fn start_time(stat: &str) -> Option<u64> {
    let (_, after_comm) = stat.rsplit_once(')')?;
    // Field 3 (state) is the first after the name.
    after_comm.split_whitespace().nth(22 - 3)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::{
        path::PathBuf,
        sync::atomic::{AtomicU32, Ordering},
    };

    use super::*;

    const UID: &str = "0b9c4d1e-7f2a-4c3b-9d8e-1a2b3c4d5e6f";

    fn stat_line(pid: u32, comm: &str, start_time: u64) -> String {
        format!(
            "{pid} ({comm}) S 1 {pid} {pid} 0 -1 4194560 120 0 0 0 3 1 0 0 20 0 1 0 {start_time} \
             2400000 200 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0"
        )
    }

    #[test]
    fn start_time_is_counted_past_a_command_with_spaces_and_parentheses() {
        assert_eq!(start_time(&stat_line(42, "sleep", 1234)), Some(1234));
        assert_eq!(start_time(&stat_line(42, "a) (b c) d", 98765)), Some(98765));
        assert_eq!(start_time(&stat_line(42, ")", 7)), Some(7));
        assert_eq!(start_time("42 (sleep) S 1 2"), None);
        assert_eq!(start_time("garbage"), None);
    }

    /// A directory laid out like `/proc`, removed on drop.
    struct FakeProc(PathBuf);

    impl FakeProc {
        fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let root = std::env::temp_dir()
                .join(format!("probe-bypass-fake-proc-{}-{n}", std::process::id()));
            fs::create_dir_all(&root).expect("create the fake /proc");
            Self(root)
        }

        fn file(&self, relative: &str, contents: &str) {
            let path = self.0.join(relative);
            fs::create_dir_all(path.parent().expect("a parent")).expect("create a process dir");
            fs::write(&path, contents).expect("write a /proc file");
        }

        fn process(&self, pid: u32, cgroup: &str, start_time: u64) {
            self.file(&format!("{pid}/cgroup"), cgroup);
            self.file(&format!("{pid}/stat"), &stat_line(pid, "pause", start_time));
            self.file(&format!("{pid}/ns/net"), "");
        }
    }

    impl Drop for FakeProc {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn scan_keeps_pod_processes_and_skips_the_rest_and_the_vanished() {
        let proc = FakeProc::new();
        proc.process(100, &format!("0::/kubepods/pod{UID}/c1\n"), 500);
        proc.process(101, "0::/system.slice/sshd.service\n", 10);
        // Gone between the directory listing and the read of its files.
        proc.file("102/stat", &stat_line(102, "sleep", 600));
        proc.file("103/cgroup", &format!("0::/kubepods/pod{UID}/c1\n"));
        proc.file("self/cgroup", &format!("0::/kubepods/pod{UID}/c1\n"));

        let found = scan(&proc.0).expect("scan");
        assert_eq!(found.scanned, 4);
        let pids: Vec<u32> = found.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [100]);
        assert!(found.skipped.is_empty(), "{:?}", found.skipped);
        let process = &found.processes[0];
        assert_eq!(process.pod.uid, UID);
        assert_eq!(process.start_time, 500);
        assert_eq!(
            process.netns,
            NetnsId::of(&proc.0.join("100/ns/net")).expect("stat")
        );
    }

    #[test]
    fn unreadable_processes_are_left_out_with_their_pod_and_reason() {
        let proc = FakeProc::new();
        let pod = format!("0::/kubepods/pod{UID}/c1\n");
        proc.process(100, &pod, 500);
        // A symlink to itself stands for an `ns/net` that cannot be opened: root reads any file.
        proc.process(104, &pod, 400);
        let ns = proc.0.join("104/ns/net");
        fs::remove_file(&ns).expect("remove ns/net");
        std::os::unix::fs::symlink("net", &ns).expect("make a symlink loop");
        proc.process(105, &pod, 300);
        proc.file("105/stat", "105 (pause) S 1");
        proc.process(106, &pod, 200);
        fs::remove_file(proc.0.join("106/cgroup")).expect("remove cgroup");
        fs::create_dir(proc.0.join("106/cgroup")).expect("make cgroup a directory");

        let found = scan(&proc.0).expect("one unreadable process does not fail the scan");
        let pids: Vec<u32> = found.processes.iter().map(|p| p.pid).collect();
        assert_eq!(pids, [100]);
        let mut skipped: Vec<(u32, Option<&str>, PathBuf)> = found
            .skipped
            .iter()
            .map(|s| (s.process.pid, s.uid.as_deref(), s.process.path.clone()))
            .collect();
        skipped.sort();
        assert_eq!(
            skipped,
            [
                (104, Some(UID), ns),
                (105, Some(UID), proc.0.join("105/stat")),
                (106, None, proc.0.join("106/cgroup")),
            ]
        );
    }

    #[test]
    fn scan_of_a_missing_proc_says_where() {
        let error = scan(Path::new("/nonexistent/proc")).expect_err("no such directory");
        assert!(
            matches!(&error, DiscoveryError::ProcUnreadable { path, .. } if path == Path::new("/nonexistent/proc")),
            "{error}"
        );
    }
}
