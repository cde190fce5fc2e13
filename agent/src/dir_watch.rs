//! Directories watched for any change (inotify), for readers that re-read everything on a change,
//! and every so often in case an event was lost (inotify's queue overflows): the pod manifests
//! source and the webhook's certificate.
//!
//! Only events that can mean a change count ([`is_change`]): notify also reports every open of a
//! watched file, and the readers' own re-read opens them all.

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::Duration,
};

use notify::{
    Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher as _,
    event::{AccessKind, AccessMode},
};

/// A directory that could not be watched.
#[derive(Debug, thiserror::Error)]
#[error("cannot watch {path}: {source}")]
pub struct DirWatchError {
    pub path: PathBuf,
    #[source]
    pub source: notify::Error,
}

/// Watches directories (not recursively) until dropped.
pub struct DirWatch {
    _watcher: RecommendedWatcher,
    events: mpsc::Receiver<()>,
}

impl DirWatch {
    pub fn new(dirs: &[&Path]) -> Result<Self, DirWatchError> {
        let (changes, events) = mpsc::channel();
        let error = |path: &Path| {
            let path = path.to_owned();
            move |source| DirWatchError { path, source }
        };
        let first = dirs.first().copied().unwrap_or(Path::new("."));
        let mut watcher = notify::recommended_watcher(move |event| {
            if is_change(&event) {
                // Any change means "re-read"; the receiver goes with the watcher.
                let _ = changes.send(());
            }
        })
        .map_err(error(first))?;
        for dir in dirs {
            watcher
                .watch(dir, RecursiveMode::NonRecursive)
                .map_err(error(dir))?;
        }
        Ok(Self {
            _watcher: watcher,
            events,
        })
    }

    /// Returns after a change, then `debounce` more so that a burst of events is read once; or
    /// after `resync` without one. Says whether a change ended the wait.
    pub fn wait(&self, resync: Duration, debounce: Duration) -> bool {
        if self.events.recv_timeout(resync).is_err() {
            return false;
        }
        thread::sleep(debounce);
        while self.events.try_recv().is_ok() {}
        true
    }
}

/// Whether an event can mean that what is in the directory changed. notify watches for opens too
/// (`IN_OPEN`, reported as an access), and a reader that re-reads everything opens every file: if
/// an open counted, each re-read would start the next one a debounce later, for as long as the
/// agent runs. With 500 pod manifests that loop took half of a 2-core node's CPU. Opens, reads and
/// closes after reading change nothing; a close after writing (`IN_CLOSE_WRITE`) does. An error
/// (the event queue overflowed, say) may hide a change, so it counts as one.
fn is_change(event: &notify::Result<Event>) -> bool {
    match event {
        Ok(event) => match event.kind {
            EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
            EventKind::Access(_) => false,
            _ => true,
        },
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    /// How long to wait for an event that must not come: inotify delivers an event of the
    /// test's own action within milliseconds, so one that is coming has come by then.
    const SETTLE: Duration = Duration::from_millis(500);
    /// How long to wait for an event that must come: the wait returns as soon as it does, so this
    /// only bounds a failure, however loaded the machine.
    const BOUND: Duration = Duration::from_secs(10);

    /// A directory of the test's own, removed when the test ends, a failed assertion included.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("pb-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(&dir).expect("a temporary directory");
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn reading_the_files_is_no_change_and_writing_one_is() {
        let temp = TempDir::new("dir-watch");
        let dir = &temp.0;
        let file = dir.join("pod.yaml");
        fs::write(&file, "a").expect("write");
        let watch = DirWatch::new(&[dir]).expect("watch");

        // What a reader's re-read does: list the directory, open and read every file.
        let listed: Vec<_> = fs::read_dir(dir)
            .expect("list")
            .map(|entry| entry.expect("entry").path())
            .collect();
        for path in &listed {
            assert_eq!(fs::read_to_string(path).expect("read"), "a");
        }
        assert!(
            !watch.wait(SETTLE, Duration::ZERO),
            "a read counted as a change"
        );

        fs::write(&file, "b").expect("rewrite");
        assert!(watch.wait(BOUND, Duration::ZERO), "a write was missed");
        fs::remove_file(&file).expect("remove");
        assert!(watch.wait(BOUND, Duration::ZERO), "a removal was missed");
    }
}
