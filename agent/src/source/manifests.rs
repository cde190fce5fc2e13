//! A directory of Pod manifests: the pod source that needs no cluster, like the kubelet's static pods.
//!
//! Each `*.yaml`, `*.yml` or `*.json` file (dotfiles skipped, as editors and atomic writers use them
//! for temporary files) holds one Pod with `status.podIP` and the `probe-bypass/netns` annotation.
//! The directory is watched with inotify and rescanned as a whole on every change, and every few
//! seconds in case an event was lost. A file that stops parsing keeps its last valid pod: a
//! half-written or broken edit is reported, and nothing that was served is lost.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
    thread,
    time::Duration,
};

use tokio::sync::watch;

use super::{PodSet, Snapshot};
use crate::{
    dir_watch::DirWatch,
    pod::{Pod, PodKey},
};

/// Time to let a burst of file events settle before rescanning.
const DEBOUNCE: Duration = Duration::from_millis(20);

/// Rescan period when no event arrives (events can be lost when inotify's queue overflows).
const RESYNC: Duration = Duration::from_secs(5);

/// Largest manifest read; a Pod manifest is a few KiB.
const MAX_MANIFEST_BYTES: u64 = 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("pod manifests directory {path}: {source}")]
    Dir { path: PathBuf, source: io::Error },
    #[error("cannot watch pod manifests directory {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// Reads `dir` once, then watches it on a thread of its own. The returned receiver always holds
/// the current pod set; the thread stops when the receiver is dropped.
pub fn watch(dir: &Path) -> Result<watch::Receiver<Arc<Snapshot>>, SourceError> {
    let mut manifests = ManifestDir::new(dir);
    let first = manifests.scan().map_err(|source| SourceError::Dir {
        path: dir.to_owned(),
        source,
    })?;
    let changes = DirWatch::new(&[dir]).map_err(|error| SourceError::Watch {
        path: dir.to_owned(),
        source: error.source,
    })?;
    let (publish, pods) = watch::channel(Arc::new(Snapshot::served(first)));
    thread::Builder::new()
        .name("pod-manifests".to_owned())
        .spawn(move || {
            follow(manifests, &changes, &publish);
        })
        .map_err(|source| SourceError::Dir {
            path: dir.to_owned(),
            source,
        })?;
    Ok(pods)
}

fn follow(mut manifests: ManifestDir, changes: &DirWatch, publish: &watch::Sender<Arc<Snapshot>>) {
    let mut dir_error: Option<String> = None;
    while !publish.is_closed() {
        changes.wait(RESYNC, DEBOUNCE);
        match manifests.scan() {
            Ok(pods) => {
                let pods = Snapshot::served(pods);
                if dir_error.take().is_some() {
                    log::info!(
                        "pod manifests directory {} is readable again",
                        manifests.dir.display()
                    );
                }
                publish.send_if_modified(|current| {
                    let changed = **current != pods;
                    if changed {
                        *current = Arc::new(pods);
                    }
                    changed
                });
            }
            Err(error) => {
                let error = error.to_string();
                if dir_error.as_ref() != Some(&error) {
                    log::error!(
                        "pod manifests directory {}: {error}; still serving the pods read before",
                        manifests.dir.display()
                    );
                    dir_error = Some(error);
                }
            }
        }
    }
}

/// What is known of one manifest file.
#[derive(Default)]
struct FileState {
    /// The last pod the file described validly.
    pod: Option<Arc<Pod>>,
    /// The current problem with the file, reported once.
    error: Option<String>,
    /// Another file already describes the same pod; reported once.
    duplicate_of: Option<PathBuf>,
}

struct ManifestDir {
    dir: PathBuf,
    files: BTreeMap<PathBuf, FileState>,
}

impl ManifestDir {
    fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            files: BTreeMap::new(),
        }
    }

    /// Reads every manifest and returns the pod set they describe.
    fn scan(&mut self) -> io::Result<PodSet> {
        let mut present = BTreeSet::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if is_manifest(&path) && path.is_file() {
                present.insert(path);
            }
        }
        self.files.retain(|path, _| present.contains(path));
        for path in present {
            let state = self.files.entry(path.clone()).or_default();
            match read_manifest(&path) {
                Ok(parsed) => {
                    if state.error.take().is_some() {
                        log::info!("{}: valid again", path.display());
                    }
                    let pod = Arc::new(parsed.pod);
                    if state.pod.as_ref() != Some(&pod) {
                        for warning in parsed.warnings {
                            log::warn!("{}: pod {}: {warning}", path.display(), pod.key);
                        }
                        state.pod = Some(pod);
                    }
                }
                Err(error) => {
                    if state.error.as_ref() != Some(&error) {
                        let kept = match &state.pod {
                            Some(pod) => format!("; still serving pod {} as last read", pod.key),
                            None => String::new(),
                        };
                        log::error!("{}: {error}{kept}", path.display());
                        state.error = Some(error);
                    }
                }
            }
        }
        Ok(self.pod_set())
    }

    /// The pods of all files; when two files name the same pod, the first by file name wins.
    fn pod_set(&mut self) -> PodSet {
        let mut pods = PodSet::new();
        let mut owners: BTreeMap<PodKey, PathBuf> = BTreeMap::new();
        for (path, state) in &mut self.files {
            let Some(pod) = &state.pod else { continue };
            if let Some(owner) = owners.get(&pod.key) {
                if state.duplicate_of.as_ref() != Some(owner) {
                    log::error!(
                        "{}: pod {} is already described by {}; ignoring this file",
                        path.display(),
                        pod.key,
                        owner.display()
                    );
                    state.duplicate_of = Some(owner.clone());
                }
                continue;
            }
            state.duplicate_of = None;
            owners.insert(pod.key.clone(), path.clone());
            pods.insert(pod.key.clone(), Arc::clone(pod));
        }
        pods
    }
}

fn is_manifest(path: &Path) -> bool {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return false;
    };
    !name.starts_with('.')
        && [".yaml", ".yml", ".json"]
            .iter()
            .any(|ext| name.ends_with(ext))
}

fn read_manifest(path: &Path) -> Result<crate::pod::Parsed, String> {
    let size = fs::metadata(path).map_err(|e| e.to_string())?.len();
    if size > MAX_MANIFEST_BYTES {
        return Err(format!(
            "{size} bytes is larger than a pod manifest can be ({MAX_MANIFEST_BYTES})"
        ));
    }
    let text = fs::read_to_string(path).map_err(|e| e.to_string())?;
    parse(&text)
}

/// Reads the text of a manifest file: one Pod, in YAML or JSON.
pub fn parse(text: &str) -> Result<crate::pod::Parsed, String> {
    if text.trim().is_empty() {
        return Err("the file is empty".to_owned());
    }
    // YAML is a superset of JSON, so one parser reads both.
    let doc: serde_json::Value =
        serde_norway::from_str(text).map_err(|e| format!("not valid YAML or JSON: {e}"))?;
    Pod::from_manifest(doc).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = r#"{"apiVersion":"v1","kind":"Pod",
      "metadata":{"name":"NAME","namespace":"ns","annotations":{"probe-bypass/netns":"NAME"}},
      "spec":{"containers":[{"name":"app","livenessProbe":{"tcpSocket":{"port":8080}}}]},
      "status":{"podIP":"198.18.0.2"}}"#;

    fn write(dir: &Path, file: &str, text: &str) {
        fs::write(dir.join(file), text).expect("write manifest");
    }

    fn names(pods: &PodSet) -> Vec<String> {
        pods.keys().map(ToString::to_string).collect()
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("probe-bypass-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("temp dir");
        dir
    }

    #[test]
    fn reads_yaml_and_json_and_skips_other_files() {
        let dir = temp_dir("kinds");
        write(&dir, "a.json", &POD.replace("NAME", "a"));
        let yaml: serde_json::Value =
            serde_json::from_str(&POD.replace("NAME", "b")).expect("json");
        write(
            &dir,
            "b.yaml",
            &serde_norway::to_string(&yaml).expect("yaml"),
        );
        write(&dir, ".c.json.swp", &POD.replace("NAME", "c"));
        write(&dir, "d.txt", &POD.replace("NAME", "d"));
        let pods = ManifestDir::new(&dir).scan().expect("scan");
        assert_eq!(names(&pods), ["ns/a", "ns/b"]);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn broken_edit_keeps_last_valid_pod_and_removal_drops_it() {
        let dir = temp_dir("broken");
        let mut manifests = ManifestDir::new(&dir);
        write(&dir, "a.json", &POD.replace("NAME", "a"));
        write(&dir, "b.json", "{ not json");
        assert_eq!(names(&manifests.scan().expect("scan")), ["ns/a"]);
        write(&dir, "a.json", "{\"apiVersion\": \"v1\", ");
        assert_eq!(names(&manifests.scan().expect("scan")), ["ns/a"]);
        fs::remove_file(dir.join("a.json")).expect("rm");
        assert!(manifests.scan().expect("scan").is_empty());
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn two_files_for_one_pod_keep_the_first() {
        let dir = temp_dir("dup");
        write(&dir, "1.json", &POD.replace("NAME", "a"));
        write(
            &dir,
            "2.json",
            &POD.replace("NAME", "a").replace("198.18.0.2", "198.18.0.6"),
        );
        let pods = ManifestDir::new(&dir).scan().expect("scan");
        assert_eq!(pods.len(), 1);
        assert_eq!(
            pods.values().next().map(|p| p.ip.to_string()),
            Some("198.18.0.2".into())
        );
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn pod_whose_init_containers_run_is_read_like_a_running_one() {
        // Pending while its validation init container runs: an IP and a sandbox already.
        let status = r#""status":{"phase":"Pending","podIP":"198.18.0.2",
          "initContainerStatuses":[{"name":"probe-bypass-validation","ready":false,
            "restartCount":0,"image":"","imageID":"","state":{"running":{}}}],
          "containerStatuses":[{"name":"app","ready":false,"restartCount":0,"image":"",
            "imageID":"","state":{"waiting":{"reason":"PodInitializing"}}}]}}"#;
        let dir = temp_dir("initializing");
        let pending = POD
            .replace("NAME", "a")
            .replace(r#""status":{"podIP":"198.18.0.2"}}"#, status);
        assert!(pending.contains("PodInitializing"), "{pending}");
        write(&dir, "a.json", &pending);
        let pods = ManifestDir::new(&dir).scan().expect("scan");
        assert_eq!(names(&pods), ["ns/a"]);
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let error = watch(Path::new("/nonexistent/probe-bypass")).expect_err("no dir");
        assert!(
            error
                .to_string()
                .starts_with("pod manifests directory /nonexistent/probe-bypass:")
        );
    }
}
