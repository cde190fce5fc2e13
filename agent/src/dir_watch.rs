//! Directories watched for any change (inotify), for readers that re-read everything on a change,
//! and every so often in case an event was lost (inotify's queue overflows): the pod manifests
//! source and the webhook's certificate.

use std::{
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::Duration,
};

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};

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
        let mut watcher = notify::recommended_watcher(move |_event| {
            // Any event means "re-read"; the receiver goes with the watcher.
            let _ = changes.send(());
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
    /// after `resync` without one.
    pub fn wait(&self, resync: Duration, debounce: Duration) {
        if self.events.recv_timeout(resync).is_ok() {
            thread::sleep(debounce);
            while self.events.try_recv().is_ok() {}
        }
    }
}
